"""FindingBook: each condition is published once, keeps its `since`, clears by scope."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from stackd.core.findings import FindingBook
from stackd.core.models import Finding, FindingKind, FindingSource

T0 = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
SHADOW = Finding(FindingKind.SHADOWED, "web.service", ("/a", "/b"), "web", FindingSource.DISK)
STALE = Finding(FindingKind.STALE, "db.service", ("/c",), "db", FindingSource.MANAGER)


class TestFindingBook:
    def test_new_finding_is_raised_once(self) -> None:
        book = FindingBook()
        first = book.replace([SHADOW], T0)
        again = book.replace([SHADOW], T0 + timedelta(seconds=5))
        assert [t.finding for t in first.raised] == [SHADOW]
        assert not again
        assert book.all()[0].since == T0

    def test_gone_finding_is_cleared(self) -> None:
        book = FindingBook()
        book.replace([SHADOW, STALE], T0)
        delta = book.replace([STALE], T0)
        assert [t.finding for t in delta.cleared] == [SHADOW]
        assert [t.finding for t in book.all()] == [STALE]

    def test_scope_limits_what_can_clear(self) -> None:
        book = FindingBook()
        book.replace([SHADOW, STALE], T0)
        delta = book.replace([], T0, scope=lambda f: f.unit == "db.service")
        assert [t.finding for t in delta.cleared] == [STALE]
        assert [t.finding for t in book.all()] == [SHADOW]

    def test_same_condition_new_wording_keeps_since_and_is_not_raised(self) -> None:
        book = FindingBook()
        book.replace([SHADOW], T0)
        reworded = Finding(
            SHADOW.kind, SHADOW.unit, SHADOW.paths, "web", SHADOW.source, detail="new words"
        )
        delta = book.replace([reworded], T0 + timedelta(minutes=1))
        assert not delta
        assert book.all()[0].since == T0
        assert book.all()[0].finding.detail == "new words"

    def test_disk_and_manager_views_are_distinct(self) -> None:
        book = FindingBook()
        loaded = Finding(SHADOW.kind, SHADOW.unit, SHADOW.paths, "web", FindingSource.MANAGER)
        delta = book.replace([SHADOW, loaded], T0)
        assert len(delta.raised) == 2
        assert len(book) == 2
