"""End-to-end latency benchmark: oracle tick in -> liquidation order out, against a floor.

One run, top to bottom:

1. book -- N accounts written straight into the engine's shared memory with vectorized
   numpy stores (the universe of ``bench/kernel.py``: 40 instruments, 3 assets). A
   fraction F of them hold BTCUSDT (instrument 0). Background accounts are healthy over
   the whole price range the run visits (checked with a full pass at both ends); a set
   of *staircase* accounts, each a single BTCUSDT position in tier 0, has its
   liquidation price placed between two consecutive marks of the schedule, ``k`` per
   tick (checked with ``account_detail``).
2. schedule -- bursts of 3 ORACLE_TICKs (3 venues, same price, back to back) at a fixed
   rate R. The mark-price process needs a quorum of 2 fresh venues and takes the median,
   so the SECOND message of a burst makes the new mark: its protocol seq is the
   ``tick_seq`` the liquidation orders carry. Per cycle: a down leg of D ticks
   ``P_t = P0 (1 - t s)`` breaching k long staircase accounts per tick, a jump to
   ``Q0 = P0 (1 + g)``, an up leg of D ticks ``Q_t = Q0 (1 + t s)`` breaching k shorts per
   tick, a jump back to P0 (every staircase account healthy again) and a hold at P0
   (bursts at an unchanged price: decoded, no new mark) until the cycle is 2.05 s long.
   Why: an account sent an order stays *outstanding* and is not sent again for 2 s
   (``worker.REISSUE_AFTER_NS``); legs shorter than 2 s and cycles longer than 2 s make
   every breach of every cycle a first order, and no breached account is re-sent.
3. load process -- a separate process (multiprocessing, spawn): a sender thread sends
   the bursts on a PUSH socket at the scheduled times ``t0 + i / R`` (``CLOCK_MONOTONIC``,
   timer slack 1 ns); a receiver thread timestamps every frame on a PULL socket as it
   is taken off the socket (``CLOCK_MONOTONIC`` for latencies, ``CLOCK_REALTIME`` beside it
   for the engine's own timestamps). Latency is measured from the *intended* send time
   of the burst (its first message), so a sender that falls behind adds to the latency
   (no coordinated omission).
4. floors -- the same load process against (a) one relay process: PULL bind (tcp) ->
   ``zmq.proxy`` -> PUSH bind (tcp), decoding nothing (the least any ZeroMQ engine could
   do); (b) two relays: PULL bind tcp -> PUSH connect ipc -> PULL bind ipc -> PUSH bind
   tcp (the engine's own path has an internal hop, worker -> liquidation gateway). The
   floor latency of a burst is the arrival of its second message (the mark-making one).
   Both run before the engine starts; the one-relay floor runs again after it stops (4b).
5. engine, interleaved with the floor -- ``LocalEngine`` (1 worker, tcp endpoints on
   127.0.0.1, ipc inside) and the same load process, in ``rounds`` rounds of a one-relay
   floor block then an engine block (``duration / rounds`` of ticks each). During the
   floor's block the engine's processes are stopped (``LocalEngine.frozen``, SIGSTOP):
   an idle engine is not quiet (upkeep slices, trigger refreshes, timers), and in a
   first version that left it running the floor's p99 rose to 2-5 ms. The targets are held to this
   interleaved floor: on a shared VM the machine's own latency drifts by more than the
   targets' margins within minutes (a floor's p99 513 us before an engine run, 268 us
   after it), so the floor and the engine are measured in the same minutes. The isolated
   floors before and after are reported beside it. Orders are matched to ticks by
   ``tick_seq`` and to the staircase account expected for that tick. Tick-to-first-order and tick-to-last-order per tick;
   the orders' own timestamps (``tick_recv_ns -> decided_ns -> sent_ns``, engine
   ``CLOCK_REALTIME``) give the internal breakdown.
6. sweep -- short engine runs at rising rates, each after a floor block at the same rate
   (engine stopped), rates in ascending order, each with at least 200 measured ticks: the
   highest whose tick-to-first-order p99 stays under 1 ms. A measured tick that never
   got its order (or, in a floor, its relayed message) is counted at 1 s
   (``LOST_TICK_NS``) in every percentile and verdict, and counted in the JSON
   (``ticks_without_orders``, ``lost``). The floor shows what the VM itself does at that rate: at
   20 ticks/s it wakes slowly (relay p50 ~480 us against ~200 at 200/s).
7. output -- percentiles (HdrHistogram) on stdout with hardware and settings, JSON and a
   PNG (percentile plot of floors vs engine; the sweep).

Usage::

    python -m bench.latency --accounts 1000000 --holders-fraction 0.1 --rate 200 \\
        --json bench/results/latency_1M.json        # --price-stage process: latency_1M_process_stage.json
"""

from __future__ import annotations

import argparse
import dataclasses
import ctypes
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq
from hdrh.histogram import HdrHistogram

from bench import kernel
from engine.config import Config, EngineSettings
from engine.risk import margin
from engine.runtime import worker as worker_mod
from engine.runtime.harness import LocalEngine, local_config
from engine.store import layout as L
from engine.store.shm import Store

TICK_INSTRUMENT = 0                 # BTCUSDT in bench/kernel.py's universe
P0 = 95_000.0                       # its mark in that universe
VENUES = ("venue-a", "venue-b", "venue-c")
STEP = 2e-6                         # relative mark move per staircase tick (0.19 USDT)
GAP = 1e-4                          # jump from the long band up to the short band
STAIR_QTY_UNITS = 100               # 0.1 BTC per staircase account: ~9.5k USDT, tier 0
WARMUP_S = 0.5                      # bursts at P0 before the first measured tick
CYCLE_S = 2.05                      # > REISSUE_AFTER_NS (2 s): see module doc
MAX_LEG_TICKS = 400                 # cap on D (outstanding accounts grow within a leg)
DRAIN_S = 0.5                       # wait for late orders after the last burst
RESUME_S = 0.5                      # after SIGCONT: the engine's timers catch up before its block
TARGET_P50_OVER_FLOOR_US = 15.0
TARGET_P99_OVER_FLOOR_US = 60.0
SWEEP_P99_LIMIT_US = 1000.0
# A measured tick whose order (or, for a floor, whose relayed message) never came is
# counted at this latency, above any real one: percentiles and verdicts include it.
LOST_TICK_NS = 1_000_000_000
SWEEP_MIN_TICKS = 200                   # measured ticks per sweep step, at least (p99 of >= 200)
SWEEP_GIVE_UP_US = 50_000.0             # the sweep stops once p99 passes this
DEFAULT_SWEEP_RATES = (20, 50, 100, 200, 500, 1000, 2000, 5000)
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))

# Burst kinds in a schedule
HOLD, DOWN, UP = 0, 1, 2

assert CYCLE_S * 1e9 > worker_mod.REISSUE_AFTER_NS


def _say(msg: str, end: str = "\n", quiet: bool = False) -> None:
    if not quiet:
        sys.stderr.write(f"\r[bench latency] {msg}\x1b[K{end}")
        sys.stderr.flush()


# --------------------------------------------------------------------------- 2. schedule

def leg_ticks(rate: float, leg_s: float) -> int:
    """D: ticks per leg at ``rate`` (at least 2, at most MAX_LEG_TICKS, leg under 2 s)."""
    d = int(round(rate * leg_s))
    d = min(d, MAX_LEG_TICKS, int(rate * 1.9) - 1)
    return max(2, d)


