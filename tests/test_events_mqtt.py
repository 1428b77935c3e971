"""The MQTT publisher against a real mosquitto on 127.0.0.1.

Most tests share the session broker (``mqtt_broker``) and keep apart with a topic
prefix of their own. The broker-restart test runs a private mosquitto *with
persistence*, so that a subscriber with a persistent session (fixed client id,
``clean_session=False``) keeps its subscription and its queued messages across the
restart: what it finally holds is exactly what the broker accepted from ctid, whoever
reconnects first. (With ``persistence false`` the restart would wipe that session and
the check would measure the subscriber's own reconnect race instead.)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from aiomqtt import Client, MqttError
from structlog.testing import capture_logs

from ctid.config import EventsConfig, MQTTConfig
from ctid.events.bus import EventBus
from ctid.events.mqtt import STATUS_OFFLINE, STATUS_ONLINE, MQTTPublisher, topics_for
from ctid.events.schema import Event
from ctid.store.db import Database
from tests import services

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 3, 10, 14, 30, 0, tzinfo=UTC)


def _event(type_: str = "call.started", *, tenant: str | None = "acme", call_id: str | None = "c-1",
           agent_id: str | None = None, queue: str | None = None, **data: Any) -> Event:
    return Event(type=type_, tenant=tenant, ts=NOW, data=dict(data), call_id=call_id, agent_id=agent_id,
                 queue=queue)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: str
    qos: int
    retain: bool

    @property
    def event(self) -> Event:
        return Event.from_json(self.payload)


class Subscriber:
    """A real MQTT client that records what it receives, in order.

    ``persistent``: a fixed client id with ``clean_session=False`` that reconnects
    after the broker goes away (its retry interval is a backoff, not a wait for
    anything).
    """

    def __init__(self, port: int, topic: str, *, persistent: bool = False) -> None:
        self.port = port
        self.topic = topic
        self.persistent = persistent
        self.identifier = f"sub-{uuid.uuid4().hex[:12]}"
        self.messages: list[Received] = []
        self.connections = 0
        self._changed = asyncio.Condition()
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        waiter = asyncio.create_task(self._subscribed.wait())
        done, _ = await asyncio.wait({waiter, self._task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            self._task.cancel()
            raise AssertionError("the subscriber did not get its SUBACK")
        return self

    async def __aexit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                async with Client("127.0.0.1", self.port, identifier=self.identifier,
                                  clean_session=False if self.persistent else True) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.connections += 1
                    self._subscribed.set()
                    async for message in client.messages:
                        payload = message.payload
                        assert isinstance(payload, bytes)
                        self.messages.append(Received(message.topic.value, payload.decode(), message.qos,
                                                      message.retain))
                        async with self._changed:
                            self._changed.notify_all()
            except MqttError:
                if not self.persistent:
                    raise
                await asyncio.sleep(0.05)

    async def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.messages))

    def events_on(self, topic_part: str) -> list[Received]:
        return [m for m in self.messages if topic_part in m.topic]

    def non_status(self) -> list[Received]:
        return [m for m in self.messages if "/v1/status/" not in m.topic]


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


Publishers = Callable[..., Awaitable[tuple[EventBus, MQTTPublisher]]]


@pytest.fixture
async def publishers() -> AsyncIterator[Publishers]:
    """Builds a bus and a running publisher; stops them all at the end."""
    made: list[tuple[EventBus, MQTTPublisher, asyncio.Task[None]]] = []

    async def make(port: int, prefix: str, *, db: Database | None = None, instance: str | None = None,
                   wait: bool = True, **kwargs: Any) -> tuple[EventBus, MQTTPublisher]:
        bus = EventBus(db, config=EventsConfig(outbox_batch_ms=5), clock=lambda: NOW)
        await bus.start()
        kwargs.setdefault("reconnect_min", 0.05)
        kwargs.setdefault("reconnect_max", 1.0)
        publisher = MQTTPublisher(MQTTConfig(host="127.0.0.1", port=port, topic_prefix=prefix),
                                  instance_id=instance or f"i-{uuid.uuid4().hex[:8]}", bus=bus, **kwargs)
        task = asyncio.create_task(publisher.run())
        made.append((bus, publisher, task))
        if wait:
            await asyncio.wait_for(publisher.wait_connected(), 10)
        return bus, publisher

    yield make
    for bus, publisher, task in made:
        await publisher.stop()
        await asyncio.wait_for(task, 10)
        await bus.stop()


async def _wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll an observable flag that has no event to await, at most ``timeout`` s."""
    step = 0.01
    for _ in range(int(timeout / step)):
        if predicate():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"condition still false after {timeout} s")


