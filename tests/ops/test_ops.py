"""Operating the engine: the ``margin-engine`` commands as an operator runs them, CPU
pinning, the workers' wait strategies, and configuration errors.

Every command runs as a real subprocess of the installed console script (in its own
session, so teardown can stop the whole process tree) on private ipc endpoints under a
short ``/tmp/me-ops-*`` directory and a unique shared-memory name; teardown stops what is
still running and unlinks the segments whatever the test did (conftest).

Default config: BTCUSDT is instrument 0 (qty_scale 1000: 1 unit = 0.001 BTC; price_scale
10); USDT is asset 0 (1e6 units per USDT). Marks start at the configured 95,000 until
ticks move them; a mark needs 2 fresh venues.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq

from engine import _shm
from engine.codes import Code
from engine.config import load
from engine.runtime.harness import wait_until
from engine.runtime.provision import HOUSE_ACCOUNT
from engine.runtime.worker import WAITS
from engine.store.shm import Store
from feeds.protocol import Message, MsgType, Sequencer, decode
from ops_support import (BTC, REPO, USDT, assert_group_gone, cli, ipc_endpoints, shm_exists, status,
                         unique_name, wait_up, write_config)

# every test: real processes and sockets; a hang becomes a failure after 30 s
pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


# --------------------------------------------------------------------------- 1. demo
def _run_demo(spawn, ops_dir: str, *args: str):
    """``margin-engine demo ARGS`` to its end: ``(proc, stdout, stderr, its segments)``
    (the segments, named on stderr, are unlinked by the teardown whatever happened)."""
    segments: list[str] = []                 # filled in once the demo names its segment
    err_path = Path(ops_dir) / "demo.err"
    with open(err_path, "w") as err_file:
        proc = spawn(cli("demo", *args), segments=segments,
                     stdout=subprocess.PIPE, stderr=err_file, text=True, cwd=REPO,
                     env={**os.environ, "TMPDIR": ops_dir})      # its mkdtemp lands in ops_dir
    try:
        out, _ = proc.communicate(timeout=25)
    finally:                                  # also on a timeout: teardown unlinks these
        err = err_path.read_text()
        m = re.search(r"shared memory /(me-[0-9a-f]+)", err)
        if m:
            segments += [m.group(1), m.group(1) + "-ctl"]
    assert m, err
    return proc, out, err, segments


def test_demo_runs_to_completion_with_liquidations_and_leaves_nothing_behind(ops_dir, spawn):
    """6 s, 800 accounts, the default 12 % crash at 1.8 s: the crash breaches the most
    leveraged accounts (up to 25x) well before the end, so there are liquidations."""
    proc, out, err, segments = _run_demo(spawn, ops_dir, "--duration", "6", "--accounts", "800")
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    progress = [ln for ln in lines if ln.startswith("t=")]
    assert "\x1b[" not in out                                  # not a TTY: no screen redraws
    assert len(progress) >= 6, out                             # one line per 0.5 s of 6 s
    # the screen stops at the run's end: it showed one more second ("t=  7.0s of 6s",
    # mark updates 0/s) after the simulated exchange had stopped
    shown = [float(re.match(r"t=\s*([\d.]+)s of 6s", ln).group(1)) for ln in progress]
    assert max(shown) <= 6.0, progress[-1]
    assert "engine up: 1 worker, " in err, err                # not "1 workers"
    final = lines[-1]
    assert final.startswith("demo done:"), out
    n_liq = int(re.match(r"demo done: (\d+) liquidation orders for (\d+) accounts", final).group(1))
    assert n_liq > 0, final
    assert final.endswith("engine processes exited [0]"), final

    for seg in segments:
        assert not shm_exists(seg), f"/dev/shm/{seg} left behind"
    assert not [d for d in os.listdir(ops_dir) if d.startswith("me-demo-")], "demo's temp dir left behind"
    assert_group_gone(proc.pid)


def test_demo_takes_its_workers_crash_and_seed(spawn, ops_dir):
    """`--workers 2 --crash 25 --seed 3`: two workers start (the demo's copy of the
    configuration gets 2 partitions), the crash it announces is 25 %, and the run ends
    cleanly with liquidations (a 25 % fall of BTC and ETH breaches accounts of up to
    25x leverage), every engine process exiting 0. The simulated book cancels the orders
    of accounts below bankruptcy (their limit is beyond the market), so the demo's
    insurance fund takes some over (session 19)."""
    proc, out, err, segments = _run_demo(spawn, ops_dir, "--duration", "5", "--accounts", "400",
                                         "--workers", "2", "--crash", "25", "--seed", "3")
    assert proc.returncode == 0, err
    assert "engine up: 2 workers" in err and "crash 25% at" in err, err
    final = [ln for ln in out.splitlines() if ln.strip()][-1]
    assert int(re.match(r"demo done: (\d+) liquidation orders", final).group(1)) > 0, final
    assert int(re.search(r"takeovers \{'insurance fund': (\d+)", final).group(1)) > 0, final
    assert final.endswith("engine processes exited [0]"), final   # the set of exit codes: all 0
    for seg in segments:
        assert not shm_exists(seg), f"/dev/shm/{seg} left behind"


# --------------------------------------------------------------------------- 2. run + status
def test_run_serves_status_and_exits_zero_on_sigterm_releasing_shm(spawn, ops_dir):
    root = Path(ops_dir)
    name = unique_name()
    cfg = write_config(root / "engine.toml", name, endpoints=ipc_endpoints(ops_dir))
    log = root / "run.err"
    with open(log, "wb") as err:
        proc = spawn(cli("run", "--config", str(cfg), "--demo-accounts", "300"),
                     segments=[name, name + "-ctl"], stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)

    s = wait_up(proc, name, log)
    assert s["engine"] == "/" + name
    assert s["accounts"] == 301                                # 300 demo accounts + the house
    assert sum(p["accounts"] for p in s["partitions"]) == 301
    assert [p["instrument"] for p in s["prices"]] == [i.name for i in load(cfg).instruments]
    assert all(p["mark"] > 0 for p in s["prices"])
    for p in s["partitions"]:
        assert p["worker_pid"] > 0 and 0 <= p["heartbeat_age_ms"] < 5_000, p
    store = Store.attach(name, readonly=True)
    try:
        store.row_of(HOUSE_ACCOUNT)                             # KeyError if missing
    finally:
        store.detach()
    text = status(name)
    assert text.returncode == 0 and text.stdout.startswith(f"engine /{name}: 301 accounts"), text

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, log.read_text()
    assert not shm_exists(name) and not shm_exists(name + "-ctl")
    assert_group_gone(proc.pid)
    err_text = log.read_text()
    assert f"margin-engine {name}: running with" in err_text
    assert "Traceback" not in err_text, err_text


@pytest.mark.parametrize("name", ["does-not-exist", "a/b"], ids=["unknown", "not-a-segment-name"])
def test_status_of_no_such_engine_exits_2_with_one_line(name):
    r = status(name)
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith("margin-engine status: ") and name in line, line


def test_run_with_more_accounts_than_capacity_exits_2_and_releases_shm(spawn, ops_dir):
    """Capacity 100 over 2 partitions (50 each) cannot hold 300 demo accounts."""
    name = unique_name()
    cfg = write_config(Path(ops_dir) / "small.toml", name, engine={"accounts_capacity": "100"},
                       endpoints=ipc_endpoints(ops_dir))
    proc = spawn(cli("run", "--config", str(cfg), "--demo-accounts", "300"), segments=[name, name + "-ctl"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    assert "capacity" in err, err
    assert not shm_exists(name) and not shm_exists(name + "-ctl")


# --------------------------------------------------------------------------- 3. CPU pinning
two_cpus = pytest.mark.skipif((os.cpu_count() or 1) < 2 or not {0, 1} <= os.sched_getaffinity(0),
                              reason="needs CPUs 0 and 1")


@two_cpus
@pytest.mark.parametrize("cpus, n_workers, expected", [
    ((1,), 1, [{1}]),
    ((1, 0), 2, [{1}, {0}]),                                  # worker w -> cpus[w % len(cpus)]
], ids=["one-worker-on-cpu1", "two-workers-on-cpus-1-0"])
def test_workers_are_pinned_and_a_restarted_worker_keeps_its_cpu(local_engine, cpus, n_workers, expected):
    le = local_engine(n_workers=n_workers, cpus=cpus)
    eng, st = le.engine, le.store
    for w, want in enumerate(expected):
        assert os.sched_getaffinity(eng.worker_pid(w)) == want, f"worker{w}"

    old_pid = eng.worker_pid(0)
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: eng.watch_once() == ["worker0"], what="the supervisor restarting worker0")
    new_pid = eng.worker_pid(0)
    assert new_pid != old_pid
    parts = [p for p in range(st.n_partitions) if eng.owner[p] == 0]
    # the worker pins itself first thing, then takes its partitions: its pid in them means pinned
    wait_until(lambda: all(int(st.partitions[p]["worker_pid"]) == new_pid for p in parts),
               what="the new worker taking its partitions")
    assert os.sched_getaffinity(new_pid) == expected[0]
    for w in range(1, n_workers):                              # the others were left alone
        assert os.sched_getaffinity(eng.worker_pid(w)) == expected[w]


@two_cpus
def test_singleton_processes_are_pinned_where_configured(local_engine):
    # engine.gateway_cpu / markprice_cpu / liqgw_cpu: each process pins itself at start;
    # -1 (the default, here the mark-price process) leaves it where the scheduler likes.
    le = local_engine(gateway_cpu=1, liqgw_cpu=0, price_stage="process")
    eng = le.engine
    assert os.sched_getaffinity(eng.pid_of("gateway")) == {1}
    assert os.sched_getaffinity(eng.pid_of("liqgw")) == {0}
    assert os.sched_getaffinity(eng.pid_of("markprice")) == os.sched_getaffinity(0)


# --------------------------------------------------------------------------- 4. wait strategies
@pytest.fixture
def doorbell():
    """A doorbell (counter, waiters) in private memory; futex works there too."""
    return np.zeros(2, np.uint32)


@pytest.mark.parametrize("strategy", sorted(WAITS))
def test_doorbell_ring_wakes_a_waiter(doorbell, strategy):
    addr, seen = doorbell.ctypes.data, int(doorbell[0])
    got: dict = {}

    def waiter():
        got["value"] = _shm.doorbell_wait(addr, seen, 2_000_000_000, WAITS[strategy])
        got["at"] = time.monotonic()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    if strategy == "blocking":
        wait_until(lambda: int(doorbell[1]) == 1, 1.0, "the waiter to block in futex_wait")
    else:
        time.sleep(0.05)
    assert "value" not in got, "returned before the ring"
    rung = time.monotonic()
    _shm.doorbell_ring(addr)
    t.join(2.5)
    assert not t.is_alive()
    assert got["value"] == seen + 1
    assert got["at"] - rung < 0.25, f"woke {got['at'] - rung:.3f} s after the ring"
    assert int(doorbell[1]) == 0                               # no waiter left registered


@pytest.mark.parametrize("strategy", sorted(WAITS))
def test_doorbell_wait_returns_after_its_timeout_when_nobody_rings(doorbell, strategy):
    addr, seen = doorbell.ctypes.data, int(doorbell[0])
    timeout_s = 0.3                                            # busy-spin burns a core meanwhile
    t0 = time.monotonic()
    value = _shm.doorbell_wait(addr, seen, int(timeout_s * 1e9), WAITS[strategy])
    took = time.monotonic() - t0
    assert value == seen
    assert timeout_s <= took <= timeout_s + 0.5, f"{strategy}: returned after {took:.3f} s"


# After a tick's orders are handed to ZeroMQ a blocking worker pauses its heavy work
# (engine.runtime.worker.ORDERS_OUT_QUIET_NS) -- but a new tick or a ring must end the
# pause at once, and the pause must take nothing off the socket or the doorbell.
def test_doorbell_pause_ends_at_a_ring_and_consumes_nothing(doorbell):
    from engine.runtime.worker import DoorbellWake
    addr = doorbell.ctypes.data
    wake = DoorbellWake(addr, _shm.WAIT_BLOCKING)
    t0 = time.monotonic()
    wake.pause(50_000_000)                                     # nobody rings: the whole 50 ms
    assert 0.05 <= time.monotonic() - t0 < 0.5
    assert not wake.more()
    threading.Timer(0.05, _shm.doorbell_ring, args=(addr,)).start()
    t0 = time.monotonic()
    wake.pause(2_000_000_000)                                  # rung after 50 ms: not 2 s
    assert time.monotonic() - t0 < 0.5
    assert wake.more(), "the ring is still there for the loop to see"


def _pull_push(ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    """A PULL bound on a fresh ipc endpoint (receives time out after 2 s) and a PUSH to it.
    The endpoint is in Linux's abstract namespace: no socket file is left in /tmp."""
    endpoint = f"ipc://@me-test-pause-{uuid.uuid4().hex[:8]}"
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVTIMEO, 2000)
    pull.bind(endpoint)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    return pull, push


