"""app_dial in the simulator beyond the captures (which have single-target Dials only):
``Dial(A&B)`` rings every target at once and the first to answer wins, DIALSTATUS as
app_dial sets it, and the options ``g``, ``t`` and ``T`` on a Dial that is not in a
queue (driven through the dialplan and the real AMI socket).

The event order of a multi-target Dial is app_dial's: every channel is requested
(``Newchannel``) before the first ``DialBegin``; when one answers, the others get
``DialEnd CANCEL`` (wait_for_answer) and are hung up with cause 26 (hanguptree), then
``DIALSTATUS=ANSWER`` and the winner's ``DialEnd ANSWER``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ctid.asterisk.ami_protocol import Message
from ctid.simulator import Dialplan, DialplanError, Simulator
from ctid.simulator.config import default_endpoints
from ctid.simulator.dialplan import parse_options
from tests.test_simulator_scenarios import Recorder
from tests.test_simulator_transfer import act

FEATURES = Path(__file__).parent / "fixtures" / "asterisk22" / "asterisk-conf-used" / "features.conf"
SCALE = 0.01
TRUNK = "PJSIP/trunk-00000000"
A1, A2, A3 = "PJSIP/agent1001-00000001", "PJSIP/agent1002-00000002", "PJSIP/agent1003-00000003"


def plan(dial: str) -> Dialplan:
    return Dialplan.from_text(f"""
[from-trunk]
exten => 600,1,Answer()
 same => n,Dial({dial})
 same => n,Set(AFTER=${{DIALSTATUS}})
 same => n,Hangup()
[from-agents]
exten => 1003,1,Dial(PJSIP/agent1003,20)
 same => n,Hangup()
