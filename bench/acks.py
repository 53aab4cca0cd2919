"""Acknowledgement benchmark: what a durable acknowledgement costs (``engine.journal_sync``).

``margin-engine bench acks --json OUT`` measures, in one run:

1. floor -- a bare DEALER -> ROUTER echo in its own process (``bench.feeds``), one frame
   in flight, with the same fills frames the engine gets: the least any ZeroMQ server
   answering a frame could cost.
2. per mode, ``interval`` then ``ack``: a ``LocalEngine`` with ``endpoints.fills_acks``
   (its fills socket a ROUTER answering every frame) and ``engine.journal_sync`` set to
   the mode, its journal in ``--dir`` (default the system's temporary directory; the
   JSON names the file system):

   a. fills ACK round trip: one BATCH frame of ``--batch`` fills in flight, each sent when
      the previous frame's ACK came back (no queueing hidden), ``--frames`` samples;
   b. acknowledged fills/s: ``--inflight`` frames in flight, each frame's time from its
      send to its ACK;
   c. DEPOSIT round trip (custody -> COLLATERAL_REPLY applied), one in flight.

   Every frame is new (its own sequence numbers), so every ACK covers a journal record;
   the fills come in +/- pairs so positions end where they started.

"ack" pays one ``fdatasync`` per burst of acknowledgements: a round trip with one frame
in flight pays it whole, while with many in flight one sync covers every frame that
arrived during the previous one (group commit). Usage::

    python -m bench.acks --json bench/results/acks.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from bench.feeds import (_client, _echo_server, _fill_dicts, _frames, _log, _pct_us, rtt_closed_loop,
                         throughput_inflight)
from bench.kernel import hardware
from engine.codes import Code
from engine.instruments import Kind
from engine.runtime.harness import LocalEngine, local_config, wait_until
from engine.runtime.provision import provision
from feeds.protocol import MsgType, decode, encode

MODES = ("interval", "ack")


def _fs_type(path: str) -> str:
    try:
        return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _deposit_frames(n: int, accounts: int, first_seq: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [encode(MsgType.DEPOSIT, {"request_id": first_seq + k, "account": rng.randint(1, accounts),
                                     "asset": "USDT", "amount_units": 1}, seq=first_seq + k, ts_ns=time.time_ns())
            for k in range(n)]


def _codes(replies: list[bytes]) -> list[tuple[int, int]]:
    out = []
    for r in replies:
        m = decode(r)
        out.append((int(m.type), int(m.fields["code"])))
    return out


def engine_run(mode: str, state_dir: str, root: str, *, accounts: int, frames_n: int, batch: int,
               inflight: int, deposits: int, warmup: int, seed: int, quiet: bool) -> dict:
    config = local_config(os.path.join(root, mode), accounts_capacity=max(20_000, 2 * accounts + 16),
                          partitions=2, journal_sync=mode, state_dir=os.path.join(state_dir, mode))
    config = dataclasses.replace(config, endpoints=dataclasses.replace(config.endpoints, fills_acks=True))
    os.makedirs(config.engine.state_dir, exist_ok=True)
    instruments = [{"index": i.index, "price_units": int(round(i.mark_price * i.price_scale))}
                   for i in config.instruments if i.kind in (Kind.PERP, Kind.FUTURE)]
    # Every frame a new one: warmup, the closed loop, then the in-flight run, seqs in a row.
    n_frames = warmup + frames_n + frames_n
    fills = _fill_dicts(n_frames * batch, accounts, instruments, seed)
    frames = _frames(fills, batch, 1, time.time_ns())
    deps = _deposit_frames(warmup + deposits, accounts, 1, seed + 1)
    setup = lambda store: provision(store, config, accounts, seed=seed, max_leverage=5.0)  # noqa: E731
    zctx = zmq.Context()
    out: dict = {"mode": mode}
    with LocalEngine(config, setup=setup) as eng:
        applied0 = int(eng.store.partitions["fills_applied"].sum())     # provisioning's own
        _log(quiet, f"{mode}: fills ACK round trips, {frames_n:,} BATCH frames of {batch}")
        c = _client(zctx, config.endpoints.fills)
        rtt_closed_loop(c, frames[:warmup], warmup, 0)          # warmup: each frame once
        hist, replies = rtt_closed_loop(c, frames[warmup: warmup + frames_n], frames_n, 0)
        assert set(_codes(replies)) == {(int(MsgType.ACK), 0)}, _codes(replies)
        out["fills_ack_rtt_us"] = _pct_us(hist)
        _log(quiet, f"{mode}: {frames_n:,} frames, {inflight} in flight")
        tp, tp_hist = throughput_inflight(c, frames[warmup + frames_n:], frames_n, inflight)
        out["frames_acked_per_s"] = tp
        out["fills_acked_per_s"] = tp * batch
        out["inflight_ack_rtt_us"] = _pct_us(tp_hist)
        c.close()
        store = eng.store
        want = 2 * n_frames * batch                 # ACKed means routed; wait until applied
        wait_until(lambda: int(store.partitions["fills_applied"].sum()) - applied0 >= want, 30.0,
                   "every leg applied")
        applied = int(store.partitions["fills_applied"].sum()) - applied0
        _log(quiet, f"{mode}: {deposits:,} DEPOSIT round trips")
        c = _client(zctx, config.endpoints.checks)
        rtt_closed_loop(c, deps[:warmup], warmup, 0)
        dhist, dreplies = rtt_closed_loop(c, deps[warmup:], deposits, 0)
        assert set(_codes(dreplies)) == {(int(MsgType.COLLATERAL_REPLY), int(Code.OK))}, _codes(dreplies)
        out["deposit_rtt_us"] = _pct_us(dhist)
        c.close()
    zctx.term()
    out["exit_codes"] = eng.exit_codes
    out["legs_applied"] = applied
    out["legs_expected"] = 2 * n_frames * batch
    out["journal_bytes"] = sum(os.path.getsize(os.path.join(config.engine.state_dir, f))
                               for f in os.listdir(config.engine.state_dir) if f.endswith(".log"))
    return out


def run(json_out: str | os.PathLike | None = "bench/results/acks.json", *, accounts: int = 10_000,
        frames: int = 5_000, batch: int = 10, inflight: int = 64, deposits: int = 2_000, warmup: int = 500,
        directory: str | None = None, seed: int = 5, quiet: bool = False,
        plot_out: str | os.PathLike | None = "") -> dict:
    root = tempfile.mkdtemp(prefix="me-bench-acks-")
    state_dir = tempfile.mkdtemp(prefix="me-bench-acks-state-", dir=directory)
    ctx = mp.get_context("spawn")
    result: dict = {"hardware": hardware(), "settings": {
        "accounts": accounts, "frames": frames, "batch": batch, "inflight": inflight, "deposits": deposits,
        "warmup": warmup, "seed": seed, "state_dir_fs": _fs_type(state_dir), "transport": "ipc"}}
    try:
        # 1. floor: the same frames, echoed.
        _log(quiet, f"floor: bare DEALER->ROUTER echo, {frames:,} frames of {batch} fills")
        probe = local_config(os.path.join(root, "probe"))
        instruments = [{"index": i.index, "price_units": int(round(i.mark_price * i.price_scale))}
                       for i in probe.instruments if i.kind in (Kind.PERP, Kind.FUTURE)]
        floor_frames = _frames(_fill_dicts((warmup + frames) * batch, accounts, instruments, seed), batch, 1,
                               time.time_ns())
        ep = f"ipc://{root}/floor.sock"
        parent, child = ctx.Pipe()
        echo = ctx.Process(target=_echo_server, args=(ep, child), daemon=True)
        echo.start()
        parent.recv()
        zctx = zmq.Context()
        c = _client(zctx, ep)
        rtt_closed_loop(c, floor_frames[:warmup], warmup, 0)
        hist, _ = rtt_closed_loop(c, floor_frames[warmup:], frames, 0)
        tp, tp_hist = throughput_inflight(c, floor_frames, frames, inflight)
        c.send(b"stop")
        c.close()
        echo.join(5)
        zctx.term()
        result["floor"] = {"rtt_us": _pct_us(hist), "frames_per_s": tp, "inflight_rtt_us": _pct_us(tp_hist)}
        # 2. the engine in each mode
        for mode in MODES:
            result[mode] = engine_run(mode, state_dir, root, accounts=accounts, frames_n=frames, batch=batch,
                                      inflight=inflight, deposits=deposits, warmup=warmup, seed=seed,
                                      quiet=quiet)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    f, i, a = result["floor"], result["interval"], result["ack"]
    result.update({
        "floor_rtt_p50_us": f["rtt_us"]["p50"], "floor_rtt_p99_us": f["rtt_us"]["p99"],
        "interval_ack_rtt_p50_us": i["fills_ack_rtt_us"]["p50"], "interval_ack_rtt_p99_us": i["fills_ack_rtt_us"]["p99"],
        "ack_ack_rtt_p50_us": a["fills_ack_rtt_us"]["p50"], "ack_ack_rtt_p99_us": a["fills_ack_rtt_us"]["p99"],
        "durable_ack_cost_p50_us": a["fills_ack_rtt_us"]["p50"] - i["fills_ack_rtt_us"]["p50"],
        "interval_fills_acked_per_s": i["fills_acked_per_s"], "ack_fills_acked_per_s": a["fills_acked_per_s"],
        "ack_over_interval_throughput": a["fills_acked_per_s"] / i["fills_acked_per_s"],
        "interval_deposit_rtt_p50_us": i["deposit_rtt_us"]["p50"], "ack_deposit_rtt_p50_us": a["deposit_rtt_us"]["p50"],
        "complete": all(result[m]["legs_applied"] == result[m]["legs_expected"] and
                        all(v == 0 for v in result[m]["exit_codes"].values()) for m in MODES),
    })
    if json_out:
        p = Path(json_out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2) + "\n")
        if plot_out is not None:
            plot(result, Path(plot_out) if plot_out else p.with_suffix(".png"))
    if not quiet:
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    return result


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [("floor (echo)", r["floor"]["rtt_us"]), ("interval: ACK", r["interval"]["fills_ack_rtt_us"]),
            ("ack: ACK", r["ack"]["fills_ack_rtt_us"]), ("interval: DEPOSIT", r["interval"]["deposit_rtt_us"]),
            ("ack: DEPOSIT", r["ack"]["deposit_rtt_us"])]
    xs = range(len(rows))
    for k, (pct, color) in enumerate((("p50", "tab:blue"), ("p99", "tab:orange"))):
        ax1.bar([x + 0.38 * k for x in xs], [v[pct] for _, v in rows], 0.38, label=pct, color=color)
    ax1.set_xticks([x + 0.19 for x in xs], [n for n, _ in rows], rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel("round trip, us (one in flight)")
    ax1.set_title(f"fills frame of {r['settings']['batch']} / deposit round trips")
    ax1.legend()
    names = ["floor (echo)", "interval", "ack"]
    vals = [r["floor"]["frames_per_s"] * r["settings"]["batch"], r["interval"]["fills_acked_per_s"],
            r["ack"]["fills_acked_per_s"]]
    ax2.bar(names, vals, color=["grey", "tab:blue", "tab:green"])
    ax2.set_ylabel("fills acknowledged per s")
    ax2.set_title(f"{r['settings']['inflight']} frames in flight")
    fig.suptitle(f"engine.journal_sync: page cache (interval) vs fdatasync before the ACK (ack); "
                 f"journal on {r['settings']['state_dir_fs']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="margin-engine bench acks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--accounts", type=int, default=10_000)
    ap.add_argument("--frames", type=int, default=5_000, help="frames per measurement")
    ap.add_argument("--batch", type=int, default=10, help="fills per BATCH frame")
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--deposits", type=int, default=2_000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--dir", default=None, help="where the journals go (default: the system's temp dir)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--json", default="bench/results/acks.json")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    r = run(a.json, accounts=a.accounts, frames=a.frames, batch=a.batch, inflight=a.inflight,
            deposits=a.deposits, warmup=a.warmup, directory=a.dir, seed=a.seed, quiet=a.quiet)
    return 0 if r["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
