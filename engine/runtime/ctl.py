"""Control segment: doorbells and per-partition command rings, in POSIX shared memory.

Beside the data store (``/NAME``) the engine keeps a small control segment
(``/NAME-ctl``)::

    header | doorbells[max_workers] | per partition: ring header, records[cap], undo area,
           outcomes[OUTCOMES] | transfers[transfer_window]

- A **doorbell** per worker (ext/doorbell.h): producers (the mark-price process on a new
  mark, the gateway on a new record) bump it; the worker sleeps on it in futex(2), or
  polls it when the wait strategy says so. Beside it the worker keeps the last sequence
  number of its LIQUIDATION_ORDER stream, so that a restarted worker goes on numbering
  where its predecessor stopped.
- A **ring** per partition: single-producer (the fills gateway) single-consumer (the
  partition's worker) queue of 64-byte records (fill legs, deposits, withdrawals, account
  opens). The
  worker commits its read index only after applying, so records not yet applied
  survive a worker crash and are taken again by its replacement.
- An **undo area** per partition: before applying a record the worker copies the
  account row, its slots and the partition's fee pool there and marks it *applying*;
  after, it marks it *idle*. A replacement that finds *applying* restores the copy (a
  half-applied record is rolled back whole) and applies the record again.
- The **outcomes** of a partition's last ``OUTCOMES`` deposits, withdrawals and opens, written
  by its worker before it commits each record (slot ``ticket % OUTCOMES``): the reply
  the worker sends can die with it after the commit, before its I/O thread sends it,
  and the gateway then takes the outcome from here instead (``Gateway.recover_lost_replies``).
- The **transfer window**: the last ``transfer_window`` DEPOSIT / WITHDRAWAL requests
  applied with a ``transfer_id`` (custody's idempotency key), in a circular table whose
  only writer is the gateway (``transfers_count`` in the header counts every one ever
  written: entry ``k`` is at slot ``k % transfer_window``). The gateway answers a retried
  id from it; a snapshot copies it at its cut, and a restart seeds it from the snapshot
  and the journal replayed after it, so the window survives restarts.
"""

from __future__ import annotations

import enum
import mmap
import os

import numpy as np
import posix_ipc

from engine import _shm
from engine.store.layout import ACCOUNT, PARTITION, POSITION, PAGE, _align

CTL_MAGIC = int.from_bytes(b"MRGNCTL\x00", "little")
CTL_VERSION = 5
OUTCOMES = 64                 # per partition: the last deposits' and withdrawals' outcomes


class Role(enum.IntEnum):
    """Singleton processes, by their slot in the header's ``ready_pid``."""

    MARKPRICE = 0
    GATEWAY = 1
    LIQGW = 2


class RecordKind(enum.IntEnum):
    FILL_LEG = 1
    DEPOSIT = 2
    WITHDRAWAL = 3
    OPEN_ACCOUNT = 4                # delta: the account id; aux: 1 isolated by default, else 0
    ISOLATED_MARGIN = 5             # delta: settle units into (> 0) or out of (< 0) the position; aux: instrument


CTL_HEADER = np.dtype([
    ("magic", "<u8"), ("version", "<u4"), ("n_workers", "<i4"), ("n_partitions", "<i4"),
    ("ring_capacity", "<i4"), ("shutdown", "<u4"), ("_pad0", "<u4"),
    ("slots_per_account", "<i4"), ("transfer_window", "<i4"),
    ("ready_pid", "<i8", (4,)),     # pid of each singleton process once its sockets are bound
    # A snapshot's consistent cut (engine/runtime/recovery.py, "snapshots while running"):
    ("cut_request", "<u8"),         # supervisor: the number of the cut it wants
    ("cut_ready", "<u8"),           # gateway: that number, once intake is paused and the rings drained
    ("cut_offset", "<i8"),          # gateway: the journal's size at the cut (-1: refused), before cut_ready
    ("cut_done", "<u8"),            # supervisor: that number, once the book is copied; intake resumes
    ("cut_generation", "<u8"),      # gateway: the journal generation it went on in (cut_offset: its start)
    ("fills_last_seq", "<u8"),      # gateway: its PULL fills stream's last accepted seq, at a cut and at exit
    ("transfers_count", "<u8"),     # gateway: transfers ever written to the window (entry k: slot k % window)
])  # 128 bytes
DOORBELL = np.dtype([("counter", "<u4"), ("waiters", "<u4"),
                     ("orders_seq", "<u8"),     # the worker's last LIQUIDATION_ORDER seq (its stream)
                     ("_pad", "<u8", (6,))])  # 64
RING_HEADER = np.dtype([
    ("write_idx", "<u8"), ("capacity", "<i8"), ("_pad0", "<i8", (6,)),
    ("read_idx", "<u8"), ("_pad1", "<i8", (7,)),
])  # 128
RECORD = np.dtype([
    ("kind", "<i4"), ("instrument", "<i4"), ("row", "<i8"), ("delta", "<i8"), ("price", "<i8"),
    ("fee", "<i8"), ("ref", "<u8"), ("ts_ns", "<i8"), ("aux", "<i8"),
])  # 64


