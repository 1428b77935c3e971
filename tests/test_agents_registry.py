"""The agent state machine and registry: the transition table, refusals that carry the
state, and the events each change publishes (validated against the contract)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ctid.agents import (
    DEFAULT_PAUSE_REASONS,
    TRANSITIONS,
    AgentCommandError,
    AgentRegistry,
    AgentState,
    AgentStateError,
    Trigger,
    UnknownAgentError,
)
from ctid.agents.states import DEVICE_IGNORED, PREVIOUS, next_state
from ctid.config import AgentConfig
from ctid.events import contract
from ctid.events.schema import Event

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
CALL = {"direction": "inbound", "state": "connected",
        "caller": {"number": "4155550123", "name": "ALICE", "e164": "+14155550123"},
        "dnis": "+18005550100", "service_line": "acme-support"}


class Published:
    """Stands in for ``bus.publish``: stamps seq, validates against the contract, keeps the events."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> Event:
        stamped = event.with_seq(len(self.events) + 1)
        contract.validate(stamped.envelope(), strict=True)
        self.events.append(stamped)
        return stamped

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def states(self) -> list[str]:
        return [e.data["state"] for e in self.events if e.type == "agent.state"]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def published() -> Published:
    return Published()


@pytest.fixture
def registry(published: Published, clock: Clock) -> AgentRegistry:
    agents = [AgentConfig(id="1001", tenant="acme", name="Ana", skills={"lang:en": 7}),
              AgentConfig(id="1002", tenant="acme"), AgentConfig(id="2001", tenant="globex")]
    return AgentRegistry(agents, published, clock)


def put_in(registry: AgentRegistry, state: AgentState, agent_id: str = "1001") -> None:
    """Drive an agent to ``state`` through legal commands only."""
    if state is AgentState.LOGGED_OUT:
        return
    registry.login(agent_id, f"PJSIP/{agent_id}")
    if state is AgentState.READY:
        return
    if state is AgentState.PAUSED:
        registry.pause(agent_id, "lunch")
        return
    if state is AgentState.BUSY:
        registry.set_busy(agent_id, True)
        return
    registry.reserve(agent_id, "call-1", "support", CALL)
    if state is AgentState.RESERVED:
        return
    registry.answer(agent_id, "call-1")
    if state is AgentState.ON_CALL:
        return
    registry.hangup(agent_id, "call-1")
    assert state is AgentState.WRAP_UP


def fire(registry: AgentRegistry, trigger: Trigger, agent_id: str = "1001") -> None:
    actions: dict[Trigger, Any] = {
        Trigger.LOGIN: lambda: registry.login(agent_id, "PJSIP/1001"),
        Trigger.LOGOUT: lambda: registry.logout(agent_id),
        Trigger.READY: lambda: registry.ready(agent_id),
        Trigger.PAUSE: lambda: registry.pause(agent_id, "break"),
        Trigger.WRAPUP_DONE: lambda: registry.wrapup_done(agent_id, "call-1", "sold", ""),
        Trigger.RESERVE: lambda: registry.reserve(agent_id, "call-1", "support"),
        Trigger.ANSWER: lambda: registry.answer(agent_id, "call-1"),
        Trigger.HANGUP: lambda: registry.hangup(agent_id, "call-1"),
        Trigger.RELEASE: lambda: registry.release(agent_id, "call-1"),
        Trigger.RONA: lambda: registry.rona(agent_id, "call-1"),
        Trigger.DEVICE_BUSY: lambda: registry.set_busy(agent_id, True),
        Trigger.DEVICE_IDLE: lambda: registry.set_busy(agent_id, False),
    }
    actions[trigger]()


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize(("state", "trigger"), list(itertools.product(AgentState, Trigger)),
                         ids=lambda v: str(v))
