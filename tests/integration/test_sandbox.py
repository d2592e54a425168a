"""The sandbox itself: a real user manager, bus and journal, isolated from the machine."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from sandbox import (
    ETC_UNIT_DIR,
    RUN,
    Sandbox,
    SandboxHost,
    machine_path,
    pid_cgroup,
)

pytestmark = pytest.mark.integration

NETLINK_AUDIT = 9


def _tree(path: Path) -> list[tuple[str, int, str]]:
    """(relative path, mode, link target) of everything under ``path``: a comparable snapshot."""
    result = []
    for root, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            full = Path(root, name)
            st = full.lstat()
            target = os.readlink(full) if full.is_symlink() else ""
            result.append((str(full.relative_to(path)), st.st_mode, target))
    return sorted(result)


def _write_oneshot(directory: Path, name: str, message: str) -> Path:
    path = directory / name
    path.write_text(
        "[Unit]\nDescription=sandbox probe\n\n"
        f"[Service]\nType=oneshot\nExecStart=/bin/echo {message}\n"
    )
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


class TestIsolation:
    def test_manager_runs_in_its_own_leaf_cgroup(self, sandbox: Sandbox) -> None:
        """systemd --user sits below the world's user@0.service, never in the root cgroup."""
        manager = pid_cgroup(sandbox.manager_pid)
        assert manager == f"{sandbox.manager_cgroup}/init.scope"
        assert manager.startswith(f"{sandbox.host.session_cgroup}/")
        assert pid_cgroup(sandbox.journald_pid) == f"{sandbox.cgroup}/journald.service"
        assert pid_cgroup(os.getpid()) == f"{sandbox.host.session_cgroup}/runner.scope"

    def test_machine_etc_systemd_user_is_untouched(self, sandbox: Sandbox) -> None:
        """A unit written to etc_unit_dir exists only in the namespace, not on the machine."""
        machine_etc = machine_path(ETC_UNIT_DIR)
        before = _tree(machine_etc)
        name = f"probe-{uuid.uuid4().hex[:8]}.service"
        _write_oneshot(sandbox.etc_unit_dir, name, "hi")
        sandbox.daemon_reload()

        assert (sandbox.etc_unit_dir / name).exists()
        assert not (machine_etc / name).exists()
        assert _tree(machine_etc) == before
        assert not machine_path(sandbox.runtime_dir).exists()
        assert not machine_path(
            RUN / "systemd" / "journald.conf.d" / "zz-stackd-sandbox.conf"
        ).exists()

    def test_journal_holds_no_kernel_messages(self, sandbox: Sandbox) -> None:
        """journald does not read the machine's /dev/kmsg (ReadKMsg=no)."""
        assert sandbox.journal(_TRANSPORT="driver"), "journald logged nothing at all"
        assert sandbox.journal(_TRANSPORT="kernel") == []

    def test_journald_has_no_audit_socket(self, sandbox: Sandbox) -> None:
        """Socket-activated journald leaves kernel auditing alone (no NETLINK_AUDIT socket)."""
        fd_dir = Path(f"/proc/{sandbox.journald_pid}/fd")
        inodes = {os.readlink(fd) for fd in fd_dir.iterdir()}
        socket_inodes = {
            link[len("socket:[") : -1] for link in inodes if link.startswith("socket:")
        }
        assert socket_inodes, "journald holds no sockets"
        audit = [
            line.split()[-1]
            for line in Path("/proc/net/netlink").read_text().splitlines()[1:]
            if int(line.split()[1]) == NETLINK_AUDIT
        ]
        assert socket_inodes.isdisjoint(audit)


