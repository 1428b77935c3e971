"""Screen-pop latency: from the moment ctid identifies a call to the receipt of its
``call.offered`` by an MQTT subscriber (real mosquitto) and by a websocket client.

Everything real except the PBX: a :class:`~ctid.app.Daemon` on SQLite (a temp dir) with
MQTT to a private mosquitto on a free 127.0.0.1 port, driven by the simulator running the
shipped ``dialplans/ctid.conf`` at ``--rate`` calls/s for ``--seconds`` s. Every call is
answered, identified over FastAGI (``__CTID_CALL_ID``), waits in the native fallback
queue (no members) and hangs up after ``--hold`` s, so about rate x hold calls are up.
The simulator runs in a child process, as Asterisk is another process (on a 2-core
machine it then has its own core); ``--sim-in-process`` puts it on the daemon's loop, as
the tests do, which saturates that core at 200 calls/s. So five processes share the
machine: ctid (with the bench's probes), the simulator, the two receivers and mosquitto.

The simulator's AMI user reads what the sample ``asterisk-conf/manager.conf`` grants
ctid (``read = system,call,agent,user``, the simulator's default), so, as in production,
the simulator does not serialize or send ``VarSet``, ``Newexten``, ``AGIExec*`` or
``DTMF*`` events to ctid (and ctid's Login asks for just those four classes).

``--no-acd`` trigger: a bus sink of the bench's own. When ``call.started`` goes out (it
is held until ctid's FastAGI script has identified the call, so it leaves when that
script binds the channel to its id, ``CallModel.bind_call_id``) the sink records
``t0 = perf_counter()`` and starts a task that builds a schema-valid ``call.offered``
for that call (``call_data(call)`` plus the offered fields) and sends it with
``bus.publish_and_wait``, as the ACD's dispatcher will.

**Receivers.** Receipt is ``perf_counter()`` when the MQTT subscriber (aiomqtt, QoS 1,
``ctid/v1/acme/calls/+``: a CRM's subscription, every ``call.*`` event, as before) and
the websocket client (aiohttp, supervisor token, every event of the tenant, as before)
read it. Each runs in a child process of its own (``bench/pop_receivers.py``): they are
the CRM and the agent desktop, not ctid. On ctid's loop their reads waited behind
ctid's work (counted as ctid's latency), and their parsing of every event slowed ctid;
in one shared child the MQTT subscriber (paho reads one packet per readable event)
waited behind the websocket frames. Connected to 127.0.0.1 only; each child is reaped
on every exit path (it exits after answering ``collect``, on stdin EOF, after a
lifetime bound, and with SIGKILL if the bench dies; the bench kills what is left).

**One clock.** ``t0`` is stamped in ctid's process, receipts in the receivers' process
and the ``Dial`` (below) in the simulator's: all with ``time.perf_counter()``, which on
Linux is ``CLOCK_MONOTONIC``, one clock for the whole host (not stepped by NTP, unlike
``time.time()``). The bench refuses to run if ``perf_counter`` is another clock, and
checks at start that a reading of the receivers' process falls between two of its own.

Baseline, same broker, same payload size and rate, in the MQTT receiver's process (off
ctid's loop): a bare aiomqtt publisher (QoS 1) to a bare aiomqtt subscriber, once
before the run (the transport floor) and once at 20 msg/s *during* the run (the floor
under the same machine load). The ratios say what ctid adds on top of the broker round
trip.

Also printed: the achieved call rate, the event loop's lag, GC pauses, how far the MQTT
publisher fell behind, and the daemon's warnings (its info log goes to a temp file).
``--broker-nodelay`` runs mosquitto with ``set_tcp_nodelay true`` (off by default) for
comparison.

**ACD mode** (the default; ``--no-acd`` runs the bench's own trigger above instead): the
service line goes to a ctid queue, ``--agents`` agents (default 50) are logged in over the
REST API before the run, and the ACD makes every offer, as in production: ``call.queued``
at the FastAGI ``inbound`` script, match, reserve, ``call.offered`` through
``publish_and_wait``, then ``Setvar`` + ``Redirect`` to ``[ctid-connect]``, which
``Dial``s the agent's device. Agents answer after 20 ms and hang up after ``--talk`` s
(default 0.1), so at 200 calls/s about 30 of 50 agents are busy and calls do not pile
up; callers stay until the agent hangs up (Dial option ``g``: ``[ctid-connect]`` then
hangs the caller up). ``t0`` is when ctid publishes the event that makes the offer: the
later of the call's ``call.queued`` and the offered agent's last ``agent.state`` ready
(a bus sink of the bench's own watches them; no event is published by the bench).

Also in ACD mode, the **lead of the pop over the ring**: for every call, the
simulator's execution of ``Dial`` to the agent (its ``DialBegin`` whose destination is
an agent device, stamped with ``perf_counter()`` where the simulator runs) minus the
pop's receipt by the MQTT subscriber and by the websocket client (the receivers'
process); it must be positive for every call. Printed as min/p50 per path and as
``RESULT pop_leads_dial_min_ms``.

Run: ``.venv/bin/python bench/screen_pop.py [--rate 200] [--seconds 10] [--hold 1] [--no-acd]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from children import die_with_parent  # noqa: E402  (bench/children.py)

from ctid import logs  # noqa: E402
from ctid.app import Daemon  # noqa: E402
from ctid.asterisk.ami_protocol import Message  # noqa: E402
from ctid.calls import CHANNELVARS, Call  # noqa: E402
from ctid.config import Config, parse  # noqa: E402
from ctid.events.calls import call_data  # noqa: E402
from ctid.events.schema import Event  # noqa: E402
from ctid.simulator import Simulator  # noqa: E402
from ctid.simulator.config import Endpoint, QueueConfig  # noqa: E402
from tests.services import Mosquitto, free_port, start_mosquitto, wait_for_port  # noqa: E402

SECRET = "bench-secret"
SUPERVISOR = "bench-supervisor-token"
TARGET_MS = 20.0
TOPIC = "ctid/v1/acme/calls/+"
DIALPLAN = ROOT / "dialplans" / "ctid.conf"
RECEIVERS = Path(__file__).resolve().parent / "pop_receivers.py"


def agent_ids(count: int) -> list[str]:
    return [str(1001 + n) for n in range(count)]


def make_config(tmp: Path, mqtt_port: int, ami_port: int, agi_port: int, *, acd: bool = False,
                agents: int = 1) -> Config:
    if acd:  # the service line goes to a ctid queue and the ACD offers every call
        return parse({
            "instance": {"id": "ctid-bench"},
            "database": {"url": f"sqlite+aiosqlite:///{tmp / 'bench.db'}"},
            "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
            "agi": {"port": agi_port},
            "http": {"port": 0},
            "asterisk": [{"id": "sim", "port": ami_port, "secret": SECRET}],
            "tenants": [{"id": "acme"}],
            "service_lines": [{"id": "acme-support", "tenant": "acme", "dnis": ["200"], "recording": "always",
                               "queue": "support"}],
            "agents": [{"id": a, "tenant": "acme", "name": f"Agent {a}"} for a in agent_ids(agents)],
            "queues": [{"id": "support", "tenant": "acme", "wrapup_s": 0, "ring_timeout_s": 10}],
            "tokens": [{"name": "boss", "role": "supervisor", "tenant": "acme",
                        "token_sha256": hashlib.sha256(SUPERVISOR.encode()).hexdigest()}],
        }, env={})
    return parse({
        "instance": {"id": "ctid-bench"},
        "database": {"url": f"sqlite+aiosqlite:///{tmp / 'bench.db'}"},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
        "agi": {"port": agi_port},
        "http": {"port": 0},
        "asterisk": [{"id": "sim", "port": ami_port, "secret": SECRET}],
        "tenants": [{"id": "acme"}],
        "service_lines": [{"id": "acme-support", "tenant": "acme", "dnis": ["200"], "recording": "always"}],
        "agents": [{"id": "1001", "tenant": "acme", "name": "Alice"}],
        "queues": [{"id": "support", "tenant": "acme"}],
        "tokens": [{"name": "boss", "role": "supervisor", "tenant": "acme",
                    "token_sha256": hashlib.sha256(SUPERVISOR.encode()).hexdigest()}],
    }, env={})


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (f"n={len(values):5d}  p50={pct(values, 50):6.2f}  p99={pct(values, 99):6.2f}  "
            f"max={max(values):6.2f}  mean={statistics.fmean(values):6.2f} ms")


@dataclass
class Trigger:
    """The bench's stand-in for the ACD: a bus sink that answers each ``call.started``
    with a ``call.offered`` sent through ``publish_and_wait``."""

    daemon: Daemon
    name: str = "bench-trigger"
    t0: dict[str, float] = field(default_factory=dict)
    returned: dict[str, float] = field(default_factory=dict)  # publish_and_wait returned (since t0)
    wait_only: list[float] = field(default_factory=list)      # publish_and_wait's own duration
    undelivered: int = 0
    no_call: int = 0
    first_offer: dict[str, Any] | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    active: bool = True

    def offer(self, event: Event, payload: str) -> Awaitable[None] | None:
        if event.type != "call.started" or not self.active or event.call_id is None:
            return None
        self.t0[event.call_id] = time.perf_counter()
        task = asyncio.create_task(self._offer(event))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return None

    async def _offer(self, started: Event) -> None:
        call_id = started.call_id
        assert call_id is not None
        call = self.daemon.links["sim"].model.get(call_id)
        if call is None:
            self.no_call += 1
            return
        now = self.daemon.clock()
        event = Event(type="call.offered", tenant=call.tenant, ts=now, data=offered_data(call, now),
                      call_id=call.call_id, agent_id="1001", queue="support")
        start = time.perf_counter()
        result = await self.daemon.bus.publish_and_wait(event)
        end = time.perf_counter()
        self.wait_only.append((end - start) * 1000)
        self.returned[call_id] = (end - self.t0[call_id]) * 1000
        if not result.delivered:
            self.undelivered += 1
        if self.first_offer is None:
            self.first_offer = result.event.envelope()


@dataclass
class OfferClock:
    """ACD mode: a bus sink that only watches. ``t0`` of a call is when ctid published the
    event that made its offer: the later of the call's ``call.queued`` and the offered
    agent's last ``agent.state`` ready (perf_counter, at publish)."""

    name: str = "bench-offer-clock"
    queued: dict[str, float] = field(default_factory=dict)
    ready: dict[str, float] = field(default_factory=dict)
    t0: dict[str, float] = field(default_factory=dict)
    offers: int = 0
    first_offer: dict[str, Any] | None = None

    def offer(self, event: Event, payload: str) -> Awaitable[None] | None:
        now = time.perf_counter()
        if event.type == "call.queued" and event.call_id is not None:
            self.queued[event.call_id] = now
        elif event.type == "agent.state" and event.agent_id is not None and event.data.get("state") == "ready":
            self.ready[event.agent_id] = now
        elif event.type == "call.offered" and event.call_id is not None:
            self.offers += 1
            trigger = max(self.queued.get(event.call_id, now), self.ready.get(event.agent_id or "", 0.0))
            self.t0.setdefault(event.call_id, trigger)
            if self.first_offer is None:
                self.first_offer = event.envelope()
        return None


