"""The Cython margin kernel held to the exact reference model (engine/risk/reference.py).

Random worlds: three collateral assets (USDT, BTC, ETH, with haircuts), a linear perp,
a linear future, an inverse perp, an inverse future and an option on the perp, random
step-margin tiers; accounts mixing cross and isolated positions, positive, zero and
negative (borrowed) balances, empty accounts, closed slots with a cost residue; marks
deliberately placed on or next to tier boundaries, balances chosen so that a liquidation
price lands on a boundary, and orders sized so the pre-trade decision is near its edge.

Checked: every account and position figure, status bits, liquidation and bankruptcy
prices (account_detail); full_pass rows == account_detail; HolderIndex ticks == a fresh
full pass; trigger candidates == breaches after one move; pretrade_check == reference.

Tolerance (``TOL`` = 1e-9, relative). The kernel works in float64, the reference exactly.
A float64 sum of n terms is off by at most about n * 2**-53 (~1.1e-16) times the sum of
the terms' magnitudes, and cancellation (equity = collateral + upnl with large opposite
terms; the kernel's e0 = equity - this position's upnl) makes the *result* small while the
error stays proportional to the terms. So a figure is "equal" when

    |kernel - exact| <= 1e-9 * max(1, |kernel|, |exact|, sum of |terms| behind it)

i.e. ~1e6 times the worst float error of a handful of terms -- loose against rounding,
tight against any formula slip (those are O(1) relative). Prices are compared in the
solver's variable t (p for linear, 1/p for inverse), where the root is the quotient of
such a sum by the slope of the gap, so the tolerance on t is 1e-9 * max(t, magnitude /
|slope|). Status bits are compared exactly, except each bit whose two sides are within
the tolerance of each other (a boundary float64 cannot resolve).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from engine.instruments import Asset, Instrument, Kind, derive_tiers
from engine.risk import margin
from engine.risk import reference as ref
from engine.store.layout import Mode, Status
from engine.store.shm import Store

TOL = 1e-9

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])

USDT, BTC, ETH = 0, 1, 2
BTCUSDT, ETHUSDT_F, BTCUSD_INV, ETHUSD_INVF, BTC_CALL = 0, 1, 2, 3, 4
# settle asset and a notional unit (settle asset) that tier floors are multiples of
SPEC = {
    BTCUSDT: ("BTCUSDT", Kind.PERP, USDT, 10_000),
    ETHUSDT_F: ("ETHUSDT-F", Kind.FUTURE, USDT, 5_000),
    BTCUSD_INV: ("BTCUSD", Kind.INVERSE_PERP, BTC, 1),
    ETHUSD_INVF: ("ETHUSD-F", Kind.INVERSE_FUTURE, ETH, 10),
    BTC_CALL: ("BTC-C", Kind.OPTION, USDT, 20_000),
}


# --------------------------------------------------------------------------- strategies
def dec(lo: float, hi: float, places: int = 2):
    """A float drawn in [lo, hi], rounded to ``places`` decimals."""
    return st.floats(lo, hi, allow_nan=False).map(lambda x: round(x, places))


@st.composite
def tier_tables(draw, unit: float):
    n = draw(st.integers(1, 4))
    floors = [0.0]
    for _ in range(n - 1):
        floors.append(floors[-1] + unit * draw(st.sampled_from([1, 2, 5, 10, 25])))
    mmr = draw(st.sampled_from([0.004, 0.005, 0.01, 0.02, 0.05]))
    imr = min(1.0, mmr * draw(st.sampled_from([1.0, 1.5, 2.0, 2.5])))
    raw = []
    for k, f in enumerate(floors):
        if k:
            mmr = mmr + draw(st.sampled_from([0.0, 0.0025, 0.005, 0.01, 0.025, 0.05]))
            imr = min(1.0, max(imr, mmr * draw(st.sampled_from([1.0, 1.5, 2.0]))))
        raw.append({"floor": f, "imr": imr, "mmr": mmr})
    return raw


@st.composite
def worlds(draw, n_accounts=st.integers(1, 4)):
    """(assets, instruments, accounts, slots_per_account); accounts as plain dicts."""
    btc, eth = draw(dec(20_000, 100_000)), draw(dec(1_000, 5_000))
    hc = st.sampled_from([0.0, 0.0, 0.02, 0.05, 0.1, 0.25])
    assets = [Asset("USDT", USDT, 10**6, 1.0, draw(st.sampled_from([0.0, 0.0, 0.01]))),
              Asset("BTC", BTC, 10**8, btc, draw(hc)),
              Asset("ETH", ETH, 10**8, eth, draw(hc))]
    basis = dec(0.95, 1.05, 4)
    marks = {BTCUSDT: round(btc * draw(basis), 2), ETHUSDT_F: round(eth * draw(basis), 2),
             BTCUSD_INV: round(btc * draw(basis), 2), ETHUSD_INVF: round(eth * draw(basis), 2),
             BTC_CALL: draw(dec(10, 8_000))}
    cs = {BTCUSDT: draw(st.sampled_from([1.0, 0.001])), ETHUSDT_F: 1.0, BTCUSD_INV: 100.0,
          ETHUSD_INVF: 10.0, BTC_CALL: draw(st.sampled_from([1.0, 0.1]))}
    qs = {BTCUSDT: 1000, ETHUSDT_F: 100, BTCUSD_INV: 1, ETHUSD_INVF: 1, BTC_CALL: 100}
    tiers = {i: draw(tier_tables(SPEC[i][3])) for i in SPEC}
    settle_scale = {USDT: 10**6, BTC: 10**8, ETH: 10**8}

    slots = draw(st.integers(1, 5))
    accounts = []
    for a in range(draw(n_accounts)):
        iso_default = draw(st.booleans())
        at_least = min(slots, draw(st.sampled_from([0, 1, 1, 1])))
        chosen = draw(st.lists(st.sampled_from(sorted(SPEC)), unique=True, min_size=at_least,
                               max_size=slots))
        positions = []
        for i in chosen:
            name, kind, settle, unit = SPEC[i]
            floors = [t["floor"] for t in tiers[i]]
            # a target notional: around a floor of the table (or a unit when one tier)
            base = draw(st.sampled_from(floors[1:] or [unit]))
            target = base * draw(st.sampled_from([0.01, 0.3, 0.999, 1.0, 1.001, 1.7, 3.0]))
            under = marks[BTCUSDT] if kind == Kind.OPTION else marks[i]
            per_contract = cs[i] / under if kind.is_inverse else cs[i] * under
            units = max(1, round(target / per_contract * qs[i]))
            units *= draw(st.sampled_from([1, -1]))
            if draw(st.integers(0, 15)) == 0:
                units = 0            # a closed position that still carries a cost residue
            entry = marks[i] * draw(dec(0.7, 1.3, 3))
            q = units / qs[i]
            cost_settle = q * cs[i] / entry if kind.is_inverse else q * cs[i] * entry
            cost = round(cost_settle * settle_scale[settle]) if units else draw(st.integers(-10**6, 10**6))
            mode = draw(st.sampled_from([Mode.CROSS, Mode.ISOLATED]))
            iso = 0
            if mode == Mode.ISOLATED:
                notional = abs(q) * per_contract
                iso = round(notional * draw(dec(0.0, 0.5, 3)) * settle_scale[settle])
            positions.append([i, int(mode), units, cost, iso])
        balances = {}
        for asset in (USDT, BTC, ETH):
            kind_b = draw(st.sampled_from(["absent", "zero", "pos", "pos", "neg"]))
            if kind_b == "absent":
                continue
            usd = 0.0 if kind_b == "zero" else draw(dec(1, 2_000_000))
            if kind_b == "neg":
                usd = -usd * draw(dec(0.0, 0.5, 3))
            balances[asset] = round(usd / assets[asset].price_usd * settle_scale[asset])
        accounts.append({"balances": balances, "positions": positions, "iso_default": iso_default})

    # Put one instrument's mark exactly on (or next to) a tier floor of one position.
    held = [(a, p) for a in accounts for p in a["positions"] if p[2] != 0]
    if held and draw(st.booleans()):
        acc, p = draw(st.sampled_from(held))
        i, units = p[0], p[2]
        kind = SPEC[i][1]
        floors = [t["floor"] for t in tiers[i]][1:]
        if floors:
            f = draw(st.sampled_from(floors))
            nudge = 1.0 + draw(st.sampled_from([0.0, 0.0, 1e-15, -1e-15, 1e-10, -1e-10, 1e-4, -1e-4]))
            q = abs(units) / qs[i]
            if kind == Kind.OPTION:
                marks[BTCUSDT] = f / (q * cs[i]) * nudge
            elif kind.is_inverse:
                marks[i] = q * cs[i] / f * nudge
            else:
                marks[i] = f / (q * cs[i]) * nudge

    instruments = [
        Instrument(name=SPEC[i][0], index=i, kind=SPEC[i][1], settle=assets[SPEC[i][2]].name,
                   contract_size=cs[i], qty_scale=qs[i], price_scale=100, tick_size=0.01,
                   lot_size=1 / qs[i], tiers=derive_tiers(tiers[i]), mark_price=marks[i],
                   underlying="BTCUSDT" if i == BTC_CALL else None,
                   strike=50_000.0 if i == BTC_CALL else 0.0, expiry_ns=1 if i == BTC_CALL else 0)
        for i in sorted(SPEC)]

    # Move one USDT balance so that a cross position's liquidation price sits on a floor.
    if held and draw(st.booleans()):
        _liquidation_on_floor(draw, assets, instruments, accounts)
    return assets, instruments, accounts, slots


def _ref_account(acc: dict) -> ref.RefAccount:
    return ref.RefAccount({k: v for k, v in acc["balances"].items() if v != 0},
                          tuple(ref.RefPosition(*p) for p in acc["positions"]), acc["iso_default"])


def _liquidation_on_floor(draw, assets, instruments, accounts) -> None:
    market = ref.market_from_engine(assets, instruments, [i.mark_price for i in instruments])
    cands = [(acc, k) for acc in accounts for k, p in enumerate(acc["positions"])
             if p[0] != BTC_CALL and p[2] != 0 and len(market.instruments[p[0]].tiers) > 1]
    if not cands:
        return
    acc, k = draw(st.sampled_from(cands))
    p = acc["positions"][k]
    ins = market.instruments[p[0]]
    tier = draw(st.sampled_from(ins.tiers[1:]))
    t = tier.floor / (abs(Fraction(p[2], ins.qty_scale)) * ins.contract_size)
    racct = _ref_account(acc)
    gap = ref.liquidation_gap(market, racct, k, t)          # USD
    if p[1] == Mode.ISOLATED:
        px = market.assets[ins.settle].price
        iso = p[4] - gap / px * market.assets[ins.settle].scale
        if iso >= 0:
            p[4] = round(iso)
        return
    usdt = market.assets[USDT]
    old = acc["balances"].get(USDT, 0)
    old_usd = Fraction(old, usdt.scale) * usdt.price * ((1 - usdt.haircut) if old > 0 else 1)
    want = old_usd - gap
    factor = (1 - usdt.haircut) if want > 0 else 1
    acc["balances"][USDT] = round(want / (usdt.price * factor) * usdt.scale)


# --------------------------------------------------------------------------- helpers
def build(assets, instruments, accounts, slots) -> Store:
    store = Store.create(None, assets=assets, instruments=instruments,
                         accounts_capacity=max(len(accounts), 1), n_partitions=1,
                         slots_per_account=slots)
    for k, acc in enumerate(accounts):
        row = store.add_account(k, isolated_default=acc["iso_default"])
        assert row == k
        for asset, units in acc["balances"].items():
            store.set_balance(row, asset, units)
        for i, mode, qty, cost, iso in acc["positions"]:
            store.set_position(row, i, qty, cost, mode=mode, isolated_margin=iso)
    return store


def market_at(store: Store, assets, instruments, snap=None) -> ref.RefMarket:
    snap = snap or store.price_snapshot()
    return ref.market_from_engine(assets, instruments, snap.marks, snap.asset_px)


def close(a: float, b: Fraction, mag: Fraction | float = 0) -> bool:
    """|a - b| <= TOL * max(1, |a|, |b|, mag) (see the module docstring)."""
    return abs(Fraction(a) - b) <= Fraction(TOL) * max(1, abs(Fraction(a)), abs(b), abs(Fraction(mag)))


def pos_magnitude(market: ref.RefMarket, pos: ref.RefPosition) -> Fraction:
    """Sum of |terms| behind a position's figures, settle asset."""
    ins = market.instruments[pos.instrument]
    scale = market.assets[ins.settle].scale
    v = ref.position_values(market, pos)
    q = abs(Fraction(pos.qty, ins.qty_scale))
    price_term = q * ins.contract_size * market.marks[pos.instrument] if ins.kind == ref.OPTION \
        else v.notional
    t = ref.tier_of(ins.tiers, v.notional)
    return (price_term + abs(Fraction(pos.cost, scale)) + v.notional + t.init_amount + t.maint_amount
            + Fraction(pos.isolated_margin, scale))


