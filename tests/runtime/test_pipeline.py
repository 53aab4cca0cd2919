"""The running engine end to end: real processes, real sockets, shared memory.

Each test starts a whole engine (``start_engine``: markprice, gateway, workers, liqgw on
private ipc endpoints), drives it from outside over the wire like the matching engine,
the oracle venues and custody would, and checks what comes out -- replies, liquidation
orders, events -- and the books in shared memory, against hand arithmetic (in the
comments) and against the same kernels run on a private copy of the state.

Default config: BTCUSDT is instrument 0 (qty_scale 1000: 1 unit = 0.001 BTC; price_scale
10), ETHUSDT 1 (1000, 100), SOLUSDT 2 (1, 1000); USDT is asset 0 (1e6 units per USDT).
Two partitions; an account's partition is ``account_id % 2``. Marks start at the
configured 95,000 / 3,400 / 180 until ticks move them; a mark needs 2 fresh venues.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import msgpack
import numpy as np
import pytest

from engine import _shm
from engine.codes import Code
from engine.liquidation.decide import decide
from engine.risk.margin import account_detail, pretrade_check
from engine.runtime.journal import replay
from engine.store.layout import PRICE_FROZEN, AccountFlag
from feeds.protocol import EXAMPLES, MsgType, Sequencer, decode, encode_batch
from runtime_support import (MALFORMED, USDT, apply_privately, balance, book, fee_pools, fill, money,
                             position, private_store, process_counters, wait_until)

# every test: real processes and sockets, and a hang becomes a failure after 60 s
pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BTC, ETH, SOL = 0, 1, 2                    # instrument indices
ALICE, BOB = 1, 2                          # partitions 1 and 0
FUNDED_100K = 100_000 * USDT


def alice_and_bob_100k_usdt(store) -> None:
    for acct in (ALICE, BOB):
        store.set_balance(store.add_account(acct), 0, FUNDED_100K)


def applied(run, account_id: int, qty: int, instrument: int = BTC) -> bool:
    return position(run.store, account_id, instrument)[0] == qty


def assert_books_equal(run, fills: list[dict]) -> None:
    """Live books == the same fills applied from scratch on a private store."""
    ref = apply_privately(run.config, run.setup, fills)
    assert book(run.store) == book(ref)
    assert fee_pools(run.store) == fee_pools(ref)


# --------------------------------------------------------------------------- 1. fills
def test_fills_open_then_reduce_positions_with_fees_and_conserve_money(start_engine):
    run = start_engine(alice_and_bob_100k_usdt, n_workers=2)
    st = run.store
    money_before = money(st)
    assert money_before == {0: 2 * FUNDED_100K}            # 2 x 100,000 USDT, no costs yet

    # ALICE (taker) buys 1 BTC from BOB at 50,000; fees 5 bps taker, 2 bps maker.
    f1 = fill(1, ALICE, BOB, 1000, 500_000, taker_fee=25 * USDT, maker_fee=10 * USDT)
    run.client.send_fills([f1])
    wait_until(lambda: applied(run, ALICE, 1000) and applied(run, BOB, -1000), what="fill 1")
    # V = |q| P cs S / (qs ps) = 1000 * 500,000 * 1 * 1e6 / (1000 * 10) = 50,000e6
    assert position(st, ALICE) == (1000, 50_000 * USDT)
    assert position(st, BOB) == (-1000, -50_000 * USDT)
    assert balance(st, ALICE) == 99_975 * USDT              # 100,000 - 25 fee
    assert balance(st, BOB) == 99_990 * USDT                # 100,000 - 10 fee
    pools = fee_pools(st)
    assert pools[1][0] == 25 * USDT                         # ALICE's partition 1
    assert pools[0][0] == 10 * USDT                         # BOB's partition 0
    assert money(st) == money_before

    # ALICE sells 0.4 BTC back to BOB at 51,000: realizes +400 USDT, BOB -400.
    f2 = fill(2, ALICE, BOB, -400, 510_000, taker_fee=10_200_000, maker_fee=4_080_000)
    run.client.send_fills([f2])
    wait_until(lambda: applied(run, ALICE, 600) and applied(run, BOB, -600), what="fill 2")
    # V = 400 * 510,000 * 1e6 / 1e4 = 20,400e6; cost removed = 50,000e6 * 400/1000 = 20,000e6
    # ALICE realized = +V - 20,000e6 = +400e6; BOB realized = -V - (-20,000e6) = -400e6
    assert position(st, ALICE) == (600, 30_000 * USDT)      # 50,000e6 - 20,000e6
    assert position(st, BOB) == (-600, -30_000 * USDT)
    assert balance(st, ALICE) == 100_364_800_000            # 99,975 + 400 - 10.2 USDT
    assert balance(st, BOB) == 99_585_920_000               # 99,990 - 400 - 4.08 USDT
    pools = fee_pools(st)
    assert pools[1][0] == 35_200_000                        # 25 + 10.2 USDT
    assert pools[0][0] == 14_080_000                        # 10 + 4.08 USDT
    # 100,364.8 + 99,585.92 + 35.2 + 14.08 - (30,000 - 30,000) = 200,000 USDT
    assert money(st) == money_before
    assert_books_equal(run, [f1, f2])


# --------------------------------------------------------------------------- 2. sequencing
def test_duplicate_fill_is_dropped_and_gap_is_reported_then_applied(start_engine):
    run = start_engine(alice_and_bob_100k_usdt)
    c = run.client
    fa = fill(1, ALICE, BOB, 100, 500_000, taker_fee=2_500_000, maker_fee=1_000_000)
    frame_a = c.send_fills([fa])                                # seq 1
    wait_until(lambda: applied(run, ALICE, 100), what="fill a")
    c.fills.send(frame_a)                                       # seq 1 again: duplicate
    fb = fill(2, ALICE, BOB, 200, 500_000)
    c.send_fills([fb])                                          # seq 2
    wait_until(lambda: applied(run, ALICE, 300) and applied(run, BOB, -300), what="fill b")
    # 100 + 200 = 300, not 400: the duplicate applied nothing (fee charged once: 2.5 USDT)
    assert balance(run.store, ALICE) == FUNDED_100K - 2_500_000
    assert_books_equal(run, [fa, fb])

    c.seq_fills.last = 5                                        # seqs 3, 4, 5 never sent
    fc = fill(3, BOB, ALICE, 300, 501_000)                      # BOB buys 0.3 BTC: both flat
    c.send_fills([fc])                                          # seq 6
    ev = c.event(Code.FILL_GAP)
    assert ev["detail"] == "fills 3..5 missing"
    wait_until(lambda: applied(run, ALICE, 0) and applied(run, BOB, 0), what="fill c after the gap")
    assert_books_equal(run, [fa, fb, fc])
    assert money(run.store) == {0: 2 * FUNDED_100K}


# --------------------------------------------------------------------------- 3. collateral
CAROL = 3          # 10,000 USDT, long 1 BTC entered at the 95,000 mark (upnl 0)


def carol_long_1btc_10k_usdt(store) -> None:
    row = store.add_account(CAROL)
    store.set_balance(row, 0, 10_000 * USDT)
    store.set_position(row, BTC, 1000, 95_000 * USDT)


def test_deposit_credits_and_withdrawal_below_initial_margin_is_refused(start_engine):
    run = start_engine(carol_long_1btc_10k_usdt)
    st, c = run.store, run.client
    d = account_detail(st, run.row(CAROL))
    # notional 95,000 is in tier 1 (floor 50,000, imr 1%): IM = 950 - 50,000 * (1% - 0.8%) = 850
    assert d.cross_im_usd == pytest.approx(850.0)
    assert d.cross_equity_usd == pytest.approx(10_000.0)

    c.request(MsgType.DEPOSIT, {"request_id": 31, "account": CAROL, "asset": "USDT",
                                "amount_units": 500 * USDT})
    r = c.reply()
    assert (r.type, r.fields) == (MsgType.COLLATERAL_REPLY,
                                  {"request_id": 31, "code": 0, "balance_units": 10_500 * USDT})
    before = st.read_account(run.row(CAROL))

    # 10,500 - 9,700 = 800 < IM 850: refused, nothing changes
    c.request(MsgType.WITHDRAWAL, {"request_id": 32, "account": CAROL, "asset": "USDT",
                                   "amount_units": 9_700 * USDT})
    r = c.reply()
    assert r.fields == {"request_id": 32, "code": Code.WITHDRAWAL_BELOW_INITIAL_MARGIN,
                        "balance_units": 10_500 * USDT}
    after = st.read_account(run.row(CAROL))
    assert np.array_equal(after[0]["balance"], before[0]["balance"])
    assert after[1].tobytes() == before[1].tobytes()

    # 10,500 - 9,600 = 900 >= 850: allowed
    c.request(MsgType.WITHDRAWAL, {"request_id": 33, "account": CAROL, "asset": "USDT",
                                   "amount_units": 9_600 * USDT})
    assert c.reply().fields == {"request_id": 33, "code": 0, "balance_units": 900 * USDT}
    assert balance(st, CAROL) == 900 * USDT
    # 1,000 > the 900 left: insufficient balance (3104), still 900
    c.request(MsgType.WITHDRAWAL, {"request_id": 34, "account": CAROL, "asset": "USDT",
                                   "amount_units": 1_000 * USDT})
    assert c.reply().fields == {"request_id": 34, "code": Code.WITHDRAWAL_INSUFFICIENT_BALANCE,
                                "balance_units": 900 * USDT}
    assert position(st, CAROL) == (1000, 95_000 * USDT)


def test_two_custody_clients_with_the_same_request_id_each_get_their_own_reply(start_engine):
    """request_id is unique per requester only (docs/protocol.md: "a counter is fine"),
    so two custody clients may both have request 1 at the worker at once. With the only
    worker stopped both deposits wait in the rings; each client must then get its own
    reply: Alice's balance 100,000 + 1 = 100,001 USDT, Bob's 100,000 + 2 = 100,002."""
    import zmq

    run = start_engine(alice_and_bob_100k_usdt)
    ctx = zmq.Context()
    try:
        custody = []
        for _ in range(2):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(run.config.endpoints.checks)
            custody.append(s)
        worker = run.engine.worker_pid(0)
        os.kill(worker, signal.SIGSTOP)
        try:
            for s, acct, usdt in zip(custody, (ALICE, BOB), (1, 2)):
                s.send(Sequencer().encode(MsgType.DEPOSIT, {"request_id": 1, "account": acct, "asset": "USDT",
                                                            "amount_units": usdt * USDT}))
            wait_until(lambda: not run.idle(), 5.0, "both deposits in the rings")
        finally:
            os.kill(worker, signal.SIGCONT)
        got = []
        for s in custody:
            assert s.poll(5_000), "a custody client got no reply within 5 s"
            m = decode(s.recv())
            got.append((m.type, m.fields))
    finally:
        ctx.destroy(linger=0)
    assert got == [(MsgType.COLLATERAL_REPLY, {"request_id": 1, "code": 0, "balance_units": 100_001 * USDT}),
                   (MsgType.COLLATERAL_REPLY, {"request_id": 1, "code": 0, "balance_units": 100_002 * USDT})]


# --------------------------------------------------------------------------- 4. order checks
DAVE = 4           # 1,000 USDT, flat


def dave_1k_usdt(store) -> None:
    store.set_balance(store.add_account(DAVE), 0, 1_000 * USDT)


def test_order_checks_match_pretrade_check_with_many_in_flight(start_engine):
    run = start_engine(dave_1k_usdt)
    st, c = run.store, run.client
    row = run.row(DAVE)
    # buy 0.1 BTC at 95,000: IM = 9,500 * 0.8% = 76 <= equity 1,000 -> accept (0)
    # buy 2 BTC at 95,000: notional 190,000 in tier 1: IM = 1,900 - 100 = 1,800 > 1,000 -> 4001
    cases = {100: Code.OK, 2000: Code.CHECK_INSUFFICIENT_MARGIN}
    expected = {q: pretrade_check(st, row, BTC, q, 95_000.0, st.price_snapshot()) for q in cases}
    for q, code in cases.items():
        assert expected[q].code == code
    assert expected[100].post_initial_margin_usd == pytest.approx(76.0)
    assert expected[2000].post_initial_margin_usd == pytest.approx(1_800.0)

    n = 200
    for i in range(n):                       # all in flight on one DEALER before any reply
        c.request(MsgType.ORDER_CHECK, {"request_id": 1000 + i, "account": DAVE, "instrument_id": BTC,
                                        "qty_units": 100 if i % 2 == 0 else 2000, "price_units": 950_000})
    replies = {}
    for _ in range(n):
        r = c.reply(timeout_s=5.0)
        assert r.type == MsgType.ORDER_CHECK_REPLY
        replies[r.fields["request_id"]] = r.fields
    assert sorted(replies) == list(range(1000, 1000 + n))
    for rid, f in replies.items():
        want = expected[100 if (rid - 1000) % 2 == 0 else 2000]
        assert f["code"] == want.code
        assert f["post_equity_usd"] == pytest.approx(want.post_equity_usd, rel=1e-12)
        assert f["post_initial_margin_usd"] == pytest.approx(want.post_initial_margin_usd, rel=1e-12)


# --------------------------------------------------------------------------- 5. bad input
def _raw(t: int, seq: int, **fields) -> bytes:
    """A frame the encoder would refuse (wrong field types), packed by hand."""
    return msgpack.packb({"v": 1, "t": t, "seq": seq, "ts_ns": time.time_ns(), **fields})


def test_bad_input_is_rejected_and_counted_and_changes_nothing(start_engine):
    run = start_engine(alice_and_bob_100k_usdt, price_stage="process")    # its counters in its own log
    st, c = run.store, run.client
    books0, pools0 = book(st), fee_pools(st)
    prices0 = st.prices[:3].copy()

    # fills: malformed, wrong type, unknown account, unknown instrument
    c.fills.send(MALFORMED)
    bad_type = fill(10, ALICE, BOB, 1000, 500_000)
    bad_type["qty_units"] = "1000"
    c.fills.send(_raw(MsgType.FILL, c.seq_fills.last + 1, **bad_type))   # rejected: seq not taken
    c.send_fills([fill(11, 999, BOB, 1000, 500_000)])
    c.send_fills([fill(12, ALICE, BOB, 1000, 500_000, instrument=99)])
    c.send_fills([fill(14, ALICE, ALICE, 1000, 500_000)])                 # a self-trade
    for code in (Code.WIRE_MALFORMED, Code.WIRE_BAD_FIELD_TYPE, Code.FILL_UNKNOWN_ACCOUNT,
                 Code.FILL_UNKNOWN_INSTRUMENT, Code.FILL_SAME_ACCOUNT):
        c.event(code)
    # qty -2**63: an int64, but the maker's leg (its negation) is not; once it killed the
    # gateway. Refused 3005 on the C parser's path and on the reference decoder's (map32).
    huge = fill(15, ALICE, BOB, -2**63, 500_000)
    c.send_fills([huge])
    c.event(Code.FILL_BAD_QTY)
    body = {"v": 1, "t": int(MsgType.FILL), "seq": c.seq_fills.next(), "ts_ns": time.time_ns(), **huge}
    c.fills.send(b"\xdf" + len(body).to_bytes(4, "big") +
                 b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in body.items()))
    c.event(Code.FILL_BAD_QTY)
    # a BATCH whose numbers would pass 2**64-1: 1008 (it used to kill the gateway, and
    # every snapshot after a restart)
    c.fills.send(encode_batch(MsgType.FILL, [fill(16, ALICE, BOB, 1, 500_000)] * 2, first_seq=2**64 - 1,
                              ts_ns=time.time_ns()))
    assert "seq: a batch of 2 from 18446744073709551615 passes" in c.event(Code.WIRE_BAD_VALUE)["detail"]
    # checks: malformed, wrong type, unknown type here, unknown account/instrument/asset
    c.checks.send(MALFORMED)
    r = c.reply()
    assert (r.type, r.fields["code"], r.fields["ref_seq"]) == (MsgType.REJECT, Code.WIRE_MALFORMED, 0)
    c.checks.send(_raw(MsgType.ORDER_CHECK, 77, request_id=1, account=ALICE, instrument_id=BTC,
                       qty_units=1.5, price_units=950_000))
    r = c.reply()
    assert (r.type, r.fields["code"], r.fields["ref_seq"]) == (MsgType.REJECT, Code.WIRE_BAD_FIELD_TYPE, 77)
    c.request(MsgType.ORACLE_TICK, {"venue": "a", "instrument": "BTCUSDT", "price": 1.0, "venue_ts_ns": 1})
    assert c.reply().fields["code"] == Code.WIRE_UNEXPECTED_TYPE       # a known type, not taken here
    c.checks.send(_raw(MsgType.FILL, 78, **{**EXAMPLES[MsgType.FILL], "qty_units": "x"}))
    r = c.reply()                                     # decided on its type, before its bad field
    assert (r.type, r.fields["code"], r.fields["ref_seq"]) == (MsgType.REJECT, Code.WIRE_UNEXPECTED_TYPE, 78)
    c.request(MsgType.ORDER_CHECK, {"request_id": 2, "account": 999, "instrument_id": BTC,
                                    "qty_units": 1, "price_units": 950_000})
    assert c.reply().fields["code"] == Code.CHECK_UNKNOWN_ACCOUNT
    c.request(MsgType.ORDER_CHECK, {"request_id": 3, "account": ALICE, "instrument_id": 99,
                                    "qty_units": 1, "price_units": 950_000})
    assert c.reply().fields["code"] == Code.CHECK_UNKNOWN_INSTRUMENT
    c.request(MsgType.DEPOSIT, {"request_id": 4, "account": 999, "asset": "USDT", "amount_units": 1})
    assert c.reply().fields == {"request_id": 4, "code": Code.FILL_UNKNOWN_ACCOUNT, "balance_units": 0}
    c.request(MsgType.DEPOSIT, {"request_id": 5, "account": ALICE, "asset": "DOGE", "amount_units": 1})
    assert c.reply().fields == {"request_id": 5, "code": Code.COLLATERAL_UNKNOWN_ASSET, "balance_units": 0}
    # a deposit the int64 balance cannot hold: refused, the balance unchanged (it used to
    # crash the worker, and again after each restart: the record stayed in its ring)
    c.request(MsgType.DEPOSIT, {"request_id": 7, "account": ALICE, "asset": "USDT", "amount_units": 2**63 - 1})
    assert c.reply().fields == {"request_id": 7, "code": Code.COLLATERAL_BAD_AMOUNT, "balance_units": FUNDED_100K}
    # oracle: malformed, wrong type, unknown instrument, bad price, a venue clock far ahead
    c.oracle.send(MALFORMED)
    c.oracle.send(_raw(MsgType.ORACLE_TICK, 1, venue="a", instrument="SOLUSDT", price="181",
                       venue_ts_ns=time.time_ns()))
    c.tick("DOGEUSDT", 0.1, venues=("a",))
    c.tick("SOLUSDT", -5.0, venues=("a",))
    c.tick("SOLUSDT", -6.0, venues=("a",))          # the same refusal again: counted, no second event
    # venue_ts_ns 2**63 - 1: refused 2007 (once accepted, it made every later tick of venue a
    # 2004; the valid SOL ticks below then counted 2, not 3)
    c.oracle.send(c.seq_oracle.encode(MsgType.ORACLE_TICK, {"venue": "a", "instrument": "SOLUSDT",
                                                            "price": 181.0, "venue_ts_ns": 2**63 - 1}))
    unknown = c.event(Code.ORACLE_UNKNOWN_INSTRUMENT)
    assert unknown["instrument"] is None and "venue=a instrument=DOGEUSDT price=0.1" in unknown["detail"]
    bad = c.event(Code.ORACLE_BAD_PRICE)
    assert bad["instrument"] == "SOLUSDT" and "venue=a instrument=SOLUSDT price=-5.0" in bad["detail"]
    future = c.event(Code.ORACLE_TS_FUTURE)
    assert future["instrument"] == "SOLUSDT" and "venue=a instrument=SOLUSDT price=181.0 " \
        "venue_ts_ns=9223372036854775807" in future["detail"]
    assert [e["code"] for e in c.drain_events(0.3)].count(Code.ORACLE_BAD_PRICE) == 1   # one in 10 s

    # every process still answers valid requests
    assert all(ch.proc.poll() is None for ch in run.engine.children)
    c.request(MsgType.ORDER_CHECK, {"request_id": 6, "account": ALICE, "instrument_id": BTC,
                                    "qty_units": 100, "price_units": 950_000})
    assert c.reply().fields["code"] == Code.OK
    good = fill(13, ALICE, BOB, 100, 500_000)
    c.send_fills([good])
    wait_until(lambda: applied(run, ALICE, 100) and applied(run, BOB, -100), what="the valid fill")
    c.tick("SOLUSDT", 181.0)
    wait_until(lambda: float(st.read(st.prices, SOL)["mark"]) == 181.0, what="the valid SOL mark")

    # accepted state: only the valid fill and the valid tick changed anything
    ref = apply_privately(run.config, run.setup, [good])
    assert book(st) == book(ref) and fee_pools(st) == fee_pools(ref)
    assert book(ref) != books0 and fee_pools(ref) == pools0          # no fees on the valid fill
    assert st.prices[BTC].tobytes() == prices0[BTC].tobytes()
    assert st.prices[ETH].tobytes() == prices0[ETH].tobytes()
    assert int(st.prices[SOL]["price_seq"]) == int(prices0[SOL]["price_seq"]) + 1

    run.le.__exit__(None, None, None)
    assert run.le.exit_codes == {k: 0 for k in run.le.exit_codes}
    gw = process_counters(run.log("gateway"), "gateway")
    # fills: probes + 1 malformed, 1 wrong type; checks: 1 malformed, 1 wrong type
    assert gw["reject_1001"] == c.probes + 2
    assert gw["reject_1006"] == 2
    assert gw["reject_3003"] == 1 and gw["reject_3004"] == 1 and gw["reject_3008"] == 1
    assert gw["fills"] == 1                     # the valid one only
    mp = process_counters(run.log("markprice"), "markprice")
    assert (mp["reject_1001"], mp["reject_1006"], mp["reject_2002"], mp["reject_2001"]) == (1, 1, 1, 2)
    assert mp["reject_2007"] == 1 and "reject_2004" not in mp
    assert mp["ticks"] == 3                     # the valid SOL ticks from a, b, c


# --------------------------------------------------------------------------- 6. liquidation
EVE = 11           # 5,000 USDT, long 1 BTC entered at 95,000 (partition 1)
EVE_BALANCE = 5_000


def eve_long_1btc_5k_usdt(store) -> None:
    row = store.add_account(EVE)
    store.set_balance(row, 0, EVE_BALANCE * USDT)
    store.set_position(row, BTC, 1000, 95_000 * USDT)


# Liquidatable when E < MM. For p in tier 1 (notional 50k..250k: mmr 0.5%, maint 50):
#   5,000 + (p - 95,000) < 0.005 p - 50  <=>  0.995 p < 89,950  <=>  p < 90,402.01
EVE_LIQ_PRICE = 89_950 / 0.995
ABOVE = [95_000.0, 93_000.0, 91_500.0, 90_500.0]       # steps < 5%: no venue is excluded
CROSSING = 90_300.0
BELOW = [90_000.0, 89_800.0]


def _expected_orders(run, setup, account_id: int, marks: dict[int, float]):
    """``decide`` on a private copy of the same state at ``marks``."""
    ref = private_store(run.config, setup)
    snap = ref.price_snapshot()
    for i, m in marks.items():
        snap.marks[i] = m
    return decide(ref, ref.row_of(account_id), snap)


def _tick_to(run, instrument: str, index: int, price: float, venues=("a", "b", "c")) -> list[int]:
    """Tick every venue to ``price`` and wait until it is the published mark."""
    seqs = run.client.tick(instrument, price, venues)
    wait_until(lambda: float(run.store.read(run.store.prices, index)["mark"]) == price,
               what=f"{instrument} mark {price}")
    return seqs


def _walk_down_to_crossing(run, above) -> tuple[dict, list[int]]:
    """Tick through ``above`` (no order), then to CROSSING; return its order and the seqs
    the order may name: the second venue's (the median of a, b, c moves when b agrees
    with a), or the third's when the mark-price process folded it into the same mark."""
    c = run.client
    for p in above:
        _tick_to(run, "BTCUSDT", BTC, p)
        assert p > EVE_LIQ_PRICE
    assert c.orders_within(0.2) == [], "an order before the mark crossed the liquidation price"
    seqs = c.tick("BTCUSDT", CROSSING)
    return c.order(), seqs[1:]


