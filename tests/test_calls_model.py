"""CallModel unit tests: identity rules, the transition table, resync, properties."""

from __future__ import annotations

import gc
import tracemalloc
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctid.asterisk.ami_protocol import AMIParser, Message
from ctid.calls import (
    MARKABLE,
    TRANSITIONS,
    CallChange,
    CallModel,
    CallModelError,
    CallState,
    CallStateError,
    ChangeKind,
    Direction,
    HangupBy,
    Role,
    Source,
    UnknownCallError,
    external_number,
)
from ctid.calls import states as call_states

CAPTURES = Path(__file__).parent / "fixtures" / "asterisk22"


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=10)
        return self.now


def capture(prefix: str) -> list[Message]:
    (path,) = CAPTURES.glob(f"{prefix}-*.ami")
    assert path.is_file(), f"capture fixture missing: {path}"
    return [m for m in AMIParser().feed(path.read_bytes()) if isinstance(m, Message)]


def block(
    name: str,
    uid: str,
    *,
    linkedid: str | None = None,
    state: str = "6",
    context: str = "from-trunk",
    exten: str = "400",
    number: str = "+15551230001",
    call_id: str | None = None,
    prefix: str = "",
) -> list[tuple[str, str]]:
    """One channel snapshot block, as Asterisk 22 writes it."""
    fields = [
        ("Channel", name),
        ("ChannelState", state),
        ("CallerIDNum", number),
        ("CallerIDName", "Caller"),
        ("Context", context),
        ("Exten", exten),
        ("Priority", "1"),
        ("Uniqueid", uid),
        ("Linkedid", linkedid or uid),
    ]
    if call_id is not None:
        fields.append(("ChanVariable", f"CTID_CALL_ID={call_id}"))
    return [(prefix + key, value) for key, value in fields]


def event(name: str, *blocks: list[tuple[str, str]], **extra: str) -> Message:
    fields = [pair for fields in blocks for pair in fields]
    return Message.event(name, [*fields, *extra.items()])


def caller(uid: str = "1.0", **kw: str) -> list[tuple[str, str]]:
    kw.setdefault("state", "4")
    return block(f"PJSIP/trunk-{uid}", uid, **kw)


def agent(uid: str, linkedid: str, **kw: str) -> list[tuple[str, str]]:
    kw.setdefault("context", "from-agents")
    kw.setdefault("number", "1001")
    return block(f"PJSIP/agent1001-{uid}", uid, linkedid=linkedid, **kw)


def feed(model: CallModel, *events: Message) -> list[CallChange]:
    out: list[CallChange] = []
    for item in events:
        out.extend(model.feed(item))
    return out


def kinds(changes: list[CallChange]) -> list[ChangeKind]:
    return [change.kind for change in changes]


def connected_call(model: CallModel, uid: str = "1.0", call_id: str | None = None) -> str:
    """An inbound call bridged with one agent; returns its call id."""
    a_uid = uid + "a"
    feed(
        model,
        event("Newchannel", caller(uid)),
        event("Newchannel", agent(a_uid, uid, state="0")),
        event("Newstate", agent(a_uid, uid)),
        event("BridgeEnter", agent(a_uid, uid), BridgeUniqueid=f"br-{uid}"),
        event("BridgeEnter", caller(uid, state="6"), BridgeUniqueid=f"br-{uid}"),
    )
    if call_id is not None:
        feed(model, event("VarSet", caller(uid), Variable="__CTID_CALL_ID", Value=call_id))
    leg = model.channel(uid)
    assert leg is not None and leg.call.state is CallState.CONNECTED
    return leg.call.call_id


# ---------------------------------------------------------------- transitions


def test_table_theory_holds() -> None:
    assert not [pair for pair in TRANSITIONS if pair[0] is CallState.ENDED]
    for state in CallState:
        if state is not CallState.ENDED:
            assert TRANSITIONS[(state, CallState.ENDED)] is Source.AMI
    for (old, new), source in TRANSITIONS.items():
        assert old is not new
        if new in MARKABLE:
            assert source is Source.CTID, (old, new)
        else:
            assert source is Source.AMI, (old, new)


