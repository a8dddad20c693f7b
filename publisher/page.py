"""The fleet page (`deployer status --html/--upload`): fleet rows → one self-contained HTML file. Pure.

Status reports are untrusted input: an instance can write anything into its report's body, and
whoever opens the page must not run it. So every value goes through `_e` (html.escape, quotes
included) on its way into text or an attribute, the page has no script at all, and its Content
Security Policy forbids scripts, frames and every fetch: if a value ever slipped past escaping,
the browser would still neither run it nor contact anyone.

One grid per stage/role (instances × components), each cell coloured by its `Kind`, under a
panel per channel: the pointer, its `summary()` line, and a staged rollout's waves. Built in
one pass over the rows (grouped once, never searched), so 10,000 instances stay a few MB and
render in well under a second.
"""

from __future__ import annotations

import enum
import html
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from deployer.protocol.deploy import Deploy
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState
from deployer.protocol.rollout import Cursor, RolloutState, wave_admitted
from deployer.protocol.timestamps import TIMESTAMP_FORMAT
from publisher.fleet import BOOT_FAILED, UNREADABLE, Row, format_age, summary

#: Characters of an error shown in the grid; the full text is one click away (<details>).
ERROR_PREVIEW_CHARS = 80
#: No scripts, no frames, no fetches of any kind: only the page's own inline style.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


class Kind(enum.StrEnum):
    """What a cell's colour says, most urgent first (a cell is coloured by the first that applies)."""

    UNREADABLE = "unreadable"
    STALE = "stale"
    BOOT_FAILED = BOOT_FAILED
    FAILED = "failed"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"
    BEHIND = "behind"
    APPLYING = "applying"
    WAITING = "waiting"
    PENDING = "pending"
    OK = "ok"


#: Per kind: the legend's words and the cell's background. The one place a colour is spelled.
LEGEND: dict[Kind, tuple[str, str]] = {
    Kind.OK: ("applied", "#c8efc8"),
    Kind.APPLYING: ("a deploy in progress", "#bcd9ff"),
    Kind.WAITING: ("on stable until its rollout wave", "#e2d6f5"),
    Kind.PENDING: ("nothing applied yet", "#eeeeee"),
    Kind.BEHIND: ("heartbeats on an older seq than the pointer", "#ffe08a"),
    Kind.ROLLED_BACK: ("its wave was admitted, then the rollout aborted", "#ffc9a8"),
    Kind.FAILED: ("may succeed on retry", "#ff9c9c"),
    Kind.REJECTED: ("can never succeed", "#e06666"),
    Kind.BOOT_FAILED: ("the agent cannot join; it retries", "#ff8a3d"),
    Kind.STALE: ("no heartbeat within --stale-after", "#b8b8b8"),
    Kind.UNREADABLE: ("the report does not parse", "#d35fd3"),
}

_STATE_KINDS = {state.value: Kind(state.value) for state in ComponentState}


def kind_of(row: Row, cursor: Cursor | None = None) -> Kind:
    """The colour of one cell: what an operator must look at first wins. Pure.

    Stale beats failed: an instance silent for hours is most likely gone, and what it last said
    is history. Rolled back needs the channel's cursor: an aborted rollout whose wave had admitted
    the instance.
    """
    if row.state == UNREADABLE:
        return Kind.UNREADABLE
    if row.stale:
        return Kind.STALE
    if row.state == BOOT_FAILED:
        return Kind.BOOT_FAILED
    kind = _STATE_KINDS.get(row.state, Kind.PENDING)
    if kind in (Kind.FAILED, Kind.REJECTED):
        return kind
    if cursor is not None and cursor.state is RolloutState.ABORTED and row.wave is not None and row.wave <= cursor.wave:
        return Kind.ROLLED_BACK
    return Kind.BEHIND if row.behind else kind


def _e(value: object) -> str:
    """Escape for text and for quoted attributes alike: every value on the page goes through here."""
    return html.escape(str(value), quote=True)


@dataclass
class _Group:
    """One stage/role: its instances (each a component → row map, in row order) and its channels' rows."""

    instances: dict[str, dict[str, Row]] = field(default_factory=dict)
    channels: dict[str, list[Row]] = field(default_factory=dict)
    unreadable: list[Row] = field(default_factory=list)


def _group(rows: Iterable[Row]) -> dict[tuple[str, str], _Group]:
    groups: dict[tuple[str, str], _Group] = {}
    for row in rows:
        group = groups.setdefault((row.stage, row.role), _Group())
        group.instances.setdefault(row.instance_id, {})[row.component] = row
        if row.state == UNREADABLE:
            group.unreadable.append(row)
        else:
            group.channels.setdefault(row.component, []).append(row)
    return dict(sorted(groups.items()))


