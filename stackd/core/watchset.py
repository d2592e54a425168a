"""Which watched unit names a change on the unit search path concerns, and what to watch.

Pure: the only view of the file system is the `entries` function the caller passes in.
The names follow systemd 252 (systemd.unit(5), src/shared/dropin.c `unit_file_find_dirs`):
- `<dir>/<unit>` is a fragment; for an instance `foo@x.service` the template `foo@.service`
  is one too (the manager falls back to it).
- Drop-in directories of a unit: `<unit>.d/`, for an instance also the template's
  `foo@.service.d/`, then the dash prefixes of each (`foo-bar-baz.service` ->
  `foo-bar-.service.d/`, `foo-.service.d/`), and the type-level `service.d/` for every unit of
  that type. Only `*.conf` files inside them are read.
Alias names (symlinks naming another unit) are not followed: their drop-ins are out of scope.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "Entries",
    "WatchPlan",
    "WatchSet",
    "affected_units",
    "dropin_dir_names",
    "plan_watches",
]

#: The names in a directory, or None when it is missing or not a directory.
Entries = Callable[[str], Collection[str] | None]

_DROPIN_SUFFIX = ".conf"


def _split(unit: str) -> tuple[str, str, str | None] | None:
    """`foo@x.service` -> ("foo", "service", "x"); `foo.service` -> ("foo", "service", None)."""
    stem, dot, suffix = unit.rpartition(".")
    if not dot or not stem or not suffix:
        return None
    prefix, at, instance = stem.partition("@")
    return prefix, suffix, (instance if at else None)


def _build(prefix: str, suffix: str, instance: str | None) -> str:
    return f"{prefix}@{instance}.{suffix}" if instance is not None else f"{prefix}.{suffix}"


def _dash_parent(prefix: str) -> str | None:
    """One step of systemd's prefix walk: "foo-bar-baz" -> "foo-bar-", "foo-bar-" -> "foo-".

    A trailing dash is chopped once before looking further; a leading dash ends the walk.
    """
    chopped = False
    while True:
        dash = prefix.rfind("-")
        if dash <= 0:
            return None
        if dash + 1 < len(prefix) or chopped:
            return prefix[: dash + 1]
        prefix = prefix[:dash]
        chopped = True


def dropin_dir_names(unit: str) -> tuple[str, ...]:
    """Name-specific drop-in directory names of `unit` in systemd's lookup order, no repeats
    (the type-level `<type>.d` is not included)."""
    out: list[str] = []

    def walk(name: str) -> None:
        dropin = f"{name}.d"
        if dropin not in out:
            out.append(dropin)
        parts = _split(name)
        if parts is None:
            return
        prefix, suffix, instance = parts
        if instance:
            walk(_build(prefix, suffix, ""))  # the template, `foo@.service`
        parent = _dash_parent(prefix)
        if parent is not None:
            # A template's prefixes are plain names (`foo-bar@.service` -> `foo-.service`).
            walk(_build(parent, suffix, instance or None))

    walk(unit)
    return tuple(out)


def _fragment_names(unit: str) -> tuple[str, ...]:
    parts = _split(unit)
    if parts is None or not parts[2]:
        return (unit,)
    prefix, suffix, _ = parts
    return (unit, _build(prefix, suffix, ""))


def _type_dir(unit: str) -> str | None:
    parts = _split(unit)
    return f"{parts[1]}.d" if parts is not None else None


def _normalized(search_path: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in search_path:
        directory = os.path.normpath(raw)
        if directory not in out:
            out.append(directory)
    return tuple(out)


def _ancestors(directory: str) -> Iterable[str]:
    current = directory
    while True:
        parent = os.path.dirname(current)
        if parent == current:
            return
        yield parent
        current = parent


def _index(pairs: Iterable[tuple[str, str]]) -> Mapping[str, frozenset[str]]:
    grouped: dict[str, set[str]] = {}
    for key, unit in pairs:
        grouped.setdefault(key, set()).add(unit)
    return MappingProxyType({key: frozenset(units) for key, units in grouped.items()})


@dataclass(frozen=True, slots=True)
class WatchPlan:
    """The directories to watch, by why they are watched."""

    search_dirs: tuple[str, ...]  # existing search-path directories, in search-path order
    dropin_dirs: tuple[str, ...]  # existing drop-in directories that may apply to a unit
    ancestors: tuple[str, ...]  # nearest existing ancestors of missing search-path dirs

    @property
    def directories(self) -> frozenset[str]:
        return frozenset(self.search_dirs) | frozenset(self.dropin_dirs) | frozenset(self.ancestors)


class WatchSet:
    """Units and search path, indexed so that one event is answered in O(1)."""

    __slots__ = ("_by_dropin", "_by_entry", "_plan_paths", "_search_dirs", "search_path", "units")

    def __init__(self, units: Collection[str], search_path: Sequence[str]) -> None:
        self.units = frozenset(units)
        self.search_path = _normalized(search_path)
        self._search_dirs = frozenset(self.search_path)
        self._by_entry = _index((name, u) for u in self.units for name in _fragment_names(u))
        self._by_dropin = _index(
            [(name, u) for u in self.units for name in dropin_dir_names(u)]
            + [(t, u) for u in self.units if (t := _type_dir(u)) is not None]
        )
        # Paths whose appearance or disappearance changes where the search dirs are watched.
        self._plan_paths = self._search_dirs | {a for d in self.search_path for a in _ancestors(d)}

    def affected(self, directory: str, name: str | None) -> frozenset[str]:
        """Units that a change of `name` in `directory` may affect (name None: the directory
        itself changed, was moved or deleted)."""
        found: frozenset[str] = frozenset()
        if directory in self._search_dirs:
            if name is None:
                return self.units
            found = self._by_entry.get(name, found) | self._by_dropin.get(name, found)
        parent, base = os.path.split(directory)
        in_dropin_dir = parent in self._search_dirs and base in self._by_dropin
        if in_dropin_dir and (name is None or name.endswith(_DROPIN_SUFFIX)):
            found |= self._by_dropin[base]
        return found

    def shapes_plan(self, directory: str, name: str) -> bool:
        """Whether `name` appearing in or leaving `directory` changes which directories to
        watch: a search-path dir, an ancestor of one, or a drop-in dir that may apply."""
        path = os.path.join(directory, name)
        if path in self._plan_paths:
            return True
        return directory in self._search_dirs and name in self._by_dropin

    def plan(self, entries: Entries) -> WatchPlan:
        """What to watch, given `entries(dir)` (names in `dir`, None when it is missing)."""
        seen: dict[str, Collection[str] | None] = {}

        def listing(directory: str) -> Collection[str] | None:
            if directory not in seen:
                seen[directory] = entries(directory)
            return seen[directory]

        search_dirs: list[str] = []
        dropin_dirs: set[str] = set()
        ancestors: set[str] = set()
        for directory in self.search_path:
            names = listing(directory)
            if names is None:
                ancestor = next((a for a in _ancestors(directory) if listing(a) is not None), None)
                if ancestor is not None:
                    ancestors.add(ancestor)
                continue
            search_dirs.append(directory)
            dropin_dirs.update(os.path.join(directory, n) for n in names if n in self._by_dropin)
        return WatchPlan(tuple(search_dirs), tuple(sorted(dropin_dirs)), tuple(sorted(ancestors)))


def affected_units(
    directory: str, name: str | None, units: Collection[str], search_path: Sequence[str]
) -> frozenset[str]:
    """Which of `units` a change of `name` in `directory` may affect (see `WatchSet`)."""
    return WatchSet(units, search_path).affected(os.path.normpath(directory), name)


def plan_watches(search_path: Sequence[str], units: Collection[str], entries: Entries) -> WatchPlan:
    """The directories to watch for `units` on `search_path` (see `WatchSet.plan`)."""
    return WatchSet(units, search_path).plan(entries)