def test_mark_walks_the_table_and_event_types_map() -> None:
    model = CallModel(FakeClock())
    feed(model, event("Newchannel", caller()))
    changes: list[CallChange] = []
    for state in ("ivr", CallState.QUEUED, "offered", "queued", "offered"):
        changes += model.mark("1.0", state)
    assert [c.event_type for c in changes] == [
        "call.ivr",
        "call.queued",
        "call.offered",
        "call.queued",
        "call.offered",
    ]
    assert model.mark("1.0", "offered") == []  # same state: a no-op
    changes = feed(
        model,
        event("Newchannel", agent("1.1", "1.0", state="0")),
        event("BridgeEnter", agent("1.1", "1.0"), BridgeUniqueid="b"),
        event("BridgeEnter", caller(state="6"), BridgeUniqueid="b"),
    )
    assert [(c.kind, c.old_state, c.new_state) for c in changes if c.kind is ChangeKind.STATE] == [
        (ChangeKind.STATE, CallState.OFFERED, CallState.CONNECTED)
    ]
    assert [c.event_type for c in changes if c.event_type] == ["call.answered"]
    assert [c.event_type for c in model.mark("1.0", "transferring")] == [None]


@pytest.mark.parametrize(
    ("setup", "target"),
    [
        ((), "held"),  # ringing -> held
        ((), "connected"),  # only AMI connects
        ((), "ended"),  # only the last hangup ends a call
        ((), "ringing"),
        ((), "nonsense"),
        (("queued",), "transferring"),
        (("ivr", "queued", "offered"), "held"),
    ],
)
def test_illegal_mark_raises_call_state_error(setup: tuple[str, ...], target: str) -> None:
    model = CallModel(FakeClock())
    feed(model, event("Newchannel", caller()))
    for state in setup:
        model.mark("1.0", state)
    before = model.calls["1.0"].state
    with pytest.raises(CallStateError) as info:
        model.mark("1.0", target)
    assert info.value.call_id == "1.0" and info.value.old is before
    assert model.calls["1.0"].state is before


def test_mark_unknown_and_ended_calls() -> None:
    model = CallModel(FakeClock())
    with pytest.raises(UnknownCallError):
        model.mark("nope", "ivr")
    feed(model, event("Newchannel", caller()), event("Hangup", caller(), Cause="16"))
    with pytest.raises(CallStateError, match="ended"):
        model.mark("1.0", "ivr")


def test_illegal_transition_from_ami_is_a_diagnostic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(call_states.TRANSITIONS, (CallState.OFFERED, CallState.CONNECTED))
    model = CallModel(FakeClock())
    feed(model, event("Newchannel", caller()))
    model.mark("1.0", "offered")
    changes = feed(
        model,
        event("Newchannel", agent("1.1", "1.0", state="0")),
        event("BridgeEnter", agent("1.1", "1.0"), BridgeUniqueid="b"),
        event("BridgeEnter", caller(state="6"), BridgeUniqueid="b"),
    )
    diagnostics = [c for c in changes if c.kind is ChangeKind.DIAGNOSTIC]
    assert len(diagnostics) == 1 and "offered -> connected" in (diagnostics[0].detail or "")
    assert model.calls["1.0"].state is CallState.OFFERED
    assert ChangeKind.ANSWERED not in kinds(changes)


# ------------------------------------------------------------------- identity


def test_direction_rules() -> None:
    model = CallModel(FakeClock())
    feed(
        model,
        event("Newchannel", caller("1.0")),  # incoming on a trunk context
        event("Newchannel", block("PJSIP/agent1002-1", "2.0", state="4", context="from-agents")),
        event("Newchannel", block("PJSIP/agent1003-1", "3.0", state="0", context="from-agents")),
    )
    assert model.calls["1.0"].direction is Direction.INBOUND
    assert model.calls["2.0"].direction is Direction.INTERNAL
    assert model.calls["3.0"].direction is Direction.OUTBOUND  # Originate: created Down
    # an internal call that dials an external number becomes outbound
    feed(
        model,
        event("Newchannel", block("PJSIP/trunk-9", "2.1", linkedid="2.0", state="0")),
        event(
            "DialBegin",
            block("PJSIP/agent1002-1", "2.0", context="from-agents"),
            block("PJSIP/trunk-9", "2.1", linkedid="2.0", state="0", prefix="Dest"),
            DialString="+4930123456@trunk",
        ),
    )
    internal = model.calls["2.0"]
    assert internal.direction is Direction.OUTBOUND and internal.dnis == "+4930123456"
    assert [leg.role for leg in internal.legs] == [Role.AGENT, Role.CALLER]


