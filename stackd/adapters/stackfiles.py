"""Reads what a stack's units depend on: its directory, compose files and env file paths.

Compose files are hashed (their content is part of what the stack is); env files are only
checked for presence and readability: their contents are secrets, never read here.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from stackd.core.models import StackSpec

__all__ = ["DEFAULT_COMPOSE_FILES", "StackFiles", "inspect_stack"]

# What compose looks for when no -f is given, in its own order.
DEFAULT_COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")


@dataclass(frozen=True, slots=True)
class StackFiles:
    """What was found for one stack. `problems` are config findings (stack in error)."""

    compose_digest: str
    env_files: tuple[Path, ...]
    legacy_fallback: tuple[tuple[str, str], ...]  # (missing env file, legacy file used)
    problems: tuple[tuple[str, str], ...]  # (path, reason)


def _readable_file(path: Path) -> str | None:
    """Why `path` cannot serve as a file to read, or None when it can."""
    try:
        if not path.exists():
            return "does not exist"
        if path.is_dir():
            return "is a directory, not a file"
        if not os.access(path, os.R_OK):
            return "is not readable"
    except OSError as exc:
        return f"cannot be checked: {exc.strerror}"
    return None


def _unreadable(exc: OSError) -> str:
    """Why a file could not be read, worded as `_readable_file` words it."""
    if exc.errno == errno.ENOENT:
        return "does not exist"
    if exc.errno == errno.EISDIR:
        return "is a directory, not a file"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "is not readable"
    return f"cannot be read: {exc.strerror}"


def inspect_stack(stack: StackSpec) -> StackFiles:
    """The stack's files as its units would use them. A compose file is read in one step (no
    stat first): 500 stacks are read on every `check --offline`."""
    problems: list[tuple[str, str]] = []
    digest = hashlib.sha256()
    if not stack.directory.is_dir():
        problems.append((str(stack.directory), "stack directory does not exist"))
    else:
        names = stack.compose_files
        if not names:
            found = next(
                (n for n in DEFAULT_COMPOSE_FILES if (stack.directory / n).is_file()), None
            )
            names = (found,) if found else ()
        if not names:
            problems.append(
                (str(stack.directory), "no compose file (compose.yaml) in the stack directory")
            )
        for name in names:
            path = stack.directory / name
            try:
                content = path.read_bytes()
            except OSError as exc:
                problems.append((str(path), f"compose file {_unreadable(exc)}"))
                continue
            digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())

    env_files, fallback, env_problems = _resolve_env_files(stack)
    problems.extend(env_problems)
    return StackFiles(
        compose_digest=digest.hexdigest(),
        env_files=env_files,
        legacy_fallback=fallback,
        problems=tuple(problems),
    )


def _resolve_env_files(
    stack: StackSpec,
) -> tuple[tuple[Path, ...], tuple[tuple[str, str], ...], list[tuple[str, str]]]:
    """`env_files` when all are usable; else the legacy set as a whole, with a warning."""
    missing = [(str(p), why) for p in stack.env_files if (why := _readable_file(p)) is not None]
    if not missing:
        return stack.env_files, (), []
    if not stack.legacy_env_files:
        return (), (), [(path, f"env file {why}") for path, why in missing]
    legacy_missing = [
        (str(p), why) for p in stack.legacy_env_files if (why := _readable_file(p)) is not None
    ]
    if legacy_missing:
        problems = [(path, f"env file {why}") for path, why in missing]
        problems += [(path, f"legacy env file {why}") for path, why in legacy_missing]
        return (), (), problems
    fallback = tuple(
        (path, ", ".join(str(p) for p in stack.legacy_env_files)) for path, _ in missing
    )
    return stack.legacy_env_files, fallback, []