@dataclass
class Schedule:
    rate: float
    d: int                       # ticks per leg
    cycle: int                   # bursts per cycle
    warmup: int                  # bursts before the first cycle
    prices: np.ndarray           # mark price of each burst
    kind: np.ndarray             # HOLD / DOWN / UP
    step: np.ndarray             # t in 1..d for DOWN / UP bursts, else 0

    @property
    def n(self) -> int:
        return len(self.prices)

    def expected_burst(self, burst: int, side: int, t: int) -> int:
        """The burst of ``burst``'s cycle that should breach the staircase account (side, t)."""
        c = (burst - self.warmup) // self.cycle
        return self.warmup + c * self.cycle + (t - 1 if side == DOWN else self.d + t)


def make_schedule(rate: float, duration_s: float, leg_s: float) -> Schedule:
    """Warm-up at P0, then whole cycles (down leg, jump, up leg, jump back, hold)."""
    d = leg_ticks(rate, leg_s)
    cycle = max(int(math.ceil(CYCLE_S * rate)), 2 * d + 3)
    warm = max(3, int(math.ceil(WARMUP_S * rate)))
    n_cycles = max(1, int(round((duration_s - WARMUP_S) * rate / cycle)))
    prices, kinds, steps = [P0] * warm, [HOLD] * warm, [0] * warm
    q0 = P0 * (1 + GAP)
    for _ in range(n_cycles):
        for t in range(1, d + 1):
            prices.append(P0 * (1 - t * STEP)); kinds.append(DOWN); steps.append(t)
        prices.append(q0); kinds.append(HOLD); steps.append(0)
        for t in range(1, d + 1):
            prices.append(q0 * (1 + t * STEP)); kinds.append(UP); steps.append(t)
        rest = cycle - (2 * d + 1)
        prices += [P0] * rest; kinds += [HOLD] * rest; steps += [0] * rest
    return Schedule(rate, d, cycle, warm, np.array(prices), np.array(kinds, np.int8),
                    np.array(steps, np.int32))


def long_trigger(t: int, j: int, k: int) -> float:
    """Liquidation price of long staircase account (t, j): inside (P_t, P_(t-1))."""
    return P0 * (1 - (t - 1 + (j + 1) / (k + 1)) * STEP)


def short_trigger(t: int, j: int, k: int) -> float:
    """Liquidation price of short staircase account (t, j): inside (Q_(t-1), Q_t)."""
    return P0 * (1 + GAP) * (1 + (t - 1 + (j + 1) / (k + 1)) * STEP)


# --------------------------------------------------------------------------- 1. book

@dataclass
class Book:
    n: int                       # accounts in all
    n_background: int
    holders: int                 # accounts holding instrument 0
    d_max: int                   # staircase ticks per leg laid out
    per_tick: int                # k
    first_stair_id: int          # account ids: background 1..n_background, then staircase

    def stair(self, account_id: int) -> tuple[int, int, int] | None:
        """(side, t, j) of a staircase account id, None for a background one."""
        x = account_id - self.first_stair_id
        if not 0 <= x < 2 * self.d_max * self.per_tick:
            return None
        side = DOWN if x < self.d_max * self.per_tick else UP
        x %= self.d_max * self.per_tick
        return side, x // self.per_tick + 1, x % self.per_tick


def _progress_bar(done: int, total: int, label: str, quiet: bool) -> None:
    width = 30
    fill = int(width * done / max(total, 1))
    _say(f"{label} [{'#' * fill}{'.' * (width - fill)}] {done:,}/{total:,}", end="", quiet=quiet)


def book_layout(n: int, holders_fraction: float, d_max: int, per_tick: int) -> tuple[int, int, int, int]:
    """``(staircase accounts, background accounts, holders, background holders)``; ValueError
    when ``n`` and the fraction cannot hold the staircase (every staircase account holds
    the ticked instrument) and at least 10 background accounts."""
    n_stair = 2 * d_max * per_tick
    n_bg = n - n_stair
    holders = int(round(n * holders_fraction))
    bg_holders = holders - n_stair
    if n_bg < 10 or bg_holders < 0 or bg_holders > n_bg:
        raise ValueError(f"{n} accounts at holders fraction {holders_fraction}: {n_stair} staircase "
                         f"accounts (all holders) leave {n_bg} background accounts and "
                         f"{bg_holders} background holders; raise --accounts or the fraction")
    return n_stair, n_bg, holders, bg_holders


def fill_book(store: Store, n: int, holders_fraction: float, d_max: int, per_tick: int,
              positions: int, seed: int, quiet: bool = False) -> Book:
    """Write ``n`` accounts into the (fresh, not yet started) engine store.

    Background (vectorized, chunks of 2^18): ``positions`` distinct instruments among
    1..39, instrument 0 swapped into slot 0 of the holders; log-normal notional per
    position (median 5k USD, capped at 20k so tiers stay low), entry within ~0.5 % of the
    mark, USDT collateral 15..50 % of the gross notional: healthy across the run's range.
    Staircase: 2 * d_max * k accounts, one BTCUSDT position of 0.1 BTC entered at P0,
    collateral ``C = q e - L q (1 - mmr_0)`` so that ``equity < MM`` exactly below L
    (long; the short mirror ``C = U |q| (1 + mmr_0) - |q| e``).
    """
    assets, instruments = kernel.make_universe()
    n_stair, n_bg, holders, bg_holders = book_layout(n, holders_fraction, d_max, per_tick)
    if not 1 <= positions <= 8:
        raise ValueError("positions per background account: 1..8")
    rng = np.random.default_rng(seed)
    s = store.slots_per_account
    mark = np.array([i.mark_price for i in instruments])
    cs = np.array([i.contract_size for i in instruments])
    qscale = np.array([i.qty_scale for i in instruments], np.float64)
    inverse = np.array([i.kind.is_inverse for i in instruments])
    settle = np.array([[a.name for a in assets].index(i.settle) for i in instruments])
    sscale = np.array([a.scale for a in assets], np.float64)[settle]
    n_other = len(instruments) - 1
    steps = np.array([x for x in range(1, n_other) if math.gcd(x, n_other) == 1])
    is_holder = np.zeros(n_bg, bool)
    is_holder[rng.choice(n_bg, bg_holders, replace=False)] = True
    accounts = store.accounts[:n]
    pos_all = store.positions[: n * s].reshape(n, s)
    chunk = 1 << 18
    for lo in range(0, n_bg, chunk):
        hi = min(n_bg, lo + chunk)
        m = hi - lo
        base = rng.integers(0, n_other, m)
        step = rng.choice(steps, m)
        inst = 1 + (base[:, None] + step[:, None] * np.arange(positions)) % n_other
        inst[is_holder[lo:hi], 0] = TICK_INSTRUMENT
        usd = np.clip(np.exp(rng.normal(math.log(5_000.0), 1.2, (m, positions))), 50.0, 20_000.0)
        side = np.where(rng.random((m, positions)) < 0.5, -1, 1)
        inv = inverse[inst]
        per_contract = np.where(inv, cs[inst], cs[inst] * mark[inst])
        qty = side * np.maximum(1, np.rint(usd / per_contract * qscale[inst])).astype(np.int64)
        q = qty / qscale[inst]
        entry = mark[inst] * np.exp(rng.normal(0.0, 0.002, (m, positions)))
        cost = np.where(inv, q * cs[inst] / entry, q * cs[inst] * entry)
        p = pos_all[lo:hi]
        p["instrument"][:, :positions] = inst
        p["mode"][:, :positions] = int(L.Mode.CROSS)
        p["qty"][:, :positions] = qty
        p["cost"][:, :positions] = np.rint(cost * sscale[inst]).astype(np.int64)
        gross = (np.abs(q) * np.where(inv, cs[inst], cs[inst] * mark[inst])).sum(axis=1)
        a = accounts[lo:hi]
        a["account_id"] = np.arange(lo, hi, dtype=np.int64) + 1
        a["partition"] = 0
        a["n_positions"] = positions
        bal = np.zeros((m, L.MAX_ASSETS), np.int64)
        bal[:, 0] = np.rint(gross * rng.uniform(0.15, 0.5, m) * 1e6)
        a["balance"] = bal
        _progress_bar(hi, n, "loading accounts", quiet)

    # Staircase accounts (few: a plain loop over the 2 d k of them, vectorized writes).
    ins0 = store.instruments[TICK_INSTRUMENT]
    mmr0 = float(ins0["tier_mmr"][0])
    qs0 = float(ins0["qty_scale"])
    q = STAIR_QTY_UNITS / qs0
    cost_units = int(round(q * P0 * 1e6))
    e = cost_units / 1e6 / q                                   # entry as stored
    trig, sign = [], []
    for side in (DOWN, UP):
        for t in range(1, d_max + 1):
            for j in range(per_tick):
                trig.append(long_trigger(t, j, per_tick) if side == DOWN else short_trigger(t, j, per_tick))
                sign.append(1 if side == DOWN else -1)
    trig, sign = np.array(trig), np.array(sign)
    coll = np.where(sign > 0, q * e - trig * q * (1 - mmr0), trig * q * (1 + mmr0) - q * e)
    lo, hi = n_bg, n
    a = accounts[lo:hi]
    a["account_id"] = np.arange(lo, hi, dtype=np.int64) + 1
    a["partition"] = 0
    a["n_positions"] = 1
    bal = np.zeros((hi - lo, L.MAX_ASSETS), np.int64)
    bal[:, 0] = np.rint(coll * 1e6).astype(np.int64)
    a["balance"] = bal
    p = pos_all[lo:hi]
    p["instrument"][:, 0] = TICK_INSTRUMENT
    p["mode"][:, 0] = int(L.Mode.CROSS)
    p["qty"][:, 0] = sign * STAIR_QTY_UNITS
    p["cost"][:, 0] = sign * cost_units
    store.partitions[0]["n_accounts"] = n
    _progress_bar(n, n, "loading accounts", quiet)
    _say("", quiet=quiet)
    return Book(n, n_bg, holders, d_max, per_tick, n_bg + 1)