@dataclass(frozen=True)
class FleetView:
    """One fleet as the page shows it: its rows (from `fleet_rows`, with the same `pointers`, so
    rows carry their waves), its pointers and rollout cursors, and what to call it."""

    label: str
    rows: Sequence[Row]
    pointers: Mapping[Channel, Deploy] = field(default_factory=dict)
    cursors: Mapping[Channel, Cursor] = field(default_factory=dict)


def render_page(
    rows: Sequence[Row],
    *,
    generated_at: datetime,
    pointers: Mapping[Channel, Deploy] | None = None,
    cursors: Mapping[Channel, Cursor] | None = None,
    source: str = "",
) -> str:
    """The whole page of one fleet. `cursors` say which waves are admitted; `source` names where
    the fleet was read."""
    return render_views([FleetView(source, rows, pointers or {}, cursors or {})], generated_at=generated_at)


def render_views(views: Sequence[FleetView], *, generated_at: datetime) -> str:
    """One page for one fleet, or for the targets of a channel that lives in several (regions,
    accounts): one part per target, headed by its label, its stage/role groups inside."""
    kinds: Counter[Kind] = Counter()
    parts, instances, stale, groups_seen = [], 0, 0, 0
    for view in views:
        groups = _group(view.rows)
        anchor = f"{view.label.split(' ')[0]}-" if len(views) > 1 else ""
        sections = [
            _section(stage, role, group, view.pointers, view.cursors, kinds, anchor)
            for (stage, role), group in groups.items()
        ]
        if len(views) > 1:
            parts.append(f'<h2 class="target">{_e(view.label)}</h2>')
        parts.append("\n".join(sections) if sections else '<p class="empty">no instances have reported yet</p>')
        instances += sum(len(group.instances) for group in groups.values())
        stale += sum(1 for group in groups.values() for cells in group.instances.values() if _stale(cells))
        groups_seen += len(groups)
    head = f"{instances} instance(s) in {groups_seen} stage/role group(s), {stale} stale"
    source = views[0].label if len(views) == 1 else f"{len(views)} targets"
    return _PAGE.format(
        csp=_e(CONTENT_SECURITY_POLICY),
        style=_STYLE,
        title=_e(f"fleet {source}".strip()),
        source=_e(source or "fleet"),
        generated=_e(generated_at.strftime(TIMESTAMP_FORMAT)),
        head=_e(head),
        legend=_legend(kinds),
        body="\n".join(parts),
    )


def _stale(cells: Mapping[str, Row]) -> bool:
    return any(row.stale for row in cells.values())


def _legend(kinds: Counter[Kind]) -> str:
    items = "".join(
        f'<li><span class="sw k-{_e(kind.value)}"></span><b>{_e(kind.value)}</b>'
        f' <span class="n">{kinds.get(kind, 0)}</span> {_e(words)}</li>'
        for kind, (words, _colour) in LEGEND.items()
    )
    return f'<ul class="legend">{items}</ul>'


def _section(
    stage: str,
    role: str,
    group: _Group,
    pointers: Mapping[Channel, Deploy],
    cursors: Mapping[Channel, Cursor],
    kinds: Counter[Kind],
    anchor: str = "",
) -> str:
    components = sorted(group.channels)
    panels = [
        _channel_panel(Channel(stage, role, c), group.channels[c], pointers, cursors.get(Channel(stage, role, c)))
        for c in components
    ]
    if group.unreadable:
        panels.extend(f'<p class="summary">{_e(line)}</p>' for line in summary(group.unreadable))
    header = "".join(f'<th scope="col">{_e(c)}</th>' for c in components)
    lines = []
    for instance, cells in group.instances.items():
        cursor_of = {c: cursors.get(Channel(stage, role, c)) for c in cells}
        lines.append(_instance_row(instance, cells, components, cursor_of, kinds))
    return (
        f'<section id="{_e(anchor)}{_e(stage)}-{_e(role)}"><details open><summary><h2>{_e(stage)}/{_e(role)}</h2> '
        f"<span>{len(group.instances)} instance(s), {len(components)} component(s)</span></summary>\n"
        f'<div class="channels">{"".join(panels)}</div>\n'
        f'<table class="grid"><thead><tr><th scope="col">instance</th><th scope="col">heartbeat</th>'
        f'{header}<th scope="col">last error</th></tr></thead>\n<tbody>\n{"".join(lines)}</tbody></table>'
        "</details></section>"
    )


