"""Which watched units a search-path change concerns, and which directories to watch."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stackd.core.watchset import (
    WatchPlan,
    WatchSet,
    affected_units,
    dropin_dir_names,
    plan_watches,
)

SEARCH = ("/hi", "/mid", "/lo")
UNITS = frozenset(
    {"web.service", "web-app.service", "web-update.service", "api.service", "web.timer"}
)
SERVICES = UNITS - {"web.timer"}
NOTHING: frozenset[str] = frozenset()


class TestDropinDirNames:
    """Drop-in directory names follow systemd 252's walk, templates included."""

    @pytest.mark.parametrize(
        ("unit", "expected"),
        [
            ("web.service", ("web.service.d",)),
            ("web-app.service", ("web-app.service.d", "web-.service.d")),
            (
                "foo-bar-baz.service",
                ("foo-bar-baz.service.d", "foo-bar-.service.d", "foo-.service.d"),
            ),
            ("foo--bar.service", ("foo--bar.service.d", "foo--.service.d", "foo-.service.d")),
            ("-web.service", ("-web.service.d",)),
            ("web-.service", ("web-.service.d",)),
            # Checked against `systemd-analyze --user verify a-b@x.service` (252): the
            # template's prefixes are plain names, the instance's keep the instance.
            (
                "a-b@x.service",
                (
                    "a-b@x.service.d",
                    "a-b@.service.d",
                    "a-.service.d",
                    "a-@x.service.d",
                    "a-@.service.d",
                ),
            ),
            ("a-b@.service", ("a-b@.service.d", "a-.service.d")),
        ],
    )
    def test_names(self, unit: str, expected: tuple[str, ...]) -> None:
        assert dropin_dir_names(unit) == expected


class TestAffectedUnits:
    """An event names the watched units it may affect, and only those."""

    @pytest.mark.parametrize(
        ("directory", "name", "expected"),
        [
            # fragments, in any search-path directory
            ("/lo", "web.service", {"web.service"}),
            ("/hi", "web-app.service", {"web-app.service"}),
            ("/mid", "web.timer", {"web.timer"}),
            ("/lo", "other.service", NOTHING),
            ("/lo", ".web.service.tmp", NOTHING),
            ("/lo", "web.service~", NOTHING),
            # the unit's own drop-in dir and the .conf files in it
            ("/mid", "web.service.d", {"web.service"}),
            ("/mid/web.service.d", "10-limits.conf", {"web.service"}),
            ("/mid/web.service.d", None, {"web.service"}),
            ("/mid/web.service.d", "10-limits.conf.swp", NOTHING),
            ("/mid/web.service.d", "README", NOTHING),
            # dash-prefix drop-ins
            ("/hi", "web-.service.d", {"web-app.service", "web-update.service"}),
            ("/hi/web-.service.d", "x.conf", {"web-app.service", "web-update.service"}),
            # type-level drop-ins reach every unit of the type
            ("/lo", "service.d", SERVICES),
            ("/lo/service.d", "x.conf", SERVICES),
            ("/lo", "timer.d", {"web.timer"}),
            ("/lo", "socket.d", NOTHING),
            # a search-path directory itself changed: anything in it may be gone
            ("/mid", None, UNITS),
            # outside the search path nothing counts
            ("/elsewhere", "web.service", NOTHING),
            ("/elsewhere/web.service.d", "x.conf", NOTHING),
            ("/lo/web.service.d/sub", "x.conf", NOTHING),
            ("/lo/other.service.d", "x.conf", NOTHING),
            ("/", "lo", NOTHING),
        ],
    )
    def test_table(self, directory: str, name: str | None, expected: frozenset[str]) -> None:
        assert affected_units(directory, name, UNITS, SEARCH) == expected

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("app@.service", {"app@1.service", "app@2.service"}),  # the template fragment
            ("app@1.service", {"app@1.service"}),
            ("app@.service.d", {"app@1.service", "app@2.service"}),
            ("app@2.service.d", {"app@2.service"}),
        ],
    )
    def test_template_instances(self, name: str, expected: frozenset[str]) -> None:
        units = {"app@1.service", "app@2.service"}
        assert affected_units("/lo", name, units, SEARCH) == expected

    def test_search_path_spelling_is_normalized(self) -> None:
        assert affected_units("/lo", "web.service", UNITS, ["/hi/", "/lo//"]) == {"web.service"}

    @given(
        st.from_regex(r"[a-z]{1,5}(-[a-z]{1,5}){0,3}\.service", fullmatch=True),
        st.sampled_from(SEARCH),
    )
    def test_every_dropin_dir_of_a_unit_reaches_it(self, unit: str, directory: str) -> None:
        watched = WatchSet({unit, "other.service"}, SEARCH)
        for dropin in (*dropin_dir_names(unit), "service.d"):
            assert unit in watched.affected(directory, dropin)
            assert unit in watched.affected(f"{directory}/{dropin}", "50-x.conf")


