"""Feeds benchmark: order-check round trips against a bare ZeroMQ floor, and fills/s into shm.

One run, top to bottom:

1. floor -- a bare ZeroMQ request-reply round trip on the same transport as the engine's
   checks endpoint: a DEALER client here, a ROUTER echo server in its own process that
   unpacks the msgpack body and sends it back (same size both ways). One request in
   flight, so every sample is one clean round trip.
2. engine -- a ``LocalEngine`` (supervisor, gateway, workers, markprice, liqgw) with
   ``accounts`` provisioned accounts; journaling on (it always is).
3. order check -- the same client code against the gateway: ORDER_CHECK ->
   ORDER_CHECK_REPLY, one in flight (p50/p99), then ``inflight`` in flight for a
   throughput figure.
4. fills -- a sender process pushes ``fills`` FILLs as fast as it can, (a) one FILL
   per frame, (b) BATCH frames of ``batch``; the rate is end to end: fills *applied*
   by the workers (each fill = 2 legs, the partitions' ``fills_applied`` counters in
   shared memory) over the wall time from the first send to the last leg applied. The
   gateway-intake rate (last leg pushed onto a partition ring, from the rings' write
   indices) is reported beside it, and the intake rate while no ring was over half
   full (before the workers' back-pressure sets the pace). At the end: legs applied == 2 * fills sent.
5. output -- summary with the hardware and settings on stdout, JSON and a PNG.

Latency samples come from a closed loop with one request in flight: each request is
sent only after the previous reply came back, and its time runs from send to reply,
so no queueing delay is hidden (no coordinated omission). Request frames are encoded
before timing starts. Usage::

    python -m bench.feeds --json bench/results/feeds.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq
from hdrh.histogram import HdrHistogram

from bench.kernel import hardware
from engine.instruments import Kind
from engine.runtime.ctl import Control
from engine.runtime.harness import LocalEngine, local_config
from engine.runtime.provision import provision
from feeds.protocol import VERSION, MsgType, decode, encode

HIST_MAX_NS = 10_000_000_000        # 10 s, 3 significant digits
CHECK_POOL = 1024                  # distinct pre-encoded ORDER_CHECK frames, cycled

_packb = msgpack.Packer(use_bin_type=True, use_single_float=False, autoreset=True).pack


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- 1. floor

def _echo_server(endpoint: str, ready, cpu: int = -1) -> None:
    """ROUTER echo: unpack the body (as any msgpack server would), send the frame back.
    ``cpu``: pinned there, as the engine's gateway is in the same run."""
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(endpoint)
    ready.send(True)
    echo_until_stop(s)
    s.close()
    ctx.term()


def echo_until_stop(s: zmq.Socket) -> None:
    """The echo's loop on a bound ROUTER: unpack each body, send the frame back, until
    a frame ``stop``."""
    unpackb = msgpack.unpackb
    while True:
        ident, frame = s.recv_multipart()
        if frame == b"stop":
            break
        unpackb(frame)
        s.send_multipart([ident, frame])


