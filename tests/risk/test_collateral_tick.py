"""Collateral price moves reach the incremental aggregates exactly (HolderIndex.collateral_tick).

The private aggregates the tick path uses must equal a from-scratch full pass after any
sequence of moves of collateral prices and marks, including an inverse contract settled in
the moving asset (its upnl and requirement are valued at that asset's price) and borrowed
(negative) balances, which count at full price (no haircut).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as hs

from engine.instruments import Asset, Instrument, Kind, derive_tiers
from engine.risk import margin
from engine.store.shm import Store

TIERS = derive_tiers([{"floor": 0, "imr": 0.02, "mmr": 0.01}, {"floor": 5, "imr": 0.05, "mmr": 0.025}])
ASSETS = [Asset("USDT", 0, 10**6, 1.0, 0.0), Asset("BTC", 1, 10**8, 60_000.0, 0.05)]
INSTRUMENTS = [
    Instrument("BTCUSDT", 0, Kind.PERP, "USDT", 1.0, 1000, 10, 0.1, 0.001,
               derive_tiers([{"floor": 0, "imr": 0.02, "mmr": 0.01}, {"floor": 200_000, "imr": 0.05, "mmr": 0.025}]),
               mark_price=60_000.0),
    Instrument("BTCUSD", 1, Kind.INVERSE_PERP, "BTC", 100.0, 1, 10, 0.1, 1.0, TIERS, mark_price=60_000.0),
]


def build(accounts) -> Store:
    st = Store.create(None, assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=len(accounts) + 1,
                      n_partitions=1, slots_per_account=2)
    for k, (usdt, btc, q_lin, q_inv) in enumerate(accounts, start=1):
        row = st.add_account(k)
        st.set_balance(row, 0, usdt * 10**6)
        st.set_balance(row, 1, btc)                      # satoshi; negative = borrowed
        if q_lin:
            st.set_position(row, 0, q_lin, round(q_lin / 1000 * 60_000 * 10**6))
        if q_inv:
            st.set_position(row, 1, q_inv, round(q_inv * 100 / 60_000 * 10**8))
    return st


account = hs.tuples(hs.integers(0, 50_000), hs.integers(-50_000_000, 100_000_000),
                    hs.integers(-3000, 3000), hs.integers(-2000, 2000))


@settings(max_examples=60, deadline=None)
@given(accounts=hs.lists(account, min_size=1, max_size=12),
       moves=hs.lists(hs.tuples(hs.floats(0.7, 1.3), hs.floats(0.7, 1.3), hs.booleans()),
                      min_size=1, max_size=4))
def test_collateral_and_settle_price_moves_keep_the_aggregates_exact(accounts, moves):
    st = build(accounts)
    snap0 = st.price_snapshot()
    margin.full_pass(st, 0, snap0)
    idx = margin.HolderIndex(st, 0)
    idx.refresh(snap0)
    out = np.empty(64, np.int64)
    for btc_factor, mark_factor, marks_move in moves:
        st.publish_asset_price(1, 60_000.0 * btc_factor)           # collateral price
        if marks_move:
            st.publish_mark(0, 60_000.0 * mark_factor)
            st.publish_mark(1, 60_000.0 * mark_factor)
        snap = st.price_snapshot()
        # Equity of BTC holders, and the BTC-settled inverse holders' USD values (re-ticked
        # by the collateral pass itself when only the asset moved).
        idx.collateral_tick(snap, out)
        if marks_move:
            idx.tick(0, snap, out)
            idx.tick(1, snap, out)
    lo, hi = st.partition_rows(0)
    margin.full_pass(st, 0, st.price_snapshot())                    # from scratch at the last prices
    want = st.accounts[lo:hi]
    got = idx.agg[lo - idx.row_base:hi - idx.row_base]
    # float64 sums of a few terms of up to ~1e7 USD: 1e-9 relative to the magnitude (and 1e-6 USD)
    for k, field in ((0, "cross_equity_usd"), (1, "cross_im_usd"), (2, "cross_mm_usd")):
        scale = np.maximum(1.0, np.abs(want[field]))
        assert np.all(np.abs(got[:, k] - want[field]) <= 1e-9 * scale + 1e-6), field


def test_btc_collateral_crash_breaches_the_account_it_backs():
    """ALICE: 0 USDT, 1 BTC collateral (haircut 5 %), long 1 BTCUSDT at 60,000.

    At BTC 60,000: equity = 1 x 60,000 x 0.95 = 57,000; MM = 60,000 x 1 % = 600.
    BTC collateral and the mark both fall to 30,500: equity = 30,500 x 0.95 - 29,500
    = -525 < MM 305 -> breached, found by the collateral pass (the mark's own tick is
    not even run here).
    """
    st = build([(0, 10**8, 1000, 0)])
    snap0 = st.price_snapshot()
    margin.full_pass(st, 0, snap0)
    idx = margin.HolderIndex(st, 0)
    idx.refresh(snap0)
    st.publish_asset_price(1, 30_500.0)
    st.publish_mark(0, 30_500.0)
    out = np.empty(4, np.int64)
    idx.tick(0, st.price_snapshot(), out)             # the mark: upnl -29,500, equity 27,500
    n = idx.collateral_tick(st.price_snapshot(), out)
    assert n == 1 and out[0] == st.row_of(1)
    eq, mm = idx.agg[0, 0], idx.agg[0, 2]
    assert abs(eq - (-525.0)) < 1e-6 and abs(mm - 305.0) < 1e-6
