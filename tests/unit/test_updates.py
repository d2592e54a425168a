"""The pure side of update runs: classification, failure text, image diffs, summary, JSON."""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stackd.core.updates import (
    CLD_DUMPED,
    CLD_EXITED,
    CLD_KILLED,
    ExecCommand,
    Failure,
    ServiceChange,
    ServiceImage,
    StackUpdateResult,
    UpdateRun,
    classify_job,
    command_label,
    describe_failure,
    diff_images,
    failed_command,
    finish_stack,
    latest_results,
    new_run_id,
    run_from_json,
    run_to_json,
    skipped_stack,
    stack_message,
    stack_result_from_json,
    stack_result_to_json,
    summary_fields,
    summary_message,
)

T0 = datetime(2026, 11, 26, 3, 0, 0, tzinfo=UTC)
PULL = ("podman", "compose", "-f", "compose.yaml", "pull")
UP = ("podman", "compose", "-f", "compose.yaml", "up", "-d", "--remove-orphans")


def ran(argv: tuple[str, ...], code: int = CLD_EXITED, status: int = 0) -> ExecCommand:
    return ExecCommand("/usr/bin/podman", argv, start_usec=1, exit_usec=2, pid=42, code=code,
                       status=status)  # fmt: skip


def never(argv: tuple[str, ...]) -> ExecCommand:
    return ExecCommand("/usr/bin/podman", argv)


def result(
    stack: str, outcome: str = "success", error: str | None = None, minutes: int = 1
) -> StackUpdateResult:
    return StackUpdateResult(
        run="r1",
        stack=stack,
        unit=f"{stack}-update.service",
        result=outcome,  # type: ignore[arg-type]
        started_at=T0,
        finished_at=T0 + timedelta(minutes=minutes),
        error=error,
    )


def run_of(*results: StackUpdateResult, stacks: tuple[str, ...] | None = None) -> UpdateRun:
    return UpdateRun(
        run="r1",
        stacks=stacks if stacks is not None else tuple(r.stack for r in results),
        started_at=T0,
        finished_at=T0 + timedelta(minutes=5),
        trigger="schedule",
        results=results,
    )


class TestClassifyJob:
    """JobRemoved result + unit Result map onto success / failed / timeout / skipped."""

    @pytest.mark.parametrize(
        ("job", "unit", "expected"),
        [
            ("done", "success", "success"),
            ("done", "exit-code", "success"),  # a stale Result from an earlier start
            ("failed", "exit-code", "failed"),
            ("failed", "signal", "failed"),
            ("failed", "core-dump", "failed"),
            ("failed", "resources", "failed"),
            ("failed", "timeout", "timeout"),  # TimeoutStartSec= (updates.timeout)
            ("timeout", "", "timeout"),  # JobTimeoutSec=
            ("canceled", "success", "failed"),
            ("dependency", "", "failed"),
            ("skipped", "", "skipped"),
            ("invalid", "success", "failed"),
        ],
    )
    def test_table(self, job: str, unit: str, expected: str) -> None:
        assert classify_job(job, unit) == expected


class TestCommandLabel:
    """A command is named by its compose verb, wherever the options put it."""

    @pytest.mark.parametrize(
        ("argv", "label"),
        [
            (PULL, "compose pull"),
            (UP, "compose up"),
            (("/usr/bin/docker", "compose", "--project-directory", "/srv/x", "pull"),
             "compose pull"),
            (("podman-compose", "-p", "web", "up", "-d"), "compose up"),
            (("/bin/false",), "false"),
            ((), "?"),
        ],
    )  # fmt: skip
    def test_table(self, argv: tuple[str, ...], label: str) -> None:
        assert command_label(argv) == label


