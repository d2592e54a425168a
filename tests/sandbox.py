"""A real systemd user manager, its session bus and a journald, private to the test run.

The recipe (DESIGN.md section 8), and why each step is there:

1. **Private mount namespace for the pytest process itself.** ``unshare(CLONE_NEWNS)`` plus
   ``mount("/", MS_REC | MS_PRIVATE)``: every mount below stays invisible to the machine and
   disappears with the process. It runs when ``conftest.py`` is imported because
   ``unshare(CLONE_NEWNS)`` fails with EINVAL once a process has a second thread. Every later
   mount or wipe first checks that ``/proc/self/ns/mnt`` is no longer the one seen before
   ``unshare``. A descriptor of the machine's ``/`` is kept from before, so tests can look at
   the machine's side (:func:`machine_path`; ``/proc/1/root`` may be closed even to root).
2. **tmpfs over /run**, with ``/run/systemd/system`` in it: ``systemd --user`` refuses to start
   without that directory (it is how ``sd_booted()`` answers), and journald, the bus and the
   notify sockets live there. The machine's ``/run`` is never written.
3. **One cgroup2 view, a cgroup of our own.** The machine may have a hybrid layout (v1
   controllers, ``name=systemd`` and cgroup2 at ``/sys/fs/cgroup/unified``). Inside the
   namespace the cgroup2 mount is bind-moved over ``/sys/fs/cgroup`` so systemd and crun see
   pure cgroup2 (systemd >= 256 drops v1; crun refuses the hybrid layout). A bind, not a fresh
   ``mount -t cgroup2``: a fresh mount in the initial cgroup namespace re-applies the root
   flags (``nsdelegate``, ``memory_recursiveprot``) to the whole machine. On a pure cgroup2
   machine nothing is mounted. Then ``/stackd-sbx-<pid>.slice`` is created under the cgroup2
   root and pytest moves into its ``runner.scope`` leaf: ``systemd --user`` takes over every
   process of the cgroup it starts in (in the root cgroup: every process of the machine), so
   it is only ever started in a leaf of its own, ``w<N>.slice/user@0.service``, and journald
   in ``w<N>.slice/journald.service``. The launcher checks ``/proc/self/cgroup`` before it
   execs either of them. The names are not decoration: journald derives
   ``_SYSTEMD_USER_UNIT`` from the sender's cgroup path only when it reads
   ``[*.slice/]user@<uid>.service/.../<unit>``.
4. **tmpfs over /etc/systemd/user and /var/log/journal**: the system-wide user unit dir is part
   of the manager's ``UnitPath``; tests write there, the machine's copy stays untouched.
5. **journald, socket-activated, with a private config.** ``ReadKMsg=no`` and no forwarding via
   a drop-in in the private ``/run/systemd/journald.conf.d``. Its sockets are created here and
   passed with ``LISTEN_FDS``: they exist before the manager starts (no race), and journald
   (252) opens the kernel audit socket, and switches auditing on for the whole machine, only
   when it is handed no sockets at all.
6. **A fresh world per test**: new ``HOME`` (``~/.config/systemd/user`` created),
   ``XDG_RUNTIME_DIR`` (0700, in the private ``/run``), an emptied journal and
   ``/etc/systemd/user``, a new journald and a new ``systemd --user``. Readiness comes from
   ``sd_notify`` (``READY=1``: the user manager sends it on reaching basic.target, the bus
   socket included), then ``systemctl --user is-system-running --wait``, then the manager's
   name ``org.freedesktop.systemd1`` owned on the session bus.
7. **Teardown that survives failed tests**: SIGTERM then SIGKILL after a bound, then
   ``cgroup.kill`` (or SIGKILL of every pid in ``cgroup.procs``) over the whole world cgroup,
   and the cgroup dirs removed bottom-up. At session end pytest moves back to its original
   cgroup and the session cgroup goes; a session killed hard leaves ``stackd-sbx-<pid>.slice``
   behind, which the next session sweeps once that pid is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "SYSTEMD",
    "SYSTEMD_JOURNALD",
    "Sandbox",
    "SandboxError",
    "SandboxHost",
    "WorldTiming",
    "enter_private_mount_namespace",
    "kill_cgroup_tree",
    "machine_path",
    "namespace_status",
    "pid_cgroup",
]

T = TypeVar("T")

SYSTEMD = Path("/usr/lib/systemd/systemd")
SYSTEMD_JOURNALD = Path("/usr/lib/systemd/systemd-journald")
DBUS_USER_SOCKET = Path("/usr/lib/systemd/user/dbus.socket")
DBUS_SESSION_CONF = Path("/usr/share/dbus-1/session.conf")
CGROUP_ROOT = Path("/sys/fs/cgroup")
ETC_UNIT_DIR = Path("/etc/systemd/user")
VAR_LOG_JOURNAL = Path("/var/log/journal")
RUN = Path("/run")
RUN_LOG_JOURNAL = RUN / "log" / "journal"
JOURNAL_SOCKET_DIR = RUN / "systemd" / "journal"
PRIVATE_STATE = RUN / "stackd-sandbox"  # notify sockets, the cgroup2 stash
SESSION_CGROUP_PREFIX = "stackd-sbx-"
# Included (if present) by the session bus config inside the namespace; see other_uids_allowed.
DBUS_SESSION_POLICY = PRIVATE_STATE / "dbus-session-policy.conf"
DBUS_ANY_UID_POLICY = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- stackd test sandbox: let a process of any uid connect to this private session bus. -->
<busconfig>
  <policy context="default"><allow user="*"/></policy>
</busconfig>
"""

