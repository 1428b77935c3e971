"""IVR flow definitions: the ``[flows.<id>]`` tables of the config file, validated.

A flow is a graph of named nodes. Flows live in the main config file, next to the
service lines and queues that use them, so one ``SIGHUP`` (or ``POST
/api/v1/admin/reload``) reloads everything together and ``ctid check-config`` checks
the references between them in one pass::

    [flows.support-main]
    tenant = "acme"
    start = "welcome"

    [flows.support-main.nodes.welcome]
    type = "play"
    prompts = ["welcome"]
    next = "main-menu"

The node types and their fields are the classes below (``type`` selects one); the
user documentation with an example of each is ``docs/ivr.md``. Field checks (types,
ranges, prompt names, patterns, conditions, schedules) are pydantic's; the checks
across nodes are :func:`flow_problems`, which works on plain data so ``check-config``
reports them together with field errors, and :func:`ctid.config.reference_problems`
calls it for every flow. Each problem names the flow and the node::

    flows.support-main.nodes.main-menu.choices.1: unknown node 'billing'

Graph rules (:func:`flow_problems`):

* every node reference (``next``, ``on_fail``, ``otherwise``, ``choices.*``,
  ``if_open`` ...) names a node of the same flow, and ``start`` exists;
* every node is reachable from ``start``;
* no loop without input: a cycle in which no node waits for the caller (``menu``,
  ``input``, ``survey``) would spin for ever, so it is an error even when a
  condition might break it at run time;
* the run-time loop guard is ``max_steps`` (nodes entered per call, default 200); past
  it the flow fails like any runtime error (the call goes to the line's fallback).

Terminal nodes (``queue``, ``transfer``, ``voicemail``, ``callback``, ``hangup``) have
no ``next``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ctid.asterisk.safety import UnsafeValueError, check_context, check_extension
from ctid.ids import Id
from ctid.ivr.conditions import ConditionError, parse_condition
from ctid.ivr.hours import Schedule, ScheduleError

__all__ = [
    "INPUT_TYPES",
    "TERMINAL_TYPES",
    "FlowConfig",
    "Node",
    "flow_problems",
    "flow_prompts",
    "node_refs",
]

_PROMPT_RE: Final = re.compile(r"^/?[A-Za-z0-9_][A-Za-z0-9_/.-]{0,199}$")
_VAR_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_LANG_RE: Final = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?$")
DIGITS: Final = "0123456789*#"

INPUT_TYPES: Final = frozenset({"menu", "input", "survey"})
"""Node types that wait for the caller: a cycle must pass through one of them."""
TERMINAL_TYPES: Final = frozenset({"queue", "transfer", "voicemail", "callback", "hangup"})
"""Node types that end the flow (no ``next``)."""

REF_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "play": ("next",),
    "menu": ("on_fail",),
    "input": ("next", "on_fail"),
    "hours": ("if_open", "if_closed", "if_holiday"),
    "lookup": ("on_success", "on_failure", "on_timeout"),
    "set": ("next",),
    "language": ("next",),
    "goto": ("next",),
    "survey": ("next", "on_fail"),
}
"""The fields of each node type that name another node (``menu.choices`` too)."""


def _check_prompt(value: str) -> str:
    if not _PROMPT_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"{value!r} is not a sound file name (letters, digits, _ - . /, no '..', "
                         "no extension needed)")
    return value


def _check_var(value: str) -> str:
    if not _VAR_RE.fullmatch(value):
        raise ValueError(f"{value!r} must be a variable name: a letter or _, then letters, digits or _")
    return value


def _check_condition(value: str) -> str:
    try:
        parse_condition(value)
    except ConditionError as exc:
        raise ValueError(f"bad condition: {exc}") from None
    return value


def _check_context(value: str) -> str:
    try:
        return check_context(value)
    except UnsafeValueError as exc:
        raise ValueError(str(exc)) from None


NodeId = Id
Prompt = Annotated[str, AfterValidator(_check_prompt)]
Var = Annotated[str, AfterValidator(_check_var)]
Prompts = Annotated[list[Prompt], Field(min_length=1, max_length=20)]
OptionalPrompts = Annotated[list[Prompt], Field(max_length=20)]
Timeout = Annotated[float, Field(gt=0, le=60)]
Retries = Annotated[int, Field(ge=0, le=10)]
Priority = Annotated[int, Field(ge=0, le=9)]
Condition = Annotated[str, AfterValidator(_check_condition)]
Context = Annotated[str, AfterValidator(_check_context)]


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    when: Condition | None = None
    """Run the node only when this condition holds (grammar: :mod:`ctid.ivr.conditions`)."""
    otherwise: NodeId | None = None
    """Where to go instead when ``when`` is false (required with ``when``)."""

    @model_validator(mode="after")
    def _otherwise(self) -> _Node:
        if self.when is not None and self.otherwise is None:
            raise ValueError("'when' needs 'otherwise': the node to go to when the condition is false")
        if self.when is None and self.otherwise is not None:
            raise ValueError("'otherwise' without 'when'")
        return self


class PlayNode(_Node):
    """Play prompts; a digit pressed during them (``barge_in``) is kept for the next
    ``menu`` or ``input`` node, which then skips its own prompts."""

    type: Literal["play"]
    prompts: Prompts
    barge_in: bool = True
    next: NodeId


class MenuNode(_Node):
    """A prompt and one key per choice; invalid keys and silence are retried."""

    type: Literal["menu"]
    prompts: Prompts
    choices: dict[str, NodeId] = Field(min_length=1)
    """Key (one of ``0-9 * #``) -> node."""
    timeout_s: Timeout = 5.0
    """Seconds to wait for a key after the prompts."""
    retries: Retries = 2
    """Further attempts after the first (an invalid key or silence uses one)."""
    invalid_prompts: OptionalPrompts = Field(default_factory=lambda: ["option-is-invalid"])
    timeout_prompts: OptionalPrompts = Field(default_factory=list)
    on_fail: NodeId

    @field_validator("choices")
    @classmethod
    def _keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if len(key) != 1 or key not in DIGITS:
                raise ValueError(f"choice key {key!r} must be one of {DIGITS}")
        return value


class InputNode(_Node):
    """Collect digits into a variable: ``STREAM FILE`` with every key as escape digit,
    then ``WAIT FOR DIGIT`` for each further key (``GET DATA`` hard-codes ``#`` and has
    no minimum length). ``sensitive`` values stay in ctid's memory only."""

    type: Literal["input"]
    prompts: Prompts
    variable: Var
    min_length: Annotated[int, Field(ge=0, le=64)] = 1
    max_length: Annotated[int, Field(ge=1, le=64)] = 20
    terminator: Literal["#", "*", ""] = "#"
    """Key that ends the input early (not stored); empty: none."""
    first_digit_timeout_s: Timeout = 5.0
    inter_digit_timeout_s: Timeout = 3.0
    retries: Retries = 2
    pattern: str | None = None
    """Regular expression the whole input must match (e.g. ``[0-9]{8}``)."""
    invalid_prompts: OptionalPrompts = Field(default_factory=lambda: ["option-is-invalid"])
    sensitive: bool = False
    """A PIN or card number: masked in events, steps and logs; never a channel variable."""
    next: NodeId
    on_fail: NodeId

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            if len(value) > 200:
                raise ValueError("pattern is longer than 200 characters")
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _lengths(self) -> InputNode:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} is over max_length {self.max_length}")
        return self


