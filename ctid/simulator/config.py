"""Configuration objects of the simulator: scripted endpoints and native queues.

Defaults mirror the reference instance of the captures (``asterisk-conf-used/``):
endpoint ``trunk`` (context ``from-trunk``), ``agent1001``..``agent1004`` (context
``from-agents``, caller id ``"Agent 100N" <100N>``) that ring 1 s and answer,
``agent2001`` with a dynamic AOR (unregistered until :meth:`Simulator.register`), and the
queues ``support`` (rrmemory, 1001+1002, timeout 15, retry 2) and ``sales`` (ringall,
1003, timeout 10, retry 2).

:class:`FeatureConfig` is ``features.conf``. Its defaults are Asterisk's built-in ones, in
which ``atxfer`` has no code, so the AMI ``Atxfer`` action fails until a
``features.conf`` with ``[featuremap] atxfer = ...`` is given (06c).

:class:`AMIUser` is one ``manager.conf`` user: its secret and its ``read`` event classes.
The default ``read`` is :data:`DEFAULT_AMI_READ`, the classes of the ``[ctid]`` user of
the repo's sample ``asterisk-conf/manager.conf`` (``system,call,agent,user``), not the
``read = all`` of the capture instance: ctid in production never sees ``VarSet``,
``Newexten``, ``AGIExec*``, ``DTMF*``, CEL or Cdr, so neither do the tests, unless they ask
for ``"all"`` (the capture comparisons do). :func:`load_manager_conf` reads the users of
a ``manager.conf``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class Endpoint:
    """A scripted SIP endpoint: how it behaves when the simulator dials it.

    ``ring_s``: seconds of ringing before it answers; ``answer=False`` rings until the
    caller gives up (the ring-no-answer UAS of 05); ``busy``: answers 486 at once;
    ``congested``: answers 503 at once (``DialStatus: CONGESTION``, cause 34);
    ``unreachable``: nothing listens (06d); ``hangup_after``: the endpoint hangs up this
    many seconds after answering (04b, 17).

    ``dynamic``: the AOR has no static contact, only what a REGISTER gives it (agent2001
    of 07b, contact ``contact``). Until :meth:`Simulator.register` the device is
    ``UNAVAILABLE`` and dialing it gives ``CHANUNAVAIL``.
    """

    name: str
    context: str = "from-agents"
    callerid_num: str = ""
    callerid_name: str = ""
    ring_s: float = 1.0
    answer: bool = True
    busy: bool = False
    congested: bool = False
    unreachable: bool = False
    hangup_after: float | None = None
    dynamic: bool = False
    contact: str = ""


@dataclass(slots=True)
class QueueMember:
    interface: str  # "PJSIP/agent1001"
    name: str = ""
    penalty: int = 0
    paused: bool = False
    paused_reason: str = ""
    calls_taken: int = 0
    last_call: int = 0
    membership: str = "static"


@dataclass(slots=True)
class QueueConfig:
    name: str
    strategy: str = "ringall"
    timeout: float = 15.0
    retry: float = 5.0
    wrapuptime: float = 0.0
    musicclass: str = "default"
    members: list[QueueMember] = field(default_factory=list)
    completed: int = 0
    abandoned: int = 0
    rr_next: int = 0
    # app_queue's exponential averages (3/4 old + 1/4 new, the first value as is), in
    # whole seconds: hold time at each connect, talk time at each completed call (04b).
    holdtime: int = 0
    talktime: int = 0


def default_endpoints() -> dict[str, Endpoint]:
    eps = {"trunk": Endpoint("trunk", context="from-trunk", ring_s=1.0, hangup_after=None)}
    for n in (1001, 1002, 1003, 1004):
        eps[f"agent{n}"] = Endpoint(f"agent{n}", callerid_num=str(n), callerid_name=f"Agent {n}")
    # agent2001 has a dynamic AOR: reachable only while registered (07b).
    eps["agent2001"] = Endpoint("agent2001", callerid_num="2001", callerid_name="Agent 2001", dynamic=True,
                                contact="sip:agent2001@127.0.0.1:5075")
    return eps


def default_queues() -> dict[str, QueueConfig]:
    return {
        "support": QueueConfig(
            "support", strategy="rrmemory", timeout=15, retry=2,
            members=[QueueMember("PJSIP/agent1001", "Agent 1001"),
                     QueueMember("PJSIP/agent1002", "Agent 1002")],
        ),
        "sales": QueueConfig(
            "sales", strategy="ringall", timeout=10, retry=2,
            members=[QueueMember("PJSIP/agent1003", "Agent 1003")],
        ),
    }


def load_queues_conf(path: str | Path) -> dict[str, QueueConfig]:
    """Read a ``queues.conf``: ``[name]`` sections with strategy/timeout/retry/
    wrapuptime/musicclass and ``member => iface,penalty,name,stateiface`` lines."""
    queues: dict[str, QueueConfig] = {}
    current: QueueConfig | None = None
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            name = line[1:line.index("]")]
            current = None if name == "general" else queues.setdefault(name, QueueConfig(name))
            continue
        if current is None:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        value = value.lstrip(">").strip()
        if key == "member":
            parts = [p.strip() for p in value.split(",")]
            current.members.append(QueueMember(
                parts[0], parts[2] if len(parts) > 2 and parts[2] else parts[0],
                int(parts[1]) if len(parts) > 1 and parts[1] else 0))
        elif key == "strategy":
            current.strategy = value
        elif key in ("timeout", "retry", "wrapuptime"):
            setattr(current, key, float(value))
        elif key == "musicclass":
            current.musicclass = value
    return queues


@dataclass(slots=True)
class FeatureConfig:
    """``features.conf``: the ``[featuremap]`` DTMF codes and the transfer options of
    ``[general]`` that the simulator uses. Defaults are Asterisk's: ``blindxfer = #``,
    ``disconnect = *``, no ``atxfer`` code, ``transferdigittimeout = 3``,
    ``atxfernoanswertimeout = 15``."""

    featuremap: dict[str, str] = field(default_factory=lambda: {"blindxfer": "#", "disconnect": "*",
                                                                 "atxfer": ""})
    transferdigittimeout: float = 3.0
    atxfernoanswertimeout: float = 15.0

    @property
    def atxfer(self) -> str:
        return self.featuremap.get("atxfer", "")


def load_features_conf(path: str | Path) -> FeatureConfig:
    """Read a ``features.conf``: ``[featuremap]`` codes and ``[general]`` timeouts."""
    conf = FeatureConfig()
    section = ""
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            section = line[1:line.index("]")].strip().lower()
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip().lower(), value.lstrip(">").strip()
        if section == "featuremap":
            conf.featuremap[key] = value
        elif section == "general" and key in ("transferdigittimeout", "atxfernoanswertimeout"):
            setattr(conf, key, float(value))
    return conf


#: The AMI event classes of Asterisk 22 (``manager.c`` ``perms[]``, without ``all`` and
#: ``none``). ``read``/``Events:`` name them; an event's ``Privilege:`` lists its classes
#: followed by ``all``.
AMI_CLASSES: frozenset[str] = frozenset({
    "system", "call", "log", "verbose", "command", "agent", "user", "config", "dtmf", "reporting",
    "cdr", "dialplan", "originate", "agi", "cc", "aoc", "test", "security", "message",
})
#: ``read =`` of the ``[ctid]`` user in ``asterisk-conf/manager.conf`` (a test checks
#: that the two agree).
DEFAULT_AMI_READ = "system,call,agent,user"


def ami_classes(spec: str | Iterable[str]) -> frozenset[str]:
    """The event classes of a ``read =`` value: ``"system,call"``, an iterable of class
    names, or ``"all"``. An unknown name raises ValueError (Asterisk would ignore it, but
    here it is a typo in a test or the demo)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    classes = {name.strip().lower() for name in names if name.strip()}
    if "all" in classes:
        return AMI_CLASSES
    unknown = classes - AMI_CLASSES
    if unknown:
        raise ValueError(f"unknown AMI event class(es): {', '.join(sorted(unknown))}")
    return frozenset(classes)


@dataclass(frozen=True, slots=True)
class AMIUser:
    """One ``manager.conf`` user. ``read``: the event classes its sessions may receive
    (see :func:`ami_classes`). The simulator has no ``write`` classes: every action is
    allowed to every user that logged in."""

    secret: str
    read: frozenset[str] = field(default_factory=lambda: ami_classes(DEFAULT_AMI_READ))

    @classmethod
    def of(cls, secret: str, read: str | Iterable[str] = DEFAULT_AMI_READ) -> AMIUser:
        return cls(secret, ami_classes(read))


def load_manager_conf(path: str | Path) -> dict[str, AMIUser]:
    """Read the users of a ``manager.conf``: every section but ``[general]``, with its
    ``secret`` and ``read`` (a user without ``read`` receives no events). ``#include``
    lines are ignored, and a ``[name](+)`` section adds to ``[name]``."""
    users: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            name = line[1:line.index("]")].strip()
            current = None if name.lower() == "general" else users.setdefault(name, {})
            continue
        key, sep, value = line.partition("=")
        if current is not None and sep:
            current[key.strip().lower()] = value.lstrip(">").strip()
    return {name: AMIUser.of(opts.get("secret", ""), opts.get("read", "")) for name, opts in users.items()}
