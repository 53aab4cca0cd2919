"""The order-check desk (``_margin.CheckDesk``: the gateway's one-call C path) against the
reference path: ``feeds.protocol`` decoding and ``margin.pretrade_check_consistent``.

A real store in POSIX shared memory with the embedded instruments, accounts holding
collateral and positions, marks published through the seqlocks. For random requests
(known and unknown accounts and instruments, zero and huge quantities, bad prices, a
frozen instrument) the desk either answers with exactly the reply the reference path
computes -- same code, same post-trade equity and initial margin, the bytes of
``encode_check_reply`` -- or declines (None), and then only for a request the reference
path rejects with one of the codes the desk leaves to it.
"""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import _margin, _wire
from engine.codes import Code
from engine.config import load_default
from engine.risk.margin import pretrade_check_consistent
from engine.store.shm import Store
from feeds.protocol import INT64_MAX, INT64_MIN, Message, MsgType, decode, encode

LEFT_TO_REFERENCE = {Code.CHECK_UNKNOWN_ACCOUNT, Code.CHECK_UNKNOWN_INSTRUMENT, Code.CHECK_BAD_QTY,
                     Code.CHECK_BAD_PRICE, Code.CHECK_PRICE_FROZEN, Code.CHECK_ACCOUNT_BUSY}
FROZEN = 2                       # SOLUSDT's price is published frozen


@pytest.fixture(scope="module")
def world():
    cfg = load_default()
    store = Store.create(f"me-desk-{uuid.uuid4().hex[:8]}", assets=list(cfg.assets),
                         instruments=list(cfg.instruments), accounts_capacity=64, n_partitions=2,
                         slots_per_account=cfg.engine.slots_per_account, replace=True)
    for i, ins in enumerate(cfg.instruments):
        store.publish_mark(i, ins.mark_price, frozen=(i == FROZEN))
    rng = np.random.default_rng(3)
    for a in range(1, 9):
        row = store.add_account(a)
        store.set_balance(row, 0, int(rng.integers(0, 50_000)) * 10**6)           # USDT
        for i in rng.choice(2, int(rng.integers(0, 3)), replace=False).tolist():   # BTC, ETH perps
            ins = cfg.instruments[i]
            qty = int(rng.integers(-5_000, 5_000)) or 1
            entry = ins.mark_price * float(rng.uniform(0.9, 1.1))
            cost = round(qty / ins.qty_scale * ins.contract_size * entry * 10**6)
            store.set_position(row, i, qty, cost)
    ids = np.array(sorted(range(1, 9)), np.int64)
    rows = np.array([store.row_of(a) for a in ids.tolist()], np.int64)
    desk = _margin.CheckDesk(store.addr(store.instruments), store.addr(store.accounts),
                             store.addr(store.positions), store.addr(store.prices), store.addr(store.assets),
                             store.slots_per_account, len(store.instruments), len(store.assets), ids, rows,
                             np.ascontiguousarray(store.instruments["price_scale"], dtype=np.int64), 1 << 20)
    yield store, desk
    store.unlink()
    store.detach()


def reference(store: Store, account: int, instrument: int, qty: int, price_units: int):
    """The gateway's reference path (Gateway._answer_check with a fresh snapshot)."""
    row = store.row_of(account)
    if row is None:
        return Code.CHECK_UNKNOWN_ACCOUNT, 0.0, 0.0
    ok = 0 <= instrument < len(store.instruments) and price_units > 0
    price = price_units / int(store.instruments["price_scale"][instrument]) if ok else math.nan
    res = pretrade_check_consistent(store, row, instrument, qty, price, store.price_snapshot())
    eq, im = res.post_equity_usd, res.post_initial_margin_usd
    return res.code, (eq if eq == eq else 0.0), (im if im == im else 0.0)


requests = st.fixed_dictionaries({
    "request_id": st.integers(0, INT64_MAX),
    "account": st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 99]),
    "instrument_id": st.sampled_from([0, 1, 2, 3, 5, 40, 10**6]),
    "qty_units": st.one_of(st.integers(-10**7, 10**7), st.sampled_from([0, 2**62, -2**62, INT64_MAX, INT64_MIN])),
    "price_units": st.one_of(st.integers(1, 2 * 10**6), st.sampled_from([0, -1, 2**53, 2**53 + 1, INT64_MAX])),
})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests, st.integers(1, 2**64 - 1), st.integers(0, INT64_MAX))
def test_desk_answers_like_the_reference_path_or_leaves_it_to_it(world, req, seq, ts):
    store, desk = world
    frame = encode(MsgType.ORDER_CHECK, req, seq=7, ts_ns=1)
    got = desk.answer(frame, seq, ts)
    code, eq, im = reference(store, req["account"], req["instrument_id"], req["qty_units"], req["price_units"])
    if got is None:
        assert code in LEFT_TO_REFERENCE or req["price_units"] > 2**53, (code, req)
        return
    assert got == _wire.encode_check_reply(seq, ts, req["request_id"], int(code), eq, im)
    m = decode(got)
    assert type(m) is Message and m.type == MsgType.ORDER_CHECK_REPLY and m.seq == seq


