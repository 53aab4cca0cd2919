"""The worker's holders' pass (stage 1b) in slices: a tick waits at most one slice.

A real Worker object in this process, on real shared memory (the engine's own
``create_state``) with the embedded config, one partition, ten accounts long 1 BTC, and
slices of 3 holders (``engine.holders_slice``): a pass takes ceil(10 / 3) = 4 calls.
The pass keeps the snapshot it started at while a newer mark is taken by stage 1a
between its slices; that mark gets a pass of its own afterwards. The aggregates end bit
for bit where a whole pass per mark leaves them (a twin HolderIndex on the same rows).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from engine.risk.margin import HolderIndex
from engine.runtime.worker import Worker
from runtime_support import USDT, in_process_worker

pytestmark = [pytest.mark.timeout(60)]

BTC = 0                                    # instrument 0 of the embedded config
N_HOLDERS, SLICE = 10, 3


def _ten_long_btc(store) -> None:
    for k in range(N_HOLDERS):             # long 1 BTC at 95,000; 3,000 .. 12,000 USDT
        row = store.add_account(100 + k)
        store.set_balance(row, 0, (3_000 + 1_000 * k) * USDT)
        store.set_position(row, BTC, 1000, 95_000 * USDT)
    store.publish_mark(BTC, 95_000.0, tick_seq=1)


@pytest.fixture
def worker():
    with in_process_worker(_ten_long_btc, accounts_capacity=64, holders_slice=SLICE) as (w, store, _):
        yield w, store


def _tick(w: Worker, store, mark: float, seq: int) -> None:
    """Publish a mark and run stage 1a and its bookkeeping, as the loop does on a wake-up."""
    store.publish_mark(BTC, mark, tick_seq=seq)
    w.on_prices()
    w.book_orders()


def _twin(w: Worker, store) -> HolderIndex:
    """A second index on the same rows at the worker's basis (its aggregates as loaded)."""
    twin = HolderIndex(store, 0)
    twin.refresh(w.snap)
    return twin


def test_a_pass_runs_in_slices_and_keeps_its_snapshot(worker):
    w, store = worker
    idx = w.index[0]
    assert idx.holders(BTC) == N_HOLDERS
    twin = _twin(w, store)
    assert np.array_equal(twin.agg, idx.agg)
    basis_before = idx.basis[BTC].copy()

    _tick(w, store, 93_000.0, 2)
    assert list(w.pending_pass) == [BTC]
    snap_93k = w.snap
    assert w.holders_pass() is True        # slice 1 of 4: holders 0..2
    assert w.holders_job[0] is snap_93k and w.holders_job[2] == SLICE
    assert not w.pending_pass              # taken by the pass

    _tick(w, store, 92_000.0, 3)           # a newer mark between two slices: 1a only
    assert list(w.pending_pass) == [BTC]   # its own pass comes later
    assert w.holders_job[0] is snap_93k    # this pass stays at 93,000
    assert w.holders_pass() is True        # slice 2: holders 3..5
    assert w.holders_pass() is True        # slice 3: holders 6..8
    assert np.array_equal(idx.basis[BTC], basis_before)    # not moved before the last slice
    assert w.holders_pass() is False       # slice 4: holder 9, the basis moves to 93,000
    assert w.holders_job is None
    out = np.empty(64, np.int64)
    twin.tick(BTC, snap_93k, out)          # the whole pass at 93,000
    assert np.array_equal(idx.agg, twin.agg) and np.array_equal(idx.basis, twin.basis)

    snap_92k = w.snap                      # the second pass, at 92,000: 4 calls again
    assert [w.holders_pass() for _ in range(4)] == [True, True, True, False]
    twin.tick(BTC, snap_92k, out)
    assert np.array_equal(idx.agg, twin.agg) and np.array_equal(idx.basis, twin.basis)
    assert float(snap_92k.marks[BTC]) == 92_000.0
    assert w.holders_pass() is False and w.holders_job is None     # nothing pending


def test_holders_slice_must_be_positive(worker):
    w, _ = worker
    with pytest.raises(ValueError, match="holders_slice: at least 1, got 0"):
        Worker(w.name, 0, [0], orders_endpoint="inproc://none", replies_endpoint="inproc://none2",
               holders_slice=0)


def test_a_worker_that_fails_to_start_leaves_no_shared_memory():
    """The fixture's helper releases what it made when a step fails (here the Worker's
    own argument check), so a failing test does not leak segments into /dev/shm."""
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ValueError, match="holders_slice: at least 1, got 0"):
        with in_process_worker(_ten_long_btc, accounts_capacity=64, holders_slice=0):
            pass
    assert set(os.listdir("/dev/shm")) - before == set()
