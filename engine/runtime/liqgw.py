"""Liquidation-order gateway: the engine's one outbound order stream, and its events.

Workers PUSH liquidation orders to an internal ipc PULL; this process forwards them to
the matching engine on the external PUSH endpoint (unless ``orders_via_gateway`` is
off: then the workers connect to the matching engine's PULL themselves, one hop less),
and forwards ENGINE_EVENTs from
every engine process (internal PULL) to the external PUB. Both forwards are libzmq's
``zmq.proxy`` loops (C, no Python per message), one thread each; a capture socket on
the order stream counts what went out.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import zmq

from engine.runtime import process
from engine.runtime.ctl import Control, Role


def _proxy(ctx: zmq.Context, front_ep: str, back_ep: str, back_kind: int, stop_ep: str) -> threading.Thread:
    def run():
        front = ctx.socket(zmq.PULL)
        front.setsockopt(zmq.LINGER, 0)
        front.setsockopt(zmq.RCVHWM, 100_000)
        front.bind(front_ep)
        back = ctx.socket(back_kind)
        back.setsockopt(zmq.LINGER, 1000)
        back.setsockopt(zmq.SNDHWM, 100_000)
        back.bind(back_ep)
        ctrl = ctx.socket(zmq.SUB)
        ctrl.setsockopt(zmq.SUBSCRIBE, b"")
        ctrl.connect(stop_ep)
        try:
            zmq.proxy_steerable(front, back, None, ctrl)
        except zmq.ContextTerminated:
            pass
        finally:
            for s in (front, back, ctrl):
                s.close(0)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engine.runtime.liqgw")
    ap.add_argument("--name", required=True)
    ap.add_argument("--orders-in", default=None, help="omit when workers send orders directly")
    ap.add_argument("--orders-out", default=None)
    ap.add_argument("--events-in", required=True)
    ap.add_argument("--events-out", required=True)
    ap.add_argument("--cpu", type=int, default=-1)
    a = ap.parse_args(argv)
    process.enter(a.cpu)
    ctl = Control.attach(a.name + "-ctl")
    ctx = process.zmq_context()
    stop_ep = f"inproc://stop-{a.name}"
    stop = ctx.socket(zmq.PUB)
    stop.bind(stop_ep)
    threads = [_proxy(ctx, a.events_in, a.events_out, zmq.PUB, stop_ep)]
    if a.orders_in:
        threads.append(_proxy(ctx, a.orders_in, a.orders_out, zmq.PUSH, stop_ep))
    time.sleep(0.05)               # let the proxy threads bind
    process.short_slices()         # the proxy and I/O threads exist now
    ctl.mark_ready(Role.LIQGW)
    while not ctl.shutdown:
        time.sleep(0.05)
    time.sleep(0.3)                 # workers drain and send their last orders first
    stop.send(b"TERMINATE")
    for t in threads:
        t.join(timeout=3)
    stop.close(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
