"""The ACD's I/O side: it feeds the pure router and carries out its decisions.

The router (``ctid.acd.router``) decides; the dispatcher tells it what happened and acts,
with the hold-and-redirect pattern of ``dialplans/ctid.conf``:

1. **Queue.** The FastAGI ``inbound`` script calls :meth:`Dispatcher.enqueue_from_agi`
   for a service line that goes to a queue. The dispatcher decides the priority (VIP
   numbers), stores ``__CTID_QUEUE``, ``__CTID_PRIO``, ``__CTID_ENQUEUED`` (epoch
   seconds) and ``CTID_CHECKIN`` on the channel (so a restarted ctid can rebuild the
   queue from the channels), publishes ``call.queued``, and the call waits in
   ``[ctid-hold]``: music on hold with a FastAGI check-in every ``checkin_s``.
2. **Offer.** For each :class:`~ctid.acd.router.Offer`: reserve the agent, publish the
   screen pop ``call.offered`` with ``bus.publish_and_wait`` (bounded) **before** the
   phone rings, wait ``[acd] pop_lead_ms`` (the broker's PUBACK is not the desktop's
   receipt), then ``Setvar`` the target device, ring timeout and Dial options on the
   caller's channel and ``Redirect`` it to ``[ctid-connect]``, which dials the agent.
3. **Outcome.** The agent answers: the call model sees the bridge (``call.answered``) and
   the agent goes ``on_call``. No answer, busy or unavailable: ``[ctid-connect]`` sends
   ``UserEvent(CtidConnect, DialStatus: …)`` and returns the caller to ``[ctid-hold]``;
   the agent goes to ``paused:rona`` and the call back to the *head* of its queue, keeping
   its priority and original enqueue time. The caller hangs up while waiting: the call
   model ends the call (the caller's non-soft ``HangupRequest``: a FastAGI ``HANGUP`` line
   alone is not proof, a Redirect makes one too) and the router forgets it. The call ends
   after an answer: the agent enters wrap-up for the queue's ``wrapup_s`` (0: ready at
   once), ended by the timer or by the desk's ``wrapup`` command.
4. **Timers.** One task sleeps until ``router.next_timer()``; overflow and max-wait
   expiries move the call (another queue keeps the original enqueue time; voicemail and
   the native queue are reached through ``CTID_ROUTE`` at the next check-in).

Agent state is the registry's (``ctid.agents``); the dispatcher mirrors it into the
router from the ``agent.state`` events (:meth:`on_agent_state`): ``ready`` makes the
agent available, any other state except ``reserved``/``on_call`` (which the router
tracks itself) makes it unavailable, ``logged_out`` removes it.

5. **Statistics.** The dispatcher is the ``QueueFigures`` of ``ctid.events.queues``
   (waiting calls, longest current wait, EWT for a new call, base requirement) and feeds
   it the service-level records: an answer with its queue wait, an abandon with its queue
   wait and the queue's ``short_abandon_s``. The queue wait runs from the original
   enqueue time (annotated as ``call.data["enqueued_at"]``, epoch seconds, next to
   ``call.data["queue"]``; the notifier computes ``call.abandoned``'s ``wait_s`` and
   ``short`` from the same two values). The AHT of a queue (talk + wrap-up of each
   handled call, a running mean over the last :data:`AHT_WINDOW` calls) goes to
   ``router.set_aht`` at the end of each wrap-up. Each queue event refreshes the queue's
   snapshot (the snapshotter rate-limits).
6. **Sticky agents.** A queue with ``sticky`` asks ``ctid.acd.history`` for the agent who
   last handled the caller in that queue within ``sticky.days`` while the call is being
   queued (at most 50 ms for the database, else no sticky agent); the answered call's
   agent is annotated as ``call.data["agent_id"]`` (the call record keeps it) and
   remembered in the history's cache when the call ends.
7. **Devices.** ``DeviceStateChange`` of a logged-in agent's device (:meth:`on_ami_event`):
   ``INUSE``/``BUSY``/``RINGINUSE``/``ONHOLD`` make the agent ``busy`` and ``NOT_INUSE``
   idle again, through ``registry.set_busy``, which ignores agents ctid reserved or put on
   a call (so ctid's own calls change nothing). After each AMI login :meth:`on_login`
   reads ``DeviceStateList``: :meth:`known_endpoints` is that set of devices (plus
   devices seen since), for the API's login check, and logged-in agents are re-synced.

Wiring (``ctid.app``): :meth:`wire` attaches the call notifier (short-abandon threshold
lookup), the ``queue.stats`` feed and the database sessions (sticky history); the AMI
consumer must hand ``DeviceStateChange`` to :meth:`on_ami_event`, the login hook must
await :meth:`on_login`, and the API's login takes :meth:`known_endpoints`.

8. **Callback in queue** (``[queues.callback]``, stored by ``ctid.acd.callbacks``). At
   each check-in of a queue with callbacks enabled, the check-in plays
   ``[queues.callback] prompt`` with ``STREAM FILE`` and the callback key as escape digit.
   Pressed: the caller ID, checked by the ``[dialing]`` :class:`DialPolicy` (refused:
   :data:`CALLBACK_REFUSED_PROMPT` and the caller keeps waiting), is stored as a
   callback (``callbacks`` row, written before the caller is released), the check-in
   answers ``CTID_ROUTE=release`` and the live call leaves the queue (its hangup is no
   abandon). An overflow or max-wait target ``callback`` does the same with no key (a
   number that may not be called back goes to the native fallback queue). The callback
   keeps the caller's place: it waits in the router under its own id, with the
   original priority and enqueue time, in the queue's twin ``<queue>~callback`` (same
   requirement, relaxation and policy; no overflow, max wait or sticky hold), so the
   router's global fairness order puts it ahead of calls that arrived later. Its turn:
   reserve the agent, publish ``call.offered`` (``publish_and_wait``, same pop contract;
   ``channel`` is the agent's device, ``uniqueid`` the ``ChannelId`` of the Originate),
   then ``Originate`` (Async) the agent's device into ``[ctid-callback]`` with
   ``__CTID_CALL_ID=<callback id>.<attempt>`` and ``CTID_CALLBACK_NUMBER``; the dialplan
   dials ``PJSIP/<number>@${CTID_TRUNK}``. The customer answers: the call model sees
   the bridge, the agent goes ``on_call`` and the normal answered/ended/wrap-up path
   runs (the callback is ``done``). ``UserEvent CtidCallback`` with another DialStatus:
   the attempt failed, the agent is released, and the callback waits again after
   ``retry_s`` until ``attempts`` are used (``failed``); ``expiry_s`` after it was left
   it ``expired``. The agent does not answer the Originate (the attempt's call ends
   with no CtidCallback, or no channel appears within the ring timeout + 5 s): RONA,
   the callback goes back to the head. At start, open callbacks are loaded from the
   database into the router with their original enqueue time. :meth:`before_changes`
   (called by the app before the call events are built) puts an attempt's call in the
   callback's tenant.

Not built yet (later work of the ACD issue): announcements of position and EWT at the
check-in; the day's service-level counters are not rebuilt from the call records after
a restart. (The native fallback queue's members can follow the logged-in agents:
``ctid.acd.fallback``, ``[acd] sync_fallback_members``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ctid.acd.callbacks import CallbackRecord, CallbackState, CallbackStore, new_callback_id
from ctid.acd.expr import Expression
from ctid.acd.history import StickyHistory, store_query
from ctid.acd.router import Expiry, Offer, Router, RouterError
from ctid.acd.rules import QueueRules, TargetKind
from ctid.agents import AgentRegistry
from ctid.agents.states import AgentStateError
from ctid.asterisk.agi import AGIError, AGISession
from ctid.asterisk.ami import AMIClient, AMIError
from ctid.asterisk.ami_protocol import Message
from ctid.asterisk.safety import (
    DialNumberRejected,
    DialPolicy,
    UnsafeValueError,
    check_device,
    check_originate_variable,
    e164_or_none,
)
from ctid.calls import Call, CallChange, CallModel, CallState, CallStateError, ChangeKind, HangupBy, Role
from ctid.config import CallbackConfig, Config, QueueConfig
from ctid.events.bus import EventBus
from ctid.events.calls import CallNotifier, call_data, queue_wait_s
from ctid.events.queues import QueueStatsFeed
from ctid.events.schema import Event, format_ts

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

AHT_WINDOW: Final = 200
"""The AHT is the mean of the handled calls so far, then a running mean over about this many."""
DEVICE_BUSY: Final = frozenset({"INUSE", "BUSY", "RINGINUSE", "ONHOLD"})
DEVICE_IDLE: Final = frozenset({"NOT_INUSE"})
CALLBACK_CONTEXT: Final = "ctid-callback"
RECOVER_IVR_TIMEOUT_S: Final = 0.5
"""Bound on reading a recovered call's IVR variables from the database at its check-in."""
IVRVariables = Callable[[str], Awaitable[Mapping[str, Any] | None]]
CALLBACK_QUEUE_SUFFIX: Final = "~callback"
"""Callbacks wait in the router in a twin of their queue (same requirement, policy and
relaxation, no overflow, max wait or sticky hold): ``<queue id>~callback``."""
CALLBACK_REFUSED_PROMPT: Final = "invalid"
"""Played when the caller's number may not be called back (the dial allow-list)."""
CALLBACK_ANSWER_GRACE_S: Final = 5.0
"""Beyond the ring timeout: an Originate whose agent leg never appeared is a RONA."""


