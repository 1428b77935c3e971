"""Who is calling: API tokens, desktop sign-in sessions, roles and tenant scope.

Two kinds of bearer token, used the same way (``Authorization: Bearer <token>`` on
REST and on the websocket upgrade, or the websocket ``auth`` op):

* **API tokens** from the config (:class:`ctid.config.TokenConfig`): the file holds
  only ``token_sha256``; or the token itself comes from the environment variable
  ``CTID_TOKEN_<NAME>`` (name upper-cased, ``-`` and ``.`` as ``_``), which wins.
  A presented token is hashed and compared with every configured digest in constant
  time (:func:`hmac.compare_digest`, no early exit).
* **Session tokens** from the desktop sign-in (``POST /api/v1/auth/login`` with the
  agent id and PIN or password): 32 random bytes, URL-safe; only their SHA-256 is
  kept, in memory, for ``APIConfig.session_ttl`` seconds. The lookup is a dict keyed
  by that digest: an attacker cannot choose digests, so its timing tells nothing.
  A restart signs every desktop out.

PINs and passwords are stored as :func:`hash_secret` makes them (scrypt). Failed
sign-ins are counted per agent id and per client address over a sliding minute; past
``APIConfig.login_attempts_per_minute`` the next attempt is refused with
:class:`RateLimited` before the secret is even checked (an attempt counts as failed
until it succeeds, so parallel guesses cannot slip through).

Roles and scope (:class:`Principal`):

* ``agent``: its own events and state, and commands on itself only;
* ``supervisor``: every event of its tenant, and commands on any agent of it;
* ``integration`` (a CRM): every event of its tenant, read-only on agents;
* ``admin``: everything, every tenant.

Nothing here logs a token, a digest or a secret: log lines name the token (its
config ``name``) or the agent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import functools
import hashlib
import hmac
import math
import os
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import structlog

from ctid.config import AgentConfig, APIConfig, TokenConfig
from ctid.events.schema import Event

__all__ = [
    "AuthError",
    "Authenticator",
    "Principal",
    "RateLimited",
    "Role",
    "SignInRejected",
    "check_secret_hash",
    "hash_secret",
    "token_env_name",
    "verify_secret",
]

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

# scrypt parameters for new hashes (RFC 7914; 16 MiB of memory per hash).
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16
_KEY_BYTES: Final = 32
# Bounds for hashes read from the config, so a hostile value cannot exhaust memory.
_MAX_N: Final = 2**20
_MAX_RP: Final = 64
_SCRYPT_MAXMEM: Final = 256 * 1024 * 1024
_SESSION_BYTES: Final = 32
_SESSIONS_PER_AGENT: Final = 20
_LIMITER_KEYS: Final = 10_000
_WINDOW: Final = timedelta(minutes=1)
#: scrypt checks running at once (each takes 16 MiB and tens of ms of CPU in a thread).
_CONCURRENT_CHECKS: Final = 4


class Role(enum.StrEnum):
    AGENT = "agent"
    SUPERVISOR = "supervisor"
    INTEGRATION = "integration"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``tenant`` is None only for ``admin``."""

    name: str
    role: Role
    tenant: str | None
    agent_id: str | None = None
    expires_at: datetime | None = None

    def may_read_tenant(self, tenant: str | None) -> bool:
        return self.role is Role.ADMIN or (tenant is not None and tenant == self.tenant)

    def sees(self, event: Event) -> bool:
        """Whether this caller may receive ``event`` (websocket push, replay)."""
        if self.role is Role.ADMIN:
            return True
        if event.tenant != self.tenant:
            return False
        if self.role is Role.AGENT:
            return event.agent_id is not None and event.agent_id == self.agent_id
        return True

    def sees_agent(self, agent_id: str, tenant: str) -> bool:
        """Whether this caller may see the agent's state (``GET /api/v1/agents``)."""
        if self.role is Role.AGENT:
            return agent_id == self.agent_id
        return self.may_read_tenant(tenant)

    def may_command(self, agent_id: str, tenant: str) -> bool:
        """Whether this caller may send agent commands (login, pause, ...) for the agent."""
        if self.role is Role.AGENT:
            return agent_id == self.agent_id and tenant == self.tenant
        if self.role is Role.SUPERVISOR:
            return tenant == self.tenant
        return self.role is Role.ADMIN

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class AuthError(Exception):
    """No valid credentials (HTTP 401). The message never contains the token."""


class SignInRejected(AuthError):
    """Wrong agent id or secret (one message for both, so ids cannot be probed)."""


