"""The simulator's FastAGI client replayed against the annotated traces ``agi/*.agi``.

A tiny scripted FastAGI server in the test sends the trace's server lines (``>>``) and
checks that the simulator sends exactly the trace's Asterisk lines (``<<``): the
environment in order, every reply, and where the ``HANGUP`` lines and the EOF fall.
Only per-call values are normalised (Uniqueid, thread id, channel sequence number,
``endpos`` sample counts). The event that provokes a hangup (the caller's BYE, or the
AMI Redirect for 14*) is fired right before the first line that depends on it.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from ctid.simulator import AGIFaults, Simulator
from ctid.simulator.channels import Location

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk22"
CONF = FIXTURES / "asterisk-conf-used"
LINE_RE = re.compile(r"^\[\+\s*[\d.]+\] (<<|>>|--) ?(.*)$")

# trace -> (what provokes the hangup, DTMF the caller presses per server command)
TRACES: dict[str, tuple[str | None, dict[str, list[str]]]] = {
    "03-fastagi-session": (None, {"GET DATA beep 6000 3": ["123"]}),
    "09-agi-caller-hangup-during-stream": ("bye", {}),
    "10-agi-caller-hangup-idle": ("bye", {}),
    "11-agi-script-args-and-query": (None, {}),
    "12-agi-getdata-timeout-and-stream-escape": (None, {
        'STREAM FILE demo-congrats "0123456789*#"': ["5"], "GET DATA beep 3000 4": ["", "78"]}),
    "14-agi-redirect-while-idle": ("redirect", {}),
    "14b-agi-redirect-during-exec-moh": ("redirect", {}),
    "14c-agi-redirect-idle-exitonhangup": ("redirect", {}),
    "14d-agi-redirect-during-stream-nosighup": ("redirect", {}),
    "14e-agi-redirect-during-stream-exitonhangup": ("redirect", {}),
}


def load_trace(name: str) -> list[tuple[str, str]]:
    path = FIXTURES / "agi" / f"{name}.agi"
    assert path.is_file(), f"missing fixture {path}"
    out = []
    for line in path.read_text().splitlines():
        m = LINE_RE.match(line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def norm(line: str) -> str:
    line = re.sub(r"^(agi_uniqueid|agi_threadid): .*", r"\1: *", line)
    line = re.sub(r"-[0-9a-f]{8}\b", "-N", line)
    line = re.sub(r"\d{9,10}\.\d+", "UID", line)
    return re.sub(r"endpos=\d+", "endpos=N", line)


def env_value(trace: list[tuple[str, str]], key: str) -> str:
    for d, text in trace:
        if d == "<<" and text.startswith(key + ": "):
            return text[len(key) + 2:]
    raise AssertionError(key)


@pytest.mark.parametrize("name", sorted(TRACES))
async def test_agi_client_matches_trace(name: str) -> None:
    trace = load_trace(name)
    trigger, dtmf = TRACES[name]
    dtmf = {k: list(v) for k, v in dtmf.items()}
    caller = env_value(trace, "agi_callerid")
    dnis = env_value(trace, "agi_extension")
    done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    sim = Simulator(dialplan=[CONF / "extensions.conf", CONF / "extensions_cti.conf"], time_scale=0.01)

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        problems: list[str] = []
        fired = False
        sent = 0
        chan = next(iter(sim.channels.values()))
        try:
            for direction, text in trace:
                if direction == ">>":
                    writer.write(text.encode() + b"\n")
                    await writer.drain()
                    sent += 1
                    for digits in dtmf.get(text, [])[:1]:
                        dtmf[text].pop(0)
                        if digits:
                            sim.pbx.spawn(sim.send_dtmf(chan, digits, gap=0.05), "dtmf")
                elif direction == "<<":
                    if trigger and not fired and (text == "HANGUP" or "result=-1" in text):
                        fired = True
                        if "result=-1" in text:
                            # Fire while the command runs, as in the trace.
                            while sum(m.name == "AGIExecStart" for m in sim.events) < sent:  # noqa: ASYNC110
                                await asyncio.sleep(0.001)
                            await asyncio.sleep(0.005)
                        if trigger == "bye":
                            sim.pbx.remote_hangup(chan)
                        else:
                            sim.pbx.redirect(chan, Location("ctid-redirect-target", "s", 1))
                    got = await asyncio.wait_for(reader.readline(), 5.0)
                    if not got.endswith(b"\n"):
                        problems.append(f"expected {text!r}, got EOF/partial {got!r}")
                        break
                    if norm(got.decode().rstrip("\n")) != norm(text):
                        problems.append(f"expected {text!r}, got {got.decode()!r}")
                elif text.startswith("(AGI server half-closes"):
                    writer.write_eof()
                elif text.startswith("(AGI server closed"):
                    writer.close()
                    break
                elif text.startswith("(EOF: Asterisk closed"):
                    rest = await asyncio.wait_for(reader.read(), 5.0)
                    if rest:
                        problems.append(f"expected EOF, got {rest!r}")
                    break
        finally:
            writer.close()
            if not done.done():
                done.set_result(problems)

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    sim.pbx.agi_address = ("127.0.0.1", srv.sockets[0].getsockname()[1])
    await sim.start()
    try:
        sim.inbound_call(dnis=dnis, caller=caller)
        problems = await asyncio.wait_for(done, 15)
        await sim.wait_idle(10)
    finally:
        srv.close()
        await sim.stop()
    assert problems == []
    assert sim.errors == []
    status = [m.get("Value") for m in sim.events if m.name == "VarSet" and m.get("Variable") == "AGISTATUS"]
    assert status == (["SUCCESS"] if trigger is None else ["HANGUP"])


async def test_agi_unreachable_sets_failure_and_dialplan_continues() -> None:
    sim = Simulator(dialplan=[CONF / "extensions.conf"], time_scale=0.01, agi_address=("127.0.0.1", 1))
    async with sim:
        sim.inbound_call(dnis="300", caller="+15551230001")
        await sim.wait_idle(5)
    status = [m.get("Value") for m in sim.events if m.name == "VarSet" and m.get("Variable") == "AGISTATUS"]
    assert status == ["FAILURE"]
    assert any(m.name == "Newexten" and "AGISTATUS=FAILURE" in (m.get("AppData") or "") for m in sim.events)


async def test_agi_never_closes_first_after_hangup() -> None:
    """Default res_agi: after HANGUP the channel waits for the server's EOF."""
    got: asyncio.Queue[bytes] = asyncio.Queue()
    release = asyncio.Event()

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()).strip():
            pass
        got.put_nowait(await reader.readline())
        await release.wait()
        writer.write_eof()
        got.put_nowait(await reader.read())
        writer.close()

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    sim = Simulator(dialplan=[CONF / "extensions.conf"], time_scale=0.01,
                    agi_address=("127.0.0.1", srv.sockets[0].getsockname()[1]))
    async with sim:
        chan = sim.inbound_call(dnis="300", caller="+15551230001", hangup_after=0.5)
        assert await asyncio.wait_for(got.get(), 5) == b"HANGUP\n"
        await asyncio.sleep(0.3)
        assert chan.name in sim.channels  # not destroyed while the server keeps the socket
        release.set()
        assert await asyncio.wait_for(got.get(), 5) == b"HANGUP\n"
        await sim.wait_idle(5)
    srv.close()


