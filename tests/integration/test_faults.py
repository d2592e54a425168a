"""Faults the daemon must survive, against the real user manager, bus and journal.

User manager: re-exec, daemon-reload storms, stopped and started again. Daemon: kill -9 in
the middle of update runs, again and again. Resources: a read-only or full state dir.
Related faults tested elsewhere: a second `stackd daemon` refuses (test_daemon), a compose
command that hangs ends as `timeout` (test_update_runs::TestTimeout).
"""

from __future__ import annotations

import errno
import json
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from helpers import (
    FAKE_COMPOSE,
    STACKD_BIN,
    install_stackd_unit,
    make_stack_dir,
    stack_entry,
    stackd,
    stackd_events,
    status_json,
    unit_show,
    write_config,
)
from sandbox import Sandbox

RECONNECT_BOUND_S = 2.0
WATCHDOG_S = 3
REEXECS = 3


# -- helpers -------------------------------------------------------------------------------------


def faults_config(
    sandbox: Sandbox, names: list[str], *, updates: str = "", pull_delay: float = 0
) -> dict[str, Path]:
    lines = ["[daemon]", f'compose_command = ["{FAKE_COMPOSE}"]', 'startup_timeout = "20s"', ""]
    lines += ["[updates]", 'schedule = "2099-01-01"', "persistent = false", updates, ""]
    dirs = {}
    for name in names:
        dirs[name] = make_stack_dir(sandbox, name)
        if pull_delay:
            control = dirs[name] / "fake-control"
            control.mkdir(exist_ok=True)
            (control / "pull.delay").write_text(f"{pull_delay}\n")
        lines += [f"[stacks.{name}]", f'directory = "{dirs[name]}"', ""]
    write_config(sandbox, "\n".join(lines))
    return dirs


def try_status(sandbox: Sandbox) -> dict[str, Any] | None:
    """The status document, or None while the daemon is not (yet, again) on the bus."""
    result = stackd(sandbox, "status", "--json")
    if result.returncode == 3:
        return None
    assert result.returncode in (0, 1), result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def kinds(doc: dict[str, Any] | None, stack: str) -> set[tuple[str, str]]:
    if doc is None:
        return set()
    return {(f["kind"], f["source"]) for f in stack_entry(doc, stack)["findings"]}


def all_active(sandbox: Sandbox, names: list[str]) -> bool:
    doc = try_status(sandbox)
    return doc is not None and all(stack_entry(doc, n)["active_state"] == "active" for n in names)


def history_file(sandbox: Sandbox) -> Path:
    return sandbox.home / ".local" / "state" / "stackd" / "history.jsonl"


