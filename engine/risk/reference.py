"""Exact plain-Python reference model of the margin rules: the oracle the kernel is held to.

Written from the rules (the module docstring of ext/_margin.pyx and engine/instruments.py),
not from the kernel's code, with ``fractions.Fraction`` arithmetic end to end, so every
figure here is exact for the inputs it is given. Floats from the engine (prices, rates,
contract sizes) convert exactly with ``Fraction(float)``; the tier amounts are derived
here again, exactly, from the floors and rates.

Per position, in its settle asset, with ``q = qty / qty_scale`` contracts,
``c = cost / settle_scale``, ``cs`` the contract size and ``p`` the mark::

    linear (perp, future):  notional = |q| cs p    upnl = q cs p - c
    inverse:                notional = |q| cs / p  upnl = c - q cs / p
    option:                 notional = |q| cs S    upnl = q cs p - c   (S: underlying mark;
                            a long option, q >= 0: IM = q cs p, its value; MM = 0)
    tier k = last tier with floor_k <= notional
    IM = notional imr_k - init_amount_k,  MM = notional mmr_k - maint_amount_k

Per account, in USD (``px``: settle asset price, ``h``: haircut)::

    collateral   = sum_a bal_a px_a (1 - h_a)  for bal_a > 0,  bal_a px_a  for bal_a < 0
    cross equity = collateral + sum_cross upnl px
    cross IM/MM  = sum_cross IM px, sum_cross MM px
    status bits  1: equity < IM, 2: equity < MM > 0, 4: an isolated iso + upnl < MM > 0, 8: equity < 0

Liquidation and bankruptcy prices are found by a method of their own (see
``_solve_liquidation``): bracket the root between the tier boundaries by the sign of the
exact gap function, interpolate exactly inside the bracket (the gap is affine there),
and check the gap is exactly zero at the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Sequence

# Kinds and modes by number, as in engine.instruments.Kind / engine.store.layout.Mode.
PERP, FUTURE, OPTION, INVERSE_PERP, INVERSE_FUTURE = 0, 1, 2, 3, 4
CROSS, ISOLATED = 0, 1
LINEAR_KINDS = (PERP, FUTURE)
INVERSE_KINDS = (INVERSE_PERP, INVERSE_FUTURE)

# Status bits (engine.store.layout.Status).
BELOW_IM, LIQUIDATABLE, ISOLATED_LIQUIDATABLE, BANKRUPT = 1, 2, 4, 8

# Codes (engine.codes.Code numbers) of the pre-trade check.
OK, INSUFFICIENT_MARGIN, POSITION_SLOTS_FULL = 0, 4001, 4007


def exact(x) -> Fraction:
    """``x`` as an exact Fraction (a float converts to the exact binary value it holds)."""
    return x if isinstance(x, Fraction) else Fraction(x)


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class RefAsset:
    price: Fraction            # USD per 1 asset
    haircut: Fraction          # fraction of a positive balance not counted
    scale: int                 # integer balance units per 1 asset


@dataclass(frozen=True)
class RefTier:
    floor: Fraction            # notional floor, settle asset
    imr: Fraction
    mmr: Fraction
    init_amount: Fraction      # derived, settle asset
    maint_amount: Fraction     # derived, settle asset


def derive_tiers(raw: Sequence[tuple]) -> tuple[RefTier, ...]:
    """Exact tier amounts from ``[(floor, imr, mmr), ...]``.

    ``maint_amount_0 = 0``, ``maint_amount_k = maint_amount_(k-1) + floor_k (mmr_k - mmr_(k-1))``;
    ``init_amount`` likewise with ``imr``. These make the requirement continuous at each floor.
    """
    out: list[RefTier] = []
    for floor, imr, mmr in raw:
        floor, imr, mmr = exact(floor), exact(imr), exact(mmr)
        if not out:
            out.append(RefTier(floor, imr, mmr, Fraction(0), Fraction(0)))
            continue
        prev = out[-1]
        out.append(RefTier(floor, imr, mmr,
                           prev.init_amount + floor * (imr - prev.imr),
                           prev.maint_amount + floor * (mmr - prev.mmr)))
    return tuple(out)


@dataclass(frozen=True)
class RefInstrument:
    kind: int
    settle: int                       # asset index
    contract_size: Fraction
    qty_scale: int
    tiers: tuple[RefTier, ...]
    underlying: int | None = None     # option: instrument index of the underlying

    @classmethod
    def make(cls, kind: int, settle: int, contract_size, qty_scale: int, tiers: Sequence[tuple],
             underlying: int | None = None) -> "RefInstrument":
        return cls(int(kind), settle, exact(contract_size), qty_scale, derive_tiers(tiers), underlying)


@dataclass(frozen=True)
class RefPosition:
    instrument: int
    mode: int                  # CROSS or ISOLATED
    qty: int                   # units of 1/qty_scale contracts, signed
    cost: int                  # settle units
    isolated_margin: int = 0   # settle units


@dataclass(frozen=True)
class RefAccount:
    balances: dict[int, int] = field(default_factory=dict)     # asset -> units
    positions: tuple[RefPosition, ...] = ()
    isolated_default: bool = False


@dataclass(frozen=True)
class RefMarket:
    assets: tuple[RefAsset, ...]
    instruments: tuple[RefInstrument, ...]
    marks: tuple[Fraction, ...]          # per instrument

    def with_mark(self, instrument: int, mark) -> "RefMarket":
        marks = list(self.marks)
        marks[instrument] = exact(mark)
        return replace(self, marks=tuple(marks))


# --------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class PosFigures:
    notional: Fraction
    upnl: Fraction
    im: Fraction
    mm: Fraction
    liquidation_price: Fraction | None = None
    bankruptcy_price: Fraction | None = None


@dataclass(frozen=True)
class AccountFigures:
    collateral_usd: Fraction
    cross_upnl_usd: Fraction
    cross_equity_usd: Fraction
    cross_im_usd: Fraction
    cross_mm_usd: Fraction
    iso_margin_usd: Fraction
    iso_upnl_usd: Fraction
    iso_im_usd: Fraction
    iso_mm_usd: Fraction
    status: int
    positions: tuple[PosFigures, ...]


# --------------------------------------------------------------------------- tiers
def tier_of(tiers: Sequence[RefTier], notional: Fraction) -> RefTier:
    """The last tier whose floor is at or below ``notional`` (tier 0 when none is)."""
    chosen = tiers[0]
    for t in tiers:
        if t.floor <= notional:
            chosen = t
    return chosen


def requirement(ins: RefInstrument, notional: Fraction) -> tuple[Fraction, Fraction]:
    """``(IM, MM)`` of a notional, settle asset."""
    t = tier_of(ins.tiers, notional)
    return notional * t.imr - t.init_amount, notional * t.mmr - t.maint_amount


# --------------------------------------------------------------------------- positions
def values(ins: RefInstrument, q: Fraction, c: Fraction, mark: Fraction,
           underlying_mark: Fraction | None = None) -> PosFigures:
    """Notional, upnl, IM and MM of ``q`` contracts with settle cost ``c`` at ``mark``."""
    cs = ins.contract_size
    if ins.kind in INVERSE_KINDS:
        notional = abs(q) * cs / mark
        upnl = c - q * cs / mark
    elif ins.kind == OPTION:
        notional = abs(q) * cs * underlying_mark
        upnl = q * cs * mark - c
    else:
        notional = abs(q) * cs * mark
        upnl = q * cs * mark - c
    if ins.kind == OPTION and q >= 0:                 # its premium reserved, nothing to maintain
        return PosFigures(notional, upnl, q * cs * mark, Fraction(0))
    im, mm = requirement(ins, notional)
    return PosFigures(notional, upnl, im, mm)


def position_values(market: RefMarket, pos: RefPosition) -> PosFigures:
    ins = market.instruments[pos.instrument]
    q = Fraction(pos.qty, ins.qty_scale)
    c = Fraction(pos.cost, market.assets[ins.settle].scale)
    under = market.marks[ins.underlying] if ins.kind == OPTION else None
    return values(ins, q, c, market.marks[pos.instrument], under)


def collateral_usd(market: RefMarket, balances: dict[int, int]) -> Fraction:
    total = Fraction(0)
    for a, units in balances.items():
        asset = market.assets[a]
        v = Fraction(units, asset.scale) * asset.price
        total += v * (1 - asset.haircut) if units > 0 else v    # borrowed: full value
    return total


# --------------------------------------------------------------------------- accounts
def account_figures(market: RefMarket, acct: RefAccount, prices: bool = True) -> AccountFigures:
    """Every figure of ``acct`` at ``market``; liquidation/bankruptcy prices if ``prices``."""
    coll = collateral_usd(market, acct.balances)
    c_up = c_im = c_mm = Fraction(0)
    i_m = i_up = i_im = i_mm = Fraction(0)
    status = 0
    vals = [position_values(market, p) for p in acct.positions]
    for pos, v in zip(acct.positions, vals):
        ins = market.instruments[pos.instrument]
        px = market.assets[ins.settle].price
        if pos.mode == ISOLATED:
            iso = Fraction(pos.isolated_margin, market.assets[ins.settle].scale)
            i_m += iso * px
            i_up += v.upnl * px
            i_im += v.im * px
            i_mm += v.mm * px
            if iso + v.upnl < v.mm and v.mm > 0:
                status |= ISOLATED_LIQUIDATABLE
        else:
            c_up += v.upnl * px
            c_im += v.im * px
            c_mm += v.mm * px
    equity = coll + c_up
    if equity < c_im:
        status |= BELOW_IM
    if equity < c_mm and c_mm > 0:     # nothing to liquidate without a requirement: bad debt
        status |= LIQUIDATABLE
    if equity < 0:
        status |= BANKRUPT
    if prices:
        vals = [replace(v, liquidation_price=liquidation_price(market, acct, i),
                        bankruptcy_price=bankruptcy_price(market, acct, i))
                for i, v in enumerate(vals)]
    return AccountFigures(coll, c_up, equity, c_im, c_mm, i_m, i_up, i_im, i_mm, status, tuple(vals))


# --------------------------------------------------------------------------- prices
def backing(market: RefMarket, acct: RefAccount, slot: int) -> tuple[Fraction, Fraction]:
    """``(e0, m0)`` in USD: the backing equity and requirement *without* position ``slot``.

    Cross: collateral plus the other cross positions' upnl, and their MM. Isolated: the
    position's isolated margin, and nothing. Summed directly, not by subtraction.
    """
    pos = acct.positions[slot]
    ins = market.instruments[pos.instrument]
    px = market.assets[ins.settle].price
    if pos.mode == ISOLATED:
        return Fraction(pos.isolated_margin, market.assets[ins.settle].scale) * px, Fraction(0)
    e0 = collateral_usd(market, acct.balances)
    m0 = Fraction(0)
    for j, other in enumerate(acct.positions):
        if j == slot or other.mode == ISOLATED:
            continue
        v = position_values(market, other)
        opx = market.assets[market.instruments[other.instrument].settle].price
        e0 += v.upnl * opx
        m0 += v.mm * opx
    return e0, m0


def _at_t(ins: RefInstrument, q: Fraction, c: Fraction, t: Fraction) -> PosFigures:
    """Position values with the price variable ``t`` = p (linear) or 1/p (inverse).

    In ``t`` both kinds have ``notional = |q| cs t`` and an upnl affine in ``t``; ``t = 0``
    is p = 0 (linear) or p = infinity (inverse).
    """
    cs = ins.contract_size
    notional = abs(q) * cs * t
    upnl = (c - q * cs * t) if ins.kind in INVERSE_KINDS else (q * cs * t - c)
    im, mm = requirement(ins, notional)
    return PosFigures(notional, upnl, im, mm)


def _price_of_t(ins: RefInstrument, t: Fraction) -> Fraction:
    return 1 / t if ins.kind in INVERSE_KINDS else t


def _position_qc(market: RefMarket, pos: RefPosition) -> tuple[RefInstrument, Fraction, Fraction, Fraction]:
    ins = market.instruments[pos.instrument]
    return (ins, Fraction(pos.qty, ins.qty_scale), Fraction(pos.cost, market.assets[ins.settle].scale),
            market.assets[ins.settle].price)


def liquidation_gap(market: RefMarket, acct: RefAccount, slot: int, t: Fraction) -> Fraction:
    """Backing equity minus backing requirement (USD) with position ``slot`` at ``t``."""
    pos = acct.positions[slot]
    ins, q, c, px = _position_qc(market, pos)
    e0, m0 = backing(market, acct, slot)
    v = _at_t(ins, q, c, t)
    return e0 + v.upnl * px - (m0 + v.mm * px)


def _solve_liquidation(ins: RefInstrument, q: Fraction, c: Fraction, px: Fraction,
                       e0: Fraction, m0: Fraction) -> Fraction | None:
    """The ``t > 0`` where ``gap(t) = e0 - m0 + px (upnl(t) - MM(t))`` is zero; None if none.

    ``gap`` is continuous (continuous tier amounts) and affine in ``t`` between the tier
    boundaries ``t_k = floor_k / (|q| cs)``. Walk the brackets [t_k, t_(k+1)] (the last
    one unbounded) and, where the sign of the exact gap changes, interpolate exactly --
    on an affine piece that is the root. With every mmr < 1 the gap is strictly monotonic,
    so the first root found is the only one.
    """
    def gap(t: Fraction) -> Fraction:
        v = _at_t(ins, q, c, t)
        return e0 - m0 + px * (v.upnl - v.mm)

    unit = abs(q) * ins.contract_size
    points = [Fraction(0)] + [tier.floor / unit for tier in ins.tiers[1:]]
    gaps = [gap(t) for t in points]
    for k, (ta, ga) in enumerate(zip(points, gaps)):
        if ga == 0:
            return ta if ta > 0 else None
        last = k + 1 == len(points)
        tb = ta + 1 if last else points[k + 1]
        gb = gap(tb) if last else gaps[k + 1]
        if gb == ga:
            continue                                   # flat piece: no crossing here
        root = ta + ga * (tb - ta) / (ga - gb)         # exact zero of the affine piece
        if root > ta and (last or root < tb):
            if gap(root) != 0:                         # the piece is affine: must be exact
                raise AssertionError(f"reference: gap({root}) = {gap(root)} != 0")
            return root
    return None


def liquidation_price(market: RefMarket, acct: RefAccount, slot: int) -> Fraction | None:
    """Mark of the position's instrument at which backing equity = backing requirement."""
    pos = acct.positions[slot]
    ins, q, c, px = _position_qc(market, pos)
    if q == 0 or ins.kind == OPTION:
        return None
    e0, m0 = backing(market, acct, slot)
    t = _solve_liquidation(ins, q, c, px, e0, m0)
    return None if t is None else _price_of_t(ins, t)


