"""Instruments, collateral assets and risk tiers ("step margin").

Risk tiers
----------
A tier list is ``[{floor, imr, mmr}, ...]`` by position notional (in the settle asset),
sorted by ``floor`` with ``floor_0 = 0``. The requirement of a position of notional
``n`` in tier ``k`` (the last tier with ``floor_k <= n``) is::

    MM = n * mmr_k - maint_amount_k
    IM = n * imr_k - init_amount_k

with the amounts derived so the requirement is continuous at every boundary::

    maint_amount_0 = 0
    maint_amount_k = maint_amount_(k-1) + floor_k * (mmr_k - mmr_(k-1))

(``init_amount`` likewise with ``imr``) -- the "maintenance amount" / "cum" column the
large venues publish.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

MAX_TIERS = 16


class Kind(enum.IntEnum):
    """Instrument kind, as stored in the shared-memory instrument table."""

    PERP = 0           # linear perpetual: PnL in the settle (quote) asset
    FUTURE = 1         # linear dated future
    OPTION = 2         # European option; premium in the settle asset per contract
    INVERSE_PERP = 3   # contract value in quote (USD); margin and PnL in the base coin
    INVERSE_FUTURE = 4

    @property
    def is_inverse(self) -> bool:
        return self in (Kind.INVERSE_PERP, Kind.INVERSE_FUTURE)

    @classmethod
    def parse(cls, name: str) -> "Kind":
        names = {"perp": cls.PERP, "future": cls.FUTURE, "option": cls.OPTION,
                 "inverse_perp": cls.INVERSE_PERP, "inverse_future": cls.INVERSE_FUTURE}
        try:
            return names[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown kind {name!r}; expected one of {sorted(names)}") from None


@dataclass(frozen=True)
class RiskTier:
    """One step of a tier table; rates are fractions (0.004 = 0.4 %)."""

    floor: float        # notional floor of the tier, settle asset
    imr: float          # initial margin rate
    mmr: float          # maintenance margin rate
    init_amount: float = 0.0   # derived, settle asset
    maint_amount: float = 0.0  # derived, settle asset


def derive_tiers(raw: list[dict], where: str = "tiers") -> tuple[RiskTier, ...]:
    """Validate ``[{floor, imr, mmr}]`` and derive the continuous tier amounts.

    Checks, in order: a non-empty list of at most ``MAX_TIERS``; every field a finite
    number; ``floor_0 == 0`` and floors strictly increasing; ``0 < mmr <= imr <= 1``;
    rates non-decreasing tier to tier. Then
    ``maint_amount_k = maint_amount_(k-1) + floor_k * (mmr_k - mmr_(k-1))`` and the same
    for ``init_amount`` with ``imr``.
    """
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError(f"{where}: must be a non-empty list of {{floor, imr, mmr}}")
    if len(raw) > MAX_TIERS:
        raise ValueError(f"{where}: at most {MAX_TIERS} tiers, got {len(raw)}")
    tiers: list[RiskTier] = []
    for i, t in enumerate(raw):
        here = f"{where}[{i}]"
        if not isinstance(t, dict):
            raise ValueError(f"{here}: must be a table with floor, imr, mmr")
        known_keys(t, ("floor", "imr", "mmr"), here)
        vals = {}
        for key in ("floor", "imr", "mmr"):
            if key not in t:
                raise ValueError(f"{here}.{key}: missing")
            vals[key] = finite_number(t[key], f"{here}.{key}")
        if i == 0 and vals["floor"] != 0:
            raise ValueError(f"{here}.floor: the first tier must start at 0")
        if not (0 < vals["mmr"] <= vals["imr"] <= 1):
            raise ValueError(f"{here}: need 0 < mmr <= imr <= 1, got mmr={vals['mmr']} imr={vals['imr']}")
        if tiers:
            prev = tiers[-1]
            if vals["floor"] <= prev.floor:
                raise ValueError(f"{here}.floor: floors must increase ({vals['floor']} <= {prev.floor})")
            if vals["mmr"] < prev.mmr or vals["imr"] < prev.imr:
                raise ValueError(f"{here}: rates must not decrease from tier to tier")
            maint = prev.maint_amount + vals["floor"] * (vals["mmr"] - prev.mmr)
            init = prev.init_amount + vals["floor"] * (vals["imr"] - prev.imr)
        else:
            maint = init = 0.0
        tiers.append(RiskTier(vals["floor"], vals["imr"], vals["mmr"], init, maint))
    return tuple(tiers)


def tier_of(tiers: tuple[RiskTier, ...], notional: float) -> RiskTier:
    """Return the last tier whose floor is at or below ``notional``."""
    chosen = tiers[0]
    for t in tiers:
        if t.floor <= notional:
            chosen = t
    return chosen


@dataclass(frozen=True)
class Asset:
    """A collateral asset: integer balances in units of ``1/scale`` of the asset."""

    name: str
    index: int
    scale: int            # integer units per 1 asset (USDT 10**6 -> micro-USDT)
    price_usd: float      # oracle price
    haircut: float        # fraction in [0, 1)


@dataclass(frozen=True)
class Instrument:
    """A tradable contract.

    ``contract_size``: linear and option -- base coin per contract; inverse -- USD (quote)
    value of one contract. Quantities are stored as integers in units of ``1/qty_scale``
    contracts; prices on the wire as integers in units of ``1/price_scale`` quote.
    """

    name: str
    index: int
    kind: Kind
    settle: str                 # settle asset name (margin and PnL currency)
    contract_size: float
    qty_scale: int              # integer quantity units per contract
    price_scale: int            # integer price units per 1 quote
    tick_size: float
    lot_size: float
    tiers: tuple[RiskTier, ...]
    mark_price: float = 0.0
    underlying: str | None = None    # option: instrument whose mark is the underlying price
    strike: float = 0.0
    expiry_ns: int = 0
    is_call: bool = True
    extra: dict = field(default_factory=dict, compare=False)


def known_keys(table: dict, allowed, where: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the first key of ``table`` not in ``allowed`` (a typo must
    not leave a default silently in force): ``WHERE.KEY: unknown key; known: ...``."""
    for key in table:
        if key not in allowed:
            raise error(f"{where + '.' if where else ''}{key}: unknown key; known: {', '.join(allowed)}")


def finite_number(value, where: str) -> float:
    """Return ``value`` as a finite float, or raise ``ValueError`` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: must be a number, got {type(value).__name__}")
    try:
        f = float(value)
    except OverflowError:
        raise ValueError(f"{where}: out of range for a float64") from None
    if not math.isfinite(f):
        raise ValueError(f"{where}: must be finite, got {value!r}")
    return f


def power_of_ten(value, where: str) -> int:
    """Return ``value`` if it is a positive integer power of ten, else raise naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: must be a positive integer power of ten, got {value!r}")
    v = value
    while v % 10 == 0:
        v //= 10
    if v != 1:
        raise ValueError(f"{where}: must be a power of ten, got {value}")
    return value
