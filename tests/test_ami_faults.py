"""ctid's AMI client and call model against the simulator's fault injection, over real
sockets on 127.0.0.1. Each test names the panoramisk failure it guards against."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ctid.asterisk.ami import AMIClient, AMILinkLost
from ctid.asterisk.ami_protocol import Message
from ctid.simulator import AMIFaults, Simulator
from tests.test_app import make_config, make_sim, running

DIALPLAN = Path(__file__).resolve().parent.parent / "dialplans" / "ctid.conf"


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - bounded poll of state owned by other tasks
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def client_for(sim: Simulator, events: list[Message], **kw: float) -> AsyncIterator[AMIClient]:
    opts = {"reconnect_min": 0.02, "reconnect_max": 0.1, "ping_interval": 5.0, "ping_timeout": 1.0}
    opts.update(kw)
    client = AMIClient("127.0.0.1", sim.ami_port, "ctid", "test-secret", on_event=events.append, **opts)
    task = asyncio.create_task(client.run())
    try:
        await client.wait_logged_in(5)
        yield client
    finally:
        await client.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = make_sim(ami_faults=AMIFaults())
    await simulator.start()
    yield simulator
    await simulator.stop()


async def test_utf8_character_split_across_tcp_writes_is_kept(sim: Simulator) -> None:
    # panoramisk decoded each chunk with errors="ignore": "Zoë" arrived as "Zo".
    sim.ami_faults.split_utf8 = True
    events: list[Message] = []
    async with client_for(sim, events):
        sim.inbound_call(dnis="200", caller="+15551230001", caller_name="Zoë Ørsted")
        await until(lambda: any(e.name == "Newchannel" for e in events))
        newchannel = next(e for e in events if e.name == "Newchannel")
        assert newchannel["CallerIDName"] == "Zoë Ørsted"


async def test_event_list_cut_mid_stream_fails_the_action_and_the_link_recovers(sim: Simulator) -> None:
    events: list[Message] = []
    async with client_for(sim, events) as client:
        sim.inbound_call(dnis="200", caller="+15551230002")
        sim.inbound_call(dnis="200", caller="+15551230003")
        await until(lambda: len(sim.channels) >= 2)
        sim.ami_faults.eventlist_cut_after = 1
        with pytest.raises(AMILinkLost):
            await client.action("CoreShowChannels", timeout=3)
        sim.ami_faults.eventlist_cut_after = None
        await until(lambda: client.connected and client.logins >= 2)
        listing = await client.action("CoreShowChannels", timeout=3)
        assert len(listing.events) == len(sim.channels)


async def test_silent_peer_without_pong_is_declared_dead_and_reconnected(sim: Simulator) -> None:
    # panoramisk never checked Ping replies: a half-open link looked alive forever.
    events: list[Message] = []
    async with client_for(sim, events, ping_interval=0.05, ping_timeout=0.2) as client:
        sim.ami_faults.silent_ping = True
        await until(lambda: "pong" in (client.last_error or ""), 5)
        sim.ami_faults.silent_ping = False
        await until(lambda: client.connected and client.logins >= 2, 5)


async def test_slow_writer_and_slow_reader_still_give_exact_messages(sim: Simulator) -> None:
    sim.ami_faults.write_chunk = 7
    sim.ami_faults.write_pause = 0.001
    sim.ami_faults.read_pause = 0.05
    events: list[Message] = []
    async with client_for(sim, events) as client:
        reply = await client.action("Ping", timeout=3)
        assert reply.response["Ping"] == "Pong"
        sim.inbound_call(dnis="200", caller="+15551230004", caller_name="Slow Writer")
        await until(lambda: any(e.name == "Newchannel" for e in events), 10)
        assert next(e for e in events if e.name == "Newchannel")["CallerIDName"] == "Slow Writer"


async def test_drops_at_random_bytes_never_corrupt_the_call_model(tmp_path: Path) -> None:
    # Connections cut mid-frame, again and again; after each re-login ctid resyncs and
    # its view of active calls equals the simulator's channels.
    sim = make_sim(ami_faults=AMIFaults())
    async with running(sim, make_config(0, f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")) as daemon:
        link = daemon.links["sim"]
        chans = [sim.inbound_call(dnis="200", caller=f"+1555123{i:04d}") for i in range(4)]
        await until(lambda: len(link.model.channels) >= 4
                    and all(len(c.call_id) == 32 for c in link.model.calls.values()))
        for seed in range(3):
            sim.ami_faults.seed = seed
            sim.ami_faults.drop_at_random = True
            logins = link.client.logins
            for session in list(sim.ami.sessions):
                session.close()
            await until(lambda: link.client.logins > logins, 10)  # noqa: B023 - awaited in this iteration
            sim.ami_faults.drop_at_random = False
            await sim.caller_hangup(chans[seed])  # a call ends while the link may be down
            await until(lambda: link.client.connected, 10)
        logins = link.client.logins
        for session in list(sim.ami.sessions):
            session.close()  # one clean reconnect with no fault, to resync
        await until(lambda: link.client.logins > logins and link.client.connected, 10)
        await until(lambda: set(link.model.channels) == {c.uniqueid for c in sim.channels.values()}, 2)
        assert chans[3].uniqueid in link.model.channels
        assert all(c.uniqueid not in link.model.channels for c in chans[:3])
