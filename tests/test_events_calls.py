"""Call events from the call model, replayed from real captures: one id per call."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from ctid.asterisk.ami_protocol import AMIParser, Message
from ctid.calls import CallModel
from ctid.events.calls import CallNotifier
from ctid.events.contract import validate
from ctid.events.schema import Event

CAPTURES = Path(__file__).parent / "fixtures" / "asterisk22"


def _clock() -> datetime:
    return datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _events(name: str) -> list[Message]:
    items = AMIParser().feed((CAPTURES / name).read_bytes())
    return [m for m in items if isinstance(m, Message) and m.is_event]


def _replay(name: str, grace: float) -> list[Event]:
    published: list[Event] = []
    model = CallModel(_clock)
    notifier = CallNotifier(lambda e: published.append(e) or e, identify_grace=grace)
    for message in _events(name):
        notifier.on_changes(model.feed(message))
    notifier.close()
    for seq, event in enumerate(published, 1):
        validate(event.with_seq(seq).envelope(), strict=True)
    return published


async def test_events_wait_for_ctids_call_id_and_carry_only_it() -> None:
    # Capture 13: Newchannel first, then Set(__CTID_CALL_ID=abc123).
    events = _replay("13-channelvars-inherited-dial.ami", grace=5.0)
    assert [e.type for e in events] == ["call.started", "call.answered", "call.ended"]
    assert {e.call_id for e in events} == {"abc123"}
    assert events[-1].data["hangup_by"] == "caller"


async def test_a_call_ctid_never_identifies_goes_out_under_its_linkedid() -> None:
    # Capture 02: the dialplan answers and plays a prompt; the caller hangs up before any
    # agent: for the contact centre that is an abandoned call.
    events = _replay("02-inbound-answer-playback-caller-hangup.ami", grace=5.0)
    assert [e.type for e in events] == ["call.started", "call.abandoned", "call.ended"]
    assert len({e.call_id for e in events}) == 1
    assert events[0].data["caller"]["number"] == "+15551230001"
    assert events[0].data["caller"]["e164"] == "+15551230001"


async def test_abandoned_precedes_ended_and_every_call_ends_once() -> None:
    events = _replay("05-queue-sales-caller-abandon.ami", grace=0.0)
    types = [e.type for e in events]
    assert types.count("call.ended") == 1
    assert types.index("call.abandoned") == types.index("call.ended") - 1
    abandoned = events[types.index("call.abandoned")]
    assert abandoned.data["where"] == "ringing" and abandoned.data["wait_s"] is not None


async def test_held_events_are_released_after_the_grace() -> None:
    published: list[Event] = []
    model = CallModel(_clock)
    notifier = CallNotifier(lambda e: published.append(e) or e, identify_grace=0.05)
    first = next(m for m in _events("02-inbound-answer-playback-caller-hangup.ami") if m.name == "Newchannel")
    notifier.on_changes(model.feed(first))
    assert published == []
    async with asyncio.timeout(2):
        while not published:  # noqa: ASYNC110 - the notifier's own timer fires
            await asyncio.sleep(0.01)
    assert [e.type for e in published] == ["call.started"]


async def test_every_capture_gives_contract_valid_events_and_one_end_per_call() -> None:
    for path in sorted(CAPTURES.glob("*.ami")):
        events = _replay(path.name, grace=0.0)
        ends: dict[str, int] = {}
        for event in events:
            if event.type == "call.ended":
                ends[event.call_id or ""] = ends.get(event.call_id or "", 0) + 1
        assert all(n == 1 for n in ends.values()), path.name
        started = {e.call_id for e in events if e.type == "call.started"}
        assert started == set(ends), path.name