class TestManager:
    def test_systemd_run_output_lands_in_the_journal(self, sandbox: Sandbox) -> None:
        """A transient unit runs to completion and its stdout is in the sandbox journal."""
        token = uuid.uuid4().hex
        result = sandbox.run(
            "systemd-run", "--user", "--wait", "--unit=probe.service", "/bin/echo", token
        )
        assert "Finished with result: success" in result.stderr
        [entry] = sandbox.journal(MESSAGE=token)
        assert entry["_TRANSPORT"] == "stdout"
        assert entry["SYSLOG_IDENTIFIER"] == "echo"

    def test_journal_attributes_entries_to_user_units(self, sandbox: Sandbox) -> None:
        """_SYSTEMD_USER_UNIT is set for a live process (journald reads the sender's cgroup).

        For a process that has exited before journald reads its output the field is missing:
        the same race as on any systemd machine. Match short-lived output on other fields.
        """
        token = uuid.uuid4().hex
        sandbox.run(
            "systemd-run",
            "--user",
            "--unit=alive.service",
            "/bin/sh",
            "-c",
            f"echo {token}; exec sleep 600",
        )
        [entry] = sandbox.wait_for_journal(_SYSTEMD_USER_UNIT="alive.service")
        assert entry["MESSAGE"] == token
        assert entry["_SYSTEMD_USER_UNIT"] == "alive.service"
        assert entry["_SYSTEMD_CGROUP"] == f"{sandbox.manager_cgroup}/app.slice/alive.service"

    def test_unit_path_lists_the_sandbox_dirs(self, sandbox: Sandbox) -> None:
        """UnitPath has the sandbox's ~/.config/systemd/user ahead of /etc/systemd/user."""
        unit_path = sandbox.unit_path()
        user_dir, etc_dir = str(sandbox.user_unit_dir), str(sandbox.etc_unit_dir)
        assert user_dir in unit_path
        assert etc_dir in unit_path
        assert unit_path.index(user_dir) < unit_path.index(etc_dir)
        per_user = [p for p in unit_path if "/.config/" in p or "/.local/" in p]
        assert per_user
        assert all(p.startswith(f"{sandbox.home}/") for p in per_user)

    def test_session_bus_serves_the_manager(self, sandbox: Sandbox) -> None:
        """busctl --user reaches org.freedesktop.systemd1 over the sandbox's session bus."""
        out = sandbox.run(
            "busctl",
            "--user",
            "--json=short",
            "get-property",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "UnitPath",
        ).stdout
        assert str(sandbox.user_unit_dir) in out
        assert (sandbox.runtime_dir / "bus").is_socket()

    async def test_in_process_client_finds_the_bus(self, sandbox: Sandbox) -> None:
        """os.environ points at the world: dbus-fast connects without being told where."""
        assert os.environ["DBUS_SESSION_BUS_ADDRESS"] == sandbox.bus_address
        assert os.environ["HOME"] == str(sandbox.home)
        bus = await MessageBus(bus_type=BusType.SESSION).connect()
        try:
            reply = await bus.call(
                Message(
                    destination="org.freedesktop.systemd1",
                    path="/org/freedesktop/systemd1",
                    interface="org.freedesktop.DBus.Properties",
                    member="Get",
                    signature="ss",
                    body=["org.freedesktop.systemd1.Manager", "SystemState"],
                )
            )
        finally:
            bus.disconnect()
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        assert reply is not None
        assert reply.message_type == MessageType.METHOD_RETURN
        assert reply.body[0].value in {"running", "degraded"}

    def test_unit_in_etc_unit_dir_loads_after_daemon_reload(self, sandbox: Sandbox) -> None:
        """A file placed in etc_unit_dir is loaded from there after daemon-reload and runs.

        Debian's systemd ships /etc/xdg/systemd/user -> ../../systemd/user, and that entry
        comes first in UnitPath: the manager reports the /etc/xdg path for such a file.
        """
        _write_oneshot(sandbox.etc_unit_dir, "etcprobe.service", "from-etc-probe")
        sandbox.daemon_reload()
        load_state = sandbox.systemctl("show", "-P", "LoadState", "etcprobe.service").stdout
        fragment = sandbox.systemctl("show", "-P", "FragmentPath", "etcprobe.service").stdout
        assert load_state.strip() == "loaded"
        assert Path(fragment.strip()).resolve() == sandbox.etc_unit_dir / "etcprobe.service"
        sandbox.systemctl("start", "etcprobe.service")
        assert sandbox.messages(MESSAGE="from-etc-probe") == ["from-etc-probe"]

    def test_user_unit_dir_shadows_etc_unit_dir(self, sandbox: Sandbox) -> None:
        """The same unit name in both dirs loads from ~/.config/systemd/user."""
        _write_oneshot(sandbox.etc_unit_dir, "both.service", "etc")
        user_file = _write_oneshot(sandbox.user_unit_dir, "both.service", "user")
        sandbox.daemon_reload()
        fragment = sandbox.systemctl("show", "-P", "FragmentPath", "both.service").stdout
        assert fragment.strip() == str(user_file)

    def test_restart_manager_gives_a_new_working_manager(self, sandbox: Sandbox) -> None:
        """restart_manager: new PID, old one gone, bus and units work again."""
        old = sandbox.manager_pid
        sandbox.run("systemd-run", "--user", "--unit=before.service", "sleep", "600")
        sandbox.restart_manager()

        assert sandbox.manager_pid != old
        assert not _alive(old)
        assert sandbox.systemctl("is-active", "before.service", check=False).stdout.strip() in {
            "inactive",
            "failed",
        }
        assert sandbox.systemctl("is-system-running").stdout.strip() == "running"
        sandbox.run("busctl", "--user", "status", "org.freedesktop.systemd1")

    def test_stop_manager_takes_manager_and_bus_away(self, sandbox: Sandbox) -> None:
        """After stop_manager nothing answers; start_manager brings it back."""
        sandbox.stop_manager()
        assert not sandbox.manager_running
        failed = sandbox.systemctl("is-system-running", check=False)
        assert failed.returncode != 0
        bus = sandbox.run("busctl", "--user", "list", check=False)
        assert bus.returncode != 0
        assert list(sandbox.manager_cgroup_dir.parent.glob("user@*.service")) == []

        sandbox.start_manager()
        assert sandbox.systemctl("is-system-running").stdout.strip() == "running"

    def test_run_error_carries_the_output(self, sandbox: Sandbox) -> None:
        """A failing command raises CalledProcessError whose notes show stdout and stderr."""
        with pytest.raises(subprocess.CalledProcessError) as info:
            sandbox.systemctl("start", "does-not-exist.service")
        assert "does-not-exist.service" in "\n".join(info.value.__notes__)