def offered_data(call: Call, now: datetime) -> dict[str, Any]:
    first = call.legs[0]
    data = call_data(call)
    data.update({
        "state": "offered",
        "queue": "support",
        "priority": 5,
        "wait_s": round(max(0.0, (now - call.created_at).total_seconds()), 3),
        "ivr": {},
        "crm": call.data.get("crm"),
        "crm_error": call.data.get("crm_error"),
        "recording": {"policy": "always"},
        "channel": first.channel,
        "uniqueid": first.uniqueid,
        "ring_timeout_s": 15,
        "device": "PJSIP/1001",
    })
    return data


class ReceiverProcess:
    """One receivers' child process (``bench/pop_receivers.py``), spoken to in JSON lines.
    Spawned with :meth:`start`, always reaped by :meth:`stop` (killed if still running)."""

    def __init__(self, paths: str) -> None:
        self.paths = paths
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, mqtt_port: int, ws_port: int, lifetime: float) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(RECEIVERS), "--paths", self.paths, "--mqtt-port", str(mqtt_port),
            "--ws-port", str(ws_port), "--token", SUPERVISOR, "--topic", TOPIC, "--lifetime", str(lifetime),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 26)
        ready = await self._read(60)
        assert ready.get("ready") is True, ready
        # One host clock: the child's perf_counter() must fall between two of ours.
        before = time.perf_counter()
        theirs = (await self.ask("clock"))["clock"]
        after = time.perf_counter()
        if not before <= theirs <= after:
            raise RuntimeError(f"perf_counter is not shared with the receivers' process: {before} {theirs} {after}")

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.paths} receiver's process ended (exit {await self.proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the {self.paths} receiver's process: {reply['error']}")
        return reply

    async def ask(self, command: str, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        async with asyncio.timeout(timeout):
            await self.proc.stdin.drain()
        return await self._read(timeout)

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # it exits by itself after "collect", or on EOF
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)


