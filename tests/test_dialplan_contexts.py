"""The shipped ``dialplans/ctid.conf`` run by the simulator, with this test playing ctid.

ctid's two halves are stood in for on 127.0.0.1: a tiny FastAGI server answers the
``inbound``, ``checkin`` and ``survey`` scripts with SET VARIABLE lines (as ctid's
dispatcher will), and a raw AMI client (:class:`ctid.asterisk.ami.AMIClient`) sends the
actions the dispatcher sends: Setvar + Redirect (the offer), dual Redirect + Bridge
(hold/resume), Originate (callback, click-to-dial), BlindTransfer, Hangup. Events are
read as that client receives them. Times are simulated seconds (``sim.clock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from ctid.asterisk.ami import AMIClient
from ctid.asterisk.ami_protocol import ActionCompletion, Message
from ctid.simulator import Simulator
from ctid.simulator.channels import Channel
from tests.test_app import SECRET, make_sim

CALL_ID = "c1"
# What ctid's /inbound answers for a call it queues: the contract of [ctid-inbound].
QUEUED = [("__CTID_CALL_ID", CALL_ID), ("__CTID_QUEUE", "support"), ("__CTID_PRIO", "5"),
          ("__CTID_ENQUEUED", "1700000000"), ("CTID_CHECKIN", "1"), ("CTID_ROUTE", "hold")]
Answer = list[tuple[str, str]]


# --------------------------------------------------------------------------- ctid's FastAGI half

@dataclass
class Session:
    script: str
    query: str
    at: float  # simulated time the session started
    env: dict[str, str]


@dataclass
class FakeCtid:
    """A FastAGI server that answers each script with fixed SET VARIABLE lines."""

    clock: Callable[[], float]
    answers: dict[str, Answer] = field(default_factory=lambda: {
        "inbound": QUEUED, "checkin": [("CTID_ROUTE", "hold")], "survey": [("CTID_SURVEY", "done")]})
    sessions: list[Session] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)

    async def close(self) -> None:
        """ctid is gone: nothing listens on the FastAGI port any more."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def seen(self, script: str) -> list[Session]:
        return [s for s in self.sessions if s.script == script]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            env: dict[str, str] = {}
            while (line := (await reader.readline()).decode()).strip():
                key, _, value = line.rstrip("\n").partition(": ")
                env[key] = value
            script, _, query = env.get("agi_network_script", "").partition("?")
            self.sessions.append(Session(script, query, self.clock(), env))
            for name, value in self.answers.get(script, []):
                writer.write(f"SET VARIABLE {name} {value}\n".encode())
                await writer.drain()
                await reader.readline()  # 200 result=1
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()  # ends the session: the dialplan goes on with AGISTATUS=SUCCESS


# --------------------------------------------------------------------------- the rig