@pytest.mark.parametrize(
    ("dial", "number"),
    [
        ("+15557654321@trunk", "+15557654321"),
        ("PJSIP/+15557654321@trunk", "+15557654321"),
        ("PJSIP/trunk/sip:004930123456@10.0.0.1", "004930123456"),
        ("PJSIP/agent1001", None),
        ("agent1001", None),
        ("1003", None),
        ("PJSIP/agent1001&PJSIP/agent1002", None),
        ("", None),
    ],
)
def test_external_number(dial: str, number: str | None) -> None:
    assert external_number(dial) == number


def test_caller_id_is_data_never_rejected() -> None:
    model = CallModel(FakeClock())
    odd = "'; DROP TABLE calls;--\u202e\U0001f4de"
    feed(model, event("Newchannel", caller(number=odd)))
    assert model.calls["1.0"].caller_number == odd
    feed(model, event("Newchannel", caller("2.0", number="<unknown>")))
    assert model.calls["2.0"].caller_number is None


def test_provisional_call_merges_into_existing_call_with_that_id() -> None:
    model = CallModel(FakeClock())
    feed(model, event("Newchannel", caller("1.0", call_id="real-1")))
    assert "real-1" in model.calls and not model.calls["real-1"].provisional
    # a channel with its own Linkedid that later turns out to belong to real-1
    feed(model, event("Newchannel", block("Local/x@ctx-1;1", "5.0", state="0")))
    assert "5.0" in model.calls
    changes = feed(model, event("VarSet", block("Local/x@ctx-1;1", "5.0"), Variable="__CTID_CALL_ID", Value="real-1"))
    assert [(c.kind, c.call_id, c.old_call_id) for c in changes] == [(ChangeKind.REKEYED, "real-1", "5.0")]
    assert set(model.calls) == {"real-1"}
    assert [leg.uniqueid for leg in model.calls["real-1"].legs] == ["1.0", "5.0"]


def test_two_calls_with_ids_are_never_merged() -> None:
    model = CallModel(FakeClock())
    feed(
        model,
        event("Newchannel", caller("1.0", call_id="a")),
        event("Newchannel", block("PJSIP/trunk-b", "2.0", state="0", call_id="b")),
    )
    # ctid bridges a callback leg of "b" with "a"'s caller; Asterisk spreads the
    # oldest Linkedid (1.0) onto the callback channel.
    changes = feed(
        model,
        event("BridgeEnter", caller("1.0", state="6", call_id="a"), BridgeUniqueid="x"),
        event(
            "BridgeEnter",
            block("PJSIP/trunk-b", "2.0", linkedid="1.0", call_id="b"),
            BridgeUniqueid="x",
        ),
        event(
            "DialBegin",
            caller("1.0", state="6", call_id="a"),
            block("PJSIP/trunk-b", "2.0", linkedid="1.0", call_id="b", prefix="Dest"),
            DialString="agent1001",
        ),
    )
    assert ChangeKind.REKEYED not in kinds(changes)
    assert set(model.calls) == {"a", "b"}
    assert [leg.uniqueid for leg in model.calls["b"].legs] == ["2.0"]
    # a channel created later from the callback leg carries b's id: it joins b
    feed(model, event("Newchannel", block("PJSIP/agent-x", "3.0", linkedid="1.0", state="0")))
    feed(model, event("VarSet", block("PJSIP/agent-x", "3.0", linkedid="1.0"), Variable="__CTID_CALL_ID", Value="b"))
    assert [leg.uniqueid for leg in model.calls["b"].legs] == ["2.0", "3.0"]
    assert [leg.uniqueid for leg in model.calls["a"].legs] == ["1.0"]


