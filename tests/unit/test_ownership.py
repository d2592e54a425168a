"""Ownership findings from the disk view and the manager's loaded state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest

from stackd.core.models import Finding, FindingKind, FindingSource, UnitState
from stackd.core.ownership import DiskView, UnitExpectation, UnitFile, UnitFileKind, evaluate

CONTROL = "/home/u/.config/systemd/user.control"
UD = "/home/u/.config/systemd/user"
ETC = "/etc/systemd/user"
LIB = "/usr/lib/systemd/user"
SEARCH = (CONTROL, UD, ETC, LIB)

UNIT = "web.service"
OWN = f"{UD}/{UNIT}"
TEXT = "# stackd marker\n[Service]\nType=oneshot\n"

K = FindingKind
DISK, MANAGER = FindingSource.DISK, FindingSource.MANAGER


def f(directory: str, kind: UnitFileKind = "file", target: str | None = None) -> UnitFile:
    if kind == "mask" and target is None and directory != UD:
        target = "/dev/null"
    return UnitFile(f"{directory}/{UNIT}", directory, kind, target)


def view(
    defs: Sequence[UnitFile] = (f(UD),),
    dropins: Sequence[str] = (),
    text: str | None = TEXT,
) -> DiskView:
    return DiskView(
        search_path=SEARCH,
        definitions={UNIT: tuple(defs)} if defs else {},
        dropins={UNIT: tuple(dropins)} if dropins else {},
        owned_texts={UNIT: text} if text is not None else {},
    )


def loaded(**changes: Any) -> dict[str, UnitState]:
    """The manager's view of UNIT: loaded from OWN unless `changes` say otherwise."""
    return {UNIT: replace(UnitState(UNIT, load_state="loaded", fragment_path=OWN), **changes)}


def run(
    disk: DiskView,
    state: Mapping[str, UnitState] | None = None,
    *,
    expected_text: str | None = TEXT,
    allowed: Sequence[str] = (),
    available: bool = True,
    expected_path: str = OWN,
) -> list[Finding]:
    exp = UnitExpectation(UNIT, "web", expected_path, expected_text)
    return evaluate(
        units={UNIT: exp},
        disk=disk,
        loaded=state,
        unit_dir=UD,
        allowed_dropin_dirs=allowed,
        manager_available=available,
    )


def summary(findings: list[Finding]) -> set[tuple[str, str, tuple[str, ...]]]:
    return {(x.kind.value, x.source.value, x.paths) for x in findings}


class TestDiskFindings:
    """Each file-level invariant is raised from the disk view alone, and only when broken."""

    @pytest.mark.parametrize(
        ("disk", "expected"),
        [
            pytest.param(view(), set(), id="clean"),
            pytest.param(
                view([f(CONTROL), f(UD)]),
                {
                    ("shadowed", "disk", (f"{CONTROL}/{UNIT}", OWN)),
                    ("foreign-fragment", "disk", (f"{CONTROL}/{UNIT}", OWN)),
                },
                id="shadowed-by-a-winner",
            ),
            pytest.param(
                view([f(UD), f(LIB)]),
                {("shadowed", "disk", (OWN, f"{LIB}/{UNIT}"))},
                id="shadowed-lower",
            ),
            pytest.param(
                view([f(UD), f(ETC, "symlink", "/opt/web.service")]),
                {("shadowed", "disk", (OWN, f"{ETC}/{UNIT}"))},
                id="shadowed-by-a-link",
            ),
            pytest.param(
                view([f(CONTROL, "mask"), f(UD)]),
                {("masked", "disk", (f"{CONTROL}/{UNIT}",))},
                id="masked-winning",
            ),
            pytest.param(
                view([f(UD), f(LIB, "mask")]),
                {("masked", "disk", (f"{LIB}/{UNIT}",))},
                id="masked-lower",
            ),
            pytest.param(
                view([f(UD, "mask")], text=""), {("masked", "disk", (OWN,))}, id="own-file-empty"
            ),
            pytest.param(view(text="[Service]\n"), {("drift", "disk", (OWN,))}, id="drift"),
            pytest.param(view([], text=None), {("drift", "disk", (OWN,))}, id="missing"),
            pytest.param(
                view([f(ETC)], text=None),
                {
                    ("drift", "disk", (OWN,)),
                    ("shadowed", "disk", (f"{ETC}/{UNIT}", OWN)),
                    ("foreign-fragment", "disk", (f"{ETC}/{UNIT}", OWN)),
                },
                id="missing-with-another-definition",
            ),
            pytest.param(
                view([f(UD, "symlink", "/srv/web.service")], text=None),
                {("drift", "disk", (OWN,))},
                id="own-file-is-a-symlink",
            ),
        ],
    )
    def test_table(self, disk: DiskView, expected: set[tuple[str, str, tuple[str, ...]]]) -> None:
        assert summary(run(disk)) == expected

    def test_findings_name_stack_and_source(self) -> None:
        (finding,) = run(view([f(UD), f(LIB)]))
        assert finding.stack == "web"
        assert finding.unit == UNIT
        assert finding.source is DISK

    def test_shadowed_detail_says_which_wins_and_what_to_do(self) -> None:
        higher = next(x for x in run(view([f(CONTROL), f(UD)])) if x.kind is K.SHADOWED)
        lower = run(view([f(UD), f(LIB)]))[0]
        assert higher.detail == (
            f"{UNIT} is also defined in {CONTROL}/{UNIT}, which takes precedence over {OWN}: "
            "remove that file or set managed=false for stack 'web'"
        )
        assert f"{LIB}/{UNIT}, which takes over if {OWN} goes away" in lower.detail

    def test_drift_key_is_stable_across_different_edits(self) -> None:
        (one,) = run(view(text="edit one"))
        (two,) = run(view(text="edit two"))
        assert one.key == two.key == ("drift", UNIT, (OWN,))

    def test_drift_without_marker_says_stackd_never_overwrites(self) -> None:
        exp = UnitExpectation(UNIT, "web", OWN, TEXT)
        (finding,) = evaluate(
            units={UNIT: exp},
            disk=view(text="[Service]\n"),
            loaded=None,
            unit_dir=UD,
            allowed_dropin_dirs=(),
            manager_available=True,
            marker_of=lambda text: "abc" if text.startswith("# stackd") else None,
        )
        assert finding.kind is K.DRIFT
        assert "has no stackd marker, so stackd will never overwrite it" in finding.detail

    def test_drift_of_a_file_of_another_directory_is_not_checked(self) -> None:
        # The expected file is outside unit_dir: stackd did not read it, so it cannot judge.
        etc_own = f"{ETC}/{UNIT}"
        assert run(view([f(ETC)], text="other"), expected_path=etc_own) == []


