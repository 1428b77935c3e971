"""Who last handled a caller: the memory behind sticky agents.

A queue with ``sticky`` (``days``, ``wait_s``) first offers a call to the agent who last
handled the same caller (E.164 number, or the raw number when it has none) in that
queue within ``days``. The dispatcher asks :meth:`StickyHistory.lookup` while it queues
the call; the answer comes from

1. an in-memory cache of recent answers, updated by :meth:`StickyHistory.remember` each
   time an answered call ends (so a caller who calls back soon is found at once), then
2. the call records (``calls`` table: ``data.agent_id`` and ``data.queue``, which the
   dispatcher annotates on the call), by an async query.

The enqueue path never waits for the database longer than ``bound_s`` (50 ms by
default): past that the call is queued with no sticky agent, and the query carries on in
the background and fills the cache for the next call. A query that fails is logged and
counts as "no previous agent". Negative answers are cached for ``negative_ttl_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ctid.store.models import Call

__all__ = ["DEFAULT_BOUND_S", "Previous", "StickyHistory", "StickyQuery", "store_query"]

log = structlog.get_logger(__name__)

DEFAULT_BOUND_S: Final = 0.05
_ROWS: Final = 50  # recent answered calls of the caller read per query


@dataclass(frozen=True, slots=True)
class Previous:
    """The agent who handled the caller's last call in a queue, and when (epoch s)."""

    agent_id: str
    at: float


StickyQuery = Callable[[str, str, tuple[str, ...], float], Awaitable[Previous | None]]
"""``query(tenant, queue, numbers, since_epoch)``: the caller's last handled call."""


def store_query(sessions: async_sessionmaker[AsyncSession]) -> StickyQuery:
    """The query on the call records, for :class:`StickyHistory`."""

    async def query(tenant: str, queue: str, numbers: tuple[str, ...], since: float) -> Previous | None:
        stmt = (select(Call.data, Call.answered_at, Call.ended_at)
                .where(Call.tenant == tenant, Call.caller_number.in_(numbers), Call.answered_at.is_not(None),
                       Call.created_at >= datetime.fromtimestamp(since, UTC) - timedelta(hours=1))
                .order_by(Call.created_at.desc()).limit(_ROWS))
        async with sessions() as session:
            rows = (await session.execute(stmt)).all()
        for data, answered_at, ended_at in rows:
            if not isinstance(data, dict) or data.get("queue") != queue:
                continue
            agent_id = data.get("agent_id")
            at = ended_at or answered_at
            if isinstance(agent_id, str) and agent_id and at is not None and at.timestamp() >= since:
                return Previous(agent_id, at.timestamp())
        return None

    return query


_Key = tuple[str, str, str]  # tenant, queue, caller key


class StickyHistory:
    """The cache and the bounded lookup. ``clock`` returns epoch seconds."""

    def __init__(self, query: StickyQuery | None, clock: Callable[[], float], *, bound_s: float = DEFAULT_BOUND_S,
                 max_entries: int = 100_000, negative_ttl_s: float = 300.0) -> None:
        self._query = query
        self._clock = clock
        self.bound_s = bound_s
        self._max = max_entries
        self._negative_ttl = negative_ttl_s
        self._cache: OrderedDict[_Key, tuple[Previous | None, float]] = OrderedDict()  # -> (answer, cached at)
        self._inflight: dict[_Key, asyncio.Task[Previous | None]] = {}
        self.hits = 0
        self.queries = 0
        self.timeouts = 0

    @staticmethod
    def caller_key(e164: str | None, raw: str | None) -> str | None:
        return e164 or (raw or None)

    def remember(self, tenant: str, queue: str, caller: str, agent_id: str, at: float | None = None) -> None:
        """An answered call of ``caller`` in ``queue``, handled by ``agent_id``, ended."""
        self._put((tenant, queue, caller), Previous(agent_id, self._clock() if at is None else at))

    def _put(self, key: _Key, answer: Previous | None) -> None:
        self._cache[key] = (answer, self._clock())
        self._cache.move_to_end(key)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)

    def cached(self, tenant: str, queue: str, caller: str, window_s: float) -> Previous | bool | None:
        """The cached answer (a :class:`Previous` or None), or False if the cache cannot say."""
        entry = self._cache.get((tenant, queue, caller))
        if entry is None:
            return False
        answer, cached_at = entry
        now = self._clock()
        if answer is None:
            return None if now - cached_at <= self._negative_ttl else False
        return answer if 0 <= now - answer.at <= window_s else None

    async def lookup(self, tenant: str, queue: str, caller: str, numbers: tuple[str, ...],
                     window_s: float) -> str | None:
        """The agent to stick to, or None; waits at most ``bound_s`` for the database."""
        hit = self.cached(tenant, queue, caller, window_s)
        if hit is not False:
            self.hits += 1
            return hit.agent_id if isinstance(hit, Previous) else None
        if self._query is None:
            return None
        key = (tenant, queue, caller)
        task = self._inflight.get(key)
        if task is None:
            self.queries += 1
            task = asyncio.create_task(self._fetch(key, numbers, self._clock() - window_s),
                                       name=f"sticky-{queue}")
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))  # type: ignore[misc]
        try:
            async with asyncio.timeout(self.bound_s):
                found = await asyncio.shield(task)
        except TimeoutError:
            self.timeouts += 1
            log.info("acd.sticky_lookup_slow", queue=queue, bound_ms=round(self.bound_s * 1000))
            return None
        return found.agent_id if found is not None else None

    async def _fetch(self, key: _Key, numbers: tuple[str, ...], since: float) -> Previous | None:
        assert self._query is not None
        try:
            found = await self._query(key[0], key[1], numbers, since)
        except Exception as exc:  # the database is down or slow: no sticky agent this time
            log.warning("acd.sticky_lookup_failed", queue=key[1], reason=f"{type(exc).__name__}: {exc}")
            return None
        current = self._cache.get(key)
        if current is None or current[0] is None or (found is not None and found.at > current[0].at):
            self._put(key, found)  # a remember() that came meanwhile is newer: keep it
        return found

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def stats(self) -> dict[str, Any]:
        return {"cached": len(self._cache), "hits": self.hits, "queries": self.queries, "timeouts": self.timeouts}