def test_channel_carrying_an_ended_calls_id_does_not_resurrect_it() -> None:
    model = CallModel(FakeClock())
    feed(
        model,
        event("Newchannel", caller("1.0", call_id="gone")),
        event("Hangup", caller("1.0", call_id="gone"), Cause="16"),
    )
    changes = feed(model, event("Newchannel", caller("2.0", call_id="gone")))
    assert "gone" not in model.calls
    assert ChangeKind.DIAGNOSTIC in kinds(changes)
    (call,) = model.calls.values()
    assert call.call_id == "2.0" and call.provisional


def test_overlong_call_id_is_refused_with_a_diagnostic() -> None:
    model = CallModel(FakeClock())
    feed(model, event("Newchannel", caller()))
    changes = feed(model, event("VarSet", caller(), Variable="__CTID_CALL_ID", Value="x" * 65))
    assert kinds(changes) == [ChangeKind.DIAGNOSTIC]
    assert set(model.calls) == {"1.0"}
    # reported once per channel, not on every later event
    again = feed(model, event("VarSet", caller(), Variable="__CTID_CALL_ID", Value="x" * 65))
    assert again == []


def test_late_and_duplicate_events_are_ignored() -> None:
    model = CallModel(FakeClock())
    messages = capture("02")
    changes = feed(model, *messages)
    assert kinds(changes).count(ChangeKind.ENDED) == 1
    late = feed(model, *messages)  # the whole call again: nothing comes back to life
    assert late == [] and not model.calls


def test_ignored_events_cost_nothing() -> None:
    model = CallModel(FakeClock())
    noise = [
        event("CEL", caller(), EventName="CHAN_START"),
        event("VarSet", caller(), Variable="RTPAUDIOQOS", Value="ssrc=1"),
        event("DeviceStateChange", Device="PJSIP/trunk", State="INUSE"),
        event("Newexten", caller(), Application="Playback"),
        event("Cdr", Source="+1555"),
        Message.action("Hangup", [("Channel", "PJSIP/trunk-1.0")]),
    ]
    assert feed(model, *noise) == []
    assert not model.calls and not model.channels


def test_answered_once_and_hangup_by_after_a_transfer() -> None:
    model = CallModel(FakeClock())
    call_id = connected_call(model)
    # blind transfer by the agent: agent leg soft-hung up, then a new agent is bridged
    changes = feed(
        model,
        event("BridgeLeave", agent("1.0a", "1.0"), BridgeUniqueid="br-1.0"),
        event("SoftHangupRequest", agent("1.0a", "1.0"), Cause="16"),
        event("Hangup", agent("1.0a", "1.0"), Cause="16"),
        event("Newchannel", agent("1.0b", "1.0", state="0")),
        event("Newstate", agent("1.0b", "1.0")),
        event("BridgeEnter", agent("1.0b", "1.0"), BridgeUniqueid="br-1.0"),
        event("HangupRequest", caller(state="6")),
        event("Hangup", caller(state="6"), Cause="16"),
        event("Hangup", agent("1.0b", "1.0"), Cause="16"),
    )
    assert ChangeKind.ANSWERED not in kinds(changes)
    (ended,) = [c.call for c in changes if c.kind is ChangeKind.ENDED]
    assert ended.call_id == call_id and ended.hangup_by is HangupBy.CALLER
    assert ended.hangup_cause == 16 and len(ended.legs) == 3


def test_soft_hangup_of_caller_is_system_and_ctid_when_announced() -> None:
    for announce, expected in ((False, HangupBy.SYSTEM), (True, HangupBy.CTID)):
        model = CallModel(FakeClock())
        feed(model, event("Newchannel", caller()))
        if announce:
            model.expect_hangup("PJSIP/trunk-1.0")
        changes = feed(
            model,
            event("SoftHangupRequest", caller(), Cause="16"),
            event("Hangup", caller(), Cause="16"),
        )
        assert changes[-1].kind is ChangeKind.ENDED
        assert changes[-1].call.hangup_by is expected


def test_rename_keeps_the_leg() -> None:
    model = CallModel(FakeClock())
    feed(model, event("Newchannel", caller()))
    feed(model, event("Rename", Channel="PJSIP/trunk-1.0", Newname="PJSIP/trunk-new", Uniqueid="1.0"))
    leg = model.channel("PJSIP/trunk-new")
    assert leg is not None and leg is model.channel("1.0")
    assert model.channel("PJSIP/trunk-1.0") is None


