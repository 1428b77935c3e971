"""What the benchmarks' child processes share: dying with the bench.

The benches run their simulator, receivers and client fleets as child processes
(``python bench/<script>.py``, so this directory is on ``sys.path`` and ``import
children`` works from each of them)."""

from __future__ import annotations

import contextlib
import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGKILL when the parent dies, so a crashed bench leaves no child behind."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
