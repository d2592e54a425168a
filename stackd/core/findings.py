"""The set of current findings with the time each was first seen, and what changed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from stackd.core.models import Finding, TimedFinding

__all__ = ["FindingBook", "FindingDelta"]


@dataclass(frozen=True, slots=True)
class FindingDelta:
    raised: tuple[TimedFinding, ...] = ()
    cleared: tuple[TimedFinding, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.raised or self.cleared)


class FindingBook:
    """Findings by key, each keeping the `since` of its first sighting until it clears.

    Findings are replaced per *scope* (a predicate over findings): a re-evaluation of one
    unit replaces only that unit's findings, leaving the others (and their `since`) alone.
    """

    def __init__(self) -> None:
        self._current: dict[tuple[object, ...], TimedFinding] = {}

    @staticmethod
    def _key(finding: Finding) -> tuple[object, ...]:
        return (*finding.key, finding.source.value)

    def replace(
        self,
        findings: Iterable[Finding],
        now: datetime,
        scope: Callable[[Finding], bool] = lambda _f: True,
    ) -> FindingDelta:
        fresh = {self._key(f): f for f in findings}
        raised: list[TimedFinding] = []
        cleared: list[TimedFinding] = []
        for key, timed in list(self._current.items()):
            if scope(timed.finding) and key not in fresh:
                cleared.append(self._current.pop(key))
        for key, finding in fresh.items():
            old = self._current.get(key)
            if old is None:
                timed = TimedFinding(finding, now)
                self._current[key] = timed
                raised.append(timed)
            elif old.finding != finding:
                # Same condition, new wording or stack: keep the original `since`.
                self._current[key] = TimedFinding(finding, old.since)
        return FindingDelta(tuple(raised), tuple(cleared))

    def all(self) -> list[TimedFinding]:
        return sorted(
            self._current.values(),
            key=lambda t: (t.finding.unit, t.finding.kind.value, t.finding.paths),
        )

    def __len__(self) -> int:
        return len(self._current)
