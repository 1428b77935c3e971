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
