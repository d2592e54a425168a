"""`stackd check --offline`: ownership verified against the user manager, no daemon needed.

The units are written the way a Home Manager activation would leave them (rendered by stackd
itself, then `daemon-reload`), and no stackd daemon runs while the check does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from helpers import FAKE_COMPOSE, make_stack_dir, stackd, write_config
from sandbox import Sandbox

from stackd.adapters.unitfiles import write_unit
from stackd.settings import load_config
from stackd.verify import desired_units


def setup_stacks(sandbox: Sandbox, names: list[str], daemon: str = "") -> Path:
    """Config for `names`, their units written into unit_dir and loaded by the manager."""
    lines = ["[daemon]", f'compose_command = ["{FAKE_COMPOSE}"]', daemon]
    for name in names:
        lines += [f"[stacks.{name}]", f'directory = "{make_stack_dir(sandbox, name)}"']
    path = write_config(sandbox, "\n".join(lines) + "\n")
    config = load_config(path, sandbox.env)
    desired = desired_units(config)
    assert not desired.broken
    for unit, text in desired.texts.items():
        write_unit(config.daemon.unit_dir, unit, text)
    sandbox.daemon_reload()
    return path


def offline(sandbox: Sandbox, *args: str) -> tuple[int, list[dict[str, Any]]]:
    result = stackd(sandbox, "check", "--offline", "--json", *args, timeout=120)
    assert result.returncode in (0, 1, 3), result.stderr
    findings: list[dict[str, Any]] = json.loads(result.stdout)["findings"]
    return result.returncode, findings


def no_daemon(sandbox: Sandbox) -> None:
    result = stackd(sandbox, "status")
    assert result.returncode == 3
    assert "not running" in result.stderr


class TestManagerUp:
    """With the user manager up, the exit code says whether ownership holds."""

    def test_clean_setup_exits_0(self, sandbox: Sandbox) -> None:
        setup_stacks(sandbox, ["web", "api"])
        no_daemon(sandbox)
        assert offline(sandbox) == (0, [])
        text = stackd(sandbox, "check", "--offline")
        assert text.returncode == 0
        assert "ownership verified" in text.stdout

    def test_shadow_and_foreign_dropin_exit_1(self, sandbox: Sandbox) -> None:
        setup_stacks(sandbox, ["web", "api"])
        unit = sandbox.user_unit_dir / "web.service"
        (sandbox.etc_unit_dir / "web.service").write_text(unit.read_text())
        dropins = sandbox.etc_unit_dir / "api.service.d"
        dropins.mkdir()
        (dropins / "x.conf").write_text("[Service]\nEnvironment=X=1\n")
        sandbox.daemon_reload()

        code, findings = offline(sandbox)
        assert code == 1
        got = {(f["kind"], f["unit"], f["source"]) for f in findings}
        assert got == {
            ("shadowed", "web.service", "disk"),
            ("foreign-dropin", "api.service", "disk"),
            ("foreign-dropin", "api.service", "manager"),
        }
        for finding in findings:
            if finding["kind"] == "foreign-dropin":
                assert finding["paths"] == [str(dropins / "x.conf")]
        text = stackd(sandbox, "check", "--offline")
        assert text.returncode == 1
        assert "3 finding(s)" in text.stdout

    def test_stale_and_foreign_fragment_from_the_manager(self, sandbox: Sandbox) -> None:
        setup_stacks(sandbox, ["web"])
        unit = sandbox.user_unit_dir / "web.service"
        control = sandbox.runtime_dir / "systemd" / "user.control"
        control.mkdir(parents=True)
        (control / "web.service").write_text(unit.read_text())
        sandbox.daemon_reload()
        code, findings = offline(sandbox)
        assert code == 1
        manager = [f for f in findings if f["source"] == "manager"]
        assert [(f["kind"], f["paths"]) for f in manager] == [
            ("foreign-fragment", [str(control / "web.service"), str(unit)])
        ]

        (control / "web.service").unlink()
        sandbox.daemon_reload()
        # A unit nobody holds is loaded afresh by the check itself: only a running (or
        # otherwise referenced) unit can lag behind its file.
        sandbox.systemctl("start", "web.service")
        assert offline(sandbox) == (0, [])
        unit.write_text(unit.read_text())  # same text, newer mtime: the manager is behind
        stat = unit.stat()
        os.utime(unit, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        code, findings = offline(sandbox)
        assert code == 1
        assert [(f["kind"], f["source"]) for f in findings] == [("stale", "manager")]

    def test_unit_dir_off_the_search_path(self, sandbox: Sandbox) -> None:
        elsewhere = sandbox.home / "units"
        setup_stacks(sandbox, ["web"], f'unit_dir = "{elsewhere}"')
        code, findings = offline(sandbox)
        assert code == 1
        off_path = [f for f in findings if f["kind"] == "config"]
        assert len(off_path) == 1
        assert off_path[0]["paths"] == [str(elsewhere)]
        assert str(elsewhere) in off_path[0]["detail"]

    def test_config_error_exits_2(self, sandbox: Sandbox) -> None:
        path = write_config(sandbox, "[daemon]\nheal = 'fix'\n")
        result = stackd(sandbox, "check", "--offline", "--json")
        assert result.returncode == 2
        assert str(path) in result.stderr
        assert "daemon.heal" in result.stderr

    def test_fifty_stacks_clean(self, sandbox: Sandbox) -> None:
        setup_stacks(sandbox, [f"s{i:03d}" for i in range(50)])
        assert offline(sandbox) == (0, [])


class TestManagerDown:
    """Without a user manager the check says so and exits 3."""

    def test_manager_unavailable_exits_3(self, sandbox: Sandbox) -> None:
        setup_stacks(sandbox, ["web"])
        sandbox.stop_manager()
        code, findings = offline(sandbox)
        assert code == 3
        assert [f["kind"] for f in findings] == ["manager-unavailable"]
        assert "systemctl --user" in findings[0]["detail"]

        text = stackd(sandbox, "check", "--offline")
        assert text.returncode == 3
        assert "manager-unavailable" in text.stdout

    def test_back_up_again(self, sandbox: Sandbox) -> None:
        setup_stacks(sandbox, ["web"])
        sandbox.stop_manager()
        assert offline(sandbox)[0] == 3
        sandbox.start_manager()
        assert offline(sandbox) == (0, [])