def test_annotate_and_to_record() -> None:
    model = CallModel(FakeClock())
    call_id = connected_call(model, call_id="c-1")
    model.annotate(call_id, tenant="acme", service_line="sales", data={"lang": "zh"})
    record = model.calls[call_id].to_record()
    assert (record.tenant, record.service_line, dict(record.data)) == ("acme", "sales", {"lang": "zh"})
    assert record.state == "connected" and record.direction == "inbound"
    assert [leg.role for leg in record.legs] == ["caller", "agent"]
    with pytest.raises(UnknownCallError):
        model.annotate("nope", tenant="x")


def _changes(changes: list[CallChange]) -> list[tuple[ChangeKind, str, str | None]]:
    return [(c.kind, c.call_id, c.old_call_id) for c in changes]


def test_bind_call_id_gives_the_changes_of_the_varset_it_replaces() -> None:
    """ctid's FastAGI script binds the channel it identified: the ctid AMI user reads no
    ``dialplan`` class, so no VarSet follows. Same changes as the VarSet would give."""
    by_varset, by_agi = CallModel(FakeClock()), CallModel(FakeClock())
    feed(by_varset, event("Newchannel", caller()))
    feed(by_agi, event("Newchannel", caller()))
    want = feed(by_varset, event("VarSet", caller(), Variable="__CTID_CALL_ID", Value="c-1"))
    got = by_agi.bind_call_id("1.0", "c-1", channel="PJSIP/trunk-1.0")
    assert _changes(got) == _changes(want) == [(ChangeKind.REKEYED, "c-1", "1.0")]
    assert set(by_agi.calls) == {"c-1"} and not by_agi.calls["c-1"].provisional
    # Again, or the ChanVariable of the next call event: already bound, nothing changes.
    assert by_agi.bind_call_id("1.0", "c-1") == []
    assert feed(by_agi, event("Newstate", caller(state="6", call_id="c-1"))) == []
    # A channel the model knows only by name (the Uniqueid is not the one it has).
    feed(by_agi, event("Newchannel", caller("2.0")))
    assert _changes(by_agi.bind_call_id("", "c-2", channel="PJSIP/trunk-2.0")) == [
        (ChangeKind.REKEYED, "c-2", "2.0")]


def test_bind_call_id_before_the_newchannel_is_read_binds_when_it_arrives() -> None:
    # The FastAGI session can be served before the AMI reader has got to the Newchannel.
    model = CallModel(FakeClock())
    assert model.bind_call_id("1.0", "early-1", channel="PJSIP/trunk-1.0") == []
    changes = feed(model, event("Newchannel", caller()))
    assert _changes(changes)[0] == (ChangeKind.STARTED, "early-1", None)
    call = model.calls["early-1"]
    assert not call.provisional and call.direction is Direction.INBOUND
    assert [leg.uniqueid for leg in call.legs] == ["1.0"]


def test_bind_call_id_of_a_channel_gone_or_an_unusable_id() -> None:
    model = CallModel(FakeClock())
    feed(model, event("Newchannel", caller()), event("Hangup", caller(), Cause="16"))
    assert model.bind_call_id("1.0", "late") == []
    feed(model, event("Newchannel", block("PJSIP/trunk-1.0", "1.0")))  # dead Uniqueid: not adopted
    assert model.calls == {}
    feed(model, event("Newchannel", caller("2.0")))
    assert kinds(model.bind_call_id("2.0", "bad id/")) == [ChangeKind.DIAGNOSTIC]
    assert set(model.calls) == {"2.0"} and model.calls["2.0"].provisional


def test_bind_call_id_moves_a_leg_of_another_identified_call() -> None:
    model = CallModel(FakeClock())
    feed(model, event("Newchannel", caller("1.0", call_id="a")),
         event("Newchannel", agent("1.1", "1.0", state="0")))
    assert [leg.uniqueid for leg in model.calls["a"].legs] == ["1.0", "1.1"]
    changes = model.bind_call_id("1.1", "b")
    assert [(c.kind, c.call_id) for c in changes] == [(ChangeKind.STARTED, "b"), (ChangeKind.LEG_ADDED, "b")]
    assert [leg.uniqueid for leg in model.calls["b"].legs] == ["1.1"]
    assert [leg.uniqueid for leg in model.calls["a"].legs] == ["1.0"]