class RunningMean:
    """The mean of the first ``window`` samples, then an exponential mean of weight ``1/window``."""

    __slots__ = ("count", "mean", "window")

    def __init__(self, window: int = AHT_WINDOW) -> None:
        self.window = window
        self.count = 0
        self.mean = 0.0

    def add(self, sample: float) -> float:
        self.count += 1
        self.mean += (sample - self.mean) / min(self.count, self.window)
        return self.mean


@dataclass(slots=True)
class Waiting:
    """A call ctid routes, from enqueue until it is answered or ends."""

    call_id: str
    queue: str
    tenant: str
    channel: str
    priority: int
    enqueued_at: float
    agent_id: str | None = None  # offered to (ringing), or talking to once answered
    answered: bool = False
    callback: bool = False  # a callback in queue: call_id is the callback id, no live channel
    attempt_call: str | None = None  # the callback's current Originate (its CTID_CALL_ID)
    outcome: str | None = None  # the callback attempt's DialStatus, once reported
    announced_at: float = 0.0  # when the check-in last told the caller position / EWT


class Dispatcher:
    """One Asterisk link's ACD. Construct it, ``await start()``, ``await stop()``."""

    def __init__(self, config: Config, *, client: AMIClient, model: CallModel, agents: AgentRegistry,
                 bus: EventBus, clock: Clock) -> None:
        self._config = config
        self._client = client
        self._model = model
        self._agents = agents
        self._bus = bus
        self._clock = clock
        self.rules: dict[str, QueueRules] = {q.id: QueueRules.from_config(q) for q in config.queues}
        self.router = Router(self._now)
        self._calls: dict[str, Waiting] = {}
        self._wrapups: dict[str, tuple[str, asyncio.TimerHandle | None]] = {}  # agent -> (call, timer)
        self._tasks: set[asyncio.Task[None]] = set()
        self._exits: dict[str, str] = {}  # call -> CTID_ROUTE for its next check-in (left the queue)
        self._in_router: set[str] = set()  # agents the router knows (logged in)
        self._wake = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self.offers = 0
        self.ronas = 0
        self._feed: QueueStatsFeed | None = None
        self.history = StickyHistory(None, self._now)
        self._aht: dict[str, RunningMean] = {}
        self._handled: dict[str, tuple[str, float, float]] = {}  # agent -> (queue, talk_s, ended at)
        self._endpoints: set[str] | None = None  # devices from DeviceStateList (+ seen since)
        self._device_states: dict[str, str] = {}
        self.abandons = 0
        dialing = config.dialing
        self.policy = DialPolicy(dialing.allowed_prefixes, denied_prefixes=dialing.denied_prefixes,
                                 default_country_code=dialing.default_country_code)
        self.callbacks = CallbackStore(None)
        self._callbacks: dict[str, CallbackRecord] = {}  # open callbacks by id
        self._cb_rules: dict[str, QueueRules] = {}  # queue id -> its callback twin's rules
        self._cb_timers: dict[str, asyncio.TimerHandle] = {}  # callback -> retry or expiry timer
        self._attempts: dict[str, str] = {}  # an attempt's call id -> its callback id
        self.callbacks_refused = 0
        self._surveyed: set[str] = set()  # calls whose channel has CTID_AFTER=survey
        self._ivr_variables: IVRVariables | None = None

    def _now(self) -> float:
        return self._clock().timestamp()

    # -- lifetime ----------------------------------------------------------------------

    async def start(self) -> None:
        self._timer_task = asyncio.create_task(self._timer_loop(), name="acd-timers")
        await self.load_callbacks()

    def wire(self, *, notifier: CallNotifier | None = None, stats: QueueStatsFeed | None = None,
             sessions: async_sessionmaker[AsyncSession] | None = None,
             ivr_variables: IVRVariables | None = None) -> None:
        """Attach the parts the app owns: the notifier gets the short-abandon thresholds,
        the ``queue.stats`` feed reads this dispatcher's figures, the sticky history
        queries the call records through ``sessions``, and ``ivr_variables(call_id)``
        gives a recovered call back the variables its IVR collected (for its pop)."""
        if ivr_variables is not None:
            self._ivr_variables = ivr_variables
        if notifier is not None:
            notifier.set_short_abandon(self.short_abandon_s)
        if stats is not None:
            self._feed = stats
            stats.attach(self)
        if sessions is not None:
            self.history = StickyHistory(store_query(sessions), self._now, bound_s=self.history.bound_s)
            self.callbacks = CallbackStore(sessions)

    async def stop(self) -> None:
        await self.history.close()
        if self._timer_task is not None:
            self._timer_task.cancel()
            await asyncio.gather(self._timer_task, return_exceptions=True)
        for _, timer in self._wrapups.values():
            if timer is not None:
                timer.cancel()
        for handle in self._cb_timers.values():
            handle.cancel()
        self._cb_timers.clear()
        saves = [t for t in self._tasks if t.get_name().startswith(("callback-save-", "callback-add-"))]
        if saves:  # the callbacks' last writes: they must survive the restart
            await asyncio.wait(saves, timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def offers_in_flight(self) -> int:
        """Offers started and not finished (the pop sent, the Setvar/Redirect pending)."""
        return sum(1 for task in self._tasks if task.get_name().startswith("offer-"))

    def update_rules(self, config: Config) -> None:
        """A reload: new and changed queues apply to calls queued from now on; calls
        already waiting keep the rules they were queued with."""
        self._config = config
        self.rules = {q.id: QueueRules.from_config(q) for q in config.queues}
        self._cb_rules.clear()
        dialing = config.dialing
        self.policy = DialPolicy(dialing.allowed_prefixes, denied_prefixes=dialing.denied_prefixes,
                                 default_country_code=dialing.default_country_code)

    def waiting(self, call_id: str) -> Waiting | None:
        return self._calls.get(call_id)

    # -- entry -------------------------------------------------------------------------

    async def enqueue_from_agi(self, session: AGISession, call_id: str, queue_id: str, tenant: str, *,
                               priority: int | None = None) -> str:
        """Queue the call of this FastAGI session; returns the ``CTID_ROUTE`` to set.

        ``priority`` (0-9, from the IVR) wins over the queue's own (VIP list, default)."""
        rules = self.rules[queue_id]
        target = rules.entry_target(self.router.depth(queue_id))
        if target is not None:
            log.info("acd.queue_refused", queue=queue_id, reason="closed" if rules.closed else "full",
                     action=str(target.kind))
            return _route_for(target.kind)
        caller = session.env.get("agi_callerid")
        e164 = e164_or_none(caller or "")
        if priority is None:
            priority = rules.priority_for(e164)
        enqueued = self._now()
        channel = session.channel or ""
        checkin = str(max(1, min(10, round(rules.checkin_s))))  # the dialplan reads whole seconds, 1..10
        # The sticky lookup (bounded) runs while the channel variables are set.
        sticky = self._sticky_lookup(rules, tenant, caller, e164)
        try:
            for name, value in (("__CTID_QUEUE", queue_id), ("__CTID_PRIO", str(priority)),
                                ("__CTID_ENQUEUED", f"{enqueued:.3f}"), ("CTID_CHECKIN", checkin)):
                await session.set_variable(name, value)
        except BaseException:
            if sticky is not None:
                sticky.cancel()
            raise
        sticky_agent = await sticky if sticky is not None else None
        if sticky_agent is not None:
            # Only an agent of this tenant who can take the call is worth waiting for.
            agent = self._agents.get(sticky_agent) if sticky_agent in self._agents else None
            if agent is None or agent.tenant != tenant or not rules.requires.matches(dict(agent.config.skills)):
                sticky_agent = None
        self.enqueue(call_id, queue_id, tenant, channel, priority, enqueued, reason="entered",
                      sticky_agent=sticky_agent)
        return "hold"

    def _sticky_lookup(self, rules: QueueRules, tenant: str, caller: str | None,
                       e164: str | None) -> asyncio.Task[str | None] | None:
        if rules.sticky is None:
            return None
        key = StickyHistory.caller_key(e164, caller)
        if key is None:
            return None
        numbers = tuple(dict.fromkeys(n for n in (e164, caller) if n))
        return asyncio.create_task(self.history.lookup(tenant, rules.queue_id, key, numbers, rules.sticky.window_s),
                                   name=f"sticky-{rules.queue_id}")

    def enqueue(self, call_id: str, queue_id: str, tenant: str, channel: str, priority: int, enqueued: float,
                 *, reason: str, head: bool = False, sticky_agent: str | None = None) -> None:
        """Put a call with a live channel in ``[ctid-hold]`` into a queue (entry, overflow,
        RONA, a transfer to a queue by call control) and publish ``call.queued``."""
        waiting = Waiting(call_id, queue_id, tenant, channel, priority, enqueued)
        self._calls[call_id] = waiting
        self.router.enqueue(call_id, self.rules[queue_id], priority, enqueued_at=enqueued, head=head,
                            sticky_agent=sticky_agent)
        if sticky_agent is not None:
            log.info("acd.sticky", call_id=call_id, queue=queue_id, agent_id=sticky_agent)
        call = self._model.get(call_id)
        if call is not None:
            with contextlib.suppress(CallStateError):
                self._model.mark(call_id, CallState.QUEUED)
            self._model.annotate(call_id, data={"queue": queue_id, "priority": priority,
                                                "enqueued_at": round(enqueued, 3)})
        self._publish_queued(waiting, reason)
        self._kick()
        self._refresh(queue_id)

    def _publish_queued(self, waiting: Waiting, reason: str) -> None:
        call = self._model.get(waiting.call_id)
        data = call_data(call) if call is not None else {}
        data.update({"state": "queued", "queue": waiting.queue, "priority": waiting.priority,
                     "position": self.router.position(waiting.call_id) if self.router.is_waiting(waiting.call_id)
                     else None,
                     "ewt_s": self.router.ewt(waiting.call_id), "reason": reason})
        self._bus.publish(Event("call.queued", waiting.tenant, self._clock(), data, call_id=waiting.call_id,
                                queue=waiting.queue))

    async def checkin(self, session: AGISession) -> None:
        """``agi://ctid/checkin?call_id=...`` from ``[ctid-hold]``: keep holding, or leave."""
        call_id = (session.query.get("call_id") or [""])[0]
        waiting = self._calls.get(call_id)
        if waiting is None and call_id not in self._exits:
            waiting = await self._recover(session, call_id)
        route = self._exits.pop(call_id, None)
        if route is None:
            if waiting is None:
                route = "fallback"  # ctid does not know this call and cannot recover it
            else:
                route = "hold"
                if self.router.is_waiting(call_id):
                    self.router.refresh(call_id)
                    self._kick()
                    self._refresh(waiting.queue)  # the longest wait moves on
                    await self._announce(session, waiting)
                if self._callback_offered(waiting) and await self._callback_choice(session, waiting):
                    route = "release"
        with contextlib.suppress(AGIError, UnsafeValueError):
            await session.set_variable("CTID_ROUTE", route)

    async def _announce(self, session: AGISession, waiting: Waiting) -> None:
        """Position and EWT, at most every ``announce_every_s`` per caller: "you are next" /
        "there are N calls waiting", "the estimated hold time is N minutes" (app_queue's
        sounds). A key or a Redirect (the offer) cuts it short; failures are ignored."""
        config = self._queue_config(waiting.queue)
        now = self._now()
        if config is None or not config.announce or now - waiting.announced_at < config.announce_every_s:
            return
        waiting.announced_at = now
        prompts = announcement(self.router.position(waiting.call_id) if "position" in config.announce else None,
                               self.router.ewt(waiting.call_id) if "ewt" in config.announce else None)
        try:
            for prompt in prompts:
                await session.send_command("STREAM FILE", prompt, "")
                if session.hung_up:
                    return
        except (AGIError, UnsafeValueError):
            return

    def _callback_offered(self, waiting: Waiting) -> bool:
        config = self._callback_config(waiting.queue)
        return (config is not None and config.enabled and not waiting.callback and waiting.agent_id is None
                and self.router.is_waiting(waiting.call_id))

    async def _callback_choice(self, session: AGISession, waiting: Waiting) -> bool:
        """The check-in of a queue with callbacks: the prompt, with the callback key as its
        escape digit. Pressed: the callback is stored and the caller released (True)."""
        config = self._callback_config(waiting.queue)
        assert config is not None
        try:
            reply = await session.send_command("STREAM FILE", config.prompt, config.dtmf)
        except (AGIError, UnsafeValueError):
            return False
        if reply.result != str(ord(config.dtmf)):
            return False
        if self._calls.get(waiting.call_id) is not waiting or not self.router.is_waiting(waiting.call_id):
            return False  # offered (or gone) meanwhile: the offer wins
        caller = session.env.get("agi_callerid") or ""
        try:
            number = self.policy.check(caller)
        except DialNumberRejected as exc:
            self.callbacks_refused += 1
            log.warning("acd.callback_refused", call_id=waiting.call_id, queue=waiting.queue, reason=exc.reason)
            with contextlib.suppress(AGIError, UnsafeValueError):
                await session.send_command("STREAM FILE", CALLBACK_REFUSED_PROMPT, "")
            return False
        record = self._new_callback(waiting, number)
        try:
            await self.callbacks.add(record)
        except Exception:  # the database is down: the caller keeps waiting on the line
            log.exception("acd.callback_store_failed", call_id=waiting.call_id)
            return False
        if self._calls.get(waiting.call_id) is not waiting or not self.router.is_waiting(waiting.call_id):
            record.state = "expired"
            record.last_status = "superseded"
            self._spawn(self.callbacks.save(record), f"callback-save-{record.id}")
            return False
        self._to_callback(waiting, record, reason="dtmf")
        return True

    def queue_info(self, tenant: str, kind: str, queue_id: str) -> float | int | None:
        """For the IVR's conditions: ``ewt`` (seconds a call joining ``queue_id`` now at
        its default priority would wait; None when unknown) or ``waiting`` (calls
        waiting). None for a queue of another tenant or an unknown one."""
        rules = self.rules.get(queue_id)
        if rules is None or rules.tenant != tenant:
            return None
        if kind == "waiting":
            return self.router.depth(queue_id)
        ewt = self.router.queue_ewt(rules, rules.priority)
        return None if ewt is None else round(ewt, 1)

    async def _pop_lead(self) -> None:
        """``[acd] pop_lead_ms`` between the pop and the ring (see :class:`AcdConfig`)."""
        lead = self._config.acd.pop_lead_ms
        if lead > 0:
            await asyncio.sleep(lead / 1000)

    def survey_flow(self, queue_id: str) -> str | None:
        """The queue's post-call survey flow (None: no survey, or an unknown queue)."""
        queue = self._queue_config(queue_id)
        return None if queue is None else queue.survey_flow

    def _queue_config(self, queue_id: str) -> QueueConfig | None:
        for queue in self._config.queues:
            if queue.id == queue_id:
                return queue
        return None

    async def callback_from_ivr(self, call_id: str, tenant: str, queue_id: str, number: str,
                                priority: int | None = None) -> str | None:
        """The IVR's ``callback`` node: store a callback for ``number`` in ``queue_id``
        (its place: now). None when stored, else why it was refused (the caller is still
        on the line and hears so). Works whether or not the queue offers callbacks at its
        check-ins (``[queues.callback] enabled``); their retry and expiry settings apply."""
        if queue_id not in self.rules or self._callback_config(queue_id) is None:
            return f"unknown queue {queue_id!r}"
        try:
            checked = self.policy.check(number)
        except DialNumberRejected as exc:
            self.callbacks_refused += 1
            log.warning("acd.callback_refused", call_id=call_id, queue=queue_id, reason=exc.reason)
            return exc.reason
        rules = self.rules[queue_id]
        now = self._now()
        record = CallbackRecord(new_callback_id(), tenant, queue_id, call_id, checked,
                                rules.priority_for(e164_or_none(checked)) if priority is None else priority,
                                now, now, next_attempt_at=now, updated_at=now)
        try:
            await self.callbacks.add(record)
        except Exception:  # the database is down: the IVR fails over, the caller is not lost
            log.exception("acd.callback_store_failed", call_id=call_id)
            return "the callback could not be stored"
        with contextlib.suppress(LookupError):
            self._model.annotate(call_id, data={"callback_id": record.id})
        log.info("acd.callback_left", call_id=call_id, callback_id=record.id, queue=queue_id, reason="ivr")
        self._open_callback(record)
        self._refresh(queue_id)
        return None

    # -- callback in queue -----------------------------------------------------------------

    def _callback_config(self, queue_id: str) -> CallbackConfig | None:
        queue = self._queue_config(queue_id)
        return None if queue is None else queue.callback

    def _callback_rules(self, queue_id: str) -> QueueRules:
        rules = self._cb_rules.get(queue_id)
        if rules is None:
            rules = dataclasses.replace(self.rules[queue_id], queue_id=queue_id + CALLBACK_QUEUE_SUFFIX,
                                        overflow=None, max_wait_s=None, sticky=None)
            self._cb_rules[queue_id] = rules
            # A callback keeps its place: live callers behind it count it in their
            # position and EWT.
            self.router.share_line(queue_id, rules.queue_id)
        return rules

    def _new_callback(self, waiting: Waiting, number: str) -> CallbackRecord:
        now = self._now()
        return CallbackRecord(new_callback_id(), waiting.tenant, waiting.queue, waiting.call_id, number,
                              waiting.priority, waiting.enqueued_at, now, next_attempt_at=now, updated_at=now)

    def _to_callback(self, waiting: Waiting, record: CallbackRecord, *, reason: str) -> None:
        """The caller left a number: the live call leaves the queue (its hangup is no
        abandon) and the callback takes its place (priority, original enqueue time)."""
        if self._calls.get(waiting.call_id) is waiting:
            del self._calls[waiting.call_id]
        self.router.dequeue(waiting.call_id)
        with contextlib.suppress(LookupError):
            self._model.annotate(waiting.call_id, data={"callback_id": record.id})
        log.info("acd.callback_left", call_id=waiting.call_id, callback_id=record.id, queue=waiting.queue,
                 reason=reason)
        self._open_callback(record)
        self._refresh(waiting.queue)

    def _open_callback(self, record: CallbackRecord) -> None:
        """Track an open callback: waiting in the router now, or at its next attempt."""
        config = self._callback_config(record.queue)
        if record.queue not in self.rules or config is None:
            log.warning("acd.callback_unknown_queue", callback_id=record.id, queue=record.queue)
            return
        self._callbacks[record.id] = record
        now = self._now()
        if now >= record.expires_at(config.expiry_s):
            self._close_callback(record, "expired")
            return
        record.state = "waiting"
        if record.next_attempt_at > now:
            self._arm(record.id, record.next_attempt_at - now, self._retry_callback)
        else:
            self._queue_callback(record)

    def _queue_callback(self, record: CallbackRecord) -> None:
        config = self._callback_config(record.queue)
        if config is None or record.queue not in self.rules:  # the queue was removed by a reload
            record.last_status = "queue_removed"
            self._close_callback(record, "failed")
            return
        self._calls[record.id] = Waiting(record.id, record.queue, record.tenant, "", record.priority,
                                         record.enqueued_at, callback=True)
        self.router.enqueue(record.id, self._callback_rules(record.queue), record.priority,
                            enqueued_at=record.enqueued_at)
        self._arm(record.id, max(0.0, record.expires_at(config.expiry_s) - self._now()), self._expire_callback)
        self._kick()

    def _arm(self, callback_id: str, delay: float, action: Callable[[str], None]) -> None:
        old = self._cb_timers.pop(callback_id, None)
        if old is not None:
            old.cancel()
        self._cb_timers[callback_id] = asyncio.get_running_loop().call_later(delay, action, callback_id)

    def _retry_callback(self, callback_id: str) -> None:
        self._cb_timers.pop(callback_id, None)
        record = self._callbacks.get(callback_id)
        if record is not None and record.open and callback_id not in self._calls:
            self._queue_callback(record)

    def _expire_callback(self, callback_id: str) -> None:
        self._cb_timers.pop(callback_id, None)
        record = self._callbacks.get(callback_id)
        waiting = self._calls.get(callback_id)
        if record is None:
            return
        if waiting is not None and waiting.agent_id is not None:
            return  # being served: the outcome decides
        if waiting is not None:
            del self._calls[callback_id]
            self.router.dequeue(callback_id)
            self._kick()
        self._close_callback(record, "expired")

    def _close_callback(self, record: CallbackRecord, state: CallbackState) -> None:
        record.state = state
        record.updated_at = self._now()
        self._callbacks.pop(record.id, None)
        handle = self._cb_timers.pop(record.id, None)
        if handle is not None:
            handle.cancel()
        log.info("acd.callback_closed", callback_id=record.id, queue=record.queue, state=state,
                 attempts=record.attempts, last_status=record.last_status)
        self._spawn(self.callbacks.save(record), f"callback-save-{record.id}")

    async def load_callbacks(self) -> int:
        """At start: the open callbacks stored in the database wait again, in their place."""
        try:
            records = await self.callbacks.open_callbacks()
        except Exception:
            log.exception("acd.callback_load_failed")
            return 0
        for record in records:
            if record.id not in self._callbacks:
                self._open_callback(record)
        if records:
            log.info("acd.callbacks_loaded", callbacks=len(records))
        return len(records)

    def callback(self, callback_id: str) -> CallbackRecord | None:
        """An open callback (None once it is done, failed or expired)."""
        return self._callbacks.get(callback_id)

    def open_callbacks(self) -> list[CallbackRecord]:
        return list(self._callbacks.values())

    async def _offer_callback(self, offer: Offer, waiting: Waiting) -> None:
        """A callback's turn: reserve the agent, pop, then Originate the agent's device
        into ``[ctid-callback]``, which dials the customer."""
        record = self._callbacks.get(offer.call_id)
        rules = self.rules.get(waiting.queue)
        if record is None or rules is None:  # closed meanwhile
            self._calls.pop(offer.call_id, None)
            self.router.dequeue(offer.call_id)
            self._kick()
            return
        agent = self._agents.get(offer.agent_id)
        device = agent.device or ""
        try:
            check_device(device, None)
        except UnsafeValueError:
            log.error("acd.bad_device", agent_id=offer.agent_id, device=device)
            self.router.offer_done(offer.call_id, offer.agent_id, answered=False)
            self._kick()
            return
        # One call id per Originate (a RONA'd Originate's call id is spent): the attempt
        # number, then a random tag.
        attempt = f"{record.id}.{record.attempts + 1}.{secrets.token_hex(3)}"
        base: dict[str, Any] = {"direction": "outbound", "state": "offered",
                                "caller": {"number": record.number, "name": None, "e164": record.number},
                                "dnis": record.number, "service_line": None}
        waiting.agent_id = offer.agent_id
        waiting.outcome = None
        try:
            self._agents.reserve(offer.agent_id, offer.call_id, waiting.queue, base)
        except AgentStateError as exc:
            log.warning("acd.reserve_refused", agent_id=offer.agent_id, reason=str(exc))
            waiting.agent_id = None
            self.router.offer_done(offer.call_id, offer.agent_id, answered=False)
            self._kick()
            return
        self.offers += 1
        waiting.attempt_call = attempt
        self._attempts[attempt] = record.id
        record.state = "dialing"
        record.updated_at = self._now()
        self._spawn(self.callbacks.save(record), f"callback-save-{record.id}")
        pop = dict(base)
        line = next((s for s in self._config.service_lines if s.queue == waiting.queue), None)
        # No caller channel yet: the pop names the agent's device and the Uniqueid that
        # the Originate gives the agent's channel (ChannelId).
        uniqueid = f"{attempt}.agent"
        pop.update({"queue": waiting.queue, "priority": offer.priority, "wait_s": round(offer.wait_s, 3),
                    "ivr": {}, "crm": None, "crm_error": None,
                    "recording": {"policy": line.recording if line else "never"},
                    "channel": device, "uniqueid": uniqueid,
                    "ring_timeout_s": rules.ring_timeout_s, "device": device,
                    "callback": {"id": record.id, "number": record.number, "attempt": record.attempts + 1,
                                 "original_call_id": record.call_id}})
        await self._bus.publish_and_wait(Event("call.offered", waiting.tenant, self._clock(), pop,
                                               call_id=offer.call_id, agent_id=offer.agent_id,
                                               queue=waiting.queue))
        await self._pop_lead()
        try:
            variables = [check_originate_variable(name, value) for name, value in (
                ("__CTID_CALL_ID", attempt), ("CTID_CALLBACK_NUMBER", record.number),
                ("CTID_TRUNK", self._config.dialing.trunk), ("__CTID_TENANT", record.tenant),
                ("__CTID_QUEUE", record.queue))]
            await self._client.action("Originate", [
                ("Channel", device), ("ChannelId", uniqueid), ("Context", CALLBACK_CONTEXT), ("Exten", "s"),
                ("Priority", "1"),
                ("Timeout", str(int(rules.ring_timeout_s * 1000))), ("Async", "true"),
                ("CallerID", f"<{record.number}>"), *(("Variable", v) for v in variables)])
        except (AMIError, UnsafeValueError) as exc:
            log.warning("acd.callback_originate_failed", callback_id=record.id, agent_id=offer.agent_id,
                        reason=str(exc))
            self._callback_rona(waiting, "originate_failed")
            return
        log.info("acd.callback_offered", callback_id=record.id, agent_id=offer.agent_id, queue=waiting.queue,
                 attempt=attempt)
        self._spawn(self._callback_watchdog(waiting, attempt, rules.ring_timeout_s + CALLBACK_ANSWER_GRACE_S),
                    f"callback-watch-{attempt}")

    async def _callback_watchdog(self, waiting: Waiting, attempt: str, after: float) -> None:
        """The Originate's agent leg never showed up (unreachable device): a RONA."""
        await asyncio.sleep(after)
        if (waiting.attempt_call == attempt and waiting.agent_id is not None and not waiting.answered
                and waiting.outcome is None and self._model.get(attempt) is None
                and self._calls.get(waiting.call_id) is waiting):
            self._callback_rona(waiting, "no_channel")

    def _callback_rona(self, waiting: Waiting, why: str) -> None:
        """The agent did not take the callback's Originate: paused, the callback back to the head."""
        agent_id, waiting.agent_id = waiting.agent_id, None
        waiting.attempt_call = None
        if agent_id is None:
            return
        self.ronas += 1
        log.info("acd.rona", call_id=waiting.call_id, agent_id=agent_id, dial_status=why)
        with contextlib.suppress(AgentStateError):
            self._agents.rona(agent_id, waiting.call_id)
        with contextlib.suppress(RouterError):
            self.router.offer_done(waiting.call_id, agent_id, answered=False)
        record = self._callbacks.get(waiting.call_id)
        config = self._callback_config(waiting.queue)
        if record is not None and config is not None and self._now() >= record.expires_at(config.expiry_s):
            self._calls.pop(waiting.call_id, None)
            self.router.dequeue(waiting.call_id)
            self._close_callback(record, "expired")
        elif record is not None:
            record.state = "waiting"
            self._spawn(self.callbacks.save(record), f"callback-save-{record.id}")
        self._kick()

    def _callback_outcome(self, waiting: Waiting, status: str) -> None:
        """``UserEvent CtidCallback``: the customer's leg was dialled. ANSWER: done (the
        call model reports the answer); else the attempt failed: retry, or give up."""
        record = self._callbacks.get(waiting.call_id)
        if record is None or waiting.outcome is not None:
            return
        waiting.outcome = status
        if status == "ANSWER":
            return
        record.attempts += 1
        record.last_status = status
        record.updated_at = now = self._now()
        agent_id, waiting.agent_id = waiting.agent_id, None
        del self._calls[waiting.call_id]
        self.router.dequeue(waiting.call_id)  # frees the agent's router slot
        if agent_id is not None:
            with contextlib.suppress(AgentStateError):
                self._agents.release(agent_id, waiting.call_id)
        config = self._callback_config(record.queue)
        log.info("acd.callback_attempt_failed", callback_id=record.id, attempt=record.attempts, dial_status=status)
        if config is None or record.attempts >= config.attempts:
            self._close_callback(record, "failed")
        elif now + config.retry_s >= record.expires_at(config.expiry_s):
            self._close_callback(record, "expired")
        else:
            record.state = "waiting"
            record.next_attempt_at = now + config.retry_s
            self._spawn(self.callbacks.save(record), f"callback-save-{record.id}")
            self._arm(record.id, config.retry_s, self._retry_callback)
        self._kick()
        self._refresh(record.queue)

    def _callback_answered(self, waiting: Waiting) -> None:
        record = self._callbacks.get(waiting.call_id)
        if record is None:
            return
        record.attempts += 1
        record.last_status = "ANSWER"
        self._close_callback(record, "done")

    def before_changes(self, changes: list[CallChange]) -> None:
        """Before the call events are built (``ctid.app``): a callback attempt's call is
        in the callback's tenant, with the queue's data."""
        for change in changes:
            if change.kind not in (ChangeKind.STARTED, ChangeKind.REKEYED):
                continue
            # Until the channel's CTID_CALL_ID is seen, the call is keyed by its Linkedid:
            # the Uniqueid the Originate gave it (``<attempt>.agent``).
            callback_id = self._attempts.get(change.call_id.removesuffix(".agent"))
            if callback_id is None:
                continue
            record = self._callbacks.get(callback_id)
            if record is not None:
                with contextlib.suppress(LookupError):
                    self._model.annotate(change.call_id, tenant=record.tenant, data={
                        "queue": record.queue, "priority": record.priority,
                        "enqueued_at": round(record.enqueued_at, 3), "callback_id": record.id})

    async def _recover(self, session: AGISession, call_id: str) -> Waiting | None:
        """A call in ``[ctid-hold]`` that this ctid does not know (it restarted): rebuild
        it from the channel variables ctid set itself."""
        try:
            queue_id = await session.get_variable("CTID_QUEUE") or ""
            prio = await session.get_variable("CTID_PRIO") or ""
            enqueued = await session.get_variable("CTID_ENQUEUED") or ""
            tenant = await session.get_variable("CTID_TENANT") or ""
        except AGIError:
            return None
        if queue_id not in self.rules or not prio.isdigit() or not call_id:
            log.warning("acd.recover_failed", call_id=call_id, queue=queue_id)
            return None
        try:
            enqueued_at = float(enqueued)
        except ValueError:
            enqueued_at = self._now()
        await self._recover_ivr(call_id)
        self.enqueue(call_id, queue_id, tenant or self.rules[queue_id].tenant, session.channel or "",
                      int(prio), enqueued_at, reason="recovered")
        log.info("acd.recovered", call_id=call_id, queue=queue_id)
        return self._calls.get(call_id)

    async def _recover_ivr(self, call_id: str) -> None:
        """The IVR's variables of a recovered call, from its stored flow run (bounded: the
        check-in must stay short; without them the pop's ``ivr`` is empty)."""
        if self._ivr_variables is None or self._model.get(call_id) is None:
            return
        try:
            async with asyncio.timeout(RECOVER_IVR_TIMEOUT_S):
                variables = await self._ivr_variables(call_id)
        except Exception as exc:  # the database is slow or down
            log.warning("acd.recover_ivr_failed", call_id=call_id, reason=f"{type(exc).__name__}: {exc}")
            return
        if variables:
            with contextlib.suppress(LookupError):
                self._model.annotate(call_id, data={"ivr": variables})

    # -- decisions ---------------------------------------------------------------------

    def _kick(self) -> None:
        """Something changed: match now, and re-arm the timer task."""
        self._make_offers()
        self._wake.set()

    def _make_offers(self) -> None:
        """Carry out the router's decisions: one offer task per (call, agent) pair."""
        for offer in self.router.match():
            self._spawn(self._offer(offer), f"offer-{offer.call_id}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("acd.task_failed", task=task.get_name(), error=repr(task.exception()))

    async def _offer(self, offer: Offer) -> None:
        waiting = self._calls.get(offer.call_id)
        if waiting is not None and waiting.callback:
            await self._offer_callback(offer, waiting)
            return
        call = self._model.get(offer.call_id)
        if waiting is None or call is None or not call.active:
            self.router.dequeue(offer.call_id)
            self._kick()
            return
        rules = self.rules[offer.queue_id]
        agent = self._agents.get(offer.agent_id)
        device = agent.device or ""
        try:
            check_device(device, None)
        except UnsafeValueError:
            log.error("acd.bad_device", agent_id=offer.agent_id, device=device)
            self.router.offer_done(offer.call_id, offer.agent_id, answered=False)
            self._kick()
            return
        waiting.agent_id = offer.agent_id
        base = call_data(call)
        try:
            self._agents.reserve(offer.agent_id, offer.call_id, offer.queue_id, base)
        except AgentStateError as exc:
            log.warning("acd.reserve_refused", agent_id=offer.agent_id, reason=str(exc))
            self.router.offer_done(offer.call_id, offer.agent_id, answered=False)
            self._kick()
            return
        with contextlib.suppress(CallStateError):
            self._model.mark(offer.call_id, CallState.OFFERED)
        self.offers += 1
        self._refresh(offer.queue_id)
        line = next((s for s in self._config.service_lines if s.id == call.service_line), None)
        caller_leg = call.leg(Role.CALLER)
        pop = dict(base)
        pop.update({
            "state": "offered", "queue": offer.queue_id, "priority": offer.priority,
            "wait_s": round(offer.wait_s, 3), "ivr": dict(call.data.get("ivr") or {}),
            "crm": call.data.get("crm"), "crm_error": call.data.get("crm_error"),
            "recording": {"policy": line.recording if line else "never"},
            "channel": caller_leg.channel if caller_leg else waiting.channel,
            "uniqueid": caller_leg.uniqueid if caller_leg else None,
            "ring_timeout_s": rules.ring_timeout_s, "device": device, "callback": None,
        })
        event = Event("call.offered", waiting.tenant, self._clock(), pop, call_id=offer.call_id,
                      agent_id=offer.agent_id, queue=offer.queue_id)
        # The pop goes out, and is acknowledged by the broker, before the phone rings.
        await self._bus.publish_and_wait(event)
        await self._pop_lead()
        try:
            channel = waiting.channel
            variables = [("CTID_TARGET", device), ("CTID_RING_TIMEOUT", f"{rules.ring_timeout_s:g}"),
                         ("CTID_DIAL_OPTS", "t")]
            # Post-call survey: set for a queue with one, cleared when a call that had it
            # moves to a queue without (one Setvar fewer for every other offer).
            if self.survey_flow(offer.queue_id) is not None:
                variables.append(("CTID_AFTER", "survey"))
                self._surveyed.add(offer.call_id)
            elif offer.call_id in self._surveyed:
                variables.append(("CTID_AFTER", ""))
                self._surveyed.discard(offer.call_id)
            for name, value in variables:
                await self._client.action("Setvar", {"Channel": channel, "Variable": name, "Value": value})
            await self._client.action("Redirect", {"Channel": channel, "Context": "ctid-connect", "Exten": "s",
                                                   "Priority": "1"})
            log.info("acd.offered", call_id=offer.call_id, agent_id=offer.agent_id, queue=offer.queue_id,
                     wait_s=round(offer.wait_s, 3))
        except (AMIError, UnsafeValueError) as exc:
            # The channel is gone (the caller hung up) or the link dropped: release the agent.
            log.warning("acd.offer_failed", call_id=offer.call_id, agent_id=offer.agent_id, reason=str(exc))
            self._withdraw(offer.call_id)

    def _withdraw(self, call_id: str) -> None:
        waiting = self._calls.get(call_id)
        if waiting is None or waiting.agent_id is None or waiting.answered:
            return
        agent_id, waiting.agent_id = waiting.agent_id, None
        with contextlib.suppress(AgentStateError):
            self._agents.release(agent_id, call_id)
        self.router.dequeue(call_id)
        self._calls.pop(call_id, None)
        self._kick()

    # -- outcomes from AMI ---------------------------------------------------------------

    def on_ami_event(self, event: Message) -> None:
        if event.name == "DeviceStateChange":
            self._device_state(event.get("Device") or "", event.get("State") or "")
            return
        if event.name != "UserEvent":
            return
        if event.may_contain("CtidCallback") and event.get("UserEvent") == "CtidCallback":
            callback_id = self._attempts.get(event.get("CallID") or "")
            waiting = self._calls.get(callback_id) if callback_id is not None else None
            if waiting is not None and waiting.callback and waiting.attempt_call == event.get("CallID"):
                self._callback_outcome(waiting, event.get("DialStatus") or "")
            return
        if not event.may_contain("CtidConnect") or event.get("UserEvent") != "CtidConnect":
            return
        call_id = event.get("CallID") or ""
        status = event.get("DialStatus") or ""
        waiting = self._calls.get(call_id)
        if waiting is None or waiting.agent_id is None or waiting.answered or status == "ANSWER":
            return
        # Ring, no answer (or busy, unavailable): the agent pauses, the call goes back to the head.
        agent_id, waiting.agent_id = waiting.agent_id, None
        self.ronas += 1
        log.info("acd.rona", call_id=call_id, agent_id=agent_id, dial_status=status)
        with contextlib.suppress(AgentStateError):
            self._agents.rona(agent_id, call_id)
        with contextlib.suppress(RouterError):
            self.router.offer_done(call_id, agent_id, answered=False)
        with contextlib.suppress(CallStateError):
            self._model.mark(call_id, CallState.QUEUED)
        self._publish_queued(waiting, "rona")
        self._kick()
        self._refresh(waiting.queue)

    def on_changes(self, changes: list[CallChange]) -> None:
        for change in changes:
            if change.kind is ChangeKind.ENDED and self._surveyed:
                self._surveyed.discard(change.call_id)
            waiting = self._calls.get(change.call_id)
            if waiting is None and change.old_call_id:
                waiting = self._calls.get(change.old_call_id)
            if waiting is None:
                callback_id = self._attempts.get(change.call_id)
                waiting = self._calls.get(callback_id) if callback_id is not None else None
                if waiting is None or waiting.attempt_call != change.call_id:
                    if change.kind is ChangeKind.ENDED:
                        self._attempts.pop(change.call_id, None)
                    continue
            elif waiting.callback:
                continue  # a callback is reached only through its attempt's call id
            if change.kind is ChangeKind.ANSWERED and waiting.agent_id is not None and not waiting.answered:
                if waiting.callback:
                    self._callback_answered(waiting)
                waiting.answered = True
                with contextlib.suppress(RouterError):
                    self.router.offer_done(waiting.call_id, waiting.agent_id, answered=True)
                with contextlib.suppress(AgentStateError):
                    self._agents.answer(waiting.agent_id, waiting.call_id)
                if change.call.active:
                    with contextlib.suppress(LookupError):
                        self._model.annotate(change.call.call_id, data={"agent_id": waiting.agent_id})
                wait = queue_wait_s(change.call)
                if wait is None:
                    wait = max(0.0, self._now() - waiting.enqueued_at)
                if self._feed is not None:
                    self._feed.record_answered(waiting.queue, waiting.tenant, self._clock(), wait)
                log.info("acd.answered", call_id=waiting.call_id, agent_id=waiting.agent_id)
                self._refresh(waiting.queue)
            elif change.kind is ChangeKind.ENDED:
                self.end_waiting(waiting, change.call)

    def end_waiting(self, waiting: Waiting, call: Call) -> None:
        """A routed call ended (from the model's changes, or call control's hangup):
        release or wrap up its agent, close its callback attempt, count an abandon."""
        if waiting.attempt_call is not None:
            self._attempts.pop(waiting.attempt_call, None)
        if waiting.callback and not waiting.answered:
            if self._calls.get(waiting.call_id) is not waiting:
                return  # the failed attempt was handled at its CtidCallback
            if waiting.outcome is None:
                # No answer and no CtidCallback outcome: the agent did not take the
                # Originate (or hung up before the customer answered).
                self._callback_rona(waiting, "agent_no_answer")
                return
            # CtidCallback said ANSWER but the bridge was never seen: done, the agent is free.
            agent_id, waiting.agent_id = waiting.agent_id, None
            del self._calls[waiting.call_id]
            self.router.dequeue(waiting.call_id)
            if agent_id is not None:
                with contextlib.suppress(AgentStateError):
                    self._agents.release(agent_id, waiting.call_id)
            self._callback_answered(waiting)
            self._kick()
            return
        self._calls.pop(waiting.call_id, None)
        rules = self.rules.get(waiting.queue)
        if not waiting.answered:
            # Abandoned while waiting or ringing: the router forgets it; a reserved agent is freed.
            self.router.dequeue(waiting.call_id)
            if waiting.agent_id is not None:
                with contextlib.suppress(AgentStateError):
                    self._agents.release(waiting.agent_id, waiting.call_id)
            if call.hangup_by is HangupBy.CALLER and self._feed is not None and rules is not None:
                wait = queue_wait_s(call)
                if wait is None:
                    wait = max(0.0, self._now() - waiting.enqueued_at)
                self.abandons += 1
                self._feed.record_abandoned(waiting.queue, waiting.tenant, self._clock(), wait,
                                            rules.short_abandon_s)
            self._kick()
            self._refresh(waiting.queue)
            return
        agent_id = waiting.agent_id
        if agent_id is None or rules is None:
            return
        ended = (call.ended_at or self._clock()).timestamp()
        talk = max(0.0, ended - call.answered_at.timestamp()) if call.answered_at is not None else 0.0
        self._handled[agent_id] = (waiting.queue, talk, ended)
        caller = StickyHistory.caller_key(e164_or_none(call.caller_number or ""), call.caller_number)
        if caller is not None:
            self.history.remember(waiting.tenant, waiting.queue, caller, agent_id, ended)
        with contextlib.suppress(AgentStateError):
            self._agents.hangup(agent_id, waiting.call_id, call_data(call))
        with contextlib.suppress(RouterError):
            self.router.call_ended(agent_id, wrapup=True)
        if rules.wrapup_s <= 0:
            self._end_wrapup(agent_id, waiting.call_id, completed_by="timeout")
            return
        timer = asyncio.get_running_loop().call_later(rules.wrapup_s, self._end_wrapup, agent_id,
                                                      waiting.call_id, "timeout")
        self._wrapups[agent_id] = (waiting.call_id, timer)

    def _end_wrapup(self, agent_id: str, call_id: str, completed_by: str) -> None:
        entry = self._wrapups.pop(agent_id, None)
        if entry is not None and entry[1] is not None:
            entry[1].cancel()
        with contextlib.suppress(AgentStateError):
            self._agents.wrapup_done(agent_id, call_id, completed_by=completed_by)

    # -- agents --------------------------------------------------------------------------

    def on_agent_state(self, event: Event) -> None:
        """Mirror an ``agent.state`` event into the router."""
        agent_id = event.agent_id
        if agent_id is None:
            return
        state = event.data.get("state")
        if state in ("ready", "paused", "logged_out") and agent_id in self._handled:
            self._handle_time(agent_id)
        if state == "ready" and event.data.get("previous") == "logged_out":
            device = event.data.get("device")
            if isinstance(device, str) and self._device_states.get(device) in DEVICE_BUSY:
                # Logged in to a phone that is already on a call: busy once this event is out.
                try:
                    asyncio.get_running_loop().call_soon(self._device_state, device, self._device_states[device])
                except RuntimeError:  # no loop (a synchronous caller): at once
                    self._device_state(device, self._device_states[device])
        known = agent_id in self._in_router
        if state == "logged_out":
            if known:
                self.router.remove_agent(agent_id)
                self._in_router.discard(agent_id)
            entry = self._wrapups.pop(agent_id, None)
            if entry is not None and entry[1] is not None:
                entry[1].cancel()
            self._kick()
            return
        if not known:
            config = self._agents.get(agent_id).config
            self.router.add_agent(agent_id, dict(config.skills), max_calls=config.max_calls)
            self._in_router.add(agent_id)
        if state == "ready":
            self._wrapups.pop(agent_id, None)
            self.router.set_agent_ready(agent_id, True)
        elif state in ("paused", "busy", "wrap_up"):
            self.router.set_agent_ready(agent_id, False)
        self._kick()

    def _handle_time(self, agent_id: str) -> None:
        """A handled call's wrap-up ended: talk + wrap-up is one AHT sample of its queue."""
        queue_id, talk, ended = self._handled.pop(agent_id)
        sample = talk + max(0.0, self._now() - ended)
        if sample <= 0:
            return
        mean = self._aht.setdefault(queue_id, RunningMean()).add(sample)
        with contextlib.suppress(ValueError):
            self.router.set_aht(queue_id, mean)
        self._refresh(queue_id)

    def aht_s(self, queue_id: str) -> float | None:
        """The measured AHT of a queue (None until a handled call's wrap-up ended)."""
        mean = self._aht.get(queue_id)
        return None if mean is None or mean.count == 0 else mean.mean

    # -- devices ---------------------------------------------------------------------------

    async def on_login(self, client: AMIClient | None = None) -> None:
        """After each AMI login: ``DeviceStateList`` gives the known devices and their states."""
        client = client or self._client
        try:
            listing = await client.action("DeviceStateList")
        except AMIError as exc:
            log.warning("acd.device_list_failed", reason=str(exc))
            return
        states: dict[str, str] = {}
        for item in listing.events:
            device = item.get("Device")
            if device:
                states[device] = item.get("State") or ""
        self._endpoints = set(states)
        log.info("acd.devices", devices=len(states))
        for device, state in states.items():
            self._device_state(device, state)

    def known_endpoints(self) -> frozenset[str] | None:
        """The devices Asterisk knows (``DeviceStateList`` at the last login, plus devices
        seen in ``DeviceStateChange`` since), for ``registry.login``; None before the first
        list, when only the device pattern can be checked."""
        return None if self._endpoints is None else frozenset(self._endpoints)

    def device_state(self, device: str) -> str | None:
        return self._device_states.get(device)

    def _device_state(self, device: str, state: str) -> None:
        if not device:
            return
        self._device_states[device] = state
        if self._endpoints is not None:
            self._endpoints.add(device)
        agent = self._agents.agent_for_device(device)
        if agent is None:
            return
        if state in DEVICE_BUSY:
            busy = True
        elif state in DEVICE_IDLE:
            busy = False
        else:
            return
        try:
            self._agents.set_busy(agent.id, busy)  # ignored while ctid reserved it or it is on ctid's call
        except LookupError:
            return

    # -- queue figures (ctid.events.queues.QueueFigures) ----------------------------------------

    def queue_ids(self) -> list[tuple[str, str]]:
        return [(queue_id, rules.tenant) for queue_id, rules in self.rules.items()]

    def requirement(self, queue_id: str) -> Expression | None:
        rules = self.rules.get(queue_id)
        return None if rules is None else rules.requires

    def sl_threshold_s(self, queue_id: str) -> float:
        rules = self.rules.get(queue_id)
        return 20.0 if rules is None else rules.sl_threshold_s

    def short_abandon_s(self, queue_id: str) -> float | None:
        rules = self.rules.get(queue_id)
        return None if rules is None else rules.short_abandon_s

    def waiting_count(self, queue_id: str) -> int:
        return self.router.depth(queue_id)

    def longest_wait_s(self, queue_id: str) -> float:
        """The wait of the oldest call waiting in the queue, callbacks in queue included
        (they wait in its twin, ``queue_id + CALLBACK_QUEUE_SUFFIX``); 0 when none is.
        Read from the router's ordered keys: the stats refresh on every queue event must
        not walk every waiting call."""
        found = [at for at in (self.router.oldest_enqueued_at(queue_id),
                               self.router.oldest_enqueued_at(queue_id + CALLBACK_QUEUE_SUFFIX)) if at is not None]
        return max(0.0, self._now() - min(found)) if found else 0.0

    def ewt_s(self, queue_id: str) -> float | None:
        rules = self.rules.get(queue_id)
        if rules is None:
            return None
        try:
            return self.router.queue_ewt(rules, rules.priority)
        except RouterError:
            return None

    def _refresh(self, queue_id: str) -> None:
        rules = self.rules.get(queue_id)
        if self._feed is None or rules is None:
            return
        try:
            self._feed.refresh_queue(queue_id, rules.tenant, self._clock())
        except Exception:  # statistics must never break routing
            log.exception("acd.stats_failed", queue=queue_id)

    # -- timers --------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            self._wake.clear()
            at = self.router.next_timer()
            delay = None if at is None else max(0.0, at - self._now())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            now = self._now()
            for expiry in self.router.fire_timers(now):
                self._expired(expiry)
            self._make_offers()

    def _expired(self, expiry: Expiry) -> None:
        waiting = self._calls.get(expiry.call_id)
        if waiting is None:
            return
        rules = self.rules[expiry.queue_id]
        target = rules.exit_target(expiry.wait_s, None)
        if target is None:
            target = rules.max_wait_action if expiry.reason == "max_wait" else None
        if target is not None and target.kind == "queue" and target.queue in self.rules:
            # Overflow to another queue keeps the original enqueue time.
            self._calls.pop(expiry.call_id, None)
            log.info("acd.overflow", call_id=expiry.call_id, from_queue=expiry.queue_id, to_queue=target.queue)
            self.enqueue(expiry.call_id, target.queue, waiting.tenant, waiting.channel, waiting.priority,
                          waiting.enqueued_at, reason="overflow")
            return
        if target is not None and target.kind == "callback" and self._overflow_to_callback(waiting):
            self._exits[expiry.call_id] = "release"
            return
        route = _route_for(target.kind) if target is not None else "fallback"
        self._calls.pop(expiry.call_id, None)
        self._exits[expiry.call_id] = route
        self._refresh(expiry.queue_id)
        log.info("acd.leaves_queue", call_id=expiry.call_id, queue=expiry.queue_id, reason=expiry.reason,
                 route=route)


    def _overflow_to_callback(self, waiting: Waiting) -> bool:
        """Overflow (or max wait) to ``callback``: the caller ID becomes the callback
        number, the caller is released at the next check-in. False: the number may not
        be called back (the call goes to the native fallback queue)."""
        call = self._model.get(waiting.call_id)
        try:
            number = self.policy.check(call.caller_number or "" if call is not None else "")
        except DialNumberRejected as exc:
            self.callbacks_refused += 1
            log.warning("acd.callback_refused", call_id=waiting.call_id, queue=waiting.queue, reason=exc.reason)
            return False
        if self._callback_config(waiting.queue) is None:
            return False
        record = self._new_callback(waiting, number)
        self._spawn(self.callbacks.add(record), f"callback-add-{record.id}")
        self._to_callback(waiting, record, reason="overflow")
        return True


def _route_for(kind: TargetKind) -> str:
    """The ``CTID_ROUTE`` for a target that is not a ctid queue. A callback whose number
    cannot be called back is served by the native fallback queue instead (logged)."""
    return {"voicemail": "voicemail", "hangup": "release"}.get(kind, "fallback")


def wall_clock() -> datetime:
    return datetime.now(UTC)


__all__ = ["Dispatcher", "Waiting", "format_ts"]


def number_prompts(n: int) -> list[str]:
    """An integer 0-999 as Asterisk's English ``digits/*`` sounds (as ``SayNumber``)."""
    n = max(0, min(999, n))
    if n < 20:
        return [f"digits/{n}"]
    out: list[str] = []
    if n >= 100:
        out += [f"digits/{n // 100}", "digits/hundred"]
        n %= 100
        if n == 0:
            return out
    if n < 20:
        return [*out, f"digits/{n}"]
    out.append(f"digits/{n // 10 * 10}")
    if n % 10:
        out.append(f"digits/{n % 10}")
    return out


def announcement(position: int | None, ewt_s: float | None) -> list[str]:
    """The check-in's announcement: position 1 is "you are next"; otherwise "there are
    N calls waiting" (the calls ahead, as app_queue says it); EWT in whole minutes,
    "less than 1 minute" under a minute; nothing for what is unknown."""
    prompts: list[str] = []
    if position is not None:
        if position <= 1:
            prompts.append("queue-youarenext")
        else:
            prompts += ["queue-thereare", *number_prompts(position - 1), "queue-callswaiting"]
    if ewt_s is not None:
        minutes = math.ceil(ewt_s / 60)
        if ewt_s < 60:
            prompts += ["queue-holdtime", "queue-less-than", *number_prompts(1), "queue-minute"]
        else:
            prompts += ["queue-holdtime", *number_prompts(minutes), "queue-minutes"]
    return prompts
