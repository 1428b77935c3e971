"""The event contract: schema files, examples, docs/events.md and the code agree."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

import pytest
from jsonschema import Draft202012Validator

from ctid.calls.model import Direction, HangupBy
from ctid.calls.states import CallState
from ctid.events import contract
from ctid.events.contract import SCHEMA_DIR, ContractError, Problem, load_schemas, validate, validate_json
from ctid.events.schema import AGENT_STATES, EVENT_TYPES, RECORDING_STATES, Event

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = SCHEMA_DIR / "examples"
EVENTS_MD = ROOT / "docs" / "events.md"
ID_BASE = "https://ctid.invalid/schema/events/v1/"
TYPES = sorted(EVENT_TYPES)
SHARED = {"envelope", "definitions"}


def example(event_type: str) -> dict[str, Any]:
    obj = json.loads((EXAMPLES_DIR / f"{event_type}.json").read_text(encoding="utf-8"))
    assert isinstance(obj, dict)
    return obj


def nodes(schema: object) -> Iterator[dict[str, Any]]:
    """Every subschema (every dict) of a schema document."""
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from nodes(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from nodes(value)


def defs(name: str) -> dict[str, Any]:
    definitions: dict[str, Any] = load_schemas()["definitions"]["$defs"][name]
    return definitions


# ----------------------------------------------------------------- the files


def test_every_event_type_has_a_schema_and_an_example() -> None:
    schemas = load_schemas()
    assert set(schemas) - SHARED == EVENT_TYPES
    assert {p.name.removesuffix(".json") for p in EXAMPLES_DIR.glob("*.json")} == EVENT_TYPES
    assert set(schemas["envelope"]["properties"]["type"]["enum"]) == EVENT_TYPES
    routed = {cond["if"]["properties"]["type"]["const"]: cond["then"]["properties"]["data"]["$ref"]
              for cond in schemas["envelope"]["allOf"]}
    assert routed == {t: f"{t}.json" for t in EVENT_TYPES}


@pytest.mark.parametrize("name", sorted(SHARED | EVENT_TYPES))
def test_schema_file_is_a_valid_2020_12_schema_with_its_id(name: str) -> None:
    schema = load_schemas()[name]
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"{ID_BASE}{name}.json"


def test_every_ref_resolves_to_a_local_file() -> None:
    schemas = load_schemas()
    ids = {schema["$id"]: schema for schema in schemas.values()}
    for schema in schemas.values():
        for node in nodes(schema):
            ref = node.get("$ref")
            if not isinstance(ref, str):
                continue
            target, fragment = urldefrag(urljoin(schema["$id"], ref))
            assert target in ids, f"{schema['$id']}: $ref {ref} is not one of the local files"
            if fragment:
                resolved: Any = ids[target]
                for part in fragment.strip("/").split("/"):
                    resolved = resolved[part]
                assert isinstance(resolved, dict), ref


def test_documented_objects_are_open_and_their_required_fields_are_documented() -> None:
    # Forward compatibility says "ignore unknown fields"; strict mode relies on the
    # explicit "additionalProperties": true to know which objects are documented.
    for name, schema in load_schemas().items():
        for node in nodes(schema):
            if "properties" in node and "type" in node:
                assert node.get("additionalProperties") is True, f"{name}: {sorted(node['properties'])}"
                assert set(node.get("required", [])) <= set(node["properties"]), name


@pytest.mark.parametrize("event_type", [t for t in TYPES if t.startswith("call.")])
def test_every_call_event_carries_the_common_call_fields(event_type: str) -> None:
    schema = load_schemas()[event_type]
    assert {"direction", "state", "caller", "dnis", "service_line"} <= set(schema["required"])


def test_enumerations_match_the_code() -> None:
    assert defs("agent_state")["enum"] == list(AGENT_STATES)
    assert set(defs("direction")["enum"]) == {d.value for d in Direction}
    assert set(defs("hangup_by")["enum"]) == {h.value for h in HangupBy}
    assert set(defs("call_state")["enum"]) == {s.value for s in CallState}
    assert load_schemas()["call.recording"]["properties"]["state"]["enum"] == list(RECORDING_STATES)


# ------------------------------------------------------------- the examples


@pytest.mark.parametrize("event_type", TYPES)
def test_example_validates_strictly(event_type: str) -> None:
    obj = example(event_type)
    assert obj["type"] == event_type
    validate(obj)
    validate(obj, strict=True)


@pytest.mark.parametrize("event_type", TYPES)
def test_example_is_in_the_wire_format_of_event(event_type: str) -> None:
    obj = example(event_type)
    assert Event.from_envelope(obj).envelope() == obj
    assert list(obj) == list(Event.from_envelope(obj).envelope())


def markdown_examples(text: str) -> dict[str, list[Any]]:
    """The ```json blocks under each ``### <type>`` heading of docs/events.md."""
    out: dict[str, list[Any]] = {}
    sections = re.split(r"^#{2,4}\s+(.+?)\s*$", text, flags=re.M)
    for title, body in zip(sections[1::2], sections[2::2], strict=True):
        name = title.strip("` ")
        if name in EVENT_TYPES:
            blocks = re.findall(r"^```json\n(.*?)^```$", body, flags=re.M | re.S)
            out.setdefault(name, []).extend(json.loads(block) for block in blocks)
    return out


