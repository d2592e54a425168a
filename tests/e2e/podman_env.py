"""Real podman, a compose provider and a local registry for stackd's end-to-end tests.

Everything podman writes goes under one temp directory: storage, run root, the OCI runtime's
state (a `crun --root` wrapper), netavark's config dir, events, temp files. Rootful podman 4.3
still insists on two fixed places, `/run/containers/networks` and the blob-info cache in
`/var/lib/containers/cache`; run podman inside a private mount namespace with a tmpfs over `/run`
and over `/var/lib/containers` (`PrivateMounts` below, or the systemd sandbox) and the machine
stays clean.

Facts this module encodes (Debian 12, podman 4.3.1, crun 1.8.1, podman-compose 1.6.0):
- crun refuses the hybrid cgroup layout even with `cgroups="disabled"`: the namespace shows a
  pure cgroup2 tree at /sys/fs/cgroup.
- podman lowers its own RLIMIT_NPROC hard limit to 32768 before starting conmon, so
  `default_ulimits` must stay at or below that for nproc and at or below the machine's hard
  limit for nofile, or crun fails with `setrlimit ...: Operation not permitted`.
- Containers use the host network (`network_mode: host` in compose files): no bridge, no
  iptables, no traffic to private address ranges.
- podman-compose `up -d` recreates a container only when its compose config hash changes, never
  because `pull` fetched a new image; docker-compose (through podman's Docker API socket) does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")
REGISTRY_BIN = "docker-registry"
TEST_REPO = "stackd-test/app"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
# docker-compose v2 (Debian 13) is a docker CLI plugin; the binary also runs on its own.
COMPOSE_V2_PLUGINS = (
    "/usr/libexec/docker/cli-plugins/docker-compose",
    "/usr/lib/docker/cli-plugins/docker-compose",
)
# Applets linked into the test image; the entrypoint only needs sh, sleep and cat.
APPLETS = ("sh", "sleep", "cat", "echo", "ls", "true", "false", "env", "httpd", "wget")
ENTRYPOINT = """#!/bin/sh
trap 'exit 0' TERM INT
echo "stackd-test marker: $(cat /stackd-marker)"
while :; do sleep 3600 & wait $!; done
"""
# podman caps its own RLIMIT_NPROC at 32768; stay well below it.
NPROC_LIMIT = 4096
NOFILE_LIMIT = 20000


class ToolsMissing(RuntimeError):
    """A tool the e2e tests need is not installed (see .ci/install-e2e.sh)."""


@dataclass(frozen=True)
class ComposeProvider:
    """How to run compose against podman.

    `argv` is the command prefix (what stackd's `compose_command` would be). `env` holds the
    extra environment the provider needs on top of `podman_env()`.
    """

    name: str
    argv: tuple[str, ...]
    recreates_on_image_change: bool
    needs_api_socket: bool = False
    env: Mapping[str, str] = field(default_factory=dict)


def _which(name: str) -> str | None:
    # Prefer the interpreter's own venv (podman-compose is installed there by pip).
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def detect_compose_provider(preferred: str | None = None) -> ComposeProvider | None:
    """Find a compose provider; `preferred` (or STACKD_E2E_COMPOSE) picks one by name.

    Names: "podman-compose" (default, no daemon needed) or "docker-compose" (needs
    `podman system service`, see `api_socket()`).
    """
    choice = preferred or os.environ.get("STACKD_E2E_COMPOSE") or "podman-compose"
    if choice == "podman-compose":
        path = _which("podman-compose")
        if path:
            return ComposeProvider("podman-compose", (path,), recreates_on_image_change=False)
    if choice == "docker-compose":
        path = _which("docker-compose") or next(
            (p for p in COMPOSE_V2_PLUGINS if os.access(p, os.X_OK)), None
        )
        if path:
            return ComposeProvider(
                "docker-compose", (path,), recreates_on_image_change=True, needs_api_socket=True
            )
    return None


def ensure_tools(preferred: str | None = None) -> ComposeProvider:
    """Check podman, the registry, busybox and a compose provider; raise ToolsMissing if not."""
    missing = [
        t
        for t in ("podman", "crun", "conmon", REGISTRY_BIN, "unshare", "nsenter")
        if shutil.which(t) is None
    ]
    if not BUSYBOX.is_file():
        missing.append(f"{BUSYBOX} (busybox-static)")
    provider = detect_compose_provider(preferred)
    if provider is None:
        missing.append(f"compose provider {preferred or 'podman-compose'}")
    if missing:
        raise ToolsMissing("missing for e2e: " + ", ".join(missing) + " (run .ci/install-e2e.sh)")
    assert provider is not None
    return provider


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))


def podman_env(base: Path, registry_port: int) -> dict[str, str]:
    """Write podman's config files under `base` and return the environment that selects them."""
    base = base.resolve()
    dirs = {name: base / name for name in ("storage", "runroot", "tmp", "networks", "crun", "bin")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    crun = dirs["bin"] / "crun"
    # podman passes no --root to crun when rootful, so crun's state would land in /run/crun.
    crun.write_text(
        f'#!/bin/sh\nexec {shutil.which("crun") or "/usr/bin/crun"} --root {dirs["crun"]} "$@"\n'
    )
    crun.chmod(0o755)
    nofile = NOFILE_LIMIT
    with contextlib.suppress(ValueError, OSError):
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY:
            nofile = min(nofile, hard)
    containers_conf = base / "containers.conf"
    containers_conf.write_text(
        "[containers]\n"
        'cgroups = "disabled"\n'
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={NPROC_LIMIT}:{NPROC_LIMIT}"]\n'
        'log_driver = "k8s-file"\n'
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f"events_logfile_path = {_toml_str(base / 'events.log')}\n"
        f"tmp_dir = {_toml_str(dirs['tmp'])}\n"
        f"image_copy_tmp_dir = {_toml_str(dirs['tmp'])}\n"
        f"static_dir = {_toml_str(dirs['storage'] / 'libpod')}\n"
        f"volume_path = {_toml_str(dirs['storage'] / 'volumes')}\n"
        "[network]\n"
        'network_backend = "netavark"\n'
        f"network_config_dir = {_toml_str(dirs['networks'])}\n"
        "[engine.runtimes]\n"
        f"crun = [{_toml_str(crun)}]\n"
    )
    storage_conf = base / "storage.conf"
    storage_conf.write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f"graphroot = {_toml_str(dirs['storage'])}\n"
        f"runroot = {_toml_str(dirs['runroot'])}\n"
    )
    registries_conf = base / "registries.conf"
    registries_conf.write_text(
        "unqualified-search-registries = []\n"
        "[[registry]]\n"
        f'location = "127.0.0.1:{registry_port}"\n'
        "insecure = true\n"
    )
    return {
        "CONTAINERS_CONF": str(containers_conf),
        "CONTAINERS_STORAGE_CONF": str(storage_conf),
        "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
        "TMPDIR": str(dirs["tmp"]),
    }


def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    prefix: Sequence[str] = (),
    cwd: Path | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` with `env` on top of os.environ, behind `prefix` (e.g. PrivateMounts.prefix)."""
    full_env = {**os.environ, **env}
    proc = subprocess.run(
        [*prefix, *argv],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return proc


class PrivateMounts:
    """A long-lived private mount namespace for podman outside the systemd sandbox.

    A holder process keeps it alive; `prefix(cwd)` is the nsenter command that runs a program
    in it. Inside: tmpfs over /run and /var/lib/containers, a pure cgroup2 view of
    /sys/fs/cgroup (crun refuses the hybrid layout).
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateMounts:
        varlib = Path("/var/lib/containers")
        if not varlib.is_dir():
            # An empty mount point; .ci/install-e2e.sh creates it up front.
            varlib.mkdir(mode=0o700, parents=True)
        script = (
            "set -e; mount -t tmpfs -o mode=755 stackd-e2e-run /run; "
            "mount -t tmpfs -o mode=700 stackd-e2e-varlib /var/lib/containers; "
            "umount -l /sys/fs/cgroup; mount -t cgroup2 stackd-e2e-cg2 /sys/fs/cgroup; "
            "echo ready; exec sleep infinity"
        )
        self._proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != b"ready":
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError("could not set up the private mount namespace")
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def prefix(self, cwd: Path | None = None) -> list[str]:
        wd = [f"--wd={cwd}"] if cwd is not None else []
        return ["nsenter", "-t", str(self.pid), "-m", *wd, "--"]

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None


@dataclass
class Registry:
    port: int
    process: subprocess.Popen[bytes]
    root: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def image(self, repo: str = TEST_REPO, tag: str = "latest") -> str:
        return f"{self.host}/{repo}:{tag}"


def registry_config(base: Path, port: int) -> Path:
    """Write a config for Debian's registry on 127.0.0.1:`port`, storage under `base`."""
    root = base / "registry"
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: stackd-e2e\n"
    )
    return config


def registry_ready(port: int) -> bool:
    """True once the registry on 127.0.0.1:`port` answers `GET /v2/` with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


@contextlib.contextmanager
def start_registry(base: Path, port: int, timeout: float = 15) -> Iterator[Registry]:
    """Run Debian's distribution registry on 127.0.0.1:`port`, storage under `base`."""
    config = registry_config(base, port)
    root = config.parent
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen(
        [REGISTRY_BIN, "serve", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not registry_ready(port):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"registry exited {proc.returncode}: {(root / 'registry.log').read_text()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry not ready on 127.0.0.1:{port}")
            time.sleep(0.05)
        yield Registry(port, proc, root)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _rootfs_tar(dest: Path, marker: str) -> None:
    """A busybox rootfs with /stackd-marker = `marker` and /stackd-app as entrypoint."""

    def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, 0
        tar.addfile(info, fileobj=_BytesReader(data))

    with tarfile.open(dest, "w") as tar:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "run"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX), arcname="bin/busybox", filter=_root_owned)
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        add_bytes(tar, "etc/passwd", b"root:x:0:0:root:/:/bin/sh\n", 0o644)
        add_bytes(tar, "etc/group", b"root:x:0:\n", 0o644)
        add_bytes(tar, "stackd-marker", f"{marker}\n".encode(), 0o644)
        add_bytes(tar, "stackd-app", ENTRYPOINT.encode(), 0o755)


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        chunk, self._pos = self._data[self._pos : end], min(end, len(self._data))
        return chunk


def build_image(
    env: Mapping[str, str], tag: str, marker: str, *, prefix: Sequence[str] = ()
) -> str:
    """Import a busybox image tagged `tag` whose /stackd-marker holds `marker`; return its ID."""
    with tempfile.TemporaryDirectory(dir=env.get("TMPDIR")) as tmp:
        tar = Path(tmp) / "rootfs.tar"
        _rootfs_tar(tar, marker)
        proc = run(
            [
                "podman",
                "import",
                "--quiet",
                "--change",
                'CMD ["/stackd-app"]',
                "--change",
                "LABEL io.stackd.test=1",
                "--change",
                f"LABEL io.stackd.test.marker={marker}",
                str(tar),
                tag,
            ],
            env,
            prefix=prefix,
        )
    return proc.stdout.strip().removeprefix("sha256:")


def push(env: Mapping[str, str], tag: str, *, prefix: Sequence[str] = ()) -> None:
    run(["podman", "push", "--quiet", tag], env, prefix=prefix)


def image_id(env: Mapping[str, str], ref: str, *, prefix: Sequence[str] = ()) -> str:
    return run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", ref], env, prefix=prefix
    ).stdout.strip()


def project_containers(
    env: Mapping[str, str], project: str, *, prefix: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """`podman ps -a --format json` for one compose project.

    Useful fields: Names (list), State ("running" | "exited" ...), Image (the name used),
    ImageID (full hex id, no "sha256:"), Labels["com.docker.compose.service"].
    """
    out = run(
        [
            "podman",
            "ps",
            "-a",
            "--format",
            "json",
            "--filter",
            f"label=com.docker.compose.project={project}",
        ],
        env,
        prefix=prefix,
    ).stdout
    result: list[dict[str, Any]] = json.loads(out or "[]")
    return result


@contextlib.contextmanager
def api_socket(
    env: Mapping[str, str], base: Path, *, prefix: Sequence[str] = ()
) -> Iterator[dict[str, str]]:
    """Run `podman system service` for docker-compose; yields {"DOCKER_HOST": ...}."""
    sock = base / "podman.sock"
    proc = subprocess.Popen(
        [*prefix, "podman", "system", "service", "--time=0", f"unix://{sock}"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("podman system service did not come up")
            time.sleep(0.05)
        yield {"DOCKER_HOST": f"unix://{sock}"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cleanup(env: Mapping[str, str], *, prefix: Sequence[str] = ()) -> None:
    """Remove every container, pod, network, image and the storage of this private podman."""
    if "CONTAINERS_STORAGE_CONF" not in env:
        raise ValueError("refusing to reset podman without a private CONTAINERS_STORAGE_CONF")
    for argv in (
        ["podman", "rm", "--all", "--force", "--time", "0"],
        ["podman", "pod", "rm", "--all", "--force"],
        ["podman", "network", "prune", "--force"],
        # Safe: CONTAINERS_STORAGE_CONF points at the private graphroot/runroot.
        ["podman", "system", "reset", "--force"],
    ):
        run(argv, env, prefix=prefix, check=False, timeout=60)