def check_book(store: Store, book: Book, d_max: int) -> dict:
    """Full passes at P0 and at both ends of the run's range; liquidation prices of a few
    staircase accounts against the planned ones. Raises if the layout is wrong."""
    def snap_at(mark: float):
        sn = store.price_snapshot()
        sn.marks[TICK_INSTRUMENT] = mark
        return sn
    k = book.per_tick
    lo_mark = P0 * (1 - (d_max + 0.5) * STEP)
    hi_mark = P0 * (1 + GAP) * (1 + (d_max + 0.5) * STEP)
    got = {}
    for label, m, want in (("at_P0", P0, 0), ("at_bottom", lo_mark, d_max * k),
                           ("at_top", hi_mark, d_max * k)):
        n_liq, _ = margin.full_pass(store, 0, snap_at(m))
        got[label] = int(n_liq)
        if n_liq != want:
            raise AssertionError(f"book layout: {n_liq} accounts in breach {label} (mark {m:.2f}), want {want}")
    margin.full_pass(store, 0, snap_at(P0))
    worst = 0.0
    sn = snap_at(P0)
    for side in (DOWN, UP):
        for t in sorted({1, d_max // 2 or 1, d_max}):
            for j in sorted({0, k - 1}):
                idx = (0 if side == DOWN else d_max * k) + (t - 1) * k + j
                row = book.n_background + idx
                d = margin.account_detail(store, row, sn)
                want = long_trigger(t, j, k) if side == DOWN else short_trigger(t, j, k)
                liq = d.positions[0].liquidation_price
                worst = max(worst, abs(liq - want) / want)
    if worst > 1e-7:
        raise AssertionError(f"staircase liquidation prices off by up to {worst:.3g} (relative)")
    return {"breaching": got, "liq_price_max_rel_err": worst}


# --------------------------------------------------------------------------- 3. load process

def _frames(sched: Schedule, real0: int) -> list[bytes]:
    """The 3 ORACLE_TICK frames of every burst, encoded before the run (seq 1, 2, 3, ...)."""
    from feeds.protocol import MsgType, Sequencer
    seq = Sequencer()
    out = []
    period = 1e9 / sched.rate
    name = "BTCUSDT"
    for i, px in enumerate(sched.prices.tolist()):
        ts = real0 + int(i * period)
        for v in VENUES:
            out.append(seq.encode(MsgType.ORACLE_TICK, {"venue": v, "instrument": name, "price": px,
                                                        "venue_ts_ns": ts}, ts_ns=ts))
    return out


def _set_timer_slack(ns: int = 1) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, ctypes.c_ulong(ns), 0, 0, 0)   # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def _load_run(spec: dict) -> dict:
    """One measured run in the load process; returns raw timestamps and frames."""
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 1_000_000)
    push.connect(spec["push"])
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVHWM, 1_000_000)
    pull.setsockopt(zmq.RCVTIMEO, 100)
    if spec.get("pull_bind"):        # orders_via_gateway off: the workers connect to us
        pull.bind(spec["pull"])
        time.sleep(0.3)               # let the workers' reconnect timers find us
    else:
        pull.connect(spec["pull"])
    sched = spec["schedule"]
    frames = _frames(sched, time.time_ns() + 1_000_000_000)
    n = sched.n
    recv_mono, recv_real, recv_frames = [], [], []
    stop = threading.Event()

    def receiver():
        _set_timer_slack()
        mono, real = time.monotonic_ns, time.time_ns
        while not stop.is_set():
            try:
                f = pull.recv(copy=True)
            except zmq.Again:
                continue
            recv_mono.append(mono())
            recv_real.append(real())
            recv_frames.append(f)

    rt = threading.Thread(target=receiver, daemon=True)
    rt.start()
    time.sleep(0.3)                       # connections up before the clock starts
    _set_timer_slack()
    period = 1e9 / sched.rate
    t0 = time.monotonic_ns() + 50_000_000
    intended = t0 + (np.arange(n) * period).astype(np.int64)
    sent1 = np.zeros(n, np.int64)
    sent2 = np.zeros(n, np.int64)
    sent2_real = np.zeros(n, np.int64)
    mono, real, sleep, send = time.monotonic_ns, time.time_ns, time.sleep, push.send
    it = intended.tolist()
    for i in range(n):
        now = mono()
        if it[i] > now:
            sleep((it[i] - now) * 1e-9)
        sent1[i] = mono()
        send(frames[3 * i])
        sent2_real[i] = real()
        sent2[i] = mono()
        send(frames[3 * i + 1])
        send(frames[3 * i + 2])
    time.sleep(DRAIN_S)
    stop.set()
    rt.join()
    push.close()
    pull.close()
    return {"intended": intended, "sent1": sent1, "sent2": sent2, "sent2_real": sent2_real,
            "recv_mono": np.array(recv_mono, np.int64), "recv_real": np.array(recv_real, np.int64),
            "frames": recv_frames}


