"""The global matcher (``ctid.acd.router``), on the pure core with a virtual clock.

Unit tests for each rule, an overload simulation driven only at events (the
idle-while-a-call-waits figure is measured from the event timeline, not from the
router), and hypothesis properties checked against an independent model of who is
eligible for what.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctid.acd.expr import ANY, Expression, parse_expression
from ctid.acd.router import POLICIES, Expiry, Offer, Router, RouterError, RoutingRules
from ctid.acd.rules import Overflow, QueueRules, RelaxStep, Sticky, Target


class Clock:
    """A virtual clock: tests move it by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rules(queue_id: str, requires: str = "*", *, relax: tuple[tuple[float, str], ...] = (),
          **options: object) -> QueueRules:
    return QueueRules(queue_id, "acme", requires=parse_expression(requires),
                      relax=tuple(RelaxStep(after, parse_expression(text)) for after, text in relax),
                      **options)  # type: ignore[arg-type]


def pairs(offers: list[Offer]) -> list[tuple[str, str]]:
    return [(o.call_id, o.agent_id) for o in offers]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def router(clock: Clock) -> Router:
    return Router(clock)


# --------------------------------------------------------------------------- skills and policies


def test_call_goes_only_to_an_agent_matching_the_requirement(router: Router) -> None:
    zh = rules("zh", "lang:zh>=5 & product:broadband>=3")
    router.add_agent("low", {"lang:zh": 4, "product:broadband": 9}, ready=True)
    router.add_agent("en", {"lang:en": 9, "product:broadband": 9}, ready=True)
    router.enqueue("c1", zh)
    assert router.match() == []
    router.add_agent("fit", {"lang:zh": 5, "product:broadband": 3}, ready=True)
    assert pairs(router.match()) == [("c1", "fit")]


def test_agent_logging_in_with_matching_skills_is_indexed_for_existing_queues(router: Router) -> None:
    tv = rules("tv", "product:*>=3")
    router.enqueue("c1", tv)
    router.match()
    router.add_agent("a", {"product:tv": 4}, ready=True)
    assert pairs(router.match()) == [("c1", "a")]


def test_settled_agent_is_found_by_a_queue_created_later(router: Router) -> None:
    router.add_agent("a", {"lang:fr": 5}, ready=True)
    assert router.match() == []  # available, no queue at all yet
    router.enqueue("c1", rules("fr", "lang:fr"))
    assert pairs(router.match()) == [("c1", "a")]


def test_reloaded_rules_refile_waiting_calls_in_place(router: Router, clock: Clock) -> None:
    router.add_agent("junior", {"lang:zh": 3}, ready=True)
    router.enqueue("c1", rules("zh", "lang:zh>=8"))
    clock.now += 1
    router.enqueue("c2", rules("zh", "lang:zh>=8"))
    assert router.match() == []
    router.update_rules(rules("zh", "lang:zh", policy="round-robin"))
    assert pairs(router.match()) == [("c1", "junior")]
    assert router.position("c2") == 1


def test_longest_idle_picks_the_agent_ready_longest(router: Router, clock: Clock) -> None:
    q = rules("q", "lang:en")
    for name, at in (("b", 10.0), ("a", 20.0), ("c", 5.0)):
        clock.now = 1000.0 + at
        router.add_agent(name, {"lang:en": 5}, ready=True)
    router.match()
    router.enqueue("c1", q)
    router.enqueue("c2", q)
    assert pairs(router.match()) == [("c1", "c"), ("c2", "b")]


def test_most_skilled_uses_the_weighted_score(router: Router) -> None:
    q = rules("q", "lang:zh & product:*", policy="most-skilled", weights={"lang:zh": 3.0})
    router.add_agent("product_expert", {"lang:zh": 2, "product:tv": 10}, ready=True)  # 6 + 10 = 16
    router.add_agent("native", {"lang:zh": 5, "product:tv": 2}, ready=True)  # 15 + 2 = 17
    router.add_agent("unqualified", {"lang:zh": 10}, ready=True)
    router.match()
    router.enqueue("c1", q)
    router.enqueue("c2", q)
    assert pairs(router.match()) == [("c1", "native"), ("c2", "product_expert")]


def test_most_skilled_tie_goes_to_the_longest_idle(router: Router, clock: Clock) -> None:
    q = rules("q", "lang:zh", policy="most-skilled")
    router.add_agent("later", {"lang:zh": 5}, ready=True)
    clock.now -= 1
    router.add_agent("earlier", {"lang:zh": 5}, ready=True)
    router.match()
    router.enqueue("c1", q)
    assert pairs(router.match()) == [("c1", "earlier")]


def test_least_occupied_picks_the_agent_with_fewest_calls_handled(router: Router, clock: Clock) -> None:
    q = rules("q", "*", policy="least-occupied")
    router.add_agent("busy", {"x": 1}, ready=True)
    router.match()
    for n in range(2):  # "busy" handles two calls, with no wrap-up
        router.enqueue(f"w{n}", q)
        (offer,) = router.match()
        router.offer_done(offer.call_id, "busy", answered=True)
        router.call_ended("busy", wrapup=False)
        router.match()
    clock.now += 60
    router.add_agent("fresh", {"x": 1}, ready=True)  # idle for less time than "busy"
    router.match()
    router.enqueue("c1", q)
    assert pairs(router.match()) == [("c1", "fresh")]


def test_least_occupied_prefers_a_free_multi_slot_agent_with_fewer_calls(router: Router) -> None:
    q = rules("q", "*", policy="least-occupied")
    router.add_agent("chat", {"x": 1}, max_calls=3, ready=True)
    router.match()
    router.enqueue("c0", q)
    assert pairs(router.match()) == [("c0", "chat")]
    router.add_agent("other", {"x": 1}, max_calls=3, ready=True)
    router.match()
    router.enqueue("c1", q)
    assert pairs(router.match()) == [("c1", "other")]  # 0/3 occupied beats 1/3


def test_round_robin_rotates_through_the_agents(router: Router, clock: Clock) -> None:
    q = rules("q", "*", policy="round-robin")
    for name in ("a", "b", "c"):
        router.add_agent(name, {"x": 1}, ready=True)
        clock.now += 1
    router.match()
    served = []
    for n in range(6):
        router.enqueue(f"c{n}", q)
        (offer,) = router.match()
        served.append(offer.agent_id)
        router.offer_done(offer.call_id, offer.agent_id, answered=True)
        router.call_ended(offer.agent_id, wrapup=False)
        assert router.match() == []
    assert served == ["a", "b", "c", "a", "b", "c"]


