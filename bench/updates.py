"""Benchmark an update run: 20 stacks whose update takes 0.5 s, at concurrency 4 and 1.

Runs inside the test sandbox (a real `systemd --user`, session bus and journald in a private
mount namespace; root only): the daemon runs as the real stackd.service unit with
tests/support/fake-compose as compose provider; each stack's `compose pull` sleeps 0.5 s and
`compose up` returns at once, so an ideal run of N stacks at concurrency C takes
ceil(N / C) * 0.5 s. Per concurrency it times (median of the runs):

- the client: `stackd update` from fork/exec to exit (the run's summary printed)
- the run: its `finished_at - started_at` from the history
- the floor: the same 20 `<stack>-update.service` units started without stackd, by
  `systemctl --user start` C at a time (`xargs -P C`), i.e. what the user manager, journald
  and the fake compose cost on this machine whatever the orchestrator
- the overhead per stack over the ideal, and stackd's own share: client time - floor

Runs alternate (stackd, floor, stackd, floor, ...) so background load lands on both.

Target: the client wall time at concurrency 4 within 1.15x of the ideal 2.5 s.

    sudo .venv/bin/python bench/updates.py [--runs 3] [--stacks 20] [--delay 0.5]
        [--concurrency 4,1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

# The private mount namespace first: unshare(CLONE_NEWNS) refuses a process with a second
# thread, so this runs before anything else is imported or started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sandbox import enter_private_mount_namespace

_NAMESPACE_PROBLEM = enter_private_mount_namespace()

import _sandbox as sbx  # noqa: E402

TARGET_RATIO = 1.15
TARGET_CONCURRENCY = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs per concurrency (default 5)")
    p.add_argument("--stacks", type=int, default=20, help="stacks to update (default 20)")
    p.add_argument("--delay", type=float, default=0.5, help="seconds each pull takes (0.5)")
    p.add_argument(
        "--concurrency", default="4,1", help="updates.concurrency values, comma separated"
    )
    return p.parse_args(argv)


def write_config(sandbox: sbx.Sandbox, count: int, concurrency: int) -> None:
    """The bench's stacks (via the shared helper), then [updates] with this concurrency."""
    path = sbx.stacks_config(sandbox, count)
    text = path.read_text().replace(
        "[updates]\n", f'[updates]\nconcurrency = {concurrency}\ntimeout = "60s"\n', 1
    )
    path.write_text(text)


def script_pulls(sandbox: sbx.Sandbox, count: int, delay: float) -> None:
    for name in sbx.stack_names(count):
        control = sandbox.home / "stacks" / name / "fake-control"
        control.mkdir(parents=True, exist_ok=True)
        (control / "pull.delay").write_text(f"{delay}\n")


def floor_run(sandbox: sbx.Sandbox, count: int, concurrency: int) -> float:
    """Seconds to start every update unit directly, `concurrency` at a time (no stackd)."""
    units = " ".join(f"{name}-update.service" for name in sbx.stack_names(count))
    script = f"printf '%s\\n' {units} | xargs -P {concurrency} -n 1 systemctl --user start"
    started = time.perf_counter()
    sandbox.run("sh", "-c", script, timeout=600)
    took = time.perf_counter() - started
    # Leave the units as stackd does (released: inactive); RemainAfterExit keeps them
    # `active (exited)`, and the next stackd run would stop each one before starting it.
    sandbox.systemctl("stop", *units.split(), timeout=120)
    return took


def one_run(sandbox: sbx.Sandbox) -> tuple[float, float, dict[str, object]]:
    """Client wall seconds, run seconds (from the history's timestamps), the summary."""
    started = time.perf_counter()
    proc = sandbox.run(str(sbx.STACKD_BIN), "update", "--json", check=False, timeout=600)
    client = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"stackd update exited {proc.returncode}: {proc.stderr}{proc.stdout}")
    summary = json.loads(proc.stdout)
    run = datetime.fromisoformat(summary["finished_at"]) - datetime.fromisoformat(
        summary["started_at"]
    )
    return client, run.total_seconds(), summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if _NAMESPACE_PROBLEM is not None:
        raise SystemExit(f"bench/updates.py: the sandbox is unavailable: {_NAMESPACE_PROBLEM}")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    rows = []
    verdict = 0
    with sbx.world("bench/updates.py") as sandbox:
        write_config(sandbox, args.stacks, levels[0])
        script_pulls(sandbox, args.stacks, args.delay)
        sbx.start_stackd(sandbox)
        sbx.wait_all_active(sandbox, args.stacks)
        for concurrency in levels:
            write_config(sandbox, args.stacks, concurrency)
            reload = sandbox.run(str(sbx.STACKD_BIN), "reload", check=False, timeout=120)
            if reload.returncode != 0:
                raise RuntimeError(f"stackd reload: {reload.stderr}")
            ideal = math.ceil(args.stacks / concurrency) * args.delay
            clients, runs, floors = [], [], []
            for _ in range(args.runs):
                client, run, summary = one_run(sandbox)
                if len(summary["succeeded"]) != args.stacks:  # type: ignore[arg-type]
                    raise RuntimeError(f"not every stack succeeded: {summary['summary']}")
                clients.append(client)
                runs.append(run)
                floors.append(floor_run(sandbox, args.stacks, concurrency))
            client_s, run_s = statistics.median(clients), statistics.median(runs)
            floor_s = statistics.median(floors)
            lane = math.ceil(args.stacks / concurrency)
            ratio = client_s / ideal
            target = ""
            if concurrency == TARGET_CONCURRENCY:
                ok = ratio <= TARGET_RATIO
                target = f"<= {TARGET_RATIO}x: {'met' if ok else 'MISSED'}"
                verdict = verdict or (0 if ok else 1)
            rows.append(
                [
                    str(concurrency),
                    f"{ideal:.2f}",
                    f"{client_s:.3f} ({min(clients):.3f}-{max(clients):.3f})",
                    f"{run_s:.3f}",
                    f"{ratio:.3f}x",
                    f"{run_s / ideal:.3f}x",
                    f"{floor_s:.3f} ({floor_s / ideal:.3f}x)",
                    f"{(client_s - floor_s) * 1000:+.0f}",
                    f"{(run_s - ideal) / lane * 1000:.0f}",
                    target,
                ]
            )
        sbx.stop_stackd(sandbox)
    sbx.print_table(
        f"`stackd update`: {args.stacks} stacks, pull {args.delay}s, up instant; "
        f"median of {args.runs} runs",
        [
            "concurrency",
            "ideal s",
            "client s (min-max)",
            "run s",
            "client/ideal",
            "run/ideal",
            "floor s (/ideal)",
            "client-floor ms",
            "ms/stack over",
            "target",
        ],
        rows,
    )
    return verdict


if __name__ == "__main__":
    sys.exit(main())
