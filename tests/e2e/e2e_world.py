"""One sandbox world running stackd against real podman: what the e2e tests of stackd share.

The world (built by `StackWorld.build`, torn down by `StackWorld.close`):

- a sandboxed `systemd --user` + bus + journald (tests/sandbox.py), and a tmpfs over
  `/var/lib/containers` in the test session's private mount namespace (podman 4.3 writes its
  blob-info cache there whatever its storage config says);
- Debian's `docker-registry` on 127.0.0.1:<free port>, as the transient unit
  `stackd-e2e-registry.service` of that user manager;
- `podman system service` (podman's Docker API) as the transient unit
  `stackd-e2e-podman.service`: docker-compose talks to it through `DOCKER_HOST`, so every
  container (and its conmon) is a child of that unit, never of the oneshot stack or update
  units (with `cgroups="disabled"`, a container started inside a oneshot unit's cgroup would
  be killed when the unit's process ends);
- the podman environment (`CONTAINERS_CONF`, `..._STORAGE_CONF`, `..._REGISTRIES_CONF`,
  `TMPDIR`, `DOCKER_HOST`) given to every unit with `systemctl --user set-environment` before
  anything starts;
- images built with `podman import` in a *separate* builder storage and pushed to the
  registry, so the runtime storage holds only what compose pulled (a new image under the same
  tag reaches the stacks through the registry, as in production);
- stackd's config with `compose_command = ["docker-compose"]` and `engine = "podman"`, and
  the real contrib `stackd.service` unit.

Why docker-compose and not podman-compose: podman-compose 1.6 `up -d` does not recreate a
container after `pull` fetched a new image (it compares only its config hash), so updates
would never take effect; docker-compose (v1 on Debian 12, v2 on Debian 13) through podman's
API socket does, and that is how stackd is run in production (PODMAN_COMPOSE_PROVIDER pinned
to docker compose).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import podman_env as pe
from sandbox import Sandbox, SandboxHost, machine_path

from stackd.core.render import compose_project_name

REPO = Path(__file__).resolve().parents[2]
STACKD_BIN = Path(sys.executable).with_name("stackd")
CONTRIB_UNIT = REPO / "contrib" / "systemd" / "stackd.service"
VAR_LIB_CONTAINERS = Path("/var/lib/containers")
REGISTRY_UNIT = "stackd-e2e-registry.service"
API_UNIT = "stackd-e2e-podman.service"
# Where rootful podman writes when nothing redirects it; none of it may appear on the machine.
MACHINE_PATHS = (
    Path("/run/containers"),
    Path("/run/libpod"),
    Path("/run/crun"),
    Path("/var/lib/containers/storage"),
    Path("/var/lib/containers/cache"),
)
# What may still run in the world's cgroup once the test units are stopped.
WORLD_BASICS = frozenset({"systemd", "systemd-journal", "dbus-daemon", "(sd-pam)"})


def compose_file(services: dict[str, str]) -> str:
    """A compose file: service name -> image, host networking only."""
    lines = ["services:"]
    for service, image in services.items():
        lines += [f"  {service}:", f"    image: {image}", "    network_mode: host"]
    return "\n".join(lines) + "\n"


@dataclass
class Leftovers:
    """What teardown found still there; every list must be empty."""

    containers: list[str] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    machine_paths: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def problems(self) -> dict[str, list[str]]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass
class StackWorld:
    host: SandboxHost
    sandbox: Sandbox
    base: Path
    compose: tuple[str, ...]
    port: int
    env: dict[str, str]  # the runtime podman's environment, DOCKER_HOST included
    builder_env: dict[str, str]  # the image builder's (a separate storage)
    machine_before: dict[str, bool]
    stacks: dict[str, Path] = field(default_factory=dict)

    # -- building -----------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def build(
        cls, host: SandboxHost, base: Path, test: str, provider: pe.ComposeProvider
    ) -> Iterator[StackWorld]:
        """The world with registry and podman API running (stackd not yet started); closed,
        and checked for leftovers, on the way out whatever happened inside."""
        machine_before = {str(p): machine_path(p).exists() for p in MACHINE_PATHS}
        with contextlib.ExitStack() as outer:
            outer.enter_context(host.private_tmpfs(VAR_LIB_CONTAINERS))
            sandbox = host.new_world(base / "sandbox", test)
            outer.callback(host.destroy, sandbox)
            port = pe.free_port()
            env = pe.podman_env(base / "podman", port)
            env["DOCKER_HOST"] = f"unix://{base / 'podman.sock'}"
            world = cls(
                host=host,
                sandbox=sandbox,
                base=base,
                compose=provider.argv,
                port=port,
                env=env,
                builder_env=pe.podman_env(base / "builder", port),
                machine_before=machine_before,
            )
            leftovers = Leftovers()
            try:
                world._start_services()
                yield world
            finally:
                leftovers = world.close()
            problems = leftovers.problems()
            assert not problems, f"the e2e world left things behind: {problems}"

    def _start_services(self) -> None:
        sbx = self.sandbox
        sbx.systemctl("set-environment", *(f"{k}={v}" for k, v in self.env.items()))
        config = pe.registry_config(self.base, self.port)
        self._transient(REGISTRY_UNIT, pe.REGISTRY_BIN, "serve", str(config))
        sock = Path(self.env["DOCKER_HOST"].removeprefix("unix://"))
        self._transient(API_UNIT, "podman", "system", "service", "--time=0", f"unix://{sock}")
        sbx.wait_for(
            lambda: pe.registry_ready(self.port),
            timeout=20,
            interval=0.05,
            what=f"the registry on 127.0.0.1:{self.port}",
        )
        sbx.wait_for(lambda: _api_ping(sock), timeout=30, interval=0.05, what="podman's API")

    def _transient(self, unit: str, *argv: str) -> None:
        self.sandbox.run(
            "systemd-run", "--user", "--quiet", f"--unit={unit}", "--property=Type=exec", *argv
        )

    @functools.cached_property
    def compose_major(self) -> int:
        """The compose provider's major version (1: Python docker-compose, 2: Go)."""
        out = self.sandbox.run(*self.compose, "version", "--short", env=self.env).stdout
        return int(out.strip().lstrip("v").split(".")[0])

    # -- images -------------------------------------------------------------------------------

    def image(self, repo: str) -> str:
        return f"127.0.0.1:{self.port}/stackd-test/{repo}:latest"

    def publish(self, repo: str, marker: str) -> str:
        """Build an image whose /stackd-marker holds `marker` and push it as `repo`:latest
        (from the builder storage); return its id."""
        tag = self.image(repo)
        image_id = pe.build_image(self.builder_env, tag, marker)
        pe.push(self.builder_env, tag)
        return image_id

    # -- stacks and stackd ----------------------------------------------------------------------

    def add_stack(self, name: str, services: dict[str, str]) -> Path:
        directory = self.sandbox.home / "stacks" / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "compose.yaml").write_text(compose_file(services))
        self.stacks[name] = directory
        return directory

    def write_config(self, extra: str = "") -> Path:
        lines = [
            "[daemon]",
            f"compose_command = {json.dumps(list(self.compose))}",
            'engine = "podman"',
            'startup_timeout = "120s"',
            "",
            "[updates]",
            "concurrency = 3",
            'timeout = "3min"',
            extra,
        ]
        for name, directory in self.stacks.items():
            lines += [f"[stacks.{name}]", f"directory = {json.dumps(str(directory))}", ""]
        path = self.sandbox.home / ".config" / "stackd" / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines))
        return path

    def start_stackd(self) -> None:
        """The real contrib unit, ExecStart pointed at the stackd under test."""
        text = CONTRIB_UNIT.read_text()
        text = text.replace(
            "ExecStart=%h/.local/bin/stackd daemon", f"ExecStart={STACKD_BIN} daemon"
        )
        assert f"ExecStart={STACKD_BIN} daemon" in text
        (self.sandbox.user_unit_dir / "stackd.service").write_text(text)
        self.sandbox.daemon_reload()
        result = self.sandbox.systemctl("start", "stackd.service", check=False, timeout=90)
        if result.returncode != 0:
            status = self.sandbox.systemctl("status", "stackd.service", check=False).stdout
            raise AssertionError(f"stackd.service did not start:\n{status}\n{self.logs()}")

    def stackd(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run(str(STACKD_BIN), *args, check=False, timeout=timeout)

    def status(self) -> dict[str, Any]:
        result = self.stackd("status", "--json")
        assert result.returncode in (0, 1), result.stdout + result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    def stack_status(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = next(s for s in self.status()["stacks"] if s["name"] == name)
        return entry

    def history(self, limit: int = 10) -> list[dict[str, Any]]:
        result = self.stackd("history", "--json", "--limit", str(limit))
        assert result.returncode == 0, result.stdout + result.stderr
        runs: list[dict[str, Any]] = json.loads(result.stdout)["runs"]
        return runs

    def unit_states(self, *units: str) -> dict[str, str]:
        out = self.sandbox.systemctl("show", "--property=Id,ActiveState", *units).stdout
        states: dict[str, str] = {}
        for block in out.strip().split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            states[props["Id"]] = props["ActiveState"]
        return states

    def wait_units(self, expected: dict[str, str], timeout: float = 150) -> None:
        def reached() -> bool:
            states = self.unit_states(*expected)
            if any(states[u] == "failed" != want for u, want in expected.items()):
                raise AssertionError(f"a unit failed: {states}\n{self.logs()}")
            return states == expected

        self.sandbox.wait_for(reached, timeout=timeout, interval=0.2, what=f"units {expected}")

    def logs(self, lines: int = 60) -> str:
        """The user manager's journal tail, for failure messages."""
        out = self.sandbox.run("journalctl", "--no-pager", "-n", str(lines), check=False)
        return out.stdout

    # -- podman -------------------------------------------------------------------------------

    def podman(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run("podman", *args, env=self.env, timeout=timeout)

    def containers(self, stack: str, *, all_states: bool = False) -> dict[str, dict[str, Any]]:
        """A stack's containers by compose service (`podman ps --format json` entries), found
        by the compose project label stackd's units set (`-p <compose_project_name>`)."""
        project = compose_project_name(stack)
        args = ["ps", "--format", "json", "--filter", f"label={pe.PROJECT_LABEL}={project}"]
        if all_states:
            args.append("--all")
        entries: list[dict[str, Any]] = json.loads(self.podman(*args).stdout or "[]")
        by_service: dict[str, dict[str, Any]] = {}
        for entry in entries:
            service = entry["Labels"][pe.SERVICE_LABEL]
            assert service not in by_service, f"two containers for {project}/{service}"
            by_service[service] = entry
        return by_service

    def world_processes(self) -> list[tuple[int, str, str]]:
        """(pid, comm, cgroup) of every process in the world's cgroup tree."""
        found = []
        for directory, _, _ in os.walk(self.sandbox.cgroup_dir):
            with contextlib.suppress(FileNotFoundError):
                for pid in (Path(directory) / "cgroup.procs").read_text().split():
                    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                        comm = Path(f"/proc/{pid}/comm").read_text().strip()
                        found.append((int(pid), comm, directory))
        return found

    # -- tear-down ------------------------------------------------------------------------------

    def close(self) -> Leftovers:
        """Stop everything this world started, recording what should not have been there.

        Order: stackd (so it reacts to nothing), the stack units (their ExecStop is
        `compose down`: that is what must leave no container behind), then a look at podman and
        the world's processes, then forced clean-up, the API and the registry, and a last look
        at the world's cgroup and at the machine's paths.
        """
        found = Leftovers()
        sbx = self.sandbox
        if not sbx.manager_running:
            found.errors.append("the user manager was not running at teardown")
        else:
            units = ["stackd.service", *(f"{n}.service" for n in self.stacks)]
            stop = sbx.systemctl("stop", *units, check=False, timeout=180)
            if stop.returncode != 0:
                found.errors.append(f"stopping {units}: {stop.stderr.strip()}")
            found.containers = self._names("ps", "--all", "--format", "{{.Names}}")
            found.pods = self._names("pod", "ps", "--format", "{{.Name}}")
            # "podman" is podman's own default network, not something the stacks made.
            found.networks = [
                n for n in self._names("network", "ls", "--format", "{{.Name}}") if n != "podman"
            ]
            conmons = [f"{p} {c}" for p, c, _ in self.world_processes() if c == "conmon"]
            found.processes += conmons
            stop = sbx.systemctl("stop", API_UNIT, REGISTRY_UNIT, check=False, timeout=60)
            if stop.returncode != 0:
                found.errors.append(f"stopping the API and registry: {stop.stderr.strip()}")
        for env in (self.env, self.builder_env):
            try:
                pe.cleanup(env)
            except (subprocess.SubprocessError, OSError) as exc:
                found.errors.append(f"podman clean-up: {exc}")
        found.processes += [
            f"{pid} {comm} ({cgroup})"
            for pid, comm, cgroup in self.world_processes()
            if comm not in WORLD_BASICS
        ]
        after = {str(p): machine_path(p).exists() for p in MACHINE_PATHS}
        found.machine_paths = [p for p, there in after.items() if there != self.machine_before[p]]
        shutil.rmtree(self.base / "podman" / "tmp", ignore_errors=True)
        return found

    def _names(self, *args: str) -> list[str]:
        result = self.sandbox.run("podman", *args, env=self.env, check=False, timeout=60)
        if result.returncode != 0:
            return [f"`podman {' '.join(args)}` failed: {result.stderr.strip()}"]
        return [line for line in result.stdout.splitlines() if line.strip()]


def _api_ping(sock: Path) -> bool:
    """True once podman's Docker API answers `GET /_ping` on `sock`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
            return s.recv(64).split(b" ")[1:2] == [b"200"]
    except OSError:
        return False
