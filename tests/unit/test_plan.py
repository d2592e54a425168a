"""The reconcile planner: what to write, remove, refuse, start, restart and stop."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stackd.core.models import HealMode
from stackd.core.plan import OwnedFileState, ReconcilePlan, is_update_unit, plan_reconcile

REPORT, REPAIR = HealMode.REPORT, HealMode.REPAIR
MAIN, UPD = "web.service", "web-update.service"
OLD, NEW = "# stackd old\n", "# stackd new\n"


def ours(name: str, text: str, *, intact: bool = True) -> OwnedFileState:
    return OwnedFileState(name, text, has_marker=True, intact=intact)


def theirs(name: str, text: str = "[Service]\n") -> OwnedFileState:
    return OwnedFileState(name, text)


def link(name: str) -> OwnedFileState:
    return OwnedFileState(name, None, is_symlink=True)


def absent(name: str) -> OwnedFileState:
    return OwnedFileState(name, None)


def present(*states: OwnedFileState) -> dict[str, OwnedFileState]:
    return {s.name: s for s in states}


def plan(
    desired: Mapping[str, str],
    now: Mapping[str, OwnedFileState],
    heal: HealMode = REPORT,
    active: Mapping[str, str] | None = None,
) -> ReconcilePlan:
    return plan_reconcile(desired, now, heal=heal, active=active)


class TestUnchanged:
    """An unchanged config plans nothing at all."""

    def test_empty_plan(self) -> None:
        result = plan({MAIN: OLD, UPD: OLD}, present(ours(MAIN, OLD), ours(UPD, OLD)))
        assert result == ReconcilePlan()
        assert result.empty
        assert not result.reload

    def test_unchanged_with_running_units(self) -> None:
        now = present(ours(MAIN, OLD), ours(UPD, OLD))
        assert plan({MAIN: OLD, UPD: OLD}, now, active={MAIN: "active"}) == ReconcilePlan()


class TestWrites:
    """Which files are written, and which units start or restart because of it."""

    @pytest.mark.parametrize(
        ("now", "heal", "writes", "start", "restart"),
        [
            pytest.param({}, REPORT, [UPD, MAIN], [MAIN], [], id="new-stack"),
            pytest.param(
                present(absent(MAIN), absent(UPD)), REPORT, [UPD, MAIN], [MAIN], [], id="absent"
            ),
            pytest.param(
                present(ours(MAIN, OLD), ours(UPD, NEW)), REPORT, [MAIN], [], [MAIN], id="main"
            ),
            pytest.param(
                present(ours(MAIN, NEW), ours(UPD, OLD)), REPORT, [UPD], [], [], id="update-only"
            ),
            pytest.param(
                present(ours(MAIN, OLD, intact=False), ours(UPD, NEW)),
                REPAIR,
                [MAIN],
                [],
                [MAIN],
                id="drift-repaired",
            ),
            pytest.param(
                present(ours(MAIN, NEW), ours(UPD, OLD, intact=False)),
                REPAIR,
                [UPD],
                [],
                [],
                id="update-drift-repaired",
            ),
        ],
    )
    def test_table(
        self,
        now: dict[str, OwnedFileState],
        heal: HealMode,
        writes: list[str],
        start: list[str],
        restart: list[str],
    ) -> None:
        result = plan({MAIN: NEW, UPD: NEW}, now, heal)
        assert result.writes == tuple((name, NEW) for name in writes)
        assert result.start == tuple(start)
        assert result.restart == tuple(restart)
        assert result.reload
        assert result.refused == result.removals == result.stop == ()

    def test_one_reload_for_many_writes(self) -> None:
        desired = {f"s{i}.service": NEW for i in range(5)}
        result = plan(desired, {})
        assert len(result.writes) == 5
        assert result.reload is True
        assert result.start == tuple(sorted(desired))


class TestRefusals:
    """Files stackd does not own, or must not touch, are left alone with a reason."""

    @pytest.mark.parametrize("heal", [REPORT, REPAIR])
    @pytest.mark.parametrize(
        ("state", "reason"),
        [
            (theirs(MAIN), "has no stackd marker"),
            (theirs(MAIN, ""), "has no stackd marker"),
            (link(MAIN), "is a symlink"),
        ],
    )
    def test_never_written(self, state: OwnedFileState, reason: str, heal: HealMode) -> None:
        result = plan({MAIN: NEW}, present(state), heal)
        assert result.writes == ()
        assert result.start == result.restart == ()
        assert not result.reload
        ((name, why),) = result.refused
        assert name == MAIN
        assert reason in why

    def test_hand_edit_is_left_in_report_mode(self) -> None:
        result = plan({MAIN: NEW}, present(ours(MAIN, "edited", intact=False)), REPORT)
        assert result.writes == ()
        assert not result.reload
        assert result.refused == (
            (
                MAIN,
                f"{MAIN} does not match its stackd marker (edited by hand?) and daemon.heal is "
                "'report': left as is",
            ),
        )

    def test_hand_edit_equal_to_the_render_needs_nothing(self) -> None:
        assert plan({MAIN: NEW}, present(ours(MAIN, NEW, intact=False))) == ReconcilePlan()

    def test_other_files_in_unit_dir_are_ignored(self) -> None:
        now = present(ours(MAIN, NEW), theirs("mine.service"), link("linked.service"))
        assert plan({MAIN: NEW}, now) == ReconcilePlan()


class TestRemovals:
    """Owned files of stacks no longer configured: stopped, then removed."""

    def test_removed_stack(self) -> None:
        result = plan({}, present(ours(MAIN, OLD), ours(UPD, OLD)))
        assert result.stop == (UPD, MAIN)
        assert result.removals == (UPD, MAIN)
        assert result.reload
        assert result.writes == result.start == result.restart == ()

    def test_only_running_units_are_stopped_when_states_are_known(self) -> None:
        now = present(ours(MAIN, OLD), ours(UPD, OLD))
        result = plan({}, now, active={MAIN: "active", UPD: "inactive"})
        assert result.stop == (MAIN,)
        assert set(result.removals) == {MAIN, UPD}

    @pytest.mark.parametrize(("heal", "removed"), [(REPORT, False), (REPAIR, True)])
    def test_hand_edited_orphan(self, heal: HealMode, removed: bool) -> None:
        result = plan({}, present(ours(MAIN, "edited", intact=False)), heal)
        assert (result.removals == (MAIN,)) is removed
        assert (result.stop == (MAIN,)) is removed
        assert bool(result.refused) is not removed

    def test_files_without_marker_are_never_removed(self) -> None:
        now = present(theirs(MAIN), link(UPD), absent("gone.service"))
        assert plan({}, now, REPAIR) == ReconcilePlan()


class TestActiveStates:
    """With the manager's ActiveState, start what is down and restart what runs."""

    @pytest.mark.parametrize(
        ("text", "state", "start", "restart"),
        [
            pytest.param(OLD, "active", (), (MAIN,), id="changed-running"),
            pytest.param(OLD, "activating", (), (MAIN,), id="changed-activating"),
            pytest.param(OLD, "inactive", (MAIN,), (), id="changed-stopped"),
            pytest.param(OLD, "failed", (MAIN,), (), id="changed-failed"),
            pytest.param(NEW, "inactive", (MAIN,), (), id="unchanged-stopped"),
            pytest.param(NEW, None, (MAIN,), (), id="unchanged-unknown-unit"),
            pytest.param(NEW, "failed", (), (), id="unchanged-failed-left"),
            pytest.param(NEW, "active", (), (), id="unchanged-running"),
        ],
    )
    def test_table(
        self,
        text: str,
        state: str | None,
        start: tuple[str, ...],
        restart: tuple[str, ...],
    ) -> None:
        active = {} if state is None else {MAIN: state}
        result = plan(
            {MAIN: NEW, UPD: NEW}, present(ours(MAIN, text), ours(UPD, NEW)), active=active
        )
        assert result.start == start
        assert result.restart == restart

    def test_update_units_are_never_started(self) -> None:
        result = plan({UPD: NEW}, present(ours(UPD, OLD)), active={UPD: "inactive"})
        assert result.writes == ((UPD, NEW),)
        assert result.start == result.restart == ()

    def test_refused_units_are_not_started(self) -> None:
        result = plan({MAIN: NEW}, present(theirs(MAIN)), active={MAIN: "inactive"})
        assert result.start == ()


