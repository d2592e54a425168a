"""The real user-manager sandbox of the test suite (tests/sandbox.py), for benches outside pytest.

Order matters: :func:`world` enters the private mount namespace *first* (``unshare`` refuses a
process that already has a second thread), then mounts the private ``/run``,
``/etc/systemd/user`` and journal (``SandboxHost().setup()``), builds one world (journald +
``systemd --user`` + session bus, its own HOME) and always tears everything down, also on
Ctrl-C or SIGTERM. Root only; nothing outside the namespace is touched.

Also here: the stack config with the fake compose provider, the real ``stackd.service`` unit
pointed at this checkout's ``stackd``, and a whole-process timer.
"""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import helpers  # noqa: E402  (tests/ and tests/integration must be on sys.path first)
from helpers import FAKE_COMPOSE, STACKD_BIN  # noqa: E402
from sandbox import (  # noqa: E402
    Sandbox,
    SandboxHost,
    enter_private_mount_namespace,
)

__all__ = [
    "FAKE_COMPOSE",
    "STACKD_BIN",
    "Command",
    "Sandbox",
    "Timing",
    "install_stackd_unit",
    "print_table",
    "stack_names",
    "stack_units",
    "stacks_config",
    "start_stackd",
    "stop_stackd",
    "time_runs",
    "wait_all_active",
    "world",
]


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def editable_install_note() -> str | None:
    """A note when the stackd being timed is an editable install: its import hook runs in
    every stackd process (~11 ms here), which a regular install, as the README makes, has not."""
    hooks = list(Path(sys.prefix).glob("lib/python*/site-packages/__editable__*stackd*"))
    if not hooks:
        return None
    return (
        "note: stackd is an editable install here; every process pays its import hook "
        "(~11 ms). The published figures come from a regular install:\n"
        "  python3 -m venv /tmp/stackd-bench && /tmp/stackd-bench/bin/pip install .\n"
        "  sudo /tmp/stackd-bench/bin/python bench/<name>.py"
    )


@contextmanager
def world(name: str) -> Iterator[Sandbox]:
    """One sandbox world for the duration of the block; torn down whatever happens."""
    note = editable_install_note()
    if note is not None:
        print(note, file=sys.stderr)
    reason = enter_private_mount_namespace()  # before anything can start a thread
    if reason is not None:
        raise SystemExit(f"{name}: the sandbox is unavailable: {reason}")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    base = Path(tempfile.mkdtemp(prefix="stackd-bench-"))
    host = SandboxHost()
    try:
        host.setup()
        yield host.new_world(base / "sandbox", name)
    finally:
        try:
            host.teardown()
        finally:
            shutil.rmtree(base, ignore_errors=True)
            signal.signal(signal.SIGTERM, previous)


# -- stacks and the daemon -------------------------------------------------------------------


def stack_names(count: int) -> list[str]:
    return [f"s{i:04d}" for i in range(count)]


def stack_units(count: int, *, update_units: bool = False) -> list[str]:
    units = [f"{name}.service" for name in stack_names(count)]
    if update_units:
        units += [f"{name}-update.service" for name in stack_names(count)]
    return units


def stacks_config(sandbox: Sandbox, count: int, *, startup_timeout: str = "600s") -> Path:
    """A config of `count` stacks run by tests/support/fake-compose (instant `up`)."""
    lines = [
        "[daemon]",
        f'compose_command = ["{FAKE_COMPOSE}"]',
        f'startup_timeout = "{startup_timeout}"',
        "",
        "[updates]",
        'schedule = "daily"',
        "",
    ]
    for name in stack_names(count):
        directory = sandbox.home / "stacks" / name
        directory.mkdir(parents=True, exist_ok=True)
        compose = directory / "compose.yaml"
        if not compose.exists():
            compose.write_text(f"services:\n  app:\n    image: 127.0.0.1:5000/{name}:latest\n")
        lines += [f"[stacks.{name}]", f'directory = "{directory}"', ""]
    path = sandbox.home / ".config" / "stackd" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def install_stackd_unit(sandbox: Sandbox) -> Path:
    """contrib/systemd/stackd.service, ExecStart pointed at this checkout, a roomy start bound."""
    return helpers.install_stackd_unit(sandbox, start_timeout="600s")


