"""Each AMI fault toggle of the simulator, observed on the wire (real sockets)."""

from __future__ import annotations

import asyncio
import time

from ctid.asterisk.ami_protocol import AMIParser, Message
from ctid.simulator import AMIFaults, Simulator

LOGIN = b"Action: Login\r\nActionID: l1\r\nUsername: ctid\r\nSecret: ctidpass\r\nEvents: on\r\n\r\n"


async def chunks_until_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> list[bytes]:
    out = []
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        if not chunk:
            return out
        out.append(chunk)


async def test_fault_utf8_character_split_across_writes() -> None:
    async with Simulator(ami_faults=AMIFaults(split_utf8=True)) as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        writer.write(LOGIN + "Action: UserEvent\r\nUserEvent: pop\r\nName: Zoë\r\n\r\n".encode()
                     + b"Action: Logoff\r\n\r\n")
        chunks = await chunks_until_eof(reader)
    data = b"".join(chunks)
    assert "Name: Zoë\r\n".encode() in data
    # The two bytes of "ë" (c3 ab) arrived in different reads.
    assert any(c.endswith(b"Zo\xc3") for c in chunks)
    assert any(c.startswith(b"\xab") for c in chunks)


async def test_fault_eventlist_cut_mid_stream() -> None:
    async with Simulator(ami_faults=AMIFaults(eventlist_cut_after=2)) as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        writer.write(LOGIN + b"Action: QueueStatus\r\nActionID: q1\r\n\r\n")
        data = b"".join(await chunks_until_eof(reader))
    msgs = [m for m in AMIParser().feed(data) if isinstance(m, Message)]
    listed = [m for m in msgs if m.get("ActionID") == "q1"]
    assert listed[0].is_response and listed[0].get("EventList") == "start"
    assert [m.name for m in listed[1:]] == ["QueueParams", "QueueMember"]
    assert not any(m.name == "QueueStatusComplete" for m in msgs)


async def test_fault_silent_peer_never_answers_ping() -> None:
    faults = AMIFaults()
    async with Simulator(ami_faults=faults) as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        parser = AMIParser()
        writer.write(LOGIN + b"Action: Ping\r\nActionID: p1\r\n\r\n")
        seen: list[Message] = []
        while not any(m.get("ActionID") == "p1" for m in seen):
            seen += [m for m in parser.feed(await reader.read(65536)) if isinstance(m, Message)]
        faults.silent_ping = True
        writer.write(b"Action: Ping\r\nActionID: p2\r\n\r\n")
        try:
            extra = await asyncio.wait_for(reader.read(65536), 0.3)
        except TimeoutError:
            extra = b""
        assert b"p2" not in extra
        writer.close()


async def test_fault_connection_drop_at_byte() -> None:
    async with Simulator(ami_faults=AMIFaults(drop_at_byte=100)) as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        writer.write(LOGIN)
        data = b"".join(await chunks_until_eof(reader))
    assert len(data) == 100
    assert data.startswith(b"Asterisk Call Manager/11.0.0\r\nResponse: Success\r\n")


async def test_fault_drop_at_random_byte_is_reproducible() -> None:
    lengths = []
    for _ in range(2):
        async with Simulator(ami_faults=AMIFaults(drop_at_random=True, seed=7)) as sim:
            reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
            writer.write(LOGIN + b"Action: QueueStatus\r\n\r\n" * 5)
            lengths.append(len(b"".join(await chunks_until_eof(reader))))
    assert lengths[0] == lengths[1] and 0 < lengths[0] <= 2000


async def test_fault_slow_writer_chunks_with_pauses() -> None:
    async with Simulator(ami_faults=AMIFaults(write_chunk=16, write_pause=0.02)) as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        start = time.monotonic()
        writer.write(LOGIN + b"Action: Logoff\r\n\r\n")
        chunks = await chunks_until_eof(reader)
        elapsed = time.monotonic() - start
    data = b"".join(chunks)
    assert data.endswith(b"Message: Thanks for all the fish.\r\n\r\n")
    assert max(len(c) for c in chunks) <= 32  # at most two 16-byte pieces coalesced
    assert elapsed >= 0.02 * (len(data) // 16 - 10)  # one pause between pieces of a message


async def test_fault_slow_reader_delays_processing() -> None:
    async with Simulator(ami_faults=AMIFaults(read_pause=0.2)) as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        await reader.readline()  # greeting
        start = time.monotonic()
        writer.write(b"Action: Ping\r\nActionID: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        assert time.monotonic() - start >= 0.15
        writer.close()
