"""Durations as seconds or systemd time spans, read and written the way systemd does.

`parse_duration` follows systemd's own parser (`parse_sec()`, systemd.time(7)) step by step, so a
value stackd accepts means the same to stackd as to the `TimeoutStartSec=` it renders: spans are
summed token by token, a number without a unit is seconds, fractions are truncated to whole
microseconds. The one deliberate difference: "infinity" is refused, every span here is finite.
"""

from __future__ import annotations

import math

__all__ = ["format_duration", "parse_duration"]

USEC_PER_SEC = 1_000_000
_USEC_PER_MINUTE = 60 * USEC_PER_SEC
_USEC_PER_HOUR = 60 * _USEC_PER_MINUTE
_USEC_PER_DAY = 24 * _USEC_PER_HOUR
_USEC_PER_WEEK = 7 * _USEC_PER_DAY
_USEC_PER_MONTH = 2_629_800 * USEC_PER_SEC  # 30.44 days
_USEC_PER_YEAR = 31_557_600 * USEC_PER_SEC  # 365.25 days
_USEC_INFINITY = 2**64 - 1  # systemd's usec_t sentinel: every span stays below it
_LLONG_MAX = 2**63 - 1

# systemd matches the first suffix in this order that the text starts with ("ms" before "m",
# "months" before "M"); a suffix is not a word, "5secs" reads as "5sec" followed by garbage.
_UNITS: tuple[tuple[str, int], ...] = (
    ("seconds", USEC_PER_SEC),
    ("second", USEC_PER_SEC),
    ("sec", USEC_PER_SEC),
    ("s", USEC_PER_SEC),
    ("minutes", _USEC_PER_MINUTE),
    ("minute", _USEC_PER_MINUTE),
    ("min", _USEC_PER_MINUTE),
    ("months", _USEC_PER_MONTH),
    ("month", _USEC_PER_MONTH),
    ("M", _USEC_PER_MONTH),
    ("msec", 1000),
    ("ms", 1000),
    ("m", _USEC_PER_MINUTE),
    ("hours", _USEC_PER_HOUR),
    ("hour", _USEC_PER_HOUR),
    ("hr", _USEC_PER_HOUR),
    ("h", _USEC_PER_HOUR),
    ("days", _USEC_PER_DAY),
    ("day", _USEC_PER_DAY),
    ("d", _USEC_PER_DAY),
    ("weeks", _USEC_PER_WEEK),
    ("week", _USEC_PER_WEEK),
    ("w", _USEC_PER_WEEK),
    ("years", _USEC_PER_YEAR),
    ("year", _USEC_PER_YEAR),
    ("y", _USEC_PER_YEAR),
    ("usec", 1),
    ("us", 1),
    ("\u00b5s", 1),  # MICRO SIGN
    ("\u03bcs", 1),  # GREEK SMALL LETTER MU
)
_UNIT_NAMES = frozenset(name for name, _ in _UNITS)

# Largest unit first, as systemd's format_timespan() writes them.
_FORMAT_UNITS: tuple[tuple[str, int], ...] = (
    ("y", _USEC_PER_YEAR),
    ("month", _USEC_PER_MONTH),
    ("w", _USEC_PER_WEEK),
    ("d", _USEC_PER_DAY),
    ("h", _USEC_PER_HOUR),
    ("min", _USEC_PER_MINUTE),
    ("s", USEC_PER_SEC),
    ("ms", 1000),
    ("us", 1),
)

_WHITESPACE = " \t\n\r"  # systemd's WHITESPACE, skipped between tokens
_C_SPACE = " \t\n\v\f\r"  # what strtoll() skips before a number
_DIGITS = "0123456789"
_EXAMPLE = "give seconds (90) or a systemd time span such as '2min 30s' or '1h 30min'"


def parse_duration(value: str | int | float) -> float:
    """Seconds in `value`: a number of seconds, a numeric string, or a systemd time span.

    Raises ValueError saying what is wrong and what would be accepted.
    """
    if isinstance(value, bool):  # bool is an int to Python, never a duration to a user
        raise ValueError(f"expected a duration, got {value!r}: {_EXAMPLE}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite duration: {_EXAMPLE}")
        if value < 0:
            raise ValueError(f"negative duration {value!r}: {_EXAMPLE}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration, got {type(value).__name__}: {_EXAMPLE}")
    return _parse_usec(value) / USEC_PER_SEC


