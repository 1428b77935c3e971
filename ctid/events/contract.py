"""Check events against the published contract: the JSON-schema files in ``docs/schema/``.

The schema files are the contract CRM vendors code against (``docs/events.md``
explains it). This module loads them, resolves their ``$ref`` s among themselves
(a local :class:`referencing.Registry`: nothing is ever fetched from the network,
whatever the ``$id`` s look like), and validates an envelope with
:func:`validate`. Tests use it on every emitted event; the daemon may use it in
debug mode.

Two modes:

* the default follows the contract as consumers see it: unknown fields are
  allowed anywhere, so a newer ctid still validates against these files;
* ``strict=True`` also rejects fields the schema does not document, so a test
  catches an emitter that invents a field without documenting it. It flips every
  ``"additionalProperties": true`` of a documented object to ``false``; open
  maps (IVR variables, the CRM result, survey scores) stay open.

``jsonschema`` is imported lazily, inside the functions that need it, so the
runtime package does not depend on it unless validation is used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

if TYPE_CHECKING:
    from referencing import Registry

__all__ = [
    "SCHEMA_DIR",
    "ContractError",
    "Problem",
    "SchemaFileError",
    "load_schemas",
    "validate",
    "validate_json",
]

#: The schema files, found relative to the source tree (they are not package data).
SCHEMA_DIR: Final = Path(__file__).resolve().parents[2] / "docs" / "schema"
#: The name (file stem) of the envelope schema, the entry point of validation.
ENVELOPE: Final = "envelope"

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Problem:
    """One way an envelope breaks the contract: where (a JSON path such as
    ``$.data.caller.e164``) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ContractError(ValueError):
    """The envelope does not fit the contract. ``problems`` lists every problem found,
    sorted by path; ``path`` and ``message`` are those of the first one."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        if not problems:
            raise ValueError("a ContractError needs at least one problem")
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.path = self.problems[0].path
        self.message = self.problems[0].message
        more = len(self.problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(f"event does not fit the contract: {self.problems[0]}{suffix}")


class SchemaFileError(Exception):
    """The schema files themselves are missing or broken (a bug in ctid, not in an event)."""


class _ValidationError(Protocol):
    """The part of ``jsonschema.ValidationError`` used here."""

    @property
    def message(self) -> str: ...
    @property
    def validator(self) -> object: ...
    @property
    def validator_value(self) -> object: ...
    @property
    def instance(self) -> object: ...
    @property
    def schema(self) -> object: ...
    @property
    def absolute_path(self) -> Sequence[str | int]: ...


class _Validator(Protocol):
    def iter_errors(self, instance: Any) -> Iterable[_ValidationError]: ...


def load_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, dict[str, Any]]:
    """Every schema file of ``schema_dir`` by name (the file name without ``.json``:
    ``"envelope"``, ``"definitions"``, ``"call.offered"`` ...). Fresh objects on each call."""
    paths = sorted(schema_dir.glob("*.json"))
    if not paths:
        raise SchemaFileError(f"no schema files in {schema_dir}")
    schemas: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SchemaFileError(f"{path.name}: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("$id"), str):
            raise SchemaFileError(f"{path.name}: a schema file is a JSON object with an $id")
        schemas[path.name.removesuffix(".json")] = obj
    if ENVELOPE not in schemas:
        raise SchemaFileError(f"{schema_dir}: {ENVELOPE}.json is missing")
    return schemas


def validate(envelope: dict[str, Any], *, strict: bool = False) -> None:
    """Check one event envelope (the parsed JSON object) against the contract.

    Raises :class:`ContractError` naming the JSON path of each problem. With
    ``strict``, fields the schema does not document are problems too.
    """
    if not isinstance(envelope, dict):
        raise ContractError([Problem("$", "an event envelope is a JSON object")])
    problems: set[Problem] = set()
    for error in _validator(SCHEMA_DIR, strict).iter_errors(envelope):
        problems.update(_problems(error))
    if problems:
        raise ContractError(sorted(problems, key=lambda p: (p.path, p.message)))


def validate_json(payload: str | bytes, *, strict: bool = False) -> dict[str, Any]:
    """Parse an event as received (an MQTT payload, a websocket frame), validate it,
    and return the envelope."""
    try:
        obj = json.loads(payload)
    except ValueError as exc:
        raise ContractError([Problem("$", f"not JSON: {exc}")]) from None
    if not isinstance(obj, dict):
        raise ContractError([Problem("$", "an event envelope is a JSON object")])
    envelope = cast(dict[str, Any], obj)
    validate(envelope, strict=strict)
    return envelope


@lru_cache(maxsize=4)
def _validator(schema_dir: Path, strict: bool) -> _Validator:
    from jsonschema import Draft202012Validator  # type: ignore[import-untyped,unused-ignore]
    from jsonschema.exceptions import SchemaError  # type: ignore[import-untyped,unused-ignore]

    schemas = load_schemas(schema_dir)
    if strict:
        schemas = {name: cast(dict[str, Any], _closed(schema)) for name, schema in schemas.items()}
    for name, schema in schemas.items():
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise SchemaFileError(f"{name}.json is not a valid 2020-12 schema: {exc.message}") from None
    validator = Draft202012Validator(
        schemas[ENVELOPE],
        registry=_registry(schemas),
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )
    return cast(_Validator, validator)


def _registry(schemas: dict[str, dict[str, Any]]) -> Registry[Any]:
    """The schema files by ``$id``, and nothing else: no retrieval, so no network."""
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    resources = [(schema["$id"], Resource.from_contents(schema, default_specification=DRAFT202012))
                 for schema in schemas.values()]
    empty: Registry[Any] = Registry()
    return empty.with_resources(resources)


def _closed(node: object) -> object:
    """A copy of a schema where documented objects reject undocumented fields."""
    if isinstance(node, dict):
        out = {key: _closed(value) for key, value in node.items()}
        if "properties" in out and out.get("additionalProperties") is True:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_closed(value) for value in node]
    return node


def _problems(error: _ValidationError) -> list[Problem]:
    path = list(error.absolute_path)
    instance = error.instance
    if error.validator == "required" and isinstance(error.validator_value, list) and isinstance(instance, dict):
        # One error per missing field, all alike: name the fields in the path instead.
        return [Problem(_json_path([*path, name]), "required field is missing")
                for name in error.validator_value if isinstance(name, str) and name not in instance]
    if error.validator == "additionalProperties" and error.validator_value is False and isinstance(instance, dict):
        schema = error.schema
        documented = schema.get("properties", {}) if isinstance(schema, dict) else {}
        return [Problem(_json_path([*path, str(name)]), "field is not documented in the contract (strict mode)")
                for name in instance if name not in documented]
    return [Problem(_json_path(path), _message(error))]


def _message(error: _ValidationError) -> str:
    """jsonschema's message, with JSON spellings (null, true) instead of Python's."""
    kind, expected, got = error.validator, error.validator_value, _json(error.instance)
    if kind == "type":
        names = " or ".join(expected) if isinstance(expected, list) else str(expected)
        return f"expected {names}, got {got}"
    if kind == "const":
        return f"expected {_json(expected)}, got {got}"
    if kind == "enum":
        return f"{got} is not one of {_json(expected)}"
    if kind == "pattern":
        return f"{got} does not match {expected}"
    return error.message


def _json(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _json_path(parts: Iterable[str | int]) -> str:
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out
