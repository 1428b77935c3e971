"""Simulated channels and bridges, and the channel-snapshot header blocks of AMI events.

A :class:`Channel` is what Asterisk calls a channel: a name (``PJSIP/trunk-0000000N``,
from one counter shared by all endpoints as in the captures), a Uniqueid
(``<epoch>.<seq>``, ``<systemname>-<epoch>.<seq>`` with ``systemname`` as in 18, or the
literal ``ChannelId`` of an Originate as in 06b), a Linkedid, a state, caller and
connected line, its dialplan location and its variables.

:meth:`Channel.snapshot` renders the block every channel event carries, in the order
of the captures::

    Channel, ChannelState, ChannelStateDesc, CallerIDNum, CallerIDName,
    ConnectedLineNum, ConnectedLineName, Language, AccountCode, Context, Exten,
    Priority, Uniqueid, Linkedid, [ChanVariable: NAME=value ...]

With a prefix (``Dest`` for Dial events, ``Transferer``...) every key gets it, and the
channelvars lines become ``DestChanVariable:`` (13). Unset variables still get a line
with an empty value, the name is shown without its ``__`` inheritance prefix.

Local channels (``Local/1003@from-agents-00000000;1`` and ``;2``, 06c) are two
:class:`Channel` objects pointing at each other through ``local_peer``; ``;2`` runs the
dialplan, ``;1`` is what the requester (the attended transfer) holds.

A :class:`Bridge` can carry :class:`BridgeHooks` (the attended transfer's consultation
bridge does) that see every channel leaving it.

Interrupting applications: every blocking application waits through
:meth:`Channel.wait`, which returns early when the channel is hung up or redirected
(an "async goto" soft hangup in Asterisk). That single mechanism gives Wait(), MOH,
Dial, Queue and the FastAGI client the same hangup/redirect semantics.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ctid.simulator.clock import SimClock

Fields = list[tuple[str, str]]

STATE_DESC = {0: "Down", 1: "Rsrvd", 2: "OffHook", 3: "Dialing", 4: "Ring", 5: "Ringing", 6: "Up", 7: "Busy"}

CAUSE_TEXT = {
    0: "Unknown", 16: "Normal Clearing", 17: "User busy", 19: "No user responding",
    21: "Call Rejected", 26: "Answered elsewhere", 34: "Circuit/channel congestion",
}


@dataclass(slots=True)
class Location:
    context: str
    exten: str
    priority: int


class Channel:
    """One simulated channel. Mutated only by the PBX engine."""

    def __init__(
        self,
        *,
        name: str,
        uniqueid: str,
        linkedid: str,
        endpoint: str,
        context: str,
        exten: str,
        caller_num: str,
        caller_name: str,
        state: int,
        clock: SimClock,
        channelvars: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.uniqueid = uniqueid
        self.linkedid = linkedid
        self.endpoint = endpoint
        self.tech = name.split("/", 1)[0]
        self.context = context
        self.exten = exten
        self.priority = 1
        self.caller_num = caller_num
        self.caller_name = caller_name
        self.connected_num = "<unknown>"
        self.connected_name = "<unknown>"
        self.language = "en"
        self.accountcode = ""
        self.state = state
        self.dnid = ""
        self.variables: dict[str, str] = {}
        self.channelvars = channelvars
        self.created = clock.now()
        self.answered_at: float | None = None
        self.application = ""
        self.app_data = ""
        self.bridge: Bridge | None = None
        # Hangup / redirect bookkeeping.
        self.hungup = False  # Hangup event sent, channel destroyed
        self.hangup_requested = False  # remote BYE or AMI/dialplan hangup
        self.hangup_cause = 16
        self.soft_hangup_sent = False
        self.async_goto: Location | None = None
        self.after_bridge: Location | None = None
        self.has_pbx = False
        self.in_agi = False
        self.dtmf: asyncio.Queue[str] = asyncio.Queue()
        self._wake = asyncio.Event()
        self.hangup_handlers: list[str] = []
        # Local channel pair (06c): the other half, and which half this is (1 or 2).
        self.local_peer: Channel | None = None
        self.local_half = 0
        # ;1 of a pair requested by an attended transfer: its DialState/DialEnd carry no
        # calling channel, and it may be optimised away once the transfer is done.
        self.local_dialed = False
        self.local_optimize = False
        # DTMF transfer features in the current bridge (Dial/Queue option T or t).
        self.xfer_features = False
        # The attended transfer this channel is the transferer of (while it runs).
        self.atxfer: object | None = None
        # When it joined the queue it waits in (QueueSummary LongestHoldTime, QueueEntry Wait).
        self.queue_joined: float | None = None

    # -- interruption ----------------------------------------------------------
    @property
    def interrupted(self) -> bool:
        """True when a hangup or an async goto (Redirect) is pending."""
        return self.hangup_requested or self.async_goto is not None or self.hungup

    def wake(self) -> None:
        self._wake.set()

    def clear_wake(self) -> None:
        if not self.interrupted:
            self._wake.clear()

    async def wait(self, clock: SimClock, sim_seconds: float | None) -> bool:
        """Sleep ``sim_seconds`` (forever if None). False if interrupted first."""
        if self.interrupted:
            return False
        self._wake.clear()
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            timeout = None if sim_seconds is None else clock.real(sim_seconds)
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()
        return not done and not self.interrupted

    async def wait_digit(self, clock: SimClock, sim_seconds: float | None) -> str | None:
        """Next DTMF digit, or None on timeout / interruption."""
        if self.interrupted:
            return None
        if not self.dtmf.empty():
            return self.dtmf.get_nowait()
        self._wake.clear()
        waiter = asyncio.ensure_future(self._wake.wait())
        getter = asyncio.ensure_future(self.dtmf.get())
        try:
            timeout = None if sim_seconds is None else clock.real(sim_seconds)
            done, _ = await asyncio.wait({waiter, getter}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done:
            return getter.result()
        return None

    # -- variables -------------------------------------------------------------
    def get_var(self, name: str) -> str | None:
        for key in (name, "_" + name, "__" + name):
            if key in self.variables:
                return self.variables[key]
        return None

    def inheritable(self) -> dict[str, str]:
        """Variables a dialed channel inherits (``_X`` once, ``__X`` forever)."""
        out: dict[str, str] = {}
        for key, value in self.variables.items():
            if key.startswith("__"):
                out[key] = value
            elif key.startswith("_"):
                out[key[1:]] = value
        return out

    # -- snapshot --------------------------------------------------------------
    @property
    def state_desc(self) -> str:
        return STATE_DESC.get(self.state, "Unknown")

    def snapshot(self, prefix: str = "", with_vars: bool = True) -> Fields:
        p = prefix
        fields: Fields = [
            (f"{p}Channel", self.name),
            (f"{p}ChannelState", str(self.state)),
            (f"{p}ChannelStateDesc", self.state_desc),
            (f"{p}CallerIDNum", self.caller_num or "<unknown>"),
            (f"{p}CallerIDName", self.caller_name or "<unknown>"),
            (f"{p}ConnectedLineNum", self.connected_num or "<unknown>"),
            (f"{p}ConnectedLineName", self.connected_name or "<unknown>"),
            (f"{p}Language", self.language),
            (f"{p}AccountCode", self.accountcode),
            (f"{p}Context", self.context),
            (f"{p}Exten", self.exten),
            (f"{p}Priority", str(self.priority)),
            (f"{p}Uniqueid", self.uniqueid),
            (f"{p}Linkedid", self.linkedid),
        ]
        if with_vars:
            fields.extend(self.chanvar_lines(f"{p}ChanVariable"))
        return fields

    def chanvar_lines(self, key: str) -> Fields:
        return [(key, f"{name}={self.get_var(name) or ''}") for name in self.channelvars]

    def __repr__(self) -> str:
        return f"Channel({self.name}, {self.state_desc}, {self.context},{self.exten},{self.priority})"


class BridgeHooks(Protocol):
    """Observer of channels leaving a bridge (the attended transfer's bridges)."""

    def before_leave(self, bridge: Bridge, chan: Channel) -> None: ...

    def after_leave(self, bridge: Bridge, chan: Channel) -> bool:
        """Called after ``BridgeLeave`` (and ``BridgeDestroy``); True = handled, the
        usual "peer left" handling of the remaining channel is skipped."""
        ...


@dataclass(eq=False)
class Bridge:
    """A two-party (or more) mixing bridge. ``kind`` says who created it: ``dial``
    (app_dial), ``queue`` (app_queue), ``action`` (the AMI Bridge action, whose
    channels continue at their after-bridge location when it ends) or ``atxfer`` (the
    consultation bridge of an attended transfer, 06c)."""

    kind: str
    uniqueid: str = field(default_factory=lambda: str(uuid.uuid4()))
    channels: list[Channel] = field(default_factory=list)
    technology: str = "simple_bridge"
    destroyed: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    hooks: BridgeHooks | None = None
    # An attended transfer holds this bridge: its owner keeps waiting even when the
    # transferer has moved to the consultation bridge.
    held_by_transfer: bool = False

    def block(self, prefix: str = "") -> Fields:
        p = prefix
        return [
            (f"{p}BridgeUniqueid", self.uniqueid),
            (f"{p}BridgeType", "basic"),
            (f"{p}BridgeTechnology", self.technology),
            (f"{p}BridgeCreator", "<unknown>"),
            (f"{p}BridgeName", "<unknown>"),
            (f"{p}BridgeNumChannels", str(len(self.channels))),
            (f"{p}BridgeVideoSourceMode", "none"),
        ]

    def others(self, chan: Channel) -> Iterable[Channel]:
        return [c for c in self.channels if c is not chan]
