"""The worker's stage 1a in C (``engine._margin.TickPath``, ext/_tickpath.pxi) held to its
Python references.

- the frame: ``encode_order`` byte for byte ``Sequencer.encode_known(LIQUIDATION_ORDER)``
  over every msgpack int width, and what ``feeds.protocol.decode`` reads back;
- the trigger search: ``crossed`` equals ``HolderIndex.candidates(i, mark, prev)``, order
  included, on a real book's refreshed tables (fed through ``HolderIndex.on_triggers``, as
  the worker wires them) and on hand-made tables with ties and infinities;
- ``stage_1a`` end to end on a real shared-memory book: for each instrument whose price
  sequence moved, for each partition slot, the crossed rows not already outstanding, each
  decided like ``engine.liquidation.decide.decide`` at the same prices; the outstanding
  flag, the in-place ``last_seqs``/``prev_marks``, ``orders()``; a frozen price pauses
  liquidations; a price that is not finite and > 0 makes the whole call do nothing (-1).

The book (``build_world``): 800 accounts over two partitions in a named POSIX segment
(unlinked at teardown), each with 1..3 of BTCUSDT, ETHUSDT, BTCUSDC (USDC-settled) and
BTCUSD (inverse, BTC-settled) at 1..25x, entries within ~1 % of the mark, 15 % isolated;
the benchmark's universe (bench/kernel.py: 3 assets, 40 instruments).
"""

from __future__ import annotations

import collections
import functools
import math
import time
import types
import uuid

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from bench import kernel
from engine import _margin
from engine.liquidation.decide import DEFAULT_HEALTH_FACTOR, decide
from engine.risk import margin
from engine.store import layout as L
from engine.store.layout import AccountFlag
from engine.store.shm import Store
from feeds.protocol import Message, MsgType, Sequencer, decode

HELD = (0, 1, 30, 37)            # BTCUSDT, ETHUSDT, BTCUSDC, BTCUSD (inverse)
BTCUSDT, ETHUSDT, BTCUSDC, BTCUSD = HELD
N_ACCOUNTS = 800
N_PARTS = 2
ORDER_ID_BASE = 5_000
OUT = int(AccountFlag.LIQUIDATION_OUTSTANDING)
I64_MIN, I64_MAX, U64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
FIELDS = ("account", "instrument_id", "qty_units", "limit_price_units", "reason")


# --------------------------------------------------------------------------- the book
class World:
    """A store, one HolderIndex per partition and a TickPath wired like Worker.start."""

    def __init__(self, seed: int, extra=None):
        assets, instruments = kernel.make_universe()
        self.st = st = Store.create(f"me-tp-{uuid.uuid4().hex[:10]}", assets=assets, instruments=instruments,
                                    accounts_capacity=N_ACCOUNTS + 8, n_partitions=N_PARTS, slots_per_account=4,
                                    replace=True)
        try:
            self._fill(assets, instruments, seed)
            if extra is not None:
                extra(st)
            snap = st.price_snapshot()
            n_i = len(st.instruments)
            self.last_seqs, self.prev_marks = np.zeros(n_i, np.uint64), np.zeros(n_i)
            self.tp = _margin.TickPath(st.addr(st.instruments), st.addr(st.prices), st.addr(st.assets),
                                       len(st.assets), st.addr(st.accounts), st.addr(st.positions),
                                       st.slots_per_account, n_i, N_PARTS, self.last_seqs, self.prev_marks,
                                       ORDER_ID_BASE, DEFAULT_HEALTH_FACTOR)
            self.idx = []
            for k in range(N_PARTS):            # partition p is slot k = p here
                idx = margin.HolderIndex(st, k)
                idx.on_triggers = functools.partial(self.tp.set_triggers, k)
                for i, table in enumerate(idx.triggers):
                    self.tp.set_triggers(k, i, *table)
                self.idx.append(idx)
            for k, idx in enumerate(self.idx):  # Worker.upkeep: full pass, refresh, triggers
                margin.full_pass(st, k, snap)
                idx.refresh(snap)
                idx.refresh_dirty_triggers(snap)   # -> on_triggers -> tp.set_triggers
            self.last_seqs[:] = snap.price_seqs
            self.prev_marks[:] = snap.marks
            self.marks0 = snap.marks.copy()
        except BaseException:
            self.close()
            raise

    def _fill(self, assets, instruments, seed: int) -> None:
        st, rng = self.st, np.random.default_rng(seed)
        names = [a.name for a in assets]
        for aid in range(1, N_ACCOUNTS + 1):
            row = st.add_account(aid)                 # partition aid % 2
            usd = float(rng.uniform(1_000, 50_000))
            st.set_balance(row, 0, int(usd * 1e6))
            k = int(rng.integers(1, 4))
            for i in rng.choice(HELD, k, replace=False).tolist():
                ins = instruments[i]
                notional_usd = usd * float(rng.uniform(1, 20))
                side = 1 if rng.random() < 0.5 else -1
                entry = ins.mark_price * float(np.exp(rng.normal(0, 0.01)))
                sc = assets[names.index(ins.settle)].scale
                if ins.kind.is_inverse:
                    qty = side * max(1, round(notional_usd / ins.contract_size))
                    cost = round(qty * ins.contract_size / entry * sc)
                    notional = abs(qty) * ins.contract_size / ins.mark_price
                else:
                    qty = side * max(1, round(notional_usd / (ins.contract_size * ins.mark_price) * ins.qty_scale))
                    cost = round(qty / ins.qty_scale * ins.contract_size * entry * sc)
                    notional = abs(qty) / ins.qty_scale * ins.contract_size * ins.mark_price
                iso = rng.random() < 0.15
                st.set_position(row, i, qty, cost, mode=int(L.Mode.ISOLATED if iso else L.Mode.CROSS),
                                isolated_margin=round(notional * float(rng.uniform(0.01, 0.08)) * sc) if iso else 0)

    def close(self) -> None:
        self.st.unlink()
        self.st.detach()

    def flagged(self) -> set[int]:
        return set(np.flatnonzero(self.st.accounts["flags"] & OUT).tolist())


