"""FastAGI client: the simulator's ``AGI()`` application, playing Asterisk's res_agi.

Behaviour, from the traces in ``tests/fixtures/asterisk22/agi/``:

* Environment: ``agi_network: yes``, ``agi_network_script`` (only when the URL has a
  path; the query string is kept verbatim, 11), ``agi_request`` (the URL without the
  arguments), then the channel block in the order of 03, then ``agi_arg_N``, then an
  empty line. Every line ends in a bare ``\\n``.
* Replies: ``200 result=...`` as in 03/09-12; ``510 Invalid or unknown command``;
  ``511 Command Not Permitted on a dead channel or intercept routine`` for media and
  channel commands once the channel is "dead".
* A hangup *or a Redirect* (an async goto, 14*) while a command runs: the command's own
  reply comes first (``200 result=-1 endpos=N``), then an out-of-band ``HANGUP`` line;
  while idle the ``HANGUP`` goes out at once. ``AGISIGHUP=no`` suppresses the line
  (14d), not the dead mode. Dead mode: ``GET VARIABLE``, ``GET FULL VARIABLE``, ``SET
  VARIABLE``, ``VERBOSE``, ``NOOP``, ``DATABASE *`` still work; ``EXEC`` answers
  ``200 result=0`` and does nothing; everything else gets ``511``.
* **The socket is never closed by the simulator** unless ``AGIEXITONHANGUP=yes``: then,
  on the hangup/redirect, it sends ``HANGUP`` twice and closes (14c, 14e). Otherwise
  the channel stays in ``AGI()`` until the server closes; after the server's EOF one
  more ``HANGUP`` is sent (09-12, 14, 14b; not with ``AGISIGHUP=no``) and the socket is
  closed.
* ``AGISTATUS``: ``SUCCESS`` when the server ended the session on a live channel,
  ``HANGUP`` after a hangup or redirect, ``FAILURE`` when the server cannot be reached.
* AMI: one ``AGIExecStart``/``AGIExecEnd`` pair per command (03), ``ResultCode``
  ``-1``/``Failure`` for a command cut by a hangup, ``511`` for refused commands.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from ctid.simulator.channels import Channel
from ctid.simulator.dialplan import split_args

if TYPE_CHECKING:
    from ctid.simulator.pbx import PBX

log = logging.getLogger("ctid.simulator.agi")

DEAD = "511 Command Not Permitted on a dead channel or intercept routine"
DEAD_OK = ("GET VARIABLE", "GET FULL VARIABLE", "SET VARIABLE", "VERBOSE", "NOOP", "EXEC",
           "DATABASE", "ASYNCAGI BREAK", "SPEECH DESTROY", "SPEECH UNLOAD GRAMMAR")
AGI_VERSION = "22.11.0-rc1"


def parse_agi_url(data: str) -> tuple[str, str, int, str, list[str]]:
    """``agi://host:port/script?q,arg1,arg2`` -> (request, host, port, script, args)."""
    parts = split_args(data)
    request, args = parts[0].strip(), parts[1:]
    if not request.startswith("agi://"):
        raise ValueError(f"only FastAGI (agi://) is simulated, got {request!r}")
    rest = request[len("agi://"):]
    hostport, _, script = rest.partition("/")
    host, _, port_text = hostport.partition(":")
    port = int(port_text) if port_text else 4573
    return request, host, port, script, args


