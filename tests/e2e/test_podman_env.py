"""Smoke test: real podman, a compose provider and a local registry work on this machine."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import podman_env as pe
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

COMPOSE = """\
services:
  web:
    image: {image}
    network_mode: host
  worker:
    image: {image}
    network_mode: host
"""
# Where rootful podman writes when nothing redirects it; none of it may appear on the machine.
HOST_PATHS = (
    "/run/containers",
    "/run/libpod",
    "/run/crun",
    "/var/lib/containers/storage",
    "/var/lib/containers/cache",
)


@pytest.fixture
def provider() -> pe.ComposeProvider:
    if os.geteuid() != 0:
        pytest.skip("e2e tests run podman as root")
    try:
        return pe.ensure_tools()
    except pe.ToolsMissing as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(exc))


@pytest.fixture
def mounts() -> Iterator[pe.PrivateMounts]:
    with pe.PrivateMounts() as m:
        yield m


def _services(containers: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for c in containers:
        labels = c["Labels"]
        assert isinstance(labels, dict)
        out[labels["com.docker.compose.service"]] = c
    return out


def test_compose_stack_pulls_runs_and_updates(
    provider: pe.ComposeProvider, mounts: pe.PrivateMounts, tmp_path: Path
) -> None:
    before = {p: os.path.exists(p) for p in HOST_PATHS}
    port = pe.free_port()
    env = pe.podman_env(tmp_path / "podman", port)
    ns = mounts.prefix()
    project_dir = tmp_path / "demo"
    project_dir.mkdir()
    in_project = mounts.prefix(project_dir)
    timings: dict[str, float] = {}
    try:
        t = time.monotonic()
        with pe.start_registry(tmp_path, port) as registry:
            timings["registry_start"] = time.monotonic() - t
            tag = registry.image()

            t = time.monotonic()
            first = pe.build_image(env, tag, "one", prefix=ns)
            pe.push(env, tag, prefix=ns)
            timings["build_push"] = time.monotonic() - t
            # The registry serves it: drop the local copy so `pull` has to fetch it.
            pe.run(["podman", "rmi", "--force", tag], env, prefix=ns)

            (project_dir / "compose.yaml").write_text(COMPOSE.format(image=tag))
            compose_env = dict(env)
            api: contextlib.AbstractContextManager[dict[str, str]] = (
                pe.api_socket(env, tmp_path, prefix=ns)
                if provider.needs_api_socket
                else contextlib.nullcontext({})
            )
            with api as extra:
                compose_env.update(extra)
                compose = [*provider.argv, "-p", "demo"]

                t = time.monotonic()
                pe.run([*compose, "pull"], compose_env, prefix=in_project)
                pe.run([*compose, "up", "-d", "--remove-orphans"], compose_env, prefix=in_project)
                timings["pull_up"] = time.monotonic() - t

                running = _services(pe.project_containers(env, "demo", prefix=ns))
                assert set(running) == {"web", "worker"}
                for c in running.values():
                    assert c["State"] == "running"
                    assert c["ImageID"] == first
                    assert c["Image"] == tag

                # A new image under the same tag: what an update has to bring in.
                second = pe.build_image(env, tag, "two", prefix=ns)
                pe.push(env, tag, prefix=ns)
                pe.run(["podman", "tag", second, "localhost/stackd-test/second"], env, prefix=ns)
                pe.run(["podman", "rmi", tag], env, prefix=ns)
                assert second != first

                t = time.monotonic()
                pe.run([*compose, "pull"], compose_env, prefix=in_project)
                assert pe.image_id(env, tag, prefix=ns) == second
                pe.run([*compose, "up", "-d", "--remove-orphans"], compose_env, prefix=in_project)
                timings["update"] = time.monotonic() - t

                after = _services(pe.project_containers(env, "demo", prefix=ns))
                expected = second if provider.recreates_on_image_change else first
                assert {c["ImageID"] for c in after.values()} == {expected}
                if not provider.recreates_on_image_change:
                    # podman-compose only recreates on config changes: it takes a forced
                    # recreate to run the pulled image.
                    pe.run(
                        [*compose, "up", "-d", "--remove-orphans", "--force-recreate"],
                        compose_env,
                        prefix=in_project,
                    )
                    after = _services(pe.project_containers(env, "demo", prefix=ns))
                    assert {c["ImageID"] for c in after.values()} == {second}
                marker = pe.run(
                    [
                        "podman",
                        "exec",
                        after["web"]["Names"][0],  # type: ignore[index]
                        "cat",
                        "/stackd-marker",
                    ],
                    env,
                    prefix=ns,
                ).stdout
                assert marker.strip() == "two"

                t = time.monotonic()
                pe.run([*compose, "down"], compose_env, prefix=in_project)
                timings["down"] = time.monotonic() - t
                assert pe.project_containers(env, "demo", prefix=ns) == []
    finally:
        pe.cleanup(env, prefix=ns)
    print("timings:", {k: round(v, 2) for k, v in timings.items()})
    assert {p: os.path.exists(p) for p in HOST_PATHS} == before
