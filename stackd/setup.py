"""`stackd setup` (stackd's own user service) and `stackd init` (add a stack to the config).

Both talk to the user manager through `systemctl --user`, the tool an operator would use by
hand: what setup does can be repeated, or undone, with the commands it prints.

`stackd.service` is rendered from one template (`UNIT_TEMPLATE`); contrib/systemd/stackd.service
is the same template with `ExecStart=%h/.local/bin/stackd daemon`. The file carries a marker
line: setup rewrites and removes only a file with that marker, and refuses to touch a
hand-written `stackd.service` (move it away, or delete the marker line from a copy you keep).
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stackd.adapters.fsutil import replace_file
from stackd.cli import home_short
from stackd.configpath import CONFIG_ENV_VAR, default_config_path
from stackd.core.models import stack_name_problem
from stackd.core.render import command_line as exec_start_line
from stackd.errors import ConfigError, ManagerUnavailableError, StackdError, UsageError

__all__ = [
    "SETUP_MARKER",
    "UNIT_NAME",
    "UNIT_TEMPLATE",
    "SetupRefusedError",
    "daemon_command",
    "exec_start_line",
    "render_service_unit",
    "run_init",
    "run_setup",
    "stack_table",
    "toml_string",
    "user_name",
    "user_unit_dir",
]

UNIT_NAME = "stackd.service"
SETUP_MARKER = "# stackd-setup:"
CONTRIB_EXEC_START = "%h/.local/bin/stackd daemon"

UNIT_TEMPLATE = """\
# stackd-setup: written by `stackd setup`, which rewrites it and removes it on --uninstall.
# To keep a hand-edited copy, delete this line (setup then leaves the file alone); or keep
# the file and put local changes in a drop-in: `systemctl --user edit stackd`.
# stackd: the daemon that owns your compose stacks' user units.
# Install: `stackd setup` writes this unit with ExecStart pointing at your stackd; or copy
# it to ~/.config/systemd/user/ and run `systemctl --user enable --now stackd`.
[Unit]
Description=stackd: compose stacks as systemd user services
After=dbus.socket
Requires=dbus.socket

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2s
WatchdogSec=30s
TimeoutStartSec=90s
TimeoutStopSec=20s
# Hardening that keeps stackd able to manage the user's units and query rootless podman:
# state and unit files private to the user, no core dumps (memory may hold paths of
# secrets). Seccomp-based options (SystemCallFilter=, LockPersonality=, ...) are left out
# on purpose: in a user manager they imply NoNewPrivileges=yes, which breaks the setuid
# newuidmap that rootless podman needs; namespace options (ProtectSystem=, PrivateTmp=)
# would put stackd in a user namespace where rootless podman cannot run.
UMask=0077
LimitCORE=0
Nice=5

