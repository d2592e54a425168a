"""The config file and STACKD_* overrides, validated into the core's frozen `Config`.

Sources, highest precedence first: `STACKD_<SECTION>__<KEY>` environment variables, then the TOML
file (`--config PATH` > `STACKD_CONFIG` > `$XDG_CONFIG_HOME/stackd/config.toml`), then defaults.

pydantic models validate; this module reads the sources itself rather than through
pydantic-settings' own sources, for three reasons: the environment is passed in explicitly (tests
never touch the process env), stack names in variable names keep their case (`web` vs `Web`), and
every error must say where the bad value came from, the file and key path or the variable.
The core never sees pydantic: `load_config` returns `stackd.core.models.Config`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_origin

# stackd uses no pydantic plugins; looking for them scans every installed distribution's
# entry points (~20 ms on each `stackd check --offline`, a post-switch assertion).
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo

from stackd.configpath import (
    CONFIG_ENV_VAR,
    ConfigLocation,
    default_config_path,
    locate_config,
    read_config,
)
from stackd.core.durations import parse_duration
from stackd.core.models import (
    Config,
    DaemonConfig,
    HealMode,
    StackSpec,
    UpdateConfig,
    stack_name_problem,
)
from stackd.errors import ConfigError

__all__ = [
    "CONFIG_ENV_VAR",
    "ENV_ORIGIN",
    "ENV_PREFIX",
    "NON_SETTING_VARS",
    "DaemonSettings",
    "Settings",
    "StackSettings",
    "UpdateSettings",
    "default_config_path",
    "load_config",
    "validate_config",
]

ENV_PREFIX = "STACKD_"
# STACKD_* variables that are never settings. Other STACKD_* variables are settings when they
# start with a section name, or with something close to one: a typo (STACKD_DAEMON_HEAL,
# STACKD_UPDATE__TIMEOUT) is an error rather than silently ignored.
NON_SETTING_VARS = frozenset({CONFIG_ENV_VAR})
_ENV_SECTIONS = ("daemon", "updates", "stacks")
ENV_ORIGIN = "environment"  # the `file` of a ConfigError about an environment variable

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_NAMES = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab"}
# U+FDD0..U+FDEF and U+xFFFE/U+xFFFF of all 17 planes: systemd drops a unit line holding one.
_NONCHARACTER = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(17))
    + "]"
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION = re.compile(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)$")
_TOML_DECLARED_TWICE = re.compile(r"Cannot declare \((.*)\) twice")


# -- value types -------------------------------------------------------------------------------


def _describe(value: object) -> str:
    """A short, one-line description of a TOML or JSON value for an error message."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"the string {shown!r}"
    kinds = {list: "an array", dict: "a table", type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    control = _CONTROL.search(value)
    if control:
        char = control.group()
        name = _CONTROL_NAMES.get(char, f"the control character U+{ord(char):04X}")
        raise ValueError(f"{value!r} contains {name}: values must be one line of printable text")
    odd = _NONCHARACTER.search(value)
    if odd:
        raise ValueError(
            f"{value!r} contains the Unicode noncharacter U+{ord(odd.group()):04X}, which "
            "systemd refuses in unit files: remove it"
        )
    return value


def _word(value: object) -> str:
    text = _text(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _schedule(value: object) -> str:
    text = _text(value)
    if not text.strip():
        raise ValueError("must not be empty: give a systemd calendar expression such as 'daily'")
    return text


def _abs_path(value: object, info: ValidationInfo) -> Path:
    """An absolute path; a leading `~` is the HOME of the environment being loaded."""
    text = _text(value)
    if not text:
        raise ValueError("must not be empty: give an absolute path")
    if text == "~" or text.startswith("~/"):
        home = info.context.get("home") if isinstance(info.context, dict) else None
        if not home:
            raise ValueError(f"{text!r} starts with ~ but HOME is not set: give an absolute path")
        text = home + text[1:]
    elif text.startswith("~"):
        raise ValueError(
            f"{text!r}: only ~ and ~/... are expanded, not ~user: give an absolute path"
        )
    path = Path(text)
    if not path.is_absolute():
        raise ValueError(f"{text!r} must be an absolute path (starting with / or ~/)")
    return path


def _duration(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a duration such as '90s' or '2min', got {_describe(value)}")
    return parse_duration(value)


def _timeout(value: object) -> float:
    seconds = _duration(value)
    if round(seconds * 1_000_000) < 1:  # systemd counts in microseconds; 0 is "no timeout"
        raise ValueError(
            f"a timeout must be at least 1us (systemd reads 0 as no timeout), got {value!r}: "
            "give a span such as '5min'"
        )
    return seconds


def _command(value: object) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f'expected an array such as ["podman", "compose"], got {_describe(value)}')
    if not value:
        raise ValueError('must not be empty: give the compose command, e.g. ["podman", "compose"]')
    words: list[str] = []
    for index, item in enumerate(value, start=1):
        try:
            words.append(_word(item))
        except ValueError as err:
            raise ValueError(f"item {index}: {err}") from None
    return words


Word = Annotated[str, PlainValidator(_word)]
AbsPath = Annotated[Path, PlainValidator(_abs_path)]
Duration = Annotated[float, PlainValidator(_duration)]
Timeout = Annotated[float, PlainValidator(_timeout)]


# -- models ------------------------------------------------------------------------------------


class _Table(BaseModel):
    # strict: TOML has real types, so `update = "yes"` or `concurrency = "4"` is a mistake.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DaemonSettings(_Table):
    """[daemon]"""

    unit_dir: AbsPath = Field(default="~/.config/systemd/user", validate_default=True)
    compose_command: Annotated[list[str], PlainValidator(_command)] = Field(
        default_factory=lambda: ["podman", "compose"]
    )
    startup_timeout: Timeout = 120.0
    allowed_dropin_dirs: list[AbsPath] = Field(default_factory=list)
    heal: Literal["report", "repair"] = "report"
    engine: Literal["podman", "docker"] | None = None


class UpdateSettings(_Table):
    """[updates]"""

    schedule: Annotated[str, PlainValidator(_schedule)] = "daily"
    randomized_delay: Duration = 0.0
    concurrency: int = Field(default=2, ge=1)
    timeout: Timeout = 1800.0
    persistent: bool = True


class StackSettings(_Table):
    """[stacks.<name>]"""

    directory: AbsPath
    compose_files: list[Word] = Field(default_factory=list)
    env_files: list[AbsPath] = Field(default_factory=list)
    legacy_env_files: list[AbsPath] = Field(default_factory=list)
    startup_timeout: Annotated[float | None, PlainValidator(_timeout)] = None
    update: bool = True
    managed: bool = True


class Settings(_Table):
    """The whole file."""

    daemon: DaemonSettings = Field(default_factory=dict, validate_default=True)
    updates: UpdateSettings = Field(default_factory=dict, validate_default=True)
    stacks: dict[str, StackSettings] = Field(default_factory=dict)


_SECTIONS: dict[str, type[_Table]] = {"daemon": DaemonSettings, "updates": UpdateSettings}


# -- loading -----------------------------------------------------------------------------------


class _Problem(NamedTuple):
    file: str
    key: str
    reason: str


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate the configuration; raise ConfigError naming what is wrong.

    A missing file at the default location means the built-in defaults (`source` None); a file
    named by `path` or STACKD_CONFIG must exist.
    """
    env = os.environ if environ is None else environ
    location = locate_config(path, env)
    return validate_config(location, read_config(location), env)


def validate_config(
    location: ConfigLocation, raw: bytes | None, environ: Mapping[str, str]
) -> Config:
    """The configuration from the bytes read at `location` (None: no file, the defaults)."""
    path = location.path
    data = None if raw is None else _parse_toml(path, raw)
    source = path.absolute() if data is not None else None
    file = str(path)

    tree: dict[str, Any] = data if data is not None else {}
    problems = _stack_name_problems(tree, file)
    origins, env_problems = _apply_environment(tree, environ)
    problems += env_problems
    try:
        settings = Settings.model_validate(tree, context={"home": location.home})
    except ValidationError as err:
        problems += [_problem(error, file, origins) for error in err.errors(include_url=False)]
        settings = None
    if problems or settings is None:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(first.file, first.key, first.reason + more)
    return _to_config(settings, source)


def _parse_toml(path: Path, raw: bytes) -> dict[str, Any]:
    file = str(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            file, "", f"not valid UTF-8 at byte {err.start}: save the file as UTF-8"
        ) from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        key, reason = _toml_syntax_problem(str(err), text)
        raise ConfigError(file, key, reason) from err


def _toml_syntax_problem(message: str, text: str) -> tuple[str, str]:
    """tomllib's message as (key, reason): "line N" and a one-line reason saying what to fix."""
    position = _TOML_POSITION.search(message)
    detail = message[: position.start()] if position else message
    if position and position.group(1):
        line, where = int(position.group(1)), f" (column {position.group(2)})"
    else:
        line, where = max(1, len(text.splitlines())), ""
    twice = _TOML_DECLARED_TWICE.match(detail)
    if twice:
        parts = [p.strip().strip("'\"") for p in twice.group(1).split(",") if p.strip()]
        table = ".".join(_toml_key(p) for p in parts)
        if len(parts) == 2 and parts[0] == "stacks":
            reason = (
                f"[{table}] is declared a second time: stack names must be unique, "
                "merge the two tables or rename one"
            )
        else:
            reason = f"[{table}] is declared a second time: merge the two tables"
    elif detail == "Cannot overwrite a value":
        reason = "this key is already set above: keep one of the two"
    else:
        reason = f"invalid TOML: {detail}{where}: fix the syntax"
    return f"line {line}", reason.replace("\n", " ")


def _toml_key(part: str) -> str:
    """One key as TOML writes it: bare when it can be, else a quoted string (always one line)."""
    return part if _BARE_KEY.fullmatch(part) else json.dumps(part)


def _stack_name_problems(tree: Mapping[str, Any], file: str) -> list[_Problem]:
    stacks = tree.get("stacks")
    if not isinstance(stacks, dict):
        return []  # the model reports a `stacks` that is not a table
    problems = []
    for name in stacks:
        reason = _name_problem(name)
        if reason:
            problems.append(_Problem(file, f"stacks.{_toml_key(name)}", reason))
    return problems


def _name_problem(name: str) -> str | None:
    reason = stack_name_problem(name)
    if reason is None:
        return None
    odd = next((c for c in name if not c.isascii()), None)
    if odd is not None:
        reason += f" (it contains the non-ASCII character U+{ord(odd):04X})"
    return reason


# -- environment -------------------------------------------------------------------------------


def _apply_environment(
    tree: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[tuple[str, ...], str], list[_Problem]]:
    """Merge STACKD_<SECTION>__<KEY> variables into `tree`.

    Returns which key paths came from which variable, and the problems of variables that do not
    name a setting or hold a value of the wrong kind.
    """
    origins: dict[tuple[str, ...], str] = {}
    problems: list[_Problem] = []
    for var in sorted(environ):
        if not _meant_as_setting(var):
            continue
        try:
            loc, value = _env_setting(var, environ[var], tree)
        except _EnvProblem as err:
            problems.append(_Problem(ENV_ORIGIN, var, str(err)))
            continue
        table = tree.setdefault(loc[0], {})
        if loc[0] == "stacks" and isinstance(table, dict):
            if loc[1] not in table:
                origins[loc[:2]] = var  # this variable creates the stack
            table = table.setdefault(loc[1], {})
        if isinstance(table, dict):  # otherwise the file's value is wrong: that is reported
            table[loc[-1]] = value
            origins[loc] = var
    return origins, problems


class _EnvProblem(Exception):
    pass


def _meant_as_setting(var: str) -> bool:
    if not var.startswith(ENV_PREFIX) or var in NON_SETTING_VARS:
        return False
    head = var[len(ENV_PREFIX) :].partition("__")[0].lower()
    return (
        head in _ENV_SECTIONS
        or head.startswith(tuple(f"{section}_" for section in _ENV_SECTIONS))
        or bool(difflib.get_close_matches(head, _ENV_SECTIONS, n=1, cutoff=0.75))
    )


_ENV_USAGE = (
    "settings are STACKD_<SECTION>__<KEY> (two underscores) with section DAEMON or UPDATES, "
    "or STACKD_STACKS__<NAME>__<KEY>"
)


def _env_setting(var: str, raw: str, tree: Mapping[str, Any]) -> tuple[tuple[str, ...], Any]:
    parts = var[len(ENV_PREFIX) :].split("__")
    section = parts[0].lower()
    if section in _SECTIONS and len(parts) == 2:
        model: type[_Table] = _SECTIONS[section]
        loc: tuple[str, ...] = (section, parts[1].lower())
    elif section == "stacks" and len(parts) >= 3 and all(parts):
        model = StackSettings
        name = _env_stack_name("__".join(parts[1:-1]), tree)
        reason = _name_problem(name)
        if reason:
            raise _EnvProblem(reason)
        loc = ("stacks", name, parts[-1].lower())
    else:
        raise _EnvProblem(f"not a stackd setting: {_ENV_USAGE}")
    key = loc[-1]
    if key not in model.model_fields:
        raise _EnvProblem(_unknown_key(key, list(model.model_fields)))
    return loc, _env_value(raw, model.model_fields[key].annotation)


def _env_stack_name(written: str, tree: Mapping[str, Any]) -> str:
    """The configured stack a variable means: exact name, else the one matching regardless of
    case (variable names are usually upper case); otherwise a new stack named as written."""
    stacks = tree.get("stacks")
    names = list(stacks) if isinstance(stacks, dict) else []
    if written in names:
        return written
    matches = [name for name in names if name.lower() == written.lower()]
    if len(matches) > 1:
        shown = ", ".join(repr(m) for m in matches)
        raise _EnvProblem(f"matches stacks {shown} regardless of case: write the name exactly")
    return matches[0] if matches else written


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _env_value(raw: str, annotation: Any) -> Any:
    """An environment string as the TOML value it stands for (lists are JSON)."""
    if annotation is bool:
        word = raw.strip().lower()
        if word in _TRUE | _FALSE:
            return word in _TRUE
        raise _EnvProblem(f"expected true or false, got {raw!r}")
    if annotation is int:
        if re.fullmatch(r"\s*[+-]?[0-9]+\s*", raw):
            return int(raw)
        raise _EnvProblem(f"expected a whole number, got {raw!r}")
    if get_origin(annotation) is list:
        try:
            return json.loads(raw)
        except ValueError:
            raise _EnvProblem(
                f'not valid JSON: give a JSON array such as \'["podman", "compose"]\', got {raw!r}'
            ) from None
    return raw


# -- errors ------------------------------------------------------------------------------------


def _unknown_key(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r}; {hint}known keys are: {', '.join(known)}"


def _model_at(loc: tuple[str | int, ...]) -> type[_Table]:
    if not loc:
        return Settings
    if loc[0] == "stacks":
        return StackSettings
    return _SECTIONS.get(str(loc[0]), Settings)


_REASONS: dict[str, str] = {
    "bool_type": "expected true or false, got {value}",
    "bool_parsing": "expected true or false, got {value}",
    "int_type": "expected a whole number, got {value}",
    "int_parsing": "expected a whole number, got {value}",
    "int_from_float": "expected a whole number, got {value}",
    "greater_than_equal": "must be at least {ge}, got {value}",
    "literal_error": "must be {expected}, got {value}",
    "list_type": 'expected an array such as ["a", "b"], got {value}',
    "model_type": "expected a table, got {value}",
    "model_attributes_type": "expected a table, got {value}",
    "dict_type": "expected a table, got {value}",
}


def _problem(error: Any, file: str, origins: Mapping[tuple[str, ...], str]) -> _Problem:
    """One pydantic error as (file or environment, key path or variable, one-line reason)."""
    loc: tuple[str | int, ...] = tuple(error["loc"])
    keys = tuple(p for p in loc if isinstance(p, str))
    items = [p for p in loc if isinstance(p, int)]
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}

    if kind == "missing" and len(keys) == 3 and keys[:2] in origins:
        name, key = keys[1], keys[2]
        reason = (
            f"stack {name!r} is not in the config file and has no {key}: "
            f"set STACKD_STACKS__{name.upper()}__{key.upper()} too"
        )
        return _Problem(ENV_ORIGIN, origins[keys[:2]], reason)
    if kind == "extra_forbidden":
        reason = _unknown_key(keys[-1], list(_model_at(loc[:-1]).model_fields))
    elif kind == "missing":
        reason = f"required key {keys[-1]!r} is missing: add it"
    elif kind == "value_error" and "error" in ctx:
        reason = str(ctx["error"])
    elif kind in _REASONS:
        reason = _REASONS[kind].format(value=_describe(error.get("input")), **ctx)
    else:
        reason = str(error["msg"])
    if items:
        reason = f"item {items[0] + 1}: {reason}"
    reason = reason.replace("\n", " ")

    for length in range(len(keys), 0, -1):
        var = origins.get(keys[:length])
        if var is not None:
            return _Problem(ENV_ORIGIN, var, reason)
    return _Problem(file, ".".join(_toml_key(k) for k in keys), reason)


# -- conversion --------------------------------------------------------------------------------


def _to_config(settings: Settings, source: Path | None) -> Config:
    daemon, updates = settings.daemon, settings.updates
    return Config(
        daemon=DaemonConfig(
            unit_dir=daemon.unit_dir,
            compose_command=tuple(daemon.compose_command),
            startup_timeout_s=daemon.startup_timeout,
            allowed_dropin_dirs=tuple(daemon.allowed_dropin_dirs),
            heal=HealMode(daemon.heal),
            engine=daemon.engine,
        ),
        updates=UpdateConfig(
            schedule=updates.schedule,
            randomized_delay_s=updates.randomized_delay,
            concurrency=updates.concurrency,
            timeout_s=updates.timeout,
            persistent=updates.persistent,
        ),
        stacks=tuple(
            StackSpec(
                name=name,
                directory=stack.directory,
                compose_files=tuple(stack.compose_files),
                env_files=tuple(stack.env_files),
                legacy_env_files=tuple(stack.legacy_env_files),
                startup_timeout_s=stack.startup_timeout,
                update=stack.update,
                managed=stack.managed,
            )
            for name, stack in settings.stacks.items()
        ),
        source=source,
    )
