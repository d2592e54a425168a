"""The validated config, remembered by exactly what it was made from.

Short-lived commands that need the whole config (`check --offline`, the post-switch assertion
of an activation, and `render`) would otherwise spend ~90 ms importing pydantic and building
its validators: more than reading and checking 500 stacks. The cache key is everything
`load_config` depends on: the file's bytes and absolute path, the STACKD_* variables, HOME,
XDG_CONFIG_HOME, the user, and stackd's own code (where it is installed, the size and mtime of
the modules that define a valid config); any change is a miss and a fresh
validation. Only a config that validated is stored, so every error is still worded by
`load_config`. The cache is private to the user (0600 in a 0700 directory, owner checked
before reading); a cache that cannot be read or written is a miss, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

from stackd import __version__
from stackd.configpath import home_of, locate_config, read_config
from stackd.core.models import Config

__all__ = ["ENV_KEYS", "cache_file", "load_config_cached"]

FORMAT = b"stackd-config-cache 1\n"
# The variables load_config reads besides STACKD_*; tests/unit/test_configcache.py holds
# load_config to this list.
ENV_KEYS = ("HOME", "XDG_CONFIG_HOME")
_PACKAGE = Path(__file__).resolve().parent
# The code that decides what a valid config is and what a Config looks like.
_CODE = ("__init__.py", "settings.py", "configpath.py", "core/models.py", "core/durations.py")


def cache_file(environ: Mapping[str, str]) -> Path | None:
    """`$XDG_CACHE_HOME/stackd/config.pickle`, XDG_CACHE_HOME defaulting to ~/.cache."""
    xdg = environ.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "stackd" / "config.pickle"
    home = home_of(environ)
    return Path(home) / ".cache" / "stackd" / "config.pickle" if home else None


def load_config_cached(path: Path | None, environ: Mapping[str, str]) -> Config:
    """`load_config(path, environ)`, from the cache when nothing it depends on changed."""
    location = locate_config(path, environ)
    raw = read_config(location)  # read once: what is validated is what the key names
    key = _key(location.path, raw, environ)
    cache = cache_file(environ)
    if cache is not None:
        config = _read(cache, key)
        if config is not None:
            return config
    from stackd.settings import validate_config

    config = validate_config(location, raw, environ)
    if cache is not None:
        _write(cache, key, config)
    return config


def _key(path: Path, raw: bytes | None, environ: Mapping[str, str]) -> bytes:
    digest = hashlib.sha256(FORMAT + __version__.encode() + sys.version.encode())
    # Where the code lives too: a Nix store path changes with the build while its files all
    # carry the same mtime.
    digest.update(f"{_PACKAGE}\0".encode())
    for name in _CODE:
        info = os.stat(_PACKAGE / name)
        digest.update(f"{name}:{info.st_mtime_ns}:{info.st_size}\0".encode())
    digest.update(f"{os.getuid()}\0{path.absolute()}\0".encode())
    digest.update(b"\1" + raw if raw is not None else b"\0")
    variables = sorted(
        (k, v) for k, v in environ.items() if k.startswith("STACKD_") or k in ENV_KEYS
    )
    for name, value in variables:
        digest.update(f"\0{name}={value}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest().encode() + b"\n"


def _read(cache: Path, key: bytes) -> Config | None:
    try:
        fd = os.open(cache, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with open(fd, "rb") as file:
        info = os.fstat(file.fileno())
        # Only a file this user wrote and nobody else can change is unpickled.
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        if file.readline() != FORMAT or file.readline() != key:
            return None
        try:
            config = pickle.load(file)  # noqa: S301  (this user's own 0600 file, checked above)
        except Exception:  # a torn or foreign file: a miss
            return None
    return config if isinstance(config, Config) else None


def _write(cache: Path, key: bytes, config: Config) -> None:
    from stackd.adapters.fsutil import replace_file  # tempfile: only on a miss

    data = FORMAT + key + pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_file(cache, data, 0o600, sync_dir=False)
