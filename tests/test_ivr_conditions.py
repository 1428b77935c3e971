"""IVR conditions: grammar, precedence, value semantics, regexes, errors with positions, limits."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctid.ivr.conditions import MAX_DEPTH, MAX_REGEX, MAX_TEXT, Condition, ConditionError, Value, parse_condition


def holds(text: str, **variables: Value) -> bool:
    return parse_condition(text).evaluate(variables)


def error(text: str) -> ConditionError:
    with pytest.raises(ConditionError) as info:
        parse_condition(text)
    return info.value


# --------------------------------------------------------------------------- grammar


def test_a_condition_keeps_its_text_and_the_names_it_reads() -> None:
    condition = parse_condition("digits == '1' & (crm.tier ~ 'gold' | !blocked) & 5 > 3")
    assert isinstance(condition, Condition)
    assert condition.text == "digits == '1' & (crm.tier ~ 'gold' | !blocked) & 5 > 3"
    assert condition.names == frozenset({"digits", "crm.tier", "blocked"})
    assert parse_condition("1 == 1").names == frozenset()


def test_conditions_with_the_same_text_are_equal_and_pickle() -> None:
    condition = parse_condition("a ~ 'x+' & b")
    assert condition == parse_condition("a ~ 'x+' & b") != parse_condition("a ~ 'x+'")
    assert hash(condition) == hash(parse_condition("a ~ 'x+' & b"))
    again = pickle.loads(pickle.dumps(condition))
    assert again == condition and again.evaluate({"a": "xx", "b": "1"})


@pytest.mark.parametrize("name", ["a", "_", "digits", "crm.tier", "a.b.c", "x_1.y_2", "A9", "True", "nullable"])
def test_names_are_identifiers_joined_by_dots(name: str) -> None:
    assert parse_condition(name).names == frozenset({name})
    assert parse_condition(name).evaluate({name: "yes"})


def test_a_dotted_name_is_one_key_of_a_flat_mapping() -> None:
    condition = parse_condition("crm.tier == 'gold'")
    assert condition.evaluate({"crm.tier": "gold"})
    assert not condition.evaluate({"crm": {"tier": "gold"}})  # type: ignore[dict-item]


@pytest.mark.parametrize(("text", "value"), [
    ('"abc"', "abc"), ("'abc'", "abc"), ('""', ""), ("''", ""),
    (r'"say \"hi\""', 'say "hi"'), (r"'it\'s'", "it's"), (r'"back\\slash"', "back\\slash"),
    ('"it\'s"', "it's"), ("'say \"hi\"'", 'say "hi"'), ('"a | b & !c"', "a | b & !c"),
])
def test_string_literals_and_their_escapes(text: str, value: str) -> None:
    assert holds(f"v == {text}", v=value)
    assert not holds(f"v == {text}", v=value + "x")


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("42", 42), ("-7", -7), ("3.25", 3.25), ("-0.5", -0.5), ("007", 7),
])
def test_number_literals(text: str, value: float) -> None:
    assert holds(f"v == {text}", v=value)
    assert holds(f"{text} == v", v=str(value))


def test_keywords_are_lower_case_literals() -> None:
    assert holds("v == true", v=True) and holds("v == false", v=False) and holds("v == null")
    assert holds("true") and not holds("false") and not holds("null")
    assert parse_condition("True == TRUE").names == frozenset({"True", "TRUE"})


def test_whitespace_between_tokens_has_no_meaning() -> None:
    packed = parse_condition("!(a==1)&b|c~'x'")
    spaced = parse_condition(" \t! ( a == 1 )\r\n& b |\nc ~ 'x' ")
    for variables in ({"a": 1, "b": 1}, {"a": 2, "b": 1}, {"c": "x"}, {"a": 2}, {}):
        assert packed.evaluate(variables) is spaced.evaluate(variables)


def test_and_binds_tighter_than_or() -> None:
    assert holds("a | b & c", a=1)  # (a | b) & c would be false
    assert not holds("a | b & c", b=1)
    assert holds("a | b & c", b=1, c=1)
    assert not holds("(a | b) & c", a=1)


def test_not_binds_tighter_than_and_and_or() -> None:
    assert holds("!a & b", b=1) and not holds("!a & b", a=1, b=1)
    assert holds("!a | b", a=1, b=1) and not holds("!a | b", a=1)
    assert holds("!(a & b)", a=1) and not holds("!(a & b)", a=1, b=1)


def test_not_applies_to_a_whole_comparison() -> None:
    assert holds("!a == 1", a=2)  # !(a == 1)
    assert not holds("!a == 1", a=1)
    assert holds("!!a", a="x") and not holds("!!!a", a="x")


def test_and_or_short_circuit_over_many_operands() -> None:
    assert holds("a & b & c & d", a=1, b=1, c=1, d=1)
    assert not holds("a & b & c & d", a=1, b=1, c=1)
    assert holds("a | b | c | d", d=1) and not holds("a | b | c | d")


# --------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("value", [None, "", 0, 0.0, False, "0", "false", "False", "FALSE"])
def test_falsy_values(value: Value) -> None:
    assert not holds("v", v=value)
    assert holds("!v", v=value)


@pytest.mark.parametrize("value", ["1", "no", "0.0", "00", " ", "x", 1, -1, 0.5, True, "true"])
def test_truthy_values(value: Value) -> None:
    assert holds("v", v=value)
    assert not holds("!v", v=value)


def test_an_unknown_variable_is_null_and_never_raises() -> None:
    assert holds("missing == null") and not holds("missing")
    assert holds("missing != ''") and holds("missing != 0")
    assert not holds("missing < 1") and not holds("missing >= 1")
    assert not holds("missing ~ '.*'")
    assert parse_condition("missing").evaluate({}) is False


def test_null_equals_only_null() -> None:
    assert holds("v == null", v=None) and holds("null == null")
    for value in ("", "null", "None", 0, False):
        assert not holds("v == null", v=value), value
        assert holds("v != null", v=value), value


@pytest.mark.parametrize(("left", "right"), [
    ("7", 7), ("007", 7), ("7", "7.0"), ("1.0", 1), ("-3", -3), (2.5, "2.50"), (10, 10.0),
])
def test_equality_is_numeric_when_both_sides_read_as_numbers(left: Value, right: Value) -> None:
    assert holds("l == r", l=left, r=right)
    assert not holds("l != r", l=left, r=right)


@pytest.mark.parametrize(("left", "right", "equal"), [
    ("abc", "abc", True), ("abc", "ABC", False), (" 7", 7, False), ("7 ", "7", False),
    ("+7", 7, False), ("1e3", 1000, False), ("7", "seven", False), (5, "5x", False),
    (True, "true", True), (False, "false", True), (True, 1, False), (True, "1", False),
    (True, True, True), (True, False, False), ("", "", True), ("a", "", False),
])
def test_equality_falls_back_to_text(left: Value, right: Value, equal: bool) -> None:
    assert holds("l == r", l=left, r=right) is equal
    assert holds("l != r", l=left, r=right) is not equal


def test_bool_literals_compare_as_text_against_strings() -> None:
    assert holds("flag == true", flag=True) and holds("flag == true", flag="true")
    assert not holds("flag == true", flag="True") and not holds("flag == true", flag=1)
    assert holds("flag != false", flag="no")


@pytest.mark.parametrize(("text", "expected"), [
    ("2 < 10", True), ("'2' < '10'", True), ("10 < 2", False), ("3 <= 3", True), ("3 < 3", False),
    ("4 > 3.5", True), ("-1 > -2", True), ("3 >= 3.0", True), ("2 >= 3", False), ("'9' > 10", False),
])
def test_ordering_is_numeric(text: str, expected: bool) -> None:
    assert holds(text) is expected


@pytest.mark.parametrize("value", ["abc", "", None, True, False, " 5", "5x"])
@pytest.mark.parametrize("op", ["<", "<=", ">", ">="])
def test_ordering_with_a_non_number_is_false(op: str, value: Value) -> None:
    assert not holds(f"v {op} 5", v=value)
    assert not holds(f"5 {op} v", v=value)
    assert not holds(f"v {op} v", v=value)


def test_ordering_reads_numeric_strings() -> None:
    assert holds("attempts >= 3", attempts="3") and not holds("attempts >= 3", attempts="2")
    assert holds("balance < 0", balance="-12.50")


def test_a_digit_string_too_long_for_int_is_text_not_an_error() -> None:
    huge = "9" * 5000
    assert holds("v == v", v=huge) and not holds("v == 1", v=huge) and not holds("v > 1", v=huge)


# --------------------------------------------------------------------------- regexes


@pytest.mark.parametrize(("value", "expected"), [
    ("gold", True), ("platinum", True), ("golden", False), ("xgold", False), ("", False), (None, False),
])
def test_regex_must_match_the_whole_value(value: Value, expected: bool) -> None:
    assert holds("tier ~ 'gold|platinum'", tier=value) is expected


def test_regex_reads_numbers_and_bools_as_text() -> None:
    assert holds("v ~ '[0-9]{3}'", v=123) and holds("v ~ 'tr.e'", v=True) and holds("v ~ '1\\\\.5'", v=1.5)
    assert holds("digits ~ '007'", digits="007") and not holds("digits ~ '007'", digits="7")


def test_regex_escapes_are_written_with_a_doubled_backslash() -> None:
    assert holds(r"caller ~ '\\+33[0-9]{9}'", caller="+33612345678")
    assert holds(r"v ~ '\\d+'", v="42") and not holds(r"v ~ '\\d+'", v="4a")


def test_regex_can_be_negated_and_combined() -> None:
    assert holds("!(v ~ 'a.*') & v", v="bcd") and not holds("!(v ~ 'a.*')", v="abc")
    assert holds("!v ~ 'a.*'", v="bcd")  # ! applies to the whole match


def test_a_regex_of_the_maximum_length_is_accepted() -> None:
    assert holds(f"v ~ '{'a' * MAX_REGEX}'", v="a" * MAX_REGEX)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("text", "position", "reason"), [
    # empty
    ("", 0, "empty condition"),
    ("   \t", 0, "empty condition"),
    # characters outside the grammar
    ("a # b", 2, "unexpected character '#'"),
    ("a == $x", 5, "unexpected character '$'"),
    ("a = 1", 2, "'=' is not an operator: use '=='"),
    ("a && b", 2, "'&&' is not an operator: use '&'"),
    ("a || b", 2, "'||' is not an operator: use '|'"),
    ("a == - 5", 5, "'-' must be followed by a digit"),
    # strings
    ("'abc", 0, "unterminated string"),
    ('a == "abc', 5, "unterminated string"),
    ("a == 'abc\\'", 5, "unterminated string"),
    ("'abc\\", 0, "unterminated string"),
    ('"\\d"', 1, "unknown escape '\\d'"),
    ("v ~ 'a\\n'", 6, "unknown escape '\\n'"),
    # numbers and names
    ("1.", 0, "malformed number '1.'"),
    ("a == 1.2.3", 5, "malformed number '1.2.3'"),
    ("12ab", 0, "malformed number '12ab'"),
    ("1e5 > 2", 0, "malformed number '1e5'"),
    ("crm.", 4, "expected a name part"),
    ("crm..tier", 4, "expected a name part"),
    ("crm.1", 4, "expected a name part"),
    # operators without operands
    ("digits ==", 9, "expected a value after '=='"),
    ("a & ", 4, "expected a value after '&'"),
    ("a |", 3, "expected a value after '|'"),
    ("!", 1, "expected a value after '!'"),
    ("a & | b", 4, "expected a value after '&', found '|'"),
    ("a == ) ", 5, "expected a value after '==', found ')'"),
    ("& a", 0, "expected a value before '&'"),
    ("== a", 0, "expected a value before '=='"),
    ("a < < b", 4, "expected a value after '<'"),
    (")", 0, "unexpected ')': expected a value"),
    ("a ~", 3, "expected a regex string after '~'"),
    # parentheses
    ("()", 1, "empty parentheses"),
    ("a & ()", 5, "empty parentheses"),
    ("(a", 2, "expected ')' to close the '(' at position 0, found the end"),
    ("((a) & b", 8, "expected ')' to close the '(' at position 0"),
    ("(a b)", 3, "expected ')' to close the '(' at position 0, found 'b'"),
    ("a)", 1, "unbalanced ')'"),
    ("(a))", 3, "unbalanced ')'"),
    # comparisons
    ("a == b == c", 7, "comparisons cannot be chained"),
    ("1 < a < 3", 6, "comparisons cannot be chained"),
    ("(a) == b", 4, "compares two values, not a parenthesised expression"),
    ("((a) == b)", 5, "compares two values, not a parenthesised expression"),
    ("(a == b == c)", 8, "comparisons cannot be chained"),
    # trailing input
    ("a b", 2, "unexpected 'b': expected '&', '|' or the end"),
    ("a 'x'", 2, "unexpected \"'x'\""),
    ("a !b", 2, "unexpected '!'"),
    ("a-1", 1, "unexpected '-1'"),
    ("'it''s'", 4, "unexpected \"'s'\""),
    # regexes
    ("a ~ b", 4, "the right side of '~' must be a string (a regex), not 'b'"),
    ("a ~ 5", 4, "must be a string"),
    ("a ~ null", 4, "must be a string"),
    ("a ~ (", 4, "must be a string"),
    ("a ~ '('", 4, "invalid regex: missing )"),
    ("a & b ~ '[z-a]'", 8, "invalid regex: bad character range"),
    ("a ~ 'x{99999999999}'", 4, "invalid regex: the repetition number is too large"),
    (f"a ~ '{'a' * (MAX_REGEX + 1)}'", 4, f"regex longer than {MAX_REGEX} characters"),
])
def test_errors_carry_a_reason_and_a_position(text: str, position: int, reason: str) -> None:
    exc = error(text)
    assert exc.position == position, str(exc)
    assert reason in exc.reason, exc.reason
    assert exc.text == text


def test_the_first_problem_in_reading_order_is_reported() -> None:
    assert error("a & & 'unterminated").position == 4  # not the string at 6
    assert error("'unterminated & &").position == 0


def test_error_text_reads_at_position_then_reason() -> None:
    exc = error("digits ==")
    assert str(exc) == "at position 9: expected a value after '=='"
    assert exc.reason == "expected a value after '=='"
    assert isinstance(exc, ValueError)
    again = pickle.loads(pickle.dumps(exc))
    assert (again.reason, again.position, again.text) == (exc.reason, exc.position, exc.text)


def test_a_long_token_is_shortened_in_an_error() -> None:
    exc = error("a " + "b" * 100)
    assert "b" * 27 + "..." in exc.reason and "b" * 40 not in exc.reason


def test_a_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_condition(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- limits


def test_text_length_is_capped() -> None:
    longest = "a" + " " * (MAX_TEXT - 1)
    assert parse_condition(longest).names == frozenset({"a"})
    exc = error(longest + " ")
    assert exc.position == MAX_TEXT and f"longer than {MAX_TEXT}" in exc.reason


def test_parenthesis_nesting_is_capped() -> None:
    assert holds("(" * MAX_DEPTH + "a" + ")" * MAX_DEPTH, a=1)
    exc = error("(" * (MAX_DEPTH + 1) + "a" + ")" * (MAX_DEPTH + 1))
    assert exc.position == MAX_DEPTH and f"more than {MAX_DEPTH} levels" in exc.reason


def test_negation_nesting_is_capped() -> None:
    assert holds("!" * MAX_DEPTH + "a", a=1) is (MAX_DEPTH % 2 == 0)
    exc = error("!" * (MAX_DEPTH + 1) + "a")
    assert exc.position == MAX_DEPTH and "levels" in exc.reason


def test_nesting_counts_parentheses_and_negations_together() -> None:
    half = MAX_DEPTH // 2
    assert parse_condition("(!" * half + "a" + ")" * half)
    assert error("(!" * half + "!a" + ")" * half).position == 2 * half


def test_sequential_groups_do_not_add_up_to_the_depth() -> None:
    text = " & ".join(["((a))"] * 100)
    assert len(text) < MAX_TEXT and holds(text, a=1)


# --------------------------------------------------------------------------- properties


values = st.one_of(
    st.none(), st.booleans(), st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["", "0", "1", "007", "-3", "2.5", "false", "true", "abc", " 1", "1e3"]),
    st.text(max_size=8),
)
variables = st.dictionaries(st.sampled_from(["a", "b", "c.d"]), values, max_size=3)


def brute(tree: Any, env: dict[str, Value]) -> bool:
    """A reference evaluator over a generated tree of nested tuples."""
    kind = tree[0]
    if kind == "var":
        value = env.get(tree[1])
        return not (value is None or value is False or value == 0 or value in ("", "0")
                    or (isinstance(value, str) and value.lower() == "false"))
    if kind == "not":
        return not brute(tree[1], env)
    results = [brute(t, env) for t in tree[1]]
    return all(results) if kind == "and" else any(results)


def render(tree: Any) -> str:
    kind = tree[0]
    if kind == "var":
        return str(tree[1])
    if kind == "not":
        return "!" + render(tree[1])
    symbol = " & " if kind == "and" else " | "
    return "(" + symbol.join(render(t) for t in tree[1]) + ")"


trees = st.recursive(
    st.tuples(st.just("var"), st.sampled_from(["a", "b", "c.d"])),
    lambda inner: st.one_of(
        st.tuples(st.just("not"), inner),
        st.tuples(st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=3)),
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(trees, variables)
def test_boolean_structure_agrees_with_a_reference_evaluator(tree: Any, env: dict[str, Value]) -> None:
    assert parse_condition(render(tree)).evaluate(env) is brute(tree, env)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["a", "a == b", "a != b", "a < b", "a >= b", "a ~ '.*1.*'", "a & b", "a | b"]), variables)
def test_negation_inverts_every_condition(text: str, env: dict[str, Value]) -> None:
    assert parse_condition(f"!({text})").evaluate(env) is (not parse_condition(text).evaluate(env))


@settings(max_examples=300, deadline=None)
@given(values, values)
def test_equality_is_symmetric_and_not_equal_is_its_negation(left: Value, right: Value) -> None:
    env = {"a": left, "b": right}
    assert holds("a == b", **env) is holds("b == a", **env)
    assert holds("a != b", **env) is (not holds("a == b", **env))
    assert holds("a == a", a=left)


@settings(max_examples=300, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6))
def test_ordering_of_numeric_strings_matches_python(left: int, right: int) -> None:
    env: dict[str, Value] = {"a": str(left), "b": right}
    assert holds("a < b", **env) is (left < right)
    assert holds("a <= b", **env) is (left <= right)
    assert holds("a > b", **env) is (left > right)
    assert holds("a >= b", **env) is (left >= right)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab.1-'\"\\()!&|=<>~ _x#", max_size=40), variables)
def test_arbitrary_text_parses_or_raises_condition_error(text: str, env: dict[str, Value]) -> None:
    try:
        condition = parse_condition(text)
    except ConditionError as exc:
        assert 0 <= exc.position <= len(text)
        assert exc.reason and str(exc).startswith(f"at position {exc.position}: ")
    else:
        assert isinstance(condition.evaluate(env), bool)
        assert all(name in text for name in condition.names)
