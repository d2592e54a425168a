"""Benchmark live collision reports: a shadowing unit file -> `FindingRaised` on the bus.

Runs inside the test sandbox (a real `systemd --user`, session bus and journald in a private
mount namespace with a private /etc/systemd/user; root only): the daemon runs as the real
stackd.service unit with tests/support/fake-compose as compose provider, all N stacks started
(N stack units `<stack>.service`, plus their `-update` units).

Per trial, a SEPARATE writer process (a long-lived `python -c` child) copies one stack's unit
file from ~/.config/systemd/user into /etc/systemd/user (open/write/close, like `cp`): the
unit is now defined twice on the search path, a `shadowed` finding. A SEPARATE D-Bus client
process (a `python -c` jeepney listener, AddMatch on io.stackd.Daemon1) prints a
CLOCK_MONOTONIC timestamp per signal as soon as it is read off the socket. CLOCK_MONOTONIC is
system-wide, so the two processes' timestamps compare directly:

    detection = t(FindingRaised for that unit, kind shadowed) - t(writer, just before open())
    clearing  = t(FindingCleared for it)                      - t(writer, just before unlink())

Each trial takes a different stack (a seeded shuffle of all N, cycled when trials > N), and
waits a random 100-200 ms after each signal so trials are independent and never phase-locked
to a timer. Percentiles are nearest-rank (p99 of 100 samples = the 99th smallest).

Targets, with 500 stacks: detection p50 <= 20 ms, p99 <= 100 ms.

Per trial the daemon's own CPU time (sum of /proc/PID/task/*/schedstat from the write to the
end of the gap after the signal) is recorded too: unlike wall latency it does not depend on
what else runs on the machine. After the trials, the daemon's verification
(`compute_findings` and its parts) is run in this process on the same files and timed (CPU).

Idle cost, with 50 stacks (after every stack is active and the daemon had 5 s to settle,
before the trials): VmRSS of the daemon's MainPID (max over the window, sampled each second
from /proc, which does not wake the daemon) and CPU seconds (utime+stime of /proc/PID/stat, in
clock ticks; also the sum of /proc/PID/task/*/schedstat, ns precision, and context switches)
over 60 idle seconds. Targets: <= 45 MiB RSS, <= 50 ms CPU per idle minute.

    sudo .venv/bin/python bench/watch.py [--quick] [--trials 100] [--sizes 50,500]
        [--idle 60] [--idle-sizes 50] [--py-spy /tmp/benchvenv/bin/py-spy]
        [--daemon-pythonpath /tmp/stackd-patched]

`--quick`: 20 trials per size, 20 s idle. `--py-spy PATH` also records the daemon with py-spy
during the trials of each size (collapsed stacks in /tmp/stackd-watch-<N>.collapsed.txt).
`--daemon-pythonpath DIR` runs the daemon (and the in-process breakdown) from a patched copy
of the `stackd` package in DIR, for A/B runs without touching the checkout. Exit status 0
whether or not targets are met (the tables say which).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The private mount namespace first: unshare(CLONE_NEWNS) refuses a process with a second
# thread, so this runs before anything else is imported or started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sandbox import enter_private_mount_namespace

_NAMESPACE_PROBLEM = enter_private_mount_namespace()

import _sandbox as sbx  # noqa: E402

TARGET_P50_MS = 20.0
TARGET_P99_MS = 100.0
TARGET_SIZE = 500
TARGET_RSS_MIB = 45.0
TARGET_CPU_MS_PER_MIN = 50.0
SIGNAL_TIMEOUT_S = 5.0
SETTLE_S = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The D-Bus client: one line per signal of io.stackd.Daemon1, "<monotonic ns> <member> <json>".
LISTENER = r"""
import sys, time
from jeepney import HeaderFields, MatchRule, message_bus
from jeepney.io.blocking import open_dbus_connection

conn = open_dbus_connection(sys.argv[1])
rule = MatchRule(type="signal", interface="io.stackd.Daemon1", path="/io/stackd/Daemon1")
conn.send_and_get_reply(message_bus.AddMatch(rule))
out = sys.stdout
out.write("READY\n")
out.flush()
while True:
    msg = conn.receive()
    now = time.monotonic_ns()
    member = msg.header.fields.get(HeaderFields.member, "?")
    body = msg.body[0] if msg.body else ""
    out.write(f"{now} {member} {body}\n")
    out.flush()
