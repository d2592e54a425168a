"""The texts of the units stackd owns: `<stack>.service` and `<stack>-update.service`.

Pure: everything the renderer needs arrives in a `RenderInput` (an adapter reads the compose
files and resolves the env files); the same input always gives the same bytes.

Every file starts with a marker line carrying the sha256 of the rest of the file, so a hand edit
is detected (`is_intact`) and a file without the marker is never taken for one of ours
(`read_marker`). The stack unit also carries the digest of its compose files in a comment line:
an edited compose file changes the unit text, and the next reconcile restarts the stack. Env
files count by path only; their contents are secrets and never read.

How values are written, following systemd's unit file parser (systemd 252, checked against it in
tests/unit/test_render_verify.py):

- Command lines (`ExecStart=`, `ExecStop=`) are split into words with C-style quoting and
  escapes; then `%` specifiers are expanded in each word, and `$VAR`/`${VAR}` when the command
  runs. So `%` is written `%%` and `$` is written `$$`, and a word with anything besides
  `[A-Za-z0-9_.,:=+@/-]` is put in double quotes with `\\` and `\"` escaped inside.
  The executable (first word) is stricter: systemd reads prefixes (`-@:+!|`) off its start,
  forbids quotes and backslashes in it and never expands variables in it; such values are refused.
- Paths (`WorkingDirectory=`, `EnvironmentFile=`) are taken verbatim apart from `%` specifiers
  (no quoting exists there), must be absolute and normalized, and lose trailing whitespace to
  the line parser; a path ending in whitespace or a backslash is therefore written with a
  trailing `/`, which systemd's path simplification removes again.
- Control characters (newlines included), lone surrogates and Unicode line/paragraph separators
  cannot be written at all: `unit_value_problem` says why, config validation refuses them early,
  and the renderer raises `ValueError` as the last line of defence.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stackd.core.durations import format_duration
from stackd.core.models import Config, StackSpec, stack_name_problem

__all__ = [
    "MARKER_PREFIX",
    "RenderInput",
    "command_line",
    "compose_project_name",
    "content_hash",
    "escape_exec_arg",
    "escape_executable",
    "escape_path_value",
    "is_intact",
    "read_marker",
    "render_all",
    "render_stack_units",
    "unit_value_problem",
]

MARKER_PREFIX = "# stackd:"
_MARKER_LINE = (
    MARKER_PREFIX + " managed unit, sha256={}; do not edit, changes are overwritten or reported"
)
_MARKER_RE = re.compile(re.escape(MARKER_PREFIX) + r" managed unit, sha256=([^;\s]*)")
_COMPOSE_DIGEST_LINE = MARKER_PREFIX + " compose-digest={}"
_NO_DIGEST = "unreadable"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# Characters a command-line word may hold without quotes ("%" and "$" are doubled anyway).
_BARE_WORD_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,:=+@/-%$"
)
# Read off the start of the executable by systemd (see systemd.service(5), "Command lines").
_EXEC_PREFIX_CHARS = frozenset("-@:+!|")
# Unicode categories that may never reach a unit file: control characters (C0, DEL, C1: line
# breaks for systemd or for tools reading the file), lone surrogates (not UTF-8), line and
# paragraph separators (line breaks for Python's str.splitlines and others).
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_NAME_MAX = 255  # bytes per path component
_PATH_MAX = 4096  # bytes per path, terminating NUL included

# compose requires project names matching this (docker compose and podman-compose alike).
_PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class RenderInput:
    """Everything the renderer needs for one stack, gathered by an adapter."""

    stack: StackSpec
    compose_command: tuple[str, ...]
    startup_timeout_s: float
    update_timeout_s: float
    compose_digest: str  # sha256 hex of the compose files' contents; "" when unreadable
    env_files: tuple[Path, ...]  # already resolved (env_files, or the legacy fallback)

    @classmethod
    def from_config(
        cls, config: Config, stack: StackSpec, *, compose_digest: str, env_files: tuple[Path, ...]
    ) -> RenderInput:
        """The input for `stack` under `config`: the stack's own startup timeout when it has
        one, else the daemon's default; the update timeout from `[updates]`."""
        return cls(
            stack=stack,
            compose_command=config.daemon.compose_command,
            startup_timeout_s=config.startup_timeout_of(stack),
            update_timeout_s=config.updates.timeout_s,
            compose_digest=compose_digest,
            env_files=env_files,
        )


