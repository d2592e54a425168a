"""stackd end to end: real stacks in real podman, driven through the real stackd.service.

One world for the module (see e2e_world.py for how it is built and why): three stacks, `web`
(services `app` and `sidecar`), `worker` (service `worker`) and `broken` (an image the registry
does not have), docker-compose against `podman system service`, a local registry.

The world moves through four phases, each a module fixture that runs once, records what it
saw, and is requested by the tests that need it:

    deployed  stackd starts, renders the units, starts the stacks        (snapshot: `Deploy`)
    updated   new images pushed under the same tags, `stackd update`     (snapshot: `Update`)
    pruned    `sidecar` removed from web's compose file, `stackd update web`
    reloaded  `stackd reload`: web.service rewritten (new compose digest) and restarted

Tests assert on the snapshots, so they pass in any order and alone (`-k`); a test that needs a
later phase requests its fixture, which brings the world there first. Tests that touch the
world without moving it to another phase (the shadowed unit) put it back as they found it.
The module fixture's teardown asserts that nothing is left: no container, pod or network, no
conmon or registry process in the world's cgroup, nothing under the machine's podman paths.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import podman_env as pe
import pytest
from e2e_world import VAR_LIB_CONTAINERS, StackWorld, compose_file
from sandbox import SandboxHost, machine_path

from stackd.core.render import compose_project_name

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

STACKS = ("web", "worker", "broken")
UNITS = tuple(f"{name}.service" for name in STACKS)


@pytest.fixture(scope="module")
def provider() -> pe.ComposeProvider:
    if os.geteuid() != 0:
        pytest.skip("e2e tests run podman as root")
    try:
        tools = pe.ensure_tools("docker-compose")
        if not VAR_LIB_CONTAINERS.is_dir():
            raise pe.ToolsMissing(f"{VAR_LIB_CONTAINERS} is missing (mount point for a tmpfs)")
    except pe.ToolsMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    return tools


@dataclass(frozen=True)
class Images:
    app: str
    sidecar: str


@pytest.fixture(scope="module")
def world(
    sandbox_host: SandboxHost,
    provider: pe.ComposeProvider,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StackWorld]:
    base = tmp_path_factory.mktemp("e2e-stacks")
    with StackWorld.build(sandbox_host, base, __name__, provider) as built:
        yield built


@dataclass(frozen=True)
class Deploy:
    images: Images
    containers: dict[str, dict[str, dict[str, Any]]]  # stack -> service -> podman ps entry
    status: dict[str, Any]
    units: dict[str, str]


@pytest.fixture(scope="module")
def deployed(world: StackWorld) -> Deploy:
    images = Images(
        app=world.publish("app", "app-one"), sidecar=world.publish("sidecar", "side-one")
    )
    world.add_stack("web", {"app": world.image("app"), "sidecar": world.image("sidecar")})
    world.add_stack("worker", {"worker": world.image("app")})
    world.add_stack("broken", {"ghost": world.image("missing")})
    world.write_config()
    world.start_stackd()
    world.wait_units(
        {"web.service": "active", "worker.service": "active", "broken.service": "failed"}
    )
    # The daemon's view follows the manager's signals: wait until it has seen the failure too.
    world.sandbox.wait_for(
        lambda: world.stack_status("broken")["active_state"] == "failed",
        timeout=20,
        interval=0.1,
        what="stackd status showing broken failed",
    )
    return Deploy(
        images=images,
        containers={p: world.containers(p, all_states=True) for p in STACKS},
        status=world.status(),
        units=world.unit_states(*UNITS),
    )


@dataclass(frozen=True)
class Update:
    before: Images
    after: Images
    returncode: int
    output: str
    run: dict[str, Any]
    containers: dict[str, dict[str, dict[str, Any]]]
    finished_events: list[dict[str, Any]]
    stack_events: list[dict[str, Any]]
    units: dict[str, str]


@pytest.fixture(scope="module")
def updated(world: StackWorld, deployed: Deploy) -> Update:
    after = Images(
        app=world.publish("app", "app-two"), sidecar=world.publish("sidecar", "side-two")
    )
    assert after.app != deployed.images.app
    assert after.sidecar != deployed.images.sidecar
    started = time.monotonic()
    result = world.stackd("update", timeout=240)
    print(f"stackd update took {time.monotonic() - started:.1f}s")
    runs = world.history()
    finished = world.sandbox.wait_for_journal(
        SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="update.finished"
    )
    return Update(
        before=deployed.images,
        after=after,
        returncode=result.returncode,
        output=result.stdout + result.stderr,
        run=runs[0],
        containers={p: world.containers(p, all_states=True) for p in STACKS},
        finished_events=finished,
        stack_events=world.sandbox.journal(
            SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="update.stack.finished"
        ),
        units=world.unit_states(*UNITS),
    )


@dataclass(frozen=True)
class Prune:
    returncode: int
    output: str
    run: dict[str, Any]
    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    findings: list[dict[str, Any]]
    render_diff: str


@pytest.fixture(scope="module")
def pruned(world: StackWorld, updated: Update) -> Prune:
    before = world.containers("web", all_states=True)
    compose = world.stacks["web"] / "compose.yaml"
    compose.write_text(compose_file({"app": world.image("app")}))
    result = world.stackd("update", "web", timeout=180)
    return Prune(
        returncode=result.returncode,
        output=result.stdout + result.stderr,
        run=world.history()[0],
        before=before,
        after=world.containers("web", all_states=True),
        findings=world.status()["findings"],
        render_diff=world.stackd("render", "--diff").stdout,
    )


@dataclass(frozen=True)
class Reload:
    returncode: int
    output: str
    before: dict[str, dict[str, dict[str, Any]]]
    after: dict[str, dict[str, dict[str, Any]]]
    render_diff: str
    unit_text: str


@pytest.fixture(scope="module")
def reloaded(world: StackWorld, pruned: Prune) -> Reload:
    """After the prune: `stackd reload` picks up web's new compose digest."""
    before = {p: world.containers(p) for p in ("web", "worker")}
    result = world.stackd("reload")
    # The reconcile restarts web.service in the background: wait for a new `app` container.
    world.sandbox.wait_for(
        lambda: (
            (c := world.containers("web").get("app")) is not None
            and c["Id"] != before["web"]["app"]["Id"]
            and world.unit_states("web.service") == {"web.service": "active"}
        ),
        timeout=60,
        interval=0.2,
        what="web restarted by the reload",
    )
    return Reload(
        returncode=result.returncode,
        output=result.stdout + result.stderr,
        before=before,
        after={p: world.containers(p, all_states=True) for p in ("web", "worker")},
        render_diff=world.stackd("render", "--diff").stdout,
        unit_text=(world.sandbox.user_unit_dir / "web.service").read_text(),
    )


