"""Kernel benchmark: the Cython full pass against numpy, the reference model and memory.

One run, top to bottom:

1. build -- N accounts with K positions each over 40 instruments (37 linear perps with
   multi-tier tables, 3 inverse BTC perps) and 3 collateral assets, in a real POSIX
   shared-memory segment, filled with vectorized numpy writes. Instrument 0 (BTCUSDT)
   is held by exactly 10 % of the accounts, for the incremental tick.
2. cython -- ``engine.risk.margin.full_pass`` over the one partition.
3. numpy -- the same rule written with whole-array numpy operations (``numpy_pass``)
   on the same shared-memory arrays; checked against the Cython results.
4. reference -- the plain-Python reference model (``engine.risk.reference``, exact
   fractions) on a random sample of accounts, extrapolated to N; a plain-Python float
   version of the rule when that module is not there.
5. bandwidth floor -- one ``numpy.sum`` over as many bytes as one pass must read:
   ``N * 128`` (account rows) + ``N * K * 32`` (used position rows).
6. what bounds the pass -- the kernel over 4,096 accounts (in cache) again and again,
   and the full pass split over every core at once against ``numpy.sum`` split the
   same way (``where_bound``).
7. incremental tick -- ``HolderIndex.tick`` of instrument 0 at alternating marks.
8. output -- summary with ratios and hardware on stdout, JSON, PNG bar chart.

Every timing is the median of several repetitions after one warm-up; min and p90 go in
the JSON too. Usage::

    python -m bench.kernel --accounts 1000000 --positions 4 \\
        --json bench/results/kernel_1M_k4.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

from engine import _margin
from engine.instruments import Asset, Instrument, Kind, derive_tiers
from engine.risk import margin
from engine.risk.triggersort import TriggerSort
from engine.store import layout as L
from engine.store.shm import PriceSnapshot, Store

N_INSTRUMENTS = 40
RESULT_FIELDS = ("collateral_usd", "cross_equity_usd", "cross_im_usd", "cross_mm_usd")  # a pass's figures
CACHE_ROWS = 4096              # accounts of the in-cache pass: 1 MB at K = 4, within L2
TICK_INSTRUMENT = 0            # BTCUSDT; held by exactly HOLDER_SHARE of the accounts
HOLDER_SHARE = 0.10
ISOLATED_SHARE = 0.03          # positions opened in isolated mode
BUILD_CHUNK = 1 << 18          # accounts generated per vectorized step

# --------------------------------------------------------------------------- universe

ASSETS = [
    Asset("USDT", 0, 10**6, 1.0, 0.0),
    Asset("USDC", 1, 10**6, 1.0, 0.0),
    Asset("BTC", 2, 10**8, 95_000.0, 0.05),
]

# Tier tables by liquidity class, floors in the settle asset (shaped like the large
# venues' published brackets; amounts derived by derive_tiers).
TIERS = {
    "major": [(0, 0.008, 0.004), (50_000, 0.01, 0.005), (250_000, 0.02, 0.01),
              (3_000_000, 0.05, 0.025), (15_000_000, 0.1, 0.05), (30_000_000, 0.2, 0.1),
              (80_000_000, 0.25, 0.125), (100_000_000, 0.5, 0.25)],
    "large": [(0, 0.01, 0.005), (25_000, 0.02, 0.01), (100_000, 0.04, 0.02),
              (500_000, 0.1, 0.05), (2_000_000, 0.2, 0.1), (5_000_000, 0.5, 0.25)],
    "mid": [(0, 0.02, 0.01), (10_000, 0.04, 0.02), (50_000, 0.1, 0.05),
            (250_000, 0.2, 0.1), (1_000_000, 0.5, 0.25)],
    "small": [(0, 0.05, 0.025), (5_000, 0.1, 0.05), (25_000, 0.2, 0.1), (100_000, 0.5, 0.25)],
    "inverse": [(0, 0.008, 0.004), (5, 0.01, 0.005), (10, 0.02, 0.01), (20, 0.05, 0.025),
                (50, 0.1, 0.05)],    # floors in BTC
}

# (symbol, settle, mark, tier class); BTCUSDT first: it is the tick instrument.
LINEAR = [
    ("BTCUSDT", "USDT", 95_000.0, "major"), ("ETHUSDT", "USDT", 3_400.0, "major"),
    ("SOLUSDT", "USDT", 180.0, "large"), ("BNBUSDT", "USDT", 650.0, "large"),
    ("XRPUSDT", "USDT", 2.3, "large"), ("DOGEUSDT", "USDT", 0.32, "large"),
    ("ADAUSDT", "USDT", 0.95, "mid"), ("AVAXUSDT", "USDT", 38.0, "mid"),
    ("LINKUSDT", "USDT", 22.0, "mid"), ("DOTUSDT", "USDT", 7.5, "mid"),
    ("TRXUSDT", "USDT", 0.24, "mid"), ("LTCUSDT", "USDT", 105.0, "mid"),
    ("BCHUSDT", "USDT", 480.0, "mid"), ("NEARUSDT", "USDT", 5.5, "mid"),
    ("ATOMUSDT", "USDT", 9.0, "mid"), ("UNIUSDT", "USDT", 13.0, "mid"),
    ("APTUSDT", "USDT", 11.0, "mid"), ("ARBUSDT", "USDT", 0.9, "mid"),
    ("OPUSDT", "USDT", 2.1, "mid"), ("FILUSDT", "USDT", 5.8, "small"),
    ("ETCUSDT", "USDT", 28.0, "small"), ("XLMUSDT", "USDT", 0.42, "small"),
    ("HBARUSDT", "USDT", 0.28, "small"), ("INJUSDT", "USDT", 24.0, "small"),
    ("SUIUSDT", "USDT", 4.2, "mid"), ("SEIUSDT", "USDT", 0.45, "small"),
    ("TIAUSDT", "USDT", 6.0, "small"), ("1000PEPEUSDT", "USDT", 0.02, "small"),
    ("WIFUSDT", "USDT", 2.5, "small"), ("AAVEUSDT", "USDT", 310.0, "mid"),
    ("BTCUSDC", "USDC", 95_000.0, "major"), ("ETHUSDC", "USDC", 3_400.0, "large"),
    ("SOLUSDC", "USDC", 180.0, "mid"), ("XRPUSDC", "USDC", 2.3, "mid"),
    ("DOGEUSDC", "USDC", 0.32, "mid"), ("BNBUSDC", "USDC", 650.0, "mid"),
    ("SUIUSDC", "USDC", 4.2, "small"),
]
# Inverse BTC perps (contract value in USD, margined in BTC): standard, mini, micro.
INVERSE = [("BTCUSD", 100.0), ("BTCUSD-MINI", 10.0), ("BTCUSD-MICRO", 1.0)]


def _tiers(cls: str):
    return derive_tiers([{"floor": f, "imr": i, "mmr": m} for f, i, m in TIERS[cls]], cls)


def make_universe() -> tuple[list[Asset], list[Instrument]]:
    """The 3 assets and 40 instruments of the benchmark."""
    instruments = []
    for sym, settle, mark, cls in LINEAR:
        mag = math.floor(math.log10(mark))
        qty_scale = 10 ** max(0, mag - 1)            # BTC: 0.001 lot, sub-$10 coins: 1
        price_scale = 10 ** min(8, max(1, 4 - mag))
        instruments.append(Instrument(sym, len(instruments), Kind.PERP, settle, 1.0, qty_scale,
                                      price_scale, 1 / price_scale, 1 / qty_scale, _tiers(cls),
                                      mark_price=mark))
    for sym, cs in INVERSE:
        instruments.append(Instrument(sym, len(instruments), Kind.INVERSE_PERP, "BTC", cs, 1, 10,
                                      0.1, 1.0, _tiers("inverse"), mark_price=95_000.0))
    assert len(instruments) == N_INSTRUMENTS
    return ASSETS, instruments


def _progress(msg: str, end: str = "\n") -> None:
    sys.stderr.write(f"\r[bench kernel] {msg}\x1b[K{end}")
    sys.stderr.flush()


def build_store(name: str | None, n_accounts: int, k: int, seed: int = 1,
                quiet: bool = False) -> Store:
    """Create the store and fill ``n_accounts`` accounts of ``k`` positions each.

    Per account: ``k`` distinct instruments among 1..39 (``base + j * step mod 39`` with
    ``step`` prime to 39), then instrument 0 swapped into one slot of exactly
    ``HOLDER_SHARE`` of the accounts; a log-normal USD notional per position (median
    $5k), random side, entry within a few percent of the mark (``cost = q cs entry``,
    inverse ``q cs / entry``); USDT collateral of 1..25 % of the notional, some USDC
    (a few borrowed) and BTC; ``ISOLATED_SHARE`` of positions isolated.
    """
    assets, instruments = make_universe()
    if not 1 <= k <= min(8, N_INSTRUMENTS - 1):
        raise ValueError(f"positions per account: 1..8, got {k}")
    if n_accounts < 10:
        raise ValueError(f"accounts: at least 10, got {n_accounts}")
    t0 = time.perf_counter()
    store = Store.create(name, assets=assets, instruments=instruments,
                         accounts_capacity=n_accounts, n_partitions=1, slots_per_account=8,
                         replace=name is not None)
    try:
        _fill(store, instruments, n_accounts, k, seed, quiet)
    except BaseException:
        store.unlink()
        store.detach()
        raise
    if not quiet:
        _progress(f"built {n_accounts:,} accounts x {k} positions in "
                  f"{time.perf_counter() - t0:.1f} s ({store.name or 'anonymous memory'})")
    return store


def _fill(store: Store, instruments: list[Instrument], n: int, k: int, seed: int,
          quiet: bool) -> None:
    rng = np.random.default_rng(seed)
    s = store.slots_per_account
    mark = np.array([i.mark_price for i in instruments])
    cs = np.array([i.contract_size for i in instruments])
    qscale = np.array([i.qty_scale for i in instruments], np.float64)
    inverse = np.array([i.kind.is_inverse for i in instruments])
    settle = np.array([[a.name for a in ASSETS].index(i.settle) for i in instruments])
    sscale = np.array([a.scale for a in ASSETS], np.float64)[settle]
    btc_px = ASSETS[2].price_usd

    # Instrument 0 goes into one random slot of exactly HOLDER_SHARE of the accounts.
    holders = np.zeros(n, bool)
    holders[rng.choice(n, int(round(n * HOLDER_SHARE)), replace=False)] = True
    steps = np.array([x for x in range(1, N_INSTRUMENTS - 1) if math.gcd(x, N_INSTRUMENTS - 1) == 1])

    accounts = store.accounts[:n]
    positions = store.positions[: n * s].reshape(n, s)
    for lo in range(0, n, BUILD_CHUNK):
        hi = min(n, lo + BUILD_CHUNK)
        m = hi - lo
        base = rng.integers(0, N_INSTRUMENTS - 1, m)
        step = rng.choice(steps, m)
        inst = 1 + (base[:, None] + step[:, None] * np.arange(k)) % (N_INSTRUMENTS - 1)
        h = np.flatnonzero(holders[lo:hi])
        inst[h, rng.integers(0, k, len(h))] = TICK_INSTRUMENT

        usd = np.clip(np.exp(rng.normal(math.log(5_000.0), 1.8, (m, k))), 20.0, 5e7)
        side = np.where(rng.random((m, k)) < 0.5, -1, 1)
        inv = inverse[inst]
        per_contract_usd = np.where(inv, cs[inst], cs[inst] * mark[inst])
        qty = side * np.maximum(1, np.rint(usd / per_contract_usd * qscale[inst])).astype(np.int64)
        q = qty / qscale[inst]
        entry = mark[inst] * np.exp(rng.normal(0.0, 0.03, (m, k)))
        cost_settle = np.where(inv, q * cs[inst] / entry, q * cs[inst] * entry)
        notional_settle = np.where(inv, np.abs(q) * cs[inst] / mark[inst], np.abs(q) * cs[inst] * mark[inst])
        iso = rng.random((m, k)) < ISOLATED_SHARE
        iso_margin = np.where(iso, notional_settle * rng.uniform(0.01, 0.1, (m, k)), 0.0)

        pos = positions[lo:hi]
        pos["instrument"][:, :k] = inst
        pos["mode"][:, :k] = np.where(iso, int(L.Mode.ISOLATED), int(L.Mode.CROSS))
        pos["qty"][:, :k] = qty
        pos["cost"][:, :k] = np.rint(cost_settle * sscale[inst]).astype(np.int64)
        pos["isolated_margin"][:, :k] = np.rint(iso_margin * sscale[inst]).astype(np.int64)

        gross_usd = (np.abs(q) * np.where(inv, cs[inst], cs[inst] * mark[inst])).sum(axis=1)
        acct = accounts[lo:hi]
        acct["account_id"] = np.arange(lo, hi, dtype=np.int64) + 1
        acct["partition"] = 0
        acct["n_positions"] = k
        bal = np.zeros((m, L.MAX_ASSETS), np.int64)
        bal[:, 0] = np.rint(gross_usd * rng.uniform(0.01, 0.25, m) * 1e6)
        usdc = rng.random(m)
        bal[:, 1] = np.where(usdc < 0.30, np.rint(gross_usd * rng.uniform(0.0, 0.1, m) * 1e6), 0)
        bal[:, 1] = np.where(usdc < 0.02, -np.rint(gross_usd * 0.05 * 1e6), bal[:, 1])   # borrowed
        bal[:, 2] = np.where(rng.random(m) < 0.10,
                             np.rint(gross_usd * rng.uniform(0.0, 0.1, m) / btc_px * 1e8), 0)
        acct["balance"] = bal
        if not quiet:
            _progress(f"building: {hi:,}/{n:,} accounts ({100 * hi // n}%)", end="")
    store.partitions[0]["n_accounts"] = n


# --------------------------------------------------------------------------- numpy rule

class _Tables:
    """Per-instrument columns of the instrument table, and the tier floors as one sorted
    key array: instrument ``i``'s tier ``t`` has key ``i + f(floor_t)`` with the
    monotonic ``f(x) = x / (x + 1e6)`` in [0, 1), so one ``np.searchsorted`` of
    ``i + f(notional)`` finds every position's tier, whatever its instrument."""

    SQUASH = 1e6

    def __init__(self, store: Store):
        ins = store.instruments
        self.kind = ins["kind"].astype(np.int64)
        self.settle = ins["settle_asset"].astype(np.int64)
        self.underlying = ins["underlying"].astype(np.int64)
        self.cs = ins["contract_size"].copy()
        self.qscale = ins["qty_scale"].astype(np.float64)
        self.inverse = (self.kind == int(Kind.INVERSE_PERP)) | (self.kind == int(Kind.INVERSE_FUTURE))
        self.has_options = bool(np.any(self.kind == int(Kind.OPTION)))
        n_tiers = ins["n_tiers"].astype(np.int64)
        owner = np.repeat(np.arange(len(ins)), n_tiers)
        slot = np.concatenate([np.arange(t) for t in n_tiers])
        floor = ins["tier_floor"][owner, slot]
        self.keys = owner + floor / (floor + self.SQUASH)
        self.imr = ins["tier_imr"][owner, slot]
        self.mmr = ins["tier_mmr"][owner, slot]
        self.init_amount = ins["tier_init_amount"][owner, slot]
        self.maint_amount = ins["tier_maint_amount"][owner, slot]