def bankruptcy_price(market: RefMarket, acct: RefAccount, slot: int) -> Fraction | None:
    """Mark at which the backing equity ``e0 + px upnl`` is zero.

    The backing equity is affine in ``t``; its zero comes from two exact evaluations.
    """
    pos = acct.positions[slot]
    ins, q, c, px = _position_qc(market, pos)
    if q == 0 or ins.kind == OPTION:
        return None
    e0, _ = backing(market, acct, slot)

    def equity(t: Fraction) -> Fraction:
        return e0 + px * _at_t(ins, q, c, t).upnl

    e_0, e_1 = equity(Fraction(0)), equity(Fraction(1))
    t = e_0 / (e_0 - e_1)
    assert equity(t) == 0
    return _price_of_t(ins, t) if t > 0 else None


# --------------------------------------------------------------------------- pre-trade
def pretrade_check(market: RefMarket, acct: RefAccount, slots_per_account: int, instrument: int,
                   dqty: int, price) -> tuple[int, Fraction, Fraction]:
    """May ``acct`` trade ``dqty`` units of ``instrument`` at ``price``? ``(code, post_eq, post_im)``.

    (1) account figures at the marks; (2) the slot of the instrument, else a free slot, else
    POSITION_SLOTS_FULL; (3) trade PnL at the mark ``dq cs (mark - price)`` (linear, option)
    or ``dq cs (1/price - 1/mark)`` (inverse); (4) the requirement with the position at
    ``q + dq``; (5) cross: ``equity + pnl px >= IM + (IM_new - IM_old) px``; isolated: the
    initial margin the position lacks, ``IM_new - (iso + upnl + pnl)``, times px, must fit
    in ``equity - IM``. A pure reduction (no flip) is always accepted.

    Post figures: cross, ``equity + pnl px`` and ``IM + (IM_new - IM_old) px``; isolated,
    the position's post-trade equity ``(iso + upnl + pnl) px`` and ``IM_new px`` added to
    the cross figures.
    """
    price = exact(price)
    acc = account_figures(market, acct, prices=False)
    ins = market.instruments[instrument]
    settle = market.assets[ins.settle]
    slot = next((i for i, p in enumerate(acct.positions) if p.instrument == instrument), None)
    if slot is None and len(acct.positions) >= slots_per_account:
        return POSITION_SLOTS_FULL, acc.cross_equity_usd, acc.cross_im_usd
    if slot is None:
        q_old, c_old, iso = Fraction(0), Fraction(0), Fraction(0)
        mode = ISOLATED if acct.isolated_default and ins.kind != OPTION else CROSS   # as a fill opens it
    else:
        p = acct.positions[slot]
        q_old, c_old = Fraction(p.qty, ins.qty_scale), Fraction(p.cost, settle.scale)
        iso, mode = Fraction(p.isolated_margin, settle.scale), p.mode
    dq = Fraction(dqty, ins.qty_scale)
    mark = market.marks[instrument]
    under = market.marks[ins.underlying] if ins.kind == OPTION else None
    if ins.kind in INVERSE_KINDS:
        pnl = dq * ins.contract_size * (1 / price - 1 / mark)
    else:
        pnl = dq * ins.contract_size * (mark - price)
    old = values(ins, q_old, c_old, mark, under)
    new = values(ins, q_old + dq, c_old, mark, under)
    q_new = q_old + dq
    reducing = dq != 0 and abs(q_new) <= abs(q_old) and q_new * q_old >= 0
    px = settle.price
    if mode == CROSS:
        post_eq = acc.cross_equity_usd + pnl * px
        post_im = acc.cross_im_usd + (new.im - old.im) * px
        ok = post_eq >= post_im
    else:
        lack = new.im - (iso + old.upnl + pnl)
        post_eq = acc.cross_equity_usd + (iso + old.upnl + pnl) * px
        post_im = acc.cross_im_usd + new.im * px
        ok = lack * px <= acc.cross_equity_usd - acc.cross_im_usd
    return (OK if ok or reducing else INSUFFICIENT_MARGIN), post_eq, post_im


