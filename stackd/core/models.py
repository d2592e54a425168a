"""Typed, frozen models of desired and observed state. No I/O here: adapters build these."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path

__all__ = [
    "STACK_NAME_PATTERN",
    "UNLOADED",
    "Config",
    "DaemonConfig",
    "Finding",
    "FindingKind",
    "FindingSource",
    "HealMode",
    "StackSpec",
    "UnitState",
    "UpdateConfig",
    "stack_name_problem",
]

STACK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
UPDATE_SUFFIX = "-update"
RESERVED_NAMES = frozenset({"stackd"})

# Not a systemd load state: the manager holds no definition of the unit right now (it was
# garbage-collected); the files on disk are what it would load next.
UNLOADED = "unloaded"


def stack_name_problem(name: str) -> str | None:
    """Why `name` cannot be a stack name, or None when it can."""
    if not STACK_NAME_PATTERN.fullmatch(name):
        return (
            f"stack name {name!r} is not allowed: use 1-63 ASCII letters, digits, '_', '.' "
            "or '-', starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        return (
            f"stack name {name!r} is reserved: {name}.service is stackd's own unit; "
            "choose another name"
        )
    if name.endswith(UPDATE_SUFFIX):
        return (
            f"stack name {name!r} ends in '{UPDATE_SUFFIX}', which would collide with the "
            f"update unit of stack {name[: -len(UPDATE_SUFFIX)]!r}: choose another name"
        )
    return None


class HealMode(StrEnum):
    REPORT = "report"
    REPAIR = "repair"


@dataclass(frozen=True, slots=True)
class StackSpec:
    """One configured stack: what its units must say."""

    name: str
    directory: Path
    compose_files: tuple[str, ...] = ()
    env_files: tuple[Path, ...] = ()
    legacy_env_files: tuple[Path, ...] = ()
    startup_timeout_s: float | None = None  # None: the daemon's default
    update: bool = True
    managed: bool = True

    @property
    def unit(self) -> str:
        return f"{self.name}.service"

    @property
    def update_unit(self) -> str:
        return f"{self.name}{UPDATE_SUFFIX}.service"


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    unit_dir: Path
    compose_command: tuple[str, ...] = ("podman", "compose")
    startup_timeout_s: float = 120.0
    allowed_dropin_dirs: tuple[Path, ...] = ()
    heal: HealMode = HealMode.REPORT
    # Which engine to ask about containers; None: the one the compose command names.
    engine: str | None = None


@dataclass(frozen=True, slots=True)
class UpdateConfig:
    schedule: str = "daily"
    randomized_delay_s: float = 0.0
    concurrency: int = 2
    timeout_s: float = 1800.0
    persistent: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration; `source` is the file it came from (None: built-in)."""

    daemon: DaemonConfig
    updates: UpdateConfig = field(default_factory=UpdateConfig)
    stacks: tuple[StackSpec, ...] = ()
    source: Path | None = None

    def stack(self, name: str) -> StackSpec | None:
        return next((s for s in self.stacks if s.name == name), None)

    def startup_timeout_of(self, stack: StackSpec) -> float:
        if stack.startup_timeout_s is not None:
            return stack.startup_timeout_s
        return self.daemon.startup_timeout_s


class FindingKind(StrEnum):
    SHADOWED = "shadowed"
    FOREIGN_FRAGMENT = "foreign-fragment"
    FOREIGN_DROPIN = "foreign-dropin"
    MASKED = "masked"
    STALE = "stale"
    DRIFT = "drift"
    NOT_LOADED = "not-loaded"
    MANAGER_UNAVAILABLE = "manager-unavailable"
    CONFIG = "config"


class FindingSource(StrEnum):
    """Where a finding was seen: the files on disk, or the manager's loaded state."""

    DISK = "disk"
    MANAGER = "manager"


@dataclass(frozen=True, slots=True)
class Finding:
    """One broken ownership invariant. `since` is kept across re-evaluations by the daemon."""

    kind: FindingKind
    unit: str  # "" for global findings
    paths: tuple[str, ...] = ()
    stack: str | None = None
    source: FindingSource = FindingSource.MANAGER
    detail: str = ""

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        """Identity of a finding: the same key means the same condition, still present."""
        return (self.kind.value, self.unit, self.paths)


@dataclass(frozen=True, slots=True)
class UnitState:
    """The manager's view of one unit, as read over D-Bus."""

    name: str
    load_state: str = "stub"
    active_state: str = "inactive"
    sub_state: str = "dead"
    fragment_path: str = ""
    drop_in_paths: tuple[str, ...] = ()
    need_daemon_reload: bool = False
    result: str = ""
    load_error: str = ""


@dataclass(frozen=True, slots=True)
class TimedFinding:
    finding: Finding
    since: datetime
