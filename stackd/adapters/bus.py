"""Connecting to the user bus with dbus-fast, hardened against a full socket buffer.

dbus-fast's asyncio writer sends eagerly when its queue looks empty, even while a
partly written message still waits for the socket to drain; `send` then raises EAGAIN and
the writer drops the whole connection. With large replies (a 500-stack status document is
~200 KB, the socket buffer ~208 KB) this took the daemon off the bus. The writer already
handles a short write by waiting until the socket is writable, so the socket it writes to
reports "nothing written" instead of raising: the same wait, no lost connection.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

from dbus_fast.aio import MessageBus

__all__ = ["connect_user_bus"]


class _PatientSocket:
    """A socket whose send/sendmsg answer 0 bytes written instead of raising EAGAIN."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return self._sock.send(data, flags)
        except BlockingIOError:
            return 0

    def sendmsg(self, buffers: Iterable[Any], ancdata: Any = (), *args: Any) -> int:
        try:
            return self._sock.sendmsg(buffers, ancdata, *args)
        except BlockingIOError:
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


async def connect_user_bus(address: str) -> MessageBus:
    """A connected MessageBus whose writer survives a full socket buffer."""
    bus = await MessageBus(bus_address=address).connect()
    writer = getattr(bus, "_writer", None)
    if writer is not None and hasattr(writer, "sock"):
        writer.sock = _PatientSocket(writer.sock)
    return bus