def test_markprice_pause_ends_when_a_tick_arrives_and_leaves_it_queued():
    """The mark-price process's wait before its reference catch-up
    (markprice.QUIET_AFTER_TICKS_NS): sub-millisecond, ended by a tick, taking nothing."""
    from types import SimpleNamespace
    from engine.runtime.markprice import MarkPriceProcess
    ctx = zmq.Context()
    pull, push = _pull_push(ctx)
    mp = SimpleNamespace(sock=pull)               # the one field pause reads; the socket is real
    try:
        t0 = time.monotonic()
        assert MarkPriceProcess.pause(mp, 300_000) is False     # no tick: 0.3 ms, not a whole ms
        assert 0.0003 <= time.monotonic() - t0 < 0.05
        threading.Timer(0.05, push.send, args=(b"tick",)).start()
        t0 = time.monotonic()
        assert MarkPriceProcess.pause(mp, 2_000_000_000) is True   # a tick after 50 ms: not 2 s
        assert time.monotonic() - t0 < 0.5
        assert pull.recv() == b"tick"                            # still queued for the fold
    finally:
        push.close()
        pull.close()
        ctx.term()


def test_tick_pause_ends_when_a_tick_arrives_and_leaves_it_queued(doorbell):
    from types import SimpleNamespace
    from engine.runtime.worker import TickWake
    ctx = zmq.Context()
    pull, push = _pull_push(ctx)
    # the worker's fields TickWake reads; the socket and the doorbell are real
    worker = SimpleNamespace(prices=SimpleNamespace(sock=pull, timer_ns=10**9), wait=_shm.WAIT_BLOCKING,
                             doorbell=doorbell.ctypes.data, zctx=ctx, worker_id=0)
    wake = TickWake(worker)
    try:
        t0 = time.monotonic()
        wake.pause(50_000_000)                                 # no tick: the whole 50 ms
        assert 0.05 <= time.monotonic() - t0 < 0.5
        threading.Timer(0.05, push.send, args=(b"tick",)).start()
        t0 = time.monotonic()
        wake.pause(2_000_000_000)                              # a tick after 50 ms: not 2 s
        assert time.monotonic() - t0 < 0.5
        assert wake.more()
        assert pull.recv() == b"tick"                          # still queued for the fold
        threading.Timer(0.05, _shm.doorbell_ring, args=(doorbell.ctypes.data,)).start()
        t0 = time.monotonic()
        wake.pause(2_000_000_000)                              # a fill's ring ends it too
        assert time.monotonic() - t0 < 0.5
    finally:
        wake.stop.set()
        _shm.doorbell_ring(doorbell.ctypes.data)
        wake.thread.join(2)
        wake.poke_in.close()
        pull.close()
        push.close()
        ctx.term()


