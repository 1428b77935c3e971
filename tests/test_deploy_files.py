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


def substitute(text: str, variables: dict[str, str]) -> str:
    # Innermost first; unknown variables and functions become empty, as in Asterisk.
    # FILTER(0-9+,value) is the one function the dialplan uses.
    pattern = re.compile(r"\$\{([^${}]*)\}")
    while (m := pattern.search(text)) is not None:
        expr = m.group(1)
        if expr.startswith("FILTER(0-9+,") and expr.endswith(")"):
            value = "".join(c for c in expr[len("FILTER(0-9+,"):-1] if c.isdigit() or c == "+")
        else:
            value = variables.get(expr, "")
        text = text[:m.start()] + value + text[m.end():]
    return text


def evaluate(expression: str) -> bool:
    """The only expression shape the dialplan may use: $["a" = "b"] or $["a" != "b"]."""
    m = re.fullmatch(r'\$\[\s*"([^"]*)"\s*(=|!=)\s*"([^"]*)"\s*\]', expression.strip())
    assert m, f"unsupported expression {expression!r}"
    return (m.group(1) == m.group(3)) == (m.group(2) == "=")


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
    end: str                      # the final application, or "end" if priorities ran out
    variables: dict[str, str]


def walk(dp: Dialplan, context: str, dialled: str, agistatus: str, route: str | None = None) -> Walk:
    """Run the dialplan for a call to ``dialled``; every AGI() returns ``agistatus``
    and, when ``route`` is given, sets CTID_ROUTE as ctid's inbound script does."""
    variables = dict(dp.globals)
    exten = find_exten(dp, context, dialled)
    index = 0
    variables["EXTEN"] = dialled
    apps: list[tuple[str, str]] = []
    for _ in range(200):
        plist = dp.contexts[context][exten]
        if index >= len(plist):
            return Walk(apps, "end", variables)
        step = plist[index]
        args = substitute(step.args, variables)
        apps.append((step.app, args))
        index += 1
        if step.app in ("Hangup", "Queue"):
            return Walk(apps, step.app, variables)
        if step.app == "AGI":
            variables["AGISTATUS"] = agistatus
            if route is not None:
                variables["CTID_ROUTE"] = route
        elif step.app == "Set":
            name, _, value = args.partition("=")
            variables[name.lstrip("_")] = value
        elif step.app in ("Goto", "GotoIf"):
            target = args
            if step.app == "GotoIf":
                condition, _, branches = step.args.partition("?")
                if_true, _, if_false = branches.partition(":")
                target = if_true if evaluate(substitute(condition, variables)) else if_false
                target = substitute(target, variables)
                if not target:
                    continue
            context, new_exten, prio = split_target(target, context)
            if new_exten is not None:
                exten = find_exten(dp, context, new_exten)
                variables["EXTEN"] = new_exten
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


def test_every_goto_and_include_target_exists() -> None:
    # asterisklint misses a missing include and some missing Goto targets.
    dp = load_dialplan()
    for context, target_list in dp.includes.items():
        for target in target_list:
            assert target in dp.contexts, f"[{context}] includes unknown context {target!r}"
    for context, exts in dp.contexts.items():
        for exten, plist in exts.items():
            for p in plist:
                if p.app == "Goto":
                    targets = [p.args]
                elif p.app == "GotoIf":
                    branches = p.args.partition("?")[2]
                    targets = [t for t in branches.split(":") if t]
                else:
                    continue
                for target in targets:
                    where = f"[{context}] {exten},{p.number} {p.app}({p.args})"
                    assert "$" not in target, f"{where}: dynamic target"
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
                 "musiconhold.conf"):
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
    for path in files:
        assert "/work/" not in path.read_text(encoding="utf-8"), path


def test_a_hostile_dnis_cannot_add_agi_query_arguments_or_arguments() -> None:
    result = walk(load_dialplan(), "ctid-inbound", "200&call_id=x,evil?y", agistatus="FAILURE")
    agi = [args for app, args in result.apps if app == "AGI"]
    assert agi == ["agi://127.0.0.1:4573/inbound?dnis=200"]
