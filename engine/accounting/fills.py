"""Fill application: the checked Python API over ``engine._fills`` and its plain-Python reference.

One trade has two legs, one per account, with opposite signed sizes ``δ`` at the same
price ``P``. Each leg, in its instrument's settle asset (all integers; ``rhe`` rounds
half to even; ``cs = num/den`` exactly, ``den = 10**k``, ``k <= 8``; ``S`` settle units
per asset)::

    V = rhe(|δ| P cs S / (qty_scale price_scale))      linear (perp, future, option)
    V = rhe(|δ| cs S price_scale / (qty_scale P))      inverse

    open / increase:  c += s(δ) V;  q += δ
    reduce / flip:    m = min(|δ|, |q|)
                      V_close = V if m == |δ| else rhe(V m / |δ|);  V_open = V - V_close
                      cost_removed = c if m == |q| else rhe(c m / |q|)
                      realized = s(q) V_close - cost_removed     (linear)
                      realized = cost_removed - s(q) V_close     (inverse)
                      c -= cost_removed;  q -= s(q) m
                      |δ| > m:  c += s(δ) V_open;  q += s(δ) (|δ| - m)
    cross:     balance[settle] += realized - fee - iso_delta
    isolated:  balance[settle] += -fee - iso_delta;  isolated_margin += realized
    fee_pool[settle] += fee;  isolated_margin += iso_delta
    full close: balance[settle] += isolated_margin left (below 0 only past bankruptcy)
    auto funding (``auto_fund``, iso_delta == 0, a leg opening, increasing or flipping an
    isolated non-option position; a reduce is left alone):
        N = V(|q|) at P;  IM = ceil(N imr_k - init_amount_k S), tier k the last with
        floor_k <= N/S (the float64 tier columns taken exactly);
        equity = isolated_margin + s(q) N - c  (linear;  + c - s(q) N  inverse)
        t = max(0, IM - equity);  isolated_margin += t;  balance[settle] -= t

so that ``sum(balance) + sum(isolated_margin) + fee_pool - sum(cost)`` (linear; ``+ sum(cost)``
inverse) is unchanged, exactly, by the two legs of a trade: each leg moves it by
``-s(δ) V`` (inverse ``+s(δ) V``; the auto funding moves ``t`` from balance to isolated
margin, inside the sum). The workers apply wire fills (which carry no isolated margin)
with auto funding, and so does the journal replay; ``auto_fund`` defaults to False in
this API, so explicit-``iso_delta`` callers see the rule of old. The kernel's module docstring (ext/_fills.pyx) has the
proof and the order of the checks.

``apply_fill_leg`` / ``apply_fill_legs`` check every argument and return a reject code
for bad input (never raise for it); ``reference_apply_leg`` is the same rule on Python
ints and ``Fraction`` -- the oracle the kernel is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral

import numpy as np

from engine import _fills
from engine.codes import Code
from engine.instruments import Kind
from engine.store import layout as L
from engine.store.shm import Store, StoreError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_CS_DECIMALS = 8
MODE_ACCOUNT_DEFAULT = -1
_FEE_POOL_OFFSET = L.PARTITION.fields["fee_pool"][1]


@dataclass(frozen=True)
class LegResult:
    """Outcome of one leg: ``code`` (``Code.OK`` or the reject), realized PnL and V."""

    code: Code
    realized_units: int          # settle units, signed; 0 on reject
    value_units: int             # settle units, V; 0 on reject


@dataclass(frozen=True)
class BatchResult:
    """Per-leg outcomes of ``apply_fill_legs``, index for index with its inputs."""

    codes: np.ndarray            # int32, Code numbers
    realized_units: np.ndarray   # int64
    value_units: np.ndarray      # int64

    @property
    def n_ok(self) -> int:
        return int(np.count_nonzero(self.codes == Code.OK))


@dataclass(frozen=True)
class InstrumentParams:
    """What the fill rule needs of an instrument."""

    kind: int                    # engine.instruments.Kind
    contract_size: float
    qty_scale: int               # quantity units per contract
    price_scale: int             # price units per 1 quote
    settle_scale: int            # settle units per 1 settle asset
    # (floor, imr, init_amount) per tier, float64 as stored (the isolated auto funding's IM)
    tiers: tuple[tuple[float, float, float], ...] = ((0.0, 0.0, 0.0),)

    @property
    def is_inverse(self) -> bool:
        return int(self.kind) in (Kind.INVERSE_PERP, Kind.INVERSE_FUTURE)


def instrument_params(store: Store, instrument: int) -> InstrumentParams:
    """The fill parameters of ``store.instruments[instrument]``."""
    row = store.instruments[instrument]
    nt = min(max(int(row["n_tiers"]), 1), L.MAX_TIERS)      # the kernel reads tier 0 whatever n_tiers
    tiers = tuple((float(row["tier_floor"][t]), float(row["tier_imr"][t]), float(row["tier_init_amount"][t]))
                  for t in range(nt))
    return InstrumentParams(int(row["kind"]), float(row["contract_size"]), int(row["qty_scale"]),
                            int(row["price_scale"]),
                            int(store.assets[int(row["settle_asset"])]["scale"]), tiers)


# --------------------------------------------------------------------------- reference
def _exact_decimal(cs: float) -> Fraction | None:
    """``num/10**k`` for the smallest ``k <= 8`` with ``round(cs 10**k) / 10**k == cs``."""
    for k in range(MAX_CS_DECIMALS + 1):
        den = 10**k
        num = round(cs * den)             # float product, half-even: the kernel's rint
        if 1 <= num < 2**53 and num / den == cs:
            return Fraction(num, den)
    return None


def contract_ratio(p: InstrumentParams) -> tuple[Code, Fraction | None]:
    """``K`` in lowest terms: ``cs S / (qs ps)`` linear, ``cs S ps / qs`` inverse.

    Returns ``(FILL_UNKNOWN_INSTRUMENT, None)`` when the contract size is no exact decimal
    or a part of K does not fit int64.
    """
    cs = p.contract_size
    if not (math.isfinite(cs) and cs > 0) or p.qty_scale <= 0 or p.price_scale <= 0 \
            or p.settle_scale <= 0:
        return Code.FILL_UNKNOWN_INSTRUMENT, None
    d = _exact_decimal(cs)
    if d is None:
        return Code.FILL_UNKNOWN_INSTRUMENT, None
    if p.is_inverse:
        k = d * p.settle_scale * p.price_scale / p.qty_scale
    else:
        k = d * p.settle_scale / (p.qty_scale * p.price_scale)
    if k.numerator > INT64_MAX or k.denominator > INT64_MAX:
        return Code.FILL_UNKNOWN_INSTRUMENT, None
    return Code.OK, k


@dataclass(frozen=True)
class RefLeg:
    """Outcome of ``reference_apply_leg``: the new state (the old one on reject)."""

    code: Code
    position: tuple[int, int, int, int] | None   # (mode, qty, cost, isolated_margin); None: no slot
    balance: int                 # balance[settle], settle units
    fee_pool: int                # fee_pool[settle], settle units
    realized_units: int
    value_units: int


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def _fits(x: int) -> bool:
    return INT64_MIN <= x <= INT64_MAX


def _nonneg_finite(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def reference_isolated_im(params: InstrumentParams, notional_units: int) -> tuple[Code, int]:
    """``(code, IM)``: the initial margin of an isolated position of notional
    ``notional_units`` (settle units) rounded up to a whole unit, over exact rationals:
    tier ``k`` the last with ``floor_k <= N / S`` (tier 0 when none);
    ``IM = ceil(N imr_k - init_amount_k S)`` with each float64 taken exactly.
    3004: a tier floor past the first, or the chosen tier's imr or init_amount, is not a
    finite number >= 0; 3005: ``floor(N imr_k)`` or ``floor(init_amount_k S)`` >= 2**64."""
    n, scale = notional_units, params.settle_scale
    k = 0
    for t in range(1, len(params.tiers)):
        floor = params.tiers[t][0]
        if not _nonneg_finite(floor):
            return Code.FILL_UNKNOWN_INSTRUMENT, 0
        if Fraction(floor) <= Fraction(n, scale):
            k = t
    _floor, imr, init = params.tiers[k]
    if not (_nonneg_finite(imr) and _nonneg_finite(init)):
        return Code.FILL_UNKNOWN_INSTRUMENT, 0
    a, b = n * Fraction(imr), Fraction(init) * scale
    if math.floor(a) >= 2**64 or math.floor(b) >= 2**64:
        return Code.FILL_BAD_QTY, 0
    return Code.OK, math.ceil(a - b)


def reference_apply_leg(position: tuple[int, int, int, int] | None, balance: int, fee_pool: int,
                        params: InstrumentParams, delta_units: int, price_units: int,
                        fee_units: int, *, mode: int = MODE_ACCOUNT_DEFAULT,
                        isolated_margin_delta_units: int = 0, isolated_default: bool = False,
                        slots_full: bool = False, auto_fund: bool = False) -> RefLeg:
    """Apply one leg to ``position = (mode, qty, cost, isolated_margin)`` (None: no slot).

    Same rule, same checks in the same order as the kernel (module docstring): 3005, 3006,
    3004, 1008, 3007, 3102, then 3005 for any result outside int64 (and a position of
    -2**63, whose size is not one), then the isolated auto funding's (``auto_fund``, no
    isolated margin given, an isolated non-option position left open): 3005 when the
    position's notional ``N`` leaves int64, ``reference_isolated_im``'s 3004/3005, 3005 when
    the funded balance or isolated margin leaves int64. ``slots_full``: the
    account has no free slot. The returned position is None when the leg closed it.
    """
    def reject(code: Code) -> RefLeg:
        return RefLeg(code, position, balance, fee_pool, 0, 0)

    d, price, fee, iso_delta = delta_units, price_units, fee_units, isolated_margin_delta_units
    # 1. arguments
    if d == 0 or d == INT64_MIN:
        return reject(Code.FILL_BAD_QTY)
    if price <= 0:
        return reject(Code.FILL_BAD_PRICE)
    code, k = contract_ratio(params)
    if code != Code.OK:
        return reject(code)
    if mode not in (MODE_ACCOUNT_DEFAULT, int(L.Mode.CROSS), int(L.Mode.ISOLATED)):
        return reject(Code.WIRE_BAD_VALUE)
    # 2. slot
    if position is None:
        if slots_full:
            return reject(Code.FILL_POSITION_SLOTS_FULL)
        # the account's default, but an option is cross whatever it is (module doc)
        pos_mode = (int(isolated_default and params.kind != Kind.OPTION) if mode == MODE_ACCOUNT_DEFAULT
                    else mode)
        q0 = c0 = iso0 = 0
    else:
        pos_mode, q0, c0, iso0 = position
    iso = iso0 + iso_delta
    if (pos_mode != L.Mode.ISOLATED and iso_delta != 0) or (iso_delta < 0 and iso < 0):
        return reject(Code.COLLATERAL_BAD_AMOUNT)
    # 3. value and new state
    ad = abs(d)
    if params.is_inverse:
        v = round(Fraction(ad * k.numerator, k.denominator * price))
    else:
        v = round(Fraction(ad * price * k.numerator, k.denominator))
    if v > INT64_MAX:
        return reject(Code.FILL_BAD_QTY)
    sd = _sign(d)
    realized = 0
    if q0 == 0 or _sign(q0) == sd:              # open / increase
        c, q = c0 + sd * v, q0 + d
    else:                                       # reduce / close / flip
        sq, aq = _sign(q0), abs(q0)
        m = min(ad, aq)
        v_close = v if m == ad else round(Fraction(v * m, ad))
        v_open = v - v_close
        cost_removed = c0 if m == aq else round(Fraction(c0 * m, aq))
        realized = (cost_removed - sq * v_close) if params.is_inverse else (sq * v_close - cost_removed)
        c, q = c0 - cost_removed, q0 - sq * m
        if ad > m:
            c, q = c + sd * v_open, q + sd * (ad - m)
    closed = q == 0
    if closed:
        assert c == 0, "q == 0 only on m == |q0| == |δ|, which removes all the cost"
    if pos_mode == L.Mode.ISOLATED:
        iso += realized                         # isolated PnL stays in its margin
        bal = balance - fee - iso_delta
    else:
        bal = balance + realized - fee - iso_delta
    if closed:
        bal += iso                              # the isolated margin comes home

    pool = fee_pool + fee
    if not all(_fits(x) for x in (realized, q, c, iso, bal, pool)) or q == INT64_MIN:   # |q| must fit
        return reject(Code.FILL_BAD_QTY)
    grows = q0 == 0 or (q0 > 0) == (d > 0) or (q > 0) != (q0 > 0)     # opens, increases or flips
    if auto_fund and iso_delta == 0 and pos_mode == L.Mode.ISOLATED and not closed \
            and params.kind != Kind.OPTION and grows:
        # the initial margin the position lacks at P comes from the balance (a transfer)
        if params.is_inverse:
            n = round(Fraction(abs(q) * k.numerator, k.denominator * price))
        else:
            n = round(Fraction(abs(q) * price * k.numerator, k.denominator))
        if n > INT64_MAX:
            return reject(Code.FILL_BAD_QTY)
        code, im = reference_isolated_im(params, n)
        if code != Code.OK:
            return reject(code)
        upnl = (c - _sign(q) * n) if params.is_inverse else (_sign(q) * n - c)
        transfer = max(0, im - (iso + upnl))
        iso, bal = iso + transfer, bal - transfer
        if not (_fits(iso) and _fits(bal)):
            return reject(Code.FILL_BAD_QTY)
    new_pos = None if closed else (pos_mode, q, c, iso)
    return RefLeg(Code.OK, new_pos, bal, pool, realized, v)


# --------------------------------------------------------------------------- checked API
def _int_in(x, lo: int, hi: int) -> int | None:
    """``int(x)`` when ``x`` is an integer (not bool) within ``[lo, hi]``, else None."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (Integral, np.integer)):
        return None
    x = int(x)
    return x if lo <= x <= hi else None


