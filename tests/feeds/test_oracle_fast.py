"""The mark-price C fast path (``engine._wire.OracleFast``) held to its reference.

``OracleFast.on_frame`` may take an ORACLE_TICK only when ``MarkPriceCalculator``
(feeds/oracle/index.py) would change nothing but that venue's quote and the mark (no
exclusion, no freeze, no event); then it publishes ``index + clamp(basis)`` itself.
Everything else must answer TICK_FALLBACK with its state, the price row, the counters and
the queue untouched. Checked on hand-computed values, on one frame per way of falling back,
by a hypothesis comparison against a reference fed every tick directly (driven the way
``engine.runtime.markprice.MarkPriceProcess`` drives it: settle, decide, sync), and once
through ``MarkPriceProcess.fold`` itself.
"""

from __future__ import annotations

import contextlib
import random
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import _shm, _wire
from engine.codes import Code
from engine.store import layout as L
from feeds.oracle.index import MarkPriceCalculator, OracleParams
from feeds.protocol import MsgType, Rejected, Sequencer, decode

S, MS = 1_000_000_000, 1_000_000
T0 = 1_700_000_000 * S
P = OracleParams(staleness_ns=5 * S, quorum=2, max_deviation=0.05, max_basis=0.005)
NAMES = ["BTC-PERP", "ETH-PERP"]
BASE = [30_000.0, 100.0]
FALLBACK, TAKEN, PUBLISHED = _wire.TICK_FALLBACK, _wire.TICK_TAKEN, _wire.TICK_PUBLISHED


class Rig:
    """An OracleFast over a private price table plus the driven reference, as MarkPriceProcess
    wires them (the reference's own marks are published into the row like ``publish``)."""

    def __init__(self, n_bells: int = 2):
        self.prices = np.zeros(len(NAMES), L.PRICE)
        self.gseq = np.zeros(1, np.uint64)
        self.bells = np.zeros(2 * n_bells, np.uint32)             # (counter, waiters) each
        self.fast = _wire.OracleFast(self.prices.ctypes.data, self.gseq.ctypes.data, NAMES,
                                     [self.bells.ctypes.data + 8 * k for k in range(n_bells)],
                                     P.staleness_ns, P.quorum, P.max_deviation, P.max_basis,
                                     P.max_future_skew_ns)
        self.calc = MarkPriceCalculator(P)
        self.seq = Sequencer()

    def frame(self, venue, name, price, vts, ts=T0):
        return self.seq.encode(MsgType.ORACLE_TICK, {"venue": venue, "instrument": name, "price": price,
                                                     "venue_ts_ns": vts}, ts_ns=ts)

    def settle(self):
        """Fold the C-taken ticks in: the reference must accept each, silently, at C's mark."""
        for i, venue, price, vts, recv, _seq, mark in self.fast.take_applied():
            assert self.calc.on_tick(NAMES[i], venue, price, vts, recv) == (Code.OK, [])
            if mark is not None:
                assert self.calc.state(NAMES[i], recv).mark == mark

    def sync(self, name):
        self.fast.sync(NAMES.index(name), *self.calc.export(name))

    def publish(self, name, now, seq=0):
        i, s = NAMES.index(name), self.calc.state(name, now)
        row = self.prices[i:i + 1]
        if s.mark is None or (s.frozen and row["flags"][0]) or \
                (not s.frozen and row["mark"][0] == s.mark and not row["flags"][0]):
            return
        row["mark"], row["index"], row["ts_ns"], row["tick_seq"] = s.mark, s.index or s.mark, now, seq
        row["flags"], row["price_seq"] = int(s.frozen), row["price_seq"] + 1

    def feed(self, frame, recv):
        """One frame as ``fold`` takes it: (C's answer, the reference's code, its events)."""
        r = self.fast.on_frame(frame, recv)
        if r != FALLBACK:
            return r, Code.OK, []
        self.settle()
        m = decode(frame)
        if type(m) is Rejected or m.type != MsgType.ORACLE_TICK or m.fields["instrument"] not in NAMES:
            return r, None, []
        f = m.fields
        code, events = self.calc.on_tick(f["instrument"], f["venue"], f["price"], f["venue_ts_ns"], recv)
        if code == Code.OK:
            self.sync(f["instrument"])
            self.publish(f["instrument"], recv, m.seq)
        return r, code, events

    def tick(self, venue, name, price, vts, recv):
        return self.feed(self.frame(venue, name, price, vts, recv), recv)