""")


def trail(events: list[Message], chan: str) -> list[str]:
    """Dial and hangup events of one callee, in order."""
    out = []
    for m in events:
        if m.get("DestChannel") == chan and m.name in ("DialBegin", "DialState", "DialEnd"):
            out.append(f"{m.name} {m.get('DialStatus') or ''}".strip())
        elif m.get("Channel") == chan and m.name in ("Newchannel", "Hangup"):
            out.append(m.name + (f" {m.get('Cause')}" if m.name == "Hangup" else ""))
    return out


def dialstatus(events: list[Message]) -> list[str]:
    return [m.get("Value") or "" for m in events
            if m.name == "VarSet" and m.get("Channel") == TRUNK and m.get("Variable") in ("DIALSTATUS", "AFTER")]


def index(events: list[Message], name: str, **match: str) -> int:
    return next(i for i, m in enumerate(events) if m.name == name and all(m.get(k) == v for k, v in match.items()))


async def test_dial_rings_every_target_first_answer_wins() -> None:
    eps = default_endpoints()
    eps["agent1001"].ring_s = 3.0  # agent1002 (1 s) answers first
    async with Simulator(dialplan=plan("PJSIP/agent1001&PJSIP/agent1002,20"), endpoints=eps,
                         time_scale=SCALE) as sim:
        sim.inbound_call(dnis="600", caller="+15551230001", hangup_after=5)
        await sim.wait_idle(timeout=10)
    ev = sim.events
    order = [(m.name, m.get("Channel") if m.name == "Newchannel" else m.get("DestChannel")) for m in ev
             if (m.name == "Newchannel" and m.get("Channel") != TRUNK) or m.name in ("DialBegin", "DialState")]
    # Every target is requested, then called, then both ring.
    assert order == [("Newchannel", A1), ("Newchannel", A2), ("DialBegin", A1), ("DialBegin", A2),
                     ("DialState", A1), ("DialState", A2)]
    assert trail(ev, A1) == ["Newchannel", "DialBegin", "DialState RINGING", "DialEnd CANCEL", "Hangup 26"]
    assert trail(ev, A2) == ["Newchannel", "DialBegin", "DialState RINGING", "DialEnd ANSWER", "Hangup 16"]
    answered = index(ev, "VarSet", Channel=TRUNK, Variable="DIALSTATUS", Value="ANSWER")
    assert (index(ev, "Newstate", Channel=A2, ChannelStateDesc="Up") < index(ev, "DialEnd", DestChannel=A1)
            < index(ev, "Hangup", Channel=A1) < answered
            < index(ev, "DialEnd", DestChannel=A2) < index(ev, "BridgeEnter", Channel=A2))
    peer = [m.get("Value") for m in ev
            if m.name == "VarSet" and m.get("Variable") == "DIALEDPEERNAME" and m.get("Value")]
    assert peer == [A2]
    hangup = next(m for m in ev if m.name == "Hangup" and m.get("Channel") == A1)
    assert hangup.get("Cause-txt") == "Answered elsewhere"
    assert not sim.errors


@pytest.mark.parametrize(("targets", "changes", "status", "trails"), [
    # Every line fails at once: BUSY wins over CONGESTION, CONGESTION over CHANUNAVAIL.
    ("PJSIP/agent1001&PJSIP/agent1002&PJSIP/nosuch", {"agent1001": "busy", "agent1002": "congested"}, "BUSY",
     {A1: ["Newchannel", "DialBegin", "DialEnd BUSY", "Hangup 17"],
      A2: ["Newchannel", "DialBegin", "DialEnd CONGESTION", "Hangup 34"]}),
    ("PJSIP/nosuch&PJSIP/agent1002", {"agent1002": "congested"}, "CONGESTION",
     {"PJSIP/agent1002-00000001": ["Newchannel", "DialBegin", "DialEnd CONGESTION", "Hangup 34"]}),
    # agent2001 has a dynamic AOR and never registered: no channel at all (07b).
    ("PJSIP/nosuch&PJSIP/agent2001&SIP/old", {}, "CHANUNAVAIL", {}),
    # One busy, one rings out: the Dial times out, NOANSWER.
    ("PJSIP/agent1001&PJSIP/agent1002", {"agent1001": "busy", "agent1002": "noanswer"}, "NOANSWER",
     {A1: ["Newchannel", "DialBegin", "DialEnd BUSY", "Hangup 17"],
      A2: ["Newchannel", "DialBegin", "DialState RINGING", "DialEnd NOANSWER", "Hangup 0"]}),
])
async def test_dial_status_when_nobody_answers(targets: str, changes: dict[str, str], status: str,
                                               trails: dict[str, list[str]]) -> None:
    eps = default_endpoints()
    for name, how in changes.items():
        if how == "noanswer":
            eps[name].answer = False
        else:
            setattr(eps[name], how, True)
    async with Simulator(dialplan=plan(f"{targets},3"), endpoints=eps, time_scale=SCALE) as sim:
        sim.inbound_call(dnis="600", caller="+15551230001")
        await sim.wait_idle(timeout=10)
    ev = sim.events
    assert dialstatus(ev) == ["", status, status]  # reset, set by Dial, read by the next priority
    callees = sorted({m.get("Channel") or "" for m in ev if m.name == "Newchannel"} - {TRUNK})
    assert callees == sorted(trails)
    for chan, expected in trails.items():
        assert trail(ev, chan) == expected
    assert not sim.errors


async def test_caller_hangs_up_while_all_targets_ring() -> None:
    eps = default_endpoints()
    eps["agent1001"].answer = eps["agent1002"].answer = False
    async with Simulator(dialplan=plan("PJSIP/agent1001&PJSIP/agent1002,20"), endpoints=eps,
                         time_scale=SCALE) as sim:
        sim.inbound_call(dnis="600", caller="+15551230001", hangup_after=2)
        await sim.wait_idle(timeout=10)
    ev = sim.events
    for chan in (A1, A2):
        assert trail(ev, chan) == ["Newchannel", "DialBegin", "DialState RINGING", "DialEnd CANCEL", "Hangup 0"]
    assert dialstatus(ev) == ["", "CANCEL"]  # the caller is gone: no next priority
    assert not sim.errors


def test_dial_option_letters() -> None:
    assert parse_options("tTg") == {"t": "", "T": "", "g": ""}
    # Letters inside an option's argument are not options.
    assert parse_options("m(Tg)U(sub^t)") == {"m": "Tg", "U": "sub^t"}
    with pytest.raises(DialplanError):
        parse_options("m(x")


async def test_dial_refuses_options_it_does_not_implement() -> None:
    async with Simulator(dialplan=plan("PJSIP/agent1001,20,gm(Tt)"), time_scale=SCALE) as sim:
        sim.inbound_call(dnis="600", caller="+15551230001")
        await sim.wait_idle(timeout=5)
    assert any("Dial option(s) m not implemented" in e for e in sim.errors)
    assert not any(m.name == "DialBegin" for m in sim.events)


@pytest.mark.parametrize("g", [True, False])
async def test_dial_option_g_continues_after_the_callee_hangs_up(g: bool) -> None:
    eps = default_endpoints()
    eps["agent1001"].hangup_after = 2.0
    async with Simulator(dialplan=plan("PJSIP/agent1001,20" + (",g" if g else "")), endpoints=eps,
                         time_scale=SCALE) as sim:
        sim.inbound_call(dnis="600", caller="+15551230001")
        await sim.wait_idle(timeout=10)
    ev = sim.events
    after = [m for m in ev if m.name == "Newexten" and m.get("Channel") == TRUNK and m.get("Priority") == "3"]
    if g:
        # The caller goes on at the next priority; Dial returned with DIALSTATUS=ANSWER.
        assert [m.get("AppData") for m in after] == ["AFTER=ANSWER"]
        assert dialstatus(ev)[-1] == "ANSWER"
    else:
        assert after == []  # without g the caller is hung up when the callee leaves
    soft = index(ev, "SoftHangupRequest", Channel=TRUNK)
    assert index(ev, "Hangup", Channel=A1) < soft
    assert not sim.errors


async def _dial_and_bridge(rec: Recorder) -> str:
    """The Dial bridge's technology once both are in (events show it from BridgeLeave on, 13)."""
    await rec.event("BridgeEnter", Channel=TRUNK)
    bridge = rec.sim.channels[TRUNK].bridge
    assert bridge is not None and len(bridge.channels) == 2
    return bridge.technology


