"""Call control over the API: hold, resume, transfers, click-to-dial and hangup.

The REST routes (``POST /api/v1/calls/{call_id}/hold`` ...) and the websocket ops of
the same names call :class:`CallControl`; it checks who may act, checks the call's
state, sends the AMI actions, marks the call model and publishes the events.

Who may act (:class:`Actor`): an agent on the calls it handles (the dispatcher's
agent of the call, or the agent who placed a click-to-dial call), supervisors and
integrations on any call of their tenant, admins on any call. Order of checks: the
call exists (404), the actor may act on it (403), then the state (409, with the
call's current ``state``). A refused command sends nothing to Asterisk.

Designs, with ``dialplans/ctid.conf``:

* **Hold** is a dual ``Redirect`` (capture 15): the caller to ``ctid-onhold,s,1``
  (music), the agent leg to ``ctid-onhold,agent,1`` (silence). The call is marked
  ``held`` and ``call.held`` published. **Resume** is the AMI ``Bridge`` action
  (``Channel1`` caller, ``Channel2`` agent); ``call.resumed`` is published when the
  model sees both legs bridged again (``held -> connected``). While the call is on
  hold, ctid moves the survivor when one leg hangs up: the agent hung up -> the
  caller goes back to its queue (``ctid-hold,s,1``, requeued); the caller hung up ->
  the agent leg is hung up.
* **Blind transfer** (``BlindTransfer`` on the agent leg, capture 06b) to an
  extension of ``dialing.transfer_context``, or to an external number checked by
  the :class:`~ctid.asterisk.safety.DialPolicy` (the caller is sent to
  ``ctid-outbound`` with ``CTID_DIAL_NUMBER``). ``queue:<id>`` redirects the caller
  to ``ctid-hold`` and re-enters ctid's routing, keeping the original enqueue time
  when ``dialing.keep_enqueue_time`` is true.
* **Attended transfer**: AMI ``Atxfer`` on the agent leg (capture 06c); the agent
  completes it by hanging up. It needs the ``atxfer`` feature code and the Dial
  option ``t``/``T`` on the agent's leg.
* **Click-to-dial**: ``Originate`` of the agent's device into ``ctid-outbound,s,1``
  with ``__CTID_CALL_ID``, ``CTID_DIAL_NUMBER`` and ``CTID_TRUNK`` (capture 17). The
  agent's device counts as busy until the call ends.
* **Hangup**: AMI ``Hangup`` of every live leg (counted as ctid's hangup).

The agent of a transferred call is released into wrap-up when ctid transfers it
away (its part of the call is over, though the call goes on). A ``Redirect`` (or
another action) that finds a channel already gone hangs up what is left of the call
and reconciles the model with ``CoreShowChannels``: the call ends cleanly and the
dispatcher releases the agent.

The dispatcher (``ctid.acd.dispatcher``) has no public hooks for "the agent's part
of the call is over" and "queue this call again"; this module uses its
``_ended``/``_enqueue`` until it does (see :class:`_Acd`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import structlog

from ctid.acd.dispatcher import Dispatcher
from ctid.agents import AgentRegistry, UnknownAgentError
from ctid.agents.states import AgentState, AgentStateError
from ctid.asterisk.ami import AMIActionError, AMIClient, AMIError
from ctid.asterisk.safety import (
    DialNumberRejected,
    DialPolicy,
    UnsafeValueError,
    check_device,
    check_extension,
    check_id,
    check_originate_variable,
)
from ctid.calls import Call, CallChange, CallModel, CallState, CallStateError, ChangeKind, Role
from ctid.config import Config
from ctid.events.calls import call_data
from ctid.events.schema import Event

__all__ = ["Actor", "CallControl", "ControlError", "mask_number"]

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
OnChanges = Callable[[list[CallChange]], None]

ONHOLD_CONTEXT: Final = "ctid-onhold"
HOLD_CONTEXT: Final = "ctid-hold"
OUTBOUND_CONTEXT: Final = "ctid-outbound"
QUEUE_PREFIX: Final = "queue:"
#: Agent states a click-to-dial may start from.
_DIAL_FROM: Final = frozenset({AgentState.READY, AgentState.PAUSED})
_GONE_HINTS: Final = ("does not exist", "no such channel")


class ControlError(Exception):
    """A refused call-control command: HTTP status, a stable code, extra fields."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks: ``role`` is agent, supervisor, integration or admin; ``tenant`` None
    only for admin; ``agent_id`` for an agent; ``name`` for logs and ``by_id``."""

    role: str
    tenant: str | None
    agent_id: str | None = None
    name: str = ""

    @property
    def by_id(self) -> str | None:
        return self.agent_id if self.role == "agent" else (self.name or None)


def mask_number(number: str) -> str:
    """``+15551234567`` -> ``+1555***4567``: enough to recognise, not to dial."""
    if len(number) <= 6:
        return "*" * len(number)
    return number[:5] + "***" + number[-4:]


def _gone(exc: AMIError) -> bool:
    return isinstance(exc, AMIActionError) and any(h in str(exc).lower() for h in _GONE_HINTS)


class CallControl:
    """Call control on one Asterisk link (the dispatcher's)."""

    def __init__(self, config: Config, *, client: AMIClient, model: CallModel, dispatcher: Dispatcher,
                 agents: AgentRegistry, bus: Any, clock: Clock, on_changes: OnChanges | None = None) -> None:
        dialing = config.dialing
        self._config = config
        self._client = client
        self._model = model
        self._acd = dispatcher
        self._agents = agents
        self._bus = bus
        self._clock = clock
        self._on_changes = on_changes
        self.policy = DialPolicy(dialing.allowed_prefixes, denied_prefixes=dialing.denied_prefixes,
                                 default_country_code=dialing.default_country_code)
        self._outbound: dict[str, str] = {}  # click-to-dial call -> agent
        self._dialling: dict[str, str] = {}  # agent device -> tenant, until its originated leg appears
        self._resuming: dict[str, Actor] = {}  # call -> who asked for the resume
        self._transferred_by: dict[str, tuple[str, str]] = {}  # call -> (agent, agent channel) released on hangup
        self._requeued: set[str] = set()  # calls put back into routing by a transfer or hold survivor
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused_numbers = 0

    @property
    def model(self) -> CallModel:
        return self._model

    # -- lookups and checks --------------------------------------------------------------

    def agent_of(self, call_id: str) -> str | None:
        """The agent who handles the call (routed, or placed by click-to-dial)."""
        waiting = self._acd.waiting(call_id)
        if waiting is not None and waiting.agent_id is not None:
            return waiting.agent_id
        if call_id in self._outbound:
            return self._outbound[call_id]
        for agent in self._agents:
            if call_id in agent.calls:
                return agent.id
        return None

    def _call(self, call_id: str, by: Actor) -> Call:
        try:
            check_id(call_id, "call_id")
        except UnsafeValueError:
            raise ControlError(404, "not_found", "unknown call") from None
        call = self._model.get(call_id)
        if call is None:
            raise ControlError(404, "not_found", f"unknown call {call_id!r}")
        if by.role != "admin" and call.tenant != by.tenant:
            raise ControlError(403, "forbidden", f"call {call_id!r} is not in your tenant")
        if by.role == "agent" and (by.agent_id is None or self.agent_of(call_id) != by.agent_id):
            raise ControlError(403, "forbidden", "an agent may act only on its own calls")
        if not call.active:
            raise ControlError(409, "wrong_state", f"call {call_id} has ended", state=call.state.value)
        return call

    @staticmethod
    def _need(call: Call, *states: CallState) -> None:
        if call.state not in states:
            raise ControlError(409, "wrong_state",
                               f"call {call.call_id} is {call.state.value}, needs {'/'.join(s.value for s in states)}",
                               state=call.state.value)

    @staticmethod
    def _legs(call: Call) -> tuple[str, str]:
        caller = call.leg(Role.CALLER, live=True)
        agent = call.leg(Role.AGENT, live=True)
        if caller is None or agent is None:
            raise ControlError(409, "wrong_state", f"call {call.call_id} has no caller and agent leg both up",
                               state=call.state.value)
        return caller.channel, agent.channel

    def _mark(self, call_id: str, state: CallState) -> None:
        try:
            changes = self._model.mark(call_id, state)
        except CallStateError as exc:
            raise ControlError(409, "wrong_state", str(exc), state=exc.old.value) from None
        if changes and self._on_changes is not None:
            self._on_changes(changes)

    def _publish(self, type_: str, call: Call, by: Actor | None, **extra: Any) -> None:
        data = call_data(call)
        data.update(extra)
        data["by"] = by.role if by is not None else "ctid"
        data["by_id"] = by.by_id if by is not None else None
        waiting = self._acd.waiting(call.call_id)
        self._bus.publish(Event(type_, call.tenant, self._clock(), data, call_id=call.call_id,
                                agent_id=self.agent_of(call.call_id),
                                queue=waiting.queue if waiting is not None else None))

    async def _action(self, call: Call, name: str, fields: list[tuple[str, str]]) -> None:
        """Send an action about ``call``; a channel already gone ends what is left of it."""
        try:
            await self._client.action(name, fields)
        except AMIError as exc:
            if _gone(exc):
                log.warning("control.channel_gone", call_id=call.call_id, action=name, reason=str(exc))
                await self._end_remains(call)
                raise ControlError(409, "gone", f"the call's channel is gone ({exc}); the call was ended",
                                   state=CallState.ENDED.value) from None
            log.warning("control.action_failed", call_id=call.call_id, action=name, reason=str(exc))
            raise ControlError(502, "asterisk_error", f"Asterisk refused {name}: {exc}") from None

    async def _end_remains(self, call: Call) -> None:
        """Hang up the legs still up, then reconcile the model with what Asterisk has."""
        for leg in list(call.active_legs):
            self._model.expect_hangup(leg.channel)
            with contextlib.suppress(AMIError):
                await self._client.action("Hangup", [("Channel", leg.channel)])
        try:
            self._model.begin_resync()
            listing = await self._client.action("CoreShowChannels")
            for item in listing.events:
                self._model.resync_channel(item)
        finally:
            changes = self._model.end_resync()
        if changes and self._on_changes is not None:
            self._on_changes(changes)

    def _release_agent(self, call: Call) -> None:
        """The agent's part of the call is over (transferred away): wrap-up starts."""
        waiting = self._acd.waiting(call.call_id)
        if waiting is not None and waiting.answered and waiting.agent_id is not None:
            self._acd.end_waiting(waiting, call)
        agent_id = self._outbound.pop(call.call_id, None)
        if agent_id is not None:
            self._agents.set_busy(agent_id, False)

    # -- hold and resume -----------------------------------------------------------------

    async def hold(self, call_id: str, by: Actor) -> dict[str, Any]:
        call = self._call(call_id, by)
        self._need(call, CallState.CONNECTED)
        caller, agent = self._legs(call)
        await self._action(call, "Redirect", [
            ("Channel", caller), ("Context", ONHOLD_CONTEXT), ("Exten", "s"), ("Priority", "1"),
            ("ExtraChannel", agent), ("ExtraContext", ONHOLD_CONTEXT), ("ExtraExten", "agent"),
            ("ExtraPriority", "1")])
        self._mark(call_id, CallState.HELD)
        self._publish("call.held", call, by)
        log.info("control.held", call_id=call_id, by=by.name)
        return self._result(call)

    async def resume(self, call_id: str, by: Actor) -> dict[str, Any]:
        call = self._call(call_id, by)
        self._need(call, CallState.HELD)
        caller, agent = self._legs(call)
        self._resuming[call_id] = by
        try:
            await self._action(call, "Bridge", [("Channel1", caller), ("Channel2", agent)])
        except ControlError:
            self._resuming.pop(call_id, None)
            raise
        log.info("control.resumed", call_id=call_id, by=by.name)
        return self._result(call)

    # -- transfers -----------------------------------------------------------------------

    async def blind_transfer(self, call_id: str, target: str, by: Actor) -> dict[str, Any]:
        call = self._call(call_id, by)
        if not isinstance(target, str) or not target:
            raise ControlError(400, "bad_request", "'target' is required", field="target")
        if target.startswith(QUEUE_PREFIX):
            return await self._to_queue(call, target[len(QUEUE_PREFIX):], by)
        self._need(call, CallState.CONNECTED)
        caller, agent = self._legs(call)
        number = self._number_or_none(target)
        if number is not None:
            shown = mask_number(number)
            await self._action(call, "Setvar", [("Channel", caller), ("Variable", "CTID_DIAL_NUMBER"),
                                                ("Value", number)])
            await self._action(call, "Setvar", [("Channel", caller), ("Variable", "CTID_TRUNK"),
                                                ("Value", self._config.dialing.trunk)])
            context, exten = OUTBOUND_CONTEXT, "s"
        else:
            try:
                exten = check_extension(target, "target")
            except UnsafeValueError as exc:
                raise ControlError(400, "bad_request", str(exc), field="target") from None
            context, shown = self._config.dialing.transfer_context, exten
        self._mark(call.call_id, CallState.TRANSFERRING)
        self._model.expect_hangup(agent)
        await self._action(call, "BlindTransfer", [("Channel", agent), ("Context", context), ("Exten", exten)])
        self._release_agent(call)
        self._publish("call.transferred", call, by, kind="blind", target=shown)
        log.info("control.transferred", call_id=call.call_id, kind="blind", target=shown, by=by.name)
        return self._result(call)

    def _number_or_none(self, target: str) -> str | None:
        """An external number (checked by the dial policy), or None for an extension."""
        digits = target.lstrip("+")
        if not (target.startswith("+") or target.startswith("00") or (digits.isdigit() and len(digits) >= 7)):
            return None
        return self._check_number(target)

    def _check_number(self, number: str) -> str:
        try:
            return self.policy.check(number)
        except DialNumberRejected as exc:
            if exc.reason == "prefix":
                self.refused_numbers += 1
                log.warning("control.number_refused", number=mask_number(number.strip()))
                raise ControlError(403, "number_not_allowed", "the number is not on the dialing allow-list",
                                   field="number") from None
            raise ControlError(400, "bad_request", "not a dialable number", field="number") from None

    async def _to_queue(self, call: Call, queue_id: str, by: Actor | None) -> dict[str, Any]:
        rules = self._acd.rules.get(queue_id)
        if rules is None or (by is not None and by.role != "admin" and rules.tenant != by.tenant):
            raise ControlError(404, "not_found", f"unknown queue {queue_id!r}", field="target")
        self._need(call, CallState.CONNECTED, CallState.HELD)
        caller_leg = call.leg(Role.CALLER, live=True)
        if caller_leg is None:
            raise ControlError(409, "wrong_state", "the caller is gone", state=call.state.value)
        await self._requeue(call, caller_leg.channel, queue_id, by)
        return self._result(call)

    async def _requeue(self, call: Call, caller: str, queue_id: str, by: Actor | None) -> None:
        rules = self._acd.rules[queue_id]
        waiting = self._acd.waiting(call.call_id)
        now = self._clock().timestamp()
        priority = waiting.priority if waiting is not None else rules.priority
        keep = self._config.dialing.keep_enqueue_time and waiting is not None
        enqueued = waiting.enqueued_at if keep and waiting is not None else now
        checkin = str(max(1, min(10, round(rules.checkin_s))))
        for name, value in (("__CTID_QUEUE", queue_id), ("__CTID_PRIO", str(priority)),
                            ("__CTID_ENQUEUED", f"{enqueued:.3f}"), ("CTID_CHECKIN", checkin)):
            await self._action(call, "Setvar", [("Channel", caller), ("Variable", name), ("Value", value)])
        was_held = call.state is CallState.HELD
        self._mark(call.call_id, CallState.TRANSFERRING)
        agent = call.leg(Role.AGENT, live=True)
        if agent is not None:
            self._model.expect_hangup(agent.channel)
        await self._action(call, "Redirect", [("Channel", caller), ("Context", HOLD_CONTEXT), ("Exten", "s"),
                                              ("Priority", "1")])
        if agent is not None and was_held:
            # On hold the agent leg sits in ctid-onhold: nothing hangs it up for us.
            with contextlib.suppress(AMIError):
                await self._client.action("Hangup", [("Channel", agent.channel)])
        self._publish("call.transferred", call, by, kind="queue", target=queue_id)
        self._release_agent(call)
        self._requeued.add(call.call_id)
        self._acd.enqueue(call.call_id, queue_id, call.tenant, caller, priority, enqueued,
                           reason="transfer")
        log.info("control.transferred", call_id=call.call_id, kind="queue", target=queue_id,
                 kept_enqueue_time=keep, by=by.name if by else "ctid")

    async def attended_transfer(self, call_id: str, exten: str, by: Actor) -> dict[str, Any]:
        call = self._call(call_id, by)
        if not isinstance(exten, str) or not exten:
            raise ControlError(400, "bad_request", "'exten' is required", field="exten")
        try:
            check_extension(exten, "exten")
        except UnsafeValueError as exc:
            raise ControlError(400, "bad_request", str(exc), field="exten") from None
        self._need(call, CallState.CONNECTED)
        _, agent = self._legs(call)
        agent_id = self.agent_of(call_id)
        await self._action(call, "Atxfer", [("Channel", agent), ("Context", self._config.dialing.transfer_context),
                                            ("Exten", exten)])
        self._mark(call_id, CallState.TRANSFERRING)
        if agent_id is not None:
            self._transferred_by[call_id] = (agent_id, agent)
        self._publish("call.transferred", call, by, kind="attended", target=exten)
        log.info("control.transferred", call_id=call_id, kind="attended", target=exten, by=by.name)
        return self._result(call)

    # -- click-to-dial and hangup --------------------------------------------------------

    async def dial(self, agent_id: str, number: str, by: Actor) -> dict[str, Any]:
        try:
            agent = self._agents.get(agent_id)
        except UnknownAgentError:
            raise ControlError(404, "not_found", f"unknown agent {agent_id!r}") from None
        if by.role == "agent" and by.agent_id != agent.id:
            raise ControlError(403, "forbidden", "an agent may dial only for itself")
        if by.role != "admin" and agent.tenant != by.tenant:
            raise ControlError(403, "forbidden", f"agent {agent_id!r} is not in your tenant")
        if not isinstance(number, str) or not number:
            raise ControlError(400, "bad_request", "'number' is required (a string)", field="number")
        e164 = self._check_number(number)
        if agent.state not in _DIAL_FROM or not agent.device:
            raise ControlError(409, "wrong_state", f"agent {agent.id} is {agent.state.value}",
                               state=agent.state.value)
        device = check_device(agent.device, None)
        call_id = uuid.uuid4().hex
        variables = [check_originate_variable(name, value) for name, value in (
            ("__CTID_CALL_ID", call_id), ("CTID_DIAL_NUMBER", e164), ("CTID_TRUNK", self._config.dialing.trunk))]
        self._outbound[call_id] = agent.id
        self._dialling[device] = agent.tenant
        self._agents.set_busy(agent.id, True)
        try:
            await self._client.action("Originate", [
                ("Channel", device), ("Context", OUTBOUND_CONTEXT), ("Exten", "s"), ("Priority", "1"),
                ("Timeout", "30000"), ("Async", "true"), ("CallerID", f"<{e164}>"),
                *(("Variable", v) for v in variables)])
        except AMIError as exc:
            self._outbound.pop(call_id, None)
            self._dialling.pop(device, None)
            self._agents.set_busy(agent.id, False)
            raise ControlError(502, "asterisk_error", f"Asterisk refused the Originate: {exc}") from None
        self._spawn(self._expire_dial(call_id, device, 40.0))
        log.info("control.dial", call_id=call_id, agent_id=agent.id, number=mask_number(e164), by=by.name)
        return {"call_id": call_id, "agent_id": agent.id, "number": e164, "direction": "outbound"}

    async def _expire_dial(self, call_id: str, device: str, after: float) -> None:
        """An Originate whose agent leg never appeared (device unreachable): free the agent."""
        await asyncio.sleep(after)
        if call_id in self._outbound and self._model.get(call_id) is None:
            self._dialling.pop(device, None)
            self._agents.set_busy(self._outbound.pop(call_id), False)

    async def hangup(self, call_id: str, by: Actor) -> dict[str, Any]:
        call = self._call(call_id, by)
        legs = list(call.active_legs)
        if not legs:
            raise ControlError(409, "wrong_state", "no live leg", state=call.state.value)
        for leg in legs:
            self._model.expect_hangup(leg.channel)
        for leg in legs:
            with contextlib.suppress(AMIError):  # a leg already gone is fine: the call ends anyway
                await self._client.action("Hangup", [("Channel", leg.channel)])
        log.info("control.hangup", call_id=call_id, by=by.name)
        return self._result(call)

    def _result(self, call: Call) -> dict[str, Any]:
        return {"call_id": call.call_id, "state": call.state.value, "agent_id": self.agent_of(call.call_id)}

    # -- what the model reports ----------------------------------------------------------

    def before_changes(self, changes: list[CallChange]) -> None:
        """From the daemon before the events are built: a click-to-dial call's first leg
        (the agent's device) puts the call in the agent's tenant."""
        if not self._dialling:
            return
        for change in changes:
            if change.kind is not ChangeKind.STARTED or not change.call.legs:
                continue
            channel = change.call.legs[0].channel
            device = channel.rsplit("-", 1)[0]
            tenant = self._dialling.pop(device, None)
            if tenant is not None:
                self._model.annotate(change.call_id, tenant=tenant)

    def on_changes(self, changes: list[CallChange]) -> None:
        """From the daemon after the dispatcher: survivors of a hold, resumes, releases."""
        answered = {c.call_id for c in changes if c.kind is ChangeKind.ANSWERED}
        for change in changes:
            call = change.call
            if change.kind is ChangeKind.LEG_ENDED and change.leg is not None:
                self._leg_ended(call, change)
            elif change.kind is ChangeKind.STATE and change.new_state is CallState.CONNECTED:
                by = self._resuming.pop(change.call_id, None)
                if change.old_state is CallState.HELD:
                    self._publish("call.resumed", call, by)
                if (change.old_state is CallState.OFFERED and change.call_id in self._requeued
                        and change.call_id not in answered):
                    # A requeued call's next agent answers: the model announces one answer
                    # per call, so the dispatcher is told here.
                    self._acd.on_changes([CallChange(ChangeKind.ANSWERED, change.call_id, call, change.at)])
            elif change.kind is ChangeKind.ENDED:
                self._forget(call)

    def _leg_ended(self, call: Call, change: CallChange) -> None:
        leg = change.leg
        assert leg is not None
        entry = self._transferred_by.get(call.call_id)
        if entry is not None and entry[1] == leg.channel:
            self._transferred_by.pop(call.call_id, None)
            if call.active:
                self._release_agent(call)
        if not call.active or call.state is not CallState.HELD:
            return
        survivor = call.leg(Role.CALLER if leg.role is Role.AGENT else Role.AGENT, live=True)
        if survivor is None:
            return
        if leg.role is Role.AGENT:
            self._spawn(self._agent_left_hold(call, survivor.channel))
        elif leg.role is Role.CALLER:
            self._model.expect_hangup(survivor.channel)
            self._spawn(self._hangup_quietly(survivor.channel))

    async def _agent_left_hold(self, call: Call, caller: str) -> None:
        """The agent hung up while the caller is on hold: back to its queue, or hang up."""
        waiting = self._acd.waiting(call.call_id)
        queue = waiting.queue if waiting is not None else None
        if queue is None or queue not in self._acd.rules:
            self._model.expect_hangup(caller)
            await self._hangup_quietly(caller)
            return
        try:
            await self._requeue(call, caller, queue, None)
        except ControlError as exc:
            log.warning("control.requeue_failed", call_id=call.call_id, reason=exc.message)

    async def _hangup_quietly(self, channel: str) -> None:
        with contextlib.suppress(AMIError):
            await self._client.action("Hangup", [("Channel", channel)])

    def _forget(self, call: Call) -> None:
        self._resuming.pop(call.call_id, None)
        self._transferred_by.pop(call.call_id, None)
        self._requeued.discard(call.call_id)
        agent_id = self._outbound.pop(call.call_id, None)
        if agent_id is not None:
            with contextlib.suppress(AgentStateError, UnknownAgentError):
                self._agents.set_busy(agent_id, False)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
