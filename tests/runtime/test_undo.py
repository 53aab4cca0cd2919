"""A worker that dies while applying a ring record leaves its undo area *applying*; the
next owner (``Worker.recover``) must tell the two cases apart by the ring's read index
(engine/runtime/ctl.py, "undo area"):

- not committed (read index == the undo's ref): the account may be half written, so it
  is restored from the undo copy and the record is applied again -- once;
- committed (read index past it): the record is done; the account is kept as it is.

A real Worker object in this process on real shared memory (``in_process_worker``); the
dead worker's state is written into the segments the way it leaves them.

ALICE holds 10,000 USDT. The record is a fill leg: ALICE buys 0.1 BTC (100 units of
qty_scale 1000) at 95,000.0 (950,000 price units), no fee: after it, qty 100 and cost
0.1 x 95,000 = 9,500 USDT (9,500,000,000 micro-USDT); balance unchanged.
"""

from __future__ import annotations

import pytest

from engine import _shm
from engine.runtime.ctl import UNDO_APPLYING, UNDO_IDLE, Control, RecordKind
from runtime_support import USDT, in_process_worker

pytestmark = [pytest.mark.timeout(60)]

ALICE, BTC = 1, 0
LEG = (int(RecordKind.FILL_LEG), BTC, None, 100, 950_000, 0, 7, 1, 42)   # row filled in below


def _dead_worker(committed: bool):
    """Setup: ALICE funded; the leg on partition 0's ring; the undo area as a worker
    leaves it when killed in the middle (before the commit: the row half written with
    garbage) or just after the commit (the row holds the applied leg)."""
    def setup(store) -> None:
        row = store.add_account(ALICE)
        store.set_balance(row, 0, 10_000 * USDT)
        ctl = Control.attach(store.name.lstrip("/") + "-ctl")
        assert ctl.push(0, *[row if v is None else v for v in LEG])
        u = ctl.undo[0][0]
        u["row"], u["ref"] = row, 0                            # ring index 0: this record
        u["account"] = store.accounts[row]
        u["slots"] = store.slots(row)
        u["fee_pool"] = store.partitions[0]["fee_pool"]
        u["state"] = UNDO_APPLYING
        if committed:                                          # applied, read index moved past it
            store.set_position(row, BTC, 100, 9_500 * USDT)
            ctl.rings[0][0]["read_idx"] = 1
        else:                                                  # killed half way through the write
            store.set_position(row, BTC, 77, 123)
            store.set_balance(row, 0, -5)
    return setup


@pytest.mark.parametrize("committed", [False, True], ids=["killed-before-commit", "killed-after-commit"])
def test_the_next_owner_applies_the_record_exactly_once(committed):
    with in_process_worker(_dead_worker(committed)) as (w, store, _):     # start() ran recover()
        row = store.row_of(ALICE)
        assert int(w.ctl.undo[0][0]["state"]) == UNDO_IDLE
        w.drain(0, store.price_snapshot())                     # what the ring still holds
        pos = store.slots(row)[0]
        assert int(store.accounts[row]["n_positions"]) == 1
        assert (int(pos["qty"]), int(pos["cost"])) == (100, 9_500 * USDT)   # once, not twice, not garbage
        assert int(store.accounts[row]["balance"][0]) == 10_000 * USDT
        assert int(w.ctl.rings[0][0]["read_idx"]) == 1


def test_a_worker_notes_each_collateral_outcome_before_its_commit():
    """The worker's reply to a deposit can die with it after the commit; so before the
    commit it notes the outcome in the control segment, where the gateway finds it
    (``Gateway.recover_lost_replies``): ticket 55, a deposit of 250 USDT to ALICE's
    10,000 -> code 0, balance 10,250 USDT."""
    def setup(store) -> None:
        row = store.add_account(ALICE)
        store.set_balance(row, 0, 10_000 * USDT)
        ctl = Control.attach(store.name.lstrip("/") + "-ctl")
        assert ctl.push(0, int(RecordKind.DEPOSIT), 0, row, 250 * USDT, 0, 0, 55, 1, 0)

    with in_process_worker(setup) as (w, store, _):
        assert w.ctl.outcome(0, 55) is None
        w.drain(0, store.price_snapshot())
        assert w.ctl.outcome(0, 55) == (0, 10_250 * USDT)
        assert int(w.ctl.rings[0][0]["read_idx"]) == 1


BOB = 2                                   # a new account: the partition's next row (1)
OPEN = (int(RecordKind.OPEN_ACCOUNT), 0, -1, BOB, 0, 0, 9, 1, 0)    # ticket 9, cross


@pytest.mark.parametrize("dead_at", ["inside-the-row-write", "row-written", "row-and-count-written", "committed"])
def test_an_open_account_the_worker_died_in_is_applied_exactly_once(dead_at):
    """OPEN_ACCOUNT of BOB (ALICE holds row 0): the worker saved row 1 (empty) to the undo
    area and died inside the row's seqlock write (its counter left odd, past the used
    rows), after writing the row with garbage, after also counting it (``n_accounts``
    2), or after the commit. Before the commit the next owner frees the
    row (its saved copy, the count back to 1) and applies the record again: BOB at row 1,
    balance 0, 2 accounts, outcome (0, row 1) noted for the gateway; after it, nothing
    is applied again."""
    def setup(store) -> None:
        store.add_account(ALICE)
        ctl = Control.attach(store.name.lstrip("/") + "-ctl")
        assert ctl.push(0, *OPEN)
        u = ctl.undo[0][0]
        u["row"], u["ref"] = 1, 0
        u["account"] = store.accounts[1]
        u["slots"] = store.slots(1)
        u["fee_pool"] = store.partitions[0]["fee_pool"]
        u["state"] = UNDO_APPLYING
        if dead_at == "inside-the-row-write":
            _shm.write_begin(store.addr(store.accounts, 1))
            store.accounts[1]["account_id"] = 77
        elif dead_at == "row-written":
            with store.writing(store.accounts, 1) as a:
                a["account_id"], a["balance"][0] = 77, -5
        else:
            store.set_balance(store.add_account(BOB), 0, -5 if dead_at != "committed" else 0)
            if dead_at == "committed":
                ctl.note_outcome(0, 9, 0, 1)
                ctl.rings[0][0]["read_idx"] = 1

    with in_process_worker(setup) as (w, store, _):         # start() ran recover()
        w.drain(0, w.store.price_snapshot())
        assert int(store.partitions[0]["n_accounts"]) == 2
        assert (int(store.accounts[1]["account_id"]), int(store.accounts[1]["balance"][0])) == (BOB, 0)
        assert w.ctl.outcome(0, 9) == (0, 1)
        assert int(w.ctl.rings[0][0]["read_idx"]) == 1
        assert w.store.row_of(BOB) == 1
        assert int(store.accounts[1]["seq"]) % 2 == 0                # readers see it
        a, _ = store.read_account(1)
        assert int(a["account_id"]) == BOB
