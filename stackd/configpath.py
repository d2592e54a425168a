"""Where the config file is, and whose HOME `~` means: no pydantic here, so that the config
cache can find the file without importing the validator."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from stackd.errors import ConfigError

__all__ = [
    "CONFIG_ENV_VAR",
    "ConfigLocation",
    "default_config_path",
    "home_of",
    "locate_config",
    "read_config",
]

CONFIG_ENV_VAR = "STACKD_CONFIG"


class ConfigLocation(NamedTuple):
    """The config file to read; `named_by` says who named it ("--config", STACKD_CONFIG), None
    for the default location, where a missing file means the built-in defaults."""

    path: Path
    named_by: str | None
    home: str | None


def home_of(environ: Mapping[str, str]) -> str | None:
    """HOME of the environment being loaded; the passwd entry when it is unset."""
    home = environ.get("HOME")
    if home:
        return home
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return None


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/stackd/config.toml`, XDG_CONFIG_HOME defaulting to ~/.config."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    absolute = bool(xdg) and Path(xdg).is_absolute()
    base = Path(xdg) if absolute else Path(home_of(env) or "/") / ".config"
    return base / "stackd" / "config.toml"


def locate_config(path: Path | None, environ: Mapping[str, str]) -> ConfigLocation:
    """`--config PATH` > `STACKD_CONFIG` > the default path; a leading `~` is expanded."""
    home = home_of(environ)
    named_by = "--config"
    if path is None and environ.get(CONFIG_ENV_VAR):
        path, named_by = Path(environ[CONFIG_ENV_VAR]), CONFIG_ENV_VAR
    if path is None:
        return ConfigLocation(default_config_path(environ), None, home)
    return ConfigLocation(_expand_user(path, home), named_by, home)


def _expand_user(path: Path, home: str | None) -> Path:
    text = str(path)
    if home and (text == "~" or text.startswith("~/")):
        return Path(home + text[1:])
    return path


def read_config(location: ConfigLocation) -> bytes | None:
    """The file's bytes; None when the default file is absent (a named one must exist)."""
    file = str(location.path)
    try:
        return location.path.read_bytes()
    except FileNotFoundError:
        if location.named_by is None:
            return None
        fix = "drop --config" if location.named_by == "--config" else f"unset {CONFIG_ENV_VAR}"
        raise ConfigError(file, "", f"no such file: create it or {fix}") from None
    except OSError as err:
        raise ConfigError(file, "", f"cannot read the file: {err.strerror}") from err
