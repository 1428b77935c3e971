"""ctid.store.provisioning against real databases: SQLite files and a real PostgreSQL.

Every test that takes ``db_url`` (or ``db``/``store``) runs once per dialect; each
PostgreSQL test gets a fresh database on the session server (``postgres_url``),
dropped afterwards. Also ``ctid seed`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import URL, make_url

from ctid.api.auth import hash_secret
from ctid.config import Config, parse
from ctid.store.db import Database
from ctid.store.models import AgentSkill, AuditEntry, ProvisionedAgent, Skill
from ctid.store.provisioning import (
    AgentSpec,
    AlreadyExists,
    Change,
    NotFound,
    ProvisioningError,
    ProvisioningStore,
    QueueSpec,
)

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
PIN_HASH = hash_secret("pin-4242")
ROOT = Path(__file__).resolve().parent.parent


def config_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "tenants": [{"id": "acme"}, {"id": "globex"}],
        "agents": [
            {"id": "1001", "tenant": "acme", "name": "Ana", "pin_hash": PIN_HASH,
             "skills": {"lang:en": 7, "billing": 3}},
            {"id": "1002", "tenant": "acme", "name": "Bo", "max_calls": 2},
            {"id": "2001", "tenant": "globex", "name": "Cy", "skills": {"lang:fr": 5}},
        ],
        "queues": [{"id": "support", "tenant": "acme", "name": "Support"},
                   {"id": "sales", "tenant": "globex", "name": "Sales"}],
    }
    data.update(changes)
    return data


def make_config(**changes: Any) -> Config:
    return parse(config_data(**changes), env={})


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


# -- fixtures ---------------------------------------------------------------------------


async def _admin_sql(server: URL, sql: str) -> None:
    conn = await asyncpg.connect(host=server.host, port=server.port, user=server.username,
                                 password=server.password, database="postgres", timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _run_admin_sql(server: URL, sql: str) -> None:
    """On an event loop of its own thread, away from the test's loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, _admin_sql(server, sql)).result(timeout=30)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ctid.db'}"
        return
    server = make_url(request.getfixturevalue("postgres_url"))
    name = f"t_{uuid.uuid4().hex}"
    _run_admin_sql(server, f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        _run_admin_sql(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.start()
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def store(db: Database) -> ProvisioningStore:
    return ProvisioningStore(db.sessions, clock=Clock())


async def _count(db: Database, model: type[Any]) -> int:
    async with db.sessions() as session:
        total = await session.scalar(select(func.count()).select_from(model))
    assert total is not None
    return total


async def _audit_count(store: ProvisioningStore) -> int:
    return len(await store.list_audit(limit=1000))


# -- seeding ----------------------------------------------------------------------------


async def test_seed_adds_every_config_entry_to_an_empty_database(store: ProvisioningStore) -> None:
    report = await store.seed(make_config())

    assert report.agents_added == ("1001", "1002", "2001")
    assert report.queues_added == ("support", "sales")
    assert report.skills_added == ("billing", "lang:en", "lang:fr")
    assert not (report.agents_kept or report.agents_overwritten or report.queues_kept)
    ana = await store.get_agent("1001")
    assert ana is not None
    assert (ana.tenant, ana.name, ana.pin_hash, ana.max_calls, ana.enabled, ana.source) == (
        "acme", "Ana", PIN_HASH, 1, True, "config")
    assert ana.skills == {"billing": 3, "lang:en": 7}
    assert [a.id for a in await store.list_agents(tenant="acme")] == ["1001", "1002"]
    assert [(q.id, q.tenant, q.name, q.source) for q in await store.list_queues()] == [
        ("sales", "globex", "Sales", "config"), ("support", "acme", "Support", "config")]
    skills = {s.name: s.agents for s in await store.list_skills()}
    assert skills == {"billing": 1, "lang:en": 1, "lang:fr": 1}
    audit = await store.list_audit(limit=100)
    assert {(a.actor, a.action, a.entity) for a in audit} == {
        ("config", "create", "agent"), ("config", "create", "queue"), ("config", "create", "skill")}
    assert len(audit) == 3 + 2 + 3


async def test_seeding_the_same_config_again_changes_nothing(store: ProvisioningStore) -> None:
    await store.seed(make_config())
    audit_rows = await _audit_count(store)
    before = await store.list_agents()

    report = await store.seed(make_config())

    assert report.agents_unchanged == ("1001", "1002", "2001")
    assert report.queues_unchanged == ("support", "sales")
    assert not report.changed
    assert await store.list_agents() == before
    assert await _audit_count(store) == audit_rows


async def test_seed_adds_new_config_entries_and_leaves_api_changes_alone(store: ProvisioningStore) -> None:
    await store.seed(make_config())
    await store.update_agent(AgentSpec(id="1001", tenant="acme", name="Ana Admin", pin_hash=PIN_HASH,
                                       skills={"lang:en": 9}), actor="admin")
    await store.update_queue(QueueSpec(id="support", tenant="acme", name="Support (API)"), actor="admin")
    await store.create_agent(AgentSpec(id="9001", tenant="acme", name="API only"), actor="admin")
    data = config_data()
    data["agents"].append({"id": "1003", "tenant": "acme", "name": "Dee", "skills": {"lang:de": 4}})
    data["queues"].append({"id": "billing", "tenant": "acme"})

    report = await store.seed(parse(data, env={}))

    assert report.agents_added == ("1003",)
    assert report.agents_kept == ("1001",)
    assert report.agents_unchanged == ("1002", "2001")
    assert report.queues_added == ("billing",)
    assert report.queues_kept == ("support",)
    assert report.skills_added == ("lang:de",)
    ana = await store.get_agent("1001")
    assert ana is not None and (ana.name, ana.skills, ana.source) == ("Ana Admin", {"lang:en": 9}, "api")
    support = await store.get_queue("support")
    assert support is not None and (support.name, support.source) == ("Support (API)", "api")
    assert await store.get_agent("9001") is not None  # not in the config: never deleted
    assert "kept (differ from the config; --force overwrites): 1001" in report.lines()[0]


async def test_force_overwrites_from_the_config_and_never_deletes(store: ProvisioningStore) -> None:
    await store.seed(make_config())
    await store.update_agent(AgentSpec(id="1001", tenant="acme", name="Ana Admin", max_calls=3, enabled=False,
                                       skills={"lang:en": 9, "vip": 1}), actor="admin")
    await store.update_queue(QueueSpec(id="support", tenant="acme", name="Renamed"), actor="admin")
    await store.create_agent(AgentSpec(id="9001", tenant="acme"), actor="admin")

    report = await store.seed(make_config(), force=True, actor="cli")

    assert report.forced
    assert report.agents_overwritten == ("1001",)
    assert report.queues_overwritten == ("support",)
    assert report.agents_unchanged == ("1002", "2001")
    ana = await store.get_agent("1001")
    assert ana is not None
    assert (ana.name, ana.pin_hash, ana.max_calls, ana.enabled, ana.skills, ana.source) == (
        "Ana", PIN_HASH, 1, True, {"billing": 3, "lang:en": 7}, "config")
    support = await store.get_queue("support")
    assert support is not None and (support.name, support.source) == ("Support", "config")
    assert await store.get_agent("9001") is not None
    latest = await store.list_audit(limit=2)
    assert {(a.actor, a.action, a.entity_id) for a in latest} == {("cli", "update", "1001"),
                                                                  ("cli", "update", "support")}
    agent_row = next(a for a in latest if a.entity_id == "1001")
    assert agent_row.before is not None and agent_row.after is not None
    assert agent_row.before["name"] == "Ana Admin" and agent_row.before["source"] == "api"
    assert agent_row.after["name"] == "Ana" and agent_row.after["skills"] == {"billing": 3, "lang:en": 7}


async def test_concurrent_seeds_of_a_fresh_database_all_succeed_once(db: Database) -> None:
    stores = [ProvisioningStore(db.sessions) for _ in range(3)]

    reports = await asyncio.gather(*(s.seed(make_config()) for s in stores))

    assert sorted(len(r.agents_added) for r in reports) == [0, 0, 3]
    assert sum(len(r.skills_added) for r in reports) == 3
    assert await _count(db, ProvisionedAgent) == 3
    assert await _count(db, AgentSkill) == 3


async def test_effective_config_takes_agents_and_queues_from_the_database(store: ProvisioningStore) -> None:
    config = make_config()
    await store.seed(config)
    await store.set_skills("1002", {"lang:es": 6}, actor="admin")
    await store.update_agent(AgentSpec(id="2001", tenant="globex", enabled=False), actor="admin")
    await store.create_queue(QueueSpec(id="vip", tenant="acme", name="VIP"), actor="admin")

    effective = await store.effective_config(config)

    assert [a.id for a in effective.agents] == ["1001", "1002"]  # 2001 is disabled
    assert effective.agents[1].skills == {"lang:es": 6}
    assert effective.agents[0].pin_hash == PIN_HASH
    assert [q.id for q in effective.queues] == ["sales", "support", "vip"]
    assert effective.tenants == config.tenants


# -- changes and their audit rows -------------------------------------------------------


async def test_every_change_writes_an_audit_row_with_before_and_after(store: ProvisioningStore) -> None:
    spec = AgentSpec(id="7001", tenant="acme", name="Eve", pin_hash=PIN_HASH, skills={"lang:en": 4})
    created = await store.create_agent(spec, actor="admin-1")
    updated = await store.update_agent(AgentSpec(id="7001", tenant="acme", name="Eve L.", pin_hash=PIN_HASH,
                                                 skills={"lang:en": 4}), actor="admin-2")
    skilled = await store.set_skills("7001", {"lang:en": 5, "chat": 2}, actor="admin-1")
    await store.delete_agent("7001", actor="admin-2")

    rows = [r for r in reversed(await store.list_audit(limit=100)) if r.entity == "agent"]
    assert [(r.actor, r.action, r.entity_id) for r in rows] == [
        ("admin-1", "create", "7001"), ("admin-2", "update", "7001"),
        ("admin-1", "set_skills", "7001"), ("admin-2", "delete", "7001")]
    create, update, skills, delete = rows
    assert create.before is None and create.after is not None and create.after["name"] == "Eve"
    assert update.before == create.after
    assert update.after is not None and update.after["name"] == "Eve L."
    assert skills.before == update.after
    assert skills.after is not None and skills.after["skills"] == {"chat": 2, "lang:en": 5}
    assert delete.before == skills.after and delete.after is None
    for row in rows:
        for doc in (row.before, row.after):
            if doc is not None:
                assert doc["pin_set"] is True
                assert PIN_HASH not in str(doc)
    assert rows[0].ts < rows[1].ts < rows[2].ts < rows[3].ts
    assert (created.source, updated.source, skilled.source) == ("api", "api", "api")
    assert [r.entity_id for r in await store.list_audit(entity="skill")] == ["chat", "lang:en"]
    only = await store.list_audit(entity="agent", entity_id="7001", limit=2)
    assert [r.action for r in only] == ["delete", "set_skills"]


async def test_queue_changes_are_audited_and_options_round_trip(store: ProvisioningStore) -> None:
    created = await store.create_queue(QueueSpec(id="q1", tenant="acme", name="One", options={}), actor="admin")
    await store.update_queue(QueueSpec(id="q1", tenant="globex", name="One"), actor="admin")
    await store.delete_queue("q1", actor="admin")

    rows = list(reversed(await store.list_audit(entity="queue")))
    assert [r.action for r in rows] == ["create", "update", "delete"]
    assert rows[0].after == {"queue_id": "q1", "tenant": "acme", "name": "One", "options": {}, "source": "api"}
    assert rows[1].after is not None and rows[1].after["tenant"] == "globex"
    assert rows[2].after is None
    assert created.to_config().id == "q1"
    assert await store.get_queue("q1") is None


async def test_writing_the_same_content_again_writes_no_audit_row(store: ProvisioningStore) -> None:
    await store.seed(make_config())
    rows = await _audit_count(store)
    ana = await store.get_agent("1001")
    assert ana is not None

    again = await store.update_agent(AgentSpec(id="1001", tenant="acme", name="Ana", pin_hash=PIN_HASH,
                                               skills={"lang:en": 7, "billing": 3}), actor="admin")
    await store.set_skills("1001", {"billing": 3, "lang:en": 7}, actor="admin")
    await store.update_queue(QueueSpec(id="support", tenant="acme", name="Support"), actor="admin")

    assert again == ana
    assert await _audit_count(store) == rows


async def test_a_failed_audit_write_rolls_the_change_back(store: ProvisioningStore,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any, **_kw: Any) -> None:
        raise RuntimeError("audit is down")

    monkeypatch.setattr(store, "_audit_raw", broken)

    with pytest.raises(RuntimeError, match="audit is down"):
        await store.create_agent(AgentSpec(id="7001", tenant="acme", skills={"x": 1}), actor="admin")

    monkeypatch.undo()
    assert await store.get_agent("7001") is None
    assert await store.list_skills() == []
    assert await _audit_count(store) == 0


async def test_deleting_an_agent_cascades_to_its_skills_but_keeps_the_catalogue(
        db: Database, store: ProvisioningStore) -> None:
    await store.seed(make_config())
    assert await _count(db, AgentSkill) == 3

    await store.delete_agent("1001", actor="admin")

    assert await _count(db, AgentSkill) == 1
    async with db.sessions() as session:
        left = (await session.scalars(select(AgentSkill.agent_id))).all()
    assert left == ["2001"]
    assert await _count(db, Skill) == 3
    assert {s.name: s.agents for s in await store.list_skills()}["lang:en"] == 0


async def test_the_database_cascades_skills_on_a_plain_sql_delete(db: Database, store: ProvisioningStore) -> None:
    await store.seed(make_config())

    async with db.sessions.begin() as session:
        await session.execute(text("DELETE FROM agents WHERE id = '1001'"))

    assert await _count(db, AgentSkill) == 1


async def test_set_skills_replaces_the_set_and_registers_new_names(store: ProvisioningStore) -> None:
    await store.seed(make_config())

    agent = await store.set_skills("1001", {"lang:en": 8, "chat": 2}, actor="admin")

    assert agent.skills == {"chat": 2, "lang:en": 8}
    assert agent.source == "api"
    assert {s.name: s.agents for s in await store.list_skills()} == {
        "billing": 0, "chat": 1, "lang:en": 1, "lang:fr": 1}


async def test_refusals(store: ProvisioningStore) -> None:
    await store.seed(make_config())

    with pytest.raises(AlreadyExists):
        await store.create_agent(AgentSpec(id="1001", tenant="acme"), actor="admin")
    with pytest.raises(AlreadyExists):
        await store.create_queue(QueueSpec(id="support", tenant="acme"), actor="admin")
    with pytest.raises(NotFound):
        await store.update_agent(AgentSpec(id="nope", tenant="acme"), actor="admin")
    with pytest.raises(NotFound):
        await store.delete_agent("nope", actor="admin")
    with pytest.raises(NotFound):
        await store.set_skills("nope", {}, actor="admin")
    with pytest.raises(NotFound):
        await store.delete_queue("nope", actor="admin")
    with pytest.raises(ProvisioningError, match="level"):
        AgentSpec(id="1", tenant="acme", skills={"lang:en": 11})
    with pytest.raises(ProvisioningError, match="level"):
        await store.set_skills("1001", {"lang:en": 0}, actor="admin")
    with pytest.raises(ProvisioningError, match="skill name"):
        AgentSpec(id="1", tenant="acme", skills={"has space": 1})
    with pytest.raises(ProvisioningError, match="max_calls"):
        AgentSpec(id="1", tenant="acme", max_calls=0)
    with pytest.raises(ProvisioningError, match="options"):
        QueueSpec(id="q", tenant="acme", options={"id": "other"})
    ana = await store.get_agent("1001")
    assert ana is not None and ana.skills == {"billing": 3, "lang:en": 7}


async def test_listeners_hear_committed_changes_only(store: ProvisioningStore,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    heard: list[Change] = []
    unsubscribe = store.subscribe(heard.append)

    await store.seed(make_config())
    await store.set_skills("1002", {"chat": 1}, actor="admin")
    with pytest.raises(AlreadyExists):
        await store.create_agent(AgentSpec(id="1001", tenant="acme"), actor="admin")
    unsubscribe()
    await store.delete_agent("1002", actor="admin")

    assert [(c.entity, c.entity_id, c.action) for c in heard] == [
        ("agent", "1001", "create"), ("agent", "1002", "create"), ("agent", "2001", "create"),
        ("queue", "support", "create"), ("queue", "sales", "create"), ("agent", "1002", "set_skills")]
    last = heard[-1]
    assert last.actor == "admin"
    assert last.before is not None and last.after is not None
    assert getattr(last.after, "skills", None) == {"chat": 1}


async def test_audit_rows_keep_their_order_and_limit(db: Database, store: ProvisioningStore) -> None:
    await store.seed(make_config())

    newest = await store.list_audit(limit=3)

    assert len(newest) == 3
    assert newest[0].id > newest[1].id > newest[2].id
    assert await _count(db, AuditEntry) == 8


# -- ctid seed --------------------------------------------------------------------------


def _write_config(path: Path, db_url: str, agents: str = "") -> Path:
    path.write_text(f"""
[database]
url = "{db_url}"

[log]
level = "warning"

[[tenants]]
id = "acme"

[[agents]]
id = "1001"
tenant = "acme"
name = "Ana"
skills = {{ "lang:en" = 7 }}

[[queues]]
id = "support"
tenant = "acme"
name = "Support"
{agents}
""")
    return path


def _ctid(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTID_")}
    return subprocess.run([sys.executable, "-m", "ctid", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env, check=False)


async def test_ctid_seed_cli_adds_keeps_and_forces(db_url: str, tmp_path: Path) -> None:
    path = _write_config(tmp_path / "ctid.toml", db_url)

    first = await asyncio.to_thread(_ctid, "seed", "-c", str(path))

    assert first.returncode == 0, first.stderr
    assert "agents: 1 added: 1001" in first.stdout
    assert "queues: 1 added: support" in first.stdout
    assert "skills: 1 added: lang:en" in first.stdout

    async with Database(db_url) as db:
        store = ProvisioningStore(db.sessions)
        await store.set_skills("1001", {"lang:en": 2}, actor="admin")
    _write_config(path, db_url, '[[agents]]\nid = "1002"\ntenant = "acme"\n')

    second = await asyncio.to_thread(_ctid, "seed", "-c", str(path))

    assert second.returncode == 0, second.stderr
    assert "agents: 1 added: 1002; 0 overwritten; 1 kept (differ from the config; --force overwrites): 1001" \
        in second.stdout

    forced = await asyncio.to_thread(_ctid, "seed", "-c", str(path), "--force")

    assert forced.returncode == 0, forced.stderr
    assert "(--force)" in forced.stdout
    assert "agents: 0 added; 1 overwritten: 1001" in forced.stdout
    async with Database(db_url) as db:
        store = ProvisioningStore(db.sessions)
        ana = await store.get_agent("1001")
        assert ana is not None and ana.skills == {"lang:en": 7}
        assert (await store.list_audit(limit=1))[0].actor == "cli"


def test_ctid_seed_cli_fails_cleanly_without_a_database(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "ctid.toml", f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'ctid.db'}")

    result = _ctid("seed", "-c", str(path))

    assert result.returncode == 1
    assert "ctid seed:" in result.stderr and "does not exist" in result.stderr


def test_ctid_seed_cli_refuses_an_invalid_config(tmp_path: Path) -> None:
    path = tmp_path / "ctid.toml"
    path.write_text('[[agents]]\nid = "1001"\ntenant = "nowhere"\n')

    result = _ctid("seed", "-c", str(path))

    assert result.returncode == 2
    assert "unknown tenant" in result.stderr
