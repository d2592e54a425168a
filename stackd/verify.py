"""Verification as one function: what stackd would write, and the findings of the files
and the manager's loaded state against it. Shared by the daemon and `check --offline`, so it
keeps its imports light (no logging, no event loop).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from stackd.adapters.stackfiles import StackFiles, inspect_stack
from stackd.adapters.unitdirs import scan
from stackd.core.models import UNLOADED, Config, Finding, FindingKind, FindingSource, UnitState
from stackd.core.ownership import UnitExpectation, evaluate
from stackd.core.render import RenderInput, read_marker, render_stack_units

__all__ = [
    "DesiredUnits",
    "compute_findings",
    "config_findings",
    "desired_units",
    "expectations",
    "lazy_units",
    "watched_units",
]


@dataclass(frozen=True, slots=True)
class DesiredUnits:
    """What stackd would write, and the stacks that cannot be rendered (config findings)."""

    texts: dict[str, str] = field(default_factory=dict)
    files: dict[str, StackFiles] = field(default_factory=dict)
    broken: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)


def watched_units(config: Config) -> list[str]:
    """Every stack's unit and update unit, stack by stack: what the manager is asked about."""
    units: list[str] = []
    for stack in config.stacks:
        units += [stack.unit, stack.update_unit]
    return units


def lazy_units(config: Config) -> list[str]:
    """Update units: read only while the manager holds them (see SystemdManager.watch)."""
    return [stack.update_unit for stack in config.stacks]


def desired_units(config: Config) -> DesiredUnits:
    """Render every managed stack whose files are in order (reads compose files)."""
    out = DesiredUnits()
    for stack in config.stacks:
        files = inspect_stack(stack)
        out.files[stack.name] = files
        if files.problems:
            out.broken[stack.name] = files.problems
            continue
        if not stack.managed:
            continue
        out.texts.update(
            render_stack_units(
                RenderInput(
                    stack=stack,
                    compose_command=config.daemon.compose_command,
                    startup_timeout_s=config.startup_timeout_of(stack),
                    update_timeout_s=config.updates.timeout_s,
                    compose_digest=files.compose_digest,
                    env_files=files.env_files,
                )
            )
        )
    return out


def config_findings(config: Config, desired: DesiredUnits) -> list[Finding]:
    findings = []
    for name, problems in desired.broken.items():
        stack = config.stack(name)
        assert stack is not None
        for path, reason in problems:
            findings.append(
                Finding(
                    kind=FindingKind.CONFIG,
                    unit=stack.unit,
                    stack=name,
                    paths=(path,),
                    source=FindingSource.DISK,
                    detail=f"stack {name}: {path}: {reason}; the stack's units are left as "
                    "they are until this is fixed",
                )
            )
    return findings


def expectations(
    config: Config, desired: DesiredUnits, only: frozenset[str] | None = None
) -> dict[str, UnitExpectation]:
    """What each owned unit must look like; `only` limits it to those units (a live change)."""
    unit_dir = str(config.daemon.unit_dir)
    out: dict[str, UnitExpectation] = {}
    for stack in config.stacks:
        if stack.name in desired.broken:
            continue
        for unit in (stack.unit, stack.update_unit):
            if only is not None and unit not in only:
                continue
            if not stack.managed and unit == stack.update_unit:
                continue  # adopted stacks may have no update unit of their own
            out[unit] = UnitExpectation(
                unit=unit,
                stack=stack.name,
                expected_path=os.path.join(unit_dir, unit),
                expected_text=desired.texts.get(unit) if stack.managed else None,
            )
    return out


def compute_findings(
    config: Config,
    desired: DesiredUnits,
    search_path: Iterable[str],
    loaded: Mapping[str, UnitState],
    manager_available: bool,
    *,
    only: frozenset[str] | None = None,
) -> list[Finding]:
    """Scan the search path and evaluate ownership (runs in a worker thread).

    `only` limits the work to those units (a live change); None checks everything,
    including the global conditions.
    """
    units = expectations(config, desired, only)
    unit_dir = str(config.daemon.unit_dir)
    paths = list(search_path)
    disk = scan(paths, list(units), unit_dir)
    # The manager names drop-ins by their resolved directory: accept both spellings.
    allowed = [str(p) for p in config.daemon.allowed_dropin_dirs]
    allowed += [real for p in allowed if (real := os.path.realpath(p)) != os.path.normpath(p)]
    resolved = os.path.realpath(unit_dir)
    findings = evaluate(
        units=units,
        disk=disk,
        loaded={n: st for n, st in loaded.items() if st.load_state != UNLOADED},
        unit_dir=unit_dir,
        allowed_dropin_dirs=allowed,
        manager_available=manager_available,
        marker_of=read_marker,
        unit_dir_resolved=resolved if resolved != os.path.normpath(unit_dir) else None,
    )
    findings = [f for f in findings if f.kind is not FindingKind.MANAGER_UNAVAILABLE]
    if only is not None:
        return findings + [f for f in config_findings(config, desired) if f.unit in only]
    if paths and unit_dir not in paths:
        findings.append(
            Finding(
                kind=FindingKind.CONFIG,
                unit="",
                paths=(unit_dir,),
                source=FindingSource.MANAGER,
                detail=f"unit_dir {unit_dir} is not on the user manager's unit search path: "
                "units written there are never loaded; set daemon.unit_dir to "
                "~/.config/systemd/user",
            )
        )
    return findings + config_findings(config, desired)
