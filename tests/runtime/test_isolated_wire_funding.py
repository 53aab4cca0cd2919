"""Wire fills into an account isolated by default: a real Worker applies the FILL legs
from its ring (``drain_fill_legs``, auto funding on), and the journal replay of the same
fills (fast and reference paths, engine/runtime/recovery.py) gives the same book.

Embedded default: BTCUSDT instrument 0 (1 BTC contracts, qty_scale 1000, price_scale
10, USDT 1e6 units), BTCUSD its inverse perp ($100 contracts, BTC 1e8 units). ALICE is
isolated by default with 10,000 USDT and 1 BTC; BOB is cross with the same.

1. ALICE buys 1 BTC of BTCUSDT from BOB at 95,000, taker fee 50 USDT, maker rebate 10:
   N = 95,000 USDT, tier 1 (floor 50,000): IM = 95,000 x 0.01 - 100 = 850 USDT, and
   0.01 as a float64 is 0.01 + 2.08e-19, so 850,000,001 units; ALICE's balance
   10,000 - 50 - 850.000001 = 9,099,999,999 units.
2. ALICE buys 1 more at 94,000: c = 189,000, N = 188,000: IM 1,780,000,001; equity
   850,000,001 + (188,000 - 189,000) x 1e6 = -149,999,999; transfer 1,930,000,000:
   margin 2,780,000,001, balance 7,169,999,999.
3. ALICE sells 1,000 BTCUSD to BOB at 95,000: N = 1e5 / 95,000 BTC = 105,263,158 sat,
   tier 0: IM = ceil(N x 0.008) = 842,106 sat; ALICE's BTC 1e8 - 842,106 = 99,157,894.
BOB's positions are cross: no transfer, his balances only move by fees.
"""

from __future__ import annotations

import os

import pytest

from engine.config import load_default
from engine.risk.margin import account_detail
from engine.runtime import recovery
from engine.runtime.ctl import Control, RecordKind
from engine.runtime.journal import Journal
from engine.store.layout import Mode, Status
from engine.store.shm import Store
from feeds.protocol import MsgType, encode
from runtime_support import USDT, book, fee_pools, in_process_worker, money

pytestmark = [pytest.mark.timeout(60)]

CFG = load_default()
NAMES = [a.name for a in CFG.assets]
INS = {i.name: i.index for i in CFG.instruments}
ASSET = {a.name: a.index for a in CFG.assets}
BTCUSDT, BTCUSD, BTC = INS["BTCUSDT"], INS["BTCUSD"], ASSET["BTC"]
ALICE, BOB = 1, 2
# (instrument, ALICE's qty units (taker), price units, taker fee, maker fee)
FILLS = [(BTCUSDT, 1000, 950_000, 50 * USDT, -10 * USDT),
         (BTCUSDT, 1000, 940_000, 0, 0),
         (BTCUSD, -1000, 950_000, 0, 0)]


def accounts(store: Store) -> None:
    for acct, iso in ((ALICE, True), (BOB, False)):
        row = store.add_account(acct, isolated_default=iso)
        store.set_balance(row, ASSET["USDT"], 10_000 * USDT)
        store.set_balance(row, BTC, 10**8)


def slot(store: Store, acct: int, instrument: int):
    row = store.row_of(acct)
    for s in store.slots(row)[: int(store.accounts[row]["n_positions"])]:
        if int(s["instrument"]) == instrument:
            return int(s["mode"]), int(s["qty"]), int(s["cost"]), int(s["isolated_margin"])
    return None


def test_a_worker_funds_the_isolated_position_of_a_wire_fill_and_the_replay_agrees(tmp_path):
    def setup(store: Store) -> None:
        accounts(store)
        ctl = Control.attach(store.name.lstrip("/") + "-ctl")
        ra, rb = store.row_of(ALICE), store.row_of(BOB)
        for k, (ins, q, px, tf, mf) in enumerate(FILLS):          # taker's leg, then maker's
            assert ctl.push(0, int(RecordKind.FILL_LEG), ins, ra, q, px, tf, 2 * k, 1, 0)
            assert ctl.push(0, int(RecordKind.FILL_LEG), ins, rb, -q, px, mf, 2 * k + 1, 1, 0)

    with in_process_worker(setup) as (w, store, _):
        before = money(store)
        assert w.drain(0, store.price_snapshot()) == 2 * len(FILLS)
        assert w.counters["legs_rejected"] == 0
        assert money(store) == before                              # fees and transfers inside Q
        assert slot(store, ALICE, BTCUSDT) == (Mode.ISOLATED, 2000, 189_000 * USDT, 2_780_000_001)
        assert slot(store, ALICE, BTCUSD) == (Mode.ISOLATED, -1000, -105_263_158, 842_106)
        ra = store.row_of(ALICE)
        assert int(store.accounts[ra]["balance"][ASSET["USDT"]]) == 7_169_999_999
        assert int(store.accounts[ra]["balance"][BTC]) == 99_157_894
        assert slot(store, BOB, BTCUSDT) == (Mode.CROSS, -2000, -189_000 * USDT, 0)
        assert int(store.accounts[store.row_of(BOB)]["balance"][ASSET["USDT"]]) == 10_010 * USDT
        d = account_detail(store, ra)                              # marks 95,000 (both)
        assert not d.status & (Status.ISOLATED_LIQUIDATABLE | Status.LIQUIDATABLE), d
        assert not int(store.accounts[ra]["status"]) & int(Status.ISOLATED_LIQUIDATABLE)   # the worker's own pass
        live_book, live_pools = book(store), fee_pools(store)

    # the same fills journaled as the gateway journals them, replayed both ways
    path = str(tmp_path / "fills.journal")
    j = Journal(path, fsync_interval_s=0)
    for k, (ins, q, px, tf, mf) in enumerate(FILLS, start=1):
        body = {"trade_id": k, "instrument_id": ins, "maker_account": BOB, "taker_account": ALICE,
                "qty_units": q, "price_units": px, "maker_fee_units": mf, "taker_fee_units": tf,
                "taker_side": "buy" if q > 0 else "sell"}
        j.append(k, 1, encode(MsgType.FILL, body, seq=k, ts_ns=1))
    j.close()
    assert os.path.getsize(path) > 0
    for fast in (True, False):
        replayed = Store.create(None, assets=list(CFG.assets), instruments=list(CFG.instruments),
                                accounts_capacity=CFG.engine.accounts_capacity, n_partitions=1,
                                slots_per_account=CFG.engine.slots_per_account)
        accounts(replayed)
        st = recovery.replay_journal(replayed, path, 0, NAMES, fast=fast)
        assert (st.fills, st.legs_rejected) == (len(FILLS), 0)
        assert book(replayed) == live_book, fast
        assert fee_pools(replayed) == live_pools, fast
