"""Per-kernel micro-benchmarks (pytest-benchmark). Not part of the test suite::

    pytest bench/test_kernel_bench.py --benchmark-columns=min,median,max,rounds

The book is the one of ``bench/kernel.py`` (40 instruments, 3 assets), 100,000 accounts
x 4 positions in a real POSIX shared-memory segment, 10 % of them holding instrument 0.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from bench import kernel
from engine.risk import margin

N_ACCOUNTS = 100_000
K = 4


@pytest.fixture(scope="module")
def book():
    store = kernel.build_store(f"me-bench-micro-{os.getpid()}", N_ACCOUNTS, K, quiet=True)
    try:
        snap = store.price_snapshot()
        margin.full_pass(store, 0, snap)
        yield store, snap
    finally:
        store.unlink()
        store.detach()


def test_full_pass_100k(benchmark, book):
    store, snap = book
    n_liq, _ = benchmark(margin.full_pass, store, 0, snap)
    assert n_liq > 0


def test_numpy_pass_100k(benchmark, book):
    store, snap = book
    benchmark.pedantic(kernel.numpy_pass, args=(store, 0, snap), kwargs={"write": False},
                       rounds=5, warmup_rounds=1)


def test_incremental_tick_10pct_holders(benchmark, book):
    store, snap = book
    index = margin.HolderIndex(store, 0)
    index.refresh(snap)
    assert index.holders(kernel.TICK_INSTRUMENT) == N_ACCOUNTS // 10
    marks = itertools.cycle([kernel._snapshot_with_mark(snap, kernel.TICK_INSTRUMENT, f)
                             for f in (1.001, 0.999)])
    out = np.empty(4096, np.int64)
    benchmark(lambda: index.tick(kernel.TICK_INSTRUMENT, next(marks), out))
    margin.full_pass(store, 0, snap)        # aggregates back to the shared snapshot


def test_account_detail(benchmark, book):
    store, snap = book
    d = benchmark(margin.account_detail, store, 12_345, snap)
    assert len(d.positions) == K


def test_pretrade_check(benchmark, book):
    store, snap = book
    r = benchmark(margin.pretrade_check, store, 12_345, 1, 10, 3_400.0, snap)
    assert r.code is not None