def test_known_values_take_and_publish():
    rig, B = Rig(), "BTC-PERP"
    # no state yet, then one venue (frozen None: never live) -> both fall back to the reference
    assert rig.tick("a", B, 100.0, T0, T0)[:2] == (FALLBACK, Code.OK)
    assert rig.tick("b", B, 101.0, T0, T0 + MS)[:2] == (FALLBACK, Code.OK)    # live: 100.5
    assert rig.tick("c", B, 102.0, T0, T0 + 2 * MS)[:2] == (FALLBACK, Code.OK)  # new venue c
    assert rig.fast.state(0) == (True, 0.0, [("a", 100.0, T0, T0), ("b", 101.0, T0, T0),
                                             ("c", 102.0, T0, T0)])
    assert rig.prices[0]["mark"] == 101.0            # median(100, 101, 102), published by the reference
    before, g0 = rig.prices.copy(), int(rig.gseq[0])
    # a: 100 -> 100.5: median(100.5, 101, 102) = 101 = the row's mark -> taken, nothing published
    assert rig.tick("a", B, 100.5, T0 + 3 * MS, T0 + 3 * MS) == (TAKEN, Code.OK, [])
    assert rig.prices.tobytes() == before.tobytes() and rig.gseq[0] == g0 and not rig.bells.any()
    assert [q[:3] for q in rig.fast.state(0)[2]][0] == ("a", 100.5, T0 + 3 * MS)
    # b: 101 -> 101.5 with the venue clock 1 ms ahead (fresh_ts = min(vts, recv) = recv):
    # median(100.5, 101.5, 102) = 101.5 -> published, tick_seq = frame seq 5, ts = recv
    recv = T0 + 4 * MS
    f = rig.frame("b", B, 101.5, recv + MS, recv)
    assert rig.fast.on_frame(f, recv) == PUBLISHED and decode(f).seq == 5
    row = rig.prices[0]
    assert (row["mark"], row["index"], row["ts_ns"], row["flags"], row["tick_seq"]) == (101.5, 101.5, recv, 0, 5)
    assert row["price_seq"] == before[0]["price_seq"] + 1 and rig.gseq[0] == g0 + 1
    assert list(rig.bells) == [1, 0, 1, 0]                   # each doorbell's counter rang once
    assert rig.fast.state(0)[2][1] == ("b", 101.5, recv + MS, recv)
    assert rig.fast.take_applied() == [(0, "a", 100.5, T0 + 3 * MS, T0 + 3 * MS, 4, None),
                                       (0, "b", 101.5, recv + MS, recv, 5, 101.5)]
    assert rig.fast.n_applied == 0 and rig.prices[1]["price_seq"] == 0
    # staleness boundary, recv = T0 + 5 s + 3 ms: a (fresh_ts T0 + 3 ms) is exactly 5 s old, still
    # fresh (<=); c -> 103 with vts = recv - 5 s is too: median(100.5, 101.5, 103) = 101.5 -> taken;
    # one ns later the new quote is stale (5 s + 1 ns > 5 s) -> the reference decides
    recv = T0 + 5 * S + 3 * MS
    assert rig.fast.on_frame(rig.frame("c", B, 103.0, recv - 5 * S, recv), recv + 1) == FALLBACK
    assert rig.fast.on_frame(rig.frame("c", B, 103.0, recv - 5 * S, recv), recv) == TAKEN
    assert rig.prices[0]["mark"] == 101.5 and rig.gseq[0] == g0 + 1


def test_basis_is_clamped():
    rig = Rig()
    q = [("a", 100.0, T0, T0), ("b", 101.0, T0, T0), ("c", 102.0, T0, T0)]
    # a -> 100.5: index median(100.5, 101, 102) = 101; bound = 0.005 * 101 = 0.505
    for basis, mark in ((1.0, 101.0 + 0.005 * 101.0), (-0.2, 101.0 - 0.2), (-9.0, 101.0 - 0.005 * 101.0)):
        rig.fast.sync(0, q, True, basis)
        assert rig.fast.on_frame(rig.frame("a", "BTC-PERP", 100.5, T0 + MS), T0 + MS) == PUBLISHED
        assert (rig.prices[0]["mark"], rig.prices[0]["index"]) == (mark, 101.0)


def raw(fields, seq=99, ts=T0, **kw):
    return msgpack.packb({"v": 1, "t": 1, "seq": seq, "ts_ns": ts, **fields}, **kw)