def history_records(path: Path) -> list[dict[str, Any]]:
    """Every record of history.jsonl; only the last line may be torn (not parse)."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            assert i == len(lines) - 1, f"line {i + 1} of {len(lines)} does not parse: {line!r}"
    return records


def check_history_complete(sandbox: Sandbox) -> list[dict[str, Any]]:
    """`stackd history --json` and the file agree: every run finished, one result per stack."""
    result = stackd(sandbox, "history", "--json", "--limit", "1000")
    assert result.returncode == 0, result.stderr
    runs: list[dict[str, Any]] = json.loads(result.stdout)["runs"]
    for run in runs:
        assert run["finished_at"] is not None, run
        assert sorted(r["stack"] for r in run["results"]) == sorted(run["stacks"]), run
    records = history_records(history_file(sandbox))
    started = [r["run"] for r in records if r["kind"] == "run.started"]
    finished = [r["run"] for r in records if r["kind"] == "run.finished"]
    assert len(started) == len(set(started)) == len(runs)
    assert sorted(finished) == sorted(started), "a run finished twice or never"
    per_stack = [(r["run"], r["stack"]) for r in records if r["kind"] == "stack.finished"]
    assert len(per_stack) == len(set(per_stack)), "a stack result was written twice"
    assert sorted(per_stack) == sorted((r["run"], s) for r in runs for s in r["stacks"])
    return runs


# -- the user manager ----------------------------------------------------------------------------


class TestManagerReexecAndReloadStorm:
    """stackd.service (WatchdogSec=3s) rides out re-execs and reload storms of its manager:
    the watchdog never fires, it never restarts, and it keeps following the manager."""

    def test_reexec_and_reload_storm(self, sandbox: Sandbox) -> None:
        faults_config(sandbox, ["web", "api"])
        install_stackd_unit(sandbox, watchdog=f"{WATCHDOG_S}s")
        sandbox.systemctl("start", "stackd.service", timeout=60)
        sandbox.wait_for(lambda: all_active(sandbox, ["web", "api"]), timeout=20, what="up")
        before = unit_show(sandbox, "stackd.service", "MainPID", "NRestarts")
        started = time.monotonic()

        for round_ in range(REEXECS):
            sandbox.systemctl("daemon-reexec", timeout=30)
            # A re-executed manager is a new one: the daemon follows it again each time.
            sandbox.wait_for_journal(
                SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="manager.connected", count=2 + round_
            )
        for _ in range(30):
            sandbox.systemctl("daemon-reload", timeout=30)
        # A collision made during a storm: found from the files, then in the loaded state.
        dropin = sandbox.etc_unit_dir / "web.service.d" / "zz-foreign.conf"
        dropin.parent.mkdir()
        dropin.write_text("[Service]\nEnvironment=FOREIGN=1\n")
        # More reloads, for at least two watchdog periods in all: a ping late by one fires it.
        reloads = 30
        while reloads < 50 or time.monotonic() - started < 2 * WATCHDOG_S:
            sandbox.systemctl("daemon-reload", timeout=30)
            reloads += 1
        sandbox.wait_for(
            lambda: (
                {("foreign-dropin", "disk"), ("foreign-dropin", "manager")}
                <= kinds(try_status(sandbox), "web")
            ),
            timeout=5,
            what="foreign drop-in seen on disk and in the loaded state",
        )
        # Still subscribed: a unit stopped and started after all that shows in status.
        sandbox.systemctl("stop", "api.service")
        sandbox.wait_for(
            lambda: stack_entry(status_json(sandbox), "api")["active_state"] == "inactive",
            timeout=2,
            what="api stop seen from signals",
        )
        sandbox.systemctl("start", "api.service")
        sandbox.wait_for(
            lambda: stack_entry(status_json(sandbox), "api")["active_state"] == "active",
            timeout=2,
            what="api start seen from signals",
        )
        elapsed = time.monotonic() - started
        after = unit_show(
            sandbox, "stackd.service", "MainPID", "NRestarts", "Result", "ActiveState"
        )
        assert after == {
            "MainPID": before["MainPID"],
            "NRestarts": "0",
            "Result": "success",
            "ActiveState": "active",
        }
        assert elapsed > 2 * WATCHDOG_S, f"the faults took {elapsed:.1f}s: too short to tell"
        doc = status_json(sandbox)
        assert doc["daemon"]["manager"] == "connected"
        assert not [f for f in doc["findings"] if f["kind"] == "manager-unavailable"]
        raised = [
            e for e in stackd_events(sandbox, "finding.raised")
            if e.get("STACKD_KIND") == "manager-unavailable"
        ]  # fmt: skip
        cleared = [
            e for e in stackd_events(sandbox, "finding.cleared")
            if e.get("STACKD_KIND") == "manager-unavailable"
        ]  # fmt: skip
        # Each re-exec is a new manager: unavailable for a moment, then followed again.
        assert len(raised) == len(cleared) == REEXECS, (raised, cleared)
        assert len(stackd_events(sandbox, "manager.connected")) == 1 + REEXECS
        assert len(stackd_events(sandbox, "daemon.started")) == 1


@contextmanager
def daemon_process(sandbox: Sandbox, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`stackd daemon --log console` as a plain process, outside the user manager."""
    out = log.open("w")
    proc = subprocess.Popen(
        [str(STACKD_BIN), "daemon", "--log", "console"], env=sandbox.env, stdout=out, stderr=out
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)
        out.close()


class TestManagerStopStart:
    """A daemon outside the manager: the manager (and with it the bus) goes away and comes
    back; the daemon is connected again within 2 s and misses nothing from meanwhile."""

    def test_reconnects_within_bound_and_catches_up(self, sandbox: Sandbox) -> None:
        faults_config(sandbox, ["web", "api"])
        log = sandbox.base / "daemon.log"
        with daemon_process(sandbox, log) as daemon:
            sandbox.wait_for(lambda: all_active(sandbox, ["web", "api"]), timeout=20, what="up")
            for round_ in range(2):
                sandbox.stop_manager()
                # Gone long enough for any backoff to grow past the bound.
                time.sleep(3)
                if round_ == 1:
                    dropin = sandbox.etc_unit_dir / "web.service.d" / "zz-foreign.conf"
                    dropin.parent.mkdir()
                    dropin.write_text("[Service]\nEnvironment=FOREIGN=1\n")
                # start_manager returns once the manager's name is owned on the new bus
                # (polled every 5 ms): the clock starts then.
                sandbox.start_manager()
                back = time.monotonic()
                sandbox.wait_for(
                    lambda: (
                        (doc := try_status(sandbox)) is not None
                        and doc["daemon"]["manager"] == "connected"
                    ),
                    timeout=10,
                    interval=0.01,
                    what="daemon reconnected",
                )
                took = time.monotonic() - back
                assert took < RECONNECT_BOUND_S, f"round {round_}: reconnected after {took:.2f}s"
            sandbox.wait_for(
                lambda: (
                    {("foreign-dropin", "disk"), ("foreign-dropin", "manager")}
                    <= kinds(try_status(sandbox), "web")
                ),
                timeout=5,
                what="foreign drop-in made while the manager was away",
            )
            # Re-subscribed: the new manager's units show from its signals.
            sandbox.wait_for(lambda: all_active(sandbox, ["web", "api"]), timeout=10, what="up")
            sandbox.systemctl("stop", "api.service")
            sandbox.wait_for(
                lambda: stack_entry(status_json(sandbox), "api")["active_state"] == "inactive",
                timeout=2,
                what="api stop seen",
            )
            sandbox.systemctl("start", "api.service")
            sandbox.wait_for(
                lambda: stack_entry(status_json(sandbox), "api")["active_state"] == "active",
                timeout=2,
                what="api start seen",
            )
            assert daemon.poll() is None
        output = log.read_text()
        assert daemon.returncode == 0, output
        # Raised when the bus went, cleared when the daemon followed the new manager.
        assert len(re.findall(r"finding\.raised +kind=manager-unavailable", output)) == 2
        assert len(re.findall(r"finding\.cleared +kind=manager-unavailable", output)) == 2
        assert output.count("daemon.started") == 1


