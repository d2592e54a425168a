"""Update orchestration: run `<stack>-update.service` units, carry on past failures, and end
every run with one summary in the journal, the history file, the status view and on D-Bus.

A run is recorded (`run.started`) before any unit starts and each stack's result as soon as
it is known, so a daemon killed mid-run can complete the run from the units at its next
start (`recover`). Scheduling follows systemd timers: OnCalendar= elapses from
`systemd-analyze calendar`, RandomizedDelaySec=, Persistent= catch-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from stackd.adapters import calendar
from stackd.adapters.compose import EngineImages, engine_for, service_images
from stackd.adapters.store import (
    HistoryStore,
    StoreError,
    run_finished_record,
    run_started_record,
    stack_finished_record,
)
from stackd.adapters.systemd import UNIT_IFACE, SystemdError
from stackd.core.models import Config, StackSpec, UnitState
from stackd.core.render import compose_project_name
from stackd.core.schedule import apply_randomized_delay
from stackd.core.updates import (
    ExecCommand,
    StackUpdateResult,
    Trigger,
    UpdateRun,
    exit_text,
    finish_stack,
    latest_results,
    new_run_id,
    run_to_json,
    skipped_stack,
    stack_message,
    stack_result_to_json,
    summary_fields,
    summary_message,
)
from stackd.errors import ManagerUnavailableError, StackdError, UsageError

if TYPE_CHECKING:
    from stackd.adapters.systemd import SystemdManager

__all__ = ["UpdateBusyError", "Updater", "run_summary_json"]

log = structlog.get_logger("stackd")

# Beyond the unit's own TimeoutStartSec (which systemd enforces) we stop waiting after this.
WAIT_MARGIN_S = 30.0
# How often records kept in memory are tried again while the state dir refuses them.
FLUSH_RETRY_S = 2.0
_MOVING_STATES = frozenset({"activating", "deactivating", "reloading", "refreshing"})
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits


class UpdateBusyError(StackdError):
    """A run is in progress; a second one is refused rather than queued."""


class Updater:
    """Owns update runs for the daemon. `manager()` is the live manager (or raises)."""

    def __init__(
        self,
        *,
        store: HistoryStore,
        manager: Callable[[], SystemdManager],
        config: Callable[[], Config],
        emit: Callable[[str, dict[str, Any]], None],
        on_change: Callable[[], None],
    ) -> None:
        self._store = store
        self._manager = manager
        self._config = config
        self._emit = emit
        self._on_change = on_change
        self.current: UpdateRun | None = None
        self.recovered = False  # set once `recover` has completed what it found
        self._task: asyncio.Task[UpdateRun] | None = None
        self._pending_writes: list[dict[str, Any]] = []  # records not written yet, in order
        self._flush_task: asyncio.Task[None] | None = None
        self.store_error: str | None = None
        self.next_run: datetime | None = None
        self._history_cache: list[UpdateRun] | None = None

    # -- views ---------------------------------------------------------------------------

    def history(self, limit: int) -> list[UpdateRun]:
        """The history, with the records still waiting for the state dir to be writable."""
        try:
            return self._store.read(limit, pending=self._pending_writes)
        except StoreError as exc:
            self._report_store_error(exc)
            return []

    def _recent(self) -> list[UpdateRun]:
        if self._history_cache is None:
            self._history_cache = self.history(50)
        return self._history_cache

    def last_run_json(self) -> dict[str, Any] | None:
        run = next((r for r in self._recent() if r.finished_at is not None), None)
        return None if run is None else run_summary_json(run)

    def last_updates_json(self) -> dict[str, dict[str, Any]]:
        return {
            stack: stack_result_to_json(result)
            for stack, result in latest_results(self._recent()).items()
        }

    # -- a run -----------------------------------------------------------------------------

    def select(self, names: Sequence[str]) -> list[StackSpec]:
        """The named stacks (any of them, `update = false` too: naming one is the opt-in),
        else every stack with `update = true`, whatever started the run."""
        config = self._config()
        if names:
            unknown = [n for n in names if config.stack(n) is None]
            if unknown:
                raise UsageError(
                    f"no stack named {', '.join(unknown)}; configured: "
                    f"{', '.join(s.name for s in config.stacks) or 'none'}"
                )
            return [s for s in config.stacks if s.name in names]
        return [s for s in config.stacks if s.update]

    async def start(self, names: Sequence[str], trigger: Trigger) -> UpdateRun:
        """Record a new run and start it in the background; refuse while one runs."""
        if not self.recovered:
            # Until `recover` has read the history, a new run would count as one a
            # previous daemon left unfinished, and be completed twice.
            waiting = f"update run {self.current.run}" if self.current else "update runs"
            raise UpdateBusyError(
                f"the daemon is still completing the {waiting} a previous daemon left "
                "unfinished; try again in a moment (`stackd status` shows it)"
            )
        if self._task is not None and not self._task.done() and self.current is not None:
            raise UpdateBusyError(
                f"update run {self.current.run} is still in progress; wait for it to finish "
                "(`stackd status` shows it) and try again"
            )
        stacks = self.select(names)
        now = datetime.now(UTC)
        run = UpdateRun(
            run=new_run_id(now, "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(4))),
            stacks=tuple(s.name for s in stacks),
            started_at=now,
            finished_at=None,
            trigger=trigger,
        )
        self.current = run
        self._write(
            run_started_record(run),
            announce=functools.partial(
                log.info,
                "update.started",
                message=f"update run {run.run} ({trigger}): {len(stacks)} stacks: "
                f"{', '.join(run.stacks) or 'none'}",
                run=run.run,
                trigger=trigger,
                stacks=list(run.stacks),
            ),
        )
        self._emit(
            "UpdateProgress", {"run": run.run, "stacks": list(run.stacks), "state": "started"}
        )
        self._on_change()
        self._task = asyncio.get_running_loop().create_task(self._run(run, stacks))
        return run

    async def wait(self) -> UpdateRun | None:
        if self._task is None:
            return None
        return await asyncio.shield(self._task)

    async def _run(self, run: UpdateRun, stacks: list[StackSpec]) -> UpdateRun:
        config = self._config()
        slots = asyncio.Semaphore(max(1, config.updates.concurrency))

        kept: list[str] = []

        async def one(stack: StackSpec) -> StackUpdateResult:
            async with slots:
                ran = await self._run_unit(run.run, stack, config)
            # The unit has ended: its slot goes to the next stack while this one's result
            # is read (unit properties, the engine's images) and recorded.
            if isinstance(ran, StackUpdateResult):
                self._record_stack(ran)
                return ran
            result = await self._collect(ran)
            self._record_stack(result)
            if ran.job_result == "done":
                kept.append(ran.stack.update_unit)
            return result

        results = await asyncio.gather(*(one(s) for s in stacks))
        # Released together at the end: a stop job per stack mid-run would take the
        # manager's attention from the starts of the other stacks.
        await asyncio.gather(*(self._release(unit) for unit in kept))
        return self._finish(replace(run, results=tuple(results)), recovered=False)

    async def _run_unit(
        self, run_id: str, stack: StackSpec, config: Config
    ) -> StackUpdateResult | _UnitRan:
        """Start the stack's update unit and wait until it has ended; a result when it never
        ran (refused, not loaded, already running)."""
        unit = stack.update_unit
        now = datetime.now(UTC)
        try:
            manager = self._manager()
            state = await manager.load_state(unit, details=False)
        except (ManagerUnavailableError, SystemdError) as exc:
            return _failed(run_id, stack, now, f"refused: {exc}")
        if state.load_state != "loaded":
            return _failed(
                run_id,
                stack,
                now,
                f"{unit} is not loaded ({state.load_state}); see `stackd check`",
            )
        if _is_running(state):
            return skipped_stack(
                run=run_id,
                stack=stack.name,
                unit=unit,
                at=now,
                reason=f"{unit} is already running ({state.active_state}); not started twice",
            )
        if _is_kept(state):
            # An earlier success still held for its record (or started by hand): a start
            # would be a no-op, so it is stopped first.
            try:
                await manager.run_job("stop", unit, within_s=WAIT_MARGIN_S)
            except (ManagerUnavailableError, SystemdError) as exc:
                return _failed(run_id, stack, now, f"refused: {exc}")
        engine = config.daemon.engine or engine_for(config.daemon.compose_command)
        project = compose_project_name(stack.name)
        before = await service_images(engine, project)
        started = datetime.now(UTC)
        try:
            outcome = await manager.run_job(
                "start", unit, within_s=config.updates.timeout_s + WAIT_MARGIN_S
            )
        except (ManagerUnavailableError, SystemdError) as exc:
            return _failed(run_id, stack, started, f"refused: {exc}")
        if outcome.result == "timeout":
            # Our wait ran out before systemd's own timeout did: stop the unit ourselves.
            with contextlib.suppress(ManagerUnavailableError, SystemdError):
                await manager.run_job("stop", unit, within_s=WAIT_MARGIN_S)
        return _UnitRan(
            run_id=run_id,
            stack=stack,
            started=started,
            job_result=outcome.result,
            before=before,
            engine=engine,
            project=project,
            timeout_s=config.updates.timeout_s,
        )

    async def _collect(self, ran: _UnitRan) -> StackUpdateResult:
        """Build the stack's result from the unit's properties and the engine's view."""
        unit = ran.stack.update_unit
        unit_result = ""
        commands: list[ExecCommand] = []
        with contextlib.suppress(ManagerUnavailableError, SystemdError):
            props = await self._manager().service_properties(unit, ["Result", "ExecStart"])
            unit_result = str(props.get("Result", ""))
            commands = [ExecCommand.from_dbus(c) for c in props.get("ExecStart", [])]
        after = await service_images(ran.engine, ran.project)
        return finish_stack(
            run=ran.run_id,
            stack=ran.stack.name,
            unit=unit,
            started_at=ran.started,
            finished_at=datetime.now(UTC),
            job_result=ran.job_result,
            unit_result=unit_result,
            commands=commands,
            before=ran.before.images,
            after=after.images,
            timeout_s=ran.timeout_s,
        )

    def _record_stack(self, result: StackUpdateResult) -> None:
        level = log.error if result.is_failure else log.info
        announce = functools.partial(
            level,
            "update.stack.finished",
            message=stack_message(result),
            run=result.run,
            stack=result.stack,
            unit=result.unit,
            result=result.result,
            error=result.error,
            failed_command=result.failed_command,
            exit_status=result.exit_status,
            changes=[c.describe() for c in result.changes],
        )
        self._write(stack_finished_record(result), announce=announce)
        self._emit("UpdateProgress", stack_result_to_json(result))

    def _finish(self, run: UpdateRun, *, recovered: bool) -> UpdateRun:
        run = replace(run, finished_at=datetime.now(UTC), recovered=recovered)
        fields = summary_fields(run)
        level = log.error if run.failed else log.info
        announce = functools.partial(
            level,
            "update.finished",
            message=summary_message(run),
            run=run.run,
            succeeded_count=len(run.succeeded),
            failed_count=len(run.failed),
            **{k: v for k, v in fields.items() if k != "STACKD_RUN"},
        )
        self._write(run_finished_record(run), announce=announce)
        self._emit("UpdateFinished", run_summary_json(run))
        if self.current is not None and self.current.run == run.run:
            self.current = None
        self._history_cache = None
        self._on_change()
        return run

    # -- durability -------------------------------------------------------------------------

    def _write(self, record: dict[str, Any], *, announce: Callable[[], object]) -> None:
        """Append a history record and `announce` it (its journal event) once.

        The event goes out right after the record reaches the file and before the fsync:
        a kill -9 between the two would leave a record whose event nobody sends (the next
        daemon sees the step done) or, the other way round, an event sent twice; keeping
        them microseconds apart, not a disk flush apart, makes that all but impossible.
        When the state dir refuses the record (read-only, full), it is announced at once,
        kept in memory, in order, and written when that works again: at the next record,
        or from a retry every FLUSH_RETRY_S, whichever comes first."""
        announced = False

        def announce_once() -> None:
            nonlocal announced
            if not announced:
                announced = True
                announce()

        self._pending_writes.append(record)
        self._flush(record, announce_once)
        announce_once()
        if self._pending_writes:
            self._history_cache = None  # the views read the kept records too
            if self._flush_task is None or self._flush_task.done():
                self._flush_task = asyncio.get_running_loop().create_task(self._flush_later())

    def _flush(
        self, new: dict[str, Any] | None = None, on_written: Callable[[], None] | None = None
    ) -> None:
        while self._pending_writes:
            record = self._pending_writes[0]
            try:
                self._store.append(record, on_written=on_written if record is new else None)
            except StoreError as exc:
                self._report_store_error(exc)
                return
            # Only a record that was written leaves the queue: none is lost or reordered.
            self._pending_writes.pop(0)
        if self.store_error is not None:
            self.store_error = None
            self._history_cache = None
            log.info("state.write_failed", message="the state directory is writable again")
            self._on_change()

    async def _flush_later(self) -> None:
        while self._pending_writes:
            await asyncio.sleep(FLUSH_RETRY_S)
            self._flush()

    def _report_store_error(self, exc: StoreError) -> None:
        if self.store_error != str(exc):
            log.error(
                "state.write_failed",
                message=f"{exc}; results are kept in memory and written when it works again",
                path=str(exc.path),
            )
        self.store_error = str(exc)
        self._on_change()

    # -- recovery ---------------------------------------------------------------------------

    async def recover(self) -> None:
        """Complete runs a previous daemon left unfinished, from what the units say."""
        try:
            unfinished = self._store.unfinished_runs()
        except StoreError as exc:
            self._report_store_error(exc)
            self.recovered = True  # nothing readable to complete; new runs may start
            return
        config = self._config()
        for run in unfinished:
            self.current = run  # `updates.running` in the status, and named when busy
            self._on_change()
            done = {r.stack for r in run.results}
            results = list(run.results)
            for name in run.stacks:
                if name in done:
                    continue
                result, kept = await self._recover_stack(run, name, config)
                self._record_stack(result)
                if kept:
                    await self._release(kept)
                results.append(result)
            self._finish(replace(run, results=tuple(results)), recovered=True)
        self.current = None
        self.recovered = True

    async def _recover_stack(
        self, run: UpdateRun, name: str, config: Config
    ) -> tuple[StackUpdateResult, str | None]:
        """The stack's result in `run` from what its update unit says, and the unit when it is
        kept `active (exited)` (to be released once the result is recorded)."""
        stack = config.stack(name) or StackSpec(name=name, directory=config.daemon.unit_dir)
        unit = stack.update_unit
        manager = self._manager()
        state = await manager.load_state(unit, details=False)
        held = False
        if _is_running(state):
            # An adopted update unit (no RemainAfterExit) is unloaded once it ends in
            # success and nothing refers to it: hold a reference until it is read.
            held = await _unit_ref(manager, unit, "Ref")
        try:
            while _is_running(state):
                await asyncio.sleep(0.2)
                state = await manager.load_state(unit, details=False)
            props: dict[str, Any] = {}
            with contextlib.suppress(SystemdError):
                props = await manager.service_properties(
                    unit, ["Result", "ExecStart", "ExecMainCode", "ExecMainStatus"]
                )
            # Unit timestamps survive a daemon-reload (the per-command ExecStart statuses do
            # not, and a restarted stackd may reload), so they tell whether it ran in this run.
            stamps = await _unit_timestamps(manager, unit)
        finally:
            if held:
                await _unit_ref(manager, unit, "Unref")
        kept = unit if _is_kept(state) else None
        started = stamps.get("InactiveExitTimestamp")
        if started is None or started < run.started_at:
            # Never started in this run (or an adopted unit that ended in success while no
            # stackd was there, and systemd has unloaded it since).
            reason = (
                "no trace of this run in the update unit: the daemon stopped before it started it"
            )
            return skipped_stack(
                run=run.run, stack=name, unit=unit, at=datetime.now(UTC), reason=reason
            ), kept
        ended = stamps.get("ActiveEnterTimestamp") if kept else None
        ended = ended or stamps.get("InactiveEnterTimestamp")
        unit_result = str(props.get("Result", ""))
        result = finish_stack(
            run=run.run,
            stack=name,
            unit=unit,
            started_at=started,
            finished_at=ended if ended is not None and ended >= started else datetime.now(UTC),
            job_result="done" if unit_result == "success" else "failed",
            unit_result=unit_result,
            commands=[ExecCommand.from_dbus(c) for c in props.get("ExecStart", [])],
            before=(),
            after=(),
            timeout_s=config.updates.timeout_s,
        )
        if result.is_failure and not result.failed_command:
            status = _exit_text(props.get("ExecMainCode"), props.get("ExecMainStatus"))
            result = replace(
                result,
                error=f"the update unit ended with {unit_result}{status} while no daemon "
                f"was running; see `journalctl --user -u {unit}`",
            )
        return result, kept

    async def _release(self, unit: str) -> None:
        """Stop an update unit kept `active (exited)` once its result is recorded, so that
        it is inactive again (and systemd may unload it) until the next run."""
        with contextlib.suppress(ManagerUnavailableError, SystemdError):
            await self._manager().run_job("stop", unit, within_s=WAIT_MARGIN_S)

    # -- schedule ---------------------------------------------------------------------------

    async def schedule_loop(self) -> None:
        """Start scheduled runs forever: catch up once if one was missed, then follow the
        calendar. Cancelled on shutdown or when the config changes."""
        config = self._config()
        expr = config.updates.schedule
        now = datetime.now(UTC)
        if config.updates.persistent:
            try:
                last = self._store.last_scheduled_run_time()
            except StoreError as exc:
                self._report_store_error(exc)
                last = None
            if await calendar.missed_elapse(expr, last, now):
                await self._start_quietly("catch-up")
        while True:
            now = datetime.now(UTC)
            due = await calendar.next_elapse(expr, now)
            if due is None:
                self.next_run = None
                self._on_change()
                return
            # Drawing the delay is the only randomness; the rule itself is pure.
            self.next_run = apply_randomized_delay(
                due,
                config.updates.randomized_delay_s,
                random.random(),  # noqa: S311 - spreading load, not security
            )
            self._on_change()
            await _sleep_until(self.next_run)
            await self._start_quietly("schedule")
            await self.wait()

    async def _start_quietly(self, trigger: Trigger) -> None:
        try:
            await self.start((), trigger)
        except UpdateBusyError as exc:
            log.warning("update.started", message=f"scheduled run skipped: {exc}")


