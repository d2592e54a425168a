"""Security guarantees, proven on the real daemon (stackd.service) in the sandbox.

- Update and Reload answer only the daemon's own uid, even on a bus that lets other uids in;
  read-only methods answer anyone who can reach the bus.
- The content of an env file never leaves it: not in the journal (every field of every
  entry), not in any CLI output, not in error messages.
- State files are 0600 in a 0700 directory; unit files get the daemon's umask (0600 under the
  shipped stackd.service, UMask=0077).
- stackd never writes or removes through a symlink in unit_dir, and never writes into a
  unit_dir that is itself a symlink; both are reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import stat
import subprocess
import uuid
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
from jeepney import DBusAddress, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
from jeepney.low_level import HeaderFields
from sandbox import Sandbox

# Another uid, one with a passwd entry: EXTERNAL auth goes by the number alone, but
# dbus-daemon (1.14) looks the uid's groups up (getpwuid) before it lets it connect, and
# rejects a uid it cannot resolve whatever the policy says.
OTHER_UID = pwd.getpwnam("nobody").pw_uid
OTHER_GID = pwd.getpwnam("nobody").pw_gid
DAEMON = DBusAddress(
    "/io/stackd/Daemon1", bus_name="io.stackd.Daemon1", interface="io.stackd.Daemon1"
)


def _wait_active(sandbox: Sandbox, *stacks: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        doc = status_json(sandbox)
        states = {s["name"]: s["active_state"] for s in doc["stacks"]}
        return doc if all(states.get(name) == "active" for name in stacks) else None

    return sandbox.wait_for(ready, timeout=30, interval=0.2, what=f"{stacks} active")


def _calls_as_other_uid(address: str, calls: list[tuple[str, str, tuple[Any, ...]]]) -> Any:
    """Fork; the child drops to OTHER_UID (no groups), connects to `address` and makes `calls`.

    Returns {"uid": what the bus says the child is, "replies": [{"method", "error", "body"}]}.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(OTHER_GID)
            os.setuid(OTHER_UID)
            conn = open_dbus_connection(address)
            whoami = conn.send_and_get_reply(
                message_bus.GetConnectionUnixUser(conn.unique_name), timeout=10
            )
            replies = []
            for method, signature, args in calls:
                reply = conn.send_and_get_reply(
                    new_method_call(DAEMON, method, signature or None, args), timeout=30
                )
                is_error = reply.header.message_type == MessageType.error
                replies.append(
                    {
                        "method": method,
                        "error": reply.header.fields.get(HeaderFields.error_name)
                        if is_error
                        else None,
                        "body": reply.body[0] if reply.body else None,
                    }
                )
            conn.close()
            out = {"uid": whoami.body[0], "euid": os.geteuid(), "replies": replies}
        except BaseException as exc:
            out = {"crash": repr(exc)}
            code = 1
        with contextlib.suppress(BaseException):
            os.write(write_fd, json.dumps(out).encode())
        os._exit(code)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        chunks.append(pipe.read())
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks))
    assert "crash" not in result, result
    return result


def _events(sandbox: Sandbox, event: str) -> list[dict[str, Any]]:
    return stackd_events(sandbox, event)


