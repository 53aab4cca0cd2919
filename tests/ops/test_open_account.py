"""Accounts opened while the engine runs (OPEN_ACCOUNT, docs/protocol.md section 4).

``margin-engine run`` with real processes and sockets: custody opens accounts on the
checks socket; each is added by the worker that owns its partition (id mod partitions)
and is at once known to every path -- deposits, the C order-check desk, the C fills
intake. An id in use is refused 3108, a full partition 3109. Then the gateway is killed
(SIGKILL), and the restart rebuilds the opened accounts, their deposits and their fills
from the snapshot of the start and the journal after it.

Book: ``engine.accounts_capacity`` 16 over 2 partitions, 8 rows each; ``--accounts 10``
makes ids 1..10, so 5 rows of each partition are used (evens in partition 0, odds in 1).
Units (embedded default): BTCUSDT is instrument 0, 1 unit = 0.001 BTC, price_scale 10;
USDT is asset 0, 1e6 units per USDT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from engine.codes import Code
from engine.runtime.harness import wait_until
from engine.store.layout import AccountFlag
from feeds.protocol import Message, MsgType, Sequencer, decode, encode, encode_batch
from ops_support import (BTC, USDT, book, collateral, dealer, gateway_pid, ipc_endpoints, start_run, unique_name,
                         write_config)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def open_account(sock: zmq.Socket, seq: Sequencer, request_id: int, account: int, mode: str | None = None) -> int:
    body = {"request_id": request_id, "account": account, **({"mode": mode} if mode else {})}
    sock.send(seq.encode(MsgType.OPEN_ACCOUNT, body))
    assert sock.poll(5_000), f"no reply to OPEN_ACCOUNT {request_id} within 5 s"
    m = decode(sock.recv())
    assert type(m) is Message and m.type == MsgType.OPEN_ACCOUNT_REPLY and m.fields["request_id"] == request_id, m
    return m.fields["code"]


def order_check(sock: zmq.Socket, seq: Sequencer, request_id: int, account: int) -> int:
    """Buy 0.01 BTC at 95,000: a check the C desk answers."""
    sock.send(seq.encode(MsgType.ORDER_CHECK, {"request_id": request_id, "account": account, "instrument_id": BTC,
                                               "qty_units": 10, "price_units": 950_000}))
    assert sock.poll(5_000)
    m = decode(sock.recv())
    assert m.type == MsgType.ORDER_CHECK_REPLY and m.fields["request_id"] == request_id, m
    return m.fields["code"]


def test_accounts_opened_at_run_time_trade_at_once_and_come_back_after_a_crash(spawn, ops_dir):
    root = Path(ops_dir)
    name = unique_name()
    ep = ipc_endpoints(ops_dir)
    cfg = write_config(root / "engine.toml", name, endpoints=ep,
                       engine={"accounts_capacity": "16", "state_dir": json.dumps(str(root / "state"))})
    proc = start_run(spawn, cfg, name, root / "run1.err", "--accounts", "10")
    ctx = zmq.Context()
    try:
        custody = dealer(ctx, ep["checks"])
        cseq = Sequencer()
        # Unknown before it is opened: an order check says 4002, a deposit 3003.
        assert order_check(custody, cseq, 1, 1000) == Code.CHECK_UNKNOWN_ACCOUNT
        assert collateral(custody, cseq, MsgType.DEPOSIT, 2, 1000, 10_000)["code"] == Code.FILL_UNKNOWN_ACCOUNT
        # Opened: 1000 (partition 0, its 6th row), 1001 isolated by default (partition 1),
        # 1002 and 1004 (partition 0: rows 7 and 8 of 8). A second open of 1000, or of
        # a provisioned id (5), is 3108; 1006 finds partition 0 full: 3109.
        assert open_account(custody, cseq, 3, 1000) == Code.OK
        assert open_account(custody, cseq, 4, 1001, "isolated") == Code.OK
        assert [open_account(custody, cseq, 5 + k, a) for k, a in enumerate((1000, 5, 1002, 1004, 1006))] == \
            [Code.ACCOUNT_EXISTS, Code.ACCOUNT_EXISTS, Code.OK, Code.OK, Code.ACCOUNTS_FULL]
        # Known to every path at once: deposits (at its worker), the C order-check desk
        # (10,000 USDT covers 0.01 BTC x 95,000 x 1 % IM = 9.5), the C fills intake.
        assert collateral(custody, cseq, MsgType.DEPOSIT, 10, 1000, 10_000)["code"] == 0
        assert collateral(custody, cseq, MsgType.DEPOSIT, 11, 1001, 5_000)["code"] == 0
        assert order_check(custody, cseq, 12, 1000) == Code.OK
        fills = ctx.socket(zmq.PUSH)
        fills.connect(ep["fills"])
        # 1000 buys 0.5 BTC (500 units) at 95,000 from account 2, paying a 1 USDT fee
        fills.send(encode_batch(MsgType.FILL, [{
            "trade_id": 1, "instrument_id": BTC, "maker_account": 2, "taker_account": 1000, "qty_units": 500,
            "price_units": 950_000, "maker_fee_units": 0, "taker_fee_units": 1 * USDT, "taker_side": "buy"}],
            first_seq=1, ts_ns=time.time_ns()))

        def settled():
            b = book(name)
            a = b["accounts"].get(1000)
            return b if a and a[3] else None
        before = wait_until(settled, 10.0, "account 1000's fill applied")
    finally:
        ctx.destroy(linger=2000)
    acc = before["accounts"]
    # partition 0: ids 2..10 even (5), then 1000, 1002, 1004; partition 1: 5 odd ids and 1001
    assert before["n_accounts"] == [8, 6]
    assert acc[1000][:3] == (0, 0, [9_999 * USDT] + [0] * (len(acc[1000][2]) - 1))     # 10,000 - 1 fee
    assert acc[1000][3] == [(BTC, 0, 500, 47_500 * USDT, 0)]                           # 0.5 x 95,000
    assert acc[1001][:2] == (1, int(AccountFlag.ISOLATED_DEFAULT)) and acc[1001][2][0] == 5_000 * USDT
    assert acc[1002][3] == [] and acc[1004][2][0] == 0 and 1006 not in acc

    # A crash (the gateway killed): the engine exits 1; the restart replays the journal
    # over the start's snapshot (which had only the 10 provisioned accounts).
    os.kill(gateway_pid(name), signal.SIGKILL)
    assert proc.wait(timeout=20) == 1
    shutil.rmtree(ep["runtime_dir"])
    log2 = root / "run2.err"
    proc2 = start_run(spawn, cfg, name, log2)
    err = log2.read_text()
    m = re.search(r"(\d+) deposits, (\d+) withdrawals, (\d+) accounts opened", err)
    assert m and tuple(map(int, m.groups())) == (2, 0, 4), err
    assert book(name) == before
    # and the recovered gateway knows them: 1000 again is 3108, its check is answered
    ctx = zmq.Context()
    try:
        custody = dealer(ctx, ep["checks"])
        cseq = Sequencer()
        assert open_account(custody, cseq, 1, 1000) == Code.ACCOUNT_EXISTS
        assert order_check(custody, cseq, 2, 1001) == Code.OK
    finally:
        ctx.destroy(linger=0)
    proc2.send_signal(signal.SIGTERM)
    assert proc2.wait(timeout=20) == 0


def test_a_malformed_open_account_is_rejected_with_its_code(spawn, ops_dir):
    """A mode that is neither "cross" nor "isolated" (1008, a value out of its domain), a
    field OPEN_ACCOUNT does not have (1009), a negative id (1008): REJECT, nothing opened."""
    root = Path(ops_dir)
    name = unique_name()
    ep = ipc_endpoints(ops_dir)
    cfg = write_config(root / "engine.toml", name, endpoints=ep)
    proc = start_run(spawn, cfg, name, root / "run.err", "--accounts", "4")
    ctx = zmq.Context()
    try:
        s = dealer(ctx, ep["checks"])
        frame = encode(MsgType.OPEN_ACCOUNT, {"request_id": 1, "account": 50}, seq=1, ts_ns=1)
        for bad, code in ((msgpack.packb({**msgpack.unpackb(frame), "mode": "crass"}), Code.WIRE_BAD_VALUE),
                          (msgpack.packb({**msgpack.unpackb(frame), "leverage": 20}), Code.WIRE_UNKNOWN_FIELD),
                          (msgpack.packb({**msgpack.unpackb(frame), "account": -50}), Code.WIRE_BAD_VALUE)):
            s.send(bad)
            assert s.poll(5_000)
            m = decode(s.recv())
            assert m.type == MsgType.REJECT and m.fields["ref_type"] == MsgType.OPEN_ACCOUNT, m
            assert m.fields["code"] == code, m
    finally:
        ctx.destroy(linger=0)
    assert 50 not in book(name)["accounts"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