# -- the daemon ----------------------------------------------------------------------------------


def main_pid(sandbox: Sandbox) -> str:
    return unit_show(sandbox, "stackd.service", "MainPID")["MainPID"]


def kill_daemon(sandbox: Sandbox) -> str:
    """SIGKILL stackd.service; the PID it had."""
    old = main_pid(sandbox)
    sandbox.systemctl("kill", "-s", "KILL", "stackd.service")
    return old


def wait_restarted(sandbox: Sandbox, old_pid: str, restarts: int) -> None:
    """Restart=on-failure (RestartSec=2s in the contrib unit) brings it back."""
    sandbox.wait_for(
        lambda: (
            unit_show(sandbox, "stackd.service", "ActiveState", "NRestarts")
            == {"ActiveState": "active", "NRestarts": str(restarts)}
        ),
        timeout=20,
        interval=0.05,
        what=f"stackd.service restarted ({restarts})",
    )
    assert main_pid(sandbox) != old_pid


def start_run(sandbox: Sandbox) -> str:
    """`stackd update --no-wait`; the run id. Until the daemon is back (exit 3) and while
    a restarted daemon completes what its predecessor left, it refuses: try again."""

    def started() -> str | None:
        result = stackd(sandbox, "update", "--no-wait")
        if result.returncode == 0:
            return result.stdout.split()[2]
        assert result.returncode == 3 or "still" in result.stderr, result.stderr
        return None

    return sandbox.wait_for(started, timeout=30, interval=0.02, what="a run started")


def wait_runs_finished(sandbox: Sandbox, run_ids: list[str]) -> None:
    def done() -> bool:
        result = stackd(sandbox, "history", "--json", "--limit", "1000")
        if result.returncode != 0:
            return False
        runs = {r["run"]: r for r in json.loads(result.stdout)["runs"]}
        return all(runs.get(r, {}).get("finished_at") for r in run_ids)

    sandbox.wait_for(done, timeout=40, interval=0.1, what=f"runs {run_ids} finished")


def kill_rounds(sandbox: Sandbox, rounds: int, *, first: int = 0) -> tuple[list[str], list[str]]:
    """Kill the daemon at a different point of a run each round: right after it was
    recorded, while update units run. Every other round kills the restarted daemon again
    while it recovers; every third asks for a new run as soon as the restarted daemon
    answers, while it is still completing the old one. Returns (all runs, killed runs)."""
    delays = [0.0, 0.5, 1.0, 1.5, 0.2]
    run_ids: list[str] = []
    killed: list[str] = []
    restarts = int(unit_show(sandbox, "stackd.service", "NRestarts")["NRestarts"])
    for i in range(first, first + rounds):
        run_ids.append(start_run(sandbox))
        killed.append(run_ids[-1])
        time.sleep(delays[i % len(delays)])  # where in the run the kill lands
        old = kill_daemon(sandbox)
        restarts += 1
        if i % 3 == 2:
            run_ids.append(start_run(sandbox))
        wait_restarted(sandbox, old, restarts)
        if i % 2 == 1:
            old = kill_daemon(sandbox)
            restarts += 1
            wait_restarted(sandbox, old, restarts)
        wait_runs_finished(sandbox, run_ids)
    return run_ids, killed