def test_unknown_policy_is_a_router_error(router: Router) -> None:
    @dataclass(frozen=True)
    class Odd:
        queue_id: str = "odd"
        policy: str = "random"
        weights: Mapping[str, float] = field(default_factory=dict)
        sticky: None = None
        overflow: None = None
        max_wait_s: None = None

        def requirement_at(self, wait_s: float, ewt_s: float | None = None, depth: int | None = None) -> Expression:
            return ANY

        def next_boundary(self, wait_s: float) -> float | None:
            return None

    with pytest.raises(RouterError, match="policy"):
        router.enqueue("c1", Odd())


def test_any_object_with_the_protocol_attributes_can_be_the_rules(router: Router, clock: Clock) -> None:
    @dataclass(frozen=True)
    class Minimal:
        queue_id: str = "m"
        policy: str = "longest-idle"
        weights: Mapping[str, float] = field(default_factory=dict)
        sticky: None = None
        overflow: None = None
        max_wait_s: float | None = 50.0

        def requirement_at(self, wait_s: float, ewt_s: float | None = None, depth: int | None = None) -> Expression:
            return parse_expression("a" if wait_s < 10 else "b")

        def next_boundary(self, wait_s: float) -> float | None:
            return 10.0 if wait_s < 10 else None

    minimal: RoutingRules = Minimal()
    real: RoutingRules = rules("r")  # the real QueueRules satisfies the protocol too
    assert real.queue_id == "r"
    router.add_agent("b", {"b": 1}, ready=True)
    router.enqueue("c1", minimal)
    assert router.match() == []
    assert router.next_timer() == clock.now + 10
    clock.now += 10
    router.fire_timers(clock.now)
    assert pairs(router.match()) == [("c1", "b")]


# --------------------------------------------------------------------------- priority and fairness


def test_higher_priority_is_served_first_even_when_newer(router: Router, clock: Clock) -> None:
    q = rules("q", "lang:en")
    router.enqueue("old", q, priority=5)
    clock.now += 30
    router.enqueue("vip", q, priority=9)
    router.enqueue("low", q, priority=0)
    router.match()
    router.add_agent("a", {"lang:en": 5}, ready=True)
    assert pairs(router.match()) == [("vip", "a")]


def test_agent_in_several_queues_gets_the_oldest_eligible_call(router: Router, clock: Clock) -> None:
    sales = rules("sales", "lang:en")
    support = rules("support", "product:tv")
    billing = rules("billing", "product:billing")
    router.enqueue("billing-1", billing)  # the oldest, but the agent cannot take it
    clock.now += 1
    router.enqueue("sales-1", sales)
    clock.now += 1
    router.enqueue("support-1", support)
    clock.now += 1
    router.enqueue("sales-2", sales)
    router.match()
    router.add_agent("multi", {"lang:en": 5, "product:tv": 5}, ready=True)
    served = []
    for _ in range(3):
        (offer,) = router.match()
        served.append(offer.call_id)
        router.offer_done(offer.call_id, "multi", answered=True)
        router.call_ended("multi", wrapup=False)
    assert served == ["sales-1", "support-1", "sales-2"]
    assert router.is_waiting("billing-1")


def test_fairness_across_queues_priority_beats_age(router: Router, clock: Clock) -> None:
    sales = rules("sales", "lang:en")
    support = rules("support", "product:tv")
    router.enqueue("sales-old", sales, priority=5)
    clock.now += 20
    router.enqueue("support-vip", support, priority=7)
    router.match()
    router.add_agent("multi", {"lang:en": 5, "product:tv": 5}, ready=True)
    assert pairs(router.match()) == [("support-vip", "multi")]


def test_equal_age_and_priority_is_broken_by_call_id(router: Router) -> None:
    a, b = rules("a", "x"), rules("b", "x")
    router.enqueue("call-b", a)
    router.enqueue("call-a", b)
    router.match()
    router.add_agent("agent", {"x": 1}, ready=True)
    assert pairs(router.match()) == [("call-a", "agent")]


def test_freed_agent_takes_the_oldest_call_not_one_queued_in_the_same_batch(router: Router, clock: Clock) -> None:
    q = rules("q", "x")
    router.add_agent("a", {"x": 1})
    router.enqueue("old", q)
    router.match()
    clock.now += 5
    router.set_agent_ready("a", True)
    router.enqueue("new", q)  # same batch: the matcher must still pick "old"
    assert pairs(router.match()) == [("old", "a")]


def test_transfer_keeps_the_original_enqueue_time(router: Router, clock: Clock) -> None:
    q = rules("q", "x")
    router.enqueue("here-first", q)
    clock.now += 10
    router.enqueue("transferred", q, enqueued_at=clock.now - 60)
    router.match()
    router.add_agent("a", {"x": 1}, ready=True)
    (offer,) = router.match()
    assert (offer.call_id, offer.wait_s) == ("transferred", 60.0)


# --------------------------------------------------------------------------- timers


def test_relaxation_applies_exactly_at_the_boundary(router: Router, clock: Clock) -> None:
    q = rules("zh", "lang:zh>=5", relax=((30.0, "lang:zh>=3"), (90.0, "lang:zh | lang:en")))
    start = clock.now
    router.add_agent("junior", {"lang:zh": 3}, ready=True)
    router.add_agent("en", {"lang:en": 8}, ready=True)
    router.enqueue("c1", q)
    router.enqueue("c2", q)
    assert router.match() == []
    assert router.next_timer() == start + 30.0
    clock.now = start + 29.999
    assert router.fire_timers(clock.now) == []
    assert router.match() == []
    clock.now = start + 30.0
    assert router.fire_timers(clock.now) == []
    assert pairs(router.match()) == [("c1", "junior")]
    assert router.next_timer() == start + 90.0
    clock.now = start + 90.0
    router.fire_timers(clock.now)
    assert pairs(router.match()) == [("c2", "en")]
    assert router.next_timer() is None


