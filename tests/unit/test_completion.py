"""Completion scripts and the man page, generated from the CLI parser, checked by the shells
(and groff) themselves. A shell that is not installed skips its test (CI=true: fails)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stackd import __version__
from stackd.cli import build_parser
from stackd.completion import completion_script, man_page, model

REPO = Path(__file__).resolve().parents[2]
MAN_PAGE = REPO / "man" / "stackd.1"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{tool} is not installed (CI=true: install it in .ci/run)")
        pytest.skip(f"{tool} is not installed")
    return path


@pytest.fixture
def script(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    shell: str = request.param
    path = tmp_path / f"stackd.{shell}"
    path.write_text(completion_script(build_parser(), shell))
    return path


def run(*argv: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "LANG": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=30)


class TestModel:
    """The model covers every subcommand and option of the parser."""

    def test_every_subcommand_and_option(self) -> None:
        options, commands = model(build_parser())
        assert "--config" in {f for o in options for f in o.flags}
        names = [c.name for c in commands]
        assert names[:3] == ["daemon", "status", "check"]
        assert {"setup", "init", "doctor", "completion"} <= set(names)
        init = next(c for c in commands if c.name == "init")
        directory = next(o for o in init.options if "--directory" in o.flags)
        assert directory.takes_arg
        assert directory.directory
        compose = next(o for o in init.options if "--compose-file" in o.flags)
        assert compose.path
        assert compose.repeat
        completion = next(c for c in commands if c.name == "completion")
        assert completion.positional_choices == ("bash", "zsh", "fish")

    def test_unknown_shell(self) -> None:
        with pytest.raises(ValueError, match="tcsh"):
            completion_script(build_parser(), "tcsh")


def bash_complete(script: Path, tmp: Path, *words: str) -> list[str]:
    """What bash offers after `words` (the last one being completed)."""
    line = " ".join(f"'{w}'" for w in words)
    program = (
        f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
        'cd "$HOME"; _stackd; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = run(need("bash"), "--norc", "-c", program, tmp=tmp)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


class TestBash:
    @pytest.mark.parametrize("script", ["bash"], indirect=True)
    def test_defines_the_completion(self, script: Path, tmp_path: Path) -> None:
        result = run(
            need("bash"), "--norc", "-c", f"source {script}; complete -p stackd", tmp=tmp_path
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "complete -F _stackd stackd"

    @pytest.mark.parametrize("script", ["bash"], indirect=True)
    def test_completes_commands_options_and_choices(self, script: Path, tmp_path: Path) -> None:
        assert bash_complete(script, tmp_path, "stackd", "sta") == ["status"]
        assert "doctor" in bash_complete(script, tmp_path, "stackd", "")
        assert bash_complete(script, tmp_path, "stackd", "status", "--j") == ["--json"]
        assert bash_complete(script, tmp_path, "stackd", "--config", "x", "che") == ["check"]
        assert bash_complete(script, tmp_path, "stackd", "completion", "") == [
            "-h",
            "--help",
            "bash",
            "zsh",
            "fish",
        ]
        (tmp_path / "compose.yaml").write_text("")
        (tmp_path / "stacks").mkdir()
        assert bash_complete(script, tmp_path, "stackd", "init", "x", "--compose-file", "comp") == [
            "compose.yaml"
        ]
        assert bash_complete(script, tmp_path, "stackd", "init", "x", "--directory", "") == [
            "stacks"
        ]


class TestZsh:
    @pytest.mark.parametrize("script", ["zsh"], indirect=True)
    def test_parses_and_registers(self, script: Path, tmp_path: Path) -> None:
        zsh = need("zsh")
        assert run(zsh, "-n", str(script), tmp=tmp_path).returncode == 0
        program = (
            f"autoload -Uz compinit; compinit -u -d {tmp_path}/zcompdump; source {script}; "
            "print -r -- $_comps[stackd]"
        )
        result = run(zsh, "-f", "-c", program, tmp=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "_stackd"


class TestFish:
    @pytest.mark.parametrize("script", ["fish"], indirect=True)
    def test_parses_and_completes(self, script: Path, tmp_path: Path) -> None:
        fish = need("fish")
        check = run(fish, "--no-config", "-n", str(script), tmp=tmp_path)
        assert check.returncode == 0, check.stderr

        def complete(line: str) -> list[str]:
            program = f"source {script}; complete -C '{line}'"
            result = run(fish, "--no-config", "-c", program, tmp=tmp_path)
            assert result.returncode == 0, result.stderr
            return [row.split("\t")[0] for row in result.stdout.splitlines()]

        assert complete("stackd sta") == ["status"]
        assert "--json" in complete("stackd doctor --")
        assert "--offline" not in complete("stackd doctor --")
        assert complete("stackd completion ") == ["bash", "fish", "zsh"]
        assert "--no-update" in complete("stackd init web --")


class TestManPage:
    def test_committed_page_is_current(self) -> None:
        """man/stackd.1 is what the parser generates: regenerate with
        `python -m stackd.completion man > man/stackd.1`."""
        assert MAN_PAGE.read_text() == man_page(build_parser(), __version__)

    def test_module_entry_point_prints_it(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "stackd.completion", "man"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert result.stdout == MAN_PAGE.read_text()

    def test_documents_every_subcommand(self) -> None:
        _, commands = model(build_parser())
        text = MAN_PAGE.read_text()
        for command in commands:
            assert f".SS {command.name}\n" in text

    def test_renders_without_warnings(self, tmp_path: Path) -> None:
        groff = need("groff")
        result = run(groff, "-man", "-Tutf8", "-ww", "-z", str(MAN_PAGE), tmp=tmp_path)
        assert result.returncode == 0
        assert result.stderr == ""
        man = shutil.which("man")
        if man is not None:
            shown = run(man, "--warnings", "-l", str(MAN_PAGE), tmp=tmp_path)
            assert shown.returncode == 0
            assert shown.stderr == ""
            assert "Add a [stacks.NAME] table" in shown.stdout
