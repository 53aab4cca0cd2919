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
import tempfile
import time

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
        "trigger": 1, "holders": 1, "collateral": 0, "fill": 0, "resend": 0}
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


def _c_against_btc(usdt_debt: int):
    """C: -``usdt_debt`` USDT (borrowed: counts in full), 0.1 BTC of collateral (haircut
    5 %: 0.095 x the BTC price in USD), long 1 BTC perp from 95,000 at the mark 95,000."""
    def setup(store) -> None:
        c = store.add_account(C)
        store.set_balance(c, 0, -usdt_debt * USDT)
        store.set_balance(c, BTC_ASSET, 10_000_000)                   # 0.1 BTC in satoshi
        store.set_position(c, BTC, 1000, 95_000 * USDT)
        store.publish_mark(BTC, 95_000.0, tick_seq=1)
        store.publish_asset_price(BTC_ASSET, 95_000.0)
    return setup


def test_a_collateral_move_crossing_a_trigger_is_sent_by_1a_timed_from_its_tick():
    """C owes 8,500 USDT: equity 0.095 Pa - 8,500 against maintenance 0.005 x 95,000 - 50
    = 425, so its collateral trigger (solved at start-up) is Pa = 95,000 - (525 - 425) /
    0.095 = 93,947.37. BTC's collateral price falls to 93,000 (a tick received 5 s ago):
    the trigger is crossed and stage 1a's bookkeeping sends C's order at once -- no
    holders' pass, no collateral pass -- stamped with that tick's receive time, so
    tick->sent is at least 5,000,000 us."""
    import time

    with in_process_worker(_c_against_btc(8_500), events=True, accounts_capacity=16) as (w, store, events):
        received = time.time_ns() - 5_000_000_000
        store.publish_asset_price(BTC_ASSET, 93_000.0, ts_ns=received)
        w.on_prices()
        w.book_orders(STAGE_TRIGGER)
        [ev] = _events(w, events)
        assert w.counters["orders_trigger"] == 1 and w.counters["orders_collateral"] == 0
    assert (ev["account"], ev["instrument"], ev["detail"]["stage"]) == (C, "BTCUSDT", STAGE_TRIGGER)
    assert 5_000_000 <= ev["detail"]["tick_to_sent_us"] < 5_000_000 + 60_000_000


def test_a_breach_a_stale_collateral_trigger_misses_is_found_by_the_collateral_pass():
    """C owes 8,000 USDT: equity 1,025 at the start, trigger Pa = 95,000 - 600 / 0.095 =
    88,684.21. BTC's mark falls to 94,500 (C loses 500: equity 525 against maintenance
    0.005 x 94,500 - 50 = 422.5, healthy), which leaves that trigger stale (at the new
    mark it would be 95,000 - 102.5 / 0.095 = 93,921.05). BTC's collateral price then
    falls to 93,500 (a tick received 5 s ago): above the stale trigger, so 1a sends
    nothing, but C is in breach (0.095 x 93,500 - 8,500 = 382.5 < 422.5): the collateral
    pass in 1b sends it, stage "collateral", timed from that tick."""
    import time

    with in_process_worker(_c_against_btc(8_000), events=True, accounts_capacity=16) as (w, store, events):
        _tick(w, store, BTC, 94_500.0, 2)
        assert w.counters["orders"] == 0
        received = time.time_ns() - 5_000_000_000
        store.publish_asset_price(BTC_ASSET, 93_500.0, ts_ns=received)
        w.on_prices()
        w.book_orders(STAGE_TRIGGER)
        assert w.counters["orders"] == 0                        # the stale trigger: 1a misses it
        while w.holders_pass():
            pass
        [ev] = _events(w, events)
    assert (ev["account"], ev["instrument"], ev["detail"]["stage"]) == (C, "BTCUSDT", STAGE_COLLATERAL)
    assert 5_000_000 <= ev["detail"]["tick_to_sent_us"] < 5_000_000 + 60_000_000