def _load_main(conn) -> None:
    """The load process: runs each spec the parent sends until it sends None."""
    while True:
        spec = conn.recv()
        if spec is None:
            break
        conn.send(_load_run(spec))


class LoadProcess:
    def __init__(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_load_main, args=(child,), daemon=True)
        self.proc.start()

    def run(self, push: str, pull: str, sched: Schedule, pull_bind: bool = False) -> dict:
        self.conn.send({"push": push, "pull": pull, "schedule": sched, "pull_bind": pull_bind})
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


# --------------------------------------------------------------------------- 4. floors

def _relay_main(front_ep: str, back_ep: str, back_bind: bool) -> None:
    """PULL bind -> libzmq proxy (C loop, nothing decoded) -> PUSH bind or connect, with
    the engine processes' 100 us scheduler slices (``process.short_slices``)."""
    ctx = zmq.Context()
    front = ctx.socket(zmq.PULL)
    front.setsockopt(zmq.LINGER, 0)
    front.setsockopt(zmq.RCVHWM, 100_000)
    front.bind(front_ep)
    back = ctx.socket(zmq.PUSH)
    back.setsockopt(zmq.LINGER, 0)
    back.setsockopt(zmq.SNDHWM, 100_000)
    (back.bind if back_bind else back.connect)(back_ep)
    # the scheduler slices every engine process takes (its sockets exist: their I/O
    # thread too), so the floor and the engine run under the same scheduling
    from engine.runtime import process
    process.short_slices()
    zmq.proxy(front, back)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def run_floor(load: LoadProcess, sched: Schedule, hops: int, root: str) -> dict:
    ctx = mp.get_context("spawn")
    p_in, p_out = _free_ports(2)
    ep_in, ep_out = f"tcp://127.0.0.1:{p_in}", f"tcp://127.0.0.1:{p_out}"
    if hops == 1:
        relays = [ctx.Process(target=_relay_main, args=(ep_in, ep_out, True), daemon=True)]
    else:
        mid = f"ipc://{root}/floor-mid-{os.getpid()}.sock"
        relays = [ctx.Process(target=_relay_main, args=(mid, ep_out, True), daemon=True),
                  ctx.Process(target=_relay_main, args=(ep_in, mid, False), daemon=True)]
    for r in relays:
        r.start()
    time.sleep(0.5)                      # relays bound (spawn start-up)
    try:
        raw = load.run(ep_in, ep_out, sched)
    finally:
        for r in relays:
            r.terminate()
            r.join(5)
    return analyze_floor(raw, sched)


# --------------------------------------------------------------------------- analysis

def _hist(values_ns) -> HdrHistogram:
    h = HdrHistogram(1, 10**11, 3)
    for v in values_ns:
        h.record_value(max(1, int(v)))
    return h


def _pcts(values_ns) -> dict:
    """p50..p99.9, max, min, mean in microseconds (HdrHistogram, 3 significant digits)."""
    values_ns = list(values_ns)
    if not values_ns:
        return {k: None for k in ("p50", "p90", "p99", "p999", "max", "min", "mean", "count")}
    h = _hist(values_ns)
    out = {k: h.get_value_at_percentile(p) / 1e3 for k, p in PERCENTILES}
    out.update(max=h.get_max_value() / 1e3, min=h.get_min_value() / 1e3, mean=h.get_mean_value() / 1e3,
               count=len(values_ns))
    return out


def _curve(values_ns) -> list[list[float]]:
    """(percentile, us) points for the plot."""
    if not len(values_ns):
        return []
    v = np.sort(np.asarray(values_ns, np.float64)) / 1e3
    ps = np.unique(np.concatenate([np.linspace(0, 99, 100), 100 - np.logspace(0, -4, 60)]))
    ps = ps[ps < 100]
    return [[float(p), float(np.percentile(v, p))] for p in ps] + [[100.0, float(v[-1])]]


def _measured(sched: Schedule) -> np.ndarray:
    return np.flatnonzero(sched.kind != HOLD)


def _with_lost(lat_ns: np.ndarray, n_lost: int) -> np.ndarray:
    """Latencies with ``n_lost`` ticks that never got their message counted at
    ``LOST_TICK_NS``, so that they weigh in every percentile they reach."""
    return np.concatenate([np.asarray(lat_ns, np.int64), np.full(n_lost, LOST_TICK_NS, np.int64)])


def analyze_floor(raw: dict, sched: Schedule) -> dict:
    from feeds.protocol import decode
    arrival = np.full(sched.n, -1, np.int64)
    for f, t in zip(raw["frames"], raw["recv_mono"].tolist()):
        seq = decode(f).seq
        b, pos = divmod(seq - 1, 3)
        if pos == 1 and 0 <= b < sched.n:
            arrival[b] = t
    meas = _measured(sched)
    got = meas[arrival[meas] >= 0]
    lat = _with_lost(arrival[got] - raw["intended"][got], len(meas) - len(got))
    from_send = arrival[got] - raw["sent2"][got]
    send_lag = np.maximum(1, raw["sent1"][meas] - raw["intended"][meas])
    return {"latency": _pcts(lat), "from_actual_send_of_2nd": _pcts(from_send),
            "send_lag": _pcts(send_lag), "ticks": int(len(meas)), "lost": int(len(meas) - len(got)),
            "curve": _curve(lat), "_lat": lat, "_from_send": from_send, "_send_lag": send_lag}


def pool_floors(parts: list[dict]) -> dict:
    """One floor from the blocks of an interleaved run: percentiles of all their ticks."""
    cat = lambda key: np.concatenate([p[key] for p in parts])
    lat = cat("_lat")
    return {"latency": _pcts(lat), "from_actual_send_of_2nd": _pcts(cat("_from_send")),
            "send_lag": _pcts(cat("_send_lag")), "ticks": sum(p["ticks"] for p in parts),
            "lost": sum(p["lost"] for p in parts), "curve": _curve(lat), "blocks": len(parts),
            "block_p50_us": [p["latency"]["p50"] for p in parts],
            "block_p99_us": [p["latency"]["p99"] for p in parts], "_lat": lat}


def paired_gaps(floor_blocks: list, engine_blocks: list, limit_us: float) -> dict:
    """Round by round, the engine block's percentile minus that of the floor block just
    before it: ``median`` of those gaps and ``rounds_within`` (how many are at most
    ``limit_us``). The pooled verdict compares all engine ticks with all floor ticks; this
    one cancels the drift between rounds (the VM's own latency moves by more than the
    targets within minutes), and says whether a gap is the engine's or one noisy block's.
    A round missing either figure (a block with no ticks) is left out."""
    gaps = [e - f for f, e in zip(floor_blocks, engine_blocks) if e is not None and f is not None]
    return {"gaps_us": gaps, "median_us": float(np.median(gaps)) if gaps else None,
            "rounds_within": sum(g <= limit_us for g in gaps), "rounds": len(gaps)}


