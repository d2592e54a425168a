"""Benchmark `stackd check --offline --json` against `systemctl --user show` on 500 stacks.

Runs inside the test sandbox (real `systemd --user` + session bus + journald in a private mount
namespace; root only). The daemon runs once as stackd.service to write and start the stacks'
units (tests/support/fake-compose), then is stopped: `check --offline` asks the user manager
itself. Timed as whole processes (median of N runs after a warm-up, commands taking turns):

- `stackd check --offline --json` (target: <= 400 ms median with 500 stacks)
- `systemctl --user show -p FragmentPath,DropInPaths,ActiveState` over the same units (the
  stacks' `<name>.service` and `<name>-update.service`), and over the `<name>.service` only
- baselines: `python -c pass`, `stackd --version`

then splits one `check --offline` into its phases (a fresh process per sample: imports,
config, render, connect, the per-unit D-Bus reads, UnitPath, the disk scan + evaluation).
The warm-up runs leave the validated config in the cache, as on a host where the config
changes less often than `check --offline` runs (a changed config costs ~90 ms more once).

    sudo .venv/bin/python bench/check.py [--quick] [--stacks 500]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import _sandbox as sbx

TARGET_MS = 400.0
SHOW_PROPS = "FragmentPath,DropInPaths,ActiveState"

# One `check --offline`, phase by phase, in a fresh interpreter (argv: config path), sequential
# (the command itself renders in a thread while it reads the manager).
PHASES = r"""
import sys, time
t0 = time.perf_counter()
marks = []
def mark(name):
    marks.append((name, time.perf_counter()))
import asyncio, json, os
from pathlib import Path
mark("import asyncio, json")
from stackd.configcache import load_config_cached
mark("import stackd.configcache")
from stackd.verify import compute_findings, desired_units
from stackd.core.status import finding_to_json
mark("import stackd.verify, core.status")
from stackd.adapters.bus import connect_user_bus
from stackd.adapters.systemd import SystemdManager
mark("import dbus_fast.aio, adapters.systemd")
config = load_config_cached(Path(sys.argv[1]), os.environ)
mark("load the config (cached after the warm-up)")
desired = desired_units(config)
mark("desired_units (read compose files, render)")

async def main():
    bus = await connect_user_bus(os.environ["DBUS_SESSION_BUS_ADDRESS"])
    mark("connect")
    manager = SystemdManager(bus, max_in_flight=128)
    units, lazy = [], []
    for stack in config.stacks:
        units += [stack.unit, stack.update_unit]
        lazy.append(stack.update_unit)
    await manager.watch(units, lazy=lazy)
    mark(f"read {len(units)} units (ListUnitsByNames/Patterns + 3 Gets per loaded unit)")
    search = await manager.unit_path()
    mark("UnitPath")
    findings = compute_findings(config, desired, search, manager.units, True)
    mark("compute_findings (scan search path, evaluate)")
    bus.disconnect()
    return findings

findings = asyncio.run(main())
now = __import__("datetime").datetime.now()
doc = {"version": 1, "findings": [finding_to_json(f, now) for f in findings]}
sys.stdout.write(json.dumps(doc, indent=2) + "\n")
mark("output")
prev = t0
out = []
for name, t in marks:
    out.append([name, (t - prev) * 1000])
    prev = t
summary = {"phases": out, "total": (prev - t0) * 1000, "findings": len(findings)}
sys.stderr.write("PHASES " + json.dumps(summary) + "\n")
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 runs per command instead of 21")
    p.add_argument("--runs", type=int, default=None, help="runs per command (default 21)")
    p.add_argument("--stacks", type=int, default=500, help="stack count (default 500)")
    return p.parse_args(argv)


def phases(sandbox: sbx.Sandbox, config: Path, runs: int) -> dict[str, Any]:
    """Median per phase of `runs` fresh processes running PHASES."""
    per: dict[str, list[float]] = {}
    totals: list[float] = []
    findings = 0
    for _ in range(runs):
        result = sandbox.run(sys.executable, "-c", PHASES, str(config), timeout=120)
        line = next(x for x in result.stderr.splitlines() if x.startswith("PHASES "))
        data = json.loads(line.removeprefix("PHASES "))
        for name, ms in data["phases"]:
            per.setdefault(name, []).append(ms)
        totals.append(data["total"])
        findings = data["findings"]
    return {
        "phases": [(name, statistics.median(v)) for name, v in per.items()],
        "total": statistics.median(totals),
        "findings": findings,
    }