class TestUpdateUnitNames:
    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("web-update.service", True),
            ("web.service", False),
            ("web-updater.service", False),
            ("update.service", False),
        ],
    )
    def test_is_update_unit(self, name: str, expected: bool) -> None:
        assert is_update_unit(name) is expected


NAMES = st.sampled_from(["a.service", "a-update.service", "b.service", "b-update.service"])
TEXTS = st.sampled_from(["# stackd 1\n", "# stackd 2\n"])
STATES = st.one_of(
    st.builds(ours, NAMES, TEXTS, intact=st.booleans()),
    st.builds(theirs, NAMES),
    st.builds(link, NAMES),
    st.builds(absent, NAMES),
)


class TestConvergence:
    """After carrying out a plan, planning again with the same config finds nothing to do."""

    @given(
        desired=st.dictionaries(NAMES, TEXTS),
        states=st.lists(STATES),
        heal=st.sampled_from(list(HealMode)),
    )
    def test_idempotent(
        self, desired: dict[str, str], states: list[OwnedFileState], heal: HealMode
    ) -> None:
        now = present(*states)
        first = plan(desired, now, heal)
        after = dict(now)
        for name, text in first.writes:
            after[name] = ours(name, text)
        for name in first.removals:
            del after[name]
        second = plan(desired, after, heal)
        assert second.writes == second.removals == second.stop == ()
        assert second.start == second.restart == ()
        assert not second.reload
        assert second.refused == first.refused
        refused = {name for name, _ in first.refused}
        for name, text in desired.items():
            assert name in refused or after[name].text == text
        for name in {name for name, _ in first.writes} | set(first.removals):
            assert name not in now or now[name].text is None or now[name].has_marker
            assert not now.get(name, absent(name)).is_symlink