class Receivers:
    """The MQTT subscriber (the CRM) and the websocket client (the agent desktop), each in
    a child process of its own: they are not ctid, so their reads must not wait behind
    ctid's work on its loop, nor behind each other's."""

    def __init__(self) -> None:
        self.mqtt = ReceiverProcess("mqtt")
        self.ws = ReceiverProcess("ws")

    async def start(self, mqtt_port: int, ws_port: int, lifetime: float) -> None:
        await asyncio.gather(self.mqtt.start(mqtt_port, ws_port, lifetime),
                             self.ws.start(mqtt_port, ws_port, lifetime))

    async def collect(self, calls: int, timeout: float) -> dict[str, Any]:
        """Both children's stamps, merged (``cpu`` summed; the baseline is the mqtt child's)."""
        command = f"collect {calls} {timeout:.1f}"
        mqtt, ws = await asyncio.gather(self.mqtt.ask(command, timeout + 30), self.ws.ask(command, timeout + 30))
        return {"mqtt": mqtt["mqtt"], "ws": ws["ws"], "ws_ok": ws["ws_ok"], "loaded": mqtt["loaded"],
                "cpu": mqtt["cpu"] + ws["cpu"], "mqtt_messages": mqtt["mqtt_messages"], "ws_frames": ws["ws_frames"]}

    async def stop(self) -> None:
        await asyncio.gather(self.mqtt.stop(), self.ws.stop(), return_exceptions=True)