@pytest.fixture(scope="module")
def book():
    """Read-only uses (the trigger search, the encoder)."""
    w = World(seed=11)
    yield w
    w.close()


@pytest.fixture
def world():
    w = World(seed=11)
    yield w
    w.close()


# --------------------------------------------------------------------------- references
def reference(w: World, moves, flagged: set[int]) -> list[tuple]:
    """What stage_1a must send for ``moves`` [(instrument, new mark, previous mark)], in
    order: instrument by instrument, partition slot by slot, each crossed row
    (HolderIndex.candidates) not already outstanding decided by ``decide`` at the current
    prices. ``flagged`` is updated with the rows that got orders."""
    snap = w.st.price_snapshot()
    out = []
    for i, new, old in moves:
        for idx in w.idx:
            for row in idx.candidates(i, new, old).tolist():
                if row in flagged:
                    continue
                orders = decide(w.st, row, snap)
                out += [(row, o.account_id, o.instrument, o.qty_units, o.limit_price_units, int(o.reason))
                        for o in orders]
                if orders:
                    flagged.add(row)
    return out


def expected_frame(seq_before: int, rec) -> bytes:
    """Sequencer.encode_known of an order record (ORDER_COLUMNS); tick_seq back to uint64."""
    fields = {"order_id": rec[6], "account": rec[1], "instrument_id": rec[2], "qty_units": rec[3],
              "limit_price_units": rec[4], "reason": rec[5], "tick_seq": rec[7] % (1 << 64),
              "tick_recv_ns": rec[8], "decided_ns": rec[9], "sent_ns": rec[10]}
    return Sequencer(last=seq_before).encode_known(MsgType.LIQUIDATION_ORDER, fields, ts_ns=rec[10])


def check_call(w: World, seq_before: int, order_id_before: int, want: list[tuple], tick_seq, tick_recv_ns
               ) -> list[dict]:
    """The last call's frames and records against ``want`` (rows and fields, in order);
    ``tick_seq``/``tick_recv_ns``: one value for every order, or one per order."""
    tp = w.tp
    if isinstance(tick_seq, int):
        tick_seq, tick_recv_ns = [tick_seq] * len(want), [tick_recv_ns] * len(want)
    frames, recs = tp.frames, tp.orders()
    assert recs.shape == (len(want), len(_margin.ORDER_COLUMNS)) and tp.n_orders == len(frames) == len(want)
    assert tp.seq == seq_before + len(want) and tp.order_id == order_id_before + len(want)
    got = []
    for j, (frame, rec) in enumerate(zip(frames, recs.tolist())):
        m = decode(frame)
        assert type(m) is Message and m.type == MsgType.LIQUIDATION_ORDER, m
        f = m.fields
        assert (m.seq, m.ts_ns) == (seq_before + 1 + j, f["sent_ns"])
        assert frame == expected_frame(seq_before + j, rec)
        assert rec[:6] == [want[j][0], *[f[k] for k in FIELDS]]
        assert (rec[6], rec[8], rec[9], rec[10]) == (f["order_id"], f["tick_recv_ns"], f["decided_ns"],
                                                     f["sent_ns"])
        assert rec[7] % (1 << 64) == f["tick_seq"] == tick_seq[j] and f["tick_recv_ns"] == tick_recv_ns[j]
        assert f["order_id"] == order_id_before + 1 + j
        assert 0 < f["decided_ns"] <= f["sent_ns"]
        assert f["account"] == int(w.st.accounts["account_id"][rec[0]])
        got.append(f)
    assert [tuple(f[k] for k in FIELDS) for f in got] == [x[1:] for x in want]
    return got