def _account_ok(store: Store, partition: int, row: int) -> bool:
    lo, hi = store.partition_rows(partition)
    return lo <= row < hi


def route_reject(fill: dict, n_instruments: int, taker_row: int | None, maker_row: int | None) -> Code | None:
    """The fills gateway's rule for one decoded fill before its legs are routed (and the
    journal replay's, which must reject the same fills): the instrument known (3004),
    both accounts known (3003) and different (3008), the quantity nonzero, not -2**63
    (the maker's leg, its negation, would not fit an int64) and of the taker side's sign
    (3005), the price > 0 (3006). None: route both legs, the taker's ``+qty_units`` and
    the maker's ``-qty_units``, at ``price_units``."""
    qty = fill["qty_units"]
    if fill["instrument_id"] >= n_instruments:
        return Code.FILL_UNKNOWN_INSTRUMENT
    if taker_row is None or maker_row is None:
        return Code.FILL_UNKNOWN_ACCOUNT
    if taker_row == maker_row:
        return Code.FILL_SAME_ACCOUNT
    if qty == 0 or qty == INT64_MIN or (qty > 0) != (fill["taker_side"] == "buy"):
        return Code.FILL_BAD_QTY
    if fill["price_units"] <= 0:
        return Code.FILL_BAD_PRICE
    return None


