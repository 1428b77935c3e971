"""Attended transfer (AMI ``Atxfer``) and Local channel optimisation, as in capture 06c.

What Asterisk 22 does, and what is reproduced here (06c: Originate agent1001 -> 1002,
``Atxfer`` of agent1001 to 1003, agent1001 hangs up):

1. ``Atxfer`` queues the ``atxfer`` feature code and the digits as DTMF frames on the
   transferer: ``DTMFEnd`` events (``DurationMs: 0``, no ``DTMFBegin``). The feature hook
   exists only when the transferer is in a bridge with DTMF transfer features (Dial/Queue
   option ``T`` for the caller, ``t`` for the callee); otherwise the digits are just
   DTMF (an application reading digits gets them).
2. After the code: ``Hold`` on the transferer, ``MusicOnHoldStart`` on the transferee.
   After the digits: a ``Local/<exten>@<context>-<n>;1`` / ``;2`` pair (``;1`` Down,
   ``;2`` Ring, both with the transferer's Linkedid), a consultation bridge,
   ``LocalBridge``, ``;2`` runs the dialplan at the target, ``;1`` enters the
   consultation bridge and the transferer moves there from the original bridge.
3. ``;1`` follows ``;2``'s Dial: two ``Newstate Ringing`` and a ``DialState RINGING`` with
   no calling channel when the target rings, ``Newstate Up`` and ``DialEnd ANSWER`` when it
   answers (both before ``;2``'s own ``Newstate Up``).
4. The transferer hangs up: ``MusicOnHoldStop`` (transferee), ``BridgeLeave``,
   ``SoftHangupRequest``, ``BridgeMerge`` (consultation bridge into the original one),
   ``;1`` moves over, ``AttendedTransfer`` (``OrigTransferer*``, ``OrigBridge*``,
   ``SecondTransferer*``, ``SecondBridge*``, ``Transferee*``, ``TransferTarget*``,
   ``IsExternal: No``, ``DestType: Bridge``, ``DestBridgeUniqueid``), ``BridgeDestroy`` of
   the consultation bridge, ``Hangup`` of the transferer.
5. Local optimisation: ``LocalOptimizationBegin`` (``Source`` = the target), the target
   swaps into ``;1``'s place (``BridgeEnter`` with ``SwapUniqueid``),
   ``LocalOptimizationEnd`` (``Success: No``, as captured), ``HangupRequest`` (Cause 16)
   on ``;2``, ``;2`` leaves its Dial bridge, ``Hangup ;1``, ``SoftHangupRequest`` and
   ``Hangup`` of ``;2``. The transferee and the target stay in the original bridge.

Not in a capture, so modelled on bridge_basic's documented behaviour and kept simple:
an extension that does not exist in the transfer context (``Unhold`` + the transferee's
MOH stops, nothing else), the target hanging up or not answering within
``atxfernoanswertimeout`` (the transferer is put back into the original bridge with
``Unhold``), and the transferer hanging up while the target still rings (the transfer
completes the same way; the Local pair is optimised once ``;2`` is bridged).
``transferdigittimeout`` is not waited for: the digits are complete when queued.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ctid.simulator.channels import Bridge, Channel

if TYPE_CHECKING:
    from ctid.simulator.pbx import PBX


def dtmf_end(pbx: PBX, chan: Channel, digit: str) -> None:
    """A DTMF frame queued on ``chan`` (AMI Atxfer): ``DTMFEnd`` only, duration 0."""
    pbx.emit_chan("DTMFEnd", chan, [("Digit", digit), ("DurationMs", "0"), ("Direction", "Received")],
                  "dtmf,all")


async def run_atxfer(pbx: PBX, transferer: Channel, code: str, exten: str) -> None:
    """The DTMF frames of the AMI Atxfer action reach the transferer's bridge channel."""
    await asyncio.sleep(0)  # frames are read after the action's response went out
    if transferer.hungup:
        return
    bridge = transferer.bridge
    hooked = (bridge is not None and bridge.kind != "atxfer" and transferer.xfer_features
              and transferer.atxfer is None and len(bridge.channels) == 2)
    if bridge is None or not hooked:
        for digit in code + exten:
            dtmf_end(pbx, transferer, digit)
            if bridge is None:
                transferer.dtmf.put_nowait(digit)  # whatever application runs reads them
        return
    for digit in code:
        dtmf_end(pbx, transferer, digit)
    transferee = next(iter(bridge.others(transferer)))
    await AttendedTransfer(pbx, transferer, transferee, bridge).run(exten)


