"""The fills gateway's C route (``_wire.route_fills``) against its Python reference route.

A real store and control segment (POSIX shared memory), a real Gateway object (its
sockets bound on ipc endpoints in a temporary directory, no traffic): the same fills,
accepted and rejected mixed, go once through each route; the ring records pushed and the
reject events (codes, in order) must be identical. A ring filled to capacity makes the C
route stop and resume without losing or repeating a leg.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.runtime import gateway as G
from engine.runtime.ctl import Control
from feeds.protocol import Message, MsgType, SequenceTracker, decode, encode, encode_batch
from runtime_support import close_gateway, gateway_state

N_ACCOUNTS = 6                     # ids 1..6 over 2 partitions; id 77 is unknown


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gw"))
    cfg, store, ctl, ep = gateway_state(root, 2, list(range(1, N_ACCOUNTS + 1)))
    e = cfg.engine
    ctx = zmq.Context()
    sub = ctx.socket(zmq.PULL)                        # the events the gateway emits, for real
    sub.setsockopt(zmq.LINGER, 0)
    sub.bind(ep["events"])
    g = G.Gateway(e.name, ep["fills"], ep["checks"], ep["replies"], ep["events"],
                  root, 1, [0, 1])
    yield g, ctl, GatewayEvents(g, sub)
    close_gateway(g, ctl, store)
    sub.close(0)
    ctx.term()


class GatewayEvents:
    """The ENGINE_EVENTs a Gateway sent on its events socket, read off a PULL bound here:
    ``take()`` returns ``(code, detail)`` of every one sent since the last call (how many,
    the gateway's own event numbering says)."""

    def __init__(self, g, sock):
        self.g, self.sock, self.seen = g, sock, g.seq_events.last

    def take(self) -> list[tuple[int, str]]:
        out = []
        while self.seen < self.g.seq_events.last:
            assert self.sock.poll(5000), "an event the gateway sent did not arrive"
            m = decode(self.sock.recv())
            assert type(m) is Message and m.type == MsgType.ENGINE_EVENT, m
            out.append((int(m.fields["code"]), m.fields["detail"]))
            self.seen += 1
        return out


def drain(ctl: Control) -> list[tuple]:
    """Every record waiting in every ring, in ring order; the rings left empty."""
    out = []
    for p in range(ctl.n_partitions):
        r, w = (int(x) for x in ctl.rings[p][0][["read_idx", "write_idx"]])
        for i in range(r, w):
            out.append((p, *ctl.records[p][i % ctl.capacity].tolist()))
        ctl.rings[p][0]["read_idx"] = w
    return out


accounts = st.sampled_from([1, 2, 3, 4, 5, 6, 77])
fill_dicts = st.fixed_dictionaries({
    "trade_id": st.integers(0, 2**40), "instrument_id": st.sampled_from([0, 1, 2, 99]),
    "maker_account": accounts, "taker_account": accounts,
    "qty_units": st.sampled_from([0, 1, -1, 500, -7_000_000]), "price_units": st.sampled_from([0, -5, 1, 950_000]),
    "maker_fee_units": st.integers(-100, 100), "taker_fee_units": st.integers(-100, 100)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(fill_dicts, min_size=1, max_size=30), st.integers(0, 5), st.booleans())
def test_c_route_pushes_and_rejects_exactly_like_the_reference(gw, fills, skip, batch):
    # The same fills once through the reference router, once as a FILL/BATCH frame through
    # the C path (parse, take after the first ``skip`` -- already seen by sequence number
    # -- journal, route): identical ring records, identical reject events in order.
    g, ctl, events = gw
    if not batch:
        fills = fills[:1]
    skip = min(skip, len(fills) - 1)
    for f in fills:
        f["taker_side"] = "buy" if f["qty_units"] >= 0 else "sell"
    tracker = g.trackers.setdefault(None, SequenceTracker())
    seq0 = tracker.last + 1
    drain(ctl)
    events.take()
    g._route_reference(fills[skip:], seq0 + skip, 123)
    want, want_events = drain(ctl), events.take()
    assert len(want) + 2 * len(want_events) == 2 * (len(fills) - skip)   # every fill: 2 legs or 1 reject
    tracker.last = seq0 + skip - 1
    frame = (encode_batch(int(MsgType.FILL), fills, first_seq=seq0, ts_ns=1) if batch
             else encode(MsgType.FILL, fills[0], seq=seq0, ts_ns=1))
    g.on_fills(frame, 123)
    assert drain(ctl) == want
    assert events.take() == want_events
    assert tracker.last == seq0 + len(fills) - 1


def test_c_route_resumes_after_a_full_ring(gw):
    # 40 fills between accounts 1 (partition 1) and 2 (partition 0): 40 legs per ring of
    # 64 records, twice over -> the second call finds the rings full part way and waits;
    # a consumer thread frees them. Every leg arrives once, in order.
    import threading
    import time

    g, ctl, events = gw
    drain(ctl)
    got: list[tuple] = []
    stop = threading.Event()

    def consumer():
        while not stop.is_set():
            got.extend(drain(ctl))
            time.sleep(0.001)

    n = 80
    fills = [{"trade_id": k, "instrument_id": 0, "maker_account": 2, "taker_account": 1,
              "qty_units": 1 + k, "price_units": 950_000, "maker_fee_units": 0, "taker_fee_units": 0,
              "taker_side": "buy"} for k in range(n)]
    g.trackers[None] = SequenceTracker(999)
    waits0 = g.counters["ring_full_waits"]
    t = threading.Thread(target=consumer)
    t.start()
    try:
        g.on_fills(encode_batch(int(MsgType.FILL), fills, first_seq=1000, ts_ns=1), 5)
    finally:
        stop.set()
        t.join(5)
    got.extend(drain(ctl))
    assert g.counters["ring_full_waits"] > waits0          # it did wait
    refs = sorted((r[0], r[7], r[4]) for r in got)          # (partition, seq, delta)
    # taker 1 is in partition 1 (+qty), maker 2 in partition 0 (-qty); seq = 1000 + k
    assert refs == sorted([(1, 1000 + k, 1 + k) for k in range(n)] + [(0, 1000 + k, -(1 + k)) for k in range(n)])
