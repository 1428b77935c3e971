"""The admin API: provisioning of agents, queues and skills, the audit log, and reload.

Routes, all under ``/api/v1/admin/`` and for the ``admin`` role only (401 without a
valid token, 403 for any other role):

* ``GET /agents[?tenant=]``, ``POST /agents`` (201; 409 when the id is taken);
* ``GET /agents/{agent_id}``, ``PUT /agents/{agent_id}`` (changes the fields it
  names, others keep their value; 404 for an unknown agent), ``DELETE`` (204);
* ``PUT /agents/{agent_id}/skills`` with ``{"skills": {"lang:en": 7}}``;
* the same for ``/queues`` and ``/queues/{queue_id}``, whose ``options`` are the
  queue's routing options, validated by :class:`ctid.config.QueueConfig`;
* ``GET /skills``: the catalogue (a skill joins it when an agent first gets it);
* ``GET /audit[?limit=&entity=&entity_id=]``: newest first;
* ``POST /reload``: runs the daemon's ``reload()`` hook (as SIGHUP does).

Validation, before anything is written: ids with :func:`ctid.asterisk.safety.check_id`;
agents with the config's own rules (:class:`ctid.config.AgentConfig`: skill names and
levels 1..10, ``max_calls``, ``pin_hash`` from ``ctid hash-secret``); the tenant must
be one of the config's; unknown fields are refused. A refusal is a 400 whose
``error.field`` is the path of the field (``skills.lang:en``, ``options.relax[0].after``).

Every change is written with an audit row naming the token (``actor``). The
handlers read the :class:`~ctid.store.provisioning.ProvisioningStore`, the ``reload``
hook and the current config from :class:`ctid.api.rest.ApiContext`; without a store
the routes answer 503.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from ctid.api.auth import Principal, Role
from ctid.api.commands import ApiError
from ctid.api.rest import _ctx, _int_param, _json_body, _principal
from ctid.asterisk.safety import UnsafeValueError, check_id
from ctid.config import AgentConfig, Config, ConfigError, QueueConfig
from ctid.store.provisioning import (
    AgentRecord,
    AgentSpec,
    AlreadyExists,
    NotFound,
    ProvisioningError,
    ProvisioningStore,
    QueueRecord,
    QueueSpec,
    queue_options,
)

__all__ = ["ADMIN_PREFIX", "AUDIT_ENTITIES", "setup_admin_routes"]

log = structlog.get_logger(__name__)

ADMIN_PREFIX: Final = "/api/v1/admin"
AUDIT_ENTITIES: Final = ("agent", "queue", "skill")
DEFAULT_AUDIT_LIMIT: Final = 100
MAX_AUDIT_LIMIT: Final = 1000
MAX_NAME: Final = 200

_AGENT_FIELDS: Final = frozenset({"agent_id", "tenant", "name", "pin_hash", "max_calls", "enabled", "skills"})
_QUEUE_FIELDS: Final = frozenset({"queue_id", "tenant", "name", "options"})
_QUEUE_COLUMNS: Final = frozenset({"id", "tenant", "name"})


# --------------------------------------------------------------------------- helpers


def _admin(request: web.Request) -> tuple[Principal, ProvisioningStore]:
    principal = _principal(request)
    if principal.role is not Role.ADMIN:
        raise ApiError.forbidden("the admin API needs a token with the admin role")
    store = _ctx(request).provisioning
    if store is None:
        raise ApiError(503, "unavailable", "provisioning is not available")
    return principal, store


def _config(request: web.Request) -> Config:
    ctx = _ctx(request)
    return ctx.current_config() if ctx.current_config is not None else ctx.config


def _path_id(request: web.Request, key: str) -> str:
    value = request.match_info[key]
    try:
        return check_id(value, key)
    except UnsafeValueError as exc:
        raise ApiError.bad_request(str(exc), field=key) from None


def _refuse_unknown(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError.bad_request(f"unknown field {unknown[0]!r}", field=unknown[0])


def _check_body_id(body: Mapping[str, Any], key: str, expected: str) -> None:
    if key in body and body[key] != expected:
        raise ApiError.bad_request(f"{key!r} in the body differs from the one in the path", field=key)


def _check_tenant(request: web.Request, tenant: object) -> str:
    if not isinstance(tenant, str):
        raise ApiError.bad_request("'tenant' is required (a string)", field="tenant")
    known = [t.id for t in _config(request).tenants]
    if tenant not in known:
        raise ApiError.bad_request(f"unknown tenant {tenant[:80]!r} (known: {', '.join(known)})", field="tenant")
    return tenant


def _check_name(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME or any(c in value for c in "\r\n\0"):
        raise ApiError.bad_request(f"'name' must be a string of at most {MAX_NAME} characters, on one line",
                                   field="name")
    return value


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _validation_error(exc: ValidationError, rename: Mapping[str, str], prefix: str = "") -> ApiError:
    """The first pydantic error as a 400 naming the field's path."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    if loc and isinstance(loc[0], str) and loc[0] in rename:
        field = _path((rename[loc[0]], *loc[1:]))
    else:
        field = _path(loc)
        field = f"{prefix}.{field}" if prefix and field else (prefix or field)
    message = str(err["msg"]).removeprefix("Value error, ")
    return ApiError.bad_request(f"{field or 'body'}: {message}", field=field or "body")


