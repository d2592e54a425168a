"""The reconcile planner: which unit files to write or remove, and which units to (re)start.

Pure. The daemon runs a plan in this order: stop `stop`, write `writes` and delete `removals`,
one daemon Reload when `reload`, then start `start` and restart `restart`.

Rules:
- A file is written when it is absent, or when it carries an intact stackd marker (stackd wrote
  it and nobody touched it since) and the rendered text changed. A file whose marker no longer
  matches its content was hand-edited (drift): it is rewritten only with `HealMode.REPAIR`;
  otherwise it is left alone and ownership reports it.
- A file without the marker, or a symlink, is never written, written through or removed; a
  desired name in that state lands in `refused` with the reason (ownership reports it as
  `drift`, so the daemon needs no finding of its own for it).
- A file with the marker whose name is not desired belongs to a stack no longer configured: its
  unit is stopped, then the file is removed (a hand-edited one only with `REPAIR`).
- Main units (`<stack>.service`) written for the first time are started; rewritten ones are
  restarted. `-update.service` units are only written: they run when an update runs.
- `active` (unit -> ActiveState) is optional. When given, a rewritten main unit that is not
  running is started rather than restarted, an unchanged main unit that is `inactive` is
  started (pass it on the first reconcile after the daemon starts, so configured stacks run),
  and only units that are not `inactive` are stopped. A `failed` unchanged unit is left as it
  is: starting it on every reconcile would loop; a config change or the user restarts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stackd.core.models import UPDATE_SUFFIX, HealMode

__all__ = ["OwnedFileState", "ReconcilePlan", "is_update_unit", "plan_reconcile"]

_SERVICE = ".service"
_RUNNING = frozenset({"active", "activating", "reloading", "refreshing"})


@dataclass(frozen=True, slots=True)
class OwnedFileState:
    """What `unit_dir` holds now under one file name."""

    name: str
    text: str | None  # None: absent (or a symlink, which is never read)
    is_symlink: bool = False
    has_marker: bool = False  # the text carries a stackd marker line
    # ... and the marker's hash matches the content (render.is_intact). Unset, a file whose
    # text differs counts as edited by hand: it is not rewritten unless heal is "repair".
    intact: bool = False


@dataclass(frozen=True, slots=True)
class ReconcilePlan:
    writes: tuple[tuple[str, str], ...] = ()  # (file name, text), written atomically
    removals: tuple[str, ...] = ()  # owned files of stacks no longer configured
    refused: tuple[tuple[str, str], ...] = ()  # (file name, reason) left untouched
    reload: bool = False  # one daemon Reload after the writes and removals
    start: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()  # before the removals

    @property
    def empty(self) -> bool:
        """Nothing to do (refusals are reported, not done)."""
        return not (self.writes or self.removals or self.start or self.restart or self.stop)


def _decide(
    name: str, text: str, now: OwnedFileState | None, *, repair: bool
) -> tuple[str | None, bool]:
    """(why the file is left alone, or None; whether to write it)."""
    if now is None or (now.text is None and not now.is_symlink):
        return None, True
    if now.is_symlink:
        return f"{name} is a symlink: stackd never writes through one", False
    if not now.has_marker:
        return f"{name} has no stackd marker: stackd never overwrites it", False
    if now.text == text:
        return None, False
    if not now.intact and not repair:
        return (
            f"{name} does not match its stackd marker (edited by hand?) and daemon.heal is "
            "'report': left as is",
            False,
        )
    return None, True


def is_update_unit(name: str) -> bool:
    """`<stack>-update.service`: stack names never end in -update, so this is unambiguous."""
    return name.endswith(f"{UPDATE_SUFFIX}{_SERVICE}")


def plan_reconcile(
    desired: Mapping[str, str],
    present: Mapping[str, OwnedFileState],
    *,
    heal: HealMode,
    active: Mapping[str, str] | None = None,
) -> ReconcilePlan:
    """Turn rendered texts (`desired`, file name -> text) and `unit_dir`'s files into a plan."""
    repair = heal is HealMode.REPAIR
    writes: list[tuple[str, str]] = []
    refused: list[tuple[str, str]] = []
    start: list[str] = []
    restart: list[str] = []
    for name in sorted(desired):
        text = desired[name]
        reason, write = _decide(name, text, present.get(name), repair=repair)
        if reason is not None:
            refused.append((name, reason))
        if write:
            writes.append((name, text))
        if is_update_unit(name) or reason is not None:
            continue
        state = None if active is None else active.get(name, "inactive")
        if write and name in present and present[name].text is not None:
            (start if state is not None and state not in _RUNNING else restart).append(name)
        elif write or state == "inactive":
            start.append(name)

    removals: list[str] = []
    stop: list[str] = []
    for name in sorted(set(present) - set(desired)):
        now = present[name]
        if now.is_symlink or not now.has_marker or now.text is None:
            continue  # not stackd's
        if not now.intact and not repair:
            refused.append(
                (name, f"{name} belongs to no configured stack but was edited by hand: left")
            )
            continue
        removals.append(name)
        if active is None or active.get(name, "inactive") != "inactive":
            stop.append(name)

    return ReconcilePlan(
        writes=tuple(writes),
        removals=tuple(removals),
        refused=tuple(refused),
        reload=bool(writes or removals),
        start=tuple(start),
        restart=tuple(restart),
        stop=tuple(stop),
    )
