"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /api/v1/openapi.json``.

Written as Python data (not a JSON file) so it ships inside the package and shares
constants with the code: the agent states, pause reasons, event types and limits
come from the modules that enforce them. ``tests/test_api_rest.py`` checks that
every route the application serves is described here, and nothing else.
"""

from __future__ import annotations

from typing import Any, Final

from ctid.agents.states import DEFAULT_PAUSE_REASONS, AgentState
from ctid.api.commands import COMMANDS
from ctid.calls import CallState
from ctid.events.schema import EVENT_TYPES
from ctid.store.provisioning import MAX_SKILLS, SKILL_PATTERN

__all__ = ["document"]

JSON = dict[str, Any]
_JSON_MEDIA: Final = "application/json"


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: JSON, description: str) -> JSON:
    return {"description": description, "content": {_JSON_MEDIA: {"schema": schema}}}


def _error(description: str) -> JSON:
    return _json(_ref("Error"), description)


def _nullable(kind: str, **extra: Any) -> JSON:
    return {"type": [kind, "null"], **extra}


_TS: Final = {"type": "string", "format": "date-time", "description": "ISO-8601 UTC with milliseconds and Z"}
_TS_OR_NULL: Final = {"type": ["string", "null"], "format": "date-time"}
_AUTH_ERRORS: Final = {"401": _error("Missing, invalid or expired token."),
                       "403": _error("The token's role or tenant does not allow this.")}

_SCHEMAS: Final[JSON] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": [
                    "bad_json", "bad_request", "unauthorized", "forbidden", "not_found", "method_not_allowed",
                    "wrong_state", "conflict", "too_large", "rate_limited", "unavailable", "internal",
                    "http_error", "unknown_op", "number_not_allowed", "gone", "asterisk_error"]},
                "message": {"type": "string"},
                "state": {"type": "string",
                          "enum": sorted({s.value for s in AgentState} | {s.value for s in CallState}),
                          "description": "With wrong_state (409): the agent's current state, or for call "
                                         "control the call's; with gone: ended."},
                "field": {"type": "string", "description": "The request field that was refused."},
                "retry_after": {"type": "integer", "description": "With rate_limited (429): seconds to wait."},
                "problems": {"type": "array", "items": {"type": "string"},
                             "description": "With a refused reload: every problem of the config file."},
            }}},
    },
    "AgentState": {
        "type": "object", "required": ["state", "reason", "device", "since", "previous", "calls"],
        "properties": {
            "state": {"type": "string", "enum": [s.value for s in AgentState]},
            "reason": _nullable("string", description="Pause reason code when paused"),
            "device": _nullable("string", description="Device the agent is logged in to, e.g. PJSIP/1001"),
            "since": _TS,
            "previous": {"type": ["string", "null"], "enum": [*(s.value for s in AgentState), None]},
            "calls": {"type": "integer", "minimum": 0,
                      "description": "How many calls the agent handles (reserved, on the call, wrap-up)"},
        },
    },
    "Agent": {
        "allOf": [_ref("AgentState"), {
            "type": "object", "required": ["agent_id", "tenant", "name", "skills", "max_calls", "call_ids"],
            "properties": {
                "call_ids": {"type": "array", "items": {"type": "string"},
                             "description": "Ids of the calls the agent handles"},
                "agent_id": {"type": "string"}, "tenant": {"type": "string"}, "name": {"type": "string"},
                "skills": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1,
                                                                      "maximum": 10}},
                "max_calls": {"type": "integer"},
            }}],
    },
    "AgentResult": {"type": "object", "required": ["agent"], "properties": {"agent": _ref("Agent")}},
    "Leg": {
        "type": "object", "required": ["channel", "role", "created_at"],
        "properties": {"channel": {"type": "string"}, "role": {"type": "string"}, "created_at": _TS,
                       "answered_at": _TS_OR_NULL, "ended_at": _TS_OR_NULL},
    },
    "Call": {
        "type": "object",
        "required": ["call_id", "state", "direction", "caller", "dnis", "tenant", "created_at"],
        "properties": {
            "call_id": {"type": "string"},
            "state": {"type": "string", "enum": [s.value for s in CallState]},
            "direction": {"type": "string", "enum": ["inbound", "outbound", "internal"]},
            "caller": {"type": "object", "properties": {
                "number": _nullable("string"), "name": _nullable("string"),
                "e164": _nullable("string", description="E.164 form where the number allows it")}},
            "dnis": _nullable("string"),
            "service_line": _nullable("string"),
            "tenant": {"type": "string"},
            "agent_id": _nullable("string", description="The agent handling the call, when ctid routed it"),
            "created_at": _TS, "answered_at": _TS_OR_NULL, "ended_at": _TS_OR_NULL,
            "hangup_by": _nullable("string"),
            "legs": {"type": "array", "items": _ref("Leg")},
        },
    },
    "Queue": {
        "type": "object", "required": ["queue_id", "tenant", "name", "stats"],
        "properties": {
            "queue_id": {"type": "string"}, "tenant": {"type": "string"}, "name": {"type": "string"},
            "stats": {
                "type": "object",
                "description": "Queue statistics. PLACEHOLDERS: every field is null until the ACD issue "
                               "computes them; the field names are the contract.",
                "properties": {
                    "waiting": _nullable("integer"), "longest_wait_s": _nullable("number"),
                    "agents_by_state": {"type": ["object", "null"],
                                        "additionalProperties": {"type": "integer"}},
                    "service_level_today": _nullable("number"),
                }},
        },
    },
    "Event": {
        "type": "object", "description": "The event envelope (docs/events.md, docs/schema/).",
        "required": ["v", "seq", "id", "ts", "type", "tenant", "call_id", "agent_id", "queue", "data"],
        "properties": {
            "v": {"type": "integer", "const": 1}, "seq": {"type": "integer"}, "id": {"type": "string"},
            "ts": _TS, "type": {"type": "string", "enum": sorted(EVENT_TYPES)},
            "tenant": _nullable("string"), "call_id": _nullable("string"), "agent_id": _nullable("string"),
            "queue": _nullable("string"), "data": {"type": "object"},
        },
    },
    "Health": {
        "type": "object", "required": ["status", "reasons", "ami", "agi", "db", "broker", "event_lag"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "reasons": {"type": "array", "items": {"type": "string"},
                        "description": "Why the status is unavailable (empty when ok)"},
            "ami": {"type": ["object", "null"], "description": "Per AMI link: state (logged_in, ...), last_error"},
            "agi": {"type": ["object", "null"], "description": "FastAGI: listening, port, sessions"},
            "db": {"description": "Database / outbox state"},
            "broker": {"description": "MQTT broker state (null when MQTT is off)"},
            "event_lag": {"description": "Events not yet committed to the outbox"},
        },
    },
}


_SKILL_MAP: Final = {
    "type": "object", "maxProperties": MAX_SKILLS, "propertyNames": {"pattern": f"^{SKILL_PATTERN}$"},
    "additionalProperties": {"type": "integer", "minimum": 1, "maximum": 10},
    "description": "Skill name (name or name:value) to level 1..10", "examples": [{"lang:en": 7, "billing": 3}],
}
_ADMIN_AGENT_FIELDS: Final[JSON] = {
    "tenant": {"type": "string", "description": "One of the config's tenants"},
    "name": {"type": "string", "maxLength": 200},
    "pin_hash": {"type": "string", "description": "From `ctid hash-secret` (scrypt); empty: no PIN sign-in"},
    "max_calls": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
    "enabled": {"type": "boolean", "default": True, "description": "Disabled agents are not loaded by the daemon"},
    "skills": _SKILL_MAP,
}
_ADMIN_QUEUE_FIELDS: Final[JSON] = {
    "tenant": {"type": "string", "description": "One of the config's tenants"},
    "name": {"type": "string", "maxLength": 200},
    "options": {"type": "object", "description": "The queue's routing options, the fields of a [[queues]] "
                                                 "entry of the config other than id, tenant and name "
                                                 "(requires, policy, relax, overflow, wrapup_s, ...), "
                                                 "validated like the config. Unknown options are refused."},
}
_SOURCE: Final = {"type": "string", "enum": ["config", "api"],
                  "description": "config: seeded (or ctid seed --force); api: last changed by an admin"}

_SCHEMAS.update({
    "AdminAgent": {
        "type": "object",
        "required": ["agent_id", "tenant", "name", "pin_set", "max_calls", "enabled", "skills", "source",
                     "updated_at"],
        "properties": {
            "agent_id": {"type": "string"}, "tenant": {"type": "string"}, "name": {"type": "string"},
            "pin_set": {"type": "boolean", "description": "Whether a PIN hash is set (the hash is never shown)"},
            "max_calls": {"type": "integer"}, "enabled": {"type": "boolean"}, "skills": _SKILL_MAP,
            "source": _SOURCE, "updated_at": _TS,
        },
    },
    "AdminAgentCreate": {
        "type": "object", "required": ["agent_id", "tenant"], "additionalProperties": False,
        "properties": {"agent_id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                       **_ADMIN_AGENT_FIELDS},
    },
    "AdminAgentUpdate": {
        "type": "object", "additionalProperties": False,
        "description": "The fields given replace the agent's; the others keep their value.",
        "properties": {"agent_id": {"type": "string", "description": "If given, the id in the path"},
                       **_ADMIN_AGENT_FIELDS},
    },
    "AdminAgentResult": {"type": "object", "required": ["agent"], "properties": {"agent": _ref("AdminAgent")}},
    "AdminQueue": {
        "type": "object", "required": ["queue_id", "tenant", "name", "options", "source", "updated_at"],
        "properties": {"queue_id": {"type": "string"}, "tenant": {"type": "string"}, "name": {"type": "string"},
                       "options": {"type": "object", "description": "The options that were set"},
                       "source": _SOURCE, "updated_at": _TS},
    },
    "AdminQueueCreate": {
        "type": "object", "required": ["queue_id", "tenant"], "additionalProperties": False,
        "properties": {"queue_id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                       **_ADMIN_QUEUE_FIELDS},
    },
    "AdminQueueUpdate": {
        "type": "object", "additionalProperties": False,
        "description": "The fields given replace the queue's (options as a whole); the others keep their value.",
        "properties": {"queue_id": {"type": "string", "description": "If given, the id in the path"},
                       **_ADMIN_QUEUE_FIELDS},
    },
    "AdminQueueResult": {"type": "object", "required": ["queue"], "properties": {"queue": _ref("AdminQueue")}},
    "Skill": {
        "type": "object", "required": ["name", "description", "agents"],
        "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                       "agents": {"type": "integer", "minimum": 0, "description": "Agents that have it"}},
    },
    "AuditEntry": {
        "type": "object", "required": ["id", "ts", "actor", "action", "entity", "entity_id", "before", "after"],
        "properties": {
            "id": {"type": "integer"}, "ts": _TS,
            "actor": {"type": "string", "description": "The token name; config for seeds, cli for ctid seed"},
            "action": {"type": "string", "enum": ["create", "update", "set_skills", "delete"]},
            "entity": {"type": "string", "enum": ["agent", "queue", "skill"]},
            "entity_id": {"type": "string"},
            "before": {"type": ["object", "null"], "description": "The entity before (null for a create)"},
            "after": {"type": ["object", "null"], "description": "The entity after (null for a delete)"},
        },
    },
})

_ADMIN_ERRORS: Final = {"401": _error("Missing, invalid or expired token."),
                        "403": _error("The token does not have the admin role."),
                        "503": _error("Provisioning is not available.")}


def _admin_op(op_id: str, summary: str, responses: JSON, *, params: list[JSON] | None = None,
              body: str | None = None, description: str = "") -> JSON:
    op: JSON = {"operationId": op_id, "summary": summary, "tags": ["admin"], "security": [{"bearer": []}],
                "parameters": params or [], "responses": {**responses, **_ADMIN_ERRORS}}
    if description:
        op["description"] = description
    if body is not None:
        op["requestBody"] = {"required": True, "content": {_JSON_MEDIA: {"schema": _ref(body)}}}
        op["responses"].setdefault("400", _error("Malformed JSON, unknown field, or an invalid value; "
                                                 "error.field is its path."))
        op["responses"].setdefault("413", _error("Body larger than max_message_bytes."))
    return op


def _path_param(name: str) -> JSON:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}}


def _admin_paths() -> JSON:
    prefix = "/api/v1/admin"
    out: JSON = {}
    for kind, one, key, label in (("agents", "agent", "agent_id", "Agent"), ("queues", "queue", "queue_id",
                                                                                "Queue")):
        result = _json(_ref(f"Admin{label}Result"), f"The {one}.")
        param = [_path_param(key)]
        out[f"{prefix}/{kind}"] = {
            "get": _admin_op(f"admin_list_{kind}", f"Provisioned {kind}", {
                "200": _json({"type": "object", "required": [kind],
                              "properties": {kind: {"type": "array", "items": _ref(f"Admin{label}")}}},
                             f"The {kind}, by id.")}, params=[_query("tenant", {"type": "string"},
                                                                     "Only this tenant's")]),
            "post": _admin_op(f"admin_create_{one}", f"Create a {one}", {
                "201": {**_json(_ref(f"Admin{label}Result"), f"Created; Location names the {one}."),
                        "headers": {"Location": {"schema": {"type": "string"}}}},
                "409": _error(f"A {one} with this id exists.")}, body=f"Admin{label}Create"),
        }
        out[f"{prefix}/{kind}/{{{key}}}"] = {
            "get": _admin_op(f"admin_get_{one}", f"One {one}", {
                "200": result, "400": _error("Invalid id."), "404": _error(f"Unknown {one}.")}, params=param),
            "put": _admin_op(f"admin_update_{one}", f"Change a {one}", {
                "200": result, "404": _error(f"Unknown {one}.")}, params=param, body=f"Admin{label}Update"),
            "delete": _admin_op(f"admin_delete_{one}", f"Delete a {one}", {
                "204": {"description": "Deleted" + (", with its skills." if one == "agent" else ".")},
                "400": _error("Invalid id."), "404": _error(f"Unknown {one}.")}, params=param),
        }
    out[f"{prefix}/agents/{{agent_id}}/skills"] = {"put": {
        **_admin_op("admin_set_agent_skills", "Replace an agent's skills", {
            "200": _json(_ref("AdminAgentResult"), "The agent."), "404": _error("Unknown agent.")},
            params=[_path_param("agent_id")], description="New skill names join the catalogue."),
        "requestBody": {"required": True, "content": {_JSON_MEDIA: {"schema": {
            "type": "object", "required": ["skills"], "additionalProperties": False,
            "properties": {"skills": _SKILL_MAP}}}}},
    }}
    out[f"{prefix}/agents/{{agent_id}}/skills"]["put"]["responses"].update({
        "400": _error("Malformed JSON, unknown field, bad skill name or level."),
        "413": _error("Body larger than max_message_bytes.")})
    out[f"{prefix}/skills"] = {"get": _admin_op("admin_list_skills", "The skill catalogue", {
        "200": _json({"type": "object", "required": ["skills"],
                      "properties": {"skills": {"type": "array", "items": _ref("Skill")}}}, "Skills by name.")})}
    out[f"{prefix}/audit"] = {"get": _admin_op("admin_audit", "The provisioning audit log, newest first", {
        "200": _json({"type": "object", "required": ["audit"],
                      "properties": {"audit": {"type": "array", "items": _ref("AuditEntry")}}}, "Audit rows."),
        "400": _error("Invalid query parameter.")}, params=[
        _LIMIT_Q, _query("entity", {"type": "string", "enum": ["agent", "queue", "skill"]}, "Only this kind"),
        _query("entity_id", {"type": "string"}, "Only this entity")])}
    out[f"{prefix}/reload"] = {"post": _admin_op(
        "admin_reload", "Reload the config (as SIGHUP does)", {
            "200": _json({"type": "object", "required": ["reload"], "properties": {"reload": {"type": "object"}}},
                         "Reloaded; what changed."),
            "400": _error("The config file is invalid; error.problems lists why. Nothing changed."),
            "409": _error("The stored provisioning does not fit the new config. Nothing changed.")},
        description="Reads the config file again, seeds the entries that are new in it (never overwriting "
                    "changes made through this API) and applies what is reloadable without a restart.")}
    return out


def _agent_command(command: str, summary: str, body: JSON | None) -> JSON:
    op: JSON = {
        "operationId": f"agent_{command}",
        "summary": summary,
        "tags": ["agents"],
        "security": [{"bearer": []}],
        "parameters": [{"name": "agent_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {
            "200": _json(_ref("AgentResult"), "The agent after the command."),
            "400": _error("Malformed JSON, unknown or invalid field."),
            **_AUTH_ERRORS,
            "404": _error("Unknown agent."),
            "409": _error("Not allowed in the agent's current state; error.state tells it."),
            "413": _error("Body larger than max_message_bytes."),
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {_JSON_MEDIA: {"schema": body}}}
    return {"post": op}


def _list(op_id: str, summary: str, key: str, item: str, params: list[JSON], description: str = "") -> JSON:
    return {"get": {
        "operationId": op_id, "summary": summary, "description": description, "tags": ["lists"],
        "security": [{"bearer": []}],
        "parameters": params,
        "responses": {
            "200": _json({"type": "object", "required": [key],
                          "properties": {key: {"type": "array", "items": _ref(item)}}}, summary),
            "400": _error("Invalid query parameter."),
            **_AUTH_ERRORS,
        },
    }}


def _query(name: str, schema: JSON, description: str) -> JSON:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_TENANT_Q: Final = _query("tenant", {"type": "string"}, "Admins: limit to one tenant. Others: their own only.")
_LIMIT_Q: Final = _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                         "Most items returned")


def _commands() -> JSON:
    bodies: dict[str, tuple[str, JSON | None]] = {
        "login": ("Hot-desk login to a device; the agent becomes ready.", {
            "type": "object", "required": ["device"], "additionalProperties": False,
            "properties": {"device": {"type": "string", "examples": ["PJSIP/1001", "DAHDI/1"]}}}),
        "logout": ("Log out (not while reserved or on a call).", None),
        "ready": ("Become ready (from paused).", None),
        "pause": ("Pause with a reason code.", {
            "type": "object", "required": ["reason"], "additionalProperties": False,
            "properties": {"reason": {"type": "string", "examples": list(DEFAULT_PAUSE_REASONS),
                                      "description": "A configured reason code; default list: "
                                                     + ", ".join(DEFAULT_PAUSE_REASONS)}}}),
        "wrapup": ("End wrap-up: publishes call.wrapup, then the agent is ready.", {
            "type": "object", "required": ["call_id"], "additionalProperties": False,
            "properties": {"call_id": {"type": "string"}, "disposition": {"type": "string", "maxLength": 64},
                           "notes": {"type": "string", "maxLength": 4000}}}),
    }
    assert set(bodies) == set(COMMANDS), "every agent command is documented"
    return {f"/api/v1/agents/{{agent_id}}/{name}": _agent_command(name, summary, body)
            for name, (summary, body) in bodies.items()}


_CALL_PARAM: Final = {"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"},
                      "description": "The call's CTID_CALL_ID"}
_CALL_RESULT: Final = {"type": "object", "required": ["call_id", "state"], "properties": {
    "call_id": {"type": "string"}, "state": {"type": "string", "enum": [s.value for s in CallState]},
    "agent_id": _nullable("string")}}


def _call_op(op: str, summary: str, description: str, body: JSON | None, *, dial: bool = False) -> JSON:
    responses: JSON = {
        "200": _json({"type": "object", "required": ["call_id", "agent_id", "number", "direction"],
                      "properties": {"call_id": {"type": "string"}, "agent_id": {"type": "string"},
                                     "number": {"type": "string", "description": "E.164, as dialled"},
                                     "direction": {"const": "outbound"}}} if dial else _CALL_RESULT,
                     "The call (its new call_id for dial)."),
        "400": _error("Malformed JSON, unknown or invalid field."),
        "401": _error("Missing, invalid or expired token."),
        "403": _error("Not your call (agents act on their own calls; others on their tenant's), or the "
                      "number is outside the dialing allow-list (code number_not_allowed; logged)."),
        "404": _error("Unknown agent." if dial else "Unknown call (or queue for queue:<id>)."),
        "409": _error("Wrong state: error.state is the agent's (dial) or the call's current state. Code "
                      "gone: a channel of the call was already gone; the call was ended and the agent "
                      "released."),
        "413": _error("Body larger than max_message_bytes."),
        "502": _error("Asterisk refused the action (code asterisk_error)."),
        "503": _error("Call control is not wired."),
    }
    op_obj: JSON = {"operationId": f"call_{op}", "summary": summary, "description": description,
                    "tags": ["calls"], "security": [{"bearer": []}],
                    "parameters": [{"name": "agent_id", "in": "path", "required": True, "schema": {"type": "string"}}]
                    if dial else [_CALL_PARAM], "responses": responses}
    if body is not None:
        op_obj["requestBody"] = {"required": True, "content": {_JSON_MEDIA: {"schema": body}}}
    return {"post": op_obj}


def _call_ops() -> JSON:
    def one(name: str, description: str) -> JSON:
        return {"type": "object", "required": [name], "additionalProperties": False,
                "properties": {name: {"type": "string", "description": description}}}

    base = "/api/v1/calls/{call_id}"
    return {
        f"{base}/hold": _call_op("hold", "Hold the call (connected)",
                                 "Dual Redirect: the caller hears music, the agent leg waits. Publishes call.held.",
                                 None),
        f"{base}/resume": _call_op("resume", "Resume a held call",
                                   "AMI Bridge of both legs. Publishes call.resumed once they are bridged.", None),
        f"{base}/transfer": _call_op("transfer", "Blind transfer",
                                     "To an extension of dialing.transfer_context, an external number (checked "
                                     "against the dialing allow-list), or queue:<id> (back into ctid routing, "
                                     "keeping the original enqueue time when dialing.keep_enqueue_time). "
                                     "Publishes call.transferred; the call keeps its call_id.",
                                     one("target", "1002, +15551234567 or queue:<id>")),
        f"{base}/atxfer": _call_op("atxfer", "Attended transfer",
                                   "AMI Atxfer on the agent leg; the agent completes it by hanging up. "
                                   "Publishes call.transferred (kind attended).",
                                   one("exten", "An extension of dialing.transfer_context")),
        f"{base}/hangup": _call_op("hangup", "Hang the call up", "AMI Hangup of every live leg.", None),
        "/api/v1/agents/{agent_id}/dial": _call_op(
            "dial", "Click-to-dial",
            "Originates the agent's device into ctid-outbound, which then dials the number on the trunk. The "
            "call has the same lifecycle as inbound calls with direction outbound.",
            one("number", "E.164 or national (with dialing.default_country_code)"), dial=True),
    }


def document() -> JSON:
    """The OpenAPI 3.1 document (a fresh dict)."""
    paths: JSON = {
        "/api/v1/auth/login": {"post": {
            "operationId": "sign_in", "summary": "Desktop sign-in with the agent id and PIN or password",
            "description": "Returns a session token that expires after session_ttl seconds. Failed attempts "
                           "are limited per agent id and per client address (login_attempts_per_minute).",
            "tags": ["auth"], "security": [],
            "requestBody": {"required": True, "content": {_JSON_MEDIA: {"schema": {
                "type": "object", "required": ["agent_id", "secret"], "additionalProperties": False,
                "properties": {"agent_id": {"type": "string"}, "secret": {"type": "string", "maxLength": 1024}}}}}},
            "responses": {
                "200": _json({"type": "object", "required": ["token", "expires_at", "agent_id", "tenant"],
                              "properties": {"token": {"type": "string"}, "expires_at": _TS,
                                             "agent_id": {"type": "string"}, "tenant": {"type": "string"}}},
                             "Signed in."),
                "400": _error("Malformed JSON or fields."),
                "401": _error("Unknown agent or wrong secret."),
                "413": _error("Body too large."),
                "429": {**_error("Too many failed sign-ins."),
                        "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
            },
        }},
        **_commands(),
        **_call_ops(),
        "/api/v1/agents": _list("list_agents", "Agents and their state", "agents", "Agent", [_TENANT_Q],
                                "Agents see only themselves."),
        "/api/v1/calls": _list("list_calls", "Calls", "calls", "Call", [
            _query("state", {"type": "string", "enum": [s.value for s in CallState]},
                   "Only calls in this state. Without it: every active call. 'ended': recent ended calls "
                   "from the store (503 when no store is wired)."),
            _TENANT_Q, _LIMIT_Q], "Agents see only the calls they handle or that ring their device."),
        "/api/v1/queues": _list("list_queues", "Queues", "queues", "Queue", [_TENANT_Q],
                                "Statistics are placeholders (null) until the ACD issue fills them."),
        "/api/v1/events": {"get": {
            "operationId": "replay_events", "summary": "Replay events after a seq",
            "description": "The same replay as the websocket resume, for consumers that were offline. "
                           "Scoped like the websocket: agents get their own events, supervisors and "
                           "integrations their tenant's, admins all. A scoped slice has gaps in seq.",
            "tags": ["events"], "security": [{"bearer": []}],
            "parameters": [
                _query("after_seq", {"type": "integer", "minimum": 0, "default": 0}, "Events with a greater seq"),
                _LIMIT_Q,
                _query("types", {"type": "string"}, "Comma-separated event types"),
                _query("agent_id", {"type": "string"}, "Only this agent's events"),
                _query("call_id", {"type": "string"}, "Only this call's events"),
                _TENANT_Q,
            ],
            "responses": {
                "200": _json({"type": "object", "required": ["events", "last_seq", "more"], "properties": {
                    "events": {"type": "array", "items": _ref("Event")},
                    "last_seq": {"type": "integer", "description": "Pass as after_seq for the next page"},
                    "more": {"type": "boolean"}}}, "Events in seq order."),
                "400": _error("Invalid query parameter."),
                **_AUTH_ERRORS,
                "503": _error("Replay is unavailable (database down)."),
            },
        }},
        **_admin_paths(),
        "/api/v1/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document", "tags": ["meta"], "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {_JSON_MEDIA: {}}}}}},
        "/healthz": {"get": {
            "operationId": "healthz", "summary": "Readiness: AMI logged in and FastAGI listening",
            "tags": ["meta"], "security": [],
            "responses": {"200": _json(_ref("Health"), "Ready."),
                          "503": _json(_ref("Health"), "Not ready; reasons lists why.")}}},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics", "tags": ["meta"], "security": [],
            "responses": {"200": {"description": "Prometheus text format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/ws": {"get": {
            "operationId": "websocket", "summary": "Websocket: live events, resume, agent commands",
            "description": "See docs/websocket.md. Authenticate with the Authorization header or an "
                           "{\"op\": \"auth\"} first message.",
            "tags": ["events"], "security": [{"bearer": []}, {}],
            "responses": {"101": {"description": "Switching protocols"},
                          "400": _error("Not a websocket upgrade."),
                          "401": _error("Invalid token in the Authorization header.")}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "ctid API", "version": "1",
                 "description": "Agent commands, calls, queues, event replay and admin provisioning. Errors are "
                                "{\"error\": {\"code\", \"message\"}}."},
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An API token or a desktop session token"}},
        },
    }