def _store_error(exc: ProvisioningError) -> ApiError:
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, AlreadyExists):
        return ApiError(409, "conflict", str(exc), field=exc.field or "id")
    if exc.field:
        return ApiError.bad_request(str(exc), field=exc.field)
    return ApiError.bad_request(str(exc))


def _validate_agent(agent_id: str, tenant: str, name: str, pin_hash: object, max_calls: object,
                    skills: object) -> AgentConfig:
    """The config's own rules for an agent (ids, skill names, levels, PIN hash)."""
    if not isinstance(pin_hash, str):
        raise ApiError.bad_request("'pin_hash' must be a string (from `ctid hash-secret`, or empty)",
                                   field="pin_hash")
    if isinstance(max_calls, bool) or not isinstance(max_calls, int):
        raise ApiError.bad_request("'max_calls' must be an integer", field="max_calls")
    if not isinstance(skills, Mapping):
        raise ApiError.bad_request("'skills' must be an object of skill name to level 1..10", field="skills")
    for skill, level in skills.items():
        if isinstance(level, bool) or not isinstance(level, int):
            raise ApiError.bad_request(f"skills.{skill}: level must be an integer 1..10", field=f"skills.{skill}")
    try:
        return AgentConfig.model_validate({"id": agent_id, "tenant": tenant, "name": name, "pin_hash": pin_hash,
                                           "max_calls": max_calls, "skills": dict(skills)})
    except ValidationError as exc:
        raise _validation_error(exc, {"id": "agent_id"}) from None


def _agent_spec(request: web.Request, agent_id: str, body: Mapping[str, Any],
                current: AgentRecord | None) -> AgentSpec:
    """The agent ``body`` asks for: its fields over ``current`` (None: a new agent)."""
    if current is None:
        base: dict[str, Any] = {"tenant": None, "name": "", "pin_hash": "", "max_calls": 1, "enabled": True,
                                "skills": {}}
    else:
        base = {"tenant": current.tenant, "name": current.name, "pin_hash": current.pin_hash,
                "max_calls": current.max_calls, "enabled": current.enabled, "skills": dict(current.skills)}
    merged = {**base, **{k: v for k, v in body.items() if k != "agent_id"}}
    tenant = _check_tenant(request, merged["tenant"])
    name = _check_name(merged["name"])
    if not isinstance(merged["enabled"], bool):
        raise ApiError.bad_request("'enabled' must be true or false", field="enabled")
    valid = _validate_agent(agent_id, tenant, name, merged["pin_hash"], merged["max_calls"], merged["skills"])
    try:
        return AgentSpec(id=valid.id, tenant=valid.tenant, name=valid.name, pin_hash=valid.pin_hash,
                         max_calls=valid.max_calls, enabled=merged["enabled"], skills=dict(valid.skills))
    except ProvisioningError as exc:
        raise _store_error(exc) from None


def _queue_spec(request: web.Request, queue_id: str, body: Mapping[str, Any],
                current: QueueRecord | None) -> QueueSpec:
    base: dict[str, Any] = ({"tenant": None, "name": "", "options": {}} if current is None else
                            {"tenant": current.tenant, "name": current.name, "options": dict(current.options)})
    merged = {**base, **{k: v for k, v in body.items() if k != "queue_id"}}
    tenant = _check_tenant(request, merged["tenant"])
    name = _check_name(merged["name"])
    options = merged["options"]
    if not isinstance(options, Mapping):
        raise ApiError.bad_request("'options' must be an object of queue options", field="options")
    clash = sorted(_QUEUE_COLUMNS & set(options))
    if clash:
        raise ApiError.bad_request(f"options.{clash[0]}: set it outside options", field=f"options.{clash[0]}")
    try:
        queue = QueueConfig.model_validate({**options, "id": queue_id, "tenant": tenant, "name": name})
    except ValidationError as exc:
        raise _validation_error(exc, {"id": "queue_id", "tenant": "tenant", "name": "name"}, "options") from None
    return QueueSpec(id=queue.id, tenant=queue.tenant, name=queue.name, options=queue_options(queue))