class TestOtherUid:
    """A caller with another uid reads, but Update and Reload refuse it and change nothing."""

    def test_mutating_methods_refuse_another_uid_even_when_the_bus_admits_it(
        self, sandbox: Sandbox
    ) -> None:
        stacks_config(sandbox, ["web"])
        start_stackd(sandbox)
        _wait_active(sandbox, "web")
        history = Path(sandbox.env["XDG_STATE_HOME"]) / "stackd" / "history.jsonl"
        fake_log = sandbox.home / "stacks" / "web" / "fake-compose.log"
        calls_before = fake_log.read_text()

        with sandbox.other_uids_allowed() as address:
            result = _calls_as_other_uid(
                address,
                [
                    ("GetStatus", "as", ([],)),
                    ("GetStatus", "as", (["web"],)),
                    ("GetHistory", "u", (5,)),
                    ("Update", "as", ([],)),
                    ("Update", "as", (["web"],)),
                    ("Reload", "", ()),
                ],
            )

        assert result["euid"] == OTHER_UID
        assert result["uid"] == OTHER_UID, "the bus must see the caller as the other uid"
        replies = {(r["method"], i): r for i, r in enumerate(result["replies"])}
        for key in (("GetStatus", 0), ("GetStatus", 1), ("GetHistory", 2)):
            assert replies[key]["error"] is None, replies[key]
        assert [s["name"] for s in json.loads(replies[("GetStatus", 1)]["body"])["stacks"]] == [
            "web"
        ]
        assert json.loads(replies[("GetHistory", 2)]["body"])["runs"] == []
        for key in (("Update", 3), ("Update", 4), ("Reload", 5)):
            reply = replies[key]
            assert reply["error"] == "io.stackd.Error.AccessDenied", reply
            assert f"answers only uid {os.getuid()}" in reply["body"]
            assert f"the caller is uid {OTHER_UID}" in reply["body"]

        # Nothing changed: no run started or recorded, no pull, no reload.
        assert _events(sandbox, "update.started") == []
        assert _events(sandbox, "config.reloaded") == []
        assert not history.exists()
        assert fake_log.read_text() == calls_before

        # The daemon's own uid is answered (so the silence above means refusal).
        assert stackd(sandbox, "reload").returncode == 0
        sandbox.wait_for_journal(SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="config.reloaded")
        update = stackd(sandbox, "update", "web", "--json", timeout=120)
        assert update.returncode == 0, update.stderr
        assert _events(sandbox, "update.started")
        assert history.exists()

    def test_the_bus_refuses_other_uids_without_the_sandbox_policy(self, sandbox: Sandbox) -> None:
        """The control: the policy above is what lets the other uid in at all."""
        stacks_config(sandbox, [])
        start_stackd(sandbox)
        with sandbox.other_uids_allowed() as address:
            pass  # the policy is gone again; use the same kind of address without it
        shared = Path(address.removeprefix("unix:path="))
        shared.parent.mkdir(mode=0o755)
        os.link(sandbox.runtime_dir / "bus", shared)
        try:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.setgroups([])
                    os.setgid(OTHER_GID)
                    os.setuid(OTHER_UID)
                    open_dbus_connection(address).close()
                except BaseException as exc:
                    os.write(write_fd, repr(exc).encode())
                    code = 1
                os._exit(code)
            os.close(write_fd)
            with os.fdopen(read_fd, "rb") as pipe:
                why = pipe.read().decode()
            _, status = os.waitpid(pid, 0)
        finally:
            shared.unlink()
            shared.parent.rmdir()
        assert os.waitstatus_to_exitcode(status) == 1, "another uid connected without the policy"
        assert why


