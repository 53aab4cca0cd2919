"""Sorting one instrument's solved trigger prices into its two tables, in bounded steps.

A trigger table (``HolderIndex.triggers``) holds, per side, the holders' trigger prices in
ascending order with their account rows: -inf first, the finite triggers, +inf, NaN last
(the order a plain ``argsort`` gives). At 100k holders one argsort of a side held the
worker ~1.2 ms, a stall for any tick that arrived meanwhile. ``TriggerSort`` does the
same work in steps of bounded size:

1. **Runs.** One step takes ``CHUNK_HOLDERS`` holders, splits them by side (long: qty > 0,
   short: qty < 0) and sorts each side's triggers into a run (numpy ``argsort``; -inf and
   +inf sort as numbers, a NaN trigger is set apart for the end).
2. **Merges.** Bottom-up, pairs of neighbouring runs are merged (``merge_step``, the
   stable Cython merge ``_margin.merge_runs``), at most ``MERGE_PAIRS`` pairs a step,
   resuming mid-merge, until one run per side is left.
3. **Tables.** Each side's merged run, then its NaN triggers.

The result is a function of the triggers, the holders and ``CHUNK_HOLDERS`` only, not of
the step sizes: a table sorted in many steps equals one sorted in one call
(``run()``), bit for bit, ties included (a tie keeps the order of the chunks and, within
a chunk, numpy's deterministic argsort order).
"""

from __future__ import annotations

import numpy as np

from engine import _margin


def merge_step(src_key: np.ndarray, src_val: np.ndarray, dst_key: np.ndarray, dst_val: np.ndarray,
               lo: int, mid: int, hi: int, i: int, j: int, limit: int) -> tuple[int, int]:
    """Checked call of ``_margin.merge_runs``: merge ascending ``src[lo:mid]`` and
    ``src[mid:hi]`` into ``dst[lo:hi]`` from cursors ``i`` (left) and ``j`` (right), at
    most ``limit`` pairs; a tie takes the left pair. Returns the cursors after the step."""
    n = len(src_key)
    if not (len(src_val) == n and len(dst_key) >= hi and len(dst_val) >= hi):
        raise ValueError("merge_step: keys and values of one length, dst at least hi long")
    if not 0 <= lo <= i <= mid <= j <= hi <= n:
        raise ValueError(f"merge_step: need 0 <= lo {lo} <= i {i} <= mid {mid} <= j {j} "
                         f"<= hi {hi} <= {n}")
    if limit < 0:
        raise ValueError(f"merge_step: limit {limit} < 0")
    return _margin.merge_runs(src_key, src_val, dst_key, dst_val, lo, mid, hi, i, j, limit)


def merge_step_reference(src_key, src_val, dst_key, dst_val, lo: int, mid: int, hi: int,
                         i: int, j: int, limit: int) -> tuple[int, int]:
    """The same rule as ``merge_step``, in plain Python (the tests hold the kernel to it)."""
    k = lo + (i - lo) + (j - mid)
    for _ in range(limit):
        if i < mid and (j >= hi or not src_key[j] < src_key[i]):
            dst_key[k], dst_val[k] = src_key[i], src_val[i]
            i += 1
        elif j < hi:
            dst_key[k], dst_val[k] = src_key[j], src_val[j]
            j += 1
        else:
            break
        k += 1
    return i, j