def test_relaxation_fires_at_its_timer_despite_float_rounding(router: Router, clock: Clock) -> None:
    q = rules("zh", "lang:zh>=5", relax=((30.0, "lang:zh"),))
    clock.now = 1000.1  # (1000.1 + 30) - 1000.1 == 29.999999999999886 in binary floating point
    router.add_agent("junior", {"lang:zh": 1}, ready=True)
    router.enqueue("c1", q)
    router.match()
    at = router.next_timer()
    assert at == 1000.1 + 30.0
    clock.now = at
    router.fire_timers(at)
    assert pairs(router.match()) == [("c1", "junior")]
    assert router.next_timer() is None  # and no timer loop at the same instant


def test_relaxation_counts_from_the_original_enqueue_time(router: Router, clock: Clock) -> None:
    q = rules("zh", "lang:zh>=5", relax=((30.0, "lang:zh"),))
    router.add_agent("junior", {"lang:zh": 1}, ready=True)
    router.enqueue("c1", q, enqueued_at=clock.now - 40)  # already past the step
    assert pairs(router.match()) == [("c1", "junior")]


def test_sticky_call_waits_for_its_agent_until_the_deadline(router: Router, clock: Clock) -> None:
    q = rules("q", "x", sticky=Sticky(days=7, wait_s=20.0))
    start = clock.now
    router.add_agent("last", {"x": 5})
    router.add_agent("other", {"x": 5}, ready=True)
    router.enqueue("c1", q, sticky_agent="last")
    assert router.match() == []
    assert router.next_timer() == start + 20.0
    clock.now = start + 5
    router.set_agent_ready("last", True)
    assert pairs(router.match()) == [("c1", "last")]


def test_sticky_call_goes_to_anyone_after_the_deadline(router: Router, clock: Clock) -> None:
    q = rules("q", "x", sticky=Sticky(days=7, wait_s=20.0))
    start = clock.now
    router.add_agent("last", {"x": 5})
    router.add_agent("other", {"x": 5}, ready=True)
    router.enqueue("c1", q, sticky_agent="last")
    router.enqueue("c2", q)
    assert pairs(router.match()) == [("c2", "other")]  # c2 is not held: the free agent takes it
    router.offer_done("c2", "other", answered=True)
    router.call_ended("other", wrapup=False)
    assert router.match() == []  # c1 still waits for "last"
    clock.now = start + 20.0
    router.fire_timers(clock.now)
    assert pairs(router.match()) == [("c1", "other")]


def test_sticky_agent_not_logged_in_is_not_waited_for(router: Router) -> None:
    q = rules("q", "x", sticky=Sticky(days=7, wait_s=20.0))
    router.add_agent("other", {"x": 5}, ready=True)
    router.enqueue("c1", q, sticky_agent="gone")
    assert pairs(router.match()) == [("c1", "other")]


def test_sticky_agent_takes_an_older_call_first(router: Router, clock: Clock) -> None:
    q = rules("q", "x", sticky=Sticky(days=7, wait_s=60.0))
    router.add_agent("last", {"x": 5})
    router.enqueue("older", q)
    clock.now += 1
    router.enqueue("mine", q, sticky_agent="last")
    router.match()
    router.set_agent_ready("last", True)
    assert pairs(router.match()) == [("older", "last")]


def test_overflow_after_n_seconds_is_an_expiry(router: Router, clock: Clock) -> None:
    q = rules("q", "x", overflow=Overflow(Target("queue", "backup"), after_s=45.0), max_wait_s=300.0)
    start = clock.now
    router.enqueue("c1", q)
    router.match()
    assert router.next_timer() == start + 45.0
    clock.now = start + 45.0
    assert router.fire_timers(clock.now) == [Expiry("c1", "q", "overflow", start + 45.0, 45.0)]
    assert not router.is_waiting("c1")
    assert router.next_timer() is None
    assert router.depth("q") == 0


def test_max_wait_is_an_expiry_and_wins_a_tie_with_overflow(router: Router, clock: Clock) -> None:
    q = rules("q", "x", overflow=Overflow(Target("voicemail"), after_s=60.0), max_wait_s=60.0)
    start = clock.now
    router.enqueue("c1", q)
    clock.now = start + 61.0  # the dispatcher was late: both deadlines passed
    assert router.fire_timers(clock.now) == [Expiry("c1", "q", "max_wait", start + 60.0, 61.0)]


def test_expiries_come_in_deadline_order(router: Router, clock: Clock) -> None:
    q = rules("q", "x", max_wait_s=10.0)
    router.enqueue("b", q)
    clock.now += 1
    router.enqueue("a", q)
    clock.now += 20
    assert [e.call_id for e in router.fire_timers(clock.now)] == ["b", "a"]


def test_overflow_on_ewt_is_decided_at_entry(router: Router, clock: Clock) -> None:
    q = rules("q", "x", overflow=Overflow(Target("callback"), ewt_s=100.0))
    router.set_aht("q", 120.0)
    router.add_agent("a", {"x": 1})
    router.add_agent("b", {"x": 1})
    for name in ("a", "b"):  # both on a call: 2 staffed slots
        router.set_agent_ready(name, True)
        router.enqueue(f"busy-{name}", q)
        router.match()
        router.offer_done(f"busy-{name}", name, answered=True)
    router.enqueue("c1", q)  # EWT 1 * 120 / 2 = 60 s: stays
    router.enqueue("c2", q)  # EWT 2 * 120 / 2 = 120 s: overflows
    assert router.match() == []
    assert router.next_timer() == clock.now
    assert router.fire_timers(clock.now) == [Expiry("c2", "q", "overflow", clock.now, 0.0)]
    assert router.is_waiting("c1")


def test_next_timer_is_none_with_no_rule_to_wait_for(router: Router) -> None:
    router.enqueue("c1", rules("q", "x"))
    router.match()
    assert router.next_timer() is None


# --------------------------------------------------------------------------- RONA, wrap-up, lifecycle