class AttendedTransfer:
    """One attended transfer; the :class:`~ctid.simulator.channels.BridgeHooks` of its
    consultation bridge."""

    def __init__(self, pbx: PBX, transferer: Channel, transferee: Channel, orig: Bridge) -> None:
        self.pbx = pbx
        self.transferer = transferer
        self.transferee = transferee
        self.orig = orig
        self.consult: Bridge | None = None
        self.one: Channel | None = None
        self.two: Channel | None = None
        self.state = "dialing"  # dialing -> consulting -> completing/done | failed

    # -- start ---------------------------------------------------------------------------
    async def run(self, exten: str) -> None:
        pbx, t, e = self.pbx, self.transferer, self.transferee
        t.atxfer = self
        self.orig.held_by_transfer = True
        pbx.emit_chan("Hold", t)
        pbx.emit_chan("MusicOnHoldStart", e, [("Class", "default")])
        pbx.set_device(f"{e.tech}/{e.endpoint}", "ONHOLD")
        for digit in exten:
            dtmf_end(pbx, t, digit)
        context = t.get_var("TRANSFER_CONTEXT") or t.context
        if t.interrupted or e.hungup or pbx.dialplan.find_extension(context, exten) is None:
            # Asterisk plays pbx-invalid to the transferer and returns to the call.
            self._unhold()
            self._finish("failed")
            return
        one, two = pbx.new_local_pair(exten, context, linkedid=t.linkedid)
        self.one, self.two = one, two
        one.local_dialed = True
        pbx.set_var(one, "TRANSFERERNAME", t.name)
        pbx.set_var(one, "ATTENDEDTRANSFER", t.name)
        consult = pbx.bridge_create("atxfer")
        consult.hooks = self
        self.consult = consult
        pbx.set_var(two, "ATTENDEDTRANSFER", t.name)
        pbx.set_var(two, "TRANSFERERNAME", t.name)
        two.caller_num, two.caller_name = t.caller_num, t.caller_name
        pbx.emit_chan("NewCallerid", two, [("CID-CallingPres", "0 (Presentation Allowed, Not Screened)")])
        pbx.emit("LocalBridge", "call,all", [
            *one.snapshot("LocalOne", with_vars=False), *two.snapshot("LocalTwo", with_vars=False),
            ("Context", context), ("Exten", exten), ("LocalOptimization", "Yes")])
        one.connected_num, one.connected_name = t.caller_num, t.caller_name
        pbx.emit_chan("NewConnectedLine", one)
        pbx.start_pbx(two)
        pbx.bridge_enter(consult, one)
        pbx.set_var(one, "ATTENDEDTRANSFER", "")
        pbx.bridge_leave(t, quiet=True)
        pbx.bridge_enter(consult, t)
        self.state = "consulting"
        await self._wait_answer(one)

    async def _wait_answer(self, one: Channel) -> None:
        clock = self.pbx.clock
        deadline = clock.now() + self.pbx.features.atxfernoanswertimeout
        while self.state == "consulting" and one.state != 6 and not one.hungup:
            left = deadline - clock.now()
            if left <= 0:
                # atxfernoanswertimeout: the target leg is dropped, back to the transferee.
                self.pbx.remote_hangup(one, 16)
                return
            await one.wait(clock, left)

    # -- BridgeHooks of the consultation bridge -------------------------------------------
    def before_leave(self, bridge: Bridge, chan: Channel) -> None:
        if self.state == "consulting" and chan is self.transferer:
            self._unhold(event=False)

    def after_leave(self, bridge: Bridge, chan: Channel) -> bool:
        if self.state != "consulting":
            return False
        if chan is self.transferer:
            # The transferer hung up (or left): complete the transfer.
            self.state = "completing"
            asyncio.get_running_loop().call_soon(self._complete)
            return True
        if chan is self.one:
            # The target leg is gone before completion: back to the transferee.
            self._return_to_transferee()
            return True
        return False

    # -- outcomes ----------------------------------------------------------------------------
    def _unhold(self, *, event: bool = True) -> None:
        e = self.transferee
        if event:
            self.pbx.emit_chan("Unhold", self.transferer)
        if not e.hungup:
            self.pbx.emit_chan("MusicOnHoldStop", e)
            self.pbx._refresh_device(e.endpoint, e.tech)

    def _finish(self, state: str) -> None:
        self.state = state
        self.orig.held_by_transfer = False
        if self.transferer.atxfer is self:
            self.transferer.atxfer = None
        self.transferer.wake()  # its Dial/Queue re-evaluates the bridge it waits on

    def _return_to_transferee(self) -> None:
        pbx, t, consult = self.pbx, self.transferer, self.consult
        assert consult is not None
        if t.bridge is consult:
            pbx.bridge_leave(t, quiet=True)
        pbx.bridge_destroy(consult)
        if not t.hungup and not self.orig.destroyed and not self.transferee.hungup:
            pbx.bridge_enter(self.orig, t)
            self._unhold()
        self._finish("failed")

    def _complete(self) -> None:
        pbx, t, e, one, consult = self.pbx, self.transferer, self.transferee, self.one, self.consult
        assert one is not None and consult is not None
        if e.hungup or e.bridge is not self.orig or one.hungup or one.bridge is not consult:
            # Nobody left to join: the consultation side is dropped.
            if not one.hungup:
                if one.bridge is consult:
                    pbx.bridge_leave(one, quiet=True)
                pbx.remote_hangup(one, 16)
            pbx.bridge_destroy(consult)
            self._finish("failed")
            return
        pbx.emit("BridgeMerge", "call,all", [*self.orig.block("To"), *consult.block("From")])
        pbx.bridge_leave(one, quiet=True)
        pbx.bridge_enter(self.orig, one)
        pbx.emit("AttendedTransfer", "call,all", [
            ("Result", "Success"),
            *t.snapshot("OrigTransferer", with_vars=False), *self.orig.block("Orig"),
            *t.snapshot("SecondTransferer", with_vars=False), *consult.block("Second"),
            *e.snapshot("Transferee", with_vars=False), *one.snapshot("TransferTarget", with_vars=False),
            ("IsExternal", "No"), ("DestType", "Bridge"), ("DestBridgeUniqueid", self.orig.uniqueid)])
        pbx.bridge_destroy(consult)
        self._finish("done")
        e.connected_num, e.connected_name = one.caller_num, one.caller_name
        one.connected_num, one.connected_name = e.caller_num, e.caller_name
        pbx.emit_chan("NewConnectedLine", e)
        pbx.emit_chan("NewConnectedLine", one)
        two = one.local_peer
        if two is not None and two.bridge is not None:
            for far in two.bridge.others(two):  # the target learns who it talks to now
                far.connected_num, far.connected_name = e.caller_num, e.caller_name
                pbx.emit_chan("NewConnectedLine", far)
        one.local_optimize = True
        pbx.maybe_optimize_local(one)


