"""Routing benchmark: ctid's global matcher (``ctid.acd.router``) under churn, against
a naive scan of all calls x all agents making the same decisions.

Workload (seeded, on a virtual clock; only the router's own work is timed):
  - 50 skills: 10 languages (``lang:en`` ... ) and 40 products (``product:p00`` ...).
    2,000 agents, each with 1-2 languages and 4-8 products at levels 1-10.
  - 40 queues, one per product, each in one language (``en`` for a third of them):
    ``lang:L>=5 & product:P>=5``, relaxed after 30 s to ``lang:L & product:P`` and after
    90 s to ``lang:L & product:*``; max wait 900 s; the four policies in turn
    (``most-skilled`` queues weight the language 2x).
  - Start: every agent on a call (remaining handle time exponential, mean 180 s) and
    1,000 calls waiting, enqueued over the last 120 s.
  - Churn: Poisson arrivals (rate chosen to keep about 1,000 waiting), ring 3 s, 2 % RONA
    (15 s ring, then 30 s paused), hang-ups after an exponential handle time (mean
    180 s), half of them followed by a 10 s wrap-up, callers abandoning after an
    exponential patience (mean 300 s), relaxation and max-wait timers.
The driver does what the dispatcher does: after every event it calls the router's
method for it, then ``match()`` and ``next_timer()``; it wakes at ``next_timer()`` and
calls ``fire_timers()``. A *decision* is one such event, timed from the first router
call to the return of ``next_timer()``. Matches/s is the number of offers divided by the
total time of all decisions (arrivals, answers and abandons produce no offer but are
counted in the time).

The naive baseline keeps the same state in plain dicts and, on every ``match()``, sorts
all waiting calls by the fairness key and scans all agents for each call, recomputing
each call's requirement from its wait. It is slow (about a tenth of a second per
decision), so it runs only ``--naive-decisions`` decisions from the same start; the
router is timed on the same prefix too, and both must make exactly the same offers.

Memory: a child process holds the router with 2,000 agents and 1,000 waiting calls
(the start state above) plus ctid's call model following 1,000 calls built from a real
capture, as in ``bench/ami_ingest.py``'s ``rss_child``; its VmRSS is the RESULT figure.

Run: ``.venv/bin/python bench/routing.py [--decisions 50000] [--naive-decisions 200]``
"""

from __future__ import annotations

import argparse
import gc
import heapq
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctid.acd.expr import ANY, Expression, parse_expression  # noqa: E402
from ctid.acd.router import Expiry, Offer, Router, RoutingRules  # noqa: E402
from ctid.acd.rules import POLICIES, QueueRules, RelaxStep  # noqa: E402

LANGS = ("en", "es", "zh", "fr", "de", "ar", "pt", "ru", "ja", "hi")
PRODUCTS = tuple(f"p{n:02d}" for n in range(40))
N_AGENTS = 2000
N_WAITING = 1000
AHT_S, RING_S, WRAP_S, WRAP_SHARE = 180.0, 3.0, 10.0, 0.5
RONA_P, RONA_RING_S, PAUSE_S = 0.02, 15.0, 30.0
PATIENCE_S, MAX_WAIT_S = 300.0, 900.0
# Service completions per second at full load, plus the abandons of ~1,000 waiting.
ARRIVAL_RATE = N_AGENTS / (AHT_S + RING_S + WRAP_SHARE * WRAP_S) + N_WAITING / PATIENCE_S
GRID = 2.0**20  # event times on a 2**-20 s grid, so wait arithmetic is exact for both routers


def _q(t: float) -> float:
    return round(t * GRID) / GRID


class RouterLike(Protocol):
    def add_agent(self, agent_id: str, skills: Mapping[str, int], *, max_calls: int = 1,
                  ready: bool = False) -> None: ...
    def set_agent_ready(self, agent_id: str, ready: bool) -> None: ...
    def enqueue(self, call_id: str, rules: RoutingRules, priority: int = 5, *,
                enqueued_at: float | None = None) -> None: ...
    def dequeue(self, call_id: str) -> bool: ...
    def offer_done(self, call_id: str, agent_id: str, answered: bool) -> None: ...
    def call_ended(self, agent_id: str, *, wrapup: bool = True) -> None: ...
    def match(self) -> list[Offer]: ...
    def next_timer(self) -> float | None: ...
    def fire_timers(self, now: float) -> list[Expiry]: ...


# --------------------------------------------------------------------------- the naive baseline


