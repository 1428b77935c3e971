"""Skill expressions: which agents may take a queue's calls.

A queue (or one of its relaxation steps) requires an expression such as
``lang:zh>=5 & (product:broadband>=3 | product:tv>=3)``, matched against an agent's
skills ``{name: level}`` (levels 1..10). :func:`parse_expression` turns the text into an
immutable :class:`Expression`; it never uses ``eval``, and every syntax problem is an
:class:`ExpressionError` that carries the 0-based position of the problem.

Grammar
-------

::

    top    := '*' | expr                 ; '*' alone: any agent (ANY)
    expr   := term ('|' term)*           ; or      (lowest precedence)
    term   := factor ('&' factor)*       ; and
    factor := '!' factor | '(' expr ')' | skill
    skill  := WORD [':' (WORD | '*')] [CMP LEVEL]
    CMP    := '>=' | '>' | '=' | '<=' | '<'
    LEVEL  := 1..10 (decimal digits)
    WORD   := [A-Za-z0-9_][A-Za-z0-9_.-]*  (at most 64 characters)

- Precedence, tightest first: ``!``, then ``&``, then ``|``. So ``a | b & c`` is
  ``a | (b & c)``, and ``!a & b`` is ``(!a) & b``. Use parentheses for anything else.
- Whitespace (space, tab, CR, LF) is allowed between any two tokens; it has no meaning.
- Names are case-sensitive and have at most one ``:``: ``vip``, ``lang:zh``,
  ``product:broadband``.
- ``lang:zh`` with no comparison means "has ``lang:zh`` at any level".
  ``lang:zh>=5`` compares the agent's level. A comparison only holds for a skill the
  agent *has*: ``lang:zh<3`` does not match an agent without ``lang:zh`` (write
  ``!lang:zh | lang:zh<3`` for that). A level of 0 or less in the mapping counts as not
  having the skill.
- ``product:*`` means "some skill named ``product:...``"; ``product:*>=3`` means "some
  ``product:...`` skill at level 3 or more" (any one of them). It does not match a
  skill named plain ``product``.
- ``*`` alone matches every agent (:data:`ANY`); it cannot be combined with anything.

Rejected, each with a message and a position: an empty text, unbalanced parentheses,
trailing text, a level outside 1..10, a comparison that can never hold (``>10``,
``<1``), ``&&``/``||``/``==``, a ``*`` inside a larger expression, characters outside
the grammar, nesting deeper than 32 levels, and text longer than 4096 characters.

Canonical form
--------------

``str(expr)`` is canonical: no redundant parentheses or whitespace, ``&`` and ``|``
flattened, duplicate operands removed, operands sorted, ``!!x`` reduced to ``x``. So
``parse_expression(str(e)) == e`` and two texts that differ only in such ways give equal
(and equally hashed) expressions, e.g. ``b&a`` and ``(a & b)``. Equality is by
canonical text.

Examples::

    parse_expression("lang:en")                       # has lang:en
    parse_expression("lang:zh >= 5 & product:*")      # Mandarin 5+, any product skill
    parse_expression("product:* >= 3 & !trainee")     # some product at 3+, not a trainee
    str(parse_expression("b | (a & c) | a"))          # 'a | a & c | b'

Score (for the ``most-skilled`` policy)
---------------------------------------

:meth:`Expression.score` sums the levels of the skills the expression *matched*: every
skill named by a comparison that holds for the agent and that is not under an odd
number of ``!`` (a skill that helps by being absent contributes nothing). A skill is
counted once even if several comparisons name it; a wildcard contributes every skill of
its family that satisfies it. Each level is multiplied by its weight: ``weights[name]``,
else ``weights["family:*"]``, else 1.0. The sum runs in sorted name order, so the float
result is the same in every process.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal, NoReturn

__all__ = [
    "ANY",
    "MAX_LEVEL",
    "MIN_LEVEL",
    "And",
    "Comparison",
    "Expression",
    "ExpressionError",
    "Not",
    "Or",
    "Skill",
    "is_skill_name",
    "parse_expression",
]

MIN_LEVEL: Final = 1
MAX_LEVEL: Final = 10
MAX_TEXT: Final = 4096
MAX_DEPTH: Final = 32
MAX_WORD: Final = 64

Comparison = Literal[">=", ">", "=", "<=", "<"]

_OPS: Final[dict[str, Callable[[int, int], bool]]] = {
    ">=": operator.ge, ">": operator.gt, "=": operator.eq, "<=": operator.le, "<": operator.lt,
}
# Longest first, so ">=" is not read as ">" followed by "=".
_CMP_TOKENS: Final[tuple[Comparison, ...]] = (">=", "<=", ">", "<", "=")
_WORD_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DIGITS_RE: Final = re.compile(r"[0-9]+")
_NAME_RE: Final = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]{0,63})(?::([A-Za-z0-9_][A-Za-z0-9_.-]{0,63}|\*))?")
_SPACE: Final = " \t\r\n"
_WORD_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_GRAMMAR_CHARS: Final = _WORD_CHARS | frozenset(_SPACE + "&|!():*<>=")


def is_skill_name(name: str, *, allow_wildcard: bool = False) -> bool:
    """True if ``name`` can be written in an expression (``lang:zh``, ``vip``).

    With ``allow_wildcard``, ``family:*`` is accepted too (the form used for weights)."""
    match = _NAME_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return False
    return allow_wildcard or match.group(2) != "*"


# --------------------------------------------------------------------------- errors


class ExpressionError(ValueError):
    """A skill expression that does not parse.

    ``reason`` is the message, ``text`` the expression and ``position`` the 0-based index
    of the problem in it (``len(text)`` when something is missing at the end). ``str()``
    shows the text with a caret under the position; :meth:`one_line` is for logs and
    config errors."""

    def __init__(self, reason: str, text: str, position: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.text = text
        self.position = position

    def one_line(self) -> str:
        return f"{self.reason} at position {self.position} of {_shorten(self.text)}"

    def __str__(self) -> str:
        # Non-printable characters (tabs, newlines) would break the caret's alignment.
        shown = "".join(ch if ch.isprintable() else " " for ch in self.text)
        return f"{self.reason} (position {self.position})\n  {shown}\n  {' ' * self.position}^"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.text, self.position))


def _shorten(text: str, limit: int = 80) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


# --------------------------------------------------------------------------- the tree


class Expression:
    """An immutable, hashable skill expression. Build one with :func:`parse_expression`.

    Subclasses: :class:`Skill` (one comparison), :class:`Not`, :class:`And`,
    :class:`Or`, and the :data:`ANY` singleton. Equality and hashing use the canonical
    text, ``str(expr)``."""

    __slots__ = ("_hash", "_text")
    _text: str
    _hash: int

    def _set_text(self, text: str) -> None:
        object.__setattr__(self, "_text", text)
        object.__setattr__(self, "_hash", hash(text))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"parse_expression({self._text!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Expression):
            return NotImplemented
        return self._text == other._text

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        # Copies and pickles are rebuilt from the canonical text.
        return (parse_expression, (self._text,))

    def matches(self, skills: Mapping[str, int]) -> bool:
        """True if an agent with these skills ``{name: level}`` satisfies the expression."""
        raise NotImplementedError

    def score(self, skills: Mapping[str, int], weights: Mapping[str, float] | None = None) -> float:
        """The ``most-skilled`` score: the weighted sum of the levels of the skills that
        the expression matched (see the module docstring). Meaningful for an agent that
        :meth:`matches`; :data:`ANY` scores 0."""
        matched: set[str] = set()
        self._collect(skills, True, matched)
        total = 0.0
        for name in sorted(matched):
            total += skills[name] * _weight(name, weights)
        return total

    def skill_names(self) -> frozenset[str]:
        """Every skill the expression names, negated or not; a wildcard as ``family:*``."""
        out: set[str] = set()
        self._names(out)
        return frozenset(out)

    def candidate_skills(self) -> frozenset[str] | None:
        """A set of skills (wildcards as ``family:*``) such that every matching agent has
        at least one of them, for indexing agents; None when no such set exists (e.g.
        :data:`ANY`, or ``!trainee``, which an agent with no skills matches)."""
        raise NotImplementedError

    @property
    def precedence(self) -> int:
        """3 for a skill or ``!``, 2 for ``&``, 1 for ``|``, 0 for ANY (printing)."""
        return 3

    def _collect(self, skills: Mapping[str, int], positive: bool, out: set[str]) -> None:
        raise NotImplementedError

    def _names(self, out: set[str]) -> None:
        raise NotImplementedError


def _weight(name: str, weights: Mapping[str, float] | None) -> float:
    if not weights:
        return 1.0
    weight = weights.get(name)
    if weight is None:
        family, colon, _ = name.partition(":")
        weight = weights.get(family + ":*", 1.0) if colon else 1.0
    return float(weight)


class Skill(Expression):
    """One comparison: ``name``, ``name>=3``, ``family:*``, ``family:*>=3``.

    ``name`` is the full skill name (``lang:zh``) or, with ``wildcard``, the family
    (``product``). ``cmp`` and ``level`` are both None (has it at any level) or both set."""

    __slots__ = ("_op", "_prefix", "cmp", "level", "name", "wildcard")
    name: str
    wildcard: bool
    cmp: Comparison | None
    level: int | None
    _prefix: str
    _op: Callable[[int, int], bool] | None

    def __init__(self, name: str, wildcard: bool = False, cmp: Comparison | None = None,
                 level: int | None = None) -> None:
        if wildcard and ":" in name:
            raise ValueError(f"wildcard family {name!r} must not contain ':'")
        if not is_skill_name(name):
            raise ValueError(f"invalid skill name {name!r}")
        if (cmp is None) != (level is None):
            raise ValueError("cmp and level must be given together")
        if cmp is not None and cmp not in _OPS:
            raise ValueError(f"invalid comparison {cmp!r}")
        if level is not None and not MIN_LEVEL <= level <= MAX_LEVEL:
            raise ValueError(f"level {level} is outside {MIN_LEVEL}..{MAX_LEVEL}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "wildcard", wildcard)
        object.__setattr__(self, "cmp", cmp)
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "_prefix", name + ":")
        object.__setattr__(self, "_op", None if cmp is None else _OPS[cmp])
        self._set_text(self.key + ("" if cmp is None else f"{cmp}{level}"))

    @property
    def key(self) -> str:
        """The skill name as used for indexing: ``lang:zh`` or ``product:*``."""
        return self.name + ":*" if self.wildcard else self.name

    def _holds(self, level: int) -> bool:
        if level < MIN_LEVEL:
            return False
        op = self._op
        return op is None or op(level, self.level)  # type: ignore[arg-type]

    def matches(self, skills: Mapping[str, int]) -> bool:
        if self.wildcard:
            prefix = self._prefix
            for name, value in skills.items():
                if name.startswith(prefix) and self._holds(value):
                    return True
            return False
        level = skills.get(self.name)
        return level is not None and self._holds(level)

    def candidate_skills(self) -> frozenset[str] | None:
        return frozenset((self.key,))

    def _collect(self, skills: Mapping[str, int], positive: bool, out: set[str]) -> None:
        if not positive:
            return
        if self.wildcard:
            out.update(n for n, lv in skills.items() if n.startswith(self._prefix) and self._holds(lv))
        elif self.matches(skills):
            out.add(self.name)

    def _names(self, out: set[str]) -> None:
        out.add(self.key)


class Not(Expression):
    """``!operand``. Build with :func:`negate` to get ``!!x`` reduced to ``x``."""

    __slots__ = ("operand",)
    operand: Expression

    def __init__(self, operand: Expression) -> None:
        if operand is ANY:
            raise ValueError("'!*' can never match")
        if isinstance(operand, Not):
            raise ValueError("use negate() to remove a double negation")
        object.__setattr__(self, "operand", operand)
        inner = str(operand)
        self._set_text("!" + (inner if operand.precedence >= 3 else f"({inner})"))

    def matches(self, skills: Mapping[str, int]) -> bool:
        return not self.operand.matches(skills)

    def candidate_skills(self) -> frozenset[str] | None:
        return None

    def _collect(self, skills: Mapping[str, int], positive: bool, out: set[str]) -> None:
        self.operand._collect(skills, not positive, out)

    def _names(self, out: set[str]) -> None:
        self.operand._names(out)


class _Group(Expression):
    """``&`` or ``|`` over two or more operands, flattened, deduplicated and sorted."""

    __slots__ = ("operands",)
    operands: tuple[Expression, ...]
    _symbol = ""
    _level = 0

    def __init__(self, operands: Iterable[Expression]) -> None:
        flat: dict[str, Expression] = {}
        for op in operands:
            if op is ANY:
                raise ValueError("'*' cannot be combined with other terms")
            for item in op.operands if isinstance(op, _Group) and type(op) is type(self) else (op,):
                flat.setdefault(str(item), item)
        if len(flat) < 2:
            raise ValueError(f"{type(self).__name__} needs two different operands")
        ordered = tuple(flat[text] for text in sorted(flat))
        object.__setattr__(self, "operands", ordered)
        parts = (str(op) if op.precedence > self._level else f"({op})" for op in ordered)
        self._set_text(f" {self._symbol} ".join(parts))

    @property
    def precedence(self) -> int:
        return self._level

    def _collect(self, skills: Mapping[str, int], positive: bool, out: set[str]) -> None:
        for op in self.operands:
            op._collect(skills, positive, out)

    def _names(self, out: set[str]) -> None:
        for op in self.operands:
            op._names(out)


class And(_Group):
    """Every operand matches."""

    __slots__ = ()
    _symbol = "&"
    _level = 2

    def matches(self, skills: Mapping[str, int]) -> bool:
        for op in self.operands:
            if not op.matches(skills):
                return False
        return True

    def candidate_skills(self) -> frozenset[str] | None:
        # Any one operand's candidates will do (all must hold); the smallest indexes best.
        found = [c for c in (op.candidate_skills() for op in self.operands) if c is not None]
        if not found:
            return None
        return min(found, key=lambda c: (len(c), sorted(c)))


class Or(_Group):
    """At least one operand matches."""

    __slots__ = ()
    _symbol = "|"
    _level = 1

    def matches(self, skills: Mapping[str, int]) -> bool:
        for op in self.operands:
            if op.matches(skills):
                return True
        return False

    def candidate_skills(self) -> frozenset[str] | None:
        out: set[str] = set()
        for op in self.operands:
            found = op.candidate_skills()
            if found is None:
                return None
            out |= found
        return frozenset(out)


class _AnyAgent(Expression):
    __slots__ = ()

    def __init__(self) -> None:
        self._set_text("*")

    @property
    def precedence(self) -> int:
        return 0

    def matches(self, skills: Mapping[str, int]) -> bool:
        return True

    def candidate_skills(self) -> frozenset[str] | None:
        return None

    def _collect(self, skills: Mapping[str, int], positive: bool, out: set[str]) -> None:
        return None

    def _names(self, out: set[str]) -> None:
        return None


ANY: Final[Expression] = _AnyAgent()
"""Matches every agent; its text is ``*`` and its score is 0."""


def negate(operand: Expression) -> Expression:
    """``!operand``, with ``!!x`` reduced to ``x``."""
    return operand.operand if isinstance(operand, Not) else Not(operand)


def all_of(operands: Iterable[Expression]) -> Expression:
    """``a & b & ...``; a single distinct operand is returned as is."""
    ops = list(operands)
    return ops[0] if len({str(op) for op in ops}) == 1 else And(ops)


def any_of(operands: Iterable[Expression]) -> Expression:
    """``a | b | ...``; a single distinct operand is returned as is."""
    ops = list(operands)
    return ops[0] if len({str(op) for op in ops}) == 1 else Or(ops)


# --------------------------------------------------------------------------- parser


def parse_expression(text: str) -> Expression:
    """Parse a skill expression (grammar in the module docstring).

    Raises :class:`ExpressionError` with the position of the first problem."""
    if not isinstance(text, str):
        raise TypeError("a skill expression is a str")
    return _Parser(text).parse()


class _Parser:
    """Recursive descent over the text; the position is the only state besides depth."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def fail(self, reason: str, position: int | None = None) -> NoReturn:
        raise ExpressionError(reason, self.text, self.pos if position is None else position)

    def skip_space(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in _SPACE:
            pos += 1
        self.pos = pos

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def unexpected(self, expected: str) -> NoReturn:
        ch = self.peek()
        if not ch:
            self.fail(f"unexpected end: expected {expected}")
        if ch not in _GRAMMAR_CHARS:
            self.fail(f"character {ch!r} is not allowed in a skill expression")
        self.fail(f"unexpected {ch!r}: expected {expected}")

    def parse(self) -> Expression:
        text = self.text
        if len(text) > MAX_TEXT:
            self.fail(f"expression longer than {MAX_TEXT} characters", MAX_TEXT)
        self.skip_space()
        if self.pos == len(text):
            self.fail("empty skill expression (use '*' for any agent)", 0)
        if self.peek() == "*":
            star = self.pos
            self.pos += 1
            self.skip_space()
            if self.pos == len(text):
                return ANY
            self.fail("'*' (any agent) must be the whole expression", star)
        expr = self.expr()
        self.skip_space()
        if self.pos < len(text):
            if self.peek() == ")":
                self.fail("unbalanced ')': there is no '(' to close")
            self.unexpected("'&', '|' or the end")
        return expr

    def expr(self) -> Expression:
        terms = [self.term()]
        while True:
            self.skip_space()
            if self.peek() != "|":
                return any_of(terms)
            if self.text.startswith("||", self.pos):
                self.fail("'||' is not an operator: use '|'")
            self.pos += 1
            terms.append(self.term())

    def term(self) -> Expression:
        factors = [self.factor()]
        while True:
            self.skip_space()
            if self.peek() != "&":
                return all_of(factors)
            if self.text.startswith("&&", self.pos):
                self.fail("'&&' is not an operator: use '&'")
            self.pos += 1
            factors.append(self.factor())

    def factor(self) -> Expression:
        self.skip_space()
        ch = self.peek()
        if ch == "!":
            self.enter()
            self.pos += 1
            result = negate(self.factor())
            self.depth -= 1
            return result
        if ch == "(":
            opened = self.pos
            self.enter()
            self.pos += 1
            inner = self.expr()
            self.skip_space()
            if self.peek() != ")":
                if self.pos == len(self.text):
                    self.fail(f"unbalanced '(' at position {opened}: expected ')'")
                self.unexpected("'&', '|' or ')'")
            self.pos += 1
            self.depth -= 1
            return inner
        if ch == "*":
            self.fail("'*' (any agent) must be the whole expression (family:* is any skill of a family)")
        if ch in _WORD_CHARS and _WORD_RE.match(self.text, self.pos):
            return self.skill()
        self.unexpected("a skill, '(' or '!'")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nested more than {MAX_DEPTH} levels deep")

    def word(self) -> str:
        match = _WORD_RE.match(self.text, self.pos)
        if match is None:
            self.unexpected("a skill name")
        if len(match.group()) > MAX_WORD:
            self.fail(f"a skill name part is longer than {MAX_WORD} characters")
        self.pos = match.end()
        return match.group()

    def skill(self) -> Skill:
        name = self.word()
        wildcard = False
        self.skip_space()
        if self.peek() == ":":
            self.pos += 1
            self.skip_space()
            if self.peek() == "*":
                wildcard = True
                self.pos += 1
            elif self.peek() in _WORD_CHARS:
                name = f"{name}:{self.word()}"
            else:
                self.unexpected("a skill value or '*' after ':'")
            self.skip_space()
            if self.peek() == ":":
                self.fail("a skill name has at most one ':'")
        cmp_at = self.pos
        cmp = next((op for op in _CMP_TOKENS if self.text.startswith(op, self.pos)), None)
        if cmp is None:
            return Skill(name, wildcard)
        self.pos += len(cmp)
        if cmp == "=" and self.peek() == "=":
            self.fail("'==' is not an operator: use '='", cmp_at)
        self.skip_space()
        match = _DIGITS_RE.match(self.text, self.pos)
        if match is None:
            self.unexpected(f"a level {MIN_LEVEL}..{MAX_LEVEL} after {cmp!r}")
        if match.end() < len(self.text) and self.text[match.end()] in _WORD_CHARS:
            self.fail(f"a level is a whole number {MIN_LEVEL}..{MAX_LEVEL}")
        level = int(match.group())
        if not MIN_LEVEL <= level <= MAX_LEVEL:
            self.fail(f"level {match.group()} is outside {MIN_LEVEL}..{MAX_LEVEL}")
        if (cmp == ">" and level >= MAX_LEVEL) or (cmp == "<" and level <= MIN_LEVEL):
            self.fail(f"'{cmp}{level}' can never hold: levels are {MIN_LEVEL}..{MAX_LEVEL}", cmp_at)
        self.pos = match.end()
        return Skill(name, wildcard, cmp, level)
