"""Rendered units against systemd's own parser, offline (no user manager is started).

Two tools, both from this machine's systemd:
- `systemd-analyze --user verify`: every rendered unit loads without a warning and its commands
  are executable.
- systemd's unit loader itself (libsystemd-core, the library `systemd-analyze verify` runs on),
  driven through ctypes in a child process: a test-mode manager (no cgroups, no D-Bus, no
  generators, only our unit directory on the search path) loads the files and `unit_dump()`
  prints what it parsed: each command's argv, WorkingDirectory, EnvironmentFile, timeouts. The
  `$`-expansion that happens when a command runs is applied with systemd's own
  `replace_env_argv()`. So "round trip" below means: what systemd would execute equals the
  configured value.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The strategies of the property tests next door (pytest puts this directory on sys.path).
from test_render import render_inputs, segment

from stackd.core.models import StackSpec
from stackd.core.render import RenderInput, compose_project_name, render_all, render_stack_units

LIBDIR = "/usr/lib/x86_64-linux-gnu/systemd"
_LIBS = {
    "shared": sorted(glob.glob(f"{LIBDIR}/libsystemd-shared-252*.so")),
    "core": sorted(glob.glob(f"{LIBDIR}/libsystemd-core-252*.so")),
}
pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
# The child below calls systemd-internal functions whose signatures and enum values are those
# of systemd 252 (replace_env_argv, for one, changed in 254): elsewhere these tests skip.
needs_core_252 = pytest.mark.skipif(
    not all(_LIBS.values()), reason="needs systemd 252's libsystemd-core (Debian 12 layout)"
)

# Runs in a child process: loading systemd's core library into pytest itself is not worth the
# risk. Flags and enums as in systemd 252: MANAGER_TEST_RUN_MINIMAL (1) |
# MANAGER_TEST_RUN_IGNORE_DEPENDENCIES (16), LOOKUP_SCOPE_USER (2).
_CHILD = r"""
import ctypes, ctypes.util, json, os, sys
shared = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
core = ctypes.CDLL(sys.argv[2])
if sys.argv[3] == "expand":
    shared.replace_env_argv.restype = ctypes.POINTER(ctypes.c_char_p)
    shared.replace_env_argv.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    def strv(items):
        return (ctypes.c_char_p * (len(items) + 1))(*[i.encode() for i in items], None)
    request = json.load(sys.stdin)
    result = []
    for argv in request["argvs"]:
        out = shared.replace_env_argv(strv(argv), strv(request["env"]))
        words, i = [], 0
        while out[i] is not None:
            words.append(out[i].decode())
            i += 1
        result.append(words)
    json.dump(result, sys.stdout)
    sys.exit(0)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fdopen.restype = ctypes.c_void_p
libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
libc.fflush.argtypes = [ctypes.c_void_p]
core.manager_new.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
core.manager_startup.argtypes = [ctypes.c_void_p] * 4
core.manager_load_startable_unit_or_warn.argtypes = [
    ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
core.unit_dump.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p]
m = ctypes.c_void_p()
r = core.manager_new(2, 1 | 16, ctypes.byref(m))
assert r == 0, f"manager_new: {r}"
r = core.manager_startup(m, None, None, None)
assert r == 0, f"manager_startup: {r}"
out = libc.fdopen(os.dup(1), b"w")
for path in sys.argv[4:]:
    u = ctypes.c_void_p()
    r = core.manager_load_startable_unit_or_warn(m, None, path.encode(), ctypes.byref(u))
    assert r == 0, f"load {path}: {r}"
    core.unit_dump(u, out, b"")
libc.fflush(out)
"""


@dataclass
class ParsedUnit:
    """What systemd parsed from one unit file (the parts stackd writes)."""

    description: str = ""
    working_directory: str | None = None
    environment_files: list[str] = field(default_factory=list)
    commands: dict[str, list[list[str]]] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def split_command_line(line: str) -> list[str]:
    """Undo systemd's quote_command_line(): words split at ASCII spaces, "..." with \\ escapes."""
    words: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
            continue
        word = []
        while i < n and line[i] != " ":
            if line[i] == '"':
                i += 1
                while line[i] != '"':
                    if line[i] == "\\":
                        i += 1
                    word.append(line[i])
                    i += 1
                i += 1
            else:
                word.append(line[i])
                i += 1
        words.append("".join(word))
    return words


def parse_dump(dump: str) -> dict[str, ParsedUnit]:
    units: dict[str, ParsedUnit] = {}
    unit = ParsedUnit()
    command = ""
    for line in dump.split("\n"):
        if line.startswith("-> Unit "):
            unit = units.setdefault(line.removeprefix("-> Unit ").removesuffix(":"), ParsedUnit())
        elif line.startswith("\t-> Exec"):
            command = line.removeprefix("\t-> ").removesuffix(":")
            unit.commands[command] = []
        elif line.startswith("\t\tCommand Line: "):
            unit.commands[command].append(split_command_line(line.split(": ", 1)[1]))
        elif line.startswith("\t") and not line.startswith("\t\t") and ": " in line:
            key, value = line[1:].split(": ", 1)
            if key == "Description":
                unit.description = value
            elif key == "WorkingDirectory":
                unit.working_directory = value
            elif key == "EnvironmentFile":
                unit.environment_files.append(value)
            unit.fields.setdefault(key, value)
    return units