def test_rona_returns_call_to_head_of_queue_keeping_priority_and_enqueue_time(router: Router, clock: Clock) -> None:
    q = rules("q", "x")
    start = clock.now
    router.add_agent("a", {"x": 1}, ready=True)
    router.enqueue("first", q, priority=6)
    assert pairs(router.match()) == [("first", "a")]
    clock.now += 5
    router.enqueue("second", q, priority=6)
    router.enqueue("older-by-clock", q, priority=6, enqueued_at=start - 100)  # a transfer, older
    router.match()
    clock.now += 15  # ring timeout
    router.offer_done("first", "a", answered=False)
    assert router.position("first") == 1  # ahead even of the older transferred call
    router.add_agent("b", {"x": 1}, ready=True)
    (offer,) = router.match()
    assert (offer.call_id, offer.agent_id, offer.priority, offer.enqueued_at) == ("first", "b", 6, start)


def test_rona_pauses_the_agent_and_excludes_it_from_that_call(router: Router, clock: Clock) -> None:
    q = rules("q", "x")
    router.add_agent("a", {"x": 1}, ready=True)
    router.enqueue("c1", q)
    router.match()
    router.offer_done("c1", "a", answered=False)
    assert router.match() == []  # paused: no new offer
    router.enqueue("c2", q)
    router.set_agent_ready("a", True)  # back quickly: gets c2, not the call it let ring
    assert pairs(router.match()) == [("c2", "a")]
    router.offer_done("c2", "a", answered=True)
    router.call_ended("a", wrapup=False)
    assert router.match() == []
    assert router.next_timer() == clock.now + 30.0  # end of the exclusion
    clock.now += 30.0
    router.fire_timers(clock.now)
    assert pairs(router.match()) == [("c1", "a")]


def test_wrapup_keeps_the_agent_not_ready_until_the_dispatcher_says_so(router: Router, clock: Clock) -> None:
    q = rules("q", "x")
    router.add_agent("a", {"x": 1}, ready=True)
    router.enqueue("c1", q)
    router.match()
    router.offer_done("c1", "a", answered=True)
    router.call_ended("a")
    router.enqueue("c2", q)
    assert router.match() == []
    clock.now += 30  # the queue's wrap-up, timed by the dispatcher
    router.set_agent_ready("a", True)
    assert pairs(router.match()) == [("c2", "a")]


def test_no_wrapup_makes_the_agent_available_at_hangup(router: Router) -> None:
    q = rules("q", "x")
    router.add_agent("a", {"x": 1}, ready=True)
    router.enqueue("c1", q)
    router.enqueue("c2", q)
    router.match()
    router.offer_done("c1", "a", answered=True)
    router.call_ended("a", wrapup=False)
    assert pairs(router.match()) == [("c2", "a")]


def test_abandon_of_an_offered_call_frees_the_agent(router: Router) -> None:
    q = rules("q", "x")
    router.add_agent("a", {"x": 1}, ready=True)
    router.enqueue("c1", q)
    router.enqueue("c2", q)
    router.match()
    assert router.dequeue("c1") is True
    assert pairs(router.match()) == [("c2", "a")]
    assert router.dequeue("c1") is False


def test_logout_of_a_ringing_agent_requeues_the_call_at_the_head(router: Router) -> None:
    q = rules("q", "x")
    router.add_agent("a", {"x": 1}, ready=True)
    router.enqueue("c1", q)
    router.match()
    router.enqueue("c2", q)
    router.remove_agent("a")
    assert router.position("c1") == 1
    router.add_agent("b", {"x": 1}, ready=True)
    assert pairs(router.match()) == [("c1", "b")]


def test_multi_slot_agent_gets_up_to_max_calls(router: Router) -> None:
    q = rules("q", "x")
    router.add_agent("chat", {"x": 1}, max_calls=2, ready=True)
    for n in range(3):
        router.enqueue(f"c{n}", q)
    assert pairs(router.match()) == [("c0", "chat"), ("c1", "chat")]
    router.offer_done("c0", "chat", answered=True)
    assert router.match() == []
    router.call_ended("chat", wrapup=False)
    assert pairs(router.match()) == [("c2", "chat")]


def test_skill_change_reindexes_the_agent(router: Router) -> None:
    q = rules("q", "lang:fr")
    router.add_agent("a", {"lang:en": 5}, ready=True)
    router.enqueue("c1", q)
    assert router.match() == []
    router.set_agent_skills("a", {"lang:fr": 5})
    assert pairs(router.match()) == [("c1", "a")]


def test_bad_events_are_router_errors(router: Router) -> None:
    q = rules("q", "x")
    router.enqueue("c1", q)
    with pytest.raises(RouterError):
        router.enqueue("c1", q)
    with pytest.raises(RouterError):
        router.enqueue("c2", q, priority=10)
    with pytest.raises(RouterError):
        router.set_agent_ready("nobody", True)
    with pytest.raises(RouterError):
        router.offer_done("c1", "nobody", answered=True)
    router.add_agent("a", {"x": 1})
    with pytest.raises(RouterError):
        router.add_agent("a", {"x": 1})
    with pytest.raises(RouterError):
        router.call_ended("a")


# --------------------------------------------------------------------------- EWT


def test_ewt_uses_position_eligible_agents_and_aht(router: Router) -> None:
    q = rules("q", "lang:en")
    for n in range(4):
        router.add_agent(f"a{n}", {"lang:en": 5}, ready=True)
    router.add_agent("fr", {"lang:fr": 5}, ready=True)  # not eligible: not counted
    for n in range(4):
        router.enqueue(f"busy{n}", q)
    for offer in router.match():
        router.offer_done(offer.call_id, offer.agent_id, answered=True)
    for n in range(3):
        router.enqueue(f"w{n}", q)
    router.enqueue("vip", q, priority=9)
    router.match()
    assert [router.position(c) for c in ("vip", "w0", "w1", "w2")] == [1, 2, 3, 4]
    # EWT = (ahead + 1 - free) * AHT / N, N = 4 staffed eligible slots
    assert router.ewt("vip", aht_s=120.0) == pytest.approx(30.0)
    assert router.ewt("w2", aht_s=120.0) == pytest.approx(120.0)
    assert router.ewt("w2") is None  # no measured AHT yet
    router.set_aht("q", 60.0)
    assert router.ewt("w2") == pytest.approx(60.0)
    assert router.queue_ewt(q, priority=5) == pytest.approx(5 * 60.0 / 4)
    assert router.queue_ewt(q, priority=9) == pytest.approx(2 * 60.0 / 4)


