"""AMI ``Atxfer`` in the simulator beyond capture 06c (which test_simulator_scenarios
compares event by event): the error answers, and the paths no capture shows (no
feature hook, unknown extension, target not answering, transferer hanging up while the
target still rings)."""

from __future__ import annotations

from pathlib import Path

from ctid.asterisk.ami_protocol import Message
from ctid.simulator import Dialplan, FeatureConfig, Simulator, load_features_conf
from ctid.simulator.config import default_endpoints
from tests.test_simulator_scenarios import Recorder

CONF = Path(__file__).parent / "fixtures" / "asterisk22" / "asterisk-conf-used"
MAIN = CONF / "extensions.conf"
FEATURES = CONF / "features.conf"
SCALE = 0.01
LOCAL1 = "Local/1003@from-agents-00000000;1"
LOCAL2 = "Local/1003@from-agents-00000000;2"


async def act(rec: Recorder, action: str, aid: str, **headers: str) -> Message:
    lines = [f"Action: {action}", f"ActionID: {aid}", *(f"{k}: {v}" for k, v in headers.items())]
    start = len(rec.messages)
    rec.send(("\r\n".join(lines) + "\r\n\r\n").encode())
    return await rec.wait_for(lambda m: m.is_response and m.get("ActionID") == aid, start=start)


async def originate(rec: Recorder, exten: str = "1002") -> None:
    resp = await act(rec, "Originate", "o1", Channel="PJSIP/agent1001", Context="from-agents", Exten=exten,
                     Priority="1", Async="true", Timeout="20000", CallerID='"CTI" <1002>')
    assert resp.get("Message") == "Originate successfully queued"
    await rec.event("BridgeEnter", Channel="PJSIP/agent1001-00000000")


def names(rec: Recorder, start: int = 0) -> list[str]:
    return [m.name for m in rec.messages[start:] if m.is_event]


def test_features_conf_loader() -> None:
    conf = load_features_conf(FEATURES)
    assert conf.atxfer == "*2"
    assert conf.featuremap["blindxfer"] == "#1"
    assert conf.transferdigittimeout == 3 and conf.atxfernoanswertimeout == 15
    assert FeatureConfig().atxfer == ""  # Asterisk's built-in map has no atxfer code


async def test_atxfer_errors_as_asterisk() -> None:
    async with Simulator(dialplan=MAIN, time_scale=SCALE, strict=False) as sim:
        rec = Recorder(sim)
        await rec.open()
        assert (await act(rec, "Atxfer", "a1", Exten="1003")).get("Message") == "No channel specified"
        assert (await act(rec, "Atxfer", "a2", Channel="PJSIP/agent1001-00000000")).get(
            "Message") == "No extension specified"
        resp = await act(rec, "Atxfer", "a3", Channel="PJSIP/nosuch-00000000", Exten="1003")
        assert resp.name == "Error" and resp.get("Message") == "Channel specified does not exist"
        await originate(rec)
        start = len(rec.messages)
        resp = await act(rec, "Atxfer", "a4", Channel="PJSIP/agent1001-00000000", Exten="1003",
                         Context="from-agents")
        # No features.conf: Asterisk's default feature map has no atxfer code (06c README).
        assert resp.name == "Error" and resp.get("Message") == "No attended transfer feature code found"
        assert "DTMFEnd" not in names(rec, start)
        await act(rec, "Hangup", "h1", Channel="PJSIP/agent1001-00000000")
        await sim.wait_idle()
        await rec.logoff()
    assert not sim.errors


async def test_atxfer_completes_and_leaves_transferee_with_target() -> None:
    async with Simulator(dialplan=MAIN, time_scale=SCALE, features=FEATURES, strict=False) as sim:
        rec = Recorder(sim)
        await rec.open()
        await originate(rec)
        resp = await act(rec, "Atxfer", "a1", Channel="PJSIP/agent1001-00000000", Exten="1003",
                         Context="from-agents")
        assert resp.name == "Success" and resp.get("Message") == "Atxfer successfully queued"
        await rec.event("BridgeEnter", Channel=LOCAL2)
        t = sim.channels["PJSIP/agent1001-00000000"]
        assert t.get_var("TRANSFER_CONTEXT") == "from-agents"
        assert t.bridge is not None and t.bridge.kind == "atxfer"
        await act(rec, "Hangup", "h1", Channel="PJSIP/agent1001-00000000")
        await rec.event("Hangup", Channel=LOCAL2)
        xfer = await rec.event("AttendedTransfer")
        assert xfer.get("Result") == "Success" and xfer.get("DestType") == "Bridge"
        assert xfer.get("TransferTargetChannel") == LOCAL1
        e, target = sim.channels["PJSIP/agent1002-00000001"], sim.channels["PJSIP/agent1003-00000002"]
        assert e.bridge is not None and e.bridge is target.bridge and len(e.bridge.channels) == 2
        assert e.bridge.uniqueid == xfer.get("DestBridgeUniqueid")
        assert sorted(sim.channels) == ["PJSIP/agent1002-00000001", "PJSIP/agent1003-00000002"]
        await act(rec, "Hangup", "h2", Channel="PJSIP/agent1002-00000001")
        await sim.wait_idle()
        await rec.logoff()
    assert not sim.errors


