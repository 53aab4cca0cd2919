"""A long option's initial margin is its value at the mark; it holds no maintenance margin.

Until session 18 a long option needed no margin at all, so an account with no collateral
passed the order check for any number of them (a review bought 10^6 BTC calls, about
18M USD of premium, with an empty account) and their fall was bad debt no liquidation
could reach. The rule now (ext/_margin.pyx and engine/risk/reference.py, module docs)::

    long option, q >= 0:  IM = q cs p  (its value at the mark p),  MM = 0

Opening one at the mark leaves equity unchanged and raises IM by the premium, so the
order check asks the free margin ``E - IM`` to cover the premium paid; and since the
option's value is both in E and in IM, the free margin does not move with its mark.

Each case runs against the Cython kernel and the exact reference.

World: USDT (price 1, haircut 0, scale 10**6); BTCUSDT linear perp (cs 1, qty_scale 8,
mark 50,000); BTC-C, a call on BTCUSDT (cs 1, qty_scale 4, mark 1,000 USDT per BTC).
Both have one tier: imr 12.5 %, mmr 6.25 % (for the option, of the underlying's notional,
and only when short). Scales and rates are powers of two, so every figure below is exact
in binary and the kernel's float64 gives it exactly, as the exact reference does.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from engine.codes import Code
from engine.instruments import Asset, Instrument, Kind, derive_tiers
from engine.risk import margin
from engine.risk import reference as ref
from engine.store.layout import Status
from engine.store.shm import Store

USDT = 10**6
BTCUSDT, CALL = 0, 1
TIERS = derive_tiers([{"floor": 0.0, "imr": 0.125, "mmr": 0.0625}])
ASSETS = [Asset("USDT", 0, USDT, 1.0, 0.0)]
INSTRUMENTS = [
    Instrument("BTCUSDT", 0, Kind.PERP, "USDT", 1.0, 8, 100, 0.01, 0.001, TIERS, mark_price=50_000.0),
    Instrument("BTC-C", 1, Kind.OPTION, "USDT", 1.0, 4, 100, 0.01, 0.01, TIERS, mark_price=1_000.0,
               underlying="BTCUSDT", strike=50_000.0, expiry_ns=1),
]


@pytest.fixture
def store():
    s = Store.create(None, assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=4,
                     n_partitions=1, slots_per_account=2)
    yield s
    s.unlink()


def account(store: Store, usdt: float, *positions: tuple[int, int, int]) -> int:
    """A new account with ``usdt`` USDT and positions ``(instrument, qty units, cost USDT)``."""
    row = store.add_account(1 + int(store.accounts["account_id"].max()))
    store.set_balance(row, 0, int(usdt * USDT))
    for ins, qty, cost in positions:
        store.set_position(row, ins, qty, cost * USDT)
    return row


def both_checks(store: Store, row: int, qty_units: int, price: float) -> tuple[Code, float, float]:
    """The order check in the kernel, held to the reference's code and exact figures."""
    got = margin.pretrade_check(store, row, CALL, qty_units, price)
    market = ref.market_from_engine(ASSETS, INSTRUMENTS, store.price_snapshot().marks)
    code, eq, im = ref.pretrade_check(market, ref.account_from_store(store, row), store.slots_per_account,
                                      CALL, qty_units, price)
    assert (int(got.code), Fraction(got.post_equity_usd), Fraction(got.post_initial_margin_usd)) == (code, eq, im)
    return Code(got.code), got.post_equity_usd, got.post_initial_margin_usd


@pytest.mark.parametrize("usdt, qty_units, price, code, post_eq, post_im", [
    # An empty account buying 1 call (4 units) at the mark: equity stays 0 (pnl 1 x (1,000 -
    # 1,000) = 0), IM becomes 1 x 1 x 1,000 = 1,000 > 0: refused (it was accepted when a
    # long needed nothing).
    (0, 4, 1_000.0, Code.CHECK_INSUFFICIENT_MARGIN, 0.0, 1_000.0),
    # 5,000 USDT buying 5 at the mark: IM 5 x 1,000 = 5,000 = equity: accepted, exactly.
    (5_000, 20, 1_000.0, Code.OK, 5_000.0, 5_000.0),
    # 5.25 at the mark: IM 5,250 > 5,000: refused.
    (5_000, 21, 1_000.0, Code.CHECK_INSUFFICIENT_MARGIN, 5_000.0, 5_250.0),
    # 4 at 1,200 (above the mark): pnl 4 x (1,000 - 1,200) = -800, equity 4,200 >= IM 4,000.
    (5_000, 16, 1_200.0, Code.OK, 4_200.0, 4_000.0),
    # 5 at 1,200: premium paid 6,000 > 5,000: equity 4,000 < IM 5,000.
    (5_000, 20, 1_200.0, Code.CHECK_INSUFFICIENT_MARGIN, 4_000.0, 5_000.0),
])
def test_buying_a_long_option_needs_the_premium_in_free_margin(store, usdt, qty_units, price, code,
                                                               post_eq, post_im):
    row = account(store, usdt)
    assert both_checks(store, row, qty_units, price) == (code, post_eq, post_im)


def test_selling_a_held_long_option_is_a_reduction_and_always_accepted(store):
    # Long 5 calls bought at 1,000 (cost 5,000) with no collateral left, mark down to 1:
    # E = 0 + 5 x 1 - 5,000 = -4,995 < IM 5: selling 2 is a pure reduction, accepted.
    row = account(store, 0, (CALL, 20, 5_000))
    store.publish_mark(CALL, 1.0)
    assert both_checks(store, row, -8, 1.0) == (Code.OK, -4_995.0, 3.0)      # IM 3 x 1 = 3