class TestKillDuringUpdates:
    """kill -9 of stackd.service in the middle of update runs, round after round: the history
    stays readable and complete, every run ends once, every stack has exactly one result."""

    def test_kill_9_rounds(self, sandbox: Sandbox) -> None:
        faults_config(sandbox, ["a", "b", "c"], updates="concurrency = 2", pull_delay=1.0)
        install_stackd_unit(sandbox)
        sandbox.systemctl("start", "stackd.service", timeout=60)
        run_ids, killed = kill_rounds(sandbox, 5)

        runs = check_history_complete(sandbox)
        assert sorted(r["run"] for r in runs) == sorted(run_ids)
        assert set(killed) <= {r["run"] for r in runs if r["recovered"]}
        results = [res["result"] for r in runs for res in r["results"]]
        assert set(results) <= {"success", "skipped"}, results
        assert "success" in results
        finished = stackd_events(sandbox, "update.finished")
        assert sorted(e["STACKD_RUN"] for e in finished) == sorted(run_ids)


# -- resources -----------------------------------------------------------------------------------


def state_dir(sandbox: Sandbox) -> Path:
    return sandbox.home / ".local" / "state" / "stackd"


def remount(sandbox: Sandbox, path: Path, options: str) -> None:
    """Change the options of the test's own tmpfs at `path` (never anything else)."""
    assert sandbox.home in path.parents, path
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    assert any(line.split()[4] == str(path) and " - tmpfs " in line for line in mounts)
    sandbox.run("mount", "-o", f"remount,{options}", str(path))


def fill(path: Path) -> Path:
    """Write a file into `path` until its filesystem is full."""
    filler = path / "filler"
    with filler.open("wb", buffering=0) as out:
        assert _write_until_error(out) == errno.ENOSPC
    return filler


def _write_until_error(out: BinaryIO) -> int | None:
    try:
        while out.write(b"\0" * 4096):
            pass
    except OSError as exc:
        return exc.errno
    return None


def update_while_refused(sandbox: Sandbox) -> str:
    """An update run while the state dir refuses writes: it runs, reports, keeps serving."""
    result = stackd(sandbox, "update", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].endswith(": 2 stacks, 2 succeeded"), lines
    run_id = lines[0].split()[2].rstrip(":")
    doc = status_json(sandbox)
    assert str(state_dir(sandbox) / "history.jsonl") in doc["daemon"]["state_error"]
    assert doc["updates"]["last_run"]["run"] == run_id
    assert stack_entry(doc, "web")["last_update"]["run"] == run_id
    # The history answers with the run although it is only in the daemon's memory.
    history = json.loads(stackd(sandbox, "history", "--json").stdout)["runs"]
    assert history[0]["run"] == run_id
    assert history[0]["finished_at"] is not None
    assert run_id not in history_file(sandbox).read_text()
    return run_id


def caught_up(sandbox: Sandbox, run_id: str) -> None:
    """Once the state dir takes writes again, the kept records reach history.jsonl."""
    sandbox.wait_for(
        lambda: f'"kind":"run.finished","run":"{run_id}"' in history_file(sandbox).read_text(),
        timeout=10,
        interval=0.1,
        what=f"run {run_id} written to history.jsonl",
    )
    sandbox.wait_for(
        lambda: status_json(sandbox)["daemon"]["state_error"] is None,
        timeout=5,
        what="state_error cleared",
    )


class TestStateDirRefusesWrites:
    """A full, then a read-only state dir (a 64 KiB tmpfs of the test's own over it): the
    daemon reports it, keeps serving and running updates, and writes what it kept once
    it can."""

    def test_full_then_read_only(self, sandbox: Sandbox) -> None:
        faults_config(sandbox, ["web", "api"])
        directory = state_dir(sandbox)
        directory.mkdir(parents=True, mode=0o700, exist_ok=True)
        with sandbox.host.private_tmpfs(directory):
            remount(sandbox, directory, "size=64k")
            install_stackd_unit(sandbox)
            sandbox.systemctl("start", "stackd.service", timeout=60)
            sandbox.wait_for(lambda: all_active(sandbox, ["web", "api"]), timeout=20, what="up")

            filler = fill(directory)
            full_run = update_while_refused(sandbox)
            failed = sandbox.wait_for_journal(
                SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="state.write_failed", PRIORITY="3"
            )
            assert "No space left on device" in failed[0]["MESSAGE"]
            filler.unlink()
            caught_up(sandbox, full_run)

            remount(sandbox, directory, "ro")
            try:
                ro_run = update_while_refused(sandbox)
            finally:
                remount(sandbox, directory, "rw")
            caught_up(sandbox, ro_run)

            messages = [e["MESSAGE"] for e in stackd_events(sandbox, "state.write_failed")]
            assert any("Read-only file system" in m for m in messages), messages
            assert sum("writable again" in m for m in messages) == 2, messages
            runs = check_history_complete(sandbox)
            assert [r["run"] for r in runs] == [ro_run, full_run]
            assert unit_show(sandbox, "stackd.service", "NRestarts")["NRestarts"] == "0"
