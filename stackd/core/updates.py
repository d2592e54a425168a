"""Update runs as data: what each stack's update did, how a run adds up, how it is reported.

Pure: no clock, no randomness, no I/O. The daemon starts the `-update.service` units and feeds
what systemd reported (the job result, the unit's `Result`, its `ExecStart` statuses) and the
images seen before and after into these functions.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias, cast, get_args

__all__ = [
    "CLD_DUMPED",
    "CLD_EXITED",
    "CLD_KILLED",
    "ChangeKind",
    "ExecCommand",
    "Failure",
    "RunResult",
    "ServiceChange",
    "ServiceImage",
    "StackResult",
    "StackUpdateResult",
    "Trigger",
    "UpdateRun",
    "change_from_json",
    "change_to_json",
    "classify_job",
    "command_label",
    "describe_failure",
    "diff_images",
    "exit_text",
    "failed_command",
    "finish_stack",
    "format_timestamp",
    "latest_results",
    "new_run_id",
    "parse_timestamp",
    "run_from_json",
    "run_to_json",
    "skipped_stack",
    "stack_message",
    "stack_result_from_json",
    "stack_result_to_json",
    "summary_fields",
    "summary_message",
]

ChangeKind: TypeAlias = Literal["unchanged", "updated", "missing", "added"]
StackResult: TypeAlias = Literal["success", "failed", "timeout", "skipped"]
RunResult: TypeAlias = Literal["success", "partial", "failed"]
# What started a run. A run completed by a restarted daemon keeps its trigger and is marked
# `recovered`, so "when did the schedule last fire" stays answerable from the history.
Trigger: TypeAlias = Literal["schedule", "manual", "catch-up"]

_CHANGE_KINDS: tuple[str, ...] = get_args(ChangeKind)
_STACK_RESULTS: tuple[str, ...] = get_args(StackResult)
_TRIGGERS: tuple[str, ...] = get_args(Trigger)

# si_code values systemd reports per ExecStart command (from <signal.h>).
CLD_EXITED = 1
CLD_KILLED = 2
CLD_DUMPED = 3

_RUN_SUFFIX = re.compile(r"[a-z0-9]{1,16}")
# Subcommands of `docker compose` / `podman compose` that name a command in a failure message.
_COMPOSE_VERBS = frozenset({"pull", "up", "down", "build", "create", "start", "stop", "restart"})


def _require_aware(name: str, value: datetime | None) -> None:
    if value is not None and value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {value!r}")


@dataclass(frozen=True, slots=True)
class ServiceImage:
    """The image one compose service's container runs, as the engine reports it."""

    service: str
    container: str
    image_id: str
    image_name: str


@dataclass(frozen=True, slots=True)
class ServiceChange:
    """Whether one service's image changed across an update; `old`/`new` are image ids."""

    service: str
    change: ChangeKind
    old: str | None
    new: str | None
    image: str | None = None  # the image name (after the update; before it when missing)

    def describe(self) -> str:
        """`web: updated (3f8a1c2b9d0e -> 7b1e0f9a2c44)` and the like, for people."""
        if self.change == "updated":
            return f"{self.service}: updated ({_short(self.old)} -> {_short(self.new)})"
        return f"{self.service}: {self.change}"


def _short(image_id: str | None) -> str:
    if image_id is None:
        return "none"
    return ",".join(i.removeprefix("sha256:")[:12] for i in image_id.split(","))


@dataclass(frozen=True, slots=True)
class StackUpdateResult:
    """The outcome of one stack's update unit within a run."""

    run: str
    stack: str
    unit: str
    result: StackResult
    started_at: datetime
    finished_at: datetime
    error: str | None = None
    failed_command: str | None = None
    exit_status: int | None = None
    changes: tuple[ServiceChange, ...] = ()

    def __post_init__(self) -> None:
        _require_aware("started_at", self.started_at)
        _require_aware("finished_at", self.finished_at)

    @property
    def is_failure(self) -> bool:
        """Failed or timed out. Skipped is neither a success nor a failure."""
        return self.result in ("failed", "timeout")


