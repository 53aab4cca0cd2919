"""Helpers shared by the ops tests and their fixtures: the ``margin-engine`` command as a
subprocess, a configuration on private ipc endpoints, waiting for an engine to be up."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from importlib import resources
from pathlib import Path

import pytest

import zmq

from engine.runtime.harness import wait_until
from engine.store.shm import Store
from feeds.protocol import Message, MsgType, Sequencer, decode

REPO = Path(__file__).resolve().parents[2]
USDT = 10**6
BTC = 0
ENDPOINTS = ("oracle", "fills", "checks", "orders", "events")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cli(*args: str) -> list[str]:
    """argv of the installed ``margin-engine`` script (``python -m engine.cli`` without it)."""
    exe = shutil.which("margin-engine", path=os.path.dirname(sys.executable))
    return [exe, *args] if exe else [sys.executable, "-m", "engine.cli", *args]


def shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name.lstrip('/')}")


def assert_group_gone(pgid: int, within_s: float = 3.0) -> None:
    """No process of the command's session is left (multiprocessing's helpers included)."""
    wait_until(lambda: not group_alive(pgid), within_s, f"process group {pgid} to be empty", 0.05)


def write_config(path: Path, name: str, *, engine: dict | None = None, endpoints: dict | None = None,
                 extra: str = "") -> Path:
    """The embedded default's assets and instruments under our own ``[engine]`` table
    (``engine``: key -> raw TOML value, over ours) and ``[endpoints]`` table."""
    default = resources.files("engine").joinpath("default.toml").read_text()
    body = default[default.index("[[assets]]"):]
    table = {"name": json.dumps(name), "accounts_capacity": "1000", "partitions": "2", **(engine or {})}
    text = "[engine]\n" + "".join(f"{k} = {v}\n" for k, v in table.items()) + f"\n{body}\n"
    if endpoints:
        text += "[endpoints]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in endpoints.items())
    path.write_text(text + extra)
    return path


def ipc_endpoints(root: str) -> dict:
    return {**{k: f"ipc://{root}/{k}.sock" for k in ENDPOINTS}, "runtime_dir": f"{root}/run"}


def unique_name() -> str:
    return f"me-ops-{uuid.uuid4().hex[:8]}"


def status(name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli("status", "--name", name, *extra), capture_output=True, text=True,
                          timeout=15, cwd=REPO, stdin=subprocess.DEVNULL)


def wait_up(proc: subprocess.Popen, name: str, log: Path, timeout_s: float = 20.0) -> dict:
    """Poll ``status --json`` until it attaches and every partition's worker has done a pass."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"margin-engine run exited with {proc.returncode}:\n{log.read_text()}")
        r = status(name, "--json")
        if r.returncode == 0:
            s = json.loads(r.stdout)
            if all(p["worker_pid"] and p["heartbeat_age_ms"] < 5_000 for p in s["partitions"]):
                return s
        if time.monotonic() > deadline:
            pytest.fail(f"engine {name} not up after {timeout_s} s; last status: {r.returncode} "
                        f"{r.stderr}\n{log.read_text()}")
        time.sleep(0.2)


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every process in session ``sid`` (read from /proc: fast
    enough to catch a child in the first milliseconds of its life)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            if int(stat[stat.rindex(")") + 2:].split()[3]) != sid:     # field 6: the session
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue                                   # gone meanwhile
    return found