# Both places the mark-price stage can run (engine.price_stage): its own process, or inside
# worker 0 (which then hears the ticks itself and rings the other worker).
STAGES = pytest.mark.parametrize("price_stage", ["process", "worker"])


@STAGES
def test_price_path_gives_exactly_the_expected_liquidation(start_engine, price_stage):
    run = start_engine(eve_long_1btc_5k_usdt, n_workers=2, price_stage=price_stage)
    c = run.client
    pos = account_detail(run.store, run.row(EVE)).positions[0]
    assert pos.liquidation_price == pytest.approx(EVE_LIQ_PRICE, rel=1e-9)   # 90,402.01

    order, crossing_seq = _walk_down_to_crossing(run, ABOVE)
    [want] = _expected_orders(run, eve_long_1btc_5k_usdt, EVE, {BTC: CROSSING})
    # At 90,300: E = 5,000 - 4,700 = 300; keep n with 300/1.25 >= 0.005 n - 50 -> n <= 58,000
    # notional: keep 58,000/90,300 = 0.6423 BTC, sell ceil(357.7) = 358 units
    assert want.qty_units == -358
    assert order["account"] == EVE and order["instrument_id"] == BTC
    assert order["qty_units"] == want.qty_units                      # < 0: a sell
    assert order["limit_price_units"] == want.limit_price_units
    assert order["reason"] == Code.LIQ_BELOW_MAINTENANCE == want.reason
    assert order["tick_seq"] in crossing_seq
    assert order["tick_recv_ns"] <= order["decided_ns"] <= order["sent_ns"]
    ev = c.event(Code.LIQ_BELOW_MAINTENANCE)
    assert ev["account"] == EVE and ev["instrument"] == "BTCUSDT"
    assert json.loads(ev["detail"])["stage"] == "trigger"           # found by 1a, on the tick

    for p in BELOW:                          # deeper in breach, order still outstanding
        _tick_to(run, "BTCUSDT", BTC, p)
    assert c.orders_within(0.3) == [], "a second order for the same breach while outstanding"


