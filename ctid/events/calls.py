"""Call events from the call model: ``call.started``, ``call.answered``, ``call.abandoned``
and ``call.ended``.

The call model (``ctid.calls``) says what happened to a call; this notifier turns those
changes into contract events (``ctid.events.schema``) and hands them to the bus. The
richer events that only one part of ctid knows how to fill (``call.ivr`` from the IVR,
``call.queued``/``call.offered`` from the ACD, holds and transfers from call control)
are published by those parts; they build their ``data`` on :func:`call_data` so every
call event shares the same base fields.

One call, one ``call_id``
    Asterisk announces a channel (``Newchannel``) before ctid's FastAGI script has set
    ``__CTID_CALL_ID``, so the model first knows an inbound call under its Linkedid and
    re-keys it a moment later, when the script binds it (``CallModel.bind_call_id``: no
    ``VarSet`` reaches ctid, whose AMI user does not read the ``dialplan`` class; after a
    restart, the ``ChanVariable`` of the call's next event does it). Publishing at once
    would give one call two ids. So the events of a call that has no ctid id yet are
    *held* until the id arrives (then they go out under it), the call ends, or
    ``identify_grace`` seconds pass (a call ctid
    never handles, e.g. an internal call, or every call while FastAGI is down); then they
    go out under the Linkedid, and that first published id stays the call's id on the
    wire for its whole life, even if a ctid id turns up later.

Abandon rule: an inbound call that was never answered and that the caller hung up is
abandoned; ``call.abandoned`` goes out just before its ``call.ended``. ``where`` is the
state it was in: ``ivr``, ``queue`` (queued or offered) or ``ringing``. For a call the ACD
queued (it annotates ``call.data["queue"]`` and ``["enqueued_at"]``), ``wait_s`` is the
wait in the queue, the envelope's ``queue`` is set, and ``short`` is true when that wait
is under the queue's short-abandon threshold (the ``short_abandon`` lookup); otherwise
``wait_s`` runs from the call's start and ``short`` is false.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from ctid.asterisk.safety import e164_or_none
from ctid.calls import Call, CallChange, CallState, ChangeKind, Direction, HangupBy, Role
from ctid.events.schema import Event, format_ts

log = structlog.get_logger(__name__)

Publish = Callable[[Event], Event]
ShortAbandon = Callable[[str], float | None]
"""The short-abandon threshold of a queue, in seconds (None: the queue has none)."""


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 3)


def queue_wait_s(call: Call) -> float | None:
    """How long a queued call has waited in its queue, up to its answer or its end (or
    now, None if neither): from ``call.data["enqueued_at"]`` (epoch seconds, the original
    enqueue time, which the ACD annotates)."""
    enqueued = call.data.get("enqueued_at")
    end = call.answered_at or call.ended_at
    if not isinstance(enqueued, int | float) or end is None:
        return None
    return round(max(0.0, end.timestamp() - float(enqueued)), 3)


def call_data(call: Call) -> dict[str, Any]:
    """The fields every ``call.*`` event carries (see ``docs/events.md``)."""
    return {
        "direction": call.direction.value,
        "state": call.state.value,
        "caller": {"number": call.caller_number, "name": call.caller_name,
                   "e164": e164_or_none(call.caller_number) if call.caller_number else None},
        "dnis": call.dnis,
        "service_line": call.service_line,
    }


class CallNotifier:
    """Feeds :class:`CallChange` lists to the bus as call events, one id per call."""

    def __init__(self, publish: Publish, *, identify_grace: float = 3.0,
                 short_abandon: ShortAbandon | None = None) -> None:
        self._publish = publish
        self._short_abandon = short_abandon
        self._grace = identify_grace
        self._held: dict[int, list[Event]] = {}  # id(Call) -> events waiting for the call's id
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._calls: dict[int, Call] = {}
        self._wire_id: dict[int, str] = {}  # id(Call) -> the call_id already used on the wire
        self._held_key: dict[str, int] = {}  # provisional call_id -> id(Call), while held
        self._held_as: dict[int, str] = {}  # and back
        self.published = 0

    def on_changes(self, changes: list[CallChange]) -> None:
        for change in changes:
            if change.kind is ChangeKind.STARTED:
                self._emit(change.call, self._started(change.call, change.at))
            elif change.kind is ChangeKind.ANSWERED:
                self._emit(change.call, self._answered(change.call, change.at))
            elif change.kind is ChangeKind.REKEYED:
                self._merged(change.old_call_id, change.call)
                self._identified(change.call)
            elif change.kind is ChangeKind.ENDED:
                call = change.call
                if self._abandoned(call):
                    self._emit(call, self._abandon_event(call, change.at, change.old_state))
                self._emit(call, self._ended(call, change.at))
                self._release(call)

    def close(self) -> None:
        """Flush everything held (shutdown): better an early Linkedid than a lost event."""
        for key in list(self._held):
            self._flush(key)

    # -- building ------------------------------------------------------------------

    def _event(self, type_: str, call: Call, at: datetime, extra: dict[str, Any], *,
               queue: str | None = None) -> Event:
        data = call_data(call)
        data.update(extra)
        return Event(type=type_, tenant=call.tenant, ts=at, data=data, call_id=call.call_id, queue=queue)

    def set_short_abandon(self, lookup: ShortAbandon | None) -> None:
        """``lookup(queue_id)``: the queue's short-abandon threshold in seconds (None: none)."""
        self._short_abandon = lookup

    def _abandon_event(self, call: Call, at: datetime, old_state: CallState | None) -> Event:
        queue = call.data.get("queue")
        queue = queue if isinstance(queue, str) and queue else None
        wait = queue_wait_s(call) if queue is not None else None
        if wait is None:
            wait = _seconds(call.created_at, call.ended_at)
        short = False
        if queue is not None and self._short_abandon is not None and wait is not None:
            threshold = self._short_abandon(queue)
            short = threshold is not None and wait < threshold
        return self._event("call.abandoned", call, at, {"wait_s": wait, "short": short, "where": _where(old_state)},
                           queue=queue)

    def _started(self, call: Call, at: datetime) -> Event:
        first = call.legs[0] if call.legs else None
        return self._event("call.started", call, at, {
            "channel": first.channel if first else None,
            "uniqueid": first.uniqueid if first else None,
            "created_at": format_ts(call.created_at)})

    def _answered(self, call: Call, at: datetime) -> Event:
        agent = call.leg(Role.AGENT)
        return self._event("call.answered", call, at, {
            "answered_at": format_ts(call.answered_at or at),
            "wait_s": _seconds(call.created_at, call.answered_at),
            "agent_channel": agent.channel if agent else None})

    def _ended(self, call: Call, at: datetime) -> Event:
        return self._event("call.ended", call, at, {
            "ended_at": format_ts(call.ended_at or at),
            "duration_s": _seconds(call.created_at, call.ended_at or at),
            "talk_s": _seconds(call.answered_at, call.ended_at or at) if call.answered_at else None,
            "hangup_by": call.hangup_by.value if call.hangup_by else "unknown",
            "hangup_cause": call.hangup_cause,
            "abandoned": self._abandoned(call)})

    @staticmethod
    def _abandoned(call: Call) -> bool:
        return (call.direction is Direction.INBOUND and call.answered_at is None
                and call.hangup_by is HangupBy.CALLER)

    # -- one id per call -------------------------------------------------------------

    def _emit(self, call: Call, event: Event) -> None:
        key = id(call)
        wire = self._wire_id.get(key)
        if wire is not None:
            self._send(event, wire)
            return
        if not call.provisional or self._grace == 0:
            self._wire_id[key] = call.call_id
            self._flush(key)
            self._send(event, call.call_id)
            return
        held = self._held.setdefault(key, [])
        held.append(event)
        self._calls[key] = call
        self._held_key[call.call_id] = key
        self._held_as[key] = call.call_id
        if key not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(self._grace, self._flush, key)

    def _merged(self, old_call_id: str | None, call: Call) -> None:
        """A provisional call was merged into another call: its held events describe the
        same conversation, which already has its own, so they are dropped."""
        if old_call_id is None:
            return
        key = self._held_key.pop(old_call_id, None)
        if key is None or key == id(call):
            return
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        dropped = self._held.pop(key, [])
        self._calls.pop(key, None)
        self._held_as.pop(key, None)
        log.debug("events.merged_call_dropped", old_call_id=old_call_id, call_id=call.call_id,
                  events=[e.type for e in dropped])

    def _identified(self, call: Call) -> None:
        key = id(call)
        if key in self._held and key not in self._wire_id:
            self._wire_id[key] = call.call_id
            self._flush(key)

    def _flush(self, key: int) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        events = self._held.pop(key, [])
        call = self._calls.pop(key, None)
        held_as = self._held_as.pop(key, None)
        if held_as is not None:
            self._held_key.pop(held_as, None)
        if not events:
            return
        wire = self._wire_id.get(key)
        if wire is None:
            wire = call.call_id if call is not None else events[0].call_id or ""
            self._wire_id[key] = wire
        for event in events:
            self._send(event, wire)

    def _release(self, call: Call) -> None:
        key = id(call)
        self._flush(key)
        self._wire_id.pop(key, None)

    def _send(self, event: Event, wire_id: str) -> None:
        if event.call_id != wire_id:
            event = Event(event.type, event.tenant, event.ts, event.data, wire_id, event.agent_id, event.queue,
                          event.id)
        self._publish(event)
        self.published += 1


def _where(state: CallState | None) -> str:
    if state is CallState.IVR:
        return "ivr"
    if state in (CallState.QUEUED, CallState.OFFERED):
        return "queue"
    return "ringing"
