"""The call model: AMI events in, calls and their changes out. Pure and synchronous.

Theory of operation
-------------------
:class:`CallModel` is fed every AMI event, in order (:meth:`CallModel.feed`), and
returns what changed as :class:`CallChange` items. It never does I/O and never
reads the wall clock: time comes from the injected ``clock``, so a replay of the
same events gives the same calls. The states and their legal transitions live in
:mod:`ctid.calls.states`; this module decides *when* to ask for them.

Channels and calls
    A :class:`Leg` is one Asterisk channel, found by ``Uniqueid`` (or by name). A
    :class:`Call` is the customer's conversation and owns one or more legs. The
    model ignores every event that cannot change a call with one dict lookup on
    the event name (VarSet other than ``CTID_CALL_ID``, CEL, Cdr, RTCP*,
    DeviceStateChange, Newexten, queue and agent events ...).

Call identity
    ctid sets the inherited variable ``__CTID_CALL_ID`` when a call enters, and
    manager.conf ``channelvars`` makes channel events carry
    ``ChanVariable: CTID_CALL_ID=<id>``. The value is still empty on
    ``Newchannel`` and on the ``VarSet`` that sets it (capture 13), so a channel
    is bound on the first non-empty value: a ``VarSet`` of the variable (its
    ``Value``), the channel's own ``ChanVariable``, ``DestChanVariable`` on
    ``DialBegin``, or ``ChanVariable(<channel>)`` on ``OriginateResponse``.

    The ctid AMI user does not read the ``dialplan`` class (manager.conf
    ``read``), so in production no ``VarSet`` arrives, and a channel's next call
    event may be seconds away (an IVR prompt, a hold). So the FastAGI script that
    sets the variable also tells the model at once: :meth:`CallModel.bind_call_id`
    (its ``agi_uniqueid``) makes the same changes a ``VarSet`` would. A channel the
    model has not seen yet (its ``Newchannel`` still unread on the AMI socket) is
    bound when it appears. The AMI paths stay: they bind after a restart
    (resync), and legs ctid did not identify itself (dialled agents, originates).

    Until an id is known, a channel belongs to a *provisional* call keyed by its
    ``Linkedid``: new channels attach to the call of their Linkedid, and a call
    whose key is a Linkedid also receives channels that name it (``ChannelId`` on
    Originate sets Uniqueid and Linkedid, capture 06b). Linkedid is read once,
    when the channel first appears; later changes are ignored, because bridging
    spreads the oldest Linkedid over other calls (the retriever in 16). When the
    real id shows up, the provisional call is re-keyed, or merged into the call
    that already has that id: one ``rekeyed`` change, never a new call.
    ``DialBegin`` also joins the dialled channel to the dialler's call. Two calls
    that each have a real id are never merged; a channel whose id names another
    call is moved there.

Direction (decided by the first channel, refined by dialling)
    * ``outbound``: the first channel was created by Asterisk itself (``Down``
      at ``Newchannel``: an Originate, ctid's click-to-dial or callback, 06/17),
      or the call dials an external number;
    * ``internal``: the first channel is an incoming channel in one of
      ``internal_contexts`` (an agent phone dialling), until it dials an
      external number;
    * ``inbound``: the first channel is an incoming channel in any other
      context (a trunk). The channel name does not tell: outbound trunk legs
      are ``PJSIP/trunk-...`` too (17).

    An *external number* is a dial target of six or more digits, optionally
    with ``+`` (``+15557654321@trunk``, ``PJSIP/0044...``); ``agent1001`` or
    ``1003`` are internal.

Roles
    ``caller`` is the customer's leg, whatever the direction: the first leg of an
    inbound call, or the leg that dials out to an external number. ``agent``
    legs are the internal devices (the first leg of an originated or internal
    call, and channels dialled by the call). ``other`` covers Local channels
    and a second external party (a forward).

States
    ``Newchannel`` starts a call in ``ringing``; a ``BridgeEnter`` that puts two
    legs of the call in one bridge makes it ``connected`` (the first time:
    ``answered``). ctid sets ``ivr``/``queued``/``offered``/``held``/
    ``transferring`` with :meth:`CallModel.mark`. Holds by dual Redirect, blind
    and attended transfers keep the call: the legs stay in it (15, 06b, 06c).

Who hung up (one rule, used everywhere)
    A party that hangs up gives its channel a non-soft ``HangupRequest`` before
    its ``Hangup``. A hangup by ctid, AMI or the dialplan gives only
    ``SoftHangupRequest``; a callee dropped with its bridge gives neither. The
    ``Hangup`` Cause is never used (02 shows ``Cause: 0`` for a caller hangup).
    The first such request on a party leg (the caller's, or an agent's that has
    answered) since the call was last bridged decides ``hangup_by``: ``caller``,
    ``agent``, ``ctid`` (a soft request, or the hangup, of a channel ctid
    announced with :meth:`CallModel.expect_hangup`) or ``system``. Nothing seen:
    ``system``. Vanished during a link loss: ``unknown``.

Ending
    A call ends when its last live leg hangs up. It is then removed from the
    active calls, its channels are forgotten and remembered as dead, so a late
    or duplicated event cannot reach it again: ``ended`` is emitted exactly once.

Resync after a reconnect
    :meth:`CallModel.begin_resync`, one :meth:`CallModel.resync_channel` per
    ``CoreShowChannel`` item, then :meth:`CallModel.end_resync`. Live events may
    be fed in between. At the end, every known channel that is neither listed
    nor seen live since ``begin_resync`` is dropped (its call ends with
    ``hangup_by="unknown"`` and no cause once no leg is left), and every listed
    channel the model did not know is adopted, grouped into calls by
    ``CTID_CALL_ID`` or Linkedid. The model's active channels then equal the list.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from ctid.asterisk.ami_protocol import Message, MessageKind
from ctid.asterisk.safety import ID_PATTERN
from ctid.calls.states import CallState, CallStateError, Source, allowed, check_mark

if TYPE_CHECKING:
    from ctid.store.calls import CallRecord, LegRecord

__all__ = [
    "Call",
    "CallChange",
    "CallModel",
    "CallModelError",
    "ChangeKind",
    "Direction",
    "HangupBy",
    "Leg",
    "Role",
    "UnknownCallError",
    "external_number",
]

#: Longest call id the store accepts (``ctid.store.models.CALL_ID_LEN``).
MAX_CALL_ID = 64

#: The channel variables ctid reads from AMI events: manager.conf ``channelvars`` must
#: list them, CTID_CALL_ID first (the model's fast path reads the first line).
CHANNELVARS = ("CTID_CALL_ID", "CTID_TENANT", "CTID_SERVICE_LINE", "CTID_DNIS", "CTID_QUEUE", "CTID_PRIO",
               "CTID_ENQUEUED")
_ID_RE = re.compile(ID_PATTERN)
DEFAULT_TENANT = "default"
DEFAULT_INTERNAL_CONTEXTS: frozenset[str] = frozenset({"from-agents", "from-internal"})


class Direction(enum.StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"
    INTERNAL = "internal"


class Role(enum.StrEnum):
    CALLER = "caller"
    AGENT = "agent"
    OTHER = "other"


class HangupBy(enum.StrEnum):
    CALLER = "caller"
    AGENT = "agent"
    CTID = "ctid"
    SYSTEM = "system"
    UNKNOWN = "unknown"


class ChangeKind(enum.StrEnum):
    STARTED = "started"
    STATE = "state"
    ANSWERED = "answered"
    LEG_ADDED = "leg_added"
    LEG_ENDED = "leg_ended"
    REKEYED = "rekeyed"
    ENDED = "ended"
    #: An AMI event the model refused (illegal transition, unusable call id).
    DIAGNOSTIC = "diagnostic"


class CallModelError(Exception):
    """Base class of the call model's errors."""


