"""The deployment files: docker-compose.yml, the Asterisk sample config and the dialplan.

Nothing here needs Docker or Asterisk. The compose file is checked against the
compose-spec JSON schema plus the cross-references the schema cannot see (services,
mounts, volumes, ports, the compose-only Asterisk overrides). The dialplan is linted
with asterisklint and then *walked* by a tiny interpreter, so the fail-open path
(AGISTATUS=FAILURE -> Queue) is checked as behaviour, not as text. asterisklint is GPL:
it is only run as a program, never imported.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DIALPLAN = ROOT / "dialplans" / "ctid.conf"
CONF_DIR = ROOT / "asterisk-conf"
CTID_TOML = ROOT / "deploy" / "ctid.toml"

# The applications the ctid simulator implements; it rejects every other one.
SIMULATOR_APPS = frozenset({
    "AGI", "Set", "Goto", "GotoIf", "MusicOnHold", "Dial", "Queue", "UserEvent", "Wait",
    "Answer", "Hangup", "NoOp", "Playback", "Read",
})

# AMI class names Asterisk 22 knows. A misspelt class is dropped silently by Asterisk.
AMI_CLASSES = frozenset({
    "system", "call", "log", "verbose", "command", "agent", "user", "config", "dtmf",
    "reporting", "cdr", "dialplan", "originate", "agi", "cc", "aoc", "test", "security",
    "message", "all", "none",
})


# --------------------------------------------------------------------------- parsers

@dataclass
class Section:
    name: str
    templates: list[str] = field(default_factory=list)
    is_template: bool = False
    options: list[tuple[str, str]] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        """The last value of ``key`` (Asterisk: a later line wins)."""
        values = self.getall(key)
        return values[-1] if values else None

    def getall(self, key: str) -> list[str]:
        return [v for k, v in self.options if k.lower() == key.lower()]


@dataclass
class ConfFile:
    sections: list[Section]
    includes: list[tuple[str, str]]  # (directive, file name)

    def named(self, name: str) -> list[Section]:
        return [s for s in self.sections if s.name == name]

    def one(self, name: str) -> Section:
        found = self.named(name)
        assert len(found) == 1, f"expected exactly one [{name}], found {len(found)}"
        return found[0]


def _strip_comment(line: str) -> str:
    # ';' starts a comment unless escaped as '\;'.
    out = []
    i = 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line) and line[i + 1] == ";":
            out.append(";")
            i += 2
            continue
        if line[i] == ";":
            break
        out.append(line[i])
        i += 1
    return "".join(out).rstrip()


def parse_conf(text: str, *, fragment: bool = False) -> ConfFile:
    """Asterisk's INI dialect: repeated keys, ``=>``, ``[name](!)``, ``[name](tpl)``,
    ``[name](+)`` (append to the earlier section), ``#include``/``#tryinclude``.

    ``fragment``: the text is an included site file, whose ``(+)`` sections extend
    sections of the file that includes it."""
    sections: list[Section] = []
    includes: list[tuple[str, str]] = []
    current: Section | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        if line.startswith("#"):
            directive, _, rest = line.partition(" ")
            assert directive in ("#include", "#tryinclude"), f"line {lineno}: {raw!r}"
            includes.append((directive, rest.strip().strip('"<>')))
            continue
        header = re.fullmatch(r"\[([^\]]+)\](?:\(([^)]*)\))?", line)
        if header:
            name, flags = header.group(1), (header.group(2) or "")
            parts = [p.strip() for p in flags.split(",") if p.strip()]
            if "+" in parts:
                earlier = [s for s in sections if s.name == name]
                if earlier:
                    current = earlier[-1]
                    continue
                assert fragment, f"line {lineno}: [{name}](+) without an earlier [{name}]"
                parts.remove("+")
            current = Section(name, templates=[p for p in parts if p != "!"],
                              is_template="!" in parts)
            sections.append(current)
            continue
        match = re.fullmatch(r"([^=]+?)\s*=>?\s*(.*)", line)
        assert match, f"line {lineno}: not 'key = value': {raw!r}"
        assert current is not None, f"line {lineno}: option outside a section"
        current.options.append((match.group(1).strip(), match.group(2).strip()))
    return ConfFile(sections, includes)


def read_conf(path: Path) -> ConfFile:
    return parse_conf(path.read_text(encoding="utf-8"))


def resolved_options(conf: ConfFile, section: Section) -> list[tuple[str, str]]:
    """A section's options with its templates' options first (pjsip style)."""
    out: list[tuple[str, str]] = []
    for name in section.templates:
        templates = [s for s in conf.sections if s.name == name and s.is_template]
        assert templates, f"[{section.name}] uses unknown template {name!r}"
        out.extend(resolved_options(conf, templates[-1]))
    return out + section.options


@dataclass
class Priority:
    number: int
    label: str | None
    app: str
    args: str


@dataclass
class Dialplan:
    contexts: dict[str, dict[str, list[Priority]]]
    hints: dict[str, dict[str, str]]
    includes: dict[str, list[str]]
    globals: dict[str, str]


def parse_dialplan(*texts: str) -> Dialplan:
    """extensions.conf syntax: ``exten => pat,prio(label),App(args)`` and ``same => ...``."""
    contexts: dict[str, dict[str, list[Priority]]] = {}
    hints: dict[str, dict[str, str]] = {}
    includes: dict[str, list[str]] = {}
    globals_: dict[str, str] = {}
    for text in texts:
        conf = parse_conf(text)
        for section in conf.sections:
            if section.name == "general":
                continue
            if section.name == "globals":
                globals_.update(section.options)
                continue
            exts = contexts.setdefault(section.name, {})
            last_exten: str | None = None
            for key, value in section.options:
                if key == "include":
                    includes.setdefault(section.name, []).append(value)
                    continue
                assert key in ("exten", "same"), f"[{section.name}] unexpected {key!r}"
                if key == "exten":
                    last_exten, _, value = value.partition(",")
                assert last_exten is not None, f"[{section.name}] 'same' before 'exten'"
                prio, _, rest = value.partition(",")
                if prio == "hint":
                    hints.setdefault(section.name, {})[last_exten] = rest
                    continue
                m = re.fullmatch(r"(\d+|n)(?:\(([A-Za-z0-9_-]+)\))?", prio)
                assert m, f"[{section.name}] bad priority {prio!r}"
                plist = exts.setdefault(last_exten, [])
                number = len(plist) + 1 if m.group(1) == "n" else int(m.group(1))
                assert number == len(plist) + 1, f"{last_exten}: priority {number} out of order"
                app = re.fullmatch(r"([A-Za-z]+)\((.*)\)", rest)
                assert app, f"[{section.name}] {last_exten},{number}: bad application {rest!r}"
                plist.append(Priority(number, m.group(2), app.group(1), app.group(2)))
    return Dialplan(contexts, hints, includes, globals_)


def load_dialplan() -> Dialplan:
    return parse_dialplan(
        (CONF_DIR / "extensions.conf").read_text(encoding="utf-8"),
        DIALPLAN.read_text(encoding="utf-8"),
    )


# --------------------------------------------------------------------------- dialplan walker

def pattern_matches(pattern: str, exten: str) -> bool:
    """Asterisk extension matching (X, Z, N, [..], '.', '!'); dashes are ignored."""
    if not pattern.startswith("_"):
        return pattern.replace("-", "") == exten.replace("-", "")
    regex, pat, i = "", pattern[1:], 0
    while i < len(pat):
        ch = pat[i]
        if ch == "[":
            end = pat.index("]", i)
            regex += "[" + pat[i + 1:end] + "]"
            i = end
        elif ch != "-":
            regex += {"X": "[0-9]", "Z": "[1-9]", "N": "[2-9]", ".": ".+", "!": ".*"}.get(
                ch, re.escape(ch))
        i += 1
    return re.fullmatch(regex, exten.replace("-", "")) is not None


def find_exten(dp: Dialplan, context: str, exten: str) -> str:
    exts = dp.contexts[context]
    if exten in exts:
        return exten
    matching = [p for p in exts if p.startswith("_") and pattern_matches(p, exten)]
    assert len(matching) == 1, f"{exten!r} in [{context}] matches {matching}"
    return matching[0]


def filter_chars(spec: str) -> set[str]:
    """The characters FILTER(<spec>,...) keeps: literal characters and ``a-b`` ranges."""
    chars: set[str] = set()
    i = 0
    while i < len(spec):
        if i + 2 < len(spec) and spec[i + 1] == "-":
            chars.update(chr(c) for c in range(ord(spec[i]), ord(spec[i + 2]) + 1))
            i += 3
        else:
            chars.add(spec[i])
            i += 1
    return chars


def substitute(text: str, variables: dict[str, str]) -> str:
    # Innermost first; unknown variables and functions become empty, as in Asterisk.
    # FILTER(spec,value) and LEN(value) are the functions whose value matters here.
    pattern = re.compile(r"\$\{([^${}]*)\}")
    while (m := pattern.search(text)) is not None:
        expr = m.group(1)
        if expr.startswith("FILTER(") and expr.endswith(")"):
            spec, _, raw = expr[len("FILTER("):-1].partition(",")
            keep = filter_chars(spec)
            value = "".join(c for c in raw if c in keep)
        elif expr.startswith("LEN(") and expr.endswith(")"):
            value = str(len(expr[len("LEN("):-1]))
        else:
            value = variables.get(expr, "")
        text = text[:m.start()] + value + text[m.end():]
    return text


_OPERAND = r'(?:"([^"]*)"|([^\s"=!<>\]]+))'
_EXPRESSION = re.compile(r"\$\[\s*" + _OPERAND + r"\s*(=|!=|<=|>=|<|>)\s*" + _OPERAND + r"\s*\]")


def evaluate(expression: str) -> bool:
    """The only expression shape the dialplan may use: one comparison, $["a" = "b"] or
    $["a" != "b"] for strings, $[n < m] (= != < > <= >=) for whole numbers."""
    m = _EXPRESSION.fullmatch(expression.strip())
    assert m, f"unsupported expression {expression!r}"
    quoted = (m.group(1) is not None, m.group(4) is not None)
    left = m.group(1) if quoted[0] else m.group(2)
    right = m.group(4) if quoted[1] else m.group(5)
    op = m.group(3)
    if left.isdigit() and right.isdigit() and not any(quoted):
        a, b = int(left), int(right)
        return {"=": a == b, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]
    assert all(quoted) and op in ("=", "!="), f"bare non-numbers or ordering of strings: {expression!r}"
    return (left == right) == (op == "=")


def split_target(target: str, context: str) -> tuple[str, str | None, str]:
    """(context, extension or None for "this one", priority or label)."""
    parts = [p.strip() for p in target.split(",")]
    if len(parts) == 1:
        return context, None, parts[0]
    if len(parts) == 2:
        return context, parts[0], parts[1]
    assert len(parts) == 3, f"bad Goto target {target!r}"
    return parts[0], parts[1], parts[2]


def priority_index(plist: list[Priority], prio: str) -> int:
    if prio.isdigit():
        assert 1 <= int(prio) <= len(plist), f"no priority {prio}"
        return int(prio) - 1
    for i, p in enumerate(plist):
        if p.label == prio:
            return i
    raise AssertionError(f"no label {prio!r}")


@dataclass
class Walk:
    apps: list[tuple[str, str]]  # (application, substituted args)
    end: str                      # the final application, "end" if priorities ran out,
                                  # "AGI" when a scripted walk ran out of AGI answers
    variables: dict[str, str]
    contexts: list[str] = field(default_factory=list)  # the context of each app, in order

    def ran(self, app: str) -> list[str]:
        return [args for a, args in self.apps if a == app]


def walk(dp: Dialplan, context: str, dialled: str, agistatus: str | list[str],
         route: str | list[str | None] | None = None, *,
         variables: dict[str, str] | None = None) -> Walk:
    """Run the dialplan for a call to ``dialled``. With a string ``agistatus`` every AGI()
    returns it and, when ``route`` is given, sets CTID_ROUTE as ctid's scripts do. With
    lists, the n-th AGI() gets the n-th status and route (None: CTID_ROUTE untouched),
    and the walk stops (end "AGI") at the first AGI() past the end of the script.
    ``variables``: channel variables set before the walk (e.g. ctid's Setvars, or the
    DIALSTATUS a Dial() leaves)."""
    script = isinstance(agistatus, list)
    statuses: list[str] = agistatus if isinstance(agistatus, list) else []
    routes: list[str | None] = route if isinstance(route, list) else [None] * len(statuses)
    assert len(routes) == len(statuses), "one route per scripted AGI"
    agi_calls = 0
    state = {**dp.globals, **(variables or {})}
    exten = find_exten(dp, context, dialled)
    index = 0
    state["EXTEN"] = dialled
    apps: list[tuple[str, str]] = []
    where: list[str] = []
    for _ in range(400):
        plist = dp.contexts[context][exten]
        if index >= len(plist):
            return Walk(apps, "end", state, where)
        step = plist[index]
        args = substitute(step.args, state)
        apps.append((step.app, args))
        where.append(context)
        index += 1
        if step.app in ("Hangup", "Queue"):
            return Walk(apps, step.app, state, where)
        if step.app == "AGI":
            if script:
                if agi_calls == len(statuses):
                    return Walk(apps, "AGI", state, where)
                state["AGISTATUS"] = statuses[agi_calls]
                if routes[agi_calls] is not None:
                    state["CTID_ROUTE"] = routes[agi_calls] or ""
            else:
                state["AGISTATUS"] = agistatus  # type: ignore[assignment]
                if route is not None:
                    state["CTID_ROUTE"] = route  # type: ignore[assignment]
            agi_calls += 1
        elif step.app == "Set":
            name, _, value = args.partition("=")
            state[name.lstrip("_")] = value
        elif step.app in ("Goto", "GotoIf"):
            target = args
            if step.app == "GotoIf":
                condition, _, branches = step.args.partition("?")
                if_true, _, if_false = branches.partition(":")
                target = if_true if evaluate(substitute(condition, state)) else if_false
                target = substitute(target, state)
                if not target:
                    continue
            context, new_exten, prio = split_target(target, context)
            if new_exten is not None:
                exten = find_exten(dp, context, new_exten)
                state["EXTEN"] = new_exten
            index = priority_index(dp.contexts[context][exten], prio)
    raise AssertionError(f"dialplan loop: {apps[-10:]}")


# --------------------------------------------------------------------------- dialplan tests

def test_dialplan_passes_asterisklint(tmp_path: Path) -> None:
    # Asterisk resolves #include against its config dir, so lint both files side by
    # side, as they are installed. No ctid-site.conf: its (+) syntax is unknown to
    # asterisklint 0.4.3, and the #tryinclude is skipped when the file is missing.
    shutil.copy(CONF_DIR / "extensions.conf", tmp_path / "extensions.conf")
    shutil.copy(DIALPLAN, tmp_path / "ctid.conf")
    alint = Path(sys.executable).parent / "asterisklint"
    if not alint.exists():
        found = shutil.which("asterisklint")
        assert found, "asterisklint is not installed (pip install asterisklint)"
        alint = Path(found)
    # I_NOTIMPL_HINT: asterisklint has not implemented `hint` lines, and [from-agents]
    # needs one per agent for device state. Nothing else is ignored.
    env = {**os.environ, "ALINT_IGNORE": "I_NOTIMPL_HINT"}
    result = subprocess.run(
        [str(alint), "dialplan-check", "extensions.conf"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_dialplan_uses_only_applications_the_simulator_implements() -> None:
    dp = load_dialplan()
    used = {p.app for exts in dp.contexts.values() for plist in exts.values() for p in plist}
    assert used <= SIMULATOR_APPS, f"not implemented by the simulator: {used - SIMULATOR_APPS}"


def test_globals_name_the_agi_url_and_the_fallback_queue() -> None:
    conf = read_conf(DIALPLAN)
    assert conf.sections[0].name == "globals", "[globals] must open ctid.conf"
    glob = conf.one("globals")
    assert glob.getall("CTID_AGI_URL") == ["agi://127.0.0.1:4573"]
    assert glob.getall("CTID_FALLBACK_QUEUE") == ["ctid-fallback"]
    # The include keeps [globals] the second context, after [general].
    ext = read_conf(CONF_DIR / "extensions.conf")
    assert ext.sections[0].name == "general"
    assert ext.includes[0] == ("#include", "ctid.conf")


def test_inbound_matches_any_dnis_and_takes_the_agi_url_from_the_global() -> None:
    dp = load_dialplan()
    inbound = dp.contexts["ctid-inbound"]
    assert {"_X.", "s"} <= set(inbound)
    agi_calls = [p for exts in dp.contexts.values() for plist in exts.values()
                 for p in plist if p.app == "AGI"]
    assert agi_calls, "no AGI() in the dialplan"
    for p in agi_calls:
        assert p.args.startswith("${CTID_AGI_URL}/"), p.args


@pytest.mark.parametrize("dialled", ["442071234567", "+442071234567", "100", "s"])
def test_ctid_unreachable_falls_back_to_the_native_queue(dialled: str) -> None:
    dp = load_dialplan()
    result = walk(dp, "ctid-inbound", dialled, agistatus="FAILURE")
    assert result.end == "Queue", result.apps
    assert result.apps[-1][1].split(",")[0] == "ctid-fallback"
    agi = [args for app, args in result.apps if app == "AGI"]
    shown = "" if dialled == "s" else dialled  # FILTER keeps digits and '+' only
    assert agi == [f"agi://127.0.0.1:4573/inbound?dnis={shown}"]
    assert ("Answer", "") in result.apps
    assert result.variables["CTID_DNIS"] == shown


@pytest.mark.parametrize("status", ["NOTFOUND", ""])
def test_unexpected_agi_status_also_fails_open(status: str) -> None:
    assert walk(load_dialplan(), "ctid-inbound", "100", agistatus=status).end == "Queue"


@pytest.mark.parametrize(("status", "route"), [("SUCCESS", "release"), ("HANGUP", None), ("HANGUP", "")])
def test_caller_hangup_or_ctid_release_ends_in_hangup_not_in_the_fallback(status: str, route: str | None) -> None:
    result = walk(load_dialplan(), "ctid-inbound", "+442071234567", agistatus=status, route=route)
    assert result.end == "Hangup", result.apps
    assert all(app != "Queue" for app, _ in result.apps)


@pytest.mark.parametrize("route", [None, "", "fallback"])
def test_ctid_closing_without_release_fails_open(route: str | None) -> None:
    # ctid crashed mid-session (no CTID_ROUTE), or chose the native queue.
    result = walk(load_dialplan(), "ctid-inbound", "100", agistatus="SUCCESS", route=route)
    assert result.end == "Queue", result.apps


def test_fallback_context_queues_then_hangs_up() -> None:
    result = walk(load_dialplan(), "ctid-fallback", "s", agistatus="")
    assert [app for app, _ in result.apps][-1] == "Queue"
    plist = load_dialplan().contexts["ctid-fallback"]["s"]
    assert [p.app for p in plist][-2:] == ["Queue", "Hangup"]


def _guarded(before: Any, target: str) -> bool:
    """``GotoIf($[${DIALPLAN_EXISTS(<target>)}]?<label>:<elsewhere>)`` right before a
    ``Goto(<target>)`` labelled ``<label>``: the target is checked when the call runs."""
    if before.app != "GotoIf":
        return False
    condition, _, branches = before.args.partition("?")
    return condition.replace(" ", "") == f"$[${{DIALPLAN_EXISTS({target})}}]" and ":" in branches


def test_every_goto_and_include_target_exists() -> None:
    # asterisklint misses a missing include and some missing Goto targets.
    dp = load_dialplan()
    for context, target_list in dp.includes.items():
        for target in target_list:
            assert target in dp.contexts, f"[{context}] includes unknown context {target!r}"
    for context, exts in dp.contexts.items():
        for exten, plist in exts.items():
            for i, p in enumerate(plist):
                if p.app == "Goto" and i > 0 and _guarded(plist[i - 1], p.args):
                    continue  # a dynamic target the priority before checks with DIALPLAN_EXISTS
                if p.app == "Goto":
                    targets = [p.args]
                elif p.app == "GotoIf":
                    branches = p.args.partition("?")[2]
                    targets = [t for t in branches.split(":") if t]
                else:
                    continue
                for target in targets:
                    where = f"[{context}] {exten},{p.number} {p.app}({p.args})"
                    # A target may be built from globals (their shipped defaults are
                    # checked); from anything else it could not be checked at all.
                    target = substitute(target, dp.globals)
                    assert "$" not in target, f"{where}: dynamic target"
                    assert target.strip(), f"{where}: a global in the target is empty"
                    ctx, ext, prio = split_target(target, context)
                    ext = exten if ext is None else ext
                    assert ctx in dp.contexts, f"{where}: no context {ctx!r}"
                    assert ext in dp.contexts[ctx], f"{where}: no extension {ext!r} in [{ctx}]"
                    priority_index(dp.contexts[ctx][ext], prio)


def test_every_context_is_commented() -> None:
    lines = DIALPLAN.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("["):
            assert lines[i + 1].startswith(";"), f"{line} has no comment below it"


# --------------------------------------------------------------------------- ctid's contexts
# The walker plays ctid's part: AGI() answers come from the scripted statuses/routes,
# AMI Setvars and Dial()'s DIALSTATUS are given as variables.

# Where ctid sends calls with Redirect/Originate, and the extensions it names there.
CTID_ENTRY_POINTS = {
    "ctid-hold": {"s"}, "ctid-connect": {"s"}, "ctid-onhold": {"s", "agent"},
    "ctid-callback": {"s"}, "ctid-outbound": {"s"}, "ctid-voicemail": {"s"}, "ctid-fallback": {"s"},
}
CHECKIN = "agi://127.0.0.1:4573/checkin?call_id=c1"
SURVEY = "agi://127.0.0.1:4573/survey?call_id=c1"


def pjsip_endpoints() -> set[str]:
    conf = read_conf(CONF_DIR / "pjsip.conf")
    return {s.name for s in conf.sections
            if not s.is_template and dict(resolved_options(conf, s)).get("type") == "endpoint"}


def test_the_contexts_ctid_redirects_and_originates_into_exist() -> None:
    dp = load_dialplan()
    for context, extens in CTID_ENTRY_POINTS.items():
        assert context in dp.contexts, context
        assert extens <= set(dp.contexts[context]), (context, set(dp.contexts[context]))
    assert dp.globals["CTID_VOICEMAIL_CONTEXT"] == "ctid-voicemail"
    assert dp.globals["CTID_TRUNK"] in pjsip_endpoints()
    assert dp.globals["CTID_OUTBOUND_RING_TIMEOUT"].isdigit()


def test_inbound_hold_route_sends_the_caller_to_the_ctid_hold_loop() -> None:
    result = walk(load_dialplan(), "ctid-inbound", "+442071234567", ["SUCCESS", "SUCCESS"],
                  ["hold", "release"], variables={"CTID_CALL_ID": "c1"})
    assert result.ran("AGI") == ["agi://127.0.0.1:4573/inbound?dnis=+442071234567", CHECKIN]
    assert "ctid-hold" in result.contexts and result.end == "Hangup"
    assert "Queue" not in dict(result.apps)


@pytest.mark.parametrize("status", ["FAILURE", "NOTFOUND", ""])
def test_inbound_hold_route_counts_only_after_a_successful_session(status: str) -> None:
    result = walk(load_dialplan(), "ctid-inbound", "200", agistatus=status, route="hold")
    assert result.end == "Queue" and "ctid-hold" not in result.contexts, result.apps


def hold_walk(statuses: list[str], routes: list[str | None], **variables: str) -> Walk:
    return walk(load_dialplan(), "ctid-hold", "s", statuses, routes, variables={"CTID_CALL_ID": "c1", **variables})


def test_hold_loops_music_then_check_in_with_agiexitonhangup_set() -> None:
    result = hold_walk(["SUCCESS", "SUCCESS", "HANGUP"], ["hold", "", None], CTID_CHECKIN="3")
    assert result.end == "AGI", "hold, no answer and a HANGUP status all loop to the next check-in"
    assert result.ran("AGI") == [CHECKIN] * 4
    assert result.ran("MusicOnHold") == [",3"] * 4
    # Before every check-in: AGIEXITONHANGUP=yes (so a Redirect takes effect at once),
    # music, and a cleared CTID_ROUTE (a stale "hold" must not survive a ctid crash).
    previous = -1
    for i, (app, _) in enumerate(result.apps):
        if app != "AGI":
            continue
        between = result.apps[previous + 1:i]
        assert ("Set", "AGIEXITONHANGUP=yes") in between
        assert ("Set", "CTID_ROUTE=") in between
        assert between.index(("Set", "CTID_ROUTE=")) > between.index(("MusicOnHold", ",3"))
        previous = i


@pytest.mark.parametrize(("value", "seconds"), [
    (None, "5"), ("", "5"), ("abc", "5"), ("0", "5"), ("1", "1"), ("7s", "7"), ("10", "10"), ("11", "10"),
    ("99", "10"), ("5,evil", "5"),
])
def test_checkin_interval_defaults_to_5_and_stays_between_1_and_10(value: str | None, seconds: str) -> None:
    # MusicOnHold takes 0 or junk as "forever": a caller would never check in again.
    extra = {} if value is None else {"CTID_CHECKIN": value}
    assert hold_walk(["SUCCESS"], ["release"], **extra).ran("MusicOnHold") == [f",{seconds}"]


@pytest.mark.parametrize(("status", "route", "end", "context"), [
    ("FAILURE", "hold", "Queue", "ctid-fallback"),    # ctid is gone, whatever CTID_ROUTE says
    ("FAILURE", None, "Queue", "ctid-fallback"),
    ("NOTFOUND", "hold", "Queue", "ctid-fallback"),
    ("SUCCESS", "fallback", "Queue", "ctid-fallback"),
    ("SUCCESS", "no-such-route", "Queue", "ctid-fallback"),
    ("SUCCESS", "release", "Hangup", "ctid-hold"),
    ("SUCCESS", "voicemail", "Hangup", "ctid-voicemail"),
])
def test_checkin_outcomes(status: str, route: str | None, end: str, context: str) -> None:
    result = hold_walk([status], [route])
    assert (result.end, result.contexts[-1]) == (end, context), result.apps
    if end == "Queue":
        assert result.apps[-1] == ("Queue", "ctid-fallback")
    if context == "ctid-voicemail":
        assert result.ran("Playback") == ["vm-nobodyavail&vm-goodbye"]


def test_voicemail_route_follows_the_voicemail_context_variable() -> None:
    # ctid (or ctid-site.conf) may point one call at another context: the channel
    # variable wins over the global.
    result = hold_walk(["SUCCESS"], ["voicemail"], CTID_VOICEMAIL_CONTEXT="ctid-fallback")
    assert result.end == "Queue" and result.contexts[-1] == "ctid-fallback"


def connect_walk(dialstatus: str, statuses: list[str] | None = None, **variables: str) -> Walk:
    base = {"CTID_CALL_ID": "c1", "CTID_TARGET": "PJSIP/1001", "CTID_RING_TIMEOUT": "15", "DIALSTATUS": dialstatus}
    return walk(load_dialplan(), "ctid-connect", "s", statuses or [], [None] * len(statuses or []),
                variables={**base, **variables})


@pytest.mark.parametrize("status", ["NOANSWER", "BUSY", "CHANUNAVAIL", "CONGESTION"])
def test_connect_without_answer_reports_and_goes_back_to_hold(status: str) -> None:
    result = connect_walk(status)
    assert result.ran("Dial") == ["PJSIP/1001,15,g"]
    assert result.ran("UserEvent") == [f"CtidConnect,CallID: c1,DialStatus: {status}"]
    assert result.end == "AGI" and result.contexts[-1] == "ctid-hold"  # the next check-in
    assert result.ran("AGI") == [CHECKIN]


def test_connect_answered_hangs_up_or_runs_the_survey() -> None:
    plain = connect_walk("ANSWER")
    assert plain.ran("UserEvent") == ["CtidConnect,CallID: c1,DialStatus: ANSWER"]
    assert plain.end == "Hangup" and plain.ran("AGI") == []
    survey = connect_walk("ANSWER", ["SUCCESS"], CTID_AFTER="survey")
    assert survey.ran("AGI") == [SURVEY] and survey.end == "Hangup"


@pytest.mark.parametrize(("opts", "dialled"), [
    ("", "g"), ("g", "g"), ("t", "gt"), ("tT", "gtT"), ("gT", "gT"), ("tL(60000)", "gt"), ("m,300", "g"),
    ("r", "g"),
])
def test_connect_dial_options_are_always_g_plus_only_t_and_T(opts: str, dialled: str) -> None:
    # g: without it the caller is hung up when the agent hangs up and no CtidConnect
    # ANSWER is sent. Anything but t/T is dropped: Dial arguments cannot be smuggled in.
    assert connect_walk("ANSWER", CTID_DIAL_OPTS=opts).ran("Dial") == [f"PJSIP/1001,15,{dialled}"]


@pytest.mark.parametrize(("timeout", "seconds"), [
    (None, "20"), ("", "20"), ("0", "20"), ("abc", "20"), ("15", "15"), ("30,m", "30"),
])
def test_connect_ring_timeout_defaults_to_20(timeout: str | None, seconds: str) -> None:
    # Dial takes 0 or junk as "ring forever": a caller would never get back to hold.
    result = walk(load_dialplan(), "ctid-connect", "s", [], [], variables={
        "CTID_CALL_ID": "c1", "CTID_TARGET": "PJSIP/1001", "DIALSTATUS": "NOANSWER",
        **({} if timeout is None else {"CTID_RING_TIMEOUT": timeout})})
    assert result.ran("Dial") == [f"PJSIP/1001,{seconds},g"]


def test_connect_without_a_target_does_not_dial_and_goes_back_to_hold() -> None:
    result = connect_walk("", CTID_TARGET="")
    assert result.ran("Dial") == []
    assert result.ran("UserEvent") == ["CtidConnect,CallID: c1,DialStatus: CHANUNAVAIL"]
    assert result.contexts[-1] == "ctid-hold" and result.end == "AGI"


def test_onhold_caller_waits_on_music_until_moved_then_ends_like_a_call() -> None:
    dp = load_dialplan()
    caller = walk(dp, "ctid-onhold", "s", [], [], variables={"CTID_CALL_ID": "c1"})
    # No duration: only ctid's Bridge (resume) or a Redirect may end the hold. What runs
    # after it is the Bridge action's after-bridge location: the call is over.
    assert caller.ran("MusicOnHold") == [""]
    assert caller.end == "Hangup" and caller.contexts[-1] == "ctid-connect"
    survey = walk(dp, "ctid-onhold", "s", ["SUCCESS"], [None], variables={"CTID_CALL_ID": "c1", "CTID_AFTER": "survey"})
    assert survey.ran("AGI") == [SURVEY]
    agent = walk(dp, "ctid-onhold", "agent", [], [], variables={"CTID_CALL_ID": "c1"})
    assert agent.ran("Wait") == ["3600"] and agent.ran("MusicOnHold") == []
    assert agent.end == "Hangup"
    # The Bridge action resumes each leg at the priority after its hold application.
    for exten, app in (("s", "MusicOnHold"), ("agent", "Wait")):
        plist = dp.contexts["ctid-onhold"][exten]
        held = next(i for i, p in enumerate(plist) if p.app == app)
        assert held + 1 < len(plist), f"{exten}: nothing after {app} for the after-bridge location"


@pytest.mark.parametrize(("context", "variable", "event"), [
    ("ctid-callback", "CTID_CALLBACK_NUMBER", "CtidCallback"),
    ("ctid-outbound", "CTID_DIAL_NUMBER", "CtidOutbound"),
])
def test_callback_and_click_to_dial_dial_the_number_out_of_the_trunk(context: str, variable: str, event: str) -> None:
    dp = load_dialplan()
    result = walk(dp, context, "s", [], [], variables={"CTID_CALL_ID": "c1", variable: "+15557654321",
                                                          "DIALSTATUS": "BUSY"})
    assert result.ran("Dial") == ["PJSIP/+15557654321@trunk,45,gT"]
    assert result.ran("UserEvent") == [f"{event},CallID: c1,DialStatus: BUSY"]
    assert result.end == "Hangup"
    assert not [a for a in result.ran("Set") if a.startswith("CALLERID")], "no caller id set by default"
    cid = walk(dp, context, "s", [], [], variables={"CTID_CALL_ID": "c1", variable: "442071234567",
                                                     "CTID_OUTBOUND_CID": "+442070000000", "DIALSTATUS": "ANSWER"})
    assert "CALLERID(num)=+442070000000" in cid.ran("Set")
    assert cid.ran("Dial") == ["PJSIP/442071234567@trunk,45,gT"]


@pytest.mark.parametrize("context", ["ctid-callback", "ctid-outbound"])
@pytest.mark.parametrize("number", ["", "+", "123&PJSIP/1002", "123,30,L(1)", "123@othertrunk", "12 34", "1-800"])
def test_callback_and_click_to_dial_refuse_anything_but_digits_and_plus(context: str, number: str) -> None:
    variable = "CTID_CALLBACK_NUMBER" if context == "ctid-callback" else "CTID_DIAL_NUMBER"
    result = walk(load_dialplan(), context, "s", [], [], variables={"CTID_CALL_ID": "c1", variable: number})
    assert result.ran("Dial") == [], result.apps
    assert [e.split(",")[-1] for e in result.ran("UserEvent")] == ["DialStatus: INVALIDARGS"]
    assert result.end == "Hangup"


def test_literal_dial_options_are_ones_the_simulator_implements() -> None:
    from ctid.simulator.pbx import DIAL_OPTIONS

    dp = load_dialplan()
    for context, exts in dp.contexts.items():
        for exten, plist in exts.items():
            for p in plist:
                if p.app != "Dial":
                    continue
                options = [*p.args.split(","), "", ""][2]
                assert set(options.replace("${CTID_DIAL_OPTS}", "")) <= DIAL_OPTIONS, (context, exten, p.args)


def test_features_conf_has_the_transfer_codes_ctid_uses() -> None:
    from ctid.simulator import load_features_conf

    featuremap = read_conf(CONF_DIR / "features.conf").one("featuremap")
    assert featuremap.get("atxfer") == "*2", "AMI Atxfer fails without an atxfer code (06c)"
    assert featuremap.get("blindxfer") == "#1"
    assert load_features_conf(CONF_DIR / "features.conf").atxfer == "*2"
    readme = (CONF_DIR / "README.md").read_text(encoding="utf-8")
    assert "`features.conf`" in readme and "atxfer => *2" in readme


def test_agent_hints_cover_the_fallback_queue_members() -> None:
    dp = load_dialplan()
    members = fallback_members()
    hinted = set(dp.hints.get("from-agents", {}).values())
    assert members and members <= hinted, members - hinted


# --------------------------------------------------------------------------- asterisk config

def test_manager_conf_has_one_loopback_user_with_channelvars_in_general() -> None:
    conf = read_conf(CONF_DIR / "manager.conf")
    general = conf.one("general")
    assert general.get("enabled") == "yes"
    assert general.get("port") == "5038"
    assert ipaddress.ip_address(general.get("bindaddr") or "").is_loopback
    assert general.get("timestampevents") == "no"
    channelvars = (general.get("channelvars") or "").split(",")
    from ctid.calls import CHANNELVARS

    assert tuple(channelvars) == CHANNELVARS  # what the call model reads, CTID_CALL_ID first

    users = [s for s in conf.sections if s.name != "general"]
    assert [u.name for u in users] == ["ctid"]
    user = users[0]
    # Per user, channelvars is ignored without a warning.
    assert user.get("channelvars") is None
    assert user.get("secret")
    assert user.getall("deny") == ["0.0.0.0/0.0.0.0"]
    assert user.getall("permit") == ["127.0.0.1/255.255.255.255"]
    assert ("#tryinclude", "manager-site.conf") in conf.includes


def test_manager_read_classes_leave_out_dtmf_and_the_noisy_classes() -> None:
    user = read_conf(CONF_DIR / "manager.conf").one("ctid")
    read = set((user.get("read") or "").split(","))
    write = set((user.get("write") or "").split(","))
    assert read and write
    assert read <= AMI_CLASSES and write <= AMI_CLASSES, (read | write) - AMI_CLASSES
    # dtmf leaks PINs; dialplan/cel/cdr are most of the traffic and ctid does not use them.
    assert not read & {"dtmf", "all", "dialplan", "cel", "cdr"}, read
    assert {"system", "call", "agent", "user"} <= read
    assert {"call", "originate", "agent"} <= write and "all" not in write


def test_queues_conf_fallback_queue_never_rings_a_busy_agent() -> None:
    queue = read_conf(CONF_DIR / "queues.conf").one("ctid-fallback")
    assert queue.get("ringinuse") == "no"
    assert queue.get("strategy") == "rrmemory"


def fallback_members() -> set[str]:
    queue = read_conf(CONF_DIR / "queues.conf").one("ctid-fallback")
    return {m.split(",")[0].strip() for m in queue.getall("member")}


def test_pjsip_trunk_lands_in_ctid_inbound_and_members_are_agent_endpoints() -> None:
    conf = read_conf(CONF_DIR / "pjsip.conf")
    endpoints: dict[str, dict[str, str]] = {}
    for section in conf.sections:
        if section.is_template:
            continue
        options = dict(resolved_options(conf, section))
        if options.get("type") == "endpoint":
            endpoints[section.name] = options
    assert endpoints["trunk"]["context"] == "ctid-inbound"
    for agent in ("1001", "1002", "1003", "1004"):
        assert endpoints[agent]["context"] == "from-agents"
    members = fallback_members()
    assert members == {f"PJSIP/{n}" for n in ("1001", "1002", "1003", "1004")}
    assert {m.removeprefix("PJSIP/") for m in members} <= set(endpoints)
    transports = [dict(s.options) for s in conf.sections if dict(s.options).get("type")
                  == "transport"]
    assert [t["bind"] for t in transports] == ["0.0.0.0:5060"]


def test_musiconhold_default_class_plays_files() -> None:
    moh = read_conf(CONF_DIR / "musiconhold.conf").one("default")
    assert moh.get("mode") == "files" and moh.get("directory")


# --------------------------------------------------------------------------- compose

def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def compose_schema() -> dict[str, Any]:
    ref = (importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
           / "compose-spec.json")
    schema = json.loads(ref.read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


def test_compose_file_matches_the_compose_spec_schema() -> None:
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(load_compose()), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_services_and_depends_on_exist() -> None:
    services = load_compose()["services"]
    assert {"asterisk", "mosquitto", "postgres", "ctid"} <= set(services)
    for name, service in services.items():
        deps = service.get("depends_on", {})
        for dep in deps:
            assert dep in services, f"{name} depends on unknown service {dep!r}"
    ctid_deps = services["ctid"]["depends_on"]
    assert ctid_deps["postgres"]["condition"] == "service_healthy"
    assert {"mosquitto", "asterisk"} <= set(ctid_deps)
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, source, target) for every volume entry, short or long syntax."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append((entry["type"], entry.get("source", ""), entry["target"]))
            continue
        source, _, rest = entry.partition(":")
        target = rest.split(":")[0]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append((kind, source, target))
    return out


def test_compose_mounts_exist_and_named_volumes_are_declared() -> None:
    compose = load_compose()
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, service in compose["services"].items():
        for kind, source, _target in mounts(service):
            if kind == "bind":
                assert not source.startswith("/"), f"{name}: absolute mount {source}"
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            elif kind == "volume":
                assert source in declared, f"{name}: volume {source!r} is not declared"
                used.add(source)
        for config in service.get("configs", []):
            source = config["source"] if isinstance(config, dict) else config
            assert source in (compose.get("configs") or {}), f"{name}: no config {source!r}"
    assert "pgdata" in used


def test_compose_asterisk_gets_the_shipped_configs_and_the_dialplan() -> None:
    service = load_compose()["services"]["asterisk"]
    assert service["image"] == "andrius/asterisk:22"
    by_target = {t: s for _, s, t in mounts(service)}
    assert by_target["/etc/asterisk/ctid.conf"] == "./dialplans/ctid.conf"
    for name in ("extensions.conf", "manager.conf", "pjsip.conf", "queues.conf",
                 "musiconhold.conf", "features.conf"):
        assert by_target[f"/etc/asterisk/{name}"] == f"./asterisk-conf/{name}"
    assert all(str(v).endswith(":ro") for v in service["volumes"]), "mount read only"


def published(service: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(host_ip, host_port, container_port, protocol) for every published port."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            out.append((str(entry.get("host_ip", "")), str(entry.get("published", "")),
                        str(entry["target"]), entry.get("protocol", "tcp")))
            continue
        spec, _, proto = str(entry).partition("/")
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            host_ip, host_port, container = parts
        elif len(parts) == 2:
            host_ip, (host_port, container) = "", parts
        else:
            host_ip, host_port, container = "", "", parts[0]
        out.append((host_ip, host_port, container, proto or "tcp"))
    return out


def test_compose_published_ports_are_as_documented() -> None:
    services = load_compose()["services"]
    assert published(services["ctid"]) == [("127.0.0.1", "8080", "8080", "tcp")]
    assert published(services["mosquitto"]) == [("127.0.0.1", "1883", "1883", "tcp")]
    assert published(services["postgres"]) == []
    asterisk = published(services["asterisk"])
    assert ("", "5060", "5060", "udp") in asterisk
    # AMI and FastAGI never leave the compose network.
    for name, service in services.items():
        for _, host_port, container, _ in published(service):
            assert container not in ("5038", "4573"), f"{name} publishes {container}"
            assert host_port not in ("5038", "4573"), f"{name} publishes {host_port}"


def test_compose_rtp_range_matches_the_inline_rtp_conf() -> None:
    compose = load_compose()
    rtp = parse_conf(compose["configs"]["asterisk-rtp"]["content"]).one("general")
    expected = f"{rtp.get('rtpstart')}-{rtp.get('rtpend')}"
    udp = [p for p in published(compose["services"]["asterisk"]) if p[3] == "udp"]
    assert ("", expected, expected, "udp") in udp


def test_compose_build_context_has_the_dockerfile() -> None:
    build = load_compose()["services"]["ctid"]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    path = ROOT / context / dockerfile
    assert path.is_file(), path
    text = path.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    cmd = re.search(r"^CMD (\[.*\])\s*$", text, re.M)
    assert cmd and json.loads(cmd.group(1)) == ["ctid", "run", "-c", "/etc/ctid/ctid.toml"]


def test_compose_ctid_config_is_mounted_and_agrees_with_asterisk() -> None:
    compose = load_compose()
    services = compose["services"]
    ctid = services["ctid"]
    assert ("bind", "./deploy/ctid.toml", "/etc/ctid/ctid.toml") in mounts(ctid)
    env = ctid["environment"]
    assert {"CTID_AMI_SECRET", "CTID_DB_URL"} <= set(env)
    assert "@postgres:5432/ctid" in env["CTID_DB_URL"]
    assert "${POSTGRES_PASSWORD" in env["CTID_DB_URL"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD")

    toml = tomllib.loads(CTID_TOML.read_text(encoding="utf-8"))
    assert toml["agi"]["bind"] == "0.0.0.0", "Asterisk connects from another container"
    assert toml["http"]["bind"] == "0.0.0.0"
    assert published(ctid)[0][2] == str(toml["http"]["port"])
    assert toml["mqtt"]["host"] == "mosquitto" and toml["mqtt"]["host"] in services
    (link,) = toml["asterisk"]
    manager = read_conf(CONF_DIR / "manager.conf")
    assert link["host"] == "asterisk" and link["host"] in services
    assert str(link["port"]) == manager.one("general").get("port")
    assert [s.name for s in manager.sections if s.name != "general"] == [link["username"]]

    # The compose-only Asterisk overrides: AGI URL, AMI reachability and secret.
    site = parse_conf(compose["configs"]["asterisk-ctid-site"]["content"], fragment=True).one("globals")
    assert site.get("CTID_AGI_URL") == f"agi://ctid:{toml['agi']['port']}"
    ami = parse_conf(compose["configs"]["asterisk-manager-site"]["content"], fragment=True)
    assert ami.one("general").get("bindaddr") == "0.0.0.0"
    user = ami.one(link["username"])
    assert user.get("secret") == "${CTID_AMI_SECRET:-change-me}" == env["CTID_AMI_SECRET"]
    (subnet,) = [c["subnet"] for c in compose["networks"]["default"]["ipam"]["config"]]
    permit = ipaddress.ip_network(user.get("permit") or "")
    assert permit == ipaddress.ip_network(subnet), (permit, subnet)
    # Each override lands where the shipped file #tryincludes it.
    targets = {c["source"]: c["target"] for c in services["asterisk"]["configs"]}
    ext_includes = read_conf(CONF_DIR / "extensions.conf").includes
    assert ("#tryinclude", Path(targets["asterisk-ctid-site"]).name) in ext_includes
    assert ("#tryinclude", Path(targets["asterisk-manager-site"]).name) in manager.includes


def test_compose_ctid_toml_is_a_valid_ctid_config() -> None:
    # Imported here so that a broken config module fails this test, not the whole file.
    from ctid.config import load

    config = load(CTID_TOML, env={})
    assert config.database.url.startswith("postgresql+asyncpg://")
    assert config.line_for_dnis("+442071234567") is not None


def test_mosquitto_conf_is_explicit_about_listener_and_anonymous_access() -> None:
    text = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert "listener 1883 0.0.0.0" in lines
    assert any(ln.startswith("allow_anonymous ") for ln in lines)


def test_deploy_files_hold_no_absolute_work_paths() -> None:
    files = [COMPOSE_FILE, ROOT / "Dockerfile", CTID_TOML, DIALPLAN,
             ROOT / "deploy" / "mosquitto" / "mosquitto.conf", *sorted(CONF_DIR.iterdir())]
    machine_root = "/" + "work" + "/"  # this machine's work tree; spelled so this file does not hold it
    for path in files:
        assert machine_root not in path.read_text(encoding="utf-8"), path


def test_a_hostile_dnis_cannot_add_agi_query_arguments_or_arguments() -> None:
    result = walk(load_dialplan(), "ctid-inbound", "200&call_id=x,evil?y", agistatus="FAILURE")
    agi = [args for app, args in result.apps if app == "AGI"]
    assert agi == ["agi://127.0.0.1:4573/inbound?dnis=200"]
