"""Update runs end to end: the real stackd.service, real `-update.service` units, the fake
compose provider, the real journal. Each test states one behaviour of `stackd update`."""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from helpers import (
    FAKE_COMPOSE,
    REPO,
    STACKD_BIN,
    make_stack_dir,
    stack_entry,
    stackd,
    stackd_events,
    start_stackd,
    status_json,
    unit_show,
    write_config,
)
from sandbox import Sandbox

CONTRIB_UPDATE_UNIT = REPO / "contrib" / "systemd" / "stackd-update.service"


# -- scenario helpers ----------------------------------------------------------------------------


def updates_config(
    sandbox: Sandbox,
    stacks: list[str],
    *,
    updates: str = "",
    no_update: tuple[str, ...] = (),
) -> dict[str, Path]:
    """A config with the fake compose provider; returns each stack's directory."""
    lines = ["[daemon]", f'compose_command = ["{FAKE_COMPOSE}"]', 'startup_timeout = "20s"', ""]
    lines += ["[updates]", updates, ""]
    dirs = {}
    for name in stacks:
        dirs[name] = make_stack_dir(sandbox, name)
        lines += [f"[stacks.{name}]", f'directory = "{dirs[name]}"']
        if name in no_update:
            lines.append("update = false")
        lines.append("")
    write_config(sandbox, "\n".join(lines))
    return dirs


def control(directory: Path, verb: str, *, exit_code: int | None = None, delay: float = 0) -> None:
    """Tell the fake compose how `verb` behaves in this stack's directory."""
    folder = directory / "fake-control"
    folder.mkdir(exist_ok=True)
    if exit_code is not None:
        (folder / f"{verb}.exit").write_text(f"{exit_code}\n")
    if delay:
        (folder / f"{verb}.delay").write_text(f"{delay}\n")


@dataclass(frozen=True)
class Call:
    """One finished call of the fake compose, with its own timestamps."""

    verb: str
    start: float
    end: float
    code: int


def compose_calls(directory: Path, verb: str | None = None) -> list[Call]:
    log = directory / "fake-compose.log"
    if not log.exists():
        return []
    calls = []
    for line in log.read_text().splitlines():
        fields = line.split(" ", 4)
        call = Call(fields[0], float(fields[1]), float(fields[2]), int(fields[3]))
        if verb is None or call.verb == verb:
            calls.append(call)
    return calls


def history(sandbox: Sandbox, limit: int = 10) -> list[dict[str, Any]]:
    result = stackd(sandbox, "history", "--json", "--limit", str(limit))
    assert result.returncode == 0, result.stderr
    runs: list[dict[str, Any]] = json.loads(result.stdout)["runs"]
    return runs


def run_by_id(sandbox: Sandbox, run_id: str) -> dict[str, Any] | None:
    return next((r for r in history(sandbox) if r["run"] == run_id), None)


def wait_finished(sandbox: Sandbox, run_id: str, timeout: float = 30) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        run = run_by_id(sandbox, run_id)
        return run if run is not None and run["finished_at"] is not None else None

    return sandbox.wait_for(finished, timeout=timeout, interval=0.1, what=f"run {run_id} ends")


