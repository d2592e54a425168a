"""Commands that work without the daemon: `check --offline` and `render`.

`check --offline` talks to the user manager directly, so it can serve as the post-switch
ownership assertion of a Home Manager activation, before or without a running daemon.
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stackd.adapters.bus import connect_user_bus
from stackd.busaddr import user_bus_address
from stackd.configcache import load_config_cached
from stackd.core.models import Finding, FindingKind, FindingSource
from stackd.core.status import finding_to_json
from stackd.errors import ManagerUnavailableError
from stackd.verify import compute_findings, desired_units, lazy_units, watched_units

__all__ = ["offline_check", "render_command"]


async def _check(config_path: Path | None, environ: Mapping[str, str]) -> list[Finding]:
    from stackd.adapters.systemd import SystemdManager

    config = load_config_cached(config_path, environ)
    # Rendering reads every compose file: let it run while the manager is asked.
    rendering = asyncio.ensure_future(asyncio.to_thread(desired_units, config))
    try:
        bus = await connect_user_bus(user_bus_address(environ))
    except (OSError, EOFError, ValueError) as exc:
        rendering.cancel()
        raise ManagerUnavailableError(str(exc)) from exc
    try:
        # No Subscribe and no signal matches: a one-shot reader follows no changes, and a
        # subscriber only makes the manager signal UnitNew/UnitRemoved for every unit loaded.
        manager = SystemdManager(bus, max_in_flight=128)
        await manager.watch(watched_units(config), lazy=lazy_units(config))
        search_path = await manager.unit_path()
        desired = await rendering
        return compute_findings(config, desired, search_path, manager.units, True)
    finally:
        bus.disconnect()


def offline_check(config_path: Path | None, environ: Mapping[str, str]) -> dict[str, Any]:
    now = datetime.now(UTC)
    try:
        findings = asyncio.run(_check(config_path, environ))
    except ManagerUnavailableError as exc:
        findings = [
            Finding(
                kind=FindingKind.MANAGER_UNAVAILABLE,
                unit="",
                source=FindingSource.MANAGER,
                detail=f"the systemd user manager cannot be reached ({exc}); is "
                "`systemctl --user status` working for this user? (lingering: "
                "`loginctl enable-linger`)",
            )
        ]
    return {"version": 1, "findings": [finding_to_json(f, now) for f in findings]}


def render_command(config_path: Path | None, environ: Mapping[str, str], *, diff: bool) -> str:
    config = load_config_cached(config_path, environ)
    desired = desired_units(config)
    out: list[str] = []
    for name, problems in desired.broken.items():
        for path, reason in problems:
            out.append(f"# stack {name} not rendered: {path}: {reason}\n")
    for name in sorted(desired.texts):
        text = desired.texts[name]
        unit_path = config.daemon.unit_dir / name
        if not diff:
            out.append(f"# {unit_path}\n{text}\n")
            continue
        try:
            current = unit_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = ""
        out.extend(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=str(unit_path) if current else "/dev/null",
                tofile=str(unit_path),
            )
        )
    return "".join(out)