GOOD = {"venue": "a", "instrument": "BTC-PERP", "price": 101.0, "venue_ts_ns": T0 + S}
OK, WIRE, TYPE = Code.OK, "decode rejects", "not a tick"
# name: (frame, recv_ns or None = T0 + 1 s, what the reference says); quotes a 100, b 101, c 102 at T0
CASES = {
    "unknown-instrument": (raw({**GOOD, "instrument": "SOL-PERP"}), None, Code.ORACLE_UNKNOWN_INSTRUMENT),
    "new-venue": (raw({**GOOD, "venue": "d"}), None, OK),
    "int-price": (raw({**GOOD, "price": 101}), None, OK),               # msgpack int: the reference takes it
    "float32-price": (raw(GOOD, use_single_float=True), None, OK),
    "zero-price": (raw({**GOOD, "price": 0.0}), None, Code.ORACLE_BAD_PRICE),
    "negative-price": (raw({**GOOD, "price": -101.0}), None, Code.ORACLE_BAD_PRICE),
    "nan-price": (raw({**GOOD, "price": float("nan")}), None, WIRE),
    "inf-price": (raw({**GOOD, "price": float("inf")}), None, WIRE),
    "backwards": (raw({**GOOD, "venue_ts_ns": T0 - 1}), None, Code.ORACLE_TS_BACKWARDS),  # a's last: T0
    "stale": (raw({**GOOD, "venue_ts_ns": T0}), T0 + P.staleness_ns + 1, Code.ORACLE_STALE),  # 5 s + 1 ns old
    # recv T0 + 1 s: T0 + 2 s + 1 ns is 1 s + 1 ns ahead > max_future_skew_ns 1 s
    "future": (raw({**GOOD, "venue_ts_ns": T0 + 2 * S + 1}), None, Code.ORACLE_TS_FUTURE),
    "int64-max-ts": (raw({**GOOD, "venue_ts_ns": 2**63 - 1}), None, Code.ORACLE_TS_FUTURE),
    # recv -2**63 (C's unsigned difference, no wrap): 2**64 - 1 ns ahead
    "future-no-wrap": (raw({**GOOD, "venue_ts_ns": 2**63 - 1}), -2**63, Code.ORACLE_TS_FUTURE),
    # a -> 107: others median(101, 102) = 101.5, |107 - 101.5| / 101.5 = 0.054 > 0.05: excluded
    "outlier": (raw({**GOOD, "price": 107.0}), None, OK),
    # recv T0 + 6 s: b and c (fresh_ts T0) are 6 s old > 5 s: 1 fresh venue < quorum 2: a freeze
    "below-quorum": (raw({**GOOD, "venue_ts_ns": T0 + 6 * S}), T0 + 6 * S, OK),
    "extra-key": (raw({**GOOD, "x": 1}), None, WIRE),
    "missing-key": (raw({k: v for k, v in GOOD.items() if k != "venue_ts_ns"}), None, WIRE),
    # 8 pairs with "price" twice and no venue_ts_ns (msgpack-python keeps the last price)
    "duplicate-key": (b"\x88" + b"".join(msgpack.packb(x) for kv in [("v", 1), ("t", 1), ("seq", 9),
                      ("ts_ns", T0), ("venue", "a"), ("instrument", "BTC-PERP"), ("price", 101.0),
                      ("price", 101.0)] for x in kv), None, WIRE),
    "truncated": (raw(GOOD)[:-1], None, WIRE),
    "trailing-byte": (raw(GOOD) + b"\xc0", None, WIRE),
    "tick-body-type-40": (raw({**GOOD, "t": int(MsgType.ENGINE_EVENT)}), None, WIRE),
    "engine-event": (Sequencer().encode(MsgType.ENGINE_EVENT, {"code": 7001, "detail": "x"}, ts_ns=T0),
                     None, TYPE),
    "bad-version": (raw({**GOOD, "v": 3}), None, WIRE),
    "negative-header-ts": (raw(GOOD, ts=-1), None, WIRE),
    "not-clean": (raw(GOOD), None, OK),                                 # synced with clean=False
}


def reference_says(frame, recv):
    """What MarkPriceProcess.on_frame would make of ``frame`` in the cases' starting state."""
    calc = MarkPriceCalculator(P)
    for v, p in (("a", 100.0), ("b", 101.0), ("c", 102.0)):
        calc.on_tick("BTC-PERP", v, p, T0, T0)
    m = decode(frame)
    if type(m) is Rejected:
        return WIRE
    if m.type != MsgType.ORACLE_TICK:
        return TYPE
    f = m.fields
    if f["instrument"] not in NAMES:
        return Code.ORACLE_UNKNOWN_INSTRUMENT
    return calc.on_tick(f["instrument"], f["venue"], f["price"], f["venue_ts_ns"], recv)[0]


def test_fallbacks_change_nothing():
    for case, (frame, recv, says) in CASES.items():
        recv = T0 + S if recv is None else recv
        assert reference_says(frame, recv) == says, case        # the frame is what its name says
        rig = Rig()
        q = [("a", 100.0, T0, T0), ("b", 101.0, T0, T0), ("c", 102.0, T0, T0)]
        rig.fast.sync(0, q, case != "not-clean", 0.0)
        rig.prices[0]["mark"] = 101.0
        before, st0 = rig.prices.tobytes(), rig.fast.state(0)
        assert rig.fast.on_frame(frame, recv) == FALLBACK, case
        assert rig.fast.state(0) == st0 and rig.fast.n_applied == 0, case
        assert rig.prices.tobytes() == before and rig.gseq[0] == 0 and not rig.bells.any(), case
        # the control: a 101 at T0 + 1 s, median(101, 101, 102) = 101 = the row -> taken
        assert rig.fast.on_frame(raw(GOOD), T0 + S) == (FALLBACK if case == "not-clean" else TAKEN), case
    rig = Rig()                                              # more venues than C holds: not clean
    rig.fast.sync(0, [(f"v{k}", 100.0, T0, T0) for k in range(17)], True, 0.0)
    assert rig.fast.state(0) == (False, 0.0, [])
    rig.fast.sync(0, [("a", 100.0, T0, T0), ("b", 100.0, T0, T0)], True, float("nan"))
    assert rig.fast.state(0)[0] is False                     # a non-finite basis: not clean


