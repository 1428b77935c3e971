"""ctid configuration: one TOML file, validated with pydantic v2.

The config owns the organisation model that every other part uses:

* **tenants**: a BPO runs several client projects on one ctid; each tenant has a time
  zone that defines its "today" (for statistics and business hours);
* **service lines**: each belongs to a tenant and is matched by the DNIS (the number the
  caller dialled), and may send its calls straight to a queue;
* **agents** (with skills) and **queues** (with their routing rules, which
  :mod:`ctid.acd.rules` turns into plain values; skill expressions are parsed by
  :mod:`ctid.acd.expr`);
* **asterisk**: one or more AMI links.

Queue cross-checks (in :func:`reference_problems`): every ``queue:<id>`` target and
service-line ``queue`` names a queue of the same tenant, no queue targets itself, the
targets form no loop (a call keeps its enqueue time, so it would bounce for ever), and
every skill a queue names (``requires``, relaxation steps, ``weights``) is held by some
agent of that tenant in the file. The skill check is an error, not a warning, because
a typo there silently starves the queue; it is skipped for a tenant with no agents in
the file, whose agents live only in the database.

Every option has a default, documented in ``ctid.example.toml`` at the repository root
(keep the two in step: ``tests/test_config.py`` checks that the example loads and that
every field is mentioned in it). Ids are restricted to ``[A-Za-z0-9_.-]{1,64}`` so they
are safe in MQTT topics, file names and AMI values.

Secrets can come from the environment, which wins over the file:

* ``CTID_AMI_SECRET`` (all links) or ``CTID_AMI_SECRET_<LINKID>`` (one link, upper-case,
  ``-`` and ``.`` as ``_``);
* ``CTID_DB_URL``; ``CTID_MQTT_PASSWORD``.

:func:`load` raises :class:`ConfigError`, whose ``problems`` lists every error found
(file, dotted key and reason), so ``ctid check-config`` can print them all at once.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ctid.acd.expr import ExpressionError, is_skill_name, parse_expression
from ctid.asterisk.safety import (
    DialPolicy,
    UnsafeValueError,
    check_ami_value,
    check_context,
    check_extension,
    check_id,
)
from ctid.ids import Id
from ctid.ivr.model import FlowConfig, flow_problems

_DNIS_RE = re.compile(r"^(\+?[0-9*#]{1,32}|s)$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,253}$")
_E164_RE = re.compile(r"\+[1-9][0-9]{1,14}")
_TARGET_RE = re.compile(r"queue:(?P<queue>.+)|voicemail|callback|hangup")


def _no_crlf(value: str) -> str:
    try:
        return check_ami_value(value, "value")
    except UnsafeValueError:
        raise ValueError("must not contain CR, LF or NUL characters") from None


def _check_host(value: str) -> str:
    if not _HOST_RE.fullmatch(value):
        raise ValueError("must be a host name or an IP address")
    return value


def _check_expression(value: str) -> str:
    try:
        parse_expression(value)
    except ExpressionError as exc:
        raise ValueError(f"bad skill expression: {exc.one_line()}") from None
    return value


def _check_target(value: str) -> str:
    match = _TARGET_RE.fullmatch(value)
    queue = match.group("queue") if match else None
    if match is None or (queue is not None and not _valid_id(queue)):
        raise ValueError(f"{value!r} must be queue:<id>, voicemail, callback or hangup")
    return value


def _valid_id(value: str) -> bool:
    try:
        check_id(value)
    except UnsafeValueError:
        return False
    return True


SkillExpression = Annotated[str, AfterValidator(_check_expression)]
"""A skill expression (grammar in :mod:`ctid.acd.expr`), kept as the text."""
Target = Annotated[str, AfterValidator(_check_target)]
"""Where a call goes when it leaves a queue: ``queue:<id>``, ``voicemail``,
``callback`` or ``hangup``."""
Seconds = Annotated[float, Field(ge=0, le=86400)]
Host = Annotated[str, AfterValidator(_check_host)]
Port = Annotated[int, Field(ge=1, le=65535)]
BindPort = Annotated[int, Field(ge=0, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InstanceConfig(_Section):
    id: Id = "ctid-1"
    """Names this ctid in logs and in its MQTT status topic ``ctid/v1/status/{id}``."""


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: pretty on a terminal, JSON lines otherwise."""