@dataclass
class Rig:
    sim: Simulator
    ctid: FakeCtid
    ami: AMIClient
    events: list[Message]

    def real(self, sim_seconds: float) -> float:
        return self.sim.clock.real(sim_seconds)

    async def act(self, action: str, *fields: tuple[str, str], **headers: str) -> ActionCompletion:
        return await self.ami.action(action, [*headers.items(), *fields], timeout=5)

    def find(self, name: str, start: int = 0, **match: str) -> list[Message]:
        return [m for m in self.events[start:] if m.name == name
                and all(m.get(k) == v for k, v in match.items())]

    async def event(self, name: str, start: int = 0, timeout: float = 5.0, **match: str) -> Message:
        """The first event ``name`` at or after index ``start`` whose headers match."""
        async with asyncio.timeout(timeout):
            while not (found := self.find(name, start, **match)):  # noqa: ASYNC110 - bounded poll
                await asyncio.sleep(0.005)
        return found[0]

    def index(self, message: Message) -> int:
        return next(i for i, m in enumerate(self.events) if m is message)

    async def waiting_caller(self, caller: str = "+15551230001") -> Channel:
        """An inbound call that ctid's /inbound put in [ctid-hold], after its first check-in."""
        chan = self.sim.inbound_call(dnis="200", caller=caller)
        await until(lambda: any(s.env.get("agi_channel") == chan.name for s in self.ctid.seen("checkin")))
        return chan

    async def offer(self, chan: Channel, target: str | None, *, ring: str = "10", opts: str = "",
                    after: str | None = None) -> None:
        """The dispatcher's offer: Setvar the target and Redirect the caller to ctid-connect."""
        variables = {"CTID_RING_TIMEOUT": ring, "CTID_DIAL_OPTS": opts}
        if target is not None:
            variables["CTID_TARGET"] = target
        if after is not None:
            variables["CTID_AFTER"] = after
        for name, value in variables.items():
            await self.act("Setvar", Channel=chan.name, Variable=name, Value=value)
        await self.act("Redirect", Channel=chan.name, Context="ctid-connect", Exten="s", Priority="1")

    async def connected_call(self, **offer: str) -> tuple[Channel, Channel]:
        """A caller offered to agent 1001, who answered: both legs in the Dial bridge."""
        caller = await self.waiting_caller()
        start = len(self.events)
        await self.offer(caller, "PJSIP/1001", **offer)
        dial = await self.event("DialBegin", start, Channel=caller.name)
        agent_name = dial["DestChannel"]
        await self.event("BridgeEnter", start, Channel=caller.name)
        await self.event("BridgeEnter", start, Channel=agent_name)
        agent = self.sim.pbx.find_channel(agent_name)
        assert agent is not None
        return caller, agent


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - bounded poll of state owned by other tasks
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def rig(answers: dict[str, Answer] | None = None, time_scale: float = 0.05) -> AsyncIterator[Rig]:
    ctid = FakeCtid(clock=lambda: 0.0)
    if answers is not None:
        ctid.answers.update(answers)
    await ctid.start()
    sim = make_sim(agi_address=("127.0.0.1", ctid.port), time_scale=time_scale)
    ctid.clock = sim.clock.now
    await sim.start()
    events: list[Message] = []
    client = AMIClient("127.0.0.1", sim.ami_port, "ctid", SECRET, on_event=events.append,
                       reconnect_min=0.05, reconnect_max=0.2, ping_interval=30.0)
    task = asyncio.create_task(client.run())
    try:
        await client.wait_logged_in(5)
        yield Rig(sim, ctid, client, events)
        assert not sim.errors, sim.errors
    finally:
        await client.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
        await sim.stop()
        await ctid.close()


def chanvars(message: Message, key: str = "ChanVariable") -> dict[str, str]:
    return dict(v.partition("=")[::2] for v in message.get_all(key))


# --------------------------------------------------------------------------- 1. waiting in ctid-hold

@pytest.mark.parametrize(("checkin", "seconds"), [("1", 1.0), (None, 5.0), ("60", 10.0)])
async def test_inbound_hold_plays_music_and_checks_in_every_checkin_seconds(checkin: str | None,
                                                                           seconds: float) -> None:
    answers = [(k, v) for k, v in QUEUED if k != "CTID_CHECKIN"]
    if checkin is not None:
        answers.append(("CTID_CHECKIN", checkin))
    async with rig({"inbound": answers}) as r:
        chan = r.sim.inbound_call(dnis="+442071234567", caller="+15551230001")
        await until(lambda: len(r.ctid.seen("checkin")) >= 3, timeout=15)
        (inbound,) = r.ctid.seen("inbound")
        assert inbound.query == "dnis=+442071234567"
        checkins = r.ctid.seen("checkin")[:3]
        assert [s.query for s in checkins] == [f"call_id={CALL_ID}"] * 3
        assert {s.env["agi_context"] for s in checkins} == {"ctid-hold"}
        # Music for CTID_CHECKIN seconds (default 5, at most 10) between two check-ins.
        gaps = [b.at - a.at for a, b in itertools.pairwise(checkins)]
        assert all(seconds - 0.1 <= gap < seconds * 1.5 + 1.5 for gap in gaps), (seconds, gaps)
        moh = r.find("MusicOnHoldStart", Channel=chan.name)
        assert len(moh) >= 3 and {(m["Class"], m["Context"]) for m in moh} == {("default", "ctid-hold")}
        assert chanvars(moh[0])["CTID_CALL_ID"] == CALL_ID
        assert chan.variables.get("AGIEXITONHANGUP") == "yes"
        assert not r.find("QueueCallerJoin")