def test_short_slices_set_every_thread_of_the_process():
    # Linux >= 6.12 keeps a normal thread's slice in sched_attr.sched_runtime; older
    # kernels accept and drop it (nothing to check there).
    import ctypes
    import platform
    import struct
    from engine.runtime import process
    nums = process._SCHED_ATTR_SYSCALLS.get(platform.machine())
    if nums is None:
        pytest.skip(f"no sched_setattr syscall number for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)

    def slice_ns(tid: int) -> int:
        buf = ctypes.create_string_buffer(56)
        assert libc.syscall(nums[1], tid, buf, 56, 0) == 0
        return struct.unpack_from("IIQiIQ", buf.raw)[5]

    default = slice_ns(0)
    if default == 0:
        pytest.skip(f"kernel {platform.release()} keeps no per-thread slice (Linux < 6.12)")
    t = threading.Thread(target=time.sleep, args=(1.0,), daemon=True)
    t.start()
    try:
        assert process.short_slices(250_000) >= 2               # this thread and t at least
        assert slice_ns(0) == 250_000
        assert slice_ns(t.native_id) == 250_000
    finally:
        process.short_slices(default)                          # the test process as it was


EVE = 11           # 5,000 USDT, long 1 BTC entered at 95,000


def eve_long_1btc_5k_usdt(store) -> None:
    row = store.add_account(EVE)
    store.set_balance(row, 0, 5_000 * USDT)
    store.set_position(row, BTC, 1000, 95_000 * USDT)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_fills_max_wait_reaches_every_worker(local_engine):
    """engine.fills_max_wait_us (how long a fill may wait behind newer ticks) is each
    worker's --fills-max-wait-us: 250 configured, 250 on both workers' command lines."""
    le = local_engine(n_workers=2, fills_max_wait_us=250)
    for w in range(2):
        with open(f"/proc/{le.engine.worker_pid(w)}/cmdline", "rb") as f:
            assert b"--fills-max-wait-us\x00250\x00" in f.read(), w


def test_yielding_engine_liquidates_a_breaching_tick(local_engine, zctx):
    le = local_engine(eve_long_1btc_5k_usdt, n_workers=1, wait="yielding")
    with open(f"/proc/{le.engine.worker_pid(0)}/cmdline", "rb") as f:
        assert b"--wait\0yielding\0" in f.read()
    ep, st = le.endpoints, le.store
    oracle = zctx.socket(zmq.PUSH)
    orders = zctx.socket(zmq.PULL)
    for s, e in ((oracle, ep.oracle), (orders, ep.orders)):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(e)
    seq = Sequencer()

    def tick(price: float) -> None:
        for v in ("a", "b", "c"):
            oracle.send(seq.encode(MsgType.ORACLE_TICK, {"venue": v, "instrument": "BTCUSDT",
                                                          "price": price, "venue_ts_ns": time.time_ns()}))

    # Liquidatable when E < MM; in tier 1 (notional 50k..250k: mmr 0.5 %, maint 50):
    #   5,000 + (p - 95,000) < 0.005 p - 50  <=>  p < 89,950 / 0.995 = 90,402.01
    for p in (93_000.0, 91_500.0):                             # steps < 5 %: no venue excluded
        tick(p)
        wait_until(lambda: float(st.read(st.prices, BTC)["mark"]) == p, what=f"BTCUSDT mark {p}")
    assert not orders.poll(200), "an order above the liquidation price"
    tick(90_300.0)
    assert orders.poll(5_000), "no liquidation order within 5 s of the breaching tick"
    m = decode(orders.recv())
    assert type(m) is Message and m.type == MsgType.LIQUIDATION_ORDER, m
    o = m.fields
    # At 90,300: E = 5,000 - 4,700 = 300; keep n with 300/1.25 >= 0.005 n - 50 -> n <= 58,000
    # notional: keep 58,000/90,300 = 0.6423 BTC, sell ceil(357.7) = 358 units
    assert (o["account"], o["instrument_id"], o["qty_units"], o["reason"]) == \
        (EVE, BTC, -358, Code.LIQ_BELOW_MAINTENANCE)


# --------------------------------------------------------------------------- 5. config errors
@pytest.mark.parametrize("engine, extra, field", [
    ({"wait": '"sleepy"'}, "", "engine.wait"),
    ({"partitions": "0"}, "", "engine.partitions"),
    ({"cpus": "[-1]"}, "", "engine.cpus"),
    ({}, '[endpoints]\nfills = "nowhere"\n', "endpoints.fills"),
    ({}, '[endpoints]\nbogus = "tcp://127.0.0.1:1"\n', "endpoints.bogus"),
    ({}, "[surprise]\nx = 1\n", "surprise"),
], ids=["wait", "partitions", "cpus", "endpoint-not-zmq", "unknown-endpoint", "unknown-section"])
def test_run_with_an_invalid_config_exits_2_naming_the_field(spawn, ops_dir, engine, extra, field):
    name = unique_name()
    cfg = write_config(Path(ops_dir) / "bad.toml", name, engine=engine, extra=extra)
    proc = spawn(cli("run", "--config", str(cfg)), segments=[name, name + "-ctl"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    [line] = err.splitlines()
    assert line.startswith(f"margin-engine: {cfg}: ") and field in line, line
    assert out == ""
    assert not shm_exists(name)


@pytest.mark.parametrize("content, words", [
    (None, "cannot read"),
    ("[engine\nname = 1\n", "not valid TOML"),
], ids=["missing-file", "not-toml"])
def test_run_with_an_unreadable_config_exits_2(spawn, ops_dir, content, words):
    path = Path(ops_dir) / "bad.toml"
    if content is not None:
        path.write_text(content)
    proc = spawn(cli("run", "--config", str(path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True, cwd=REPO)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and words in err, err


# --------------------------------------------------------------------------- systemd notify
def test_run_speaks_systemds_notify_protocol(spawn, ops_dir):
    """The unit is Type=notify with WatchdogSec=5s: `run` must say READY=1 once every
    process is up, feed the watchdog well inside 5 s while it runs (the supervision loop
    sends WATCHDOG=1 each 0.1 s step: at least 10 in 2 s, none more than 1 s apart), and
    say STOPPING=1 on SIGTERM before it exits 0. A datagram socket bound here stands in
    for systemd's NOTIFY_SOCKET (what sd_notify(3) writes to)."""
    import socket

    root = Path(ops_dir)
    name = unique_name()
    cfg = write_config(root / "engine.toml", name, endpoints=ipc_endpoints(ops_dir))
    sock_path = str(root / "notify.sock")
    sd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sd.bind(sock_path)
    sd.settimeout(30)
    try:
        proc = spawn(cli("run", "--config", str(cfg), "--accounts", "10"), segments=[name, name + "-ctl"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                     env={**os.environ, "NOTIFY_SOCKET": sock_path})
        assert sd.recv(64) == b"READY=1"                     # nothing before it: the watchdog starts here
        pings, t_end = [], time.monotonic() + 2.0
        while time.monotonic() < t_end:
            msg = sd.recv(64)
            assert msg == b"WATCHDOG=1", msg
            pings.append(time.monotonic())
        assert len(pings) >= 10 and max(np.diff(pings)) < 1.0, pings
        proc.send_signal(signal.SIGTERM)
        while (msg := sd.recv(64)) == b"WATCHDOG=1":
            pass
        assert msg == b"STOPPING=1"
        assert proc.wait(timeout=20) == 0
    finally:
        sd.close()


def test_run_workers_splits_the_partitions_between_that_many_processes(spawn, ops_dir):
    """`run --workers 2` on 4 partitions: partition p goes to worker p mod 2, so
    partitions 0 and 2 share one worker process and 1 and 3 the other (two distinct
    pids, as `status` shows them). The default would be one worker: `engine.cpus` is
    empty here, min(4 partitions, 1)."""
    root = Path(ops_dir)
    name = unique_name()
    cfg = write_config(root / "engine.toml", name, endpoints=ipc_endpoints(ops_dir), engine={"partitions": "4"})
    log = root / "run.err"
    with open(log, "wb") as err:
        proc = spawn(cli("run", "--config", str(cfg), "--workers", "2", "--accounts", "8"),
                     segments=[name, name + "-ctl"], stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    s = wait_up(proc, name, log)
    pids = [p["worker_pid"] for p in s["partitions"]]
    assert pids[0] == pids[2] and pids[1] == pids[3] and pids[0] != pids[1], pids
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log.read_text()
