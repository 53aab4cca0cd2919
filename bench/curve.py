"""What CURVE costs: order-check round trips over TCP with and without ``[security]``.

One run, four closed loops of ``checks`` samples each (one request in flight, sent
only after the last reply: no coordinated omission), all on tcp://127.0.0.1:

1. floor, plain -- a bare ZeroMQ DEALER -> ROUTER echo in its own process (bench.feeds'
   echo server: it unpacks the msgpack body and sends the frame back);
2. floor, CURVE -- the same echo as a CURVE server behind a ZAP allowlist holding the
   client's key (pyzmq's ThreadAuthenticator), the client a CURVE client;
3. engine, plain -- ORDER_CHECK -> ORDER_CHECK_REPLY against a ``LocalEngine``'s
   gateway on a tcp checks endpoint;
4. engine, CURVE -- the same engine configuration with ``[security]`` set (its own key
   pair, the client's public key in the allowlist).

The CURVE cost is reported as the difference of medians and p99s, engine and floor
each against their own plain run in the same process, so the machine's drift between
runs counts less than it would across processes. Client and servers are pinned to the
first two allowed CPUs when there are two. JSON and a PNG under ``bench/results/``::

    python -m bench.curve --json bench/results/curve.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from bench.feeds import (CHECK_POOL, _check_frames, _echo_server, _free_port, _log, _pct_us, echo_until_stop,
                         rtt_closed_loop)
from bench.kernel import hardware
from engine.instruments import Kind
from engine.runtime.curve import Security
from engine.runtime.harness import LocalEngine, local_config
from engine.runtime.provision import provision
from feeds.protocol import MsgType, decode


def _keys(root: str) -> dict[str, str]:
    """Key pairs of the server side and the client; the allowlist holds the client's."""
    keys = os.path.join(root, "keys")
    allow = os.path.join(root, "allowed")
    os.makedirs(allow)
    os.makedirs(keys)
    old = os.umask(0o077)
    try:
        for who in ("server", "client"):
            zmq.auth.create_certificates(keys, who)
    finally:
        os.umask(old)
    os.link(os.path.join(keys, "client.key"), os.path.join(allow, "client.key"))
    return {"dir": keys, "allowed": allow, "secret": os.path.join(keys, "server.key_secret")}


def _curve_echo(endpoint: str, ready, cpu: int, keys: dict) -> None:
    """``_echo_server`` as a CURVE server admitting only the allowlisted client."""
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=keys["allowed"])
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(keys["secret"])
    s.curve_server = True
    s.bind(endpoint)
    ready.send(True)
    echo_until_stop(s)
    s.close()
    auth.stop()
    ctx.term()


def _client(ctx: zmq.Context, endpoint: str, keys: dict | None) -> zmq.Socket:
    c = ctx.socket(zmq.DEALER)
    c.setsockopt(zmq.LINGER, 0)
    c.setsockopt(zmq.RCVTIMEO, 10_000)          # a lost reply fails the run instead of hanging it
    if keys is not None:
        c.curve_publickey, c.curve_secretkey = zmq.auth.load_certificate(os.path.join(keys["dir"], "client.key_secret"))
        c.curve_serverkey, _ = zmq.auth.load_certificate(os.path.join(keys["dir"], "server.key"))
    c.connect(endpoint)
    return c


def run(json_out: str | os.PathLike | None = "bench/results/curve.json", *, accounts: int = 10_000,
        checks: int = 20_000, warmup: int = 2_000, plot_out: str | os.PathLike | None = "", seed: int = 11,
        quiet: bool = False) -> dict:
    allowed = sorted(os.sched_getaffinity(0))
    pin = len(allowed) >= 2
    client_cpu, server_cpu = (allowed[0], allowed[1]) if pin else (-1, -1)
    result: dict = {"hardware": hardware(), "settings": {
        "transport": "tcp", "accounts": accounts, "checks": checks, "warmup": warmup, "seed": seed,
        "pinned": {"client_cpu": client_cpu, "server_cpu": server_cpu} if pin else None}}
    root = tempfile.mkdtemp(prefix="me-bench-curve-")
    zctx = zmq.Context()
    try:
        _measure(result, root, zctx, accounts, checks, warmup, seed, client_cpu, server_cpu, quiet)
    finally:                                    # the keys and the engines' directories, whatever happened
        zctx.destroy(linger=0)
        shutil.rmtree(root, ignore_errors=True)
    _finish(result)
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        if plot_out is not None:
            plot(result, Path(plot_out) if plot_out else path.with_suffix(".png"))
    _log(quiet, summary(result))
    return result


