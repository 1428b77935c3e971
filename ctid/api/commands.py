"""Agent commands and API errors, shared by REST (``rest``) and the websocket (``websocket``).

Both transports hand a command name, the target agent and the JSON fields to
:meth:`AgentCommands.run`, so ``POST /api/v1/agents/1001/pause {"reason": "break"}``
and ``{"op": "pause", "req_id": 7, "agent_id": "1001", "reason": "break"}`` are
checked and answered the same way. Every refusal is an :class:`ApiError` with an HTTP
status and a stable ``code``; REST sends ``{"error": {...}}`` with the status, the
websocket sends ``{"type": "error", "req_id": ..., "error": {...}}``.

Order of checks: the agent exists and the caller may command it (404 / 403: an agent
asking about another agent gets 403 whether it exists or not), then the fields (400),
then the state machine (409, with the agent's current ``state``). A refused command
changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog

from ctid.acd.control import Actor, CallControl, ControlError
from ctid.agents import Agent, AgentCommandError, AgentRegistry, AgentStateError, UnknownAgentError
from ctid.api.auth import Principal, Role

__all__ = ["CALL_OPS", "COMMANDS", "AgentCommands", "ApiError", "CallCommands"]

log = structlog.get_logger(__name__)

KnownEndpoints = Callable[[], Collection[str] | None]


class ApiError(Exception):
    """A refusal with its HTTP status, a stable ``code`` and extra fields (``state``, ``field``)."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.extra}

    @classmethod
    def bad_request(cls, message: str, **extra: Any) -> ApiError:
        return cls(400, "bad_request", message, **extra)

    @classmethod
    def forbidden(cls, message: str) -> ApiError:
        return cls(403, "forbidden", message)


@dataclass(frozen=True, slots=True)
class _Spec:
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


#: The agent commands and their JSON fields (all strings).
COMMANDS: Final[dict[str, _Spec]] = {
    "login": _Spec(required=("device",)),
    "logout": _Spec(),
    "ready": _Spec(),
    "pause": _Spec(required=("reason",)),
    "wrapup": _Spec(required=("call_id",), optional=("disposition", "notes")),
}


def _fields(command: str, params: Mapping[str, Any]) -> dict[str, str]:
    spec = COMMANDS[command]
    allowed = set(spec.required) | set(spec.optional)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ApiError.bad_request(f"{command}: unknown field {unknown[0]!r}", field=unknown[0])
    out: dict[str, str] = {}
    for name in (*spec.required, *spec.optional):
        if name not in params:
            if name in spec.required:
                raise ApiError.bad_request(f"{command}: {name!r} is required", field=name)
            continue
        value = params[name]
        if not isinstance(value, str):
            raise ApiError.bad_request(f"{command}: {name!r} must be a string", field=name)
        out[name] = value
    return out


class AgentCommands:
    """Runs desk commands on the registry for an authenticated caller."""

    def __init__(self, registry: AgentRegistry, known_endpoints: KnownEndpoints | None = None) -> None:
        self._registry = registry
        self._known_endpoints = known_endpoints

    def target(self, principal: Principal, agent_id: str) -> Agent:
        """The agent ``principal`` may command; raises 404 or 403."""
        if principal.role is Role.AGENT and agent_id != principal.agent_id:
            raise ApiError.forbidden("an agent may act only on itself")
        try:
            agent = self._registry.get(agent_id)
        except UnknownAgentError:
            raise ApiError(404, "not_found", f"unknown agent {agent_id!r}") from None
        if not principal.may_command(agent.id, agent.tenant):
            if principal.role is Role.INTEGRATION:
                raise ApiError.forbidden("integration tokens cannot send agent commands")
            raise ApiError.forbidden(f"agent {agent_id!r} is not in your tenant")
        return agent

    def run(self, principal: Principal, command: str, agent_id: str, params: Mapping[str, Any]) -> Agent:
        """Check and run ``command``; returns the agent after it. Raises :class:`ApiError`."""
        if command not in COMMANDS:
            raise ApiError(400, "unknown_op", f"unknown command {command!r}")
        agent = self.target(principal, agent_id)
        fields = _fields(command, params)
        registry = self._registry
        try:
            if command == "login":
                known = self._known_endpoints() if self._known_endpoints is not None else None
                result = registry.login(agent.id, fields["device"], known)
            elif command == "logout":
                result = registry.logout(agent.id)
            elif command == "ready":
                result = registry.ready(agent.id)
            elif command == "pause":
                result = registry.pause(agent.id, fields["reason"])
            else:
                result = registry.wrapup_done(agent.id, fields["call_id"], fields.get("disposition", ""),
                                              fields.get("notes", ""),
                                              completed_by="agent" if principal.role is Role.AGENT else "supervisor")
        except AgentStateError as exc:
            raise ApiError(409, "wrong_state", str(exc), state=exc.state.value) from None
        except AgentCommandError as exc:
            raise ApiError.bad_request(str(exc), field=exc.field) from None
        log.info("agent.command", command=command, agent_id=agent.id, by=principal.name, state=result.state.value)
        return result


# --------------------------------------------------------------------------- call control

#: Call-control ops (``ctid.acd.control``) and their JSON fields (all strings). ``dial``
#: targets an agent (``agent_id``); the others a call (``call_id``).
CALL_OPS: Final[dict[str, _Spec]] = {
    "hold": _Spec(),
    "resume": _Spec(),
    "transfer": _Spec(required=("target",)),
    "atxfer": _Spec(required=("exten",)),
    "hangup": _Spec(),
    "dial": _Spec(required=("number",)),
}


def _call_fields(op: str, params: Mapping[str, Any]) -> dict[str, str]:
    spec = CALL_OPS[op]
    unknown = sorted(set(params) - set(spec.required) - set(spec.optional))
    if unknown:
        raise ApiError.bad_request(f"{op}: unknown field {unknown[0]!r}", field=unknown[0])
    out: dict[str, str] = {}
    for name in spec.required:
        value = params.get(name)
        if not isinstance(value, str) or not value:
            raise ApiError.bad_request(f"{op}: {name!r} is required (a string)", field=name)
        out[name] = value
    return out


class CallCommands:
    """Runs call-control ops for an authenticated caller; errors become :class:`ApiError`."""

    def __init__(self, control: CallControl) -> None:
        self._control = control

    async def run(self, principal: Principal, op: str, target: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if op not in CALL_OPS:
            raise ApiError(400, "unknown_op", f"unknown op {op!r}")
        actor = Actor(principal.role.value, principal.tenant, principal.agent_id, principal.name)
        fields = _call_fields(op, params)
        control = self._control
        try:
            if op == "dial":
                result: dict[str, Any] = await control.dial(target, fields["number"], actor)
            elif op == "transfer":
                result = await control.blind_transfer(target, fields["target"], actor)
            elif op == "atxfer":
                result = await control.attended_transfer(target, fields["exten"], actor)
            else:
                result = await getattr(control, op)(target, actor)
        except ControlError as exc:
            raise ApiError(exc.status, exc.code, exc.message, **exc.extra) from None
        log.info("call.command", op=op, target=target, by=principal.name)
        return result
