"""Shared fixtures: real PostgreSQL and mosquitto for the session, capture paths."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk22"


@pytest.fixture(scope="session")
def captures_dir() -> Path:
    assert FIXTURES.is_dir(), f"capture fixtures missing: {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a real PostgreSQL server (``CTID_TEST_PG_URL`` reuses an existing one)."""
    url = os.environ.get("CTID_TEST_PG_URL")
    if url:
        yield url
        return
    with services.postgres() as server:
        yield server.url


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[services.Mosquitto]:
    """A real mosquitto on 127.0.0.1 for the whole session."""
    broker = services.start_mosquitto()
    try:
        yield broker
    finally:
        broker.stop()
