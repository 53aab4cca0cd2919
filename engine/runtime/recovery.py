"""Restart recovery: the book from its last snapshot plus the journal written after it.

    book(start) = snapshot(t0)  +  the journal's records after t0, in order

Every change to a balance or a position reaches the book through a journaled record:
fills frames (journaled by the gateway before any leg is routed) and the DEPOSIT and
WITHDRAWAL frames the owning worker applied (journaled before the client is answered).
Fill legs are applied by the same integer kernel as live (``apply_fill_legs``, auto funding
isolated positions as the workers do), after
the same routing rule (``route_reject``), so a replayed fill moves the book exactly as
it did live; a collateral record credits or debits its balance without deciding again
(the worker's margin check was made at the prices of that moment). Balances only add,
so a collateral record journaled after fills it was applied before still gives the same
book.

Stages of ``margin-engine run`` with ``durable`` state (``engine.state_dir``'s
``state.snapshot`` and journal files ``journal-<generation>.log``)::

    1. open      snapshot present: load it, replay the journal from its generation and
                 offset through every later generation (recover);
                 neither present: provision a new book; a journal without a snapshot:
                 refuse (its book is unknown), unless ``--fresh`` set both aside
    2. re-base   write a snapshot of the book just built at the start of a new journal
                 generation (the gateway's first file), so the next start replays only
                 what comes after
    3. run       every ``engine.snapshot_interval_s`` (supervisor, ``Engine.snapshot_now``)
                 a snapshot at a consistent cut: the gateway pauses fills and collateral
                 intake (order checks go on), waits until no collateral reply is pending
                 and every ring is drained, fsyncs the journal and goes on in the next
                 generation's file, which it publishes; the supervisor copies the book (``copy_book``, into buffers it keeps) and lets
                 intake resume, then writes the copy in a thread. A cut not drained
                 within 1 s is refused (nothing written, intake resumes).
    4. stop      every process exited 0 and every ring drained: the book holds exactly
                 the journal's records, so a snapshot at the latest file's end is written;
                 otherwise
                 (a crash) nothing is written and the next start replays from the last

Snapshot file: a numpy ``.npz`` (a zip whose members carry a CRC-32, checked on load)
with ``meta`` (JSON: format, layout version, journal generation and offset, the book's identity --
assets and instruments with what gives their integer units a meaning), ``partitions``,
``accounts`` and ``positions`` (the used rows, partition by partition), and ``transfers``
(the applied ``transfer_id`` window, oldest first: engine/runtime/ctl.py; absent in
snapshots written before it existed, read as empty). Written to a
temporary file, fsynced, renamed over the old one, the directory fsynced. Marks are not
in it: a restarted engine takes fresh oracle quotes.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np

from engine.accounting.fills import apply_fill_legs, route_reject
from engine.codes import Code
from engine.runtime.ctl import TRANSFER
from engine.runtime.progress import ProgressBar
from engine.runtime.journal import MAGIC, header_cut_short, journal_file, journal_generations, replay
from engine.store import layout as L
from engine.store.shm import Store, StoreError
from feeds.protocol import MsgType, Rejected, decode, decode_fills

SNAPSHOT_FILE = "state.snapshot"
SNAPSHOT_FORMAT = 1
REPLAY_LEGS_PER_CALL = 65_536       # legs gathered before one apply_fill_legs call


class RecoveryError(Exception):
    """The state on disk cannot be turned into this engine's book (message says why)."""


# --------------------------------------------------------------------------- identity
def book_identity(store: Store, asset_names: list[str]) -> dict:
    """What must not change between a snapshot and the engine loading it: the assets'
    names and unit scales, the instruments' names, kinds, settle assets, contract sizes
    and unit scales (a position's integer units mean nothing under other ones), the
    partition count (an account's partition is its id modulo it) and the slots per
    account. Tiers, haircuts and the like may change: they are risk, not units.
    ``asset_names``: the configuration's, in the store's order (the store keeps none)."""
    a, i = store.assets, store.instruments
    return {
        "assets": [[n, int(r["scale"])] for n, r in zip(asset_names, a, strict=True)],
        "instruments": [[bytes(r["name"]).rstrip(b"\0").decode(), int(r["kind"]), int(r["settle_asset"]),
                         float(r["contract_size"]), int(r["qty_scale"]), int(r["price_scale"])] for r in i],
        "n_partitions": store.n_partitions,
        "slots_per_account": store.slots_per_account,
    }


