"""AMI actions of the simulator that the scenario replays do not exercise, over the real
socket: ``DeviceStateList``, ``QueueSummary``, ``Setvar``/``Getvar``, ``UserEvent`` and
``Status`` with ``Variables:``. Header names and their order are compared with the
captures where one has the action (01 QueueSummary, 07b DeviceStateList, 13 Getvar and
Status); the rest follows manager.c."""

from __future__ import annotations

import asyncio
import re

from ctid.asterisk.ami_protocol import Message
from ctid.simulator import Dialplan, QueueConfig, QueueMember, Simulator
from ctid.simulator.config import default_endpoints
from tests.test_simulator_ami import VOLATILE
from tests.test_simulator_scenarios import CTI, CV, FIXTURES, Recorder, parse_capture, run_scenario, sent_actions
from tests.test_simulator_transfer import act

SCALE = 0.01


def keys(m: Message) -> list[str]:
    return [k for k, _ in m.headers]


async def listing(rec: Recorder, action: str, aid: str, complete: str, **headers: str) -> list[Message]:
    """Send a list action; its response, items and Complete event, in order."""
    start = len(rec.messages)
    await act(rec, action, aid, **headers)
    await rec.wait_for(lambda m: m.name == complete and m.get("ActionID") == aid, start=start)
    return [m for m in rec.messages[start:] if m.get("ActionID") == aid]


def captured(prefix: str, aid: str) -> list[Message]:
    path = next(FIXTURES.glob(f"{prefix}-*.ami"))
    return [m for m in parse_capture(path) if m.get("ActionID") == aid]


# -- DeviceStateList ----------------------------------------------------------------------

async def test_devicestatelist_shape_and_live_states() -> None:
    cap = captured("07b", "ctiref-007")
    plan = Dialplan.from_text("[from-trunk]\nexten => 600,1,Dial(PJSIP/agent1001,30)\n")
    async with Simulator(dialplan=plan, time_scale=SCALE) as sim:
        rec = Recorder(sim)
        await rec.open()
        idle = await listing(rec, "DeviceStateList", "d1", "DeviceStateListComplete")
        sim.inbound_call(dnis="600", caller="+15551230001")
        await rec.event("BridgeEnter", Channel="PJSIP/trunk-00000000")
        busy = await listing(rec, "DeviceStateList", "d2", "DeviceStateListComplete")
        await act(rec, "Hangup", "h1", Channel="PJSIP/trunk-00000000")
        await sim.wait_idle()
        await rec.logoff()
    for got in (idle, busy):
        head, items, done = got[0], got[1:-1], got[-1]
        assert (head.is_response, keys(head)) == (True, keys(cap[0]))
        assert head.get("Message") == cap[0].get("Message") == "Device State Changes will follow"
        # Items are DeviceStateChange events without Privilege, ActionID first (07b).
        assert {(m.name, tuple(keys(m))) for m in items} == {(m.name, tuple(keys(m))) for m in cap[1:-1]}
        assert (done.name, keys(done)) == (cap[-1].name, keys(cap[-1]))
        assert done.get("ListItems") == str(len(items))
    states = {m.get("Device"): m.get("State") for m in idle[1:-1]}
    # The endpoints' states as 07b lists them: the trunk and the unregistered dynamic
    # agent2001 are UNAVAILABLE, the static agents NOT_INUSE.
    cap_pjsip = {m.get("Device"): m.get("State") for m in cap[1:-1] if (m.get("Device") or "").startswith("PJSIP/")}
    assert states == cap_pjsip
    live = {m.get("Device"): m.get("State") for m in busy[1:-1]}
    assert live["PJSIP/trunk"] == "INUSE" and live["PJSIP/agent1001"] == "INUSE"
    assert not sim.errors


# -- QueueSummary -------------------------------------------------------------------------

def support(timeout: float = 15) -> dict[str, QueueConfig]:
    return {"support": QueueConfig("support", strategy="rrmemory", timeout=timeout, retry=2, members=[
        QueueMember("PJSIP/agent1001", "Agent 1001"), QueueMember("PJSIP/agent1002", "Agent 1002")])}