@dataclass
class DialClock:
    """When the simulator executed ``Dial`` to an agent: the first ``DialBegin`` of each
    call (``ChanVariable: CTID_CALL_ID=...`` of the caller) whose destination is an agent
    device, stamped with ``time.perf_counter()`` (CLOCK_MONOTONIC: one clock for the host)
    as the simulator emits it."""

    agents: frozenset[str]
    at: dict[str, float] = field(default_factory=dict)

    def install(self, sim: Simulator) -> None:
        emit = sim.pbx._emit

        def spy(msg: Message) -> None:
            if msg.name == "DialBegin":
                dest = (msg.get("DestChannel") or "").partition("/")[2].rpartition("-")[0]
                if dest in self.agents:
                    call_id = next((v.partition("=")[2] for v in msg.get_all("ChanVariable")
                                    if v.startswith("CTID_CALL_ID=")), "")
                    if call_id:
                        self.at.setdefault(call_id, time.perf_counter())
            emit(msg)

        sim.pbx._emit = spy


def make_sim(port: int = 0, agi_port: int | None = None, *, agents: int = 0,
             talk: float = 0.1) -> tuple[Simulator, DialClock]:
    endpoints = {"trunk": Endpoint("trunk", context="ctid-inbound", ring_s=0.0)}
    for agent in agent_ids(agents):
        endpoints[agent] = Endpoint(agent, context="from-agents", callerid_num=agent, callerid_name=f"Agent {agent}",
                                    ring_s=0.02, hangup_after=talk)
    sim = Simulator(dialplan=DIALPLAN, users={"ctid": SECRET}, channelvars=CHANNELVARS, time_scale=1.0,
                    endpoints=endpoints, queues={"ctid-fallback": QueueConfig("ctid-fallback", members=[])},
                    port=port)
    if agi_port is not None:
        sim.pbx.agi_address = ("127.0.0.1", agi_port)
    dials = DialClock(frozenset(agent_ids(agents)))
    if agents:
        dials.install(sim)
    return sim, dials


async def drive(sim: Simulator, rate: float, seconds: float, hold: float | None) -> tuple[int, float, list[float]]:
    """Offer ``rate`` calls/s for ``seconds`` s, paced on the loop clock; (calls, elapsed s,
    the simulator loop's lateness per tick in ms). ``sim.events`` (every AMI event, kept
    for tests) is emptied as it goes: left to grow, its garbage-collection pauses made the
    simulator stall for up to 200 ms and then send ctid bursts no Asterisk sends."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate * seconds)
    started = 0
    lags: list[float] = []
    expected = start
    while started < total:
        now = loop.time()
        lags.append(max(0.0, now - expected) * 1000)
        due = min(total, int((now - start) * rate) + 1)
        while started < due:
            sim.inbound_call(dnis="200", caller=f"+1555{started:07d}", hangup_after=hold)
            started += 1
        if len(sim.events) > 5000:
            sim.events.clear()
        expected = max(loop.time() + 0.001, start + started / rate)
        await asyncio.sleep(expected - loop.time())
    return started, loop.time() - start, lags


class InProcessPBX:
    """The simulator on the daemon's own event loop (as the tests run it)."""

    def __init__(self, args: argparse.Namespace, agi_port: int) -> None:
        self.args = args
        self.sim, self.dials = make_sim(agi_port=agi_port, agents=args.agents if args.acd else 0, talk=args.talk)
        self.cpu_s = 0.0
        self.dial_at: dict[str, float] = self.dials.at

    async def start(self) -> int:
        await self.sim.start()
        return self.sim.ami_port

    async def run(self) -> tuple[int, float, list[float]]:
        return await drive(self.sim, self.args.rate, self.args.seconds, None if self.args.acd else self.args.hold)

    async def stop(self) -> None:
        async with asyncio.timeout(30):
            await self.sim.stop()


