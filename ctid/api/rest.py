"""The HTTP API: agent commands, lists of agents, calls and queues, event replay, health, metrics.

Every route is described in the OpenAPI document (``ctid.api.openapi``), served at
``GET /api/v1/openapi.json``; a test checks that the two list the same routes.

* ``/api/v1/*`` needs ``Authorization: Bearer <token>`` (an API token or a desktop
  session token), except ``POST /api/v1/auth/login`` (the sign-in itself) and the
  OpenAPI document. Tokens are never accepted in a query string, which would put
  them in access logs.
* Errors are ``{"error": {"code": ..., "message": ..., ...}}`` with the HTTP status
  (see :class:`ctid.api.commands.ApiError`); 409 carries the agent's ``state``, 429 a
  ``Retry-After`` header.
* ``/healthz`` and ``/metrics`` are open, for load balancers and Prometheus: they
  show no customer data, and the listener binds to 127.0.0.1 by default.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ctid.agents import AgentRegistry
from ctid.api.auth import Authenticator, AuthError, Principal, RateLimited, Role, SignInRejected
from ctid.api.commands import CALL_OPS, COMMANDS, AgentCommands, ApiError, CallCommands
from ctid.asterisk.safety import UnsafeValueError, check_id, e164_or_none
from ctid.calls import CallState
from ctid.config import Config
from ctid.events.schema import EVENT_TYPES, Event, format_ts

if TYPE_CHECKING:
    from ctid.store.provisioning import ProvisioningStore

__all__ = ["API_CONTEXT", "ApiContext", "CallLike", "ConfigView", "Reload", "call_json", "error_middleware",
           "health_status", "setup_routes"]

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
_MAX_SECRET: Final = 1024


class LegLike(Protocol):
    @property
    def channel(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def answered_at(self) -> datetime | None: ...
    @property
    def ended_at(self) -> datetime | None: ...


class CallLike(Protocol):
    """What the API reads of a call: a live :class:`ctid.calls.Call` or a stored
    :class:`ctid.store.calls.CallRecord`."""

    @property
    def call_id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def direction(self) -> str: ...
    @property
    def service_line(self) -> str | None: ...
    @property
    def caller_number(self) -> str | None: ...
    @property
    def caller_name(self) -> str | None: ...
    @property
    def dnis(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def answered_at(self) -> datetime | None: ...
    @property
    def ended_at(self) -> datetime | None: ...
    @property
    def hangup_by(self) -> str | None: ...
    @property
    def legs(self) -> Sequence[LegLike]: ...


CallsView = Callable[[], Iterable[CallLike]]
EndedCalls = Callable[[int], Awaitable[Sequence[CallLike]]]
Health = Callable[[], Mapping[str, Any]]
#: The daemon's reload hook (``POST /api/v1/admin/reload``); returns a JSON-able report.
Reload = Callable[[], Awaitable[Any]]
#: The config as of the last reload.
ConfigView = Callable[[], Config]


class Replay(Protocol):
    async def replay(self, after_seq: int, *, limit: int = 1000, tenant: str | None = None,
                     agent_id: str | None = None, types: list[str] | None = None,
                     call_id: str | None = None) -> list[Event]: ...


@dataclass(frozen=True)
class ApiContext:
    config: Config
    auth: Authenticator
    registry: AgentRegistry
    commands: AgentCommands
    bus: Replay
    calls_view: CallsView
    ended_calls: EndedCalls | None
    health: Health
    metrics: CollectorRegistry
    clock: Clock
    openapi: bytes
    #: The admin API (``ctid.api.admin``): the provisioning store (None: 503), the
    #: reload hook (None: 503), and the current config (None: ``config``).
    provisioning: ProvisioningStore | None = None
    reload: Reload | None = None
    current_config: ConfigView | None = None
    #: Call control (``ctid.acd.control``): hold, transfers, hangup, click-to-dial (None: 503).
    calls: CallCommands | None = None


API_CONTEXT: Final = web.AppKey("ctid.api", ApiContext)


# --------------------------------------------------------------------------- errors


def error_response(exc: ApiError, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": exc.error()}, status=exc.status, headers=headers)


_HTTP_CODES: Final = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                      405: "method_not_allowed", 413: "too_large", 429: "rate_limited"}


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error leaves as JSON ``{"error": {"code", "message"}}``."""
    try:
        return await handler(request)
    except ApiError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 429 and "retry_after" in exc.extra:
            headers = {"Retry-After": str(exc.extra["retry_after"])}
        return error_response(exc, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 413 else "request body too large"
        keep = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(ApiError(exc.status, code, message), keep)
    except Exception:
        log.exception("api.internal_error", method=request.method, path=request.path)
        return error_response(ApiError(500, "internal", "internal error"))


# --------------------------------------------------------------------------- helpers


def _ctx(request: web.Request) -> ApiContext:
    return request.app[API_CONTEXT]


def _principal(request: web.Request) -> Principal:
    ctx = _ctx(request)
    try:
        return ctx.auth.bearer(request.headers.get("Authorization"))
    except AuthError as exc:
        raise ApiError(401, "unauthorized", str(exc)) from None


async def _json_body(request: web.Request, *, allow_empty: bool) -> dict[str, Any]:
    raw = await request.read()  # raises 413 past client_max_size
    if not raw.strip():
        if allow_empty:
            return {}
        raise ApiError.bad_request("a JSON object body is required")
    try:
        obj = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ApiError(400, "bad_json", f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ApiError.bad_request("the body must be a JSON object")
    return obj


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError.bad_request(f"{name} must be an integer", field=name) from None
    if not low <= value <= high:
        raise ApiError.bad_request(f"{name} must be between {low} and {high}", field=name)
    return value


def _tenant_param(request: web.Request, principal: Principal) -> str | None:
    """The tenant a list is limited to: the caller's, or ``?tenant=`` for an admin."""
    asked = request.query.get("tenant")
    if asked is None:
        return principal.tenant
    if not principal.may_read_tenant(asked):
        raise ApiError.forbidden(f"tenant {asked!r} is not yours")
    return asked


def _ts(value: datetime | None) -> str | None:
    return None if value is None else format_ts(value)


def call_json(call: CallLike, agent_id: str | None = None) -> dict[str, Any]:
    """A call as ``GET /api/v1/calls`` lists it."""
    number = call.caller_number
    return {
        "call_id": call.call_id,
        "state": str(call.state),
        "direction": str(call.direction),
        "caller": {"number": number, "name": call.caller_name, "e164": e164_or_none(number) if number else None},
        "dnis": call.dnis,
        "service_line": call.service_line,
        "tenant": call.tenant,
        "agent_id": agent_id,
        "created_at": format_ts(call.created_at),
        "answered_at": _ts(call.answered_at),
        "ended_at": _ts(call.ended_at),
        "hangup_by": None if call.hangup_by is None else str(call.hangup_by),
        "legs": [{"channel": leg.channel, "role": str(leg.role), "created_at": format_ts(leg.created_at),
                  "answered_at": _ts(leg.answered_at), "ended_at": _ts(leg.ended_at)} for leg in call.legs],
    }


def health_status(report: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Ready means: every AMI link logged in, and FastAGI listening. Returns (ok, reasons)."""
    reasons: list[str] = []
    links = report.get("ami")
    if not isinstance(links, Mapping) or not links:
        reasons.append("no AMI link")
    else:
        for link_id, link in links.items():
            state = link.get("state") if isinstance(link, Mapping) else None
            if state != "logged_in":
                reasons.append(f"AMI link {link_id} is {state or 'unknown'}")
    agi = report.get("agi")
    if not isinstance(agi, Mapping) or agi.get("listening") is not True:
        reasons.append("FastAGI is not listening")
    return not reasons, reasons


# --------------------------------------------------------------------------- handlers


async def sign_in(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    body = await _json_body(request, allow_empty=False)
    unknown = sorted(set(body) - {"agent_id", "secret"})
    if unknown:
        raise ApiError.bad_request(f"unknown field {unknown[0]!r}", field=unknown[0])
    agent_id, secret = body.get("agent_id"), body.get("secret")
    if not isinstance(agent_id, str):
        raise ApiError.bad_request("'agent_id' is required (a string)", field="agent_id")
    if not isinstance(secret, str) or not 0 < len(secret) <= _MAX_SECRET:
        raise ApiError.bad_request(f"'secret' is required (a string of 1..{_MAX_SECRET})", field="secret")
    try:
        check_id(agent_id, "agent_id")
    except UnsafeValueError as exc:
        raise ApiError.bad_request(str(exc), field="agent_id") from None
    try:
        token, principal = await ctx.auth.sign_in(agent_id, secret, request.remote or "unknown")
    except RateLimited as exc:
        raise ApiError(429, "rate_limited", str(exc), retry_after=exc.retry_after) from None
    except SignInRejected as exc:
        raise ApiError(401, "unauthorized", str(exc)) from None
    return web.json_response({"token": token, "expires_at": _ts(principal.expires_at), "agent_id": principal.agent_id,
                              "tenant": principal.tenant}, headers={"Cache-Control": "no-store"})


def _command_handler(command: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        ctx = _ctx(request)
        principal = _principal(request)
        agent_id = request.match_info["agent_id"]
        agent = ctx.commands.target(principal, agent_id)  # 403/404 before the body is judged
        body = await _json_body(request, allow_empty=True)
        agent = ctx.commands.run(principal, command, agent.id, body)
        return web.json_response({"agent": agent.snapshot()})

    handle.__name__ = f"agent_{command}"
    return handle


def _call_op_handler(op: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """``POST /api/v1/calls/{call_id}/<op>`` and ``POST /api/v1/agents/{agent_id}/dial``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        ctx = _ctx(request)
        principal = _principal(request)
        if ctx.calls is None:
            raise ApiError(503, "unavailable", "call control is not available")
        target = request.match_info["agent_id" if op == "dial" else "call_id"]
        body = await _json_body(request, allow_empty=not CALL_OPS[op].required)
        return web.json_response(await ctx.calls.run(principal, op, target, body))

    handle.__name__ = f"call_{op}"
    return handle


async def list_agents(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    principal = _principal(request)
    tenant = _tenant_param(request, principal)
    agents = [a.snapshot() for a in ctx.registry
              if principal.sees_agent(a.id, a.tenant) and (tenant is None or a.tenant == tenant)]
    return web.json_response({"agents": agents})


_CALL_STATES: Final = frozenset(s.value for s in CallState)


async def list_calls(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    principal = _principal(request)
    tenant = _tenant_param(request, principal)
    state = request.query.get("state")
    if state is not None and state not in _CALL_STATES:
        raise ApiError.bad_request(f"unknown call state {state!r} (one of {', '.join(sorted(_CALL_STATES))})",
                                   field="state")
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    by_call = {call_id: a.id for a in ctx.registry for call_id in a.calls}
    calls: Iterable[CallLike]
    if state == CallState.ENDED.value:
        if ctx.ended_calls is None:
            raise ApiError(503, "unavailable", "call history is not available")
        calls = await ctx.ended_calls(MAX_LIMIT if principal.role is Role.AGENT or tenant else limit)
    else:
        calls = [c for c in ctx.calls_view() if state is None or str(c.state) == state]
    device = None
    if principal.role is Role.AGENT and principal.agent_id is not None and principal.agent_id in ctx.registry:
        device = ctx.registry.get(principal.agent_id).device
    out = []
    for call in calls:
        if tenant is not None and call.tenant != tenant:
            continue
        agent_id = by_call.get(call.call_id)
        if principal.role is Role.AGENT and not (
                agent_id == principal.agent_id or (device and any(_on_device(leg.channel, device)
                                                                  for leg in call.legs))):
            continue
        out.append(call_json(call, agent_id))
        if len(out) >= limit:
            break
    return web.json_response({"calls": out})


def _on_device(channel: str, device: str) -> bool:
    """``PJSIP/1001-0000002a`` is a channel of device ``PJSIP/1001``."""
    return channel == device or channel.startswith(device + "-")


async def list_queues(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    principal = _principal(request)
    tenant = _tenant_param(request, principal)
    queues = [{"queue_id": q.id, "tenant": q.tenant, "name": q.name,
               # Placeholders until the ACD issue computes queue statistics.
               "stats": {"waiting": None, "longest_wait_s": None, "agents_by_state": None,
                         "service_level_today": None}}
              for q in ctx.config.queues if tenant is None or q.tenant == tenant]
    return web.json_response({"queues": queues})


async def list_events(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    principal = _principal(request)
    tenant = _tenant_param(request, principal)
    after_seq = _int_param(request, "after_seq", 0, 0, 2**63 - 1)
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    types: list[str] | None = None
    if "types" in request.query:
        types = sorted({t for t in request.query["types"].split(",") if t})
        unknown = [t for t in types if t not in EVENT_TYPES]
        if unknown:
            raise ApiError.bad_request(f"unknown event type {unknown[0]!r}", field="types")
    agent_id = request.query.get("agent_id")
    if principal.role is Role.AGENT:
        if agent_id is not None and agent_id != principal.agent_id:
            raise ApiError.forbidden("an agent may read only its own events")
        agent_id = principal.agent_id
    call_id = request.query.get("call_id")
    try:
        events = await ctx.bus.replay(after_seq, limit=limit, tenant=tenant, agent_id=agent_id, types=types,
                                      call_id=call_id)
    except Exception:
        log.exception("api.replay_failed", after_seq=after_seq)
        raise ApiError(503, "unavailable", "event replay is not available right now") from None
    visible = [e for e in events if principal.sees(e)]  # the bus filters; this is the second lock
    last_seq = events[-1].seq if events else after_seq
    body = ('{"events":[' + ",".join(e.to_json() for e in visible) + "],"
            + f'"last_seq":{last_seq},"more":{"true" if len(events) >= limit else "false"}}}')
    return web.Response(text=body, content_type="application/json")


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_ctx(request).openapi, content_type="application/json")


async def healthz(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    try:
        report = dict(ctx.health())
    except Exception as exc:
        log.exception("api.health_failed")
        report = {"error": f"{type(exc).__name__}"}
    ok, reasons = health_status(report)
    body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "reasons": reasons}
    for key in ("ami", "agi", "db", "broker", "event_lag"):
        body[key] = report.get(key)
    body.update({k: v for k, v in report.items() if k not in body and k != "ok"})
    return web.json_response(body, status=200 if ok else 503, dumps=lambda o: json.dumps(o, default=str))


async def metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(body=generate_latest(_ctx(request).metrics), headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_routes(app: web.Application, ws_handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
    app.router.add_post("/api/v1/auth/login", sign_in)
    for command in COMMANDS:
        app.router.add_post(f"/api/v1/agents/{{agent_id}}/{command}", _command_handler(command))
    for op in CALL_OPS:
        path = "/api/v1/agents/{agent_id}/dial" if op == "dial" else f"/api/v1/calls/{{call_id}}/{op}"
        app.router.add_post(path, _call_op_handler(op))
    app.router.add_get("/api/v1/agents", list_agents, allow_head=False)
    app.router.add_get("/api/v1/calls", list_calls, allow_head=False)
    app.router.add_get("/api/v1/queues", list_queues, allow_head=False)
    app.router.add_get("/api/v1/events", list_events, allow_head=False)
    app.router.add_get("/api/v1/openapi.json", openapi, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/ws", ws_handler, allow_head=False)
