"""Replay the real Asterisk 22 captures through AMIParser + CallModel and check the calls.

Each capture is one AMI connection recorded byte for byte (see
``fixtures/asterisk22/README.md``). The model is fed every message in order,
responses included, exactly as the AMI client would dispatch them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ctid.asterisk.ami_protocol import AMIParser, Message
from ctid.calls import (
    Call,
    CallChange,
    CallModel,
    CallState,
    ChangeKind,
    Direction,
    HangupBy,
    Role,
)

CAPTURES = Path(__file__).parent / "fixtures" / "asterisk22"
ALL_CAPTURES = sorted(path.name for path in CAPTURES.glob("*.ami"))


class FakeClock:
    """Aware UTC time that advances 10 ms per reading."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=10)
        return self.now


def messages(name: str) -> list[Message]:
    path = CAPTURES / name
    assert path.is_file(), f"capture fixture missing: {path}"
    return [item for item in AMIParser().feed(path.read_bytes()) if isinstance(item, Message)]


def find(prefix: str) -> str:
    names = [name for name in ALL_CAPTURES if name.startswith(prefix + "-")]
    assert len(names) == 1, f"no single capture for {prefix}: {names}"
    return names[0]


Hook = Callable[[CallModel, Message], list[CallChange]]


def replay(prefix: str, hook: Hook | None = None) -> tuple[CallModel, list[CallChange]]:
    model = CallModel(FakeClock())
    changes: list[CallChange] = []
    for message in messages(find(prefix)):
        changes.extend(model.feed(message))
        if hook is not None:
            changes.extend(hook(model, message))
    return model, changes


class Ledger:
    """Follows started/rekeyed/ended and fails on any call that ends twice or never."""

    def __init__(self, changes: list[CallChange]) -> None:
        self.ended: Counter[str] = Counter()
        self.states: dict[str, list[CallState]] = {}
        self.rekeys: list[tuple[str, str]] = []
        live: set[str] = set()
        for change in changes:
            kind, call_id = change.kind, change.call_id
            assert kind is not ChangeKind.DIAGNOSTIC, change.detail
            if kind is ChangeKind.STARTED:
                assert call_id not in live and call_id not in self.ended, call_id
                live.add(call_id)
                self.states[call_id] = [CallState.RINGING]
            elif kind is ChangeKind.REKEYED:
                old = change.old_call_id
                assert old is not None and old in live, change
                live.discard(old)
                history = self.states.pop(old)
                if call_id in live:  # merged into a call that already existed
                    continue
                live.add(call_id)
                self.states[call_id] = history
                self.rekeys.append((old, call_id))
            else:
                assert call_id in live, f"{kind} for unknown or ended call {call_id}"
                if kind is ChangeKind.STATE:
                    assert change.new_state is not None
                    self.states[call_id].append(change.new_state)
                elif kind is ChangeKind.ENDED:
                    self.ended[call_id] += 1
                    self.states[call_id].append(CallState.ENDED)
                    live.discard(call_id)
        assert not live, f"calls never ended: {live}"
        assert all(count == 1 for count in self.ended.values()), self.ended


def ended_calls(changes: list[CallChange]) -> list[Call]:
    return [change.call for change in changes if change.kind is ChangeKind.ENDED]


def roles(call: Call) -> list[tuple[str, Role]]:
    return [(leg.channel, leg.role) for leg in call.legs]


@pytest.mark.parametrize("name", ALL_CAPTURES)
def test_every_capture_ends_every_call_exactly_once(name: str) -> None:
    model = CallModel(FakeClock())
    changes: list[CallChange] = []
    for message in messages(name):
        changes.extend(model.feed(message))
    Ledger(changes)
    assert not model.calls
    assert not model.channels
    for call in ended_calls(changes):
        record = call.to_record()  # the store's validation accepts it
        assert record.call_id == call.call_id and record.ended_at is not None
        assert all(leg.ended_at is not None for leg in record.legs)


def test_captures_are_all_present() -> None:
    for prefix in ("02", "04", "04b", "05", "06", "06b", "06c", "13", "15", "15b", "17", "18"):
        find(prefix)


def test_02_inbound_caller_hangs_up() -> None:
    model, changes = replay("02")
    ledger = Ledger(changes)
    (call,) = ended_calls(changes)
    assert ledger.states == {call.call_id: [CallState.RINGING, CallState.ENDED]}
    assert call.call_id == "1795395360.0" and call.provisional  # no channelvars in 01-12
    assert call.direction is Direction.INBOUND
    assert (call.caller_number, call.caller_name) == ("+15551230001", "Caller +15551230001")
    assert call.dnis == "200" and call.tenant == "default"
    assert call.hangup_by is HangupBy.CALLER
    assert call.hangup_cause == 0  # Cause: 0 although the caller hung up
    assert call.answered_at is None
    assert roles(call) == [("PJSIP/trunk-00000000", Role.CALLER)]
    assert model.get(call.call_id) is call  # recently ended calls stay visible


