"""Fault injection with full counts: what tests/integration/test_faults.py checks in CI, longer.

Runs inside the test sandbox (a real `systemd --user`, session bus and journald in a private
mount namespace; root only), with tests/support/fake-compose as compose provider. Phases:

- `reconnect`: the daemon runs as a plain process (`stackd daemon`, outside the manager: a
  unit dies with its manager); the manager, and with it the bus, is stopped for `--away`
  seconds and started again, `--reconnects` times. Measured per round: from the manager's
  name `org.freedesktop.systemd1` owned on the new bus to the daemon answering
  `manager: connected` (both polled in process every millisecond). Target: < 2 s.
- `reexec`: stackd.service with WatchdogSec=3s; `systemctl --user daemon-reexec` x
  `--reexecs` and `daemon-reload` x `--reloads`. Reported: how long the daemon counted the
  manager away per re-exec (journal: `manager.unavailable` -> `manager.connected`), and that
  the watchdog never fired (NRestarts=0, same MainPID, Result=success).
- `kill`: kill -9 of stackd.service during update runs, `--rounds` times (Restart=on-failure,
  RestartSec=2s as shipped); the history is checked after every round (parseable, every run
  finished once, one result per stack). Reported: rounds survived, kill -> run completed.
- `state`: the state dir full (once: later, a run's records may fit in the slack of
  history.jsonl's last page), then read-only `--state-rounds` times (a 64 KiB tmpfs over
  it): updates keep running; reported: how long after space or write access returns the
  kept records are in history.jsonl.

    sudo .venv/bin/python bench/faults.py                      # every phase, full counts
    sudo .venv/bin/python bench/faults.py --phases kill --rounds 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import _sandbox as sbx

sys.path.insert(0, str(sbx.REPO / "tests" / "integration"))

from helpers import unit_show
from test_faults import (
    all_active,
    caught_up,
    check_history_complete,
    daemon_process,
    faults_config,
    fill,
    install_stackd_unit,
    kill_rounds,
    remount,
    state_dir,
    update_while_refused,
)

PHASES = ("reconnect", "reexec", "kill", "state")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    p.add_argument("--reconnects", type=int, default=10, help="manager stop/start rounds")
    p.add_argument("--away", type=float, default=3.0, help="seconds the manager stays down")
    p.add_argument("--reexecs", type=int, default=10)
    p.add_argument("--reloads", type=int, default=200)
    p.add_argument("--rounds", type=int, default=20, help="kill -9 rounds")
    p.add_argument("--state-rounds", type=int, default=5, help="read-only rounds")
    return p.parse_args(argv)


def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll every millisecond; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.001)
    raise TimeoutError(f"not within {timeout}s: {what}")


def _manager_owned() -> bool:
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    try:
        with open_dbus_connection(os.environ["DBUS_SESSION_BUS_ADDRESS"]) as conn:
            bus = DBusAddress(
                "/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus"
            )
            msg = new_method_call(bus, "NameHasOwner", "s", ("org.freedesktop.systemd1",))
            return bool(conn.send_and_get_reply(msg, timeout=1).body[0])
    except (OSError, ValueError, TimeoutError):
        return False


def _daemon_connected() -> bool:
    from stackd.client import DaemonClient
    from stackd.errors import StackdError

    try:
        with DaemonClient(timeout=1) as client:
            doc = json.loads(client.call_text("GetStatus", "as", []))
    except (StackdError, OSError, ValueError, TimeoutError):
        return False
    return bool(doc["daemon"]["manager"] == "connected")


def _summary(values: list[float], unit: str = "ms", scale: float = 1000) -> str:
    xs = sorted(v * scale for v in values)
    d = 0 if unit == "ms" else 1
    p50 = statistics.median(xs)
    return f"n={len(xs)} min {xs[0]:.{d}f} p50 {p50:.{d}f} max {xs[-1]:.{d}f} {unit}"


def phase_reconnect(args: argparse.Namespace) -> dict[str, Any]:
    with sbx.world("faults-reconnect") as sandbox:
        os.environ.update(sandbox.env)
        faults_config(sandbox, ["web", "api"])
        times: list[float] = []
        with daemon_process(sandbox, sandbox.base / "daemon.log") as daemon:
            sandbox.wait_for(lambda: all_active(sandbox, ["web", "api"]), timeout=30)
            for _ in range(args.reconnects):
                sandbox.stop_manager()
                time.sleep(args.away)
                starter = threading.Thread(target=sandbox.start_manager)
                starter.start()
                owned = _poll(_manager_owned, 30, "manager on the bus")
                connected = _poll(_daemon_connected, 30, "daemon connected")
                starter.join()
                times.append(connected - owned)
            assert daemon.poll() is None, "the daemon died"
        return {"reconnect": _summary(times), "reconnect_max_s": max(times)}


def phase_reexec(args: argparse.Namespace) -> dict[str, Any]:
    with sbx.world("faults-reexec") as sandbox:
        faults_config(sandbox, ["web", "api"])
        install_stackd_unit(sandbox, watchdog="3s")
        sandbox.systemctl("start", "stackd.service", timeout=60)
        sandbox.wait_for(lambda: all_active(sandbox, ["web", "api"]), timeout=30)
        before = unit_show(sandbox, "stackd.service", "MainPID")
        started = time.monotonic()
        for i in range(args.reexecs):
            sandbox.systemctl("daemon-reexec", timeout=30)
            # One re-exec at a time: each one is then measured on its own.
            sandbox.wait_for_journal(
                SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="manager.connected", count=2 + i
            )
        for _ in range(args.reloads):
            sandbox.systemctl("daemon-reload", timeout=30)
        storm_s = time.monotonic() - started
        sandbox.wait_for(lambda: all_active(sandbox, ["web", "api"]), timeout=10)
        after = unit_show(sandbox, "stackd.service", "MainPID", "NRestarts", "Result")
        entries = sandbox.journal(SYSLOG_IDENTIFIER="stackd")
        away: list[float] = []
        lost_at: int | None = None
        for entry in entries:
            event, stamp = entry.get("STACKD_EVENT"), int(entry["__REALTIME_TIMESTAMP"])
            if event == "manager.unavailable" and lost_at is None:
                lost_at = stamp
            elif event == "manager.connected" and lost_at is not None:
                away.append((stamp - lost_at) / 1e6)
                lost_at = None
        return {
            "storm": f"{args.reexecs} re-execs + {args.reloads} reloads in {storm_s:.1f}s",
            "manager away per re-exec": _summary(away) if away else "never noticed",
            "watchdog": "never fired"
            if after == {**before, "NRestarts": "0", "Result": "success"}
            else f"FIRED: {after}",
        }


def phase_kill(args: argparse.Namespace) -> dict[str, Any]:
    with sbx.world("faults-kill") as sandbox:
        faults_config(sandbox, ["a", "b", "c"], updates="concurrency = 2", pull_delay=1.0)
        install_stackd_unit(sandbox)
        sandbox.systemctl("start", "stackd.service", timeout=60)
        survived = 0
        per_round: list[float] = []
        all_runs: list[str] = []
        try:
            for i in range(args.rounds):
                began = time.monotonic()
                runs, _killed = kill_rounds(sandbox, 1, first=i)
                per_round.append(time.monotonic() - began)
                all_runs += runs
                check_history_complete(sandbox)
                survived += 1
        finally:
            restarts = unit_show(sandbox, "stackd.service", "NRestarts")["NRestarts"]
        runs_doc = check_history_complete(sandbox)
        results = [res["result"] for r in runs_doc for res in r["results"]]
        return {
            "kill -9 rounds survived": f"{survived}/{args.rounds} (NRestarts={restarts})",
            "runs": f"{len(runs_doc)}, all finished once; results "
            + ", ".join(f"{k} {results.count(k)}" for k in sorted(set(results))),
            "round (start, kill, restart, run completed)": _summary(per_round, "s", 1),
        }


def phase_state(args: argparse.Namespace) -> dict[str, Any]:
    with sbx.world("faults-state") as sandbox:
        faults_config(sandbox, ["web", "api"])
        directory = state_dir(sandbox)
        directory.mkdir(parents=True, mode=0o700, exist_ok=True)
        catch_up: dict[str, list[float]] = {"full": [], "read-only": []}
        with sandbox.host.private_tmpfs(directory):
            remount(sandbox, directory, "size=64k")
            install_stackd_unit(sandbox)
            sandbox.systemctl("start", "stackd.service", timeout=60)
            sandbox.wait_for(lambda: all_active(sandbox, ["web", "api"]), timeout=30)
            for i in range(args.state_rounds):
                if i == 0:
                    # Only while history.jsonl has no partly filled last page: later, the
                    # records of a run may fit in its slack even on a full tmpfs.
                    filler = fill(directory)
                    run = update_while_refused(sandbox)
                    filler.unlink()
                    began = time.monotonic()
                    caught_up(sandbox, run)
                    catch_up["full"].append(time.monotonic() - began)
                remount(sandbox, directory, "ro")
                try:
                    run = update_while_refused(sandbox)
                finally:
                    remount(sandbox, directory, "rw")
                began = time.monotonic()
                caught_up(sandbox, run)
                catch_up["read-only"].append(time.monotonic() - began)
            runs = check_history_complete(sandbox)
        return {
            "runs while refused": f"{len(runs)}, all in history.jsonl afterwards",
            **{f"catch-up after {k}": _summary(v, "s", 1) for k, v in catch_up.items()},
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    runners = {
        "reconnect": phase_reconnect,
        "reexec": phase_reexec,
        "kill": phase_kill,
        "state": phase_state,
    }
    failed = False
    for phase in phases:
        began = time.monotonic()
        try:
            result = runners[phase](args)
        except (AssertionError, TimeoutError) as exc:
            failed = True
            result = {"FAILED": f"{type(exc).__name__}: {exc}"}
        print(f"{phase} ({time.monotonic() - began:.0f}s):")
        for key, value in result.items():
            print(f"  {key}: {value}")
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
