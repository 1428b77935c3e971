"""A queue's routing rules, as plain immutable values built from the config.

:class:`QueueRules` holds everything the matcher and the dispatcher need to know about
one queue; :func:`queue_rules` builds them for a whole :class:`~ctid.config.Config`.
Nothing here does I/O or reads a clock: every question takes the call's wait time (and,
where it matters, its EWT and the queue depth) as arguments, so the router can ask it at
any instant and get the same answer.

Theory of operation
-------------------

- **Requirement.** A call needs an agent matching ``requires`` (an
  :class:`~ctid.acd.expr.Expression`; :data:`~ctid.acd.expr.ANY` by default).
- **Relaxation.** Each :class:`RelaxStep` *replaces* the requirement once it applies: the
  call has waited at least ``after_s`` seconds, **and** (if set) its EWT is at least
  ``ewt_s``, **and** (if set) at least ``depth`` calls are waiting. Steps are sorted by
  ``after_s``; among the steps that apply, the last one wins. Steps are meant to be
  successively looser, but that is the admin's choice and is not checked.
  :meth:`QueueRules.requirement_at` answers "what is required now";
  :meth:`QueueRules.next_boundary` gives the next wait time at which the answer can
  change on its own, so the router arms one timer per call instead of polling. EWT and
  depth changes are events the router already sees; :attr:`QueueRules.uses_ewt` and
  :attr:`QueueRules.uses_depth` tell it whether they matter for this queue.
- **Priority.** 0..9, 9 highest; the queue's ``priority`` (default 5) unless the IVR or
  CRM assigned one, and a caller on ``vip_numbers`` gets at least ``vip_priority`` (see
  :meth:`QueueRules.priority_for`).
- **Sticky agent.** With :class:`Sticky`, a caller handled by an agent in the last
  ``days`` waits up to ``wait_s`` for that agent before anyone else may take the call.
- **Leaving the queue.** :class:`Overflow` (after ``after_s`` of waiting **or** once the
  EWT reaches ``ewt_s``), ``max_wait_s`` (then ``max_wait_action``),
  ``max_queue_length`` (a call arriving at a full queue gets ``full_action``) and
  ``closed`` (every call gets ``closed_action``). No limit applies unless configured.
- **Per-queue timings**: ``wrapup_s`` (0: ready at hangup), ``ring_timeout_s`` (RONA),
  ``checkin_s`` (hold check-in, at most 10 s), ``short_abandon_s`` and
  ``sl_threshold_s`` (service level).

All comparisons with a threshold use ``>=``: a step with ``after_s = 30`` applies at a
wait of exactly 30 s, the instant its timer fires.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal, get_args

from ctid.acd.expr import ANY, Expression, parse_expression

if TYPE_CHECKING:
    from ctid.config import Config, OverflowConfig, QueueConfig

__all__ = [
    "CALLBACK",
    "DEFAULT_PRIORITY",
    "HANGUP",
    "POLICIES",
    "VOICEMAIL",
    "Overflow",
    "Policy",
    "QueueRules",
    "RelaxStep",
    "Sticky",
    "Target",
    "queue_rules",
]

Policy = Literal["longest-idle", "most-skilled", "least-occupied", "round-robin"]
POLICIES: Final[tuple[Policy, ...]] = get_args(Policy)
TargetKind = Literal["queue", "voicemail", "callback", "hangup"]

MIN_PRIORITY: Final = 0
MAX_PRIORITY: Final = 9
DEFAULT_PRIORITY: Final = 5
MAX_CHECKIN_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Target:
    """Where a call goes when it leaves a queue: another queue, voicemail, a callback
    (the caller keeps their place and is called back) or a hangup."""

    kind: TargetKind
    queue: str | None = None

    def __post_init__(self) -> None:
        if (self.kind == "queue") != (self.queue is not None):
            raise ValueError("a queue target names its queue, and only a queue target does")
        if self.kind not in get_args(TargetKind):
            raise ValueError(f"unknown target kind {self.kind!r}")

    @classmethod
    def parse(cls, text: str) -> Target:
        """``queue:<id>``, ``voicemail``, ``callback`` or ``hangup`` (as in the config)."""
        if text.startswith("queue:"):
            return cls("queue", text[6:])
        if text in ("voicemail", "callback", "hangup"):
            return cls(text)  # type: ignore[arg-type]
        raise ValueError(f"unknown target {text!r}")

    def __str__(self) -> str:
        return f"queue:{self.queue}" if self.kind == "queue" else self.kind


VOICEMAIL: Final = Target("voicemail")
CALLBACK: Final = Target("callback")
HANGUP: Final = Target("hangup")


@dataclass(frozen=True, slots=True)
class RelaxStep:
    """Once it applies (see the module docstring), ``requires`` replaces the queue's."""

    after_s: float
    requires: Expression
    ewt_s: float | None = None
    depth: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.after_s < math.inf:
            raise ValueError("after_s must be a finite number >= 0")

    def applies(self, wait_s: float, ewt_s: float | None = None, depth: int | None = None) -> bool:
        """True once the call has waited ``after_s`` and the EWT/depth conditions hold.
        An unknown EWT (None) does not satisfy an EWT condition."""
        if wait_s < self.after_s:
            return False
        if self.ewt_s is not None and (ewt_s is None or ewt_s < self.ewt_s):
            return False
        return self.depth is None or (depth is not None and depth >= self.depth)