def acct_magnitude(market: ref.RefMarket, acct: ref.RefAccount) -> Fraction:
    """Sum of |terms| behind an account's USD figures."""
    m = sum((abs(Fraction(u, market.assets[a].scale)) * market.assets[a].price
             for a, u in acct.balances.items()), Fraction(0))
    for p in acct.positions:
        m += pos_magnitude(market, p) * market.assets[market.instruments[p.instrument].settle].price
    return m


def check_status(got: int, exp: ref.AccountFigures, mag: Fraction, market, acct) -> None:
    tol = Fraction(TOL) * max(1, mag)
    eq = exp.cross_equity_usd
    for bit, lhs, rhs in ((Status.BELOW_IM, eq, exp.cross_im_usd),
                          (Status.LIQUIDATABLE, eq, exp.cross_mm_usd),
                          (Status.BANKRUPT, eq, Fraction(0))):
        if abs(lhs - rhs) > tol:
            assert bool(got & bit) == bool(exp.status & bit), (bit, float(lhs), float(rhs))
    margins = []
    for p, v in zip(acct.positions, exp.positions):
        if p.mode == ref.ISOLATED:
            ins = market.instruments[p.instrument]
            iso = Fraction(p.isolated_margin, market.assets[ins.settle].scale)
            margins.append((iso + v.upnl - v.mm) * market.assets[ins.settle].price)
    if all(abs(m) > tol for m in margins):
        assert bool(got & Status.ISOLATED_LIQUIDATABLE) == bool(exp.status & ref.ISOLATED_LIQUIDATABLE)