# --------------------------------------------------------------------------- from the engine
def market_from_engine(assets, instruments, marks, asset_prices=None) -> RefMarket:
    """A RefMarket from engine.instruments ``Asset``/``Instrument`` lists and float marks.

    Floats convert exactly; tier amounts are derived again here from floors and rates
    (the engine's own derived amounts are not read).
    """
    by_name = {i.name: i.index for i in instruments}
    asset_by = {a.name: a.index for a in assets}
    ra = tuple(RefAsset(exact(asset_prices[a.index] if asset_prices is not None else a.price_usd),
                        exact(a.haircut), int(a.scale)) for a in sorted(assets, key=lambda a: a.index))
    ri = tuple(RefInstrument.make(int(i.kind), asset_by[i.settle], i.contract_size, int(i.qty_scale),
                                  [(t.floor, t.imr, t.mmr) for t in i.tiers],
                                  by_name[i.underlying] if i.underlying else None)
               for i in sorted(instruments, key=lambda i: i.index))
    return RefMarket(ra, ri, tuple(exact(float(m)) for m in marks))


def account_from_store(store, row: int) -> RefAccount:
    """The account in ``row`` of a Store: balances and used position slots, as integers."""
    a = store.accounts[row]
    n = int(a["n_positions"])
    bal = {k: int(v) for k, v in enumerate(a["balance"][: len(store.assets)]) if int(v) != 0}
    slots = store.slots(row)[:n]
    pos = tuple(RefPosition(int(s["instrument"]), int(s["mode"]), int(s["qty"]), int(s["cost"]),
                            int(s["isolated_margin"])) for s in slots)
    return RefAccount(bal, pos, bool(int(a["flags"]) & 2))
