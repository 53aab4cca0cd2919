"""Partial liquidation (engine/liquidation/decide.py) held to an exact search over whole units.

The reference here does not use decide's closed-form tier solve. For each position, in
the same order (isolated positions in slot order, each its own scope; then the cross
positions, largest USD maintenance requirement first), it finds by binary search over
whole quantity units the least ``x`` such that, with that position reduced by ``x`` units
and everything else unchanged, the exact requirement of engine/risk/reference.py
(Fraction arithmetic) satisfies ``E >= h * MM_after``. ``E`` is the exact equity of the
scope: closing at the mark turns unrealized PnL into realized PnL and leaves it unchanged.
If closing all of the position is not enough, all of it is closed and the search goes on
with the next position. Below bankruptcy (``E < 0``) every position of the scope is closed
in full. The search is valid because ``MM`` is continuous and increasing in ``|q|``
(continuous tier amounts, every mmr > 0), so ``slack(x) = E - h MM_after(x)`` is
non-decreasing in ``x``.

Tolerance (``TOL`` = 1e-9, relative; the same as tests/risk/test_kernel_vs_reference.py).
decide works in float64 on the kernel's figures: equity and requirements carry an error of
about n * 2**-53 times the sum of the magnitudes of their terms (``acct_magnitude``), and
decide rounds ``x * qty_scale - 1e-9`` up, so it may be off by 1e-9 of a unit. In slack
terms (USD) both are far below ``1e-9 * max(1, magnitude)`` (one unit's notional times
``h mmr`` is below the magnitude). So a difference of exactly one unit from the exact
answer ``x_ref`` is accepted only where the exact slack at the boundary is that close to
zero: ``|slack(x_ref - 1)| <= tol`` (decide closes one less) or ``|slack(x_ref)| <= tol``
(decide closes one more); the reference then follows decide's choice so that the later
positions are compared against the same state. The same rule covers the decision to stop
(``x = 0``). Accounts whose trigger (``E`` vs ``MM``, ``E`` vs 0) is within the tolerance
are left out: float64 cannot say whether they breach. Limit prices are compared in the
price variable ``t`` (p linear, 1/p inverse) with the kernel test's tolerance on the
bankruptcy price; a rounded limit may differ by one price unit only where that interval
spans the rounding boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from engine import _margin
from engine.codes import Code
from engine.instruments import Asset, Instrument, Kind, derive_tiers
from engine.liquidation.decide import decide, decide_reference
from engine.risk import margin
from engine.risk import reference as ref
from engine.store.layout import Mode
from engine.store.shm import Store

TOL = 1e-9
H = 1.25                                     # decide's default health factor (exact in binary)
PRICE_SCALE = 100                            # price units per 1 quote, every instrument here
SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])

USDT, BTC, ETH = 0, 1, 2
BTCUSDT, ETHUSDT_F, BTCUSD_INV, ETHUSD_INVF, BTC_CALL = 0, 1, 2, 3, 4
SETTLE_SCALE = {USDT: 10**6, BTC: 10**8, ETH: 10**8}
# name, kind, settle asset, notional unit that tier floors are multiples of (settle asset)
SPEC = {
    BTCUSDT: ("BTCUSDT", Kind.PERP, USDT, 10_000),
    ETHUSDT_F: ("ETHUSDT-F", Kind.FUTURE, USDT, 5_000),
    BTCUSD_INV: ("BTCUSD", Kind.INVERSE_PERP, BTC, 1),
    ETHUSD_INVF: ("ETHUSD-F", Kind.INVERSE_FUTURE, ETH, 10),
    BTC_CALL: ("BTC-C", Kind.OPTION, USDT, 20_000),
}
LINEAR = (BTCUSDT, ETHUSDT_F)
INVERSE = (BTCUSD_INV, ETHUSD_INVF)
FUTURES = LINEAR + INVERSE


# --------------------------------------------------------------------------- reference
@dataclass(frozen=True)
class RefOrder:
    instrument: int
    qty_units: int             # signed, opposite to the position
    reason: int
    limit_units: int
    bankruptcy: Fraction | None
    boundary: bool = False     # the quantity followed decide within the tolerance


def _sign(x) -> int:
    return (x > 0) - (x < 0)


def reduced(acct: ref.RefAccount, slot: int, units: int) -> ref.RefAccount:
    """``acct`` with position ``slot`` closed by ``units`` whole units, cost kept proportional."""
    p = acct.positions[slot]
    q_new = p.qty - _sign(p.qty) * units
    cost = Fraction(p.cost) * Fraction(q_new, p.qty) if p.qty else Fraction(p.cost)
    positions = list(acct.positions)
    positions[slot] = replace(p, qty=q_new, cost=cost)
    return replace(acct, positions=tuple(positions))


def least_units(slack, n: int) -> int:
    """Least ``x`` in ``0..n`` with ``slack(x) >= 0`` (slack non-decreasing); ``n`` if none.

    Invariant of the search: ``slack(hi) >= 0`` and ``slack(x) < 0`` for every ``x < lo``.
    """
    if slack(0) >= 0:
        return 0
    if slack(n) < 0:
        return n
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if slack(mid) >= 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


def pick(slack, n: int, follow: int | None, tol: Fraction) -> tuple[int, bool]:
    """The exact least quantity, or decide's ``follow`` where it is one unit off at a boundary
    float64 cannot resolve (see the module docstring); ``(x, followed)``."""
    x = least_units(slack, n)
    ok = {x}
    if x > 0 and abs(slack(x - 1)) <= tol:
        ok.add(x - 1)
    if x < n and abs(slack(x)) <= tol:
        ok.add(x + 1)
    if follow is not None and follow in ok:
        return follow, follow != x
    return x, False


def limit_units(price: Fraction, side: int, price_scale: int) -> int:
    """The bankruptcy price in price units, rounded against the account: sell up, buy down."""
    v = price * price_scale
    return max(1, math.ceil(v) if side < 0 else math.floor(v))


def reference_orders(market: ref.RefMarket, acct: ref.RefAccount, price_scales: dict[int, int],
                     h: Fraction = Fraction(H), follow: dict[int, int] | None = None) -> list[RefOrder]:
    """The partial-liquidation orders by exact search (see the module docstring).

    ``follow``: decide's quantities by instrument (absent: 0), consulted only at a boundary.
    """
    figs = ref.account_figures(market, acct)
    tol_cross = Fraction(TOL) * max(1, acct_magnitude(market, acct))
    out: list[RefOrder] = []

    def emit(slot: int, units: int, reason: Code, boundary: bool = False) -> None:
        pos = acct.positions[slot]
        side = -_sign(pos.qty)
        bp = figs.positions[slot].bankruptcy_price
        price = bp if bp is not None else market.marks[pos.instrument]
        out.append(RefOrder(pos.instrument, side * units, int(reason),
                            limit_units(price, side, price_scales[pos.instrument]), bp, boundary))

    def wanted(slot: int) -> int | None:
        return None if follow is None else follow.get(acct.positions[slot].instrument, 0)

    # 1. isolated positions, each its own scope (settle asset)
    for slot, pos in enumerate(acct.positions):
        if pos.mode != ref.ISOLATED or pos.qty == 0:
            continue
        ins, v = market.instruments[pos.instrument], figs.positions[slot]
        e_iso = Fraction(pos.isolated_margin, market.assets[ins.settle].scale) + v.upnl
        if not (e_iso < v.mm and v.mm > 0):
            continue
        if e_iso < 0:
            emit(slot, abs(pos.qty), Code.LIQ_BELOW_BANKRUPTCY)
            continue

        def slack_iso(x: int, slot=slot, e_iso=e_iso) -> Fraction:
            return e_iso - h * ref.position_values(market, reduced(acct, slot, x).positions[slot]).mm

        tol = Fraction(TOL) * max(1, pos_magnitude(market, pos))
        x, b = pick(slack_iso, abs(pos.qty), wanted(slot), tol)
        if x:
            emit(slot, x, Code.LIQ_ISOLATED_BELOW_MAINTENANCE, b)

    # 2. the cross scope
    if not figs.status & ref.LIQUIDATABLE:
        return out
    e = figs.cross_equity_usd
    cross = [s for s, p in enumerate(acct.positions) if p.mode == ref.CROSS and p.qty != 0]
    if e < 0:
        for s in cross:
            emit(s, abs(acct.positions[s].qty), Code.LIQ_BELOW_BANKRUPTCY)
        return out

    def mm_usd(s: int) -> Fraction:
        return figs.positions[s].mm * market.assets[market.instruments[acct.positions[s].instrument].settle].price

    bal = {a: Fraction(u, market.assets[a].scale) for a, u in acct.balances.items()}
    cost = HaircutCost(market, acct, figs, bal)

    def rank(s: int) -> tuple[int, Fraction]:
        benefit = h * mm_usd(s) - cost.most(s)
        return (0, -benefit) if benefit > 0 else (1, -mm_usd(s))

    cur = acct
    for s in sorted(cross, key=rank):                        # stable: slot order on ties
        if e >= h * ref.account_figures(market, cur, prices=False).cross_mm_usd:
            break
        e_solve = e - cost.most(s)

        def slack(x: int, s=s, cur=cur, e_solve=e_solve) -> Fraction:
            return e_solve - h * ref.account_figures(market, reduced(cur, s, x), prices=False).cross_mm_usd

        x, b = pick(slack, abs(cur.positions[s].qty), wanted(s), tol_cross)
        if x:
            emit(s, x, Code.LIQ_BELOW_MAINTENANCE, b)
            cur = reduced(cur, s, x)
            e -= cost.realize(s, figs.positions[s].upnl * Fraction(x, abs(acct.positions[s].qty)))
    return out


class HaircutCost:
    """What realizing a cross position's profit into its settle balance ``b`` takes from
    the haircut-weighted collateral (decide's module doc): ``haircut px max(0, min(r, b +
    r))`` for a profit ``r`` (settle asset), nothing for a loss; ``b`` grows by ``r``."""

    def __init__(self, market: ref.RefMarket, acct: ref.RefAccount, figs, bal: dict[int, Fraction]):
        self.market, self.acct, self.figs, self.bal = market, acct, figs, bal

    def _settle(self, s: int) -> int:
        return self.market.instruments[self.acct.positions[s].instrument].settle

    def _of(self, s: int, r: Fraction) -> Fraction:
        a = self.market.assets[self._settle(s)]
        b = self.bal.get(self._settle(s), Fraction(0))
        return a.haircut * a.price * max(Fraction(0), min(r, b + r)) if r > 0 else Fraction(0)

    def most(self, s: int) -> Fraction:
        """All of position ``s``'s profit realized (the solve's conservative equity)."""
        return self._of(s, self.figs.positions[s].upnl)

    def realize(self, s: int, r: Fraction) -> Fraction:
        """Realize ``r`` of position ``s``: its cost; the balance grows by ``r``."""
        c = self._of(s, r)
        a = self._settle(s)
        self.bal[a] = self.bal.get(a, Fraction(0)) + r
        return c


# --------------------------------------------------------------------------- magnitudes
def pos_magnitude(market: ref.RefMarket, pos: ref.RefPosition) -> Fraction:
    """Sum of |terms| behind a position's figures, settle asset."""
    ins = market.instruments[pos.instrument]
    scale = market.assets[ins.settle].scale
    v = ref.position_values(market, pos)
    q = abs(Fraction(pos.qty, ins.qty_scale))
    price_term = q * ins.contract_size * market.marks[pos.instrument] if ins.kind == ref.OPTION else v.notional
    return (price_term + abs(Fraction(pos.cost, scale)) + v.notional
            + ref.tier_of(ins.tiers, v.notional).maint_amount + Fraction(pos.isolated_margin, scale))


