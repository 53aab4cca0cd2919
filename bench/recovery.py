"""Restart recovery: how long a restart takes to rebuild the book (engine/runtime/recovery.py).

``margin-engine bench recovery --accounts N --fills F --json OUT`` builds the kernel
benchmark's book (N accounts x 4 positions over 40 instruments, ``bench.kernel``) in
anonymous memory and times, in one run, each against a baseline measured beside it:

1. snapshot write (``write_snapshot``: npz, fsync, rename) against one ``write(2)`` of the
   same table bytes plus ``fsync`` (the file system's floor for those bytes), and the
   copy of the book alone (``copy_book`` into the supervisor's touched buffers: what a
   snapshot while running pauses fills intake for, beside the rings' drain) against
   ``numpy.copyto`` of the same bytes into new memory;
2. snapshot load into a new store (``load_snapshot``: CRC-checked read, identity check,
   copy) against ``numpy.fromfile`` of the raw bytes;
3. journal replay (``replay_journal``: the gateway's C parser, routing in numpy, one
   kernel call per chunk) of F fills in BATCH frames of 100 (a taker trading one of its
   own instruments with a random maker at that instrument's mark) against the reference
   replay of the same journal into the same snapshot (every record decoded and routed in
   Python, ``fast=False``; the two books must be equal, byte for byte) and against
   decoding the records only with the reference decoder (``decode_fills``);
4. the live worker's ring drain (``_fills.drain_fill_legs``: undo copy, leg rule,
   commit) of 65,535 legs on random accounts of the whole book, ns a leg, against the
   same legs on the first 4,096 accounts only (rows that stay in cache): how much of a
   leg is the wait for its account's memory.

Medians of ``--reps`` runs (the replay once: it changes the book). Files go to a
temporary directory (``--dir``; default the system's), removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.kernel import build_store, make_universe
from engine.runtime import recovery
from engine.runtime.journal import MAGIC, Journal, replay
from engine.store.shm import Store
from feeds.protocol import MsgType, decode_fills, encode_batch

BATCH = 100


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def _raw_tables(store: Store) -> list[np.ndarray]:
    n = int(store.partitions["n_accounts"].sum())
    return [store.partitions, store.accounts[:n], store.positions[: n * store.slots_per_account]]


def write_floor(store: Store, path: str) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for t in _raw_tables(store):
            f.write(memoryview(np.ascontiguousarray(t)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def read_floor(path: str) -> float:
    t0 = time.perf_counter()
    np.fromfile(path, np.uint8)
    return time.perf_counter() - t0


def write_journal(store: Store, path: str, n_fills: int, seed: int = 3) -> int:
    """``n_fills`` fills in BATCH frames; returns the journal's size in bytes."""
    rng = np.random.default_rng(seed)
    n = int(store.partitions["n_accounts"].sum())
    ids = store.accounts["account_id"][:n]
    ins = store.instruments
    px_units = {}
    for i, r in enumerate(ins):
        px_units[i] = int(round(float(store.prices[i]["mark"]) * int(r["price_scale"])))
    j = Journal(path, fsync_interval_s=0)
    seq = 1
    takers = rng.integers(0, n, n_fills)
    makers = (takers + rng.integers(1, n, n_fills)) % n
    sides = rng.random(n_fills) < 0.5
    for b0 in range(0, n_fills, BATCH):
        msgs = []
        for k in range(b0, min(n_fills, b0 + BATCH)):
            t = int(takers[k])
            slot = store.positions[t * store.slots_per_account]   # the taker's first instrument
            i = int(slot["instrument"])
            qty = 1 if sides[k] else -1
            msgs.append({"trade_id": k + 1, "instrument_id": i, "maker_account": int(ids[makers[k]]),
                         "taker_account": int(ids[t]), "qty_units": qty, "price_units": px_units[i],
                         "maker_fee_units": 0, "taker_fee_units": 0, "taker_side": "buy" if qty > 0 else "sell"})
        j.append(seq, 0, encode_batch(MsgType.FILL, msgs, first_seq=seq, ts_ns=0))
        seq += len(msgs)
    j.close()
    return os.path.getsize(path)


