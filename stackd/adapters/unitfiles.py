"""The files in `unit_dir`: read what is there, write atomically, remove only our own.

Every write goes to a temp file in the same directory and is renamed over the target, so
the manager never reads half a unit. Nothing is written or removed through a symlink, and a
file without stackd's marker is never touched (checked again here, at the moment of I/O).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from stackd.adapters.fsutil import replace_file
from stackd.core.plan import OwnedFileState
from stackd.core.render import is_intact, read_marker
from stackd.errors import StackdError

__all__ = ["UnitFileError", "read_owned", "remove_unit", "write_unit"]

UNIT_SUFFIXES = (".service",)
# Only the user's own manager reads them; they name env files (paths, not contents).
UNIT_MODE = 0o600


class UnitFileError(StackdError):
    """A unit file could not be written or removed safely."""


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _read_text(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as fh:
        return fh.read()


def read_owned(unit_dir: Path, names: Iterable[str]) -> dict[str, OwnedFileState]:
    """State of the named files plus every file in unit_dir carrying stackd's marker."""
    wanted = set(names)
    try:
        entries = {e.name for e in os.scandir(unit_dir) if e.name.endswith(UNIT_SUFFIXES)}
    except FileNotFoundError:
        entries = set()
    out: dict[str, OwnedFileState] = {}
    for name in sorted(wanted | entries):
        path = unit_dir / name
        st = _lstat(path)
        if st is None:
            if name in wanted:
                out[name] = OwnedFileState(name=name, text=None, is_symlink=False, has_marker=False)
            continue
        if stat.S_ISLNK(st.st_mode):
            out[name] = OwnedFileState(name=name, text=None, is_symlink=True, has_marker=False)
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            text = _read_text(path)
        except OSError:
            text = None
        has_marker = text is not None and read_marker(text) is not None
        if name in wanted or has_marker:
            out[name] = OwnedFileState(
                name=name,
                text=text,
                is_symlink=False,
                has_marker=has_marker,
                intact=has_marker and text is not None and is_intact(text),
            )
    return out


def _check_replaceable(path: Path) -> None:
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnitFileError(f"{path} is a symlink; stackd never writes through a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise UnitFileError(f"{path} is not a regular file")
    if read_marker(_read_text(path)) is None:
        raise UnitFileError(f"{path} was not written by stackd (no marker); left untouched")


def write_unit(unit_dir: Path, name: str, text: str) -> None:
    """Atomically replace unit_dir/name with text (temp file, fsync, rename, dir fsync)."""
    if "/" in name or name in (".", ".."):
        raise UnitFileError(f"refusing unit file name {name!r}")
    unit_dir.mkdir(parents=True, exist_ok=True)
    if unit_dir.is_symlink():
        raise UnitFileError(f"{unit_dir} is a symlink; stackd writes only into a real directory")
    target = unit_dir / name
    _check_replaceable(target)
    replace_file(target, text.encode("utf-8"), UNIT_MODE)


def remove_unit(unit_dir: Path, name: str) -> bool:
    """Remove unit_dir/name if, at this moment, it is a regular file with stackd's marker."""
    target = unit_dir / name
    st = _lstat(target)
    if st is None or not stat.S_ISREG(st.st_mode):
        return False
    if read_marker(_read_text(target)) is None:
        return False
    target.unlink()
    return True
