"""Keep the native fail-open queue's members equal to ctid's logged-in agents.

``asterisk-conf/queues.conf`` defines ``[ctid-fallback]``, the app_queue queue the
dialplan sends callers to while ctid is unreachable. By default its members are the
static ``member =>`` lines the admin maintains. With ``[acd] sync_fallback_members =
true``, :class:`FallbackSync` maintains them over AMI while ctid runs:

* **Members.** The queue's *dynamic* members are the devices of the agents logged in to
  ctid: a login sends ``QueueAdd`` (``Interface: PJSIP/1001``, ``MemberName``: the agent's
  name or id, ``StateInterface``: the device), a logout ``QueueRemove``. A hot-desk move
  to another device removes the old interface and adds the new one. Every interface is
  checked with :func:`ctid.asterisk.safety.check_device` before it is sent.
* **Pause.** An agent in ``reserved``, ``on_call``, ``wrap_up`` or ``paused`` is a
  *paused* member (``QueuePause``, or ``Paused: true`` in the ``QueueAdd``): with
  ``ringinuse = no`` this keeps the fallback from ringing an agent ctid is about to ring
  (``reserved``: the device is not in use yet, so ``ringinuse`` cannot see it) or who is
  on a ctid call. ``ready`` and ``busy`` (the device is on a call outside ctid:
  ``ringinuse = no`` covers it) are unpaused.
* **Driven by events.** :meth:`FallbackSync.on_agent_state` takes every ``agent.state``
  event; it only marks the agent dirty. One worker task compares what each dirty agent
  should be with what Asterisk was last told and sends the difference, one action at a
  time, so events that come in a burst collapse into the last state.
* **Reconcile.** After every AMI login (:meth:`FallbackSync.on_login`) the worker reads
  ``QueueStatus`` for the queue and makes it match: missing members added, dynamic
  members that no logged-in agent uses removed, pause flags corrected. Static members
  (``Membership: static``) are left alone, as ctid cannot remove them (they are logged
  once); an agent whose device is a static member only gets its pause flag set.
* **Stop.** On a clean stop (SIGTERM) the members stay and the paused ones are
  unpaused (bounded), so the fallback can ring every logged-in agent while ctid is
  down. After ``kill -9`` the last flags stay until ctid is back (the reconcile at its
  next login fixes them) or an admin runs ``queue unpause member``.

Errors from Asterisk (``Already there``, ``Not there``) are read as the state they
describe; others are logged and left to the next event or login. Nothing here blocks
routing: the sync is best effort, off the ACD's path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

from ctid.agents import AgentRegistry
from ctid.asterisk.ami import AMIActionError, AMIClient, AMIError
from ctid.asterisk.safety import UnsafeValueError, check_device
from ctid.events.schema import Event

log = structlog.get_logger(__name__)

PAUSED_STATES: Final = frozenset({"reserved", "on_call", "wrap_up", "paused"})
"""ctid agent states in which the fallback queue must not ring the agent."""
STOP_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class Member:
    """One member of the native queue: what ctid wants, or what Asterisk reported."""

    interface: str
    name: str
    paused: bool
    dynamic: bool = True


class FallbackSync:
    """Mirror logged-in agents into the native queue ``queue``. ``await start()``, feed it
    :meth:`on_agent_state` and :meth:`on_login`, ``await stop()``."""

    def __init__(self, *, client: AMIClient, agents: AgentRegistry, queue: str = "ctid-fallback",
                 known_endpoints: Callable[[], frozenset[str] | None] | None = None) -> None:
        self._client = client
        self._agents = agents
        self.queue = queue
        self._known = known_endpoints  # () -> frozenset[str] | None, the devices Asterisk knows
        self._want: dict[str, Member] = {}  # agent id -> its member, for logged-in agents
        self._have: dict[str, Member] = {}  # interface -> member, as Asterisk was last told/reported
        self._dirty: set[str] = set()  # agent ids
        self._stale: set[str] = set()  # interfaces to remove (a logout, a device change)
        self._reconcile = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._static_logged: set[str] = set()
        self.actions_sent = 0
        self.failures = 0

    # -- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._worker(), name="acd-fallback-sync")

    async def stop(self) -> None:
        """Stop the worker, then unpause the members ctid paused (bounded), so that the
        fallback can ring every logged-in agent while ctid is away."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not self._client.connected:
            return
        with contextlib.suppress(TimeoutError, AMIError):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                for member in [m for m in self._have.values() if m.paused]:
                    await self._pause(member.interface, False, "")
        log.info("acd.fallback_sync_stopped", queue=self.queue, members=len(self._have))

    # -- inputs --------------------------------------------------------------------------

    def on_agent_state(self, event: Event) -> None:
        """An ``agent.state`` event: note what this agent's member should be now."""
        agent_id = event.agent_id
        if agent_id is None:
            return
        state = event.data.get("state")
        device = event.data.get("device")
        old = self._want.get(agent_id)
        if state == "logged_out" or not isinstance(device, str) or not device:
            self._want.pop(agent_id, None)
        else:
            try:
                check_device(device, None)
            except UnsafeValueError:
                log.error("acd.fallback_bad_device", agent_id=agent_id, device=device)
                self._want.pop(agent_id, None)
            else:
                self._want[agent_id] = Member(device, self._member_name(agent_id), state in PAUSED_STATES)
        new = self._want.get(agent_id)
        if old is not None and (new is None or new.interface != old.interface):
            self._stale.add(old.interface)
        self._dirty.add(agent_id)
        self._wake.set()

    def on_login(self) -> None:
        """After each AMI login: reconcile the whole queue with ``QueueStatus``."""
        self._reconcile = True
        self._wake.set()

    def wanted(self) -> dict[str, Member]:
        """Interface -> member, as ctid wants the queue (the logged-in agents)."""
        return {m.interface: m for m in self._want.values()}

    def _member_name(self, agent_id: str) -> str:
        try:
            name = self._agents.get(agent_id).config.name
        except LookupError:
            name = ""
        # MemberName is one AMI header value: no line breaks, and short.
        cleaned = " ".join((name or agent_id).split())[:64]
        return cleaned or agent_id

    # -- the worker ----------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._client.connected:
                continue  # on_login wakes us with a full reconcile
            try:
                if self._reconcile:
                    self._reconcile = False
                    self._dirty.clear()
                    self._stale.clear()
                    await self._full_reconcile()
                else:
                    await self._apply_dirty()
            except AMIError as exc:  # the link dropped mid-way: the next login reconciles
                log.warning("acd.fallback_sync_interrupted", queue=self.queue, reason=str(exc))
                self._reconcile = True
            except Exception:  # a bug here must not stop the sync for good, nor routing
                log.exception("acd.fallback_sync_failed", queue=self.queue)
                self._reconcile = True

    async def _apply_dirty(self) -> None:
        while self._stale or self._dirty:
            if self._stale:
                interface = self._stale.pop()
                if interface not in self.wanted():
                    await self._remove(interface)
                continue
            agent_id = self._dirty.pop()
            want = self._want.get(agent_id)
            if want is not None:
                await self._converge(want)

    async def _full_reconcile(self) -> None:
        listing = await self._client.action("QueueStatus", {"Queue": self.queue})
        have: dict[str, Member] = {}
        for item in listing.events:
            if item.name != "QueueMember" or item.get("Queue") != self.queue:
                continue
            interface = item.get("Location") or item.get("Interface") or ""
            if not interface:
                continue
            have[interface] = Member(interface, item.get("Name") or item.get("MemberName") or "",
                                     (item.get("Paused") or "0") not in ("0", "", "false", "no"),
                                     dynamic=(item.get("Membership") or "dynamic").lower() != "static")
        self._have = have
        wanted = self.wanted()
        for interface, member in list(have.items()):
            if interface in wanted:
                continue
            if member.dynamic:
                await self._remove(interface)
            elif interface not in self._static_logged:
                self._static_logged.add(interface)
                log.warning("acd.fallback_static_member", queue=self.queue, interface=interface,
                            note="static in queues.conf: ctid cannot remove it")
        for member in wanted.values():
            await self._converge(member)
        log.info("acd.fallback_reconciled", queue=self.queue, members=len(self._have),
                 agents=len(wanted), reported=len(have))

    async def _converge(self, want: Member) -> None:
        have = self._have.get(want.interface)
        if have is None:
            await self._add(want)
        elif have.paused != want.paused:
            await self._pause(want.interface, want.paused, "ctid" if want.paused else "")

    # -- actions -------------------------------------------------------------------------

    def _checked(self, interface: str, *, known: bool = False) -> bool:
        """The device pattern always; for an add, also a device Asterisk knows (when listed)."""
        endpoints = self._known() if known and self._known is not None else None
        try:
            check_device(interface, endpoints)
        except UnsafeValueError as exc:
            log.error("acd.fallback_bad_device", queue=self.queue, interface=interface, reason=str(exc))
            return False
        return True

    async def _send(self, action: str, fields: dict[str, str]) -> str | None:
        """Send one action: None on success, else Asterisk's error message."""
        self.actions_sent += 1
        try:
            await self._client.action(action, fields)
        except AMIActionError as exc:
            return exc.completion.response.get("Message") or str(exc)
        return None

    async def _add(self, want: Member) -> None:
        if not self._checked(want.interface, known=True):
            return
        error = await self._send("QueueAdd", {
            "Queue": self.queue, "Interface": want.interface, "MemberName": want.name,
            "StateInterface": want.interface, "Penalty": "0", "Paused": "true" if want.paused else "false",
        })
        if error is None:
            self._have[want.interface] = want
            log.info("acd.fallback_member_added", queue=self.queue, interface=want.interface, paused=want.paused)
        elif "already there" in error.lower():
            # A member we did not know of: set its pause flag. A static one refuses the
            # QueueRemove at logout ("Member not dynamic"), which then marks it static.
            self._have[want.interface] = Member(want.interface, want.name, not want.paused)
            await self._pause(want.interface, want.paused, "ctid" if want.paused else "")
        else:
            self.failures += 1
            log.warning("acd.fallback_add_failed", queue=self.queue, interface=want.interface, reason=error)

    async def _remove(self, interface: str) -> None:
        have = self._have.get(interface)
        if have is not None and not have.dynamic:
            return
        if not self._checked(interface):
            self._have.pop(interface, None)
            return
        error = await self._send("QueueRemove", {"Queue": self.queue, "Interface": interface})
        if error is None or "not there" in error.lower():
            self._have.pop(interface, None)
            log.info("acd.fallback_member_removed", queue=self.queue, interface=interface)
        elif "not dynamic" in error.lower():  # static in queues.conf: it stays, as it is
            self._have[interface] = Member(interface, have.name if have else "", have.paused if have else False,
                                           dynamic=False)
            log.warning("acd.fallback_static_member", queue=self.queue, interface=interface,
                        note="static in queues.conf: ctid cannot remove it")
        else:
            self.failures += 1
            log.warning("acd.fallback_remove_failed", queue=self.queue, interface=interface, reason=error)

    async def _pause(self, interface: str, paused: bool, reason: str) -> None:
        if not self._checked(interface):
            return
        fields = {"Queue": self.queue, "Interface": interface, "Paused": "true" if paused else "false"}
        if reason:
            fields["Reason"] = reason
        error = await self._send("QueuePause", fields)
        have = self._have.get(interface)
        if error is None:
            if have is not None:
                self._have[interface] = Member(have.interface, have.name, paused, have.dynamic)
        else:
            self.failures += 1
            log.warning("acd.fallback_pause_failed", queue=self.queue, interface=interface, reason=error)


__all__ = ["PAUSED_STATES", "FallbackSync", "Member"]
