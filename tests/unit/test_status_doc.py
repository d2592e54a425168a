"""The status document keeps the fields scripts rely on (DESIGN section 6, version 1)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from stackd.core.models import (
    Config,
    DaemonConfig,
    Finding,
    FindingKind,
    FindingSource,
    StackSpec,
    TimedFinding,
    UnitState,
)
from stackd.core.status import DaemonInfo, build_status

T0 = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
CONFIG = Config(
    daemon=DaemonConfig(unit_dir=Path("/home/u/.config/systemd/user")),
    stacks=(
        StackSpec(name="web", directory=Path("/srv/web")),
        StackSpec(name="db", directory=Path("/srv/db"), update=False),
    ),
)
INFO = DaemonInfo(pid=42, started_at=T0, config="/c.toml", unit_dir="/u", manager_connected=True)


def _doc(**kw: object) -> dict[str, object]:
    findings = [
        TimedFinding(
            Finding(FindingKind.SHADOWED, "web.service", ("/a", "/b"), "web", FindingSource.DISK),
            T0,
        ),
        TimedFinding(Finding(FindingKind.MANAGER_UNAVAILABLE, ""), T0),
    ]
    units = {"web.service": UnitState("web.service", "loaded", "active", "exited", "/a")}
    return build_status(daemon=INFO, config=CONFIG, units=units, findings=findings, **kw)  # type: ignore[arg-type]


class TestStatusDocument:
    def test_top_level_contract(self) -> None:
        doc = _doc()
        assert doc["version"] == 1
        assert set(doc) >= {"version", "daemon", "stacks", "findings", "updates"}
        assert doc["daemon"] == doc["daemon"] | {  # type: ignore[operator]
            "pid": 42,
            "started_at": "2026-11-26T03:00:00+00:00",
            "config": "/c.toml",
            "unit_dir": "/u",
            "manager": "connected",
        }

    def test_stack_entries_carry_unit_state_and_own_findings(self) -> None:
        stacks = _doc()["stacks"]
        assert isinstance(stacks, list)
        web, db = stacks
        assert web["name"] == "web"
        assert (web["load_state"], web["active_state"], web["sub_state"]) == (
            "loaded",
            "active",
            "exited",
        )
        assert web["fragment_path"] == "/a"
        assert [f["kind"] for f in web["findings"]] == ["shadowed"]
        assert web["findings"][0]["paths"] == ["/a", "/b"]
        assert web["findings"][0]["since"] == "2026-11-26T03:00:00+00:00"
        assert db["load_state"] == "stub"  # never seen by the manager yet
        assert db["findings"] == []
        assert web["last_update"] is None

    def test_global_findings_are_listed_with_the_rest(self) -> None:
        kinds = [f["kind"] for f in _doc()["findings"]]  # type: ignore[index, union-attr]
        assert kinds == ["shadowed", "manager-unavailable"]

    def test_only_narrows_stacks_but_keeps_global_findings(self) -> None:
        doc = _doc(only=["db"])
        assert [s["name"] for s in doc["stacks"]] == ["db"]  # type: ignore[union-attr, index]
        assert [f["kind"] for f in doc["findings"]] == ["manager-unavailable"]  # type: ignore[union-attr, index]

    def test_updates_section(self) -> None:
        doc = _doc(next_run=T0, last_run={"run": "r", "result": "success"})
        assert doc["updates"] == {
            "schedule": "daily",
            "next_run": "2026-11-26T03:00:00+00:00",
            "running": None,
            "last_run": {"run": "r", "result": "success"},
        }
