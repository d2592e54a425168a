"""Calendar expressions (`OnCalendar=` syntax) evaluated by systemd itself.

`systemd-analyze calendar` is the reference implementation, so stackd asks it rather than
re-implementing the grammar: one short subprocess per question. Expressions are evaluated in
the daemon's local time zone, as the user manager would for a timer, unless `tz` says otherwise;
answers are returned in UTC.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from datetime import UTC, datetime

from stackd.core.schedule import missed_run
from stackd.errors import StackdError

__all__ = [
    "SYSTEMD_ANALYZE",
    "CalendarError",
    "missed_elapse",
    "next_elapse",
    "parse_next_elapse",
    "validate_calendar",
]

SYSTEMD_ANALYZE = "systemd-analyze"
_TIMEOUT_S = 10.0
_STAMP = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})")


class CalendarError(StackdError):
    """An expression systemd does not accept, or `systemd-analyze` could not answer."""


async def validate_calendar(expr: str) -> str | None:
    """None when systemd accepts `expr`, else why not (one line, for a config error)."""
    problem = _shape_problem(expr)
    if problem:
        return problem
    rc, _out, err = await _analyze(expr, None, None)
    if rc != 0:
        return _refusal(expr, err)
    return None


async def next_elapse(expr: str, after: datetime, *, tz: str | None = None) -> datetime | None:
    """The first elapse of `expr` strictly after `after`, in UTC; None if it never elapses.

    `tz` sets TZ for the evaluation (None: the daemon's own). Raises CalendarError for an
    expression systemd refuses.
    """
    if after.utcoffset() is None:
        raise ValueError(f"after must be timezone-aware, got {after!r}")
    problem = _shape_problem(expr)
    if problem:
        raise CalendarError(problem)
    rc, out, err = await _analyze(expr, after, tz)
    if rc != 0:
        raise CalendarError(_refusal(expr, err))
    return parse_next_elapse(out)


async def missed_elapse(
    expr: str, last_run: datetime | None, now: datetime, *, tz: str | None = None
) -> datetime | None:
    """The first elapse after `last_run` when it is not later than `now` (a run was missed
    while stackd was down), else None. systemd only looks forward, so this asks from
    `last_run` on instead of looking back from `now`."""
    due = await next_elapse(expr, last_run, tz=tz) if last_run is not None else None
    missed = missed_run(persistent=True, last_run=last_run, elapse_after_last_run=due, now=now)
    return due if missed else None


def parse_next_elapse(output: str) -> datetime | None:
    """The `Next elapse:` of `systemd-analyze calendar` output, in UTC.

    The `(in UTC):` line follows it whenever the local zone is not UTC-equivalent; without it,
    the local zone has offset 0 and `Next elapse:` itself is UTC (whatever its abbreviation).
    """
    lines = [line.strip() for line in output.splitlines()]
    for index, line in enumerate(lines):
        label, sep, value = line.partition(":")
        if not sep or label.strip() != "Next elapse":
            continue
        value = value.strip()
        if value == "never":
            return None
        following = lines[index + 1] if index + 1 < len(lines) else ""
        utc_label, utc_sep, utc_value = following.partition(":")
        if utc_sep and utc_label.strip() == "(in UTC)":
            value = utc_value.strip()
        match = _STAMP.search(value)
        if match is None:
            raise CalendarError(f"cannot read the next elapse from systemd-analyze: {value!r}")
        return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    raise CalendarError(f"systemd-analyze gave no 'Next elapse:' line: {output.strip()!r}")


def _shape_problem(expr: str) -> str | None:
    if not expr.strip():
        return "the calendar expression is empty"
    if any(ch in expr for ch in "\n\r\0"):
        return f"the calendar expression {expr!r} contains a line break or NUL"
    return None


def _refusal(expr: str, stderr: str) -> str:
    detail = stderr.strip().splitlines()[-1] if stderr.strip() else "refused"
    return f"{expr!r} is not a systemd calendar expression (OnCalendar= syntax): {detail}"


async def _analyze(expr: str, base: datetime | None, tz: str | None) -> tuple[int, str, str]:
    argv = [SYSTEMD_ANALYZE, "calendar", "--iterations=1"]
    if base is not None:
        argv.append(f"--base-time=@{base.timestamp():.6f}")
    argv += ["--", expr]
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C"}
    if tz is not None:
        env["TZ"] = tz
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        raise CalendarError(f"cannot run {SYSTEMD_ANALYZE}: {exc}") from exc
    try:
        async with asyncio.timeout(_TIMEOUT_S):
            out, err = await proc.communicate()
    except TimeoutError as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise CalendarError(f"{SYSTEMD_ANALYZE} calendar did not answer in {_TIMEOUT_S}s") from exc
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