@dataclass
class _NAgent:
    skills: dict[str, int]
    max_calls: int
    ready: bool = False
    calls: int = 0
    offers: set[str] = field(default_factory=set)
    idle_since: float = 0.0
    handled: int = 0
    last_rr: dict[str, int] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.ready and self.calls < self.max_calls


@dataclass
class _NCall:
    rules: RoutingRules
    priority: int
    enqueued_at: float
    head: bool = False
    agent: str | None = None
    excluded: dict[str, float] = field(default_factory=dict)


class NaiveRouter:
    """Same rules as ``Router`` (fairness key, policies, relaxation, RONA, max wait), by
    brute force: every ``match()`` sorts all waiting calls and scans every agent for
    each, until no (call, agent) pair is left. No sticky, no EWT (the bench uses neither)."""

    def __init__(self, clock: Callable[[], float], *, exclude_s: float = 30.0) -> None:
        self.clock = clock
        self.exclude_s = exclude_s
        self.agents: dict[str, _NAgent] = {}
        self.calls: dict[str, _NCall] = {}
        self.rr: dict[str, int] = {}

    def _touch(self, agent: _NAgent, was_available: bool, freed: bool = False) -> None:
        if agent.available and (freed or not was_available):
            agent.idle_since = self.clock()

    def add_agent(self, agent_id: str, skills: Mapping[str, int], *, max_calls: int = 1,
                  ready: bool = False) -> None:
        self.agents[agent_id] = _NAgent(dict(skills), max_calls, idle_since=self.clock())
        self.set_agent_ready(agent_id, ready)

    def set_agent_ready(self, agent_id: str, ready: bool) -> None:
        agent = self.agents[agent_id]
        if agent.ready != ready:
            was = agent.available
            agent.ready = ready
            self._touch(agent, was)

    def enqueue(self, call_id: str, rules: RoutingRules, priority: int = 5, *,
                enqueued_at: float | None = None) -> None:
        self.calls[call_id] = _NCall(rules, priority, self.clock() if enqueued_at is None else enqueued_at)

    def _release(self, call_id: str, call: _NCall) -> None:
        if call.agent is not None:
            agent = self.agents[call.agent]
            was = agent.available
            agent.offers.discard(call_id)
            agent.calls -= 1
            self._touch(agent, was)
            call.agent = None

    def dequeue(self, call_id: str) -> bool:
        call = self.calls.pop(call_id, None)
        if call is None:
            return False
        self._release(call_id, call)
        return True

    def offer_done(self, call_id: str, agent_id: str, answered: bool) -> None:
        agent = self.agents[agent_id]
        if answered:
            agent.offers.discard(call_id)
            agent.handled += 1
            del self.calls[call_id]
            return
        self.set_agent_ready(agent_id, False)
        call = self.calls[call_id]
        self._release(call_id, call)
        call.head = True
        call.excluded[agent_id] = self.clock() + self.exclude_s

    def call_ended(self, agent_id: str, *, wrapup: bool = True) -> None:
        agent = self.agents[agent_id]
        was = agent.available
        agent.calls -= 1
        if wrapup:
            agent.ready = False
        self._touch(agent, was, freed=True)

    @staticmethod
    def _key(call_id: str, call: _NCall) -> tuple[int, int, float, str]:
        return (-call.priority, 0 if call.head else 1, call.enqueued_at, call_id)

    def _policy_key(self, rules: RoutingRules, requirement: Expression, agent_id: str,
                    agent: _NAgent) -> tuple[float, ...]:
        if rules.policy == "longest-idle":
            return (agent.idle_since,)
        if rules.policy == "most-skilled":
            return (-requirement.score(agent.skills, rules.weights), agent.idle_since)
        if rules.policy == "least-occupied":
            return (agent.calls / agent.max_calls, agent.handled, agent.idle_since)
        return (agent.last_rr.get(rules.queue_id, -1), agent.idle_since)

    def match(self) -> list[Offer]:
        now = self.clock()
        offers: list[Offer] = []
        while True:
            waiting = sorted((self._key(cid, c), cid, c) for cid, c in self.calls.items() if c.agent is None)
            found = None
            for _, call_id, call in waiting:  # all calls ...
                requirement = call.rules.requirement_at(now - call.enqueued_at, None, None)
                best: tuple[tuple[float, ...], str] | None = None
                for agent_id, agent in self.agents.items():  # ... x all agents
                    if not agent.available or call.excluded.get(agent_id, -math.inf) > now:
                        continue
                    if requirement.matches(agent.skills):
                        key = (self._policy_key(call.rules, requirement, agent_id, agent), agent_id)
                        if best is None or key < best:
                            best = key
                if best is not None:
                    found = (call_id, call, best[1])
                    break
            if found is None:
                return offers
            call_id, call, agent_id = found
            agent = self.agents[agent_id]
            call.agent = agent_id
            agent.calls += 1
            agent.offers.add(call_id)
            queue_id = call.rules.queue_id
            self.rr[queue_id] = self.rr.get(queue_id, 0) + 1
            agent.last_rr[queue_id] = self.rr[queue_id]
            offers.append(Offer(call_id, agent_id, queue_id, call.priority, call.enqueued_at,
                                now - call.enqueued_at))

    def _deadlines(self, call: _NCall) -> list[tuple[float, int, Literal["overflow", "max_wait"]]]:
        rules, enq = call.rules, call.enqueued_at
        out: list[tuple[float, int, Literal["overflow", "max_wait"]]] = []
        if rules.max_wait_s is not None:
            out.append((enq + rules.max_wait_s, 0, "max_wait"))
        if rules.overflow is not None and rules.overflow.after_s is not None:
            out.append((enq + rules.overflow.after_s, 1, "overflow"))
        return out

    def next_timer(self) -> float | None:
        now = self.clock()
        times: list[float] = []
        for call in self.calls.values():
            if call.agent is not None:
                continue
            boundary = call.rules.next_boundary(now - call.enqueued_at)
            if boundary is not None:
                times.append(call.enqueued_at + boundary)
            times.extend(t for t, _, _ in self._deadlines(call))
            times.extend(t for t in call.excluded.values() if t > now)
        return min(times) if times else None

    def fire_timers(self, now: float) -> list[Expiry]:
        out: list[Expiry] = []
        for call_id, call in list(self.calls.items()):
            due = [d for d in self._deadlines(call) if d[0] <= now] if call.agent is None else []
            if due:
                at, _, reason = min(due)
                del self.calls[call_id]
                out.append(Expiry(call_id, call.rules.queue_id, reason, at, now - call.enqueued_at))
        return sorted(out, key=lambda e: (e.at, e.call_id))