def _client(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    c = ctx.socket(zmq.DEALER)
    c.setsockopt(zmq.LINGER, 0)
    c.setsockopt(zmq.RCVTIMEO, 10_000)      # a lost reply fails the run instead of hanging it
    c.connect(endpoint)
    return c


def rtt_closed_loop(sock: zmq.Socket, frames: list[bytes], n: int, warmup: int) -> tuple[HdrHistogram, list]:
    """Round trips with one request in flight; ``n`` samples after ``warmup`` untimed ones.

    Returns the histogram (ns) and a few replies to check."""
    hist = HdrHistogram(1, HIST_MAX_NS, 3)
    send, recv, clock = sock.send, sock.recv, time.perf_counter_ns
    m = len(frames)
    for i in range(warmup):
        send(frames[i % m])
        recv()
    kept = []
    rec = hist.record_value
    for i in range(n):
        f = frames[i % m]
        t0 = clock()
        send(f)
        r = recv()
        rec(clock() - t0)
        if i < 8:
            kept.append(r)
    return hist, kept


def throughput_inflight(sock: zmq.Socket, frames: list[bytes], n: int, inflight: int) -> tuple[float, HdrHistogram]:
    """``n`` requests with ``inflight`` outstanding; requests/s and per-request latency (ns).

    Replies come back in order on one connection, so request ``i``'s send time is
    matched to the ``i``-th reply."""
    hist = HdrHistogram(1, HIST_MAX_NS, 3)
    m = len(frames)
    clock = time.perf_counter_ns
    sent_at = [0] * n
    sent = done = 0
    t0 = clock()
    while sent < min(inflight, n):
        sent_at[sent] = clock()
        sock.send(frames[sent % m])
        sent += 1
    while done < n:
        sock.recv()
        hist.record_value(clock() - sent_at[done])
        done += 1
        if sent < n:
            sent_at[sent] = clock()
            sock.send(frames[sent % m])
            sent += 1
    return n / ((clock() - t0) / 1e9), hist


def _pct_us(h: HdrHistogram) -> dict:
    return {"p50": h.get_value_at_percentile(50) / 1e3, "p90": h.get_value_at_percentile(90) / 1e3,
            "p99": h.get_value_at_percentile(99) / 1e3, "p999": h.get_value_at_percentile(99.9) / 1e3,
            "max": h.get_max_value() / 1e3, "mean": h.get_mean_value() / 1e3, "count": h.get_total_count()}


# --------------------------------------------------------------------------- 4. fills sender

def _fill_dicts(n: int, accounts: int, instruments: list[dict], seed: int) -> list[dict]:
    """``n`` fills between random account pairs at the mark, each pair's fills in
    +/- pairs so positions end where they started (nobody drifts into liquidation)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        if k % 2 == 0:
            ins = instruments[rng.randrange(len(instruments))]
            taker = rng.randint(1, accounts)
            maker = rng.randint(1, accounts - 1)
            maker += maker >= taker
            qty = 1
        else:
            qty = -1
        out.append({"trade_id": k + 1, "instrument_id": ins["index"], "maker_account": maker,
                    "taker_account": taker, "qty_units": qty, "price_units": ins["price_units"],
                    "maker_fee_units": 0, "taker_fee_units": 0,
                    "taker_side": "buy" if qty > 0 else "sell"})
    return out


def _frames(fills: list[dict], batch: int, first_seq: int, ts_ns: int) -> list[bytes]:
    """Frames exactly as ``feeds.protocol.encode`` writes them (checked by the caller on
    the first), packed directly so that encoding 1M fills takes seconds, not minutes."""
    if batch <= 1:
        return [_packb({"v": VERSION, "t": int(MsgType.FILL), "seq": first_seq + k, "ts_ns": ts_ns, **f})
                for k, f in enumerate(fills)]
    return [_packb({"v": VERSION, "t": int(MsgType.BATCH), "seq": first_seq + k, "ts_ns": ts_ns,
                    "of": int(MsgType.FILL), "msgs": fills[k: k + batch]})
            for k in range(0, len(fills), batch)]


def _sender(endpoint: str, conn) -> None:
    """Sender process: ``prepare`` encodes the frames, ``go`` pushes them as fast as it can."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 5000)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(endpoint)
    frames: list[bytes] = []
    while True:
        cmd, arg = conn.recv()
        if cmd == "prepare":
            fills = _fill_dicts(arg["n"], arg["accounts"], arg["instruments"], arg["seed"])
            frames = _frames(fills, arg["batch"], arg["first_seq"], time.time_ns())
            conn.send((len(frames), frames[0], fills[0], sum(map(len, frames))))
        elif cmd == "go":
            send = s.send
            t0 = time.monotonic_ns()
            for f in frames:
                send(f)
            conn.send((t0, time.monotonic_ns()))
            frames = []
        else:
            break
    s.close()
    ctx.term()


def _legs_applied(store) -> int:
    return int(store.partitions["fills_applied"].sum())


def _legs_pushed(ctl: Control) -> int:
    return int(sum(int(r[0]["write_idx"]) for r in ctl.rings))


def fills_run(conn, store, ctl: Control, n: int, batch: int, first_seq: int, accounts: int,
              instruments: list[dict], seed: int, timeout_s: float) -> dict:
    """Push ``n`` fills (``batch`` per frame; 1 = one FILL per frame), wait until their
    ``2 n`` legs are applied, return rates and counts."""
    conn.send(("prepare", {"n": n, "batch": batch, "first_seq": first_seq, "accounts": accounts,
                           "instruments": instruments, "seed": seed}))
    n_frames, first_frame, first_fill, wire_bytes = conn.recv()
    # The directly packed frame is byte for byte what the protocol's encoder writes.
    if batch <= 1:
        want = encode(MsgType.FILL, first_fill, seq=first_seq, ts_ns=decode(first_frame).ts_ns)
    else:
        m = decode(first_frame)
        want = encode(MsgType.BATCH, {"of": int(MsgType.FILL), "msgs": m.fields["msgs"]},
                      seq=first_seq, ts_ns=m.ts_ns)
    assert first_frame == want, "bench frames differ from feeds.protocol.encode"
    applied0, pushed0 = _legs_applied(store), _legs_pushed(ctl)
    want_legs = 2 * n
    conn.send(("go", None))
    t_pushed = None
    # Intake before back-pressure: the last sample at which no ring was over half full
    # (beyond that the gateway waits for the workers and its rate is theirs).
    half = ctl.capacity // 2
    unblocked, blocked = (0, 0), False
    deadline = time.monotonic() + timeout_s
    while True:
        now = time.monotonic_ns()
        pushed_now = _legs_pushed(ctl) - pushed0
        if not blocked:
            if max(ctl.backlog(p) for p in range(ctl.n_partitions)) < half:
                unblocked = (now, pushed_now)
            else:
                blocked = True
        if t_pushed is None and pushed_now >= want_legs:
            t_pushed = now
        if _legs_applied(store) - applied0 >= want_legs:
            t_applied = now
            break
        if time.monotonic() > deadline:
            t_applied = None
            break
        time.sleep(0.0005)
    t_first, t_last_sent = conn.recv()
    applied = _legs_applied(store) - applied0
    pushed = _legs_pushed(ctl) - pushed0
    if t_pushed is None:
        t_pushed = t_applied
    res = {"fills": n, "batch": max(1, batch), "frames": n_frames, "wire_bytes": wire_bytes,
           "legs_applied": applied, "legs_pushed": pushed, "legs_expected": want_legs,
           "complete": applied == want_legs, "timed_out": t_applied is None}
    if t_applied is not None:
        res["wall_s"] = (t_applied - t_first) / 1e9
        res["fills_per_s"] = n / res["wall_s"]
        res["intake_s"] = (t_pushed - t_first) / 1e9
        res["intake_fills_per_s"] = n / res["intake_s"]
        if unblocked[1]:
            res["intake_unblocked_fills_per_s"] = unblocked[1] / 2 / ((unblocked[0] - t_first) / 1e9)
            res["intake_unblocked_fills"] = unblocked[1] // 2
        res["send_s"] = (t_last_sent - t_first) / 1e9
        res["send_fills_per_s"] = n / res["send_s"]
    return res


# --------------------------------------------------------------------------- run

def _check_frames(instruments: list[dict], accounts: int, n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    frames = []
    for k in range(n):
        ins = instruments[rng.randrange(len(instruments))]
        frames.append(encode(MsgType.ORDER_CHECK, {
            "request_id": k + 1, "account": rng.randint(1, accounts), "instrument_id": ins["index"],
            "qty_units": rng.choice((1, -1)) * rng.randint(1, 5), "price_units": ins["price_units"]},
            seq=k + 1, ts_ns=time.time_ns()))
    return frames


def run(json_out: str | os.PathLike | None = "bench/results/feeds.json", *, accounts: int = 10_000,
        checks: int = 50_000, warmup: int = 5_000, throughput_checks: int = 50_000, inflight: int = 64,
        fills: int = 400_000, batch: int = 100, workers: int = 1, transport: str = "ipc",
        plot_out: str | os.PathLike | None = "", seed: int = 11, timeout_s: float = 600.0,
        quiet: bool = False, pin: bool | None = None) -> dict:
    """Run the whole benchmark; write ``json_out`` (and the PNG next to it unless
    ``plot_out`` is None); return the result dict.

    ``pin`` (default: when this process may run on 2+ CPUs): the round trips run with the
    client on the first allowed CPU and the server on the second -- the bare echo for the
    floor, the engine's gateway (``engine.gateway_cpu``) for the order checks -- so both
    see the same placement instead of whatever the scheduler picked that run.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if pin is None:
        pin = len(allowed) >= 2
    if pin and len(allowed) < 2:
        raise ValueError("pinning needs 2 CPUs this process may run on")
    client_cpu, server_cpu = (allowed[0], allowed[1]) if pin else (-1, -1)
    if transport not in ("ipc", "tcp"):
        raise ValueError("transport: ipc or tcp")
    ctx = mp.get_context("spawn")
    root = tempfile.mkdtemp(prefix="me-bench-feeds-")
    tcp = {"checks": _free_port(), "fills": _free_port()} if transport == "tcp" else None
    config = local_config(root, tcp_ports=tcp, accounts_capacity=max(20_000, 2 * accounts + 16),
                          partitions=2, gateway_cpu=server_cpu)
    ep = config.endpoints
    floor_ep = f"tcp://127.0.0.1:{_free_port()}" if transport == "tcp" else f"ipc://{root}/floor.sock"
    instruments = [{"index": i.index, "price_units": int(round(i.mark_price * i.price_scale))}
                   for i in config.instruments if i.kind in (Kind.PERP, Kind.FUTURE)]
    frames = _check_frames(instruments, accounts, CHECK_POOL, seed)
    zctx = zmq.Context()
    result: dict = {"hardware": hardware(), "settings": {
        "transport": transport, "accounts": accounts, "checks": checks, "warmup": warmup,
        "throughput_checks": throughput_checks, "inflight": inflight, "fills": fills, "batch": batch,
        "workers": workers, "partitions": config.engine.partitions, "wait": config.engine.wait,
        "journal": True, "journal_fsync_interval_s": 1.0, "check_frame_bytes": len(frames[0]),
        "ring_capacity_per_partition": 1 << 16, "seed": seed,
        "pinned": {"client_cpu": client_cpu, "server_cpu": server_cpu} if pin else None}}
    own_cpus = os.sched_getaffinity(0)

    def client_pinned(on: bool) -> None:
        if pin:
            os.sched_setaffinity(0, {client_cpu} if on else own_cpus)

    # 1. floor
    _log(quiet, f"floor: bare DEALER->ROUTER echo on {transport}, {checks:,} samples")
    parent, child = ctx.Pipe()
    echo = ctx.Process(target=_echo_server, args=(floor_ep, child, server_cpu), daemon=True)
    echo.start()
    parent.recv()
    c = _client(zctx, floor_ep)
    client_pinned(True)
    floor_hist, replies = rtt_closed_loop(c, frames, checks, warmup)
    assert replies[0] == frames[0]
    floor_tp, floor_tp_hist = throughput_inflight(c, frames, throughput_checks, inflight)
    client_pinned(False)
    c.send(b"stop")
    c.close()
    echo.join(5)
    result["floor"] = {"rtt_us": _pct_us(floor_hist), "throughput_per_s": floor_tp,
                       "inflight_rtt_us": _pct_us(floor_tp_hist)}

    # 2. engine
    _log(quiet, f"engine: {accounts:,} accounts, {workers} worker(s), starting")
    setup = lambda store: provision(store, config, accounts, seed=seed, max_leverage=5.0)  # noqa: E731
    with LocalEngine(config, setup=setup, n_workers=workers) as eng:
        store = eng.store
        ctl = Control.attach("/" + config.engine.name + "-ctl")

        # 3. order check
        _log(quiet, f"order check: {checks:,} samples, then {inflight} in flight")
        c = _client(zctx, ep.checks)
        client_pinned(True)
        chk_hist, replies = rtt_closed_loop(c, frames, checks, warmup)
        codes = [decode(r).fields["code"] for r in replies]
        assert all(decode(r).type == MsgType.ORDER_CHECK_REPLY for r in replies), replies[:1]
        chk_tp, chk_tp_hist = throughput_inflight(c, frames, throughput_checks, inflight)
        client_pinned(False)
        c.close()
        result["order_check"] = {"rtt_us": _pct_us(chk_hist), "throughput_per_s": chk_tp,
                                 "inflight_rtt_us": _pct_us(chk_tp_hist), "sample_codes": codes}

        # 4. fills
        parent, child = ctx.Pipe()
        sender = ctx.Process(target=_sender, args=(ep.fills, child), daemon=True)
        sender.start()
        runs = {}
        seq = 1
        for label, b in (("single", 1), ("batched", batch)):
            _log(quiet, f"fills ({label}): {fills:,} fills, {b} per frame")
            runs[label] = fills_run(parent, store, ctl, fills, b, seq, accounts, instruments,
                                    seed + len(runs), timeout_s)
            seq += fills
            _log(quiet, "  " + json.dumps({k: runs[label].get(k) for k in
                                          ("fills_per_s", "intake_fills_per_s", "legs_applied")}))
        parent.send(("stop", None))
        sender.join(10)
        result["fills"] = runs
        result["total_legs_applied"] = _legs_applied(store)
        del ctl
    result["gateway_exit_codes"] = eng.exit_codes
    zctx.term()

    f, o = result["floor"]["rtt_us"], result["order_check"]["rtt_us"]
    single, batched = result["fills"]["single"], result["fills"]["batched"]
    result.update({
        "floor_rtt_p50_us": f["p50"], "floor_rtt_p99_us": f["p99"],
        "order_check_p50_us": o["p50"], "order_check_p99_us": o["p99"],
        "order_check_over_floor_p50_us": o["p50"] - f["p50"],
        "order_check_throughput_per_s": result["order_check"]["throughput_per_s"],
        "fills_per_s": single.get("fills_per_s"), "fills_batched_per_s": batched.get("fills_per_s"),
        "intake_fills_per_s": single.get("intake_fills_per_s"),
        "intake_fills_batched_per_s": batched.get("intake_fills_per_s"),
        "intake_unblocked_fills_per_s": single.get("intake_unblocked_fills_per_s"),
        "intake_unblocked_fills_batched_per_s": batched.get("intake_unblocked_fills_per_s"),
        "fills_sent": 2 * fills, "legs_applied": single["legs_applied"] + batched["legs_applied"],
        "applied_equals_sent": single["complete"] and batched["complete"],
    })
    result["targets"] = {
        "order_check_p50_within_10us_of_floor": result["order_check_over_floor_p50_us"] <= 10.0,
        "fills_per_s_ge_200k": (result["fills_per_s"] or 0) >= 200_000,
        "fills_batched_per_s_ge_1M": (result["fills_batched_per_s"] or 0) >= 1_000_000,
    }
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        if plot_out is not None:
            plot(result, Path(plot_out) if plot_out else path.with_suffix(".png"))
    _log(quiet, summary(result))
    return result


def summary(r: dict) -> str:
    s, hw = r["settings"], r["hardware"]
    lines = [f"hardware: {hw['cpu']}, {hw['cores']} cores, python {hw['python']}",
             f"settings: {s['transport']}, {s['workers']} worker(s), {s['partitions']} partitions, "
             f"{s['accounts']:,} accounts, journal on",
             f"{'':24}{'p50 us':>10}{'p99 us':>10}{'p99.9 us':>10}{'req/s @' + str(s['inflight']):>14}"]
    for label, key in (("floor (bare zmq echo)", "floor"), ("order check", "order_check")):
        h = r[key]["rtt_us"]
        lines.append(f"{label:24}{h['p50']:10.1f}{h['p99']:10.1f}{h['p999']:10.1f}"
                     f"{r[key]['throughput_per_s']:14,.0f}")
    for label, key in (("fills, 1 per frame", "single"), (f"fills, {s['batch']} per frame", "batched")):
        x = r["fills"][key]
        lines.append(f"{label:24} applied {x.get('fills_per_s') or 0:12,.0f}/s   gateway intake "
                     f"{x.get('intake_fills_per_s') or 0:12,.0f}/s (unblocked "
                     f"{x.get('intake_unblocked_fills_per_s') or 0:,.0f}/s)   legs {x['legs_applied']:,}/{x['legs_expected']:,}")
    lines.append("targets: " + ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in r["targets"].items()))
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    pcts = ["p50", "p90", "p99", "p999"]
    x = np.arange(len(pcts))
    for off, key, label in ((-0.2, "floor", "bare ZeroMQ echo"), (0.2, "order_check", "order check")):
        a1.bar(x + off, [r[key]["rtt_us"][p] for p in pcts], 0.4, label=label)
    a1.set_xticks(x, pcts)
    a1.set_ylabel("round trip, us")
    a1.set_title(f"Round trip, one in flight ({r['settings']['transport']})")
    a1.legend()
    labels = ["1 per frame", f"{r['settings']['batch']} per frame"]
    applied = [r["fills"][k].get("fills_per_s") or 0 for k in ("single", "batched")]
    unblocked = [r["fills"][k].get("intake_unblocked_fills_per_s") or 0 for k in ("single", "batched")]
    intake = [r["fills"][k].get("intake_fills_per_s") or 0 for k in ("single", "batched")]
    x = np.arange(2)
    a2.bar(x - 0.27, unblocked, 0.27, label="gateway intake, rings < half full")
    a2.bar(x, intake, 0.27, label="gateway intake, whole run")
    a2.bar(x + 0.27, applied, 0.27, label="applied by workers (end to end)")
    a2.set_xticks(x, labels)
    a2.set_ylabel("fills / s")
    a2.set_title(f"Fills into shared memory, journal on, {r['settings']['workers']} worker(s)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="margin-engine bench feeds", description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="bench/results/feeds.json")
    ap.add_argument("--plot", default="", help="PNG path (default: next to the JSON)")
    ap.add_argument("--accounts", type=int, default=10_000)
    ap.add_argument("--checks", type=int, default=50_000, help="latency samples per target")
    ap.add_argument("--warmup", type=int, default=5_000)
    ap.add_argument("--throughput-checks", type=int, default=50_000)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--fills", type=int, default=400_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--no-pin", action="store_true",
                    help="leave client and servers to the scheduler (default: the client on the first "
                         "allowed CPU, the server on the second)")
    a = ap.parse_args(argv)
    run(a.json, accounts=a.accounts, checks=a.checks, warmup=a.warmup, throughput_checks=a.throughput_checks,
        inflight=a.inflight, fills=a.fills, batch=a.batch, workers=a.workers, transport=a.transport,
        plot_out=a.plot, seed=a.seed, pin=False if a.no_pin else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