def _instance_row(
    instance: str,
    cells: Mapping[str, Row],
    components: Sequence[str],
    cursors: Mapping[str, Cursor | None],
    kinds: Counter[Kind],
) -> str:
    first = next(iter(cells.values()))
    stale = _stale(cells)
    name = f'<th scope="row">{_e(instance)}' + (' <span class="tag">stale</span>' if stale else "") + "</th>"
    age = f'<td class="age" title="{_e(first.heartbeat_at or "")}">{_e(format_age(first.heartbeat_age_s))}</td>'
    if first.state == UNREADABLE:
        kinds[Kind.UNREADABLE] += 1
        span = max(1, len(components))
        tds = f'<td class="k-unreadable" colspan="{span}" title="{_e(first.error)}">unreadable report</td>'
        errors = [("report", first.error)]
    else:
        tds = "".join(_cell(cells.get(c), cursors.get(c), kinds) for c in components)
        errors = [(c, cells[c].error) for c in components if c in cells and cells[c].error]
    css = ' class="stale"' if stale else ""
    return f'<tr{css}>{name}{age}{tds}<td class="err">{"".join(_error(c, text) for c, text in errors)}</td></tr>\n'


def _cell(row: Row | None, cursor: Cursor | None, kinds: Counter[Kind]) -> str:
    if row is None:
        return '<td class="none">-</td>'
    kind = kind_of(row, cursor)
    kinds[kind] += 1
    seq = f"seq {row.seq}" if row.seq is not None else "no seq"
    notes = [row.state]
    if row.behind:
        notes.append(f"behind {row.pointer_seq}")
    if row.stale:
        notes.append("stale")
    elif row.pointer_stale_since:
        notes.append(f"stale pointer: no timestamp vouches for it since {row.pointer_stale_since}")
    wave = f' <span class="wave">wave {row.wave}</span>' if row.wave is not None else ""
    tip = f"{row.component}: {row.release_id} {seq}, {', '.join(notes)}" + (f", wave {row.wave}" if wave else "")
    return (
        f'<td class="k-{_e(kind.value)}" title="{_e(tip)}"><span class="rel">{_e(row.release_id)}</span>'
        f'<span class="meta">{_e(seq)} · {_e(" · ".join(notes))}{wave}</span></td>'
    )


def _error(component: str, text: str) -> str:
    """The last error, cut to a preview; the whole text (and a title) when it is longer."""
    if len(text) <= ERROR_PREVIEW_CHARS:
        return f'<div title="{_e(text)}"><b>{_e(component)}</b>: {_e(text)}</div>'
    preview = text[: ERROR_PREVIEW_CHARS - 1] + "…"
    return (
        f'<details title="{_e(text)}"><summary><b>{_e(component)}</b>: {_e(preview)}</summary>'
        f"<pre>{_e(text)}</pre></details>"
    )


def _channel_panel(
    channel: Channel, rows: Sequence[Row], pointers: Mapping[Channel, Deploy], cursor: Cursor | None
) -> str:
    deploy = pointers.get(channel)
    if deploy is None:
        pointer = "no pointer read"
    else:
        pointer = f"pointer: seq {deploy.seq}, release {deploy.release_id} (published {deploy.published_at})"
    parts = [
        f'<div class="channel"><h3>{_e(channel.component)}</h3>',
        f'<p class="pointer">{_e(pointer)}</p>',
        *(f'<p class="summary">{_e(line)}</p>' for line in summary(rows)),
    ]
    if deploy is not None and deploy.rollout is not None:
        parts.append(_waves(deploy, rows, cursor))
    parts.append("</div>")
    return "".join(parts)