def importtime(sandbox: sbx.Sandbox, *args: str) -> list[tuple[str, float]]:
    """The biggest top-level imports (cumulative ms) of one run."""
    out = sandbox.run(sys.executable, "-X", "importtime", *args, check=False, timeout=60).stderr
    top = []
    for line in out.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\S+)$", line)  # indent 1: top level
        if m:
            top.append((m.group(3), int(m.group(2)) / 1000))
    return sorted(top, key=lambda x: -x[1])[:8]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = args.runs or (5 if args.quick else 21)
    count = args.stacks
    with sbx.world("bench/check") as sandbox:
        config = sbx.stacks_config(sandbox, count)
        took = sbx.start_stackd(sandbox)
        active = sbx.wait_all_active(sandbox, count)
        sbx.stop_stackd(sandbox)
        print(f"{count} stacks: stackd start {took:.1f}s, active {active:.1f}s later; stopped")
        stackd = str(sbx.STACKD_BIN)
        both = sbx.stack_units(count, update_units=True)
        main_units = sbx.stack_units(count)
        check = sbx.Command(
            "stackd check --offline --json", (stackd, "check", "--offline", "--json")
        )
        uncached = sbx.Command(
            "the same, config changed (cache miss: validated afresh)",
            (
                "sh",
                "-c",
                'rm -f "$HOME/.cache/stackd/config.pickle" && '
                f"exec {stackd} check --offline --json",
            ),
        )
        timings = sbx.time_runs(
            sandbox,
            [
                check,
                uncached,
                sbx.Command(
                    f"systemctl --user show -p {SHOW_PROPS} ({len(both)} units)",
                    ("systemctl", "--user", "--no-pager", "show", "-p", SHOW_PROPS, *both),
                    ok_codes=(0,),
                ),
                sbx.Command(
                    f"systemctl --user show -p {SHOW_PROPS} ({len(main_units)} units)",
                    ("systemctl", "--user", "--no-pager", "show", "-p", SHOW_PROPS, *main_units),
                    ok_codes=(0,),
                ),
                sbx.Command("python -c pass (same venv)", (sys.executable, "-c", "pass")),
                sbx.Command("stackd --version", (stackd, "--version"), ok_codes=(0,)),
            ],
            runs=runs,
        )
        doc = json.loads(sandbox.run(stackd, "check", "--offline", "--json", check=False).stdout)
        split_runs = max(3, runs // 3)
        current = phases(sandbox, config, split_runs)
        imports = importtime(sandbox, "-m", "stackd", "check", "--offline", "--json")

    rows = []
    for t in timings:
        verdict = ""
        if t is timings[0]:
            verdict = f"target <= {TARGET_MS:.0f}: " + (
                "met" if t.median_ms <= TARGET_MS else "MISSED"
            )
        rows.append(
            [
                t.label,
                f"{t.median_ms:.1f}",
                f"{t.min_ms:.1f}",
                f"{t.p90_ms:.1f}",
                f"{t.stdout_bytes:,}",
                verdict,
            ]
        )
    sbx.print_table(
        f"{count} stacks, whole-process wall time, ms ({runs} runs after 3 warm-up runs; "
        f"check found {len(doc['findings'])} findings)",
        ["command", "median", "min", "p90", "stdout bytes", ""],
        rows,
    )
    rows = [[name, f"{ms:.1f}"] for name, ms in current["phases"]]
    rows.append(["total (in-process, after interpreter start-up)", f"{current['total']:.1f}"])
    sbx.print_table(
        f"one `check --offline`, phase by phase (median of {split_runs} fresh processes), ms",
        ["phase", "ms"],
        rows,
    )
    sbx.print_table(
        "largest top-level imports of `python -X importtime -m stackd check --offline --json`",
        ["module", "cumulative ms"],
        [[name, f"{ms:.1f}"] for name, ms in imports],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
