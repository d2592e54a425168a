"""Files in stackd's state dir: the update history (JSON Lines) and small atomic state files.

Durability, not speed, is the point: every history record is one `write(2)` of a whole line to
an `O_APPEND` descriptor followed by `fsync`. A daemon killed at any moment leaves whole lines,
or at worst a torn last line (a write that spans pages can stop at a page boundary when the
process is killed, and a machine crash can lose the tail): readers skip it and the next append
starts a new line after it. State files are replaced atomically (temp file, fsync, rename,
fsync of the directory). Calls are synchronous: each is a few small syscalls, fine to make from
the event loop at the rate of update runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Final

from stackd.adapters.fsutil import fsync_dir, replace_file
from stackd.core.updates import (
    StackUpdateResult,
    UpdateRun,
    format_timestamp,
    parse_timestamp,
    run_from_json,
    stack_result_from_json,
    stack_result_to_json,
)
from stackd.errors import StackdError

__all__ = [
    "HISTORY_FILE",
    "RECORD_KINDS",
    "HistoryStore",
    "StateFile",
    "StoreError",
    "ensure_private_dir",
    "run_finished_record",
    "run_started_record",
    "stack_finished_record",
    "state_dir",
]

HISTORY_FILE: Final = "history.jsonl"
RECORD_KINDS: Final = ("run.started", "stack.finished", "run.finished")
# Triggers whose runs count as "the schedule fired" for Persistent= catch-up.
_SCHEDULED_TRIGGERS: Final = ("schedule", "catch-up")
_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600
_BLOCK: Final = 64 * 1024


class StoreError(StackdError):
    """A state file could not be written or read (read-only dir, disk full, ...).

    `errno` is the OS error number when there is one; the daemon reports it and retries.
    """

    def __init__(self, message: str, path: Path, errno_: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno_


def _error(action: str, path: Path, exc: OSError) -> StoreError:
    reason = exc.strerror or str(exc)
    return StoreError(f"cannot {action} {path}: {reason}", path, exc.errno)


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_STATE_HOME/stackd`, by default `~/.local/state/stackd` (a relative
    `XDG_STATE_HOME` is ignored, as the XDG spec asks)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        home = env.get("HOME") or str(Path.home())
        base = os.path.join(home, ".local", "state")
    return Path(base) / "stackd"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) mode 0700; tighten it when it is more open."""
    try:
        path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != _DIR_MODE:
            path.chmod(_DIR_MODE)
    except OSError as exc:
        raise _error("create the state directory", path, exc) from exc
    return path


class HistoryStore:
    """The update history: records `run.started`, `stack.finished`, `run.finished`.

    Reading rebuilds `UpdateRun`s from the records, skipping lines that do not parse and
    keeping the first result per (run, stack), so a recovery that writes a result again
    changes nothing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_dir(cls, directory: Path) -> HistoryStore:
        return cls(directory / HISTORY_FILE)

    # --- writing ---

    def append(
        self, record: Mapping[str, Any], *, on_written: Callable[[], None] | None = None
    ) -> None:
        """Append one record as one line; durable when this returns. `on_written` runs once
        the line is in the file (a killed process leaves it there) and before the fsync."""
        kind = record.get("kind")
        if kind not in RECORD_KINDS:
            raise ValueError(f"unknown history record kind {kind!r}")
        line = json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        ensure_private_dir(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        except OSError as exc:
            raise _error("open the update history", self.path, exc) from exc
        try:
            # Appenders in other processes (a second daemon by mistake) wait here, so the
            # torn-line check below and the write happen as one step.
            fcntl.flock(fd, fcntl.LOCK_EX)
            info = os.fstat(fd)
            if stat.S_IMODE(info.st_mode) != _FILE_MODE:
                os.fchmod(fd, _FILE_MODE)
            # A torn last line (killed mid-write, machine crash) must not swallow this record.
            if info.st_size and os.pread(fd, 1, info.st_size - 1) != b"\n":
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
            if on_written is not None:
                on_written()
            os.fsync(fd)
            if info.st_size == 0:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise _error("append to the update history", self.path, exc) from exc
        finally:
            os.close(fd)

    def append_run_started(self, run: UpdateRun) -> None:
        self.append(run_started_record(run))

    def append_stack_finished(self, result: StackUpdateResult) -> None:
        self.append(stack_finished_record(result))

    def append_run_finished(self, run: UpdateRun) -> None:
        self.append(run_finished_record(run))

    # --- reading ---

    def read(
        self, limit: int | None = None, *, pending: Iterable[Mapping[str, Any]] = ()
    ) -> list[UpdateRun]:
        """The runs in the history, newest first; at most `limit` of them.

        With a limit, the file is read backwards only as far as the oldest run needed.
        A missing file is an empty history. `pending` records (not written yet: the state
        dir was read-only or full) count as if they followed the file's last line.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        if limit == 0:
            return []
        try:
            with open(self.path, "rb") as file:
                if limit is None:
                    records = [r for r in map(_parse, file) if r is not None]
                else:
                    records = _tail_records(file, limit)
        except FileNotFoundError:
            records = []
        except OSError as exc:
            raise _error("read the update history", self.path, exc) from exc
        runs = _build_runs([*records, *(dict(r) for r in pending)])
        runs.reverse()
        return runs if limit is None else runs[:limit]

    def unfinished_runs(self, window: int | None = 100) -> list[UpdateRun]:
        """Runs with a `run.started` and no `run.finished`, oldest first: what a restarted
        daemon must complete. The daemon recovers at every start, so looking at the latest
        `window` runs is enough; None looks at the whole history."""
        runs = self.read(window)
        return [r for r in reversed(runs) if r.finished_at is None]

    def last_finished_run(self, window: int = 100) -> UpdateRun | None:
        """The newest run with a `run.finished` (status `updates.last_run`)."""
        return next((r for r in self.read(window) if r.finished_at is not None), None)

    def last_scheduled_run_time(self) -> datetime | None:
        """When the schedule (or a catch-up of it) last started a run, for `Persistent=`."""
        try:
            with open(self.path, "rb") as file:
                for line in _reverse_lines(file):
                    record = _parse(line)
                    if (
                        record is not None
                        and record.get("kind") == "run.started"
                        and record.get("trigger") in _SCHEDULED_TRIGGERS
                    ):
                        with contextlib.suppress(ValueError):
                            return parse_timestamp(record.get("started_at"))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _error("read the update history", self.path, exc) from exc
        return None