async def test_redirect_during_the_checkin_takes_effect_at_once() -> None:
    # A ctid that keeps the check-in open (it is slow, or it redirects from inside it):
    # with AGIEXITONHANGUP=yes the Redirect does not wait for ctid to close the socket.
    async with rig() as r:
        hold_open = asyncio.Event()

        async def slow_checkin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while (await reader.readline()).strip():
                pass
            hold_open.set()
            await reader.read()  # never answers; returns at Asterisk's EOF
            writer.close()

        await r.ctid.close()
        slow = await asyncio.start_server(slow_checkin, "127.0.0.1", 0)
        try:
            r.sim.pbx.agi_address = ("127.0.0.1", slow.sockets[0].getsockname()[1])
            # Straight into ctid-hold (as after /inbound), before its first priority runs.
            chan = r.sim.inbound_call(dnis="s", caller="+15551230001", context="ctid-hold")
            chan.variables.update({"__CTID_CALL_ID": CALL_ID, "CTID_CHECKIN": "1"})
            await asyncio.wait_for(hold_open.wait(), 5)  # now in the check-in, which never ends
            start = len(r.events)
            await r.offer(chan, "PJSIP/1001")
            await r.event("DialBegin", start, timeout=r.real(5) + 1, Channel=chan.name)
        finally:
            slow.close()


# --------------------------------------------------------------------------- 2. the offer, answered

@pytest.mark.parametrize(("opts", "after", "survey"), [("", None, False), ("g", "survey", True), ("t", "survey", True)])
async def test_offer_rings_the_agent_and_reports_answer_when_the_agent_hangs_up(opts: str, after: str | None,
                                                                               survey: bool) -> None:
    async with rig() as r:
        caller = await r.waiting_caller()
        start = len(r.events)
        await r.offer(caller, "PJSIP/1001", opts=opts, after=after)
        dial = await r.event("DialBegin", start, Channel=caller.name)
        assert dial["DialString"] == "1001" and dial["DestChannel"].startswith("PJSIP/1001-")
        assert chanvars(dial, "DestChanVariable")["CTID_CALL_ID"] == CALL_ID  # the agent leg inherits it
        await r.event("DialEnd", start, Channel=caller.name, DialStatus="ANSWER")
        await r.event("BridgeEnter", start, Channel=caller.name)
        await r.event("BridgeEnter", start, Channel=dial["DestChannel"])
        dials = [m["AppData"] for m in r.sim.events if m.name == "Newexten" and m.get("Application") == "Dial"]
        assert dials == [f"PJSIP/1001,10,g{opts.replace('g', '')}"], "g always, then t/T as ctid asked"
        checkins = len(r.ctid.seen("checkin"))
        await r.sim.caller_hangup(dial["DestChannel"])  # the agent hangs up
        event = await r.event("UserEvent", start, UserEvent="CtidConnect")
        assert (event["CallID"], event["DialStatus"]) == (CALL_ID, "ANSWER")
        assert event["Channel"] == caller.name
        hangup = await r.event("Hangup", start, Channel=caller.name)
        assert r.index(hangup) > r.index(event)
        surveys = r.ctid.seen("survey")
        if survey:
            assert [(s.query, s.env["agi_channel"]) for s in surveys] == [(f"call_id={CALL_ID}", caller.name)]
            assert caller.variables.get("CTID_SURVEY") == "done"
        else:
            assert surveys == []
        assert len(r.ctid.seen("checkin")) == checkins, "the caller must not go back to the queue"