# --------------------------------------------------------------------------- 1. the frame
# Edges of every msgpack int format: positive fixint 0..127, uint8 ..255, uint16 ..65535,
# uint32 ..2**32-1, uint64 above; negative fixint -32..-1, int8 ..-128, int16 ..-32768,
# int32 ..-2**31, int64 below.
EDGES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, I64_MAX,
         -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, I64_MIN]
U_EDGES = [e for e in EDGES if e >= 0] + [I64_MAX + 1, U64_MAX - 1, U64_MAX]

i64 = hs.one_of(hs.sampled_from(EDGES), hs.integers(I64_MIN, I64_MAX), hs.integers(-300, 70_000))
ids = hs.one_of(hs.sampled_from([e for e in EDGES if e >= 0]), hs.integers(0, I64_MAX), hs.integers(0, 70_000))
u64 = hs.one_of(hs.sampled_from(U_EDGES), hs.integers(0, U64_MAX), hs.integers(0, 70_000))


def encode_and_check(tp, seq_before: int, order_id_before: int, row, account, instrument, qty, limit,
                     reason, tick_seq, tick_recv_ns, decided_ns, decodable: bool) -> None:
    tp.seq, tp.order_id = seq_before, order_id_before
    frame, rec = tp.encode_order(row, account, instrument, qty, limit, reason, tick_seq, tick_recv_ns,
                                 decided_ns)
    order_id = order_id_before + 1
    assert tp.seq == seq_before + 1 and tp.order_id == order_id
    # the record: ORDER_COLUMNS, tick_seq as int64 (a uint64 above 2**63 - 1 reads negative)
    tick_i64 = tick_seq - (1 << 64) if tick_seq > I64_MAX else tick_seq
    assert rec[:10] == [row, account, instrument, qty, limit, reason, order_id, tick_i64, tick_recv_ns,
                        decided_ns]
    sent = rec[10]
    assert abs(sent - time.time_ns()) < 60 * 10**9                      # the wall clock, ns
    fields = {"order_id": order_id, "account": account, "instrument_id": instrument, "qty_units": qty,
              "limit_price_units": limit, "reason": reason, "tick_seq": tick_seq, "tick_recv_ns": tick_recv_ns,
              "decided_ns": decided_ns, "sent_ns": sent}
    assert frame == Sequencer(last=seq_before).encode_known(MsgType.LIQUIDATION_ORDER, fields, ts_ns=sent)
    if decodable:
        m = decode(frame)
        assert m == Message(MsgType.LIQUIDATION_ORDER, seq_before + 1, sent, fields)


@settings(max_examples=300, deadline=None)
@given(seq_before=hs.one_of(hs.sampled_from(U_EDGES[:-1]), hs.integers(0, U64_MAX - 1)),
       order_id_before=hs.one_of(hs.sampled_from([0, 126, 127, 254, 255, 65534, 65535, 2**32 - 1, I64_MAX - 1]),
                                 hs.integers(0, I64_MAX - 1)),
       account=ids, instrument=ids, qty=i64, limit=i64, reason=hs.integers(0, 9999),
       tick_seq=u64, tick_recv_ns=i64, decided_ns=i64, row=i64)
def test_encode_order_is_the_reference_frame(book, seq_before, order_id_before, account, instrument, qty,
                                             limit, reason, tick_seq, tick_recv_ns, decided_ns, row):
    # Fields in the schema's domain (ids >= 0, reason 0..9999): the frame is the reference's
    # bytes and decodes to exactly these fields, seq = seq_before + 1, ts_ns = sent_ns.
    encode_and_check(book.tp, seq_before, order_id_before, row, account, instrument, qty, limit, reason,
                     tick_seq, tick_recv_ns, decided_ns, decodable=True)


@settings(max_examples=150, deadline=None)
@given(account=i64, instrument=i64, reason=i64, qty=i64, limit=i64, tick_seq=u64, decided_ns=i64)
def test_encode_order_bytes_outside_the_schema_domain(book, account, instrument, reason, qty, limit, tick_seq,
                                                      decided_ns):
    # The encoder itself is schema-blind like encode_known: negative ids and reasons are
    # written with the same (signed) msgpack formats.
    encode_and_check(book.tp, 41, 7, 3, account, instrument, qty, limit, reason, tick_seq, -5, decided_ns,
                     decodable=False)


