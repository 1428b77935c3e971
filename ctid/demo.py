"""``ctid demo``: the real daemon against the built-in Asterisk simulator.

The simulator loads the shipped ``dialplans/ctid.conf`` (so the dialplan under test is
the dialplan that ships), listens for AMI on a free loopback port, and generates
inbound calls on a trunk whose context is ``ctid-inbound``. Each call runs the real
path: ``Answer``, FastAGI ``inbound`` to ctid (which sets ``__CTID_CALL_ID``), then the
native fallback queue, where a simulated agent answers; the caller hangs up after a
while. ctid follows everything over AMI, logs ``call.started``/``call.answered``/
``call.ended`` and writes the call records to the configured database (SQLite by
default). Every event goes out on the bus as it would to MQTT and websockets (one
``demo.event`` log line each); two demo agents are signed in, and the HTTP API and
websocket listen with a supervisor token printed at start. The demo grows with each
issue: agents routed by the ACD, the IVR and recording come next.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
import signal
from importlib import resources
from pathlib import Path

import structlog

from ctid.app import Daemon
from ctid.calls import CHANNELVARS
from ctid.config import (
    AgentConfig,
    AsteriskConfig,
    Config,
    QueueConfig,
    ServiceLineConfig,
    TenantConfig,
    TokenConfig,
)
from ctid.events.schema import Event

log = structlog.get_logger(__name__)

DEMO_SECRET = "demo-only-secret"
AGENTS = ("1001", "1002", "1003", "1004")


def dialplan_path() -> Path:
    """``dialplans/ctid.conf`` of this checkout (the demo runs from a clone)."""
    here = Path(str(resources.files("ctid"))).parent / "dialplans" / "ctid.conf"
    if not here.is_file():
        raise FileNotFoundError(f"dialplan not found: {here} (run the demo from a clone of ctid)")
    return here


def demo_config(config: Config, ami_port: int, token: str) -> Config:
    """The user's config, pointed at the simulator, with a demo tenant, line, agents,
    queue and supervisor token when it has no service line of its own."""
    link = AsteriskConfig(id="sim", host="127.0.0.1", port=ami_port, username="ctid",
                          secret=DEMO_SECRET)  # type: ignore[arg-type]
    update: dict[str, object] = {"asterisk": [link]}
    update["agi"] = config.agi.model_copy(update={"port": 0})
    if not config.service_lines:
        tenant = TenantConfig(id="demo", name="Demo tenant", timezone="Europe/London")
        update["tenants"] = [tenant, *config.tenants]
        update["service_lines"] = [ServiceLineConfig(id="demo-support", tenant="demo", name="Demo support",
                                                     dnis=["+442071234567", "200"], recording="always")]
        update["agents"] = [AgentConfig(id=n, tenant="demo", name=f"Agent {n}") for n in AGENTS]
        update["queues"] = [QueueConfig(id="support", tenant="demo", name="Support")]
        update["tokens"] = [*config.tokens, TokenConfig(
            name="demo-supervisor", role="supervisor", tenant="demo",
            token_sha256=hashlib.sha256(token.encode()).hexdigest())]
    return config.model_copy(update=update)


class _EventLog:
    """A bus sink that logs one short line per event, so the demo shows the stream."""

    name = "demo-log"

    def offer(self, event: Event, payload: str) -> None:
        log.info("demo.event", seq=event.seq, type=event.type, call_id=event.call_id, agent_id=event.agent_id,
                 queue=event.queue, state=event.data.get("state"))


async def run_demo(config: Config, *, calls: int = 0, rate: float | None = None) -> int:
    from ctid.simulator import Simulator
    from ctid.simulator.config import Endpoint, QueueConfig, QueueMember

    per_minute = rate if rate is not None else config.simulator.calls_per_minute
    endpoints = {"trunk": Endpoint("trunk", context="ctid-inbound", ring_s=0.0)}
    for number in AGENTS:
        endpoints[number] = Endpoint(number, context="from-agents", callerid_num=number,
                                     callerid_name=f"Agent {number}", ring_s=1.0)
    queues = {"ctid-fallback": QueueConfig("ctid-fallback", strategy="rrmemory", timeout=15, retry=2,
                                           members=[QueueMember(f"PJSIP/{n}", f"Agent {n}") for n in AGENTS])}
    sim = Simulator(dialplan=dialplan_path(), users={"ctid": DEMO_SECRET},
                    channelvars=CHANNELVARS,
                    endpoints=endpoints, queues=queues, time_scale=config.simulator.time_scale)
    await sim.start()
    token = secrets.token_urlsafe(18)
    config = demo_config(config, sim.ami_port, token)
    daemon = Daemon(config)
    daemon.bus.add_sink(_EventLog())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await daemon.start()
        sim.pbx.agi_address = ("127.0.0.1", daemon.agi.port)
        await daemon.links["sim"].client.wait_logged_in(10)
        for number in AGENTS[:2] if any(a.id == AGENTS[0] for a in config.agents) else ():
            daemon.agents.login(number, f"PJSIP/{number}")
        base = f"http://{config.http.bind}:{daemon.api.port}"
        log.info("demo.running", calls_per_minute=per_minute, stop_after=calls or "Ctrl-C",
                 dialplan=str(dialplan_path()), api=base, websocket=base.replace("http", "ws", 1) + "/ws",
                 supervisor_token=token, try_it=f"curl -H 'Authorization: Bearer {token}' {base}/api/v1/calls")
        generator = asyncio.create_task(_generate(sim, config, per_minute, calls, stop))
        failed = asyncio.create_task(daemon.wait_failed())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({generator, failed, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (generator, failed, stopper):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await sim.wait_idle(timeout=30)
        await asyncio.sleep(0.5)  # let the last Hangup events reach the model
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await daemon.stop()
        await sim.stop()
    records = await _count_records(config)
    print(f"demo: {records} call record(s) in {daemon.db.url}")
    return 0


async def _generate(sim: object, config: Config, per_minute: float, limit: int, stop: asyncio.Event) -> None:
    from ctid.simulator import Simulator

    assert isinstance(sim, Simulator)
    rng = random.Random()
    dnis_choices = [d for line in config.service_lines for d in line.dnis]
    started = 0
    interval = 60.0 / per_minute if per_minute > 0 else None
    while not stop.is_set() and (limit == 0 or started < limit):
        caller = f"+1555{rng.randint(1000000, 9999999)}"
        sim.inbound_call(dnis=rng.choice(dnis_choices), caller=caller, caller_name=f"Demo caller {started + 1}",
                         hangup_after=rng.uniform(6.0, 15.0))
        started += 1
        if interval is None:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval * config.simulator.time_scale)
    # Wait for the calls in flight to finish (bounded).
    with contextlib.suppress(TimeoutError):
        await sim.wait_idle(timeout=60)


async def _count_records(config: Config) -> int:
    from ctid.store.calls import CallStore
    from ctid.store.db import Database

    async with Database(config.database.url) as db:
        return len(await CallStore(db.sessions).list_calls(limit=100000))
