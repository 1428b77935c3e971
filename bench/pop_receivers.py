"""The screen pop's receivers for ``bench/screen_pop.py``, in a child process: they are
the CRM and the agent desktop, not ctid, so they must not share ctid's event loop (in
ctid's process their reads waited behind ctid's own work and were counted as ctid's
latency).

``python bench/pop_receivers.py --paths mqtt,ws --mqtt-port P --ws-port W --token T --topic TOPIC``
connects one real client per path, each to 127.0.0.1 only:

* an MQTT subscriber (aiomqtt, client id ``bench-crm``, QoS 1) on ``--topic`` (the bench
  uses ``ctid/v1/acme/calls/+``: a CRM's view, every ``call.*`` event);
* a websocket client (aiohttp) on ``ws://127.0.0.1:W/ws`` with the supervisor token as
  ``Authorization: Bearer``, started with ``{"op":"subscribe"}`` (every event of its tenant).

The bench runs two of these children, ``--paths mqtt`` (the CRM) and ``--paths ws``
(the agent desktop), as they are two programs: in one process, aiomqtt (paho reads one
MQTT packet per readable event) waited behind the websocket frames of the same loop
and the MQTT pop lagged the websocket one by milliseconds that were no one's but the
receiver's.

Each stamps every message with ``time.perf_counter()`` as its read returns, before
anything else; a ``call.offered`` (found by a byte search, then parsed) keeps the first
stamp of its ``call_id``. The clock: ``perf_counter()`` is ``CLOCK_MONOTONIC`` on Linux,
one clock for the whole host, so these stamps compare with the parent's ``t0`` and with
the simulator child's ``Dial`` stamps. The parent checks it at start (``clock``).

The bare transport baseline runs here too (in the ``mqtt`` child), off ctid's loop: a
second aiomqtt publisher and subscriber pair (QoS 1, on ``bench/<tag>``).

Control, one JSON line each way on stdin/stdout (the parent speaks first, except for
``ready``):

* ``{"ready": true}``, unasked, once its clients are subscribed (the websocket's ack
  read); a failure is ``{"error": "..."}`` and exit 1.
* ``clock``: ``{"clock": perf_counter()}``.
* ``baseline RATE COUNT SIZE TAG``: runs the bare round trip now; ``{"baseline": [ms...]}``.
* ``loaded RATE COUNT SIZE TAG``: starts the same in the background; ``{"started": true}``.
* ``collect N TIMEOUT``: waits (at most ``TIMEOUT`` s) until each of its clients has a
  ``call.offered`` for ``N`` distinct calls, and for the background baseline; answers
  the stamps (``{"mqtt": {call_id: t}, "ws": {...}, "ws_ok": ..., "loaded": [...],
  "cpu": process_time(), "mqtt_messages": n, "ws_frames": n}``) and exits.

The child exits on its own if stdin closes (the parent died), after ``--lifetime``
seconds whatever happens, and (Linux) with SIGKILL when its parent dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiomqtt
from children import die_with_parent  # bench/children.py

OFFERED = b'"type":"call.offered"'


async def mqtt_round_trips(port: int, rate: float, count: int, payload_size: int, tag: str,
                           timeout: float = 30.0) -> list[float]:
    """Bare aiomqtt: publish QoS 1 at ``rate``/s, receive on a second client; ms per message."""
    sent: dict[int, float] = {}
    got: list[float] = []
    topic = f"bench/{tag}"
    async with (aiomqtt.Client("127.0.0.1", port, identifier=f"bench-{tag}-sub") as sub,
                aiomqtt.Client("127.0.0.1", port, identifier=f"bench-{tag}-pub") as pub):
        await sub.subscribe(topic, qos=1)
        done = asyncio.Event()

        async def read() -> None:
            async for message in sub.messages:
                now = time.perf_counter()
                raw = message.payload
                assert isinstance(raw, bytes)
                got.append((now - sent[int(raw[:10])]) * 1000)
                if len(got) >= count:
                    done.set()
                    return

        reader = asyncio.create_task(read())
        try:
            pad = b"x" * max(0, payload_size - 10)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for n in range(count):
                await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
                sent[n] = time.perf_counter()
                await pub.publish(topic, b"%010d" % n + pad, qos=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return got


@dataclass
class Receipts:
    """The first receipt of each call's ``call.offered``, per path (perf_counter)."""

    mqtt: dict[str, float] = field(default_factory=dict)
    ws: dict[str, float] = field(default_factory=dict)
    ws_ok: bool = True
    mqtt_messages: int = 0
    ws_frames: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    paths: frozenset[str] = frozenset()

    def complete(self, n: int) -> bool:
        return ("mqtt" not in self.paths or len(self.mqtt) >= n) and ("ws" not in self.paths or len(self.ws) >= n)