def test_encode_order_every_int_width(book):
    # the edges cover all ten msgpack int formats (first byte: fixint, 0xcc..0xcf, neg fixint,
    # 0xd0..0xd3), in every int field of the frame, and the header's seq up to 2**64 - 1
    kinds = {"neg" if b >= 0xe0 else b if b >= 0xcc else "fix" for b in (msgpack.packb(e)[0] for e in EDGES)}
    assert kinds == {"fix", "neg", 0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd1, 0xd2, 0xd3}
    for e in EDGES:
        idv = e if e >= 0 else 5
        encode_and_check(book.tp, idv % U64_MAX, max(0, min(idv, I64_MAX - 1)), e, idv, idv, e, e,
                         min(idv, 9999), idv, e, e, decodable=True)
        encode_and_check(book.tp, 0, 0, e, e, e, e, e, e, 0, e, e, decodable=False)
    for u in U_EDGES:
        encode_and_check(book.tp, u if u < U64_MAX else U64_MAX - 1, 0, 0, 1, 2, -3, 4, 6001, u, 5, 6,
                         decodable=True)


# --------------------------------------------------------------------------- 2. the trigger search
def test_book_has_dense_triggers(book):
    # the tables came through on_triggers (HolderIndex.refresh_triggers -> tp.set_triggers):
    # every held instrument has long and short triggers in both partitions, some within 5 %
    # of the mark, so the searches below really cross some
    for k, idx in enumerate(book.idx):
        for i in HELD:
            lt, lr, stt, sr = idx.triggers[i]
            assert len(lt) > 50 and len(stt) > 50, (k, i)
            m = book.marks0[i]
            assert np.sum(np.abs(lt / m - 1) < 0.05) >= 5 and np.sum(np.abs(stt / m - 1) < 0.05) >= 5, (k, i)
            # the C copy: a move from the top finite long trigger + 1 % to 0 crosses every
            # long with a trigger in [0, that) (not +inf: already breached; not -inf: none)
            top = float(lt[np.isfinite(lt)].max()) * 1.01
            assert book.tp.crossed(k, i, 0.0, top) == lr[(lt >= 0) & (lt < top)][::-1].tolist()


def marks_for(book, k, i):
    lt, _, stt, _ = book.idx[k].triggers[i]
    vals = np.concatenate([lt, stt])
    return vals, float(book.marks0[i])


@pytest.mark.parametrize("k", range(N_PARTS))
@pytest.mark.parametrize("i", HELD + (5,))      # 5: DOGEUSDT, held by nobody (empty tables)
def test_crossed_at_every_trigger_value(book, k, i):
    # Exact ties: every trigger value (and its neighbours one ulp away) as the new mark and
    # as the previous one, against the mark, +-5 %, 0, +-inf and NaN; mark == prev -> [].
    vals, m = marks_for(book, k, i)
    idx, tp = book.idx[k], book.tp
    points = [m, 0.95 * m, 1.05 * m, 0.0, math.inf, -math.inf, math.nan]
    for t in vals.tolist():
        for x in (t, math.nextafter(t, -math.inf), math.nextafter(t, math.inf)):
            for other in points:
                assert tp.crossed(k, i, x, other) == idx.candidates(i, x, other).tolist()
                assert tp.crossed(k, i, other, x) == idx.candidates(i, other, x).tolist()
            assert tp.crossed(k, i, x, x) == [] == idx.candidates(i, x, x).tolist()
    assert tp.crossed(k, i, math.nan, m) == [] == idx.candidates(i, math.nan, m).tolist()


@settings(max_examples=400, deadline=None)
@given(data=hs.data(), k=hs.integers(0, N_PARTS - 1), i=hs.sampled_from(HELD))
def test_crossed_equals_candidates(book, data, k, i):
    vals, m = marks_for(book, k, i)
    price = hs.one_of(hs.sampled_from(vals.tolist()), hs.floats(0.85 * m, 1.15 * m),
                      hs.floats(0.995 * m, 1.005 * m), hs.sampled_from([m, 0.0, math.inf, -math.inf]),
                      hs.floats(0.0, 10 * m))
    mark, prev = data.draw(price), data.draw(price)
    if data.draw(hs.booleans()):
        prev = mark                                           # no move: nothing crossed
    got = book.tp.crossed(k, i, mark, prev)
    assert got == book.idx[k].candidates(i, mark, prev).tolist()
    if mark == prev:
        assert got == []


