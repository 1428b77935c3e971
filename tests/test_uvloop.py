"""ctid on uvloop, the loop ``ctid run`` picks by default (``--loop auto``).

A real ``ctid run --loop uvloop`` process is driven through its real interfaces: the
simulator (in the test's own process) is its Asterisk over AMI and FastAGI, and the
test is a client of its HTTP API and websocket, all on 127.0.0.1. uvloop's transports
do not subclass ``asyncio.Transport``, so code that checks for that class breaks there
and nowhere else; the FastAGI server is also checked in-process on a uvloop loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop

from ctid import cli
from ctid.asterisk.agi import AGISession, FastAGIServer
from tests import services
from tests.test_app import SECRET, make_sim

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-uvloop-supervisor-acme"
BOUND = 20.0  # seconds: the upper bound of any one wait in this module


def write_config(path: Path, *, ami_port: int, agi_port: int, http_port: int) -> None:
    path.write_text(
        f'[database]\nurl = "sqlite+aiosqlite:///{path.parent / "uvloop.db"}"\n'
        f'[agi]\nport = {agi_port}\n'
        f'[http]\nbind = "127.0.0.1"\nport = {http_port}\n'
        f'[[asterisk]]\nid = "sim"\nport = {ami_port}\nsecret = "{SECRET}"\n'
        'reconnect_min = 0.05\nreconnect_max = 0.2\n'
        '[[tenants]]\nid = "acme"\n'
        '[[service_lines]]\nid = "acme-support"\ntenant = "acme"\ndnis = ["200"]\n'
        '[[tokens]]\nname = "sup"\nrole = "supervisor"\ntenant = "acme"\n'
        f'token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"\n'
    )


@contextlib.contextmanager
def ctid_run(config: Path, loop: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``ctid run -c config --loop loop``, logging to a file (nobody has to drain a pipe);
    killed if the test leaves it running."""
    log_path = config.with_suffix(".log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTID_")}
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ctid", "run", "-c", str(config), "--loop", loop],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def logged(path: Path, event: str) -> dict[str, Any] | None:
    return next((line for line in log_lines(path) if line.get("event") == event), None)


async def until(predicate: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - bounded poll of another process's state
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def stop_with_sigterm(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, BOUND)
    out = await asyncio.to_thread(log_path.read_text)
    assert code == 0, out
    assert '"ctid.stopped"' in out, out


# --------------------------------------------------------------------------- a real ctid run


async def test_ctid_run_on_uvloop_serves_a_fastagi_call_http_and_websocket_then_stops_on_sigterm(
        tmp_path: Path) -> None:
    sim = make_sim()
    await sim.start()
    agi_port, http_port = services.free_port(), services.free_port()
    write_config(tmp_path / "ctid.toml", ami_port=sim.ami_port, agi_port=agi_port, http_port=http_port)
    url = f"http://127.0.0.1:{http_port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with ctid_run(tmp_path / "ctid.toml", "uvloop") as (proc, log_path):
            await until(lambda: proc.poll() is not None or logged(log_path, "ctid.started") is not None,
                        "ctid.started")
            assert proc.poll() is None, log_path.read_text()
            loop_line = logged(log_path, "ctid.event_loop")
            assert loop_line is not None and (loop_line["loop"], loop_line["requested"]) == ("uvloop", "uvloop")
            names = [line["event"] for line in log_lines(log_path)]
            assert names.index("ctid.event_loop") < names.index("ctid.starting"), "the loop is logged first"
            await until(lambda: any(s.authenticated for s in sim.ami.sessions), "ctid's AMI login")
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND)) as http:
                for _ in range(200):  # 503 until the AMI link reports logged in
                    async with http.get(url + "/healthz") as resp:
                        health = await resp.json()
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.05)
                assert resp.status == 200, health
                assert health["agi"]["listening"] is True

                ws = await http.ws_connect(url + "/ws", headers=auth)
                await ws.send_json({"op": "subscribe", "req_id": 1, "types": ["call.started"]})
                ack = await ws.receive_json(timeout=BOUND)
                assert (ack["type"], ack["req_id"]) == ("ack", 1), ack

                # An inbound call: the simulator's dialplan opens FastAGI /inbound to ctid.
                sim.pbx.agi_address = ("127.0.0.1", agi_port)
                chan = sim.inbound_call(dnis="200", caller="+15551230040")
                started = await ws.receive_json(timeout=BOUND)
                assert started["type"] == "call.started", started
                # The FastAGI session ran to its end on uvloop: ctid identified the call
                # and told the dialplan where it goes next.
                await until(lambda: chan.variables.get("CTID_ROUTE") == "fallback", "the end of the FastAGI session")
                call_id = chan.variables.get("__CTID_CALL_ID")
                assert call_id is not None and len(call_id) == 32
                assert chan.variables.get("__CTID_SERVICE_LINE") == "acme-support"
                assert (started["call_id"], started["tenant"]) == (call_id, "acme")
                async with http.get(url + "/api/v1/calls", headers=auth) as resp:
                    assert resp.status == 200
                    calls = (await resp.json())["calls"]
                assert [c["call_id"] for c in calls] == [call_id]
                await sim.caller_hangup(chan)
                await ws.close()
            await stop_with_sigterm(proc, log_path)
    finally:
        await sim.stop()


