"""What found a breach: every liquidation order's ENGINE_EVENT says its ``stage``.

A real Worker object in this process on real shared memory (the engine's own
``create_state``, the embedded config, one partition), its events on a real ZeroMQ
socket. Two accounts, with the embedded tiers (BTCUSDT tier 1 from 50,000 USDT: mmr
0.005, maintenance amount 50,000 x (0.005 - 0.004) = 50; ETHUSDT tier 1 from 10,000:
mmr 0.0065, amount 10,000 x (0.0065 - 0.005) = 15):

- A: 3,000 USDT, long 1 BTC from 95,000. In breach when
  3,000 + P - 95,000 < 0.005 P - 50, i.e. P < 91,950 / 0.995 = 92,412.06.
- B: 5,000 USDT, long 1 BTC from 95,000 and 10 ETH from 3,400. In breach when
  5,000 + (P - 95,000) + 10 (E - 3,400) < (0.005 P - 50) + (0.065 E - 15), i.e.
  0.995 P + 9.935 E < 123,935: at E = 3,400, P < 90,156 / 0.995 = 90,609.05 (its BTC
  trigger); at E = 3,200, P < 92,143 / 0.995 = 92,606.03.

ETH falls to 3,200 (B stays healthy: 0.995 x 95,000 + 9.935 x 3,200 = 126,317 >
123,935), then BTC to 92,500: above A's liquidation price and above B's BTC trigger,
which was set at ETH 3,400 and, marked stale, waits for idle time to re-solve it, yet B is in
breach (92,500 < 92,606.03). Stage 1a's binary search cannot see it; the holders' pass
(1b) that follows does: stage "holders". BTC then to 92,000 crosses A's trigger: stage
"trigger", sent by 1a itself.
"""

from __future__ import annotations

import json

import pytest

from engine.codes import Code
from engine.runtime.worker import STAGE_COLLATERAL, STAGE_HOLDERS, STAGE_TRIGGER, STAGES, Worker
from feeds.protocol import Message, MsgType, decode
from runtime_support import USDT, in_process_worker

pytestmark = [pytest.mark.timeout(60)]

BTC, ETH = 0, 1                            # instruments 0 and 1 of the embedded config
A, B = 100, 200


def _a_and_b(store) -> None:
    a = store.add_account(A)
    store.set_balance(a, 0, 3_000 * USDT)
    store.set_position(a, BTC, 1000, 95_000 * USDT)               # 1 BTC (qty_scale 1000)
    b = store.add_account(B)
    store.set_balance(b, 0, 5_000 * USDT)
    store.set_position(b, BTC, 1000, 95_000 * USDT)
    store.set_position(b, ETH, 10_000, 34_000 * USDT)             # 10 ETH at 3,400
    store.publish_mark(BTC, 95_000.0, tick_seq=1)
    store.publish_mark(ETH, 3_400.0, tick_seq=1)


@pytest.fixture
def worker():
    with in_process_worker(_a_and_b, events=True, accounts_capacity=16) as ctx:
        yield ctx


def _tick(w: Worker, store, instrument: int, mark: float, seq: int) -> None:
    """A mark, stage 1a and its bookkeeping (as the loop does on a wake-up), then the
    whole holders' pass (1b)."""
    store.publish_mark(instrument, mark, tick_seq=seq)
    w.on_prices()
    w.book_orders(STAGE_TRIGGER)
    while w.holders_pass():
        pass


def _events(w: Worker, sock) -> list[dict]:
    """Flush the worker's held order events and read them off the socket."""
    w.flush_events(None)
    out = []
    while sock.poll(500):
        m = decode(sock.recv())
        assert type(m) is Message and m.type == MsgType.ENGINE_EVENT, m
        out.append({**m.fields, "detail": json.loads(m.fields["detail"])})
        if not sock.poll(50):
            break
    return out


