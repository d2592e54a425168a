"""Loading config.toml and STACKD_* overrides into the core's Config."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from _pytest.mark import ParameterSet

from stackd.core.models import Config, DaemonConfig, HealMode, StackSpec, UpdateConfig
from stackd.errors import ConfigError
from stackd.settings import default_config_path, load_config

HOME = "/home/tester"
BAD_CONFIGS = Path(__file__).parent / "bad_configs"

DESIGN_EXAMPLE = """\
[daemon]
unit_dir = "~/.config/systemd/user"   # the one directory stackd owns
compose_command = ["podman", "compose"]
startup_timeout = "120s"              # default TimeoutStartSec of a stack unit
allowed_dropin_dirs = []              # drop-in dirs that are not a finding
heal = "report"

[updates]
schedule = "daily"
randomized_delay = "0"
concurrency = 2
timeout = "30min"
persistent = true

[stacks.web]
directory = "/srv/stacks/web"
compose_files = ["compose.yaml"]
env_files = ["/run/secrets/web.env"]
legacy_env_files = []
startup_timeout = "300s"
update = true
managed = true
"""


def env(**extra: str) -> dict[str, str]:
    return {"HOME": HOME, "PATH": "/usr/bin:/bin", **extra}


Write = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> Write:
    def write(text: str, name: str = "config.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def load(text: str, tmp_path: Path, **extra: str) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env(**extra))


def config_error(text: str, tmp_path: Path, **extra: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(text, tmp_path, **extra)
    return caught.value


class TestDefaults:
    """Without a file, or with an empty one, every key has the DESIGN default."""

    def test_absent_default_file_gives_builtin_config(self, tmp_path: Path) -> None:
        cfg = load_config(environ=env(XDG_CONFIG_HOME=str(tmp_path)))
        assert cfg == Config(
            daemon=DaemonConfig(unit_dir=Path(HOME, ".config/systemd/user")), source=None
        )
        assert cfg.updates == UpdateConfig(
            schedule="daily",
            randomized_delay_s=0.0,
            concurrency=2,
            timeout_s=1800.0,
            persistent=True,
        )
        assert cfg.daemon.compose_command == ("podman", "compose")
        assert cfg.daemon.startup_timeout_s == 120.0
        assert cfg.daemon.heal is HealMode.REPORT
        assert cfg.stacks == ()

    def test_empty_file_gives_defaults_with_its_source(self, write: Write) -> None:
        path = write("")
        cfg = load_config(path, env())
        assert cfg == Config(
            daemon=DaemonConfig(unit_dir=Path(HOME, ".config/systemd/user")), source=path
        )

    def test_design_example_loads(self, write: Write) -> None:
        path = write(DESIGN_EXAMPLE)
        assert load_config(path, env()) == Config(
            daemon=DaemonConfig(
                unit_dir=Path("/home/tester/.config/systemd/user"),
                compose_command=("podman", "compose"),
                startup_timeout_s=120.0,
                allowed_dropin_dirs=(),
                heal=HealMode.REPORT,
            ),
            updates=UpdateConfig(
                schedule="daily",
                randomized_delay_s=0.0,
                concurrency=2,
                timeout_s=1800.0,
                persistent=True,
            ),
            stacks=(
                StackSpec(
                    name="web",
                    directory=Path("/srv/stacks/web"),
                    compose_files=("compose.yaml",),
                    env_files=(Path("/run/secrets/web.env"),),
                    legacy_env_files=(),
                    startup_timeout_s=300.0,
                    update=True,
                    managed=True,
                ),
            ),
            source=path,
        )

    def test_stack_defaults(self, tmp_path: Path) -> None:
        cfg = load('[stacks.web]\ndirectory = "/srv/web"\n', tmp_path)
        assert cfg.stacks == (StackSpec(name="web", directory=Path("/srv/web")),)
        assert cfg.startup_timeout_of(cfg.stacks[0]) == 120.0


class TestFileValues:
    """Values in the file are read with their meaning: spans, paths, modes, order."""

    @pytest.mark.parametrize(
        ("toml", "attribute", "expected"),
        [
            ('[daemon]\nstartup_timeout = "1h 30min"', "daemon.startup_timeout_s", 5400.0),
            ("[daemon]\nstartup_timeout = 45", "daemon.startup_timeout_s", 45.0),
            ("[daemon]\nstartup_timeout = 2.5", "daemon.startup_timeout_s", 2.5),
            ('[daemon]\nstartup_timeout = "90"', "daemon.startup_timeout_s", 90.0),
            ('[updates]\nrandomized_delay = "1h"', "updates.randomized_delay_s", 3600.0),
            ('[updates]\nrandomized_delay = "0"', "updates.randomized_delay_s", 0.0),
            ('[updates]\ntimeout = "2min 5s"', "updates.timeout_s", 125.0),
            ('[updates]\ntimeout = "1.5h"', "updates.timeout_s", 5400.0),
            ("[updates]\nconcurrency = 8", "updates.concurrency", 8),
            ("[updates]\npersistent = false", "updates.persistent", False),
            ('[updates]\nschedule = "Mon *-*-* 04:00"', "updates.schedule", "Mon *-*-* 04:00"),
            ('[daemon]\nheal = "repair"', "daemon.heal", HealMode.REPAIR),
            (
                '[daemon]\ncompose_command = ["docker", "compose"]',
                "daemon.compose_command",
                ("docker", "compose"),
            ),
            (
                '[daemon]\nunit_dir = "/etc/stackd/units"',
                "daemon.unit_dir",
                Path("/etc/stackd/units"),
            ),
            ('[daemon]\nunit_dir = "~/units"', "daemon.unit_dir", Path(HOME, "units")),
            ('[daemon]\nunit_dir = "~"', "daemon.unit_dir", Path(HOME)),
            (
                '[daemon]\nallowed_dropin_dirs = ["/run/systemd/user", "~/.config/systemd/user.d"]',
                "daemon.allowed_dropin_dirs",
                (Path("/run/systemd/user"), Path(HOME, ".config/systemd/user.d")),
            ),
        ],
    )
    def test_value(self, tmp_path: Path, toml: str, attribute: str, expected: object) -> None:
        cfg = load(toml, tmp_path)
        section, name = attribute.split(".")
        assert getattr(getattr(cfg, section), name) == expected

    def test_stack_values(self, tmp_path: Path) -> None:
        cfg = load(
            "[stacks.web]\n"
            'directory = "~/stacks/web"\n'
            'compose_files = ["compose.yaml", "../shared/compose.override.yaml"]\n'
            'env_files = ["/run/secrets/web.env", "~/secrets/web.env"]\n'
            'legacy_env_files = ["/srv/web/.env"]\n'
            'startup_timeout = "5min"\n'
            "update = false\n"
            "managed = false\n",
            tmp_path,
        )
        assert cfg.stacks == (
            StackSpec(
                name="web",
                directory=Path(HOME, "stacks/web"),
                compose_files=("compose.yaml", "../shared/compose.override.yaml"),
                env_files=(Path("/run/secrets/web.env"), Path(HOME, "secrets/web.env")),
                legacy_env_files=(Path("/srv/web/.env"),),
                startup_timeout_s=300.0,
                update=False,
                managed=False,
            ),
        )
        assert cfg.startup_timeout_of(cfg.stacks[0]) == 300.0

    def test_stacks_keep_file_order_and_exact_names(self, tmp_path: Path) -> None:
        names = ["zeta", "Alpha", "a.b", "web_2", "x-y", "9lives", "A" * 63]
        text = "".join(f'[stacks."{n}"]\ndirectory = "/srv/{n}"\n' for n in names)
        cfg = load(text, tmp_path)
        assert [s.name for s in cfg.stacks] == names
        assert cfg.stack("a.b") == StackSpec(name="a.b", directory=Path("/srv/a.b"))

    def test_names_differing_in_case_are_distinct_stacks(self, tmp_path: Path) -> None:
        cfg = load('[stacks.web]\ndirectory = "/a"\n[stacks.Web]\ndirectory = "/b"\n', tmp_path)
        assert [(s.name, s.directory) for s in cfg.stacks] == [
            ("web", Path("/a")),
            ("Web", Path("/b")),
        ]

    def test_home_comes_from_the_given_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("HOME", "/somewhere/else")
        cfg = load('[stacks.web]\ndirectory = "~/web"\n', tmp_path)
        assert cfg.stacks[0].directory == Path(HOME, "web")

    def test_utf8_byte_order_mark_is_accepted(self, tmp_path: Path) -> None:
        path = tmp_path / "config.toml"
        path.write_bytes(b'\xef\xbb\xbf[daemon]\nheal = "repair"\n')
        assert load_config(path, env()).daemon.heal is HealMode.REPAIR

    def test_result_is_frozen(self, tmp_path: Path) -> None:
        cfg = load('[stacks.web]\ndirectory = "/srv/web"\n', tmp_path)
        with pytest.raises(AttributeError):
            cfg.stacks[0].update = False  # type: ignore[misc]


class TestWhichFile:
    """--config beats STACKD_CONFIG beats $XDG_CONFIG_HOME/stackd/config.toml."""

    def test_default_path_uses_xdg_config_home(self) -> None:
        assert default_config_path({"HOME": HOME, "XDG_CONFIG_HOME": "/cfg"}) == Path(
            "/cfg/stackd/config.toml"
        )

    @pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
    def test_default_path_falls_back_to_home(self, xdg: str | None) -> None:
        environ = {"HOME": HOME} if xdg is None else {"HOME": HOME, "XDG_CONFIG_HOME": xdg}
        assert default_config_path(environ) == Path(HOME, ".config/stackd/config.toml")

    def test_default_file_is_read(self, tmp_path: Path) -> None:
        path = tmp_path / "stackd" / "config.toml"
        path.parent.mkdir()
        path.write_text('[daemon]\nheal = "repair"\n')
        cfg = load_config(environ=env(XDG_CONFIG_HOME=str(tmp_path)))
        assert cfg.daemon.heal is HealMode.REPAIR
        assert cfg.source == path

    def test_stackd_config_names_the_file(self, write: Write, tmp_path: Path) -> None:
        path = write('[daemon]\nheal = "repair"\n', "other.toml")
        cfg = load_config(environ=env(STACKD_CONFIG=str(path), XDG_CONFIG_HOME=str(tmp_path)))
        assert cfg.source == path
        assert cfg.daemon.heal is HealMode.REPAIR

    def test_stackd_config_expands_home(self, tmp_path: Path) -> None:
        (tmp_path / "c.toml").write_text('[daemon]\nheal = "repair"\n')
        cfg = load_config(environ={"HOME": str(tmp_path), "STACKD_CONFIG": "~/c.toml"})
        assert cfg.source == tmp_path / "c.toml"

    def test_argument_beats_stackd_config(self, write: Write) -> None:
        chosen = write('[daemon]\nheal = "repair"\n', "chosen.toml")
        other = write("this is not toml", "other.toml")
        cfg = load_config(chosen, env(STACKD_CONFIG=str(other)))
        assert cfg.source == chosen

    def test_missing_argument_file_is_an_error(self, tmp_path: Path) -> None:
        path = tmp_path / "nope.toml"
        with pytest.raises(ConfigError) as caught:
            load_config(path, env())
        assert (caught.value.file, caught.value.key) == (str(path), "")
        assert caught.value.reason == "no such file: create it or drop --config"
        assert caught.value.exit_code == 2

    def test_missing_stackd_config_file_is_an_error(self, tmp_path: Path) -> None:
        path = tmp_path / "nope.toml"
        with pytest.raises(ConfigError) as caught:
            load_config(environ=env(STACKD_CONFIG=str(path)))
        assert caught.value.file == str(path)
        assert caught.value.reason == "no such file: create it or unset STACKD_CONFIG"

    def test_unreadable_file_is_an_error(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="cannot read the file: Is a directory") as caught:
            load_config(tmp_path, env())
        assert caught.value.file == str(tmp_path)


class TestEnvironmentOverrides:
    """STACKD_<SECTION>__<KEY> beats the file; lists are JSON; stack names keep their case."""

    FILE = (
        '[daemon]\nheal = "report"\ncompose_command = ["podman", "compose"]\n'
        '[updates]\nconcurrency = 2\ntimeout = "30min"\n'
        '[stacks.web]\ndirectory = "/srv/web"\nupdate = true\n'
    )

    @pytest.mark.parametrize(
        ("var", "value", "attribute", "expected"),
        [
            ("STACKD_DAEMON__HEAL", "repair", "daemon.heal", HealMode.REPAIR),
            ("STACKD_DAEMON__UNIT_DIR", "~/units", "daemon.unit_dir", Path(HOME, "units")),
            ("STACKD_DAEMON__STARTUP_TIMEOUT", "2min", "daemon.startup_timeout_s", 120.0),
            (
                "STACKD_DAEMON__COMPOSE_COMMAND",
                '["docker","compose"]',
                "daemon.compose_command",
                ("docker", "compose"),
            ),
            (
                "STACKD_DAEMON__ALLOWED_DROPIN_DIRS",
                '["/run/x"]',
                "daemon.allowed_dropin_dirs",
                (Path("/run/x"),),
            ),
            ("STACKD_UPDATES__CONCURRENCY", "4", "updates.concurrency", 4),
            ("STACKD_UPDATES__TIMEOUT", "1h 30min", "updates.timeout_s", 5400.0),
            ("STACKD_UPDATES__TIMEOUT", "90", "updates.timeout_s", 90.0),
            ("STACKD_UPDATES__RANDOMIZED_DELAY", "5m", "updates.randomized_delay_s", 300.0),
            ("STACKD_UPDATES__SCHEDULE", "weekly", "updates.schedule", "weekly"),
            ("STACKD_UPDATES__PERSISTENT", "false", "updates.persistent", False),
            ("STACKD_UPDATES__PERSISTENT", "0", "updates.persistent", False),
            ("STACKD_UPDATES__PERSISTENT", "No", "updates.persistent", False),
            ("stackd_updates__persistent", "no", "updates.persistent", True),  # not our prefix
            ("STACKD_daemon__heal", "repair", "daemon.heal", HealMode.REPAIR),
        ],
    )
    def test_env_beats_file(
        self, tmp_path: Path, var: str, value: str, attribute: str, expected: object
    ) -> None:
        cfg = load(self.FILE, tmp_path, **{var: value})
        section, name = attribute.split(".")
        assert getattr(getattr(cfg, section), name) == expected

    @pytest.mark.parametrize("var", ["STACKD_STACKS__WEB__UPDATE", "STACKD_STACKS__web__UPDATE"])
    def test_stack_key_matches_configured_stack_regardless_of_case(
        self, tmp_path: Path, var: str
    ) -> None:
        cfg = load(self.FILE, tmp_path, **{var: "false"})
        assert cfg.stacks == (StackSpec(name="web", directory=Path("/srv/web"), update=False),)

    @pytest.mark.parametrize(
        ("var", "value", "field", "expected"),
        [
            (
                "STACKD_STACKS__WEB__ENV_FILES",
                '["/run/secrets/w.env"]',
                "env_files",
                (Path("/run/secrets/w.env"),),
            ),
            (
                "STACKD_STACKS__WEB__COMPOSE_FILES",
                '["a.yaml","b.yaml"]',
                "compose_files",
                ("a.yaml", "b.yaml"),
            ),
            ("STACKD_STACKS__WEB__STARTUP_TIMEOUT", "10min", "startup_timeout_s", 600.0),
            ("STACKD_STACKS__WEB__DIRECTORY", "/elsewhere", "directory", Path("/elsewhere")),
            ("STACKD_STACKS__WEB__MANAGED", "off", "managed", False),
        ],
    )
    def test_stack_keys(
        self, tmp_path: Path, var: str, value: str, field: str, expected: object
    ) -> None:
        cfg = load(self.FILE, tmp_path, **{var: value})
        assert getattr(cfg.stacks[0], field) == expected

    def test_exact_name_wins_over_case_insensitive_match(self, tmp_path: Path) -> None:
        text = '[stacks.web]\ndirectory = "/a"\n[stacks.WEB]\ndirectory = "/b"\n'
        cfg = load(text, tmp_path, STACKD_STACKS__WEB__UPDATE="false")
        assert [(s.name, s.update) for s in cfg.stacks] == [("web", True), ("WEB", False)]

    def test_stack_name_with_double_underscore(self, tmp_path: Path) -> None:
        cfg = load('[stacks.a__b]\ndirectory = "/a"\n', tmp_path, STACKD_STACKS__A__B__UPDATE="no")
        assert cfg.stacks == (StackSpec(name="a__b", directory=Path("/a"), update=False),)

    def test_env_can_add_a_stack(self, tmp_path: Path) -> None:
        cfg = load(
            self.FILE,
            tmp_path,
            STACKD_STACKS__api__DIRECTORY="/srv/api",
            STACKD_STACKS__api__UPDATE="false",
        )
        assert cfg.stacks[1] == StackSpec(name="api", directory=Path("/srv/api"), update=False)

    def test_env_alone_without_file(self, tmp_path: Path) -> None:
        cfg = load_config(
            environ=env(XDG_CONFIG_HOME=str(tmp_path), STACKD_UPDATES__CONCURRENCY="4")
        )
        assert cfg.source is None
        assert cfg.updates.concurrency == 4

    def test_stackd_config_and_unrelated_variables_are_not_settings(self, tmp_path: Path) -> None:
        cfg = load(
            self.FILE,
            tmp_path,
            STACKD_CONFIG="/ignored/here",
            STACKD_E2E_COMPOSE="podman-compose",
            STACKD_LOG_LEVEL="debug",
            LANG="C",
            XSTACKD_DAEMON__HEAL="x",
        )
        assert cfg.daemon.heal is HealMode.REPORT

    def test_process_environment_is_not_read_or_changed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("STACKD_DAEMON__HEAL", "nonsense")
        environ = env(STACKD_UPDATES__CONCURRENCY="3")
        before = dict(environ)
        cfg = load(self.FILE, tmp_path, STACKD_UPDATES__CONCURRENCY="3")
        assert (cfg.daemon.heal, cfg.updates.concurrency) == (HealMode.REPORT, 3)
        assert environ == before

    def test_process_environment_is_the_default(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "config.toml"
        path.write_text(self.FILE)
        monkeypatch.setenv("STACKD_DAEMON__HEAL", "repair")
        monkeypatch.setenv("HOME", HOME)
        assert load_config(path).daemon.heal is HealMode.REPAIR


class TestEnvironmentErrors:
    """A bad variable is reported by its name, with `environment` in place of the file."""

    @pytest.mark.parametrize(
        ("var", "value", "reason"),
        [
            ("STACKD_UPDATES__CONCURRENCY", "0", "must be at least 1, got the number 0"),
            ("STACKD_UPDATES__CONCURRENCY", "four", "expected a whole number, got 'four'"),
            ("STACKD_UPDATES__CONCURRENCY", "2.5", "expected a whole number"),
            ("STACKD_UPDATES__PERSISTENT", "maybe", "expected true or false, got 'maybe'"),
            ("STACKD_DAEMON__HEAL", "fix", "must be 'report' or 'repair', got the string 'fix'"),
            (
                "STACKD_DAEMON__HEALS",
                "repair",
                "unknown key 'heals'; did you mean 'heal'? known keys are:",
            ),
            (
                "STACKD_DAEMON_HEAL",
                "repair",
                "not a stackd setting: settings are STACKD_<SECTION>__<KEY>",
            ),
            ("STACKD_UPDATE__TIMEOUT", "1h", "not a stackd setting"),
            ("STACKD_DEAMON__HEAL", "repair", "not a stackd setting"),
            ("STACKD_STACK__WEB__UPDATE", "no", "not a stackd setting"),
            ("STACKD_DAEMON", "{}", "not a stackd setting"),
            ("STACKD_DAEMON__HEAL__X", "repair", "not a stackd setting"),
            ("STACKD_STACKS__WEB", "{}", "not a stackd setting"),
            ("STACKD_STACKS____UPDATE", "no", "not a stackd setting"),
            ("STACKD_STACKS__WEB__DIR", "/x", "unknown key 'dir'"),
            (
                "STACKD_DAEMON__COMPOSE_COMMAND",
                "docker compose",
                "not valid JSON: give a JSON array",
            ),
            ("STACKD_DAEMON__COMPOSE_COMMAND", "[]", "must not be empty"),
            ("STACKD_DAEMON__COMPOSE_COMMAND", '"docker"', "expected an array"),
            (
                "STACKD_DAEMON__ALLOWED_DROPIN_DIRS",
                '["rel"]',
                "item 1: 'rel' must be an absolute path",
            ),
            ("STACKD_DAEMON__UNIT_DIR", "units", "'units' must be an absolute path"),
            ("STACKD_DAEMON__UNIT_DIR", "/a\nb", "contains a newline"),
            ("STACKD_UPDATES__TIMEOUT", "-5min", "negative duration"),
            ("STACKD_UPDATES__TIMEOUT", "5 parsecs", "unknown unit 'parsecs'"),
            ("STACKD_STACKS__WEB__STARTUP_TIMEOUT", "0", "a timeout must be at least 1us"),
            ("STACKD_STACKS__WEB__ENV_FILES", '["web.env"]', "must be an absolute path"),
            ("STACKD_STACKS__bad@name__UPDATE", "no", "stack name 'bad@name' is not allowed"),
            ("STACKD_STACKS__web-update__UPDATE", "no", "would collide with the update unit"),
            (
                "STACKD_STACKS__API__UPDATE",
                "no",
                "stack 'API' is not in the config file and has no directory: "
                "set STACKD_STACKS__API__DIRECTORY too",
            ),
        ],
    )
    def test_variable_is_named(self, tmp_path: Path, var: str, value: str, reason: str) -> None:
        text = '[stacks.web]\ndirectory = "/srv/web"\n'
        err = config_error(text, tmp_path, **{var: value})
        assert (err.file, err.key) == ("environment", var)
        assert reason in err.reason
        assert len(str(err).splitlines()) == 1
        assert str(err).startswith(f"environment: {var}: ")

    def test_ambiguous_case_insensitive_stack(self, tmp_path: Path) -> None:
        text = '[stacks.Web]\ndirectory = "/a"\n[stacks.wEB]\ndirectory = "/b"\n'
        err = config_error(text, tmp_path, STACKD_STACKS__WEB__UPDATE="no")
        assert err.key == "STACKD_STACKS__WEB__UPDATE"
        assert "matches stacks 'Web', 'wEB' regardless of case" in err.reason

    def test_file_error_is_still_blamed_on_the_file(self, tmp_path: Path) -> None:
        err = config_error("[updates]\nconcurrency = 0\n", tmp_path, STACKD_DAEMON__HEAL="repair")
        assert (err.file, err.key) == (str(tmp_path / "config.toml"), "updates.concurrency")

    def test_missing_key_of_a_file_stack_is_blamed_on_the_file(self, tmp_path: Path) -> None:
        err = config_error(
            "[stacks.web]\nupdate = true\n", tmp_path, STACKD_STACKS__WEB__UPDATE="no"
        )
        assert (err.file, err.key) == (str(tmp_path / "config.toml"), "stacks.web.directory")
        assert err.reason == "required key 'directory' is missing: add it"

    def test_variable_for_a_section_that_is_not_a_table(self, tmp_path: Path) -> None:
        err = config_error('daemon = "x"\n', tmp_path, STACKD_DAEMON__HEAL="repair")
        assert (err.file, err.key) == (str(tmp_path / "config.toml"), "daemon")

    def test_env_fixes_a_bad_file_value(self, tmp_path: Path) -> None:
        cfg = load("[updates]\nconcurrency = 0\n", tmp_path, STACKD_UPDATES__CONCURRENCY="3")
        assert cfg.updates.concurrency == 3

    def test_home_unset_and_tilde(self, tmp_path: Path) -> None:
        path = tmp_path / "config.toml"
        path.write_text('[daemon]\nunit_dir = "/units"\n[stacks.web]\ndirectory = "~/web"\n')
        # With HOME unset the password database answers; the path is still absolute.
        cfg = load_config(path, {})
        assert cfg.stacks[0].directory.is_absolute()
        assert cfg.stacks[0].directory.name == "web"


def bad_cases() -> list[ParameterSet]:
    cases = []
    for path in sorted(BAD_CONFIGS.glob("*.toml")):
        header = path.read_bytes().decode("latin-1")
        key = re.search(r"^# key: ?(.*)$", header, re.MULTILINE)
        reason = re.search(r"^# reason: (.+)$", header, re.MULTILINE)
        assert key, f"{path.name} needs a '# key:' header line"
        assert reason, f"{path.name} needs a '# reason:' header line"
        cases.append(pytest.param(path, key.group(1), reason.group(1), id=path.stem))
    return cases


class TestBadConfigCorpus:
    """Every file in bad_configs/ fails with its file, the key in its header and the reason."""

    def test_corpus_is_large(self) -> None:
        assert len(bad_cases()) >= 30

    @pytest.mark.parametrize(("path", "key", "reason"), bad_cases())
    def test_bad_config(self, path: Path, key: str, reason: str) -> None:
        with pytest.raises(ConfigError) as caught:
            load_config(path, env())
        err = caught.value
        assert err.file == str(path)
        assert err.key == key
        assert reason in err.reason
        assert err.exit_code == 2
        message = str(err)
        assert len(message.splitlines()) == 1
        assert message == (f"{path}: {key}: {err.reason}" if key else f"{path}: {err.reason}")
