"""Queue routing rules: defaults, relaxation over time / EWT / depth, timers, priority."""

from __future__ import annotations

import pytest

from ctid.acd.expr import ANY, parse_expression
from ctid.acd.rules import (
    CALLBACK,
    HANGUP,
    VOICEMAIL,
    Overflow,
    QueueRules,
    RelaxStep,
    Sticky,
    Target,
    queue_rules,
)
from ctid.config import QueueConfig, parse

ZH5 = parse_expression("lang:zh>=5")
ZH3 = parse_expression("lang:zh>=3")
PRODUCT = parse_expression("product:*")


def _rules(**kwargs: object) -> QueueRules:
    return QueueRules("support", "acme", **kwargs)  # type: ignore[arg-type]


def test_defaults_from_a_minimal_queue_config() -> None:
    rules = QueueRules.from_config(QueueConfig(id="support", tenant="acme"))
    assert rules == QueueRules("support", "acme")
    assert rules.requires is ANY and rules.policy == "longest-idle" and rules.relax == ()
    assert rules.priority == 5 and rules.vip_priority == 9 and rules.vip_numbers == frozenset()
    assert (rules.wrapup_s, rules.ring_timeout_s, rules.checkin_s) == (0.0, 15.0, 5.0)
    assert (rules.short_abandon_s, rules.sl_threshold_s) == (5.0, 20.0)
    assert rules.sticky is None and rules.overflow is None and not rules.closed


def test_no_limit_applies_unless_configured() -> None:
    rules = _rules()
    assert not rules.max_wait_reached(10 ** 9) and not rules.is_full(10 ** 6)
    assert rules.entry_target(10 ** 6) is None and rules.exit_target(10 ** 9, ewt_s=10 ** 9) is None
    assert rules.next_timer(0.0, sticky=True) is None
    assert rules.requirement_at(10 ** 9, 10 ** 9, 10 ** 6) is ANY


def test_relaxation_replaces_the_requirement_over_wait_time() -> None:
    rules = _rules(requires=ZH5, relax=(RelaxStep(30, ZH3), RelaxStep(90, PRODUCT)))
    assert rules.requirement_at(0) == ZH5
    assert rules.requirement_at(29.999) == ZH5
    assert rules.requirement_at(30) == ZH3  # applies the instant its timer fires
    assert rules.requirement_at(89) == ZH3
    assert rules.requirement_at(90) == PRODUCT and rules.requirement_at(3600) == PRODUCT


def test_next_boundary_walks_the_steps_then_stops() -> None:
    rules = _rules(requires=ZH5, relax=(RelaxStep(30, ZH3), RelaxStep(90, PRODUCT)))
    assert rules.next_boundary(0) == 30
    assert rules.next_boundary(29.5) == 30
    assert rules.next_boundary(30) == 90  # strictly after: no timer that fires at once
    assert rules.next_boundary(90) is None
    assert _rules().next_boundary(0) is None


def test_a_router_following_next_boundary_sees_every_change() -> None:
    steps = (RelaxStep(10, ZH3), RelaxStep(10, PRODUCT, depth=3), RelaxStep(45, ANY))
    rules = _rules(requires=ZH5, relax=steps)
    wait, seen = 0.0, [rules.requirement_at(0)]
    while (boundary := rules.next_boundary(wait)) is not None:
        wait = boundary
        seen.append(rules.requirement_at(wait, depth=1))
    assert seen == [ZH5, ZH3, ANY]


def test_relaxation_by_ewt() -> None:
    rules = _rules(requires=ZH5, relax=(RelaxStep(0, ZH3, ewt_s=120),))
    assert rules.requirement_at(0, ewt_s=119) == ZH5
    assert rules.requirement_at(0, ewt_s=120) == ZH3
    assert rules.requirement_at(500) == ZH5  # EWT unknown: the condition does not hold
    assert rules.uses_ewt and not rules.uses_depth


def test_relaxation_by_queue_depth() -> None:
    rules = _rules(requires=ZH5, relax=(RelaxStep(0, ZH3, depth=10),))
    assert rules.requirement_at(5, depth=9) == ZH5
    assert rules.requirement_at(5, depth=10) == ZH3
    assert rules.requirement_at(5) == ZH5
    assert rules.uses_depth and not rules.uses_ewt


def test_a_step_needs_its_wait_and_every_condition() -> None:
    step = RelaxStep(30, ZH3, ewt_s=60, depth=5)
    assert step.applies(30, 60, 5)
    assert not step.applies(29, 600, 50)
    assert not step.applies(30, 59, 50)
    assert not step.applies(30, 600, 4)


def test_the_last_step_that_applies_wins() -> None:
    rules = _rules(requires=ZH5, relax=(RelaxStep(0, ZH3, ewt_s=60), RelaxStep(90, PRODUCT, depth=20)))
    assert rules.requirement_at(100, ewt_s=70, depth=5) == ZH3  # step 2's depth not met
    assert rules.requirement_at(100, ewt_s=70, depth=20) == PRODUCT
    assert rules.requirement_at(100, ewt_s=10, depth=20) == PRODUCT
    assert rules.requirements() == (ZH5, ZH3, PRODUCT)


def test_next_timer_covers_overflow_max_wait_and_sticky() -> None:
    rules = _rules(relax=(RelaxStep(30, ZH3),), overflow=Overflow(VOICEMAIL, after_s=120), max_wait_s=300,
                   sticky=Sticky(days=7, wait_s=20))
    assert rules.next_timer(0) == 30
    assert rules.next_timer(0, sticky=True) == 20
    assert rules.next_timer(30) == 120
    assert rules.next_timer(120) == 300
    assert rules.next_timer(300) is None


