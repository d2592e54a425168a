"""`stackd doctor`: what a rootless compose setup needs, checked one by one, each with its fix.

Every check is a small function returning a `Check`; none raises for an expected problem.
A check that depends on something missing (the user manager, a valid config) says so instead of
guessing. Statuses: ok, warn (works, but worth fixing), fail (exit 1), skip (cannot apply here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from stackd.core.models import Config
from stackd.errors import ConfigError, StackdError
from stackd.settings import load_config
from stackd.setup import UNIT_NAME, linger_state, systemctl, user_name

__all__ = ["Check", "Status", "engine_of", "run_doctor"]

_TIMEOUT = 30.0


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class _Context:
    """What earlier checks learned and later ones use."""

    user: str
    uid: int
    manager: bool = False
    unit_path: tuple[str, ...] = ()
    config: Config | None = None
    engine: str | None = None


def engine_of(compose_command: Sequence[str]) -> str | None:
    """The container engine a compose command drives: `podman compose`, `podman-compose` ->
    podman; `docker compose`, `docker-compose` -> docker; anything else: None (unknown)."""
    name = Path(compose_command[0]).name if compose_command else ""
    for engine in ("podman", "docker"):
        if name in {engine, f"{engine}-compose"}:
            return engine
    return None


def _run(argv: Sequence[str]) -> tuple[int, str]:
    """Exit code and the first line of output (stdout, else stderr); 127 when not runnable."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, check=False, timeout=_TIMEOUT
        )
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    except PermissionError:
        return 126, f"{argv[0]}: not executable"
    except subprocess.TimeoutExpired:
        return 124, f"no answer within {_TIMEOUT:.0f}s"
    lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
    return result.returncode, lines[0] if lines else ""


# -- the checks -----------------------------------------------------------------------------------


def check_manager(ctx: _Context) -> Check:
    probe = systemctl("show", "--property=Version", "--value", timeout=_TIMEOUT)
    if probe.returncode != 0:
        return Check(
            "user manager",
            Status.FAIL,
            f"cannot reach the systemd user manager: {probe.stderr.strip()}",
            "run stackd as the user who owns the stacks, in a login session (ssh/console or "
            "`machinectl shell USER@`; not `su`/`sudo -u`), with XDG_RUNTIME_DIR=/run/user/UID",
        )
    ctx.manager = True
    paths = systemctl("show", "--property=UnitPath", "--value", timeout=_TIMEOUT)
    ctx.unit_path = tuple(paths.stdout.split())
    return Check("user manager", Status.OK, f"reachable (systemd {probe.stdout.strip()})")


def check_linger(ctx: _Context) -> Check:
    fix = f"loginctl enable-linger {ctx.user}"
    state = linger_state(ctx.user)
    if state == "yes":
        return Check("lingering", Status.OK, "on: the user manager runs without a login")
    if state == "no":
        return Check(
            "lingering",
            Status.WARN,
            "off: stackd and the stacks stop when the last session of the user ends",
            fix,
        )
    return Check("lingering", Status.WARN, "cannot tell: logind did not answer", fix)


def check_config(ctx: _Context) -> Check:
    try:
        config = load_config()
    except ConfigError as exc:
        return Check("config", Status.FAIL, str(exc), f"edit {exc.file}, then `stackd reload`")
    ctx.config = config
    if config.source is None:
        return Check(
            "config",
            Status.WARN,
            "no config file: stackd runs with no stacks",
            "stackd init NAME --directory DIR",
        )
    return Check("config", Status.OK, f"{len(config.stacks)} stack(s) in {config.source}")


def check_compose(ctx: _Context) -> Check:
    if ctx.config is None:
        return Check("compose", Status.SKIP, "not checked: the config does not load")
    command = ctx.config.daemon.compose_command
    shown = " ".join(command)
    fix = (
        "install a compose provider (podman-compose, or docker with the compose plugin) or "
        "set [daemon] compose_command in the config"
    )
    if shutil.which(command[0]) is None:
        return Check("compose", Status.FAIL, f"{command[0]} not found on PATH", fix)
    code, line = _run([*command, "version"])
    if code != 0:
        return Check("compose", Status.FAIL, f"`{shown} version` exited {code}: {line}", fix)
    ctx.engine = engine_of(command)
    return Check("compose", Status.OK, f"{shown}: {line or 'answers'}")


def check_engine(ctx: _Context) -> Check:
    if ctx.config is None:
        return Check("engine", Status.SKIP, "not checked: the config does not load")
    command = ctx.config.daemon.compose_command
    engine = engine_of(command)
    if engine is None:
        return Check(
            "engine",
            Status.SKIP,
            f"not checked: cannot tell the engine behind {command[0]!r} "
            "(neither podman nor docker)",
        )
    fix = (
        f"install {engine} (Debian: apt install {'podman' if engine == 'podman' else 'docker.io'})"
    )
    if shutil.which(engine) is None:
        return Check("engine", Status.FAIL, f"{engine} not found on PATH", fix)
    code, line = _run([engine, "--version"])
    if code != 0:
        return Check("engine", Status.FAIL, f"`{engine} --version` exited {code}: {line}", fix)
    return Check("engine", Status.OK, line)


