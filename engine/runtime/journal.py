"""Fill journal: every accepted fills frame, appended before any of it is applied.

File format (little-endian), documented in docs/protocol.md#journal::

    header:  8 bytes  b"MEJRNL02"
    record:  u32 length of frame | u64 first sequence number | i64 receive time (UTC ns)
             | u8 length of stream | stream (the sender's ROUTER identity on the
             acknowledged fills socket; empty: the PULL stream, or a collateral record)
             | frame (the msgpack body exactly as received: a FILL or a BATCH of FILLs)

Files of format 1 (b"MEJRNL01", written before session 15: no stream field, every record
of the PULL stream) are still read; new files are always format 2.

Records are written with one ``write(2)`` on an ``O_APPEND`` descriptor, so a crash of
the gateway leaves whole records in the page cache. ``fdatasync`` puts them on the disk,
on a thread of the journal's own (``sync_in_background``) so that the gateway's loop
goes on answering order checks meanwhile. With ``engine.journal_sync = "ack"`` the
gateway holds each acknowledgement back until the sync that covers what it acknowledges
is done (one sync covers every record written before it starts: a group commit); in
any mode it syncs at least every ``fsync_interval_s`` (0: never, leave it to the OS).
``replay`` yields the records in order and stops at a torn tail (a record cut short by
a power loss).

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

import json
import os
import re
import struct
import threading
import time
from typing import Iterator, NamedTuple

MAGIC = b"MEJRNL02"
MAGIC_V1 = b"MEJRNL01"                  # read, never written
_REC = struct.Struct("<IQqB")
_REC_V1 = struct.Struct("<IQq")
_NAME = re.compile(r"journal-(\d{8})\.log$")


def journal_file(directory: str, generation: int) -> str:
    """The path of one generation's journal file."""
    return os.path.join(directory, f"journal-{generation:08d}.log")


def journal_generations(directory: str) -> list[int]:
    """The generations whose journal files are in ``directory``, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(directory)) if m)


def journal_record(first_seq: int, recv_ns: int, frame: bytes, stream: bytes = b"") -> bytes:
    """One record: header (frame length, first sequence number, receive time, stream
    length) + stream + frame. ``stream``: the sender's ROUTER identity (1..255 bytes) on
    the acknowledged fills socket, else empty."""
    return _REC.pack(len(frame), first_seq, recv_ns, len(stream)) + stream + frame


FILLS_STREAMS_FILE = "fills-streams.json"


def write_fills_streams(directory: str, lasts: dict[bytes, int]) -> str:
    """``fills-streams.json`` in ``directory``: each acknowledged fills stream's last
    accepted sequence number, by the sender's routing id (hex). Written whole (temporary
    file, rename): a reader sees the old content or the new."""
    path = os.path.join(directory, FILLS_STREAMS_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump({k.hex(): int(v) for k, v in sorted(lasts.items())}, f)
    os.replace(tmp, path)
    return path


def read_fills_streams(path: str) -> dict[bytes, int]:
    """What ``write_fills_streams`` wrote ({} when there is no such file)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {bytes.fromhex(k): int(v) for k, v in json.load(f).items()}


class JournalRecord(NamedTuple):
    first_seq: int
    recv_ns: int
    frame: bytes
    stream: bytes = b""
    size: int = 0                       # bytes of the record in its file, header included


