"""Test support for the FastAGI captures: a trace-file reader and a parse_args model.

The ``.agi`` files (``fixtures/asterisk22/agi``) are real Asterisk 22 dialogues:
``[+  0.670] << line`` is a line Asterisk sent, ``>> line`` a line the capture
server sent, ``-- (...)`` an annotation. See that folder's README.

:func:`reference_parse_args` is an independent model of how Asterisk's res_agi
splits a command line into words, written from its documented behaviour (not
from ctid's code), so tests can check ``agi_quote`` and the server's output
against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TRACE_DIR = Path(__file__).parent / "fixtures" / "asterisk22" / "agi"

_TRACE_LINE_RE = re.compile(r"\[\+\s*(?P<t>[0-9]+\.[0-9]+)\] (?P<dir><<|>>|--)(?: (?P<text>.*))?")

Direction = Literal["<<", ">>", "--"]


@dataclass(frozen=True)
class TraceLine:
    t: float
    direction: Direction
    text: str

    @property
    def is_eof(self) -> bool:
        return self.direction == "--" and self.text.startswith("(EOF")

    @property
    def is_server_close(self) -> bool:
        return self.direction == "--" and self.text.startswith("(AGI server")


@dataclass(frozen=True)
class Trace:
    name: str
    lines: tuple[TraceLine, ...]

    @property
    def env_lines(self) -> list[str]:
        """The environment block, including its empty terminating line."""
        out: list[str] = []
        for line in self.lines:
            if line.direction == "<<":
                out.append(line.text)
                if line.text == "":
                    return out
        raise AssertionError(f"{self.name}: no end of environment")

    @property
    def after_env(self) -> list[TraceLine]:
        """Every ``<<``/``>>`` line and annotation after the environment block."""
        seen = 0
        env_len = len(self.env_lines)
        for index, line in enumerate(self.lines):
            if line.direction == "<<":
                seen += 1
                if seen == env_len:
                    return list(self.lines[index + 1 :])
        raise AssertionError(f"{self.name}: no end of environment")

    @property
    def commands(self) -> list[str]:
        return [line.text for line in self.lines if line.direction == ">>"]

    @property
    def has_eof(self) -> bool:
        return any(line.is_eof for line in self.lines)


def load_trace(name: str) -> Trace:
    """Read capture ``<name>.agi``; a missing file fails the test (never skips)."""
    path = trace_path(name)
    assert path.is_file(), f"FastAGI capture missing: {path}"
    lines: list[TraceLine] = []
    # split("\n"), not splitlines(): trailing spaces ("agi_accountcode: ") matter.
    for number, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if raw == "" or raw.startswith("#"):
            continue
        match = _TRACE_LINE_RE.fullmatch(raw)
        assert match is not None, f"{path.name}:{number}: not a trace line: {raw!r}"
        direction: Direction = match.group("dir")  # type: ignore[assignment]
        lines.append(TraceLine(float(match.group("t")), direction, match.group("text") or ""))
    return Trace(path.stem, tuple(lines))


def trace_path(name: str) -> Path:
    return TRACE_DIR / f"{name}.agi"


def reference_parse_args(line: str) -> list[str]:
    """Split an AGI command line into words the way res_agi does.

    Rules: space and tab separate words outside double quotes; an unescaped
    double quote toggles quoting and, when it opens right after whitespace,
    starts a word (so ``""`` is an empty word); a backslash makes the next
    character literal, inside or outside quotes; everything else is literal.
    """
    words: list[str] = []
    word: list[str] | None = None
    quoted = False
    escaped = False
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and word is None:
                word = []
            continue
        if ch in " \t" and not quoted and not escaped:
            if word is not None:
                words.append("".join(word))
                word = None
            continue
        if ch == "\\" and not escaped:
            escaped = True
            continue
        if word is None:
            word = []
        word.append(ch)
        escaped = False
    if word is not None:
        words.append("".join(word))
    return words


# Command names in the captures, longest first, to split "GET FULL VARIABLE x".
AGI_COMMAND_NAMES = sorted(
    [
        "ANSWER",
        "CHANNEL STATUS",
        "EXEC",
        "GET DATA",
        "GET FULL VARIABLE",
        "GET VARIABLE",
        "NOOP",
        "SET VARIABLE",
        "STREAM FILE",
        "VERBOSE",
        "WAIT FOR DIGIT",
    ],
    key=lambda name: -len(name.split()),
)


def split_command(line: str) -> tuple[str, list[str]]:
    """``'STREAM FILE beep ""'`` -> ``("STREAM FILE", ["beep", ""])``."""
    words = reference_parse_args(line)
    for name in AGI_COMMAND_NAMES:
        size = len(name.split())
        if [w.upper() for w in words[:size]] == name.split():
            return name, words[size:]
    raise AssertionError(f"unknown AGI command in capture: {line!r}")