def _t(ins: ref.RefInstrument, p) -> Fraction:
    p = Fraction(p)
    return 1 / p if ins.kind in ref.INVERSE_KINDS else p


def check_price(what: str, got: float | None, exp: Fraction | None, ins: ref.RefInstrument,
                slope: Fraction, mag: Fraction) -> None:
    """Compare in t (p or 1/p): |t_k - t_r| <= TOL * max(t_r, mag / |slope|)."""
    if exp is None or got is None:
        assert got is None and exp is None, f"{what}: kernel {got!r}, reference {exp and float(exp)!r}"
        return
    tr, tk = _t(ins, exp), _t(ins, got)
    tol = Fraction(TOL) * max(tr, mag / slope)
    assert abs(tk - tr) <= tol, f"{what}: kernel {got!r}, reference {float(exp)!r}"


def check_account(store: Store, row: int, market: ref.RefMarket, acct: ref.RefAccount) -> None:
    d = margin.account_detail(store, row)
    e = ref.account_figures(market, acct)
    mag = acct_magnitude(market, acct)
    note(f"row {row}: kernel {d}\nreference {e}")
    for name in ("collateral_usd", "cross_upnl_usd", "cross_equity_usd", "cross_im_usd",
                 "cross_mm_usd", "iso_margin_usd", "iso_upnl_usd", "iso_im_usd", "iso_mm_usd"):
        assert close(getattr(d, name), getattr(e, name), mag), name
    check_status(int(d.status), e, mag, market, acct)
    assert len(d.positions) == len(e.positions)
    for pos, kd, rv in zip(acct.positions, d.positions, e.positions):
        assert (kd.instrument, kd.mode, kd.qty_units) == (pos.instrument, pos.mode, pos.qty)
        ins = market.instruments[pos.instrument]
        pmag = pos_magnitude(market, pos)
        for name, k, r in (("notional", kd.notional, rv.notional), ("upnl", kd.unrealized_pnl, rv.upnl),
                           ("im", kd.initial_margin, rv.im), ("mm", kd.maintenance_margin, rv.mm)):
            assert close(k, r, pmag), (name, pos)
        px = market.assets[ins.settle].price
        q = abs(Fraction(pos.qty, ins.qty_scale))
        mmr_max = max(t.mmr for t in ins.tiers)
        scale_mag = mag if pos.mode == ref.CROSS else pmag * px
        check_price(f"liquidation {pos}", kd.liquidation_price, rv.liquidation_price, ins,
                    px * ins.contract_size * q * (1 - mmr_max), scale_mag)
        check_price(f"bankruptcy {pos}", kd.bankruptcy_price, rv.bankruptcy_price, ins,
                    px * ins.contract_size * q, scale_mag)


