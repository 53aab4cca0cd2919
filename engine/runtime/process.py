"""What every engine process does first: pin itself, and leave signals to the supervisor."""

from __future__ import annotations

import os
import signal


def enter(cpu: int = -1) -> None:
    """Pin this process to ``cpu`` (``-1``: leave it to the scheduler) and ignore SIGTERM and
    SIGINT: the supervisor stops its children through the control segment's shutdown flag,
    so that intake stops and the rings drain in order (a Ctrl-C reaches the whole process
    group, not only the supervisor)."""
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