def test_04_queue_answered_caller_hangs_up() -> None:
    _, changes = replay("04")
    ledger = Ledger(changes)
    (call,) = ended_calls(changes)
    assert ledger.states[call.call_id] == [
        CallState.RINGING,
        CallState.CONNECTED,
        CallState.ENDED,
    ]
    assert [c.kind for c in changes].count(ChangeKind.ANSWERED) == 1
    assert roles(call) == [
        ("PJSIP/trunk-00000002", Role.CALLER),
        ("PJSIP/agent1001-00000003", Role.AGENT),
    ]
    assert call.hangup_by is HangupBy.CALLER
    assert call.answered_at is not None and call.ended_at is not None
    assert call.created_at < call.answered_at < call.ended_at
    agent = call.legs[1]
    assert agent.answered_at is not None and agent.hangup_cause == 16


def test_04b_agent_hangs_up_is_not_a_caller_hangup() -> None:
    _, changes = replay("04b")
    ledger = Ledger(changes)
    calls = ended_calls(changes)
    assert [c.caller_number for c in calls] == ["+15551230002", "+15551230003"]
    for call in calls:
        assert ledger.states[call.call_id] == [
            CallState.RINGING,
            CallState.CONNECTED,
            CallState.ENDED,
        ]
        assert call.hangup_by is HangupBy.AGENT
        assert [leg.role for leg in call.legs] == [Role.CALLER, Role.AGENT]
    assert [c.legs[1].channel for c in calls] == [
        "PJSIP/agent1002-00000005",
        "PJSIP/agent1001-00000007",
    ]


def test_05_caller_abandons_while_agent_rings() -> None:
    _, changes = replay("05")
    ledger = Ledger(changes)
    (call,) = ended_calls(changes)
    assert ledger.states[call.call_id] == [CallState.RINGING, CallState.ENDED]
    assert call.answered_at is None
    assert call.hangup_by is HangupBy.CALLER
    # the caller plus two ring attempts of agent1003 (ring-no-answer, then the retry)
    assert roles(call) == [
        ("PJSIP/trunk-00000008", Role.CALLER),
        ("PJSIP/agent1003-00000009", Role.AGENT),
        ("PJSIP/agent1003-0000000a", Role.AGENT),
    ]
    assert all(leg.answered_at is None for leg in call.legs[1:])


def test_06_originate_redirect_keeps_one_outbound_call() -> None:
    _, changes = replay("06")
    ledger = Ledger(changes)
    (call,) = ended_calls(changes)
    assert call.direction is Direction.OUTBOUND
    assert {c.call_id for c in changes} == {call.call_id}
    assert ledger.states[call.call_id] == [
        CallState.RINGING,
        CallState.CONNECTED,
        CallState.ENDED,
    ]
    assert [leg.channel for leg in call.legs] == [
        "PJSIP/agent1001-0000000c",
        "PJSIP/agent1002-0000000d",
        "PJSIP/agent1003-0000000e",
    ]
    assert all(leg.role is Role.AGENT for leg in call.legs)
    assert call.hangup_by is HangupBy.SYSTEM  # AMI Hangup: no HangupRequest anywhere


def test_06_hangup_announced_by_ctid_counts_as_ctid() -> None:
    # ctid announces its AMI Hangup of agent1003 (ctiref-006) before sending it.
    def hook(model: CallModel, message: Message) -> list[CallChange]:
        if message.name == "DialEnd" and message.get("DestChannel") == "PJSIP/agent1003-0000000e":
            model.expect_hangup("PJSIP/agent1003-0000000e")
        return []

    _, changes = replay("06", hook)
    Ledger(changes)
    (call,) = ended_calls(changes)
    assert call.hangup_by is HangupBy.CTID


def test_06b_channelid_and_blind_transfer_keep_identity() -> None:
    _, changes = replay("06b")
    ledger = Ledger(changes)
    (call,) = ended_calls(changes)
    assert call.call_id == "scn06b-leg-a" == call.linkedid  # ChannelId overrides Linkedid
    assert {c.call_id for c in changes} == {"scn06b-leg-a"}
    assert call.legs[0].uniqueid == "scn06b-leg-a"
    assert len(call.legs) == 3
    assert ledger.states["scn06b-leg-a"] == [
        CallState.RINGING,
        CallState.CONNECTED,
        CallState.ENDED,
    ]
    assert call.direction is Direction.OUTBOUND
    assert call.hangup_by is HangupBy.SYSTEM