class Systemd:
    """systemd's tools, run in a private HOME/XDG_RUNTIME_DIR with only `unit_dir` on the path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.unit_dir = root / "units"
        self.unit_dir.mkdir()
        (root / "home").mkdir()
        (root / "runtime").mkdir(mode=0o700)
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(root / "home"),
            "XDG_RUNTIME_DIR": str(root / "runtime"),
            "LANG": "C.UTF-8",
        }

    def write(self, units: dict[str, str]) -> list[Path]:
        paths = []
        for name, text in units.items():
            path = self.unit_dir / name
            path.write_text(text, encoding="utf-8")
            paths.append(path)
        return paths

    def verify(self, paths: list[Path]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemd-analyze", "--user", "verify", "--man=no", *map(str, paths)],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def _child(self, *args: str, stdin: str = "") -> str:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, _LIBS["shared"][-1], _LIBS["core"][-1], *args],
            env={**self.env, "SYSTEMD_UNIT_PATH": str(self.unit_dir)},
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def parse(self, paths: list[Path]) -> dict[str, ParsedUnit]:
        return parse_dump(self._child("dump", *map(str, paths)))

    def expand(self, argvs: list[list[str]], env: tuple[str, ...] = ()) -> list[list[str]]:
        request = json.dumps({"argvs": argvs, "env": list(env)})
        result = json.loads(self._child("expand", stdin=request))
        assert isinstance(result, list)
        return result


@pytest.fixture
def systemd(tmp_path: Path) -> Systemd:
    return Systemd(tmp_path)


@pytest.fixture
def scratch(tmp_path: Path) -> Callable[[], Systemd]:
    """A fresh Systemd per hypothesis example (tmp_path is per test, not per example)."""
    return lambda: Systemd(Path(tempfile.mkdtemp(dir=tmp_path)))


def stub_executable(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


def expected_argvs(inp: RenderInput) -> dict[str, dict[str, list[list[str]]]]:
    compose = [*inp.compose_command, "-p", compose_project_name(inp.stack.name)]
    for name in inp.stack.compose_files:
        compose += ["-f", "./" + name if name.startswith("-") else name]
    up = [*compose, "up", "-d", "--remove-orphans"]
    return {
        inp.stack.unit: {"ExecStart": [up], "ExecStop": [[*compose, "down"]]},
        inp.stack.update_unit: {"ExecStart": [[*compose, "pull"], up]},
    }


def normalized(path: Path) -> str:
    """The path as systemd simplifies it (what it reports back)."""
    return "/" + "/".join(p for p in str(path).split("/") if p not in {"", "."})


def assert_round_trip(systemd: Systemd, inputs: list[RenderInput]) -> None:
    units = render_all(inputs)
    parsed = systemd.parse(systemd.write(units))
    assert set(parsed) == set(units)
    expected = {unit: cmds for inp in inputs for unit, cmds in expected_argvs(inp).items()}
    # one child process expands every command line of every unit
    order = [(unit_name, name) for unit_name, cmds in expected.items() for name in cmds]
    raw = [parsed[unit_name].commands[name] for unit_name, name in order]
    expanded = iter(systemd.expand([argv for argvs in raw for argv in argvs]))
    actual: dict[str, dict[str, list[list[str]]]] = {}
    for (unit_name, name), argvs in zip(order, raw, strict=True):
        actual.setdefault(unit_name, {})[name] = [next(expanded) for _ in argvs]
    assert actual == expected
    for inp in inputs:
        for unit_name in (inp.stack.unit, inp.stack.update_unit):
            unit = parsed[unit_name]
            assert unit.working_directory == normalized(inp.stack.directory)
            assert unit.environment_files == [normalized(p) for p in inp.env_files]
            assert unit.description.endswith(f"stack {inp.stack.name}")


class TestHarness:
    """The tools these tests rely on read systemd's data the way systemd means it."""

    @needs_core_252
    def test_parse_reads_a_hand_written_unit(self, systemd: Systemd) -> None:
        text = (
            "[Service]\nType=oneshot\nWorkingDirectory=/srv/a b\n"
            'EnvironmentFile=/run/x\nExecStart=/bin/echo "a b" \\"q\\" %% "" x\\\\y\n'
        )
        parsed = systemd.parse(systemd.write({"hand.service": text}))["hand.service"]
        assert parsed.commands == {"ExecStart": [["/bin/echo", "a b", '"q"', "%", "", "x\\y"]]}
        assert parsed.working_directory == "/srv/a b"
        assert parsed.environment_files == ["/run/x"]

    @needs_core_252
    def test_expand_follows_the_documented_rules(self, systemd: Systemd) -> None:
        """systemd.service(5): $$ is a literal $, ${X} is one word, $X alone splits."""
        argvs = [["/bin/echo", "$$HOME", "${X}!", "$X", "$$$$"]]
        assert systemd.expand(argvs, ("X=1 2",)) == [["/bin/echo", "$HOME", "1 2!", "1", "2", "$$"]]

    def test_verify_reports_a_broken_unit(self, systemd: Systemd) -> None:
        paths = systemd.write({"bad.service": "[Service]\nExecStart=/nonexistent/x\n"})
        result = systemd.verify(paths)
        assert result.returncode != 0
        assert "/nonexistent/x" in result.stderr