class TestFreshWorlds:
    """Each test gets a world in which nothing of the previous tests is left."""

    @pytest.mark.parametrize("turn", ["first", "second", "third"])
    def test_no_trace_of_other_tests(self, sandbox: Sandbox, turn: str) -> None:
        assert list(sandbox.etc_unit_dir.iterdir()) == []
        assert list(sandbox.user_unit_dir.iterdir()) == []
        assert sandbox.messages(SYSLOG_IDENTIFIER="stackd-sandbox-probe") == []
        assert (
            sandbox.systemctl("list-units", "--all", "--plain", "--no-legend", "probe-*").stdout
            == ""
        )

        _write_oneshot(sandbox.etc_unit_dir, f"probe-{turn}.service", turn)
        _write_oneshot(sandbox.user_unit_dir, f"probe-{turn}-user.service", turn)
        sandbox.daemon_reload()
        sandbox.run("systemd-run", "--user", f"--unit=probe-{turn}-sleep", "sleep", "600")
        sandbox.run("systemd-cat", "-t", "stackd-sandbox-probe", "echo", turn)
        assert sandbox.messages(SYSLOG_IDENTIFIER="stackd-sandbox-probe") == [turn]


class TestTeardown:
    def test_destroy_kills_processes_that_ignore_sigterm(
        self, sandbox_host: SandboxHost, tmp_path: Path
    ) -> None:
        """A unit process that ignores SIGTERM and outlives its manager is still killed."""
        world = sandbox_host.new_world(tmp_path / "world", "teardown")
        try:
            world.run(
                "systemd-run",
                "--user",
                "--unit=stubborn.service",
                "-p",
                "KillMode=none",
                "/bin/sh",
                "-c",
                "trap '' TERM; while :; do sleep 1; done",
            )
            pid = world.wait_for(
                lambda: int(world.systemctl("show", "-P", "MainPID", "stubborn.service").stdout),
                what="stubborn.service has a MainPID",
            )
            assert _alive(pid)
            world.stop_manager(timeout=5)
            assert not _alive(pid)
        finally:
            sandbox_host.destroy(world)
        assert not world.cgroup_dir.exists()
        assert not world.runtime_dir.exists()

    def test_destroy_after_the_manager_died(
        self, sandbox_host: SandboxHost, tmp_path: Path
    ) -> None:
        """A manager killed from outside (SIGKILL) still leaves nothing behind."""
        world = sandbox_host.new_world(tmp_path / "world", "teardown")
        try:
            world.run("systemd-run", "--user", "--unit=orphan.service", "sleep", "600")
            os.kill(world.manager_pid, signal.SIGKILL)
            world.wait_for(lambda: not world.manager_running, what="manager gone")
        finally:
            sandbox_host.destroy(world)
        assert not world.cgroup_dir.exists()