def run_steps(steps, count=None):
    """Drive a Rig and a pure reference (every tick straight in) through ``steps``; check both."""
    rig, pure, now = Rig(), MarkPriceCalculator(P), T0
    for kind, i, v, bp, lag_ms, gap_ms in steps:
        now += gap_ms * MS
        name = NAMES[i]
        if kind == "tick":
            price, vts = BASE[i] * (1 + bp / 10_000), now - lag_ms * MS
            r, code, events = rig.tick("abcd"[v], name, price, vts, now)
            assert (code, events) == pure.on_tick(name, "abcd"[v], price, vts, now)
            if count is not None:
                count[r] += 1
            s = pure.state(name, now)
            if code == Code.OK and s.mark is not None:           # the row holds the reference's mark
                assert rig.prices[i]["mark"] == s.mark and rig.prices[i]["flags"] == s.frozen
            if r == PUBLISHED:
                assert (rig.prices[i]["ts_ns"], rig.prices[i]["tick_seq"]) == (now, rig.seq.last)
        else:
            rig.settle()
            if kind == "timer":
                ev = rig.calc.on_timer(now)
                assert ev == pure.on_timer(now)
                touched = {e.instrument for e in ev}
            else:                                                # a basis sample
                mid = BASE[i] * (1 + bp / 10_000)
                res = rig.calc.on_basis_sample(name, mid, now)
                assert res == pure.on_basis_sample(name, mid, now)
                touched = {name} if res[0] == Code.OK else set()
            for n in touched:
                rig.sync(n)
                rig.publish(n, now)
        rig.settle()
        for k, n in enumerate(NAMES):
            exp = rig.calc.export(n)
            assert exp == pure.export(n)
            clean, basis, quotes = rig.fast.state(k)
            assert (quotes, basis) == (exp[0], exp[2])           # same quotes in the same slots
            assert clean == exp[1]                               # synced after every change of clean
    return rig


tick = st.tuples(st.just("tick"), st.integers(0, 1), st.integers(0, 3),
                 st.one_of(st.integers(-200, 200), st.sampled_from([0, 0, -600, 600, -3000, 3000])),
                 st.one_of(st.integers(-100, 1000), st.sampled_from([5000, 5001, 4999, 8000])),
                 st.one_of(st.integers(0, 300), st.sampled_from([0, 2500, 5000, 6000])))
other = st.tuples(st.sampled_from(["timer", "basis"]), st.integers(0, 1), st.just(0),
                  st.integers(-150, 150), st.just(0), st.integers(0, 300))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(tick, tick, tick, other), min_size=1, max_size=80))
def test_fast_path_matches_reference(steps):
    # prices within +-2% of the base mostly (taken), +-6% / +-30% sometimes (exclusions); lags up
    # to 1 s (backwards), the 5 s boundary and past it (stale); gaps past 5 s (freezes)
    run_steps(steps)


def test_seeded_run_exercises_every_outcome():
    rnd, steps = random.Random(20240607), []
    for _ in range(4000):
        kind = rnd.choices(["tick", "timer", "basis"], [20, 1, 1])[0]
        bp = rnd.choice([rnd.randint(-150, 150)] * 8 + [0, 700, -3000])
        lag = rnd.choice([rnd.randint(-50, 800)] * 20 + [5000, 5001, 7000])
        gap = rnd.choice([rnd.randint(0, 200)] * 40 + [5500])
        steps.append((kind, rnd.randint(0, 1), rnd.randint(0, 3), bp, lag, gap))
    count = {FALLBACK: 0, TAKEN: 0, PUBLISHED: 0}
    rig = run_steps(steps, count)
    # the mix must really take the hot path and really leave ticks to the reference (this seed
    # gives 732 published, 196 taken, 2711 fallbacks); every C publication rang both doorbells
    assert count[PUBLISHED] >= 500 and count[TAKEN] >= 50 and count[FALLBACK] >= 100, count
    assert rig.gseq[0] == count[PUBLISHED] and rig.bells[0] == rig.bells[2] == count[PUBLISHED]


def _btc_store(n_workers: int):
    """An anonymous store of one asset (USDT) and one perp (BTCUSDT at 60,000), and a
    control segment for ``n_workers`` workers: what a mark-price stage needs."""
    from engine.runtime.ctl import Control
    from engine.store.shm import Store
    from engine.instruments import Asset, Instrument, Kind, derive_tiers
    tiers = derive_tiers([{"floor": 0, "imr": 0.02, "mmr": 0.01}])
    store = Store.create(None, assets=[Asset("USDT", 0, 10**6, 1.0, 0.0)], accounts_capacity=2,
                         instruments=[Instrument("BTCUSDT", 0, Kind.PERP, "USDT", 1.0, 1000, 10, 0.1, 0.001,
                                                 tiers, mark_price=60_000.0)],
                         n_partitions=1, slots_per_account=2)
    return store, Control.create(None, n_workers=n_workers, n_partitions=1, slots_per_account=2, ring_capacity=64)


@contextlib.contextmanager
def _markprice(n_workers: int = 1):
    """A MarkPriceProcess on the BTC store (``_btc_store``) with its ticks PUSHed in and
    its events on a PULL, over inproc sockets, all closed after: ``(p, store, ctl, push,
    events, seq, name)``. ``P`` is read when called (tests monkeypatch it)."""
    from engine.runtime.markprice import MarkPriceProcess
    store, ctl = _btc_store(n_workers=n_workers)
    tag = f"{time.time_ns()}"
    ctx = zmq.Context.instance()
    events = ctx.socket(zmq.PULL)
    events.bind(f"inproc://ev-{tag}")
    p = MarkPriceProcess("unused", f"inproc://or-{tag}", f"inproc://ev-{tag}", P, store=store, ctl=ctl)
    push = ctx.socket(zmq.PUSH)
    push.connect(f"inproc://or-{tag}")
    try:
        yield p, store, ctl, push, events, Sequencer(), p.names[0]
    finally:
        for sock in (push, events, p.sock, p.events):
            sock.close(0)


