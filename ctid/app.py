"""The daemon's wiring: reading this file shows how ctid fits together.

::

    Asterisk --AMI--> AMIClient --ordered--> CallModel.feed --> _on_changes --+-> CallNotifier --> EventBus
            <--CoreShowChannels after every login (resync)--                  +-> CallRecorder (call records)
    dialplan --FastAGI--> FastAGIServer --> routes["inbound"]                  '-> CallEnricher (CRM lookup)
                          (sets __CTID_CALL_ID, tenant, line; IVR flow or queue; "checkin", "survey")
    desktops, CRMs --HTTP/websocket--> ApiServer --> AgentRegistry --agent.state--> EventBus (+ queue.stats)

    EventBus --seq--> live sinks: MQTTPublisher (QoS 1, retained state), ApiServer's hub (websockets)
             '-----> outbox table (batched, buffered while the database is down; replay)

Lifetimes are explicit: :meth:`Daemon.start` brings the parts up in order (database and
migrations, event bus, call recorder, MQTT, CRM client, FastAGI and HTTP listeners, AMI
links) and :meth:`Daemon._shutdown` takes them down in reverse: FastAGI sessions closed,
AMI logged off, held call events released, websockets closed, MQTT flushed and
``offline`` published, call records and the outbox flushed, database closed. Every
background task has an owner here; a task that dies is logged and stops the daemon, and
an AMI login rejection is fatal (:class:`DaemonFailed`).

One :class:`CallModel` per Asterisk link: channel names and Uniqueids are only unique
within one Asterisk. Call ids (``CTID_CALL_ID``, set by ctid) are global.

With ``[acd] sync_fallback_members``, :class:`~ctid.acd.fallback.FallbackSync` also takes
every ``agent.state`` event and each AMI login, and keeps the native fail-open queue's
members equal to the logged-in agents (``QueueAdd``/``QueueRemove``/``QueuePause``).

FastAGI scripts: ``inbound`` identifies the call (``__CTID_CALL_ID``, ``__CTID_TENANT``,
``__CTID_SERVICE_LINE``), then runs the line's IVR flow (:class:`~ctid.ivr.runner.FlowRunner`;
its exit is carried out here: a queue through the dispatcher, ``CTID_ROUTE`` transfer,
voicemail or release for the dialplan, the line's ``fallback_queue`` on a runtime error)
or queues it straight away; a line with neither, or an unknown DNIS, goes to the native
fallback queue (``CTID_ROUTE=fallback``, see ``dialplans/ctid.conf``). ``checkin`` is the
dispatcher's hold check-in; ``survey`` runs a queue's post-call survey flow and publishes
``call.survey``. Flow runs and survey answers are written by :class:`~ctid.store.ivr.IVRStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from ctid.acd.control import CallControl
from ctid.acd.dispatcher import Dispatcher
from ctid.acd.fallback import FallbackSync
from ctid.agents import AgentRegistry
from ctid.api.server import ApiServer
from ctid.asterisk.agi import AGIError, AGISession, FastAGIServer
from ctid.asterisk.ami import AMIClient, AMILoginError
from ctid.asterisk.ami_protocol import Message
from ctid.asterisk.safety import DialNumberRejected, UnsafeValueError, check_id
from ctid.calls import Call, CallChange, CallModel, ChangeKind
from ctid.config import AsteriskConfig, Config, ConfigError, ServiceLineConfig, load
from ctid.crm.client import CRMClient
from ctid.crm.enrich import CallEnricher
from ctid.events.bus import EventBus
from ctid.events.calls import CallNotifier, call_data
from ctid.events.mqtt import MQTTPublisher
from ctid.events.queues import QueueStatsFeed
from ctid.events.schema import Event
from ctid.events.stats import StatsSnapshotter
from ctid.ivr.model import CallbackNode, QueueNode, TransferNode, VoicemailNode
from ctid.ivr.runner import FlowError, FlowRunner, IVRRun
from ctid.store.calls import CallStore
from ctid.store.db import Database, StoreError
from ctid.store.ivr import IVRStore
from ctid.store.meta import get_meta, set_meta
from ctid.store.provisioning import ProvisioningStore
from ctid.store.recorder import CallRecorder

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
MQTT_CURSOR_KEY = "mqtt.acked_seq"


def utc_now() -> datetime:
    return datetime.now(UTC)


class DaemonFailed(Exception):
    """ctid cannot run: a configuration or environment problem that a retry won't fix."""


