"""Takeover planning (engine/liquidation/takeover.py) on a private store, embedded config.

BTCUSDT (instrument 0): contract 1 BTC, qty_scale 1000, price_scale 10; tiers 0: imr
0.008 below 50,000 USDT of notional, 1: imr 0.01 and initial amount 50,000 x (0.01 -
0.008) = 100 from 50,000.

The victim V (id 100): 3,000 USDT, long 1 BTC from 95,000: equity 3,000 + P - 95,000, so
its bankruptcy price is 92,000 (920,000 price units). At the mark 91,000 it is below
bankruptcy (equity -1,000): its order sells 1,000 units limited at 920,000, reason 6003.
"""

from __future__ import annotations

import pytest

from engine.accounting.fills import apply_fill_leg
from engine.codes import Code
from engine.config import ConfigError, default_text, load_default, parse
from engine.liquidation.decide import decide
from engine.liquidation.takeover import Route, TakeoverLeg, TakeoverPolicy, adl_ranking, backstop_price, plan
from engine.risk.margin import full_pass
from engine.store.shm import Store

USDT = 10**6
BTC = 0
V, FUND, LP, S1, S2, S3 = 100, 1, 600, 300, 400, 500


@pytest.fixture
def store():
    cfg = load_default()
    st = Store.create(None, assets=list(cfg.assets), instruments=list(cfg.instruments), accounts_capacity=16,
                      n_partitions=2, slots_per_account=8)
    yield st
    st.detach()


def account(st: Store, acct_id: int, usdt: int, qty_units: int = 0, cost_usdt: int = 0) -> int:
    row = st.add_account(acct_id)
    st.set_balance(row, 0, usdt * USDT)
    if qty_units:
        st.set_position(row, BTC, qty_units, cost_usdt * USDT)
    return row


def at_mark(st: Store, mark: float):
    """The mark published and every account's shared row re-margined (the workers' full
    pass: ADL ranks on the cross equity it writes)."""
    st.publish_mark(BTC, mark, tick_seq=1)
    snap = st.price_snapshot()
    for p in range(st.n_partitions):
        full_pass(st, p, snap)
    return snap


def shorts(st: Store) -> None:
    """Three shorts, ranked for ADL at the mark 91,000 (score = profit ratio x leverage):
    S1 3,000 USDT, -0.3 from 100,000: upnl 30,000 - 27,300 = 2,700, ratio 0.09, leverage
       27,300 / 5,700 = 4.789: score 0.4311;
    S2 2,000 USDT, -0.2 from 95,000: upnl 19,000 - 18,200 = 800, ratio 0.04211, leverage
       18,200 / 2,800 = 6.5: score 0.2737;
    S3 50,000 USDT, -2 from 90,000: upnl -2,000, ratio -0.01111, leverage 182,000 / 48,000
       = 3.792: score -0.01111 / 3.792 = -0.00293 (a loss ranks last)."""
    account(st, S1, 3_000, -300, -30_000)
    account(st, S2, 2_000, -200, -19_000)
    account(st, S3, 50_000, -2_000, -180_000)


def test_the_ranking_puts_profit_times_leverage_first(store):
    v = account(store, V, 3_000, 1_000, 95_000)
    shorts(store)
    snap = at_mark(store, 91_000.0)
    rows, qty, score = adl_ranking(store, snap, BTC, -1, {v})
    ids = [int(store.accounts[r]["account_id"]) for r in rows]
    assert ids == [S1, S2, S3] and qty.tolist() == [-300, -200, -2_000]
    assert score.tolist() == pytest.approx([0.09 * 27_300 / 5_700, 800 / 19_000 * 6.5, -(2_000 / 180_000) / (182_000 / 48_000)])
    # longs are not counterparties of a sell: none ranked for a buy of V's own side
    assert len(adl_ranking(store, snap, BTC, 1, {v})[0]) == 0


def test_the_fund_takes_what_its_margin_allows_and_adl_closes_the_rest(store):
    """The fund (1,000 USDT, no position) buys k units at 92,000 with the mark at 91,000:
    trade PnL -k/1000 x 1,000 = -k USDT; IM (tier 1 from 549.5 units) 0.01 x 91 k - 100.
    Its check holds while 1,000 - k >= 0.91 k - 100, i.e. k <= 575.9: it takes 575 (576:
    424 < 424.16). ADL closes the other 425 at 920,000: S1's 300, then 125 of S2's 200."""
    v = account(store, V, 3_000, 1_000, 95_000)
    account(store, FUND, 1_000)
    shorts(store)
    snap = at_mark(store, 91_000.0)
    (o,) = decide(store, v, snap)
    assert (o.qty_units, o.limit_price_units, o.reason) == (-1_000, 920_000, Code.LIQ_BELOW_BANKRUPTCY)
    legs, size = plan(store, snap, v, BTC, o.qty_units, o.limit_price_units, o.reason,
                      TakeoverPolicy(insurance_fund_account=FUND))
    assert size == 1_000
    assert legs == [TakeoverLeg(Route.INSURANCE_FUND, FUND, -575, 920_000),
                    TakeoverLeg(Route.ADL, S1, -300, 920_000), TakeoverLeg(Route.ADL, S2, -125, 920_000)]
    # Booked as fills (V the taker, no fees): V's position closed at its bankruptcy price,
    # equity 3,000 + (92,000 - 95,000) = 0; money (balances - costs, linear) unchanged.
    before = money(store)
    for leg in legs:
        book_leg(store, v, leg)
    assert all(int(s["qty"]) == 0 for s in store.read_account(v)[1])
    assert int(store.accounts[v]["balance"][0]) == 0
    assert money(store) == before
    # the fund: long 0.575 at 92,000 (cost 52,900 USDT)
    fund_slot = store.slots(store.row_of(FUND))[0]
    assert (int(fund_slot["qty"]), int(fund_slot["cost"])) == (575, 52_900 * USDT)