def _created(kind: str, entity_id: str, payload: dict[str, Any]) -> web.Response:
    return web.json_response(payload, status=201, headers={"Location": f"{ADMIN_PREFIX}/{kind}/{entity_id}"})


# --------------------------------------------------------------------------- agents


async def list_agents(request: web.Request) -> web.StreamResponse:
    _, store = _admin(request)
    tenant = request.query.get("tenant")
    agents = await store.list_agents(tenant)
    return web.json_response({"agents": [a.to_json() for a in agents]})


def _required_id(body: dict[str, Any], field: str) -> str:
    """The id a create request must carry, checked like every id (``check_id``)."""
    value = body.get(field)
    if not isinstance(value, str):
        raise ApiError.bad_request(f"'{field}' is required (a string)", field=field)
    try:
        return check_id(value, field)
    except UnsafeValueError as exc:
        raise ApiError.bad_request(str(exc), field=field) from None


async def create_agent(request: web.Request) -> web.StreamResponse:
    principal, store = _admin(request)
    body = await _json_body(request, allow_empty=False)
    _refuse_unknown(body, _AGENT_FIELDS)
    agent_id = _required_id(body, "agent_id")
    spec = _agent_spec(request, agent_id, body, None)
    try:
        agent = await store.create_agent(spec, actor=principal.name)
    except ProvisioningError as exc:
        raise _store_error(exc) from None
    log.info("admin.agent_created", agent_id=agent.id, by=principal.name)
    return _created("agents", agent.id, {"agent": agent.to_json()})


async def get_agent(request: web.Request) -> web.StreamResponse:
    _, store = _admin(request)
    agent_id = _path_id(request, "agent_id")
    agent = await store.get_agent(agent_id)
    if agent is None:
        raise ApiError(404, "not_found", f"unknown agent {agent_id!r}")
    return web.json_response({"agent": agent.to_json()})


async def update_agent(request: web.Request) -> web.StreamResponse:
    principal, store = _admin(request)
    agent_id = _path_id(request, "agent_id")
    body = await _json_body(request, allow_empty=False)
    _refuse_unknown(body, _AGENT_FIELDS)
    _check_body_id(body, "agent_id", agent_id)
    current = await store.get_agent(agent_id)
    if current is None:
        raise ApiError(404, "not_found", f"unknown agent {agent_id!r}")
    spec = _agent_spec(request, agent_id, body, current)
    try:
        agent = await store.update_agent(spec, actor=principal.name)
    except ProvisioningError as exc:
        raise _store_error(exc) from None
    log.info("admin.agent_updated", agent_id=agent.id, by=principal.name)
    return web.json_response({"agent": agent.to_json()})


async def set_agent_skills(request: web.Request) -> web.StreamResponse:
    principal, store = _admin(request)
    agent_id = _path_id(request, "agent_id")
    body = await _json_body(request, allow_empty=False)
    _refuse_unknown(body, frozenset({"skills"}))
    if "skills" not in body:
        raise ApiError.bad_request("'skills' is required (an object of skill name to level 1..10)", field="skills")
    current = await store.get_agent(agent_id)
    if current is None:
        raise ApiError(404, "not_found", f"unknown agent {agent_id!r}")
    valid = _validate_agent(agent_id, current.tenant, current.name, current.pin_hash, current.max_calls,
                            body["skills"])
    try:
        agent = await store.set_skills(agent_id, dict(valid.skills), actor=principal.name)
    except ProvisioningError as exc:
        raise _store_error(exc) from None
    log.info("admin.agent_skills_set", agent_id=agent.id, by=principal.name, skills=len(agent.skills))
    return web.json_response({"agent": agent.to_json()})


async def delete_agent(request: web.Request) -> web.StreamResponse:
    principal, store = _admin(request)
    agent_id = _path_id(request, "agent_id")
    try:
        await store.delete_agent(agent_id, actor=principal.name)
    except ProvisioningError as exc:
        raise _store_error(exc) from None
    log.info("admin.agent_deleted", agent_id=agent_id, by=principal.name)
    return web.Response(status=204)


# --------------------------------------------------------------------------- queues


async def list_queues(request: web.Request) -> web.StreamResponse:
    _, store = _admin(request)
    queues = await store.list_queues(request.query.get("tenant"))
    return web.json_response({"queues": [q.to_json() for q in queues]})


async def create_queue(request: web.Request) -> web.StreamResponse:
    principal, store = _admin(request)
    body = await _json_body(request, allow_empty=False)
    _refuse_unknown(body, _QUEUE_FIELDS)
    queue_id = _required_id(body, "queue_id")
    spec = _queue_spec(request, queue_id, body, None)
    try:
        queue = await store.create_queue(spec, actor=principal.name)
    except ProvisioningError as exc:
        raise _store_error(exc) from None
    log.info("admin.queue_created", queue_id=queue.id, by=principal.name)
    return _created("queues", queue.id, {"queue": queue.to_json()})


