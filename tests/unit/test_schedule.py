"""Schedule decisions (pure) and calendar expressions evaluated by the real systemd-analyze."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime, timedelta

import pytest

from stackd.adapters.calendar import (
    CalendarError,
    missed_elapse,
    next_elapse,
    parse_next_elapse,
    validate_calendar,
)
from stackd.core.schedule import apply_randomized_delay, missed_run

# A Thursday.
NOW = datetime(2026, 11, 26, 2, 27, 9, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


class TestMissedRun:
    """Persistent catch-up: only when persistent, after a recorded run, for a past elapse."""

    @pytest.mark.parametrize(
        ("persistent", "last_run", "elapse", "expected"),
        [
            (True, at(25, 0), at(26, 0), True),  # daily elapse passed while down
            (True, at(25, 0), NOW, True),  # due exactly now
            (True, at(26, 0), at(27, 0), False),  # next elapse still ahead
            (False, at(25, 0), at(26, 0), False),  # not persistent
            (True, None, None, False),  # never ran: no catch-up, like systemd
            (True, at(25, 0), None, False),  # expression never elapses again
        ],
    )
    def test_table(
        self,
        persistent: bool,
        last_run: datetime | None,
        elapse: datetime | None,
        expected: bool,
    ) -> None:
        got = missed_run(
            persistent=persistent, last_run=last_run, elapse_after_last_run=elapse, now=NOW
        )
        assert got is expected


class TestRandomizedDelay:
    """The delay is delay_s scaled by the caller's random draw."""

    @pytest.mark.parametrize(
        ("delay", "rng", "added"),
        [(0, 0.7, 0), (600, 0.0, 0), (600, 0.5, 300), (600, 0.999, 599.4), (3600, 1.0, 3600)],
    )
    def test_table(self, delay: float, rng: float, added: float) -> None:
        assert apply_randomized_delay(NOW, delay, rng) == NOW + timedelta(seconds=added)

    @pytest.mark.parametrize(("delay", "rng"), [(-1, 0.5), (10, -0.1), (10, 1.5)])
    def test_out_of_range(self, delay: float, rng: float) -> None:
        with pytest.raises(ValueError, match="must"):
            apply_randomized_delay(NOW, delay, rng)


class TestParseNextElapse:
    """The Next elapse line is read in UTC, preferring the (in UTC) line when present."""

    def test_utc(self) -> None:
        out = "  Original form: daily\n    Next elapse: Fri 2026-11-27 00:00:00 UTC\n"
        assert parse_next_elapse(out) == at(27, 0)

    def test_local_zone_with_utc_line(self) -> None:
        out = (
            "    Next elapse: Fri 2026-11-27 00:00:00 CET\n"
            "       (in UTC): Thu 2026-11-26 23:00:00 UTC\n"
            "       From now: 20h left\n"
        )
        assert parse_next_elapse(out) == at(26, 23)

    def test_zero_offset_zone_without_utc_line(self) -> None:
        assert parse_next_elapse("Next elapse: Thu 2026-11-26 00:00:00 GMT") == at(26, 0)

    def test_never(self) -> None:
        assert (
            parse_next_elapse("Normalized form: 2020-01-01 00:00:00\n Next elapse: never\n") is None
        )

    @pytest.mark.parametrize("out", ["", "Next elapse: soon\n"])
    def test_unreadable(self, out: str) -> None:
        with pytest.raises(CalendarError, match="elapse"):
            parse_next_elapse(out)


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
class TestRealSystemdAnalyze:
    """Answers come from systemd's own calendar code (v252 has --base-time)."""

    @pytest.mark.parametrize(
        ("expr", "expected"),
        [
            ("daily", at(27, 0)),
            ("hourly", at(26, 3)),
            ("*-*-* 03:00:00", at(26, 3)),
            ("Mon..Fri 02:30", at(26, 2, 30)),  # Thursday, later the same morning
            ("Sat,Sun 02:30", at(28, 2, 30)),
            ("weekly", at(30, 0)),  # Monday 00:00
            ("*-*-* 03:00:00 Europe/Berlin", at(27, 2)),
        ],
    )
    async def test_next_elapse(self, expr: str, expected: datetime) -> None:
        assert await next_elapse(expr, NOW, tz="UTC") == expected

    async def test_local_time_zone_is_used(self) -> None:
        # midnight in Berlin (CET, +1 in November) is 23:00 UTC
        assert await next_elapse("daily", NOW, tz="Europe/Berlin") == at(26, 23)

    async def test_strictly_after(self) -> None:
        assert await next_elapse("daily", at(27, 0), tz="UTC") == at(28, 0)
        just_before = at(27, 0) - timedelta(microseconds=1)
        assert await next_elapse("daily", just_before, tz="UTC") == at(27, 0)

    async def test_never(self) -> None:
        assert await next_elapse("2020-01-01", NOW, tz="UTC") is None

    @pytest.mark.parametrize("expr", ["daily", "Mon..Fri 02:30", "*:0/15", "2026-12-24 18:00"])
    async def test_valid(self, expr: str) -> None:
        assert await validate_calendar(expr) is None

    @pytest.mark.parametrize(
        ("expr", "message"),
        [
            ("bogus", r"'bogus' is not a systemd calendar expression .*Invalid argument"),
            ("Mon..Fri 25:00", "is not a systemd calendar expression"),
            ("--version", "is not a systemd calendar expression"),  # not taken as an option
            ("", "empty"),
            ("daily\nhourly", "line break"),
        ],
    )
    async def test_invalid(self, expr: str, message: str) -> None:
        problem = await validate_calendar(expr)
        assert problem is not None
        assert re.search(message, problem), problem

    async def test_next_elapse_of_invalid_raises(self) -> None:
        with pytest.raises(CalendarError, match="'bogus' is not a systemd calendar"):
            await next_elapse("bogus", NOW)

    async def test_naive_base_refused(self) -> None:
        with pytest.raises(ValueError, match="timezone-aware"):
            await next_elapse("daily", NOW.replace(tzinfo=None))

    @pytest.mark.parametrize(
        ("last_run", "expected"),
        [
            (None, None),  # never ran
            (at(25, 0, 5), at(26, 0)),  # ran yesterday after midnight: today's run missed
            (at(26, 0, 5), None),  # ran today: nothing missed
        ],
    )
    async def test_missed_elapse(self, last_run: datetime | None, expected: datetime) -> None:
        assert await missed_elapse("daily", last_run, NOW, tz="UTC") == expected

    async def test_catch_up_decision(self) -> None:
        """The adapter and the pure rule together: down across a 03:00 elapse -> catch up."""
        last = at(25, 3, 1)
        due = await next_elapse("*-*-* 03:00", last, tz="UTC")
        assert due == at(26, 3)
        later = at(26, 9)
        assert missed_run(persistent=True, last_run=last, elapse_after_last_run=due, now=later)
        assert not missed_run(persistent=True, last_run=last, elapse_after_last_run=due, now=NOW)