class DatabaseConfig(_Section):
    url: str = "sqlite+aiosqlite:///ctid.db"
    """SQLAlchemy async URL. SQLite (embedded default) or ``postgresql+asyncpg://``."""

    @field_validator("url")
    @classmethod
    def _supported(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value


class MQTTConfig(_Section):
    host: str = ""
    """Broker host. Empty (the default) turns MQTT off; ctid logs that it is off."""
    port: Port = 1883
    username: str = ""
    password: SecretStr = SecretStr("")
    tls: bool = False
    ca_file: str = ""
    topic_prefix: str = "ctid"
    client_id: str = ""
    """Empty: derived from the instance id."""

    @field_validator("username", "client_id")
    @classmethod
    def _plain(cls, value: str) -> str:
        return _no_crlf(value)

    @field_validator("password")
    @classmethod
    def _password(cls, value: SecretStr) -> SecretStr:
        _no_crlf(value.get_secret_value())
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _check_host(value) if value else value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}(/[A-Za-z0-9_.-]{1,64})*", value):
            raise ValueError("must be slash-separated [A-Za-z0-9_.-] segments, no wildcards")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.host)


class ListenerConfig(_Section):
    bind: Host = "127.0.0.1"
    port: BindPort


class HTTPConfig(ListenerConfig):
    port: BindPort = 8080


class AGIConfig(ListenerConfig):
    port: BindPort = 4573
    env_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    """Seconds Asterisk has to send the whole ``agi_*`` environment."""
    hangup_grace: Annotated[float, Field(gt=0, le=30)] = 2.0
    """After a ``HANGUP`` line, seconds before ctid closes the session anyway (Asterisk
    keeps the channel alive until the socket closes)."""


class AsteriskConfig(_Section):
    id: Id = "pbx1"
    host: Host = "127.0.0.1"
    port: Port = 5038
    username: str = "ctid"
    secret: SecretStr = SecretStr("")
    """AMI secret; ``CTID_AMI_SECRET`` or ``CTID_AMI_SECRET_<ID>`` overrides it."""

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        _no_crlf(value.get_secret_value())  # it goes into the Login action as is
        return value
    connect_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    action_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    ping_interval: Annotated[float, Field(gt=0, le=300)] = 10.0
    ping_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    reconnect_min: Annotated[float, Field(gt=0, le=60)] = 0.5
    reconnect_max: Annotated[float, Field(gt=0, le=600)] = 30.0

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,80}", value):
            raise ValueError("must be 1-80 characters of [A-Za-z0-9_.@-]")
        return value

    @model_validator(mode="after")
    def _backoff(self) -> AsteriskConfig:
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be >= reconnect_min")
        return self


class TenantConfig(_Section):
    id: Id
    name: str = ""
    timezone: str = "UTC"
    """IANA zone name; defines the tenant's "today"."""

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class ServiceLineConfig(_Section):
    id: Id
    tenant: Id
    name: str = ""
    dnis: list[str] = Field(min_length=1)
    """Dialled numbers that select this line (exact match; ``s`` for no DNIS)."""
    crm: CRMConfig | None = None
    recording: Literal["always", "never", "on_demand"] = "never"
    """Recording policy carried by the screen pop (recording control comes later)."""
    queue: Id | None = None
    """Send calls straight to this queue (same tenant) with no IVR prompts."""
    flow: Id | None = None
    """Run this IVR flow (``[flows.<id>]``, same tenant) first; exclusive with ``queue``."""
    fallback_queue: Id | None = None
    """Where a call goes when its flow fails at run time (a ctid queue of the tenant);
    unset: the native fail-open queue (``CTID_ROUTE=fallback``)."""

    @model_validator(mode="after")
    def _queue_or_flow(self) -> ServiceLineConfig:
        if self.queue is not None and self.flow is not None:
            raise ValueError("give 'queue' (straight to a queue) or 'flow' (an IVR first), not both")
        return self

    @field_validator("dnis")
    @classmethod
    def _dnis(cls, value: list[str]) -> list[str]:
        for number in value:
            if not _DNIS_RE.fullmatch(number):
                raise ValueError(f"DNIS {number!r} must be digits (optionally +, *, #) or 's'")
        return value


