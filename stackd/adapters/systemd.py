"""dbus-fast client of the systemd user manager (org.freedesktop.systemd1).

One object owns the bus connection's view of the manager and keeps a live copy of the
watched units, updated from signals. It subscribes before it takes its snapshot, so no
change between the two is lost, and bounds the calls in flight (dbus-fast drops a
connection whose write hits EAGAIN).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from stackd.core.models import UNLOADED, UnitState
from stackd.errors import ManagerUnavailableError, StackdError

__all__ = [
    "MANAGER_IFACE",
    "UNLOADED",
    "JobOutcome",
    "SystemdManager",
    "UnitChange",
    "unit_object_path",
]

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
_JOB_METHODS = {"start": "StartUnit", "restart": "RestartUnit", "stop": "StopUnit"}
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"

# Unit properties that feed UnitState, and the UnitState field each one sets.
_UNIT_FIELDS = {
    "LoadState": "load_state",
    "ActiveState": "active_state",
    "SubState": "sub_state",
    "FragmentPath": "fragment_path",
    "DropInPaths": "drop_in_paths",
    "NeedDaemonReload": "need_daemon_reload",
}
_SERVICE_FIELDS = {"Result": "result"}

_MATCH_RULES = (
    f"type='signal',interface='{MANAGER_IFACE}',path='{MANAGER_PATH}'",
    f"type='signal',interface='{PROPS_IFACE}',member='PropertiesChanged',"
    f"path_namespace='/org/freedesktop/systemd1/unit'",
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    f"member='NameOwnerChanged',arg0='{SYSTEMD}'",
)

_RECENT_JOBS = 4096


def unit_object_path(unit: str) -> str:
    """The object path systemd gives a unit (sd_bus_path_encode of the name)."""
    out = []
    for i, ch in enumerate(unit):
        if ch.isascii() and (ch.isalpha() or (ch.isdigit() and i > 0)):
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode())
    return UNIT_PATH_PREFIX + "".join(out)


@dataclass(frozen=True, slots=True)
class UnitChange:
    """A watched unit's state changed (from a signal or a refresh)."""

    unit: str
    state: UnitState


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """How a job ended: systemd's JobRemoved result (done, failed, timeout, canceled, ...)."""

    unit: str
    job: str
    result: str


class SystemdError(StackdError):
    """The manager answered a call with an error (the D-Bus error name is kept)."""

    def __init__(self, member: str, error_name: str, text: str) -> None:
        self.member = member
        self.error_name = error_name
        super().__init__(f"{member}: {error_name}: {text}")


ManagerListener = Callable[[str, Any], None]


