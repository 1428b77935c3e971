"""The global matcher: skills-based routing across every queue, as a pure state machine.

The router decides which waiting call goes to which agent. It does no I/O, owns no
task and reads time only through the injected ``clock`` (seconds, any epoch). Given
the same sequence of calls to its methods and the same clock readings, it makes the
same decisions: replay, simulation and the benchmark depend on that. The dispatcher
(``ctid.acd.dispatcher``) feeds it events and carries out its decisions.

Theory of operation
-------------------

The dispatcher tells the router what happened (an agent logged in, became ready,
finished a call; a call was queued, abandoned, answered, not answered), then calls
:meth:`Router.match`, which returns the :class:`Offer` pairs to make *now*. It then
sleeps until :meth:`Router.next_timer`, calls :meth:`Router.fire_timers` (which returns
overflow and max-wait decisions as :class:`Expiry` values) and :meth:`Router.match`
again. Nothing scans on a fixed tick.

The invariant: **after every** :meth:`match`, **no available agent is eligible for a
waiting call.** An agent is *available* when it is ready and has a free slot
(``calls < max_calls``); it is *eligible* for a call when it matches the call's current
requirement, the call is not held for another (sticky) agent, and the agent is not
excluded from that call (it just let it ring, see RONA). Every change that can break the
invariant marks the agent or the call "dirty"; :meth:`match` repairs exactly those:

1. dirty agents first, in the order they became available (``idle_since``, then id):
   each takes the best eligible call across *all* queues (the fairness rule below);
2. then dirty calls, best first by the same rule: each takes the best available
   eligible agent under its queue's policy.

Agents go first so that a call queued in the same batch cannot jump ahead of older
calls that the freed agent could take. By the invariant, a new call only ever finds
an agent that no older call could use, so serving a call never wrongs another.

Indexes (so a decision never scans calls x agents):

- A **bucket** is one (queue, requirement expression) pair. Waiting calls are filed in
  the bucket of their *current* requirement, in a list sorted by the fairness key. When a
  call's relaxation timer fires it is re-filed in its new requirement's bucket.
- When a bucket is created, its eligible agents are found once from the skill postings
  (``Expression.candidate_skills()``: every matching agent has at least one of those
  skills), then checked with ``matches()``. Agents that log in or change skills are
  checked against the existing buckets. Each agent knows its eligible buckets.
- Each bucket keeps its *available* eligible agents in a list sorted by the queue's
  policy key, and counters of the staffed and free slots of its eligible agents. An
  agent is filed in those lists when it is available and found no call, and taken out
  at its next change (exact removal by bisection: no stale entries, so no compaction
  pauses).

So a freed agent looks at the head of each of its eligible buckets (O(buckets it is
eligible for)); a queued call takes the first entry of one list, and under overload,
when no eligible agent is free, it only reads a counter.

Fairness rule
-------------

Waiting calls are ordered, across all queues, by the key
``(-priority, not head, enqueued_at, call_id)``:

1. higher priority first (0..9, 9 highest);
2. then a call put back at the *head* of its queue (RONA, :meth:`requeue_head`, or
   ``enqueue(head=True)``) before the others of its priority;
3. then the oldest *original* enqueue time (kept across RONA, and across transfers and
   overflows when the dispatcher passes ``enqueued_at``);
4. then the call id (string order), so ties are broken the same way in every run.

When an agent becomes available, it is offered the first call in this order that it is
eligible for, whatever queue the call is in. An agent serving several queues therefore
gets the highest-priority, longest-waiting eligible call among all of them. When a
call is queued, it gets the best available eligible agent under its queue's policy
(there is no older eligible call waiting for that agent, by the invariant). When
several agents become available in one batch, the one available longest chooses
first.

Policies (the agent a call gets; ties always end with the agent id):

- ``longest-idle``: earliest ``idle_since`` (the time the agent last became available,
  or last finished a call while still available).
- ``most-skilled``: highest ``requirement.score(skills, weights)``, then longest idle.
- ``least-occupied``: lowest ``calls / max_calls``, then fewest calls handled since
  login, then longest idle.
- ``round-robin``: offered longest ago by this queue (never offered first), then
  longest idle.

Timers (absolute times; each waiting call has at most one live timer, the earliest of):

- relaxation: ``enqueued_at + rules.next_boundary(wait)``; at the boundary the call is
  re-filed under ``rules.requirement_at(boundary, ...)``;
- the sticky deadline ``enqueued_at + rules.sticky.wait_s``: until then a call queued
  with a ``sticky_agent`` is offered to that agent only (if eligible); then to anyone;
- ``enqueued_at + rules.overflow.after_s`` and ``enqueued_at + rules.max_wait_s``: the
  call leaves the router and :meth:`fire_timers` returns an :class:`Expiry` (the earlier
  deadline wins; at a tie, max-wait first, like ``QueueRules.exit_target``);
- the end of an agent's exclusion from a call (``exclude_s`` after a RONA).

All wait-based rules count from the original ``enqueued_at``. Relaxation steps that
depend on EWT or queue depth, and an overflow on EWT, are evaluated when the call is
queued or re-queued, at each of its timers, and at :meth:`refresh`, which the
dispatcher calls at each hold check-in (every ``checkin_s`` <= 10 s). So such a step
lags a change in EWT or depth by at most one check-in; re-evaluating every call of a
queue on every depth change would cost O(calls) per event.

Expected wait time (EWT)
------------------------

Position-aware, for a waiting call ``c`` with current requirement ``R``::

    ahead  = waiting calls of c's queue ordered before c (fairness key), plus those of
             the queues that share its line (:meth:`Router.share_line`: callbacks)
    N      = slots (sum of max_calls) of agents eligible for R that are ready or on a call
    free   = free slots of agents eligible for R that are ready now
    EWT    = max(0, ahead + 1 - free) * AHT / N

``AHT`` is the measured average handle time of the queue (talk + hold + wrap-up,
:meth:`Router.set_aht`, or passed in). The ``N`` eligible slots free up at a rate of
``N / AHT``, and ``c`` is answered when ``ahead + 1`` of them have. :meth:`Router.ewt`
returns None when the AHT is unknown or no eligible agent is staffed (``N = 0``); the
rules then get ``ewt_s=None`` and ``math.inf`` respectively. Known limits: calls of
*other* queues that compete for the same agents are not counted in ``ahead``, and an
agent shared with other queues counts fully in ``N``; both make the estimate
optimistic where queues share agents.

The rules a queue gives the router are any object with the attributes of
:class:`RoutingRules` (``ctid.acd.rules.QueueRules`` has them): ``queue_id``,
``policy``, ``weights``, ``sticky`` (``None`` or ``.wait_s``), ``overflow`` (``None`` or
``.after_s`` and ``.ewt_s``), ``max_wait_s``, ``requirement_at(wait_s, ewt_s, depth)``
and ``next_boundary(wait_s)``; nothing else. A requirement is an
:class:`~ctid.acd.expr.Expression` (``matches``, ``score``, ``candidate_skills``, hashable).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol, TypeVar

from ctid.acd.expr import Expression

__all__ = [
    "DEFAULT_EXCLUDE_S",
    "POLICIES",
    "Expiry",
    "Offer",
    "OverflowRule",
    "Router",
    "RouterError",
    "RoutingRules",
    "StickyRule",
]

POLICIES: Final = ("longest-idle", "most-skilled", "least-occupied", "round-robin")
DEFAULT_PRIORITY: Final = 5
DEFAULT_EXCLUDE_S: Final = 30.0
"""How long an agent who let a call ring (RONA) is not offered that call again."""

_WAITING: Final = 0
_OFFERED: Final = 1

# (-priority, 0 if put back at the head else 1, enqueued_at, call_id)
_Key = tuple[int, int, float, str]
# (policy key, agent id)
_Entry = tuple[tuple[float, ...], str]


class RouterError(Exception):
    """An event the router cannot accept: unknown or duplicate id, or wrong state."""


# --------------------------------------------------------------------------- the rules it reads


class StickyRule(Protocol):
    @property
    def wait_s(self) -> float:
        """Seconds a call waits for its sticky agent only."""
        ...


class OverflowRule(Protocol):
    @property
    def after_s(self) -> float | None: ...

    @property
    def ewt_s(self) -> float | None: ...


class RoutingRules(Protocol):
    """What the router reads from a queue's rules (``ctid.acd.rules.QueueRules``)."""

    @property
    def queue_id(self) -> str: ...

    @property
    def policy(self) -> str:
        """One of :data:`POLICIES`."""
        ...

    @property
    def weights(self) -> Mapping[str, float]: ...

    @property
    def sticky(self) -> StickyRule | None: ...

    @property
    def overflow(self) -> OverflowRule | None: ...

    @property
    def max_wait_s(self) -> float | None: ...

    def requirement_at(self, wait_s: float, ewt_s: float | None = None, depth: int | None = None) -> Expression:
        """The requirement after waiting ``wait_s`` (steps apply at ``>=``)."""
        ...

    def next_boundary(self, wait_s: float) -> float | None:
        """The next wait time strictly after ``wait_s`` where the requirement may change."""
        ...


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Offer:
    """Offer ``call_id`` to ``agent_id`` now. The agent's slot is reserved until
    :meth:`Router.offer_done` (or the call is dequeued or re-queued)."""

    call_id: str
    agent_id: str
    queue_id: str
    priority: int
    enqueued_at: float
    wait_s: float