JOURNALD_CONF = """\
# stackd test sandbox: this journald serves only the private mount namespace of one pytest run.
[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
RateLimitBurst=0
RuntimeMaxUse=64M
"""

# mount(2), umount2(2), unshare(2), prctl(2) constants (linux/mount.h, linux/sched.h).
_CLONE_NEWNS = 0x00020000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_BIND = 0x1000
_MS_MOVE = 0x2000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MNT_DETACH = 0x2

_NAME_HAS_OWNER = (
    "busctl",
    "--user",
    "call",
    "org.freedesktop.DBus",
    "/org/freedesktop/DBus",
    "org.freedesktop.DBus",
    "NameHasOwner",
    "s",
    "org.freedesktop.systemd1",
)
_STOP_TIMEOUT = 10.0
_READY_TIMEOUT = 30.0

# Runs in the child between fork and exec of journald / systemd: enter the given cgroup, check
# it took, hand over listening sockets as fds 3.. (sd_listen_fds), then exec. A separate tiny
# interpreter instead of preexec_fn, which is unsafe once the test process has threads.
_LAUNCHER = r"""
import ctypes, os, sys
procs, rel, fds, deathsig, *argv = sys.argv[1:]
with open(procs, "w") as f:
    f.write(str(os.getpid()))
with open("/proc/self/cgroup") as f:
    lines = f.read().splitlines()
if ("0::" + rel) not in lines:
    sys.exit("stackd sandbox launcher: not in cgroup %s: %s" % (rel, lines))
if int(deathsig):
    ctypes.CDLL(None, use_errno=True).prctl(1, int(deathsig), 0, 0, 0)
fds = [int(x) for x in fds.split(",") if x]
if fds:
    import fcntl
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(argv[0], argv)
"""


class SandboxError(RuntimeError):
    """The sandbox could not be built, or a process in it misbehaved."""


# --------------------------------------------------------------------------------------------
# Syscalls
# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            str(target).encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def _umount(target: Path, flags: int) -> None:
    _check(_libc.umount2(str(target).encode(), flags), f"umount {target}")


def _mnt_ns(pid: str) -> int:
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino


# --------------------------------------------------------------------------------------------
# Step 1: the private mount namespace (process-wide, once, at conftest import)
# --------------------------------------------------------------------------------------------


@dataclass
class _Namespace:
    """What :func:`enter_private_mount_namespace` did, once per process."""

    attempted: bool = False
    reason: str | None = None  # None once entered
    original_mnt_ns: int = 0
    # "/" of the machine's mount namespace, opened before unshare: paths resolved from it see
    # the machine's mounts, not ours (machine_path). /proc/1/root may be closed even to root.
    original_root_fd: int = -1
    lock: threading.Lock = field(default_factory=threading.Lock)


_NAMESPACE = _Namespace()


def _static_reason() -> str | None:
    """Why the sandbox cannot work on this machine at all, or None."""
    checks: list[tuple[bool, str]] = [
        (sys.platform.startswith("linux"), f"the sandbox needs Linux, this is {sys.platform}"),
        (
            os.geteuid() == 0,
            f"the sandbox needs root (mount namespace, cgroups); euid is {os.geteuid()}",
        ),
        *(
            (os.access(binary, os.X_OK), f"{binary} is missing (install the systemd package)")
            for binary in (SYSTEMD, SYSTEMD_JOURNALD)
        ),
        *(
            (shutil.which(tool) is not None, f"{tool} is not on PATH (install systemd)")
            for tool in ("systemctl", "journalctl", "systemd-run", "systemd-cat", "busctl")
        ),
        (DBUS_USER_SOCKET.exists(), f"{DBUS_USER_SOCKET} is missing (install dbus-user-session)"),
        (
            ETC_UNIT_DIR.is_dir(),
            f"{ETC_UNIT_DIR} does not exist (nothing may be created outside the namespace)",
        ),
    ]
    return next((reason for ok, reason in checks if not ok), None)