[Install]
WantedBy=default.target
"""

EXIT_OK = 0
EXIT_FAILED = 1

_MANAGER_HELP = (
    "stackd setup must run as the user who owns the stacks, in a session that has a systemd "
    "user manager: log in as that user (ssh or console; `su` and `sudo -u` start none, "
    "`machinectl shell USER@` does), or enable lingering (`loginctl enable-linger USER`, as "
    "root) and set XDG_RUNTIME_DIR=/run/user/$(id -u)"
)


class SetupRefusedError(StackdError):
    """A file setup did not write is in the way; the message says what to do."""

    exit_code = 2


# -- the unit ---------------------------------------------------------------------------------


def render_service_unit(exec_start: str) -> str:
    """stackd.service with `exec_start` (already written in systemd syntax) as ExecStart."""
    return UNIT_TEMPLATE.format(exec_start=exec_start)


def daemon_command(
    argv0: str, executable: str, *, which: str | None = None, main_is_module: bool = False
) -> list[str]:
    """The command that runs this stackd's daemon, as absolute paths.

    The console script (argv[0] named `stackd`) by its real path, so that ExecStart does not
    depend on a symlink such as ~/.local/bin/stackd; `python -m stackd` as the same interpreter
    (not resolved: a venv's python is a symlink whose location selects the venv); otherwise
    (stackd imported by another program) the `stackd` found on PATH, else `python -m stackd`.
    """
    if main_is_module or Path(argv0).name == "__main__.py":
        return [os.path.abspath(executable), "-m", "stackd", "daemon"]
    if Path(argv0).name == "stackd" and os.path.isfile(argv0):
        return [os.path.realpath(argv0), "daemon"]
    if which:
        return [os.path.realpath(which), "daemon"]
    return [os.path.abspath(executable), "-m", "stackd", "daemon"]


def _this_daemon_command() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return daemon_command(
        sys.argv[0] if sys.argv else "",
        sys.executable,
        which=shutil.which("stackd"),
        main_is_module=getattr(spec, "name", "") == "stackd.__main__",
    )


def user_unit_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/systemd/user` (~/.config/systemd/user): where the user's units go."""
    return default_config_path(environ).parent.parent / "systemd" / "user"


def _has_marker(text: str) -> bool:
    return any(line.startswith(SETUP_MARKER) for line in text.splitlines())


# -- the user manager ---------------------------------------------------------------------------


def systemctl(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`systemctl --user ARGS`, output captured."""
    try:
        return subprocess.run(
            ["systemctl", "--user", "--no-pager", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise ManagerUnavailableError(
            "systemctl is not installed: stackd needs systemd's user manager"
        ) from exc


def require_manager() -> None:
    """Raise ManagerUnavailableError (exit 3) unless `systemctl --user` reaches the manager."""
    probe = systemctl("show", "--property=Version", "--value", timeout=30)
    if probe.returncode != 0:
        reason = probe.stderr.strip() or f"systemctl exited {probe.returncode}"
        raise ManagerUnavailableError(
            f"cannot reach the systemd user manager ({reason}). {_MANAGER_HELP}"
        )


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip()
        raise StackdError(f"{what} failed: {detail}")


def user_name() -> str:
    """This user's login name (passwd), else $USER, else the uid."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", str(os.getuid()))


def linger_state(user: str) -> str | None:
    """Linger "yes"/"no" from logind, or None when it cannot tell (no logind, no loginctl)."""
    try:
        result = subprocess.run(
            ["loginctl", "show-user", user, "--property=Linger", "--value"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = result.stdout.strip()
    if result.returncode != 0 or value not in {"yes", "no"}:
        return None
    return value


def _linger_hint() -> str | None:
    user = user_name()
    state = linger_state(user)
    if state == "yes":
        return None
    fix = f"`loginctl enable-linger {user}`"
    if state == "no":
        return (
            f"note: lingering is off for {user}: the user manager, stackd and your stacks stop "
            f"when your last session ends and start only at login. Keep them running: {fix}"
        )
    return (
        "note: cannot tell whether lingering is on (logind did not answer); without it stackd "
        f"and your stacks run only while you are logged in. Turn it on with {fix}"
    )


# -- stackd setup -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _UnitFile:
    path: Path
    text: str | None  # None: absent

    @classmethod
    def read(cls, path: Path) -> _UnitFile:
        try:
            return cls(path, path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path, None)

    def refuse_unless_ours(self, action: str) -> None:
        if self.text is not None and not _has_marker(self.text):
            raise SetupRefusedError(
                f"{self.path} was not written by `stackd setup` (it has no "
                f"{SETUP_MARKER!r} line), so setup will not {action} it. Move it away "
                f"(`mv {self.path} {self.path}.orig`) and run setup again, or keep managing "
                "it yourself"
            )


def run_setup(args: argparse.Namespace) -> int:
    if getattr(args, "purge", False) and not args.uninstall:
        raise UsageError("--purge goes with --uninstall: `stackd setup --uninstall --purge`")
    if args.uninstall:
        return _uninstall(purge=args.purge)
    return _install(start=not args.no_start)


def _install(*, start: bool) -> int:
    require_manager()
    path = user_unit_dir() / UNIT_NAME
    current = _UnitFile.read(path)
    current.refuse_unless_ours("overwrite")
    command = _this_daemon_command()
    try:
        wanted = render_service_unit(exec_start_line(command))
    except ValueError as exc:
        raise SetupRefusedError(
            f"cannot write ExecStart for {command[0]}: {exc}; install stackd under a plain path"
        ) from exc
    done: list[str] = []
    changed = current.text != wanted
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, wanted.encode("utf-8"), 0o644)
        verb = "wrote" if current.text is None else "updated"
        done.append(f"{verb} {home_short(path)} (ExecStart={' '.join(command)})")
        _check(systemctl("daemon-reload"), "systemctl --user daemon-reload")
        done.append("reloaded the user manager (systemctl --user daemon-reload)")
    _warn_if_off_unit_path(path.parent)

    enabled = systemctl("is-enabled", UNIT_NAME).stdout.strip()
    if enabled != "enabled":
        _check(systemctl("enable", UNIT_NAME), f"systemctl --user enable {UNIT_NAME}")
        done.append(f"enabled {UNIT_NAME}: it starts with the user manager")
    if start and not _start(changed, done):
        return EXIT_FAILED
    if done:
        sys.stdout.write("".join(f"{line}\n" for line in done))
    else:
        state = "enabled and active" if start else "enabled"
        sys.stdout.write(
            f"stackd is already set up: {home_short(path)} is current, {UNIT_NAME} is {state}\n"
        )
    if not start:
        sys.stdout.write(f"not started (--no-start): `systemctl --user start {UNIT_NAME}`\n")
    hint = _linger_hint()
    if hint:
        sys.stdout.write(hint + "\n")
    if not _config_exists():
        sys.stdout.write(
            "no config file yet: add a stack with `stackd init NAME --directory DIR`\n"
        )
    return EXIT_OK


def _start(changed: bool, done: list[str]) -> bool:
    """Start the service, or restart it when its unit changed; False (reported) on failure."""
    active = systemctl("is-active", UNIT_NAME).stdout.strip()
    if active == "active" and not changed:
        return True
    # A changed unit means a new ExecStart (another venv, another stackd): restart to use it.
    verb = "restart" if active == "active" else "start"
    result = systemctl(verb, UNIT_NAME)
    if result.returncode != 0:
        sys.stdout.write("".join(f"{line}\n" for line in done))
        sys.stderr.write(
            f"stackd: systemctl --user {verb} {UNIT_NAME} failed: {result.stderr.strip()}\n"
            "see `systemctl --user status stackd` and `journalctl --user -u stackd -e`\n"
        )
        return False
    done.append(f"{verb}ed {UNIT_NAME}")
    return True


def _config_exists() -> bool:
    named = os.environ.get(CONFIG_ENV_VAR)
    return Path(named).exists() if named else default_config_path().exists()


def _warn_if_off_unit_path(directory: Path) -> None:
    result = systemctl("show", "--property=UnitPath", "--value")
    if result.returncode != 0:
        return
    search = [os.path.realpath(p) for p in result.stdout.split()]
    if os.path.realpath(directory) not in search:
        sys.stderr.write(
            f"stackd: warning: {directory} is not on the user manager's unit search path "
            "(its XDG_CONFIG_HOME differs from this shell's?): the manager will not see "
            f"{UNIT_NAME}. `systemctl --user show -p UnitPath` lists where it looks\n"
        )


def _uninstall(*, purge: bool) -> int:
    require_manager()
    path = user_unit_dir() / UNIT_NAME
    current = _UnitFile.read(path)
    current.refuse_unless_ours("remove")
    done: list[str] = []
    load_state = systemctl("show", "--property=LoadState", "--value", UNIT_NAME).stdout.strip()
    if load_state not in {"", "not-found"} or current.text is not None:
        result = systemctl("disable", "--now", UNIT_NAME)
        if result.returncode == 0:
            done.append(f"stopped and disabled {UNIT_NAME}")
        elif current.text is not None:
            _check(result, f"systemctl --user disable --now {UNIT_NAME}")
    if current.text is not None:
        path.unlink()
        done.append(f"removed {home_short(path)}")
        _check(systemctl("daemon-reload"), "systemctl --user daemon-reload")
        done.append("reloaded the user manager")
    if purge:
        done += _purge()
    if not done:
        done.append("nothing to do: stackd's user service is not installed")
    sys.stdout.write("".join(f"{line}\n" for line in done))
    if not purge:
        sys.stdout.write(
            "the config and update history stay; `stackd setup --uninstall --purge` removes "
            "them too. Stack units stackd wrote stay in place and keep running.\n"
        )
    return EXIT_OK


def _purge() -> list[str]:
    from stackd.adapters.store import state_dir

    done = []
    for directory in (default_config_path().parent, state_dir()):
        if directory.is_dir() and not directory.is_symlink():
            shutil.rmtree(directory)
            done.append(f"removed {home_short(directory)}")
    named = os.environ.get(CONFIG_ENV_VAR)
    if named:
        done.append(f"left {named} ({CONFIG_ENV_VAR} / --config) in place")
    return done


# -- stackd init --------------------------------------------------------------------------------

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_TOML_ESCAPES["\r"] = "\\r"
_TOML_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

CONFIG_HEADER = """\
# stackd configuration (created by `stackd init`). Each [stacks.NAME] table is one compose
# stack, run as NAME.service; see `man stackd` for the [daemon] and [updates] settings.
# After editing: `stackd reload`.
"""


def toml_string(value: str) -> str:
    """`value` as a TOML basic string (double quotes), readable back by any TOML parser."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise UsageError(f"{value!r} is not valid Unicode (a lone surrogate): TOML cannot hold it")

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        return _TOML_ESCAPES.get(char) or f"\\u{ord(char):04X}"

    return '"' + _TOML_NEEDS_ESCAPE.sub(escape, value) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def stack_table(
    name: str,
    directory: str,
    compose_files: Sequence[str] = (),
    env_files: Sequence[str] = (),
    *,
    update: bool = True,
    managed: bool = True,
) -> str:
    """The `[stacks.NAME]` table `stackd init` appends; defaults are left out."""
    lines = [f"[stacks.{_toml_key(name)}]", f"directory = {toml_string(directory)}"]
    if compose_files:
        lines.append(f"compose_files = [{', '.join(map(toml_string, compose_files))}]")
    if env_files:
        lines.append(f"env_files = [{', '.join(map(toml_string, env_files))}]")
    if not update:
        lines.append("update = false")
    if not managed:
        lines.append("managed = false  # adopted: another tool writes the units")
    return "\n".join(lines) + "\n"


def _config_path() -> Path:
    named = os.environ.get(CONFIG_ENV_VAR)
    if named:
        text = named
        home = os.environ.get("HOME", "")
        if home and (text == "~" or text.startswith("~/")):
            text = home + text[1:]
        return Path(text).absolute()
    return default_config_path()


def _file_environ() -> dict[str, str]:
    """This environment without STACKD_* overrides: init validates the file itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STACKD_")}


def run_init(args: argparse.Namespace) -> int:
    name: str = args.name
    problem = stack_name_problem(name)
    path = _config_path()
    if problem:
        raise ConfigError(str(path), f"stacks.{_toml_key(name)}", problem)
    if path.is_symlink():
        raise SetupRefusedError(
            f"{path} is a symlink to {os.path.realpath(path)} (written by another tool, such as "
            "Home Manager): add the stack where that file comes from"
        )
    try:
        existing = path.read_bytes()
    except FileNotFoundError:
        existing = b""
    if existing:
        try:
            stacks = tomllib.loads(existing.decode("utf-8-sig")).get("stacks", {})
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            from stackd.settings import load_config

            load_config(path, _file_environ())  # raises the ConfigError naming the problem
            raise
        if isinstance(stacks, dict) and name in stacks:
            raise ConfigError(
                str(path),
                f"stacks.{_toml_key(name)}",
                "this stack is already configured: edit its table, or choose another name",
            )
    table = stack_table(
        name,
        str(args.directory),
        [str(f) for f in args.compose_files],
        [str(f) for f in args.env_files],
        update=not args.no_update,
        managed=not args.adopt,
    )
    if not existing:
        new = CONFIG_HEADER.encode() + b"\n" + table.encode()
    else:
        sep = b"\n" if existing.endswith(b"\n") else b"\n\n"
        new = existing + sep + table.encode()
    _write_validated(path, new, existed=bool(existing) or path.exists())
    sys.stdout.write(f"added [stacks.{_toml_key(name)}] to {home_short(path)}\n")
    directory = Path(os.path.expanduser(str(args.directory)))
    if not directory.is_dir():
        sys.stdout.write(f"note: {directory} does not exist yet: create it before the stack runs\n")
    return _ask_daemon_to_reload(name)


def _write_validated(path: Path, data: bytes, *, existed: bool) -> None:
    """Write `data` to `path` atomically, only if it loads as a valid config."""
    from stackd.settings import load_config

    if not existed:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = (path.stat().st_mode & 0o7777) if existed else 0o600

    def check(temp: Path) -> None:
        try:
            load_config(temp, _file_environ())
        except ConfigError as exc:
            raise ConfigError(str(path), exc.key, exc.reason) from None

    # sync_dir=False: init has never fsynced the config's directory.
    replace_file(path, data, mode, check=check, sync_dir=False)


def _ask_daemon_to_reload(name: str) -> int:
    from stackd.client import DaemonClient, DaemonError
    from stackd.errors import DaemonUnavailableError

    try:
        with DaemonClient(timeout=120.0) as client:
            doc = client.call("Reload")
    except DaemonUnavailableError:
        sys.stdout.write(
            "the daemon is not running: start it with `systemctl --user start stackd` "
            "(or `stackd setup` to install it); it reads the config when it starts\n"
        )
        return EXIT_OK
    except DaemonError as exc:
        sys.stderr.write(f"stackd: the daemon refused to reload: {exc}\n")
        return exc.exit_code
    if doc.get("reloaded"):
        sys.stdout.write(
            f"the daemon reloaded its config: `stackd status {name}` shows the stack\n"
        )
        return EXIT_OK
    sys.stderr.write(
        "stackd: the file is valid, but the daemon did not reload it and keeps its last good "
        f"config: {doc.get('error')}\n"
    )
    return 2
