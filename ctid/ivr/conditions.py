"""IVR node conditions: a small, safe expression language over call variables.

An IVR flow decides where a caller goes next with a condition such as
``digits == "1" & crm.tier ~ "gold|platinum"``, evaluated against the call's variables
(DTMF input, values read from the CRM, channel variables). :func:`parse_condition`
turns the text into an immutable :class:`Condition` once, when the flow is loaded;
:meth:`Condition.evaluate` then walks the parsed tree for each call. Nothing is ever
passed to ``eval`` or compiled as Python, and every syntax problem is a
:class:`ConditionError` that carries the 0-based position of the problem.

Grammar
-------

::

    expr    := term ('|' term)*          ; or   (lowest precedence)
    term    := factor ('&' factor)*      ; and
    factor  := '!' factor | '(' expr ')' | compare
    compare := operand [CMP operand]     ; a lone operand is tested for truthiness
    operand := NAME | STRING | NUMBER | 'true' | 'false' | 'null'
    CMP     := '==' | '!=' | '<' | '<=' | '>' | '>=' | '~'
    NAME    := [A-Za-z_][A-Za-z0-9_]*('.'[A-Za-z_][A-Za-z0-9_]*)*
    STRING  := '"' ... '"' | "'" ... "'"   ; escapes: \\" \\' \\\\ and nothing else
    NUMBER  := -?[0-9]+(\\.[0-9]+)?

- Precedence, tightest first: comparisons, then ``!``, then ``&``, then ``|``. So
  ``a | b & c`` is ``a | (b & c)`` and ``!a == b`` is ``!(a == b)``. A comparison has
  exactly two operands: ``a == b == c`` is an error (write ``a == b & b == c``), and so is
  comparing a parenthesised expression.
- Whitespace (space, tab, CR, LF) is allowed between any two tokens; it has no meaning.
- ``true``, ``false`` and ``null`` are keywords only in lower case; ``True`` is a name.
- A NAME is looked up as a whole in the flat variables mapping: ``crm.tier`` is the key
  ``"crm.tier"``, not ``variables["crm"]["tier"]``. Names are case-sensitive.
- In a STRING, a backslash may only escape the quote characters and itself; any other
  escape (``"\\d"``) is an error, so a regex digit class is written ``"\\\\d"`` (or
  ``"[0-9]"``).

Semantics
---------

Evaluation never raises: whatever the variables hold, the answer is True or False.

- **Unknown variables.** A name missing from the mapping is ``null`` (None).
- **Truthiness** (a lone operand such as ``vip`` or ``!vip``): None, ``false``, ``0``,
  ``0.0`` and ``""`` are false, and so are the *strings* ``"0"`` and ``"false"`` (in any
  case), because IVR and channel variables arrive as strings: ``SET VARIABLE vip 0``
  must not read as true. Everything else is true, including ``"no"`` and ``"0.0"``.
- **Numbers.** A value "reads as a number" when it is an int or a float (not a bool), or
  a str matching NUMBER exactly (no spaces, no ``+``, no exponent).
- **``==`` and ``!=``.** When both sides read as numbers they are compared as numbers:
  ``digits == 7`` holds for ``"7"`` and for ``"007"``, and ``"1.0" == 1`` holds. (To
  test the exact digits typed, compare with a regex: ``digits ~ "007"``.) Otherwise both
  sides are compared as text: a bool is ``"true"``/``"false"`` (so ``flag == true``
  holds for ``True`` and for ``"true"``, and ``flag == 1`` does not hold for ``True``),
  a number is its ``str()``. ``null`` equals only ``null``: an unknown variable is
  ``== null`` and ``!= ""``. ``a != b`` is always ``!(a == b)``.
- **``<``, ``<=``, ``>``, ``>=``.** Numeric only: when either side does not read as a
  number (text, a bool, null) the comparison is false. So ``!(a < 5)`` is not ``a >= 5``
  when ``a`` is not a number.
- **``~``.** The right side must be a STRING literal: a Python regular expression that
  must match the whole left side (``re.fullmatch``). The left side is read as text as
  for ``==``; ``null ~ ".*"`` is false. The regex is compiled when the condition is
  parsed; it is at most 200 characters long. Regexes are written by whoever writes the
  flow, not by callers, but a caller does control the text matched: avoid nested
  repetition such as ``"(a+)+"``, which Python's ``re`` can take exponential time over.

Rejected, each with a reason and a position: an empty text, characters outside the
grammar (including ``=``, ``&&`` and ``||``, with a hint), an unterminated string, an
unknown escape, a malformed number or name, an operator with a missing operand, empty
or unbalanced parentheses, chained comparisons, trailing text, a ``~`` whose right side
is not a string, an invalid or over-long regex, nesting (``(`` and ``!``) deeper than 50
levels, and text longer than 1000 characters.

Examples::

    parse_condition("digits == 1").evaluate({"digits": "1"})                 # True
    parse_condition("crm.tier ~ 'gold|platinum' & !blocked").names           # {'crm.tier', 'blocked'}
    parse_condition("attempts >= 3 | caller ~ '[+]33[0-9]{9}'")  # 3rd try, or a French number
    parse_condition("digits ==")  # ConditionError: at position 9: expected a value after '=='
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NoReturn, TypeAlias

__all__ = [
    "MAX_DEPTH",
    "MAX_REGEX",
    "MAX_TEXT",
    "Condition",
    "ConditionError",
    "Value",
    "parse_condition",
]

Value: TypeAlias = str | int | float | bool | None
"""What a variable (or a literal) can hold."""

MAX_TEXT: Final = 1000
MAX_DEPTH: Final = 50
MAX_REGEX: Final = 200

_SPACE: Final = " \t\r\n"
_NAME_START: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_DIGITS: Final = frozenset("0123456789")
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_NUMBER_RE: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_KEYWORDS: Final[dict[str, Value]] = {"true": True, "false": False, "null": None}
_ESCAPABLE: Final = "\"'\\"
# Longest first, so "<=" is not read as "<" followed by "=", nor "!=" as "!" and "=".
_OPERATORS: Final = ("==", "!=", "<=", ">=", "<", ">", "~", "!", "&", "|", "(", ")")
_COMPARISONS: Final = frozenset({"==", "!=", "<", "<=", ">", ">=", "~"})
_BINARY: Final = _COMPARISONS | {"&", "|"}
_FALSE_STRINGS: Final = frozenset({"", "0", "false"})

_ORDER: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


# --------------------------------------------------------------------------- errors


class ConditionError(ValueError):
    """A condition that does not parse.

    ``reason`` says what is wrong, ``position`` is the 0-based index of the problem in
    ``text`` (``len(text)`` when something is missing at the end). ``str()`` reads
    ``at position 7: expected a value after '=='``."""

    position: int
    reason: str
    text: str

    def __init__(self, reason: str, position: int, text: str = "") -> None:
        super().__init__(reason, position, text)
        self.reason = reason
        self.position = position
        self.text = text

    def __str__(self) -> str:
        return f"at position {self.position}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.position, self.text))


# --------------------------------------------------------------------------- values


def _as_number(value: Value) -> int | float | None:
    """The value as a number, or None when it does not read as one (see the docstring)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value):
        if "." in value:
            return float(value)
        try:
            return int(value)
        except ValueError:  # more digits than int() will convert: treat as text
            return None
    return None


