"""What every engine process does first: pin itself, and leave signals to the supervisor."""

from __future__ import annotations

import os
import signal

import zmq

_ALLOWED_CPUS: set[int] | None = None     # this process's CPUs before ``enter`` pinned it
_IO_CPUS_SET = False


def enter(cpu: int = -1) -> None:
    """Pin this process to ``cpu`` (``-1``: leave it to the scheduler) and ignore SIGTERM and
    SIGINT: the supervisor stops its children through the control segment's shutdown flag,
    so that intake stops and the rings drain in order (a Ctrl-C reaches the whole process
    group, not only the supervisor)."""
    global _ALLOWED_CPUS
    if cpu >= 0:
        _ALLOWED_CPUS = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def zmq_context() -> zmq.Context:
    """The process's ZeroMQ context, its I/O thread free to run on every CPU the process
    had before ``enter`` pinned it (``ZMQ_THREAD_AFFINITY_CPU_ADD``, libzmq >= 4.3).

    The I/O thread starts with the first socket and would inherit the pin: then a
    worker's own work on its CPU delays the I/O of the socket it waits on and of the
    orders it sends (the thread moves a tick from TCP into the socket, and an order back
    out). Unpinned, the thread takes whichever CPU is free."""
    global _IO_CPUS_SET
    ctx = zmq.Context.instance()
    if _ALLOWED_CPUS is not None and len(_ALLOWED_CPUS) > 1 and not _IO_CPUS_SET:
        for c in sorted(_ALLOWED_CPUS):
            ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, c)
        _IO_CPUS_SET = True
    return ctx