def test_a_fill_that_leaves_an_account_in_breach_gets_its_next_order_at_once(worker):
    """A (3,000 USDT, long 1 BTC from 95,000; its trigger 92,412.06): BTC at 92,000
    crosses it and 1a sends A's order. Its fill comes back worse than the mark: A sells
    0.1 BTC at 91,000, realizing 0.1 x (91,000 - 95,000) = -400, so the balance is 2,600
    and the 0.9 BTC left are worth 0.9 x (92,000 - 95,000) = -2,700: equity -100, below
    bankruptcy. The fill clears A's outstanding flag and, applied, is checked at once:
    the next order (the rest, 900 units, in full) goes out from the drain itself, stage
    "fill", before any holders' pass or sweep."""
    from engine.runtime.ctl import RecordKind
    from engine.runtime.worker import STAGE_FILL

    w, store, events = worker
    _tick(w, store, BTC, 92_000.0, 2)
    [first] = _events(w, events)
    assert (first["account"], first["detail"]["stage"]) == (A, STAGE_TRIGGER)
    row = store.row_of(A)
    assert w.ctl.push(0, RecordKind.FILL_LEG, BTC, row, -100, 910_000, 0, 1, 1_000, 0)  # sell 0.1 at 91,000
    w.drain(0, w.snap)
    [ev] = _events(w, events)
    assert (ev["account"], ev["detail"]["stage"], ev["detail"]["qty_units"]) == (A, STAGE_FILL, -900)
    assert w.counters["orders_fill"] == 1


def test_an_account_is_decided_again_only_once_each_of_its_orders_had_a_fill(worker):
    """BTC at 85,000: B (5,000 USDT, 1 BTC from 95,000, 10 ETH from 3,400) has equity
    5,000 + (85,000 - 95,000) + 10 (3,400 - 3,400) = -5,000 < 0, so 1a closes everything:
    sell 1,000 BTC units and sell 10,000 ETH units (6003). The BTC order's fill comes
    back first (sell 1 BTC at 85,000: realized -10,000, balance -5,000); the ETH order's
    fill is still on its way, so B must not be decided again yet: that would send a
    second sell of the 10 ETH, 20 ETH of sells against a 10 ETH position (it did). Then
    the ETH fill, half of it (5 ETH at 3,400, realized 0; the order is immediate-or-
    cancel, the rest cancelled): each order has had a fill, B is decided again at once
    (stage "fill"): E = -5,000 + 5 x (3,400 - 3,400) = -5,000 < 0, sell the 5,000 ETH
    units left."""
    from engine.runtime.ctl import RecordKind
    from engine.runtime.worker import STAGE_FILL

    w, store, events = worker
    _tick(w, store, BTC, 85_000.0, 2)
    got = sorted((e["account"], e["instrument"], e["detail"]["qty_units"], e["code"]) for e in _events(w, events))
    assert got == [(A, "BTCUSDT", -1_000, Code.LIQ_BELOW_BANKRUPTCY),     # A: 3,000 - 10,000 < 0 too
                   (B, "BTCUSDT", -1_000, Code.LIQ_BELOW_BANKRUPTCY),
                   (B, "ETHUSDT", -10_000, Code.LIQ_BELOW_BANKRUPTCY)]
    row = store.row_of(B)
    ps = store.instruments["price_scale"]
    assert w.ctl.push(0, RecordKind.FILL_LEG, BTC, row, -1_000, 85_000 * int(ps[BTC]), 0, 1, 1_000, 0)
    w.drain(0, w.snap)
    assert _events(w, events) == [] and w.counters["orders_fill"] == 0
    assert int(store.accounts[row]["flags"]) & 1                          # still outstanding
    assert w.ctl.push(0, RecordKind.FILL_LEG, ETH, row, -5_000, 3_400 * int(ps[ETH]), 0, 2, 1_000, 0)
    w.drain(0, w.snap)
    [ev] = _events(w, events)
    assert (ev["account"], ev["instrument"], ev["detail"]["qty_units"], ev["detail"]["stage"]) == \
        (B, "ETHUSDT", -5_000, STAGE_FILL)