def _as_text(value: Value) -> str:
    """The value as text for ``==`` and ``~``: bools as ``true``/``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _is_truthy(value: Value) -> bool:
    if isinstance(value, str):
        return value.lower() not in _FALSE_STRINGS
    return bool(value)


def _equal(left: Value, right: Value) -> bool:
    if left is None or right is None:
        return left is None and right is None
    left_number, right_number = _as_number(left), _as_number(right)
    if left_number is not None and right_number is not None:
        return left_number == right_number
    return _as_text(left) == _as_text(right)


def _ordered(op: str, left: Value, right: Value) -> bool:
    left_number, right_number = _as_number(left), _as_number(right)
    if left_number is None or right_number is None:
        return False
    return _ORDER[op](left_number, right_number)


def _full_match(pattern: re.Pattern[str], value: Value) -> bool:
    return value is not None and pattern.fullmatch(_as_text(value)) is not None


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class _Variable:
    name: str

    def resolve(self, variables: Mapping[str, Value]) -> Value:
        return variables.get(self.name)


@dataclass(frozen=True)
class _Literal:
    value: Value

    def resolve(self, variables: Mapping[str, Value]) -> Value:
        return self.value


_Operand: TypeAlias = "_Variable | _Literal"


@dataclass(frozen=True)
class _Truthy:
    operand: _Operand

    def evaluate(self, variables: Mapping[str, Value]) -> bool:
        return _is_truthy(self.operand.resolve(variables))


@dataclass(frozen=True)
class _Compare:
    """``==``, ``!=`` or an ordering; ``~`` is :class:`_Match`."""

    op: str
    left: _Operand
    right: _Operand

    def evaluate(self, variables: Mapping[str, Value]) -> bool:
        left, right = self.left.resolve(variables), self.right.resolve(variables)
        if self.op == "==":
            return _equal(left, right)
        if self.op == "!=":
            return not _equal(left, right)
        return _ordered(self.op, left, right)


@dataclass(frozen=True)
class _Match:
    left: _Operand
    pattern: re.Pattern[str]

    def evaluate(self, variables: Mapping[str, Value]) -> bool:
        return _full_match(self.pattern, self.left.resolve(variables))


@dataclass(frozen=True)
class _Not:
    operand: _Node

    def evaluate(self, variables: Mapping[str, Value]) -> bool:
        return not self.operand.evaluate(variables)


@dataclass(frozen=True)
class _All:
    operands: tuple[_Node, ...]

    def evaluate(self, variables: Mapping[str, Value]) -> bool:
        return all(op.evaluate(variables) for op in self.operands)


@dataclass(frozen=True)
class _Any:
    operands: tuple[_Node, ...]

    def evaluate(self, variables: Mapping[str, Value]) -> bool:
        return any(op.evaluate(variables) for op in self.operands)


_Node: TypeAlias = "_Truthy | _Compare | _Match | _Not | _All | _Any"


@dataclass(frozen=True)
class Condition:
    """A parsed condition. Build one with :func:`parse_condition`.

    ``text`` is the source as given; ``names`` holds every variable it reads, for
    checking a flow against the variables it sets. Equal texts give equal conditions."""

    text: str
    names: frozenset[str]
    _root: _Node = field(repr=False, compare=False)

    def evaluate(self, variables: Mapping[str, Value]) -> bool:
        """True if the condition holds for these variables. Never raises; a name missing
        from ``variables`` is null."""
        return self._root.evaluate(variables)


# --------------------------------------------------------------------------- lexer


TokenKind = Literal["name", "string", "number", "keyword", "op", "end"]


@dataclass(frozen=True)
class _Token:
    kind: TokenKind
    text: str  # as written in the source ("" for the end)
    position: int
    end: int
    value: Value = None  # the decoded literal, for strings, numbers and keywords


def _shown(token: _Token) -> str:
    """A token for an error message."""
    if token.kind == "end":
        return "the end"
    text = token.text if len(token.text) <= 30 else token.text[:27] + "..."
    return repr(text)


def _lex(text: str, pos: int) -> _Token:
    """The token starting at or after ``pos`` (after whitespace)."""
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    if pos == len(text):
        return _Token("end", "", pos, pos)
    ch = text[pos]
    if ch in "\"'":
        return _lex_string(text, pos)
    if ch in _DIGITS or ch == "-":
        return _lex_number(text, pos)
    if ch in _NAME_START:
        return _lex_name(text, pos)
    for op in _OPERATORS:
        if text.startswith(op, pos):
            if op in ("&", "|") and text.startswith(op * 2, pos):
                _fail(f"'{op * 2}' is not an operator: use '{op}'", pos, text)
            return _Token("op", op, pos, pos + len(op))
    if ch == "=":
        _fail("'=' is not an operator: use '==' to compare", pos, text)
    _fail(f"unexpected character {ch!r}", pos, text)


def _lex_string(text: str, start: int) -> _Token:
    quote = text[start]
    chars: list[str] = []
    pos = start + 1
    while pos < len(text):
        ch = text[pos]
        if ch == quote:
            return _Token("string", text[start : pos + 1], start, pos + 1, "".join(chars))
        if ch == "\\":
            escaped = text[pos + 1 : pos + 2]
            if not escaped:
                break
            if escaped not in _ESCAPABLE:
                _fail(f"unknown escape '\\{escaped}' in a string: only \\\" \\' and \\\\ "
                      f"are allowed (write \\\\{escaped} for a backslash)", pos, text)
            chars.append(escaped)
            pos += 2
            continue
        chars.append(ch)
        pos += 1
    _fail(f"unterminated string: no closing {quote}", start, text)


def _lex_number(text: str, start: int) -> _Token:
    match = _NUMBER_RE.match(text, start)
    if match is None:  # a '-' not followed by a digit
        _fail("'-' must be followed by a digit: it only starts a negative number, such as -5", start, text)
    end = match.end()
    if end < len(text) and (text[end] in _NAME_START or text[end] in _DIGITS or text[end] == "."):
        shown = text[start : _numberish_end(text, end)]
        _fail(f"malformed number {shown!r}: expected digits with at most one '.' between digits", start, text)
    source = match.group()
    value: int | float = float(source) if "." in source else int(source)
    return _Token("number", source, start, end, value)


def _numberish_end(text: str, pos: int) -> int:
    """Where the run of name, digit and '.' characters from ``pos`` ends: the part of a
    malformed number ("1.", "12ab", "1.2.3") shown in its error."""
    while pos < len(text) and (text[pos] in _NAME_START or text[pos] in _DIGITS or text[pos] == "."):
        pos += 1
    return pos


def _lex_name(text: str, start: int) -> _Token:
    match = _NAME_RE.match(text, start)
    assert match is not None  # the caller saw a name-start character
    end = match.end()
    if end < len(text) and text[end] == ".":
        _fail("expected a name part (a letter or '_' first) after '.'", end + 1, text)
    word = match.group()
    if word in _KEYWORDS:
        return _Token("keyword", word, start, end, _KEYWORDS[word])
    return _Token("name", word, start, end)


def _fail(reason: str, position: int, text: str) -> NoReturn:
    raise ConditionError(reason, position, text)


# --------------------------------------------------------------------------- parser


def parse_condition(text: str) -> Condition:
    """Parse a condition (grammar and semantics in the module docstring).

    Raises :class:`ConditionError` with the position of the first problem, and
    ``TypeError`` if ``text`` is not a str."""
    if not isinstance(text, str):
        raise TypeError("a condition is a str")
    return _Parser(text).parse()


class _Parser:
    """Recursive descent with one token of lookahead, lexed on demand so that the first
    problem in reading order is the one reported."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.depth = 0
        self.names: set[str] = set()
        self.previous: _Token | None = None
        self.token = _Token("end", "", 0, 0)

    def fail(self, reason: str, position: int | None = None) -> NoReturn:
        _fail(reason, self.token.position if position is None else position, self.text)

    def advance(self) -> _Token:
        """Move to the next token; return the one just passed."""
        passed = self.token
        self.previous = passed
        self.token = _lex(self.text, passed.end)
        return passed

    def at_op(self, *ops: str) -> bool:
        return self.token.kind == "op" and self.token.text in ops

    def parse(self) -> Condition:
        if len(self.text) > MAX_TEXT:
            self.fail(f"condition longer than {MAX_TEXT} characters", MAX_TEXT)
        first = _lex(self.text, 0)
        if first.kind == "end":
            self.fail("empty condition", 0)
        self.token = first
        root = self.expr()
        if self.token.kind != "end":
            self.trailing()
        return Condition(self.text, frozenset(self.names), root)

    def trailing(self) -> NoReturn:
        if self.at_op(")"):
            self.fail("unbalanced ')': there is no '(' to close")
        self.misplaced_comparison()
        self.fail(f"unexpected {_shown(self.token)}: expected '&', '|' or the end")

    def misplaced_comparison(self) -> None:
        """Explain a comparison operator found where a comparison has already ended."""
        if not self.at_op(*_COMPARISONS):
            return
        op, previous = self.token.text, self.previous
        if previous is not None and previous.kind == "op" and previous.text == ")":
            self.fail(f"{op!r} compares two values, not a parenthesised expression")
        self.fail(f"comparisons cannot be chained: join them with '&' (unexpected {op!r})")

    def expr(self) -> _Node:
        terms = [self.term()]
        while self.at_op("|"):
            self.advance()
            terms.append(self.term())
        return terms[0] if len(terms) == 1 else _Any(tuple(terms))

    def term(self) -> _Node:
        factors = [self.factor()]
        while self.at_op("&"):
            self.advance()
            factors.append(self.factor())
        return factors[0] if len(factors) == 1 else _All(tuple(factors))

    def factor(self) -> _Node:
        if self.at_op("!"):
            self.enter()
            self.advance()
            inner = self.factor()
            self.depth -= 1
            return _Not(inner)
        if self.at_op("("):
            self.enter()
            opened = self.advance()
            if self.at_op(")"):
                self.fail("empty parentheses: expected a condition inside '()'")
            inner = self.expr()
            if not self.at_op(")"):
                self.misplaced_comparison()
                self.fail(f"expected ')' to close the '(' at position {opened.position}, "
                          f"found {_shown(self.token)}")
            self.advance()
            self.depth -= 1
            return inner
        return self.compare()

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nested more than {MAX_DEPTH} levels deep")

    def compare(self) -> _Node:
        left = self.operand()
        if not self.at_op(*_COMPARISONS):
            return _Truthy(left)
        op = self.advance().text
        if op == "~":
            return _Match(left, self.regex())
        return _Compare(op, left, self.operand())

    def operand(self) -> _Operand:
        token = self.token
        if token.kind == "name":
            self.advance()
            self.names.add(token.text)
            return _Variable(token.text)
        if token.kind in ("string", "number", "keyword"):
            self.advance()
            return _Literal(token.value)
        self.missing_operand()

    def missing_operand(self) -> NoReturn:
        token, previous = self.token, self.previous
        if previous is not None:  # always an operator: an operand is never followed by one
            found = "" if token.kind == "end" else f", found {_shown(token)}"
            self.fail(f"expected a value after {previous.text!r}{found}")
        if token.kind == "op" and token.text in _BINARY:
            self.fail(f"expected a value before {token.text!r}")
        self.fail(f"unexpected {_shown(token)}: expected a value, '(' or '!'")

    def regex(self) -> re.Pattern[str]:
        token = self.token
        if token.kind != "string":
            if token.kind == "end":
                self.fail("expected a regex string after '~'")
            self.fail(f"the right side of '~' must be a string (a regex), not {_shown(token)}")
        pattern = token.value
        assert isinstance(pattern, str)
        if len(pattern) > MAX_REGEX:
            self.fail(f"regex longer than {MAX_REGEX} characters")
        try:
            compiled = re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as exc:
            self.fail(f"invalid regex: {getattr(exc, 'msg', None) or exc}")
        self.advance()
        return compiled