def test_crossed_many_triggers_both_ways(book):
    # seeded: prev and mark each the mark x exp(N(0, 0.1)) (mostly within +-30 %): moves
    # that cross tens of triggers of a side, in both directions
    rng = np.random.default_rng(4)
    n_big = 0
    for _ in range(2000):
        k, i = int(rng.integers(N_PARTS)), HELD[int(rng.integers(len(HELD)))]
        m = float(book.marks0[i])
        prev, mark = (m * float(np.exp(rng.normal(0, 0.1))) for _ in range(2))
        got = book.tp.crossed(k, i, mark, prev)
        assert got == book.idx[k].candidates(i, mark, prev).tolist()
        n_big += len(got) > 40
    assert n_big > 200


def test_crossed_on_tables_with_ties_and_infinities(book):
    # hand-made tables through the same set_triggers, held to HolderIndex.candidates on the
    # same arrays: duplicated triggers keep their table order (stable), -inf/+inf at the ends
    lt = np.array([-math.inf, 90.0, 95.0, 95.0, 95.0, 99.5, 100.0, math.inf, math.inf])
    lr = np.arange(10, 19, dtype=np.int64)
    stt = np.array([-math.inf, 100.0, 100.0, 100.5, 105.0, 105.0, math.inf])
    sr = np.arange(30, 37, dtype=np.int64)
    tp = _margin.TickPath(*_tp_args(book, n_parts=1, n_i=2))
    tp.set_triggers(0, 1, lt, lr, stt, sr)
    fake = types.SimpleNamespace(triggers=[None, (lt, lr, stt, sr)])
    pts = sorted(set(lt.tolist() + stt.tolist() + [0.0, 50.0, 97.0, 100.2, 103.0, 200.0]))
    pts += [math.nextafter(p, q) for p in (95.0, 100.0, 105.0) for q in (-math.inf, math.inf)]
    for mark in pts:
        for prev in pts:
            want = margin.HolderIndex.candidates(fake, 1, mark, prev).tolist()
            assert tp.crossed(0, 1, mark, prev) == want, (mark, prev)
    # 100 -> 95: longs with 95 <= t <= 100, most breached first: 100 (16), 99.5 (15), then
    # 95 x3 (14, 13, 12). 100 is in: a long whose trigger is 100 sat exactly at maintenance
    # there (not in breach, E < MM is strict) and is in breach at 95.
    assert tp.crossed(0, 1, 95.0, 100.0) == [16, 15, 14, 13, 12]
    # 100 -> 105: shorts with 100 <= t <= 105: 100 x2 (31, 32), 100.5 (33), 105 (34), 105 (35)
    assert tp.crossed(0, 1, 105.0, 100.0) == [31, 32, 33, 34, 35]
    assert tp.crossed(0, 0, 1.0, 2.0) == []                 # instrument 0 never set: empty
    with pytest.raises(IndexError):
        tp.set_triggers(1, 0, lt, lr, stt, sr)
    with pytest.raises(ValueError):
        tp.set_triggers(0, 0, lt, lr[:-1], stt, sr)


def _tp_args(w: World, n_parts: int, n_i: int):
    st = w.st
    return (st.addr(st.instruments), st.addr(st.prices), st.addr(st.assets), len(st.assets),
            st.addr(st.accounts), st.addr(st.positions), st.slots_per_account, n_i, n_parts,
            np.zeros(n_i, np.uint64), np.zeros(n_i), 0, DEFAULT_HEALTH_FACTOR)


# --------------------------------------------------------------------------- 3. stage_1a
def publish(w: World, i: int, mark: float, tick_seq: int, ts_ns: int, frozen: bool = False) -> float:
    """Publish a mark; return the previous one stage_1a will compare it with."""
    old = float(w.prev_marks[i])
    w.st.publish_mark(i, mark, ts_ns=ts_ns, tick_seq=tick_seq, frozen=frozen)
    return old


