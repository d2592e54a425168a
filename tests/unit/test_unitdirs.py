"""The scanner: unit files and drop-ins on a search path, as systemd 252 resolves them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackd.adapters.unitdirs import dropin_dir_names, scan
from stackd.core.ownership import UnitFile

UNIT = "web-app.service"


def write(path: Path, text: str = "[Service]\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> list[Path]:
    """Three search-path directories, highest precedence first."""
    out = [tmp_path / name for name in ("hi", "mid", "lo")]
    for d in out:
        d.mkdir()
    return out


def paths(ds: list[Path]) -> list[str]:
    return [str(d) for d in ds]


class TestDropinDirNames:
    """The dash-prefix walk matches systemd's unit_file_find_dirs()."""

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
            ("web-update.service", ("web-update.service.d", "web-.service.d")),
        ],
    )
    def test_prefixes(self, unit: str, expected: tuple[str, ...]) -> None:
        assert dropin_dir_names(unit) == expected


class TestDefinitions:
    """Every definition of a unit name is found, in search-path order, with its kind."""

    def test_kinds_and_order(self, dirs: list[Path], tmp_path: Path) -> None:
        hi, mid, lo = dirs
        (hi / UNIT).symlink_to("/dev/null")
        write(mid / UNIT)
        elsewhere = write(tmp_path / "store" / UNIT)
        (lo / UNIT).symlink_to(elsewhere)
        view = scan(paths(dirs), [UNIT], str(mid))
        assert view.definitions[UNIT] == (
            UnitFile(str(hi / UNIT), str(hi), "mask", "/dev/null"),
            UnitFile(str(mid / UNIT), str(mid), "file", None),
            UnitFile(str(lo / UNIT), str(lo), "symlink", str(elsewhere)),
        )

    @pytest.mark.parametrize(
        ("make", "kind"),
        [
            (lambda p: write(p, ""), "mask"),  # systemd 252: an empty file masks too
            (lambda p: p.symlink_to("/dev/null"), "mask"),
            (lambda p: p.symlink_to("../x/empty.service"), "symlink"),  # dangling
            (lambda p: write(p, "[Unit]\n"), "file"),
        ],
    )
    def test_kind(self, dirs: list[Path], make: object, kind: str) -> None:
        assert callable(make)
        make(dirs[0] / UNIT)
        (found,) = scan(paths(dirs), [UNIT], str(dirs[0])).definitions[UNIT]
        assert found.kind == kind

    def test_relative_symlink_target_is_made_absolute(self, dirs: list[Path]) -> None:
        write(dirs[2] / "real.service")
        (dirs[0] / UNIT).symlink_to("../lo/real.service")
        (found,) = scan(paths(dirs), [UNIT], str(dirs[0])).definitions[UNIT]
        assert found.target == str(dirs[2] / "real.service")

    def test_symlink_to_empty_file_is_a_mask(self, dirs: list[Path], tmp_path: Path) -> None:
        (dirs[0] / UNIT).symlink_to(write(tmp_path / "empty", ""))
        (found,) = scan(paths(dirs), [UNIT], str(dirs[0])).definitions[UNIT]
        assert found.kind == "mask"

    def test_only_names_of_interest(self, dirs: list[Path]) -> None:
        write(dirs[0] / UNIT)
        write(dirs[0] / "other.service")
        view = scan(paths(dirs), [UNIT], str(dirs[0]))
        assert set(view.definitions) == {UNIT}
        assert set(view.owned_texts) == {UNIT}

    def test_a_directory_named_like_the_unit_defines_nothing(self, dirs: list[Path]) -> None:
        (dirs[0] / UNIT).mkdir()
        assert UNIT not in scan(paths(dirs), [UNIT], str(dirs[0])).definitions

    def test_missing_and_repeated_directories_are_skipped(
        self, dirs: list[Path], tmp_path: Path
    ) -> None:
        hi, mid, lo = dirs
        alias = tmp_path / "alias"
        alias.symlink_to(mid)  # like /lib -> /usr/lib on a merged /usr
        write(mid / UNIT)
        search = [str(tmp_path / "missing"), str(hi), str(mid), str(alias), str(mid) + "/", str(lo)]
        view = scan(search, [UNIT], str(mid))
        assert view.search_path == (str(hi), str(mid), str(lo))
        assert [f.path for f in view.definitions[UNIT]] == [str(mid / UNIT)]