# --------------------------------------------------------------------------- properties
@SETTINGS
@given(worlds())
def test_account_figures_match_reference(world):
    assets, instruments, accounts, slots = world
    store = build(assets, instruments, accounts, slots)
    market = market_at(store, assets, instruments)
    for row in range(len(accounts)):
        check_account(store, row, market, ref.account_from_store(store, row))


@SETTINGS
@given(worlds())
def test_full_pass_rows_equal_account_detail(world):
    # Exact equality: the full pass and account_detail run the same kernel function on the
    # same snapshot, so the float results are bit-for-bit the same.
    assets, instruments, accounts, slots = world
    store = build(assets, instruments, accounts, slots)
    snap = store.price_snapshot()
    n, rows = margin.full_pass(store, 0, snap)
    liq = set()
    for row in range(len(accounts)):
        d = margin.account_detail(store, row, snap)
        a = store.accounts[row]
        assert (float(a["collateral_usd"]), float(a["cross_equity_usd"]), float(a["cross_im_usd"]),
                float(a["cross_mm_usd"]), int(a["status"])) == \
            (d.collateral_usd, d.cross_equity_usd, d.cross_im_usd, d.cross_mm_usd, int(d.status))
        if d.liquidatable:
            liq.add(row)
    assert n == len(liq) and set(rows.tolist()) == liq


