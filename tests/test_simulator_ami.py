"""The simulator's AMI server replayed against captures 01 and 01b, byte level.

The actions of ``01-login-and-idle.sent.txt`` are sent to the simulator over a real
socket and every response/event is compared with the capture: header names and their
order exactly, values exactly except the ones that depend on time, process or socket
(listed in ``VOLATILE``). ``PJSIPShowEndpoint`` (ctiref-011) is not simulated and is
left out of the comparison; it is checked to fail loudly instead.

The captures had ``read = all``; the simulator's users read ``system,call,agent,user`` by
default, as the sample ``asterisk-conf/manager.conf`` gives ctid. Both are checked here:
the replay of 01 runs with the capture's users, and a user without ``dialplan`` read gets
no ``VarSet``/``Newexten``, whatever its Login's ``Events:``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ctid.asterisk.ami_protocol import AMIParser, Greeting, Message
from ctid.simulator import AMIUser, Dialplan, Simulator, load_manager_conf
from ctid.simulator.config import AMI_CLASSES, DEFAULT_AMI_READ, ami_classes

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk22"
ROOT = Path(__file__).resolve().parent.parent
#: The capture instance's users (``read = all``): the replay of 01 has the security events.
CAPTURE_USERS = load_manager_conf(FIXTURES / "asterisk-conf-used" / "manager.conf")
VOLATILE = {
    "Timestamp", "EventTV", "SessionTV", "SessionID", "LocalAddress", "RemoteAddress", "Uptime",
    "LastReload", "LoginTime", "CoreStartupDate", "CoreStartupTime", "CoreReloadDate",
    "CoreReloadTime", "Output",
}
SKIPPED_ACTIONS = {"ctiref-011"}  # PJSIPShowEndpoint: not simulated


def actions(name: str) -> list[bytes]:
    path = FIXTURES / name
    assert path.is_file(), f"missing fixture {path}"
    blocks = [b.strip() for b in path.read_text().split("\n\n") if b.strip()]
    return [(b.replace("\n", "\r\n") + "\r\n\r\n").encode() for b in blocks]


def capture(name: str) -> tuple[bytes, list[Message]]:
    path = FIXTURES / name
    assert path.is_file(), f"missing fixture {path}"
    raw = path.read_bytes()
    return raw, [m for m in AMIParser().feed(raw) if isinstance(m, Message)]


def shape(m: Message) -> list[tuple[str, str]]:
    return [(k, "*" if k in VOLATILE else v) for k, v in m.headers]


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    data = bytearray()
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        if not chunk:
            return bytes(data)
        data += chunk


def belongs_to_skipped(m: Message) -> bool:
    return m.get("ActionID") in SKIPPED_ACTIONS or m.get("RequestType") == "Action: PJSIPShowEndpoint"


async def test_capture_01_replay_matches_headers_and_order() -> None:
    raw_cap, expected = capture("01-login-and-idle.ami")
    async with Simulator(dialplan=FIXTURES / "asterisk-conf-used" / "extensions.conf", strict=False,
                         users=CAPTURE_USERS) as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        for act in actions("01-login-and-idle.sent.txt"):
            writer.write(act)
            await writer.drain()
            await asyncio.sleep(0.01)
        data = await read_all(reader)
        writer.close()
    assert data.startswith(b"Asterisk Call Manager/11.0.0\r\nResponse: Success\r\n")
    assert raw_cap.startswith(b"Asterisk Call Manager/11.0.0\r\nResponse: Success\r\n")
    items = AMIParser().feed(data)
    assert isinstance(items[0], Greeting)
    got = [m for m in items if isinstance(m, Message)]
    got_cmp = [shape(m) for m in got if not belongs_to_skipped(m)]
    exp_cmp = [shape(m) for m in expected if not belongs_to_skipped(m)]
    assert got_cmp == exp_cmp
    skipped = [m for m in got if belongs_to_skipped(m)]
    assert skipped and skipped[0].name == "Error"


async def test_capture_01_exact_bytes_for_stable_responses() -> None:
    raw_cap, _ = capture("01-login-and-idle.ami")
    async with Simulator() as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        for act in actions("01-login-and-idle.sent.txt"):
            writer.write(act)
        data = await read_all(reader)
        writer.close()
    for chunk in (
        b"Response: Error\r\nActionID: ctiref-012\r\nMessage: Invalid/unknown command: NoSuchAction. "
        b"Use Action: ListCommands to show available commands.\r\n\r\n",
        b"Response: Error\r\nActionID: ctiref-013\r\nMessage: No such channel\r\n\r\n",
        b"Response: Error\r\nActionID: ctiref-014\r\nMessage: No channel specified\r\n\r\n",
        b"Event: QueueStatusComplete\r\nActionID: ctiref-015\r\nEventList: Complete\r\nListItems: 0\r\n\r\n",
        b"Response: Success\r\nActionID: bad id with spaces/&%\r\nPing: Pong\r\nTimestamp: ",
        b"Response: Goodbye\r\nActionID: ctiref-016\r\nMessage: Thanks for all the fish.\r\n\r\n",
    ):
        assert chunk in raw_cap
        assert chunk in data


async def test_capture_01b_failed_login_closes_connection() -> None:
    raw_cap, _ = capture("01b-login-failed.ami")
    async with Simulator() as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        for act in actions("01b-login-failed.sent.txt"):
            writer.write(act)
        data = await read_all(reader)
        writer.close()
    # Byte for byte: the second Login and Ping are never answered; the server closed.
    assert data == raw_cap


async def test_events_only_after_login_with_events_on() -> None:
    async with Simulator(dialplan=FIXTURES / "asterisk-conf-used" / "extensions.conf",
                         time_scale=0.01, strict=False) as sim:
        r1, w1 = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        r3, w3 = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        w1.write(b"Action: Login\r\nUsername: ctid\r\nSecret: ctidpass\r\nEvents: on\r\n\r\n")
        w2.write(b"Action: Login\r\nUsername: ctid\r\nSecret: ctidpass\r\nEvents: off\r\n\r\n")
        await asyncio.sleep(0.05)
        sim.inbound_call(dnis="200", caller="+15551230001", hangup_after=1)
        await sim.wait_idle()
        for w in (w1, w2, w3):
            w.write(b"Action: Logoff\r\n\r\n")
        d1, d2, d3 = await read_all(r1), await read_all(r2), await read_all(r3)
    assert b"Event: Newchannel\r\n" in d1 and b"Event: Hangup\r\n" in d1
    assert b"Event: " not in d2  # Events: off
    assert d3 == b"Asterisk Call Manager/11.0.0\r\nResponse: Goodbye\r\nMessage: Thanks for all the fish.\r\n\r\n"


async def test_systemname_header_and_uniqueid_prefix() -> None:
    async with Simulator(dialplan=FIXTURES / "asterisk-conf-used" / "extensions.conf",
                         time_scale=0.01, strict=False, systemname="pbx1") as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
        writer.write(b"Action: Login\r\nUsername: ctid\r\nSecret: ctidpass\r\nEvents: on\r\n\r\n")
        await asyncio.sleep(0.05)
        sim.inbound_call(dnis="200", caller="+15551230001", hangup_after=1)
        await sim.wait_idle()
        writer.write(b"Action: Logoff\r\n\r\n")
        data = await read_all(reader)
    msgs = [m for m in AMIParser().feed(data) if isinstance(m, Message)]
    boot = next(m for m in msgs if m.name == "FullyBooted")
    assert boot.get("SystemName") is None  # written straight to the session (18)
    newchan = next(m for m in msgs if m.name == "Newchannel")
    assert newchan.headers[2] == ("SystemName", "pbx1")
    assert (newchan.get("Uniqueid") or "").startswith("pbx1-")
    assert all(m.get("SystemName") is None for m in msgs if m.is_response)


# -- read classes ------------------------------------------------------------------------

READ_PLAN = """[from-trunk]
exten => 200,1,Answer()
 same => n,Set(__CTID_CALL_ID=abc123)
 same => n,Wait(2)
 same => n,Hangup()
