"""Reconcile and verify: the daemon's use of the pure core, with the I/O around it.

    gather (stack files, unit_dir, manager state) -> plan_reconcile -> write/remove, Reload,
    start/restart -> scan the search path -> evaluate -> publish findings

Reconciles are serialized; verification is coalesced so that a burst of signals costs one
scan, never a storm of D-Bus calls.

Drift (a hand-edited owned file) with `daemon.heal = "repair"`: a verification that raises a
new `drift` finding runs a reconcile ("repair": rewrite, Reload, restart the stack on
stackd's definition), and so does `stackd check` while any drift is present, so its answer is
what is left after the repair. With "report" the file is left as it is and reported. A file
stackd may never write (no marker, a symlink) stays `drift` in both modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Collection, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from stackd.adapters import unitfiles
from stackd.adapters.systemd import JobOutcome, SystemdError
from stackd.core.findings import FindingDelta
from stackd.core.models import (
    Config,
    Finding,
    FindingKind,
    FindingSource,
    HealMode,
)
from stackd.core.plan import ReconcilePlan, plan_reconcile
from stackd.errors import ManagerUnavailableError
from stackd.verify import (
    DesiredUnits,
    compute_findings,
    desired_units,
    lazy_units,
    watched_units,
)

if TYPE_CHECKING:
    from stackd.adapters.systemd import SystemdManager
    from stackd.daemon import Daemon

__all__ = ["Reconciler"]

log = structlog.get_logger("stackd")

# Extra time a start job gets beyond the unit's own TimeoutStartSec before we stop waiting.
JOB_MARGIN_S = 15.0
VERIFY_COALESCE_S = 0.002
INLINE_VERIFY_UNITS = 8


class Reconciler:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._lock = asyncio.Lock()
        self._verify_task: asyncio.Task[None] | None = None
        self._verify_pending: set[str] | None = set()
        self._jobs: set[asyncio.Task[Any]] = set()
        self._legacy_seen: dict[str, tuple[tuple[str, str], ...]] = {}
        self.last_desired: DesiredUnits | None = None

    @property
    def config(self) -> Config:
        return self._daemon.config

    def lazy_units(self) -> list[str]:
        """Update units: read only while the manager holds them (see SystemdManager.watch)."""
        return lazy_units(self.config)

    def watched_units(self) -> list[str]:
        return watched_units(self.config)

    def _manager(self) -> SystemdManager:
        return self._daemon.live_manager()

    # -- reconcile ------------------------------------------------------------------------

    async def run(self, reason: str) -> ReconcilePlan | None:
        async with self._lock:
            try:
                return await self._run(reason)
            except ManagerUnavailableError:
                raise
            except Exception as exc:
                log.error(
                    "reconcile.failed",
                    message=f"reconcile ({reason}) failed: {exc}",
                    reason=reason,
                    error=str(exc),
                )
                return None

    async def _run(self, reason: str) -> ReconcilePlan:
        config = self.config
        manager = self._manager()
        unit_dir = config.daemon.unit_dir
        desired = await asyncio.to_thread(desired_units, config)
        self._log_legacy(desired)
        present = await asyncio.to_thread(unitfiles.read_owned, unit_dir, desired.texts)
        # A stack in error keeps whatever it has: its files count as desired as they are.
        # So does an adopted one (managed = false): a stack handed over to another tool keeps
        # the files stackd wrote for it, and keeps running, until that tool replaces them.
        wanted = dict(desired.texts)
        keep = set(desired.broken) | {s.name for s in config.stacks if not s.managed}
        for name in sorted(keep):
            stack = config.stack(name)
            assert stack is not None
            for unit in (stack.unit, stack.update_unit):
                state = present.get(unit)
                if state is not None and state.text is not None:
                    wanted[unit] = state.text
        # Configured stacks are brought up when the daemon (or the manager) starts; later
        # reconciles start and restart only what changed, so a stack stopped by hand stays so.
        active = None
        if reason in ("start", "reconnect"):
            active = {name: state.active_state for name, state in manager.units.items()}
        plan = plan_reconcile(wanted, present, heal=config.daemon.heal, active=active)
        adopted = {s.unit for s in config.stacks if not s.managed}
        if adopted & set(plan.start):  # the adopting tool starts its units, not stackd
            plan = replace(plan, start=tuple(u for u in plan.start if u not in adopted))
        self.last_desired = desired

        for unit in plan.stop:
            with contextlib.suppress(SystemdError):
                await manager.run_job("stop", unit, within_s=config.daemon.startup_timeout_s)
        failed = await self._apply_files(plan, unit_dir)
        if failed:
            # A unit whose file could not be written is not (re)started on a stale definition.
            plan = replace(
                plan,
                start=tuple(u for u in plan.start if u not in failed),
                restart=tuple(u for u in plan.restart if u not in failed),
            )
        if plan.reload:
            await manager.reload()
        # The daemon has just watched these units at start/reconnect, and signals keep the
        # copy current: read them again only after a reload or when the set has changed.
        watched = self.watched_units()
        if plan.reload or set(manager.units) != set(watched):
            await manager.watch(watched, lazy=self.lazy_units())
        await self._verify_now()
        self._start_jobs(plan, reason)
        return plan

    async def _apply_files(self, plan: ReconcilePlan, unit_dir: Path) -> set[str]:
        """Write and remove what the plan says, file by file; the names that failed."""
        failed: set[str] = set()
        for name, text in plan.writes:
            try:
                await asyncio.to_thread(unitfiles.write_unit, unit_dir, name, text)
            except (OSError, unitfiles.UnitFileError) as exc:
                # One unwritable file stops only its own stack; the others go on.
                failed.add(name)
                log.error(
                    "reconcile.failed",
                    message=f"could not write {unit_dir / name}: {exc}; the other units go on",
                    unit=name,
                    path=str(unit_dir / name),
                    error=str(exc),
                )
                continue
            log.info(
                "unit.written",
                message=f"wrote {unit_dir / name}",
                unit=name,
                path=str(unit_dir / name),
            )
        for name in plan.removals:
            try:
                removed = await asyncio.to_thread(unitfiles.remove_unit, unit_dir, name)
            except OSError as exc:
                log.error(
                    "reconcile.failed",
                    message=f"could not remove {unit_dir / name}: {exc}",
                    unit=name,
                    path=str(unit_dir / name),
                    error=str(exc),
                )
                continue
            if removed:
                log.info(
                    "unit.removed",
                    message=f"removed {unit_dir / name}",
                    unit=name,
                    path=str(unit_dir / name),
                )
        for name, why in plan.refused:
            log.warning(
                "reconcile.failed",
                message=f"left {unit_dir / name} alone: {why}",
                unit=name,
                path=str(unit_dir / name),
                reason=why,
            )
        return failed

    def _start_jobs(self, plan: ReconcilePlan, reason: str) -> None:
        config = self.config
        manager = self._manager()
        todo = [("start", u) for u in plan.start] + [("restart", u) for u in plan.restart]

        async def one(verb: str, unit: str) -> JobOutcome:
            stack = config.stack(unit.removesuffix(".service"))
            timeout = config.startup_timeout_of(stack) if stack else config.daemon.startup_timeout_s
            bound = timeout + JOB_MARGIN_S
            try:
                return await manager.run_job(verb, unit, within_s=bound)
            except (SystemdError, ManagerUnavailableError) as exc:
                return JobOutcome(unit=unit, job="", result=f"refused: {exc}")

        async def all_jobs() -> None:
            outcomes = await asyncio.gather(*(one(v, u) for v, u in todo))
            failed = [o for o in outcomes if o.result != "done"]
            for outcome in failed:
                log.error(
                    "reconcile.failed",
                    message=f"{outcome.unit}: start job ended with {outcome.result}",
                    unit=outcome.unit,
                    result=outcome.result,
                )
            log.info(
                "reconcile.finished",
                message=(
                    f"reconcile ({reason}): {len(plan.writes)} written, "
                    f"{len(plan.removals)} removed, {len(plan.start)} started, "
                    f"{len(plan.restart)} restarted, {len(failed)} failed"
                ),
                reason=reason,
                written=len(plan.writes),
                removed=len(plan.removals),
                started=list(plan.start),
                restarted=list(plan.restart),
                failed=[o.unit for o in failed],
            )
            self.request_verify()

        task = asyncio.get_running_loop().create_task(all_jobs())
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        task.add_done_callback(_log_crash)

    def _log_legacy(self, desired: DesiredUnits) -> None:
        for name, files in desired.files.items():
            if files.legacy_fallback and self._legacy_seen.get(name) != files.legacy_fallback:
                for missing, used in files.legacy_fallback:
                    log.warning(
                        "env.legacy_fallback",
                        message=(
                            f"stack {name}: env file {missing or '(none configured)'} is "
                            f"missing, using deprecated legacy env file {used}; move the "
                            "secrets to env_files"
                        ),
                        stack=name,
                        missing=missing,
                        legacy=used,
                    )
            self._legacy_seen[name] = files.legacy_fallback

    # -- verify ---------------------------------------------------------------------------

    def poke(self, kind: str, payload: Any) -> None:
        """Something we verify may have changed: re-evaluate soon (coalesced).

        inotify ("files") and a unit's PropertiesChanged ("unit") name the units concerned,
        so only those are re-scanned; a daemon-reload or UnitFilesChanged re-checks all.
        """
        if kind == "files":
            self.request_verify(payload)
        elif kind == "unit":
            self.request_verify([payload.unit])
        else:
            self.request_verify(None)

    def request_verify(self, units: Iterable[str] | None = None) -> None:
        """Ask for a verification of `units` (None: all); requests pile up while one runs."""
        if units is None or self._verify_pending is None:
            self._verify_pending = None
        else:
            self._verify_pending.update(units)
        if self._verify_task is not None and not self._verify_task.done():
            return
        self._verify_task = asyncio.get_running_loop().create_task(self._verify_loop())

    async def _verify_loop(self) -> None:
        while True:
            await asyncio.sleep(VERIFY_COALESCE_S)
            pending, self._verify_pending = self._verify_pending, set()
            if pending is not None and not pending:
                return
            repair = False
            async with self._lock:
                with contextlib.suppress(ManagerUnavailableError, SystemdError):
                    delta = await self._verify_now(pending)
                    # Only drift seen for the first time: a file stackd may not rewrite
                    # (no marker, a symlink) stays drift and must not start a loop.
                    repair = self._wants_repair(t.finding for t in delta.raised)
            if repair:
                with contextlib.suppress(ManagerUnavailableError):
                    await self.run("repair")

    async def verify(self) -> None:
        """A fresh verification (for `stackd check`): re-read the manager, then evaluate.

        With `heal = "repair"`, drift in an owned file is repaired on the spot (a reconcile:
        rewrite, Reload, restart), so the answer reports what is left afterwards.
        """
        async with self._lock:
            manager = self._manager()
            await manager.refresh()
            await self._verify_now()
            repair = self._wants_repair(t.finding for t in self._daemon.book.all())
        if repair:
            await self.run("repair")

    def _wants_repair(self, findings: Iterable[Finding]) -> bool:
        if self.config.daemon.heal is not HealMode.REPAIR:
            return False
        managed = {s.name for s in self.config.stacks if s.managed}
        return any(
            f.kind is FindingKind.DRIFT and f.source is FindingSource.DISK and f.stack in managed
            for f in findings
        )

    async def _verify_now(self, units: Collection[str] | None = None) -> FindingDelta:
        """Evaluate ownership of `units` (None: every owned unit) and publish the changes.

        Works from the files alone while the manager is away: disk findings (a shadowing
        copy, a foreign drop-in) are reported at once, loaded-state ones when it is back.
        """
        config = self.config
        available = self._daemon.manager_connected
        manager = self._daemon.manager if available else None
        desired = self.last_desired
        if desired is None:
            desired = await asyncio.to_thread(desired_units, config)
        search_path = self._daemon.search_path
        if manager is not None and (units is None or not search_path):
            search_path = self._daemon.search_path = await manager.unit_path()
        if not search_path:
            raise ManagerUnavailableError("the unit search path is not known yet")
        loaded = dict(manager.units) if manager is not None else {}
        only = None if units is None else frozenset(units)
        work = functools.partial(
            compute_findings, config, desired, search_path, loaded, available, only=only
        )
        # A few units take ~1 ms: less than the hop to a worker thread and back.
        small = only is not None and len(only) <= INLINE_VERIFY_UNITS
        findings = work() if small else await asyncio.to_thread(work)
        delta = self._daemon.book.replace(
            findings,
            datetime.now(UTC),
            scope=lambda f: (
                f.kind is not FindingKind.MANAGER_UNAVAILABLE and (only is None or f.unit in only)
            ),
        )
        self._daemon.publish(delta)
        self._daemon.invalidate()
        return delta


def _log_crash(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("reconcile.failed", message=f"start/restart jobs failed: {exc!r}")