@st.composite
def tick_plans(draw):
    world = draw(worlds(n_accounts=st.integers(1, 6)))
    _, instruments, _, _ = world
    order = draw(st.permutations(range(len(instruments))))
    order = order[: draw(st.integers(1, len(order)))]
    moves = {i: draw(dec(0.6, 1.4, 4)) for i in order}
    return world, order, moves


def _dependents_last(order: list[int], instruments) -> list[int]:
    """``order``, plus each option re-ticked after its underlying when that ticked later."""
    out = list(order)
    by_name = {i.name: i.index for i in instruments}
    for ins in instruments:
        if ins.underlying is None:
            continue
        u = by_name[ins.underlying]
        if u in out and (ins.index not in out or out.index(ins.index) < out.index(u)):
            out.append(ins.index)
    return out


def indexed_store(assets, instruments, accounts, slots):
    """The world's store after a full pass, its snapshot, and a holder index refreshed at it."""
    store = build(assets, instruments, accounts, slots)
    snap0 = store.price_snapshot()
    margin.full_pass(store, 0, snap0)
    idx = margin.HolderIndex(store, 0)
    idx.refresh(snap0)
    return store, snap0, idx


def aggregates_equal_full_pass(store: Store, idx, market, n_accounts: int, snap):
    """Run a fresh full pass at ``snap``; assert the index's aggregates equal its rows (TOL
    relative to each account's magnitudes); yield ``(row, account, magnitude, (eq, im, mm))``."""
    margin.full_pass(store, 0, snap)
    for r in range(n_accounts):
        acct = ref.account_from_store(store, r)
        mag = acct_magnitude(market, acct)
        a = store.accounts[r]
        eq, im, mm, _ = idx.agg[r - idx.row_base]
        assert close(eq, Fraction(float(a["cross_equity_usd"])), mag)
        assert close(im, Fraction(float(a["cross_im_usd"])), mag)
        assert close(mm, Fraction(float(a["cross_mm_usd"])), mag)
        yield r, acct, mag, (eq, im, mm)


