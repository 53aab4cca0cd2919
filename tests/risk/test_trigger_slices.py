"""Trigger tables refreshed in steps (``HolderIndex.refresh_triggers_slice``), so that a
worker never blocks ~7 ms on a 100k-holder table: the table in use stays until the new
one is whole, the result is the table a refresh at once gives, a change of the holders
midway starts the solve again, and a table whose holders keep changing is finished in
one go after two restarts instead of starving.

A 5,000-account book of bench/kernel.py's universe (40 instruments, 4 positions each;
instrument 0 held by exactly 10 % = 500 accounts), in real shared memory.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench import kernel as K
from engine.risk import margin

N = 5_000
BTC = 0


@pytest.fixture
def book():
    store = K.build_store(None, N, 4, seed=3, quiet=True)
    snap = store.price_snapshot()
    margin.full_pass(store, 0, snap)
    idx = margin.HolderIndex(store, 0)
    idx.refresh(snap)
    idx.refresh_dirty_triggers(snap)               # every table at once: the reference
    try:
        yield store, idx, snap
    finally:
        store.detach()


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_sliced_refresh_installs_the_table_a_refresh_at_once_gives(book):
    store, idx, snap = book
    want = idx.triggers[BTC]
    assert idx.holders(BTC) == 500                 # 10 % of 5,000
    idx.dirty[:] = False
    idx.dirty[BTC] = True
    idx.triggers[BTC] = old = tuple(np.empty(0) for _ in range(4))
    steps = 0
    while idx.refresh_triggers_slice(64):
        steps += 1
        if idx.refreshing:
            assert idx.triggers[BTC] is old, "a half-solved table was installed"
    # 500 holders in steps of 64: 8 solving steps (7 x 64 + 52), then one sorting step
    # (500 holders are one run a side, fewer than TriggerSort.CHUNK_HOLDERS, so no merge)
    # that also installs
    assert steps == 9
    assert not idx.refreshing and not idx.dirty.any()
    assert _same(idx.triggers[BTC], want)
    assert idx.refresh_triggers_slice(64) is False     # nothing stale: no work
    # each side ascending (-inf first, +inf last), every long and short holder once
    long_t, long_rows, short_t, short_rows = idx.triggers[BTC]
    for t in (long_t, short_t):                        # inf - inf is nan: compare pairs
        assert np.all(t[1:] >= t[:-1])
    q = idx.hot[BTC]["qty"][:500]
    rows = idx.holder_rows(BTC)
    assert sorted(long_rows.tolist()) == sorted(rows[q > 0].tolist())
    assert sorted(short_rows.tolist()) == sorted(rows[q < 0].tolist())
    assert np.isinf(long_t).any() or np.isinf(short_t).any()   # the ends are exercised


def test_a_fill_midway_starts_the_solve_again(book):
    store, idx, snap = book
    idx.dirty[:] = False
    idx.dirty[BTC] = True
    assert idx.refresh_triggers_slice(64) and idx.refreshing     # 64 of 500 solved
    # a fill doubles one BTC holder's position: its trigger moves, the holders changed
    row = int(idx.holder_rows(BTC)[0])           # among the 64 already solved
    slot = [i for i in range(int(store.accounts["n_positions"][row]))
            if store.positions[row * store.slots_per_account + i]["instrument"] == BTC][0]
    p = store.positions[row * store.slots_per_account + slot]
    store.set_position(row, BTC, 2 * int(p["qty"]), 2 * int(p["cost"]), mode=int(p["mode"]),
                       isolated_margin=int(p["isolated_margin"]))
    idx.update_account(row, snap)
    assert idx.dirty[BTC]
    idx.dirty[np.arange(len(idx.dirty)) != BTC] = False   # the row's other tables: not counted here
    steps = 0
    while idx.refresh_triggers_slice(64):
        steps += 1
    # solved again from holder 0: 9 steps for 500 holders, as above (without the restart
    # the stale half-solved table would be finished, 8 steps, then re-done as stale, 9 more)
    assert steps == 9
    got = idx.triggers[BTC]
    idx.refresh_triggers(BTC)                      # at once, after the fill
    assert _same(got, idx.triggers[BTC])
    assert row in set(got[1].tolist()) | set(got[3].tolist())


def test_a_table_whose_holders_keep_changing_is_finished_at_once(book):
    store, idx, snap = book
    idx.dirty[:] = False
    idx.dirty[BTC] = True
    assert idx.refresh_triggers_slice(64)
    for restart in range(1, idx.RESTARTS_BEFORE_BLOCKING + 2):
        idx.dirty[BTC] = True                      # its holders changed again (as a fill would)
        idx.refresh_triggers_slice(64)
        if restart <= idx.RESTARTS_BEFORE_BLOCKING:
            assert idx.refreshing, f"restart {restart}: one step of 64 only"
        else:
            assert not idx.refreshing, "after 2 restarts the table is finished in one step"
    got = idx.triggers[BTC]
    idx.refresh_triggers(BTC)
    assert _same(got, idx.triggers[BTC])
