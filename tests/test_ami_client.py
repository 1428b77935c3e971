"""The asyncio AMI client over real sockets on 127.0.0.1, against a scripted peer."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest

from ctid.asterisk.ami import (
    AMIClient,
    AMILinkLost,
    AMILoginError,
    AMINotConnected,
    AMITimeout,
    LinkState,
)
from ctid.asterisk.ami_protocol import AMIValueError, Message, serialize
from tests.fake_ami import FakeAMI


@pytest.fixture
async def peer() -> AsyncIterator[FakeAMI]:
    fake = FakeAMI()
    await fake.start()
    yield fake
    await fake.stop()


def _client(peer: FakeAMI, events: list[Message] | None = None, **kw: object) -> AMIClient:
    opts: dict[str, object] = {"ping_interval": 5.0, "ping_timeout": 1.0, "reconnect_min": 0.01,
                               "reconnect_max": 0.05, "action_timeout": 2.0, "connect_timeout": 2.0}
    opts.update(kw)
    return AMIClient("127.0.0.1", peer.port, "ctid", "ctidpass",
                     on_event=None if events is None else events.append, **opts)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(client: AMIClient) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(client.run())
    try:
        yield task
    finally:
        await client.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


async def _until(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110 - bounded poll of a peer we do not own
            await asyncio.sleep(0.01)


async def test_login_then_events_are_dispatched_in_wire_order(peer: FakeAMI) -> None:
    events: list[Message] = []
    client = _client(peer, events)
    async with running(client):
        await client.wait_logged_in(5)
        assert client.state is LinkState.LOGGED_IN and client.greeting == "Asterisk Call Manager/11.0.0"
        login = peer.actions("Login")[0]
        # Only the classes ctid consumes, whatever the user's read rights.
        assert login["Username"] == "ctid" and login["Events"] == "system,call,agent,user"
        await peer.broadcast(b"".join(serialize(Message.event("UserEvent", [("N", str(i))])) for i in range(50)))
        await _until(lambda: len([e for e in events if e.name == "UserEvent"]) == 50)
        assert [e["N"] for e in events if e.name == "UserEvent"] == [str(i) for i in range(50)]


async def test_rejected_login_is_fatal_without_retry_storm(peer: FakeAMI) -> None:
    peer.secret = "other"
    client = _client(peer)
    with pytest.raises(AMILoginError, match="Authentication failed"):
        await asyncio.wait_for(client.run(), 5)
    assert peer.connections == 1
    assert client.state is LinkState.FAILED


async def test_silent_peer_is_detected_by_missed_pong_and_reconnected(peer: FakeAMI) -> None:
    client = _client(peer, ping_interval=0.05, ping_timeout=0.1)
    async with running(client):
        await client.wait_logged_in(5)
        peer.answer_pings = False
        await _until(lambda: peer.connections >= 2 and "pong" in (client.last_error or ""), 5)
        peer.answer_pings = True
        await _until(lambda: client.connected and client.logins >= 2)


async def test_action_times_out_when_asterisk_never_answers(peer: FakeAMI) -> None:
    client = _client(peer)
    async with running(client):
        await client.wait_logged_in(5)
        peer.answer_actions = False
        with pytest.raises(AMITimeout, match="CoreSettings"):
            await client.action("CoreSettings", timeout=0.2)


async def test_pending_action_fails_on_link_loss_and_is_never_replayed(peer: FakeAMI) -> None:
    def drop(fake: FakeAMI, action: Message, writer: asyncio.StreamWriter) -> bytes | None:
        writer.transport.abort()
        return None

    peer.hooks["Originate"] = drop
    client = _client(peer)
    async with running(client):
        await client.wait_logged_in(5)
        with pytest.raises(AMILinkLost, match="not re-sent"):
            await client.action("Originate", {"Channel": "PJSIP/1001", "Exten": "200"})
        await _until(lambda: client.connected and client.logins == 2)
        await client.action("Ping")
        assert len(peer.actions("Originate")) == 1


async def test_actions_while_disconnected_fail_at_once() -> None:
    client = AMIClient("127.0.0.1", 9, "ctid", "x")
    with pytest.raises(AMINotConnected):
        await client.action("Ping")


async def test_event_list_cut_mid_stream_fails_the_action(peer: FakeAMI) -> None:
    def cut(fake: FakeAMI, action: Message, writer: asyncio.StreamWriter) -> bytes | None:
        aid = [("ActionID", action["ActionID"])]
        writer.write(serialize(Message.response("Success", [*aid, ("EventList", "start"),
                                                            ("Message", "Channels will follow")])))
        writer.write(serialize(Message.event("CoreShowChannel", [*aid, ("Channel", "PJSIP/trunk-00000001")]))[:25])
        writer.transport.abort()
        return None

    peer.hooks["CoreShowChannels"] = cut
    client = _client(peer)
    async with running(client):
        await client.wait_logged_in(5)
        with pytest.raises(AMILinkLost):
            await client.action("CoreShowChannels")


async def test_event_list_is_returned_whole(peer: FakeAMI) -> None:
    def listing(fake: FakeAMI, action: Message, writer: asyncio.StreamWriter) -> bytes | None:
        aid = [("ActionID", action["ActionID"])]
        return b"".join([
            serialize(Message.response("Success", [*aid, ("EventList", "start"), ("Message", "Channels will follow")])),
            serialize(Message.event("CoreShowChannel", [*aid, ("Channel", "PJSIP/a-1")])),
            serialize(Message.event("Newchannel", [("Channel", "PJSIP/b-2")])),  # interleaved live event
            serialize(Message.event("CoreShowChannel", [*aid, ("Channel", "PJSIP/c-3")])),
            serialize(Message.event("CoreShowChannelsComplete", [*aid, ("EventList", "Complete"), ("ListItems", "2")])),
        ])

    peer.hooks["CoreShowChannels"] = listing
    events: list[Message] = []
    client = _client(peer, events)
    async with running(client):
        await client.wait_logged_in(5)
        result = await client.action("CoreShowChannels")
        assert [e["Channel"] for e in result.events] == ["PJSIP/a-1", "PJSIP/c-3"]
        assert result.complete is not None and result.complete["ListItems"] == "2"
        await _until(lambda: any(e.name == "Newchannel" for e in events))


async def test_utf8_split_across_writes_and_malformed_frames_do_not_break_the_stream(peer: FakeAMI) -> None:
    events: list[Message] = []
    client = _client(peer, events)
    async with running(client):
        await client.wait_logged_in(5)
        peer.write_chunk = 1  # every byte in its own TCP write: ë is split
        await peer.broadcast(b"Bad: frame\r\nno colon here\r\n\r\n" +
                             serialize(Message.event("Newchannel", [("CallerIDName", "Zoë")])))
        await _until(lambda: any(e.name == "Newchannel" for e in events))
        assert next(e for e in events if e.name == "Newchannel")["CallerIDName"] == "Zoë"
        assert not any(e.name == "Bad" for e in events)


async def test_hostile_values_are_rejected_before_the_socket(peer: FakeAMI) -> None:
    client = _client(peer)
    async with running(client):
        await client.wait_logged_in(5)
        with pytest.raises(AMIValueError):
            await client.action("Setvar", {"Channel": "PJSIP/a-1", "Variable": "X",
                                           "Value": "1\r\nAction: Originate\r\nChannel: PJSIP/evil"})
        await client.action("Ping")
        assert not peer.actions("Setvar") and not peer.actions("Originate")


async def test_reconnect_backoff_grows_with_jitter_and_is_capped() -> None:
    client = AMIClient("127.0.0.1", 9, "ctid", "x", reconnect_min=0.5, reconnect_max=8.0,
                       rng=random.Random(1))
    delays = [client._backoff(n) for n in range(12)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert delays[0] <= 0.5 and delays[-1] >= 4.0
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, never in lockstep


async def test_unreachable_asterisk_is_retried_and_then_connects() -> None:
    fake = FakeAMI()
    await fake.start()
    port = fake.port
    await fake.stop()  # nothing listens on the port now
    client = AMIClient("127.0.0.1", port, "ctid", "ctidpass", reconnect_min=0.02, reconnect_max=0.05)
    task = asyncio.create_task(client.run())
    try:
        await _until(lambda: client.last_error is not None and "Connect" in client.last_error, 5)
        server = FakeAMI()
        server._server = await asyncio.start_server(server._serve, "127.0.0.1", port)
        try:
            await client.wait_logged_in(5)
        finally:
            await client.close()
            await asyncio.wait_for(task, 5)
            await server.stop()
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def test_backoff_starts_again_after_a_link_that_worked(peer: FakeAMI) -> None:
    client = _client(peer, reconnect_min=0.05, reconnect_max=5.0)
    async with running(client):
        for n in range(1, 8):
            await _until(lambda: client.logins == n)  # noqa: B023 - awaited in this iteration
            for writer in list(peer.writers):
                writer.transport.abort()
            await _until(lambda: not client.connected)
            await _until(lambda: client.last_backoff is not None)
            # Every drop follows a successful login: never the long, grown delay.
            assert client.last_backoff is not None and client.last_backoff <= 0.05
            peer.writers.clear()


async def test_close_while_connecting_or_backing_off_returns_promptly(peer: FakeAMI) -> None:
    dead = FakeAMI()
    await dead.start()
    port = dead.port
    await dead.stop()
    client = AMIClient("127.0.0.1", port, "ctid", "x", reconnect_min=30.0, reconnect_max=60.0)
    task = asyncio.create_task(client.run())
    await _until(lambda: client.last_backoff is not None)  # now sleeping ~15-30 s
    await client.close()
    await asyncio.wait_for(task, 2)
