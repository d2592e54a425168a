"""The event registry and contrib/systemd/stackd.catalog agree, and journalctl accepts it."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from stackd.core.events import EVENTS, Event, Priority, event_info

CATALOG = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "stackd.catalog"
ID = re.compile(r"[0-9a-f]{32}")
# Fields the journal writer gives their own names (stack=, unit=, run=).
SUBSTITUTABLE = {"STACKD_STACK", "STACKD_UNIT", "STACKD_RUN"}


@dataclass
class Entry:
    message_id: str
    headers: dict[str, str]
    body: str


def parse_catalog(text: str) -> list[Entry]:
    """journald's catalog format: `-- ID` lines, then `Key: value` headers, a blank line, body."""
    entries: list[Entry] = []
    current: list[str] | None = None
    message_id = ""

    def close() -> None:
        if current is None:
            return
        blank = current.index("")
        headers = dict(line.split(": ", 1) for line in current[:blank])
        entries.append(Entry(message_id, headers, "\n".join(current[blank + 1 :]).strip()))

    for line in text.splitlines():
        if line.startswith("-- "):
            close()
            message_id = line[3:].strip()
            current = []
        elif current is not None:
            current.append(line)
        else:
            assert not line or line.startswith("#"), f"payload before the first id: {line!r}"
    close()
    return entries


@pytest.fixture(scope="module")
def entries() -> list[Entry]:
    return parse_catalog(CATALOG.read_text(encoding="utf-8"))


class TestRegistry:
    """Every event has a distinct 128-bit id, a syslog priority and a one-line summary."""

    def test_every_event_is_registered(self) -> None:
        assert set(EVENTS) == set(Event)

    def test_ids_are_distinct_128_bit_hex(self) -> None:
        ids = [info.message_id for info in EVENTS.values()]
        assert all(ID.fullmatch(i) for i in ids)
        assert len(set(ids)) == len(ids)

    def test_summaries_are_single_lines(self) -> None:
        for event in Event:
            assert event.summary
            assert "\n" not in event.summary
            assert isinstance(event.priority, Priority)

    def test_lookup_by_name(self) -> None:
        info = event_info("update.finished")
        assert info is not None
        assert info.message_id == Event.UPDATE_FINISHED.message_id
        assert event_info("no.such.event") is None


class TestCatalogEntries:
    """One catalog entry per event, with the same id, and nothing else."""

    def test_ids_match_the_registry_one_to_one(self, entries: list[Entry]) -> None:
        counts = Counter(e.message_id for e in entries)
        assert [i for i, n in counts.items() if n > 1] == []
        assert set(counts) == {event.message_id for event in Event}

    def test_entries_are_defined_by_stackd_with_subject_and_body(
        self, entries: list[Entry]
    ) -> None:
        for entry in entries:
            assert ID.fullmatch(entry.message_id)
            assert entry.headers.get("Defined-By") == "stackd"
            assert entry.headers.get("Subject")
            assert set(entry.headers) <= {"Subject", "Defined-By", "Support", "Documentation"}
            assert len(entry.body) > 40, entry.message_id

    def test_substitutions_name_fields_the_writer_emits(self, entries: list[Entry]) -> None:
        for entry in entries:
            text = entry.headers["Subject"] + "\n" + entry.body
            assert set(re.findall(r"@([A-Za-z0-9_]+)@", text)) <= SUBSTITUTABLE


JOURNALCTL = shutil.which("journalctl")


def update_catalog(root: Path, text: str) -> subprocess.CompletedProcess[str]:
    directory = root / "usr" / "lib" / "systemd" / "catalog"
    directory.mkdir(parents=True)
    (directory / "stackd.catalog").write_text(text, encoding="utf-8")
    return subprocess.run(
        [JOURNALCTL or "journalctl", f"--root={root}", "--update-catalog"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.skipif(JOURNALCTL is None, reason="journalctl is not installed")
class TestJournalctl:
    """journalctl builds a catalog database from the file, in a private --root."""

    def test_update_and_list_catalog(self, tmp_path: Path, entries: list[Entry]) -> None:
        result = update_catalog(tmp_path, CATALOG.read_text(encoding="utf-8"))
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "var" / "lib" / "systemd" / "catalog" / "database").is_file()
        listed = subprocess.run(
            [JOURNALCTL or "journalctl", f"--root={tmp_path}", "--list-catalog"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
        expected = {f"{e.message_id} stackd: {e.headers['Subject']}" for e in entries}
        assert set(listed) == expected

    def test_a_malformed_catalog_is_rejected(self, tmp_path: Path) -> None:
        """Control: the check above would notice a file journalctl cannot parse."""
        result = update_catalog(tmp_path, "Subject: no id line\n\nbody\n")
        assert result.returncode != 0
        assert "payload before ID" in result.stderr
