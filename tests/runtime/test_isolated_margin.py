"""ISOLATED_MARGIN: margin moved into, or out of, an isolated position (protocol section 4).

A real Worker object in this process on the engine's own shared memory (embedded config,
one partition). ALICE (isolated by default) holds 10,000 USDT and an isolated long of
1 BTC (BTCUSDT: qty_scale 1000, so 1,000 units) bought at 95,000 with 950 USDT of
isolated margin; the mark is 95,000, so its upnl is 0 and its initial margin is the
default tiers' at a notional of 95,000: tier 1 (floor 50,000, imr 1 %, init amount 100),
95,000 x 1 % - 100 = 850 USDT (a hair above in float64: 0.01 is a little over 1/100).
"""

from __future__ import annotations

import pytest

from engine.codes import Code
from engine.config import load_default
from engine.runtime import recovery
from engine.runtime.ctl import Control, RecordKind
from engine.runtime.journal import Journal
from engine.store.layout import Mode
from feeds.protocol import MsgType, encode
from runtime_support import USDT, in_process_worker

pytestmark = [pytest.mark.timeout(60)]

ALICE, BTC, ETH = 7, 0, 1


def _alice(store) -> None:
    row = store.add_account(ALICE, isolated_default=True)
    store.set_balance(row, 0, 10_000 * USDT)
    store.set_position(row, BTC, 1000, 95_000 * USDT, mode=Mode.ISOLATED, isolated_margin=950 * USDT)
    store.publish_mark(BTC, 95_000.0, tick_seq=1)


def _state(store, row) -> tuple[int, int]:
    """(USDT balance, BTC position's isolated margin), USDT."""
    return (int(store.accounts[row]["balance"][0]) // USDT, int(store.slots(row)[0]["isolated_margin"]) // USDT)


def test_margin_moves_in_and_out_within_the_rules():
    with in_process_worker(_alice) as (w, store, _):
        row = store.row_of(ALICE)
        snap = w.store.price_snapshot()
        move = lambda usdt: w.isolated_margin(row, BTC, usdt * USDT, snap)    # noqa: E731
        # in: 500 -> margin 950 + 500 = 1,450, balance 10,000 - 500 = 9,500
        assert move(500) == (Code.OK, 1_450 * USDT) and _state(store, row) == (9_500, 1_450)
        # out: 599 -> margin 851 >= IM 850.00..., balance 10,099
        assert move(-599) == (Code.OK, 851 * USDT) and _state(store, row) == (10_099, 851)
        # out: 2 more -> 849 < 850: refused 3111, nothing moves
        assert move(-2) == (Code.ISOLATED_BELOW_INITIAL_MARGIN, 851 * USDT) and _state(store, row) == (10_099, 851)
        # out: more than the margin: 3111
        assert move(-900) == (Code.ISOLATED_BELOW_INITIAL_MARGIN, 851 * USDT)
        # in: beyond the balance (20,000 > 10,099): 3104, as a withdrawal of it would be
        assert move(20_000) == (Code.WITHDRAWAL_INSUFFICIENT_BALANCE, 851 * USDT)
        # no isolated position in ETHUSDT: 3110
        assert w.isolated_margin(row, ETH, 10 * USDT, snap) == (Code.NOT_ISOLATED, 0)
        assert _state(store, row) == (10_099, 851)


def test_a_ring_record_is_applied_with_its_outcome_noted_and_the_journal_replays_it(tmp_path):
    """The gateway's record (kind ISOLATED_MARGIN, ticket 31, 250 USDT in) drained by the
    worker: margin 1,200, balance 9,750, outcome (0, 1,200 USDT) noted for the gateway.
    The journal record of the same request, replayed over the book as it was, moves the
    same 250 (the checks were the worker's)."""
    def setup(store) -> None:
        _alice(store)
        ctl = Control.attach(store.name.lstrip("/") + "-ctl")
        assert ctl.push(0, int(RecordKind.ISOLATED_MARGIN), 0, store.row_of(ALICE), 250 * USDT, 0, 0, 31, 1, BTC)

    with in_process_worker(setup) as (w, store, _):
        row = store.row_of(ALICE)
        w.drain(0, w.store.price_snapshot())
        assert _state(store, row) == (9_750, 1_200)
        assert w.ctl.outcome(0, 31) == (0, 1_200 * USDT)
        # the same request from the journal, on the book before it: 10,000 / 950 again
        store.set_balance(row, 0, 10_000 * USDT)
        store.set_position(row, BTC, 1000, 95_000 * USDT, mode=Mode.ISOLATED, isolated_margin=950 * USDT)
        path = str(tmp_path / "j.log")
        j = Journal(path, fsync_interval_s=0)
        j.append(0, 1, encode(MsgType.ISOLATED_MARGIN, {"request_id": 9, "account": ALICE, "instrument_id": BTC,
                                                        "amount_units": 250 * USDT}, seq=1, ts_ns=1))
        # and one naming a position that is not isolated (ETH: none): unreadable, nothing moved
        j.append(0, 2, encode(MsgType.ISOLATED_MARGIN, {"request_id": 10, "account": ALICE, "instrument_id": ETH,
                                                        "amount_units": 5 * USDT}, seq=2, ts_ns=1))
        j.close()
        st = recovery.replay_journal(store, path, 0, [a.name for a in load_default().assets])
        assert (st.isolated_margin_moves, st.unreadable) == (1, 1)
        assert _state(store, row) == (9_750, 1_200)
