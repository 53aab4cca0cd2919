"""CURVE on the engine's TCP endpoints: only clients in the allowlist get in
(engine/runtime/curve.py; design.md: "TCP endpoints are authenticated with CURVE keys").

``margin-engine run`` with every external endpoint on tcp://127.0.0.1 and ``[security]``
set, key pairs made with ``margin-engine keys``: real processes, real sockets. The
allowed client's deposit is answered and its fill's reject is published to its events
subscription; a client with a key not in the allowlist, and one without CURVE, get
nothing through, and their deposits never reach the book.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from engine.codes import Code
from engine.config import ConfigError, load
from engine.runtime import curve
from engine.store.shm import Store
from feeds.protocol import Message, MsgType, Sequencer, decode, encode_batch
from ops_support import BTC, REPO, USDT, cli, unique_name, wait_up, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

NOT_IN_S = 1.5          # how long a refused client waits for an answer that must not come


def free_tcp_endpoints(n: int) -> list[str]:
    """``n`` loopback ports free now (bound to port 0 together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()


def make_keys(root: Path) -> dict[str, Path]:
    """Key pairs for the engine, the matching engine (allowed everywhere), a watcher
    (allowed on the events endpoint only: its key in ``allowed/events/``) and mallory (not
    allowed), made by the real command."""
    keys = root / "keys"
    keys.mkdir()
    for who in ("engine", "matching", "mallory", "watcher"):
        r = subprocess.run(cli("keys", str(keys), who), capture_output=True, text=True, timeout=30, cwd=REPO)
        assert r.returncode == 0, r.stderr
    assert os.stat(keys / "engine.key_secret").st_mode & 0o777 == 0o600
    allow = root / "allowed"
    allow.mkdir()
    shutil.copy(keys / "matching.key", allow / "matching.key")       # every endpoint
    (allow / "events").mkdir()
    shutil.copy(keys / "watcher.key", allow / "events" / "watcher.key")     # the events endpoint only
    return {"dir": keys, "allowed": allow}


def client(ctx: zmq.Context, kind: int, endpoint: str, keys: Path, who: str | None) -> zmq.Socket:
    """A socket connected to the engine: a CURVE client with ``who``'s key pair (the
    engine's public key as the server's), or a plain one (``who`` None)."""
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    # A refused handshake ends the connection's pipe; a DEALER or PUSH left with no pipe
    # blocks in send (CI hung 90 s here on the plain client, created before mallory's
    # wait). A send gives up after 2 s instead: ``deposit`` counts that as no answer.
    s.setsockopt(zmq.SNDTIMEO, 2_000)
    if who is not None:
        s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(keys / f"{who}.key_secret")
        s.curve_serverkey, _ = zmq.auth.load_certificate(keys / "engine.key")
    if kind == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    return s


def deposit(sock: zmq.Socket, request_id: int, account: int, usdt: int, wait_s: float) -> dict | None:
    """A DEPOSIT; its COLLATERAL_REPLY's fields, or None when none came within ``wait_s``
    (or the socket, refused by the server, could not even queue the request)."""
    try:
        sock.send(Sequencer().encode(MsgType.DEPOSIT, {"request_id": request_id, "account": account,
                                                       "asset": "USDT", "amount_units": usdt * USDT}))
    except zmq.Again:
        return None
    if not sock.poll(int(wait_s * 1000)):
        return None
    m = decode(sock.recv())
    assert type(m) is Message and m.type == MsgType.COLLATERAL_REPLY, m
    return m.fields


def first_event(sock: zmq.Socket, wait_s: float) -> dict | None:
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            return None
        m = decode(sock.recv())
        if type(m) is Message and m.type == MsgType.ENGINE_EVENT and m.fields["code"] == Code.FILL_UNKNOWN_ACCOUNT:
            return m.fields
    return None


def usdt_balance(name: str, account: int) -> int:
    st = Store.attach(name, readonly=True)
    try:
        a, _ = st.read_account(st.row_of(account))
        return int(a["balance"][0])
    finally:
        st.detach()


def test_only_allowlisted_curve_clients_reach_the_tcp_endpoints(spawn, ops_dir):
    root = Path(ops_dir)
    k = make_keys(root)
    name = unique_name()
    oracle, fills, checks, orders, events = free_tcp_endpoints(5)
    cfg = write_config(root / "engine.toml", name, endpoints={
        "oracle": oracle, "fills": fills, "checks": checks, "orders": orders, "events": events,
        "runtime_dir": str(root / "run")},
        extra=f'\n[security]\ncurve_secret_key = "{k["dir"] / "engine.key_secret"}"\n'
              f'curve_allowed_keys = "{k["allowed"]}"\n')
    log = root / "run.err"
    with open(log, "wb") as err:
        proc = spawn(cli("run", "--config", str(cfg), "--accounts", "10"), segments=[name, name + "-ctl"],
                     stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    wait_up(proc, name, log)

    ctx = zmq.Context()
    try:
        # The allowed client: its deposit is applied and answered (10 USDT to account 1) ...
        ok = client(ctx, zmq.DEALER, checks, k["dir"], "matching")
        assert deposit(ok, 1, 1, 10, 10.0) == {"request_id": 1, "code": 0, "balance_units": 10 * USDT}
        # ... and a fill naming an unknown account (99) sent on its fills PUSH comes back as
        # a 3003 event on its events SUB (the SUB joined first: PUB sends only to those there).
        sub = client(ctx, zmq.SUB, events, k["dir"], "matching")
        time.sleep(0.5)
        push = client(ctx, zmq.PUSH, fills, k["dir"], "matching")
        fill = {"trade_id": 1, "instrument_id": BTC, "maker_account": 99, "taker_account": 1, "qty_units": 10,
                "price_units": 950_000, "maker_fee_units": 0, "taker_fee_units": 0, "taker_side": "buy"}
        push.send(encode_batch(MsgType.FILL, [fill], first_seq=1, ts_ns=time.time_ns()))
        ev = first_event(sub, 10.0)
        assert ev is not None and ev.get("account") is None and "fill 1 rejected" in ev["detail"], ev

        # Mallory (CURVE, key not allowed) and a plain client: no answer, nothing applied;
        # mallory's events SUB hears nothing of a second rejected fill the allowed client sends.
        mallory = client(ctx, zmq.DEALER, checks, k["dir"], "mallory")
        plain = client(ctx, zmq.DEALER, checks, k["dir"], None)
        msub = client(ctx, zmq.SUB, events, k["dir"], "mallory")
        assert deposit(mallory, 2, 1, 1_000, NOT_IN_S) is None
        assert deposit(plain, 3, 1, 1_000, NOT_IN_S) is None
        push.send(encode_batch(MsgType.FILL, [{**fill, "trade_id": 2}], first_seq=2, ts_ns=time.time_ns()))
        assert first_event(sub, 10.0) is not None                  # the allowed subscriber's
        assert first_event(msub, NOT_IN_S) is None
        # The watcher, allowed on events only: it hears the next rejected fill, and its
        # deposit on the checks endpoint gets nothing (its key is not allowed there).
        wsub = client(ctx, zmq.SUB, events, k["dir"], "watcher")
        time.sleep(0.5)
        push.send(encode_batch(MsgType.FILL, [{**fill, "trade_id": 3}], first_seq=3, ts_ns=time.time_ns()))
        assert first_event(wsub, 10.0) is not None
        wdealer = client(ctx, zmq.DEALER, checks, k["dir"], "watcher")
        assert deposit(wdealer, 5, 1, 1_000, NOT_IN_S) is None
        # Only the allowed client's 10 USDT is in the book (the others' 1,000 each are not);
        # and the engine still serves it.
        assert usdt_balance(name, 1) == 10 * USDT
        assert deposit(ok, 4, 1, 5, 10.0) == {"request_id": 4, "code": 0, "balance_units": 15 * USDT}
        assert usdt_balance(name, 1) == 15 * USDT                       # not the watcher's 1,000
    finally:
        ctx.destroy(linger=0)

    # The refusal is in the gateway's log once, naming mallory's public key.
    mallory_key = zmq.auth.load_certificate(k["dir"] / "mallory.key")[0].decode()
    gw_log = (root / "run" / "gateway.log").read_text()
    assert gw_log.count(f"refused a client whose public key {mallory_key}") == 1, gw_log[-2000:]
    proc.terminate()
    assert proc.wait(timeout=20) == 0


@pytest.fixture
def keys(tmp_path):
    k = make_keys(tmp_path)
    return k["dir"], k["allowed"]


def _security(tmp_path: Path, body: str, endpoints: str = "") -> str:
    p = write_config(tmp_path / "c.toml", "me-curve-cfg", extra=endpoints + "\n[security]\n" + body)
    with pytest.raises(ConfigError) as e:
        load(p)
    return str(e.value)


def test_security_settings_that_cannot_work_are_refused_by_name(keys, tmp_path):
    d, allow = keys
    secret, public = d / "engine.key_secret", d / "engine.key"
    assert "curve_secret_key and curve_allowed_keys go together" in _security(
        tmp_path, f'curve_secret_key = "{secret}"\n')
    assert "holds no secret key" in _security(
        tmp_path, f'curve_secret_key = "{public}"\ncurve_allowed_keys = "{allow}"\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no *.key file" in _security(tmp_path, f'curve_secret_key = "{secret}"\ncurve_allowed_keys = "{empty}"\n')
    assert "not a ZeroMQ certificate" in _security(
        tmp_path, f'curve_secret_key = "{tmp_path / "c.toml"}"\ncurve_allowed_keys = "{allow}"\n')
    assert "security.colour: unknown setting" in _security(tmp_path, 'colour = "blue"\n')
    assert "required when the workers send orders straight to a tcp:// endpoint" in _security(
        tmp_path, f'curve_secret_key = "{secret}"\ncurve_allowed_keys = "{allow}"\n',
        '[endpoints]\norders = "tcp://127.0.0.1:5704"\norders_via_gateway = false\n')
    assert "no such file" in _security(
        tmp_path, f'curve_secret_key = "{tmp_path / "nope.key_secret"}"\ncurve_allowed_keys = "{allow}"\n')
    # a secret file whose public line is another key's (a copy edited by hand, say)
    other = zmq.auth.load_certificate(d / "mallory.key")[0].decode()
    mixed = tmp_path / "mixed.key_secret"
    mixed.write_text(secret.read_text().replace(zmq.auth.load_certificate(public)[0].decode(), other))
    mixed.chmod(0o600)
    assert "its public key is not the secret key's" in _security(
        tmp_path, f'curve_secret_key = "{mixed}"\ncurve_allowed_keys = "{allow}"\n')
    bad = tmp_path / "bad"                        # an allowlist key that is not 40 z85 characters
    bad.mkdir()
    (bad / "x.key").write_text('metadata\ncurve\n    public-key = "xyz"\n')
    odd = tmp_path / "odd"                        # a subdirectory that names no endpoint
    (odd / "fils").mkdir(parents=True)
    shutil.copy(d / "matching.key", odd / "matching.key")
    assert "a subdirectory must be named for an endpoint" in _security(
        tmp_path, f'curve_secret_key = "{secret}"\ncurve_allowed_keys = "{odd}"\n')
    assert "not a CURVE key (40 z85 characters)" in _security(
        tmp_path, f'curve_secret_key = "{secret}"\ncurve_allowed_keys = "{bad}"\n')
    os.chmod(secret, 0o640)
    assert "is open to others (mode 640); chmod 600 it" in _security(
        tmp_path, f'curve_secret_key = "{secret}"\ncurve_allowed_keys = "{allow}"\n')
    # and `run` exits 2 naming it, before anything starts
    r = subprocess.run(cli("run", "--config", str(tmp_path / "c.toml")), capture_output=True, text=True,
                       timeout=30, cwd=REPO)
    assert r.returncode == 2 and "chmod 600 it" in r.stderr, r.stderr


def test_a_worker_sending_orders_straight_to_the_matching_engine_is_its_curve_client(keys, tmp_path):
    """``curve.connect`` (the workers' orders PUSH with ``orders_via_gateway = false``):
    with the engine's key pair and the matching engine's public key, its message reaches
    a matching engine's CURVE PULL that admits only the engine's key (its own ZAP handler)."""
    from zmq.auth.thread import ThreadAuthenticator

    d, _ = keys
    shutil.copy(d / "engine.key", tmp_path / "allowed-engine.key")
    only_engine = tmp_path / "only-engine"
    only_engine.mkdir()
    shutil.move(tmp_path / "allowed-engine.key", only_engine / "engine.key")
    (endpoint,) = free_tcp_endpoints(1)
    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        auth.configure_curve(domain="*", location=str(only_engine))
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.curve_publickey, pull.curve_secretkey = zmq.auth.load_certificate(d / "matching.key_secret")
        pull.curve_server = True
        pull.bind(endpoint)
        public, secret = zmq.auth.load_certificate(d / "engine.key_secret")
        curve.use(curve.Keys(public, secret, frozenset(), zmq.auth.load_certificate(d / "matching.key")[0]))
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        curve.connect(push, endpoint)
        push.send(b"order")
        assert pull.poll(10_000) and pull.recv() == b"order"
        # mallory's key pair, same server key: refused by the matching engine's allowlist
        bad = ctx.socket(zmq.PUSH)
        bad.setsockopt(zmq.LINGER, 0)
        bad.setsockopt(zmq.SNDTIMEO, 2_000)
        bad.curve_publickey, bad.curve_secretkey = zmq.auth.load_certificate(d / "mallory.key_secret")
        bad.curve_serverkey = zmq.auth.load_certificate(d / "matching.key")[0]
        bad.connect(endpoint)
        try:
            bad.send(b"forged")
        except zmq.Again:
            pass                # refused before the send: nothing queued, nothing can arrive
        assert not pull.poll(int(NOT_IN_S * 1000))
    finally:
        curve.use(None)
        auth.stop()
        ctx.destroy(linger=0)


def test_the_keys_are_read_once_and_staged_for_every_process(keys, tmp_path):
    """``stage`` (what ``margin-engine run`` does at start) writes the checked keys into
    the runtime directory, mode 600, and the processes read that copy: editing the
    allowlist afterwards (a half-copied key file, a removed one) changes nothing until the
    next start, and cannot make a restarted worker fail on it (a review's worker 0,
    restarted after a half-copied key landed, crash-looped: 24 tracebacks in 5 s)."""
    d, allow = keys
    sec = curve.Security(str(d / "engine.key_secret"), str(allow))
    path = curve.stage(sec, str(tmp_path))
    assert os.stat(path).st_mode & 0o777 == 0o600
    matching = zmq.auth.load_certificate(d / "matching.key")[0]
    (allow / "half.key").write_text("metadata\n")                   # half copied
    (allow / "matching.key").unlink()
    k = curve.read_staged(path)
    watcher = zmq.auth.load_certificate(d / "watcher.key")[0]
    assert k.allowed == frozenset({("*", matching), ("events", watcher)}) and k.orders_server == b""
    assert zmq.curve_public(k.secret) == k.public == zmq.auth.load_certificate(d / "engine.key")[0]


def test_the_zap_handler_names_a_few_refused_keys_counts_the_rest_and_never_raises(keys, capfd):
    """A peer trying a fresh key on every connection: the first 16 refused keys are named
    in the log, the rest counted (one line at most a minute), 1,024 remembered; and a log
    that cannot be written (closed stderr, a full disk) leaves the refusal standing instead
    of ending pyzmq's handler thread (which left the process admitting nobody)."""
    d, _ = keys
    ctx = zmq.Context()
    public, secret = zmq.auth.load_certificate(d / "engine.key_secret")
    allowed = zmq.auth.load_certificate(d / "matching.key")[0]
    watcher = zmq.auth.load_certificate(d / "watcher.key")[0]
    zap = curve._Allowlist(ctx, curve.Keys(public, secret, frozenset({("*", allowed), ("events", watcher)})))
    try:
        assert zap.callback("fills", allowed) is True
        assert (zap.callback("events", watcher), zap.callback("fills", watcher)) == (True, False)
        zap.named = zap.count = zap.count_logged = 0
        capfd.readouterr()                                               # (the watcher's refusal on fills)
        fresh = [zmq.curve_keypair()[0] for _ in range(2_000)]
        assert not any(zap.callback("", k) for k in fresh)
        err = capfd.readouterr().err
        assert err.count("curve: refused a client whose public key") == curve.REFUSED_NAMED == 16
        assert err.count("more connections refused") <= 1
        assert len(zap.refused) == curve.REFUSED_REMEMBERED and zap.count == 2_000
        import sys
        real, sys.stderr = sys.stderr, open(os.devnull, "w")
        sys.stderr.close()                                               # writes now raise ValueError
        try:
            zap.named = 0
            assert zap.callback("", zmq.curve_keypair()[0]) is False
        finally:
            sys.stderr = real
    finally:
        zap.auth.stop()
        ctx.destroy(linger=0)


def test_keys_never_writes_through_a_dangling_link(tmp_path):
    (tmp_path / "k").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "k" / "dang.key_secret")
    r = subprocess.run(cli("keys", str(tmp_path / "k"), "dang"), capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 2 and "not overwritten" in r.stderr
    assert not (tmp_path / "elsewhere").exists()
