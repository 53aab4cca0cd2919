"""Portfolio margin for options, perps and futures on one underlying: reference and checked API.

Not wired into the live workers: the live path still runs the standard rules of
ext/_margin.pyx. This module is the pure model, its plain-Python reference, and the
checked API over the Cython kernel ``ext/_portfolio.pyx``; ``margin-engine portfolio``
(docs/portfolio.md) reaches it from a JSON scenario.

1. Pricing: Black-76
--------------------
A European option on a forward (or futures / perp) price ``F``, strike ``K``, time to
expiry ``T`` (years, ACT/365 from ``expiry_ns`` and a valuation time), volatility
``sigma`` (a decimal per sqrt(year)) and a continuously compounded rate ``r``::

    d1 = (ln(F/K) + sigma^2 T / 2) / (sigma sqrt(T)),   d2 = d1 - sigma sqrt(T)
    call = e^(-rT) (F N(d1) - K N(d2))
    put  = e^(-rT) (K N(-d2) - F N(-d1))

``N`` is the standard normal CDF, ``N(x) = erfc(-x / sqrt(2)) / 2``. At ``T <= 0`` the
value is the intrinsic ``max(F - K, 0)`` (call) or ``max(K - F, 0)`` (put); at
``sigma <= 0`` (and ``T > 0``) it is the discounted intrinsic of the forward,
``e^(-rT) max(+-(F - K), 0)``. Prices are in the quote currency (USD) per 1 unit of the
base coin.

2. Settlement conventions (engine/instruments.py)
-------------------------------------------------
An engine ``Kind.OPTION`` has its premium in its settle asset per 1 base coin (the
value of ``q`` contracts is ``q cs p``, ``cs`` base coin per contract). Two
conventions are supported, one per portfolio (``Portfolio.settle``):

* ``SETTLE_USD`` -- the option settles in the asset its *linear* underlying settles in
  (USDT-style): the value is the Black-76 USD value. Allowed with it: linear perps and
  futures (``LEG_LINEAR``, value ``q cs F``).
* ``SETTLE_COIN`` -- Deribit-style inverse option: it settles in the base coin, which is
  the settle asset of its *inverse* underlying (e.g. BTC options on BTCUSD inverse
  perp, premium in BTC): the coin value is the Black-76 USD value divided by ``F``.
  Allowed with it: inverse perps and futures (``LEG_INVERSE``, ``cs`` USD per contract,
  coin value ``-q cs / F``).

Any other combination (an option settled in an asset that is not its underlying's
settle asset, a linear perp in a coin portfolio) is refused, since its P&L would be in
two currencies. Requirements come out in the portfolio's settle asset.

3. The SPAN-style scenario grid
-------------------------------
Scenarios ``s = (m_s, v_s, w_s)``: every underlying price moves to ``F (1 + m_s)``
(all legs together: one underlying), every volatility to ``sigma (1 + v_s)``, and the
loss counts with weight ``w_s``. Ordinary moves: ``price_steps`` evenly spaced from
``-price_range`` to ``+price_range``, crossed with ``vol_shocks`` (weight 1); extreme
moves ``+-extreme_multiple * price_range`` crossed with ``vol_shocks``, weight
``extreme_fraction`` (SPAN counts a fraction of a far move's loss). With ``V_i(F,
sigma)`` a leg's value in the settle asset::

    loss_s      = w_s * (sum_i V_i(F_i, sigma_i) - sum_i V_i(F_i (1 + m_s), sigma_i (1 + v_s)))
    short_min   = short_option_min * sum_(short options) |q| cs F    (USD; coin: |q| cs)
    requirement = max(max_s loss_s, short_min, 0)

Options are revalued with Black-76 at the shocked ``F`` and ``sigma`` (same ``T``: the
grid is a move now, not a move over a horizon); perps and futures linearly (inverse: in
``1/F``). The base value is Black-76 at the current ``F`` and ``sigma``, not the
exchange mark, so the no-move scenario loses exactly 0.

4. VaR alternative (parametric full revaluation)
------------------------------------------------
One-day-type VaR at ``var_confidence`` over ``var_horizon_days``: the underlying's log
return is normal with volatility ``var_vol * sqrt(horizon / 365)``; ``var_points``
returns are taken at the midpoint quantiles ``z_j = N^-1((j + 1/2) / n)`` (equal
probability each), the portfolio is revalued in full at ``F e^(z_j s)`` (options by
Black-76 at unchanged sigma), and VaR is the loss at rank ``ceil(confidence * n)`` of the
sorted losses (the historical-simulation quantile, so a user-given return series works
the same: ``var_requirement(..., returns=...)``). Floored at 0. Full revaluation, not
delta-normal: a delta-neutral short straddle still shows its gamma loss.

5. Not done here: the liquidity add-on (L-VaR from book depth) of docs/design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Sequence

import numpy as np

NS_PER_YEAR = 365 * 86_400 * 10**9          # ACT/365
SQRT2 = math.sqrt(2.0)

LEG_LINEAR, LEG_INVERSE, LEG_OPTION = 0, 1, 2
SETTLE_USD, SETTLE_COIN = 0, 1


# --------------------------------------------------------------------------- 1. Black-76
def norm_cdf(x: float) -> float:
    """Standard normal CDF, ``erfc(-x / sqrt 2) / 2`` (accurate in both tails)."""
    return 0.5 * math.erfc(-x / SQRT2)


def norm_pdf(x: float) -> float:
    """Standard normal density ``e^(-x^2/2) / sqrt(2 pi)``."""
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _number(value, where: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a finite float; ValueError naming ``where`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: must be a number, got {type(value).__name__}")
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"{where}: must be finite, got {value!r}")
    if positive and f <= 0:
        raise ValueError(f"{where}: must be > 0, got {value!r}")
    if nonnegative and f < 0:
        raise ValueError(f"{where}: must be >= 0, got {value!r}")
    return f


def _check_b76(F, K, T, sigma, r) -> tuple[float, float, float, float, float]:
    return (_number(F, "F (underlying price)", positive=True), _number(K, "K (strike)", positive=True),
            _number(T, "T (years to expiry)"), _number(sigma, "sigma (volatility)"),
            _number(r, "r (rate)"))


def _b76(F: float, K: float, T: float, sigma: float, is_call: bool, r: float) -> float:
    """Unchecked Black-76 value (see the module docstring)."""
    if T <= 0.0:
        return max(F - K, 0.0) if is_call else max(K - F, 0.0)
    df = math.exp(-r * T)
    if sigma <= 0.0:
        return df * (max(F - K, 0.0) if is_call else max(K - F, 0.0))
    sv = sigma * math.sqrt(T)
    d1 = math.log(F / K) / sv + 0.5 * sv
    d2 = d1 - sv
    if is_call:
        return df * (F * norm_cdf(d1) - K * norm_cdf(d2))
    return df * (K * norm_cdf(-d2) - F * norm_cdf(-d1))


def black76(F: float, K: float, T: float, sigma: float, is_call: bool, r: float = 0.0) -> float:
    """Black-76 value of a European option, quote currency per 1 base coin.

    ``call = e^(-rT) (F N(d1) - K N(d2))``, ``put = e^(-rT) (K N(-d2) - F N(-d1))`` with
    ``d1 = (ln(F/K) + sigma^2 T/2) / (sigma sqrt T)``, ``d2 = d1 - sigma sqrt T``.
    ``T <= 0``: intrinsic value; ``sigma <= 0``: discounted forward intrinsic.

    Raises ValueError for ``F <= 0``, ``K <= 0`` or any NaN / infinite input.
    """
    F, K, T, sigma, r = _check_b76(F, K, T, sigma, r)
    return _b76(F, K, T, sigma, bool(is_call), r)


@dataclass(frozen=True)
class Greeks:
    """Black-76 value and sensitivities of one option on 1 base coin (quote currency)."""

    price: float     # quote per 1 base
    delta: float     # dV/dF, base units (calls in [0, 1], puts in [-1, 0] at r = 0)
    gamma: float     # d2V/dF2, per quote
    vega: float      # dV/dsigma, quote per 1.00 of vol (Deribit quotes per 1 %: divide by 100)
    theta: float     # dV/dt, quote per year of calendar time passing (per day: / 365)


def greeks(F: float, K: float, T: float, sigma: float, is_call: bool, r: float = 0.0) -> Greeks:
    """Black-76 value and Greeks.

    With ``D = e^(-rT)`` and ``phi`` the normal density::

        delta = D N(d1) (call),  -D N(-d1) (put)
        gamma = D phi(d1) / (F sigma sqrt T)
        vega  = D F phi(d1) sqrt T
        theta = -D F phi(d1) sigma / (2 sqrt T) + r V      (dV/dt as time passes)

    At ``T <= 0`` or ``sigma <= 0`` the value is (discounted) intrinsic: delta is
    ``+-D`` in the money, 0 out of it (0 at the strike itself), gamma and vega 0, theta
    ``r V``. Raises ValueError on bad input (as ``black76``).
    """
    F, K, T, sigma, r = _check_b76(F, K, T, sigma, r)
    is_call = bool(is_call)
    v = _b76(F, K, T, sigma, is_call, r)
    if T <= 0.0 or sigma <= 0.0:
        df = 1.0 if T <= 0.0 else math.exp(-r * T)
        itm = (F > K) if is_call else (F < K)
        delta = (df if is_call else -df) if itm else 0.0
        return Greeks(v, delta, 0.0, 0.0, r * v if T > 0.0 else 0.0)
    df = math.exp(-r * T)
    sq = math.sqrt(T)
    sv = sigma * sq
    d1 = math.log(F / K) / sv + 0.5 * sv
    pdf = norm_pdf(d1)
    delta = df * norm_cdf(d1) if is_call else -df * norm_cdf(-d1)
    gamma = df * pdf / (F * sv)
    vega = df * F * pdf * sq
    theta = -df * F * pdf * sigma / (2.0 * sq) + r * v
    return Greeks(v, delta, gamma, vega, theta)


def year_fraction(expiry_ns: int, valuation_ns: int) -> float:
    """Years from ``valuation_ns`` to ``expiry_ns`` (both Unix ns), ACT/365; negative past expiry."""
    if isinstance(expiry_ns, bool) or isinstance(valuation_ns, bool):
        raise ValueError("expiry_ns / valuation_ns: integers of Unix nanoseconds, got a bool")
    return (int(expiry_ns) - int(valuation_ns)) / NS_PER_YEAR


# --------------------------------------------------------------------------- 2. portfolios
@dataclass(frozen=True)
class Leg:
    """One position of a portfolio.

    ``qty`` is integer units of ``1/qty_scale`` contracts (signed: + long), as the store
    holds it. ``price`` is the underlying price ``F`` this leg moves with, USD per 1 base:
    a perp's or future's own mark; an option's underlying mark (its forward).
    """

    kind: int                 # LEG_LINEAR, LEG_INVERSE or LEG_OPTION
    qty: int                  # units of 1/qty_scale contracts
    qty_scale: int            # units per contract
    contract_size: float      # linear, option: base per contract; inverse: USD per contract
    price: float              # F, USD per 1 base
    strike: float = 0.0       # option: USD
    expiry_years: float = 0.0  # option: T, years (<= 0: expired, intrinsic)
    sigma: float = 0.0        # option: implied volatility, decimal per sqrt(year)
    is_call: bool = True      # option

    @property
    def contracts(self) -> float:
        """``q = qty / qty_scale`` contracts."""
        return self.qty / self.qty_scale

    @property
    def size(self) -> float:
        """``q cs``: base coin (linear, option) or USD (inverse), signed."""
        return self.qty / self.qty_scale * self.contract_size


@dataclass(frozen=True)
class Portfolio:
    """Legs on one underlying, margined in one settle asset (``SETTLE_USD`` / ``SETTLE_COIN``)."""

    settle: int
    legs: tuple[Leg, ...] = ()


@dataclass(frozen=True)
class ScenarioParams:
    """Parameters of the scenario grid and the VaR alternative; units on each field."""

    price_range: float = 0.15                # ordinary moves reach +-this fraction of F
    price_steps: int = 7                     # ordinary moves, evenly spaced, -range..+range (>= 2)
    vol_shocks: tuple[float, ...] = (-0.30, 0.0, 0.30)  # relative: sigma -> sigma (1 + v), each > -1
    extreme_multiple: float = 3.0            # extreme moves: +-multiple * price_range (0: none)
    extreme_fraction: float = 0.33           # fraction of an extreme move's loss counted, [0, 1]
    short_option_min: float = 0.01           # per short option: fraction of |q| cs F (USD) or |q| cs (coin)
    rate: float = 0.0                        # r, continuously compounded, per year
    var_confidence: float = 0.99             # VaR quantile, (0, 1)
    var_horizon_days: float = 1.0            # VaR horizon, calendar days (> 0)
    var_vol: float = 0.60                    # underlying's volatility for VaR, decimal per sqrt(year) (> 0)
    var_points: int = 1000                   # equal-probability return points of the VaR (>= 10)

    def __post_init__(self):
        """Check every field (ValueError naming it); runs on construction."""
        _number(self.price_range, "price_range", positive=True)
        if self.price_range >= 1:
            raise ValueError(f"price_range: must be < 1 (a move of -100 % or more), got {self.price_range}")
        if isinstance(self.price_steps, bool) or not isinstance(self.price_steps, int) or self.price_steps < 2:
            raise ValueError(f"price_steps: an integer >= 2, got {self.price_steps!r}")
        if not isinstance(self.vol_shocks, tuple) or not self.vol_shocks:
            raise ValueError("vol_shocks: a non-empty tuple of relative shocks")
        for i, v in enumerate(self.vol_shocks):
            if _number(v, f"vol_shocks[{i}]") <= -1:
                raise ValueError(f"vol_shocks[{i}]: must be > -1 (a volatility stays positive), got {v}")
        _number(self.extreme_multiple, "extreme_multiple", nonnegative=True)
        if self.extreme_multiple * self.price_range >= 1:
            raise ValueError(f"extreme_multiple * price_range: must be < 1, got "
                             f"{self.extreme_multiple * self.price_range}")
        if not 0 <= _number(self.extreme_fraction, "extreme_fraction") <= 1:
            raise ValueError(f"extreme_fraction: must be in [0, 1], got {self.extreme_fraction}")
        _number(self.short_option_min, "short_option_min", nonnegative=True)
        _number(self.rate, "rate")
        if not 0 < _number(self.var_confidence, "var_confidence") < 1:
            raise ValueError(f"var_confidence: must be in (0, 1), got {self.var_confidence}")
        _number(self.var_horizon_days, "var_horizon_days", positive=True)
        _number(self.var_vol, "var_vol", positive=True)
        if isinstance(self.var_points, bool) or not isinstance(self.var_points, int) or self.var_points < 10:
            raise ValueError(f"var_points: an integer >= 10, got {self.var_points!r}")


DEFAULT_PARAMS = ScenarioParams()


def scenario_grid(params: ScenarioParams = DEFAULT_PARAMS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(moves, vol_shocks, weights)``, float64 arrays of one length, scenario by scenario.

    Ordinary: ``m = -range + 2 range j / (steps - 1)`` for ``j = 0..steps-1`` (the middle
    one exactly 0 when ``steps`` is odd) crossed with the vol shocks, weight 1; then
    extremes ``-multiple range`` and ``+multiple range`` crossed with the vol shocks,
    weight ``extreme_fraction`` (none when ``extreme_multiple`` is 0).
    """
    p = params
    n = p.price_steps
    moves = [-p.price_range + 2.0 * p.price_range * j / (n - 1) for j in range(n)]
    if n % 2 == 1:
        moves[n // 2] = 0.0
    rows = [(m, v, 1.0) for m in moves for v in p.vol_shocks]
    if p.extreme_multiple > 0:
        x = p.extreme_multiple * p.price_range
        rows += [(m, v, p.extreme_fraction) for m in (-x, x) for v in p.vol_shocks]
    a = np.array(rows, dtype=np.float64)
    return a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy()


@dataclass(frozen=True)
class PortfolioResult:
    """A portfolio's requirement, in its settle asset."""

    requirement: float          # max(worst weighted loss, short-option minimum, 0), settle asset
    worst_scenario: int         # index into scenario_grid (first of equal losses); -1: no legs
    worst_loss: float           # the worst scenario's weighted loss, settle asset (may be < 0)
    short_option_minimum: float  # settle asset
    move: float = 0.0           # the worst scenario's price move (fraction)
    vol_shock: float = 0.0      # its relative vol shock
    weight: float = 1.0         # its weight
    losses: tuple[float, ...] = field(default=(), repr=False)   # every scenario's weighted loss


def check_portfolio(pf: Portfolio) -> Portfolio:
    """Validate a Portfolio; return it. ValueError names the first bad field.

    Steps: the settle convention is known; each leg's kind is allowed with it (USD:
    linear and option; coin: inverse and option); qty an integer, qty_scale a positive
    integer; contract_size and price finite and > 0; an option's strike > 0, expiry and
    sigma finite, sigma >= 0.
    """
    if pf.settle not in (SETTLE_USD, SETTLE_COIN):
        raise ValueError(f"settle: SETTLE_USD (0) or SETTLE_COIN (1), got {pf.settle!r}")
    allowed = (LEG_LINEAR, LEG_OPTION) if pf.settle == SETTLE_USD else (LEG_INVERSE, LEG_OPTION)
    for i, leg in enumerate(pf.legs):
        w = f"legs[{i}]"
        if leg.kind not in allowed:
            conv = "USD-settled" if pf.settle == SETTLE_USD else "coin-settled"
            raise ValueError(f"{w}.kind: {leg.kind} not allowed in a {conv} portfolio "
                             f"(allowed: {allowed}; P&L would be in two currencies)")
        if isinstance(leg.qty, bool) or not isinstance(leg.qty, (int, np.integer)):
            raise ValueError(f"{w}.qty: integer units of 1/qty_scale contracts, got {leg.qty!r}")
        if isinstance(leg.qty_scale, bool) or not isinstance(leg.qty_scale, (int, np.integer)) or leg.qty_scale <= 0:
            raise ValueError(f"{w}.qty_scale: a positive integer, got {leg.qty_scale!r}")
        _number(leg.contract_size, f"{w}.contract_size", positive=True)
        _number(leg.price, f"{w}.price (underlying price F)", positive=True)
        if leg.kind == LEG_OPTION:
            _number(leg.strike, f"{w}.strike", positive=True)
            _number(leg.expiry_years, f"{w}.expiry_years")
            _number(leg.sigma, f"{w}.sigma", nonnegative=True)
    return pf


# --------------------------------------------------------------------------- 3. reference
def leg_value(leg: Leg, settle: int, move: float = 0.0, vol_shock: float = 0.0,
              rate: float = 0.0) -> float:
    """A leg's value in the settle asset after the move, plain Python (the reference).

    ``F' = F (1 + move)``, ``sigma' = sigma (1 + vol_shock)``; USD value ``U``:
    linear ``q cs F'``, inverse ``-q cs`` (USD, constant), option ``q cs B76(F', sigma')``;
    the value is ``U`` (USD portfolio) or ``U / F'`` (coin portfolio).
    """
    f = leg.price * (1.0 + move)
    if leg.kind == LEG_LINEAR:
        u = leg.size * f
    elif leg.kind == LEG_INVERSE:
        u = -leg.size
    else:
        u = leg.size * _b76(f, leg.strike, leg.expiry_years, leg.sigma * (1.0 + vol_shock), leg.is_call, rate)
    return u / f if settle == SETTLE_COIN else u


def short_option_minimum(pf: Portfolio, params: ScenarioParams = DEFAULT_PARAMS) -> float:
    """``short_option_min * sum_(short options) |q| cs F`` (USD) or ``|q| cs`` (coin)."""
    total = 0.0
    for leg in pf.legs:
        if leg.kind == LEG_OPTION and leg.qty < 0:
            total += -leg.size * (1.0 if pf.settle == SETTLE_COIN else leg.price)
    return params.short_option_min * total


def _result(losses: Sequence[float], short_min: float, grid, n_legs: int) -> PortfolioResult:
    moves, vols, weights = grid
    if n_legs == 0:
        return PortfolioResult(max(short_min, 0.0), -1, 0.0, short_min, losses=tuple(losses))
    worst = 0
    for s in range(1, len(losses)):
        if losses[s] > losses[worst]:
            worst = s
    req = max(losses[worst], short_min, 0.0)
    return PortfolioResult(req, worst, float(losses[worst]), short_min, float(moves[worst]),
                           float(vols[worst]), float(weights[worst]), tuple(float(x) for x in losses))


def requirement_reference(pf: Portfolio, params: ScenarioParams = DEFAULT_PARAMS) -> PortfolioResult:
    """The scenario requirement in plain Python, leg by leg and scenario by scenario (the oracle).

    ``loss_s = w_s (sum_i V_i(0) - sum_i V_i(s))``; requirement ``max(max_s loss_s,
    short_min, 0)``; see the module docstring.
    """
    check_portfolio(pf)
    grid = scenario_grid(params)
    base = sum(leg_value(leg, pf.settle, 0.0, 0.0, params.rate) for leg in pf.legs)
    losses = []
    for m, v, w in zip(*grid):
        value = sum(leg_value(leg, pf.settle, float(m), float(v), params.rate) for leg in pf.legs)
        losses.append(float(w) * (base - value))
    return _result(losses, short_option_minimum(pf, params), grid, len(pf.legs))


def standalone_sum(pf: Portfolio, params: ScenarioParams = DEFAULT_PARAMS) -> float:
    """Sum over legs of each leg's own scenario requirement (the legs margined alone)."""
    return sum(portfolio_requirement(Portfolio(pf.settle, (leg,)), params).requirement for leg in pf.legs)


# --------------------------------------------------------------------------- 4. VaR
def var_returns(params: ScenarioParams = DEFAULT_PARAMS) -> np.ndarray:
    """The parametric VaR's log returns: ``z_j s`` at ``z_j = N^-1((j + 1/2) / n)``,
    ``s = var_vol sqrt(var_horizon_days / 365)``, ``j = 0..n-1``."""
    n = params.var_points
    s = params.var_vol * math.sqrt(params.var_horizon_days / 365.0)
    nd = NormalDist()
    return np.array([nd.inv_cdf((j + 0.5) / n) * s for j in range(n)], dtype=np.float64)


def var_requirement(pf: Portfolio, params: ScenarioParams = DEFAULT_PARAMS,
                    returns: Sequence[float] | None = None) -> float:
    """Full-revaluation VaR of the portfolio, settle asset, floored at 0.

    ``returns``: log returns of the underlying (a historical series: historical VaR);
    default ``var_returns(params)`` (parametric). For each return ``x`` the move is
    ``e^x - 1`` and the loss ``sum_i V_i(0) - sum_i V_i(e^x - 1)`` (volatility unchanged);
    VaR is the ``ceil(confidence n)``-th smallest loss (1-based rank), i.e. the loss
    exceeded with probability at most ``1 - confidence``.
    """
    check_portfolio(pf)
    rets = var_returns(params) if returns is None else np.asarray(returns, dtype=np.float64)
    if rets.ndim != 1 or len(rets) == 0 or not np.all(np.isfinite(rets)):
        raise ValueError("returns: a non-empty 1-d series of finite log returns")
    base = sum(leg_value(leg, pf.settle, 0.0, 0.0, params.rate) for leg in pf.legs)
    losses = sorted(base - sum(leg_value(leg, pf.settle, math.expm1(float(x)), 0.0, params.rate)
                               for leg in pf.legs) for x in rets)
    rank = min(len(losses), max(1, math.ceil(params.var_confidence * len(losses))))
    return max(losses[rank - 1], 0.0)


# --------------------------------------------------------------------------- 5. checked API
LEG_FIELDS = ("kind", "size", "price", "strike", "expiry_years", "sigma", "is_call")


def pack(portfolios: Sequence[Portfolio]) -> dict[str, np.ndarray]:
    """Flatten checked portfolios into the kernel's C-contiguous arrays.

    ``offsets`` (int64, n+1): legs of portfolio ``p`` are ``offsets[p]:offsets[p+1]``;
    per leg ``kind`` (int8), ``size`` (``q cs``, float64), ``price``, ``strike``,
    ``expiry_years``, ``sigma`` (float64), ``is_call`` (int8); per portfolio ``coin``
    (int8: 1 for SETTLE_COIN).
    """
    n_legs = sum(len(pf.legs) for pf in portfolios)
    out = {"offsets": np.zeros(len(portfolios) + 1, np.int64),
           "coin": np.zeros(len(portfolios), np.int8),
           "kind": np.zeros(n_legs, np.int8), "is_call": np.zeros(n_legs, np.int8)}
    for f in ("size", "price", "strike", "expiry_years", "sigma"):
        out[f] = np.zeros(n_legs, np.float64)
    j = 0
    for p, pf in enumerate(portfolios):
        check_portfolio(pf)
        out["coin"][p] = pf.settle == SETTLE_COIN
        for leg in pf.legs:
            out["kind"][j] = leg.kind
            out["size"][j] = leg.size
            out["price"][j] = leg.price
            out["strike"][j] = leg.strike
            out["expiry_years"][j] = leg.expiry_years
            out["sigma"][j] = leg.sigma
            out["is_call"][j] = bool(leg.is_call)
            j += 1
        out["offsets"][p + 1] = j
    return out


def requirements_packed(packed: dict[str, np.ndarray], params: ScenarioParams = DEFAULT_PARAMS,
                        keep_losses: bool = False) -> dict[str, np.ndarray]:
    """Run the Cython kernel over packed portfolios (``pack``); arrays per portfolio.

    Checks the arrays' dtypes, shapes, contiguity and the offsets before the kernel
    (which assumes clean input). Returns ``requirement``, ``worst`` (scenario index,
    -1 for no legs), ``worst_loss``, ``short_min`` and, with ``keep_losses``, ``losses``
    (portfolios x scenarios).
    """
    from engine import _portfolio

    dtypes = {"offsets": np.int64, "coin": np.int8, "kind": np.int8, "is_call": np.int8,
              "size": np.float64, "price": np.float64, "strike": np.float64,
              "expiry_years": np.float64, "sigma": np.float64}
    a = {}
    for name, dt in dtypes.items():
        if name not in packed:
            raise ValueError(f"packed.{name}: missing")
        arr = packed[name]
        if not isinstance(arr, np.ndarray) or arr.dtype != dt or arr.ndim != 1 or not arr.flags.c_contiguous:
            raise ValueError(f"packed.{name}: a C-contiguous 1-d {np.dtype(dt).name} array")
        a[name] = arr
    n = len(a["coin"])
    n_legs = len(a["kind"])
    if len(a["offsets"]) != n + 1 or a["offsets"][0] != 0 or a["offsets"][-1] != n_legs \
            or np.any(np.diff(a["offsets"]) < 0):
        raise ValueError("packed.offsets: n+1 non-decreasing offsets from 0 to the number of legs")
    for f in LEG_FIELDS:
        if len(a[f]) != n_legs:
            raise ValueError(f"packed.{f}: one entry per leg ({n_legs}), got {len(a[f])}")
    if not np.all(np.isin(a["kind"], (LEG_LINEAR, LEG_INVERSE, LEG_OPTION))):
        raise ValueError("packed.kind: LEG_LINEAR, LEG_INVERSE or LEG_OPTION")
    for f in ("size", "price", "strike", "expiry_years", "sigma"):
        if not np.all(np.isfinite(a[f])):
            raise ValueError(f"packed.{f}: must be finite")
    if np.any(a["price"] <= 0):
        raise ValueError("packed.price: must be > 0")
    opt = a["kind"] == LEG_OPTION
    if np.any(a["strike"][opt] <= 0) or np.any(a["sigma"][opt] < 0):
        raise ValueError("packed: an option needs strike > 0 and sigma >= 0")
    moves, vols, weights = scenario_grid(params)
    out = {"requirement": np.zeros(n), "worst": np.zeros(n, np.int32), "worst_loss": np.zeros(n),
           "short_min": np.zeros(n)}
    losses = np.zeros((n, len(moves)) if keep_losses else (0, len(moves)))
    _portfolio.scenario_requirements(
        a["offsets"], a["coin"], a["kind"], a["size"], a["price"], a["strike"], a["expiry_years"],
        a["sigma"], a["is_call"], moves, vols, weights, float(params.rate), float(params.short_option_min),
        out["requirement"], out["worst"], out["worst_loss"], out["short_min"], losses)
    if keep_losses:
        out["losses"] = losses
    return out


def portfolio_requirement(pf: Portfolio, params: ScenarioParams = DEFAULT_PARAMS) -> PortfolioResult:
    """The scenario requirement of one portfolio through the Cython kernel (checked).

    Same rule as ``requirement_reference``; the settle asset's units.
    """
    got = requirements_packed(pack([check_portfolio(pf)]), params, keep_losses=True)
    return _result(got["losses"][0].tolist(), float(got["short_min"][0]), scenario_grid(params), len(pf.legs))


def requirement_units(requirement: float, settle_scale: int) -> int:
    """A requirement in integer settle units, rounded up (against the account):
    ``ceil(requirement * settle_scale)``."""
    if not math.isfinite(requirement):
        raise ValueError(f"requirement: must be finite, got {requirement}")
    return int(math.ceil(requirement * settle_scale))
