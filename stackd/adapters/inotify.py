"""Real-time watch of the unit search path: which watched units a file change may affect.

One inotify instance (asyncinotify) watches every existing search-path directory, every
existing drop-in directory that may apply to a watched unit, and for each missing search-path
directory its nearest existing ancestor, so a directory created later is picked up. Which
directories those are, and which units an event concerns, is decided by the pure
`stackd.core.watchset`; this module only moves events in and callbacks out.

- Events that concern no watched unit cost one dictionary lookup and cause no callback.
- Events are coalesced: the first one opens a window, the callback runs once the directory has
  been quiet for `window` seconds (at most `max_delay` after the first event) with the union of
  the affected units; never more than one callback per window.
- When a directory appears or goes away the watch set is recomputed; a directory watched for
  the first time is listed after its watch is in place, so files created before the watch are
  reported too. A queue overflow reports every unit.
- Idle, the task is parked on the inotify fd: no timers, no polling.

Known limits: IN_MODIFY is not watched (IN_CLOSE_WRITE marks the end of a write, so a writer
that keeps a unit file open is seen when it closes it). Not seen until the next full scan: a
mount placed over a watched directory, a rename of an ancestor of an existing search-path
directory, a symlinked directory being pointed elsewhere, and an in-place edit of the target of
a symlinked unit file or .conf (directories are followed; for files, the link is watched).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Collection, Sequence
from types import TracebackType

import structlog
from asyncinotify import Event, Inotify, Mask, Watch

from stackd.core.watchset import WatchSet

__all__ = ["UnitDirWatcher"]

log = structlog.get_logger("stackd")

# Files in search-path and drop-in directories: creation, removal, renames both ways (atomic
# replace-by-rename arrives as MOVED_TO), the end of a write, metadata (chmod); and the
# directory itself going away.
_UNIT_DIR_MASK = (
    Mask.CREATE
    | Mask.DELETE
    | Mask.MOVED_FROM
    | Mask.MOVED_TO
    | Mask.CLOSE_WRITE
    | Mask.ATTRIB
    | Mask.DELETE_SELF
    | Mask.MOVE_SELF
    | Mask.EXCL_UNLINK
)
# Ancestors of missing directories: only the appearance of the next path component matters.
_ANCESTOR_MASK = Mask.CREATE | Mask.MOVED_TO | Mask.DELETE_SELF | Mask.MOVE_SELF
# Symlinked directories are followed (no DONT_FOLLOW); MASK_ADD keeps the union of both masks
# when two watched paths are the same directory.
_WATCH_FLAGS = Mask.ONLYDIR | Mask.MASK_ADD
_SELF_GONE = Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.UNMOUNT | Mask.IGNORED
_ENTRY_CHANGED = Mask.CREATE | Mask.DELETE | Mask.MOVED_FROM | Mask.MOVED_TO
_REPLAN_ROUNDS = 16  # each round watches at least one more directory; this bounds a race storm
_READ_BUFFER_EVENTS = 256  # full-size events per read(): a burst of 500 short names in 1-2 reads


def _entries(directory: str) -> Collection[str] | None:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:  # exists but cannot be listed: watch it, expect no drop-ins
        return ()


class UnitDirWatcher:
    """Watches the unit search path and calls `on_change(units)` on the event loop with the
    watched units a change may affect.

    Watches are in place as soon as `watch()` returns (subscribe, then scan); `run()` delivers
    the events and closes the inotify fd when it ends.
    """

    def __init__(
        self,
        on_change: Callable[[frozenset[str]], None],
        *,
        window: float = 0.005,
        max_delay: float = 0.05,
    ) -> None:
        if window <= 0 or max_delay < window:
            raise ValueError("need 0 < window <= max_delay")
        self._on_change = on_change
        self._window = window
        self._max_delay = max_delay
        self._inotify: Inotify | None = Inotify(cache_size=_READ_BUFFER_EVENTS)
        self._set = WatchSet((), ())
        self._by_path: dict[str, tuple[Watch, Mask]] = {}
        self._paths_of: dict[int, set[str]] = {}  # one inode may be reached by several paths
        self._pending: set[str] = set()
        self._replan = False
        self._timer: asyncio.TimerHandle | None = None
        self._first = self._last = 0.0

    # --- configuration -------------------------------------------------------------------

    def watch(self, search_path: Sequence[str], units: Collection[str]) -> None:
        """Watch `units` on `search_path` from now on (replaces the previous configuration).

        Nothing is reported for files already present: the caller scans after this returns.
        """
        self._require_open()
        self._set = WatchSet(units, search_path)
        self._pending.intersection_update(self._set.units)
        self._apply_plan()

    def watched_directories(self) -> list[str]:
        return sorted(self._by_path)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver events until cancelled; the inotify fd is closed on the way out."""
        inotify = self._require_open()
        try:
            async for event in inotify:
                self._handle(event)
        finally:
            self.close()

    def close(self) -> None:
        """Stop watching and close the fd (idempotent); pending changes are dropped."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._by_path.clear()
        self._paths_of.clear()
        self._pending.clear()

    def __enter__(self) -> UnitDirWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _require_open(self) -> Inotify:
        if self._inotify is None:
            raise RuntimeError("the unit directory watcher is closed")
        return self._inotify

    # --- events --------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        mask = event.mask
        if Mask.Q_OVERFLOW in mask:
            log.warning("watcher.overflow", message="inotify queue overflowed: rescanning")
            self._pending.update(self._set.units)
            self._replan = True
            self._arm()
            return
        watch = event.watch
        paths = self._paths_of.get(watch.wd) if watch is not None else None
        if not paths:
            return  # a watch we already dropped
        name = None if event.name is None else str(event.name)
        affected: set[str] = set()
        replan = bool(mask & _SELF_GONE)
        for directory in paths:
            affected.update(self._set.affected(directory, name))
            if name is not None and mask & _ENTRY_CHANGED:
                replan = replan or self._set.shapes_plan(directory, name)
        if Mask.IGNORED in mask and watch is not None:
            self._forget(watch.wd)  # the kernel dropped it (deleted, unmounted)
        elif replan and name is None:
            # Moved away (or going): the watch follows the inode, not the path. Drop it so the
            # plan watches whatever is at the path now, even if a new directory is already there.
            for directory in list(paths):
                self._remove(directory)
        if affected or replan:
            self._pending.update(affected)
            self._replan = self._replan or replan
            self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        if self._timer is None:
            self._first = self._last
            self._timer = loop.call_at(self._last + self._window, self._on_timer)

    def _on_timer(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        quiet_at = self._last + self._window
        cap = self._first + self._max_delay
        if now < quiet_at and now < cap:  # still busy: wait for a quiet moment, up to the cap
            self._timer = loop.call_at(min(quiet_at, cap), self._on_timer)
            return
        self._timer = None
        if self._replan:
            self._replan = False
            self._pending.update(self._apply_plan(report_new=True))
        units, self._pending = frozenset(self._pending), set()
        if units:
            try:
                self._on_change(units)
            except Exception as exc:  # the watch must outlive a faulty consumer
                log.error("watcher.callback_failed", message=f"on_change failed: {exc!r}")

    # --- the watch set -------------------------------------------------------------------

    def _apply_plan(self, *, report_new: bool = False) -> set[str]:
        """Bring the watches in line with the plan; with `report_new`, the units affected by
        entries of directories watched for the first time."""
        found: set[str] = set()
        wanted: dict[str, Mask] = {}
        for _ in range(_REPLAN_ROUNDS):
            plan = self._set.plan(_entries)
            wanted = dict.fromkeys(plan.ancestors, _ANCESTOR_MASK)
            wanted.update(dict.fromkeys(plan.search_dirs + plan.dropin_dirs, _UNIT_DIR_MASK))
            added = [p for p, m in wanted.items() if self._needs(p, m) and self._add(p, m)]
            for directory in added if report_new else ():
                for name in _entries(directory) or ():
                    found.update(self._set.affected(directory, name))
            if not added:
                break  # listed after every watch was in place: nothing was missed
        for path in [p for p in self._by_path if p not in wanted]:
            self._remove(path)
        return found

    def _needs(self, path: str, mask: Mask) -> bool:
        held = self._by_path.get(path)
        return held is None or held[1] & mask != mask

    def _add(self, path: str, mask: Mask) -> bool:
        try:
            watch = self._require_open().add_watch(path, mask | _WATCH_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return False  # gone again, or not a directory: the parent's events cover it
        except OSError as exc:
            log.warning("watcher.watch_failed", message=f"cannot watch {path}: {exc.strerror}")
            return False
        held = self._by_path.get(path)
        self._by_path[path] = (watch, mask | (held[1] if held is not None else Mask.ZERO))
        self._paths_of.setdefault(watch.wd, set()).add(path)
        return True

    def _remove(self, path: str) -> None:
        watch, _ = self._by_path.pop(path)
        paths = self._paths_of.get(watch.wd)
        if paths is not None:
            paths.discard(path)
            if paths:
                return  # the same directory is still watched under another path
            del self._paths_of[watch.wd]
        inotify = self._inotify
        if inotify is not None:
            with contextlib.suppress(OSError):  # EINVAL: the kernel already dropped it
                inotify.rm_watch(watch)

    def _forget(self, wd: int) -> None:
        for path in self._paths_of.pop(wd, ()):
            self._by_path.pop(path, None)