async def test_queuesummary_shape_and_values() -> None:
    cap = captured("01", "ctiref-006")
    eps = default_endpoints()
    plan = Dialplan.from_text("[from-trunk]\nexten => 400,1,Answer()\n same => n,Queue(support,,,,60)\n"
                              " same => n,Hangup()\n")
    queues = support()
    async with Simulator(dialplan=plan, queues=queues, endpoints=eps, time_scale=SCALE) as sim:
        rec = Recorder(sim)
        await rec.open()
        idle = await listing(rec, "QueueSummary", "q1", "QueueSummaryComplete", Queue="support")
        # Two calls answered and completed, to see the exponential averages move.
        for n, hangup in enumerate((5.0, 9.0)):
            sim.inbound_call(dnis="400", caller=f"+1555123000{n}", hangup_after=hangup)
            await rec.event("AgentComplete", Uniqueid=sim.channels[f"PJSIP/trunk-0000000{n * 2}"].uniqueid)
            await sim.wait_idle()
        done = await listing(rec, "QueueSummary", "q2", "QueueSummaryComplete", Queue="support")
        # A caller waiting: agent1001 paused, agent1002 rings without answering.
        await act(rec, "QueuePause", "p1", Interface="PJSIP/agent1001", Paused="true")
        eps["agent1002"].answer = False
        sim.inbound_call(dnis="400", caller="+15551230009")
        await rec.event("DialState", DestChannel="PJSIP/agent1002-00000005")
        await sim.clock.sleep(3)
        waiting = await listing(rec, "QueueSummary", "q3", "QueueSummaryComplete")
        await act(rec, "Hangup", "h1", Channel="PJSIP/trunk-00000004")
        await sim.wait_idle()
        await rec.logoff()
    for got in (idle, done, waiting):
        assert [(m.name, keys(m)) for m in got[:2]] == [(m.name, keys(m)) for m in cap[:2]]
        assert (got[-1].name, keys(got[-1])) == (cap[-1].name, keys(cap[-1]))
    # The idle support queue, value for value (but the ActionID) as in 01.
    assert [h for h in idle[1].headers if h[0] != "ActionID"] == [h for h in cap[1].headers if h[0] != "ActionID"]
    connects = [m for m in rec.messages if m.name == "AgentConnect"]
    completes = [m for m in rec.messages if m.name == "AgentComplete"]
    h1, h2 = (int(m.get("HoldTime") or 0) for m in connects[:2])
    t1, t2 = (int(m.get("TalkTime") or 0) for m in completes[:2])
    summary = done[1]
    # app_queue: the first value as is, then (3 * old + new) / 4, integer.
    assert summary.get("HoldTime") == str((h1 * 3 + h2) >> 2)
    assert summary.get("TalkTime") == str((t1 * 3 + t2) >> 2)
    assert (summary.get("LoggedIn"), summary.get("Available"), summary.get("Callers")) == ("2", "2", "0")
    live = next(m for m in waiting[1:-1] if m.get("Queue") == "support")
    # Paused and ringing members are not available; the caller has waited ~3 s.
    assert (live.get("LoggedIn"), live.get("Available"), live.get("Callers")) == ("2", "0", "1")
    assert 2 <= int(live.get("LongestHoldTime") or 0) <= 4
    assert not sim.errors


