"""The admin API on a real server (127.0.0.1) with a real store (a SQLite file, seeded
from the harness config): CRUD of agents and queues, skills, audit, reload, the admin
role, every refusal, and the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from ctid.api.openapi import document
from ctid.config import Config, ConfigError, Problem, QueueConfig
from ctid.store.db import Database
from ctid.store.provisioning import ProvisioningStore
from tests.test_api_server import PIN_HASH, Harness, make_config, running

A = "/api/v1/admin"
ADMIN_ROUTES = [("get", "/agents"), ("post", "/agents"), ("get", "/agents/1001"), ("put", "/agents/1001"),
                ("delete", "/agents/1001"), ("put", "/agents/1001/skills"), ("get", "/queues"),
                ("post", "/queues"), ("get", "/queues/support"), ("put", "/queues/support"),
                ("delete", "/queues/support"), ("get", "/skills"), ("get", "/audit"), ("post", "/reload")]


class ReloadHook:
    def __init__(self) -> None:
        self.calls = 0
        self.error: Exception | None = None

    async def __call__(self) -> Mapping[str, Any]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return {"agents": {"added": ["1003"]}, "restart_needed": []}


@asynccontextmanager
async def admin_api(tmp_path: Path, *, with_store: bool = True, with_reload: bool = True,
                    current_config: Config | None = None) -> AsyncIterator[tuple[Harness, ProvisioningStore,
                                                                                 ReloadHook]]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'ctid.db'}")
    await db.start()
    store = ProvisioningStore(db.sessions)
    await store.seed(make_config())
    hook = ReloadHook()
    kw: dict[str, Any] = {}
    if with_store:
        kw["provisioning"] = store
    if with_reload:
        kw["reload"] = hook
    if current_config is not None:
        kw["current_config"] = lambda: current_config
    try:
        async with running(**kw) as h:
            yield h, store, hook
    finally:
        await db.close()


async def call(h: Harness, method: str, path: str, token: str | None = "admin", body: Any = None,
               data: bytes | None = None) -> tuple[int, Any]:
    headers = h.auth(token) if token else {}
    kw: dict[str, Any] = {"data": data} if data is not None else ({"json": body} if body is not None else {})
    async with h.session.request(method, h.url + A + path, headers=headers, **kw) as resp:
        if resp.status == 204:
            assert await resp.read() == b""
            return 204, None
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


def _schema(name: str) -> Draft202012Validator:
    doc = json.loads(json.dumps(document()))
    return Draft202012Validator({**doc, "$ref": f"#/components/schemas/{name}"})


def conforms(name: str, value: Any) -> None:
    errors = [e.message for e in _schema(name).iter_errors(value)]
    assert not errors, errors


def _some_option() -> str | None:
    """A routing option of QueueConfig, whatever its fields are today."""
    names = [n for n in QueueConfig.model_fields if n not in ("id", "tenant", "name")]
    return names[0] if names else None


# --------------------------------------------------------------------------- agents


async def test_admin_lists_creates_reads_updates_and_deletes_agents(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (h, store, _):
        status, body = await call(h, "GET", "/agents")
        assert status == 200
        assert [a["agent_id"] for a in body["agents"]] == ["1001", "1002", "2001"]  # every tenant
        ana = body["agents"][0]
        assert ana["pin_set"] is True and "pin_hash" not in ana
        assert (ana["source"], ana["skills"]) == ("config", {"lang:en": 7})
        for agent in body["agents"]:
            conforms("AdminAgent", agent)
        status, body = await call(h, "GET", "/agents?tenant=globex")
        assert [a["agent_id"] for a in body["agents"]] == ["2001"]

        async with h.session.post(h.url + A + "/agents", headers=h.auth("admin"), json={
                "agent_id": "1003", "tenant": "acme", "name": "Dee", "pin_hash": PIN_HASH, "max_calls": 2,
                "skills": {"lang:de": 4, "billing": 10}}) as resp:
            assert resp.status == 201
            assert resp.headers["Location"] == f"{A}/agents/1003"
            created = (await resp.json())["agent"]
        conforms("AdminAgent", created)
        assert (created["name"], created["max_calls"], created["enabled"], created["source"]) == (
            "Dee", 2, True, "api")

        status, body = await call(h, "GET", "/agents/1003")
        assert (status, body["agent"]) == (200, created)

        status, body = await call(h, "PUT", "/agents/1003", body={"name": "Dee Dee", "enabled": False})
        assert status == 200
        updated = body["agent"]
        assert (updated["name"], updated["enabled"], updated["max_calls"], updated["pin_set"]) == (
            "Dee Dee", False, 2, True)  # fields not named keep their value
        assert updated["skills"] == {"billing": 10, "lang:de": 4}

        status, body = await call(h, "PUT", "/agents/1003/skills", body={"skills": {"lang:de": 5}})
        assert (status, body["agent"]["skills"]) == (200, {"lang:de": 5})

        status, _ = await call(h, "DELETE", "/agents/1003")
        assert status == 204
        assert (await call(h, "GET", "/agents/1003"))[0] == 404
        assert await store.get_agent("1003") is None

        status, body = await call(h, "GET", "/audit?entity=agent&entity_id=1003")
        assert status == 200
        assert [(r["actor"], r["action"]) for r in body["audit"]] == [
            ("admin", "delete"), ("admin", "set_skills"), ("admin", "update"), ("admin", "create")]
        for row in body["audit"]:
            conforms("AuditEntry", row)
        assert body["audit"][2]["before"]["name"] == "Dee" and body["audit"][2]["after"]["name"] == "Dee Dee"
        assert PIN_HASH not in json.dumps(body)


async def test_admin_may_move_an_agent_to_another_tenant_and_change_a_config_agent(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (h, store, _):
        status, body = await call(h, "PUT", "/agents/1002", body={"agent_id": "1002", "tenant": "globex"})
        assert (status, body["agent"]["tenant"], body["agent"]["source"]) == (200, "globex", "api")

        report = await store.seed(make_config())  # a reload does not undo it

        assert report.agents_kept == ("1002",)
        agent = await store.get_agent("1002")
        assert agent is not None and agent.tenant == "globex"


async def test_skills_catalogue_lists_names_with_agent_counts(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (h, _, _hook):
        await call(h, "PUT", "/agents/1002/skills", body={"skills": {"lang:en": 3, "chat": 1}})

        status, body = await call(h, "GET", "/skills")

        assert status == 200
        assert body["skills"] == [{"name": "chat", "description": "", "agents": 1},
                                  {"name": "lang:en", "description": "", "agents": 2}]
        for skill in body["skills"]:
            conforms("Skill", skill)


# --------------------------------------------------------------------------- queues


async def test_admin_manages_queues_with_options_validated_by_the_config_model(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (h, store, _):
        status, body = await call(h, "GET", "/queues")
        assert status == 200
        assert [(q["queue_id"], q["options"]) for q in body["queues"]] == [("sales", {}), ("support", {})]

        options: dict[str, Any] = {}
        option = _some_option()
        if option is not None:
            field = QueueConfig.model_fields[option]
            options[option] = QueueConfig.model_validate(
                {"id": "x", "tenant": "acme", option: field.get_default(call_default_factory=True)}
            ).model_dump(mode="json")[option]
        status, body = await call(h, "POST", "/queues", body={"queue_id": "vip", "tenant": "acme", "name": "VIP",
                                                               "options": options})
        assert status == 201, body
        conforms("AdminQueue", body["queue"])
        assert body["queue"]["options"] == options
        stored = await store.get_queue("vip")
        assert stored is not None and stored.to_config().name == "VIP"

        status, body = await call(h, "PUT", "/queues/vip", body={"name": "V.I.P."})
        assert (status, body["queue"]["name"], body["queue"]["options"]) == (200, "V.I.P.", options)
        status, body = await call(h, "PUT", "/queues/vip", body={"options": {}})
        assert (status, body["queue"]["options"]) == (200, {})

        status, body = await call(h, "GET", "/queues/vip")
        assert (status, body["queue"]["name"]) == (200, "V.I.P.")
        assert (await call(h, "DELETE", "/queues/vip"))[0] == 204
        assert (await call(h, "GET", "/queues/vip"))[0] == 404
        status, body = await call(h, "GET", "/audit?entity=queue&entity_id=vip")
        assert [r["action"] for r in body["audit"]] == ["delete", "update", "update", "create"]


async def test_bad_queue_options_are_400_with_the_field_path(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (h, store, _):
        cases: list[tuple[dict[str, Any], str]] = [
            ({"queue_id": "q", "tenant": "acme", "options": {"no_such_option": 1}}, "options.no_such_option"),
            ({"queue_id": "q", "tenant": "acme", "options": {"id": "other"}}, "options.id"),
            ({"queue_id": "q", "tenant": "acme", "options": [1]}, "options"),
            ({"queue_id": "q", "tenant": "acme", "color": "red"}, "color"),
        ]
        option = _some_option()
        if option is not None:
            cases.append(({"queue_id": "q", "tenant": "acme", "options": {option: [[{"zz": 1}]]}},
                          f"options.{option}"))
        for body, field in cases:
            status, answer = await call(h, "POST", "/queues", body=body)
            assert status == 400, (body, answer)
            assert answer["error"]["code"] == "bad_request"
            assert answer["error"]["field"].startswith(field), (field, answer)
            assert field in answer["error"]["message"] or answer["error"]["field"] in answer["error"]["message"]
        status, answer = await call(h, "PUT", "/queues/support", body={"options": {"no_such_option": True}})
        assert (status, answer["error"]["field"]) == (400, "options.no_such_option")
        assert await store.get_queue("q") is None
        support = await store.get_queue("support")
        assert support is not None and support.options == {}


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("token", ["sup", "int", "agent-1001", "sup-globex"])
async def test_every_admin_route_is_403_for_other_roles(tmp_path: Path, token: str) -> None:
    async with admin_api(tmp_path) as (h, store, hook):
        before = await store.list_agents()
        for method, path in ADMIN_ROUTES:
            status, body = await call(h, method.upper(), path, token=token, body={"name": "x"})
            assert (status, body["error"]["code"]) == (403, "forbidden"), (method, path)
        assert hook.calls == 0
        assert await store.list_agents() == before


async def test_admin_routes_need_a_token(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (h, _, hook):
        for method, path in ADMIN_ROUTES:
            status, body = await call(h, method.upper(), path, token=None)
            assert (status, body["error"]["code"]) == (401, "unauthorized"), (method, path)
        assert (await call(h, "GET", "/agents", token="not-a-token"))[0] == 401
        assert hook.calls == 0


BAD_AGENTS: list[tuple[dict[str, Any], str]] = [
    ({"agent_id": "../etc", "tenant": "acme"}, "agent_id"),
    ({"agent_id": "a b", "tenant": "acme"}, "agent_id"),
    ({"agent_id": 1003, "tenant": "acme"}, "agent_id"),
    ({"tenant": "acme"}, "agent_id"),
    ({"agent_id": "1003"}, "tenant"),
    ({"agent_id": "1003", "tenant": "nowhere"}, "tenant"),
    ({"agent_id": "1003", "tenant": "acme", "skills": {"lang:en": 0}}, "skills.lang:en"),
    ({"agent_id": "1003", "tenant": "acme", "skills": {"lang:en": 11}}, "skills.lang:en"),
    ({"agent_id": "1003", "tenant": "acme", "skills": {"lang:en": "5"}}, "skills.lang:en"),
    ({"agent_id": "1003", "tenant": "acme", "skills": {"lang:en": True}}, "skills.lang:en"),
    ({"agent_id": "1003", "tenant": "acme", "skills": {"has space": 3}}, "skills"),
    ({"agent_id": "1003", "tenant": "acme", "skills": ["lang:en"]}, "skills"),
    ({"agent_id": "1003", "tenant": "acme", "max_calls": 0}, "max_calls"),
    ({"agent_id": "1003", "tenant": "acme", "max_calls": 1.5}, "max_calls"),
    ({"agent_id": "1003", "tenant": "acme", "enabled": "yes"}, "enabled"),
    ({"agent_id": "1003", "tenant": "acme", "pin_hash": "1234"}, "pin_hash"),
    ({"agent_id": "1003", "tenant": "acme", "name": "a\r\nb"}, "name"),
    ({"agent_id": "1003", "tenant": "acme", "pin": "1234"}, "pin"),
    ({"agent_id": "1003", "tenant": "acme", "id": "1003"}, "id"),
]


@pytest.mark.parametrize(("body", "field"), BAD_AGENTS)
async def test_bad_agents_are_400_naming_the_field_and_change_nothing(tmp_path: Path, body: dict[str, Any],
                                                                      field: str) -> None:
    async with admin_api(tmp_path) as (h, store, _):
        audit = await store.list_audit(limit=1000)

        status, answer = await call(h, "POST", "/agents", body=body)

        assert status == 400, answer
        assert (answer["error"]["code"], answer["error"]["field"]) == ("bad_request", field)
        assert await store.get_agent("1003") is None
        assert await store.list_audit(limit=1000) == audit


async def test_bad_updates_bodies_and_ids_are_400(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (h, store, _):
        before = await store.get_agent("1001")
        cases: list[tuple[str, str, Any, bytes | None, str]] = [
            ("PUT", "/agents/1001", {"skills": {"lang:en": 11}}, None, "skills.lang:en"),
            ("PUT", "/agents/1001", {"agent_id": "1002"}, None, "agent_id"),
            ("PUT", "/agents/1001", {"tenant": "nowhere"}, None, "tenant"),
            ("PUT", "/agents/1001", {"colour": "red"}, None, "colour"),
            ("PUT", "/agents/1001/skills", {"skills": {"lang:en": 0}}, None, "skills.lang:en"),
            ("PUT", "/agents/1001/skills", {"skills": {"lang:en": 1}, "extra": 1}, None, "extra"),
            ("PUT", "/agents/1001/skills", {}, None, "skills"),
            ("GET", "/agents/bad%20id", None, None, "agent_id"),
            ("DELETE", "/agents/....", None, None, "agent_id"),
            ("GET", "/queues/bad%24id", None, None, "queue_id"),
            ("PUT", "/queues/support", {"queue_id": "other"}, None, "queue_id"),
            ("POST", "/queues", {"queue_id": "q!", "tenant": "acme"}, None, "queue_id"),
            ("POST", "/queues", {"queue_id": "q", "tenant": "nowhere"}, None, "tenant"),
            ("GET", "/audit?limit=0", None, None, "limit"),
            ("GET", "/audit?limit=x", None, None, "limit"),
            ("GET", "/audit?entity=tenant", None, None, "entity"),
        ]
        for method, path, body, data, field in cases:
            status, answer = await call(h, method, path, body=body, data=data)
            assert status == 400, (method, path, answer)
            assert answer["error"]["field"] == field, (method, path, answer)
        for data in (b"{not json", b"[1, 2]", b""):
            status, answer = await call(h, "POST", "/agents", data=data)
            assert status == 400
            assert answer["error"]["code"] in ("bad_json", "bad_request")
        assert await store.get_agent("1001") == before


async def test_unknown_entities_are_404_and_duplicates_409(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (h, store, _):
        for method, path, body in [("GET", "/agents/9999", None), ("PUT", "/agents/9999", {"name": "x"}),
                                   ("DELETE", "/agents/9999", None),
                                   ("PUT", "/agents/9999/skills", {"skills": {}}),
                                   ("GET", "/queues/nope", None), ("PUT", "/queues/nope", {"name": "x"}),
                                   ("DELETE", "/queues/nope", None)]:
            status, answer = await call(h, method, path, body=body)
            assert (status, answer["error"]["code"]) == (404, "not_found"), (method, path)
        status, answer = await call(h, "POST", "/agents", body={"agent_id": "1001", "tenant": "acme"})
        assert (status, answer["error"]["code"], answer["error"]["field"]) == (409, "conflict", "agent_id")
        status, answer = await call(h, "POST", "/queues", body={"queue_id": "support", "tenant": "acme"})
        assert (status, answer["error"]["code"]) == (409, "conflict")
        assert (await call(h, "POST", "/agents/1001", body={}))[0] == 405
        ana = await store.get_agent("1001")
        assert ana is not None and ana.source == "config"


async def test_tenants_come_from_the_current_config(tmp_path: Path) -> None:
    base = make_config()
    newer = base.model_copy(update={"tenants": [*base.tenants, base.tenants[0].model_copy(update={"id": "initech"})]})
    async with admin_api(tmp_path, current_config=newer) as (h, _, _hook):
        status, body = await call(h, "POST", "/agents", body={"agent_id": "3001", "tenant": "initech"})
        assert (status, body["agent"]["tenant"]) == (201, "initech")


async def test_without_a_store_or_hook_the_routes_are_503(tmp_path: Path) -> None:
    async with admin_api(tmp_path, with_store=False, with_reload=False) as (h, _, _hook):
        for method, path in ADMIN_ROUTES:
            status, body = await call(h, method.upper(), path, body={})
            assert (status, body["error"]["code"]) == (503, "unavailable"), (method, path)
        assert (await call(h, "GET", "/agents", token="sup"))[0] == 403


# --------------------------------------------------------------------------- reload, openapi


async def test_reload_calls_the_daemon_hook(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (h, _, hook):
        status, body = await call(h, "POST", "/reload")

        assert status == 200
        assert hook.calls == 1
        assert body == {"reload": {"agents": {"added": ["1003"]}, "restart_needed": []}}

        hook.error = ConfigError([Problem("ctid.toml", "queues[0].tenant", "unknown tenant 'x'")])
        status, body = await call(h, "POST", "/reload")

        assert status == 400
        assert body["error"]["problems"] == ["ctid.toml: queues[0].tenant: unknown tenant 'x'"]
        assert hook.calls == 2

        hook.error = RuntimeError("boom")
        status, body = await call(h, "POST", "/reload")
        assert (status, body["error"]["code"]) == (500, "internal")


async def test_openapi_describes_every_admin_route(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (h, _, _hook):
        async with h.session.get(h.url + "/api/v1/openapi.json") as resp:
            doc = await resp.json()
        served = {(r.method.lower(), r.resource.canonical) for r in h.server.app.router.routes()
                  if r.resource is not None and r.resource.canonical.startswith(A)}
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops if p.startswith(A)}
    assert served == described
    assert len(served) == len(ADMIN_ROUTES)
    for path, ops in doc["paths"].items():
        if path.startswith(A):
            for method, op in ops.items():
                assert {"401", "403"} <= set(op["responses"]), (method, path)
                assert op["tags"] == ["admin"]
    Draft202012Validator.check_schema({**doc["components"]["schemas"]["AdminAgent"]})
    conforms("AdminAgentCreate", {"agent_id": "1", "tenant": "acme", "skills": {"lang:en": 3}})
    with pytest.raises(AssertionError):
        conforms("AdminAgentCreate", {"agent_id": "1", "tenant": "acme", "pin": "1234"})
