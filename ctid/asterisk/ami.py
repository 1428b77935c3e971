"""The asyncio AMI client: one link to one Asterisk, on top of ``ami_protocol``.

How it behaves (each point is tested over real sockets: ``tests/test_ami_client.py``
against a scripted peer that misbehaves on cue, ``tests/test_ami_faults.py`` against
the simulator's fault injection):

* **Only the event classes ctid uses.** The Login asks for ``Events:
  system,call,agent,user`` (:data:`EVENT_CLASSES`), not ``on``: Asterisk sends a session
  an event only if all its classes are in both the user's ``read`` and this list, so
  ctid stays lean against a user with wider ``read`` rights (``dialplan`` and ``cel``
  alone are over half of all AMI traffic). What ctid consumes is all ``call`` (channel,
  dial, bridge, hangup, transfer and rename events, ``OriginateResponse``,
  ``DeviceStateChange``) and ``user`` (``UserEvent``); ``system`` (``FullyBooted``,
  ``Reload``, ``ContactStatus``) and ``agent`` (app_queue's events of the fallback queue)
  are few and kept as the sample manager.conf grants them. Responses and EventList items
  (``CoreShowChannels``, ``DeviceStateList``, ``QueueStatus``) are never filtered.
  ``VarSet`` (``dialplan``) is not needed: the FastAGI script binds the channels it
  identifies (``CallModel.bind_call_id``).
* **Login is checked.** ``Response: Error`` to the Login (Asterisk answers
  ``Authentication failed`` and closes, capture 01b) raises :class:`AMILoginError` out of
  :meth:`AMIClient.run`: a wrong secret is a configuration error, so there is no retry
  storm. A refused or dropped connection is retried with exponential backoff and jitter.
* **Keepalive.** A ``Ping`` every ``ping_interval`` seconds must be answered within
  ``ping_timeout``; a missed pong means the link is half-open, so it is closed and
  re-established.
* **Every action has a timeout.** :meth:`AMIClient.action` raises
  :class:`AMITimeout` when the response (or the end of its EventList) does not arrive in
  time. When the link drops, every pending action fails with :class:`AMILinkLost`. Actions
  are **never replayed** after a reconnect: an Originate must not run twice. Actions sent
  while the link is down fail at once with :class:`AMINotConnected`.
* **Resync.** After each login the ``on_login`` coroutine runs (the app uses it to
  rebuild the call model from ``CoreShowChannels``). Events that arrive meanwhile are
  still dispatched in order.
* **Ordered dispatch, no task per event.** The reader task parses each chunk and calls
  the synchronous ``on_event`` callback for each event, in wire order. The event is set
  as the current one in a ContextVar meanwhile, so any line logged by the consumer
  carries the event's ``call_id`` (``ChanVariable: CTID_CALL_ID=…``). Consumers that need to do I/O enqueue work for
  their own single consumer task.
* Malformed frames are logged and skipped; the stream continues.

Values that reach the socket are checked by ``ami_protocol.serialize`` (CR/LF/NUL raise
``AMIValueError`` before anything is written). ``Secret`` is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import structlog

from ctid.asterisk.ami_protocol import (
    ActionCompletion,
    ActionTracker,
    AMIParser,
    AMIProtocolError,
    Greeting,
    Malformed,
    Message,
    MessageKind,
    build_action,
    serialize,
)
from ctid.logs import CURRENT_EVENT

log = structlog.get_logger(__name__)

#: The AMI event classes ctid asks for at login (and the sample manager.conf's ``read``).
EVENT_CLASSES = "system,call,agent,user"

EventCallback = Callable[[Message], None]
LoginCallback = Callable[["AMIClient"], Awaitable[None]]
Fields = Mapping[str, str | Iterable[str]] | Iterable[tuple[str, str]]


class AMIError(Exception):
    """Base class of AMI client errors."""


class AMILoginError(AMIError):
    """Asterisk rejected the credentials. Fatal: fix the config."""


class AMINotConnected(AMIError):
    """The action was not sent because the link is down."""


class AMILinkLost(AMIError):
    """The link dropped before the response arrived. The action was sent and may or may
    not have run; it is not re-sent."""


class AMITimeout(AMIError):
    """No (complete) response within the action's timeout."""


class AMIActionError(AMIError):
    """Asterisk answered ``Response: Error``."""

    def __init__(self, action: str, completion: ActionCompletion) -> None:
        self.completion = completion
        message = completion.response.get("Message") or "(no message)"
        super().__init__(f"{action} failed: {message}")


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    LOGGED_IN = "logged_in"
    FAILED = "failed"


