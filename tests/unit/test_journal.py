"""Journal output: the native protocol on a real datagram socket, and the stderr fallback."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from stackd.adapters.journal import (
    TRUNCATE_FIELD_BYTES,
    JournalWriter,
    configure_logging,
    encode_entry,
    journal_available,
    journal_field_name,
    journal_fields,
    journal_writer,
)
from stackd.core.events import Event
from stackd.errors import UsageError

Entry = dict[str, list[bytes]]


def parse_entry(data: bytes) -> Entry:
    """journald's reading of a native-protocol entry: `KEY=value\\n` or `KEY\\n<le64><bytes>\\n`."""
    fields: Entry = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            pos = end + 1
        else:
            key = line
            size = int.from_bytes(data[end + 1 : end + 9], "little")
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n", "binary field not terminated"
            pos = end + 10 + size
        fields.setdefault(key.decode("ascii"), []).append(value)
    return fields


def one(entry: Entry, key: str) -> str:
    values = entry[key]
    assert len(values) == 1, f"{key} appears {len(values)} times"
    return values[0].decode()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    writer = journal_writer()
    structlog.reset_defaults()
    if writer is not None:
        writer.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="stackd-j-") as d:
        yield Path(d)


class FakeJournal:
    """A bound datagram socket standing in for /run/systemd/journal/socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(5)

    def receive(self) -> tuple[bytes, Entry]:
        data = self.sock.recv(16 * 1024 * 1024)
        return data, parse_entry(data)

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(5)
        return True


@pytest.fixture
def journal(short_dir: Path) -> Iterator[FakeJournal]:
    fake = FakeJournal(short_dir / "journal.socket")
    yield fake
    fake.sock.close()


@pytest.fixture
def logged(journal: FakeJournal) -> FakeJournal:
    configure_logging(journal=True, socket_path=journal.path, stream=io.StringIO())
    return journal


class TestJournalEntries:
    """An event logged through structlog arrives as one entry with the contract's fields."""

    def test_registry_event_carries_identity_and_context_fields(self, logged: FakeJournal) -> None:
        structlog.get_logger().warning(
            "finding.raised",
            unit="web.service",
            stack="web",
            kind="shadowed",
            paths=["/etc/systemd/user/web.service"],
            message="web.service is shadowed by /etc/systemd/user/web.service",
        )
        _, entry = logged.receive()
        assert one(entry, "SYSLOG_IDENTIFIER") == "stackd"
        assert one(entry, "STACKD_EVENT") == "finding.raised"
        assert one(entry, "MESSAGE_ID") == Event.FINDING_RAISED.message_id
        assert one(entry, "PRIORITY") == "4"
        assert one(entry, "STACKD_STACK") == "web"
        assert one(entry, "STACKD_UNIT") == "web.service"
        assert one(entry, "STACKD_KIND") == "shadowed"
        assert one(entry, "STACKD_PATHS") == '["/etc/systemd/user/web.service"]'
        assert one(entry, "MESSAGE") == "web.service is shadowed by /etc/systemd/user/web.service"
        assert "STACKD_MESSAGE" not in entry

    def test_callsite_is_recorded_as_code_fields(self, logged: FakeJournal) -> None:
        structlog.get_logger().info("daemon.started", pid=42)
        _, entry = logged.receive()
        assert one(entry, "CODE_FILE") == __file__
        assert one(entry, "CODE_FUNC") == "test_callsite_is_recorded_as_code_fields"
        assert int(one(entry, "CODE_LINE")) > 0

    def test_multiline_message_uses_binary_form_and_round_trips(self, logged: FakeJournal) -> None:
        text = "update of web failed:\n  pull: manifest unknown\n\ttrailing = sign"
        structlog.get_logger().error("update.stack.finished", stack="web", message=text)
        raw, entry = logged.receive()
        assert b"MESSAGE\n" in raw
        assert one(entry, "MESSAGE") == text
        assert one(entry, "PRIORITY") == "3"

    def test_priority_follows_the_log_method(self, journal: FakeJournal) -> None:
        configure_logging(journal=True, socket_path=journal.path, level="debug")
        log = structlog.get_logger()
        expected = {"debug": "7", "info": "6", "warning": "4", "error": "3", "critical": "2"}
        for method, priority in expected.items():
            getattr(log, method)("reconcile.finished")
            assert one(journal.receive()[1], "PRIORITY") == priority

    def test_events_below_the_level_are_not_sent(self, logged: FakeJournal) -> None:
        log = structlog.get_logger()
        log.debug("reconcile.finished")
        log.info("daemon.stopping")
        _, entry = logged.receive()
        assert one(entry, "STACKD_EVENT") == "daemon.stopping"
        assert not logged.pending()

    def test_unknown_event_is_logged_without_message_id(self, logged: FakeJournal) -> None:
        structlog.get_logger().info("something.new", detail="x")
        _, entry = logged.receive()
        assert one(entry, "STACKD_EVENT") == "something.new"
        assert "MESSAGE_ID" not in entry
        assert one(entry, "MESSAGE") == "something.new: detail=x"

    def test_bound_context_reaches_the_entry(self, logged: FakeJournal) -> None:
        with structlog.contextvars.bound_contextvars(run="2024-05-01T03:00:00-1"):
            structlog.get_logger().info("update.started", stacks=["web", "db"])
        _, entry = logged.receive()
        assert one(entry, "STACKD_RUN") == "2024-05-01T03:00:00-1"
        assert one(entry, "STACKD_STACKS") == '["web","db"]'

    def test_exception_traceback_is_in_message_without_locals(self, logged: FakeJournal) -> None:
        def fail() -> None:
            secret = "hunter2"  # a local must never reach the journal
            raise RuntimeError("boom " + str(len(secret)))

        try:
            fail()
        except RuntimeError:
            structlog.get_logger().exception("reconcile.failed")
        raw, entry = logged.receive()
        message = one(entry, "MESSAGE")
        assert message.startswith("Reconciliation failed\nTraceback (most recent call last):")
        assert "RuntimeError: boom 7" in message
        assert one(entry, "PRIORITY") == "3"
        assert b"hunter2" not in raw

    def test_unrenderable_value_still_logs_the_event(self, logged: FakeJournal) -> None:
        class Broken:
            def __str__(self) -> str:
                raise RuntimeError("no text")

        structlog.get_logger().info("unit.written", unit=Broken())
        _, entry = logged.receive()
        assert one(entry, "STACKD_EVENT") == "unit.written"
        assert one(entry, "MESSAGE") == (
            "unit.written: stackd could not render this entry (RuntimeError)"
        )

    def test_undecodable_file_names_keep_their_bytes(self, logged: FakeJournal) -> None:
        path = os.fsdecode(b"/srv/caf\xe9")  # how Python hands out a Latin-1 file name
        structlog.get_logger().info("unit.written", path=path)
        assert logged.receive()[1]["STACKD_PATH"] == [b"/srv/caf\xe9"]

    def test_lone_surrogates_are_escaped_not_raised(self, logged: FakeJournal) -> None:
        structlog.get_logger().info("unit.written", path="/srv/\ud800")
        assert logged.receive()[1]["STACKD_PATH"] == [b"/srv/\\ud800"]

    def test_capture_logs_still_sees_events(self, logged: FakeJournal) -> None:
        with capture_logs() as logs:
            structlog.get_logger().info("unit.written", unit="web.service")
        assert logs == [{"event": "unit.written", "unit": "web.service", "log_level": "info"}]
        assert not logged.pending()