def decode_only(path: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for rec in replay(path):
        n += len(decode_fills(rec.frame).fills)
    return time.perf_counter() - t0, n


def drain_ns_per_leg(store: Store, accounts: int, reps: int, seed: int = 7) -> float:
    """Median ns a leg of ``drain_fill_legs`` over 65,535 legs (+1 / -1 unit of each
    account's first instrument, alternately: positions end where they began) on random
    rows among the first ``accounts`` of partition 0."""
    from engine import _fills, _shm
    from engine.runtime.ctl import Control, RecordKind, undo_dtype
    ctl = Control.create(None, 1, store.n_partitions, store.slots_per_account, ring_capacity=1 << 16)
    udt, p = undo_dtype(store.slots_per_account), 0
    lo = store.partition_rows(p)[0]
    n_acc = min(accounts, int(store.partitions["n_accounts"][p]))
    args = (store.addr(store.instruments), store.addr(store.assets), store.addr(store.accounts),
            store.addr(store.positions), store.slots_per_account, store.addr(store.partitions, p),
            store.partitions.dtype.fields["fee_pool"][1], ctl.rings[p].ctypes.data, ctl.records[p].ctypes.data,
            ctl.undo[p].ctypes.data, udt.fields["account"][1], udt.fields["slots"][1], udt.fields["fee_pool"][1])
    rows_buf, codes = np.zeros(1 << 16, np.int64), np.zeros(1 << 16, np.int32)
    recs_buf = np.zeros(1 << 16, ctl.records[p].dtype)
    rng, n, out = np.random.default_rng(seed), (1 << 16) - 1, []
    h, r = ctl.ring_addrs(p)
    for _ in range(reps):
        rows = lo + rng.integers(0, n_acc, n)
        ins = store.positions["instrument"][rows * store.slots_per_account]
        for i, (row, k) in enumerate(zip(rows.tolist(), ins.tolist())):
            _shm.ring_push(h, r, int(RecordKind.FILL_LEG), k, row, 1 - 2 * (i & 1), 100_000, 0, i, 0, 0)
        t0 = time.perf_counter()
        done, ok = _fills.drain_fill_legs(*args, n, rows_buf, codes, recs_buf.ctypes.data)
        out.append((time.perf_counter() - t0) / done * 1e9)
        assert done == n and ok == n, (done, ok)
    return _median(out)


def run(n_accounts: int, n_fills: int, reps: int, out_dir: str | None) -> dict:
    assets, instruments = make_universe()
    names = [a.name for a in assets]
    store = build_store(None, n_accounts, 4, quiet=True)
    for i, ins in enumerate(instruments):
        store.publish_mark(i, ins.mark_price)
    work = tempfile.mkdtemp(prefix="me-bench-recovery-", dir=out_dir)
    try:
        snap, raw, journal = (os.path.join(work, f) for f in ("state.snapshot", "raw.bin", "fills.journal"))
        w_snap, w_raw, l_snap, l_raw, c_book, c_raw, p_book = [], [], [], [], [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            buffers = recovery.book_buffers(store)             # as the supervisor makes them before a cut
            p_book.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            recovery.copy_book(store, names, buffers)          # inside the intake pause
            c_book.append(time.perf_counter() - t0)
            del buffers
            tables = _raw_tables(store)
            dst = [np.empty_like(t) for t in tables]
            t0 = time.perf_counter()
            for d, t in zip(dst, tables):
                np.copyto(d, t)
            c_raw.append(time.perf_counter() - t0)
            del dst
            t0 = time.perf_counter()
            size = recovery.write_snapshot(store, snap, len(MAGIC), names)
            w_snap.append(time.perf_counter() - t0)
            w_raw.append(write_floor(store, raw))
        for _ in range(reps):
            fresh = Store.create(None, assets=assets, instruments=instruments, accounts_capacity=n_accounts,
                                 n_partitions=1, slots_per_account=8)
            t0 = time.perf_counter()
            recovery.load_snapshot(fresh, snap, names)
            l_snap.append(time.perf_counter() - t0)
            l_raw.append(read_floor(raw))
        assert fresh.accounts[:n_accounts]["balance"].tobytes() == store.accounts[:n_accounts]["balance"].tobytes()
        t0 = time.perf_counter()
        jbytes = write_journal(fresh, journal, n_fills)
        built_s = time.perf_counter() - t0
        dec_s, dec_n = decode_only(journal)
        st = recovery.replay_journal(fresh, journal, 0, names)
        assert st.fills + st.fills_rejected == n_fills == dec_n
        # The reference replay (every record decoded and routed in Python) of the same
        # journal into the same snapshot, loaded again: the same book, slower.
        ref = Store.create(None, assets=assets, instruments=instruments, accounts_capacity=n_accounts,
                           n_partitions=1, slots_per_account=8)
        recovery.load_snapshot(ref, snap, names)
        st_ref = recovery.replay_journal(ref, journal, 0, names, fast=False)
        for t in ("accounts", "positions", "partitions"):
            a, b = getattr(fresh, t).copy(), getattr(ref, t).copy()
            if "seq" in a.dtype.names:               # seqlock counters: how often a row was written
                a["seq"] = b["seq"] = 0
            assert a.tobytes() == b.tobytes(), f"the fast and the reference replay differ in {t}"
        drain_ns = drain_ns_per_leg(store, n_accounts, reps)
        drain_cached_ns = drain_ns_per_leg(store, 4096, reps)
        return {
            "accounts": n_accounts, "positions": 4, "fills": n_fills, "batch": BATCH, "reps": reps,
            "drain_ns_per_leg": drain_ns, "drain_in_cache_ns_per_leg": drain_cached_ns,
            "snapshot_bytes": size, "raw_bytes": os.path.getsize(raw),
            "snapshot_write_s": _median(w_snap), "raw_write_fsync_s": _median(w_raw),
            "snapshot_load_s": _median(l_snap), "raw_read_s": _median(l_raw),
            "copy_book_s": _median(c_book), "prepare_buffers_s": _median(p_book), "raw_copy_s": _median(c_raw),
            "journal_bytes": jbytes, "journal_build_s": built_s,
            "replay_s": st.seconds, "replay_fills_per_s": st.fills / st.seconds if st.seconds else None,
            "replay_legs_rejected": st.legs_rejected,
            "decode_only_s": dec_s, "decode_only_fills_per_s": dec_n / dec_s if dec_s else None,
            "write_ratio": _median(w_snap) / _median(w_raw), "load_ratio": _median(l_snap) / _median(l_raw),
            "replay_reference_s": st_ref.seconds,
            "replay_reference_fills_per_s": st_ref.fills / st_ref.seconds if st_ref.seconds else None,
            "replay_speedup_over_reference": st_ref.seconds / st.seconds if st.seconds else None,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(3)
    a1.bar(x - 0.2, [r["snapshot_write_s"], r["snapshot_load_s"], r["copy_book_s"]], 0.4,
           label="snapshot (npz, CRC, fsync; copy: copy_book)")
    a1.bar(x + 0.2, [r["raw_write_fsync_s"], r["raw_read_s"], r["raw_copy_s"]], 0.4, label="raw bytes (floor)")
    a1.set_xticks(x, ["write", "load", "copy (the cut's pause)"])
    a1.set_ylabel("seconds")
    a1.set_title(f"Snapshot of {r['accounts']:,} accounts ({r['snapshot_bytes'] / 2**20:.0f} MiB)")
    a1.legend()
    a2.bar([0, 1, 2], [r["replay_fills_per_s"], r["replay_reference_fills_per_s"], r["decode_only_fills_per_s"]], 0.5)
    a2.set_xticks([0, 1, 2], ["replay\n(C parse, numpy route,\nkernel apply)", "reference replay\n(Python decode\n+ route)",
                              "Python decode\nonly"])
    a2.set_ylabel("fills / s")
    a2.set_title(f"Journal replay, {r['fills']:,} fills in batches of {r['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="margin-engine bench recovery", description=__doc__.split("\n")[0])
    ap.add_argument("--accounts", type=int, default=1_000_000)
    ap.add_argument("--fills", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the files are written (default: the system's temp dir)")
    ap.add_argument("--json", default="bench/results/recovery.json")
    a = ap.parse_args(argv)
    r = run(a.accounts, a.fills, a.reps, a.dir)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    plot(r, out.with_suffix(".png"))
    sys.stdout.write(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