class CRMConfig(_Section):
    """CRM lookup for the screen pop, run when the call starts (never on the offer path)."""

    url: str
    """URL template; ``{caller}``, ``{caller_e164}``, ``{dnis}``, ``{service_line}``,
    ``{tenant}``, ``{call_id}`` are replaced by URL-encoded values."""
    method: Literal["GET", "POST"] = "GET"
    timeout_ms: Annotated[int, Field(ge=10, le=30000)] = 800
    cache_ttl: Annotated[float, Field(ge=0, le=86400)] = 60.0
    """Seconds a result is reused for the same URL (0: no cache)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra request headers, e.g. an API key. Values may name an environment
    variable as ``env:NAME``."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL template")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", key) or any(c in val for c in "\r\n\0"):
                raise ValueError(f"header {key!r}: names are [A-Za-z0-9-], values have no CR/LF")
        return value


class EventsConfig(_Section):
    retention_days: Annotated[float, Field(gt=0, le=3650)] = 7.0
    """Outbox events older than this are pruned (replay cannot go further back)."""
    outbox_batch_ms: Annotated[int, Field(ge=1, le=10000)] = 50
    """The outbox writer commits at most this often."""
    outbox_max_buffer: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000
    """Events kept in memory while the database is down; past it the oldest are
    dropped from the outbox (still delivered live) and counted in a metric."""
    stats_interval: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """At most one ``queue.stats`` snapshot per queue per interval, only on change."""
    publish_timeout_ms: Annotated[int, Field(ge=1, le=10000)] = 150
    """Bound of ``publish_and_wait`` (the pop-before-ring wait)."""
    identify_grace: Annotated[float, Field(ge=0, le=60)] = 3.0
    """Seconds a new call's events wait for ctid's ``CTID_CALL_ID`` before they go
    out under Asterisk's Linkedid, so every event of a call carries one id."""


class APIConfig(_Section):
    session_ttl: Annotated[float, Field(gt=0, le=7 * 86400)] = 12 * 3600.0
    """Lifetime of a desktop sign-in session token, in seconds."""
    ws_queue: Annotated[int, Field(ge=10, le=100_000)] = 1000
    """Events queued per websocket before a slow client is closed with 1008."""
    max_message_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 65536
    """Largest websocket frame or HTTP body accepted."""
    login_attempts_per_minute: Annotated[int, Field(ge=1, le=1000)] = 5
    """Failed sign-ins allowed per agent id and per client address per minute."""


class TokenConfig(_Section):
    """An API token. Give ``token_sha256`` (hex SHA-256 of the token) in the file, or the
    token itself in the environment variable ``CTID_TOKEN_<NAME>``."""

    name: Id
    role: Literal["agent", "supervisor", "integration", "admin"]
    tenant: Id | None = None
    """The tenant the token may see; required except for ``admin``."""
    agent_id: Id | None = None
    """For ``agent`` tokens: the agent it acts as."""
    token_sha256: str = ""

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if value and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lower-case hex digits (sha256 of the token)")
        return value

    @model_validator(mode="after")
    def _scope(self) -> TokenConfig:
        if self.role != "admin" and self.tenant is None:
            raise ValueError(f"token {self.name!r}: tenant is required for role {self.role}")
        if self.role == "agent" and self.agent_id is None:
            raise ValueError(f"token {self.name!r}: agent_id is required for role agent")
        return self


class AgentConfig(_Section):
    """An agent, seeded from the config (the ACD issue moves provisioning to the DB)."""

    id: Id
    tenant: Id
    name: str = ""
    pin_hash: str = ""
    """Desktop sign-in secret, as made by ``ctid hash-secret`` (scrypt). Empty: no
    sign-in with a PIN or password; the agent needs an API token."""
    skills: dict[str, Annotated[int, Field(ge=1, le=10)]] = Field(default_factory=dict)
    max_calls: Annotated[int, Field(ge=1, le=10)] = 1

    @field_validator("skills")
    @classmethod
    def _skill_names(cls, value: dict[str, int]) -> dict[str, int]:
        for name in value:
            if not is_skill_name(name):
                raise ValueError(f"skill {name!r} must be name or name:value of [A-Za-z0-9_.-], "
                                 "so an expression can name it")
        return value

    @field_validator("pin_hash")
    @classmethod
    def _hash(cls, value: str) -> str:
        if value:
            from ctid.api.auth import check_secret_hash  # lazy: the API imports this module

            try:
                check_secret_hash(value)
            except ValueError:
                raise ValueError("is not a hash from `ctid hash-secret`") from None
        return value


class RelaxStepConfig(_Section):
    """One relaxation step: once it applies, its ``requires`` replaces the queue's.

    A step applies when the call has waited ``after`` seconds **and**, if set, the
    call's EWT is at least ``ewt_s`` **and**, if set, at least ``depth`` calls are
    waiting in the queue. Of the steps that apply, the last one in the list wins."""

    after: Seconds = 0.0
    """Seconds of waiting (steps must be listed in non-decreasing ``after``)."""
    ewt_s: Seconds | None = None
    depth: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    requires: SkillExpression