class TestExecCommandFromDbus:
    """The ExecStart struct (sasbttttuii) is read field by field."""

    def test_fields(self) -> None:
        value = ["/usr/bin/podman", list(PULL), False, 10, 11, 20, 21, 4242, CLD_EXITED, 125]
        command = ExecCommand.from_dbus(value)
        assert command == ExecCommand("/usr/bin/podman", PULL, False, 10, 20, 4242, 1, 125)
        assert command.started
        assert command.finished
        assert not command.ok

    def test_never_ran(self) -> None:
        command = ExecCommand.from_dbus(["/usr/bin/podman", list(UP), False, 0, 0, 0, 0, 0, 0, 0])
        assert not command.started
        assert not command.finished


class TestDescribeFailure:
    """The failing ExecStart command becomes "`compose pull` exited 125" and fields."""

    @pytest.mark.parametrize(
        ("outcome", "job", "unit", "commands", "expected"),
        [
            ("failed", "failed", "exit-code", [ran(PULL, status=125), never(UP)],
             Failure("`compose pull` exited 125", "compose pull", 125)),
            ("failed", "failed", "exit-code", [ran(PULL), ran(UP, status=1)],
             Failure("`compose up` exited 1", "compose up", 1)),
            ("failed", "failed", "signal", [ran(PULL, CLD_KILLED, signal.SIGKILL), never(UP)],
             Failure("`compose pull` killed by SIGKILL", "compose pull")),
            ("failed", "failed", "core-dump", [ran(PULL), ran(UP, CLD_DUMPED, signal.SIGSEGV)],
             Failure("`compose up` killed by SIGSEGV (core dumped)", "compose up")),
            ("timeout", "failed", "timeout", [ran(PULL, CLD_KILLED, signal.SIGTERM), never(UP)],
             Failure("`compose pull` timed out after 30min", "compose pull")),
            ("timeout", "failed", "timeout", [ExecCommand("/p", PULL, start_usec=5, pid=9)],
             Failure("`compose pull` timed out after 30min", "compose pull")),
            ("failed", "dependency", "", [never(PULL), never(UP)],
             Failure("a dependency of the update unit failed")),
            ("failed", "canceled", "", [never(PULL)], Failure("the start job was canceled")),
            ("failed", "failed", "resources", [never(PULL)],
             Failure("the update unit failed (resources)")),
            ("timeout", "timeout", "", [], Failure("the start job timed out")),
        ],
    )  # fmt: skip
    def test_table(
        self,
        outcome: str,
        job: str,
        unit: str,
        commands: list[ExecCommand],
        expected: Failure,
    ) -> None:
        assert describe_failure(outcome, job, unit, commands, 1800) == expected  # type: ignore[arg-type]

    @pytest.mark.parametrize("outcome", ["success", "skipped"])
    def test_no_failure(self, outcome: str) -> None:
        assert describe_failure(outcome, "done", "success", [ran(PULL)]) is None  # type: ignore[arg-type]

    def test_ignored_errors_are_not_the_failing_command(self) -> None:
        ignored = ExecCommand("/p", PULL, True, 1, 2, 3, CLD_EXITED, 1)
        assert failed_command([ignored, ran(UP, status=2)]) == ran(UP, status=2)

    @pytest.mark.parametrize(("seconds", "text"), [(90, "1min 30s"), (3600, "1h"), (45, "45s")])
    def test_timeout_span(self, seconds: int, text: str) -> None:
        failure = describe_failure("timeout", "failed", "timeout", [ran(UP, CLD_KILLED, 15)],
                                   seconds)  # fmt: skip
        assert failure == Failure(f"`compose up` timed out after {text}", "compose up")


def image(service: str, image_id: str, name: str = "img", container: str = "") -> ServiceImage:
    return ServiceImage(service, container or f"c-{service}", image_id, name)