class HoursNode(_Node):
    """Branch on a weekly schedule and holidays, in the flow tenant's time zone unless
    ``timezone`` is given."""

    type: Literal["hours"]
    schedule: dict[str, list[str]]
    """``mon`` .. ``sun`` -> ``["08:00-12:00", "13:00-18:00"]``; a missing day is closed."""
    holidays: list[str] = Field(default_factory=list)
    """``YYYY-MM-DD``, or ``MM-DD`` for every year."""
    timezone: str | None = None
    if_open: NodeId
    if_closed: NodeId
    if_holiday: NodeId | None = None
    """Default: ``if_closed``."""

    @model_validator(mode="after")
    def _schedule(self) -> HoursNode:
        try:
            Schedule.parse(self.schedule, self.holidays, self.timezone or "UTC")
        except ScheduleError as exc:
            raise ValueError(f"bad schedule: {exc}") from None
        return self


class LookupNode(_Node):
    """An HTTP lookup through ctid's CRM client (URL-encoded template, timeout, cache).

    The template's ``{name}`` placeholders are the flow's variables plus ``caller``,
    ``caller_e164``, ``caller_name``, ``dnis``, ``service_line``, ``tenant``,
    ``call_id`` and ``language``."""

    type: Literal["lookup"]
    url: str
    method: Literal["GET", "POST"] = "GET"
    timeout_ms: Annotated[int, Field(ge=10, le=30000)] = 800
    cache_ttl: Annotated[float, Field(ge=0, le=86400)] = 0.0
    headers: dict[str, str] = Field(default_factory=dict)
    map: dict[Var, Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]] = Field(
        default_factory=dict)
    """Variable -> dotted path in the JSON answer (``customer.tier``)."""
    on_success: NodeId
    on_failure: NodeId
    on_timeout: NodeId | None = None
    """Default: ``on_failure``."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL template")
        return value


class SetNode(_Node):
    """Set variables (``{name}`` in a value is replaced by that variable) and/or the
    call's priority (0-9, 9 highest)."""

    type: Literal["set"]
    values: dict[Var, Annotated[str, Field(max_length=256)]] = Field(default_factory=dict)
    priority: Priority | None = None
    next: NodeId


