"""Config validation and the check-config / version commands, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from ctid.config import Config, ConfigError, load, parse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "ctid.example.toml"


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctid", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)


def test_example_config_loads_and_equals_the_defaults() -> None:
    config = load(EXAMPLE, env={})
    assert config == parse({}, env={})


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        annotation = info.annotation
        inner = getattr(annotation, "__args__", None)
        for candidate in (annotation, *(inner or ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                names |= _field_names(candidate)
    return names


def test_every_option_is_documented_in_the_example() -> None:
    text = EXAMPLE.read_text()
    missing = [name for name in _field_names(Config) if name not in text]
    assert not missing, f"options missing from ctid.example.toml: {missing}"


def test_listeners_default_to_loopback() -> None:
    config = parse({}, env={})
    assert config.http.bind == "127.0.0.1"
    assert config.agi.bind == "127.0.0.1"
    assert not config.mqtt.enabled


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[instance]\nid = "bad id/with slash"\n'
        '[http]\nport = 70000\n'
        '[[tenants]]\nid = "acme"\ntimezone = "Mars/Olympus"\n'
        '[[asterisk]]\nid = "pbx1"\nhost = "pbx\\r\\nAction: Originate"\n'
    )
    with pytest.raises(ConfigError) as info:
        load(bad, env={})
    keys = {p.key for p in info.value.problems}
    assert {"instance.id", "http.port", "tenants[0].timezone", "asterisk[0].host"} <= keys
    assert all(p.file == str(bad) for p in info.value.problems)


def test_cross_references_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        parse({
            "tenants": [{"id": "acme"}],
            "service_lines": [
                {"id": "a", "tenant": "acme", "dnis": ["100"]},
                {"id": "b", "tenant": "nobody", "dnis": ["100"]},
            ],
        }, env={})
    reasons = " | ".join(str(p) for p in info.value.problems)
    assert "service_lines[1].tenant" in reasons and "unknown tenant 'nobody'" in reasons
    assert "service_lines[1].dnis" in reasons and "already used by line 'a'" in reasons


def test_unknown_option_is_an_error_not_ignored() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"agi": {"bnid": "0.0.0.0"}}, env={})
    assert info.value.problems[0].key == "agi.bnid"


def test_environment_overrides_secrets() -> None:
    data = {"asterisk": [{"id": "pbx1", "secret": "file"}, {"id": "pbx-2", "secret": "file"}]}
    config = parse(data, env={"CTID_AMI_SECRET": "s3cr3t-all", "CTID_AMI_SECRET_PBX_2": "two",
                              "CTID_DB_URL": "postgresql+asyncpg://u@h/db"})
    assert config.asterisk[0].secret.get_secret_value() == "s3cr3t-all"
    assert config.asterisk[1].secret.get_secret_value() == "two"
    assert config.database.url == "postgresql+asyncpg://u@h/db"
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str(config.model_dump())


def test_service_line_is_found_by_dnis() -> None:
    config = parse({"tenants": [{"id": "acme", "timezone": "Europe/London"}],
                    "service_lines": [{"id": "sup", "tenant": "acme", "dnis": ["+442071234567", "200"]}]},
                   env={})
    line = config.line_for_dnis("200")
    assert line is not None and line.id == "sup"
    assert config.line_for_dnis("201") is None
    assert config.tenant("acme").zone.key == "Europe/London"


def test_check_config_cli_lists_errors_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "ctid.toml"
    bad.write_text('[database]\nurl = "mysql://x"\n[agi]\nport = -1\n')
    result = _run_cli("check-config", "-c", str(bad))
    assert result.returncode == 2
    assert f"{bad}: database.url:" in result.stderr
    assert f"{bad}: agi.port:" in result.stderr
    assert "2 problem(s)" in result.stderr


def test_check_config_cli_reports_toml_syntax_errors(tmp_path: Path) -> None:
    bad = tmp_path / "ctid.toml"
    bad.write_text("[database\nurl=1\n")
    result = _run_cli("check-config", "-c", str(bad))
    assert result.returncode == 2 and "(syntax)" in result.stderr


def test_check_config_cli_accepts_the_example() -> None:
    result = _run_cli("check-config", "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_version_cli() -> None:
    from ctid import __version__

    result = _run_cli("version")
    assert result.returncode == 0 and result.stdout.strip() == f"ctid {__version__}"


def test_ids_with_a_trailing_newline_are_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"tenants": [{"id": "acme\n"}]}, env={})
    assert info.value.problems[0].key == "tenants[0].id"


def test_field_errors_and_cross_references_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"tenants": [{"id": "acme", "timezone": "Mars/Olympus"}],
               "service_lines": [{"id": "a", "tenant": "nobody", "dnis": ["100"]}]}, env={})
    keys = {p.key for p in info.value.problems}
    assert {"tenants[0].timezone", "service_lines[0].tenant"} <= keys


@pytest.mark.parametrize("ident", [".", "..", "..."])
def test_ids_made_only_of_dots_are_rejected(ident: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"tenants": [{"id": ident}]}, env={})
    assert info.value.problems[0].key == "tenants[0].id"


def test_secrets_with_line_breaks_are_config_errors_not_runtime_surprises() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"asterisk": [{"id": "pbx1", "secret": "x\r\nAction: Originate"}],
               "mqtt": {"host": "127.0.0.1", "username": "u\nv"}}, env={})
    keys = {p.key for p in info.value.problems}
    assert {"asterisk[0].secret", "mqtt.username"} <= keys
    assert "Originate" not in str(info.value)
    with pytest.raises(ConfigError):
        parse({}, env={"CTID_AMI_SECRET": "a\rb"})


def test_hash_secret_cli_makes_a_hash_that_signs_in() -> None:
    from ctid.api.auth import verify_secret

    result = subprocess.run([sys.executable, "-m", "ctid", "hash-secret"], input="4321\n", capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    digest = result.stdout.strip()
    assert digest.startswith("scrypt$") and "4321" not in digest
    assert verify_secret("4321", digest) and not verify_secret("1234", digest)


def test_a_pin_hash_that_is_not_from_hash_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"tenants": [{"id": "acme"}], "agents": [{"id": "1001", "tenant": "acme", "pin_hash": "1234"}]}, env={})
    assert info.value.problems[0].key == "agents[0].pin_hash"


# --------------------------------------------------------------------------- queues (ACD)


def _queue_config(*queues: dict[str, object], agents: list[dict[str, object]] | None = None,
                  lines: list[dict[str, object]] | None = None) -> dict[str, object]:
    return {"tenants": [{"id": "acme"}, {"id": "other"}], "queues": list(queues), "agents": agents or [],
            "service_lines": lines or []}


def _problems(data: dict[str, object]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse(data, env={})
    return {p.key: p.reason for p in info.value.problems}


def test_queue_options_all_have_defaults() -> None:
    config = parse(_queue_config({"id": "q", "tenant": "acme"}), env={})
    queue = config.queue("q")
    assert queue.requires == "*" and queue.policy == "longest-idle" and queue.priority == 5
    assert queue.max_wait_s is None and queue.max_queue_length is None and queue.overflow is None
    assert queue.sticky is None and queue.relax == [] and not queue.closed
    assert (queue.wrapup_s, queue.ring_timeout_s, queue.checkin_s) == (0.0, 15.0, 5.0)


def test_a_bad_skill_expression_is_a_config_error_with_its_position() -> None:
    problems = _problems(_queue_config({"id": "q", "tenant": "acme", "requires": "lang:zh>=11",
                                        "relax": [{"after": 30, "requires": "(lang:zh"}]}))
    assert "level 11 is outside 1..10 at position 9" in problems["queues[0].requires"]
    assert "at position 8" in problems["queues[0].relax[0].requires"]


def test_check_config_cli_reports_a_bad_expression_with_key_and_position(tmp_path: Path) -> None:
    bad = tmp_path / "ctid.toml"
    bad.write_text('[[tenants]]\nid = "acme"\n[[queues]]\nid = "q"\ntenant = "acme"\nrequires = "lang:zh >= 5 &"\n')
    result = _run_cli("check-config", "-c", str(bad))
    assert result.returncode == 2
    assert f"{bad}: queues[0].requires: bad skill expression: unexpected end" in result.stderr
    assert "at position 14 of" in result.stderr


def test_relaxation_steps_must_be_sorted_by_after() -> None:
    problems = _problems(_queue_config({"id": "q", "tenant": "acme", "relax": [
        {"after": 90, "requires": "a"}, {"after": 30, "requires": "b"}]}))
    assert "sorted by after" in problems["queues[0].relax"]
    parse(_queue_config({"id": "q", "tenant": "acme", "relax": [
        {"after": 0, "ewt_s": 60, "requires": "a"}, {"after": 0, "depth": 5, "requires": "b"},
        {"requires": "*", "after": 30}]}), env={})


def test_overflow_and_actions_must_name_a_queue_of_the_same_tenant() -> None:
    problems = _problems(_queue_config(
        {"id": "a", "tenant": "acme", "overflow": {"after_s": 60, "target": "queue:nowhere"}},
        {"id": "b", "tenant": "acme", "closed_action": "queue:c"},
        {"id": "c", "tenant": "other", "max_wait_s": 60, "max_wait_action": "queue:c"},
    ))
    assert problems["queues[0].overflow.target"] == "unknown queue 'nowhere'"
    assert problems["queues[1].closed_action"] == "queue 'c' is in tenant 'other'"
    assert problems["queues[2].max_wait_action"] == "a queue cannot send calls to itself"


def test_queues_that_send_calls_round_a_loop_are_an_error() -> None:
    problems = _problems(_queue_config(
        {"id": "a", "tenant": "acme", "overflow": {"after_s": 60, "target": "queue:b"}},
        {"id": "b", "tenant": "acme", "full_action": "queue:c", "max_queue_length": 5},
        {"id": "c", "tenant": "acme", "closed_action": "queue:a"},
        {"id": "d", "tenant": "acme", "overflow": {"ewt_s": 60, "target": "queue:a"}},
    ))
    assert problems == {"queues[0]": "calls would loop between queues a -> b -> c -> a"}
    parse(_queue_config(  # a chain without a loop is fine
        {"id": "a", "tenant": "acme", "overflow": {"after_s": 60, "target": "queue:b"}},
        {"id": "b", "tenant": "acme", "closed_action": "queue:c"},
        {"id": "c", "tenant": "acme", "overflow": {"after_s": 60, "target": "voicemail"}},
    ), env={})


@pytest.mark.parametrize(("overflow", "reason"), [
    ({"target": "voicemail"}, "after_s, ewt_s or both"),
    ({"after_s": 60, "target": "hangup"}, "voicemail or callback"),
    ({"after_s": 60, "target": "email"}, "must be queue:<id>"),
    ({"after_s": 60, "target": "queue:bad/id"}, "must be queue:<id>"),
])
def test_overflow_needs_a_trigger_and_a_known_kind_of_target(overflow: dict[str, object], reason: str) -> None:
    problems = _problems(_queue_config({"id": "q", "tenant": "acme", "overflow": overflow}))
    assert any(key.startswith("queues[0].overflow") and reason in text for key, text in problems.items()), problems


def test_skills_no_agent_of_the_tenant_has_are_errors() -> None:
    agents = [{"id": "1001", "tenant": "acme", "skills": {"lang:en": 5, "product:tv": 3}},
              {"id": "2001", "tenant": "other", "skills": {"lang:fr": 5}}]
    problems = _problems(_queue_config(
        {"id": "q", "tenant": "acme", "requires": "lang:en & !lang:fr",
         "relax": [{"after": 30, "requires": "lang:EN | billing:*"}], "weights": {"product:*": 2, "lang:de": 1}},
        agents=agents))
    assert problems == {
        "queues[0].requires": "no agent of tenant 'acme' has skill 'lang:fr'",
        "queues[0].relax[0].requires": "no agent of tenant 'acme' has skill 'billing:*', 'lang:EN'",
        "queues[0].weights": "no agent of tenant 'acme' has skill 'lang:de'",
    }
    parse(_queue_config({"id": "q", "tenant": "acme", "requires": "lang:en & product:*>=3"}, agents=agents), env={})


def test_skills_are_not_checked_for_a_tenant_without_agents_in_the_file() -> None:
    # Its agents are provisioned in the database, which check-config does not read.
    parse(_queue_config({"id": "q", "tenant": "other", "requires": "lang:zh>=5"},
                        agents=[{"id": "1001", "tenant": "acme", "skills": {"lang:en": 5}}]), env={})


def test_agent_skill_names_must_be_expressible() -> None:
    problems = _problems(_queue_config(agents=[{"id": "1001", "tenant": "acme", "skills": {"lang en": 5}}]))
    assert "lang en" in problems["agents[0].skills"]


@pytest.mark.parametrize(("option", "value"), [
    ("policy", "random"), ("priority", 10), ("vip_priority", -1), ("checkin_s", 11), ("checkin_s", 0),
    ("ring_timeout_s", 0), ("wrapup_s", -1), ("max_wait_s", 0), ("max_queue_length", 0),
    ("vip_numbers", ["02071234567"]), ("weights", {"lang:*:x": 1}), ("weights", {"lang:en": -1}),
    ("closed_action", "voicemail:1"), ("requires", ""),
])
def test_invalid_queue_options_are_reported_by_key(option: str, value: object) -> None:
    problems = _problems(_queue_config({"id": "q", "tenant": "acme", option: value}))
    assert any(key.startswith(f"queues[0].{option}") for key in problems), problems


def test_a_service_line_can_go_straight_to_a_queue_of_its_tenant() -> None:
    config = parse(_queue_config({"id": "q", "tenant": "acme"},
                                 lines=[{"id": "l", "tenant": "acme", "dnis": ["100"], "queue": "q"}]), env={})
    assert config.service_lines[0].queue == "q"
    problems = _problems(_queue_config({"id": "q", "tenant": "acme"}, lines=[
        {"id": "l1", "tenant": "acme", "dnis": ["100"], "queue": "nowhere"},
        {"id": "l2", "tenant": "other", "dnis": ["200"], "queue": "q"}]))
    assert problems["service_lines[0].queue"] == "unknown queue 'nowhere'"
    assert problems["service_lines[1].queue"] == "queue 'q' is in tenant 'acme'"


def test_queue_field_errors_and_references_are_reported_together() -> None:
    problems = _problems(_queue_config(
        {"id": "q", "tenant": "acme", "requires": "a >", "overflow": {"after_s": 5, "target": "queue:x"}}))
    assert {"queues[0].requires", "queues[0].overflow.target"} <= set(problems)


def test_the_example_queue_block_loads_when_uncommented() -> None:
    import tomllib

    text = EXAMPLE.read_text()
    block = text[text.index("# [[queues]]"):text.index("# API tokens")]
    lines = [line[2:] for line in block.splitlines() if line.startswith("# ") and not line.startswith("# #")]
    data = tomllib.loads("\n".join(lines))
    data["queues"].append({"id": "sales", "tenant": "default"})
    config = parse(data, env={})
    support = config.queue("support")
    assert [step.after for step in support.relax] == [0, 30, 90]
    assert support.sticky is not None and support.overflow is not None and support.overflow.target == "queue:sales"


def test_the_readme_acd_example_is_a_valid_config() -> None:
    import re
    import tomllib

    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Routing calls \(ACD\).*?```toml\n(.*?)```", text, re.S)
    assert block is not None, "README lost its ACD example"
    config = parse(tomllib.loads(block.group(1)), env={})
    assert config.line_for_dnis("+442071234567") is not None
    assert config.service_lines[0].queue == "support"
