"""sd_notify: what a service manager listening on NOTIFY_SOCKET receives."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stackd.adapters.notify import Notifier


class Listener:
    """A datagram socket standing in for the manager's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def receive(self) -> bytes:
        return self.sock.recv(4096)


@pytest.fixture
def listener() -> Iterator[tuple[Listener, Notifier]]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="stackd-n-") as d:
        path = str(Path(d) / "notify")
        fake = Listener(path)
        notifier = Notifier({"NOTIFY_SOCKET": path})
        yield fake, notifier
        notifier.close()
        fake.sock.close()


class TestMessages:
    """Each method sends the assignments systemd expects, as one datagram."""

    def test_ready_with_status(self, listener: tuple[Listener, Notifier]) -> None:
        fake, notifier = listener
        assert notifier.ready("watching 3 stacks")
        assert fake.receive() == b"READY=1\nSTATUS=watching 3 stacks"

    def test_ready_without_status(self, listener: tuple[Listener, Notifier]) -> None:
        fake, notifier = listener
        assert notifier.ready()
        assert fake.receive() == b"READY=1"

    def test_status_newlines_cannot_inject_assignments(
        self, listener: tuple[Listener, Notifier]
    ) -> None:
        fake, notifier = listener
        assert notifier.status("updating web\nREADY=1")
        assert fake.receive() == b"STATUS=updating web READY=1"

    def test_stopping_and_watchdog(self, listener: tuple[Listener, Notifier]) -> None:
        fake, notifier = listener
        assert notifier.stopping()
        assert fake.receive() == b"STOPPING=1"
        assert notifier.watchdog()
        assert fake.receive() == b"WATCHDOG=1"

    def test_reloading_carries_current_monotonic_time(
        self, listener: tuple[Listener, Notifier]
    ) -> None:
        fake, notifier = listener
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reloading, stamp = fake.receive().decode().split("\n")
        assert reloading == "RELOADING=1"
        key, usec = stamp.split("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(usec) <= after

    def test_extend_timeout_in_microseconds(self, listener: tuple[Listener, Notifier]) -> None:
        fake, notifier = listener
        assert notifier.extend_timeout(1.5)
        assert fake.receive() == b"EXTEND_TIMEOUT_USEC=1500000"


class TestAddresses:
    """NOTIFY_SOCKET is a path or an abstract `@name`; anything else disables notifications."""

    def test_abstract_namespace_socket(self) -> None:
        name = f"stackd-test-{uuid.uuid4().hex}"
        fake = Listener("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        try:
            assert notifier.enabled
            assert notifier.ready("up")
            assert fake.receive() == b"READY=1\nSTATUS=up"
        finally:
            notifier.close()
            fake.sock.close()

    @pytest.mark.parametrize("value", ["", "@", "vsock:2:1234", "relative/path"])
    def test_unusable_socket_is_a_no_op(self, value: str) -> None:
        notifier = Notifier({"NOTIFY_SOCKET": value} if value else {})
        assert not notifier.enabled
        assert not notifier.ready("up")
        assert not notifier.status("x")
        assert not notifier.stopping()
        assert not notifier.watchdog()
        assert not notifier.reloading()

    def test_vanished_listener_returns_false_without_raising(self) -> None:
        with tempfile.TemporaryDirectory(prefix="stackd-n-") as d:
            notifier = Notifier({"NOTIFY_SOCKET": str(Path(d) / "gone")})
            assert notifier.enabled
            assert not notifier.ready("up")
            notifier.close()


class TestEnvironment:
    """The variables are read once; unset_environment keeps them from child processes."""

    def test_unset_environment_removes_the_variables(self) -> None:
        env = {
            "NOTIFY_SOCKET": "/run/user/1000/systemd/notify",
            "WATCHDOG_USEC": "10000000",
            "WATCHDOG_PID": str(os.getpid()),
            "HOME": "/home/u",
        }
        notifier = Notifier(env, unset_environment=True)
        assert env == {"HOME": "/home/u"}
        assert notifier.address == "/run/user/1000/systemd/notify"
        assert notifier.watchdog_interval() == 5.0

    def test_variables_stay_by_default(self) -> None:
        env = {"NOTIFY_SOCKET": "/run/n"}
        notifier = Notifier.from_environ(env)
        assert env == {"NOTIFY_SOCKET": "/run/n"}
        assert notifier.address == "/run/n"


OTHER_PID = str(os.getpid() + 1)


class TestWatchdogInterval:
    """Half of WATCHDOG_USEC, in seconds, only when the watchdog is meant for this process."""

    @pytest.mark.parametrize(
        ("usec", "pid", "expected"),
        [
            ("5000000", None, 2.5),
            ("5000000", str(os.getpid()), 2.5),
            ("300", None, 0.00015),
            ("5000000", OTHER_PID, None),
            ("5000000", "not-a-pid", None),
            ("0", None, None),
            ("-5", None, None),
            ("10s", None, None),
            ("", None, None),
            (None, None, None),
        ],
    )
    def test_interval(self, usec: str | None, pid: str | None, expected: float | None) -> None:
        env = {}
        if usec is not None:
            env["WATCHDOG_USEC"] = usec
        if pid is not None:
            env["WATCHDOG_PID"] = pid
        assert Notifier(env).watchdog_interval() == expected