class _Side:
    """One side's triggers while they are sorted: the (trigger, row) pairs in runs, then
    their merges; the rows of NaN triggers (none in a sane book) apart, in holder order."""

    def __init__(self):
        self.nan: list[np.ndarray] = []
        self.run_keys: list[np.ndarray] = []
        self.run_rows: list[np.ndarray] = []
        self.key, self.row = np.empty(0), np.empty(0, np.int64)      # the pairs, runs in order
        self.dst_key, self.dst_row = self.key, self.row                # a merge level's output
        self.bounds: list[int] = []           # run edges in key/row: [0, ..., n]
        self.pair = 0                         # the merge in progress: runs 2 pair, 2 pair + 1
        self.cur: tuple[int, int] | None = None    # its cursors (i, j), None before it starts

    def add(self, trig: np.ndarray, rows: np.ndarray) -> None:
        """One run: ``trig`` ascending with its rows (-inf and +inf sort and merge as
        numbers; a NaN, which compares false both ways, is kept apart for the end)."""
        nan = np.isnan(trig)
        if nan.any():
            self.nan.append(rows[nan])
            trig, rows = trig[~nan], rows[~nan]
        if len(trig):
            o = np.argsort(trig)
            self.run_keys.append(trig[o])
            self.run_rows.append(rows[o])

    def start_merging(self) -> None:
        sizes = [len(k) for k in self.run_keys]
        self.bounds = [0, *np.cumsum(sizes).tolist()] if sizes else [0]
        self.key = np.concatenate(self.run_keys) if sizes else np.empty(0)
        self.row = np.concatenate(self.run_rows) if sizes else np.empty(0, np.int64)
        self.run_keys = self.run_rows = []
        self.dst_key, self.dst_row = np.empty_like(self.key), np.empty_like(self.row)

    @property
    def merged(self) -> bool:
        return len(self.bounds) <= 2

    def merge(self, budget: int) -> int:
        """Merge for at most ``budget`` pairs; return the pairs written."""
        done = 0
        while done < budget and not self.merged:
            b = self.bounds
            lo = b[2 * self.pair]
            if 2 * self.pair + 2 < len(b):
                mid, hi = b[2 * self.pair + 1], b[2 * self.pair + 2]
                i, j = self.cur if self.cur is not None else (lo, mid)
                i2, j2 = merge_step(self.key, self.row, self.dst_key, self.dst_row, lo, mid, hi,
                                    i, j, budget - done)
                done += (i2 - i) + (j2 - j)
                if i2 < mid or j2 < hi:
                    self.cur = (i2, j2)
                    continue
            else:                                   # an odd run out: copied to the level below
                hi = b[-1]
                self.dst_key[lo:hi] = self.key[lo:hi]
                self.dst_row[lo:hi] = self.row[lo:hi]
                done += hi - lo
            self.cur = None
            self.pair += 1
            if 2 * self.pair + 1 >= len(b):         # a level done: its merges are the runs
                self.bounds = b[::2] if (len(b) - 1) % 2 == 0 else [*b[::2], b[-1]]
                self.pair = 0
                self.key, self.dst_key = self.dst_key, self.key
                self.row, self.dst_row = self.dst_row, self.row
        return done

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        nan = np.concatenate(self.nan) if self.nan else np.empty(0, np.int64)
        return (np.concatenate([self.key, np.full(len(nan), np.nan)]),
                np.concatenate([self.row, nan]).astype(np.int64, copy=False))


class TriggerSort:
    """One instrument's solved triggers sorted into ``(long_t, long_rows, short_t,
    short_rows)`` in steps (module docstring). ``trig``, ``qty`` and ``rows`` are the
    holders' triggers, signed quantities and account rows, one per holder; they must not
    change while the sort runs (the caller starts a new one when the holders change)."""

    CHUNK_HOLDERS = 4_096     # one run step: ~4k holders split and sorted, ~60-130 us
    MERGE_PAIRS = 16_384      # one merge step: ~16k pairs written, ~80 us (~5 ns a pair)

    def __init__(self, trig: np.ndarray, qty: np.ndarray, rows: np.ndarray):
        if not len(trig) == len(qty) == len(rows):
            raise ValueError(f"TriggerSort: {len(trig)} triggers, {len(qty)} quantities, "
                             f"{len(rows)} rows: one each per holder")
        self.trig, self.qty, self.rows = trig, qty, rows
        self.h = 0                                    # holders split into runs so far
        self.sides = (_Side(), _Side())               # longs, shorts

    @property
    def done(self) -> bool:
        return self.h >= len(self.trig) and all(s.merged for s in self.sides)

    def step(self) -> bool:
        """One bounded piece of work; returns ``done``."""
        n = len(self.trig)
        if self.h < n:                                # 1. runs
            h1 = min(n, self.h + self.CHUNK_HOLDERS)
            t, q, r = self.trig[self.h:h1], self.qty[self.h:h1], self.rows[self.h:h1]
            self.sides[0].add(t[q > 0], r[q > 0])
            self.sides[1].add(t[q < 0], r[q < 0])
            self.h = h1
            if self.h >= n:
                for s in self.sides:
                    s.start_merging()
            return self.done
        budget = self.MERGE_PAIRS                     # 2. merges, longs then shorts
        for s in self.sides:
            budget -= s.merge(budget)
            if budget <= 0:
                break
        return self.done

    def run(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every remaining step, then the tables."""
        while not self.step():
            pass
        return self.tables()

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """3. ``(long_t, long_rows, short_t, short_rows)``, once ``done``."""
        if not self.done:
            raise RuntimeError("TriggerSort.tables: the sort is not done")
        return (*self.sides[0].table(), *self.sides[1].table())