@dataclass(frozen=True, slots=True)
class UpdateRun:
    """One update run: which stacks it covered and what became of each.

    `finished_at` is None while the run is in progress (or was interrupted and not yet
    recovered). `recovered` marks a run whose end was completed by a restarted daemon.
    """

    run: str
    stacks: tuple[str, ...]
    started_at: datetime
    finished_at: datetime | None
    trigger: Trigger
    results: tuple[StackUpdateResult, ...] = ()
    recovered: bool = False

    def __post_init__(self) -> None:
        _require_aware("started_at", self.started_at)
        _require_aware("finished_at", self.finished_at)

    @property
    def succeeded(self) -> list[str]:
        return [r.stack for r in self.results if r.result == "success"]

    @property
    def failed(self) -> list[str]:
        """Stacks whose update failed or timed out."""
        return [r.stack for r in self.results if r.is_failure]

    @property
    def skipped(self) -> list[str]:
        return [r.stack for r in self.results if r.result == "skipped"]

    @property
    def result(self) -> RunResult:
        """`success` when nothing failed (skipped stacks do not count against a run, and a run
        with nothing to do is a success), `failed` when something failed and nothing
        succeeded, `partial` when both happened."""
        if not self.failed:
            return "success"
        return "partial" if self.succeeded else "failed"


def new_run_id(now: datetime, suffix: str) -> str:
    """A run id that sorts by start time: `2026-11-26T03:00:00Z-3f9a`.

    The caller draws `suffix` (1-16 of [a-z0-9]) so that two runs in one second differ.
    """
    _require_aware("now", now)
    if not _RUN_SUFFIX.fullmatch(suffix):
        raise ValueError(f"run id suffix must be 1-16 of [a-z0-9], got {suffix!r}")
    return f"{now.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}-{suffix}"


def diff_images(
    before: Iterable[ServiceImage], after: Iterable[ServiceImage]
) -> tuple[ServiceChange, ...]:
    """Per service: did its image change? Sorted by service name.

    A service with several containers is compared by the set of their image ids (shown
    comma-separated); `missing` is a service that ran before and has no container after,
    `added` the reverse.
    """
    old = _by_service(before)
    new = _by_service(after)
    changes: list[ServiceChange] = []
    for service in sorted(old.keys() | new.keys()):
        was, now = old.get(service), new.get(service)
        if now is None:
            assert was is not None
            changes.append(ServiceChange(service, "missing", was[0], None, was[1]))
        elif was is None:
            changes.append(ServiceChange(service, "added", None, now[0], now[1]))
        elif was[0] == now[0]:
            changes.append(ServiceChange(service, "unchanged", was[0], now[0], now[1]))
        else:
            changes.append(ServiceChange(service, "updated", was[0], now[0], now[1]))
    return tuple(changes)


def _by_service(images: Iterable[ServiceImage]) -> dict[str, tuple[str, str]]:
    ids: dict[str, set[str]] = {}
    names: dict[str, set[str]] = {}
    for image in images:
        ids.setdefault(image.service, set()).add(image.image_id)
        names.setdefault(image.service, set()).add(image.image_name)
    return {s: (",".join(sorted(ids[s])), ",".join(sorted(names[s]))) for s in ids}


def classify_job(job_result: str, unit_result: str) -> StackResult:
    """Map a start job's `JobRemoved` result and the unit's `Result` property to ours.

    `done` is success whatever a stale unit `Result` says; a unit that hit its start timeout
    (`TimeoutStartSec=`, which is `updates.timeout`) reports `failed` + `timeout`; `timeout`
    from the job itself is `JobTimeoutSec=`. `canceled` (the job was replaced or the manager
    went away), `dependency` and anything unknown are failures.
    """
    match job_result:
        case "done":
            return "success"
        case "skipped":
            return "skipped"
        case "timeout":
            return "timeout"
        case _ if unit_result == "timeout":
            return "timeout"
        case _:
            return "failed"