def test_records_that_waited_longer_than_the_bound_are_seen_as_due(worker):
    """The loop applies fills before taking newer ticks once the oldest waiting record
    was received more than FILLS_MAX_WAIT_NS (500 us) ago: a record stamped 1 ms ago is
    due, one stamped now is not, an empty ring never is."""
    import time

    from engine.runtime.ctl import RecordKind
    from engine.runtime.worker import FILLS_MAX_WAIT_NS

    w, store, _ = worker
    assert FILLS_MAX_WAIT_NS == 500_000
    assert not w._records_waited(FILLS_MAX_WAIT_NS)                              # nothing waits
    row = store.row_of(A)
    assert w.ctl.push(0, RecordKind.FILL_LEG, BTC, row, 1, 950_000, 0, 1, time.time_ns(), 0)
    assert not w._records_waited(FILLS_MAX_WAIT_NS)                              # just received
    w.drain(0, w.snap)
    assert w.ctl.push(0, RecordKind.FILL_LEG, BTC, row, 1, 950_000, 0, 2, time.time_ns() - 1_000_000, 0)
    assert w._records_waited(FILLS_MAX_WAIT_NS)                                  # 1 ms: due


def test_orders_the_matching_engine_does_not_take_are_dropped_not_waited_for(worker):
    """The matching engine's orders PULL is gone and the worker's queue is full (a queue
    of one here, no receiver): a tick that breaches A must not stop the worker on a
    blocking send -- the order is dropped and counted, A stays flagged outstanding (its
    order goes out again after REISSUE_AFTER_NS if still in breach)."""
    import zmq

    w, store, _ = worker
    stuck = w.zctx.socket(zmq.PUSH)
    stuck.setsockopt(zmq.SNDHWM, 1)
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.connect(f"ipc://{tempfile.mkdtemp()}/nobody.sock")
    stuck.send(b"fills the queue of one", zmq.NOBLOCK)
    w.orders.close(0)
    w.orders = stuck
    _tick(w, store, BTC, 92_000.0, 2)                     # crosses A's trigger (92,412.06)
    assert w.counters["orders_dropped"] == 1 and w.counters["orders"] == 1
    assert int(store.accounts[store.row_of(A)]["flags"]) & 1   # outstanding: re-sent later


def test_a_worker_waits_out_a_torn_price_row_instead_of_dying(worker):
    """The mark-price stage's writer killed inside a price row's write: until its restart
    finishes the row, prices cannot be read. A worker's loop counts that and waits (it
    raised and died before, and crash-looped through restarts until the row was whole);
    once the row is whole it goes on: a breach is still found and its order sent."""
    import threading

    import zmq

    from engine import _shm

    w, store, _ = worker
    runner = threading.Thread(target=w.run, daemon=True)
    addr = store.addr(store.prices, ETH)
    t0 = time.monotonic()
    runner.start()
    try:
        deadline = time.monotonic() + 10                            # run() starts again: once its
        while w.last_upkeep <= t0 and time.monotonic() < deadline:   # start-up pass is done, the
            time.sleep(0.01)                                        # loop is next (a torn row
        assert w.last_upkeep > t0                                   # at start-up is a start failure)
        _shm.write_begin(addr)                                      # the writer dies here
        deadline = time.monotonic() + 10
        while w.counters["prices_unreadable"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.counters["prices_unreadable"] >= 2 and runner.is_alive()
        _shm.write_end(addr)                                        # its restart finishes it
        store.publish_mark(BTC, 92_000.0, tick_seq=2)               # crosses A's trigger (92,412.06)
        w.ctl.ring_all()
        deadline = time.monotonic() + 10
        while w.counters["orders"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.counters["orders"] >= 1 and runner.is_alive()
    finally:
        w.ctl.request_shutdown()
        w.ctl.ring_all()
        runner.join(10)
    assert not runner.is_alive()