# -- topics -----------------------------------------------------------------------------


def test_topics_follow_the_contract() -> None:
    pop = _event("call.offered", call_id="c-1", agent_id="1001")
    assert topics_for(pop, "ctid") == (("ctid/v1/acme/calls/c-1", False), ("ctid/v1/acme/agents/1001/events", False))
    assert topics_for(_event("call.started"), "x/y") == (("x/y/v1/acme/calls/c-1", False),)
    assert topics_for(_event("agent.state", call_id=None, agent_id="1001"), "ctid") == (
        ("ctid/v1/acme/agents/1001/state", True),)
    assert topics_for(_event("queue.stats", call_id=None, queue="support"), "ctid") == (
        ("ctid/v1/acme/queues/support/stats", True),)
    assert topics_for(_event(tenant=None), "ctid") == ()
    assert topics_for(_event(call_id="a/b"), "ctid") == ()  # never a topic level from an unsafe id
    assert topics_for(_event(call_id="c-1+"), "ctid") == ()


# -- live publishing --------------------------------------------------------------------


async def test_events_arrive_on_their_topics_with_qos1_and_the_envelope_payload(
        mqtt_broker: services.Mosquitto, prefix: str, publishers: Publishers) -> None:
    async with Subscriber(mqtt_broker.port, f"{prefix}/#") as sub:
        bus, publisher = await publishers(mqtt_broker.port, prefix)
        pop = await bus.publish_and_wait(_event("call.offered", agent_id="1001", queue="support",
                                                caller={"number": "+3225551234"}), timeout=5)
        assert pop.delivered and pop.timed_out == []
        started = bus.publish(_event("call.started", call_id="c-2"))
        state = bus.publish(_event("agent.state", call_id=None, agent_id="1001", state="ready"))
        stats = bus.publish(_event("queue.stats", call_id=None, queue="support", waiting=2))
        sentinel = (await bus.publish_and_wait(_event("call.ended", call_id="c-9"), timeout=5)).event
        await sub.wait_for(lambda ms: any(m.topic.endswith("/calls/c-9") for m in ms))

    base = f"{prefix}/v1/acme"
    assert [(m.topic, m.payload) for m in sub.non_status()] == [
        (f"{base}/calls/c-1", pop.event.to_json()),
        (f"{base}/agents/1001/events", pop.event.to_json()),
        (f"{base}/calls/c-2", started.to_json()),
        (f"{base}/agents/1001/state", state.to_json()),
        (f"{base}/queues/support/stats", stats.to_json()),
        (f"{base}/calls/c-9", sentinel.to_json()),
    ]
    assert all(m.qos == 1 and not m.retain for m in sub.non_status())
    assert publisher.last_acked_seq == sentinel.seq
    assert [m.payload for m in sub.events_on(publisher.status_topic)] == [STATUS_ONLINE]


async def test_a_late_subscriber_gets_the_retained_agent_state_queue_stats_and_status(
        mqtt_broker: services.Mosquitto, prefix: str, publishers: Publishers) -> None:
    bus, publisher = await publishers(mqtt_broker.port, prefix)
    ready = await bus.publish_and_wait(_event("agent.state", call_id=None, agent_id="1001", state="ready"),
                                       timeout=5)
    paused = await bus.publish_and_wait(_event("agent.state", call_id=None, agent_id="1001", state="paused",
                                               reason="break"), timeout=5)
    stats = await bus.publish_and_wait(_event("queue.stats", call_id=None, queue="support", waiting=4),
                                       timeout=5)
    assert ready.delivered and paused.delivered and stats.delivered  # PUBACKed: the broker holds them

    async with Subscriber(mqtt_broker.port, f"{prefix}/#") as late:
        await late.wait_for(lambda ms: len(ms) >= 3)
        sentinel = bus.publish(_event("call.ended", call_id="c-9"))
        await late.wait_for(lambda ms: any(m.topic.endswith("/calls/c-9") for m in ms))

    retained = {m.topic: m.payload for m in late.messages if m.retain}
    assert retained == {
        f"{prefix}/v1/acme/agents/1001/state": paused.event.to_json(),
        f"{prefix}/v1/acme/queues/support/stats": stats.event.to_json(),
        publisher.status_topic: STATUS_ONLINE,
    }
    assert [m.payload for m in late.messages if not m.retain] == [sentinel.to_json()]


