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
import re
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
from ops_support import (BTC, USDT, book, collateral, crash_and_restart, dealer, durable_engine, ipc_endpoints,
                         start_run, unique_name, write_config)

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
    proc = start_run(spawn, cfg, name, root / "run1.err", "--accounts", "10")     # capacity 16: see the module doc
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
    proc2, err = crash_and_restart(spawn, proc, name, ep, cfg, root / "run2.err")
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


def isolated_margin(sock: zmq.Socket, seq: Sequencer, request_id: int, account: int, usdt: int) -> dict:
    sock.send(seq.encode(MsgType.ISOLATED_MARGIN, {"request_id": request_id, "account": account,
                                                   "instrument_id": BTC, "amount_units": usdt * USDT}))
    assert sock.poll(5_000), f"no reply to ISOLATED_MARGIN {request_id} within 5 s"
    m = decode(sock.recv())
    assert type(m) is Message and m.type == MsgType.COLLATERAL_REPLY and m.fields["request_id"] == request_id, m
    return m.fields


def test_an_isolated_account_opened_over_the_wire_is_funded_at_its_fill_and_adjusted(spawn, ops_dir):
    """The isolated path end to end: OPEN_ACCOUNT 1001 isolated, 10,000 USDT deposited, a
    fill where 1001 buys 1 BTC from account 2 at the mark, 95,000. The worker funds the
    new isolated position with its initial margin at 95,000: tier 1 of BTCUSDT, 95,000 x
    1 % - 50,000 x (1 % - 0.8 %) = 850 USDT, and one micro-USDT more (0.01 as a float64
    is a little over 1/100): 850,000,001 units; the balance is 9,149,999,999. Then
    ISOLATED_MARGIN +500 (margin 1,350,000,001), -600 refused 3111 (750.000001 < IM
    850), -500 (back to 850,000,001). A gateway crash; the restart replays the open,
    the deposit, the fill (funded the same way) and the two moves into the same book."""
    root, name, ep, cfg, proc = durable_engine(spawn, ops_dir, "--accounts", "10")
    ctx = zmq.Context()
    try:
        custody = dealer(ctx, ep["checks"])
        cseq = Sequencer()
        assert open_account(custody, cseq, 1, 1001, "isolated") == Code.OK
        assert collateral(custody, cseq, MsgType.DEPOSIT, 2, 1001, 10_000)["code"] == 0
        fills = ctx.socket(zmq.PUSH)
        fills.connect(ep["fills"])
        fills.send(encode_batch(MsgType.FILL, [{
            "trade_id": 1, "instrument_id": BTC, "maker_account": 2, "taker_account": 1001, "qty_units": 1000,
            "price_units": 950_000, "maker_fee_units": 0, "taker_fee_units": 0, "taker_side": "buy"}],
            first_seq=1, ts_ns=time.time_ns()))
        pos = wait_until(lambda: book(name)["accounts"][1001][3], 10.0, "1001's fill applied")
        assert pos == [(BTC, 1, 1000, 95_000 * USDT, 850_000_001)]              # mode 1: isolated
        assert book(name)["accounts"][1001][2][0] == 9_149_999_999
        assert isolated_margin(custody, cseq, 3, 1001, 500) == {"request_id": 3, "code": 0,
                                                                 "balance_units": 1_350_000_001}
        assert isolated_margin(custody, cseq, 4, 1001, -600)["code"] == Code.ISOLATED_BELOW_INITIAL_MARGIN
        assert isolated_margin(custody, cseq, 5, 1001, -500) == {"request_id": 5, "code": 0,
                                                                  "balance_units": 850_000_001}
        before = book(name)
    finally:
        ctx.destroy(linger=2000)
    assert before["accounts"][1001][2][0] == 9_149_999_999
    proc2, err = crash_and_restart(spawn, proc, name, ep, cfg, root / "run2.err")
    m = re.search(r"(\d+) deposits, (\d+) withdrawals, (\d+) accounts opened, (\d+) isolated margin moves", err)
    assert m and tuple(map(int, m.groups())) == (1, 0, 1, 2), err
    assert book(name) == before
    proc2.send_signal(signal.SIGTERM)
    assert proc2.wait(timeout=20) == 0
