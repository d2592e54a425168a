"""Where the user bus is: $DBUS_SESSION_BUS_ADDRESS, else $XDG_RUNTIME_DIR/bus (as sd-bus does).

Units of a user manager do not always get DBUS_SESSION_BUS_ADDRESS, so both the daemon
and the CLI fall back the way systemd's own tools do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["user_bus_address"]


def user_bus_address(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    address = env.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return address
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return f"unix:path={runtime}/bus"
