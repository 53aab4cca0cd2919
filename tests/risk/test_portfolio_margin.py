"""The scenario requirement of engine/risk/portfolio.py (reference and kernel): the grid,
a delta-neutral book against its legs margined alone, more short options -> more margin,
the short-option minimum, coin-settled (inverse) books, VaR, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.risk import portfolio as pm
from engine.risk.portfolio import (LEG_INVERSE, LEG_LINEAR, LEG_OPTION, SETTLE_COIN, SETTLE_USD, Leg,
                                   Portfolio, ScenarioParams, requirement_reference, scenario_grid)

BOTH = pytest.mark.parametrize("req", [requirement_reference, pm.portfolio_requirement],
                               ids=["reference", "kernel"])

F = 100_000.0
# 1 BTC ATM call, 3 months, 50 % vol (qty in units of 1/1000 contract, cs 1 BTC):
# value 9,947.64 USD, delta N(0.125) = 0.5497 (test_portfolio_pricing)
LONG_1_BTC_CALL_ATM_3M = Leg(LEG_OPTION, 1000, 1000, 1.0, F, 100_000.0, 0.25, 0.5, True)
SHORT_0_55_BTC_PERP = Leg(LEG_LINEAR, -550, 1000, 1.0, F)          # the call's delta, to 0.001
SHORT_1_BTC_CALL_110K = Leg(LEG_OPTION, -1000, 1000, 1.0, F, 110_000.0, 0.25, 0.5, True)


def test_grid_is_7_moves_x_3_vols_plus_6_extremes():
    m, v, w = scenario_grid()
    assert len(m) == 7 * 3 + 2 * 3
    assert sorted(set(np.round(m[:21], 12))) == [-0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15]
    assert set(v) == {-0.3, 0.0, 0.3}
    assert np.all(w[:21] == 1.0) and np.all(w[21:] == 0.33)
    assert np.allclose(np.abs(m[21:]), 0.45)                        # 3 x 15 %
    assert m[10] == 0.0 and v[10] == 0.0                            # the no-move scenario


@BOTH
def test_delta_neutral_book_needs_less_than_its_legs_alone(req):
    book = Portfolio(SETTLE_USD, (LONG_1_BTC_CALL_ATM_3M, SHORT_0_55_BTC_PERP))
    call_alone = req(Portfolio(SETTLE_USD, (LONG_1_BTC_CALL_ATM_3M,)))
    perp_alone = req(Portfolio(SETTLE_USD, (SHORT_0_55_BTC_PERP,)))
    together = req(book)
    # call alone: worst at -15 %, vol -30 %: 9,947.64 -> B76(85,000, 0.35) = 1,533.32: loss 8,414.33
    assert call_alone.requirement == pytest.approx(8_414.327013636648, rel=1e-12)
    assert (call_alone.move, call_alone.vol_shock) == (-0.15, -0.3)
    # short 0.55 BTC perp alone: worst at +15 %: 0.55 x 15,000 = 8,250
    assert perp_alone.requirement == pytest.approx(8_250.0, rel=1e-12)
    # together the price moves offset (delta ~0); the worst is vol -30 % with no move:
    # B76(100,000, 0.35) = 6,972.59, loss 9,947.64 - 6,972.59 = 2,975.05 < 8,414.33 + 8,250 = 16,664.33
    assert together.requirement == pytest.approx(2_975.0535092795035, rel=1e-12)
    assert (together.move, together.vol_shock) == (0.0, -0.3)
    assert together.requirement < call_alone.requirement + perp_alone.requirement
    assert pm.standalone_sum(book) == pytest.approx(16_664.327013636648, rel=1e-12)


@BOTH
def test_more_short_options_more_margin(req):
    # 1..4 short 110k calls: each adds the same worst loss (+15 %, vol +30 %): 10,984.91 per call
    reqs = [req(Portfolio(SETTLE_USD, (Leg(LEG_OPTION, -n * 1000, 1000, 1.0, F, 110_000.0, 0.25, 0.5, True),)))
            .requirement for n in range(1, 5)]
    assert reqs == pytest.approx([10_984.913360317616 * n for n in range(1, 5)], rel=1e-12)
    assert all(b > a for a, b in zip(reqs, reqs[1:]))
    # a short put added to short puts adds margin too
    put = Leg(LEG_OPTION, -1000, 1000, 1.0, F, 90_000.0, 0.25, 0.5, False)
    put2 = Leg(LEG_OPTION, -2000, 1000, 1.0, F, 95_000.0, 0.1, 0.6, False)
    assert req(Portfolio(SETTLE_USD, (put, put2))).requirement > req(Portfolio(SETTLE_USD, (put,))).requirement


@BOTH
def test_short_option_minimum_floors_a_far_otm_short(req):
    # a 1-day 300k call: worthless in every scenario, so the worst loss is ~0; the minimum
    # is 1 % of |q| cs F = 0.01 x 2 x 100,000 = 2,000 USD
    far = Leg(LEG_OPTION, -2000, 1000, 1.0, F, 300_000.0, 1 / 365, 0.5, True)
    got = req(Portfolio(SETTLE_USD, (far,)))
    assert got.worst_loss < 1e-6
    assert got.short_option_minimum == pytest.approx(2_000.0)
    assert got.requirement == pytest.approx(2_000.0)


@BOTH
def test_requirement_never_negative_and_empty_book_zero(req):
    assert req(Portfolio(SETTLE_USD, ())).requirement == 0.0
    # an expired long call at the money gains in every up move and loses nothing down
    # (intrinsic 0 -> 0): worst loss 0, requirement 0, not negative
    got = req(Portfolio(SETTLE_USD, (Leg(LEG_OPTION, 1000, 1000, 1.0, F, 100_000.0, 0.0, 0.5, True),)))
    assert got.worst_loss == 0.0 and got.requirement == 0.0


@BOTH
def test_coin_settled_book(req):
    # Deribit-style: 1 BTC call settled in BTC on an inverse perp (cs 100 USD). The coin
    # value of the call is B76 / F: at the mark 9,947.64 / 100,000 = 0.0994764 BTC.
    call = Leg(LEG_OPTION, 1000, 1000, 1.0, F, 100_000.0, 0.25, 0.5, True)
    assert pm.leg_value(call, SETTLE_COIN) == pytest.approx(0.09947644966022577, rel=1e-12)
    # a short inverse perp of 550 contracts x 100 USD: value -(-55,000) / F = 0.55 BTC; at +15 %
    # 55,000 / 115,000 = 0.478261: a loss of 0.071739 BTC (coin P&L is not linear in F);
    # the +45 % extreme loses 0.55 - 55,000 / 145,000 = 0.170690, counted 33 %: 0.056328 < 0.071739
    perp = Leg(LEG_INVERSE, -550, 1, 100.0, F)
    alone = req(Portfolio(SETTLE_COIN, (perp,)))
    assert alone.requirement == pytest.approx(0.55 - 55_000 / 115_000, rel=1e-12)
    assert (alone.move, alone.weight) == (0.15, 1.0)
    book = req(Portfolio(SETTLE_COIN, (call, perp)))
    legs = req(Portfolio(SETTLE_COIN, (call,))).requirement + alone.requirement
    assert book.requirement < legs


def test_kernel_agrees_on_the_named_books():
    for legs in [(LONG_1_BTC_CALL_ATM_3M, SHORT_0_55_BTC_PERP), (SHORT_1_BTC_CALL_110K,),
                 (SHORT_1_BTC_CALL_110K, LONG_1_BTC_CALL_ATM_3M, SHORT_0_55_BTC_PERP)]:
        pf = Portfolio(SETTLE_USD, legs)
        a, b = requirement_reference(pf), pm.portfolio_requirement(pf)
        assert b.requirement == pytest.approx(a.requirement, rel=1e-12)
        assert b.worst_scenario == a.worst_scenario
        assert np.allclose(b.losses, a.losses, rtol=1e-12, atol=1e-9)


# --------------------------------------------------------------------------- VaR
def test_var_short_call_and_delta_neutral_long_gamma():
    short = Portfolio(SETTLE_USD, (SHORT_1_BTC_CALL_110K,))
    v = pm.var_requirement(short)
    # 1-day 99 %: sigma_1d = 0.6 sqrt(1/365) = 3.14 %; the loss at the 99th percentile return
    # (rank 990 of 1000 midpoint quantiles, z = N^-1(0.9895) = 2.3079) is between the
    # delta and the delta-plus-gamma estimate of that move
    z = pm.var_returns()[989] / (0.6 * math.sqrt(1 / 365))
    assert z == pytest.approx(2.3079, abs=1e-4)
    g = pm.greeks(F, 110_000, 0.25, 0.5, True)
    dF = F * math.expm1(pm.var_returns()[989])
    assert g.delta * dF < v < g.delta * dF + 0.5 * g.gamma * dF**2 * 1.01
    # long call + short delta: long gamma, gains on both sides: VaR floored at 0
    assert pm.var_requirement(Portfolio(SETTLE_USD, (LONG_1_BTC_CALL_ATM_3M, SHORT_0_55_BTC_PERP))) == \
        pytest.approx(0.0, abs=1.0)
    # historical returns given: the loss at rank ceil(0.99 x 4) = 4 (the -10 % day) of a long perp
    hist = [0.01, -0.02, 0.03, math.log(0.9)]
    long_perp = Portfolio(SETTLE_USD, (Leg(LEG_LINEAR, 1000, 1000, 1.0, F),))
    assert pm.var_requirement(long_perp, returns=hist) == pytest.approx(10_000.0, rel=1e-12)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("pf,match", [
    (Portfolio(SETTLE_USD, (Leg(LEG_INVERSE, 1, 1, 100.0, F),)), r"legs\[0\]\.kind: 1 not allowed in a USD-settled"),
    (Portfolio(SETTLE_COIN, (Leg(LEG_LINEAR, 1, 1, 1.0, F),)), r"legs\[0\]\.kind: 0 not allowed in a coin-settled"),
    (Portfolio(7, ()), r"settle: SETTLE_USD"),
    (Portfolio(SETTLE_USD, (Leg(LEG_LINEAR, 1.5, 1, 1.0, F),)), r"legs\[0\]\.qty: integer units"),
    (Portfolio(SETTLE_USD, (Leg(LEG_LINEAR, 1, 0, 1.0, F),)), r"legs\[0\]\.qty_scale"),
    (Portfolio(SETTLE_USD, (Leg(LEG_LINEAR, 1, 1, 1.0, -F),)), r"legs\[0\]\.price \(underlying price F\): must be > 0"),
    (Portfolio(SETTLE_USD, (Leg(LEG_LINEAR, 1, 1, 1.0, math.nan),)), r"must be finite"),
    (Portfolio(SETTLE_USD, (Leg(LEG_OPTION, 1, 1, 1.0, F, 0.0, 0.1, 0.5),)), r"legs\[0\]\.strike: must be > 0"),
    (Portfolio(SETTLE_USD, (Leg(LEG_OPTION, 1, 1, 1.0, F, F, 0.1, -0.5),)), r"legs\[0\]\.sigma: must be >= 0"),
    (Portfolio(SETTLE_USD, (Leg(LEG_OPTION, 1, 1, 1.0, F, F, math.nan, 0.5),)), r"legs\[0\]\.expiry_years"),
])
def test_bad_portfolio_is_a_clear_value_error(pf, match):
    for fn in (requirement_reference, pm.portfolio_requirement, pm.var_requirement):
        with pytest.raises(ValueError, match=match):
            fn(pf)


@pytest.mark.parametrize("kw,match", [
    ({"price_range": 0.0}, "price_range: must be > 0"), ({"price_range": 1.2}, "price_range: must be < 1"),
    ({"price_steps": 1}, "price_steps"), ({"vol_shocks": (-1.0,)}, r"vol_shocks\[0\]: must be > -1"),
    ({"vol_shocks": ()}, "vol_shocks"), ({"extreme_multiple": 7.0}, "extreme_multiple"),
    ({"extreme_fraction": 1.5}, "extreme_fraction"), ({"short_option_min": -0.1}, "short_option_min"),
    ({"var_confidence": 1.0}, "var_confidence"), ({"var_points": 5}, "var_points"),
    ({"rate": math.nan}, "rate: must be finite"),
])
def test_bad_params_are_clear_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ScenarioParams(**kw)


def test_checked_api_refuses_bad_packed_arrays():
    packed = pm.pack([Portfolio(SETTLE_USD, (LONG_1_BTC_CALL_ATM_3M,))])
    bad = dict(packed, size=packed["size"].astype(np.float32))
    with pytest.raises(ValueError, match=r"packed\.size: a C-contiguous 1-d float64"):
        pm.requirements_packed(bad)
    bad = dict(packed, offsets=np.array([0, 2], np.int64))
    with pytest.raises(ValueError, match=r"packed\.offsets"):
        pm.requirements_packed(bad)
    bad = dict(packed, price=np.array([-1.0]))
    with pytest.raises(ValueError, match=r"packed\.price: must be > 0"):
        pm.requirements_packed(bad)


def test_requirement_units_round_up():
    assert pm.requirement_units(2_975.0535092795035, 10**6) == 2_975_053_510    # micro-USDT, up
    assert pm.requirement_units(0.0, 10**8) == 0
