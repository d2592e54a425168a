"""The unit renderer: exact texts, escaping rules, markers, and properties over arbitrary values."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackd.core.models import Config, DaemonConfig, StackSpec, UpdateConfig
from stackd.core.render import (
    MARKER_PREFIX,
    RenderInput,
    compose_project_name,
    content_hash,
    escape_exec_arg,
    escape_executable,
    escape_path_value,
    is_intact,
    read_marker,
    render_all,
    render_stack_units,
    unit_value_problem,
)

DIGEST = "ab" * 32
T = TypeVar("T")


def make_input(**changes: object) -> RenderInput:
    stack = StackSpec(
        name="web",
        directory=Path("/srv/stacks/web"),
        compose_files=("compose.yaml",),
        env_files=(Path("/run/secrets/web.env"),),
    )
    base = RenderInput(
        stack=stack,
        compose_command=("podman", "compose"),
        startup_timeout_s=120.0,
        update_timeout_s=1800.0,
        compose_digest=DIGEST,
        env_files=(Path("/run/secrets/web.env"),),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def with_marker(body: str) -> str:
    return (
        f"# stackd: managed unit, sha256={content_hash(body)}; "
        "do not edit, changes are overwritten or reported\n" + body
    )


class TestTypicalStack:
    """A typical stack renders to exactly these two files."""

    def test_stack_unit_text(self) -> None:
        body = (
            f"# stackd: compose-digest={DIGEST}\n"
            "[Unit]\n"
            "Description=stackd stack web\n"
            "\n"
            "[Service]\n"
            "Type=oneshot\n"
            "RemainAfterExit=yes\n"
            "WorkingDirectory=/srv/stacks/web\n"
            "EnvironmentFile=/run/secrets/web.env\n"
            "ExecStart=podman compose -p web -f compose.yaml up -d --remove-orphans\n"
            "ExecStop=podman compose -p web -f compose.yaml down\n"
            "TimeoutStartSec=2min\n"
            "\n"
            "[Install]\n"
            "WantedBy=default.target\n"
        )
        assert render_stack_units(make_input())["web.service"] == with_marker(body)

    def test_update_unit_text(self) -> None:
        body = (
            "[Unit]\n"
            "Description=stackd update of stack web\n"
            "\n"
            "[Service]\n"
            "Type=oneshot\n"
            "RemainAfterExit=yes\n"
            "WorkingDirectory=/srv/stacks/web\n"
            "EnvironmentFile=/run/secrets/web.env\n"
            "ExecStart=podman compose -p web -f compose.yaml pull\n"
            "ExecStart=podman compose -p web -f compose.yaml up -d --remove-orphans\n"
            "TimeoutStartSec=30min\n"
        )
        assert render_stack_units(make_input())["web-update.service"] == with_marker(body)

    def test_exactly_two_units(self) -> None:
        assert list(render_stack_units(make_input())) == ["web.service", "web-update.service"]

    def test_no_compose_files_and_no_env_files(self) -> None:
        """Without compose files compose finds its default file; without env files no line."""
        inp = make_input(stack=StackSpec(name="db", directory=Path("/srv/db")), env_files=())
        text = render_stack_units(inp)["db.service"]
        assert "ExecStart=podman compose -p db up -d --remove-orphans\n" in text
        assert "EnvironmentFile" not in text

    def test_one_environment_file_line_per_env_file_in_order(self) -> None:
        env = (Path("/run/b.env"), Path("/run/a.env"))
        text = render_stack_units(make_input(env_files=env))["web.service"]
        assert re.findall(r"^EnvironmentFile=(.*)$", text, re.M) == ["/run/b.env", "/run/a.env"]

    def test_env_files_come_from_input_not_from_stack_spec(self) -> None:
        """The adapter resolves env files (legacy fallback included); the renderer uses those."""
        text = render_stack_units(make_input(env_files=(Path("/old/web.env"),)))["web.service"]
        assert "EnvironmentFile=/old/web.env\n" in text
        assert "/run/secrets/web.env" not in text

    def test_several_compose_files_in_order(self) -> None:
        stack = replace(make_input().stack, compose_files=("base.yaml", "/etc/over ride.yaml"))
        text = render_stack_units(make_input(stack=stack))["web.service"]
        assert '-p web -f base.yaml -f "/etc/over ride.yaml" up' in text

    def test_unreadable_compose_files_are_marked(self) -> None:
        text = render_stack_units(make_input(compose_digest=""))["web.service"]
        assert "\n# stackd: compose-digest=unreadable\n" in text


class TestTimeouts:
    """TimeoutStartSec comes from the startup timeout (default or per stack) and update timeout."""

    def config(self, stack: StackSpec) -> Config:
        return Config(
            daemon=DaemonConfig(unit_dir=Path("/u"), startup_timeout_s=120.0),
            updates=UpdateConfig(timeout_s=600.0),
            stacks=(stack,),
        )

    def render(self, stack: StackSpec) -> dict[str, str]:
        inp = RenderInput.from_config(
            self.config(stack), stack, compose_digest=DIGEST, env_files=()
        )
        return render_stack_units(inp)

    def test_default_startup_timeout(self) -> None:
        units = self.render(StackSpec(name="web", directory=Path("/srv/web")))
        assert "\nTimeoutStartSec=2min\n" in units["web.service"]
        assert "\nTimeoutStartSec=10min\n" in units["web-update.service"]

    def test_per_stack_override(self) -> None:
        stack = StackSpec(name="web", directory=Path("/srv/web"), startup_timeout_s=300.0)
        units = self.render(stack)
        assert "\nTimeoutStartSec=5min\n" in units["web.service"]
        assert "\nTimeoutStartSec=10min\n" in units["web-update.service"]

    def test_fractions_are_kept(self) -> None:
        text = render_stack_units(make_input(startup_timeout_s=90.25))["web.service"]
        assert "\nTimeoutStartSec=1min 30.25s\n" in text

    @pytest.mark.parametrize("bad", [0.0, -1.0, 1e-9, float("nan"), float("inf")])
    def test_refused_timeouts(self, bad: float) -> None:
        with pytest.raises(ValueError, match="timeout"):
            render_stack_units(make_input(startup_timeout_s=bad))
        with pytest.raises(ValueError, match="timeout"):
            render_stack_units(make_input(update_timeout_s=bad))


class TestEscapeExecArg:
    """Arguments are quoted C-style when needed; % and $ are doubled (specifiers, variables)."""

    @pytest.mark.parametrize(
        ("word", "written"),
        [
            ("up", "up"),
            ("--remove-orphans", "--remove-orphans"),
            ("/srv/a.b,c:d=e+f@g", "/srv/a.b,c:d=e+f@g"),
            ("50%", "50%%"),
            ("$HOME", "$$HOME"),
            ("${X}", '"$${X}"'),
            ("a b", '"a b"'),
            ('say "hi"', '"say \\"hi\\""'),
            ("it's", '"it\'s"'),
            ("back\\slash", '"back\\\\slash"'),
            ("end\\", '"end\\\\"'),
            (";", '";"'),
            ("", '""'),
            ("ünï", '"ünï"'),
            ("#x", '"#x"'),
        ],
    )
    def test_table(self, word: str, written: str) -> None:
        assert escape_exec_arg(word) == written

    @pytest.mark.parametrize("bad", ["a\nb", "a\rb", "\x00", "\t", "\x7f", "\x85", "\u2028"])
    def test_control_characters_refused(self, bad: str) -> None:
        with pytest.raises(ValueError, match="cannot be written"):
            escape_exec_arg(bad)


class TestEscapeExecutable:
    """The executable must be something systemd runs as given."""

    @pytest.mark.parametrize(
        ("exe", "written"),
        [
            ("podman", "podman"),
            ("/usr/bin/docker", "/usr/bin/docker"),
            ("/opt/my tools/compose", '"/opt/my tools/compose"'),
            ("/opt/100%/compose", "/opt/100%%/compose"),
        ],
    )
    def test_table(self, exe: str, written: str) -> None:
        assert escape_executable(exe) == written

    @pytest.mark.parametrize(
        "bad",
        [
            "",
            "-podman",
            "@podman",
            ":podman",
            "+podman",
            "!podman",
            "|podman",
            "bin/podman",
            "..",
            "/usr/bin/",
            "/usr//bin/podman",
            "/usr/../bin/podman",
            "/opt/$x/podman",
            '/opt/"q"/podman',
            "/opt/it's/podman",
            "/opt/a\\b",
            "pod\nman",
        ],
    )
    def test_refused(self, bad: str) -> None:
        with pytest.raises(ValueError, match="executable"):
            escape_executable(bad)

    def test_render_refuses_bad_compose_command(self) -> None:
        with pytest.raises(ValueError, match="executable"):
            render_stack_units(make_input(compose_command=("-podman", "compose")))
        with pytest.raises(ValueError, match="compose command"):
            render_stack_units(make_input(compose_command=()))


class TestEscapePathValue:
    """Paths are verbatim for systemd except % specifiers, trailing whitespace and backslashes."""

    @pytest.mark.parametrize(
        ("path", "written"),
        [
            ("/srv/web", "/srv/web"),
            ("/srv/my web", "/srv/my web"),
            ("/srv/100%", "/srv/100%%"),
            ("/srv/$HOME", "/srv/$HOME"),
            ('/srv/"q"', '/srv/"q"'),
            ("/srv/x\\y", "/srv/x\\y"),
            ("/srv/trail ", "/srv/trail /"),
            ("/srv/trail\\", "/srv/trail\\/"),
            ("//srv/./web/", "/srv/web"),
            ("/", "/"),
            ("/-x", "/-x"),
        ],
    )
    def test_table(self, path: str, written: str) -> None:
        assert escape_path_value(path) == written

    @pytest.mark.parametrize(
        ("bad", "reason"),
        [
            ("srv/web", "absolute"),
            ("-/srv", "absolute"),
            ("~", "absolute"),
            ("", "absolute"),
            ("/srv/../etc", r"'\.\.'"),
            ("/srv/a\nb", "cannot be written"),
            ("/" + "x" * 256, "longer than 255"),
            ("/x" * 2048, "longer than 4095"),
        ],
    )
    def test_refused(self, bad: str, reason: str) -> None:
        with pytest.raises(ValueError, match=reason):
            escape_path_value(bad)

    def test_render_refuses_relative_directory_and_env_file(self) -> None:
        stack = replace(make_input().stack, directory=Path("stacks/web"))
        with pytest.raises(ValueError, match="absolute"):
            render_stack_units(make_input(stack=stack))
        with pytest.raises(ValueError, match="absolute"):
            render_stack_units(make_input(env_files=(Path("web.env"),)))


class TestRefusals:
    """Values that cannot be written safely stop the render instead of producing a bad unit."""

    @pytest.mark.parametrize("bad", ["a\nb", "x\r", "\x1b[0m", "\u2029"])
    def test_control_characters_anywhere(self, bad: str) -> None:
        base = make_input()
        cases = [
            replace(base, stack=replace(base.stack, directory=Path("/srv/" + bad))),
            replace(base, stack=replace(base.stack, compose_files=(bad,))),
            replace(base, env_files=(Path("/run/" + bad),)),
            replace(base, compose_command=("podman", bad)),
        ]
        for inp in cases:
            with pytest.raises(ValueError, match="cannot be written"):
                render_stack_units(inp)

    def test_empty_compose_file_name(self) -> None:
        stack = replace(make_input().stack, compose_files=("",))
        with pytest.raises(ValueError, match="compose file name cannot be empty"):
            render_stack_units(make_input(stack=stack))

    @pytest.mark.parametrize("name", ["", "-web", "web-update", "a/b", "a b"])
    def test_invalid_stack_names(self, name: str) -> None:
        stack = replace(make_input().stack, name=name)
        with pytest.raises(ValueError, match="stack name"):
            render_stack_units(make_input(stack=stack))

    @pytest.mark.parametrize("digest", ["abc", "AB" * 32, "ab" * 32 + "\n"])
    def test_malformed_compose_digest(self, digest: str) -> None:
        with pytest.raises(ValueError, match="digest"):
            render_stack_units(make_input(compose_digest=digest))

    def test_unit_value_problem_names_the_character(self) -> None:
        assert unit_value_problem("/srv/ok é") is None
        assert unit_value_problem("ab\ncd") == (
            "character U+000A at position 2 cannot be written into a systemd unit "
            "(control characters and line breaks are not allowed)"
        )
        for odd in ("\ufdd0", "\ufdef", "\ufffe", "\U0001ffff", "\U0010fffe"):
            problem = unit_value_problem(f"/srv/{odd}")
            assert problem is not None
            assert f"U+{ord(odd):04X} at position 5" in problem
            assert "noncharacter" in problem
        assert unit_value_problem("/srv/\ufdf0\ufffd\U0001fffd") is None


class TestComposeFileArguments:
    """Compose files are passed with -f; a relative name starting with '-' gets './'."""

    def test_dash_name(self) -> None:
        stack = replace(make_input().stack, compose_files=("-x.yaml", "/abs/-y.yaml"))
        text = render_stack_units(make_input(stack=stack))["web.service"]
        assert "-p web -f ./-x.yaml -f /abs/-y.yaml up" in text


class TestComposeProjectName:
    """Project names are valid for compose, stable, and never shared by two stacks."""

    @pytest.mark.parametrize(
        ("stack", "project"),
        [("web", "web"), ("my_app-2", "my_app-2"), ("0db", "0db")],
    )
    def test_valid_names_unchanged(self, stack: str, project: str) -> None:
        assert compose_project_name(stack) == project

    def test_other_names_get_a_hash_suffix(self) -> None:
        assert re.fullmatch(r"my_app-[0-9a-f]{8}", compose_project_name("My.App"))
        assert compose_project_name("My.App") == compose_project_name("My.App")
        assert compose_project_name("Web") != "web"

    def test_rendered_with_p(self) -> None:
        stack = replace(make_input().stack, name="Web.1")
        text = render_stack_units(make_input(stack=stack))["Web.1.service"]
        assert f" -p {compose_project_name('Web.1')} -f compose.yaml up" in text

    @given(st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True), min_size=2))
    def test_valid_and_injective(self, names: list[str]) -> None:
        names = [n for n in dict.fromkeys(names) if not n.endswith("-update")]
        projects = [compose_project_name(n) for n in names]
        assert all(re.fullmatch(r"[a-z0-9][a-z0-9_-]*", p) for p in projects)
        assert len(set(projects)) == len(projects)

    def test_invalid_stack_name_refused(self) -> None:
        with pytest.raises(ValueError, match="stack name"):
            compose_project_name("web-update")


class TestMarker:
    """Every file starts with a marker whose hash covers the rest of the file."""

    def test_every_file_is_intact_and_starts_with_the_marker(self) -> None:
        for text in render_stack_units(make_input()).values():
            assert text.startswith(MARKER_PREFIX + " managed unit, sha256=")
            assert read_marker(text) == content_hash(text.partition("\n")[2])
            assert is_intact(text)

    def test_hand_edit_is_detected(self) -> None:
        text = render_stack_units(make_input())["web.service"]
        edited = text.replace("TimeoutStartSec=2min", "TimeoutStartSec=5min")
        assert read_marker(edited) == read_marker(text)
        assert not is_intact(edited)
        assert not is_intact(text + "\n")

    def test_foreign_files_have_no_marker(self) -> None:
        foreign = "[Unit]\nDescription=mine\n# stackd: managed unit, sha256=00\n"
        assert read_marker(foreign) is None
        assert not is_intact(foreign)
        assert read_marker("") is None
        assert read_marker("# stackd: compose-digest=" + DIGEST + "\n") is None

    def test_tampered_marker_is_still_stackds_but_not_intact(self) -> None:
        text = "# stackd: managed unit, sha256=garbage; do not edit\n[Unit]\n"
        assert read_marker(text) == "garbage"
        assert not is_intact(text)

    def test_content_hash_is_sha256_hex(self) -> None:
        assert content_hash("") == (
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        )

    def test_compose_digest_changes_the_stack_unit(self) -> None:
        a = render_stack_units(make_input(compose_digest="ab" * 32))
        b = render_stack_units(make_input(compose_digest="cd" * 32))
        assert a["web.service"] != b["web.service"]
        assert read_marker(a["web.service"]) != read_marker(b["web.service"])
        # the update unit is not restarted by anything: no need to rewrite it
        assert a["web-update.service"] == b["web-update.service"]


class TestRenderAll:
    """All managed stacks, sorted by unit name; adopted stacks are not rendered."""

    def test_sorted_and_complete(self) -> None:
        inputs = [make_input(stack=replace(make_input().stack, name=n)) for n in ("zeta", "alpha")]
        assert list(render_all(inputs)) == [
            "alpha-update.service",
            "alpha.service",
            "zeta-update.service",
            "zeta.service",
        ]

    def test_adopted_stacks_skipped(self) -> None:
        adopted = make_input(stack=replace(make_input().stack, name="hm", managed=False))
        assert list(render_all([adopted, make_input()])) == ["web-update.service", "web.service"]

    def test_duplicate_stack_refused(self) -> None:
        with pytest.raises(ValueError, match="given twice"):
            render_all([make_input(), make_input()])


# ---------------------------------------------------------------------------------------------
# Properties over arbitrary values

FORBIDDEN = {"Cc", "Cs", "Zl", "Zp"}
printable = st.characters(exclude_categories=sorted(FORBIDDEN)).filter(  # type: ignore[arg-type]
    # Unicode noncharacters: systemd refuses them (not "UTF-8 clean"), so does stackd.
    lambda c: not (0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE)
)
any_text = st.text(printable, min_size=1, max_size=20)
segment = any_text.filter(lambda s: "/" not in s and s not in {".", ".."})
abs_path = st.lists(segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
executable = st.one_of(
    st.sampled_from(["podman", "docker", "/usr/bin/podman"]),
    st.lists(segment.filter(lambda s: not set(s) & set("\"'\\$")), min_size=1, max_size=3).map(
        lambda parts: "/" + "/".join(parts)
    ),
)
stack_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True).filter(
    lambda n: not n.endswith("-update")
)
timeout = st.integers(min_value=1, max_value=10**7).map(lambda ms: ms / 1000)


@st.composite
def render_inputs(draw: st.DrawFn) -> RenderInput:
    stack = StackSpec(
        name=draw(stack_name),
        directory=Path(draw(abs_path)),
        compose_files=tuple(draw(st.lists(any_text, max_size=3))),
    )
    return RenderInput(
        stack=stack,
        compose_command=(draw(executable), *draw(st.lists(st.text(printable), max_size=3))),
        startup_timeout_s=draw(timeout),
        update_timeout_s=draw(timeout),
        compose_digest=draw(st.sampled_from(["", DIGEST, "0" * 64])),
        env_files=tuple(Path(p) for p in draw(st.lists(abs_path, max_size=3))),
    )


def directive_structure(text: str) -> list[str]:
    """The text as systemd's line parser sees it: sections and keys, comments and blanks skipped.

    Fails on anything that is not a section header or a Key= line, and on line continuations.
    """
    structure = []
    for line in text.split("\n")[:-1]:
        assert not re.search(r"(?<!\\)(\\\\)*\\$", line), f"line continuation: {line!r}"
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            assert re.fullmatch(r"\[(Unit|Service|Install)\]", line), line
            structure.append(line)
            continue
        key, eq, _ = line.partition("=")
        assert eq, f"not a directive: {line!r}"
        assert re.fullmatch(r"[A-Za-z]+", key), f"not a directive: {line!r}"
        structure.append(key)
    return structure


def expected_structure(inp: RenderInput) -> dict[str, list[str]]:
    env = ["EnvironmentFile"] * len(inp.env_files)
    return {
        inp.stack.unit: [
            "[Unit]",
            "Description",
            "[Service]",
            "Type",
            "RemainAfterExit",
            "WorkingDirectory",
            *env,
            "ExecStart",
            "ExecStop",
            "TimeoutStartSec",
            "[Install]",
            "WantedBy",
        ],
        inp.stack.update_unit: [
            "[Unit]",
            "Description",
            "[Service]",
            "Type",
            "RemainAfterExit",
            "WorkingDirectory",
            *env,
            "ExecStart",
            "ExecStart",
            "TimeoutStartSec",
        ],
    }


def fixed_lines(text: str) -> list[str]:
    """The lines whose text never depends on config values."""
    return [ln for ln in text.split("\n") if re.fullmatch(r"\[\w+\]|Type=.*|Remain.*|Want.*", ln)]


class TestProperties:
    """No config value can change the shape of a unit, and the marker always holds."""

    @given(render_inputs())
    @settings(max_examples=300)
    def test_no_value_injects_a_directive(self, inp: RenderInput) -> None:
        units = render_stack_units(inp)
        assert {name: directive_structure(t) for name, t in units.items()} == (
            expected_structure(inp)
        )
        for text in units.values():
            assert fixed_lines(text) == fixed_lines(render_stack_units(make_input())[_same(text)])
            assert text.count("\n# stackd:") == (1 if "\n[Install]" in text else 0)

    @given(render_inputs())
    def test_deterministic_and_intact(self, inp: RenderInput) -> None:
        first = render_stack_units(inp)
        assert render_stack_units(replace(inp)) == first
        for text in first.values():
            assert is_intact(text)
            assert read_marker(text) == content_hash(text.partition("\n")[2])
            assert text.endswith("\n")
            assert all(unicodedata.category(c) not in FORBIDDEN for c in text if c != "\n")

    @given(render_inputs(), st.data())
    def test_changing_one_input_changes_the_hash(
        self, inp: RenderInput, data: st.DataObject
    ) -> None:
        field = data.draw(
            st.sampled_from(
                [
                    "name",
                    "directory",
                    "compose_files",
                    "env_files",
                    "compose_command",
                    "startup_timeout_s",
                    "update_timeout_s",
                    "compose_digest",
                ]
            )
        )
        changed = mutate(inp, field, data)
        before, after = render_stack_units(inp), render_stack_units(changed)
        stack_changes = field != "update_timeout_s"
        update_changes = field not in {"startup_timeout_s", "compose_digest"}
        old_stack, old_update = before[inp.stack.unit], before[inp.stack.update_unit]
        new_stack, new_update = after[changed.stack.unit], after[changed.stack.update_unit]
        assert (read_marker(old_stack) != read_marker(new_stack)) is stack_changes
        assert (read_marker(old_update) != read_marker(new_update)) is update_changes


def _same(text: str) -> str:
    """The unit of the typical stack that has the same kind as `text`."""
    return "web.service" if "\n[Install]" in text else "web-update.service"


def mutate(inp: RenderInput, field: str, data: st.DataObject) -> RenderInput:
    """`inp` with `field` set to another value that renders differently."""

    def other(strategy: st.SearchStrategy[T], current: T) -> T:
        return data.draw(strategy.filter(lambda v: v != current))

    def written(files: tuple[str, ...]) -> tuple[str, ...]:
        # "-x" is written "./-x" (see TestComposeFileArguments): the same file, the same text
        return tuple("./" + f if f.startswith("-") else f for f in files)

    stack = inp.stack
    match field:
        case "name":
            changed = replace(inp, stack=replace(stack, name=other(stack_name, stack.name)))
        case "directory":
            directory = other(abs_path.map(Path), stack.directory)
            changed = replace(inp, stack=replace(stack, directory=directory))
        case "compose_files":
            files = data.draw(
                st.lists(any_text, max_size=3)
                .map(tuple)
                .filter(lambda v: written(v) != written(stack.compose_files))
            )
            changed = replace(inp, stack=replace(stack, compose_files=files))
        case "env_files":
            paths = st.lists(abs_path.map(Path), max_size=3).map(tuple)
            changed = replace(inp, env_files=other(paths, inp.env_files))
        case "compose_command":
            words = st.tuples(executable, st.text(printable, max_size=5))
            changed = replace(inp, compose_command=other(words, inp.compose_command))
        case "compose_digest":
            digests = st.sampled_from(["", DIGEST, "1" * 64])
            changed = replace(inp, compose_digest=other(digests, inp.compose_digest))
        case "startup_timeout_s":
            changed = replace(inp, startup_timeout_s=other(timeout, inp.startup_timeout_s))
        case _:
            changed = replace(inp, update_timeout_s=other(timeout, inp.update_timeout_s))
    return changed
