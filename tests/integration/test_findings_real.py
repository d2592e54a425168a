"""Ownership findings produced for real against a real user manager, and cleared again.

Every test runs the daemon as the real stackd.service unit of a sandboxed `systemd --user`
and reads its findings through `stackd check --json` (a fresh verification) or `stackd status
--json` (the live view, re-verified on the manager's signals).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import (
    FAKE_COMPOSE,
    make_stack_dir,
    stack_entry,
    stackd,
    stackd_events,
    stacks_config,
    start_stackd,
    status_json,
    write_config,
)
from sandbox import Sandbox

Findings = list[dict[str, Any]]


# -- helpers -----------------------------------------------------------------------------------


def check(sandbox: Sandbox) -> tuple[int, Findings]:
    """`stackd check --json` against the running daemon: (exit code, findings)."""
    result = stackd(sandbox, "check", "--json")
    assert result.returncode in (0, 1), result.stderr
    findings: Findings = json.loads(result.stdout)["findings"]
    assert (result.returncode == 1) == bool(findings)
    return result.returncode, findings


def of(findings: Findings, kind: str, unit: str = "web.service") -> Findings:
    return [f for f in findings if f["kind"] == kind and f["unit"] == unit]


def kinds(findings: Findings) -> set[tuple[str, str, str]]:
    return {(f["kind"], f["unit"], f["source"]) for f in findings}


def wait_status(
    sandbox: Sandbox, predicate: Callable[[Findings], bool], what: str, timeout: float = 10
) -> Findings:
    """Poll `stackd status --json` (no forced verification) until its findings satisfy."""

    def probe() -> Findings | None:
        findings: Findings = status_json(sandbox)["findings"]
        return findings if predicate(findings) else None

    holder: list[Findings] = []

    def probe_keep() -> bool:
        found = probe()
        if found is None:
            return False
        holder.append(found)
        return True

    sandbox.wait_for(probe_keep, timeout=timeout, what=what)
    return holder[-1]


def show(sandbox: Sandbox, unit: str, prop: str) -> str:
    return sandbox.systemctl("show", "-p", prop, "--value", unit).stdout.strip()


def wait_active(sandbox: Sandbox, unit: str, timeout: float = 20) -> str:
    """Wait until `unit` is active; return its InvocationID."""
    sandbox.wait_for(
        lambda: show(sandbox, unit, "ActiveState") == "active",
        timeout=timeout,
        what=f"{unit} active",
    )
    return show(sandbox, unit, "InvocationID")


def owned(sandbox: Sandbox, name: str = "web.service") -> Path:
    return sandbox.user_unit_dir / name


def compose_calls(sandbox: Sandbox, stack: str, verb: str) -> list[str]:
    log = sandbox.home / "stacks" / stack / "fake-compose.log"
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if line.split(" ", 1)[0] == verb]


def runtime_control(sandbox: Sandbox) -> Path:
    """$XDG_RUNTIME_DIR/systemd/user.control: searched before ~/.config/systemd/user."""
    directory = sandbox.runtime_dir / "systemd" / "user.control"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def same_file(a: str, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def started_clean(sandbox: Sandbox, names: list[str], extra: str = "") -> None:
    stacks_config(sandbox, names, extra)
    start_stackd(sandbox)
    for name in names:
        wait_active(sandbox, f"{name}.service")
    code, findings = check(sandbox)
    assert (code, findings) == (0, [])


# -- the seven kinds ---------------------------------------------------------------------------


class TestShadowed:
    """A second definition elsewhere on the search path is `shadowed`, once, until removed."""

    def test_copy_in_etc_is_reported_once_and_clears(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        copy = sandbox.etc_unit_dir / "web.service"
        copy.write_text(owned(sandbox).read_text())

        code, findings = check(sandbox)
        assert code == 1
        shadowed = of(findings, "shadowed")
        # /etc/xdg/systemd/user links to /etc/systemd/user (Debian): one file, one finding.
        assert len(shadowed) == 1, shadowed
        (finding,) = shadowed
        assert finding["source"] == "disk"
        assert finding["stack"] == "web"
        expected, other = finding["paths"]
        assert expected == str(owned(sandbox))
        assert same_file(other, copy)
        # The copy sits below ~/.config/systemd/user: the manager still loads stackd's file.
        assert kinds(findings) == {("shadowed", "web.service", "disk")}
        assert show(sandbox, "web.service", "FragmentPath") == str(owned(sandbox))

        copy.unlink()
        assert check(sandbox) == (0, [])

    def test_seen_after_daemon_reload_without_check(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        copy = sandbox.etc_unit_dir / "web.service"
        copy.write_text(owned(sandbox).read_text())
        sandbox.daemon_reload()
        findings = wait_status(
            sandbox, lambda fs: bool(of(fs, "shadowed")), "shadowed after daemon-reload"
        )
        assert len(of(findings, "shadowed")) == 1
        entry = stack_entry(status_json(sandbox), "web")
        assert [f["kind"] for f in entry["findings"]] == ["shadowed"]

        copy.unlink()
        sandbox.daemon_reload()
        wait_status(sandbox, lambda fs: fs == [], "shadowed cleared after daemon-reload")
        raised = stackd_events(sandbox, "finding.raised")
        cleared = stackd_events(sandbox, "finding.cleared")
        assert [e["STACKD_KIND"] for e in raised] == ["shadowed"]
        assert [e["STACKD_KIND"] for e in cleared] == ["shadowed"]
        assert raised[0]["STACKD_UNIT"] == "web.service"
        assert raised[0]["PRIORITY"] == "4"


class TestForeignFragment:
    """A copy in a higher-precedence directory is what the manager loads: `foreign-fragment`."""

    def test_runtime_control_copy_wins_after_reload(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        copy = runtime_control(sandbox) / "web.service"
        copy.write_text(owned(sandbox).read_text())
        sandbox.daemon_reload()

        findings = wait_status(
            sandbox,
            lambda fs: ("foreign-fragment", "web.service", "manager") in kinds(fs),
            "foreign-fragment seen by the manager after daemon-reload",
        )
        manager = [f for f in of(findings, "foreign-fragment") if f["source"] == "manager"]
        assert manager[0]["paths"] == [str(copy), str(owned(sandbox))]
        assert stack_entry(status_json(sandbox), "web")["fragment_path"] == str(copy)
        assert kinds(findings) == {
            ("foreign-fragment", "web.service", "disk"),
            ("foreign-fragment", "web.service", "manager"),
            ("shadowed", "web.service", "disk"),
        }

        copy.unlink()
        sandbox.daemon_reload()
        assert check(sandbox) == (0, [])
        assert stack_entry(status_json(sandbox), "web")["fragment_path"] == str(owned(sandbox))

    def test_home_control_copy(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        control = sandbox.home / ".config" / "systemd" / "user.control"
        control.mkdir(parents=True)
        (control / "web.service").write_text(owned(sandbox).read_text())
        sandbox.daemon_reload()
        code, findings = check(sandbox)
        assert code == 1
        manager = [f for f in of(findings, "foreign-fragment") if f["source"] == "manager"]
        assert manager
        assert manager[0]["paths"][0] == str(control / "web.service")


class TestForeignDropin:
    """A drop-in outside unit_dir/<unit>.d/ is `foreign-dropin` unless its dir is allowed."""

    def _add_dropin(self, sandbox: Sandbox) -> Path:
        directory = sandbox.etc_unit_dir / "web.service.d"
        directory.mkdir()
        dropin = directory / "x.conf"
        dropin.write_text("[Service]\nEnvironment=FOREIGN=1\n")
        return dropin

    def test_disk_at_once_manager_after_reload(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        dropin = self._add_dropin(sandbox)

        code, findings = check(sandbox)
        assert code == 1
        # The files show it at once; the manager only notices its definition is out of date
        # (systemd 252 compares the drop-in list for NeedDaemonReload) until a reload.
        assert kinds(findings) == {
            ("foreign-dropin", "web.service", "disk"),
            ("stale", "web.service", "manager"),
        }
        (disk,) = of(findings, "foreign-dropin")
        assert disk["paths"] == [str(dropin)]
        assert stack_entry(status_json(sandbox), "web")["drop_in_paths"] == []

        sandbox.daemon_reload()
        findings = wait_status(
            sandbox,
            lambda fs: ("foreign-dropin", "web.service", "manager") in kinds(fs),
            "the manager applies the drop-in after daemon-reload",
        )
        assert kinds(findings) == {
            ("foreign-dropin", "web.service", "disk"),
            ("foreign-dropin", "web.service", "manager"),
        }
        # Both views name the same file the same way.
        assert {tuple(f["paths"]) for f in of(findings, "foreign-dropin")} == {(str(dropin),)}
        assert stack_entry(status_json(sandbox), "web")["drop_in_paths"] == [str(dropin)]

        dropin.unlink()
        sandbox.daemon_reload()
        assert check(sandbox) == (0, [])

    def test_symlinked_dropin_dir_is_named_by_its_target(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        shared = sandbox.home / "shared"
        shared.mkdir()
        (shared / "x.conf").write_text("[Service]\nEnvironment=SHARED=1\n")
        (sandbox.etc_unit_dir / "web.service.d").symlink_to(shared)
        sandbox.daemon_reload()
        sandbox.wait_for(
            lambda: stack_entry(status_json(sandbox), "web")["drop_in_paths"],
            what="the manager applies the drop-in",
        )
        assert stack_entry(status_json(sandbox), "web")["drop_in_paths"] == [str(shared / "x.conf")]
        _, findings = check(sandbox)
        assert {(f["source"], tuple(f["paths"])) for f in of(findings, "foreign-dropin")} == {
            ("disk", (str(shared / "x.conf"),)),
            ("manager", (str(shared / "x.conf"),)),
        }

    def test_allowed_dropin_dirs_suppresses_both_views(self, sandbox: Sandbox) -> None:
        allowed = sandbox.etc_unit_dir / "web.service.d"
        started_clean(sandbox, ["web"], f'allowed_dropin_dirs = ["{allowed}"]')
        self._add_dropin(sandbox)
        sandbox.daemon_reload()
        sandbox.wait_for(
            lambda: stack_entry(status_json(sandbox), "web")["drop_in_paths"],
            what="the manager applies the drop-in",
        )
        assert check(sandbox) == (0, [])

    def test_own_dropin_dir_is_fine(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        own = sandbox.user_unit_dir / "web.service.d"
        own.mkdir()
        (own / "local.conf").write_text("[Service]\nEnvironment=LOCAL=1\n")
        sandbox.daemon_reload()
        sandbox.wait_for(
            lambda: stack_entry(status_json(sandbox), "web")["drop_in_paths"],
            what="the manager applies the own drop-in",
        )
        assert check(sandbox) == (0, [])


class TestMasked:
    """A mask that wins on the search path is `masked` in both views, until removed."""

    def test_systemctl_mask_is_refused_while_stackd_owns_the_name(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        result = sandbox.systemctl("mask", "web.service", check=False)
        assert result.returncode != 0
        assert "already exists" in result.stderr
        assert check(sandbox) == (0, [])

    def test_runtime_mask(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        mask = runtime_control(sandbox) / "web.service"
        mask.symlink_to("/dev/null")
        sandbox.daemon_reload()
        findings = wait_status(
            sandbox,
            lambda fs: ("masked", "web.service", "manager") in kinds(fs),
            "masked after daemon-reload",
        )
        assert kinds(findings) == {
            ("masked", "web.service", "disk"),
            ("masked", "web.service", "manager"),
        }
        assert all(f["paths"] == [str(mask)] for f in findings)
        assert stack_entry(status_json(sandbox), "web")["load_state"] == "masked"

        mask.unlink()
        sandbox.daemon_reload()
        wait_status(sandbox, lambda fs: fs == [], "mask cleared after daemon-reload")
        assert check(sandbox) == (0, [])
        assert stack_entry(status_json(sandbox), "web")["load_state"] == "loaded"

    def test_lower_mask_is_reported_from_disk(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        mask = sandbox.etc_unit_dir / "web.service"
        mask.symlink_to("/dev/null")
        code, findings = check(sandbox)
        assert code == 1
        assert kinds(findings) == {("masked", "web.service", "disk")}
        mask.unlink()
        assert check(sandbox) == (0, [])


class TestStale:
    """The manager's loaded definition older than the file on disk is `stale`."""

    def test_rewritten_fragment_is_stale_until_daemon_reload(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        path = owned(sandbox)
        text = path.read_text()
        before = path.stat().st_mtime_ns
        path.write_text(text)  # same content, new mtime
        os.utime(path, ns=(before + 10**9, before + 10**9))

        code, findings = check(sandbox)
        assert code == 1
        assert kinds(findings) == {("stale", "web.service", "manager")}
        assert of(findings, "stale")[0]["paths"] == [str(path)]

        sandbox.daemon_reload()
        wait_status(sandbox, lambda fs: fs == [], "stale cleared by daemon-reload")
        assert check(sandbox) == (0, [])


class TestDrift:
    """A hand edit of an owned file is `drift`; heal decides whether stackd rewrites it."""

    def _edit(self, sandbox: Sandbox) -> str:
        path = owned(sandbox)
        edited = path.read_text().replace(
            "Description=stackd stack web", "Description=edited by hand"
        )
        assert "edited by hand" in edited
        path.write_text(edited)
        return edited

    def test_report_mode_keeps_the_edit(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"])
        invocation = show(sandbox, "web.service", "InvocationID")
        edited = self._edit(sandbox)

        code, findings = check(sandbox)
        assert code == 1
        (drift,) = of(findings, "drift")
        assert drift["source"] == "disk"
        assert drift["paths"] == [str(owned(sandbox))]
        assert "stackd render --diff" in drift["detail"]

        assert stackd(sandbox, "reload").returncode == 0
        _, findings = check(sandbox)
        assert of(findings, "drift")
        assert owned(sandbox).read_text() == edited
        assert show(sandbox, "web.service", "InvocationID") == invocation

    def test_repair_mode_rewrites_on_check(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"], 'heal = "repair"')
        good = owned(sandbox).read_text()
        invocation = show(sandbox, "web.service", "InvocationID")
        self._edit(sandbox)

        # `stackd check` sees the drift, repairs it and reports what is left: nothing. (The
        # daemon may have repaired it already, live, from the file change.)
        assert check(sandbox) == (0, [])
        assert owned(sandbox).read_text() == good
        assert show(sandbox, "web.service", "NeedDaemonReload") == "no"
        sandbox.wait_for(
            lambda: show(sandbox, "web.service", "InvocationID") != invocation,
            timeout=20,
            what="the repaired stack is restarted on stackd's definition",
        )
        wait_active(sandbox, "web.service")
        written = stackd_events(sandbox, "unit.written")
        assert written[-1]["STACKD_UNIT"] == "web.service"
        # Whatever the edit raised (drift; stale too if the manager was read before the
        # repair) was cleared again.
        raised = sorted(e["STACKD_KIND"] for e in stackd_events(sandbox, "finding.raised"))
        cleared = sorted(e["STACKD_KIND"] for e in stackd_events(sandbox, "finding.cleared"))
        assert "drift" in raised
        assert raised == cleared

    def test_repair_mode_rewrites_without_check(self, sandbox: Sandbox) -> None:
        started_clean(sandbox, ["web"], 'heal = "repair"')
        good = owned(sandbox).read_text()
        self._edit(sandbox)
        sandbox.daemon_reload()
        sandbox.wait_for(
            lambda: owned(sandbox).read_text() == good,
            what="the daemon repairs the drift it saw after a daemon-reload",
        )
        wait_status(sandbox, lambda fs: fs == [], "no findings after the repair")
        assert check(sandbox) == (0, [])


class TestNotLoaded:
    """An adopted unit the manager cannot load is `not-loaded`, with the load error."""

    def _adopted(self, sandbox: Sandbox) -> None:
        directory = make_stack_dir(sandbox, "web")
        write_config(
            sandbox,
            f'[daemon]\ncompose_command = ["{FAKE_COMPOSE}"]\n'
            f'[stacks.web]\ndirectory = "{directory}"\nmanaged = false\n',
        )

    def test_bad_setting(self, sandbox: Sandbox) -> None:
        self._adopted(sandbox)
        owned(sandbox).write_text("[Unit]\nDescription=adopted\n[Service]\nType=oneshot\n")
        start_stackd(sandbox)
        code, findings = check(sandbox)
        assert code == 1
        assert kinds(findings) == {("not-loaded", "web.service", "manager")}
        (finding,) = findings
        assert "bad-setting" in finding["detail"]
        assert finding["paths"] == [str(owned(sandbox))]
        assert stack_entry(status_json(sandbox), "web")["load_state"] == "bad-setting"
        assert not (sandbox.user_unit_dir / "web-update.service").exists()

        owned(sandbox).write_text(
            "[Unit]\nDescription=adopted\n[Service]\nType=oneshot\nExecStart=/bin/true\n"
        )
        sandbox.daemon_reload()
        wait_status(sandbox, lambda fs: fs == [], "not-loaded cleared after the fix")
        assert check(sandbox) == (0, [])

    def test_missing_file(self, sandbox: Sandbox) -> None:
        self._adopted(sandbox)
        start_stackd(sandbox)
        code, findings = check(sandbox)
        assert code == 1
        assert kinds(findings) == {
            ("not-loaded", "web.service", "disk"),
            ("not-loaded", "web.service", "manager"),
        }
        manager = next(f for f in findings if f["source"] == "manager")
        assert "not-found" in manager["detail"]
        assert "web.service not found" in manager["detail"]


# -- config findings and what reconcile does --------------------------------------------------


def config_text(sandbox: Sandbox, stacks: dict[str, str], daemon: str = "") -> str:
    """A config with fake-compose and one table per stack (`stacks`: name -> extra lines)."""
    lines = ["[daemon]", f'compose_command = ["{FAKE_COMPOSE}"]', 'startup_timeout = "20s"']
    lines.append(daemon)
    for name, extra in stacks.items():
        directory = sandbox.home / "stacks" / name
        lines += [f"[stacks.{name}]", f'directory = "{directory}"', extra, ""]
    return "\n".join(lines)


def leftovers(sandbox: Sandbox) -> list[str]:
    """Temp files of an interrupted write in unit_dir."""
    return [p.name for p in sandbox.user_unit_dir.iterdir() if p.name.startswith(".")]


class TestConfigFindings:
    """A stack whose files are not in order is a `config` finding; the others run normally."""

    def test_missing_dir_missing_compose_env_dir(self, sandbox: Sandbox) -> None:
        make_stack_dir(sandbox, "web")
        nocompose = sandbox.home / "stacks" / "nocompose"
        nocompose.mkdir(parents=True)
        make_stack_dir(sandbox, "badenv")
        env_dir = sandbox.home / "secrets" / "badenv.env"
        env_dir.mkdir(parents=True)
        gone = sandbox.home / "stacks" / "gone"
        write_config(
            sandbox,
            config_text(
                sandbox,
                {
                    "web": "",
                    "gone": "",
                    "nocompose": "",
                    "badenv": f'env_files = ["{env_dir}"]',
                },
            ),
        )
        start_stackd(sandbox)
        wait_active(sandbox, "web.service")

        code, findings = check(sandbox)
        assert code == 1
        config = {f["stack"]: f for f in findings if f["kind"] == "config"}
        assert set(config) == {"gone", "nocompose", "badenv"}
        assert config["gone"]["paths"] == [str(gone)]
        assert "stack gone" in config["gone"]["detail"]
        assert "does not exist" in config["gone"]["detail"]
        assert config["nocompose"]["paths"] == [str(nocompose)]
        assert "no compose file" in config["nocompose"]["detail"]
        assert config["badenv"]["paths"] == [str(env_dir)]
        assert "is a directory" in config["badenv"]["detail"]
        assert [f for f in findings if f["kind"] != "config"] == []

        # Nothing of the broken stacks was written, not even half; web runs.
        names = sorted(p.name for p in sandbox.user_unit_dir.iterdir())
        assert names == ["stackd.service", "web-update.service", "web.service"]
        assert leftovers(sandbox) == []
        assert len(compose_calls(sandbox, "web", "up")) == 1
        doc = status_json(sandbox)
        assert stack_entry(doc, "web")["findings"] == []
        assert [f["kind"] for f in stack_entry(doc, "gone")["findings"]] == ["config"]

        # Fixing one stack and reloading writes and starts it, and clears its finding.
        (nocompose / "compose.yaml").write_text("services: {}\n")
        assert stackd(sandbox, "reload").returncode == 0
        wait_active(sandbox, "nocompose.service")
        _, findings = check(sandbox)
        assert {f["stack"] for f in findings} == {"gone", "badenv"}

    def test_compose_file_listed_but_missing(self, sandbox: Sandbox) -> None:
        make_stack_dir(sandbox, "web")
        make_stack_dir(sandbox, "api")
        write_config(
            sandbox,
            config_text(sandbox, {"web": "", "api": 'compose_files = ["prod.yaml"]'}),
        )
        start_stackd(sandbox)
        wait_active(sandbox, "web.service")
        _, findings = check(sandbox)
        (finding,) = findings
        assert finding["kind"] == "config"
        assert finding["stack"] == "api"
        assert finding["paths"] == [str(sandbox.home / "stacks" / "api" / "prod.yaml")]
        assert not owned(sandbox, "api.service").exists()


class TestReconcileScope:
    """A change restarts only the stacks it touched; no change does nothing at all."""

    def _start(self, sandbox: Sandbox, stacks: dict[str, str]) -> Path:
        for name in stacks:
            make_stack_dir(sandbox, name)
        path = write_config(sandbox, config_text(sandbox, stacks))
        start_stackd(sandbox)
        return path

    def _finished(self, sandbox: Sandbox, count: int) -> dict[str, Any]:
        entries = sandbox.wait_for_journal(
            SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="reconcile.finished", count=count, timeout=30
        )
        return entries[count - 1]

    def test_config_change_restarts_only_that_stack(self, sandbox: Sandbox) -> None:
        path = self._start(sandbox, {"web": "", "api": ""})
        web, api = wait_active(sandbox, "web.service"), wait_active(sandbox, "api.service")
        self._finished(sandbox, 1)
        web_mtime = owned(sandbox).stat().st_mtime_ns

        path.write_text(config_text(sandbox, {"web": "", "api": 'startup_timeout = "33s"'}))
        assert stackd(sandbox, "reload").returncode == 0
        entry = self._finished(sandbox, 2)
        assert entry["STACKD_REASON"] == "reload"
        assert json.loads(entry["STACKD_RESTARTED"]) == ["api.service"]
        assert json.loads(entry["STACKD_STARTED"]) == []
        assert "TimeoutStartSec=33s" in owned(sandbox, "api.service").read_text()
        assert wait_active(sandbox, "api.service") != api
        assert show(sandbox, "web.service", "InvocationID") == web
        assert owned(sandbox).stat().st_mtime_ns == web_mtime
        assert len(compose_calls(sandbox, "web", "up")) == 1
        assert len(compose_calls(sandbox, "api", "up")) == 2
        assert check(sandbox) == (0, [])

    def test_edited_compose_file_restarts_its_stack_on_reload(self, sandbox: Sandbox) -> None:
        self._start(sandbox, {"web": "", "api": ""})
        web, api = wait_active(sandbox, "web.service"), wait_active(sandbox, "api.service")
        self._finished(sandbox, 1)

        compose = sandbox.home / "stacks" / "web" / "compose.yaml"
        compose.write_text(compose.read_text() + "    restart: always\n")
        assert stackd(sandbox, "reload").returncode == 0
        entry = self._finished(sandbox, 2)
        assert json.loads(entry["STACKD_RESTARTED"]) == ["web.service"]
        assert wait_active(sandbox, "web.service") != web
        assert show(sandbox, "api.service", "InvocationID") == api
        assert len(compose_calls(sandbox, "web", "up")) == 2
        assert len(compose_calls(sandbox, "api", "up")) == 1

    def test_unchanged_config_writes_reloads_and_restarts_nothing(self, sandbox: Sandbox) -> None:
        self._start(sandbox, {"web": ""})
        web = wait_active(sandbox, "web.service")
        self._finished(sandbox, 1)
        mtimes = {p.name: p.stat().st_mtime_ns for p in sandbox.user_unit_dir.iterdir()}
        # A probe the manager has loaded, edited on disk: it stays NeedDaemonReload=yes for
        # as long as nobody reloads the manager.
        probe = sandbox.etc_unit_dir / "probe.service"
        probe.write_text("[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n")
        sandbox.daemon_reload()
        sandbox.systemctl("start", "probe.service")
        stat = probe.stat()
        probe.write_text(probe.read_text())
        os.utime(probe, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert show(sandbox, "probe.service", "NeedDaemonReload") == "yes"
        written = len(stackd_events(sandbox, "unit.written"))

        assert stackd(sandbox, "reload").returncode == 0
        entry = self._finished(sandbox, 2)
        assert entry["STACKD_WRITTEN"] == "0"
        assert json.loads(entry["STACKD_RESTARTED"]) == []
        assert json.loads(entry["STACKD_STARTED"]) == []
        assert len(stackd_events(sandbox, "unit.written")) == written
        assert {p.name: p.stat().st_mtime_ns for p in sandbox.user_unit_dir.iterdir()} == mtimes
        assert show(sandbox, "probe.service", "NeedDaemonReload") == "yes"
        assert show(sandbox, "web.service", "InvocationID") == web
        assert len(compose_calls(sandbox, "web", "up")) == 1


class TestStackRemoval:
    """A stack taken out of the config is stopped and its files removed; foreign ones stay."""

    def test_removed_stack(self, sandbox: Sandbox) -> None:
        for name in ("web", "api"):
            make_stack_dir(sandbox, name)
        path = write_config(sandbox, config_text(sandbox, {"web": "", "api": ""}))
        start_stackd(sandbox)
        web = wait_active(sandbox, "web.service")
        wait_active(sandbox, "api.service")
        # api-update.service replaced by a file of someone else's (no stackd marker).
        foreign = owned(sandbox, "api-update.service")
        foreign_text = "[Service]\nType=oneshot\nExecStart=/bin/true\n"
        foreign.write_text(foreign_text)
        _, findings = check(sandbox)
        (drift,) = of(findings, "drift", "api-update.service")
        assert "no stackd marker" in drift["detail"]

        path.write_text(config_text(sandbox, {"web": ""}))
        assert stackd(sandbox, "reload").returncode == 0
        sandbox.wait_for(
            lambda: not owned(sandbox, "api.service").exists(),
            what="api.service removed",
        )
        assert show(sandbox, "api.service", "ActiveState") == "inactive"
        assert len(compose_calls(sandbox, "api", "down")) == 1
        assert foreign.read_text() == foreign_text
        assert [e["STACKD_UNIT"] for e in stackd_events(sandbox, "unit.removed")] == ["api.service"]
        assert show(sandbox, "web.service", "InvocationID") == web
        assert [s["name"] for s in status_json(sandbox)["stacks"]] == ["web"]
        assert check(sandbox) == (0, [])

    def test_both_files_removed(self, sandbox: Sandbox) -> None:
        for name in ("web", "api"):
            make_stack_dir(sandbox, name)
        path = write_config(sandbox, config_text(sandbox, {"web": "", "api": ""}))
        start_stackd(sandbox)
        wait_active(sandbox, "api.service")
        path.write_text(config_text(sandbox, {"web": ""}))
        assert stackd(sandbox, "reload").returncode == 0
        assert not owned(sandbox, "api.service").exists()
        assert not owned(sandbox, "api-update.service").exists()
        assert sorted(e["STACKD_UNIT"] for e in stackd_events(sandbox, "unit.removed")) == [
            "api-update.service",
            "api.service",
        ]
        assert show(sandbox, "api.service", "LoadState") == "not-found"

    def test_adopting_a_stack_hands_its_files_over(self, sandbox: Sandbox) -> None:
        make_stack_dir(sandbox, "web")
        path = write_config(sandbox, config_text(sandbox, {"web": ""}))
        start_stackd(sandbox)
        web = wait_active(sandbox, "web.service")
        texts = {n: owned(sandbox, n).read_text() for n in ("web.service", "web-update.service")}

        path.write_text(config_text(sandbox, {"web": "managed = false"}))
        assert stackd(sandbox, "reload").returncode == 0
        assert {n: owned(sandbox, n).read_text() for n in texts} == texts
        assert stackd_events(sandbox, "unit.removed") == []
        assert show(sandbox, "web.service", "InvocationID") == web
        assert compose_calls(sandbox, "web", "down") == []
        assert check(sandbox) == (0, [])

        # Starting an adopted stack is its new owner's business, even at daemon start.
        sandbox.systemctl("stop", "web.service")
        sandbox.systemctl("restart", "stackd.service", timeout=60)
        (*_, entry) = sandbox.wait_for_journal(
            SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="reconcile.finished", count=3, timeout=30
        )
        assert entry["STACKD_REASON"] == "start"
        assert json.loads(entry["STACKD_STARTED"]) == []
        assert check(sandbox) == (0, [])
        assert show(sandbox, "web.service", "ActiveState") == "inactive"
        assert len(compose_calls(sandbox, "web", "up")) == 1


class TestUnitDirOffPath:
    """A unit_dir the manager never reads is a finding naming it."""

    def test_finding_names_the_path(self, sandbox: Sandbox) -> None:
        elsewhere = sandbox.home / "units"
        make_stack_dir(sandbox, "web")
        write_config(sandbox, config_text(sandbox, {"web": ""}, f'unit_dir = "{elsewhere}"'))
        start_stackd(sandbox)
        _, findings = check(sandbox)
        off_path = [f for f in findings if f["kind"] == "config" and f["unit"] == ""]
        assert len(off_path) == 1
        assert off_path[0]["paths"] == [str(elsewhere)]
        assert "not on the user manager's unit search path" in off_path[0]["detail"]
        assert (elsewhere / "web.service").exists()


class TestLegacyEnvFallback:
    """Missing env_files fall back to legacy_env_files, warned with paths, never contents."""

    def test_fallback_is_used_and_logged_without_secrets(self, sandbox: Sandbox) -> None:
        canary = "CANARY-7f3a9c-do-not-log"
        make_stack_dir(sandbox, "web")
        missing = sandbox.home / "secrets" / "web.env"
        legacy = sandbox.home / "legacy" / "web.env"
        legacy.parent.mkdir()
        legacy.write_text(f"TOKEN={canary}\n")
        write_config(
            sandbox,
            config_text(
                sandbox,
                {"web": f'env_files = ["{missing}"]\nlegacy_env_files = ["{legacy}"]'},
            ),
        )
        start_stackd(sandbox)
        wait_active(sandbox, "web.service")

        assert f"EnvironmentFile={legacy}\n" in owned(sandbox).read_text()
        assert str(missing) not in owned(sandbox).read_text()
        environment = show(sandbox, "web.service", "EnvironmentFiles")
        assert str(legacy) in environment
        (entry,) = stackd_events(sandbox, "env.legacy_fallback")
        assert entry["PRIORITY"] == "4"
        assert entry["STACKD_STACK"] == "web"
        assert str(missing) in entry["MESSAGE"]
        assert str(legacy) in entry["MESSAGE"]
        assert check(sandbox) == (0, [])

        # The secret reaches no log line and no answer of the daemon.
        everything = sandbox.run("journalctl", "--no-pager", "--all", "-o", "export").stdout
        assert canary not in everything
        assert canary not in stackd(sandbox, "status", "--json").stdout
        assert canary not in stackd(sandbox, "render").stdout
