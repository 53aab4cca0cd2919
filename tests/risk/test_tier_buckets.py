"""The full pass finds each position's tier through 64 buckets by the bit length of |qty|
(``tier_buckets`` / ``pass_tier`` in ext/_margin.pyx); every other caller searches the
floors (``tier_search``). Both must pick the same tier for every quantity, or the full
pass and ``account_detail`` would disagree.

The cases that could break it: quantities on either side of a power of two (a bucket's
edge), quantities whose notional is exactly a tier floor (the compare is ``>=``), a zero
quantity (bucket 0 also holds |qty| = 0), the int64 extremes (|INT64_MIN| does not fit
an int64), and floors closer than a factor of two, so that one bucket spans three or more
tiers and the lookup must fall back to the full search.
"""

from __future__ import annotations

import numpy as np

from engine.instruments import Asset, Instrument, Kind, derive_tiers
from engine.risk import margin
from engine.store.shm import Store

# floors 0, 1000, 1100, 1210, 1331, ... (x1.1: buckets over 1000 span 3+ tiers), then
# x4 steps (buckets there hold at most 2 tiers: the one-compare path)
FLOORS = [0.0, 1_000.0, 1_100.0, 1_210.0, 1_331.0, 1_464.1, 6_000.0, 24_000.0, 96_000.0,
          384_000.0, 1_536_000.0]


def _tiers():
    rows = []
    for k, f in enumerate(FLOORS):
        mmr = 0.005 * (k + 1)
        rows.append({"floor": f, "imr": 2 * mmr, "mmr": mmr})
    return derive_tiers(rows, "test")


def _quantities() -> list[int]:
    qs = {0, 1, -1, 2, 3}
    for b in range(1, 63):
        for d in (-1, 0, 1):
            qs.add((1 << b) + d)
    # notional = |qty| * 1.0 * mark / qty_scale with mark 1.0 and qty_scale 1: a floor is
    # hit exactly by qty = floor (the compare floor <= notional must hold there)
    for f in FLOORS:
        for d in (-1, 0, 1):
            qs.add(int(f) + d)
    qs.add(2**63 - 1)
    out = sorted(q for q in qs if q >= 0)
    return out + [-q for q in out if q > 0] + [-(2**63)]


def test_bucket_tier_equals_search_for_every_edge():
    assets = [Asset("USDT", 0, 10**6, 1.0, 0.0)]
    ins = [Instrument("TST", 0, Kind.PERP, "USDT", 1.0, 1, 100, 0.01, 1.0, _tiers(),
                      mark_price=1.0)]
    qs = _quantities()
    store = Store.create(None, assets=assets, instruments=ins, accounts_capacity=len(qs),
                         n_partitions=1, slots_per_account=1)
    try:
        for k, q in enumerate(qs):
            row = store.add_account(k)
            store.set_balance(row, 0, 10**12)
            if q == -(2**63):        # the store's API refuses it (no order closes it): a row written raw
                with store.writing(store.accounts, row):
                    store.slots(row)[0] = (0, 0, q, 0, 0)
                    store.accounts[row]["n_positions"] = 1
            else:
                store.set_position(row, 0, q, 0)
        snap = store.price_snapshot()
        margin.full_pass(store, 0, snap)             # bucketed tiers
        got = store.accounts[: len(qs)][["cross_im_usd", "cross_mm_usd", "status"]].copy()
        for row, q in enumerate(qs):
            d = margin.account_detail(store, row, snap)  # searched tiers, same kernel rule
            # bit for bit: the same float operations on the same tier's rates
            assert (float(got["cross_im_usd"][row]), float(got["cross_mm_usd"][row])) == \
                (d.cross_im_usd, d.cross_mm_usd), f"qty {q}"
        # and the tiers are the intended ones where the arithmetic is exact: qty = 1100 is
        # the third tier (floor 1100 <= 1100), MM = 1100 * 0.015 - maint_amount_2 with
        # maint_amount_2 = 1000 * (0.01 - 0.005) + 1100 * (0.015 - 0.01) = 10.5 -> 6.0
        r1100 = qs.index(1100)
        assert float(got["cross_mm_usd"][r1100]) == 1100 * 0.015 - (1000 * 0.005 + 1100 * 0.005)
        # qty 1099 is still the second tier: 1099 * 0.01 - 5.0 = 5.99
        r1099 = qs.index(1099)
        assert abs(float(got["cross_mm_usd"][r1099]) - (1099 * 0.01 - 5.0)) < 1e-12
        # an empty position holds no requirement (tier 0, amount 0)
        assert float(got["cross_mm_usd"][qs.index(0)]) == 0.0
    finally:
        store.detach()


def test_bucket_tier_equals_search_on_a_random_book():
    # 5,000 quantities log-uniform over 1 .. 2**40, both sides, at a mark that puts many
    # of them across the close floors: the full pass equals account_detail row by row.
    rng = np.random.default_rng(7)
    qs = (np.exp(rng.uniform(0, 40 * np.log(2), 5_000)).astype(np.int64)
          * rng.choice([-1, 1], 5_000))
    assets = [Asset("USDT", 0, 10**6, 1.0, 0.0)]
    ins = [Instrument("TST", 0, Kind.PERP, "USDT", 1.0, 1000, 100, 0.01, 0.001, _tiers(),
                      mark_price=1234.5)]
    store = Store.create(None, assets=assets, instruments=ins, accounts_capacity=len(qs),
                         n_partitions=1, slots_per_account=1)
    try:
        for k, q in enumerate(qs.tolist()):
            row = store.add_account(k)
            store.set_balance(row, 0, 10**15)
            store.set_position(row, 0, q, 0)
        snap = store.price_snapshot()
        margin.full_pass(store, 0, snap)
        for row in range(len(qs)):
            d = margin.account_detail(store, row, snap)
            a = store.accounts[row]
            assert (float(a["cross_im_usd"]), float(a["cross_mm_usd"])) == \
                (d.cross_im_usd, d.cross_mm_usd), f"qty {qs[row]}"
    finally:
        store.detach()
