"""Fail-open while callers wait: ``kill -9`` a real ``ctid run`` process with callers in
``[ctid-hold]``, and their next check-in (``AGISTATUS=FAILURE``: nothing listens on the
FastAGI port any more) sends them to the native ``Queue(ctid-fallback)``.

The simulator runs in the test process with the shipped ``dialplans/ctid.conf``; ctid is
a child process (``python -m ctid run -c ...``), as in ``tests/test_app.py``. In the first
test no agent logs in, so both callers keep waiting in ctid's queue until ctid dies. The
second runs with ``[acd] sync_fallback_members = true``: ctid made the logged-in agent a
member of the native queue, and after the kill app_queue rings that agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from ctid.calls import CHANNELVARS
from ctid.simulator import Simulator
from ctid.simulator.channels import Channel
from ctid.simulator.config import Endpoint, QueueConfig, QueueMember
from tests import services
from tests.test_acd_fallback import install_queue_actions, members

ROOT = Path(__file__).resolve().parent.parent
DIALPLAN = ROOT / "dialplans" / "ctid.conf"
SECRET = "failover-secret"
SCALE = 0.1  # real seconds per simulated second
CHECKIN_S = 2  # simulated seconds of music between check-ins (the queue's checkin_s)
INTERVAL = CHECKIN_S * SCALE  # one check-in interval, in real seconds


def make_sim() -> Simulator:
    endpoints = {"trunk": Endpoint("trunk", context="ctid-inbound", ring_s=0.0)}
    for n in ("1001", "1002"):
        endpoints[n] = Endpoint(n, context="from-agents", callerid_num=n, callerid_name=f"Agent {n}", ring_s=1.0)
    queues = {"ctid-fallback": QueueConfig("ctid-fallback", members=[QueueMember("PJSIP/1001", "Agent 1001")])}
    return Simulator(dialplan=DIALPLAN, users={"ctid": SECRET}, channelvars=CHANNELVARS, endpoints=endpoints,
                     queues=queues, time_scale=SCALE)


def write_config(path: Path, ami_port: int, agi_port: int, *, http_port: int = 0, requires: str = "*",
                 extra: str = "") -> None:
    path.write_text(
        f'[database]\nurl = "sqlite+aiosqlite:///{path.parent / "failover.db"}"\n'
        f'[agi]\nport = {agi_port}\n[http]\nport = {http_port or services.free_port()}\n'
        f'[[asterisk]]\nid = "sim"\nport = {ami_port}\nsecret = "{SECRET}"\n'
        'reconnect_min = 0.05\nreconnect_max = 0.2\n'
        '[[tenants]]\nid = "acme"\n'
        '[[service_lines]]\nid = "support-line"\ntenant = "acme"\ndnis = ["200"]\nqueue = "support"\n'
        f'[[queues]]\nid = "support"\ntenant = "acme"\ncheckin_s = {CHECKIN_S}\nrequires = "{requires}"\n'
        + extra
    )


def ctid_process(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTID_")}
    with log_path.open("wb") as out:  # a file, not a pipe: nobody has to drain it
        return subprocess.Popen([sys.executable, "-m", "ctid", "run", "-c", str(config_path)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - bounded poll of state owned by other tasks
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def holds_answered(sim: Simulator, chan: Channel) -> int:
    """How many times ctid told this channel ``CTID_ROUTE=hold`` (at /inbound, then per check-in)."""
    return sum(1 for m in sim.events if m.name == "VarSet" and m.get("Channel") == chan.name
               and m.get("Variable") == "CTID_ROUTE" and m.get("Value") == "hold")


async def test_kill_9_with_callers_in_hold_sends_them_to_the_native_queue_at_their_next_checkin(
        tmp_path: Path) -> None:
    sim = make_sim()
    await sim.start()
    agi_port = services.free_port()
    config = tmp_path / f"failover-{os.getpid()}.toml"
    log_path = tmp_path / "ctid-run.log"
    write_config(config, sim.ami_port, agi_port)
    sim.pbx.agi_address = ("127.0.0.1", agi_port)
    proc = ctid_process(config, log_path)
    try:
        await until(lambda: any(s.authenticated for s in sim.ami.sessions) or proc.poll() is not None, 30,
                    "ctid's AMI login")
        assert proc.poll() is None, log_path.read_text()
        await asyncio.to_thread(services.wait_for_port, agi_port, 15)

        callers = [sim.inbound_call(dnis="200", caller=f"+1555123009{n}") for n in range(2)]
        # Both wait in ctid's queue: queued by ctid at /inbound, and kept there by ctid at
        # at least one periodic check-in each (CTID_ROUTE=hold answered twice).
        await until(lambda: all(c.variables.get("__CTID_QUEUE") == "support" for c in callers), 10,
                    "both callers queued by ctid")
        await until(lambda: all(holds_answered(sim, c) >= 2 for c in callers), 10 + 4 * INTERVAL,
                    "a check-in of each caller answered by ctid")
        assert all(c.context == "ctid-hold" for c in callers), [c.context for c in callers]
        assert not any(m.name == "QueueCallerJoin" for m in sim.events), "nobody is in the native queue yet"

        proc.send_signal(signal.SIGKILL)  # no shutdown: sockets die with the process
        killed = time.monotonic()
        await asyncio.to_thread(proc.wait, 10)
        assert proc.returncode == -signal.SIGKILL

        def joined() -> set[str]:
            return {m.get("Channel") or "" for m in sim.events
                    if m.name == "QueueCallerJoin" and m.get("Queue") == "ctid-fallback"}

        names = {c.name for c in callers}
        # The next check-in comes at most one interval after the kill; allow three, plus
        # the time the simulator needs to fail a connect and start Queue().
        bound = 3 * INTERVAL + 1.0
        await until(lambda: names <= joined(), bound + 5, "both callers in Queue(ctid-fallback)")
        elapsed = time.monotonic() - killed
        print(f"fail-over in {elapsed:.3f} s, bound {bound:.2f} s")
        assert elapsed <= bound, f"fail-over took {elapsed:.2f} s, bound {bound:.2f} s"
        for chan in callers:
            assert not chan.hungup, "a caller was dropped"
            # The check-in after the kill failed (connection refused): AGISTATUS=FAILURE.
            assert chan.variables.get("AGISTATUS") == "FAILURE", chan.variables.get("AGISTATUS")
        assert not sim.errors, sim.errors
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await sim.stop()


SUPERVISOR = "failover-supervisor-token"


async def test_kill_9_with_fallback_sync_the_native_queue_rings_the_agents_ctid_had_logged_in(
        tmp_path: Path) -> None:
    """``[acd] sync_fallback_members = true``: the fallback queue has no static members;
    ctid added the logged-in agent's device (ready: unpaused). The agent lacks the skill
    level the queue needs, so both callers wait in ctid-hold. After ``kill -9`` they go to
    the native queue at their next check-in, and app_queue rings that agent's phone."""
    sim = make_sim()
    sim.pbx.queues["ctid-fallback"].members.clear()
    install_queue_actions(sim)  # the simulator has no QueueAdd/QueueRemove of its own
    await sim.start()
    agi_port, http_port = services.free_port(), services.free_port()
    config = tmp_path / f"failover-sync-{os.getpid()}.toml"
    log_path = tmp_path / "ctid-run.log"
    digest = hashlib.sha256(SUPERVISOR.encode()).hexdigest()
    write_config(config, sim.ami_port, agi_port, http_port=http_port, requires="lang:en>=5", extra=(
        '[[agents]]\nid = "1001"\ntenant = "acme"\nskills = { "lang:en" = 3 }\n'
        f'[[tokens]]\nname = "boss"\nrole = "supervisor"\ntenant = "acme"\ntoken_sha256 = "{digest}"\n'
        '[acd]\nsync_fallback_members = true\n'))
    sim.pbx.agi_address = ("127.0.0.1", agi_port)
    proc = ctid_process(config, log_path)
    try:
        await until(lambda: any(s.authenticated for s in sim.ami.sessions) or proc.poll() is not None, 30,
                    "ctid's AMI login")
        assert proc.poll() is None, log_path.read_text()
        await asyncio.to_thread(services.wait_for_port, http_port, 15)
        async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{http_port}/api/v1/agents/1001/login", json={"device": "PJSIP/1001"},
                headers={"Authorization": f"Bearer {SUPERVISOR}"}) as r:
            assert r.status == 200, await r.text()
        await until(lambda: members(sim).get("PJSIP/1001") == (False, "dynamic"), 10, "the agent's member")

        callers = [sim.inbound_call(dnis="200", caller=f"+1555123019{n}") for n in range(2)]
        await until(lambda: all(holds_answered(sim, c) >= 2 for c in callers), 10 + 4 * INTERVAL,
                    "a check-in of each caller answered by ctid")
        assert not any(m.name in ("QueueCallerJoin", "DialBegin") for m in sim.events)

        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        called = await sim.wait_event("AgentCalled", timeout=3 * INTERVAL + 5, Queue="ctid-fallback",
                                      Interface="PJSIP/1001")
        assert called.get("Channel") in {c.name for c in callers}
        await until(lambda: {c.name for c in callers} <= {m.get("Channel") for m in sim.events
                                                          if m.name == "QueueCallerJoin"}, 5, "both callers queued")
        assert not sim.errors, sim.errors
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await sim.stop()
