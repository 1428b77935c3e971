"""The PBX engine: runs channels through the dialplan and emits the AMI events.

Theory of operation
-------------------
Each channel that executes dialplan has one asyncio task (Asterisk's "PBX thread"),
:meth:`PBX._pbx`. It looks up ``context,exten,priority``, emits ``Newexten`` and runs
the application. Applications return ``0`` (go on at the next priority), ``GOTO``
(they moved the channel themselves) or ``-1`` (stop: the channel is hung up, with a
``SoftHangupRequest`` first, as in every capture where the dialplan or AMI ends a call).

Interruptions are not exceptions: a caller hangup (:meth:`remote_hangup`, the sipp BYE
of the captures), an AMI ``Hangup`` or a ``Redirect`` (an "async goto") set a flag on
the channel and wake it, and whatever the application is waiting in returns early.
That gives the capture semantics in one place:

* caller BYE -> non-soft ``HangupRequest`` (02), then the app ends, then
  ``SoftHangupRequest`` and ``Hangup`` (Cause 0 when not bridged, 16 when bridged: 02
  vs 13);
* ``Redirect`` -> no hangup events at all; the app returns and the channel continues at
  the target, whose first ``Newexten`` carries the stale application (14, 15);
* a callee whose peer leaves a Dial/Queue bridge is hung up by the bridge with neither
  request event (15b); a channel put in a bridge by the AMI ``Bridge`` action continues
  at its after-bridge priority instead (15);
* ``Dial`` without ``g`` ends the caller when the callee hangs up or is redirected
  (06, 17); with ``g`` the caller continues (15c);
* ``Dial(A&B)`` and ``Queue`` ``ringall`` ring every callee at once through one loop,
  :meth:`PBX._ring_many`; the calls that lose to the first answer get ``DialEnd
  CANCEL`` and are hung up with cause 26 (:meth:`PBX._hang_up_losers`);
* device states: ``DeviceStateChange`` and, for hinted devices, ``ExtensionStatus``
  (04, 13); dynamic AORs are ``UNAVAILABLE`` until :meth:`PBX.register` (07b);
* AMI ``Atxfer`` runs the attended transfer of :mod:`ctid.simulator.transfer` (06c):
  DTMF feature code, consultation through a Local channel pair, ``AttendedTransfer``
  when the transferer hangs up, then Local channel optimisation. Dial/Queue options
  ``T``/``t`` give the DTMF transfer features; bridges with them stay ``simple_bridge``
  (06, 06b, 06c) instead of ``native_rtp`` (13, 15, 17).

Channels that run no dialplan (Dial/Queue callees, originated channels before they
answer) have no task; the task that created them drives them.

Applications implemented: see :data:`ctid.simulator.dialplan.SUPPORTED_APPS`. Anything
else raises :class:`UnsupportedApplication`, is recorded in :attr:`PBX.errors` and hangs
the channel up: never a silent success.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ctid.asterisk.ami_protocol import Message
from ctid.simulator.channels import CAUSE_TEXT, Bridge, Channel, Fields, Location
from ctid.simulator.clock import SimClock
from ctid.simulator.config import Endpoint, FeatureConfig, QueueConfig, QueueMember
from ctid.simulator.dialplan import (
    Dialplan,
    DialplanError,
    UnsupportedApplication,
    is_true,
    parse_options,
    split_app,
    split_args,
    substitute,
)
from ctid.simulator.transfer import optimize_local, run_atxfer

if TYPE_CHECKING:
    from ctid.simulator.faults import AGIFaults

log = logging.getLogger("ctid.simulator")

GOTO = 1
EmitFn = Callable[[Message], None]
AppFn = Callable[[Channel, str], Awaitable[int]]

# Dial options the simulator implements (app_dial's letters); any other is refused.
DIAL_OPTIONS = frozenset({"g", "t", "T"})

DEFAULT_PROMPTS = {
    "hello-world": 1.2,
    "beep": 0.43,
    "demo-instruct": 73.0,
    "demo-congrats": 10.0,
}


class PBX:
    """Channels, bridges, the dialplan and the applications. One per simulator."""

    def __init__(
        self,
        *,
        dialplan: Dialplan,
        clock: SimClock,
        emit: EmitFn,
        endpoints: dict[str, Endpoint],
        queues: dict[str, QueueConfig],
        channelvars: tuple[str, ...] = (),
        systemname: str | None = None,
        agi_address: tuple[str, int] | None = None,
        prompts: dict[str, float] | None = None,
        agi_faults: AGIFaults | None = None,
        answer_delay: float = 0.0,
        features: FeatureConfig | None = None,
    ) -> None:
        from ctid.simulator.faults import AGIFaults as _AGIFaults

        self.dialplan = dialplan
        self.clock = clock
        self._emit = emit
        self.endpoints = endpoints
        self.queues = queues
        self.channelvars = channelvars
        self.systemname = systemname
        self.agi_address = agi_address
        self.prompts = {**DEFAULT_PROMPTS, **(prompts or {})}
        self.agi_faults = agi_faults or _AGIFaults()
        self.answer_delay = answer_delay
        self.features = features or FeatureConfig()
        self.globals: dict[str, str] = dict(dialplan.globals)
        self.channels: dict[str, Channel] = {}
        self.errors: list[str] = []
        self.device_states: dict[str, str] = {}
        self._chan_seq = 0
        self._uid_seq = 0
        self._local_seq = 0
        self._local_opt_id = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._mixmonitors: dict[str, str] = {}
        self.queue_callers: dict[str, list[Channel]] = {q: [] for q in queues}
        self.apps: dict[str, AppFn] = {
            "Answer": self.app_answer,
            "Hangup": self.app_hangup,
            "NoOp": self.app_noop,
            "Set": self.app_set,
            "Goto": self.app_goto,
            "GotoIf": self.app_gotoif,
            "Wait": self.app_wait,
            "Playback": self.app_playback,
            "MusicOnHold": self.app_moh,
            "Read": self.app_read,
            "UserEvent": self.app_userevent,
            "Dial": self.app_dial,
            "Queue": self.app_queue,
            "AGI": self.app_agi,
            "Return": self.app_return,
        }
        # Dynamic AORs with a contact (REGISTER seen, 07b); static AORs always have one.
        self.registered: set[str] = set()
        for ep in endpoints.values():
            self.device_states[f"PJSIP/{ep.name}"] = self._idle_state(ep.name)
        # Hints ("exten => 1001,hint,PJSIP/agent1001") and their last extension state:
        # ExtensionStatus goes out when it changes (04, 07b, 13).
        self.hints = dialplan.hints()
        self.hint_states: dict[tuple[str, str], int] = {
            key: self.extension_state(hint)[0] for key, hint in self.hints.items()}

    # ------------------------------------------------------------------ tasks
    def spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        async def runner() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in the simulator must be loud
                log.exception("simulator task %s failed", name)
                self.errors.append(f"{name}: {exc!r}")

        task = asyncio.get_running_loop().create_task(runner(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # ------------------------------------------------------------------ events
    def emit(self, name: str, privilege: str, fields: Fields) -> None:
        self._emit(Message.event(name, [("Privilege", privilege), *fields]))

    def emit_chan(self, name: str, chan: Channel, extra: Fields = (), privilege: str = "call,all") -> None:  # type: ignore[assignment]
        self.emit(name, privilege, [*chan.snapshot(), *extra])

    def emit_two(self, name: str, chan: Channel | None, dest: Channel, extra: Fields,
                 privilege: str = "call,all") -> None:
        fields: Fields = [] if chan is None else chan.snapshot()
        fields += dest.snapshot("Dest", with_vars=False)
        fields += dest.chanvar_lines("DestChanVariable")
        self.emit(name, privilege, [*fields, *extra])

    def set_device(self, device: str, state: str) -> None:
        """A device state change: ``DeviceStateChange``, then ``ExtensionStatus`` for every
        hint whose state it changes (04, 13)."""
        if self.device_states.get(device) == state:
            return
        self.device_states[device] = state
        self.emit("DeviceStateChange", "call,all", [("Device", device), ("State", state)])
        self._hint_changes(device)

    def _hint_changes(self, device: str) -> None:
        for (context, exten), hint in self.hints.items():
            if device not in hint.split("&"):
                continue
            code, text = self.extension_state(hint)
            if self.hint_states.get((context, exten)) != code:
                self.hint_states[(context, exten)] = code
                self.emit("ExtensionStatus", "call,all", [
                    ("Exten", exten), ("Context", context), ("Hint", hint),
                    ("Status", str(code)), ("StatusText", text)])

    def extension_state(self, hint: str) -> tuple[int, str]:
        """``ast_extension_state`` of a hint: its devices' states combined, as
        ``(Status, StatusText)`` of ``ExtensionState``/``ExtensionStatus``."""
        states = [self.device_states.get(d, "UNAVAILABLE") for d in hint.split("&") if d]
        if not states or all(st in ("UNAVAILABLE", "INVALID") for st in states):
            return 4, "Unavailable"
        inuse = any(st in ("INUSE", "BUSY", "RINGINUSE", "ONHOLD") for st in states)
        ringing = any(st in ("RINGING", "RINGINUSE") for st in states)
        if "BUSY" in states:
            return 2, "Busy"
        if ringing and inuse:
            return 9, "InUse&Ringing"
        if ringing:
            return 8, "Ringing"
        if "ONHOLD" in states:
            return (17, "InUse&Hold") if "INUSE" in states else (16, "Hold")
        if inuse:
            return 1, "InUse"
        return 0, "Idle"

    def reachable(self, ep: Endpoint) -> bool:
        """Whether chan_pjsip can create a channel to ``ep``: a dynamic AOR needs a
        registered contact."""
        return not ep.dynamic or ep.name in self.registered

    def _idle_state(self, endpoint: str) -> str:
        ep = self.endpoints.get(endpoint)
        if endpoint == "trunk" or (ep is not None and not self.reachable(ep)):
            return "UNAVAILABLE"
        return "NOT_INUSE"

    def _refresh_device(self, endpoint: str, tech: str = "PJSIP") -> None:
        chans = [c for c in self.channels.values()
                 if c.endpoint == endpoint and c.tech == tech and not c.hungup]
        if tech == "Local":
            self.set_device(f"Local/{endpoint}", "INUSE" if chans else "NOT_INUSE")
            return
        ep = self.endpoints.get(endpoint)
        if not chans or (ep is not None and not self.reachable(ep)):
            state = self._idle_state(endpoint)
        elif any(c.state == 6 for c in chans):
            state = "INUSE"
        else:
            state = "RINGING"
        self.set_device(f"PJSIP/{endpoint}", state)

    # ------------------------------------------------------------------ registrations
    def register(self, endpoint: str) -> None:
        """A REGISTER for a dynamic AOR (07b): ``PeerStatus Reachable``, the device
        becomes ``NOT_INUSE`` (``DeviceStateChange``, then ``ExtensionStatus``), then
        ``ContactStatus NonQualified``. A refresh of a known contact emits nothing."""
        ep = self._dynamic(endpoint)
        if ep.name in self.registered:
            return
        self.registered.add(ep.name)
        self.emit("PeerStatus", "system,all", [("ChannelType", "PJSIP"), ("Peer", f"PJSIP/{ep.name}"),
                                                ("PeerStatus", "Reachable")])
        self._refresh_device(ep.name)
        self._contact_status(ep, "NonQualified")

    def unregister(self, endpoint: str) -> None:
        """A REGISTER with ``Expires: 0`` (07b): ``ExtensionStatus Unavailable``,
        ``PeerStatus Unreachable``, ``DeviceStateChange UNAVAILABLE``, then
        ``ContactStatus Removed``."""
        ep = self._dynamic(endpoint)
        if ep.name not in self.registered:
            return
        self.registered.discard(ep.name)
        device = f"PJSIP/{ep.name}"
        old = self.device_states.get(device)
        self.device_states[device] = "UNAVAILABLE"
        self._hint_changes(device)
        self.emit("PeerStatus", "system,all", [("ChannelType", "PJSIP"), ("Peer", device),
                                                ("PeerStatus", "Unreachable")])
        if old != "UNAVAILABLE":
            self.emit("DeviceStateChange", "call,all", [("Device", device), ("State", "UNAVAILABLE")])
        self._contact_status(ep, "Removed")

    def _dynamic(self, endpoint: str) -> Endpoint:
        ep = self.endpoints.get(endpoint)
        if ep is None or not ep.dynamic:
            raise ValueError(f"{endpoint!r} is not an endpoint with a dynamic AOR")
        return ep

    def _contact_status(self, ep: Endpoint, status: str) -> None:
        self.emit("ContactStatus", "system,all", [
            ("URI", ep.contact or f"sip:{ep.name}@127.0.0.1"), ("ContactStatus", status), ("AOR", ep.name),
            ("EndpointName", ep.name), ("RoundtripUsec", "0")])

    # ------------------------------------------------------------------ channels
    def new_uniqueid(self) -> str:
        uid = f"{int(self.clock.now())}.{self._uid_seq}"
        self._uid_seq += 1
        return f"{self.systemname}-{uid}" if self.systemname else uid

    def new_channel(self, endpoint: str, *, context: str, exten: str, caller_num: str,
                    caller_name: str, state: int, linkedid: str | None = None,
                    uniqueid: str | None = None) -> Channel:
        name = f"PJSIP/{endpoint}-{self._chan_seq:08x}"
        self._chan_seq += 1
        if uniqueid is None:
            uniqueid = self.new_uniqueid()
        else:
            self._uid_seq += 1
        chan = Channel(
            name=name, uniqueid=uniqueid, linkedid=linkedid or uniqueid, endpoint=endpoint,
            context=context, exten=exten, caller_num=caller_num, caller_name=caller_name,
            state=state, clock=self.clock, channelvars=self.channelvars,
        )
        self.channels[name] = chan
        self.emit_chan("Newchannel", chan)
        return chan

    def find_channel(self, name: str) -> Channel | None:
        chan = self.channels.get(name)
        if chan is None:
            for c in self.channels.values():
                if c.uniqueid == name:
                    return c
        return chan

    def set_state(self, chan: Channel, state: int) -> None:
        if chan.state != state:
            if state == 6 and chan.local_half == 2:
                self._local_answered(chan)
            chan.state = state
            if state == 6 and chan.answered_at is None:
                chan.answered_at = self.clock.now()
            self.emit_chan("Newstate", chan)
            self._refresh_device(chan.endpoint, chan.tech)

    def destroy(self, chan: Channel) -> None:
        """Emit ``Hangup`` and forget the channel (it must have left any bridge)."""
        if chan.hungup:
            return
        if chan.bridge is not None:
            self.bridge_leave(chan)
        chan.hungup = True
        chan.wake()
        cause = chan.hangup_cause
        self.emit_chan("Hangup", chan, [("Cause", str(cause)), ("Cause-txt", CAUSE_TEXT.get(cause, "Unknown"))])
        self.channels.pop(chan.name, None)
        self._mixmonitors.pop(chan.name, None)
        self._refresh_device(chan.endpoint, chan.tech)
        peer = chan.local_peer
        if peer is not None and not peer.hungup and not peer.hangup_requested:
            # One half of a Local pair hung up: the other gets a hangup request.
            self.remote_hangup(peer, 16)

    def remote_hangup(self, chan: Channel, cause: int | None = None) -> None:
        """The far end hung up (a SIP BYE): non-soft ``HangupRequest`` first."""
        if chan.hungup or chan.hangup_requested:
            return
        extra: Fields = []
        if chan.bridge is not None and chan.bridge.kind == "dial":
            extra = [("Cause", "16")]
        self.emit_chan("HangupRequest", chan, extra)
        chan.hangup_requested = True
        chan.hangup_cause = cause if cause is not None else (16 if chan.bridge else 0)
        chan.wake()
        if not chan.has_pbx and not getattr(chan, "_driven", False):
            if chan.bridge is not None and chan.bridge.kind == "action":
                # After a Bridge action the peer runs its after-bridge dialplan first; the
                # hung-up channel's Hangup comes last (15).
                self.bridge_leave(chan)
                self.spawn(self._destroy_later(chan, 0.1), f"destroy {chan.name}")
            else:
                self.destroy(chan)

    async def _destroy_later(self, chan: Channel, sim_seconds: float) -> None:
        await self.clock.sleep(sim_seconds)
        self.destroy(chan)

    def soft_hangup(self, chan: Channel, cause: int = 16) -> None:
        """Hangup by AMI or the dialplan: ``SoftHangupRequest`` only."""
        if chan.hungup or chan.hangup_requested:
            return
        chan.hangup_requested = True
        chan.hangup_cause = cause
        if chan.has_pbx:
            if chan.bridge is None:
                chan.soft_hangup_sent = True
                self.emit_chan("SoftHangupRequest", chan, [("Cause", str(cause))])
            # In a bridge the request shows after its BridgeLeave (06, 06b): _pbx_end.
            chan.wake()
        elif getattr(chan, "_driven", False):
            chan.wake()
        else:
            self.destroy(chan)

    def blind_transfer(self, transferer: Channel, transferee: Channel, loc: Location) -> None:
        """AMI BlindTransfer: the transferer is hung up; when it has left the bridge the
        transferee runs the target (06b)."""
        transferee.async_goto = loc
        transferee.context, transferee.exten, transferee.priority = loc.context, loc.exten, loc.priority
        self.soft_hangup(transferer)
        if transferee.has_pbx:
            transferee.wake()

    def redirect(self, chan: Channel, loc: Location) -> None:
        """AMI Redirect / BlindTransfer target: an async goto, no hangup events."""
        chan.async_goto = loc
        chan.context, chan.exten, chan.priority = loc.context, loc.exten, loc.priority
        if chan.has_pbx or getattr(chan, "_driven", False):
            chan.wake()
            return
        # A channel without dialplan (a Dial callee, or parked in an action bridge):
        # take it out of its bridge and start a PBX at the target.
        if chan.bridge is not None:
            self.bridge_leave(chan)
        self.start_pbx(chan)

    # ------------------------------------------------------------------ bridges
    def bridge_create(self, kind: str) -> Bridge:
        bridge = Bridge(kind)
        self.emit("BridgeCreate", "call,all", bridge.block())
        return bridge

    def bridge_enter(self, bridge: Bridge, chan: Channel, *, swap: Channel | None = None) -> None:
        """``BridgeEnter``; ``swap``: the channel this one replaces (``SwapUniqueid``, a
        Local channel optimisation, 06c)."""
        bridge.channels.append(chan)
        chan.bridge = bridge
        extra: Fields = [("SwapUniqueid", swap.uniqueid)] if swap is not None else []
        self.emit("BridgeEnter", "call,all", [*bridge.block(), *chan.snapshot(), *extra])
        # Two PJSIP channels without DTMF features go native (13, 15, 17); with Dial
        # option t/T (06, 06b, 06c) or a Local channel the bridge stays simple_bridge.
        if len(bridge.channels) == 2 and all(c.tech == "PJSIP" and not c.xfer_features
                                             for c in bridge.channels):
            bridge.technology = "native_rtp"
        pair = chan.local_peer
        one = chan if chan.local_half == 1 else pair
        if one is not None and one.local_optimize:
            self.maybe_optimize_local(one)

    def bridge_leave(self, chan: Channel, *, quiet: bool = False) -> None:
        """``BridgeLeave``. The remaining party of a two-party bridge is dealt with by
        :meth:`_peer_left` and an emptied bridge is destroyed, unless ``quiet`` (a
        channel moved by a transfer or a Local optimisation) or the bridge's hooks
        handle it."""
        bridge = chan.bridge
        if bridge is None:
            return
        hooks = None if quiet else bridge.hooks
        if hooks is not None:
            hooks.before_leave(bridge, chan)
        bridge.channels.remove(chan)
        chan.bridge = None
        self.emit("BridgeLeave", "call,all", [*bridge.block(), *chan.snapshot()])
        if quiet:
            return
        if not bridge.channels:
            self.bridge_destroy(bridge)
        if hooks is not None and hooks.after_leave(bridge, chan):
            return
        if len(bridge.channels) == 1:
            rest = bridge.channels[0]
            bridge.ended.set()
            asyncio.get_running_loop().call_soon(self._peer_left, bridge, rest)

    def bridge_destroy(self, bridge: Bridge) -> None:
        if not bridge.destroyed:
            bridge.destroyed = True
            bridge.ended.set()
            self.emit("BridgeDestroy", "call,all", bridge.block())

    @staticmethod
    def still_bridged(chan: Channel, bridge: Bridge) -> bool:
        """Whether the Dial/Queue that made ``bridge`` keeps waiting on it: a peer is
        there, or an attended transfer holds it (06c)."""
        if chan.atxfer is not None:
            return True
        return chan.bridge is bridge and (len(bridge.channels) > 1 or bridge.held_by_transfer)

    def _peer_left(self, bridge: Bridge, rest: Channel) -> None:
        """The other party left a two-party bridge."""
        if rest.bridge is not bridge or rest.hungup:
            return
        if getattr(rest, "_bridge_owner", False):
            rest.wake()  # its Dial/Queue app handles it
            return
        self.bridge_leave(rest)
        if rest.async_goto is not None:
            # A blind-transfer target waiting for the transferer to leave (06b).
            rest.after_bridge = None
            self.start_pbx(rest)
        elif rest.after_bridge is not None:
            loc, rest.after_bridge = rest.after_bridge, None
            rest.context, rest.exten, rest.priority = loc.context, loc.exten, loc.priority
            self.start_pbx(rest, resume=True)
        else:
            # A callee: the bridge hangs it up, with no request event (15b).
            asyncio.get_running_loop().call_soon(self.destroy, rest)

    async def bridge_wait(self, chan: Channel, bridge: Bridge) -> None:
        """Block the owner's app until the bridge ends or the channel is interrupted."""
        chan._bridge_owner = True  # type: ignore[attr-defined]
        try:
            while self.still_bridged(chan, bridge) and not chan.interrupted:
                await chan.wait(self.clock, None)
        finally:
            chan._bridge_owner = False  # type: ignore[attr-defined]
        if chan.bridge is bridge or (chan.bridge is not None and chan.bridge.kind == "atxfer"):
            self.bridge_leave(chan)

    # ------------------------------------------------------------------ variables
    def set_var(self, chan: Channel | None, name: str, value: str, *, event_first: bool = False) -> None:
        """``Set(name=value)`` semantics, including the dialplan functions the
        capture dialplans write (``CDR()``, ``CALLERID()``, ``CHANNEL(hangup_handler_push)``)."""
        if "(" in name and name.endswith(")"):
            if chan is None:
                raise DialplanError(f"function {name} needs a channel")
            self._write_function(chan, name, value)
            return
        if chan is None:
            self.globals[name] = value
            return
        if event_first:
            self.emit_chan("VarSet", chan, [("Variable", name), ("Value", value)], "dialplan,all")
            chan.variables[name] = value
        else:
            chan.variables[name] = value
            self.emit_chan("VarSet", chan, [("Variable", name), ("Value", value)], "dialplan,all")

    def _write_function(self, chan: Channel, name: str, value: str) -> None:
        func, _, arg = name[:-1].partition("(")
        func = func.upper()
        arg = arg.strip()
        if func == "CDR":
            chan.variables.setdefault("__cdr__", "")
            return
        if func == "CALLERID":
            kind = arg.lower()
            if kind == "all":
                val = value.strip()
                if "<" in val and val.endswith(">"):
                    cname, _, num = val[:-1].rpartition("<")
                    chan.caller_name = cname.strip().strip('"')
                    chan.caller_num = num.strip()
                else:
                    chan.caller_num = val
            elif kind == "num":
                chan.caller_num = value
            elif kind == "name":
                chan.caller_name = value
            else:
                raise DialplanError(f"CALLERID({arg}) is not supported")
            self.emit_chan("NewCallerid", chan, [("CID-CallingPres", "0 (Presentation Allowed, Not Screened)")])
            return
        if func == "CHANNEL" and arg == "hangup_handler_push":
            chan.hangup_handlers.append(value)
            self.emit_chan("HangupHandlerPush", chan, [("Handler", value)], "dialplan,all")
            return
        if func == "CHANNEL" and arg == "language":
            chan.language = value
            return
        raise DialplanError(f"writing {name} is not supported by the simulator")

    def resolve(self, chan: Channel | None, expr: str) -> str:
        """Value of ``${expr}`` on ``chan``."""
        if "(" in expr and expr.endswith(")"):
            func, _, arg = expr[:-1].partition("(")
            return self._read_function(chan, func.upper(), arg)
        if chan is not None:
            builtin = {
                "CONTEXT": chan.context, "EXTEN": chan.exten, "PRIORITY": str(chan.priority),
                "CHANNEL": chan.name, "UNIQUEID": chan.uniqueid, "CALLERIDNUM": chan.caller_num,
                "HANGUPCAUSE": str(chan.hangup_cause if chan.hangup_requested else 0),
            }.get(expr)
            if builtin is not None:
                return builtin
            value = chan.get_var(expr)
            if value is not None:
                return value
        if expr == "EPOCH":
            return str(int(self.clock.now()))
        return self.globals.get(expr, "")

    def _read_function(self, chan: Channel | None, func: str, arg: str) -> str:
        if func == "LEN":
            return str(len(arg))
        if func == "FILTER":
            allowed, _, value = arg.partition(",")
            keep = _filter_chars(allowed)
            return "".join(c for c in value if c in keep)
        if func == "DIALPLAN_EXISTS":
            # func_dialplan: context[,extension[,priority]] -> 1 when it exists, else 0.
            parts = [p.strip() for p in arg.split(",")]
            context = parts[0]
            if len(parts) == 1:
                return "1" if context in self.dialplan.contexts else "0"
            ext = self.dialplan.find_extension(context, parts[1])
            if ext is None:
                return "0"
            if len(parts) == 2 or not parts[2]:
                return "1"
            number = self.dialplan.resolve_priority(context, parts[1], parts[2])
            return "1" if number is not None and number in ext.steps else "0"
        if chan is None:
            return ""
        if func == "CALLERID":
            kind = arg.lower()
            if kind == "num":
                return chan.caller_num
            if kind == "name":
                return chan.caller_name
            if kind == "all":
                return f'"{chan.caller_name}" <{chan.caller_num}>'
        if func == "CHANNEL":
            return {
                "name": chan.name, "endpoint": chan.endpoint, "language": chan.language,
                "state": chan.state_desc, "uniqueid": chan.uniqueid, "linkedid": chan.linkedid,
                "context": chan.context, "exten": chan.exten,
            }.get(arg, "")
        if func == "CDR":
            return ""
        if func == "EXISTS":
            return "1" if chan.get_var(arg) is not None else "0"
        raise DialplanError(f"dialplan function {func}() is not supported by the simulator")

    def expand(self, chan: Channel | None, text: str) -> str:
        return substitute(text, lambda e: self.resolve(chan, e))

    # ------------------------------------------------------------------ PBX loop
    def start_pbx(self, chan: Channel, *, resume: bool = False) -> asyncio.Task[None]:
        chan.has_pbx = True
        return self.spawn(self._pbx(chan, stale=resume), f"pbx {chan.name}")

    async def _pbx(self, chan: Channel, stale: bool = False) -> None:
        chan.has_pbx = True
        stale_pending = False
        try:
            while not chan.hungup and not chan.hangup_requested:
                if chan.async_goto is not None:
                    chan.async_goto = None
                    chan.clear_wake()
                    stale_pending = True
                if getattr(chan, "_pending_bridge", None) is not None:
                    return  # the Bridge action takes the channel out of the dialplan
                step = self.dialplan.step(chan.context, chan.exten, chan.priority)
                if step is None:
                    if self.dialplan.find_extension(chan.context, chan.exten) is None:
                        log.info("%s: no extension %s@%s", chan.name, chan.exten, chan.context)
                    break
                try:
                    data = self.expand(chan, step.data)
                except DialplanError as exc:
                    self.errors.append(f"{step.source}: {exc}")
                    break
                if stale_pending or stale:
                    # The first Newexten after an async goto was already published with
                    # the old application (14, 15): the real app runs without its own.
                    self.emit_chan("Newexten", chan, [
                            ("Extension", chan.exten),
                            ("Application", chan.application or step.app),
                            ("AppData", chan.app_data)], "dialplan,all")
                    stale_pending = stale = False
                    chan.application, chan.app_data = step.app, data
                else:
                    chan.application, chan.app_data = step.app, data
                    self.emit_chan("Newexten", chan, [
                            ("Extension", chan.exten),
                            ("Application", step.app),
                            ("AppData", data)], "dialplan,all")
                try:
                    res = await self.exec_app(chan, step.app, data, step.source)
                except DialplanError as exc:
                    # Loud (recorded in errors, logged), and the call is hung up: an
                    # application the simulator cannot run never "succeeds".
                    if str(exc) not in self.errors:
                        self.errors.append(str(exc))
                    log.error("%s: %s", chan.name, exc)
                    break
                if getattr(chan, "_pending_bridge", None) is not None:
                    return
                if res < 0:
                    break
                if chan.async_goto is not None or res == GOTO:
                    continue
                chan.priority += 1
        finally:
            chan.has_pbx = False
        if getattr(chan, "_pending_bridge", None) is not None:
            return
        await self._pbx_end(chan)

    async def _pbx_end(self, chan: Channel) -> None:
        if chan.hungup:
            return
        if chan.bridge is not None:
            self.bridge_leave(chan)
        if not chan.soft_hangup_sent:
            chan.soft_hangup_sent = True
            self.emit_chan("SoftHangupRequest", chan, [("Cause", "16")])
        await asyncio.sleep(0)  # let a bridge peer leave first (13)
        await self._run_hangup_handlers(chan)
        self.destroy(chan)

    async def _run_hangup_handlers(self, chan: Channel) -> None:
        while chan.hangup_handlers:
            handler = chan.hangup_handlers.pop(0)
            self.emit_chan("HangupHandlerRun", chan, [("Handler", handler)], "dialplan,all")
            parts = handler.split(",")
            if len(parts) == 3:
                chan.context, chan.exten, chan.priority = parts[0], parts[1], int(parts[2])
            for _ in range(100):
                step = self.dialplan.step(chan.context, chan.exten, chan.priority)
                if step is None or step.app == "Return":
                    break
                data = self.expand(chan, step.data)
                self.emit_chan("Newexten", chan, [
                        ("Extension", chan.exten),
                        ("Application", step.app),
                        ("AppData", data)], "dialplan,all")
                if step.app not in ("NoOp", "Set", "UserEvent"):
                    break
                await self.exec_app(chan, step.app, data, step.source)
                chan.priority += 1

    async def exec_app(self, chan: Channel, app: str, data: str, source: str = "") -> int:
        fn = self.apps.get(app)
        if fn is None:
            msg = f"application {app}({data}) is not implemented by the simulator ({source})"
            self.errors.append(msg)
            log.error(msg)
            raise UnsupportedApplication(msg)
        return await fn(chan, data)

    # ------------------------------------------------------------------ simple apps
    async def app_noop(self, chan: Channel, data: str) -> int:
        return 0

    async def app_return(self, chan: Channel, data: str) -> int:
        return -1

    async def app_answer(self, chan: Channel, data: str) -> int:
        if chan.state != 6:
            self.set_state(chan, 6)
            # Answer() waits up to 500 ms for the caller's first frame (DESIGN.md).
            if self.answer_delay:
                await chan.wait(self.clock, self.answer_delay)
        return -1 if chan.hangup_requested else 0

    async def app_hangup(self, chan: Channel, data: str) -> int:
        cause = int(data) if data.strip().isdigit() else 16
        chan.hangup_cause = cause
        return -1

    async def app_set(self, chan: Channel, data: str) -> int:
        name, sep, value = data.partition("=")
        if not sep:
            raise DialplanError(f"Set({data}): missing '='")
        self.set_var(chan, name.strip(), value)
        return 0

    def _goto_target(self, chan: Channel, target: str) -> None:
        parts = [p.strip() for p in target.split(",")]
        if len(parts) == 1:
            ctx, ext, prio = chan.context, chan.exten, parts[0]
        elif len(parts) == 2:
            ctx, ext, prio = chan.context, parts[0], parts[1]
        else:
            ctx, ext, prio = parts[0], parts[1], parts[2]
        number = self.dialplan.resolve_priority(ctx, ext, prio)
        if number is None:
            raise DialplanError(f"Goto({target}): no such label/priority")
        chan.context, chan.exten, chan.priority = ctx, ext, number

    async def app_goto(self, chan: Channel, data: str) -> int:
        self._goto_target(chan, data)
        return GOTO

    async def app_gotoif(self, chan: Channel, data: str) -> int:
        cond, sep, rest = data.partition("?")
        if not sep:
            raise DialplanError(f"GotoIf({data}): missing '?'")
        iftrue, _, iffalse = rest.partition(":")
        target = iftrue if is_true(cond) else iffalse
        if not target.strip():
            return 0
        self._goto_target(chan, target)
        return GOTO

    async def app_wait(self, chan: Channel, data: str) -> int:
        seconds = float(data.strip() or 0)
        await chan.wait(self.clock, seconds)
        return -1 if chan.hangup_requested else 0

    async def play(self, chan: Channel, prompt: str, escape: str = "") -> tuple[str | None, float]:
        """Play a prompt; returns (escape digit or None, seconds played)."""
        length = self.prompts.get(prompt, 1.0)
        start = self.clock.now()
        if escape:
            deadline = start + length
            while True:
                left = deadline - self.clock.now()
                if left <= 0:
                    return None, length
                digit = await chan.wait_digit(self.clock, left)
                if digit is None:
                    return None, min(length, self.clock.now() - start)
                if digit in escape:
                    return digit, self.clock.now() - start
        await chan.wait(self.clock, length)
        return None, min(length, self.clock.now() - start)

    async def app_playback(self, chan: Channel, data: str) -> int:
        args = split_args(data)
        ok = True
        for prompt in args[0].split("&"):
            await self.play(chan, prompt)
            if chan.interrupted:
                ok = False
                break
        self.set_var(chan, "PLAYBACKSTATUS", "SUCCESS" if ok else "FAILED")
        return -1 if chan.hangup_requested else 0

    async def app_moh(self, chan: Channel, data: str) -> int:
        args = split_args(data)
        klass = args[0] or "default"
        duration = float(args[1]) if len(args) > 1 and args[1].strip() else None
        self.emit_chan("MusicOnHoldStart", chan, [("Class", klass)])
        await chan.wait(self.clock, duration)
        if not chan.hungup:
            self.emit_chan("MusicOnHoldStop", chan)
        return -1 if chan.hangup_requested else 0

    async def app_read(self, chan: Channel, data: str) -> int:
        args = split_args(data) + [""] * 6
        var, prompt = args[0], args[1]
        maxdigits = int(args[2]) if args[2].strip() else 255
        timeout = float(args[5]) if args[5].strip() else 5.0
        digits = ""
        first = True
        for p in [p for p in prompt.split("&") if p]:
            digit, _ = await self.play(chan, p, escape="0123456789*#")
            if digit is not None:
                if digit == "#":
                    first = False
                    break
                digits += digit
                break
        while first and len(digits) < maxdigits and not chan.interrupted:
            digit = await chan.wait_digit(self.clock, timeout)
            if digit is None or digit == "#":
                break
            digits += digit
        self.set_var(chan, var, digits)
        self.set_var(chan, "READSTATUS", "HANGUP" if chan.hangup_requested else ("OK" if digits else "TIMEOUT"))
        return -1 if chan.hangup_requested else 0

    async def app_userevent(self, chan: Channel, data: str) -> int:
        args = split_args(data)
        fields: Fields = [("UserEvent", args[0])]
        for extra in args[1:]:
            key, _, value = extra.partition(":")
            fields.append((key.strip(), value.strip()))
        self.emit("UserEvent", "user,all", [*chan.snapshot(), *fields])
        return 0

    async def app_agi(self, chan: Channel, data: str) -> int:
        from ctid.simulator.agi_client import run_agi

        return await run_agi(self, chan, data)

    # ------------------------------------------------------------------ Dial
    def _parse_target(self, target: str) -> tuple[str, str] | None:
        tech, _, resource = target.partition("/")
        if tech.upper() != "PJSIP" or not resource:
            return None
        number, at, ep = resource.partition("@")
        return (ep, number) if at else (resource, "")

    async def app_dial(self, chan: Channel, data: str) -> int:
        """``Dial(PJSIP/a&PJSIP/b,timeout,options)``: every target is requested first
        (``Newchannel``, inherited variables, ``Newexten AppDial``), then called
        (``DialBegin`` each), then all ring at once and the first to answer wins
        (:meth:`_ring_many`). The others get ``DialEnd CANCEL`` and are hung up with cause
        26 (answered elsewhere); then ``DIALSTATUS=ANSWER`` and the winner's ``DialEnd
        ANSWER`` (app_dial's order, 13). Without an answer ``DIALSTATUS`` is ``NOANSWER``
        (timeout), ``CANCEL`` (the caller left) or, when every target failed at once,
        ``BUSY``, ``CONGESTION`` or ``CHANUNAVAIL`` in that order of precedence.

        Options: ``g`` (go on in the dialplan when the callee hangs up), ``T``/``t`` (the
        caller/callee may transfer: DTMF features in the bridge, see
        :mod:`ctid.simulator.transfer`). Any other option raises :class:`DialplanError`.
        """
        args = [*split_args(data), "", ""]
        targets, timeout_s, opts = args[0], args[1], parse_options(args[2])
        unknown = sorted(set(opts) - DIAL_OPTIONS)
        if unknown:
            raise DialplanError(f"Dial option(s) {''.join(unknown)} not implemented by the simulator: Dial({data})")
        try:
            timeout = float(timeout_s) if timeout_s.strip() else None
        except ValueError:
            timeout = None  # app_dial: "Invalid timeout specified", dials without one
        if timeout is not None and timeout <= 0:
            timeout = None
        for var in ("DIALSTATUS", "DIALEDPEERNUMBER", "DIALEDPEERNAME", "ANSWEREDTIME", "DIALEDTIME", "RINGTIME"):
            self.set_var(chan, var, "")
        failed = {"BUSY": 0, "CONGESTION": 0, "CHANUNAVAIL": 0}
        calls: list[tuple[Endpoint, Channel, str, str]] = []
        for target in targets.split("&"):
            parsed = self._parse_target(target.strip())
            ep = self.endpoints.get(parsed[0]) if parsed else None
            if parsed is None or ep is None or not self.reachable(ep):
                failed["CHANUNAVAIL"] += 1  # ast_request() failed: no channel at all
                continue
            dialstring = target.strip().partition("/")[2]
            callee = self._new_callee(chan, ep, parsed[1])
            self.set_var(callee, "DIALEDPEERNUMBER", dialstring, event_first=True)
            for key, value in chan.inheritable().items():
                self.set_var(callee, key, value, event_first=True)
            callee.exten = chan.exten
            callee.connected_num, callee.connected_name = chan.caller_num, chan.caller_name
            callee.application, callee.app_data = "AppDial", "(Outgoing Line)"
            self.emit_chan("Newexten", callee, [("Extension", callee.exten), ("Application", "AppDial"),
                                                ("AppData", "(Outgoing Line)")], "dialplan,all")
            calls.append((ep, callee, dialstring, parsed[1]))
        if not calls:
            self.set_var(chan, "DIALSTATUS", "CHANUNAVAIL")
            return 0
        for _, callee, dialstring, number in calls:
            if number:
                # An outbound trunk leg reports Ringing before DialBegin (17).
                self.set_state(callee, 5)
            self.emit_two("DialBegin", chan, callee, [("DialString", dialstring)])

        def on_fail(_: int, status: str) -> None:
            failed[status] += 1

        outcome, ringing, won = await self._ring_many(chan, [(ep, c) for ep, c, _, _ in calls], timeout, on_fail)
        if outcome != "ANSWER":
            if outcome == "FAILED":
                status = next(st for st in ("BUSY", "CONGESTION", "CHANUNAVAIL") if failed[st])
            else:
                status = outcome
                left = [calls[i][1] for i in ringing]
                for callee in left:  # publish_dial_end_event(), then hanguptree()
                    self.emit_two("DialEnd", chan, callee, [("DialStatus", status)])
                for callee in left:
                    callee.hangup_cause = 0
                    self.destroy(callee)
            self.set_var(chan, "DIALSTATUS", status)
            return -1 if chan.hangup_requested else 0
        ep, callee, dialstring, _ = calls[won]
        self._hang_up_losers(chan, [calls[i][1] for i in ringing if i != won])
        self.set_var(chan, "DIALSTATUS", "ANSWER")
        self.set_var(chan, "DIALEDPEERNAME", callee.name)
        self.set_var(chan, "DIALEDPEERNUMBER", dialstring)
        self.emit_two("DialEnd", chan, callee, [("DialStatus", "ANSWER")])
        if chan.state != 6:
            self.set_state(chan, 6)
        bridge = self.bridge_create("dial")
        callee.exten = ""
        self.emit_chan("Newexten", callee, [("Extension", ""), ("Application", "AppDial"),
                                            ("AppData", "(Outgoing Line)")], "dialplan,all")
        chan.xfer_features = "T" in opts  # the calling party may transfer
        callee.xfer_features = "t" in opts  # the called party may transfer
        self.bridge_enter(bridge, callee)
        self.bridge_enter(bridge, chan)
        self._schedule_endpoint_hangup(callee, ep)
        await self.bridge_wait(chan, bridge)
        chan.xfer_features = False
        self.set_var(chan, "DIALSTATUS", "ANSWER")
        if chan.hangup_requested:
            return -1
        if chan.async_goto is not None:
            return 0
        return 0 if "g" in opts else -1

    def _hang_up_losers(self, chan: Channel, losers: list[Channel], *, queue: bool = False) -> None:
        """The calls that lost to the one answered (app_dial and app_queue ringall):
        ``DialEnd CANCEL`` for each (wait_for_answer), then each is hung up with cause 26,
        AST_CAUSE_ANSWERED_ELSEWHERE (hanguptree). app_queue's hangupcalls() reports each
        one's ``DialEnd CANCEL`` once more, right before its ``Hangup``."""
        for other in losers:
            self.emit_two("DialEnd", chan, other, [("DialStatus", "CANCEL")])
        for other in losers:
            other.hangup_cause = 26
            if queue:
                self.emit_two("DialEnd", chan, other, [("DialStatus", "CANCEL")])
            self.destroy(other)

    def _new_callee(self, chan: Channel | None, ep: Endpoint, number: str) -> Channel:
        callee = self.new_channel(
            ep.name, context=ep.context, exten="s",
            caller_num=number or ep.callerid_num, caller_name=ep.callerid_name if not number else "",
            state=0, linkedid=chan.linkedid if chan else None,
        )
        callee._driven = True  # type: ignore[attr-defined]
        return callee

    async def _ring(self, chan: Channel | None, callee: Channel, ep: Endpoint, timeout: float | None) -> str:
        """Ring one ``callee`` for Originate (``chan`` None) or an rrmemory queue member:
        returns ANSWER, NOANSWER, BUSY or CANCEL (the caller went away). The caller
        emits its own DialEnd events and hangs the callee up; a busy or unreachable one
        is already gone."""
        if ep.unreachable:
            await (chan.wait(self.clock, timeout) if chan else self.clock.sleep(timeout or 0))
            callee.hangup_cause = 0
            self.destroy(callee)
            return "CANCEL" if chan and chan.interrupted else "NOANSWER"
        if ep.busy or ep.congested:
            callee.hangup_cause = 17 if ep.busy else 34
            self.destroy(callee)
            return "BUSY"
        if callee.state != 5:
            self.set_state(callee, 5)
        self.emit_two("DialState", chan, callee, [("DialStatus", "RINGING")])
        ring = ep.ring_s if ep.answer else None
        if timeout is not None:
            ring = timeout if ring is None else min(ring, timeout)
        if chan is not None:
            completed = await chan.wait(self.clock, ring)
        else:
            completed = True
            await callee.wait(self.clock, ring)
        answered = completed and ep.answer and (timeout is None or ep.ring_s <= timeout)
        if callee.hungup or callee.hangup_requested:
            answered = False
        if not answered:
            callee.hangup_cause = 0
            return "CANCEL" if chan is not None and chan.interrupted else "NOANSWER"
        self.set_state(callee, 6)
        callee._driven = False  # type: ignore[attr-defined]
        return "ANSWER"

    async def _ring_many(self, chan: Channel, calls: list[tuple[Endpoint, Channel]], timeout: float | None,
                         on_fail: Callable[[int, str], None] | None = None) -> tuple[str, list[int], int]:
        """Ring every callee at once, first to answer wins: wait_for_answer() of app_dial
        and of app_queue's ``ringall``. Each callee is driven by its endpoint script: a
        busy (486) or congested (503) one fails at once (``DialEnd BUSY``/``CONGESTION``,
        ``on_fail(index, status)``, ``Hangup`` cause 17/34); an unreachable one never
        rings; the others ring (``Newstate Ringing``, ``DialState RINGING``) and the one
        with the shortest ``ring_s`` within ``timeout`` answers (``Newstate Up``).

        Returns ``(outcome, ringing, winner)``: outcome ``ANSWER``, ``NOANSWER`` (timeout),
        ``CANCEL`` (the caller hung up or was redirected) or ``FAILED`` (every callee
        failed at once); ``ringing`` the indices of the callees still up (the winner's
        included); ``winner`` its index or -1. The caller emits the final DialEnd events
        and hangs up the rest."""
        ring_start = self.clock.now()
        ringing: list[int] = []
        for i, (ep, callee) in enumerate(calls):
            if ep.busy or ep.congested:
                status = "BUSY" if ep.busy else "CONGESTION"
                callee.hangup_cause = 17 if ep.busy else 34
                self.emit_two("DialEnd", chan, callee, [("DialStatus", status)])
                if on_fail is not None:
                    on_fail(i, status)
                self.destroy(callee)
                continue
            if not ep.unreachable:
                if callee.state != 5:
                    self.set_state(callee, 5)
                # A Local ;2 dialing (the attended transfer target, 06c): ;1 rings too.
                local = chan.local_half == 2 and self._local_ringing(chan, callee)
                self.emit_two("DialState", chan, callee, [("DialStatus", "RINGING")])
                if local and chan.local_peer is not None and chan.local_peer.local_dialed:
                    self.emit_two("DialState", None, chan.local_peer, [("DialStatus", "RINGING")])
            ringing.append(i)
        if not ringing:
            return "FAILED", [], -1
        answering = sorted((calls[i][0].ring_s, i) for i in ringing
                           if calls[i][0].answer and not calls[i][0].unreachable
                           and (timeout is None or calls[i][0].ring_s <= timeout))

        def gone(c: Channel) -> bool:
            return c.hungup or c.hangup_requested

        while True:
            alive = [(t, i) for t, i in answering if not gone(calls[i][1])]
            if alive:
                deadline: float | None = ring_start + alive[0][0]
            else:
                deadline = None if timeout is None else ring_start + timeout
            left = None if deadline is None else deadline - self.clock.now()
            if left is not None and left <= 0:
                break
            await chan.wait(self.clock, left)
            if chan.interrupted:
                for i in ringing:
                    calls[i][1].hangup_cause = 0
                return "CANCEL", ringing, -1
        ringing = [i for i in ringing if not calls[i][1].hungup]
        if alive:
            won = alive[0][1]
            winner = calls[won][1]
            self.set_state(winner, 6)
            winner._driven = False  # type: ignore[attr-defined]
            return "ANSWER", ringing, won
        for i in ringing:
            calls[i][1].hangup_cause = 0
        return "NOANSWER", ringing, -1

    def _schedule_endpoint_hangup(self, chan: Channel, ep: Endpoint) -> None:
        if ep.hangup_after is None:
            return
        delay = ep.hangup_after

        async def later() -> None:
            await self.clock.sleep(delay)
            if not chan.hungup:
                self.remote_hangup(chan)

        self.spawn(later(), f"hangup-after {chan.name}")

    # ------------------------------------------------------------------ Queue
    def _member_available(self, member: QueueMember) -> bool:
        if member.paused:
            return False
        ep = member.interface.partition("/")[2]
        return not any(c.endpoint == ep for c in self.channels.values())

    def _pick_member(self, queue: QueueConfig, tried: set[str]) -> QueueMember | None:
        members = queue.members
        if not members:
            return None
        if queue.strategy == "rrmemory":
            order = members[queue.rr_next:] + members[: queue.rr_next]
        else:
            order = list(members)
        for m in order:
            if self._member_available(m):
                return m
        return None

    def _member_event(self, queue: QueueConfig, m: QueueMember) -> Fields:
        return [("Queue", queue.name), ("Interface", m.interface), ("MemberName", m.name)]

    def _ringall_members(self, queue: QueueConfig) -> list[QueueMember]:
        """``ringall``: every available member of the best (lowest) penalty."""
        avail = [m for m in queue.members if self._member_available(m)
                 and m.interface.partition("/")[2] in self.endpoints]
        if not avail:
            return []
        best = min(m.penalty for m in avail)
        return [m for m in avail if m.penalty == best]

    def _call_member(self, chan: Channel, queue: QueueConfig, member: QueueMember, ep: Endpoint,
                     opts: str) -> Channel:
        """``ring_entry``: the member leg, ``AgentCalled``, ``DialBegin`` (04, 05)."""
        callee = self._new_callee(chan, ep, "")
        for key, value in chan.inheritable().items():
            self.set_var(callee, key, value, event_first=True)
        callee.connected_num, callee.connected_name = chan.caller_num, chan.caller_name
        callee.exten = chan.exten
        self.emit_two("AgentCalled", chan, callee, self._member_event(queue, member), "agent,all")
        callee.exten = "s"
        callee.connected_num = callee.connected_name = "<unknown>"
        self.emit_two("DialBegin", chan, callee, [("DialString", member.interface)])
        callee.exten = chan.exten
        callee.connected_num, callee.connected_name = chan.caller_num, chan.caller_name
        callee.xfer_features = "t" in opts
        return callee

    async def _ring_all(self, chan: Channel, queue: QueueConfig, members: list[QueueMember], opts: str,
                        ) -> tuple[str, list[tuple[QueueMember, Endpoint, Channel]], int]:
        """``ringall``: every member is called (``ring_one``: ``AgentCalled`` and
        ``DialBegin`` each), then all ring at once through :meth:`_ring_many`, the first
        to answer wins. Returns ``(ANSWER|NOANSWER|CANCEL, ringing calls, winner index)``;
        busy members are dropped at once (``DialEnd BUSY``, ``AgentRingNoAnswer``)."""
        calls = []
        for member in members:
            ep = self.endpoints[member.interface.partition("/")[2]]
            calls.append((member, ep, self._call_member(chan, queue, member, ep, opts)))

        def rna(i: int, _: str) -> None:
            member, _ep, callee = calls[i]
            self.emit_two("AgentRingNoAnswer", chan, callee, [
                *self._member_event(queue, member), ("RingTime", "0")], "agent,all")

        outcome, ringing, won = await self._ring_many(chan, [(ep, c) for _, ep, c in calls], queue.timeout, rna)
        ring_calls = [calls[i] for i in ringing]
        if outcome == "ANSWER":
            return "ANSWER", ring_calls, ringing.index(won)
        return ("NOANSWER" if outcome == "FAILED" else outcome), ring_calls, -1

    async def app_queue(self, chan: Channel, data: str) -> int:
        args = split_args(data) + [""] * 5
        qname, opts = args[0], args[1]
        queue = self.queues.get(qname)
        if queue is None:
            raise DialplanError(f"Queue({qname}): no such queue in the simulator config")
        qtimeout = float(args[4]) if args[4].strip() else None
        callers = self.queue_callers.setdefault(qname, [])
        callers.append(chan)
        joined = chan.queue_joined = self.clock.now()
        self.emit_chan("QueueCallerJoin", chan, [
                ("Queue", qname),
                ("Position", str(len(callers))),
                ("Count", str(len(callers)))], "agent,all")
        self.emit_chan("MusicOnHoldStart", chan, [("Class", queue.musicclass)])
        moh_on = True

        def leave() -> None:
            pos = callers.index(chan) + 1 if chan in callers else 1
            if chan in callers:
                callers.remove(chan)
            chan.queue_joined = None
            self.emit_chan("QueueCallerLeave", chan, [
                    ("Queue", qname),
                    ("Position", str(pos)),
                    ("Count", str(len(callers)))], "agent,all")

        def abandon() -> None:
            nonlocal moh_on
            queue.abandoned += 1
            pos = callers.index(chan) + 1 if chan in callers else 1
            self.emit_chan("QueueCallerAbandon", chan, [
                    ("Queue", qname),
                    ("Position", str(pos)),
                    ("OriginalPosition", str(pos)),
                    ("HoldTime", str(int(self.clock.now() - joined)))], "agent,all")
            leave()

        def timed_out() -> bool:
            return qtimeout is not None and self.clock.now() - joined >= qtimeout

        while True:
            if chan.interrupted:
                if moh_on and not chan.hungup:
                    self.emit_chan("MusicOnHoldStop", chan)
                if chan.hangup_requested:
                    abandon()
                    return -1
                leave()
                return 0
            if timed_out():
                self.emit_chan("MusicOnHoldStop", chan)
                leave()
                self.set_var(chan, "QUEUESTATUS", "TIMEOUT")
                return 0
            if queue.strategy == "ringall":
                members = self._ringall_members(queue) if callers and callers[0] is chan else []
                if not members:
                    await chan.wait(self.clock, 1.0)  # app_queue's one-second polling grid
                    continue
                ring_start = self.clock.now()
                outcome, ringing, won = await self._ring_all(chan, queue, members, opts)
                if outcome == "ANSWER":
                    member, ep, callee = ringing[won]
                    self.emit_two("DialEnd", chan, callee, [("DialStatus", "ANSWER")])
                    # wait_for_answer, then hangupcalls()
                    self._hang_up_losers(chan, [c for i, (_, _, c) in enumerate(ringing) if i != won], queue=True)
                    break
                if outcome == "CANCEL":
                    moh_on = False
                    self.emit_chan("MusicOnHoldStop", chan)
                    for status in ("CANCEL", "CANCEL"):
                        for _, _, callee in ringing:
                            self.emit_two("DialEnd", chan, callee, [("DialStatus", status)])
                    for _, _, callee in ringing:
                        asyncio.get_running_loop().call_soon(self.destroy, callee)
                    if chan.hangup_requested:
                        abandon()
                        return -1
                    leave()
                    return 0
                ring_ms = int((self.clock.now() - ring_start) * 1000)
                for member, _, callee in ringing:  # rna() for each, then NOANSWER, CANCEL
                    self.emit_two("AgentRingNoAnswer", chan, callee, [
                            *self._member_event(queue, member),
                            ("RingTime", str(ring_ms))], "agent,all")
                for _, _, callee in ringing:
                    self.emit_two("DialEnd", chan, callee, [("DialStatus", "NOANSWER")])
                for _, _, callee in ringing:
                    self.emit_two("DialEnd", chan, callee, [("DialStatus", "CANCEL")])
                    self.destroy(callee)
                await chan.wait(self.clock, queue.retry)
                continue
            picked = self._pick_member(queue, set()) if callers and callers[0] is chan else None
            if picked is None:
                await chan.wait(self.clock, 1.0)  # app_queue's one-second polling grid
                continue
            found = self.endpoints.get(picked.interface.partition("/")[2])
            if found is None:
                await chan.wait(self.clock, queue.retry)
                continue
            member, ep = picked, found
            if queue.strategy == "rrmemory":
                idx = queue.members.index(member)
                queue.rr_next = (idx + 1) % len(queue.members)
            callee = self._call_member(chan, queue, member, ep, opts)
            ring_start = self.clock.now()
            outcome = await self._ring(chan, callee, ep, queue.timeout)
            if outcome == "ANSWER":
                self.emit_two("DialEnd", chan, callee, [("DialStatus", "ANSWER")])
                break
            if outcome == "CANCEL":
                # Caller gone while the member rang (05): MOH stops, DialEnd CANCEL
                # twice, abandon; the member leg goes after the caller's soft hangup.
                moh_on = False
                self.emit_chan("MusicOnHoldStop", chan)
                self.emit_two("DialEnd", chan, callee, [("DialStatus", "CANCEL")])
                self.emit_two("DialEnd", chan, callee, [("DialStatus", "CANCEL")])
                asyncio.get_running_loop().call_soon(self.destroy, callee)
                if chan.hangup_requested:
                    abandon()
                    return -1
                leave()
                return 0
            ring_ms = int((self.clock.now() - ring_start) * 1000)
            # Reproduce 05: AgentRingNoAnswer, then DialEnd NOANSWER and DialEnd CANCEL.
            self.emit_two("AgentRingNoAnswer", chan, callee, [
                    *self._member_event(queue, member),
                    ("RingTime", str(ring_ms))], "agent,all")
            self.emit_two("DialEnd", chan, callee, [("DialStatus", "NOANSWER")])
            self.emit_two("DialEnd", chan, callee, [("DialStatus", "CANCEL")])
            self.destroy(callee)
            await chan.wait(self.clock, queue.retry)
        # Answered.
        self.emit_chan("MusicOnHoldStop", chan)
        chan.connected_num, chan.connected_name = ep.callerid_num, ep.callerid_name
        hold = int(self.clock.now() - joined)
        ringtime = max(0, int(self.clock.now() - ring_start))
        # recalc_holdtime(): the first value as is, then 3/4 old + 1/4 new.
        first = queue.completed + queue.abandoned == 0
        queue.holdtime = hold if first else (queue.holdtime * 3 + hold) >> 2
        leave()
        self.emit_two("AgentConnect", chan, callee, [
                *self._member_event(queue, member),
                ("HoldTime", str(hold)),
                ("RingTime", str(ringtime))], "agent,all")
        member.calls_taken += 1
        member.last_call = int(self.clock.now())
        bridge = self.bridge_create("queue")
        chan.xfer_features = "T" in opts  # Queue option T: the caller may transfer
        self.bridge_enter(bridge, callee)
        self.bridge_enter(bridge, chan)
        self._schedule_endpoint_hangup(callee, ep)
        talk_start = self.clock.now()
        chan._bridge_owner = True  # type: ignore[attr-defined]
        try:
            while self.still_bridged(chan, bridge) and not chan.interrupted:
                await chan.wait(self.clock, None)
        finally:
            chan._bridge_owner = False  # type: ignore[attr-defined]
            chan.xfer_features = False
        reason = "caller" if chan.hangup_requested else ("transfer" if chan.async_goto else "agent")
        self.emit_two("AgentComplete", chan, callee, [
                *self._member_event(queue, member),
                ("HoldTime", str(hold)),
                ("TalkTime", str(int(self.clock.now() - talk_start))),
                ("Reason", reason)], "agent,all")
        talk = int(self.clock.now() - talk_start)
        queue.completed += 1
        queue.talktime = talk if queue.completed == 1 else (queue.talktime * 3 + talk) >> 2
        if chan.bridge is bridge or (chan.bridge is not None and chan.bridge.kind == "atxfer"):
            self.bridge_leave(chan)
        # app_queue lets the member leg go before the caller (04).
        for _ in range(3):
            await asyncio.sleep(0)
        return -1 if chan.hangup_requested else 0

    # ------------------------------------------------------------------ Originate
    async def originate(self, *, channel: str, context: str, exten: str, priority: int,
                        application: str | None, app_data: str, callerid: str, timeout: float,
                        variables: list[str], channel_id: str | None, action_id: str | None) -> bool:
        """AMI Originate. Emits ``OriginateResponse`` (with ``action_id``) and returns
        success. The channel runs the dialplan only after the response (17)."""
        parsed = self._parse_target(channel)
        ep = self.endpoints.get(parsed[0]) if parsed else None
        if parsed is None or ep is None or not self.reachable(ep):
            self._originate_response(action_id, "Failure", None, channel, context, exten, 0, callerid)
            return False
        chan = self.new_channel(ep.name, context=ep.context, exten="s", caller_num=ep.callerid_num,
                                caller_name=ep.callerid_name, state=0, uniqueid=channel_id)
        chan._driven = True  # type: ignore[attr-defined]
        for var in variables:
            name, _, value = var.partition("=")
            self.set_var(chan, name.strip(), value)
        if callerid:
            cname, num = _parse_callerid(callerid)
            chan.caller_num, chan.caller_name = num or chan.caller_num, cname
            chan.connected_num, chan.connected_name = num or chan.caller_num, cname
            self.emit_chan("NewCallerid", chan, [("CID-CallingPres", "0 (Presentation Allowed, Not Screened)")])
        dialstring = channel.partition("/")[2]
        self.emit_two("DialBegin", None, chan, [("DialString", dialstring)])
        outcome = await self._ring(None, chan, ep, timeout)
        if outcome != "ANSWER":
            if not chan.hungup:
                chan.hangup_cause = 19 if outcome == "NOANSWER" else 0
                self.destroy(chan)
            reason = {"NOANSWER": 3, "BUSY": 5}.get(outcome, 0)
            self._originate_response(action_id, "Failure", None, channel, context, exten, reason, callerid)
            return False
        self.emit_two("DialEnd", None, chan, [("DialStatus", "ANSWER")])
        self._originate_response(action_id, "Success", chan, channel, context, exten, 4, callerid)
        chan._driven = False  # type: ignore[attr-defined]
        if application:
            chan.has_pbx = True

            async def run_app() -> None:
                try:
                    await self.exec_app(chan, application, app_data)
                finally:
                    chan.has_pbx = False
                await self._pbx_end(chan)

            self.spawn(run_app(), f"originate-app {chan.name}")
        else:
            chan.context, chan.exten, chan.priority = context, exten, priority
            self._schedule_endpoint_hangup(chan, ep)
            self.start_pbx(chan)
        return True

    def _originate_response(self, action_id: str | None, response: str, chan: Channel | None,
                            channel: str, context: str, exten: str, reason: int, callerid: str) -> None:
        if action_id == "":  # synchronous Originate: no OriginateResponse event (06d)
            return
        fields: Fields = []
        if action_id is not None:
            fields.append(("ActionID", action_id))
        cname, num = _parse_callerid(callerid) if callerid else ("", "")
        fields += [
            ("Response", response),
            ("Channel", chan.name if chan else channel),
            ("Context", context),
            ("Exten", exten),
            ("Reason", str(reason)),
            ("Uniqueid", chan.uniqueid if chan else "<unknown>"),
            ("CallerIDNum", (chan.caller_num if chan else num) or "<unknown>"),
            ("CallerIDName", (chan.caller_name if chan else cname) or "<unknown>"),
        ]
        if chan is not None:
            fields += chan.chanvar_lines(f"ChanVariable({chan.name})")
        self.emit("OriginateResponse", "call,all", fields)

    # ------------------------------------------------------------------ Local channels, Atxfer
    def new_local_pair(self, exten: str, context: str, *, linkedid: str) -> tuple[Channel, Channel]:
        """``Local/<exten>@<context>-<n>;1`` (Down) and ``;2`` (Ring), their own name
        counter, Uniqueids from the shared one (06c)."""
        base = f"Local/{exten}@{context}-{self._local_seq:08x}"
        self._local_seq += 1
        halves: list[Channel] = []
        for half, state in ((1, 0), (2, 4)):
            chan = Channel(
                name=f"{base};{half}", uniqueid=self.new_uniqueid(), linkedid=linkedid,
                endpoint=f"{exten}@{context}", context=context, exten=exten, caller_num="",
                caller_name="", state=state, clock=self.clock, channelvars=self.channelvars,
            )
            chan.local_half = half
            self.channels[chan.name] = chan
            halves.append(chan)
        one, two = halves
        one.local_peer, two.local_peer = two, one
        for chan in halves:
            self.emit_chan("Newchannel", chan)
        return one, two

    def _local_ringing(self, two: Channel, callee: Channel) -> bool:
        """``;2``'s callee rings: ``;1`` goes Ringing, twice reported (06c)."""
        one = two.local_peer
        if one is None or one.hungup or one.state >= 5:
            return False
        one.caller_num, one.caller_name = callee.caller_num, callee.caller_name
        two.connected_num, two.connected_name = callee.caller_num, callee.caller_name
        self.emit_chan("NewConnectedLine", two)
        if one.bridge is not None:
            for peer in one.bridge.others(one):
                peer.connected_num, peer.connected_name = callee.caller_num, callee.caller_name
                self.emit_chan("NewConnectedLine", peer)
        one.state = 5
        for _ in range(2):
            self.emit_chan("Newstate", one)
            self.emit_chan("NewCallerid", one, [("CID-CallingPres", "0 (Presentation Allowed, Not Screened)")])
        self._refresh_device(one.endpoint, one.tech)
        return True

    def _local_answered(self, two: Channel) -> None:
        """``;2`` is answered: ``;1`` is Up first (and its requester sees ``DialEnd``)."""
        one = two.local_peer
        if one is None or one.hungup or one.state == 6:
            return
        one.state = 6
        one.answered_at = self.clock.now()
        self.emit_chan("Newstate", one)
        if one.local_dialed:
            self.emit_two("DialEnd", None, one, [("DialStatus", "ANSWER")])
        one.wake()

    def maybe_optimize_local(self, one: Channel) -> None:
        """Schedule the optimisation of a Local pair once both halves are in two-party
        bridges (06c: after the attended transfer completed)."""
        two = one.local_peer
        if (two is None or not one.local_optimize or one.bridge is None or two.bridge is None
                or len(one.bridge.channels) != 2 or len(two.bridge.channels) != 2):
            return
        asyncio.get_running_loop().call_soon(optimize_local, self, one)

    def next_optimization_id(self) -> int:
        opt_id = self._local_opt_id
        self._local_opt_id += 1
        return opt_id

    def atxfer(self, chan: Channel, code: str, exten: str) -> None:
        """AMI ``Atxfer``: ``code`` (the ``atxfer`` feature) and ``exten`` are queued on
        ``chan`` as DTMF; see :mod:`ctid.simulator.transfer`."""
        self.spawn(run_atxfer(self, chan, code, exten), f"atxfer {chan.name}")

    # ------------------------------------------------------------------ Bridge action
    def bridge_channels(self, a: Channel, b: Channel) -> None:
        """AMI ``Bridge``: both channels leave what they run, and get an after-bridge
        location at their next priority (15). ``BridgeCreate`` comes first, then the
        held channel's ``MusicOnHoldStop``, then both ``BridgeEnter``."""
        bridge = self.bridge_create("action")
        for chan in (a, b):
            chan.after_bridge = Location(chan.context, chan.exten, chan.priority + 1)
            chan._pending_bridge = True  # type: ignore[attr-defined]
            if chan.bridge is not None:
                self.bridge_leave(chan)
            chan.wake()

        async def join() -> None:
            for _ in range(50):
                if not a.has_pbx and not b.has_pbx:
                    break
                await asyncio.sleep(0)
            a._pending_bridge = None  # type: ignore[attr-defined]
            b._pending_bridge = None  # type: ignore[attr-defined]
            for chan in (a, b):
                loc = chan.after_bridge
                if loc is not None:
                    chan.context, chan.exten, chan.priority = loc.context, loc.exten, loc.priority
                chan.application, chan.app_data = "", ""
                chan.clear_wake()
                self.bridge_enter(bridge, chan)

        self.spawn(join(), "bridge-action")

    # ------------------------------------------------------------------ call generator helpers
    def inbound(self, *, dnis: str, caller: str, caller_name: str, endpoint: str = "trunk",
                context: str | None = None) -> Channel:
        ep = self.endpoints.get(endpoint)
        ctx = context or (ep.context if ep else "from-trunk")
        chan = self.new_channel(endpoint, context=ctx, exten=dnis, caller_num=caller,
                                caller_name=caller_name, state=4)
        chan.dnid = dnis
        self.start_pbx(chan)
        return chan

    def random_id(self) -> int:
        return random.randint(100000000, 2147483647)


def _parse_callerid(text: str) -> tuple[str, str]:
    text = text.strip()
    if "<" in text and text.endswith(">"):
        name, _, num = text[:-1].rpartition("<")
        return name.strip().strip('"'), num.strip()
    return "", text


__all__ = ["GOTO", "PBX", "split_app"]


def _filter_chars(spec: str) -> set[str]:
    """The character set of ``FILTER(<allowed>,...)``: literal characters and ``a-b``
    ranges, as func_strings.c reads them (a backslash escapes the next character)."""
    chars: set[str] = set()
    i = 0
    while i < len(spec):
        c = spec[i]
        if c == "\\" and i + 1 < len(spec):
            c = spec[i + 1]
            i += 1
        if i + 2 < len(spec) and spec[i + 1] == "-":
            end = spec[i + 2]
            chars.update(chr(x) for x in range(ord(c), ord(end) + 1))
            i += 3
            continue
        chars.add(c)
        i += 1
    return chars