@dataclass(frozen=True, slots=True)
class Sticky:
    """Prefer the caller's last agent: remembered ``days``, waited for ``wait_s``."""

    days: float = 7.0
    wait_s: float = 20.0

    @property
    def window_s(self) -> float:
        return self.days * 86400.0

    def remembers(self, age_s: float) -> bool:
        """True if a call handled ``age_s`` seconds ago still makes its agent sticky."""
        return 0 <= age_s <= self.window_s

    def waits(self, wait_s: float) -> bool:
        """True while the call should still wait for its sticky agent only."""
        return wait_s < self.wait_s


@dataclass(frozen=True, slots=True)
class Overflow:
    """Leave for ``target`` after ``after_s`` of waiting, or once the EWT reaches
    ``ewt_s``, whichever comes first."""

    target: Target
    after_s: float | None = None
    ewt_s: float | None = None

    def __post_init__(self) -> None:
        if self.after_s is None and self.ewt_s is None:
            raise ValueError("an overflow needs after_s, ewt_s or both")

    def due(self, wait_s: float, ewt_s: float | None = None) -> bool:
        if self.after_s is not None and wait_s >= self.after_s:
            return True
        return self.ewt_s is not None and ewt_s is not None and ewt_s >= self.ewt_s


def _frozen_weights() -> Mapping[str, float]:
    return MappingProxyType({})


