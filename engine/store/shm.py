"""POSIX shared-memory segment holding the engine's tables, viewed as numpy arrays.

``Store.create`` sizes, zeroes and fills a new segment; ``Store.attach`` maps an existing
one read-only or read-write after checking its magic and layout version. Writers of a
row bracket their stores with that row's seqlock (``Store.writing``); other processes
read rows with ``Store.read_account`` and friends, which copy under the seqlock.
"""

from __future__ import annotations

import mmap
import os
import time
from contextlib import contextmanager

import numpy as np
import posix_ipc

from engine import _shm
from engine.codes import Code
from engine.instruments import Asset, Instrument, Kind, MAX_TIERS
from engine.store import layout as L

INT64_MAX = 2**63 - 1


class StoreError(Exception):
    """A store operation failed; ``code`` is an engine.codes.Code (5xxx)."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code


class PricesUnreadable(StoreError):
    """A price or asset row could not be copied consistently: its writer (the mark-price
    stage) stopped inside a write, until its restart finishes it. Transient: a reader
    that can wait does (the workers), one that must answer says so (the order checks)."""


class CapacityError(StoreError):
    pass


class LayoutMismatch(StoreError):
    pass


def _segment_name(name: str) -> str:
    if not name or "/" in name.lstrip("/"):
        raise ValueError(f"shared-memory name {name!r}: one path component, like 'margin-engine'")
    return name if name.startswith("/") else "/" + name


class Store:
    """One engine's shared memory: header, assets, instruments, prices, partitions,
    accounts and positions as numpy structured arrays over a single mmap."""

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, mm: mmap.mmap, readonly: bool):
        self.name = name
        self.readonly = readonly
        self._shm = shm
        self._mm = mm
        buf = np.frombuffer(mm, dtype=np.uint8)
        if readonly:
            buf.flags.writeable = False
        self._buf = buf
        self.base_addr = buf.ctypes.data
        self.header = buf[: L.HEADER.itemsize].view(L.HEADER)[0:1]
        h = self.header[0]
        if int(h["magic"]) != L.MAGIC:
            raise LayoutMismatch(Code.STORE_LAYOUT_MISMATCH,
                                 f"{name}: not a margin-engine segment (magic {int(h['magic']):#x})")
        if int(h["layout_version"]) != L.LAYOUT_VERSION:
            raise LayoutMismatch(
                Code.STORE_LAYOUT_MISMATCH,
                f"{name}: layout version {int(h['layout_version'])}, this build reads "
                f"version {L.LAYOUT_VERSION}; restart the engine that created it with this build")
        if int(h["total_bytes"]) > len(mm):
            raise LayoutMismatch(Code.STORE_LAYOUT_MISMATCH,
                                 f"{name}: segment is {len(mm)} bytes, header says {int(h['total_bytes'])}")
        self.slots_per_account = int(h["slots_per_account"])
        self.n_partitions = int(h["n_partitions"])
        self.per_partition = int(h["per_partition"])
        self.accounts_cap = int(h["accounts_cap"])

        def section(key: str, dtype: np.dtype, count: int) -> np.ndarray:
            off = int(h[key])
            return buf[off: off + dtype.itemsize * count].view(dtype)

        self.assets = section("off_assets", L.ASSET, int(h["n_assets_cap"]))
        self.instruments = section("off_instruments", L.INSTRUMENT, int(h["n_instruments_cap"]))
        self.prices = section("off_prices", L.PRICE, int(h["n_instruments_cap"]))
        self.partitions = section("off_partitions", L.PARTITION, self.n_partitions)
        self.accounts = section("off_accounts", L.ACCOUNT, self.accounts_cap)
        self.positions = section("off_positions", L.POSITION, self.accounts_cap * self.slots_per_account)
        self._row_of: dict[int, int] | None = None
        # Base address of each table, by identity: ``addr`` is on the hot path.
        self._base = {id(t): (t.ctypes.data, t.dtype.itemsize, len(t))
                      for t in (self.assets, self.instruments, self.prices, self.partitions,
                                self.accounts, self.positions)}

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, name: str | None, *, assets: list[Asset], instruments: list[Instrument],
               accounts_capacity: int, n_partitions: int = 1, slots_per_account: int = 8,
               replace: bool = False, mode: int = 0o600) -> "Store":
        """Create, size and fill a new segment (owner-only permissions by default).

        ``replace`` unlinks a stale segment of the same name first; otherwise an existing
        one is an error. ``name=None`` makes a private store in anonymous memory with the
        same layout (for what-if evaluation, tests and benchmarks).
        """
        if not assets or len(assets) > L.MAX_ASSETS:
            raise CapacityError(Code.STORE_CAPACITY_ASSETS,
                                f"assets: 1..{L.MAX_ASSETS} collateral assets, got {len(assets)}")
        if not instruments:
            raise CapacityError(Code.STORE_CAPACITY_INSTRUMENTS, "instruments: at least one")
        if accounts_capacity < 1 or n_partitions < 1 or slots_per_account < 1:
            raise ValueError("accounts_capacity, n_partitions and slots_per_account must be >= 1")
        p = L.plan(len(assets), len(instruments), n_partitions, accounts_capacity, slots_per_account)
        if name is None:   # private: anonymous memory, same layout (what-if, tests, benches)
            mm = mmap.mmap(-1, p["total_bytes"])
            store = cls._init_segment(None, None, mm, p, assets, instruments, n_partitions,
                                      slots_per_account)
            return store
        seg = _segment_name(name)
        if replace:
            try:
                posix_ipc.unlink_shared_memory(seg)
            except posix_ipc.ExistentialError:
                pass
        try:
            shm = posix_ipc.SharedMemory(seg, posix_ipc.O_CREX, mode=mode, size=p["total_bytes"])
        except posix_ipc.ExistentialError:
            raise StoreError(Code.STORE_LAYOUT_MISMATCH,
                             f"{seg}: a segment of that name exists (another engine running? "
                             f"`margin-engine status` attaches to it; unlink it if stale)") from None
        mm = mmap.mmap(shm.fd, p["total_bytes"])
        os.close(shm.fd)
        return cls._init_segment(seg, shm, mm, p, assets, instruments, n_partitions, slots_per_account)

    @classmethod
    def _init_segment(cls, seg, shm, mm, p, assets, instruments, n_partitions, slots_per_account):
        hdr = np.zeros(1, L.HEADER)
        h = hdr[0]
        h["magic"] = L.MAGIC
        h["layout_version"] = L.LAYOUT_VERSION
        h["n_assets_cap"], h["n_instruments_cap"] = len(assets), len(instruments)
        h["n_assets"], h["n_instruments"] = len(assets), len(instruments)
        h["n_partitions"], h["slots_per_account"] = n_partitions, slots_per_account
        h["accounts_cap"], h["per_partition"] = p["accounts_cap"], p["per_partition"]
        h["created_ns"], h["total_bytes"] = time.time_ns(), p["total_bytes"]
        for key, off in p["offsets"].items():
            h[f"off_{key}"] = off
        mm[: L.HEADER.itemsize] = hdr.tobytes()
        store = cls(seg, shm, mm, readonly=False)
        store._fill_static(assets, instruments)
        return store

    @classmethod
    def attach(cls, name: str, *, readonly: bool = True) -> "Store":
        """Map an existing segment; refuse one of another layout version."""
        seg = _segment_name(name)
        try:
            shm = posix_ipc.SharedMemory(seg, 0, read_only=readonly)
        except posix_ipc.ExistentialError:
            raise StoreError(Code.STORE_LAYOUT_MISMATCH, f"{seg}: no such shared-memory segment "
                             f"(is the engine running?)") from None
        size = shm.size
        if size < L.HEADER.itemsize:
            os.close(shm.fd)
            raise LayoutMismatch(Code.STORE_LAYOUT_MISMATCH, f"{seg}: {size} bytes, too small for a header")
        mm = mmap.mmap(shm.fd, size, prot=mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(shm.fd)
        try:
            return cls(seg, shm, mm, readonly=readonly)
        except Exception:
            try:
                mm.close()
            except BufferError:
                pass  # the half-built Store's views (held by the traceback) still export it
            raise

    def detach(self) -> None:
        """Drop this process's mapping (numpy views into it must not be used after)."""
        for attr in ("header", "assets", "instruments", "prices", "partitions", "accounts",
                     "positions", "_buf"):
            self.__dict__.pop(attr, None)
        try:
            self._mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it does

    def unlink(self) -> None:
        """Remove the segment's name; the memory goes when the last process detaches."""
        if self.name is None:
            return
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ static tables
    def _fill_static(self, assets: list[Asset], instruments: list[Instrument]) -> None:
        for a in assets:
            row = self.assets[a.index]
            row["price_usd"], row["haircut"], row["scale"] = a.price_usd, a.haircut, a.scale
            row["ts_ns"] = time.time_ns()
        by_name = {i.name: i.index for i in instruments}
        asset_index = {a.name: a.index for a in assets}
        for ins in instruments:
            row = self.instruments[ins.index]
            row["kind"] = int(ins.kind)
            row["settle_asset"] = asset_index[ins.settle]
            row["underlying"] = by_name[ins.underlying] if ins.underlying else -1
            row["n_tiers"] = len(ins.tiers)
            row["is_call"] = int(ins.is_call)
            row["contract_size"] = ins.contract_size
            row["qty_scale"], row["price_scale"] = ins.qty_scale, ins.price_scale
            row["strike"], row["expiry_ns"] = ins.strike, ins.expiry_ns
            for k in range(MAX_TIERS):
                t = ins.tiers[min(k, len(ins.tiers) - 1)]
                row["tier_floor"][k] = t.floor if k < len(ins.tiers) else np.inf
                row["tier_imr"][k], row["tier_mmr"][k] = t.imr, t.mmr
                row["tier_init_amount"][k], row["tier_maint_amount"][k] = t.init_amount, t.maint_amount
            row["name"] = ins.name.encode()[:23]
            self.prices[ins.index]["mark"] = ins.mark_price
            self.prices[ins.index]["index"] = ins.mark_price
            self.prices[ins.index]["ts_ns"] = time.time_ns()

    # ------------------------------------------------------------------ addresses
    def addr(self, table: np.ndarray, row: int = 0) -> int:
        """Address of ``table[row]`` for the kernels (checked in range)."""
        base = self._base.get(id(table))
        if base is None:
            base = (table.ctypes.data, table.dtype.itemsize, len(table))
        data, size, n = base
        if not 0 <= row < n and not (row == 0 and n == 0):
            raise IndexError(f"row {row} outside table of {n}")
        return data + row * size

    def slots(self, row: int) -> np.ndarray:
        """The position slots of account row ``row`` (a view)."""
        s = self.slots_per_account
        return self.positions[row * s: (row + 1) * s]

    def partition_rows(self, p: int) -> tuple[int, int]:
        """``[start, end)`` of the account rows in use in partition ``p``."""
        start = p * self.per_partition
        return start, start + int(self.partitions[p]["n_accounts"])

    # ------------------------------------------------------------------ seqlocked access
    @contextmanager
    def writing(self, table: np.ndarray, row: int):
        """Bracket the owner's writes to ``table[row]`` with the row's seqlock."""
        if self.readonly:
            raise StoreError(Code.STORE_LAYOUT_MISMATCH, "store attached read-only")
        a = self.addr(table, row)
        _shm.write_begin(a)
        try:
            yield table[row]
        finally:
            _shm.write_end(a)

    def read(self, table: np.ndarray, row: int) -> np.void:
        """A consistent copy of ``table[row]`` taken under its seqlock."""
        out = np.zeros(1, table.dtype)
        tries = _shm.read_row(self.addr(table, row), out.view(np.uint8))
        if tries < 0:
            raise StoreError(Code.STORE_LAYOUT_MISMATCH,
                             f"row {row}: no consistent copy (its writer stopped mid-write?)")
        return out[0]

    def finish_torn_writes(self, table: np.ndarray, lo: int = 0, hi: int | None = None) -> list[int]:
        """End the seqlock writes a dead writer left open in rows ``lo <= r < hi`` of
        ``table`` (their counter odd: readers would retry on them and give up); for the
        rows' new only writer, before it writes them. Returns the rows finished."""
        rows = (lo + np.flatnonzero(table["seq"][lo:hi] & 1)).tolist()
        for r in rows:
            _shm.write_end(self.addr(table, r))
        return rows

    def read_account(self, row: int) -> tuple[np.void, np.ndarray]:
        """The account row and its used position slots, one consistent copy."""
        # Positions are covered by the account's seqlock: copy every slot (how many are
        # used is known only from the row read after them), then check the counter did
        # not move meanwhile. (Copying as many as an earlier read said returned a row of
        # two positions with one slot when a position was added in between.)
        for _ in range(1000):
            seq = int(_shm.atomic_load_u64(self.addr(self.accounts, row)))
            slots = self.slots(row).copy()
            again = self.read(self.accounts, row)
            if seq % 2 == 0 and int(again["seq"]) == seq:
                return again, slots[: int(again["n_positions"])]
        raise StoreError(Code.STORE_LAYOUT_MISMATCH, f"account row {row}: no consistent copy")

    # ------------------------------------------------------------------ accounts
    def row_of(self, account_id: int) -> int | None:
        """Row of an external account id (index built on first use, kept by add_account)."""
        if self._row_of is None:
            self._row_of = {}
            for p in range(self.n_partitions):
                lo, hi = self.partition_rows(p)
                ids = self.accounts["account_id"][lo:hi]
                self._row_of.update(zip(ids.tolist(), range(lo, hi)))
        return self._row_of.get(int(account_id))

    def note_account(self, account_id: int, row: int) -> None:
        """Another process (the partition's worker) added ``account_id`` at ``row``: keep
        this process's ``row_of`` index in step."""
        if self._row_of is not None:
            self._row_of[int(account_id)] = int(row)

    def sorted_account_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Every used row's account id, ascending, and the rows in the same order
        (int64, contiguous): the table the C paths binary-search (``_wire`` intake, the
        check desk, the journal replay)."""
        rows = np.concatenate([np.arange(*self.partition_rows(p), dtype=np.int64)
                               for p in range(self.n_partitions)])
        ids = self.accounts["account_id"][rows].astype(np.int64)
        order = np.argsort(ids, kind="stable")
        return np.ascontiguousarray(ids[order]), np.ascontiguousarray(rows[order])

    def partition_of(self, account_id: int) -> int:
        """Partition that owns an account: ``account_id mod n_partitions``."""
        return int(account_id) % self.n_partitions

    def add_account(self, account_id: int, *, isolated_default: bool = False) -> int:
        """Append an account to its partition; return its row. Full partition: CapacityError."""
        if self.row_of(account_id) is not None:
            raise StoreError(Code.STORE_CAPACITY_ACCOUNTS, f"account {account_id} exists")
        return self.append_account(account_id, isolated_default=isolated_default)

    def partition_row_of(self, account_id: int) -> int | None:
        """Row of ``account_id`` found by a scan of its own partition's ids (no index:
        for the partition's worker, which must not stop to index every partition)."""
        lo, hi = self.partition_rows(self.partition_of(account_id))
        hit = np.flatnonzero(self.accounts["account_id"][lo:hi] == int(account_id))
        return lo + int(hit[0]) if len(hit) else None

    def append_account(self, account_id: int, *, isolated_default: bool = False) -> int:
        """``add_account`` without the check that the id is new (the caller made it)."""
        p = self.partition_of(account_id)
        part = self.partitions[p]
        n = int(part["n_accounts"])
        if n >= self.per_partition:
            raise CapacityError(Code.STORE_CAPACITY_ACCOUNTS,
                                f"partition {p} is full ({self.per_partition} accounts); "
                                f"raise accounts capacity")
        row = p * self.per_partition + n
        with self.writing(self.accounts, row) as a:
            a["account_id"] = account_id
            a["partition"] = p
            a["n_positions"] = 0
            a["flags"] = int(L.AccountFlag.ISOLATED_DEFAULT) if isolated_default else 0
        with self.writing(self.partitions, p) as prow:
            prow["n_accounts"] = n + 1
        if self._row_of is not None:
            self._row_of[int(account_id)] = row
        return row

    def set_balance(self, row: int, asset: int, units: int) -> None:
        """Set a collateral balance (asset units), under the account's seqlock."""
        with self.writing(self.accounts, row) as a:
            a["balance"][asset] = units

    def isolated_slot(self, row: int, instrument: int) -> int | None:
        """Slot of the account's isolated position in ``instrument``, or None."""
        used = self.slots(row)[: int(self.accounts[row]["n_positions"])]
        hit = np.flatnonzero((used["instrument"] == instrument) & (used["mode"] == int(L.Mode.ISOLATED)))
        return int(hit[0]) if hit.size else None

    def move_isolated_margin(self, row: int, slot: int, units: int) -> None:
        """``units`` from the settle balance into the position's isolated margin (``< 0``:
        back), under the account's seqlock (it covers the slots). The caller has checked
        the rules and that both figures stay in int64."""
        settle = int(self.instruments[int(self.slots(row)[slot]["instrument"])]["settle_asset"])
        with self.writing(self.accounts, row) as a:
            a["balance"][settle] -= units
            self.slots(row)[slot]["isolated_margin"] += units

    def set_position(self, row: int, instrument: int, qty: int, cost: int, *,
                     mode: int = 0, isolated_margin: int = 0) -> int:
        """Create or replace the account's position in ``instrument``; return its slot.

        A position whose qty and cost become zero is removed (the last slot moves into its
        place, so used slots stay compact). No free slot: CapacityError. ``qty`` must be
        within +-(2**63-1) (ValueError): the fill rule never makes -2**63 (3005), and no
        int64 order could close it.
        """
        if not -INT64_MAX <= qty <= INT64_MAX:
            raise ValueError(f"position qty {qty} outside +-(2**63-1)")
        acct = self.accounts[row]
        n = int(acct["n_positions"])
        slots = self.slots(row)
        used = slots[:n]
        hit = np.flatnonzero(used["instrument"] == instrument)
        if not hit.size and n >= self.slots_per_account:       # refuse before touching the row
            raise CapacityError(Code.STORE_CAPACITY_POSITIONS,
                                f"account row {row}: all {self.slots_per_account} position slots used")
        with self.writing(self.accounts, row):
            if hit.size:
                slot = int(hit[0])
            else:
                slot = n
                acct["n_positions"] = n + 1
                n += 1
            if qty == 0 and cost == 0 and isolated_margin == 0:
                slots[slot] = slots[n - 1]
                slots[n - 1] = (0, 0, 0, 0, 0)
                acct["n_positions"] = n - 1
                return -1
            slots[slot] = (instrument, mode, qty, cost, isolated_margin)
        return slot

    # ------------------------------------------------------------------ prices
    def publish_mark(self, instrument: int, mark: float, index: float | None = None,
                     ts_ns: int | None = None, frozen: bool = False, tick_seq: int = 0) -> None:
        """Publish a mark through the price row's seqlock, then bump the global price_seq.

        ``ts_ns``: receive time of the tick that made the mark; ``tick_seq``: its sequence
        number, carried into the liquidation orders the mark causes.
        """
        _shm.publish_price(self.addr(self.prices, instrument), float(mark),
                           float(mark if index is None else index),
                           time.time_ns() if ts_ns is None else int(ts_ns),
                           L.PRICE_FROZEN if frozen else 0, int(tick_seq))
        _shm.atomic_add_u64(self.header.ctypes.data + L.HEADER.fields["price_seq"][1], 1)

    def publish_asset_price(self, asset: int, price_usd: float, ts_ns: int | None = None) -> None:
        _shm.publish_asset_price(self.addr(self.assets, asset), float(price_usd),
                                 time.time_ns() if ts_ns is None else int(ts_ns))

    def price_snapshot(self) -> "PriceSnapshot":
        """Every mark and asset price, each row copied under its seqlock."""
        n_i, n_a = len(self.instruments), len(self.assets)
        snap = PriceSnapshot(np.zeros(n_i), np.zeros(n_i, np.uint64), np.zeros(n_i, np.uint32),
                             np.zeros(L.MAX_ASSETS), np.zeros(L.MAX_ASSETS), np.ones(L.MAX_ASSETS))
        bad = _shm.snapshot_prices(self.addr(self.prices), n_i, snap.marks, snap.price_seqs, snap.flags)
        bad += _shm.snapshot_assets(self.addr(self.assets), n_a, snap.asset_px, snap.asset_haircut,
                                    snap.asset_scale)
        if bad:
            raise PricesUnreadable(Code.STORE_LAYOUT_MISMATCH, f"{bad} price rows could not be read consistently")
        return snap


class PriceSnapshot:
    """Prices as one pass sees them: marks per instrument, price and haircut per asset."""

    __slots__ = ("marks", "price_seqs", "flags", "asset_px", "asset_haircut", "asset_scale", "checked")

    def __init__(self, marks, price_seqs, flags, asset_px, asset_haircut, asset_scale):
        self.marks = marks
        self.price_seqs = price_seqs
        self.flags = flags
        self.asset_px = asset_px
        self.asset_haircut = asset_haircut
        self.asset_scale = asset_scale
        self.checked = False       # set once engine.risk.margin has validated it