class LanguageNode(_Node):
    """Set the prompt language (``CHANNEL(language)``, e.g. ``es``, ``fr_CA``)."""

    type: Literal["language"]
    language: Annotated[str, Field(pattern=_LANG_RE.pattern)]
    next: NodeId


class GotoNode(_Node):
    """Jump to another node (with ``when``/``otherwise``: a branch)."""

    type: Literal["goto"]
    next: NodeId


class QueueNode(_Node):
    """Hand the call to an ACD queue of the flow's tenant; the non-sensitive variables go
    into the screen pop (``call.offered.data.ivr``)."""

    type: Literal["queue"]
    queue: NodeId
    priority: Priority | None = None
    """Default: the ``set`` node's priority, else the queue's rules (VIP list, default)."""


class TransferNode(_Node):
    """Leave ctid through the dialplan (``[ctid-transfer]``): an extension in
    ``context`` (default ``[dialing] transfer_context``), or an external number, which
    must pass the ``[dialing]`` policy (E.164, allowed prefixes)."""

    type: Literal["transfer"]
    extension: str | None = None
    number: str | None = None
    context: Context | None = None

    @model_validator(mode="after")
    def _one_target(self) -> TransferNode:
        if (self.extension is None) == (self.number is None):
            raise ValueError("give exactly one of 'extension' or 'number'")
        if self.extension is not None:
            try:
                check_extension(self.extension)
            except UnsafeValueError as exc:
                raise ValueError(str(exc)) from None
        if self.number is not None and not re.fullmatch(r"\+?[0-9]{2,20}", self.number):
            raise ValueError(f"number {self.number!r} must be digits with an optional leading +")
        if self.number is not None and self.context is not None:
            raise ValueError("'context' applies to 'extension' only")
        return self


class VoicemailNode(_Node):
    """Play optional prompts, then send the call to ``context`` (``s`` extension), e.g.
    the admin's own ``VoiceMail()`` context; default: the dialplan's
    ``CTID_VOICEMAIL_CONTEXT``."""

    type: Literal["voicemail"]
    context: Context | None = None
    prompts: OptionalPrompts = Field(default_factory=list)


class CallbackNode(_Node):
    """Leave a callback request in an ACD queue (as the queue's callback-in-queue does)
    for the caller's number, or the number in ``number_variable``; then play
    ``prompts`` and hang up. A number the ``[dialing]`` policy refuses plays
    ``refused_prompts`` and fails the flow (the call goes to the line's fallback)."""

    type: Literal["callback"]
    queue: NodeId
    number_variable: Var | None = None
    prompts: OptionalPrompts = Field(default_factory=list)
    refused_prompts: OptionalPrompts = Field(default_factory=list)


class HangupNode(_Node):
    """Play optional prompts, then end the call (``CTID_ROUTE=release``)."""

    type: Literal["hangup"]
    prompts: OptionalPrompts = Field(default_factory=list)


class SurveyNode(_Node):
    """One survey question: a key 1-5 is the score. Silence or another key is retried;
    after the retries the question stays unanswered and the flow goes to ``on_fail``
    (default: ``next``)."""

    type: Literal["survey"]
    question: NodeId
    """The question's id in ``call.survey.data.scores``."""
    prompts: Prompts
    timeout_s: Timeout = 5.0
    retries: Retries = 1
    invalid_prompts: OptionalPrompts = Field(default_factory=lambda: ["option-is-invalid"])
    next: NodeId
    on_fail: NodeId | None = None


