"""Fill journal: every accepted fills frame, appended before any of it is applied.

File format (little-endian), documented in docs/protocol.md#journal::

    header:  8 bytes  b"MEJRNL01"
    record:  u32 length of frame | u64 first sequence number | i64 receive time (UTC ns)
             | frame (the msgpack body exactly as received: a FILL or a BATCH of FILLs)

Records are written with one ``write(2)`` on an ``O_APPEND`` descriptor, so a crash of
the gateway leaves whole records in the page cache. ``sync`` puts them on the disk
(``fdatasync``); the gateway calls it before it acknowledges anything the journal holds
(``engine.journal_sync = "ack"``: one call per burst of acknowledgements, a group
commit), and ``maybe_sync`` at least every ``fsync_interval_s`` (0: never, leave it to
the OS). ``replay`` yields the records in order and stops at a torn tail (a record cut
short by a power loss).

Files: ``journal-<generation>.log`` (8 digits) in ``engine.state_dir``, each starting
with the header. A start of ``margin-engine run`` and every snapshot taken while running
begin a new generation, so a snapshot always points to the start of a file and the
files before its generation are no longer needed to recover (archive them, or delete
them).

Besides fills frames, the gateway appends each DEPOSIT and WITHDRAWAL frame the owning
worker *applied*, once its reply is back and before the client is answered (first
sequence number 0): replaying it credits or debits the balance without deciding again.
"""

from __future__ import annotations

import os
import re
import struct
import time
from typing import Iterator, NamedTuple

MAGIC = b"MEJRNL01"
_REC = struct.Struct("<IQq")
_NAME = re.compile(r"journal-(\d{8})\.log$")


def journal_file(directory: str, generation: int) -> str:
    """The path of one generation's journal file."""
    return os.path.join(directory, f"journal-{generation:08d}.log")


def journal_generations(directory: str) -> list[int]:
    """The generations whose journal files are in ``directory``, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(directory)) if m)


def journal_record(first_seq: int, recv_ns: int, frame: bytes) -> bytes:
    """One record: header (frame length, first sequence number, receive time) + frame."""
    return _REC.pack(len(frame), first_seq, recv_ns) + frame


class JournalRecord(NamedTuple):
    first_seq: int
    recv_ns: int
    frame: bytes


class Journal:
    def __init__(self, path: str, fsync_interval_s: float = 1.0):
        self.path = path
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if new:                             # the header and the file's name on the disk
            os.write(self.fd, MAGIC)
            os.fsync(self.fd)
            dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self.fsync_interval_s = fsync_interval_s
        self._last_sync = time.monotonic()
        self.records = 0
        self.unsynced = 0                   # records written since the last sync
        self.syncs = 0

    def append(self, first_seq: int, recv_ns: int, frame: bytes) -> None:
        self.append_records(journal_record(first_seq, recv_ns, frame), 1)

    def append_records(self, records: bytes | bytearray, n: int) -> None:
        """``n`` whole records (``journal_record`` each, concatenated) in one ``write(2)``."""
        view = memoryview(records)
        while view:                          # a regular file takes it whole; be safe anyway
            view = view[os.write(self.fd, view):]
        self.records += n
        self.unsynced += n

    def rotate(self, path: str) -> None:
        """Fsync and close this file; go on in a new one at ``path`` (the next generation)."""
        syncs = self.syncs + 1
        self.close()
        self.__init__(path, self.fsync_interval_s)
        self.syncs = syncs

    def sync(self) -> None:
        """Every record written so far on the disk (``fdatasync``: the data and the file
        size, which is all an append changes); nothing to do when none is new."""
        if self.unsynced:
            os.fdatasync(self.fd)
            self.syncs += 1
            self.unsynced = 0
        self._last_sync = time.monotonic()

    def maybe_sync(self) -> None:
        if self.fsync_interval_s and time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self.sync()

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def replay(path: str, offset: int = 0) -> Iterator[JournalRecord]:
    """Records of a journal in order, from byte ``offset`` (0 or ``len(MAGIC)``: the
    first record; else a record boundary, e.g. ``os.path.getsize`` at a moment the
    gateway was not writing); stops quietly at a torn tail."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path}: not a margin-engine journal")
        if offset > len(MAGIC):
            f.seek(offset)
        while True:
            head = f.read(_REC.size)
            if len(head) < _REC.size:
                return
            n, seq, ts = _REC.unpack(head)
            frame = f.read(n)
            if len(frame) < n:
                return
            yield JournalRecord(seq, ts, frame)
