"""Dialplan engine: loading, validation, Asterisk semantics, channelvars, fail-open."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctid.simulator import Dialplan, DialplanError, QueueConfig, QueueMember, Simulator, UnsupportedApplication
from ctid.simulator.dialplan import evaluate_expression, pattern_regex

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "asterisk22"
CONF = FIXTURES / "asterisk-conf-used"


def test_loads_capture_dialplans_with_includes_and_reopened_contexts() -> None:
    plan = Dialplan.load(CONF / "extensions.conf", CONF / "extensions_cti.conf")
    assert plan.unsupported == []
    assert plan.step("from-trunk", "903", 3) is not None  # from the #included agi2 file
    assert plan.step("from-trunk", "1300", 4) is not None  # re-opened [from-trunk]
    ext = plan.find_extension("ctid-clicktodial", "+15557654321")
    assert ext is not None and ext.name == "_+X."
    assert plan.hints()[("from-agents", "1001")] == "PJSIP/agent1001"


def test_unsupported_application_is_rejected_at_load_and_at_run() -> None:
    text = "[t]\nexten => 1,1,Answer()\n same => n,ChanSpy(PJSIP/x)\n"
    plan = Dialplan.from_text(text)
    assert plan.unsupported and "ChanSpy" in plan.unsupported[0]
    with pytest.raises(DialplanError, match="ChanSpy"):
        Simulator(dialplan=plan)


async def test_executing_unsupported_application_fails_loudly() -> None:
    plan = Dialplan.from_text("[from-trunk]\nexten => 1,1,Answer()\n same => n,ChanSpy(x)\n")
    async with Simulator(dialplan=plan, strict=False, time_scale=0.01) as sim:
        sim.inbound_call(dnis="1", caller="+15550000001")
        await sim.wait_idle(5)
    assert any("ChanSpy" in e for e in sim.errors)


def test_patterns_and_expressions() -> None:
    assert pattern_regex("_NXX").match("212") and not pattern_regex("_NXX").match("112")
    assert pattern_regex("_X.").match("200") and not pattern_regex("_X.").match("s")
    assert evaluate_expression('"HANGUP" = "HANGUP"') == "1"
    assert evaluate_expression("3 > 10") == "0"
    assert evaluate_expression("1 & (0 | 2)") == "1"


async def test_set_gotoif_and_inheritance_to_dialed_channel() -> None:
    text = """
[from-trunk]
exten => _X.,1,Set(__CTID_CALL_ID=c-${EXTEN})
 same => n,Set(N=$[2 + 3])
 same => n,GotoIf($[${N} = 5]?ok:bad)
 same => n(bad),Hangup()
 same => n(ok),Dial(PJSIP/agent1001,20)
 same => n,Hangup()
"""
    async with Simulator(dialplan=Dialplan.from_text(text), time_scale=0.01,
                         channelvars=["CTID_CALL_ID"]) as sim:
        sim.inbound_call(dnis="777", caller="+15550000001", hangup_after=3)
        await sim.wait_idle(5)
    begin = next(m for m in sim.events if m.name == "DialBegin")
    assert begin.get("DestChanVariable") == "CTID_CALL_ID=c-777"
    inherited = [m for m in sim.events if m.name == "VarSet" and (m.get("Channel") or "").startswith("PJSIP/agent")
                 and m.get("Variable") == "__CTID_CALL_ID"]
    # The VarSet of the copy still shows the old (empty) snapshot value (13).
    assert inherited and inherited[0].get("ChanVariable") == "CTID_CALL_ID="
    first = next(m for m in sim.events if m.name == "Newchannel")
    assert first.get_all("ChanVariable") == ["CTID_CALL_ID="]


async def test_fail_open_to_native_queue_with_project_dialplan() -> None:
    queues = {"ctid-fallback": QueueConfig("ctid-fallback", timeout=15, retry=2,
                                           members=[QueueMember("PJSIP/agent1001", "Agent 1001")])}
    async with Simulator(dialplan=ROOT / "dialplans" / "ctid.conf", time_scale=0.01, queues=queues,
                         agi_address=("127.0.0.1", 1)) as sim:
        # ctid.conf sends trunk calls to [ctid-inbound]; no FastAGI server is listening.
        sim.inbound_call(dnis="200", caller="+15551230001", context="ctid-inbound", hangup_after=5)
        await sim.wait_idle(10)
    names = [m.name for m in sim.events]
    assert "QueueCallerJoin" in names and "AgentConnect" in names
    status = [m.get("Value") for m in sim.events if m.name == "VarSet" and m.get("Variable") == "AGISTATUS"]
    assert status == ["FAILURE"]
    assert sim.errors == []


def test_unsupported_application_error_type() -> None:
    assert issubclass(UnsupportedApplication, DialplanError)