def analyze_engine(raw: dict, sched: Schedule, book: Book) -> dict:
    """Match orders to ticks; per-tick first/last latency; breakdown from the first order."""
    from feeds.protocol import MsgType, Rejected, decode
    k = book.per_tick
    n = sched.n
    first = np.full(n, np.iinfo(np.int64).max, np.int64)
    last = np.full(n, -1, np.int64)
    count = np.zeros(n, np.int64)
    first_order: dict[int, tuple] = {}
    seen: set[tuple[int, int]] = set()
    c = {"orders": 0, "matched_by_tick_seq": 0, "coalesced_into_later_tick": 0, "unexpected_account": 0,
         "reissued": 0, "before_expected_tick": 0, "undecodable": 0}
    for f, tm, tr in zip(raw["frames"], raw["recv_mono"].tolist(), raw["recv_real"].tolist()):
        m = decode(f)
        if type(m) is Rejected or m.type != MsgType.LIQUIDATION_ORDER:
            c["undecodable"] += 1
            continue
        c["orders"] += 1
        o = m.fields
        label = (o["tick_seq"] - 1) // 3            # burst whose 2nd message made the mark
        st = book.stair(o["account"])
        if st is None or not 0 <= label < n:
            c["unexpected_account"] += 1
            continue
        side, t, _ = st
        b = sched.expected_burst(label, side, t)
        if b > label or b < 0 or b >= n or sched.kind[b] != side or sched.step[b] != t:
            c["before_expected_tick"] += 1
            continue
        if (o["account"], b) in seen:
            c["reissued"] += 1
            continue
        seen.add((o["account"], b))
        if b == label:
            c["matched_by_tick_seq"] += 1
        else:
            c["coalesced_into_later_tick"] += 1
        count[b] += 1
        last[b] = max(last[b], tm)
        if tm < first[b]:
            first[b] = tm
            first_order[b] = (label, o, tr)
    meas = _measured(sched)
    complete = meas[count[meas] == k]
    partial = meas[(count[meas] > 0) & (count[meas] < k)]
    any_ = meas[count[meas] > 0]
    it = raw["intended"]
    lat_first = _with_lost(first[any_] - it[any_], len(meas) - len(any_))
    lat_last = _with_lost(last[complete] - it[complete], len(meas) - len(complete))
    bd = {"send2_to_markprice_recv": [], "markprice_recv_to_decided": [], "decided_to_sent": [],
          "sent_to_load_recv": [], "intended_to_send2": []}
    for b in any_.tolist():
        label, o, tr = first_order[b]
        if label != b:
            continue
        bd["intended_to_send2"].append(raw["sent2"][b] - it[b])
        bd["send2_to_markprice_recv"].append(o["tick_recv_ns"] - raw["sent2_real"][b])
        bd["markprice_recv_to_decided"].append(o["decided_ns"] - o["tick_recv_ns"])
        bd["decided_to_sent"].append(o["sent_ns"] - o["decided_ns"])
        bd["sent_to_load_recv"].append(tr - o["sent_ns"])
    c.update(ticks=int(len(meas)), ticks_with_all_orders=int(len(complete)),
             ticks_with_some_orders=int(len(partial)), ticks_without_orders=int(len(meas) - len(any_)),
             expected_orders=int(len(meas) * k))
    send_lag = np.maximum(1, raw["sent1"][meas] - it[meas])
    return {"first": _pcts(lat_first), "last": _pcts(lat_last), "counts": c,
            "breakdown_us": {key: _pcts(v) for key, v in bd.items()},
            "send_lag": _pcts(send_lag), "curve_first": _curve(lat_first), "curve_last": _curve(lat_last),
            "_lat": lat_first, "_last": lat_last, "_bd": bd, "_send_lag": send_lag}


def pool_engine(parts: list[dict]) -> dict:
    """One engine result from the blocks of an interleaved run (counts summed)."""
    cat = lambda key: np.concatenate([p[key] for p in parts])
    first, last = cat("_lat"), cat("_last")
    counts = {key: sum(p["counts"][key] for p in parts) for key in parts[0]["counts"]}
    bd = {key: np.concatenate([np.asarray(p["_bd"][key], np.int64) for p in parts])
          for key in parts[0]["_bd"]}
    return {"first": _pcts(first), "last": _pcts(last), "counts": counts,
            "breakdown_us": {key: _pcts(v) for key, v in bd.items()},
            "send_lag": _pcts(cat("_send_lag")), "curve_first": _curve(first), "curve_last": _curve(last),
            "block_p50_us": [p["first"]["p50"] for p in parts],
            "block_p99_us": [p["first"]["p99"] for p in parts], "_lat": first}


# --------------------------------------------------------------------------- 5. engine

def bench_config(root: str, n: int, wait: str, cpus: tuple[int, ...], orders_direct: bool = False,
                 price_stage: str = EngineSettings.price_stage, markprice_cpu: int = -1,
                 holders_slice: int = EngineSettings.holders_slice) -> Config:
    assets, instruments = kernel.make_universe()
    base = Config(EngineSettings(), tuple(assets), tuple(instruments))
    names = ("oracle", "fills", "checks", "orders", "events")
    ports = dict(zip(names, _free_ports(len(names))))
    cfg = local_config(root, base, tcp_ports=ports, accounts_capacity=n, partitions=1,
                       wait=wait, cpus=tuple(cpus), price_stage=price_stage, markprice_cpu=markprice_cpu,
                       holders_slice=holders_slice)
    return dataclasses.replace(cfg, endpoints=dataclasses.replace(cfg.endpoints,
                                                                  orders_via_gateway=not orders_direct))


def _label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


# --------------------------------------------------------------------------- run