class ChildPBX:
    """The simulator in a child process, as Asterisk is another process: it gets the
    second core and the daemon's loop carries only ctid (and the two receivers)."""

    def __init__(self, args: argparse.Namespace, agi_port: int) -> None:
        self.args = args
        self.agi_port = agi_port
        self.proc: asyncio.subprocess.Process | None = None
        self.cpu_s = 0.0
        self.dial_at: dict[str, float] = {}

    async def _line(self, timeout: float) -> list[str]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("the simulator child exited")
        return line.decode().split()

    async def _say(self, word: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")
        await self.proc.stdin.drain()

    async def start(self) -> int:
        ami_port = free_port()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--sim-child", "--ami-port", str(ami_port), "--agi-port", str(self.agi_port),
            "--rate", str(self.args.rate), "--seconds", str(self.args.seconds), "--hold", str(self.args.hold),
            "--acd" if self.args.acd else "--no-acd", "--agents", str(self.args.agents), "--talk", str(self.args.talk),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 22)
        words = await self._line(30)
        assert words == ["ready"], words
        return ami_port

    async def run(self) -> tuple[int, float, list[float]]:
        await self._say("go")
        words = await self._line(self.args.seconds + 60)
        assert words[0] == "done", words
        return int(words[1]), float(words[2]), json.loads(words[3])

    async def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            await self._say("stop")
            while True:
                words = await self._line(30)
                if words and words[0] == "dials":
                    self.dial_at = json.loads(words[1])
                if words and words[0] == "cpu":
                    self.cpu_s = float(words[1])
                    break
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def sim_child(args: argparse.Namespace) -> int:
    """``--sim-child``: serve AMI on ``--ami-port``; on "go" offer the calls, print "done N s"."""
    loop = asyncio.get_running_loop()
    sim, dials = make_sim(port=args.ami_port, agi_port=args.agi_port, agents=args.agents if args.acd else 0,
                          talk=args.talk)
    await sim.start()
    gc.freeze()  # the simulator's start-up objects are never collected: shorter pauses
    print("ready", flush=True)
    if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
        await sim.stop()
        return 1
    cpu0 = time.process_time()
    count, elapsed, lags = await drive(sim, args.rate, args.seconds, None if args.acd else args.hold)
    print(f"done {count} {elapsed:.3f} {json.dumps([round(x, 2) for x in lags], separators=(',', ':'))}",
          flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), 120)
    cpu = time.process_time() - cpu0
    print(f"dials {json.dumps(dials.at, separators=(',', ':'))}", flush=True)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(30):
            await sim.stop()
    print(f"cpu {cpu:.3f}", flush=True)
    return 0


class GcPauses:
    """Garbage-collection pauses of this process (the daemon's), by generation, in ms."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append((time.perf_counter() - self._started) * 1000)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def describe(self) -> str:
        return ", ".join(f"gen{g} x{len(v)} max {max(v, default=0):.1f} ms" for g, v in self.pauses.items())


class LagProbe:
    """How late the daemon's event loop wakes a 10 ms sleep: its load, in ms."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.backlog = 0  # most events the MQTT publisher had not had acknowledged
        self.task: asyncio.Task[None] | None = None

    async def run(self, daemon: Daemon) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            self.lags.append((loop.time() - before - 0.01) * 1000)
            self.backlog = max(self.backlog, daemon.bus.last_seq - daemon.mqtt.last_acked_seq)


@dataclass
class NoDelayBroker:
    """``--broker-nodelay``: a private mosquitto with ``set_tcp_nodelay true`` (not the
    default), to show how much of the MQTT figure is Nagle's algorithm on the broker."""

    port: int
    proc: subprocess.Popen[bytes]
    conf_dir: Path

    @classmethod
    def start(cls) -> NoDelayBroker:
        port = free_port()
        conf_dir = Path(tempfile.mkdtemp(prefix="ctid-bench-mqtt-"))
        conf = conf_dir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "set_tcp_nodelay true\n")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        broker = cls(port, proc, conf_dir)
        try:
            wait_for_port(port)
        except Exception:
            broker.stop()
            raise
        return broker

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.conf_dir, ignore_errors=True)


