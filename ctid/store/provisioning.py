"""Provisioning: agents, their skills, queues and the skill catalogue, in the database.

The database is the truth; the config only seeds it. :meth:`ProvisioningStore.seed`
adds the agents, queues and skills that are in the config and not yet in the
database, and leaves every existing entry alone, so a change an admin made over
the API survives a restart or a reload. ``seed(config, force=True)`` (``ctid seed
--force``) overwrites the database entries from the config instead. Seeding never
deletes: an agent removed from the config stays until an admin deletes it.

Every change (create, update, skills, delete, and what a seed adds or overwrites)
writes an :class:`AuditRecord` in the same transaction, with the entity as JSON
before and after. PIN hashes never leave the store in audit rows or API answers:
records say ``pin_set`` instead.

A queue's routing options are one JSON document. The store does not know their
fields: :class:`ctid.config.QueueConfig` validates them (:func:`queue_options`
builds the document from a validated config, :meth:`QueueRecord.to_config` turns
a row back into a ``QueueConfig``).

For the daemon:

* at start, after ``Database.start()``: ``await store.seed(config)``, then
  ``config = await store.effective_config(config)``: the config with its agents
  and queues replaced by the database's (enabled agents only);
* on reload (SIGHUP or ``POST /api/v1/admin/reload``): load the file again, seed
  it, and apply ``effective_config`` of it;
* :meth:`ProvisioningStore.subscribe` calls a listener after every committed
  change, so the running registry and router can follow the admin API at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import structlog
from pydantic import ValidationError
from sqlalchemy import Table, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from ctid.config import AgentConfig, Config, QueueConfig
from ctid.store.models import (
    NAME_LEN,
    SKILL_LEN,
    SOURCES,
    AgentSkill,
    AuditEntry,
    ProvisionedAgent,
    ProvisionedQueue,
    Skill,
)

__all__ = [
    "MAX_SKILLS",
    "SKILL_PATTERN",
    "AgentRecord",
    "AgentSpec",
    "AlreadyExists",
    "AuditRecord",
    "Change",
    "NotFound",
    "ProvisioningError",
    "ProvisioningStore",
    "QueueRecord",
    "QueueSpec",
    "SeedReport",
    "SkillRecord",
    "check_skill_name",
    "queue_options",
]

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
Source = Literal["config", "api"]
Entity = Literal["agent", "queue", "skill"]

#: A skill name: ``NAME`` or ``NAME:VALUE`` (``lang:zh``, ``product:broadband``), as a
#: skill expression can name it (the same rule as ``AgentConfig.skills``).
SKILL_PATTERN: Final = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})?"
_SKILL_RE: Final = re.compile(SKILL_PATTERN)
#: Most skills one agent may have.
MAX_SKILLS: Final = 100
#: Queue fields that are columns, not options.
_QUEUE_COLUMNS: Final = frozenset({"id", "tenant", "name"})
_SEED_ATTEMPTS: Final = 3

_SKILLS: Table = Skill.__table__  # type: ignore[assignment]


def _utc_now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- errors


class ProvisioningError(ValueError):
    """A value the store refuses; ``field`` names it when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(ProvisioningError, LookupError):
    """No agent or queue with that id."""


class AlreadyExists(ProvisioningError):
    """Creating an agent or queue whose id is taken."""


# --------------------------------------------------------------------------- records


def check_skill_name(name: str) -> str:
    """``name`` if it is a valid skill name, else :class:`ProvisioningError`."""
    if not isinstance(name, str) or len(name) > SKILL_LEN or not _SKILL_RE.fullmatch(name):
        raise ProvisioningError(f"invalid skill name {str(name)[:80]!r} (expected {SKILL_PATTERN})", "skills")
    return name


def _check_skills(skills: Mapping[str, int]) -> None:
    if len(skills) > MAX_SKILLS:
        raise ProvisioningError(f"at most {MAX_SKILLS} skills per agent", "skills")
    for name, level in skills.items():
        check_skill_name(name)
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 10:
            raise ProvisioningError(f"skill {name!r}: level must be an integer 1..10", f"skills.{name}")


