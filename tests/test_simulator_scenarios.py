"""The simulator checked against the real Asterisk 22 captures, scenario by scenario.

Each test loads the capture's own dialplan (``asterisk-conf-used/``), drives the same
call and sends the same actions as the capture's ``.sent.txt`` (channel names mapped
by role), records every byte of one AMI session on a real socket, and compares the
call-lifecycle events with the capture (channel, dial, bridge, hangup, queue, MOH,
DTMF, hold and transfer events, including Local channel events). CEL, Cdr, RTCP, VarSet,
Newexten, DeviceStateChange, ExtensionStatus, QueueMemberStatus, NewConnectedLine and
NewCallerid are ignored (their timing varies). Channel names and bridge ids are compared
by role (``trunk#1``, ``agent1001#1``, ``bridge#1`` in order of first appearance).

Two comparisons are made: the sequence of events *per channel* (and per bridge) must be
equal, and the *global* order too for the scenarios listed in ``GLOBAL_ORDER``. 06c
(attended transfer) is compared per channel only, like 06 and 06b: in the capture the
target's ``Newchannel`` falls between the transferer's ``BridgeLeave`` and
``BridgeEnter`` (two Asterisk threads), and the final AMI Hangup of the transferee emits
both ``BridgeLeave`` events before either ``Hangup``.

07b (REGISTER/unREGISTER of agent2001) has no call: it is compared message by message,
``ContactStatus``, ``PeerStatus``, ``DeviceStateChange``, ``ExtensionStatus`` and the list
actions included (:func:`test_capture_07b_register_unregister_matches`).

The captures were taken with ``read = all`` (``asterisk-conf-used/manager.conf``), so the
simulator runs with the users of that file (:data:`CAPTURE_USERS`), not with its default
``read`` (the sample manager.conf's ``system,call,agent,user``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ctid.asterisk.ami_protocol import AMIParser, Message
from ctid.simulator import Endpoint, Simulator, load_manager_conf
from ctid.simulator.config import default_endpoints

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk22"
CONF = FIXTURES / "asterisk-conf-used"
SCALE = 0.01
#: The AMI users of the capture instance: ctid/ctidpass with ``read = all``.
CAPTURE_USERS = load_manager_conf(CONF / "manager.conf")

LIFECYCLE = {
    "Newchannel", "Newstate", "DialBegin", "DialState", "DialEnd", "BridgeCreate", "BridgeEnter",
    "BridgeLeave", "BridgeDestroy", "HangupRequest", "SoftHangupRequest", "Hangup",
    "QueueCallerJoin", "QueueCallerLeave", "QueueCallerAbandon", "AgentCalled", "AgentConnect",
    "AgentComplete", "AgentRingNoAnswer", "MusicOnHoldStart", "MusicOnHoldStop", "OriginateResponse",
    # transfers (06b, 06c) and DTMF (03, 06c)
    "Hold", "Unhold", "BlindTransfer", "AttendedTransfer", "BridgeMerge", "LocalBridge",
    "LocalOptimizationBegin", "LocalOptimizationEnd", "DTMFBegin", "DTMFEnd",
}
KEYS = ("ChannelState", "Context", "Exten", "Priority", "DialStatus", "Queue", "Position", "Reason",
        "Response", "Digit", "Result", "IsExternal", "Extension", "DestType", "Success")
# Events without a Channel header: the header that names "their" channel and bridge.
CHAN_KEYS = ("Channel", "DestChannel", "TransfererChannel", "OrigTransfererChannel", "LocalOneChannel")
BRIDGE_KEYS = ("BridgeUniqueid", "ToBridgeUniqueid", "OrigBridgeUniqueid")
# Further channels/bridges an event refers to, compared by role.
REF_KEYS = ("TransfereeChannel", "TransferTargetChannel", "SecondBridgeUniqueid", "DestBridgeUniqueid",
            "FromBridgeUniqueid", "LocalTwoChannel", "SourceChannel")
CHAN_RE = re.compile(r"PJSIP/([A-Za-z0-9+]+)-[0-9a-f]{8}")


def parse_capture(path: Path) -> list[Message]:
    assert path.is_file(), f"missing capture fixture {path}"
    parser = AMIParser()
    return [m for m in parser.feed(path.read_bytes()) if isinstance(m, Message)]


class Roles:
    """Name channels and bridges by role, in order of first appearance."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def of(self, name: str | None) -> str:
        if not name:
            return ""
        if name not in self.names:
            m = CHAN_RE.fullmatch(name)
            base = m.group(1) if m else ("bridge" if re.fullmatch(r"[0-9a-f-]{36}", name) else name)
            self.counts[base] = self.counts.get(base, 0) + 1
            self.names[name] = f"{base}#{self.counts[base]}"
        return self.names[name]


