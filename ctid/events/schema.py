"""The event contract: the one envelope that CRM vendors and agent desktops code against.

Every event, over MQTT and over the websocket, is this JSON object::

    {"v": 1, "seq": 42, "id": "3f0c...", "ts": "2026-12-01T09:30:00.123Z",
     "type": "call.offered", "tenant": "acme", "call_id": "...", "agent_id": "1001",
     "queue": "support", "data": {...}}

* ``v`` is the contract version (1). A change that breaks consumers bumps it; new
  optional fields in ``data`` do not.
* ``seq`` is strictly increasing over the whole ctid instance and survives restarts
  (the outbox keeps it). A consumer sees a filtered slice, so gaps are normal.
* ``id`` is a UUID. Delivery is **at least once**: consumers dedupe by ``id``.
* ``ts`` is ISO-8601 UTC with milliseconds and a ``Z``.
* ``tenant``, ``call_id``, ``agent_id`` and ``queue`` are ``null`` when they do not apply.

The types and their ``data`` fields are documented in ``docs/events.md`` and described
by the JSON-schema files in ``docs/schema/``; ``tests/test_events_schema.py`` validates
every emitted event against them. This module is the single place that defines the
wire format: nothing else builds envelopes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

CONTRACT_VERSION: Final = 1

CALL_TYPES: Final = (
    "call.started",
    "call.ivr",
    "call.queued",
    "call.offered",
    "call.answered",
    "call.held",
    "call.resumed",
    "call.transferred",
    "call.recording",
    "call.abandoned",
    "call.ended",
    "call.wrapup",
    "call.survey",
)
AGENT_TYPES: Final = ("agent.state",)
QUEUE_TYPES: Final = ("queue.stats",)
EVENT_TYPES: Final = frozenset(CALL_TYPES + AGENT_TYPES + QUEUE_TYPES)

AGENT_STATES: Final = ("logged_out", "ready", "reserved", "on_call", "busy", "wrap_up", "paused")
RECORDING_STATES: Final = ("started", "paused", "resumed", "stopped")


class EventError(ValueError):
    """An event that does not fit the contract (unknown type, bad field)."""


def format_ts(ts: datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``: ``2026-12-01T09:30:00.123Z``."""
    if ts.tzinfo is None:
        raise EventError("event timestamps must be timezone-aware")
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class Event:
    """One event. ``seq`` is 0 until the bus assigns it (:meth:`with_seq`)."""

    type: str
    tenant: str | None
    ts: datetime
    data: dict[str, Any] = field(default_factory=dict)
    call_id: str | None = None
    agent_id: str | None = None
    queue: str | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    seq: int = 0
    v: int = CONTRACT_VERSION

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise EventError(f"unknown event type {self.type!r}")
        if self.ts.tzinfo is None:
            raise EventError("event timestamps must be timezone-aware")

    def with_seq(self, seq: int) -> Event:
        return Event(self.type, self.tenant, self.ts, self.data, self.call_id, self.agent_id, self.queue,
                     self.id, seq, self.v)

    def envelope(self) -> dict[str, Any]:
        """The wire object, keys in contract order."""
        return {"v": self.v, "seq": self.seq, "id": self.id, "ts": format_ts(self.ts), "type": self.type,
                "tenant": self.tenant, "call_id": self.call_id, "agent_id": self.agent_id,
                "queue": self.queue, "data": self.data}

    def to_json(self) -> str:
        """Compact JSON, serialised once per event by the bus and shared by every sink."""
        return json.dumps(self.envelope(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_envelope(cls, obj: dict[str, Any]) -> Event:
        try:
            return cls(type=obj["type"], tenant=obj["tenant"], ts=parse_ts(obj["ts"]), data=obj["data"],
                       call_id=obj.get("call_id"), agent_id=obj.get("agent_id"), queue=obj.get("queue"),
                       id=obj["id"], seq=int(obj["seq"]), v=int(obj["v"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise EventError(f"not an event envelope: {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise EventError(f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise EventError("an event envelope is a JSON object")
        return cls.from_envelope(obj)
