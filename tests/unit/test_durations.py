"""Durations: stackd reads and writes time spans exactly as systemd does."""

from __future__ import annotations

import functools
import math
import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackd.core.durations import format_duration, parse_duration

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


@functools.cache
def systemd_usec(span: str) -> int | None:
    """What `systemd-analyze timespan` makes of `span`: microseconds, or None if it refuses."""
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "timespan", "--", span], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        return None
    match = re.search(r"^\s*μs: (\d+)$", out.stdout, re.MULTILINE)
    assert match, out.stdout
    return int(match.group(1))


@functools.cache
def systemd_human(usec: int) -> str:
    """systemd's own rendering of a span (format_timespan), as `systemd-analyze` prints it."""
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "timespan", f"{usec}us"], capture_output=True, text=True, check=True
    )
    match = re.search(r"^\s*Human: (.*)$", out.stdout, re.MULTILINE)
    assert match, out.stdout
    return match.group(1)


def usec_of(span: str) -> int:
    return round(parse_duration(span) * 1_000_000)


class TestParseAcceptsSecondsAndSpans:
    """Numbers are seconds; strings are systemd time spans, summed token by token."""

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            (0, 0.0),
            (90, 90.0),
            (1.5, 1.5),
            ("0", 0.0),
            ("90", 90.0),
            ("1.5", 1.5),
            ("90s", 90.0),
            ("2min", 120.0),
            ("2min 5s", 125.0),
            ("1h 30min", 5400.0),
            ("1h30min", 5400.0),
            ("1.5h", 5400.0),
            ("10 min 3 s", 603.0),
            ("500ms", 0.5),
            ("250msec", 0.25),
            ("5us", 5e-6),
            ("5usec", 5e-6),
            ("5\u00b5s", 5e-6),  # micro sign
            ("5\u03bcs", 5e-6),  # Greek mu
            ("2 seconds", 2.0),
            ("1 second", 1.0),
            ("3sec", 3.0),
            ("4 minutes", 240.0),
            ("1 minute", 60.0),
            ("5m", 300.0),
            ("2 hours", 7200.0),
            ("1 hour", 3600.0),
            ("1hr", 3600.0),
            ("1d", 86400.0),
            ("2 days", 172800.0),
            ("1 day", 86400.0),
            ("1w", 604800.0),
            ("2 weeks", 1209600.0),
            ("1 week", 604800.0),
            ("1M", 2629800.0),
            ("1 month", 2629800.0),
            ("2 months", 5259600.0),
            ("1y", 31557600.0),
            ("1 year", 31557600.0),
            ("2 years", 63115200.0),
            (" 5s ", 5.0),
            (".5s", 0.5),
            ("5 5", 10.0),  # a bare number is seconds, wherever it stands
            ("1h 2", 3602.0),
            ("1h 1h", 7200.0),
            ("0.25d 1.5ms", 21600.0015),
            ("1.23456789s", 1.234567),  # truncated to whole microseconds, as systemd does
        ],
    )
    def test_value_means_seconds(self, value: str | float, seconds: float) -> None:
        assert parse_duration(value) == pytest.approx(seconds, rel=1e-12, abs=1e-12)

    def test_result_is_float(self) -> None:
        assert type(parse_duration(90)) is float
        assert type(parse_duration("90")) is float


class TestParseRejectsWithAReason:
    """Refusals say what was wrong and show what would be accepted."""

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("", "empty duration"),
            ("   ", "empty duration"),
            ("-5", "negative duration '-5'"),
            ("-0", "negative duration"),
            ("5min -3s", "negative duration"),
            (-1, "negative duration -1"),
            (-0.5, "negative duration"),
            ("5 fortnights", "unknown unit 'fortnights'"),
            ("5secs", "unknown unit 'secs'"),
            ("5S", "unknown unit 'S'"),
            ("5ns", "unknown unit 'ns'"),
            ("1e3", "unknown unit 'e'"),
            ("soon", "unknown unit 'soon'"),
            ("1.5.3s", "cannot read '1.5.3s'"),
            ("5.s", "cannot read '5.s'"),
            ("5 + 3", "cannot read"),
            ("s", "cannot read 's'"),
            ("infinity", "an infinite duration is not accepted"),
            ("99999999999999999999", "too large"),
            ("18446744073709s", "too large"),
            (math.inf, "not a finite duration"),
            (math.nan, "not a finite duration"),
            (True, "expected a duration, got True"),
        ],
    )
    def test_bad_value_is_refused(self, value: str | float, message: str) -> None:
        with pytest.raises(ValueError, match=re.escape(message)) as caught:
            parse_duration(value)
        assert "such as '2min 30s' or '1h 30min'" in str(caught.value)

    def test_wrong_type_is_refused(self) -> None:
        with pytest.raises(ValueError, match="expected a duration, got list"):
            parse_duration([1])  # type: ignore[arg-type]