class AMIClient:
    """One AMI link. Run it with ``await client.run()`` inside a task group; stop it by
    cancelling that task or calling :meth:`close`. ``events`` is the Login's ``Events:``
    header (default :data:`EVENT_CLASSES`)."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        on_event: EventCallback | None = None,
        on_login: LoginCallback | None = None,
        name: str = "pbx1",
        connect_timeout: float = 5.0,
        action_timeout: float = 10.0,
        ping_interval: float = 10.0,
        ping_timeout: float = 5.0,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        rng: random.Random | None = None,
        events: str = EVENT_CLASSES,
    ) -> None:
        self.host, self.port, self.name = host, port, name
        self.events = events
        self._username, self._secret = username, secret
        self._on_event = on_event
        self._on_login = on_login
        self.connect_timeout = connect_timeout
        self.action_timeout = action_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._rng = rng or random.Random()
        self._ids = itertools.count(1)
        self._tracker = ActionTracker()
        self._waiters: dict[str, asyncio.Future[ActionCompletion]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self.state = LinkState.DISCONNECTED
        self.last_error: str | None = None
        self.greeting: str | None = None
        self.logins = 0
        self.last_backoff: float | None = None
        self._logged_in = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()  # wakes a backoff sleep when close() is called

    # -- public API -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state is LinkState.LOGGED_IN

    async def wait_logged_in(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._logged_in.wait()

    async def action(
        self,
        name: str,
        fields: Fields = (),
        *,
        timeout: float | None = None,
        check: bool = True,
    ) -> ActionCompletion:
        """Send one action and wait for its response (and EventList, if any).

        Raises :class:`AMIActionError` on ``Response: Error`` when ``check`` is true.
        """
        if self.state is not LinkState.LOGGED_IN and name != "Login":
            raise AMINotConnected(f"AMI link {self.name} is {self.state.value}; {name} not sent")
        return await self._send(name, fields, timeout=timeout, check=check)

    async def close(self) -> None:
        """Log off politely if possible and close the link; ``run`` then returns."""
        self._closing = True
        self._closed.set()
        if self.state is LinkState.LOGGED_IN:
            with contextlib.suppress(AMIError, OSError):
                await self._send("Logoff", (), timeout=1.0, check=False)
        self._drop_link("client closed")

    async def run(self) -> None:
        """Connect, log in, and keep the link up until cancelled or closed.

        Returns after :meth:`close`. Raises :class:`AMILoginError` on bad credentials.
        """
        attempt = 0
        while not self._closing:
            self.state = LinkState.CONNECTING
            logins = self.logins
            try:
                await self._session()
            except AMILoginError as exc:
                self.state = LinkState.FAILED
                self.last_error = str(exc)
                log.error("ami.login_failed", link=self.name, host=self.host, port=self.port,
                          reason=str(exc))
                raise
            except (OSError, AMIProtocolError, TimeoutError, AMIError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("ami.link_down", link=self.name, host=self.host, port=self.port,
                            reason=self.last_error)
            finally:
                self._drop_link(self.last_error or "session ended")
            if self._closing:
                break
            if self.logins > logins:
                attempt = 0  # the link worked: a fresh drop starts the backoff again
            delay = self.last_backoff = self._backoff(attempt)
            attempt += 1
            log.info("ami.reconnecting", link=self.name, in_s=round(delay, 3), attempt=attempt)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay)
        self.state = LinkState.DISCONNECTED

    # -- internals -------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        cap: float = min(self.reconnect_max, self.reconnect_min * float(2 ** min(attempt, 30)))
        return cap / 2 + self._rng.uniform(0, cap / 2)

    async def _session(self) -> None:
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        if self._closing:  # close() was called while connecting
            writer.close()
            return
        self._writer = writer
        self._tracker = ActionTracker()
        parser = AMIParser()
        reader_task = asyncio.create_task(self._read_loop(reader, parser), name=f"ami-read-{self.name}")
        try:
            await self._login(reader_task)
            self.state = LinkState.LOGGED_IN
            self.logins += 1
            self.last_error = None
            self._logged_in.set()
            log.info("ami.logged_in", link=self.name, host=self.host, port=self.port,
                     greeting=self.greeting)
            ping_task = asyncio.create_task(self._ping_loop(), name=f"ami-ping-{self.name}")
            try:
                if self._on_login is not None:
                    await self._on_login(self)
                done, _ = await asyncio.wait({reader_task, ping_task},
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # re-raise the reason the link ended
            finally:
                ping_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ping_task
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task

    async def _login(self, reader_task: asyncio.Task[None]) -> None:
        login = asyncio.ensure_future(self._send(
            "Login", {"Username": self._username, "Secret": self._secret, "Events": self.events},
            timeout=self.connect_timeout, check=False))
        done, _ = await asyncio.wait({login, reader_task}, return_when=asyncio.FIRST_COMPLETED)
        if login not in done:
            login.cancel()
            with contextlib.suppress(asyncio.CancelledError, AMIError):
                await login
            reader_task.result()
            raise AMILinkLost("connection closed before the Login response")
        completion = login.result()
        if not completion.ok:
            raise AMILoginError(
                f"Asterisk rejected login of user {self._username!r}: "
                f"{completion.response.get('Message') or 'no reason given'}")

    async def _send(self, name: str, fields: Fields, *, timeout: float | None,
                    check: bool) -> ActionCompletion:
        writer = self._writer
        if writer is None:
            raise AMINotConnected(f"AMI link {self.name} is down; {name} not sent")
        action_id = f"ctid-{next(self._ids)}"
        message = build_action(name, action_id, fields)  # validates before registering
        data = serialize(message)
        future: asyncio.Future[ActionCompletion] = asyncio.get_running_loop().create_future()
        self._tracker.register(action_id)
        self._waiters[action_id] = future
        try:
            writer.write(data)
            async with asyncio.timeout(timeout if timeout is not None else self.action_timeout):
                await writer.drain()
                completion = await future
        except TimeoutError:
            raise AMITimeout(f"{name} (ActionID {action_id}) got no response within "
                             f"{timeout if timeout is not None else self.action_timeout}s") from None
        finally:
            self._waiters.pop(action_id, None)
            self._tracker.forget(action_id)
        if check and not completion.ok:
            raise AMIActionError(name, completion)
        return completion

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            try:
                await self._send("Ping", (), timeout=self.ping_timeout, check=True)
            except AMITimeout:
                raise AMILinkLost(f"no pong within {self.ping_timeout}s: link is dead") from None

    async def _read_loop(self, reader: asyncio.StreamReader, parser: AMIParser) -> None:
        try:
            await self._read_all(reader, parser)
        except BaseException as exc:
            # Fail the waiting actions now: the login hook (resync) may be awaiting one,
            # and nothing else would wake it before its timeout.
            self._drop_link(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            raise

    async def _read_all(self, reader: asyncio.StreamReader, parser: AMIParser) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                raise AMILinkLost("Asterisk closed the connection")
            for item in parser.feed(data):
                if isinstance(item, Message):
                    self.receive(item)
                elif isinstance(item, Malformed):
                    log.warning("ami.malformed_frame", link=self.name, reason=item.reason,
                                raw=item.raw[:200].decode("utf-8", "replace"))
                elif isinstance(item, Greeting):
                    self.greeting = item.line

    def receive(self, message: Message) -> None:
        """Handle one parsed message: complete its action, or dispatch it as an event.

        The reader task calls this for every message in wire order; the ingest
        benchmark drives it directly to measure the daemon's real path. While the
        consumer runs, the event is the current one for logging: any line logged then
        gets the event's ``call_id`` (``ctid.logs.add_event_call_id``), at the price of
        one ContextVar set per event instead of splitting every event for its id.
        """
        tracker = self._tracker
        if message.kind is MessageKind.EVENT and not tracker.collecting:
            event = message  # fast path: no list open, nothing to correlate
        else:
            completions, passthrough = tracker.feed(message)
            for completion in completions:
                future = self._waiters.get(completion.action_id)
                if future is not None and not future.done():
                    future.set_result(completion)
            if passthrough is None:
                return
            if not passthrough.is_event:
                log.debug("ami.unmatched_response", link=self.name, action_id=passthrough.action_id)
                return
            event = passthrough
        if self._on_event is None:
            return
        token = CURRENT_EVENT.set(event)
        try:
            self._on_event(event)
        except Exception:
            # A consumer bug must not kill the link; it is logged with the event name.
            log.exception("ami.event_consumer_failed", link=self.name, event=event.name)
        finally:
            CURRENT_EVENT.reset(token)
        if event.parsed and event.defects:
            log.warning("ami.malformed_header", link=self.name, event=event.name, defects=event.defects)

    def _drop_link(self, reason: str) -> None:
        if self.state is not LinkState.FAILED:
            self.state = LinkState.DISCONNECTED
        self._logged_in.clear()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        lost = self._tracker.clear()
        for action_id in lost:
            future = self._waiters.pop(action_id, None)
            if future is not None and not future.done():
                future.set_exception(AMILinkLost(
                    f"AMI link {self.name} dropped ({reason}) before the response to "
                    f"ActionID {action_id}; it was not re-sent"))


_CALL_ID_MARK = "\r\nChanVariable: CTID_CALL_ID="


def call_id_of(message: Message) -> str | None:
    """The ``CTID_CALL_ID`` channel variable an event carries (manager.conf channelvars)."""
    raw = message.raw
    if raw is not None:  # a text search: do not split the headers of every event
        start = raw.find(_CALL_ID_MARK)
        if start < 0:
            return None
        start += len(_CALL_ID_MARK)
        end = raw.find("\r\n", start)
        return (raw[start:] if end < 0 else raw[start:end]) or None
    for key, value in message.headers:
        if key == "ChanVariable" and value.startswith("CTID_CALL_ID="):
            return value[13:] or None
    return None


def describe(completion: ActionCompletion) -> dict[str, Any]:
    """A log-friendly summary of a completion."""
    return {"action_id": completion.action_id, "response": completion.response.name,
            "message": completion.response.get("Message"), "items": len(completion.events)}