@dataclass(frozen=True, slots=True)
class ExecCommand:
    """One entry of a unit's `ExecStart` property, D-Bus signature `(sasbttttuii)`."""

    path: str
    argv: tuple[str, ...]
    ignore_errors: bool = False
    start_usec: int = 0  # realtime µs; 0: the command never ran
    exit_usec: int = 0
    pid: int = 0
    code: int = 0  # CLD_EXITED / CLD_KILLED / CLD_DUMPED, 0 while running or never run
    status: int = 0  # exit status, or signal number when killed

    @classmethod
    def from_dbus(cls, value: Sequence[Any]) -> ExecCommand:
        """Build from the D-Bus struct: path, argv, ignore, start/exit timestamps, pid, code,
        status."""
        path, argv, ignore, start_rt, _start_mono, exit_rt, _exit_mono, pid, code, status = value
        return cls(
            str(path),
            tuple(str(a) for a in argv),
            bool(ignore),
            int(start_rt),
            int(exit_rt),
            int(pid),
            int(code),
            int(status),
        )

    @property
    def started(self) -> bool:
        return self.start_usec != 0 or self.pid != 0

    @property
    def finished(self) -> bool:
        return self.code != 0

    @property
    def ok(self) -> bool:
        return self.ignore_errors or (self.code == CLD_EXITED and self.status == 0)


def command_label(argv: Sequence[str]) -> str:
    """A short name for a command: `compose pull`, `compose up`; else the program name."""
    for arg in reversed(argv[1:]):
        if arg in _COMPOSE_VERBS:
            return f"compose {arg}"
    return argv[0].rsplit("/", 1)[-1] if argv else "?"


def failed_command(commands: Sequence[ExecCommand]) -> ExecCommand | None:
    """The command that stopped the unit: the first that ran and did not exit 0.

    When nothing failed but a command was still running (a timeout), that command.
    """
    for command in commands:
        if command.started and command.finished and not command.ok:
            return command
    return next((c for c in commands if c.started and not c.finished), None)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a stack's update did not succeed, as a sentence and as fields."""

    error: str
    failed_command: str | None = None
    exit_status: int | None = None


def describe_failure(
    result: StackResult,
    job_result: str,
    unit_result: str,
    commands: Sequence[ExecCommand],
    timeout_s: float | None = None,
) -> Failure | None:
    """`` `compose pull` exited 125 `` and the like; None for a success or a skip."""
    if result in ("success", "skipped"):
        return None
    command = failed_command(commands)
    if command is None:
        return Failure(_job_failure(job_result, unit_result, timeout_s))
    label = command_label(command.argv or (command.path,))
    if result == "timeout":
        return Failure(f"`{label}` timed out{_after(timeout_s)}", label)
    ended = exit_text(command.code, command.status)
    if ended is None:
        return Failure(f"`{label}` did not finish (unit result {unit_result})", label)
    status = command.status if command.code == CLD_EXITED else None
    return Failure(f"`{label}` {ended}", label, status)


def exit_text(code: int, status: int) -> str | None:
    """How a process ended, from its (si_code, si_status): "exited 125", "killed by SIGKILL",
    "killed by SIGSEGV (core dumped)"; None when it has not ended."""
    if code == CLD_EXITED:
        return f"exited {status}"
    if code in (CLD_KILLED, CLD_DUMPED):
        dumped = " (core dumped)" if code == CLD_DUMPED else ""
        return f"killed by {_signal_name(status)}{dumped}"
    return None


def _after(timeout_s: float | None) -> str:
    return f" after {_span(timeout_s)}" if timeout_s is not None else ""


def _job_failure(job_result: str, unit_result: str, timeout_s: float | None) -> str:
    match job_result, unit_result:
        case "timeout", _:
            return "the start job timed out"
        case _, "timeout":
            return f"the update unit timed out{_after(timeout_s)}"
        case "canceled", _:
            return "the start job was canceled"
        case "dependency", _:
            return "a dependency of the update unit failed"
        case _, ("" | "success"):
            return f"the start job {job_result}"
        case _:
            return f"the update unit failed ({unit_result})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _span(seconds: float | None) -> str:
    total = round(seconds or 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}min" if minutes else "", f"{secs}s"]
    if secs == 0 and (hours or minutes):
        parts[2] = ""
    return " ".join(p for p in parts if p)