# --------------------------------------------------------------------------- the workload


def build_queues() -> tuple[list[QueueRules], list[float]]:
    queues: list[QueueRules] = []
    for i, product in enumerate(PRODUCTS):
        lang = "en" if i % 3 == 0 else LANGS[i % len(LANGS)]
        policy = POLICIES[i % len(POLICIES)]
        queues.append(QueueRules(
            f"q{i:02d}", "bench", requires=parse_expression(f"lang:{lang}>=5 & product:{product}>=5"),
            policy=policy, weights={f"lang:{lang}": 2.0} if policy == "most-skilled" else {},
            relax=(RelaxStep(30.0, parse_expression(f"lang:{lang} & product:{product}")),
                   RelaxStep(90.0, parse_expression(f"lang:{lang} & product:*"))),
            max_wait_s=MAX_WAIT_S))
    weights = [1.0 / (1 + i % 10) ** 0.5 for i in range(len(queues))]  # mildly skewed demand
    return queues, weights


def build_agents(rng: random.Random) -> dict[str, dict[str, int]]:
    agents: dict[str, dict[str, int]] = {}
    for n in range(N_AGENTS):
        langs = ["en"] if rng.random() < 0.6 else [rng.choice(LANGS[1:])]
        if rng.random() < 0.3:
            langs.append(rng.choice(LANGS))
        skills = {f"lang:{lang}": rng.randint(3, 10) for lang in langs}
        skills.update({f"product:{p}": rng.randint(1, 10) for p in rng.sample(PRODUCTS, rng.randint(4, 8))})
        agents[f"agent{n:04d}"] = skills
    return agents


SEED_RULES = QueueRules("seed", "bench", requires=ANY)  # calls already in progress at the start


@dataclass
class Run:
    durations: list[float] = field(default_factory=list)  # seconds per decision
    offering: list[float] = field(default_factory=list)  # seconds per decision that made an offer
    offers: list[tuple[float, str, str]] = field(default_factory=list)
    n_offers: int = 0
    depths: list[int] = field(default_factory=list)


