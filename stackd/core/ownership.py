"""Ownership findings from observed state: the files on disk and the manager's loaded units.

Pure: `evaluate` turns a `DiskView` (built by `stackd.adapters.unitdirs.scan`) and the
manager's `UnitState`s into `Finding`s. Each invariant of DESIGN section 5 is checked in both
views where it can be seen; a finding's `source` says which view saw it, so the same condition
seen twice gives two findings with different keys (the disk one appears at once, the manager one
after a reload).

Decisions worth knowing:
- A mask is any definition that is a symlink to /dev/null or an empty regular file (systemd 252
  treats both as masked, see systemd.unit(5)). Masks are reported as `masked` only, never also as
  `shadowed` or `foreign-fragment`.
- `shadowed` is raised once per other non-mask definition of the unit name, whether it takes
  precedence over the expected file or only sits lower on the search path.
- A missing expected file is `drift` for units stackd renders (stackd writes it again at the
  next reconcile) and `not-loaded` (disk) for adopted units, whose files another tool writes.
- Manager findings need a reachable manager: with `manager_available=False` only the global
  `manager-unavailable` finding and the disk findings are produced. A unit absent from `loaded`
  has no manager view and gets no manager findings.
"""

from __future__ import annotations

import os.path
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from stackd.core.models import Finding, FindingKind, FindingSource, UnitState

__all__ = [
    "DiskView",
    "UnitExpectation",
    "UnitFile",
    "UnitFileKind",
    "evaluate",
]

UnitFileKind = Literal["file", "symlink", "mask"]


@dataclass(frozen=True, slots=True)
class UnitFile:
    """One definition of a unit name found in a search-path directory."""

    path: str  # e.g. /etc/systemd/user/web.service
    directory: str  # the search-path directory it was found in
    kind: UnitFileKind  # "mask": symlink to /dev/null (or a char device) or an empty file
    target: str | None = None  # symlink target, made absolute; None for plain files


@dataclass(frozen=True, slots=True)
class DiskView:
    """The unit files of interest as they are on disk, in the manager's search-path order."""

    search_path: tuple[str, ...]  # the manager's UnitPath, highest precedence first
    definitions: Mapping[str, tuple[UnitFile, ...]]  # unit -> its files, search-path order
    dropins: Mapping[str, tuple[str, ...]]  # unit -> drop-ins that apply, in applying order
    owned_texts: Mapping[str, str]  # file name in unit_dir -> text (regular files only)


@dataclass(frozen=True, slots=True)
class UnitExpectation:
    """Where one unit must come from, and (for units stackd renders) what it must say."""

    unit: str  # "web.service"
    stack: str
    expected_path: str  # unit_dir/web.service, or the path an adopting tool writes
    expected_text: str | None  # what stackd renders; None for adopted units (no drift check)


def evaluate(
    *,
    units: Mapping[str, UnitExpectation],
    disk: DiskView,
    loaded: Mapping[str, UnitState] | None,
    unit_dir: str,
    allowed_dropin_dirs: Sequence[str],
    manager_available: bool,
    marker_of: Callable[[str], str | None] | None = None,
    unit_dir_resolved: str | None = None,
) -> list[Finding]:
    """Every broken ownership invariant of `units`, sorted deterministically.

    `marker_of` (the renderer's marker reader) only sharpens the wording of `drift`: a file
    without the stackd marker is one stackd will never overwrite. `unit_dir_resolved` is
    `unit_dir` with its symlinks resolved, when that differs: the manager names drop-ins by
    their resolved directory, so `<resolved>/<unit>.d/` is stackd's own drop-in dir as well.
    (Allowed drop-in dirs are compared as given: pass each spelling that may appear.)
    """
    allowed = tuple(_norm(d) for d in allowed_dropin_dirs)
    roots = (unit_dir,) if unit_dir_resolved is None else (unit_dir, unit_dir_resolved)
    findings: list[Finding] = []
    if not manager_available:
        findings.append(
            Finding(
                kind=FindingKind.MANAGER_UNAVAILABLE,
                unit="",
                source=FindingSource.MANAGER,
                detail=(
                    "the systemd user manager cannot be reached: start it "
                    "(systemctl --user start, or log in with lingering enabled) and check "
                    "DBUS_SESSION_BUS_ADDRESS"
                ),
            )
        )
    for name in sorted(units):
        exp = units[name]
        findings.extend(
            _disk_findings(exp, disk, unit_dir, roots=roots, allowed=allowed, marker_of=marker_of)
        )
        if manager_available and loaded is not None and name in loaded:
            findings.extend(
                _manager_findings(exp, loaded[name], disk, roots, allowed),
            )
    findings.sort(key=_order)
    return findings