@dataclass(frozen=True, slots=True)
class Expiry:
    """``call_id`` has left the router: it must overflow, or it reached its max wait.
    ``at`` is the deadline (the EWT check's time for an overflow on EWT)."""

    call_id: str
    queue_id: str
    reason: Literal["overflow", "max_wait"]
    at: float
    wait_s: float


# --------------------------------------------------------------------------- internal state


class _Queue:
    __slots__ = ("buckets", "id", "keys", "rr_seq", "rules")

    def __init__(self, rules: RoutingRules) -> None:
        self.id = rules.queue_id
        self.rules = rules
        self.buckets: dict[Expression, _Bucket] = {}
        self.keys: list[_Key] = []  # every waiting call of the queue, in fairness order
        self.rr_seq = 0


class _Bucket:
    """The calls of one queue that currently need one requirement, and its agents."""

    __slots__ = ("agents", "calls", "eligible", "free", "queue", "requirement", "staffed")

    def __init__(self, queue: _Queue, requirement: Expression) -> None:
        self.queue = queue
        self.requirement = requirement
        self.eligible: dict[str, float] = {}  # agent id -> most-skilled score (0 otherwise)
        self.calls: list[_Key] = []  # filed here and not held for a sticky agent
        self.agents: list[_Entry] = []  # available eligible agents, best first
        self.staffed = 0  # slots of eligible agents that are ready or on a call
        self.free = 0  # free slots of eligible agents that are ready