def _identity_mismatch(saved: dict, now: dict) -> str | None:
    for key in ("n_partitions", "slots_per_account"):
        if saved[key] != now[key]:
            return f"engine.{key} is {now[key]}, the snapshot's book has {saved[key]}"
    for what, fields in (("assets", ("name", "scale")),
                         ("instruments", ("name", "kind", "settle asset", "contract size", "qty_scale",
                                          "price_scale"))):
        old, new = saved[what], now[what]
        if [r[0] for r in old] != [r[0] for r in new]:
            return f"{what}: the configuration has {[r[0] for r in new]}, the snapshot {[r[0] for r in old]}"
        for o, n in zip(old, new):
            for f, x, y in zip(fields, o, n):
                if x != y:
                    return f"{what} {o[0]}: {f} is {y} in the configuration, {x} in the snapshot"
    return None


# --------------------------------------------------------------------------- snapshot
@dataclass
class BookCopy:
    """A copy of the book's durable part (``copy_book``): what a snapshot file holds."""

    partitions: np.ndarray
    accounts: np.ndarray
    positions: np.ndarray
    identity: dict
    transfers: np.ndarray = field(default_factory=lambda: np.zeros(0, TRANSFER))   # oldest first


def book_buffers(store: Store, headroom: float = 1 / 64) -> tuple[np.ndarray, np.ndarray]:
    """Account and position arrays for the used rows and ``headroom`` more (at least 1,024
    accounts; at most the capacity), every page touched: what ``copy_book`` copies into
    at a cut, so that the copy inside the intake pause does not wait on fresh pages (at
    1M accounts a copy into new memory took 0.12-0.88 s, into touched memory ~0.1 s).
    Made just before each cut and dropped once its snapshot is written, so the
    supervisor does not hold a second book between snapshots."""
    used = int(store.partitions["n_accounts"].sum())
    n = min(int(store.accounts_cap), used + max(1024, int(used * headroom)))
    acc = np.empty(n, L.ACCOUNT)
    pos = np.empty(n * store.slots_per_account, L.POSITION)
    for a in (acc, pos):
        a.view(np.uint8)[::mmap.PAGESIZE] = 0        # one store per page faults it in
    return acc, pos


def copy_book(store: Store, asset_names: list[str],
              buffers: tuple[np.ndarray, np.ndarray] | None = None,
              transfers: np.ndarray | None = None) -> BookCopy:
    """Copy every partition's used account rows, their position slots and the partition
    rows (the part of a snapshot that must be taken at the cut; writing it can follow),
    into ``buffers`` (``book_buffers``; the copy is views of them) or new arrays;
    ``transfers``: the transfer window at the cut (``Control.transfers_in_order``)."""
    counts = store.partitions["n_accounts"].astype(np.int64)
    s, total = store.slots_per_account, int(counts.sum())
    if buffers is None or len(buffers[0]) < total:  # (accounts opened since the buffers were made)
        buffers = (np.empty(total, L.ACCOUNT), np.empty(total * s, L.POSITION))
    acc, pos = buffers[0][:total], buffers[1][: total * s]
    k = 0
    for p in range(store.n_partitions):
        lo, n = store.partition_rows(p)[0], int(counts[p])
        np.copyto(acc[k: k + n], store.accounts[lo: lo + n])
        np.copyto(pos[k * s: (k + n) * s], store.positions[lo * s: (lo + n) * s])
        k += n
    return BookCopy(store.partitions.copy(), acc, pos, book_identity(store, asset_names),
                    np.zeros(0, TRANSFER) if transfers is None else transfers)


