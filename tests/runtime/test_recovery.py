"""Restart recovery without processes: the snapshot file and the journal replay
(engine/runtime/recovery.py). The whole path through ``margin-engine run`` with real
processes is in tests/ops/test_restart_recovery.py.

Units (embedded default): BTCUSDT is instrument 0, contract size 1 BTC, qty_scale 1000
(1 unit = 0.001 BTC), price_scale 10; USDT is asset 0 with 1e6 units per USDT. Accounts
1 and 3 are in partition 1, account 2 in partition 0 (id mod 2).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.codes import Code
from engine.config import load_default
from engine.runtime import recovery
from engine.runtime.journal import MAGIC, Journal, journal_file, replay
from engine.store.shm import Store
from feeds.protocol import MsgType, encode, encode_batch

U = 10**6            # USDT units
NAMES = [a.name for a in load_default().assets]
BTC, USDT = 0, 0


def new_store(config=None, slots: int = 8) -> Store:
    cfg = config or load_default()
    return Store.create(None, assets=list(cfg.assets), instruments=list(cfg.instruments),
                        accounts_capacity=64, n_partitions=2, slots_per_account=slots)


def three_accounts(store: Store) -> None:
    for acct in (1, 2, 3):
        store.set_balance(store.add_account(acct), USDT, 10_000 * U)


def fill(trade_id, taker, maker, qty_units, price_units, taker_fee=0, maker_fee=0) -> dict:
    return {"trade_id": trade_id, "instrument_id": BTC, "maker_account": maker, "taker_account": taker,
            "qty_units": qty_units, "price_units": price_units, "maker_fee_units": maker_fee,
            "taker_fee_units": taker_fee, "taker_side": "buy" if qty_units > 0 else "sell"}


def collateral(kind: MsgType, request_id: int, account: int, amount_units: int) -> bytes:
    return encode(kind, {"request_id": request_id, "account": account, "asset": "USDT",
                         "amount_units": amount_units}, seq=request_id, ts_ns=1)


def write_journal(path: str) -> list[int]:
    """The five records of the module's book; returns the offset after each."""
    j = Journal(path, fsync_interval_s=0)
    ends = []
    # 1. account 1 buys 1 BTC from 2 at 95,000: taker fee 50 USDT, maker rebate 10 USDT
    j.append(1, 1, encode(MsgType.FILL, fill(1, 1, 2, 1000, 950_000, 50 * U, -10 * U), seq=1, ts_ns=1))
    ends.append(os.path.getsize(path))
    # 2. a batch: a fill naming an unknown account (rejected by routing, 3003), then
    #    account 2 sells 0.5 BTC to 3 at 96,000
    j.append(2, 2, encode_batch(MsgType.FILL, [fill(2, 99, 2, 100, 950_000), fill(3, 2, 3, -500, 960_000)],
                                first_seq=2, ts_ns=2))
    ends.append(os.path.getsize(path))
    # 3. a batch overlapping seen numbers: seq 3 (a duplicate) is skipped, the gateway
    #    journaled it with first sequence number 5; account 3 buys 0.2 BTC from 1 at 97,000
    j.append(5, 3, encode_batch(MsgType.FILL, [fill(4, 1, 2, 100, 950_000), fill(5, 3, 1, 200, 970_000)],
                                first_seq=4, ts_ns=3))
    ends.append(os.path.getsize(path))
    # 4./5. a deposit to 3 of 1,000 USDT, a withdrawal from 1 of 100 USDT (both applied live)
    j.append(0, 4, collateral(MsgType.DEPOSIT, 7, 3, 1_000 * U))
    ends.append(os.path.getsize(path))
    j.append(0, 5, collateral(MsgType.WITHDRAWAL, 8, 1, 100 * U))
    ends.append(os.path.getsize(path))
    j.close()
    return ends


def position(store: Store, acct: int) -> tuple[int, int]:
    row = store.row_of(acct)
    slots = store.slots(row)[: int(store.accounts[row]["n_positions"])]
    return (int(slots[0]["qty"]), int(slots[0]["cost"])) if len(slots) else (0, 0)


def balance(store: Store, acct: int) -> int:
    return int(store.accounts[store.row_of(acct)]["balance"][USDT])


def assert_same_book(a: Store, b: Store) -> None:
    """Every account row, position slot and partition row equal, seqlock counters aside
    (they count how often a row was written)."""
    for t in ("accounts", "positions", "partitions"):
        x, y = getattr(a, t).copy(), getattr(b, t).copy()
        if "seq" in x.dtype.names:
            x["seq"] = y["seq"] = 0
        assert x.tobytes() == y.tobytes(), t