def test_every_pair_follows_the_table(registry: AgentRegistry, published: Published, state: AgentState,
                                      trigger: Trigger) -> None:
    put_in(registry, state)
    agent = registry.get("1001")
    assert agent.state is state
    before = len(published.events)
    target = TRANSITIONS.get((state, trigger))
    device_trigger = trigger in (Trigger.DEVICE_BUSY, Trigger.DEVICE_IDLE)
    if target is None and not device_trigger:
        with pytest.raises(AgentStateError) as err:
            fire(registry, trigger)
        assert err.value.state is state, "the refusal carries the current state"
        assert err.value.trigger is trigger
        assert agent.state is state
        assert len(published.events) == before, "a refused command publishes nothing"
        return
    fire(registry, trigger)
    if target is None or (state in DEVICE_IGNORED and device_trigger):
        assert agent.state is state
        assert len(published.events) == before
    elif target is PREVIOUS:
        assert agent.state is AgentState.READY  # put_in() went busy from ready
    else:
        assert agent.state is target


def test_the_table_names_only_known_states_and_every_state_can_be_left() -> None:
    sources = {state for state, _ in TRANSITIONS}
    assert sources == set(AgentState)
    reached = {t for t in TRANSITIONS.values() if isinstance(t, AgentState)}
    assert reached == set(AgentState)


def test_device_triggers_never_raise() -> None:
    for state in AgentState:
        for trigger in (Trigger.DEVICE_BUSY, Trigger.DEVICE_IDLE):
            next_state("a", state, trigger)  # no exception


# --------------------------------------------------------------------------- events


def test_login_publishes_agent_state_with_every_field(registry: AgentRegistry, published: Published,
                                                      clock: Clock) -> None:
    clock.advance(5)
    agent = registry.login("1001", "PJSIP/1001")
    assert agent.state is AgentState.READY
    [event] = published.events
    assert (event.type, event.tenant, event.agent_id, event.call_id, event.queue) == (
        "agent.state", "acme", "1001", None, None)
    assert event.data == {"state": "ready", "reason": None, "device": "PJSIP/1001",
                          "since": "2026-12-01T09:00:05.000Z", "previous": "logged_out", "calls": 0}


def test_a_routed_call_from_reserve_to_wrapup_done(registry: AgentRegistry, published: Published,
                                                   clock: Clock) -> None:
    registry.login("1001", "PJSIP/1001")
    registry.reserve("1001", "call-1", "support", CALL)
    registry.answer("1001", "call-1")
    registry.hangup("1001", "call-1")
    clock.advance(42.5)
    agent = registry.wrapup_done("1001", "call-1", "sold", "upgraded to fibre")
    assert published.states() == ["ready", "reserved", "on_call", "wrap_up", "ready"]
    assert published.types()[-2:] == ["call.wrapup", "agent.state"], "call.wrapup comes before the ready"
    reserved = published.events[1]
    assert (reserved.call_id, reserved.queue, reserved.data["calls"]) == ("call-1", "support", 1)
    wrapup = published.events[-2]
    assert (wrapup.tenant, wrapup.call_id, wrapup.agent_id, wrapup.queue) == ("acme", "call-1", "1001", "support")
    assert wrapup.data == {**CALL, "state": "ended", "disposition": "sold", "notes": "upgraded to fibre",
                           "wrapup_s": 42.5, "completed_by": "agent"}
    ready = published.events[-1]
    assert (ready.call_id, ready.data["calls"], ready.data["previous"]) == (None, 0, "wrap_up")
    assert agent.calls == {}


def test_wrapup_without_disposition_publishes_nulls(registry: AgentRegistry, published: Published) -> None:
    put_in(registry, AgentState.WRAP_UP)
    registry.wrapup_done("1001", "call-1", completed_by="supervisor")
    wrapup = published.events[-2]
    assert (wrapup.data["disposition"], wrapup.data["notes"], wrapup.data["completed_by"]) == (
        None, None, "supervisor")


def test_wrapup_of_another_call_is_refused_with_the_state(registry: AgentRegistry, published: Published) -> None:
    put_in(registry, AgentState.WRAP_UP)
    before = len(published.events)
    with pytest.raises(AgentStateError) as err:
        registry.wrapup_done("1001", "call-2", "sold")
    assert err.value.state is AgentState.WRAP_UP
    assert "call-2" in str(err.value)
    assert len(published.events) == before