class SystemdManager:
    """The user manager as stackd sees it: calls, signals and a live copy of watched units."""

    def __init__(self, bus: MessageBus, *, max_in_flight: int = 32) -> None:
        self._bus = bus
        self._slots = asyncio.Semaphore(max_in_flight)
        self._watched: dict[str, UnitState] = {}
        self._path_to_unit: dict[str, str] = {}
        self._listeners: list[ManagerListener] = []
        self._job_waiters: dict[str, asyncio.Future[JobOutcome]] = {}
        self._recent_jobs: OrderedDict[str, JobOutcome] = OrderedDict()
        self._refresh_task: asyncio.Task[None] | None = None
        self._pending_refresh: set[str] | None = set()
        self.reloading = False
        self.available = False
        self._generation = 0  # bumped by every reload; older reads are stale
        self._lazy: frozenset[str] = frozenset()
        self._matched = False
        bus.add_message_handler(self._on_message)

    # -- calls -------------------------------------------------------------------------

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
    ) -> list[Any]:
        """One method call on the manager, bounded by the in-flight limit."""
        msg = Message(
            destination=SYSTEMD,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )
        async with self._slots:
            try:
                reply = await self._bus.call(msg)
            except (OSError, EOFError) as exc:
                raise ManagerUnavailableError(
                    f"lost the user bus while calling {member}: {exc}"
                ) from exc
        if reply is None:
            raise ManagerUnavailableError(f"no reply from the user manager to {member}")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            name = reply.error_name or "unknown"
            if name in (
                "org.freedesktop.DBus.Error.ServiceUnknown",
                "org.freedesktop.DBus.Error.NoReply",
                "org.freedesktop.DBus.Error.NameHasNoOwner",
            ):
                raise ManagerUnavailableError(f"the user manager is not reachable: {text}")
            raise SystemdError(member, name, str(text))
        return list(reply.body)

    async def _bus_call(self, member: str, signature: str, body: Sequence[Any]) -> list[Any]:
        msg = Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member=member,
            signature=signature,
            body=list(body),
        )
        async with self._slots:
            reply = await self._bus.call(msg)
        if reply is None or reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else "no reply"
            raise SystemdError(member, getattr(reply, "error_name", "") or "", str(detail))
        return list(reply.body)

    async def subscribe(self) -> None:
        """Ask for the signals we keep our copy with. Must run before `snapshot`.

        Called again whenever the manager comes back on the same bus connection: the match
        rules stay with the connection and are added once (the bus limits their number),
        `Subscribe` goes to the new manager.
        """
        if not self._matched:
            for rule in _MATCH_RULES:
                await self._bus_call("AddMatch", "s", [rule])
            self._matched = True
        try:
            await self.call("Subscribe")
        except SystemdError as exc:
            # A re-executed manager keeps its subscribers: then we are subscribed already.
            if exc.error_name != "org.freedesktop.systemd1.AlreadySubscribed":
                raise
        self.available = True

    async def unit_path(self) -> list[str]:
        """The directories the manager reads units from, highest precedence first."""
        (value,) = await self.call("Get", "ss", [MANAGER_IFACE, "UnitPath"], interface=PROPS_IFACE)
        return [str(p) for p in value.value]

    async def reload(self) -> None:
        self._generation += 1
        await self.call("Reload")

    async def wait_job(self, job: str, within_s: float | None) -> JobOutcome:
        """Wait for JobRemoved of `job`; a timeout yields result "timeout" (job left running)."""
        if (done := self._recent_jobs.get(job)) is not None:
            return done
        fut = self._job_waiters.get(job)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._job_waiters[job] = fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), within_s)
        except TimeoutError:
            return JobOutcome(unit="", job=job, result="timeout")

    async def run_job(
        self, verb: str, unit: str, *, within_s: float | None, mode: str = "replace"
    ) -> JobOutcome:
        """Start/restart/stop `unit` and wait for its job to end."""
        (job,) = await self.call(_JOB_METHODS[verb], "ss", [unit, mode])
        outcome = await self.wait_job(str(job), within_s)
        return replace(outcome, unit=unit)

    # -- the live copy ----------------------------------------------------------------

    @property
    def units(self) -> dict[str, UnitState]:
        return self._watched

    def add_listener(self, listener: ManagerListener) -> None:
        """`listener(kind, payload)`: kind is "unit", "reloaded", "unit-files" or "owner"."""
        self._listeners.append(listener)

    async def watch(
        self, units: Iterable[str], *, lazy: Collection[str] = ()
    ) -> dict[str, UnitState]:
        """Keep the given units' state current; forget units no longer listed.

        `lazy` units are read only while the manager holds them (an inactive update unit is
        garbage-collected after each use, and loading it again per read costs ~1-5 ms);
        otherwise their state is UNLOADED, and the files are what the manager would load.
        """
        wanted = list(dict.fromkeys(units))
        keep = set(wanted)
        self._lazy = frozenset(lazy)
        for gone in set(self._watched) - keep:
            del self._watched[gone]
        self._path_to_unit = {p: u for p, u in self._path_to_unit.items() if u in keep}
        for name in self._lazy.intersection(wanted):
            self._path_to_unit[unit_object_path(name)] = name
        for state in await self.load_states(wanted, lazy=self._lazy):
            self._watched[state.name] = state
        return dict(self._watched)

    async def refresh(self, units: Iterable[str] | None = None) -> None:
        """Read the watched units again (after a daemon-reload no signal carries the news)."""
        names = list(self._watched) if units is None else [u for u in units if u in self._watched]
        generation = self._generation
        states = await self.load_states(names, lazy=self._lazy)
        if generation != self._generation:
            return  # a reload happened meanwhile: these answers may predate it
        for state in states:
            self._store(state)

    async def load_state(self, unit: str, *, details: bool = True) -> UnitState:
        (state,) = await self.load_states([unit], details=details)
        return state

    async def load_states(
        self, units: Sequence[str], *, lazy: Collection[str] = (), details: bool = True
    ) -> list[UnitState]:
        """The state of many units at the cost of one call plus three small Gets each.

        Deliberately not GetAll on the Unit interface: that makes the manager compute
        UnitFileState, which rescans every unit directory per unit (quadratic: ~3 s for
        1000 units). ListUnitsByNames loads the units and answers the states in one call.
        Without `details`, that call is all: load, active and sub state, no file paths.
        """
        if not units:
            return []
        eager = [u for u in units if u not in lazy]
        only_if_loaded = [u for u in units if u in lazy]
        rows: list[Any] = []
        if eager:
            (found,) = await self.call("ListUnitsByNames", "as", [eager])
            rows += found
        if only_if_loaded:
            (found,) = await self.call("ListUnitsByPatterns", "asas", [[], only_if_loaded])
            rows += found
        listed = {str(row[0]) for row in rows}
        unloaded = [
            UnitState(name=u, load_state=UNLOADED) for u in only_if_loaded if u not in listed
        ]
        states = []
        for name, _desc, load, active, sub, _following, path, *_job in rows:
            self._path_to_unit[str(path)] = str(name)
            states.append(
                UnitState(
                    name=str(name),
                    load_state=str(load),
                    active_state=str(active),
                    sub_state=str(sub),
                )
            )
        paths = {str(row[0]): str(row[6]) for row in rows}
        read = states
        if details:
            read = await asyncio.gather(*(self._details(s, paths[s.name]) for s in states))
        by_name = {s.name: s for s in [*read, *unloaded]}
        return [by_name[u] for u in units if u in by_name]

    async def _get(self, path: str, interface: str, prop: str) -> Any:
        (value,) = await self.call("Get", "ss", [interface, prop], path=path, interface=PROPS_IFACE)
        return _plain(value)

    async def _details(self, state: UnitState, path: str) -> UnitState:
        fragment, dropins, need_reload = await asyncio.gather(
            self._get(path, UNIT_IFACE, "FragmentPath"),
            self._get(path, UNIT_IFACE, "DropInPaths"),
            self._get(path, UNIT_IFACE, "NeedDaemonReload"),
        )
        state = replace(
            state,
            fragment_path=str(fragment),
            drop_in_paths=tuple(str(p) for p in dropins),
            need_daemon_reload=bool(need_reload),
        )
        if state.load_state != "loaded":
            name, text = await self._get(path, UNIT_IFACE, "LoadError")
            return replace(state, load_error=f"{text} ({name})" if text else str(name))
        if state.active_state == "failed" and state.name.endswith(".service"):
            with contextlib.suppress(SystemdError):
                state = replace(state, result=str(await self._get(path, SERVICE_IFACE, "Result")))
        return state

    async def service_properties(
        self, unit: str, names: Sequence[str], *, interface: str = SERVICE_IFACE
    ) -> dict[str, Any]:
        """Selected properties of a service (Result, ExecMainStatus, ExecStart, ...), or of
        another of the unit's interfaces: one Get each on the unit's object path (the manager
        loads the unit if it has to), in parallel; a GetAll would marshal the whole interface
        for two values."""
        path = unit_object_path(unit)
        values = await asyncio.gather(*(self._get(path, interface, n) for n in names))
        return dict(zip(names, values, strict=True))

    def _store(self, state: UnitState) -> None:
        if self._watched.get(state.name) != state and state.name in self._watched:
            self._watched[state.name] = state
            self._emit("unit", UnitChange(state.name, state))

    def _emit(self, kind: str, payload: Any) -> None:
        for listener in list(self._listeners):
            listener(kind, payload)

    def _refresh_soon(self, units: Iterable[str] | None) -> None:
        """Coalesce refresh requests: one task at a time, the union of what was asked."""
        if units is None or self._pending_refresh is None:
            self._pending_refresh = None
        else:
            self._pending_refresh.update(units)
        if self._refresh_task is not None and not self._refresh_task.done():
            return

        async def run() -> None:
            while True:
                pending, self._pending_refresh = self._pending_refresh, set()
                if pending is not None and not pending:
                    return
                with contextlib.suppress(ManagerUnavailableError, SystemdError):
                    await self.refresh(pending)

        self._refresh_task = asyncio.get_running_loop().create_task(run())

    # -- signals ----------------------------------------------------------------------

    def _on_message(self, msg: Message) -> bool | None:
        if msg.message_type != MessageType.SIGNAL:
            return None
        member = msg.member
        if msg.interface == PROPS_IFACE and member == "PropertiesChanged":
            self._on_properties_changed(msg)
        elif msg.interface == MANAGER_IFACE:
            self._on_manager_signal(member or "", msg.body)
        elif member == "NameOwnerChanged" and msg.body and msg.body[0] == SYSTEMD:
            old_owner, new_owner = msg.body[1], msg.body[2]
            if old_owner:
                # The manager we subscribed to is gone. A re-executing manager often hands
                # its name straight to its new connection (old -> new, never ""): that is
                # a new manager too, with none of our state, so report it as gone first.
                self.available = False
                self._emit("owner", False)
            if new_owner:
                # Not available yet: that takes `subscribe` on the new connection.
                self._emit("owner", True)
        return None

    def _on_properties_changed(self, msg: Message) -> None:
        unit = self._path_to_unit.get(msg.path or "")
        if unit is None or unit not in self._watched:
            return
        iface, changed, invalidated = msg.body
        fields = _UNIT_FIELDS if iface == UNIT_IFACE else _SERVICE_FIELDS
        if iface not in (UNIT_IFACE, SERVICE_IFACE):
            return
        self._store(_state_from_props(self._watched[unit], changed, fields))
        if any(name in fields for name in invalidated):
            self._refresh_soon([unit])

    def _on_manager_signal(self, member: str, body: list[Any]) -> None:
        if member == "JobRemoved":
            _id, job, unit, result = body
            outcome = JobOutcome(unit=str(unit), job=str(job), result=str(result))
            self._recent_jobs[outcome.job] = outcome
            while len(self._recent_jobs) > _RECENT_JOBS:
                self._recent_jobs.popitem(last=False)
            fut = self._job_waiters.pop(outcome.job, None)
            if fut is not None and not fut.done():
                fut.set_result(outcome)
            self._emit("job", outcome)
        elif member == "Reloading":
            self.reloading = bool(body[0])
            self._generation += 1
            if not self.reloading:
                self._refresh_soon(None)
                self._emit("reloaded", None)
        elif member == "UnitFilesChanged":
            self._emit("unit-files", None)
        elif member == "UnitNew":
            # Not a state change: LoadUnit and garbage collection emit these all the time,
            # except for a lazy unit, whose state we only read while it is loaded.
            name, path = str(body[0]), str(body[1])
            if name in self._watched:
                self._path_to_unit[path] = name
                if name in self._lazy and not self.reloading:
                    self._refresh_soon([name])
        elif member == "UnitRemoved":
            name = str(body[0])
            if name in self._lazy and name in self._watched and not self.reloading:
                self._store(UnitState(name=name, load_state=UNLOADED))

    def fail_pending_jobs(self) -> None:
        """The connection is gone: nobody will see JobRemoved for these jobs any more."""
        for job, fut in self._job_waiters.items():
            if not fut.done():
                fut.set_result(JobOutcome(unit="", job=job, result="manager-unavailable"))
        self._job_waiters.clear()
        if self._refresh_task is not None:
            self._refresh_task.cancel()


def _plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _state_from_props(base: UnitState, props: dict[str, Any], fields: dict[str, str]) -> UnitState:
    updates: dict[str, Any] = {}
    for prop, field in fields.items():
        if prop in props:
            value = _plain(props[prop])
            if field == "drop_in_paths":
                value = tuple(str(v) for v in value)
            elif field == "need_daemon_reload":
                value = bool(value)
            else:
                value = str(value)
            updates[field] = value
    return replace(base, **updates) if updates else base
