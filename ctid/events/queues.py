"""``queue.stats``: the figures of each queue, published through the rate-limited
:class:`~ctid.events.stats.StatsSnapshotter`.

What a snapshot holds (``docs/schema/queue.stats.json``):

- ``waiting``, ``longest_wait_s`` and ``ewt_s`` (for a call entering now) come from the
  ACD (:class:`QueueFigures`, implemented by ``ctid.acd.dispatcher.Dispatcher``). Until
  the ACD is attached (:meth:`QueueStatsFeed.attach`) they are 0, 0 and null.
- ``agents``: the agents who serve the queue, by state: the agents of the queue's tenant
  whose skills match the queue's *base* requirement (relaxation steps not counted).
- ``sl_today``: the service level since midnight in the tenant's time zone, per the KPI
  definition in the design: ``within_threshold / (answered + abandoned)``, where
  ``within_threshold`` counts the calls answered with a queue wait ``<= T``
  (``sl_threshold_s``), and short abandons (a queue wait ``< short_abandon_s``) are left out
  of both terms and counted apart in ``short_abandoned``. ``value`` is null while no call
  counts. :class:`ServiceLevelDay` keeps the counters of one queue; the first record or
  snapshot after the tenant's local midnight starts a new day at zero.

Counters live in memory. After a restart, :meth:`QueueStatsFeed.rebuild` recounts the
day from the stored call records (``ctid.store.calls.CallStore.queue_outcomes_since``)
with the same rules as the live counting: a call whose data names a queue, its
``enqueued_at`` and the ``agent_id`` the ACD annotates on answer counts as answered at
its ``answered_at``; one never answered whose caller hung up, and that left no callback,
counts as abandoned at its ``ended_at``. Calls whose record was not written before the
restart (the writer batches every 0.2 s) are missing from the rebuilt counts.

Refreshes: every agent state change refreshes the queues of its tenant (``ctid.app``),
and the ACD refreshes a queue on each of its events (enqueue, offer, answer, abandon,
RONA, AHT update) with :meth:`QueueStatsFeed.refresh_queue`. The snapshotter drops
unchanged snapshots and sends at most one per queue per interval.

Refreshes are coalesced: on a running event loop, :meth:`QueueStatsFeed.refresh_queue`
only marks the queue, and one callback (``call_soon``) takes one snapshot of each marked
queue at the next loop iteration. At 200 calls/s a queue is refreshed several times per
iteration (one AMI read carries many events; an offer reserves an agent, which
refreshes the tenant's queues, then refreshes its queue); each snapshot walks the
queue's agents, and taking it synchronously sat between the event that makes an offer
and the offer's screen pop. The figures published are the same: the latest state, and
the snapshotter rate-limits them anyway. Without a running loop (a script, a unit test)
the snapshot is taken at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import structlog

from ctid.acd.expr import Expression
from ctid.agents import AgentRegistry
from ctid.agents.registry import Agent
from ctid.config import Config
from ctid.events.bus import EventBusError
from ctid.events.schema import AGENT_STATES
from ctid.events.stats import StatsSnapshotter
from ctid.store.calls import QueueOutcome

__all__ = ["STATES", "QueueFigures", "QueueStatsFeed", "ServiceLevelDay"]

log = structlog.get_logger(__name__)

#: The states agents are counted by: the contract's agent states, less ``logged_out``.
STATES = tuple(state for state in AGENT_STATES if state != "logged_out")


class QueueFigures(Protocol):
    """What the ACD tells the feed about its queues."""

    def queue_ids(self) -> Iterable[tuple[str, str]]:
        """``(queue id, tenant)`` of every queue the ACD routes."""
        ...

    def requirement(self, queue_id: str) -> Expression | None:
        """The queue's base requirement (None: unknown queue)."""
        ...

    def sl_threshold_s(self, queue_id: str) -> float:
        ...

    def waiting_count(self, queue_id: str) -> int:
        ...

    def longest_wait_s(self, queue_id: str) -> float:
        ...

    def ewt_s(self, queue_id: str) -> float | None:
        ...