def test_ready_while_on_a_call_is_refused(registry: AgentRegistry) -> None:
    put_in(registry, AgentState.ON_CALL)
    with pytest.raises(AgentStateError) as err:
        registry.ready("1001")
    assert err.value.state is AgentState.ON_CALL


def test_pause_reasons_and_repeats(registry: AgentRegistry, published: Published) -> None:
    registry.login("1001", "PJSIP/1001")
    with pytest.raises(AgentCommandError) as err:
        registry.pause("1001", "nap")
    assert err.value.field == "reason"
    registry.pause("1001", "lunch")
    registry.pause("1001", "lunch")  # the same reason again: nothing changes
    registry.pause("1001", "training")
    registry.ready("1001")
    registry.ready("1001")  # a repeat
    assert [(e.data["state"], e.data["reason"]) for e in published.events] == [
        ("ready", None), ("paused", "lunch"), ("paused", "training"), ("ready", None)]
    assert set(DEFAULT_PAUSE_REASONS) == {"break", "lunch", "training", "meeting", "rona"}


def test_configured_pause_reasons_replace_the_defaults(published: Published, clock: Clock) -> None:
    registry = AgentRegistry([AgentConfig(id="1", tenant="t")], published, clock, pause_reasons=["coaching"])
    registry.login("1", "SIP/one")
    registry.pause("1", "coaching")
    with pytest.raises(AgentCommandError):
        registry.pause("1", "lunch")


def test_rona_pauses_with_reason_rona(registry: AgentRegistry, published: Published) -> None:
    put_in(registry, AgentState.RESERVED)
    agent = registry.rona("1001", "call-1")
    assert (agent.state, agent.reason, agent.calls) == (AgentState.PAUSED, "rona", {})
    assert published.events[-1].data["reason"] == "rona"


def test_release_of_an_offer_returns_to_ready(registry: AgentRegistry) -> None:
    put_in(registry, AgentState.RESERVED)
    assert registry.release("1001", "call-1").state is AgentState.READY
    with pytest.raises(AgentStateError):
        registry.answer("1001", "call-1")


def test_acd_triggers_name_the_call(registry: AgentRegistry) -> None:
    put_in(registry, AgentState.RESERVED)
    with pytest.raises(AgentStateError) as err:
        registry.answer("1001", "some-other-call")
    assert err.value.state is AgentState.RESERVED


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["PJSIP/1001&PJSIP/1002", "PJSIP/1001,G(x)", "Local/1@ctx/n", "pjsip/1001",
                                    "", "PJSIP/", "PJSIP/+4420@trunk"])
def test_login_refuses_unsafe_devices(registry: AgentRegistry, published: Published, device: str) -> None:
    with pytest.raises(AgentCommandError) as err:
        registry.login("1001", device)
    assert err.value.field == "device"
    assert registry.get("1001").state is AgentState.LOGGED_OUT
    assert published.events == []


def test_login_to_an_unknown_endpoint_is_refused(registry: AgentRegistry) -> None:
    with pytest.raises(AgentCommandError):
        registry.login("1001", "PJSIP/9999", known_endpoints={"1001", "1002"})
    assert registry.login("1001", "PJSIP/1001", known_endpoints={"1001", "1002"}).device == "PJSIP/1001"
    assert registry.login("1002", "DAHDI/1", known_endpoints={"DAHDI/1"}).device == "DAHDI/1"


def test_one_device_serves_one_agent_at_a_time(registry: AgentRegistry) -> None:
    registry.login("1001", "PJSIP/1001")
    with pytest.raises(AgentStateError) as err:
        registry.login("1002", "PJSIP/1001")
    assert err.value.state is AgentState.LOGGED_OUT
    assert registry.agent_for_device("PJSIP/1001") is registry.get("1001")
    registry.logout("1001")
    assert registry.agent_for_device("PJSIP/1001") is None
    assert registry.login("1002", "PJSIP/1001").device == "PJSIP/1001"


