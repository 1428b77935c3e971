"""The call-record writer: batched, never blocked by one bad record, nothing lost on stop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

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
    """The real store, with a gate after the first write (to cancel mid-batch)."""

    def __init__(self, store: CallStore) -> None:
        self.__dict__.update(store.__dict__)
        self.first_written = asyncio.Event()
        self.gate = asyncio.Event()

    async def upsert_call(self, record: CallRecord) -> None:
        await super().upsert_call(record)
        self.first_written.set()
        await self.gate.wait()


async def test_stop_during_a_batch_loses_nothing(tmp_path: Path) -> None:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}") as db:
        store = _GatedStore(CallStore(db.sessions))
        recorder = CallRecorder(store, interval=0.0)
        for call in _calls(10):
            recorder.mark(call)
        task = asyncio.create_task(recorder.flush())
        await asyncio.wait_for(store.first_written.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # The interrupted record is back too (the upsert is idempotent), with the other 9.
        assert recorder.pending == 10
        store.gate.set()
        assert await recorder.flush()
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


async def test_the_bound_drops_the_oldest_when_every_call_is_still_up(tmp_path: Path) -> None:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}") as db:
        recorder = CallRecorder(CallStore(db.sessions), max_pending=2)
        calls = _calls(3)
        for call in calls:
            call.state = CallState.CONNECTED
            recorder.mark(call)
        assert recorder.pending == 2 and recorder.dropped == 1