@dataclass(slots=True)
class ServiceLevelDay:
    """One queue's service-level counters for one local day of its tenant.

    Pure: every method takes the instant; the tenant's ``zone`` decides the day.
    """

    zone: ZoneInfo
    day: date | None = None
    answered: int = 0
    abandoned: int = 0
    within_threshold: int = 0
    short_abandoned: int = 0

    def roll(self, now: datetime) -> None:
        """Start a new day at zero if ``now`` is past the tenant's local midnight."""
        today = now.astimezone(self.zone).date()
        if today != self.day:
            self.day = today
            self.answered = self.abandoned = self.within_threshold = self.short_abandoned = 0

    def record_answered(self, now: datetime, wait_s: float, threshold_s: float) -> None:
        self.roll(now)
        self.answered += 1
        if wait_s <= threshold_s:
            self.within_threshold += 1

    def record_abandoned(self, now: datetime, wait_s: float, short_abandon_s: float) -> None:
        self.roll(now)
        if wait_s < short_abandon_s:
            self.short_abandoned += 1
        else:
            self.abandoned += 1

    @property
    def value(self) -> float | None:
        counted = self.answered + self.abandoned
        return None if counted == 0 else self.within_threshold / counted

    def snapshot(self, now: datetime, threshold_s: float) -> dict[str, Any]:
        self.roll(now)
        assert self.day is not None
        value = self.value
        return {"answered": self.answered, "abandoned": self.abandoned,
                "within_threshold": self.within_threshold, "short_abandoned": self.short_abandoned,
                "threshold_s": threshold_s, "value": None if value is None else round(value, 6),
                "date": self.day.isoformat()}


@dataclass(slots=True)
class _Eligibility:
    """Which agents match a queue's base requirement, cached per agent config."""

    requirement: Expression
    by_agent: dict[str, tuple[object, bool]] = field(default_factory=dict)