def test_logout_clears_the_device_and_is_refused_on_a_call(registry: AgentRegistry, published: Published) -> None:
    put_in(registry, AgentState.ON_CALL)
    with pytest.raises(AgentStateError) as err:
        registry.logout("1001")
    assert err.value.state is AgentState.ON_CALL
    registry.hangup("1001", "call-1")
    agent = registry.logout("1001")
    assert (agent.state, agent.device, agent.calls) == (AgentState.LOGGED_OUT, None, {})
    assert published.events[-1].data["device"] is None


def test_busy_returns_to_the_state_it_interrupted(registry: AgentRegistry, published: Published) -> None:
    registry.login("1001", "PJSIP/1001")
    registry.pause("1001", "meeting")
    assert registry.set_busy("1001", True).state is AgentState.BUSY
    registry.set_busy("1001", True)  # a repeat from the device feed
    agent = registry.set_busy("1001", False)
    assert (agent.state, agent.reason) == (AgentState.PAUSED, "meeting")
    registry.set_busy("1001", False)  # idle while not busy: nothing
    assert [(e.data["state"], e.data["reason"]) for e in published.events] == [
        ("ready", None), ("paused", "meeting"), ("busy", None), ("paused", "meeting")]


def test_busy_from_wrap_up_keeps_the_call(registry: AgentRegistry) -> None:
    put_in(registry, AgentState.WRAP_UP)
    registry.set_busy("1001", True)
    with pytest.raises(AgentStateError) as err:
        registry.wrapup_done("1001", "call-1")
    assert err.value.state is AgentState.BUSY
    agent = registry.set_busy("1001", False)
    assert (agent.state, list(agent.calls)) == (AgentState.WRAP_UP, ["call-1"])
    assert registry.wrapup_done("1001", "call-1").state is AgentState.READY


@pytest.mark.parametrize("state", sorted(DEVICE_IGNORED))
def test_device_feed_ignores_ctid_calls_and_logged_out_agents(registry: AgentRegistry, published: Published,
                                                              state: AgentState) -> None:
    put_in(registry, state)
    before = len(published.events)
    assert registry.set_busy("1001", True).state is state
    assert registry.set_busy("1001", False).state is state
    assert len(published.events) == before


# --------------------------------------------------------------------------- reading


def test_unknown_agent(registry: AgentRegistry) -> None:
    with pytest.raises(UnknownAgentError):
        registry.ready("nobody")
    assert "nobody" not in registry


def test_snapshot_lists_every_agent_by_tenant(registry: AgentRegistry) -> None:
    put_in(registry, AgentState.RESERVED)
    snap = registry.snapshot()
    assert [a["agent_id"] for a in snap] == ["1001", "1002", "2001"]
    assert snap[0] == {"agent_id": "1001", "tenant": "acme", "name": "Ana", "skills": {"lang:en": 7}, "max_calls": 1,
                       "state": "reserved", "reason": None, "device": "PJSIP/1001",
                       "since": "2026-12-01T09:00:00.000Z", "previous": "ready", "calls": 1, "call_ids": ["call-1"]}
    assert [a["agent_id"] for a in registry.snapshot("globex")] == ["2001"]


def test_wrapup_validates_its_fields(registry: AgentRegistry) -> None:
    put_in(registry, AgentState.WRAP_UP)
    with pytest.raises(AgentCommandError) as err:
        registry.wrapup_done("1001", "call 1\r\n")
    assert err.value.field == "call_id"
    with pytest.raises(AgentCommandError) as err:
        registry.wrapup_done("1001", "call-1", "x" * 65)
    assert err.value.field == "disposition"
    with pytest.raises(AgentCommandError) as err:
        registry.wrapup_done("1001", "call-1", "ok", "n" * 4001)
    assert err.value.field == "notes"
    assert registry.get("1001").state is AgentState.WRAP_UP