@SETTINGS
@given(tick_plans())
def test_holder_index_ticks_equal_full_pass(plan):
    # The incremental pass moves the index's private aggregates (``idx.agg``: cross equity,
    # IM, MM per account) by float deltas, so after the ticks they differ from a fresh
    # full pass at the final prices by rounding only: TOL relative to the magnitudes.
    (assets, instruments, accounts, slots), order, moves = plan
    store, snap0, idx = indexed_store(assets, instruments, accounts, slots)
    out = np.empty(64, np.int64)
    # A tick revalues the ticked instrument's holders and those of the options written on
    # it (test_tick_of_underlying_updates_short_option_requirement); ticking an option
    # after its underlying as well must change nothing.
    sequence = _dependents_last(order, instruments)
    for i in sequence:
        if i in moves:
            store.publish_mark(i, float(snap0.marks[i]) * moves[i])
        n_reported = idx.tick(i, store.price_snapshot(), out)
    reported = set(out[:n_reported].tolist())       # by the last tick, of ``sequence[-1]``
    snap = store.price_snapshot()
    market = market_at(store, assets, instruments, snap)
    for r, acct, mag, (eq, im, mm) in aggregates_equal_full_pass(store, idx, market, len(accounts), snap):
        a = store.accounts[r]
        e = ref.account_figures(market, acct, prices=False)
        if abs(e.cross_equity_usd - e.cross_mm_usd) > Fraction(TOL) * max(1, mag):
            # the breach set: cross breach in the aggregates == the full pass's, == exact
            assert (eq < mm and mm > 0) == bool(int(a["status"]) & Status.LIQUIDATABLE) == bool(e.status & ref.LIQUIDATABLE)
            # the last tick reported this account iff it breaches, if it holds that instrument
            if any(p.instrument == sequence[-1] and p.mode == ref.CROSS for p in acct.positions):
                assert (r in reported) == (eq < mm and mm > 0)


@SETTINGS
@given(tick_plans(), st.integers(-3, 3), st.booleans())
def test_holder_index_update_between_move_and_tick(plan, change, batched):
    # A fill re-margins its account (update_account) while other instruments' marks have
    # moved but their incremental passes are still pending. The index keeps every
    # aggregate at its instruments' basis (the prices last ticked), so after the pending
    # ticks the aggregates equal a fresh full pass at the new prices, to rounding (TOL
    # relative to the magnitudes), whatever the fill changed.
    (assets, instruments, accounts, slots), order, moves = plan
    store, snap0, idx = indexed_store(assets, instruments, accounts, slots)
    for i, m in moves.items():
        store.publish_mark(i, float(snap0.marks[i]) * m)
    snap = store.price_snapshot()
    for r in range(len(accounts)):                  # a "fill": slot 0's qty moves by change lots
        if int(store.accounts[r]["n_positions"]) and change:
            slot = store.slots(r)[0]
            slot["qty"] = int(slot["qty"]) + change * 1000
        if not batched:
            idx.update_account(r, snap)
    if batched:                                     # the worker's way: all touched rows at once
        idx.update_accounts(np.arange(len(accounts)), snap)
    out = np.empty(64, np.int64)
    for i in _dependents_last(order, instruments):
        idx.tick(i, snap, out)
    market = market_at(store, assets, instruments, snap)
    list(aggregates_equal_full_pass(store, idx, market, len(accounts), snap))


@SETTINGS
@given(worlds(n_accounts=st.integers(1, 6)), st.sampled_from(sorted(set(SPEC) - {BTC_CALL})),
       dec(0.5, 1.5, 4))