def test_without_adl_or_below_bankruptcy_the_rest_is_left(store):
    """ADL only follows the fund for an account below bankruptcy (6003): a 6001 order, or
    ``adl = false``, leaves what the fund cannot take."""
    v = account(store, V, 3_000, 1_000, 95_000)
    account(store, FUND, 1_000)
    shorts(store)
    snap = at_mark(store, 91_000.0)
    fund_only = [TakeoverLeg(Route.INSURANCE_FUND, FUND, -575, 920_000)]
    assert plan(store, snap, v, BTC, -1_000, 920_000, Code.LIQ_BELOW_MAINTENANCE,
                TakeoverPolicy(insurance_fund_account=FUND))[0] == fund_only
    assert plan(store, snap, v, BTC, -1_000, 920_000, Code.LIQ_BELOW_BANKRUPTCY,
                TakeoverPolicy(insurance_fund_account=FUND, adl=False))[0] == fund_only


def test_a_backstop_takes_at_a_discount_no_worse_than_bankruptcy_within_its_margin(store):
    """Mark 92,300: V's equity 300, above bankruptcy. A provider buying V's sell pays
    max(920,000, floor(92,300 x (1 - d) x 10)): with d = 0.002, 921,154 (92,115.4); with
    d = 0.005 the discount would pass the bankruptcy price (918,385): 920,000.
    LP (100 USDT) buying k units at 92,115.4: PnL at the mark +0.1846 k, IM (tier 0)
    0.008 x 92.3 k = 0.7384 k: 100 >= 0.5538 k, k <= 180.57: it takes 180 of 400.
    The fund has nothing (0 USDT: even a gain of 0.3 k at 92,000 < IM 0.7384 k)."""
    v = account(store, V, 3_000, 1_000, 95_000)
    account(store, LP, 100)
    account(store, FUND, 0)
    snap = at_mark(store, 92_300.0)
    assert backstop_price(92_300.0, 10, -400, 920_000, 0.002) == 921_154
    assert backstop_price(92_300.0, 10, -400, 920_000, 0.005) == 920_000
    assert backstop_price(91_000.0, 10, -400, 920_000, 0.002) is None      # the limit is above the mark
    policy = TakeoverPolicy(insurance_fund_account=FUND, backstop_accounts=(LP,), backstop_discount=0.002)
    legs, size = plan(store, snap, v, BTC, -400, 920_000, Code.LIQ_BELOW_MAINTENANCE, policy)
    assert (legs, size) == ([TakeoverLeg(Route.BACKSTOP, LP, -180, 921_154)], 400)


def test_an_order_is_held_to_the_position_it_reduces(store):
    """The order was decided before a fill: a sell larger than the long is cut to the long
    (the fund with plenty takes 1,000, not 1,500); a buy of a long (no reduction) or an
    account without the position gives nothing."""
    v = account(store, V, 3_000, 1_000, 95_000)
    account(store, FUND, 1_000_000)
    snap = at_mark(store, 91_000.0)
    policy = TakeoverPolicy(insurance_fund_account=FUND)
    assert plan(store, snap, v, BTC, -1_500, 920_000, 6003, policy) == \
        ([TakeoverLeg(Route.INSURANCE_FUND, FUND, -1_000, 920_000)], 1_000)
    assert plan(store, snap, v, BTC, 500, 920_000, 6003, policy) == ([], 0)
    assert plan(store, snap, v, 1, -500, 920_000, 6003, policy) == ([], 0)
    # the fund is never its own counterparty: its own order gets nothing from itself
    assert plan(store, snap, store.row_of(FUND), BTC, -1, 920_000, 6003, policy) == ([], 0)


