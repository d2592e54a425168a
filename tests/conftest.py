"""Shared fixtures: the real user-manager sandbox (see tests/sandbox.py for the recipe).

This module enters a private mount namespace *when it is imported*: ``unshare(CLONE_NEWNS)``
only works while the process has a single thread, and conftest import is the earliest point a
test suite controls. Mounting happens later, on first use of the ``sandbox`` fixture.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import (
    Sandbox,
    SandboxError,
    SandboxHost,
    enter_private_mount_namespace,
    namespace_status,
)

# As early as possible, before pytest-asyncio, hypothesis or a test starts a thread.
enter_private_mount_namespace()

_host = SandboxHost()
atexit.register(_host.teardown)  # a safety net; the session fixture tears down normally


def sandbox_unavailable(reason: str) -> None:
    """Skip a test that needs the sandbox, or fail it when ``CI=true`` (CI must run them all)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"sandbox unavailable under CI=true: {reason}", pytrace=False)
    pytest.skip(f"sandbox unavailable: {reason}")


@pytest.fixture(scope="session")
def sandbox_host() -> Iterator[SandboxHost]:
    """The session part of the sandbox: private mounts and the session cgroup.

    When it cannot be built, pytest caches the skip (or failure) for the rest of the session.
    """
    reason = namespace_status()
    if reason is not None:
        sandbox_unavailable(reason)
    try:
        _host.setup()
    except (OSError, SandboxError) as exc:
        try:
            _host.teardown()
        finally:
            sandbox_unavailable(f"cannot set up the sandbox: {exc}")
    yield _host
    _host.teardown()


@pytest.fixture
def sandbox(
    sandbox_host: SandboxHost,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[Sandbox]:
    """A fresh world for one test: journald, ``systemd --user``, session bus, own HOME.

    ``os.environ`` of the test process points at it for the duration of the test, so
    in-process D-Bus clients find the bus.
    """
    world = sandbox_host.new_world(tmp_path / "sandbox", request.node.nodeid)
    try:
        for key, value in world.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        yield world
    finally:
        sandbox_host.destroy(world)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the sandbox ``integration`` (unless it is already ``e2e``).

    So ``-m "not integration and not e2e"`` selects exactly the tests that need no root.
    """
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"sandbox", "sandbox_host"} and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _host.timings:
        terminalreporter.write_line(_host.summary())
