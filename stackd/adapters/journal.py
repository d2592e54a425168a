"""structlog configured for journald's native protocol, or for readable lines on stderr.

Call sites log events of the registry in `stackd.core.events`::

    structlog.get_logger().warning("finding.raised", unit=u, stack=s, kind=k, message="...")

and this module turns each into one journal entry: SYSLOG_IDENTIFIER=stackd, MESSAGE,
PRIORITY, STACKD_EVENT, MESSAGE_ID (registry events only), STACKD_STACK/UNIT/RUN and every
other keyword as STACKD_<UPPER_SNAKE>, plus CODE_FILE/CODE_LINE/CODE_FUNC.

Entries go to journald as datagrams on its native socket. An entry too big for one datagram
(EMSGSIZE) is written to a sealed memfd whose descriptor is passed with SCM_RIGHTS, the way
sd-journal does it; if that fails too, every field is cut to `TRUNCATE_FIELD_BYTES` and the
entry is sent again. Logging never raises into the caller: a full journald queue (EAGAIN,
ENOBUFS) drops the entry, journald gone (ENOENT, ECONNREFUSED, ...) writes a `<priority>`
prefixed line to stderr; both are counted in `JournalWriter.dropped`.

Exceptions are rendered as plain tracebacks (no frame locals: those could hold secrets).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from stackd.core.events import Priority, event_info
from stackd.errors import UsageError

__all__ = [
    "DEFAULT_JOURNAL_SOCKET",
    "LEVELS",
    "TRUNCATE_FIELD_BYTES",
    "JournalLogger",
    "JournalRenderer",
    "JournalWriter",
    "configure_logging",
    "encode_entry",
    "journal_available",
    "journal_field_name",
    "journal_fields",
    "journal_writer",
]

DEFAULT_JOURNAL_SOCKET: Final = Path("/run/systemd/journal/socket")
SYSLOG_IDENTIFIER: Final = "stackd"
# Cut applied to every field when even a memfd could not carry the entry.
TRUNCATE_FIELD_BYTES: Final = 16 * 1024
# What sd-journal asks for; the kernel caps it at net.core.wmem_max.
_SNDBUF_BYTES: Final = 8 * 1024 * 1024
_FIELD_NAME_MAX: Final = 64

LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# structlog method name -> syslog priority.
_PRIORITY_OF_METHOD: Final[Mapping[str, Priority]] = {
    "debug": Priority.DEBUG,
    "info": Priority.INFO,
    "msg": Priority.INFO,
    "warning": Priority.WARNING,
    "warn": Priority.WARNING,
    "error": Priority.ERR,
    "err": Priority.ERR,
    "exception": Priority.ERR,
    "critical": Priority.CRIT,
    "fatal": Priority.CRIT,
}

# Keys consumed into dedicated journal fields, never repeated as STACKD_<KEY>.
_CODE_KEYS: Final = {"pathname": "CODE_FILE", "lineno": "CODE_LINE", "func_name": "CODE_FUNC"}
_NOT_DETAILS: Final = frozenset({"event", "message", "exception", "stack_info", *_CODE_KEYS})

_BARE_VALUE = re.compile(r"[^\s\"'=]+")
_NOT_FIELD_CHAR = re.compile(r"[^A-Z0-9_]")

_CONTAINERS: Final = (list, tuple, dict, set, frozenset)

Field = tuple[str, str | bytes]


# -- pure part: event dict -> fields -> bytes ---------------------------------------------------


def journal_field_name(key: str) -> str:
    """`some-key` -> `STACKD_SOME_KEY`: only A-Z, 0-9 and _, at most 64 characters.

    `stack`, `unit` and `run` become the contract's STACKD_STACK/UNIT/RUN this way; a key
    already spelled as a field (`STACKD_RESULT`) keeps its name.
    """
    name = _NOT_FIELD_CHAR.sub("_", key.upper())
    if not name.startswith("STACKD_"):
        name = "STACKD_" + name
    return name[:_FIELD_NAME_MAX]


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _CONTAINERS):
        return json.dumps(
            sorted(value, key=str) if isinstance(value, set | frozenset) else value,
            default=str,
            ensure_ascii=False,
            separators=(",", ":"),
        )
    return str(value)


def _detail(key: str, value: object) -> str:
    text = _text(value)
    if not isinstance(value, _CONTAINERS) and not _BARE_VALUE.fullmatch(text):
        text = json.dumps(text, ensure_ascii=False)
    return f"{key}={text}"


def _message(event: str, event_dict: Mapping[str, Any]) -> str:
    given = event_dict.get("message")
    if given is not None:
        text = _text(given)
    else:
        info = event_info(event)
        head = info.summary if info is not None else event
        details = [
            _detail(k, v) for k, v in event_dict.items() if k not in _NOT_DETAILS and v is not None
        ]
        text = f"{head}: {' '.join(details)}" if details else head
    for extra in ("stack_info", "exception"):
        if event_dict.get(extra):
            text = f"{text}\n{_text(event_dict[extra]).rstrip()}"
    return text


def journal_fields(method_name: str, event_dict: Mapping[str, Any]) -> list[Field]:
    """The journal fields of one log call; `event_dict` is structlog's, after processing."""
    event = _text(event_dict.get("event", ""))
    info = event_info(event)
    priority = _PRIORITY_OF_METHOD.get(
        method_name, info.priority if info is not None else Priority.INFO
    )
    fields: list[Field] = [
        ("MESSAGE", _message(event, event_dict)),
        ("PRIORITY", str(int(priority))),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
        ("STACKD_EVENT", event),
    ]
    if info is not None:
        fields.append(("MESSAGE_ID", info.message_id))
    for key, value in event_dict.items():
        if value is None or key in _NOT_DETAILS:
            continue
        field = (journal_field_name(key), value if isinstance(value, bytes) else _text(value))
        if field not in fields:  # run= bound in context and STACKD_RUN= given: one field
            fields.append(field)
    fields.extend(
        (name, _text(event_dict[key])) for key, name in _CODE_KEYS.items() if key in event_dict
    )
    return fields