def check_unit_dir(ctx: _Context) -> Check:
    if ctx.config is None or not ctx.manager:
        return Check("unit_dir", Status.SKIP, "not checked: needs the config and the manager")
    unit_dir = ctx.config.daemon.unit_dir
    search = {os.path.realpath(p) for p in ctx.unit_path}
    if os.path.realpath(unit_dir) in search:
        return Check("unit_dir", Status.OK, f"{unit_dir} is on the manager's unit search path")
    return Check(
        "unit_dir",
        Status.FAIL,
        f"{unit_dir} is not on the manager's unit search path: it would never load the units",
        'set [daemon] unit_dir = "~/.config/systemd/user" (`systemctl --user show -p UnitPath` '
        "lists the directories it reads)",
    )


def _has_sub_id(path: Path, user: str, uid: int) -> bool | None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return False
    except OSError:
        return None
    return any(line.split(":", 1)[0] in {user, str(uid)} for line in lines if ":" in line)


def check_subids(ctx: _Context) -> Check:
    if ctx.uid == 0:
        return Check("subuid/subgid", Status.OK, "not needed: running as root")
    missing = [
        name
        for name in ("/etc/subuid", "/etc/subgid")
        if _has_sub_id(Path(name), ctx.user, ctx.uid) is False
    ]
    if not missing:
        return Check("subuid/subgid", Status.OK, f"{ctx.user} has subordinate id ranges")
    # Rootless podman needs them for any image with more than one uid; rootful docker does not.
    status = Status.FAIL if ctx.engine == "podman" else Status.WARN
    return Check(
        "subuid/subgid",
        status,
        f"no entry for {ctx.user} in {' and '.join(missing)}: rootless containers cannot map uids",
        f"sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {ctx.user}",
    )


def check_service(ctx: _Context) -> Check:
    if not ctx.manager:
        return Check("stackd.service", Status.SKIP, "not checked: needs the user manager")
    props = _unit_properties(UNIT_NAME, "LoadState", "UnitFileState", "ActiveState")
    if props.get("LoadState") != "loaded":
        return Check(
            "stackd.service",
            Status.FAIL,
            f"not installed (LoadState={props.get('LoadState') or '?'})",
            "stackd setup",
        )
    if props.get("UnitFileState") != "enabled":
        return Check(
            "stackd.service",
            Status.WARN,
            f"installed but {props.get('UnitFileState') or 'not enabled'}: it will not start "
            "with the user manager",
            "stackd setup (or systemctl --user enable stackd)",
        )
    return Check("stackd.service", Status.OK, f"enabled, {props.get('ActiveState')}")


def _unit_properties(unit: str, *names: str) -> dict[str, str]:
    result = systemctl("show", unit, *(f"--property={n}" for n in names), timeout=_TIMEOUT)
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def check_daemon(ctx: _Context) -> Check:
    from stackd.client import DaemonClient

    fix = "systemctl --user start stackd; if it fails: journalctl --user -u stackd -e"
    try:
        with DaemonClient(timeout=10.0) as client:
            doc = client.call("GetStatus", "as", [])
    except StackdError as exc:
        return Check("daemon", Status.FAIL, f"not answering on the bus: {exc}", fix)
    daemon = doc.get("daemon", {})
    if daemon.get("config_error"):
        return Check(
            "daemon",
            Status.WARN,
            f"answers (pid {daemon.get('pid')}), running on its last good config: "
            f"{daemon['config_error']}",
            "fix the config, then `stackd reload`",
        )
    if daemon.get("manager") != "connected":
        return Check(
            "daemon",
            Status.WARN,
            f"answers (pid {daemon.get('pid')}) but has no user manager connection",
            "systemctl --user status; stackd reconnects by itself",
        )
    return Check(
        "daemon", Status.OK, f"answers on the bus (pid {daemon.get('pid')}), manager connected"
    )


CHECKS: tuple[Callable[[_Context], Check], ...] = (
    check_manager,
    check_linger,
    check_config,
    check_compose,
    check_engine,
    check_unit_dir,
    check_subids,
    check_service,
    check_daemon,
)


def run_checks() -> list[Check]:
    ctx = _Context(user=user_name(), uid=os.getuid())
    return [check(ctx) for check in CHECKS]


def format_checks(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status.value:<4}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in {Status.FAIL, Status.WARN}:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    failed = sum(c.status is Status.FAIL for c in checks)
    warned = sum(c.status is Status.WARN for c in checks)
    lines.append("")
    lines.append(
        f"{failed} check(s) failed, {warned} warning(s)" if failed or warned else "all good"
    )
    return "\n".join(lines) + "\n"


def checks_json(checks: Sequence[Check]) -> dict[str, Any]:
    return {
        "version": 1,
        "ok": not any(c.status is Status.FAIL for c in checks),
        "checks": [asdict(c) | {"status": c.status.value} for c in checks],
    }


def run_doctor(args: argparse.Namespace) -> int:
    checks = run_checks()
    if args.json:
        sys.stdout.write(json.dumps(checks_json(checks), indent=2) + "\n")
    else:
        sys.stdout.write(format_checks(checks))
    return 1 if any(c.status is Status.FAIL for c in checks) else 0
