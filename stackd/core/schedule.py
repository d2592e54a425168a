"""When the next update run starts: pure decisions over elapse times the calendar adapter
computed (`stackd.adapters.calendar`, which asks `systemd-analyze calendar`).

The rules follow systemd's timers: `OnCalendar=` gives the elapse, `RandomizedDelaySec=` adds a
uniformly drawn delay, and `Persistent=true` fires once at start when an elapse passed while
nothing was running. As with systemd, there is no catch-up before the first recorded run.
"""

from __future__ import annotations

from datetime import datetime, timedelta

__all__ = ["apply_randomized_delay", "missed_run"]


def missed_run(
    *,
    persistent: bool,
    last_run: datetime | None,
    elapse_after_last_run: datetime | None,
    now: datetime,
) -> bool:
    """Whether a scheduled run was missed and is due now as a catch-up.

    `last_run` is when the schedule last started a run (kept in the history);
    `elapse_after_last_run` is the schedule's first elapse strictly after it (None: the
    expression never elapses again). Missed means that elapse is not in the future.
    """
    if not persistent or last_run is None or elapse_after_last_run is None:
        return False
    return elapse_after_last_run <= now


def apply_randomized_delay(next_elapse: datetime, delay_s: float, rng_value: float) -> datetime:
    """`next_elapse` pushed back by `delay_s * rng_value`; the caller draws `rng_value` from
    [0, 1) (e.g. `random.random()`), which keeps this function deterministic."""
    if delay_s < 0:
        raise ValueError(f"randomized delay must not be negative, got {delay_s}")
    if not 0.0 <= rng_value <= 1.0:
        raise ValueError(f"rng_value must be within [0, 1], got {rng_value}")
    return next_elapse + timedelta(seconds=delay_s * rng_value)