FRANK = 12         # 200 USDT, long 1 ETH entered at 3,400 (partition 0)


def frank_long_1eth_200_usdt(store) -> None:
    row = store.add_account(FRANK)
    store.set_balance(row, 0, 200 * USDT)
    store.set_position(row, ETH, 1000, 3_400 * USDT)


def test_outstanding_order_is_resent_after_2s_and_cleared_once_healthy(start_engine):
    """The outstanding check (every 0.1 s): EVE's order is not filled and the mark stays
    at 90,300, so the same order (-358 units) goes out again 2 s after the first
    (REISSUE_AFTER_NS; 2.0 to 2.1 s, plus slack for a busy machine), marked as a
    re-send (tick_seq 0). Back at 95,000 she is healthy: the flag clears within a check
    or two (the full pass, every 1 s here, no longer does it), and the next breach is a
    new order at once, not a wait for the old one's 2 s."""
    run = start_engine(eve_long_1btc_5k_usdt)
    c, st, row = run.client, run.store, run.row(EVE)
    first, _ = _walk_down_to_crossing(run, ABOVE)
    sent = time.monotonic()
    again = c.order(timeout_s=4.0)
    took = time.monotonic() - sent
    assert 1.9 <= took <= 2.6, f"re-sent after {took:.2f} s"
    assert (again["account"], again["qty_units"], again["tick_seq"]) == (EVE, first["qty_units"], 0)
    _tick_to(run, "BTCUSDT", BTC, 95_000.0)
    healthy = time.monotonic()
    wait_until(lambda: not int(st.read(st.accounts, row)["flags"]) & AccountFlag.LIQUIDATION_OUTSTANDING,
               2.0, "the outstanding flag cleared")
    assert time.monotonic() - healthy <= 0.6
    assert c.orders_within(0.2) == []
    _tick_to(run, "BTCUSDT", BTC, 90_500.0)
    c.tick("BTCUSDT", CROSSING)
    assert c.order()["qty_units"] == first["qty_units"]


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]       # R, S, T (stopped), ...