def test_docs_show_exactly_the_example_files() -> None:
    found = markdown_examples(EVENTS_MD.read_text(encoding="utf-8"))
    assert set(found) == EVENT_TYPES, sorted(EVENT_TYPES - set(found))
    for event_type in TYPES:
        assert found[event_type] == [example(event_type)], f"docs/events.md example of {event_type} differs"


def test_docs_state_the_delivery_rules() -> None:
    text = EVENTS_MD.read_text(encoding="utf-8")
    for phrase in ("at least once", "dedupe by `id`", "exactly one `call.ended`", "/api/v1/events?after_seq=",
                   "{prefix}/v1/{tenant}/calls/{call_id}", "{prefix}/v1/{tenant}/agents/{agent_id}/events",
                   "{prefix}/v1/{tenant}/agents/{agent_id}/state", "{prefix}/v1/{tenant}/queues/{queue}/stats",
                   "{prefix}/v1/status/{instance}", "QoS 1"):
        assert phrase.lower() in text.lower(), phrase


# ---------------------------------------------------------- broken examples

Mutation = Callable[[dict[str, Any]], None]


def setter(*path: str | int, value: Any) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        node: Any = obj
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return mutate


def deleter(*path: str | int) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        node: Any = obj
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
    return mutate


BROKEN: list[tuple[str, str, Mutation, str]] = [
    # (id, example, mutation, expected JSON path)
    ("v2", "call.offered", setter("v", value=2), "$.v"),
    ("no-seq", "call.started", deleter("seq"), "$.seq"),
    ("seq-0", "call.started", setter("seq", value=0), "$.seq"),
    ("seq-string", "call.started", setter("seq", value="12"), "$.seq"),
    ("bad-uuid", "call.started", setter("id", value="not-a-uuid"), "$.id"),
    ("upper-uuid", "call.started", setter("id", value="0C6B3F7E-1D2A-4E5F-9A8B-7C6D5E4F3A21"), "$.id"),
    ("ts-no-millis", "call.started", setter("ts", value="2026-12-01T09:30:00Z"), "$.ts"),
    ("ts-offset", "call.started", setter("ts", value="2026-12-01T09:30:00.120+00:00"), "$.ts"),
    ("ts-space", "call.started", setter("ts", value="2026-12-01 09:30:00.120Z"), "$.ts"),
    ("ts-month-13", "call.started", setter("ts", value="2026-13-01T09:30:00.120Z"), "$.ts"),
    ("data-ts", "call.started", setter("data", "created_at", value="yesterday"), "$.data.created_at"),
    ("unknown-type", "call.started", setter("type", value="call.exploded"), "$.type"),
    ("tenant-space", "call.started", setter("tenant", value="acme corp"), "$.tenant"),
    ("call-id-slash", "call.started", setter("call_id", value="abc/def"), "$.call_id"),
    ("call-id-wildcard", "call.started", setter("call_id", value="abc+"), "$.call_id"),
    ("call-id-65", "call.started", setter("call_id", value="a" * 65), "$.call_id"),
    ("queue-hash", "queue.stats", setter("queue", value="#"), "$.queue"),
    ("agent-id-empty", "agent.state", setter("agent_id", value=""), "$.agent_id"),
    ("call-without-call-id", "call.ended", setter("call_id", value=None), "$.call_id"),
    ("pop-without-agent", "call.offered", setter("agent_id", value=None), "$.agent_id"),
    ("stats-with-call", "queue.stats", setter("call_id", value="5b1f0e8c2a7d4c19b3e6f04a9d2c7e81"), "$.call_id"),
    ("data-not-object", "call.started", setter("data", value=[]), "$.data"),
    ("missing-caller", "call.offered", deleter("data", "caller"), "$.data.caller"),
    ("missing-e164", "call.offered", deleter("data", "caller", "e164"), "$.data.caller.e164"),
    ("missing-crm-error", "call.offered", deleter("data", "crm_error"), "$.data.crm_error"),
    ("missing-policy", "call.offered", deleter("data", "recording", "policy"), "$.data.recording.policy"),
    ("missing-hangup-by", "call.ended", deleter("data", "hangup_by"), "$.data.hangup_by"),
    ("missing-logged-in", "queue.stats", deleter("data", "agents", "logged_in"), "$.data.agents.logged_in"),
    ("bad-direction", "call.started", setter("data", "direction", value="sideways"), "$.data.direction"),
    ("bad-call-state", "call.queued", setter("data", "state", value="waiting"), "$.data.state"),
    ("offered-not-offered", "call.offered", setter("data", "state", value="queued"), "$.data.state"),
    ("bad-agent-state", "agent.state", setter("data", "state", value="lunch"), "$.data.state"),
    ("bad-policy", "call.offered", setter("data", "recording", "policy", value="sometimes"),
     "$.data.recording.policy"),
    ("bad-hangup-by", "call.ended", setter("data", "hangup_by", value="nobody"), "$.data.hangup_by"),
    ("bad-recording-state", "call.recording", setter("data", "state", value="connected"), "$.data.state"),
    ("bad-where", "call.abandoned", setter("data", "where", value="lobby"), "$.data.where"),
    ("priority-10", "call.offered", setter("data", "priority", value=10), "$.data.priority"),
    ("negative-wait", "call.offered", setter("data", "wait_s", value=-1), "$.data.wait_s"),
    ("bad-e164", "call.started", setter("data", "caller", "e164", value="0612345678"), "$.data.caller.e164"),
    ("cause-string", "call.ended", setter("data", "hangup_cause", value="16"), "$.data.hangup_cause"),
    ("abandoned-with-talk", "call.ended", setter("data", "abandoned", value=True), "$.data.talk_s"),
    ("paused-without-reason", "agent.state", setter("data", "state", value="paused"), "$.data.reason"),
    ("sensitive-unmasked", "call.ivr", setter("data", "sensitive", value=True), "$.data.value"),
    ("exit-without-reason", "call.ivr", setter("data", "event", value="exit"), "$.data.exit_reason"),
    ("input-with-exit-reason", "call.ivr", setter("data", "exit_reason", value="queued"), "$.data.exit_reason"),
    ("queue-transfer-bad-target", "call.transferred", setter("data", "target", value="bil ling"), "$.data.target"),
    ("survey-score-6", "call.survey", setter("data", "scores", "resolved", value=6), '$.data.scores.resolved'),
    ("ivr-var-object", "call.offered", setter("data", "ivr", "account", value={"n": 1}), "$.data.ivr.account"),
    ("sl-over-1", "queue.stats", setter("data", "sl_today", "value", value=80.7), "$.data.sl_today.value"),
]