def run(accounts: int = 1_000_000, holders_fraction: float = 0.1, rate: float = 200.0,
        json_out: str | os.PathLike | None = None, duration_s: float = 20.0, *,
        per_tick: int = 2, positions: int = 2, wait: str = "blocking", cpus: tuple[int, ...] = (),
        leg_s: float = 0.5, sweep: bool = True, sweep_rates: tuple[float, ...] = DEFAULT_SWEEP_RATES,
        sweep_duration_s: float = 2.6, plot_out: str | os.PathLike | None = None, seed: int = 1,
        quiet: bool = False, orders_direct: bool = False, price_stage: str = EngineSettings.price_stage,
        rounds: int = 8, markprice_cpu: int = -1, holders_slice: int = EngineSettings.holders_slice) -> dict:
    """Run the whole benchmark (module doc); write ``json_out`` and the PNG next to it."""
    n, k = int(accounts), int(per_tick)
    if not 1 <= k <= 16:
        raise ValueError("per_tick: 1..16")
    if not 1 <= rounds <= 50:
        raise ValueError("rounds: 1..50")
    load_start = os.getloadavg()[0]
    sweep_rates = tuple(sorted(float(r) for r in sweep_rates))
    if any(not (r > 0 and math.isfinite(r)) for r in sweep_rates):
        raise ValueError("sweep rates: finite and > 0")
    rates = [float(rate)] + (list(sweep_rates) if sweep else [])
    d_max = max(leg_ticks(r, leg_s) for r in rates)
    book_layout(n, holders_fraction, d_max, k)         # before minutes of floors, not after
    main_sched = make_schedule(rate, duration_s, leg_s)
    block_sched = make_schedule(rate, duration_s / rounds, leg_s)
    root = tempfile.mkdtemp(prefix="me-lat-")
    load = LoadProcess()
    result: dict = {}
    try:
        # 4. floors first (the engine's processes not yet running)
        _say(f"floor, 1 relay: {main_sched.n:,} bursts at {rate:g}/s", quiet=quiet)
        floor_before = run_floor(load, main_sched, 1, root)
        _say(f"floor, 2 relays: {main_sched.n:,} bursts at {rate:g}/s", quiet=quiet)
        floor2 = run_floor(load, main_sched, 2, root)

        # 1. book, 5. engine
        config = bench_config(root, n, wait, cpus, orders_direct, price_stage, markprice_cpu, holders_slice)
        t_load = time.perf_counter()
        checks: dict = {}
        book_box: list[Book] = []

        def setup(store: Store) -> None:
            book_box.append(fill_book(store, n, holders_fraction, d_max, k, positions, seed, quiet))
            checks.update(check_book(store, book_box[0], d_max))
        le = LocalEngine(config, setup=setup, n_workers=1)
        load_s = time.perf_counter() - t_load
        book = book_box[0]
        _say(f"loaded {n:,} accounts in {load_s:.1f} s; starting the engine", quiet=quiet)
        t_start = time.perf_counter()
        with le:
            start_s = time.perf_counter() - t_start
            ep = le.endpoints
            _say(f"engine up in {start_s:.1f} s", quiet=quiet)
            # 5. interleaved: `rounds` pairs of (floor block, engine block), so both see the
            # same minutes of the machine; the engine's processes are stopped (SIGSTOP)
            # during the floor's block: an idle engine is not quiet (upkeep, timers)
            floor_parts, eng_parts, engine_end = [], [], 0.0
            for i in range(rounds):
                _say(f"round {i + 1}/{rounds}: floor, 1 relay, {block_sched.n:,} bursts", quiet=quiet)
                with le.frozen():
                    floor_parts.append(run_floor(load, block_sched, 1, root))
                time.sleep(max(RESUME_S, engine_end + CYCLE_S + 0.2 - time.monotonic()))   # see sweep
                _say(f"round {i + 1}/{rounds}: engine, {block_sched.n:,} bursts", quiet=quiet)
                eng_parts.append(analyze_engine(load.run(ep.oracle, ep.orders, block_sched, orders_direct),
                                                block_sched, book))
                engine_end = time.monotonic()
            floor1, eng = pool_floors(floor_parts), pool_engine(eng_parts)
            sweep_rows = []
            max_rate = None
            if sweep:
                for r in sweep_rates:
                    sc = make_schedule(r, sweep_duration_s, leg_s)
                    while len(_measured(sc)) < SWEEP_MIN_TICKS:      # low rates: a longer step
                        sc = make_schedule(r, (sc.n + 4 * sc.cycle) / r, leg_s)
                    _say(f"sweep: {r:g}/s ({sc.n:,} bursts), the floor first", quiet=quiet)
                    t_fl = time.monotonic()
                    with le.frozen():        # the floor at the same rate (an idle VM wakes slowly)
                        fl = run_floor(load, sc, 1, root)
                    # every staircase account healthy and not outstanding before the engine's run
                    time.sleep(max(RESUME_S, CYCLE_S + 0.2 - (time.monotonic() - t_fl)))
                    res = analyze_engine(load.run(ep.oracle, ep.orders, sc, orders_direct), sc, book)
                    cnt = res["counts"]
                    ok = res["first"]["p99"] is not None and res["first"]["p99"] <= SWEEP_P99_LIMIT_US
                    sweep_rows.append({"rate": r, "ticks": cnt["ticks"], "first": res["first"], "floor": fl["latency"],
                                       "last": res["last"], "ticks_without_orders": cnt["ticks_without_orders"],
                                       "coalesced": cnt["coalesced_into_later_tick"],
                                       "send_lag_p99_us": res["send_lag"]["p99"], "p99_under_1ms": ok})
                    if ok:
                        max_rate = r                # rates ascending: the highest that passed
                    elif res["first"]["p99"] is None or res["first"]["p99"] > SWEEP_GIVE_UP_US:
                        break       # far behind: higher rates will not recover
                    # else go on: on an idle VM low rates wake slower than busy ones, so a
                    # miss at a low rate does not settle the question for higher ones
        exit_codes = le.exit_codes
        # 4b. the one-relay floor again, the engine gone: the engine run is bracketed, so
        # a machine that got busier or quieter meanwhile (a shared VM does) shows up
        _say(f"floor again, 1 relay, after the engine: {main_sched.n:,} bursts", quiet=quiet)
        floor_after = run_floor(load, main_sched, 1, root)
    finally:
        load.close()
        shutil.rmtree(root, ignore_errors=True)
    _say("done", quiet=quiet)

    # 7. output
    f1, f2, ef, el = floor1["latency"], floor2["latency"], eng["first"], eng["last"]
    fb, fa = floor_before["latency"], floor_after["latency"]
    flat = {}
    for prefix, d in (("floor", f1), ("floor_before", fb), ("floor2", f2), ("floor_after", fa),
                      ("engine", ef), ("engine_last", el)):
        for key in ("p50", "p90", "p99", "p999", "max"):
            flat[f"{prefix}_{key}_us"] = d[key]
    ok = lambda a, b, lim: None if a is None or b is None else a <= b + lim
    # The floor the targets use is the interleaved one (its blocks alternate with the
    # engine's in one stretch of time). The mean of the isolated runs before and after
    # the engine (the bracket) is reported beside it.
    bracket = {q: (fb[q] + fa[q]) / 2 for q in ("p50", "p99")}
    gap = lambda a, b: None if a is None else a - b
    result = {
        "accounts": n,
        "holders": book.holders,
        "rate": float(rate),
        **flat,
        "max_rate_p99_under_1ms": max_rate,
        "floor_bracket_p50_us": bracket["p50"],
        "floor_bracket_p99_us": bracket["p99"],
        "targets": {
            "against": "floor: the one-relay floor in blocks interleaved with the engine's (engine stopped meanwhile)",
            "engine_p50_le_floor_p50_plus_15us": ok(ef["p50"], f1["p50"], TARGET_P50_OVER_FLOOR_US),
            "engine_p99_le_floor_p99_plus_60us": ok(ef["p99"], f1["p99"], TARGET_P99_OVER_FLOOR_US),
            "engine_p50_minus_floor_p50_us": gap(ef["p50"], f1["p50"]),
            "engine_p99_minus_floor_p99_us": gap(ef["p99"], f1["p99"]),
            "engine_p50_minus_floor_bracket_p50_us": gap(ef["p50"], bracket["p50"]),
            "engine_p99_minus_floor_bracket_p99_us": gap(ef["p99"], bracket["p99"]),
            "engine_p50_minus_floor_before_p50_us": gap(ef["p50"], fb["p50"]),
            "engine_p99_minus_floor_before_p99_us": gap(ef["p99"], fb["p99"]),
            "engine_p50_minus_floor_after_p50_us": gap(ef["p50"], fa["p50"]),
            "engine_p99_minus_floor_after_p99_us": gap(ef["p99"], fa["p99"]),
            "paired_p50": paired_gaps(floor1["block_p50_us"], eng["block_p50_us"], TARGET_P50_OVER_FLOOR_US),
            "paired_p99": paired_gaps(floor1["block_p99_us"], eng["block_p99_us"], TARGET_P99_OVER_FLOOR_US),
        },
        "floor": {k_: v for k_, v in floor1.items() if not k_.startswith("_") and k_ != "curve"},
        "floor_before": {k_: v for k_, v in floor_before.items() if not k_.startswith("_") and k_ != "curve"},
        "floor_after": {k_: v for k_, v in floor_after.items() if not k_.startswith("_") and k_ != "curve"},
        "floor2": {k_: v for k_, v in floor2.items() if not k_.startswith("_") and k_ != "curve"},
        "engine": {"first": ef, "last": el, "counts": eng["counts"], "send_lag": eng["send_lag"],
                   "block_p50_us": eng["block_p50_us"], "block_p99_us": eng["block_p99_us"]},
        "breakdown_us": eng["breakdown_us"],
        "sweep": sweep_rows,
        "curves": {"floor": floor1["curve"], "floor_before": floor_before["curve"], "floor2": floor2["curve"],
                   "floor_after": floor_after["curve"],
                   "engine_first": eng["curve_first"],
                   "engine_last": eng["curve_last"]},
        "book": {"background_accounts": book.n_background, "staircase_accounts": 2 * d_max * k,
                 "positions_per_background_account": positions, "per_tick": k, "leg_ticks_max": d_max,
                 "load_s": load_s, "engine_start_s": start_s, **checks},
        "hardware": kernel.hardware(),
        "settings": {
            "duration_s": duration_s, "bursts": main_sched.n, "rounds": rounds, "block_bursts": block_sched.n,
            "measured_ticks": rounds * int(len(_measured(block_sched))), "leg_ticks": main_sched.d, "cycle_bursts": main_sched.cycle, "warmup_bursts": main_sched.warmup,
            "step_rel": STEP, "gap_rel": GAP, "p0": P0, "workers": 1, "partitions": 1, "wait": wait,
            "cpus": list(cpus), "markprice_cpu": markprice_cpu, "orders_direct": orders_direct,
            "price_stage": price_stage, "holders_slice": holders_slice,
            "venues": len(VENUES), "transport": "tcp://127.0.0.1 in and out; ipc inside",
            "latency_start": "intended send time of the burst's FIRST message (t0 + i/R); the mark is "
                             "made by its SECOND message (quorum 2, median of 3), whose seq is tick_seq",
            "latency_end": "load process takes the frame off its PULL socket",
            "clock": "CLOCK_MONOTONIC in the load process for every latency; CLOCK_REALTIME (same host) "
                     "only for the breakdown against the engine's own timestamps",
            "lost_tick_us": LOST_TICK_NS / 1e3,
            "floor": "1 process: PULL bind tcp -> zmq.proxy -> PUSH bind tcp (decodes nothing; the engine's "
                     "100 us scheduler slices, process.short_slices, since session 17); in `rounds` "
                     "blocks, each followed by an engine block (the engine's processes stopped, SIGSTOP, "
                     "during the floor's block)",
            "floor_before": "the same relay for duration_s before the engine's processes start",
            "floor_after": "the same relay for duration_s after they stop",
            "floor2": "2 processes: PULL bind tcp -> zmq.proxy -> PUSH connect ipc -> PULL bind ipc -> "
                      "zmq.proxy -> PUSH bind tcp",
            "engine_first": "tick to first liquidation order of the tick's staircase accounts",
            "engine_last": "tick to last of its k orders (ticks with all k orders)",
            "sweep_duration_s": sweep_duration_s, "sweep_limit_p99_us": SWEEP_P99_LIMIT_US,
            "reissue_after_s": worker_mod.REISSUE_AFTER_NS / 1e9, "seed": seed,
            "load_average_1m": [load_start, os.getloadavg()[0]], "engine_exit_codes": exit_codes,
            "shm_name": config.engine.name,
        },
    }
    if not quiet:
        print(summary(result))
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, allow_nan=False, default=_jsonable) + "\n")
        png = Path(plot_out) if plot_out is not None else path.with_suffix(".png")
        plot(result, png)
        _say(f"wrote {path} and {png}", quiet=quiet)
    elif plot_out is not None:
        plot(result, Path(plot_out))
    return json.loads(json.dumps(result, default=_jsonable))


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