def test_callbacks_that_share_the_line_count_ahead(router: Router, clock: Clock) -> None:
    q, twin = rules("q", "lang:en"), rules("q~callback", "lang:en")
    router.add_agent("busy", {"lang:en": 5}, ready=True)
    router.enqueue("talking", q)
    for offer in router.match():
        router.offer_done(offer.call_id, offer.agent_id, answered=True)
    router.enqueue("cb-old", twin, enqueued_at=clock.now - 30)  # left a number, kept its place
    router.enqueue("live", q)
    clock.now += 1
    router.enqueue("cb-late", twin)  # joined after "live": behind it
    assert router.position("live") == 1 and router.ewt("live", aht_s=60.0) == pytest.approx(60.0)
    router.share_line("q", "q~callback")
    assert router.position("live") == 2  # cb-old is ahead, cb-late is not
    assert router.ewt("live", aht_s=60.0) == pytest.approx(120.0)
    assert router.queue_ewt(q, aht_s=60.0) == pytest.approx(4 * 60.0)  # live, cb-old and cb-late ahead


def test_oldest_enqueued_at_is_the_oldest_waiting_call_whatever_its_priority(router: Router, clock: Clock) -> None:
    q = rules("q", "lang:en")
    assert router.oldest_enqueued_at("q") is None and router.oldest_enqueued_at("unknown") is None
    router.enqueue("vip-new", q, 9, enqueued_at=clock.now - 1)
    router.enqueue("low-old", q, 1, enqueued_at=clock.now - 50)
    router.enqueue("mid", q, 5, enqueued_at=clock.now - 20)
    router.enqueue("head-mid", q, 5, enqueued_at=clock.now - 10, head=True)
    assert router.oldest_enqueued_at("q") == clock.now - 50
    router.add_agent("a", {"lang:en": 5}, ready=True)
    assert pairs(router.match()) == [("vip-new", "a")]
    router.dequeue("low-old")
    assert router.oldest_enqueued_at("q") == clock.now - 20  # an offered call is not waiting
    router.offer_done("vip-new", "a", answered=False)  # back at the head, with its own enqueue time
    assert router.oldest_enqueued_at("q") == clock.now - 20
    for call in ("vip-new", "mid", "head-mid"):
        router.dequeue(call)
    assert router.oldest_enqueued_at("q") is None


def test_oldest_enqueued_at_matches_a_scan_of_the_waiting_calls(router: Router) -> None:
    rng = random.Random(7)
    q = rules("q", "*")
    waiting: dict[str, float] = {}
    for n in range(400):
        if waiting and rng.random() < 0.4:
            call = rng.choice(sorted(waiting))
            router.dequeue(call)
            del waiting[call]
        else:
            at = rng.choice([100.0, 200.0, 300.0]) + rng.random()  # ties across groups too
            router.enqueue(f"c{n}", q, rng.randrange(10), enqueued_at=at, head=rng.random() < 0.2)
            waiting[f"c{n}"] = at
        assert router.oldest_enqueued_at("q") == (min(waiting.values()) if waiting else None)


def test_ewt_is_none_when_no_eligible_agent_is_staffed(router: Router) -> None:
    q = rules("q", "lang:zh")
    router.set_aht("q", 100.0)
    router.add_agent("paused", {"lang:zh": 5})
    router.enqueue("c1", q)
    assert router.ewt("c1") is None
    router.set_agent_ready("paused", True)
    assert pairs(router.match()) == [("c1", "paused")]


def test_ewt_relaxation_step_is_reevaluated_at_refresh(router: Router) -> None:
    q = QueueRules("q", "acme", requires=parse_expression("lang:zh>=8"),
                   relax=(RelaxStep(0.0, parse_expression("lang:zh"), ewt_s=100.0),))
    router.set_aht("q", 300.0)
    router.add_agent("expert", {"lang:zh": 9}, ready=True)
    router.add_agent("junior", {"lang:zh": 2})
    router.enqueue("busy", q)
    router.match()
    router.offer_done("busy", "expert", answered=True)
    router.enqueue("c1", q)  # EWT 1 * 300 / 1 = 300 s >= 100: relaxed at once
    router.set_agent_ready("junior", True)
    assert pairs(router.match()) == [("c1", "junior")]


# --------------------------------------------------------------------------- overload simulation


SIM_QUEUES = {
    "tv-en": rules("tv-en", "lang:en>=5 & product:tv>=5", relax=((20.0, "lang:en & product:tv"), (60.0, "lang:en")),
                   max_wait_s=300.0),
    "tv-es": rules("tv-es", "lang:es>=5", relax=((30.0, "lang:es"),), max_wait_s=300.0, policy="most-skilled"),
    "net-en": rules("net-en", "lang:en>=5 & product:net>=5", relax=((40.0, "lang:en & product:*"),),
                    max_wait_s=300.0, policy="least-occupied"),
}
SIM_MIX = (("tv-en", 0.5), ("tv-es", 0.2), ("net-en", 0.3))


def _sim_agents(rng: random.Random) -> dict[str, dict[str, int]]:
    agents: dict[str, dict[str, int]] = {}
    for n in range(20):
        agents[f"en{n:02d}"] = {"lang:en": rng.randint(4, 9), "product:tv": rng.randint(3, 9)}
    for n in range(10):
        agents[f"es{n:02d}"] = {"lang:es": rng.randint(4, 9), "lang:en": 3, "product:tv": 4}
    for n in range(10):
        agents[f"net{n:02d}"] = {"lang:en": rng.randint(5, 8), "product:net": rng.randint(4, 9)}
    return agents