# --------------------------------------------------------------------------- 3. RONA

@pytest.mark.parametrize(("case", "status"), [
    ("no-answer", "NOANSWER"), ("busy", "BUSY"), ("unknown-device", "CHANUNAVAIL"), ("no-target", "CHANUNAVAIL"),
])
async def test_unanswered_offer_reports_and_puts_the_caller_back_in_hold(case: str, status: str) -> None:
    async with rig() as r:
        r.sim.endpoints["1002"].answer = case != "no-answer"
        r.sim.endpoints["1002"].busy = case == "busy"
        target = {"unknown-device": "PJSIP/9999", "no-target": None}.get(case, "PJSIP/1002")
        caller = await r.waiting_caller()
        start = len(r.events)
        offered = r.sim.clock.now()
        await r.offer(caller, target, ring="2")
        event = await r.event("UserEvent", start, UserEvent="CtidConnect")
        assert (event["CallID"], event["DialStatus"]) == (CALL_ID, status)
        if case == "no-answer":
            assert r.sim.clock.now() - offered >= 2, "rang for CTID_RING_TIMEOUT seconds"
            ringing = r.find("DialBegin", start, Channel=caller.name)
            assert len(ringing) == 1
            await r.event("Hangup", start, Channel=ringing[0]["DestChannel"])
        if case == "no-target":
            assert not r.find("DialBegin", start, Channel=caller.name)
        # Back in ctid-hold: music again, and the check-in loop resumes (ctid requeues).
        later = r.index(event)
        await r.event("MusicOnHoldStart", later, Channel=caller.name, Context="ctid-hold")
        checkins = len(r.ctid.seen("checkin"))
        await until(lambda: len(r.ctid.seen("checkin")) > checkins)
        assert not caller.hungup and not r.find("QueueCallerJoin")


# --------------------------------------------------------------------------- 4. ctid gone, and other check-in answers

async def test_checkin_failure_when_ctid_is_gone_sends_the_caller_to_the_native_queue() -> None:
    async with rig() as r:
        caller = await r.waiting_caller()
        start = len(r.events)
        await r.ctid.close()  # kill -9: connection refused at the next check-in
        join = await r.event("QueueCallerJoin", start, timeout=10, Channel=caller.name)
        assert join["Queue"] == "ctid-fallback"
        assert caller.variables.get("AGISTATUS") == "FAILURE"
        assert chanvars(join)["CTID_CALL_ID"] == CALL_ID
        assert not caller.hungup


async def test_checkin_closed_without_an_answer_keeps_the_caller_waiting() -> None:
    # ctid crashed mid-session: no CTID_ROUTE. The stale "hold" of /inbound was
    # cleared, the caller loops, and the next check-in decides.
    async with rig({"checkin": []}) as r:
        caller = await r.waiting_caller()
        await until(lambda: len(r.ctid.seen("checkin")) >= 3)
        assert len(r.find("MusicOnHoldStart", Channel=caller.name)) >= 3
        assert not r.find("QueueCallerJoin") and not caller.hungup


@pytest.mark.parametrize(("route", "expect"), [("release", "Hangup"), ("voicemail", "Playback"),
                                               ("fallback", "Queue"), ("no-such-route", "Queue")])
async def test_checkin_routes(route: str, expect: str) -> None:
    async with rig({"checkin": [("CTID_ROUTE", route)]}) as r:
        caller = r.sim.inbound_call(dnis="200", caller="+15551230001")
        hangup = await r.event("Hangup", timeout=10, Channel=caller.name) if expect != "Queue" else None
        if expect == "Queue":
            await r.event("QueueCallerJoin", timeout=10, Channel=caller.name, Queue="ctid-fallback")
        played = [m for m in r.sim.events if m.name == "Newexten" and m.get("Channel") == caller.name
                  and m.get("Application") == "Playback"]
        assert [m["Context"] for m in played] == (["ctid-voicemail"] if route == "voicemail" else [])
        if hangup is not None:
            assert len(r.ctid.seen("checkin")) == 1