"""


def test_default_read_is_the_sample_manager_confs_ctid_user() -> None:
    sample = load_manager_conf(ROOT / "asterisk-conf" / "manager.conf")
    assert sample["ctid"].read == ami_classes(DEFAULT_AMI_READ) == {"system", "call", "agent", "user"}
    assert AMIUser("x").read == sample["ctid"].read
    assert CAPTURE_USERS["ctid"] == AMIUser("ctidpass", AMI_CLASSES)  # the capture instance: read = all
    with pytest.raises(ValueError, match="dialpan"):
        ami_classes("call,dialpan")


async def test_events_go_only_to_sessions_whose_read_and_events_have_every_class() -> None:
    users = {"ctid": "ctidpass", "root": AMIUser.of("rootpass", "all"), "calls": AMIUser.of("callspass", "call")}
    logins = {  # session -> (user, Events:)
        "ctid": ("ctid", "on"),            # the sample manager.conf's read
        "ctid-dialplan": ("ctid", "dialplan,call"),  # asks for dialplan: read does not allow it
        "root": ("root", "on"),            # read = all
        "root-call": ("root", "call"),     # read = all, but asks for call only
        "calls": ("calls", "on"),          # read = call: no system, so no FullyBooted
    }
    async with Simulator(dialplan=Dialplan.from_text(READ_PLAN), users=users, time_scale=0.01) as sim:
        conns = {}
        for name, (user, events) in logins.items():
            reader, writer = await asyncio.open_connection("127.0.0.1", sim.ami_port)
            secret = user + "pass" if user != "ctid" else "ctidpass"
            writer.write(f"Action: Login\r\nUsername: {user}\r\nSecret: {secret}\r\nEvents: {events}\r\n\r\n"
                         .encode())
            await reader.readuntil(b"Authentication accepted\r\n\r\n")
            conns[name] = (reader, writer)
        sim.inbound_call(dnis="200", caller="+15551230001", dtmf="12", dtmf_after=0.1)
        await sim.wait_idle()
        got: dict[str, set[str]] = {}
        for name, (reader, writer) in conns.items():
            writer.write(b"Action: Logoff\r\n\r\n")
            data = await read_all(reader)
            writer.close()
            parser = AMIParser(expect_greeting=False)  # the greeting was read with the Login response
            got[name] = {m.name for m in parser.feed(data) if isinstance(m, Message) and m.is_event}
    emitted = {m.name for m in sim.events}
    dialplan_class = {"VarSet", "Newexten"}
    assert dialplan_class | {"DTMFBegin", "DTMFEnd"} <= emitted  # the PBX did emit them
    call_class = {"Newchannel", "Newstate", "Hangup"}
    # The sample read: call events, FullyBooted, none of dialplan, dtmf or security.
    assert call_class | {"FullyBooted"} <= got["ctid"]
    assert not got["ctid"] & (dialplan_class | {"DTMFBegin", "DTMFEnd", "SuccessfulAuth"})
    # Events: dialplan,call: the call events, never a dialplan one (read decides).
    assert call_class <= got["ctid-dialplan"] and not got["ctid-dialplan"] & dialplan_class
    assert "FullyBooted" not in got["ctid-dialplan"]  # Events: lacks system
    # read = all gets everything; Events: call narrows it to the call class.
    assert dialplan_class | call_class | {"DTMFEnd", "SuccessfulAuth", "FullyBooted"} <= got["root"]
    assert call_class <= got["root-call"] and not got["root-call"] & (dialplan_class | {"DTMFEnd", "FullyBooted"})
    assert call_class <= got["calls"] and "FullyBooted" not in got["calls"]