def test_trigger_candidates_equal_breaches_after_one_move(world, i, move):
    # Trigger prices are liquidation prices with the rest of the account fixed, so after
    # only instrument i moves, candidates(i, mark) = the holders of i that breach at the
    # new mark (cross: equity < MM; isolated: iso + upnl < MM), by the exact reference.
    # A holder already in breach at the start has its trigger all the same (it was
    # +inf long / -inf short, "any tick finds it", which a search between two marks never
    # did): it is a candidate when it breaches at the new mark, like every other.
    # Holders within TOL of the boundary (start or end), and accounts with an option on
    # i (its requirement moves with i too), are left out. Options have no liquidation
    # price by rule, so their holders never have a trigger: the incremental tick that
    # follows candidates() in the worker is what finds them (not checked here).
    assets, instruments, accounts, slots = world
    store = build(assets, instruments, accounts, slots)
    snap0 = store.price_snapshot()
    margin.full_pass(store, 0, snap0)
    idx = margin.HolderIndex(store, 0)
    idx.refresh(snap0)
    idx.refresh_triggers(i, snap0)
    store.publish_mark(i, float(snap0.marks[i]) * move)
    snap = store.price_snapshot()
    got = set(idx.candidates(i, float(snap.marks[i])).tolist())
    start = market_at(store, assets, instruments, snap0)
    market = market_at(store, assets, instruments, snap)

    def margin_left(mkt: ref.RefMarket, acct: ref.RefAccount, slot: int) -> Fraction:
        pos, e = acct.positions[slot], ref.account_figures(mkt, acct, prices=False)
        if pos.mode == ref.CROSS:
            return e.cross_equity_usd - e.cross_mm_usd
        ins, v = mkt.instruments[i], e.positions[slot]
        return (Fraction(pos.isolated_margin, mkt.assets[ins.settle].scale) + v.upnl - v.mm) \
            * mkt.assets[ins.settle].price

    for r in range(len(accounts)):
        acct = ref.account_from_store(store, r)
        slot = next((k for k, p in enumerate(acct.positions) if p.instrument == i and p.qty != 0), None)
        if slot is None:
            assert r not in got
            continue
        if any(market.instruments[p.instrument].underlying == i for p in acct.positions):
            continue
        tol = Fraction(TOL) * max(1, acct_magnitude(market, acct), acct_magnitude(start, acct))
        before, after = margin_left(start, acct, slot), margin_left(market, acct, slot)
        if abs(before) <= tol or abs(after) <= tol:
            continue
        expect = after < 0
        assert (r in got) == expect, (acct.positions[slot], float(before), float(after))