class _Agent:
    __slots__ = ("buckets", "calls", "entries", "filed", "handled", "held", "id", "idle_since", "last_rr",
                 "max_calls", "offers", "ready", "skills")

    def __init__(self, agent_id: str, skills: Mapping[str, int], max_calls: int, now: float) -> None:
        self.id = agent_id
        self.skills = dict(skills)
        self.max_calls = max_calls
        self.calls = 0  # offered (reserved) + answered and not ended
        self.offers: set[str] = set()  # offered, not yet answered
        self.ready = False
        self.idle_since = now
        self.handled = 0
        self.buckets: dict[_Bucket, float] = {}
        self.filed = False  # available, found no call, and filed in its buckets' lists
        self.entries: dict[_Bucket, _Entry] = {}  # where it is filed
        self.last_rr: dict[str, int] = {}
        self.held: list[_Key] = []  # calls waiting for this (sticky) agent only

    @property
    def available(self) -> bool:
        return self.ready and self.calls < self.max_calls

    def staffed_slots(self) -> int:
        return self.max_calls if self.ready or self.calls else 0

    def free_slots(self) -> int:
        return self.max_calls - self.calls if self.ready and self.calls < self.max_calls else 0


class _Call:
    __slots__ = ("agent_id", "boundary_s", "bucket", "enqueued_at", "excluded", "gen", "head", "id", "key",
                 "leave_at", "leaving", "placed", "priority", "queue", "state", "sticky_agent", "sticky_until")

    def __init__(self, call_id: str, queue: _Queue, priority: int, enqueued_at: float, head: bool) -> None:
        self.id = call_id
        self.queue = queue
        self.priority = priority
        self.enqueued_at = enqueued_at
        self.head = head
        self.key: _Key = (-priority, 0 if head else 1, enqueued_at, call_id)
        self.state = _WAITING
        self.agent_id: str | None = None
        self.bucket: _Bucket | None = None
        self.placed = False
        self.boundary_s: float | None = None
        self.sticky_agent: str | None = None
        self.sticky_until: float | None = None
        self.excluded: dict[str, float] = {}  # agent id -> end of the exclusion
        self.leaving: Literal["overflow", "max_wait"] | None = None
        self.leave_at = 0.0
        self.gen = 0


_Sorted = TypeVar("_Sorted", _Key, _Entry)


def _remove_sorted(items: list[_Sorted], item: _Sorted) -> None:
    i = bisect_left(items, item)
    if i == len(items) or items[i] != item:
        raise AssertionError(f"router index out of step: {item!r} missing")
    del items[i]


# --------------------------------------------------------------------------- the router


