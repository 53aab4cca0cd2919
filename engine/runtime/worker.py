"""Margin worker: the only writer of its partitions' accounts.

Loop (one iteration per doorbell ring, or per timeout; with ``engine.price_stage =
"worker"`` worker 0 also runs the mark-price stage and wakes on the oracle socket too,
see ``TickWake``)::

    1. prices   -- 1a, the hot path, in C (``engine._margin.TickPath``): for each mark
                   whose sequence number moved, the accounts whose trigger price it
                   crossed get their liquidation orders at once, encoded in C and sent;
                   the bookkeeping (outstanding table) after they are out;
                   a blocking worker then leaves the CPU to the orders' I/O for up to
                   ``ORDERS_OUT_QUIET_NS`` (a new tick ends the pause), then sends
                   the orders' events;
                   1b, when no newer mark waits: collateral prices that moved,
                   then the incremental pass over the instrument's holders (and the
                   breaches stale triggers missed), a slice of ``engine.holders_slice``
                   holders a turn: a new tick waits at most one slice, and nothing but
                   1a runs until the pass is whole
    2. commands -- fill legs, deposits, withdrawals, account opens and isolated-margin
                   moves from the partitions' rings,
                   each applied under undo protection, then the touched accounts are
                   re-margined from scratch
    3. upkeep   -- in slices between wake-ups: every ``OUTSTANDING_CHECK_S`` the
                   accounts with an order outstanding (cleared once healthy, orders
                   still in breach re-sent after 2 s, or -- with a [liquidation]
                   fund or backstop -- taken over after ``after_ms``: handed to the
                   gateway, engine/liquidation/takeover.py); every ``full_pass_interval_s``
                   (1 s, or accounts / 250k s) a full pass rewriting the shared rows and
                   resetting the private aggregates at the basis (float drift),
                   heartbeat; every 30 s all trigger tables marked stale; stale ones
                   re-sorted when idle. Between two slices the worker yields its CPU
                   (blocking and yielding waits), so the ZeroMQ I/O threads run first

Started by the supervisor as ``python -m engine.runtime.worker`` with its partitions,
CPU and wait strategy; pinned with ``os.sched_setaffinity``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import os
import sys
import threading
import time

import msgpack
import numpy as np
import zmq

from engine import _fills, _margin, _shm
from engine.accounting.fills import INT64_MAX
from engine.codes import Code
from engine.config import EngineSettings
from engine.liquidation.decide import DEFAULT_HEALTH_FACTOR, decide
from engine.liquidation.takeover import TAKEOVER_PREFIX, TakeoverPolicy
from engine.risk.margin import HolderIndex, _checked_snapshot, full_pass, account_detail
from engine.runtime import curve, process
from engine.runtime.ctl import Control, RecordKind, Role, UNDO_APPLYING, UNDO_IDLE
from engine.runtime.markprice import SETTLE_SLICE, MarkPriceProcess, oracle_params
from engine.store.layout import AccountFlag, PRICE_FROZEN
from engine.store.shm import CapacityError, PricesUnreadable, Store
from feeds.oracle.index import OracleParams
from feeds.protocol import MsgType, Sequencer

WAITS = {"blocking": _shm.WAIT_BLOCKING, "yielding": _shm.WAIT_YIELDING, "busy-spin": _shm.WAIT_BUSY_SPIN}
REISSUE_AFTER_NS = 2_000_000_000     # re-send a liquidation still in breach after this
UPKEEP_SLICE_ROWS = 256              # accounts per full-pass slice (~20 us at 1M accounts x 2 positions,
                                     # bookkeeping included: a tick waits at most that)
CHECK_SLICE_ROWS = 16                # outstanding accounts per check slice: each still in breach after
                                     # 2 s is re-sent (~3 us an order); 256 a slice held the worker
                                     # 250-850 us at 2,000 ticks/s (bench latency)
HOLDERS_SLICE = EngineSettings.holders_slice  # holders per slice of the holders' pass (1b) by default:
                                     # ~2 ns a holder, so ~20 us with the call at 8,192; a 100k-holder
                                     # pass whole held the worker ~200 us
EVENTS_PER_FLUSH = 8                 # events sent per flush (a turn of the loop): ~80 us at most, where
                                     # the re-sends of one outstanding check (256 accounts) sent at once
                                     # held the worker 2-4 ms at 2,000 ticks/s (bench latency)
OUTSTANDING_CHECK_S = 0.1            # accounts with an order outstanding re-margined this often:
                                     # cleared once healthy, re-sent after REISSUE_AFTER_NS
FULL_PASS_ACCOUNTS_PER_S = 250_000   # default full-pass interval: max(1 s, accounts / this)
RESYNC_INTERVAL_S = 30.0             # re-sort every trigger table at least this often
# A blocking worker that has just handed a tick's orders to ZeroMQ waits this long (any
# new tick still gets its stage 1a at once) before its heavy work -- the holders' pass,
# fills, upkeep -- so that the I/O thread writing the orders to the wire, and the
# matching engine reading them, get the CPU first. On 2 shared cores, without it, the
# worker's 200 us holders' pass ran first: orders sent -> received p99 728 us; with it,
# 174 us, and 143 us with short scheduler slices too (process.short_slices). Bench
# latency, 1M accounts, --price-stage worker; the A/B is in docs/architecture.md.
ORDERS_OUT_QUIET_NS = 200_000
# Fills wait behind newer ticks at most this long (measured from the gateway's receipt):
# then the worker applies them before taking the next tick (engine.fills_max_wait_us).
FILLS_MAX_WAIT_NS = EngineSettings.fills_max_wait_us * 1000
# Which stage found a breach (the ``stage`` of a liquidation's ENGINE_EVENT detail):
STAGE_TRIGGER = "trigger"            # 1a: the mark crossed the account's trigger price (hot path)
STAGE_HOLDERS = "holders"            # 1b: the holders' pass, a breach the triggers missed (stale
                                     #   after other marks moved); timed from that mark's receipt
STAGE_COLLATERAL = "collateral"      # the collateral pass, after a collateral asset's price moved
STAGE_FILL = "fill"                  # a fill of an account with an order out left it in breach
                                     #   (a partial liquidation's next step); timed from the fill
STAGE_RESEND = "resend"              # still in breach REISSUE_AFTER_NS after its order: no tick
STAGES = (STAGE_TRIGGER, STAGE_HOLDERS, STAGE_COLLATERAL, STAGE_FILL, STAGE_RESEND)
POLLIN = int(zmq.POLLIN)             # a plain int: the enum's __and__ costs microseconds


class Worker:
    def __init__(self, name: str, worker_id: int, partitions: list[int], *, wait: str = "blocking",
                 orders_endpoint: str, replies_endpoint: str, events_endpoint: str | None = None,
                 full_pass_interval_s: float | None = None, order_id_base: int = 0,
                 holders_slice: int = HOLDERS_SLICE, fills_max_wait_ns: int = FILLS_MAX_WAIT_NS,
                 takeover: TakeoverPolicy | None = None):
        self.name = name
        self.worker_id = worker_id
        self.partitions = partitions
        self.wait = WAITS[wait]
        if holders_slice < 1:
            raise ValueError(f"holders_slice: at least 1, got {holders_slice}")
        self.holders_slice = holders_slice
        if fills_max_wait_ns < 0:
            raise ValueError(f"fills_max_wait_ns: at least 0, got {fills_max_wait_ns}")
        self.fills_max_wait_ns = fills_max_wait_ns
        self.store = Store.attach(name, readonly=False)
        rows = sum(hi - lo for lo, hi in map(self.store.partition_rows, partitions))
        self.full_pass_interval_s = full_pass_interval_s if full_pass_interval_s is not None else \
            max(1.0, rows / FULL_PASS_ACCOUNTS_PER_S)         # ~2 % of a core at 1M accounts
        self.ctl = Control.attach(name + "-ctl")
        self.doorbell = self.ctl.doorbell_addr(worker_id)
        self.zctx = process.zmq_context()
        self.orders = self.zctx.socket(zmq.PUSH)
        self.orders.setsockopt(zmq.LINGER, 1000)
        self.orders.setsockopt(zmq.IMMEDIATE, 0)
        curve.connect(self.orders, orders_endpoint)       # CURVE client over tcp, when set
        self.replies = self.zctx.socket(zmq.PUSH)
        self.replies.setsockopt(zmq.LINGER, 1000)
        self.replies.connect(replies_endpoint)
        self.events = None
        if events_endpoint:
            self.events = self.zctx.socket(zmq.PUSH)
            self.events.setsockopt(zmq.LINGER, 500)
            self.events.setsockopt(zmq.SNDHWM, 10000)
            self.events.connect(events_endpoint)
        self.names = [bytes(r["name"]).rstrip(b"\0").decode() for r in self.store.instruments]

        self.seq_replies = Sequencer()
        self.seq_events = Sequencer()
        # Order ids: worker id in the top bits, so ids from different workers never clash
        # and a restarted worker continues above what it sent before (time-based base).
        self.next_order_id = order_id_base or ((worker_id + 1) << 52 | (time.time_ns() // 1000) & ((1 << 52) - 1))
        self.breach = np.empty(65536, np.int64)
        self.outstanding_since: dict[int, int] = {}
        # The instruments of each outstanding account's last orders not yet answered by a
        # fill of the account in that instrument: the account is decided again (stage
        # "fill") only once each has had one, so a fill of one order does not send again an
        # order whose own fill is still on its way (orders are immediate-or-cancel, protocol
        # section 4; an order no fill answers is re-sent after REISSUE_AFTER_NS if the
        # account is still in breach). Absent: not known (flagged by a previous owner).
        self.outstanding_instruments: dict[int, set[int]] = {}
        # Takeovers ([liquidation]): an account whose orders no fill answered within
        # ``after_ms`` is handed to the gateway (``request_takeover``); the next time it
        # is due, its orders go back to the market (after REISSUE_AFTER_NS), and so on in
        # turn. Rows whose last step was a takeover request; the fund's and providers' ids.
        self.takeover_after_ns = takeover.after_ms * 1_000_000 if takeover is not None and takeover.enabled else 0
        self.takeover_roles = takeover.role_accounts if takeover is not None else frozenset()
        self.taken_over: set[int] = set()
        self.pending_events: collections.deque = collections.deque()   # order events to send
        self.pending_pass: dict[int, None] = {}      # instruments whose holders' pass (1b) waits
        # The holders' pass in progress: [snapshot, deque of (partition, instrument passed,
        # instrument ticked), next holder, the instruments it moves]; only stage 1a runs
        # between its slices.
        self.holders_job: list | None = None
        self.pending_collateral = False              # collateral prices moved; 1b revalues
        self.jobs: collections.deque = collections.deque()     # upkeep slices
        self.checks: collections.deque = collections.deque()   # outstanding checks, before them
        self.last_check = 0.0
        self.counters = collections.Counter({      # a Counter: a rare one (legs_rejected,
            "ticks": 0, "orders": 0, "records": 0, "full_passes": 0,   # events_dropped) starts at 0
            **{f"orders_{st}": 0 for st in STAGES}})
        self.prices: MarkPriceProcess | None = None  # the price stage, when it runs here
        self.snap_stale = False                      # self.snap missed a price change (PricesUnreadable)

    # ------------------------------------------------------------------ start-up
    def recover(self, p: int) -> None:
        """Roll back a record the previous owner died applying (see engine/runtime/ctl.py).

        A writer killed inside a seqlock write leaves the row's counter odd, and readers
        (order checks, status) would retry on it forever; this worker is now the rows'
        only writer, so it finishes those writes first (the undo copy restores the data).
        """
        st = self.store
        st.finish_torn_writes(st.partitions, p, p + 1)
        st.finish_torn_writes(st.accounts, *st.partition_rows(p))
        u = self.ctl.undo[p][0]
        if int(u["state"]) != UNDO_APPLYING:
            return
        read_idx, _ = _shm.ring_pending(self.ctl.rings[p].ctypes.data)
        if int(read_idx) == int(u["ref"]):      # not committed: restore, it is applied again
            row = int(u["row"])
            st.finish_torn_writes(st.accounts, row, row + 1)   # an open's new row is past the used ones
            rec = self.ctl.records[p][int(read_idx) & (self.ctl.capacity - 1)]
            if int(rec["kind"]) == RecordKind.OPEN_ACCOUNT and row == p * st.per_partition + \
                    int(st.partitions[p]["n_accounts"]) - 1:
                with st.writing(st.partitions, p) as prow:     # an open: the row is free again
                    prow["n_accounts"] = row - p * st.per_partition
                st._row_of = None                                # its id with it (rebuilt on use)
            with self.store.writing(self.store.accounts, row):
                acct = self.store.accounts[row]
                saved = u["account"].copy()
                for f in acct.dtype.names:
                    if f != "seq":
                        acct[f] = saved[f]
                self.store.slots(row)[:] = u["slots"]
            with self.store.writing(self.store.partitions, p) as prow:
                prow["fee_pool"][:] = u["fee_pool"]
        u["state"] = UNDO_IDLE

    def start(self) -> None:
        st, ctl = self.store, self.ctl
        udt = ctl.undo[0].dtype
        self._rows_buf = np.empty(ctl.capacity, np.int64)
        self._codes_buf = np.empty(ctl.capacity, np.int32)
        self._recs_buf = np.empty(ctl.capacity, ctl.records[0].dtype)   # the drain's copies of its records
        self._drain_args = {
            p: (st.addr(st.instruments), st.addr(st.assets), st.addr(st.accounts), st.addr(st.positions),
                st.slots_per_account, st.addr(st.partitions, p), st.partitions.dtype.fields["fee_pool"][1],
                ctl.rings[p].ctypes.data, ctl.records[p].ctypes.data, ctl.undo[p].ctypes.data,
                udt.fields["account"][1], udt.fields["slots"][1], udt.fields["fee_pool"][1])
            for p in self.partitions}
        for p in self.partitions:
            self.recover(p)
            self.store.partitions[p]["worker_pid"] = os.getpid()
        self.index = {p: HolderIndex(self.store, p) for p in self.partitions}
        n_i = len(st.instruments)
        self.last_seqs, self.prev_marks = np.zeros(n_i, np.uint64), np.zeros(n_i)   # updated in place
        self.tp = _margin.TickPath(st.addr(st.instruments), st.addr(st.prices), st.addr(st.assets), len(st.assets),
                                   st.addr(st.accounts), st.addr(st.positions), st.slots_per_account, n_i,
                                   len(self.partitions), self.last_seqs, self.prev_marks, self.next_order_id,
                                   DEFAULT_HEALTH_FACTOR)
        # The orders stream's numbering goes on across a restart of this worker (its stream
        # id is its order ids' top bits, the same after the restart): from the control
        # segment, where the kernel notes every order's number as it encodes it.
        self.tp.note_seq_at(self.ctl.orders_seq_addr(self.worker_id))
        for k, p in enumerate(self.partitions):
            self.index[p].on_triggers = functools.partial(self.tp.set_triggers, k)
            for i, table in enumerate(self.index[p].triggers):
                self.tp.set_triggers(k, i, *table)
        # Accounts a previous owner flagged outstanding: re-sent if still in breach after
        # REISSUE_AFTER_NS, cleared when healthy (upkeep), like this worker's own.
        now = time.time_ns()
        for p in self.partitions:
            lo, hi = st.partition_rows(p)
            flagged = np.flatnonzero(st.accounts["flags"][lo:hi] & AccountFlag.LIQUIDATION_OUTSTANDING)
            self.outstanding_since.update(dict.fromkeys((lo + flagged).tolist(), now))
        self.upkeep(self.store.price_snapshot())
        # The holder index holds millions of long-lived Python objects (its dicts and
        # tuples): move them out of the collector's reach, or every full collection walks
        # them all (tens of ms with a tick waiting).
        gc.collect()
        gc.freeze()

    def upkeep(self, snap) -> None:
        """Everything at once (start-up only): full pass, caches, aggregates, triggers."""
        self.snap = snap
        for p in self.partitions:
            full_pass(self.store, p, snap, max_listed=len(self.breach))
            self.index[p].refresh(snap)
            self.index[p].refresh_dirty_triggers(snap)
            self.store.partitions[p]["heartbeat_ns"] = time.time_ns()
        self.last_seqs[:] = snap.price_seqs
        self.prev_marks[:] = snap.marks
        self.asset_px_seen = snap.asset_px.copy()
        self.last_resync = self.last_upkeep = time.monotonic()     # last stale-marking of the triggers

    def schedule_upkeep(self) -> None:
        """Queue the periodic upkeep as short slices, run between wake-ups (stage 3).

        - full pass over each partition in slices of ``UPKEEP_SLICE_ROWS`` rows: rewrites
          the shared account rows (what ``status`` and the order checks read) and resets
          the slice's private aggregates at the index's basis (no float drift survives a
          cycle) (the outstanding accounts have their own check, ``schedule_checks``);
        - every ``RESYNC_INTERVAL_S``, every trigger table marked stale (idle time
          re-sorts them one at a time);
        - heartbeats.
        """
        st = self.store
        for p in self.partitions:
            lo, hi = st.partition_rows(p)
            for start in range(lo, hi, UPKEEP_SLICE_ROWS):
                self.jobs.append((self._full_pass_slice, p, start, min(hi, start + UPKEEP_SLICE_ROWS)))
        if time.monotonic() - self.last_resync >= RESYNC_INTERVAL_S:
            for p in self.partitions:
                self.jobs.append((self._stale_triggers, p))
        self.last_upkeep = time.monotonic()

    def _full_pass_slice(self, p: int, lo: int, hi: int) -> None:
        st = self.store
        self.index[p].remargin_range(lo, hi, st.price_snapshot(), self.breach)
        if hi >= st.partition_rows(p)[1]:
            st.partitions[p]["heartbeat_ns"] = time.time_ns()
            self.counters["full_passes"] += 1

    def schedule_checks(self) -> None:
        """Queue the outstanding accounts' check (every ``OUTSTANDING_CHECK_S``), in
        slices of ``CHECK_SLICE_ROWS`` run before the upkeep's."""
        self.last_check = time.monotonic()
        if not self.outstanding_since:
            return
        rows = np.fromiter(self.outstanding_since, np.int64, len(self.outstanding_since))
        rows.sort()
        for p in self.partitions:
            lo, hi = self.store.partition_rows(p)
            mine = rows[np.searchsorted(rows, lo):np.searchsorted(rows, hi)]
            for i in range(0, len(mine), CHECK_SLICE_ROWS):
                self.checks.append((self._check_slice, p, mine[i:i + CHECK_SLICE_ROWS]))

    def _check_slice(self, p: int, rows: np.ndarray) -> None:
        """Re-margin outstanding accounts (shared rows, aggregates at the basis); clear the
        flag of those back in health, re-send the orders of those still in breach after
        ``REISSUE_AFTER_NS`` (one batch: decided and encoded in C)."""
        since = self.outstanding_since
        rows = rows[[int(r) in since for r in rows.tolist()]]      # settled meanwhile (a fill)
        if not len(rows):
            return
        n = self.index[p].remargin_rows(rows, self.store.price_snapshot(), self.breach)
        in_breach = set(self.breach[:n].tolist())                    # n <= len(rows) < len(breach)
        now = time.time_ns()
        resend, takeover = [], []
        for row in rows.tolist():
            if row not in in_breach:
                self._set_outstanding(row, False)
                continue
            waited = now - since[row]
            if self.takeover_after_ns and row not in self.taken_over and waited >= self.takeover_after_ns \
                    and int(self.store.accounts[row]["account_id"]) not in self.takeover_roles:
                takeover.append(row)
            elif waited >= REISSUE_AFTER_NS:
                resend.append(row)
        if takeover:
            self.request_takeover(takeover)
        if resend:
            self.taken_over.difference_update(resend)
            self.liquidate(np.array(resend, np.int64), 0, now, STAGE_RESEND, reissue=True)

    def request_takeover(self, rows: list[int]) -> None:
        """Hand each order of ``rows`` (decided again now) to the gateway for a takeover:
        ``b"T"`` + msgpack ``[row, instrument, qty_units, limit_price_units, reason]`` on
        the replies socket (engine/liquidation/takeover.py plans and books it). The
        account stays outstanding; the takeover's fills answer its orders."""
        snap = self.store.price_snapshot()
        for row in rows:
            orders = decide(self.store, row, snap)
            for o in orders:
                self.replies.send(TAKEOVER_PREFIX + msgpack.packb(
                    [row, o.instrument, o.qty_units, o.limit_price_units, int(o.reason)]))
            self.counters["takeovers_requested"] += len(orders)
            self.taken_over.add(row)
            self._set_outstanding(row, True)
            if orders:
                self.outstanding_instruments[row] = {o.instrument for o in orders}

    def _stale_triggers(self, p: int) -> None:
        """Mark partition ``p``'s trigger tables for a refresh (they drift as other
        instruments' marks move); idle time re-sorts them one at a time."""
        self.index[p].dirty[:] = True
        self.last_resync = time.monotonic()

    def _in(self, p: int, row: int) -> bool:
        lo = p * self.store.per_partition
        return lo <= row < lo + self.store.per_partition

    # ------------------------------------------------------------------ 1. prices
    def on_prices(self) -> int:
        """1a. The hot path: for each mark that moved, the accounts whose trigger it
        crossed (binary searches), decided, encoded and sent (``TickPath.stage_1a``, in
        C); the holders' pass (1b) is queued for when no newer mark waits. Returns the
        number of orders sent; ``book_orders`` does the rest once they are out."""
        return self._send(self.tp.stage_1a(), STAGE_TRIGGER)

    def _send(self, n: int, stage: str) -> int:
        """Send the frames of the TickPath call that returned ``n``, then decide in Python
        the accounts the kernel declined; returns the number of orders sent."""
        tp = self.tp
        if n < 0:                                 # a price unreadable or not > 0:
            _checked_snapshot(self.store, None)   # the Python check says which (it raises)
            raise PricesUnreadable(Code.STORE_LAYOUT_MISMATCH,
                                   "price snapshot failed in C but not in Python (a row mid-write)")
        # (each frame's number was noted in the control segment when it was encoded: a
        # crash before it leaves shows the receiver a gap, never a reused number)
        for frame in tp.frames:
            self._send_order(frame)
        if tp.fallback:                           # accounts the kernel declined: the reference
            n += self.liquidate_reference(tp.fallback, stage)
        return n

    def _send_order(self, frame: bytes) -> None:
        """One order frame out, never waiting: when the matching engine does not take
        orders (its PULL down, the queue of 1,000 full) the order is dropped and counted
        (``orders_dropped``), its account stays flagged outstanding and gets a new order
        after ``REISSUE_AFTER_NS`` if still in breach. A blocking send would stop the
        worker -- ticks, fills, heartbeats -- until the matching engine came back."""
        try:
            self.orders.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.counters["orders_dropped"] += 1

    def book_orders(self, stage: str = STAGE_TRIGGER) -> None:
        """After 1a's orders are out: count them, flag their accounts outstanding in the
        table the upkeep walks, queue their events; note the moved prices for 1b."""
        tp = self.tp
        if tp.n_orders:
            orders = tp.orders()
            now = time.time_ns()
            self.counters["orders"] += len(orders)
            self.counters[f"orders_{stage}"] += len(orders)
            waiting: dict[int, set[int]] = {}
            for rec in orders.tolist():
                self.outstanding_since[rec[0]] = now
                waiting.setdefault(rec[0], set()).add(rec[2])
                rec[7] &= 0xFFFF_FFFF_FFFF_FFFF          # tick_seq: a uint64 kept in an int64 column
                self.pending_events.append(dict(zip(_margin.ORDER_COLUMNS, rec), stage=stage))
            self.outstanding_instruments.update(waiting)
        collateral = tp.assets_moved and not np.array_equal(tp.asset_px, self.asset_px_seen)
        tp.assets_moved = False
        if collateral:
            prev, self.asset_px_seen = self.asset_px_seen, tp.asset_px.copy()
            self.pending_collateral = True       # collateral prices moved: the whole pass follows in 1b
            self.collateral_triggers(prev, self.asset_px_seen)
        if tp.changed:
            self.counters["ticks"] += len(tp.changed)
            self.pending_pass.update(dict.fromkeys(tp.changed))
        if tp.changed or collateral or self.snap_stale:
            self.snap = self.store.price_snapshot()   # (PricesUnreadable: the loop marks it stale)
            self.snap_stale = False

    def holders_pass(self) -> bool:
        """1b, one slice of ``holders_slice`` holders per call: every holder's aggregates
        move to the marks of the pass's snapshot; breaches the triggers missed (stale after
        other prices moved) are sent. Returns True while the pass has slices left: the
        caller then runs nothing but stage 1a until it is done (the holders not yet passed
        are still at the basis: fills, upkeep and trigger refreshes would mix the two).
        Marks that arrive meanwhile wait for the next pass, which subsumes the ones
        before it."""
        if self.holders_job is None:
            if self.pending_collateral:          # collateral prices first: equity moves (whole:
                self.pending_collateral = False  # every holder of the asset that moved)
                for p in self.partitions:
                    recv_ns = self._asset_tick_ns(np.flatnonzero(self.snap.asset_px != self.index[p].asset_px))
                    n = self.index[p].collateral_tick(self.snap, self.breach)
                    if n:
                        self.liquidate(self.breach[: min(n, len(self.breach))], 0, recv_ns, STAGE_COLLATERAL)
                    self.index[p].mark_drifted()
            if not self.pending_pass:
                return False
            steps = collections.deque((p, j, i) for i in self.pending_pass for p in self.partitions
                                      for j in (i, *self.index[p].dependents.get(i, ())))
            self.pending_pass.clear()
            self.holders_job = [self.snap, steps, 0, sorted({j for _, j, _ in steps})]
        snap, steps, start, moved = self.holders_job
        # One slice of holders a call; an instrument without holders only moves its basis,
        # so it rides along with the slice before or after it.
        worked = False
        while steps:
            p, j, i = steps[0]
            idx = self.index[p]
            n_h = idx.holders(j)
            if worked and n_h:
                break
            n, start = idx.tick_slice(j, snap, self.breach, start, self.holders_slice)
            if n and not snap.flags[i] & PRICE_FROZEN:
                pr = self.store.prices[i]
                self.liquidate(self.breach[: min(n, len(self.breach))], int(pr["tick_seq"]), int(pr["ts_ns"]),
                               STAGE_HOLDERS)
            worked = worked or n_h > 0
            if start < n_h:
                break                            # more of this instrument next call
            steps.popleft()                      # this instrument's pass is whole: next one
            start = 0
        # Other instruments' triggers of these holders drift with this mark: tables whose
        # other prices moved by more than HolderIndex.DRIFT_REL since they were solved are
        # marked stale, for idle time to re-solve (this pass covers the interval).
        if not steps:
            self.holders_job = None
            for p in self.partitions:
                self.index[p].mark_drifted(moved)
            return False
        self.holders_job[2] = start
        return True

    def collateral_triggers(self, prev_px: np.ndarray, px: np.ndarray) -> None:
        """1a for collateral prices: the accounts whose collateral trigger the move from
        ``prev_px`` to ``px`` crossed (``HolderIndex.asset_candidates``, binary searches),
        decided and sent at once, stage "trigger"; the whole collateral pass in 1b still
        follows for what stale triggers miss (accounts already sent an order are skipped)."""
        moved = np.flatnonzero(px != prev_px)
        found = [self.index[p].asset_candidates(a, float(px[a]), float(prev_px[a]))
                 for p in self.partitions for a in moved.tolist()]
        rows = np.concatenate(found) if found else ()
        if len(rows):
            self.liquidate(rows, 0, self._asset_tick_ns(moved), STAGE_TRIGGER)

    def _records_waited(self, wait_ns: int) -> bool:
        """The oldest record in one of this worker's rings was received (gateway clock)
        more than ``wait_ns`` ago."""
        cap, due = self.ctl.capacity, time.time_ns() - wait_ns
        for p in self.partitions:
            r, w = _shm.ring_pending(self.ctl.rings[p].ctypes.data)
            if r < w and int(self.ctl.records[p][r & (cap - 1)]["ts_ns"]) < due:
                return True
        return False

    def _asset_tick_ns(self, moved: np.ndarray) -> int:
        """The tick time of orders a collateral move caused: when the latest tick that
        moved one of the assets ``moved`` was received (the mark-price stage publishes an
        asset price with it); now, if none is known."""
        ts = int(self.store.assets["ts_ns"][moved].max()) if moved.size else 0
        return ts if ts > 0 else time.time_ns()

    def liquidate(self, rows: np.ndarray, tick_seq: int, tick_recv_ns: int, stage: str,
                  reissue: bool = False) -> None:
        """Decide and send the orders of each account in ``rows`` not already outstanding
        (``TickPath.liquidate``: the kernel, the encoding and the flag in C); ``stage`` (one
        of ``STAGES``) says what found the breach, for the orders' events and counters."""
        self._send(self.tp.liquidate(np.ascontiguousarray(rows, np.int64), tick_seq, tick_recv_ns, reissue),
                   stage)
        self.book_orders(stage)

    def liquidate_reference(self, rows: list[tuple[int, int, int]], stage: str) -> int:
        """Accounts the kernel declined (a number out of its range), as ``(row, tick_seq,
        tick_recv_ns)``: decided by the Python reference, encoded with the same order ids
        and sequence; returns the number of orders sent."""
        snap, sent = self.store.price_snapshot(), 0
        for row, tick_seq, tick_recv_ns in rows:
            orders = decide(self.store, row, snap)
            for o in orders:
                frame, rec = self.tp.encode_order(row, o.account_id, o.instrument, o.qty_units,
                                                  o.limit_price_units, int(o.reason), tick_seq, tick_recv_ns,
                                                  time.time_ns())
                self._send_order(frame)
                self.counters["orders"] += 1
                self.counters[f"orders_{stage}"] += 1
                self.pending_events.append(dict(zip(_margin.ORDER_COLUMNS, rec), stage=stage))
                sent += 1
            if orders:
                self._set_outstanding(row, True)
                self.outstanding_instruments[row] = {o.instrument for o in orders}
        return sent

    def flush_events(self, limit: int | None = EVENTS_PER_FLUSH) -> None:
        """Operator events for the orders sent, after the tick's orders are all out: the
        oldest ``limit`` (all with None); the loop sends the rest in later turns."""
        q = self.pending_events
        for _ in range(len(q) if limit is None else min(limit, len(q))):
            self.event(q.popleft())

    def event(self, order: dict) -> None:
        """An ENGINE_EVENT per liquidation order (code = its reason), detail in JSON."""
        if self.events is None:
            return
        detail = json.dumps({"order_id": order["order_id"], "qty_units": order["qty_units"],
                             "limit_price_units": order["limit_price_units"], "tick_seq": order["tick_seq"],
                             "tick_to_sent_us": round((order["sent_ns"] - order["tick_recv_ns"]) / 1e3, 1),
                             "stage": order["stage"]})
        if not process.send_event(self.events, self.seq_events, {
                "code": order["reason"], "instrument": self.names[order["instrument_id"]],
                "account": order["account"], "detail": detail}):
            self.counters["events_dropped"] += 1

    def leg_rejected(self, code: int, rec) -> None:
        """An ENGINE_EVENT for a fill leg the kernel refused (3007 no free position slot,
        3005 a result outside int64, 3102 the isolated-margin rule, ...): the fill was
        journaled and acknowledged, and this account's side of it was not applied."""
        if self.events is None:
            return
        row = int(rec["row"])
        detail = json.dumps({"trade_id": int(rec["aux"]), "fill_seq": int(rec["ref"]),
                             "qty_units": int(rec["delta"]), "price_units": int(rec["price"]),
                             "what": "fill leg not applied to this account"})
        if not process.send_event(self.events, self.seq_events, {
                "code": code, "instrument": self.names[int(rec["instrument"])],
                "account": int(self.store.accounts[row]["account_id"]), "detail": detail}):
            self.counters["events_dropped"] += 1

    def _set_outstanding(self, row: int, on: bool) -> None:
        with self.store.writing(self.store.accounts, row) as a:
            flags = int(a["flags"])
            a["flags"] = flags | AccountFlag.LIQUIDATION_OUTSTANDING if on else \
                flags & ~int(AccountFlag.LIQUIDATION_OUTSTANDING)
        if on:
            self.outstanding_since[row] = time.time_ns()
        else:
            self.outstanding_since.pop(row, None)
            self.outstanding_instruments.pop(row, None)
            self.taken_over.discard(row)

    # ------------------------------------------------------------------ 2. commands
    def drain(self, p: int, snap) -> int:
        """Apply what waits in partition ``p``'s ring, then re-margin the touched accounts.

        Runs of fill legs go through ``engine._fills.drain_fill_legs`` (the undo protocol
        and the leg rule in C, no GIL); deposits and withdrawals are taken one at a time
        here, under the same protocol.
        """
        hdr = self.ctl.rings[p].ctypes.data
        r, w = _shm.ring_pending(hdr)
        if r == w:
            return 0
        st = self.store
        recs = self.ctl.records[p]
        cap = self.ctl.capacity
        u = self.ctl.undo[p][0]
        touched: set[int] = set()
        done = 0
        recv_ns = 0                                    # the latest record's gateway receive time
        while r < w:
            rec = recs[r & (cap - 1)]
            kind = int(rec["kind"])
            if kind == RecordKind.FILL_LEG:
                n, _ = _fills.drain_fill_legs(*self._drain_args[p], int(w - r), self._rows_buf, self._codes_buf,
                                              self._recs_buf.ctypes.data)
                done_recs = self._recs_buf[:n]            # copies: the ring's slots are the gateway's again
                touched.update(self._rows_buf[:n].tolist())
                bad = self._codes_buf[:n] != 0
                if bad.any():
                    self.counters["legs_rejected"] += int(bad.sum())
                    for i in np.flatnonzero(bad).tolist():
                        self.leg_rejected(int(self._codes_buf[i]), done_recs[i])
                if self.outstanding_instruments:
                    self._answered(self._rows_buf[:n], done_recs["instrument"], bad)
                last_ref = int(done_recs[n - 1]["ref"])
                recv_ns = max(recv_ns, int(done_recs[n - 1]["ts_ns"]))
                r += n
            else:
                opening = kind == RecordKind.OPEN_ACCOUNT
                lo, hi = st.partition_rows(p)
                row = int(rec["row"]) if not opening else (hi if hi < lo + st.per_partition else -1)
                if row >= 0:               # the row it may write: an open's is the next free one
                    u["row"], u["ref"] = row, r
                    u["account"] = st.accounts[row]
                    u["slots"] = st.slots(row)
                    u["fee_pool"] = st.partitions[p]["fee_pool"]
                    u["state"] = UNDO_APPLYING
                if opening:                # an open's reply carries the new row in balance_units
                    code, bal = self.open_account(int(rec["delta"]), bool(rec["aux"]))
                elif kind == RecordKind.ISOLATED_MARGIN:      # its reply: the position's margin after
                    code, bal = self.isolated_margin(row, int(rec["aux"]), int(rec["delta"]), snap)
                else:
                    code, bal = self.collateral(row, kind, int(rec["aux"]), int(rec["delta"]), snap)
                last_ref = int(rec["ref"])
                self.ctl.note_outcome(p, last_ref, int(code), bal)    # the reply may die with us
                self.replies.send(self.seq_replies.encode(
                    MsgType.COLLATERAL_REPLY, {"request_id": last_ref, "code": int(code),
                                               "balance_units": bal}))
                if code == Code.OK:
                    touched.add(row)
                r += 1
                _shm.ring_commit(hdr, r)
                u["state"] = UNDO_IDLE
                n = 1
            done += n
            with st.writing(st.partitions, p) as prow:
                prow["fills_applied"] += n
                prow["last_fill_seq"] = last_ref
        if touched:
            rows = np.fromiter(touched, np.int64, len(touched))
            rows.sort()                                # the aggregates walked forward
            self.index[p].update_accounts(rows, snap)
            waiting = self.outstanding_instruments
            cleared = sorted(r for r in touched.intersection(self.outstanding_since) if not waiting.get(r))
            for row in cleared:
                self._set_outstanding(row, False)
            if cleared:        # every order of the account answered by a fill: still in breach -> the next order now
                self.liquidate(np.asarray(cleared, np.int64), 0, recv_ns or time.time_ns(), STAGE_FILL)
        self.counters["records"] += done
        return done

    def _answered(self, rows: np.ndarray, instruments: np.ndarray, rejected: np.ndarray) -> None:
        """Applied fill legs (``rows``, ``instruments``; ``rejected`` legs left out): each
        answers its outstanding account's order in that instrument."""
        waiting = self.outstanding_instruments
        hit = np.flatnonzero(np.isin(rows, np.fromiter(waiting, np.int64, len(waiting))) & ~rejected)
        for row, ins in zip(rows[hit].tolist(), instruments[hit].tolist()):
            waiting[row].discard(ins)

    def open_account(self, account: int, isolated_default: bool) -> tuple[Code, int]:
        """OPEN_ACCOUNT in one of this worker's partitions (the gateway routes it by
        ``Store.partition_of``): the next free row of the partition, ``(OK, row)``; an id in
        use, ``(3108, its row)`` (the gateway may not know it: an open whose reply was
        lost); a full partition, ``(3109, -1)``. Nothing written but on OK. The id is
        looked for in its partition alone (a scan: no index of every partition to build
        on the hot path's loop)."""
        st = self.store
        row = st.partition_row_of(account)
        if row is not None:
            return Code.ACCOUNT_EXISTS, row
        try:
            return Code.OK, st.append_account(account, isolated_default=isolated_default)
        except CapacityError:
            return Code.ACCOUNTS_FULL, -1

    def isolated_margin(self, row: int, instrument: int, amount: int, snap) -> tuple[Code, int]:
        """ISOLATED_MARGIN: move ``amount`` settle units from the settle balance into the
        account's isolated position in ``instrument`` (``amount > 0``), or back (``< 0``).
        Into it: refused as a withdrawal of that much would be (3104 beyond the balance,
        3103 below cross initial margin). Out of it: refused (3111) when the margin would
        go below 0 or margin + upnl below the position's initial margin at the mark. No
        isolated position there: 3110. Returns the code and the position's isolated margin
        after (unchanged when refused)."""
        st = self.store
        k = st.isolated_slot(row, instrument)
        if k is None:
            return Code.NOT_ISOLATED, 0
        settle = int(st.instruments[instrument]["settle_asset"])
        iso, bal = int(st.slots(row)[k]["isolated_margin"]), int(st.accounts[row]["balance"][settle])
        d = account_detail(st, row, snap)
        if amount > 0:
            if amount > bal:
                return Code.WITHDRAWAL_INSUFFICIENT_BALANCE, iso
            value = amount / snap.asset_scale[settle] * snap.asset_px[settle] * (1 - snap.asset_haircut[settle])
            if d.cross_equity_usd - value < d.cross_im_usd:
                return Code.WITHDRAWAL_BELOW_INITIAL_MARGIN, iso
            if iso + amount > INT64_MAX:
                return Code.COLLATERAL_BAD_AMOUNT, iso
        else:
            pos = next(p for p in d.positions if p.instrument == instrument)
            if iso + amount < 0 or (iso + amount) / snap.asset_scale[settle] + pos.unrealized_pnl < pos.initial_margin:
                return Code.ISOLATED_BELOW_INITIAL_MARGIN, iso
            if bal - amount > INT64_MAX:
                return Code.COLLATERAL_BAD_AMOUNT, iso
        st.move_isolated_margin(row, k, amount)
        return Code.OK, iso + amount

    def collateral(self, row: int, kind: int, asset: int, amount: int, snap) -> tuple[Code, int]:
        """Deposit credits (refused, 3102, when the balance would pass 2**63-1: it is an
        int64); a withdrawal that would leave cross equity below cross initial margin, or
        the balance below zero, is refused with a reason code."""
        st = self.store
        bal = int(st.accounts[row]["balance"][asset])
        if kind == RecordKind.DEPOSIT:
            if bal + amount > INT64_MAX:
                return Code.COLLATERAL_BAD_AMOUNT, bal
            st.set_balance(row, asset, bal + amount)
            return Code.OK, bal + amount
        if amount > bal:
            return Code.WITHDRAWAL_INSUFFICIENT_BALANCE, bal
        d = account_detail(st, row, snap)
        value = amount / snap.asset_scale[asset] * snap.asset_px[asset] * (1 - snap.asset_haircut[asset])
        if d.cross_equity_usd - value < d.cross_im_usd:
            return Code.WITHDRAWAL_BELOW_INITIAL_MARGIN, bal
        st.set_balance(row, asset, bal - amount)
        return Code.OK, bal - amount

    # ------------------------------------------------------------------ loop
    def _turn(self, wake, blocking: bool, sent_ns: int) -> int:
        """One turn of the loop (``run``): the numbered stages, hot path first. Returns
        when the last orders went out (``sent_ns``), for the next turn's quiet wait."""
        busy = bool(self.jobs) or bool(self.checks) or self.holders_job is not None or bool(self.pending_events) or \
            any(idx.dirty.any() or idx.refreshing for idx in self.index.values()) or \
            bool(self.prices is not None and self.prices.fast is not None and self.prices.fast.n_applied)
        more = busy or self.pending_pass or self.pending_collateral
        if more and self.wait != _shm.WAIT_BUSY_SPIN:
            # Background work left: this loop runs slice after slice without sleeping,
            # so let this CPU's other threads in between (ZeroMQ I/O threads moving the
            # next tick in and the orders out). Without it, at 2,000 ticks/s on 1M
            # accounts, ticks sat 1-3 ms before the worker saw them: first order p90
            # 1,200 -> 311 us, p99 3,066 -> 884 us (bench latency, worker stage).
            os.sched_yield()
        wake.wait(0 if more else 100_000_000)
        if self.on_prices():                                  # 1a. hot path first
            # Let this process's ZeroMQ I/O thread put the orders on the wire before
            # the work below: it shares the CPUs and would wait.
            sent_ns = time.monotonic_ns()
            os.sched_yield()
        self.book_orders(STAGE_TRIGGER)
        wake.timer()                                          # after the orders, not before
        snap = self.snap
        if self.holders_job is None and self._records_waited(self.fills_max_wait_ns):
            for p in self.partitions:                         # 2. fills that waited long enough
                self.drain(p, snap)                           # go before more ticks
        if wake.more():
            return sent_ns                                    # a newer mark or record waits
        if blocking and (quiet := sent_ns + ORDERS_OUT_QUIET_NS - time.monotonic_ns()) > 0:
            wake.pause(quiet)                                 # the orders go out first
            if wake.more():
                return sent_ns
        if (self.pending_pass or self.pending_collateral or self.holders_job) and self.holders_pass():
            return sent_ns                                    # 1b. every holder, a slice a turn
        # Then the orders' events (operators' news; liqgw wakes): after the breaches 1b
        # may still find, 8 a turn. Flushed from book_orders once 16 waited, and before
        # 1b, they held a crash's 1b and 1a back (demo, 4 runs each: tick->order p50
        # 1a 418 -> 236 us, 1b 1,580 -> 1,354 us, 1b p90 6.4 -> 3.8 ms). A pass in
        # slices ends in a turn that gets here, so events drain between passes.
        self.flush_events()
        for p in self.partitions:                             # 2. commands
            self.drain(p, snap)
        if time.monotonic() - self.last_upkeep >= self.full_pass_interval_s:
            self.schedule_upkeep()
        if not self.checks and time.monotonic() - self.last_check >= OUTSTANDING_CHECK_S:
            self.schedule_checks()
        if not wake.more():                                   # 3. idle: one upkeep slice
            if self.prices is not None and self.prices.fast is not None and self.prices.fast.n_applied:
                self.prices.settle(SETTLE_SLICE)              # the price reference catches up
            elif self.checks or self.jobs:
                job, *args = (self.checks or self.jobs).popleft()
                job(*args)
            else:
                for idx in self.index.values():               # or a step of a stale trigger
                    if idx.refresh_triggers_slice():          # table's refresh
                        break
        return sent_ns

    def run(self) -> None:
        self.start()
        wake = DoorbellWake(self.doorbell, self.wait) if self.prices is None else TickWake(self)
        blocking, sent_ns = self.wait == _shm.WAIT_BLOCKING, 0
        process.short_slices()                                    # every thread exists now
        if self.prices is not None:
            self.ctl.mark_ready(Role.MARKPRICE)                   # the price stage is up
        while not self.ctl.shutdown:
            try:
                sent_ns = self._turn(wake, blocking, sent_ns)
            except PricesUnreadable:                          # the price writer died mid-write:
                self.counters["prices_unreadable"] += 1       # its restart finishes the row; wait
                self.snap_stale = True                        # for it (a crash here would only loop),
                time.sleep(0.01)                              # then take the prices afresh
        while self.holders_job is not None and self.holders_pass():
            pass                                                  # a pass is whole before fills
        for p in self.partitions:                                 # drain what is queued
            self.drain(p, self.store.price_snapshot())
        self.flush_events(None)
        wake.close()
        self.orders.close()
        self.replies.close()
        if self.events is not None:
            self.events.close()

    def run_price_stage(self, oracle_endpoint: str, events_endpoint: str, params: OracleParams,
                        assets: list[str]) -> None:
        """Run the mark-price stage in this worker (``engine.price_stage = "worker"``):
        bind the oracle socket here; each wake-up folds the waiting ticks into the index,
        publishes the marks (ringing the other workers) and re-margins this worker's
        partitions at once -- the tick's path is one process, as in the floor."""
        self.prices = MarkPriceProcess(self.name, oracle_endpoint, events_endpoint, params,
                                       store=self.store, ctl=self.ctl, skip_worker=self.worker_id)
        if assets:
            self.prices.set_asset_names(assets)


