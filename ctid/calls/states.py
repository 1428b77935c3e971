"""The call state machine: every allowed transition, in one table.

Theory of operation
-------------------
A call is the customer's view of one conversation, whatever channels Asterisk
uses for it. Its state answers "what is happening to the caller right now".
Two sources move it, and each owns different transitions:

* **AMI** (what Asterisk reports) creates a call in ``RINGING`` when its first
  channel appears, moves it to ``CONNECTED`` when two channels of the call meet
  in a bridge (``BridgeEnter``), and to ``ENDED`` when its last channel hangs up.
  Asterisk cannot know the rest.
* **ctid** (``CallModel.mark``) sets the states only ctid knows: ``IVR`` (its
  FastAGI flow runs), ``QUEUED`` (waiting in a ctid queue), ``OFFERED`` (an agent
  is reserved and being rung), ``HELD`` (it redirected both legs into the hold
  contexts, capture 15) and ``TRANSFERRING`` (it started a transfer). Asterisk
  has no event for any of these: a hold by dual ``Redirect`` produces no
  ``Hold`` event, and app_queue only runs in the fail-open fallback.

::

    (new call) ──AMI──► RINGING
    RINGING, IVR, QUEUED, OFFERED ──ctid──► IVR / QUEUED / OFFERED   (see the table)
    RINGING, IVR, QUEUED, OFFERED, HELD, TRANSFERRING ──AMI bridge──► CONNECTED
    CONNECTED ──ctid──► HELD, TRANSFERRING, QUEUED, IVR
    any state except ENDED ──AMI: last leg hung up / vanished on resync──► ENDED

Rules:

* Everything that changes a call's state is checked against
  :data:`TRANSITIONS`, which says for each allowed ``(from, to)`` pair who may
  drive it (:class:`Source`). A pair that is not in the table is illegal.
* Entering the state the call is already in is a no-op, not an error (a second
  ``BridgeEnter`` of a connected call, a repeated ``mark``).
* ``ENDED`` is final. Nothing leaves it, so a call ends exactly once; the model
  also forgets an ended call's channels, so late events cannot reach it.
* An illegal transition asked for by ctid raises :class:`CallStateError`: it is
  a bug in the caller. One reported by AMI is never an exception (Asterisk is
  right about what happened); the model ignores it and returns a diagnostic.
"""

from __future__ import annotations

import enum

__all__ = [
    "MARKABLE",
    "TRANSITIONS",
    "CallState",
    "CallStateError",
    "Source",
    "allowed",
    "check_mark",
]


class CallState(enum.StrEnum):
    RINGING = "ringing"
    IVR = "ivr"
    QUEUED = "queued"
    OFFERED = "offered"
    CONNECTED = "connected"
    HELD = "held"
    TRANSFERRING = "transferring"
    ENDED = "ended"


class Source(enum.Flag):
    """Who may drive a transition."""

    AMI = enum.auto()
    CTID = enum.auto()


class CallStateError(Exception):
    """An illegal call state transition was asked for (through ``CallModel.mark``)."""

    def __init__(self, call_id: str, old: CallState, new: CallState | str, why: str = "") -> None:
        self.call_id = call_id
        self.old = old
        self.new = new
        detail = f": {why}" if why else ""
        super().__init__(f"call {call_id}: illegal transition {old} -> {new}{detail}")


_R, _I, _Q, _O = CallState.RINGING, CallState.IVR, CallState.QUEUED, CallState.OFFERED
_C, _H, _T, _E = CallState.CONNECTED, CallState.HELD, CallState.TRANSFERRING, CallState.ENDED
_AMI, _CTID = Source.AMI, Source.CTID

#: Every allowed transition and who may drive it. Nothing else is legal.
TRANSITIONS: dict[tuple[CallState, CallState], Source] = {
    # A new call: the IVR picks it up, it goes straight to a queue or an agent,
    # or the dialplan bridges it directly (Dial in the dialplan, capture 13).
    (_R, _I): _CTID,
    (_R, _Q): _CTID,
    (_R, _O): _CTID,
    (_R, _C): _AMI,
    # IVR: on to a queue, straight to an agent, or transfer out of the IVR.
    (_I, _Q): _CTID,
    (_I, _O): _CTID,
    (_I, _T): _CTID,
    (_I, _C): _AMI,
    # Queued: offered to an agent, back to the IVR (callback menu), or answered
    # outside ctid's routing (the native Queue() fallback bridges it).
    (_Q, _I): _CTID,
    (_Q, _O): _CTID,
    (_Q, _C): _AMI,
    # Offered: the agent answers (bridge), or RONA puts it back in the queue,
    # or overflow sends it to an IVR (voicemail, callback).
    (_O, _Q): _CTID,
    (_O, _I): _CTID,
    (_O, _C): _AMI,
    # Connected: hold, transfer, back to a queue or to an IVR (survey).
    (_C, _H): _CTID,
    (_C, _T): _CTID,
    (_C, _Q): _CTID,
    (_C, _I): _CTID,
    # Held: resumed by the Bridge action (capture 15), or transferred.
    (_H, _C): _AMI,
    (_H, _T): _CTID,
    # Transferring: lands in a bridge (blind 06b, attended 06c), a queue, an IVR,
    # an agent offer, or on hold while the target is consulted.
    (_T, _C): _AMI,
    (_T, _Q): _CTID,
    (_T, _I): _CTID,
    (_T, _O): _CTID,
    (_T, _H): _CTID,
}
# Any live call ends when its last channel hangs up.
for _state in CallState:
    if _state is not _E:
        TRANSITIONS[(_state, _E)] = _AMI
del _state

#: States that only ctid knows, and that :meth:`CallModel.mark` accepts.
MARKABLE: frozenset[CallState] = frozenset({_I, _Q, _O, _H, _T})


def allowed(old: CallState, new: CallState, source: Source) -> bool:
    """Whether ``source`` may move a call from ``old`` to ``new`` (same state: yes, a no-op)."""
    if old is new:
        return True
    drivers = TRANSITIONS.get((old, new))
    return drivers is not None and bool(drivers & source)


def check_mark(call_id: str, old: CallState, new: CallState | str) -> CallState:
    """Validate a ctid-driven transition; return the target state or raise CallStateError."""
    try:
        target = CallState(new)
    except ValueError:
        raise CallStateError(call_id, old, new, "unknown state") from None
    if target not in MARKABLE:
        raise CallStateError(call_id, old, target, "only AMI events set this state")
    if not allowed(old, target, _CTID):
        raise CallStateError(call_id, old, target)
    return target