def enter_private_mount_namespace() -> str | None:
    """Move this process into a private mount namespace; None on success, else the reason.

    Idempotent. Must run before the process starts any thread.
    """
    ns = _NAMESPACE
    with ns.lock:
        if ns.attempted:
            return ns.reason
        ns.attempted = True
        ns.reason = _static_reason()
        if ns.reason is None and threading.active_count() > 1:
            ns.reason = (
                f"the process already has {threading.active_count()} threads; "
                "unshare(CLONE_NEWNS) needs a single-threaded process (import order?)"
            )
        if ns.reason is None:
            try:
                ns.original_mnt_ns = _mnt_ns("self")
                ns.original_root_fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
                _mount("none", Path("/"), None, _MS_REC | _MS_PRIVATE, None)
            except OSError as exc:
                ns.reason = f"cannot enter a private mount namespace: {exc}"
        return ns.reason


def namespace_status() -> str | None:
    """The result of :func:`enter_private_mount_namespace` (which must have been called)."""
    if not _NAMESPACE.attempted:
        return "enter_private_mount_namespace() was never called (tests/conftest.py does it)"
    return _NAMESPACE.reason


def _require_private_namespace() -> None:
    """Refuse to mount or wipe anything unless we are provably not in the machine's namespace."""
    reason = namespace_status()
    if reason is not None:
        raise SandboxError(f"no private mount namespace: {reason}")
    if _mnt_ns("self") == _NAMESPACE.original_mnt_ns:
        raise SandboxError("still in the machine's mount namespace: refusing to mount")


def machine_path(path: Path) -> Path:
    """``path`` as the machine outside the private mount namespace sees it."""
    if namespace_status() is not None or _NAMESPACE.original_root_fd < 0:
        raise SandboxError("no private namespace, so no view of the machine from outside it")
    return Path(f"/proc/self/fd/{_NAMESPACE.original_root_fd}") / path.relative_to("/")


# --------------------------------------------------------------------------------------------
# Mount table and cgroup helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    root: str
    mountpoint: Path
    fstype: str


def _mounts() -> list[_Mount]:
    result = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        mountpoint = fields[4].encode().decode("unicode_escape")
        result.append(_Mount(fields[3], Path(mountpoint), fields[sep + 1]))
    return result


def _mount_at(path: Path) -> _Mount | None:
    """The topmost mount at exactly ``path``, if any."""
    found = [m for m in _mounts() if m.mountpoint == path]
    return found[-1] if found else None


def _require_tmpfs(path: Path) -> None:
    _require_private_namespace()
    top = _mount_at(path)
    if top is None or top.fstype != "tmpfs":
        raise SandboxError(f"{path} is not the sandbox's tmpfs; refusing to modify it")


def _empty_dir(path: Path) -> None:
    """Remove everything inside ``path`` (which must be one of the sandbox's tmpfs mounts)."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _own_cgroup() -> str:
    """This process's cgroup2 path (the ``0::`` line of /proc/self/cgroup)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise SandboxError("no cgroup2 entry in /proc/self/cgroup")