def acct_magnitude(market: ref.RefMarket, acct: ref.RefAccount) -> Fraction:
    """Sum of |terms| behind an account's USD figures."""
    m = sum((abs(Fraction(u, market.assets[a].scale)) * market.assets[a].price
             for a, u in acct.balances.items()), Fraction(0))
    for p in acct.positions:
        m += pos_magnitude(market, p) * market.assets[market.instruments[p.instrument].settle].price
    return m


# --------------------------------------------------------------------------- world
def make_instruments(tiers: dict[int, list[dict]], marks: dict[int, float], cs_btc: float = 1.0,
                     cs_call: float = 1.0) -> list[Instrument]:
    cs = {BTCUSDT: cs_btc, ETHUSDT_F: 1.0, BTCUSD_INV: 100.0, ETHUSD_INVF: 10.0, BTC_CALL: cs_call}
    qs = {BTCUSDT: 1000, ETHUSDT_F: 100, BTCUSD_INV: 1, ETHUSD_INVF: 1, BTC_CALL: 100}
    assets = ["USDT", "BTC", "ETH"]
    return [Instrument(name=SPEC[i][0], index=i, kind=SPEC[i][1], settle=assets[SPEC[i][2]],
                       contract_size=cs[i], qty_scale=qs[i], price_scale=PRICE_SCALE, tick_size=0.01,
                       lot_size=1 / qs[i], tiers=derive_tiers(tiers[i]), mark_price=marks[i],
                       underlying="BTCUSDT" if i == BTC_CALL else None,
                       strike=50_000.0 if i == BTC_CALL else 0.0, expiry_ns=1 if i == BTC_CALL else 0)
            for i in sorted(SPEC)]


