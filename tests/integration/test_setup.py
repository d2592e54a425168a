"""`stackd setup`, `stackd init` and install.sh against a real user manager.

The install.sh test pip-installs this checkout into a fresh venv (about 20 s with the machine's
pip configuration, which is passed through: PIP_* variables and proxies).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import (
    CONTRIB_UNIT,
    REPO,
    STACKD_BIN,
    stack_entry,
    stackd,
    stacks_config,
    start_stackd,
    status_json,
)
from hypothesis import given
from hypothesis import strategies as st
from sandbox import Sandbox

from stackd.settings import load_config
from stackd.setup import (
    CONTRIB_EXEC_START,
    SETUP_MARKER,
    daemon_command,
    exec_start_line,
    render_service_unit,
    stack_table,
    toml_string,
)

INSTALL_SH = REPO / "install.sh"


def unit_file(sandbox: Sandbox) -> Path:
    return sandbox.user_unit_dir / "stackd.service"


def exec_start(sandbox: Sandbox) -> str:
    line = next(
        line
        for line in unit_file(sandbox).read_text().splitlines()
        if line.startswith("ExecStart=")
    )
    return line.removeprefix("ExecStart=")


def unit_state(sandbox: Sandbox) -> tuple[str, str]:
    enabled = sandbox.systemctl("is-enabled", "stackd.service", check=False).stdout.strip()
    active = sandbox.systemctl("is-active", "stackd.service", check=False).stdout.strip()
    return enabled, active


def main_pid(sandbox: Sandbox) -> int:
    return int(sandbox.systemctl("show", "-p", "MainPID", "--value", "stackd.service").stdout)


class TestUnitTemplate:
    """contrib/systemd/stackd.service is the setup template with ExecStart under ~/.local/bin."""

    def test_contrib_unit_is_the_rendered_template(self) -> None:
        assert CONTRIB_UNIT.read_text() == render_service_unit(CONTRIB_EXEC_START)

    def test_template_carries_the_marker(self) -> None:
        assert render_service_unit("/x daemon").startswith(SETUP_MARKER)

    def test_exec_start_escapes_for_systemd(self) -> None:
        assert (
            exec_start_line(["/opt/my tools/stackd", "daemon"]) == '"/opt/my tools/stackd" daemon'
        )
        assert exec_start_line(["/opt/100%/stackd", "daemon"]) == "/opt/100%%/stackd daemon"


class TestUpdateTimer:
    """contrib's example stackd-update.timer loads, and the daemon's own schedule can be
    switched off as the timer's comment says."""

    def test_timer_loads_and_daemon_schedule_never_fires(self, sandbox: Sandbox) -> None:
        for name in ("stackd-update.service", "stackd-update.timer"):
            (sandbox.user_unit_dir / name).write_text((CONTRIB_UNIT.parent / name).read_text())
        config = stacks_config(sandbox, ["web"])
        config.write_text(config.read_text() + '\n[updates]\nschedule = "2000-01-01"\n')
        start_stackd(sandbox)
        sandbox.systemctl("enable", "--now", "stackd-update.timer")
        show = sandbox.systemctl(
            "show", "-p", "LoadState,ActiveState,Triggers", "stackd-update.timer"
        )
        assert "LoadState=loaded" in show.stdout
        assert "ActiveState=active" in show.stdout
        assert "Triggers=stackd-update.service" in show.stdout
        assert status_json(sandbox)["updates"]["next_run"] is None


class TestDaemonCommand:
    """ExecStart is the running stackd: the console script's real path, or python -m."""

    def test_console_script_is_resolved(self, tmp_path: Path) -> None:
        real = tmp_path / "venv" / "bin" / "stackd"
        real.parent.mkdir(parents=True)
        real.write_text("#!/bin/sh\n")
        link = tmp_path / "stackd"
        link.symlink_to(real)
        assert daemon_command(str(link), "/usr/bin/python3") == [str(real), "daemon"]

    def test_python_dash_m(self) -> None:
        argv0 = str(REPO / "stackd" / "__main__.py")
        cmd = daemon_command(argv0, "/venv/bin/python")
        assert cmd == ["/venv/bin/python", "-m", "stackd", "daemon"]

    def test_embedded_falls_back_to_path_then_python(self, tmp_path: Path) -> None:
        found = tmp_path / "stackd"
        found.write_text("")
        assert daemon_command("/usr/bin/pytest", "/py", which=str(found)) == [
            str(found),
            "daemon",
        ]
        assert daemon_command("/usr/bin/pytest", "/py") == ["/py", "-m", "stackd", "daemon"]


