"""daemon.engine: which engine answers 'which image runs', when the compose command hides it."""

from __future__ import annotations

from pathlib import Path

import pytest

from stackd.adapters.compose import engine_for
from stackd.errors import ConfigError
from stackd.settings import load_config


def _load(tmp_path: Path, body: str) -> object:
    path = tmp_path / "config.toml"
    path.write_text(body)
    return load_config(path, {"HOME": str(tmp_path)})


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_engine_is_taken_as_given(tmp_path: Path, engine: str) -> None:
    config = _load(tmp_path, f'[daemon]\nengine = "{engine}"\n')
    assert config.daemon.engine == engine  # type: ignore[attr-defined]


def test_engine_defaults_to_none_and_is_derived_from_the_compose_command(tmp_path: Path) -> None:
    config = _load(tmp_path, '[daemon]\ncompose_command = ["docker-compose"]\n')
    assert config.daemon.engine is None  # type: ignore[attr-defined]
    assert engine_for(("docker-compose",)) == "docker"
    assert engine_for(("/usr/bin/podman", "compose")) == "podman"
    assert engine_for(("/opt/fake-compose",)) is None


def test_unknown_engine_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, '[daemon]\nengine = "containerd"\n')
    assert caught.value.key == "daemon.engine"
    assert "\n" not in str(caught.value)