def test_stage_1a_end_to_end(world):
    w, tp, st = world, world.tp, world.st
    i = BTCUSDT
    m0 = float(w.marks0[i])
    assert tp.stage_1a() == 0 and tp.frames == [] and tp.changed == []       # nothing moved yet
    others_seq, others_mark = w.last_seqs.copy(), w.prev_marks.copy()
    seq_before = w.last_seqs[i]
    acct_seq0 = st.accounts["seq"].copy()

    # move 1: BTCUSDT -2.5 % with the tick's seq 2**63 + 5 (a uint64 the int64 record reads
    # as 2**63 + 5 - 2**64 = -2**63 + 5) received at 1_700_000_000_123_456_789 ns
    m1, tick1, recv1 = m0 * 0.975, (1 << 63) + 5, 1_700_000_000_123_456_789
    old = publish(w, i, m1, tick1, recv1)
    assert old == m0
    flagged = w.flagged()
    assert flagged == set()
    want1 = reference(w, [(i, m1, m0)], flagged)   # computed before: stage_1a only adds flags
    n = tp.stage_1a()
    assert n == len(want1) == len(tp.frames) and tp.changed == [i] and tp.fallback == []
    got1 = check_call(w, 0, ORDER_ID_BASE, want1, tick1, recv1)
    rows1 = list(dict.fromkeys(r[0] for r in want1))
    # a real test: many accounts (both partitions), every reason, several instruments. This
    # seed gives 19 crossed accounts, all ordered: 21 orders, 11 below bankruptcy (6003),
    # 5 cross below maintenance (6001), 5 isolated (6002); 19 on BTCUSDT, 1 ETHUSDT, 1 BTCUSDC
    assert len(rows1) == sum(len(idx.candidates(i, m1, m0)) for idx in w.idx) == 19
    assert {r % 2 for r in (st.accounts["account_id"][rows1].tolist())} == {0, 1}
    assert sorted(collections.Counter(f["reason"] for f in got1).items()) == [(6001, 5), (6002, 5), (6003, 11)]
    assert sorted(collections.Counter(f["instrument_id"] for f in got1).items()) == [(0, 19), (1, 1), (30, 1)]
    assert tp.orders()[:, 7].view(np.uint64).tolist() == [tick1] * n
    # every ordered account, and only those, is flagged outstanding (under its seqlock: +2)
    assert w.flagged() == set(rows1)
    assert np.array_equal(st.accounts["seq"][rows1], acct_seq0[rows1] + 2)
    assert np.all(st.accounts["seq"] % 2 == 0)
    # last_seqs / prev_marks updated in place for i only
    assert w.last_seqs[i] == seq_before + 1 == st.prices[i]["price_seq"] and w.prev_marks[i] == m1
    mask = np.arange(len(w.last_seqs)) != i
    assert np.array_equal(w.last_seqs[mask], others_seq[mask])
    assert np.array_equal(w.prev_marks[mask], others_mark[mask])

    # nothing new: 0, no frames, nothing changed, no records
    assert tp.stage_1a() == 0 and tp.frames == [] and tp.changed == [] and tp.orders().shape == (0, 11)


def test_stage_1a_moves_and_reissue(world):
    w, tp = world, world.tp
    i = BTCUSDT
    m0 = float(w.marks0[i])
    m1, m2 = m0 * 0.975, m0 * 1.02

    # move 1: -2.5 %
    publish(w, i, m1, 1001, 10**18)
    flagged = w.flagged()
    want1 = reference(w, [(i, m1, m0)], flagged)
    assert tp.stage_1a() == len(want1) > 0
    got1 = check_call(w, 0, ORDER_ID_BASE, want1, 1001, 10**18)
    rows1 = list(dict.fromkeys(r[0] for r in want1))

    # move 2: up to +2 % (shorts with m1 < t <= m2, none of them outstanding yet)
    seq_o, oid_o = tp.seq, tp.order_id
    publish(w, i, m2, 1002, 10**18 + 1)
    want2 = reference(w, [(i, m2, m1)], flagged)
    assert tp.stage_1a() == len(want2) > 0 and tp.changed == [i]
    check_call(w, seq_o, oid_o, want2, 1002, 10**18 + 1)
    assert not set(r[0] for r in want2) & set(rows1)
    assert w.flagged() == set(rows1) | {r[0] for r in want2}

    # move 3: back down to m1: crosses every long with m1 <= t <= m2, the first move's
    # rows among them, all outstanding: nothing for them. Longs already in breach when the
    # tables were solved (at m0) have their trigger now (it was +inf, which no search
    # between two marks crosses: 1a never found them): those healthy at m2 and in breach
    # at m1 get their orders now, found by 1a, as the reference says
    seq_o, oid_o = tp.seq, tp.order_id
    publish(w, i, m1, 1003, 10**18 + 2)
    crossed = [r for idx in w.idx for r in idx.candidates(i, m1, m2).tolist()]
    assert set(rows1) <= set(crossed)
    want3 = reference(w, [(i, m1, m2)], w.flagged())
    assert want3 and not {r[0] for r in want3} & set(rows1)      # the seeded book has one: row 543
    assert tp.stage_1a() == len(want3) and tp.changed == [i] and w.prev_marks[i] == m1
    check_call(w, seq_o, oid_o, want3, 1003, 10**18 + 2)
    rows3 = {r[0] for r in want3}
    seq_o, oid_o = tp.seq, tp.order_id

    # liquidate without reissue: all outstanding -> nothing; with reissue: the same orders
    # as move 1 (same prices), with the given tick_seq / tick_recv_ns and new ids
    rows = np.array(rows1, np.int64)
    assert tp.liquidate(rows, 9, 99) == 0 and tp.frames == []
    assert tp.liquidate(rows, U64_MAX, -7, reissue=True) == len(want1)
    assert tp.changed == []
    got = check_call(w, seq_o, oid_o, want1, U64_MAX, -7)
    key = lambda fs: [tuple(f[k] for k in FIELDS) for f in fs]   # noqa: E731
    assert key(got) == key(got1)
    assert w.flagged() == set(rows1) | {r[0] for r in want2} | rows3