async def run(args: argparse.Namespace) -> int:
    broker: Mosquitto | NoDelayBroker = NoDelayBroker.start() if args.broker_nodelay else start_mosquitto()
    print(f"load average at the start (2 cores shared): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"mosquitto on 127.0.0.1:{broker.port}, set_tcp_nodelay "
          + ("true (--broker-nodelay)" if args.broker_nodelay else "false (mosquitto's default)"))
    tmp = Path(tempfile.mkdtemp(prefix="ctid-bench-pop-"))
    log_path = tmp / "ctid.log"
    log_file = log_path.open("w")
    # The daemon logs as `ctid run` would (info, JSON), into a file that is read at the end.
    logs.configure("info", "json", stream=log_file)
    try:
        return await measure(args, broker.port, tmp, log_path)
    finally:
        log_file.close()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def measure(args: argparse.Namespace, mqtt_port: int, tmp: Path, log_path: Path) -> int:
    agi_port = free_port()
    pbx: InProcessPBX | ChildPBX = InProcessPBX(args, agi_port) if args.sim_in_process else ChildPBX(args, agi_port)
    try:
        ami_port = await pbx.start()
    except BaseException:
        await pbx.stop()
        raise
    daemon = Daemon(make_config(tmp, mqtt_port, ami_port, agi_port, acd=args.acd, agents=args.agents))
    trigger = Trigger(daemon)
    clock = OfferClock()
    sink: Trigger | OfferClock = clock if args.acd else trigger
    probe = LagProbe()
    gc_pauses = GcPauses()
    receivers = Receivers()
    try:
        await daemon.start()
        await daemon.links["sim"].client.wait_logged_in(10)
        async with asyncio.timeout(20):
            await daemon.mqtt.wait_connected()

        # A call.offered payload of the real size, for the baseline.
        sample = Event(type="call.offered", tenant="acme", ts=daemon.clock(), call_id="c" * 32, agent_id="1001",
                       queue="support", data={"pad": "x" * 700})
        size = len(sample.to_json())
        await receivers.start(mqtt_port, daemon.api.port, lifetime=args.seconds + 150)
        idle = (await receivers.mqtt.ask(f"baseline {args.rate:g} {int(args.rate * 3)} {size} idle", 60))["baseline"]

        daemon.bus.add_sink(sink)
        if args.acd:  # every agent logs in to its phone, over the REST API, before the run
            auth = {"Authorization": f"Bearer {SUPERVISOR}"}
            async with aiohttp.ClientSession() as http:
                for agent in agent_ids(args.agents):
                    async with http.post(f"http://127.0.0.1:{daemon.api.port}/api/v1/agents/{agent}/login",
                                         json={"device": f"PJSIP/{agent}"}, headers=auth) as r:
                        assert r.status == 200, await r.text()
            ready = sum(1 for a in agent_ids(args.agents) if daemon.agents.get(a).state.value == "ready")
            assert ready == args.agents, f"{ready} of {args.agents} agents ready"

        probing = asyncio.create_task(probe.run(daemon))
        await receivers.mqtt.ask(f"loaded 20 {int(args.seconds * 20)} {size} loaded")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        with gc_pauses:
            calls, offered_elapsed, sim_lags = await pbx.run()
        # Wait (bounded) for the last offers, and for those still in flight to reach their
        # Redirect (and the Dial), so that stopping the daemon does not cut them: they
        # would count as "no Dial".
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while loop.time() < deadline and len(sink.t0) < calls:  # noqa: ASYNC110 - bounded poll of a counter
            await asyncio.sleep(0.05)
        while loop.time() < deadline and daemon.acd.offers_in_flight:  # noqa: ASYNC110 - bounded
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the simulator's last Dials, after their Redirects
        cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        got = await receivers.collect(len(sink.t0), max(1.0, deadline - loop.time()))
        trigger.active = False
        probing.cancel()
        await asyncio.gather(probing, return_exceptions=True)
        if trigger.tasks:
            await asyncio.wait(set(trigger.tasks), timeout=5)
    finally:
        daemon.bus.remove_sink(sink)
        with contextlib.suppress(Exception):
            await receivers.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(60):
                await daemon.stop()
        with contextlib.suppress(Exception):
            await pbx.stop()

    mqtt_recv: dict[str, float] = got["mqtt"]
    ws_recv: dict[str, float] = got["ws"]
    ws_ok: bool = got["ws_ok"]
    loaded: list[float] = got["loaded"]
    t0 = sink.t0
    mqtt_ms = [(mqtt_recv[c] - t0[c]) * 1000 for c in t0 if c in mqtt_recv]
    ws_ms = [(ws_recv[c] - t0[c]) * 1000 for c in t0 if c in ws_recv]
    returned = list(trigger.returned.values())
    warnings, examples = _count_log_events(log_path)

    where = "in this process" if args.sim_in_process else f"a child process (cpu {pbx.cpu_s:.1f} s)"
    print(f"simulator ({where}): {calls} calls offered in {offered_elapsed:.2f} s = "
          f"{calls / offered_elapsed:.1f} calls/s (asked {args.rate:g}/s for {args.seconds:g} s, "
          + (f"{args.agents} agents logged in, each answers after 20 ms and hangs up after {args.talk:g} s)"
             if args.acd else f"each caller hangs up after {args.hold:g} s)"))
    print(f"simulator pacing lateness: {summary(sim_lags)}")
    if args.acd:
        print(f"ctid's ACD offered {len(t0)} of them ({clock.offers} offers: call.queued/ready -> match -> "
              f"reserve -> call.offered -> Redirect -> Dial); this process used "
              f"{cpu_share * 100:.0f} % of a core (daemon + bench)")
        print(f"call.offered missing: mqtt {len(t0) - len(mqtt_ms)}, websocket {len(t0) - len(ws_ms)}; "
              f"websocket stayed open: {ws_ok}")
    else:
        print(f"ctid identified {len(t0)} of them (call.started -> trigger); this process used "
              f"{cpu_share * 100:.0f} % of a core (daemon + bench)")
        print(f"call.offered: {len(returned)} published, {trigger.undelivered} not delivered within the "
              f"publish_and_wait bound, {trigger.no_call} calls gone before the offer; missing: "
              f"mqtt {len(t0) - len(mqtt_ms)}, websocket {len(t0) - len(ws_ms)}; websocket stayed open: {ws_ok}")
    print(f"receivers (two child processes, cpu {got['cpu']:.1f} s): {got['mqtt_messages']} MQTT messages on "
          f"{TOPIC}, {got['ws_frames']} websocket frames")
    first_offer = clock.first_offer if args.acd else trigger.first_offer
    if first_offer is not None:
        from ctid.events.contract import validate

        validate(first_offer, strict=True)
        print("the first call.offered validates (strict) against docs/schema")
    print(f"event loop lag (10 ms probe): {summary(probe.lags)}; MQTT publisher at most "
          f"{probe.backlog} events behind the bus")
    print(f"garbage collection in this process while calls were offered: {gc_pauses.describe()}")
    print("daemon warnings: " + (", ".join(f"{k} x{v}" for k, v in sorted(warnings.items())) or "none"))
    for name, line in sorted(examples.items()):
        if name != "events.publish_wait_timed_out":
            print(f"  first {name}: {line[:400]}")
    if args.acd:
        print("latency from t0 (ctid publishes the call.queued or agent ready that makes the offer):")
    else:
        print("latency from t0 (call.started leaves the bus, while ctid ingests the identifying AMI event):")
    print(f"  mqtt subscriber receives call.offered  : {summary(mqtt_ms)}")
    print(f"  websocket client receives call.offered : {summary(ws_ms)}")
    if not args.acd:
        print(f"  publish_and_wait returned              : {summary(returned)}")
        print(f"  publish_and_wait alone (PUBACK + hub)  : {summary(trigger.wait_only)}")
    print(f"baseline, bare aiomqtt QoS 1 publish -> subscriber, {size}-byte payload, same broker, "
          "in the MQTT receiver's process:")
    print(f"  idle, before the run, {args.rate:g} msg/s       : {summary(idle)}")
    print(f"  during the run, 20 msg/s             : {summary(loaded)}")
    worst = max(pct(mqtt_ms, 99) if mqtt_ms else math.inf, pct(ws_ms, 99) if ws_ms else math.inf)
    if idle and loaded:
        print(f"ratio, p99 of the worse pop path / p99 of the bare round trip: {worst / pct(idle, 99):.1f}x idle, "
              f"{worst / pct(loaded, 99):.1f}x under the same load")
    complete = len(mqtt_ms) == len(ws_ms) == len(t0) == calls and ws_ok
    if not complete:
        print("incomplete: some calls were not identified or some pops not received: status is missed")
    met = complete and worst <= TARGET_MS
    print(f"load average at the end (2 cores shared): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.acd:
        lead_line(t0, pbx.dial_at, mqtt_recv, ws_recv, complete)
    value = f"{worst:.2f}" if math.isfinite(worst) else "nan"
    print(f"RESULT screen_pop_p99_ms value={value} unit=ms target=<={TARGET_MS:g} "
          f"status={'met' if met else 'missed'}")
    return 0


def lead_line(t0: dict[str, float], dial_at: dict[str, float], mqtt_recv: dict[str, float],
              ws_recv: dict[str, float], complete: bool) -> None:
    """How far each pop's receipt leads the simulator's Dial to the agent (perf_counter()
    on both sides: CLOCK_MONOTONIC, the same host clock, across the processes)."""
    no_dial = sum(1 for c in t0 if c not in dial_at)
    leads = {"mqtt": [(dial_at[c] - mqtt_recv[c]) * 1000 for c in t0 if c in dial_at and c in mqtt_recv],
             "websocket": [(dial_at[c] - ws_recv[c]) * 1000 for c in t0 if c in dial_at and c in ws_recv]}
    print("pop receipt leads the simulator's Dial to the agent (DialBegin to an agent device; perf_counter() in "
          "the receivers' and the simulator's processes, one host clock):")
    for path, values in leads.items():
        if values:
            behind = sum(1 for v in values if v <= 0)
            print(f"  {path:9s}: n={len(values):5d}  min={min(values):7.2f}  p50={pct(values, 50):7.2f}  "
                  f"max={max(values):7.2f} ms; at or after the Dial: {behind}")
        else:
            print(f"  {path:9s}: no samples")
    every = [v for values in leads.values() for v in values]
    start = min(t0.values(), default=0.0)
    worst = sorted((min(dial_at[c] - mqtt_recv.get(c, -math.inf), dial_at[c] - ws_recv.get(c, -math.inf)), c)
                   for c in t0 if c in dial_at)[:3]
    for lead, c in worst:  # where the smallest leads were: what delayed the pop, or hurried the Dial
        since = {name: (at.get(c, math.nan) - t0[c]) * 1000
                 for name, at in (("mqtt", mqtt_recv), ("websocket", ws_recv), ("Dial", dial_at))}
        print(f"  smallest: {lead * 1000:7.2f} ms at +{t0[c] - start:6.3f} s; from t0: "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in since.items()) + " ms")
    if no_dial:
        print(f"  {no_dial} offered call(s) with no Dial to an agent recorded")
    lead_min = min(every) if every else math.nan
    met = (complete and not no_dial and every and lead_min > 0
           and all(len(values) == len(t0) for values in leads.values()))
    print(f"  positive for every call: {'yes' if met else 'no'}")
    value = f"{lead_min:.2f}" if math.isfinite(lead_min) else "nan"
    print(f"RESULT pop_leads_dial_min_ms value={value} unit=ms target=>0 status={'met' if met else 'missed'}")