def lifecycle(messages: list[Message]) -> list[tuple[str, ...]]:
    roles = Roles()
    out: list[tuple[str, ...]] = []
    for m in messages:
        if not m.is_event or m.name not in LIFECYCLE or (m.get("ActionID") and m.name != "OriginateResponse"):
            continue
        chan = roles.of(next((m.get(k) for k in CHAN_KEYS if m.get(k)), None))
        dest = roles.of(m.get("DestChannel")) if m.get("Channel") else ""
        bridge = roles.of(next((m.get(k) for k in BRIDGE_KEYS if m.get(k)), None))
        fields = [f"{k}={m.get(k)}" for k in KEYS if m.get(k) is not None]
        fields += [f"{k}={roles.of(m.get(k))}" for k in REF_KEYS if m.get(k)]
        if m.name == "Hangup":
            fields.append(f"Cause={m.get('Cause')}")
        out.append((m.name, chan, dest, bridge, *fields))
    return out


def by_channel(events: list[tuple[str, ...]]) -> dict[str, list[tuple[str, ...]]]:
    out: dict[str, list[tuple[str, ...]]] = {}
    for ev in events:
        for key in {ev[1], ev[3]} - {""}:
            out.setdefault(key, []).append(ev)
    return out


class Recorder:
    """One AMI session on the simulator: records every byte, sends actions."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.data = bytearray()
        self.parser = AMIParser()
        self.messages: list[Message] = []
        self._new = asyncio.Event()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.sim.ami_port)
        self.task = asyncio.create_task(self._read())
        self.send(b"Action: Login\r\nActionID: ctiref-001\r\nUsername: ctid\r\nSecret: ctidpass\r\nEvents: on\r\n\r\n")
        # FullyBooted and SuccessfulAuth (for a user that reads their classes) are queued
        # with the response, so whatever is sent next is answered after them.
        await self.wait_for(lambda m: m.is_response and m.get("ActionID") == "ctiref-001")

    async def _read(self) -> None:
        while True:
            chunk = await self.reader.read(65536)
            if not chunk:
                break
            self.data += chunk
            for item in self.parser.feed(chunk):
                if isinstance(item, Message):
                    self.messages.append(item)
            self._new.set()

    def send(self, raw: bytes) -> None:
        self.writer.write(raw)

    async def wait_for(self, pred: Callable[[Message], bool], timeout: float = 10.0, start: int = 0) -> Message:
        async def scan() -> Message:
            i = start
            while True:
                while i < len(self.messages):
                    if pred(self.messages[i]):
                        return self.messages[i]
                    i += 1
                self._new.clear()
                await self._new.wait()

        return await asyncio.wait_for(scan(), timeout)

    async def event(self, name: str, **match: str) -> Message:
        return await self.wait_for(lambda m: m.is_event and m.name == name
                                   and all(m.get(k) == v for k, v in match.items()))

    async def logoff(self) -> None:
        self.send(b"Action: Logoff\r\nActionID: ctiref-999\r\n\r\n")
        await asyncio.wait_for(self.task, 5.0)


def sent_actions(path: Path) -> list[str]:
    assert path.is_file(), f"missing capture fixture {path}"
    text = path.read_text()
    return [b.strip() for b in text.split("\n\n") if b.strip()]


def action_bytes(block: str, chan_map: dict[str, str]) -> bytes:
    for cap, simname in chan_map.items():
        block = block.replace(cap, simname)
    return (block.replace("\n", "\r\n") + "\r\n\r\n").encode()


def channel_map(capture: list[Message], sim: Simulator) -> dict[str, str]:
    """Capture channel name -> simulator channel name, by role."""
    cap_roles, sim_roles = Roles(), Roles()
    for m in capture:
        if m.name == "Newchannel":
            cap_roles.of(m.get("Channel"))
    for m in sim.events:
        if m.name == "Newchannel":
            sim_roles.of(m.get("Channel"))
    by_role = {role: name for name, role in sim_roles.names.items()}
    return {name: by_role[role] for name, role in cap_roles.names.items() if role in by_role}


Driver = Callable[[Simulator, Recorder, list[str], list[Message]], Awaitable[None]]


async def run_scenario(prefix: str, dialplans: list[Path], driver: Driver, *,
                       channelvars: tuple[str, ...] = (), endpoints: dict[str, Endpoint] | None = None,
                       features: Path | None = None,
                       ) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]], Simulator]:
    ami = sorted(FIXTURES.glob(f"{prefix}-*.ami"))
    assert ami, f"missing capture {prefix}"
    capture = parse_capture(ami[0])
    actions = sent_actions(ami[0].with_suffix(".sent.txt"))
    sim = Simulator(dialplan=dialplans, time_scale=SCALE, channelvars=channelvars,
                    endpoints=endpoints, features=features, strict=False, users=CAPTURE_USERS)
    await sim.start()
    rec = Recorder(sim)
    try:
        await rec.open()
        await driver(sim, rec, actions, capture)
        await sim.wait_idle(timeout=20)
        await asyncio.sleep(0.05)
        await rec.logoff()
    finally:
        await sim.stop()
    assert not sim.errors, sim.errors
    assert rec.data.startswith(b"Asterisk Call Manager/11.0.0\r\nResponse: Success\r\n")
    return lifecycle(capture), lifecycle(rec.messages), sim


def assert_same(expected: list[tuple[str, ...]], got: list[tuple[str, ...]], global_order: bool) -> None:
    exp_ch, got_ch = by_channel(expected), by_channel(got)
    assert sorted(exp_ch) == sorted(got_ch)
    for key in exp_ch:
        assert got_ch[key] == exp_ch[key], f"events of {key} differ"
    if global_order:
        assert got == expected


MAIN = [CONF / "extensions.conf"]
CTI = [CONF / "extensions.conf", CONF / "extensions_cti.conf"]
CV = ("CTID_CALL_ID", "CTID_QUEUE")


async def send_action(rec: Recorder, actions: list[str], index: int, sim: Simulator,
                      capture: list[Message]) -> Message:
    block = actions[index]
    aid = re.search(r"ActionID: (\S+)", block)
    start = len(rec.messages)
    rec.send(action_bytes(block, channel_map(capture, sim)))
    assert aid is not None
    return await rec.wait_for(lambda m: m.is_response and m.get("ActionID") == aid.group(1), start=start)


def endpoints_with(**changes: dict[str, object]) -> dict[str, Endpoint]:
    eps = default_endpoints()
    for name, attrs in changes.items():
        for k, v in attrs.items():
            setattr(eps[name], k, v)
    return eps


# -- drivers ---------------------------------------------------------------------------------

async def drive_02(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
    sim.inbound_call(dnis="200", caller="+15551230001", hangup_after=6)


async def drive_03(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
    # A tiny FastAGI server replaying the server side of agi/03-fastagi-session.agi.
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (await r.readline()).strip():
            pass
        for cmd in ["ANSWER", "EXEC Playback beep", "GET DATA beep 6000 3", "GET VARIABLE CALLERID(num)",
                    'GET FULL VARIABLE "${CHANNEL}/${UNIQUEID}"', 'VERBOSE "ctiref fastagi routing to support" 1',
                    "SET VARIABLE ROUTE_TO support", 'SET VARIABLE AGI_DIGITS "123"', "CHANNEL STATUS",
                    "NOOP ctiref-done"]:
            w.write(cmd.encode() + b"\n")
            await r.readline()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    sim.pbx.agi_address = ("127.0.0.1", server.sockets[0].getsockname()[1])
    sim.inbound_call(dnis="300", caller="+15551230001", dtmf="123", dtmf_after=1.5)
    await rec.event("Hangup")
    server.close()


async def drive_04(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
    sim.inbound_call(dnis="400", caller="+15551230001", hangup_after=10)
    await rec.event("BridgeEnter", Channel="PJSIP/trunk-00000000")
    await send_action(rec, actions, 1, sim, cap)  # QueueStatus


async def drive_05(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
    sim.inbound_call(dnis="500", caller="+15551230001", hangup_after=14.5)


async def drive_06(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
    await send_action(rec, actions, 1, sim, cap)  # Originate
    await rec.event("BridgeEnter", Channel="PJSIP/agent1001-00000000")
    await send_action(rec, actions, 2, sim, cap)  # MixMonitor
    await send_action(rec, actions, 3, sim, cap)  # StopMixMonitor
    await send_action(rec, actions, 4, sim, cap)  # Redirect agent1002 -> 1003
    await rec.event("BridgeEnter", Channel="PJSIP/agent1002-00000001")
    await asyncio.sleep(0.02)
    await send_action(rec, actions, 5, sim, cap)  # Hangup agent1003


async def drive_06b(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
    await send_action(rec, actions, 1, sim, cap)  # Originate with ChannelId
    await rec.event("BridgeEnter", Channel="PJSIP/agent1001-00000000")
    await send_action(rec, actions, 2, sim, cap)  # BlindTransfer
    await rec.event("BridgeEnter", Channel="PJSIP/agent1002-00000001")
    await asyncio.sleep(0.02)
    await send_action(rec, actions, 3, sim, cap)  # Hangup agent1003


async def drive_06c(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
    await send_action(rec, actions, 1, sim, cap)  # Originate agent1001 -> 1002
    await rec.event("BridgeEnter", Channel="PJSIP/agent1001-00000000")
    resp = await send_action(rec, actions, 2, sim, cap)  # Atxfer agent1001 -> 1003
    assert resp.get("Message") == "Atxfer successfully queued"
    await rec.event("BridgeEnter", Channel="Local/1003@from-agents-00000000;2")  # consultation up
    await sim.clock.sleep(2)
    await send_action(rec, actions, 3, sim, cap)  # Hangup agent1001: completes the transfer
    await rec.event("Hangup", Channel="Local/1003@from-agents-00000000;2")  # Local pair optimised away
    await send_action(rec, actions, 4, sim, cap)  # CoreShowChannels
    await send_action(rec, actions, 5, sim, cap)  # Hangup agent1002


async def drive_13(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
    sim.inbound_call(dnis="1300", caller="+15551230013", hangup_after=11)
    await rec.event("BridgeEnter", Channel="PJSIP/trunk-00000000")
    for i in range(1, 7):
        await send_action(rec, actions, i, sim, cap)


async def drive_15(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
    sim.inbound_call(dnis="1500", caller="+15551230015", hangup_after=16)
    await rec.event("BridgeEnter", Channel="PJSIP/trunk-00000000")
    await sim.clock.sleep(3)
    await send_action(rec, actions, 1, sim, cap)  # dual Redirect
    await rec.event("MusicOnHoldStart")
    await send_action(rec, actions, 2, sim, cap)  # CoreShowChannels
    await sim.clock.sleep(3)
    await send_action(rec, actions, 3, sim, cap)  # Bridge
    await rec.wait_for(lambda m: m.name == "BridgeEnter" and m.get("Channel", "").startswith("PJSIP/agent")
                       and m.get("Context") == "ctid-agent-hold")
    await send_action(rec, actions, 4, sim, cap)  # CoreShowChannels


async def drive_17(sim: Simulator, rec: Recorder, actions: list[str], cap: list[Message]) -> None:
    await send_action(rec, actions, 1, sim, cap)  # Originate into ctid-clicktodial
    await rec.event("BridgeEnter", Channel="PJSIP/agent1001-00000000")
    await send_action(rec, actions, 2, sim, cap)  # CoreShowChannels
    await send_action(rec, actions, 3, sim, cap)  # Getvar on the customer leg


SCENARIOS: dict[str, tuple[list[Path], Driver, tuple[str, ...], dict[str, Endpoint] | None]] = {
    "02": (MAIN, drive_02, (), None),
    "03": (MAIN, drive_03, (), None),
    "04": (MAIN, drive_04, (), None),
    "05": (MAIN, drive_05, (), endpoints_with(agent1003={"answer": False})),
    "06": (MAIN, drive_06, (), None),
    "06b": (MAIN, drive_06b, (), None),
    "06c": (MAIN, drive_06c, (), None),
    "13": (CTI, drive_13, CV, None),
    "15": (CTI, drive_15, CV, None),
    "17": (CTI, drive_17, CV, endpoints_with(trunk={"hangup_after": 6.0})),
}
GLOBAL_ORDER = {"02", "03", "05", "13", "15", "17"}


FEATURES = {"06c": CONF / "features.conf"}  # atxfer = *2


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_lifecycle_matches_capture(scenario: str) -> None:
    dialplans, driver, cv, endpoints = SCENARIOS[scenario]
    expected, got, _ = await run_scenario(scenario, dialplans, driver, channelvars=cv, endpoints=endpoints,
                                          features=FEATURES.get(scenario))
    assert_same(expected, got, scenario in GLOBAL_ORDER)


# -- 07b: REGISTER / unREGISTER of a dynamic AOR ------------------------------------------------

# PJSIPShowEndpoint/PJSIPShowContacts are not simulated (they answer the unknown-action
# error, checked below) and are left out of the comparison, as in test_simulator_ami.
SKIPPED_07B = {"ctiref-004", "ctiref-005"}
VOLATILE_07B = {"Uptime", "LastReload", "EventTV", "SessionID", "LocalAddress", "RemoteAddress", "SessionTV"}


def shape_07b(messages: list[Message]) -> tuple[list[list[tuple[str, str]]], list[tuple[str, str]]]:
    """Every message in order, values masked where they depend on time or socket, with
    two differences the simulator does not model taken out: the actions it does not
    implement, and app_queue's ``Queue:*`` device states in the ``DeviceStateList``.
    That list's items come from a hash container, so they are returned apart, sorted."""
    ordered: list[list[tuple[str, str]]] = []
    devices: list[tuple[str, str]] = []
    for m in messages:
        if m.get("ActionID") in SKIPPED_07B or (m.get("RequestType") or "").startswith("Action: PJSIPShow"):
            continue
        if m.get("ActionID") == "ctiref-007" and m.name == "DeviceStateChange":
            if not (m.get("Device") or "").startswith("Queue:"):
                assert [k for k, _ in m.headers] == ["Event", "ActionID", "Device", "State"]
                devices.append((m.get("Device") or "", m.get("State") or ""))
            continue
        fields = [(k, "*" if k in VOLATILE_07B else v) for k, v in m.headers]
        if m.name == "DeviceStateListComplete":
            fields = [(k, "*" if k == "ListItems" else v) for k, v in fields]
        ordered.append(fields)
    return ordered, sorted(devices)