async def get_queue(request: web.Request) -> web.StreamResponse:
    _, store = _admin(request)
    queue_id = _path_id(request, "queue_id")
    queue = await store.get_queue(queue_id)
    if queue is None:
        raise ApiError(404, "not_found", f"unknown queue {queue_id!r}")
    return web.json_response({"queue": queue.to_json()})


async def update_queue(request: web.Request) -> web.StreamResponse:
    principal, store = _admin(request)
    queue_id = _path_id(request, "queue_id")
    body = await _json_body(request, allow_empty=False)
    _refuse_unknown(body, _QUEUE_FIELDS)
    _check_body_id(body, "queue_id", queue_id)
    current = await store.get_queue(queue_id)
    if current is None:
        raise ApiError(404, "not_found", f"unknown queue {queue_id!r}")
    spec = _queue_spec(request, queue_id, body, current)
    try:
        queue = await store.update_queue(spec, actor=principal.name)
    except ProvisioningError as exc:
        raise _store_error(exc) from None
    log.info("admin.queue_updated", queue_id=queue.id, by=principal.name)
    return web.json_response({"queue": queue.to_json()})


async def delete_queue(request: web.Request) -> web.StreamResponse:
    principal, store = _admin(request)
    queue_id = _path_id(request, "queue_id")
    try:
        await store.delete_queue(queue_id, actor=principal.name)
    except ProvisioningError as exc:
        raise _store_error(exc) from None
    log.info("admin.queue_deleted", queue_id=queue_id, by=principal.name)
    return web.Response(status=204)


# --------------------------------------------------------------------------- skills, audit, reload


async def list_skills(request: web.Request) -> web.StreamResponse:
    _, store = _admin(request)
    return web.json_response({"skills": [s.to_json() for s in await store.list_skills()]})


async def list_audit(request: web.Request) -> web.StreamResponse:
    _, store = _admin(request)
    limit = _int_param(request, "limit", DEFAULT_AUDIT_LIMIT, 1, MAX_AUDIT_LIMIT)
    entity = request.query.get("entity")
    if entity is not None and entity not in AUDIT_ENTITIES:
        raise ApiError.bad_request(f"entity must be one of {', '.join(AUDIT_ENTITIES)}", field="entity")
    entity_id = request.query.get("entity_id")
    rows = await store.list_audit(limit=limit, entity=entity, entity_id=entity_id)
    return web.json_response({"audit": [r.to_json() for r in rows]})


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


async def reload(request: web.Request) -> web.StreamResponse:
    principal = _principal(request)
    if principal.role is not Role.ADMIN:
        raise ApiError.forbidden("the admin API needs a token with the admin role")
    hook = _ctx(request).reload
    if hook is None:
        raise ApiError(503, "unavailable", "reload is not available")
    log.info("admin.reload", by=principal.name)
    try:
        report = await hook()
    except ConfigError as exc:
        raise ApiError.bad_request(f"the config has {len(exc.problems)} problem(s); nothing was reloaded",
                                   problems=[str(p) for p in exc.problems]) from None
    except ProvisioningError as exc:
        raise ApiError(409, "conflict", f"reload refused: {exc}") from None
    return web.json_response({"reload": _jsonable(report) if report is not None else {}})


def setup_admin_routes(app: web.Application) -> None:
    """Mount the admin routes (the server calls it next to ``rest.setup_routes``)."""
    p = ADMIN_PREFIX
    router = app.router
    router.add_get(f"{p}/agents", list_agents, allow_head=False)
    router.add_post(f"{p}/agents", create_agent)
    router.add_get(f"{p}/agents/{{agent_id}}", get_agent, allow_head=False)
    router.add_put(f"{p}/agents/{{agent_id}}", update_agent)
    router.add_delete(f"{p}/agents/{{agent_id}}", delete_agent)
    router.add_put(f"{p}/agents/{{agent_id}}/skills", set_agent_skills)
    router.add_get(f"{p}/queues", list_queues, allow_head=False)
    router.add_post(f"{p}/queues", create_queue)
    router.add_get(f"{p}/queues/{{queue_id}}", get_queue, allow_head=False)
    router.add_put(f"{p}/queues/{{queue_id}}", update_queue)
    router.add_delete(f"{p}/queues/{{queue_id}}", delete_queue)
    router.add_get(f"{p}/skills", list_skills, allow_head=False)
    router.add_get(f"{p}/audit", list_audit, allow_head=False)
    router.add_post(f"{p}/reload", reload)