def _measure(result: dict, root: str, zctx: zmq.Context, accounts: int, checks: int, warmup: int, seed: int,
             client_cpu: int, server_cpu: int, quiet: bool) -> None:
    """The four loops into ``result``. A CURVE client against a plain server (or the
    reverse) never completes its handshake: its first request times out (10 s) and the
    run fails, so a finished run used CURVE wherever it says so."""
    own = os.sched_getaffinity(0)
    keys = _keys(root)
    mp_ctx = mp.get_context("spawn")

    def loop(endpoint: str, curve: bool, frames: list[bytes]) -> tuple[dict, list]:
        c = _client(zctx, endpoint, keys if curve else None)
        if client_cpu >= 0:
            os.sched_setaffinity(0, {client_cpu})
        try:
            hist, replies = rtt_closed_loop(c, frames, checks, warmup)
        finally:
            if client_cpu >= 0:
                os.sched_setaffinity(0, own)
            c.close()
        return _pct_us(hist), replies

    base = local_config(root, tcp_ports={"checks": _free_port(), "fills": _free_port()},
                        accounts_capacity=max(20_000, 2 * accounts + 16), partitions=2, gateway_cpu=server_cpu)
    instruments = [{"index": i.index, "price_units": int(round(i.mark_price * i.price_scale))}
                   for i in base.instruments if i.kind in (Kind.PERP, Kind.FUTURE)]
    frames = _check_frames(instruments, accounts, CHECK_POOL, seed)

    # 1-2. floors
    for label, target in (("floor_plain", _echo_server), ("floor_curve", _curve_echo)):
        endpoint = f"tcp://127.0.0.1:{_free_port()}"
        _log(quiet, f"{label}: bare echo, {checks:,} samples")
        parent, child = mp_ctx.Pipe()
        args = (endpoint, child, server_cpu) + ((keys,) if target is _curve_echo else ())
        echo = mp_ctx.Process(target=target, args=args, daemon=True)
        echo.start()
        parent.recv()
        result[label], replies = loop(endpoint, target is _curve_echo, frames)
        assert replies[0] == frames[0]
        stop = _client(zctx, endpoint, keys if target is _curve_echo else None)
        stop.send(b"stop")
        echo.join(5)
        stop.close()
    _engine_loops(result, base, keys, frames, accounts, checks, seed, loop, quiet)


def _engine_loops(result: dict, base, keys: dict, frames: list[bytes], accounts: int, checks: int, seed: int,
                  loop, quiet: bool) -> None:
    """3-4: the engine, the same configuration without and with ``[security]``."""
    secured = Security(keys["secret"], keys["allowed"])
    for label, sec in (("engine_plain", Security()), ("engine_curve", secured)):
        config = dataclasses.replace(base, engine=dataclasses.replace(base.engine, name=f"{base.engine.name}-{label[7]}"),
                                     security=sec)
        _log(quiet, f"{label}: order checks on {config.endpoints.checks}, {checks:,} samples")
        setup = lambda store, c=config: provision(store, c, accounts, seed=seed, max_leverage=5.0)  # noqa: E731
        with LocalEngine(config, setup=setup, n_workers=1):
            result[label], replies = loop(config.endpoints.checks, sec.on, frames)
        assert all(decode(r).type == MsgType.ORDER_CHECK_REPLY for r in replies), replies[:1]


def _finish(result: dict) -> None:
    r = result
    result.update({
        "floor_plain_p50_us": r["floor_plain"]["p50"], "floor_curve_p50_us": r["floor_curve"]["p50"],
        "engine_plain_p50_us": r["engine_plain"]["p50"], "engine_curve_p50_us": r["engine_curve"]["p50"],
        "floor_curve_cost_p50_us": r["floor_curve"]["p50"] - r["floor_plain"]["p50"],
        "floor_curve_cost_p99_us": r["floor_curve"]["p99"] - r["floor_plain"]["p99"],
        "engine_curve_cost_p50_us": r["engine_curve"]["p50"] - r["engine_plain"]["p50"],
        "engine_curve_cost_p99_us": r["engine_curve"]["p99"] - r["engine_plain"]["p99"],
    })


def summary(r: dict) -> str:
    lines = [f"{'round trip, us':28}{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}"]
    for label, key in (("bare echo, plain tcp", "floor_plain"), ("bare echo, CURVE", "floor_curve"),
                       ("order check, plain tcp", "engine_plain"), ("order check, CURVE", "engine_curve")):
        h = r[key]
        lines.append(f"{label:28}{h['p50']:9.1f}{h['p90']:9.1f}{h['p99']:9.1f}{h['p999']:9.1f}")
    lines.append(f"CURVE costs: bare echo {r['floor_curve_cost_p50_us']:+.1f} us p50, "
                 f"{r['floor_curve_cost_p99_us']:+.1f} us p99; order check {r['engine_curve_cost_p50_us']:+.1f} us "
                 f"p50, {r['engine_curve_cost_p99_us']:+.1f} us p99")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    pcts = ["p50", "p90", "p99"]
    x = np.arange(len(pcts))
    for k, (key, label) in enumerate((("floor_plain", "bare echo, plain"), ("floor_curve", "bare echo, CURVE"),
                                      ("engine_plain", "order check, plain"), ("engine_curve", "order check, CURVE"))):
        ax.bar(x + (k - 1.5) * 0.2, [r[key][p] for p in pcts], 0.2, label=label)
    ax.set_xticks(x, pcts)
    ax.set_ylabel("round trip, us")
    ax.set_title("One request in flight over tcp://127.0.0.1, with and without CURVE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="margin-engine bench curve", description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="bench/results/curve.json")
    ap.add_argument("--plot", default="", help="PNG path (default: next to the JSON)")
    ap.add_argument("--accounts", type=int, default=10_000)
    ap.add_argument("--checks", type=int, default=20_000, help="round trips per loop")
    ap.add_argument("--warmup", type=int, default=2_000)
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args(argv)
    run(a.json, accounts=a.accounts, checks=a.checks, warmup=a.warmup, plot_out=a.plot, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