async def test_atxfer_without_transfer_feature_is_only_dtmf() -> None:
    plan = Dialplan.from_text("[from-agents]\nexten => 1002,1,Dial(PJSIP/agent1002,20)\n same => n,Hangup()\n")
    # The Recorder reads the dtmf class: without the feature hook the Atxfer is DTMF events.
    async with Simulator(dialplan=plan, time_scale=SCALE, features=FEATURES, ami_read="all") as sim:
        rec = Recorder(sim)
        await rec.open()
        await originate(rec)
        start = len(rec.messages)
        resp = await act(rec, "Atxfer", "a1", Channel="PJSIP/agent1001-00000000", Exten="1003")
        assert resp.get("Message") == "Atxfer successfully queued"
        await sim.clock.sleep(1)
        # No T option on the Dial: no feature hook, the digits are just DTMF.
        assert [m.get("Digit") for m in rec.messages[start:] if m.name == "DTMFEnd"] == list("*21003")
        assert not {"Hold", "LocalBridge"} & set(names(rec, start))
        await act(rec, "Hangup", "h1", Channel="PJSIP/agent1001-00000000")
        await sim.wait_idle()
        await rec.logoff()
    assert not sim.errors


async def test_atxfer_to_unknown_extension_returns_to_the_call() -> None:
    async with Simulator(dialplan=MAIN, time_scale=SCALE, features=FEATURES, strict=False) as sim:
        rec = Recorder(sim)
        await rec.open()
        await originate(rec)
        start = len(rec.messages)
        await act(rec, "Atxfer", "a1", Channel="PJSIP/agent1001-00000000", Exten="1999",
                  Context="from-agents")
        await rec.event("Unhold", Channel="PJSIP/agent1001-00000000")
        seen = names(rec, start)
        assert seen.index("Hold") < seen.index("MusicOnHoldStart") < seen.index("Unhold")
        assert "MusicOnHoldStop" in seen and "LocalBridge" not in seen and "Newchannel" not in seen
        t, e = sim.channels["PJSIP/agent1001-00000000"], sim.channels["PJSIP/agent1002-00000001"]
        assert t.bridge is not None and t.bridge is e.bridge
        await act(rec, "Hangup", "h1", Channel="PJSIP/agent1001-00000000")
        await sim.wait_idle()
        await rec.logoff()
    assert not sim.errors


async def test_atxfer_target_not_answering_returns_transferer() -> None:
    eps = default_endpoints()
    eps["agent1003"].answer = False
    features = load_features_conf(FEATURES)
    features.atxfernoanswertimeout = 4
    async with Simulator(dialplan=MAIN, time_scale=SCALE, features=features, endpoints=eps,
                         strict=False) as sim:
        rec = Recorder(sim)
        await rec.open()
        await originate(rec)
        orig = (await rec.event("BridgeEnter", Channel="PJSIP/agent1001-00000000")).get("BridgeUniqueid")
        await act(rec, "Atxfer", "a1", Channel="PJSIP/agent1001-00000000", Exten="1003",
                  Context="from-agents")
        await rec.event("DialState", DestChannel=LOCAL1)
        back = await rec.wait_for(lambda m: m.name == "BridgeEnter" and m.get("BridgeUniqueid") == orig
                                  and m.get("Channel") == "PJSIP/agent1001-00000000", start=0, timeout=10)
        assert back.get("BridgeNumChannels") == "2"
        await rec.event("Unhold", Channel="PJSIP/agent1001-00000000")
        await rec.event("Hangup", Channel=LOCAL2)
        await rec.event("Hangup", Channel="PJSIP/agent1003-00000002")
        t, e = sim.channels["PJSIP/agent1001-00000000"], sim.channels["PJSIP/agent1002-00000001"]
        assert t.bridge is e.bridge and t.atxfer is None
        await act(rec, "Hangup", "h1", Channel="PJSIP/agent1001-00000000")
        await sim.wait_idle()
        await rec.logoff()
    assert not sim.errors


async def test_atxfer_transferer_hangs_up_while_target_rings() -> None:
    eps = default_endpoints()
    eps["agent1003"].ring_s = 4.0
    async with Simulator(dialplan=MAIN, time_scale=SCALE, features=FEATURES, endpoints=eps,
                         strict=False) as sim:
        rec = Recorder(sim)
        await rec.open()
        await originate(rec)
        await act(rec, "Atxfer", "a1", Channel="PJSIP/agent1001-00000000", Exten="1003",
                  Context="from-agents")
        await rec.event("DialState", DestChannel=LOCAL1)
        await act(rec, "Hangup", "h1", Channel="PJSIP/agent1001-00000000")
        await rec.event("AttendedTransfer")
        # The target answers later; then the Local pair is optimised away.
        await rec.event("LocalOptimizationEnd")
        await rec.event("Hangup", Channel=LOCAL2)
        e, target = sim.channels["PJSIP/agent1002-00000001"], sim.channels["PJSIP/agent1003-00000002"]
        assert e.bridge is not None and e.bridge is target.bridge
        await act(rec, "Hangup", "h2", Channel="PJSIP/agent1003-00000002")
        await sim.wait_idle()
        await rec.logoff()
    assert not sim.errors
