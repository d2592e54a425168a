"""The daemon as a real unit of a real user manager: readiness, status, journal, shutdown."""

from __future__ import annotations

import json
import time

from helpers import (
    stack_entry,
    stackd,
    stackd_events,
    stacks_config,
    start_stackd,
    status_json,
    write_config,
)
from sandbox import Sandbox


class TestDaemonUnit:
    """stackd.service (from contrib/) runs the daemon as a Type=notify unit."""

    def test_reaches_ready_and_lists_configured_stacks(self, sandbox: Sandbox) -> None:
        stacks_config(sandbox, ["web", "worker"])
        start_stackd(sandbox)
        state = sandbox.systemctl("show", "-p", "ActiveState,SubState", "stackd.service").stdout
        assert "ActiveState=active" in state
        assert "SubState=running" in state
        doc = status_json(sandbox)
        assert doc["version"] == 1
        assert doc["daemon"]["manager"] == "connected"
        assert [s["name"] for s in doc["stacks"]] == ["web", "worker"]
        assert stack_entry(doc, "web")["unit"] == "web.service"
        pid = int(sandbox.systemctl("show", "-p", "MainPID", "--value", "stackd.service").stdout)
        assert doc["daemon"]["pid"] == pid

    def test_started_unit_shows_active_within_a_second(self, sandbox: Sandbox) -> None:
        stacks_config(sandbox, ["web"])
        start_stackd(sandbox)
        sandbox.wait_for(
            lambda: stack_entry(status_json(sandbox), "web")["active_state"] == "active",
            timeout=20,
            what="stackd starts web.service at startup",
        )
        sandbox.systemctl("stop", "web.service")
        sandbox.wait_for(
            lambda: stack_entry(status_json(sandbox), "web")["active_state"] == "inactive",
            timeout=2,
            what="status sees web.service stopped",
        )
        sandbox.systemctl("start", "web.service")
        started = time.monotonic()
        sandbox.wait_for(
            lambda: stack_entry(status_json(sandbox), "web")["active_state"] == "active",
            timeout=1.0,
            interval=0.01,
            what="status sees web.service active within a second",
        )
        assert time.monotonic() - started < 1.0

    def test_journal_holds_daemon_started_with_fields(self, sandbox: Sandbox) -> None:
        stacks_config(sandbox, ["web"])
        start_stackd(sandbox)
        entries = stackd_events(sandbox, "daemon.started")
        assert len(entries) == 1
        entry = entries[0]
        assert entry["MESSAGE_ID"]
        assert entry["_SYSTEMD_USER_UNIT"] == "stackd.service"
        assert entry["PRIORITY"] == "6"

    def test_sigterm_stops_cleanly(self, sandbox: Sandbox) -> None:
        stacks_config(sandbox, ["web"])
        start_stackd(sandbox)
        sandbox.systemctl("stop", "stackd.service", timeout=30)
        show = sandbox.systemctl("show", "-p", "Result,ExecMainStatus", "stackd.service").stdout
        assert "Result=success" in show
        assert "ExecMainStatus=0" in show
        assert stackd_events(sandbox, "daemon.stopping")
        result = stackd(sandbox, "status")
        assert result.returncode == 3
        assert "not running" in result.stderr
        assert "systemctl --user start stackd" in result.stderr


class TestConfigReload:
    """A bad config on reload is reported and the last good one kept."""

    def test_bad_reload_keeps_last_good_config(self, sandbox: Sandbox) -> None:
        path = stacks_config(sandbox, ["web"])
        start_stackd(sandbox)
        good = path.read_text()
        path.write_text(good + "\n[stacks.bad]\ndirectory = 12\n")
        result = stackd(sandbox, "reload")
        assert result.returncode == 2
        assert "stacks.bad.directory" in result.stderr
        doc = status_json(sandbox)
        assert [s["name"] for s in doc["stacks"]] == ["web"]
        assert "stacks.bad.directory" in doc["daemon"]["config_error"]
        assert sandbox.systemctl("is-active", "stackd.service").stdout.strip() == "active"
        invalid = stackd_events(sandbox, "config.invalid")
        assert invalid
        assert "stacks.bad.directory" in invalid[-1]["MESSAGE"]

    def test_sighup_rereads_config(self, sandbox: Sandbox) -> None:
        path = stacks_config(sandbox, ["web"])
        start_stackd(sandbox)
        stacks_config(sandbox, ["web", "api"])
        assert path.exists()
        sandbox.systemctl("reload", "stackd.service")
        sandbox.wait_for(
            lambda: (
                [s["name"] for s in status_json(sandbox)["stacks"]] == ["api", "web"]
                or [s["name"] for s in status_json(sandbox)["stacks"]] == ["web", "api"]
            ),
            timeout=5,
            what="the new stack appears after SIGHUP",
        )


class TestStartupErrors:
    """Errors before the daemon runs are one line naming file, key and reason; exit 2."""

    def test_bad_config_at_startup(self, sandbox: Sandbox) -> None:
        path = write_config(sandbox, "[daemon]\nheal = 'fix'\n")
        result = stackd(sandbox, "daemon", timeout=20)
        assert result.returncode == 2
        line = result.stderr.strip()
        assert "\n" not in line
        assert str(path) in line
        assert "daemon.heal" in line

    def test_missing_explicit_config(self, sandbox: Sandbox) -> None:
        result = stackd(sandbox, "--config", "/nonexistent/stackd.toml", "render")
        assert result.returncode == 2
        assert "/nonexistent/stackd.toml" in result.stderr

    def test_second_daemon_refuses(self, sandbox: Sandbox) -> None:
        stacks_config(sandbox, ["web"])
        start_stackd(sandbox)
        result = stackd(sandbox, "daemon", timeout=20)
        assert result.returncode == 1
        assert "already owns io.stackd.Daemon1" in result.stderr


def test_status_json_is_parseable_for_unknown_stack(sandbox: Sandbox) -> None:
    stacks_config(sandbox, ["web"])
    start_stackd(sandbox)
    result = stackd(sandbox, "status", "nosuch")
    assert result.returncode != 0
    assert "no stack named nosuch" in result.stderr
    assert (
        json.loads(stackd(sandbox, "status", "--json", "web").stdout)["stacks"][0]["name"] == "web"
    )