class TestJournalFields:
    """The pure mapping from a structlog event dict to journal fields."""

    def test_message_defaults_to_summary_and_details(self) -> None:
        fields = dict(journal_fields("info", {"event": "daemon.started", "pid": 7, "config": "/c"}))
        assert fields["MESSAGE"] == "stackd started: pid=7 config=/c"

    def test_detail_values_with_spaces_are_quoted(self) -> None:
        fields = dict(journal_fields("info", {"event": "config.reloaded", "config": "/a b/c"}))
        assert fields["MESSAGE"] == 'The stackd configuration was reloaded: config="/a b/c"'

    def test_none_values_are_left_out(self) -> None:
        fields = dict(journal_fields("info", {"event": "unit.removed", "stack": None}))
        assert "STACKD_STACK" not in fields
        assert fields["MESSAGE"] == "A stack unit file was removed"

    def test_plain_values_are_rendered_as_text(self) -> None:
        fields = dict(
            journal_fields(
                "info", {"event": "x", "ok": True, "n": 3, "tags": {"b", "a"}, "blob": b"\x00\x01"}
            )
        )
        assert fields["STACKD_OK"] == "true"
        assert fields["STACKD_N"] == "3"
        assert fields["STACKD_TAGS"] == '["a","b"]'
        assert fields["STACKD_BLOB"] == b"\x00\x01"

    def test_keys_already_named_as_fields_keep_their_name(self) -> None:
        fields = journal_fields(
            "info",
            {"event": "update.finished", "run": "r1", "STACKD_RUN": "r1", "STACKD_FAILED": "db"},
        )
        assert [f for f in fields if f[0] == "STACKD_RUN"] == [("STACKD_RUN", "r1")]
        assert ("STACKD_FAILED", "db") in fields

    @given(st.text(min_size=1, max_size=100))
    def test_field_names_are_valid_for_journald(self, key: str) -> None:
        assert re.fullmatch(r"STACKD_[A-Z0-9_]{0,57}", journal_field_name(key))


class TestEncoding:
    """encode_entry produces what journald parses back into the same fields."""

    @given(
        st.lists(
            st.tuples(
                st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True),
                st.one_of(st.text(), st.binary()),
            ),
            max_size=8,
        )
    )
    def test_round_trip(self, fields: list[tuple[str, str | bytes]]) -> None:
        parsed = parse_entry(encode_entry(fields))
        expected: Entry = {}
        for key, value in fields:
            data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
            expected.setdefault(key, []).append(data)
        assert parsed == expected