class TestOwnedTexts:
    """The texts of the files of interest in unit_dir, for drift checks."""

    def test_regular_files_in_unit_dir_only(self, dirs: list[Path]) -> None:
        hi, mid, _ = dirs
        write(hi / UNIT, "higher")
        write(mid / UNIT, "mine")
        write(mid / "empty.service", "")
        (mid / "link.service").symlink_to(hi / UNIT)
        view = scan(paths(dirs), [UNIT, "empty.service", "link.service"], str(mid))
        assert dict(view.owned_texts) == {UNIT: "mine", "empty.service": ""}

    def test_unit_dir_off_the_search_path_is_still_read(
        self, dirs: list[Path], tmp_path: Path
    ) -> None:
        elsewhere = tmp_path / "elsewhere"
        write(elsewhere / UNIT, "mine")
        view = scan(paths(dirs), [UNIT], str(elsewhere))
        assert dict(view.owned_texts) == {UNIT: "mine"}
        assert UNIT not in view.definitions

    def test_undecodable_bytes_do_not_raise(self, dirs: list[Path]) -> None:
        (dirs[0] / UNIT).write_bytes(b"[Service]\n\xff\n")
        text = scan(paths(dirs), [UNIT], str(dirs[0])).owned_texts[UNIT]
        assert text.encode("utf-8", "surrogateescape") == b"[Service]\n\xff\n"


def dropins_of(dirs: list[Path], tmp_path: Path, unit: str = UNIT) -> list[str]:
    view = scan(paths(dirs), [unit], str(dirs[1]))
    return [os.path.relpath(p, tmp_path) for p in view.dropins.get(unit, ())]


class TestDropins:
    """Which drop-ins apply, and which same-named one wins."""

    @pytest.mark.parametrize(
        ("files", "expected"),
        [
            pytest.param(
                ["lo/web-app.service.d/a.conf"], ["lo/web-app.service.d/a.conf"], id="own"
            ),
            pytest.param(["hi/web-.service.d/a.conf"], ["hi/web-.service.d/a.conf"], id="prefix"),
            pytest.param(["mid/service.d/a.conf"], ["mid/service.d/a.conf"], id="type-level"),
            pytest.param(
                ["hi/web-app.service.d/a.conf", "lo/web-app.service.d/a.conf"],
                ["hi/web-app.service.d/a.conf"],
                id="higher-dir-wins",
            ),
            pytest.param(
                ["mid/web-app.service.d/a.conf", "mid/web-.service.d/a.conf"],
                ["mid/web-app.service.d/a.conf"],
                id="specific-beats-prefix-in-one-dir",
            ),
            pytest.param(
                ["hi/web-.service.d/a.conf", "lo/web-app.service.d/a.conf"],
                ["hi/web-.service.d/a.conf"],
                id="higher-dir-prefix-beats-lower-specific",
            ),
            pytest.param(
                ["hi/service.d/a.conf", "lo/web-.service.d/a.conf"],
                ["lo/web-.service.d/a.conf"],
                id="any-name-dir-beats-type-level",
            ),
            pytest.param(
                [
                    "lo/web-app.service.d/20.conf",
                    "hi/service.d/10.conf",
                    "mid/web-.service.d/30.conf",
                ],
                [
                    "hi/service.d/10.conf",
                    "lo/web-app.service.d/20.conf",
                    "mid/web-.service.d/30.conf",
                ],
                id="applied-in-file-name-order",
            ),
            pytest.param(
                [
                    "hi/web-app.service.d/a.txt",
                    "hi/web-app.service.d/.a.conf",
                    "hi/web.service.d/a.conf",
                ],
                [],
                id="ignored-names",
            ),
            pytest.param(["hi/socket.d/a.conf", "hi/app.service.d/a.conf"], [], id="other-units"),
        ],
    )
    def test_table(
        self, dirs: list[Path], tmp_path: Path, files: list[str], expected: list[str]
    ) -> None:
        for f in files:
            write(tmp_path / f)
        assert dropins_of(dirs, tmp_path) == expected

    def test_null_dropin_hides_lower_ones_and_is_listed(
        self, dirs: list[Path], tmp_path: Path
    ) -> None:
        write(dirs[2] / "web-app.service.d" / "a.conf")
        (dirs[0] / "service.d").mkdir()
        (dirs[0] / "web-.service.d").mkdir()
        (dirs[0] / "web-.service.d" / "a.conf").symlink_to("/dev/null")
        assert dropins_of(dirs, tmp_path) == ["hi/web-.service.d/a.conf"]

    def test_symlinked_dropin_dir_is_named_by_its_target(
        self, dirs: list[Path], tmp_path: Path
    ) -> None:
        """systemd resolves a drop-in directory's symlinks before listing it."""
        write(tmp_path / "shared" / "a.conf")
        (dirs[0] / "web-app.service.d").symlink_to(tmp_path / "shared")
        assert dropins_of(dirs, tmp_path) == ["shared/a.conf"]

    def test_many_units_share_prefix_and_type_dirs(self, dirs: list[Path], tmp_path: Path) -> None:
        write(dirs[0] / "web-.service.d" / "p.conf")
        write(dirs[2] / "service.d" / "t.conf")
        view = scan(paths(dirs), ["web-a.service", "web-b.service", "db.service"], str(dirs[1]))
        prefix, type_level = (
            str(dirs[0] / "web-.service.d/p.conf"),
            str(dirs[2] / "service.d/t.conf"),
        )
        assert dict(view.dropins) == {
            "db.service": (type_level,),
            "web-a.service": (prefix, type_level),
            "web-b.service": (prefix, type_level),
        }