def test_stage_1a_two_instruments_one_call(world):
    # ETHUSDT down 2.5 % and BTCUSD (inverse) up 2.5 % before one call: instrument order
    # (ETHUSDT = 1 before BTCUSD = 37, whatever the publish order), then partition slot
    # order; an account crossed by both is ordered at most once (outstanding after the
    # first); changed lists both, in instrument order; each order carries its own
    # instrument's tick_seq / tick_recv_ns
    w, tp = world, world.tp
    e0, b0 = float(w.marks0[ETHUSDT]), float(w.marks0[BTCUSD])
    e1, b1 = e0 * 0.975, b0 * 1.025
    publish(w, BTCUSD, b1, 21, 2_000)
    publish(w, ETHUSDT, e1, 22, 3_000)
    flagged = w.flagged()
    want_eth = reference(w, [(ETHUSDT, e1, e0)], flagged)
    want_btc = reference(w, [(BTCUSD, b1, b0)], flagged)        # after ETHUSDT's flags
    assert want_eth and want_btc
    want = want_eth + want_btc
    assert tp.stage_1a() == len(want) and tp.changed == [ETHUSDT, BTCUSD] and tp.fallback == []
    frames = [decode(f).fields for f in tp.frames]
    assert [tuple(f[k] for k in FIELDS) for f in frames] == [x[1:] for x in want]
    assert [r[0] for r in tp.orders().tolist()] == [x[0] for x in want]
    ticks = [(f["tick_seq"], f["tick_recv_ns"]) for f in frames]
    assert ticks == [(22, 3_000)] * len(want_eth) + [(21, 2_000)] * len(want_btc)
    assert w.prev_marks[ETHUSDT] == e1 and w.prev_marks[BTCUSD] == b1
    assert w.flagged() == {x[0] for x in want}


def test_stage_1a_account_crossed_by_two_instruments():
    # Account 10_001 (partition 1): 5,000 USDT, cross long 2 BTC of BTCUSDT and 2 BTC of
    # BTCUSDC, both entered at 95,000 (notional 190,000 each; MM per position, tier 2:
    # 190,000 x 0.5 % - 50 = 900; both 1,800 < equity 5,000: healthy). Each trigger, the
    # other mark held: 5,000 - 2 d = MM(95,000 - d) ~ 1,800 -> d ~ 1,600, i.e. ~1.7 % down;
    # both marks -2.5 % cross both. stage_1a takes BTCUSDT (0) first: decided with both marks
    # moved, ordered, flagged; BTCUSDC (30) crosses it again and skips it.
    def extra(st):
        row = st.add_account(10_001)
        st.set_balance(row, 0, 5_000 * 10**6)
        for i in (BTCUSDT, BTCUSDC):
            st.set_position(row, i, 2_000, 2 * 95_000 * 10**6)

    w = World(seed=11, extra=extra)
    try:
        tp, row = w.tp, w.st.row_of(10_001)
        m0, u0 = float(w.marks0[BTCUSDT]), float(w.marks0[BTCUSDC])
        assert w.st.accounts["flags"][row] & OUT == 0
        publish(w, BTCUSDC, u0 * 0.975, 31, 4_000)
        publish(w, BTCUSDT, m0 * 0.975, 32, 5_000)
        crossed = [[r for idx in w.idx for r in idx.candidates(i, float(w.marks0[i]) * 0.975,
                                                                  float(w.marks0[i])).tolist()]
                   for i in (BTCUSDT, BTCUSDC)]
        assert row in crossed[0] and row in crossed[1]
        flagged = set()
        want = reference(w, [(BTCUSDT, m0 * 0.975, m0), (BTCUSDC, u0 * 0.975, u0)], flagged)
        mine = [x for x in want if x[0] == row]
        assert mine and {x[2] for x in mine} == {BTCUSDT, BTCUSDC}   # it closes in both
        n0 = len(reference(w, [(BTCUSDT, m0 * 0.975, m0)], set()))   # BTCUSDT's part
        assert 0 < n0 < len(want)
        assert tp.stage_1a() == len(want) and tp.changed == [BTCUSDT, BTCUSDC]
        got = check_call(w, 0, ORDER_ID_BASE, want, [32] * n0 + [31] * (len(want) - n0),
                         [5_000] * n0 + [4_000] * (len(want) - n0))
        # its orders come once, in BTCUSDT's part (its tick), none in BTCUSDC's
        assert [(f["tick_seq"], f["instrument_id"]) for f in got if f["account"] == 10_001] == \
            [(32, x[2]) for x in mine]
        assert w.st.accounts["flags"][row] & OUT
    finally:
        w.close()