def book_after_first_record(tmp_path, journal: str, end_of_first: int) -> Store:
    """The three accounts with only the journal's first record replayed."""
    book = new_store()
    three_accounts(book)
    first_only = str(tmp_path / "first.log")
    with open(journal, "rb") as f, open(first_only, "wb") as g:
        g.write(f.read(end_of_first))
    assert recovery.replay_journal(book, first_only, 0, NAMES).records == 1
    return book


def test_snapshot_plus_replay_gives_the_book_the_fills_and_collateral_made(tmp_path):
    journal, snap = str(tmp_path / "fills.journal"), str(tmp_path / "state.snapshot")
    before = new_store()
    three_accounts(before)
    recovery.write_snapshot(before, snap, len(MAGIC), NAMES)            # the new book, before any record
    write_journal(journal)

    book = new_store()
    meta = recovery.load_snapshot(book, snap, NAMES)
    assert meta["accounts"] == 3
    st = recovery.replay_journal(book, journal, meta["journal_offset"], NAMES)
    assert (st.records, st.fills, st.fills_rejected, st.legs_rejected, st.deposits, st.withdrawals) == \
        (5, 3, 1, 0, 1, 1)
    assert st.reject_codes == {int(Code.FILL_UNKNOWN_ACCOUNT): 1}
    # Positions (V = |qty| x price, in USDT units):
    #   1: +1 BTC for 95,000; then sells 0.2 (reduce): cost removed 95,000 x 0.2 = 19,000,
    #      so +0.8 BTC costing 76,000; realized 0.2 x 97,000 - 19,000 = +400
    #   2: -1 BTC for -95,000, sells 0.5 more at 96,000: -1.5 BTC, cost -143,000
    #   3: +0.5 at 96,000 (48,000) and +0.2 at 97,000 (19,400): +0.7 BTC, cost 67,400
    assert position(book, 1) == (800, 76_000 * U)
    assert position(book, 2) == (-1500, -143_000 * U)
    assert position(book, 3) == (700, 67_400 * U)
    # Balances: 1: 10,000 - 50 fee + 400 realized - 100 withdrawn = 10,250
    #           2: 10,000 + 10 rebate = 10,010;  3: 10,000 + 1,000 deposited = 11,000
    assert [balance(book, a) for a in (1, 2, 3)] == [10_250 * U, 10_010 * U, 11_000 * U]
    # Fee pools: partition 1 (taker 1) +50, partition 0 (maker 2) -10
    assert book.partitions["fee_pool"][:, USDT].tolist() == [-10 * U, 50 * U]
    # Records applied per partition: 0 holds account 2, in two legs (fills 1 and 3);
    # 1 holds accounts 1 and 3: four legs (1 and 3 in fill 5, one each in 1 and 3) and
    # the two collateral records
    assert book.partitions["fills_applied"].tolist() == [2, 6]


def test_a_snapshot_after_some_records_replays_only_the_rest(tmp_path):
    """The book after record 1, snapshotted at the offset after it, plus records 2..5 is
    the book of the whole journal replayed onto the new book."""
    journal, snap = str(tmp_path / "fills.journal"), str(tmp_path / "state.snapshot")
    ends = write_journal(journal)
    whole = new_store()
    three_accounts(whole)
    recovery.replay_journal(whole, journal, 0, NAMES)

    recovery.write_snapshot(book_after_first_record(tmp_path, journal, ends[0]), snap, ends[0], NAMES)

    book = new_store()
    st = recovery.replay_journal(book, journal, recovery.load_snapshot(book, snap, NAMES)["journal_offset"], NAMES)
    assert st.records == 4
    assert_same_book(whole, book)


def test_a_torn_journal_tail_replays_every_whole_record(tmp_path):
    journal, snap = str(tmp_path / "fills.journal"), str(tmp_path / "state.snapshot")
    ends = write_journal(journal)
    with open(journal, "r+b") as f:
        f.truncate(ends[3] + 7)           # record 5 cut in its header: a power loss mid-write
    book = new_store()
    three_accounts(book)
    st = recovery.replay_journal(book, journal, 0, NAMES)
    assert (st.records, st.deposits, st.withdrawals) == (4, 1, 0)
    assert balance(book, 1) == 10_350 * U                      # the withdrawal of 100 never landed


