"""The daemon end to end: the simulator runs the shipped dialplan, ctid follows over AMI
and FastAGI on 127.0.0.1, call records land in SQLite and in a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from ctid.app import Daemon, DaemonFailed
from ctid.calls import CHANNELVARS, CallState, HangupBy
from ctid.config import Config, parse
from ctid.simulator import Simulator
from ctid.simulator.config import Endpoint, QueueConfig, QueueMember
from ctid.store.calls import CallStore
from ctid.store.db import Database
from tests import services

ROOT = Path(__file__).resolve().parent.parent
DIALPLAN = ROOT / "dialplans" / "ctid.conf"
SECRET = "test-secret"


def make_sim(**kw: object) -> Simulator:
    endpoints = {"trunk": Endpoint("trunk", context="ctid-inbound", ring_s=0.0)}
    for n in ("1001", "1002"):
        endpoints[n] = Endpoint(n, context="from-agents", callerid_num=n, callerid_name=f"Agent {n}", ring_s=0.5)
    queues = {"ctid-fallback": QueueConfig("ctid-fallback", strategy="rrmemory", timeout=15, retry=2,
                                           members=[QueueMember(f"PJSIP/{n}", f"Agent {n}") for n in ("1001", "1002")])}
    return Simulator(dialplan=DIALPLAN, users={"ctid": SECRET}, channelvars=CHANNELVARS, endpoints=endpoints,
                     queues=queues, time_scale=kw.pop("time_scale", 0.05), **kw)  # type: ignore[arg-type]


def make_config(ami_port: int, db_url: str, **extra: object) -> Config:
    data: dict[str, object] = {
        "database": {"url": db_url},
        "agi": {"port": 0, "hangup_grace": 1.0},
        "http": {"port": 0},
        "asterisk": [{"id": "sim", "host": "127.0.0.1", "port": ami_port or 1, "username": "ctid", "secret": SECRET,
                      "reconnect_min": 0.05, "reconnect_max": 0.2, "ping_interval": 5.0}],
        "tenants": [{"id": "acme", "timezone": "Europe/London"}],
        "service_lines": [{"id": "acme-support", "tenant": "acme", "dnis": ["+442071234567", "200"]}],
    }
    data.update(extra)
    return parse(data, env={})


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ctid.db'}"
    return str(request.getfixturevalue("postgres_db"))


@pytest.fixture
def postgres_db(postgres_url: str) -> str:
    """A fresh database on the session's PostgreSQL server."""
    import uuid

    import asyncpg

    name = f"app_{uuid.uuid4().hex[:12]}"
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")

    async def create() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return postgres_url.rsplit("/", 1)[0] + "/" + name


@contextlib.asynccontextmanager
async def running(sim: Simulator, config: Config) -> AsyncIterator[Daemon]:
    await sim.start()
    daemon = Daemon(config.model_copy(update={"asterisk": [
        config.asterisk[0].model_copy(update={"port": sim.ami_port})]}))
    await daemon.start()
    sim.pbx.agi_address = ("127.0.0.1", daemon.agi.port)
    try:
        await daemon.links["sim"].client.wait_logged_in(5)
        yield daemon
    finally:
        await daemon.stop()
        await sim.stop()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - bounded poll of state owned by other tasks
            await asyncio.sleep(0.01)


async def test_inbound_call_is_identified_followed_and_stored(db_url: str) -> None:
    sim = make_sim()
    async with running(sim, make_config(0, db_url)) as daemon:
        model = daemon.links["sim"].model
        chan = sim.inbound_call(dnis="+442071234567", caller="+15551230001", caller_name="Zoë Caller")
        await until(lambda: any(c.state is CallState.CONNECTED for c in model.calls.values()))
        (call,) = model.calls.values()
        # The id ctid set over FastAGI is the id the model uses (not the Linkedid fallback).
        assert call.call_id == chan.variables.get("__CTID_CALL_ID")
        assert len(call.call_id) == 32
        assert (call.tenant, call.service_line, call.caller_name) == ("acme", "acme-support", "Zoë Caller")
        await sim.caller_hangup(chan)
        await until(lambda: not model.calls)
        ended = model.get(call.call_id)
        assert ended is not None and ended.state is CallState.ENDED and ended.hangup_by is HangupBy.CALLER
        await until(lambda: daemon.recorder.pending == 0)
        record = await daemon.store.get_call(call.call_id)
        assert record is not None
        assert record.ended_at is not None and record.hangup_by == "caller"
        assert record.dnis == "+442071234567" and record.caller_name == "Zoë Caller"
        assert {leg.role for leg in record.legs} == {"caller", "agent"}