@pytest.mark.parametrize(("event_type", "mutate", "path"), [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_broken_example_fails_with_the_path_of_the_problem(event_type: str, mutate: Mutation, path: str) -> None:
    obj = copy.deepcopy(example(event_type))
    mutate(obj)
    with pytest.raises(ContractError) as info:
        validate(obj)
    error = info.value
    assert isinstance(error, ValueError)
    assert {p.path for p in error.problems} == {path}, error.problems
    assert error.path == path
    assert path in str(error)


def test_missing_field_is_named_in_the_message() -> None:
    obj = example("call.answered")
    del obj["data"]["answered_at"], obj["data"]["wait_s"]
    with pytest.raises(ContractError) as info:
        validate(obj)
    assert info.value.problems == (Problem("$.data.answered_at", "required field is missing"),
                                   Problem("$.data.wait_s", "required field is missing"))
    assert "(and 1 more problem)" in str(info.value)


def test_messages_use_json_spellings() -> None:
    obj = example("call.offered")
    obj["agent_id"] = None
    obj["v"] = 2
    with pytest.raises(ContractError) as info:
        validate(obj)
    assert [str(p) for p in info.value.problems] == ["$.agent_id: expected string, got null",
                                                     "$.v: expected 1, got 2"]


def test_odd_keys_are_quoted_in_the_path() -> None:
    obj = example("call.offered")
    obj["data"]["ivr"]["account.type"] = ["a", "list"]
    with pytest.raises(ContractError) as info:
        validate(obj)
    assert info.value.path == '$.data.ivr["account.type"]'


def test_sensitive_input_masked_is_valid() -> None:
    obj = example("call.ivr")
    obj["data"].update(sensitive=True, value="***", variable="pin")
    validate(obj, strict=True)


# ------------------------------------------------------ forward compatibility


def test_unknown_fields_are_allowed_but_rejected_in_strict_mode() -> None:
    obj = example("call.offered")
    obj["data"]["new_field"] = 1
    obj["data"]["caller"]["presentation"] = "allowed"
    obj["instance"] = "ctid-1"
    validate(obj)
    with pytest.raises(ContractError) as info:
        validate(obj, strict=True)
    assert [p.path for p in info.value.problems] == ["$.data.caller.presentation", "$.data.new_field",
                                                     "$.instance"]
    assert "not documented" in info.value.message


def test_strict_mode_keeps_open_maps_open() -> None:
    obj = example("call.offered")
    obj["data"]["ivr"]["any_variable"] = "x"
    obj["data"]["crm"]["any_crm_field"] = {"nested": [1, 2]}
    validate(obj, strict=True)


# ------------------------------------------------------------ built events


def built_event() -> Event:
    data = {"direction": "inbound", "state": "ringing",
            "caller": {"number": "4155550123", "name": None, "e164": "+14155550123"},
            "dnis": "+18005550100", "service_line": "acme-support", "channel": "PJSIP/trunk-00000001",
            "uniqueid": "1796117400.1", "created_at": "2026-12-01T09:30:00.118Z"}
    return Event(type="call.started", tenant="acme", ts=datetime(2026, 12, 1, 9, 30, 0, 118_765, tzinfo=UTC),
                 data=data, call_id="5b1f0e8c2a7d4c19b3e6f04a9d2c7e81")


def test_built_event_to_json_validates() -> None:
    text = built_event().with_seq(7).to_json()
    envelope = validate_json(text, strict=True)
    assert envelope["seq"] == 7
    assert envelope["ts"] == "2026-12-01T09:30:00.118Z"
    validate_json(text.encode())


def test_event_without_a_seq_from_the_bus_is_rejected() -> None:
    with pytest.raises(ContractError) as info:
        validate(built_event().envelope())
    assert info.value.path == "$.seq"


@pytest.mark.parametrize("payload", ["{", "[1, 2]", "null"])
def test_validate_json_rejects_what_is_not_an_envelope(payload: str) -> None:
    with pytest.raises(ContractError) as info:
        validate_json(payload)
    assert info.value.path == "$"


def test_validate_rejects_a_non_object() -> None:
    with pytest.raises(ContractError):
        validate([])  # type: ignore[arg-type]


# ----------------------------------------------------------- the module


def test_schema_dir_is_the_repositorys_docs_schema() -> None:
    assert SCHEMA_DIR == ROOT / "docs" / "schema"


def test_load_schemas_reports_a_broken_directory(tmp_path: Path) -> None:
    with pytest.raises(contract.SchemaFileError):
        load_schemas(tmp_path)
    (tmp_path / "envelope.json").write_text("{not json")
    with pytest.raises(contract.SchemaFileError, match=r"envelope\.json"):
        load_schemas(tmp_path)
    (tmp_path / "envelope.json").write_text('{"type": "object"}')
    with pytest.raises(contract.SchemaFileError, match=r"\$id"):
        load_schemas(tmp_path)


def test_importing_the_contract_does_not_import_jsonschema() -> None:
    code = ("import sys, ctid.events.contract, ctid.events.schema; "
            "assert 'jsonschema' not in sys.modules, 'jsonschema imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