def test_open_book_provisions_a_new_book_recovers_one_and_refuses_a_journal_without_snapshot(tmp_path):
    d = str(tmp_path)
    made = []
    store = new_store()
    opened = recovery.open_book(store, d, NAMES, lambda s: made.append(three_accounts(s)))
    assert not opened.recovered and len(made) == 1 and int(store.partitions["n_accounts"].sum()) == 3
    recovery.rebase(store, d, NAMES, 1, 0)                            # generation 1 not written yet: its start
    write_journal(journal_file(d, 1))

    again = new_store()
    opened = recovery.open_book(again, d, NAMES, lambda s: made.append(1))
    assert opened.recovered and len(made) == 1                 # not provisioned again
    assert (opened.snapshot_accounts, opened.replay.records, opened.replay.generations) == (3, 5, 1)
    # the fills stream's last number: record 3 is the batch numbered 4..5 (4 skipped)
    assert opened.fills_last_seq == 5
    assert balance(again, 3) == 11_000 * U

    os.remove(os.path.join(d, recovery.SNAPSHOT_FILE))
    with pytest.raises(recovery.RecoveryError, match="no state.snapshot beside it.*--fresh"):
        recovery.open_book(new_store(), d, NAMES, lambda s: made.append(1))
    moved = recovery.set_aside(d)
    assert [os.path.basename(m).split(".set-aside-")[0] for m in moved] == ["journal-00000001.log"]
    assert all(os.path.exists(m) for m in moved)               # renamed, not deleted
    assert not recovery.open_book(new_store(), d, NAMES, lambda s: made.append(1)).recovered and len(made) == 2


def test_a_snapshot_refuses_a_configuration_that_changes_what_units_mean(tmp_path):
    snap = str(tmp_path / "state.snapshot")
    store = new_store()
    three_accounts(store)
    recovery.write_snapshot(store, snap, len(MAGIC), NAMES)
    cfg = load_default()
    btc = dataclasses.replace(cfg.instruments[0], qty_scale=100)
    changed = dataclasses.replace(cfg, instruments=(btc, *cfg.instruments[1:]))
    with pytest.raises(recovery.RecoveryError, match="instruments BTCUSDT: qty_scale is 100 in the "
                                                     "configuration, 1000 in the snapshot"):
        recovery.load_snapshot(new_store(changed), snap, NAMES)


