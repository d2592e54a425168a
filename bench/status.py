"""Benchmark `stackd status` against `systemctl --user show` with 50 and 500 stacks.

Runs inside the test sandbox (a real `systemd --user`, session bus and journald in a private
mount namespace; root only): the daemon runs as the real stackd.service unit with
tests/support/fake-compose as compose provider, every stack started. Per size it times whole
processes (median of N runs after a warm-up):

- `stackd status --json` (target: <= 60 ms median with 50 stacks, <= 100 ms with 500)
- `stackd status` (table), for reference
- `systemctl --user show -p FragmentPath,DropInPaths,ActiveState <every stack unit>`
- baselines of the same interpreter: `python -c pass`, `stackd --version`

and splits the `status --json` time into interpreter start, imports (`-X importtime`), the
GetStatus round trip over the bus (in process, the daemon's cached answer), the reply size,
and the daemon's uncached handler (`build_status` + `json.dumps`, in process).

    sudo .venv/bin/python bench/status.py [--quick] [--sizes 50,500] [--client PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _sandbox as sbx

TARGETS_MS = {50: 60.0, 500: 100.0}
SHOW_PROPS = "FragmentPath,DropInPaths,ActiveState"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 runs per command instead of 25")
    p.add_argument("--runs", type=int, default=None, help="runs per command (default 25)")
    p.add_argument("--sizes", default="50,500", help="stack counts, comma separated")
    p.add_argument(
        "--client",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="another `stackd` executable to time as client too (e.g. a non-editable install "
        "in /tmp/benchvenv/bin/stackd); repeatable",
    )
    return p.parse_args(argv)


def importtime(sandbox: sbx.Sandbox, python: Path, *args: str) -> dict[str, float]:
    """Cumulative import time (ms) of the interesting modules, one cold-cache-free run."""
    out = sandbox.run(str(python), "-X", "importtime", *args, check=False, timeout=60).stderr
    cumulative: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and len(m.group(3)) <= 3:  # top level only (indent 1) and its children (3)
            cumulative.setdefault(m.group(4), int(m.group(2)) / 1000)
    return cumulative


def bus_round_trip(sandbox: sbx.Sandbox, runs: int) -> tuple[float, float, int]:
    """GetStatus over the bus from a warm process: (connect ms, call median ms, reply bytes)."""
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    daemon = DBusAddress("/io/stackd/Daemon1", "io.stackd.Daemon1", "io.stackd.Daemon1")
    started = time.perf_counter()
    conn = open_dbus_connection(sandbox.bus_address)
    connect = (time.perf_counter() - started) * 1000
    try:
        samples = []
        size = 0
        for _ in range(runs + 3):
            started = time.perf_counter()
            reply = conn.send_and_get_reply(new_method_call(daemon, "GetStatus", "as", ([],)))
            samples.append((time.perf_counter() - started) * 1000)
            size = len(reply.body[0].encode())
        return connect, statistics.median(samples[3:]), size
    finally:
        conn.close()


def client_output_cost(text: str, runs: int) -> tuple[float, float]:
    """What the client does with the answer: json.loads, then dumps(indent=2) (ms, medians)."""
    loads, dumps = [], []
    for _ in range(runs):
        started = time.perf_counter()
        doc = json.loads(text)
        loads.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        json.dumps(doc, indent=2)
        dumps.append((time.perf_counter() - started) * 1000)
    return statistics.median(loads), statistics.median(dumps)


def handler_cost(sandbox: sbx.Sandbox, config_path: Path, runs: int) -> tuple[float, float]:
    """The daemon's uncached GetStatus work, in process: (build_status ms, json.dumps ms)."""
    from datetime import UTC, datetime

    from stackd.core.models import UnitState
    from stackd.core.status import DaemonInfo, build_status
    from stackd.settings import load_config

    config = load_config(config_path, sandbox.env)
    units = {
        s.unit: UnitState(
            name=s.unit,
            load_state="loaded",
            active_state="active",
            sub_state="exited",
            fragment_path=str(config.daemon.unit_dir / s.unit),
        )
        for s in config.stacks
    }
    info = DaemonInfo(1, datetime.now(UTC), str(config_path), str(config.daemon.unit_dir), True)
    build, dump = [], []
    for _ in range(runs):
        started = time.perf_counter()
        doc = build_status(daemon=info, config=config, units=units, findings=[])
        build.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        json.dumps(doc)
        dump.append((time.perf_counter() - started) * 1000)
    return statistics.median(build), statistics.median(dump)


def fmt(ms: float) -> str:
    return f"{ms:.1f}"