# --------------------------------------------------------------------------- 5. callback and click-to-dial

@pytest.mark.parametrize(("context", "variable", "name"), [
    ("ctid-callback", "CTID_CALLBACK_NUMBER", "CtidCallback"),
    ("ctid-outbound", "CTID_DIAL_NUMBER", "CtidOutbound"),
])
async def test_originated_agent_dials_the_customer_out_of_the_trunk(context: str, variable: str, name: str) -> None:
    async with rig() as r:
        await r.act("Originate", ("Variable", "__CTID_CALL_ID=cb1"), ("Variable", f"{variable}=+15557654321"),
                    Channel="PJSIP/1001", Context=context, Exten="s", Priority="1", Timeout="20000", Async="true")
        dial = await r.event("DialBegin", DialString="+15557654321@trunk")
        assert dial["Channel"].startswith("PJSIP/1001-") and dial["DestChannel"].startswith("PJSIP/trunk-")
        assert chanvars(dial, "DestChanVariable")["CTID_CALL_ID"] == "cb1"
        agent = dial["Channel"]
        await r.event("BridgeEnter", Channel=dial["DestChannel"])
        await r.sim.caller_hangup(dial["DestChannel"])  # the customer hangs up
        event = await r.event("UserEvent", UserEvent=name)
        assert (event["CallID"], event["DialStatus"], event["Channel"]) == ("cb1", "ANSWER", agent)
        assert r.index(await r.event("Hangup", Channel=agent)) > r.index(event)


@pytest.mark.parametrize(("context", "variable", "name"), [
    ("ctid-callback", "CTID_CALLBACK_NUMBER", "CtidCallback"),
    ("ctid-outbound", "CTID_DIAL_NUMBER", "CtidOutbound"),
])
@pytest.mark.parametrize(("number", "status"), [("+15557654321", "BUSY"), ("123&PJSIP/1002", "INVALIDARGS"),
                                                ("123@other", "INVALIDARGS"), ("1}2,3", "INVALIDARGS")])
async def test_failed_or_refused_outbound_dial_is_reported(context: str, variable: str, name: str, number: str,
                                                           status: str) -> None:
    async with rig() as r:
        r.sim.endpoints["trunk"].busy = True
        await r.act("Originate", ("Variable", "__CTID_CALL_ID=cb1"), ("Variable", f"{variable}={number}"),
                    Channel="PJSIP/1001", Context=context, Exten="s", Priority="1", Timeout="20000", Async="true")
        event = await r.event("UserEvent", UserEvent=name)
        assert (event["CallID"], event["DialStatus"]) == ("cb1", status)
        await r.event("Hangup", Channel=event["Channel"])
        dials = [m.get("DialString") for m in r.find("DialBegin")]
        assert dials == (["1001", "+15557654321@trunk"] if status == "BUSY" else ["1001"])


# --------------------------------------------------------------------------- 6. hold and resume

async def hold(r: Rig, caller: Channel, agent: Channel) -> int:
    """ctid's hold: a dual Redirect of both legs into [ctid-onhold]. Returns the event index."""
    start = len(r.events)
    done = await r.act("Redirect", Channel=caller.name, Context="ctid-onhold", Exten="s", Priority="1",
                       ExtraChannel=agent.name, ExtraContext="ctid-onhold", ExtraExten="agent", ExtraPriority="1")
    assert done.response.get("Message") == "Dual Redirect successful"
    await r.event("MusicOnHoldStart", start, Channel=caller.name, Context="ctid-onhold")
    await until(lambda: (agent.context, agent.application) == ("ctid-onhold", "Wait"))
    return start


