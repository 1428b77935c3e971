"""Skill expressions: grammar, precedence, wildcards, scores, errors with positions."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctid.acd.expr import ANY, And, ExpressionError, Not, Or, Skill, is_skill_name, parse_expression

AGENT = {"lang:en": 8, "lang:zh": 4, "product:broadband": 5, "product:tv": 2, "vip": 1}


def test_a_plain_skill_matches_at_any_level() -> None:
    expr = parse_expression("lang:zh")
    assert expr.matches({"lang:zh": 1}) and expr.matches({"lang:zh": 10})
    assert not expr.matches({"lang:en": 9}) and not expr.matches({})


@pytest.mark.parametrize(("text", "level", "expected"), [
    ("s>=5", 5, True), ("s>=5", 4, False), ("s>5", 5, False), ("s>5", 6, True),
    ("s=5", 5, True), ("s=5", 6, False), ("s<=5", 5, True), ("s<=5", 6, False),
    ("s<5", 4, True), ("s<5", 5, False),
])
def test_comparisons_use_the_agents_level(text: str, level: int, expected: bool) -> None:
    assert parse_expression(text).matches({"s": level}) is expected


def test_a_comparison_never_matches_an_agent_without_the_skill() -> None:
    assert not parse_expression("lang:zh<3").matches({})
    assert parse_expression("!lang:zh | lang:zh<3").matches({})
    assert not parse_expression("lang:zh").matches({"lang:zh": 0})  # level 0: not held


def test_and_binds_tighter_than_or() -> None:
    expr = parse_expression("a | b & c")
    assert expr == parse_expression("a | (b & c)") != parse_expression("(a | b) & c")
    assert expr.matches({"a": 1})  # (a | b) & c would not match
    assert not expr.matches({"b": 1})
    assert expr.matches({"b": 1, "c": 1})
    assert isinstance(expr, Or) and str(expr) == "a | b & c"


def test_not_binds_tighter_than_and() -> None:
    expr = parse_expression("!a & b")
    assert expr == parse_expression("(!a) & b")
    assert expr.matches({"b": 1}) and not expr.matches({"a": 1, "b": 1})
    assert not parse_expression("!(a & b)").matches({"a": 1, "b": 1})
    assert parse_expression("!(a & b)").matches({"a": 1})


def test_the_issue_example_parses_and_matches() -> None:
    expr = parse_expression("lang:zh>=5 & (product:broadband>=3 | product:tv>=3)")
    assert expr.matches({"lang:zh": 5, "product:tv": 3})
    assert not expr.matches({"lang:zh": 5, "product:tv": 2})
    assert not expr.matches(AGENT)  # lang:zh is only 4


def test_wildcard_without_a_comparison_means_any_skill_of_the_family() -> None:
    expr = parse_expression("product:*")
    assert expr.matches({"product:tv": 1})
    assert not expr.matches({"product": 5})  # the bare name is not in the family
    assert not expr.matches({"productx:tv": 5})
    assert not expr.matches({})


def test_wildcard_with_a_comparison_needs_one_skill_that_satisfies_it() -> None:
    expr = parse_expression("product:* >= 5")
    assert expr.matches({"product:tv": 2, "product:broadband": 5})
    assert not expr.matches({"product:tv": 4, "product:broadband": 4})
    assert parse_expression("!product:*").matches({"lang:en": 3})


def test_any_matches_every_agent_and_scores_zero() -> None:
    assert parse_expression("*") is ANY and parse_expression("  *\n") is ANY
    assert ANY.matches({}) and ANY.score(AGENT) == 0.0
    assert ANY.skill_names() == frozenset() and ANY.candidate_skills() is None


def test_whitespace_is_free() -> None:
    assert parse_expression(" lang : zh >=\t5\n&(\nvip)") == parse_expression("lang:zh>=5&vip")


def test_canonical_form_is_sorted_flat_and_minimal() -> None:
    assert str(parse_expression("b | (a & c) | a")) == "a | a & c | b"
    assert str(parse_expression("(b & (a & c))")) == "a & b & c"
    assert str(parse_expression("a & a")) == "a"
    assert str(parse_expression("!!a")) == "a"
    assert str(parse_expression("!(b | a)")) == "!(a | b)"
    assert str(parse_expression("x & (b | a)")) == "(a | b) & x"
    assert parse_expression("b&a") == parse_expression("(a & b)")
    assert hash(parse_expression("b&a")) == hash(parse_expression("a&b"))


def test_expressions_are_immutable_and_survive_copy_and_pickle() -> None:
    expr = parse_expression("lang:zh>=5 & !vip")
    with pytest.raises(AttributeError):
        expr.operands = ()
    assert copy.deepcopy(expr) == expr and pickle.loads(pickle.dumps(expr)) == expr
    assert pickle.loads(pickle.dumps(ANY)) is ANY
    assert {expr: 1}[parse_expression("!vip & lang:zh >= 5")] == 1
    assert repr(expr) == "parse_expression('!vip & lang:zh>=5')"


def test_the_tree_is_inspectable() -> None:
    expr = parse_expression("product:*>=3 & !vip")
    assert isinstance(expr, And)
    negated, skill = expr.operands  # canonical order: "!vip" sorts before "product:*>=3"
    assert isinstance(skill, Skill)
    assert (skill.name, skill.wildcard, skill.cmp, skill.level, skill.key) == ("product", True, ">=", 3, "product:*")
    assert isinstance(negated, Not) and negated.operand == parse_expression("vip")


def test_score_sums_matched_levels_once_each() -> None:
    # lang:zh is named twice but counted once; vip is negated, so it never adds.
    expr = parse_expression("lang:zh>=3 | lang:zh>=1 | lang:en | !vip")
    assert expr.score(AGENT) == 4 + 8


def test_score_counts_every_skill_a_wildcard_matched() -> None:
    assert parse_expression("product:*").score(AGENT) == 5 + 2
    assert parse_expression("product:*>=3").score(AGENT) == 5


def test_score_uses_weights_by_name_then_family() -> None:
    expr = parse_expression("lang:en & product:*")
    weights = {"lang:en": 0.5, "product:*": 2.0, "product:tv": 10.0}
    assert expr.score(AGENT, weights) == 8 * 0.5 + 5 * 2.0 + 2 * 10.0
    assert expr.score(AGENT, {}) == expr.score(AGENT) == 8 + 5 + 2


def test_score_ignores_skills_under_negation_but_counts_double_negation() -> None:
    assert parse_expression("!(lang:en & !lang:zh)").score({"lang:zh": 3}) == 3
    assert parse_expression("!lang:fr").score(AGENT) == 0


def test_score_does_not_count_branches_that_failed() -> None:
    expr = parse_expression("lang:zh>=9 | product:tv")
    assert expr.score(AGENT) == 2


def test_skill_names_and_candidates_for_indexing() -> None:
    expr = parse_expression("lang:zh>=5 & (product:* | vip) & !trainee")
    assert expr.skill_names() == frozenset({"lang:zh", "product:*", "vip", "trainee"})
    assert expr.candidate_skills() == frozenset({"lang:zh"})
    assert parse_expression("a | b:*").candidate_skills() == frozenset({"a", "b:*"})
    assert parse_expression("a | !b").candidate_skills() is None


def test_skill_name_check_for_config_keys() -> None:
    assert is_skill_name("lang:zh") and is_skill_name("vip") and is_skill_name("pt-br.v2")
    assert not is_skill_name("product:*") and is_skill_name("product:*", allow_wildcard=True)
    assert not is_skill_name("a:b:c") and not is_skill_name("a b") and not is_skill_name("")
    assert not is_skill_name("x" * 65)


@pytest.mark.parametrize(("text", "position", "reason"), [
    ("", 0, "empty"),
    ("   ", 0, "empty"),
    ("(a", 2, "unbalanced '('"),
    ("((a & b)", 8, "unbalanced '(' at position 0"),
    ("a)", 1, "unbalanced ')'"),
    ("(a))", 3, "unbalanced ')'"),
    ("()", 1, "unexpected ')'"),
    ("a & ", 4, "unexpected end"),
    ("a | | b", 4, "unexpected '|'"),
    ("a b", 2, "unexpected 'b'"),
    ("(a b)", 3, "unexpected 'b': expected '&', '|' or ')'"),
    ("a >= 11", 5, "level 11 is outside 1..10"),
    ("a>=0", 3, "level 0 is outside 1..10"),
    ("a>=", 3, "expected a level"),
    ("a>=x", 3, "expected a level"),
    ("a>=5.5", 3, "whole number"),
    ("a>10", 1, "can never hold"),
    ("a<1", 1, "can never hold"),
    ("a==3", 1, "'=='"),
    ("a && b", 2, "'&&'"),
    ("a || b", 2, "'||'"),
    ("a # b", 2, "character '#' is not allowed"),
    ("lang:zh;", 7, "character ';' is not allowed"),
    ("é", 0, "character 'é' is not allowed"),
    ("lang:", 5, "a skill value or '*'"),
    ("a:b:c", 3, "at most one ':'"),
    ("* | a", 0, "must be the whole expression"),
    ("a | *", 4, "must be the whole expression"),
    ("!*", 1, "must be the whole expression"),
    ("-a", 0, "unexpected '-'"),
    ("(" * 40 + "a" + ")" * 40, 32, "nested more than 32"),
    ("!" * 40 + "a", 32, "nested more than 32"),
    ("a" * 65, 0, "longer than 64"),
    ("a & " * 1100 + "a", 4096, "longer than 4096"),
])
def test_every_error_has_a_position_and_a_clear_reason(text: str, position: int, reason: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse_expression(text)
    assert info.value.position == position, str(info.value)
    assert reason in info.value.reason
    assert info.value.text == text


def test_error_text_shows_a_caret_under_the_position() -> None:
    with pytest.raises(ExpressionError) as info:
        parse_expression("lang:zh>=11 & vip")
    assert str(info.value).splitlines() == [
        "level 11 is outside 1..10 (position 9)",
        "  lang:zh>=11 & vip",
        "           ^",
    ]
    assert info.value.one_line() == "level 11 is outside 1..10 at position 9 of 'lang:zh>=11 & vip'"
    assert isinstance(info.value, ValueError)
    assert pickle.loads(pickle.dumps(info.value)).position == 9


def test_a_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_expression(5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties
# Trees are the test's own tuples, rendered with random spacing and redundant
# parentheses, and evaluated by a brute-force reading of the documented semantics.

NAMES = ["a", "b", "lang:en", "lang:zh", "product:tv", "product:bb"]
FAMILIES = ["lang", "product"]
CMPS = [">=", ">", "=", "<=", "<"]
Tree = tuple[Any, ...]


@st.composite
def atoms(draw: st.DrawFn) -> Tree:
    wildcard = draw(st.booleans())
    name = draw(st.sampled_from(FAMILIES if wildcard else NAMES))
    if draw(st.booleans()):
        return ("skill", name, wildcard, None, None)
    cmp = draw(st.sampled_from(CMPS))
    low, high = (1, 9) if cmp == ">" else (2, 10) if cmp == "<" else (1, 10)
    return ("skill", name, wildcard, cmp, draw(st.integers(low, high)))


trees = st.recursive(
    atoms(),
    lambda sub: st.one_of(
        st.tuples(st.just("not"), sub),
        st.tuples(st.just("and"), st.lists(sub, min_size=2, max_size=4)),
        st.tuples(st.just("or"), st.lists(sub, min_size=2, max_size=4)),
    ),
    max_leaves=12,
)
agents = st.dictionaries(st.sampled_from([*NAMES, "product", "lang"]), st.integers(1, 10), max_size=6)


def render(tree: Tree, draw: st.DrawFn) -> str:
    space = st.sampled_from(["", " ", "  ", "\t", "\n"])
    kind = tree[0]
    if kind == "skill":
        _, name, wildcard, cmp, level = tree
        text = f"{name}{draw(space)}:{draw(space)}*" if wildcard else name
        if cmp is not None:
            text += f"{draw(space)}{cmp}{draw(space)}{level}"
    elif kind == "not":
        text = f"!{draw(space)}({render(tree[1], draw)})"
    else:
        symbol = "&" if kind == "and" else "|"
        text = f"{draw(space)}{symbol}{draw(space)}".join(f"({render(t, draw)})" for t in tree[1])
    if draw(st.booleans()):
        text = f"({draw(space)}{text}{draw(space)})"
    return text


@st.composite
def texts(draw: st.DrawFn) -> tuple[Tree, str]:
    tree = draw(trees)
    return tree, render(tree, draw)


def compare(value: int, cmp: str | None, level: int | None) -> bool:
    if cmp is None or level is None:
        return True
    return {">=": value >= level, ">": value > level, "=": value == level,
            "<=": value <= level, "<": value < level}[cmp]


def brute(tree: Tree, skills: dict[str, int]) -> bool:
    kind = tree[0]
    if kind == "skill":
        _, name, wildcard, cmp, level = tree
        held = [v for k, v in skills.items() if (k.startswith(name + ":") if wildcard else k == name)]
        return any(v >= 1 and compare(v, cmp, level) for v in held)
    if kind == "not":
        return not brute(tree[1], skills)
    results = [brute(t, skills) for t in tree[1]]
    return all(results) if kind == "and" else any(results)


@settings(max_examples=400, deadline=None)
@given(texts(), st.lists(agents, min_size=1, max_size=8))
def test_matches_agrees_with_a_brute_force_evaluator(case: tuple[Tree, str], skill_sets: list[dict[str, int]]) -> None:
    tree, text = case
    expr = parse_expression(text)
    for skills in skill_sets:
        assert expr.matches(skills) is brute(tree, skills), (text, skills)


@settings(max_examples=400, deadline=None)
@given(texts(), agents)
def test_canonical_text_round_trips(case: tuple[Tree, str], skills: dict[str, int]) -> None:
    _, text = case
    expr = parse_expression(text)
    again = parse_expression(str(expr))
    assert again == expr and hash(again) == hash(expr) and str(again) == str(expr)
    assert again.matches(skills) is expr.matches(skills)
    assert again.score(skills) == expr.score(skills)
    assert again.skill_names() == expr.skill_names()


@settings(max_examples=200, deadline=None)
@given(texts(), agents)
def test_score_is_bounded_by_the_agents_levels(case: tuple[Tree, str], skills: dict[str, int]) -> None:
    expr = parse_expression(case[1])
    assert 0 <= expr.score(skills) <= sum(skills.values())
    assert expr.score(skills, {"lang:*": 0.0, "product:*": 0.0, "a": 0.0, "b": 0.0}) == 0.0


@settings(max_examples=200, deadline=None)
@given(texts(), agents)
def test_candidate_skills_cover_every_matching_agent(case: tuple[Tree, str], skills: dict[str, int]) -> None:
    expr = parse_expression(case[1])
    candidates = expr.candidate_skills()
    if candidates is not None and expr.matches(skills):
        held = set(skills) | {name.split(":")[0] + ":*" for name in skills if ":" in name}
        assert candidates & held


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab:*()!&|<>=0123456789 ", max_size=30))
def test_arbitrary_text_parses_or_raises_expression_error(text: str) -> None:
    try:
        expr = parse_expression(text)
    except ExpressionError as exc:
        assert 0 <= exc.position <= len(text)
    else:
        assert parse_expression(str(expr)) == expr