class TestDiffImages:
    """Per service: unchanged, updated (old -> new), missing or added; sorted by service."""

    @pytest.mark.parametrize(
        ("before", "after", "expected"),
        [
            ([], [], ()),
            ([image("web", "a")], [image("web", "a")],
             (ServiceChange("web", "unchanged", "a", "a", "img"),)),
            ([image("web", "a")], [image("web", "b", "img:2")],
             (ServiceChange("web", "updated", "a", "b", "img:2"),)),
            ([image("db", "d"), image("web", "a")], [image("web", "a")],
             (ServiceChange("db", "missing", "d", None, "img"),
              ServiceChange("web", "unchanged", "a", "a", "img"))),
            ([], [image("web", "a")], (ServiceChange("web", "added", None, "a", "img"),)),
            # two replicas mid-rollout: compared as the set of their image ids
            ([image("w", "a", container="1"), image("w", "a", container="2")],
             [image("w", "b", container="1"), image("w", "a", container="2")],
             (ServiceChange("w", "updated", "a", "a,b", "img"),)),
        ],
    )  # fmt: skip
    def test_table(
        self,
        before: list[ServiceImage],
        after: list[ServiceImage],
        expected: tuple[ServiceChange, ...],
    ) -> None:
        assert diff_images(before, after) == expected

    def test_describe_shortens_ids(self) -> None:
        change = ServiceChange("web", "updated", "sha256:" + "1" * 64, "2" * 64)
        assert change.describe() == "web: updated (111111111111 -> 222222222222)"


class TestRunResult:
    """A run is success when nothing failed, failed when nothing succeeded, else partial;
    skipped stacks count neither way."""

    @pytest.mark.parametrize(
        ("outcomes", "expected"),
        [
            ((), "success"),
            (("success", "success"), "success"),
            (("success", "skipped"), "success"),
            (("skipped",), "success"),
            (("success", "failed"), "partial"),
            (("success", "timeout"), "partial"),
            (("failed", "timeout"), "failed"),
            (("failed", "skipped"), "failed"),
        ],
    )
    def test_table(self, outcomes: tuple[str, ...], expected: str) -> None:
        run = run_of(*(result(f"s{i}", o) for i, o in enumerate(outcomes)))
        assert run.result == expected

    def test_lists(self) -> None:
        run = run_of(result("a"), result("b", "timeout"), result("c", "skipped"), result("d"))
        assert (run.succeeded, run.failed, run.skipped) == (["a", "d"], ["b"], ["c"])

    def test_naive_datetimes_refused(self) -> None:
        with pytest.raises(ValueError, match="timezone-aware"):
            UpdateRun("r", (), datetime(2026, 1, 1), None, "manual")


class TestNewRunId:
    """Run ids sort by start time and carry the caller's suffix."""

    def test_format(self) -> None:
        assert new_run_id(T0, "3f9a") == "2026-11-26T03:00:00Z-3f9a"

    def test_converted_to_utc(self) -> None:
        local = T0.astimezone(timezone(timedelta(hours=5, minutes=30)))
        assert new_run_id(local, "a") == "2026-11-26T03:00:00Z-a"

    def test_sortable(self) -> None:
        times = [T0 + timedelta(seconds=s) for s in (0, 9, 10, 3600, 86400 * 40)]
        ids = [new_run_id(t, "z") for t in times]
        assert sorted(ids) == ids

    @pytest.mark.parametrize("suffix", ["", "A1", "a-b", "x" * 17])
    def test_bad_suffix(self, suffix: str) -> None:
        with pytest.raises(ValueError, match="suffix"):
            new_run_id(T0, suffix)


