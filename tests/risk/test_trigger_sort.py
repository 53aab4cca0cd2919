"""The trigger tables' sort in bounded steps (engine/risk/triggersort.py).

``merge_step`` (the Cython merge ``_margin.merge_runs``) is held to its plain-Python
reference on random runs with ties, from any cursors and for any step limit; and
``TriggerSort`` run with tiny chunks and merge budgets (many runs, many levels, merges
cut mid-way) must give, whatever the step sizes, the same tables bit for bit, and the
tables a plain sort of each side gives: keys ascending with -inf first, +inf then NaN
last, every holder of the side once with its own trigger.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.risk.triggersort import TriggerSort, merge_step, merge_step_reference


def _runs(draw_keys_a, draw_keys_b, pad_lo, pad_hi):
    a, b = sorted(draw_keys_a), sorted(draw_keys_b)
    keys = np.array([9e9] * pad_lo + a + b + [9e9] * pad_hi, dtype=np.float64)
    vals = np.arange(len(keys), dtype=np.int64) + 1000
    lo = pad_lo
    return keys, vals, lo, lo + len(a), lo + len(a) + len(b)


KEYS = st.lists(st.integers(-5, 5).map(float), max_size=30)   # small range: many ties


@settings(max_examples=300, deadline=None)
@given(KEYS, KEYS, st.integers(0, 3), st.integers(0, 3), st.integers(0, 40), st.data())
def test_merge_step_equals_the_reference_from_any_cursors(a, b, pad_lo, pad_hi, limit, data):
    keys, vals, lo, mid, hi = _runs(a, b, pad_lo, pad_hi)
    i = data.draw(st.integers(lo, mid))
    j = data.draw(st.integers(mid, hi))
    out_c = (np.full(len(keys), -1.0), np.full(len(keys), -1, np.int64))
    out_p = (np.full(len(keys), -1.0), np.full(len(keys), -1, np.int64))
    got = merge_step(keys, vals, *out_c, lo, mid, hi, i, j, limit)
    want = merge_step_reference(keys, vals, *out_p, lo, mid, hi, i, j, limit)
    assert got == want
    assert np.array_equal(out_c[0], out_p[0]) and np.array_equal(out_c[1], out_p[1])
    # exactly min(limit, what is left) pairs written
    assert (got[0] - i) + (got[1] - j) == min(limit, (mid - i) + (hi - j))


@settings(max_examples=200, deadline=None)
@given(KEYS, KEYS, st.lists(st.integers(1, 7), min_size=1, max_size=40))
def test_a_merge_in_steps_is_the_stable_merge(a, b, limits):
    keys, vals, lo, mid, hi = _runs(a, b, 1, 1)
    dk, dv = np.zeros(len(keys)), np.zeros(len(keys), np.int64)
    i, j, step = lo, mid, 0
    while (i, j) != (mid, hi):
        lim = limits[step % len(limits)]
        i2, j2 = merge_step(keys, vals, dk, dv, lo, mid, hi, i, j, lim)
        assert (i2 - i) + (j2 - j) == min(lim, (mid - i) + (hi - j))     # progress, bounded
        i, j, step = i2, j2, step + 1
    # stable: ties keep left-run pairs (smaller values) first, so (key, value) ascending
    want = sorted(zip(keys[lo:hi].tolist(), vals[lo:hi].tolist()))
    assert list(zip(dk[lo:hi].tolist(), dv[lo:hi].tolist())) == want


def test_merge_step_rejects_bad_cursors():
    k, v = np.arange(4.0), np.arange(4, dtype=np.int64)
    dk, dv = np.empty(4), np.empty(4, np.int64)
    with pytest.raises(ValueError, match="lo 0 <= i 3 <= mid 2"):
        merge_step(k, v, dk, dv, 0, 2, 4, 3, 2, 4)
    with pytest.raises(ValueError, match="<= hi 5 <= 4"):
        merge_step(k, v, np.empty(5), np.empty(5, np.int64), 0, 2, 5, 0, 2, 4)
    with pytest.raises(ValueError, match="dst at least hi long"):
        merge_step(k, v, dk[:3], dv[:3], 0, 2, 4, 0, 2, 4)
    with pytest.raises(ValueError, match="limit -1"):
        merge_step(k, v, dk, dv, 0, 2, 4, 0, 2, -1)


def _book(n: int, seed: int):
    """``n`` holders: triggers from a few hundred values (ties), about 10 % each -inf,
    +inf and NaN; quantities long, short and (a few) zero; distinct account rows."""
    rng = np.random.default_rng(seed)
    trig = rng.integers(0, 300, n).astype(np.float64) * 12.5 + 90_000.0
    u = rng.random(n)
    trig[u < 0.1] = -np.inf
    trig[(u >= 0.1) & (u < 0.2)] = np.inf
    trig[(u >= 0.2) & (u < 0.3)] = np.nan
    qty = rng.choice([-3.0, -1.0, 0.0, 1.0, 2.0], n, p=[0.3, 0.15, 0.05, 0.3, 0.2])
    rows = rng.permutation(10 * n)[:n].astype(np.int64) + 7
    return trig, qty, rows


def _sorted_with(trig, qty, rows, chunk, pairs):
    s = TriggerSort(trig, qty, rows)
    s.CHUNK_HOLDERS, s.MERGE_PAIRS = chunk, pairs
    steps = 0
    while not s.step():
        steps += 1
    return s.tables(), steps + 1


@pytest.mark.parametrize("n", [0, 1, 5, 300, 2_000])
def test_the_tables_do_not_depend_on_the_step_sizes(n):
    trig, qty, rows = _book(n, seed=n)
    want, _ = _sorted_with(trig, qty, rows, 7, 10**9)          # merges done whole
    for pairs in (1, 3, 64):
        got, _ = _sorted_with(trig, qty, rows, 7, pairs)
        assert all(np.array_equal(g, w, equal_nan=True) for g, w in zip(got, want)), pairs
    # and run() is the same machine in one call
    s = TriggerSort(trig, qty, rows)
    s.CHUNK_HOLDERS = 7
    assert all(np.array_equal(g, w, equal_nan=True) for g, w in zip(s.run(), want))


@pytest.mark.parametrize("chunk,pairs", [(7, 5), (64, 1), (1, 1000), (8_192, 16_384)])
def test_each_side_is_its_plain_sort_with_its_own_rows(chunk, pairs):
    trig, qty, rows = _book(2_000, seed=chunk)
    (long_t, long_rows, short_t, short_rows), steps = _sorted_with(trig, qty, rows, chunk, pairs)
    by_row = dict(zip(rows.tolist(), trig.tolist()))
    for side, keys, got_rows in ((qty > 0, long_t, long_rows), (qty < 0, short_t, short_rows)):
        # the keys: np.sort's order (-inf ... finite ascending ... +inf, NaN last)
        assert np.array_equal(keys, np.sort(trig[side]), equal_nan=True)
        # the rows: each holder of the side once, next to its own trigger
        assert sorted(got_rows.tolist()) == sorted(rows[side].tolist())
        assert np.array_equal(np.array([by_row[r] for r in got_rows.tolist()]), keys, equal_nan=True)
    assert len(long_t) + len(short_t) == int(np.count_nonzero(qty))     # zero qty: no side
    if chunk == 7 and pairs == 5:
        # 2,000 holders in chunks of 7: 286 run steps, then ~8 merge levels of ~1,100 finite
        # pairs a side (70 % finite, 95 % on a side) in steps of 5: well over 1,000 steps,
        # each bounded
        assert steps > 286 + 1_000


def test_tables_before_done_is_an_error():
    trig, qty, rows = _book(50, seed=1)
    s = TriggerSort(trig, qty, rows)
    s.CHUNK_HOLDERS = 10
    s.step()
    with pytest.raises(RuntimeError, match="not done"):
        s.tables()
    with pytest.raises(ValueError, match="one each per holder"):
        TriggerSort(trig, qty[:-1], rows)
