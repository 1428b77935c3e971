"""The websocket client fleet of ``bench/ws_fanout.py``, run as a child process so the
server under test has a core of its own.

``python bench/ws_clients.py --port P --clients N --asked A --token T [--stalled K]``
connects N clients to ``ws://127.0.0.1:P/ws`` (a batch at a time), each with a real
RFC 6455 handshake (random key, ``Sec-WebSocket-Accept`` checked), authenticated by the
``Authorization: Bearer`` header and started with a masked ``{"op":"subscribe"}`` frame.
Each client parses every server frame: it reads the ``seq`` from the event's text
(``{"v":1,"seq":N,...``, the envelope's first field) and stamps the frame with
``time.perf_counter()`` taken once per read (per ``data_received``); it answers pings
with masked pongs and close frames with a masked close. Client K is the stalled one:
``SO_RCVBUF`` 4 KiB and, once subscribed, it never reads again (until told to).

The clock: ``perf_counter()`` is ``CLOCK_MONOTONIC`` on Linux, one clock for the whole
system, so a stamp taken here is comparable with the publish stamps of the parent. The
parent checks this at start (``clock``: the child's reading must fall between two of
its own).

Control, one JSON line each way on stdin/stdout (the parent speaks first):

* ``ready`` is sent by the child, unasked, once every client has its subscribe ack
  (``{"ready": N, "stalled_sockname": [host, port] | null}``); a failure is
  ``{"error": "..."}`` and exit 1.
* ``clock``: ``{"clock": perf_counter()}``.
* ``stat``: ``{"cpu": process_time(), "min_last_seq": ...}``, the lowest ``seq`` read
  by an active (not stalled, not cut) client.
* ``snapshot``: stop stamping (frames read later were not delivered in time) and answer
  which clients are cut, and each client's frame count and last ``seq`` so far.
* ``resume_stalled``: the stalled client reads again; answers, within 5 s, what it
  found in its buffers and whether its connection ended.
* ``finish``: abort every connection, write the stamps (``array('d')``, ``asked`` per
  client in client order, NaN where a frame was not read before the snapshot, the
  stalled client's row all NaN) to ``--out`` and answer the per-client frame counts
  and the out-of-order and duplicate frames seen; then exit.

The child exits on its own if stdin closes (the parent died), after ``--lifetime``
seconds whatever happens, and (Linux) with SIGKILL when its parent dies.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import resource
import signal
import socket
import struct
import sys
import time
from array import array
from typing import Any

from children import die_with_parent  # bench/children.py

MSS = 1460
SEQ_PREFIX = b'{"v":1,"seq":'
_SEQ_AT = len(SEQ_PREFIX)
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
NAN = math.nan


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (RFC 6455 5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
    return head + mask + masked


class Fleet:
    """Shared by the clients of this process: the stamp table and whether to stamp."""

    def __init__(self, clients: int, asked: int) -> None:
        self.asked = asked
        self.stamps = array("d", [NAN]) * (clients * asked)
        self.recording = True


class Client(asyncio.Protocol):
    """Handshake, subscribe, then parse server frames (unmasked), stamping each event."""

    def __init__(self, fleet: Fleet, index: int, port: int, token: str, *, stalled: bool) -> None:
        self.fleet = fleet
        self.base = -1 if stalled else index * fleet.asked  # the stalled client's reads are no latency
        self.port = port
        self.token = token
        self.stalled = stalled
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.accept = b""
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[float] = loop.create_future()
        self.close_code: int | None = None
        self.count = 0  # event frames read
        self.last_seq = 0
        self.out_of_order = 0  # an event whose seq is not the previous one + 1
        self.duplicates = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance(transport, asyncio.Transport): uvloop's transports are not
        # subclasses of it (an assert here made every uvloop connect time out).
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16))
        self.accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        self.transport.write(  # type: ignore[union-attr]
            (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
             f"Authorization: Bearer {self.token}\r\n\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(time.perf_counter())
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the subscribe ack: {exc!r}"))

    def _handshake(self, buf: bytes) -> bytes | None:
        """The bytes after the 101 response, or None while it is incomplete."""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return None
        head = buf[:end].lower()
        if not head.startswith(b"http/1.1 101") or b"sec-websocket-accept: " + self.accept.lower() not in head:
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(buf[:200].decode(errors="replace")))
            assert self.transport is not None
            self.transport.abort()
            return None
        self.upgraded = True
        assert self.transport is not None
        self.transport.write(client_frame(b'{"op":"subscribe","req_id":1}'))
        return buf[end + 4:]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            rest = self._handshake(buf)
            if rest is None:
                return
            buf = rest
        pos, size = 0, len(buf)
        fleet = self.fleet
        stamps, asked, base = fleet.stamps, fleet.asked, self.base
        while size - pos >= 2:
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if size - pos < head + length:
                break
            opcode = buf[pos] & 0x0F
            start = pos + head
            pos = start + length
            if opcode == 0x1:
                if buf.startswith(SEQ_PREFIX, start):
                    at = start + _SEQ_AT
                    seq = int(buf[at:buf.index(b",", at)])
                    if seq != self.last_seq + 1:
                        self.out_of_order += 1
                    if base >= 0 and fleet.recording and 0 < seq <= asked:
                        slot = base + seq - 1
                        if stamps[slot] == stamps[slot]:  # not NaN: read before
                            self.duplicates += 1
                        else:
                            stamps[slot] = now
                    self.count += 1
                    self.last_seq = seq
                elif not self.ready.done():  # the subscribe ack
                    self.ready.set_result(None)
                    if self.stalled:
                        assert self.transport is not None
                        self.transport.pause_reading()  # and never again, until resume_stalled
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(client_frame(buf[start:pos], 0xA))
            elif opcode == 0x8:
                self.close_code = int.from_bytes(buf[start:start + 2], "big") if length >= 2 else 1005
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(client_frame(buf[start:start + 2], 0x8))
                    self.transport.close()
        self.buf = buf[pos:]

    def cut(self) -> bool:
        return self.lost.done() or self.close_code is not None


async def connect(fleet: Fleet, port: int, token: str, n: int, stalled_index: int, batch: int) -> list[Client]:
    loop = asyncio.get_running_loop()
    clients: list[Client] = []

    async def one(i: int) -> Client:
        stalled = i == stalled_index
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # An Ethernet MSS, as over a real network: with loopback's 64 KiB MSS the
            # server's send buffer autotunes to 4 MB and absorbs ~3 MB (6,000 events) of
            # a stalled client before ctid sees any backlog; with 1460 it takes ~90 KB.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MSS)
            if stalled:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            _, client = await loop.create_connection(lambda: Client(fleet, i, port, token, stalled=stalled), sock=sock)
        except BaseException:
            sock.close()
            raise
        return client

    for first in range(0, n, batch):
        made = await asyncio.gather(*(one(i) for i in range(first, min(n, first + batch))))
        clients.extend(made)
        async with asyncio.timeout(30):
            await asyncio.gather(*(c.ready for c in made))
    return clients


def write_stamps(path: str, stamps: array[float]) -> None:
    with open(path, "wb") as out:
        stamps.tofile(out)


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    fleet = Fleet(args.clients, args.asked)
    clients: list[Client] = []
    try:
        clients = await connect(fleet, args.port, args.token, args.clients, args.stalled, args.batch)
    except (OSError, TimeoutError) as exc:
        say({"error": f"connect: {type(exc).__name__}: {exc}"})
        for c in clients:
            if c.transport is not None:
                c.transport.abort()
        return 1
    stalled = clients[args.stalled] if 0 <= args.stalled < len(clients) else None
    sockname = None
    if stalled is not None and stalled.transport is not None:
        sockname = list(stalled.transport.get_extra_info("sockname"))
    say({"ready": len(clients), "stalled_sockname": sockname})
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:  # the parent is gone
            break
        command = line.decode().strip()
        if command == "clock":
            say({"clock": time.perf_counter()})
        elif command == "stat":
            live = [c.last_seq for c in clients if not c.stalled and not c.cut()]
            say({"cpu": time.process_time(), "min_last_seq": min(live, default=None)})
        elif command == "snapshot":
            fleet.recording = False
            say({"cut": [i for i, c in enumerate(clients) if c.cut()], "count": [c.count for c in clients],
                 "last_seq": [c.last_seq for c in clients], "cpu": time.process_time()})
        elif command == "resume_stalled" and stalled is not None:
            seen = stalled.count
            assert stalled.transport is not None
            stalled.transport.resume_reading()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stalled.lost), 5)
            say({"frames_buffered": stalled.count - seen, "close_frame": stalled.close_code,
                 "connection_ended": stalled.lost.done()})
        elif command == "finish":
            for c in clients:
                if c.transport is not None and not c.transport.is_closing():
                    c.transport.abort()
            write_stamps(args.out, fleet.stamps)
            say({"count": [c.count for c in clients],
                 "out_of_order": sum(c.out_of_order for c in clients if not c.stalled),
                 "duplicates": sum(c.duplicates for c in clients)})
            await asyncio.sleep(0.1)
            break
        else:
            say({"error": f"unknown command {command!r}"})
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--asked", type=int, required=True, help="events in the stream (seq 1..asked)")
    ap.add_argument("--token", required=True)
    ap.add_argument("--stalled", type=int, default=-1, help="index of the stalled client here (-1: none)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--out", required=True, help="file for the stamps")
    ap.add_argument("--lifetime", type=float, default=600.0, help="exit after this many seconds whatever happens")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args()
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C: it finishes or kills us
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def bounded() -> int:
        async with asyncio.timeout(args.lifetime):
            return await serve(args)

    if args.loop == "uvloop":
        import uvloop

        sys.exit(uvloop.run(bounded()))
    sys.exit(asyncio.run(bounded()))


if __name__ == "__main__":
    main()
