"""Live detection: findings appear from inotify and manager signals, without `stackd check`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from helpers import STACKD_BIN, stack_entry, stackd, stacks_config, start_stackd, status_json
from sandbox import Sandbox


def _kinds(sandbox: Sandbox, stack: str) -> set[tuple[str, str]]:
    entry = stack_entry(status_json(sandbox), stack)
    return {(f["kind"], f["source"]) for f in entry["findings"]}


def _started(sandbox: Sandbox, names: list[str]) -> None:
    stacks_config(sandbox, names)
    start_stackd(sandbox)
    sandbox.wait_for(
        lambda: all(
            stack_entry(status_json(sandbox), n)["active_state"] == "active" for n in names
        ),
        timeout=20,
        what="stacks started",
    )


class TestLiveFindings:
    """Each change on the search path is reported from the files as it happens."""

    def test_shadow_copy_appears_and_disappears(self, sandbox: Sandbox) -> None:
        _started(sandbox, ["web", "api"])
        copy = sandbox.etc_unit_dir / "web.service"
        shutil.copy(sandbox.user_unit_dir / "web.service", copy)
        sandbox.wait_for(
            lambda: ("shadowed", "disk") in _kinds(sandbox, "web"),
            timeout=2,
            what="shadowed raised from inotify",
        )
        assert _kinds(sandbox, "api") == set()
        copy.unlink()
        sandbox.wait_for(lambda: not _kinds(sandbox, "web"), timeout=2, what="shadowed cleared")

    def test_dropin_in_directory_created_after_start(self, sandbox: Sandbox) -> None:
        _started(sandbox, ["web"])
        runtime_dir = sandbox.runtime_dir / "systemd" / "user"
        assert not runtime_dir.exists()
        dropin = runtime_dir / "web.service.d" / "override.conf"
        dropin.parent.mkdir(parents=True)
        dropin.write_text("[Service]\nEnvironment=X=1\n")
        sandbox.wait_for(
            lambda: ("foreign-dropin", "disk") in _kinds(sandbox, "web"),
            timeout=2,
            what="foreign drop-in in a directory created after the daemon started",
        )
        shutil.rmtree(runtime_dir)
        sandbox.wait_for(lambda: not _kinds(sandbox, "web"), timeout=2, what="cleared")

    def test_mask_symlink(self, sandbox: Sandbox) -> None:
        _started(sandbox, ["web"])
        mask = sandbox.etc_unit_dir / "web.service"
        mask.symlink_to("/dev/null")
        sandbox.wait_for(
            lambda: ("masked", "disk") in _kinds(sandbox, "web"), timeout=2, what="masked"
        )
        mask.unlink()
        sandbox.wait_for(lambda: not _kinds(sandbox, "web"), timeout=2, what="cleared")

    def test_owned_file_replaced_by_rename(self, sandbox: Sandbox) -> None:
        _started(sandbox, ["web"])
        owned = sandbox.user_unit_dir / "web.service"
        original = owned.read_text()
        tmp = owned.with_name(".web.service.tmp")
        tmp.write_text(original.replace("Description=", "Description=edited "))
        os.replace(tmp, owned)
        sandbox.wait_for(
            lambda: ("drift", "disk") in _kinds(sandbox, "web"), timeout=2, what="drift"
        )
        tmp.write_text(original)
        os.replace(tmp, owned)
        sandbox.wait_for(
            lambda: ("drift", "disk") not in _kinds(sandbox, "web"),
            timeout=2,
            what="drift cleared when the file is put back",
        )

    def test_manager_reexec_keeps_the_daemon_watching(self, sandbox: Sandbox) -> None:
        _started(sandbox, ["web"])
        pid_before = status_json(sandbox)["daemon"]["pid"]
        sandbox.systemctl("daemon-reexec", timeout=30)
        shutil.copy(sandbox.user_unit_dir / "web.service", sandbox.etc_unit_dir / "web.service")
        sandbox.wait_for(
            lambda: ("shadowed", "disk") in _kinds(sandbox, "web"), timeout=5, what="shadowed"
        )
        doc = status_json(sandbox)
        assert doc["daemon"]["pid"] == pid_before
        assert doc["daemon"]["manager"] == "connected"


class TestManagerAway:
    """A daemon outside the manager survives it going away and catches up on return."""

    def test_collision_while_manager_is_down_is_found_after_reconnect(
        self, sandbox: Sandbox
    ) -> None:
        stacks_config(sandbox, ["web"])
        log = (sandbox.base / "daemon.log").open("w")
        daemon = subprocess.Popen(
            [str(STACKD_BIN), "daemon", "--log", "console"],
            env=sandbox.env,
            stdout=log,
            stderr=log,
        )
        try:
            sandbox.wait_for(
                lambda: (
                    (doc := _try_status(sandbox)) is not None
                    and stack_entry(doc, "web")["active_state"] == "active"
                ),
                timeout=20,
                what="web started by the daemon",
            )
            sandbox.stop_manager()
            shutil.copy(sandbox.user_unit_dir / "web.service", sandbox.etc_unit_dir / "web.service")
            sandbox.start_manager()
            sandbox.wait_for(
                lambda: ("shadowed", "disk") in _kinds_or_none(sandbox, "web"),
                timeout=15,
                what="shadowed found after the daemon reconnected",
            )
            assert daemon.poll() is None
            assert status_json(sandbox)["daemon"]["manager"] == "connected"
        finally:
            daemon.terminate()
            code = daemon.wait(timeout=20)
            log.close()
        output = (sandbox.base / "daemon.log").read_text()
        assert code == 0, output
        assert "manager.unavailable" in output
        assert output.count("daemon.started") == 1


def _try_status(sandbox: Sandbox) -> dict[str, Any] | None:
    """The status document, or None while the daemon is not (yet, again) on the bus."""
    result = stackd(sandbox, "status", "--json")
    if result.returncode == 3:
        return None
    assert result.returncode in (0, 1), result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def _kinds_or_none(sandbox: Sandbox, stack: str) -> set[tuple[str, str]]:
    """Like _kinds, but an unreachable daemon (bus not back yet) is just 'not yet'."""
    doc = _try_status(sandbox)
    if doc is None:
        return set()
    return {(f["kind"], f["source"]) for f in stack_entry(doc, stack)["findings"]}
