"""The call-record writer: batched, never blocked by one bad record, nothing lost on stop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.exc import OperationalError

from ctid.asterisk.ami_protocol import AMIParser, Message
from ctid.calls import Call, CallModel, CallState, ChangeKind
from ctid.store.calls import CallRecord, CallStore
from ctid.store.db import Database
from ctid.store.recorder import CallRecorder

CAPTURES = Path(__file__).parent / "fixtures" / "asterisk22"


def _calls(n: int) -> list[Call]:
    """n real calls: capture 02 replayed n times with renamed ids."""
    raw = (CAPTURES / "02-inbound-answer-playback-caller-hangup.ami").read_bytes()
    out: list[Call] = []
    for i in range(n):
        model = CallModel(lambda: datetime(2026, 12, 1, tzinfo=UTC))
        data = raw.replace(b"1795395", b"18%05d" % i)
        for item in AMIParser().feed(data):
            if isinstance(item, Message) and item.is_event:
                out += [c.call for c in model.feed(item) if c.kind is ChangeKind.ENDED]
    assert len(out) == n
    return out


class _GatedStore(CallStore):
    """The real store, with a gate after the first batch is written (to cancel mid-flush)."""

    def __init__(self, store: CallStore) -> None:
        self.__dict__.update(store.__dict__)
        self.first_written = asyncio.Event()
        self.gate = asyncio.Event()
        self.batches: list[int] = []

    async def upsert_calls(self, records: Sequence[CallRecord]) -> None:
        await super().upsert_calls(records)
        self.batches.append(len(records))
        self.first_written.set()
        await self.gate.wait()


async def test_stop_during_a_batch_loses_nothing(tmp_path: Path) -> None:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}") as db:
        store = _GatedStore(CallStore(db.sessions))
        recorder = CallRecorder(store, interval=0.0, batch=3)
        for call in _calls(10):
            recorder.mark(call)
        task = asyncio.create_task(recorder.flush())
        await asyncio.wait_for(store.first_written.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # The interrupted batch is back too (the upsert is idempotent), with the other 7.
        assert recorder.pending == 10 and recorder.written == 0
        store.gate.set()
        assert await recorder.flush()
        assert store.batches == [3, 3, 3, 3, 1]  # one transaction per batch of 3
        assert recorder.written == 10 and recorder.pending == 0
        assert len(await CallStore(db.sessions).list_calls()) == 10


async def test_a_record_the_database_refuses_does_not_block_the_others(tmp_path: Path) -> None:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}") as db:
        recorder = CallRecorder(CallStore(db.sessions), interval=0.0)
        calls = _calls(3)
        calls[0].call_id = "x" * 100  # longer than any call id may be
        for call in calls:
            recorder.mark(call)
        assert await recorder.flush()
        assert recorder.rejected == 1 and recorder.written == 2 and recorder.pending == 0


async def test_a_record_refused_inside_a_batch_is_set_aside_and_the_rest_of_the_batch_written(
        tmp_path: Path) -> None:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}") as db:
        store = CallStore(db.sessions)
        recorder = CallRecorder(store, interval=0.0, batch=2)
        calls = _calls(5)
        calls[2].tenant = None  # type: ignore[assignment]  # NOT NULL: the database refuses it
        for call in calls:
            recorder.mark(call)
        assert await recorder.flush()
        assert recorder.rejected == 1 and recorder.written == 4 and recorder.pending == 0
        stored = {record.call_id for record in await store.list_calls()}
        assert stored == {call.call_id for call in calls} - {calls[2].call_id}
        for call_id in stored:  # with their legs
            record = await store.get_call(call_id)
            assert record is not None and record.legs


async def test_a_database_outage_keeps_every_call_for_the_next_flush(tmp_path: Path) -> None:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}") as db:
        store = CallStore(db.sessions)
        recorder = CallRecorder(store, interval=0.0, batch=2)
        for call in _calls(3):
            recorder.mark(call)
        real = store.upsert_calls

        async def down(records: Sequence[CallRecord]) -> None:
            raise OperationalError("INSERT", {}, Exception("database is locked"))

        store.upsert_calls = down  # type: ignore[method-assign]
        assert not await recorder.flush()
        assert recorder.pending == 3 and recorder.failures == 1 and recorder.rejected == 0
        store.upsert_calls = real  # type: ignore[method-assign]
        assert await recorder.flush()
        assert recorder.written == 3 and recorder.pending == 0


async def test_the_bound_drops_the_oldest_when_every_call_is_still_up(tmp_path: Path) -> None:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}") as db:
        recorder = CallRecorder(CallStore(db.sessions), max_pending=2)
        calls = _calls(3)
        for call in calls:
            call.state = CallState.CONNECTED
            recorder.mark(call)
        assert recorder.pending == 2 and recorder.dropped == 1
