"""Idempotent collateral requests: a DEPOSIT or WITHDRAWAL with a ``transfer_id`` is
applied at most once (docs/protocol.md, DEPOSIT).

A whole engine (``LocalEngine``: supervisor, gateway, worker, real ipc sockets and
shared memory) with a transfer window of 2, and a custody DEALER. USDT is asset 0 at
1e6 units per USDT.
"""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest
import zmq

from engine.codes import Code
from engine.runtime.ctl import TRANSFER, Control
from engine.runtime.harness import LocalEngine, local_config
from feeds.protocol import Message, MsgType, Sequencer, decode
from runtime_support import ACCOUNTS_CAPACITY, USDT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ACCOUNT = 7


def one_account(store) -> None:
    store.add_account(ACCOUNT)


class Custody:
    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.seq = Sequencer()
        self.request_id = 0

    def send(self, kind: MsgType, usdt: int, transfer_id: int | None) -> int:
        self.request_id += 1
        body = {"request_id": self.request_id, "account": ACCOUNT, "asset": "USDT", "amount_units": usdt * USDT}
        if transfer_id is not None:
            body["transfer_id"] = transfer_id
        self.sock.send(self.seq.encode(kind, body))
        return self.request_id

    def reply(self) -> tuple[int, int, float]:
        """(request_id, code, balance in USDT) of the next reply."""
        assert self.sock.poll(5_000), "no COLLATERAL_REPLY within 5 s"
        m = decode(self.sock.recv())
        assert type(m) is Message and m.type == MsgType.COLLATERAL_REPLY, m
        return m.fields["request_id"], m.fields["code"], m.fields["balance_units"] / USDT

    def ask(self, kind: MsgType, usdt: int, transfer_id: int | None = None) -> tuple[int, float]:
        rid = self.send(kind, usdt, transfer_id)
        got = self.reply()
        assert got[0] == rid
        return got[1], got[2]


def test_a_transfer_id_is_applied_once_and_the_window_forgets_the_oldest():
    root = tempfile.mkdtemp(prefix="me-tr-")
    cfg = local_config(root, accounts_capacity=ACCOUNTS_CAPACITY, transfer_window=2)
    ctx = zmq.Context()
    D, W = MsgType.DEPOSIT, MsgType.WITHDRAWAL
    try:
        with LocalEngine(cfg, setup=one_account) as le:
            c = Custody(ctx, cfg.endpoints.checks)
            assert c.ask(D, 100, transfer_id=11) == (0, 100.0)
            # The retry: nothing applied, the balance as it is (100, not 200).
            assert c.ask(D, 100, transfer_id=11) == (int(Code.TRANSFER_ALREADY_APPLIED), 100.0)
            # The same id for another amount, or as a withdrawal: refused, nothing applied.
            assert c.ask(D, 5, transfer_id=11) == (int(Code.TRANSFER_ID_REUSED), 100.0)
            assert c.ask(W, 100, transfer_id=11) == (int(Code.TRANSFER_ID_REUSED), 100.0)
            assert c.ask(W, 30, transfer_id=12) == (0, 70.0)
            assert c.ask(W, 30, transfer_id=12) == (int(Code.TRANSFER_ALREADY_APPLIED), 70.0)
            # Without a transfer_id a request is applied each time: 70 + 1 + 1 = 72.
            assert c.ask(D, 1) == (0, 71.0)
            assert c.ask(D, 1) == (0, 72.0)
            # A refused request is not remembered: 13 withdraws too much, then custody may
            # send 13 again for an amount that fits (72 - 2 = 70).
            assert c.ask(W, 1_000, transfer_id=13)[0] == int(Code.WITHDRAWAL_INSUFFICIENT_BALANCE)
            assert c.ask(W, 2, transfer_id=13) == (0, 70.0)
            # The window holds 2: applying 13 pushed out 11, the oldest; 12 and 13 remain.
            ctl = Control.attach("/" + cfg.engine.name + "-ctl")
            window = ctl.transfers_in_order()
            assert window["transfer_id"].tolist() == [12, 13]
            assert window[["account", "amount_units", "asset", "kind"]].tolist() == \
                [(ACCOUNT, 30 * USDT, 0, int(W)), (ACCOUNT, 2 * USDT, 0, int(W))]
            del ctl, window
            # So 11 is new again (documented: the window bounds what is remembered).
            assert c.ask(D, 100, transfer_id=11) == (0, 170.0)
            # Two copies of 14 sent back to back: the second finds the first at the worker
            # (3107) or applied (3105): either way 14 is applied once (170 + 10 = 180).
            r1, r2 = c.send(D, 10, 14), c.send(D, 10, 14)
            got = dict((rid, (code, bal)) for rid, code, bal in (c.reply(), c.reply()))
            assert got[r1] == (0, 180.0)
            assert got[r2] in ((int(Code.TRANSFER_IN_FLIGHT), 170.0), (int(Code.TRANSFER_IN_FLIGHT), 180.0),
                               (int(Code.TRANSFER_ALREADY_APPLIED), 180.0))
            assert le.store.read_account(le.store.row_of(ACCOUNT))[0]["balance"][0] == 180 * USDT
            c.sock.close(0)
    finally:
        ctx.destroy(linger=0)
        shutil.rmtree(root, ignore_errors=True)


def test_the_window_is_circular_and_seeding_keeps_the_newest():
    ctl = Control.create(None, 1, 1, 8, ring_capacity=8, transfer_window=3)
    # ids 1..5 (deposit, account 100 + id, amount 10 x id, asset 0): 4 pushes out 1, 5 pushes out 2
    evicted = [ctl.remember_transfer(t, 100 + t, 10 * t, 0, int(MsgType.DEPOSIT)) for t in range(1, 6)]
    assert evicted == [0, 0, 0, 1, 2]
    window = ctl.transfers_in_order()
    assert window["transfer_id"].tolist() == [3, 4, 5] and window["amount_units"].tolist() == [30, 40, 50]
    other = Control.create(None, 1, 1, 8, ring_capacity=8, transfer_window=2)
    other.seed_transfers(window)                      # a smaller window keeps the newest 2
    assert other.transfers_in_order()["transfer_id"].tolist() == [4, 5]
    assert other.remember_transfer(6, 106, 60, 0, int(MsgType.DEPOSIT)) == 4
    empty = Control.create(None, 1, 1, 8, ring_capacity=8, transfer_window=2)
    empty.seed_transfers(np.zeros(0, TRANSFER))
    assert len(empty.transfers_in_order()) == 0
    with pytest.raises(ValueError, match="transfer_window"):
        Control.create(None, 1, 1, 8, ring_capacity=8, transfer_window=0)
