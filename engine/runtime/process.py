"""What every engine process does first: pin itself, and leave signals to the supervisor."""

from __future__ import annotations

import ctypes
import os
import platform
import select
import signal
import struct
import time

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


def wait_until_ready(ready, fds: list[int], timeout_ns: int) -> bool:
    """Sleep until ``ready()`` or ``timeout_ns`` passed; True when ready. Selects on
    ``fds`` (ZeroMQ sockets' ZMQ_FDs: sub-millisecond, unlike ``zmq_poll``, and
    edge-triggered, hence ``ready()`` again after every wake-up); consumes nothing."""
    deadline = time.monotonic_ns() + timeout_ns
    while not ready():
        left = deadline - time.monotonic_ns()
        if left <= 0:
            return False
        select.select(fds, [], [], left / 1e9)
    return True


def send_event(sock: zmq.Socket, seq, fields: dict) -> bool:
    """One ENGINE_EVENT (``fields``, numbered by the Sequencer ``seq``) on an engine
    process's events PUSH to the liquidation gateway's relay, never waiting: False when
    the queue is full (the caller counts the drop)."""
    from feeds.protocol import MsgType
    try:
        sock.send(seq.encode(MsgType.ENGINE_EVENT, fields), zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


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


# sched_setattr(2) and sched_getattr(2) (no libc wrapper, no os.* function): syscall numbers
_SCHED_ATTR_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
_SCHED_ATTR = struct.Struct("IIQiIQQQ")       # struct sched_attr, SCHED_ATTR_SIZE_VER0 (48)
SCHED_OTHER, SCHED_BATCH = 0, 3
SHORT_SLICE_NS = 100_000


def short_slices(slice_ns: int = SHORT_SLICE_NS) -> int:
    """Give every thread of this process (its ZeroMQ I/O threads included) a scheduler
    slice of ``slice_ns`` instead of the kernel's default (1.4 ms here); return how many
    threads took it.

    Linux >= 6.12 (EEVDF) reads ``sched_attr.sched_runtime`` of a normal thread as its
    slice, 0.1 to 100 ms, settable without privileges: a thread runs at most that long
    before a runnable peer with an earlier deadline takes the CPU, and a waking thread
    with a shorter slice preempts the running one. With the default, a worker busy in
    its holders' pass held its CPU for up to a slice while its own I/O thread waited to
    put the tick's orders on the wire (orders sent -> received p99 728 us on 2 cores;
    docs/architecture.md has the A/B). Older kernels accept and ignore the field (0 is
    returned there too: nothing to detect); another OS or architecture: 0, nothing done.
    Nice value, policy and flags are kept; real-time threads are left alone.
    """
    nums = _SCHED_ATTR_SYSCALLS.get(platform.machine())
    if nums is None or not os.path.isdir("/proc/self/task"):
        return 0
    set_nr, get_nr = nums
    libc = ctypes.CDLL(None, use_errno=True)
    done = 0
    for tid in os.listdir("/proc/self/task"):
        buf = ctypes.create_string_buffer(_SCHED_ATTR.size)
        if libc.syscall(get_nr, int(tid), buf, _SCHED_ATTR.size, 0) != 0:
            continue                              # the thread ended meanwhile
        _size, policy, flags, nice, prio, *_ = _SCHED_ATTR.unpack(buf.raw)
        if policy not in (SCHED_OTHER, SCHED_BATCH):
            continue
        new = ctypes.create_string_buffer(_SCHED_ATTR.pack(_SCHED_ATTR.size, policy, flags, nice,
                                                           prio, int(slice_ns), 0, 0))
        if libc.syscall(set_nr, int(tid), new, 0) == 0:
            done += 1
    return done