def numpy_pass(store: Store, partition: int, snap: PriceSnapshot, write: bool = True) -> dict:
    """The full-pass rule with whole-array numpy operations over the partition's rows.

    Same formulas, same folded constants, same operation order and same summation order
    (slot 0, 1, ...) as the kernel, so results agree to the last bit or nearly:

        collateral = sum_a bal_a * (px_a (1 - h_a) / scale_a if bal_a > 0 else px_a / scale_a)
        upnl = qty x + cost u, notional = |qty| nu, with per instrument x = cs p / qs,
        u = -1 / scale_s (linear); x = -cs / (p qs), u = 1 / scale_s (inverse);
        nu = |x| (option: cs S / qs)
        tier k by searchsorted on the floor keys; IM/MM = notional * rate_k - amount_k
        cross equity = collateral + sum_cross upnl px_s; IM, MM = sum_cross (.) px_s

    ``write``: store the results into the account rows like the kernel does (plain
    stores, no seqlock: the benchmark has no concurrent readers). Returns the columns.
    """
    t = _Tables(store)
    lo, hi = store.partition_rows(partition)
    s = store.slots_per_account
    n = hi - lo
    acct = store.accounts[lo:hi]
    npos = acct["n_positions"]

    # 1. collateral, asset by asset in the kernel's order, with the kernel's folded weights
    bal = acct["balance"]
    collateral = np.zeros(n)
    for a in range(len(store.assets)):
        b = bal[:, a].astype(np.float64)
        px, scale = snap.asset_px[a], snap.asset_scale[a]
        w_long = px * (1.0 - snap.asset_haircut[a]) / scale
        w_short = px / scale
        collateral += b * np.where(b > 0, w_long, w_short)

    # 2. per instrument, the kernel's pass constants (ins_pass_at), then per position
    #    (n x kmax slots, unused ones masked): upnl = qty x + cost u, notional = |qty| nu
    per_qty = t.cs / t.qscale
    marks = snap.marks
    inv_scale = 1.0 / snap.asset_scale[t.settle]
    nu = np.where(t.inverse, per_qty / marks, per_qty * marks)
    x = np.where(t.inverse, -nu, nu)
    u = np.where(t.inverse, inv_scale, -inv_scale)
    if t.has_options:
        nu = np.where(t.kind == int(Kind.OPTION), per_qty * marks[np.maximum(t.underlying, 0)], nu)
    kmax = int(npos.max()) if n else 0
    pos = store.positions[lo * s: hi * s].reshape(n, s)[:, :kmax]
    inst = pos["instrument"]
    qty, cost = pos["qty"], pos["cost"]
    valid = (qty != 0) | (cost != 0)
    if np.any(npos != kmax):
        valid &= np.arange(kmax) < npos[:, None]
    qf = qty.astype(np.float64)
    upnl = qf * x[inst] + cost.astype(np.float64) * u[inst]
    notional = np.abs(qf) * nu[inst]
    settle = t.settle[inst]
    charged = valid
    long_opt = np.zeros_like(valid)
    if t.has_options:
        long_opt = valid & (t.kind[inst] == int(Kind.OPTION)) & (qf >= 0)
        charged = valid & ~long_opt               # long options: IM their value, no MM
    g = np.searchsorted(t.keys, inst + notional / (notional + _Tables.SQUASH), side="right") - 1
    im = np.where(charged, notional * t.imr[g] - t.init_amount[g], 0.0)
    im = np.where(long_opt, qf * x[inst], im)
    mm = np.where(charged, notional * t.mmr[g] - t.maint_amount[g], 0.0)
    upnl = np.where(valid, upnl, 0.0)

    # 3. per account: cross sums slot by slot (the kernel's order), isolated breaches
    px_s = snap.asset_px[settle]
    isolated = pos["mode"] == int(L.Mode.ISOLATED)
    cross = valid & ~isolated
    cu, ci, cm = (np.where(cross, x * px_s, 0.0) for x in (upnl, im, mm))
    cross_upnl, cross_im, cross_mm = np.zeros(n), np.zeros(n), np.zeros(n)
    for j in range(kmax):
        cross_upnl += cu[:, j]
        cross_im += ci[:, j]
        cross_mm += cm[:, j]
    status = np.zeros(n, np.int32)
    if np.any(isolated & valid):
        iso = pos["isolated_margin"].astype(np.float64) * inv_scale[inst]
        breach = (isolated & valid & (iso + upnl < mm) & (mm > 0)).any(axis=1)
        status |= np.where(breach, int(L.Status.ISOLATED_LIQUIDATABLE), 0).astype(np.int32)
    equity = collateral + cross_upnl
    status |= np.where(equity < cross_im, int(L.Status.BELOW_IM), 0).astype(np.int32)
    status |= np.where((equity < cross_mm) & (cross_mm > 0), int(L.Status.LIQUIDATABLE), 0).astype(np.int32)
    status |= np.where(equity < 0, int(L.Status.BANKRUPT), 0).astype(np.int32)

    if write:
        acct["collateral_usd"] = collateral
        acct["cross_equity_usd"] = equity
        acct["cross_im_usd"] = cross_im
        acct["cross_mm_usd"] = cross_mm
        acct["status"] = status
    return {"collateral_usd": collateral, "cross_equity_usd": equity, "cross_im_usd": cross_im,
            "cross_mm_usd": cross_mm, "status": status}