def bench_size(
    sandbox: sbx.Sandbox, count: int, runs: int, clients: list[Path], first: bool
) -> dict[str, Any]:
    # A fresh daemon per size: `stackd reload` from 50 to 500 stacks loses the daemon's bus
    # connection (dbus-fast drops it on EAGAIN; see bench/README.md), so no reload here.
    if not first:
        sbx.stop_stackd(sandbox)
    config = sbx.stacks_config(sandbox, count)
    took = sbx.start_stackd(sandbox)
    how = "start"
    active = sbx.wait_all_active(sandbox, count)
    print(
        f"{count} stacks: stackd {how} {took:.1f}s, all stacks active {active:.1f}s later",
        flush=True,
    )
    time.sleep(1.0)  # let the last PropertiesChanged settle: the status cache stays warm
    units = sbx.stack_units(count)
    python = Path(sys.executable)
    stackd = str(sbx.STACKD_BIN)
    commands = [
        sbx.Command("stackd status --json", (stackd, "status", "--json")),
        sbx.Command("stackd status", (stackd, "status")),
        *(
            sbx.Command(f"{client} status --json", (str(client), "status", "--json"))
            for client in clients
        ),
        sbx.Command(
            f"systemctl --user show -p {SHOW_PROPS} ({len(units)} units)",
            ("systemctl", "--user", "--no-pager", "show", "-p", SHOW_PROPS, *units),
            ok_codes=(0,),
        ),
        sbx.Command("python -c pass (same venv)", (str(python), "-c", "pass")),
        sbx.Command(
            "python -I -S -c pass (bare interpreter)", (str(python), "-I", "-S", "-c", "pass")
        ),
        sbx.Command("stackd --version", (stackd, "--version"), ok_codes=(0,)),
    ]
    timings = sbx.time_runs(sandbox, commands, runs=runs)
    imports = importtime(sandbox, python, "-m", "stackd", "status", "--json")
    connect_ms, call_ms, reply_bytes = bus_round_trip(sandbox, runs)
    text = sandbox.run(str(sbx.STACKD_BIN), "status", "--json", check=False).stdout
    loads_ms, dumps_ms = client_output_cost(text, runs)
    build_ms, handler_dump_ms = handler_cost(sandbox, config, runs)
    return {
        "count": count,
        "timings": timings,
        "imports": imports,
        "connect_ms": connect_ms,
        "call_ms": call_ms,
        "reply_bytes": reply_bytes,
        "loads_ms": loads_ms,
        "dumps_ms": dumps_ms,
        "build_ms": build_ms,
        "handler_dump_ms": handler_dump_ms,
    }


def report(results: list[dict[str, Any]], runs: int) -> None:
    rows = []
    for r in results:
        target = TARGETS_MS.get(r["count"])
        for t in r["timings"]:
            verdict = ""
            if t.label == "stackd status --json" and target is not None:
                verdict = f"target <= {target:.0f}: " + (
                    "met" if t.median_ms <= target else "MISSED"
                )
            rows.append(
                [
                    str(r["count"]),
                    t.label,
                    fmt(t.median_ms),
                    fmt(t.min_ms),
                    fmt(t.p90_ms),
                    f"{t.stdout_bytes:,}",
                    verdict,
                ]
            )
    sbx.print_table(
        f"whole-process wall time, ms ({runs} runs after 3 warm-up runs each)",
        ["stacks", "command", "median", "min", "p90", "stdout bytes", ""],
        rows,
    )
    rows = []
    for r in results:
        imp = r["imports"]
        rows += [
            [
                str(r["count"]),
                "import site (interpreter start-up, .pth hooks)",
                fmt(imp.get("site", 0)),
            ],
            [
                str(r["count"]),
                "import stackd.cli (argparse, json, ...)",
                fmt(imp.get("stackd.cli", 0)),
            ],
            [str(r["count"]), "import stackd.client (jeepney)", fmt(imp.get("stackd.client", 0))],
            [str(r["count"]), "bus connect + Hello + auth (warm process)", fmt(r["connect_ms"])],
            [str(r["count"]), "GetStatus round trip (cached answer)", fmt(r["call_ms"])],
            [str(r["count"]), "client json.loads of the reply", fmt(r["loads_ms"])],
            [str(r["count"]), "client json.dumps(indent=2)", fmt(r["dumps_ms"])],
            [str(r["count"]), "daemon, uncached: build_status", fmt(r["build_ms"])],
            [str(r["count"]), "daemon, uncached: json.dumps", fmt(r["handler_dump_ms"])],
            [str(r["count"]), f"reply size: {r['reply_bytes']:,} bytes", ""],
        ]
    sbx.print_table(
        "where `stackd status --json` spends its time, ms", ["stacks", "part", "ms"], rows
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = args.runs or (5 if args.quick else 25)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results = []
    with sbx.world("bench/status") as sandbox:
        for i, count in enumerate(sizes):
            results.append(bench_size(sandbox, count, runs, args.client, first=i == 0))
        sbx.stop_stackd(sandbox)
    report(results, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
