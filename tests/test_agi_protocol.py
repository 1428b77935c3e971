"""Sans-I/O FastAGI: replay every real Asterisk 22 capture through AGIConnection."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctid.asterisk.agi_protocol import (
    EOF,
    NEED_DATA,
    TRANSITIONS,
    AGIConnection,
    AGIEnvironment,
    AGIProtocolError,
    AGIReply,
    AGIStateError,
    CommandPendingError,
    Event,
    HangupLine,
    State,
)
from ctid.asterisk.safety import AGIValueError
from tests.agi_trace import TRACE_DIR, Trace, load_trace

# What each capture must produce after the environment, in order: a reply code,
# "H" for an out-of-band HANGUP line, "EOF" for the end. This is written by hand
# from the captures, independently of the parser, so HANGUP placement is checked.
EXPECTED_SHAPES: dict[str, str] = {
    "03-fastagi-session": "200 200 200 200 200 200 200 200 200 200 EOF",
    "09-agi-caller-hangup-during-stream": "200 H 200 200 511 511 H EOF",
    "10-agi-caller-hangup-idle": "200 200 H 200 200 511 511 H EOF",
    "11-agi-script-args-and-query": "200 200 200 200 H EOF",
    "12-agi-getdata-timeout-and-stream-escape": "200 200 200 200 H EOF",
    "14-agi-redirect-while-idle": "200 200 H 200 200 511 511 H EOF",
    "14b-agi-redirect-during-exec-moh": "200 200 H 200 200 511 H EOF",
    "14c-agi-redirect-idle-exitonhangup": "200 H H EOF",
    "14d-agi-redirect-during-stream-nosighup": "200 200 200 511 EOF",
    "14e-agi-redirect-during-stream-exitonhangup": "200 200 H H EOF",
}

Chunker = Callable[[bytes], Iterator[bytes]]


def whole(data: bytes) -> Iterator[bytes]:
    yield data


def fixed(size: int) -> Chunker:
    def chunker(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), size):
            yield data[start : start + size]

    return chunker


def seeded_random(seed: int) -> Chunker:
    def chunker(data: bytes) -> Iterator[bytes]:
        rng = random.Random(seed)
        start = 0
        while start < len(data):
            size = rng.randint(1, 40)
            yield data[start : start + size]
            start += size

    return chunker


CHUNKERS: dict[str, Chunker] = {
    "whole": whole,
    "1-byte": fixed(1),
    "2-byte": fixed(2),
    "7-byte": fixed(7),
    "random-1": seeded_random(1),
    "random-2": seeded_random(2),
}


def replay(trace: Trace, chunker: Chunker) -> list[Event]:
    """Play Asterisk's side of ``trace`` into a fresh connection; return all events.

    Bytes Asterisk sent between two server commands are fed in ``chunker``'s
    pieces; the server's ``>>`` lines are sent with ``send_command`` at their place
    (which fails if the previous reply was not parsed yet).
    """
    conn = AGIConnection()
    events: list[Event] = []
    pending: list[bytes] = []

    def flush() -> None:
        data = b"".join(pending)
        pending.clear()
        for chunk in chunker(data):
            conn.receive_data(chunk)
            events.extend(conn.events())

    for line in trace.lines:
        if line.direction == "<<":
            pending.append(line.text.encode("utf-8") + b"\n")
        elif line.direction == ">>":
            flush()
            assert conn.send_command(line.text) == line.text.encode("utf-8") + b"\n"
    flush()
    conn.receive_eof()
    events.extend(conn.events())
    return events


def shape(events: list[Event]) -> str:
    out: list[str] = []
    for event in events:
        if isinstance(event, AGIReply):
            out.append(str(event.code))
        elif isinstance(event, HangupLine):
            out.append("H")
        elif isinstance(event, EOF):
            out.append("EOF")
    return " ".join(out)


def test_every_capture_in_the_fixture_folder_has_an_expected_shape() -> None:
    assert TRACE_DIR.is_dir(), f"FastAGI captures missing: {TRACE_DIR}"
    found = {path.stem for path in TRACE_DIR.glob("*.agi")}
    assert found == set(EXPECTED_SHAPES)


@pytest.mark.parametrize("chunking", sorted(CHUNKERS))
@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_capture_replays_to_expected_events_in_any_chunking(name: str, chunking: str) -> None:
    trace = load_trace(name)
    events = replay(trace, CHUNKERS[chunking])
    assert isinstance(events[0], AGIEnvironment)
    assert shape(events[1:]) == EXPECTED_SHAPES[name]
    # Every reply is exactly one '<<' line of the capture, in order.
    replies = [e.raw for e in events if isinstance(e, AGIReply)]
    capture_replies = [
        line.text
        for line in trace.after_env
        if line.direction == "<<" and line.text != "HANGUP"
    ]
    assert replies == capture_replies
    assert sum(isinstance(e, EOF) for e in events) == 1


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(sorted(EXPECTED_SHAPES)), st.integers(min_value=0, max_value=2**32))
def test_capture_replay_does_not_depend_on_chunk_boundaries(name: str, seed: int) -> None:
    trace = load_trace(name)
    assert replay(trace, seeded_random(seed)) == replay(trace, whole)


def environment(name: str) -> AGIEnvironment:
    event = replay(load_trace(name), whole)[0]
    assert isinstance(event, AGIEnvironment)
    return event


def replies(name: str) -> list[AGIReply]:
    return [e for e in replay(load_trace(name), whole) if isinstance(e, AGIReply)]


def test_script_query_and_args_are_parsed_from_the_environment() -> None:
    env = environment("11-agi-script-args-and-query")
    assert env.script == "inbound"
    assert env.query == {"line": ["support"], "lang": ["zh"]}
    assert env.query_value("line") == "support"
    assert env.args == ["arg1", "arg with space"]
    assert env.env["agi_network_script"] == "inbound?line=support&lang=zh"
    assert env.env["agi_accountcode"] == ""
    assert env.channel == "PJSIP/trunk-00000002"
    assert env.uniqueid == "1795396038.2"


def test_plain_script_has_empty_query_and_dialplan_args() -> None:
    env = environment("03-fastagi-session")
    assert (env.script, env.query, env.args) == ("route", {}, ["arg1", "arg 2"])


def test_stream_file_interrupted_by_hangup_keeps_endpos_as_extra() -> None:
    first = replies("09-agi-caller-hangup-during-stream")[0]
    assert (first.code, first.result, first.data) == (200, "-1", None)
    assert first.extras == {"endpos": "20160"}
    assert first.result_int == -1


def test_dead_channel_replies_are_511_with_message() -> None:
    dead = [r for r in replies("09-agi-caller-hangup-during-stream") if r.code == 511]
    assert len(dead) == 2
    assert dead[0].result is None
    assert dead[0].data == "Command Not Permitted on a dead channel or intercept routine"


def test_variable_value_in_parentheses_becomes_data() -> None:
    got = replies("09-agi-caller-hangup-during-stream")[1]
    assert (got.result, got.data) == ("1", "+15551230009")
    full = replies("14-agi-redirect-while-idle")[1]
    assert full.data == "from-trunk,1400,3"


def test_get_data_timeout_and_escape_digit_results() -> None:
    got = replies("12-agi-getdata-timeout-and-stream-escape")
    assert (got[0].result, got[0].data, got[0].result_int) == ("", "timeout", None)
    assert (got[1].result, got[1].extras) == ("53", {"endpos": "13760"})
    assert (got[2].result, got[2].data) == ("78", "timeout")
    assert (got[3].result, got[3].data) == ("0", None)


def connected(env: bytes = b"agi_network: yes\nagi_network_script: x\n\n") -> AGIConnection:
    conn = AGIConnection()
    conn.receive_data(env)
    assert isinstance(conn.next_event(), AGIEnvironment)
    return conn


def test_utf8_character_split_across_reads_survives() -> None:
    line = "agi_calleridname: José 张三\n".encode()
    cut = line.index("张".encode()) + 1  # inside the 3-byte character
    conn = AGIConnection()
    conn.receive_data(b"agi_network: yes\n" + line[:cut])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(line[cut:] + b"\n")
    event = conn.next_event()
    assert isinstance(event, AGIEnvironment)
    assert event.env["agi_calleridname"] == "José 张三"


def test_utf8_reply_split_one_byte_at_a_time() -> None:
    conn = connected()
    conn.send_command("GET VARIABLE NAME")
    events: list[Event] = []
    for byte in "200 result=1 (Zoë)\n".encode():
        conn.receive_data(bytes([byte]))
        events.extend(conn.events())
    assert len(events) == 1
    assert isinstance(events[0], AGIReply) and events[0].data == "Zoë"


def test_invalid_utf8_is_a_named_protocol_error_and_sticks() -> None:
    conn = connected()
    conn.send_command("NOOP")
    conn.receive_data(b"200 result=\xff\n")
    with pytest.raises(AGIProtocolError, match="UTF-8"):
        conn.next_event()
    with pytest.raises(AGIProtocolError):
        conn.next_event()
    assert conn.state is State.ERROR
    with pytest.raises(AGIStateError):
        conn.send_command("NOOP")


def test_crlf_line_endings_are_tolerated() -> None:
    conn = AGIConnection()
    conn.receive_data(b"agi_network: yes\r\nagi_arg_1: a b\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, AGIEnvironment) and event.args == ["a b"]
    conn.send_command("NOOP")
    conn.receive_data(b"200 result=0\r\n")
    reply = conn.next_event()
    assert isinstance(reply, AGIReply) and reply.result == "0" and reply.raw == "200 result=0"


def test_hangup_before_the_reply_is_not_taken_for_the_reply() -> None:
    conn = connected()
    conn.send_command("STREAM FILE x \"\"")
    conn.receive_data(b"HANGUP\n")
    assert isinstance(conn.next_event(), HangupLine)
    assert conn.pending_command == 'STREAM FILE x ""'
    conn.receive_data(b"200 result=-1 endpos=1\n")
    assert isinstance(conn.next_event(), AGIReply)
    assert conn.pending_command is None and conn.hung_up and conn.hangups_received == 1


def test_second_command_while_one_is_pending_is_refused() -> None:
    conn = connected()
    conn.send_command("ANSWER")
    with pytest.raises(CommandPendingError):
        conn.send_command("NOOP")


def test_command_before_environment_is_refused() -> None:
    conn = AGIConnection()
    with pytest.raises(AGIStateError):
        conn.send_command("NOOP")


@pytest.mark.parametrize("line", ["NOOP\nANSWER", "NOOP\r", "NOOP\0", "", "noop", " NOOP"])
def test_send_command_refuses_unsafe_lines(line: str) -> None:
    conn = connected()
    with pytest.raises(AGIValueError):
        conn.send_command(line)
    assert conn.pending_command is None


def test_unsolicited_reply_is_a_protocol_error() -> None:
    conn = connected()
    conn.receive_data(b"200 result=0\n")
    with pytest.raises(AGIProtocolError, match="unsolicited"):
        conn.next_event()


def test_garbage_line_is_a_protocol_error() -> None:
    conn = connected()
    conn.send_command("NOOP")
    conn.receive_data(b"hello there\n")
    with pytest.raises(AGIProtocolError, match="unexpected"):
        conn.next_event()


def test_http_request_instead_of_environment_is_refused() -> None:
    conn = AGIConnection()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(AGIProtocolError):
        conn.next_event()


def test_multiline_520_usage_block_is_one_reply() -> None:
    conn = connected()
    conn.send_command("GET DATA")
    conn.receive_data(
        b"520-Invalid command syntax.  Proper usage follows:\n"
        b" Usage: GET DATA <file to be streamed> [timeout] [max digits]\n"
        b"\n"
        b"520 End of proper usage.\n"
    )
    reply = conn.next_event()
    assert isinstance(reply, AGIReply)
    assert reply.code == 520 and reply.result is None
    assert reply.data is not None and "Usage: GET DATA" in reply.data
    assert reply.raw.endswith("520 End of proper usage.")
    assert conn.next_event() is NEED_DATA and conn.state is State.IDLE


def test_510_unknown_command_carries_its_message() -> None:
    conn = connected()
    conn.send_command("FOO")
    conn.receive_data(b"510 Invalid or unknown command\n")
    reply = conn.next_event()
    assert isinstance(reply, AGIReply)
    assert (reply.code, reply.result, reply.data) == (510, None, "Invalid or unknown command")


def test_oversized_environment_is_refused_before_it_ends() -> None:
    conn = AGIConnection(max_env_bytes=100)
    conn.receive_data(b"agi_network: yes\n" + b"agi_x: " + b"a" * 90)
    with pytest.raises(AGIProtocolError, match="environment longer"):
        conn.next_event()


def test_line_without_newline_is_refused_once_it_exceeds_the_limit() -> None:
    conn = connected()
    conn.send_command("NOOP")
    conn.receive_data(b"200 result=" + b"1" * 100)
    assert conn.next_event() is NEED_DATA  # under the limit: keep waiting
    conn.receive_data(b"1" * 9000)
    with pytest.raises(AGIProtocolError, match="line longer"):
        conn.next_event()


def test_partial_header_then_eof_is_an_error_not_a_loop() -> None:
    conn = AGIConnection()
    conn.receive_data(b"agi_network: yes\nagi_netw")
    assert conn.next_event() is NEED_DATA
    conn.receive_eof()
    with pytest.raises(AGIProtocolError, match="middle of a line"):
        conn.next_event()


def test_complete_lines_but_no_end_of_environment_then_eof_is_an_error() -> None:
    conn = AGIConnection()
    conn.receive_data(b"agi_network: yes\n")
    conn.receive_eof()
    with pytest.raises(AGIProtocolError, match="before the environment"):
        conn.next_event()


def test_eof_while_command_pending_is_a_clean_end() -> None:
    conn = connected()
    conn.send_command('STREAM FILE x ""')
    conn.receive_data(b"HANGUP\nHANGUP\n")
    conn.receive_eof()
    assert [type(e) for e in conn.events()] == [HangupLine, HangupLine, EOF]
    assert conn.state is State.CLOSED and conn.pending_command is None
    assert isinstance(conn.next_event(), EOF)  # stays closed, never NEED_DATA
    with pytest.raises(AGIStateError):
        conn.send_command("NOOP")
    with pytest.raises(AGIStateError):
        conn.receive_data(b"x")


def test_eof_in_the_middle_of_a_reply_line_is_an_error() -> None:
    conn = connected()
    conn.send_command("NOOP")
    conn.receive_data(b"200 res")
    conn.receive_eof()
    with pytest.raises(AGIProtocolError):
        conn.next_event()


@pytest.mark.parametrize(
    "env",
    [
        b"agi_network: yes\nagi_arg_2: b\n\n",  # gap in the numbering
        b"agi_network: yes\nagi_network: no\n\n",  # repeated key
        b"agi_network: yes\nx_other: 1\n\n",  # not agi_*
        b"agi_network: yes\nagi_x: a\0b\n\n",  # NUL byte
    ],
)
def test_malformed_environments_are_refused(env: bytes) -> None:
    conn = AGIConnection()
    conn.receive_data(env)
    with pytest.raises(AGIProtocolError):
        conn.next_event()


def test_script_falls_back_to_agi_request_without_network_script() -> None:
    conn = AGIConnection()
    conn.receive_data(b"agi_network: yes\nagi_request: agi://127.0.0.1:4573/q?a=1&a=2&b=\n\n")
    env = conn.next_event()
    assert isinstance(env, AGIEnvironment)
    assert (env.script, env.query) == ("q", {"a": ["1", "2"], "b": [""]})


def test_transition_table_names_every_non_terminal_state() -> None:
    states = {state for state, _ in TRANSITIONS}
    assert states == {State.ENVIRONMENT, State.IDLE, State.AWAITING_REPLY, State.IN_USAGE}


def test_plus_in_query_is_a_plus_not_a_space() -> None:
    # dialplans/ctid.conf sends AGI(.../inbound?dnis=${EXTEN}); an E.164 DNIS keeps its '+'.
    from ctid.asterisk.agi_protocol import AGIConnection, AGIEnvironment

    conn = AGIConnection()
    conn.receive_data(b"agi_network: yes\nagi_network_script: inbound?dnis=+442071234567&x=a%20b\n"
                      b"agi_request: agi://127.0.0.1:4573/inbound?dnis=+442071234567&x=a%20b\n\n")
    env = conn.next_event()
    assert isinstance(env, AGIEnvironment)
    assert env.query["dnis"] == ["+442071234567"] and env.query["x"] == ["a b"]
