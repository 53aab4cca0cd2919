"""Fill application: the Cython kernel (engine._fills) against the plain-Python reference.

One behavioural suite runs against both implementations (``IMPLS``): a table of known
values with the arithmetic in the comments, then hypothesis properties over random
trade sequences -- the kernel's whole store equals the reference model after every leg,
the conserved quantity ``sum(balance) + sum(isolated_margin) + fee_pool -/+ sum(cost)``
does not move by one unit over a trade, and a rejected leg changes no byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine import _fills
from engine.accounting import (InstrumentParams, apply_fill_leg, apply_fill_legs, contract_ratio,
                               instrument_params, reference_apply_leg)
from engine.accounting.fills import INT64_MAX, INT64_MIN
from engine.codes import Code
from engine.instruments import Asset, Instrument, Kind, RiskTier
from engine.store.shm import Store

# --------------------------------------------------------------------------- fixtures
USDT = Asset("USDT", 0, 10**6, 1.0, 0.0)         # 1 unit = 1e-6 USDT
BTC = Asset("BTC", 1, 10**8, 50_000.0, 0.05)     # 1 unit = 1 sat
ETH = Asset("ETH", 2, 10**9, 3_000.0, 0.05)      # 1 unit = 1 gwei
WEI = Asset("ETHW", 3, 10**18, 3_000.0, 0.05)    # 1e18 units: K of an inverse too wide
ASSETS = [USDT, BTC, ETH, WEI]
TIERS = (RiskTier(0.0, 0.01, 0.005),)


def _ins(name, index, kind, settle, cs, qs, ps, mark) -> Instrument:
    return Instrument(name=name, index=index, kind=kind, settle=settle, contract_size=cs,
                      qty_scale=qs, price_scale=ps, tick_size=1 / ps, lot_size=1 / qs,
                      tiers=TIERS, mark_price=mark)


BTCUSDT = _ins("BTCUSDT", 0, Kind.PERP, "USDT", 1.0, 1000, 10, 50_000.0)          # 0.001 BTC lots, $0.1 ticks
ETHUSDT_F = _ins("ETHUSDT-F", 1, Kind.FUTURE, "USDT", 0.01, 1, 100, 3_000.0)      # 0.01 ETH contracts
BTCUSD = _ins("BTCUSD", 2, Kind.INVERSE_PERP, "BTC", 100.0, 1, 10, 50_000.0)      # $100 contracts
ETHUSD_F = _ins("ETHUSD-F", 3, Kind.INVERSE_FUTURE, "ETH", 10.0, 1, 100, 3_000.0)  # $10 contracts
BTC_C = _ins("BTC-C-60K", 4, Kind.OPTION, "USDT", 0.1, 10, 10, 1_000.0)           # 0.1 BTC options
THIRDS = _ins("THIRDS", 5, Kind.PERP, "USDT", 1 / 3, 1, 1, 1.0)                   # cs not a decimal
ETHUSD_W = _ins("ETHUSD-W", 6, Kind.INVERSE_PERP, "ETHW", 10.0, 1, 100, 3_000.0)  # K = 1e21
HALF = _ins("HALF", 7, Kind.PERP, "USDT", 0.5, 1, 10**6, 1.0)                    # K = 1/2: linear ties
INSTRUMENTS = [BTCUSDT, ETHUSDT_F, BTCUSD, ETHUSD_F, BTC_C, THIRDS, ETHUSD_W, HALF]
GOOD = [0, 1, 2, 3, 4, 7]
SLOTS = 3


def new_store(n_partitions: int = 2, n_accounts: int = 4, slots: int = SLOTS) -> tuple[Store, list[int]]:
    store = Store.create(None, assets=ASSETS, instruments=INSTRUMENTS,
                         accounts_capacity=max(n_accounts, n_partitions) * 2,
                         n_partitions=n_partitions, slots_per_account=slots)
    rows = [store.add_account(100 + k) for k in range(n_accounts)]
    return store, rows


PARAMS = None


def params(i: int) -> InstrumentParams:
    global PARAMS
    if PARAMS is None:
        s, _ = new_store(1, 1)
        PARAMS = [instrument_params(s, k) for k in range(len(INSTRUMENTS))]
    return PARAMS[i]


# --------------------------------------------------------------------------- the model
@dataclass
class Model:
    """Plain-Python state of the store the kernel writes, driven by reference_apply_leg."""

    n_partitions: int
    slots: int
    balances: dict[int, list[int]] = field(default_factory=dict)
    positions: dict[int, list[list[int]]] = field(default_factory=dict)  # [ins, mode, q, c, iso] in slot order
    pools: list[list[int]] = field(default_factory=list)
    partition: dict[int, int] = field(default_factory=dict)
    isolated_default: dict[int, bool] = field(default_factory=dict)

    @classmethod
    def of(cls, store: Store, rows: list[int]) -> "Model":
        m = cls(store.n_partitions, store.slots_per_account)
        m.pools = [[0] * 8 for _ in range(store.n_partitions)]
        for r in rows:
            m.balances[r] = [int(x) for x in store.accounts[r]["balance"]]
            m.positions[r] = []
            m.partition[r] = int(store.accounts[r]["partition"])
            m.isolated_default[r] = bool(int(store.accounts[r]["flags"]) & 2)
        return m

    def apply(self, row, instrument, delta, price, fee, mode=None, iso=0):
        p = params(instrument)
        settle = INSTRUMENTS[instrument].settle
        a = [x.name for x in ASSETS].index(settle)
        slots = self.positions[row]
        hit = [k for k, s in enumerate(slots) if s[0] == instrument]
        pos = tuple(slots[hit[0]][1:]) if hit else None
        part = self.partition[row]
        r = reference_apply_leg(pos, self.balances[row][a], self.pools[part][a], p, delta, price, fee,
                                mode=-1 if mode is None else mode, isolated_margin_delta_units=iso,
                                isolated_default=self.isolated_default[row],
                                slots_full=len(slots) >= self.slots)
        if r.code != Code.OK:
            return r
        self.balances[row][a] = r.balance
        self.pools[part][a] = r.fee_pool
        if r.position is None:
            if hit:                                  # close: last used slot moves into the hole
                k = hit[0]
                slots[k] = slots[-1]
                slots.pop()
        elif hit:
            slots[hit[0]] = [instrument, *r.position]
        else:
            slots.append([instrument, *r.position])
        return r

    def conserved(self) -> dict[tuple[int, int], int]:
        """Per (settle asset, linear=0/inverse=1): the quantity each trade leaves unchanged.

        Balances and pools are shared by every instrument of a settle asset, so they sit
        in the linear bucket; the inverse bucket holds + sum(cost). Summed per asset:
        sum(balance) + sum(iso) + pool - sum(linear cost) + sum(inverse cost).
        """
        q: dict[int, int] = {}
        for r, bal in self.balances.items():
            for a, b in enumerate(bal):
                q[a] = q.get(a, 0) + b
            for ins, _mode, _qty, cost, iso in self.positions[r]:
                a = [x.name for x in ASSETS].index(INSTRUMENTS[ins].settle)
                sign = 1 if params(ins).is_inverse else -1
                q[a] = q.get(a, 0) + iso + sign * cost
        for pool in self.pools:
            for a, f in enumerate(pool):
                q[a] = q.get(a, 0) + f
        return q


def store_state(store: Store, rows: list[int]):
    """The store as the model sees it (used slots in order, balances, fee pools)."""
    out = {}
    for r in rows:
        n = int(store.accounts[r]["n_positions"])
        out[r] = ([int(x) for x in store.accounts[r]["balance"]],
                  [[int(s["instrument"]), int(s["mode"]), int(s["qty"]), int(s["cost"]),
                    int(s["isolated_margin"])] for s in store.slots(r)[:n]])
    pools = [[int(x) for x in store.partitions[p]["fee_pool"]] for p in range(store.n_partitions)]
    return out, pools


def model_state(m: Model):
    return {r: (m.balances[r], [list(s) for s in m.positions[r]]) for r in m.balances}, m.pools


def raw_bytes(store: Store) -> bytes:
    return (store.accounts.tobytes() + store.positions.tobytes() + store.partitions.tobytes())


# --------------------------------------------------------------------------- implementations
class KernelImpl:
    name = "kernel"

    def __init__(self):
        self.store, self.rows = new_store(1, 2)

    def leg(self, row, instrument, delta, price, fee=0, mode=None, iso=0):
        r = apply_fill_leg(self.store, 0, self.rows[row], instrument, delta, price, fee, mode=mode,
                           isolated_margin_delta_units=iso)
        return r.code, r.realized_units, r.value_units

    def position(self, row, instrument):
        r = self.rows[row]
        for s in self.store.slots(r)[: int(self.store.accounts[r]["n_positions"])]:
            if int(s["instrument"]) == instrument:
                return int(s["mode"]), int(s["qty"]), int(s["cost"]), int(s["isolated_margin"])
        return None

    def balance(self, row, asset):
        return int(self.store.accounts[self.rows[row]]["balance"][asset])

    def pool(self, asset):
        return int(self.store.partitions[0]["fee_pool"][asset])


class ReferenceImpl:
    name = "reference"

    def __init__(self):
        store, rows = new_store(1, 2)
        self.rows = rows
        self.model = Model.of(store, rows)

    def leg(self, row, instrument, delta, price, fee=0, mode=None, iso=0):
        r = self.model.apply(self.rows[row], instrument, delta, price, fee, mode, iso)
        return r.code, r.realized_units, r.value_units

    def position(self, row, instrument):
        for s in self.model.positions[self.rows[row]]:
            if s[0] == instrument:
                return tuple(s[1:])
        return None

    def balance(self, row, asset):
        return self.model.balances[self.rows[row]][asset]

    def pool(self, asset):
        return self.model.pools[0][asset]


IMPLS = [KernelImpl, ReferenceImpl]
ALICE = 0
OK = Code.OK
CROSS, ISO = 0, 1

# Prices in price units: BTCUSDT/BTCUSD price_scale 10, so 50,000.0 -> 500_000.
P50K, P51K, P52K, P55K, P49K, P48K, P40K = 500_000, 510_000, 520_000, 550_000, 490_000, 480_000, 400_000
BTC_1 = 1000                      # 1 BTC in BTCUSDT quantity units (qty_scale 1000)
USDT_1 = 10**6
SAT = 1

# (id, legs [(instrument, δ, P, fee, mode, iso)], expected position of the last
# instrument (mode, q, c, iso) or None, settle balance, fee pool, last realized, last V)
KNOWN = [
    pytest.param([(0, BTC_1, P50K, 0, None, 0)],
                 # V = 1000 * 500000 * 1 * 1e6 / (1000 * 10) = 5e10 (50,000 USDT)
                 (CROSS, 1000, 50_000 * USDT_1, 0), 0, 0, 0, 50_000 * USDT_1,
                 id="ALICE_OPEN_LONG_1BTC_AT_50K"),
    pytest.param([(0, BTC_1, P50K, 0, None, 0), (0, BTC_1, P52K, 0, None, 0)],
                 # c = 50,000 + 52,000 = 102,000 USDT; q = 2 BTC
                 (CROSS, 2000, 102_000 * USDT_1, 0), 0, 0, 0, 52_000 * USDT_1,
                 id="ALICE_INCREASE_TO_2BTC_AT_52K"),
    pytest.param([(0, 2 * BTC_1, 510_000, 0, None, 0), (0, -BTC_1 // 2, P55K, 0, None, 0)],
                 # V = 0.5 * 55,000 = 27,500; cost_removed = 102,000 * 500/2000 = 25,500;
                 # realized = 27,500 - 25,500 = 2,000 USDT; c = 76,500; q = 1.5 BTC
                 (CROSS, 1500, 76_500 * USDT_1, 0), 2_000 * USDT_1, 0, 2_000 * USDT_1,
                 27_500 * USDT_1, id="ALICE_PARTIAL_REDUCE_HALF_BTC_AT_55K"),
    pytest.param([(0, BTC_1, P50K, 0, None, 0), (0, -BTC_1, P49K, 0, None, 0)],
                 # realized = 49,000 - 50,000 = -1,000 USDT; slot removed
                 None, -1_000 * USDT_1, 0, -1_000 * USDT_1, 49_000 * USDT_1,
                 id="ALICE_CLOSE_LONG_AT_49K_LOSS"),
    pytest.param([(0, BTC_1, P50K, 0, None, 0), (0, -3 * BTC_1, P51K, 0, None, 0)],
                 # V = 153,000; V_close = 153,000 * 1/3 = 51,000; V_open = 102,000;
                 # realized = 51,000 - 50,000 = 1,000; c = -102,000; q = -2 BTC
                 (CROSS, -2000, -102_000 * USDT_1, 0), 1_000 * USDT_1, 0, 1_000 * USDT_1,
                 153_000 * USDT_1, id="ALICE_FLIP_LONG_1_TO_SHORT_2_AT_51K"),
    pytest.param([(0, -2 * BTC_1, P50K, 0, None, 0), (0, BTC_1, P48K, 0, None, 0)],
                 # short: c = -100,000; cover 1 at 48,000: realized = -48,000 - (-50,000) = +2,000
                 (CROSS, -1000, -50_000 * USDT_1, 0), 2_000 * USDT_1, 0, 2_000 * USDT_1,
                 48_000 * USDT_1, id="ALICE_SHORT_2_COVER_1_AT_48K_GAIN"),
    pytest.param([(2, 1000, P50K, 0, None, 0)],
                 # inverse: V = 1000 * 100 * 1e8 * 10 / (1 * 500000) = 2e8 sat (2 BTC)
                 (CROSS, 1000, 2 * 10**8, 0), 0, 0, 0, 2 * 10**8,
                 id="ALICE_INVERSE_OPEN_100K_USD_LONG_AT_50K"),
    pytest.param([(2, 1000, P50K, 0, None, 0), (2, -1000, P40K, 0, None, 0)],
                 # V_close = 1e11 * 10 / 400000 = 2.5e8; realized = 2e8 - 2.5e8 = -0.5 BTC
                 # ($100k * (1/50k - 1/40k) = 2 - 2.5 BTC)
                 None, -5 * 10**7, 0, -5 * 10**7, 25 * 10**7, id="ALICE_INVERSE_LONG_CLOSED_AT_40K_LOSS"),
    pytest.param([(2, -1000, P50K, 0, None, 0), (2, 1000, P40K, 0, None, 0)],
                 # short: c = -2e8; realized = -2e8 - (-1) * 2.5e8 = +0.5 BTC
                 None, 5 * 10**7, 0, 5 * 10**7, 25 * 10**7, id="ALICE_INVERSE_SHORT_CLOSED_AT_40K_GAIN"),
    pytest.param([(0, BTC_1, P50K, 20 * USDT_1, None, 0)],
                 # fee 20 USDT: balance -20, fee pool +20
                 (CROSS, 1000, 50_000 * USDT_1, 0), -20 * USDT_1, 20 * USDT_1, 0, 50_000 * USDT_1,
                 id="ALICE_OPEN_WITH_20_USDT_FEE"),
    pytest.param([(0, BTC_1, P50K, -5 * USDT_1, None, 0)],
                 # rebate 5 USDT: balance +5, fee pool -5
                 (CROSS, 1000, 50_000 * USDT_1, 0), 5 * USDT_1, -5 * USDT_1, 0, 50_000 * USDT_1,
                 id="ALICE_OPEN_WITH_5_USDT_REBATE"),
    pytest.param([(2, 1, 2_560_000, 0, None, 0)],
                 # V = 1 * 100 * 1e8 * 10 / 2,560,000 = 39,062.5 -> half to even: 39,062
                 (CROSS, 1, 39_062, 0), 0, 0, 0, 39_062, id="ALICE_INVERSE_VALUE_HALF_ROUNDS_DOWN_TO_EVEN"),
    pytest.param([(2, 3, 2_560_000, 0, None, 0)],
                 # V = 117,187.5 -> half to even: 117,188
                 (CROSS, 3, 117_188, 0), 0, 0, 0, 117_188, id="ALICE_INVERSE_VALUE_HALF_ROUNDS_UP_TO_EVEN"),
    pytest.param([(2, 2, 2_560_000, 0, None, 0), (2, -1, 2_560_000, 0, None, 0)],
                 # open 2: V = 78,125, c = 78,125; reduce 1: V = 39,062 (half-even);
                 # cost_removed = 78,125 / 2 = 39,062.5 -> 39,062; realized = 39,062 - 39,062 = 0
                 (CROSS, 1, 39_063, 0), 0, 0, 0, 39_062, id="ALICE_INVERSE_COST_SPLIT_HALF_TO_EVEN"),
    pytest.param([(7, 3, 1, 0, None, 0)],
                 # K = 0.5 * 1e6 / (1 * 1e6) = 1/2: V = 3 * 1 / 2 = 1.5 -> half to even: 2
                 (CROSS, 3, 2, 0), 0, 0, 0, 2, id="ALICE_LINEAR_VALUE_HALF_ROUNDS_UP_TO_EVEN"),
    pytest.param([(7, 5, 1, 0, None, 0), (7, -5, 1, 0, None, 0)],
                 # V = 2.5 -> 2 both ways: c = 2, realized = 2 - 2 = 0, slot removed
                 None, 0, 0, 0, 2, id="ALICE_LINEAR_VALUE_HALF_ROUNDS_DOWN_TO_EVEN"),
    pytest.param([(7, 4, 3, 0, None, 0), (7, -1, 3, 0, None, 0)],
                 # open: V = 12/2 = 6; reduce 1: V = 3/2 = 1.5 -> 2; cost_removed = 6/4 = 1.5 -> 2;
                 # realized = 2 - 2 = 0; c = 4, q = 3
                 (CROSS, 3, 4, 0), 0, 0, 0, 2, id="ALICE_LINEAR_COST_SPLIT_HALF_TO_EVEN"),
    pytest.param([(1, 150, 300_000, 0, None, 0)],
                 # ETH future cs 0.01: V = 150 * 300000 * 0.01 * 1e6 / (1 * 100) = 4.5e9 (4,500 USDT
                 # = 1.5 ETH at 3,000)
                 (CROSS, 150, 4_500 * USDT_1, 0), 0, 0, 0, 4_500 * USDT_1, id="ALICE_FUTURE_CS_0_01"),
    pytest.param([(0, BTC_1, P50K, 0, ISO, 1_000 * USDT_1)],
                 # isolated: 1,000 USDT moves from balance into the position
                 (ISO, 1000, 50_000 * USDT_1, 1_000 * USDT_1), -1_000 * USDT_1, 0, 0, 50_000 * USDT_1,
                 id="ALICE_OPEN_ISOLATED_WITH_1000_MARGIN"),
    pytest.param([(0, BTC_1, P50K, 0, ISO, 1_000 * USDT_1), (0, -BTC_1, P51K, 0, None, 0)],
                 # close: realized 1,000 and the 1,000 isolated margin comes back: -1,000 + 1,000 + 1,000
                 None, 1_000 * USDT_1, 0, 1_000 * USDT_1, 51_000 * USDT_1,
                 id="ALICE_CLOSE_ISOLATED_MARGIN_RETURNS"),
    pytest.param([(0, BTC_1, P50K, 0, ISO, 1_000 * USDT_1), (0, -BTC_1 // 2, P49K, 0, None, 0)],
                 # isolated, sell 0.5 BTC at 49,000: realized 0.5 x (49,000 - 50,000) = -500 stays
                 # in the position's margin (1,000 - 500 = 500); the cross balance keeps its
                 # -1,000 (the transfer), untouched by the loss. Margin + upnl was
                 # 1,000 - 1,000 = 0 at 49,000 and is 500 - 500 = 0 after: unchanged.
                 (ISO, 500, 25_000 * USDT_1, 500 * USDT_1), -1_000 * USDT_1, 0, -500 * USDT_1,
                 24_500 * USDT_1, id="ALICE_ISOLATED_PARTIAL_LOSS_STAYS_IN_ITS_MARGIN"),
    pytest.param([(0, BTC_1, P50K, 0, ISO, 1_000 * USDT_1), (0, -BTC_1 // 2, 470_000, 0, None, 0),
                  (0, -BTC_1 // 2, 470_000, 0, None, 0)],
                 # past bankruptcy (49,000): sell 0.5 at 47,000, realized -1,500: margin
                 # 1,000 - 1,500 = -500; again (a leg on a margin below zero is applied, not
                 # refused 3102), realized -1,500: margin -2,000; closed, the margin comes home:
                 # balance -1,000 + (-2,000) = -3,000 (the loss past the margin reaches it)
                 None, -3_000 * USDT_1, 0, -1_500 * USDT_1, 23_500 * USDT_1,
                 id="ALICE_ISOLATED_CLOSED_PAST_BANKRUPTCY"),
]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.name)
@pytest.mark.parametrize("legs, position, balance, pool, realized, value", KNOWN)
def test_known_values(impl, legs, position, balance, pool, realized, value):
    b = impl()
    for ins, d, px, fee, mode, iso in legs:
        code, real, v = b.leg(ALICE, ins, d, px, fee, mode, iso)
        assert code == OK
    settle = [a.name for a in ASSETS].index(INSTRUMENTS[legs[-1][0]].settle)
    assert b.position(ALICE, legs[-1][0]) == position
    assert b.balance(ALICE, settle) == balance
    assert b.pool(settle) == pool
    assert (real, v) == (realized, value)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.name)
@pytest.mark.parametrize("leg, code", [
    pytest.param((0, 0, P50K, 0, None, 0), Code.FILL_BAD_QTY, id="ZERO_QTY"),
    pytest.param((0, INT64_MIN, P50K, 0, None, 0), Code.FILL_BAD_QTY, id="INT64_MIN_QTY"),
    pytest.param((0, BTC_1, 0, 0, None, 0), Code.FILL_BAD_PRICE, id="ZERO_PRICE"),
    pytest.param((0, BTC_1, -1, 0, None, 0), Code.FILL_BAD_PRICE, id="NEGATIVE_PRICE"),
    pytest.param((5, 1, 1, 0, None, 0), Code.FILL_UNKNOWN_INSTRUMENT, id="CS_ONE_THIRD_NOT_DECIMAL"),
    pytest.param((6, 1, 1, 0, None, 0), Code.FILL_UNKNOWN_INSTRUMENT, id="K_WIDER_THAN_INT64"),
    pytest.param((0, 2**62, 2**40, 0, None, 0), Code.FILL_BAD_QTY, id="VALUE_OVERFLOWS"),
    pytest.param((2, 2**62, 1, 0, None, 0), Code.FILL_BAD_QTY, id="INVERSE_VALUE_OVERFLOWS"),
    pytest.param((0, BTC_1, P50K, INT64_MIN, None, 0), Code.FILL_BAD_QTY, id="FEE_OVERFLOWS_BALANCE"),
    pytest.param((0, BTC_1, P50K, 0, CROSS, 5), Code.COLLATERAL_BAD_AMOUNT, id="ISO_MARGIN_ON_CROSS"),
    pytest.param((0, BTC_1, P50K, 0, ISO, -5), Code.COLLATERAL_BAD_AMOUNT, id="ISO_MARGIN_NEGATIVE"),
])
def test_rejects_change_nothing(impl, leg, code):
    b = impl()
    assert b.leg(ALICE, 2, 7, P50K)[0] == OK          # some state to keep
    before = (b.position(ALICE, 2), b.balance(ALICE, 0), b.balance(ALICE, 1), b.pool(0), b.pool(1))
    raw = raw_bytes(b.store) if isinstance(b, KernelImpl) else None
    assert b.leg(ALICE, *leg) == (code, 0, 0)
    assert (b.position(ALICE, 2), b.balance(ALICE, 0), b.balance(ALICE, 1), b.pool(0), b.pool(1)) == before
    if raw is not None:
        assert raw_bytes(b.store) == raw              # counters included


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.name)
def test_slots_full_is_rejected_and_changes_nothing(impl):
    b = impl()
    for ins in (0, 1, 2):                              # SLOTS = 3 used
        assert b.leg(ALICE, ins, 1, 1000)[0] == OK
    raw = raw_bytes(b.store) if isinstance(b, KernelImpl) else None
    assert b.leg(ALICE, 3, 1, 1000) == (Code.FILL_POSITION_SLOTS_FULL, 0, 0)
    assert b.position(ALICE, 3) is None
    if raw is not None:
        assert raw_bytes(b.store) == raw
    assert b.leg(ALICE, 0, 1, 1000)[0] == OK           # an existing slot still trades


def test_close_keeps_slots_compact():
    b = KernelImpl()
    for ins in (0, 1, 2):
        assert b.leg(ALICE, ins, 5, 1000)[0] == OK
    assert b.leg(ALICE, 0, -5, 1000)[0] == OK         # closes slot 0: slot 2 (BTCUSD) moves in
    r = b.rows[ALICE]
    assert int(b.store.accounts[r]["n_positions"]) == 2
    assert b.store.slots(r)["instrument"][:2].tolist() == [2, 1]
    assert b.store.slots(r)[2].tolist() == (0, 0, 0, 0, 0)


def test_account_default_mode_is_the_isolated_flag():
    store = Store.create(None, assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=2)
    r = store.add_account(7, isolated_default=True)
    assert apply_fill_leg(store, 0, r, 0, 1, 1000, 0, isolated_margin_delta_units=3).code == OK
    # V = 1 * 1000 * 1 * 1e6 / (1000 * 10) = 100,000 (0.1 USDT: 0.001 BTC at 100.0)
    assert store.slots(r)[0].tolist() == (0, 1, 1, 100_000, 3)


@pytest.mark.parametrize("args, code", [
    pytest.param(dict(partition=1), Code.FILL_UNKNOWN_ACCOUNT, id="NO_SUCH_PARTITION"),
    pytest.param(dict(row=1), Code.FILL_UNKNOWN_ACCOUNT, id="ROW_NOT_IN_USE"),
    pytest.param(dict(row="0"), Code.FILL_UNKNOWN_ACCOUNT, id="ROW_NOT_INT"),
    pytest.param(dict(instrument=99), Code.FILL_UNKNOWN_INSTRUMENT, id="INSTRUMENT_OUT_OF_RANGE"),
    pytest.param(dict(delta_units=1.0), Code.FILL_BAD_QTY, id="QTY_FLOAT"),
    pytest.param(dict(delta_units=True), Code.FILL_BAD_QTY, id="QTY_BOOL"),
    pytest.param(dict(delta_units=2**63), Code.FILL_BAD_QTY, id="QTY_PAST_INT64"),
    pytest.param(dict(price_units=None), Code.FILL_BAD_PRICE, id="PRICE_NONE"),
    pytest.param(dict(fee_units=0.5), Code.COLLATERAL_BAD_AMOUNT, id="FEE_FLOAT"),
    pytest.param(dict(isolated_margin_delta_units=-2**64), Code.COLLATERAL_BAD_AMOUNT, id="ISO_PAST_INT64"),
    pytest.param(dict(mode=2), Code.WIRE_BAD_VALUE, id="MODE_2"),
])
def test_checked_api_rejects_bad_input_without_raising(args, code):
    store = Store.create(None, assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=2)
    store.add_account(0)
    kw = dict(partition=0, row=0, instrument=0, delta_units=1, price_units=1000, fee_units=0)
    kw.update(args)
    before = raw_bytes(store)
    r = apply_fill_leg(store, **kw)
    assert (r.code, r.realized_units, r.value_units) == (code, 0, 0)
    assert raw_bytes(store) == before


def test_numpy_integers_are_accepted():
    store = Store.create(None, assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=2)
    store.add_account(0)
    r = apply_fill_leg(store, np.int32(0), np.int64(0), np.int16(0), np.int64(1000), np.int64(P50K),
                       np.int64(0))
    assert (r.code, r.value_units) == (OK, 50_000 * USDT_1)


def test_contract_ratio_matches_the_kernel():
    store, _ = new_store(1, 1)
    for i in range(len(INSTRUMENTS)):
        code, k = contract_ratio(instrument_params(store, i))
        kcode, kn, kd = _fills.contract_ratio_of(store.addr(store.instruments, i), store.addr(store.assets))
        assert kcode == code
        if code == OK:
            assert (kn, kd) == (k.numerator, k.denominator)
    # BTCUSDT: cs S / (qs ps) = 1 * 1e6 / (1000 * 10) = 100
    assert contract_ratio(instrument_params(store, 0))[1] == 100


def test_batch_equals_one_by_one_and_rejects_per_leg():
    s1, rows1 = new_store()
    s2, rows2 = new_store()
    legs = [(rows1[0], 0, 1000, P50K, 10), (rows1[1], 0, -1000, P50K, 10),
            (rows1[0], 0, 0, P50K, 0),                     # 3005
            (rows1[2], 2, 7, P51K, -1), (rows1[3], 2, -7, P51K, 2),
            (rows1[0], 0, -3000, P52K, 0), (rows1[1], 0, 3000, P52K, 0),
            (rows1[2], 99, 1, 1, 0),                        # 3004 (checked in Python)
            (rows1[3], 1, 1, -5, 0)]                        # 3006
    singles = [apply_fill_leg(s2, s2.partition_of(100 + rows2.index(r)), r, i, d, p, f)
               for r, i, d, p, f in legs]
    cols = list(zip(*legs))
    b = apply_fill_legs(s1, *cols)
    assert b.codes.tolist() == [int(r.code) for r in singles]
    assert b.realized_units.tolist() == [r.realized_units for r in singles]
    assert b.value_units.tolist() == [r.value_units for r in singles]
    assert b.n_ok == 6
    assert store_state(s1, rows1) == store_state(s2, rows2)
    assert (s1.partitions["seq"] % 2 == 0).all() and (s1.accounts["seq"] % 2 == 0).all()


# --------------------------------------------------------------------------- properties
QTY = st.one_of(st.integers(1, 5), st.integers(1, 2000), st.just("close"), st.just("flip"))
PRICE = st.one_of(st.integers(1, 100), st.integers(1, 10**7))
FEE = st.integers(-1000, 1000)
TRADE = st.tuples(st.integers(0, 3), st.integers(1, 3), st.sampled_from(GOOD), QTY, PRICE, FEE, FEE,
                  st.sampled_from([None, CROSS, ISO]),
                  st.one_of(st.just(0), st.just(0), st.integers(-10, 1000)), st.booleans())
BAD = st.one_of(
    st.tuples(st.just("zero"), st.sampled_from(GOOD)),
    st.tuples(st.just("price"), st.sampled_from(GOOD), st.integers(-10**6, 0)),
    st.tuples(st.just("huge"), st.sampled_from(GOOD), st.integers(2**61, 2**63 - 1)),
    st.tuples(st.just("slots"), st.sampled_from(GOOD)),
)


def _qty(m: Model, row: int, ins: int, q) -> int:
    held = next((s[2] for s in m.positions[row] if s[0] == ins), 0)
    if q == "close":
        return -held if held else 1
    if q == "flip":
        return -2 * held if held else -3
    return q


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trades=st.lists(TRADE, min_size=5, max_size=60), bad=st.lists(BAD, max_size=6))
def test_kernel_equals_reference_and_conserves_money(trades, bad):
    store, rows = new_store()
    model = Model.of(store, rows)
    q_before = model.conserved()
    n_both = 0
    for k, (a, off, ins, qty, price, fee_a, fee_b, mode, iso, batched) in enumerate(trades):
        ra, rb = rows[a], rows[(a + off) % 4]
        d = _qty(model, ra, ins, qty)
        legs = [(ra, d, fee_a, mode, iso), (rb, -d, fee_b, mode, 0)]
        codes = []
        if batched:
            b = apply_fill_legs(store, [ra, rb], [ins, ins], [d, -d], [price, price], [fee_a, fee_b],
                                [-1 if mode is None else mode] * 2, [iso, 0])
            for j, (row, dd, fee, md, iz) in enumerate(legs):
                ref = model.apply(row, ins, dd, price, fee, md, iz)
                assert (int(b.codes[j]), int(b.realized_units[j]), int(b.value_units[j])) == \
                    (ref.code, ref.realized_units, ref.value_units)
                codes.append(ref.code)
        else:
            for row, dd, fee, md, iz in legs:
                got = apply_fill_leg(store, model.partition[row], row, ins, dd, price, fee, mode=md,
                                     isolated_margin_delta_units=iz)
                held = next((s[2] for s in model.positions[row] if s[0] == ins), 0)
                ref = model.apply(row, ins, dd, price, fee, md, iz)
                assert (got.code, got.realized_units, got.value_units) == \
                    (ref.code, ref.realized_units, ref.value_units)
                assert store_state(store, rows) == model_state(model)      # (a) after every leg
                codes.append(ref.code)
                if ref.code == OK and held and (held > 0) != (dd > 0):
                    event("close" if ref.position is None else
                          "flip" if (ref.position[1] > 0) != (held > 0) else "reduce")
                event(f"leg code {int(ref.code)}")
        assert store_state(store, rows) == model_state(model)
        q_after = model.conserved()
        if codes == [OK, OK]:
            n_both += 1
            assert q_after == q_before                                     # (b) exactly
        q_before = q_after
        # (c) bad legs between trades: their code, and not one byte changed
        if k < len(bad):
            kind, bins, *extra = bad[k]
            raw = raw_bytes(store)
            if kind == "zero":
                want, got = Code.FILL_BAD_QTY, apply_fill_leg(store, model.partition[ra], ra, bins, 0, 100, 1)
            elif kind == "price":
                want = Code.FILL_BAD_PRICE
                got = apply_fill_leg(store, model.partition[ra], ra, bins, 1, extra[0], 1)
            elif kind == "huge":
                held = {s[0] for s in model.positions[ra]}
                full = bins not in held and len(held) >= SLOTS          # 3007 comes first
                want = Code.FILL_POSITION_SLOTS_FULL if full else Code.FILL_BAD_QTY
                px = 1 if params(bins).is_inverse else 2**62      # V far past int64 either way
                got = apply_fill_leg(store, model.partition[ra], ra, bins, extra[0], px, 1)
            else:
                used = {s[0] for s in model.positions[ra]}
                free = [i for i in GOOD if i not in used]
                if len(used) < SLOTS or not free:
                    continue
                want = Code.FILL_POSITION_SLOTS_FULL
                got = apply_fill_leg(store, model.partition[ra], ra, free[0], 1, 100, 1)
            assert (got.code, got.realized_units, got.value_units) == (want, 0, 0)
            assert raw_bytes(store) == raw
    event(f"trades with both legs OK: {min(n_both, 10)}{'+' if n_both >= 10 else ''}")
    assert (store.accounts["seq"] % 2 == 0).all() and (store.partitions["seq"] % 2 == 0).all()


@settings(max_examples=300, deadline=None)
@given(ins=st.sampled_from(GOOD), q0=st.integers(-10**12, 10**12), c0=st.integers(-10**15, 10**15),
       d=st.integers(-10**12, 10**12).map(lambda x: x or 1), price=st.integers(1, 10**9),
       fee=st.integers(-10**6, 10**6))
def test_one_leg_from_any_state_matches_reference(ins, q0, c0, d, price, fee):
    """Arbitrary starting positions (also q == 0 with c != 0, via set_position)."""
    store, rows = new_store(1, 1)
    r = rows[0]
    if q0 or c0:
        store.set_position(r, ins, q0, c0)
    settle = int(store.instruments[ins]["settle_asset"])
    pos = (0, q0, c0, 0) if (q0 or c0) else None
    ref = reference_apply_leg(pos, 0, 0, params(ins), d, price, fee)
    got = apply_fill_leg(store, 0, r, ins, d, price, fee)
    assert (got.code, got.realized_units, got.value_units) == (ref.code, ref.realized_units, ref.value_units)
    n = int(store.accounts[r]["n_positions"])
    kpos = (tuple(int(x) for x in store.slots(r)[0].tolist()[1:]) if n else None)
    assert kpos == ref.position
    assert int(store.accounts[r]["balance"][settle]) == ref.balance
    assert int(store.partitions[0]["fee_pool"][settle]) == ref.fee_pool
    if ref.code == OK:
        sign = 1 if params(ins).is_inverse else -1
        v = ref.value_units * (1 if d > 0 else -1)
        q_change = (ref.balance + ref.fee_pool + sign * (ref.position[2] if ref.position else 0)) - sign * c0
        assert q_change == (v if params(ins).is_inverse else -v)          # the proof's per-leg step


def test_reference_never_leaves_cost_without_qty():
    # q == 0 only when m == |q| == |δ|, and then cost_removed == c: the assert in the
    # reference holds; a full close of an odd cost leaves nothing behind.
    r = reference_apply_leg((0, 3, 7, 0), 0, 0, params(2), -3, 123_457, 0)
    assert r.code == OK and r.position is None


def test_a_position_cannot_reach_int64_min():
    """Instrument 7 takes a short of 2**63 - 1 units at price 1 (its value fits); one more
    unit sold would make the position -2**63, whose size |q| is no int64: the kernel
    then sold 2**63 units to liquidate a short (the negation wrapped), growing it. That
    leg is refused 3005 by the kernel and the reference, and changes nothing."""
    store, rows = new_store(1, 1)
    r = rows[0]
    assert apply_fill_leg(store, 0, r, 7, -(2**63 - 1), 1, 0).code == OK
    ref = reference_apply_leg(None, 0, 0, params(7), -(2**63 - 1), 1, 0)
    before = raw_bytes(store)
    assert apply_fill_leg(store, 0, r, 7, -1, 1, 0).code == Code.FILL_BAD_QTY
    assert raw_bytes(store) == before
    assert reference_apply_leg(ref.position, ref.balance, ref.fee_pool, params(7), -1, 1, 0).code == Code.FILL_BAD_QTY
    assert int(store.slots(r)[0]["qty"]) == -(2**63 - 1)