def test_frozen_engine_is_stopped_then_decides_as_before(start_engine):
    """``LocalEngine.frozen`` (the latency benchmark's interleaved floor): every engine
    process is stopped (state T) inside the block and running after it; a price path
    then gives EVE's order as if the engine had never been stopped (-358 units: the
    arithmetic of test_price_path_gives_exactly_the_expected_liquidation)."""
    run = start_engine(eve_long_1btc_5k_usdt)
    with run.le.frozen() as pids:
        assert len(pids) == len(run.engine.children) >= 3          # liqgw, worker (with the price stage), gateway
        time.sleep(0.05)
        assert {_proc_state(p) for p in pids} == {"T"}
    time.sleep(0.05)
    assert "T" not in {_proc_state(p) for p in pids}
    order, crossing_seq = _walk_down_to_crossing(run, ABOVE)
    assert order["account"] == EVE and order["qty_units"] == -358
    assert order["tick_seq"] in crossing_seq


@STAGES
def test_silent_venues_freeze_the_mark_in_both_stages(start_engine, price_stage):
    """The staleness timer (every 200 ms) runs wherever the mark-price stage runs; inside
    a worker it runs after a tick's orders, not before, but it must still run when no
    tick comes. ETHUSDT quoted once by venues a and b at 3,400, then nothing: after the
    5 s staleness both are stale, the quorum of 2 is lost and the mark freezes at 3,400,
    5 to 5.2 s (one timer period) after the quotes' receive time."""
    run = start_engine(frank_long_1eth_200_usdt, price_stage=price_stage)
    st, c = run.store, run.client
    _tick_to(run, "ETHUSDT", ETH, 3_400.0, venues=("a", "b"))
    quoted = time.monotonic()
    ev = c.event(Code.EVENT_PRICE_FROZEN, timeout_s=10.0)
    took = time.monotonic() - quoted
    assert ev["instrument"] == "ETHUSDT"
    assert 4.5 <= took <= 7.0, f"frozen {took:.2f} s after the last quotes"
    assert int(st.read(st.prices, ETH)["flags"]) & PRICE_FROZEN
    assert float(st.read(st.prices, ETH)["mark"]) == 3_400.0