class Router:
    """The global matcher. See the module docstring for the rules it follows.

    ``clock`` returns the current time in seconds; ``exclude_s`` is how long an agent who
    did not answer (RONA, or ``requeue_head(exclude=...)``) is not offered that call
    again (0 disables the exclusion)."""

    def __init__(self, clock: Callable[[], float], *, exclude_s: float = DEFAULT_EXCLUDE_S) -> None:
        if not exclude_s >= 0:
            raise ValueError("exclude_s must be >= 0")
        self._clock = clock
        self._exclude_s = exclude_s
        self._agents: dict[str, _Agent] = {}
        self._calls: dict[str, _Call] = {}  # waiting and offered
        self._queues: dict[str, _Queue] = {}
        self._postings: dict[str, set[str]] = {}  # skill name or "family:*" -> agent ids
        self._timers: list[tuple[float, int, str]] = []  # (at, call gen, call id), lazy deletion
        self._dirty_agents: dict[str, None] = {}
        self._dirty_calls: dict[str, None] = {}
        self._aht: dict[str, float] = {}
        self._lines: dict[str, tuple[str, ...]] = {}  # queue id -> queues whose calls share its line
        self._gen = 0

    # ------------------------------------------------------------------ agents

    def add_agent(self, agent_id: str, skills: Mapping[str, int], *, max_calls: int = 1,
                  ready: bool = False) -> None:
        """An agent logs in, not ready unless ``ready``. ``skills`` is ``{name: level}``."""
        if agent_id in self._agents:
            raise RouterError(f"agent {agent_id!r} is already logged in")
        if not isinstance(max_calls, int) or max_calls < 1:
            raise RouterError(f"max_calls must be an int >= 1, not {max_calls!r}")
        agent = _Agent(agent_id, skills, max_calls, self._clock())
        self._agents[agent_id] = agent
        self._post(agent)
        for queue in self._queues.values():
            for bucket in queue.buckets.values():
                if bucket.requirement.matches(agent.skills):
                    self._link(agent, bucket)
        if ready:
            self.set_agent_ready(agent_id, True)

    def set_agent_skills(self, agent_id: str, skills: Mapping[str, int]) -> None:
        """Replace an agent's skills (admin change, reload)."""
        agent = self._agent(agent_id)
        for bucket in list(agent.buckets):
            self._unlink(agent, bucket)
        self._unpost(agent)
        agent.skills = dict(skills)
        self._post(agent)
        for queue in self._queues.values():
            for bucket in queue.buckets.values():
                if bucket.requirement.matches(agent.skills):
                    self._link(agent, bucket)
        self._changed(agent, self._slots(agent))

    def set_agent_ready(self, agent_id: str, ready: bool) -> None:
        """Ready or not ready (paused, wrap-up, busy outside ctid). An agent on a call may
        be made not ready: it keeps its calls and gets no new offer."""
        agent = self._agent(agent_id)
        if agent.ready == ready:
            return
        before = self._slots(agent)
        agent.ready = ready
        self._changed(agent, before)

    def remove_agent(self, agent_id: str) -> None:
        """An agent logs out. A call offered to it and not yet answered goes back to the
        head of its queue; calls held for it (sticky) may go to anyone at once."""
        agent = self._agent(agent_id)
        self.set_agent_ready(agent_id, False)
        for call_id in sorted(agent.offers):
            self.requeue_head(call_id)
        now = self._clock()
        for key in list(agent.held):
            call = self._calls[key[3]]
            self._unplace(call)
            call.sticky_agent = call.sticky_until = None
            self._place(call)
            self._schedule(call, now)
            self._dirty_calls[call.id] = None
        for bucket in list(agent.buckets):
            self._unlink(agent, bucket)
        self._unpost(agent)
        del self._agents[agent_id]
        self._dirty_agents.pop(agent_id, None)

    def call_ended(self, agent_id: str, *, wrapup: bool = True) -> None:
        """An answered call of this agent ended. With ``wrapup`` (the default) the agent is
        now not ready, until the dispatcher calls ``set_agent_ready(agent_id, True)`` at
        the end of the queue's wrap-up; pass ``wrapup=False`` for a wrap-up of 0."""
        agent = self._agent(agent_id)
        if agent.calls - len(agent.offers) <= 0:
            raise RouterError(f"agent {agent_id!r} has no answered call in progress")
        before = self._slots(agent)
        agent.calls -= 1
        if wrapup:
            agent.ready = False
        self._changed(agent, before, freed=True)

    # ------------------------------------------------------------------ calls

    def enqueue(self, call_id: str, rules: RoutingRules, priority: int = DEFAULT_PRIORITY, *,
                enqueued_at: float | None = None, sticky_agent: str | None = None, head: bool = False) -> None:
        """A call joins ``rules.queue_id``.

        ``enqueued_at`` (default now) is the original enqueue time: pass it to keep a
        call's place across a transfer or an overflow. With ``sticky_agent`` (the
        caller's last agent, found by the dispatcher) and ``rules.sticky`` set, the call is
        held for that agent until ``enqueued_at + rules.sticky.wait_s``; an agent who is not
        logged in is not waited for. ``head`` puts it before the other calls of its
        priority (a call recovered after a restart, for example)."""
        if call_id in self._calls:
            raise RouterError(f"call {call_id!r} is already in the router")
        if type(priority) is not int or not 0 <= priority <= 9:
            raise RouterError(f"priority must be an int 0..9, not {priority!r}")
        now = self._clock()
        queue = self._queue_for(rules)
        call = _Call(call_id, queue, priority, now if enqueued_at is None else float(enqueued_at), head)
        sticky = queue.rules.sticky
        if sticky_agent is not None and sticky is not None and sticky_agent in self._agents:
            until = call.enqueued_at + sticky.wait_s
            if until > now:
                call.sticky_agent, call.sticky_until = sticky_agent, until
        self._calls[call_id] = call
        self._file(call, now)

    def dequeue(self, call_id: str) -> bool:
        """The call left: abandoned, or handled elsewhere. An agent it was offered to gets
        its slot back. Returns False if the router did not know the call."""
        call = self._calls.get(call_id)
        if call is None:
            return False
        if call.state == _OFFERED:
            self._release(call)
            del self._calls[call_id]
        else:
            self._forget(call)
        return True

    def requeue_head(self, call_id: str, *, exclude: str | None = None) -> None:
        """Put a call back at the head of its queue, keeping its priority and original
        enqueue time. If it was offered, the agent's slot is released (its ready state is
        unchanged). ``exclude`` names an agent not to offer it to for ``exclude_s``. A
        sticky hold ends: the call may go to anyone."""
        call = self._calls.get(call_id)
        if call is None:
            raise RouterError(f"call {call_id!r} is not in the router")
        now = self._clock()
        if call.state == _OFFERED:
            self._release(call)
            call.state = _WAITING
        else:
            self._unplace(call)
            _remove_sorted(call.queue.keys, call.key)
        call.head = True
        call.key = (-call.priority, 0, call.enqueued_at, call.id)
        call.sticky_agent = call.sticky_until = None
        if exclude is not None and self._exclude_s > 0:
            call.excluded[exclude] = now + self._exclude_s
        self._file(call, now)

    def offer_done(self, call_id: str, agent_id: str, answered: bool) -> None:
        """The outcome of an :class:`Offer`. Answered: the call leaves the router and the
        agent keeps the slot until :meth:`call_ended`. Not answered (RONA, busy,
        unavailable): the agent is made not ready (``paused:rona``), and the call goes back
        to the head of its queue with that agent excluded from it for ``exclude_s``."""
        call = self._calls.get(call_id)
        if call is None or call.state != _OFFERED or call.agent_id != agent_id:
            raise RouterError(f"call {call_id!r} is not offered to agent {agent_id!r}")
        agent = self._agents[agent_id]
        if answered:
            before = self._slots(agent)
            agent.offers.discard(call_id)
            agent.handled += 1
            del self._calls[call_id]
            self._changed(agent, before)
            return
        self.set_agent_ready(agent_id, False)
        self.requeue_head(call_id, exclude=agent_id)

    def refresh(self, call_id: str) -> None:
        """Re-evaluate a waiting call's requirement and EWT overflow with its current EWT
        and queue depth (the dispatcher calls this at each hold check-in)."""
        call = self._waiting(call_id)
        if call.leaving is None:
            self._refile(call, self._clock())

    def update_rules(self, rules: RoutingRules) -> None:
        """New rules for ``rules.queue_id`` (config reload). Waiting calls are re-filed under
        them, keeping their place; a policy or weights change re-sorts the agents."""
        self._queue_for(rules)

    # ------------------------------------------------------------------ decisions

    def match(self) -> list[Offer]:
        """The offers to make now, after the events since the last call. Each reserves a
        slot of its agent. Afterwards no available agent is eligible for a waiting call."""
        offers: list[Offer] = []
        now = self._clock()
        while self._dirty_agents or self._dirty_calls:
            if self._dirty_agents:
                ids, self._dirty_agents = self._dirty_agents, {}
                agents = [a for a in map(self._agents.get, ids) if a is not None and a.available]
                agents.sort(key=lambda a: (a.idle_since, a.id))
                for agent in agents:
                    if not agent.available or agent.id in self._dirty_agents:
                        continue  # taken by an earlier offer in this batch; seen again later
                    call = self._best_call_for(agent)
                    if call is None:
                        self._index(agent)
                    else:
                        self._offer(call, agent, now, offers)
                continue
            ids, self._dirty_calls = self._dirty_calls, {}
            calls = [c for c in map(self._calls.get, ids)
                     if c is not None and c.state == _WAITING and c.placed]
            calls.sort(key=lambda c: c.key)
            for call in calls:
                if call.state != _WAITING:
                    continue
                best = self._best_agent_for(call)
                if best is not None:
                    self._offer(call, best, now, offers)
        return offers

    def next_timer(self) -> float | None:
        """The absolute time of the next rule boundary (relaxation step, sticky deadline,
        overflow, max wait, end of an exclusion), or None. It may be in the past if
        :meth:`fire_timers` has not been called for it yet."""
        timers = self._timers
        while timers:
            _, gen, call_id = timers[0]
            call = self._calls.get(call_id)
            if call is not None and call.gen == gen and call.state == _WAITING:
                return timers[0][0]
            heapq.heappop(timers)
        return None

    def fire_timers(self, now: float) -> list[Expiry]:
        """Apply every rule boundary at or before ``now``: relaxed calls are re-filed (call
        :meth:`match` next), and calls that must overflow or reached their max wait leave
        the router and are returned, in deadline order."""
        expiries: list[Expiry] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, gen, call_id = heapq.heappop(timers)
            call = self._calls.get(call_id)
            if call is None or call.gen != gen or call.state != _WAITING:
                continue
            expiry = self._advance(call, now)
            if expiry is not None:
                expiries.append(expiry)
        return expiries

    # ------------------------------------------------------------------ EWT and position

    def set_aht(self, queue_id: str, aht_s: float | None) -> None:
        """The measured average handle time of a queue, for EWT (None: unknown)."""
        if aht_s is None:
            self._aht.pop(queue_id, None)
        elif not 0 < aht_s < math.inf:
            raise ValueError("aht_s must be a positive number")
        else:
            self._aht[queue_id] = float(aht_s)

    def ewt(self, call_id: str, aht_s: float | None = None) -> float | None:
        """Expected remaining wait of a waiting call, in seconds (formula in the module
        docstring); ``aht_s`` overrides the queue's measured AHT. None if no AHT is known
        or no eligible agent is staffed."""
        call = self._waiting(call_id)
        aht = self._aht.get(call.queue.id) if aht_s is None else aht_s
        if aht is None or call.bucket is None:
            return None
        estimate = self._estimate(call.queue, call.bucket, call.key, aht)
        return None if estimate == math.inf else estimate

    def queue_ewt(self, rules: RoutingRules, priority: int = DEFAULT_PRIORITY,
                  aht_s: float | None = None) -> float | None:
        """EWT of a call that would join ``rules.queue_id`` now with ``priority`` (for the
        IVR, and for an overflow-on-EWT decision before queueing)."""
        queue = self._queue_for(rules)
        aht = self._aht.get(queue.id) if aht_s is None else aht_s
        if aht is None:
            return None
        depth = len(queue.keys) + 1
        bucket = self._bucket(queue, queue.rules.requirement_at(0.0, None, depth))
        key: _Key = (-priority, 1, self._clock(), "\U0010ffff")
        estimate = self._estimate(queue, bucket, key, aht)
        return None if estimate == math.inf else estimate

    def share_line(self, queue_id: str, other_id: str) -> None:
        """The waiting calls of ``other_id`` stand in ``queue_id``'s line: they count as
        ahead in its positions and EWTs when their fairness key is before (the ACD's
        callbacks in queue wait in a twin queue, and keep the caller's place)."""
        if other_id != queue_id and other_id not in self._lines.get(queue_id, ()):
            self._lines[queue_id] = (*self._lines.get(queue_id, ()), other_id)

    def _ahead(self, queue: _Queue, key: _Key) -> int:
        ahead = bisect_left(queue.keys, key)
        for other_id in self._lines.get(queue.id, ()):
            other = self._queues.get(other_id)
            if other is not None:
                ahead += bisect_left(other.keys, key)
        return ahead

    def position(self, call_id: str) -> int:
        """1-based position of a waiting call in its queue's line (:meth:`share_line`)."""
        call = self._waiting(call_id)
        return self._ahead(call.queue, call.key) + 1

    def depth(self, queue_id: str) -> int:
        """Calls waiting in a queue (offered calls are not waiting)."""
        queue = self._queues.get(queue_id)
        return 0 if queue is None else len(queue.keys)

    def oldest_enqueued_at(self, queue_id: str) -> float | None:
        """The earliest original ``enqueued_at`` of the calls waiting in a queue (offered
        calls are not waiting); None when none is. O(groups x log n), not O(n): the
        queue's order is by (priority, head, enqueued_at, id), so the oldest call of each
        (priority, head) group is that group's first key, and there are at most 20 groups."""
        queue = self._queues.get(queue_id)
        if queue is None or not queue.keys:
            return None
        keys = queue.keys
        oldest = math.inf
        i = 0
        while i < len(keys):
            prio, head, enqueued_at, _ = keys[i]
            oldest = min(oldest, enqueued_at)
            i = bisect_left(keys, (prio, head, math.inf, ""), i)  # the next group's first key
        return oldest

    def is_waiting(self, call_id: str) -> bool:
        call = self._calls.get(call_id)
        return call is not None and call.state == _WAITING

    # ------------------------------------------------------------------ internals: lookups

    def _agent(self, agent_id: str) -> _Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            raise RouterError(f"agent {agent_id!r} is not logged in")
        return agent

    def _waiting(self, call_id: str) -> _Call:
        call = self._calls.get(call_id)
        if call is None or call.state != _WAITING:
            raise RouterError(f"call {call_id!r} is not waiting")
        return call

    def _queue_for(self, rules: RoutingRules) -> _Queue:
        queue = self._queues.get(rules.queue_id)
        if queue is None:
            if rules.policy not in POLICIES:
                raise RouterError(f"unknown policy {rules.policy!r}")
            queue = self._queues[rules.queue_id] = _Queue(rules)
            self._prebuild(queue)
        elif queue.rules is not rules and queue.rules != rules:
            self._update_rules(queue, rules)
        return queue

    def _prebuild(self, queue: _Queue) -> set[_Bucket]:
        """Create the buckets of the queue's time steps now, not on a call's first use."""
        built: set[_Bucket] = set()
        wait = 0.0
        for _ in range(64):
            built.add(self._bucket(queue, queue.rules.requirement_at(wait, None, None)))
            nxt = queue.rules.next_boundary(wait)
            if nxt is None or not nxt > wait:
                break
            wait = nxt
        return built

    def _update_rules(self, queue: _Queue, rules: RoutingRules) -> None:
        if rules.policy not in POLICIES:
            raise RouterError(f"unknown policy {rules.policy!r}")
        old = queue.rules
        queue.rules = rules
        if rules.policy != old.policy or dict(rules.weights) != dict(old.weights):
            for bucket in queue.buckets.values():
                for agent_id in list(bucket.eligible):
                    agent = self._agents[agent_id]
                    score = self._score(bucket, agent)
                    bucket.eligible[agent_id] = agent.buckets[bucket] = score
                    self._changed(agent, self._slots(agent))  # re-indexed by the next match()
        keep = self._prebuild(queue)
        now = self._clock()
        for key in list(queue.keys):
            call = self._calls[key[3]]
            if call.leaving is None:
                self._refile(call, now)
        keep.update(c.bucket for c in self._calls.values() if c.queue is queue and c.bucket is not None)
        for requirement, bucket in list(queue.buckets.items()):  # drop what the old rules needed
            if bucket not in keep:
                for agent_id in list(bucket.eligible):
                    self._unlink(self._agents[agent_id], bucket)
                del queue.buckets[requirement]

    # ------------------------------------------------------------------ internals: indexes

    def _post(self, agent: _Agent) -> None:
        for name in agent.skills:
            self._postings.setdefault(name, set()).add(agent.id)
            family, colon, _ = name.partition(":")
            if colon:
                self._postings.setdefault(family + ":*", set()).add(agent.id)

    def _unpost(self, agent: _Agent) -> None:
        for name in agent.skills:
            self._postings.get(name, set()).discard(agent.id)
            family, colon, _ = name.partition(":")
            if colon:
                self._postings.get(family + ":*", set()).discard(agent.id)

    def _bucket(self, queue: _Queue, requirement: Expression) -> _Bucket:
        bucket = queue.buckets.get(requirement)
        if bucket is None:
            bucket = queue.buckets[requirement] = _Bucket(queue, requirement)
            candidates: Iterable[_Agent]
            names = requirement.candidate_skills()
            if names is None:
                candidates = list(self._agents.values())
            else:
                ids: set[str] = set()
                for name in names:
                    ids |= self._postings.get(name, set())
                candidates = [self._agents[i] for i in sorted(ids)]
            for agent in candidates:
                if requirement.matches(agent.skills):
                    self._link(agent, bucket)
        return bucket

    def _score(self, bucket: _Bucket, agent: _Agent) -> float:
        queue = bucket.queue
        if queue.rules.policy != "most-skilled":
            return 0.0
        return bucket.requirement.score(agent.skills, queue.rules.weights)

    def _link(self, agent: _Agent, bucket: _Bucket) -> None:
        score = self._score(bucket, agent)
        bucket.eligible[agent.id] = agent.buckets[bucket] = score
        bucket.staffed += agent.staffed_slots()
        bucket.free += agent.free_slots()
        if agent.filed:  # settled as available: file it here too
            entry = (self._policy_key(bucket.queue, agent, score), agent.id)
            insort(bucket.agents, entry)
            agent.entries[bucket] = entry

    def _unlink(self, agent: _Agent, bucket: _Bucket) -> None:
        entry = agent.entries.pop(bucket, None)
        if entry is not None:
            _remove_sorted(bucket.agents, entry)
        del bucket.eligible[agent.id]
        del agent.buckets[bucket]
        bucket.staffed -= agent.staffed_slots()
        bucket.free -= agent.free_slots()

    def _policy_key(self, queue: _Queue, agent: _Agent, score: float) -> tuple[float, ...]:
        policy = queue.rules.policy
        if policy == "longest-idle":
            return (agent.idle_since,)
        if policy == "most-skilled":
            return (-score, agent.idle_since)
        if policy == "least-occupied":
            return (agent.calls / agent.max_calls, agent.handled, agent.idle_since)
        return (agent.last_rr.get(queue.id, -1), agent.idle_since)

    def _index(self, agent: _Agent) -> None:
        """File an available agent (that found no call) in its buckets, in policy order."""
        for bucket, score in agent.buckets.items():
            entry = (self._policy_key(bucket.queue, agent, score), agent.id)
            insort(bucket.agents, entry)
            agent.entries[bucket] = entry
        agent.filed = True

    def _unindex(self, agent: _Agent) -> None:
        for bucket, entry in agent.entries.items():
            _remove_sorted(bucket.agents, entry)
        agent.entries.clear()
        agent.filed = False

    def _slots(self, agent: _Agent) -> tuple[int, int, bool]:
        return agent.staffed_slots(), agent.free_slots(), agent.available

    def _changed(self, agent: _Agent, before: tuple[int, int, bool], *, freed: bool = False) -> None:
        """After any change to an agent: update the buckets' counters, take it out of the
        available lists (its policy key may have changed), restart its idle time if it
        became available, and mark it dirty (:meth:`match` files it again)."""
        staffed, free, was_available = before
        d_staffed, d_free = agent.staffed_slots() - staffed, agent.free_slots() - free
        if d_staffed or d_free:
            for bucket in agent.buckets:
                bucket.staffed += d_staffed
                bucket.free += d_free
        if agent.filed:
            self._unindex(agent)
        if agent.available:
            if freed or not was_available:
                agent.idle_since = self._clock()
            self._dirty_agents[agent.id] = None

    # ------------------------------------------------------------------ internals: calls

    def _file(self, call: _Call, now: float) -> None:
        """A call (new or re-queued) joins its queue's order and its bucket."""
        insort(call.queue.keys, call.key)
        self._evaluate(call, now, 0.0)
        if call.leaving is None:
            self._place(call)
        self._schedule(call, now)
        self._dirty_calls[call.id] = None

    def _refile(self, call: _Call, now: float, floor: float = 0.0) -> None:
        self._unplace(call)
        self._evaluate(call, now, floor)
        if call.leaving is None:
            self._place(call)
        self._schedule(call, now)
        self._dirty_calls[call.id] = None

    def _evaluate(self, call: _Call, now: float, floor: float) -> None:
        """Set the call's requirement bucket and next boundary for its wait now (at least
        ``floor``, the boundary being fired, so float rounding cannot miss a step)."""
        queue = call.queue
        rules = queue.rules
        wait = max(now - call.enqueued_at, floor)
        depth = len(queue.keys)
        ewt: float | None = None
        aht = self._aht.get(queue.id)
        if aht is not None:
            current = call.bucket or self._bucket(queue, rules.requirement_at(wait, None, depth))
            ewt = self._estimate(queue, current, call.key, aht)
        requirement = rules.requirement_at(wait, ewt, depth)
        if call.bucket is None or call.bucket.requirement != requirement:
            call.bucket = self._bucket(queue, requirement)
        call.boundary_s = rules.next_boundary(wait)
        overflow = rules.overflow
        if overflow is not None and overflow.ewt_s is not None and ewt is not None and ewt >= overflow.ewt_s:
            call.leaving, call.leave_at = "overflow", now

    def _place(self, call: _Call) -> None:
        if call.sticky_until is not None:
            assert call.sticky_agent is not None
            insort(self._agents[call.sticky_agent].held, call.key)
        else:
            assert call.bucket is not None
            insort(call.bucket.calls, call.key)
        call.placed = True

    def _unplace(self, call: _Call) -> None:
        if not call.placed:
            return
        if call.sticky_until is not None:
            assert call.sticky_agent is not None
            _remove_sorted(self._agents[call.sticky_agent].held, call.key)
        else:
            assert call.bucket is not None
            _remove_sorted(call.bucket.calls, call.key)
        call.placed = False

    def _forget(self, call: _Call) -> None:
        """A waiting call leaves the router."""
        self._unplace(call)
        _remove_sorted(call.queue.keys, call.key)
        del self._calls[call.id]

    def _release(self, call: _Call) -> None:
        """An offered call no longer holds its agent's slot."""
        agent = self._agents.get(call.agent_id or "")
        call.agent_id = None
        if agent is not None and call.id in agent.offers:
            before = self._slots(agent)
            agent.offers.discard(call.id)
            agent.calls -= 1
            self._changed(agent, before)

    def _deadline(self, call: _Call) -> float | None:
        if call.leaving is not None:
            return call.leave_at
        rules = call.queue.rules
        enq = call.enqueued_at
        times: list[float] = []
        if call.boundary_s is not None:
            times.append(enq + call.boundary_s)
        if call.sticky_until is not None:
            times.append(call.sticky_until)
        overflow = rules.overflow
        if overflow is not None and overflow.after_s is not None:
            times.append(enq + overflow.after_s)
        if rules.max_wait_s is not None:
            times.append(enq + rules.max_wait_s)
        if call.excluded:
            times.append(min(call.excluded.values()))
        return min(times) if times else None

    def _schedule(self, call: _Call, now: float) -> None:
        self._gen += 1
        call.gen = self._gen
        at = self._deadline(call)
        if at is not None:
            heapq.heappush(self._timers, (at, call.gen, call.id))
        if len(self._timers) > 4 * len(self._calls) + 64:
            live = [t for t in self._timers
                    if (c := self._calls.get(t[2])) is not None and c.gen == t[1] and c.state == _WAITING]
            heapq.heapify(live)
            self._timers = live

    def _advance(self, call: _Call, now: float) -> Expiry | None:
        """A waiting call's timer fired: leave, or apply whatever boundaries passed."""
        rules = call.queue.rules
        enq = call.enqueued_at
        leaving: tuple[float, int, Literal["overflow", "max_wait"]] | None = None
        if call.leaving is not None:
            leaving = (call.leave_at, 0, call.leaving)
        else:
            due: list[tuple[float, int, Literal["overflow", "max_wait"]]] = []
            if rules.max_wait_s is not None and enq + rules.max_wait_s <= now:
                due.append((enq + rules.max_wait_s, 0, "max_wait"))
            overflow = rules.overflow
            if overflow is not None and overflow.after_s is not None and enq + overflow.after_s <= now:
                due.append((enq + overflow.after_s, 1, "overflow"))
            if due:
                leaving = min(due)
        if leaving is not None:
            self._forget(call)
            return Expiry(call.id, call.queue.id, leaving[2], leaving[0], now - enq)
        self._unplace(call)
        if call.sticky_until is not None and call.sticky_until <= now:
            call.sticky_agent = call.sticky_until = None
        if call.excluded:
            call.excluded = {a: t for a, t in call.excluded.items() if t > now}
        floor = 0.0
        if call.boundary_s is not None and enq + call.boundary_s <= now:
            floor = call.boundary_s
        self._evaluate(call, now, floor)
        if call.leaving is None:
            self._place(call)
        self._schedule(call, now)
        self._dirty_calls[call.id] = None
        return None

    def _estimate(self, queue: _Queue, bucket: _Bucket, key: _Key, aht: float) -> float:
        if bucket.staffed <= 0:
            return math.inf
        ahead = self._ahead(queue, key)
        return max(0, ahead + 1 - bucket.free) * aht / bucket.staffed

    # ------------------------------------------------------------------ internals: matching

    def _best_call_for(self, agent: _Agent) -> _Call | None:
        """The first call in fairness order, across all queues, this agent is eligible for."""
        best: _Key | None = None
        agent_id = agent.id
        calls_by_id = self._calls
        for bucket in agent.buckets:
            calls = bucket.calls
            if not calls or (best is not None and calls[0] >= best):
                continue
            for key in calls:
                if best is not None and key >= best:
                    break
                excluded = calls_by_id[key[3]].excluded
                if excluded and agent_id in excluded:
                    continue
                best = key
                break
        for key in agent.held:
            if best is not None and key >= best:
                break
            call = calls_by_id[key[3]]
            if call.bucket is not None and agent_id in call.bucket.eligible and agent_id not in call.excluded:
                best = key
                break
        return None if best is None else calls_by_id[best[3]]

    def _best_agent_for(self, call: _Call) -> _Agent | None:
        """The best available eligible agent for a waiting call, under its queue's policy."""
        bucket = call.bucket
        if bucket is None:
            return None
        if call.sticky_until is not None:
            agent = self._agents.get(call.sticky_agent or "")
            if (agent is not None and agent.filed and agent.id in bucket.eligible
                    and agent.id not in call.excluded):
                return agent
            return None
        if bucket.free <= 0:
            return None
        excluded = call.excluded
        for _, agent_id in bucket.agents:  # available and filed: never stale
            if not excluded or agent_id not in excluded:
                return self._agents[agent_id]
        return None

    def _offer(self, call: _Call, agent: _Agent, now: float, offers: list[Offer]) -> None:
        self._unplace(call)
        _remove_sorted(call.queue.keys, call.key)
        call.state = _OFFERED
        call.agent_id = agent.id
        before = self._slots(agent)
        agent.calls += 1
        agent.offers.add(call.id)
        queue = call.queue
        queue.rr_seq += 1
        agent.last_rr[queue.id] = queue.rr_seq
        self._changed(agent, before)
        offers.append(Offer(call.id, agent.id, queue.id, call.priority, call.enqueued_at, now - call.enqueued_at))
