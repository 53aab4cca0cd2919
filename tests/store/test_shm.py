"""POSIX shared-memory store: real segments, other processes, refusals, capacity.

Every test creates its own segment named ``me-test-<8 hex>`` and unlinks it in the
fixture's finalizer, so a failed test leaves nothing in /dev/shm.
"""

import json
import mmap
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import posix_ipc
import pytest

from engine.instruments import Asset, Instrument, Kind, RiskTier
from engine.store import layout as L
from engine.store.shm import CapacityError, LayoutMismatch, Store, StoreError

REPO = Path(__file__).resolve().parents[2]

USDT = Asset("USDT", 0, 10**6, 1.0, 0.0)
BTC = Asset("BTC", 1, 10**8, 50_000.0, 0.05)
ASSETS = [USDT, BTC]


def _perp(name: str, index: int, mark: float) -> Instrument:
    return Instrument(name=name, index=index, kind=Kind.PERP, settle="USDT", contract_size=1.0,
                      qty_scale=1000, price_scale=10, tick_size=0.1, lot_size=0.001,
                      tiers=(RiskTier(0.0, 0.01, 0.005),), mark_price=mark)


BTCUSDT, ETHUSDT, SOLUSDT = _perp("BTCUSDT", 0, 50_000.0), _perp("ETHUSDT", 1, 3_000.0), _perp("SOLUSDT", 2, 150.0)
INSTRUMENTS = [BTCUSDT, ETHUSDT, SOLUSDT]


# --------------------------------------------------------------------------- fixtures
def _unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory("/" + name)
    except posix_ipc.ExistentialError:
        pass


@pytest.fixture
def seg_name():
    """A fresh segment name; whatever was created under it is unlinked afterwards."""
    name = f"me-test-{uuid.uuid4().hex[:8]}"
    yield name
    _unlink_quietly(name)


@pytest.fixture
def make_store(seg_name):
    """Create stores under ``seg_name``; detach them all at the end (the name is unlinked
    by ``seg_name``)."""
    made = []

    def make(**kw):
        args = dict(assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=8,
                    n_partitions=2, slots_per_account=4)
        args.update(kw)
        s = Store.create(seg_name, **args)
        made.append(s)
        return s

    yield make
    for s in made:
        s.detach()