@STAGES
def test_a_venue_going_stale_moves_the_published_mark_in_both_stages(start_engine, price_stage):
    """ETHUSDT from venues a at 3,300 (its clock 4.5 s behind: stale 0.5 s after it
    arrives), b at 3,400 and c at 3,420: the mark is the median, 3,400. Once a is stale
    the index is median(3,400, 3,420) = 3,410 with no event (b and c agree and keep the
    quorum of 2), and the staleness timer (every 200 ms, wherever the stage runs)
    publishes it with no new tick. It published only instruments with an event: the row
    kept 3,400 until the next tick."""
    run = start_engine(alice_and_bob_100k_usdt, price_stage=price_stage)
    st, c = run.store, run.client
    for venue, price, behind_ns in (("a", 3_300.0, 4_500_000_000), ("b", 3_400.0, 0), ("c", 3_420.0, 0)):
        c.oracle.send(c.seq_oracle.encode(MsgType.ORACLE_TICK, {
            "venue": venue, "instrument": "ETHUSDT", "price": price, "venue_ts_ns": time.time_ns() - behind_ns}))
    wait_until(lambda: float(st.read(st.prices, ETH)["mark"]) == 3_410.0, 3.0, "the mark of b and c")
    assert not int(st.read(st.prices, ETH)["flags"]) & PRICE_FROZEN
    assert Code.EVENT_PRICE_FROZEN not in [e["code"] for e in c.drain_events(0.1)]


