"""app_queue ``ringall`` with several members: all ring at once, the first to answer
wins. Event shapes as in captures 04/05 (AgentCalled, DialBegin, DialState RINGING,
AgentRingNoAnswer + DialEnd NOANSWER + DialEnd CANCEL on timeout, DialEnd CANCEL twice
when the caller leaves); the losers of an answered call get DialEnd CANCEL from
wait_for_answer and again from hangupcalls(), and are hung up with cause 26 (answered
elsewhere)."""

from __future__ import annotations

from ctid.asterisk.ami_protocol import Message
from ctid.simulator import Dialplan, QueueConfig, QueueMember, Simulator
from ctid.simulator.config import default_endpoints

PLAN = "[from-trunk]\nexten => 500,1,Answer()\n same => n,Queue(sales,,,,60)\n same => n,Hangup()\n"
SCALE = 0.01
A1, A2 = "PJSIP/agent1001-00000001", "PJSIP/agent1002-00000002"


def sales(timeout: float = 10) -> dict[str, QueueConfig]:
    return {"sales": QueueConfig("sales", strategy="ringall", timeout=timeout, retry=2, members=[
        QueueMember("PJSIP/agent1001", "Agent 1001"), QueueMember("PJSIP/agent1002", "Agent 1002")])}


def trail(events: list[Message], dest: str) -> list[str]:
    out = []
    for m in events:
        if m.get("DestChannel") == dest and m.name in ("AgentCalled", "DialBegin", "DialState", "DialEnd",
                                                        "AgentRingNoAnswer", "AgentConnect"):
            out.append(m.name + (f" {m.get('DialStatus')}" if m.get("DialStatus") else ""))
        elif m.get("Channel") == dest and m.name == "Hangup":
            out.append(f"Hangup {m.get('Cause')}")
    return out


async def test_ringall_rings_everyone_first_answer_wins() -> None:
    eps = default_endpoints()
    eps["agent1002"].ring_s = 3.0
    async with Simulator(dialplan=Dialplan.from_text(PLAN), queues=sales(), endpoints=eps,
                         time_scale=SCALE) as sim:
        sim.inbound_call(dnis="500", caller="+15551230001", hangup_after=6)
        await sim.wait_idle(timeout=10)
    ev = sim.events
    order = [(m.name, m.get("DestChannel")) for m in ev if m.name in ("AgentCalled", "DialBegin", "DialState")]
    # ring_one(): both members are called before either rings.
    assert order == [("AgentCalled", A1), ("DialBegin", A1), ("AgentCalled", A2), ("DialBegin", A2),
                     ("DialState", A1), ("DialState", A2)]
    assert trail(ev, A1) == ["AgentCalled", "DialBegin", "DialState RINGING", "DialEnd ANSWER", "AgentConnect",
                             "Hangup 16"]
    assert trail(ev, A2) == ["AgentCalled", "DialBegin", "DialState RINGING", "DialEnd CANCEL", "DialEnd CANCEL",
                             "Hangup 26"]
    names = [m.name for m in ev]
    assert names.index("Hangup") < names.index("MusicOnHoldStop") < names.index("AgentConnect")
    assert not sim.errors


async def test_ringall_nobody_answers_then_retry_rings_all_again() -> None:
    eps = default_endpoints()
    eps["agent1001"].answer = eps["agent1002"].answer = False
    async with Simulator(dialplan=Dialplan.from_text(PLAN), queues=sales(timeout=3), endpoints=eps,
                         time_scale=SCALE) as sim:
        sim.inbound_call(dnis="500", caller="+15551230001", hangup_after=6.5)
        await sim.wait_idle(timeout=10)
    ev = sim.events
    first = [(m.name, m.get("DestChannel"), m.get("DialStatus")) for m in ev
             if m.name in ("AgentRingNoAnswer", "DialEnd")][:6]
    # rna() for each member, then DialEnd NOANSWER for all, then hangupcalls() CANCEL.
    assert first == [("AgentRingNoAnswer", A1, None), ("AgentRingNoAnswer", A2, None),
                     ("DialEnd", A1, "NOANSWER"), ("DialEnd", A2, "NOANSWER"),
                     ("DialEnd", A1, "CANCEL"), ("DialEnd", A2, "CANCEL")]
    rna = [m for m in ev if m.name == "AgentRingNoAnswer"]
    assert all(abs(int(m.get("RingTime") or 0) - 3000) < 300 for m in rna)
    called = [m.get("DestChannel") for m in ev if m.name == "AgentCalled"]
    assert len(called) == 4  # second round after the retry, both again
    abandon = [m for m in ev if m.name == "QueueCallerAbandon"]
    assert len(abandon) == 1
    # The caller left during the second round: CANCEL twice for each ringing member.
    last_round = called[2:]
    for dest in last_round:
        assert trail(ev, dest)[-3:] == ["DialEnd CANCEL", "DialEnd CANCEL", "Hangup 0"]
    assert not sim.errors


async def test_ringall_skips_paused_and_busy_members() -> None:
    eps = default_endpoints()
    eps["agent1002"].busy = True
    queues = sales()
    queues["sales"].members.append(QueueMember("PJSIP/agent1003", "Agent 1003", paused=True))
    async with Simulator(dialplan=Dialplan.from_text(PLAN), queues=queues, endpoints=eps,
                         time_scale=SCALE) as sim:
        sim.inbound_call(dnis="500", caller="+15551230001", hangup_after=4)
        await sim.wait_idle(timeout=10)
    ev = sim.events
    assert not any(m.name == "AgentCalled" and "agent1003" in (m.get("DestChannel") or "") for m in ev)
    assert trail(ev, A2) == ["AgentCalled", "DialBegin", "DialEnd BUSY", "AgentRingNoAnswer", "Hangup 17"]
    assert trail(ev, A1)[-2:] == ["AgentConnect", "Hangup 16"]
    assert not sim.errors