# -- status and last will ---------------------------------------------------------------

CHILD = """
import asyncio, sys
from datetime import UTC, datetime
from ctid.config import EventsConfig, MQTTConfig
from ctid.events.bus import EventBus
from ctid.events.mqtt import MQTTPublisher

async def main():
    port, prefix, instance = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    bus = EventBus(None, config=EventsConfig(), clock=lambda: datetime.now(UTC))
    await bus.start()
    publisher = MQTTPublisher(MQTTConfig(host="127.0.0.1", port=port, topic_prefix=prefix),
                              instance_id=instance, bus=bus)
    task = asyncio.create_task(publisher.run())
    await publisher.wait_connected()
    print("CONNECTED", flush=True)
    await task

asyncio.run(main())
"""


async def test_the_last_will_says_offline_when_the_process_is_killed(
        mqtt_broker: services.Mosquitto, prefix: str) -> None:
    instance = f"i-{uuid.uuid4().hex[:8]}"
    status = f"{prefix}/v1/status/{instance}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with Subscriber(mqtt_broker.port, status) as sub:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, str(mqtt_broker.port), prefix, instance,
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            assert child.stdout is not None
            async with asyncio.timeout(20):
                while (line := await child.stdout.readline()) and line.strip() != b"CONNECTED":
                    pass
            await sub.wait_for(lambda ms: [m.payload for m in ms] == [STATUS_ONLINE])
            child.kill()  # SIGKILL: no DISCONNECT, no goodbye; the broker sends the will
            await asyncio.wait_for(child.wait(), 10)
            await sub.wait_for(lambda ms: [m.payload for m in ms] == [STATUS_ONLINE, STATUS_OFFLINE])
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()

    async with Subscriber(mqtt_broker.port, status) as late:
        await late.wait_for(lambda ms: len(ms) == 1)
    assert late.messages == [Received(status, STATUS_OFFLINE, 1, True)]


async def test_a_graceful_stop_flushes_then_publishes_offline(
        mqtt_broker: services.Mosquitto, prefix: str, publishers: Publishers) -> None:
    async with Subscriber(mqtt_broker.port, f"{prefix}/#") as sub:
        bus, publisher = await publishers(mqtt_broker.port, prefix)
        await sub.wait_for(lambda ms: any(m.payload == STATUS_ONLINE for m in ms))
        events = [bus.publish(_event(call_id=f"c-{n}")) for n in range(20)]
        await publisher.stop()
        assert not publisher.connected
        await sub.wait_for(lambda ms: ms[-1].payload == STATUS_OFFLINE)

    assert [m.payload for m in sub.non_status()] == [e.to_json() for e in events]  # all before "offline"
    assert bus.sinks == ()
    async with Subscriber(mqtt_broker.port, publisher.status_topic) as late:
        await late.wait_for(lambda ms: len(ms) == 1)
    assert late.messages == [Received(publisher.status_topic, STATUS_OFFLINE, 1, True)]


# -- broker outage ----------------------------------------------------------------------


@pytest.fixture
def persistent_broker_dir() -> Iterator[Path]:
    """A data directory for mosquitto's persistence file, writable by the broker's user."""
    datadir = Path(tempfile.mkdtemp(prefix="ctid-mqtt-data-", dir="/tmp"))
    datadir.chmod(0o755)
    if os.geteuid() == 0:  # mosquitto drops to its own user when started as root
        shutil.chown(datadir, "mosquitto", "mosquitto")
    try:
        yield datadir
    finally:
        shutil.rmtree(datadir, ignore_errors=True)


def _start_persistent_mosquitto(port: int, datadir: Path) -> services.Mosquitto:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    confdir = Path(tempfile.mkdtemp(prefix="ctid-mqtt-", dir="/tmp"))
    confdir.chmod(0o755)
    conf = confdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {datadir}/\nlog_dest stderr\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    broker = services.Mosquitto(port, proc, confdir)
    try:
        services.wait_for_port(port)
    except Exception:
        broker.stop()
        raise
    return broker


def _phase(n: int, size: int) -> list[Event]:
    # Three topics interleaved: two calls, and the agent's pops.
    return [_event("call.offered" if k % 3 == 0 else "call.answered", call_id=f"c-{k % 2}",
                   agent_id="1001" if k % 3 == 0 else None, phase=n, k=k) for k in range(size)]