def test_06c_attended_transfer_keeps_identity() -> None:
    _, changes = replay("06c")
    ledger = Ledger(changes)
    (call,) = ended_calls(changes)
    assert {c.call_id for c in changes} == {call.call_id}
    assert roles(call) == [
        ("PJSIP/agent1001-00000012", Role.AGENT),
        ("PJSIP/agent1002-00000013", Role.AGENT),
        ("Local/1003@from-agents-00000000;1", Role.OTHER),
        ("Local/1003@from-agents-00000000;2", Role.OTHER),
        ("PJSIP/agent1003-00000014", Role.AGENT),
    ]
    assert ledger.states[call.call_id] == [
        CallState.RINGING,
        CallState.CONNECTED,
        CallState.ENDED,
    ]
    # the Local;2 HangupRequest is not a party's hangup
    assert call.hangup_by is HangupBy.SYSTEM


def test_13_binds_on_first_non_empty_ctid_call_id() -> None:
    model = CallModel(FakeClock())
    seen: list[tuple[str, str | None]] = []
    changes: list[CallChange] = []
    for message in messages(find("13")):
        changes.extend(model.feed(message))
        leg = model.channel("PJSIP/trunk-00000000")
        if message.name in ("Newchannel", "VarSet") and leg is not None:
            seen.append((leg.call.call_id, message.get("Variable")))
    ledger = Ledger(changes)
    # Newchannel and the VarSets before __CTID_CALL_ID: still the provisional Linkedid call
    first_bound = seen.index(("abc123", "__CTID_CALL_ID"))
    assert {call_id for call_id, _ in seen[:first_bound]} == {"1795398828.0"}
    assert ledger.rekeys == [("1795398828.0", "abc123")]
    (call,) = ended_calls(changes)
    assert call.call_id == "abc123" and not call.provisional
    assert call.linkedid == "1795398828.0"
    assert roles(call) == [
        ("PJSIP/trunk-00000000", Role.CALLER),
        ("PJSIP/agent1001-00000001", Role.AGENT),
    ]
    assert call.hangup_by is HangupBy.CALLER
    assert ledger.states["abc123"] == [CallState.RINGING, CallState.CONNECTED, CallState.ENDED]
    assert call.dnis == "1300"


def test_13_binds_through_chanvariable_without_varset() -> None:
    # Without VarSet (read= without the dialplan class) the ChanVariable lines bind.
    model = CallModel(FakeClock())
    changes: list[CallChange] = []
    for message in messages(find("13")):
        if message.name != "VarSet":
            changes.extend(model.feed(message))
    ledger = Ledger(changes)
    assert ledger.rekeys == [("1795398828.0", "abc123")]
    (call,) = ended_calls(changes)
    assert len(call.legs) == 2


def test_13_agent_leg_bound_through_destchanvariable() -> None:
    # Drop everything about the agent leg before DialBegin: it is first seen as the
    # Dest* block of DialBegin and bound by DestChanVariable: CTID_CALL_ID=abc123.
    model = CallModel(FakeClock())
    changes: list[CallChange] = []
    agent_seen_in_dial = False
    for message in messages(find("13")):
        if message.name == "DialBegin":
            agent_seen_in_dial = True
        if not agent_seen_in_dial and message.get("Channel") == "PJSIP/agent1001-00000001":
            continue
        changes.extend(model.feed(message))
    Ledger(changes)
    (call,) = ended_calls(changes)
    assert call.call_id == "abc123"
    assert roles(call)[1] == ("PJSIP/agent1001-00000001", Role.AGENT)
    assert call.hangup_by is HangupBy.CALLER


def test_13_agent_with_foreign_linkedid_joins_through_destchanvariable() -> None:
    # Even when the agent leg's Linkedid points nowhere, DialBegin's
    # DestChanVariable puts it into abc123 (no second call survives).
    model = CallModel(FakeClock())
    changes: list[CallChange] = []
    agent = "PJSIP/agent1001-00000001"
    for message in messages(find("13")):
        if message.name == "VarSet" and message.get("Channel") == agent:
            continue
        if message.name == "Newchannel" and message.get("Channel") == agent:
            headers = [(k, "elsewhere.1" if k == "Linkedid" else v) for k, v in message.headers[1:]]
            message = Message.event("Newchannel", headers)
        changes.extend(model.feed(message))
    Ledger(changes)
    calls = ended_calls(changes)
    assert [c.call_id for c in calls] == ["abc123"]
    assert [leg.channel for leg in calls[0].legs] == ["PJSIP/trunk-00000000", agent]


def _mark_at_response(action_id: str, state: CallState, call_id: str) -> Hook:
    def hook(model: CallModel, message: Message) -> list[CallChange]:
        if message.is_response and message.action_id == action_id:
            return model.mark(call_id, state)
        return []

    return hook


