"""Trigger tables go stale when the prices they hold fixed move (HolderIndex.mark_drifted).

A table's triggers are solved with every other price at the index's basis; they stay
exact while only the table's own mark moves. ``mark_drifted`` marks a table stale once
another instrument's notional per unit, or a settle or collateral price, has moved by
more than ``DRIFT_REL`` (0.5 %) since the table was solved.
"""

from __future__ import annotations

import numpy as np

from engine.instruments import Asset, Instrument, Kind, derive_tiers
from engine.risk import margin
from engine.store.shm import Store

USDT = 10**6
TIERS = derive_tiers([{"floor": 0, "imr": 0.01, "mmr": 0.005}])
ASSETS = [Asset("USDT", 0, USDT, 1.0, 0.0)]
BTC, ETH, SOL = 0, 1, 2
INSTRUMENTS = [Instrument("BTCUSDT", BTC, Kind.PERP, "USDT", 1.0, 1000, 10, 0.1, 0.001, TIERS, mark_price=95_000.0),
               Instrument("ETHUSDT", ETH, Kind.PERP, "USDT", 1.0, 1000, 100, 0.01, 0.001, TIERS, mark_price=3_400.0),
               Instrument("SOLUSDT", SOL, Kind.PERP, "USDT", 1.0, 1000, 1000, 0.001, 0.001, TIERS, mark_price=150.0)]


def _index() -> tuple[Store, margin.HolderIndex]:
    st = Store.create(None, assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=2, slots_per_account=4)
    a = st.add_account(1)                      # long 1 BTC and 10 ETH
    st.set_balance(a, 0, 20_000 * USDT)
    st.set_position(a, BTC, 1000, 95_000 * USDT)
    st.set_position(a, ETH, 10_000, 34_000 * USDT)
    b = st.add_account(2)                      # long 100 SOL only
    st.set_balance(b, 0, 5_000 * USDT)
    st.set_position(b, SOL, 100_000, 15_000 * USDT)
    snap = st.price_snapshot()
    margin.full_pass(st, 0, snap)
    idx = margin.HolderIndex(st, 0)
    idx.refresh(snap)
    idx.refresh_dirty_triggers(snap)
    return st, idx


def _move(st: Store, idx: margin.HolderIndex, instrument: int, mark: float) -> None:
    """Publish a mark and run the incremental pass there (the basis moves with it)."""
    st.publish_mark(instrument, mark)
    idx.tick(instrument, st.price_snapshot(), np.empty(16, np.int64))


def test_a_table_goes_stale_once_another_mark_moved_more_than_half_a_percent():
    st, idx = _index()
    assert not idx.dirty.any() and idx.mark_drifted() == 0

    _move(st, idx, ETH, 3_400.0 * 1.004)      # +0.4 % since the tables were solved: under 0.5 %
    assert idx.mark_drifted() == 0 and not idx.dirty.any()

    _move(st, idx, ETH, 3_400.0 * 1.006)      # +0.6 %: BTC's and SOL's tables hold ETH at 3,400
    assert idx.mark_drifted() == 2
    # ETH's own table stays: its triggers are exact while only its own mark moves. SOL's
    # holders hold no ETH, yet it is marked too: the check does not look at who holds what.
    assert idx.dirty.tolist() == [True, False, True]
    assert idx.mark_drifted() == 0            # already stale: counted once

    idx.refresh_dirty_triggers(st.price_snapshot())     # re-solved at ETH 3,420.4
    assert not idx.dirty.any() and idx.mark_drifted() == 0
    _move(st, idx, BTC, 95_000.0 * 0.99)      # -1 %: ETH's and SOL's tables hold BTC at 95,000,
    assert idx.mark_drifted() == 2            # BTC's own table is not stale by its own move
    assert idx.dirty.tolist() == [False, True, True]


def test_a_table_being_solved_in_steps_is_left_alone():
    st, idx = _index()
    _move(st, idx, ETH, 3_400.0 * 1.01)
    idx.dirty[BTC] = True                     # BTC's refresh under way, in steps
    assert idx.refresh_triggers_slice(holders=1) and idx.refreshing
    assert not idx.dirty[BTC]
    _move(st, idx, ETH, 3_400.0 * 1.03)       # +2 % more while it is solved
    assert idx.mark_drifted() == 1            # SOL's (ETH +3 % since it was solved), not BTC's:
    assert idx.dirty.tolist() == [False, False, True]   # marking it would restart it
    while idx.refresh_triggers_slice(holders=1):        # BTC's steps, then SOL's table
        pass
    # Compared afresh once installed: BTC's was solved from ETH 3,434 and ETH is now at
    # 3,502 (+2.0 %); SOL's was solved at 3,502.
    assert idx.mark_drifted() == 1 and idx.dirty.tolist() == [True, False, False]