def _run_child(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (another process, own mappings)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- other process
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_another_process_reads_accounts_and_prices(make_store, seg_name):
    store = make_store()
    alice = store.add_account(7)                      # 7 % 2 -> partition 1, first row there
    store.set_balance(alice, 0, 12_345_000_000)       # 12 345 USDT in micro-USDT
    store.set_balance(alice, 1, 50_000_000)           # 0.5 BTC in satoshi
    store.set_position(alice, 0, 1_500, 75_000_000_000)   # long 1.5 BTC, cost 75 000 USDT
    store.set_position(alice, 2, -20_000, -3_000_000_000)
    store.publish_mark(1, 3_111.5)
    child = _run_child(f"""
        import json
        from engine.store.shm import Store
        s = Store.attach({seg_name!r}, readonly=True)
        row = s.row_of(7)
        acct, slots = s.read_account(row)
        snap = s.price_snapshot()
        print(json.dumps({{
            "row": row, "readonly": s.readonly, "id": int(acct["account_id"]),
            "partition": int(acct["partition"]), "balance": acct["balance"].tolist(),
            "slots": [[int(p["instrument"]), int(p["qty"]), int(p["cost"])] for p in slots],
            "marks": snap.marks.tolist(), "price_seqs": snap.price_seqs.tolist(),
            "asset_px": snap.asset_px[:2].tolist(), "header_price_seq": int(s.header[0]["price_seq"]),
        }}))
        s.detach()
    """)
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    assert got["row"] == alice == 4                  # per_partition = 8 / 2 = 4; partition 1 starts at 4
    assert got["readonly"] is True
    assert got["id"] == 7 and got["partition"] == 1
    assert got["balance"][:2] == [12_345_000_000, 50_000_000]
    assert got["slots"] == [[0, 1_500, 75_000_000_000], [2, -20_000, -3_000_000_000]]
    assert got["marks"] == [50_000.0, 3_111.5, 150.0]
    assert got["price_seqs"] == [0, 1, 0]
    assert got["header_price_seq"] == 1
    assert got["asset_px"] == [1.0, 50_000.0]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_writes_of_another_process_are_seen_here(make_store, seg_name):
    store = make_store()
    row = store.add_account(2)
    child = _run_child(f"""
        from engine.store.shm import Store
        s = Store.attach({seg_name!r}, readonly=False)
        s.set_balance({row}, 1, 123)
        s.publish_mark(0, 51_000.0)
        s.detach()
    """)
    assert child.returncode == 0, child.stderr
    acct, _ = store.read_account(row)
    assert int(acct["balance"][1]) == 123
    assert store.price_snapshot().marks[0] == 51_000.0


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_readonly_attach_in_another_process_cannot_write(make_store, seg_name):
    store = make_store()
    store.add_account(0)
    child = _run_child(f"""
        from engine.store.shm import Store, StoreError
        s = Store.attach({seg_name!r}, readonly=True)
        try:
            s.accounts["balance"][0, 0] = 1
        except ValueError as e:
            print("ValueError", e)
        try:
            s.set_balance(0, 0, 1)
        except StoreError as e:
            print("StoreError", e.code)
        s.detach()
    """)
    assert child.returncode == 0, child.stderr
    assert "ValueError" in child.stdout and "read-only" in child.stdout
    assert "StoreError 5001" in child.stdout
    assert int(store.accounts["balance"][0, 0]) == 0


# --------------------------------------------------------------------------- read-only
def test_readonly_attach_cannot_write(make_store, seg_name):
    make_store().add_account(0)
    ro = Store.attach(seg_name, readonly=True)
    try:
        for table, field in ((ro.accounts, "balance"), (ro.prices, "mark"), (ro.header, "price_seq"),
                             (ro.positions, "qty"), (ro.partitions, "n_accounts")):
            with pytest.raises(ValueError, match="read-only"):
                table[field][0] = 1
        with pytest.raises(StoreError, match="read-only"):
            with ro.writing(ro.accounts, 0):
                pass
        with pytest.raises(StoreError):
            ro.set_position(0, 0, 1, 1)
    finally:
        ro.detach()


# --------------------------------------------------------------------------- refusals
def test_attach_refuses_another_layout_version(make_store, seg_name):
    store = make_store()
    # Patch the header as an engine built with layout 99 would have written it.
    off = L.HEADER.fields["layout_version"][1]
    store._mm[off: off + 4] = (99).to_bytes(4, "little")
    with pytest.raises(LayoutMismatch) as ei:
        Store.attach(seg_name, readonly=True)
    msg = str(ei.value)
    assert "99" in msg and f"version {L.LAYOUT_VERSION}" in msg
    assert seg_name in msg
    assert ei.value.code == 5001
    with pytest.raises(LayoutMismatch):                # read-write attach refuses just the same
        Store.attach(seg_name, readonly=False)


@pytest.mark.parametrize("size, junk, needle", [
    pytest.param(L.PAGE, b"\xde\xad\xbe\xef" * (L.PAGE // 4), "not a margin-engine segment", id="junk-page"),
    pytest.param(L.PAGE, b"\x00" * L.PAGE, "not a margin-engine segment", id="zeroed-page"),
    pytest.param(16, b"MRGNENG\x00" + b"\x01" * 8, "too small", id="smaller-than-header"),
])
def test_attach_refuses_a_non_engine_segment(seg_name, size, junk, needle):
    raw = posix_ipc.SharedMemory("/" + seg_name, posix_ipc.O_CREX, mode=0o600, size=size)
    mm = mmap.mmap(raw.fd, size)
    os.close(raw.fd)
    mm[:] = junk
    mm.close()
    with pytest.raises(LayoutMismatch, match=needle) as ei:
        Store.attach(seg_name, readonly=True)
    assert ei.value.code == 5001


def test_attach_missing_name_is_a_clear_store_error(seg_name):
    with pytest.raises(StoreError, match="no such shared-memory segment") as ei:
        Store.attach(seg_name)
    assert seg_name in str(ei.value)
    assert not isinstance(ei.value, LayoutMismatch)


def test_create_over_an_existing_name_errors_unless_replace(make_store, seg_name):
    first = make_store()
    first.add_account(0)
    with pytest.raises(StoreError, match="exists"):
        Store.create(seg_name, assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=8)
    assert int(first.partitions[0]["n_accounts"]) == 1    # the failed create touched nothing
    second = make_store(replace=True)
    assert int(second.partitions[0]["n_accounts"]) == 0    # a fresh segment under the old name
    fresh = Store.attach(seg_name)
    try:
        assert int(fresh.partitions[0]["n_accounts"]) == 0
    finally:
        fresh.detach()


@pytest.mark.parametrize("bad", ["", "a/b"])
def test_bad_segment_names(bad):
    with pytest.raises(ValueError, match="one path component"):
        Store.attach(bad)


def test_unlink_then_attach_fails(make_store, seg_name):
    store = make_store()
    row = store.add_account(0)
    store.unlink()
    assert not Path(f"/dev/shm/{seg_name}").exists()
    with pytest.raises(StoreError, match="no such shared-memory segment"):
        Store.attach(seg_name)
    store.set_balance(row, 0, 5)             # the creator's mapping outlives the name
    assert int(store.read(store.accounts, row)["balance"][0]) == 5
    store.unlink()                           # twice is harmless


def test_segment_is_owner_only(make_store, seg_name):
    make_store()
    st = os.stat(f"/dev/shm/{seg_name}")
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid == os.getuid()


# --------------------------------------------------------------------------- capacity
def _copies(store: Store) -> dict[str, np.ndarray]:
    return {"accounts": store.accounts.copy(), "positions": store.positions.copy(),
            "partitions": store.partitions.copy()}


def test_full_partition_is_capacity_error_and_changes_nothing(make_store):
    store = make_store(accounts_capacity=4, n_partitions=2)     # 2 rows per partition
    store.add_account(0)
    store.add_account(2)                     # partition 0 now full (ids 0, 2 are even)
    store.add_account(1)                     # partition 1 still has room
    before = _copies(store)
    with pytest.raises(CapacityError) as ei:
        store.add_account(4)                 # 4 % 2 = 0 -> the full partition
    assert ei.value.code == 5002
    assert "partition 0 is full" in str(ei.value)
    after = _copies(store)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert store.row_of(4) is None
    assert store.add_account(3) == 3         # the other partition is unaffected


def test_duplicate_account_id_is_refused(make_store):
    store = make_store()
    store.add_account(5)
    with pytest.raises(StoreError, match="exists"):
        store.add_account(5)
    assert int(store.partitions[1]["n_accounts"]) == 1


def test_full_position_slots_is_capacity_error_and_changes_nothing(make_store):
    store = make_store(slots_per_account=2)
    row = store.add_account(0)
    store.set_position(row, 0, 1_000, 50_000_000_000)
    store.set_position(row, 1, -2_000, -6_000_000_000)
    before = _copies(store)
    with pytest.raises(CapacityError) as ei:
        store.set_position(row, 2, 10, 1_500_000)
    assert ei.value.code == 5003
    after = _copies(store)
    np.testing.assert_array_equal(before["positions"], after["positions"])
    np.testing.assert_array_equal(before["partitions"], after["partitions"])
    # The account row is unchanged in every field; its seqlock counter may move (the
    # refusal happens inside the write bracket) but must be left even (not mid-write).
    data_fields = [f for f in L.ACCOUNT.names if f != "seq"]
    np.testing.assert_array_equal(before["accounts"][data_fields], after["accounts"][data_fields])
    assert int(after["accounts"][row]["seq"]) % 2 == 0
    store.read(store.accounts, row)          # still readable
    # replacing an existing position needs no free slot
    assert store.set_position(row, 1, -3_000, -9_000_000_000) == 1


def test_set_position_replaces_in_place(make_store):
    store = make_store()
    row = store.add_account(0)
    assert store.set_position(row, 1, 1_000, 3_000_000_000) == 0
    assert store.set_position(row, 1, 2_000, 6_100_000_000) == 0
    acct, slots = store.read_account(row)
    assert int(acct["n_positions"]) == 1
    assert slots.tolist() == [(1, 0, 2_000, 6_100_000_000, 0)]


def test_zero_position_is_removed_and_slots_stay_compact(make_store):
    store = make_store(slots_per_account=4)
    row = store.add_account(0)
    store.set_position(row, 0, 1_000, 50_000_000_000)
    store.set_position(row, 1, 2_000, 6_000_000_000)
    store.set_position(row, 2, 3_000, 450_000_000, mode=int(L.Mode.ISOLATED), isolated_margin=99)
    assert store.set_position(row, 0, 0, 0) == -1      # remove the first: the last moves in
    acct, used = store.read_account(row)
    assert int(acct["n_positions"]) == 2
    assert used.tolist() == [(2, 1, 3_000, 450_000_000, 99), (1, 0, 2_000, 6_000_000_000, 0)]
    assert store.slots(row)[2:].tolist() == [(0, 0, 0, 0, 0)] * 2   # freed slots zeroed
    assert store.set_position(row, 1, 0, 0) == -1      # remove the last one
    assert store.set_position(row, 2, 0, 0) == -1      # and the only one left
    acct, used = store.read_account(row)
    assert int(acct["n_positions"]) == 0 and len(used) == 0
    assert store.slots(row).tolist() == [(0, 0, 0, 0, 0)] * 4
    assert store.set_position(row, 1, 0, 0) == -1      # removing an absent position: no-op
    assert int(store.accounts[row]["n_positions"]) == 0


# --------------------------------------------------------------------------- partitions
def test_partition_row_ranges(make_store):
    store = make_store(accounts_capacity=9, n_partitions=3)   # 3 rows per partition
    assert store.per_partition == 3
    rows = {acct_id: store.add_account(acct_id) for acct_id in (10, 11, 12, 13, 3, 7)}
    # partition_of = id % 3: 10 -> 1, 11 -> 2, 12 -> 0, 13 -> 1, 3 -> 0, 7 -> 1
    # partition p owns rows [3p, 3p + 3), filled in arrival order
    assert rows == {12: 0, 3: 1, 10: 3, 13: 4, 7: 5, 11: 6}
    assert [store.partition_rows(p) for p in range(3)] == [(0, 2), (3, 6), (6, 7)]
    for acct_id, row in rows.items():
        assert store.partition_of(acct_id) == acct_id % 3
        assert int(store.accounts[row]["partition"]) == acct_id % 3
        assert int(store.accounts[row]["account_id"]) == acct_id
        assert store.row_of(acct_id) == row
    assert store.row_of(99) is None


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_row_index_rebuilt_by_an_attaching_process(make_store, seg_name):
    store = make_store(accounts_capacity=9, n_partitions=3)
    for acct_id in (10, 11, 12, 13):
        store.add_account(acct_id)
    child = _run_child(f"""
        from engine.store.shm import Store
        s = Store.attach({seg_name!r})
        print([s.row_of(i) for i in (10, 11, 12, 13, 14)])
        s.detach()
    """)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "[3, 6, 0, 4, None]"


# --------------------------------------------------------------------------- private store
def test_private_store_has_the_same_layout_and_no_name():
    store = Store.create(None, assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=4)
    try:
        assert store.name is None
        row = store.add_account(1)
        store.set_balance(row, 0, 10)
        assert int(store.read(store.accounts, row)["balance"][0]) == 10
        store.unlink()                        # nothing to unlink: no error
    finally:
        store.detach()


@pytest.mark.parametrize("kw, code", [
    pytest.param(dict(assets=[]), 5005, id="no-assets"),
    pytest.param(dict(assets=[Asset(f"A{i}", i, 10, 1.0, 0.0) for i in range(9)]), 5005, id="nine-assets"),
    pytest.param(dict(instruments=[]), 5004, id="no-instruments"),
])
def test_create_capacity_limits(kw, code):
    args = dict(assets=ASSETS, instruments=INSTRUMENTS, accounts_capacity=4)
    args.update(kw)
    with pytest.raises(CapacityError) as ei:
        Store.create(None, **args)
    assert ei.value.code == code


def test_read_account_returns_as_many_slots_as_the_row_says_when_a_position_is_added_meanwhile(make_store):
    """The owner adds a second position while a reader copies the account: right after
    the reader's first row read returns (the write slipped in between the reader's
    steps). What it returns must be one consistent state -- as many slots as its row
    says. (It copied as many slots as that first read said, one, and returned the
    row after the write: two positions, one slot.)"""
    store = make_store()
    row = store.add_account(7)
    store.set_position(row, 0, 1_500, 75_000_000_000)
    real_read, calls = store.read, []

    def read(table, r):                                 # the owner writes right after the first read
        out = real_read(table, r)
        if not calls:
            store.set_position(row, 2, -20_000, -3_000_000_000)
        calls.append(r)
        return out

    store.read = read
    acct, slots = store.read_account(row)
    n = int(acct["n_positions"])
    assert len(slots) == n and [int(p["instrument"]) for p in slots] == [0, 2][:n]
