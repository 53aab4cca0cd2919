"""The fills socket as a ROUTER (``endpoints.fills_acks``): every frame answered.

A matching engine on a DEALER gets ACK code 0 for an accepted frame, ACK 3001 for a
duplicate (acknowledged and dropped: applied once), and REJECT for a malformed frame.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile

import pytest
import zmq

from engine.codes import Code
from engine.runtime.harness import LocalEngine, local_config
from feeds.protocol import Message, MsgType, Sequencer, decode
from runtime_support import ACCOUNTS_CAPACITY, fill, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TAKER, MAKER = 1, 2
USDT_UNITS = 10**6


def two_funded_accounts(store) -> None:
    for acct in (TAKER, MAKER):
        row = store.add_account(acct)
        store.set_balance(row, 0, 100_000 * USDT_UNITS)      # 100,000 USDT each


def test_fills_router_acks_accepted_and_duplicate_frames_and_rejects_malformed():
    root = tempfile.mkdtemp(prefix="me-ack-")
    cfg = local_config(root, accounts_capacity=ACCOUNTS_CAPACITY)
    cfg = dataclasses.replace(cfg, endpoints=dataclasses.replace(cfg.endpoints, fills_acks=True))
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        with LocalEngine(cfg, setup=two_funded_accounts) as le:
            dealer.connect(cfg.endpoints.fills)
            seq = Sequencer()

            def answer() -> Message:
                assert dealer.poll(5000), "no answer from the fills ROUTER"
                m = decode(dealer.recv())
                assert type(m) is Message
                return m

            # 1 BTC at 50,000.0: qty_units 1000 (qty_scale 1000), price_units 500,000 (price_scale 10)
            frame = seq.encode(MsgType.FILL, fill(1, TAKER, MAKER, 1000, 500_000))
            dealer.send(frame)
            ack = answer()
            assert (ack.type, ack.fields["ref_seq"], ack.fields["code"]) == (MsgType.ACK, 1, 0)
            dealer.send(frame)                                  # the same frame again
            dup = answer()
            assert (dup.type, dup.fields["ref_seq"], dup.fields["code"]) == \
                (MsgType.ACK, 1, int(Code.FILL_DUPLICATE))      # acknowledged, dropped
            dealer.send(b"\xc1")                                # never valid msgpack
            rej = answer()
            assert (rej.type, rej.fields["code"]) == (MsgType.REJECT, int(Code.WIRE_MALFORMED))
            st = le.store
            row = st.row_of(TAKER)
            # Applied once: the taker is long 1000 units, not 2000.
            wait_until(lambda: int(st.read_account(row)[0]["n_positions"]) == 1, 5.0, "the fill applied")
            acct, slots = st.read_account(row)
            assert int(slots[0]["qty"]) == 1000
            assert sum(int(st.read(st.partitions, p)["fills_applied"]) for p in range(st.n_partitions)) == 2
    finally:
        dealer.close(0)
        ctx.term()
        shutil.rmtree(root, ignore_errors=True)