async def test_queueadd_and_queueremove_as_app_queue_answers_them() -> None:
    plan = Dialplan.from_text("[from-trunk]\nexten => 400,1,Answer()\n same => n,Hangup()\n")
    async with Simulator(dialplan=plan, queues=support(), endpoints=default_endpoints(), time_scale=SCALE) as sim:
        rec = Recorder(sim)
        await rec.open()
        added = await act(rec, "QueueAdd", "a1", Queue="support", Interface="PJSIP/agent2001", MemberName="2001",
                          Paused="true", Reason="lunch")
        again = await act(rec, "QueueAdd", "a2", Queue="support", Interface="PJSIP/agent2001")
        nowhere = await act(rec, "QueueAdd", "a3", Queue="nope", Interface="PJSIP/agent2001")
        static = await act(rec, "QueueRemove", "r1", Queue="support", Interface="PJSIP/agent1001")
        removed = await act(rec, "QueueRemove", "r2", Queue="support", Interface="PJSIP/agent2001")
        gone = await act(rec, "QueueRemove", "r3", Queue="support", Interface="PJSIP/agent2001")
        await rec.logoff()
    assert (added.get("Response"), added.get("Message")) == ("Success", "Added interface to queue")
    assert (again.get("Response"), again.get("Message")) == ("Error", "Unable to add interface: Already there")
    assert nowhere.get("Message") == "Unable to add interface to queue: No such queue"
    assert (static.get("Response"), static.get("Message")) == ("Error", "Member not dynamic")
    assert (removed.get("Response"), removed.get("Message")) == ("Success", "Removed interface from queue")
    assert gone.get("Message") == "Unable to remove interface: Not there"
    events = [m for m in rec.messages if m.name in ("QueueMemberAdded", "QueueMemberRemoved")]
    assert [(m.name, m.get("Interface"), m.get("Membership"), m.get("Paused"), m.get("PausedReason"))
            for m in events] == [("QueueMemberAdded", "PJSIP/agent2001", "dynamic", "1", "lunch"),
                                 ("QueueMemberRemoved", "PJSIP/agent2001", "dynamic", "1", "lunch")]
    assert [m.interface for m in sim.pbx.queues["support"].members] == ["PJSIP/agent1001", "PJSIP/agent1002"]


# -- Setvar / Getvar ----------------------------------------------------------------------

async def test_setvar_then_getvar_round_trip() -> None:
    cap = {m.get("ActionID"): m for m in captured("13", "ctiref-003") + captured("13", "ctiref-006")}
    plan = Dialplan.from_text("[from-trunk]\nexten => 600,1,Answer()\n same => n,Wait(60)\n")
    # About the VarSet event (class dialplan): a user that reads every class.
    async with Simulator(dialplan=plan, time_scale=SCALE, channelvars=["CTID_CALL_ID"], ami_read="all") as sim:
        rec = Recorder(sim)
        await rec.open()
        sim.inbound_call(dnis="600", caller="+15551230001")
        chan = "PJSIP/trunk-00000000"
        await rec.event("Newexten", Channel=chan, Application="Wait")
        start = len(rec.messages)
        ok = await act(rec, "Setvar", "s1", Channel=chan, Variable="__CTID_CALL_ID", Value="call-42")
        assert [(k, v) for k, v in ok.headers] == [("Response", "Success"), ("ActionID", "s1"),
                                                   ("Message", "Variable Set")]
        varset = await rec.event("VarSet", Channel=chan, Variable="__CTID_CALL_ID")
        assert varset.get("Value") == "call-42" and varset.get("ChanVariable") == "CTID_CALL_ID=call-42"
        got = await act(rec, "Getvar", "g1", Channel=chan, Variable="CTID_CALL_ID")
        # Same headers as 13's Getvar: no Message, the inheritance prefix is not needed.
        assert keys(got) == keys(cap["ctiref-003"])
        assert (got.get("Variable"), got.get("Value")) == ("CTID_CALL_ID", "call-42")
        unset = await act(rec, "Getvar", "g2", Channel=chan, Variable="NOT_SET")
        assert keys(unset) == keys(cap["ctiref-006"]) and unset.get("Value") == ""
        func = await act(rec, "Getvar", "g3", Channel=chan, Variable="CALLERID(num)")
        assert func.get("Value") == "+15551230001"
        # Without Channel: a global variable.
        await act(rec, "Setvar", "s2", Variable="CTID_MODE", Value="day")
        glob = await act(rec, "Getvar", "g4", Variable="CTID_MODE")
        assert (glob.name, glob.get("Value")) == ("Success", "day")
        assert sim.pbx.globals["CTID_MODE"] == "day"
        bad = await act(rec, "Setvar", "s3", Channel="PJSIP/nosuch-00000000", Variable="X", Value="1")
        assert (bad.name, bad.get("Message")) == ("Error", "No such channel")
        assert (await act(rec, "Setvar", "s4", Channel=chan)).get("Message") == "No variable specified"
        assert [m.name for m in rec.messages[start:] if m.is_event] == ["VarSet"]
        await act(rec, "Hangup", "h1", Channel=chan)
        await sim.wait_idle()
        await rec.logoff()
    assert not sim.errors