def encode_entry(fields: Iterable[Field]) -> bytes:
    """Serialize fields in journald's native format.

    `KEY=value\\n` for plain values; `KEY\\n<le64 length><bytes>\\n` for values holding a
    newline, which journald takes verbatim.
    """
    out = bytearray()
    for name, value in fields:
        data = _bytes(value)
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


def _bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        # Undecodable bytes from the OS (file names) come back as they were.
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace")


def _truncated(fields: Iterable[Field]) -> list[Field]:
    marker = b"\n[truncated by stackd]"
    cut: list[Field] = []
    for name, value in fields:
        data = _bytes(value)
        if len(data) > TRUNCATE_FIELD_BYTES:
            data = data[: TRUNCATE_FIELD_BYTES - len(marker)] + marker
        cut.append((name, data))
    return cut


# -- I/O part: the writer and the structlog glue ------------------------------------------------


class JournalWriter:
    """Sends entries to journald's native socket. Thread-safe; never raises from `send`."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] = DEFAULT_JOURNAL_SOCKET,
        *,
        fallback: TextIO | None = None,
        sndbuf: int = _SNDBUF_BYTES,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self._fallback = fallback
        self._sndbuf = sndbuf
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.dropped = 0
        """Entries that did not reach journald (dropped, or written to stderr instead)."""

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Non-blocking: a stalled journald must not stall the event loop.
                sock.setblocking(False)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
                self._sock = sock
            return self._sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def send(self, fields: Sequence[Field]) -> bool:
        """Send one entry; False when it did not reach journald."""
        try:
            self._socket().sendto(encode_entry(fields), self.socket_path)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                return self._send_large(fields)
            return self._failed(fields, exc)
        return True

    def _send_large(self, fields: Sequence[Field]) -> bool:
        try:
            self._send_memfd(encode_entry(fields))
        except OSError:
            try:
                self._socket().sendto(encode_entry(_truncated(fields)), self.socket_path)
            except OSError as exc:
                return self._failed(fields, exc)
        return True

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("stackd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # journald only reads a memfd sealed against any further change.
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            fds = array.array("i", [fd])
            self._socket().sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, self.socket_path
            )
        finally:
            os.close(fd)

    def _failed(self, fields: Sequence[Field], exc: OSError) -> bool:
        self.dropped += 1
        if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
            # journald is alive but behind: writing elsewhere would only add load.
            return False
        values = dict(fields)
        line = f"<{values.get('PRIORITY', '6')!s}>{values.get('MESSAGE', '')!s}\n"
        stream = self._fallback if self._fallback is not None else sys.stderr
        try:
            stream.write(line)
            stream.flush()
        except (OSError, ValueError):
            pass
        return False


class JournalLogger:
    """The structlog "logger" behind the journal chain: hands fields to a `JournalWriter`."""

    def __init__(self, writer: JournalWriter) -> None:
        self.writer = writer

    def msg(self, fields: Sequence[Field]) -> None:
        self.writer.send(fields)

    log = debug = info = warn = warning = err = error = exception = critical = fatal = msg


class JournalRenderer:
    """Final processor of the journal chain: the event dict becomes journal fields."""

    def __call__(
        self, logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> tuple[tuple[list[Field]], dict[str, Any]]:
        try:
            fields = journal_fields(method_name, event_dict)
        except Exception as exc:  # a value whose str() fails must not fail the caller
            event = str(event_dict.get("event", ""))
            fields = [
                ("MESSAGE", f"{event}: stackd could not render this entry ({type(exc).__name__})"),
                ("PRIORITY", str(int(_PRIORITY_OF_METHOD.get(method_name, Priority.INFO)))),
                ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
                ("STACKD_EVENT", event),
            ]
        return (fields,), {}


class _StreamLogger:
    """Writes rendered lines to a stream, swallowing a closed or broken stream."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def msg(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    log = debug = info = warn = warning = err = error = exception = critical = fatal = msg