class TestJournalWriter:
    """Sending never raises; oversized entries travel in a sealed memfd."""

    def test_oversized_entry_is_passed_as_sealed_memfd(self, journal: FakeJournal) -> None:
        writer = JournalWriter(journal.path, sndbuf=16 * 1024)
        big = "x" * (512 * 1024) + "\nend"
        try:
            assert writer.send([("MESSAGE", big), ("STACKD_EVENT", "reconcile.failed")])
        finally:
            writer.close()
        payload, fds, _, _ = socket.recv_fds(journal.sock, 1024, 1)
        assert payload == b""
        assert len(fds) == 1
        try:
            seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
            required = (
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            )
            assert seals & required == required
            # journald maps the file from offset 0; the shared file offset is at its end.
            entry = parse_entry(os.pread(fds[0], os.fstat(fds[0]).st_size, 0))
        finally:
            os.close(fds[0])
        assert one(entry, "MESSAGE") == big
        assert one(entry, "STACKD_EVENT") == "reconcile.failed"
        assert writer.dropped == 0

    def test_oversized_entry_is_truncated_when_memfd_fails(
        self, journal: FakeJournal, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def no_memfd(name: str, flags: int = 0) -> int:
            raise PermissionError(1, "memfd_create denied")

        monkeypatch.setattr(os, "memfd_create", no_memfd)
        writer = JournalWriter(journal.path, sndbuf=16 * 1024)
        try:
            assert writer.send([("MESSAGE", "y" * (512 * 1024)), ("STACKD_EVENT", "e")])
        finally:
            writer.close()
        _, entry = journal.receive()
        message = entry["MESSAGE"][0]
        assert len(message) == TRUNCATE_FIELD_BYTES
        assert message.endswith(b"\n[truncated by stackd]")
        assert one(entry, "STACKD_EVENT") == "e"

    def test_journald_gone_falls_back_to_stderr_line(self, short_dir: Path) -> None:
        stream = io.StringIO()
        configure_logging(journal=True, socket_path=short_dir / "missing.socket", stream=stream)
        structlog.get_logger().error("state.write_failed", path="/var/lib/x")
        assert stream.getvalue() == (
            "<3>The stackd state file could not be written: path=/var/lib/x\n"
        )
        writer = journal_writer()
        assert writer is not None
        assert writer.dropped == 1

    def test_full_journald_queue_drops_and_counts(self, journal: FakeJournal) -> None:
        fallback = io.StringIO()
        writer = JournalWriter(journal.path, fallback=fallback)
        try:
            sent = 0
            for _ in range(100_000):
                if not writer.send([("MESSAGE", "m")]):
                    break
                sent += 1
        finally:
            writer.close()
        assert sent > 0
        assert writer.dropped == 1
        assert fallback.getvalue() == ""


class TestConsole:
    """Without journald, events are readable key=value lines, uncoloured off a terminal."""

    def test_line_has_level_event_and_keys(self) -> None:
        stream = io.StringIO()
        configure_logging(journal=False, stream=stream)
        log = structlog.get_logger()
        log.info("daemon.started", pid=42, config="/home/u/.config/stackd/config.toml")
        log.debug("reconcile.finished")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[info\s*\] daemon\.started\s+"
            r"config=/home/u/\.config/stackd/config\.toml pid=42",
            lines[0],
        )
        assert "\x1b" not in stream.getvalue()
        assert journal_writer() is None

    def test_exception_is_a_plain_traceback_without_locals(self) -> None:
        stream = io.StringIO()
        configure_logging(journal=False, stream=stream)

        def fail() -> None:
            secret = "hunter2"  # a local must never reach the log
            raise RuntimeError("boom " + str(len(secret)))

        try:
            fail()
        except RuntimeError:
            structlog.get_logger().exception("reconcile.failed")
        out = stream.getvalue()
        assert "Traceback (most recent call last):" in out
        assert "RuntimeError: boom 7" in out
        assert "hunter2" not in out

    def test_unknown_level_is_a_usage_error(self) -> None:
        with pytest.raises(UsageError, match="unknown log level 'loud'"):
            configure_logging(journal=False, level="loud")


class TestJournalAvailable:
    """Auto-detection: the socket must exist; JOURNAL_STREAM or a non-terminal stderr decide."""

    def test_no_socket_means_no_journal(self, short_dir: Path) -> None:
        r, w = os.pipe()
        try:
            assert not journal_available(
                environ={}, stderr_fd=w, socket_path=short_dir / "missing.socket"
            )
        finally:
            os.close(r)
            os.close(w)

    def test_matching_journal_stream_wins_over_a_terminal(self, journal: FakeJournal) -> None:
        leader, follower = pty.openpty()
        try:
            st = os.fstat(follower)
            env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
            assert journal_available(environ=env, stderr_fd=follower, socket_path=journal.path)
            assert not journal_available(
                environ={"JOURNAL_STREAM": "1:2"}, stderr_fd=follower, socket_path=journal.path
            )
        finally:
            os.close(leader)
            os.close(follower)

    def test_non_terminal_stderr_uses_the_journal(self, journal: FakeJournal) -> None:
        r, w = os.pipe()
        try:
            assert journal_available(environ={}, stderr_fd=w, socket_path=journal.path)
        finally:
            os.close(r)
            os.close(w)