def test_desk_takes_the_common_case_and_declines_malformed_frames(world):
    store, desk = world
    good = {"request_id": 1, "account": 1, "instrument_id": 0, "qty_units": 10, "price_units": 950_000}
    frame = encode(MsgType.ORDER_CHECK, good, seq=1, ts_ns=1)
    assert desk.answer(frame, 5, 6) is not None             # the hot path really is taken
    assert desk.answer(frame + b"\x00", 5, 6) is None       # trailing byte: WIRE_MALFORMED there
    assert desk.answer(b"", 5, 6) is None
    assert desk.answer(frame[:-1], 5, 6) is None
    frozen = dict(good, instrument_id=FROZEN)
    assert desk.answer(encode(MsgType.ORDER_CHECK, frozen, seq=1, ts_ns=1), 5, 6) is None
    assert reference(store, 1, FROZEN, 10, 950_000)[0] == Code.CHECK_PRICE_FROZEN


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=160), st.integers(0, 159), st.integers(0, 255))
def test_desk_survives_any_bytes_and_mutations(world, raw, at, byte):
    # Random bytes, and a valid request with one byte changed: the desk never raises; when
    # it answers, the frame is a valid ORDER_CHECK by the reference decoder.
    store, desk = world
    good = bytearray(encode(MsgType.ORDER_CHECK, {"request_id": 9, "account": 2, "instrument_id": 1,
                                                  "qty_units": -40, "price_units": 34_000}, seq=3, ts_ns=4))
    good[at % len(good)] = byte
    for frame in (raw, bytes(good), memoryview(bytes(good))):
        got = desk.answer(frame, 1, 2)
        if got is not None:
            m = decode(bytes(frame))
            assert type(m) is Message and m.type == MsgType.ORDER_CHECK


def test_an_increase_too_small_for_a_double_to_see_is_not_a_reduction():
    """A BTCUSDT long of 2**54 units (18,014,398,509,481.984 BTC) bought at a mark of 0.1,
    no collateral: equity 0, and the position's IM is above 0. Buying 1 more unit
    increases it, so it needs margin and is refused 4001. The desk decided "a pure
    reduction, always accepted" in doubles, where 2**54 + 1 == 2**54 (the spacing is 4
    there): it accepted. Now the reduction is decided in integer units; selling 1 unit
    is still a reduction, accepted whatever the margin."""
    from fractions import Fraction

    from engine.risk import reference as ref

    cfg = load_default()
    store = Store.create(None, assets=list(cfg.assets), instruments=list(cfg.instruments), accounts_capacity=4,
                         n_partitions=1, slots_per_account=cfg.engine.slots_per_account)
    for i, ins in enumerate(cfg.instruments):
        store.publish_mark(i, 0.1 if i == 0 else ins.mark_price)
    row = store.add_account(1)
    q = 2**54
    store.set_position(row, 0, q, round(q / 1000 * 0.1 * 10**6))     # qty_scale 1000: at the mark
    ids, rows = np.array([1], np.int64), np.array([row], np.int64)
    desk = _margin.CheckDesk(store.addr(store.instruments), store.addr(store.accounts), store.addr(store.positions),
                             store.addr(store.prices), store.addr(store.assets), store.slots_per_account,
                             len(store.instruments), len(store.assets), ids, rows,
                             np.ascontiguousarray(store.instruments["price_scale"], dtype=np.int64), 1 << 20)
    snap = store.price_snapshot()
    market = ref.market_from_engine(list(cfg.assets), list(cfg.instruments), snap.marks, snap.asset_px)
    ps = int(store.instruments["price_scale"][0])
    for dq, want in ((1, Code.CHECK_INSUFFICIENT_MARGIN), (-1, Code.OK)):
        frame = encode(MsgType.ORDER_CHECK, {"request_id": 1, "account": 1, "instrument_id": 0, "qty_units": dq,
                                             "price_units": 1}, seq=1, ts_ns=1)
        assert decode(desk.answer(frame, 1, 1)).fields["code"] == want, dq
        assert pretrade_check_consistent(store, row, 0, dq, 1 / ps, snap).code == want, dq
        assert ref.pretrade_check(market, ref.account_from_store(store, row), store.slots_per_account, 0, dq,
                                  Fraction(1, ps))[0] == want, dq