@pytest.mark.parametrize("damage", ["truncated", "bit-flip", "not-a-snapshot"])
def test_a_damaged_snapshot_is_a_clear_error_and_loads_nothing(tmp_path, damage):
    snap = str(tmp_path / "state.snapshot")
    store = new_store()
    three_accounts(store)
    size = recovery.write_snapshot(store, snap, len(MAGIC), NAMES)
    data = bytearray(open(snap, "rb").read())
    if damage == "truncated":
        data = data[: size // 2]
    elif damage == "bit-flip":            # inside the accounts member: its CRC-32 no longer matches
        at = data.index(b"accounts.npy") + 200
        data[at] ^= 0x01
    else:
        data = b"hello"
    open(snap, "wb").write(bytes(data))
    book = new_store()
    with pytest.raises(recovery.RecoveryError, match="not a readable snapshot"):
        recovery.load_snapshot(book, snap, NAMES)
    assert int(book.partitions["n_accounts"].sum()) == 0


def _durable_engine_of_two_accounts(start_engine):
    """A running engine (one worker) whose accounts 1 and 2 hold 100,000 USDT each,
    durable as `margin-engine run` makes it (it takes snapshots)."""
    def two_accounts(store):
        for acct in (1, 2):
            store.set_balance(store.add_account(acct), USDT, 100_000 * U)

    run = start_engine(two_accounts)
    run.engine.durable = True
    return run


# --------------------------------------------------------------------------- the cut, live
def test_a_cut_the_rings_cannot_drain_for_is_refused_and_intake_resumes(start_engine, monkeypatch):
    """A snapshot while running needs the rings drained (the book must hold exactly the
    journal). With the only worker stopped (SIGSTOP) and a fill waiting in its ring, the
    gateway refuses the cut after its 1 s drain timeout, nothing is written, and intake
    resumes: a fill sent after the refusal is taken and, once the worker runs again,
    applied with the first. Then a cut on the idle engine is written at the journal's end,
    and the copy's buffers are freed once written (the supervisor keeps no second book)."""
    import gc
    import signal
    import weakref

    made = []                                     # weak references to each cut's buffers
    real_buffers = recovery.book_buffers

    def book_buffers(store, *args):
        bufs = real_buffers(store, *args)
        made.append([weakref.ref(b) for b in bufs])
        return bufs

    monkeypatch.setattr(recovery, "book_buffers", book_buffers)
    import threading
    import time

    from engine.runtime.harness import wait_until
    from runtime_support import fill, position

    run = _durable_engine_of_two_accounts(start_engine)
    eng = run.engine
    worker = eng.worker_pid(0)
    os.kill(worker, signal.SIGSTOP)
    try:
        run.client.send_fills([fill(1, 1, 2, 10, 950_000)])          # 1 buys 0.01 BTC: stuck in the ring
        wait_until(lambda: not run.idle(), 5.0, "the fill routed into the stopped worker's ring")
        t0 = time.monotonic()
        # A deposit that arrives while the gateway waits for the cut is held, not pushed
        # (the book at the cut must hold exactly the journal), and applied after it.
        deposit = threading.Timer(0.3, run.client.request, (MsgType.DEPOSIT, {
            "request_id": 31, "account": 1, "asset": "USDT", "amount_units": 500 * U}))
        deposit.start()
        info = eng.snapshot_now(timeout_s=5.0)
        deposit.join()
        assert info["result"] == "refused" and info["offset"] == -1, info
        assert 1.0 <= time.monotonic() - t0 < 5.0                   # the gateway's drain timeout
        run.client.send_fills([fill(2, 1, 2, 20, 950_000)])          # after the refused cut
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_until(lambda: position(run.store, 1)[0] == 30, 5.0, "both fills applied (10 + 20 units)")
    # 100,000 + 500 USDT: the held deposit applied once the cut ended (the fills' cost is
    # in the position, not the balance)
    assert run.client.reply().fields == {"request_id": 31, "code": 0, "balance_units": 100_500 * U}
    assert not os.path.exists(os.path.join(eng.state_dir, recovery.SNAPSHOT_FILE))

    first = eng.journal_path
    info = eng.snapshot_now()
    assert info["result"] == "written", info
    eng._writer.join()
    gc.collect()
    assert len(made) == 2 and all(r() is None for refs in made for r in refs)   # both cuts' freed
    snap = os.path.join(eng.state_dir, recovery.SNAPSHOT_FILE)
    # the gateway went on in generation 2 and the snapshot points to its start; both
    # fills records and the deposit (journaled once applied; seq 0) are in generation 1
    assert (info["generation"], info["offset"]) == (2, len(MAGIC))
    assert eng.journal_path == journal_file(eng.state_dir, 2) and os.path.getsize(eng.journal_path) == len(MAGIC)
    assert [r.first_seq for r in replay(first)] == [1, 2, 0]
    book = new_store()
    meta = recovery.load_snapshot(book, snap, NAMES)
    assert (meta["journal_generation"], meta["journal_offset"]) == (2, len(MAGIC))
    assert position(book, 1) == (30, 30 * 95_000 * U // 1000)       # 0.03 BTC at 95,000 = 2,850 USDT
    assert int(book.accounts[book.row_of(1)]["balance"][USDT]) == 100_500 * U


def test_replay_runs_from_the_snapshots_generation_through_every_later_one(tmp_path):
    """The five records split over two journal files (records 1-3 in generation 1, 4-5 in
    generation 2, as a cut between them would leave them), a snapshot taken after record
    1 (generation 1, the offset after it), and an older generation 0 file that must be
    ignored: the chain replays records 2-5 and gives the book of the whole journal."""
    d = str(tmp_path)
    whole_journal = str(tmp_path / "whole.log")
    ends = write_journal(whole_journal)
    data = open(whole_journal, "rb").read()
    open(journal_file(d, 1), "wb").write(data[: ends[2]])
    open(journal_file(d, 2), "wb").write(MAGIC + data[ends[2]:])
    open(journal_file(d, 0), "wb").write(data)                       # before the snapshot: not replayed
    whole = new_store()
    three_accounts(whole)
    recovery.replay_journal(whole, whole_journal, 0, NAMES)

    recovery.write_snapshot(book_after_first_record(tmp_path, whole_journal, ends[0]),
                            os.path.join(d, recovery.SNAPSHOT_FILE), ends[0], NAMES, 1)

    book = new_store()
    opened = recovery.open_book(book, d, NAMES, lambda s: pytest.fail("provisioned"))
    assert (opened.replay.records, opened.replay.generations) == (4, 2)
    assert_same_book(whole, book)


def test_a_snapshot_that_cannot_be_written_leaves_the_previous_one_and_no_litter(tmp_path):
    """A real write failure: a child process limited to 64 KiB files (RLIMIT_FSIZE, so
    write(2) fails with EFBIG) writes a snapshot of 2,000 accounts (~770 KB). It gets
    an OSError; the snapshot written before is untouched and no temporary file is left."""
    import subprocess
    import sys
    import textwrap

    snap = tmp_path / "state.snapshot"
    small = new_store()
    three_accounts(small)
    recovery.write_snapshot(small, str(snap), len(MAGIC), NAMES)
    before = snap.read_bytes()
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_recovery as t
        from engine.runtime import recovery
        big = t.Store.create(None, assets=list(t.load_default().assets),
                             instruments=list(t.load_default().instruments),
                             accounts_capacity=4000, n_partitions=2, slots_per_account=8)
        for a in range(1, 2001):
            big.add_account(a)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            recovery.write_snapshot(big, {str(snap)!r}, 8, t.NAMES)
        except OSError as e:
            print("OSError", e.errno)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "OSError 27", (r.stdout, r.stderr)        # EFBIG
    assert snap.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.snapshot"]


# --------------------------------------------------------------------------- fast replay
# The replay's fast path (C parser, numpy routing, one kernel call per chunk) against the
# reference path (every record decoded and routed in Python): the same book, the same
# counts, on random journals mixing what the gateway journals -- single fills and batches
# (some overlapping numbers already seen), fills the routing rule rejects (unknown
# account or instrument, zero quantity, price <= 0), fills the kernel rejects (slots
# full), collateral records, and a frame only the reference decoder takes.
fast_fill = st.fixed_dictionaries({
    "taker": st.sampled_from([1, 2, 3, 99]), "maker": st.sampled_from([1, 2, 3]),
    "instrument": st.sampled_from([0, 0, 0, 1, 2, 999]), "qty": st.sampled_from([10, -10, 500, -700, 0, -2**63]),
    "price": st.sampled_from([950_000, 960_000, 1, 0, -5]), "fee": st.integers(-3 * U, 3 * U)})
fast_record = st.one_of(
    st.tuples(st.just("batch"), st.lists(fast_fill, min_size=1, max_size=6), st.integers(0, 7)),
    st.tuples(st.just("single"), fast_fill, st.just(0)),
    st.tuples(st.just("duplicate_key"), fast_fill, st.just(0)),
    st.tuples(st.sampled_from(["deposit", "withdrawal"]), st.integers(1, 3), st.integers(1, 500 * U)))


def _fill_body(k: int, f: dict) -> dict:
    return {"trade_id": k, "instrument_id": f["instrument"], "maker_account": f["maker"],
            "taker_account": f["taker"], "qty_units": f["qty"], "price_units": f["price"],
            "maker_fee_units": -f["fee"] // 2, "taker_fee_units": f["fee"],
            "taker_side": "buy" if f["qty"] >= 0 else "sell"}


def replay_both_ways(path: str, records: list, slots: int = 8,
                     stats_out: list | None = None) -> tuple[Store, Store]:
    """Write ``records`` (``fast_record``'s shapes) as a journal at ``path``, replay it
    fast and by the reference path into two new books; assert equal counts; return both
    (and the two replays' stats in ``stats_out``)."""
    import msgpack
    j = Journal(path, fsync_interval_s=0)
    seq = 1
    for kind, a, b in records:
        if kind == "batch":
            fills = [_fill_body(seq + i, f) for i, f in enumerate(a)]
            skip = min(b, len(fills) - 1)              # the gateway journals the new ones only
            j.append(seq + skip, 1, encode_batch(MsgType.FILL, fills, first_seq=seq, ts_ns=1))
            seq += len(fills)
        elif kind == "single":
            j.append(seq, 1, encode(MsgType.FILL, _fill_body(seq, a), seq=seq, ts_ns=1))
            seq += 1
        elif kind == "duplicate_key":                  # 14 pairs, "price_units" twice: the C
            body = _fill_body(seq, a)                  # parser leaves it, the reference keeps the last
            pairs = [("v", 1), ("t", int(MsgType.FILL)), ("seq", seq), ("ts_ns", 1), ("price_units", 7)]
            pairs += list(body.items())
            frame = bytes([0xde, 0, len(pairs)]) + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)
            j.append(seq, 1, frame)
            seq += 1
        else:
            j.append(0, 1, collateral(MsgType.DEPOSIT if kind == "deposit" else MsgType.WITHDRAWAL, 1, a, b))
    j.close()
    books, stats = [], []
    for fast in (True, False):
        book = new_store(slots=slots)
        three_accounts(book)
        stats.append(recovery.replay_journal(book, path, 0, NAMES, fast=fast))
        books.append(book)
    f, r = stats
    for key in ("records", "fills", "fills_rejected", "legs_rejected", "deposits", "withdrawals", "unreadable",
                "fills_last_seq", "reject_codes"):
        assert getattr(f, key) == getattr(r, key), key
    os.remove(path)
    if stats_out is not None:
        stats_out.extend(stats)
    return books[0], books[1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(fast_record, min_size=1, max_size=25))
def test_the_fast_replay_gives_the_reference_replays_book_and_counts(tmp_path, records):
    path = str(tmp_path / f"j-{hash(repr(records)) & 0xffffff}.log")
    if os.path.exists(path):
        os.remove(path)
    assert_same_book(*replay_both_ways(path, records))


def test_the_fast_replay_keeps_the_journals_order_across_the_two_paths(tmp_path):
    # One position slot an account. 1. (fast) 1 buys 0.5 BTC from 2; 2. (reference path)
    # 3 buys 0.01 of instrument 1 from 2 (2's leg refused, 3007: its slot holds BTC);
    # 3. (fast) 3 buys 0.01 of instrument 2 from 1 (both legs refused: 3's slot holds
    # instrument 1, 1's BTC); 4. a deposit. Had record 3 been applied before record 2,
    # account 3 would hold instrument 2 instead.
    recs = [("single", {"taker": 1, "maker": 2, "instrument": 0, "qty": 500, "price": 950_000, "fee": 0}, 0),
            ("duplicate_key", {"taker": 3, "maker": 2, "instrument": 1, "qty": 10, "price": 30_000, "fee": 0}, 0),
            ("single", {"taker": 3, "maker": 1, "instrument": 2, "qty": 10, "price": 2_000, "fee": 0}, 0),
            ("deposit", 1, 5 * U)]
    fast, ref = replay_both_ways(str(tmp_path / "order.log"), recs, slots=1)
    assert_same_book(fast, ref)
    held = {a: [int(x) for x in fast.slots(fast.row_of(a))[: int(fast.accounts[fast.row_of(a)]["n_positions"])]
                ["instrument"]] for a in (1, 2, 3)}
    assert held == {1: [BTC], 2: [BTC], 3: [1]}


def test_a_fill_of_int64_min_is_refused_by_both_replays(tmp_path):
    """qty_units -2**63 decodes (it is an int64), but the maker's leg, its negation, is
    not one: the gateway refuses it (3005) and so does the replay, on the C parser's path
    (a plain frame) and the reference decoder's (a map16 with a duplicate key). It used
    to crash both: OverflowError in the ring push, and in the replay's int64 arrays."""
    huge = {"taker": 1, "maker": 2, "instrument": 0, "qty": -2**63, "price": 950_000, "fee": 0}
    stats = []
    fast, ref = replay_both_ways(str(tmp_path / "min.log"), [("single", huge, 0), ("duplicate_key", huge, 0),
                                                             ("deposit", 1, 5 * U)], stats_out=stats)
    assert_same_book(fast, ref)
    assert int(fast.accounts[fast.row_of(1)]["n_positions"]) == 0
    assert stats[0].reject_codes == {int(Code.FILL_BAD_QTY): 2} and stats[0].deposits == 1


def test_replay_keeps_each_fills_streams_numbering_and_reads_format_1_files(tmp_path):
    import struct
    # Format 2: a PULL-stream frame (seqs 1..2), a frame of DEALER "ME-1" (seqs 7..9,
    # journaled from 8: 7 was seen), a deposit. The PULL stream's last is 2, ME-1's 9.
    j2 = str(tmp_path / "v2.log")
    j = Journal(j2, fsync_interval_s=0)
    j.append(1, 1, encode_batch(MsgType.FILL, [fill(1, 1, 2, 10, 950_000), fill(2, 1, 2, 10, 950_000)],
                                first_seq=1, ts_ns=1))
    j.append(8, 2, encode_batch(MsgType.FILL, [fill(3, 3, 2, 10, 950_000)] * 3, first_seq=7, ts_ns=2), b"ME-1")
    j.append(0, 3, collateral(MsgType.DEPOSIT, 7, 3, 1_000 * U))
    j.close()
    assert [r.stream for r in replay(j2)] == [b"", b"ME-1", b""]
    book = new_store()
    three_accounts(book)
    st = recovery.replay_journal(book, j2, 0, NAMES)
    assert (st.fills_last_seq, st.stream_last) == (2, {b"ME-1": 9})
    assert position(book, 3)[0] == 20                 # ME-1's frame: 2 of its 3 fills (8, 9) applied
    # Format 1 (before session 15): the same records without stream fields, read as the
    # PULL stream's; a format-1 file is never appended to.
    j1 = str(tmp_path / "v1.log")
    with open(j1, "wb") as f:
        f.write(b"MEJRNL01")
        for r in replay(j2):
            f.write(struct.pack("<IQq", len(r.frame), r.first_seq, r.recv_ns) + r.frame)
    assert [(r.first_seq, r.stream) for r in replay(j1)] == [(1, b""), (8, b""), (0, b"")]
    old = new_store()
    three_accounts(old)
    st1 = recovery.replay_journal(old, j1, 0, NAMES)
    assert (st1.fills_last_seq, st1.stream_last) == (9, {})
    assert_same_book(book, old)
    with pytest.raises(ValueError, match="format MEJRNL02"):
        Journal(j1)


def test_durability_says_what_a_restart_would_replay(tmp_path):
    # Generation 1: the module's five records; a snapshot after its first two records;
    # generation 2: one more fill. A restart would replay the rest of 1 and all of 2.
    d = str(tmp_path)
    ends = write_journal(journal_file(d, 1))
    store = new_store()
    three_accounts(store)
    recovery.write_snapshot(store, os.path.join(d, recovery.SNAPSHOT_FILE), ends[1], NAMES, 1, 3)
    j = Journal(journal_file(d, 2), fsync_interval_s=0)
    j.append(6, 1, encode(MsgType.FILL, fill(6, 1, 2, 10, 950_000), seq=6, ts_ns=1))
    j.close()
    end2 = os.path.getsize(journal_file(d, 2))
    out = recovery.durability(d)
    s = out["snapshot"]
    assert (s["accounts"], s["journal_generation"], s["journal_offset"], s["fills_last_seq"]) == (3, 1, ends[1], 3)
    assert (s["acknowledged_streams"], s["transfers_remembered"]) == (0, 0)
    # bytes: generation 1 from the snapshot's offset to its end, generation 2 past its header
    assert out["journal"] == {"generations": [1, 2], "to_replay_files": 2,
                              "to_replay_bytes": (ends[-1] - ends[1]) + (end2 - len(MAGIC))}
    os.remove(os.path.join(d, recovery.SNAPSHOT_FILE))
    assert recovery.durability(d)["snapshot"] is None          # then everything would replay
    assert recovery.durability(d)["journal"]["to_replay_bytes"] == (ends[-1] - len(MAGIC)) + (end2 - len(MAGIC))


def test_a_long_replay_shows_a_bar_of_the_bytes_and_a_short_one_nothing(tmp_path):
    import io
    from engine.runtime.progress import ProgressBar
    path = str(tmp_path / "bar.log")
    ends = write_journal(path)
    book = new_store()
    three_accounts(book)
    out = io.StringIO()
    bar = ProgressBar("replaying the journal", ends[-1] - len(MAGIC), unit="B", stream=out)
    recovery.replay_journal(book, path, 0, NAMES, progress=bar)
    # the five records end exactly at the file's end: the last redraw says total/total
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert last.endswith(f"{ends[-1] - len(MAGIC):,}/{ends[-1] - len(MAGIC):,} B") and "#" * 30 in last
    assert out.getvalue().endswith("\n")
    quiet = io.StringIO()                      # under min_total: nothing at all
    small = ProgressBar("replaying the journal", 100, min_total=64 << 20, stream=quiet)
    small.update(50)
    small.update(100)
    small.close()
    assert quiet.getvalue() == ""


def test_a_journal_file_whose_header_was_cut_short_holds_no_records(tmp_path):
    """A cut started generation 2 and the snapshot points at its start (byte 8), but a
    crash or a full disk left its file with 3 bytes of the 8-byte header. That file
    holds no records: the restart recovers (it refused, "shorter than the snapshot's
    offset", and a replay raised "not a margin-engine journal" on every start), and the
    gateway's next open writes the header again."""
    d = str(tmp_path)
    book = new_store()
    three_accounts(book)
    recovery.write_snapshot(book, os.path.join(d, recovery.SNAPSHOT_FILE), len(MAGIC), NAMES, 2)
    cut = journal_file(d, 2)
    open(cut, "wb").write(MAGIC[:3])
    assert list(replay(cut)) == []
    again = new_store()
    opened = recovery.open_book(again, d, NAMES, lambda s: pytest.fail("a new book instead of the recovered one"))
    assert opened.recovered and opened.replay.records == 0
    assert int(again.partitions["n_accounts"].sum()) == int(book.partitions["n_accounts"].sum())
    Journal(cut, fsync_interval_s=0).close()
    assert open(cut, "rb").read() == MAGIC


def test_a_stop_that_must_kill_a_worker_writes_no_snapshot_and_the_journal_has_the_rest(start_engine):
    """A clean stop writes a snapshot at the journal's end only when the book holds
    exactly the journal (every process exited 0, every ring drained). With the worker
    stopped (SIGSTOP) and a fill waiting in its ring, the stop's timeout (1 s here) ends
    in SIGKILL: nothing is written, the last snapshot stays, and a restart replays the
    fill from the journal after it -- 0.01 BTC (10 units) for account 1."""
    import signal

    from engine.runtime.harness import wait_until
    from runtime_support import fill, position

    run = _durable_engine_of_two_accounts(start_engine)
    eng = run.engine
    info = eng.snapshot_now()                                   # the last snapshot: generation 2's start
    assert info["result"] == "written", info
    eng._writer.join()
    snap = os.path.join(eng.state_dir, recovery.SNAPSHOT_FILE)
    written = open(snap, "rb").read()
    os.kill(eng.worker_pid(0), signal.SIGSTOP)
    run.client.send_fills([fill(1, 1, 2, 10, 950_000)])        # journaled, stuck in the ring
    wait_until(lambda: not run.idle(), 5.0, "the fill routed into the stopped worker's ring")
    codes = eng.stop(timeout_s=1.0)
    run.le.exit_codes = codes                                   # (the fixture need not stop it again)
    assert codes["worker0"] == -signal.SIGKILL and not eng.settled(codes)
    assert open(snap, "rb").read() == written                   # not replaced by an unsettled book
    book = new_store()
    opened = recovery.open_book(book, eng.state_dir, NAMES, lambda s: pytest.fail("a new book"))
    assert opened.recovered and opened.replay.fills == 1
    assert position(book, 1)[0] == 10


def open_frame(request_id: int, account: int) -> bytes:
    return encode(MsgType.OPEN_ACCOUNT, {"request_id": request_id, "account": account}, seq=request_id, ts_ns=1)


def test_replayed_opens_take_their_deposits_and_fills_on_both_paths(tmp_path):
    """A journal that opens 100 (partition 0) and 7 (partition 1), deposits 500 USDT to
    100, then fills 100 buying 0.01 BTC (10 units) from 7 at 95,000 (price units 950,000),
    then a fill naming 5, never opened (3003). Both replay paths give one book: 100 long
    10 units at cost 0.01 x 95,000 = 950 USDT with 500 USDT; 7 short 10 units; 2 opens,
    1 fill, 1 rejected. (100 is past the dense id table of 1..3, so the fast path merges
    it into its sorted arrays.)"""
    path = str(tmp_path / "opens.log")
    j = Journal(path, fsync_interval_s=0)
    j.append(0, 1, open_frame(1, 100))
    j.append(0, 2, open_frame(2, 7))
    j.append(0, 3, collateral(MsgType.DEPOSIT, 3, 100, 500 * U))
    j.append(1, 4, encode(MsgType.FILL, fill(1, 100, 7, 10, 950_000), seq=1, ts_ns=1))
    j.append(2, 5, encode(MsgType.FILL, fill(2, 5, 7, 10, 950_000), seq=2, ts_ns=1))
    j.close()
    books = []
    for fast in (True, False):
        book = new_store()
        three_accounts(book)
        s = recovery.replay_journal(book, path, 0, NAMES, fast=fast)
        assert (s.accounts_opened, s.deposits, s.fills, s.fills_rejected, s.unreadable) == (2, 1, 1, 1, 0)
        assert position(book, 100) == (10, 950 * U) and balance(book, 100) == 500 * U
        assert position(book, 7) == (-10, -950 * U)
        books.append(book)
    assert_same_book(*books)


def test_a_journal_that_opens_more_accounts_than_the_book_holds_is_refused(tmp_path):
    """Capacity 8 over 2 partitions (4 rows each); accounts 1..3 use one row of partition 0
    (2) and two of partition 1. Opening 100, 102, 104 fills partition 0; 106 does not
    fit: the replay stops with a RecoveryError naming accounts_capacity (it counted the
    open "unreadable" and went on, losing the account's later money, before)."""
    cfg = load_default()
    book = Store.create(None, assets=list(cfg.assets), instruments=list(cfg.instruments),
                        accounts_capacity=8, n_partitions=2, slots_per_account=8)
    three_accounts(book)
    path = str(tmp_path / "full.log")
    j = Journal(path, fsync_interval_s=0)
    for k, acct in enumerate((100, 102, 104, 106)):
        j.append(0, k, open_frame(k + 1, acct))
    j.close()
    with pytest.raises(recovery.RecoveryError, match="account 106.*accounts_capacity"):
        recovery.replay_journal(book, path, 0, NAMES)
    assert [book.row_of(a) is not None for a in (100, 102, 104, 106)] == [True, True, True, False]