@dataclass(frozen=True)
class QueueRules:
    """One queue's routing rules. Build with :meth:`from_config`; defaults match the
    config's, so ``QueueRules("q", "acme")`` is a queue that takes any agent."""

    queue_id: str
    tenant: str
    requires: Expression = ANY
    policy: Policy = "longest-idle"
    weights: Mapping[str, float] = field(default_factory=_frozen_weights, hash=False)
    """``most-skilled`` weights by skill name or ``family:*``; pass to
    :meth:`Expression.score`."""
    relax: tuple[RelaxStep, ...] = ()
    priority: int = DEFAULT_PRIORITY
    vip_numbers: frozenset[str] = frozenset()
    vip_priority: int = MAX_PRIORITY
    sticky: Sticky | None = None
    overflow: Overflow | None = None
    max_wait_s: float | None = None
    max_wait_action: Target = VOICEMAIL
    max_queue_length: int | None = None
    full_action: Target = VOICEMAIL
    closed: bool = False
    closed_action: Target = VOICEMAIL
    wrapup_s: float = 0.0
    ring_timeout_s: float = 15.0
    checkin_s: float = 5.0
    short_abandon_s: float = 5.0
    sl_threshold_s: float = 20.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        for name in ("priority", "vip_priority"):
            value = getattr(self, name)
            if not MIN_PRIORITY <= value <= MAX_PRIORITY:
                raise ValueError(f"{name} must be {MIN_PRIORITY}..{MAX_PRIORITY}")
        if any(b.after_s < a.after_s for a, b in zip(self.relax, self.relax[1:], strict=False)):
            raise ValueError("relaxation steps must be sorted by after_s")
        if not 0 < self.checkin_s <= MAX_CHECKIN_S:
            raise ValueError(f"checkin_s must be in (0, {MAX_CHECKIN_S:g}]")
        if not isinstance(self.weights, MappingProxyType):
            object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))

    @classmethod
    def from_config(cls, config: QueueConfig) -> QueueRules:
        """The rules of one ``[[queues]]`` entry (already validated by pydantic)."""
        return cls(
            queue_id=config.id,
            tenant=config.tenant,
            requires=parse_expression(config.requires),
            policy=config.policy,
            weights=dict(config.weights),
            relax=tuple(RelaxStep(step.after, parse_expression(step.requires), step.ewt_s, step.depth)
                        for step in config.relax),
            priority=config.priority,
            vip_numbers=frozenset(config.vip_numbers),
            vip_priority=config.vip_priority,
            sticky=None if config.sticky is None else Sticky(config.sticky.days, config.sticky.wait_s),
            overflow=None if config.overflow is None else _overflow(config.overflow),
            max_wait_s=config.max_wait_s,
            max_wait_action=Target.parse(config.max_wait_action),
            max_queue_length=config.max_queue_length,
            full_action=Target.parse(config.full_action),
            closed=config.closed,
            closed_action=Target.parse(config.closed_action),
            wrapup_s=config.wrapup_s,
            ring_timeout_s=config.ring_timeout_s,
            checkin_s=config.checkin_s,
            short_abandon_s=config.short_abandon_s,
            sl_threshold_s=config.sl_threshold_s,
        )

    # ------------------------------------------------------------------ requirement

    def requirement_at(self, wait_s: float, ewt_s: float | None = None, depth: int | None = None) -> Expression:
        """The expression a call must be matched with after waiting ``wait_s`` seconds,
        given its current EWT and the number of calls waiting in the queue."""
        for step in reversed(self.relax):
            if step.applies(wait_s, ewt_s, depth):
                return step.requires
        return self.requires

    def next_boundary(self, wait_s: float) -> float | None:
        """The next wait time, strictly after ``wait_s``, at which a relaxation step's
        time condition starts to hold (so the requirement may change); None if none."""
        for step in self.relax:
            if step.after_s > wait_s:
                return step.after_s
        return None

    def next_timer(self, wait_s: float, *, sticky: bool = False) -> float | None:
        """The next wait time, strictly after ``wait_s``, at which any rule of this
        queue can change what happens to a waiting call: a relaxation step, the
        overflow's ``after_s``, ``max_wait_s``, and (with ``sticky``, for a call that
        waits for its sticky agent) the end of the sticky wait. None if none."""
        times = [self.next_boundary(wait_s)]
        if self.overflow is not None:
            times.append(self.overflow.after_s)
        times.append(self.max_wait_s)
        if sticky and self.sticky is not None:
            times.append(self.sticky.wait_s)
        later = [t for t in times if t is not None and t > wait_s]
        return min(later) if later else None

    @property
    def uses_ewt(self) -> bool:
        """True if an EWT change can change the requirement or trigger the overflow."""
        return any(step.ewt_s is not None for step in self.relax) or (
            self.overflow is not None and self.overflow.ewt_s is not None)

    @property
    def uses_depth(self) -> bool:
        """True if a change in the number of waiting calls can change the requirement."""
        return any(step.depth is not None for step in self.relax)

    def requirements(self) -> tuple[Expression, ...]:
        """Every expression the queue can require, base first (for indexing agents)."""
        return (self.requires, *(step.requires for step in self.relax))

    # ------------------------------------------------------------------ priority

    def is_vip(self, caller_e164: str | None) -> bool:
        """True if the caller's number (E.164, exact match) is on ``vip_numbers``."""
        return caller_e164 is not None and caller_e164 in self.vip_numbers

    def priority_for(self, caller_e164: str | None = None, *, assigned: int | None = None) -> int:
        """The priority of a call entering this queue.

        ``assigned`` is a priority set by the IVR or CRM data; it replaces the queue's
        default. A VIP caller gets ``vip_priority`` if that is higher. Callers should
        pass the number normalised to E.164 (:func:`ctid.asterisk.safety.e164_or_none`)."""
        if assigned is not None and not MIN_PRIORITY <= assigned <= MAX_PRIORITY:
            raise ValueError(f"priority must be {MIN_PRIORITY}..{MAX_PRIORITY}, not {assigned}")
        base = self.priority if assigned is None else assigned
        return max(base, self.vip_priority) if self.is_vip(caller_e164) else base

    # ------------------------------------------------------------------ leaving

    def overflow_due(self, wait_s: float, ewt_s: float | None = None) -> bool:
        return self.overflow is not None and self.overflow.due(wait_s, ewt_s)

    def max_wait_reached(self, wait_s: float) -> bool:
        return self.max_wait_s is not None and wait_s >= self.max_wait_s

    def is_full(self, waiting: int) -> bool:
        """True if a new call cannot join while ``waiting`` calls are already queued."""
        return self.max_queue_length is not None and waiting >= self.max_queue_length

    def entry_target(self, waiting: int) -> Target | None:
        """Where a new call goes instead of joining (closed or full); None: it joins."""
        if self.closed:
            return self.closed_action
        if self.is_full(waiting):
            return self.full_action
        return None

    def exit_target(self, wait_s: float, ewt_s: float | None = None) -> Target | None:
        """Where a waiting call must go now (max wait first, then overflow); None: stay."""
        if self.max_wait_reached(wait_s):
            return self.max_wait_action
        if self.overflow is not None and self.overflow.due(wait_s, ewt_s):
            return self.overflow.target
        return None


def _overflow(config: OverflowConfig) -> Overflow:
    return Overflow(Target.parse(config.target), config.after_s, config.ewt_s)


def queue_rules(config: Config) -> dict[str, QueueRules]:
    """The rules of every configured queue, by queue id (config order)."""
    return {queue.id: QueueRules.from_config(queue) for queue in config.queues}