def finish_stack(
    *,
    run: str,
    stack: str,
    unit: str,
    started_at: datetime,
    finished_at: datetime,
    job_result: str,
    unit_result: str,
    commands: Sequence[ExecCommand],
    before: Iterable[ServiceImage],
    after: Iterable[ServiceImage],
    timeout_s: float | None = None,
) -> StackUpdateResult:
    """Everything systemd and the engine reported about one stack's update, as one result."""
    result = classify_job(job_result, unit_result)
    failure = describe_failure(result, job_result, unit_result, commands, timeout_s)
    return StackUpdateResult(
        run=run,
        stack=stack,
        unit=unit,
        result=result,
        started_at=started_at,
        finished_at=finished_at,
        error=failure.error if failure else None,
        failed_command=failure.failed_command if failure else None,
        exit_status=failure.exit_status if failure else None,
        changes=diff_images(before, after),
    )


def skipped_stack(
    *, run: str, stack: str, unit: str, at: datetime, reason: str
) -> StackUpdateResult:
    """A stack that was not updated, with the reason (e.g. its update unit already running)."""
    return StackUpdateResult(run, stack, unit, "skipped", at, at, error=reason)


def latest_results(runs: Iterable[UpdateRun]) -> dict[str, StackUpdateResult]:
    """Each stack's newest result (status `last_update`), from runs in any order."""
    latest: dict[str, StackUpdateResult] = {}
    for run in runs:
        for result in run.results:
            known = latest.get(result.stack)
            if known is None or result.finished_at > known.finished_at:
                latest[result.stack] = result
    return latest


def summary_message(run: UpdateRun) -> str:
    """`update run 2026-11-26T03:00: 4 stacks, 3 succeeded, 1 failed (db: `compose pull`
    exited 125)`: the start minute in UTC, then counts, failures and skips with reasons."""
    count = len(run.stacks)
    head = f"update run {run.started_at.astimezone(UTC):%Y-%m-%dT%H:%M}"
    parts = [f"{count} stack{'s' if count != 1 else ''}"]
    if run.results or count:
        parts.append(f"{len(run.succeeded)} succeeded")
    failed = [r for r in run.results if r.is_failure]
    if failed:
        parts.append(f"{len(failed)} failed ({_reasons(failed, 'failed')})")
    skipped = [r for r in run.results if r.result == "skipped"]
    if skipped:
        parts.append(f"{len(skipped)} skipped ({_reasons(skipped, 'skipped')})")
    missing = len(set(run.stacks) - {r.stack for r in run.results})
    if missing:
        parts.append(f"{missing} without result")
    return f"{head}: {', '.join(parts)}"


def _reasons(results: Iterable[StackUpdateResult], default: str) -> str:
    return ", ".join(f"{r.stack}: {r.error or default}" for r in results)


def stack_message(result: StackUpdateResult) -> str:
    """The message of an `update.stack.finished` event."""
    text = f"update of {result.stack}: {result.result}"
    if result.error:
        text += f": {result.error}"
    changed = [c.describe() for c in result.changes if c.change != "unchanged"]
    if changed:
        text += f" ({'; '.join(changed)})"
    elif result.result == "success" and result.changes:
        text += " (no image changed)"
    return text


def summary_fields(run: UpdateRun) -> dict[str, str]:
    """Structured journal fields of `update.finished` (STACKD_RUN is set by the caller too)."""
    return {
        "STACKD_RUN": run.run,
        "STACKD_TRIGGER": run.trigger,
        "STACKD_RESULT": run.result,
        "STACKD_STACKS": ",".join(run.stacks),
        "STACKD_SUCCEEDED": ",".join(run.succeeded),
        "STACKD_FAILED": ",".join(run.failed),
        "STACKD_SKIPPED": ",".join(run.skipped),
        "STACKD_RECOVERED": "true" if run.recovered else "false",
    }


# --- JSON: the shapes of DESIGN section 6 (`last_update`, `updates.last_run`) plus details ---