def simulate(*, grid_s: float | None = None, duration_s: float = 1500.0, seed: int = 7) -> dict[str, float]:
    """Discrete-event overload: 40 agents, Poisson arrivals at 1.2x capacity, exponential
    handle times (mean 15 s), 1 s ring, 2 s wrap-up, 3 % RONA (8 s, then 45 s paused),
    exponential patience (mean 120 s) and a 300 s max wait.

    With ``grid_s`` None the driver calls the router at every event and at every
    ``next_timer()``; with a grid it only calls ``fire_timers``/``match`` on that grid,
    like app_queue's 1-second poll (the control). Returns the agent time spent idle
    while an eligible call waited, measured from the driver's own event timeline: the
    driver keeps its own agent states and recomputes eligibility from the rules, so the
    figure does not trust the router."""
    rng = random.Random(seed)
    clock = Clock(0.0)
    router = Router(clock)
    skills = _sim_agents(rng)
    state = dict.fromkeys(skills, "idle")
    for agent_id, agent_skills in skills.items():
        router.add_agent(agent_id, agent_skills, ready=True)
    router.match()
    handle_s, ring_s, wrap_s, rona_p, rona_ring_s, pause_s = 15.0, 1.0, 2.0, 0.03, 8.0, 45.0
    capacity = len(skills) / (ring_s + handle_s + wrap_s)
    rate = 1.2 * capacity
    calls: dict[str, tuple[QueueRules, float]] = {}  # every call: its rules and enqueue time
    waiting: dict[str, tuple[QueueRules, float]] = {}
    events: list[tuple[float, int, str, str, str]] = []
    seq = [0]

    def push(at: float, kind: str, a: str = "", b: str = "") -> None:
        # Times on a 2**-20 s grid: ``(enq + 20) - enq`` is then exactly 20, so this
        # model and the router agree on which side of a boundary an instant is.
        seq[0] += 1
        heapq.heappush(events, (round(at * 2**20) / 2**20, seq[0], kind, a, b))

    push(rng.expovariate(rate), "arrival")
    if grid_s is not None:
        push(grid_s, "tick")
    idle_eligible = 0.0
    waiting_time = 0.0
    depth_time = 0.0
    offers_total = 0
    relaxed_offers = 0

    def eligible(agent_id: str, at: float) -> bool:
        return any(r.requirement_at(at - enq).matches(skills[agent_id]) for r, enq in waiting.values())

    def account(t0: float, t1: float) -> None:
        nonlocal idle_eligible, waiting_time, depth_time
        if t1 <= t0:
            return
        if waiting:
            waiting_time += t1 - t0
            depth_time += len(waiting) * (t1 - t0)
        idle = [a for a, s in state.items() if s == "idle"]
        if not idle or not waiting:
            return
        cuts = {t0, t1}
        for r, enq in waiting.values():  # requirement changes inside the interval
            cuts.update(enq + step.after_s for step in r.relax if t0 < enq + step.after_s < t1)
        points = sorted(cuts)
        for s, e in itertools.pairwise(points):
            idle_eligible += sum(1 for a in idle if eligible(a, s)) * (e - s)

    def apply(offers: list[Offer]) -> None:
        nonlocal offers_total, relaxed_offers
        for offer in offers:
            r, enq = waiting.pop(offer.call_id)
            assert state[offer.agent_id] == "idle"
            assert r.requirement_at(clock.now - enq).matches(skills[offer.agent_id])
            offers_total += 1
            relaxed_offers += not r.requires.matches(skills[offer.agent_id])
            state[offer.agent_id] = "ringing"
            if rng.random() < rona_p:
                push(clock.now + rona_ring_s, "rona", offer.call_id, offer.agent_id)
            else:
                push(clock.now + ring_s, "answer", offer.call_id, offer.agent_id)

    def decide() -> None:
        for expiry in router.fire_timers(clock.now):
            waiting.pop(expiry.call_id)
        apply(router.match())

    n_calls = 0
    last = 0.0
    while True:
        t_event = events[0][0] if events else math.inf
        timer = router.next_timer() if grid_s is None else None
        at = min(t_event, math.inf if timer is None else timer)
        if at > duration_s:
            account(last, duration_s)
            break
        account(last, at)
        clock.now = last = at
        if timer is not None and timer <= t_event:
            decide()
            continue
        _, _, kind, a, b = heapq.heappop(events)
        if kind == "arrival":
            n_calls += 1
            call_id = f"c{n_calls:05d}"
            queue_id = rng.choices([q for q, _ in SIM_MIX], [w for _, w in SIM_MIX])[0]
            router.enqueue(call_id, SIM_QUEUES[queue_id])
            calls[call_id] = waiting[call_id] = (SIM_QUEUES[queue_id], clock.now)
            push(clock.now + rng.expovariate(1 / 120.0), "abandon", call_id)
            push(clock.now + rng.expovariate(rate), "arrival")
        elif kind == "abandon":
            if waiting.pop(a, None) is not None:  # a ringing or answered caller stays
                assert router.dequeue(a)
        elif kind == "answer":
            router.offer_done(a, b, answered=True)
            state[b] = "talking"
            push(clock.now + rng.expovariate(1 / handle_s), "hangup", a, b)
        elif kind == "rona":
            router.offer_done(a, b, answered=False)
            state[b] = "paused"
            waiting[a] = calls[a]
            push(clock.now + pause_s, "back", "", b)
        elif kind == "hangup":
            router.call_ended(b, wrapup=True)
            state[b] = "wrap"
            push(clock.now + wrap_s, "back", "", b)
        elif kind == "back":
            router.set_agent_ready(b, True)
            state[b] = "idle"
        elif kind == "tick":
            push(clock.now + (grid_s or 1.0), "tick")
        if grid_s is None or kind == "tick":
            decide()
    agent_time = len(skills) * duration_s
    return {"idle_eligible_fraction": idle_eligible / agent_time, "calls": n_calls,
            "waiting_fraction": waiting_time / duration_s, "mean_depth": depth_time / duration_s,
            "offers": offers_total, "relaxed_offers": relaxed_offers}


def test_overload_agents_are_never_idle_while_an_eligible_call_waits() -> None:
    result = simulate()
    assert result["calls"] > 3000
    assert result["waiting_fraction"] > 0.95  # overloaded: calls waited nearly all the time
    assert result["mean_depth"] > 10
    assert result["relaxed_offers"] > 0  # the relaxation timers did their part
    assert result["idle_eligible_fraction"] < 0.01


def test_overload_measure_detects_a_one_second_polling_grid() -> None:
    # The control: the same workload matched only on a 1 s grid (app_queue's behaviour)
    # leaves agents idle next to eligible callers; the measure must see it.
    result = simulate(grid_s=1.0)
    assert result["idle_eligible_fraction"] > 0.01


# --------------------------------------------------------------------------- properties (hypothesis)

PROP_SKILLS = ("lang:en", "lang:zh", "product:tv", "product:net")