def test_markprice_process_fold():
    from engine.runtime.markprice import TIMER_DEFER_MAX_NS
    with _markprice(n_workers=2) as (p, store, ctl, push, events, seq, name):
        def send(venue, price):
            push.send(seq.encode(MsgType.ORACLE_TICK, {"venue": venue, "instrument": name, "price": price,
                                                       "venue_ts_ns": time.time_ns()}))
        for venue, price in (("a", 60_000.0), ("b", 60_060.0), ("c", 60_120.0), ("a", 60_030.0),
                             ("b", 60_090.0), ("c", 60_150.0), ("a", 60_000.0)):
            send(venue, price)
        assert p.sock.poll(2000)
        taken = 0
        while taken < 7:
            assert p.sock.poll(2000)
            taken += p.fold()
        # a, b, c start in the reference, then 4 C ticks: a 60030 (median 60060), b 60090 (median
        # 60090, published with tick_seq 5), c 60150 and a 60000 (median stays 60090: taken)
        assert store.prices[0]["mark"] == 60_090.0 and store.prices[0]["flags"] == 0
        assert p.counters["ticks"] == 7 and p.counters["ticks_fast"] == 4, p.counters
        assert p.counters["fast_mismatch"] == 0 and store.prices[0]["tick_seq"] == 5
        assert events.poll(0) == 0                             # no event: nothing froze or was excluded
        # The staleness timer settles every C-taken tick first; while the reference is
        # behind, a due timer waits for the idle catch-up slices, TIMER_DEFER_MAX_NS at most.
        send("b", 60_100.0)                                    # median 60,100: published in C
        assert p.sock.poll(2000) and p.fold() == 1
        assert store.prices[0]["mark"] == 60_100.0
        assert p.fast.n_applied == 1                           # taken in C, not yet folded
        now = time.time_ns()
        assert not p.timer_due(now, now + 1)                   # not due yet
        assert not p.must_catch_up(now, now + 1)               # 1 tick < 256 and not due: idle turns
        assert not p.timer_due(now, now)                       # due, but the reference is behind,
        assert p.must_catch_up(now, now)                       # so it catches up a slice a turn
        assert p.timer_due(now + TIMER_DEFER_MAX_NS, now)      # ... for 50 ms at most
        p.settle()
        assert p.fast.n_applied == 0 and p.timer_due(now, now)  # caught up: at once
        assert not p.must_catch_up(now, now)


def test_staleness_does_not_wrap_in_int64():
    # Quotes a/b/c at 100/101/102, venue timestamp -10, accepted at recv 0 (fresh_ts =
    # min(-10, 0) = -10; age 0 - (-10) = 10 ns <= 5 s) and synced clean. Then a -> 100.5,
    # venue ts -10 (not backwards: -10 == -10), received at 2**63 - 2: its age is
    # (2**63 - 2) - (-10) = 2**63 + 8 ns > 5 s, so the reference rejects it ORACLE_STALE.
    # In int64 that difference wraps to -2**63 + 8 (not > 5 s): every quote would look
    # fresh, median(100.5, 101, 102) = 101 = the row's mark, and C would take it.
    rig, B, recv = Rig(), "BTC-PERP", 2**63 - 2
    for v, p in (("a", 100.0), ("b", 101.0), ("c", 102.0)):
        assert rig.tick(v, B, p, -10, 0)[:2] == (FALLBACK, Code.OK)
    assert rig.fast.state(0) == (True, 0.0, [("a", 100.0, -10, -10), ("b", 101.0, -10, -10),
                                             ("c", 102.0, -10, -10)])
    assert rig.prices[0]["mark"] == 101.0
    rig.settle()
    before, st0, g0 = rig.prices.tobytes(), rig.fast.state(0), int(rig.gseq[0])
    bells0 = rig.bells.copy()
    frame = rig.frame("a", B, 100.5, -10, recv)
    assert rig.calc.on_tick(B, "a", 100.5, -10, recv) == (Code.ORACLE_STALE, [])   # the reference
    assert rig.fast.on_frame(frame, recv) == FALLBACK
    assert rig.fast.state(0) == st0 and rig.fast.n_applied == 0 and rig.fast.take_applied() == []
    assert rig.prices.tobytes() == before and rig.gseq[0] == g0 and np.array_equal(rig.bells, bells0)
    # the control: the same tick at recv 5 s - 10 (age exactly 5 s: fresh) is taken
    assert rig.fast.on_frame(rig.frame("a", B, 100.5, -10, 5 * S - 10), 5 * S - 10) == TAKEN


