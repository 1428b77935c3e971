"""The agent registry: the one authoritative in-memory model of every agent's state.

Commands come from the desk (``ctid.api``: REST and websocket), from the ACD and from
the device feed; each is checked against :mod:`ctid.agents.states` and every change
is published at once as an ``agent.state`` event (``docs/events.md``), with
``tenant`` and ``agent_id`` set, ``call_id``/``queue`` naming the call the agent
handles (else null), and ``data``::

    {"state": "paused", "reason": "lunch", "device": "PJSIP/1001",
     "since": "2026-12-01T09:30:00.123Z", "previous": "ready", "calls": 0}

``calls`` counts the calls the agent handles (reserved, on the call or in wrap-up).
``wrapup_done`` publishes ``call.wrapup`` (disposition, notes, ``wrapup_s``) before
the agent's ``ready``. Its call fields (direction, caller, DNIS, service line) come
from the snapshot the ACD hands to :meth:`AgentRegistry.reserve`/``hangup``.

The registry is pure: no I/O, time from the injected clock, events handed to the
injected ``publish`` (the bus's). It does not talk to Asterisk: the ACD issue adds
that around it (queue membership, ``DeviceStateList`` for known endpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from ctid.agents.states import (
    DEFAULT_PAUSE_REASONS,
    DEVICE_IGNORED,
    PREVIOUS,
    AgentState,
    AgentStateError,
    Trigger,
    next_state,
)
from ctid.asterisk.safety import UnsafeValueError, check_device, check_id
from ctid.config import AgentConfig
from ctid.events.schema import Event, format_ts

__all__ = [
    "MAX_DISPOSITION",
    "MAX_NOTES",
    "Agent",
    "AgentCommandError",
    "AgentError",
    "AgentRegistry",
    "AgentStateError",
    "CallInfo",
    "UnknownAgentError",
]

Clock = Callable[[], datetime]
Publish = Callable[[Event], Event]

#: Longest disposition code and notes accepted with a wrap-up (characters).
MAX_DISPOSITION: Final = 64
MAX_NOTES: Final = 4000


class AgentError(Exception):
    """Base class of the registry's refusals (other than :class:`AgentStateError`)."""


class UnknownAgentError(AgentError, LookupError):
    """No agent has this id."""


class AgentCommandError(AgentError, ValueError):
    """A command argument is invalid (device, reason code, call id, disposition).

    ``field`` names the argument.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Keep:
    """Marker: keep the agent's device."""


_KEEP: Final = _Keep()
#: States in which an agent handles no call.
_NO_CALLS: Final = frozenset({AgentState.READY, AgentState.LOGGED_OUT, AgentState.PAUSED})


@dataclass(slots=True)
class CallInfo:
    """What the registry keeps of a call an agent handles: its queue, and the call
    fields ``call.wrapup`` repeats (``direction``, ``state``, ``caller``, ``dnis``,
    ``service_line``, as ``ctid.events.calls.call_data`` builds them)."""

    queue: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


#: Call fields for ``call.wrapup`` when the ACD gave none (they are required by the contract).
_UNKNOWN_CALL: Final[dict[str, Any]] = {"direction": "inbound", "state": "ended",
                                        "caller": {"number": None, "name": None, "e164": None},
                                        "dnis": None, "service_line": None}


@dataclass(eq=False)
class Agent:
    """One agent as the registry knows it. Read it; change it only through the registry."""

    config: AgentConfig
    state: AgentState
    since: datetime
    reason: str | None = None
    device: str | None = None
    previous: AgentState | None = None
    #: The calls the agent handles, in order, with what the ACD said of each.
    calls: dict[str, CallInfo] = field(default_factory=dict)
    #: Where ``busy`` returns to: (state, reason).
    interrupted: tuple[AgentState, str | None] | None = None

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def tenant(self) -> str:
        return self.config.tenant

    @property
    def current_call(self) -> tuple[str, CallInfo] | None:
        """The (first) call the agent handles, if any."""
        return next(iter(self.calls.items()), None)

    def state_data(self) -> dict[str, Any]:
        """``agent.state`` event data."""
        return {"state": self.state.value, "reason": self.reason, "device": self.device,
                "since": format_ts(self.since), "previous": None if self.previous is None else self.previous.value,
                "calls": len(self.calls)}

    def snapshot(self) -> dict[str, Any]:
        """The agent for ``GET /api/v1/agents`` (the state data plus ``call_ids``)."""
        return {"agent_id": self.id, "tenant": self.tenant, "name": self.config.name,
                "skills": dict(self.config.skills), "max_calls": self.config.max_calls, **self.state_data(),
                "call_ids": list(self.calls)}


