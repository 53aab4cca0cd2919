"""Partial liquidation: the least quantity that brings an account back to a healthy ratio.

Closing ``x`` contracts of a position at the mark leaves equity ``E`` unchanged (the
unrealized PnL becomes realized) and lowers the requirement, so the rule is solved on
the requirement alone (but for haircuts, below). With ``h`` the health factor (``E >=
h * MM`` is healthy; the default 1.25 is a margin ratio MM/E of 0.8), ``M_o`` the
requirement of everything else and the position's tiered requirement ``MM(n) = px_s (n
mmr_k - maint_k)`` at notional ``n``, the largest notional the position may keep is,
tier by tier from the top::

    n_k = (E / h - M_o + px_s maint_k) / (px_s mmr_k)     valid when n_k >= floor_k
    n*  = min(n_k, floor_(k+1)) for the highest valid tier k

and the quantity to close is ``|q| - n*/(cs p)`` (linear) or ``|q| - n* p / cs``
(inverse), rounded up to a whole quantity unit; ``p`` is the mark, the underlying's mark
for an option (whose notional is priced at it). Positions are taken largest
requirement first until the account is healthy. Below bankruptcy (``E < 0``) every
position of the breached scope is closed in full. The order's limit price is the
position's bankruptcy price (no worse for the insurance fund), rounded to the
instrument's price unit away from the account's favour and held to 1..2**63-1 price
units (an account whose equity nearly cancels its position's value has a bankruptcy
price past any int64: its sell is limited at 2**63-1, which no book fills).

Haircuts: a cross position's profit, once realized, counts at ``1 - haircut`` of its
settle asset (a positive balance is haircut, unrealized PnL is not). Realizing ``r > 0``
into the settle balance ``b_s`` costs ``cost(r) = haircut_s px_s max(0, min(r, b_s +
r))`` of equity. So each cross position is solved on ``E - cost(upnl)`` (all its profit
realized), and after its order ``E`` drops by the cost of the profit it realizes (``b_s``
grows by it): the least quantity for this conservative equity (exact when the haircut
is 0 or the position is at a loss; a loss realized into a haircut balance raises the
true equity, which the rule does not count). Cross positions are taken by benefit ``h
MM_usd - cost(upnl)``, largest first; those whose closing would cost at least what it
frees (benefit <= 0) last, largest requirement first. With no haircut the benefit is
``h MM_usd``: largest requirement first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine import _margin
from engine.codes import Code
from engine.instruments import Kind
from engine.risk.margin import AccountDetail, _checked_snapshot, account_detail
from engine.store.layout import Mode, Status
from engine.store.shm import PriceSnapshot, Store

DEFAULT_HEALTH_FACTOR = 1.25
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class _Params:
    """An instrument's static parameters as plain Python numbers (read once per store)."""

    inverse: bool
    cs: float
    qs: int
    ps: int
    settle: int
    notional_of: int        # instrument whose mark prices the notional: the underlying for options
    floors: tuple[float, ...]
    mmrs: tuple[float, ...]
    maints: tuple[float, ...]


def _params(store: Store) -> list[_Params]:
    cached = store.__dict__.get("_liq_params")
    if cached is None:
        cached = []
        for r in store.instruments:
            n = int(r["n_tiers"])
            i = len(cached)
            under = int(r["underlying"]) if Kind(int(r["kind"])) == Kind.OPTION else i
            cached.append(_Params(Kind(int(r["kind"])).is_inverse, float(r["contract_size"]),
                                  int(r["qty_scale"]), int(r["price_scale"]), int(r["settle_asset"]), under,
                                  tuple(r["tier_floor"][:n].tolist()), tuple(r["tier_mmr"][:n].tolist()),
                                  tuple(r["tier_maint_amount"][:n].tolist())))
        store.__dict__["_liq_params"] = cached
    return cached


