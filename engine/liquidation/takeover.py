"""Takeovers: where a liquidation goes when the open market did not take it.

A liquidation order is immediate-or-cancel at the position's bankruptcy price
(``decide``). An account still in breach ``after_ms`` after its orders, none of them
answered by a fill, is *taken over*: its worker decides the orders again and hands each
to the fills gateway, which plans it here and books the result as fills between the
account and its counterparties (journaled and applied like the matching engine's
fills: money is conserved, a restart replays them). Routes, in order, for an order of
``x`` units (the account's signed quantity: ``x < 0`` sells a long) at mark ``m`` and
limit ``B`` (the bankruptcy price, the worst price the account may get):

1. **Backstop liquidity providers** (``backstop_accounts``, in the configured order)
   take it at a discount ``d`` to the mark, never past ``B``::

       sell (x < 0):  price = max(B, floor(m (1 - d) ps))   taken only if price <= m ps
       buy  (x > 0):  price = min(B, ceil(m (1 + d) ps))    taken only if price >= m ps

   (``ps`` the instrument's price scale; a provider never pays more than the mark for a
   long, nor sells a short back below it). Each takes as much as its own initial margin
   allows -- the pre-trade check of the trade at that price (``pretrade_check``) -- its
   capacity; the largest accepted quantity is found by bisection.
2. **The insurance fund** (``insurance_fund_account``) takes what is left at ``B``, as
   much as its own pre-trade check accepts. The account ends at zero equity on that
   position; the fund carries the loss between ``B`` and the mark (its deficit cover).
3. **Auto-deleveraging** (``adl``), only for an order of an account below bankruptcy
   (reason 6003): what is left is closed against the opposite positions of the other
   accounts at ``B``, highest ranked first. The rank of a position with unrealized PnL
   ``u`` on entry value ``|c|``, notional ``N`` (USD) and equity ``E`` (its account's
   cross equity, or for an isolated position its margin plus ``u``, in USD)::

       r = u / |c|                      (profit ratio)
       L = N / E                        (effective leverage)
       score = r L  if r > 0, else r / L;   accounts with E <= 0 last

   (the ranking the large venues publish). Each gives at most its whole position.

Nothing here writes the book: ``plan`` reads it (consistent copies of the accounts it
checks, a numpy scan of the positions for ADL) and returns the fills to book.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from engine.codes import Code
from engine.instruments import Kind
from engine.risk.margin import pretrade_check_consistent
from engine.store.layout import AccountFlag, Mode
from engine.store.shm import PriceSnapshot, Store, StoreError

MAX_BACKSTOP_ACCOUNTS = 64
TAKEOVER_PREFIX = b"T"       # a worker's takeover request on the internal replies socket: b"T" +
                             # msgpack (never a message: 0x54 is a msgpack integer, a message a map)
MAX_ADL_LEGS = 1000          # counterparties one plan deleverages (one FILL batch holds 4,096); the
                             # rest is left for the account's next takeover


class Route(enum.IntEnum):
    BACKSTOP = 1
    INSURANCE_FUND = 2
    ADL = 3


ROUTE_CODE = {Route.BACKSTOP: Code.TAKEN_BY_BACKSTOP, Route.INSURANCE_FUND: Code.TAKEN_BY_INSURANCE_FUND,
              Route.ADL: Code.AUTO_DELEVERAGED}


@dataclass(frozen=True)
class TakeoverPolicy:
    """``[liquidation]`` of the configuration (docs/configuration.md)."""

    insurance_fund_account: int = 0            # account id of the fund; 0: no fund
    backstop_accounts: tuple[int, ...] = ()    # backstop liquidity providers' account ids, tried in order
    backstop_discount: float = 0.005           # fraction of the mark a provider is given (0.005 = 0.5 %)
    adl: bool = True                           # auto-deleverage what neither takes (below bankruptcy only)
    after_ms: int = 1000                       # an order unanswered this long is taken over

    def __post_init__(self):
        if self.insurance_fund_account < 0 or any(a <= 0 for a in self.backstop_accounts):
            raise ValueError("takeover accounts: positive account ids (fund: 0 for none)")
        if len(self.backstop_accounts) > MAX_BACKSTOP_ACCOUNTS:
            raise ValueError(f"backstop_accounts: at most {MAX_BACKSTOP_ACCOUNTS}")
        if self.insurance_fund_account in self.backstop_accounts:
            raise ValueError("the insurance fund's account cannot be a backstop provider too")
        if len(set(self.backstop_accounts)) != len(self.backstop_accounts):
            raise ValueError("backstop_accounts: an account listed twice")
        if not 0 <= self.backstop_discount < 0.5:
            raise ValueError(f"backstop_discount: a fraction in [0, 0.5), got {self.backstop_discount}")
        if not 100 <= self.after_ms <= 2000:
            raise ValueError(f"after_ms: 100 .. 2000 (the market re-send is at 2,000), got {self.after_ms}")

    @property
    def enabled(self) -> bool:
        """Some route can take a position: a fund or a provider (ADL alone is never
        reached: it follows the fund)."""
        return bool(self.insurance_fund_account or self.backstop_accounts)

    @property
    def role_accounts(self) -> frozenset[int]:
        """Accounts never taken over (their orders go to the market only)."""
        return frozenset((self.insurance_fund_account, *self.backstop_accounts)) - {0}

    def as_args(self) -> list[str]:
        """The command-line form the supervisor passes to the gateway and the workers."""
        return ["--takeover", ",".join(map(str, (self.insurance_fund_account, self.backstop_discount,
                                                 int(self.adl), self.after_ms, *self.backstop_accounts)))]

    @classmethod
    def from_arg(cls, s: str) -> "TakeoverPolicy":
        f = s.split(",")
        return cls(int(f[0]), tuple(int(x) for x in f[4:]), float(f[1]), bool(int(f[2])), int(f[3]))


@dataclass(frozen=True)
class TakeoverLeg:
    """One fill to book: ``counterparty`` (an account id) takes ``-qty_units`` at
    ``price_units``; the liquidated account trades ``qty_units``."""

    route: Route
    counterparty: int
    qty_units: int
    price_units: int


def _capacity(store: Store, row: int, instrument: int, qty_units: int, price: float,
              snap: PriceSnapshot) -> int:
    """The largest ``0 <= k <= |qty_units|`` for which trading ``sign(qty_units) k`` at
    ``price`` passes account ``row``'s pre-trade check *and* leaves its post-trade
    equity at or above its post-trade initial margin -- also for a trade that only
    reduces a position, which the order check always lets through: a fund short the
    instrument buying at a price above the mark loses on every unit (a review's fund,
    short 300 with 150 USDT, took them all at 92,000 against a mark of 91,000 and ended at
    -150). Each step is the order-check gateway's own check on a consistent copy of the
    row (``pretrade_check_consistent``; a row mid-write fails it). Bisection; it only
    ever returns a size that passed."""
    sign, hi = (1 if qty_units > 0 else -1), abs(qty_units)

    def ok(k: int) -> bool:
        r = pretrade_check_consistent(store, row, instrument, sign * k, price, snap)
        return r.code == Code.OK and r.post_equity_usd >= r.post_initial_margin_usd
    if ok(hi):
        return hi
    lo = 0                       # invariant: ok(lo) (0 trivially), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def backstop_price(mark: float, ps: int, qty_units: int, limit_units: int, discount: float) -> int | None:
    """A provider's price for the account's order of ``qty_units`` (module doc, route 1),
    in price units; None when the limit is past the mark (no discount possible)."""
    mark_units = mark * ps
    if qty_units < 0:
        p = max(limit_units, math.floor(mark * (1.0 - discount) * ps))
        return p if p <= mark_units else None
    p = min(limit_units, math.ceil(mark * (1.0 + discount) * ps))
    return p if p >= mark_units else None


def adl_ranking(store: Store, snap: PriceSnapshot, instrument: int, side: int,
                exclude_rows: frozenset[int] | set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The positions ADL would close for an order on ``instrument`` whose sign is
    ``side`` (the counterparties hold positions of that sign): ``(rows, qty_units,
    score)``, best first (module doc). Left out: ``exclude_rows`` (the liquidated
    account, the fund, the providers, accounts with takeover legs not yet applied) and
    accounts with a liquidation of their own outstanding (their own orders' fills may
    still move that position). A numpy scan of every position slot (~10 ms at 1M
    accounts): ADL is rare."""
    ins = store.instruments[instrument]
    per = store.slots_per_account
    pos = store.positions
    sel = np.flatnonzero((pos["instrument"] == instrument) & (np.sign(pos["qty"]) == side))
    rows = sel // per
    keep = (sel % per < store.accounts["n_positions"][rows]) \
        & (store.accounts["flags"][rows] & int(AccountFlag.LIQUIDATION_OUTSTANDING) == 0)
    if exclude_rows:
        keep &= ~np.isin(rows, np.fromiter(exclude_rows, np.int64, len(exclude_rows)))
    sel, rows = sel[keep], rows[keep]
    if not len(sel):
        return rows, np.zeros(0, np.int64), np.zeros(0)
    p = pos[sel]
    kind, cs = Kind(int(ins["kind"])), float(ins["contract_size"])
    settle = int(ins["settle_asset"])
    scale, px = float(snap.asset_scale[settle]), float(snap.asset_px[settle])
    mark = float(snap.marks[instrument])
    q = p["qty"] / float(ins["qty_scale"])
    c = p["cost"] / scale
    if kind.is_inverse:
        upnl, notional = c - q * cs / mark, np.abs(q) * cs / mark
    else:
        under = float(snap.marks[int(ins["underlying"])]) if kind == Kind.OPTION else mark
        upnl, notional = q * cs * mark - c, np.abs(q) * cs * under
    entry = np.where(c != 0, np.abs(c), notional)
    ratio = np.divide(upnl, entry, out=np.zeros_like(upnl), where=entry > 0)
    iso = p["mode"] == int(Mode.ISOLATED)
    equity = np.where(iso, (p["isolated_margin"] / scale + upnl) * px, store.accounts["cross_equity_usd"][rows])
    lev = np.divide(notional * px, equity, out=np.full_like(upnl, np.inf), where=equity > 0)
    score = np.where(ratio > 0, ratio * lev, np.divide(ratio, lev, out=np.zeros_like(ratio), where=lev > 0))
    score = np.where(equity > 0, score, -np.inf)
    order = np.lexsort((rows, -score))             # best score first; ties: lower row
    return rows[order], p["qty"][order].astype(np.int64), score[order]