def build(assets: list[Asset], instruments: list[Instrument], balances: dict[int, int],
          positions: list[tuple]) -> Store:
    store = Store.create(None, assets=assets, instruments=instruments, accounts_capacity=1,
                         n_partitions=1, slots_per_account=max(1, len(positions)))
    row = store.add_account(1)
    for a, units in balances.items():
        store.set_balance(row, a, units)
    for i, mode, qty, cost, iso in positions:
        store.set_position(row, i, qty, cost, mode=mode, isolated_margin=iso)
    return store


def dec(lo: float, hi: float, places: int = 2):
    return st.floats(lo, hi, allow_nan=False).map(lambda x: round(x, places))


@st.composite
def tier_table(draw, unit: float, min_tiers: int):
    n = draw(st.integers(min_tiers, 4))
    floors = [0.0]
    for _ in range(n - 1):
        floors.append(floors[-1] + unit * draw(st.sampled_from([1, 2, 5, 10, 25])))
    mmr = draw(st.sampled_from([0.004, 0.005, 0.01, 0.02, 0.05]))
    imr = min(1.0, 2 * mmr)
    raw = []
    for k, f in enumerate(floors):
        if k:
            mmr += draw(st.sampled_from([0.0, 0.0025, 0.005, 0.01, 0.025, 0.05]))
            imr = min(1.0, max(imr, 2 * mmr))
        raw.append({"floor": f, "imr": imr, "mmr": mmr})
    return raw


PARTIAL = st.one_of(st.sampled_from([1e-6, 1e-4, 0.01, 0.5, 0.9, 0.999]), st.floats(0.001, 0.999))
BANKRUPT = st.one_of(st.sampled_from([1.0001, 1.01, 1.5]), st.floats(1.001, 3.0))


@st.composite
def breached(draw, kinds=tuple(SPEC), n_pos=(1, 1), modes="cross", min_tiers=1, big=False,
             lam=PARTIAL):
    """A one-account world put in breach by moving one mark.

    Positions and balances are drawn so the account starts healthy (cross equity and each
    isolated margin at 1.3..3 times their requirement); then a driver position's mark is
    moved to ``t_liq + lam (t_bankrupt - t_liq)`` (t = p, or 1/p inverse) by the exact
    reference: ``0 < lam < 1`` in breach above bankruptcy, ``lam > 1`` below it.
    """
    btc, eth = draw(dec(20_000, 100_000)), draw(dec(1_000, 5_000))
    hc = st.sampled_from([0.0, 0.0, 0.02, 0.1])
    assets = [Asset("USDT", USDT, 10**6, 1.0, draw(st.sampled_from([0.0, 0.0, 0.01]))),
              Asset("BTC", BTC, 10**8, btc, draw(hc)), Asset("ETH", ETH, 10**8, eth, draw(hc))]
    basis = dec(0.97, 1.03, 4)
    marks = {BTCUSDT: round(btc * draw(basis), 2), ETHUSDT_F: round(eth * draw(basis), 2),
             BTCUSD_INV: round(btc * draw(basis), 2), ETHUSD_INVF: round(eth * draw(basis), 2),
             BTC_CALL: draw(dec(10, 8_000))}
    tiers = {i: draw(tier_table(SPEC[i][3], min_tiers)) for i in SPEC}
    instruments = make_instruments(tiers, marks, draw(st.sampled_from([1.0, 0.001])),
                                   draw(st.sampled_from([1.0, 0.1])))
    chosen = draw(st.lists(st.sampled_from(kinds), unique=True, min_size=n_pos[0], max_size=n_pos[1]))
    assume(any(i != BTC_CALL for i in chosen))
    rows = []
    for i in chosen:
        ins = instruments[i]
        floors = [t.floor for t in ins.tiers]
        if big:       # across several tiers: beyond the top floor
            target = max(floors[-1], SPEC[i][3]) * draw(st.sampled_from([1.2, 2.0, 4.0, 10.0]))
        else:
            target = draw(st.sampled_from(floors[1:] or [SPEC[i][3]])) * \
                draw(st.sampled_from([0.3, 1.0, 1.001, 1.7, 3.0]))
        under = marks[BTCUSDT] if ins.kind == Kind.OPTION else marks[i]
        per_contract = ins.contract_size / under if ins.kind.is_inverse else ins.contract_size * under
        units = max(1, round(target / per_contract * ins.qty_scale)) * draw(st.sampled_from([1, -1]))
        entry = marks[i] * draw(dec(0.9, 1.1, 3))
        q = units / ins.qty_scale
        cost_settle = q * ins.contract_size / entry if ins.kind.is_inverse else q * ins.contract_size * entry
        mode = Mode.CROSS if modes == "cross" else draw(st.sampled_from([Mode.CROSS, Mode.ISOLATED]))
        rows.append([i, int(mode), units, round(cost_settle * SETTLE_SCALE[SPEC[i][2]]), 0])
    if modes == "iso_driver" and not any(r[1] == Mode.ISOLATED and r[0] != BTC_CALL for r in rows):
        r = draw(st.sampled_from([r for r in rows if r[0] != BTC_CALL]))
        r[1] = int(Mode.ISOLATED)
    market = ref.market_from_engine(assets, instruments, [ins.mark_price for ins in instruments])
    # isolated margin: 1.3..3 times the requirement, net of the position's upnl
    for r in rows:
        if r[1] == Mode.ISOLATED:
            v = ref.position_values(market, ref.RefPosition(*r))
            iso = Fraction(draw(dec(1.3, 3.0))) * v.mm - v.upnl
            r[4] = max(0, round(iso * SETTLE_SCALE[SPEC[r[0]][2]]))
    # balances: random BTC/ETH (some borrowed), then USDT so cross equity = r0 * cross MM
    balances = {}
    for a in (BTC, ETH):
        kind = draw(st.sampled_from(["none", "pos", "pos", "neg"]))
        if kind != "none":
            usd = draw(dec(100, 500_000)) * (1 if kind == "pos" else -draw(dec(0.0, 0.3, 3)))
            balances[a] = round(usd / assets[a].price_usd * SETTLE_SCALE[a])
    acct = ref.RefAccount(balances, tuple(ref.RefPosition(*r) for r in rows))
    figs = ref.account_figures(market, acct, prices=False)
    need = Fraction(draw(dec(1.3, 3.0))) * figs.cross_mm_usd - figs.cross_equity_usd + \
        draw(dec(0, 1_000))
    usdt = market.assets[USDT]
    balances[USDT] = round(need / (1 - usdt.haircut if need > 0 else 1) * usdt.scale)
    acct = replace(acct, balances=balances)

    # the driver: move its mark between its liquidation and bankruptcy prices (or beyond)
    drivers = [k for k, r in enumerate(rows) if r[0] != BTC_CALL
               and (modes != "iso_driver" or r[1] == Mode.ISOLATED)]
    k = draw(st.sampled_from(drivers))
    i = rows[k][0]
    inverse = instruments[i].kind.is_inverse
    liq, bank = ref.liquidation_price(market, acct, k), ref.bankruptcy_price(market, acct, k)
    assume(liq is not None)
    lam_ = Fraction(draw(lam))
    t_l = 1 / liq if inverse else liq
    if bank is None:                   # bounded loss: bankruptcy unreachable, t -> 0 is the end
        lam_, t_b = min(lam_, Fraction(999, 1000)), Fraction(0)
    else:
        t_b = 1 / bank if inverse else bank
    t = t_l + lam_ * (t_b - t_l)
    assume(t > 0)
    marks[i] = float(1 / t if inverse else t)
    assume(marks[i] > 0 and math.isfinite(marks[i]))
    return assets, instruments, balances, rows, i, marks[i]


