"""Kernels on the benchmark's book. The incremental pass's breach listing: whatever room
``out`` has, the count is the number of breaching holders and ``out`` holds the first of
them, in holder order; the periodic slices reset the aggregates to the full pass; the C
decision equals its Python reference for every breached account.

The pass lists branch-free and stops each run of first-tier holders before ``out`` could
overflow, then finishes on its general path (tests the seams between the two). Built with
the kernel benchmark's generator (2,000 accounts x 4 positions over 40 instruments, about
10 % in breach at the start), with the same ticks replayed on copies of one index.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from bench import kernel
from engine.risk import margin


@pytest.fixture(scope="module")
def world():
    store = kernel.build_store(None, 2000, 4, seed=5, quiet=True)
    snap = store.price_snapshot()
    margin.full_pass(store, 0, snap)
    yield store, snap
    store.detach()


@pytest.mark.parametrize("factor", [0.97, 1.0, 1.03])
def test_listing_is_the_same_prefix_for_any_room(world, factor):
    store, snap = world
    moved = kernel._snapshot_with_mark(snap, kernel.TICK_INSTRUMENT, factor)
    results = []
    for room in (4096, 1, 2, 7, 33):
        twin = idx = margin.HolderIndex(store, 0)   # the same state for every room
        twin.refresh(snap)
        out = np.full(room, -1, np.int64)
        n = twin.tick(kernel.TICK_INSTRUMENT, moved, out)
        results.append((room, n, out[: min(n, room)].tolist(), twin.agg.copy()))
    room0, n0, rows0, agg0 = results[0]
    assert 0 < n0 < room0          # some holders breach (the generator leaves ~10 % in breach)
    for room, n, rows, agg in results[1:]:
        assert n == n0                                 # the count never depends on the room
        assert rows == rows0[:room]                    # the first ``room`` breaching holders
        # the aggregates move the same, to rounding: with less room more holders take the
        # general path, which computes the same first-tier amounts in another order
        np.testing.assert_allclose(agg, agg0, rtol=1e-12, atol=1e-9)
    # every listed row breaches in the aggregates, and no unlisted holder does
    eq, mm = agg0[:, 0], agg0[:, 2]
    holders = set(idx.holder_rows(kernel.TICK_INSTRUMENT).tolist())
    hot = idx.hot[kernel.TICK_INSTRUMENT][: idx.holders(kernel.TICK_INSTRUMENT)]
    cross = {int(r) for r, k in zip(hot["row"], hot["key"]) if not np.isinf(k)}
    breaching = {r for r in cross if eq[r] < mm[r] and mm[r] > 0}
    assert breaching <= set(rows0) <= holders


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(factor=hs.sampled_from([0.97, 1.0, 1.03, 0.5]), sizes=hs.lists(hs.integers(1, 90), min_size=1, max_size=6))
def test_holders_pass_in_slices_is_the_whole_pass(world, factor, sizes):
    # The worker runs the holders' pass (1b) in slices so that a tick waits at most one
    # slice (Worker.holders_pass). Each holder's move depends only on the two price rows,
    # so the slices, in any sizes (cycled until the last holder), must give the whole
    # pass's aggregates, basis and breach listing bit for bit -- and the basis must not
    # move before the last slice (the holders not yet passed are still at it).
    store, snap = world
    moved = kernel._snapshot_with_mark(snap, kernel.TICK_INSTRUMENT, factor)
    whole = margin.HolderIndex(store, 0)
    whole.refresh(snap)
    out = np.full(4096, -1, np.int64)
    n_whole = whole.tick(kernel.TICK_INSTRUMENT, moved, out)      # no options on it: one instrument
    rows_whole = out[:n_whole].tolist()

    sliced = margin.HolderIndex(store, 0)
    sliced.refresh(snap)
    basis0 = sliced.basis[kernel.TICK_INSTRUMENT].copy()
    n_holders = sliced.holders(kernel.TICK_INSTRUMENT)
    assert n_holders == 200                  # 10 % of the 2,000 accounts hold instrument 0
    rows, start, k = [], 0, 0
    while True:
        n, nxt = sliced.tick_slice(kernel.TICK_INSTRUMENT, moved, out, start, sizes[k % len(sizes)])
        assert nxt == min(n_holders, start + sizes[k % len(sizes)])
        rows += out[:n].tolist()
        k, start = k + 1, nxt
        if start == n_holders:
            break
        assert np.array_equal(sliced.basis[kernel.TICK_INSTRUMENT], basis0)     # not yet moved
    assert rows == rows_whole and len(rows) == n_whole
    assert np.array_equal(sliced.agg, whole.agg)
    assert np.array_equal(sliced.basis, whole.basis)


def test_holders_slice_rejects_a_range_outside_the_holders(world):
    store, snap = world
    idx = margin.HolderIndex(store, 0)
    idx.refresh(snap)
    out = np.empty(16, np.int64)
    with pytest.raises(ValueError, match="outside 0..200 holders"):
        idx.tick_slice(kernel.TICK_INSTRUMENT, snap, out, 201, 10)       # 200 holders (10 %)
    with pytest.raises(ValueError, match="outside"):
        idx.tick_slice(kernel.TICK_INSTRUMENT, snap, out, 0, 0)
    with pytest.raises(ValueError, match="instrument 40 outside"):
        idx.tick_slice(40, snap, out, 0, 10)                              # 40 instruments: 0..39
    with pytest.raises(ValueError, match="int64"):
        idx.tick_slice(kernel.TICK_INSTRUMENT, snap, np.empty(16), 0, 10)


def test_periodic_slices_reset_the_aggregates_to_the_full_pass(world):
    # Ticks move the aggregates by float deltas; the periodic pass (remargin_range, in
    # slices as the worker runs it) recomputes each slice at the index's basis. Once every
    # moved instrument is ticked the basis is the snapshot, so the aggregates become
    # exactly the full pass's figures (same kernel, same constants), and each slice
    # reports the full pass's breaches.
    store, snap = world
    idx = margin.HolderIndex(store, 0)
    idx.refresh(snap)
    out = np.empty(4096, np.int64)
    for factor in (1.02, 0.97, 1.01):
        now = kernel._snapshot_with_mark(snap, kernel.TICK_INSTRUMENT, factor)
        idx.tick(kernel.TICK_INSTRUMENT, now, out)
    lo, hi = store.partition_rows(0)
    listed = []
    for start in range(lo, hi, 700):
        n = idx.remargin_range(start, min(hi, start + 700), now, out)
        listed += out[:n].tolist()
    want_n, want_rows = margin.full_pass(store, 0, now)
    assert listed == want_rows.tolist() and len(listed) == want_n
    acc = store.accounts[lo:hi]
    assert np.array_equal(idx.agg[:hi - lo, 0], acc["cross_equity_usd"])
    assert np.array_equal(idx.agg[:hi - lo, 1], acc["cross_im_usd"])
    assert np.array_equal(idx.agg[:hi - lo, 2], acc["cross_mm_usd"])
    with pytest.raises(ValueError):
        idx.remargin_range(lo, hi + 1, now, out)


def test_decision_kernel_equals_its_reference_on_the_benchmark_book(world):
    # Every account in breach in the benchmark's book (linear and inverse, cross and
    # isolated, many tiers): the C decision and its Python reference give the same orders.
    from engine.liquidation.decide import decide, decide_reference
    store, snap = world
    n, rows = margin.full_pass(store, 0, snap)
    assert n > 50
    orders = 0
    for row in rows.tolist():
        got = decide(store, row, snap)
        assert got == decide_reference(store, row, snap), row
        orders += len(got)
    assert orders >= n               # every breached account gets at least one order


def test_holder_order_groups_first_tier_by_row_then_the_rest_by_key(world):
    # Build order (HolderIndex.rebuild): group A = cross holders with |qty| under 0.8 of
    # the first tier's limit at the current mark, by account row (the hot loop walks the
    # aggregates in address order); group B = the others, cross by |qty|, isolated (key
    # +inf) last. The benchmark's BTCUSDT (contract 1 BTC, qty scale 1,000) has its second
    # tier at 50,000 USD of notional; at a mark of 95,000 that is 0.526 BTC = 526 qty
    # units, so group A is |qty| < 0.8 x 526.3 = 421 units.
    store, _ = world
    idx = margin.HolderIndex(store, 0)
    i = kernel.TICK_INSTRUMENT
    hot = idx.hot[i][: idx.holders(i)]
    limit = idx._first_tier_keys()[i]
    ins = store.instruments[i]
    mark = float(store.prices[i]["mark"])
    per_unit = float(ins["contract_size"]) / float(ins["qty_scale"]) * mark
    assert limit == pytest.approx(0.8 * float(ins["tier_floor"][1]) / per_unit, rel=1e-6)
    assert mark != 95_000.0 or limit == pytest.approx(421.05, abs=0.01)
    in_a = hot["key"] < limit
    n_a = int(in_a.sum())
    assert 0 < n_a < len(hot) and in_a[:n_a].all()          # A is a prefix
    assert (np.diff(hot["row"][:n_a]) > 0).all()             # A by row
    rest = hot["key"][n_a:]
    assert (np.diff(rest) >= 0).all()                        # B by key, +inf (isolated) last