def write_book(book: BookCopy, path: str, journal_generation: int, journal_offset: int,
               fills_last_seq: int = 0, fills_streams: dict[bytes, int] | None = None) -> int:
    """Write ``book`` as the snapshot at byte ``journal_offset`` of journal generation
    ``journal_generation``, with the gateway's fills streams' last accepted sequence
    numbers at that point (the PULL stream's; each acknowledged stream's by routing id);
    return the file's size. Atomic: a reader sees the old file or the new one, whole."""
    meta = {"format": SNAPSHOT_FORMAT, "layout_version": L.LAYOUT_VERSION,
            "journal_generation": int(journal_generation), "journal_offset": int(journal_offset),
            "fills_last_seq": int(fills_last_seq),
            "fills_streams": {k.hex(): int(v) for k, v in sorted((fills_streams or {}).items())},
            "created_ns": time.time_ns(), "accounts": int(len(book.accounts)), "identity": book.identity}
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:   # owner-only
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                     partitions=book.partitions, accounts=book.accounts, positions=book.positions,
                     transfers=book.transfers)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:                    # e.g. the disk full: the old snapshot stays, no litter
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return os.path.getsize(path)


def write_snapshot(store: Store, path: str, journal_offset: int, asset_names: list[str],
                   journal_generation: int = 1, fills_last_seq: int = 0,
                   transfers: np.ndarray | None = None, fills_streams: dict[bytes, int] | None = None) -> int:
    """``write_book(copy_book(store))``: for a book nothing else is writing."""
    return write_book(copy_book(store, asset_names, transfers=transfers), path, journal_generation,
                      journal_offset, fills_last_seq, fills_streams)