async def test_fastagi_down_at_entry_sends_the_caller_to_the_native_queue(tmp_path: Path) -> None:
    sim = make_sim()
    await sim.start()
    try:
        dead = services.free_port()  # nothing listens there: ctid is down
        sim.pbx.agi_address = ("127.0.0.1", dead)
        sim.inbound_call(dnis="200", caller="+15551230002")
        join = await sim.wait_event("QueueCallerJoin", timeout=10, Queue="ctid-fallback")
        assert join.get("Channel", "").startswith("PJSIP/trunk-")
        assert not sim.errors
    finally:
        await sim.stop()


async def test_unknown_dnis_is_logged_and_still_served(tmp_path: Path) -> None:
    sim = make_sim()
    async with running(sim, make_config(0, f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")) as daemon:
        sim.inbound_call(dnis="999", caller="anonymous")
        join = await sim.wait_event("QueueCallerJoin", timeout=10, Queue="ctid-fallback")
        assert join is not None
        model = daemon.links["sim"].model
        await until(lambda: any(len(c.call_id) == 32 for c in model.calls.values()))
        (call,) = model.calls.values()
        assert call.tenant == "acme" and call.service_line is None and call.caller_number == "anonymous"


async def test_model_equals_asterisk_channels_within_2s_of_relogin(tmp_path: Path) -> None:
    sim = make_sim()
    config = make_config(0, f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    async with running(sim, config) as daemon:
        link = daemon.links["sim"]
        model = link.model
        first = sim.inbound_call(dnis="200", caller="+15551230003")
        second = sim.inbound_call(dnis="200", caller="+15551230004")
        await until(lambda: sum(1 for c in model.calls.values() if c.state is CallState.CONNECTED) == 2)
        # The link drops; while it is down one call ends and a new one starts.
        logins = link.client.logins
        for session in list(sim.ami.sessions):
            session.close()
        await until(lambda: not link.client.connected, 2)
        await sim.caller_hangup(first)
        third = sim.inbound_call(dnis="200", caller="+15551230005")
        await until(lambda: third.name in sim.channels and first.name not in sim.channels)
        loop = asyncio.get_running_loop()
        await until(lambda: link.client.logins > logins, 5)
        relogin = loop.time()

        def views_agree() -> bool:
            return set(model.channels) == {c.uniqueid for c in sim.channels.values()}

        await until(views_agree, 2.0)
        assert loop.time() - relogin < 2.0
        assert first.uniqueid not in model.channels and second.uniqueid in model.channels
        # The call that vanished while the link was down ended, with nobody to blame.
        vanished = model.get(first.variables["__CTID_CALL_ID"])
        assert vanished is not None and vanished.state is CallState.ENDED and vanished.hangup_by is HangupBy.UNKNOWN
        # The call that started during the outage was adopted from CoreShowChannels while
        # it sat in the fallback queue (exten "s"): the exported variables say where from.
        adopted = model.get(third.variables["__CTID_CALL_ID"])
        assert adopted is not None and adopted.active
        assert (adopted.tenant, adopted.service_line, adopted.dnis) == ("acme", "acme-support", "200")


async def test_rejected_ami_login_is_fatal_with_a_clear_reason(tmp_path: Path) -> None:
    sim = make_sim()
    await sim.start()
    try:
        config = make_config(sim.ami_port, f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
        wrong = config.asterisk[0].model_copy(update={"secret": SecretStr("wrong")})
        bad = config.model_copy(update={"asterisk": [wrong]})
        daemon = Daemon(bad)
        await daemon.start()
        try:
            reason = await asyncio.wait_for(daemon.wait_failed(), 5)
        finally:
            await daemon.stop()
        assert "Authentication failed" in reason and "sim" in reason
    finally:
        await sim.stop()


async def test_unreachable_database_is_a_clear_startup_failure(tmp_path: Path) -> None:
    config = make_config(services.free_port(), f"postgresql+asyncpg://ctid:hunter2@127.0.0.1:{services.free_port()}/x")
    with pytest.raises(DaemonFailed, match="database unavailable") as info:
        await Daemon(config).start()
    assert "hunter2" not in str(info.value)


async def test_call_records_survive_a_database_outage() -> None:
    with services.postgres() as pg:
        sim = make_sim()
        async with running(sim, make_config(0, pg.url)) as daemon:
            model = daemon.links["sim"].model
            await asyncio.to_thread(pg.pause)
            chan = sim.inbound_call(dnis="200", caller="+15551230006")
            await until(lambda: any(len(c.call_id) == 32 for c in model.calls.values()))
            await sim.caller_hangup(chan)
            await until(lambda: not model.calls)
            await until(lambda: daemon.recorder.last_error is not None)
            assert daemon.recorder.pending >= 1
            await asyncio.to_thread(pg.start)
            await until(lambda: daemon.recorder.pending == 0 and daemon.recorder.last_error is None, 40)
            records = await daemon.store.list_calls()
            assert len(records) == 1 and records[0].ended_at is not None


def _ctid_process(config_path: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTID_")}
    return subprocess.Popen([sys.executable, "-m", "ctid", "run", "-c", str(config_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _write_config(path: Path, ami_port: int, agi_port: int, secret: str) -> None:
    path.write_text(
        f'[database]\nurl = "sqlite+aiosqlite:///{path.parent / "run.db"}"\n'
        f'[agi]\nport = {agi_port}\n[http]\nport = {services.free_port()}\n'
        f'[[asterisk]]\nid = "sim"\nport = {ami_port}\nsecret = "{secret}"\n'
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_ctid_run_stops_in_order_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """FastAGI sessions are closed first, then AMI logs off, then the call records are
    written, and the process exits 0."""
    sim = make_sim()
    await sim.start()
    try:
        agi_port = services.free_port()
        _write_config(tmp_path / "ctid.toml", sim.ami_port, agi_port, SECRET)
        proc = _ctid_process(tmp_path / "ctid.toml")
        try:
            await until(lambda: any(sess.authenticated for sess in sim.ami.sessions), 20)
            await asyncio.to_thread(services.wait_for_port, agi_port, 10)
            sim.pbx.agi_address = ("127.0.0.1", agi_port)
            chan = sim.inbound_call(dnis="200", caller="+15551230030")  # a call is up
            await until(lambda: chan.variables.get("CTID_ROUTE") == "fallback")
            # A FastAGI session that is mid-command: "Asterisk" never answers GET VARIABLE.
            reader, writer = await asyncio.open_connection("127.0.0.1", agi_port)
            writer.write(b"agi_network: yes\nagi_network_script: inbound?dnis=200\n"
                         b"agi_channel: PJSIP/trunk-000000ff\nagi_uniqueid: 1796000000.255\n\n")
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"GET VARIABLE")
            logoffs = [0]
            original = sim.ami.actions["logoff"]

            def counting_logoff(session: object, action: object) -> None:
                logoffs[0] += 1
                original(session, action)  # type: ignore[arg-type]

            sim.ami.actions["logoff"] = counting_logoff
            proc.send_signal(sig)
            # The open session is closed by ctid: Asterisk would free the channel now.
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out
        names = [json.loads(line).get("event") for line in out.splitlines() if line.startswith("{")]
        assert names.index("agi.stopped") < names.index("ctid.stopped")
        assert logoffs[0] == 1
        stopped = json.loads(next(line for line in out.splitlines() if '"ctid.stopped"' in line))
        assert stopped["records_unsaved"] == 0
        async with Database(f"sqlite+aiosqlite:///{tmp_path / 'run.db'}") as db:
            records = await CallStore(db.sessions).list_calls()
        assert [r.caller_number for r in records] == ["+15551230030"]
    finally:
        await sim.stop()


async def test_ctid_run_exits_1_when_asterisk_rejects_the_login(tmp_path: Path) -> None:
    sim = make_sim()
    await sim.start()
    try:
        _write_config(tmp_path / "ctid.toml", sim.ami_port, services.free_port(), "wrong")
        proc = _ctid_process(tmp_path / "ctid.toml")
        try:
            out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 1, out
        assert "Authentication failed" in out
        assert out.count('"ami.login_failed"') == 1  # no retry storm
    finally:
        await sim.stop()


async def test_demo_runs_calls_end_to_end_and_stores_them(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CTID_")},
           "CTID_DB_URL": f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"}
    config = tmp_path / "demo.toml"
    config.write_text("[http]\nport = 0\n[simulator]\ntime_scale = 0.05\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ctid", "demo", "-c", str(config), "--calls", "3", "--rate", "600", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out_bytes, _ = await asyncio.wait_for(proc.communicate(), 90)
    out = out_bytes.decode()
    assert proc.returncode == 0, out
    logged = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    names = [line["event"] for line in logged]
    assert names.count("call.started") == 3 and names.count("call.ended") == 3, out
    published = [line["type"] for line in logged if line["event"] == "demo.event"]
    assert published.count("call.ended") == 3 and "agent.state" in published and "queue.stats" in published
    assert "demo: 3 call record(s)" in out
    async with Database(env["CTID_DB_URL"]) as db:
        records = await CallStore(db.sessions).list_calls()
    assert len(records) == 3 and all(r.ended_at is not None and r.tenant == "demo" for r in records)


async def test_partial_agi_header_then_eof_does_not_block_the_next_call(tmp_path: Path) -> None:
    sim = make_sim()
    async with running(sim, make_config(0, f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")) as daemon:
        sim.agi_faults.partial_header_lines = 4  # "Asterisk" sends 4 env lines, then EOF
        sim.inbound_call(dnis="200", caller="+15551230010")
        # ctid never saw a session, so the caller is served by the native queue.
        await sim.wait_event("QueueCallerJoin", timeout=10, Queue="ctid-fallback")
        sim.agi_faults.partial_header_lines = None
        model = daemon.links["sim"].model
        second = sim.inbound_call(dnis="200", caller="+15551230011")
        await until(lambda: any(len(c.call_id) == 32 and c.caller_number == "+15551230011"
                                for c in model.calls.values()))
        await until(lambda: second.variables.get("CTID_ROUTE") == "fallback")
        assert daemon.agi.session_count == 0


async def test_caller_hangup_during_the_agi_dialog_releases_the_channel_promptly(tmp_path: Path) -> None:
    # By default Asterisk keeps the channel until ctid closes the FastAGI socket.
    sim = make_sim()
    async with running(sim, make_config(0, f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")) as daemon:
        sim.agi_faults.hangup_after_commands = 1
        chan = sim.inbound_call(dnis="200", caller="+15551230012")
        await until(lambda: chan.name not in sim.channels, 5)
        assert daemon.agi.session_count == 0
        model = daemon.links["sim"].model
        await until(lambda: not model.calls)
        call_id = chan.variables.get("__CTID_CALL_ID")  # SET VARIABLE still works on a dead channel
        assert call_id is not None
        ended = model.get(call_id)
        assert ended is not None and ended.state is CallState.ENDED and ended.hangup_by is HangupBy.CALLER


async def test_hostile_dnis_is_filtered_before_it_reaches_fastagi(tmp_path: Path) -> None:
    sim = make_sim()
    async with running(sim, make_config(0, f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")) as daemon:
        chan = sim.inbound_call(dnis="200&call_id=evil", caller="+15551230020")
        await until(lambda: chan.variables.get("CTID_ROUTE") == "fallback")
        assert chan.variables["__CTID_DNIS"] == "200"
        assert chan.variables["__CTID_SERVICE_LINE"] == "acme-support"
        assert chan.variables["__CTID_CALL_ID"] != "evil"
        assert daemon.agi.session_count == 0


async def test_healthz_says_503_with_the_reason_while_asterisk_is_unreachable(tmp_path: Path) -> None:
    import aiohttp

    config = make_config(services.free_port(), f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    daemon = Daemon(config)
    await daemon.start()
    try:
        link = daemon.links["sim"]
        await until(lambda: link.client.last_error is not None)
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{daemon.api.port}/healthz") as r:
            body = await r.json()
        assert r.status == 503
        assert any("AMI link sim" in reason for reason in body["reasons"]), body
        assert body["ami"]["sim"]["last_error"] and "Connect" in body["ami"]["sim"]["last_error"]
        assert body["agi"]["listening"] is True and body["db"]["ok"] is True
    finally:
        await daemon.stop()
