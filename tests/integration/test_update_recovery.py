"""A run whose update unit ended while no daemon was running is completed from its marker.

systemd forgets a oneshot that ended in success once nothing holds it, so a daemon that was
down when it ended could not tell "succeeded" from "never started"; the update unit writes
its result (ExecStopPost) into the state directory, and recovery reads it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import make_stack_dir, stackd, stacks_config, start_stackd
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
    ("pull_exit", "result", "marker"),
    [(0, "success", "success exited 0"), (125, "failed", "exit-code exited 125")],
)
def test_result_left_while_daemon_was_down_is_recovered(
    sandbox: Sandbox, pull_exit: int, result: str, marker: str
) -> None:
    stacks_config(sandbox, ["web"])
    start_stackd(sandbox)
    sandbox.systemctl("stop", "stackd.service", timeout=60)
    run_id = _interrupted_run(sandbox, ["web"])
    control = make_stack_dir(sandbox, "web") / "fake-control"
    control.mkdir(exist_ok=True)
    (control / "pull.exit").write_text(str(pull_exit))

    sandbox.systemctl("start", "web-update.service", check=False, timeout=60)
    marker_file = _state_dir(sandbox) / "results" / "web-update.service"
    assert marker_file.read_text().split() == marker.split()

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
        assert "exit-code" in stack_result["error"]