class RateLimited(Exception):
    """Too many failed sign-ins; retry after ``retry_after`` whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed sign-ins; retry in {retry_after} s")
        self.retry_after = retry_after


# --------------------------------------------------------------------------- secrets


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_secret(secret: str) -> str:
    """Hash a desktop PIN or password for ``AgentConfig.pin_hash``.

    scrypt with n=2**14, r=8, p=1 and a random 16-byte salt, written as
    ``scrypt$n$r$p$salt_b64$hash_b64`` (standard base64).
    """
    salt = os.urandom(_SALT_BYTES)
    key = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                         maxmem=_SCRYPT_MAXMEM, dklen=_KEY_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


@dataclass(frozen=True, slots=True)
class _ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _parse_hash(encoded: str) -> _ScryptHash:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not a scrypt$n$r$p$salt$hash secret hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("malformed scrypt parameters or base64") from None
    if n < 2 or n > _MAX_N or n & (n - 1) or not 1 <= r <= _MAX_RP or not 1 <= p <= _MAX_RP:
        raise ValueError(f"scrypt parameters out of range (n a power of 2 up to {_MAX_N}, r and p 1..{_MAX_RP})")
    if len(salt) < 8 or not 16 <= len(key) <= 64:
        raise ValueError("scrypt salt or hash too short")
    return _ScryptHash(n, r, p, salt, key)


def check_secret_hash(encoded: str) -> None:
    """Raise ValueError unless ``encoded`` is a hash :func:`verify_secret` can check
    (for config validation)."""
    _parse_hash(encoded)


def verify_secret(secret: str, encoded: str) -> bool:
    """Whether ``secret`` matches ``encoded`` (from :func:`hash_secret`). A malformed
    hash never matches. CPU-heavy (tens of ms): call it off the event loop."""
    try:
        parsed = _parse_hash(encoded)
    except ValueError:
        return False
    key = hashlib.scrypt(secret.encode("utf-8"), salt=parsed.salt, n=parsed.n, r=parsed.r, p=parsed.p,
                         maxmem=_SCRYPT_MAXMEM, dklen=len(parsed.key))
    return hmac.compare_digest(key, parsed.key)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_env_name(name: str) -> str:
    """``CTID_TOKEN_<NAME>``: the variable that holds the token named ``name``."""
    return "CTID_TOKEN_" + re.sub(r"[-.]", "_", name).upper()


# --------------------------------------------------------------------------- rate limit


class _FailureWindow:
    """Failed attempts per key over a sliding minute, bounded in keys."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._hits: dict[str, deque[datetime]] = {}

    def _live(self, key: str, now: datetime) -> deque[datetime] | None:
        hits = self._hits.get(key)
        if hits is None:
            return None
        while hits and now - hits[0] >= _WINDOW:
            hits.popleft()
        if not hits:
            del self._hits[key]
            return None
        return hits

    def retry_after(self, key: str, now: datetime) -> int | None:
        """Seconds until ``key`` may try again, or None if it may now."""
        hits = self._live(key, now)
        if hits is None or len(hits) < self.limit:
            return None
        return max(1, math.ceil((hits[0] + _WINDOW - now).total_seconds()))

    def add(self, key: str, now: datetime) -> None:
        hits = self._live(key, now)
        if hits is None:
            if len(self._hits) >= _LIMITER_KEYS:
                self._prune(now)
            hits = self._hits[key] = deque()
        hits.append(now)

    def forget_one(self, key: str, at: datetime) -> None:
        hits = self._hits.get(key)
        if hits is not None:
            try:
                hits.remove(at)
            except ValueError:
                pass
            if not hits:
                del self._hits[key]

    def _prune(self, now: datetime) -> None:
        for key in list(self._hits):
            self._live(key, now)
        while len(self._hits) >= _LIMITER_KEYS:  # still full: forget the oldest keys
            del self._hits[next(iter(self._hits))]


# --------------------------------------------------------------------------- authenticator


@dataclass(frozen=True, slots=True)
class _Session:
    principal: Principal
    expires_at: datetime


@functools.cache
def _dummy_hash() -> str:
    """A real scrypt hash to check when the agent is unknown or has no secret, so that
    refusal takes as long as a wrong PIN (its own secret is random and unknown)."""
    return hash_secret(secrets.token_urlsafe(16))


def _check_secret(secret: str, encoded: str | None) -> bool:
    """``verify_secret``, against the dummy hash when there is no real one (in a thread)."""
    return verify_secret(secret, encoded if encoded is not None else _dummy_hash()) and encoded is not None