def snapshot_meta(path: str) -> dict:
    """A snapshot's meta (JSON) and the size of its transfer window, without its tables;
    ``RecoveryError`` when the file cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            meta["transfers"] = len(z["transfers"]) if "transfers" in z.files else 0
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise RecoveryError(f"{path}: not a readable snapshot ({type(e).__name__}: {e})") from None
    return meta


def durability(state_dir: str) -> dict:
    """What a restart would start from now (``margin-engine status --state-dir``): the
    snapshot's age, place in the journal and contents, and the journal after it (what
    the restart would replay: files and bytes)."""
    snap = os.path.join(state_dir, SNAPSHOT_FILE)
    out: dict = {"state_dir": state_dir, "snapshot": None}
    gens = journal_generations(state_dir)
    gen, offset = (min(gens), len(MAGIC)) if gens else (0, len(MAGIC))
    if os.path.exists(snap):
        m = snapshot_meta(snap)
        gen, offset = int(m["journal_generation"]), int(m["journal_offset"])
        out["snapshot"] = {"age_s": round((time.time_ns() - int(m["created_ns"])) / 1e9, 1),
                           "accounts": int(m["accounts"]), "journal_generation": gen, "journal_offset": offset,
                           "fills_last_seq": int(m.get("fills_last_seq", 0)),
                           "acknowledged_streams": len(m.get("fills_streams", {})),
                           "transfers_remembered": int(m["transfers"]), "bytes": os.path.getsize(snap)}
    spans = replay_spans(state_dir, gen, offset)
    out["journal"] = {"generations": gens, "to_replay_files": len(spans),
                      "to_replay_bytes": sum(n for _, n in spans)}
    return out


def load_snapshot(store: Store, path: str, asset_names: list[str]) -> dict:
    """Load a snapshot into a new, empty ``store`` (same identity, capacity enough);
    return its meta. Any problem with the file: ``RecoveryError`` naming it."""
    if int(store.partitions["n_accounts"].sum()):
        raise RecoveryError("the store already holds accounts; a snapshot loads into a new one")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            parts, accts, pos = z["partitions"], z["accounts"], z["positions"]
            transfers = z["transfers"] if "transfers" in z.files else np.zeros(0, TRANSFER)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError, io.UnsupportedOperation) as e:
        raise RecoveryError(f"{path}: not a readable snapshot ({type(e).__name__}: {e})") from None
    if meta.get("format") != SNAPSHOT_FORMAT or meta.get("layout_version") != L.LAYOUT_VERSION:
        raise RecoveryError(f"{path}: snapshot format {meta.get('format')}, layout {meta.get('layout_version')}; "
                            f"this build reads format {SNAPSHOT_FORMAT}, layout {L.LAYOUT_VERSION}")
    why = _identity_mismatch(meta["identity"], book_identity(store, asset_names))
    if why:
        raise RecoveryError(f"{path}: the configuration does not match the snapshot's book: {why}")
    if parts.dtype != L.PARTITION or accts.dtype != L.ACCOUNT or pos.dtype != L.POSITION \
            or len(parts) != store.n_partitions or len(accts) != meta["accounts"] \
            or len(pos) != len(accts) * store.slots_per_account or transfers.dtype != TRANSFER:
        raise RecoveryError(f"{path}: tables do not match the snapshot's own description")
    counts = parts["n_accounts"].astype(np.int64)
    if counts.sum() != len(accts) or (counts < 0).any():
        raise RecoveryError(f"{path}: partition account counts do not add up to its accounts")
    if (counts > store.per_partition).any():
        p = int(np.argmax(counts > store.per_partition))
        raise RecoveryError(f"partition {p} of the snapshot holds {int(counts[p])} accounts, the store "
                            f"{store.per_partition} a partition: raise engine.accounts_capacity")
    s, k = store.slots_per_account, 0
    for p in range(store.n_partitions):
        n, lo = int(counts[p]), store.partition_rows(p)[0]
        a = accts[k: k + n].copy()
        a["seq"] = 0
        if n and ((a["partition"] != p).any() or (a["account_id"] % store.n_partitions != p).any()):
            raise RecoveryError(f"{path}: partition {p} holds accounts of another partition")
        store.accounts[lo: lo + n] = a
        store.positions[lo * s: (lo + n) * s] = pos[k * s: (k + n) * s]
        k += n
        row = store.partitions[p]
        for f in ("n_accounts", "fills_applied", "last_fill_seq", "fee_pool"):
            row[f] = parts[p][f]
    store._row_of = None                     # rebuilt from the rows on first use
    meta["transfers"] = transfers            # not JSON: the window's rows, oldest first
    return meta


# --------------------------------------------------------------------------- journal
@dataclass
class ReplayStats:
    """What a replay applied (``fills`` routed, their ``legs_rejected`` by the kernel,
    ``fills_rejected`` by the routing rule; collateral records applied)."""

    records: int = 0
    fills: int = 0
    fills_rejected: int = 0
    legs_rejected: int = 0
    deposits: int = 0
    withdrawals: int = 0
    accounts_opened: int = 0
    isolated_margin_moves: int = 0
    unreadable: int = 0            # records whose frame no longer decodes (never written by the gateway)
    generations: int = 0           # journal files replayed (replay_generations)
    fills_last_seq: int = 0        # the PULL stream's highest fill sequence number replayed (0: none)
    stream_last: dict = field(default_factory=dict)  # each acknowledged stream's (routing id -> seq)
    seconds: float = 0.0
    reject_codes: dict = field(default_factory=dict)
    transfers: list = field(default_factory=list)   # (transfer_id, account, amount, asset, kind), in order

    def saw(self, stream: bytes, last_seq: int) -> None:
        """A fills record of ``stream`` (empty: the PULL stream) up to ``last_seq``."""
        if stream:
            self.stream_last[stream] = max(self.stream_last.get(stream, 0), last_seq)
        else:
            self.fills_last_seq = max(self.fills_last_seq, last_seq)


class _FillChunks:
    """The replay's fast path for fills frames: each well-formed FILL / BATCH frame is
    parsed in C (``_wire.FillIntake.parse``, the gateway's own parser), its fills after
    those already seen gathered into a chunk, and each chunk routed with numpy by the
    gateway's rule (``route_reject``, the same checks in the same order: instrument,
    accounts, quantity, price) and applied with one ``apply_fill_legs`` call. A frame the
    C parser leaves (anything unusual) goes to the reference path, in order."""

    CHUNK = 65_536                     # fills gathered before one route-and-apply

    def __init__(self, store: Store, st: ReplayStats):
        from engine import _wire
        from engine.runtime.gateway import FILL_DTYPE
        self.store, self.st, self.ok_status = store, st, _wire.OK
        self.ids, self.rows = store.sorted_account_ids()
        self.new_accounts: list[tuple[int, int]] = []     # opened by the replay, not yet in ids
        # Ids dense enough (the usual 1..N): a row table indexed by id instead of a search.
        top = int(self.ids[-1]) if len(self.ids) else -1
        self.row_by_id = None
        if 0 <= int(self.ids[0] if len(self.ids) else 0) and top < 4 * len(self.ids) + 1024:
            self.row_by_id = np.full(top + 1, -1, np.int64)
            self.row_by_id[self.ids] = self.rows
        self.buf = np.zeros(4096, FILL_DTYPE)
        self.intake = _wire.FillIntake(self.buf, self.ids, self.rows, np.zeros((0, 2), np.uint64),
                                       np.zeros(0, np.int64), np.zeros((1, 2), np.int64),
                                       len(store.instruments), store.per_partition, 1 << 62)
        self.chunk = np.zeros(self.CHUNK + 4096, FILL_DTYPE)
        self.n = 0

    def take(self, frame: bytes, journal_first_seq: int, stream: bytes) -> bool:
        """Gather one fills frame's new fills; False: not for the fast path."""
        status, first, n = self.intake.parse(frame)           # parsed at the buffer's start
        if status != self.ok_status:
            return False
        self.st.saw(stream, first + n - 1)
        skip = min(n, max(0, journal_first_seq - first))
        self.chunk[self.n: self.n + n - skip] = self.buf[skip:n]
        self.n += n - skip
        if self.n >= self.CHUNK:
            self.flush()
        return True

    def note_account(self, account: int, row: int) -> None:
        """An account the replay opened (after ``flush``): into the dense id table, or
        with the sorted arrays merged once at the next search (``_row``)."""
        if self.row_by_id is not None and 0 <= account < len(self.row_by_id):
            self.row_by_id[account] = row
        else:
            self.row_by_id = None                  # an id past the dense table: search instead
        self.new_accounts.append((account, row))

    def _row(self, accounts: np.ndarray) -> np.ndarray:
        if self.new_accounts and self.row_by_id is None:
            new = np.array(sorted(self.new_accounts), np.int64)
            k = np.searchsorted(self.ids, new[:, 0])
            self.ids, self.rows = np.insert(self.ids, k, new[:, 0]), np.insert(self.rows, k, new[:, 1])
            self.new_accounts.clear()
        if self.row_by_id is not None:
            known = (accounts >= 0) & (accounts < len(self.row_by_id))
            return np.where(known, self.row_by_id[np.where(known, accounts, 0)], -1)
        if not len(self.ids):
            return np.full(len(accounts), -1, np.int64)
        k = np.minimum(np.searchsorted(self.ids, accounts), len(self.ids) - 1)
        return np.where(self.ids[k] == accounts, self.rows[k], -1)

    def flush(self) -> None:
        """Route and apply the gathered fills, in order."""
        if not self.n:
            return
        f, st, store = self.chunk[: self.n], self.st, self.store
        self.n = 0
        taker, maker = self._row(f["taker_account"]), self._row(f["maker_account"])
        qty, price, ins = f["qty_units"], f["price_units"], f["instrument_id"]
        code = np.select([ins >= len(store.instruments), (taker < 0) | (maker < 0), taker == maker,
                          (qty == 0) | (qty == np.iinfo(np.int64).min), price <= 0],
                         [int(Code.FILL_UNKNOWN_INSTRUMENT), int(Code.FILL_UNKNOWN_ACCOUNT),
                          int(Code.FILL_SAME_ACCOUNT), int(Code.FILL_BAD_QTY), int(Code.FILL_BAD_PRICE)], 0)
        ok = code == 0
        for c, k in zip(*np.unique(code[~ok], return_counts=True)):
            st.reject_codes[int(c)] = st.reject_codes.get(int(c), 0) + int(k)
        st.fills_rejected += int((~ok).sum())
        st.fills += int(ok.sum())
        g = f[ok]
        if not len(g):
            return

        def legs(a, b):                                       # taker's leg, then maker's
            return np.column_stack([a, b]).ravel()
        rows = legs(taker[ok], maker[ok])
        res = apply_fill_legs(store, rows, legs(g["instrument_id"], g["instrument_id"]),
                              legs(g["qty_units"], -g["qty_units"]), legs(g["price_units"], g["price_units"]),
                              legs(g["taker_fee_units"], g["maker_fee_units"]), auto_fund=True)
        bad = res.codes != Code.OK
        st.legs_rejected += int(bad.sum())
        for c in res.codes[bad].tolist():
            st.reject_codes[c] = st.reject_codes.get(c, 0) + 1
        store.partitions["fills_applied"] += np.bincount(rows // store.per_partition,
                                                         minlength=store.n_partitions).astype(np.uint64)