Node = Annotated[
    PlayNode | MenuNode | InputNode | HoursNode | LookupNode | SetNode | LanguageNode | GotoNode
    | QueueNode | TransferNode | VoicemailNode | CallbackNode | HangupNode | SurveyNode,
    Field(discriminator="type"),
]


class FlowConfig(BaseModel):
    """One flow: its tenant, its first node and its nodes by id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: NodeId
    name: str = ""
    start: NodeId
    language: Annotated[str, Field(pattern=_LANG_RE.pattern)] | None = None
    """Prompt language set when the flow starts (default: the channel's)."""
    max_steps: Annotated[int, Field(ge=1, le=10000)] = 200
    """Loop guard: nodes entered per call before the flow fails."""
    nodes: dict[NodeId, Node] = Field(min_length=1)


def node_refs(node: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(field, target node)`` for every reference a node (plain data) makes."""
    out: list[tuple[str, str]] = []
    kind = node.get("type")
    for field in (*REF_FIELDS.get(str(kind), ()), "otherwise"):
        target = node.get(field)
        if isinstance(target, str):
            out.append((field, target))
    choices = node.get("choices")
    if kind == "menu" and isinstance(choices, Mapping):
        out += [(f"choices.{key}", str(target)) for key, target in choices.items() if isinstance(target, str)]
    return out


def flow_problems(flow_id: str, flow: Mapping[str, Any]) -> list[str]:
    """The graph problems of one flow (plain data), each as ``key: reason``."""
    prefix = f"flows.{flow_id}" if flow_id else "flow"
    nodes = flow.get("nodes")
    if not isinstance(nodes, Mapping) or not nodes:
        return []  # a field error already
    nodes = {str(k): v for k, v in nodes.items() if isinstance(v, Mapping)}
    problems: list[str] = []
    edges: dict[str, list[str]] = {}
    for name, node in nodes.items():
        for field, target in node_refs(node):
            if target not in nodes:
                problems.append(f"{prefix}.nodes.{name}.{field}: unknown node {target!r}")
            else:
                edges.setdefault(name, []).append(target)
    start = flow.get("start")
    if isinstance(start, str) and start not in nodes:
        problems.append(f"{prefix}.start: unknown node {start!r}")
        return problems
    if not isinstance(start, str):
        return problems
    reached = {start}
    todo = [start]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    for name in nodes:
        if name not in reached:
            problems.append(f"{prefix}.nodes.{name}: unreachable from start {start!r}")
    problems += _silent_loops(prefix, nodes, edges)
    return problems


def _silent_loops(prefix: str, nodes: Mapping[str, Mapping[str, Any]], edges: Mapping[str, list[str]]) -> list[str]:
    """Cycles through nodes that never wait for the caller (depth-first, colours)."""
    silent = {name for name, node in nodes.items() if node.get("type") not in INPUT_TYPES}
    problems: list[str] = []
    done: set[str] = set()
    for first in sorted(silent):
        if first in done:
            continue
        path = [first]
        stack = [iter(t for t in edges.get(first, ()) if t in silent)]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done.add(path.pop())
            elif nxt in path:
                loop = " -> ".join([*path[path.index(nxt):], nxt])
                problems.append(f"{prefix}.nodes.{nxt}: loop with no input ({loop}): "
                                "add a menu, input or survey node to it")
            elif nxt not in done:
                path.append(nxt)
                stack.append(iter(t for t in edges.get(nxt, ()) if t in silent))
    return problems


def flow_prompts(flows: Mapping[str, FlowConfig]) -> dict[str, list[tuple[str, str]]]:
    """Every prompt the flows can play -> the ``(flow, node)`` places that use it."""
    used: dict[str, list[tuple[str, str]]] = {}
    for flow_id, flow in flows.items():
        for node_id, node in flow.nodes.items():
            for field in ("prompts", "invalid_prompts", "timeout_prompts", "refused_prompts"):
                for prompt in getattr(node, field, ()):
                    used.setdefault(prompt, []).append((flow_id, node_id))
    return used
