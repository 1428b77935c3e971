"""FastAGIServer on real sockets (127.0.0.1, port 0) against a raw fake Asterisk.

The fake plays Asterisk's side of the captures byte for byte; the handlers issue
the captures' commands through ``AGISession.send_command``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog

from ctid.asterisk.agi import (
    AGICommandError,
    AGICommandTimeout,
    AGIHangup,
    AGIResult,
    AGISession,
    FastAGIServer,
    Handler,
)
from ctid.asterisk.agi_protocol import AGIProtocolError
from ctid.asterisk.safety import AGIValueError
from tests.agi_trace import load_trace, reference_parse_args, split_command
from tests.test_agi_protocol import EXPECTED_SHAPES

BOUND = 5.0  # seconds; generous upper bound for anything that must "happen promptly"


def env_block(script: str = "test", *args: str, channel: str = "PJSIP/trunk-00000001") -> bytes:
    lines = [
        "agi_network: yes",
        f"agi_network_script: {script}",
        f"agi_request: agi://127.0.0.1:4573/{script}",
        f"agi_channel: {channel}",
        "agi_uniqueid: 1795396038.2",
        "agi_callerid: +15551230011",
        *(f"agi_arg_{n}: {arg}" for n, arg in enumerate(args, start=1)),
        "",
    ]
    return "".join(line + "\n" for line in lines).encode()


class FakeAsterisk:
    """Asterisk's side of one FastAGI connection, driven by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> FakeAsterisk:
        async with asyncio.timeout(BOUND):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_lines(self, *lines: str) -> None:
        await self.send("".join(line + "\n" for line in lines).encode())

    async def read_command(self) -> bytes:
        """One raw command line from the server, ``\\n`` included."""
        async with asyncio.timeout(BOUND):
            return await self.reader.readuntil(b"\n")

    async def expect_closed_by_server(self, within: float = BOUND) -> None:
        """The server closes the socket within ``within`` and sends nothing more."""
        async with asyncio.timeout(within):
            try:
                rest = await self.reader.read()
            except ConnectionResetError:
                # Closing with unread input makes the kernel send RST: still a close.
                rest = b""
        assert rest == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def running(
    routes: dict[str, Handler] | None = None, **kwargs: Any
) -> AsyncIterator[FastAGIServer]:
    server = FastAGIServer("127.0.0.1", 0, routes or {}, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        async with asyncio.timeout(BOUND * 2):
            await server.stop()


@dataclass
class Recorder:
    """What a handler saw, plus events the test can wait on."""

    results: list[tuple[str, int | None, str | None, bool]] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    sessions: list[AGISession] = field(default_factory=list)
    context: list[dict[str, Any]] = field(default_factory=list)


async def wait(event: asyncio.Event) -> None:
    async with asyncio.timeout(BOUND):
        await event.wait()


# --------------------------------------------------------------------------- capture replay


def replay_handler(commands: list[str], rec: Recorder) -> Handler:
    async def handler(session: AGISession) -> None:
        rec.sessions.append(session)
        rec.started.set()
        try:
            for line in commands:
                verb, args = split_command(line)
                try:
                    result = await session.send_command(verb, *args)
                    rec.results.append(("ok", result.code, result.raw, session.hung_up))
                except AGIHangup as exc:
                    code = exc.result.code if exc.result else None
                    raw = exc.result.raw if exc.result else None
                    rec.results.append(("hangup", code, raw, session.hung_up))
        finally:
            rec.finished.set()

    return handler


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
async def test_server_replays_capture_with_the_same_command_lines(name: str) -> None:
    trace = load_trace(name)
    rec = Recorder()
    script = trace.env_lines[1].removeprefix("agi_network_script: ").split("?")[0]
    routes = {script: replay_handler(trace.commands, rec)}
    expected: list[tuple[str, int | None, str | None, bool]] = []
    hangup_seen = False
    async with running(routes, hangup_grace=BOUND * 2) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        with contextlib.suppress(ConnectionError):
            for line in trace.lines:
                if line.is_server_close:
                    break  # our server closes when the handler is done; checked below
                if line.is_eof:
                    asterisk.writer.write_eof()
                elif line.direction == "<<":
                    await asterisk.send_lines(line.text)
                    if line.text == "HANGUP":
                        hangup_seen = True
                    elif not line.text.startswith("agi_") and line.text:
                        code = int(line.text[:3])
                        kind = "hangup" if code == 511 else "ok"
                        expected.append((kind, code, line.text, hangup_seen))
                elif line.direction == ">>":
                    sent = await asterisk.read_command()
                    # Framing: exactly one \n-terminated line, no CR, same words.
                    assert sent.endswith(b"\n") and b"\r" not in sent and sent.count(b"\n") == 1
                    text = sent[:-1].decode()
                    assert reference_parse_args(text) == reference_parse_args(line.text)
                    if " " not in line.text or line.text == "CHANNEL STATUS":
                        assert text == line.text  # no arguments: byte-identical
        await wait(rec.finished)
        await asterisk.expect_closed_by_server()
        await asterisk.close()
    assert [r[:3] for r in rec.results] == [e[:3] for e in expected]
    # A reply that follows a HANGUP line on the stream must see hung_up; one just
    # before it may or may not (HANGUP can arrive in the same read).
    for (*_, got_hung_up), (*_, after_hangup) in zip(rec.results, expected, strict=True):
        assert got_hung_up or not after_hangup


async def test_environment_query_args_and_log_context_reach_the_handler() -> None:
    rec = Recorder()

    async def handler(session: AGISession) -> None:
        rec.sessions.append(session)
        rec.context.append(structlog.contextvars.get_contextvars())
        rec.finished.set()

    async with running({"inbound": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block("inbound?line=support&call_id=c-42&lang=zh", "arg1", "a b"))
        await wait(rec.finished)
        await asterisk.expect_closed_by_server()
        await asterisk.close()
    session = rec.sessions[0]
    assert (session.script, session.args) == ("inbound", ["arg1", "a b"])
    assert session.query == {"line": ["support"], "call_id": ["c-42"], "lang": ["zh"]}
    assert session.call_id == "c-42"
    assert rec.context[0] == {
        "agi_channel": "PJSIP/trunk-00000001",
        "uniqueid": "1795396038.2",
        "call_id": "c-42",
    }
    assert structlog.contextvars.get_contextvars() == {}  # nothing leaked to the test


async def test_concurrent_sessions_each_see_their_own_log_context() -> None:
    both_started = asyncio.Barrier(2)
    seen: dict[str, Any] = {}

    async def handler(session: AGISession) -> None:
        async with asyncio.timeout(BOUND):
            await both_started.wait()
        seen[session.args[0]] = structlog.contextvars.get_contextvars()["call_id"]

    async with running({"q": handler}) as server:
        first = await FakeAsterisk.connect(server.port)
        second = await FakeAsterisk.connect(server.port)
        await first.send(env_block("q", "call_id=one"))
        await second.send(env_block("q", "call_id=two"))
        await first.expect_closed_by_server()
        await second.expect_closed_by_server()
        await first.close()
        await second.close()
    assert seen == {"call_id=one": "one", "call_id=two": "two"}


async def test_invalid_call_id_is_not_bound() -> None:
    rec = Recorder()

    async def handler(session: AGISession) -> None:
        rec.context.append(structlog.contextvars.get_contextvars())
        rec.finished.set()

    async with running({"q": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block("q?call_id=a%0Ab"))
        await wait(rec.finished)
        await asterisk.close()
    assert rec.context[0]["call_id"] is None


# --------------------------------------------------------------------------- hangup


async def test_hangup_while_idle_sets_flag_and_event_and_variables_still_work() -> None:
    rec = Recorder()

    async def handler(session: AGISession) -> None:
        assert await session.get_variable("CALLERID(num)") == "+1555"
        assert not session.hung_up
        rec.started.set()
        async with asyncio.timeout(BOUND):
            await session.hangup_event.wait()
        rec.results.append(("hung_up", None, None, session.hung_up))
        await session.set_variable("AFTER", "yes")
        rec.finished.set()

    async with running({"test": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        assert await asterisk.read_command() == b'GET VARIABLE "CALLERID(num)"\n'
        await asterisk.send_lines("200 result=1 (+1555)")
        await wait(rec.started)
        await asterisk.send_lines("HANGUP")
        assert await asterisk.read_command() == b'SET VARIABLE "AFTER" "yes"\n'
        await asterisk.send_lines("200 result=1")
        await wait(rec.finished)
        await asterisk.expect_closed_by_server()
        await asterisk.close()
    assert rec.results == [("hung_up", None, None, True)]


async def test_511_raises_agi_hangup_with_the_reply() -> None:
    caught: list[AGIHangup] = []

    async def handler(session: AGISession) -> None:
        try:
            await session.send_command("CHANNEL STATUS")
        except AGIHangup as exc:
            caught.append(exc)

    async with running({"test": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        assert await asterisk.read_command() == b"CHANNEL STATUS\n"
        await asterisk.send_lines("511 Command Not Permitted on a dead channel or intercept routine")
        await asterisk.expect_closed_by_server()
        await asterisk.close()
    assert len(caught) == 1
    assert caught[0].result is not None and caught[0].result.code == 511


@pytest.mark.parametrize(
    "reply",
    [
        ["510 Invalid or unknown command"],
        ["520-Invalid command syntax.  Proper usage follows:", " Usage: X", "520 End of proper usage."],
    ],
)
async def test_other_error_codes_raise_agi_command_error(reply: list[str]) -> None:
    caught: list[AGICommandError] = []

    async def handler(session: AGISession) -> None:
        try:
            await session.send_command("GET DATA")
        except AGICommandError as exc:
            caught.append(exc)
        await session.send_command("NOOP")

    async with running({"test": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        assert await asterisk.read_command() == b"GET DATA\n"
        await asterisk.send_lines(*reply)
        assert await asterisk.read_command() == b"NOOP\n"  # the session is still in sync
        await asterisk.send_lines("200 result=0")
        await asterisk.expect_closed_by_server()
        await asterisk.close()
    assert [exc.result.code for exc in caught] == [int(reply[0][:3])]
    assert caught[0].command == "GET DATA"


async def test_server_closes_socket_within_grace_after_hangup_even_if_handler_idles() -> None:
    rec = Recorder()
    grace = 0.3

    async def handler(session: AGISession) -> None:
        rec.started.set()
        try:
            await asyncio.Event().wait()  # idles forever
        except asyncio.CancelledError:
            rec.cancelled.set()
            raise

    async with running({"test": handler}, hangup_grace=grace) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        await wait(rec.started)
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        await asterisk.send_lines("HANGUP")
        await asterisk.expect_closed_by_server(within=grace + 2.0)
        elapsed = loop.time() - sent_at
        await wait(rec.cancelled)
        await asterisk.close()
        assert server.session_count == 0
    assert grace * 0.8 <= elapsed < grace + 2.0


async def test_handler_that_swallows_cancellation_still_loses_the_socket() -> None:
    rec = Recorder()
    release = asyncio.Event()

    async def handler(session: AGISession) -> None:
        rec.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            rec.cancelled.set()
        async with asyncio.timeout(BOUND):
            await release.wait()  # misbehaves: keeps running after the cancel
        with pytest.raises(AGIHangup):
            await session.send_command("NOOP")
        rec.finished.set()

    async with running({"test": handler}, hangup_grace=0.1) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        await wait(rec.started)
        await asterisk.send_lines("HANGUP")
        await asterisk.expect_closed_by_server()
        await wait(rec.cancelled)
        release.set()
        await wait(rec.finished)
        await asterisk.close()


async def test_handler_return_closes_the_socket_at_once() -> None:
    async def handler(session: AGISession) -> None:
        return None

    async with running({"test": handler}, hangup_grace=BOUND * 2) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        await asterisk.expect_closed_by_server(within=1.0)
        await asterisk.close()


async def test_handler_exception_closes_the_socket_and_server_keeps_serving() -> None:
    calls: list[str] = []

    async def handler(session: AGISession) -> None:
        calls.append(session.args[0])
        if session.args[0] == "boom":
            raise RuntimeError("handler bug")

    async with running({"test": handler}) as server:
        first = await FakeAsterisk.connect(server.port)
        await first.send(env_block("test", "boom"))
        await first.expect_closed_by_server()
        await first.close()
        second = await FakeAsterisk.connect(server.port)
        await second.send(env_block("test", "fine"))
        await second.expect_closed_by_server()
        await second.close()
    assert calls == ["boom", "fine"]


async def test_exit_on_hangup_eof_while_command_pending_raises_agi_hangup() -> None:
    caught: list[AGIHangup] = []
    rec = Recorder()

    async def handler(session: AGISession) -> None:
        try:
            await session.send_command("STREAM FILE", "demo-congrats", "")
        except AGIHangup as exc:
            caught.append(exc)
            rec.results.append(("hung_up", None, None, session.hung_up))
        with pytest.raises(AGIHangup):
            await session.send_command("NOOP")  # the connection is gone

    async with running({"test": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        assert await asterisk.read_command() == b'STREAM FILE "demo-congrats" ""\n'
        await asterisk.send_lines("HANGUP", "HANGUP")  # AGIEXITONHANGUP=yes (14c)
        asterisk.writer.write_eof()
        await asterisk.expect_closed_by_server()
        await asterisk.close()
    assert len(caught) == 1 and caught[0].result is None
    assert rec.results == [("hung_up", None, None, True)]


async def test_command_timeout_raises_and_closes_the_session() -> None:
    caught: list[AGICommandTimeout] = []

    async def handler(session: AGISession) -> None:
        try:
            await session.send_command("GET DATA", "beep", 3000, 4, timeout=0.2)
        except AGICommandTimeout as exc:
            caught.append(exc)
        assert session.closed

    async with running({"test": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        assert await asterisk.read_command() == b'GET DATA "beep" "3000" "4"\n'
        await asterisk.expect_closed_by_server()  # no reply from us
        await asterisk.close()
    assert len(caught) == 1 and isinstance(caught[0], TimeoutError)


async def test_unsafe_argument_is_refused_before_anything_is_sent() -> None:
    async def handler(session: AGISession) -> None:
        with pytest.raises(AGIValueError):
            await session.send_command("SET VARIABLE", "X", "a\nEXEC System reboot")
        await session.send_command("NOOP")

    async with running({"test": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        assert await asterisk.read_command() == b"NOOP\n"
        await asterisk.send_lines("200 result=0")
        await asterisk.expect_closed_by_server()
        await asterisk.close()


async def test_concurrent_commands_on_one_session_go_out_one_at_a_time() -> None:
    results: list[AGIResult] = []

    async def handler(session: AGISession) -> None:
        async with asyncio.TaskGroup() as group:
            first = group.create_task(session.send_command("GET VARIABLE", "A"))
            second = group.create_task(session.send_command("GET VARIABLE", "B"))
        results.extend([first.result(), second.result()])

    async with running({"test": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        first_line = await asterisk.read_command()
        with pytest.raises(TimeoutError):  # nothing else while the first is unanswered
            async with asyncio.timeout(0.2):
                await asterisk.reader.readuntil(b"\n")
        await asterisk.send_lines("200 result=1 (a)")
        second_line = await asterisk.read_command()
        await asterisk.send_lines("200 result=1 (b)")
        await asterisk.expect_closed_by_server()
        await asterisk.close()
    assert {first_line, second_line} == {b'GET VARIABLE "A"\n', b'GET VARIABLE "B"\n'}
    assert [r.data for r in results] == (
        ["a", "b"] if first_line.endswith(b'"A"\n') else ["b", "a"]
    )


async def test_protocol_error_from_asterisk_fails_the_command_and_closes() -> None:
    caught: list[Exception] = []

    async def handler(session: AGISession) -> None:
        try:
            await session.send_command("NOOP")
        except AGIProtocolError as exc:
            caught.append(exc)

    async with running({"test": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        await asterisk.read_command()
        await asterisk.send(b"200 result=\xff\n")
        await asterisk.expect_closed_by_server()
        await asterisk.close()
    assert len(caught) == 1


# --------------------------------------------------------------------------- header abuse


def never_called(calls: list[str]) -> Handler:
    async def handler(session: AGISession) -> None:
        calls.append(session.script)

    return handler


async def test_partial_header_then_eof_does_not_block_a_concurrent_session() -> None:
    calls: list[str] = []
    served = asyncio.Event()

    async def good(session: AGISession) -> None:
        await session.send_command("NOOP")
        served.set()

    routes = {"test": never_called(calls), "good": good}
    async with running(routes, env_timeout=BOUND * 2) as server:
        stuck = await FakeAsterisk.connect(server.port)
        await stuck.send(b"agi_network: yes\nagi_netw")  # never finishes
        truncated = await FakeAsterisk.connect(server.port)
        await truncated.send(b"agi_network: yes\nagi_network_script: te")
        truncated.writer.write_eof()

        other = await FakeAsterisk.connect(server.port)
        await other.send(env_block("good"))
        assert await other.read_command() == b"NOOP\n"
        await other.send_lines("200 result=0")
        await wait(served)
        await other.expect_closed_by_server()

        await truncated.expect_closed_by_server()  # promptly, not after env_timeout
        assert server.session_count == 1  # only the stuck one is left
        for client in (stuck, truncated, other):
            await client.close()
    assert calls == []


async def test_env_timeout_closes_a_silent_client() -> None:
    calls: list[str] = []
    async with running({"test": never_called(calls)}, env_timeout=0.2) as server:
        silent = await FakeAsterisk.connect(server.port)
        await silent.expect_closed_by_server(within=2.0)
        await silent.close()
    assert calls == []


async def test_garbage_instead_of_environment_is_closed() -> None:
    calls: list[str] = []
    async with running({"test": never_called(calls)}) as server:
        client = await FakeAsterisk.connect(server.port)
        await client.send(b"GET / HTTP/1.1\r\nHost: ctid\r\n\r\n")
        await client.expect_closed_by_server()
        await client.close()
    assert calls == []


async def test_oversized_environment_is_closed() -> None:
    calls: list[str] = []
    async with running({"test": never_called(calls)}, max_env_bytes=256) as server:
        client = await FakeAsterisk.connect(server.port)
        with contextlib.suppress(ConnectionError):
            await client.send(b"agi_network: yes\nagi_x: " + b"a" * 4096 + b"\n\n")
        await client.expect_closed_by_server()
        await client.close()
    assert calls == []


async def test_unknown_script_is_closed_and_default_route_catches_it() -> None:
    calls: list[str] = []
    async with running({"test": never_called(calls)}) as server:
        client = await FakeAsterisk.connect(server.port)
        await client.send(env_block("nope"))
        await client.expect_closed_by_server()
        await client.close()
    assert calls == []

    default_calls: list[str] = []
    async with running({}, default_route=never_called(default_calls)) as server:
        client = await FakeAsterisk.connect(server.port)
        await client.send(env_block("nope"))
        await client.expect_closed_by_server()
        await client.close()
    assert default_calls == ["nope"]


# --------------------------------------------------------------------------- lifetime


async def test_stop_closes_sessions_and_cancels_handlers() -> None:
    rec = Recorder()
    session_tasks: list[asyncio.Task[Any]] = []

    async def handler(session: AGISession) -> None:
        task = asyncio.current_task()
        assert task is not None
        session_tasks.append(task)
        rec.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            rec.cancelled.set()
            raise

    server = FastAGIServer("127.0.0.1", 0, {"test": handler}, hangup_grace=BOUND * 2)
    await server.start()
    try:
        clients = [await FakeAsterisk.connect(server.port) for _ in range(3)]
        await clients[0].send(env_block())
        await wait(rec.started)
        await clients[1].send(b"agi_network: yes\n")  # still in the header
    finally:
        async with asyncio.timeout(BOUND):
            await server.stop()
    assert rec.cancelled.is_set()
    # The stop's cancellation is not swallowed by the session runner.
    assert len(session_tasks) == 1 and session_tasks[0].cancelled()
    assert server.session_count == 0
    for client in clients:
        await client.expect_closed_by_server(within=1.0)
        await client.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


async def test_port_zero_reports_the_bound_port() -> None:
    async with running({}) as server:
        assert server.port > 0
        client = await FakeAsterisk.connect(server.port)
        await client.close()


async def test_cancelling_a_command_wait_closes_the_session() -> None:
    waiting = asyncio.Event()
    outcome: list[str] = []

    async def handler(session: AGISession) -> None:
        task = asyncio.create_task(session.send_command("WAIT FOR DIGIT", 60000))
        await waiting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        outcome.append("closed" if session.closed else "open")

    async with running({"test": handler}) as server:
        asterisk = await FakeAsterisk.connect(server.port)
        await asterisk.send(env_block())
        await asterisk.read_command()
        waiting.set()
        await asterisk.expect_closed_by_server()
        await asterisk.close()
    assert outcome == ["closed"]