class AgentRegistry:
    """Every configured agent, starting logged out."""

    def __init__(self, agents: Iterable[AgentConfig], publish: Publish, clock: Clock, *,
                 pause_reasons: Collection[str] = DEFAULT_PAUSE_REASONS) -> None:
        self._publish = publish
        self._clock = clock
        self.pause_reasons: tuple[str, ...] = tuple(pause_reasons)
        now = clock()
        self._agents: dict[str, Agent] = {a.id: Agent(a, AgentState.LOGGED_OUT, now) for a in agents}
        self._devices: dict[str, str] = {}  # device -> agent id, for logged-in agents

    # -- reading -----------------------------------------------------------------------

    def get(self, agent_id: str) -> Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            raise UnknownAgentError(f"unknown agent {agent_id!r}")
        return agent

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def __iter__(self) -> Iterator[Agent]:
        return iter(list(self._agents.values()))

    def agent_for_device(self, device: str) -> Agent | None:
        """The logged-in agent on ``device`` (for the device-state feed), if any."""
        agent_id = self._devices.get(device)
        return None if agent_id is None else self._agents[agent_id]

    def snapshot(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Every agent (of ``tenant``, if given), in config order."""
        return [a.snapshot() for a in self._agents.values() if tenant is None or a.tenant == tenant]

    # -- desk commands -------------------------------------------------------------------

    def login(self, agent_id: str, device: str, known_endpoints: Collection[str] | None = None) -> Agent:
        """Hot-desk login to ``device`` (``PJSIP/1001``, ``DAHDI/1``, ...); the agent becomes ready.

        The device is checked with :func:`ctid.asterisk.safety.check_device` (and
        against ``known_endpoints`` when given); one device serves one agent at a time.
        """
        agent = self.get(agent_id)
        try:
            check_device(device, known_endpoints)
        except UnsafeValueError as exc:
            raise AgentCommandError("device", str(exc)) from None
        target = self._check(agent, Trigger.LOGIN)
        holder = self._devices.get(device)
        if holder is not None and holder != agent.id:
            raise AgentStateError(agent.id, agent.state, Trigger.LOGIN, f"device {device} is in use by another agent")
        self._devices[device] = agent.id
        return self._move(agent, target, device=device)

    def logout(self, agent_id: str) -> Agent:
        agent = self.get(agent_id)
        target = self._check(agent, Trigger.LOGOUT)
        if agent.device is not None:
            self._devices.pop(agent.device, None)
        return self._move(agent, target, device=None)

    def ready(self, agent_id: str) -> Agent:
        agent = self.get(agent_id)
        return self._move(agent, self._check(agent, Trigger.READY))

    def pause(self, agent_id: str, reason: str) -> Agent:
        """Pause with a reason code from :attr:`pause_reasons`."""
        agent = self.get(agent_id)
        if reason not in self.pause_reasons:
            choices = ", ".join(self.pause_reasons)
            raise AgentCommandError("reason", f"unknown pause reason {reason!r} (one of {choices})")
        target = self._check(agent, Trigger.PAUSE)
        return self._move(agent, target, reason=reason)

    def wrapup_done(self, agent_id: str, call_id: str, disposition: str = "", notes: str = "", *,
                    completed_by: str = "agent") -> Agent:
        """End wrap-up of ``call_id``: publish ``call.wrapup``, then the agent is ready.

        Empty ``disposition``/``notes`` are published as null. ``completed_by`` is
        ``agent``, ``supervisor`` or (the ACD's wrap-up timer) ``timeout``.
        """
        agent = self.get(agent_id)
        try:
            check_id(call_id, "call_id")
        except UnsafeValueError as exc:
            raise AgentCommandError("call_id", str(exc)) from None
        if not isinstance(disposition, str) or len(disposition) > MAX_DISPOSITION:
            raise AgentCommandError("disposition", f"disposition must be a string of at most {MAX_DISPOSITION} chars")
        if not isinstance(notes, str) or len(notes) > MAX_NOTES:
            raise AgentCommandError("notes", f"notes must be a string of at most {MAX_NOTES} characters")
        target = self._check(agent, Trigger.WRAPUP_DONE)
        if call_id not in agent.calls:
            raise AgentStateError(agent.id, agent.state, Trigger.WRAPUP_DONE,
                                  f"agent is not wrapping up call {call_id}")
        now = self._clock()
        info = agent.calls[call_id]
        data = {**_UNKNOWN_CALL, **info.data, "state": "ended", "disposition": disposition or None,
                "notes": notes or None, "wrapup_s": round(max(0.0, (now - agent.since).total_seconds()), 3),
                "completed_by": completed_by}
        self._publish(Event(type="call.wrapup", tenant=agent.tenant, ts=now, call_id=call_id, agent_id=agent.id,
                            queue=info.queue, data=data))
        return self._move(agent, target)

    # -- ACD --------------------------------------------------------------------------------

    def reserve(self, agent_id: str, call_id: str, queue: str | None = None,
                call_data: Mapping[str, Any] | None = None) -> Agent:
        """The router picked this ready agent for ``call_id`` (``call_data``: the call's
        base event fields, repeated by ``call.wrapup``)."""
        agent = self.get(agent_id)
        target = self._check(agent, Trigger.RESERVE)
        agent.calls[call_id] = CallInfo(queue, dict(call_data or {}))
        return self._move(agent, target)

    def answer(self, agent_id: str, call_id: str) -> Agent:
        agent = self.get(agent_id)
        return self._move(agent, self._check_call(agent, Trigger.ANSWER, call_id))

    def hangup(self, agent_id: str, call_id: str, call_data: Mapping[str, Any] | None = None) -> Agent:
        """The call ended: wrap-up starts (the ACD ends it with its timer or the desk's wrap-up).
        ``call_data`` refreshes the call fields kept for ``call.wrapup``."""
        agent = self.get(agent_id)
        target = self._check_call(agent, Trigger.HANGUP, call_id)
        if call_data is not None:
            agent.calls[call_id].data.update(call_data)
        return self._move(agent, target)

    def release(self, agent_id: str, call_id: str) -> Agent:
        """The call went away with no wrap-up (offer withdrawn, or zero wrap-up)."""
        agent = self.get(agent_id)
        return self._move(agent, self._check_call(agent, Trigger.RELEASE, call_id))

    def rona(self, agent_id: str, call_id: str) -> Agent:
        """Ring, no answer: the agent is paused with reason ``rona``."""
        agent = self.get(agent_id)
        return self._move(agent, self._check_call(agent, Trigger.RONA, call_id), reason="rona")

    # -- device feed ------------------------------------------------------------------------

    def set_busy(self, agent_id: str, busy: bool) -> Agent:
        """The agent's device is in use (or idle again) for a call ctid did not route.

        Never raises for the state: a device in use because of ctid's own call, or an
        agent who is logged out, changes nothing (see :data:`DEVICE_IGNORED`).
        """
        agent = self.get(agent_id)
        if agent.state in DEVICE_IGNORED:
            return agent
        trigger = Trigger.DEVICE_BUSY if busy else Trigger.DEVICE_IDLE
        target = next_state(agent.id, agent.state, trigger)
        if target is None or target is agent.state:
            return agent
        if target is PREVIOUS:
            state, reason = agent.interrupted or (AgentState.READY, None)
            agent.interrupted = None
            return self._move(agent, state, reason=reason)
        agent.interrupted = (agent.state, agent.reason)
        return self._move(agent, AgentState.BUSY)

    # -- the one place that changes an agent --------------------------------------------------

    def _check(self, agent: Agent, trigger: Trigger) -> AgentState:
        target = next_state(agent.id, agent.state, trigger)
        if not isinstance(target, AgentState):  # only device triggers give None / PREVIOUS
            raise AgentStateError(agent.id, agent.state, trigger)
        return target

    def _check_call(self, agent: Agent, trigger: Trigger, call_id: str) -> AgentState:
        target = self._check(agent, trigger)
        if call_id not in agent.calls:
            raise AgentStateError(agent.id, agent.state, trigger, f"agent is not handling call {call_id}")
        return target

    def _move(self, agent: Agent, target: AgentState, *, reason: str | None = None,
              device: str | _Keep | None = _KEEP) -> Agent:
        """Enter ``target`` and publish ``agent.state``, unless nothing would change."""
        new_reason = reason if target is AgentState.PAUSED else None
        new_device = agent.device if isinstance(device, _Keep) else device
        if target is agent.state and new_reason == agent.reason and new_device == agent.device:
            return agent  # a repeated command: nothing changes, nothing is published
        if target in _NO_CALLS:
            agent.calls.clear()
        if target is not AgentState.BUSY:
            agent.interrupted = None
        agent.previous = agent.state
        agent.state = target
        agent.reason = new_reason
        agent.device = new_device
        agent.since = self._clock()
        current = agent.current_call
        self._publish(Event(type="agent.state", tenant=agent.tenant, ts=agent.since, agent_id=agent.id,
                            call_id=current[0] if current else None, queue=current[1].queue if current else None,
                            data=agent.state_data()))
        return agent
