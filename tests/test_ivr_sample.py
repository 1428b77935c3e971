"""The sample service line (``examples/contact-centre.toml``), driven end to end: the
simulator plays the caller, ctid runs the sample's flows with an injected clock (business
hours across the spring DST change and the holidays), the pop carries what the IVR
collected."""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ctid.app import Daemon
from ctid.config import Config, parse
from ctid.simulator import Simulator
from tests.test_acd_e2e import SECRET, SUPERVISOR, _login, make_sim, until
from tests.test_ivr_e2e import Watcher, agi_commands, contexts

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "contact-centre.toml"
NUMBER = "+15551230120"


def sample_config(tmp_path: Path, crm_port: int) -> Config:
    data: dict[str, Any] = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))
    data["database"] = {"url": f"sqlite+aiosqlite:///{tmp_path / 'sample.db'}"}
    data["agi"] = {"port": 0}
    data["http"] = {"port": 0}
    data["asterisk"] = [{"id": "sim", "port": 1, "secret": SECRET, "reconnect_min": 0.05, "reconnect_max": 0.2}]
    data["tokens"] = [{"name": "boss", "role": "supervisor", "tenant": "acme",
                       "token_sha256": __import__("hashlib").sha256(SUPERVISOR.encode()).hexdigest()}]
    # The sample's CRM is https://crm.acme.example; this test's is on loopback.
    lookup = data["flows"]["acme-main"]["nodes"]["lookup"]
    lookup["url"] = lookup["url"].replace("https://crm.acme.example", f"http://127.0.0.1:{crm_port}")
    return parse(data, env={})


def at(when: datetime) -> Callable[[], datetime]:
    """A clock that starts at ``when`` and runs at the wall clock's pace."""
    start = datetime.now(UTC)
    return lambda: when + (datetime.now(UTC) - start)


class CRM:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def account(self, request: web.Request) -> web.Response:
        self.requests.append((request.match_info["account"], dict(request.headers)))
        return web.json_response({"customer": {"tier": "gold", "name": "Alicia Gómez"}})

    async def __aenter__(self) -> CRM:
        app = web.Application()
        app.router.add_get("/api/accounts/{account}", self.account)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@contextlib.asynccontextmanager
async def sample(tmp_path: Path, clock: Callable[[], datetime],
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Daemon, Simulator, Watcher, CRM,
                                                                         aiohttp.ClientSession, str]]:
    monkeypatch.setenv("ACME_CRM_TOKEN", "Bearer sample-token")
    sim = make_sim()
    watcher = Watcher()
    async with CRM() as crm:
        config = sample_config(tmp_path, crm.port)
        await sim.start()
        config = config.model_copy(update={"asterisk": [config.asterisk[0].model_copy(update={"port": sim.ami_port})]})
        daemon = Daemon(config, clock=clock)
        await daemon.start()
        sim.pbx.agi_address = ("127.0.0.1", daemon.agi.port)
        try:
            await daemon.links["sim"].client.wait_logged_in(5)
            async with aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{daemon.api.port}"
                await watcher.start(http, base)
                try:
                    yield daemon, sim, watcher, crm, http, base
                finally:
                    await watcher.stop()
        finally:
            await daemon.stop()
            await sim.stop()


async def test_spanish_billing_caller_with_a_gold_account_pops_at_priority_9(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tuesday_10am_paris = datetime(2026, 3, 31, 8, 0, tzinfo=UTC)
    async with sample(tmp_path, at(tuesday_10am_paris), monkeypatch) as (_daemon, sim, watcher, crm, http, base):
        await _login(http, base, "1002")  # the billing agent
        # 2: Español; 3: billing; 12345678#: the account number.
        chan = sim.inbound_call(dnis="300", caller=NUMBER, dtmf="2312345678#", dtmf_after=0.3)
        await until(lambda: bool(watcher.of("call.offered")), 15)
        await sim.caller_hangup(chan)
        await until(lambda: bool(watcher.of("call.ended")), 10)
    assert watcher.nodes() == ["language", "spanish", "hours", "welcome", "main-menu", "account", "lookup", "vip",
                               "billing"]
    [offered] = watcher.of("call.offered")
    assert offered["queue"] == "billing" and offered["agent_id"] == "1002"
    assert offered["data"]["priority"] == 9
    assert offered["data"]["ivr"] == {"account": "12345678", "tier": "gold", "customer_name": "Alicia Gómez"}
    assert offered["data"]["service_line"] == "acme-customer"
    assert crm.requests[0][0] == "12345678" and crm.requests[0][1]["Authorization"] == "Bearer sample-token"
    assert 'SET VARIABLE "CHANNEL(language)" "es"' in agi_commands(sim)


@pytest.mark.parametrize(("when", "branch"), [
    # The spring DST change in Paris is on Sunday 2026-03-29 (UTC+1 -> UTC+2).
    (datetime(2026, 3, 27, 6, 30, tzinfo=UTC), "closed"),   # Friday 07:30 CET: before 08:00
    (datetime(2026, 3, 30, 6, 30, tzinfo=UTC), "welcome"),  # Monday 08:30 CEST: open
    (datetime(2026, 3, 28, 11, 30, tzinfo=UTC), "welcome"),  # Saturday 12:30 CET: inside 09:00-13:00
    (datetime(2026, 3, 28, 12, 0, tzinfo=UTC), "closed"),   # Saturday 13:00 CET: the end is exclusive
    (datetime(2026, 12, 25, 10, 0, tzinfo=UTC), "holiday"),  # every year's 12-25
    (datetime(2026, 4, 6, 10, 0, tzinfo=UTC), "holiday"),   # Easter Monday 2026, a dated holiday
])
async def test_business_hours_across_the_dst_change_and_holidays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: datetime, branch: str) -> None:
    async with sample(tmp_path, at(when), monkeypatch) as (_daemon, sim, watcher, _crm, _http, _base):
        chan = sim.inbound_call(dnis="300", caller=NUMBER, dtmf="1", dtmf_after=0.3)  # English
        await until(lambda: len(watcher.nodes()) >= 3, 15)
        await sim.caller_hangup(chan)
        await until(lambda: watcher.exit() is not None, 10)
    nodes = watcher.nodes()
    assert nodes[:2] == ["language", "hours"] and nodes[2] == branch, nodes


async def test_after_hours_a_callback_or_voicemail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sunday = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
    async with sample(tmp_path, at(sunday), monkeypatch) as (daemon, sim, watcher, _crm, _http, _base):
        first = sim.inbound_call(dnis="300", caller=NUMBER, dtmf="11", dtmf_after=0.3)  # English, then callback
        await until(lambda: any(e["data"]["exit_reason"] == "callback" for e in watcher.of("call.ivr",
                                                                                            event="exit")), 15)
        await until(lambda: first.name not in sim.pbx.channels, 10)
        stored = await daemon.acd.callbacks.open_callbacks()
        second = sim.inbound_call(dnis="300", caller="+15551230121", dtmf="1", dtmf_after=0.3)  # no second key
        await until(lambda: "ctid-voicemail" in contexts(sim), 15)
        await until(lambda: second.name not in sim.pbx.channels, 10)
    assert [(c.number, c.queue) for c in stored] == [(NUMBER, "support")]
    reasons = [e["data"]["exit_reason"] for e in watcher.of("call.ivr", event="exit")]
    assert reasons == ["callback", "voicemail"]