# -- UserEvent ----------------------------------------------------------------------------

async def test_userevent_action_produces_the_userevent_event() -> None:
    async with Simulator(time_scale=SCALE) as sim:
        rec = Recorder(sim)
        await rec.open()
        start = len(rec.messages)
        resp = await act(rec, "UserEvent", "u1", UserEvent="CtidPing", Tenant="acme", Note="a: b")
        assert [(k, v) for k, v in resp.headers] == [("Response", "Success"), ("ActionID", "u1"),
                                                     ("Message", "Event Sent")]
        ev = await rec.wait_for(lambda m: m.is_event and m.name == "UserEvent", start=start)
        # manager.c: "UserEvent: <name>", then every other header of the action in its
        # order, ActionID included; only Action and UserEvent are left out.
        assert ev.headers == [("Event", "UserEvent"), ("Privilege", "user,all"), ("UserEvent", "CtidPing"),
                              ("ActionID", "u1"), ("Tenant", "acme"), ("Note", "a: b")]
        await rec.logoff()
    user_only = [m for m in sim.events if m.name == "UserEvent"]
    assert len(user_only) == 1
    assert not sim.errors


async def test_userevent_reaches_only_sessions_with_the_user_class() -> None:
    async with Simulator(time_scale=SCALE) as sim:
        rec = Recorder(sim)
        await rec.open()
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        writer.write(b"Action: Login\r\nUsername: ctid\r\nSecret: ctidpass\r\nEvents: call\r\n\r\n")
        await reader.readuntil(b"Authentication accepted\r\n\r\n")
        await act(rec, "UserEvent", "u1", UserEvent="X")
        await rec.event("UserEvent", UserEvent="X")
        writer.write(b"Action: Logoff\r\n\r\n")
        rest = await reader.read(65536)
        while chunk := await reader.read(65536):
            rest += chunk
        writer.close()
        assert b"UserEvent" not in rest
        await rec.logoff()


# -- Status with Variables ----------------------------------------------------------------

async def test_status_with_variables_matches_capture_13() -> None:
    cap_items = captured("13", "ctiref-007")
    status_msgs: list[Message] = []

    async def drive(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
        sim.inbound_call(dnis="1300", caller="+15551230013", hangup_after=11)
        await rec.event("BridgeEnter", Channel="PJSIP/trunk-00000000")
        block = next(b for b in actions if "ctiref-007" in b)
        start = len(rec.messages)
        rec.send((block.replace("\n", "\r\n") + "\r\n\r\n").encode())
        await rec.wait_for(lambda m: m.name == "StatusComplete", start=start)
        status_msgs.extend(m for m in rec.messages[start:] if m.get("ActionID") == "ctiref-007")

    await run_scenario("13", CTI, drive, channelvars=CV)
    assert "Variables: CTID_CALL_ID,CTID_QUEUE" in next(b for b in sent_actions(
        FIXTURES / "13-channelvars-inherited-dial.sent.txt") if "ctiref-007" in b)
    volatile = VOLATILE | {"Uniqueid", "Linkedid", "BridgeID", "Seconds"}

    def shape(m: Message) -> list[tuple[str, str]]:
        return [(k, "*" if k in volatile else v) for k, v in m.headers]

    assert [shape(m) for m in status_msgs] == [shape(m) for m in cap_items]
    item = status_msgs[1]
    assert item.get_all("Variable") == ["CTID_CALL_ID=abc123", "CTID_QUEUE=(null)"]
    assert re.fullmatch(r"\d+\.\d+", item.get("Linkedid") or "")