def test_collateral_price_move_is_flagged(world):
    # assets_moved: set by any snapshot that sees a collateral price differ from the last
    # one (the worker resets it after book_orders); a mark-less call still reports it
    tp, st = world.tp, world.st
    assert tp.assets_moved                                    # set at construction
    assert tp.stage_1a() == 0 and tp.assets_moved             # first snapshot: 0 -> the prices
    tp.assets_moved = False
    assert tp.stage_1a() == 0 and not tp.assets_moved
    st.publish_asset_price(2, 96_000.0)                       # BTC collateral 95,000 -> 96,000
    assert tp.stage_1a() == 0 and tp.changed == [] and tp.assets_moved
    assert tp.asset_px[:3].tolist() == [1.0, 1.0, 96_000.0]
    tp.assets_moved = False
    assert tp.stage_1a() == 0 and not tp.assets_moved          # unchanged since: not flagged


# --------------------------------------------------------------------------- 4. frozen
def test_frozen_price_pauses_liquidations(world):
    w, tp = world, world.tp
    i = BTCUSDT
    m0 = float(w.marks0[i])
    m1 = m0 * 0.975
    seq0 = int(w.last_seqs[i])
    publish(w, i, m1, 5, 6, frozen=True)
    assert reference(w, [(i, m1, m0)], set())                    # this move would order
    assert tp.stage_1a() == 0 and tp.frames == [] and tp.changed == [i]
    assert w.last_seqs[i] == seq0 + 1                            # the sequence is consumed
    assert w.prev_marks[i] == m0                                 # but the mark is not taken
    assert w.flagged() == set() and tp.orders().shape == (0, 11)
    # unfrozen at the same mark: the crossing counts from m0, the last mark taken
    publish(w, i, m1, 7, 8)
    want = reference(w, [(i, m1, m0)], set())
    assert tp.stage_1a() == len(want) > 0 and tp.changed == [i]
    check_call(w, 0, ORDER_ID_BASE, want, 7, 8)
    assert w.prev_marks[i] == m1


# --------------------------------------------------------------------------- 5. bad prices
@pytest.mark.parametrize("where,bad", [("mark", 0.0), ("mark", math.nan), ("mark", -1.0), ("mark", math.inf),
                                       ("asset", 0.0), ("asset", math.nan)])
def test_bad_price_does_nothing(world, where, bad):
    w, tp, st = world, world.tp, world.st
    i, j = BTCUSDT, ETHUSDT
    m0 = float(w.marks0[i])
    publish(w, i, m0 * 0.975, 1, 2)
    assert tp.stage_1a() > 0 and tp.frames                      # a call with orders first
    flagged, seqs, marks = w.flagged(), w.last_seqs.copy(), w.prev_marks.copy()
    seq_o, oid_o = tp.seq, tp.order_id
    # a further breaching move of i together with the bad price elsewhere
    publish(w, i, m0 * 0.95, 3, 4)
    if where == "mark":
        st.publish_mark(j, bad, ts_ns=5, tick_seq=6)
    else:
        st.publish_asset_price(2, bad)                           # BTC collateral
    assert tp.stage_1a() == -1
    assert tp.frames == [] and tp.changed == [] and tp.fallback == [] and tp.orders().shape == (0, 11)
    assert np.array_equal(w.last_seqs, seqs) and np.array_equal(w.prev_marks, marks)
    assert w.flagged() == flagged and (tp.seq, tp.order_id) == (seq_o, oid_o)
    assert tp.liquidate(np.array([0, 1], np.int64), 0, 0, reissue=True) == -1 and tp.frames == []
    # what the worker runs next: the Python check raises the clear error
    with pytest.raises(ValueError, match="mark of instrument 1" if where == "mark" else "asset price"):
        margin._checked_snapshot(st, None)
    # the price fixed: the call goes through, i's move counted from the mark taken before
    if where == "mark":
        st.publish_mark(j, float(w.marks0[j]))
    else:
        st.publish_asset_price(2, 95_000.0)
    want = reference(w, [(i, m0 * 0.95, m0 * 0.975)], w.flagged())
    assert tp.stage_1a() == len(want) and tp.changed == ([i, j] if where == "mark" else [i])
    check_call(w, seq_o, oid_o, want, 3, 4)
    assert w.prev_marks[j] == w.marks0[j]