# --------------------------------------------------------------------- resync


def _split_13() -> tuple[list[Message], list[Message], list[Message]]:
    """13 before the CoreShowChannels list, its two items, and what follows."""
    messages = capture("13")
    items = [m for m in messages if m.name == "CoreShowChannel"]
    start = next(i for i, m in enumerate(messages) if m.action_id == "ctiref-002")
    end = next(i for i, m in enumerate(messages) if m.name == "CoreShowChannelsComplete")
    return messages[:start], items, messages[end + 1 :]


def test_resync_ends_calls_whose_channels_vanished() -> None:
    before, items, after = _split_13()
    model = CallModel(FakeClock())
    feed(model, *before)
    assert model.calls["abc123"].state is CallState.CONNECTED
    # link lost; when it is back, Asterisk lists only the caller
    model.begin_resync()
    model.resync_channel(items[0])
    changes = model.end_resync()
    assert [(c.kind, c.leg and c.leg.channel) for c in changes] == [(ChangeKind.LEG_ENDED, "PJSIP/agent1001-00000001")]
    assert set(model.channels) == {"1795398828.0"}
    # next time nothing is listed: the call ends, by whom and why unknown
    model.begin_resync()
    changes = model.end_resync()
    assert kinds(changes) == [ChangeKind.LEG_ENDED, ChangeKind.ENDED]
    call = changes[-1].call
    assert call.hangup_by is HangupBy.UNKNOWN and call.hangup_cause is None
    assert not model.calls and not model.channels
    # the hangups that really happened arrive late: ignored, never resurrected
    assert feed(model, *after) == []


def test_resync_adopts_unknown_channels() -> None:
    _, items, after = _split_13()
    model = CallModel(FakeClock())
    model.begin_resync()
    for item in items:
        model.resync_channel(item)
    changes = model.end_resync()
    assert kinds(changes) == [
        ChangeKind.STARTED,
        ChangeKind.LEG_ADDED,
        ChangeKind.LEG_ADDED,
        ChangeKind.STATE,
        ChangeKind.ANSWERED,
    ]
    call = model.calls["abc123"]
    assert call.state is CallState.CONNECTED and call.direction is Direction.INBOUND
    assert [(leg.channel, leg.role) for leg in call.legs] == [
        ("PJSIP/trunk-00000000", Role.CALLER),
        ("PJSIP/agent1001-00000001", Role.AGENT),
    ]
    assert set(model.channels) == {item["Uniqueid"] for item in items}
    rest = feed(model, *after)
    assert kinds(rest).count(ChangeKind.ENDED) == 1
    assert rest[-1].call.hangup_by is HangupBy.CALLER


def test_an_originator_listed_after_a_live_event_of_its_agent_leg_says_what_the_call_is() -> None:
    # The link came back while the fallback queue rang an agent for a call that started
    # during the outage: the agent leg's Newchannel (with the inherited CTID_CALL_ID) is
    # fed live during the resync, before the caller's CoreShowChannel item is applied.
    model = CallModel(FakeClock(), lambda dnis: ("acme", "acme-support") if dnis == "200" else ("default", None))
    model.begin_resync()
    feed(model, event("Newchannel", agent("5.1", "5.0", state="0", call_id="x1")))
    assert model.calls["x1"].direction is not Direction.INBOUND  # all it can tell from that leg
    item = Message.event("CoreShowChannel", [
        *block("PJSIP/trunk-5.0", "5.0", state="6", context="ctid-fallback", exten="s", number="+15551230005",
               call_id="x1"),
        ("ChanVariable", "CTID_TENANT=acme"), ("ChanVariable", "CTID_SERVICE_LINE=acme-support"),
        ("ChanVariable", "CTID_DNIS=200"), ("Application", "Queue"), ("ApplicationData", "ctid-fallback"),
        ("Duration", "00:00:01")])
    model.resync_channel(item)
    model.end_resync()
    call = model.calls["x1"]
    assert (call.direction, call.caller_number, call.dnis, call.tenant, call.service_line) == (
        Direction.INBOUND, "+15551230005", "200", "acme", "acme-support")
    assert {leg.channel: leg.role for leg in call.legs} == {"PJSIP/agent1001-5.1": Role.AGENT,
                                                           "PJSIP/trunk-5.0": Role.CALLER}