def test_c_median_of_prices_near_the_largest_float_is_the_references():
    """The even-count median in C is the reference's ``a + 0.5 * (b - a)``: a and b at
    1.70e308 and 1.71e308, a ticks again, and C publishes 1.705e308, bit for bit
    ``median`` (it published inf: 0.5 * (a + b) overflowed)."""
    from feeds.oracle.index import median
    rig, B = Rig(), "BTC-PERP"
    rig.fast.sync(0, [("a", 1.70e308, T0, T0), ("b", 1.71e308, T0, T0)], True, 0.0)
    assert rig.fast.on_frame(rig.frame("a", B, 1.70e308, T0 + MS), T0 + MS) == PUBLISHED
    assert rig.prices[0]["mark"] == rig.prices[0]["index"] == median([1.70e308, 1.71e308]) == 1.705e308


def test_c_never_publishes_a_mark_that_overflows():
    """Basis 5e305 (a sample at 1.1e308 when the index was 1e308: clamped to 0.005 * 1e308),
    then a, b and c walk up from 1e308 by 4 % a step (within max_deviation 5 %: C takes
    them) to 1e308 * 1.04**14 = 1.7317e308, and then to 1.797e308. a's 1.797e308 leaves the
    median at 1.7317e308 (mark 1.7317e308 + 5e305, finite); b's makes it 1.797e308, and
    1.797e308 + 5e305 (the bound 0.005 * 1.797e308 = 8.985e305 keeps the basis) is past the
    largest float: C falls back with nothing changed (it published inf), and the reference
    freezes the instrument at its last good mark, published frozen."""
    rig, B, now = Rig(), "BTC-PERP", T0
    for v in "abc":
        rig.tick(v, B, 1e308, now, now)
    assert rig.calc.on_basis_sample(B, 1.1e308, now) == (Code.OK, [])
    rig.sync(B)
    rig.publish(B, now)
    assert rig.prices[0]["mark"] == 1e308 + 5e305 and rig.fast.state(0)[:2] == (True, 5e305)
    for k in range(1, 15):
        for v in "abc":
            now += MS
            assert rig.tick(v, B, 1e308 * 1.04 ** k, now, now)[:2] in ((TAKEN, Code.OK), (PUBLISHED, Code.OK))
    now += MS
    assert rig.tick("a", B, 1.797e308, now, now)[0] == TAKEN            # median 1.04**14 * 1e308
    good = 1e308 * 1.04 ** 14 + 5e305
    assert rig.prices[0]["mark"] == good and rig.prices[0]["flags"] == 0
    rig.settle()
    before, st0 = rig.prices.tobytes(), rig.fast.state(0)
    now += MS
    frame = rig.frame("b", B, 1.797e308, now, now)
    assert rig.fast.on_frame(frame, now) == FALLBACK
    assert rig.fast.state(0) == st0 and rig.fast.n_applied == 0 and rig.prices.tobytes() == before
    code, events = rig.calc.on_tick(B, "b", 1.797e308, now, now)
    assert (code, [e.code for e in events]) == (Code.OK, [Code.EVENT_PRICE_FROZEN])
    rig.sync(B)
    rig.publish(B, now)
    assert (rig.prices[0]["mark"], rig.prices[0]["flags"]) == (good, 1)