def _prop_queues(policies: list[str], *, relax: bool = True) -> list[QueueRules]:
    if not relax:
        return [rules("q0", "lang:en>=5", policy=policies[0]),
                rules("q1", "lang:zh & product:*>=3", policy=policies[1]),
                rules("q2", "product:net", policy=policies[2])]
    return [
        rules("q0", "lang:en>=5", relax=((10.0, "lang:en"),), policy=policies[0], max_wait_s=80.0),
        rules("q1", "lang:zh & product:*>=3", relax=((5.0, "lang:zh | product:tv"), (20.0, "*")),
              policy=policies[1], overflow=Overflow(Target("voicemail"), after_s=60.0)),
        rules("q2", "product:net", policy=policies[2], weights={"product:net": 2.0}),
    ]


@dataclass
class _MCall:
    rules: QueueRules
    priority: int
    enqueued_at: float
    head: bool = False
    agent: str | None = None  # offered to
    excluded: dict[str, float] = field(default_factory=dict)

    def key(self, call_id: str) -> tuple[int, int, float, str]:
        return (-self.priority, 0 if self.head else 1, self.enqueued_at, call_id)


@dataclass
class _MAgent:
    skills: dict[str, int]
    max_calls: int
    logged_in: bool = True
    ready: bool = False
    offers: set[str] = field(default_factory=set)
    answered: int = 0

    @property
    def available(self) -> bool:
        return self.logged_in and self.ready and len(self.offers) + self.answered < self.max_calls


