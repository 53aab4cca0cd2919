"""A withdrawal may not take the premium of a held long option (its IM is its value at
the mark; tests/risk/test_long_options.py has the rule). Through a real Worker object on
the engine's own shared memory and embedded config."""

from __future__ import annotations

import numpy as np
import pytest

from engine.codes import Code
from engine.config import load_default
from engine.runtime.ctl import RecordKind
from engine.store.shm import Store
from runtime_support import USDT, in_process_worker

pytestmark = [pytest.mark.timeout(60)]


def test_a_withdrawal_may_not_take_the_premium_of_a_held_long_option():
    """Through a real Worker (the engine's own shared memory, embedded config): 2,000 USDT,
    long 100 BTC-20261225-100000-C (cs 0.01, mark 1,800: value 100 x 0.01 x 1,800 = 1,800,
    bought at the mark). E = 2,000, IM = 1,800: 200 may leave, 201 may not (both could
    when a long option needed no margin)."""
    call = load_default().instrument("BTC-20261225-100000-C").index

    def setup(st: Store) -> None:
        row = st.add_account(7)
        st.set_balance(row, 0, 2_000 * USDT)
        st.set_position(row, call, 100, 1_800 * USDT)

    with in_process_worker(setup, accounts_capacity=8) as (w, st, _):
        row = int(np.flatnonzero(st.accounts["account_id"] == 7)[0])
        snap = st.price_snapshot()
        assert float(snap.marks[call]) == 1_800.0
        assert w.collateral(row, RecordKind.WITHDRAWAL, 0, 201 * USDT, snap) == \
            (Code.WITHDRAWAL_BELOW_INITIAL_MARGIN, 2_000 * USDT)
        assert w.collateral(row, RecordKind.WITHDRAWAL, 0, 200 * USDT, snap) == (Code.OK, 1_800 * USDT)