def by_stack(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["stack"]: r for r in run["results"]}


def changes(result: dict[str, Any]) -> dict[str, tuple[str, str | None, str | None]]:
    return {c["service"]: (c["change"], c["old"], c["new"]) for c in result["changes"]}


def image_ids(containers: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {service: c["ImageID"] for service, c in containers.items()}


# -- deploy ------------------------------------------------------------------------------------


class TestDeploy:
    def test_web_and_worker_run_from_the_registry(self, deployed: Deploy) -> None:
        assert deployed.units == {
            "web.service": "active",
            "worker.service": "active",
            "broken.service": "failed",
        }
        web, worker = deployed.containers["web"], deployed.containers["worker"]
        assert sorted(web) == ["app", "sidecar"]
        assert sorted(worker) == ["worker"]
        for c in [*web.values(), *worker.values()]:
            assert c["State"] == "running", c
        assert image_ids(web) == {"app": deployed.images.app, "sidecar": deployed.images.sidecar}
        assert image_ids(worker) == {"worker": deployed.images.app}

    def test_broken_stack_fails_alone_and_status_says_so(self, deployed: Deploy) -> None:
        assert deployed.containers["broken"] == {}
        stacks = {s["name"]: s for s in deployed.status["stacks"]}
        assert sorted(stacks) == sorted(STACKS)
        assert (stacks["broken"]["active_state"], stacks["broken"]["sub_state"]) == (
            "failed",
            "failed",
        )
        for name in ("web", "worker"):
            assert (stacks[name]["active_state"], stacks[name]["sub_state"]) == (
                "active",
                "exited",
            )
            assert stacks[name]["findings"] == []
        # A stack that fails to start is no ownership finding: the units are stackd's.
        assert deployed.status["findings"] == []
        assert deployed.status["daemon"]["manager"] == "connected"

    def test_units_are_stackds_with_the_compose_command(
        self, world: StackWorld, deployed: Deploy
    ) -> None:
        for name in STACKS:
            unit = world.sandbox.user_unit_dir / f"{name}.service"
            text = unit.read_text()
            assert text.startswith("# stackd: managed unit, sha256=")
            assert f"WorkingDirectory={world.stacks[name]}" in text
            assert f"-p {compose_project_name(name)} up -d --remove-orphans" in text
            assert (world.sandbox.user_unit_dir / f"{name}-update.service").is_file()


# -- ownership under load ----------------------------------------------------------------------


class TestShadowedWhileRunning:
    def test_stale_copy_in_etc_is_reported_live_and_cleared(
        self, world: StackWorld, deployed: Deploy
    ) -> None:
        running = {s: c["Id"] for s, c in world.containers("web").items()}
        assert running, "web has no running containers"
        owned = world.sandbox.user_unit_dir / "web.service"
        stale = world.sandbox.etc_unit_dir / "web.service"
        # An older hand-made copy, as an admin might have left in /etc/systemd/user.
        stale.write_text(owned.read_text().replace("up -d --remove-orphans", "up -d"))
        try:

            def shadowed() -> list[dict[str, Any]]:
                return [
                    f
                    for f in world.stack_status("web")["findings"]
                    if f["kind"] == "shadowed" and f["unit"] == "web.service"
                ]

            found = world.sandbox.wait_for(
                shadowed, timeout=10, interval=0.1, what="a live `shadowed` finding"
            )
            # Debian links /etc/xdg/systemd/user to /etc/systemd/user and the manager reads
            # it first: stackd names the file as the manager does, through the earlier dir.
            paths = {Path(p).resolve() for p in found[0]["paths"]}
            assert paths == {owned.resolve(), stale.resolve()}, found
            doc = world.status()
            assert any(f["kind"] == "shadowed" for f in doc["findings"])
        finally:
            stale.unlink(missing_ok=True)
        world.sandbox.wait_for(
            lambda: world.stack_status("web")["findings"] == [],
            timeout=10,
            interval=0.1,
            what="the `shadowed` finding cleared",
        )
        events = world.sandbox.journal(SYSLOG_IDENTIFIER="stackd", STACKD_UNIT="web.service")
        kinds = [e["STACKD_EVENT"] for e in events if e["STACKD_EVENT"].startswith("finding.")]
        assert kinds[-2:] == ["finding.raised", "finding.cleared"]
        # Reporting touched nothing: the same containers run, the unit is still active.
        assert {s: c["Id"] for s, c in world.containers("web").items()} == running
        assert world.unit_states("web.service") == {"web.service": "active"}


# -- update ------------------------------------------------------------------------------------


class TestUpdate:
    def test_exit_status_and_summary_name_broken(self, updated: Update) -> None:
        assert updated.returncode == 1, updated.output
        summary = updated.output.strip().splitlines()[-1]
        assert "3 stacks, 2 succeeded, 1 failed" in summary, updated.output
        assert "broken" in summary

    def test_web_and_worker_run_the_new_images(self, updated: Update) -> None:
        web, worker = updated.containers["web"], updated.containers["worker"]
        assert image_ids(web) == {"app": updated.after.app, "sidecar": updated.after.sidecar}
        assert image_ids(worker) == {"worker": updated.after.app}
        for c in [*web.values(), *worker.values()]:
            assert c["State"] == "running", c
        assert updated.units == {
            "web.service": "active",
            "worker.service": "active",
            "broken.service": "failed",
        }

    def test_history_records_old_to_new_per_service(
        self, world: StackWorld, updated: Update
    ) -> None:
        run = updated.run
        assert run["result"] == "partial"
        assert sorted(run["succeeded"]) == ["web", "worker"]
        assert run["failed"] == ["broken"]
        results = by_stack(run)
        assert changes(results["web"]) == {
            "app": ("updated", updated.before.app, updated.after.app),
            "sidecar": ("updated", updated.before.sidecar, updated.after.sidecar),
        }
        assert changes(results["worker"]) == {
            "worker": ("updated", updated.before.app, updated.after.app)
        }
        broken = results["broken"]
        assert broken["result"] == "failed"
        # docker-compose 1.x `pull` exits 0 on podman's "manifest unknown": podman's API sends
        # the error event with `"progressDetail": {}`, which compose 1.x takes for progress and
        # never checks for an error. The missing image then fails `up`. Compose v2 checks.
        expected = {"compose up"} if world.compose_major == 1 else {"compose pull", "compose up"}
        assert broken["failed_command"] in expected, broken
        assert broken["exit_status"] not in (None, 0)
        assert broken["error"] == f"`{broken['failed_command']}` exited {broken['exit_status']}"
        assert broken["changes"] == []

    def test_journal_holds_one_summary_naming_broken(self, updated: Update) -> None:
        assert len(updated.finished_events) == 1
        event = updated.finished_events[0]
        assert event["STACKD_RUN"] == updated.run["run"]
        assert event["STACKD_FAILED"] == "broken"
        assert event["PRIORITY"] == "3"
        assert "broken" in event["MESSAGE"]
        # One event per stack, the web one naming each service's old -> new image.
        messages = {e["STACKD_STACK"]: e["MESSAGE"] for e in updated.stack_events}
        assert len(updated.stack_events) == 3
        assert sorted(messages) == sorted(STACKS)
        old, new = updated.before, updated.after
        assert f"app: updated ({old.app[:12]} -> {new.app[:12]})" in messages["web"]
        assert f"sidecar: updated ({old.sidecar[:12]} -> {new.sidecar[:12]})" in messages["web"]
        assert f"worker: updated ({old.app[:12]} -> {new.app[:12]})" in messages["worker"]
        assert messages["broken"].startswith("update of broken: failed")

    def test_containers_really_run_the_new_filesystem(
        self, world: StackWorld, updated: Update
    ) -> None:
        for project, service, marker in (
            ("web", "app", "app-two"),
            ("web", "sidecar", "side-two"),
            ("worker", "worker", "app-two"),
        ):
            name = updated.containers[project][service]["Names"][0]
            out = world.podman("exec", name, "cat", "/stackd-marker").stdout
            assert out.strip() == marker


# -- --remove-orphans --------------------------------------------------------------------------


class TestRemovedService:
    """`sidecar` is removed from web's compose file, then `stackd update web` runs (no reload).

    What happens: the update unit runs `compose up -d --remove-orphans` in web's directory, so
    it reads the edited file and removes the orphaned `sidecar` container (docker-compose 1.29
    kills and removes it); `app` keeps running, the same container. The history records
    `sidecar: missing`. web.service itself is not rewritten: the daemon reconciles on start and
    on `stackd reload`, not when a compose file changes, and its ownership checks compare with
    what it rendered at the last reconcile, so there is no finding; `stackd render --diff`
    shows the new compose digest waiting. `stackd reload` then rewrites web.service and
    restarts it (compose down + up: a new `app` container); worker is left alone.
    """

    def test_orphan_disappears_after_the_update(self, pruned: Prune) -> None:
        assert pruned.returncode == 0, pruned.output
        assert sorted(pruned.before) == ["app", "sidecar"]
        assert sorted(pruned.after) == ["app"]
        assert pruned.after["app"]["Id"] == pruned.before["app"]["Id"]
        assert pruned.after["app"]["State"] == "running"

    def test_history_shows_the_service_missing(self, pruned: Prune) -> None:
        run = pruned.run
        assert run["stacks"] == ["web"]
        assert run["result"] == "success"
        web = by_stack(run)["web"]
        assert changes(web) == {
            "app": ("unchanged", pruned.before["app"]["ImageID"], pruned.before["app"]["ImageID"]),
            "sidecar": ("missing", pruned.before["sidecar"]["ImageID"], None),
        }

    def test_stack_unit_waits_for_reload(self, pruned: Prune) -> None:
        # No finding: the files on disk are exactly what stackd wrote.
        assert pruned.findings == []
        assert "compose-digest=" in pruned.render_diff
        assert "web.service" in pruned.render_diff
        assert "worker.service" not in pruned.render_diff

    def test_reload_rewrites_web_and_restarts_it(self, reloaded: Reload) -> None:
        assert reloaded.returncode == 0, reloaded.output
        assert reloaded.render_diff.strip() == ""
        assert "compose-digest=" in reloaded.unit_text
        # web was restarted (compose down + up: a new container), still without sidecar;
        # worker, whose files did not change, was left alone.
        assert sorted(reloaded.after["web"]) == ["app"]
        assert reloaded.after["web"]["app"]["State"] == "running"
        assert reloaded.after["web"]["app"]["Id"] != reloaded.before["web"]["app"]["Id"]
        assert reloaded.after["worker"]["worker"]["Id"] == reloaded.before["worker"]["worker"]["Id"]


def test_podman_writes_only_inside_the_namespace(world: StackWorld, deployed: Deploy) -> None:
    """podman 4.3 writes its blob-info cache to /var/lib/containers/cache whatever the storage
    config says: here that is the namespace's tmpfs, and the machine's directory stays as it was.
    """
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    top = [m for m in mounts if m[4] == str(VAR_LIB_CONTAINERS)][-1]
    assert top[top.index("-") + 1] == "tmpfs"
    assert (VAR_LIB_CONTAINERS / "cache").is_dir()
    for path, existed in world.machine_before.items():
        assert machine_path(Path(path)).exists() == existed, path