class TestAdoptedUnits:
    """Units written by another tool: verified for origin, never for content."""

    @pytest.mark.parametrize(
        ("disk", "expected"),
        [
            pytest.param(view(text="anything"), set(), id="content-not-checked"),
            pytest.param(
                view([f(UD, "symlink", "/nix/store/abc-web.service")], text=None),
                set(),
                id="home-manager-link",
            ),
            pytest.param(view([], text=None), {("not-loaded", "disk", (OWN,))}, id="missing"),
            pytest.param(
                view([f(UD), f(LIB)]),
                {("shadowed", "disk", (OWN, f"{LIB}/{UNIT}"))},
                id="shadowed",
            ),
        ],
    )
    def test_table(self, disk: DiskView, expected: set[tuple[str, str, tuple[str, ...]]]) -> None:
        assert summary(run(disk, expected_text=None)) == expected

    def test_fragment_at_the_link_target_is_the_expected_one(self) -> None:
        disk = view([f(UD, "symlink", "/nix/store/abc-web.service")], text=None)
        state = loaded(fragment_path="/nix/store/abc-web.service")
        assert run(disk, state, expected_text=None) == []


class TestDropins:
    """Drop-ins apply freely only from unit_dir/<unit>.d/ and the allowed directories."""

    @pytest.mark.parametrize(
        ("dropin", "allowed", "foreign"),
        [
            (f"{UD}/{UNIT}.d/override.conf", (), False),
            (f"{ETC}/{UNIT}.d/override.conf", (), True),
            (f"{UD}/service.d/10-all.conf", (), True),  # type-level, even in unit_dir
            (f"{UD}/web-.service.d/10-prefix.conf", (), True),
            (f"{UD}/{UNIT}.d/sub/x.conf", (), True),
            (f"{ETC}/{UNIT}.d/override.conf", (ETC,), False),
            (f"{ETC}/{UNIT}.d/override.conf", (f"{ETC}/{UNIT}.d/",), False),
            (f"{ETC}/service.d/x.conf", (f"{ETC}/{UNIT}.d",), True),
            (f"{ETC}/{UNIT}.d/override.conf", ("/etc/systemd/use",), True),  # not a prefix dir
            (f"{ETC}/{UNIT}.d/override.conf", ("/etc/systemd/user/../user",), False),
        ],
    )
    def test_disk_and_manager_agree(
        self, dropin: str, allowed: tuple[str, ...], foreign: bool
    ) -> None:
        findings = run(view(dropins=[dropin]), loaded(drop_in_paths=(dropin,)), allowed=allowed)
        expected = (
            {("foreign-dropin", "disk", (dropin,)), ("foreign-dropin", "manager", (dropin,))}
            if foreign
            else set()
        )
        assert summary(findings) == expected

    @pytest.mark.parametrize(
        ("on_disk", "in_memory", "stale"),
        [
            pytest.param((f"{UD}/{UNIT}.d/a.conf",), (), True, id="added-not-reloaded"),
            pytest.param((), (f"{UD}/{UNIT}.d/a.conf",), True, id="removed-not-reloaded"),
            pytest.param((f"{UD}/{UNIT}.d/a.conf",), (f"{UD}/{UNIT}.d/a.conf",), False, id="same"),
            pytest.param(
                (f"{UD}/{UNIT}.d/a.conf",), (f"{UD}/{UNIT}.d//a.conf",), False, id="spelling"
            ),
        ],
    )
    def test_dropins_on_disk_but_not_loaded_are_stale(
        self, on_disk: tuple[str, ...], in_memory: tuple[str, ...], stale: bool
    ) -> None:
        """NeedDaemonReload misses new drop-ins on systemd 252: the views are compared."""
        findings = run(view(dropins=on_disk), loaded(drop_in_paths=in_memory))
        changed = tuple(sorted(set(on_disk) ^ set(in_memory)))
        assert (("stale", "manager", changed) in summary(findings)) is stale
        assert [x.kind.value for x in findings].count("stale") == int(stale)

    def test_one_finding_per_foreign_dropin(self) -> None:
        dropins = [f"{ETC}/{UNIT}.d/a.conf", f"{UD}/{UNIT}.d/b.conf", f"{LIB}/service.d/c.conf"]
        findings = run(view(dropins=dropins))
        assert [x.paths for x in findings] == [
            (f"{ETC}/{UNIT}.d/a.conf",),
            (f"{LIB}/service.d/c.conf",),
        ]


