"""The one exception hierarchy: expected outcomes are data, broken invariants raise these."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DaemonUnavailableError",
    "ManagerUnavailableError",
    "StackdError",
    "UsageError",
]


class StackdError(Exception):
    """Base of every error stackd raises on purpose; `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(StackdError):
    exit_code = 2


class ConfigError(StackdError):
    """A config that does not validate: names the file, the key path and the reason."""

    exit_code = 2

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class ManagerUnavailableError(StackdError):
    """The systemd user manager cannot be reached over D-Bus."""

    exit_code = 3


class DaemonUnavailableError(StackdError):
    """The stackd daemon is not on the user bus."""

    exit_code = 3