async def test_capture_07b_register_unregister_matches() -> None:
    path = FIXTURES / "07b-register-unregister-devicestate.ami"
    capture = parse_capture(path)
    actions = sent_actions(path.with_suffix(".sent.txt"))
    sim = Simulator(dialplan=MAIN, time_scale=SCALE, strict=False, users=CAPTURE_USERS)
    await sim.start()
    rec = Recorder(sim)
    try:
        await rec.open()
        await send_action(rec, actions, 1, sim, capture)  # ExtensionState 2001: Unavailable
        sim.register("agent2001")
        await rec.event("ContactStatus", ContactStatus="NonQualified")
        await send_action(rec, actions, 2, sim, capture)  # ExtensionState 2001: Idle
        for i in (3, 4):  # PJSIPShowEndpoint, PJSIPShowContacts
            resp = await send_action(rec, actions, i, sim, capture)
            assert resp.name == "Error" and "Invalid/unknown command" in (resp.get("Message") or "")
        sim.unregister("agent2001")
        await rec.event("ContactStatus", ContactStatus="Removed")
        await send_action(rec, actions, 5, sim, capture)  # ExtensionState 2001: Unavailable
        await send_action(rec, actions, 6, sim, capture)  # DeviceStateList
        await rec.event("DeviceStateListComplete")
        await send_action(rec, actions, 7, sim, capture)  # ExtensionStateList
        await rec.event("ExtensionStateListComplete")
        await send_action(rec, actions, 8, sim, capture)  # the capture's own Logoff
        await asyncio.wait_for(rec.task, 5.0)
    finally:
        await sim.stop()
    assert not sim.errors
    exp_order, exp_devices = shape_07b(capture)
    got_order, got_devices = shape_07b(rec.messages)
    assert got_order == exp_order
    assert got_devices == exp_devices
    done = next(m for m in rec.messages if m.name == "DeviceStateListComplete")
    assert done.get("ListItems") == str(len(got_devices))
