"""The CLI's blocking D-Bus client of the daemon (jeepney: ~25 ms to import, no asyncio).

Every answer of the daemon is one JSON string, so the client needs no introspection and
no event loop; `stackd status` stays a short-lived, light process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jeepney import DBusAddress, MatchRule, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.wrappers import DBusErrorResponse

from stackd.busaddr import user_bus_address
from stackd.errors import DaemonUnavailableError, StackdError

__all__ = ["DaemonClient", "DaemonError"]

BUS_NAME = "io.stackd.Daemon1"
OBJECT_PATH = "/io/stackd/Daemon1"
INTERFACE = "io.stackd.Daemon1"

HOW_TO_START = (
    "start it with `systemctl --user start stackd` (installed by `stackd setup`), "
    "or run `stackd daemon` in a terminal"
)
# Errors that mean "nobody (or nobody ready) answers as the daemon": exit 3, never 1.
_NOT_RUNNING = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownMethod",
)


class DaemonError(StackdError):
    """The daemon answered with an error (refused, invalid arguments, failed)."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        super().__init__(text)
        self.exit_code = 2 if name.endswith(("InvalidArgs", "AccessDenied")) else 1


class DaemonClient:
    def __init__(self, timeout: float = 30.0) -> None:
        self._timeout = timeout
        address = user_bus_address()
        try:
            self._conn: DBusConnection = open_dbus_connection(address)
        except (OSError, ValueError) as exc:
            raise DaemonUnavailableError(
                f"cannot reach the user bus at {address} ({exc}), so the stackd daemon cannot "
                f"be asked. Is the systemd user manager running? Then {HOW_TO_START}"
            ) from exc
        self._daemon = DBusAddress(OBJECT_PATH, bus_name=BUS_NAME, interface=INTERFACE)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def call(self, method: str, signature: str | None = None, *args: Any) -> Any:
        """Call one daemon method and decode its JSON answer."""
        return json.loads(self.call_text(method, signature, *args))

    def call_text(self, method: str, signature: str | None = None, *args: Any) -> str:
        """Call one daemon method; its answer as the JSON text the daemon sent."""
        msg = new_method_call(self._daemon, method, signature, args)
        reply = self._conn.send_and_get_reply(msg, timeout=self._timeout)
        if reply.header.message_type == MessageType.error:
            name = str(reply.header.fields.get(4, "") or "")  # HeaderFields.error_name
            text = str(reply.body[0]) if reply.body else name
            if name in _NOT_RUNNING:
                raise DaemonUnavailableError(f"the stackd daemon is not running: {HOW_TO_START}")
            raise DaemonError(name, text)
        return str(reply.body[0])

    @contextmanager
    def signals(self, *members: str) -> Iterator[Any]:
        """Subscribe to daemon signals before acting, so no signal is missed."""
        rule = MatchRule(type="signal", interface=INTERFACE, path=OBJECT_PATH)
        with self._conn.filter(rule, bufsize=10_000) as queue:
            try:
                self._conn.send_and_get_reply(message_bus.AddMatch(rule), timeout=self._timeout)
            except DBusErrorResponse as exc:
                raise DaemonError("AddMatch", str(exc)) from exc
            yield _SignalReader(self._conn, queue, set(members))


class _SignalReader:
    def __init__(self, conn: DBusConnection, queue: Any, members: set[str]) -> None:
        self._conn = conn
        self._queue = queue
        self._members = members

    def next(self, timeout: float | None) -> tuple[str, Any]:
        while True:
            msg = self._conn.recv_until_filtered(self._queue, timeout=timeout)
            member = str(msg.header.fields.get(3, ""))  # HeaderFields.member
            if not self._members or member in self._members:
                return member, json.loads(msg.body[0])
