"""Load: bursts of concurrent GetStatus calls against a daemon that runs 500 stacks.

Runs inside the test sandbox (a real `systemd --user`, session bus and journald in a private
mount namespace; root only): the daemon runs as the real stackd.service unit with
tests/support/fake-compose as compose provider, and the bench waits until every stack unit is
active. Then `--clients` client processes each open one bus connection and, at a signal, all
put `--in-flight` GetStatus calls on the wire at once (pipelined: every call is sent before
the first reply is read), so `clients x in-flight` calls are in flight together. Per call the
client measures send -> reply (the timestamp of the recv that completed the reply).

Two forms of "a GetStatus call", measured separately:

- `stack`: GetStatus([name]), one stack's entry (~1 KB answer), names spread over all stacks;
- `full`:  GetStatus([]), the whole document (~hundreds of KB with 500 stacks);
- `ping`:  org.freedesktop.DBus.Peer.Ping on the daemon's object (answered inline, no JSON):
           the floor that the bus, the clients and dbus-fast's message handling cost here.

Also checked, per form: every answer is a method return with a valid status document (the
asked stack in it), no client connection dropped, the daemon kept its bus connection (the
unique name owning io.stackd.Daemon1 is the same before and after, and no
`manager.unavailable` event in the journal), and the daemon's VmRSS: baseline (after a warm-up),
peak during the bursts (sampled every 5 ms), and after a settle.

    sudo .venv/bin/python bench/load.py                   # 500 stacks, 4 x 250, 5 bursts per form
    sudo .venv/bin/python bench/load.py --stacks 100 --clients 3 --in-flight 100 --forms stack

Target: `stack` p99 <= 50 ms per call; the script exits 1 when missed, or on any dropped
connection, invalid answer, or RSS not back within --rss-slack-mib of its baseline.

`python bench/load.py client ADDRESS` is the client process (also used by
tests/integration/test_load.py): it reads one JSON burst spec per stdin line and prints one
JSON result per line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUS_NAME = "io.stackd.Daemon1"
OBJECT_PATH = "/io/stackd/Daemon1"
TARGET_P99_MS = 50.0


# -- the client process (no sandbox imports: it only needs jeepney and a bus address) --------


def _client(address: str) -> int:
    """Serve burst specs from stdin: {"names": [[...], ...]} -> one result line each."""
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection
    from jeepney.low_level import Parser

    conn = open_dbus_connection(address)
    daemon = DBusAddress(OBJECT_PATH, bus_name=BUS_NAME, interface=BUS_NAME)
    peer = DBusAddress(OBJECT_PATH, bus_name=BUS_NAME, interface="org.freedesktop.DBus.Peer")
    print(json.dumps({"ready": conn.unique_name}), flush=True)
    serial = 1000
    parser = Parser()
    for line in sys.stdin:
        spec = json.loads(line)
        if spec.get("quit"):
            break
        calls: list[list[str]] = spec["names"]
        first = serial + 1
        wire = []
        for number, names in enumerate(calls, start=first):
            msg = (
                new_method_call(peer, "Ping")
                if names == ["(ping)"]
                else new_method_call(daemon, "GetStatus", "as", (names,))
            )
            wire.append(msg.serialise(number))
        serial = first + len(calls)
        sent, received, dropped = _exchange(conn.sock, parser, wire, first)
        result = _summarize(calls, sent, received, first)
        result["dropped"] = dropped
        print(json.dumps(result), flush=True)
        if dropped:
            return 1
    conn.close()
    return 0


def _exchange(
    sock: socket.socket, parser: Any, wire: list[bytes], first: int
) -> tuple[list[float], dict[int, tuple[float, Any]], str]:
    """Send every message (one timestamp each), then read until each has its reply.

    A reply's time is when the recv that completed it returned; parsing happens after.
    """
    from jeepney.low_level import HeaderFields

    sent: list[float] = []
    received: dict[int, tuple[float, Any]] = {}
    for data in wire:
        sent.append(time.perf_counter())
        sock.sendall(data)
    last = first + len(wire) - 1
    try:
        while len(received) < len(wire):
            chunk = sock.recv(1 << 20)
            now = time.perf_counter()
            if not chunk:
                return sent, received, "the bus closed the connection"
            for msg in parser.feed(chunk):
                reply_to = msg.header.fields.get(HeaderFields.reply_serial, 0)
                if first <= reply_to <= last:
                    received[reply_to] = (now, msg)
    except OSError as exc:
        return sent, received, f"{type(exc).__name__}: {exc}"
    return sent, received, ""


def _summarize(
    calls: list[list[str]],
    sent: list[float],
    received: dict[int, tuple[float, Any]],
    first: int,
) -> dict[str, Any]:
    from jeepney import MessageType
    from jeepney.low_level import HeaderFields

    latencies: list[float] = []
    errors: list[str] = []
    reply_bytes = 0
    for index, names in enumerate(calls):
        got = received.get(first + index)
        if got is None:
            continue
        at, msg = got
        latencies.append((at - sent[index]) * 1000)
        if msg.header.message_type != MessageType.method_return:
            name = msg.header.fields.get(HeaderFields.error_name, "?")
            errors.append(f"{name}: {msg.body[0] if msg.body else ''}"[:300])
        elif names != ["(ping)"]:
            reply_bytes += len(msg.body[0])
            if problem := _invalid(msg.body[0], names):
                errors.append(problem)
    return {
        "sent": len(calls),
        "answered": len(received),
        "latencies_ms": latencies,
        "first_send": sent[0] if sent else 0.0,
        "last_reply": max((at for at, _ in received.values()), default=0.0),
        "errors": errors[:20],
        "error_count": len(errors),
        "reply_bytes": reply_bytes,
    }


def _invalid(text: str, names: list[str]) -> str:
    """Why `text` is not the status document asked for, or ""."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        return f"not JSON: {exc}"
    if not isinstance(doc, dict) or doc.get("version") != 1 or "daemon" not in doc:
        return f"not a status document: {text[:200]}"
    got = [s.get("name") for s in doc.get("stacks", [])]
    if names and got != names:
        return f"asked for {names}, got stacks {got[:5]}"
    if not names and not got:
        return "the full document lists no stacks"
    return ""