def typical(directory: Path, compose: str) -> RenderInput:
    return RenderInput(
        stack=StackSpec(name="web", directory=directory, compose_files=("compose.yaml",)),
        compose_command=(compose, "compose"),
        startup_timeout_s=120.0,
        update_timeout_s=1800.0,
        compose_digest="ab" * 32,
        env_files=(directory / "web.env",),
    )


class TestVerify:
    """Every rendered unit passes `systemd-analyze --user verify` without a word."""

    def test_typical_stack(self, systemd: Systemd) -> None:
        compose = stub_executable(systemd.root / "bin" / "podman")
        units = render_stack_units(typical(Path("/srv/stacks/web"), compose))
        result = systemd.verify(systemd.write(units))
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")

    def test_program_from_search_path(self, systemd: Systemd) -> None:
        """A bare program name is looked up by systemd on its fixed search path."""
        if not Path("/usr/bin/sh").exists():
            pytest.skip("no /usr/bin/sh")
        units = render_stack_units(typical(Path("/srv/web"), "sh"))
        result = systemd.verify(systemd.write(units))
        assert (result.returncode, result.stderr) == (0, "")

    @needs_core_252
    def test_timeouts_as_systemd_reads_them(self, systemd: Systemd) -> None:
        compose = stub_executable(systemd.root / "bin" / "podman")
        inp = typical(Path("/srv/web"), compose)
        inp = replace(inp, startup_timeout_s=300.0, update_timeout_s=5430.0)
        parsed = systemd.parse(systemd.write(render_stack_units(inp)))
        assert parsed["web.service"].fields["TimeoutStartSec"] == "5min"
        assert parsed["web-update.service"].fields["TimeoutStartSec"] == "1h 30min 30s"
        assert parsed["web.service"].fields["Type"] == "oneshot"
        assert parsed["web.service"].fields["RemainAfterExit"] == "yes"


TRICKY = [
    "a b",
    '"double"',
    "it's",
    "%n%%",
    "$HOME",
    "${X}",
    "$$",
    "back\\slash",
    "end\\",
    '\\\\"',
    "ünï €",
    ";",
    "\\;",
    "-leading",
    "nbsp\u00a0zw\u200b",
    "*?[]{}<>|&#!",
    "=",
    "'",
    " lead and trail ",
]


@needs_core_252
class TestRoundTrip:
    """What systemd would run, in which directory, with which env files, is the configured value."""

    def test_tricky_values(self, systemd: Systemd) -> None:
        compose = stub_executable(systemd.root / "bin ü %n" / "com pose")
        dirs = ["/srv/a b", "/srv/%i%%", "/srv/$X", "/srv/q\"'", "/srv/end\\", "/srv/sp ", "/-d"]
        inputs = [
            RenderInput(
                stack=StackSpec(
                    name=f"S.{i}",
                    directory=Path(directory),
                    compose_files=tuple(TRICKY),
                ),
                compose_command=(compose, *TRICKY),
                startup_timeout_s=120.0,
                update_timeout_s=1800.0,
                compose_digest="",
                env_files=tuple(Path(directory + "/" + t.replace("/", "_")) for t in TRICKY[:6]),
            )
            for i, directory in enumerate(dirs)
        ]
        assert_round_trip(systemd, inputs)
        result = systemd.verify(sorted(systemd.unit_dir.iterdir()))
        assert (result.returncode, result.stderr) == (0, "")

    @given(data=st.data())
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    def test_arbitrary_values(self, scratch: Callable[[], Systemd], data: st.DataObject) -> None:
        systemd = scratch()
        exe_name = data.draw(segment.filter(lambda s: not set(s) & set("\"'\\$")))
        compose = stub_executable(systemd.root / "bin" / exe_name)
        drawn = data.draw(st.lists(render_inputs(), min_size=1, max_size=8))
        by_name = {inp.stack.name: inp for inp in drawn}  # one input per stack name
        inputs = [
            replace(inp, compose_command=(compose, *inp.compose_command[1:]))
            for inp in by_name.values()
        ]
        assert_round_trip(systemd, inputs)
        result = systemd.verify(sorted(systemd.unit_dir.iterdir()))
        assert (result.returncode, result.stderr) == (0, "")


def test_environment_is_private(systemd: Systemd) -> None:
    """The harness never points systemd at the machine's user dirs or runtime dir."""
    assert os.environ.get("XDG_RUNTIME_DIR") != systemd.env["XDG_RUNTIME_DIR"]
    assert systemd.env["HOME"].startswith(str(systemd.root))