def _waves(deploy: Deploy, rows: Sequence[Row], cursor: Cursor | None) -> str:
    """A staged rollout: its cursor, then per wave its size, whether it is admitted and how its instances stand."""
    plan = deploy.rollout
    assert plan is not None
    if cursor is None:
        where = "no readable cursor: which waves are admitted is unknown"
    elif cursor.state is RolloutState.ABORTED:
        where = f"rolled back at wave {cursor.wave}/{plan.last_wave}: {cursor.reason or 'no reason given'}"
    else:
        where = f"{cursor.state.value} at wave {cursor.wave}/{plan.last_wave} (driver {cursor.driver})"
    size: Counter[int | None] = Counter(row.wave for row in rows)
    tally: Counter[tuple[int | None, str]] = Counter((row.wave, _wave_state(row, deploy)) for row in rows)
    lines = []
    for wave in range(plan.last_wave + 1):
        if cursor is None:
            admitted = "unknown"
        elif cursor.state is RolloutState.ABORTED:
            admitted = "rolled back" if wave <= cursor.wave else "never admitted"
        else:
            admitted = "admitted" if wave_admitted(cursor, wave) else "not yet"
        current = ' class="current"' if cursor is not None and cursor.wave == wave else ""
        lines.append(
            f"<tr{current}><td>wave {wave}</td><td>{_e(plan.wave_label(wave))}</td><td>{_e(admitted)}</td>"
            f"<td>{size[wave]}</td><td>{tally[(wave, _CANDIDATE_OK)]}</td><td>{tally[(wave, _CANDIDATE_FAILED)]}</td>"
            f"<td>{tally[(wave, ComponentState.WAITING.value)]}</td></tr>"
        )
    return (
        f'<p class="rollout">staged rollout from stable {_e(plan.stable.release_id)}: {_e(where)}</p>'
        '<table class="waves"><thead><tr><th>wave</th><th>size</th><th>admitted</th><th>instances</th>'
        f"<th>candidate ok</th><th>candidate failed</th><th>waiting</th></tr></thead><tbody>{''.join(lines)}</tbody></table>"
    )


_CANDIDATE_OK = "candidate ok"
_CANDIDATE_FAILED = "candidate failed"


def _wave_state(row: Row, deploy: Deploy) -> str:
    """As the driver counts (`publisher.rollout.count`): ok and failed on the candidate only."""
    on_candidate = row.deploy_id == deploy.deploy_id
    if on_candidate and row.state == ComponentState.OK:
        return _CANDIDATE_OK
    if on_candidate and row.state in (ComponentState.FAILED, ComponentState.REJECTED):
        return _CANDIDATE_FAILED
    return row.state


_KIND_CSS = "\n".join(f".k-{kind.value}{{background:{colour}}}" for kind, (_words, colour) in LEGEND.items())

_STYLE = (
    """
body{font:13px/1.35 system-ui,sans-serif;margin:0 1rem 2rem;color:#1d1d1d;background:#fff}
header{display:flex;flex-wrap:wrap;gap:.3rem 2rem;align-items:baseline;padding:.6rem 0;border-bottom:1px solid #ccc}
h1{font-size:1.25rem;margin:0}h2{display:inline;font-size:1.05rem;margin:0}h3{margin:0 0 .2rem;font-size:.95rem}
.legend{display:flex;flex-wrap:wrap;gap:.2rem 1rem;list-style:none;padding:0;margin:.5rem 0}
.legend li{display:flex;align-items:center;gap:.3rem}.legend .n{color:#666}
.sw{display:inline-block;width:.9rem;height:.9rem;border:1px solid #888}
section{margin-top:1rem}section>details>summary{cursor:pointer;padding:.3rem 0}
.channels{display:flex;flex-wrap:wrap;gap:.6rem;margin:.4rem 0}
.channel{border:1px solid #ccc;border-radius:4px;padding:.4rem .6rem;min-width:18rem;max-width:38rem}
.channel p{margin:.15rem 0}.summary{font-family:ui-monospace,monospace}
table{border-collapse:separate;border-spacing:0}
.grid th,.grid td{border-right:1px solid #fff;border-bottom:1px solid #fff;padding:.2rem .4rem;vertical-align:top;text-align:left}
.grid thead th{position:sticky;top:0;z-index:2;background:#333;color:#fff}
.grid tbody th{position:sticky;left:0;z-index:1;background:#f4f4f4;font-family:ui-monospace,monospace;white-space:nowrap}
.grid .rel{display:block;font-family:ui-monospace,monospace;white-space:nowrap}
.grid .meta{display:block;font-size:.85em;color:#333}
.wave{border:1px solid #555;border-radius:3px;padding:0 .2rem}
.tag{background:#666;color:#fff;border-radius:3px;padding:0 .25rem;font-size:.8em}
tr.stale th{color:#666}.k-stale{background-image:repeating-linear-gradient(45deg,transparent 0 4px,#ffffff66 4px 8px)}
.none{color:#aaa}.age{white-space:nowrap}
.err{max-width:34rem;font-size:.9em}.err pre{white-space:pre-wrap;margin:.2rem 0}
.waves th,.waves td{padding:.1rem .5rem;border-bottom:1px solid #ddd;text-align:left}.waves tr.current{font-weight:bold}
.empty{font-size:1.1rem;color:#666}
"""
    + _KIND_CSS
)

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style></head>
<body><header><h1>{source}</h1><span>generated {generated}</span><span>{head}</span></header>
{legend}
{body}
</body></html>
"""
