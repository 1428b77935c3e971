"""The hold check-in's announcement, as app_queue's sounds and ``digits/*``."""

from __future__ import annotations

import pytest

from ctid.acd.dispatcher import announcement, number_prompts


@pytest.mark.parametrize(("n", "prompts"), [
    (0, ["digits/0"]), (7, ["digits/7"]), (19, ["digits/19"]), (20, ["digits/20"]),
    (42, ["digits/40", "digits/2"]), (100, ["digits/1", "digits/hundred"]),
    (115, ["digits/1", "digits/hundred", "digits/15"]), (999, ["digits/9", "digits/hundred", "digits/90", "digits/9"]),
    (5000, ["digits/9", "digits/hundred", "digits/90", "digits/9"]),  # capped
])
def test_number_prompts(n: int, prompts: list[str]) -> None:
    assert number_prompts(n) == prompts


def test_announcement() -> None:
    assert announcement(1, None) == ["queue-youarenext"]
    assert announcement(4, None) == ["queue-thereare", "digits/3", "queue-callswaiting"]
    assert announcement(None, 30.0) == ["queue-holdtime", "queue-less-than", "digits/1", "queue-minute"]
    assert announcement(None, 61.0) == ["queue-holdtime", "digits/2", "queue-minutes"]
    assert announcement(2, 600.0) == ["queue-thereare", "digits/1", "queue-callswaiting", "queue-holdtime",
                                      "digits/10", "queue-minutes"]
    assert announcement(None, None) == []