def test_15_hold_by_dual_redirect_then_bridge_keeps_identity() -> None:
    _, changes = replay("15", _mark_at_response("ctiref-002", CallState.HELD, "hold-15"))
    ledger = Ledger(changes)
    (call,) = ended_calls(changes)
    assert call.call_id == "hold-15"
    assert ledger.rekeys == [("1795398892.7", "hold-15")]
    rekey = [c.kind for c in changes].index(ChangeKind.REKEYED)
    assert {c.call_id for c in changes[rekey:]} == {"hold-15"}
    assert ledger.states["hold-15"] == [
        CallState.RINGING,
        CallState.CONNECTED,
        CallState.HELD,
        CallState.CONNECTED,
        CallState.ENDED,
    ]
    resumed = [c for c in changes if c.kind is ChangeKind.STATE and c.old_state is CallState.HELD]
    assert [c.event_type for c in resumed] == ["call.resumed"]
    assert [c.kind for c in changes].count(ChangeKind.ANSWERED) == 1
    assert len(call.legs) == 2
    assert call.hangup_by is HangupBy.CALLER


def test_15_without_mark_stays_connected_through_hold() -> None:
    _, changes = replay("15")
    ledger = Ledger(changes)
    assert ledger.states["hold-15"] == [CallState.RINGING, CallState.CONNECTED, CallState.ENDED]


def test_15b_redirect_of_caller_only_drops_agent_call_goes_on() -> None:
    active_at_agent_hangup: list[bool] = []

    def hook(model: CallModel, message: Message) -> list[CallChange]:
        if message.is_response and message.action_id == "ctiref-002":
            return model.mark("hold-15g", CallState.HELD)
        if message.name == "Hangup" and message.get("Channel") == "PJSIP/agent1001-0000000a":
            call = model.get("hold-15g")
            active_at_agent_hangup.append(call is not None and call.active)
        return []

    _, changes = replay("15b", hook)
    ledger = Ledger(changes)
    assert active_at_agent_hangup == [True]  # the caller is still on hold
    (call,) = ended_calls(changes)
    assert call.call_id == "hold-15g"
    assert ledger.states["hold-15g"] == [
        CallState.RINGING,
        CallState.CONNECTED,
        CallState.HELD,
        CallState.ENDED,
    ]
    assert len(call.legs) == 2
    assert call.hangup_by is HangupBy.CALLER  # the agent was dropped with its bridge


def test_17_click_to_dial_is_outbound() -> None:
    _, changes = replay("17")
    ledger = Ledger(changes)
    (call,) = ended_calls(changes)
    assert call.call_id == "ctd-1"
    assert ledger.rekeys == [("1795398999.25", "ctd-1")]
    assert call.direction is Direction.OUTBOUND
    assert call.dnis == "+15557654321"
    # the trunk leg is the customer although its Newchannel says Context: from-trunk
    assert roles(call) == [
        ("PJSIP/agent1001-00000015", Role.AGENT),
        ("PJSIP/trunk-00000016", Role.CALLER),
    ]
    assert call.hangup_by is HangupBy.CALLER  # the customer's BYE
    assert ledger.states["ctd-1"] == [CallState.RINGING, CallState.CONNECTED, CallState.ENDED]


def test_18_systemname_uniqueids() -> None:
    _, changes = replay("18")
    ledger = Ledger(changes)
    assert ledger.rekeys == [("pbx1-1795399023.0", "abc123")]
    (call,) = ended_calls(changes)
    assert [leg.uniqueid for leg in call.legs] == ["pbx1-1795399023.0", "pbx1-1795399023.1"]
    assert call.linkedid == "pbx1-1795399023.0"
    assert call.hangup_by is HangupBy.CALLER
    assert [leg.role for leg in call.legs] == [Role.CALLER, Role.AGENT]


def test_tenant_for_dnis_sets_tenant_and_service_line() -> None:
    lookups: list[str] = []

    def tenant_for(dnis: str) -> tuple[str, str | None]:
        lookups.append(dnis)
        return ("acme", "support")

    model = CallModel(FakeClock(), tenant_for)
    changes: list[CallChange] = []
    for message in messages(find("04")):
        changes.extend(model.feed(message))
    (call,) = ended_calls(changes)
    assert lookups == ["400"]
    assert (call.tenant, call.service_line) == ("acme", "support")
    assert call.to_record().service_line == "support"


def test_17_without_varset_binds_through_dest_and_originate_response() -> None:
    model = CallModel(FakeClock())
    changes: list[CallChange] = []
    for message in messages(find("17")):
        if message.name != "VarSet":
            changes.extend(model.feed(message))
    ledger = Ledger(changes)
    # the Originate's DialBegin (Dest* only) already carries DestChanVariable
    assert ledger.rekeys == [("1795398999.25", "ctd-1")]
    (call,) = ended_calls(changes)
    assert call.direction is Direction.OUTBOUND and len(call.legs) == 2