def _order(f: Finding) -> tuple[str, str, str, str, tuple[str, ...]]:
    return (f.unit, f.kind.value, f.source.value, f.stack or "", f.paths)


def _norm(path: str) -> str:
    return os.path.normpath(path)


def _under(path: str, directory: str) -> bool:
    """Whether `path` lies inside `directory` (string comparison: the core does no I/O)."""
    directory = directory.rstrip("/") or "/"
    parent = os.path.dirname(_norm(path))
    return parent == directory or parent.startswith(directory.rstrip("/") + "/")


def _dropin_allowed(path: str, unit: str, roots: Sequence[str], allowed: Sequence[str]) -> bool:
    parent = os.path.dirname(_norm(path))
    own = any(parent == os.path.join(_norm(root), f"{unit}.d") for root in roots)
    return own or any(_under(path, d) for d in allowed)


def _fragment_sources(exp: UnitExpectation, disk: DiskView) -> set[str]:
    """Paths the manager may report as FragmentPath when it loads the expected file."""
    sources = {_norm(exp.expected_path)}
    for f in disk.definitions.get(exp.unit, ()):
        if _norm(f.path) == _norm(exp.expected_path) and f.target is not None:
            sources.add(_norm(f.target))
    return sources


def _disk_findings(
    exp: UnitExpectation,
    disk: DiskView,
    unit_dir: str,
    *,
    roots: Sequence[str],
    allowed: Sequence[str],
    marker_of: Callable[[str], str | None] | None,
) -> list[Finding]:
    defs = disk.definitions.get(exp.unit, ())
    own = next((f for f in defs if _norm(f.path) == _norm(exp.expected_path)), None)
    found = [
        *_definition_findings(exp, defs, own),
        *_content_findings(exp, disk, unit_dir, own, marker_of),
    ]
    found += [
        (
            FindingKind.FOREIGN_DROPIN,
            (path,),
            f"drop-in {path} applies to {exp.unit}: remove it, or list its directory in "
            "daemon.allowed_dropin_dirs",
        )
        for path in disk.dropins.get(exp.unit, ())
        if not _dropin_allowed(path, exp.unit, roots, allowed)
    ]
    return [
        Finding(kind, exp.unit, paths, exp.stack, FindingSource.DISK, detail)
        for kind, paths, detail in found
    ]


_Raw = tuple[FindingKind, tuple[str, ...], str]


def _definition_findings(
    exp: UnitExpectation, defs: tuple[UnitFile, ...], own: UnitFile | None
) -> list[_Raw]:
    """shadowed, masked and foreign-fragment, from the unit's definitions on the path."""
    unit, expected = exp.unit, _norm(exp.expected_path)
    out: list[_Raw] = []
    own_rank = defs.index(own) if own is not None else len(defs)
    what_to_do = (
        f"remove that file or set managed=false for stack {exp.stack!r}"
        if exp.expected_text is not None
        else "remove one of them"
    )
    for rank, f in enumerate(defs):
        if f is own:
            continue
        if f.kind == "mask":
            effect = "" if rank == 0 else " (a higher-precedence definition wins for now)"
            out.append(
                (
                    FindingKind.MASKED,
                    (f.path,),
                    f"{unit} is masked by {f.path}{effect}: run "
                    f"'systemctl --user unmask {unit}' or remove that file",
                )
            )
        elif own is None:
            why = f"{unit} is defined in {f.path}, while {expected} is missing"
            out.append((FindingKind.SHADOWED, (f.path, expected), f"{why}: {what_to_do}"))
        elif rank < own_rank:
            why = f"{unit} is also defined in {f.path}, which takes precedence over {expected}"
            out.append((FindingKind.SHADOWED, (f.path, expected), f"{why}: {what_to_do}"))
        else:
            why = f"{unit} is also defined in {f.path}, which takes over if {expected} goes away"
            out.append((FindingKind.SHADOWED, (expected, f.path), f"{why}: {what_to_do}"))
    if own is not None and own.kind == "mask":
        out.append(
            (
                FindingKind.MASKED,
                (own.path,),
                f"{unit} is masked by {own.path} (a link to /dev/null or an empty file): "
                "remove it so the unit can load",
            )
        )
    if defs and defs[0] is not own and defs[0].kind != "mask":
        winner = defs[0].path
        out.append(
            (
                FindingKind.FOREIGN_FRAGMENT,
                (winner, expected),
                f"{unit} would load from {winner} instead of {expected}: remove {winner} or "
                f"set managed=false for stack {exp.stack!r}",
            )
        )
    return out


