"""The screen pop's CRM data: a lookup started when the call starts, never on the offer path.

When the call model reports a new inbound call whose service line has a ``crm`` table,
:class:`CallEnricher` starts the lookup at once (in parallel with the IVR), through the
one shared :class:`~ctid.crm.client.CRMClient`. The outcome is attached to the call with
the model's ``annotate``: ``data["crm"]`` (the JSON object, or None) and
``data["crm_error"]`` (None, or the client's error code such as ``"timeout"``). The
ACD's ``call.offered`` carries both; a pop never waits for a lookup still running, it
goes out with ``crm_error = "pending"``.

Template values: ``caller``, ``caller_e164``, ``dnis``, ``service_line``, ``tenant`` and
``call_id`` (ctid's id when the call is already identified, else Asterisk's Linkedid).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from ctid.asterisk.safety import e164_or_none
from ctid.calls import Call, CallModel, CallModelError, Direction
from ctid.config import Config, CRMConfig
from ctid.crm.client import CRMClient

log = structlog.get_logger(__name__)


def lookup_values(call: Call) -> dict[str, object]:
    return {"caller": call.caller_number, "caller_e164": e164_or_none(call.caller_number or ""),
            "dnis": call.dnis, "service_line": call.service_line, "tenant": call.tenant, "call_id": call.call_id}


class CallEnricher:
    """Owns the CRM lookups in flight (bounded); :meth:`close` cancels them."""

    def __init__(self, client: CRMClient, config: Config, *, max_in_flight: int = 512) -> None:
        self._client = client
        self._lines = {line.id: line for line in config.service_lines}
        self._max = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self.started = 0
        self.skipped = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def on_started(self, model: CallModel, call: Call) -> None:
        line = self._lines.get(call.service_line or "")
        if line is None or line.crm is None or call.direction is not Direction.INBOUND:
            return
        if len(self._tasks) >= self._max:
            self.skipped += 1
            log.warning("crm.too_many_lookups", in_flight=len(self._tasks), service_line=line.id)
            self._annotate(model, call, None, "overloaded")
            return
        self._annotate(model, call, None, "pending")
        task = asyncio.create_task(self._lookup(model, call, line.crm), name=f"crm-{call.call_id}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        self.started += 1

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("crm.lookup_failed", error=repr(task.exception()))

    async def _lookup(self, model: CallModel, call: Call, crm: CRMConfig) -> None:
        result = await self._client.lookup(crm, lookup_values(call))
        self._annotate(model, call, result.data if result.ok else None, None if result.ok else result.error)

    @staticmethod
    def _annotate(model: CallModel, call: Call, data: object, error: str | None) -> None:
        # The call may have been re-keyed meanwhile: annotate it under its current id.
        with contextlib.suppress(CallModelError):
            model.annotate(call.call_id, data={"crm": data, "crm_error": error})

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