def test_resync_click_to_dial_is_outbound() -> None:
    messages = capture("17")
    model = CallModel(FakeClock())
    model.begin_resync()
    for item in messages:
        if item.name == "CoreShowChannel":
            model.resync_channel(item)
    model.end_resync()
    call = model.calls["ctd-1"]
    assert call.direction is Direction.OUTBOUND and call.dnis == "+15557654321"
    assert {leg.channel: leg.role for leg in call.legs} == {
        "PJSIP/agent1001-00000015": Role.AGENT,
        "PJSIP/trunk-00000016": Role.CALLER,
    }


def test_resync_keeps_channels_seen_live_and_skips_those_hung_up_meanwhile() -> None:
    before, items, after = _split_13()
    model = CallModel(FakeClock())
    feed(model, *before)
    model.begin_resync()
    for item in items:
        model.resync_channel(item)
    # live events between the list and its end: a new call, and 13's hangups
    feed(model, event("Newchannel", caller("9.0")))
    feed(model, *after)
    changes = model.end_resync()
    assert changes == []
    assert set(model.calls) == {"9.0"}
    assert set(model.channels) == {"9.0"}


def test_resync_of_a_provisional_call_binds_the_id() -> None:
    model = CallModel(FakeClock())
    feed(model, event("Newchannel", caller()))
    model.begin_resync()
    model.resync_channel(event("CoreShowChannel", caller(state="6", call_id="late-id"), BridgeId=""))
    model.resync_channel(event("CoreShowChannel", agent("7.7", "1.0", call_id="late-id"), BridgeId=""))
    changes = model.end_resync()
    assert kinds(changes) == [ChangeKind.REKEYED, ChangeKind.LEG_ADDED]
    call = model.calls["late-id"]
    assert [leg.role for leg in call.legs] == [Role.CALLER, Role.AGENT]
    assert call.state is CallState.RINGING  # not bridged


def test_resync_misuse_is_an_error() -> None:
    model = CallModel(FakeClock())
    with pytest.raises(CallModelError):
        model.resync_channel(event("CoreShowChannel", caller()))
    with pytest.raises(CallModelError):
        model.end_resync()


# ------------------------------------------------------------------ properties

LATE_KINDS = ("Hangup", "Newstate", "BridgeEnter", "VarSet", "HangupRequest", "Newchannel")


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_hangup_interleavings_never_end_a_call_twice(data: st.DataObject) -> None:
    model = CallModel(FakeClock())
    legs_by_uid: dict[str, list[tuple[str, str]]] = {}
    setup: list[Message] = []
    for n in range(data.draw(st.integers(1, 3), label="calls")):
        root = f"{n}.0"
        legs = [caller(root)]
        for i in range(data.draw(st.integers(0, 3), label="agents")):
            legs.append(agent(f"{n}.{i + 1}", root, state="6"))
        for leg in legs:
            legs_by_uid[dict(leg)["Uniqueid"]] = leg
        setup += [event("Newchannel", leg) for leg in legs]
        if len(legs) > 1 and data.draw(st.booleans(), label="bridged"):
            setup += [event("BridgeEnter", leg, BridgeUniqueid=f"b{n}") for leg in legs[:2]]
        if data.draw(st.booleans(), label="has id"):
            setup.append(event("VarSet", legs[0], Variable="__CTID_CALL_ID", Value=f"id-{n}"))
    feed(model, *setup)
    uids = sorted(legs_by_uid)
    must = data.draw(st.lists(st.sampled_from(uids), unique=True), label="hung up")
    noise = data.draw(
        st.lists(st.tuples(st.sampled_from(LATE_KINDS), st.sampled_from(uids)), max_size=25),
        label="noise",
    )
    stream = data.draw(st.permutations([("Hangup", uid) for uid in must] + noise), label="order")
    ended: Counter[str] = Counter()
    hung: set[str] = set()
    for kind, uid in stream:
        leg = legs_by_uid[uid]
        if kind == "VarSet":  # ctid re-tags a channel
            message = event(kind, leg, Variable="__CTID_CALL_ID", Value=f"other-{uid}")
        elif kind == "BridgeEnter":
            message = event(kind, leg, BridgeUniqueid="late")
        else:
            message = event(kind, leg, Cause="16")
        if kind == "Hangup":
            hung.add(uid)
        for change in model.feed(message):
            assert change.kind is not ChangeKind.DIAGNOSTIC, change.detail
            if change.kind is ChangeKind.ENDED:
                ended[change.call_id] += 1
                # a call ends only when every one of its legs has hung up
                assert all(leg.uniqueid in hung for leg in change.call.legs)
            if change.kind in (ChangeKind.STARTED, ChangeKind.LEG_ADDED):
                assert change.leg is None or change.leg.uniqueid not in hung
    assert all(count == 1 for count in ended.values()), ended
    for uid in uids:
        assert (model.channel(uid) is None) == (uid in hung)
    for call in model.calls.values():
        assert call.live > 0 and call.call_id not in ended
        assert all(leg.uniqueid not in hung for leg in call.active_legs)


