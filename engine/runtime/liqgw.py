"""Liquidation-order gateway: the engine's one outbound order stream, and its events.

Workers PUSH liquidation orders to an internal ipc PULL; this process forwards them to
the matching engine on the external PUSH endpoint (unless ``orders_via_gateway`` is
off: then the workers connect to the matching engine's PULL themselves, one hop less):
libzmq's ``zmq.proxy`` loop (C, no Python per message) in a thread.

ENGINE_EVENTs from every engine process (internal PULL) go out on the external PUB as
one stream (docs/protocol.md section 3): each is renumbered here (``seq``, from the
microsecond clock at start, like the order streams across restarts; ``ts_ns`` when
sent), so a subscriber's gap in ``seq`` means it missed events. Events are a few per
liquidation, not the hot path: a Python loop in a thread renumbers them.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import zmq

from engine.runtime import curve, process
from engine.runtime.ctl import Control, Role
from feeds.protocol import restamp

EVENTS_PER_WAKE = 256              # events renumbered per wake-up before the stop socket is looked at


def _sockets(ctx: zmq.Context, front_ep: str, back_ep: str, back_kind: int,
             stop_ep: str) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket]:
    """A forward's sockets: the internal PULL it binds at ``front_ep``, the external
    ``back_kind`` socket it binds at ``back_ep``, and a SUB on ``stop_ep`` (its stop)."""
    front = ctx.socket(zmq.PULL)
    front.setsockopt(zmq.LINGER, 0)
    front.setsockopt(zmq.RCVHWM, 100_000)
    front.bind(front_ep)
    back = ctx.socket(back_kind)
    back.setsockopt(zmq.LINGER, 1000)
    back.setsockopt(zmq.SNDHWM, 100_000)
    curve.bind(back, back_ep, "events" if back_kind == zmq.PUB else "orders")    # CURVE over tcp, when set
    ctrl = ctx.socket(zmq.SUB)
    ctrl.setsockopt(zmq.SUBSCRIBE, b"")
    ctrl.connect(stop_ep)
    return front, back, ctrl


def _in_thread(forward, ctx: zmq.Context, front_ep: str, back_ep: str, back_kind: int,
               stop_ep: str) -> threading.Thread:
    """Run ``forward(front, back, ctrl)`` in a daemon thread on its own sockets, closed
    when it returns (a stop, or the context terminated). The sockets are bound here, in
    the caller's thread: an endpoint that cannot be bound (in use, no such address) is an
    exception before the process says it is ready, not a thread dying in silence while
    the orders it should carry pile up."""
    socks = _sockets(ctx, front_ep, back_ep, back_kind, stop_ep)

    def run():
        try:
            forward(*socks)
        except zmq.ContextTerminated:
            pass
        finally:
            for sock in socks:
                sock.close(0)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _proxy(front: zmq.Socket, back: zmq.Socket, ctrl: zmq.Socket) -> None:
    """The orders' forward: libzmq's proxy, until TERMINATE on ``ctrl``."""
    try:
        zmq.proxy_steerable(front, back, None, ctrl)
    except zmq.ZMQError as e:      # libzmq 4.3.5's steerable proxy ends on TERMINATE with
        if e.errno != zmq.ENOTSUP:  # ENOTSUP (its re-added stub; pyzmq PR #1894): a stop
            raise


def _events_relay(first_seq: int):
    """The events' forward: every frame from the engine processes (``front``) out on the
    PUB (``back``) as one stream numbered ``first_seq, first_seq + 1, ...``
    (``feeds.protocol.restamp``), until anything arrives on ``ctrl``. A frame that is not
    a message (none should come) is dropped without a number."""
    def forward(front: zmq.Socket, back: zmq.Socket, ctrl: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(ctrl, zmq.POLLIN)
        seq = first_seq
        while ctrl not in dict(poller.poll()):
            for _ in range(EVENTS_PER_WAKE):
                try:
                    frame = front.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                out = restamp(frame, seq, time.time_ns())
                if out is not None:
                    back.send(out)            # PUB: never blocks (drops for a slow subscriber)
                    seq += 1
    return forward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engine.runtime.liqgw")
    ap.add_argument("--name", required=True)
    ap.add_argument("--orders-in", default=None, help="omit when workers send orders directly")
    ap.add_argument("--orders-out", default=None)
    ap.add_argument("--events-in", required=True)
    ap.add_argument("--events-out", required=True)
    ap.add_argument("--cpu", type=int, default=-1)
    curve.add_args(ap)
    a = ap.parse_args(argv)
    process.enter(a.cpu)
    curve.install(a)
    ctl = Control.attach(a.name + "-ctl")
    ctx = process.zmq_context()
    stop_ep = f"inproc://stop-{a.name}"
    stop = ctx.socket(zmq.PUB)
    stop.bind(stop_ep)
    threads = [_in_thread(_events_relay(time.time_ns() // 1000), ctx, a.events_in, a.events_out,
                          zmq.PUB, stop_ep)]
    if a.orders_in:
        threads.append(_in_thread(_proxy, ctx, a.orders_in, a.orders_out, zmq.PUSH, stop_ep))
    time.sleep(0.05)               # let the forwarding threads start
    process.short_slices()         # the proxy and I/O threads exist now
    ctl.mark_ready(Role.LIQGW)
    while not ctl.shutdown:
        time.sleep(0.05)
    time.sleep(0.3)                 # workers drain and send their last orders first
    stop.send(b"TERMINATE")
    for t in threads:
        t.join(timeout=3)
    stop.close(0)
    curve.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
