"""Argument parsing and output. The client paths (status, check, update, history, reload)
import only the light D-Bus client; the daemon and config code load only where needed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stackd import __version__
from stackd.errors import StackdError

__all__ = ["build_parser", "home_short", "main"]

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DESCRIPTION = """\
stackd runs docker/podman compose stacks as systemd user services. It renders one
<stack>.service (and <stack>-update.service) per configured stack, keeps the user manager
loading exactly those definitions, reports any other source of the same unit live, and
runs scheduled updates (compose pull, then compose up -d --remove-orphans).

exit codes: 0 fine; 1 findings present or a stack failed; 2 usage or config error;
3 daemon or user manager unreachable."""


class _Unused:
    """Stands in for a subcommand's parser that this run does not need (see build_parser)."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; with `only`, just that subcommand is built.

    Building every subparser costs ~10 ms (argparse sizes the terminal for each), a sixth of
    what `stackd status` may take; help, completion and the man page build them all.
    """
    parser = argparse.ArgumentParser(
        prog="stackd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stackd {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        type=Path,
        help="config file (default: $STACKD_CONFIG, else $XDG_CONFIG_HOME/stackd/config.toml)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    class _Subcommands:
        @staticmethod
        def add_parser(name: str, **kwargs: Any) -> Any:
            if only is not None and name != only:
                return _Unused()
            return subparsers.add_parser(name, **kwargs)

    sub = _Subcommands()

    p = sub.add_parser(
        "daemon",
        help="run the daemon in the foreground (what stackd.service runs)",
        description="Run the daemon in the foreground; logs go to the journal when it is "
        "there, else to stderr. SIGHUP re-reads the config, SIGTERM stops.",
    )
    p.add_argument(
        "--log",
        choices=["auto", "journal", "console"],
        default="auto",
        help="where events go: journald's native protocol, key=value lines on stderr, or "
        "the journal when it is there (default)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")

    p = sub.add_parser(
        "status",
        help="show stacks, their units and findings from the daemon's live view",
        description="Show each stack's unit state and where its definition comes from, "
        "as the running daemon sees it. Exit 1 when findings are present or a stack failed.",
    )
    p.add_argument("stacks", nargs="*", metavar="STACK", help="only these stacks")
    p.add_argument("--json", action="store_true", help="print the status document (version 1)")

    p = sub.add_parser(
        "check",
        help="verify unit ownership now (exit 1 on findings)",
        description="Verify that the user manager loads exactly the units stackd owns: no "
        "shadowing copies, foreign drop-ins, masks, stale or drifted files.",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="ask the user manager directly, without the daemon (post-switch assertion)",
    )
    p.add_argument("--json", action="store_true", help="print findings as JSON")

    p = sub.add_parser(
        "update",
        help="run the update orchestration now",
        description="Pull and re-create the given stacks (all update-enabled stacks when none "
        "is named) through their -update.service units, continuing past failures.",
    )
    p.add_argument("stacks", nargs="*", metavar="STACK", help="only these stacks")
    p.add_argument("--no-wait", action="store_true", help="start the run and return")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")

    p = sub.add_parser("history", help="show past update runs")
    p.add_argument("--limit", type=_positive_int, default=10, metavar="N", help="runs to show")
    p.add_argument("--json", action="store_true", help="print runs as JSON")

    p = sub.add_parser(
        "render",
        help="print the units stackd would write",
        description="Print the unit files rendered from the config (no daemon needed).",
    )
    p.add_argument("--diff", action="store_true", help="show a diff against unit_dir instead")

    sub.add_parser(
        "reload",
        help="make the daemon re-read its config and reconcile",
        description="Ask the daemon to re-read the config. A config that does not validate is "
        "reported (exit 2) and the daemon keeps the last good one.",
    )
    p = sub.add_parser(
        "setup",
        help="install and start stackd's own user service (idempotent)",
        description="Write ~/.config/systemd/user/stackd.service with ExecStart pointing at "
        "this stackd, reload the user manager and enable --now the service. Run it again at "
        "any time; --uninstall removes what it did.",
    )
    p.add_argument("--uninstall", action="store_true", help="stop, disable and remove the unit")
    p.add_argument(
        "--purge", action="store_true", help="with --uninstall: also remove config and state"
    )
    p.add_argument("--no-start", action="store_true", help="write and enable, do not start")

    p = sub.add_parser(
        "init",
        help="add a stack to the config",
        description="Add a [stacks.NAME] table to the config file (created if missing), "
        "validated before it is written, then ask a running daemon to reload.",
    )
    p.add_argument("name", metavar="STACK", help="stack name (also the unit name)")
    p.add_argument("--directory", required=True, type=Path, help="the stack's directory")
    p.add_argument(
        "--compose-file", action="append", default=[], metavar="FILE", dest="compose_files"
    )
    p.add_argument("--env-file", action="append", default=[], metavar="FILE", dest="env_files")
    p.add_argument("--no-update", action="store_true", help="leave out of scheduled updates")
    p.add_argument(
        "--adopt",
        action="store_true",
        help="units are written by another tool (managed = false): verify and update only",
    )

    p = sub.add_parser(
        "doctor",
        help="check what a rootless setup needs, and say how to fix each gap",
        description="Check the user manager, lingering, the compose provider and engine, "
        "unit_dir on the search path, subuid/subgid and the daemon. Exit 1 if a check fails.",
    )
    p.add_argument("--json", action="store_true", help="print the checks as JSON")

    p = sub.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", choices=["bash", "zsh", "fish"])
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def home_short(path: Path | str) -> str:
    """`path` with $HOME written as `~`, for messages."""
    text, home = str(path), os.environ.get("HOME", "").rstrip("/")
    if home and text.startswith(home + "/"):
        return "~" + text[len(home) :]
    return text


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_status(doc: dict[str, Any]) -> str:
    daemon = doc["daemon"]
    lines = [
        f"stackd pid {daemon['pid']}, up since {daemon['started_at']}, "
        f"user manager {daemon['manager']}",
        f"config: {home_short(daemon['config'])}",
    ]
    if daemon.get("config_error"):
        lines.append(
            f"config NOT reloaded (running on the last good one): {daemon['config_error']}"
        )
    if not doc["stacks"]:
        lines.append(
            "no stacks configured: add one with `stackd init NAME --directory DIR`, or add a "
            "[stacks.NAME] table to the config file, then `stackd reload`"
        )
    else:
        rows = [["STACK", "UNIT", "STATE", "SOURCE", "FINDINGS"]]
        for stack in doc["stacks"]:
            state = f"{stack['active_state']}/{stack['sub_state']}"
            if stack["load_state"] != "loaded":
                state = stack["load_state"]
            source = home_short(stack["fragment_path"]) or "-"
            if stack["drop_in_paths"]:
                source += f" (+{len(stack['drop_in_paths'])} drop-ins)"
            kinds = sorted({f["kind"] for f in stack["findings"]})
            rows.append([stack["name"], stack["unit"], state, source, ",".join(kinds) or "-"])
        lines.append("")
        lines.append(_table(rows))
    if doc["findings"]:
        lines.append("")
        lines.append("findings:")
        lines += [_format_finding(f) for f in doc["findings"]]
    return "\n".join(lines)


def _format_finding(f: dict[str, Any]) -> str:
    where = f["unit"] or "(global)"
    text = f"  {f['kind']:<17} {where}"
    if f.get("detail"):
        text += f": {f['detail']}"
    if f.get("source"):
        text += f" [{f['source']}, since {f['since']}]"
    return text


def _status_exit(doc: dict[str, Any]) -> int:
    failed = any(s["active_state"] == "failed" for s in doc["stacks"])
    return EXIT_FINDINGS if doc["findings"] or failed else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from stackd.client import DaemonClient

    with DaemonClient() as client:
        text = client.call_text("GetStatus", "as", list(args.stacks))
    doc = json.loads(text)
    if args.json:
        sys.stdout.write(text + "\n")  # as the daemon sent it: compact, no second encoding
    else:
        sys.stdout.write(format_status(doc) + "\n")
    return _status_exit(doc)


def _format_findings_report(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return "ownership verified: every owned unit is loaded from stackd's own file"
    return "\n".join([f"{len(findings)} finding(s):", *(_format_finding(f) for f in findings)])


def cmd_check(args: argparse.Namespace) -> int:
    if args.offline:
        from stackd.offline import offline_check

        doc = offline_check(args.config, os.environ)
    else:
        from stackd.client import DaemonClient

        with DaemonClient(timeout=120.0) as client:
            doc = client.call("Check")
    if args.json:
        _print_json(doc)
    else:
        sys.stdout.write(_format_findings_report(doc["findings"]) + "\n")
    if any(f["kind"] == "manager-unavailable" for f in doc["findings"]):
        return EXIT_UNREACHABLE
    return EXIT_FINDINGS if doc["findings"] else EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    from stackd.client import DaemonClient

    with DaemonClient(timeout=120.0) as client:
        doc = client.call("Reload")
    if doc.get("reloaded"):
        sys.stdout.write(f"config reloaded from {doc['config']}\n")
        return EXIT_OK
    sys.stderr.write(
        f"stackd: config not reloaded, the daemon keeps the last good one: {doc.get('error')}\n"
    )
    return EXIT_USAGE


def cmd_render(args: argparse.Namespace) -> int:
    from stackd.offline import render_command

    text = render_command(args.config, os.environ, diff=args.diff)
    sys.stdout.write(text)
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    from stackd.adapters.journal import configure_logging

    configure_logging(
        journal={"auto": None, "journal": True, "console": False}[args.log],
        level=args.log_level,
    )
    from stackd.daemon import run_daemon

    return run_daemon(args.config, os.environ)


def cmd_update(args: argparse.Namespace) -> int:
    from stackd.updatecli import run_update_command

    return run_update_command(args)


def cmd_history(args: argparse.Namespace) -> int:
    from stackd.updatecli import run_history_command

    return run_history_command(args)


def cmd_setup(args: argparse.Namespace) -> int:
    from stackd.setup import run_setup

    return run_setup(args)


def cmd_init(args: argparse.Namespace) -> int:
    from stackd.setup import run_init

    return run_init(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from stackd.doctor import run_doctor

    return run_doctor(args)


def cmd_completion(args: argparse.Namespace) -> int:
    from stackd.completion import completion_script

    sys.stdout.write(completion_script(build_parser(), args.shell))
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "daemon": cmd_daemon,
    "status": cmd_status,
    "check": cmd_check,
    "update": cmd_update,
    "history": cmd_history,
    "render": cmd_render,
    "reload": cmd_reload,
    "setup": cmd_setup,
    "init": cmd_init,
    "doctor": cmd_doctor,
    "completion": cmd_completion,
}


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv, if it is plainly there (else the full parser decides)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--config":
            skip = True
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
        elif word in ("-h", "--help", "--version"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_of(words))
    args = parser.parse_args(words)
    if args.config is not None:
        os.environ["STACKD_CONFIG"] = str(args.config)
    try:
        return COMMANDS[args.command](args)
    except StackdError as exc:
        sys.stderr.write(f"stackd: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