class TestSetup:
    """`stackd setup` writes, enables and starts stackd.service, idempotently."""

    def test_first_run_installs_and_starts(self, sandbox: Sandbox) -> None:
        result = stackd(sandbox, "setup")
        assert result.returncode == 0, result.stderr
        assert exec_start(sandbox) == f"{os.path.realpath(STACKD_BIN)} daemon"
        assert unit_state(sandbox) == ("enabled", "active")
        out = result.stdout
        assert "wrote ~/.config/systemd/user/stackd.service" in out
        assert "daemon-reload" in out
        assert "enabled stackd.service" in out
        assert "started stackd.service" in out
        # no logind in the sandbox: the hint says so and how to turn lingering on
        assert "cannot tell whether lingering is on" in out
        assert "loginctl enable-linger root" in out
        assert "stackd init" in out  # no config yet
        doc = status_json(sandbox)
        assert doc["daemon"]["pid"] == main_pid(sandbox)

    def test_second_run_changes_nothing(self, sandbox: Sandbox) -> None:
        assert stackd(sandbox, "setup").returncode == 0
        before = unit_file(sandbox).stat()
        pid = main_pid(sandbox)
        result = stackd(sandbox, "setup")
        assert result.returncode == 0, result.stderr
        assert "already set up" in result.stdout
        assert "reload" not in result.stdout
        after = unit_file(sandbox).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert main_pid(sandbox) == pid

    def test_python_dash_m_rewrites_and_restarts(self, sandbox: Sandbox) -> None:
        assert stackd(sandbox, "setup").returncode == 0
        pid = main_pid(sandbox)
        result = sandbox.run(sys.executable, "-m", "stackd", "setup", check=False, timeout=60)
        assert result.returncode == 0, result.stderr
        assert exec_start(sandbox) == f"{sys.executable} -m stackd daemon"
        assert "updated ~/.config/systemd/user/stackd.service" in result.stdout
        assert "restarted stackd.service" in result.stdout
        assert main_pid(sandbox) != pid
        assert unit_state(sandbox) == ("enabled", "active")

    def test_no_start_enables_only(self, sandbox: Sandbox) -> None:
        result = stackd(sandbox, "setup", "--no-start")
        assert result.returncode == 0, result.stderr
        assert unit_state(sandbox) == ("enabled", "inactive")
        assert "systemctl --user start stackd.service" in result.stdout

    def test_refuses_hand_written_unit(self, sandbox: Sandbox) -> None:
        mine = "[Service]\nExecStart=/bin/true\n"
        unit_file(sandbox).write_text(mine)
        result = stackd(sandbox, "setup")
        assert result.returncode == 2
        assert "was not written by `stackd setup`" in result.stderr
        assert "mv " in result.stderr
        assert unit_file(sandbox).read_text() == mine
        assert stackd(sandbox, "setup", "--uninstall").returncode == 2
        assert unit_file(sandbox).read_text() == mine

    def test_xdg_config_home_is_respected(self, sandbox: Sandbox) -> None:
        alt = sandbox.home / "alt-config"
        result = sandbox.run(
            str(STACKD_BIN), "setup", "--no-start", env={"XDG_CONFIG_HOME": str(alt)}, check=False
        )
        assert (alt / "systemd" / "user" / "stackd.service").is_file()
        assert not unit_file(sandbox).exists()
        # the sandbox's manager reads ~/.config, so the file is invisible to it: said, and failed
        assert "not on the user manager's unit search path" in result.stderr
        assert result.returncode == 1

    def test_manager_unreachable_exits_3(self, sandbox: Sandbox) -> None:
        result = sandbox.run(
            str(STACKD_BIN),
            "setup",
            env={
                "XDG_RUNTIME_DIR": "/nonexistent",
                "DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent/bus",
            },
            check=False,
        )
        assert result.returncode == 3
        assert "cannot reach the systemd user manager" in result.stderr
        assert "loginctl enable-linger" in result.stderr
        assert not unit_file(sandbox).exists()

    def test_uninstall_removes_unit_and_keeps_config(self, sandbox: Sandbox) -> None:
        config = stacks_config(sandbox, ["web"])
        assert stackd(sandbox, "setup").returncode == 0
        result = stackd(sandbox, "setup", "--uninstall")
        assert result.returncode == 0, result.stderr
        assert "stopped and disabled stackd.service" in result.stdout
        assert not unit_file(sandbox).exists()
        load = sandbox.systemctl("show", "-p", "LoadState", "--value", "stackd.service")
        assert load.stdout.strip() == "not-found"
        assert not (sandbox.user_unit_dir / "default.target.wants" / "stackd.service").exists()
        assert config.exists()
        again = stackd(sandbox, "setup", "--uninstall")
        assert again.returncode == 0
        assert "nothing to do" in again.stdout

    def test_uninstall_purge_removes_config_and_state(self, sandbox: Sandbox) -> None:
        config = stacks_config(sandbox, ["web"])
        assert stackd(sandbox, "setup").returncode == 0
        state = Path(sandbox.env["XDG_STATE_HOME"]) / "stackd"
        state.mkdir(parents=True)  # the daemon creates it on the first update run
        (state / "history.jsonl").write_text("")
        result = stackd(sandbox, "setup", "--uninstall", "--purge")
        assert result.returncode == 0, result.stderr
        assert not config.parent.exists()
        assert not state.exists()
        assert stackd(sandbox, "setup", "--purge").returncode == 2


