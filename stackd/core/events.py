"""The registry of log events: name, journal MESSAGE_ID, default priority and summary.

Pure data. The MESSAGE_IDs are fixed forever: journald's message catalog
(contrib/systemd/stackd.catalog) and any operator's `journalctl MESSAGE_ID=...` filter
depend on them, so an event that changes meaning gets a new event name and a new id.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Final

__all__ = [
    "EVENTS",
    "Event",
    "EventInfo",
    "Priority",
    "event_info",
]


class Priority(IntEnum):
    """Syslog levels, as journald's PRIORITY field carries them."""

    EMERG = 0
    ALERT = 1
    CRIT = 2
    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7


class Event(StrEnum):
    """Every event stackd logs on purpose; the value is what `STACKD_EVENT` carries."""

    DAEMON_STARTED = "daemon.started"
    DAEMON_STOPPING = "daemon.stopping"
    MANAGER_CONNECTED = "manager.connected"
    MANAGER_UNAVAILABLE = "manager.unavailable"
    CONFIG_INVALID = "config.invalid"
    CONFIG_RELOADED = "config.reloaded"
    UNIT_WRITTEN = "unit.written"
    UNIT_REMOVED = "unit.removed"
    RECONCILE_FINISHED = "reconcile.finished"
    RECONCILE_FAILED = "reconcile.failed"
    FINDING_RAISED = "finding.raised"
    FINDING_CLEARED = "finding.cleared"
    UPDATE_STARTED = "update.started"
    UPDATE_STACK_FINISHED = "update.stack.finished"
    UPDATE_FINISHED = "update.finished"
    ENV_LEGACY_FALLBACK = "env.legacy_fallback"
    STATE_WRITE_FAILED = "state.write_failed"

    @property
    def info(self) -> EventInfo:
        return EVENTS[self]

    @property
    def message_id(self) -> str:
        return EVENTS[self].message_id

    @property
    def priority(self) -> Priority:
        return EVENTS[self].priority

    @property
    def summary(self) -> str:
        return EVENTS[self].summary


@dataclass(frozen=True, slots=True)
class EventInfo:
    """What the journal needs to know about one event.

    `message_id` is 32 lowercase hex digits (a 128-bit id, as journald expects);
    `priority` is the level the event is meant to be logged at; `summary` is the
    journal MESSAGE when a call site gives no `message` of its own.
    """

    message_id: str
    priority: Priority
    summary: str


EVENTS: Final[MappingProxyType[Event, EventInfo]] = MappingProxyType(
    {
        Event.DAEMON_STARTED: EventInfo(
            "89f93d261ccb4fea8a5d3c3c2bcc8d22", Priority.INFO, "stackd started"
        ),
        Event.DAEMON_STOPPING: EventInfo(
            "790d1e65666240b2b13b5530bcb87a0b", Priority.INFO, "stackd is stopping"
        ),
        Event.MANAGER_CONNECTED: EventInfo(
            "5e530fe0a0fb4301b480bc187886a8cd",
            Priority.INFO,
            "Connected to the systemd user manager",
        ),
        Event.MANAGER_UNAVAILABLE: EventInfo(
            "d29ec8586c1c4495b5203a68832fd6ff",
            Priority.ERR,
            "The systemd user manager cannot be reached",
        ),
        Event.CONFIG_INVALID: EventInfo(
            "e5c7e765d3664884a70b41432f38d447",
            Priority.ERR,
            "The stackd configuration is invalid",
        ),
        Event.CONFIG_RELOADED: EventInfo(
            "48c80474bc34435da4ceb97bc2435f3c",
            Priority.INFO,
            "The stackd configuration was reloaded",
        ),
        Event.UNIT_WRITTEN: EventInfo(
            "5c0b41e120d94938917a6681992139fa", Priority.INFO, "A stack unit file was written"
        ),
        Event.UNIT_REMOVED: EventInfo(
            "6226728cbeb74473a4a0f30f17c83f28", Priority.INFO, "A stack unit file was removed"
        ),
        Event.RECONCILE_FINISHED: EventInfo(
            "4a4de828ab554e55b6dd7ca1e8f040a8", Priority.DEBUG, "Reconciliation finished"
        ),
        Event.RECONCILE_FAILED: EventInfo(
            "4e43ad5bb74b48f58f37a98cb37915e4", Priority.ERR, "Reconciliation failed"
        ),
        Event.FINDING_RAISED: EventInfo(
            "a745ab2687a14c2980596e615198633d",
            Priority.WARNING,
            "A unit ownership problem was found",
        ),
        Event.FINDING_CLEARED: EventInfo(
            "a66ecb4ef1344230be9652ad8be3c097",
            Priority.NOTICE,
            "A unit ownership problem was cleared",
        ),
        Event.UPDATE_STARTED: EventInfo(
            "d88d0525147a42fda61f286d9f2dddff", Priority.INFO, "An update run started"
        ),
        Event.UPDATE_STACK_FINISHED: EventInfo(
            "f3855b16602a49efb017bdd84756881e",
            Priority.INFO,
            "A stack finished updating",
        ),
        Event.UPDATE_FINISHED: EventInfo(
            "4cafbdff4f8b4157b27dc0352ab79e6f", Priority.NOTICE, "An update run finished"
        ),
        Event.ENV_LEGACY_FALLBACK: EventInfo(
            "7c0845906023450baa56fa593896f240",
            Priority.WARNING,
            "A stack fell back to a legacy environment file",
        ),
        Event.STATE_WRITE_FAILED: EventInfo(
            "37d1b4ab19aa407b97bf9b91db99b812",
            Priority.ERR,
            "The stackd state file could not be written",
        ),
    }
)


def event_info(name: str) -> EventInfo | None:
    """The registry entry of an event name, or None for an event not in the registry."""
    try:
        return EVENTS[Event(name)]
    except ValueError:
        return None
