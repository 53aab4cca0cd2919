"""Takeovers through a running engine: real worker, gateway and liquidation-gateway
processes, real ZeroMQ sockets and shared memory; the matching engine (the test's
client) never fills the liquidation order, so the takeover does.

Embedded config, BTCUSDT (instrument 0; qty_scale 1000, price_scale 10). The victim V
(100): 3,000 USDT, long 1 BTC from 95,000: bankruptcy price 92,000 (920,000 units). Three
venues tick 91,000: V's equity is 3,000 - 4,000 = -1,000 < 0, its order sells 1,000 units
limited at 920,000 (reason 6003). ``takeover_after_ms`` 200: unanswered by then, its
worker hands it to the gateway.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from engine import config as config_mod
from engine.codes import Code
from engine.liquidation.takeover import TakeoverPolicy
from engine.runtime import recovery
from engine.runtime.harness import wait_until
from runtime_support import USDT, book, money, position, balance, private_store

pytestmark = [pytest.mark.timeout(90)]

BTC = 0
V, FUND, S = 100, 1, 300


def _setup(fund_usdt: int):
    def setup(store) -> None:
        v = store.add_account(V)
        store.set_balance(v, 0, 3_000 * USDT)
        store.set_position(v, BTC, 1_000, 95_000 * USDT)
        f = store.add_account(FUND)
        store.set_balance(f, 0, fund_usdt * USDT)
        s = store.add_account(S)                       # the one short: ADL's only counterparty
        store.set_balance(s, 0, 10_000 * USDT)
        store.set_position(s, BTC, -1_000, -100_000 * USDT)
        store.publish_mark(BTC, 95_000.0, tick_seq=1)
    return setup


def _base(**policy) -> config_mod.Config:
    return dataclasses.replace(config_mod.load_default(),
                               liquidation=TakeoverPolicy(insurance_fund_account=FUND, after_ms=200, **policy))


def _crash_to(run, mark: float) -> dict:
    """Tick the mark down; the liquidation order the engine sends (not filled)."""
    run.client.tick("BTCUSDT", mark)
    o = run.client.order(5.0)
    assert (o["account"], o["qty_units"], o["limit_price_units"], o["reason"]) == \
        (V, -1_000, 920_000, Code.LIQ_BELOW_BANKRUPTCY), o
    return o


def _replayed(run, setup) -> dict:
    """The book the journal rebuilds from the same start (what a restart would load)."""
    st = private_store(run.config, setup)
    try:
        recovery.replay_journal(st, run.engine.journal_path, 0, [a.name for a in run.config.assets])
        return book(st)
    finally:
        st.detach()


def test_the_insurance_fund_takes_an_unfilled_bankrupt_position_at_its_bankruptcy_price(start_engine):
    """Fund 100,000 USDT: it takes all 1,000 units at 92,000 (its check: 100,000 - 1,000 of
    trade loss >= IM 810). V ends flat with 3,000 + (92,000 - 95,000) = 0 USDT; the fund
    holds +1 BTC at cost 92,000; money is conserved; the journal replays the same book."""
    setup = _setup(100_000)
    run = start_engine(setup, base=_base())
    before = money(run.store)
    _crash_to(run, 91_000.0)
    ev = run.client.event(Code.TAKEN_BY_INSURANCE_FUND, 5.0)
    d = json.loads(ev["detail"])
    assert (ev["account"], d["counterparty"], d["qty_units"], d["price_units"]) == (V, FUND, -1_000, 920_000)
    wait_until(lambda: position(run.store, FUND) == (1_000, 92_000 * USDT), 5.0, "the fund's position")
    wait_until(lambda: position(run.store, V)[0] == 0, 5.0, "the victim flat")
    assert balance(run.store, V) == 0 and balance(run.store, FUND) == 100_000 * USDT
    assert position(run.store, S) == (-1_000, -100_000 * USDT)        # no ADL: the fund had enough
    assert money(run.store) == before
    assert _replayed(run, setup) == book(run.store)


def test_what_the_fund_cannot_carry_is_auto_deleveraged_against_the_short(start_engine):
    """Fund 500 USDT: buying k units at 92,000 at the mark 91,000 costs k USDT of trade PnL
    against IM 0.008 x 91 k (tier 0): 500 - k >= 0.728 k, k <= 289.35: it takes 289. The
    other 711 close S's short at 920,000 (ADL, event 6103 naming S): S is left -289, its
    cost -100,000 x 289/1000 = -28,900 USDT and 711 x (100,000 - 92,000) / 1000 = 5,688 USDT
    realized: 15,688. V ends flat at 0 USDT; money is conserved; the journal replays it."""
    setup = _setup(500)
    run = start_engine(setup, base=_base())
    before = money(run.store)
    _crash_to(run, 91_000.0)
    fund = json.loads(run.client.event(Code.TAKEN_BY_INSURANCE_FUND, 5.0)["detail"])
    adl = run.client.event(Code.AUTO_DELEVERAGED, 5.0)
    d = json.loads(adl["detail"])
    assert (fund["qty_units"], fund["price_units"]) == (-289, 920_000)
    assert (adl["account"], d["liquidated_account"], d["qty_units"], d["price_units"]) == (S, V, -711, 920_000)
    wait_until(lambda: position(run.store, S) == (-289, -28_900 * USDT), 5.0, "S deleveraged")
    wait_until(lambda: position(run.store, V)[0] == 0, 5.0, "the victim flat")
    # 0.289 x 92,000 (its leg may be applied after the others: another partition's worker turn)
    wait_until(lambda: position(run.store, FUND) == (289, 26_588 * USDT), 5.0, "the fund's position")
    assert balance(run.store, S) == 15_688 * USDT and balance(run.store, V) == 0
    assert money(run.store) == before
    assert _replayed(run, setup) == book(run.store)


def test_without_a_taker_the_order_goes_back_to_the_market(start_engine):
    """Fund 0 USDT and ADL off: nothing takes it (6104), and the worker's next step is a
    market re-send 2 s after the takeover request (no new order before)."""
    run = start_engine(_setup(0), base=_base(adl=False))
    _crash_to(run, 91_000.0)
    ev = run.client.event(Code.TAKEOVER_NO_ROUTE, 5.0)
    assert ev["account"] == V and json.loads(ev["detail"])["taken_units"] == 0
    again = run.client.order(4.0)
    assert (again["account"], again["qty_units"]) == (V, -1_000)
    assert position(run.store, V) == (1_000, 95_000 * USDT)


def test_a_malformed_takeover_request_is_counted_and_nothing_is_booked(tmp_path):
    """The gateway's takeover intake (an internal socket, but never a crash): a frame that
    is not msgpack, one of the wrong shape, and one naming a row outside the book are
    counted as bad; nothing is journaled (no record written)."""
    import msgpack

    from engine.runtime import gateway as G
    from runtime_support import close_gateway, gateway_state
    root = str(tmp_path)
    cfg, store, ctl, ep = gateway_state(root, 1, [V, FUND])
    g = G.Gateway(cfg.engine.name, ep["fills"], ep["checks"], ep["replies"], ep["events"], root, 1, [0],
                  journal_sync="interval", journal_fsync_interval_s=0,
                  takeover=TakeoverPolicy(insurance_fund_account=FUND))
    try:
        for frame in (b"T\xc1", b"T" + msgpack.packb([1, 2]), b"T" + msgpack.packb([10**6, 0, -1, 920_000, 6003]),
                      b"T" + msgpack.packb(["x", 0, -1, 920_000, 6003])):
            g.on_worker_reply(frame)
        assert g.counters["takeover_bad_requests"] == 4 and g.counters["takeover_requests"] == 0
        # a well-formed one for an account holding nothing: planned, nothing taken (6104), nothing booked
        g.on_worker_reply(b"T" + msgpack.packb([store.row_of(V), BTC, -1_000, 920_000, 6003]))
        assert g.counters["takeover_requests"] == 1 and g.counters["takeover_no_route"] == 1
        assert g.journal.written == 0                  # records appended by this gateway
    finally:
        close_gateway(g, ctl, store)