class TestNoConfig:
    """With no config file, status says how to add a stack."""

    def test_status_points_at_stackd_init(self, sandbox: Sandbox) -> None:
        start_stackd(sandbox)
        result = stackd(sandbox, "status")
        assert result.returncode == 0, result.stderr
        assert "stackd init NAME --directory DIR" in result.stdout


# -- stackd init --------------------------------------------------------------------------------


def init_env(tmp_path: Path) -> dict[str, str]:
    """A HOME with no user manager and no daemon: init works on files only."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    keep = {k: v for k, v in os.environ.items() if k in {"PATH", "LANG"}}
    return keep | {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_RUNTIME_DIR": str(tmp_path / "no-runtime"),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus",
    }


def run_init(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STACKD_BIN), "init", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def config_of(env: dict[str, str]) -> Path:
    return Path(env["XDG_CONFIG_HOME"]) / "stackd" / "config.toml"


class TestInit:
    """`stackd init` appends a validated [stacks.NAME] table, atomically."""

    def test_creates_config_with_header_and_private_modes(self, tmp_path: Path) -> None:
        env = init_env(tmp_path)
        result = run_init(env, "web", "--directory", "/srv/web")
        assert result.returncode == 0, result.stderr
        path = config_of(env)
        text = path.read_text()
        assert text.startswith("# stackd configuration")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        config = load_config(path, env)
        assert [s.name for s in config.stacks] == ["web"]
        assert config.stacks[0].directory == Path("/srv/web")
        assert "the daemon is not running" in result.stdout
        assert "systemctl --user start stackd" in result.stdout

    def test_all_options_round_trip(self, tmp_path: Path) -> None:
        env = init_env(tmp_path)
        odd = '/srv/my "web" \\ stäck'
        result = run_init(
            env,
            "my.web",
            "--directory",
            odd,
            "--compose-file",
            "compose.yaml",
            "--compose-file",
            "override.yaml",
            "--env-file",
            "/run/secrets/web.env",
            "--no-update",
            "--adopt",
        )
        assert result.returncode == 0, result.stderr
        (stack,) = load_config(config_of(env), env).stacks
        assert stack.name == "my.web"
        assert stack.directory == Path(odd)
        assert stack.compose_files == ("compose.yaml", "override.yaml")
        assert stack.env_files == (Path("/run/secrets/web.env"),)
        assert (stack.update, stack.managed) == (False, False)

    def test_existing_content_is_kept_byte_for_byte(self, tmp_path: Path) -> None:
        env = init_env(tmp_path)
        path = config_of(env)
        path.parent.mkdir(parents=True)
        original = (
            b'# mine\n[daemon]\nheal = "repair"   # odd   spacing\n[stacks.a]\ndirectory="/a"'
        )
        path.write_bytes(original)
        path.chmod(0o640)
        assert run_init(env, "b", "--directory", "/b").returncode == 0
        new = path.read_bytes()
        assert new.startswith(original + b"\n")
        assert [s.name for s in load_config(path, env).stacks] == ["a", "b"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o640

    def test_duplicate_is_refused(self, tmp_path: Path) -> None:
        env = init_env(tmp_path)
        assert run_init(env, "web", "--directory", "/srv/web").returncode == 0
        before = config_of(env).read_bytes()
        result = run_init(env, "web", "--directory", "/srv/other")
        assert result.returncode == 2
        assert "stacks.web: this stack is already configured" in result.stderr
        assert config_of(env).read_bytes() == before

    @pytest.mark.parametrize(
        ("name", "directory", "reason"),
        [
            ("bad name", "/srv/x", "is not allowed"),
            ("web-update", "/srv/x", "ends in '-update'"),
            ("web", "relative/dir", "must be an absolute path"),
        ],
    )
    def test_invalid_is_refused_before_writing(
        self, tmp_path: Path, name: str, directory: str, reason: str
    ) -> None:
        env = init_env(tmp_path)
        result = run_init(env, name, "--directory", directory)
        assert result.returncode == 2
        assert reason in result.stderr
        assert str(config_of(env)) in result.stderr
        assert not config_of(env).exists()
        leftovers = list(config_of(env).parent.glob(".config.toml.*"))
        assert leftovers == []

    def test_broken_existing_file_is_reported_and_kept(self, tmp_path: Path) -> None:
        env = init_env(tmp_path)
        path = config_of(env)
        path.parent.mkdir(parents=True)
        path.write_text("[daemon\n")
        result = run_init(env, "web", "--directory", "/srv/web")
        assert result.returncode == 2
        assert "invalid TOML" in result.stderr
        assert path.read_text() == "[daemon\n"

    def test_symlinked_config_is_refused(self, tmp_path: Path) -> None:
        env = init_env(tmp_path)
        target = tmp_path / "store-config.toml"
        target.write_text("")
        config_of(env).parent.mkdir(parents=True)
        config_of(env).symlink_to(target)
        result = run_init(env, "web", "--directory", "/srv/web")
        assert result.returncode == 2
        assert "is a symlink" in result.stderr
        assert target.read_text() == ""

    def test_running_daemon_reloads_and_shows_the_stack(self, sandbox: Sandbox) -> None:
        stacks_config(sandbox, ["web"])
        start_stackd(sandbox)
        directory = sandbox.home / "stacks" / "api"
        directory.mkdir(parents=True)
        (directory / "compose.yaml").write_text("services: {}\n")
        result = stackd(sandbox, "init", "api", "--directory", str(directory))
        assert result.returncode == 0, result.stderr
        assert "the daemon reloaded its config" in result.stdout
        assert stack_entry(status_json(sandbox), "api")["unit"] == "api.service"


class TestTomlString:
    """The TOML basic-string encoder round-trips through tomllib."""

    @given(st.text())
    def test_round_trip(self, value: str) -> None:
        assert tomllib.loads(f"k = {toml_string(value)}")["k"] == value

    @given(st.text(min_size=1), st.text(), st.lists(st.text()))
    def test_stack_table_round_trips(self, name: str, directory: str, files: list[str]) -> None:
        doc = tomllib.loads(stack_table(name, directory, files, update=False))
        assert doc == {
            "stacks": {
                name: {"directory": directory, "update": False}
                | ({"compose_files": files} if files else {})
            }
        }

    def test_surrogates_are_refused(self) -> None:
        with pytest.raises(Exception, match="surrogate"):
            toml_string("a\udcff")


# -- install.sh -------------------------------------------------------------------------------


def installer_env() -> dict[str, str]:
    """The machine's pip configuration (index, wheel dirs, proxies), passed to install.sh."""
    names = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    return {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in names}