def pid_cgroup(pid: int) -> str:
    """The cgroup2 path of ``pid``."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise SandboxError(f"no cgroup2 entry in /proc/{pid}/cgroup")


def _cgroup_dirs_bottom_up(path: Path) -> list[Path]:
    dirs = [Path(root) for root, _, _ in os.walk(path)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _cgroup_populated(path: Path) -> bool:
    for line in (path / "cgroup.events").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "populated":
            return value.strip() == "1"
    return False


def kill_cgroup_tree(path: Path, timeout: float = _STOP_TIMEOUT) -> None:
    """SIGKILL every process in the cgroup tree at ``path``, wait until empty, remove it.

    Only ever below a ``stackd-sbx-*`` session cgroup.
    """
    parts = path.relative_to(CGROUP_ROOT).parts if path.is_relative_to(CGROUP_ROOT) else ()
    if not parts or not parts[0].startswith(SESSION_CGROUP_PREFIX) or ".." in parts:
        raise SandboxError(f"refusing to kill {path}: not a sandbox cgroup")
    if not path.is_dir():
        return
    if f"{os.getpid()}" in _procs_in_tree(path):
        raise SandboxError(f"refusing to kill {path}: this process is in it")
    deadline = time.monotonic() + timeout
    while _cgroup_populated(path):
        kill_file = path / "cgroup.kill"
        if kill_file.exists():
            kill_file.write_text("1")
        else:  # kernels before 5.14
            for pid in _procs_in_tree(path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        if time.monotonic() > deadline:
            raise SandboxError(f"cgroup {path} still populated after {timeout}s")
        time.sleep(0.01)
    for directory in _cgroup_dirs_bottom_up(path):
        _rmdir_cgroup(directory)


def _rmdir_cgroup(directory: Path, attempts: int = 200) -> None:
    for attempt in range(attempts):
        try:
            directory.rmdir()
        except FileNotFoundError:
            return
        except OSError as exc:  # EBUSY while the kernel finishes reaping
            if exc.errno != errno.EBUSY or attempt == attempts - 1:
                raise SandboxError(f"cannot remove cgroup {directory}: {exc}") from exc
            time.sleep(0.01)
        else:
            return


def _procs_in_tree(path: Path) -> list[str]:
    pids: list[str] = []
    for directory in _cgroup_dirs_bottom_up(path):
        with contextlib.suppress(FileNotFoundError):
            pids.extend((directory / "cgroup.procs").read_text().split())
    return pids


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def _spawn(
    argv: list[str],
    *,
    cgroup_dir: Path,
    cgroup_rel: str,
    env: dict[str, str],
    log: Path,
    cwd: Path,
    listen: list[socket.socket] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside ``cgroup_dir`` (created here), optionally socket-activated."""
    cgroup_dir.mkdir()
    fds = [s.fileno() for s in listen or []]
    # PR_SET_PDEATHSIG fires when the spawning *thread* exits: only safe from the main thread.
    deathsig = signal.SIGTERM if threading.current_thread() is threading.main_thread() else 0
    with log.open("ab") as log_file:
        return subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                _LAUNCHER,
                str(cgroup_dir / "cgroup.procs"),
                cgroup_rel,
                ",".join(map(str, fds)),
                str(int(deathsig)),
                *argv,
            ],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            pass_fds=fds,
            start_new_session=True,
        )


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = _STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _notify_socket(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(str(path))
    return sock


def _wait_ready(
    sock: socket.socket, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float
) -> None:
    """Wait for ``READY=1`` on the notify socket; fail early if the process dies."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], min(remaining, 0.05))
        if readable and "READY=1" in sock.recv(4096).decode(errors="replace").splitlines():
            return
        if proc.poll() is not None:
            raise SandboxError(
                f"{what} exited with {proc.returncode} before READY=1; log {log}:\n" + _tail(log)
            )
    raise SandboxError(f"{what} sent no READY=1 within {timeout}s; log {log}:\n" + _tail(log))


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _add_output_note(exc: subprocess.CalledProcessError | subprocess.TimeoutExpired) -> None:
    def text(value: str | bytes | None) -> str:
        if isinstance(value, bytes):
            return value.decode(errors="replace")
        return value or ""

    exc.add_note(f"stdout:\n{text(exc.stdout)}\nstderr:\n{text(exc.stderr)}")


# --------------------------------------------------------------------------------------------
# The session: mounts and the session cgroup
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldTiming:
    """How long one test's sandbox took to build (in total and per step) and to tear down."""

    test: str
    setup: float
    teardown: float
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class SandboxHost:
    """The per-session part: mounts in the private namespace, the session cgroup."""

    session_cgroup: str = ""
    original_cgroup: str = ""
    layout: str = ""  # "unified" or "hybrid"
    timings: list[WorldTiming] = field(default_factory=list)
    _worlds: int = 0
    _live: list[Sandbox] = field(default_factory=list)
    _set_up: bool = False
    _moved_self: bool = False

    @property
    def session_cgroup_dir(self) -> Path:
        return CGROUP_ROOT / self.session_cgroup.lstrip("/")

    def setup(self) -> None:
        """Mount the private world and move this process into the session cgroup."""
        if self._set_up:
            return
        _require_private_namespace()
        self._set_up = True
        self.original_cgroup = _own_cgroup()

        _mount("tmpfs", RUN, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")
        PRIVATE_STATE.mkdir(mode=0o700)
        self._cgroup2_view()

        self._sweep_stale_session_cgroups()
        self.session_cgroup = f"/{SESSION_CGROUP_PREFIX}{os.getpid()}.slice"
        self.session_cgroup_dir.mkdir()
        (self.session_cgroup_dir / "runner.scope").mkdir()
        (self.session_cgroup_dir / "runner.scope" / "cgroup.procs").write_text(str(os.getpid()))
        self._moved_self = True

        for directory in (RUN / "systemd" / "system", RUN / "user", RUN_LOG_JOURNAL):
            directory.mkdir(parents=True, exist_ok=True)
        conf_dir = RUN / "systemd" / "journald.conf.d"
        conf_dir.mkdir(parents=True)
        # Drop-ins sort by file name across /etc, /run and /usr/lib: "zz-" comes last and wins.
        (conf_dir / "zz-stackd-sandbox.conf").write_text(JOURNALD_CONF)

        _mount("tmpfs", ETC_UNIT_DIR, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")
        if VAR_LOG_JOURNAL.is_dir():
            _mount("tmpfs", VAR_LOG_JOURNAL, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=2755")

    def _cgroup2_view(self) -> None:
        cgroup2 = [m for m in _mounts() if m.fstype == "cgroup2"]
        top = _mount_at(CGROUP_ROOT)
        if top is not None and top.fstype == "cgroup2":
            self.layout = "unified"
            return
        if not cgroup2:
            raise SandboxError("no cgroup2 hierarchy is mounted (cgroup v1 only machine)")
        source = cgroup2[0]
        if source.root != "/":
            raise SandboxError(f"the cgroup2 mount at {source.mountpoint} is not its root")
        self.layout = "hybrid"
        stash = PRIVATE_STATE / "cgroup2"
        stash.mkdir()
        _mount(str(source.mountpoint), stash, None, _MS_BIND, None)
        _umount(CGROUP_ROOT, _MNT_DETACH)
        _mount(str(stash), CGROUP_ROOT, None, _MS_MOVE, None)
        stash.rmdir()

    def _sweep_stale_session_cgroups(self) -> None:
        """Remove session cgroups whose pytest died without tearing down."""
        for directory in CGROUP_ROOT.glob(f"{SESSION_CGROUP_PREFIX}*"):
            pid = directory.name.removeprefix(SESSION_CGROUP_PREFIX).removesuffix(".slice")
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                kill_cgroup_tree(directory)

    def new_world(self, base: Path, test: str = "") -> Sandbox:
        """Build a fresh world (journald + user manager) under ``base``; tear it down on error."""
        self.setup()
        self._worlds += 1
        started = time.monotonic()
        world = Sandbox(self, self._worlds, base, test)
        self._live.append(world)
        try:
            world._create()
        except BaseException:
            self.destroy(world)
            raise
        world.setup_seconds = time.monotonic() - started
        return world

    def destroy(self, world: Sandbox) -> None:
        """Stop everything of ``world``, whatever state it is in."""
        started = time.monotonic()
        try:
            world._destroy()
        finally:
            with contextlib.suppress(ValueError):
                self._live.remove(world)
            self.timings.append(
                WorldTiming(
                    world.test, world.setup_seconds, time.monotonic() - started, dict(world.phases)
                )
            )

    def teardown(self) -> None:
        """Stop every world, move back to the original cgroup, remove the session cgroup."""
        if not self._set_up:
            return
        errors: list[BaseException] = []
        for world in list(self._live):
            try:
                self.destroy(world)
            except Exception as exc:  # keep tearing down, report at the end
                errors.append(exc)
        if self._moved_self:
            original = CGROUP_ROOT / self.original_cgroup.lstrip("/")
            if not (original / "cgroup.procs").exists():
                original = CGROUP_ROOT
            (original / "cgroup.procs").write_text(str(os.getpid()))
            self._moved_self = False
        if self.session_cgroup:
            try:
                kill_cgroup_tree(self.session_cgroup_dir)
            except SandboxError as exc:
                errors.append(exc)
        self._set_up = False
        if errors:
            raise SandboxError(f"sandbox teardown: {errors}")

    def overlay_session_bus_config(self) -> None:
        """Overlay the session bus config (in the namespace only) with one that includes
        :data:`DBUS_SESSION_POLICY` when that file exists; once per session."""
        _require_tmpfs(RUN)
        if _mount_at(DBUS_SESSION_CONF) is not None:
            return
        copy = PRIVATE_STATE / "dbus-session.conf"
        text = DBUS_SESSION_CONF.read_text()
        include = f'  <include ignore_missing="yes">{DBUS_SESSION_POLICY}</include>\n'
        if "</busconfig>" not in text:
            raise SandboxError(f"{DBUS_SESSION_CONF} has no </busconfig>: cannot overlay it")
        head, _, tail = text.rpartition("</busconfig>")
        copy.write_text(head + include + "</busconfig>" + tail)
        _require_private_namespace()
        _mount(str(copy), DBUS_SESSION_CONF, None, _MS_BIND, None)

    @contextlib.contextmanager
    def private_tmpfs(self, path: Path, mode: int = 0o700) -> Iterator[Path]:
        """A fresh tmpfs over ``path`` in the private namespace, for the block.

        For the e2e tests: rootful podman 4.3 writes its blob-info cache under
        ``/var/lib/containers/cache`` whatever its storage config says. ``path`` must already
        be a directory (nothing is created outside the namespace); the machine's copy is never
        seen or written, and the tmpfs is detached on the way out (it would also vanish with
        the namespace).
        """
        self.setup()
        _require_private_namespace()
        if not path.is_absolute() or path.resolve() != path or path == Path("/"):
            raise SandboxError(f"refusing a tmpfs over {path}: not a normalized absolute path")
        if path == RUN or RUN in path.parents or CGROUP_ROOT in path.parents:
            raise SandboxError(f"refusing a tmpfs over {path}: the sandbox's own mounts")
        if not path.is_dir():
            raise SandboxError(f"{path} is not a directory on this machine; create it first")
        _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode={mode:o}")
        try:
            yield path
        finally:
            _require_tmpfs(path)
            _umount(path, _MNT_DETACH)

    def summary(self) -> str:
        """One paragraph about the worlds built in this session."""
        if not self.timings:
            return "stackd sandbox: no worlds built"
        setups = [t.setup for t in self.timings]
        downs = [t.teardown for t in self.timings]
        slowest = max(self.timings, key=lambda t: t.setup)
        return (
            f"stackd sandbox ({self.layout} cgroup layout): {len(self.timings)} worlds; "
            f"setup median {statistics.median(setups):.3f}s, min {min(setups):.3f}s, "
            f"max {max(setups):.3f}s ({slowest.test}); "
            f"teardown median {statistics.median(downs):.3f}s, max {max(downs):.3f}s; "
            "setup steps (median): "
            + ", ".join(
                f"{name} {statistics.median(t.phases.get(name, 0.0) for t in self.timings):.3f}s"
                for name in ("journald", "manager_ready", "manager_running", "bus_name")
            )
        )


# --------------------------------------------------------------------------------------------
# The per-test world
# --------------------------------------------------------------------------------------------


class Sandbox:
    """One test's world: a journald and a ``systemd --user`` with their own HOME and bus."""

    def __init__(self, host: SandboxHost, index: int, base: Path, test: str) -> None:
        self.host = host
        self.index = index
        self.test = test
        self.base = base
        self.home = base / "home"
        self.runtime_dir = RUN / "user" / f"w{index}"
        self.user_unit_dir = self.home / ".config" / "systemd" / "user"
        self.etc_unit_dir = ETC_UNIT_DIR
        self.cgroup = f"{host.session_cgroup}/w{index}.slice"
        self.bus_address = f"unix:path={self.runtime_dir}/bus"
        self.setup_seconds = 0.0
        self.phases: dict[str, float] = {}  # seconds per step of the last build / manager start
        self.env: dict[str, str] = {
            "HOME": str(self.home),
            "USER": "root",
            "LOGNAME": "root",
            "SHELL": "/bin/sh",
            "LANG": "C.UTF-8",
            "PATH": os.pathsep.join(
                [sysconfig.get_path("scripts"), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"]
            ),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_STATE_HOME": str(self.home / ".local" / "state"),
            "XDG_DATA_HOME": str(self.home / ".local" / "share"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "DBUS_SESSION_BUS_ADDRESS": self.bus_address,
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
        }
        self._manager: subprocess.Popen[bytes] | None = None
        self._journald: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def __repr__(self) -> str:
        return f"<Sandbox w{self.index} home={self.home} manager={self._manager_pid_or_none()}>"

    # -- paths -------------------------------------------------------------------------------

    @property
    def cgroup_dir(self) -> Path:
        return CGROUP_ROOT / self.cgroup.lstrip("/")

    @property
    def manager_cgroup(self) -> str:
        """The cgroup ``systemd --user`` starts in (named like the real user@.service)."""
        return f"{self.cgroup}/user@{os.getuid()}.service"

    @property
    def manager_cgroup_dir(self) -> Path:
        return CGROUP_ROOT / self.manager_cgroup.lstrip("/")

    @property
    def manager_pid(self) -> int:
        """PID of the running ``systemd --user``."""
        pid = self._manager_pid_or_none()
        if pid is None:
            raise SandboxError("the user manager is not running")
        return pid

    @property
    def journald_pid(self) -> int:
        if self._journald is None or self._journald.poll() is not None:
            raise SandboxError("journald is not running")
        return self._journald.pid

    def _manager_pid_or_none(self) -> int | None:
        if self._manager is None or self._manager.poll() is not None:
            return None
        return self._manager.pid

    @property
    def manager_running(self) -> bool:
        return self._manager_pid_or_none() is not None

    # -- lifecycle -------------------------------------------------------------------------------

    def _create(self) -> None:
        _require_tmpfs(ETC_UNIT_DIR)
        _require_tmpfs(RUN)
        _empty_dir(ETC_UNIT_DIR)
        self.user_unit_dir.mkdir(parents=True)
        for key in ("XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
            Path(self.env[key]).mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(mode=0o700)
        self.cgroup_dir.mkdir()
        started = time.monotonic()
        self._start_journald()
        self.phases["journald"] = time.monotonic() - started
        self.start_manager()

    def _destroy(self) -> None:
        errors: list[BaseException] = []
        for step in (self.stop_manager, self._stop_journald):
            try:
                step()
            except Exception as exc:  # every step must run
                errors.append(exc)
        try:
            kill_cgroup_tree(self.cgroup_dir)
        except SandboxError as exc:
            errors.append(exc)
        try:
            _require_tmpfs(RUN)
            _require_tmpfs(ETC_UNIT_DIR)
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            _empty_dir(ETC_UNIT_DIR)
        except SandboxError as exc:
            errors.append(exc)
        if errors:
            raise SandboxError(f"teardown of {self!r}: {errors}")

    def _start_journald(self) -> None:
        _require_tmpfs(RUN)
        _empty_dir(RUN_LOG_JOURNAL)
        JOURNAL_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        _empty_dir(JOURNAL_SOCKET_DIR)
        listen: list[socket.socket] = []
        try:
            for name, kind in (
                ("socket", socket.SOCK_DGRAM),
                ("stdout", socket.SOCK_STREAM),
                ("dev-log", socket.SOCK_DGRAM),
            ):
                sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
                listen.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                sock.bind(str(JOURNAL_SOCKET_DIR / name))
                (JOURNAL_SOCKET_DIR / name).chmod(0o666)
                if kind == socket.SOCK_STREAM:
                    sock.listen(4096)
            log = self.base / "journald.log"
            with _notify_socket(PRIVATE_STATE / f"notify-journald-{self.index}") as notify:
                self._journald = _spawn(
                    [str(SYSTEMD_JOURNALD)],
                    cgroup_dir=self.cgroup_dir / "journald.service",
                    cgroup_rel=f"{self.cgroup}/journald.service",
                    env={
                        "PATH": self.env["PATH"],
                        "LANG": "C.UTF-8",
                        "NOTIFY_SOCKET": notify.getsockname(),
                    },
                    log=log,
                    cwd=Path("/"),
                    listen=listen,
                )
                _wait_ready(notify, self._journald, "systemd-journald", log, _READY_TIMEOUT)
        finally:
            for sock in listen:
                sock.close()

    def _stop_journald(self) -> None:
        _terminate(self._journald)
        kill_cgroup_tree(self.cgroup_dir / "journald.service")

    def start_manager(self) -> None:
        """Start a fresh ``systemd --user``; return once it is running (or degraded)."""
        if self.manager_running:
            raise SandboxError("the user manager is already running")
        self._starts += 1
        log = self.base / "manager.log"
        notify_path = PRIVATE_STATE / f"notify-manager-{self.index}-{self._starts}"
        with _notify_socket(notify_path) as notify:
            self._manager = _spawn(
                [str(SYSTEMD), "--user"],
                cgroup_dir=self.manager_cgroup_dir,
                cgroup_rel=self.manager_cgroup,
                env=self.env | {"NOTIFY_SOCKET": notify.getsockname()},
                log=log,
                cwd=self.home,
            )
            started = time.monotonic()
            _wait_ready(notify, self._manager, "systemd --user", log, _READY_TIMEOUT)
            self.phases["manager_ready"] = time.monotonic() - started
        notify_path.unlink()
        started = time.monotonic()
        state = self.systemctl("is-system-running", "--wait", check=False, timeout=_READY_TIMEOUT)
        self.phases["manager_running"] = time.monotonic() - started
        if state.stdout.strip() not in {"running", "degraded"}:
            raise SandboxError(
                f"systemd --user is {state.stdout.strip()!r} ({state.stderr.strip()}); "
                f"log {log}:\n{_tail(log)}"
            )
        # The manager takes its bus name a moment after the bus comes up (dbus.service is
        # socket-activated); in-process D-Bus clients expect it as soon as the test starts.
        self.wait_for(
            lambda: "true" in self.run(*_NAME_HAS_OWNER, check=False).stdout,
            timeout=_READY_TIMEOUT,
            interval=0.005,
            what="org.freedesktop.systemd1 on the session bus",
        )
        self.phases["bus_name"] = time.monotonic() - started - self.phases["manager_running"]

    def stop_manager(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop ``systemd --user`` (SIGTERM, SIGKILL after ``timeout``) and all its units."""
        _terminate(self._manager, timeout)
        kill_cgroup_tree(self.manager_cgroup_dir)

    def restart_manager(self) -> None:
        """Stop the manager and start a new one (new PID, same HOME and runtime dir)."""
        self.stop_manager()
        self.start_manager()

    # -- using it ------------------------------------------------------------------------------

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,  # mirrors subprocess.run
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in this world's environment (``env`` adds to it); text output."""
        try:
            return subprocess.run(
                list(argv),
                env=self.env | (env or {}),
                cwd=self.home,
                input=input,
                capture_output=True,
                text=True,
                check=check,
                timeout=timeout,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            _add_output_note(exc)
            raise

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """``systemctl --user ARGS`` against this world's manager."""
        return self.run("systemctl", "--user", "--no-pager", *args, check=check, timeout=timeout)

    def sync_journal(self) -> None:
        """Make journald write out everything it received so far."""
        self.run("journalctl", "--sync")

    def journal(self, *matches: str, **fields: str) -> list[dict[str, Any]]:
        """Entries of this world's journal matching ``FIELD=value`` (all must match), oldest first.

        ``matches`` take raw journalctl matches (``"_SYSTEMD_USER_UNIT=x.service"``);
        keyword arguments are the same, ``journal(SYSLOG_IDENTIFIER="stackd")``.
        ``_SYSTEMD_USER_UNIT`` and the other trusted fields are missing when the sender exited
        before journald read its message (as on any machine): match short-lived output on
        ``MESSAGE``, ``SYSLOG_IDENTIFIER`` or the sender's own fields.
        """
        self.sync_journal()
        args = [*matches, *(f"{key}={value}" for key, value in fields.items())]
        out = self.run("journalctl", "--no-pager", "--quiet", "--all", "-o", "json", *args)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def wait_for_journal(
        self, *matches: str, count: int = 1, timeout: float = 10.0, **fields: str
    ) -> list[dict[str, Any]]:
        """:meth:`journal`, polled until at least ``count`` entries match."""

        def enough() -> list[dict[str, Any]] | None:
            entries = self.journal(*matches, **fields)
            return entries if len(entries) >= count else None

        return self.wait_for(
            enough,
            timeout=timeout,
            interval=0.05,
            what=f"{count} journal entries matching {[*matches, *fields.items()]}",
        )

    def messages(self, *matches: str, **fields: str) -> list[str]:
        """The ``MESSAGE`` of each matching entry (binary messages decoded)."""
        result = []
        for entry in self.journal(*matches, **fields):
            message = entry.get("MESSAGE", "")
            if isinstance(message, list):
                message = bytes(message).decode(errors="replace")
            result.append(str(message))
        return result

    @contextlib.contextmanager
    def other_uids_allowed(self) -> Iterator[str]:
        """Let processes of other uids connect to this world's session bus, for the block.

        dbus-daemon (1.14) lets only its own uid connect to a bus whose config names no
        ``<allow user=...>``; the session config of the machine names none. Inside the
        namespace (never on the machine), ``/usr/share/dbus-1/session.conf`` is overlaid once
        per session with a copy that also includes :data:`DBUS_SESSION_POLICY` when it exists;
        this writes ``<allow user="*"/>`` there and has the running bus reload its config
        (``ReloadConfig``), then removes it and reloads again on the way out. The bus socket
        lives in the 0700 ``XDG_RUNTIME_DIR``, so it is also hard-linked into a 0755 directory;
        the address of that link is what the block gets. EXTERNAL auth still checks the
        caller's real uid (``SO_PEERCRED``), and dbus-daemon admits only uids it can resolve
        (``getpwuid``, for the groups): use one with a passwd entry, such as ``nobody``.
        """
        _require_tmpfs(RUN)
        self.host.overlay_session_bus_config()
        shared = RUN / "user" / f"w{self.index}.shared"
        shared.mkdir(mode=0o755)
        shared.chmod(0o755)
        link = shared / "bus"
        os.link(self.runtime_dir / "bus", link)
        try:
            DBUS_SESSION_POLICY.write_text(DBUS_ANY_UID_POLICY)
            self._reload_bus_config()
            yield f"unix:path={link}"
        finally:
            with contextlib.suppress(FileNotFoundError):
                DBUS_SESSION_POLICY.unlink()
            with contextlib.suppress(subprocess.CalledProcessError):
                self._reload_bus_config()
            link.unlink()
            shared.rmdir()

    def _reload_bus_config(self) -> None:
        self.run(
            "busctl",
            "--user",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "ReloadConfig",
        )

    def unit_path(self) -> list[str]:
        """The manager's ``UnitPath``, highest precedence first."""
        out = self.systemctl("show", "--property=UnitPath", "--value").stdout
        return out.split()

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    @staticmethod
    def wait_for(
        predicate: Callable[[], T | None],
        timeout: float = 10.0,
        interval: float = 0.02,
        what: str = "",
    ) -> T:
        """Poll ``predicate`` until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout}s: {what or predicate!r}")
            time.sleep(interval)

    @staticmethod
    async def async_wait_for(
        predicate: Callable[[], T | None],
        timeout: float = 10.0,  # noqa: ASYNC109 - the same signature as wait_for
        interval: float = 0.02,
        what: str = "",
    ) -> T:
        """:meth:`wait_for` for async tests: sleeps without blocking the event loop."""
        import asyncio

        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout}s: {what or predicate!r}")
            await asyncio.sleep(interval)
