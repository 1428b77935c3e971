"""The flow runner: executes one IVR flow (``ctid.ivr.model``) over a FastAGI session.

One :class:`FlowRunner` serves every call; :meth:`FlowRunner.run` walks one call through
one flow and returns its :class:`IVRRun`: the variables, the steps, and how the call
left (``exit``). The runner only talks to the caller (prompts, keys) and to the CRM; it
never routes. The terminal nodes are carried out by the caller of :meth:`run` (the
daemon's ``/inbound`` handler: queue -> the ACD, transfer/voicemail/hangup ->
``CTID_ROUTE`` for the dialplan); only ``callback`` goes through the injected
``request_callback`` because its outcome decides what the caller hears next.

AGI commands, as measured on Asterisk 22 (``tests/fixtures/asterisk22/agi/12-*``):

* a prompt is ``STREAM FILE <prompt> "<escape digits>"``: ``result=0`` played to the
  end, ``result=<ASCII code>`` a key stopped it, ``result=-1`` failure (hangup or a
  missing file: with the channel still up, the runner logs it and goes on);
* the next key is ``WAIT FOR DIGIT <ms>``: ``result=0`` is the timeout;
* so ``input`` is built from those two (``GET DATA`` hard-codes ``#`` as terminator
  and has no minimum length), and ``menu``/``survey`` are one key;
* ``SET VARIABLE`` only for what the dialplan needs (``CHANNEL(language)``; routing
  variables are the daemon's). Flow variables are never channel variables: every
  channel variable shows up in AMI ``VarSet`` events and in logs. ``sensitive`` inputs
  are only in :attr:`IVRRun.variables` (for conditions and lookups), masked as ``***``
  everywhere they are reported.

Events: ``call.ivr`` for each node entered (``event: node``), each input collected
(``input``, the value masked when sensitive) and the exit (``exit`` with
``exit_reason``). Exit reasons: ``queued``, ``transferred``, ``voicemail``,
``callback``, ``contained`` (a ``hangup`` node), ``timeout`` (a ``hangup`` reached
after a menu or input ran out of retries), ``abandoned`` (the caller hung up in the
IVR), ``error`` (a runtime failure: the daemon sends the call to the line's fallback).

Hangup versus Redirect: both end the FastAGI session with ``HANGUP``. The runner tells
them apart from the AMI side, as the call model sees the caller's channel: if it got a
``HangupRequest`` (or is gone) within ``hangup_wait`` seconds, the caller abandoned in
the IVR; if not, something moved it (a Redirect) and the exit is ``transferred``.

Every run is recorded (:class:`IVRRun.record`): the steps with their times, inputs
(masked), the exit reason and node, which the IVR containment KPI reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from ctid.asterisk.agi import AGIError, AGIHangup, AGISession
from ctid.asterisk.safety import UnsafeValueError, e164_or_none
from ctid.calls import CallModel, CallState, CallStateError
from ctid.config import Config, CRMConfig
from ctid.crm.client import CRMClient
from ctid.events.calls import call_data
from ctid.events.schema import Event
from ctid.ivr.conditions import Condition, Value, parse_condition
from ctid.ivr.hours import Schedule
from ctid.ivr.model import (
    DIGITS,
    CallbackNode,
    FlowConfig,
    GotoNode,
    HangupNode,
    HoursNode,
    InputNode,
    LanguageNode,
    LookupNode,
    MenuNode,
    Node,
    PlayNode,
    QueueNode,
    SetNode,
    SurveyNode,
    TransferNode,
    VoicemailNode,
)

log = structlog.get_logger(__name__)

MASK: Final = "***"
PROMPT_TIMEOUT_S: Final = 600.0
"""Bound on one ``STREAM FILE`` (a prompt longer than this is a configuration error)."""

Publish = Callable[[Event], Event]
Clock = Callable[[], datetime]
QueueInfo = Callable[[str, str, str], Value]
"""``(tenant, "ewt" | "waiting", queue) -> value`` for the conditions' ``ewt.<queue>``
(seconds a call joining now would wait, null when unknown) and ``waiting.<queue>``."""
RequestCallback = Callable[["IVRRun", CallbackNode, str], Awaitable[str | None]]
"""``(run, node, number) -> None`` when stored, else the reason it was refused."""


class FlowError(Exception):
    """A runtime failure of the flow (loop guard, a bad value, an unknown flow)."""


@dataclass(slots=True)
class Step:
    node: str
    type: str
    at: float
    """Epoch seconds."""
    input: str | None = None
    result: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node, "type": self.type, "at": round(self.at, 3)}
        if self.input is not None:
            out["input"] = self.input
        if self.result is not None:
            out["result"] = self.result
        return out


@dataclass(slots=True)
class Exit:
    reason: str
    """``queued``, ``transferred``, ``voicemail``, ``callback``, ``contained``,
    ``timeout``, ``abandoned`` or ``error``."""
    node: str | None
    action: Node | None = None
    """The terminal node to carry out (queue, transfer, voicemail, hangup), if any."""
    error: str | None = None


@dataclass(slots=True)
class IVRRun:
    """One call's walk through one flow."""

    call_id: str
    tenant: str
    flow_id: str
    flow: FlowConfig
    service_line: str | None
    variables: dict[str, Value]
    started_at: float
    sensitive: set[str] = field(default_factory=set)
    language: str | None = None
    priority: int | None = None
    steps: list[Step] = field(default_factory=list)
    scores: dict[str, int] = field(default_factory=dict)
    exit: Exit | None = None
    ended_at: float | None = None
    failed_input: bool = False
    pending_digit: str | None = None

    def public_variables(self) -> dict[str, Value]:
        """The variables that may leave ctid (the screen pop): no sensitive ones, no
        built-ins."""
        return {k: v for k, v in self.variables.items() if k not in self.sensitive and k not in BUILTINS}

    def record(self) -> dict[str, Any]:
        """The stored row (``ivr_sessions``): steps and inputs masked, the exit."""
        assert self.exit is not None
        return {
            "call_id": self.call_id, "tenant": self.tenant, "flow": self.flow_id,
            "service_line": self.service_line,
            "started_at": datetime.fromtimestamp(self.started_at, UTC),
            "ended_at": datetime.fromtimestamp(self.ended_at or self.started_at, UTC),
            "exit_reason": self.exit.reason, "exit_node": self.exit.node,
            "error": self.exit.error,
            "steps": [s.as_json() for s in self.steps],
            "variables": self.public_variables(),
        }