class TestManagerFindings:
    """Invariants seen in the manager's loaded state."""

    @pytest.mark.parametrize(
        ("state", "expected"),
        [
            pytest.param(loaded(), set(), id="clean"),
            pytest.param(
                loaded(load_state="not-found", fragment_path=""),
                {("not-loaded", "manager", (OWN,))},
                id="not-found",
            ),
            pytest.param(
                loaded(load_state="bad-setting"),
                {("not-loaded", "manager", (OWN,))},
                id="bad-setting",
            ),
            pytest.param(
                loaded(load_state="masked", fragment_path="/dev/null"),
                {("masked", "manager", ("/dev/null",))},
                id="masked",
            ),
            pytest.param(
                loaded(need_daemon_reload=True), {("stale", "manager", (OWN,))}, id="stale"
            ),
            pytest.param(
                loaded(fragment_path=f"{ETC}/{UNIT}"),
                {("foreign-fragment", "manager", (f"{ETC}/{UNIT}", OWN))},
                id="foreign-fragment",
            ),
            pytest.param(
                loaded(fragment_path=""),
                {("foreign-fragment", "manager", (OWN,))},
                id="loaded-without-fragment",
            ),
            pytest.param(
                loaded(fragment_path=f"{ETC}/{UNIT}", need_daemon_reload=True),
                {
                    ("foreign-fragment", "manager", (f"{ETC}/{UNIT}", OWN)),
                    ("stale", "manager", (f"{ETC}/{UNIT}",)),
                },
                id="foreign-and-stale",
            ),
        ],
    )
    def test_table(
        self, state: dict[str, UnitState], expected: set[tuple[str, str, tuple[str, ...]]]
    ) -> None:
        assert summary(run(view(), state)) == expected

    def test_not_loaded_carries_the_load_error(self) -> None:
        state = loaded(load_state="error", load_error="Unit web.service has a bad unit file")
        (finding,) = run(view(), state)
        assert "load state 'error' (Unit web.service has a bad unit file)" in finding.detail

    def test_unit_missing_from_loaded_has_no_manager_view(self) -> None:
        assert run(view(), {}) == []

    def test_no_loaded_state_gives_disk_findings_only(self) -> None:
        assert summary(run(view(text="x"), None)) == {("drift", "disk", (OWN,))}


class TestManagerUnavailable:
    """An unreachable manager is one global finding; stale loaded state is not judged."""

    def test_global_finding_and_disk_findings_only(self) -> None:
        findings = run(view(text="x"), loaded(load_state="not-found"), available=False)
        assert summary(findings) == {
            ("manager-unavailable", "manager", ()),
            ("drift", "disk", (OWN,)),
        }
        assert findings[0].kind is K.MANAGER_UNAVAILABLE
        assert findings[0].unit == ""
        assert findings[0].stack is None

    def test_available_manager_raises_nothing_global(self) -> None:
        assert run(view(), None) == []


class TestOrdering:
    """Findings come out in one order, whatever order the units were given in."""

    def test_deterministic(self) -> None:
        names = ["b.service", "a.service", "c-update.service"]
        disk = DiskView(
            search_path=SEARCH,
            definitions={n: (UnitFile(f"{ETC}/{n}", ETC, "file"),) for n in names},
            dropins=dict.fromkeys(names, (f"{ETC}/service.d/x.conf",)),
            owned_texts={},
        )

        def findings(order: list[str]) -> list[Finding]:
            units = {n: UnitExpectation(n, n.split(".")[0], f"{UD}/{n}", TEXT) for n in order}
            return evaluate(
                units=units,
                disk=disk,
                loaded={n: UnitState(n, load_state="not-found") for n in order},
                unit_dir=UD,
                allowed_dropin_dirs=(),
                manager_available=False,
            )

        first = findings(names)
        assert first == findings(sorted(names)) == findings(names[::-1])
        assert [x.unit for x in first] == sorted(x.unit for x in first)
        assert first[0].kind is K.MANAGER_UNAVAILABLE
        assert [x.kind.value for x in first if x.unit == "a.service"] == [
            "drift",
            "foreign-dropin",
            "foreign-fragment",
            "shadowed",
        ]