def test_long_option_im_is_its_value_and_free_margin_does_not_move_with_its_mark(store):
    # 5,781.25 USDT, long 5 calls bought at 1,000 (cost 5,000), long 0.125 BTCUSDT at 50,000
    # (cost 6,250): E = 5,781.25 + 0 + 0; IM = 5 x 1,000 + 12.5 % x 6,250 = 5,781.25; MM =
    # 6.25 % x 6,250 = 390.625 (the option holds none). Free margin E - IM = 0 = collateral
    # - premium paid + perp upnl - perp IM = 5,781.25 - 5,000 + 0 - 781.25.
    row = account(store, 5_781.25, (CALL, 20, 5_000), (BTCUSDT, 1, 6_250))
    for mark, eq, im in ((1_000.0, 5_781.25, 5_781.25),
                         (1_500.0, 8_281.25, 8_281.25),   # E + 5 x 500; IM 7,500 + 781.25
                         (200.0, 1_781.25, 1_781.25)):    # E - 5 x 800; IM 1,000 + 781.25
        store.publish_mark(CALL, mark)
        d = margin.account_detail(store, row)
        assert (d.cross_equity_usd, d.cross_im_usd, d.cross_mm_usd) == (eq, im, 390.625)
        assert d.status == 0                               # E >= IM, E >= MM
        opt = next(p for p in d.positions if p.instrument == CALL)
        assert (opt.initial_margin, opt.maintenance_margin) == (5 * mark, 0.0)
        market = ref.market_from_engine(ASSETS, INSTRUMENTS, store.price_snapshot().marks)
        exp = ref.account_figures(market, ref.account_from_store(store, row), prices=False)
        assert (exp.cross_equity_usd, exp.cross_im_usd, exp.cross_mm_usd) == (eq, im, Fraction(390.625))


def test_a_long_option_bought_on_credit_shows_below_initial_margin_not_liquidatable(store):
    # A position put in directly (as a fill may be, whatever the check said): 0 USDT, long 5
    # calls at cost 5,000, mark 1,000: E = 0, IM = 5,000, MM = 0: BELOW_IM only; at mark 800,
    # E = -1,000: BELOW_IM and BANKRUPT, still nothing to liquidate (MM = 0).
    row = account(store, 0, (CALL, 20, 5_000))
    assert margin.account_detail(store, row).status == Status.BELOW_IM
    store.publish_mark(CALL, 800.0)
    assert margin.account_detail(store, row).status == Status.BELOW_IM | Status.BANKRUPT


def test_a_tick_of_the_option_moves_the_holders_im_as_a_full_pass_does(store):
    """The tick's incremental pass (HolderIndex.tick) adds the change of a long option's
    value to its holder's IM: long 5 calls, mark 1,000 -> 1,500: IM 5,000 -> 7,500 (it
    added 0 when a long needed nothing, leaving 5,000 stale)."""
    row = account(store, 5_000, (CALL, 20, 5_000))
    snap0 = store.price_snapshot()
    margin.full_pass(store, 0, snap0)
    idx = margin.HolderIndex(store, 0)
    idx.refresh(snap0)
    store.publish_mark(CALL, 1_500.0)
    idx.tick(CALL, store.price_snapshot(), np.empty(4, np.int64))
    ticked = tuple(float(x) for x in idx.agg[row - idx.row_base, :3])    # E, IM, MM
    assert ticked == (7_500.0, 7_500.0, 0.0)                             # E 5,000 + 2,500
    d = margin.account_detail(store, row)
    assert (d.cross_equity_usd, d.cross_im_usd, d.cross_mm_usd) == ticked


def test_an_option_opens_cross_in_an_isolated_by_default_account(store):
    """An account isolated by default (ISOLATED_DEFAULT): its new option position is cross,
    in the order check (kernel and reference) and in the fill rule (kernel and reference).
    Isolated, a long option's IM (its premium) was checked once against cross free margin
    and then reserved by nothing: a review bought 3,250 USDT of calls on 2,000 and
    withdrew the 2,000. Here 5,000 USDT, buying 5 calls at the mark: IM 5,000 in the cross
    figures; a second 5 is refused (post IM 10,000 > 5,000); the fill opens it cross."""
    from engine.accounting.fills import apply_fill_leg, reference_apply_leg, instrument_params
    from engine.store.layout import AccountFlag, Mode

    row = account(store, 5_000)
    with store.writing(store.accounts, row) as a:
        a["flags"] = int(AccountFlag.ISOLATED_DEFAULT)
    assert both_checks(store, row, 20, 1_000.0) == (Code.OK, 5_000.0, 5_000.0)
    leg = reference_apply_leg(None, 5_000 * USDT, 0, instrument_params(store, CALL), 20, 100_000, 0,
                              isolated_default=True)
    assert leg.code == Code.OK and leg.position[0] == Mode.CROSS
    assert apply_fill_leg(store, 0, row, CALL, 20, 100_000, 0).code == Code.OK      # the kernel: cost 5,000
    assert int(store.slots(row)[0]["mode"]) == Mode.CROSS
    assert both_checks(store, row, 20, 1_000.0)[0] == Code.CHECK_INSUFFICIENT_MARGIN
    # a perp in the same account still opens isolated, as before
    assert reference_apply_leg(None, 5_000 * USDT, 0, instrument_params(store, BTCUSDT), 1, 5_000_000, 0,
                               isolated_default=True).position[0] == Mode.ISOLATED