# -- the parent side: drives client processes ------------------------------------------------


@dataclass
class Clients:
    """`count` client processes, each with one bus connection of its own."""

    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, count: int, address: str, env: dict[str, str]) -> Clients:
        clients = cls()
        for _ in range(count):
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "client", address],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            clients.procs.append(proc)
        for proc in clients.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                clients.close()
                raise RuntimeError("a load client exited before it connected to the bus")
            clients.names.append(json.loads(line)["ready"])
        return clients

    def burst(self, calls_per_client: Sequence[list[list[str]]]) -> list[dict[str, Any]]:
        """Every client sends its calls at (nearly) the same moment; their results."""
        for proc, calls in zip(self.procs, calls_per_client, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"names": calls}) + "\n")
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.flush()
        results = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            results.append(
                json.loads(line)
                if line
                else {
                    "sent": 0,
                    "answered": 0,
                    "latencies_ms": [],
                    "errors": [],
                    "error_count": 0,
                    "reply_bytes": 0,
                    "dropped": "client exited",
                    "first_send": 0.0,
                    "last_reply": 0.0,
                }
            )
        return results

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write(json.dumps({"quit": True}) + "\n")
                    proc.stdin.close()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def burst_calls(
    form: str, stacks: Sequence[str], clients: int, in_flight: int, offset: int = 0
) -> list[list[list[str]]]:
    """Per client, the argument of each call: [] (full) or [one stack name], spread out."""
    if form == "full":
        return [[[] for _ in range(in_flight)] for _ in range(clients)]
    if form == "ping":
        return [[["(ping)"] for _ in range(in_flight)] for _ in range(clients)]
    out = []
    for c in range(clients):
        base = offset + c * in_flight
        out.append([[stacks[(base + i) % len(stacks)]] for i in range(in_flight)])
    return out


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """The peak VmRSS of `pid`, sampled every `interval` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = vm_rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, vm_rss_kib(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def settle_rss(pid: int, baseline: int, slack_kib: int, timeout: float) -> tuple[int, float]:
    """Wait (bounded) until VmRSS is within `slack_kib` of `baseline`: (last RSS, seconds)."""
    started = time.monotonic()
    rss = vm_rss_kib(pid)
    while rss > baseline + slack_kib and time.monotonic() - started < timeout:
        time.sleep(0.2)
        rss = vm_rss_kib(pid)
    return rss, time.monotonic() - started


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


@dataclass
class FormResult:
    form: str
    latencies_ms: list[float] = field(default_factory=list)
    burst_ms: list[float] = field(default_factory=list)
    sent: int = 0
    answered: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    dropped: list[str] = field(default_factory=list)
    reply_bytes: int = 0

    def add(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            self.latencies_ms += r["latencies_ms"]
            self.sent += r["sent"]
            self.answered += r["answered"]
            self.errors += r["errors"]
            self.error_count += r["error_count"]
            self.reply_bytes += r["reply_bytes"]
            if r["dropped"]:
                self.dropped.append(r["dropped"])
        starts = [r["first_send"] for r in results if r["first_send"]]
        ends = [r["last_reply"] for r in results if r["last_reply"]]
        if starts and ends:
            # Clients share the machine's monotonic perf_counter clock (CLOCK_MONOTONIC).
            self.burst_ms.append((max(ends) - min(starts)) * 1000)

    @property
    def ok(self) -> bool:
        return not self.dropped and not self.error_count and self.answered == self.sent


def run_form(
    clients: Clients,
    form: str,
    *,
    stacks: Sequence[str],
    in_flight: int,
    bursts: int,
    pause: float,
) -> FormResult:
    result = FormResult(form)
    for i in range(bursts):
        calls = burst_calls(form, stacks, len(clients.procs), in_flight, offset=i * 7919)
        result.add(clients.burst(calls))
        if result.dropped:
            break
        time.sleep(pause)
    return result


# -- the bench -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stacks", type=int, default=500)
    p.add_argument("--clients", type=int, default=4, help="client processes (connections)")
    p.add_argument("--in-flight", type=int, default=250, help="calls in flight per client")
    p.add_argument("--bursts", type=int, default=5, help="bursts per form")
    p.add_argument("--forms", default="ping,stack,full", help="ping, stack, full (comma separated)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between bursts")
    p.add_argument("--settle", type=float, default=10.0, help="max seconds for RSS to settle")
    p.add_argument("--rss-slack-mib", type=float, default=4.0)
    return p.parse_args(argv)


def daemon_owner(sandbox: Any) -> str:
    out = sandbox.run(
        "busctl",
        "--user",
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetNameOwner",
        "s",
        BUS_NAME,
        check=False,
    )
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import _sandbox as sbx  # the sandbox is only needed here, not in client processes

    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    slack_kib = int(args.rss_slack_mib * 1024)
    failures: list[str] = []
    rows: list[list[str]] = []
    with sbx.world("load") as sandbox:
        sbx.stacks_config(sandbox, args.stacks)
        start_s = sbx.start_stackd(sandbox)
        active_s = sbx.wait_all_active(sandbox, args.stacks, timeout=1800)
        pid = int(sandbox.systemctl("show", "-p", "MainPID", "--value", "stackd.service").stdout)
        print(
            f"{args.stacks} stacks: stackd.service started in {start_s:.1f}s, all active "
            f"{active_s:.1f}s later; daemon pid {pid}, VmRSS {vm_rss_kib(pid) / 1024:.1f} MiB"
        )
        owner = daemon_owner(sandbox)
        stacks = sbx.stack_names(args.stacks)
        with Clients.start(args.clients, sandbox.bus_address, sandbox.env) as clients:
            # Warm-up: one small burst of each form (first answers build caches).
            for form in forms:
                clients.burst(burst_calls(form, stacks, args.clients, 8))
            time.sleep(1.0)
            baseline = vm_rss_kib(pid)
            for form in forms:
                with RssSampler(pid) as sampler:
                    result = run_form(
                        clients,
                        form,
                        stacks=stacks,
                        in_flight=args.in_flight,
                        bursts=args.bursts,
                        pause=args.pause,
                    )
                after, settled_s = settle_rss(pid, baseline, slack_kib, args.settle)
                lat = result.latencies_ms or [float("nan")]
                p99 = percentile(lat, 99)
                calls = args.clients * args.in_flight
                rows.append(
                    [
                        form,
                        f"{calls} x {args.bursts}",
                        f"{result.reply_bytes / max(result.answered, 1) / 1024:.1f}",
                        f"{percentile(lat, 50):.1f}",
                        f"{percentile(lat, 90):.1f}",
                        f"{p99:.1f}",
                        f"{max(lat):.1f}",
                        f"{statistics.median(result.burst_ms or [float('nan')]):.0f}",
                        f"{calls / (statistics.median(result.burst_ms or [1.0]) / 1000):.0f}",
                        f"{result.answered}/{result.sent}",
                        str(result.error_count),
                        str(len(result.dropped)),
                        f"{baseline / 1024:.1f}",
                        f"{sampler.peak / 1024:.1f}",
                        f"{after / 1024:.1f} ({settled_s:.1f}s)",
                    ]
                )
                if not result.ok:
                    failures.append(
                        f"{form}: {result.answered}/{result.sent} answered, "
                        f"{result.error_count} invalid ({result.errors[:3]}), "
                        f"dropped: {result.dropped[:3]}"
                    )
                if form == "stack" and p99 > TARGET_P99_MS:
                    failures.append(f"stack: p99 {p99:.1f} ms > {TARGET_P99_MS} ms")
                if after > baseline + slack_kib:
                    failures.append(
                        f"{form}: VmRSS {after / 1024:.1f} MiB not back within "
                        f"{args.rss_slack_mib} MiB of {baseline / 1024:.1f} MiB"
                    )
        if daemon_owner(sandbox) != owner:
            failures.append(f"the daemon's bus connection changed ({owner} -> now)")
        lost = sbx.Sandbox.journal(
            sandbox, SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="manager.unavailable"
        )
        if lost:
            failures.append(f"{len(lost)} manager.unavailable events: {lost[0].get('MESSAGE')}")
        sbx.stop_stackd(sandbox)
    sbx.print_table(
        f"GetStatus load: {args.stacks} stacks, {args.clients} clients x {args.in_flight} calls "
        "in flight (pipelined), per-call send->reply",
        [
            "form",
            "calls x bursts",
            "reply KiB",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "burst ms",
            "calls/s",
            "answered",
            "invalid",
            "dropped",
            "RSS base MiB",
            "RSS peak MiB",
            "RSS after MiB",
        ],
        rows,
    )
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "client":
        sys.exit(_client(sys.argv[2]))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