# --------------------------------------------------------------------------- python models

def _python_inputs(store: Store, rows: np.ndarray):
    """Plain-Python copies of the sampled rows and the tables (not timed)."""
    ins = []
    for r in store.instruments:
        nt = int(r["n_tiers"])
        ins.append((int(r["kind"]), int(r["settle_asset"]), float(r["contract_size"]),
                    int(r["qty_scale"]), r["tier_floor"][:nt].tolist(), r["tier_imr"][:nt].tolist(),
                    r["tier_mmr"][:nt].tolist(), r["tier_init_amount"][:nt].tolist(),
                    r["tier_maint_amount"][:nt].tolist()))
    accts = []
    for row in rows.tolist():
        a = store.accounts[row]
        n = int(a["n_positions"])
        slots = store.slots(row)[:n]
        accts.append((a["balance"].tolist(),
                      [(int(x["instrument"]), int(x["mode"]), int(x["qty"]), int(x["cost"]),
                        int(x["isolated_margin"])) for x in slots]))
    return ins, accts


def python_float_account(ins, balances, slots, marks, px, haircut, scale):
    """The rule in plain Python floats for one account: (collateral, equity, IM, MM, status)."""
    coll = 0.0
    for a, units in enumerate(balances):
        if units:
            b = units / scale[a]
            coll += b * px[a] * (1.0 - haircut[a]) if b > 0 else b * px[a]
    up_x = im_x = mm_x = 0.0
    status = 0
    for i, mode, qty, cost, iso_units in slots:
        kind, settle, cs, qs, floors, imrs, mmrs, inits, maints = ins[i]
        q, p, c = qty / qs, marks[i], cost / scale[settle]
        if kind in (3, 4):
            notional, upnl = abs(q) * cs / p, c - q * cs / p
        else:
            notional, upnl = abs(q) * cs * p, q * cs * p - c
        k = 0
        for t in range(1, len(floors)):
            if floors[t] <= notional:
                k = t
            else:
                break
        im = notional * imrs[k] - inits[k]
        mm = notional * mmrs[k] - maints[k]
        if mode == 1:
            if iso_units / scale[settle] + upnl < mm:
                status |= 4
        else:
            up_x += upnl * px[settle]
            im_x += im * px[settle]
            mm_x += mm * px[settle]
    eq = coll + up_x
    status |= (1 if eq < im_x else 0) | (2 if eq < mm_x else 0) | (8 if eq < 0 else 0)
    return coll, eq, im_x, mm_x, status