BUILTINS: Final = frozenset({"caller", "caller_e164", "caller_name", "dnis", "service_line", "tenant",
                             "call_id", "language"})


class _Hungup(Exception):
    """The FastAGI session ended under the flow (hangup or Redirect)."""


class FlowRunner:
    """Runs flows for every call (see the module docstring).

    ``model`` is the call model of the Asterisk link the sessions come from (for the
    events' base fields, the ``ivr`` annotation of the pop and the hangup check).
    ``record`` receives each finished :class:`IVRRun` (the store's writer); it must
    not block.
    """

    def __init__(self, config: Config, *, publish: Publish, model: CallModel | None,
                 crm: CRMClient | None, clock: Clock,
                 request_callback: RequestCallback | None = None,
                 record: Callable[[IVRRun], None] | None = None,
                 queue_info: QueueInfo | None = None,
                 hangup_wait: float = 1.0) -> None:
        self.config = config
        self._publish = publish
        self._model = model
        self._crm = crm
        self._clock = clock
        self._request_callback = request_callback
        self._record = record
        self._queue_info = queue_info
        self._hangup_wait = hangup_wait
        self.runs = 0
        self.errors = 0

    def reconfigure(self, config: Config) -> None:
        """A reload: the next runs use the new flows (runs in progress keep theirs)."""
        self.config = config

    # ---------------------------------------------------------------- the walk

    async def run(self, session: AGISession, *, call_id: str, flow_id: str, tenant: str,
                  service_line: str | None, dnis: str | None) -> IVRRun:
        flow = self.config.flows.get(flow_id)
        if flow is None:
            raise FlowError(f"unknown flow {flow_id!r}")
        caller = session.env.get("agi_callerid") or ""
        caller = "" if caller == "unknown" else caller
        name = session.env.get("agi_calleridname") or ""
        run = IVRRun(call_id, tenant, flow_id, flow, service_line, {
            "caller": caller, "caller_e164": e164_or_none(caller) or "",
            "caller_name": "" if name == "unknown" else name, "dnis": dnis or "",
            "service_line": service_line or "", "tenant": tenant, "call_id": call_id,
            "language": session.env.get("agi_language") or "",
        }, started_at=self._clock().timestamp())
        self.runs += 1
        self._mark_ivr(call_id)
        node_id = flow.start
        try:
            if flow.language:
                await self._set_language(session, run, flow.language)
            await self._walk(session, run, node_id)
        except _Hungup:
            run.exit = Exit(await self._abandoned_or_moved(session), self._last_node(run))
        except AGIHangup:
            run.exit = Exit(await self._abandoned_or_moved(session), self._last_node(run))
        except asyncio.CancelledError:
            # The server's hangup grace ran out (or ctid stops): record it, then go.
            run.exit = Exit("abandoned" if session.hung_up else "error", self._last_node(run),
                            error=None if session.hung_up else "cancelled")
            self._finish(run)
            raise
        except (FlowError, AGIError, UnsafeValueError, ValueError) as exc:
            self.errors += 1
            log.error("ivr.flow_error", call_id=call_id, flow=flow_id, node=self._last_node(run), error=str(exc))
            run.exit = Exit("error", self._last_node(run), error=str(exc))
        self._finish(run)
        return run

    def _finish(self, run: IVRRun) -> None:
        assert run.exit is not None
        run.ended_at = self._clock().timestamp()
        self._event(run, run.exit.node or run.flow.start, "exit", exit_reason=run.exit.reason)
        log.info("ivr.exit", call_id=run.call_id, flow=run.flow_id, node=run.exit.node, reason=run.exit.reason,
                 steps=len(run.steps))
        if self._model is not None and self._model.get(run.call_id) is not None:
            with contextlib.suppress(LookupError):
                self._model.annotate(run.call_id, data={"ivr": run.public_variables()})
        if self._record is not None:
            self._record(run)

    @staticmethod
    def _last_node(run: IVRRun) -> str | None:
        return run.steps[-1].node if run.steps else None

    async def _walk(self, session: AGISession, run: IVRRun, node_id: str) -> None:
        flow = run.flow
        current: str | None = node_id
        while current is not None:
            if len(run.steps) >= flow.max_steps:
                raise FlowError(f"loop guard: {flow.max_steps} nodes entered (max_steps)")
            node = flow.nodes[current]
            step = Step(current, node.type, self._clock().timestamp())
            run.steps.append(step)
            if node.when is not None and not _condition(node.when).evaluate(_Scope(run, self._queue_info)):
                step.result = "skipped"
                current = node.otherwise
                continue
            self._event(run, current, "node")
            if session.hung_up:
                raise _Hungup
            current = await self._execute(session, run, current, node, step)

    async def _execute(self, session: AGISession, run: IVRRun, node_id: str, node: Node,
                       step: Step) -> str | None:
        """Run one node; the next node's id, or None when the flow is over."""
        match node:
            case PlayNode():
                digit = await self._prompts(session, run, node.prompts, DIGITS if node.barge_in else "")
                if digit is not None:
                    run.pending_digit = digit
                return node.next
            case MenuNode():
                return await self._menu(session, run, node_id, node, step)
            case InputNode():
                return await self._input(session, run, node_id, node, step)
            case SurveyNode():
                return await self._survey(session, run, node_id, node, step)
            case HoursNode():
                tz = node.timezone or self._tenant_tz(run.tenant)
                status = _schedule(node, tz).status(self._clock())
                step.result = status
                if status == "open":
                    return node.if_open
                if status == "holiday" and node.if_holiday is not None:
                    return node.if_holiday
                return node.if_closed
            case LookupNode():
                return await self._lookup(run, node, step)
            case SetNode():
                for name, template in node.values.items():
                    run.variables[name] = _render(template, run.variables)
                    # A value built from a sensitive one (a PIN) is sensitive too.
                    if any(ref in run.sensitive for ref in _TEMPLATE_NAME.findall(template)):
                        run.sensitive.add(name)
                    else:
                        run.sensitive.discard(name)
                if node.priority is not None:
                    run.priority = node.priority
                return node.next
            case LanguageNode():
                await self._set_language(session, run, node.language)
                return node.next
            case GotoNode():
                return node.next
            case QueueNode():
                run.exit = Exit("queued", node_id, node)
                return None
            case TransferNode():
                run.exit = Exit("transferred", node_id, node)
                return None
            case VoicemailNode():
                await self._prompts(session, run, node.prompts, "")
                run.exit = Exit("voicemail", node_id, node)
                return None
            case HangupNode():
                await self._prompts(session, run, node.prompts, "")
                run.exit = Exit("timeout" if run.failed_input else "contained", node_id, node)
                return None
            case CallbackNode():
                await self._callback(session, run, node_id, node, step)
                return None
        raise FlowError(f"node type {node.type!r} is not implemented")  # pragma: no cover

    # ---------------------------------------------------------------- nodes

    async def _key(self, session: AGISession, run: IVRRun, prompts: list[str], timeout_s: float) -> str | None:
        """One key: the one typed ahead, else one pressed during the prompts, else one
        within ``timeout_s`` after them; None on silence."""
        digit = run.pending_digit
        run.pending_digit = None
        if digit is None:
            digit = await self._prompts(session, run, prompts, DIGITS)
        if digit is None:
            digit = await self._wait_digit(session, timeout_s)
        return digit

    async def _menu(self, session: AGISession, run: IVRRun, node_id: str, node: MenuNode, step: Step) -> str:
        for attempt in range(node.retries + 1):
            digit = await self._key(session, run, node.prompts, node.timeout_s)
            if digit is not None and digit in node.choices:
                step.input = digit
                self._event(run, node_id, "input", value=digit)
                return node.choices[digit]
            last = attempt == node.retries
            if digit is None:
                log.info("ivr.no_input", call_id=run.call_id, flow=run.flow_id, node=node_id, attempt=attempt + 1)
                if not last:
                    await self._prompts(session, run, node.timeout_prompts, "")
            else:
                log.info("ivr.invalid_input", call_id=run.call_id, flow=run.flow_id, node=node_id, digit=digit,
                         attempt=attempt + 1)
                await self._prompts(session, run, node.invalid_prompts, "")
        step.result = "failed"
        run.failed_input = True
        return node.on_fail

    async def _input(self, session: AGISession, run: IVRRun, node_id: str, node: InputNode, step: Step) -> str:
        pattern = re.compile(node.pattern) if node.pattern else None
        for attempt in range(node.retries + 1):
            digits = await self._collect(session, run, node)
            valid = (digits is not None and node.min_length <= len(digits) <= node.max_length
                     and (pattern is None or pattern.fullmatch(digits) is not None))
            if valid and digits is not None:
                run.variables[node.variable] = digits
                if node.sensitive:
                    run.sensitive.add(node.variable)
                else:
                    run.sensitive.discard(node.variable)
                shown = MASK if node.sensitive else digits
                step.input = shown
                self._event(run, node_id, "input", value=shown, variable=node.variable, sensitive=node.sensitive)
                return node.next
            log.info("ivr.invalid_input" if digits else "ivr.no_input", call_id=run.call_id, flow=run.flow_id,
                     node=node_id, length=len(digits or ""), attempt=attempt + 1)
            if attempt < node.retries or digits:
                await self._prompts(session, run, node.invalid_prompts, "")
        step.result = "failed"
        run.failed_input = True
        return node.on_fail

    async def _collect(self, session: AGISession, run: IVRRun, node: InputNode) -> str | None:
        """Keys up to the terminator, ``max_length`` keys, or a timeout; None: nothing."""
        first = await self._key(session, run, node.prompts, node.first_digit_timeout_s)
        if first is None:
            return None
        digits = ""
        key: str | None = first
        while key is not None:
            if node.terminator and key == node.terminator:
                break
            digits += key
            if len(digits) >= node.max_length:
                break
            key = await self._wait_digit(session, node.inter_digit_timeout_s)
        return digits

    async def _survey(self, session: AGISession, run: IVRRun, node_id: str, node: SurveyNode, step: Step) -> str:
        for attempt in range(node.retries + 1):
            digit = await self._key(session, run, node.prompts, node.timeout_s)
            if digit is not None and digit in "12345":
                run.scores[node.question] = int(digit)
                step.input = digit
                self._event(run, node_id, "input", value=digit, variable=node.question)
                return node.next
            if attempt < node.retries:
                await self._prompts(session, run, node.invalid_prompts, "")
        step.result = "unanswered"
        return node.on_fail or node.next

    async def _lookup(self, run: IVRRun, node: LookupNode, step: Step) -> str:
        if self._crm is None:
            raise FlowError("lookup node, but the CRM client is not running")
        config = CRMConfig(url=node.url, method=node.method, timeout_ms=node.timeout_ms,
                           cache_ttl=node.cache_ttl, headers=node.headers)
        result = await self._crm.lookup(config, {k: ("" if v is None else v) for k, v in run.variables.items()})
        if not result.ok or result.data is None:
            step.result = result.error
            if result.error == "timeout" and node.on_timeout is not None:
                return node.on_timeout
            return node.on_failure
        for name, path in node.map.items():
            value = _dig(result.data, path)
            run.variables[name] = value
            run.sensitive.discard(name)
        step.result = "ok"
        return node.on_success

    async def _callback(self, session: AGISession, run: IVRRun, node_id: str, node: CallbackNode,
                        step: Step) -> None:
        if self._request_callback is None:
            raise FlowError("callback node, but the ACD is not running")
        raw = run.variables.get(node.number_variable or "caller")
        number = "" if raw is None else str(raw)
        refused = await self._request_callback(run, node, number)
        if refused is not None:
            step.result = f"refused: {refused}"
            await self._prompts(session, run, node.refused_prompts, "")
            raise FlowError(f"callback refused: {refused}")
        step.result = "stored"
        await self._prompts(session, run, node.prompts, "")
        run.exit = Exit("callback", node_id, node)

    # ---------------------------------------------------------------- AGI

    async def _prompts(self, session: AGISession, run: IVRRun, prompts: list[str], escape: str) -> str | None:
        """Play prompts in order; the first key pressed (when ``escape``) stops them."""
        for prompt in prompts:
            reply = await session.send_command("STREAM FILE", prompt, escape, timeout=PROMPT_TIMEOUT_S)
            code = reply.result_int
            if code is None or code < 0:
                if session.hung_up:
                    raise _Hungup
                log.warning("ivr.prompt_failed", call_id=run.call_id, flow=run.flow_id, prompt=prompt,
                            reply=reply.raw)
                continue
            if code > 0:
                return chr(code)
        return None

    async def _wait_digit(self, session: AGISession, seconds: float) -> str | None:
        ms = int(seconds * 1000)
        reply = await session.send_command("WAIT FOR DIGIT", ms, timeout=seconds + 30)
        code = reply.result_int
        if code is None or code < 0:
            raise _Hungup
        if code == 0:
            return None
        key = chr(code)
        return key if key in DIGITS else None

    async def _set_language(self, session: AGISession, run: IVRRun, language: str) -> None:
        await session.set_variable("CHANNEL(language)", language)
        run.language = language
        run.variables["language"] = language

    # ---------------------------------------------------------------- call side

    def _tenant_tz(self, tenant: str) -> str:
        try:
            return self.config.tenant(tenant).timezone
        except KeyError:
            return "UTC"

    def _mark_ivr(self, call_id: str) -> None:
        if self._model is None or self._model.get(call_id) is None:
            return
        with contextlib.suppress(CallStateError, LookupError):
            self._model.mark(call_id, CallState.IVR)

    async def _abandoned_or_moved(self, session: AGISession) -> str:
        """The session ended under the flow: did the caller hang up, or was the channel
        moved (Redirect)? Ask the call model: a ``HangupRequest`` of the caller's channel
        (Asterisk sends it at once; the ``Hangup`` itself only comes once ``AGI()``
        returns) or its ``Hangup`` means the caller left. Neither within
        ``hangup_wait`` seconds: the channel was moved."""
        uniqueid = session.uniqueid
        if self._model is None or not uniqueid:
            return "abandoned"
        deadline = time.monotonic() + self._hangup_wait
        while True:
            leg = self._model.channels.get(uniqueid)
            if leg is None or leg.call.release is not None:
                return "abandoned"
            if time.monotonic() >= deadline:
                return "transferred"
            await asyncio.sleep(0.02)

    def _event(self, run: IVRRun, node_id: str, event: str, *, value: str | None = None,
               exit_reason: str | None = None, variable: str | None = None, sensitive: bool = False) -> None:
        call = self._model.get(run.call_id) if self._model is not None else None
        if call is not None:
            data = call_data(call)
        else:
            caller = run.variables.get("caller") or None
            data = {"direction": "inbound", "state": "ivr",
                    "caller": {"number": caller, "name": run.variables.get("caller_name") or None,
                               "e164": run.variables.get("caller_e164") or None},
                    "dnis": run.variables.get("dnis") or None, "service_line": run.service_line}
        if data["state"] != "ended":
            data["state"] = "ivr"  # the model may not have seen the mark yet
        data.update({"flow": run.flow_id, "node": node_id, "event": event,
                     "value": value, "exit_reason": exit_reason})
        if variable is not None:
            data["variable"] = variable
            data["sensitive"] = sensitive
        self._publish(Event("call.ivr", run.tenant, self._clock(), data, call_id=run.call_id))


