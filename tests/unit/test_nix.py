"""packaging/nix: every .nix file parses (`nix-instantiate --parse`), and the package's Python
dependencies are those of pyproject.toml. Without nix-instantiate the parse test skips; under
CI=true it fails (.ci/run installs nix-bin)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NIX_DIR = REPO / "packaging" / "nix"
NIX_FILES = sorted(NIX_DIR.glob("*.nix"))


def nix_instantiate() -> str:
    path = shutil.which("nix-instantiate")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("nix-instantiate is missing under CI=true: install nix-bin (.ci/run)")
        pytest.skip("nix-instantiate is not installed (Debian: apt install nix-bin)")
    return path


def test_the_flake_files_exist() -> None:
    assert {p.name for p in NIX_FILES} >= {"flake.nix", "package.nix", "hm-module.nix"}


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: p.name)
def test_parses(path: Path, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "NIX_CONFIG": "build-users-group =",  # no nixbld group here; only parsing
        "NIX_STATE_DIR": str(tmp_path / "state"),
    }
    result = subprocess.run(
        [nix_instantiate(), "--parse", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_package_dependencies_match_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    text = (NIX_DIR / "package.nix").read_text()
    block = re.search(r"dependencies = with python3Packages; \[(.*?)\];", text, re.S)
    assert block is not None
    assert set(block.group(1).split()) == wanted


def test_module_runs_the_check_after_reload_systemd() -> None:
    text = (NIX_DIR / "hm-module.nix").read_text()
    assert 'entryAfter [ "reloadSystemd" ]' in text
    assert text.index("reload ||") < text.index("check --offline ||")
    assert "3) stackd_fail" in text
