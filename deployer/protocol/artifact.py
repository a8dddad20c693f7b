"""What an artifact may contain: the member rule the publisher checks in CI and every agent enforces.

Pure: it judges tar headers, so `deployer publish` refuses an artifact every agent would reject,
with the same words, before anything is uploaded.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile


def check_member(member: tarfile.TarInfo) -> str | None:
    """Why this member must not be extracted, or None if it is safe. Pure."""
    name = member.name
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return f"absolute path {name!r}"
    if ".." in name.split("/"):
        return f"path with '..' {name!r}"
    if member.ischr() or member.isblk():
        return f"device node {name!r}"
    if member.isfifo():
        return f"FIFO {name!r}"
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return f"unsupported member type {member.type!r} for {name!r}"
    if member.mode & (stat.S_ISUID | stat.S_ISGID):
        return f"setuid/setgid bit on {name!r}"
    return _link_problem(member)


def _link_problem(member: tarfile.TarInfo) -> str | None:
    """A symlink or hardlink whose target, read lexically, leaves the release."""
    name, target = member.name, member.linkname
    if member.issym():
        if target.startswith("/"):
            return f"symlink {name!r} points to absolute path {target!r}"
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if resolved == ".." or resolved.startswith("../"):
            return f"symlink {name!r} points outside the release ({target!r})"
    if member.islnk():
        resolved = posixpath.normpath(target)
        if resolved.startswith("/") or resolved == ".." or resolved.startswith("../"):
            return f"hardlink {name!r} points outside the release ({target!r})"
    return None