@st.composite
def orders(draw):
    world = draw(worlds())
    assets, instruments, accounts, slots = world
    row = draw(st.integers(0, len(accounts) - 1))
    acc = accounts[row]
    held = {p[0]: p[2] for p in acc["positions"] if p[2] != 0}
    i = draw(st.sampled_from(sorted(held) if held and draw(st.booleans()) else sorted(SPEC)))
    shape = draw(st.sampled_from(["add", "reduce", "flip", "small-flip", "close", "any"])) \
        if i in held else "any"
    if shape == "any":
        dq = draw(st.integers(1, 10**6)) * draw(st.sampled_from([1, -1]))
    else:
        q = held[i]
        sign = int(math.copysign(1, q))
        dq = {"add": sign * draw(st.integers(1, abs(q))),
              "reduce": -sign * max(1, abs(q) // draw(st.integers(1, 4))),
              "flip": -2 * q - sign,                        # |q + dq| > |q|, sign changes
              "small-flip": -q - sign * max(1, abs(q) // 2),  # |q + dq| < |q|, sign changes
              "close": -q}[shape]
    price = instruments[i].mark_price * draw(dec(0.9, 1.1, 4))
    if draw(st.booleans()):
        _decision_near_boundary(draw, assets, instruments, acc, slots, i, dq, price)
    return world, row, i, dq, price


def _decision_near_boundary(draw, assets, instruments, acc, slots, i, dq, price) -> None:
    """Move the USDT balance so the order's margin left (cross: post equity - post IM;
    isolated: free cross margin - lacking IM) is a small signed fraction of the post IM."""
    market = ref.market_from_engine(assets, instruments, [x.mark_price for x in instruments])
    racct = _ref_account(acc)
    code, post_eq, post_im = ref.pretrade_check(market, racct, slots, i, dq, price)
    if code == ref.POSITION_SLOTS_FULL:
        return
    # cross: post_eq - post_im; isolated: (eq - IM) - lack px, which is the same expression
    # of the post figures (post_eq = eq + (iso + upnl + pnl) px, post_im = IM + IM_new px)
    left = post_eq - post_im
    aim = post_im * Fraction(draw(st.sampled_from([-0.05, -1e-4, -1e-6, 1e-6, 1e-4, 0.05])))
    usdt = market.assets[USDT]
    old = acc["balances"].get(USDT, 0)
    old_usd = Fraction(old, usdt.scale) * usdt.price * ((1 - usdt.haircut) if old > 0 else 1)
    want = old_usd - left + aim
    factor = (1 - usdt.haircut) if want > 0 else 1
    acc["balances"][USDT] = round(want / (usdt.price * factor) * usdt.scale)


@SETTINGS
@given(orders())
def test_pretrade_check_matches_reference(order):
    (assets, instruments, accounts, slots), row, i, dq, price = order
    store = build(assets, instruments, accounts, slots)
    market = market_at(store, assets, instruments)
    acct = ref.account_from_store(store, row)
    got = margin.pretrade_check(store, row, i, dq, price)
    code, post_eq, post_im = ref.pretrade_check(market, acct, slots, i, dq, price)
    note(f"kernel {got}, reference {(code, float(post_eq), float(post_im))}")
    mag = acct_magnitude(market, acct)
    ins = market.instruments[i]
    # add the order's own terms to the magnitude
    mag += abs(Fraction(dq, ins.qty_scale)) * ins.contract_size * market.assets[ins.settle].price * (
        (1 / Fraction(price) + 1 / market.marks[i]) if ins.kind in ref.INVERSE_KINDS
        else (Fraction(price) + market.marks[i] + (market.marks[ins.underlying] if ins.kind == ref.OPTION else 0)))
    if code == ref.POSITION_SLOTS_FULL or int(got.code) == ref.POSITION_SLOTS_FULL:
        assert int(got.code) == code
        return
    assert close(got.post_equity_usd, post_eq, mag)
    assert close(got.post_initial_margin_usd, post_im, mag)
    slot = next((k for k, p in enumerate(acct.positions) if p.instrument == i), None)
    q_old = Fraction(acct.positions[slot].qty if slot is not None else 0)
    reducing = abs(q_old + dq) <= abs(q_old) and (q_old + dq) * q_old >= 0
    if not reducing:
        # margin left: cross, post_eq - post_im; isolated, (equity - IM) - lack px, which
        # is the same expression of the post figures. Skip what float64 cannot resolve.
        assume(abs(post_eq - post_im) > Fraction(TOL) * max(1, mag))
    assert int(got.code) == code


# --------------------------------------------------------------------------- found by the above
def test_tick_of_underlying_updates_short_option_requirement():
    """ALICE_10K_USDT_SHORT_1_BTC_CALL: 10 000 USDT, short 1 BTC-C (cs 1) in cross, option mark
    1 000; the underlying BTCUSDT moves 50 000 -> 60 000 and ticks; the option does not tick.

    Full pass: MM = |q| cs S mmr = 1 * 1 * 60 000 * 5 % = 3 000, IM = 60 000 * 10 % = 6 000;
    the tick of the underlying alone must give the same (it re-ticks the option's holders),
    not the stale MM = 50 000 * 5 % = 2 500, IM = 5 000.
    """
    assets = [Asset("USDT", 0, 10**6, 1.0, 0.0)]
    tiers = derive_tiers([{"floor": 0.0, "imr": 0.1, "mmr": 0.05}])
    instruments = [
        Instrument("BTCUSDT", 0, Kind.PERP, "USDT", 1.0, 1000, 100, 0.01, 0.001, tiers, mark_price=50_000.0),
        Instrument("BTC-C", 1, Kind.OPTION, "USDT", 1.0, 100, 100, 0.01, 0.01, tiers, mark_price=1_000.0,
                   underlying="BTCUSDT", strike=50_000.0, expiry_ns=1),
    ]
    store = Store.create(None, assets=assets, instruments=instruments, accounts_capacity=1,
                         n_partitions=1, slots_per_account=2)
    row = store.add_account(1)
    store.set_balance(row, 0, 10_000 * 10**6)
    store.set_position(row, 1, -100, -1_000 * 10**6)          # short 1 option sold at 1 000
    snap0 = store.price_snapshot()
    margin.full_pass(store, 0, snap0)
    idx = margin.HolderIndex(store, 0)
    idx.refresh(snap0)
    store.publish_mark(0, 60_000.0)
    idx.tick(0, store.price_snapshot(), np.empty(4, np.int64))
    ticked = tuple(float(x) for x in idx.agg[row - idx.row_base, 1:3])    # IM, MM
    full = margin.account_detail(store, row)
    assert (full.cross_im_usd, full.cross_mm_usd) == (pytest.approx(6_000.0), pytest.approx(3_000.0))
    assert ticked == (pytest.approx(6_000.0), pytest.approx(3_000.0))   # not the stale (5 000, 2 500)