def test_vip_callers_get_the_vip_priority() -> None:
    rules = _rules(vip_numbers=frozenset({"+442071234567"}), vip_priority=9)
    assert rules.priority_for("+442071234567") == 9 and rules.is_vip("+442071234567")
    assert rules.priority_for("+442071234568") == 5
    assert rules.priority_for("442071234567") == 5  # exact E.164 only
    assert rules.priority_for(None) == 5 and not rules.is_vip(None)


def test_an_assigned_priority_replaces_the_default_and_vip_only_raises_it() -> None:
    rules = _rules(priority=5, vip_numbers=frozenset({"+15551230000"}), vip_priority=7)
    assert rules.priority_for(None, assigned=2) == 2  # the IVR may lower it
    assert rules.priority_for("+15551230000", assigned=2) == 7
    assert rules.priority_for("+15551230000", assigned=8) == 8
    with pytest.raises(ValueError):
        rules.priority_for(None, assigned=10)


def test_overflow_after_time_or_ewt_whichever_first() -> None:
    both = Overflow(Target("queue", "sales"), after_s=120, ewt_s=300)
    assert not both.due(119, 299)
    assert both.due(120) and both.due(0, 300)
    assert not Overflow(CALLBACK, ewt_s=60).due(10 ** 6)  # EWT unknown
    rules = _rules(overflow=both, max_wait_s=600, max_wait_action=HANGUP)
    assert rules.exit_target(10) is None
    assert rules.exit_target(130) == Target("queue", "sales")
    assert rules.exit_target(600) == HANGUP  # max wait wins once reached
    assert rules.overflow_due(0, 300) and not rules.overflow_due(0, None)
    with pytest.raises(ValueError):
        Overflow(VOICEMAIL)


def test_closed_and_full_queues_send_new_calls_away() -> None:
    rules = _rules(max_queue_length=2, full_action=CALLBACK)
    assert rules.entry_target(1) is None and rules.entry_target(2) == CALLBACK
    closed = _rules(closed=True, closed_action=Target.parse("queue:night"))
    assert closed.entry_target(0) == Target("queue", "night")


def test_sticky_agent_window_and_wait() -> None:
    sticky = Sticky(days=2, wait_s=15)
    assert sticky.remembers(2 * 86400) and not sticky.remembers(2 * 86400 + 1)
    assert sticky.waits(14.9) and not sticky.waits(15)


def test_targets_parse_and_print_like_the_config() -> None:
    for text in ("queue:sales", "voicemail", "callback", "hangup"):
        assert str(Target.parse(text)) == text
    with pytest.raises(ValueError):
        Target.parse("email")
    with pytest.raises(ValueError):
        Target("queue")


@pytest.mark.parametrize("kwargs", [
    {"policy": "random"},
    {"priority": 10},
    {"vip_priority": -1},
    {"checkin_s": 11},
    {"relax": (RelaxStep(90, ZH3), RelaxStep(30, PRODUCT))},
])
def test_invalid_rules_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _rules(**kwargs)


def test_rules_are_immutable_values() -> None:
    rules = _rules(weights={"lang:zh": 2.0})
    with pytest.raises(TypeError):
        rules.weights["lang:zh"] = 3.0  # type: ignore[index]
    assert rules == _rules(weights={"lang:zh": 2.0}) and hash(rules) == hash(_rules(weights={"lang:zh": 2.0}))
    assert ZH5.score({"lang:zh": 6}, rules.weights) == 12.0


def test_rules_from_a_full_config() -> None:
    config = parse({
        "tenants": [{"id": "acme"}],
        "queues": [
            {"id": "zh", "tenant": "acme", "requires": "lang:zh>=5", "policy": "most-skilled",
             "weights": {"lang:zh": 2.0}, "priority": 4, "vip_numbers": ["+8613800000000"], "vip_priority": 8,
             "wrapup_s": 10, "ring_timeout_s": 20, "checkin_s": 3, "max_wait_s": 900, "max_queue_length": 40,
             "full_action": "callback", "closed": True, "closed_action": "queue:general",
             "short_abandon_s": 3, "sl_threshold_s": 30,
             "relax": [{"after": 30, "requires": "lang:zh>=3"}, {"after": 90, "ewt_s": 60, "requires": "product:*"}],
             "sticky": {"days": 3}, "overflow": {"after_s": 120, "target": "queue:general"}},
            {"id": "general", "tenant": "acme"},
        ],
    }, env={})
    rules = queue_rules(config)
    assert list(rules) == ["zh", "general"]
    zh = rules["zh"]
    assert zh.requires == ZH5 and zh.policy == "most-skilled" and dict(zh.weights) == {"lang:zh": 2.0}
    assert zh.relax == (RelaxStep(30, ZH3), RelaxStep(90, PRODUCT, ewt_s=60))
    assert zh.priority_for("+8613800000000") == 8 and zh.priority_for(None) == 4
    assert zh.sticky == Sticky(days=3, wait_s=20) and zh.overflow == Overflow(Target("queue", "general"), 120)
    assert (zh.max_wait_s, zh.max_queue_length, zh.full_action) == (900, 40, CALLBACK)
    assert zh.entry_target(0) == Target("queue", "general")
    assert (zh.wrapup_s, zh.ring_timeout_s, zh.checkin_s, zh.short_abandon_s, zh.sl_threshold_s) == (10, 20, 3, 3, 30)
    assert rules["general"] == QueueRules("general", "acme")
