"""The history file and state files: durable appends, tolerant reads, private permissions."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stackd.adapters import store
from stackd.adapters.store import (
    HistoryStore,
    StateFile,
    StoreError,
    ensure_private_dir,
    state_dir,
)
from stackd.core.updates import ServiceChange, StackUpdateResult, UpdateRun

T0 = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


def started(run: str, *stacks: str, minutes: int = 0, trigger: str = "schedule") -> UpdateRun:
    return UpdateRun(run, stacks, T0 + timedelta(minutes=minutes), None, trigger)  # type: ignore[arg-type]


def stack_done(run: str, stack: str, outcome: str = "success") -> StackUpdateResult:
    return StackUpdateResult(
        run=run,
        stack=stack,
        unit=f"{stack}-update.service",
        result=outcome,  # type: ignore[arg-type]
        started_at=T0,
        finished_at=T0 + timedelta(seconds=30),
        error=None if outcome == "success" else "`compose pull` exited 125",
        failed_command=None if outcome == "success" else "compose pull",
        exit_status=None if outcome == "success" else 125,
        changes=(ServiceChange("app", "updated", "sha256:a", "sha256:b", "img:1"),),
    )


def finished(run: UpdateRun, *results: StackUpdateResult) -> UpdateRun:
    return UpdateRun(
        run.run,
        run.stacks,
        run.started_at,
        run.started_at + timedelta(minutes=1),
        run.trigger,
        results,
    )


def write_run(history: HistoryStore, run: UpdateRun, *results: StackUpdateResult) -> UpdateRun:
    history.append_run_started(run)
    for result in results:
        history.append_stack_finished(result)
    done = finished(run, *results)
    history.append_run_finished(done)
    return done


@pytest.fixture
def history(tmp_path: Path) -> HistoryStore:
    return HistoryStore.in_dir(tmp_path / "state" / "stackd")


def lines(history: HistoryStore) -> list[str]:
    return history.path.read_text().splitlines()


class TestStateDir:
    """$XDG_STATE_HOME/stackd, else ~/.local/state/stackd; a relative XDG value is ignored."""

    @pytest.mark.parametrize(
        ("env", "expected"),
        [
            ({"XDG_STATE_HOME": "/x/state", "HOME": "/h"}, "/x/state/stackd"),
            ({"HOME": "/h"}, "/h/.local/state/stackd"),
            ({"XDG_STATE_HOME": "", "HOME": "/h"}, "/h/.local/state/stackd"),
            ({"XDG_STATE_HOME": "rel/state", "HOME": "/h"}, "/h/.local/state/stackd"),
        ],
    )
    def test_table(self, env: dict[str, str], expected: str) -> None:
        assert state_dir(env) == Path(expected)


class TestPermissions:
    """The state dir is 0700 and every file stackd writes is 0600, whatever the umask."""

    def test_created_private(self, history: HistoryStore) -> None:
        old = os.umask(0)
        try:
            write_run(history, started("r1", "a"), stack_done("r1", "a"))
            state = StateFile(history.path.parent / "schedule.json")
            state.write({"last": 1})
        finally:
            os.umask(old)
        assert stat.S_IMODE(history.path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(history.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.path.stat().st_mode) == 0o600

    def test_tightened(self, tmp_path: Path) -> None:
        directory = tmp_path / "stackd"
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
        (directory / store.HISTORY_FILE).touch()
        (directory / store.HISTORY_FILE).chmod(0o644)
        HistoryStore.in_dir(directory).append_run_started(started("r1"))
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE((directory / store.HISTORY_FILE).stat().st_mode) == 0o600

    def test_dir_is_not_a_directory(self, tmp_path: Path) -> None:
        (tmp_path / "file").touch()
        with pytest.raises(StoreError, match="cannot create the state directory") as info:
            ensure_private_dir(tmp_path / "file" / "stackd")
        assert info.value.path == tmp_path / "file" / "stackd"


class TestHistory:
    """Records are rebuilt into runs, newest first, with per-stack results and the end."""

    def test_missing_file_is_empty(self, history: HistoryStore) -> None:
        assert history.read() == []
        assert history.read(limit=5) == []
        assert history.unfinished_runs() == []
        assert history.last_scheduled_run_time() is None
        assert history.last_finished_run() is None

    def test_round_trip(self, history: HistoryStore) -> None:
        one = write_run(history, started("r1", "a", "b"), stack_done("r1", "b", "failed"),
                        stack_done("r1", "a"))  # fmt: skip
        two = write_run(history, started("r2", "a", minutes=60, trigger="manual"),
                        stack_done("r2", "a"))  # fmt: skip
        assert history.read() == [two, one]
        assert history.read(limit=1) == [two]
        assert history.last_finished_run() == two
        assert one.result == "partial"

    def test_one_line_per_record(self, history: HistoryStore) -> None:
        write_run(history, started("r1", "a"), stack_done("r1", "a"))
        kinds = [json.loads(line)["kind"] for line in lines(history)]
        assert kinds == ["run.started", "stack.finished", "run.finished"]

    def test_unknown_kind_refused(self, history: HistoryStore) -> None:
        with pytest.raises(ValueError, match="unknown history record kind"):
            history.append({"kind": "run.exploded", "run": "r"})
        assert not history.path.exists()

    def test_duplicate_stack_result_keeps_first(self, history: HistoryStore) -> None:
        run = started("r1", "a")
        history.append_run_started(run)
        history.append_stack_finished(stack_done("r1", "a", "failed"))
        history.append_stack_finished(stack_done("r1", "a", "success"))  # a recovery re-append
        history.append_run_finished(finished(run))
        history.append_run_finished(finished(run))
        [got] = history.read()
        assert [r.result for r in got.results] == ["failed"]

    def test_records_of_unknown_runs_dropped(self, history: HistoryStore) -> None:
        history.append_stack_finished(stack_done("ghost", "a"))
        done = write_run(history, started("r1", "a"), stack_done("r1", "a"))
        assert history.read() == [done]

    def test_unfinished_runs(self, history: HistoryStore) -> None:
        write_run(history, started("r1", "a"), stack_done("r1", "a"))
        history.append_run_started(started("r2", "a", "b", minutes=5))
        history.append_stack_finished(stack_done("r2", "a"))
        [open_run] = history.unfinished_runs()
        assert (open_run.run, open_run.finished_at, open_run.stacks) == ("r2", None, ("a", "b"))
        assert [r.stack for r in open_run.results] == ["a"]
        # the restarted daemon completes it
        history.append_stack_finished(stack_done("r2", "b", "failed"))
        recovered = UpdateRun("r2", ("a", "b"), open_run.started_at, T0 + timedelta(hours=1),
                              "schedule", recovered=True)  # fmt: skip
        history.append_run_finished(recovered)
        assert history.unfinished_runs() == []
        newest = history.read(limit=1)[0]
        assert newest.recovered
        assert (newest.succeeded, newest.failed) == (["a"], ["b"])

    def test_last_scheduled_run_time(self, history: HistoryStore) -> None:
        write_run(history, started("r1", minutes=0, trigger="schedule"))
        assert history.last_scheduled_run_time() == T0
        write_run(history, started("r2", minutes=10, trigger="catch-up"))
        write_run(history, started("r3", minutes=20, trigger="manual"))
        assert history.last_scheduled_run_time() == T0 + timedelta(minutes=10)

    def test_negative_limit(self, history: HistoryStore) -> None:
        with pytest.raises(ValueError, match="limit"):
            history.read(limit=-1)


class TestTornAndGarbage:
    """A torn last line or garbage lines are skipped; the rest of the history survives."""

    def test_torn_last_line(self, history: HistoryStore) -> None:
        done = write_run(history, started("r1", "a"), stack_done("r1", "a"))
        with history.path.open("ab") as file:
            file.write(b'{"kind":"run.started","run":"r2","trig')
        assert history.read() == [done]
        assert history.read(limit=3) == [done]
        # the next append must not be glued onto the torn line
        two = write_run(history, started("r3", "b", minutes=5))
        assert history.read() == [two, done]
        assert lines(history)[-3] == '{"kind":"run.started","run":"r2","trig'

    @pytest.mark.parametrize(
        "garbage",
        [
            b"not json at all",
            b"\x00\x00\x00\x00",
            b"\xff\xfe garbage",
            b"[1, 2, 3]",
            b'{"kind": "run.started"}',
            b'{"kind": "run.started", "run": "rx", "stacks": "nope"}',
            b'{"kind": "stack.finished", "run": "r1", "stack": 5}',
            b'{"kind": "run.finished", "run": "r1", "finished_at": "when?"}',
            b"[" * 100_000,
        ],
    )
    def test_garbage_lines(self, history: HistoryStore, garbage: bytes) -> None:
        run = started("r1", "a")
        history.append_run_started(run)
        with history.path.open("ab") as file:
            file.write(garbage + b"\n")
        history.append_stack_finished(stack_done("r1", "a"))
        history.append_run_finished(finished(run))
        expected = finished(run, stack_done("r1", "a"))
        assert history.read() == [expected]
        assert history.read(limit=1) == [expected]


class TestTailReading:
    """With a limit, the history is read backwards, only as far as needed."""

    def test_reads_only_the_tail(
        self, history: HistoryStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        runs = [write_run(history, started(f"r{i:04}", "a", minutes=i), stack_done(f"r{i:04}", "a"))
                for i in range(300)]  # fmt: skip
        parsed: list[bytes] = []
        real_parse = store._parse

        def counting(line: bytes) -> dict[str, object] | None:
            parsed.append(line)
            return real_parse(line)

        monkeypatch.setattr(store, "_parse", counting)
        assert history.read(limit=2) == runs[::-1][:2]
        assert len(parsed) <= 2 * 3 + 1  # two runs of three records, plus the empty tail

    @pytest.mark.parametrize("block", [1, 7, 64, 4096])
    def test_small_blocks(
        self, history: HistoryStore, monkeypatch: pytest.MonkeyPatch, block: int
    ) -> None:
        runs = [write_run(history, started(f"r{i}", "a", "b", minutes=i), stack_done(f"r{i}", "a"),
                          stack_done(f"r{i}", "b", "failed")) for i in range(12)]  # fmt: skip
        monkeypatch.setattr(store, "_BLOCK", block)
        for limit in (1, 5, 12, 40):
            assert history.read(limit=limit) == runs[::-1][:limit]

    @given(data=st.binary(max_size=300), block=st.integers(1, 50))
    def test_reverse_lines_agree_with_forward(self, data: bytes, block: int) -> None:
        backwards = list(store._reverse_lines(io.BytesIO(data), block))
        assert backwards[::-1] == data.split(b"\n")


class TestStateFile:
    """A state file is replaced atomically: old or new content, never a mix, no temp left."""

    def test_round_trip(self, tmp_path: Path) -> None:
        state = StateFile(tmp_path / "stackd" / "state.json")
        assert state.read() is None
        state.write({"last_run": "2026-11-26T03:00:00Z"})
        state.write({"last_run": "2026-11-27T03:00:00Z", "n": 2})
        assert state.read() == {"last_run": "2026-11-27T03:00:00Z", "n": 2}
        assert sorted(p.name for p in state.path.parent.iterdir()) == ["state.json"]

    def test_failed_write_keeps_old_content(self, tmp_path: Path) -> None:
        state = StateFile(tmp_path / "state.json")
        state.write({"v": 1})
        (tmp_path / "state.json.d").mkdir()
        # the rename target becomes a non-empty directory: os.replace fails
        blocker = StateFile(tmp_path / "state.json.d")
        (tmp_path / "state.json.d" / "x").touch()
        with pytest.raises(StoreError, match="cannot write"):
            blocker.write({"v": 2})
        assert state.read() == {"v": 1}
        assert not list(tmp_path.glob(".*.tmp"))

    @pytest.mark.parametrize("content", [b"{not json", b"[1]"])
    def test_corrupt(self, tmp_path: Path, content: bytes) -> None:
        path = tmp_path / "state.json"
        path.write_bytes(content)
        with pytest.raises(StoreError, match=r"state\.json"):
            StateFile(path).read()


# --- several processes, kill -9, read-only and full file systems ---

CHILD_APPEND = textwrap.dedent(
    """
    import sys
    from stackd.adapters.store import HistoryStore
    history = HistoryStore.in_dir(__import__("pathlib").Path(sys.argv[1]))
    tag, count, pad = sys.argv[2], int(sys.argv[3]), "x" * int(sys.argv[4])
    i = 0
    while count < 0 or i < count:
        history.append({"kind": "run.started", "run": f"{tag}-{i}", "trigger": "manual",
                        "stacks": [pad], "started_at": "2026-11-26T03:00:00Z"})
        i += 1
    """
)


def child(directory: Path, tag: str, count: int, pad: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_APPEND, str(directory), tag, str(count), str(pad)], env=env
    )


def assert_whole_lines(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


class TestProcesses:
    """Appends from several processes and kills at any moment leave whole lines only."""

    def test_concurrent_appends_interleave_whole_lines(self, tmp_path: Path) -> None:
        directory = tmp_path / "stackd"
        children = [child(directory, tag, 400, 3000) for tag in ("a", "b")]
        for proc in children:
            assert proc.wait(timeout=60) == 0
        records = assert_whole_lines(directory / store.HISTORY_FILE)
        runs = [str(r["run"]) for r in records]
        for tag in ("a", "b"):
            assert [r for r in runs if r.startswith(f"{tag}-")] == [
                f"{tag}-{i}" for i in range(400)
            ]
        assert len(HistoryStore.in_dir(directory).read()) == 800

    def test_kill_9_leaves_a_parseable_history(self, tmp_path: Path) -> None:
        directory = tmp_path / "stackd"
        path = directory / store.HISTORY_FILE
        for round_ in range(5):
            before = path.stat().st_size if path.exists() else 0
            proc = child(directory, f"k{round_}", -1, 500)
            deadline = time.monotonic() + 30
            while (not path.exists() or path.stat().st_size <= before) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.005)
            time.sleep(0.02 * round_)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        records = assert_whole_lines(path)
        assert {str(r["run"]).split("-")[0] for r in records} == {f"k{i}" for i in range(5)}
        history = HistoryStore(path)
        assert len(history.read()) == len(records)
        assert len(history.read(limit=3)) == 3

    def test_kill_9_mid_write_of_large_records(self, tmp_path: Path) -> None:
        """A write spanning pages can be cut at a page boundary by SIGKILL (seen here with
        megabyte records, in some runs only: the deterministic case is test_torn_last_line):
        the torn piece is skipped, later appends start a new line."""
        directory = tmp_path / "stackd"
        path = directory / store.HISTORY_FILE
        for round_ in range(6):
            before = path.stat().st_size if path.exists() else 0
            proc = child(directory, f"k{round_}", -1, 1 << 20)
            deadline = time.monotonic() + 30
            while (not path.exists() or path.stat().st_size <= before) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.001)
            time.sleep(0.01 + 0.005 * round_)  # into the append loop
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        history = HistoryStore(path)
        history.append_run_started(started("after", "a"))
        whole, torn = 0, 0
        for line in path.read_bytes().splitlines():
            try:
                json.loads(line)
                whole += 1
            except ValueError:
                torn += 1
                assert line.startswith(b'{"kind":"run.started","run":"k')
        assert torn <= 6
        runs = history.read()
        assert len(runs) == whole
        assert runs[0].run == "after"
        assert history.read(limit=1)[0].run == "after"


needs_mounts = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private mount namespace",
)

CHILD_FAIL = textwrap.dedent(
    """
    import json, pathlib, sys
    from stackd.adapters.store import HistoryStore, StateFile, StoreError
    directory = pathlib.Path(sys.argv[1])
    out = {}
    try:
        HistoryStore.in_dir(directory).append(
            {"kind": "run.started", "run": "r", "trigger": "manual", "stacks": ["x" * 4096],
             "started_at": "2026-11-26T03:00:00Z"})
        out["history"] = None
    except StoreError as exc:
        out["history"] = [str(exc), exc.errno]
    try:
        StateFile(directory / "state.json").write({"x": "y" * 65536})
        out["state"] = None
    except StoreError as exc:
        out["state"] = [str(exc), exc.errno]
    out["read"] = len(HistoryStore.in_dir(directory).read())
    print(json.dumps(out))
    """
)


def run_in_namespace(setup: str, directory: Path) -> dict[str, Any]:
    """Run CHILD_FAIL in a private mount namespace after `setup` (shell, $1 = directory);
    the mounts vanish with the namespace and never touch the machine's paths."""
    script = f'set -e\n{setup}\nexec "$2" -c "$3" "$1"'
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(directory), sys.executable, CHILD_FAIL],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"no private mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@needs_mounts
class TestUnwritable:
    """Writing to a read-only or full file system raises StoreError; reading still works."""

    def test_read_only(self, tmp_path: Path) -> None:
        directory = tmp_path / "stackd"
        write_run(HistoryStore.in_dir(directory), started("r0", "a"), stack_done("r0", "a"))
        got = run_in_namespace('mount --bind "$1" "$1"\nmount -o remount,bind,ro "$1"', directory)
        assert got["history"] == [
            f"cannot open the update history {directory / store.HISTORY_FILE}: "
            "Read-only file system",
            30,  # EROFS
        ]
        assert got["state"] is not None
        assert "Read-only file system" in str(got["state"])
        assert got["read"] == 1

    def test_disk_full(self, tmp_path: Path) -> None:
        directory = tmp_path / "stackd"
        directory.mkdir()
        fill = 'mount -t tmpfs -o size=64k,mode=0700 stackd-test "$1"\n'
        fill += 'head -c 1000000 /dev/zero > "$1/filler" 2>/dev/null || true'
        got = run_in_namespace(fill, directory)
        assert got["history"] is not None
        assert got["history"][1] == 28  # ENOSPC
        assert got["state"] is not None
        assert got["state"][1] == 28
        assert got["read"] == 0