def _replay_isolated_margin(store: Store, row: int | None, instrument: int, amount: int) -> bool:
    """An applied ISOLATED_MARGIN again: ``amount`` from the settle balance into the
    account's isolated position in ``instrument`` (margin checks were the worker's, at
    the prices of the moment). False when there is no such position or a figure would
    leave int64 (never journaled so)."""
    k = None if row is None else store.isolated_slot(row, instrument)
    if k is None:
        return False
    settle = int(store.instruments[instrument]["settle_asset"])
    iso = int(store.slots(row)[k]["isolated_margin"]) + amount
    bal = int(store.accounts[row]["balance"][settle]) - amount
    if not (0 <= iso < 2**63 and -2**63 <= bal < 2**63):
        return False
    store.move_isolated_margin(row, k, amount)
    store.partitions["fills_applied"][row // store.per_partition] += 1     # as the worker counts it
    return True


def replay_journal(store: Store, path: str, offset: int, asset_names: list[str], *,
                   fast: bool = True, progress: ProgressBar | None = None, progress_base: int = 0) -> ReplayStats:
    """Apply the journal's records from byte ``offset`` to ``store`` (module doc).
    ``fast``: fills frames the C parser takes go through ``_FillChunks``; False: every
    record through the reference path below (the tests hold the two to each other).
    ``progress``: a bar of the bytes replayed, this file's counted from ``progress_base``."""
    st = ReplayStats()
    t0 = time.perf_counter()
    if not os.path.exists(path):
        return st
    n_ins = len(store.instruments)
    asset_index = {n: a for a, n in enumerate(asset_names)}
    row_of = store.row_of
    legs: list[list[int]] = [[], [], [], [], []]          # rows, instruments, deltas, prices, fees

    def apply_legs() -> None:
        if not legs[0]:
            return
        res = apply_fill_legs(store, *(np.asarray(c, np.int64) for c in legs), auto_fund=True)
        bad = res.codes != Code.OK
        st.legs_rejected += int(bad.sum())
        for c in res.codes[bad].tolist():
            st.reject_codes[c] = st.reject_codes.get(c, 0) + 1
        parts = np.asarray(legs[0], np.int64) // store.per_partition
        np.add.at(store.partitions["fills_applied"], parts, 1)
        for c in legs:
            c.clear()

    chunks = _FillChunks(store, st) if fast else None
    done = progress_base
    for rec in replay(path, offset):
        st.records += 1
        if progress is not None:
            done += rec.size
            progress.update(done)
        if chunks is not None:
            if chunks.take(rec.frame, rec.first_seq, rec.stream):
                continue
            chunks.flush()                                 # keep the journal's order
        run = decode_fills(rec.frame)
        if type(run) is not Rejected:
            st.saw(rec.stream, run.first_seq + len(run.fills) - 1)
            for f in run.fills[max(0, rec.first_seq - run.first_seq):]:
                taker, maker = row_of(f["taker_account"]), row_of(f["maker_account"])
                code = route_reject(f, n_ins, taker, maker)
                if code is not None:
                    st.fills_rejected += 1
                    st.reject_codes[int(code)] = st.reject_codes.get(int(code), 0) + 1
                    continue
                st.fills += 1
                for row, delta, fee in ((taker, f["qty_units"], f["taker_fee_units"]),
                                        (maker, -f["qty_units"], f["maker_fee_units"])):
                    for c, v in zip(legs, (row, f["instrument_id"], delta, f["price_units"], fee)):
                        c.append(v)
            if len(legs[0]) >= REPLAY_LEGS_PER_CALL or chunks is not None:
                apply_legs()                               # before the next fast chunk
            continue
        m = decode(rec.frame)
        if type(m) is Rejected or m.type not in (MsgType.DEPOSIT, MsgType.WITHDRAWAL, MsgType.OPEN_ACCOUNT,
                                                 MsgType.ISOLATED_MARGIN):
            st.unreadable += 1
            continue
        apply_legs()                                       # keep the journal's order
        f = m.fields
        if m.type == MsgType.OPEN_ACCOUNT:                 # journaled once its worker had opened it
            try:
                row = store.add_account(f["account"], isolated_default=f["mode"] == "isolated")
            except StoreError as e:                        # in use, or no room at this capacity
                raise RecoveryError(f"{path}: the journal opens account {f['account']}, which this book "
                                    f"cannot take ({e}); engine.accounts_capacity may not shrink "
                                    "below what the journal needs") from None
            if chunks is not None:
                chunks.note_account(f["account"], row)
            store.partitions["fills_applied"][row // store.per_partition] += 1    # as the worker counts it
            st.accounts_opened += 1
            continue
        if m.type == MsgType.ISOLATED_MARGIN:              # applied live: moved again, unchecked
            if not _replay_isolated_margin(store, row_of(f["account"]), f["instrument_id"], f["amount_units"]):
                st.unreadable += 1
                continue
            st.isolated_margin_moves += 1
            continue
        row, asset = row_of(f["account"]), asset_index.get(f["asset"])
        if row is None or asset is None:
            st.unreadable += 1
            continue
        sign = 1 if m.type == MsgType.DEPOSIT else -1
        balance = int(store.accounts[row]["balance"][asset]) + sign * f["amount_units"]
        if not -2**63 <= balance < 2**63:          # the worker refuses such a request (3102)
            st.unreadable += 1
            continue
        store.set_balance(row, asset, balance)
        if f.get("transfer_id") is not None:
            st.transfers.append((f["transfer_id"], f["account"], f["amount_units"], asset, int(m.type)))
        store.partitions["fills_applied"][row // store.per_partition] += 1
        if sign > 0:
            st.deposits += 1
        else:
            st.withdrawals += 1
    apply_legs()
    if chunks is not None:
        chunks.flush()
    st.seconds = time.perf_counter() - t0
    return st


def journal_end(path: str) -> int:
    """A journal file's size in bytes (``len(MAGIC)`` for none yet, or one whose header a
    crash or a full disk cut short: nothing to replay)."""
    if not os.path.exists(path) or header_cut_short(path):
        return len(MAGIC)
    return os.path.getsize(path)


def replay_spans(state_dir: str, generation: int, offset: int) -> list[tuple[int, int]]:
    """``(generation, record bytes)`` of each journal file a replay from ``generation``
    at byte ``offset`` reads: that one from the offset, every later one past its header."""
    out = []
    for g in journal_generations(state_dir):
        if g >= generation:
            start = max(offset, len(MAGIC)) if g == generation else len(MAGIC)
            out.append((g, max(0, journal_end(journal_file(state_dir, g)) - start)))
    return out


def replay_generations(store: Store, state_dir: str, generation: int, offset: int,
                       asset_names: list[str], show_progress: bool = False) -> ReplayStats:
    """Replay generation ``generation`` from byte ``offset``, then every later one whole;
    ``show_progress``: a bar of the bytes replayed when there are 64 MiB or more."""
    total = ReplayStats()
    t0 = time.perf_counter()
    spans = replay_spans(state_dir, generation, offset)
    bar = ProgressBar("replaying the journal", sum(n for _, n in spans),
                      min_total=64 << 20, unit="MiB", scale=1 << 20, enabled=show_progress)
    base = 0
    for g, n_bytes in spans:
        st = replay_journal(store, journal_file(state_dir, g), offset if g == generation else 0, asset_names,
                            progress=bar, progress_base=base)
        base += n_bytes
        for f in ("records", "fills", "fills_rejected", "legs_rejected", "deposits", "withdrawals",
                  "accounts_opened", "isolated_margin_moves", "unreadable"):
            setattr(total, f, getattr(total, f) + getattr(st, f))
        for c, n in st.reject_codes.items():
            total.reject_codes[c] = total.reject_codes.get(c, 0) + n
        total.saw(b"", st.fills_last_seq)
        for s, last in st.stream_last.items():
            total.saw(s, last)
        total.transfers += st.transfers
        total.generations = total.generations + 1
    bar.close()
    total.seconds = time.perf_counter() - t0
    return total


# --------------------------------------------------------------------------- start-up
@dataclass
class Opened:
    """How ``open_book`` built the book: ``recovered`` from a snapshot (its meta and the
    replay), or ``new`` (provisioned)."""

    recovered: bool
    fills_last_seq: int = 0        # the PULL fills stream's last accepted number: snapshot's or replayed
    snapshot_accounts: int = 0
    snapshot_age_s: float = 0.0
    replay: ReplayStats | None = None
    load_seconds: float = 0.0
    transfers: np.ndarray = field(default_factory=lambda: np.zeros(0, TRANSFER))   # the window, oldest first
    fills_streams: dict = field(default_factory=dict)   # acknowledged streams' last seqs: snapshot's or replayed


def open_book(store: Store, state_dir: str, asset_names: list[str], provision,
              show_progress: bool = False) -> Opened:
    """Stage 1 (module doc): recover the book into the new ``store`` from
    ``state_dir``, or call ``provision(store)`` for a new one. ``show_progress``: say so
    before loading a snapshot of 64 MiB or more, and a bar of a long replay (stderr)."""
    snap = os.path.join(state_dir, SNAPSHOT_FILE)
    gens = journal_generations(state_dir)
    if os.path.exists(snap):
        t0 = time.perf_counter()
        if show_progress and os.path.getsize(snap) >= 64 << 20:
            print(f"loading the snapshot {snap} ({os.path.getsize(snap) >> 20:,} MiB)", file=sys.stderr, flush=True)
        meta = load_snapshot(store, snap, asset_names)
        loaded = time.perf_counter() - t0
        gen, offset = int(meta.get("journal_generation", 1)), int(meta["journal_offset"])
        first = journal_file(state_dir, gen)
        if offset > journal_end(first):
            raise RecoveryError(f"{first} is {journal_end(first)} bytes, shorter than the snapshot's offset "
                                f"{offset}: it is not the journal this snapshot was taken against")
        stats = replay_generations(store, state_dir, gen, offset, asset_names, show_progress)
        last = max(int(meta.get("fills_last_seq", 0)), stats.fills_last_seq)
        replayed = np.array(stats.transfers, TRANSFER) if stats.transfers else np.zeros(0, TRANSFER)
        streams = {bytes.fromhex(k): int(v) for k, v in meta.get("fills_streams", {}).items()}
        for s, v in stats.stream_last.items():
            streams[s] = max(streams.get(s, 0), v)
        return Opened(True, last, int(meta["accounts"]), (time.time_ns() - int(meta["created_ns"])) / 1e9,
                      stats, loaded, np.concatenate([meta["transfers"], replayed]), streams)
    with_records = [journal_file(state_dir, g) for g in gens if journal_end(journal_file(state_dir, g)) > len(MAGIC)]
    if with_records:
        raise RecoveryError(f"{with_records[0]} holds records but there is no {SNAPSHOT_FILE} beside it, so the "
                            f"book they apply to is unknown; start with --fresh to set the files aside and begin "
                            f"a new book")
    provision(store)
    return Opened(False)


def rebase(store: Store, state_dir: str, asset_names: list[str], generation: int, fills_last_seq: int,
           transfers: np.ndarray | None = None, fills_streams: dict[bytes, int] | None = None) -> int:
    """Stages 2 and 4: a snapshot of ``store`` (and the transfer window) at the end of
    journal ``generation`` (its start, when the gateway has not written it yet); return
    the file's size."""
    return write_snapshot(store, os.path.join(state_dir, SNAPSHOT_FILE),
                          journal_end(journal_file(state_dir, generation)), asset_names, generation,
                          fills_last_seq, transfers, fills_streams)


def set_aside(state_dir: str) -> list[str]:
    """``--fresh``: rename the snapshot and the journal files (never delete them); return
    the new names."""
    moved = []
    suffix = time.strftime(".set-aside-%Y%m%dT%H%M%S", time.gmtime())
    names = [SNAPSHOT_FILE] + [os.path.basename(journal_file(state_dir, g)) for g in journal_generations(state_dir)]
    for name in names:
        src = os.path.join(state_dir, name)
        if os.path.exists(src):
            os.replace(src, src + suffix)
            moved.append(src + suffix)
    return moved