def test_memory_for_1000_concurrent_calls() -> None:
    gc.collect()
    tracemalloc.start()
    try:
        model = CallModel(FakeClock())
        for n in range(1000):
            connected_call(model, f"{1795400000 + n}.{n}", call_id=f"call-{n:06d}")
        gc.collect()
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(model.calls) == 1000 and len(model.channels) == 2000
    assert used < 25 * 1024 * 1024, f"{used / 1e6:.1f} MB for 1000 calls"


def test_originate_response_chanvariable_form_binds() -> None:
    model = CallModel(FakeClock())
    feed(model, event("Newchannel", block("PJSIP/agent1001-15", "7.0", state="0", context="from-agents")))
    changes = feed(
        model,
        Message.event(
            "OriginateResponse",
            [
                ("Response", "Success"),
                ("Channel", "PJSIP/agent1001-15"),
                ("Context", "ctid-clicktodial"),
                ("Exten", "+15557654321"),
                ("Uniqueid", "7.0"),
                ("ChanVariable(PJSIP/agent1001-15)", "CTID_CALL_ID=ctd-9"),
            ],
        ),
    )
    assert [(c.kind, c.old_call_id) for c in changes] == [(ChangeKind.REKEYED, "7.0")]
    call = model.calls["ctd-9"]
    assert call.direction is Direction.OUTBOUND and call.dnis == "+15557654321"


def test_irrelevant_events_are_not_even_split() -> None:
    # The parser splits headers lazily; the model must not force it for noise.
    raw = (
        b"Asterisk Call Manager/11.0.0\r\n"
        b"Event: VarSet\r\nPrivilege: dialplan,all\r\nChannel: PJSIP/trunk-1\r\nUniqueid: 1.0\r\n"
        b"Linkedid: 1.0\r\nChanVariable: CTID_CALL_ID=x\r\nVariable: RTPAUDIOQOS\r\nValue: ssrc=1\r\n\r\n"
        b"Event: CEL\r\nPrivilege: call,all\r\nEventName: CHAN_START\r\nUniqueID: 1.0\r\n\r\n"
        b"Event: VarSet\r\nPrivilege: dialplan,all\r\nChannel: PJSIP/trunk-1\r\nUniqueid: 1.0\r\n"
        b"Linkedid: 1.0\r\nChanVariable: CTID_CALL_ID=\r\nVariable: __CTID_CALL_ID\r\nValue: x\r\n\r\n"
    )
    noise_varset, cel, ctid_varset = (m for m in AMIParser().feed(raw) if isinstance(m, Message))
    model = CallModel(FakeClock())
    assert feed(model, noise_varset, cel) == []
    assert not noise_varset.parsed and not cel.parsed
    feed(model, ctid_varset)  # the one that matters is read (and adopts the channel)
    assert "x" in model.calls
