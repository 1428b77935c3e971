"""Logging: JSON lines off a terminal, pretty on one, call_id on every line of a call."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from ctid import logs
from ctid.asterisk.ami import AMIClient
from ctid.asterisk.ami_protocol import AMIParser, Message


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_json_lines_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    logs.configure("info", "auto", stream=out)
    structlog.get_logger("t").info("ctid.test", answer=42)
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert line["event"] == "ctid.test" and line["answer"] == 42 and line["level"] == "info"
    assert line["timestamp"].endswith("Z")


def test_pretty_lines_on_a_terminal() -> None:
    out = _TTY()
    logs.configure("info", "auto", stream=out)
    structlog.get_logger("t").info("ctid.test", answer=42)
    text = out.getvalue()
    assert "ctid.test" in text and "answer" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.strip().splitlines()[-1])


def test_lines_logged_while_an_ami_event_is_dispatched_carry_its_call_id() -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    log = structlog.get_logger("consumer")

    def consume(event: Message) -> None:
        log.info("consumer.saw", ami_event=event.name)

    client = AMIClient("127.0.0.1", 5038, "ctid", "x", on_event=consume)
    parser = AMIParser(expect_greeting=False)
    for item in parser.feed(b"Event: Newstate\r\nChannel: PJSIP/trunk-1\r\nLinkedid: 1.1\r\n"
                            b"ChanVariable: CTID_CALL_ID=abc123\r\nChanVariable: CTID_QUEUE=\r\n\r\n"
                            b"Event: DeviceStateChange\r\nDevice: PJSIP/1001\r\n\r\n"):
        assert isinstance(item, Message)
        client.receive(item)
    lines = [json.loads(x) for x in out.getvalue().splitlines() if "consumer.saw" in x]
    assert [(x["ami_event"], x.get("call_id")) for x in lines] == [("Newstate", "abc123"),
                                                                  ("DeviceStateChange", None)]
    structlog.get_logger("after").info("after.dispatch")
    assert "call_id" not in json.loads(out.getvalue().splitlines()[-1])
