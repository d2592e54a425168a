"""The daemon's D-Bus interface `io.stackd.Daemon1`: a view of daemon state, no logic.

Written against dbus-fast's message level (not ServiceInterface) because mutating methods
must know who is calling: they answer only callers with the daemon's own uid, which needs
the message's sender.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from stackd.errors import StackdError, UsageError

__all__ = [
    "BUS_NAME",
    "INTERFACE",
    "OBJECT_PATH",
    "DaemonApi",
    "DaemonBackend",
]

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


# Answers up to this size to read-only calls go out at once, from the message handler: no
# task, no slot (a burst of 1000 GetStatus([name]) calls costs what the bus costs). Bigger
# ones wait for one of `max_in_flight` slots, and a slot is held until the reply is written to
# the socket, so the bytes queued on the connection stay bounded (64 x the largest answer).
INLINE_REPLY_MAX = 16 * 1024


@dataclass(frozen=True, slots=True)
class _Method:
    signature: str
    mutating: bool
    handler: Callable[[list[Any]], Awaitable[str]] | None = None
    now: Callable[[list[Any]], str] | None = None  # read-only and cheap: answered in place


class DaemonApi:
    """Answers method calls on OBJECT_PATH and emits the daemon's signals."""

    def __init__(self, bus: MessageBus, backend: DaemonBackend, *, max_in_flight: int = 64):
        self._bus = bus
        self._backend = backend
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._uid = os.getuid()
        self._methods: dict[str, _Method] = {
            "GetStatus": _Method("as", False, now=self._get_status),
            "Check": _Method("", False, self._check),
            "Update": _Method("as", True, self._update),
            "GetHistory": _Method("u", False, now=self._history),
            "Reload": _Method("", True, self._reload),
        }
        bus.add_message_handler(self._on_message)

    def _get_status(self, args: list[Any]) -> str:
        return self._backend.status_json(args[0])  # the signature (as) was checked

    async def _check(self, _args: list[Any]) -> str:
        return await self._backend.check_json()

    async def _update(self, args: list[Any]) -> str:
        return await self._backend.start_update([str(s) for s in args[0]])

    def _history(self, args: list[Any]) -> str:
        return self._backend.history_json(int(args[0]))

    async def _reload(self, _args: list[Any]) -> str:
        return await self._backend.reload_json()

    @property
    def in_flight(self) -> int:
        """Calls accepted and not yet answered (waiting for a slot, running or sending)."""
        return len(self._tasks)

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
        method = self._methods.get(msg.member or "")
        if msg.interface not in (INTERFACE, None) or method is None:
            return self._other_call(msg)
        if msg.signature != method.signature:
            return Message.new_error(
                msg,
                "org.freedesktop.DBus.Error.InvalidArgs",
                f"{msg.member} takes ({method.signature}), got ({msg.signature})",
            )
        if method.now is not None:
            return self._answer_now(msg, method.now)
        self._spawn(self._answer(msg, method))
        return True

    def _answer_now(self, msg: Message, now: Callable[[list[Any]], str]) -> Message | bool:
        """A read-only call: computed at once; a small answer is the reply dbus-fast sends."""
        try:
            text = now(list(msg.body))
        except Exception as exc:  # every failure becomes a named error, no traceback
            return _error_reply(msg, exc)
        if len(text) <= INLINE_REPLY_MAX:
            return Message.new_method_return(msg, "s", [text])
        self._spawn(self._send_bounded(msg, text))
        return True

    @staticmethod
    def _other_call(msg: Message) -> Message:
        """Introspect, Peer.Ping, or an unknown method."""
        if msg.interface == "org.freedesktop.DBus.Introspectable" and msg.member == "Introspect":
            return Message.new_method_return(msg, "s", [INTROSPECTION])
        if msg.interface == "org.freedesktop.DBus.Peer" and msg.member == "Ping":
            return Message.new_method_return(msg)
        return Message.new_error(
            msg,
            "org.freedesktop.DBus.Error.UnknownMethod",
            f"{msg.interface}.{msg.member} is not a method of {INTERFACE}",
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_bounded(self, msg: Message, text: str) -> None:
        """A big answer, already computed: marshalled and queued only once a slot is free."""
        async with self._slots:
            if self._bus.connected:
                await self._bus.send(Message.new_method_return(msg, "s", [text]))

    async def _answer(self, msg: Message, method: _Method) -> None:
        assert method.handler is not None
        async with self._slots:
            try:
                if method.mutating:
                    await self._require_own_uid(msg)
                text = await method.handler(list(msg.body))
                reply = Message.new_method_return(msg, "s", [text])
            except Exception as exc:  # every failure becomes a named error, no traceback
                reply = _error_reply(msg, exc)
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


def _error_reply(msg: Message, exc: Exception) -> Message:
    """The named D-Bus error for `exc`; never a traceback, never the text of an unexpected one."""
    if isinstance(exc, ApiError):
        return Message.new_error(msg, exc.name, str(exc))
    if isinstance(exc, UsageError):
        return Message.new_error(msg, f"{ERROR_PREFIX}.InvalidArgs", str(exc))
    if isinstance(exc, StackdError):
        return Message.new_error(msg, f"{ERROR_PREFIX}.Failed", str(exc))
    return Message.new_error(
        msg, f"{ERROR_PREFIX}.Internal", f"internal error: {type(exc).__name__}"
    )
