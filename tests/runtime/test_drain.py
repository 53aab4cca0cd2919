"""The worker's ring drain (``engine._fills.drain_fill_legs``) hands back a copy of each
record it took, made before it moved the ring's read index: after that the slot is the
producer's (the gateway, waiting on a full ring, writes it again at once), so nothing
the caller needs -- the row, the trade, the fill's sequence number and receive time for
a refused leg's event and the partition's counters -- may be read from the ring.

Real shared memory: a store and a control segment made by the test helper, one
partition, rings of 64."""

from __future__ import annotations

import numpy as np

from engine import _fills
from engine.codes import Code
from engine.runtime.ctl import RecordKind, undo_dtype
from runtime_support import gateway_state

BTC = 0


def test_the_drain_returns_copies_of_its_records_taken_before_the_slot_was_released(tmp_path):
    cfg, store, ctl, _ = gateway_state(str(tmp_path), 1, [1, 2])
    try:
        p, row = 0, store.row_of(1)
        # one leg: account 1 buys 0.001 BTC (1 unit) at 95,000.0 (950,000 price units),
        # trade 77, fill seq 5, received at t = 123
        assert ctl.push(p, int(RecordKind.FILL_LEG), BTC, row, 1, 950_000, 0, 5, 123, 77)
        udt = undo_dtype(store.slots_per_account)
        args = (store.addr(store.instruments), store.addr(store.assets), store.addr(store.accounts),
                store.addr(store.positions), store.slots_per_account, store.addr(store.partitions, p),
                store.partitions.dtype.fields["fee_pool"][1], ctl.rings[p].ctypes.data, ctl.records[p].ctypes.data,
                ctl.undo[p].ctypes.data, udt.fields["account"][1], udt.fields["slots"][1], udt.fields["fee_pool"][1])
        rows, codes = np.zeros(8, np.int64), np.zeros(8, np.int32)
        copies = np.zeros(8, ctl.records[p].dtype)
        assert _fills.drain_fill_legs(*args, 8, rows, codes, copies.ctypes.data) == (1, 1)
        assert int(ctl.rings[p][0]["read_idx"]) == 1                 # released: the producer's again
        ctl.records[p][0] = np.zeros(1, ctl.records[p].dtype)        # ... which writes it at once
        c = copies[0]
        assert (int(c["row"]), int(c["delta"]), int(c["price"]), int(c["ref"]), int(c["ts_ns"]), int(c["aux"])) \
            == (row, 1, 950_000, 5, 123, 77)
        assert (int(rows[0]), int(codes[0])) == (row, Code.OK)
        assert int(store.slots(row)[0]["qty"]) == 1                  # and the leg was applied
    finally:
        ctl.unlink()
        store.unlink()
        store.detach()
