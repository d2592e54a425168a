"""sd_notify without libsystemd: state changes sent as datagrams to $NOTIFY_SOCKET.

Every method is a no-op returning False when the service manager gave us no socket, and
none raises: a lost notification is the manager's timeout to handle, not our crash.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Final

__all__ = ["Notifier"]

_ENV_KEYS: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str) -> str | None:
    """A socket address from NOTIFY_SOCKET: a path, or `@name` for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None  # vsock: and anything else: not supported


class Notifier:
    """Tells the service manager about our state (Type=notify / notify-reload, WatchdogSec=).

    `environ` defaults to `os.environ`. With `unset_environment=True` the NOTIFY_SOCKET and
    WATCHDOG_* variables are removed from it after reading, so that child processes (compose
    runs) cannot notify on our behalf.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        if unset_environment and isinstance(env, MutableMapping):
            for key in _ENV_KEYS:
                env.pop(key, None)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] | MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> Notifier:
        """The same as the constructor; reads as what it does at call sites."""
        return cls(environ, unset_environment=unset_environment)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str = "") -> bool:
        """READY=1, with a STATUS= line when `status` is given; also ends a reload."""
        lines = ["READY=1"]
        if status:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify(_status_line(text))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """RELOADING=1 with the MONOTONIC_USEC= stamp Type=notify-reload requires.

        Send `ready()` when the reload is done.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the start/stop timeout fires (EXTEND_TIMEOUT_USEC=)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between `watchdog()` pings: half of WATCHDOG_USEC, None when not asked for.

        WATCHDOG_PID, when set, must be our pid: otherwise the watchdog is another process's.
        """
        if self._watchdog_pid is not None:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec or "")
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def notify(self, *lines: str) -> bool:
        """Send `lines` as one notification; False when not sent."""
        if self.address is None:
            return False
        data = "\n".join(lines).encode("utf-8")
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                    self._sock.setblocking(False)
                sock = self._sock
            sock.sendto(data, self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.close()
                self._sock = None


def _status_line(text: str) -> str:
    # One notification line per assignment: a newline would start a new (bogus) assignment.
    return "STATUS=" + " ".join(text.splitlines())
