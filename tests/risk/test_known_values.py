"""Known-value tests of the margin rules, each run against the Cython kernel and the exact
reference model (engine/risk/reference.py) -- one behavioural suite, two implementations.

Every fixture is named for what it holds; the arithmetic is written next to each
expected number.

World (the same for every case unless a case says otherwise):
  assets       USDT  price 1,      haircut 0,    scale 10**6
               BTC   price 50 000, haircut 0.10, scale 10**8   (40 000 in the inverse cases)
               ETH   price 3 000,  haircut 0.05, scale 10**8
  BTCUSDT      linear perp, settle USDT, cs 1 BTC, qty_scale 1000
  ETHUSDT      linear perp, settle USDT, cs 1 ETH, qty_scale 1000
  BTCUSD       inverse perp, settle BTC, cs 100 USD, qty_scale 1
  Tiers of BTCUSDT / ETHUSDT (floor USDT, imr, mmr), amounts derived for continuity:
      0        1 %   0.5 %   init 0                         maint 0
      100 000  2 %   1 %     init 0 + 100k*(2%-1%) = 1 000   maint 0 + 100k*(1%-0.5%) = 500
      500 000  5 %   2.5 %   init 1 000 + 500k*3% = 16 000   maint 500 + 500k*1.5% = 8 000
  Tiers of BTCUSD (floor BTC): 0, 1 %, 0.5 % (one tier).

Tolerance: rel 1e-10. The inputs (0.005, 0.995, ...) are not exact in binary and the
kernel evaluates a handful of float64 operations (error ~1e-15 relative); the reference is
exact on those same binary inputs. 1e-10 is far above rounding and far below any rule error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import pytest

from engine.codes import Code
from engine.instruments import Asset, Instrument, Kind, derive_tiers
from engine.risk import margin
from engine.risk import reference as ref
from engine.store.layout import Mode, Status
from engine.store.shm import Store

REL = 1e-10
USDT, BTC, ETH = 0, 1, 2
BTCUSDT, ETHUSDT, BTCUSD = 0, 1, 2
SCALE = {USDT: 10**6, BTC: 10**8, ETH: 10**8}
LINEAR_TIERS = [{"floor": 0.0, "imr": 0.01, "mmr": 0.005},
                {"floor": 100_000.0, "imr": 0.02, "mmr": 0.01},
                {"floor": 500_000.0, "imr": 0.05, "mmr": 0.025}]
INVERSE_TIERS = [{"floor": 0.0, "imr": 0.01, "mmr": 0.005}]


# --------------------------------------------------------------------------- fixtures
@dataclass(frozen=True)
class Pos:
    instrument: int
    qty: str                    # contracts, signed (a decimal string: exact)
    entry: str                  # entry price
    mode: int = Mode.CROSS
    isolated_margin: str = "0"  # settle asset


@dataclass(frozen=True)
class Acct:
    balances: dict = field(default_factory=dict)     # asset -> amount (decimal string)
    positions: tuple = ()
    isolated_default: bool = False


def _units(amount: str, scale: int) -> int:
    v = Fraction(amount) * scale
    assert v.denominator == 1, f"{amount} has more decimals than 1/{scale}"
    return int(v)


ALICE_1BTC_LONG_AT_50K = Acct({USDT: "10000"}, (Pos(BTCUSDT, "1", "50000"),))
BOB_1BTC_SHORT_AT_50K = Acct({USDT: "10000"}, (Pos(BTCUSDT, "-1", "50000"),))
CAROL_2BTC_LONG_AT_50K = Acct({USDT: "10000"}, (Pos(BTCUSDT, "2", "50000"),))
DAVE_12BTC_LONG_AT_50K = Acct({USDT: "124300"}, (Pos(BTCUSDT, "12", "50000"),))
ERIN_1BTC_COLL_1000_BTCUSD_LONG_AT_50K = Acct({BTC: "1"}, (Pos(BTCUSD, "1000", "50000"),))
FRANK_1BTC_COLL_1000_BTCUSD_SHORT_AT_50K = Acct({BTC: "1"}, (Pos(BTCUSD, "-1000", "50000"),))
GRACE_10K_USDT_1BTC_BORROWED_2ETH = Acct({USDT: "10000", BTC: "1", ETH: "-2"})
HENRY_ISOLATED_1BTC_LONG_600_MARGIN = Acct({}, (Pos(BTCUSDT, "1", "50000", Mode.ISOLATED, "600"),))
IVY_ISOLATED_1BTC_LONG_800_MARGIN = Acct({}, (Pos(BTCUSDT, "1", "50000", Mode.ISOLATED, "800"),))
JACK_10K_USDT_FLAT = Acct({USDT: "10000"})
KATE_1K_USDT_10BTC_LONG_UNDERWATER = Acct({USDT: "1000"}, (Pos(BTCUSDT, "10", "50000"),))
LEO_ONE_SLOT_HOLDING_BTCUSDT = Acct({USDT: "100000"}, (Pos(BTCUSDT, "1", "50000"),))
EMPTY = Acct()


# --------------------------------------------------------------------------- the two implementations
def _world(btc_px: float, marks: dict):
    assets = [Asset("USDT", USDT, SCALE[USDT], 1.0, 0.0), Asset("BTC", BTC, SCALE[BTC], btc_px, 0.10),
              Asset("ETH", ETH, SCALE[ETH], 3000.0, 0.05)]
    mk = {BTCUSDT: 50_000.0, ETHUSDT: 3_000.0, BTCUSD: btc_px} | marks
    lin, inv = derive_tiers(LINEAR_TIERS), derive_tiers(INVERSE_TIERS)
    instruments = [
        Instrument("BTCUSDT", BTCUSDT, Kind.PERP, "USDT", 1.0, 1000, 100, 0.01, 0.001, lin, mk[BTCUSDT]),
        Instrument("ETHUSDT", ETHUSDT, Kind.PERP, "USDT", 1.0, 1000, 100, 0.01, 0.001, lin, mk[ETHUSDT]),
        Instrument("BTCUSD", BTCUSD, Kind.INVERSE_PERP, "BTC", 100.0, 1, 100, 0.5, 1.0, inv, mk[BTCUSD]),
    ]
    return assets, instruments


def _store(acct: Acct, btc_px: float, marks: dict, slots: int):
    assets, instruments = _world(btc_px, marks)
    store = Store.create(None, assets=assets, instruments=instruments, accounts_capacity=1,
                         n_partitions=1, slots_per_account=slots)
    row = store.add_account(7, isolated_default=acct.isolated_default)
    for a, amount in acct.balances.items():
        store.set_balance(row, a, _units(amount, SCALE[a]))
    for p in acct.positions:
        ins = instruments[p.instrument]
        settle = SCALE[BTC] if ins.kind.is_inverse else SCALE[USDT]
        q = Fraction(p.qty) * Fraction(ins.contract_size)
        cost = q / Fraction(p.entry) if ins.kind.is_inverse else q * Fraction(p.entry)
        store.set_position(row, p.instrument, _units(p.qty, ins.qty_scale), round(cost * settle),
                           mode=p.mode, isolated_margin=_units(p.isolated_margin, settle))
    return store, row, assets, instruments


def _f(x):
    return None if x is None else float(x)


class Kernel:
    name = "kernel"

    @staticmethod
    def detail(acct, btc_px=50_000.0, marks={}, slots=4):
        store, row, _, _ = _store(acct, btc_px, marks, slots)
        d = margin.account_detail(store, row)
        return d.collateral_usd, d.cross_equity_usd, d.cross_im_usd, d.cross_mm_usd, int(d.status), [
            (p.notional, p.unrealized_pnl, p.initial_margin, p.maintenance_margin,
             p.liquidation_price, p.bankruptcy_price) for p in d.positions]

    @staticmethod
    def check(acct, instrument, qty, price, btc_px=50_000.0, marks={}, slots=4):
        store, row, _, instruments = _store(acct, btc_px, marks, slots)
        r = margin.pretrade_check(store, row, instrument, _units(qty, instruments[instrument].qty_scale), price)
        return int(r.code), r.post_equity_usd, r.post_initial_margin_usd


class Reference:
    name = "reference"

    @staticmethod
    def detail(acct, btc_px=50_000.0, marks={}, slots=4):
        store, row, assets, instruments = _store(acct, btc_px, marks, slots)
        market = ref.market_from_engine(assets, instruments, [i.mark_price for i in instruments])
        e = ref.account_figures(market, ref.account_from_store(store, row))
        return float(e.collateral_usd), float(e.cross_equity_usd), float(e.cross_im_usd), \
            float(e.cross_mm_usd), e.status, [
                (float(p.notional), float(p.upnl), float(p.im), float(p.mm), _f(p.liquidation_price),
                 _f(p.bankruptcy_price)) for p in e.positions]

    @staticmethod
    def check(acct, instrument, qty, price, btc_px=50_000.0, marks={}, slots=4):
        store, row, assets, instruments = _store(acct, btc_px, marks, slots)
        market = ref.market_from_engine(assets, instruments, [i.mark_price for i in instruments])
        code, eq, im = ref.pretrade_check(market, ref.account_from_store(store, row), slots, instrument,
                                          _units(qty, instruments[instrument].qty_scale), price)
        return code, float(eq), float(im)


@pytest.fixture(params=[Kernel, Reference], ids=lambda c: c.name)
def impl(request):
    return request.param


def approx(x):
    return None if x is None else pytest.approx(x, rel=REL, abs=1e-9)


# --------------------------------------------------------------------------- account figures
# (account, kwargs, collateral, equity, IM, MM, status, [(notional, upnl, IM, MM, liq, bankruptcy)])
CASES = [
    pytest.param(
        ALICE_1BTC_LONG_AT_50K, {"marks": {BTCUSDT: 52_000.0}},
        10_000, 12_000, 520, 260, Status.HEALTHY,
        # notional 1*52 000 (tier 0); upnl 52 000 - 50 000 = 2 000; IM 52 000*1% = 520;
        # MM 52 000*0.5% = 260. Liq: 10 000 + (p - 50 000) = 0.005 p -> p = 40 000/0.995;
        # bankruptcy: 10 000 + p - 50 000 = 0 -> p = 40 000.
        [(52_000, 2_000, 520, 260, 40_000 / 0.995, 40_000)],
        id="linear-long-one-tier"),
    pytest.param(
        BOB_1BTC_SHORT_AT_50K, {"marks": {BTCUSDT: 52_000.0}},
        10_000, 8_000, 520, 260, Status.HEALTHY,
        # upnl 50 000 - 52 000 = -2 000; liq: 10 000 + 50 000 - p = 0.005 p -> p = 60 000/1.005;
        # bankruptcy: 10 000 + 50 000 - p = 0 -> p = 60 000 (above the liquidation price).
        [(52_000, -2_000, 520, 260, 60_000 / 1.005, 60_000)],
        id="linear-short-one-tier"),
    pytest.param(
        CAROL_2BTC_LONG_AT_50K, {"marks": {BTCUSDT: 50_000.0}},
        10_000, 10_000, 1_000, 500, Status.HEALTHY,
        # notional 2*50 000 = 100 000, exactly floor_1 -> tier 1:
        # MM = 100 000*1% - 500 = 500 = 100 000*0.5% (tier 0's formula): continuous.
        # IM = 100 000*2% - 1 000 = 1 000 = 100 000*1%.
        # Liq (tier 0): 10 000 + 2(p - 50 000) = 2p*0.005 -> p = 90 000/1.99;
        # bankruptcy: 10 000 + 2p - 100 000 = 0 -> p = 45 000.
        [(100_000, 0, 1_000, 500, 90_000 / 1.99, 45_000)],
        id="on-tier-boundary"),
    pytest.param(
        DAVE_12BTC_LONG_AT_50K, {"marks": {BTCUSDT: 50_000.0}},
        124_300, 124_300, 14_000, 7_000, Status.HEALTHY,
        # notional 600 000 (tier 2): IM = 600 000*5% - 16 000 = 14 000; MM = 600 000*2.5% - 8 000 = 7 000.
        # Liq crosses into tier 1. Tier 2's piece: 124 300 + 12(p - 50 000) = 12p*2.5% - 8 000
        #   -> 11.7 p = 467 700 -> p = 39 974.36, notional 479 692 < 500 000: not in tier 2.
        # Tier 1's piece: 124 300 + 12p - 600 000 = 12p*1% - 500 -> 11.88 p = 475 200 -> p = 40 000,
        #   notional 480 000 in [100 000, 500 000): the root. Bankruptcy: 124 300 + 12p - 600 000 = 0
        #   -> p = 50 000 - 124 300/12 = 39 641.67, below (beyond) the liquidation price.
        [(600_000, 0, 14_000, 7_000, 40_000, 50_000 - 124_300 / 12)],
        id="liquidation-crosses-into-lower-tier"),
]


def _inverse_cases():
    # BTC haircut 10 % applies to the BTC collateral: 1 BTC * 40 000 * 0.9 = 36 000 USD.
    # ERIN long 1000 BTCUSD at 50 000, mark 40 000: upnl -0.5 BTC = -20 000 USD;
    #   equity 36 000 - 20 000 = 16 000; IM 0.025*40 000 = 1 000; MM 0.0125*40 000 = 500.
    #   Liq in x = 1/p (BTC price fixed at 40 000): 36 000 + 40 000(2 - 100 000 x) = 40 000*500 x
    #   -> 0.9 + 2 = 100 500 x -> p = 100 500/2.9 = 34 655.17; notional 100 000/p = 2.8856 BTC (tier 0).
    #   Bankruptcy: 0.9 + 2 - 100 000 x = 0 -> p = 100 000/2.9 = 34 482.76 (below liquidation).
    yield pytest.param(
        ERIN_1BTC_COLL_1000_BTCUSD_LONG_AT_50K, {"btc_px": 40_000.0},
        36_000, 16_000, 1_000, 500, Status.HEALTHY,
        [(2.5, -0.5, 0.025, 0.0125, 100_500 / 2.9, 100_000 / 2.9)], id="inverse-long")
    # FRANK short 1000 BTCUSD at 50 000 (cost -2 BTC), mark 40 000: upnl -2 + 2.5 = +0.5 BTC
    #   = 20 000 USD; equity 36 000 + 20 000 = 56 000. Liq: 0.9 - 2 + 100 000 x = 500 x
    #   -> x = 1.1/99 500 -> p = 99 500/1.1 = 90 454.55; bankruptcy: 100 000 x = 1.1 -> p = 90 909.09
    #   (above liquidation: a short's bankruptcy lies beyond it).
    yield pytest.param(
        FRANK_1BTC_COLL_1000_BTCUSD_SHORT_AT_50K, {"btc_px": 40_000.0},
        36_000, 56_000, 1_000, 500, Status.HEALTHY,
        [(2.5, 0.5, 0.025, 0.0125, 99_500 / 1.1, 100_000 / 1.1)], id="inverse-short")


MORE = [
    pytest.param(
        GRACE_10K_USDT_1BTC_BORROWED_2ETH, {},
        # 10 000*1 + 1*50 000*(1 - 10%) + (-2)*3 000 (borrowed: full price, no haircut) = 49 000
        49_000, 49_000, 0, 0, Status.HEALTHY, [], id="multi-collateral-haircut-and-borrow"),
    pytest.param(
        HENRY_ISOLATED_1BTC_LONG_600_MARGIN, {"marks": {BTCUSDT: 49_500.0}},
        # upnl 49 500 - 50 000 = -500; MM 49 500*0.5% = 247.5; iso + upnl = 100 < 247.5: breach.
        # Cross side empty: 0 < 0 is false, no cross bits. Liq: 600 + p - 50 000 = 0.005 p
        # -> p = 49 400/0.995 = 49 648.24 (above the mark: already past it); bankruptcy 49 400.
        0, 0, 0, 0, Status.ISOLATED_LIQUIDATABLE,
        [(49_500, -500, 495, 247.5, 49_400 / 0.995, 49_400)], id="isolated-breach"),
    pytest.param(
        IVY_ISOLATED_1BTC_LONG_800_MARGIN, {"marks": {BTCUSDT: 49_500.0}},
        # iso + upnl = 800 - 500 = 300 >= 247.5: no breach. Liq p = 49 200/0.995; bankruptcy 49 200.
        0, 0, 0, 0, Status.HEALTHY,
        [(49_500, -500, 495, 247.5, 49_200 / 0.995, 49_200)], id="isolated-no-breach"),
    pytest.param(
        KATE_1K_USDT_10BTC_LONG_UNDERWATER, {"marks": {BTCUSDT: 49_000.0}},
        # upnl 10*(49 000 - 50 000) = -10 000; equity 1 000 - 10 000 = -9 000 (< 0: bankrupt);
        # notional 490 000 (tier 1): IM 9 800 - 1 000 = 8 800; MM 4 900 - 500 = 4 400.
        # Liq is above the mark, in tier 2. Tier 1's piece: 1 000 + 10p - 500 000 = 0.1p - 500
        #   -> p = 499 500/9.9 = 50 454.55, notional 504 545 >= 500 000: not in tier 1.
        # Tier 2's piece: 1 000 + 10p - 500 000 = 0.25p - 8 000 -> p = 491 000/9.75 = 50 358.97,
        #   notional 503 590 >= 500 000: the root.
        # Bankruptcy: 1 000 + 10p - 500 000 = 0 -> p = 49 900.
        1_000, -9_000, 8_800, 4_400,
        Status.BELOW_IM | Status.LIQUIDATABLE | Status.BANKRUPT,
        [(490_000, -10_000, 8_800, 4_400, 491_000 / 9.75, 49_900)], id="bankrupt-liq-in-higher-tier"),
    pytest.param(EMPTY, {}, 0, 0, 0, 0, Status.HEALTHY, [], id="empty-account"),
]


@pytest.mark.parametrize("acct,kw,coll,equity,im,mm,status,positions",
                         CASES + list(_inverse_cases()) + MORE)
def test_account_figures(impl, acct, kw, coll, equity, im, mm, status, positions):
    got = impl.detail(acct, **kw)
    assert got[:4] == (approx(coll), approx(equity), approx(im), approx(mm))
    assert got[4] == status
    assert len(got[5]) == len(positions)
    for g, e in zip(got[5], positions):
        assert g == tuple(approx(x) for x in e)


def test_tier_boundary_continuity(impl):
    # CAROL: 2 BTC long, notional 2p around floor_1 = 100 000 (p = 50 000).
    # Just below: p = 49 999.99, notional 99 999.98, tier 0: MM = 99 999.98*0.5% = 499.9999.
    # Just above: p = 50 000.01, notional 100 000.02, tier 1: MM = 100 000.02*1% - 500 = 500.0002.
    # Without the 500 maintenance amount tier 1 would give 1 000.0002: a jump of 500.
    below = impl.detail(CAROL_2BTC_LONG_AT_50K, marks={BTCUSDT: 49_999.99})[5][0][3]
    on = impl.detail(CAROL_2BTC_LONG_AT_50K, marks={BTCUSDT: 50_000.0})[5][0][3]
    above = impl.detail(CAROL_2BTC_LONG_AT_50K, marks={BTCUSDT: 50_000.01})[5][0][3]
    assert below == pytest.approx(499.9999, rel=REL)
    assert on == pytest.approx(500.0, rel=REL)
    assert above == pytest.approx(500.0002, rel=REL)


@pytest.mark.parametrize("acct,kw", [
    pytest.param(ALICE_1BTC_LONG_AT_50K, {"marks": {BTCUSDT: 52_000.0}}, id="long-linear"),
    pytest.param(BOB_1BTC_SHORT_AT_50K, {"marks": {BTCUSDT: 52_000.0}}, id="short-linear"),
    pytest.param(DAVE_12BTC_LONG_AT_50K, {}, id="long-across-tiers"),
    pytest.param(ERIN_1BTC_COLL_1000_BTCUSD_LONG_AT_50K, {"btc_px": 40_000.0}, id="long-inverse"),
    pytest.param(FRANK_1BTC_COLL_1000_BTCUSD_SHORT_AT_50K, {"btc_px": 40_000.0}, id="short-inverse"),
])
def test_bankruptcy_beyond_liquidation(impl, acct, kw):
    # The requirement is positive, so equity hits MM before it hits 0: a long's bankruptcy
    # price is below its liquidation price, a short's above (values in test_account_figures).
    _, _, _, _, _, [(_, _, _, _, liq, bk)] = impl.detail(acct, **kw)
    long = not acct.positions[0].qty.startswith("-")
    assert (bk < liq) if long else (bk > liq)


# --------------------------------------------------------------------------- pre-trade
@pytest.mark.parametrize("acct,order,kw,code,post_eq,post_im", [
    # JACK buys 1 BTC at the mark 50 000: pnl 0; new notional 50 000 (tier 0), IM 500;
    # 10 000 >= 0 + 500 - 0: accepted.
    pytest.param(JACK_10K_USDT_FLAT, (BTCUSDT, "1", 50_000.0), {}, Code.OK, 10_000, 500, id="accept"),
    # JACK buys 1 BTC at 50 100 (above the mark): pnl 1*(50 000 - 50 100) = -100;
    # 9 900 >= 500: accepted.
    pytest.param(JACK_10K_USDT_FLAT, (BTCUSDT, "1", 50_100.0), {}, Code.OK, 9_900, 500,
                 id="accept-paying-above-mark"),
    # JACK buys 25 BTC: notional 1 250 000 (tier 2), IM 1 250 000*5% - 16 000 = 46 500 > 10 000.
    pytest.param(JACK_10K_USDT_FLAT, (BTCUSDT, "25", 50_000.0), {}, Code.CHECK_INSUFFICIENT_MARGIN,
                 10_000, 46_500, id="reject-4001"),
    # KATE (equity -9 000) sells 5 of her 10 BTC at 49 000: a pure reduction, accepted although
    # -9 000 < IM 8 800 + (245 000*2% - 1 000 - 8 800) = 3 900.
    pytest.param(KATE_1K_USDT_10BTC_LONG_UNDERWATER, (BTCUSDT, "-5", 49_000.0),
                 {"marks": {BTCUSDT: 49_000.0}}, Code.OK, -9_000, 3_900, id="reduce-only-accepted"),
    # KATE sells 15 (flip to short 5): not a reduction; -9 000 < 3 900: rejected.
    pytest.param(KATE_1K_USDT_10BTC_LONG_UNDERWATER, (BTCUSDT, "-15", 49_000.0),
                 {"marks": {BTCUSDT: 49_000.0}}, Code.CHECK_INSUFFICIENT_MARGIN, -9_000, 3_900,
                 id="flip-not-reduce-only-rejected"),
    # LEO's single slot holds BTCUSDT; an ETHUSDT order needs a second slot: 4007, figures as is
    # (equity 100 000, IM 50 000*1% = 500).
    pytest.param(LEO_ONE_SLOT_HOLDING_BTCUSDT, (ETHUSDT, "1", 3_000.0), {"slots": 1},
                 Code.CHECK_POSITION_SLOTS_FULL, 100_000, 500, id="slot-full-4007"),
    # LEO adding to BTCUSDT reuses his slot: 1 more BTC, IM 100 000*2% - 1 000 = 1 000: accepted.
    pytest.param(LEO_ONE_SLOT_HOLDING_BTCUSDT, (BTCUSDT, "1", 50_000.0), {"slots": 1}, Code.OK,
                 100_000, 1_000, id="slot-full-but-same-instrument"),
])
def test_pretrade(impl, acct, order, kw, code, post_eq, post_im):
    instrument, qty, price = order
    got = impl.check(acct, instrument, qty, price, **kw)
    assert got == (int(code), approx(post_eq), approx(post_im))