# Inputs chosen at the edges of systemd's parser: unit prefixes, whitespace, fractions,
# signs, overflow, and text it refuses.
SYSTEMD_TABLE = [
    "0",
    "90",
    "1.5",
    "1h 30min",
    "1h30min",
    "2min 5s",
    "1.5h",
    "1.5M",
    "0.1y",
    "1M",
    "1y",
    "1w",
    "1d",
    "5us",
    "5\u00b5s",
    "5\u03bcs",
    "5usec",
    "5msec",
    "1ms5us",
    "0.5us",
    "0.0000001s",
    "1.23456789s",
    "5.0000001s",
    "0000.5s",
    ".5s",
    "12.34 .56",
    "5 .5",
    "5s5",
    "5 5",
    "1 2 3",
    "1h 1h",
    "1 h 2",
    "10 min 3 s",
    " 5s ",
    "\t5s",
    "5s\n",
    "+5",
    "5 +3",
    "1hr",
    "1hours",
    "4 minutes",
    "6 second",
    "2 years",
    "3 weeks",
    "1 month",
    "5m",
    "5 m",
    "2.5min",
    "18446744073s",
    "",
    "-5",
    "-0",
    "5min-3s",
    "5 + 3",
    "1.5.3s",
    "5.s",
    "1.h",
    ".",
    "+",
    "s",
    "5 s s",
    "1e3",
    "0x10",
    "1_000",
    "5S",
    "5H",
    "5ns",
    "5secs",
    "5mins",
    "5ss",
    "1h,",
    "\u0661s",  # an Arabic-Indic digit is not a digit to systemd
    "9223372036854775807",
    "18446744073709s",
]


@needs_systemd_analyze
class TestParseAgreesWithSystemd:
    """Whatever systemd reads as N microseconds, stackd reads as N microseconds; what it
    refuses, stackd refuses."""

    @pytest.mark.parametrize("span", SYSTEMD_TABLE)
    def test_table(self, span: str) -> None:
        expected = systemd_usec(span)
        if expected is None:
            with pytest.raises(ValueError, match="give seconds"):
                parse_duration(span)
        else:
            # parse_duration divides whole microseconds by 10**6, so equal floats, equal spans
            assert parse_duration(span) == expected / 1_000_000

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.integers(0, 10_000),
                st.none() | st.text("0123456789", min_size=1, max_size=8),
                st.sampled_from(["", " "]),
                st.sampled_from(
                    [
                        "",
                        "s",
                        "sec",
                        "seconds",
                        "min",
                        "minutes",
                        "m",
                        "ms",
                        "msec",
                        "us",
                        "h",
                        "hr",
                        "hours",
                        "d",
                        "days",
                        "w",
                        "weeks",
                        "M",
                        "months",
                        "y",
                        "years",
                    ]
                ),
            ),
            min_size=1,
            max_size=4,
        ),
        st.sampled_from([" ", "", "  "]),
    )
    def test_generated_spans(
        self, tokens: list[tuple[int, str | None, str, str]], separator: str
    ) -> None:
        span = separator.join(
            f"{whole}{'' if fraction is None else '.' + fraction}{gap}{unit}"
            for whole, fraction, gap, unit in tokens
        )
        expected = systemd_usec(span)
        if expected is None:
            with pytest.raises(ValueError, match="give seconds"):
                parse_duration(span)
        else:
            # parse_duration divides whole microseconds by 10**6, so equal floats, equal spans
            assert parse_duration(span) == expected / 1_000_000


class TestFormat:
    """format_duration writes what systemd writes, and systemd reads it back exactly."""

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (0, "0"),
            (0.0000001, "0"),
            (1e-6, "1us"),
            (0.001, "1ms"),
            (0.001005, "1.005ms"),
            (1.5, "1.5s"),
            (59.999999, "59.999999s"),
            (60, "1min"),
            (61.5, "1min 1.5s"),
            (90, "1min 30s"),
            (150, "2min 30s"),
            (1800, "30min"),
            (5400, "1h 30min"),
            (86400, "1d"),
            (604800.000001, "1w 1us"),
            (2629800, "1month"),
            (31557600, "1y"),
            (3944700, "1month 2w 1d 5h 15min"),
        ],
    )
    def test_text(self, seconds: float, text: str) -> None:
        assert format_duration(seconds) == text

    @pytest.mark.parametrize("seconds", [-1, math.inf, math.nan])
    def test_refuses_what_is_not_a_duration(self, seconds: float) -> None:
        with pytest.raises(ValueError, match="must be finite and >= 0"):
            format_duration(seconds)

    @settings(max_examples=300)
    @given(st.integers(0, 10**15))
    def test_round_trip(self, usec: int) -> None:
        assert usec_of(format_duration(usec / 1_000_000)) == usec

    @needs_systemd_analyze
    @pytest.mark.parametrize(
        "usec",
        [
            0,
            1,
            7,
            999,
            1000,
            1005,
            1_500_000,
            59_999_999,
            60_000_000,
            61_500_000,
            90_000_000,
            5_400_000_000,
            604_800_000_001,
            3_944_700_000_000,
            18_446_744_073_000_000,
        ],
    )
    def test_matches_systemd_format_timespan(self, usec: int) -> None:
        ours = format_duration(usec / 1_000_000)
        # systemd pads fractions to full precision ("1.500000s"); stackd drops the zeros.
        theirs = re.sub(r"(\.\d*?)0+([a-z])", r"\1\2", systemd_human(usec)).replace(".s", "s")
        assert ours == theirs
        assert systemd_usec(ours) == usec
