"""Load, the CI-sized version of bench/load.py: 100 stacks, 300 GetStatus calls in flight.

Three client processes (bench/load.py's client) each pipeline 100 calls on their own
connection. What must hold whatever the machine's speed: every call answered with a valid
status document, no connection dropped (the daemon's included: dbus-fast drops a connection
whose write hits EAGAIN, which a burst of big replies provokes), and the daemon's memory back
near its baseline afterwards. Latency targets are the bench's business (bench/README.md).
"""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from dbus_fast import NameFlag, RequestNameReply
from helpers import REPO, stackd_events, stacks_config, start_stackd
from sandbox import Sandbox

from stackd.adapters.bus import connect_user_bus
from stackd.api import DaemonApi

sys.path.insert(0, str(REPO / "bench"))
from load import (
    Clients,
    FormResult,
    burst_calls,
    settle_rss,
    vm_rss_kib,
)

STACKS = 100
CLIENTS = 3
IN_FLIGHT = 100
RSS_SLACK_KIB = 16 * 1024  # generous: a shared CI machine, a Python heap


def _owner(sandbox: Sandbox) -> str:
    out = sandbox.run(
        "busctl",
        "--user",
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetNameOwner",
        "s",
        "io.stackd.Daemon1",
    )
    return out.stdout.strip()


@pytest.mark.timeout(300)
class TestGetStatusBursts:
    """Bursts of concurrent GetStatus calls: all answered, nothing dropped, memory returns."""

    def test_bursts_are_answered_without_dropping_a_connection(self, sandbox: Sandbox) -> None:
        names = [f"s{i:04d}" for i in range(STACKS)]
        stacks_config(sandbox, names)
        start_stackd(sandbox)
        units = [f"{n}.service" for n in names]

        def all_active() -> bool:
            out = sandbox.systemctl("show", "-p", "ActiveState", "--value", *units, check=False)
            return out.stdout.split().count("active") == STACKS

        sandbox.wait_for(all_active, timeout=180, interval=0.5, what=f"{STACKS} stacks active")
        pid = int(sandbox.systemctl("show", "-p", "MainPID", "--value", "stackd.service").stdout)
        owner = _owner(sandbox)

        with Clients.start(CLIENTS, sandbox.bus_address, sandbox.env) as clients:
            for form in ("stack", "full"):  # warm-up: caches built, heap grown once
                clients.burst(burst_calls(form, names, CLIENTS, 4))
            baseline = vm_rss_kib(pid)
            results: list[FormResult] = []
            for form in ("stack", "full", "stack"):
                result = FormResult(form)
                for i in range(3):
                    result.add(clients.burst(burst_calls(form, names, CLIENTS, IN_FLIGHT, i * 37)))
                results.append(result)
            after, _ = settle_rss(pid, baseline, RSS_SLACK_KIB, timeout=15)

        for result in results:
            assert result.dropped == [], (result.form, result.dropped)
            assert result.answered == result.sent == CLIENTS * IN_FLIGHT * 3, result.form
            assert result.error_count == 0, (result.form, result.errors[:5])
            assert len(result.latencies_ms) == result.sent
        assert results[1].reply_bytes > 20 * results[0].reply_bytes  # the full document
        assert _owner(sandbox) == owner, "the daemon lost its bus connection"
        assert stackd_events(sandbox, "manager.unavailable") == []
        assert after <= baseline + RSS_SLACK_KIB, (baseline, after)


class _BigAnswers:
    """A backend whose full status is ~1 MiB: larger than any socket buffer."""

    def __init__(self) -> None:
        self.full = json.dumps(
            {"version": 1, "daemon": {}, "stacks": [{"name": "big", "pad": "x" * (1 << 20)}]}
        )

    def status_json(self, stacks: list[str]) -> str:
        if not stacks:
            return self.full
        return json.dumps({"version": 1, "daemon": {}, "stacks": [{"name": n} for n in stacks]})

    async def check_json(self) -> str:
        return "{}"

    async def start_update(self, stacks: list[str]) -> str:
        return "{}"

    def history_json(self, limit: int) -> str:
        return "{}"

    async def reload_json(self) -> str:
        return "{}"


class TestBigAnswersOnOneConnection:
    """Answers larger than the socket buffer, mixed with small ones and signals, never make
    the API's connection drop (dbus-fast's writer would on EAGAIN) and all arrive whole."""

    async def test_burst_of_big_answers_keeps_the_connection(self, sandbox: Sandbox) -> None:
        bus = await connect_user_bus(sandbox.bus_address)
        try:
            reply = await bus.request_name("io.stackd.Daemon1", NameFlag.DO_NOT_QUEUE)
            assert reply is RequestNameReply.PRIMARY_OWNER
            api = DaemonApi(bus, _BigAnswers(), max_in_flight=8)
            clients = await asyncio.to_thread(Clients.start, 2, sandbox.bus_address, sandbox.env)
            try:
                names = ["a", "b", "c"]
                for form in ("full", "stack", "full"):
                    calls = burst_calls(form, names, 2, 40)
                    burst = asyncio.create_task(asyncio.to_thread(clients.burst, calls))
                    while not burst.done():  # signals on the same connection meanwhile
                        api.emit("UpdateProgress", {"pad": "y" * 4096})
                        await asyncio.sleep(0.001)
                    result = FormResult(form)
                    result.add(await burst)
                    assert result.dropped == [], result.dropped
                    assert result.error_count == 0, result.errors[:3]
                    assert result.answered == result.sent == 80
                    assert bus.connected
                    assert api.in_flight == 0
            finally:
                await asyncio.to_thread(clients.close)
        finally:
            bus.disconnect()
