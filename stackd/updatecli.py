"""`stackd update` and `stackd history`: the client side of update runs (light imports)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from stackd.client import HOW_TO_START, DaemonClient
from stackd.errors import DaemonUnavailableError

__all__ = ["format_run", "run_history_command", "run_update_command"]

EXIT_OK = 0
EXIT_FAILED = 1
POLL_S = 10.0  # ask the history when no signal came for this long
DAEMON_GONE_S = 60.0  # give up waiting when the daemon stays unreachable this long


def _stack_line(result: dict[str, Any]) -> str:
    line = f"  {result['stack']:<20} {result['result']}"
    if result.get("error"):
        line += f": {result['error']}"
    changes = [c for c in result.get("changes", []) if c.get("change") != "unchanged"]
    for change in changes:
        old, new = change.get("old") or "-", change.get("new") or "-"
        line += f"\n    {change['service']}: {change['change']} {old[:19]} -> {new[:19]}"
    return line


def format_run(run: dict[str, Any]) -> str:
    lines = [run.get("summary") or f"update run {run['run']}: {run['result']}"]
    lines += [_stack_line(r) for r in run.get("results", [])]
    return "\n".join(lines)


def run_update_command(args: argparse.Namespace) -> int:
    with DaemonClient(timeout=60.0) as client:
        if args.no_wait:
            run = client.call("Update", "as", list(args.stacks))
            if args.json:
                sys.stdout.write(json.dumps(run) + "\n")
            else:
                sys.stdout.write(f"update run {run['run']} started\n")
            return EXIT_OK
        with client.signals("UpdateProgress", "UpdateFinished") as signals:
            started = client.call("Update", "as", list(args.stacks))
            run_id = started["run"]
            if not args.json:
                sys.stdout.write(
                    f"update run {run_id}: {len(started['stacks'])} stacks "
                    f"({', '.join(started['stacks']) or 'none'})\n"
                )
                sys.stdout.flush()
            summary = _wait_for_summary(client, signals, run_id, echo=not args.json)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write((summary.get("summary") or "") + "\n")
    return EXIT_OK if summary.get("result") == "success" else EXIT_FAILED


def _wait_for_summary(
    client: DaemonClient, signals: Any, run_id: str, *, echo: bool
) -> dict[str, Any]:
    """Follow the run's signals until its UpdateFinished.

    Every POLL_S without a signal the history is asked too: a daemon killed mid-run completes
    the run when it is back (its signals reach this connection as well), and one that stays
    away for DAEMON_GONE_S ends the wait with exit 3 rather than a client hanging forever.
    """
    gone_since: float | None = None
    while True:
        try:
            member, payload = signals.next(timeout=POLL_S)
        except TimeoutError:
            try:
                finished = _finished_run(client, run_id)
            except DaemonUnavailableError:
                now = time.monotonic()
                gone_since = gone_since or now
                if now - gone_since > DAEMON_GONE_S:
                    raise DaemonUnavailableError(
                        f"the stackd daemon stopped during update run {run_id} and is not "
                        "back; it completes the run when it starts again (`stackd history` "
                        f"shows it then): {HOW_TO_START}"
                    ) from None
                continue
            gone_since = None
            if finished is not None:
                return finished
            continue
        if payload.get("run") != run_id:
            continue
        if member == "UpdateProgress":
            if echo and payload.get("result"):
                sys.stdout.write(_stack_line(payload) + "\n")
                sys.stdout.flush()
            continue
        summary: dict[str, Any] = payload
        return summary


def _finished_run(client: DaemonClient, run_id: str) -> dict[str, Any] | None:
    for run in client.call("GetHistory", "u", 20).get("runs", []):
        if run.get("run") == run_id and run.get("finished_at") is not None:
            found: dict[str, Any] = run
            return found
    return None


def run_history_command(args: argparse.Namespace) -> int:
    with DaemonClient() as client:
        doc = client.call("GetHistory", "u", args.limit)
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return EXIT_OK
    runs = doc.get("runs", [])
    if not runs:
        sys.stdout.write("no update runs yet: `stackd update` starts one\n")
    for run in runs:
        sys.stdout.write(format_run(run) + "\n")
    return EXIT_OK
