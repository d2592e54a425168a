"""Shared steps of the daemon integration tests: a config, the real stackd.service unit."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sandbox import Sandbox

REPO = Path(__file__).resolve().parents[2]
FAKE_COMPOSE = REPO / "tests" / "support" / "fake-compose"
STACKD_BIN = Path(sys.executable).with_name("stackd")
CONTRIB_UNIT = REPO / "contrib" / "systemd" / "stackd.service"


def make_stack_dir(sandbox: Sandbox, name: str, *, compose: str | None = None) -> Path:
    directory = sandbox.home / "stacks" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "compose.yaml").write_text(
        compose or f"services:\n  app:\n    image: 127.0.0.1:5000/{name}:latest\n"
    )
    return directory


def write_config(sandbox: Sandbox, body: str) -> Path:
    path = sandbox.home / ".config" / "stackd" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def stacks_config(sandbox: Sandbox, names: list[str], extra: str = "") -> Path:
    lines = [
        "[daemon]",
        f'compose_command = ["{FAKE_COMPOSE}"]',
        'startup_timeout = "20s"',
        extra,
    ]
    for name in names:
        directory = make_stack_dir(sandbox, name)
        lines += [f"[stacks.{name}]", f'directory = "{directory}"', ""]
    return write_config(sandbox, "\n".join(lines))


def install_stackd_unit(
    sandbox: Sandbox, *, watchdog: str = "30s", start_timeout: str = "90s"
) -> Path:
    """The real contrib unit, with ExecStart pointed at the stackd under test."""
    text = CONTRIB_UNIT.read_text()
    text = text.replace("ExecStart=%h/.local/bin/stackd daemon", f"ExecStart={STACKD_BIN} daemon")
    text = text.replace("WatchdogSec=30s", f"WatchdogSec={watchdog}")
    text = text.replace("TimeoutStartSec=90s", f"TimeoutStartSec={start_timeout}")
    if f"ExecStart={STACKD_BIN} daemon" not in text:
        raise RuntimeError(f"{CONTRIB_UNIT}: no ExecStart line to point at {STACKD_BIN}")
    unit = sandbox.user_unit_dir / "stackd.service"
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(text)
    sandbox.daemon_reload()
    return unit


def start_stackd(sandbox: Sandbox) -> None:
    install_stackd_unit(sandbox)
    result = sandbox.systemctl("start", "stackd.service", check=False, timeout=60)
    if result.returncode != 0:
        status = sandbox.systemctl("status", "stackd.service", check=False).stdout
        logs = "\n".join(sandbox.messages("_SYSTEMD_USER_UNIT=stackd.service")[-30:])
        raise AssertionError(f"stackd.service did not start:\n{status}\n{logs}")


def stackd(sandbox: Sandbox, *args: str, check: bool = False, timeout: float = 60):  # type: ignore[no-untyped-def]
    return sandbox.run(str(STACKD_BIN), *args, check=check, timeout=timeout)


def status_json(sandbox: Sandbox, *stacks: str) -> dict[str, Any]:
    result = stackd(sandbox, "status", "--json", *stacks)
    assert result.returncode in (0, 1), result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def stack_entry(doc: dict[str, Any], name: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(s for s in doc["stacks"] if s["name"] == name)
    return entry


def unit_show(sandbox: Sandbox, unit: str, *props: str) -> dict[str, str]:
    out = sandbox.systemctl("show", "-p", ",".join(props), unit).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def stackd_events(sandbox: Sandbox, event: str) -> list[dict[str, Any]]:
    return sandbox.journal(SYSLOG_IDENTIFIER="stackd", STACKD_EVENT=event)