@STAGES
def test_frozen_price_produces_no_liquidation(start_engine, price_stage):
    """Only two venues quote ETHUSDT. When one alone drops 5.3% below the other, both are
    excluded (two that disagree cannot be told apart), the quorum of 2 is lost and the mark
    freezes at its last good value (7001): no liquidation although the lone venue's price
    is far below FRANK's liquidation price. Once both agree again the mark resumes (7002)
    and the crossing liquidates."""
    run = start_engine(frank_long_1eth_200_usdt, price_stage=price_stage)
    st, c = run.store, run.client
    # 200 + (p - 3,400) < 0.005 p  <=>  p < 3,200 / 0.995 = 3,216.08
    assert account_detail(st, run.row(FRANK)).positions[0].liquidation_price == \
        pytest.approx(3_200 / 0.995, rel=1e-9)
    for p in (3_400.0, 3_300.0, 3_230.0):
        _tick_to(run, "ETHUSDT", ETH, p, venues=("a", "b"))
    c.tick("ETHUSDT", 3_060.0, venues=("a",))              # |3,060 - 3,230| / 3,230 = 5.3% > 5%
    ev = c.event(Code.EVENT_PRICE_FROZEN)
    assert ev["instrument"] == "ETHUSDT"
    wait_until(lambda: int(st.read(st.prices, ETH)["flags"]) & PRICE_FROZEN, what="frozen flag")
    assert float(st.read(st.prices, ETH)["mark"]) == 3_230.0   # the last good mark
    c.tick("ETHUSDT", 2_900.0, venues=("a",))
    assert c.orders_within(0.4) == [], "a liquidation on a frozen price"

    c.tick("ETHUSDT", 3_210.0, venues=("a",))              # agrees with b again: median 3,220
    c.event(Code.EVENT_PRICE_RESUMED)
    seqs = c.tick("ETHUSDT", 3_210.0, venues=("b",))       # mark 3,210 < 3,216.08
    order = c.order()
    [want] = _expected_orders(run, frank_long_1eth_200_usdt, FRANK, {ETH: 3_210.0})
    assert (order["account"], order["instrument_id"], order["qty_units"], order["reason"],
            order["tick_seq"]) == (FRANK, ETH, want.qty_units, want.reason, seqs[0])
    assert c.orders_within(0.2) == []



def test_a_fill_leg_the_worker_refuses_is_an_event(start_engine):
    """One position slot an account: ALICE buys 0.1 BTC from BOB (both now hold BTC),
    then 1 ETH from BOB. The gateway accepts the ETH fill (its accounts exist), but
    each worker refuses its account's leg, 3007: no free slot. Each refusal is an
    ENGINE_EVENT naming the account, the instrument and the trade (it was only a
    counter before), and no ETH position appears."""
    run = start_engine(alice_and_bob_100k_usdt, slots_per_account=1)
    c = run.client
    c.send_fills([fill(1, ALICE, BOB, 100, 950_000)])                 # 0.1 BTC at 95,000
    wait_until(lambda: applied(run, ALICE, 100) and applied(run, BOB, -100), what="the BTC fill")
    c.send_fills([fill(2, ALICE, BOB, 1000, 34_000, instrument=ETH)])  # 1 ETH at 3,400
    got = {}
    for _ in range(2):
        ev = c.event(Code.FILL_POSITION_SLOTS_FULL)
        got[ev["account"]] = (ev["instrument"], json.loads(ev["detail"]))
    assert set(got) == {ALICE, BOB}
    for acct, qty in ((ALICE, 1000), (BOB, -1000)):
        instrument, d = got[acct]
        assert instrument == "ETHUSDT" and (d["trade_id"], d["qty_units"], d["price_units"]) == (2, qty, 34_000)
    assert position(run.store, ALICE, ETH)[0] == 0 and position(run.store, BOB, ETH)[0] == 0
    # and the workers live on (a refused leg once raised KeyError in the worker's
    # counters and killed it: caught by this test in session 16)
    assert all(ch.proc.poll() is None and ch.restarts == 0 for ch in run.engine.children)