def waiting_client(sandbox: Sandbox, *args: str) -> tuple[subprocess.Popen[str], str]:
    """`stackd update ARGS` in the background; returns it and the run id it announced."""
    proc = subprocess.Popen(
        [str(STACKD_BIN), "update", *args],
        env=sandbox.env,
        cwd=sandbox.home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("update run "), first + proc.stderr.read()  # type: ignore[union-attr]
    return proc, first.split()[2].rstrip(":")


def results_by_stack(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by_stack: dict[str, dict[str, Any]] = {}
    for result in run["results"]:
        assert result["stack"] not in by_stack, f"two results for {result['stack']}"
        by_stack[result["stack"]] = result
    return by_stack


def unit_active(sandbox: Sandbox, unit: str) -> bool:
    state = sandbox.systemctl("is-active", unit, check=False).stdout.strip()
    return state in ("active", "activating")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """How many of the intervals are open at once, at most."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = now = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        now += step
        peak = max(peak, now)
    return peak


# -- the tests -----------------------------------------------------------------------------------


class TestFailingStack:
    """One stack whose `compose pull` exits 125: the run carries on and reports it once."""

    def test_run_reports_the_failing_stack_and_completes_the_others(self, sandbox: Sandbox) -> None:
        dirs = updates_config(sandbox, ["alpha", "broken", "gamma"])
        control(dirs["broken"], "pull", exit_code=125)
        start_stackd(sandbox)

        result = stackd(sandbox, "update", timeout=90)

        assert result.returncode == 1, result.stdout + result.stderr
        summary = result.stdout.strip().splitlines()[-1]
        assert "3 stacks, 2 succeeded, 1 failed" in summary
        assert "broken: `compose pull` exited 125" in summary
        for name in ("alpha", "gamma"):
            assert [c.verb for c in compose_calls(dirs[name])][-2:] == ["pull", "up"]
        # The failing stack never reached `up` after its pull.
        assert [c.verb for c in compose_calls(dirs["broken"])][-1] == "pull"

        runs = history(sandbox)
        assert len(runs) == 1
        run = runs[0]
        assert run["result"] == "partial"
        assert run["trigger"] == "manual"
        assert run["recovered"] is False
        assert sorted(run["succeeded"]) == ["alpha", "gamma"]
        assert run["failed"] == ["broken"]
        per_stack = results_by_stack(run)
        assert sorted(per_stack) == ["alpha", "broken", "gamma"]
        assert per_stack["broken"]["result"] == "failed"
        assert per_stack["broken"]["error"] == "`compose pull` exited 125"
        assert per_stack["broken"]["failed_command"] == "compose pull"
        assert per_stack["broken"]["exit_status"] == 125
        assert per_stack["alpha"]["result"] == "success"
        assert per_stack["alpha"]["error"] is None

        finished = sandbox.wait_for_journal(
            SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="update.finished"
        )
        assert len(finished) == 1
        assert finished[0]["PRIORITY"] == "3"
        assert finished[0]["STACKD_RUN"] == run["run"]
        assert "broken: `compose pull` exited 125" in finished[0]["MESSAGE"]
        assert finished[0]["STACKD_FAILED"] == "broken"
        per_stack_events = stackd_events(sandbox, "update.stack.finished")
        assert sorted(e["STACKD_STACK"] for e in per_stack_events) == ["alpha", "broken", "gamma"]
        assert {e["STACKD_RUN"] for e in per_stack_events} == {run["run"]}
        assert len(stackd_events(sandbox, "update.started")) == 1

        doc = status_json(sandbox)
        last_run = doc["updates"]["last_run"]
        assert last_run["run"] == run["run"]
        assert last_run["result"] == "partial"
        assert sorted(last_run["succeeded"]) == ["alpha", "gamma"]
        assert last_run["failed"] == ["broken"]
        assert last_run["started_at"] <= last_run["finished_at"]
        for name, expected in (("alpha", "success"), ("broken", "failed"), ("gamma", "success")):
            last = stack_entry(doc, name)["last_update"]
            assert last["run"] == run["run"]
            assert last["result"] == expected
            assert last["started_at"] <= last["finished_at"]
        assert stack_entry(doc, "broken")["last_update"]["error"] == "`compose pull` exited 125"

    def test_waiting_client_streams_one_line_per_stack(self, sandbox: Sandbox) -> None:
        dirs = updates_config(sandbox, ["one", "two", "three"])
        control(dirs["two"], "pull", exit_code=125)
        start_stackd(sandbox)

        result = stackd(sandbox, "update", timeout=90)

        lines = result.stdout.strip().splitlines()
        assert lines[0].startswith("update run ")
        assert "3 stacks" in lines[0]
        progress = lines[1:-1]
        assert len(progress) == 3, lines
        assert sorted(line.split()[0] for line in progress) == ["one", "three", "two"]
        two = next(line for line in progress if line.split()[0] == "two")
        assert "failed: `compose pull` exited 125" in two
        assert lines[-1].startswith("update run ")
        assert "2 succeeded, 1 failed" in lines[-1]


class TestTimeout:
    """A stack whose update outlives `updates.timeout` ends as `timeout`; others are untouched."""

    def test_slow_pull_times_out_and_is_reported(self, sandbox: Sandbox) -> None:
        dirs = updates_config(sandbox, ["slow", "quick"], updates='timeout = "2s"')
        control(dirs["slow"], "pull", delay=10)
        start_stackd(sandbox)

        result = stackd(sandbox, "update", "--json", timeout=90)

        assert result.returncode == 1, result.stderr
        summary = json.loads(result.stdout)
        per_stack = results_by_stack(summary)
        assert per_stack["slow"]["result"] == "timeout"
        assert per_stack["slow"]["error"] == "`compose pull` timed out after 2s"
        assert per_stack["quick"]["result"] == "success"
        assert summary["failed"] == ["slow"]
        assert summary["succeeded"] == ["quick"]
        started = datetime.fromisoformat(per_stack["slow"]["started_at"])
        ended = datetime.fromisoformat(per_stack["slow"]["finished_at"])
        assert timedelta(seconds=1.5) < ended - started < timedelta(seconds=9)
        # The killed pull never logged an end; `up` never ran after it.
        assert [c.verb for c in compose_calls(dirs["slow"])] == ["up"]
        assert [c.verb for c in compose_calls(dirs["quick"])] == ["up", "pull", "up"]
        assert "slow: `compose pull` timed out after 2s" in summary["summary"]
        slow_state = unit_show(sandbox, "slow-update.service", "ActiveState", "Result")
        assert slow_state == {"ActiveState": "failed", "Result": "timeout"}


class TestConcurrency:
    """`updates.concurrency` bounds how many update units run at once."""

    def test_six_stacks_two_at_a_time(self, sandbox: Sandbox) -> None:
        names = [f"s{i}" for i in range(6)]
        dirs = updates_config(sandbox, names, updates="concurrency = 2")
        for directory in dirs.values():
            control(directory, "pull", delay=0.5)
        start_stackd(sandbox)

        result = stackd(sandbox, "update", timeout=90)

        assert result.returncode == 0, result.stdout + result.stderr
        spans = []
        for name, directory in dirs.items():
            calls = compose_calls(directory)
            pulls = [i for i, c in enumerate(calls) if c.verb == "pull"]
            assert len(pulls) == 1, f"{name}: {calls}"
            pull = calls[pulls[0]]
            up_after = calls[pulls[0] + 1]
            assert up_after.verb == "up"
            assert pull.end - pull.start >= 0.5
            spans.append((pull.start, up_after.end))
        assert max_overlap(spans) == 2
        runs = history(sandbox)
        assert sorted(runs[0]["succeeded"]) == names


class TestSelection:
    """`update = false` keeps a stack out of runs over all stacks, not out of a named run."""

    def test_update_false_is_excluded_from_all_but_updated_by_name(self, sandbox: Sandbox) -> None:
        dirs = updates_config(sandbox, ["auto", "pinned"], no_update=("pinned",))
        start_stackd(sandbox)

        everything = stackd(sandbox, "update", "--json", timeout=60)
        assert everything.returncode == 0, everything.stderr
        assert json.loads(everything.stdout)["stacks"] == ["auto"]
        assert compose_calls(dirs["pinned"], "pull") == []

        by_hand = stackd(sandbox, "update", "--json", "pinned", timeout=60)
        assert by_hand.returncode == 0, by_hand.stderr
        run = json.loads(by_hand.stdout)
        assert run["stacks"] == ["pinned"]
        assert run["succeeded"] == ["pinned"]
        assert len(compose_calls(dirs["pinned"], "pull")) == 1
        assert len(compose_calls(dirs["auto"], "pull")) == 1

    def test_unknown_stack_is_a_usage_error(self, sandbox: Sandbox) -> None:
        updates_config(sandbox, ["web"])
        start_stackd(sandbox)
        result = stackd(sandbox, "update", "nosuch")
        assert result.returncode == 2
        assert "no stack named nosuch" in result.stderr
        assert history(sandbox) == []


class TestNoWaitAndBusy:
    """`--no-wait` returns the run id at once; a second run while one runs is refused."""

    def test_no_wait_returns_at_once_and_second_run_is_refused(self, sandbox: Sandbox) -> None:
        dirs = updates_config(sandbox, ["web"])
        control(dirs["web"], "pull", delay=6)
        start_stackd(sandbox)

        result = stackd(sandbox, "update", "--no-wait", timeout=5)
        assert result.returncode == 0, result.stderr
        words = result.stdout.split()
        assert words[:2] == ["update", "run"]
        assert words[3] == "started"
        run_id = words[2]
        assert run_by_id(sandbox, run_id)["finished_at"] is None  # type: ignore[index]
        sandbox.wait_for(
            lambda: unit_active(sandbox, "web-update.service"), what="web-update.service runs"
        )

        second = stackd(sandbox, "update", timeout=10)
        assert second.returncode == 1
        assert f"update run {run_id} is still in progress" in second.stderr
        assert status_json(sandbox)["updates"]["running"] == run_id

        run = wait_finished(sandbox, run_id)
        assert run["succeeded"] == ["web"]
        assert len(history(sandbox)) == 1


class TestRecovery:
    """A daemon killed mid-run completes the run from systemd's units when it is back."""

    def test_killed_daemon_completes_the_run_after_restart(self, sandbox: Sandbox) -> None:
        dirs = updates_config(sandbox, ["first", "middle", "last"], updates="concurrency = 1")
        control(dirs["middle"], "pull", delay=4)
        start_stackd(sandbox)
        old_pid = unit_show(sandbox, "stackd.service", "MainPID")["MainPID"]

        client, run_id = waiting_client(sandbox)
        sandbox.wait_for(
            lambda: unit_active(sandbox, "middle-update.service"),
            timeout=20,
            what="middle-update.service runs",
        )
        sandbox.systemctl("kill", "-s", "KILL", "stackd.service")
        # Restart=on-failure brings it back; it waits for middle-update.service to end.
        sandbox.wait_for(
            lambda: (
                unit_show(sandbox, "stackd.service", "ActiveState", "NRestarts")
                == {"ActiveState": "active", "NRestarts": "1"}
            ),
            timeout=20,
            what="stackd.service restarted and ready",
        )
        assert unit_show(sandbox, "stackd.service", "MainPID")["MainPID"] != old_pid
        run = wait_finished(sandbox, run_id, timeout=40)
        # The client that was waiting saw the restarted daemon finish the run.
        out, err = client.communicate(timeout=30)
        assert client.returncode == 0, out + err
        assert out.splitlines()[-1] == run["summary"]
        assert sorted(line.split()[0] for line in out.splitlines()[:-1]) == [
            "first",
            "last",
            "middle",
        ]

        assert run["recovered"] is True
        per_stack = results_by_stack(run)
        assert sorted(per_stack) == ["first", "last", "middle"]
        assert per_stack["first"]["result"] == "success"
        # The unit that was running when the daemon died, collected from systemd after it ended.
        assert per_stack["middle"]["result"] == "success", per_stack["middle"]["error"]
        assert per_stack["last"]["result"] == "skipped"
        assert "stopped before it started" in per_stack["last"]["error"]
        assert len(compose_calls(dirs["middle"], "pull")) == 1

        finished = sandbox.wait_for_journal(
            SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="update.finished"
        )
        assert len(finished) == 1
        assert finished[0]["STACKD_RUN"] == run_id
        assert finished[0]["STACKD_RECOVERED"] == "true"
        stack_events = stackd_events(sandbox, "update.stack.finished")
        assert sorted(e["STACKD_STACK"] for e in stack_events) == ["first", "last", "middle"]

        history_file = sandbox.home / ".local" / "state" / "stackd" / "history.jsonl"
        records = [json.loads(line) for line in history_file.read_text().splitlines()]
        run_finished = [r for r in records if r["kind"] == "run.finished"]
        assert len(run_finished) == 1
        assert run_finished[0]["recovered"] is True


class TestCatchUp:
    """`persistent = true`: a scheduled run missed while stackd was down runs once at start."""

    def test_missed_schedule_is_caught_up_exactly_once(self, sandbox: Sandbox) -> None:
        dirs = updates_config(
            sandbox,
            ["web", "pinned"],
            updates='schedule = "daily"\npersistent = true',
            no_update=("pinned",),
        )
        three_days_ago = datetime.now(UTC) - timedelta(days=3)
        stamp = three_days_ago.isoformat().replace("+00:00", "Z")
        state = sandbox.home / ".local" / "state" / "stackd"
        state.mkdir(parents=True, exist_ok=True)
        old = "2000-01-01T00:00:00Z-old1"
        records = [
            {"kind": "run.started", "run": old, "trigger": "schedule", "stacks": [],
             "started_at": stamp},
            {"kind": "run.finished", "run": old, "finished_at": stamp, "recovered": False},
        ]  # fmt: skip
        (state / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

        start_stackd(sandbox)

        def catch_up_done() -> dict[str, Any] | None:
            run = history(sandbox)[0]
            return run if run["trigger"] == "catch-up" and run["finished_at"] else None

        run = sandbox.wait_for(catch_up_done, timeout=30, what="a catch-up run finishes")
        assert run["stacks"] == ["web"]
        assert run["succeeded"] == ["web"]
        assert compose_calls(dirs["pinned"], "pull") == []
        assert status_json(sandbox)["updates"]["next_run"] is not None

        sandbox.systemctl("restart", "stackd.service", timeout=60)
        sandbox.wait_for(
            lambda: status_json(sandbox)["updates"]["next_run"] is not None,
            what="the restarted daemon has planned its next run",
        )
        triggers = [r["trigger"] for r in history(sandbox)]
        assert triggers == ["catch-up", "schedule"]
        assert len(stackd_events(sandbox, "update.started")) == 1


class TestUpdateUnit:
    """contrib/systemd/stackd-update.service fails exactly when a stack failed."""

    @staticmethod
    def install(sandbox: Sandbox) -> None:
        text = CONTRIB_UPDATE_UNIT.read_text()
        wanted = "ExecStart=%h/.local/bin/stackd update"
        assert wanted in text
        text = text.replace(wanted, f"ExecStart={shlex.quote(str(STACKD_BIN))} update")
        (sandbox.user_unit_dir / "stackd-update.service").write_text(text)
        sandbox.daemon_reload()

    @staticmethod
    def result(sandbox: Sandbox) -> str:
        return sandbox.systemctl(
            "show", "-p", "Result", "--value", "stackd-update.service"
        ).stdout.strip()

    def test_success_then_failure(self, sandbox: Sandbox) -> None:
        dirs = updates_config(sandbox, ["web", "db"])
        start_stackd(sandbox)
        self.install(sandbox)

        sandbox.systemctl("start", "stackd-update.service", timeout=90)
        assert self.result(sandbox) == "success"
        assert history(sandbox)[0]["result"] == "success"

        control(dirs["db"], "pull", exit_code=125)
        failed = sandbox.systemctl("start", "stackd-update.service", check=False, timeout=90)
        assert failed.returncode != 0
        assert self.result(sandbox) == "exit-code"
        status = sandbox.systemctl(
            "show", "-p", "ExecMainStatus", "--value", "stackd-update.service"
        ).stdout.strip()
        assert status == "1"
        runs = history(sandbox)
        assert len(runs) == 2
        assert runs[0]["failed"] == ["db"]
        logged = sandbox.messages("_SYSTEMD_USER_UNIT=stackd-update.service")
        assert any("db: `compose pull` exited 125" in line for line in logged)