def undo_dtype(slots: int) -> np.dtype:
    return np.dtype([("state", "<u8"), ("ref", "<u8"), ("row", "<i8"), ("_pad", "<i8", (5,)),
                     ("account", ACCOUNT), ("slots", POSITION, (slots,)),
                     ("fee_pool", "<i8", (8,))])


TRANSFER = np.dtype([
    ("transfer_id", "<u8"),         # custody's id (> 0)
    ("account", "<i8"),             # external account id
    ("amount_units", "<i8"),        # asset units, > 0
    ("asset", "<i4"),               # asset index
    ("kind", "<i4"),                # MsgType: 11 DEPOSIT, 12 WITHDRAWAL
])  # 32


UNDO_IDLE = 0
UNDO_APPLYING = 1

OUTCOME = np.dtype([
    ("ticket", "<u8"),              # the gateway's ticket (the record's ref); 0: none yet
    ("code", "<i8"),                # COLLATERAL_REPLY code
    ("balance_units", "<i8"),       # the balance after it
    ("ticket_again", "<u8"),        # written last: equal to ticket when the entry is whole
])  # 32


class Control:
    """The mapped control segment."""

    def __init__(self, name: str | None, mm: mmap.mmap):
        self.name = name
        self._mm = mm
        buf = np.frombuffer(mm, dtype=np.uint8)
        self._buf = buf
        self.header = buf[:CTL_HEADER.itemsize].view(CTL_HEADER)
        h = self.header[0]
        if int(h["magic"]) != CTL_MAGIC or int(h["version"]) != CTL_VERSION:
            raise ValueError(f"{name}: not a margin-engine control segment of version {CTL_VERSION}")
        self.n_workers = int(h["n_workers"])
        self.n_partitions = int(h["n_partitions"])
        self.capacity = int(h["ring_capacity"])
        self.slots = int(h["slots_per_account"])
        self.transfer_window = int(h["transfer_window"])
        lay = _plan(self.n_workers, self.n_partitions, self.capacity, self.slots, self.transfer_window)
        self.doorbells = buf[lay["doorbells"]: lay["doorbells"] + DOORBELL.itemsize * self.n_workers].view(DOORBELL)
        udt = undo_dtype(self.slots)
        self.rings = []
        self.records = []
        self.undo = []
        self.outcomes = []
        for p in range(self.n_partitions):
            off = lay["partitions"][p]
            self.rings.append(buf[off: off + RING_HEADER.itemsize].view(RING_HEADER))
            roff = off + RING_HEADER.itemsize
            self.records.append(buf[roff: roff + RECORD.itemsize * self.capacity].view(RECORD))
            uoff = roff + RECORD.itemsize * self.capacity
            self.undo.append(buf[uoff: uoff + udt.itemsize].view(udt))
            ooff = uoff + udt.itemsize
            self.outcomes.append(buf[ooff: ooff + OUTCOME.itemsize * OUTCOMES].view(OUTCOME))
        toff = lay["transfers"]
        self.transfers = buf[toff: toff + TRANSFER.itemsize * self.transfer_window].view(TRANSFER)

    @classmethod
    def create(cls, name: str | None, n_workers: int, n_partitions: int, slots_per_account: int,
               ring_capacity: int = 1 << 16, mode: int = 0o600, transfer_window: int = 4096) -> "Control":
        """Create a zeroed control segment (``name=None``: private, for tests)."""
        if ring_capacity & (ring_capacity - 1):
            raise ValueError("ring_capacity must be a power of two")
        if not 1 <= transfer_window < 2**31:
            raise ValueError(f"transfer_window: 1 or more transfers, got {transfer_window}")
        lay = _plan(n_workers, n_partitions, ring_capacity, slots_per_account, transfer_window)
        if name is None:
            mm = mmap.mmap(-1, lay["total"])
        else:
            try:
                posix_ipc.unlink_shared_memory(name)
            except posix_ipc.ExistentialError:
                pass
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=lay["total"])
            mm = mmap.mmap(shm.fd, lay["total"])
            os.close(shm.fd)
        hdr = np.zeros(1, CTL_HEADER)
        hdr["magic"], hdr["version"] = CTL_MAGIC, CTL_VERSION
        hdr["n_workers"], hdr["n_partitions"] = n_workers, n_partitions
        hdr["ring_capacity"], hdr["slots_per_account"] = ring_capacity, slots_per_account
        hdr["transfer_window"] = transfer_window
        mm[:CTL_HEADER.itemsize] = hdr.tobytes()
        ctl = cls(name, mm)
        for r in ctl.rings:
            r[0]["capacity"] = ring_capacity
        return ctl

    @classmethod
    def attach(cls, name: str) -> "Control":
        shm = posix_ipc.SharedMemory(name, 0)
        mm = mmap.mmap(shm.fd, shm.size)
        os.close(shm.fd)
        return cls(name, mm)

    def unlink(self) -> None:
        if self.name:
            try:
                posix_ipc.unlink_shared_memory(self.name)
            except posix_ipc.ExistentialError:
                pass

    # -------------------------------------------------------------- doorbells
    def doorbell_addr(self, worker: int) -> int:
        return self.doorbells.ctypes.data + worker * DOORBELL.itemsize

    def orders_seq_addr(self, worker: int) -> int:
        """Address of the worker's last LIQUIDATION_ORDER sequence number (its doorbell row)."""
        return self.doorbell_addr(worker) + DOORBELL.fields["orders_seq"][1]

    def ring_all(self, skip: int = -1) -> None:
        """Wake every worker but ``skip`` (new mark price, shutdown)."""
        for w in range(self.n_workers):
            if w != skip:
                _shm.doorbell_ring(self.doorbell_addr(w))

    @property
    def shutdown(self) -> bool:
        return bool(self.header[0]["shutdown"])

    def mark_ready(self, role: "Role") -> None:
        self.header[0]["ready_pid"][int(role)] = os.getpid()

    def request_shutdown(self) -> None:
        self.header[0]["shutdown"] = 1
        self.ring_all()

    # -------------------------------------------------------------- rings
    def ring_addrs(self, partition: int) -> tuple[int, int]:
        return self.rings[partition].ctypes.data, self.records[partition].ctypes.data

    def push(self, partition: int, kind: int, instrument: int, row: int, delta: int, price: int,
             fee: int, ref: int, ts_ns: int, aux: int) -> bool:
        h, r = self.ring_addrs(partition)
        return _shm.ring_push(h, r, kind, instrument, row, delta, price, fee, ref, ts_ns, aux)

    def note_outcome(self, partition: int, ticket: int, code: int, balance_units: int) -> None:
        """Worker: the outcome of the collateral record ``ticket``, before its commit."""
        e = self.outcomes[partition][ticket % OUTCOMES]
        e["ticket_again"] = 0
        e["code"], e["balance_units"] = code, balance_units
        e["ticket"] = ticket
        e["ticket_again"] = ticket

    def outcome(self, partition: int, ticket: int) -> tuple[int, int] | None:
        """Gateway: ``(code, balance_units)`` of the collateral record ``ticket`` once its
        worker committed it; None when the entry holds another ticket (or is mid-write)."""
        e = self.outcomes[partition][ticket % OUTCOMES].copy()
        if int(e["ticket"]) != ticket or int(e["ticket_again"]) != ticket:
            return None
        return int(e["code"]), int(e["balance_units"])

    def drained(self) -> bool:
        """Every partition's ring is empty and no record is half applied: the book holds
        everything routed so far."""
        for p in range(self.n_partitions):
            r, w = _shm.ring_pending(self.rings[p].ctypes.data)
            if r != w or int(self.undo[p][0]["state"]) != UNDO_IDLE:
                return False
        return True

    # -------------------------------------------------------------- transfer window
    def transfers_in_order(self) -> np.ndarray:
        """A copy of the window's transfers, oldest first."""
        count, w = int(self.header[0]["transfers_count"]), self.transfer_window
        n = min(count, w)
        slots = (np.arange(count - n, count, dtype=np.int64) % w) if n else np.zeros(0, np.int64)
        return self.transfers[slots].copy()

    def seed_transfers(self, transfers: np.ndarray) -> None:
        """Fill the window with ``transfers`` (oldest first; the newest ``transfer_window``
        kept), before the gateway starts."""
        kept = transfers[-self.transfer_window:] if len(transfers) else transfers
        self.transfers[: len(kept)] = kept
        self.header[0]["transfers_count"] = len(kept)

    def remember_transfer(self, transfer_id: int, account: int, amount_units: int, asset: int,
                          kind: int) -> int:
        """Write one applied transfer into the window (the gateway, its only writer);
        return the id it pushed out of the window (0: none)."""
        h = self.header[0]
        count, w = int(h["transfers_count"]), self.transfer_window
        slot = self.transfers[count % w]
        evicted = int(slot["transfer_id"]) if count >= w else 0
        slot["transfer_id"], slot["account"], slot["amount_units"] = transfer_id, account, amount_units
        slot["asset"], slot["kind"] = asset, kind
        h["transfers_count"] = count + 1
        return evicted

    def backlog(self, partition: int) -> int:
        r, w = _shm.ring_pending(self.rings[partition].ctypes.data)
        return int(w - r)


def _plan(n_workers: int, n_partitions: int, capacity: int, slots: int, transfer_window: int) -> dict:
    cursor = _align(CTL_HEADER.itemsize, 64)
    doorbells = cursor
    cursor = _align(cursor + DOORBELL.itemsize * n_workers, PAGE)
    parts = []
    per = _align(RING_HEADER.itemsize + RECORD.itemsize * capacity + undo_dtype(slots).itemsize
                 + OUTCOME.itemsize * OUTCOMES, PAGE)
    for _ in range(n_partitions):
        parts.append(cursor)
        cursor += per
    transfers = cursor
    cursor = _align(cursor + TRANSFER.itemsize * transfer_window, PAGE)
    return {"doorbells": doorbells, "partitions": parts, "transfers": transfers, "total": cursor}