def test_the_events_pub_is_one_numbered_stream(start_engine):
    """Three processes make events -- the gateway (1001 for the malformed probes that
    synced the SUB), the mark-price process (7001 frozen, 7002 resumed) and the worker
    (the liquidation order's event) -- and the events PUB numbers them as one stream
    (protocol.md section 3): every seq one more than the last received, whatever made
    the event. (Each process numbered its own events before: 1, 2, ... from each.)"""
    run = start_engine(frank_long_1eth_200_usdt, price_stage="process")
    c = run.client
    for p in (3_400.0, 3_300.0, 3_230.0):
        _tick_to(run, "ETHUSDT", ETH, p, venues=("a", "b"))
    c.tick("ETHUSDT", 3_060.0, venues=("a",))              # 5.3% apart: frozen (7001)
    c.event(Code.EVENT_PRICE_FROZEN)
    c.tick("ETHUSDT", 3_210.0, venues=("a",))              # agree again (7002)
    c.event(Code.EVENT_PRICE_RESUMED)
    c.tick("ETHUSDT", 3_210.0, venues=("b",))              # below 3,216.08: liquidated
    order = c.order()
    c.event(order["reason"])
    codes = {e["code"] for e in c.seen_events}
    assert {Code.WIRE_MALFORMED, Code.EVENT_PRICE_FROZEN, Code.EVENT_PRICE_RESUMED, order["reason"]} <= codes
    first = c.event_seqs[0]
    assert c.event_seqs == list(range(first, first + len(c.event_seqs))), c.event_seqs
    assert len(c.event_seqs) >= 4                          # at least a probe's 1001, 7001, 7002, the order's
    assert first > 1_000_000_000_000_000                   # numbered from the microsecond clock (after 2001)


# --------------------------------------------------------------------------- 7. faults
TRADERS = list(range(1, 9))                 # 4 per partition
MARK_A, MARK_B = 101, 102                   # the last fill's pair: one per partition
SPEC = [(BTC, 950_000, 50), (ETH, 340_000, 500), (SOL, 180_000, 20)]   # (ins, price units, max qty)


def traders_10m_usdt(store) -> None:
    for acct in TRADERS + [MARK_A, MARK_B]:
        store.set_balance(store.add_account(acct), 0, 10_000_000 * USDT)