@pytest.mark.parametrize("module, args, says", [
    ("engine.runtime.markprice", ["--quorum", "0"], "OracleParams.quorum: must be in 1..16 (max_venues), got 0"),
    ("engine.runtime.markprice", ["--staleness-ms", "-1"], "OracleParams.staleness_ns: must be in 0..9223372036854775807, got -1000000"),
    ("engine.runtime.worker", ["--worker", "0", "--partitions", "0", "--orders", "inproc://o", "--replies",
                               "inproc://r", "--max-deviation", "nan"], "OracleParams.max_deviation: must be a finite number >= 0, got nan"),
], ids=["markprice-quorum-0", "markprice-staleness-negative", "worker-deviation-nan"])
def test_a_stage_given_invalid_oracle_parameters_says_which_and_exits_2(module, args, says):
    """An oracle parameter ``OracleParams`` refuses is a usage error of the process that runs
    the stage: exit 2 and a one-line message naming the field, before any segment is
    attached (the segment "no-such-engine" does not exist: attaching would be a traceback)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", module, "--name", "no-such-engine", "--oracle", "inproc://t",
                        "--events", "inproc://e", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_far_future_tick_is_left_to_the_reference_and_locks_nothing():
    """The C path and the reference agree on a tick far ahead of the receive time: b at
    venue_ts_ns 2**63 - 1 falls back and the reference refuses it 2007 (C took it, and every
    later b tick was then 2004: the instrument froze at 6 s with only a fresh). b's
    ordinary ticks after it are taken in C, and at 6 s the price is still live:
    median(100 + k, 101 + k) = 100.5 + k, published with flags 0. A lead of exactly
    max_future_skew_ns (1 s) is taken in C, 1 ns more falls back."""
    rig, B = Rig(), "BTC-PERP"
    for v, p in (("a", 100.0), ("b", 101.0)):
        assert rig.tick(v, B, p, T0, T0)[:2] == (FALLBACK, Code.OK)
    assert rig.tick("b", B, 101.0, 2**63 - 1, T0 + 1) == (FALLBACK, Code.ORACLE_TS_FUTURE, [])
    for k in (1, 2):
        now = T0 + 3 * k * S
        assert rig.tick("b", B, 101.0 + k, now, now)[:2] == (PUBLISHED, Code.OK)      # median 100.5 + k/2
        assert rig.tick("a", B, 100.0 + k, now, now)[:2] == (PUBLISHED, Code.OK)      # median 100.5 + k
        rig.settle()
        st = rig.calc.state(B, now)
        assert (st.index, st.frozen, rig.prices[0]["mark"], rig.prices[0]["flags"]) == (100.5 + k, False, 100.5 + k, 0)
    assert rig.calc.reject_counts == {Code.ORACLE_TS_FUTURE: 1}
    now = T0 + 6 * S + MS
    assert rig.fast.on_frame(rig.frame("a", B, 102.0, now + S + 1), now) == FALLBACK
    assert rig.fast.on_frame(rig.frame("a", B, 102.0, now + S), now) == TAKEN


def test_markprice_counts_and_reports_a_future_tick():
    """Through MarkPriceProcess (the same code in its own process and inside worker 0): a
    tick 1 h ahead of the receive time is refused 2007, counted (reject_2007), and reported
    by one ENGINE_EVENT naming the venue, instrument and timestamp; a second one within 10 s
    is counted with no second event; the venue's next ordinary tick is taken."""
    with _markprice(n_workers=1) as (p, store, ctl, push, events, seq, name):
        def send(venue, price, ahead_ns=0):
            ts = time.time_ns() + ahead_ns
            push.send(seq.encode(MsgType.ORACLE_TICK, {"venue": venue, "instrument": name, "price": price,
                                                       "venue_ts_ns": ts}))
            assert p.sock.poll(2000) and p.fold() == 1
            return ts
        send("a", 60_000.0)
        send("b", 60_000.0)
        hour = 3600 * S
        ts = send("b", 60_100.0, hour)
        send("b", 60_100.0, hour)
        assert p.counters["reject_2007"] == 2 and p.counters["ticks"] == 2
        assert events.poll(1000)
        ev = decode(events.recv())
        assert ev.fields["code"] == Code.ORACLE_TS_FUTURE and ev.fields["instrument"] == name
        assert f"venue=b instrument={name} price=60100.0 venue_ts_ns={ts}" in ev.fields["detail"]
        assert events.poll(100) == 0                            # the second: counted, no event
        send("b", 60_100.0)                                     # median(60,000, 60,100) = 60,050
        p.settle()                                              # (C may have taken it: counted here)
        assert p.counters["ticks"] == 3 and store.prices[0]["mark"] == 60_050.0


def test_a_venue_readmitted_alone_brings_the_c_path_back(monkeypatch):
    """Quorum 1, venues a and b at 100: b's glitch to 150 excludes both (the reference's,
    C not clean). Once b is stale (8 s: its last tick at 1 s), a's tick readmits a (the only
    fresh venue): published live at 100.5 by the reference (it stayed frozen, and every tick
    the reference's, for good). C stays off while b, stale, keeps its exclusion; b back at
    101 is judged against a (0.5 %) and readmitted, the state is clean again, and a's next
    tick is C's: median(101.5, 101) = 101.25, published in C."""
    import sys
    monkeypatch.setattr(sys.modules[__name__], "P", OracleParams(staleness_ns=5 * S, quorum=1,
                                                                  max_deviation=0.05, max_basis=0.005))
    rig, B = Rig(), "BTC-PERP"
    for v in "ab":
        rig.tick(v, B, 100.0, T0, T0)
    r, code, events = rig.tick("b", B, 150.0, T0 + S, T0 + S)
    assert (r, code, [e.code for e in events]) == (FALLBACK, Code.OK, [Code.EVENT_VENUE_EXCLUDED,
                                                   Code.EVENT_VENUE_EXCLUDED, Code.EVENT_PRICE_FROZEN])
    assert rig.prices[0]["flags"] == 1 and rig.fast.state(0)[0] is False
    r, code, events = rig.tick("a", B, 100.5, T0 + 8 * S, T0 + 8 * S)
    assert (r, code, [(e.code, e.venue) for e in events]) == (FALLBACK, Code.OK, [
        (Code.EVENT_VENUE_READMITTED, "a"), (Code.EVENT_PRICE_RESUMED, None)])
    assert (rig.prices[0]["mark"], rig.prices[0]["flags"], rig.fast.state(0)[0]) == (100.5, 0, False)
    r, code, events = rig.tick("b", B, 101.0, T0 + 8 * S + MS, T0 + 8 * S + MS)
    assert (r, code, [(e.code, e.venue) for e in events]) == (FALLBACK, Code.OK, [
        (Code.EVENT_VENUE_READMITTED, "b")])
    assert rig.fast.state(0)[0] is True and rig.prices[0]["mark"] == 100.75     # median(100.5, 101)
    assert rig.tick("a", B, 101.5, T0 + 9 * S, T0 + 9 * S)[:2] == (PUBLISHED, Code.OK)
    assert rig.prices[0]["mark"] == 101.25