def install(sandbox: Sandbox, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return sandbox.run(str(INSTALL_SH), *args, env=installer_env(), check=False, timeout=timeout)


class TestInstallScript:
    """./install.sh: venv, link, setup; again: nothing changes; --uninstall: nothing left."""

    @pytest.mark.timeout(420)
    def test_install_again_and_uninstall(self, sandbox: Sandbox) -> None:
        venv = sandbox.home / ".local" / "share" / "stackd" / "venv"
        link = sandbox.home / ".local" / "bin" / "stackd"

        first = install(sandbox)
        assert first.returncode == 0, first.stdout + first.stderr
        assert link.is_symlink()
        assert os.readlink(link) == str(venv / "bin" / "stackd")
        assert exec_start(sandbox) == f"{venv}/bin/stackd daemon"
        assert unit_state(sandbox) == ("enabled", "active")
        status = sandbox.run(str(link), "status", "--json", check=False)
        assert status.returncode in (0, 1), status.stderr
        doc = json.loads(status.stdout)
        assert doc["version"] == 1
        assert doc["daemon"]["pid"] == main_pid(sandbox)
        show = sandbox.systemctl("show", "-p", "ExecStart", "--value", "stackd.service").stdout
        assert f"path={venv}/bin/stackd" in show

        pid = main_pid(sandbox)
        mtime = unit_file(sandbox).stat().st_mtime_ns
        second = install(sandbox, timeout=60)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "is current" in second.stdout
        assert "already set up" in second.stdout
        assert main_pid(sandbox) == pid
        assert unit_file(sandbox).stat().st_mtime_ns == mtime

        gone = install(sandbox, "--uninstall", timeout=60)
        assert gone.returncode == 0, gone.stdout + gone.stderr
        assert not unit_file(sandbox).exists()
        assert not link.exists()
        assert not link.is_symlink()
        assert not venv.exists()
        assert not venv.parent.exists()
        load = sandbox.systemctl("show", "-p", "LoadState", "--value", "stackd.service")
        assert load.stdout.strip() == "not-found"
        assert not list(sandbox.user_unit_dir.rglob("stackd.service"))


class TestInstallScriptChecks:
    """install.sh refuses early, with the fix, when Python is too old or has no venv."""

    def fake_python(self, tmp_path: Path, version: str, venv_ok: bool) -> Path:
        fake = tmp_path / "python3"
        fake.write_text(
            "#!/bin/sh\n"
            'case "$*" in *ensurepip*) exit ' + ("0" if venv_ok else "1") + " ;; esac\n"
            f"echo {version}\n"
        )
        fake.chmod(0o755)
        return fake

    def run(self, tmp_path: Path, python: Path) -> subprocess.CompletedProcess[str]:
        home = tmp_path / "home"
        home.mkdir()
        return subprocess.run(
            [str(INSTALL_SH)],
            env={"PATH": os.environ["PATH"], "HOME": str(home), "PYTHON": str(python)},
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )

    def test_old_python(self, tmp_path: Path) -> None:
        result = self.run(tmp_path, self.fake_python(tmp_path, "3.9", venv_ok=True))
        assert result.returncode == 2
        assert "is Python 3.9; stackd needs Python >= 3.11" in result.stderr
        assert not (tmp_path / "home" / ".local").exists()

    def test_missing_venv_module(self, tmp_path: Path) -> None:
        result = self.run(tmp_path, self.fake_python(tmp_path, "3.11", venv_ok=False))
        assert result.returncode == 2
        assert "apt install python3-venv" in result.stderr
        assert not (tmp_path / "home" / ".local").exists()