def _check_key(what: str, value: str) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= NAME_LEN:
        raise ProvisioningError(f"{what} must be 1..{NAME_LEN} characters", what)


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """What a caller writes for an agent (the store adds ``source`` and ``updated_at``)."""

    id: str
    tenant: str
    name: str = ""
    pin_hash: str = ""
    max_calls: int = 1
    enabled: bool = True
    skills: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_key("agent_id", self.id)
        _check_key("tenant", self.tenant)
        if isinstance(self.max_calls, bool) or not isinstance(self.max_calls, int) or not 1 <= self.max_calls <= 10:
            raise ProvisioningError("max_calls must be an integer 1..10", "max_calls")
        _check_skills(self.skills)

    @classmethod
    def from_config(cls, agent: AgentConfig) -> AgentSpec:
        return cls(id=agent.id, tenant=agent.tenant, name=agent.name, pin_hash=agent.pin_hash,
                   max_calls=agent.max_calls, enabled=True, skills=dict(agent.skills))


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """A stored agent. ``pin_hash`` is here for the daemon's sign-in; it never goes into
    JSON (:meth:`to_json` says ``pin_set``)."""

    id: str
    tenant: str
    name: str
    pin_hash: str
    max_calls: int
    enabled: bool
    skills: Mapping[str, int]
    source: str
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"agent_id": self.id, "tenant": self.tenant, "name": self.name, "pin_set": bool(self.pin_hash),
                "max_calls": self.max_calls, "enabled": self.enabled, "skills": dict(self.skills),
                "source": self.source, "updated_at": _iso(self.updated_at)}

    def to_config(self) -> AgentConfig:
        """The agent as the rest of ctid takes it (the registry, the authenticator)."""
        return AgentConfig(id=self.id, tenant=self.tenant, name=self.name, pin_hash=self.pin_hash,
                           skills=dict(self.skills), max_calls=self.max_calls)

    def same_content(self, spec: AgentSpec) -> bool:
        return (self.tenant, self.name, self.pin_hash, self.max_calls, self.enabled, dict(self.skills)) == (
            spec.tenant, spec.name, spec.pin_hash, spec.max_calls, spec.enabled, dict(spec.skills))


def queue_options(queue: QueueConfig) -> dict[str, Any]:
    """The options document of a validated queue: the fields that were set, as JSON."""
    return queue.model_dump(mode="json", exclude_unset=True, exclude=set(_QUEUE_COLUMNS))


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """What a caller writes for a queue. ``options`` must already be what
    :func:`queue_options` makes of a validated :class:`QueueConfig`."""

    id: str
    tenant: str
    name: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_key("queue_id", self.id)
        _check_key("tenant", self.tenant)
        clash = sorted(_QUEUE_COLUMNS & set(self.options))
        if clash:
            raise ProvisioningError(f"options must not contain {clash[0]!r}", f"options.{clash[0]}")

    @classmethod
    def from_config(cls, queue: QueueConfig) -> QueueSpec:
        return cls(id=queue.id, tenant=queue.tenant, name=queue.name, options=queue_options(queue))


@dataclass(frozen=True, slots=True)
class QueueRecord:
    id: str
    tenant: str
    name: str
    options: Mapping[str, Any]
    source: str
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"queue_id": self.id, "tenant": self.tenant, "name": self.name, "options": dict(self.options),
                "source": self.source, "updated_at": _iso(self.updated_at)}

    def to_config(self) -> QueueConfig:
        """Validate the stored options again (raises pydantic's ``ValidationError``)."""
        return QueueConfig.model_validate({**self.options, "id": self.id, "tenant": self.tenant, "name": self.name})

    def same_content(self, spec: QueueSpec) -> bool:
        return (self.tenant, self.name, dict(self.options)) == (spec.tenant, spec.name, dict(spec.options))