@pytest.mark.parametrize(("option", "runs"), [("auto", "uvloop"), ("asyncio", "asyncio")])
async def test_ctid_run_logs_the_loop_it_runs(tmp_path: Path, option: str, runs: str) -> None:
    # No Asterisk listens: the daemon runs (reconnecting) all the same.
    write_config(tmp_path / "ctid.toml", ami_port=services.free_port(), agi_port=services.free_port(),
                 http_port=services.free_port())
    with ctid_run(tmp_path / "ctid.toml", option) as (proc, log_path):
        await until(lambda: proc.poll() is not None or logged(log_path, "ctid.started") is not None,
                    "ctid.started")
        assert proc.poll() is None, log_path.read_text()
        line = logged(log_path, "ctid.event_loop")
        assert line is not None and (line["loop"], line["requested"], line["level"]) == (runs, option, "info")
        await stop_with_sigterm(proc, log_path)


async def test_ctid_demo_runs_its_calls_on_uvloop(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CTID_")},
           "CTID_DB_URL": f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"}
    config = tmp_path / "demo.toml"
    config.write_text("[http]\nport = 0\n[simulator]\ntime_scale = 0.05\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ctid", "demo", "-c", str(config), "--calls", "1", "--rate", "600", "--loop", "uvloop",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out_bytes, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = out_bytes.decode()
    assert proc.returncode == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [line["loop"] for line in lines if line["event"] == "ctid.event_loop"] == ["uvloop"], out
    names = [line["event"] for line in lines]
    assert names.count("call.started") == 1 and names.count("call.ended") == 1, out


# --------------------------------------------------------------------------- in-process, on a uvloop loop


def test_a_fastagi_session_completes_on_a_uvloop_loop() -> None:
    """The FastAGI server on uvloop (its transports are not ``asyncio.Transport``s): a
    session gets its environment, a command and its reply, and is closed at the end."""
    seen: list[tuple[str, int, str | None]] = []

    async def handler(session: AGISession) -> None:
        result = await session.send_command("GET VARIABLE", "CTID_CALL_ID")
        seen.append((session.script, result.code, result.data))

    async def scenario() -> str:
        assert cli.loop_name(asyncio.get_running_loop()) == "uvloop"
        server = FastAGIServer("127.0.0.1", 0, {"inbound": handler})
        await server.start()
        try:
            async with asyncio.timeout(BOUND):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"agi_network: yes\nagi_network_script: inbound?dnis=200\n"
                             b"agi_channel: PJSIP/trunk-00000001\nagi_uniqueid: 1796000000.1\n\n")
                command = await reader.readline()
                writer.write(b"200 result=1 (abc)\n")
                rest = await reader.read()  # the server closes once the handler returns
                writer.close()
                return (command + rest).decode()
        finally:
            await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sent = runner.run(scenario())
    assert sent == "GET VARIABLE \"CTID_CALL_ID\"\n"
    assert seen == [("inbound", 200, "abc")]


# --------------------------------------------------------------------------- choosing the loop


def test_loop_auto_is_uvloop_when_importable_else_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.loop_factory("auto") is uvloop.new_event_loop
    assert cli.loop_factory("uvloop") is uvloop.new_event_loop
    assert cli.loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # "import uvloop" now raises ImportError
    assert cli.loop_factory("auto") is None
    with pytest.raises(cli.LoopUnavailable, match="uvloop cannot be imported"):
        cli.loop_factory("uvloop")


def test_loop_uvloop_without_uvloop_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert cli.main(["run", "-c", str(tmp_path / "absent.toml"), "--loop", "uvloop"]) == cli.EXIT_CONFIG
    assert "--loop uvloop: uvloop cannot be imported" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "-c", "ctid.toml", "--loop", "trio"])
    assert info.value.code == cli.EXIT_CONFIG
