"""Asterisk ``extensions.conf`` loader and the pure parts of dialplan execution.

What is understood (enough for ``dialplans/ctid.conf`` and the capture dialplans in
``tests/fixtures/asterisk22/asterisk-conf-used/``):

* ``[context]`` sections (template markers such as ``(!)`` are stripped), ``[general]``
  (ignored) and ``[globals]`` (``NAME=value``);
* ``exten => X,1,App(args)``, ``same => n,App(args)``, ``n(label)`` priorities,
  ``exten => X,hint,PJSIP/agent1001``, ``include => other-context``;
* ``#include file`` relative to the including file (re-opening a context merges it,
  as ``extensions_cti.conf`` does with ``[from-trunk]``);
* patterns ``_X.``, ``_NXX``, ``_+X.``, ``[1-5]`` sets, ``!``; the ``s`` extension;
* ``${VAR}``, ``${VAR:offset:length}``, ``${FUNC(args)}`` (resolved by the channel) and
  ``$[...]`` expressions (comparisons, ``&``, ``|``, ``!``, arithmetic, parentheses) for
  ``GotoIf``/``Set``.

Applications are validated at load time against :data:`SUPPORTED_APPS`; anything else
is listed in :attr:`Dialplan.unsupported` (and the simulator refuses to start unless
told otherwise). Executing one raises :class:`UnsupportedApplication` — never a silent
success, because the dialplan that ships is the dialplan under test.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_APPS = frozenset(
    {
        "AGI", "Set", "Goto", "GotoIf", "MusicOnHold", "Dial", "Queue", "UserEvent",
        "Wait", "Answer", "Hangup", "NoOp", "Playback", "Read", "Return",
    }
)


class DialplanError(Exception):
    """The dialplan file cannot be loaded (syntax, missing include, unsupported app)."""


class UnsupportedApplication(DialplanError):
    """An application the simulator does not implement was executed."""


@dataclass(frozen=True, slots=True)
class Step:
    """One priority: ``App(data)`` as written (data is substituted at run time)."""

    app: str
    data: str
    source: str  # "file:line" for error messages


@dataclass(slots=True)
class Extension:
    name: str
    steps: dict[int, Step] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    hint: str | None = None

    @property
    def is_pattern(self) -> bool:
        return self.name.startswith("_")


@dataclass(slots=True)
class Context:
    name: str
    extensions: dict[str, Extension] = field(default_factory=dict)
    includes: list[str] = field(default_factory=list)


_APP_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)
_PRIO_RE = re.compile(r"^(\d+|n|hint)(?:\(([^)]*)\))?$")


def _strip_comment(line: str) -> str:
    out = []
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line) and line[i + 1] == ";":
            out.append(";")
            i += 2
            continue
        if ch == ";":
            break
        out.append(ch)
        i += 1
    return "".join(out).strip()


def split_app(text: str) -> tuple[str, str]:
    """``Dial(PJSIP/a,20)`` -> ``("Dial", "PJSIP/a,20")``; ``Hangup`` -> ``("Hangup", "")``."""
    m = _APP_RE.match(text)
    if not m:
        raise DialplanError(f"cannot parse application {text!r}")
    return m.group(1), m.group(2) or ""


def split_args(data: str, sep: str = ",") -> list[str]:
    """Split application data like ``ast_app_separate_args``: quotes and brackets protect
    the separator; the quotes themselves are removed."""
    args: list[str] = []
    cur: list[str] = []
    depth = 0
    quoted = False
    i = 0
    while i < len(data):
        ch = data[i]
        if ch == "\\" and i + 1 < len(data):
            cur.append(data[i + 1])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "([{":
            depth += 1
            cur.append(ch)
        elif not quoted and ch in ")]}":
            depth = max(0, depth - 1)
            cur.append(ch)
        elif ch == sep and not quoted and depth == 0:
            args.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    args.append("".join(cur))
    return args


def parse_options(text: str) -> dict[str, str]:
    """Application option letters as ``ast_app_parse_options`` reads them: ``tTg`` ->
    ``{"t": "", "T": "", "g": ""}``; an option may take an argument in parentheses,
    ``m(class)`` -> ``{"m": "class"}``. Letters inside an argument are not options."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(text):
        letter = text[i]
        i += 1
        if letter.isspace():
            continue
        arg = ""
        if i < len(text) and text[i] == "(":
            depth, j = 1, i + 1
            while j < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise DialplanError(f"option {letter}: missing ')' in {text!r}")
            arg, i = text[i + 1 : j - 1], j
        opts[letter] = arg
    return opts


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Compile an Asterisk extension pattern (``_NXX.``) to a regex."""
    body = pattern[1:]
    out = []
    i = 0
    while i < len(body):
        ch = body[i]
        up = ch.upper()
        if up == "X":
            out.append("[0-9]")
        elif up == "Z":
            out.append("[1-9]")
        elif up == "N":
            out.append("[2-9]")
        elif ch == ".":
            out.append(".+")
        elif ch == "!":
            out.append(".*")
        elif ch == "[":
            end = body.index("]", i)
            out.append("[" + body[i + 1 : end].replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("^" + "".join(out) + "$")


def _pattern_rank(name: str) -> tuple[int, int]:
    # More literal characters first; "." and "!" last (Asterisk's ordering, simplified).
    body = name[1:]
    wild = sum(1 for c in body if c in ".!")
    literal = sum(1 for c in body if c not in "XxZzNn.![]-")
    return (wild, -literal)


class Dialplan:
    """A loaded dialplan: contexts, globals and the list of unsupported applications."""

    def __init__(self) -> None:
        self.contexts: dict[str, Context] = {}
        self.globals: dict[str, str] = {}
        self.unsupported: list[str] = []  # "App at file:line"
        self.files: list[Path] = []

    # -- loading ---------------------------------------------------------------
    @classmethod
    def load(cls, *paths: str | Path) -> Dialplan:
        plan = cls()
        for p in paths:
            plan._load_file(Path(p), depth=0)
        return plan

    @classmethod
    def from_text(cls, text: str, name: str = "<text>") -> Dialplan:
        plan = cls()
        plan._load_lines(text.splitlines(), name, base=Path("."), depth=0)
        return plan

    def _load_file(self, path: Path, depth: int) -> None:
        if depth > 10:
            raise DialplanError(f"#include nesting too deep at {path}")
        if not path.is_file():
            raise DialplanError(f"dialplan file not found: {path}")
        self.files.append(path)
        self._load_lines(path.read_text(encoding="utf-8").splitlines(), str(path), path.parent, depth)

    def _load_lines(self, lines: list[str], name: str, base: Path, depth: int) -> None:
        section: str | None = None
        last_ext: Extension | None = None
        last_prio = 0
        for lineno, raw in enumerate(lines, 1):
            where = f"{name}:{lineno}"
            line = _strip_comment(raw)
            if not line:
                continue
            if line.startswith("#include"):
                target = line[len("#include"):].strip().strip('"<>')
                self._load_file(base / target, depth + 1)
                continue
            if line.startswith("["):
                end = line.find("]")
                if end < 0:
                    raise DialplanError(f"{where}: bad section header {line!r}")
                section = line[1:end].strip()
                last_ext = None
                if section not in ("general", "globals"):
                    self.contexts.setdefault(section, Context(section))
                continue
            if section is None:
                raise DialplanError(f"{where}: line outside any section")
            key, sep, value = line.partition("=")
            if not sep:
                raise DialplanError(f"{where}: expected 'key => value', got {line!r}")
            key = key.strip()
            value = value[1:].strip() if value.startswith(">") else value.strip()
            if section == "general":
                continue
            if section == "globals":
                self.globals[key] = value
                continue
            ctx = self.contexts[section]
            if key == "include":
                ctx.includes.append(value)
                continue
            if key == "exten":
                ext_name, _, rest = value.partition(",")
                ext_name = ext_name.strip()
                ext = ctx.extensions.setdefault(ext_name, Extension(ext_name))
            elif key == "same":
                if last_ext is None:
                    raise DialplanError(f"{where}: 'same' without a preceding 'exten'")
                ext, rest = last_ext, value
            else:
                raise DialplanError(f"{where}: unknown dialplan keyword {key!r}")
            prio_text, _, app_text = rest.partition(",")
            prio_text = prio_text.strip()
            m = _PRIO_RE.match(prio_text)
            if not m:
                raise DialplanError(f"{where}: bad priority {prio_text!r}")
            if m.group(1) == "hint":
                ext.hint = app_text.strip()
                last_ext = ext
                continue
            prio = last_prio + 1 if m.group(1) == "n" else int(m.group(1))
            if m.group(2):
                ext.labels[m.group(2)] = prio
            app, data = split_app(app_text)
            if app not in SUPPORTED_APPS:
                self.unsupported.append(f"{app} at {where}")
            if prio in ext.steps:
                raise DialplanError(f"{where}: duplicate priority {prio} for {ext.name}")
            ext.steps[prio] = Step(app, data, where)
            last_ext, last_prio = ext, prio

    # -- lookup ----------------------------------------------------------------
    def find_extension(self, context: str, exten: str, _seen: set[str] | None = None) -> Extension | None:
        ctx = self.contexts.get(context)
        if ctx is None:
            return None
        ext = ctx.extensions.get(exten)
        if ext is not None and ext.steps:
            return ext
        patterns = sorted((e for e in ctx.extensions.values() if e.is_pattern and e.steps),
                          key=lambda e: _pattern_rank(e.name))
        for cand in patterns:
            if pattern_regex(cand.name).match(exten):
                return cand
        seen = _seen or set()
        seen.add(context)
        for inc in ctx.includes:
            if inc not in seen:
                found = self.find_extension(inc, exten, seen)
                if found is not None:
                    return found
        return None

    def step(self, context: str, exten: str, priority: int) -> Step | None:
        ext = self.find_extension(context, exten)
        return None if ext is None else ext.steps.get(priority)

    def resolve_priority(self, context: str, exten: str, prio: str) -> int | None:
        prio = prio.strip()
        if prio.isdigit():
            return int(prio)
        ext = self.find_extension(context, exten)
        return None if ext is None else ext.labels.get(prio)

    def hints(self) -> dict[tuple[str, str], str]:
        return {
            (ctx.name, ext.name): ext.hint
            for ctx in self.contexts.values()
            for ext in ctx.extensions.values()
            if ext.hint
        }


# -- substitution ------------------------------------------------------------------

Resolver = Callable[[str], str]


def substitute(text: str, resolve: Resolver, evaluate: Callable[[str], str] | None = None) -> str:
    """Expand ``${...}`` and ``$[...]`` in ``text``. ``resolve`` gets the (already
    expanded) inside of ``${...}`` — a variable name, ``VAR:off:len`` or ``FUNC(args)``."""
    evaluate = evaluate or evaluate_expression
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        if text.startswith("${", i) or text.startswith("$[", i):
            opener = text[i + 1]
            closer = "}" if opener == "{" else "]"
            depth = 1
            j = i + 2
            while j < n and depth:
                if text[j] == opener:
                    depth += 1
                elif text[j] == closer:
                    depth -= 1
                j += 1
            if depth:
                out.append(text[i:])
                break
            inner = substitute(text[i + 2 : j - 1], resolve, evaluate)
            out.append(_resolve_var(inner, resolve) if opener == "{" else evaluate(inner))
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _resolve_var(inner: str, resolve: Resolver) -> str:
    if "(" not in inner and ":" in inner:
        name, _, spec = inner.partition(":")
        value = resolve(name)
        parts = spec.split(":")
        try:
            off = int(parts[0] or 0)
            length = int(parts[1]) if len(parts) > 1 and parts[1] else None
        except ValueError:
            return value
        sub = value[off:]
        return sub if length is None else sub[:length]
    return resolve(inner)


# -- $[...] expressions ---------------------------------------------------------------

_TOKEN_RE = re.compile(r'\s*("(?:[^"\\]|\\.)*"|>=|<=|!=|=~|[()=<>&|!+\-*/%?:]|[^\s()=<>&|!+\-*/%?:"]+)')


class _Expr:
    def __init__(self, text: str) -> None:
        self.tokens: list[str] = [t for t in _TOKEN_RE.findall(text) if t.strip()]
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def parse(self) -> str:
        if not self.tokens:  # an empty expression is false
            return ""
        value = self.or_()
        if self.peek() is not None:
            # Asterisk returns the raw text on a syntax error; be strict instead.
            raise DialplanError(f"bad expression near {self.peek()!r}")
        return value

    def or_(self) -> str:
        left = self.and_()
        while self.peek() == "|":
            self.take()
            right = self.and_()
            left = left if _truthy(left) else right
        return left

    def and_(self) -> str:
        left = self.cmp()
        while self.peek() == "&":
            self.take()
            right = self.cmp()
            left = left if (_truthy(left) and _truthy(right)) else "0"
        return left

    def cmp(self) -> str:
        left = self.add()
        while self.peek() in ("=", "!=", "<", ">", "<=", ">=", "=~"):
            op = self.take()
            right = self.add()
            if op == "=~":
                m = re.match(right, left)
                left = str(len(m.group(0))) if m else "0"
                continue
            ln, rn = _num(left), _num(right)
            a: float | str
            b: float | str
            a, b = (ln, rn) if ln is not None and rn is not None else (left, right)
            res = {
                "=": a == b, "!=": a != b, "<": a < b, ">": a > b,  # type: ignore[operator]
                "<=": a <= b, ">=": a >= b,  # type: ignore[operator]
            }[op]
            left = "1" if res else "0"
        return left

    def add(self) -> str:
        left = self.mul()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.mul()
            ln, rn = _num(left) or 0.0, _num(right) or 0.0
            left = _fmt(ln + rn if op == "+" else ln - rn)
        return left

    def mul(self) -> str:
        left = self.unary()
        while self.peek() in ("*", "/", "%"):
            op = self.take()
            right = self.unary()
            ln, rn = _num(left) or 0.0, _num(right) or 0.0
            if op == "*":
                left = _fmt(ln * rn)
            elif rn == 0:
                left = "0"
            else:
                left = _fmt(int(ln / rn) if op == "/" else ln % rn)
        return left

    def unary(self) -> str:
        tok = self.peek()
        if tok == "!":
            self.take()
            return "0" if _truthy(self.unary()) else "1"
        if tok == "-":
            self.take()
            return _fmt(-(_num(self.unary()) or 0.0))
        if tok == "(":
            self.take()
            value = self.or_()
            if self.peek() != ")":
                raise DialplanError("missing ')' in expression")
            self.take()
            return value
        if tok is None:
            return ""
        self.take()
        if tok.startswith('"') and tok.endswith('"'):
            return tok[1:-1]
        return tok


def _num(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _truthy(value: str) -> bool:
    return value not in ("", "0")


def evaluate_expression(text: str) -> str:
    """Evaluate the inside of ``$[...]`` (already variable-expanded)."""
    return _Expr(text).parse()


def is_true(value: str) -> bool:
    """Asterisk's truth for GotoIf: empty or ``0`` is false."""
    return _truthy(value.strip())