@pytest.mark.parametrize(("dial", "transferer", "other"), [
    ("PJSIP/agent1001,30,T", TRUNK, A1),
    ("PJSIP/agent1001,30,t", A1, TRUNK),
    # Two targets, the second answers: t is the answering leg's, whichever it is.
    ("PJSIP/agent1001&PJSIP/agent1002,30,t", A2, TRUNK),
])
async def test_dial_transfer_options_outside_a_queue(dial: str, transferer: str, other: str) -> None:
    """``T``: the calling party may transfer; ``t``: the called party. Only that party
    gets the features.conf ``atxfer`` hook: for the other one AMI ``Atxfer`` is DTMF."""
    eps = default_endpoints()
    eps["agent1001"].ring_s = 5.0 if "&" in dial else 1.0
    # The Recorder reads the dtmf class: the other party's Atxfer shows as DTMF events.
    async with Simulator(dialplan=plan(dial), features=FEATURES, endpoints=eps, time_scale=SCALE,
                         ami_read="all") as sim:
        rec = Recorder(sim)
        await rec.open()
        sim.inbound_call(dnis="600", caller="+15551230001")
        # DTMF features keep the bridge simple_bridge (06), plain Dial bridges go native (13).
        assert await _dial_and_bridge(rec) == "simple_bridge"
        start = len(rec.messages)
        await act(rec, "Atxfer", "x1", Channel=other, Exten="1003", Context="from-agents")
        await sim.clock.sleep(1)
        got = rec.messages[start:]
        assert [m.get("Digit") for m in got if m.name == "DTMFEnd"] == list("*21003")
        assert not {"Hold", "LocalBridge"} & {m.name for m in got}
        # The party the option names can transfer: consultation, then completion.
        await act(rec, "Atxfer", "x2", Channel=transferer, Exten="1003", Context="from-agents")
        await rec.event("Hold", Channel=transferer)
        await rec.event("BridgeEnter", Channel="Local/1003@from-agents-00000000;2")
        await rec.event("DialEnd", DestChannel="Local/1003@from-agents-00000000;1", DialStatus="ANSWER")
        await act(rec, "Hangup", "h1", Channel=transferer)
        xfer = await rec.event("AttendedTransfer")
        assert xfer.get("OrigTransfererChannel") == transferer and xfer.get("TransfereeChannel") == other
        await rec.event("LocalOptimizationEnd")
        await rec.event("Hangup", Channel="Local/1003@from-agents-00000000;2")
        target = sim.channel("PJSIP/agent1003")
        assert target is not None
        kept = sim.channels[other]
        assert kept.bridge is not None and kept.bridge is target.bridge
        await act(rec, "Hangup", "h2", Channel=other)
        await sim.wait_idle()
        await rec.logoff()
    assert not sim.errors


async def test_plain_dial_has_no_transfer_hook_and_goes_native() -> None:
    async with Simulator(dialplan=plan("PJSIP/agent1001,30"), features=FEATURES, time_scale=SCALE) as sim:
        rec = Recorder(sim)
        await rec.open()
        sim.inbound_call(dnis="600", caller="+15551230001")
        assert await _dial_and_bridge(rec) == "native_rtp"
        for n, chan in enumerate((TRUNK, A1)):
            start = len(rec.messages)
            await act(rec, "Atxfer", f"x{n}", Channel=chan, Exten="1003", Context="from-agents")
            await sim.clock.sleep(1)
            assert "Hold" not in {m.name for m in rec.messages[start:]}
        await act(rec, "Hangup", "h1", Channel=TRUNK)
        await sim.wait_idle()
        await rec.logoff()
    assert not sim.errors