class DoorbellWake:
    """Waits on the worker's doorbell (the mark-price process, the gateway and shutdown
    ring it) with the configured strategy."""

    def __init__(self, addr: int, strategy: int):
        self.addr, self.strategy = addr, strategy
        self.seen = _shm.doorbell_value(addr)

    def wait(self, timeout_ns: int) -> None:
        self.seen = _shm.doorbell_wait(self.addr, self.seen, timeout_ns, self.strategy)

    def more(self) -> bool:
        """Something rang since the last wait: a newer mark or a record waits."""
        return _shm.doorbell_value(self.addr) != self.seen

    def pause(self, timeout_ns: int) -> None:
        """Sleep up to ``timeout_ns``, less if the doorbell rings; consumes nothing."""
        _shm.doorbell_wait(self.addr, self.seen, timeout_ns, _shm.WAIT_BLOCKING)

    def timer(self) -> None:
        pass                                # the mark-price process runs its own

    def close(self) -> None:
        pass


class TickWake:
    """Worker 0 running the price stage: waits on the oracle socket and, for fills and
    shutdown, on its doorbell. Blocking: one ``zmq_poll`` over the oracle socket and an
    inproc socket that a helper thread pokes when the doorbell rings (the thread sleeps
    in futex(2) without the GIL). Yielding and busy-spin poll both without sleeping.
    Each wait ends by folding the waiting ticks (``MarkPriceProcess.fold``); the
    staleness timer (every ``timer_ns``) runs from ``timer``, after the tick's orders."""

    def __init__(self, worker: "Worker"):
        self.w = worker
        self.prices = worker.prices
        self.addr = worker.doorbell
        self.seen = _shm.doorbell_value(self.addr)
        self.next_timer = time.time_ns() + self.prices.timer_ns
        self.poller = zmq.Poller()
        self.poller.register(self.prices.sock, zmq.POLLIN)
        self.poke_in = self.thread = None
        if worker.wait == _shm.WAIT_BLOCKING:
            endpoint = f"inproc://doorbell-{worker.worker_id}"
            self.poke_in = worker.zctx.socket(zmq.PULL)
            self.poke_in.setsockopt(zmq.LINGER, 0)
            self.poke_in.bind(endpoint)
            self.poller.register(self.poke_in, zmq.POLLIN)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._doorbell_thread, args=(endpoint,), daemon=True,
                                           name="doorbell")
            self.thread.start()
        self.fds = [self.prices.sock.get(zmq.FD)] + \
            ([self.poke_in.get(zmq.FD)] if self.poke_in is not None else [])

    def _doorbell_thread(self, endpoint: str) -> None:
        poke = self.w.zctx.socket(zmq.PUSH)
        poke.setsockopt(zmq.LINGER, 0)
        poke.setsockopt(zmq.SNDHWM, 4)
        poke.connect(endpoint)
        seen = _shm.doorbell_value(self.addr)
        while not self.stop.is_set():
            now = _shm.doorbell_wait(self.addr, seen, 100_000_000, _shm.WAIT_BLOCKING)
            if now != seen:
                seen = now
                try:
                    poke.send(b"", zmq.NOBLOCK)
                except zmq.Again:
                    pass                    # a poke is already waiting: one is enough
        poke.close()

    def wait(self, timeout_ns: int) -> None:
        v = _shm.doorbell_value(self.addr)
        if v != self.seen:
            timeout_ns = 0                  # rung since the last wait
        self.seen = v
        sock = self.prices.sock
        if self.thread is not None:
            ready = self.poller.poll(timeout_ns // 1_000_000)
            if ready and (len(ready) > 1 or ready[0][0] is self.poke_in):
                while True:                 # only when poked: an empty read raises, ~2 us
                    try:
                        self.poke_in.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
        else:
            deadline = time.monotonic_ns() + timeout_ns
            while not (sock.get(zmq.EVENTS) & POLLIN) and _shm.doorbell_value(self.addr) == v \
                    and time.monotonic_ns() < deadline:
                if self.w.wait == _shm.WAIT_YIELDING:
                    os.sched_yield()
        self.prices.fold(first_mark=True)

    def timer(self) -> None:
        """The mark-price stage's catch-up slice when it may not wait for an idle turn
        (``MarkPriceProcess.must_catch_up``), and its staleness timer when due: called by
        the worker after a tick's orders are out, never between the tick and its orders (it is Python over
        every instrument and venue: tens of microseconds)."""
        now = time.time_ns()
        if self.prices.must_catch_up(now, self.next_timer):
            self.prices.settle(SETTLE_SLICE)    # a sustained burst, or the timer waits for it
        if self.prices.timer_due(now, self.next_timer):
            self.prices.on_timer(now)
            self.next_timer = now + self.prices.timer_ns

    def more(self) -> bool:
        """A tick waits on the oracle socket, or the doorbell rang since the last wait."""
        return bool(self.prices.sock.get(zmq.EVENTS) & POLLIN) or \
            _shm.doorbell_value(self.addr) != self.seen

    def pause(self, timeout_ns: int) -> None:
        """Sleep up to ``timeout_ns``, less if a tick arrives or the doorbell rings (its
        helper thread pokes an inproc socket); consumes nothing."""
        process.wait_until_ready(self.more, self.fds, timeout_ns)

    def close(self) -> None:
        if self.thread is not None:
            self.stop.set()
            _shm.doorbell_ring(self.addr)
            self.thread.join(2)
            self.poke_in.close()
        self.prices.sock.close()
        self.prices.events.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engine.runtime.worker")
    ap.add_argument("--name", required=True)
    ap.add_argument("--worker", type=int, required=True)
    ap.add_argument("--partitions", required=True, help="comma-separated partition numbers")
    ap.add_argument("--cpu", type=int, default=-1)
    ap.add_argument("--wait", default="blocking", choices=sorted(WAITS))
    ap.add_argument("--orders", required=True)
    ap.add_argument("--replies", required=True)
    ap.add_argument("--events", default=None)
    ap.add_argument("--full-pass-interval", type=float, default=None,
                    help="seconds between full passes (default: max(1, accounts / 250,000))")
    ap.add_argument("--holders-slice", type=int, default=HOLDERS_SLICE,
                    help="holders per slice of the holders' pass (engine.holders_slice)")
    ap.add_argument("--fills-max-wait-us", type=int, default=FILLS_MAX_WAIT_NS // 1000,
                    help="microseconds a fill may wait behind newer ticks (engine.fills_max_wait_us)")
    ap.add_argument("--oracle", default=None, help="run the mark-price stage here, bound to this endpoint")
    ap.add_argument("--takeover", default="", help="the [liquidation] takeover policy (TakeoverPolicy.as_args)")
    curve.add_args(ap)
    ap.add_argument("--assets", default="", help="with --oracle: asset names, in table order")
    ap.add_argument("--staleness-ms", type=int, default=5000)
    ap.add_argument("--quorum", type=int, default=2)
    ap.add_argument("--max-deviation", type=float, default=0.05)
    a = ap.parse_args(argv)
    if a.oracle and not a.events:
        ap.error("--oracle needs --events (the price stage's freeze and venue events)")
    params = oracle_params(ap, a) if a.oracle else None     # a bad value: exit 2 before attaching
    process.enter(a.cpu)
    curve.install(a)
    w = Worker(a.name, a.worker, [int(x) for x in a.partitions.split(",")], wait=a.wait,
               orders_endpoint=a.orders, replies_endpoint=a.replies, events_endpoint=a.events,
               full_pass_interval_s=a.full_pass_interval, holders_slice=a.holders_slice,
               fills_max_wait_ns=a.fills_max_wait_us * 1000,
               takeover=TakeoverPolicy.from_arg(a.takeover) if a.takeover else None)
    if a.oracle:
        w.run_price_stage(a.oracle, a.events, params, a.assets.split(",") if a.assets else [])
    w.run()
    print(json.dumps({"worker": a.worker, **w.counters,
                      **({"markprice": dict(w.prices.counters)} if w.prices is not None else {})}), file=sys.stderr)
    curve.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