@dataclass
class Link:
    """One Asterisk: its AMI client and the call model it feeds."""

    config: AsteriskConfig
    model: CallModel
    client: AMIClient = field(init=False)
    resyncs: int = 0


class Daemon:
    """ctid: build it from a :class:`Config`, then ``await start()`` / ``await stop()``,
    or ``await run_until_signalled()`` from the CLI."""

    def __init__(self, config: Config, *, clock: Clock = utc_now, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.metrics = CollectorRegistry()
        self.db = Database(config.database.url)
        self.store = CallStore(self.db.sessions)
        self.recorder = CallRecorder(self.store)
        self.ivr_store = IVRStore(self.db.sessions)
        self.bus = EventBus(self.db, config=config.events, clock=clock, registry=self.metrics)
        self.notifier = CallNotifier(self.bus.publish, identify_grace=config.events.identify_grace)
        self.mqtt = MQTTPublisher(config.mqtt, instance_id=config.instance.id, bus=self.bus)
        self.provisioning = ProvisioningStore(self.db.sessions)
        self.stats = StatsSnapshotter(self.bus, config.events.stats_interval, clock)
        self.crm = CRMClient()
        self.enricher = CallEnricher(self.crm, config)
        self.links: dict[str, Link] = {}
        for link_config in config.asterisk:
            link = Link(link_config, CallModel(clock, self._tenant_for_dnis))
            link.client = AMIClient(
                link_config.host, link_config.port, link_config.username,
                link_config.secret.get_secret_value(),
                on_event=self._event_consumer(link),
                on_login=self._resync_hook(link),
                name=link_config.id,
                connect_timeout=link_config.connect_timeout,
                action_timeout=link_config.action_timeout,
                ping_interval=link_config.ping_interval,
                ping_timeout=link_config.ping_timeout,
                reconnect_min=link_config.reconnect_min,
                reconnect_max=link_config.reconnect_max,
            )
            self.links[link_config.id] = link
        self.agi = FastAGIServer(
            config.agi.bind, config.agi.port,
            {"inbound": self._inbound, "checkin": self._checkin, "survey": self._survey},
            env_timeout=config.agi.env_timeout, hangup_grace=config.agi.hangup_grace,
        )
        self._reload_lock = asyncio.Lock()
        self._build(config)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed = asyncio.Event()
        self.failure: str | None = None
        self._db_ok: bool | None = None
        self._started = False

    def _build(self, config: Config) -> None:
        """The parts that depend on the agents and queues (from the database once it is up)."""
        self.agents = AgentRegistry(config.agents, self._publish_agent_event, self.clock,
                                    pause_reasons=(*config.pause_reasons, "rona"))
        self.queue_stats = QueueStatsFeed(config, self.agents, self.stats)
        first = next(iter(self.links.values()))
        self.acd = Dispatcher(config, client=first.client, model=first.model, agents=self.agents, bus=self.bus,
                              clock=self.clock)
        self.acd.wire(notifier=self.notifier, stats=self.queue_stats, sessions=self.db.sessions,
                      ivr_variables=self.ivr_store.last_variables)
        # Call control (hold, transfer, click-to-dial, hangup) on the dispatcher's link.
        self.control = CallControl(config, client=first.client, model=first.model, dispatcher=self.acd,
                                   agents=self.agents, bus=self.bus, clock=self.clock,
                                   on_changes=lambda changes: self._on_changes(first, changes))
        # [acd] sync_fallback_members: the native fail-open queue's members follow the
        # logged-in agents over AMI (ctid.acd.fallback); off, queues.conf's static members.
        self.fallback: FallbackSync | None = None
        if config.acd.sync_fallback_members:
            self.fallback = FallbackSync(client=first.client, agents=self.agents, queue=config.acd.fallback_queue,
                                         known_endpoints=self.acd.known_endpoints)
        self.ivr = FlowRunner(config, publish=self.bus.publish, model=first.model, crm=self.crm, clock=self.clock,
                              request_callback=self._ivr_callback, queue_info=self.acd.queue_info,
                              record=lambda run: self.ivr_store.add(run.record()))
        self.api = ApiServer(config, self.bus, self.agents, self._active_calls, self.health, self.metrics,
                             ended_calls=lambda n: self.store.list_calls(active=False, limit=n), clock=self.clock,
                             provisioning=self.provisioning, reload=self.reload,
                             current_config=lambda: self.config, control=self.control,
                             known_endpoints=self.acd.known_endpoints)

    # -- lifetimes -------------------------------------------------------------------

    async def start(self) -> None:
        """Bring the parts up in order; a part that cannot start undoes the others."""
        log.info("ctid.starting", instance=self.config.instance.id, database=self.db.url,
                 mqtt=self.config.mqtt.host if self.config.mqtt.enabled else "off (no broker configured)")
        try:
            await self.db.start()
        except StoreError as exc:
            raise DaemonFailed(f"database unavailable: {exc}") from None
        self._db_ok = True
        try:
            # The database is the truth for agents and queues; the config seeds it.
            report = await self.provisioning.seed(self.config)
            effective = await self.provisioning.effective_config(self.config)
            if effective.agents != self.config.agents or effective.queues != self.config.queues:
                self.config = effective
                self._build(effective)
            log.info("acd.provisioning", seeded=str(report), agents=len(self.config.agents),
                     queues=len(self.config.queues))
            await self.bus.start()
            if self.config.mqtt.enabled:
                cursor = await get_meta(self.db, MQTT_CURSOR_KEY)
                if cursor is not None and cursor.isdigit():
                    self.mqtt.resume_after(int(cursor))
                self._spawn("mqtt-cursor", self._save_mqtt_cursor())
            self._spawn("call-recorder", self.recorder.run())
            self._spawn("ivr-store", self.ivr_store.run())
            self._spawn("db-monitor", self._monitor_db())
            self._spawn("mqtt", self.mqtt.run())
            await self.crm.start()
            await self.acd.start()
            await self._rebuild_service_levels()
            if self.fallback is not None:
                await self.fallback.start()
            await self._listen("FastAGI", self.config.agi.bind, self.config.agi.port, self.agi.start)
            await self._listen("HTTP", self.config.http.bind, self.config.http.port, self.api.start)
        except BaseException:
            await self._shutdown()
            raise
        for link in self.links.values():
            self._spawn(f"ami-{link.config.id}", self._run_link(link))
        self.queue_stats.refresh(self.clock())
        # Everything built so far lives as long as the daemon: move it out of the cyclic
        # collector's reach, so full collections (tens of ms on a busy heap, and a pause
        # for every screen pop in flight) only walk what calls and events allocate.
        gc.collect()
        gc.freeze()
        self._started = True
        log.info("ctid.started", agi_port=self.agi.port, http_port=self.api.port, links=list(self.links))

    async def _rebuild_service_levels(self) -> None:
        """After a restart: today's SL counters from the stored calls, not from zero."""
        now = self.clock()
        since = now - timedelta(hours=26)  # covers "today" in every time zone; the feed filters
        try:
            async with asyncio.timeout(10):
                outcomes = await self.store.queue_outcomes_since(since)
        except Exception as exc:  # the database is slow or gone: start from zero, say so
            log.warning("acd.sl_rebuild_failed", reason=f"{type(exc).__name__}: {exc}")
            return
        counted = self.queue_stats.rebuild(outcomes, now)
        log.info("acd.sl_rebuilt", calls=counted)

    async def _listen(self, what: str, host: str, port: int, start: Callable[[], Awaitable[None]]) -> None:
        try:
            await start()
        except OSError as exc:
            raise DaemonFailed(f"cannot listen for {what} on {host}:{port}: {exc.strerror}") from None

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("ctid.task_failed", task=task.get_name(), error=repr(task.exception()))
        self.failure = self.failure or f"internal task {task.get_name()} failed: {task.exception()!r}"
        self._failed.set()

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        log.info("ctid.stopping")
        await self._shutdown()
        gc.unfreeze()  # let what start() froze be collected again (matters for embedders and tests)
        log.info("ctid.stopped", records_written=self.recorder.written, records_unsaved=self.recorder.pending,
                 events_last_seq=self.bus.last_seq)

    async def _shutdown(self) -> None:
        """Reverse order of start: no new calls, then no new events, then flush and close."""
        await self.agi.stop()  # FastAGI sessions are closed: Asterisk can free the channels
        if self.fallback is not None:
            await self.fallback.stop()  # members stay, unpaused, for the fail-open queue
        for link in self.links.values():
            await link.client.close()  # AMI logs off
        await self._cancel(*(f"ami-{lid}" for lid in self.links))
        await self.acd.stop()
        await self.control.stop()
        self.notifier.close()  # held call events go out now, under the id they have
        self.stats.close()
        await self.enricher.close()
        await self.crm.close()
        await self.api.stop()  # websockets closed with 1001
        await self.mqtt.stop()  # bounded flush, then retained "offline" on the status topic
        await self._cancel("mqtt", "mqtt-cursor", "db-monitor", "call-recorder", "ivr-store")
        if self.config.mqtt.enabled:
            with contextlib.suppress(Exception):
                await set_meta(self.db, MQTT_CURSOR_KEY, str(self.mqtt.last_acked_seq))
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await self.recorder.flush()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.ivr_store.flush()
        await self.bus.stop()  # the outbox is flushed
        await self.db.close()

    async def _cancel(self, *names: str) -> None:
        tasks = [t for n in names if (t := self._tasks.pop(n, None)) is not None]
        for task in tasks:
            task.remove_done_callback(self._task_done)
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def reload(self) -> dict[str, Any]:
        """SIGHUP or ``POST /api/v1/admin/reload``: re-read the config file, seed what is
        new, and apply the queues' routing rules without a restart. Raises ConfigError
        (the running config stays) when the file is invalid."""
        async with self._reload_lock:
            if self.config_path is None:
                return {"reloaded": False, "reason": "ctid was started without a config file"}
            fresh = load(self.config_path)
            report = await self.provisioning.seed(fresh)
            effective = await self.provisioning.effective_config(fresh)
            self.acd.update_rules(effective)
            # IVR flows and the lines that pick them come from the file (checked together).
            self.config = self.config.model_copy(update={"queues": effective.queues, "flows": fresh.flows,
                                                         "service_lines": fresh.service_lines})
            self.ivr.reconfigure(self.config)
            log.info("ctid.reloaded", queues=len(effective.queues), flows=len(fresh.flows), seeded=str(report))
            return {"reloaded": True, "queues": [q.id for q in effective.queues], "flows": sorted(fresh.flows),
                    "seed": str(report),
                    "note": "agent changes made in the file reach a running ctid through the database"}

    async def wait_failed(self) -> str:
        await self._failed.wait()
        return self.failure or "failed"

    async def run_until_signalled(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a fatal failure (raises DaemonFailed)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        try:
            await self.start()
            stopper = asyncio.create_task(stop.wait())
            failer = asyncio.create_task(self._failed.wait())
            await asyncio.wait({stopper, failer}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            failer.cancel()
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        if self.failure is not None:
            raise DaemonFailed(self.failure)
        return 0

    def _reload_on_signal(self) -> None:
        async def run() -> None:
            try:
                await self.reload()
            except ConfigError as exc:
                log.error("ctid.reload_refused", problems=[str(p) for p in exc.problems])
            except Exception:
                log.exception("ctid.reload_failed")

        self._spawn("reload", run())

    async def _run_link(self, link: Link) -> None:
        try:
            await link.client.run()
        except AMILoginError as exc:
            self.failure = f"AMI link {link.config.id}: {exc}"
            self._failed.set()

    async def _save_mqtt_cursor(self, interval: float = 1.0) -> None:
        """Persist the last PUBACKed seq, so a restart while the broker is down still
        publishes, from the outbox, what this run could not."""
        saved = self.mqtt.last_acked_seq
        while True:
            await asyncio.sleep(interval)
            current = self.mqtt.last_acked_seq
            if current != saved:
                try:
                    await set_meta(self.db, MQTT_CURSOR_KEY, str(current))
                    saved = current
                except Exception as exc:  # the database is down: the next round retries
                    log.debug("mqtt.cursor_not_saved", reason=f"{type(exc).__name__}: {exc}")

    async def _monitor_db(self, interval: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval)
            ok = await self.db.ping()
            if ok != self._db_ok:
                (log.info if ok else log.error)("store.database_" + ("up" if ok else "down"), url=self.db.url)
            self._db_ok = ok

    # -- status ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The report behind ``/healthz``: ready when every AMI link is logged in and
        FastAGI listens; the database, broker and event lag are reported too."""
        links = {lid: {"state": link.client.state.value, "last_error": link.client.last_error,
                       "active_calls": len(link.model.calls), "resyncs": link.resyncs}
                 for lid, link in self.links.items()}
        ok = all(link.client.connected for link in self.links.values()) and self._started
        return {
            "ok": ok,
            "ami": links,
            "agi": {"listening": self._started, "port": self.agi.port, "sessions": self.agi.session_count},
            "db": {"ok": self._db_ok, "records_pending": self.recorder.pending,
                   "last_error": self.recorder.last_error},
            "broker": ({"enabled": True, "connected": self.mqtt.connected, "last_acked_seq": self.mqtt.last_acked_seq}
                       if self.config.mqtt.enabled else {"enabled": False}),
            "event_lag": {"last_seq": self.bus.last_seq, "outbox_pending": self.bus.outbox_pending,
                          "outbox_dropped": self.bus.outbox_dropped,
                          "mqtt_behind": (self.bus.last_seq - self.mqtt.last_acked_seq)
                          if self.config.mqtt.enabled else None},
        }

    def _active_calls(self) -> list[Call]:
        return [call for link in self.links.values() for call in link.model.calls.values()]

    def _publish_agent_event(self, event: Event) -> Event:
        stamped = self.bus.publish(event)
        if event.type == "agent.state":
            self.acd.on_agent_state(stamped)
            if self.fallback is not None:
                self.fallback.on_agent_state(stamped)
            self.queue_stats.refresh(event.ts, event.tenant)
        return stamped

    # -- AMI side ----------------------------------------------------------------------

    def _tenant_for_dnis(self, dnis: str) -> tuple[str, str | None]:
        line = self.config.line_for_dnis(dnis)
        if line is not None:
            return line.tenant, line.id
        return self.config.tenants[0].id, None

    def _event_consumer(self, link: Link) -> Callable[[Message], None]:
        model = link.model

        def consume(event: Message) -> None:
            changes = model.feed(event)
            if changes:
                self._on_changes(link, changes)
            if event.name in ("UserEvent", "DeviceStateChange"):
                self.acd.on_ami_event(event)

        return consume

    def _resync_hook(self, link: Link) -> Callable[[AMIClient], Any]:
        async def resync(client: AMIClient) -> None:
            # begin_resync first: events that arrive while the list is collected count
            # as live, so a channel created meanwhile is not ended by mistake.
            link.model.begin_resync()
            listing = await client.action("CoreShowChannels")
            for item in listing.events:
                link.model.resync_channel(item)
            changes = link.model.end_resync()
            link.resyncs += 1
            log.info("ami.resynced", link=link.config.id, channels=len(listing.events),
                     active_calls=len(link.model.calls), changes=len(changes))
            self._on_changes(link, changes)
            if link.model is self.control.model:  # the link the ACD runs on
                await self.acd.on_login(client)  # DeviceStateList: the devices agents may log in to
                if self.fallback is not None:
                    self.fallback.on_login()  # QueueStatus: reconcile the fallback queue's members

        return resync

    def _on_changes(self, link: Link, changes: list[CallChange]) -> None:
        if link.model is self.control.model:
            self.acd.before_changes(changes)  # callback attempts: the callback's tenant
            self.control.before_changes(changes)  # click-to-dial: the agent's tenant
        self.notifier.on_changes(changes)
        self.acd.on_changes(changes)
        if link.model is self.control.model:  # hold survivors, resumes, transferred agents
            self.control.on_changes(changes)
        for change in changes:
            call = change.call
            if change.old_call_id and change.old_call_id != change.call_id:
                self.recorder.forget(change.old_call_id)
            self.recorder.mark(call)
            if change.kind is ChangeKind.STARTED:
                self.enricher.on_started(link.model, call)
            event_type = change.event_type
            if event_type is not None:
                log.info(event_type, call_id=change.call_id, link=link.config.id, tenant=call.tenant,
                         direction=str(call.direction), caller=call.caller_number, dnis=call.dnis,
                         state=str(call.state), hangup_by=str(call.hangup_by) if call.hangup_by else None)

    # -- FastAGI side ------------------------------------------------------------------

    async def _checkin(self, session: AGISession) -> None:
        """``agi://ctid/checkin?call_id=...``: the periodic check-in of a waiting caller."""
        await self.acd.checkin(session)

    async def _inbound(self, session: AGISession) -> None:
        """``agi://ctid/inbound?dnis=...``: identify the call, then run its line's IVR flow
        or queue it (``CTID_ROUTE`` tells the dialplan what next)."""
        # The dialplan FILTERs the DNIS to digits and '+'; "s" (no DNIS) arrives empty.
        dnis = (session.query.get("dnis") or [""])[0] or "s"
        line = self.config.line_for_dnis(dnis)
        tenant, _ = self._tenant_for_dnis(dnis)
        try:
            existing = await session.get_variable("CTID_CALL_ID")
        except AGIError:
            return
        call_id = existing if existing and _is_id(existing) else uuid.uuid4().hex
        with structlog.contextvars.bound_contextvars(call_id=call_id):
            log.info("agi.inbound", dnis=dnis, service_line=line.id if line else None, tenant=tenant,
                     caller=session.env.get("agi_callerid"), channel=session.channel)
            if line is None:
                log.warning("agi.unknown_dnis", dnis=dnis, action="fallback queue")
            try:
                await session.set_variable("__CTID_CALL_ID", call_id)
                # Bind the channel now: ctid's AMI user reads no VarSet (class dialplan) and the
                # channel's next call event may be seconds away. Its Asterisk is taken to be the
                # link whose model knows the Uniqueid, else the first link (one link today).
                uid = session.uniqueid or ""  # agi_uniqueid
                link = next((lk for lk in self.links.values() if lk.model.channel(uid) is not None),
                            next(iter(self.links.values())))
                changes = link.model.bind_call_id(uid, call_id, channel=session.channel)
                if changes:
                    self._on_changes(link, changes)
                await session.set_variable("__CTID_TENANT", tenant)
                if line is not None:
                    await session.set_variable("__CTID_SERVICE_LINE", line.id)
                # What /inbound knows, in the model at once: no VarSet tells it, and a call
                # adopted from CoreShowChannels before these variables were set lacks them.
                with contextlib.suppress(LookupError):
                    link.model.annotate(call_id, tenant=tenant, service_line=line.id if line else None,
                                        dnis=None if dnis == "s" else dnis)
                route: str | None = "fallback"  # no flow and no queue: the native queue serves it
                if line is not None and line.flow is not None:
                    route = await self._run_flow(session, call_id, line, tenant, dnis)
                elif line is not None and line.queue is not None and line.queue in self.acd.rules:
                    route = await self.acd.enqueue_from_agi(session, call_id, line.queue, tenant)
                if route is not None:
                    await session.set_variable("CTID_ROUTE", route)
            except (AGIError, UnsafeValueError) as exc:
                log.warning("agi.inbound_aborted", reason=str(exc))

    async def _run_flow(self, session: AGISession, call_id: str, line: ServiceLineConfig, tenant: str,
                        dnis: str) -> str | None:
        """Run the line's flow, then carry out how it ended; the ``CTID_ROUTE`` to set
        (None: the session is over, nothing to tell the dialplan)."""
        assert line.flow is not None
        try:
            run = await self.ivr.run(session, call_id=call_id, flow_id=line.flow, tenant=tenant,
                                     service_line=line.id, dnis=None if dnis == "s" else dnis)
        except FlowError as exc:
            log.error("ivr.flow_error", flow=line.flow, node=None, error=str(exc))
            return await self._ivr_fallback(session, call_id, line, tenant)
        assert run.exit is not None
        reason, action = run.exit.reason, run.exit.action
        if reason == "error":
            return await self._ivr_fallback(session, call_id, line, tenant)
        if reason == "abandoned" or (reason == "transferred" and action is None):
            return None  # the caller hung up, or the channel was moved (Redirect)
        try:
            if isinstance(action, QueueNode):
                if action.queue not in self.acd.rules:
                    log.error("ivr.unknown_queue", flow=run.flow_id, node=run.exit.node, queue=action.queue)
                    return await self._ivr_fallback(session, call_id, line, tenant)
                priority = action.priority if action.priority is not None else run.priority
                return await self.acd.enqueue_from_agi(session, call_id, action.queue, tenant, priority=priority)
            if isinstance(action, TransferNode):
                if action.number is not None:
                    kind, target = "number", self.acd.policy.check(action.number)
                    context = ""
                else:
                    assert action.extension is not None
                    kind, target = "extension", action.extension
                    context = action.context or self.config.dialing.transfer_context
                for name, value in (("CTID_TRANSFER_KIND", kind), ("CTID_TRANSFER_TARGET", target),
                                    ("CTID_TRANSFER_CONTEXT", context)):
                    await session.set_variable(name, value)
                return "transfer"
            if isinstance(action, VoicemailNode):
                if action.context is not None:
                    await session.set_variable("CTID_VOICEMAIL_CONTEXT", action.context)
                return "voicemail"
        except DialNumberRejected as exc:
            log.error("ivr.transfer_refused", flow=run.flow_id, node=run.exit.node, reason=exc.reason)
            return await self._ivr_fallback(session, call_id, line, tenant)
        return "release"  # hangup (contained, timeout) and callback: the flow is done with the call

    async def _ivr_fallback(self, session: AGISession, call_id: str, line: ServiceLineConfig, tenant: str) -> str:
        """A flow that failed: the line's fallback queue, else the native fail-open queue."""
        if session.hung_up:
            return "fallback"
        queue = line.fallback_queue
        if queue is not None and queue in self.acd.rules:
            log.warning("ivr.fallback", service_line=line.id, queue=queue)
            return await self.acd.enqueue_from_agi(session, call_id, queue, tenant)
        log.warning("ivr.fallback", service_line=line.id, queue="native fallback queue")
        return "fallback"

    async def _ivr_callback(self, run: IVRRun, node: CallbackNode, number: str) -> str | None:
        return await self.acd.callback_from_ivr(run.call_id, run.tenant, node.queue, number, run.priority)

    async def _survey(self, session: AGISession) -> None:
        """``agi://ctid/survey?call_id=...`` from ``[ctid-connect]`` once the agent hung up
        (``CTID_AFTER=survey``): the queue's survey flow, then ``call.survey``."""
        call_id = (session.query.get("call_id") or [""])[0]
        call = self.control.model.get(call_id) if _is_id(call_id) else None
        if call is None:
            log.warning("ivr.survey_unknown_call", call_id=call_id)
            return
        queue_id = call.data.get("queue")
        agent_id = call.data.get("agent_id")
        flow_id = self.acd.survey_flow(queue_id) if isinstance(queue_id, str) else None
        if flow_id is None:
            log.warning("ivr.survey_no_flow", call_id=call_id, queue=queue_id)
            return
        with structlog.contextvars.bound_contextvars(call_id=call_id):
            try:
                run = await self.ivr.run(session, call_id=call_id, flow_id=flow_id, tenant=call.tenant,
                                         service_line=call.service_line, dnis=call.dnis)
            except FlowError as exc:
                log.error("ivr.flow_error", flow=flow_id, node=None, error=str(exc))
                return
            questions = sum(1 for node in run.flow.nodes.values() if node.type == "survey")
            data = call_data(call)
            data.update({"scores": dict(run.scores), "agent_id": agent_id if isinstance(agent_id, str) else None,
                         "flow": flow_id, "complete": len(run.scores) == questions})
            self.bus.publish(Event("call.survey", call.tenant, self.clock(), data, call_id=call_id,
                                   agent_id=data["agent_id"], queue=queue_id if isinstance(queue_id, str) else None))
            self.ivr_store.add_survey(call_id=call_id, tenant=call.tenant, agent_id=data["agent_id"],
                                      queue=queue_id if isinstance(queue_id, str) else None, flow=flow_id,
                                      scores=run.scores, at=self.clock())
            log.info("ivr.survey", flow=flow_id, agent_id=data["agent_id"], scores=run.scores)
            if not session.hung_up:
                with contextlib.suppress(AGIError):
                    await session.set_variable("CTID_ROUTE", "release")


def _is_id(value: str) -> bool:
    try:
        check_id(value)
    except UnsafeValueError:
        return False
    return True


__all__ = ["Daemon", "DaemonFailed"]
