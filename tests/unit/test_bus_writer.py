"""The daemon's bus connection survives a full socket buffer.

dbus-fast's writer sends eagerly and drops the whole connection when `send` raises EAGAIN;
stackd's connection hands it a socket that reports "0 bytes written" instead, so the writer
waits for the socket to drain like after any short write. Driven here at the writer itself,
over a socketpair whose buffer is full, so the situation is exact rather than timing-bound.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from dbus_fast import Message
from dbus_fast.aio.message_bus import _MessageWriter

from stackd.adapters.bus import _PatientSocket


class _FakeBus:
    """What _MessageWriter reads of its bus; `_finalize` records a dropped connection."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._negotiate_unix_fd = False
        self._sock = sock
        self._loop = loop
        self._fd = sock.fileno()
        self.unique_name = ":1.1"
        self._user_disconnect = False
        self.dropped: BaseException | None = None

    def _finalize(self, err: BaseException | None = None) -> None:
        self.dropped = err


def _full_pair() -> tuple[socket.socket, socket.socket, int]:
    """A socketpair whose sending side is full; also how many filler bytes are queued."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    filler = 0
    try:
        while True:
            filler += ours.send(b"\0" * 4096)
    except BlockingIOError:
        pass
    return ours, peer, filler


def _messages() -> list[Message]:
    return [
        Message.new_signal("/io/stackd/Daemon1", "io.stackd.Daemon1", "Big", "s", ["x" * 100_000])
        for _ in range(3)
    ]


def _drain(peer: socket.socket, want: int) -> int:
    peer.settimeout(10)
    got = 0
    while got < want:
        chunk = peer.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    return got


async def _write_all(patient: bool) -> tuple[_FakeBus, int, int]:
    ours, peer, backlog = _full_pair()
    with ours, peer:
        loop = asyncio.get_running_loop()
        bus = _FakeBus(ours, loop)
        writer: Any = _MessageWriter(bus)  # type: ignore[arg-type]
        if patient:
            writer.sock = _PatientSocket(ours)
        messages = _messages()
        size = sum(len(m._marshall(False)) for m in messages)
        drained = asyncio.ensure_future(asyncio.to_thread(_drain, peer, size + backlog))
        for msg in messages:
            writer.schedule_write(msg)
        got = 0 if bus.dropped else await asyncio.wait_for(drained, 20)
        loop.remove_writer(bus._fd)
        if not drained.done():
            ours.shutdown(socket.SHUT_RDWR)  # ends the drain thread's recv
            await drained
        return bus, size + backlog, got


async def test_patient_socket_keeps_the_connection_and_delivers_everything() -> None:
    bus, size, got = await _write_all(patient=True)
    assert bus.dropped is None
    assert got >= size


async def test_plain_socket_is_what_drops_the_connection() -> None:
    """The condition the workaround exists for: without it, dbus-fast gives up."""
    bus, _size, _got = await _write_all(patient=False)
    assert isinstance(bus.dropped, BlockingIOError)
