"""`stackd update` and `stackd history`: the client side of update runs (light imports)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from stackd.client import DaemonClient

__all__ = ["format_run", "run_history_command", "run_update_command"]

EXIT_OK = 0
EXIT_FAILED = 1


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
            while True:
                member, payload = signals.next(timeout=None)
                if payload.get("run") != run_id:
                    continue
                if member == "UpdateProgress":
                    if not args.json and payload.get("result"):
                        sys.stdout.write(_stack_line(payload) + "\n")
                        sys.stdout.flush()
                    continue
                summary = payload
                break
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write((summary.get("summary") or "") + "\n")
    return EXIT_OK if summary.get("result") == "success" else EXIT_FAILED


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
