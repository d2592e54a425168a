"""The config cache of the short-lived commands: a hit is exactly what load_config returns, and
anything load_config depends on changing is a miss."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from stackd import configcache
from stackd.configcache import ENV_KEYS, cache_file, load_config_cached
from stackd.errors import ConfigError
from stackd.settings import load_config

CONFIG = """\
[daemon]
compose_command = ["podman", "compose"]

[stacks.web]
directory = "~/stacks/web"
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    (home / ".config" / "stackd").mkdir(parents=True)
    (home / ".config" / "stackd" / "config.toml").write_text(CONFIG)
    return {"HOME": str(home)}


def config_file(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) / ".config" / "stackd" / "config.toml"


def cache_of(env: Mapping[str, str]) -> Path:
    path = cache_file(env)
    assert path is not None
    return path


def test_first_load_validates_and_stores_then_the_cache_answers(env: dict[str, str]) -> None:
    first = load_config_cached(None, env)
    assert first == load_config(None, env)
    cache = cache_of(env)
    assert cache == Path(env["HOME"]) / ".cache" / "stackd" / "config.pickle"
    assert cache.stat().st_mode & 0o777 == 0o600
    assert cache.parent.stat().st_mode & 0o777 == 0o700
    stamp = cache.stat().st_mtime_ns
    assert load_config_cached(None, env) == first
    assert cache.stat().st_mtime_ns == stamp  # a hit writes nothing


def test_a_hit_does_not_import_pydantic(env: dict[str, str]) -> None:
    load_config_cached(None, env)
    probe = (
        "import sys, os\n"
        "from stackd.configcache import load_config_cached\n"
        "config = load_config_cached(None, os.environ)\n"
        "print(config.stacks[0].name, 'pydantic' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["web", "False"]


@pytest.mark.parametrize(
    "change",
    ["file", "stackd-var", "home", "xdg-config-home"],
)
def test_what_load_config_depends_on_changing_is_a_miss(env: dict[str, str], change: str) -> None:
    load_config_cached(None, env)
    if change == "file":
        config_file(env).write_text(CONFIG.replace("podman", "docker"))
    elif change == "stackd-var":
        env["STACKD_DAEMON__HEAL"] = "repair"
    elif change == "home":
        # The same file seen from another HOME: `~` means something else now.
        other = Path(env["HOME"]).with_name("other")
        (other / ".config").mkdir(parents=True)
        (other / ".config" / "stackd").symlink_to(config_file(env).parent)
        env["XDG_CACHE_HOME"] = str(cache_of(env).parent.parent)  # keep the same cache file
        env["HOME"] = str(other)
    else:
        moved = Path(env["HOME"]) / "xdg"
        (moved / "stackd").mkdir(parents=True)
        (moved / "stackd" / "config.toml").write_text(CONFIG.replace("web", "api"))
        env["XDG_CONFIG_HOME"] = str(moved)
    assert load_config_cached(None, env) == load_config(None, env)


def test_a_bad_config_is_worded_by_load_config_and_not_stored(env: dict[str, str]) -> None:
    config_file(env).write_text(CONFIG + "\n[stacks.api]\n")
    with pytest.raises(ConfigError) as cached:
        load_config_cached(None, env)
    with pytest.raises(ConfigError) as direct:
        load_config(None, env)
    assert str(cached.value) == str(direct.value)
    assert not cache_of(env).exists()


def test_a_named_file_that_is_missing_is_the_same_error(env: dict[str, str]) -> None:
    missing = Path(env["HOME"]) / "nowhere.toml"
    with pytest.raises(ConfigError, match="no such file"):
        load_config_cached(missing, env)


@pytest.mark.parametrize("damage", ["torn", "foreign-key", "group-writable", "symlink"])
def test_a_damaged_or_untrusted_cache_is_a_miss(env: dict[str, str], damage: str) -> None:
    expected = load_config_cached(None, env)
    cache = cache_of(env)
    if damage == "torn":
        cache.write_bytes(cache.read_bytes()[:-20])
    elif damage == "foreign-key":
        lines = cache.read_bytes().split(b"\n", 2)
        cache.write_bytes(lines[0] + b"\n" + b"0" * 64 + b"\n" + lines[2])
    elif damage == "group-writable":
        cache.chmod(0o620)
    else:
        target = cache.with_name("elsewhere")
        cache.rename(target)
        cache.symlink_to(target)
    assert load_config_cached(None, env) == expected


def test_without_home_or_xdg_cache_home_nothing_is_cached(tmp_path: Path) -> None:
    env = {"STACKD_CONFIG": str(tmp_path / "c.toml"), "XDG_CACHE_HOME": "relative/ignored"}
    (tmp_path / "c.toml").write_text('[stacks.web]\ndirectory = "/srv/web"\n')
    if cache_file(env) is not None:  # HOME unset: the passwd entry; keep away from it
        env["HOME"] = str(tmp_path / "home")
    assert load_config_cached(None, env) == load_config(None, env)


class RecordingEnviron(Mapping[str, str]):
    """An environment that notes every variable read by name."""

    def __init__(self, data: Mapping[str, str]) -> None:
        self._data = dict(data)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_load_config_reads_no_variable_the_cache_key_leaves_out(env: dict[str, str]) -> None:
    environ = RecordingEnviron(
        {**env, "XDG_CONFIG_HOME": "", "STACKD_UPDATES__CONCURRENCY": "3", "PATH": "/bin"}
    )
    load_config(None, environ)
    assert {v for v in environ.read if not v.startswith("STACKD_")} <= set(ENV_KEYS)


def test_stackd_installed_elsewhere_is_a_miss(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Nix store path changes with each build while every file keeps the same mtime."""
    load_config_cached(None, env)
    stored = cache_of(env).stat().st_ino
    copy = tmp_path / "store" / "stackd"
    shutil.copytree(configcache._PACKAGE, copy, copy_function=shutil.copy2)
    monkeypatch.setattr(configcache, "_PACKAGE", copy)
    assert load_config_cached(None, env) == load_config(None, env)
    assert cache_of(env).stat().st_ino != stored  # validated afresh, stored anew (a rename)
