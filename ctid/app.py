"""The daemon's wiring: reading this file shows how ctid fits together.

::

    Asterisk --AMI--> AMIClient --(ordered, in the reader task)--> CallModel.feed --> _on_changes
                                                                          |             |- log call.*
            <--CoreShowChannels after every login (resync)--              |             '- CallRecorder
    dialplan --FastAGI--> FastAGIServer --> routes["inbound"]                             (one writer task,
                                               sets __CTID_CALL_ID, tenant, line           batched upserts,
                                                                                           buffered while
                                                                                           the DB is down)

Lifetimes are explicit: :meth:`Daemon.start` brings the parts up in order (database and
migrations, FastAGI listener, AMI links) and :meth:`Daemon.stop` takes them down in
reverse (FastAGI sessions closed, AMI logged off, pending call records flushed, database
closed). Every background task has an owner here; a task that fails is logged, and an
AMI login rejection is fatal (:class:`DaemonFailed`).

One :class:`CallModel` per Asterisk link: channel names and Uniqueids are only unique
within one Asterisk. Call ids (``CTID_CALL_ID``, set by ctid) are global.

Until the IVR and ACD issues land, the ``inbound`` FastAGI script identifies the call
(``__CTID_CALL_ID``, ``__CTID_TENANT``, ``__CTID_SERVICE_LINE``) and hands it to the
native fallback queue with ``CTID_ROUTE=fallback`` (see ``dialplans/ctid.conf``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import exc as sa_exc

from ctid.asterisk.agi import AGIError, AGISession, FastAGIServer
from ctid.asterisk.ami import AMIClient, AMILoginError
from ctid.asterisk.ami_protocol import Message
from ctid.asterisk.safety import UnsafeValueError, check_id
from ctid.calls import Call, CallChange, CallModel
from ctid.config import AsteriskConfig, Config
from ctid.store.calls import CallStore
from ctid.store.db import Database, StoreError

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class DaemonFailed(Exception):
    """ctid cannot run: a configuration or environment problem that a retry won't fix."""


class CallRecorder:
    """Persists call records through one writer task, batched and deduplicated.

    The model hands over calls that changed (:meth:`mark`); the writer upserts the
    latest state of each every ``interval`` seconds. While the database is down the
    dirty set is kept (bounded by ``max_pending``; past it the oldest ended calls, then the
    oldest calls, are dropped, logged and counted in ``dropped``) and retried with
    backoff. A record the database refuses for its content is logged and counted in
    ``rejected``. Routing never waits for it.
    """

    def __init__(self, store: CallStore, *, interval: float = 0.2, max_pending: int = 50_000) -> None:
        self._store = store
        self._interval = interval
        self._max_pending = max_pending
        self._dirty: dict[str, Call] = {}
        self._writing = 0
        self._wake = asyncio.Event()
        self.written = 0
        self.dropped = 0
        self.rejected = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        """Calls whose latest state is not in the database yet (queued or being written)."""
        return len(self._dirty) + self._writing

    def mark(self, call: Call) -> None:
        self._dirty.pop(call.call_id, None)
        self._dirty[call.call_id] = call  # re-insert: dict order is age of last change
        if len(self._dirty) > self._max_pending:
            # Over the bound (the database has been down for long): drop the oldest ended
            # call, or the oldest of all if every pending call is still up.
            victim = next((cid for cid, old in self._dirty.items() if not old.active), None)
            if victim is None:
                victim = next(iter(self._dirty))
            del self._dirty[victim]
            self.dropped += 1
            log.error("store.record_dropped", call_id=victim, pending=len(self._dirty))
        self._wake.set()

    def forget(self, call_id: str) -> None:
        """A provisional call was merged into another under a new id."""
        self._dirty.pop(call_id, None)

    async def run(self) -> None:
        delay = self._interval
        while True:
            await self._wake.wait()
            await asyncio.sleep(delay)
            self._wake.clear()
            if await self.flush():
                delay = self._interval
            else:
                self._wake.set()
                delay = min(30.0, max(delay * 2, 0.5))

    async def flush(self) -> bool:
        """Write everything dirty; True when all of it was written.

        A record the database refuses for its content (a constraint, a bad value) is
        logged and set aside, so it cannot block the records behind it. Any other
        failure (the database is down), or a cancellation during shutdown, puts the
        unwritten rest back, where newer states of the same calls win."""
        batch, self._dirty = self._dirty, {}
        items = list(batch.items())
        done = 0
        self._writing = len(items)
        try:
            for call_id, call in items:
                try:
                    await self._store.upsert_call(call.to_record())
                    self.written += 1
                except Exception as exc:
                    if not _is_record_error(exc):
                        raise
                    self.rejected += 1
                    log.error("store.record_rejected", call_id=call_id, reason=f"{type(exc).__name__}: {exc}")
                done += 1
                self._writing -= 1
        except BaseException as exc:
            rest = dict(items[done:])
            rest.update(self._dirty)
            self._dirty = rest
            self._writing = 0
            if not isinstance(exc, Exception):
                raise  # cancelled: the caller flushes again
            self.failures += 1
            reason = f"{type(exc).__name__}: {exc}"
            if reason != self.last_error:
                log.error("store.write_failed", reason=reason, pending=len(self._dirty))
            self.last_error = reason
            return False
        if self.last_error is not None:
            log.info("store.recovered", written=self.written)
            self.last_error = None
        return True


def _is_record_error(exc: Exception) -> bool:
    """True when the database refused this record's content (retrying cannot help)."""
    if isinstance(exc, (sa_exc.DataError, sa_exc.IntegrityError)):
        return True
    if isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError):
        return True  # raised while binding parameters, before the database was asked
    return isinstance(exc, ValueError)  # the record itself is invalid (CallRecord checks)


