"""``queue.stats`` snapshots, rate-limited per queue so they never flood the outbox.

Whoever computes queue statistics calls :meth:`StatsSnapshotter.update` as often
as it likes (on every call arrival, answer, agent change). The snapshotter
publishes a ``queue.stats`` event:

* at most once per queue per ``interval`` seconds;
* only when the snapshot differs from the last one published for that queue;
* with the *latest* snapshot at the end of an interval (intermediate ones are
  skipped: a consumer wants the current state, not its history).

It is timer-driven per queue: the first change after a quiet period goes out at
once and opens a window of ``interval`` seconds; changes inside the window are
remembered, and one timer for that queue publishes the latest at the window's
end (and opens a new window). A queue that does not change costs nothing; there
is no global tick scanning every queue.

Over MQTT the event is retained on ``{prefix}/v1/{tenant}/queues/{queue}/stats``,
so a subscriber that arrives late still gets the current figures. Like every
event, delivery is at least once and consumers dedupe by ``id``.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import structlog

from ctid.events.bus import EventBus
from ctid.events.schema import Event

__all__ = ["StatsSnapshotter"]

log = structlog.get_logger(__name__)


class _Timer(Protocol):
    def cancel(self) -> None: ...


Scheduler = Callable[[float, Callable[[], None]], _Timer]
"""``call_later(delay, callback)``: the event loop's, or a fake one in tests."""


@dataclass
class _QueueState:
    published: dict[str, Any] | None = None
    latest: dict[str, Any] | None = None
    window: _Timer | None = None  # set while a publication's interval is running


class StatsSnapshotter:
    """Publishes ``queue.stats`` on ``bus``: at most one per queue per ``interval``, only on change.

    ``clock`` stamps the events; ``call_later`` (default: the running loop's)
    schedules the end of each queue's window.
    """

    def __init__(self, bus: EventBus, interval: float, clock: Callable[[], datetime], *,
                 call_later: Scheduler | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._bus = bus
        self._interval = interval
        self._clock = clock
        self._call_later = call_later
        self._queues: dict[tuple[str, str], _QueueState] = {}
        self.published = 0

    def update(self, tenant: str, queue: str, snapshot: dict[str, Any]) -> None:
        """The current statistics of one queue. Cheap; call it on every change.

        The snapshot is copied, so the caller may keep mutating its own dict.
        """
        state = self._queues.setdefault((tenant, queue), _QueueState())
        state.latest = copy.deepcopy(snapshot)
        if state.window is None and state.latest != state.published:
            self._publish(tenant, queue, state)

    def close(self) -> None:
        """Cancel every pending window; later changes are no longer published until :meth:`update`."""
        for state in self._queues.values():
            if state.window is not None:
                state.window.cancel()
                state.window = None

    def _publish(self, tenant: str, queue: str, state: _QueueState) -> None:
        assert state.latest is not None
        self._bus.publish(Event(type="queue.stats", tenant=tenant, ts=self._clock(), data=state.latest,
                                queue=queue))
        state.published = state.latest
        self.published += 1
        schedule = self._call_later or asyncio.get_running_loop().call_later
        state.window = schedule(self._interval, lambda: self._window_ended(tenant, queue))

    def _window_ended(self, tenant: str, queue: str) -> None:
        state = self._queues.get((tenant, queue))
        if state is None:
            return
        state.window = None
        if state.latest == state.published:
            return  # unchanged: stay quiet until the next change
        try:
            self._publish(tenant, queue, state)
        except Exception:  # a timer callback: nobody above us would see it
            log.exception("events.stats_publish_failed", tenant=tenant, queue=queue)