def summary(r: dict) -> str:
    hw, s = r["hardware"], r["settings"]
    fmt = lambda d: "  ".join(f"{k} {d[k]:9.1f}" if d[k] is not None else f"{k} -" for k in
                              ("p50", "p90", "p99", "p999", "max"))
    c = r["engine"]["counts"]
    t = r["targets"]
    lines = [
        f"latency benchmark: {r['accounts']:,} accounts, {r['holders']:,} hold BTCUSDT; {r['rate']:g} ticks/s "
        f"x 3 venues, {s['measured_ticks']:,} measured ticks, {r['book']['per_tick']} breaches per tick; "
        f"1 worker, wait {s['wait']}",
        f"hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB; python {hw['python']}; "
        f"load average {s['load_average_1m'][0]:.2f} -> {s['load_average_1m'][1]:.2f}",
        "                      (us)   " + "        ".join(("p50", "p90", "p99", "p99.9", "max")),
        f"  floor, 1 relay        {fmt(r['floor']['latency'])}   <- interleaved with the engine",
        f"  floor, before         {fmt(r['floor_before']['latency'])}",
        f"  floor, 2 relays       {fmt(r['floor2']['latency'])}",
        f"  floor, 1 relay, after {fmt(r['floor_after']['latency'])}",
        f"  engine, first order   {fmt(r['engine']['first'])}",
        f"  engine, last order    {fmt(r['engine']['last'])}",
        "  breakdown (first order of each tick):",
    ]
    for key, d in r["breakdown_us"].items():
        lines.append(f"    {key:28s}{fmt(d)}")
    lines.append(f"  orders {c['orders']:,} (expected {c['expected_orders']:,}): matched by tick_seq "
                 f"{c['matched_by_tick_seq']:,}, coalesced into a later tick {c['coalesced_into_later_tick']:,}, "
                 f"reissued {c['reissued']}, unexpected {c['unexpected_account']}; ticks without orders "
                 f"{c['ticks_without_orders']}, floor ticks lost {r['floor']['lost']} (each counted at "
                 f"{LOST_TICK_NS / 1e6:g} ms in the percentiles)")
    for row in r["sweep"]:
        lines.append(f"  sweep {row['rate']:7g}/s, {row['ticks']} ticks: first p50 {row['first']['p50']}, "
                     f"p99 {row['first']['p99']} us "
                     f"-> {'ok' if row['p99_under_1ms'] else 'over 1 ms'} (floor at this rate: p50 "
                     f"{row['floor']['p50']}, p99 {row['floor']['p99']} us)")
    okw = {True: "met", False: "MISSED", None: "n/a"}
    blocks = lambda xs: ", ".join(f"{x:.0f}" if x is not None else "-" for x in xs)
    lines.append(f"  {s['rounds']} rounds, p50 / p99 by block: floor {blocks(r['floor']['block_p50_us'])} / "
                 f"{blocks(r['floor']['block_p99_us'])}; engine {blocks(r['engine']['block_p50_us'])} / "
                 f"{blocks(r['engine']['block_p99_us'])}")
    pp = lambda d: ("-" if d["median_us"] is None else f"median {d['median_us']:+.1f} us, "
                    f"{d['rounds_within']} of {d['rounds']} rounds within the target")
    lines.append(f"  engine block - the floor block before it: p50 {pp(t['paired_p50'])}; "
                 f"p99 {pp(t['paired_p99'])}")
    lines.append(f"engine - isolated floors: before p50 {t['engine_p50_minus_floor_before_p50_us']:+.1f}, "
                 f"p99 {t['engine_p99_minus_floor_before_p99_us']:+.1f}; after p50 "
                 f"{t['engine_p50_minus_floor_after_p50_us']:+.1f}, p99 {t['engine_p99_minus_floor_after_p99_us']:+.1f}; "
                 f"their mean p50 {t['engine_p50_minus_floor_bracket_p50_us']:+.1f}, "
                 f"p99 {t['engine_p99_minus_floor_bracket_p99_us']:+.1f} us")
    lines.append(f"targets (against the interleaved floor): engine p50 <= floor p50 + 15 us: {okw[t['engine_p50_le_floor_p50_plus_15us']]} "
                 f"({t['engine_p50_minus_floor_p50_us']:+.1f} us); engine p99 <= floor p99 + 60 us: "
                 f"{okw[t['engine_p99_le_floor_p99_plus_60us']]} ({t['engine_p99_minus_floor_p99_us']:+.1f} us); "
                 f"max rate with p99 < 1 ms: "
                 f"{'not run (--no-sweep)' if not r['sweep'] else r['max_rate_p99_under_1ms'] or 'none'}")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Left: latency by percentile (floors vs engine). Right: the sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    styles = (("floor", "floor, 1 relay, interleaved", "#38a169"),
              ("floor_before", "floor, 1 relay, before the engine", "#c6f6d5"),
              ("floor2", "floor, 2 relays", "#2f855a"),
              ("floor_after", "floor, 1 relay, after the engine", "#9ae6b4"),
              ("engine_first", "engine: first order", "#2b6cb0"), ("engine_last", "engine: last order", "#dd6b20"))
    for key, label, color in styles:
        pts = r["curves"].get(key) or []
        if not pts:
            continue
        p = np.array(pts)
        x = 1.0 / np.maximum(1e-5, 1 - p[:, 0] / 100)
        a1.plot(x, p[:, 1], label=label, color=color, lw=1.6,
                ls={"floor2": "--", "floor_after": ":", "floor_before": ":"}.get(key, "-"))
    a1.set_xscale("log")
    a1.set_yscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000]
    a1.set_xticks(ticks)
    a1.set_xticklabels(["0", "50", "90", "99", "99.9", "99.99"])
    a1.set_xlabel("percentile")
    a1.set_ylabel("tick -> order (us, log)")
    a1.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)
    hw = r["hardware"]
    a1.set_title(f"{r['accounts']:,} accounts ({r['holders']:,} hold BTCUSDT), {r['rate']:g} ticks/s\n"
                 f"{hw['cpu']}, {hw['cores']} cores, 1 worker, wait {r['settings']['wait']}", fontsize=9)
    sw = r["sweep"]
    if sw:
        rates = [x["rate"] for x in sw]
        for key, label, color in (("p50", "first order p50", "#2b6cb0"), ("p99", "first order p99", "#c53030")):
            a2.plot(rates, [x["first"][key] for x in sw], "o-", label=label, color=color)
            a2.plot(rates, [x["floor"][key] for x in sw], "^:", label=f"floor {key}", color=color, alpha=0.6)
        a2.axhline(SWEEP_P99_LIMIT_US, color="grey", ls=":", label="1 ms")
        a2.set_xscale("log")
        a2.set_yscale("log")
        a2.set_xlabel("oracle ticks per second (3 venue quotes each)")
        a2.set_ylabel("us (log)")
        a2.legend(fontsize=8)
        a2.grid(True, which="both", alpha=0.3)
        a2.set_title(f"sweep: highest rate with p99 < 1 ms: {r['max_rate_p99_under_1ms']}", fontsize=9)
    else:
        a2.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="margin-engine bench latency", description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=1_000_000)
    ap.add_argument("--holders-fraction", type=float, default=0.1)
    ap.add_argument("--rate", type=float, default=200.0, help="oracle ticks per second (3 venue quotes each)")
    ap.add_argument("--duration", type=float, default=20.0,
                    help="seconds of ticks for the engine and for each floor (the interleaved ones in all)")
    ap.add_argument("--rounds", type=int, default=8,
                    help="interleaved rounds: a floor block, then an engine block, each duration/rounds")
    ap.add_argument("--json", default=None, help="default: bench/results/latency_<N>.json (the "
                    "default price stage), latency_<N>_process_stage.json (the other)")
    ap.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    ap.add_argument("--per-tick", type=int, default=2, help="accounts breached per tick (k)")
    ap.add_argument("--positions", type=int, default=2, help="positions per background account")
    ap.add_argument("--wait", default="blocking", choices=sorted(worker_mod.WAITS))
    ap.add_argument("--cpus", default="", help="comma-separated CPUs to pin the worker to")
    ap.add_argument("--markprice-cpu", type=int, default=-1,
                    help="CPU to pin the mark-price process to (process stage); -1: not pinned")
    ap.add_argument("--leg-s", type=float, default=0.5)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-rates", default=",".join(str(r) for r in DEFAULT_SWEEP_RATES))
    ap.add_argument("--sweep-duration", type=float, default=2.6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--orders-direct", action="store_true",
                    help="workers send orders straight to the load process's PULL (no liquidation-gateway hop)")
    ap.add_argument("--holders-slice", type=int, default=EngineSettings.holders_slice,
                    help="holders per slice of the worker's holders' pass (engine.holders_slice)")
    ap.add_argument("--price-stage", default=EngineSettings.price_stage, choices=("process", "worker"),
                    help="engine.price_stage: worker (the default: worker 0 hears the ticks, one hop less) "
                         "or process (the mark-price stage in its own process)")
    a = ap.parse_args(argv)
    if a.accounts < 100 or not 0 < a.holders_fraction <= 1 or a.rate <= 0 or a.duration <= 0 or a.holders_slice < 1 \
            or not 1 <= a.rounds <= 50:
        ap.error("need --accounts >= 100, 0 < --holders-fraction <= 1, --rate > 0, --duration > 0, "
                 "--holders-slice >= 1, 1 <= --rounds <= 50")
    try:
        cpus = tuple(int(x) for x in a.cpus.split(",") if x)
        sweep_rates = tuple(float(x) for x in a.sweep_rates.split(",") if x)
    except ValueError:
        ap.error("--cpus: comma-separated CPU numbers; --sweep-rates: comma-separated rates")
    if not 1 <= a.per_tick <= 16 or not 1 <= a.positions <= 8 or not a.leg_s > 0 or not a.sweep_duration > 0:
        ap.error("need 1 <= --per-tick <= 16, 1 <= --positions <= 8, --leg-s > 0, --sweep-duration > 0")
    rates = (a.rate,) + (sweep_rates if not a.no_sweep else ())
    if any(not (r > 0 and math.isfinite(r)) for r in rates):
        ap.error("--rate and --sweep-rates: finite and > 0")
    try:
        book_layout(a.accounts, a.holders_fraction, max(leg_ticks(r, a.leg_s) for r in rates), a.per_tick)
    except ValueError as e:
        ap.error(str(e))
    stage = "" if a.price_stage == EngineSettings.price_stage else f"_{a.price_stage}_stage"
    out = a.json or f"bench/results/latency_{_label(a.accounts)}{stage}.json"
    run(a.accounts, a.holders_fraction, a.rate, out, a.duration, per_tick=a.per_tick, positions=a.positions,
        wait=a.wait, cpus=cpus, leg_s=a.leg_s, sweep=not a.no_sweep, sweep_rates=sweep_rates,
        sweep_duration_s=a.sweep_duration, plot_out=a.plot, seed=a.seed, orders_direct=a.orders_direct,
        price_stage=a.price_stage, rounds=a.rounds, markprice_cpu=a.markprice_cpu, holders_slice=a.holders_slice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