def run_started_record(run: UpdateRun) -> dict[str, Any]:
    return {
        "kind": "run.started",
        "run": run.run,
        "trigger": run.trigger,
        "stacks": list(run.stacks),
        "started_at": format_timestamp(run.started_at),
    }


def stack_finished_record(result: StackUpdateResult) -> dict[str, Any]:
    return {"kind": "stack.finished", **stack_result_to_json(result)}


def run_finished_record(run: UpdateRun) -> dict[str, Any]:
    if run.finished_at is None:
        raise ValueError(f"run {run.run} has no finished_at")
    return {
        "kind": "run.finished",
        "run": run.run,
        "finished_at": format_timestamp(run.finished_at),
        "recovered": run.recovered,
    }


def _parse(line: bytes) -> dict[str, Any] | None:
    """One record, or None for a blank, torn or garbage line."""
    line = line.strip()
    if not line:
        return None
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or value.get("kind") not in RECORD_KINDS:
        return None
    if not isinstance(value.get("run"), str):
        return None
    return value


def _reverse_lines(file: BinaryIO, block: int | None = None) -> Iterator[bytes]:
    """The file's lines, last first, reading blocks from the end."""
    block = block or _BLOCK
    position = file.seek(0, os.SEEK_END)
    tail = b""
    while position > 0:
        step = min(block, position)
        position -= step
        file.seek(position)
        lines = (file.read(step) + tail).split(b"\n")
        tail = lines[0]
        yield from reversed(lines[1:])
    yield tail


def _tail_records(file: BinaryIO, limit: int) -> list[dict[str, Any]]:
    """The records from the `limit`-th newest `run.started` on, in file order."""
    newest_first: list[dict[str, Any]] = []
    started: set[str] = set()
    for line in _reverse_lines(file):
        record = _parse(line)
        if record is None:
            continue
        newest_first.append(record)
        if record["kind"] == "run.started" and _started_run(record) is not None:
            started.add(record["run"])
            if len(started) >= limit:
                break
    newest_first.reverse()
    return newest_first


def _started_run(record: dict[str, Any]) -> UpdateRun | None:
    """The run a `run.started` record opens, None when the record is malformed."""
    try:
        return run_from_json({**record, "finished_at": None, "results": [], "recovered": False})
    except ValueError:
        return None


class _Building:
    __slots__ = ("finished_at", "recovered", "results", "started")

    def __init__(self, started: UpdateRun) -> None:
        self.started = started
        self.results: dict[str, StackUpdateResult] = {}
        self.finished_at: datetime | None = None
        self.recovered = False

    def build(self) -> UpdateRun:
        s = self.started
        return UpdateRun(
            run=s.run,
            stacks=s.stacks,
            started_at=s.started_at,
            finished_at=self.finished_at,
            trigger=s.trigger,
            results=tuple(self.results.values()),
            recovered=self.recovered,
        )


def _build_runs(records: Iterable[dict[str, Any]]) -> list[UpdateRun]:
    """Runs in the order of their `run.started`; records of unknown runs are dropped."""
    runs: dict[str, _Building] = {}
    for record in records:
        try:
            _apply(runs, record)
        except (ValueError, TypeError):
            continue  # a record of the right kind but the wrong shape: skip it, like garbage
    return [b.build() for b in runs.values()]


def _apply(runs: dict[str, _Building], record: dict[str, Any]) -> None:
    kind, run_id = record["kind"], record["run"]
    if kind == "run.started":
        started = _started_run(record)
        if started is not None and run_id not in runs:
            runs[run_id] = _Building(started)
        return
    building = runs.get(run_id)
    if building is None:
        return
    if kind == "stack.finished":
        result = stack_result_from_json(record)
        building.results.setdefault(result.stack, result)
    elif building.finished_at is None:
        building.finished_at = parse_timestamp(record.get("finished_at"))
        building.recovered = record.get("recovered") is True


class StateFile:
    """A small JSON object replaced atomically; readers see the old or the new, never a mix."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any] | None:
        """The stored object, None when the file does not exist."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _error("read", self.path, exc) from exc
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise StoreError(f"{self.path} is not valid JSON: {exc}", self.path) from exc
        if not isinstance(value, dict):
            raise StoreError(f"{self.path} does not hold a JSON object", self.path)
        return value

    def write(self, data: Mapping[str, Any]) -> None:
        payload = json.dumps(data, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
        ensure_private_dir(self.path.parent)
        try:
            replace_file(self.path, payload, _FILE_MODE)
        except OSError as exc:
            raise _error("write", self.path, exc) from exc