def random_fills(n: int, seed: int) -> list[dict]:
    """``n`` valid fills between TRADERS near the marks (fees may be rebates), then one
    fill between MARK_A and MARK_B whose application shows everything before it is in."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        ins, px, qmax = SPEC[int(rng.integers(len(SPEC)))]
        taker, maker = (int(x) for x in rng.choice(TRADERS, 2, replace=False))
        qty = int(rng.integers(1, qmax + 1)) * (1 if rng.random() < 0.5 else -1)
        out.append(fill(k + 1, taker, maker, qty, int(px * rng.uniform(0.99, 1.01)),
                        taker_fee=int(rng.integers(0, 50_000)), maker_fee=int(rng.integers(-10_000, 20_000)),
                        instrument=ins))
    out.append(fill(n + 1, MARK_A, MARK_B, 7, 950_000))
    return out


def _send_steadily(client, fills: list[dict], per_frame: int, interval_s: float) -> None:
    t0 = time.monotonic()
    for k in range(0, len(fills), per_frame):
        client.send_fills(fills[k: k + per_frame])
        time.sleep(max(0.0, t0 + (k // per_frame + 1) * interval_s - time.monotonic()))


@pytest.mark.parametrize("kill_after_s, worker", [(0.15, 0), (0.5, 1), (0.9, 0)],
                         ids=["w0-at-0.15s", "w1-at-0.5s", "w0-at-0.9s"])
def test_worker_sigkill_under_load_applies_every_fill_exactly_once(start_engine, kill_after_s, worker):
    run = start_engine(traders_10m_usdt, n_workers=2)
    st, eng = run.store, run.engine
    money_before = money(st)
    assert money_before == {0: 10 * 10_000_000 * USDT}     # 8 traders + 2 markers, no costs yet
    fills = random_fills(3000, seed=int(kill_after_s * 100) + worker)
    # 3,001 fills in frames of 30, one every 12 ms: ~1.2 s of steady load
    sender = threading.Thread(target=_send_steadily, args=(run.client, fills, 30, 0.012))
    old_pid = eng.worker_pid(worker)
    t0 = time.monotonic()
    sender.start()
    killed = False
    try:
        while sender.is_alive() or not (applied(run, MARK_A, 7) and applied(run, MARK_B, -7)):
            if not killed and time.monotonic() - t0 >= kill_after_s:
                os.kill(old_pid, signal.SIGKILL)
                killed = True
            eng.watch_once()
            if time.monotonic() - t0 > 20:
                pytest.fail("fills not all applied 20 s after the load started")
            time.sleep(0.005)
    finally:
        sender.join(timeout=10)
    assert killed
    child = next(ch for ch in eng.children if ch.role == f"worker{worker}")
    assert child.restarts == 1 and eng.worker_pid(worker) != old_pid
    wait_until(run.idle, what="rings drained")
    # every accepted fill applied exactly once: the books equal a from-scratch application
    assert_books_equal(run, fills)
    assert money(st) == money_before
    run.le.__exit__(None, None, None)
    assert run.le.exit_codes == {k: 0 for k in run.le.exit_codes}, run.le.exit_codes
    # 3,000 + the marker fill, each frame sent once: none rejected, none counted twice
    assert process_counters(run.log("gateway"), "gateway")["fills"] == 3001


def test_restarted_worker_finishes_a_killed_writers_seqlock_writes(start_engine):
    """A worker SIGKILLed inside a seqlock write (fee pool, fills counter, account row)
    leaves the row's counter odd; readers retry on it forever. Simulated exactly: kill the
    worker, then open a write on the partition row and on an account row as if it had died
    there. The replacement must leave both readable and the order check answered."""
    run = start_engine(dave_1k_usdt)
    eng, st = run.engine, run.store
    p, row = st.partition_of(DAVE), run.row(DAVE)
    old_pid = eng.worker_pid(0)
    os.kill(old_pid, signal.SIGKILL)
    worker = next(ch for ch in eng.children if ch.role == "worker0")
    wait_until(lambda: worker.proc.poll() is not None, what="the worker to die")
    _shm.write_begin(st.addr(st.partitions, p))            # counters now odd: "mid-write"
    _shm.write_begin(st.addr(st.accounts, row))
    t_kill = time.time_ns()
    assert eng.watch_once() == ["worker0"]
    wait_until(lambda: int(st.partitions[p]["heartbeat_ns"]) > t_kill, what="the new worker's first pass")
    assert int(st.partitions[p]["seq"]) % 2 == 0 and int(st.accounts[row]["seq"]) % 2 == 0
    assert st.read(st.partitions, p)["n_accounts"] >= 1
    assert int(st.read_account(row)[0]["balance"][0]) == 1_000 * USDT
    run.client.request(MsgType.ORDER_CHECK, {"request_id": 1, "account": DAVE, "instrument_id": BTC,
                                             "qty_units": 100, "price_units": 950_000})
    assert run.client.reply().fields["code"] == Code.OK


@pytest.mark.parametrize("price_stage, kill", [("process", "owner"), ("worker", "owner"), ("worker", "stage")])
def test_restarted_worker_makes_the_same_liquidation_decision(start_engine, price_stage, kill):
    # kill="owner": EVE's worker (partition 1: worker 1). kill="stage": worker 0, which
    # runs the price stage; its replacement binds the oracle socket again and needs a
    # quorum of fresh venues before it publishes (every step below ticks all three), and
    # worker 1 must still hear the marks it publishes (its doorbell).
    run = start_engine(eve_long_1btc_5k_usdt, n_workers=2, price_stage=price_stage)
    eng, st = run.engine, run.store
    before, _ = _walk_down_to_crossing(run, ABOVE)
    for p in (92_000.0, 94_000.0):           # healthy again: E = 4,000 > MM 420 at 94,000
        _tick_to(run, "BTCUSDT", BTC, p)

    w = eng.owner[st.partition_of(EVE)] if kill == "owner" else 0
    [(stream, seq_before)] = run.client.order_seqs[-1:]
    old_pid = eng.worker_pid(w)
    t_kill = time.time_ns()
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: eng.watch_once() == [f"worker{w}"], what="the supervisor restarting the worker")
    new_pid = eng.worker_pid(w)
    p = next(q for q in range(len(st.partitions)) if eng.owner[q] == w)
    wait_until(lambda: int(st.partitions[p]["worker_pid"]) == new_pid
               and int(st.partitions[p]["heartbeat_ns"]) > t_kill, what="the new worker's first pass")

    after, _ = _walk_down_to_crossing(run, [92_000.0, 91_000.0, 90_500.0])
    [want] = _expected_orders(run, eve_long_1btc_5k_usdt, EVE, {BTC: CROSSING})
    for o in (before, after):
        assert (o["account"], o["instrument_id"], o["qty_units"], o["limit_price_units"], o["reason"]) == \
            (EVE, BTC, want.qty_units, want.limit_price_units, want.reason)
    assert after["order_id"] != before["order_id"]
    # The same stream (EVE's worker: its order ids' top bits) numbered on: the next number,
    # also when that worker was the one restarted (protocol section 6: a sender that
    # restarts continues its numbering, else the receiver drops what follows as duplicates).
    assert run.client.order_seqs[-1] == (stream, seq_before + 1)


def test_a_new_engine_run_numbers_its_orders_above_the_last_runs(start_engine):
    # Two runs, one after the other, each liquidating EVE once. Her worker's stream id
    # (order_id >> 52) is the same in both runs, so the second run's numbers must lie
    # above the first's: they start at the microsecond clock at each run's start (a
    # receiver that kept the first run's `last` would otherwise drop the second run's
    # orders as duplicates). The jump is a gap to the receiver; nothing is missing.
    firsts = []
    for _ in range(2):
        run = start_engine(eve_long_1btc_5k_usdt, n_workers=2)
        t0_us = time.time_ns() // 1000
        _walk_down_to_crossing(run, ABOVE)
        [(stream, seq)] = run.client.order_seqs[-1:]
        assert seq > t0_us - 60_000_000         # seeded at the run's start (within a minute)
        firsts.append((stream, seq))
        run.le.__exit__(None, None, None)
    (s1, q1), (s2, q2) = firsts
    assert s1 == s2 and q2 > q1


# --------------------------------------------------------------------------- 8. shutdown
@pytest.mark.parametrize("keep_shm", [False, True], ids=["unlink", "keep-shm"])
def test_clean_shutdown_exits_zero_keeps_a_full_journal_and_releases_shm(start_engine, keep_shm):
    run = start_engine(alice_and_bob_100k_usdt, keep_shm_on_exit=keep_shm)
    c = run.client
    f1 = c.send_fills([fill(1, ALICE, BOB, 10, 500_000)])                      # seq 1
    f2 = c.send_fills([fill(2, ALICE, BOB, 10, 500_000), fill(3, BOB, ALICE, 5, 500_000),
                       fill(4, ALICE, BOB, 10, 500_000)])                      # seqs 2-4
    c.fills.send(f1)                                                           # duplicate: dropped
    c.fills.send(MALFORMED)                                                    # rejected
    c.seq_fills.last = 9
    f3 = c.send_fills([fill(5, ALICE, BOB, 10, 500_000)])                      # seq 10 (gap)
    f4 = c.send_fills([fill(6, 999, BOB, 10, 500_000), fill(7, ALICE, BOB, 10, 500_000)])  # 11-12
    # ALICE: 10 + 10 - 5 + 10 + 10 + 10 = 45 units (the unknown-account fill skipped)
    wait_until(lambda: applied(run, ALICE, 45) and applied(run, BOB, -45), what="all fills")

    run.le.__exit__(None, None, None)
    assert run.le.exit_codes == {"liqgw": 0, "worker0": 0, "gateway": 0}      # worker 0 runs the price stage
    records = list(replay(run.engine.journal_path))
    assert [(r.first_seq, r.frame) for r in records] == [(1, f1), (2, f2), (10, f3), (11, f4)]
    assert all(a.recv_ns <= b.recv_ns for a, b in zip(records, records[1:]))
    name = run.config.engine.name
    for seg in (f"/dev/shm/{name}", f"/dev/shm/{name}-ctl"):
        assert os.path.exists(seg) == keep_shm, seg