def test_the_timer_publishes_a_mark_moved_by_a_venue_going_stale():
    """Venues a 60,000 (its venue clock 4.5 s behind: stale 0.5 s later), b 60,600, c 61,200:
    the row's mark is their median, 60,600. At now + 1 s a is 5.5 s old (> 5 s) and drops out
    with no event (2 fresh >= quorum 2, none excluded): the index is median(60,600, 61,200) =
    60,900, and the timer publishes it, stamped with the timer's time and the row's
    tick_seq, ringing the doorbell (the row kept 60,600 until the next tick: the timer
    published only instruments with an event). The same timer again publishes nothing.
    Then b and c go stale too (now + 6 s): a freeze, published before its event (7001), so a
    subscriber reads the frozen row."""
    with _markprice(n_workers=1) as (p, store, ctl, push, events, seq, name):
        emitted = []
        emit = p.emit
        p.emit = lambda code, inst, detail: (emitted.append((code, int(store.prices[0]["flags"]))),
                                             emit(code, inst, detail))
        for venue, price, behind_ns in (("a", 60_000.0, 4_500 * MS), ("b", 60_600.0, 0), ("c", 61_200.0, 0)):
            push.send(seq.encode(MsgType.ORACLE_TICK, {"venue": venue, "instrument": name, "price": price,
                                                       "venue_ts_ns": time.time_ns() - behind_ns}))
            assert p.sock.poll(2000) and p.fold() == 1
        row = store.prices[0]
        assert row["mark"] == 60_600.0 and row["tick_seq"] == 3
        seq0, bell0 = int(row["price_seq"]), _shm.doorbell_value(ctl.doorbell_addr(0))
        now = time.time_ns() + S
        p.on_timer(now)
        st = p.calc.state(name, now)
        assert (st.index, st.n_fresh, st.frozen) == (60_900.0, 2, False) and emitted == []
        assert (row["mark"], row["index"], row["flags"], row["ts_ns"], row["tick_seq"]) == (60_900.0, 60_900.0, 0, now, 3)
        assert int(row["price_seq"]) == seq0 + 1 and _shm.doorbell_value(ctl.doorbell_addr(0)) != bell0
        p.on_timer(now + 1)
        assert int(row["price_seq"]) == seq0 + 1                        # nothing new: nothing published
        p.on_timer(now + 5 * S)                                           # b, c 6 s old: 0 fresh < 2
        assert (row["mark"], row["flags"]) == (60_900.0, 1)
        assert emitted == [(Code.EVENT_PRICE_FROZEN, 1)]                  # the row was frozen first
        assert events.poll(1000) and decode(events.recv()).fields["code"] == Code.EVENT_PRICE_FROZEN


def test_a_freeze_on_a_tick_is_published_before_its_event(monkeypatch):
    """Venues a and b quote BTC at 100; b then quotes 150 (50 % off, beyond 5 %): both are
    excluded (a pair cannot tell which is wrong) and the index, with no venue left, freezes
    -- on the tick, inside ``fold``, which publishes its marks after taking the burst. The
    7001 event went out before the row said frozen (``fold`` sent each tick's events as it
    took it), so a subscriber reading the row on the event saw it live (it failed the
    pipeline test once in a while); now the events follow the publication."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "P", OracleParams(staleness_ns=5 * S, quorum=1,
                                                                  max_deviation=0.05, max_basis=0.005))
    with _markprice() as (p, store, ctl, push, events, seq, name):
        emitted = []
        emit = p.emit
        p.emit = lambda code, inst, detail: (emitted.append((code, int(store.prices[0]["flags"]))),
                                             emit(code, inst, detail))
        for venue, price in (("a", 100.0), ("b", 100.0), ("b", 150.0)):
            push.send(seq.encode(MsgType.ORACLE_TICK, {"venue": venue, "instrument": name, "price": price,
                                                       "venue_ts_ns": time.time_ns()}))
            assert p.sock.poll(2000) and p.fold() == 1
        assert int(store.prices[0]["flags"]) == 1
        assert emitted == [(Code.EVENT_VENUE_EXCLUDED, 1), (Code.EVENT_VENUE_EXCLUDED, 1),
                           (Code.EVENT_PRICE_FROZEN, 1)]              # each after the frozen row


def test_a_new_price_writer_finishes_a_write_its_predecessor_died_in():
    """Worker 0 (running the mark-price stage) SIGKILLed inside a seqlock write leaves
    the row's counter odd: every reader then retried and gave up (RuntimeError in the
    workers, StoreError in the gateway's order checks, over and over). The stage's next
    writer finishes such writes when it starts, and the prices read again."""
    from engine.runtime.markprice import MarkPriceProcess
    store, ctl = _btc_store(n_workers=1)
    _shm.write_begin(store.addr(store.prices, 0))          # the writer dies here
    _shm.write_begin(store.addr(store.assets, 0))
    one = (np.zeros(1), np.zeros(1, np.uint64), np.zeros(1, np.uint32))
    assert _shm.snapshot_prices(store.addr(store.prices), 1, *one, 100) == 1    # torn: unreadable
    tag = f"{time.time_ns()}"
    p = MarkPriceProcess("unused", f"inproc://or-{tag}", f"inproc://ev-{tag}", P, store=store, ctl=ctl)
    try:
        assert int(store.prices[0]["seq"]) % 2 == 0 and int(store.assets[0]["seq"]) % 2 == 0
        assert store.price_snapshot().marks[0] == 60_000.0
    finally:
        p.sock.close(0)
        p.events.close(0)