# The writer configure_logging installed, under the key "writer".
_installed: dict[str, JournalWriter] = {}


def journal_writer() -> JournalWriter | None:
    """The writer `configure_logging` installed, None when logging to stderr (for status)."""
    return _installed.get("writer")


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def journal_available(
    *,
    environ: Mapping[str, str] | None = None,
    stderr_fd: int = 2,
    socket_path: str | os.PathLike[str] = DEFAULT_JOURNAL_SOCKET,
) -> bool:
    """Whether to log natively to journald.

    Yes when its socket exists and either stderr is the journal stream systemd connected us
    to (JOURNAL_STREAM matches stderr's device:inode) or stderr is not a terminal.
    """
    if not os.path.exists(socket_path):
        return False
    env = os.environ if environ is None else environ
    stream = env.get("JOURNAL_STREAM", "")
    if stream:
        try:
            st = os.fstat(stderr_fd)
        except OSError:
            pass
        else:
            if stream == f"{st.st_dev}:{st.st_ino}":
                return True
    return not _isatty(stderr_fd)


def configure_logging(
    *,
    journal: bool | None = None,
    level: str = "info",
    socket_path: str | os.PathLike[str] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for the whole process.

    `journal`: True for journald's native protocol, False for lines on `stream` (stderr by
    default), None to decide with `journal_available`. `socket_path` overrides journald's
    socket (tests, sandboxes). Loggers are not cached, so `structlog.testing.capture_logs()`
    keeps working after this call.
    """
    try:
        min_level = LEVELS[level.lower()]
    except KeyError:
        raise UsageError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}") from None
    path = DEFAULT_JOURNAL_SOCKET if socket_path is None else socket_path
    out = sys.stderr if stream is None else stream
    if journal is None:
        journal = journal_available(socket_path=path)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.StackInfoRenderer(),
    ]
    old = _installed.pop("writer", None)
    if journal:
        writer = _installed["writer"] = JournalWriter(path, fallback=stream)
        processors: list[Processor] = [
            *shared,
            structlog.processors.CallsiteParameterAdder(
                {
                    structlog.processors.CallsiteParameter.PATHNAME,
                    structlog.processors.CallsiteParameter.LINENO,
                    structlog.processors.CallsiteParameter.FUNC_NAME,
                },
                additional_ignores=[__name__],
            ),
            structlog.processors.format_exc_info,
            JournalRenderer(),
        ]

        def factory(*_: Any) -> Any:
            return JournalLogger(writer)

    else:
        colors = _stream_isatty(out)
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(
                colors=colors, exception_formatter=structlog.dev.plain_traceback
            ),
        ]

        def factory(*_: Any) -> Any:
            return _StreamLogger(out)

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        context_class=dict,
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    if old is not None:
        old.close()


def _stream_isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False