"""

# The writer: reads "cp SRC DST" / "rm DST" lines, answers "<t_before> <t_after>" (monotonic ns)
# around the operation. The source is read before the clock starts; the copy is
# open(O_CREAT|O_TRUNC)/write/close as `cp` does it.
WRITER = r"""
import os, sys, time
for line in sys.stdin:
    op, *args = line.split()
    if op == "cp":
        with open(args[0], "rb") as f:
            data = f.read()
        before = time.monotonic_ns()
        fd = os.open(args[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.write(fd, data)
        os.close(fd)
    elif op == "rm":
        before = time.monotonic_ns()
        os.unlink(args[0])
    else:
        raise SystemExit(f"unknown op {op!r}")
    after = time.monotonic_ns()
    sys.stdout.write(f"{before} {after}\n")
    sys.stdout.flush()
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 trials per size, 20 s idle")
    p.add_argument("--trials", type=int, default=None, help="trials per size (default 100)")
    p.add_argument("--sizes", default="50,500", help="stack counts, comma separated")
    p.add_argument("--idle", type=float, default=None, help="idle window, s (default 60)")
    p.add_argument("--idle-sizes", default="50", help="sizes whose idle cost is measured")
    p.add_argument("--seed", type=int, default=1, help="seed of the stack order and gaps")
    p.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="PATH",
        help="py-spy executable: record the daemon during each size's trials",
    )
    p.add_argument(
        "--daemon-pythonpath",
        type=Path,
        default=None,
        metavar="DIR",
        help="put DIR first on the daemon's PYTHONPATH (a drop-in of stackd.service): A/B a "
        "patched copy of the stackd package without touching the checkout",
    )
    p.add_argument("--out", type=Path, default=Path("/tmp"), help="where py-spy output goes (/tmp)")
    return p.parse_args(argv)


# -- the two helper processes -----------------------------------------------------------------


@dataclass(frozen=True)
class Signal:
    t_ns: int
    member: str
    kind: str
    unit: str
    payload: dict[str, Any]


class Listener:
    """The separate D-Bus client; its lines are parsed by a reader thread into a queue."""

    def __init__(self, sandbox: sbx.Sandbox) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LISTENER, sandbox.bus_address],
            env=sandbox.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "READY":
            raise RuntimeError("the D-Bus listener did not start")
        self.signals: queue.Queue[Signal] = queue.Queue()
        self.unexpected: list[Signal] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            stamp, member, body = line.rstrip("\n").split(" ", 2)
            try:
                payload = json.loads(body)
            except ValueError:
                payload = {}
            self.signals.put(
                Signal(
                    int(stamp),
                    member,
                    str(payload.get("kind", "")),
                    str(payload.get("unit", "")),
                    payload,
                )
            )

    def wait(self, member: str, kind: str, unit: str, timeout: float) -> Signal | None:
        """The first matching signal within `timeout`; others are kept in `unexpected`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                sig = self.signals.get(timeout=left)
            except queue.Empty:
                break
            if (sig.member, sig.kind, sig.unit) == (member, kind, unit):
                return sig
            self.unexpected.append(sig)
        return None

    def drain(self, quiet: float = 0.2) -> list[Signal]:
        """Everything that arrives until the bus has been quiet for `quiet` seconds."""
        out = []
        while True:
            try:
                out.append(self.signals.get(timeout=quiet))
            except queue.Empty:
                return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Writer:
    """The separate writer process."""

    def __init__(self, sandbox: sbx.Sandbox) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER],
            env=sandbox.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def do(self, *words: str) -> tuple[int, int]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the writer died on {words}")
        before, after = line.split()
        return int(before), int(after)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- measurements -----------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Latencies:
    count: int
    raised_ms: list[float] = field(default_factory=list)
    cleared_ms: list[float] = field(default_factory=list)
    write_us: list[float] = field(default_factory=list)
    daemon_cpu_ms: list[float] = field(default_factory=list)  # per event, all its threads
    loadavg: list[float] = field(default_factory=list)  # 1-min load average per trial
    ticks_ms_per_event: float = 0.0  # utime+stime over all trials (incl. gaps) / events
    missed_raise: int = 0
    missed_clear: int = 0
    unexpected: int = 0
    unexpected_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class Idle:
    count: int
    seconds: float
    rss_start_kib: int
    rss_max_kib: int
    rss_end_kib: int
    hwm_kib: int
    cpu_ticks: int
    sched_ns: int
    ctx_switches: int
    threads: int

    @property
    def cpu_ms_per_min(self) -> float:
        return self.cpu_ticks * 1000 / CLK_TCK * 60 / self.seconds

    @property
    def sched_ms_per_min(self) -> float:
        return self.sched_ns / 1e6 * 60 / self.seconds

    @property
    def wakeups_per_min(self) -> float:
        return self.ctx_switches * 60 / self.seconds


def main_pid(sandbox: sbx.Sandbox) -> int:
    out = sandbox.systemctl("show", "-p", "MainPID", "--value", "stackd.service").stdout
    pid = int(out.strip() or 0)
    if pid <= 0:
        raise RuntimeError("stackd.service has no MainPID")
    return pid


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def kib(value: str) -> int:
    return int(value.split(maxsplit=1)[0])


def cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])  # fields 14 and 15: utime, stime


def task_totals(pid: int) -> tuple[int, int, int]:
    """(sum of schedstat run time ns, sum of context switches, threads) over all tasks."""
    run_ns = switches = threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            run_ns += int((task / "schedstat").read_text().split()[0])
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # a worker thread that just ended
        threads += 1
        for line in status.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    return run_ns, switches, threads


def measure_idle(pid: int, count: int, seconds: float) -> Idle:
    rss_start = kib(proc_status(pid)["VmRSS"])
    ticks0 = cpu_ticks(pid)
    sched0, ctx0, _ = task_totals(pid)
    started = time.monotonic()
    rss_max = rss_start
    while (left := started + seconds - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        rss_max = max(rss_max, kib(proc_status(pid)["VmRSS"]))
    elapsed = time.monotonic() - started
    ticks1 = cpu_ticks(pid)
    sched1, ctx1, threads = task_totals(pid)
    status = proc_status(pid)
    return Idle(
        count=count,
        seconds=elapsed,
        rss_start_kib=rss_start,
        rss_max_kib=max(rss_max, kib(status["VmRSS"])),
        rss_end_kib=kib(status["VmRSS"]),
        hwm_kib=kib(status["VmHWM"]),
        cpu_ticks=ticks1 - ticks0,
        sched_ns=sched1 - sched0,
        ctx_switches=ctx1 - ctx0,
        threads=threads,
    )


def run_trials(
    sandbox: sbx.Sandbox,
    count: int,
    *,
    pid: int,
    trials: int,
    rng: random.Random,
    listener: Listener,
) -> Latencies:
    unit_dir = sandbox.user_unit_dir
    etc = sandbox.etc_unit_dir
    order = sbx.stack_names(count)
    rng.shuffle(order)
    result = Latencies(count)
    writer = Writer(sandbox)
    created: set[Path] = set()
    listener.drain()
    ticks = cpu_ticks(pid)
    try:
        for i in range(trials):
            unit = f"{order[i % len(order)]}.service"
            src, dst = unit_dir / unit, etc / unit
            result.loadavg.append(float(Path("/proc/loadavg").read_text().split()[0]))
            cpu = task_totals(pid)[0]
            before, after = writer.do("cp", str(src), str(dst))
            created.add(dst)
            result.write_us.append((after - before) / 1000)
            sig = listener.wait("FindingRaised", "shadowed", unit, SIGNAL_TIMEOUT_S)
            if sig is None:
                result.missed_raise += 1
            else:
                result.raised_ms.append((sig.t_ns - before) / 1e6)
            time.sleep(rng.uniform(0.1, 0.2))
            cpu, previous = task_totals(pid)[0], cpu
            result.daemon_cpu_ms.append((cpu - previous) / 1e6)
            before, _ = writer.do("rm", str(dst))
            created.discard(dst)
            sig = listener.wait("FindingCleared", "shadowed", unit, SIGNAL_TIMEOUT_S)
            if sig is None:
                result.missed_clear += 1
            else:
                result.cleared_ms.append((sig.t_ns - before) / 1e6)
            time.sleep(rng.uniform(0.1, 0.2))
            result.daemon_cpu_ms.append((task_totals(pid)[0] - cpu) / 1e6)
        result.ticks_ms_per_event = (cpu_ticks(pid) - ticks) * 1000 / CLK_TCK / (2 * trials)
    finally:
        writer.close()
        for path in created:
            path.unlink(missing_ok=True)
    for sig in [*listener.unexpected, *listener.drain()]:
        result.unexpected += 1
        key = f"{sig.member}:{sig.kind}"
        result.unexpected_kinds[key] = result.unexpected_kinds.get(key, 0) + 1
    listener.unexpected.clear()
    return result


def findings_now(sandbox: sbx.Sandbox) -> list[dict[str, Any]]:
    doc = sbx.status_doc(sandbox)
    return list(doc["findings"]) if doc else []


class PySpy:
    """py-spy recording the daemon for the duration of a block (optional)."""

    def __init__(self, exe: Path | None, pid: int, out: Path, label: str) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.files: list[Path] = []
        if exe is None:
            return
        raw = out / f"stackd-watch-{label}.collapsed.txt"
        self.files = [raw]
        self.proc = subprocess.Popen(
            [
                *(str(exe), "record", "--pid", str(pid), "--rate", "1000", "--threads"),
                *("--format", "raw", "--output", str(raw)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _median_ms(fn: Any, runs: int) -> float:
    """Median CPU time of `fn` in this thread (user + system), ms: unlike wall time it does
    not grow when other processes compete for the cores."""
    samples = []
    for _ in range(runs):
        started = time.thread_time_ns()
        fn()
        samples.append((time.thread_time_ns() - started) / 1e6)
    return statistics.median(samples)


def breakdown(sandbox: sbx.Sandbox, count: int, runs: int) -> list[tuple[str, float]]:
    """The daemon's verification work (`compute_findings` and its parts), run in this process
    on the same files, search path and config: per inotify event (one stack's two units) and
    for every unit (after a daemon-reload, `stackd check`). Median CPU ms."""
    from stackd.adapters.unitdirs import scan
    from stackd.core.findings import FindingBook
    from stackd.core.models import UnitState
    from stackd.core.ownership import evaluate
    from stackd.core.render import read_marker
    from stackd.settings import load_config
    from stackd.verify import compute_findings, desired_units, expectations

    config = load_config(sandbox.home / ".config" / "stackd" / "config.toml", sandbox.env)
    search_path = sandbox.unit_path()
    unit_dir = str(config.daemon.unit_dir)
    desired = desired_units(config)
    units = expectations(config, desired)
    loaded = {
        name: UnitState(
            name=name,
            load_state="loaded",
            active_state="active",
            sub_state="exited",
            fragment_path=exp.expected_path,
        )
        for name, exp in units.items()
    }
    disk = scan(search_path, list(units), unit_dir)

    def run_evaluate(only: dict[str, Any]) -> list[Any]:
        return evaluate(
            units=only,
            disk=disk,
            loaded=loaded,
            unit_dir=unit_dir,
            allowed_dropin_dirs=[],
            manager_available=True,
            marker_of=read_marker,
        )

    def read_owned() -> None:
        for name in units:
            with open(os.path.join(unit_dir, name), encoding="utf-8") as f:
                f.read()

    findings = run_evaluate(units)
    book = FindingBook()
    book.replace(findings, datetime.now(UTC))
    one = sbx.stack_names(count)[0]
    pair = {u: units[u] for u in (f"{one}.service", f"{one}-update.service")}
    only = frozenset(pair)

    def expect_pair() -> dict[str, Any]:
        return {n: e for n, e in expectations(config, desired).items() if n in only}

    return [
        (
            "compute_findings(only=1 stack's 2 units): per inotify event",
            _median_ms(
                lambda: compute_findings(config, desired, search_path, loaded, True, only=only),
                runs,
            ),
        ),
        ("  expectations (builds every unit's, then filters)", _median_ms(expect_pair, runs)),
        ("  scan (2 units)", _median_ms(lambda: scan(search_path, list(pair), unit_dir), runs)),
        ("  evaluate (2 units)", _median_ms(lambda: run_evaluate(pair), runs)),
        ("  dict(loaded): copy of every unit's state", _median_ms(lambda: dict(loaded), runs)),
        (
            "compute_findings, every unit: reload, UnitFilesChanged, check",
            _median_ms(lambda: compute_findings(config, desired, search_path, loaded, True), runs),
        ),
        ("  scan (every unit)", _median_ms(lambda: scan(search_path, list(units), unit_dir), runs)),
        ("    of which: read every owned unit file", _median_ms(read_owned, runs)),
        ("  evaluate (every unit)", _median_ms(lambda: run_evaluate(units), runs)),
        (
            "FindingBook.replace (no change)",
            _median_ms(lambda: book.replace(findings, datetime.now(UTC)), runs),
        ),
        (
            "desired_units (renders every unit; per reconcile)",
            _median_ms(lambda: desired_units(config), runs),
        ),
    ]


# -- one size ---------------------------------------------------------------------------------


@dataclass
class SizeResult:
    count: int
    startup_s: float
    active_s: float
    baseline_findings: int
    latencies: Latencies
    idle: Idle | None
    profile: list[Path]
    parts: list[tuple[str, float]]


def bench_size(
    sandbox: sbx.Sandbox,
    count: int,
    *,
    args: argparse.Namespace,
    trials: int,
    idle_s: float,
    rng: random.Random,
) -> SizeResult:
    sbx.stop_stackd(sandbox)
    sbx.stacks_config(sandbox, count)
    if args.daemon_pythonpath is not None:
        dropin = sandbox.user_unit_dir / "stackd.service.d" / "50-bench-pythonpath.conf"
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(f"[Service]\nEnvironment=PYTHONPATH={args.daemon_pythonpath}\n")
    print(f"[{count} stacks] starting stackd.service ...", flush=True)
    startup = sbx.start_stackd(sandbox)
    active = sbx.wait_all_active(sandbox, count)
    print(f"[{count} stacks] all active after {startup + active:.1f} s; settling", flush=True)
    time.sleep(SETTLE_S)
    baseline = findings_now(sandbox)
    if baseline:
        kinds = sorted({f["kind"] for f in baseline})
        print(f"[{count} stacks] note: {len(baseline)} findings before the trials: {kinds}")
    pid = main_pid(sandbox)
    idle = None
    if str(count) in args.idle_sizes.split(","):
        print(f"[{count} stacks] idle for {idle_s:.0f} s (pid {pid})", flush=True)
        idle = measure_idle(pid, count, idle_s)
    listener = Listener(sandbox)
    spy = PySpy(args.py_spy, pid, args.out, str(count))
    try:
        print(f"[{count} stacks] {trials} trials", flush=True)
        latencies = run_trials(sandbox, count, pid=pid, trials=trials, rng=rng, listener=listener)
    finally:
        spy.stop()
        listener.close()
    parts = breakdown(sandbox, count, runs=5 if args.quick else 20)
    return SizeResult(count, startup, active, len(baseline), latencies, idle, spy.files, parts)


# -- report -----------------------------------------------------------------------------------


def fmt(ms: float) -> str:
    return f"{ms:.1f}"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(results: list[SizeResult], trials: int) -> bool:
    rows = []
    ok_all = True
    for r in results:
        lat = r.latencies
        for label, samples, missed in (
            ("detect (FindingRaised)", lat.raised_ms, lat.missed_raise),
            ("clear (FindingCleared)", lat.cleared_ms, lat.missed_clear),
        ):
            if not samples:
                rows.append([str(r.count), label, "0", "-", "-", "-", "-", "-", str(missed), ""])
                ok_all = False
                continue
            p50, p99 = percentile(samples, 50), percentile(samples, 99)
            target = ""
            if r.count == TARGET_SIZE and label.startswith("detect"):
                ok = p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS and missed == 0
                ok_all = ok_all and ok
                target = f"p50<={TARGET_P50_MS:.0f}, p99<={TARGET_P99_MS:.0f}: {verdict(ok)}"
            rows.append(
                [
                    str(r.count),
                    label,
                    str(len(samples)),
                    fmt(min(samples)),
                    fmt(p50),
                    fmt(statistics.mean(samples)),
                    fmt(percentile(samples, 99)),
                    fmt(max(samples)),
                    str(missed),
                    target,
                ]
            )
    sbx.print_table(
        f"file written/removed by another process -> signal read by another D-Bus client, ms "
        f"({trials} trials per size, a different stack per trial, nearest-rank percentiles)",
        ["stacks", "event", "n", "min", "p50", "mean", "p99", "max", "missed", "target"],
        rows,
    )

    rows = []
    for r in results:
        lat = r.latencies
        extra = ", ".join(f"{k} x{v}" for k, v in sorted(lat.unexpected_kinds.items()))
        rows.append(
            [
                str(r.count),
                f"{r.startup_s:.1f}",
                f"{r.active_s:.1f}",
                str(r.baseline_findings),
                fmt(statistics.median(lat.write_us)) if lat.write_us else "-",
                fmt(percentile(lat.daemon_cpu_ms, 50)) if lat.daemon_cpu_ms else "-",
                fmt(percentile(lat.daemon_cpu_ms, 99)) if lat.daemon_cpu_ms else "-",
                fmt(lat.ticks_ms_per_event),
                f"{statistics.mean(lat.loadavg):.1f}" if lat.loadavg else "-",
                f"{lat.unexpected} {extra}".strip(),
            ]
        )
    sbx.print_table(
        "context",
        [
            "stacks",
            "start s (READY)",
            "then all active s",
            "findings before",
            "writer cp us (p50)",
            "daemon CPU ms/event p50",
            "p99",
            "utime+stime ms/event",
            "load avg (1 min)",
            "other signals seen",
        ],
        rows,
    )

    idles = [r.idle for r in results if r.idle is not None]
    if idles:
        rows = []
        for idle in idles:
            rss = idle.rss_max_kib / 1024
            cpu = idle.cpu_ms_per_min
            rows.append(
                [
                    str(idle.count),
                    f"{idle.seconds:.0f}",
                    f"{idle.rss_start_kib / 1024:.1f}",
                    f"{rss:.1f}",
                    f"{idle.hwm_kib / 1024:.1f}",
                    f"{cpu:.0f}",
                    f"{idle.sched_ms_per_min:.1f}",
                    f"{idle.wakeups_per_min:.0f}",
                    str(idle.threads),
                    verdict(rss <= TARGET_RSS_MIB),
                    verdict(cpu <= TARGET_CPU_MS_PER_MIN),
                ]
            )
            if idle.count == 50:
                ok_all = ok_all and rss <= TARGET_RSS_MIB and cpu <= TARGET_CPU_MS_PER_MIN
        sbx.print_table(
            f"daemon idle cost (targets with 50 stacks: <= {TARGET_RSS_MIB:.0f} MiB RSS, "
            f"<= {TARGET_CPU_MS_PER_MIN:.0f} ms CPU per minute; CPU from utime+stime "
            f"in {1000 // CLK_TCK} ms ticks, schedstat in ns)",
            [
                "stacks",
                "window s",
                "RSS start MiB",
                "RSS max MiB",
                "VmHWM MiB",
                "CPU ms/min",
                "schedstat ms/min",
                "ctx switches/min",
                "threads",
                "RSS",
                "CPU",
            ],
            rows,
        )
    if results:
        labels = [label for label, _ in results[0].parts]
        rows = [[label, *(fmt(dict(r.parts)[label]) for r in results)] for label in labels]
        from stackd.adapters.inotify import UnitDirWatcher
        from stackd.reconcile import VERIFY_COALESCE_S

        window = inspect.signature(UnitDirWatcher).parameters["window"].default * 1000
        waits = f"{window:.1f} + {VERIFY_COALESCE_S * 1000:.1f}"
        rows.append(
            [
                "fixed waits (wall): inotify quiet window + VERIFY_COALESCE_S",
                *(waits for _ in results),
            ]
        )
        sbx.print_table(
            "where one event's time goes: the daemon's verification, run in this process on the "
            "same files, config and search path (median CPU ms, thread_time)",
            ["part", *(f"{r.count} stacks" for r in results)],
            rows,
        )
    for r in results:
        for path in r.profile:
            print(f"py-spy profile of the {r.count}-stack trials: {path}")
    return ok_all


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if _NAMESPACE_PROBLEM is not None:
        raise SystemExit(f"bench/watch: the sandbox is unavailable: {_NAMESPACE_PROBLEM}")
    if args.daemon_pythonpath is not None:  # the in-process breakdown uses the same copy
        sys.path.insert(0, str(args.daemon_pythonpath))
    trials = args.trials or (20 if args.quick else 100)
    idle_s = args.idle or (20.0 if args.quick else 60.0)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rng = random.Random(args.seed)  # noqa: S311 - a shuffle, not a secret
    results = []
    with sbx.world("bench/watch") as sandbox:
        for count in sizes:
            results.append(
                bench_size(sandbox, count, args=args, trials=trials, idle_s=idle_s, rng=rng)
            )
        sbx.stop_stackd(sandbox)
    ok = report(results, trials)
    print("\nall targets met" if ok else "\nsome targets MISSED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
