"""``queue.stats`` for the configured queues, until the ACD computes them itself.

The ACD issue owns routing and the real figures (waiting calls, longest wait, EWT,
service level). Until it lands no call waits in a ctid queue, so ``waiting`` is 0,
``longest_wait_s`` 0, ``ewt_s`` null and the service-level counters are 0 with a null
value; what is real is the agents by state, counted over the agents of the queue's
tenant. Every change of an agent's state refreshes the queues of its tenant through
the :class:`~ctid.events.stats.StatsSnapshotter`, which rate-limits and dedupes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ctid.agents import AgentRegistry
from ctid.config import Config
from ctid.events.stats import StatsSnapshotter

STATES = ("ready", "reserved", "on_call", "busy", "wrap_up", "paused")


class QueueStatsFeed:
    def __init__(self, config: Config, agents: AgentRegistry, snapshotter: StatsSnapshotter,
                 *, threshold_s: float = 20.0, interval_s: float | None = None) -> None:
        self._config = config
        self._agents = agents
        self._snapshotter = snapshotter
        self._threshold = threshold_s
        self._interval = interval_s if interval_s is not None else config.events.stats_interval

    def snapshot(self, tenant: str, today: datetime) -> dict[str, Any]:
        counts = dict.fromkeys(STATES, 0)
        logged_in = 0
        for agent in self._agents:
            if agent.tenant != tenant:
                continue
            state = str(agent.state.value)
            if state != "logged_out":
                logged_in += 1
            if state in counts:
                counts[state] += 1
        zone = self._config.tenant(tenant).zone
        return {
            "waiting": 0,
            "longest_wait_s": 0.0,
            "agents": {**counts, "logged_in": logged_in},
            "sl_today": {"answered": 0, "abandoned": 0, "within_threshold": 0, "threshold_s": self._threshold,
                         "value": None, "date": today.astimezone(zone).date().isoformat()},
            "ewt_s": None,
            "interval_s": self._interval,
        }

    def refresh(self, now: datetime, tenant: str | None = None) -> None:
        """Offer fresh snapshots of the queues of ``tenant`` (all queues when None)."""
        cache: dict[str, dict[str, Any]] = {}
        for queue in self._config.queues:
            if tenant is not None and queue.tenant != tenant:
                continue
            if queue.tenant not in cache:
                cache[queue.tenant] = self.snapshot(queue.tenant, now)
            self._snapshotter.update(queue.tenant, queue.id, cache[queue.tenant])
