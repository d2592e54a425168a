"""A run whose update unit ended while no daemon was running is completed from the unit.

systemd unloads an inactive oneshot nothing refers to, and with it the result of an update
that succeeded; stackd's update units keep it (`RemainAfterExit=yes`: `active (exited)`)
until a daemon has recorded it and stops the unit. A failed unit stays `failed`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import make_stack_dir, stackd, stacks_config, start_stackd, unit_show
from sandbox import Sandbox

from stackd.adapters.store import HistoryStore
from stackd.core.updates import UpdateRun


def _state_dir(sandbox: Sandbox) -> Path:
    return Path(sandbox.env["XDG_STATE_HOME"]) / "stackd"


def _interrupted_run(sandbox: Sandbox, stacks: list[str]) -> str:
    """A run a killed daemon left behind: started, no results, no end."""
    run = UpdateRun(
        run="2026-11-26T03:00:00Z-test",
        stacks=tuple(stacks),
        started_at=datetime.now(UTC) - timedelta(seconds=2),
        finished_at=None,
        trigger="manual",
    )
    HistoryStore.in_dir(_state_dir(sandbox)).append_run_started(run)
    return run.run


@pytest.mark.parametrize(
    ("pull_exit", "result", "left"),
    [(0, "success", ("active", "exited")), (125, "failed", ("failed", "failed"))],
)
def test_result_left_while_daemon_was_down_is_recovered(
    sandbox: Sandbox, pull_exit: int, result: str, left: tuple[str, str]
) -> None:
    stacks_config(sandbox, ["web"])
    start_stackd(sandbox)
    sandbox.systemctl("stop", "stackd.service", timeout=60)
    run_id = _interrupted_run(sandbox, ["web"])
    control = make_stack_dir(sandbox, "web") / "fake-control"
    control.mkdir(exist_ok=True)
    (control / "pull.exit").write_text(str(pull_exit))

    sandbox.systemctl("start", "web-update.service", check=False, timeout=60)
    # Nothing refers to the unit now, yet its result is still there for the next daemon.
    sandbox.daemon_reload()
    shown = unit_show(sandbox, "web-update.service", "ActiveState", "SubState", "Result")
    assert (shown["ActiveState"], shown["SubState"]) == left
    assert shown["Result"] == ("success" if pull_exit == 0 else "exit-code")

    start_stackd(sandbox)
    doc = sandbox.wait_for(
        lambda: next(
            (
                r
                for r in json.loads(stackd(sandbox, "history", "--json").stdout)["runs"]
                if r["run"] == run_id and r["finished_at"]
            ),
            None,
        ),
        timeout=20,
        what="the interrupted run completed by recovery",
    )
    assert doc["recovered"] is True
    (stack_result,) = doc["results"]
    assert stack_result["stack"] == "web"
    assert stack_result["result"] == result
    if result == "failed":
        assert "exit-code (exited 125)" in stack_result["error"], stack_result["error"]
        assert unit_show(sandbox, "web-update.service", "ActiveState")["ActiveState"] == "failed"
    else:
        assert stack_result["error"] is None
        # Recorded, then released: inactive again, ready for the next run.
        sandbox.wait_for(
            lambda: (
                unit_show(sandbox, "web-update.service", "ActiveState")["ActiveState"] == "inactive"
            ),
            timeout=10,
            what="web-update.service released after recovery",
        )


def test_a_unit_kept_from_an_earlier_success_runs_again(sandbox: Sandbox) -> None:
    """An update unit left `active (exited)` (started by hand, or its daemon was killed
    before releasing it) is stopped and started again by the next run, not skipped."""
    stacks_config(sandbox, ["web"])
    start_stackd(sandbox)
    sandbox.systemctl("start", "web-update.service", timeout=60)
    assert unit_show(sandbox, "web-update.service", "SubState")["SubState"] == "exited"
    log = make_stack_dir(sandbox, "web") / "fake-compose.log"
    pulls_before = log.read_text().count("pull ")

    result = stackd(sandbox, "update", "--json", "web", timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    summary = json.loads(result.stdout)
    assert summary["succeeded"] == ["web"], summary
    assert log.read_text().count("pull ") == pulls_before + 1
    assert unit_show(sandbox, "web-update.service", "ActiveState")["ActiveState"] == "inactive"