class Journal:
    """Appends records and knows how many of them are on the disk.

    ``written`` counts the records this object appended (across rotations), ``synced``
    how many of them an ``fdatasync`` (or the ``fsync`` of a rotation or close) has put
    on the disk. ``sync_in_background`` asks the journal's sync thread to make the two
    equal and returns at once: one ``fdatasync`` at a time, covering everything written
    when it starts (a group commit), then ``on_synced()`` is called from that thread. A
    failed ``fdatasync`` is final (the kernel may have dropped the pages: retrying
    proves nothing): the next call from the owner raises it.
    """

    def __init__(self, path: str, fsync_interval_s: float = 1.0, on_synced=None):
        self.fsync_interval_s = fsync_interval_s
        self.on_synced = on_synced
        self.sync_fn = os.fdatasync          # the sync thread's call (a test may observe it)
        self.written = self.synced = self.syncs = 0
        self._cv = threading.Condition()
        self._target: int | None = None      # a sync asked of the thread, not yet started
        self._busy = False
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None
        self._open(path)

    def _open(self, path: str) -> None:
        self.path = path
        new = not os.path.exists(path) or header_cut_short(path)
        if new and os.path.exists(path):
            os.truncate(path, 0)            # a crash (or a full disk) cut its header: start it again
        if not new:
            with open(path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:          # e.g. format 1: never appended to
                    raise ValueError(f"{path}: not a journal of format {MAGIC.decode()}; "
                                     f"the gateway writes a new generation's file")
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if new:                             # the header and the file's name on the disk
            os.write(self.fd, MAGIC)
            os.fsync(self.fd)
            dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._last_sync = time.monotonic()

    @property
    def unsynced(self) -> int:
        return self.written - self.synced

    @property
    def busy(self) -> bool:
        return self._busy

    def append(self, first_seq: int, recv_ns: int, frame: bytes, stream: bytes = b"") -> None:
        self.append_records(journal_record(first_seq, recv_ns, frame, stream), 1)

    def append_records(self, records: bytes | bytearray, n: int) -> None:
        """``n`` whole records (``journal_record`` each, concatenated) in one ``write(2)``."""
        view = memoryview(records)
        while view:                          # a regular file takes it whole; be safe anyway
            view = view[os.write(self.fd, view):]
        self.written += n

    def _raise_failed(self) -> None:
        if self._error is not None:
            raise OSError(self._error.errno, f"journal {self.path}: fdatasync failed: {self._error.strerror}")

    def sync_in_background(self) -> bool:
        """Start an ``fdatasync`` of everything written so far on the sync thread, unless
        one is running (its caller asks again when it is done) or nothing is new."""
        self._raise_failed()
        if self._busy or self.written == self.synced:
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="journal-sync", daemon=True)
            self._thread.start()
        with self._cv:
            self._busy, self._target = True, self.written
            self._cv.notify_all()
        self._last_sync = time.monotonic()
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._target is None:
                    self._cv.wait()
                target, self._target = self._target, None
            if target < 0:
                return
            try:
                self.sync_fn(self.fd)
            except OSError as e:
                self._error = e
            with self._cv:
                if self._error is None:
                    self.synced = max(self.synced, target)
                    self.syncs += 1
                self._busy = False
                self._cv.notify_all()
            if self.on_synced is not None:
                self.on_synced()

    def wait_idle(self) -> None:
        """Return once no background sync is running (then raise one that failed)."""
        with self._cv:
            while self._busy:
                self._cv.wait()
        self._raise_failed()

    def maybe_sync(self) -> None:
        """The interval's sync, in the background: records no acknowledgement forced."""
        if self.fsync_interval_s and time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self.sync_in_background()

    def _close_file(self) -> None:
        self.wait_idle()
        os.fsync(self.fd)
        os.close(self.fd)
        self.syncs += 1
        self.synced = self.written

    def rotate(self, path: str) -> None:
        """Fsync and close this file; go on in a new one at ``path`` (the next generation)."""
        self._close_file()
        self._open(path)

    def close(self) -> None:
        self._close_file()
        if self._thread is not None:
            with self._cv:
                self._target = -1
                self._cv.notify_all()
            self._thread.join(5)
            self._thread = None


def header_cut_short(path: str) -> bool:
    """The file holds less than a header, and what it holds is the header's beginning
    (empty included): created, then a crash or a full disk before its header was out."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    return len(head) < len(MAGIC) and MAGIC.startswith(head)


def replay(path: str, offset: int = 0) -> Iterator[JournalRecord]:
    """Records of a journal in order, from byte ``offset`` (0 or ``len(MAGIC)``: the
    first record; else a record boundary, e.g. ``os.path.getsize`` at a moment the
    gateway was not writing); stops quietly at a torn tail."""
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if len(magic) < len(MAGIC) and (MAGIC.startswith(magic) or MAGIC_V1.startswith(magic)):
            return                          # created, its header never (wholly) written: no records
        if magic not in (MAGIC, MAGIC_V1):
            raise ValueError(f"{path}: not a margin-engine journal")
        rec = _REC if magic == MAGIC else _REC_V1
        if offset > len(MAGIC):
            f.seek(offset)
        while True:
            head = f.read(rec.size)
            if len(head) < rec.size:
                return
            if rec is _REC:
                n, seq, ts, k = rec.unpack(head)
                stream = f.read(k)
                if len(stream) < k:
                    return
            else:
                (n, seq, ts), stream = rec.unpack(head), b""
            frame = f.read(n)
            if len(frame) < n:
                return
            yield JournalRecord(seq, ts, frame, stream, rec.size + len(stream) + n)
