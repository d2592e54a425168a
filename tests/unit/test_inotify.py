"""The inotify watcher on real directories: which units it reports, when, and how often."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from stackd.adapters.inotify import UnitDirWatcher

QUIET = 0.1  # how long "no callback" is awaited
WINDOW = 0.005  # the watcher's default coalescing window
DEADLINE = 1.0  # generous bound on any detection; the bench measures the real latency


@dataclass
class Recorder:
    """The `on_change` callback: remembers every call and when it happened."""

    calls: list[tuple[float, frozenset[str]]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, units: frozenset[str]) -> None:
        self.calls.append((time.monotonic(), units))
        self._changed.set()

    @property
    def seen(self) -> frozenset[str]:
        return frozenset().union(*(units for _, units in self.calls))

    def clear(self) -> None:
        self.calls.clear()

    async def until(self, expected: Iterable[str]) -> float:
        """Wait until every unit of `expected` was reported; returns the time it happened."""
        want = frozenset(expected)
        async with asyncio.timeout(DEADLINE):
            while not want <= self.seen:
                self._changed.clear()
                await self._changed.wait()
        return self.calls[-1][0]

    async def nothing(self, within: float = QUIET) -> None:
        await asyncio.sleep(within)
        assert self.calls == []


@dataclass
class World:
    hi: Path  # exists
    mid: Path  # missing, and so are two of its parents
    lo: Path  # exists
    outside: Path  # not on the search path
    watcher: UnitDirWatcher
    rec: Recorder

    @property
    def search_path(self) -> list[str]:
        return [str(self.hi), str(self.mid), str(self.lo)]

    def watch(self, *units: str) -> None:
        self.watcher.watch(self.search_path, units)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    hi, lo, outside = tmp_path / "hi", tmp_path / "lo", tmp_path / "outside"
    for d in (hi, lo, outside):
        d.mkdir()
    (tmp_path / "run").mkdir()
    rec = Recorder()
    with UnitDirWatcher(rec) as watcher:
        w = World(hi, tmp_path / "run" / "user" / "systemd" / "user", lo, outside, watcher, rec)
        w.watch("web.service", "api.service", "web-app.service", "web.timer")
        task = asyncio.create_task(watcher.run())
        try:
            yield w
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def write(path: Path, text: str = "[Service]\n") -> Path:
    path.write_text(text)
    return path


def inotify_fds() -> int:
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if _link(f"/proc/self/fd/{fd}") == "anon_inode:inotify")


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


class TestFragments:
    """Unit files in any search-path directory are reported by name, and only watched ones."""

    async def test_new_file_in_a_lower_dir(self, world: World) -> None:
        write(world.lo / "web.service")
        await world.rec.until({"web.service"})
        assert world.rec.seen == {"web.service"}

    async def test_unwatched_names_cause_no_callback(self, world: World) -> None:
        write(world.lo / "other.service")
        write(world.lo / ".web.service.swp")
        (world.lo / "other.service.d").mkdir()
        write(world.lo / "other.service.d" / "x.conf")
        write(world.outside / "web.service")
        await world.rec.nothing()

    async def test_mask_symlink_to_dev_null(self, world: World) -> None:
        (world.hi / "web.service").symlink_to("/dev/null")
        await world.rec.until({"web.service"})

    async def test_atomic_replace_by_rename(self, world: World) -> None:
        write(world.lo / "web.service")
        await world.rec.until({"web.service"})
        world.rec.clear()
        tmp = write(world.lo / ".web.service.tmp", "[Service]\nX=1\n")
        os.rename(tmp, world.lo / "web.service")
        await world.rec.until({"web.service"})
        assert world.rec.seen == {"web.service"}

    async def test_deletion(self, world: World) -> None:
        write(world.lo / "web.service")
        await world.rec.until({"web.service"})
        world.rec.clear()
        (world.lo / "web.service").unlink()
        await world.rec.until({"web.service"})

    async def test_rename_out_of_the_directory(self, world: World) -> None:
        write(world.lo / "api.service")
        await world.rec.until({"api.service"})
        world.rec.clear()
        os.rename(world.lo / "api.service", world.outside / "api.service")
        await world.rec.until({"api.service"})

    async def test_chmod(self, world: World) -> None:
        path = write(world.lo / "api.service")
        await world.rec.until({"api.service"})
        world.rec.clear()
        path.chmod(0o000)
        await world.rec.until({"api.service"})


class TestDropins:
    """Drop-in directories are watched as soon as they appear, however fast they fill."""

    async def test_directory_first_then_conf(self, world: World) -> None:
        (world.lo / "web.service.d").mkdir()
        await world.rec.until({"web.service"})
        assert str(world.lo / "web.service.d") in world.watcher.watched_directories()
        world.rec.clear()
        write(world.lo / "web.service.d" / "10-x.conf")
        await world.rec.until({"web.service"})
        assert world.rec.seen == {"web.service"}

    async def test_mkdir_and_write_at_once(self, world: World) -> None:
        dropin = world.hi / "api.service.d"
        dropin.mkdir()
        write(dropin / "10-x.conf")
        await world.rec.until({"api.service"})
        await asyncio.sleep(0.02)  # let the new watch settle, then prove it is live
        world.rec.clear()
        (dropin / "10-x.conf").unlink()
        await world.rec.until({"api.service"})

    async def test_filled_directory_moved_into_place(self, world: World) -> None:
        staged = world.outside / "web.service.d"
        staged.mkdir()
        write(staged / "10-x.conf")
        os.rename(staged, world.lo / "web.service.d")
        await world.rec.until({"web.service"})
        await asyncio.sleep(0.02)
        world.rec.clear()
        write(world.lo / "web.service.d" / "20-y.conf")
        await world.rec.until({"web.service"})

    async def test_conf_files_only(self, world: World) -> None:
        (world.lo / "web.service.d").mkdir()
        await world.rec.until({"web.service"})
        await asyncio.sleep(0.02)
        world.rec.clear()
        write(world.lo / "web.service.d" / "notes.txt")
        await world.rec.nothing()

    async def test_prefix_dropin(self, world: World) -> None:
        (world.lo / "web-.service.d").mkdir()
        write(world.lo / "web-.service.d" / "x.conf")
        await world.rec.until({"web-app.service"})
        assert world.rec.seen == {"web-app.service"}

    async def test_type_level_dropin_reaches_every_service(self, world: World) -> None:
        (world.lo / "service.d").mkdir()
        await world.rec.until({"web.service"})
        await asyncio.sleep(0.02)
        world.rec.clear()
        write(world.lo / "service.d" / "50-all.conf")
        await world.rec.until({"web.service", "api.service", "web-app.service"})
        assert "web.timer" not in world.rec.seen

    async def test_symlinked_dropin_dir_is_followed(self, world: World) -> None:
        shared = world.outside / "shared"
        shared.mkdir()
        (world.lo / "web.service.d").symlink_to(shared, target_is_directory=True)
        await world.rec.until({"web.service"})
        await asyncio.sleep(0.02)
        world.rec.clear()
        write(shared / "10-x.conf")
        await world.rec.until({"web.service"})

    async def test_removed_dropin_dir_is_reported_and_unwatched(self, world: World) -> None:
        dropin = world.lo / "web.service.d"
        dropin.mkdir()
        write(dropin / "10-x.conf")
        await world.rec.until({"web.service"})
        await asyncio.sleep(0.02)
        world.rec.clear()
        shutil.rmtree(dropin)
        await world.rec.until({"web.service"})
        await asyncio.sleep(0.02)
        assert str(dropin) not in world.watcher.watched_directories()


class TestMissingDirectories:
    """A search-path directory that does not exist yet is picked up when it is created."""

    async def test_parent_is_watched_until_then(self, world: World) -> None:
        watched = world.watcher.watched_directories()
        assert str(world.mid) not in watched
        assert str(world.mid.parents[2]) in watched  # tmp/run, the nearest existing ancestor

    async def test_created_with_a_unit_at_once(self, world: World) -> None:
        world.mid.mkdir(parents=True)
        write(world.mid / "web.service")
        await world.rec.until({"web.service"})
        assert str(world.mid) in world.watcher.watched_directories()
        assert str(world.mid.parents[2]) not in world.watcher.watched_directories()

    async def test_created_then_a_unit_later(self, world: World) -> None:
        world.mid.mkdir(parents=True)
        await asyncio.sleep(0.05)
        await world.rec.nothing(0)  # an empty new directory concerns no unit
        write(world.mid / "api.service")
        await world.rec.until({"api.service"})

    async def test_created_with_a_dropin_dir_inside(self, world: World) -> None:
        (world.mid / "web.service.d").mkdir(parents=True)
        write(world.mid / "web.service.d" / "10-x.conf")
        await world.rec.until({"web.service"})
        await asyncio.sleep(0.02)
        world.rec.clear()
        write(world.mid / "web.service.d" / "20-y.conf")
        await world.rec.until({"web.service"})

    async def test_search_dir_moved_away_and_back(self, world: World) -> None:
        write(world.lo / "web.service")
        await world.rec.until({"web.service"})
        world.rec.clear()
        os.rename(world.lo, world.outside / "lo")
        await world.rec.until({"web.service"})  # everything in it went away
        await asyncio.sleep(0.02)
        world.rec.clear()
        os.rename(world.outside / "lo", world.lo)
        await world.rec.until({"web.service"})
        await asyncio.sleep(0.02)
        world.rec.clear()
        write(world.lo / "api.service")
        await world.rec.until({"api.service"})

    async def test_search_dir_swapped_by_renames(self, world: World) -> None:
        """`mv lo lo.old && mv lo.new lo`: the path is watched again, not the old inode."""
        staged = world.outside / "lo.new"
        staged.mkdir()
        write(staged / "api.service")
        os.rename(world.lo, world.outside / "lo.old")
        os.rename(staged, world.lo)
        await world.rec.until({"api.service"})  # what the new directory brought along
        await asyncio.sleep(0.02)
        world.rec.clear()
        write(world.outside / "lo.old" / "web.service")  # the old one is no longer watched
        write(world.lo / "web-app.service")
        await world.rec.until({"web-app.service"})
        await asyncio.sleep(QUIET)
        assert world.rec.seen == {"web-app.service"}


class TestCoalescing:
    """Bursts become few callbacks whose union covers every unit touched."""

    async def test_burst_of_500_files_from_another_process(self, tmp_path: Path) -> None:
        units = [f"s{i:03}.service" for i in range(500)]
        rec = Recorder()
        writer = "import sys\nfor n in sys.argv[1:]:\n    open(n, 'w').write('[Service]\\n')\n"
        with UnitDirWatcher(rec) as watcher:
            watcher.watch([str(tmp_path)], units)
            task = asyncio.create_task(watcher.run())
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", writer, *(str(tmp_path / u) for u in units)
                )
                assert await proc.wait() == 0
                await rec.until(units)
                await asyncio.sleep(QUIET)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        assert rec.seen == set(units)
        # How many callbacks depends on how fast the writer runs (2-10 on an idle machine, more
        # when a loaded machine stretches the burst): never more than one per window.
        times = [t for t, _ in rec.calls]
        assert all(b - a >= 0.9 * WINDOW for a, b in itertools.pairwise(times))
        assert len(rec.calls) < len(units) / 4, [len(u) for _, u in rec.calls]

    async def test_burst_already_queued_is_one_callback(self, world: World) -> None:
        units = [f"s{i:03}.service" for i in range(500)]
        world.watch(*units)
        _write_all(world.lo, units)  # without yielding: all 500 events wait in the queue
        await world.rec.until(units)
        await asyncio.sleep(QUIET)
        assert len(world.rec.calls) == 1
        assert world.rec.seen == set(units)

    async def test_one_callback_per_window(self, tmp_path: Path) -> None:
        """A steady trickle still yields at most one callback per window."""
        rec = Recorder()
        window = 0.02
        with UnitDirWatcher(rec, window=window, max_delay=window) as watcher:
            watcher.watch([str(tmp_path)], [f"s{i}.service" for i in range(40)])
            task = asyncio.create_task(watcher.run())
            try:
                for i in range(40):
                    write(tmp_path / f"s{i}.service")
                    await asyncio.sleep(0.002)
                await rec.until({f"s{i}.service" for i in range(40)})
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        times = [t for t, _ in rec.calls]
        assert all(b - a >= window * 0.9 for a, b in itertools.pairwise(times))
        assert len(times) < 40

    async def test_queue_overflow_reports_every_unit(self, world: World) -> None:
        # Alternate two names so the kernel cannot merge the events; never yield to the loop
        # so the watcher cannot drain the queue (max_queued_events is 16384 by default).
        limit = _max_queued_events()
        names = [world.lo / "noise-a", world.lo / "noise-b"]
        for i in range(limit + 10):
            os.close(os.open(names[i % 2], os.O_WRONLY | os.O_CREAT, 0o644))
        with capture_logs() as logs:
            await world.rec.until({"web.service", "api.service", "web-app.service", "web.timer"})
        assert any(e["event"] == "watcher.overflow" for e in logs)


class TestConfiguration:
    """`watch()` can change units and search path at any time."""

    async def test_units_replaced(self, world: World) -> None:
        (world.lo / "web.service.d").mkdir()
        await world.rec.until({"web.service"})
        world.watch("api.service")
        assert str(world.lo / "web.service.d") not in world.watcher.watched_directories()
        world.rec.clear()
        write(world.lo / "web.service")
        write(world.lo / "web.service.d" / "x.conf")
        await world.rec.nothing()
        write(world.lo / "api.service")
        await world.rec.until({"api.service"})
        assert world.rec.seen == {"api.service"}

    async def test_one_directory_under_two_paths(self, world: World) -> None:
        alias = world.outside / "alias"
        alias.symlink_to(world.lo, target_is_directory=True)
        world.watcher.watch([str(alias), str(world.lo)], ["web.service"])
        world.watcher.watch([str(world.lo)], ["web.service"])  # drop the alias: lo stays watched
        write(world.lo / "web.service")
        await world.rec.until({"web.service"})

    async def test_callback_failure_is_logged_and_watching_goes_on(self, tmp_path: Path) -> None:
        calls: list[frozenset[str]] = []
        second = asyncio.Event()

        def flaky(units: frozenset[str]) -> None:
            calls.append(units)
            if len(calls) == 1:
                raise RuntimeError("boom")
            second.set()

        with UnitDirWatcher(flaky) as watcher:
            watcher.watch([str(tmp_path)], ["web.service"])
            task = asyncio.create_task(watcher.run())
            try:
                with capture_logs() as logs:
                    write(tmp_path / "web.service")
                    await asyncio.sleep(QUIET)
                write(tmp_path / "web.service", "[Service]\nX=2\n")
                async with asyncio.timeout(DEADLINE):
                    await second.wait()
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        assert [e["event"] for e in logs] == ["watcher.callback_failed"]
        assert calls == [{"web.service"}, {"web.service"}]


class TestLifecycle:
    """`run()` ends on cancellation and takes the inotify fd with it."""

    async def test_cancel_closes_the_fd(self, tmp_path: Path) -> None:
        before = inotify_fds()
        watcher = UnitDirWatcher(Recorder())
        watcher.watch([str(tmp_path)], ["web.service"])
        assert inotify_fds() == before + 1
        task = asyncio.create_task(watcher.run())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert inotify_fds() == before
        assert watcher.watched_directories() == []
        with pytest.raises(RuntimeError, match="closed"):
            watcher.watch([str(tmp_path)], ["web.service"])

    async def test_latency(self, tmp_path: Path) -> None:
        """Write-to-callback latency over 100 trials, each well under the deadline."""
        rec = Recorder()
        samples: list[float] = []
        with UnitDirWatcher(rec) as watcher:
            watcher.watch([str(tmp_path)], [f"u{i}.service" for i in range(500)])
            task = asyncio.create_task(watcher.run())
            try:
                for i in range(100):
                    rec.clear()
                    start = time.monotonic()
                    write(tmp_path / f"u{i}.service")
                    samples.append(await rec.until({f"u{i}.service"}) - start)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        samples.sort()
        p50, p99 = statistics.median(samples) * 1000, samples[98] * 1000
        print(f"write-to-callback latency, 500 units: p50={p50:.2f} ms p99={p99:.2f} ms")
        assert samples[-1] < DEADLINE


def _write_all(directory: Path, names: Iterable[str]) -> None:
    for name in names:
        write(directory / name)


def _max_queued_events() -> int:
    return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