class Simulation:
    """The event-driven dispatcher loop, around any router with ``Router``'s methods."""

    def __init__(self, make_router: Callable[[Callable[[], float]], RouterLike], seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.router = make_router(lambda: self.now)
        self.queues, self.weights = build_queues()
        self.skills = build_agents(random.Random(seed + 1))
        self.events: list[tuple[float, int, str, str, str]] = []
        self.seq = 0
        self.waiting: set[str] = set()
        self.calls = 0
        self.timer: float | None = None

    def push(self, at: float, kind: str, a: str = "", b: str = "") -> None:
        self.seq += 1
        heapq.heappush(self.events, (_q(at), self.seq, kind, a, b))

    def setup(self) -> None:
        """Every agent on a call, 1,000 calls waiting (not timed)."""
        router, rng = self.router, self.rng
        self.now = 200.0
        for agent_id, skills in self.skills.items():
            router.add_agent(agent_id, skills, ready=True)
        for n in range(len(self.skills)):
            router.enqueue(f"seed{n:04d}", SEED_RULES)
            for offer in router.match():
                router.offer_done(offer.call_id, offer.agent_id, answered=True)
                self.push(self.now + rng.expovariate(1 / AHT_S), "hangup", offer.call_id, offer.agent_id)
        for _ in range(N_WAITING):
            call_id = self._new_call_id()
            router.enqueue(call_id, self._pick_queue(), enqueued_at=_q(self.now - rng.uniform(0, 120)))
            self.waiting.add(call_id)
            self.push(self.now + rng.expovariate(1 / PATIENCE_S), "abandon", call_id)
        self.push(self.now + rng.expovariate(ARRIVAL_RATE), "arrival")
        self._after(router.match(), [])
        self.timer = router.next_timer()

    def _new_call_id(self) -> str:
        self.calls += 1
        return f"call{self.calls:07d}"

    def _pick_queue(self) -> QueueRules:
        return self.rng.choices(self.queues, self.weights)[0]

    def _after(self, offers: list[Offer], expiries: list[Expiry]) -> None:
        for expiry in expiries:
            self.waiting.discard(expiry.call_id)
        for offer in offers:
            self.waiting.discard(offer.call_id)
            if self.rng.random() < RONA_P:
                self.push(self.now + RONA_RING_S, "rona", offer.call_id, offer.agent_id)
            else:
                self.push(self.now + RING_S, "answer", offer.call_id, offer.agent_id)

    def run(self, decisions: int, record: bool = False) -> Run:
        out = Run()
        router, rng, clock = self.router, self.rng, time.perf_counter
        while len(out.durations) < decisions:
            at = self.events[0][0]
            expiries: list[Expiry] = []
            if self.timer is not None and self.timer <= at:
                kind = "timer"
                self.now = max(self.now, self.timer)
                t0 = clock()
                expiries = router.fire_timers(self.now)
            else:
                at, _, kind, a, b = heapq.heappop(self.events)
                self.now = at
                if kind == "abandon" and a not in self.waiting:
                    continue  # already answered or gone: no event for the router
                t0 = clock()
                if kind == "arrival":
                    call_id = self._new_call_id()
                    router.enqueue(call_id, self._pick_queue())
                elif kind == "abandon":
                    router.dequeue(a)
                elif kind == "answer":
                    router.offer_done(a, b, answered=True)
                elif kind == "rona":
                    router.offer_done(a, b, answered=False)
                elif kind == "hangup":
                    wrap = rng.random() < WRAP_SHARE
                    router.call_ended(b, wrapup=wrap)
                elif kind == "ready":
                    router.set_agent_ready(b, True)
            offers = router.match()
            self.timer = router.next_timer()
            elapsed = clock() - t0
            out.durations.append(elapsed)
            if offers:
                out.offering.append(elapsed)
            # Bookkeeping outside the timed section.
            if kind == "arrival":
                self.waiting.add(call_id)
                self.push(self.now + rng.expovariate(1 / PATIENCE_S), "abandon", call_id)
                self.push(self.now + rng.expovariate(ARRIVAL_RATE), "arrival")
            elif kind == "answer":
                self.push(self.now + rng.expovariate(1 / AHT_S), "hangup", a, b)
            elif kind == "rona":
                self.waiting.add(a)
                self.push(self.now + PAUSE_S, "ready", "", b)
            elif kind == "hangup" and wrap:
                self.push(self.now + WRAP_S, "ready", "", b)
            elif kind == "abandon":
                self.waiting.discard(a)
            self._after(offers, expiries)
            out.n_offers += len(offers)
            out.depths.append(len(self.waiting))
            if record:
                out.offers.extend((self.now, o.call_id, o.agent_id) for o in offers)
        return out


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def _describe(label: str, run: Run) -> tuple[float, float, float]:
    total = sum(run.durations)
    p50, p99 = _pct(run.durations, 50) * 1e3, _pct(run.durations, 99) * 1e3
    rate = run.n_offers / total
    print(f"  {label}: {len(run.durations)} decisions, {run.n_offers} offers; p50 {p50:.3f} ms, "
          f"p99 {p99:.3f} ms, max {max(run.durations) * 1e3:.3f} ms; {len(run.durations) / total:,.0f} "
          f"decisions/s, {rate:,.0f} matches/s; waiting calls {min(run.depths)}..{max(run.depths)}")
    if run.offering:
        print(f"    decisions that made an offer: p50 {_pct(run.offering, 50) * 1e3:.3f} ms, "
              f"p99 {_pct(run.offering, 99) * 1e3:.3f} ms")
    return p50, p99, rate


# --------------------------------------------------------------------------- memory


def rss_child() -> None:
    """Router with 2,000 agents and 1,000 waiting calls, plus ctid's call model following
    1,000 calls (as ``bench/ami_ingest.py``'s ``rss_child``); print the counts and VmRSS."""
    sys.path.insert(0, str(ROOT / "bench"))
    import ami_ingest

    from ctid.asterisk.ami_protocol import AMIParser, Message
    from ctid.calls import CallModel

    sim = Simulation(Router)
    sim.setup()
    lifecycle, _ = ami_ingest._templates(None)
    cut = next(i for i, b in enumerate(lifecycle) if b.startswith(b"Event: HangupRequest"))
    parser = AMIParser()
    model = CallModel(ami_ingest._clock)
    parser.feed(b"Asterisk Call Manager/11.0.0\r\n")
    for call in range(N_WAITING):
        chunk = b"".join(ami_ingest._rename(b, call) + b"\r\n\r\n" for b in lifecycle[:cut])
        for item in parser.feed(chunk):
            if type(item) is Message:
                model.feed(item)
    gc.collect()
    rss_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    router = sim.router
    assert isinstance(router, Router)
    print(f"{len(sim.skills)} {sum(router.depth(q.queue_id) for q in sim.queues)} {len(model.calls)} "
          f"{rss_kb / 1024:.1f}")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decisions", type=int, default=50_000)
    ap.add_argument("--warmup", type=int, default=5_000)
    ap.add_argument("--naive-decisions", type=int, default=200)
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child()
        return

    print(f"workload: {N_AGENTS} agents, {len(LANGS) + len(PRODUCTS)} skills, {len(PRODUCTS)} queues, "
          f"{N_WAITING} calls waiting at the start, arrivals {ARRIVAL_RATE:.1f}/s")
    gc.collect()
    sim = Simulation(Router)
    sim.setup()
    sim.run(args.warmup)
    main_run = sim.run(args.decisions)
    print(f"ctid router, after {args.warmup} warm-up decisions:")
    _, p99, rate = _describe("router", main_run)

    n = args.naive_decisions
    print(f"same start, first {n} decisions, ctid router vs naive calls x agents scan "
          f"(bounded to {n} decisions: each naive decision scans ~{N_WAITING} x {N_AGENTS} pairs):")
    prefix_sim = Simulation(Router)
    prefix_sim.setup()
    prefix = prefix_sim.run(n, record=True)
    r50, _, r_rate = _describe("router", prefix)
    naive_sim = Simulation(NaiveRouter)
    naive_sim.setup()
    naive = naive_sim.run(n, record=True)
    n50, _, n_rate = _describe("naive ", naive)
    same = prefix.offers == naive.offers
    print(f"  same offers in both: {'yes' if same else 'NO'} ({len(prefix.offers)} offers); "
          f"router/naive: p50 {n50 / r50:,.0f}x faster, matches/s {r_rate / max(n_rate, 1e-9):,.0f}x")

    out = subprocess.run([sys.executable, __file__, "--rss-child"], capture_output=True, text=True,
                         check=True, timeout=600).stdout.split()
    agents, calls, model_calls, rss = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    print(f"RSS of a process holding the router ({agents} agents, {calls} waiting calls) and the call "
          f"model ({model_calls} calls): {rss:.1f} MB")
    print(f"RESULT rss_1000_calls_2000_agents_mb value={rss:.1f} unit=MB target=<=250 "
          f"status={'met' if rss <= 250 else 'missed'}")
    print(f"RESULT routing_p99_ms value={p99:.3f} unit=ms target=<=1 status={'met' if p99 <= 1 else 'missed'}")
    print(f"RESULT routing_matches_per_s value={rate:.0f} unit=1/s target=>=5000 "
          f"status={'met' if rate >= 5000 and same else 'missed'}")


if __name__ == "__main__":
    main()
