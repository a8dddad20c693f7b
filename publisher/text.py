"""Plain-text output for the operator commands (`status`, `history`, `gc`, `rollout status`).

Much of what these print was written by instances (status reports), which the operator does not
trust: every cell goes through `visible`, so an escape sequence cannot drive the operator's
terminal and a newline cannot forge a row. JSON output (`--json`) stays exact.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: C0 controls, DEL, C1 controls, and the Unicode format characters that reorder or hide text
#: (bidi overrides and isolates, zero-width joiners, the BOM): shown, never obeyed.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def visible(text: str) -> str:
    """`text` with every control or invisible formatting character replaced by its escape (`\\x1b`)."""
    return _INVISIBLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def render_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, as wide as their widest cell; no trailing blanks."""
    lines = [[visible(cell) for cell in line] for line in [header, *body]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)