@pytest.mark.parametrize("catch_up_from", ["memory", "outbox"])
async def test_a_broker_restart_loses_nothing_and_keeps_per_topic_order(
        catch_up_from: str, persistent_broker_dir: Path, prefix: str, publishers: Publishers,
        tmp_path: Path) -> None:
    port = services.free_port()
    broker = _start_persistent_mosquitto(port, persistent_broker_dir)
    db: Database | None = None
    try:
        options: dict[str, Any] = {}
        if catch_up_from == "outbox":
            # A backlog of 3: most of what is published during the outage must come back from the outbox.
            db = Database(f"sqlite+aiosqlite:///{tmp_path / 'ctid.db'}")
            await db.start()
            options = {"db": db, "max_backlog": 3}
        async with Subscriber(port, f"{prefix}/#", persistent=True) as sub:
            bus, publisher = await publishers(port, prefix, **options)
            published: list[Event] = []

            for event in _phase(1, 10):
                result = await bus.publish_and_wait(event, timeout=5)
                assert result.delivered
                published.append(result.event)
            first = sum(len(topics_for(e, prefix)) for e in published)
            await sub.wait_for(lambda ms: len(sub.non_status()) >= first)

            # A burst that is partly acknowledged, partly in flight, partly unsent when the broker goes.
            published += [bus.publish(e) for e in _phase(4, 150)]
            await asyncio.to_thread(broker.stop)
            await _wait_until(lambda: not publisher.connected)
            loop = asyncio.get_running_loop()
            began = loop.time()
            down = await bus.publish_and_wait(_event(call_id="c-0", phase=2), timeout=0.2)
            assert loop.time() - began < 1.5  # bounded while the broker is down
            assert not down.delivered and down.timed_out == ["mqtt"]
            published.append(down.event)
            published += [bus.publish(e) for e in _phase(2, 15)]

            broker = _start_persistent_mosquitto(port, persistent_broker_dir)
            await asyncio.wait_for(publisher.wait_connected(), 20)
            for event in _phase(3, 5):
                result = await bus.publish_and_wait(event, timeout=5)
                assert result.delivered
                published.append(result.event)

            expected: dict[str, list[str]] = {}
            for event in published:
                for topic, _retain in topics_for(event, prefix):
                    expected.setdefault(topic, []).append(event.id)
            wanted = sum(len(ids) for ids in expected.values())

            def complete(messages: list[Received]) -> bool:
                return len({(m.topic, m.event.id) for m in messages if "/v1/status/" not in m.topic}) >= wanted

            await sub.wait_for(complete, timeout=30)

        assert sub.connections >= 2 and publisher.connects >= 2  # both really went through the restart
        for topic, ids in expected.items():
            arrived = [m.event.id for m in sub.non_status() if m.topic == topic]
            first_seen = list(dict.fromkeys(arrived))  # dedupe by id, as consumers do
            assert first_seen == ids, topic
            assert all(m.qos == 1 for m in sub.non_status())
        if catch_up_from == "outbox":
            assert publisher.from_outbox >= 10
        else:
            assert publisher.from_outbox == 0
        assert publisher.last_acked_seq == published[-1].seq
    finally:
        broker.stop()
        if db is not None:
            await db.close()


async def test_publish_and_wait_is_bounded_when_the_broker_is_unreachable(
        prefix: str, publishers: Publishers) -> None:
    bus, publisher = await publishers(services.free_port(), prefix, wait=False)
    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await bus.publish_and_wait(_event("call.offered", agent_id="1001"), timeout=0.1)
    assert loop.time() - began < 1.0
    assert not result.delivered and result.timed_out == ["mqtt"]
    assert bus.publish_timeouts == 1
    assert not publisher.connected


# -- MQTT off ---------------------------------------------------------------------------


async def test_without_a_broker_mqtt_is_off_logs_it_and_publishes_nothing() -> None:
    bus = EventBus(None, config=EventsConfig(), clock=lambda: NOW)
    await bus.start()
    publisher = MQTTPublisher(MQTTConfig(), instance_id="ctid-1", bus=bus)
    with capture_logs() as logs:
        await asyncio.wait_for(publisher.run(), 2)
    assert [e for e in logs if e["event"] == "mqtt.disabled"]
    assert bus.sinks == ()
    result = await bus.publish_and_wait(_event("call.offered", agent_id="1001"))
    assert result.delivered and result.timed_out == []
    assert publisher.published == 0 and not publisher.connected
    await publisher.stop()
    await bus.stop()
