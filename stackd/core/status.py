"""The `status --json` document (schema version 1, DESIGN section 6), built from plain state."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from stackd.core.models import Config, Finding, TimedFinding, UnitState

__all__ = ["STATUS_VERSION", "DaemonInfo", "build_status", "finding_to_json", "iso"]

STATUS_VERSION = 1


@dataclass(frozen=True, slots=True)
class DaemonInfo:
    pid: int
    started_at: datetime
    config: str
    unit_dir: str
    manager_connected: bool
    config_error: str | None = None


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


def finding_to_json(finding: Finding, since: datetime) -> dict[str, Any]:
    return {
        "kind": finding.kind.value,
        "unit": finding.unit,
        "stack": finding.stack,
        "paths": list(finding.paths),
        "since": iso(since),
        "source": finding.source.value,
        "detail": finding.detail,
    }


def build_status(
    *,
    daemon: DaemonInfo,
    config: Config,
    units: Mapping[str, UnitState],
    findings: Sequence[TimedFinding],
    only: Iterable[str] = (),
    last_updates: Mapping[str, dict[str, Any]] | None = None,
    next_update: Mapping[str, datetime | None] | None = None,
    next_run: datetime | None = None,
    last_run: dict[str, Any] | None = None,
    update_running: str | None = None,
    state_error: str | None = None,
) -> dict[str, Any]:
    """Every field a script may rely on; `only` narrows the stacks (and their findings)."""
    wanted = set(only)
    last_updates = last_updates or {}
    next_update = next_update or {}
    # Each finding converted once, grouped by stack (in the order given).
    converted = [(tf.finding.stack, finding_to_json(tf.finding, tf.since)) for tf in findings]
    by_stack: dict[str | None, list[dict[str, Any]]] = {}
    for name, entry in converted:
        by_stack.setdefault(name, []).append(entry)
    stacks = []
    for stack in config.stacks:
        if wanted and stack.name not in wanted:
            continue
        state = units.get(stack.unit, UnitState(name=stack.unit))
        stacks.append(
            {
                "name": stack.name,
                "unit": stack.unit,
                "update_unit": stack.update_unit,
                "managed": stack.managed,
                "load_state": state.load_state,
                "active_state": state.active_state,
                "sub_state": state.sub_state,
                "result": state.result,
                "fragment_path": state.fragment_path,
                "drop_in_paths": list(state.drop_in_paths),
                "need_daemon_reload": state.need_daemon_reload,
                "findings": list(by_stack.get(stack.name, ())),
                "last_update": last_updates.get(stack.name),
                "next_update": iso(next_update.get(stack.name)),
            }
        )
    every = [entry for name, entry in converted if not wanted or name is None or name in wanted]
    return {
        "version": STATUS_VERSION,
        "daemon": {
            "pid": daemon.pid,
            "started_at": iso(daemon.started_at),
            "config": daemon.config,
            "unit_dir": daemon.unit_dir,
            "manager": "connected" if daemon.manager_connected else "unavailable",
            "config_error": daemon.config_error,
            "state_error": state_error,
        },
        "stacks": stacks,
        "findings": every,
        "updates": {
            "schedule": config.updates.schedule,
            "next_run": iso(next_run),
            "running": update_running,
            "last_run": last_run,
        },
    }