@dataclass(frozen=True)
class LiquidationOrder:
    row: int
    account_id: int
    instrument: int
    qty_units: int          # signed order quantity: opposite sign to the position
    limit_price: float      # quote per base
    limit_price_units: int  # price units (1/price_scale)
    reason: Code


def _close_qty_contracts(ins: _Params, q: float, p: float, px_s: float, e_usd: float,
                         m_other_usd: float, h: float) -> float:
    """Contracts to close so that ``e >= h * (m_other + MM_position(|q| - x))`` (see module doc)."""
    n_tiers = len(ins.floors)
    budget = e_usd / h - m_other_usd
    n_keep = 0.0
    for k in range(n_tiers - 1, -1, -1):
        nk = (budget + px_s * ins.maints[k]) / (px_s * ins.mmrs[k])
        if nk >= ins.floors[k]:
            upper = ins.floors[k + 1] if k + 1 < n_tiers else math.inf
            n_keep = max(0.0, min(nk, upper))
            break
    keep = n_keep * p / ins.cs if ins.inverse else n_keep / (ins.cs * p)
    return max(0.0, abs(q) - keep)


def decide(store: Store, row: int, snap: PriceSnapshot, *, health_factor: float = DEFAULT_HEALTH_FACTOR,
           detail: AccountDetail | None = None) -> list[LiquidationOrder]:
    """The orders that bring account ``row`` back to health at ``snap`` (empty when healthy).

    Runs the rule in C (``_margin.decide_orders``, one call); ``decide_reference`` is the
    same rule in Python, used when the kernel declines (a number out of its range) or a
    precomputed ``detail`` is given. The tests hold the two to the same orders.
    """
    if detail is None:
        if not 0 <= row < store.accounts_cap:
            raise ValueError(f"account row {row} outside 0..{store.accounts_cap - 1}")
        snap = _checked_snapshot(store, snap)
        out = store.__dict__.get("_liq_out")
        if out is None:
            out = store.__dict__["_liq_out"] = np.zeros((store.slots_per_account, 4), np.int64)
        n = _margin.decide_orders(store.addr(store.instruments), store.addr(store.accounts, row),
                                  store.addr(store.positions, row * store.slots_per_account), snap.marks,
                                  snap.asset_px, snap.asset_haircut, snap.asset_scale, float(health_factor), out)
        if n >= 0:
            acct_id = int(store.accounts[row]["account_id"])
            ps = _params(store)
            return [LiquidationOrder(row, acct_id, i, q, lu / ps[i].ps, lu, Code(reason))
                    for i, q, lu, reason in out[:n].tolist()]
    return decide_reference(store, row, snap, health_factor=health_factor, detail=detail)