class StickyConfig(_Section):
    """Offer a call to the agent who last handled this caller in this queue."""

    days: Annotated[float, Field(gt=0, le=366)] = 7.0
    """How long the last agent is remembered."""
    wait_s: Annotated[float, Field(gt=0, le=3600)] = 20.0
    """How long the call waits for that agent before any eligible agent may take it."""


class CallbackConfig(_Section):
    """``[queues.callback]``: callback in queue. A waiting caller who presses ``dtmf`` at
    a hold check-in (or overflows to ``callback``) leaves their caller ID as the number
    to call back and hangs up, keeping their place; ctid calls back when their turn
    comes (``ctid.acd.callbacks``)."""

    enabled: bool = False
    dtmf: Annotated[str, Field(pattern=r"^[0-9*#]$")] = "1"
    """The key offered at each hold check-in."""
    attempts: Annotated[int, Field(ge=1, le=20)] = 3
    """Calls to the customer before the callback fails."""
    retry_s: Annotated[float, Field(ge=1, le=86400)] = 120.0
    """Seconds between a failed attempt and the next."""
    expiry_s: Annotated[float, Field(ge=10, le=7 * 86400)] = 3600.0
    """A callback not served this many seconds after it was left expires."""
    prompt: Annotated[str, Field(pattern=r"^/?[A-Za-z0-9_][A-Za-z0-9_/.-]{0,199}$")] = "beep"
    """Sound played at the check-in with the key as escape digit ("press 1 to be called
    back"). Asterisk's core sounds have no such prompt: record your own."""


class OverflowConfig(_Section):
    """Send the call elsewhere once it has waited ``after_s`` **or** its EWT is at least
    ``ewt_s`` (whichever happens first; at least one must be set)."""

    after_s: Annotated[float, Field(gt=0, le=86400)] | None = None
    ewt_s: Annotated[float, Field(gt=0, le=86400)] | None = None
    target: Target

    @model_validator(mode="after")
    def _when(self) -> OverflowConfig:
        if self.after_s is None and self.ewt_s is None:
            raise ValueError("overflow needs after_s, ewt_s or both")
        if self.target == "hangup":
            raise ValueError("overflow target must be queue:<id>, voicemail or callback "
                             "(max_wait_s ends the wait)")
        return self