def _content_findings(
    exp: UnitExpectation,
    disk: DiskView,
    unit_dir: str,
    own: UnitFile | None,
    marker_of: Callable[[str], str | None] | None,
) -> list[_Raw]:
    """drift (or, for adopted units, not-loaded) from the expected file itself."""
    unit, expected, stack = exp.unit, _norm(exp.expected_path), exp.stack
    if own is None:
        if exp.expected_text is not None:
            why = f"{expected} is missing: stackd writes {unit} again at the next reconcile"
            return [(FindingKind.DRIFT, (expected,), why)]
        why = (
            f"{expected} is missing, so {unit} cannot load from it: let the tool that writes "
            f"stack {stack!r}'s units write it again"
        )
        return [(FindingKind.NOT_LOADED, (expected,), why)]
    if exp.expected_text is None or own.kind == "mask":
        return []
    if own.kind == "symlink":
        why = (
            f"{expected} is a symlink to {own.target}, which stackd never writes through: "
            f"remove it to let stackd write {unit}, or set managed=false for stack {stack!r}"
        )
        return [(FindingKind.DRIFT, (expected,), why)]
    text = _owned_text(disk, unit_dir, own)
    if text is None or text == exp.expected_text:
        return []
    if marker_of is not None and marker_of(text) is None:
        why = (
            f"{expected} has no stackd marker, so stackd will never overwrite it: remove it to "
            f"let stackd write {unit}, or set managed=false for stack {stack!r}"
        )
    else:
        why = (
            f"{expected} differs from what stackd renders (edited by hand?): see "
            "'stackd render --diff'; with daemon.heal = \"repair\" stackd rewrites it"
        )
    return [(FindingKind.DRIFT, (expected,), why)]


def _owned_text(disk: DiskView, unit_dir: str, own: UnitFile) -> str | None:
    if _norm(own.directory) != _norm(unit_dir):
        return None
    return disk.owned_texts.get(os.path.basename(own.path))


def _manager_findings(
    exp: UnitExpectation,
    state: UnitState,
    disk: DiskView,
    roots: Sequence[str],
    allowed: Sequence[str],
) -> list[Finding]:
    unit, expected = exp.unit, _norm(exp.expected_path)
    out: list[Finding] = []

    def add(kind: FindingKind, paths: tuple[str, ...], detail: str) -> None:
        out.append(Finding(kind, unit, paths, exp.stack, FindingSource.MANAGER, detail))

    if state.load_state == "masked":
        paths = (state.fragment_path,) if state.fragment_path else ()
        add(
            FindingKind.MASKED,
            paths,
            f"the manager has {unit} masked: run 'systemctl --user unmask {unit}'",
        )
    elif state.load_state != "loaded":
        why = f" ({state.load_error})" if state.load_error else ""
        add(
            FindingKind.NOT_LOADED,
            (expected,),
            f"the manager could not load {unit}: load state {state.load_state!r}{why}; fix "
            f"{expected}, then run 'systemctl --user daemon-reload'",
        )
    elif _norm(state.fragment_path) not in _fragment_sources(exp, disk):
        where = state.fragment_path or "no unit file at all"
        add(
            FindingKind.FOREIGN_FRAGMENT,
            (state.fragment_path, expected) if state.fragment_path else (expected,),
            f"the manager loaded {unit} from {where} instead of {expected}: remove the other "
            f"definition and reload, or set managed=false for stack {exp.stack!r}",
        )
    on_disk = {_norm(p) for p in disk.dropins.get(unit, ())}
    in_memory = {_norm(p) for p in state.drop_in_paths}
    if state.need_daemon_reload:
        add(
            FindingKind.STALE,
            (state.fragment_path or expected,),
            f"the manager's loaded {unit} is older than the files on disk: run "
            "'systemctl --user daemon-reload'",
        )
    elif state.load_state == "loaded" and on_disk != in_memory:
        # NeedDaemonReload does not always notice a drop-in added or removed (systemd 252
        # answers from a path cache), so the two views are compared directly.
        changed = tuple(sorted(on_disk ^ in_memory))
        add(
            FindingKind.STALE,
            changed,
            f"the manager's loaded {unit} does not have the drop-ins now on disk "
            f"({', '.join(changed)}): run 'systemctl --user daemon-reload'",
        )
    for path in state.drop_in_paths:
        if not _dropin_allowed(path, unit, roots, allowed):
            add(
                FindingKind.FOREIGN_DROPIN,
                (path,),
                f"the manager applies drop-in {path} to {unit}: remove it and reload, or list "
                "its directory in daemon.allowed_dropin_dirs",
            )
    return out
