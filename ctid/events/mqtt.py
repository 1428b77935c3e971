"""The MQTT publisher: the bus's events on a broker, QoS 1, for CRM integrations.

Topics (``p`` is ``mqtt.topic_prefix``, default ``ctid``; the tenant is in every
topic so broker ACLs can keep BPO clients apart)::

    {p}/v1/{tenant}/calls/{call_id}              call.* events
    {p}/v1/{tenant}/agents/{agent_id}/events     events that name an agent (the call.offered pop, ...)
    {p}/v1/{tenant}/agents/{agent_id}/state      agent.state, retained
    {p}/v1/{tenant}/queues/{queue}/stats         queue.stats, retained
    {p}/v1/status/{instance}                     "online" retained; "offline" as last will and on stop

A call event that names an agent goes to both its call topic and the agent's
``events`` topic. ``agent.state`` goes only to the retained ``state`` topic and
``queue.stats`` only to its ``stats`` topic. The payload is the envelope JSON
(:mod:`ctid.events.schema`), byte for byte what the websocket sends.

Delivery (tell consumers)
-------------------------

* **QoS 1, at least once.** Every event is published with QoS 1 and counts as
  delivered on the broker's PUBACK. After a broker or network outage the
  publisher reconnects with backoff and republishes everything after the last
  event the broker acknowledged, from memory or, past the in-memory backlog,
  from the bus's outbox (:meth:`EventBus.replay`). Nothing is lost; the events
  that were in flight at the cut may arrive twice. **Dedupe by ``id``.**
* **Order.** One task publishes in ``seq`` order over one connection, with a
  bounded window in flight, so the first delivery of every event on a topic is
  in ``seq`` order; a republished duplicate may follow an event it preceded.
* **Gaps are normal.** A topic carries a slice of the global ``seq``.
* A subscriber's *own* offline time is the broker's business: use a persistent
  session (``clean_session=False``, fixed client id, on a broker with
  persistence), or fill the gap from ``GET /api/v1/events?after_seq=N``.
* The publisher starts from the bus's ``seq`` when it starts; events that a
  previous ctid process had not published before it stopped are in the outbox,
  for REST replay.

If ``mqtt.host`` is empty, MQTT is off: :meth:`MQTTPublisher.run` logs that
and returns, and the publisher never joins the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import structlog
from aiomqtt import Client, MqttError, Will

from ctid.config import MQTTConfig
from ctid.events.bus import EventBus, ReplayError
from ctid.events.schema import Event

__all__ = ["STATUS_OFFLINE", "STATUS_ONLINE", "MQTTPublisher", "topics_for"]

log = structlog.get_logger(__name__)

STATUS_ONLINE: Final = "online"
STATUS_OFFLINE: Final = "offline"
QOS: Final = 1

# A topic level must not be empty nor contain a separator or a wildcard. The
# config restricts ids to [A-Za-z0-9_.-]; this is the last line of defence for
# ids that come from elsewhere (a call id built from an Asterisk Linkedid).
_LEVEL_RE: Final = re.compile(r"[^/+#\x00]{1,128}")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def topics_for(event: Event, prefix: str) -> tuple[tuple[str, bool], ...]:
    """The ``(topic, retain)`` pairs ``event`` is published on; empty when it has none."""
    tenant = event.tenant
    if tenant is None or not _LEVEL_RE.fullmatch(tenant):
        return ()
    base = f"{prefix}/v1/{tenant}"
    out: list[tuple[str, bool]] = []
    if event.type == "agent.state":
        if event.agent_id and _LEVEL_RE.fullmatch(event.agent_id):
            out.append((f"{base}/agents/{event.agent_id}/state", True))
    elif event.type == "queue.stats":
        if event.queue and _LEVEL_RE.fullmatch(event.queue):
            out.append((f"{base}/queues/{event.queue}/stats", True))
    else:
        if event.type.startswith("call.") and event.call_id and _LEVEL_RE.fullmatch(event.call_id):
            out.append((f"{base}/calls/{event.call_id}", False))
        if event.agent_id and _LEVEL_RE.fullmatch(event.agent_id):
            out.append((f"{base}/agents/{event.agent_id}/events", False))
    return tuple(out)


@dataclass(slots=True)
class _Item:
    """One event to publish: its topics, and the future ``offer`` returned (None for catch-up)."""

    seq: int
    payload: str
    topics: tuple[tuple[str, bool], ...]
    future: asyncio.Future[None] | None


@dataclass(slots=True)
class _InFlight:
    item: _Item
    publishes: list[asyncio.Task[None]]


class _StopRequested(Exception):
    pass


class MQTTPublisher:
    """A bus :class:`~ctid.events.bus.Sink` that publishes every event to the broker.

    Lifetime: building it joins the bus (when MQTT is on), so events queue up
    from then on; run :meth:`run` as a task (it connects, and keeps
    reconnecting until :meth:`stop`); ``await stop()`` publishes ``offline``
    (after a bounded flush) and disconnects. :meth:`offer` returns a future
    resolved on the broker's PUBACK for that event; while disconnected it stays
    pending until the catch-up publishes it (``publish_and_wait`` bounds the wait).
    """

    name = "mqtt"

    def __init__(self, config: MQTTConfig, *, instance_id: str, bus: EventBus,
                 clock: Callable[[], datetime] = _utc_now, window: int = 256, max_backlog: int = 100_000,
                 reconnect_min: float = 0.2, reconnect_max: float = 30.0, stop_timeout: float = 2.0,
                 catchup_batch: int = 500, keepalive: int = 30) -> None:
        self._config = config
        self._instance_id = instance_id
        self._bus = bus
        self._clock = clock
        self._window_size = window
        self._max_backlog = max_backlog
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._stop_timeout = stop_timeout
        self._catchup_batch = catchup_batch
        self._keepalive = keepalive
        self.prefix = config.topic_prefix
        self.status_topic = f"{self.prefix}/v1/status/{instance_id}"
        self.client_id = config.client_id or f"ctid-{instance_id}"
        # Built once: a missing CA file is a configuration error, found at start.
        self._tls = ssl.create_default_context(cafile=config.ca_file or None) if config.tls else None

        self._unsent: deque[_Item] = deque()   # offered, not yet on the wire in this session
        self._unacked: deque[_Item] = deque()  # on the wire, waiting for PUBACK, in seq order
        self._dropped_through = 0              # highest seq dropped from _unsent (fill from the outbox)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._connected_event = asyncio.Event()
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backlog_drop_logged = False

        self.connected = False
        self.last_acked_seq = 0
        self.connects = 0
        self.published = 0
        """PUBACKed publishes (one event may make two)."""
        self.from_outbox = 0
        """Events republished from the outbox because the in-memory backlog had overflowed."""
        self.backlog_dropped = 0
        self.connected_since: datetime | None = None
        self.disconnected_since: datetime | None = None
        self._seen_any = False
        if config.enabled:
            # Join now, not when run() first executes: no event published in
            # between is missed. The backlog is bounded if run() is late.
            self.last_acked_seq = bus.last_seq
            bus.add_sink(self)

    def resume_after(self, seq: int) -> None:
        """Continue from a cursor a previous run persisted (the last PUBACKed seq): the
        events after it that the outbox holds go out first, then the live stream. Call
        it after the bus has started and before :meth:`run`."""
        if not self._config.enabled or seq >= self._bus.last_seq:
            return
        self.last_acked_seq = seq
        self._dropped_through = max(self._dropped_through, self._bus.last_seq)
        self._seen_any = True
        log.info("mqtt.resuming", after_seq=seq, through_seq=self._bus.last_seq)

    # -- the sink ----------------------------------------------------------------------

    def offer(self, event: Event, payload: str) -> asyncio.Future[None] | None:
        if not self._seen_any:
            # Everything before the first event offered is not this publisher's.
            self._seen_any = True
            self.last_acked_seq = max(self.last_acked_seq, event.seq - 1)
        topics = topics_for(event, self.prefix)
        if not topics:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unsent.append(_Item(event.seq, payload, topics, future))
        self._idle.clear()
        self._trim_backlog()
        self._wake.set()
        return future

    def _trim_backlog(self) -> None:
        while len(self._unsent) > self._max_backlog:
            oldest = self._unsent.popleft()
            self._dropped_through = max(self._dropped_through, oldest.seq)
            self.backlog_dropped += 1
            if not self._backlog_drop_logged:
                self._backlog_drop_logged = True
                log.warning("mqtt.backlog_overflow", max_backlog=self._max_backlog, first_seq=oldest.seq,
                            note="the catch-up republishes these from the outbox")

    # -- lifetime ----------------------------------------------------------------------

    async def wait_connected(self) -> None:
        """Wait until the publisher is connected and has announced ``online``. Unbounded."""
        await self._connected_event.wait()

    async def run(self) -> None:
        """Keep a connection to the broker until :meth:`stop`, publishing what the bus offers.

        Returns at once (after a log line) when MQTT is off. Connection failures
        never escape: they are logged once per outage and retried with backoff.
        """
        if not self._config.enabled:
            log.info("mqtt.disabled", reason="no broker configured (mqtt.host is empty)")
            self._done.set()
            return
        self._task = asyncio.current_task()
        if not self._seen_any:
            self.last_acked_seq = self._bus.last_seq
        self._bus.add_sink(self)  # no-op unless a previous run() left
        backoff = self._reconnect_min
        outage_logged = False
        try:
            while not self._stopping.is_set():
                try:
                    async with self._client() as client:
                        backoff = self._reconnect_min
                        outage_logged = False
                        if await self._session(client):
                            return
                except MqttError as exc:
                    if not outage_logged:
                        outage_logged = True
                        log.warning("mqtt.disconnected", host=self._config.host, port=self._config.port,
                                    reason=str(exc), last_acked_seq=self.last_acked_seq,
                                    retry_in_s=backoff)
                finally:
                    self._session_ended()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, self._reconnect_max)
            log.info("mqtt.stopped", connected=False, unsent=len(self._unsent))
        finally:
            self._bus.remove_sink(self)
            self._done.set()

    async def stop(self) -> None:
        """Flush (bounded), publish ``offline`` on the status topic, disconnect, leave the bus. Idempotent."""
        self._stopping.set()
        task = self._task
        if task is None or task.done():
            self._bus.remove_sink(self)
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._done.wait()), self._stop_timeout + 5.0)
        except TimeoutError:
            log.warning("mqtt.stop_timed_out")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _client(self) -> Client:
        # A fresh client per connection: paho keeps no half-sent state across sessions.
        password = self._config.password.get_secret_value()
        client = Client(
            self._config.host, self._config.port,
            username=self._config.username or None,
            password=password or None,
            identifier=self.client_id,
            will=Will(self.status_topic, STATUS_OFFLINE, qos=QOS, retain=True),
            tls_context=self._tls,
            keepalive=self._keepalive,
            max_inflight_messages=2 * self._window_size,
            # Nagle would hold small publishes back for the previous PUBACK.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # The pipelined window keeps up to 2 * window publishes pending by design:
        # aiomqtt's warning for every publish past 10 pending cost more than the publish.
        client.pending_calls_threshold = 4 * self._window_size
        return client

    # -- one connection ----------------------------------------------------------------

    async def _session(self, client: Client) -> bool:
        """Publish until the connection drops (raises MqttError) or a stop (returns True)."""
        await client.publish(self.status_topic, STATUS_ONLINE, qos=QOS, retain=True)
        self.connected = True
        self.connects += 1
        self.connected_since = self._clock()
        self._connected_event.set()
        log.info("mqtt.connected", host=self._config.host, port=self._config.port, client_id=self.client_id,
                 resume_after_seq=self.last_acked_seq, backlog=len(self._unsent))
        window = asyncio.Semaphore(self._window_size)
        inflight: asyncio.Queue[_InFlight] = asyncio.Queue()
        publishing: set[asyncio.Task[None]] = set()
        tasks = [
            asyncio.create_task(self._send(client, window, inflight, publishing), name="mqtt-send"),
            asyncio.create_task(self._acknowledge(window, inflight), name="mqtt-ack"),
            asyncio.create_task(self._watch(client), name="mqtt-watch"),
            asyncio.create_task(self._stop_requested(), name="mqtt-stop"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*tasks, *publishing):
                task.cancel()
            # Retrieve every outcome, so no "exception was never retrieved".
            await asyncio.gather(*tasks, *publishing, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if isinstance(exc, _StopRequested):
                await self._say_offline(client)
                return True
            if exc is not None:
                raise exc
        raise MqttError("publisher session ended unexpectedly")

    def _session_ended(self) -> None:
        if self.connected:
            self.disconnected_since = self._clock()
        self.connected = False
        self._connected_event.clear()
        # What the broker did not acknowledge goes out again, first, in order.
        self._unsent.extendleft(reversed(self._unacked))
        self._unacked.clear()
        self._trim_backlog()

    async def _say_offline(self, client: Client) -> None:
        try:
            await client.publish(self.status_topic, STATUS_OFFLINE, qos=QOS, retain=True,
                                 timeout=self._stop_timeout)
        except MqttError as exc:
            log.warning("mqtt.offline_not_published", reason=str(exc))
            return
        log.info("mqtt.stopped", connected=True, last_acked_seq=self.last_acked_seq,
                 unsent=len(self._unsent) + len(self._unacked))

    async def _stop_requested(self) -> None:
        await self._stopping.wait()
        # A graceful stop first lets what is queued reach the broker, bounded.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self._stop_timeout)
        raise _StopRequested

    async def _watch(self, client: Client) -> None:
        # ctid subscribes to nothing; the message iterator is aiomqtt's way of
        # telling that the connection is gone (it raises MqttError).
        async for _ in client.messages:
            pass

    async def _send(self, client: Client, window: asyncio.Semaphore, inflight: asyncio.Queue[_InFlight],
                    publishing: set[asyncio.Task[None]]) -> None:
        sent = self.last_acked_seq
        while True:
            if self._dropped_through > sent:
                sent = await self._catch_up(client, window, inflight, publishing, sent)
                continue
            if not self._unsent:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._unsent.popleft()
            if item.seq <= sent:  # already on the wire (a catch-up overlapped it)
                if item.future is not None and not item.future.done():
                    item.future.set_result(None)
                continue
            await self._put(client, window, inflight, publishing, item)
            sent = item.seq

    async def _put(self, client: Client, window: asyncio.Semaphore, inflight: asyncio.Queue[_InFlight],
                   publishing: set[asyncio.Task[None]], item: _Item) -> None:
        self._unacked.append(item)  # before any await: a cut requeues it
        await window.acquire()
        # Tasks start in creation order, so the messages reach the socket in seq order.
        tasks = [asyncio.create_task(client.publish(topic, item.payload, qos=QOS, retain=retain))
                 for topic, retain in item.topics]
        publishing.update(tasks)
        for task in tasks:
            task.add_done_callback(publishing.discard)
        inflight.put_nowait(_InFlight(item, tasks))

    async def _catch_up(self, client: Client, window: asyncio.Semaphore, inflight: asyncio.Queue[_InFlight],
                        publishing: set[asyncio.Task[None]], sent: int) -> int:
        """Republish from the outbox what the in-memory backlog dropped, up to the backlog's head."""
        backoff = self._reconnect_min
        while self._dropped_through > sent:
            try:
                events = await self._bus.replay(sent, limit=self._catchup_batch)
            except ReplayError as exc:
                # Order matters more than latency here: wait for the outbox
                # rather than publish newer events over the gap.
                log.warning("mqtt.catchup_waiting_for_outbox", reason=str(exc), after_seq=sent)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._reconnect_max)
                continue
            head = self._unsent[0].seq if self._unsent else None
            reached_head = False
            for event in events:
                if head is not None and event.seq >= head:
                    reached_head = True
                    break
                topics = topics_for(event, self.prefix)
                if topics:
                    await self._put(client, window, inflight, publishing,
                                    _Item(event.seq, event.to_json(), topics, None))
                    self.from_outbox += 1
                sent = event.seq
            if reached_head or len(events) < self._catchup_batch:
                if sent < self._dropped_through:
                    # Pruned from the outbox, or dropped from it during a database outage.
                    log.error("mqtt.catchup_gap", after_seq=sent, through_seq=self._dropped_through)
                    sent = self._dropped_through
        self._backlog_drop_logged = False
        return sent

    async def _acknowledge(self, window: asyncio.Semaphore, inflight: asyncio.Queue[_InFlight]) -> None:
        while True:
            entry = await inflight.get()
            # Usually the PUBACKs are in already: then no await at all (a gather per event
            # costs two loop passes, and at a few thousand events/s the acknowledging fell
            # behind the broker and stalled the window).
            pending = [task for task in entry.publishes if not task.done()]
            if pending:
                await asyncio.wait(pending)
            for task in entry.publishes:
                task.result()  # raises MqttError when the broker did not acknowledge: the session ends
            window.release()
            head = self._unacked.popleft()
            assert head is entry.item, "acknowledgements out of order"
            self.last_acked_seq = entry.item.seq
            self.published += len(entry.publishes)
            if entry.item.future is not None and not entry.item.future.done():
                entry.item.future.set_result(None)
            if not self._unsent and not self._unacked:
                self._idle.set()