HOME = "/home/u/.config/systemd/user"
TREE: dict[str, list[str]] = {
    "/": ["home", "etc", "usr"],
    "/etc": ["hostname"],
    "/home": ["u"],
    "/home/u": [".config"],
    "/home/u/.config": ["systemd"],
    "/home/u/.config/systemd": ["user"],
    HOME: [
        "web.service",
        "web.service.d",
        "web-.service.d",
        "service.d",
        "other.service.d",
        "default.target.wants",
    ],
    f"{HOME}/web.service.d": ["10-a.conf"],
    "/usr": ["lib"],
    "/usr/lib": ["systemd"],
    "/usr/lib/systemd": ["user"],
    "/usr/lib/systemd/user": ["web-app.service.d", "api.service"],
}
USER_PATH = (
    "/home/u/.config/systemd/user.control",
    HOME,
    "/etc/systemd/user",
    "/run/user/0/systemd/user",
    "/usr/lib/systemd/user",
)


def entries(directory: str) -> list[str] | None:
    return TREE.get(directory)


class TestPlanWatches:
    """The plan watches existing search dirs, drop-in dirs that may apply, and the nearest
    existing ancestor of each missing search dir."""

    def test_plan(self) -> None:
        plan = plan_watches(USER_PATH, {"web.service", "web-app.service"}, entries)
        assert plan == WatchPlan(
            search_dirs=(HOME, "/usr/lib/systemd/user"),
            dropin_dirs=(
                f"{HOME}/service.d",
                f"{HOME}/web-.service.d",
                f"{HOME}/web.service.d",
                "/usr/lib/systemd/user/web-app.service.d",
            ),
            ancestors=("/", "/etc", "/home/u/.config/systemd"),
        )
        assert plan.directories == {
            *plan.search_dirs,
            *plan.dropin_dirs,
            "/",
            "/etc",
            "/home/u/.config/systemd",
        }

    def test_no_units_still_watches_the_search_path(self) -> None:
        plan = plan_watches(USER_PATH, (), entries)
        assert plan.search_dirs == (HOME, "/usr/lib/systemd/user")
        assert plan.dropin_dirs == ()

    def test_each_directory_is_listed_once(self) -> None:
        calls: list[str] = []

        def counting(directory: str) -> list[str] | None:
            calls.append(directory)
            return entries(directory)

        plan_watches((*USER_PATH, HOME, "/run/user/1/systemd/user"), {"web.service"}, counting)
        assert sorted(calls) == sorted(set(calls))

    def test_nothing_exists(self) -> None:
        plan = plan_watches(USER_PATH, {"web.service"}, lambda _: None)
        assert plan == WatchPlan((), (), ())


class TestShapesPlan:
    """Only entries that are, or lead to, a directory the plan watches change the plan."""

    @pytest.mark.parametrize(
        ("directory", "name", "expected"),
        [
            (HOME, "web.service.d", True),
            (HOME, "web-.service.d", True),
            (HOME, "service.d", True),
            (HOME, "web.service", False),
            (HOME, "other.service.d", False),
            ("/home/u/.config/systemd", "user", True),
            ("/home/u/.config/systemd", "user.control", True),
            ("/home/u/.config/systemd", "system", False),
            ("/home/u", ".config", True),
            ("/home/u", ".bashrc", False),
            ("/run/user/0", "systemd", True),
            ("/elsewhere", "web.service.d", False),
        ],
    )
    def test_table(self, directory: str, name: str, expected: bool) -> None:
        assert (
            WatchSet({"web.service", "web-app.service"}, USER_PATH).shapes_plan(directory, name)
            is expected
        )