class TestSecretsStayInEnvFiles:
    """A value inside an env file appears nowhere stackd writes or prints."""

    def test_canary_never_leaves_the_env_file(self, sandbox: Sandbox) -> None:
        canary = f"stackd-canary-{uuid.uuid4().hex}"
        secrets = sandbox.home / "secrets"
        secrets.mkdir(mode=0o700)
        web_env = secrets / "web.env"
        web_env.write_text(f"DB_PASSWORD={canary}\nOTHER={canary[::-1]}\n")
        legacy_env = secrets / "legacy.env"
        legacy_env.write_text(f"TOKEN={canary}\n")
        env_dir = secrets / "dir.env"
        env_dir.mkdir()
        (env_dir / "inside").write_text(f"X={canary}\n")
        web = make_stack_dir(sandbox, "web")
        legacy = make_stack_dir(sandbox, "legacy")
        broken = make_stack_dir(sandbox, "broken")
        failing = make_stack_dir(sandbox, "failing")
        (failing / "fake-control").mkdir()
        (failing / "fake-control" / "pull.exit").write_text("1\n")
        write_config(
            sandbox,
            f"""
[daemon]
compose_command = ["{FAKE_COMPOSE}"]
startup_timeout = "20s"

[stacks.web]
directory = "{web}"
env_files = ["{web_env}"]

[stacks.legacy]
directory = "{legacy}"
env_files = ["{secrets / "missing.env"}"]
legacy_env_files = ["{legacy_env}"]

[stacks.broken]
directory = "{broken}"
env_files = ["{env_dir}"]

[stacks.failing]
directory = "{failing}"
env_files = ["{web_env}"]
""",
        )
        start_stackd(sandbox)
        _wait_active(sandbox, "web", "legacy", "failing")
        # The units do load the secrets (so the checks below are not vacuous).
        shown = sandbox.systemctl("show", "-p", "EnvironmentFiles", "web.service").stdout
        assert str(web_env) in shown
        sandbox.wait_for_journal(SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="env.legacy_fallback")

        outputs: list[subprocess.CompletedProcess[str]] = []
        update = stackd(sandbox, "update", "--json", timeout=120)
        assert update.returncode == 1, update.stdout  # `failing` failed its pull
        outputs.append(update)
        # Provoke errors around a file that held the secret: now a directory.
        web_env.rename(secrets / "web.env.moved")
        web_env.mkdir()
        (web_env / "inside").write_text(f"Y={canary}\n")
        outputs.append(stackd(sandbox, "reload"))
        doc = status_json(sandbox)
        assert any(
            f["kind"] == "config" and str(web_env) in f["paths"]
            for f in stack_entry(doc, "web")["findings"]
        ), stack_entry(doc, "web")["findings"]
        for args in (
            ("status", "--json"),
            ("status",),
            ("status", "web", "--json"),
            ("history", "--json"),
            ("history",),
            ("check", "--json"),
            ("check", "--offline", "--json"),
            ("render",),
            ("render", "--diff"),
            ("update", "web", "--json"),
            ("update", "failing", "--json"),
        ):
            outputs.append(stackd(sandbox, *args, timeout=120))
        assert any("is a directory" in (o.stdout + o.stderr) for o in outputs)

        for out in outputs:
            assert canary not in out.stdout + out.stderr, out.args
            assert canary[::-1] not in out.stdout + out.stderr, out.args
        sandbox.sync_journal()
        journal = subprocess.run(
            ["journalctl", "--no-pager", "--all", "-o", "export"],
            env=sandbox.env,
            capture_output=True,
            check=True,
        ).stdout
        assert b"STACKD_EVENT=update.finished" in journal  # the export holds stackd's entries
        assert canary.encode() not in journal
        assert canary[::-1].encode() not in journal
        state = Path(sandbox.env["XDG_STATE_HOME"]) / "stackd"
        for path in state.rglob("*"):
            if path.is_file():
                assert canary.encode() not in path.read_bytes(), path


class TestFileModes:
    """State is private (0700 dir, 0600 files); unit files take the daemon's umask."""

    def test_state_and_unit_file_modes(self, sandbox: Sandbox) -> None:
        stacks_config(sandbox, ["web"])
        start_stackd(sandbox)
        _wait_active(sandbox, "web")
        assert stackd(sandbox, "update", "web", "--json", timeout=120).returncode == 0

        state = Path(sandbox.env["XDG_STATE_HOME"]) / "stackd"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        history = state / "history.jsonl"
        assert stat.S_IMODE(history.stat().st_mode) == 0o600
        for path in state.rglob("*"):
            expected = 0o700 if path.is_dir() else 0o600
            assert stat.S_IMODE(path.lstat().st_mode) == expected, path
        # Unit files carry no secrets (EnvironmentFile= paths only); the daemon writes them
        # under stackd.service's UMask=0077: readable by the user (and its manager) only.
        for name in ("web.service", "web-update.service"):
            mode = stat.S_IMODE((sandbox.user_unit_dir / name).stat().st_mode)
            assert mode == 0o600, (name, oct(mode))