# --- differential check against systemd itself ---------------------------------------------

ANALYZE = shutil.which("systemd-analyze")
DIRS = ("hi", "mid", "lo")
DROPIN_DIRS = ("web-app-x.service.d", "web-app-.service.d", "web-.service.d", "service.d")
CONFS = ("10-a.conf", "20-b.conf")
Layout = dict[tuple[str, str, str], str]  # (dir, drop-in dir, conf) -> "text" | "empty" | "null"


def build(root: Path, layout: Layout) -> None:
    write(root / "lo" / "web-app-x.service", "[Service]\nType=oneshot\nExecStart=/bin/true\n")
    for d in DIRS:
        (root / d).mkdir(exist_ok=True)
    for (d, dd, conf), how in layout.items():
        path = root / d / dd / conf
        path.parent.mkdir(parents=True, exist_ok=True)
        if how == "null":
            path.symlink_to("/dev/null")
        else:
            path.write_text("" if how == "empty" else f"[Service]\nXStackdProbe{len(layout)}=1\n")


def systemd_parsed(root: Path) -> list[str] | None:
    """The drop-ins systemd parses for the unit (those with a probe key), None if unusable."""
    assert ANALYZE is not None
    runtime = root / "runtime"
    runtime.mkdir(mode=0o700)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "XDG_RUNTIME_DIR": str(runtime),
        "SYSTEMD_UNIT_PATH": ":".join(str(root / d) for d in DIRS),
        "SYSTEMD_LOG_COLOR": "0",
    }
    run = subprocess.run(
        [ANALYZE, "--user", "verify", "--man=no", "web-app-x.service"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if "Failed to initialize manager" in run.stderr:
        return None
    found = re.findall(r"^(/\S+?):\d+: Unknown key 'XStackdProbe", run.stderr, re.M)
    return list(dict.fromkeys(found))  # in the order systemd applies them


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
class TestAgainstSystemd:
    """For random drop-in layouts, the scanner agrees with what systemd-analyze parses."""

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.dictionaries(
            st.tuples(st.sampled_from(DIRS), st.sampled_from(DROPIN_DIRS), st.sampled_from(CONFS)),
            st.sampled_from(["text", "empty", "null"]),
            max_size=8,
        )
    )
    def test_same_dropins_as_systemd(self, layout: Layout) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            build(root, layout)
            expected = systemd_parsed(root)
            if expected is None:
                pytest.skip("systemd-analyze cannot start a test manager here")
            view = scan([str(root / d) for d in DIRS], ["web-app-x.service"], str(root / "hi"))
            with_content = [
                p for p in view.dropins.get("web-app-x.service", ()) if os.path.getsize(p) > 0
            ]
            assert with_content == expected
