"""The composition root: builds the adapters, runs the task group, owns the lifecycle.

startup -> serve (connection loop, watchdog, signals) -> bounded graceful shutdown. The
first SIGTERM/SIGINT starts the shutdown; a second one forces it. SIGHUP re-reads config.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import structlog
from dbus_fast import NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus

from stackd.adapters.bus import connect_user_bus
from stackd.adapters.calendar import CalendarError
from stackd.adapters.inotify import UnitDirWatcher
from stackd.adapters.notify import Notifier
from stackd.adapters.store import HistoryStore, state_dir
from stackd.adapters.systemd import SystemdError, SystemdManager
from stackd.api import BUS_NAME, DaemonApi
from stackd.busaddr import user_bus_address
from stackd.core.findings import FindingBook, FindingDelta
from stackd.core.models import Config, Finding, FindingKind, FindingSource
from stackd.core.status import DaemonInfo, build_status, finding_to_json
from stackd.errors import ConfigError, ManagerUnavailableError, StackdError, UsageError
from stackd.reconcile import Reconciler
from stackd.settings import load_config
from stackd.updater import Updater, run_summary_json

__all__ = ["Daemon", "run_daemon"]

log = structlog.get_logger("stackd")

SHUTDOWN_BOUND_S = 10.0
BACKOFF_START_S = 0.1
STATUS_PARTS_MAX = 4096
BACKOFF_MAX_S = 5.0
SOCKET_POLL_S = 0.05  # while the bus is gone: how often to look for its socket


class NameTakenError(StackdError):
    exit_code = 1


def _now() -> datetime:
    return datetime.now(UTC)


class _ManagerPresence:
    """Whether org.freedesktop.systemd1 is on the bus, as two events to wait on."""

    def __init__(self) -> None:
        self.lost = asyncio.Event()
        self.back = asyncio.Event()

    def reset(self) -> None:
        self.lost.clear()
        self.back.clear()

    def changed(self, present: bool) -> None:
        (self.back if present else self.lost).set()


@dataclass(frozen=True, slots=True)
class _StatusCache:
    """The whole status document, as sent and as pieces for filtered answers."""

    text: str
    doc: dict[str, Any]
    by_name: dict[str, dict[str, Any]]


def _finding_log_fields(f: Finding) -> dict[str, Any]:
    """The journal fields of a finding raised or cleared."""
    return {
        "unit": f.unit or None,
        "stack": f.stack,
        "kind": f.kind.value,
        "paths": list(f.paths),
        "source": f.source.value,
    }


class Daemon:
    """Long-running state: last good config, the manager connection, findings, status view."""

    def __init__(self, config_path: Path | None, environ: Mapping[str, str]) -> None:
        self._config_path = config_path
        self._environ = environ
        self.config: Config = load_config(config_path, environ)
        self.config_error: str | None = None
        self.started_at = _now()
        self.pid = os.getpid()
        self.notifier = Notifier.from_environ(environ)
        self.manager: SystemdManager | None = None
        self.api: DaemonApi | None = None
        self.book = FindingBook()
        self.reconciler = Reconciler(self)
        self.updater = Updater(
            store=HistoryStore.in_dir(state_dir(environ)),
            manager=self.live_manager,
            config=lambda: self.config,
            emit=self._emit,
            on_change=self.invalidate,
        )
        self._schedule_task: asyncio.Task[None] | None = None
        self.watcher = UnitDirWatcher(on_change=self._files_changed)
        self.search_path: list[str] = []
        self._stop = asyncio.Event()
        self._ready = False
        self._status_cache: _StatusCache | None = None  # None: invalid, rebuilt on demand
        # Answers to filtered GetStatus calls (one stack each, typically), until a change.
        self._status_parts: dict[tuple[str, ...], str] = {}
        self._followed = False  # the current bus connection reached the manager

    # -- views ---------------------------------------------------------------------------

    def _files_changed(self, units: frozenset[str]) -> None:
        """inotify saw a change that concerns these units: re-verify them."""
        self.reconciler.poke("files", units)

    async def refresh_search_path(self) -> None:
        """Read the manager's UnitPath and (re)aim the watcher at it and the watched units."""
        manager = self.live_manager()
        self.search_path = await manager.unit_path()
        self.watcher.watch(self.search_path, self.reconciler.watched_units())

    def live_manager(self) -> SystemdManager:
        if self.manager is None or not self.manager.available:
            raise ManagerUnavailableError("the systemd user manager is not connected")
        return self.manager

    def _emit(self, signal_name: str, payload: dict[str, Any]) -> None:
        if self.api is not None:
            self.api.emit(signal_name, payload)

    @property
    def manager_connected(self) -> bool:
        return self.manager is not None and self.manager.available

    def invalidate(self) -> None:
        self._status_cache = None
        self._status_parts.clear()

    def status_json(self, stacks: list[str]) -> str:
        """The status document (cached until something changes), or a few stacks of it."""
        if stacks and (cached := self._status_parts.get(tuple(stacks))) is not None:
            return cached  # the hot path of many clients polling one stack each
        cache = self._status_document()
        if not stacks:
            return cache.text
        by_name = cache.by_name
        unknown = [s for s in stacks if s not in by_name]
        if unknown:
            raise UsageError(
                f"no stack named {', '.join(unknown)} in {self.config_label}; "
                f"configured: {', '.join(by_name) or 'none'}"
            )
        key = tuple(stacks)
        wanted = set(stacks)
        text = json.dumps(
            {
                **cache.doc,
                "stacks": [entry for name, entry in by_name.items() if name in wanted],
                "findings": [
                    f for f in cache.doc["findings"] if f["stack"] is None or f["stack"] in wanted
                ],
            }
        )
        if len(self._status_parts) < STATUS_PARTS_MAX:
            self._status_parts[key] = text
        return text

    def _status_document(self) -> _StatusCache:
        """Build the whole document once per change; filtered answers reuse its pieces."""
        if self._status_cache is not None:
            return self._status_cache
        doc = build_status(
            daemon=DaemonInfo(
                pid=self.pid,
                started_at=self.started_at,
                config=self.config_label,
                unit_dir=str(self.config.daemon.unit_dir),
                manager_connected=self.manager_connected,
                config_error=self.config_error,
            ),
            config=self.config,
            units=self.manager.units if self.manager else {},
            findings=self.book.all(),
            last_updates=self.updater.last_updates_json(),
            next_update={
                s.name: self.updater.next_run if s.update else None for s in self.config.stacks
            },
            next_run=self.updater.next_run,
            last_run=self.updater.last_run_json(),
            update_running=self.updater.current.run if self.updater.current else None,
            state_error=self.updater.store_error,
        )
        self._status_cache = _StatusCache(
            text=json.dumps(doc),
            doc=doc,
            by_name={entry["name"]: entry for entry in doc["stacks"]},
        )
        return self._status_cache

    @property
    def config_label(self) -> str:
        if self.config.source is not None:
            return str(self.config.source)
        return "(built-in default: no config file)"

    async def check_json(self) -> str:
        await self.reconciler.verify()
        findings = [finding_to_json(t.finding, t.since) for t in self.book.all()]
        return json.dumps({"version": 1, "findings": findings})

    async def start_update(self, stacks: list[str]) -> str:
        self.live_manager()
        run = await self.updater.start(stacks, "manual")
        return json.dumps({"run": run.run, "stacks": list(run.stacks)})

    def history_json(self, limit: int) -> str:
        runs = self.updater.history(limit)
        return json.dumps({"version": 1, "runs": [run_summary_json(r) for r in runs]})

    async def reload_json(self) -> str:
        ok = await self.reload_config()
        return json.dumps({"reloaded": ok, "config": self.config_label, "error": self.config_error})

    # -- findings --------------------------------------------------------------------------

    def publish(self, delta: FindingDelta) -> None:
        """Tell the world once about each finding raised or cleared."""
        if not delta:
            return
        self.invalidate()
        for timed in delta.raised:
            f = timed.finding
            log.warning(
                "finding.raised",
                message=f"{f.kind.value} {f.unit or '(global)'}: {f.detail}".rstrip(": "),
                **_finding_log_fields(f),
            )
            self._emit("FindingRaised", finding_to_json(f, timed.since))
        for timed in delta.cleared:
            f = timed.finding
            log.info(
                "finding.cleared",
                message=f"{f.kind.value} {f.unit or '(global)'} cleared",
                **_finding_log_fields(f),
            )
            self._emit("FindingCleared", finding_to_json(f, timed.since))

    def _set_manager_unavailable(self, reason: str) -> None:
        finding = Finding(
            kind=FindingKind.MANAGER_UNAVAILABLE,
            unit="",
            source=FindingSource.MANAGER,
            detail=f"the systemd user manager cannot be reached ({reason}); "
            "stackd keeps retrying. Check `systemctl --user status`",
        )
        self.publish(
            self.book.replace(
                [finding], _now(), scope=lambda f: f.kind is FindingKind.MANAGER_UNAVAILABLE
            )
        )

    def _clear_manager_unavailable(self) -> None:
        self.publish(
            self.book.replace([], _now(), scope=lambda f: f.kind is FindingKind.MANAGER_UNAVAILABLE)
        )

    # -- config ----------------------------------------------------------------------------

    async def reload_config(self) -> bool:
        self.notifier.reloading()
        try:
            new = load_config(self._config_path, self._environ)
        except ConfigError as exc:
            self.config_error = str(exc)
            self.invalidate()
            log.error(
                "config.invalid",
                message=f"config not reloaded, keeping the last good one: {exc}",
                file=exc.file,
                key=exc.key,
                reason=exc.reason,
            )
            self.notifier.ready(self._status_line())
            return False
        self.config = new
        self.config_error = None
        self.invalidate()
        log.info("config.reloaded", config=self.config_label, stacks=len(new.stacks))
        self._restart_schedule()
        if self.manager_connected:
            await self.refresh_search_path()
            await self.reconciler.run("reload")
        self.notifier.ready(self._status_line())
        return True

    def _status_line(self) -> str:
        manager = "connected" if self.manager_connected else "unavailable"
        return (
            f"{len(self.config.stacks)} stacks, {len(self.book)} findings, user manager {manager}"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def on_stop(signame: str) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                log.warning("daemon.stopping", message=f"second {signame}: forcing exit")
                os._exit(1)
            self._stop.set()

        def on_hup() -> None:
            task = loop.create_task(self.reload_config())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        self._background: set[asyncio.Task[Any]] = set()
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, on_stop, name)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            async with asyncio.TaskGroup() as tg:
                connection = tg.create_task(self._connection_loop())
                watchdog = tg.create_task(self._watchdog())
                watcher = tg.create_task(self.watcher.run())
                await self._stop.wait()
                log.info("daemon.stopping", message="stopping on request")
                self.notifier.stopping()
                connection.cancel()
                watchdog.cancel()
                watcher.cancel()
                if self._schedule_task is not None:
                    self._schedule_task.cancel()
                for task in self._background:
                    task.cancel()
        except* NameTakenError as group:
            log.error("daemon.stopping", message=str(group.exceptions[0]))
            raise group.exceptions[0] from None
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return 0

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _connection_loop(self) -> None:
        backoff = BACKOFF_START_S
        address = user_bus_address(self._environ)
        socket_path = _bus_socket_path(address)
        while True:
            bus: MessageBus | None = None
            # Which bus socket this attempt is for: a pause ends early only for a new one.
            tried = _file_identity(socket_path) if socket_path is not None else None
            self._followed = False
            try:
                bus = await connect_user_bus(address)
                await self._serve(bus)
            except (OSError, EOFError, ManagerUnavailableError) as exc:
                self._set_manager_unavailable(str(exc) or type(exc).__name__)
                log.warning(
                    "manager.unavailable",
                    message=f"user bus or manager unavailable, retrying in {backoff:.1f}s: {exc}",
                )
            finally:
                if self.manager is not None:
                    self.manager.fail_pending_jobs()
                self.api = None
                if bus is not None and bus.connected:
                    bus.disconnect()
            if self._followed:
                backoff = BACKOFF_START_S  # this connection worked: start the backoff over
            self._mark_ready()
            await self._retry_pause(backoff, socket_path, tried)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _retry_pause(
        self, seconds: float, socket_path: Path | None, tried: tuple[int, int] | None
    ) -> None:
        """Wait `seconds` before connecting again, or less: until there is a bus socket other
        than the one last tried. A user manager that stops takes its bus with it; when it
        starts again, the new socket is there well before a grown backoff would end."""
        if socket_path is None:
            await asyncio.sleep(seconds)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            now = _file_identity(socket_path)
            if now is not None and now != tried:
                return
            left = deadline - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(left, SOCKET_POLL_S))

    async def _serve(self, bus: MessageBus) -> None:
        """One life of the bus connection: own the name, serve the API, follow the manager."""
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise NameTakenError(
                f"another stackd daemon already owns {BUS_NAME} on this user bus; "
                "stop it first (`systemctl --user stop stackd`) or use `stackd status`"
            )
        self.api = DaemonApi(bus, self)
        manager = SystemdManager(bus)
        self.manager = manager
        presence = _ManagerPresence()

        def on_manager_event(kind: str, payload: Any) -> None:
            if kind == "job":
                # JobRemoved changes nothing in the status document: whoever waits for the
                # job (reconciler, updater) reports what follows from it on its own.
                return
            self.invalidate()
            if kind == "owner":
                presence.changed(bool(payload))
            elif kind in ("unit", "reloaded", "unit-files"):
                self.reconciler.poke(kind, payload)

        manager.add_listener(on_manager_event)
        disconnected: asyncio.Future[Any] = asyncio.ensure_future(
            bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        )
        try:
            while True:
                await self._follow_manager(manager, presence, disconnected)
                # Wait until the manager is back on the bus (or a bounded retry interval),
                # unless the bus itself is gone: then reconnecting is the only way back.
                back: asyncio.Future[Any] = asyncio.ensure_future(presence.back.wait())
                await asyncio.wait(
                    {back, disconnected}, timeout=BACKOFF_MAX_S, return_when=asyncio.FIRST_COMPLETED
                )
                back.cancel()
                if disconnected.done():
                    raise ManagerUnavailableError("the user bus connection was closed")
        finally:
            disconnected.cancel()
            manager.available = False
            self.invalidate()

    async def _follow_manager(
        self,
        manager: SystemdManager,
        presence: _ManagerPresence,
        disconnected: asyncio.Future[Any],
    ) -> None:
        """Subscribe, snapshot, reconcile; return when the manager leaves the bus."""
        presence.reset()
        try:
            await manager.subscribe()
            await manager.watch(self.reconciler.watched_units(), lazy=self.reconciler.lazy_units())
            await self.refresh_search_path()
            self._clear_manager_unavailable()
            self._followed = True
            log.info("manager.connected", message="connected to the systemd user manager")
            await self.reconciler.run("start" if not self._ready else "reconnect")
            self._mark_ready()
            if not self.updater.recovered:
                try:
                    await self.updater.recover()
                finally:
                    self._restart_schedule()
            waiter: asyncio.Future[Any] = asyncio.ensure_future(presence.lost.wait())
            await asyncio.wait({waiter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if disconnected.done():
                raise ManagerUnavailableError("the user bus connection was closed")
            manager.available = False
            self._set_manager_unavailable("the manager left the bus")
            log.warning("manager.unavailable", message="the user manager left the bus")
        except (ManagerUnavailableError, SystemdError) as exc:
            # A manager going away mid-call (a re-exec, a stop) can also answer with an
            # error of its own: either way, wait until it is back and start over. But when
            # the bus connection broke under a call (its disconnect future may be set only
            # later), reconnect rather than wait for a manager that cannot come back on it.
            if disconnected.done() or isinstance(exc.__cause__, OSError | EOFError):
                raise ManagerUnavailableError(str(exc)) from exc
            manager.available = False
            self._set_manager_unavailable(str(exc))
            self._mark_ready()
            log.warning("manager.unavailable", message=str(exc))

    def _restart_schedule(self) -> None:
        """(Re)start the scheduler with the current config; a running update is unaffected."""
        if self._schedule_task is not None:
            self._schedule_task.cancel()
        self._schedule_task = asyncio.get_running_loop().create_task(self._schedule())

    async def _schedule(self) -> None:
        try:
            await self.updater.schedule_loop()
        except CalendarError as exc:
            log.error(
                "config.invalid",
                message=f"updates.schedule {self.config.updates.schedule!r}: {exc}; no "
                "scheduled updates until the config is fixed",
                key="updates.schedule",
                reason=str(exc),
            )

    def _mark_ready(self) -> None:
        if not self._ready:
            self._ready = True
            log.info(
                "daemon.started",
                message=f"stackd started: {self._status_line()}",
                pid=self.pid,
                config=self.config_label,
            )
        self.notifier.ready(self._status_line())


def _bus_socket_path(address: str) -> Path | None:
    """The socket file of the first `unix:path=` in a D-Bus address, None for other kinds."""
    for entry in address.split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        for param in params.split(","):
            key, _, value = param.partition("=")
            if key == "path" and value:
                return Path(unquote(value))  # D-Bus escapes bytes in values as %XX
    return None


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of `path`: a socket created anew has a new one. None when absent."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def run_daemon(config_path: Path | None, environ: Mapping[str, str]) -> int:
    """Entry point of `stackd daemon`: config errors surface before anything starts."""
    daemon = Daemon(config_path, environ)
    return asyncio.run(daemon.run())