class TestSymlinks:
    """Nothing is written or removed through a symlink in unit_dir, or into a symlinked one."""

    def test_symlinked_unit_file_is_never_written_through(self, sandbox: Sandbox) -> None:
        elsewhere = sandbox.base / "elsewhere"
        elsewhere.mkdir()
        target = elsewhere / "web.service"
        target.write_text("[Service]\nExecStart=/bin/true\n# not stackd's\n")
        before = target.read_text()
        link = sandbox.user_unit_dir / "web.service"
        link.symlink_to(target)
        stacks_config(sandbox, ["web", "db"], extra='heal = "repair"')
        start_stackd(sandbox)
        _wait_active(sandbox, "db")

        def drift() -> dict[str, Any] | None:
            doc = status_json(sandbox)
            found = [f for f in stack_entry(doc, "web")["findings"] if f["kind"] == "drift"]
            return found[0] if found else None

        finding = sandbox.wait_for(drift, timeout=20, what="a drift finding for web")
        assert "symlink" in finding["detail"]
        assert str(target) in finding["detail"]
        refusals = [
            e for e in _events(sandbox, "reconcile.failed") if e.get("STACKD_UNIT") == "web.service"
        ]
        assert refusals
        assert "symlink" in refusals[0]["MESSAGE"]
        # A check (which repairs drift with heal = "repair") still leaves it alone.
        assert stackd(sandbox, "check", "--json").returncode == 1
        assert link.is_symlink()
        assert os.readlink(link) == str(target)
        assert target.read_text() == before
        assert (sandbox.user_unit_dir / "web-update.service").is_file()  # the rest is written

    def test_symlinked_unit_file_of_a_removed_stack_is_left_alone(self, sandbox: Sandbox) -> None:
        stacks_config(sandbox, ["web", "db"])
        start_stackd(sandbox)
        _wait_active(sandbox, "web", "db")
        # Replace db.service by a link to an outside copy that even carries stackd's marker.
        elsewhere = sandbox.base / "elsewhere"
        elsewhere.mkdir()
        outside = elsewhere / "db.service"
        own = sandbox.user_unit_dir / "db.service"
        outside.write_text(own.read_text())
        own.unlink()
        own.symlink_to(outside)
        before = outside.read_text()

        stacks_config(sandbox, ["web"])
        assert stackd(sandbox, "reload").returncode == 0
        sandbox.wait_for(
            lambda: not (sandbox.user_unit_dir / "db-update.service").exists(),
            timeout=20,
            what="db-update.service (a regular owned file) removed",
        )
        assert own.is_symlink()
        assert os.readlink(own) == str(outside)
        assert outside.read_text() == before
        removed = {e.get("STACKD_UNIT") for e in _events(sandbox, "unit.removed")}
        assert "db-update.service" in removed
        assert "db.service" not in removed

    def test_symlinked_unit_dir_is_never_written_into(self, sandbox: Sandbox) -> None:
        """Decided: a unit_dir that is itself a symlink is refused as a whole (nothing is
        written through it) and the refusal is reported; see docs/reliability.md."""
        real = sandbox.base / "dotfiles-units"
        real.mkdir()
        sandbox.user_unit_dir.rmdir()
        sandbox.user_unit_dir.symlink_to(real)  # ~/.config/systemd/user -> elsewhere
        stacks_config(sandbox, ["web"])
        start_stackd(sandbox)  # the test writes stackd.service through the link, not stackd

        failures = sandbox.wait_for_journal(
            SYSLOG_IDENTIFIER="stackd", STACKD_EVENT="reconcile.failed", timeout=20
        )
        assert any(
            f"{sandbox.user_unit_dir} is a symlink" in str(e.get("MESSAGE")) for e in failures
        ), failures
        assert sorted(p.name for p in real.iterdir()) == ["stackd.service"]
        check = stackd(sandbox, "check", "--json")
        assert check.returncode == 1, check.stdout
        units = {f["unit"] for f in json.loads(check.stdout)["findings"]}
        assert {"web.service", "web-update.service"} <= units
        assert sorted(p.name for p in real.iterdir()) == ["stackd.service"]