def _parse_usec(text: str) -> int:
    """Microseconds in a systemd time span: a transcription of systemd's parse_time()."""
    stripped = text.strip(_WHITESPACE)
    if not stripped:
        raise ValueError(f"empty duration: {_EXAMPLE}")
    if stripped.startswith("infinity"):
        raise ValueError(f"{text!r}: an infinite duration is not accepted here; {_EXAMPLE}")
    total = 0
    pos = _skip(text, 0, _WHITESPACE)
    while pos < len(text):
        usec, pos = _parse_token(text, pos)
        total += usec
        if total >= _USEC_INFINITY:
            raise _too_large(text)
        pos = _skip(text, pos, _WHITESPACE)
    return total


def _parse_token(text: str, pos: int) -> tuple[int, int]:
    """One number with its optional unit at `pos`: (microseconds, where the next token starts)."""
    if text[pos] == "-":
        raise ValueError(f"negative duration {text!r}: {_EXAMPLE}")
    whole, after_number = _strtoll(text, pos)
    if whole < 0:
        raise ValueError(f"negative duration {text!r}: {_EXAMPLE}")
    fraction: str | None = None
    if after_number < len(text) and text[after_number] == ".":
        end = _skip(text, after_number + 1, _DIGITS)
        fraction, pos = text[after_number + 1 : end], end
    elif after_number == pos:
        raise _garbage(text)
    else:
        pos = after_number

    multiplier, unit_end = _match_unit(text, _skip(text, pos, _WHITESPACE))
    if unit_end == pos and unit_end != len(text):
        raise _garbage(text)  # neither a unit nor a separator after the number
    if whole >= _USEC_INFINITY // multiplier:
        raise _too_large(text)
    usec = whole * multiplier
    if fraction is not None:
        if not fraction:  # "3.", "3.s": a dot needs digits after it
            raise _garbage(text)
        step = multiplier // 10
        for digit in fraction:
            usec += int(digit) * step
            step //= 10
    return usec, unit_end


def _strtoll(text: str, pos: int) -> tuple[int, int]:
    """C's strtoll(): optional whitespace and sign, decimal digits; `pos` as end if no digits."""
    start = _skip(text, pos, _C_SPACE)
    sign = 1
    if start < len(text) and text[start] in "+-":
        sign = -1 if text[start] == "-" else 1
        start += 1
    end = _skip(text, start, _DIGITS)
    if end == start:
        return 0, pos
    if end - start > len(str(_LLONG_MAX)) or int(text[start:end]) > _LLONG_MAX:
        raise _too_large(text)
    return sign * int(text[start:end]), end


def _too_large(text: str) -> ValueError:
    return ValueError(f"{text!r} is too large a duration: {_EXAMPLE}")


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _match_unit(text: str, pos: int) -> tuple[int, int]:
    """(microseconds per unit, end of the unit) at `pos`; seconds and `pos` when there is none."""
    for suffix, usec in _UNITS:
        if text.startswith(suffix, pos):
            return usec, pos + len(suffix)
    return USEC_PER_SEC, pos


def _garbage(text: str) -> ValueError:
    """The error for text the parser cannot read, naming an unknown unit when there is one."""
    word = ""
    for char in text + " ":
        if char in _WHITESPACE or char in _DIGITS or char in ".+":
            if word and word not in _UNIT_NAMES:
                return ValueError(
                    f"unknown unit {word!r} in {text!r}: units are us, ms, s, min, h, d, w, "
                    f"M (months), y; {_EXAMPLE}"
                )
            word = ""
        else:
            word += char
    return ValueError(f"cannot read {text!r} as a duration: {_EXAMPLE}")


def format_duration(seconds: float) -> str:
    """A systemd time span for `seconds` ("2min 30s", "1.5s", "0") that systemd reads back exactly.

    Like systemd's format_timespan(): largest units first, and below a minute a remainder is
    written as a decimal fraction of the largest unit that fits (trailing zeros dropped).
    """
    if isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration: it must be finite and >= 0")
    usec = round(seconds * USEC_PER_SEC)
    if usec == 0:
        return "0"
    parts: list[str] = []
    for suffix, size in _FORMAT_UNITS:
        if usec == 0:
            break
        if usec < size:
            continue
        whole, rest = divmod(usec, size)
        if usec < _USEC_PER_MINUTE and rest > 0:
            digits = len(str(size)) - 1
            fraction = f"{rest:0{digits}d}".rstrip("0")
            parts.append(f"{whole}.{fraction}{suffix}")
            break
        parts.append(f"{whole}{suffix}")
        usec = rest
    return " ".join(parts)
