"""A scripted AMI peer for client tests: real sockets, behaviour chosen per test.

It speaks with the exact framing and texts of the Asterisk 22 captures (greeting,
``Authentication accepted``/``failed``, ``Ping: Pong``). The full protocol-faithful
simulator lives in ``ctid.simulator``; this peer exists to misbehave on purpose in ways
a test can aim precisely (drop at a byte, go silent, cut a list).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ctid.asterisk.ami_protocol import AMIParser, Message, serialize

GREETING = b"Asterisk Call Manager/11.0.0\r\n"


@dataclass
class FakeAMI:
    secret: str = "ctidpass"
    answer_pings: bool = True
    answer_actions: bool = True
    write_chunk: int = 0  # >0: write responses in chunks of this many bytes
    hooks: dict[str, Callable[[FakeAMI, Message, asyncio.StreamWriter], bytes | None]] = field(
        default_factory=dict)
    connections: int = 0
    received: list[Message] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self.writers:
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def actions(self, name: str) -> list[Message]:
        return [m for m in self.received if m.name == name]

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if self.write_chunk:
            for i in range(0, len(data), self.write_chunk):
                writer.write(data[i:i + self.write_chunk])
                await writer.drain()
                await asyncio.sleep(0)
        else:
            writer.write(data)
            await writer.drain()

    async def broadcast(self, data: bytes) -> None:
        for writer in list(self.writers):
            if not writer.is_closing():
                await self.send(writer, data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        parser = AMIParser(expect_greeting=False)
        try:
            writer.write(GREETING)
            while True:
                data = await reader.read(4096)
                if not data:
                    return
                for item in parser.feed(data):
                    if not isinstance(item, Message):
                        continue
                    self.received.append(item)
                    reply = self._reply(item, writer)
                    if reply:
                        await self.send(writer, reply)
                    if item.name == "Logoff" or (item.name == "Login" and b"failed" in (reply or b"")):
                        writer.close()
                        return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    def _reply(self, action: Message, writer: asyncio.StreamWriter) -> bytes | None:
        aid = [("ActionID", action["ActionID"])] if "ActionID" in action else []
        hook = self.hooks.get(action.name)
        if hook is not None:
            return hook(self, action, writer)
        if action.name == "Login":
            if action.get("Secret") == self.secret:
                return serialize(Message.response("Success", [*aid, ("Message", "Authentication accepted")])) + \
                    serialize(Message.event("FullyBooted", [("Privilege", "system,all"), ("Uptime", "8"),
                                                            ("LastReload", "8"), ("Status", "Fully Booted")]))
            return serialize(Message.response("Error", [*aid, ("Message", "Authentication failed")]))
        if action.name == "Ping":
            if not self.answer_pings:
                return None
            return serialize(Message.response("Success", [*aid, ("Ping", "Pong"),
                                                          ("Timestamp", "1795395354.587225")]))
        if action.name == "Logoff":
            return serialize(Message.response("Goodbye", [*aid, ("Message", "Thanks for all the fish.")]))
        if not self.answer_actions:
            return None
        return serialize(Message.response("Success", aid))