def plan(store: Store, snap: PriceSnapshot, row: int, instrument: int, qty_units: int, limit_units: int,
         reason: int, policy: TakeoverPolicy, busy: frozenset[int] | set[int] = frozenset()
         ) -> tuple[list[TakeoverLeg], int]:
    """The fills that take over the liquidation order ``qty_units`` of account ``row`` in
    ``instrument``, limited at ``limit_units`` (module doc), and the size they were
    planned for. The order is first held to what the account holds now (a fill may have
    shrunk it since it was decided): an order that no longer reduces the position gives
    no legs. Legs cover at most that size; what no route takes is left (the worker
    re-sends it to the market). ``busy``: rows with takeover legs routed and not yet
    applied (the caller's): never counterparties, since the book does not show those
    legs yet (two plans in one gateway turn booked the same fund margin twice in a
    review), and a liquidated account among them gets nothing until they are applied."""
    if qty_units == 0 or row in busy:
        return [], 0
    try:
        acct, slots = store.read_account(row)          # consistent copy, used slots only
    except StoreError:
        return [], 0
    held = next((int(s["qty"]) for s in slots if int(s["instrument"]) == instrument), 0)
    if held == 0 or (held > 0) == (qty_units > 0):
        return [], 0
    left = size = min(abs(qty_units), abs(held))
    side = 1 if qty_units > 0 else -1
    ps = int(store.instruments[instrument]["price_scale"])
    mark = float(snap.marks[instrument])
    legs: list[TakeoverLeg] = []
    own = int(acct["account_id"])

    price = backstop_price(mark, ps, qty_units, limit_units, policy.backstop_discount)
    for acct_id in policy.backstop_accounts:
        if left == 0 or price is None:
            break
        r = store.row_of(acct_id)
        if r is None or acct_id == own or r in busy:
            continue
        k = _capacity(store, r, instrument, -side * left, price / ps, snap)
        if k:
            legs.append(TakeoverLeg(Route.BACKSTOP, acct_id, side * k, price))
            left -= k

    fund = policy.insurance_fund_account
    if left and fund and fund != own and (r := store.row_of(fund)) is not None and r not in busy:
        k = _capacity(store, r, instrument, -side * left, limit_units / ps, snap)
        if k:
            legs.append(TakeoverLeg(Route.INSURANCE_FUND, fund, side * k, limit_units))
            left -= k

    if left and policy.adl and reason == Code.LIQ_BELOW_BANKRUPTCY:
        roles = {r for a in policy.role_accounts if (r := store.row_of(a)) is not None}
        rows, qty, _ = adl_ranking(store, snap, instrument, side, {row, *roles, *busy})
        ids = store.accounts["account_id"]
        for n, (r, q) in enumerate(zip(rows.tolist(), qty.tolist())):
            if left == 0 or n == MAX_ADL_LEGS:
                break
            k = min(left, abs(q))
            legs.append(TakeoverLeg(Route.ADL, int(ids[r]), side * k, limit_units))
            left -= k
    return legs, size