def start_stackd(sandbox: Sandbox) -> float:
    """Install and start stackd.service (Type=notify: returns once READY=1); seconds taken."""
    install_stackd_unit(sandbox)
    started = time.perf_counter()
    result = sandbox.systemctl("start", "stackd.service", check=False, timeout=660)
    if result.returncode != 0:
        status = sandbox.systemctl("status", "stackd.service", check=False).stdout
        raise RuntimeError(f"stackd.service did not start:\n{result.stderr}\n{status}")
    return time.perf_counter() - started


def stop_stackd(sandbox: Sandbox) -> None:
    sandbox.systemctl("stop", "stackd.service", check=False, timeout=120)


def status_doc(sandbox: Sandbox) -> dict[str, Any] | None:
    result = sandbox.run(str(STACKD_BIN), "status", "--json", check=False, timeout=60)
    if result.returncode not in (0, 1):
        return None
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def stackd_journal(sandbox: Sandbox, lines: int = 40) -> str:
    """The daemon's last journal lines (for error messages)."""
    out = sandbox.run(
        "journalctl",
        "--user-unit",
        "stackd.service",
        "-n",
        str(lines),
        "--no-pager",
        "-o",
        "cat",
        check=False,
    )
    return out.stdout


def wait_all_active(sandbox: Sandbox, count: int, timeout: float = 600.0) -> float:
    """Wait until `count` stack units are active, then until `stackd status` says so too.

    The manager is polled with systemctl (cheap, leaves the daemon alone), the daemon once at
    the end. Returns the seconds taken.
    """
    started = time.perf_counter()
    units = stack_units(count)

    def manager_ready() -> bool:
        out = sandbox.systemctl("show", "-p", "ActiveState", "--value", *units, check=False)
        return out.stdout.split().count("active") == count

    def daemon_ready() -> bool:
        doc = status_doc(sandbox)
        if doc is None:
            return False
        active = [s for s in doc["stacks"] if s["active_state"] == "active"]
        return len(doc["stacks"]) == count and len(active) == count

    try:
        sandbox.wait_for(manager_ready, timeout=timeout, interval=1.0, what=f"{count} units active")
        sandbox.wait_for(daemon_ready, timeout=60, interval=1.0, what=f"status: {count} active")
    except TimeoutError as exc:
        exc.add_note("stackd.service journal:\n" + stackd_journal(sandbox))
        raise
    return time.perf_counter() - started


# -- timing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Whole-process wall times of one command, in seconds."""

    label: str
    samples: tuple[float, ...]
    returncode: int
    stdout_bytes: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1000

    @property
    def min_ms(self) -> float:
        return min(self.samples) * 1000

    @property
    def p90_ms(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))] * 1000


@dataclass(frozen=True)
class Command:
    """One command to time: a label, its argv, the exit codes that count as success."""

    label: str
    argv: tuple[str, ...]
    ok_codes: tuple[int, ...] = (0, 1)


def time_runs(
    sandbox: Sandbox,
    commands: Sequence[Command],
    *,
    runs: int,
    warmup: int = 3,
    env: dict[str, str] | None = None,
) -> list[Timing]:
    """Whole-process wall times (fork/exec to exit, output read) of each command.

    The commands take turns (A B C A B C ...) so that background noise on a shared machine
    spreads over all of them instead of landing on whichever ran during a burst.
    """
    full_env = sandbox.env | (env or {})
    samples: dict[str, list[float]] = {c.label: [] for c in commands}
    last: dict[str, tuple[int, int]] = {}
    for i in range(warmup + runs):
        for command in commands:
            started = time.perf_counter()
            proc = subprocess.run(
                list(command.argv), env=full_env, cwd=sandbox.home, capture_output=True, check=False
            )
            elapsed = time.perf_counter() - started
            if proc.returncode not in command.ok_codes:
                raise RuntimeError(
                    f"{command.label}: {' '.join(command.argv[:4])} ... exited "
                    f"{proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}"
                )
            last[command.label] = (proc.returncode, len(proc.stdout))
            if i >= warmup:
                samples[command.label].append(elapsed)
    return [Timing(c.label, tuple(samples[c.label]), *last[c.label]) for c in commands]


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain, markdown-compatible table on stdout."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    print(f"\n{title}\n")
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))
    sys.stdout.flush()