def test_each_order_event_names_the_stage_that_found_the_breach(worker):
    w, store, events = worker
    _tick(w, store, ETH, 3_200.0, 2)
    assert w.counters["orders"] == 0 and _events(w, events) == []       # B healthy at 126,317

    store.publish_mark(BTC, 92_500.0, tick_seq=3)
    w.on_prices()
    w.book_orders(STAGE_TRIGGER)
    assert w.counters["orders"] == 0       # 1a: no trigger crossed (A's 92,412; B's stale 90,609)
    while w.holders_pass():
        pass
    [ev] = _events(w, events)              # 1b: B, in breach below 92,606
    assert (ev["account"], ev["instrument"], ev["code"]) == (B, "BTCUSDT", Code.LIQ_BELOW_MAINTENANCE)
    assert ev["detail"]["stage"] == STAGE_HOLDERS and ev["detail"]["tick_seq"] == 3

    _tick(w, store, BTC, 92_000.0, 4)      # A's trigger crossed
    [ev] = _events(w, events)
    assert (ev["account"], ev["instrument"]) == (A, "BTCUSDT")
    assert ev["detail"]["stage"] == STAGE_TRIGGER and ev["detail"]["tick_seq"] == 4
    assert {k: w.counters[f"orders_{k}"] for k in STAGES} == {
        "trigger": 1, "holders": 1, "collateral": 0, "resend": 0}
    assert w.counters["orders"] == 2


def test_a_trigger_left_stale_by_another_mark_is_re_solved_and_1a_finds_the_breach(worker):
    """The same path, but idle time re-solves BTC's table before BTC moves: ETH's fall
    (-5.9 %, over HolderIndex.DRIFT_REL = 0.5 %) marks it stale at the end of ETH's
    holders' pass; re-solved at ETH 3,200, B's BTC trigger is 92,606.03, so BTC at 92,500
    crosses it and stage 1a sends B's order on the tick."""
    w, store, events = worker
    idx = w.index[0]
    _tick(w, store, ETH, 3_200.0, 2)
    assert idx.dirty[BTC] and not idx.dirty[ETH]       # ETH's own table: exact still
    while idx.refresh_triggers_slice():               # what the loop does when idle
        pass
    assert not idx.dirty.any()

    store.publish_mark(BTC, 92_500.0, tick_seq=3)
    w.on_prices()
    w.book_orders(STAGE_TRIGGER)
    [ev] = _events(w, events)
    assert (ev["account"], ev["instrument"]) == (B, "BTCUSDT")
    assert ev["detail"]["stage"] == STAGE_TRIGGER and ev["detail"]["tick_seq"] == 3
    assert w.counters["orders_holders"] == 0


C = 300
BTC_ASSET = 2                              # assets of the embedded config: USDT, USDC, BTC, ...


def _c_borrowed_usdt_against_btc(store) -> None:
    """C: -8,500 USDT (borrowed: counts in full), 0.1 BTC of collateral (haircut 5 %),
    long 1 BTC perp from 95,000 at the mark 95,000. Equity 0.95 x 0.1 x Pa - 8,500
    against maintenance 0.005 x 95,000 - 50 = 425: at Pa = 95,000 it is 525 (healthy),
    at 93,000 it is 335 (in breach) -- a move of the collateral's price alone."""
    c = store.add_account(C)
    store.set_balance(c, 0, -8_500 * USDT)
    store.set_balance(c, BTC_ASSET, 10_000_000)                   # 0.1 BTC in satoshi
    store.set_position(c, BTC, 1000, 95_000 * USDT)
    store.publish_mark(BTC, 95_000.0, tick_seq=1)
    store.publish_asset_price(BTC_ASSET, 95_000.0)


def test_an_order_found_by_a_collateral_move_is_timed_from_the_tick_that_moved_it():
    """The collateral pass's orders carry, as their tick time, the receive time of the
    tick that moved the asset (the asset row's ts_ns, as the mark-price stage publishes
    it): here a tick received 5 s earlier, so tick->sent is at least 5,000,000 us
    (before, the pass's own start: a few us)."""
    import time

    with in_process_worker(_c_borrowed_usdt_against_btc, events=True, accounts_capacity=16) as (w, store, events):
        received = time.time_ns() - 5_000_000_000
        store.publish_asset_price(BTC_ASSET, 93_000.0, ts_ns=received)
        w.on_prices()
        w.book_orders(STAGE_TRIGGER)
        while w.holders_pass():
            pass
        [ev] = _events(w, events)
    assert (ev["account"], ev["instrument"], ev["detail"]["stage"]) == (C, "BTCUSDT", STAGE_COLLATERAL)
    assert 5_000_000 <= ev["detail"]["tick_to_sent_us"] < 5_000_000 + 60_000_000