async def test_fault_partial_agi_header_then_eof() -> None:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(await reader.read())
        writer.close()

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    sim = Simulator(dialplan=[CONF / "extensions.conf"], time_scale=0.01,
                    agi_address=("127.0.0.1", srv.sockets[0].getsockname()[1]),
                    agi_faults=AGIFaults(partial_header_lines=3))
    async with sim:
        sim.inbound_call(dnis="300", caller="+15551230001")
        data = await asyncio.wait_for(got, 5)
        await sim.wait_idle(5)
    srv.close()
    assert data == (b"agi_network: yes\nagi_network_script: route\n"
                    b"agi_request: agi://127.0.0.1:4573/route\n")


async def test_fault_hangup_and_511_during_agi_dialog() -> None:
    lines: list[bytes] = []
    finished = asyncio.Event()

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()).strip():
            pass
        for cmd in (b"ANSWER\n", b"GET VARIABLE CALLERID(num)\n", b"CHANNEL STATUS\n"):
            writer.write(cmd)
            lines.append(await reader.readline())
            if cmd == b"ANSWER\n":
                lines.append(await reader.readline())  # the out-of-band HANGUP
        writer.write_eof()
        lines.append(await reader.read())
        writer.close()
        finished.set()

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    sim = Simulator(dialplan=[CONF / "extensions.conf"], time_scale=0.01,
                    agi_address=("127.0.0.1", srv.sockets[0].getsockname()[1]),
                    agi_faults=AGIFaults(hangup_after_commands=1))
    async with sim:
        sim.inbound_call(dnis="300", caller="+15551230001")
        await asyncio.wait_for(finished.wait(), 5)
        await sim.wait_idle(5)
    srv.close()
    assert lines == [b"200 result=0\n", b"HANGUP\n", b"200 result=1 (+15551230001)\n",
                     b"511 Command Not Permitted on a dead channel or intercept routine\n", b"HANGUP\n"]