class LocalTeardown:
    """Hooks put on ``;2``'s bridge by the optimisation: when ``;2`` has left it, the
    swapped-out ``;1`` is hung up (06c: ``Hangup ;1`` between ``;2``'s ``BridgeDestroy``
    and its ``SoftHangupRequest``)."""

    def __init__(self, pbx: PBX, one: Channel, two: Channel) -> None:
        self.pbx, self.one, self.two = pbx, one, two

    def before_leave(self, bridge: Bridge, chan: Channel) -> None:
        return None

    def after_leave(self, bridge: Bridge, chan: Channel) -> bool:
        if chan is self.two and not self.one.hungup:
            self.pbx.destroy(self.one)
        return False


def optimize_local(pbx: PBX, one: Channel) -> None:
    """Swap the Local pair out: the channel bridged with ``;2`` takes ``;1``'s place."""
    two = one.local_peer
    b1 = one.bridge
    b3 = two.bridge if two is not None else None
    if (not one.local_optimize or two is None or b1 is None or b3 is None or one.hungup or two.hungup
            or two.hangup_requested):
        return
    sources = [c for c in b3.channels if c is not two]
    if len(sources) != 1 or len(b1.channels) != 2:
        return
    source = sources[0]
    one.local_optimize = False
    opt_id = pbx.next_optimization_id()
    pbx.emit("LocalOptimizationBegin", "call,all", [
        *one.snapshot("LocalOne", with_vars=False), *two.snapshot("LocalTwo", with_vars=False),
        *source.snapshot("Source", with_vars=False), ("DestUniqueId", two.uniqueid), ("Id", str(opt_id))])
    pbx.bridge_leave(source, quiet=True)
    pbx.bridge_leave(one, quiet=True)
    pbx.bridge_enter(b1, source, swap=one)
    two.caller_num, two.caller_name = one.connected_num, one.connected_name
    pbx.emit_chan("NewCallerid", two, [("CID-CallingPres", "0 (Presentation Allowed, Not Screened)")])
    pbx.emit("LocalOptimizationEnd", "call,all", [
        *one.snapshot("LocalOne", with_vars=False), *two.snapshot("LocalTwo", with_vars=False),
        ("Success", "No"), ("Id", str(opt_id))])
    b3.hooks = LocalTeardown(pbx, one, two)
    pbx.remote_hangup(two, 16)