def format_timestamp(value: datetime) -> str:
    """ISO 8601 in UTC with a `Z`, microseconds kept when present."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_timestamp(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 timestamp, got {value!r}")
    parsed = datetime.fromisoformat(value)
    if parsed.utcoffset() is None:
        raise ValueError(f"timestamp without a time zone: {value!r}")
    return parsed.astimezone(UTC)


def change_to_json(change: ServiceChange) -> dict[str, Any]:
    return {
        "service": change.service,
        "change": change.change,
        "old": change.old,
        "new": change.new,
        "image": change.image,
    }


def change_from_json(data: object) -> ServiceChange:
    obj = _object(data)
    return ServiceChange(
        service=_str(obj, "service"),
        change=cast(ChangeKind, _choice(obj, "change", _CHANGE_KINDS)),
        old=_opt_str(obj, "old"),
        new=_opt_str(obj, "new"),
        image=_opt_str(obj, "image"),
    )


def stack_result_to_json(result: StackUpdateResult) -> dict[str, Any]:
    """A stack's `last_update` object, plus the stack, unit, failing command and changes."""
    return {
        "run": result.run,
        "stack": result.stack,
        "unit": result.unit,
        "result": result.result,
        "started_at": format_timestamp(result.started_at),
        "finished_at": format_timestamp(result.finished_at),
        "error": result.error,
        "failed_command": result.failed_command,
        "exit_status": result.exit_status,
        "changes": [change_to_json(c) for c in result.changes],
    }


def stack_result_from_json(data: object) -> StackUpdateResult:
    """Inverse of `stack_result_to_json`; ValueError names what is wrong."""
    obj = _object(data)
    exit_status = obj.get("exit_status")
    if exit_status is not None and (type(exit_status) is not int):
        raise ValueError(f"exit_status must be an integer or null, got {exit_status!r}")
    changes = obj.get("changes", [])
    if not isinstance(changes, list):
        raise ValueError(f"changes must be a list, got {changes!r}")
    return StackUpdateResult(
        run=_str(obj, "run"),
        stack=_str(obj, "stack"),
        unit=_str(obj, "unit"),
        result=cast(StackResult, _choice(obj, "result", _STACK_RESULTS)),
        started_at=parse_timestamp(obj.get("started_at")),
        finished_at=parse_timestamp(obj.get("finished_at")),
        error=_opt_str(obj, "error"),
        failed_command=_opt_str(obj, "failed_command"),
        exit_status=exit_status,
        changes=tuple(change_from_json(c) for c in changes),
    )


def run_to_json(run: UpdateRun) -> dict[str, Any]:
    """The `updates.last_run` object, plus trigger, stacks, skipped and every stack result."""
    return {
        "run": run.run,
        "result": run.result,
        "succeeded": run.succeeded,
        "failed": run.failed,
        "skipped": run.skipped,
        "started_at": format_timestamp(run.started_at),
        "finished_at": None if run.finished_at is None else format_timestamp(run.finished_at),
        "trigger": run.trigger,
        "recovered": run.recovered,
        "stacks": list(run.stacks),
        "results": [stack_result_to_json(r) for r in run.results],
    }


def run_from_json(data: object) -> UpdateRun:
    """Inverse of `run_to_json` (the derived fields are recomputed, not read)."""
    obj = _object(data)
    stacks = obj.get("stacks")
    if not isinstance(stacks, list) or not all(isinstance(s, str) for s in stacks):
        raise ValueError(f"stacks must be a list of names, got {stacks!r}")
    results = obj.get("results", [])
    if not isinstance(results, list):
        raise ValueError(f"results must be a list, got {results!r}")
    finished = obj.get("finished_at")
    recovered = obj.get("recovered", False)
    if not isinstance(recovered, bool):
        raise ValueError(f"recovered must be a boolean, got {recovered!r}")
    return UpdateRun(
        run=_str(obj, "run"),
        stacks=tuple(stacks),
        started_at=parse_timestamp(obj.get("started_at")),
        finished_at=None if finished is None else parse_timestamp(finished),
        trigger=cast(Trigger, _choice(obj, "trigger", _TRIGGERS)),
        results=tuple(stack_result_from_json(r) for r in results),
        recovered=recovered,
    )


def _object(data: object) -> Mapping[str, object]:
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return cast(Mapping[str, object], data)


def _str(obj: Mapping[str, object], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _opt_str(obj: Mapping[str, object], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a string or null, got {value!r}")
    return value


def _choice(obj: Mapping[str, object], key: str, allowed: tuple[str, ...]) -> str:
    value = _str(obj, key)
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value