def unit_value_problem(value: str) -> str | None:
    """Why `value` cannot be written into a unit file, or None when it can."""
    if value.isprintable():  # every forbidden category is non-printable: the common case
        return None
    for index, char in enumerate(value):
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            return (
                f"character U+{ord(char):04X} at position {index} cannot be written into a "
                "systemd unit (control characters and line breaks are not allowed)"
            )
        if _is_noncharacter(ord(char)):
            return (
                f"character U+{ord(char):04X} at position {index} cannot be written into a "
                "systemd unit (systemd refuses Unicode noncharacters as not UTF-8 clean)"
            )
    return None


def _is_noncharacter(code: int) -> bool:
    """U+FDD0..U+FDEF and U+xFFFE/U+xFFFF of every plane: systemd's UTF-8 check refuses them
    and drops the whole assignment."""
    return 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE


def _checked(value: str, what: str) -> str:
    problem = unit_value_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {value!r}: {problem}")
    return value


@functools.lru_cache(maxsize=1024)
def escape_exec_arg(s: str) -> str:
    """One argument of `ExecStart=`/`ExecStop=`, written so that systemd passes exactly `s`."""
    _checked(s, "command argument")
    doubled = s.replace("%", "%%").replace("$", "$$")
    if doubled and all(c in _BARE_WORD_CHARS for c in doubled):
        return doubled
    return '"' + doubled.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=64)
def escape_executable(s: str) -> str:
    """The first word of a command line: an absolute path or a name found on systemd's PATH."""
    _checked(s, "executable")
    if not s:
        raise ValueError("the executable of a command cannot be empty")
    if s[0] in _EXEC_PREFIX_CHARS:
        raise ValueError(
            f"executable {s!r} starts with {s[0]!r}, which systemd reads as a command prefix"
        )
    if any(c in s for c in "\"'\\$"):
        raise ValueError(
            f"executable {s!r}: quotes, backslashes and '$' are not allowed in the program path"
        )
    if s.startswith("/"):
        if s != _normalized_path(s, "executable") or s.endswith("/"):
            raise ValueError(f"executable {s!r} is not a normalized path to a file")
    elif "/" in s or s in {".", ".."} or len(s.encode()) > _NAME_MAX:
        raise ValueError(f"executable {s!r} is neither an absolute path nor a program name")
    return escape_exec_arg(s)


def _normalized_path(s: str, what: str) -> str:
    """`s` as systemd simplifies it: absolute, without empty or "." components, no "..".

    systemd refuses paths with ".." components ("not normalized") and paths too long for the
    kernel, so they are refused here instead of producing a unit that silently ignores them.
    """
    _checked(s, what)
    if not s.startswith("/"):
        raise ValueError(f"{what} {s!r} must be an absolute path")
    parts = [p for p in s.split("/") if p not in {"", "."}]
    if ".." in parts:
        raise ValueError(f"{what} {s!r} must not contain '..' components")
    if any(len(p.encode()) > _NAME_MAX for p in parts):
        raise ValueError(f"{what} {s!r} has a component longer than {_NAME_MAX} bytes")
    normalized = "/" + "/".join(parts)
    if len(normalized.encode()) >= _PATH_MAX:
        raise ValueError(f"{what} {s!r} is longer than {_PATH_MAX - 1} bytes")
    return normalized


def escape_path_value(s: str) -> str:
    """An absolute path for `WorkingDirectory=`/`EnvironmentFile=`; systemd reads back `s`.

    `s` is normalized first (systemd simplifies "//" and "/./" too); the result names the same
    file. A trailing "/" protects trailing whitespace and backslashes from the line parser.
    """
    value = _normalized_path(s, "path").replace("%", "%%")
    if value.endswith((" ", "\\")):
        value += "/"
    return value


def compose_project_name(stack_name: str) -> str:
    """The compose project name of a stack, used by `-p` and in the `com.docker.compose.project`
    label of its containers.

    compose accepts only `[a-z0-9][a-z0-9_-]*`. A stack name of that form is used as it is;
    any other (capitals, dots) is lowercased, each other character becomes "_", and the first
    8 hex digits of the sha256 of the original name are appended ("My.App" ->
    "my_app-<8 hex>"), so that two stacks never share a project ("web" vs "Web", "a.b" vs "a_b").
    """
    problem = stack_name_problem(stack_name)
    if problem is not None:
        raise ValueError(problem)
    if _PROJECT_NAME.fullmatch(stack_name):
        return stack_name
    base = re.sub(r"[^a-z0-9_-]", "_", stack_name.lower())
    suffix = hashlib.sha256(stack_name.encode()).hexdigest()[:8]
    return f"{base}-{suffix}"