class QueueStatsFeed:
    def __init__(self, config: Config, agents: AgentRegistry, snapshotter: StatsSnapshotter,
                 *, threshold_s: float = 20.0, interval_s: float | None = None) -> None:
        self._config = config
        self._agents = agents
        self._snapshotter = snapshotter
        self._threshold = threshold_s
        self._interval = interval_s if interval_s is not None else config.events.stats_interval
        self._figures: QueueFigures | None = None
        self._sl: dict[str, ServiceLevelDay] = {}
        self._eligible: dict[str, _Eligibility] = {}
        self._marked: dict[tuple[str, str], datetime] = {}  # (queue, tenant) -> the latest `now` asked
        self._flushing_on: asyncio.AbstractEventLoop | None = None  # the loop a snapshot callback waits on

    def attach(self, figures: QueueFigures) -> None:
        """The ACD that routes the queues (waiting calls, EWT, requirements)."""
        self._figures = figures
        self._eligible.clear()

    # -- counters ------------------------------------------------------------------------

    def _day(self, queue_id: str, tenant: str) -> ServiceLevelDay:
        day = self._sl.get(queue_id)
        if day is None:
            day = self._sl[queue_id] = ServiceLevelDay(self._zone(tenant))
        return day

    def _zone(self, tenant: str) -> ZoneInfo:
        try:
            return self._config.tenant(tenant).zone
        except (KeyError, LookupError, ValueError):
            return ZoneInfo("UTC")

    def record_answered(self, queue_id: str, tenant: str, now: datetime, wait_s: float) -> None:
        """A call of the queue was answered after waiting ``wait_s`` in it."""
        self._day(queue_id, tenant).record_answered(now, wait_s, self._threshold_for(queue_id))

    def record_abandoned(self, queue_id: str, tenant: str, now: datetime, wait_s: float,
                         short_abandon_s: float) -> None:
        """The caller hung up after waiting ``wait_s`` in the queue (short under ``short_abandon_s``)."""
        self._day(queue_id, tenant).record_abandoned(now, wait_s, short_abandon_s)

    def rebuild(self, outcomes: Iterable[QueueOutcome], now: datetime) -> int:
        """Recount today's service level from stored calls (see the module docstring);
        returns how many calls were counted. Call it before any live record."""
        known = {queue_id: tenant for queue_id, tenant in self._figures.queue_ids()} if self._figures else {}
        counted = 0
        for outcome in outcomes:
            queue_id = outcome.data.get("queue")
            enqueued = outcome.data.get("enqueued_at")
            if not isinstance(queue_id, str) or known.get(queue_id) != outcome.tenant:
                continue
            if not isinstance(enqueued, int | float) or isinstance(enqueued, bool):
                continue
            zone = self._zone(outcome.tenant)
            today = now.astimezone(zone).date()
            if outcome.answered_at is not None:
                if "agent_id" not in outcome.data or outcome.answered_at.astimezone(zone).date() != today:
                    continue
                self.record_answered(queue_id, outcome.tenant, outcome.answered_at,
                                     max(0.0, outcome.answered_at.timestamp() - float(enqueued)))
            elif (outcome.hangup_by == "caller" and outcome.ended_at is not None and "callback_id" not in outcome.data
                  and outcome.ended_at.astimezone(zone).date() == today):
                try:
                    short = self._config.queue(queue_id).short_abandon_s
                except KeyError:
                    continue
                self.record_abandoned(queue_id, outcome.tenant, outcome.ended_at,
                                      max(0.0, outcome.ended_at.timestamp() - float(enqueued)), short)
            else:
                continue
            counted += 1
        return counted

    def service_level(self, queue_id: str) -> ServiceLevelDay | None:
        return self._sl.get(queue_id)

    def _threshold_for(self, queue_id: str) -> float:
        figures = self._figures
        return self._threshold if figures is None else figures.sl_threshold_s(queue_id)

    # -- snapshots -----------------------------------------------------------------------

    def _serves(self, queue_id: str, requirement: Expression | None, agent: Agent) -> bool:
        if requirement is None:
            return True
        cache = self._eligible.get(queue_id)
        if cache is None or cache.requirement != requirement:
            cache = self._eligible[queue_id] = _Eligibility(requirement)
        config = agent.config
        hit = cache.by_agent.get(agent.id)
        if hit is not None and hit[0] is config:
            return hit[1]
        ok = requirement.matches(dict(config.skills))
        cache.by_agent[agent.id] = (config, ok)
        return ok

    def _agent_counts(self, queue_id: str, tenant: str) -> dict[str, int]:
        figures = self._figures
        requirement = None if figures is None else figures.requirement(queue_id)
        counts = dict.fromkeys(STATES, 0)
        logged_in = 0
        for agent in self._agents:
            if agent.tenant != tenant or not self._serves(queue_id, requirement, agent):
                continue
            state = str(agent.state.value)
            if state != "logged_out":
                logged_in += 1
            if state in counts:
                counts[state] += 1
        return {**counts, "logged_in": logged_in}

    def snapshot_queue(self, queue_id: str, tenant: str, now: datetime) -> dict[str, Any]:
        figures = self._figures
        threshold = self._threshold_for(queue_id)
        return {
            "waiting": 0 if figures is None else figures.waiting_count(queue_id),
            "longest_wait_s": 0.0 if figures is None else round(max(0.0, figures.longest_wait_s(queue_id)), 3),
            "agents": self._agent_counts(queue_id, tenant),
            "sl_today": self._day(queue_id, tenant).snapshot(now, threshold),
            "ewt_s": None if figures is None else _rounded(figures.ewt_s(queue_id)),
            "interval_s": self._interval,
        }

    def _queues(self) -> Iterable[tuple[str, str]]:
        if self._figures is not None:
            return list(self._figures.queue_ids())
        return [(q.id, q.tenant) for q in self._config.queues]

    def refresh_queue(self, queue_id: str, tenant: str, now: datetime) -> None:
        """Offer a fresh snapshot of one queue (the ACD calls this on each queue event).

        On a running loop the snapshot is taken at the next loop iteration, once for every
        refresh of the queue asked until then (see the module docstring); it never raises
        into the caller. Without a running loop it is taken now."""
        self._marked[(queue_id, tenant)] = now
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._take_snapshots()
            return
        if self._flushing_on is not loop:  # not yet scheduled on this loop (a closed one never runs it)
            self._flushing_on = loop
            loop.call_soon(self._take_snapshots)

    def _take_snapshots(self) -> None:
        marked, self._marked, self._flushing_on = self._marked, {}, None
        for (queue_id, tenant), now in marked.items():
            try:
                self._snapshotter.update(tenant, queue_id, self.snapshot_queue(queue_id, tenant, now))
            except EventBusError:
                return  # the daemon is stopping: the bus takes no more events
            except Exception:  # statistics must never break routing, nor the other queues
                log.exception("events.queue_stats_failed", queue=queue_id, tenant=tenant)

    def refresh(self, now: datetime, tenant: str | None = None) -> None:
        """Offer fresh snapshots of the queues of ``tenant`` (all queues when None)."""
        for queue_id, queue_tenant in self._queues():
            if tenant is None or queue_tenant == tenant:
                self.refresh_queue(queue_id, queue_tenant, now)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(max(0.0, value), 3)
