"""The docs cannot rot: every command in a ```sh block of docs/*.md runs in the sandbox, with
a configured daemon (stack `web`, fake compose) installed by `stackd setup`, and must exit
with the code its `# exit: N` annotation says (0 without one)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, STACKD_BIN, stack_entry, stackd, stacks_config, status_json
from sandbox import Sandbox

DOCS = sorted((REPO / "docs").glob("*.md"))
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```sh[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)
_EXIT = re.compile(r"#\s*exit:\s*(\d+)\s*$")


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    command: str
    exit_code: int

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.command}"


def doc_commands(path: Path) -> list[DocCommand]:
    """The commands of every ```sh block (a trailing backslash continues a line)."""
    text = path.read_text()
    commands = []
    for fence in _FENCE.finditer(text):
        first_line = text.count("\n", 0, fence.start("body")) + 1
        pending, start = "", first_line
        for offset, raw in enumerate(fence.group("body").splitlines()):
            line = raw.strip()
            if not pending:
                start = first_line + offset
            if not line or (line.startswith("#") and not pending):
                continue
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            full = pending + line
            pending = ""
            match = _EXIT.search(full)
            commands.append(DocCommand(path.name, start, full, int(match.group(1)) if match else 0))
    return commands


ALL = [c for doc in DOCS for c in doc_commands(doc)]


def test_docs_have_commands() -> None:
    assert {c.doc for c in ALL} >= {"operations.md", "architecture.md"}
    assert len(ALL) >= 20


def test_extractor_reads_annotations_and_continuations(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```sh\n# a comment\nstackd status  # exit: 1\nfoo \\\n  --bar\n```\n"
        "  ```sh\n  indented\n  ```\n```toml\nnot = 'run'\n```\n"
    )
    found = [(c.line, c.command, c.exit_code) for c in doc_commands(doc)]
    assert found == [
        (4, "stackd status  # exit: 1", 1),
        (5, "foo --bar", 0),
        (9, "indented", 0),
    ]


@pytest.mark.timeout(300)
def test_every_documented_command_runs(sandbox: Sandbox) -> None:
    stacks_config(sandbox, ["web"])
    result = stackd(sandbox, "setup")
    assert result.returncode == 0, result.stderr
    sandbox.wait_for(
        lambda: stack_entry(status_json(sandbox), "web")["active_state"] == "active",
        timeout=30,
        what="web.service active",
    )
    # the docs call `stackd` from PATH: the one under test
    bin_dir = sandbox.home / "bin"
    bin_dir.mkdir()
    (bin_dir / "stackd").symlink_to(STACKD_BIN)
    env = {"PATH": f"{bin_dir}:{sandbox.env['PATH']}"}
    failures = []
    for command in ALL:
        run = sandbox.run("bash", "-c", command.command, env=env, check=False, timeout=120)
        if run.returncode != command.exit_code:
            failures.append(
                f"{command}\n  exit {run.returncode}, expected {command.exit_code}\n"
                f"  stdout: {run.stdout[-800:]!r}\n  stderr: {run.stderr[-800:]!r}"
            )
    assert not failures, "\n".join(failures)
