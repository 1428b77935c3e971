"""The agent state machine: every allowed transition, in one table.

Theory of operation
-------------------
An agent's state answers one question for the router: "may I offer this person a
call right now?" Only ``ready`` says yes. Everything that moves an agent is a
:class:`Trigger`, and three parties own different triggers:

* **the agent's desk** (REST or websocket, ``ctid.api``): ``login``, ``logout``,
  ``ready``, ``pause`` (with a reason code) and ``wrapup_done``;
* **the ACD** (``ctid.acd``, a later issue): ``reserve`` (the router picked the
  agent for a call and the pop goes out), ``answer`` (the agent's leg is bridged),
  ``hangup`` (the call ended: wrap-up starts), ``release`` (the call went away with
  no wrap-up: an offer withdrawn, or a queue with zero wrap-up) and ``rona`` (ring,
  no answer: the agent is paused with reason ``rona``);
* **the device feed** (AMI ``DeviceStateChange``): ``device_busy`` and
  ``device_idle``, for calls the agent takes or makes outside ctid.

::

    logged_out ──login──► ready ──reserve──► reserved ──answer──► on_call ──hangup──► wrap_up
                           ▲  ▲                 │  │                 │                  │
                           │  └────release──────┘  └──rona──► paused  └─release─► ready │
                           └────────────────────────wrapup_done─────────────────────────┘
    ready, wrap_up, paused ──pause(reason)──► paused ──ready──► ready
    ready, paused, wrap_up ──device_busy──► busy ──device_idle──► (the state it left)
    ready, paused, wrap_up, busy ──logout──► logged_out

Rules:

* :data:`TRANSITIONS` is the whole truth: a ``(state, trigger)`` pair that is not in
  it is illegal. ``ctid.agents.registry`` asks :func:`next_state` and never decides
  a state by itself.
* An illegal trigger from the desk or the ACD raises :class:`AgentStateError`, which
  carries the agent's current state (the API answers 409 with it). Repeating a desk
  command whose outcome already holds (``ready`` while ready, ``logout`` while logged
  out, ``pause`` with the reason already set) is in the table and is a no-op: the
  registry publishes nothing.
* The device feed reports what Asterisk saw, so it never raises: a device that goes
  in use because of ctid's own call (``reserved``, ``on_call``), or for an agent who
  is logged out, changes nothing (:data:`DEVICE_IGNORED`).
* ``busy`` remembers the state it interrupted (``ready``, ``paused`` with its reason,
  or ``wrap_up``) and ``device_idle`` returns there (:data:`PREVIOUS`).
* ``pause`` from ``wrap_up`` ends the wrap-up without a disposition (no
  ``call.wrapup``); ``wrapup_done`` is the only way to record one, and ``ready`` is
  not accepted in wrap-up, so a desk cannot skip it by accident.

The ACD extends this table when it lands (for example, several concurrent calls
for ``max_calls > 1``): add the pairs here, with a line in the diagram.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "DEFAULT_PAUSE_REASONS",
    "DEVICE_IGNORED",
    "PREVIOUS",
    "TRANSITIONS",
    "AgentState",
    "AgentStateError",
    "Trigger",
    "next_state",
]


class AgentState(enum.StrEnum):
    LOGGED_OUT = "logged_out"
    READY = "ready"
    RESERVED = "reserved"
    ON_CALL = "on_call"
    BUSY = "busy"
    WRAP_UP = "wrap_up"
    PAUSED = "paused"


class Trigger(enum.StrEnum):
    # the agent's desk
    LOGIN = "login"
    LOGOUT = "logout"
    READY = "ready"
    PAUSE = "pause"
    WRAPUP_DONE = "wrapup_done"
    # the ACD
    RESERVE = "reserve"
    ANSWER = "answer"
    HANGUP = "hangup"
    RELEASE = "release"
    RONA = "rona"
    # the device feed
    DEVICE_BUSY = "device_busy"
    DEVICE_IDLE = "device_idle"


#: Pause reason codes accepted when no list is configured. ``rona`` is also what the
#: ACD sets on ring-no-answer.
DEFAULT_PAUSE_REASONS: Final[tuple[str, ...]] = ("break", "lunch", "training", "meeting", "rona")


class _Previous:
    """Marker target: go back to the state ``busy`` interrupted."""

    def __repr__(self) -> str:
        return "PREVIOUS"


PREVIOUS: Final = _Previous()

_LO, _RD, _RS, _OC = AgentState.LOGGED_OUT, AgentState.READY, AgentState.RESERVED, AgentState.ON_CALL
_BZ, _WU, _PA = AgentState.BUSY, AgentState.WRAP_UP, AgentState.PAUSED
_T = Trigger

#: Every allowed transition. Nothing else is legal.
TRANSITIONS: Final[dict[tuple[AgentState, Trigger], AgentState | _Previous]] = {
    # Sign on and off. Logout is refused while a call is being offered or is up.
    (_LO, _T.LOGIN): _RD,
    (_LO, _T.LOGOUT): _LO,  # repeat: no-op
    (_RD, _T.LOGOUT): _LO,
    (_PA, _T.LOGOUT): _LO,
    (_WU, _T.LOGOUT): _LO,
    (_BZ, _T.LOGOUT): _LO,
    # Ready and paused.
    (_RD, _T.READY): _RD,  # repeat: no-op
    (_PA, _T.READY): _RD,
    (_RD, _T.PAUSE): _PA,
    (_WU, _T.PAUSE): _PA,
    (_PA, _T.PAUSE): _PA,  # a new reason (same reason: no-op)
    # A call routed by ctid.
    (_RD, _T.RESERVE): _RS,
    (_RS, _T.ANSWER): _OC,
    (_RS, _T.RELEASE): _RD,
    (_RS, _T.RONA): _PA,
    (_OC, _T.HANGUP): _WU,
    (_OC, _T.RELEASE): _RD,
    (_WU, _T.WRAPUP_DONE): _RD,
    # A call ctid did not route (device state from AMI).
    (_RD, _T.DEVICE_BUSY): _BZ,
    (_PA, _T.DEVICE_BUSY): _BZ,
    (_WU, _T.DEVICE_BUSY): _BZ,
    (_BZ, _T.DEVICE_BUSY): _BZ,  # repeat: no-op
    (_BZ, _T.DEVICE_IDLE): PREVIOUS,
}

#: States in which the device feed changes nothing (ctid's own call, or no agent on
#: the device). Device triggers from any other state not in the table are no-ops too.
DEVICE_IGNORED: Final = frozenset({_LO, _RS, _OC})

_DEVICE_TRIGGERS: Final = frozenset({_T.DEVICE_BUSY, _T.DEVICE_IDLE})


class AgentStateError(Exception):
    """A trigger that is not allowed in the agent's current state.

    ``state`` is the agent's state when it was refused (the API answers 409 with it).
    """

    def __init__(self, agent_id: str, state: AgentState, trigger: Trigger, why: str = "") -> None:
        self.agent_id = agent_id
        self.state = state
        self.trigger = trigger
        detail = why or f"{trigger} is not allowed while {state}"
        super().__init__(f"agent {agent_id}: {detail}")


def next_state(agent_id: str, state: AgentState, trigger: Trigger) -> AgentState | _Previous | None:
    """The state ``trigger`` leads to from ``state``.

    Returns None for a device trigger that changes nothing; raises
    :class:`AgentStateError` for any other pair that is not in :data:`TRANSITIONS`.
    """
    target = TRANSITIONS.get((state, trigger))
    if target is not None:
        return target
    if trigger in _DEVICE_TRIGGERS:
        return None
    raise AgentStateError(agent_id, state, trigger)