class TestSummaryMessage:
    """The update.finished message: start minute, counts, then failures and skips with why."""

    def test_issue_example(self) -> None:
        run = run_of(result("web"), result("db", "failed", "`compose pull` exited 125"),
                     result("cache"), result("proxy"))  # fmt: skip
        assert summary_message(run) == (
            "update run 2026-11-26T03:00: 4 stacks, 3 succeeded, 1 failed "
            "(db: `compose pull` exited 125)"
        )

    def test_all_succeeded(self) -> None:
        start = T0.replace(minute=7, second=59, microsecond=1)
        run = UpdateRun("r", ("a", "b"), start, None, "manual", (result("a"), result("b")))
        assert summary_message(run) == "update run 2026-11-26T03:07: 2 stacks, 2 succeeded"

    def test_failures_and_skips(self) -> None:
        run = run_of(
            result("a", "timeout", "`compose up` timed out after 30min"),
            result("b", "skipped", "update unit already running"),
            result("c", "failed"),
        )
        assert summary_message(run) == (
            "update run 2026-11-26T03:00: 3 stacks, 0 succeeded, 2 failed "
            "(a: `compose up` timed out after 30min, c: failed), "
            "1 skipped (b: update unit already running)"
        )

    def test_singular_and_empty(self) -> None:
        assert summary_message(run_of(result("a"))).endswith(": 1 stack, 1 succeeded")
        assert summary_message(run_of()) == "update run 2026-11-26T03:00: 0 stacks"

    def test_stacks_without_result(self) -> None:
        run = run_of(result("a"), stacks=("a", "b"))
        assert summary_message(run).endswith("2 stacks, 1 succeeded, 1 without result")

    def test_time_shown_in_utc(self) -> None:
        start = T0.astimezone(timezone(timedelta(hours=-8)))
        run = UpdateRun("r", (), start, None, "manual")
        assert summary_message(run).startswith("update run 2026-11-26T03:00:")

    def test_fields(self) -> None:
        run = run_of(result("a"), result("b", "failed", "x"), result("c", "skipped", "busy"))
        assert summary_fields(run) == {
            "STACKD_RUN": "r1",
            "STACKD_TRIGGER": "schedule",
            "STACKD_RESULT": "partial",
            "STACKD_STACKS": "a,b,c",
            "STACKD_SUCCEEDED": "a",
            "STACKD_FAILED": "b",
            "STACKD_SKIPPED": "c",
            "STACKD_RECOVERED": "false",
        }


class TestFinishStack:
    """What systemd and the engine reported becomes one StackUpdateResult."""

    def test_failed_pull(self) -> None:
        got = finish_stack(
            run="r1", stack="db", unit="db-update.service", started_at=T0,
            finished_at=T0 + timedelta(seconds=30), job_result="failed",
            unit_result="exit-code", commands=[ran(PULL, status=125), never(UP)],
            before=[image("db", "a")], after=[image("db", "a")],
        )  # fmt: skip
        assert (got.result, got.error, got.failed_command, got.exit_status) == (
            "failed", "`compose pull` exited 125", "compose pull", 125)  # fmt: skip
        assert got.changes == (ServiceChange("db", "unchanged", "a", "a", "img"),)
        assert stack_message(got) == "update of db: failed: `compose pull` exited 125"

    def test_success_with_update(self) -> None:
        got = finish_stack(
            run="r1", stack="web", unit="web-update.service", started_at=T0, finished_at=T0,
            job_result="done", unit_result="success", commands=[ran(PULL), ran(UP)],
            before=[image("web", "a" * 12)], after=[image("web", "b" * 12)],
        )  # fmt: skip
        assert (got.result, got.error, got.exit_status) == ("success", None, None)
        assert stack_message(got) == (
            "update of web: success (web: updated (aaaaaaaaaaaa -> bbbbbbbbbbbb))"
        )

    def test_skipped(self) -> None:
        got = skipped_stack(run="r1", stack="web", unit="web-update.service", at=T0,
                            reason="update unit already running")  # fmt: skip
        assert (got.result, got.error, got.started_at, got.finished_at) == (
            "skipped", "update unit already running", T0, T0)  # fmt: skip
        assert stack_message(got) == "update of web: skipped: update unit already running"


class TestLatestResults:
    """Each stack's last_update is its newest result across runs."""

    def test_newest_wins(self) -> None:
        old = run_of(result("a", minutes=1), result("b", "failed", minutes=1))
        new = run_of(result("a", "failed", "x", minutes=9))
        latest = latest_results([new, old])
        assert latest["a"].error == "x"
        assert latest["b"].result == "failed"