def apply_fill_leg(store: Store, partition: int, row: int, instrument: int, delta_units: int,
                   price_units: int, fee_units: int, *, mode: int | None = None,
                   isolated_margin_delta_units: int = 0, auto_fund: bool = False) -> LegResult:
    """Check one leg's arguments, then apply it with the kernel; never raise for bad input.

    Checks, in order: ``partition`` and ``row`` name a used account row of that
    partition (3003); ``instrument`` in the table (3004); ``delta_units`` an int64 (3005);
    ``price_units`` an int64 (3006); ``fee_units`` and ``isolated_margin_delta_units``
    int64 (3102); ``mode`` None (the account's default), 0 or 1 (1008). The kernel then
    checks the rule's own conditions (module docstring). The fee goes to ``partition``'s
    fee pool, written under that partition row's seqlock (the caller must not hold it).
    ``auto_fund``: a leg with ``isolated_margin_delta_units == 0`` that leaves an isolated
    position open moves into its isolated margin, from the balance, what it lacks of its
    initial margin at the trade price (the workers' rule for wire fills; module docstring).
    A rejected leg changes no byte of the store.
    """
    if store.readonly:
        raise StoreError(Code.STORE_LAYOUT_MISMATCH, "store attached read-only")

    def reject(code: Code) -> LegResult:
        return LegResult(code, 0, 0)

    p = _int_in(partition, 0, store.n_partitions - 1)
    r = _int_in(row, 0, store.accounts_cap - 1)
    if p is None or r is None or not _account_ok(store, p, r):
        return reject(Code.FILL_UNKNOWN_ACCOUNT)
    i = _int_in(instrument, 0, len(store.instruments) - 1)
    if i is None:
        return reject(Code.FILL_UNKNOWN_INSTRUMENT)
    d = _int_in(delta_units, INT64_MIN, INT64_MAX)
    if d is None:
        return reject(Code.FILL_BAD_QTY)
    px = _int_in(price_units, INT64_MIN, INT64_MAX)
    if px is None:
        return reject(Code.FILL_BAD_PRICE)
    fee = _int_in(fee_units, INT64_MIN, INT64_MAX)
    iso = _int_in(isolated_margin_delta_units, INT64_MIN, INT64_MAX)
    if fee is None or iso is None:
        return reject(Code.COLLATERAL_BAD_AMOUNT)
    m = MODE_ACCOUNT_DEFAULT if mode is None else _int_in(mode, 0, 1)
    if m is None:
        return reject(Code.WIRE_BAD_VALUE)
    prow = store.addr(store.partitions, p)
    code, realized, value = _fills.apply_leg(
        store.addr(store.instruments), store.addr(store.assets), store.addr(store.accounts, r),
        store.addr(store.positions, r * store.slots_per_account), store.slots_per_account,
        prow + _FEE_POOL_OFFSET, i, d, px, fee, m, iso, prow, bool(auto_fund))
    return LegResult(Code(code), int(realized), int(value))