@functools.lru_cache(maxsize=1024)
def _condition(text: str) -> Condition:
    """Parsed once per text (the config validated it already)."""
    return parse_condition(text)


def _schedule(node: HoursNode, tz: str) -> Schedule:
    key = (id(node), tz)
    cached = _SCHEDULES.get(key)
    if cached is None or cached[0] is not node:
        if len(_SCHEDULES) > 1024:
            _SCHEDULES.clear()
        cached = (node, Schedule.parse(node.schedule, node.holidays, tz))
        _SCHEDULES[key] = cached
    return cached[1]


_SCHEDULES: dict[tuple[int, str], tuple[HoursNode, Schedule]] = {}


class _Scope(Mapping[str, Value]):
    """What a condition sees: the run's variables, plus ``ewt.<queue>`` and
    ``waiting.<queue>`` of the ACD, computed when a condition asks for them."""

    def __init__(self, run: IVRRun, queue_info: QueueInfo | None) -> None:
        self._run = run
        self._info = queue_info

    def __getitem__(self, name: str) -> Value:
        if name in self._run.variables:
            return self._run.variables[name]
        kind, _, queue = name.partition(".")
        if self._info is not None and kind in ("ewt", "waiting") and queue:
            return self._info(self._run.tenant, kind, queue)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._run.variables)

    def __len__(self) -> int:
        return len(self._run.variables)


_TEMPLATE: Final = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TEMPLATE_NAME: Final = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _render(template: str, variables: Mapping[str, Value]) -> str:
    """``{name}`` -> the variable's value (empty when unset); ``{{``/``}}`` are braces."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        value = variables.get(match.group(1))
        return "" if value is None else str(value)
    return _TEMPLATE.sub(one, template)


def _dig(data: Mapping[str, Any], path: str) -> Value:
    """The value at a dotted path of a JSON object; None when absent or not a scalar."""
    node: Any = data
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    if isinstance(node, str | int | float | bool) or node is None:
        return node
    return None