class UnknownCallError(CallModelError, LookupError):
    """No active or recently ended call has this id."""


# Asterisk's ast_channel_state values, as ChannelState carries them.
_CHANNEL_STATES: dict[str, str] = {
    "0": "down",
    "1": "reserved",
    "2": "offhook",
    "3": "dialing",
    "4": "ring",
    "5": "ringing",
    "6": "up",
    "7": "busy",
    "8": "dialing_offhook",
    "9": "prering",
}
_UP = "6"
_DOWN = "0"
_CTID_VARIABLES = frozenset({"__CTID_CALL_ID", "_CTID_CALL_ID", "CTID_CALL_ID"})
_CTID_PREFIX = "CTID_CALL_ID="
_VARSET_HINT = "CTID_CALL_ID\r\nValue"  # "Variable: __CTID_CALL_ID" followed by its Value line
_NO_CALLER_ID = frozenset({"", "<unknown>"})
_EXTERNAL = re.compile(r"(?:^|[/:&])(\+?\d{6,})(?=[@&,]|$)")


def external_number(dial_target: str | None) -> str | None:
    """The external number a dial string or ``Dial`` argument targets, if any."""
    if not dial_target:
        return None
    match = _EXTERNAL.search(dial_target)
    return match.group(1) if match else None


@dataclass(slots=True, eq=False)
class Leg:
    """One Asterisk channel of a call."""

    channel: str
    uniqueid: str
    linkedid: str
    role: Role
    call: Call = field(repr=False)
    created_at: datetime
    state: str = "down"
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    hangup_cause: int | None = None
    bridge: str | None = None
    rejected_id: str = field(default="", repr=False)

    @property
    def active(self) -> bool:
        return self.ended_at is None

    def to_record(self) -> LegRecord:
        from ctid.store.calls import LegRecord

        return LegRecord(
            channel=self.channel,
            uniqueid=self.uniqueid,
            role=self.role.value,
            created_at=self.created_at,
            answered_at=self.answered_at,
            ended_at=self.ended_at,
            hangup_cause=self.hangup_cause,
        )


@dataclass(slots=True, eq=False)
class Call:
    """One call as the model knows it. Read it; change it only through the model."""

    call_id: str
    linkedid: str
    direction: Direction
    created_at: datetime
    tenant: str = DEFAULT_TENANT
    service_line: str | None = None
    state: CallState = CallState.RINGING
    #: True while the id is a Linkedid, i.e. no CTID_CALL_ID was seen yet.
    provisional: bool = True
    caller_number: str | None = None
    caller_name: str | None = None
    dnis: str | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    hangup_cause: int | None = None
    hangup_by: HangupBy | None = None
    legs: list[Leg] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    #: Number of legs that have not hung up.
    live: int = 0
    #: The Linkedids that lead new channels to this call.
    linkedids: list[str] = field(default_factory=list, repr=False)
    #: Who released first since the call was last bridged ("Who hung up" above).
    release: HangupBy | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.state is not CallState.ENDED

    @property
    def active_legs(self) -> list[Leg]:
        return [leg for leg in self.legs if leg.ended_at is None]

    def leg(self, role: Role, *, live: bool = False) -> Leg | None:
        """The first leg with ``role`` (that has not hung up, with ``live``), if any."""
        for leg in self.legs:
            if leg.role is role and not (live and leg.ended_at is not None):
                return leg
        return None

    def to_record(self) -> CallRecord:
        """The call as plain frozen data for ``ctid.store``."""
        from ctid.store.calls import CallRecord

        return CallRecord(
            call_id=self.call_id,
            tenant=self.tenant,
            service_line=self.service_line,
            direction=self.direction.value,
            state=self.state.value,
            caller_number=self.caller_number,
            caller_name=self.caller_name,
            dnis=self.dnis,
            created_at=self.created_at,
            answered_at=self.answered_at,
            ended_at=self.ended_at,
            hangup_cause=self.hangup_cause,
            hangup_by=None if self.hangup_by is None else self.hangup_by.value,
            linkedid=self.linkedid,
            data=dict(self.data),
            legs=tuple(leg.to_record() for leg in self.legs),
        )