class QueueConfig(_Section):
    """A ctid queue and its routing rules (see :mod:`ctid.acd.rules` for the meaning).

    Every option has a default; no limit (max wait, max length) applies unless set."""

    id: Id
    tenant: Id
    name: str = ""
    requires: SkillExpression = "*"
    """Which agents of the tenant may take the calls; ``*`` is any agent."""
    policy: Literal["longest-idle", "most-skilled", "least-occupied", "round-robin"] = "longest-idle"
    weights: dict[str, Annotated[float, Field(ge=0, le=100)]] = Field(default_factory=dict)
    """``most-skilled`` score weight per skill name or ``family:*`` (default 1.0)."""
    relax: list[RelaxStepConfig] = Field(default_factory=list)
    priority: Annotated[int, Field(ge=0, le=9)] = 5
    """Priority of the queue's calls, 0-9, 9 highest (the IVR or CRM may set another)."""
    vip_numbers: list[str] = Field(default_factory=list)
    """Caller numbers (E.164, exact) whose calls get ``vip_priority``."""
    vip_priority: Annotated[int, Field(ge=0, le=9)] = 9
    sticky: StickyConfig | None = None
    overflow: OverflowConfig | None = None
    callback: CallbackConfig = Field(default_factory=CallbackConfig)
    """Callback in queue (off unless ``enabled``)."""
    max_wait_s: Annotated[float, Field(gt=0, le=86400)] | None = None
    max_wait_action: Target = "voicemail"
    max_queue_length: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Calls waiting at most; a call arriving at a full queue gets ``full_action``."""
    full_action: Target = "voicemail"
    closed: bool = False
    """A closed queue takes no calls: they get ``closed_action`` at once."""
    closed_action: Target = "voicemail"
    wrapup_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    """After-call work before the agent is ready again; 0: ready at hangup."""
    ring_timeout_s: Annotated[float, Field(ge=1, le=300)] = 15.0
    """Ring the agent this long before RONA."""
    checkin_s: Annotated[float, Field(ge=1, le=10)] = 5.0
    """Hold check-in interval (FastAGI from ctid-hold), at most 10 s."""
    short_abandon_s: Annotated[float, Field(ge=0, le=600)] = 5.0
    """Abandons sooner than this are short abandons (left out of the service level)."""
    sl_threshold_s: Annotated[float, Field(gt=0, le=3600)] = 20.0
    """Service level: answered within this many seconds."""
    announce: list[Literal["position", "ewt"]] = Field(default_factory=list)
    """What the hold check-in tells a waiting caller: their position and/or the
    estimated wait (app_queue's ``queue-*`` sounds and ``digits/*``). Empty: nothing."""
    announce_every_s: Annotated[float, Field(ge=5, le=3600)] = 30.0
    """Seconds between two announcements to the same caller (the first comes at the
    first check-in)."""
    survey_flow: Id | None = None
    """Post-call survey: once the agent hangs up, the caller goes to this flow (its
    ``survey`` nodes score 1-5). Unset: no survey."""

    @field_validator("relax")
    @classmethod
    def _sorted(cls, value: list[RelaxStepConfig]) -> list[RelaxStepConfig]:
        for i in range(1, len(value)):
            if value[i].after < value[i - 1].after:
                raise ValueError(f"steps must be sorted by after: step {i} (after = {value[i].after:g}) "
                                 f"comes after step {i - 1} (after = {value[i - 1].after:g})")
        return value

    @field_validator("weights")
    @classmethod
    def _weight_names(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            if not is_skill_name(name, allow_wildcard=True):
                raise ValueError(f"weight key {name!r} must be a skill name or family:*")
        return value

    @field_validator("vip_numbers")
    @classmethod
    def _e164(cls, value: list[str]) -> list[str]:
        for number in value:
            if not _E164_RE.fullmatch(number):
                raise ValueError(f"VIP number {number!r} must be E.164, e.g. +442071234567")
        return value


class SimulatorConfig(_Section):
    """The built-in Asterisk simulator used by ``ctid demo``."""

    calls_per_minute: Annotated[float, Field(ge=0, le=60000)] = 30.0
    time_scale: Annotated[float, Field(gt=0, le=100)] = 1.0
    """Real seconds per simulated second: 0.1 runs the simulator's timers (rings,
    waits, hold music) ten times faster than real time."""


class DialingConfig(_Section):
    """``[dialing]``: numbers ctid dials itself (click-to-dial, transfer to a number).

    ``allowed_prefixes`` are E.164 prefixes (``"+1"``, ``"+4420"``); empty allows
    nothing (toll-fraud guard, ``ctid.asterisk.safety.DialPolicy``).
    ``denied_prefixes`` win over the allow-list. ``default_country_code`` lets
    agents type national numbers. ``trunk`` is the PJSIP endpoint outbound calls
    leave by (the dialplan's ``CTID_TRUNK``). ``transfer_context`` is the dialplan
    context of extensions a call may be transferred to; ``keep_enqueue_time``:
    a transfer to a ctid queue keeps the call's original enqueue time.
    """

    allowed_prefixes: list[str] = Field(default_factory=list)
    denied_prefixes: list[str] = Field(default_factory=list)
    default_country_code: str | None = None
    trunk: str = "trunk"
    transfer_context: str = "from-agents"
    keep_enqueue_time: bool = True

    @model_validator(mode="after")
    def _policy(self) -> DialingConfig:
        DialPolicy(self.allowed_prefixes, denied_prefixes=self.denied_prefixes,
                   default_country_code=self.default_country_code)
        try:
            check_extension(self.trunk, "trunk")
            check_context(self.transfer_context, "transfer_context")
        except UnsafeValueError as exc:
            raise ValueError(str(exc)) from None
        return self


class AcdConfig(_Section):
    """``[acd]``: the ACD's link to the native fail-open queue (``asterisk-conf/queues.conf``).

    ``sync_fallback_members``: while ctid runs, it keeps the members of the native queue
    ``fallback_queue`` equal to the devices of its logged-in agents, over AMI
    (``QueueAdd``/``QueueRemove``/``QueuePause``, :mod:`ctid.acd.fallback`); off (the
    default), the static ``member =>`` lines the admin maintains in ``queues.conf`` are
    the members. ``fallback_queue`` must match the dialplan's ``CTID_FALLBACK_QUEUE``.
    """

    sync_fallback_members: bool = False
    fallback_queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")] = "ctid-fallback"
    pop_lead_ms: Annotated[int, Field(ge=0, le=1000)] = 20
    """Milliseconds between the pop's ``publish_and_wait`` and the ring (the Redirect, or a
    callback's Originate). The broker's PUBACK says it has the pop, not that the agent's
    desktop has read it: delivery to subscribers can take a few ms more on a busy host.
    0: ring at once."""


class Config(_Section):
    instance: InstanceConfig = InstanceConfig()
    log: LogConfig = LogConfig()
    database: DatabaseConfig = DatabaseConfig()
    mqtt: MQTTConfig = MQTTConfig()
    http: HTTPConfig = HTTPConfig()
    agi: AGIConfig = AGIConfig()
    asterisk: list[AsteriskConfig] = Field(default_factory=lambda: [AsteriskConfig()])
    tenants: list[TenantConfig] = Field(default_factory=lambda: [TenantConfig(id="default")])
    service_lines: list[ServiceLineConfig] = Field(default_factory=list)
    events: EventsConfig = EventsConfig()
    api: APIConfig = APIConfig()
    tokens: list[TokenConfig] = Field(default_factory=list)
    agents: list[AgentConfig] = Field(default_factory=list)
    pause_reasons: list[Id] = Field(default_factory=lambda: ["break", "lunch", "training", "meeting"])
    """Reason codes an agent may pause with (``rona`` is always added: ctid sets it)."""
    queues: list[QueueConfig] = Field(default_factory=list)
    simulator: SimulatorConfig = SimulatorConfig()
    dialing: DialingConfig = DialingConfig()
    acd: AcdConfig = AcdConfig()
    flows: dict[Id, FlowConfig] = Field(default_factory=dict)
    """IVR flows by id (see :mod:`ctid.ivr.model` and ``docs/ivr.md``)."""

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems = reference_problems(self.model_dump(mode="python"))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def tenant(self, tenant_id: str) -> TenantConfig:
        for tenant in self.tenants:
            if tenant.id == tenant_id:
                return tenant
        raise KeyError(tenant_id)

    def queue(self, queue_id: str) -> QueueConfig:
        for queue in self.queues:
            if queue.id == queue_id:
                return queue
        raise KeyError(queue_id)

    def line_for_dnis(self, dnis: str) -> ServiceLineConfig | None:
        """The service line whose DNIS list contains ``dnis`` exactly."""
        for line in self.service_lines:
            if dnis in line.dnis:
                return line
        return None


def _items(data: Mapping[str, Any], section: str) -> list[Mapping[str, Any]]:
    value = data.get(section)
    if not isinstance(value, list):
        return []
    return [item if isinstance(item, Mapping) else {} for item in value]


def reference_problems(data: Mapping[str, Any]) -> list[str]:
    """Cross-references between sections (``key: reason`` strings).

    Works on plain data, so ``check-config`` can run it even when some fields are
    invalid and report those problems together with the field errors."""
    problems: list[str] = []
    sections = {"asterisk": "id", "tenants": "id", "service_lines": "id", "tokens": "name",
                "agents": "id", "queues": "id"}
    for section, key in sections.items():
        _unique(problems, section, [str(item.get(key, "")) for item in _items(data, section)])
    tenants = {item.get("id") for item in _items(data, "tenants")} if "tenants" in data else {"default"}
    agents = {item.get("id"): item for item in _items(data, "agents")}
    for section in ("agents", "queues", "service_lines"):
        for i, item in enumerate(_items(data, section)):
            owner = item.get("tenant")
            if isinstance(owner, str) and owner not in tenants:
                problems.append(f"{section}[{i}].tenant: unknown tenant {owner!r}")
    for i, token in enumerate(_items(data, "tokens")):
        owner = token.get("tenant")
        if isinstance(owner, str) and owner not in tenants:
            problems.append(f"tokens[{i}].tenant: unknown tenant {owner!r}")
        agent_id = token.get("agent_id")
        if isinstance(agent_id, str):
            agent = agents.get(agent_id)
            if agent is None:
                problems.append(f"tokens[{i}].agent_id: unknown agent {agent_id!r}")
            elif agent.get("tenant") != owner:
                problems.append(f"tokens[{i}].agent_id: agent {agent_id!r} is in tenant {agent.get('tenant')!r}")
    seen: dict[str, str] = {}
    for i, line in enumerate(_items(data, "service_lines")):
        numbers = line.get("dnis")
        for number in numbers if isinstance(numbers, list) else []:
            other = seen.setdefault(str(number), str(line.get("id")))
            if other != str(line.get("id")):
                problems.append(f"service_lines[{i}].dnis: {number!r} is already used by line {other!r}")
    if "asterisk" in data and not _items(data, "asterisk"):
        problems.append("asterisk: at least one [[asterisk]] link is required")
    _queue_problems(data, problems)
    _flow_problems(data, problems)
    return problems


def _flow_problems(data: Mapping[str, Any], problems: list[str]) -> None:
    """IVR flows: their graphs, and the flows and queues that lines, queues and nodes name."""
    flows = data.get("flows")
    flows = flows if isinstance(flows, Mapping) else {}
    tenants = {item.get("id") for item in _items(data, "tenants")} if "tenants" in data else {"default"}
    queues = {item.get("id"): item for item in _items(data, "queues")}
    for flow_id, flow in flows.items():
        if not isinstance(flow, Mapping):
            continue
        problems.extend(flow_problems(str(flow_id), flow))
        owner = flow.get("tenant")
        if isinstance(owner, str) and owner not in tenants:
            problems.append(f"flows.{flow_id}.tenant: unknown tenant {owner!r}")
        nodes = flow.get("nodes")
        for node_id, node in (nodes.items() if isinstance(nodes, Mapping) else ()):
            ident = node.get("queue") if isinstance(node, Mapping) else None
            if isinstance(ident, str):
                _same_tenant_queue(problems, f"flows.{flow_id}.nodes.{node_id}.queue", ident, owner, queues)

    def same_tenant_flow(key: str, ident: str, tenant: object) -> None:
        flow = flows.get(ident)
        if not isinstance(flow, Mapping):
            problems.append(f"{key}: unknown flow {ident!r}")
        elif flow.get("tenant") != tenant:
            problems.append(f"{key}: flow {ident!r} is in tenant {flow.get('tenant')!r}")

    for i, line in enumerate(_items(data, "service_lines")):
        if isinstance(line.get("flow"), str):
            same_tenant_flow(f"service_lines[{i}].flow", line["flow"], line.get("tenant"))
        if isinstance(line.get("fallback_queue"), str):
            _same_tenant_queue(problems, f"service_lines[{i}].fallback_queue", line["fallback_queue"],
                               line.get("tenant"), queues)
    for i, queue in enumerate(_items(data, "queues")):
        if isinstance(queue.get("survey_flow"), str):
            same_tenant_flow(f"queues[{i}].survey_flow", queue["survey_flow"], queue.get("tenant"))


_QUEUE_ACTIONS = ("overflow.target", "max_wait_action", "full_action", "closed_action")


def _queue_problems(data: Mapping[str, Any], problems: list[str]) -> None:
    """Queue references: targets, service-line queues, routing loops, unknown skills."""
    queues = {item.get("id"): item for item in _items(data, "queues")}
    for i, line in enumerate(_items(data, "service_lines")):
        ident = line.get("queue")
        if isinstance(ident, str):
            _same_tenant_queue(problems, f"service_lines[{i}].queue", ident, line.get("tenant"), queues)
    edges: dict[str, set[str]] = {}
    for i, queue in enumerate(_items(data, "queues")):
        for key in _QUEUE_ACTIONS:
            section, _, field = key.rpartition(".")
            holder = queue.get(section) if section else queue
            value = holder.get(field) if isinstance(holder, Mapping) else None
            target = value[6:] if isinstance(value, str) and value.startswith("queue:") else None
            if target is None or not _valid_id(target):
                continue  # not a queue, or a field error already
            if target == queue.get("id"):
                problems.append(f"queues[{i}].{key}: a queue cannot send calls to itself")
            elif _same_tenant_queue(problems, f"queues[{i}].{key}", target, queue.get("tenant"), queues):
                edges.setdefault(str(queue.get("id")), set()).add(target)
    _loop_problems(problems, [str(item.get("id")) for item in _items(data, "queues")], edges)
    _skill_problems(data, problems)


def _same_tenant_queue(problems: list[str], key: str, ident: str, tenant: object,
                       queues: Mapping[object, Mapping[str, Any]]) -> bool:
    target = queues.get(ident)
    if target is None:
        problems.append(f"{key}: unknown queue {ident!r}")
        return False
    if target.get("tenant") != tenant:
        problems.append(f"{key}: queue {ident!r} is in tenant {target.get('tenant')!r}")
        return False
    return True


def _loop_problems(problems: list[str], order: list[str], edges: Mapping[str, set[str]]) -> None:
    # A call sent round a loop keeps its enqueue time, so it would bounce for ever.
    # Depth-first search with colours: reaching a queue still on the path is a loop.
    done: set[str] = set()
    for start in order:
        if start in done:
            continue
        path = [start]
        stack = [iter(sorted(edges.get(start, ())))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done.add(path.pop())
            elif nxt in path:
                loop = " -> ".join([*path[path.index(nxt):], nxt])
                problems.append(f"queues[{order.index(nxt)}]: calls would loop between queues {loop}")
            elif nxt not in done:
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))


def _skill_problems(data: Mapping[str, Any], problems: list[str]) -> None:
    """Skills a queue names that no agent of its tenant in this file has (likely typos).

    Only checked for tenants with agents in the file: agents provisioned in the
    database alone are not known to ``check-config``."""
    held: dict[object, set[str]] = {}
    for agent in _items(data, "agents"):
        skills = agent.get("skills")
        names = held.setdefault(agent.get("tenant"), set())
        if isinstance(skills, Mapping):
            names.update(str(name) for name in skills)
    for i, queue in enumerate(_items(data, "queues")):
        known = held.get(queue.get("tenant"))
        if known is None:
            continue
        named: list[tuple[str, set[str]]] = []
        texts = [(f"queues[{i}].requires", queue.get("requires"))]
        steps = queue.get("relax")
        for j, step in enumerate(steps if isinstance(steps, list) else []):
            text = step.get("requires") if isinstance(step, Mapping) else None
            texts.append((f"queues[{i}].relax[{j}].requires", text))
        for key, text in texts:
            try:
                expr = parse_expression(text) if isinstance(text, str) else None
            except ExpressionError:
                expr = None  # reported as a field error
            if expr is not None:
                named.append((key, set(expr.skill_names())))
        weights = queue.get("weights")
        if isinstance(weights, Mapping):
            named.append((f"queues[{i}].weights", {str(name) for name in weights}))
        for key, names in named:
            unknown = sorted(name for name in names if not _skill_known(name, known))
            if unknown:
                problems.append(f"{key}: no agent of tenant {queue.get('tenant')!r} has skill "
                                + ", ".join(repr(name) for name in unknown))


def _skill_known(name: str, known: set[str]) -> bool:
    if name.endswith(":*"):
        prefix = name[:-1]
        return any(skill.startswith(prefix) for skill in known)
    return name in known


def _unique(problems: list[str], section: str, ids: list[str]) -> None:
    seen: set[str] = set()
    for i, ident in enumerate(ids):
        if ident in seen:
            problems.append(f"{section}[{i}].id: duplicate id {ident!r}")
        seen.add(ident)


@dataclass(frozen=True)
class Problem:
    file: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.reason}"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if i == 4 and loc[0] == "flows" and loc[2] == "nodes":
            continue  # pydantic's tag of the node-type union: flows.<id>.nodes.<node>.<type>.field
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    data = dict(data)
    if "CTID_DB_URL" in env:
        data["database"] = {**data.get("database", {}), "url": env["CTID_DB_URL"]}
    if "CTID_MQTT_PASSWORD" in env:
        data["mqtt"] = {**data.get("mqtt", {}), "password": env["CTID_MQTT_PASSWORD"]}
    links = data.get("asterisk")
    if links is None:
        links = [{}]
    if isinstance(links, list):
        patched = []
        for link in links:
            if isinstance(link, dict):
                link = dict(link)
                ident = str(link.get("id", "pbx1"))
                key = "CTID_AMI_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", ident).upper()
                if key in env:
                    link["secret"] = env[key]
                elif "CTID_AMI_SECRET" in env:
                    link["secret"] = env["CTID_AMI_SECRET"]
            patched.append(link)
        data["asterisk"] = patched
    return data


def parse(data: dict[str, Any], *, source: str = "<config>",
          env: Mapping[str, str] | None = None) -> Config:
    """Validate already-parsed TOML data (environment overrides applied first)."""
    data = _apply_env(data, os.environ if env is None else env)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems: list[Problem] = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            if not loc:
                problems.extend(_split_model_problems(source, msg))
            else:
                problems.append(Problem(source, _dotted(loc), msg))
        # The cross-reference check only runs inside pydantic when every field is
        # valid; run it on the raw data too, so one pass lists every problem.
        known = {(p.key, p.reason) for p in problems}
        for extra in _split_model_problems(source, "; ".join(reference_problems(data))):
            if extra.key and (extra.key, extra.reason) not in known:
                problems.append(extra)
        raise ConfigError(problems) from None


def _split_model_problems(source: str, msg: str) -> list[Problem]:
    out = []
    for part in msg.split("; "):
        key, _, reason = part.partition(": ")
        out.append(Problem(source, key, reason))
    return out


def load(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML file. Raises :class:`ConfigError` listing every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(str(path), "(file)", f"cannot read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([Problem(str(path), "(file)", "not valid UTF-8")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), "(syntax)", str(exc))]) from None
    return parse(data, source=str(path), env=env)