def content_hash(body: str) -> str:
    """The sha256 hex digest the marker line carries for `body` (the file after the marker)."""
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


def read_marker(text: str) -> str | None:
    """The hash a file's stackd marker claims, or None when its first line is no stackd marker."""
    first_line = text.partition("\n")[0]
    match = _MARKER_RE.match(first_line)
    return match.group(1) if match else None


def is_intact(text: str) -> bool:
    """True when `text` has a stackd marker whose hash matches the rest of the file.

    False means the file is not stackd's, or it was edited after stackd wrote it.
    """
    claimed = read_marker(text)
    return claimed is not None and claimed == content_hash(text.partition("\n")[2])


def _with_marker(lines: list[str]) -> str:
    body = "\n".join(lines) + "\n"
    return _MARKER_LINE.format(content_hash(body)) + "\n" + body


def _timespan(seconds: float, what: str) -> str:
    # 0 would mean "no timeout" to systemd; a timeout that never fires is not configurable here.
    if not math.isfinite(seconds) or round(seconds * 1_000_000) < 1:
        raise ValueError(f"{what} {seconds!r}: must be a finite duration of at least 1us")
    return format_duration(seconds)


def _compose_file_arg(name: str) -> str:
    # A relative name starting with "-" would be read as an option by compose: "./-x" is the
    # same file (relative to WorkingDirectory) without the ambiguity.
    if name.startswith("-"):
        return "./" + name
    return name


def command_line(words: Iterable[str]) -> str:
    """A command line for ExecStart= and the like, every word escaped for systemd."""
    executable, *args = words
    return " ".join([escape_executable(executable), *map(escape_exec_arg, args)])


def render_stack_units(inp: RenderInput) -> dict[str, str]:
    """The two unit files of one stack, by unit name: `<name>.service`, `<name>-update.service`."""
    stack = inp.stack
    project = compose_project_name(stack.name)
    if not inp.compose_command:
        raise ValueError("the compose command cannot be empty")
    if inp.compose_digest and not _SHA256_HEX.fullmatch(inp.compose_digest):
        raise ValueError(f"compose digest {inp.compose_digest!r} is not a sha256 hex digest")
    compose = [*inp.compose_command, "-p", project]
    for name in stack.compose_files:
        if not name:
            raise ValueError(f"stack {stack.name!r}: a compose file name cannot be empty")
        compose += ["-f", _compose_file_arg(name)]
    up = command_line([*compose, "up", "-d", "--remove-orphans"])
    environment = [
        f"WorkingDirectory={escape_path_value(str(stack.directory))}",
        *(f"EnvironmentFile={escape_path_value(str(path))}" for path in inp.env_files),
    ]
    digest = inp.compose_digest or _NO_DIGEST

    stack_unit = [
        _COMPOSE_DIGEST_LINE.format(digest),
        "[Unit]",
        f"Description=stackd stack {stack.name}",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        *environment,
        f"ExecStart={up}",
        f"ExecStop={command_line([*compose, 'down'])}",
        f"TimeoutStartSec={_timespan(inp.startup_timeout_s, 'startup timeout')}",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    # RemainAfterExit: systemd unloads an inactive unit nothing refers to, and with it the
    # Result, timestamps and exit statuses of an update that succeeded. Kept `active
    # (exited)`, they survive until the daemon has recorded them (it stops the unit then),
    # also for a daemon that was not running when the update ended. No ExecStopPost marker:
    # its process would delay the end of every update by ~10-30 ms.
    update_unit = [
        "[Unit]",
        f"Description=stackd update of stack {stack.name}",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        *environment,
        f"ExecStart={command_line([*compose, 'pull'])}",
        f"ExecStart={up}",
        f"TimeoutStartSec={_timespan(inp.update_timeout_s, 'update timeout')}",
    ]
    return {
        stack.unit: _with_marker(stack_unit),
        stack.update_unit: _with_marker(update_unit),
    }


def render_all(inputs: Iterable[RenderInput]) -> dict[str, str]:
    """The unit files of every managed stack, by unit name, sorted by unit name.

    Adopted stacks (`managed = false`) are skipped: their units are written by another tool,
    stackd only verifies them. Two inputs for the same stack name are a broken invariant.
    """
    units: dict[str, str] = {}
    for inp in inputs:
        if not inp.stack.managed:
            continue
        rendered = render_stack_units(inp)
        if units.keys() & rendered.keys():
            raise ValueError(f"stack {inp.stack.name!r} is given twice")
        units.update(rendered)
    return dict(sorted(units.items()))