async def read_mqtt(sub: aiomqtt.Client, got: Receipts) -> None:
    async for message in sub.messages:
        now = time.perf_counter()
        got.mqtt_messages += 1
        raw = message.payload
        if isinstance(raw, bytes) and OFFERED in raw:
            got.mqtt.setdefault(json.loads(raw)["call_id"], now)
            got.changed.set()


async def read_ws(ws: aiohttp.ClientWebSocketResponse, got: Receipts) -> None:
    async for frame in ws:
        now = time.perf_counter()
        got.ws_frames += 1
        if frame.type is not aiohttp.WSMsgType.TEXT:
            got.ws_ok = False
            got.changed.set()
            return
        if '"type":"call.offered"' in frame.data:
            got.ws.setdefault(json.loads(frame.data)["call_id"], now)
            got.changed.set()
    got.ws_ok = False  # the server closed us
    got.changed.set()


def say(reply: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(reply, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def serve(args: argparse.Namespace) -> int:
    paths = frozenset(args.paths.split(","))
    got = Receipts(paths=paths)
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                return await _serve(args, stack, got, tasks)
            finally:  # the readers stop before their clients close
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    except (OSError, aiomqtt.MqttError, aiohttp.ClientError, TimeoutError) as exc:
        say({"error": f"{type(exc).__name__}: {exc}"})
        return 1


async def _serve(args: argparse.Namespace, stack: contextlib.AsyncExitStack, got: Receipts,
                 tasks: list[asyncio.Task[Any]]) -> int:
    loop = asyncio.get_running_loop()
    if "mqtt" in got.paths:
        sub = await stack.enter_async_context(aiomqtt.Client("127.0.0.1", args.mqtt_port, identifier="bench-crm"))
        await sub.subscribe(args.topic, qos=1)
        tasks.append(asyncio.create_task(read_mqtt(sub, got)))
    if "ws" in got.paths:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        ws = await stack.enter_async_context(http.ws_connect(
            f"http://127.0.0.1:{args.ws_port}/ws", headers={"Authorization": f"Bearer {args.token}"}))
        await ws.send_json({"op": "subscribe", "req_id": 1})
        ack = await ws.receive_json(timeout=10)
        if ack.get("type") != "ack":
            say({"error": f"websocket subscribe not acknowledged: {ack}"})
            return 1
        tasks.append(asyncio.create_task(read_ws(ws, got)))
    say({"ready": True})
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    loaded: asyncio.Task[list[float]] | None = None
    while True:
        line = await reader.readline()
        if not line:  # the parent is gone
            return 1
        command, *words = line.decode().split()
        if command == "clock":
            say({"clock": time.perf_counter()})
        elif command in ("baseline", "loaded"):
            rate, count, size, tag = float(words[0]), int(words[1]), int(words[2]), words[3]
            if command == "baseline":
                say({"baseline": await mqtt_round_trips(args.mqtt_port, rate, count, size, tag)})
            else:
                loaded = asyncio.create_task(mqtt_round_trips(args.mqtt_port, rate, count, size, tag))
                tasks.append(loaded)
                say({"started": True})
        elif command == "collect":
            n, timeout = int(words[0]), float(words[1])
            deadline = loop.time() + timeout
            while not got.complete(n) and got.ws_ok and loop.time() < deadline:
                got.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(got.changed.wait(), deadline - loop.time())
            load: list[float] = []
            if loaded is not None:
                with contextlib.suppress(TimeoutError):
                    load = await asyncio.wait_for(asyncio.shield(loaded), max(1.0, deadline - loop.time()))
            say({"mqtt": got.mqtt, "ws": got.ws, "ws_ok": got.ws_ok, "loaded": load,
                 "cpu": time.process_time(), "mqtt_messages": got.mqtt_messages, "ws_frames": got.ws_frames})
            return 0
        else:
            say({"error": f"unknown command {command!r}"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", default="mqtt,ws", help="mqtt, ws or both (comma-separated)")
    ap.add_argument("--mqtt-port", type=int, required=True)
    ap.add_argument("--ws-port", type=int, required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--lifetime", type=float, default=600.0, help="exit after this many seconds whatever happens")
    args = ap.parse_args()
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C: it collects or kills us

    async def bounded() -> int:
        async with asyncio.timeout(args.lifetime):
            return await serve(args)

    sys.exit(asyncio.run(bounded()))


if __name__ == "__main__":
    main()
