"""The upkeep slice's outstanding accounts (``worker.outstanding_rows``): the same rows
whether it scans the outstanding set (few) or the slice's flags (many, a crash)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from engine.runtime.worker import OUTSTANDING_SCAN_MAX, outstanding_rows
from engine.store import layout as L
from engine.store.layout import AccountFlag

N = 4_096


@settings(max_examples=60, deadline=None)
@given(rows=st.sets(st.integers(0, N - 1), max_size=600), lo=st.integers(0, N), width=st.integers(0, 600),
       other_flags=st.booleans())
def test_both_ways_find_the_slices_outstanding_rows(rows, lo, width, other_flags):
    hi = min(N, lo + width)
    acct = np.zeros(N, L.ACCOUNT)
    if other_flags:                           # another flag bit set everywhere: not outstanding
        acct["flags"] |= np.uint32(AccountFlag.ISOLATED_DEFAULT)
    since = {}
    for r in sorted(rows):                    # the invariant: flag set <=> row in since
        acct["flags"][r] |= np.uint32(AccountFlag.LIQUIDATION_OUTSTANDING)
        since[r] = 1_000 + r
    want = sorted(r for r in rows if lo <= r < hi)
    assert outstanding_rows(acct["flags"], lo, hi, since, scan_max=10**9) == want     # scan of since
    assert outstanding_rows(acct["flags"], lo, hi, since, scan_max=0) == want         # the flags
    assert outstanding_rows(acct["flags"], lo, hi, since) == want                     # the default


def test_a_crash_switches_to_the_flags():
    """Above OUTSTANDING_SCAN_MAX the set itself is never walked: a ``since`` whose
    iteration fails still gives the answer (3,000 outstanding, every 7th row from 0;
    in rows 700..956 they are 700, 707, ..., 952: (952 - 700) / 7 + 1 = 37 rows)."""
    class NoIter(dict):
        def __iter__(self):
            raise AssertionError("walked the whole outstanding set")

    acct = np.zeros(30_000, L.ACCOUNT)
    since = NoIter()
    for r in range(0, 21_000, 7):
        acct["flags"][r] |= np.uint32(AccountFlag.LIQUIDATION_OUTSTANDING)
        dict.__setitem__(since, r, 0)
    assert len(since) == 3_000 > OUTSTANDING_SCAN_MAX
    got = outstanding_rows(acct["flags"], 700, 956, since)
    assert got == list(range(700, 956, 7)) and len(got) == 37