def _int_array(x, n: int, lo: int, hi: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(values, ok)``: ``x`` as a C-contiguous ``dtype`` array of length ``n`` with a
    per-element mask of the entries that were integers in ``[lo, hi]``."""
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"expected a 1-D array of length {n}, got shape {a.shape}")
    if a.dtype.kind in "iu":
        ok = np.ones(n, bool)
        if a.dtype.kind == "u":
            ok &= a <= np.uint64(hi)
        else:
            ok &= (a >= lo) & (a <= hi)
    elif a.dtype == object:
        vals = [_int_in(v, lo, hi) for v in a.tolist()]
        ok = np.array([v is not None for v in vals], bool)
        a = np.array([v if v is not None else 0 for v in vals], np.int64)
    else:
        ok = np.zeros(n, bool)
    out = np.zeros(n, dtype)
    out[ok] = a[ok].astype(dtype)
    return np.ascontiguousarray(out), ok


def apply_fill_legs(store: Store, rows, instruments, deltas, prices, fees, modes=None,
                    iso_deltas=None, *, auto_fund: bool = False) -> BatchResult:
    """Apply legs in order with the kernel (one GIL release); return per-leg outcomes.

    Each argument is a 1-D integer array of one length (``modes``/``iso_deltas`` default to
    the account default / 0); ``auto_fund`` as in ``apply_fill_leg``, for every leg (the
    journal replay passes True, as the workers apply wire fills). Per leg, the same checks as ``apply_fill_leg`` (the
    partition is the account row's own); a leg failing them is not given to the kernel
    and changes nothing, the others are applied in their order. Mismatched lengths or
    shapes are a caller bug: ValueError.
    """
    if store.readonly:
        raise StoreError(Code.STORE_LAYOUT_MISMATCH, "store attached read-only")
    r_arr = np.asarray(rows)
    if r_arr.ndim != 1:
        raise ValueError(f"rows: expected a 1-D array, got shape {r_arr.shape}")
    n = r_arr.shape[0]
    codes = np.zeros(n, np.int32)
    rows_v, rows_ok = _int_array(rows, n, 0, store.accounts_cap - 1, np.int64)
    used = np.zeros(store.accounts_cap, bool)
    for p in range(store.n_partitions):
        lo, hi = store.partition_rows(p)
        used[lo:hi] = True
    rows_ok &= used[rows_v]
    ins_v, ins_ok = _int_array(instruments, n, 0, len(store.instruments) - 1, np.int32)
    d_v, d_ok = _int_array(deltas, n, INT64_MIN, INT64_MAX, np.int64)
    px_v, px_ok = _int_array(prices, n, INT64_MIN, INT64_MAX, np.int64)
    fee_v, fee_ok = _int_array(fees, n, INT64_MIN, INT64_MAX, np.int64)
    if modes is None:
        mode_v, mode_ok = np.full(n, MODE_ACCOUNT_DEFAULT, np.int32), np.ones(n, bool)
    else:
        mode_v, mode_ok = _int_array(modes, n, MODE_ACCOUNT_DEFAULT, 1, np.int32)
    if iso_deltas is None:
        iso_v, iso_ok = np.zeros(n, np.int64), np.ones(n, bool)
    else:
        iso_v, iso_ok = _int_array(iso_deltas, n, INT64_MIN, INT64_MAX, np.int64)
    # first failing check wins, in apply_fill_leg's order
    for ok, code in reversed(((rows_ok, Code.FILL_UNKNOWN_ACCOUNT),
                              (ins_ok, Code.FILL_UNKNOWN_INSTRUMENT),
                              (d_ok, Code.FILL_BAD_QTY), (px_ok, Code.FILL_BAD_PRICE),
                              (fee_ok & iso_ok, Code.COLLATERAL_BAD_AMOUNT),
                              (mode_ok, Code.WIRE_BAD_VALUE))):
        codes[~ok] = code
    good = np.flatnonzero(codes == Code.OK)
    realized = np.zeros(n, np.int64)
    value = np.zeros(n, np.int64)
    if good.size:
        k = good.size
        out_codes = np.zeros(k, np.int32)
        out_real = np.zeros(k, np.int64)
        out_val = np.zeros(k, np.int64)
        g_rows = np.ascontiguousarray(rows_v[good])
        _fills.apply_legs_batch(
            store.addr(store.instruments), store.addr(store.assets), store.addr(store.accounts),
            store.addr(store.positions), store.slots_per_account,
            store.addr(store.partitions), L.PARTITION.itemsize, _FEE_POOL_OFFSET,
            g_rows, np.ascontiguousarray(ins_v[good]), np.ascontiguousarray(d_v[good]),
            np.ascontiguousarray(px_v[good]), np.ascontiguousarray(fee_v[good]),
            np.ascontiguousarray(mode_v[good]), np.ascontiguousarray(iso_v[good]),
            out_codes, out_real, out_val, bool(auto_fund))
        codes[good] = out_codes
        realized[good] = out_real
        value[good] = out_val
    return BatchResult(codes, realized, value)