async def _sleep_until(moment: datetime) -> None:
    """Sleep in bounded steps so that a suspended machine or a clock change is noticed."""
    while (left := (moment - datetime.now(UTC)).total_seconds()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(min(left, 60.0))


async def _unit_ref(manager: SystemdManager, unit: str, method: str) -> bool:
    """`Ref`/`Unref` a unit for this bus connection (dropped by systemd when it closes)."""
    try:
        (path,) = await manager.call("LoadUnit", "s", [unit])
        await manager.call(method, path=str(path), interface=UNIT_IFACE)
    except SystemdError:
        return False  # then only a failed end stays visible; a success may read as skipped
    return True


def _is_running(state: UnitState) -> bool:
    """Starting, stopping or running (a long-running adopted update unit): not to be started."""
    return state.active_state in _MOVING_STATES or (
        state.active_state == "active" and state.sub_state != "exited"
    )


def _is_kept(state: UnitState) -> bool:
    """Ended in success and held by RemainAfterExit, with its result, until released."""
    return state.active_state == "active" and state.sub_state == "exited"


def _exit_text(code: object, status: object) -> str:
    """How the failing command ended, from ExecMainCode/ExecMainStatus: " (exited 125)",
    " (killed by SIGKILL)"; empty when systemd has no record of it."""
    if not isinstance(code, int) or not isinstance(status, int):
        return ""
    ended = exit_text(code, status)
    return f" ({ended})" if ended else ""


_TIMESTAMPS = ("InactiveExitTimestamp", "ActiveEnterTimestamp", "InactiveEnterTimestamp")


async def _unit_timestamps(manager: SystemdManager, unit: str) -> dict[str, datetime]:
    """The unit's state-change timestamps that are set (a never-reached state is absent)."""
    try:
        values = await manager.service_properties(unit, _TIMESTAMPS, interface=UNIT_IFACE)
    except SystemdError:
        return {}
    return {
        name: datetime.fromtimestamp(usec / 1_000_000, UTC)
        for name, usec in values.items()
        if isinstance(usec, int) and usec
    }


@dataclass(frozen=True, slots=True)
class _UnitRan:
    """An update unit that ran and ended: what its result is built from."""

    run_id: str
    stack: StackSpec
    started: datetime
    job_result: str
    before: EngineImages
    engine: str | None
    project: str
    timeout_s: float


def _failed(run_id: str, stack: StackSpec, at: datetime, error: str) -> StackUpdateResult:
    return StackUpdateResult(
        run=run_id,
        stack=stack.name,
        unit=stack.update_unit,
        result="failed",
        started_at=at,
        finished_at=datetime.now(UTC),
        error=error,
    )


def run_summary_json(run: UpdateRun) -> dict[str, Any]:
    return {**run_to_json(run), "summary": summary_message(run)}
