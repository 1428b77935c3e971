"""Simulated time for the Asterisk simulator.

Everything in the simulator that "takes time" in a real Asterisk (ring timeouts,
``Wait()``, ``MusicOnHold`` durations, prompt lengths, queue retry pauses) goes through
one :class:`SimClock`. ``time_scale`` maps simulated seconds to real seconds: with
``time_scale=0.01`` a ``Wait(30)`` takes 0.3 s of wall time, so tests with ring timeouts
run fast without sleeping in real time. ``now()`` returns the *simulated* epoch, which
advances ``1 / time_scale`` times faster than the wall clock, so durations reported in
events (``HoldTime``, ``RingTime``, ``TalkTime``) stay in simulated seconds.

The epoch starts at ``start_epoch`` (defaults to the wall clock) so Uniqueids look like
the captures' ``<epoch>.<seq>``.
"""

from __future__ import annotations

import asyncio
import time


class SimClock:
    """Injectable clock: ``now()`` in simulated seconds, ``sleep()`` scaled."""

    def __init__(self, time_scale: float = 1.0, start_epoch: float | None = None) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.time_scale = time_scale
        self._t0_real = time.monotonic()
        self._t0_sim = time.time() if start_epoch is None else start_epoch

    def now(self) -> float:
        """Simulated epoch seconds."""
        return self._t0_sim + (time.monotonic() - self._t0_real) / self.time_scale

    def real(self, sim_seconds: float) -> float:
        """Wall-clock seconds that ``sim_seconds`` of simulated time take."""
        return max(0.0, sim_seconds) * self.time_scale

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(self.real(sim_seconds))
