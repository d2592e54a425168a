"""The daemon's D-Bus interface `io.stackd.Daemon1`: a view of daemon state, no logic.

Written against dbus-fast's message level (not ServiceInterface) because mutating methods
must know who is calling: they answer only callers with the daemon's own uid, which needs
the message's sender.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from stackd.errors import StackdError, UsageError

__all__ = ["BUS_NAME", "INTERFACE", "OBJECT_PATH", "DaemonApi", "DaemonBackend"]

BUS_NAME = "io.stackd.Daemon1"
OBJECT_PATH = "/io/stackd/Daemon1"
INTERFACE = "io.stackd.Daemon1"
ERROR_PREFIX = "io.stackd.Error"

INTROSPECTION = f"""<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
 <interface name="{INTERFACE}">
  <method name="GetStatus"><arg name="stacks" type="as" direction="in"/>
   <arg name="status_json" type="s" direction="out"/></method>
  <method name="Check"><arg name="report_json" type="s" direction="out"/></method>
  <method name="Update"><arg name="stacks" type="as" direction="in"/>
   <arg name="run" type="s" direction="out"/></method>
  <method name="GetHistory"><arg name="limit" type="u" direction="in"/>
   <arg name="history_json" type="s" direction="out"/></method>
  <method name="Reload"><arg name="result_json" type="s" direction="out"/></method>
  <signal name="FindingRaised"><arg name="finding_json" type="s"/></signal>
  <signal name="FindingCleared"><arg name="finding_json" type="s"/></signal>
  <signal name="UpdateProgress"><arg name="progress_json" type="s"/></signal>
  <signal name="UpdateFinished"><arg name="summary_json" type="s"/></signal>
 </interface>
 <interface name="org.freedesktop.DBus.Introspectable">
  <method name="Introspect"><arg name="xml" type="s" direction="out"/></method>
 </interface>
 <interface name="org.freedesktop.DBus.Peer">
  <method name="Ping"/>
 </interface>
</node>
"""


class DaemonBackend(Protocol):
    """What the API asks of the daemon; every answer is JSON text."""

    def status_json(self, stacks: list[str]) -> str: ...
    async def check_json(self) -> str: ...
    async def start_update(self, stacks: list[str]) -> str: ...
    def history_json(self, limit: int) -> str: ...
    async def reload_json(self) -> str: ...


class ApiError(StackdError):
    """An expected refusal, sent to the caller as a named D-Bus error."""

    def __init__(self, name: str, text: str) -> None:
        self.name = f"{ERROR_PREFIX}.{name}"
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class _Method:
    signature: str
    mutating: bool
    handler: Callable[[list[Any]], Awaitable[str]]


class DaemonApi:
    """Answers method calls on OBJECT_PATH and emits the daemon's signals."""

    def __init__(self, bus: MessageBus, backend: DaemonBackend, *, max_in_flight: int = 64):
        self._bus = bus
        self._backend = backend
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._uid = os.getuid()
        self._methods: dict[str, _Method] = {
            "GetStatus": _Method("as", False, self._get_status),
            "Check": _Method("", False, self._check),
            "Update": _Method("as", True, self._update),
            "GetHistory": _Method("u", False, self._history),
            "Reload": _Method("", True, self._reload),
        }
        bus.add_message_handler(self._on_message)

    async def _get_status(self, args: list[Any]) -> str:
        return self._backend.status_json([str(s) for s in args[0]])

    async def _check(self, _args: list[Any]) -> str:
        return await self._backend.check_json()

    async def _update(self, args: list[Any]) -> str:
        return await self._backend.start_update([str(s) for s in args[0]])

    async def _history(self, args: list[Any]) -> str:
        return self._backend.history_json(int(args[0]))

    async def _reload(self, _args: list[Any]) -> str:
        return await self._backend.reload_json()

    def emit(self, signal: str, payload: dict[str, Any]) -> None:
        """Broadcast one of the interface's signals with a JSON payload."""
        if not self._bus.connected:
            return
        self._bus.send(
            Message.new_signal(OBJECT_PATH, INTERFACE, signal, "s", [json.dumps(payload)])
        )

    def _on_message(self, msg: Message) -> bool | Message | None:
        if msg.message_type != MessageType.METHOD_CALL or msg.path != OBJECT_PATH:
            return None
        if msg.interface == "org.freedesktop.DBus.Introspectable":
            return Message.new_method_return(msg, "s", [INTROSPECTION])
        if msg.interface == "org.freedesktop.DBus.Peer" and msg.member == "Ping":
            return Message.new_method_return(msg)
        method = self._methods.get(msg.member or "")
        if msg.interface not in (INTERFACE, None) or method is None:
            return Message.new_error(
                msg,
                "org.freedesktop.DBus.Error.UnknownMethod",
                f"{msg.interface}.{msg.member} is not a method of {INTERFACE}",
            )
        if msg.signature != method.signature:
            return Message.new_error(
                msg,
                "org.freedesktop.DBus.Error.InvalidArgs",
                f"{msg.member} takes ({method.signature}), got ({msg.signature})",
            )
        task = asyncio.get_running_loop().create_task(self._answer(msg, method))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _answer(self, msg: Message, method: _Method) -> None:
        async with self._slots:
            try:
                if method.mutating:
                    await self._require_own_uid(msg)
                text = await method.handler(list(msg.body))
                reply = Message.new_method_return(msg, "s", [text])
            except ApiError as exc:
                reply = Message.new_error(msg, exc.name, str(exc))
            except UsageError as exc:
                reply = Message.new_error(msg, f"{ERROR_PREFIX}.InvalidArgs", str(exc))
            except StackdError as exc:
                reply = Message.new_error(msg, f"{ERROR_PREFIX}.Failed", str(exc))
            except Exception as exc:  # never leak a traceback to a caller
                reply = Message.new_error(
                    msg, f"{ERROR_PREFIX}.Internal", f"internal error: {type(exc).__name__}"
                )
            if self._bus.connected:
                await self._bus.send(reply)

    async def _require_own_uid(self, msg: Message) -> None:
        query = Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="GetConnectionUnixUser",
            signature="s",
            body=[msg.sender],
        )
        reply = await self._bus.call(query)
        if reply is None or reply.message_type == MessageType.ERROR:
            raise ApiError("AccessDenied", "cannot tell who is calling; refused")
        uid = int(reply.body[0])
        if uid != self._uid:
            raise ApiError(
                "AccessDenied",
                f"{msg.member} changes the daemon and answers only uid {self._uid}; "
                f"the caller is uid {uid}",
            )
