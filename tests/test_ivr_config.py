"""IVR flow validation through ``ctid check-config``: every error names the flow and the
node, and all of them come out in one pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ctid.config import ConfigError, parse
from tests.test_config import ROOT

BASE = """
[[tenants]]
id = "acme"

[[tenants]]
id = "other"

[[agents]]
id = "1001"
tenant = "acme"
skills = { "lang:en" = 5 }

[[queues]]
id = "support"
tenant = "acme"

[[queues]]
id = "elsewhere"
tenant = "other"

[[service_lines]]
id = "line"
tenant = "acme"
dnis = ["300"]
flow = "main"
"""

GOOD = """
[flows.main]
tenant = "acme"
start = "menu"

[flows.main.nodes.menu]
type = "menu"
prompts = ["main-menu"]
choices = { "1" = "agent", "2" = "bye" }
on_fail = "bye"

[flows.main.nodes.agent]
type = "queue"
queue = "support"

[flows.main.nodes.bye]
type = "hangup"
"""


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "ctid.toml"
    path.write_text(BASE + text, encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "ctid", "check-config", "-c", str(path)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.split(": ", 2)[2] for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("error: ")]


def test_a_good_flow_passes(tmp_path: Path) -> None:
    result = check(tmp_path, GOOD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 queue(s), 1 IVR flow(s)" in result.stdout


def test_graph_errors_name_the_flow_and_the_node_in_one_pass(tmp_path: Path) -> None:
    result = check(tmp_path, GOOD.replace('"2" = "bye"', '"2" = "billing"') + """
[flows.main.nodes.orphan]
type = "play"
prompts = ["x"]
next = "spin"

[flows.main.nodes.spin]
type = "goto"
next = "orphan"

[flows.other]
tenant = "acme"
start = "nowhere"
[flows.other.nodes.a]
type = "hangup"
""")
    assert result.returncode == 2
    found = errors(result)
    assert "flows.main.nodes.menu.choices.2: unknown node 'billing'" in found
    assert "flows.main.nodes.orphan: unreachable from start 'menu'" in found
    assert "flows.main.nodes.spin: unreachable from start 'menu'" in found
    assert any(e.startswith("flows.main.nodes.orphan: loop with no input (orphan -> spin -> orphan)") for e in found)
    assert "flows.other.start: unknown node 'nowhere'" in found


def test_a_loop_through_an_input_node_is_fine(tmp_path: Path) -> None:
    # menu -> again -> menu waits for the caller each time round: the loop guard covers it.
    result = check(tmp_path, GOOD.replace('"1" = "agent"', '"1" = "again"') + """
[flows.main.nodes.again]
type = "goto"
next = "menu"
""")
    assert [e for e in errors(result) if "loop" in e] == []
    assert "flows.main.nodes.agent: unreachable from start 'menu'" in errors(result)


@pytest.mark.parametrize(("extra", "expected"), [
    ('[flows.main.nodes.ask]\ntype = "input"\nprompts = ["x"]\nnext = "bye"\n',
     ["flows.main.nodes.ask.variable: Field required", "flows.main.nodes.ask.on_fail: Field required"]),
    ('[flows.main.nodes.h]\ntype = "hours"\nschedule = { mon = ["18:00-08:00"] }\nif_open = "bye"\n'
     'if_closed = "bye"\n',
     ["flows.main.nodes.h: bad schedule: mon: '18:00-08:00': the end must be after the start"]),
    ('[flows.main.nodes.h]\ntype = "hours"\nschedule = { mon = ["09:00-17:00"] }\nholidays = ["2026-02-30"]\n'
     'timezone = "Mars/Base"\nif_open = "bye"\nif_closed = "bye"\n',
     ["flows.main.nodes.h: bad schedule"]),
    ('[flows.main.nodes.c]\ntype = "goto"\nwhen = "tier == "\notherwise = "bye"\nnext = "bye"\n',
     ["flows.main.nodes.c.when: bad condition: at position"]),
    ('[flows.main.nodes.c]\ntype = "goto"\nwhen = "tier == 1"\nnext = "bye"\n',
     ["flows.main.nodes.c: 'when' needs 'otherwise'"]),
    ('[flows.main.nodes.q]\ntype = "queue"\nqueue = "elsewhere"\n',
     ["flows.main.nodes.q.queue: queue 'elsewhere' is in tenant 'other'"]),
    ('[flows.main.nodes.t]\ntype = "transfer"\nextension = "1001"\nnumber = "+15551234567"\n',
     ["flows.main.nodes.t: give exactly one of 'extension' or 'number'"]),
    ('[flows.main.nodes.p]\ntype = "play"\nprompts = ["../../etc/passwd"]\nnext = "bye"\n',
     ["flows.main.nodes.p.prompts[0]: '../../etc/passwd' is not a sound file name"]),
    ('[flows.main.nodes.m2]\ntype = "menu"\nprompts = ["x"]\nchoices = { "12" = "bye" }\non_fail = "bye"\n',
     ["flows.main.nodes.m2.choices: choice key '12' must be one of"]),
    ('[flows.main.nodes.x]\ntype = "dance"\n', ["flows.main.nodes.x: Input tag 'dance'"]),
])
def test_node_field_errors(tmp_path: Path, extra: str, expected: list[str]) -> None:
    result = check(tmp_path, GOOD + extra)
    assert result.returncode == 2
    found = errors(result)
    for want in expected:
        assert any(e.startswith(want) for e in found), (want, found)


def test_lines_and_queues_must_name_flows_of_their_tenant() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"tenants": [{"id": "acme"}, {"id": "other"}],
               "queues": [{"id": "support", "tenant": "acme", "survey_flow": "nope"}],
               "service_lines": [{"id": "l1", "tenant": "acme", "dnis": ["1"], "flow": "theirs"},
                                 {"id": "l2", "tenant": "acme", "dnis": ["2"], "flow": "theirs", "queue": "support"},
                                 {"id": "l3", "tenant": "acme", "dnis": ["3"], "fallback_queue": "ghost"}],
               "flows": {"theirs": {"tenant": "other", "start": "a", "nodes": {"a": {"type": "hangup"}}}}}, env={})
    found = {f"{p.key}: {p.reason}" for p in info.value.problems}
    assert "service_lines[0].flow: flow 'theirs' is in tenant 'other'" in found
    assert "queues[0].survey_flow: unknown flow 'nope'" in found
    assert "service_lines[2].fallback_queue: unknown queue 'ghost'" in found
    assert any("service_lines[1]" in p and "not both" in p for p in found)
