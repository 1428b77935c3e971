"""The sans-I/O AMI parser and correlator, against every byte of the real captures."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from ctid.asterisk.ami_protocol import (
    ActionTracker,
    AMIParser,
    AMIProtocolError,
    AMIValueError,
    Greeting,
    Malformed,
    Message,
    MessageKind,
    build_action,
    serialize,
)

CAPTURES = Path(__file__).parent / "fixtures" / "asterisk22"
ALL_AMI = sorted(CAPTURES.glob("*.ami"))


def _readme_counts() -> dict[str, tuple[int, int]]:
    """(messages after greeting, events) per capture, as stated by the capture README."""
    text = (CAPTURES / "README.md").read_text()
    counts: dict[str, tuple[int, int]] = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        name = section.split()[0]
        m = re.search(r"(\d+) messages after the greeting: \*\*(\d+) events\*\*", section)
        if m and name.endswith(".ami"):
            counts[name] = (int(m.group(1)), int(m.group(2)))
    return counts


def _parse_all(data: bytes, chunks: list[int]) -> list[object]:
    parser = AMIParser()
    items: list[object] = []
    pos = 0
    i = 0
    while pos < len(data):
        size = chunks[i % len(chunks)]
        items += parser.feed(data[pos:pos + size])
        pos += size
        i += 1
    assert parser.buffered == 0
    return items


def test_captures_are_all_present() -> None:
    assert len(ALL_AMI) >= 30, "capture fixtures missing"
    assert set(_readme_counts()) <= {p.name for p in ALL_AMI}


@pytest.mark.parametrize("path", ALL_AMI, ids=lambda p: p.name)
def test_capture_parses_byte_for_byte_in_any_chunking(path: Path) -> None:
    data = path.read_bytes()
    whole = _parse_all(data, [len(data)])
    assert isinstance(whole[0], Greeting) and whole[0].version == "11.0.0"
    messages = whole[1:]
    assert not [m for m in messages if isinstance(m, Malformed)]
    expected = _readme_counts().get(path.name)
    if expected is not None:
        assert len(messages) == expected[0]
        assert sum(1 for m in messages if isinstance(m, Message) and m.is_event) == expected[1]
    rng = random.Random(path.name)
    for chunks in ([1], [7], [rng.randint(1, 300) for _ in range(50)]):
        assert _parse_all(data, chunks) == whole
    # Re-framing the parsed headers gives back the exact bytes: nothing was lost or altered.
    rebuilt = (whole[0].line + "\r\n").encode() + b"".join(
        ("".join(f"{k}: {v}\r\n" for k, v in m.headers) + "\r\n").encode()
        for m in messages if isinstance(m, Message)
    )
    assert rebuilt == data


def test_utf8_character_split_across_reads_survives() -> None:
    block = "Event: Newchannel\r\nCallerIDName: Zoë\r\n\r\n".encode()
    cut = block.index("ë".encode()) + 1  # between the two bytes of ë
    parser = AMIParser(expect_greeting=False)
    assert parser.feed(block[:cut]) == []
    (message,) = parser.feed(block[cut:])
    assert isinstance(message, Message) and message["CallerIDName"] == "Zoë"


def test_invalid_utf8_is_reported_and_the_stream_continues() -> None:
    parser = AMIParser(expect_greeting=False)
    items = parser.feed(b"Event: X\r\nName: \xff\xfe\r\n\r\nEvent: Y\r\nA: b\r\n\r\n")
    assert isinstance(items[0], Malformed) and "invalid UTF-8" in items[0].reason
    assert isinstance(items[1], Message) and items[1].name == "Y"


def test_line_without_colon_is_a_defect_and_unknown_type_is_malformed() -> None:
    parser = AMIParser(expect_greeting=False)
    items = parser.feed(b"Event: X\r\ngarbage line\r\nA: b\r\n\r\nFoo: bar\r\n\r\nEvent: Z\r\n\r\n")
    assert [type(i) for i in items] == [Message, Malformed, Message]
    first = items[0]
    assert isinstance(first, Message)
    assert first["A"] == "b" and "garbage line" in first.defects[0]
    assert "unknown message type" in items[1].reason  # type: ignore[union-attr]


def test_a_peer_that_is_not_asterisk_is_a_protocol_error() -> None:
    with pytest.raises(AMIProtocolError):
        AMIParser().feed(b"SSH-2.0-OpenSSH_9.2\r\n")
    with pytest.raises(AMIProtocolError):
        AMIParser().feed(b"x" * 2000)


def test_runaway_message_is_a_protocol_error() -> None:
    parser = AMIParser(expect_greeting=False, max_message_bytes=1000)
    with pytest.raises(AMIProtocolError):
        parser.feed(b"Event: X\r\n" + b"A: b\r\n" * 300)


def _messages(name: str) -> list[Message]:
    items = AMIParser().feed((CAPTURES / name).read_bytes())
    return [m for m in items if isinstance(m, Message)]


def test_repeated_output_lines_keep_every_value() -> None:
    (command,) = [m for m in _messages("01-login-and-idle.ami") if m.get("Message") == "Command output follows"]
    outputs = command.get_all("Output")
    assert outputs[0].startswith("Asterisk 22.11.0-rc1")


def test_channel_variables_in_all_three_forms() -> None:
    events = _messages("13-channelvars-inherited-dial.ami")
    dial = next(m for m in events if m.name == "DialBegin")
    assert dial.chan_variables()["CTID_CALL_ID"] == "abc123"
    assert dial.chan_variables("DestChanVariable")["CTID_CALL_ID"] == "abc123"
    newchannel = next(m for m in events if m.name == "Newchannel")
    assert newchannel.chan_variables() == {"CTID_CALL_ID": "", "CTID_QUEUE": ""}
    originate = next(m for m in _messages("17-click-to-dial-originate-trunk.ami")
                     if m.name == "OriginateResponse")
    assert originate.chan_variables()["CTID_CALL_ID"] == "ctd-1"


def test_park_response_keeps_its_bare_lf_verbatim() -> None:
    park = next(m for m in _messages("16-park-and-retrieve.ami") if m.get("Message", "").startswith("Park successful"))
    assert park["Message"] == "Park successful\n"


def test_event_lists_are_collected_per_action_id() -> None:
    sent = (CAPTURES / "01-login-and-idle.sent.txt").read_text()
    tracker = ActionTracker()
    for action_id in re.findall(r"ActionID: (.+?)\r?\n", sent):
        tracker.register(action_id)
    done = {}
    passthrough = []
    for message in _messages("01-login-and-idle.ami"):
        completions, rest = tracker.feed(message)
        done.update({c.action_id: c for c in completions})
        if rest is not None:
            passthrough.append(rest)
    queue_status = next(c for c in done.values() if c.complete is not None and c.complete.name == "QueueStatusComplete"
                        and c.events)
    assert queue_status.response.name == "Success"
    assert int(queue_status.complete.get("ListItems") or -1) == len(queue_status.events)
    assert {e.name for e in queue_status.events} <= {"QueueParams", "QueueMember", "QueueEntry"}
    # The odd ActionID is echoed verbatim and still correlates.
    assert done["bad id with spaces/&%"].response["Ping"] == "Pong"
    # Unsolicited events and the Ping without ActionID are passed through.
    assert {m.name for m in passthrough} >= {"FullyBooted", "SuccessfulAuth", "Success"}
    assert not list(tracker.pending())


def test_event_list_cut_mid_stream_stays_open_until_cleared() -> None:
    tracker = ActionTracker()
    tracker.register("a1")
    tracker.feed(Message.response("Success", [("ActionID", "a1"), ("EventList", "start")]))
    completions, _ = tracker.feed(Message.event("CoreShowChannel", [("ActionID", "a1")]))
    assert completions == [] and list(tracker.pending()) == ["a1"]
    assert tracker.clear() == ["a1"]


def test_async_originate_response_event_is_dispatched_not_swallowed() -> None:
    tracker = ActionTracker()
    tracker.register("o1")
    completions, _ = tracker.feed(Message.response("Success", [("ActionID", "o1"),
                                                               ("Message", "Originate successfully queued")]))
    assert completions[0].ok
    _, rest = tracker.feed(Message.event("OriginateResponse", [("ActionID", "o1")]))
    assert rest is not None and rest.name == "OriginateResponse"


@pytest.mark.parametrize("value", ["x\r\nAction: Originate", "x\nChannel: PJSIP/evil", "x\rY", "a\x00b"])
def test_cr_lf_nul_never_reach_the_wire(value: str) -> None:
    with pytest.raises(AMIValueError):
        build_action("Setvar", "1", {"Variable": "X", "Value": value})
    with pytest.raises(AMIValueError):
        build_action("Setvar", "1", {value: "x"})
    with pytest.raises(AMIValueError):
        serialize(Message(MessageKind.ACTION, [("Action", "Ping"), ("ActionID", value)]))


def test_build_action_repeats_list_values_in_order() -> None:
    action = build_action("Originate", "7", {"Channel": "PJSIP/1001", "Variable": ["A=1", "B=2"]})
    assert serialize(action) == (b"Action: Originate\r\nActionID: 7\r\nChannel: PJSIP/1001\r\n"
                                 b"Variable: A=1\r\nVariable: B=2\r\n\r\n")