def _reference_runner(store: Store, rows: np.ndarray, snap: PriceSnapshot):
    """Return ``(kind, fn, figures)``: ``fn()`` evaluates every sampled account once and
    returns its raw results; ``figures(raw)`` turns them into float rows
    ``(collateral, equity, IM, MM, status)`` for the agreement check.

    ``engine.risk.reference`` (exact fractions) when importable with the entry points
    used here, else ``python_float_account``. Inputs are converted beforehand, not timed.
    """
    try:
        from engine.risk import reference
    except ImportError:
        reference = None
    if reference is not None:
        try:
            assets, instruments = make_universe()
            market = reference.market_from_engine(assets, instruments, snap.marks,
                                                  snap.asset_px[: len(assets)])
            accts = [reference.account_from_store(store, r) for r in rows.tolist()]
            account_figures = reference.account_figures
        except AttributeError:
            pass
        else:
            def run_fractions():     # no liquidation prices: the full pass has none
                return [account_figures(market, a, prices=False) for a in accts]

            def figures(out):
                return [(float(f.collateral_usd), float(f.cross_equity_usd), float(f.cross_im_usd),
                         float(f.cross_mm_usd), int(f.status)) for f in out]
            return "fractions", run_fractions, figures

    ins, py_accts = _python_inputs(store, rows)
    marks, px = snap.marks.tolist(), snap.asset_px.tolist()
    hc, sc = snap.asset_haircut.tolist(), snap.asset_scale.tolist()

    def run_float():
        return [python_float_account(ins, bal, slots, marks, px, hc, sc) for bal, slots in py_accts]
    return "python-float", run_float, list


