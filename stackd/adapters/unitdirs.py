"""Read the unit directories on the manager's search path into the core's `DiskView`.

Scanning only (the inotify watch lives elsewhere). Each search-path directory is listed once,
and only names of interest are looked at further, so 500 units over 15 directories cost one
`scandir` per directory plus one per relevant drop-in directory.

The lookup rules follow systemd 252 (systemd.unit(5), src/shared/dropin.c, conf-files.c):
- The first directory on the search path that holds `<unit>` defines it; an empty file or a
  symlink to /dev/null there is a mask.
- Drop-in directories are searched in this order, and the first `<name>.conf` found wins over
  every later one of the same name: for each search-path directory, `<unit>.d/` followed by the
  dash-prefix directories (`foo-bar-baz.service` -> `foo-bar-.service.d/`, `foo-.service.d/`);
  then, for each search-path directory, the type-level `service.d/`. The winners apply in
  lexicographic order of their file names. A winner that is empty or links to /dev/null applies
  nothing but still hides the lower ones; it is listed all the same.
- A dangling symlink still defines the name: the manager picks it and fails to load the unit.
- Unit files keep the spelling of the search-path directory they were found in (the first of
  two directories that are one, like Debian's /etc/xdg/systemd/user -> /etc/systemd/user);
  drop-in paths have their directory's symlinks resolved. Both match what the manager reports
  as `FragmentPath` and `DropInPaths`.
These rules are checked against `systemd-analyze verify` in tests/unit/test_unitdirs.py.
- Template and instance names (`foo@.service`) are not modelled: stackd's unit names have no `@`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterator, Sequence
from types import MappingProxyType

from stackd.core.ownership import DiskView, UnitFile, UnitFileKind
from stackd.core.watchset import dropin_dir_names

__all__ = ["dropin_dir_names", "scan"]

_DROPIN_SUFFIX = ".conf"


def _unit_type(unit: str) -> str | None:
    _, dot, suffix = unit.rpartition(".")
    return suffix if dot and suffix else None


def _entries(directory: str) -> Iterator[os.DirEntry[str]]:
    """Entries of `directory`, nothing when it is missing or unreadable."""
    try:
        with os.scandir(directory) as it:
            yield from it
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return


def _is_null_or_empty(st: os.stat_result) -> bool:
    # systemd's null_or_empty(): an empty regular file or a device node.
    if stat.S_ISREG(st.st_mode):
        return st.st_size == 0
    return stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)


def _definition(entry: os.DirEntry[str], directory: str) -> UnitFile | None:
    try:
        if entry.is_symlink():
            target = os.path.normpath(os.path.join(directory, os.readlink(entry.path)))
            try:
                st = os.stat(entry.path)
            except OSError:  # dangling: still the definition the manager picks
                return UnitFile(entry.path, directory, "symlink", target)
            kind: UnitFileKind = "mask" if _is_null_or_empty(st) else "symlink"
            return UnitFile(entry.path, directory, kind, target)
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:  # removed while we looked
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return UnitFile(entry.path, directory, "mask" if st.st_size == 0 else "file", None)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None


def _conf_files(directory: str) -> dict[str, str]:
    """The `.conf` files of a drop-in directory, named as the manager names them.

    systemd chases the directory's symlinks before listing it (conf_files_list_strv), so
    `DropInPaths` spells /etc/xdg/systemd/user/x.service.d/a.conf (Debian links
    /etc/xdg/systemd/user to /etc/systemd/user) as /etc/systemd/user/x.service.d/a.conf.
    """
    found: dict[str, str] = {}
    real = os.path.realpath(directory)
    for entry in _entries(directory):
        name = entry.name
        if name.startswith(".") or not name.endswith(_DROPIN_SUFFIX):
            continue
        try:
            if entry.is_dir():
                continue
        except OSError:
            continue
        found[name] = os.path.join(real, name)
    return found


def _distinct_dirs(search_path: Sequence[str]) -> list[str]:
    """The search path without repeats: same spelling or the same directory twice (like
    /lib and /usr/lib on a merged /usr), keeping the first, as the manager does."""
    seen_names: set[str] = set()
    seen_inodes: set[tuple[int, int]] = set()
    out: list[str] = []
    for raw in search_path:
        directory = os.path.normpath(raw)
        if directory in seen_names:
            continue
        seen_names.add(directory)
        try:
            st = os.stat(directory)
        except OSError:
            continue  # missing directories define nothing
        if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen_inodes:
            continue
        seen_inodes.add((st.st_dev, st.st_ino))
        out.append(directory)
    return out


def scan(search_path: Sequence[str], unit_names: Collection[str], unit_dir: str) -> DiskView:
    """What the files on `search_path` say about `unit_names`.

    `owned_texts` holds the regular files of interest in `unit_dir` (symlinks are never read:
    stackd does not own what they point to); `unit_dir` is read even when it is not on the
    search path, so drift can still be seen.
    """
    names = frozenset(unit_names)
    unit_dir = os.path.normpath(unit_dir)
    chains = {u: dropin_dir_names(u) for u in names}
    types = {t for u in names if (t := _unit_type(u)) is not None}
    interesting = {d for chain in chains.values() for d in chain} | {f"{t}.d" for t in types}

    dirs = _distinct_dirs(search_path)
    listing = _Listing()
    for directory in dirs:
        listing.read(directory, names, interesting, owned=directory == unit_dir, on_path=True)
    if unit_dir not in dirs:
        listing.read(unit_dir, names, frozenset(), owned=True, on_path=False)

    dropins = _resolve_dropins(names, chains, listing.dropin_dirs)
    return DiskView(
        search_path=tuple(dirs),
        definitions=MappingProxyType({u: tuple(fs) for u, fs in listing.definitions.items()}),
        dropins=MappingProxyType(dropins),
        owned_texts=MappingProxyType(listing.owned_texts),
    )


def _resolve_dropins(
    names: Collection[str],
    chains: dict[str, tuple[str, ...]],
    found: dict[str, list[tuple[int, dict[str, str]]]],
) -> dict[str, tuple[str, ...]]:
    """Apply systemd's order (see the module docstring): first same-named file wins."""
    by_type: dict[str, dict[str, str]] = {}
    out: dict[str, tuple[str, ...]] = {}
    for unit in sorted(names):
        hits = sorted(
            (rank, step, confs)
            for step, dirname in enumerate(chains[unit])
            for rank, confs in found.get(dirname, ())
        )
        winners: dict[str, str] = {}
        for _, _, confs in hits:
            for conf, path in confs.items():
                winners.setdefault(conf, path)
        unit_type = _unit_type(unit)
        if unit_type is not None:
            if unit_type not in by_type:
                type_winners: dict[str, str] = {}
                for _, confs in found.get(f"{unit_type}.d", ()):
                    for conf, path in confs.items():
                        type_winners.setdefault(conf, path)
                by_type[unit_type] = type_winners
            for conf, path in by_type[unit_type].items():
                winners.setdefault(conf, path)
        if winners:
            out[unit] = tuple(winners[c] for c in sorted(winners))
    return out


class _Listing:
    """What one pass over the directories found, one scandir per directory."""

    def __init__(self) -> None:
        self.definitions: dict[str, list[UnitFile]] = {}
        self.owned_texts: dict[str, str] = {}
        # drop-in directory name -> [(rank of its search-path directory, {conf: path})]
        self.dropin_dirs: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self._rank = 0

    def read(
        self,
        directory: str,
        names: frozenset[str],
        dropin_dirs: Collection[str],
        *,
        owned: bool,
        on_path: bool,
    ) -> None:
        rank, self._rank = self._rank, self._rank + 1
        for entry in _entries(directory):
            name = entry.name
            if name in dropin_dirs:
                confs = _conf_files(entry.path)
                if confs:
                    self.dropin_dirs.setdefault(name, []).append((rank, confs))
                continue
            if name not in names:
                continue
            found = _definition(entry, directory)
            if found is None:
                continue
            if owned and found.target is None:
                text = _read_text(found.path)
                if text is None:
                    continue  # gone or unreadable since the listing
                self.owned_texts[name] = text
            if on_path:
                self.definitions.setdefault(name, []).append(found)