class Authenticator:
    """Resolves bearer tokens to a :class:`Principal` and runs desktop sign-ins."""

    def __init__(self, tokens: Iterable[TokenConfig], agents: Iterable[AgentConfig], api: APIConfig, *,
                 env: Mapping[str, str] | None = None, clock: Clock) -> None:
        env = os.environ if env is None else env
        self._clock = clock
        self._ttl = timedelta(seconds=api.session_ttl)
        self._agents: dict[str, AgentConfig] = {a.id: a for a in agents}
        self._tokens: list[tuple[str, Principal]] = []
        for token in tokens:
            secret = env.get(token_env_name(token.name))
            digest = _digest(secret) if secret else token.token_sha256
            if not digest:
                log.warning("auth.token_inactive", token=token.name,
                            reason=f"no token_sha256 and no {token_env_name(token.name)}")
                continue
            self._tokens.append((digest, Principal(token.name, Role(token.role), token.tenant, token.agent_id)))
        self._sessions: dict[str, _Session] = {}
        self._by_agent: dict[str, deque[str]] = {}
        self._failures_by_agent = _FailureWindow(api.login_attempts_per_minute)
        self._failures_by_client = _FailureWindow(api.login_attempts_per_minute)
        self._checks = asyncio.Semaphore(_CONCURRENT_CHECKS)
        self.sign_in_failures = 0
        self.rate_limited = 0

    # -- tokens ---------------------------------------------------------------------------

    def authenticate(self, token: str) -> Principal:
        """The principal for a bearer token; raises :class:`AuthError`."""
        if not token:
            raise AuthError("missing token")
        digest = _digest(token)
        found: Principal | None = None
        for known, principal in self._tokens:  # no early exit: constant time over the list
            if hmac.compare_digest(known, digest):
                found = principal
        if found is not None:
            return found
        session = self._sessions.get(digest)
        if session is not None:
            if self._clock() < session.expires_at:
                return session.principal
            self._drop_session(digest)
            raise AuthError("session expired")
        raise AuthError("invalid token")

    def bearer(self, header: str | None) -> Principal:
        """The principal for an ``Authorization`` header value; raises :class:`AuthError`."""
        if not header:
            raise AuthError("missing Authorization header")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization must be 'Bearer <token>'")
        return self.authenticate(token.strip())

    # -- desktop sign-in -----------------------------------------------------------------------

    async def sign_in(self, agent_id: str, secret: str, client: str) -> tuple[str, Principal]:
        """Check an agent's PIN or password; return a new session token and who it
        stands for (``expires_at`` set).

        Raises :class:`RateLimited` (too many failures for this agent id or this
        client address) or :class:`SignInRejected`.
        """
        now = self._clock()
        agent_key, client_key = f"agent:{agent_id}", f"client:{client}"
        waits = [w for w in (self._failures_by_agent.retry_after(agent_key, now),
                             self._failures_by_client.retry_after(client_key, now)) if w is not None]
        if waits:
            self.rate_limited += 1
            log.warning("auth.sign_in_rate_limited", agent_id=agent_id, client=client, retry_after=max(waits))
            raise RateLimited(max(waits))
        # Count the attempt as failed until it succeeds, so parallel guesses are limited too.
        self._failures_by_agent.add(agent_key, now)
        self._failures_by_client.add(client_key, now)
        agent = self._agents.get(agent_id)
        encoded = agent.pin_hash if agent is not None and agent.pin_hash else None
        async with self._checks:
            ok = await asyncio.to_thread(_check_secret, secret, encoded)
        if agent is None or not agent.pin_hash or not ok:
            self.sign_in_failures += 1
            log.warning("auth.sign_in_failed", agent_id=agent_id, client=client)
            raise SignInRejected("unknown agent or wrong secret")
        self._failures_by_agent.forget_one(agent_key, now)
        self._failures_by_client.forget_one(client_key, now)
        token = secrets.token_urlsafe(_SESSION_BYTES)
        expires_at = self._clock() + self._ttl
        principal = Principal(f"session:{agent.id}", Role.AGENT, agent.tenant, agent.id, expires_at)
        self._add_session(_digest(token), _Session(principal, expires_at))
        log.info("auth.signed_in", agent_id=agent.id, client=client, expires_at=expires_at.isoformat())
        return token, principal

    def sign_out(self, token: str) -> bool:
        """Revoke a session token; True if it was one."""
        digest = _digest(token)
        if digest not in self._sessions:
            return False
        self._drop_session(digest)
        return True

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def _add_session(self, digest: str, session: _Session) -> None:
        self._prune_sessions()
        agent_id = session.principal.agent_id or ""
        mine = self._by_agent.setdefault(agent_id, deque())
        mine.append(digest)
        while len(mine) > _SESSIONS_PER_AGENT:  # the oldest desktop sessions give way
            self._sessions.pop(mine.popleft(), None)
        self._sessions[digest] = session

    def _drop_session(self, digest: str) -> None:
        session = self._sessions.pop(digest, None)
        if session is not None:
            mine = self._by_agent.get(session.principal.agent_id or "")
            if mine is not None and digest in mine:
                mine.remove(digest)

    def _prune_sessions(self) -> None:
        now = self._clock()
        for digest in [d for d, s in self._sessions.items() if now >= s.expires_at]:
            self._drop_session(digest)