def _count_log_events(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """The daemon's warnings and errors by event name, and the first line of each."""
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    with path.open() as fh:
        for line in fh:
            if '"level": "warning"' in line or '"level": "error"' in line:
                with contextlib.suppress(ValueError):
                    name = re.sub(r"\d+", "N", str(json.loads(line).get("event")))
                    counts[name] = counts.get(name, 0) + 1
                    examples.setdefault(name, line.strip())
    return counts, examples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=200.0, help="calls per second")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long the simulator offers calls")
    ap.add_argument("--hold", type=float, default=1.0, help="seconds each caller stays before hanging up")
    ap.add_argument("--sim-in-process", action="store_true",
                    help="run the simulator on the daemon's event loop instead of a child process")
    ap.add_argument("--broker-nodelay", action="store_true",
                    help="run mosquitto with set_tcp_nodelay true (default: mosquitto's default, false)")
    ap.add_argument("--acd", action=argparse.BooleanOptionalAction, default=True,
                    help="agents logged in, the ACD makes the offers (default); --no-acd: the bench's own trigger")
    ap.add_argument("--agents", type=int, default=50, help="ACD mode: agents logged in")
    ap.add_argument("--talk", type=float, default=0.1, help="ACD mode: seconds each agent talks before hanging up")
    ap.add_argument("--sim-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ami-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--agi-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # Stamps from three processes are compared: perf_counter() must be the host's one
    # monotonic clock (Linux: CLOCK_MONOTONIC), not a per-process counter.
    clock = time.get_clock_info("perf_counter").implementation
    if "CLOCK_MONOTONIC" not in clock:
        sys.exit(f"perf_counter() is {clock}, not CLOCK_MONOTONIC: stamps of two processes cannot be compared")
    if args.sim_child:
        die_with_parent()
        sys.exit(asyncio.run(sim_child(args)))

    async def bounded() -> int:
        async with asyncio.timeout(args.seconds + 150):
            return await run(args)
    sys.exit(asyncio.run(bounded()))


if __name__ == "__main__":
    main()
