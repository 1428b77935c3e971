"""Fault injection toggles for the AMI server and the FastAGI client.

Each toggle reproduces one way a real link misbehaves, so that ctid's AMI client and
FastAGI server can be tested against it through real sockets:

AMI (:class:`AMIFaults`, per server, may be changed while running):

* ``split_utf8`` — every multi-byte UTF-8 character is written in two TCP writes, split
  inside the character (panoramisk lost such characters: "Zoë" -> "Zo").
* ``eventlist_cut_after`` — close the connection after N items of an EventList, before
  its ``...Complete`` event.
* ``silent_ping`` — stop answering ``Ping`` (a half-open link; no pong).
* ``drop_at_byte`` — close the connection once N bytes have been written to it (the
  frame in flight is cut at that byte). ``drop_at_random`` picks N with ``seed``.
* ``write_chunk``/``write_pause`` — slow writer: output in chunks of N bytes with a
  pause between them.
* ``read_pause`` — slow reader: pause before each read of the client's actions.

FastAGI (:class:`AGIFaults`, per simulator):

* ``partial_header_lines`` — send only N lines of the ``agi_*`` environment (no blank
  line), then EOF.
* ``hangup_after_commands`` — after the reply to the N-th command, the caller hangs up:
  ``HANGUP`` goes out of band and later channel commands get ``511``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class AMIFaults:
    split_utf8: bool = False
    eventlist_cut_after: int | None = None
    silent_ping: bool = False
    drop_at_byte: int | None = None
    drop_at_random: bool = False
    seed: int = 0
    write_chunk: int | None = None
    write_pause: float = 0.0
    read_pause: float = 0.0

    def drop_threshold(self, session_no: int) -> int | None:
        if self.drop_at_byte is not None:
            return self.drop_at_byte
        if self.drop_at_random:
            return random.Random(self.seed * 1000 + session_no).randint(1, 2000)
        return None


@dataclass(slots=True)
class AGIFaults:
    partial_header_lines: int | None = None
    hangup_after_commands: int | None = None
