"""``margin-engine status``'s summary (engine.runtime.status.snapshot) on a private store:
bad debt counted apart from liquidatable accounts, and shown as a plain 0 when none."""

from __future__ import annotations

import math

from engine.instruments import Asset, Instrument, Kind, derive_tiers
from engine.risk import margin
from engine.runtime.status import render, snapshot
from engine.store.shm import Store

ASSETS = [Asset("USDT", 0, 10**6, 1.0, 0.0)]
INSTRUMENTS = [Instrument("BTCUSDT", 0, Kind.PERP, "USDT", 1.0, 1000, 10, 0.1, 0.001,
                          derive_tiers([{"floor": 0, "imr": 0.02, "mmr": 0.01}]), mark_price=60_000.0)]


def _store(balances_usdt: list[int]) -> Store:
    st = Store.create(None, assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=len(balances_usdt),
                      n_partitions=1, slots_per_account=2)
    for k, usdt in enumerate(balances_usdt, start=1):
        st.set_balance(st.add_account(k), 0, usdt * 10**6)
    margin.full_pass(st, 0)
    return st


def test_no_bad_debt_is_a_plain_zero():
    # one account, 10,000 USDT and no positions: equity 10,000, no requirement
    s = snapshot(_store([10_000]))
    assert (s["accounts"], s["liquidatable"], s["bad_debt_accounts"]) == (1, 0, 0)
    assert s["bad_debt_usd"] == 0.0 and math.copysign(1.0, s["bad_debt_usd"]) == 1.0   # not -0.0
    assert "with bad debt (0.00 USD" in render(s)


def test_negative_equity_without_a_requirement_is_bad_debt_not_liquidatable():
    # account 2 borrowed 500 USDT and holds nothing: collateral -500 (a negative balance
    # counts at full value), equity -500, MM 0 -> nothing to liquidate, 500 USD of bad debt
    s = snapshot(_store([10_000, -500]))
    assert (s["accounts"], s["liquidatable"], s["bad_debt_accounts"]) == (2, 0, 1)
    assert s["bad_debt_usd"] == 500.0