def split_command(line: str) -> list[str]:
    """Tokenise an AGI command line the way res_agi does (double quotes group)."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    had_token = False
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            cur.append(line[i + 1])
            i += 2
            had_token = True
            continue
        if ch == '"':
            quoted = not quoted
            had_token = True
        elif ch == " " and not quoted:
            if had_token:
                out.append("".join(cur))
            cur, had_token = [], False
        else:
            cur.append(ch)
            had_token = True
        i += 1
    if had_token:
        out.append("".join(cur))
    return out


class AGISession:
    def __init__(self, pbx: PBX, chan: Channel, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.pbx = pbx
        self.chan = chan
        self.reader = reader
        self.writer = writer
        self.dead = False  # hangup/redirect seen
        self.notified = False
        self.closed_by_us = False
        self.commands = 0

    @property
    def sighup(self) -> bool:
        return (self.chan.get_var("AGISIGHUP") or "yes").lower() not in ("no", "0", "false")

    @property
    def exit_on_hangup(self) -> bool:
        return (self.chan.get_var("AGIEXITONHANGUP") or "").lower() in ("yes", "1", "true")

    async def send(self, line: str) -> None:
        try:
            self.writer.write(line.encode("utf-8") + b"\n")
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    async def notify_hangup(self) -> bool:
        """Send the out-of-band HANGUP (once). True when the session must end now."""
        self.dead = True
        if self.notified:
            return False
        self.notified = True
        if self.exit_on_hangup:
            await self.send("HANGUP")
            await self.send("HANGUP")
            self.closed_by_us = True
            return True
        if self.sighup:
            await self.send("HANGUP")
        return False

    async def run(self, env: list[tuple[str, str]]) -> str:
        faults = self.pbx.agi_faults
        lines = [f"{k}: {v}" for k, v in env]
        if faults.partial_header_lines is not None:
            for line in lines[: faults.partial_header_lines]:
                await self.send(line)
            self.closed_by_us = True
            return "FAILURE"
        for line in lines:
            await self.send(line)
        await self.send("")
        while True:
            read = asyncio.ensure_future(self.reader.readline())
            try:
                while not read.done():
                    if self.notified:
                        await asyncio.wait({read})
                        break
                    if self.chan.interrupted:
                        if await self.notify_hangup():
                            return "HANGUP"
                        continue
                    waiter = asyncio.ensure_future(self.chan.wait(self.pbx.clock, None))
                    await asyncio.wait({read, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                try:
                    raw = read.result()
                except (ConnectionError, OSError):
                    raw = b""
            finally:
                if not read.done():
                    read.cancel()
            if not raw:
                # The server closed (or half-closed): one more HANGUP, then close.
                if self.sighup:
                    await self.send("HANGUP")
                return "HANGUP" if self.dead or self.chan.interrupted else "SUCCESS"
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line.strip():
                continue
            reply = await self.execute(line)
            await self.send(reply)
            self.commands += 1
            if faults.hangup_after_commands is not None and self.commands == faults.hangup_after_commands:
                self.pbx.remote_hangup(self.chan)
            if self.chan.interrupted and not self.notified:
                if await self.notify_hangup():
                    return "HANGUP"

    # -------------------------------------------------------------- commands
    async def execute(self, line: str) -> str:
        words = split_command(line)
        upper = [w.upper() for w in words]
        cmd_id = str(self.pbx.random_id())
        chan = self.chan
        pbx = self.pbx
        pbx.emit_chan("AGIExecStart", chan, [("CommandId", cmd_id), ("Command", line)], "agi,all")
        reply, code, result = await self._dispatch(words, upper)
        pbx.emit_chan("AGIExecEnd", chan, [
                ("CommandId", cmd_id),
                ("Command", line),
                ("ResultCode", code),
                ("Result", result)], "agi,all")
        return reply

    async def _dispatch(self, words: list[str], upper: list[str]) -> tuple[str, str, str]:
        chan, pbx = self.chan, self.pbx
        head2 = " ".join(upper[:2])
        head3 = " ".join(upper[:3])
        name = head3 if head3 in ("GET FULL VARIABLE", "WAIT FOR DIGIT") else head2
        if not words:
            return "510 Invalid or unknown command", "510", "Invalid or unknown command"
        dead = self.dead or chan.interrupted
        if dead and not any(" ".join(upper).startswith(ok) for ok in DEAD_OK):
            return DEAD, "511", "Command Not Permitted on a dead channel or intercept routine"
        ok = ("200", "Success")
        if upper[0] == "ANSWER":
            if chan.state != 6:
                pbx.set_state(chan, 6)
            return "200 result=0", *ok
        if upper[0] == "NOOP":
            return "200 result=0", *ok
        if upper[0] == "VERBOSE":
            return "200 result=1", *ok
        if upper[0] == "HANGUP":
            pbx.soft_hangup(chan)
            return "200 result=1", *ok
        if name == "GET VARIABLE":
            varname = words[2] if len(words) > 2 else ""
            if "(" in varname:
                value: str | None = pbx.resolve(chan, varname)
            else:
                value = chan.get_var(varname)
                if value is None and varname in pbx.globals:
                    value = pbx.globals[varname]
            if value is None or ("(" in varname and value == ""):
                return "200 result=0", *ok
            return f"200 result=1 ({value})", *ok
        if name == "GET FULL VARIABLE":
            expr = words[3] if len(words) > 3 else ""
            return f"200 result=1 ({pbx.expand(chan, expr)})", *ok
        if name == "SET VARIABLE":
            if len(words) < 4:
                return "520 Invalid command syntax.  Proper usage not available.", "520", "Usage"
            pbx.set_var(chan, words[2], words[3])
            return "200 result=1", *ok
        if name == "CHANNEL STATUS":
            return f"200 result={chan.state}", *ok
        if name == "SET CONTEXT" and len(words) > 2:
            chan.context = words[2]
            return "200 result=0", *ok
        if name == "SET EXTENSION" and len(words) > 2:
            chan.exten = words[2]
            return "200 result=0", *ok
        if name == "SET PRIORITY" and len(words) > 2:
            chan.priority = int(words[2]) - 1 if words[2].isdigit() else chan.priority
            return "200 result=0", *ok
        if upper[0] == "EXEC":
            if dead:
                return "200 result=0", *ok
            app = words[1] if len(words) > 1 else ""
            data = " ".join(words[2:])
            if app not in pbx.apps:
                return "200 result=-2", "200", "Success"
            res = await pbx.exec_app(chan, app, data, "AGI EXEC")
            if chan.interrupted:
                return "200 result=-1", "200", "Unknown Result"
            return f"200 result={res}", *ok
        if name == "STREAM FILE":
            prompt = words[2] if len(words) > 2 else ""
            escape = words[3] if len(words) > 3 else ""
            digit, played = await pbx.play(chan, prompt, escape)
            endpos = int(played * 8000)
            if chan.interrupted:
                pbx.set_var(chan, "PLAYBACKSTATUS", "FAILED")
                return f"200 result=-1 endpos={endpos}", "-1", "Failure"
            if digit is not None:
                pbx.set_var(chan, "PLAYBACKSTATUS", "FAILED")
                return f"200 result={ord(digit)} endpos={endpos}", *ok
            pbx.set_var(chan, "PLAYBACKSTATUS", "SUCCESS")
            return f"200 result=0 endpos={endpos}", *ok
        if name == "WAIT FOR DIGIT":
            ms = float(words[3]) if len(words) > 3 else -1
            digit = await chan.wait_digit(pbx.clock, None if ms < 0 else ms / 1000.0)
            if chan.interrupted:
                return "200 result=-1", "-1", "Failure"
            return f"200 result={ord(digit) if digit else 0}", *ok
        if name == "GET DATA":
            prompt = words[2] if len(words) > 2 else ""
            timeout = float(words[3]) / 1000.0 if len(words) > 3 else 6.0
            maxdigits = int(words[4]) if len(words) > 4 else 1024
            digits = ""
            digit, _ = await pbx.play(chan, prompt, "0123456789*#")
            if chan.interrupted:
                return "200 result=-1", "-1", "Failure"
            if digit is not None and digit != "#":
                digits += digit
            timed_out = False
            while digit != "#" and len(digits) < maxdigits:
                digit = await chan.wait_digit(pbx.clock, timeout)
                if chan.interrupted:
                    return "200 result=-1", "-1", "Failure"
                if digit is None:
                    timed_out = True
                    break
                if digit == "#":
                    break
                digits += digit
            return f"200 result={digits}{' (timeout)' if timed_out else ''}", *ok
        return "510 Invalid or unknown command", "510", "Invalid or unknown command"


def build_env(pbx: PBX, chan: Channel, request: str, script: str, args: list[str]) -> list[tuple[str, str]]:
    env: list[tuple[str, str]] = [("agi_network", "yes")]
    if script:
        env.append(("agi_network_script", script))
    env += [
        ("agi_request", request),
        ("agi_channel", chan.name),
        ("agi_language", chan.language),
        ("agi_type", chan.tech),
        ("agi_uniqueid", chan.uniqueid),
        ("agi_version", AGI_VERSION),
        ("agi_callerid", chan.caller_num or "unknown"),
        ("agi_calleridname", chan.caller_name or "unknown"),
        ("agi_callingpres", "0"),
        ("agi_callingani2", "0"),
        ("agi_callington", "0"),
        ("agi_callingtns", "0"),
        ("agi_dnid", chan.dnid or "unknown"),
        ("agi_rdnis", "unknown"),
        ("agi_context", chan.context),
        ("agi_extension", chan.exten),
        ("agi_priority", str(chan.priority)),
        ("agi_enhanced", "0.0"),
        ("agi_accountcode", chan.accountcode),
        ("agi_threadid", str(random.randint(10**14, 10**15 - 1))),
    ]
    env += [(f"agi_arg_{i}", a) for i, a in enumerate(args, 1)]
    return env


async def run_agi(pbx: PBX, chan: Channel, data: str) -> int:
    """The ``AGI()`` application. Sets ``AGISTATUS`` and returns like res_agi: ``-1``
    when the channel was hung up, ``0`` otherwise (a Redirect continues at its target)."""
    request, host, port, script, args = parse_agi_url(data)
    if pbx.agi_address is not None:
        host, port = pbx.agi_address
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=5.0)
    except (TimeoutError, OSError) as exc:
        log.info("FastAGI %s unreachable: %s", request, exc)
        pbx.set_var(chan, "AGISTATUS", "FAILURE")
        return -1 if chan.hangup_requested else 0
    chan.in_agi = True
    session = AGISession(pbx, chan, reader, writer)
    try:
        status = await session.run(build_env(pbx, chan, request, script, args))
    finally:
        chan.in_agi = False
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    pbx.set_var(chan, "AGISTATUS", status)
    return -1 if chan.hangup_requested else 0