def wait_for_child(proc: subprocess.Popen, needle: str, timeout_s: float = 20.0) -> int:
    """The pid of the first process of ``proc``'s session (``start_new_session``) whose
    command line contains ``needle``, polled every 2 ms."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid, cmd in session_processes(proc.pid).items():
            if needle in cmd and pid != proc.pid:
                return pid
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before a process running {needle!r} appeared")
        time.sleep(0.002)
    pytest.fail(f"no process running {needle!r} after {timeout_s} s")


def demo_segments(stderr: str) -> list[str]:
    """The segments a demo names on stderr ("... into shared memory /me-...")."""
    return [s for m in re.findall(r"shared memory /(me-[0-9a-f]+)", stderr) for s in (m, m + "-ctl")]


def start_demo(spawn, ops_dir: str) -> tuple[subprocess.Popen, Path, list[str]]:
    """The demo on 300 accounts for 20 s in its own session, its stderr in a file, its
    temporary directory under ops_dir. Returns (proc, stderr path, its segments: a list
    the caller fills in from stderr (``demo_segments``), unlinked by the ``spawn``
    teardown whatever happened)."""
    segments: list[str] = []
    err_path = Path(ops_dir) / "demo.err"
    with open(err_path, "w") as err_file:
        proc = spawn(cli("demo", "--duration", "20", "--accounts", "300"), segments=segments,
                     stdout=subprocess.PIPE, stderr=err_file, text=True, cwd=REPO,
                     env={**os.environ, "TMPDIR": ops_dir})
    return proc, err_path, segments


def book(name: str) -> dict:
    """What a restart must bring back, read from the running engine's shared memory:
    every used account row's identity, flags, balances and position slots, and the
    partitions' account counts and fee pools (margin results and seqlock counters are
    recomputed and left out)."""
    st = Store.attach(name, readonly=True)
    try:
        out = {}
        for p in range(st.n_partitions):
            lo, hi = st.partition_rows(p)
            for row in range(lo, hi):
                a, slots = st.read_account(row)
                out[int(a["account_id"])] = (int(a["partition"]), int(a["flags"]), a["balance"].tolist(),
                                             [tuple(s.tolist()) for s in slots])
        parts = st.partitions.copy()
        return {"accounts": out, "n_accounts": parts["n_accounts"].tolist(),
                "fee_pool": parts["fee_pool"].tolist()}
    finally:
        st.detach()


def gateway_pid(name: str) -> int:
    needle = b"engine.runtime.gateway\0--name\0" + name.encode() + b"\0"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    return int(pid)
        except OSError:
            continue
    raise LookupError(f"no gateway process of {name}")


def collateral(sock: zmq.Socket, seq: Sequencer, kind: MsgType, request_id: int, account: int,
               usdt: int, transfer_id: int | None = None) -> dict:
    body = {"request_id": request_id, "account": account, "asset": "USDT", "amount_units": usdt * USDT}
    if transfer_id is not None:
        body["transfer_id"] = transfer_id
    sock.send(seq.encode(kind, body))
    assert sock.poll(5_000), f"no reply to request {request_id} within 5 s"
    m = decode(sock.recv())
    assert type(m) is Message and m.type == MsgType.COLLATERAL_REPLY, m
    return m.fields


def start_run(spawn, cfg: Path, name: str, log: Path, *extra: str) -> subprocess.Popen:
    """``margin-engine run --config cfg`` in its own session (stderr to ``log``), waited
    up; its segments unlinked by the ``spawn`` teardown."""
    with open(log, "wb") as err:
        proc = spawn(cli("run", "--config", str(cfg), *extra), segments=[name, name + "-ctl"],
                     stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    wait_up(proc, name, log)
    return proc


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A client DEALER (linger 0) connected to ``endpoint``."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def durable_engine(spawn, ops_dir: str, *extra: str):
    """``margin-engine run`` on private ipc endpoints with its journal and snapshots in a
    state directory of their own (as under systemd), started and waited up. Returns
    ``(root, name, endpoints, config path, process)``."""
    root = Path(ops_dir)
    name = unique_name()
    ep = ipc_endpoints(ops_dir)
    cfg = write_config(root / "engine.toml", name, endpoints=ep,
                       engine={"state_dir": json.dumps(str(root / "state"))})
    return root, name, ep, cfg, start_run(spawn, cfg, name, root / "run1.err", *extra)


def crash_and_restart(spawn, proc, name: str, ep: dict, cfg: Path, log: Path):
    """Kill the engine's gateway (SIGKILL): the engine stops and exits 1, as systemd's
    ``Restart=on-failure`` expects; remove the runtime directory (systemd does on stop)
    and start the same command again. Returns ``(new process, its stderr so far)``."""
    os.kill(gateway_pid(name), signal.SIGKILL)
    assert proc.wait(timeout=20) == 1
    shutil.rmtree(ep["runtime_dir"])
    proc2 = start_run(spawn, cfg, name, log)
    return proc2, log.read_text()