def decide_reference(store: Store, row: int, snap: PriceSnapshot, *,
                     health_factor: float = DEFAULT_HEALTH_FACTOR,
                     detail: AccountDetail | None = None) -> list[LiquidationOrder]:
    """``decide`` in Python: the reference of ``_margin.decide_orders`` (module doc)."""
    d = detail or account_detail(store, row, snap)
    acct_id = int(store.accounts[row]["account_id"])
    orders: list[LiquidationOrder] = []
    slots = store.slots(row)
    params = _params(store)

    def order(pos, qty_contracts: float, reason: Code, bankruptcy: float | None) -> None:
        i = pos.instrument
        qs, ps = params[i].qs, params[i].ps
        units = min(abs(pos.qty_units), INT64_MAX, max(1, math.ceil(qty_contracts * qs - 1e-9)))
        side = -1 if pos.qty_units > 0 else 1          # sell a long, buy back a short
        mark = float(snap.marks[i])
        limit = bankruptcy if bankruptcy is not None else mark
        # A sell may not fill below the bankruptcy price: round up; a buy: round down.
        # Held to 1..2**63-1 units (the wire's int64): past it, a sell no book fills.
        x = limit * ps - 1e-9 if side < 0 else limit * ps + 1e-9
        if not x < 2.0**63:
            limit_units = INT64_MAX if x == x else 1
        else:
            limit_units = max(1, math.ceil(x) if side < 0 else math.floor(x))
        orders.append(LiquidationOrder(row, acct_id, i, side * units, limit_units / ps, limit_units, reason))

    # Isolated positions: each is its own scope.
    for pos in d.positions:
        if pos.mode != Mode.ISOLATED:
            continue
        ins = params[pos.instrument]
        iso = int(slots[pos.slot]["isolated_margin"]) / float(snap.asset_scale[ins.settle])
        e = iso + pos.unrealized_pnl
        if e >= pos.maintenance_margin or pos.maintenance_margin <= 0:
            continue
        q = pos.qty_units / ins.qs
        if e < 0:
            order(pos, abs(q), Code.LIQ_BELOW_BANKRUPTCY, pos.bankruptcy_price)
        else:
            x = _close_qty_contracts(ins, q, float(snap.marks[ins.notional_of]), 1.0, e, 0.0, health_factor)
            order(pos, x, Code.LIQ_ISOLATED_BELOW_MAINTENANCE, pos.bankruptcy_price)

    if not d.status & Status.LIQUIDATABLE:
        return orders
    cross = [p for p in d.positions if p.mode == Mode.CROSS and p.qty_units != 0]
    e = d.cross_equity_usd
    if e < 0:
        for pos in cross:
            order(pos, abs(pos.qty_units) / params[pos.instrument].qs, Code.LIQ_BELOW_BANKRUPTCY,
                  pos.bankruptcy_price)
        return orders
    m_total = d.cross_mm_usd
    px = snap.asset_px.tolist()
    haircut = snap.asset_haircut.tolist()
    acct_row = store.accounts[row]
    bal = [int(acct_row["balance"][a]) / float(snap.asset_scale[a]) for a in range(len(px))]

    def cost(s_a: int, r: float) -> float:
        """Equity realizing ``r`` into settle asset ``s_a``'s balance takes (module doc)."""
        return haircut[s_a] * px[s_a] * max(0.0, min(r, bal[s_a] + r))

    def rank(pos) -> tuple[int, float]:
        s_a = params[pos.instrument].settle
        mm_usd = pos.maintenance_margin * px[s_a]
        benefit = health_factor * mm_usd - cost(s_a, pos.unrealized_pnl)
        return (0, -benefit) if benefit > 0 else (1, -mm_usd)

    for pos in sorted(cross, key=rank):
        if e >= health_factor * m_total:
            break
        ins = params[pos.instrument]
        s_a = ins.settle
        px_s, up = px[s_a], pos.unrealized_pnl
        q = pos.qty_units / ins.qs
        m_pos = pos.maintenance_margin * px_s
        x = _close_qty_contracts(ins, q, float(snap.marks[ins.notional_of]), px_s, e - cost(s_a, up),
                                 m_total - m_pos, health_factor)
        if x <= 0:
            continue
        order(pos, x, Code.LIQ_BELOW_MAINTENANCE, pos.bankruptcy_price)
        # Requirement left by this position after the close (at the mark).
        kept = max(0.0, abs(q) - abs(orders[-1].qty_units) / ins.qs)
        m_total = m_total - m_pos + px_s * _mm_at(ins, kept, float(snap.marks[ins.notional_of]))
        r = up * (1.0 - kept / abs(q))                                # realized at the mark
        e -= cost(s_a, r)                                             # 0 for a loss
        bal[s_a] += r
    return orders


def _mm_at(ins: _Params, q_abs: float, p: float) -> float:
    """Tiered maintenance requirement of ``q_abs`` contracts at mark ``p`` (settle asset)."""
    n = q_abs * ins.cs / p if ins.inverse else q_abs * ins.cs * p
    k = 0
    for t in range(1, len(ins.floors)):
        if ins.floors[t] <= n:
            k = t
    return n * ins.mmrs[k] - ins.maints[k]
