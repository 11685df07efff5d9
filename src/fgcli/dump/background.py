"""Decoding and writing as background work: below the compute threads' CPU priority.

DataLoader workers and writer threads share the cores with the engine's threads. An
intra-op parallel region ends only when its slowest thread does, so a decoder or encoder
that takes a core from one compute thread for a time slice stalls all of them. Raising
the background threads' nice value lets the scheduler hand a core back to a compute
thread as soon as it wakes; the background work then runs in the gaps (the engine's
serial Python, its waits), and on a machine with idle cores nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import threading

BACKGROUND_NICE = 10  # added to the thread's nice value (Linux: nice is per thread)


def lower_priority(_worker_id: int = 0) -> None:
    """Raise the calling thread's nice value by :data:`BACKGROUND_NICE` (at most 19);
    a no-op where the platform has no per-thread priorities or refuses."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, max(current, current + BACKGROUND_NICE)))