@dataclass(frozen=True, slots=True)
class SkillRecord:
    name: str
    description: str
    agents: int
    """How many agents have the skill."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "agents": self.agents}


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    ts: datetime
    actor: str
    action: str
    entity: str
    entity_id: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "ts": _iso(self.ts), "actor": self.actor, "action": self.action,
                "entity": self.entity, "entity_id": self.entity_id, "before": self.before, "after": self.after}


@dataclass(frozen=True, slots=True)
class Change:
    """What :meth:`ProvisioningStore.subscribe` listeners get after a commit.
    ``before``/``after`` are records (None for a create / a delete)."""

    entity: Entity
    entity_id: str
    action: str
    actor: str
    before: AgentRecord | QueueRecord | None
    after: AgentRecord | QueueRecord | None


@dataclass(frozen=True, slots=True)
class SeedReport:
    """What a seed did. ``kept``: in the database and the config, different, and left
    alone (pass ``force`` to overwrite them); ``overwritten``: replaced by the config
    (force only); ``unchanged``: already the same."""

    forced: bool
    agents_added: tuple[str, ...] = ()
    agents_overwritten: tuple[str, ...] = ()
    agents_kept: tuple[str, ...] = ()
    agents_unchanged: tuple[str, ...] = ()
    queues_added: tuple[str, ...] = ()
    queues_overwritten: tuple[str, ...] = ()
    queues_kept: tuple[str, ...] = ()
    queues_unchanged: tuple[str, ...] = ()
    skills_added: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.agents_added or self.agents_overwritten or self.queues_added
                    or self.queues_overwritten or self.skills_added)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"forced": self.forced}
        for kind in ("agents", "queues"):
            out[kind] = {what: list(getattr(self, f"{kind}_{what}"))
                         for what in ("added", "overwritten", "kept", "unchanged")}
        out["skills"] = {"added": list(self.skills_added)}
        return out

    def lines(self) -> list[str]:
        """A human summary, one line per kind (what ``ctid seed`` prints)."""
        out = []
        for kind in ("agents", "queues"):
            parts = []
            for what in ("added", "overwritten", "kept", "unchanged"):
                ids: tuple[str, ...] = getattr(self, f"{kind}_{what}")
                label = "kept (differ from the config; --force overwrites)" if what == "kept" and ids else what
                parts.append(f"{len(ids)} {label}" + (f": {', '.join(ids)}" if ids and what != "unchanged" else ""))
            out.append(f"{kind}: " + "; ".join(parts))
        out.append(f"skills: {len(self.skills_added)} added"
                   + (f": {', '.join(self.skills_added)}" if self.skills_added else ""))
        return out


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _agent_record(row: ProvisionedAgent) -> AgentRecord:
    return AgentRecord(id=row.id, tenant=row.tenant, name=row.name, pin_hash=row.pin_hash, max_calls=row.max_calls,
                       enabled=row.enabled, skills={s.skill: s.level for s in sorted(row.skills, key=_skill_key)},
                       source=row.source,
                       updated_at=row.updated_at)


def _skill_key(skill: AgentSkill) -> str:
    return skill.skill


def _queue_record(row: ProvisionedQueue) -> QueueRecord:
    return QueueRecord(id=row.id, tenant=row.tenant, name=row.name, options=dict(row.options or {}),
                       source=row.source, updated_at=row.updated_at)


def _audit_json(record: AgentRecord | QueueRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    out = record.to_json()
    out.pop("updated_at", None)
    return out


# --------------------------------------------------------------------------- the store


Listener = Callable[[Change], None]


class ProvisioningStore:
    """The repository of provisioned agents, queues and skills.

    Methods that change something take ``actor`` (an API token's name, ``config``
    for seeds, ``cli``) for the audit row, and ``source`` (``api`` by default).
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, clock: Clock = _utc_now) -> None:
        self._sessions = sessions
        self._clock = clock
        self._listeners: list[Listener] = []

    # -- listeners ---------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after each committed change; returns an unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def _notify(self, changes: Iterable[Change]) -> None:
        for change in changes:
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception:
                    log.exception("provisioning.listener_failed", entity=change.entity, entity_id=change.entity_id)

    # -- reads -------------------------------------------------------------------------

    async def list_agents(self, tenant: str | None = None) -> list[AgentRecord]:
        query = select(ProvisionedAgent).options(selectinload(ProvisionedAgent.skills)).order_by(ProvisionedAgent.id)
        if tenant is not None:
            query = query.where(ProvisionedAgent.tenant == tenant)
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
            return [_agent_record(row) for row in rows]

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        async with self._sessions() as session:
            row = await self._agent_row(session, agent_id)
            return None if row is None else _agent_record(row)

    async def list_queues(self, tenant: str | None = None) -> list[QueueRecord]:
        query = select(ProvisionedQueue).order_by(ProvisionedQueue.id)
        if tenant is not None:
            query = query.where(ProvisionedQueue.tenant == tenant)
        async with self._sessions() as session:
            return [_queue_record(row) for row in (await session.scalars(query)).all()]

    async def get_queue(self, queue_id: str) -> QueueRecord | None:
        async with self._sessions() as session:
            row = await session.get(ProvisionedQueue, queue_id)
            return None if row is None else _queue_record(row)

    async def list_skills(self) -> list[SkillRecord]:
        counts = (select(AgentSkill.skill, func.count().label("n")).group_by(AgentSkill.skill).subquery())
        query = (select(Skill.name, Skill.description, func.coalesce(counts.c.n, 0))
                 .outerjoin(counts, counts.c.skill == Skill.name).order_by(Skill.name))
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return [SkillRecord(name=name, description=description, agents=int(n)) for name, description, n in rows]

    async def list_audit(self, *, limit: int = 100, entity: str | None = None,
                         entity_id: str | None = None) -> list[AuditRecord]:
        """Audit rows, newest first."""
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if entity is not None:
            query = query.where(AuditEntry.entity == entity)
        if entity_id is not None:
            query = query.where(AuditEntry.entity_id == entity_id)
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
        return [AuditRecord(id=r.id, ts=r.ts, actor=r.actor, action=r.action, entity=r.entity,
                            entity_id=r.entity_id, before=r.before, after=r.after) for r in rows]

    async def effective_config(self, config: Config) -> Config:
        """``config`` with its agents and queues replaced by the database's.

        Disabled agents are left out. Raises :class:`ProvisioningError` naming every
        stored entry that no longer validates (e.g. queue options that a newer ctid
        refuses). The result is not validated as a whole again (token references to
        deleted agents are the caller's to judge).
        """
        agents, queues, problems = [], [], []
        for agent in await self.list_agents():
            if not agent.enabled:
                continue
            try:
                agents.append(agent.to_config())
            except ValidationError as exc:
                problems.append(f"agent {agent.id}: {_first_error(exc)}")
        for queue in await self.list_queues():
            try:
                queues.append(queue.to_config())
            except ValidationError as exc:
                problems.append(f"queue {queue.id}: {_first_error(exc)}")
        if problems:
            raise ProvisioningError("stored provisioning is invalid: " + "; ".join(problems))
        return config.model_copy(update={"agents": agents, "queues": queues})

    # -- agents ------------------------------------------------------------------------

    async def create_agent(self, spec: AgentSpec, *, actor: str, source: Source = "api") -> AgentRecord:
        """Add an agent; :class:`AlreadyExists` if the id is taken."""
        try:
            async with self._sessions.begin() as session:
                if await session.get(ProvisionedAgent, spec.id) is not None:
                    raise AlreadyExists(f"agent {spec.id!r} already exists", "agent_id")
                after = await self._write_agent(session, None, spec, source, actor)
                self._audit(session, actor, "create", "agent", spec.id, None, after)
        except IntegrityError:
            raise AlreadyExists(f"agent {spec.id!r} already exists", "agent_id") from None
        self._notify([Change("agent", spec.id, "create", actor, None, after)])
        return after

    async def update_agent(self, spec: AgentSpec, *, actor: str, source: Source = "api") -> AgentRecord:
        """Replace an agent's content (skills included); :class:`NotFound` if it does not exist.

        Writing the same content again changes nothing and writes no audit row."""
        async with self._sessions.begin() as session:
            row = await self._agent_row(session, spec.id, for_update=True)
            if row is None:
                raise NotFound(f"unknown agent {spec.id!r}")
            before = _agent_record(row)
            if before.same_content(spec):
                return before
            after = await self._write_agent(session, row, spec, source, actor)
            self._audit(session, actor, "update", "agent", spec.id, before, after)
        self._notify([Change("agent", spec.id, "update", actor, before, after)])
        return after

    async def upsert_agent(self, spec: AgentSpec, *, actor: str, source: Source = "api") -> AgentRecord:
        """Create the agent, or replace it if it exists."""
        try:
            return await self.update_agent(spec, actor=actor, source=source)
        except NotFound:
            return await self.create_agent(spec, actor=actor, source=source)

    async def set_skills(self, agent_id: str, skills: Mapping[str, int], *, actor: str,
                         source: Source = "api") -> AgentRecord:
        """Replace an agent's skills (new names join the catalogue)."""
        _check_skills(skills)
        async with self._sessions.begin() as session:
            row = await self._agent_row(session, agent_id, for_update=True)
            if row is None:
                raise NotFound(f"unknown agent {agent_id!r}")
            before = _agent_record(row)
            if dict(before.skills) == dict(skills):
                return before
            await self._replace_skills(session, row, skills, actor)
            row.source = source
            row.updated_at = self._clock()
            await session.flush()
            after = _agent_record(row)
            self._audit(session, actor, "set_skills", "agent", agent_id, before, after)
        self._notify([Change("agent", agent_id, "set_skills", actor, before, after)])
        return after

    async def delete_agent(self, agent_id: str, *, actor: str) -> AgentRecord:
        """Delete an agent and its skills; :class:`NotFound` if it does not exist."""
        async with self._sessions.begin() as session:
            row = await self._agent_row(session, agent_id, for_update=True)
            if row is None:
                raise NotFound(f"unknown agent {agent_id!r}")
            before = _agent_record(row)
            # The database cascades to agent_skills (ON DELETE CASCADE).
            await session.execute(delete(ProvisionedAgent).where(ProvisionedAgent.id == agent_id))
            self._audit(session, actor, "delete", "agent", agent_id, before, None)
        self._notify([Change("agent", agent_id, "delete", actor, before, None)])
        return before

    # -- queues ------------------------------------------------------------------------

    async def create_queue(self, spec: QueueSpec, *, actor: str, source: Source = "api") -> QueueRecord:
        try:
            async with self._sessions.begin() as session:
                if await session.get(ProvisionedQueue, spec.id) is not None:
                    raise AlreadyExists(f"queue {spec.id!r} already exists", "queue_id")
                after = await self._write_queue(session, None, spec, source)
                self._audit(session, actor, "create", "queue", spec.id, None, after)
        except IntegrityError:
            raise AlreadyExists(f"queue {spec.id!r} already exists", "queue_id") from None
        self._notify([Change("queue", spec.id, "create", actor, None, after)])
        return after

    async def update_queue(self, spec: QueueSpec, *, actor: str, source: Source = "api") -> QueueRecord:
        async with self._sessions.begin() as session:
            row = await self._queue_row(session, spec.id)
            if row is None:
                raise NotFound(f"unknown queue {spec.id!r}")
            before = _queue_record(row)
            if before.same_content(spec):
                return before
            after = await self._write_queue(session, row, spec, source)
            self._audit(session, actor, "update", "queue", spec.id, before, after)
        self._notify([Change("queue", spec.id, "update", actor, before, after)])
        return after

    async def upsert_queue(self, spec: QueueSpec, *, actor: str, source: Source = "api") -> QueueRecord:
        try:
            return await self.update_queue(spec, actor=actor, source=source)
        except NotFound:
            return await self.create_queue(spec, actor=actor, source=source)

    async def delete_queue(self, queue_id: str, *, actor: str) -> QueueRecord:
        async with self._sessions.begin() as session:
            row = await self._queue_row(session, queue_id)
            if row is None:
                raise NotFound(f"unknown queue {queue_id!r}")
            before = _queue_record(row)
            await session.delete(row)
            self._audit(session, actor, "delete", "queue", queue_id, before, None)
        self._notify([Change("queue", queue_id, "delete", actor, before, None)])
        return before

    # -- seeding -----------------------------------------------------------------------

    async def seed(self, config: Config, *, force: bool = False, actor: str = "config") -> SeedReport:
        """Add the config's agents, queues and skills that the database lacks; with
        ``force``, also overwrite the stored ones that differ. Never deletes.

        One transaction: a seed applies completely or not at all. Two ctid processes
        seeding the same new database at once: the loser retries and finds the rows.
        """
        for attempt in range(1, _SEED_ATTEMPTS + 1):
            try:
                report, changes = await self._seed_once(config, force, actor)
            except IntegrityError:
                if attempt == _SEED_ATTEMPTS:
                    raise
                continue
            self._notify(changes)
            if report.changed:
                log.info("provisioning.seeded", **report.to_json())
            return report
        raise AssertionError("unreachable")

    async def _seed_once(self, config: Config, force: bool, actor: str) -> tuple[SeedReport, list[Change]]:
        agents: dict[str, list[str]] = {"added": [], "overwritten": [], "kept": [], "unchanged": []}
        queues: dict[str, list[str]] = {"added": [], "overwritten": [], "kept": [], "unchanged": []}
        changes: list[Change] = []
        async with self._sessions.begin() as session:
            wanted = sorted({name for agent in config.agents for name in agent.skills})
            skills_added = await self._ensure_skills(session, wanted, actor)
            for agent_config in config.agents:
                spec = AgentSpec.from_config(agent_config)
                row = await self._agent_row(session, spec.id, for_update=True)
                if row is None:
                    after = await self._write_agent(session, None, spec, "config", actor)
                    self._audit(session, actor, "create", "agent", spec.id, None, after)
                    agents["added"].append(spec.id)
                    changes.append(Change("agent", spec.id, "create", actor, None, after))
                    continue
                before = _agent_record(row)
                if before.same_content(spec):
                    agents["unchanged"].append(spec.id)
                elif not force:
                    agents["kept"].append(spec.id)
                else:
                    after = await self._write_agent(session, row, spec, "config", actor)
                    self._audit(session, actor, "update", "agent", spec.id, before, after)
                    agents["overwritten"].append(spec.id)
                    changes.append(Change("agent", spec.id, "update", actor, before, after))
            for queue_config in config.queues:
                qspec = QueueSpec.from_config(queue_config)
                qrow = await self._queue_row(session, qspec.id)
                if qrow is None:
                    qafter = await self._write_queue(session, None, qspec, "config")
                    self._audit(session, actor, "create", "queue", qspec.id, None, qafter)
                    queues["added"].append(qspec.id)
                    changes.append(Change("queue", qspec.id, "create", actor, None, qafter))
                    continue
                qbefore = _queue_record(qrow)
                if qbefore.same_content(qspec):
                    queues["unchanged"].append(qspec.id)
                elif not force:
                    queues["kept"].append(qspec.id)
                else:
                    qafter = await self._write_queue(session, qrow, qspec, "config")
                    self._audit(session, actor, "update", "queue", qspec.id, qbefore, qafter)
                    queues["overwritten"].append(qspec.id)
                    changes.append(Change("queue", qspec.id, "update", actor, qbefore, qafter))
        report = SeedReport(
            forced=force,
            agents_added=tuple(agents["added"]), agents_overwritten=tuple(agents["overwritten"]),
            agents_kept=tuple(agents["kept"]), agents_unchanged=tuple(agents["unchanged"]),
            queues_added=tuple(queues["added"]), queues_overwritten=tuple(queues["overwritten"]),
            queues_kept=tuple(queues["kept"]), queues_unchanged=tuple(queues["unchanged"]),
            skills_added=tuple(skills_added),
        )
        return report, changes

    # -- internals ---------------------------------------------------------------------

    async def _agent_row(self, session: AsyncSession, agent_id: str, *,
                         for_update: bool = False) -> ProvisionedAgent | None:
        query = select(ProvisionedAgent).options(selectinload(ProvisionedAgent.skills)).where(
            ProvisionedAgent.id == agent_id)
        if for_update:
            # PostgreSQL: concurrent writers of one agent queue up. SQLite ignores
            # it; its single writer serialises transactions anyway.
            query = query.with_for_update()
        row: ProvisionedAgent | None = (await session.scalars(query)).one_or_none()
        return row

    async def _queue_row(self, session: AsyncSession, queue_id: str) -> ProvisionedQueue | None:
        query = select(ProvisionedQueue).where(ProvisionedQueue.id == queue_id).with_for_update()
        row: ProvisionedQueue | None = (await session.scalars(query)).one_or_none()
        return row

    async def _ensure_skills(self, session: AsyncSession, names: Sequence[str], actor: str) -> list[str]:
        """Add (and audit) the skill names the catalogue lacks; return those it added."""
        if not names:
            return []
        known = set((await session.scalars(select(Skill.name).where(Skill.name.in_(names)))).all())
        missing = [name for name in names if name not in known]
        if not missing:
            return []
        # ON CONFLICT DO NOTHING: a concurrent writer may add the same name first;
        # RETURNING tells which names this transaction added.
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = (insert(_SKILLS).values([{"name": n, "description": ""} for n in missing])
                .on_conflict_do_nothing(index_elements=[_SKILLS.c.name]).returning(_SKILLS.c.name))
        added = set((await session.execute(stmt)).scalars().all())
        ordered = [name for name in missing if name in added]
        for name in ordered:
            self._audit_raw(session, actor, "create", "skill", name, None, {"name": name, "description": ""})
        return ordered

    async def _replace_skills(self, session: AsyncSession, row: ProvisionedAgent, skills: Mapping[str, int],
                              actor: str) -> None:
        await self._ensure_skills(session, sorted(skills), actor)
        current = {s.skill: s for s in row.skills}
        for name, item in current.items():
            if name not in skills:
                row.skills.remove(item)
        for name, level in skills.items():
            if name in current:
                current[name].level = level
            else:
                row.skills.append(AgentSkill(agent_id=row.id, skill=name, level=level))

    async def _write_agent(self, session: AsyncSession, row: ProvisionedAgent | None, spec: AgentSpec,
                           source: Source, actor: str) -> AgentRecord:
        if source not in SOURCES:
            raise ProvisioningError(f"source must be one of {SOURCES}", "source")
        if row is None:
            row = ProvisionedAgent(id=spec.id, skills=[])
            session.add(row)
        row.tenant, row.name, row.pin_hash = spec.tenant, spec.name, spec.pin_hash
        row.max_calls, row.enabled = spec.max_calls, spec.enabled
        row.source, row.updated_at = source, self._clock()
        await self._replace_skills(session, row, spec.skills, actor)
        await session.flush()
        return _agent_record(row)

    async def _write_queue(self, session: AsyncSession, row: ProvisionedQueue | None, spec: QueueSpec,
                           source: Source) -> QueueRecord:
        if source not in SOURCES:
            raise ProvisioningError(f"source must be one of {SOURCES}", "source")
        if row is None:
            row = ProvisionedQueue(id=spec.id)
            session.add(row)
        row.tenant, row.name, row.options = spec.tenant, spec.name, dict(spec.options)
        row.source, row.updated_at = source, self._clock()
        await session.flush()
        return _queue_record(row)

    def _audit(self, session: AsyncSession, actor: str, action: str, entity: Entity, entity_id: str,
               before: AgentRecord | QueueRecord | None, after: AgentRecord | QueueRecord | None) -> None:
        self._audit_raw(session, actor, action, entity, entity_id, _audit_json(before), _audit_json(after))

    def _audit_raw(self, session: AsyncSession, actor: str, action: str, entity: Entity, entity_id: str,
                   before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
        session.add(AuditEntry(ts=self._clock(), actor=actor[:NAME_LEN], action=action, entity=entity,
                               entity_id=entity_id, before=before, after=after))


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"]) or "(options)"
    return f"{loc}: {str(err['msg']).removeprefix('Value error, ')}"