# --------------------------------------------------------------------------- timing

def _stats_ms(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"median": float(np.median(ms)), "min": float(ms.min()),
            "p90": float(np.percentile(ms, 90)), "reps": len(ms)}


def _time(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bandwidth_floor(nbytes: int, reps: int) -> dict:
    """Time ``numpy.sum`` over a touched uint64 array of ``nbytes`` (the read-only floor)."""
    arr = np.ones(max(1, nbytes // 8), np.uint64)        # written once: every page mapped
    arr.sum()
    st = _stats_ms(_time(arr.sum, reps))
    st["bytes"] = int(arr.nbytes)
    st["gb_per_s"] = arr.nbytes / (st["median"] * 1e-3) / 1e9
    del arr
    return st


def _pass_rows(store: Store, snap: PriceSnapshot, lo: int, hi: int, out: np.ndarray) -> int:
    """The kernel's full pass over rows ``lo <= r < hi`` (a slice of partition 0)."""
    return _margin.full_pass(store.addr(store.instruments), store.addr(store.accounts),
                             store.addr(store.positions), store.slots_per_account, lo, hi,
                             snap.marks, snap.asset_px, snap.asset_haircut, snap.asset_scale, out)


def _in_threads(jobs: list) -> None:
    """Run the callables at once, one thread each (the kernel and numpy's sum release the
    GIL: each thread keeps its own core busy)."""
    threads = [threading.Thread(target=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def where_bound(store: Store, snap: PriceSnapshot, nbytes: int, rounds: int, threads: int,
                cache_rows: int = CACHE_ROWS) -> dict:
    """What limits the full pass: its compute or memory.

    - ``in_cache_ns_per_account``: the pass over the first ``cache_rows`` accounts
      (``cache_rows x 256`` bytes at K = 4: within one core's L2) again and again, less
      the per-call setup (the price tables, timed as a 1-row call), per account. Equal
      to the full pass's ns per account, the pass is bound by its compute: memory would
      not make it faster.
    - ``cython_parallel_ms``: the same full pass in ``threads`` contiguous row ranges at
      once, one thread each -- in memory terms ``threads`` workers, each passing over the
      partitions it owns. ``bandwidth_floor_parallel_ms``: ``numpy.sum`` over the same
      bytes in as many pieces at once (the machine's read bandwidth, not one core's).

    Each of ``rounds`` rounds times the one-thread pass, the split pass and both floors
    back to back, so a ratio compares timings taken within ~50 ms of each other (this
    VM's speed drifts by more than the target's margin between minutes); the ``*_by_round``
    ratios are medians of the per-round ratios. The result columns are blanked (NaN)
    before a last split pass, for the caller to check against the one-thread pass's.
    """
    n = store.partition_rows(0)[1]
    m = min(int(cache_rows), n)
    out = np.empty(4096, np.int64)
    loops = max(1, (1 << 22) // max(m, 1))           # ~4M accounts re-margined per timing

    def cached():
        for _ in range(loops):
            _pass_rows(store, snap, 0, m, out)

    def setup_only():
        for _ in range(loops):
            _pass_rows(store, snap, 0, 1, out)

    t_cached = _stats_ms(_time(cached, rounds))["median"]
    t_setup = _stats_ms(_time(setup_only, rounds))["median"]
    in_cache_ns = max(t_cached - t_setup, 0.0) * 1e6 / (loops * m)

    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    outs = [np.empty(4096, np.int64) for _ in range(threads)]
    jobs = [lambda a=int(a), b=int(b), o=o: _pass_rows(store, snap, a, b, o)
            for a, b, o in zip(bounds[:-1], bounds[1:], outs)]
    arr = np.ones(max(threads, nbytes // 8), np.uint64)
    pieces = np.array_split(arr, threads)
    timed = {"one": lambda: _pass_rows(store, snap, 0, n, out), "split": lambda: _in_threads(jobs),
             "floor_one": arr.sum, "floor_split": lambda: _in_threads([p.sum for p in pieces])}
    ms = {k: [] for k in timed}
    for fn in timed.values():
        fn()                                          # warm-up
    for _ in range(rounds):
        for k, fn in timed.items():
            ms[k].append(_time(fn, 1, warmup=0)[0] * 1e3)
    del pieces, arr
    rows = store.accounts[:n]
    for f in RESULT_FIELDS:
        rows[f] = np.nan                              # so that a row no thread wrote shows
    rows["status"] = -1
    _in_threads(jobs)
    med = {k: float(np.median(v)) for k, v in ms.items()}
    by_round = {k: np.array(v) for k, v in ms.items()}
    return {"in_cache_rows": m, "in_cache_ns_per_account": in_cache_ns,
            "setup_us_per_call": t_setup * 1e3 / loops, "threads": threads, "rounds": rounds,
            "cython_ms": med["one"], "bandwidth_floor_ms": med["floor_one"],
            "cython_parallel_ms": med["split"], "cython_parallel_ms_min": float(min(ms["split"])),
            "bandwidth_floor_parallel_ms": med["floor_split"],
            "bandwidth_floor_parallel_ms_min": float(min(ms["floor_split"])),
            "cython_parallel_over_parallel_floor": med["split"] / med["floor_split"],
            "cython_over_floor_by_round": float(np.median(by_round["one"] / by_round["floor_one"])),
            "cython_parallel_over_parallel_floor_by_round": float(np.median(
                by_round["split"] / by_round["floor_split"]))}


def _snapshot_with_mark(snap: PriceSnapshot, instrument: int, factor: float) -> PriceSnapshot:
    marks = snap.marks.copy()
    marks[instrument] *= factor
    return PriceSnapshot(marks, snap.price_seqs.copy(), snap.flags.copy(), snap.asset_px.copy(),
                         snap.asset_haircut.copy(), snap.asset_scale.copy())


def incremental_tick(store: Store, snap: PriceSnapshot, ticks: int) -> dict:
    """Time ``HolderIndex.tick`` of instrument 0 at marks alternating +-0.1 %.

    The account aggregates start from a full pass at ``snap`` (``refresh`` at the same
    snapshot); afterwards they are checked against the numpy rule at the last mark.
    """
    margin.full_pass(store, 0, snap)
    index = margin.HolderIndex(store, 0)
    index.refresh(snap)
    up = _snapshot_with_mark(snap, TICK_INSTRUMENT, 1.001)
    down = _snapshot_with_mark(snap, TICK_INSTRUMENT, 0.999)
    out = np.empty(4096, np.int64)
    for w in range(4):
        index.tick(TICK_INSTRUMENT, up if w % 2 else down, out)
    us = []
    for t in range(ticks):
        sn = up if t % 2 == 0 else down
        t0 = time.perf_counter_ns()
        index.tick(TICK_INSTRUMENT, sn, out)
        us.append((time.perf_counter_ns() - t0) / 1e3)
    last = up if (ticks - 1) % 2 == 0 else down
    want = numpy_pass(store, 0, last, write=False)
    lo, hi = store.partition_rows(0)
    got = index.agg[lo - index.row_base:hi - index.row_base]   # the worker's tick-by-tick aggregates
    rel = max(_max_rel(got[:, k], want[f]) for k, f in
              ((0, "cross_equity_usd"), (1, "cross_im_usd"), (2, "cross_mm_usd")))

    # Scaling: the pass over the first h holders only (ns per holder), through the thin
    # wrapper (about 2 us of argument checks per call).
    scaling = {}
    n_h = index.holders(TICK_INSTRUMENT)
    for h in sorted({min(n_h, x) for x in (1_000, 10_000, 100_000, n_h)}):
        def call(sn):
            index._tick_one(TICK_INSTRUMENT, sn, out, stop=h)
        ts = []
        for t in range(40):
            sn = up if t % 2 == 0 else down
            t0 = time.perf_counter_ns()
            call(sn)
            ts.append(time.perf_counter_ns() - t0)
        scaling[str(h)] = {"median_us": float(np.median(ts) / 1e3),
                           "ns_per_holder": float(np.median(ts) / h)}
    arr_ts = np.array(us)
    return {"median_us": float(np.median(arr_ts)), "p99_us": float(np.percentile(arr_ts, 99)),
            "min_us": float(arr_ts.min()), "holders": n_h, "ticks": ticks,
            "max_rel_diff_vs_numpy": rel, "kernel_scaling": scaling,
            "trigger_refresh": trigger_refresh_steps(index)}


def trigger_refresh_steps(index: margin.HolderIndex, reps: int = 4) -> dict:
    """Time each step of refreshing instrument 0's trigger table in the background
    (``HolderIndex.refresh_triggers_slice``: solve in steps of 2,048 holders, then
    ``TriggerSort``'s run and merge steps), ``reps`` refreshes after one warm-up; and, as
    the baseline in the same run, the same sort in one step (one run per side, one
    argsort each: what a tick arriving during it waited for before the sort was split)."""
    def refresh(whole_sort: bool) -> list[float]:
        index.dirty[:] = False
        index.dirty[TICK_INSTRUMENT] = True
        old = TriggerSort.CHUNK_HOLDERS, TriggerSort.MERGE_PAIRS
        if whole_sort:
            TriggerSort.CHUNK_HOLDERS = TriggerSort.MERGE_PAIRS = 1 << 62
        try:
            steps = []
            while True:
                t0 = time.perf_counter_ns()
                more = index.refresh_triggers_slice()
                steps.append((time.perf_counter_ns() - t0) / 1e3)
                if not more:
                    return steps[:-1]            # the last call found nothing stale
        finally:
            TriggerSort.CHUNK_HOLDERS, TriggerSort.MERGE_PAIRS = old

    out = {"holders": index.holders(TICK_INSTRUMENT), "reps": reps}
    for name, whole in (("stepped", False), ("whole_sort", True)):
        refresh(whole)
        runs = [refresh(whole) for _ in range(reps)]
        a = np.concatenate([np.array(r) for r in runs])
        out[name] = {"steps": len(runs[0]), "median_us": float(np.median(a)),
                     "p90_us": float(np.percentile(a, 90)), "max_us": float(a.max()),
                     "whole_refresh_ms": float(np.median([sum(r) for r in runs]) / 1e3)}
    out["longest_step_ratio"] = out["stepped"]["max_us"] / out["whole_sort"]["max_us"]
    return out


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|b|, 1 USD) (a 1 USD floor: equity can sit near zero)."""
    if len(a) == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)))


# --------------------------------------------------------------------------- hardware

def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import Cython
        cython_version = Cython.__version__
    except ImportError:
        cython_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "machine": platform.machine(),
            "kernel": platform.release(), "python": platform.python_version(),
            "numpy": np.__version__, "cython": cython_version}


# --------------------------------------------------------------------------- run

def run(accounts: int = 1_000_000, positions: int = 4, json_out: str | os.PathLike | None = None,
        plot_out: str | os.PathLike | None = None, reference_sample: int = 2000, *,
        reps: int = 7, ticks: int = 200, seed: int = 1, quiet: bool = False,
        threads: int | None = None) -> dict:
    """Run the whole benchmark; write ``json_out`` (and the PNG, by default next to it).

    Returns the result dict (the JSON's content).
    """
    n, k = int(accounts), int(positions)
    threads = max(1, int(threads or len(os.sched_getaffinity(0))))
    say = (lambda *a: None) if quiet else print
    name = f"me-bench-{os.getpid()}"
    load_start = os.getloadavg()[0]      # other work on the machine skews every timing
    # 1. build
    store = build_store(name, n, k, seed=seed, quiet=quiet)
    try:
        snap = store.price_snapshot()
        holders = int(np.count_nonzero(
            (store.positions[: n * store.slots_per_account].reshape(n, -1)[:, :k]["instrument"]
             == TICK_INSTRUMENT).any(axis=1)))

        # 2. cython full pass
        _progress("timing the Cython full pass") if not quiet else None
        cy = _stats_ms(_time(lambda: margin.full_pass(store, 0, snap), reps))
        n_liq, _ = margin.full_pass(store, 0, snap)
        lo, hi = store.partition_rows(0)
        cy_cols = {f: store.accounts[lo:hi][f].copy() for f in (*RESULT_FIELDS, "status")}

        # 3. numpy
        _progress("timing the numpy pass") if not quiet else None
        np_reps = max(3, reps // 2)
        npy = _stats_ms(_time(lambda: numpy_pass(store, 0, snap), np_reps))
        got = numpy_pass(store, 0, snap, write=False)
        rel = {f: _max_rel(got[f], cy_cols[f]) for f in RESULT_FIELDS}
        status_mismatch = int(np.count_nonzero(got["status"] != cy_cols["status"]))
        agree = max(rel.values()) <= 1e-9 and status_mismatch == 0
        margin.full_pass(store, 0, snap)        # leave the kernel's results in the rows

        # 4. reference on a sample, extrapolated
        _progress("timing the reference model") if not quiet else None
        sample = min(int(reference_sample), n)
        rows = np.sort(np.random.default_rng(seed + 1).choice(n, sample, replace=False))
        ref_kind, ref_fn, ref_figures = _reference_runner(store, rows, snap)
        ref = _stats_ms(_time(ref_fn, max(1, min(3, reps)), warmup=0))
        ref_ms = ref["median"] * n / sample
        ref_rows = np.array(ref_figures(ref_fn()), dtype=np.float64).reshape(-1, 5)
        ref_rel = max(_max_rel(cy_cols[f][rows - lo], ref_rows[:, j]) for j, f in enumerate(RESULT_FIELDS))
        ref_status = int(np.count_nonzero(cy_cols["status"][rows - lo] != ref_rows[:, 4].astype(np.int32)))

        # 5. bandwidth floor
        _progress("timing the bandwidth floor") if not quiet else None
        need = n * L.ACCOUNT.itemsize + n * k * L.POSITION.itemsize
        bw = bandwidth_floor(need, reps)

        # 6. what bounds the pass: compute (in cache) or memory (both cores at once)
        _progress("timing the pass in cache and on every core") if not quiet else None
        bound = where_bound(store, snap, need, 3 * reps, threads)
        par_rel = max(_max_rel(store.accounts[lo:hi][f], cy_cols[f]) for f in RESULT_FIELDS)
        bound["parallel_agrees"] = bool(par_rel == 0.0 and np.array_equal(
            store.accounts[lo:hi]["status"], cy_cols["status"]))

        # 7. incremental tick
        _progress("timing the incremental tick") if not quiet else None
        inc = incremental_tick(store, snap, ticks)
    finally:
        store.unlink()
        store.detach()
    if not quiet:
        _progress("done")

    # 8. output
    cython_ms, numpy_ms, floor_ms = cy["median"], npy["median"], bw["median"]
    result = {
        "accounts": n,
        "positions": k,
        "cython_ms": cython_ms,
        "numpy_ms": numpy_ms,
        "reference_ms": ref_ms,
        "bandwidth_floor_ms": floor_ms,
        "incremental_tick_us": inc["median_us"],
        "incremental_tick_p99_us": inc["p99_us"],
        "cython_ms_min": cy["min"],
        "cython_ms_p90": cy["p90"],
        "numpy_ms_min": npy["min"],
        "numpy_ms_p90": npy["p90"],
        "bandwidth_floor_ms_min": bw["min"],
        "ratios": {
            "numpy_over_cython": numpy_ms / cython_ms,
            "cython_over_bandwidth_floor": cython_ms / floor_ms,
            "reference_over_cython": ref_ms / cython_ms,
        },
        "targets": {
            "cython_10x_faster_than_numpy": numpy_ms / cython_ms >= 10.0,
            "cython_within_1.3x_of_bandwidth_floor": cython_ms / floor_ms <= 1.3,
            "incremental_tick_under_250_us": inc["median_us"] < 250.0,
        },
        "agreement": {"max_rel_diff": max(rel.values()), "max_rel_diff_by_field": rel,
                      "status_mismatches": status_mismatch, "agree": agree},
        "liquidatable": int(n_liq),
        "holders": inc["holders"],
        "holders_built": holders,
        "incremental": inc,
        "bandwidth": {"bytes": bw["bytes"], "gb_per_s": bw["gb_per_s"],
                      "cython_effective_gb_per_s": need / (cython_ms * 1e-3) / 1e9},
        "reference_kind": ref_kind,
        "reference_sample": sample,
        "reference_sample_ms": ref["median"],
        "reference_agreement": {"max_rel_diff": ref_rel, "status_mismatches": ref_status},
        "ns_per_account": {"cython": cython_ms * 1e6 / n, "numpy": numpy_ms * 1e6 / n},
        "bound": bound,
        "hardware": hardware(),
        "settings": {"partitions": 1, "slots_per_account": 8, "instruments": N_INSTRUMENTS,
                     "assets": len(ASSETS), "reps": reps, "numpy_reps": np_reps, "ticks": ticks,
                     "seed": seed, "holder_share": HOLDER_SHARE, "isolated_share": ISOLATED_SHARE,
                     "shm": "POSIX shared memory (/dev/shm)",
                     "load_average_1m": [load_start, os.getloadavg()[0]]},
    }
    if not agree:
        raise AssertionError(f"numpy and Cython disagree: max rel diff {max(rel.values()):.3g}, "
                             f"{status_mismatch} status mismatches")
    say(summary(result))
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        png = Path(plot_out) if plot_out is not None else path.with_suffix(".png")
        plot(result, png)
        say(f"wrote {path} and {png}")
    elif plot_out is not None:
        plot(result, Path(plot_out))
    return result


def summary(r: dict) -> str:
    hw, ra, t = r["hardware"], r["ratios"], r["targets"]
    ok = {True: "met", False: "MISSED"}
    inc = r["incremental"]
    lines = [
        f"kernel benchmark: {r['accounts']:,} accounts x {r['positions']} positions, "
        f"{r['settings']['instruments']} instruments, 1 partition",
        f"hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB; "
        f"python {hw['python']}, numpy {hw['numpy']}, cython {hw['cython']}; load average "
        f"{r['settings']['load_average_1m'][0]:.2f} -> {r['settings']['load_average_1m'][1]:.2f}",
        f"  cython full pass   {r['cython_ms']:10.2f} ms  (min {r['cython_ms_min']:.2f}, "
        f"p90 {r['cython_ms_p90']:.2f}; {r['ns_per_account']['cython']:.1f} ns/account)",
        f"  numpy pass         {r['numpy_ms']:10.2f} ms  (min {r['numpy_ms_min']:.2f}, "
        f"p90 {r['numpy_ms_p90']:.2f}; max rel diff vs cython {r['agreement']['max_rel_diff']:.2g}, "
        f"{r['agreement']['status_mismatches']} status mismatches)",
        f"  reference ({r['reference_kind']}) {r['reference_ms']:10.1f} ms  (extrapolated from "
        f"{r['reference_sample']} accounts: {r['reference_sample_ms']:.1f} ms)",
        f"  bandwidth floor    {r['bandwidth_floor_ms']:10.2f} ms  ({r['bandwidth']['bytes'] / 1e6:.0f} MB "
        f"at {r['bandwidth']['gb_per_s']:.1f} GB/s; cython reads at "
        f"{r['bandwidth']['cython_effective_gb_per_s']:.1f} GB/s)",
        f"  incremental tick   {r['incremental_tick_us']:10.1f} us  (p99 {r['incremental_tick_p99_us']:.1f} us, "
        f"{inc['holders']:,} holders, {inc['median_us'] * 1e3 / max(inc['holders'], 1):.1f} ns/holder)",
        f"ratios: numpy/cython {ra['numpy_over_cython']:.1f}x [target >= 10: "
        f"{ok[t['cython_10x_faster_than_numpy']]}], cython/floor {ra['cython_over_bandwidth_floor']:.2f}x "
        f"[target <= 1.3: {ok[t['cython_within_1.3x_of_bandwidth_floor']]}], reference/cython "
        f"{ra['reference_over_cython']:.0f}x; tick [target < 250 us: "
        f"{ok[t['incremental_tick_under_250_us']]}]",
    ]
    bd = r["bound"]
    lines.append(
        f"  what bounds it: in cache ({bd['in_cache_rows']:,} accounts) {bd['in_cache_ns_per_account']:.1f} "
        f"ns/account against {r['ns_per_account']['cython']:.1f} from memory. {bd['rounds']} rounds of "
        f"one thread / {bd['threads']} threads: pass {bd['cython_ms']:.2f} / {bd['cython_parallel_ms']:.2f} ms, "
        f"floor {bd['bandwidth_floor_ms']:.2f} / {bd['bandwidth_floor_parallel_ms']:.2f} ms; pass/floor "
        f"by round {bd['cython_over_floor_by_round']:.2f}x / "
        f"{bd['cython_parallel_over_parallel_floor_by_round']:.2f}x (split results "
        f"{'the same' if bd['parallel_agrees'] else 'DIFFERENT'})")
    tr = inc.get("trigger_refresh")
    if tr:
        a, b = tr["stepped"], tr["whole_sort"]
        lines.append(
            f"  trigger refresh of {tr['holders']:,} holders in the background: {a['steps']} steps, "
            f"median {a['median_us']:.0f} us, p90 {a['p90_us']:.0f} us, longest {a['max_us']:.0f} us "
            f"(sort in one step: longest {b['max_us']:.0f} us; ratio {tr['longest_step_ratio']:.2f}); "
            f"whole refresh {a['whole_refresh_ms']:.1f} ms against {b['whole_refresh_ms']:.1f} ms")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Bar chart of the four timings (log scale), each labelled with its ratio to Cython."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bd = r["bound"]
    names = ["Cython\nfull pass", "numpy\nvectorized", f"reference\n({r['reference_kind']})",
             "bandwidth\nfloor", f"Cython,\n{bd['threads']} threads", f"floor,\n{bd['threads']} threads"]
    vals = [r["cython_ms"], r["numpy_ms"], r["reference_ms"], r["bandwidth_floor_ms"],
            bd["cython_parallel_ms"], bd["bandwidth_floor_parallel_ms"]]
    colors = ["#2b6cb0", "#dd6b20", "#718096", "#38a169", "#63b3ed", "#9ae6b4"]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    bars = ax.bar(names, vals, color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("one pass over all accounts (ms, log scale)")
    for b, v in zip(bars, vals):
        ratio = v / r["cython_ms"]
        label = f"{v:,.1f} ms\n" + ("1x" if b is bars[0] else f"{ratio:,.2f}x Cython" if ratio < 10
                                    else f"{ratio:,.0f}x Cython")
        ax.annotate(label, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(min(vals) / 3, max(vals) * 8)
    hw = r["hardware"]
    ax.set_title(f"Margin full pass: {r['accounts']:,} accounts x {r['positions']} positions\n"
                 f"{hw['cpu']}, {hw['cores']} cores, numpy {hw['numpy']}; incremental tick "
                 f"{r['incremental_tick_us']:,.0f} us ({r['holders']:,} holders)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="margin-engine bench kernel", description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=1_000_000)
    ap.add_argument("--positions", type=int, default=4)
    ap.add_argument("--reference-sample", type=int, default=2000)
    ap.add_argument("--json", default="bench/results/kernel.json")
    ap.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ticks", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of the split pass and floor (default: the CPUs this process may use)")
    args = ap.parse_args(argv)
    if args.accounts < 10 or not 1 <= args.positions <= 8 or args.reference_sample < 1 or args.threads < 0:
        ap.error("need --accounts >= 10, 1 <= --positions <= 8, --reference-sample >= 1, --threads >= 0")
    run(args.accounts, args.positions, args.json, args.plot, args.reference_sample,
        reps=args.reps, ticks=args.ticks, seed=args.seed, threads=args.threads or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