class Harness:
    """Drives a router with a list of operations, like a dispatcher would (after each
    event: fire due timers, then match), and checks every decision against its own
    model of the calls and agents. Times are multiples of 0.5 s, so the model's
    ``requirement_at(now - enqueued_at)`` is exact at a boundary."""

    EXCLUDE_S = 30.0

    def __init__(self, agents: list[tuple[dict[str, int], int]], queues: list[QueueRules]) -> None:
        self.clock = Clock(0.0)
        self.router = Router(self.clock, exclude_s=self.EXCLUDE_S)
        self.queues = queues
        self.agents = {f"a{i}": _MAgent(dict(s), m, ready=True) for i, (s, m) in enumerate(agents)}
        for agent_id, agent in self.agents.items():
            self.router.add_agent(agent_id, agent.skills, max_calls=agent.max_calls, ready=True)
        self.calls: dict[str, _MCall] = {}
        self.count = 0
        self.log: list[tuple[Any, ...]] = []

    # -- the model's view of eligibility

    def eligible(self, agent_id: str, call: _MCall) -> bool:
        now = self.clock.now
        return (call.rules.requirement_at(now - call.enqueued_at).matches(self.agents[agent_id].skills)
                and call.excluded.get(agent_id, -math.inf) <= now)

    def waiting(self) -> dict[str, _MCall]:
        return {cid: c for cid, c in self.calls.items() if c.agent is None}

    # -- operations

    def run(self, ops: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        for op in ops:
            self.step(op)
        return self.log

    def step(self, op: tuple[Any, ...]) -> None:
        kind, *args = op
        router, ids = self.router, sorted(self.agents)
        if kind == "ready":
            agent_id = ids[int(args[0]) % len(ids)]
            agent = self.agents[agent_id]
            if agent.logged_in:
                router.set_agent_ready(agent_id, bool(args[1]))
                agent.ready = bool(args[1])
        elif kind == "enqueue":
            self.count += 1
            call_id = f"c{self.count:03d}"
            queue = self.queues[int(args[0]) % len(self.queues)]
            router.enqueue(call_id, queue, int(args[1]))
            self.calls[call_id] = _MCall(queue, int(args[1]), self.clock.now)
        elif kind == "dequeue" and self.calls:
            call_id = sorted(self.calls)[int(args[0]) % len(self.calls)]
            assert router.dequeue(call_id)
            call = self.calls.pop(call_id)
            if call.agent is not None:
                self.agents[call.agent].offers.discard(call_id)
        elif kind in ("answer", "rona"):
            offered = sorted((cid, c.agent) for cid, c in self.calls.items() if c.agent is not None)
            if offered:
                call_id, agent_id = offered[int(args[0]) % len(offered)]
                assert agent_id is not None
                router.offer_done(call_id, agent_id, answered=kind == "answer")
                agent = self.agents[agent_id]
                agent.offers.discard(call_id)
                if kind == "answer":
                    agent.answered += 1
                    del self.calls[call_id]
                else:
                    agent.ready = False
                    call = self.calls[call_id]
                    call.agent, call.head = None, True
                    call.excluded[agent_id] = self.clock.now + self.EXCLUDE_S
        elif kind == "end":
            agent_id = ids[int(args[0]) % len(ids)]
            agent = self.agents[agent_id]
            if agent.logged_in and agent.answered:
                router.call_ended(agent_id, wrapup=bool(args[1]))
                agent.answered -= 1
                agent.ready = agent.ready and not args[1]
        elif kind == "logout":
            agent_id = ids[int(args[0]) % len(ids)]
            agent = self.agents[agent_id]
            if agent.logged_in:
                router.remove_agent(agent_id)
                for call_id in agent.offers:
                    self.calls[call_id].agent, self.calls[call_id].head = None, True
                self.agents[agent_id] = _MAgent(agent.skills, agent.max_calls, logged_in=False)
        elif kind == "login":
            agent_id = ids[int(args[0]) % len(ids)]
            agent = self.agents[agent_id]
            if not agent.logged_in:
                router.add_agent(agent_id, agent.skills, max_calls=agent.max_calls)
                agent.logged_in = True
        elif kind == "advance":
            target = self.clock.now + 0.5 * int(args[0])
            while (at := router.next_timer()) is not None and at <= target:
                self.clock.now = max(self.clock.now, at)
                self.settle()
            self.clock.now = target
        self.settle()

    def settle(self) -> None:
        """What the dispatcher does after an event: fire due timers, match, repeat."""
        while True:
            expiries = self.router.fire_timers(self.clock.now)
            self.apply_expiries(expiries)
            offers = self.router.match()
            self.apply_offers(offers)
            at = self.router.next_timer()
            if not expiries and not offers and (at is None or at > self.clock.now):
                break
        self.check_stable()

    # -- checks

    def apply_expiries(self, expiries: list[Expiry]) -> None:
        now = self.clock.now
        for expiry in expiries:
            call = self.calls.pop(expiry.call_id)
            assert call.agent is None, "an offered call cannot expire"
            r = call.rules
            limit = r.max_wait_s if expiry.reason == "max_wait" else (r.overflow.after_s if r.overflow else None)
            assert limit is not None and expiry.at == call.enqueued_at + limit <= now
            self.log.append(("expiry", now, expiry.call_id, expiry.reason))

    def apply_offers(self, offers: list[Offer]) -> None:
        for offer in offers:
            call, agent = self.calls[offer.call_id], self.agents[offer.agent_id]
            assert call.agent is None, "offered a call that is not waiting"
            assert agent.available, f"{offer.agent_id} offered a call beyond its slots or not ready"
            assert self.eligible(offer.agent_id, call), "offered to an ineligible agent"
            call.agent = offer.agent_id
            agent.offers.add(offer.call_id)
            self.log.append(("offer", self.clock.now, offer.call_id, offer.agent_id))
        waiting = self.waiting()
        for offer in offers:  # fairness: the agent got the best call it was eligible for
            key = self.calls[offer.call_id].key(offer.call_id)
            for call_id, call in waiting.items():
                assert not (call.key(call_id) < key and self.eligible(offer.agent_id, call)), (
                    f"{offer.agent_id} got {offer.call_id} while the better {call_id} waited")

    def check_stable(self) -> None:
        now = self.clock.now
        waiting = self.waiting()
        for call_id, call in waiting.items():
            for limit in (call.rules.max_wait_s, call.rules.overflow.after_s if call.rules.overflow else None):
                assert limit is None or call.enqueued_at + limit > now, f"{call_id} waits past its deadline"
        for agent_id, agent in self.agents.items():
            if agent.available:
                for call_id, call in waiting.items():
                    assert not self.eligible(agent_id, call), f"{agent_id} idles while {call_id} waits"


_skills = st.dictionaries(st.sampled_from(PROP_SKILLS), st.integers(1, 10), min_size=1, max_size=4)
_index = st.integers(0, 50)
_ENQUEUE = st.tuples(st.just("enqueue"), st.integers(0, 2), st.integers(0, 9))
_ANSWER = st.tuples(st.just("answer"), _index)
_END = st.tuples(st.just("end"), _index, st.booleans())
_ADVANCE = st.tuples(st.just("advance"), st.integers(1, 80))
_READY = st.tuples(st.just("ready"), _index, st.booleans())
# Branches repeated to weight them: enough calls and hang-ups that agents free up often.
_OPS = st.one_of(
    _ENQUEUE, _ENQUEUE, _ENQUEUE, _ANSWER, _ANSWER, _END, _END, _ADVANCE, _ADVANCE, _READY,
    st.tuples(st.just("ready"), _index, st.just(True)),
    st.tuples(st.just("dequeue"), _index),
    st.tuples(st.just("rona"), _index),
    st.tuples(st.just("logout"), _index),
    st.tuples(st.just("login"), _index),
)
_POLICY_LISTS = st.lists(st.sampled_from(POLICIES), min_size=3, max_size=3)
_PROP_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROP_SETTINGS
@given(agents=st.lists(st.tuples(_skills, st.just(1)), min_size=1, max_size=6),
       policies=_POLICY_LISTS, ops=st.lists(_OPS, min_size=10, max_size=120))
def test_property_no_agent_is_ever_offered_two_calls_at_once(agents: list[tuple[dict[str, int], int]],
                                                             policies: list[str],
                                                             ops: list[tuple[Any, ...]]) -> None:
    harness = Harness(agents, _prop_queues(policies))
    harness.run(ops)  # apply_offers asserts each agent is free (and ready) when offered
    for agent in harness.agents.values():
        assert len(agent.offers) + agent.answered <= 1


@_PROP_SETTINGS
@given(agents=st.lists(st.tuples(_skills, st.integers(1, 2)), min_size=1, max_size=6),
       policies=_POLICY_LISTS, ops=st.lists(_OPS, min_size=10, max_size=120))
def test_property_offers_go_to_eligible_agents_the_best_call_first_and_nobody_idles(
        agents: list[tuple[dict[str, int], int]], policies: list[str], ops: list[tuple[Any, ...]]) -> None:
    # Eligibility, slots, fairness (no better eligible call left waiting) and the
    # invariant (no available agent next to an eligible waiting call) after every event.
    Harness(agents, _prop_queues(policies)).run(ops)


_FIFO_ENQUEUE = st.tuples(st.just("enqueue"), st.integers(0, 2), st.just(5))
_FIFO_OPS = st.one_of(
    _FIFO_ENQUEUE, _FIFO_ENQUEUE, _FIFO_ENQUEUE, _ANSWER, _ANSWER, _END, _END, _ADVANCE, _READY,
    st.tuples(st.just("ready"), _index, st.just(True)),
    st.tuples(st.just("dequeue"), _index),
)


@_PROP_SETTINGS
@given(agents=st.lists(st.tuples(_skills, st.integers(1, 2)), min_size=1, max_size=6),
       policies=_POLICY_LISTS, ops=st.lists(_FIFO_OPS, min_size=10, max_size=120))
def test_property_equal_priority_calls_are_served_fifo_within_a_skill_set(
        agents: list[tuple[dict[str, int], int]], policies: list[str], ops: list[tuple[Any, ...]]) -> None:
    harness = Harness(agents, _prop_queues(policies, relax=False))
    log = harness.run(ops)
    queue_of = {f"c{n + 1:03d}": q for n, q in enumerate(
        int(op[1]) % 3 for op in ops if op[0] == "enqueue")}
    for queue in range(3):
        served = [entry[2] for entry in log if entry[0] == "offer" and queue_of[str(entry[2])] == queue]
        assert served == sorted(served), f"queue q{queue} served out of order: {served}"


@_PROP_SETTINGS
@given(agents=st.lists(st.tuples(_skills, st.integers(1, 2)), min_size=1, max_size=6),
       policies=_POLICY_LISTS, ops=st.lists(_OPS, min_size=10, max_size=120))
def test_property_decisions_are_deterministic_given_the_same_events(
        agents: list[tuple[dict[str, int], int]], policies: list[str], ops: list[tuple[Any, ...]]) -> None:
    first = Harness(agents, _prop_queues(policies)).run(ops)
    second = Harness(agents, _prop_queues(policies)).run(ops)
    assert first == second
