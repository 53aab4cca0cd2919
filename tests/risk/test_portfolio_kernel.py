"""The Cython scenario kernel (ext/_portfolio.pyx, through engine.risk.portfolio's checked
API) held to the plain-Python reference on random portfolios (hypothesis).

Random books: USD-settled (linear perps / futures and options) or coin-settled (inverse
perps / futures and options), 0 to 8 legs, long and short, calls and puts, strikes from
deep in to far out of the money, expiries from expired to two years, vols from 0 to
200 %, rates from 0 to 10 %, and grids of random shape.

Tolerance (``TOL`` = 1e-9, relative to the book's gross value). Kernel and reference
compute the same formulas in float64 in the same summation order; they differ only in
``ln(F'/K)``, which the kernel takes as ``ln(F/K) + ln(1 + m)`` (a few ulps of the log).
That error enters d1 divided by sigma sqrt(T) and then the value times F phi(d1), so
per leg it is ~1e-16 |size| F / (sigma sqrt T); with sigma sqrt T >= 1e-3 here that is
<= ~1e-13 of the leg's gross value, summed over <= 8 legs. The loss is a difference of
two sums (base - shocked), so cancellation makes the *result* small while the error
stays proportional to the terms: compare against
``1e-9 * max(1e-12, sum_i max_s |V_i(s)| + sum_options |q| cs F)`` (``gross``) -- ~1e4 above the rounding, far below any
formula slip (those are O(1) of a leg's value).
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from engine.risk import portfolio as pm
from engine.risk.portfolio import (LEG_INVERSE, LEG_LINEAR, LEG_OPTION, SETTLE_COIN, SETTLE_USD, Leg,
                                   Portfolio, ScenarioParams)

TOL = 1e-9
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def legs(draw, settle: int, F: float):
    kind = draw(st.sampled_from([LEG_OPTION, LEG_OPTION, LEG_OPTION,
                                 LEG_LINEAR if settle == SETTLE_USD else LEG_INVERSE]))
    qty_scale = draw(st.sampled_from([1, 10, 1000]))
    qty = draw(st.integers(-50 * qty_scale, 50 * qty_scale))
    price = F * draw(st.floats(0.97, 1.03))          # futures of other expiries: a basis
    if kind == LEG_INVERSE:
        return Leg(kind, qty, qty_scale, draw(st.sampled_from([1.0, 10.0, 100.0])), price)
    cs = draw(st.sampled_from([1.0, 0.1, 0.01]))
    if kind == LEG_LINEAR:
        return Leg(kind, qty, qty_scale, cs, price)
    strike = round(price * draw(st.floats(0.3, 3.0)), 0) or 1.0
    expiry = draw(st.one_of(st.just(0.0), st.floats(-0.1, 0.0), st.floats(1 / 365, 2.0)))
    sigma = draw(st.one_of(st.just(0.0), st.floats(0.05, 2.0)))
    return Leg(kind, qty, qty_scale, cs, price, strike, expiry, sigma, draw(st.booleans()))


@st.composite
def books(draw):
    settle = draw(st.sampled_from([SETTLE_USD, SETTLE_COIN]))
    F = draw(st.sampled_from([3_000.0, 65_000.0, 100_000.0]))
    return Portfolio(settle, tuple(draw(st.lists(legs(settle, F), max_size=8))))


params_st = st.builds(
    ScenarioParams,
    price_range=st.floats(0.01, 0.3), price_steps=st.integers(2, 11),
    vol_shocks=st.lists(st.floats(-0.9, 1.0), min_size=1, max_size=4).map(tuple),
    extreme_multiple=st.sampled_from([0.0, 2.0, 3.0]), extreme_fraction=st.floats(0.0, 1.0),
    short_option_min=st.sampled_from([0.0, 0.01, 0.05]), rate=st.sampled_from([0.0, 0.02, 0.1]))


def gross(pf: Portfolio, params: ScenarioParams) -> float:
    """``sum_i max_s |V_i(s)|`` over the grid (and s = 0), plus the options' ``|q| cs F``
    (coin: ``|q| cs``) that the short-option minimum is a sum of: the scale of the rounding.
    (A book of worthless short options has no value in any scenario, but a minimum.)"""
    m, v, _ = pm.scenario_grid(params)
    total = 0.0
    for leg in pf.legs:
        if leg.kind == LEG_OPTION:
            total += abs(leg.size) * (1.0 if pf.settle == SETTLE_COIN else leg.price)
        vals = [abs(pm.leg_value(leg, pf.settle, float(a), float(b), params.rate)) for a, b in zip(m, v)]
        total += max(vals + [abs(pm.leg_value(leg, pf.settle, 0.0, 0.0, params.rate))])
    return total


@SETTINGS
@given(pf=books(), params=params_st)
def test_kernel_equals_reference(pf, params):
    want = pm.requirement_reference(pf, params)
    got = pm.portfolio_requirement(pf, params)
    tol = TOL * max(1e-12, gross(pf, params))
    note(f"want {want.requirement!r} got {got.requirement!r} tol {tol!r}")
    assert abs(got.requirement - want.requirement) <= tol
    assert abs(got.short_option_minimum - want.short_option_minimum) <= tol
    assert len(got.losses) == len(want.losses)
    assert np.all(np.abs(np.array(got.losses) - np.array(want.losses)) <= tol)
    # the worst scenario: the same, or one whose loss the reference puts within tol of the worst
    if want.worst_scenario >= 0:
        assert want.losses[got.worst_scenario] >= want.worst_loss - 2 * tol
    else:
        assert got.worst_scenario == -1


@SETTINGS
@given(pfs=st.lists(books(), min_size=1, max_size=6))
def test_batch_equals_one_by_one(pfs):
    """Packed portfolios side by side: each row is its portfolio's own requirement."""
    out = pm.requirements_packed(pm.pack(pfs))
    for p, pf in enumerate(pfs):
        assert out["requirement"][p] == pm.portfolio_requirement(pf).requirement


@SETTINGS
@given(pf=books(), k=st.integers(2, 5))
def test_more_of_the_same_book_scales_its_requirement(pf, k):
    """k times every leg: k times the requirement (losses and the minimum are linear in q)."""
    big = Portfolio(pf.settle, tuple(Leg(l.kind, l.qty * k, l.qty_scale, l.contract_size, l.price, l.strike,
                                         l.expiry_years, l.sigma, l.is_call) for l in pf.legs))
    one, many = pm.portfolio_requirement(pf).requirement, pm.portfolio_requirement(big).requirement
    assert abs(many - k * one) <= TOL * k * max(1e-12, gross(pf, pm.DEFAULT_PARAMS))
