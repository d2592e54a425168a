"""`stackd doctor` in the sandbox: a sound setup passes, a broken one fails with the fixes."""

from __future__ import annotations

import json
from typing import Any

from helpers import FAKE_COMPOSE, STACKD_BIN, make_stack_dir, stackd, write_config
from sandbox import Sandbox

from stackd.doctor import engine_of


def doctor(sandbox: Sandbox) -> tuple[int, dict[str, dict[str, Any]]]:
    result = stackd(sandbox, "doctor", "--json")
    doc = json.loads(result.stdout)
    assert doc["version"] == 1
    assert doc["ok"] == (result.returncode == 0)
    return result.returncode, {c["name"]: c for c in doc["checks"]}


class TestEngineOf:
    """The engine is derived from the compose command's program name."""

    def test_known_and_unknown(self) -> None:
        assert engine_of(["podman", "compose"]) == "podman"
        assert engine_of(["/usr/bin/podman-compose"]) == "podman"
        assert engine_of(["docker", "compose"]) == "docker"
        assert engine_of(["docker-compose"]) == "docker"
        assert engine_of(["/opt/fake-compose"]) is None


class TestDoctor:
    def test_sound_setup_passes(self, sandbox: Sandbox) -> None:
        """Installed, configured and running: no failure, exit 0."""
        directory = make_stack_dir(sandbox, "web")
        write_config(
            sandbox,
            f'[daemon]\ncompose_command = ["{FAKE_COMPOSE}"]\n'
            f'[stacks.web]\ndirectory = "{directory}"\n',
        )
        assert stackd(sandbox, "setup").returncode == 0
        code, checks = doctor(sandbox)
        assert code == 0, checks
        assert checks["user manager"]["status"] == "ok"
        assert checks["config"]["status"] == "ok"
        assert checks["compose"]["status"] == "ok"
        assert checks["unit_dir"]["status"] == "ok"
        assert checks["stackd.service"]["status"] == "ok"
        assert checks["daemon"]["status"] == "ok"
        assert checks["subuid/subgid"]["status"] == "ok"  # root
        assert "root" in checks["subuid/subgid"]["detail"]
        # fake-compose drives no known engine: said, not failed
        assert checks["engine"]["status"] == "skip"
        assert "neither podman nor docker" in checks["engine"]["detail"]
        # no logind in the sandbox
        assert checks["lingering"]["status"] == "warn"
        assert checks["lingering"]["fix"] == "loginctl enable-linger root"
        text = stackd(sandbox, "doctor")
        assert text.returncode == 0
        assert "fix: loginctl enable-linger root" in text.stdout

    def test_broken_setup_fails_with_fixes(self, sandbox: Sandbox) -> None:
        """Missing compose command, unit_dir off the search path, no service: exit 1."""
        elsewhere = sandbox.home / "units"
        write_config(
            sandbox,
            f'[daemon]\ncompose_command = ["/nonexistent/compose"]\nunit_dir = "{elsewhere}"\n',
        )
        code, checks = doctor(sandbox)
        assert code == 1
        assert checks["compose"]["status"] == "fail"
        assert "/nonexistent/compose not found" in checks["compose"]["detail"]
        assert "compose_command" in checks["compose"]["fix"]
        assert checks["unit_dir"]["status"] == "fail"
        assert str(elsewhere) in checks["unit_dir"]["detail"]
        assert "~/.config/systemd/user" in checks["unit_dir"]["fix"]
        assert checks["stackd.service"]["status"] == "fail"
        assert checks["stackd.service"]["fix"] == "stackd setup"
        assert checks["daemon"]["status"] == "fail"
        text = stackd(sandbox, "doctor")
        assert text.returncode == 1
        assert "fix: stackd setup" in text.stdout
        assert "check(s) failed" in text.stdout

    def test_invalid_config_and_failing_compose(self, sandbox: Sandbox) -> None:
        write_config(sandbox, "[daemon]\nheal = 'fix'\n")
        code, checks = doctor(sandbox)
        assert code == 1
        assert checks["config"]["status"] == "fail"
        assert "daemon.heal" in checks["config"]["detail"]
        assert checks["compose"]["status"] == "skip"

        control = sandbox.home / "fake-control"
        control.mkdir()
        (control / "version.exit").write_text("4")
        write_config(sandbox, f'[daemon]\ncompose_command = ["{FAKE_COMPOSE}"]\n')
        code, checks = doctor(sandbox)
        assert code == 1
        assert checks["compose"]["status"] == "fail"
        assert "exited 4" in checks["compose"]["detail"]

    def test_manager_unreachable(self, sandbox: Sandbox) -> None:
        result = sandbox.run(
            str(STACKD_BIN),
            "doctor",
            "--json",
            env={
                "XDG_RUNTIME_DIR": "/nonexistent",
                "DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent/bus",
            },
            check=False,
        )
        assert result.returncode == 1
        checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
        assert checks["user manager"]["status"] == "fail"
        assert "login session" in checks["user manager"]["fix"]
        assert checks["stackd.service"]["status"] == "skip"