_EVENT_TYPES: dict[ChangeKind, str] = {
    ChangeKind.STARTED: "call.started",
    ChangeKind.ANSWERED: "call.answered",
    ChangeKind.ENDED: "call.ended",
}
_STATE_EVENT_TYPES: dict[CallState, str] = {
    CallState.IVR: "call.ivr",
    CallState.QUEUED: "call.queued",
    CallState.OFFERED: "call.offered",
    CallState.HELD: "call.held",
}


@dataclass(slots=True, eq=False)
class CallChange:
    """Something that happened to a call.

    ``call_id`` is the id at the time of the change; ``call`` is the live call
    (``call.to_record()`` freezes it). ``rekeyed`` carries the previous id in
    ``old_call_id``: a provisional call was renamed, or merged into ``call``.
    ``leg`` is set for ``leg_added``/``leg_ended``; ``old_state``/``new_state``
    for ``started``, ``state`` and ``ended``; ``detail`` for diagnostics.
    """

    kind: ChangeKind
    call_id: str
    call: Call = field(repr=False)
    at: datetime
    old_state: CallState | None = None
    new_state: CallState | None = None
    leg: Leg | None = field(default=None, repr=False)
    old_call_id: str | None = None
    detail: str | None = None

    @property
    def event_type(self) -> str | None:
        """The ``call.*`` event this change becomes, or None (legs, rekeys...)."""
        if self.kind is ChangeKind.STATE:
            new = self.new_state
            if new is CallState.CONNECTED:
                if self.old_state is CallState.HELD:
                    return "call.resumed"
                if self.old_state is CallState.TRANSFERRING:
                    return "call.transferred"
                return None
            return None if new is None else _STATE_EVENT_TYPES.get(new)
        return _EVENT_TYPES.get(self.kind)


class _Keys(NamedTuple):
    """Header names of one channel block (the plain one, or ``Dest*`` of Dial events)."""

    uniqueid: str
    channel: str
    linkedid: str
    state: str
    context: str
    exten: str
    caller_num: str
    caller_name: str
    chanvar: str


_PLAIN = _Keys(
    "Uniqueid",
    "Channel",
    "Linkedid",
    "ChannelState",
    "Context",
    "Exten",
    "CallerIDNum",
    "CallerIDName",
    "ChanVariable",
)
_DEST = _Keys(*("Dest" + key for key in _PLAIN))


def _duration(value: str | None) -> float:
    """``Duration: HH:MM:SS`` of ``CoreShowChannel`` in seconds (0 when absent or odd)."""
    if not value:
        return 0.0
    try:
        parts = [int(p) for p in value.split(":")]
    except ValueError:
        return 0.0
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + part
    return float(max(0, seconds))


def _ctid_value(event: Message, key: str) -> str:
    """The CTID_CALL_ID value in the channel block ``key`` (empty when unset/absent)."""
    first = event.get(key)
    if first is None:
        return ""  # channelvars not configured
    if first.startswith(_CTID_PREFIX):
        return first[len(_CTID_PREFIX) :]  # listed first in channelvars (the usual case)
    for value in event.get_all(key):
        if value.startswith(_CTID_PREFIX):
            return value[len(_CTID_PREFIX) :]
    return ""