def test_a_fund_short_the_instrument_takes_only_what_keeps_it_above_im_and_is_never_deleveraged(store):
    """Review findings (session 19). The fund, 150 USDT short 0.3 from 91,000: buying k <= 300 units
    at 92,000 only reduces its short (the order check lets any reduction through) but
    loses k USDT; post-trade equity 150 - k against IM 0.728 (300 - k): never enough, so it
    takes nothing (it took all 300 and ended at -150 before). Nor is it an ADL
    counterparty (ADL listed it after its own leg, from its position before the plan): ADL
    closes S1's 300, S2's 200 and 500 of S3's 2,000.
    With 1,000 USDT it takes 705: through the reduction and into a long of k - 300, while
    1,000 - k >= 0.728 |300 - k| (tier 0), k <= 1,218.4 / 1.728 = 705.09."""
    v = account(store, V, 3_000, 1_000, 95_000)
    fund = account(store, FUND, 150, -300, -27_300)
    shorts(store)
    snap = at_mark(store, 91_000.0)
    policy = TakeoverPolicy(insurance_fund_account=FUND)
    assert plan(store, snap, v, BTC, -1_000, 920_000, 6003, policy)[0] == [
        TakeoverLeg(Route.ADL, S1, -300, 920_000), TakeoverLeg(Route.ADL, S2, -200, 920_000),
        TakeoverLeg(Route.ADL, S3, -500, 920_000)]
    store.set_balance(fund, 0, 1_000 * USDT)
    snap = at_mark(store, 91_000.0)
    assert plan(store, snap, v, BTC, -1_000, 920_000, 6003, TakeoverPolicy(insurance_fund_account=FUND, adl=False)) \
        == ([TakeoverLeg(Route.INSURANCE_FUND, FUND, -705, 920_000)], 1_000)


def test_rows_with_unapplied_takeover_legs_are_left_out(store):
    """``busy`` (the gateway's rows whose takeover legs are still in the rings): the fund
    among them is skipped (ADL takes it all: S1 300, S2 200, S3 500); a liquidated account
    among them gets nothing until its earlier legs are applied."""
    v = account(store, V, 3_000, 1_000, 95_000)
    fund = account(store, FUND, 1_000_000)
    shorts(store)
    snap = at_mark(store, 91_000.0)
    policy = TakeoverPolicy(insurance_fund_account=FUND)
    legs, _ = plan(store, snap, v, BTC, -1_000, 920_000, 6003, policy, busy={fund})
    assert [(leg.route, leg.counterparty, leg.qty_units) for leg in legs] == \
        [(Route.ADL, S1, -300), (Route.ADL, S2, -200), (Route.ADL, S3, -500)]
    assert plan(store, snap, v, BTC, -1_000, 920_000, 6003, policy, busy={v}) == ([], 0)


def test_the_policy_and_its_configuration_refuse_bad_values():
    with pytest.raises(ValueError, match="after_ms"):
        TakeoverPolicy(insurance_fund_account=1, after_ms=50)
    with pytest.raises(ValueError, match="backstop provider too"):
        TakeoverPolicy(insurance_fund_account=1, backstop_accounts=(1,))
    with pytest.raises(ValueError, match="backstop_discount"):
        TakeoverPolicy(backstop_discount=0.5)
    p = TakeoverPolicy(insurance_fund_account=7, backstop_accounts=(3, 4), backstop_discount=0.01, adl=False,
                       after_ms=300)
    assert TakeoverPolicy.from_arg(p.as_args()[1]) == p and p.role_accounts == {3, 4, 7} and p.enabled
    assert not TakeoverPolicy().enabled
    text = default_text()
    assert parse(text + '\n[liquidation]\ninsurance_fund_account = 7\nbackstop_accounts = [3]\n').liquidation == \
        TakeoverPolicy(insurance_fund_account=7, backstop_accounts=(3,))
    for bad, field in (("backstop_discount = 0.7", "backstop_discount"), ("takeover_after_ms = 5", "after_ms"),
                       ("adl = 1", "liquidation.adl"), ("backstop_accounts = [true]", "backstop_accounts"),
                       ("insurance_fund_account = -1", "insurance_fund_account"), ("fund = 1", "fund")):
        with pytest.raises(ConfigError, match=field):
            parse(text + f"\n[liquidation]\n{bad}\n")


# --------------------------------------------------------------------------- helpers
def book_leg(st: Store, victim_row: int, leg: TakeoverLeg) -> None:
    """A takeover fill as the workers apply it: the victim (taker) ``qty``, the
    counterparty (maker) ``-qty``, same price, no fee."""
    for row, delta in ((victim_row, leg.qty_units), (st.row_of(leg.counterparty), -leg.qty_units)):
        res = apply_fill_leg(st, int(st.accounts[row]["partition"]), row, BTC, delta, leg.price_units, 0,
                             auto_fund=True)
        assert res.code == Code.OK, res


def money(st: Store) -> int:
    """USDT balances minus linear costs over the book: what a fill conserves."""
    total = 0
    for p in range(st.n_partitions):
        lo, hi = st.partition_rows(p)
        for row in range(lo, lo + int(st.partitions[p]["n_accounts"])):
            a, slots = st.read_account(row)
            total += int(a["balance"][0]) - sum(int(s["cost"]) for s in slots)
    return total

