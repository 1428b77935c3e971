"""Call events from the call model, replayed from real captures: one id per call. And
end to end (daemon + simulator over AMI and FastAGI): a call is identified as soon as
ctid's FastAGI script sets its id, though no ``VarSet`` reaches ctid."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path

from ctid.app import Daemon
from ctid.asterisk.ami_protocol import AMIParser, Message
from ctid.calls import CHANNELVARS, CallModel
from ctid.config import parse
from ctid.events.calls import CallNotifier
from ctid.events.contract import validate
from ctid.events.schema import Event
from ctid.simulator import Dialplan, Endpoint, Simulator

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


# -- identified promptly although the AMI user reads no VarSet ------------------------------

SECRET = "test-secret"
GRACE = 2.0  # identify_grace: how long call events wait for ctid's id
# IVR-ish: after the FastAGI script the caller listens to a prompt for 60 simulated s
# (3 s here). A channel in an IVR or on hold emits no call-class event, and the VarSet
# of __CTID_CALL_ID is class dialplan, which the simulator's user, like ctid's in the
# sample manager.conf, does not read.
IVR_PLAN = """[ctid-inbound]
exten => _X.,1,Answer()
 same => n,AGI(agi://ctid/inbound?dnis=${EXTEN})
 same => n,Wait(60)
 same => n,Hangup()
"""


class _Sink:
    name = "test-sink"

    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []

    def offer(self, event: Event, payload: str) -> Awaitable[None] | None:
        self.events.append((asyncio.get_running_loop().time(), event))
        return None


async def test_a_call_in_the_ivr_is_identified_at_once_without_any_varset(tmp_path: Path) -> None:
    sim = Simulator(dialplan=Dialplan.from_text(IVR_PLAN), users={"ctid": SECRET}, channelvars=CHANNELVARS,
                    endpoints={"trunk": Endpoint("trunk", context="ctid-inbound", ring_s=0.0)}, time_scale=0.05)
    config = parse({
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'ctid.db'}"},
        "agi": {"port": 0}, "http": {"port": 0}, "events": {"identify_grace": GRACE},
        "asterisk": [{"id": "sim", "host": "127.0.0.1", "port": 1, "username": "ctid", "secret": SECRET}],
        "tenants": [{"id": "acme"}],
        "service_lines": [{"id": "acme-support", "tenant": "acme", "dnis": ["200"]}],
    }, env={})
    await sim.start()
    daemon = Daemon(config.model_copy(update={"asterisk": [config.asterisk[0].model_copy(
        update={"port": sim.ami_port})]}))
    await daemon.start()
    sink = _Sink()
    daemon.bus.add_sink(sink)
    sim.pbx.agi_address = ("127.0.0.1", daemon.agi.port)
    # A second session of ctid's AMI user, asking for every event: it shows what the
    # user may read.
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
    writer.write(f"Action: Login\r\nUsername: ctid\r\nSecret: {SECRET}\r\nEvents: on\r\n\r\n".encode())
    await reader.readuntil(b"Authentication accepted\r\n\r\n")
    loop = asyncio.get_running_loop()
    try:
        await daemon.links["sim"].client.wait_logged_in(5)
        chan = sim.inbound_call(dnis="200", caller="+15551230001")
        varset = await sim.wait_event("VarSet", timeout=5, Variable="__CTID_CALL_ID")
        set_at = loop.time()
        call_id = varset.get("Value")
        assert call_id and call_id == chan.variables.get("__CTID_CALL_ID")
        async with asyncio.timeout(GRACE + 2):
            while not any(e.type == "call.started" for _, e in sink.events):  # noqa: ASYNC110 - the daemon's tasks
                await asyncio.sleep(0.005)
        started_at, started = next((t, e) for t, e in sink.events if e.type == "call.started")
        # Under ctid's id, not the Linkedid, and at once rather than after the grace,
        # while the caller is still in the prompt.
        assert started.call_id == call_id
        assert started_at - set_at < GRACE / 4, f"call.started {started_at - set_at:.3f} s after the id was set"
        assert chan.application == "Wait" and not chan.hungup
        call = daemon.links["sim"].model.get(call_id)
        assert call is not None and not call.provisional and call.tenant == "acme"
        await sim.caller_hangup(chan)
        async with asyncio.timeout(5):
            while not any(e.type == "call.ended" for _, e in sink.events):  # noqa: ASYNC110 - the daemon's tasks
                await asyncio.sleep(0.01)
        assert {e.call_id for _, e in sink.events if e.type.startswith("call.")} == {call_id}
    finally:
        writer.write(b"Action: Logoff\r\n\r\n")
        seen = await reader.read()
        writer.close()
        await daemon.stop()
        await sim.stop()
    # The VarSet happened, but ctid's AMI user cannot read it.
    assert b"Event: Newchannel\r\n" in seen and b"Event: VarSet\r\n" not in seen
    assert not sim.errors