@st.composite
def on_unit_boundary(draw):
    """A single cross position in breach with the USDT balance set so that closing some
    whole number ``x`` of units leaves exactly ``E = h MM_after(x)``, give or take a few
    micro-USDT: the least quantity sits on (or a hair off) a unit boundary."""
    assets, instruments, balances, rows, i, mark = draw(breached(kinds=FUTURES, min_tiers=2, big=True))
    market = ref.market_from_engine(assets, instruments,
                                    [mark if ins.index == i else ins.mark_price for ins in instruments])
    acct = ref.RefAccount(balances, tuple(ref.RefPosition(*r) for r in rows))
    n = abs(rows[0][2])
    assume(n >= 2)
    x = draw(st.integers(max(1, n // 3), n - 1))       # large enough for E < MM (a breach)
    target = Fraction(H) * ref.account_figures(market, reduced(acct, 0, x), prices=False).cross_mm_usd
    figs = ref.account_figures(market, acct, prices=False)
    usdt = market.assets[USDT]
    old = balances[USDT]
    old_usd = Fraction(old, usdt.scale) * usdt.price * ((1 - usdt.haircut) if old > 0 else 1)
    want = old_usd + target - figs.cross_equity_usd
    units = round(want / (usdt.price * ((1 - usdt.haircut) if want > 0 else 1)) * usdt.scale)
    balances = {**balances, USDT: units + draw(st.sampled_from([-2, -1, 0, 0, 0, 1, 2]))}
    # a profit realized into a haircut balance would move the boundary (the solve takes E
    # less its cost): cases without one (the property tests above cover those)
    acct = replace(acct, balances=balances)
    bal = {a: Fraction(u, market.assets[a].scale) for a, u in balances.items()}
    assume(HaircutCost(market, acct, ref.account_figures(market, acct, prices=False), bal).most(0) == 0)
    return (assets, instruments, balances, rows, i, mark), x


# --------------------------------------------------------------------------- checks
def _t(inverse: bool, p) -> Fraction:
    p = Fraction(p)
    return 1 / p if inverse else p


def check_limit(got_units: int, r: RefOrder, kernel_bp: float | None, market: ref.RefMarket,
                acct: ref.RefAccount, slot: int) -> None:
    """decide's limit == the exact bankruptcy price (the mark where there is none) rounded
    against the account, up to one price unit where the price's float tolerance spans the
    rounding boundary. decide snaps a price within 1e-9 of a price unit onto it (a mark of
    1024.62 is 1024.6199999999999 in binary), so that much is added on both sides."""
    if got_units == r.limit_units:
        return
    pos = acct.positions[slot]
    ins = market.instruments[pos.instrument]
    if r.bankruptcy is None:
        assert kernel_bp is None, (got_units, r, kernel_bp)
        lo = hi = market.marks[pos.instrument]
    else:
        assert kernel_bp is not None, (got_units, r)
        inverse = ins.kind in ref.INVERSE_KINDS
        px = market.assets[ins.settle].price
        slope = px * ins.contract_size * abs(Fraction(pos.qty, ins.qty_scale))
        mag = acct_magnitude(market, acct) if pos.mode == ref.CROSS else pos_magnitude(market, pos) * px
        tr = _t(inverse, r.bankruptcy)
        tol = Fraction(TOL) * max(tr, mag / slope)
        assert tr - tol > 0, (got_units, r)
        lo, hi = sorted(1 / e if inverse else e for e in (tr - tol, tr + tol))
    ps = PRICE_SCALE
    side = _sign(-pos.qty)
    snap = Fraction(1, 10**9 * ps)
    span = sorted(limit_units(p, side, ps) for p in (lo - snap, hi + snap))
    assert abs(got_units - r.limit_units) == 1 and span[0] <= got_units <= span[1], \
        (got_units, r, float(lo), float(hi))
    event("limit price: one unit off at a rounding boundary within tolerance")


def check_after(market: ref.RefMarket, acct: ref.RefAccount, orders, h: Fraction = Fraction(H)) -> None:
    """Apply decide's orders at the mark on a private copy: equity is unchanged, each scope
    that was partially liquidated is healthy, and one unit less would not be."""
    figs = ref.account_figures(market, acct, prices=False)
    slot_of = {p.instrument: s for s, p in enumerate(acct.positions)}
    after = acct
    realized = {}                                           # slot -> settle asset
    for o in orders:
        s = slot_of[o.instrument]
        p = after.positions[s]
        assert _sign(o.qty_units) == -_sign(p.qty) and 0 < abs(o.qty_units) <= abs(p.qty), o
        if o.reason == Code.LIQ_BELOW_BANKRUPTCY:
            assert abs(o.qty_units) == abs(p.qty), o
        nxt = reduced(after, s, abs(o.qty_units))
        ins = market.instruments[o.instrument]
        scale = market.assets[ins.settle].scale
        dq = Fraction(p.qty - nxt.positions[s].qty, ins.qty_scale)      # contracts closed (signed)
        dc = Fraction(p.cost - nxt.positions[s].cost, scale)            # cost closed
        mark = market.marks[o.instrument]
        # the trade's PnL at the mark: linear/option dq cs p - dc, inverse dc - dq cs / p
        realized[s] = dc - dq * ins.contract_size / mark if ins.kind in ref.INVERSE_KINDS \
            else dq * ins.contract_size * mark - dc
        after = nxt
    post = ref.account_figures(market, after, prices=False)
    px = {s: market.assets[market.instruments[p.instrument].settle].price for s, p in enumerate(acct.positions)}
    cross_realized = sum((realized[s] * px[s] for s in realized if acct.positions[s].mode == ref.CROSS),
                         Fraction(0))
    assert post.cross_equity_usd + cross_realized == figs.cross_equity_usd    # equity unchanged

    tol_cross = Fraction(TOL) * max(1, acct_magnitude(market, acct))
    cross_orders = [o for o in orders if acct.positions[slot_of[o.instrument]].mode == ref.CROSS]
    if cross_orders and cross_orders[-1].reason == Code.LIQ_BELOW_MAINTENANCE:
        # the rule's equity: E less what each order's realized profit costs the haircut
        # collateral; the last position's solve took E less all of its profit's cost
        cost = HaircutCost(market, acct, figs,
                           {a: Fraction(u, market.assets[a].scale) for a, u in acct.balances.items()})
        e = figs.cross_equity_usd
        for o in cross_orders:
            s = slot_of[o.instrument]
            e_solve = e - cost.most(s)
            e -= cost.realize(s, realized[s])
        # the true equity once the realized PnL is in the balances is at least the rule's
        # (a loss realized into a haircut balance counts for more than the rule says)
        bal = dict(acct.balances)
        for o in cross_orders:
            s = slot_of[o.instrument]
            a = market.instruments[o.instrument].settle
            bal[a] = bal.get(a, 0) + realized[s] * market.assets[a].scale
        true_e = ref.account_figures(market, replace(after, balances=bal), prices=False).cross_equity_usd
        assert true_e >= e - tol_cross, (float(true_e), float(e))
        everything = all(q.qty == 0 for q in after.positions if q.mode == ref.CROSS)
        assert everything or e - h * post.cross_mm_usd >= -tol_cross, "not healthy after the orders"
        last = cross_orders[-1]
        s = slot_of[last.instrument]
        one_less = replace(after, positions=tuple(
            replace(q, qty=q.qty + _sign(acct.positions[s].qty)) if j == s else q
            for j, q in enumerate(after.positions)))
        mm_less = ref.account_figures(market, one_less, prices=False).cross_mm_usd
        assert e_solve - h * mm_less < tol_cross, "one unit less would already be healthy"
    for o in orders:
        s = slot_of[o.instrument]
        p = acct.positions[s]
        if p.mode != ref.ISOLATED:
            continue
        ins = market.instruments[p.instrument]
        e_iso = Fraction(p.isolated_margin, market.assets[ins.settle].scale) + figs.positions[s].upnl
        e_after = Fraction(p.isolated_margin, market.assets[ins.settle].scale) + post.positions[s].upnl + realized[s]
        assert e_after == e_iso
        if o.reason != Code.LIQ_ISOLATED_BELOW_MAINTENANCE:
            continue
        tol = Fraction(TOL) * max(1, pos_magnitude(market, p))
        q_after = after.positions[s]
        assert q_after.qty == 0 or e_iso - h * post.positions[s].mm >= -tol, "isolated: not healthy"
        less = ref.position_values(market, replace(q_after, qty=q_after.qty + _sign(p.qty)))
        assert e_iso - h * less.mm < tol, "isolated: one unit less would already be healthy"


def run_case(assets, instruments, balances, rows, moved: int | None = None, mark: float | None = None):
    """Build the store, move the mark, run decide and the reference; return both."""
    store = build(assets, instruments, balances, rows)
    if moved is not None:
        store.publish_mark(moved, mark)
    snap = store.price_snapshot()
    market = ref.market_from_engine(assets, instruments, snap.marks, snap.asset_px)
    acct = ref.account_from_store(store, 0)
    d = margin.account_detail(store, 0, snap)
    got = decide(store, 0, snap)
    # The C kernel (decide) and its Python reference give the same orders, field by field.
    assert got == decide_reference(store, 0, snap)
    assert got == decide(store, 0, snap, detail=d)          # a given detail: the Python path
    out = np.zeros((store.slots_per_account, 4), np.int64)
    n = _margin.decide_orders(store.addr(store.instruments), store.addr(store.accounts, 0),
                              store.addr(store.positions, 0), snap.marks, snap.asset_px, snap.asset_haircut,
                              snap.asset_scale, 1.25, out)
    assert n == len(got)                                    # the kernel decided (no fallback)
    return store, market, acct, d, got


def check_world(world) -> None:
    assets, instruments, balances, rows, moved, mark = world
    store, market, acct, d, got = run_case(assets, instruments, balances, rows, moved, mark)
    figs = ref.account_figures(market, acct, prices=False)
    # Leave out triggers float64 cannot resolve (module docstring).
    tol = Fraction(TOL) * max(1, acct_magnitude(market, acct))
    e = figs.cross_equity_usd
    assume(abs(e - figs.cross_mm_usd) > tol and (abs(e) > tol or figs.cross_mm_usd == 0))
    for s, p in enumerate(acct.positions):
        if p.mode == ref.ISOLATED:
            ins = market.instruments[p.instrument]
            e_iso = Fraction(p.isolated_margin, market.assets[ins.settle].scale) + figs.positions[s].upnl
            tol_iso = Fraction(TOL) * max(1, pos_magnitude(market, p))
            if figs.positions[s].mm > 0:                 # no requirement: no trigger
                assume(abs(e_iso - figs.positions[s].mm) > tol_iso and abs(e_iso) > tol_iso)
    # Positions of the cross scope whose USD requirements float64 cannot order are left out.
    mm = sorted(figs.positions[s].mm * market.assets[market.instruments[p.instrument].settle].price
                for s, p in enumerate(acct.positions) if p.mode == ref.CROSS and p.qty != 0)
    assume(all(b - a > tol for a, b in zip(mm, mm[1:])))
    assume(figs.status & (ref.LIQUIDATABLE | ref.ISOLATED_LIQUIDATABLE))

    follow = {o.instrument: abs(o.qty_units) for o in got}
    ps = {ins.index: ins.price_scale for ins in instruments}
    exp = reference_orders(market, acct, ps, follow=follow)
    note(f"decide {got}\nreference {exp}\nE={float(e)} MM={float(figs.cross_mm_usd)}")
    event(f"{len(exp)} order(s)")
    for r in exp:
        event(f"reason {r.reason}")
        if r.boundary:
            event("quantity one unit off at a boundary within tolerance")
    assert [(o.instrument, o.qty_units, int(o.reason)) for o in got] == \
        [(r.instrument, r.qty_units, r.reason) for r in exp]
    slot_of = {p.instrument: s for s, p in enumerate(acct.positions)}
    for o, r in zip(got, exp):
        s = slot_of[o.instrument]
        check_limit(o.limit_price_units, r, d.positions[s].bankruptcy_price, market, acct, s)
        assert o.limit_price == o.limit_price_units / PRICE_SCALE
    check_after(market, acct, got)


# --------------------------------------------------------------------------- properties
@SETTINGS
@given(breached(kinds=FUTURES, n_pos=(1, 1), min_tiers=3, big=True))
def test_single_position_across_tiers(world):
    check_world(world)


@SETTINGS
@given(breached(kinds=tuple(SPEC), n_pos=(2, 5)))
def test_multi_position_multi_instrument(world):
    check_world(world)


@SETTINGS
@given(breached(kinds=INVERSE, n_pos=(1, 2), min_tiers=2))
def test_inverse_contracts(world):
    check_world(world)


@SETTINGS
@given(on_unit_boundary())
def test_quantity_on_a_unit_boundary(case):
    # Balances are whole micro-USDT, so E lands within 1e-6 USD of h MM_after(x): float64
    # resolves that (its error here is ~1e-10 USD), so decide must still be exact: x or x + 1.
    world, x = case
    check_world(world)
    got = run_case(*world)[-1]
    assert [abs(o.qty_units) for o in got] in ([x], [x + 1])


@SETTINGS
@given(breached(kinds=tuple(SPEC), n_pos=(1, 4), modes="iso_driver"))
def test_isolated_positions(world):
    check_world(world)


@SETTINGS
@given(breached(kinds=tuple(SPEC), n_pos=(1, 4), modes="any", lam=BANKRUPT))
def test_bankrupt_accounts(world):
    check_world(world)


# --------------------------------------------------------------------------- known values
# World of the table: USDT (1, haircut 0), BTC (44 000, haircut 0), ETH (3 000, haircut 0).
KV_ASSETS = [Asset("USDT", USDT, 10**6, 1.0, 0.0), Asset("BTC", BTC, 10**8, 44_000.0, 0.0),
             Asset("ETH", ETH, 10**8, 3_000.0, 0.0)]
# Binance-like BTCUSDT tiers (floor USDT, mmr, maint amount derived for continuity):
#   0 0.4 % 0 | 50k 0.5 % 50 | 250k 1 % 50 + 250k*0.5 % = 1 300 | 1M 2.5 % 1 300 + 1M*1.5 % = 16 300
KV_TIERS = {
    BTCUSDT: [{"floor": 0.0, "imr": 0.008, "mmr": 0.004}, {"floor": 50_000.0, "imr": 0.01, "mmr": 0.005},
              {"floor": 250_000.0, "imr": 0.02, "mmr": 0.01}, {"floor": 1_000_000.0, "imr": 0.05, "mmr": 0.025}],
    ETHUSDT_F: [{"floor": 0.0, "imr": 0.04, "mmr": 0.02}],
    # BTCUSD (floor BTC): 0 0.5 % | 10 1 % maint 10*0.5 % = 0.05 | 50 2.5 % maint 0.05 + 50*1.5 % = 0.8
    BTCUSD_INV: [{"floor": 0.0, "imr": 0.01, "mmr": 0.005}, {"floor": 10.0, "imr": 0.02, "mmr": 0.01},
                 {"floor": 50.0, "imr": 0.05, "mmr": 0.025}],
    ETHUSD_INVF: [{"floor": 0.0, "imr": 0.02, "mmr": 0.01}],
    BTC_CALL: [{"floor": 0.0, "imr": 0.1, "mmr": 0.05}],
}
KV_MARKS = {BTCUSDT: 95_000.0, ETHUSDT_F: 3_000.0, BTCUSD_INV: 44_000.0, ETHUSD_INVF: 3_000.0,
            BTC_CALL: 1_000.0}

ALICE_10_BTC_LONG_AT_95K_20K_USDT = ({USDT: 20_000 * 10**6},
                                     [(BTCUSDT, Mode.CROSS, 10_000, 950_000 * 10**6, 0)])
BOB_10K_BTCUSD_LONG_AT_50K_2_9123_BTC = ({BTC: 291_230_000},
                                         [(BTCUSD_INV, Mode.CROSS, 10_000, 20 * 10**8, 0)])
CAROL_1_BTC_LONG_AT_95K_10_ETH_SHORT_5K_USDT = ({USDT: 5_000 * 10**6},
                                                [(BTCUSDT, Mode.CROSS, 1_000, 95_000 * 10**6, 0),
                                                 (ETHUSDT_F, Mode.CROSS, -1_000, -30_000 * 10**6, 0)])
DAVE_100_ETH_SHORT_AT_3K_ISOLATED_15_000_5 = ({USDT: 1_000 * 10**6},
                                              [(ETHUSDT_F, Mode.ISOLATED, -10_000, -300_000 * 10**6,
                                                15_000_500_000)])
ERIN_1_BTC_CALL_SHORT_AT_1K_2K_USDT = ({USDT: 2_000 * 10**6},
                                       [(BTC_CALL, Mode.CROSS, -100, -1_000 * 10**6, 0)])

KNOWN = [
    pytest.param(
        ALICE_10_BTC_LONG_AT_95K_20K_USDT, {BTCUSDT: 93_200.0},
        # E = 20 000 + 10 (93 200 - 95 000) = 2 000; notional 932 000 (tier 250k..1M):
        # MM = 932 000 * 1 % - 1 300 = 8 020 > E. Keep n: n 1 % - 1 300 = E / 1.25 = 1 600
        # -> n = 290 000 (>= 250k: valid) -> keep 290 000 / 93 200 = 3.111588 BTC
        # -> close 6.888412 BTC = 6 888.41 units -> 6 889 units (qty_scale 1000).
        # Bankruptcy: 20 000 + 10 (p - 95 000) = 0 -> p = 93 000 -> sell limit 93 000.00.
        [(BTCUSDT, -6_889, Code.LIQ_BELOW_MAINTENANCE, 9_300_000)],
        id="linear-10btc-long-across-tiers-closes-6889-units"),
    pytest.param(
        BOB_10K_BTCUSD_LONG_AT_50K_2_9123_BTC, {BTCUSD_INV: 43_900.0},
        # Inverse, BTC units: cost 10 000 * 100 / 50 000 = 20; notional 1e6 / 43 900 = 22.779043
        # upnl = 20 - 22.779043 = -2.779043; E = 2.9123 - 2.779043 = 0.133257 (>= 0)
        # MM = 22.779043 * 1 % - 0.05 = 0.177790 > E. Keep n: n 1 % - 0.05 = E / 1.25 = 0.106605
        # -> n = 15.660538 BTC (in 10..50: valid) -> keep n p / cs = 15.660538 * 439
        # = 6 874.976 contracts -> close 3 125.024 -> 3 126 contracts (qty_scale 1).
        # Bankruptcy: 2.9123 + 20 - 1e6 / p = 0 -> p = 1e6 / 22.9123 = 43 644.68 (exactly
        # 43 644.6799...) -> sell rounds up: 43 644.68.
        [(BTCUSD_INV, -3_126, Code.LIQ_BELOW_MAINTENANCE, 4_364_468)],
        id="inverse-long-closes-3126-contracts"),
    pytest.param(
        CAROL_1_BTC_LONG_AT_95K_10_ETH_SHORT_5K_USDT, {BTCUSDT: 89_000.0},
        # E = 5 000 + (89 000 - 95 000) + 10 (3 000 - 3 000) = -1 000 < 0: close everything.
        # BTC bankruptcy (backing 5 000 + 0): 5 000 + p - 95 000 = 0 -> 90 000 -> sell 90 000.00
        # ETH bankruptcy (backing 5 000 - 6 000 = -1 000): -1 000 + 10 (3 000 - p) = 0 -> 2 900
        # -> buy limit 2 900.00.
        [(BTCUSDT, -1_000, Code.LIQ_BELOW_BANKRUPTCY, 9_000_000),
         (ETHUSDT_F, 1_000, Code.LIQ_BELOW_BANKRUPTCY, 290_000)],
        id="bankrupt-closes-all-at-bankruptcy-prices"),
    pytest.param(
        DAVE_100_ETH_SHORT_AT_3K_ISOLATED_15_000_5, {ETHUSDT_F: 3_100.0},
        # Isolated: E = 15 000.5 - 100 (3 100 - 3 000) = 5 000.5; MM = 310 000 * 2 % = 6 200 > E.
        # Keep n = 5 000.5 / 1.25 / 2 % = 200 020 -> 64.522581 ETH -> close 35.477419 ETH
        # = 3 547.74 units -> 3 548 (qty_scale 100). Bankruptcy: 15 000.5 - 100 (p - 3 000) = 0
        # -> p = 3 150.005 -> buy rounds down: 3 150.00. The cross scope (1 000 USDT) is healthy.
        [(ETHUSDT_F, 3_548, Code.LIQ_ISOLATED_BELOW_MAINTENANCE, 315_000)],
        id="isolated-short-buys-back-3548-units"),
    pytest.param(
        ERIN_1_BTC_CALL_SHORT_AT_1K_2K_USDT, {BTCUSDT: 60_000.0},
        # Option notional is priced at the underlying: 1 * 60 000; MM = 60 000 * 5 % = 3 000;
        # E = 2 000 (sold at the mark). Keep n = 2 000 / 1.25 / 5 % = 32 000 -> 32 000 / 60 000
        # = 0.533333 contracts -> close 0.466667 = 46.67 units -> 47. No bankruptcy price for an
        # option: the limit is the option's mark, 1 000.00.
        [(BTC_CALL, 47, Code.LIQ_BELOW_MAINTENANCE, 100_000)],
        id="short-call-notional-at-underlying-buys-47-units"),
]


@pytest.mark.parametrize("fixture, marks, expected", KNOWN)
def test_known_values(fixture, marks, expected):
    balances, positions = fixture
    instruments = make_instruments(KV_TIERS, {**KV_MARKS, **marks})
    store, market, acct, d, got = run_case(KV_ASSETS, instruments, balances, list(positions))
    assert [(o.instrument, o.qty_units, o.reason, o.limit_price_units) for o in got] == expected
    ps = {ins.index: ins.price_scale for ins in instruments}
    exp = reference_orders(market, acct, ps)        # the exact search agrees, without following
    assert [(r.instrument, r.qty_units, r.reason, r.limit_units) for r in exp] == expected
    check_after(market, acct, got)


def test_compiled_reason_codes_are_the_engines():
    assert _margin.LIQ_CODES == {c.name: int(c) for c in (Code.LIQ_BELOW_MAINTENANCE,
                                                           Code.LIQ_ISOLATED_BELOW_MAINTENANCE,
                                                           Code.LIQ_BELOW_BANKRUPTCY)}


def test_a_bankruptcy_price_past_int64_is_held_to_the_largest_limit():
    """An inverse BTCUSD long of 1,000,000 contracts (cs 100: 100M USD) bought at the mark
    44,000 (cost 100M / 44,000 = 2,272.7272727 BTC, upnl ~0), cross, backed by a USDT debt
    of 100,000,000.0001 USD: E = -0.0001 USD < 0, so everything is closed (6003) with the
    bankruptcy price as the sell's limit. The backing equity e0 = E - upnl nearly cancels
    the position's value: root = (e0 / 44,000 + c) / (q cs) is ~1e-16, so the price 1/root
    is above 2**63 / 100 (price scale 100) and no int64 carries it. It used to make the
    kernel decline and the reference return a limit > 2**63 - 1, which the worker's order
    encoder refused with OverflowError; the limit is now 2**63 - 1 units in both (a sell
    no book fills below its bankruptcy price)."""
    instruments = make_instruments(KV_TIERS, KV_MARKS)
    q = 1_000_000
    cost_sat = round(q * 100 / 44_000 * 10**8)
    store = build(KV_ASSETS, instruments, {USDT: -(100_000_000 * 10**6 + 100)},
                  [(BTCUSD_INV, Mode.CROSS, q, cost_sat, 0)])
    snap = store.price_snapshot()
    assert margin.account_detail(store, 0, snap).positions[0].bankruptcy_price * PRICE_SCALE > 2**63
    got = decide(store, 0, snap)
    assert got == decide_reference(store, 0, snap)             # the kernel answers: no fallback
    assert [(o.qty_units, o.limit_price_units, o.reason) for o in got] == \
        [(-q, 2**63 - 1, Code.LIQ_BELOW_BANKRUPTCY)]
    n = _margin.decide_orders(store.addr(store.instruments), store.addr(store.accounts, 0),
                              store.addr(store.positions, 0), snap.marks, snap.asset_px, snap.asset_haircut,
                              snap.asset_scale, H, np.zeros((1, 4), np.int64))
    assert n == 1


def test_a_position_of_int64_min_cannot_be_stored():
    # No int64 order closes -2**63 units (its negation is 2**63), and the fill rule never
    # makes one (3005): the store refuses it too.
    store = build(KV_ASSETS, make_instruments(KV_TIERS, KV_MARKS), {}, [])
    with pytest.raises(ValueError, match="outside"):
        store.set_position(0, BTCUSDT, -2**63, 0)
    assert int(store.accounts[0]["n_positions"]) == 0
    store.set_position(0, BTCUSDT, -(2**63 - 1), 0)           # the most negative it takes


def test_a_tick_leaving_a_trigger_it_landed_on_finds_the_breach():
    """1,000 USDT and a 1 BTC long from 95,000, one tier at mmr 50 %: E = 1,000 + p - 95,000
    and MM = 0.5 p meet at p = 188,000, the long's trigger (exact in binary). A tick to
    exactly 188,000 visits the account, which is not in breach (E = MM = 94,000; E < MM
    is strict). The next tick, to 187,999.9, puts it in breach (E 93,999.9 < MM
    93,999.95): stage 1a must visit it again. The search took longs with mark <= t <
    prev, which left out t = prev = 188,000, so only the holders' pass found it later;
    now both ends are in."""
    tiers = dict(KV_TIERS)
    tiers[BTCUSDT] = [{"floor": 0.0, "imr": 1.0, "mmr": 0.5}]
    store = build(KV_ASSETS, make_instruments(tiers, {**KV_MARKS, BTCUSDT: 200_000.0}), {USDT: 1_000 * 10**6},
                  [(BTCUSDT, Mode.CROSS, 1_000, 95_000 * 10**6, 0)])
    assert margin.account_detail(store, 0).positions[0].liquidation_price == 188_000.0
    n_i = len(store.instruments)
    tp = _margin.TickPath(store.addr(store.instruments), store.addr(store.prices), store.addr(store.assets),
                          len(store.assets), store.addr(store.accounts), store.addr(store.positions),
                          store.slots_per_account, n_i, 1, np.zeros(n_i, np.uint64),
                          store.price_snapshot().marks.copy(), 0, H)
    margin.full_pass(store, 0)
    idx = margin.HolderIndex(store, 0)
    idx.refresh(store.price_snapshot())
    idx.refresh_triggers(BTCUSDT)
    tp.set_triggers(0, BTCUSDT, *idx.triggers[BTCUSDT])
    assert idx.triggers[BTCUSDT][0].tolist() == [188_000.0]
    tp.stage_1a()                                       # takes the start's price sequences
    store.publish_mark(BTCUSDT, 188_000.0)
    assert tp.stage_1a() == 0 and decide(store, 0, store.price_snapshot()) == []
    store.publish_mark(BTCUSDT, 187_999.9)
    # Keep n with 0.5 n = E / 1.25 = 75,199.92 -> n = 150,399.84 USDT = 150,399.84 / 187,999.9
    # = 0.7999996 BTC (0.8 BTC would be 150,399.92): close 0.2000004 BTC -> 201 units, rounded up
    assert [(o.qty_units, o.reason) for o in decide(store, 0, store.price_snapshot())] == \
        [(-201, Code.LIQ_BELOW_MAINTENANCE)]
    assert tp.stage_1a() == 1
    assert idx.candidates(BTCUSDT, 187_999.9, 188_000.0).tolist() == [0]


def test_an_isolated_order_filled_at_the_mark_restores_health_and_spares_the_cross_balance():
    """Dave (known values above): 100 ETH short from 3,000, isolated with 15,000.5 USDT,
    1,000 USDT cross; at 3,100 decide buys back 3,548 units (35.48 ETH). Filled at the
    mark, the realized loss 35.48 x (3,100 - 3,000) = 3,548 stays in the position's margin
    (15,000.5 - 3,548 = 11,452.5), so its equity is unchanged: 11,452.5 - 64.52 x 100 =
    5,000.5, against MM 64.52 x 3,100 x 2 % = 4,000.24: 5,000.5 >= 1.25 x 4,000.24 =
    5,000.3, healthy (3,547 units would leave MM 4,000.86: 1.25 x = 5,001.075 > 5,000.5).
    The cross balance stays 1,000 USDT. The fill rule used to book the loss to the cross
    balance (1,000 -> -2,548: the cross scope bankrupt with no position to close) while
    the position kept its 15,000.5, so decide had closed twice what that rule needed."""
    from engine.accounting.fills import apply_fill_leg

    balances, positions = DAVE_100_ETH_SHORT_AT_3K_ISOLATED_15_000_5
    store = build(KV_ASSETS, make_instruments(KV_TIERS, {**KV_MARKS, ETHUSDT_F: 3_100.0}), balances,
                  list(positions))
    [order] = decide(store, 0, store.price_snapshot())
    assert order.qty_units == 3_548
    assert apply_fill_leg(store, 0, 0, ETHUSDT_F, order.qty_units, 3_100 * PRICE_SCALE, 0).code == Code.OK
    slot = store.slots(0)[0]
    assert (int(slot["qty"]), int(slot["isolated_margin"])) == (-6_452, 11_452_500_000)
    assert int(store.accounts[0]["balance"][USDT]) == 1_000 * 10**6
    d = margin.account_detail(store, 0, store.price_snapshot())
    p = d.positions[0]
    assert abs(11_452.5 + p.unrealized_pnl - 5_000.5) < 1e-6 and abs(p.maintenance_margin - 4_000.24) < 1e-6
    assert decide(store, 0, store.price_snapshot()) == []


def test_a_profit_whose_realizing_costs_haircut_collateral_is_closed_last():
    """BTC collateral at a 30 % haircut (44,000). A cross account: 1 BTC; BTCUSD (inverse,
    BTC-settled, cs 100) long 40,000 contracts from 40,000 (cost 100 BTC), in profit
    100 - 4M / 44,000 = 9.0909 BTC = 400,000 USD; ETHUSDT-F short 500 ETH from 3,000, at
    3,669: -334,500. E = 1 x 44,000 x 0.7 + 400,000 - 334,500 = 96,300. MM: BTC notional
    90.909 BTC (tier >= 50: 2.5 %, amount 0.8) = 1.4727 BTC = 64,800 USD; ETH 1,834,500 x
    2 % = 36,690; 101,490 > E: in breach.

    Closing the BTC long would realize its 9.0909 BTC into the haircut balance: 120,000 USD
    of equity gone (0.3 x 400,000) to free 1.25 x 64,800 = 81,000 of requirement. Its
    benefit is negative, so it comes last, and ETH (benefit 1.25 x 36,690 = 45,862.5) is
    closed first: keep n x 2 % = 96,300 / 1.25 - 64,800 = 12,240 -> n = 612,000 USDT =
    166.803 ETH -> buy back 333.197 ETH = 33,320 units (qty_scale 100). That restores
    health alone (E 96,300 vs 1.25 x 77,039.6). Largest requirement first, the rule had
    closed the whole BTC long and then, with E at -23,700, the whole ETH short."""
    from engine.accounting.fills import apply_fill_leg

    assets = [KV_ASSETS[USDT], Asset("BTC", BTC, 10**8, 44_000.0, 0.3), KV_ASSETS[ETH]]
    store = build(assets, make_instruments(KV_TIERS, {**KV_MARKS, ETHUSDT_F: 3_669.0}), {BTC: 10**8},
                  [(BTCUSD_INV, Mode.CROSS, 40_000, 100 * 10**8, 0),
                   (ETHUSDT_F, Mode.CROSS, -50_000, -1_500_000 * 10**6, 0)])
    snap = store.price_snapshot()
    d = margin.account_detail(store, 0, snap)
    assert abs(d.cross_equity_usd - 96_300) < 1e-6 and abs(d.cross_mm_usd - 101_490) < 1e-6
    got = decide(store, 0, snap)
    assert got == decide_reference(store, 0, snap)
    assert [(o.instrument, o.qty_units, o.reason) for o in got] == [(ETHUSDT_F, 33_320, Code.LIQ_BELOW_MAINTENANCE)]
    assert apply_fill_leg(store, 0, 0, ETHUSDT_F, 33_320, 3_669 * PRICE_SCALE, 0).code == Code.OK
    d = margin.account_detail(store, 0, store.price_snapshot())
    assert d.cross_equity_usd >= 1.25 * d.cross_mm_usd and abs(d.cross_equity_usd - 96_300) < 1e-6
    assert decide(store, 0, store.price_snapshot()) == []