@dataclass
class Link:
    """One Asterisk: its AMI client and the call model it feeds."""

    config: AsteriskConfig
    model: CallModel
    client: AMIClient = field(init=False)
    task: asyncio.Task[None] | None = None
    resyncs: int = 0


class Daemon:
    """ctid: build it from a :class:`Config`, then ``await start()`` / ``await stop()``,
    or ``await run_until_signalled()`` from the CLI."""

    def __init__(self, config: Config, *, clock: Clock = utc_now) -> None:
        self.config = config
        self.clock = clock
        self.db = Database(config.database.url)
        self.store = CallStore(self.db.sessions)
        self.recorder = CallRecorder(self.store)
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
            config.agi.bind, config.agi.port, {"inbound": self._inbound},
            env_timeout=config.agi.env_timeout, hangup_grace=config.agi.hangup_grace,
        )
        self._recorder_task: asyncio.Task[None] | None = None
        self._failed = asyncio.Event()
        self.failure: str | None = None
        self._started = False

    # -- lifetimes -------------------------------------------------------------------

    async def start(self) -> None:
        log.info("ctid.starting", instance=self.config.instance.id, database=self.db.url,
                 mqtt="off (no broker configured)" if not self.config.mqtt.enabled else self.config.mqtt.host)
        try:
            await self.db.start()
        except StoreError as exc:
            raise DaemonFailed(f"database unavailable: {exc}") from None
        self._recorder_task = asyncio.create_task(self.recorder.run(), name="call-recorder")
        try:
            await self.agi.start()
        except OSError as exc:
            await self._stop_recorder()
            await self.db.close()
            raise DaemonFailed(
                f"cannot listen for FastAGI on {self.config.agi.bind}:{self.config.agi.port}: {exc.strerror}"
            ) from None
        for link in self.links.values():
            link.task = asyncio.create_task(self._run_link(link), name=f"ami-{link.config.id}")
        self._started = True
        log.info("ctid.started", agi_port=self.agi.port, links=list(self.links))

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        log.info("ctid.stopping")
        await self.agi.stop()
        for link in self.links.values():
            await link.client.close()
            if link.task is not None:
                link.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await link.task
        await self._stop_recorder()
        await self.db.close()
        log.info("ctid.stopped", records_written=self.recorder.written, records_unsaved=self.recorder.pending)

    async def _stop_recorder(self) -> None:
        if self._recorder_task is not None:
            self._recorder_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder_task
            self._recorder_task = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await self.recorder.flush()

    async def wait_failed(self) -> str:
        await self._failed.wait()
        return self.failure or "failed"

    async def run_until_signalled(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a fatal failure (raises DaemonFailed)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            stopper = asyncio.create_task(stop.wait())
            failer = asyncio.create_task(self._failed.wait())
            await asyncio.wait({stopper, failer}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            failer.cancel()
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if self.failure is not None:
            raise DaemonFailed(self.failure)
        return 0

    async def _run_link(self, link: Link) -> None:
        try:
            await link.client.run()
        except AMILoginError as exc:
            self.failure = f"AMI link {link.config.id}: {exc}"
            self._failed.set()
        except Exception as exc:
            log.exception("ami.link_task_failed", link=link.config.id)
            self.failure = f"AMI link {link.config.id} failed: {exc}"
            self._failed.set()

    # -- status ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        links = {lid: {"state": link.client.state.value, "last_error": link.client.last_error,
                       "active_calls": len(link.model.calls), "resyncs": link.resyncs}
                 for lid, link in self.links.items()}
        ok = all(link.client.connected for link in self.links.values()) and self._started
        return {"ok": ok, "ami": links, "agi": {"listening": self._started, "port": self.agi.port,
                                                 "sessions": self.agi.session_count},
                "store": {"pending": self.recorder.pending, "written": self.recorder.written,
                          "last_error": self.recorder.last_error}}

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

        return resync

    def _on_changes(self, link: Link, changes: list[CallChange]) -> None:
        for change in changes:
            call = change.call
            if change.old_call_id and change.old_call_id != change.call_id:
                self.recorder.forget(change.old_call_id)
            self.recorder.mark(call)
            event_type = change.event_type
            if event_type is not None:
                log.info(event_type, call_id=change.call_id, link=link.config.id, tenant=call.tenant,
                         direction=str(call.direction), caller=call.caller_number, dnis=call.dnis,
                         state=str(call.state), hangup_by=str(call.hangup_by) if call.hangup_by else None)

    # -- FastAGI side ------------------------------------------------------------------

    async def _inbound(self, session: AGISession) -> None:
        """``agi://ctid/inbound?dnis=...``: identify the call, then hand it on."""
        # The dialplan FILTERs the DNIS to digits and '+'; "s" (no DNIS) arrives empty.
        dnis = (session.query.get("dnis") or [""])[0] or "s"
        line = self.config.line_for_dnis(dnis)
        tenant = line.tenant if line else self.config.tenants[0].id
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
                await session.set_variable("__CTID_TENANT", tenant)
                if line is not None:
                    await session.set_variable("__CTID_SERVICE_LINE", line.id)
                # No IVR or ACD yet: the native fallback queue serves the call.
                await session.set_variable("CTID_ROUTE", "fallback")
            except (AGIError, UnsafeValueError) as exc:
                log.warning("agi.inbound_aborted", reason=str(exc))


def _is_id(value: str) -> bool:
    try:
        check_id(value)
    except UnsafeValueError:
        return False
    return True


__all__ = ["CallRecorder", "Daemon", "DaemonFailed"]