def _cause(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _caller_id(value: str | None) -> str | None:
    return None if value is None or value in _NO_CALLER_ID else value


class _Recent:
    """Recently seen keys, bounded: two generations of sets, O(1) add and lookup."""

    __slots__ = ("_cap", "_new", "_old")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._new: set[str] = set()
        self._old: set[str] = set()

    def add(self, key: str) -> None:
        new = self._new
        new.add(key)
        if len(new) >= self._cap:
            self._old = new
            self._new = set()

    def __contains__(self, key: object) -> bool:
        return key in self._new or key in self._old


class _RecentCalls:
    """Recently ended calls, bounded the same way (for :meth:`CallModel.get`)."""

    __slots__ = ("_cap", "_new", "_old")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._new: dict[str, Call] = {}
        self._old: dict[str, Call] = {}

    def add(self, call: Call) -> None:
        new = self._new
        new[call.call_id] = call
        if len(new) >= self._cap:
            self._old = new
            self._new = {}

    def get(self, call_id: str) -> Call | None:
        return self._new.get(call_id) or self._old.get(call_id)


_Handler = Callable[[Message, list[CallChange]], None]


class CallModel:
    """Calls built from AMI events. See the module docstring for the rules.

    ``clock`` returns the current time as an aware UTC datetime. ``tenant_for_dnis``
    maps an inbound call's DNIS to ``(tenant, service_line)``; without it every
    call is in tenant ``"default"``. ``internal_contexts`` are the dialplan
    contexts of agent phones (see *Direction*).
    """

    def __init__(
        self,
        clock: Callable[[], datetime],
        tenant_for_dnis: Callable[[str], tuple[str, str | None]] | None = None,
        *,
        internal_contexts: Iterable[str] = DEFAULT_INTERNAL_CONTEXTS,
        remember: int = 65536,
    ) -> None:
        self._clock = clock
        self._tenant_for_dnis = tenant_for_dnis
        self._internal = frozenset(internal_contexts)
        self._calls: dict[str, Call] = {}
        self._calls_view: Mapping[str, Call] = MappingProxyType(self._calls)
        self._by_uid: dict[str, Leg] = {}
        self._by_name: dict[str, Leg] = {}
        self._by_linkedid: dict[str, Call] = {}
        self._bridges: dict[str, list[Leg]] = {}
        self._dead_legs = _Recent(remember)
        self._dead_calls = _Recent(remember)
        self._ended = _RecentCalls(max(16, remember // 64))
        self._expected: set[str] = set()
        #: Uniqueid -> call id that ctid set before the model saw the channel (bind_call_id).
        self._pending_ids: dict[str, str] = {}
        self._resyncing = False
        self._resync_items: list[Message] = []
        self._resync_live: set[str] = set()
        self._handlers: dict[str, _Handler] = {
            "Newchannel": self._on_newchannel,
            "Newstate": self._on_newstate,
            "VarSet": self._on_varset,
            "DialBegin": self._on_dialbegin,
            "BridgeEnter": self._on_bridgeenter,
            "BridgeLeave": self._on_bridgeleave,
            "HangupRequest": self._on_hanguprequest,
            "SoftHangupRequest": self._on_softhanguprequest,
            "Hangup": self._on_hangup,
            "OriginateResponse": self._on_originateresponse,
            "AttendedTransfer": self._on_attendedtransfer,
            "Rename": self._on_rename,
        }

    # ------------------------------------------------------------------ queries

    @property
    def calls(self) -> Mapping[str, Call]:
        """The active calls by id (a live, read-only view)."""
        return self._calls_view

    def get(self, call_id: str) -> Call | None:
        """An active call, or a recently ended one."""
        return self._calls.get(call_id) or self._ended.get(call_id)

    def channel(self, name_or_uniqueid: str) -> Leg | None:
        """The live leg with this Uniqueid or channel name."""
        return self._by_uid.get(name_or_uniqueid) or self._by_name.get(name_or_uniqueid)

    @property
    def channels(self) -> Mapping[str, Leg]:
        """Live legs by Uniqueid (read-only)."""
        return MappingProxyType(self._by_uid)

    # --------------------------------------------------------------- ctid input

    def mark(self, call_id: str, state: CallState | str) -> list[CallChange]:
        """Set a state only ctid knows (ivr, queued, offered, held, transferring).

        Raises :class:`CallStateError` when the table forbids it (including any
        change of an ended call) and :class:`UnknownCallError` for an unknown id.
        """
        call = self._calls.get(call_id)
        if call is None:
            if self._ended.get(call_id) is not None or call_id in self._dead_calls:
                raise CallStateError(call_id, CallState.ENDED, state, "the call has ended")
            raise UnknownCallError(call_id)
        target = check_mark(call_id, call.state, state)
        out: list[CallChange] = []
        self._transition(call, target, self._clock(), out, Source.CTID)
        return out

    def annotate(
        self,
        call_id: str,
        *,
        tenant: str | None = None,
        service_line: str | None = None,
        dnis: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Call:
        """Attach what ctid learned (tenant, service line, DNIS, IVR data) to an active call."""
        call = self._calls.get(call_id)
        if call is None:
            raise UnknownCallError(call_id)
        if tenant is not None:
            call.tenant = tenant
        if service_line is not None:
            call.service_line = service_line
        if dnis is not None:
            call.dnis = dnis
        if data:
            call.data.update(data)
        return call

    def bind_call_id(self, uniqueid: str, call_id: str, *, channel: str | None = None) -> list[CallChange]:
        """ctid has set ``__CTID_CALL_ID`` to ``call_id`` on this channel: bind it now.

        Returns the changes the ``VarSet`` of the variable would give: ``rekeyed`` for
        a provisional call (or a merge into the call that has the id), the leg moved to
        that call otherwise, nothing if it is already bound, a ``diagnostic`` for an
        unusable id. ``uniqueid`` is the channel's (FastAGI ``agi_uniqueid``);
        ``channel`` (its name) is tried when the Uniqueid is unknown. A channel the
        model has not seen yet is bound when it appears (no change now); a channel
        that has hung up is ignored.
        """
        leg = self._by_uid.get(uniqueid) or (self._by_name.get(channel) if channel else None)
        out: list[CallChange] = []
        if leg is not None:
            self._bind(leg, call_id, None, out)
        elif uniqueid and uniqueid not in self._dead_legs:
            if len(self._pending_ids) > 4096:  # channels that never showed up; keep it bounded
                self._pending_ids.clear()
            self._pending_ids[uniqueid] = call_id
        return out

    def expect_hangup(self, channel_or_uniqueid: str) -> None:
        """ctid is about to hang this channel up: count that hangup as ``ctid``'s."""
        if len(self._expected) > 4096:  # never announced channels; keep it bounded
            self._expected.clear()
        self._expected.add(channel_or_uniqueid)

    # ---------------------------------------------------------------- AMI input

    def feed(self, event: Message) -> list[CallChange]:
        """Apply one AMI event; return the changes it caused (often none)."""
        handler = self._handlers.get(event.name)
        out: list[CallChange] = []
        if handler is not None and event.kind is MessageKind.EVENT:
            handler(event, out)
        return out

    def feed_all(self, events: Iterable[Message]) -> list[CallChange]:
        out: list[CallChange] = []
        for event in events:
            out.extend(self.feed(event))
        return out

    # ------------------------------------------------------------------- resync

    def begin_resync(self) -> None:
        """The link is back: a CoreShowChannels list follows. Live events may be fed meanwhile."""
        self._resyncing = True
        self._resync_items = []
        self._resync_live = set()

    def resync_channel(self, event: Message) -> None:
        """One ``CoreShowChannel`` item of the list."""
        if not self._resyncing:
            raise CallModelError("resync_channel() outside begin_resync()/end_resync()")
        self._resync_items.append(event)

    def end_resync(self) -> list[CallChange]:
        """Apply the list: drop vanished channels, adopt unknown ones. Returns the changes."""
        if not self._resyncing:
            raise CallModelError("end_resync() without begin_resync()")
        items, live = self._resync_items, self._resync_live
        self._resyncing = False
        self._resync_items = []
        self._resync_live = set()
        out: list[CallChange] = []
        now = self._clock()
        listed: dict[str, Message] = {}
        for item in items:
            uid = item.get("Uniqueid")
            if uid:
                listed[uid] = item
        for uid, gone in list(self._by_uid.items()):
            if uid not in listed and uid not in live:
                self._leg_gone(gone, None, now, out, HangupBy.UNKNOWN)
        # Originators (Uniqueid == Linkedid) first, so their calls exist when the
        # channels they created are adopted.
        order = sorted(listed.values(), key=lambda item: item.get("Uniqueid") != item.get("Linkedid"))
        touched: dict[int, Call] = {}
        for item in order:
            uid = item["Uniqueid"]
            leg = self._by_uid.get(uid)
            if leg is None:
                if uid in self._dead_legs:
                    continue  # it hung up after the list was taken
                leg = self._adopt(item, _PLAIN, out, now, resync=True)
                if leg is None:
                    continue
            elif leg.call.provisional:
                self._bind_from(leg, item, _PLAIN, now, out)
            code = item.get("ChannelState") or ""
            self._set_state(leg, code, now)
            bridge = (item.get("BridgeId") or "").strip() or None
            if bridge != leg.bridge:
                self._leave_bridge(leg)
                if bridge is not None:
                    self._enter_bridge(leg, bridge)
            touched[id(leg.call)] = leg.call
        for call in touched.values():
            if call.state is not CallState.ENDED and self._bridged_pair(call):
                self._connect(call, now, out)
        return out

    # --------------------------------------------------------------- internals

    def _transition(
        self,
        call: Call,
        new: CallState,
        now: datetime,
        out: list[CallChange],
        source: Source = Source.AMI,
    ) -> bool:
        old = call.state
        if old is new:
            return False
        if not allowed(old, new, source):
            out.append(
                CallChange(
                    ChangeKind.DIAGNOSTIC,
                    call.call_id,
                    call,
                    now,
                    old,
                    new,
                    detail=f"ignored illegal transition {old} -> {new} from {source.name}",
                )
            )
            return False
        call.state = new
        out.append(CallChange(ChangeKind.STATE, call.call_id, call, now, old, new))
        return True

    def _connect(self, call: Call, now: datetime, out: list[CallChange]) -> None:
        # Two parties are talking: who hangs up is decided afresh from here on.
        call.release = None
        if self._transition(call, CallState.CONNECTED, now, out) and call.answered_at is None:
            call.answered_at = now
            out.append(CallChange(ChangeKind.ANSWERED, call.call_id, call, now))

    def _leg(self, event: Message, out: list[CallChange], adopt: bool) -> Leg | None:
        uid = event.get("Uniqueid")
        if uid is None:
            return None
        leg = self._by_uid.get(uid)
        if leg is None and adopt:
            leg = self._adopt(event, _PLAIN, out, None)
        return leg

    def _usable_id(self, call_id: str) -> bool:
        # Ids end up in MQTT topics, URLs and file names: only the safe id alphabet.
        return _ID_RE.fullmatch(call_id) is not None and call_id not in self._dead_calls

    def _new_key(self, linkedid: str, uid: str) -> str:
        if linkedid not in self._dead_calls and len(linkedid) <= MAX_CALL_ID:
            return linkedid
        key = uid[:MAX_CALL_ID]
        n = 1
        while key in self._calls or key in self._dead_calls:
            n += 1
            suffix = f"#{n}"
            key = uid[: MAX_CALL_ID - len(suffix)] + suffix
        return key

    def _adopt(
        self,
        event: Message,
        keys: _Keys,
        out: list[CallChange],
        now: datetime | None,
        *,
        resync: bool = False,
    ) -> Leg | None:
        """Create the leg for a channel block the model has not seen."""
        uid = event.get(keys.uniqueid)
        channel = event.get(keys.channel)
        if not uid or not channel or uid in self._dead_legs:
            return None
        if now is None:
            now = self._clock()
        linkedid = event.get(keys.linkedid) or uid
        code = event.get(keys.state) or _DOWN
        call_id = _ctid_value(event, keys.chanvar)
        if self._pending_ids:
            pending = self._pending_ids.pop(uid, "")
            call_id = call_id or pending
        rejected = ""
        if call_id and not self._usable_id(call_id):
            rejected, call_id = call_id, ""
        call = self._calls.get(call_id) if call_id else None
        if call is None and not call_id:
            call = self._by_linkedid.get(linkedid) or self._calls.get(linkedid)
        local = channel.startswith("Local/")
        role = Role.OTHER if local else Role.AGENT
        if call is None:
            context = event.get(keys.context) or ""
            exten = event.get(keys.exten) or ""
            target = None
            created = now
            if resync:
                data = (event.get("ApplicationData") or "").partition(",")[0]
                if event.get("Application") in ("Dial", "Queue"):
                    target = external_number(data)
                created = now - timedelta(seconds=_duration(event.get("Duration")))
            if target is not None or code == _DOWN:
                direction = Direction.OUTBOUND
            elif context in self._internal:
                direction = Direction.INTERNAL
            else:
                direction = Direction.INBOUND
                if not local:
                    role = Role.CALLER
            call = Call(
                call_id=call_id or self._new_key(linkedid, uid),
                linkedid=linkedid,
                direction=direction,
                created_at=created,
                provisional=not call_id,
                caller_number=_caller_id(event.get(keys.caller_num)),
                caller_name=_caller_id(event.get(keys.caller_name)),
            )
            if direction is Direction.OUTBOUND:
                call.dnis = target
            else:
                # A channel found by a resync may sit in another context by now (a hold
                # or the fallback queue, exten "s"): the dialplan's exported variables
                # still say where it came in.
                self._place(call, exten, event.chan_variables(keys.chanvar) if resync else {})
                if resync:
                    call.data["recovered"] = True
            self._calls[call.call_id] = call
            out.append(CallChange(ChangeKind.STARTED, call.call_id, call, created, None, CallState.RINGING))
        elif (
            resync
            and not local
            and call.direction is Direction.OUTBOUND
            and call.leg(Role.CALLER, live=True) is None
            and event.get("Application") == "AppDial"
        ):
            role = Role.CALLER
        elif (resync and not local and uid == linkedid and "CTID_DNIS" in event.chan_variables(keys.chanvar)
              and not any(old.uniqueid == old.linkedid for old in call.legs)):
            # An inbound caller (ctid-inbound exported CTID_DNIS on it) turns up after a
            # channel it created: a live event of that channel (e.g. the fallback queue
            # ringing an agent) was fed during the resync, before this list item. The
            # originator says what the call is.
            self._describe_inbound(call, event, keys)
            role = Role.CALLER
        if linkedid not in self._by_linkedid:
            self._by_linkedid[linkedid] = call
            call.linkedids.append(linkedid)
        leg_created = now - timedelta(seconds=_duration(event.get("Duration"))) if resync else now
        leg = Leg(channel, uid, linkedid, role, call, leg_created, _CHANNEL_STATES.get(code, code))
        if code == _UP:
            leg.answered_at = now
        self._by_uid[uid] = leg
        self._by_name[channel] = leg
        call.legs.append(leg)
        call.live += 1
        if self._resyncing:
            self._resync_live.add(uid)
        out.append(CallChange(ChangeKind.LEG_ADDED, call.call_id, call, now, leg=leg))
        if rejected:
            self._reject_id(leg, rejected, now, out)
        return leg

    def _place(self, call: Call, exten: str, exported: Mapping[str, str]) -> None:
        """DNIS, tenant and line of a non-outbound call: the dialplan's exported
        ``CTID_*`` variables (a channel found by a resync may sit in another context by
        then, e.g. the fallback queue's exten ``s``), else the extension it dialled."""
        dnis = exported.get("CTID_DNIS") or (exten if exten and exten != "s" else "")
        call.dnis = dnis or None
        if call.direction is Direction.INBOUND and self._tenant_for_dnis is not None:
            call.tenant, call.service_line = self._tenant_for_dnis(dnis or "s")
        tenant, line = exported.get("CTID_TENANT", ""), exported.get("CTID_SERVICE_LINE", "")
        if _ID_RE.fullmatch(tenant):
            call.tenant = tenant
        if _ID_RE.fullmatch(line):
            call.service_line = line

    def _describe_inbound(self, call: Call, event: Message, keys: _Keys) -> None:
        """Re-read an inbound call's caller, DNIS, tenant and line from its originator's
        resync item (the exported ``CTID_*`` variables win, as in :meth:`_adopt`)."""
        call.direction = Direction.INBOUND
        call.caller_number = _caller_id(event.get(keys.caller_num))
        call.caller_name = _caller_id(event.get(keys.caller_name))
        self._place(call, event.get(keys.exten) or "", event.chan_variables(keys.chanvar))
        for other in call.legs:
            if other.role is Role.CALLER:
                other.role = Role.AGENT

    def _reject_id(self, leg: Leg, call_id: str, now: datetime, out: list[CallChange]) -> None:
        if leg.rejected_id == call_id:
            return
        leg.rejected_id = call_id
        if _ID_RE.fullmatch(call_id) is None:
            why = "is not a valid id ([A-Za-z0-9_.-]{1,64})"
        else:
            why = "names a call that has ended"
        out.append(
            CallChange(
                ChangeKind.DIAGNOSTIC,
                leg.call.call_id,
                leg.call,
                now,
                detail=f"{leg.channel}: CTID_CALL_ID {call_id[:80]!r} {why}; not bound",
            )
        )

    def _bind_from(self, leg: Leg, event: Message, keys: _Keys, now: datetime | None, out: list[CallChange]) -> None:
        call_id = _ctid_value(event, keys.chanvar)
        if call_id:
            self._bind(leg, call_id, now, out)

    def _bind(self, leg: Leg, call_id: str, now: datetime | None, out: list[CallChange]) -> None:
        """The channel carries ``call_id``: make its call that call."""
        call = leg.call
        if call.call_id == call_id:
            call.provisional = False
            return
        if now is None:
            now = self._clock()
        if not self._usable_id(call_id):
            self._reject_id(leg, call_id, now, out)
            return
        target = self._calls.get(call_id)
        if call.provisional:
            old_id = call.call_id
            if target is None:
                del self._calls[old_id]
                call.call_id = call_id
                call.provisional = False
                self._calls[call_id] = call
                out.append(CallChange(ChangeKind.REKEYED, call_id, call, now, old_call_id=old_id))
            else:
                self._merge(call, target, now, out)
                target.provisional = False
            return
        # The channel belongs to another call with an id of its own: move only it.
        if target is not None:
            target.provisional = False
        else:
            target = Call(
                call_id=call_id,
                linkedid=leg.linkedid,
                direction=call.direction,
                created_at=now,
                provisional=False,
                tenant=call.tenant,
                service_line=call.service_line,
                caller_number=call.caller_number,
                caller_name=call.caller_name,
                dnis=call.dnis,
            )
            self._calls[call_id] = target
            out.append(CallChange(ChangeKind.STARTED, call_id, target, now, None, CallState.RINGING))
        self._move_leg(leg, target, now, out)

    def _merge(self, src: Call, dst: Call, now: datetime, out: list[CallChange]) -> None:
        """Fold the provisional call ``src`` into ``dst`` (one ``rekeyed`` change)."""
        del self._calls[src.call_id]
        for leg in src.legs:
            leg.call = dst
            dst.legs.append(leg)
        dst.live += src.live
        for linkedid in src.linkedids:
            self._by_linkedid[linkedid] = dst
            dst.linkedids.append(linkedid)
        if src.created_at < dst.created_at:
            dst.created_at = src.created_at
        if src.answered_at is not None and (dst.answered_at is None or src.answered_at < dst.answered_at):
            dst.answered_at = src.answered_at
        if dst.caller_number is None:
            dst.caller_number, dst.caller_name = src.caller_number, src.caller_name
        if dst.dnis is None:
            dst.dnis = src.dnis
        if dst.release is None:
            dst.release = src.release
        for key, value in src.data.items():
            dst.data.setdefault(key, value)
        out.append(CallChange(ChangeKind.REKEYED, dst.call_id, dst, now, old_call_id=src.call_id))
        if self._bridged_pair(dst):
            self._connect(dst, now, out)

    def _move_leg(self, leg: Leg, dst: Call, now: datetime, out: list[CallChange]) -> None:
        src = leg.call
        src.legs.remove(leg)
        if leg.ended_at is None:
            src.live -= 1
            dst.live += 1
        leg.call = dst
        dst.legs.append(leg)
        out.append(CallChange(ChangeKind.LEG_ADDED, dst.call_id, dst, now, leg=leg))
        if src.live == 0:
            self._end_call(src, None, now, out, None)
        if self._bridged_pair(dst):
            self._connect(dst, now, out)

    def _bridged_pair(self, call: Call) -> bool:
        seen: set[str] = set()
        for leg in call.legs:
            bridge = leg.bridge
            if bridge is not None and leg.ended_at is None:
                if bridge in seen:
                    return True
                seen.add(bridge)
        return False

    def _enter_bridge(self, leg: Leg, bridge: str) -> int:
        """Put ``leg`` in ``bridge``; return how many legs of its call are in it."""
        members = self._bridges.get(bridge)
        if members is None:
            members = self._bridges[bridge] = []
        if leg not in members:
            members.append(leg)
        leg.bridge = bridge
        call = leg.call
        return sum(1 for member in members if member.call is call)

    def _leave_bridge(self, leg: Leg) -> None:
        bridge = leg.bridge
        if bridge is None:
            return
        leg.bridge = None
        members = self._bridges.get(bridge)
        if members is not None:
            if leg in members:
                members.remove(leg)
            if not members:
                del self._bridges[bridge]

    def _set_state(self, leg: Leg, code: str, now: datetime | None) -> None:
        leg.state = _CHANNEL_STATES.get(code, code)
        if code == _UP and leg.answered_at is None:
            leg.answered_at = self._clock() if now is None else now

    def _leg_gone(
        self,
        leg: Leg,
        cause: int | None,
        now: datetime,
        out: list[CallChange],
        hangup_by: HangupBy | None,
    ) -> None:
        """The channel is gone (Hangup, or vanished during a link loss)."""
        uid = leg.uniqueid
        if self._by_uid.get(uid) is leg:
            del self._by_uid[uid]
        if self._by_name.get(leg.channel) is leg:
            del self._by_name[leg.channel]
        self._dead_legs.add(uid)
        self._leave_bridge(leg)
        leg.ended_at = now
        leg.hangup_cause = cause
        leg.state = "ended"
        call = leg.call
        if self._expected and (uid in self._expected or leg.channel in self._expected):
            self._expected.discard(uid)
            self._expected.discard(leg.channel)
            if call.release is None:
                call.release = HangupBy.CTID
        call.live -= 1
        out.append(CallChange(ChangeKind.LEG_ENDED, call.call_id, call, now, leg=leg))
        if call.live == 0:
            self._end_call(call, cause, now, out, hangup_by)

    def _end_call(
        self,
        call: Call,
        last_cause: int | None,
        now: datetime,
        out: list[CallChange],
        hangup_by: HangupBy | None,
    ) -> None:
        old = call.state
        if not allowed(old, CallState.ENDED, Source.AMI):  # pragma: no cover - table says yes
            return
        call.state = CallState.ENDED
        call.ended_at = now
        if hangup_by is HangupBy.UNKNOWN:
            call.hangup_by = hangup_by
            call.hangup_cause = None
        else:
            call.hangup_by = hangup_by or call.release or HangupBy.SYSTEM
            cause = last_cause
            for leg in call.legs:
                if leg.role is Role.CALLER and leg.hangup_cause is not None:
                    cause = leg.hangup_cause
                    break
            call.hangup_cause = cause
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]
        self._dead_calls.add(call.call_id)
        for linkedid in call.linkedids:
            if self._by_linkedid.get(linkedid) is call:
                del self._by_linkedid[linkedid]
        self._ended.add(call)
        out.append(CallChange(ChangeKind.ENDED, call.call_id, call, now, old, CallState.ENDED))

    # ----------------------------------------------------------------- handlers

    def _on_newchannel(self, event: Message, out: list[CallChange]) -> None:
        uid = event.get("Uniqueid")
        if uid is not None and uid not in self._by_uid:
            self._adopt(event, _PLAIN, out, None)

    def _on_newstate(self, event: Message, out: list[CallChange]) -> None:
        leg = self._leg(event, out, adopt=True)
        if leg is None:
            return
        if leg.call.provisional:
            self._bind_from(leg, event, _PLAIN, None, out)
        self._set_state(leg, event.get("ChannelState") or "", None)

    def _on_varset(self, event: Message, out: list[CallChange]) -> None:
        # 40 % of all events are VarSet. The parser splits headers lazily, so ask the
        # raw block first and leave the other VarSets unsplit.
        if not event.may_contain(_VARSET_HINT):
            return
        if event.get("Variable") not in _CTID_VARIABLES:
            return
        value = event.get("Value")
        if not value:
            return
        leg = self._leg(event, out, adopt=True)
        if leg is not None:
            self._bind(leg, value, None, out)

    def _on_dialbegin(self, event: Message, out: list[CallChange]) -> None:
        uid = event.get("DestUniqueid")
        if uid is None:
            return
        dest = self._by_uid.get(uid) or self._adopt(event, _DEST, out, None)
        if dest is None:
            return
        if dest.call.provisional:
            self._bind_from(dest, event, _DEST, None, out)
        target = external_number(event.get("DialString"))
        if "Uniqueid" not in event:
            # An Originate: the dialled channel is the call's first one.
            call = dest.call
            if call.legs and call.legs[0] is dest:
                call.direction = Direction.OUTBOUND
                if target is not None and not dest.channel.startswith("Local/"):
                    dest.role = Role.CALLER
                    call.dnis = target
            return
        src = self._leg(event, out, adopt=True)
        if src is None:
            return
        if src.call.provisional:
            self._bind_from(src, event, _PLAIN, None, out)
        if dest.call is not src.call:
            if dest.call.provisional:
                self._merge(dest.call, src.call, self._clock(), out)
            elif src.call.provisional:
                self._merge(src.call, dest.call, self._clock(), out)
            else:
                return  # two calls with ids of their own are never merged
        if target is None or dest.role is Role.OTHER:
            return
        call = dest.call
        caller = call.leg(Role.CALLER, live=True)
        if caller is None or caller is dest:
            dest.role = Role.CALLER
            call.dnis = target
            if call.direction is Direction.INTERNAL:
                call.direction = Direction.OUTBOUND
        else:
            dest.role = Role.OTHER  # a second external party (forward)

    def _on_bridgeenter(self, event: Message, out: list[CallChange]) -> None:
        leg = self._leg(event, out, adopt=True)
        bridge = event.get("BridgeUniqueid")
        if leg is None or not bridge:
            return
        if leg.call.provisional:
            self._bind_from(leg, event, _PLAIN, None, out)
        if leg.bridge is not None and leg.bridge != bridge:
            self._leave_bridge(leg)
        if self._enter_bridge(leg, bridge) >= 2:
            self._connect(leg.call, self._clock(), out)

    def _on_bridgeleave(self, event: Message, out: list[CallChange]) -> None:
        uid = event.get("Uniqueid")
        leg = self._by_uid.get(uid) if uid is not None else None
        if leg is None:
            return
        if leg.bridge == event.get("BridgeUniqueid"):
            self._leave_bridge(leg)
        if self._expected and leg.call.release is None and self._is_expected(leg):
            leg.call.release = HangupBy.CTID  # ctid's AMI Hangup shows first as a BridgeLeave

    def _is_expected(self, leg: Leg) -> bool:
        return leg.uniqueid in self._expected or leg.channel in self._expected

    def _on_hanguprequest(self, event: Message, out: list[CallChange]) -> None:
        leg = self._leg(event, out, adopt=False)
        if leg is None:
            return
        if leg.call.provisional:
            self._bind_from(leg, event, _PLAIN, None, out)
        call = leg.call
        if call.release is None:
            if leg.role is Role.CALLER:
                call.release = HangupBy.CALLER
            elif leg.role is Role.AGENT and leg.answered_at is not None:
                call.release = HangupBy.AGENT

    def _on_softhanguprequest(self, event: Message, out: list[CallChange]) -> None:
        leg = self._leg(event, out, adopt=False)
        if leg is None:
            return
        if leg.call.provisional:
            self._bind_from(leg, event, _PLAIN, None, out)
        call = leg.call
        if call.release is None and (
            leg.role is Role.CALLER or (leg.role is Role.AGENT and leg.answered_at is not None)
        ):
            expected = bool(self._expected) and self._is_expected(leg)
            call.release = HangupBy.CTID if expected else HangupBy.SYSTEM

    def _on_hangup(self, event: Message, out: list[CallChange]) -> None:
        leg = self._leg(event, out, adopt=False)
        if leg is None:
            return  # unknown, or a duplicate: the leg is already gone
        now = self._clock()
        if leg.call.provisional:
            self._bind_from(leg, event, _PLAIN, now, out)
        self._leg_gone(leg, _cause(event.get("Cause")), now, out, None)

    def _on_originateresponse(self, event: Message, out: list[CallChange]) -> None:
        if event.get("Response") != "Success":
            return
        leg = self._leg(event, out, adopt=False)
        if leg is None:
            return
        if leg.call.provisional:
            call_id = event.chan_variables().get("CTID_CALL_ID")
            if call_id:
                self._bind(leg, call_id, None, out)
        call = leg.call
        if call.legs and call.legs[0] is leg:
            call.direction = Direction.OUTBOUND
            if call.dnis is None:
                call.dnis = external_number(event.get("Exten"))

    def _on_attendedtransfer(self, event: Message, out: list[CallChange]) -> None:
        if event.get("Result") != "Success":
            return
        transferee = self._by_uid.get(event.get("TransfereeUniqueid") or "")
        target = self._by_uid.get(event.get("TransferTargetUniqueid") or "")
        if transferee is None or target is None or transferee.call is target.call:
            return
        # The transferee's call goes on with the target: the consultation call
        # joins it (if it is provisional), or at least its target leg does.
        now = self._clock()
        if target.call.provisional:
            self._merge(target.call, transferee.call, now, out)
        else:
            self._move_leg(target, transferee.call, now, out)

    def _on_rename(self, event: Message, out: list[CallChange]) -> None:
        leg = self._leg(event, out, adopt=False)
        new_name = event.get("Newname")
        if leg is None or not new_name:
            return
        if self._by_name.get(leg.channel) is leg:
            del self._by_name[leg.channel]
        leg.channel = new_name
        self._by_name[new_name] = leg