# --- JSON ---

aware = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
) | st.datetimes(min_value=datetime(1971, 1, 2), max_value=datetime(2200, 1, 1)).map(
    lambda d: d.replace(tzinfo=timezone(timedelta(hours=-7)))
)
text = st.text(max_size=20)
changes = st.builds(
    ServiceChange,
    service=text,
    change=st.sampled_from(["unchanged", "updated", "missing", "added"]),
    old=st.none() | text,
    new=st.none() | text,
    image=st.none() | text,
)
stack_results = st.builds(
    StackUpdateResult,
    run=text,
    stack=text,
    unit=text,
    result=st.sampled_from(["success", "failed", "timeout", "skipped"]),
    started_at=aware,
    finished_at=aware,
    error=st.none() | text,
    failed_command=st.none() | text,
    exit_status=st.none() | st.integers(-(2**31), 2**31),
    changes=st.lists(changes, max_size=3).map(tuple),
)
runs = st.builds(
    UpdateRun,
    run=text,
    stacks=st.lists(text, max_size=4).map(tuple),
    started_at=aware,
    finished_at=st.none() | aware,
    trigger=st.sampled_from(["schedule", "manual", "catch-up"]),
    results=st.lists(stack_results, max_size=3).map(tuple),
    recovered=st.booleans(),
)


class TestJson:
    """to_json/from_json are inverses and produce the DESIGN section 6 shapes."""

    @given(stack_results)
    def test_stack_round_trip(self, value: StackUpdateResult) -> None:
        assert stack_result_from_json(stack_result_to_json(value)) == value

    @given(runs)
    def test_run_round_trip(self, value: UpdateRun) -> None:
        assert run_from_json(run_to_json(value)) == value

    def test_design_shapes(self) -> None:
        run = run_of(result("a"), result("b", "failed", "boom"))
        data = run_to_json(run)
        assert {
            k: data[k]
            for k in ("run", "result", "succeeded", "failed", "started_at", "finished_at")
        } == {
            "run": "r1",
            "result": "partial",
            "succeeded": ["a"],
            "failed": ["b"],
            "started_at": "2026-11-26T03:00:00Z",
            "finished_at": "2026-11-26T03:05:00Z",
        }
        last_update = data["results"][1]
        assert {k: last_update[k] for k in ("run", "result", "started_at", "finished_at",
                                            "error")} == {
            "run": "r1", "result": "failed", "started_at": "2026-11-26T03:00:00Z",
            "finished_at": "2026-11-26T03:01:00Z", "error": "boom",
        }  # fmt: skip

    @pytest.mark.parametrize(
        ("patch", "message"),
        [
            ({"result": "exploded"}, "result must be one of"),
            ({"started_at": "2026-11-26T03:00:00"}, "without a time zone"),
            ({"started_at": 5}, "ISO 8601"),
            ({"exit_status": "1"}, "exit_status"),
            ({"stack": None}, "stack must be a string"),
            ({"changes": [{"service": "w", "change": "gone"}]}, "change must be one of"),
        ],
    )
    def test_bad_stack_result(self, patch: dict[str, object], message: str) -> None:
        data = {**stack_result_to_json(result("a")), **patch}
        with pytest.raises(ValueError, match=message):
            stack_result_from_json(data)

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            ([], "expected a JSON object"),
            ({"stacks": "ab"}, "stacks must be a list"),
            ({"trigger": "cron"}, "trigger must be one of"),
            ({"recovered": "yes"}, "recovered must be a boolean"),
            ({"finished_at": "yesterday"}, "Invalid isoformat"),
        ],
    )
    def test_bad_run(self, data: object, message: str) -> None:
        if isinstance(data, dict):
            data = {**run_to_json(run_of(result("a"))), **data}
        with pytest.raises(ValueError, match=message):
            run_from_json(data)
