"""Atomic file replacement and directory fsync, written once for every file stackd writes.

Unit files, state files, the config and stackd.service are all replaced the same way (temp file
beside the target, fsync, rename, fsync of the directory) so that a reader, or a machine that
crashes, sees the old file or the new one and never a mix. Keeping the sequence in one place
keeps its details (exclusive creation, exact mode, clean-up on failure) the same everywhere.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["fsync_dir", "replace_file"]


def fsync_dir(path: Path) -> None:
    """fsync the directory `path`, making a rename or a new entry in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(
    path: Path,
    data: bytes,
    mode: int,
    *,
    check: Callable[[Path], None] | None = None,
    sync_dir: bool = True,
) -> None:
    """Replace `path` with `data` atomically, the new file having exactly `mode`.

    The temp file is created beside `path` by `tempfile.mkstemp` (O_EXCL: it never follows a
    symlink), chmodded to `mode` whatever the umask, written and fsynced; `check(temp)`, when
    given, may refuse it by raising before the rename. On any failure the temp file is removed
    and the exception propagates. With `sync_dir`, the directory is fsynced after the rename.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if check is not None:
            check(temp)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    if sync_dir:
        fsync_dir(path.parent)
