"""The :class:`Simulator` facade: wiring, lifetime and the scripted call generator."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path

from ctid.asterisk.ami_protocol import Message
from ctid.simulator.ami_server import AMIServer
from ctid.simulator.channels import Channel
from ctid.simulator.clock import SimClock
from ctid.simulator.config import (
    DEFAULT_AMI_READ,
    AMIUser,
    Endpoint,
    FeatureConfig,
    QueueConfig,
    default_endpoints,
    default_queues,
    load_features_conf,
)
from ctid.simulator.dialplan import Dialplan, DialplanError
from ctid.simulator.faults import AGIFaults, AMIFaults
from ctid.simulator.pbx import PBX


class Simulator:
    """An Asterisk 22 stand-in: AMI server + dialplan engine + FastAGI client.

    ``dialplan``: one or more ``extensions.conf``-style files (loaded in order, with
    ``#include``) or a :class:`Dialplan`. ``strict=True`` (default) refuses to start
    when the dialplan uses an application the simulator does not implement.
    ``agi_address`` overrides host:port of every ``agi://`` URL (the environment still
    shows the URL as written). ``time_scale`` scales every simulated delay.
    ``features``: a ``features.conf`` path or a :class:`FeatureConfig` (default: Asterisk's
    built-in feature map, which has no ``atxfer`` code, so AMI ``Atxfer`` fails).

    ``users``: the AMI users by name, each a secret or an :class:`AMIUser` (default
    ``{"ctid": "ctidpass"}``, the capture instance's). A user given by its secret reads
    the classes ``ami_read`` (default ``system,call,agent,user``, the sample
    ``asterisk-conf/manager.conf``; ``"all"`` for every class, as in the captures): its
    sessions get no ``VarSet``, ``Newexten``, ``AGIExec*``, ``DTMF*``, security events...
    unless it reads their class (see :mod:`ctid.simulator.ami_server`).
    """

    def __init__(
        self,
        *,
        dialplan: str | Path | Iterable[str | Path] | Dialplan | None = None,
        users: Mapping[str, str | AMIUser] | None = None,
        ami_read: str | Iterable[str] = DEFAULT_AMI_READ,
        channelvars: Iterable[str] = (),
        systemname: str | None = None,
        endpoints: dict[str, Endpoint] | None = None,
        queues: dict[str, QueueConfig] | None = None,
        agi_address: tuple[str, int] | None = None,
        time_scale: float = 1.0,
        prompts: dict[str, float] | None = None,
        ami_faults: AMIFaults | None = None,
        agi_faults: AGIFaults | None = None,
        features: str | Path | FeatureConfig | None = None,
        strict: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if isinstance(dialplan, Dialplan):
            plan = dialplan
        elif dialplan is None:
            plan = Dialplan()
        elif isinstance(dialplan, (str, Path)):
            plan = Dialplan.load(dialplan)
        else:
            plan = Dialplan.load(*dialplan)
        if strict and plan.unsupported:
            raise DialplanError("dialplan uses applications the simulator does not implement: "
                                + "; ".join(plan.unsupported))
        self.dialplan = plan
        self.clock = SimClock(time_scale)
        self.ami_faults = ami_faults or AMIFaults()
        self.agi_faults = agi_faults or AGIFaults()
        self.endpoints = endpoints if endpoints is not None else default_endpoints()
        self.pbx = PBX(
            dialplan=plan, clock=self.clock, emit=self._emit,
            endpoints=self.endpoints,
            queues=queues if queues is not None else default_queues(),
            channelvars=tuple(channelvars), systemname=systemname, agi_address=agi_address,
            prompts=prompts, agi_faults=self.agi_faults,
            features=load_features_conf(features) if isinstance(features, (str, Path)) else features,
        )
        accounts = {name: user if isinstance(user, AMIUser) else AMIUser.of(user, ami_read)
                    for name, user in (users or {"ctid": "ctidpass"}).items()}
        self.ami = AMIServer(self.pbx, users=accounts, host=host, port=port,
                             systemname=systemname, faults=self.ami_faults)
        self.events: list[Message] = []  # every event, for tests
        self._waiters: list[tuple[asyncio.Future[Message], str, dict[str, str]]] = []

    # -- lifetime -----------------------------------------------------------------
    async def start(self) -> None:
        await self.ami.start()

    async def stop(self) -> None:
        await self.pbx.shutdown()
        await self.ami.stop()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def ami_port(self) -> int:
        return self.ami.port

    @property
    def errors(self) -> list[str]:
        """Loud failures (unsupported applications, simulator bugs)."""
        return self.pbx.errors

    @property
    def channels(self) -> dict[str, Channel]:
        return self.pbx.channels

    def _emit(self, msg: Message) -> None:
        self.events.append(msg)
        self.ami.broadcast(msg)
        for fut, name, match in list(self._waiters):
            if not fut.done() and msg.name == name and all(msg.get(k) == v for k, v in match.items()):
                fut.set_result(msg)
                self._waiters.remove((fut, name, match))

    async def wait_event(self, name: str, timeout: float = 5.0, **match: str) -> Message:
        """Wait (real seconds) for the next event ``name`` whose headers match."""
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, name, match))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            entry = (fut, name, match)
            if entry in self._waiters:
                self._waiters.remove(entry)

    # -- call generator ----------------------------------------------------------------
    def inbound_call(self, *, dnis: str, caller: str, caller_name: str | None = None,
                     hangup_after: float | None = None, dtmf: str = "", dtmf_after: float = 0.0,
                     endpoint: str = "trunk", context: str | None = None) -> Channel:
        """A call arriving on a trunk: ``Newchannel`` (Ring) and the dialplan starts at
        ``dnis``. ``hangup_after`` (simulated s): the caller sends BYE. ``dtmf``: digits the
        caller presses ``dtmf_after`` s after the call starts (one per 0.28 s)."""
        chan = self.pbx.inbound(dnis=dnis, caller=caller,
                                caller_name=caller_name if caller_name is not None else f"Caller {caller}",
                                endpoint=endpoint, context=context)
        if hangup_after is not None:
            self.pbx.spawn(self._hangup_later(chan, hangup_after), f"bye {chan.name}")
        if dtmf:
            self.pbx.spawn(self._dtmf_later(chan, dtmf, dtmf_after), f"dtmf {chan.name}")
        return chan

    def register(self, endpoint: str) -> None:
        """The phone of a dynamic-AOR endpoint (``Endpoint(dynamic=True)``, agent2001 by
        default) sends REGISTER: ``PeerStatus``, ``DeviceStateChange NOT_INUSE``,
        ``ExtensionStatus`` of its hints and ``ContactStatus NonQualified`` (07b). Until
        then the device is ``UNAVAILABLE`` and dialing it gives ``CHANUNAVAIL``."""
        self.pbx.register(endpoint)

    def unregister(self, endpoint: str) -> None:
        """The phone sends REGISTER with ``Expires: 0``: ``ExtensionStatus``,
        ``PeerStatus``, ``DeviceStateChange UNAVAILABLE``, ``ContactStatus Removed`` (07b)."""
        self.pbx.unregister(endpoint)

    async def _hangup_later(self, chan: Channel, delay: float) -> None:
        await self.clock.sleep(delay)
        self.pbx.remote_hangup(chan)

    async def _dtmf_later(self, chan: Channel, digits: str, delay: float) -> None:
        await self.clock.sleep(delay)
        await self.send_dtmf(chan, digits)

    async def send_dtmf(self, chan: Channel, digits: str, gap: float = 0.28) -> None:
        """The caller presses ``digits`` (RFC 4733): ``DTMFBegin``/``DTMFEnd`` events."""
        for d in digits:
            if chan.hungup:
                return
            self.pbx.emit_chan("DTMFBegin", chan, [("Digit", d), ("Direction", "Received")], "dtmf,all")
            await self.clock.sleep(gap)
            self.pbx.emit_chan("DTMFEnd", chan, [
                    ("Digit", d),
                    ("DurationMs", "280"),
                    ("Direction", "Received")], "dtmf,all")
            chan.dtmf.put_nowait(d)

    async def caller_hangup(self, chan: Channel | str) -> None:
        """The caller (far end) hangs up now: non-soft ``HangupRequest`` first."""
        c = self.pbx.find_channel(chan) if isinstance(chan, str) else chan
        if c is not None:
            self.pbx.remote_hangup(c)
        await asyncio.sleep(0)

    def channel(self, prefix: str) -> Channel | None:
        """The live channel whose name starts with ``prefix`` (e.g. ``PJSIP/agent1001``)."""
        for name, chan in self.pbx.channels.items():
            if name.startswith(prefix):
                return chan
        return None

    async def wait_channel(self, prefix: str, timeout: float = 5.0) -> Channel:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            chan = self.channel(prefix)
            if chan is not None:
                return chan
            await asyncio.sleep(0.002)
        raise TimeoutError(f"no channel {prefix}")

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no channel is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pbx.channels:
            if loop.time() > deadline:
                raise TimeoutError(f"channels still up: {list(self.pbx.channels)}")
            await asyncio.sleep(0.005)
