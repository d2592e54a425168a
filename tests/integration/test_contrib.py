"""The units and the catalog in contrib/ work as the README says they do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import CONTRIB_UNIT, STACKD_BIN, stacks_config, start_stackd
from sandbox import Sandbox

CONTRIB = CONTRIB_UNIT.parent
UNITS = ["stackd.service", "stackd-update.service", "stackd-update.timer"]


def _link_stackd_into_home(sandbox: Sandbox) -> None:
    """The contrib units run %h/.local/bin/stackd, where the README installs it."""
    bin_dir = sandbox.home / ".local" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "stackd").symlink_to(STACKD_BIN)


class TestContribUnits:
    @pytest.mark.parametrize("name", UNITS)
    def test_passes_systemd_analyze_verify(self, sandbox: Sandbox, name: str) -> None:
        """Each unit verifies cleanly (with its siblings, which it references)."""
        _link_stackd_into_home(sandbox)
        for unit in UNITS:
            shutil.copy(CONTRIB / unit, sandbox.user_unit_dir / unit)
        result = sandbox.run(
            "systemd-analyze", "verify", "--user", str(sandbox.user_unit_dir / name), check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == ""

    def test_the_timer_triggers_the_update_service(self, sandbox: Sandbox) -> None:
        _link_stackd_into_home(sandbox)
        for unit in UNITS:
            shutil.copy(CONTRIB / unit, sandbox.user_unit_dir / unit)
        sandbox.daemon_reload()
        show = sandbox.systemctl("show", "-p", "Triggers", "stackd-update.timer").stdout
        assert show.strip() == "Triggers=stackd-update.service"


class TestCatalog:
    """Once the catalog is installed, `journalctl -x` explains stackd's events."""

    def test_journalctl_x_shows_the_catalog_text(self, sandbox: Sandbox) -> None:
        stacks_config(sandbox, ["web"])
        start_stackd(sandbox)
        assert sandbox.journal(STACKD_EVENT="daemon.started")
        # journalctl -x reads the compiled catalog from /var/lib/systemd/catalog, built from
        # /usr/lib/systemd/catalog: both get a private tmpfs for the block, so the machine's
        # /usr and /var are never written.
        with (
            sandbox.host.private_tmpfs(Path("/usr/lib/systemd/catalog"), mode=0o755) as source,
            sandbox.host.private_tmpfs(Path("/var/lib/systemd/catalog"), mode=0o755),
        ):
            shutil.copy(CONTRIB / "stackd.catalog", source / "stackd.catalog")
            sandbox.run("journalctl", "--update-catalog")
            out = sandbox.run(
                "journalctl", "--no-pager", "-x", "STACKD_EVENT=daemon.started"
            ).stdout
        assert "Subject: stackd started" in out
        assert "begun watching" in out  # the body text, not just the header