@pytest.mark.parametrize(("ends", "after"), [("agent", None), ("agent", "survey"), ("caller", None)])
async def test_hold_by_dual_redirect_and_resume_by_bridge(ends: str, after: str | None) -> None:
    async with rig() as r:
        caller, agent = await r.connected_call(**({"after": after} if after else {}))
        checkins = len(r.ctid.seen("checkin"))
        start = await hold(r, caller, agent)
        await asyncio.sleep(r.real(3))
        # Both legs alive and parked; nothing reported as the end of the call.
        assert not caller.hungup and not agent.hungup
        assert not r.find("Hangup", start) and not r.find("UserEvent", start)
        assert not r.find("MusicOnHoldStart", start, Channel=agent.name), "the agent waits in silence"
        assert len(r.ctid.seen("checkin")) == checkins, "on hold is not waiting in the queue"

        resumed = len(r.events)
        done = await r.act("Bridge", Channel1=caller.name, Channel2=agent.name)
        assert done.response.get("Message") == "Channels have been bridged"
        enter = [await r.event("BridgeEnter", resumed, Channel=c.name) for c in (caller, agent)]
        assert enter[0]["BridgeUniqueid"] == enter[1]["BridgeUniqueid"]
        await r.event("MusicOnHoldStop", resumed, Channel=caller.name)

        # The resumed call ends: the leg still up goes on at its after-bridge location.
        gone, survivor = (agent, caller) if ends == "agent" else (caller, agent)
        ended = len(r.events)
        await r.sim.caller_hangup(gone)
        await r.event("Hangup", ended, Channel=survivor.name)
        surveys = [s.env["agi_context"] for s in r.ctid.seen("survey")]
        assert surveys == (["ctid-connect"] if after == "survey" else [])
        assert len(r.ctid.seen("checkin")) == checkins, "a finished call is not requeued"


@pytest.mark.parametrize("gone", ["caller", "agent"])
async def test_hangup_of_one_leg_while_on_hold(gone: str) -> None:
    async with rig() as r:
        caller, agent = await r.connected_call()
        await hold(r, caller, agent)
        leaving, survivor = (caller, agent) if gone == "caller" else (agent, caller)
        start = len(r.events)
        await r.sim.caller_hangup(leaving)
        hangup = await r.event("Hangup", start, Channel=leaving.name)
        # ctid learns it from the Hangup, which names the call; the survivor is left where
        # it is (not dropped, not requeued by the dialplan) for ctid to move.
        assert chanvars(hangup)["CTID_CALL_ID"] == CALL_ID
        await asyncio.sleep(r.real(3))
        assert not survivor.hungup and survivor.context == "ctid-onhold"
        assert survivor.application == ("Wait" if gone == "caller" else "MusicOnHold")
        moved = len(r.events)
        if gone == "caller":
            await r.act("Hangup", Channel=agent.name)  # ctid ends the agent leg
            await r.event("Hangup", moved, Channel=agent.name)
        else:
            checkins = len(r.ctid.seen("checkin"))
            # ctid requeues the caller (at the head of its queue).
            await r.act("Redirect", Channel=caller.name, Context="ctid-hold", Exten="s", Priority="1")
            await r.event("MusicOnHoldStart", moved, Channel=caller.name, Context="ctid-hold")
            await until(lambda: len(r.ctid.seen("checkin")) > checkins)


async def test_blind_transfer_to_the_queue_puts_the_caller_back_in_hold() -> None:
    # AMI BlindTransfer of the agent leg (06b) into ctid-hold: the caller re-enters ctid's
    # routing with the same CTID_CALL_ID, the agent leg is hung up.
    async with rig() as r:
        caller, agent = await r.connected_call()
        start = len(r.events)
        await r.act("BlindTransfer", Channel=agent.name, Context="ctid-hold", Exten="s")
        await r.event("Hangup", start, Channel=agent.name)
        moh = await r.event("MusicOnHoldStart", start, Channel=caller.name, Context="ctid-hold")
        assert chanvars(moh)["CTID_CALL_ID"] == CALL_ID
        checkins = len(r.ctid.seen("checkin"))
        await until(lambda: len(r.ctid.seen("checkin")) > checkins)
        assert not r.find("UserEvent", start), "a transfer is not the end of the Dial for ctid"
