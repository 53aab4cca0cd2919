"""Fills and order-check gateway.

Sockets::

    fills    PULL   (external) FILL or BATCH of FILLs from the matching engine (or ROUTER
                    with ``fills_acks``: every frame answered by ACK / REJECT)
    checks   ROUTER (external) ORDER_CHECK, DEPOSIT, WITHDRAWAL, OPEN_ACCOUNT requests -> replies
    replies  PULL   (internal) COLLATERAL_REPLY and takeover requests from the workers

A fills frame is (1) decoded and sequence-checked (a duplicate is dropped, a gap is
reported and accepted), (2) validated fill by fill (unknown account or instrument, bad
quantity or price: rejected with its code, counted and reported; the frame's other
fills go on), (3) appended to the journal, (4) split into one leg per account and
pushed onto the owning partition's ring, (5) the owning workers' doorbells rung.
Steps 1, 2 and 4 run in C (``engine._wire``, ext/_wire.pyx) for a well-formed frame;
anything else goes through the reference decoder and router in Python, which decide
the exact reject (the tests hold the two paths to each other).

An ORDER_CHECK is answered here, from a consistent copy of the account (seqlock read)
through the kernel's pre-trade entry point: no hop to a worker. The common case is one
C call (``_margin.CheckDesk``: parse, copy, rule, reply); anything else takes the
reference path (``feeds.protocol.decode``, ``pretrade_check_consistent``). Collateral
requests go to the owning worker (the account's only writer) and its reply is routed
back; a request the worker applied is appended to the journal first, so that a restart
replays it (engine/runtime/recovery.py). An OPEN_ACCOUNT goes the same way to the worker
that owns the new id's partition (it is that partition's only writer); once it is
applied the gateway adds the account to its own maps (``_note_account``), so fills and
checks for it are routed from the next frame on.

A takeover request (a worker's liquidation the market did not take,
engine/liquidation/takeover.py) is planned here -- backstop providers, the insurance
fund, auto-deleveraging -- and booked as one FILL frame of the internal takeover stream
(``TAKEOVER_STREAM``): journaled, then routed to the rings like the matching engine's
fills, so a restart replays it; one event per leg (6101-6103), 6104 when nothing took it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import msgpack
import numpy as np
import zmq

from engine import _margin, _shm, _wire
from engine.accounting.fills import route_reject
from engine.codes import Code
from engine.liquidation.takeover import (ROUTE_CODE, TAKEOVER_PREFIX, Route, TakeoverPolicy,
                                         plan as plan_takeover)
from engine.risk.margin import pretrade_check_consistent
from engine.runtime import curve, process
from engine.runtime.ctl import Control, RecordKind, Role
from engine.runtime.journal import (MAGIC, Journal, journal_file, journal_record, read_fills_streams,
                                    write_fills_streams)
from engine.store.shm import PricesUnreadable, Store
from feeds.protocol import (MAX_BATCH_MSGS, MAX_FRAME_BYTES, MsgType, Rejected, SeqStatus, Sequencer,
                            SequenceTracker, decode, decode_fills, encode_batch)

#: One parsed fill of the C path (``_wire.FillOut``): the wire's fields, then its seq.
FILL_DTYPE = np.dtype([(f, np.int64) for f in (
    "trade_id", "instrument_id", "maker_account", "taker_account", "qty_units", "price_units",
    "maker_fee_units", "taker_fee_units")] + [("seq", np.uint64)])
#: Fills a burst may buffer before it is journaled and routed (16 full batches).
FILL_BUFFER = 16 * MAX_BATCH_MSGS


# What the checks ROUTER takes; any other known type is 1010 WIRE_UNEXPECTED_TYPE, decided
# before its fields are looked at (protocol.md section 5, step 5).
CHECKS_TYPES = frozenset({MsgType.ORDER_CHECK, MsgType.DEPOSIT, MsgType.WITHDRAWAL, MsgType.OPEN_ACCOUNT,
                          MsgType.ISOLATED_MARGIN})


LOST_REPLY_AFTER_NS = 500_000_000   # a committed collateral record's reply this late: lost with its worker
SHUTDOWN_REPLIES_S = 3.0      # at shutdown: how long the workers' last collateral replies are awaited


# The internal takeover stream's name in the journal: a routing id no peer can have
# (libzmq refuses a user-set id that starts with a zero byte; its own are 5 bytes).
TAKEOVER_STREAM = b"\x00takeover"
MAX_PEERS = 4096           # per ROUTER: the answered peers remembered (numbering, envelope)
MAX_FILLS_STREAMS = 1024   # acknowledged fills streams (routing ids) tracked; a new one past it: 3009


class Peers:
    """The peers one ROUTER answers: each peer's answer numbering (its own stream, 1 per
    answer, docs/protocol.md section 3) and whether it sends REQ envelopes (its answers
    then carry the empty delimiter REQ expects).

    At most ``capacity`` peers are remembered; a new one takes the place of the peer
    heard from least recently (``forgotten`` counts them). ZeroMQ gives every connection
    of a DEALER without a routing id of its own a new random one, so without the bound a
    client that reconnects often would grow this for as long as the engine runs.

    A peer's stream begins at the microsecond clock when the gateway first answers it
    (``first = now_us + 1``), not at 1: a peer forgotten and heard again, or a client with
    a fixed routing id across an engine restart, sees its answers' numbers jump forward,
    never back (a client answered under a million times a second cannot have seen the
    new numbers), so it does not drop them as duplicates (section 6)."""

    __slots__ = ("_peers", "capacity", "forgotten")

    def __init__(self, capacity: int = MAX_PEERS):
        if capacity < 1:
            raise ValueError("a ROUTER answers at least one peer")
        self._peers: collections.OrderedDict[bytes, list] = collections.OrderedDict()  # id -> [Sequencer, req]
        self.capacity = capacity
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._peers)

    def _entry(self, ident: bytes) -> list:
        e = self._peers.get(ident)
        if e is None:
            if len(self._peers) >= self.capacity:
                self._peers.popitem(last=False)
                self.forgotten += 1
            e = self._peers[ident] = [Sequencer(time.time_ns() // 1000), False]
        return e

    def heard(self, ident: bytes, req: bool) -> None:
        """A message from ``ident`` (in a REQ envelope when ``req``): it is the most
        recently heard peer now."""
        e = self._entry(ident)
        self._peers.move_to_end(ident)
        if req:
            e[1] = True

    def seq(self, ident: bytes) -> Sequencer:
        """The numbering of the answers to ``ident``."""
        return self._entry(ident)[0]

    def is_req(self, ident: bytes) -> bool:
        e = self._peers.get(ident)
        return e is not None and e[1]


class Gateway:
    def __init__(self, name: str, fills_endpoint: str, checks_endpoint: str, replies_endpoint: str,
                 events_endpoint: str, journal_dir: str, journal_generation: int, partition_owner: list[int],
                 fills_acks: bool = False, fills_last_seq: int = 0, journal_sync: str = "ack",
                 journal_fsync_interval_s: float = 1.0, fills_streams: dict[bytes, int] | None = None,
                 takeover: TakeoverPolicy | None = None):
        self.store = Store.attach(name, readonly=False)
        self.ctl = Control.attach(name + "-ctl")
        self.owner = partition_owner                     # partition -> worker
        self.n_instruments = len(self.store.instruments)
        self.price_scales = self.store.instruments["price_scale"].tolist()
        self.asset_index = {}
        self.zctx = process.zmq_context()
        # PULL by default; with acks a ROUTER answers every fills frame (ACK / REJECT).
        self.fills_acks = fills_acks
        self.fills = self._bind(zmq.ROUTER if fills_acks else zmq.PULL, fills_endpoint, "fills")
        self.checks = self._bind(zmq.ROUTER, checks_endpoint, "checks")
        self.replies = self._bind(zmq.PULL, replies_endpoint, None)
        self.events = self.zctx.socket(zmq.PUSH)
        self.events.setsockopt(zmq.LINGER, 500)
        self.events.setsockopt(zmq.SNDHWM, 10000)
        self.events.connect(events_endpoint)
        self.seq_events = Sequencer()
        # Per ROUTER: each peer's answer numbering and envelope (bounded: ``Peers``).
        self.peers: dict[zmq.Socket, Peers] = {self.checks: Peers()}
        if fills_acks:
            self.peers[self.fills] = Peers()
        self.trackers: dict[bytes | None, SequenceTracker] = {}   # per stream (DEALER identity)
        if not fills_acks:        # one PULL stream: its numbering goes on across engine restarts
            self.trackers[None] = SequenceTracker(fills_last_seq)
        else:                     # each DEALER's, by its routing id: so do theirs
            for ident, last in (fills_streams or {}).items():
                self.trackers[ident] = SequenceTracker(last)
        self.journal_dir, self.journal_generation = journal_dir, journal_generation
        # The journal's sync thread wakes the loop through an inproc pair when a sync is done.
        self._wake_rx = self.zctx.socket(zmq.PAIR)
        wake = f"inproc://journal-synced-{id(self)}"
        self._wake_rx.bind(wake)
        self._wake_tx = self.zctx.socket(zmq.PAIR)       # used by the sync thread only
        self._wake_tx.connect(wake)
        self.journal = Journal(journal_file(journal_dir, journal_generation), journal_fsync_interval_s,
                               on_synced=lambda: self._wake_tx.send(b"", zmq.NOBLOCK))
        # "ack": an answer that acknowledges what the journal holds (a fills ACK, an
        # applied COLLATERAL_REPLY) waits until a sync has put that on the disk. Answers
        # leave in the order they were made: (journal records it needs on the disk,
        # socket, identity, type, fields).
        self.sync_before_ack = journal_sync == "ack"
        self._answers: collections.deque[tuple[int, zmq.Socket, bytes, MsgType, dict]] = collections.deque()
        # A snapshot's cut (``cut_step``): the last cut served, when the one in progress
        # began, and the collateral requests held back meanwhile.
        self._cut_served = int(self.ctl.header[0]["cut_request"])
        self._cut_since: int | None = None
        self._held: list[tuple[bytes, bytes, int]] = []
        self._parent = os.getppid()
        # Collateral requests at a worker, by the gateway's own ticket (the ring record's
        # ref: two clients may both use request_id 1): (ROUTER identity, the client's
        # request_id, request frame, receive time, the transfer it is or None). The frame
        # is journaled when the worker's reply says it was applied.
        self.pending: dict[int, tuple[bytes, int, bytes, int, tuple | None]] = {}
        self._pending_at: dict[int, tuple[int, int, int]] = {}   # ticket -> (partition, ring index, pushed ns)
        self._lost_checked_ns = 0
        # Applied transfer_ids (custody's idempotency keys) of the control segment's window
        # -> (kind, account, asset, amount); and those at a worker now -> ticket.
        self.transfers: dict[int, tuple[int, int, int, int]] = {
            int(t["transfer_id"]): (int(t["kind"]), int(t["account"]), int(t["asset"]), int(t["amount_units"]))
            for t in self.ctl.transfers_in_order()}
        self._transfers_in_flight: dict[int, int] = {}
        self._opening: dict[int, int] = {}      # ticket of an OPEN_ACCOUNT at its worker -> account id
        self._last_ticket = 0
        self.counters = collections.Counter()
        self.snap = self.store.price_snapshot()
        self._snap_ns = 0
        # Fill loop constants, resolved once: ring and doorbell addresses per partition
        # (a row's partition is row // per_partition, the store's layout: add_account).
        self._per_partition = self.store.per_partition
        self._ring_addrs = [self.ctl.ring_addrs(p) for p in range(self.ctl.n_partitions)]
        self._bell_addrs = [self.ctl.doorbell_addr(w) for w in range(self.ctl.n_workers)]
        # The C fill path's tables (engine/_wire: parse_fills, route_fills).
        if self.ctl.n_workers > 64:
            raise ValueError("the fills router marks workers in a 64-bit mask: at most 64 workers")
        self._fill_buf = np.zeros(FILL_BUFFER, FILL_DTYPE)
        self._rejects = np.zeros((FILL_BUFFER, 2), np.int64)
        self._ring_table = np.array(self._ring_addrs, dtype=np.uint64).reshape(-1, 2)
        self._owner_arr = np.array(partition_owner, dtype=np.int64)
        self._intake: _wire.FillIntake | None = None
        self._desk: _margin.CheckDesk | None = None
        self._ids: np.ndarray | None = None
        self._rows: np.ndarray | None = None
        self._new_accounts: list[tuple[int, int]] = []   # (id, row) opened since _ids was merged
        self._jbuf = bytearray()                         # the burst's journal records
        self._jrecs = 0
        self._acks: list[tuple[bytes, int]] = []         # (DEALER identity, first seq) to ACK
        # Takeovers: the policy ([liquidation]); the takeover stream numbered from the
        # microsecond clock at start, so that it goes on increasing across restarts (a
        # replay skips a stream's numbers it has seen); requests held during a cut.
        self.takeover = takeover if takeover is not None and takeover.enabled else None
        self._takeover_seq = max(time.time_ns() // 1000, (fills_streams or {}).get(TAKEOVER_STREAM, 0))
        self._takeovers_held: list[bytes] = []
        # Rows with takeover legs routed that their worker has not applied yet: row ->
        # (partition, the ring's write index after them); applied once the ring's read
        # index passes it. Plans leave them out (``takeover.plan``'s ``busy``).
        self._takeover_unapplied: dict[int, tuple[int, int]] = {}

    def _bind(self, kind: int, endpoint: str, name: str | None) -> zmq.Socket:
        """A socket bound at ``endpoint``: an external one (``name``) behind the CURVE
        allowlist over tcp when it is set, an internal one (None) plainly."""
        s = self.zctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 100_000)
        if name is None:
            s.bind(endpoint)
        else:
            curve.bind(s, endpoint, name)
        return s

    def set_asset_names(self, names: list[str]) -> None:
        self.asset_index = {n: i for i, n in enumerate(names)}

    def emit(self, code: int, detail: str, account: int | None = None) -> None:
        if not process.send_event(self.events, self.seq_events,
                                  {"code": int(code), "account": account, "detail": detail[:1000]}):
            self.counters["events_dropped"] += 1

    # ------------------------------------------------------------------ fills
    def _ack(self, ident: bytes | None, mtype: MsgType, fields: dict) -> None:
        if ident is not None:
            self._answer(self.fills, ident, mtype, fields)

    def _answer(self, sock: zmq.Socket, ident: bytes, mtype: MsgType, fields: dict) -> None:
        """Send an answer now, or hold it (``journal_sync = "ack"``) until the journal
        records written so far are on the disk; never ahead of an answer held before it."""
        need = self.journal.written if self.sync_before_ack else 0
        if self._answers or need > self.journal.synced:
            self._answers.append((need, sock, ident, mtype, fields))
            return
        self._send_answer(sock, ident, mtype, fields)

    def _send_answer(self, sock: zmq.Socket, ident: bytes, mtype: MsgType, fields: dict) -> None:
        seq = self.peers[sock].seq(ident)
        if sock is self.fills:                       # the fills stream's ACKs: the engine's own fields
            frame = seq.encode_known(mtype, fields)
        else:
            frame = seq.encode(mtype, fields)
        self._route(sock, ident, frame)

    def _peer(self, sock: zmq.Socket, parts: list[bytes]) -> bytes | None:
        """The sender's routing id of a message on the ROUTER ``sock``: ``[id, body]`` from
        a DEALER, or ``[id, b"", body]`` from a REQ socket (remembered for that socket, so
        its answers carry the empty delimiter REQ expects); None for any other shape
        (dropped, counted)."""
        if len(parts) == 2:
            self.peers[sock].heard(parts[0], False)
            return parts[0]
        if len(parts) == 3 and parts[1] == b"":
            self.peers[sock].heard(parts[0], True)
            return parts[0]
        self.counters["bad_envelopes"] += 1
        return None

    def _route(self, sock: zmq.Socket, ident: bytes, frame: bytes) -> None:
        """``frame`` to the peer ``ident`` of the ROUTER ``sock``, in its envelope."""
        sock.send_multipart([ident, b"", frame] if self.peers[sock].is_req(ident) else [ident, frame])

    def pump_answers(self) -> None:
        """Send the held answers the disk has caught up with (in order); start the next
        sync (a group commit) when some still wait."""
        answers, journal = self._answers, self.journal
        while answers and answers[0][0] <= journal.synced:
            _, sock, ident, mtype, fields = answers.popleft()
            self._send_answer(sock, ident, mtype, fields)
        if answers:
            journal.sync_in_background()

    def on_fills(self, frame: bytes, recv_ns: int, ident: bytes | None = None) -> None:
        """One fills frame, taken and flushed at once (``take_fills`` + ``flush_fills``)."""
        self.take_fills(frame, recv_ns, ident)
        self.flush_fills(recv_ns)

    def take_fills(self, frame: bytes, recv_ns: int, ident: bytes | None = None) -> None:
        """One fills frame of a burst: decode, sequence, buffer (module doc).

        A well-formed frame is parsed in C into the intake buffer and its journal record
        buffered; ``flush_fills`` then writes the burst's records with one ``write(2)``
        and only then routes its fills (journal before apply). Anything else flushes the
        burst and takes the reference decoder, which decides the exact reject.
        ``ident``: the sender's DEALER identity when the socket answers (``fills_acks``):
        ACK (code 0) once the frame is journaled and routed (and, with ``journal_sync =
        "ack"``, its record synced: ``pump_answers``), ACK 3001 for a duplicate, REJECT
        for a malformed one; fills rejected inside an accepted frame are reported as
        events.
        """
        if ident is not None and ident not in self.trackers and len(self.trackers) >= MAX_FILLS_STREAMS:
            self._refuse_new_stream(ident, frame, recv_ns)
            return
        intake = self._fill_intake()
        if not intake.room():
            self.flush_fills(recv_ns)
        status, first_seq, n = intake.parse(frame)
        fills = None
        if status != _wire.OK:
            self.flush_fills(recv_ns)                 # keep the stream's order
            run = decode_fills(frame)
            if type(run) is Rejected:
                self._reject_fills(ident, run)
                return
            first_seq, fills, n = run.first_seq, run.fills, len(run.fills)
        tracker = self.trackers.get(ident)
        if tracker is None:
            tracker = self.trackers[ident] = SequenceTracker()
        verdict = tracker.observe(first_seq, n)
        if verdict.status == SeqStatus.DUPLICATE:
            self.counters["duplicates"] += n
            if ident is not None:
                self.flush_fills(recv_ns)             # its earlier frames' ACKs go first
            self._ack(ident, MsgType.ACK, {"ref_seq": first_seq, "code": int(Code.FILL_DUPLICATE)})
            return
        if verdict.status == SeqStatus.GAP:
            self.counters["gaps"] += 1
            self.emit(Code.FILL_GAP, f"fills {verdict.gap_first}..{verdict.gap_last} missing")
        if fills is None:
            intake.take(verdict.skip)
            self._jbuf += journal_record(first_seq + verdict.skip, recv_ns, frame, ident or b"")
            self._jrecs += 1
            if ident is not None:
                self._acks.append((ident, first_seq))
            return
        self.journal.append(first_seq + verdict.skip, recv_ns, frame, ident or b"")   # before applying
        self._route_reference(fills[verdict.skip:], first_seq + verdict.skip, recv_ns)
        self._ack(ident, MsgType.ACK, {"ref_seq": first_seq, "code": 0})

    def _refuse_new_stream(self, ident: bytes, frame: bytes, recv_ns: int) -> None:
        """A fills frame from a routing id the gateway does not track while it tracks
        ``MAX_FILLS_STREAMS`` already: REJECT 3009, nothing applied or remembered (each
        tracked stream's last seq is kept for good: in every snapshot and the journal,
        so that resent frames stay duplicates). A malformed frame gets its own 1xxx code."""
        self.flush_fills(recv_ns)                     # the earlier frames' ACKs go first
        m = decode(frame, types=frozenset({MsgType.FILL, MsgType.BATCH}))
        if type(m) is not Rejected:
            m = Rejected(Code.FILL_TOO_MANY_STREAMS, f"{MAX_FILLS_STREAMS} fills streams are tracked already: "
                         "give the matching engine a fixed routing id (ZMQ_ROUTING_ID)", m.seq, int(m.type))
        self._reject_fills(ident, m)

    def _reject_fills(self, ident: bytes | None, rej: Rejected) -> None:
        """A fills frame refused whole: counted, reported as an event, and answered by a
        REJECT on an acknowledged stream (its ``ref_seq``/``ref_type`` when they fit)."""
        self.counters[f"reject_{int(rej.code)}"] += 1
        self.emit(rej.code, f"fills frame rejected: {rej.detail}")
        self._ack(ident, MsgType.REJECT, {"ref_seq": rej.ref_seq if 0 <= rej.ref_seq < 2**64 else 0,
                                          "ref_type": rej.ref_type if 0 <= rej.ref_type <= 255 else 0,
                                          "code": int(rej.code), "detail": rej.detail[:1000]})

    def _account_map(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted account ids and their rows, for the C paths (built on first use, like
        ``Store.row_of``; accounts opened since are merged in here)."""
        if self._ids is None:
            self._ids, self._rows = self.store.sorted_account_ids()
            self._new_accounts.clear()
        elif self._new_accounts:                         # opened since: one merge for all
            new = np.array(sorted(self._new_accounts), np.int64)
            k = np.searchsorted(self._ids, new[:, 0])
            self._ids, self._rows = np.insert(self._ids, k, new[:, 0]), np.insert(self._rows, k, new[:, 1])
            self._new_accounts.clear()
        return self._ids, self._rows

    def _fill_intake(self) -> _wire.FillIntake:
        """The C fills intake (built on first use)."""
        if self._intake is None:
            ids, rows = self._account_map()
            self._intake = _wire.FillIntake(self._fill_buf, ids, rows, self._ring_table, self._owner_arr,
                                            self._rejects, self.n_instruments, self._per_partition,
                                            MAX_FRAME_BYTES)
        return self._intake

    def _check_desk(self) -> _margin.CheckDesk:
        """The C order-check path (built on first use)."""
        if self._desk is None:
            st = self.store
            ids, rows = self._account_map()
            self._desk = _margin.CheckDesk(
                st.addr(st.instruments), st.addr(st.accounts), st.addr(st.positions), st.addr(st.prices),
                st.addr(st.assets), st.slots_per_account, self.n_instruments, len(st.assets), ids, rows,
                np.ascontiguousarray(st.instruments["price_scale"], dtype=np.int64), MAX_FRAME_BYTES)
        return self._desk

    def flush_fills(self, recv_ns: int) -> None:
        """Journal the burst's frames (one write), then route their fills to the rings,
        waiting while a ring is full; ring the workers; ACK the frames (acks mode)."""
        intake = self._intake
        if intake is None or (not intake.buffered and not self._jrecs):
            return
        if self._jrecs:
            self.journal.append_records(self._jbuf, self._jrecs)
            self._jbuf.clear()
            self._jrecs = 0
        workers, n_ok = 0, 0
        buf = self._fill_buf
        while intake.buffered:
            status, ok, n_rej, w = intake.route(recv_ns)
            n_ok += ok
            workers |= w
            for idx, code in self._rejects[:min(n_rej, len(self._rejects))].tolist():
                self.counters[f"reject_{code}"] += 1
                self.emit(code, f"fill {int(buf[idx]['trade_id'])} rejected")
            if status == _wire.OK:
                break
            self.counters["ring_full_waits"] += 1        # the worker is behind: wake it, wait
            self._ring_workers(workers)
            time.sleep(0.0001)
        if n_ok:
            self.counters["fills"] += n_ok
        self._ring_workers(workers)
        for ident, first_seq in self._acks:
            self._ack(ident, MsgType.ACK, {"ref_seq": first_seq, "code": 0})
        self._acks.clear()

    def _ring_workers(self, mask: int) -> None:
        w = 0
        while mask:
            if mask & 1:
                _shm.doorbell_ring(self._bell_addrs[w])
            mask >>= 1
            w += 1

    def _route_reference(self, fills: list[dict], seq0: int, recv_ns: int) -> None:
        """The routing rules in Python, for frames the C parser leaves to the reference
        decoder: per fill, ``route_reject`` (instrument, accounts, quantity, price); then
        one leg per account onto its partition's ring."""
        rings = set()
        row_of = self.store.row_of
        per, owner, addrs, n_ins = self._per_partition, self.owner, self._ring_addrs, self.n_instruments
        ring_push, leg = _shm.ring_push, int(RecordKind.FILL_LEG)
        n_ok = 0
        for k, f in enumerate(fills):
            ins = f["instrument_id"]
            qty, price = f["qty_units"], f["price_units"]
            taker, maker = row_of(f["taker_account"]), row_of(f["maker_account"])
            code = route_reject(f, n_ins, taker, maker)
            if code is not None:
                self.counters[f"reject_{int(code)}"] += 1
                self.emit(code, f"fill {f['trade_id']} rejected")
                continue
            seq, tid = seq0 + k, f["trade_id"]
            for row, delta, fee in ((taker, qty, f["taker_fee_units"]), (maker, -qty, f["maker_fee_units"])):
                p = row // per
                h, r = addrs[p]
                if not ring_push(h, r, leg, ins, row, delta, price, fee, seq, recv_ns, tid):
                    self._push(p, leg, ins, row, delta, price, fee, seq, recv_ns, tid)
                rings.add(owner[p])
            n_ok += 1
        if n_ok:
            self.counters["fills"] += n_ok
        for w in rings:
            _shm.doorbell_ring(self._bell_addrs[w])

    def _push(self, p: int, *rec) -> None:
        while not self.ctl.push(p, *rec):           # ring full: the worker is behind
            self.counters["ring_full_waits"] += 1
            _shm.doorbell_ring(self.ctl.doorbell_addr(self.owner[p]))
            time.sleep(0.0001)

    # ------------------------------------------------------------------ requests
    def on_request(self, ident: bytes, frame: bytes, recv_ns: int) -> None:
        seq = self.peers[self.checks].seq(ident)
        reply = self._check_desk().answer(frame, seq.last + 1, time.time_ns())
        if reply is not None:                                    # C path: the whole check
            seq.last += 1
            self.counters["checks"] += 1
            self._route(self.checks, ident, reply)
            return
        c = _wire.parse_order_check(frame, MAX_FRAME_BYTES)     # a check the C path left
        if c is not None:
            self._answer_check(ident, c[1], c[2], c[3], c[4], c[5], recv_ns)
            return
        m = decode(frame, types=CHECKS_TYPES)                    # reference path
        if type(m) is Rejected:
            self.counters[f"reject_{int(m.code)}"] += 1
            self._reply(ident, MsgType.REJECT, {"ref_seq": m.ref_seq, "ref_type": m.ref_type,
                                                "code": int(m.code), "detail": m.detail[:1000]})
            return
        f = m.fields
        if m.type == MsgType.ORDER_CHECK:
            self._answer_check(ident, f["request_id"], f["account"], f["instrument_id"], f["qty_units"],
                               f["price_units"], recv_ns)
        elif m.type == MsgType.OPEN_ACCOUNT:
            self._open_account(ident, frame, f, recv_ns)
        elif m.type == MsgType.ISOLATED_MARGIN:
            self._isolated_margin(ident, frame, f, recv_ns)
        else:                                                     # DEPOSIT or WITHDRAWAL (CHECKS_TYPES)
            row = self.store.row_of(f["account"])
            asset = self.asset_index.get(f["asset"])
            if row is None or asset is None:
                code = Code.FILL_UNKNOWN_ACCOUNT if row is None else Code.COLLATERAL_UNKNOWN_ASSET
                self._reply(ident, MsgType.COLLATERAL_REPLY, {"request_id": f["request_id"], "code": int(code),
                                                              "balance_units": 0})
                return
            if self._cut_since is not None:                     # a cut: applied after it
                self._held.append((ident, frame, recv_ns))
                return
            transfer = None
            if f.get("transfer_id") is not None:        # (version 2) applied at most once
                transfer = (f["transfer_id"], int(m.type), f["account"], asset, f["amount_units"])
                code = self._transfer_seen(*transfer)
                if code is not None:
                    self.counters[f"transfer_{int(code)}"] += 1
                    self._reply(ident, MsgType.COLLATERAL_REPLY, {
                        "request_id": f["request_id"], "code": int(code),
                        "balance_units": int(self.store.accounts[row]["balance"][asset])})
                    return
            kind = RecordKind.DEPOSIT if m.type == MsgType.DEPOSIT else RecordKind.WITHDRAWAL
            ticket = self._to_worker(int(self.store.accounts[row]["partition"]), ident, f["request_id"], frame,
                                     recv_ns, transfer, kind, row, f["amount_units"], asset)
            if transfer is not None:
                self._transfers_in_flight[transfer[0]] = ticket

    def _to_worker(self, p: int, ident: bytes, request_id: int, frame: bytes, recv_ns: int, transfer,
                   kind: RecordKind, row: int, delta: int, aux: int) -> int:
        """A request for partition ``p``'s worker, under a new ticket (its ring record's
        ``ref``), pending until the worker's reply (or its noted outcome) comes back."""
        self._last_ticket += 1
        self.pending[self._last_ticket] = (ident, request_id, frame, recv_ns, transfer)
        # where the record lands (this loop is the rings' only producer): for a reply lost
        # with its worker (recover_lost_replies)
        self._pending_at[self._last_ticket] = (p, int(self.ctl.rings[p][0]["write_idx"]), time.monotonic_ns())
        self._push(p, kind, 0, row, delta, 0, 0, self._last_ticket, recv_ns, aux)
        _shm.doorbell_ring(self.ctl.doorbell_addr(self.owner[p]))
        return self._last_ticket

    def _open_account(self, ident: bytes, frame: bytes, f: dict, recv_ns: int) -> None:
        """OPEN_ACCOUNT: an id in use is answered 3108 here; otherwise the request goes to
        the worker owning the id's partition (``Store.partition_of``), which adds the row
        (3109 when the partition is full). Held like collateral during a snapshot's cut."""
        if self.store.row_of(f["account"]) is not None:
            self.counters["open_account_exists"] += 1
            self._reply(ident, MsgType.OPEN_ACCOUNT_REPLY, {"request_id": f["request_id"],
                                                            "code": int(Code.ACCOUNT_EXISTS)})
            return
        if self._cut_since is not None:
            self._held.append((ident, frame, recv_ns))
            return
        ticket = self._to_worker(self.store.partition_of(f["account"]), ident, f["request_id"], frame, recv_ns,
                                 None, RecordKind.OPEN_ACCOUNT, -1, f["account"], int(f["mode"] == "isolated"))
        self._opening[ticket] = f["account"]

    def _isolated_margin(self, ident: bytes, frame: bytes, f: dict, recv_ns: int) -> None:
        """ISOLATED_MARGIN: an unknown account (3003), instrument (3004) or a zero amount
        (3102) answered here; otherwise to the account's worker, which moves the margin or
        refuses it (3110, 3103, 3104, 3111). Held like collateral during a snapshot's cut."""
        row = self.store.row_of(f["account"])
        code = (Code.FILL_UNKNOWN_ACCOUNT if row is None else
                Code.FILL_UNKNOWN_INSTRUMENT if f["instrument_id"] >= self.n_instruments else
                Code.COLLATERAL_BAD_AMOUNT if f["amount_units"] == 0 else None)
        if code is not None:
            self._reply(ident, MsgType.COLLATERAL_REPLY, {"request_id": f["request_id"], "code": int(code),
                                                          "balance_units": 0})
            return
        if self._cut_since is not None:
            self._held.append((ident, frame, recv_ns))
            return
        self._to_worker(int(self.store.accounts[row]["partition"]), ident, f["request_id"], frame, recv_ns, None,
                        RecordKind.ISOLATED_MARGIN, row, f["amount_units"], f["instrument_id"])

    def _note_account(self, account: int, row: int) -> None:
        """An account a worker opened at ``row``: into ``Store.row_of`` at once, and into
        the sorted id arrays of the C paths at their next use (``_account_map``: the opens
        of a burst merged with one copy, ~6 ms at 1M accounts); the C fills intake and
        check desk are then built again (nothing is buffered in the intake here: replies
        are taken after the burst's flush)."""
        self.store.note_account(account, row)
        if self._ids is not None:
            self._new_accounts.append((account, row))
            self._intake = None
            self._desk = None

    def _transfer_seen(self, transfer_id: int, kind: int, account: int, asset: int, amount: int) -> Code | None:
        """Why a request with this ``transfer_id`` must not be applied, or None: applied
        before (3105; 3106 when account, asset, amount or type differ), or being applied
        now (3107)."""
        known = self.transfers.get(transfer_id)
        if known is not None:
            same = known == (kind, account, asset, amount)
            return Code.TRANSFER_ALREADY_APPLIED if same else Code.TRANSFER_ID_REUSED
        if transfer_id in self._transfers_in_flight:
            return Code.TRANSFER_IN_FLIGHT
        return None

    def _remember_transfer(self, transfer_id: int, kind: int, account: int, asset: int, amount: int) -> None:
        """An applied transfer into the window (shared memory: snapshots keep it) and the
        lookup; the one it pushes out of the window is forgotten."""
        evicted = self.ctl.remember_transfer(transfer_id, account, amount, asset, kind)
        if evicted:
            self.transfers.pop(evicted, None)
        self.transfers[transfer_id] = (kind, account, asset, amount)

    def _answer_check(self, ident: bytes, request_id: int, account: int, instrument: int, qty_units: int,
                      price_units: int, recv_ns: int) -> None:
        """ORDER_CHECK: the kernel's pre-trade rule on a consistent copy of the account
        (seqlock read), at a price snapshot at most 200 us old; the reply encoded in C."""
        self.counters["checks"] += 1
        prices_ok = True
        if recv_ns - self._snap_ns > 200_000:        # prices change per tick; re-read at most every 200 us
            try:
                self.snap = self.store.price_snapshot()
                self._snap_ns = recv_ns
            except PricesUnreadable:                 # a price writer stopped mid-write (worker 0
                prices_ok = False                    # killed while publishing, until its restart
                self.counters["checks_prices_unreadable"] += 1     # finishes the write): 4008
        row = self.store.row_of(account)
        if not prices_ok:
            code, eq, im = Code.CHECK_ACCOUNT_BUSY, 0.0, 0.0
        elif row is None:
            code, eq, im = Code.CHECK_UNKNOWN_ACCOUNT, 0.0, 0.0
        else:
            res = pretrade_check_consistent(self.store, row, instrument, qty_units,
                                            self._price(instrument, price_units), self.snap)
            code, eq, im = res.code, res.post_equity_usd, res.post_initial_margin_usd
        seq = self.peers[self.checks].seq(ident)
        seq.last += 1
        reply = _wire.encode_check_reply(seq.last, time.time_ns(), request_id, int(code),
                                         float(eq) if eq == eq else 0.0, float(im) if im == im else 0.0)
        self._route(self.checks, ident, reply)

    def _price(self, instrument: int, price_units: int) -> float:
        if not 0 <= instrument < self.n_instruments or price_units <= 0:
            return float("nan")
        return price_units / self.price_scales[instrument]

    def _reply(self, ident: bytes, mtype: MsgType, fields: dict) -> None:
        self._answer(self.checks, ident, mtype, fields)

    def on_worker_reply(self, frame: bytes) -> None:
        """A worker's COLLATERAL_REPLY: an applied request is journaled, then answered
        (held until that record is on the disk with ``journal_sync = "ack"``); or its
        takeover request (``on_takeover``)."""
        if frame[:1] == TAKEOVER_PREFIX:
            if self._cut_since is not None:          # a snapshot's cut: no fills until it is done
                self._takeovers_held.append(frame)
            else:
                self.on_takeover(frame)
            return
        m = decode(frame)
        if type(m) is Rejected:
            return
        self._collateral_done(m.fields["request_id"], m.fields["code"], m.fields["balance_units"])

    def on_takeover(self, frame: bytes) -> None:
        """Take over a liquidation order (``b"T"`` + msgpack ``[row, instrument, qty_units,
        limit_price_units, reason]`` from its worker): plan it (takeover.plan), book the
        legs as one FILL batch on ``TAKEOVER_STREAM`` -- the liquidated account the taker,
        no fees -- journaled before it is routed, and report each leg (6101-6103) or that
        nothing took it (6104). A request that does not parse is counted, never raised."""
        try:
            row, ins, qty, limit, reason = msgpack.unpackb(frame[1:])
            row, ins, qty, limit, reason = int(row), int(ins), int(qty), int(limit), int(reason)
            if not (0 <= row < self.store.accounts_cap and 0 <= ins < self.n_instruments and limit > 0):
                raise ValueError("out of range")
        except Exception:                                    # noqa: BLE001 -- internal, but never fatal
            self.counters["takeover_bad_requests"] += 1
            return
        self.counters["takeover_requests"] += 1
        account = int(self.store.accounts[row]["account_id"])
        if self.takeover is None:
            return
        now = time.time_ns()
        try:                                               # planning and encoding never stop the gateway
            legs, size = plan_takeover(self.store, self.store.price_snapshot(), row, ins, qty, limit, reason,
                                       self.takeover, self._takeover_busy())
            seq0 = self._takeover_seq + 1
            fills = [{"trade_id": seq0 + k, "instrument_id": ins, "maker_account": leg.counterparty,
                      "taker_account": account, "qty_units": leg.qty_units, "price_units": leg.price_units,
                      "maker_fee_units": 0, "taker_fee_units": 0,
                      "taker_side": "buy" if leg.qty_units > 0 else "sell"} for k, leg in enumerate(legs)]
            out = encode_batch(MsgType.FILL, fills, first_seq=seq0, ts_ns=now) if legs else b""
            run = decode_fills(out) if legs else None
            if type(run) is Rejected:
                raise ValueError(f"refused by its own decoder: {run.detail}")
        except Exception as e:                             # noqa: BLE001 -- a bug or a price mid-write: said, not raised
            self.counters["takeover_failed"] += 1
            self.emit(Code.TAKEOVER_NO_ROUTE, f"takeover of instrument {ins} not planned: {type(e).__name__}: {e}",
                      account)
            return
        taken = sum(abs(leg.qty_units) for leg in legs)
        if taken < size or size == 0:
            self.counters["takeover_no_route"] += 1
            self.emit(Code.TAKEOVER_NO_ROUTE, json.dumps({"instrument_id": ins, "qty_units": qty, "held_units": size,
                                                          "taken_units": taken, "limit_price_units": limit}),
                      account)
        if not legs:
            return
        self._takeover_seq += len(legs)
        self.flush_fills(now)                              # the matching engine's fills first, in order
        self.journal.append(seq0, now, out, TAKEOVER_STREAM)   # before applying
        self._route_reference(run.fills, seq0, now)
        per = self._per_partition
        for r in {row, *(self.store.row_of(leg.counterparty) for leg in legs)}:
            p = r // per
            self._takeover_unapplied[r] = (p, _shm.ring_pending(self._ring_addrs[p][0])[1])
        for k, leg in enumerate(legs):
            self.counters[f"takeover_{leg.route.name.lower()}"] += 1
            self.emit(ROUTE_CODE[leg.route], json.dumps({
                "instrument_id": ins, "liquidated_account": account, "counterparty": leg.counterparty,
                "qty_units": leg.qty_units, "price_units": leg.price_units, "trade_id": seq0 + k,
                "fill_seq": seq0 + k}), leg.counterparty if leg.route == Route.ADL else account)

    def _takeover_busy(self) -> set[int]:
        """Rows with takeover legs their worker has not applied yet (pruned here)."""
        done = [r for r, (p, w) in self._takeover_unapplied.items()
                if _shm.ring_pending(self._ring_addrs[p][0])[0] >= w]
        for r in done:
            del self._takeover_unapplied[r]
        return set(self._takeover_unapplied)

    def _collateral_done(self, ticket: int, code: int, balance_units: int) -> None:
        """The outcome of our collateral record ``ticket`` (the worker's reply, or the
        outcome it noted when the reply was lost): journal an applied one, remember its
        transfer id, answer custody. A second outcome of the same ticket is ignored."""
        pending = self.pending.pop(ticket, None)
        self._pending_at.pop(ticket, None)
        if pending is None:
            return
        ident, request_id, request, recv_ns, transfer = pending
        account = self._opening.pop(ticket, None)
        if account is not None:             # an OPEN_ACCOUNT: balance_units carries the row
            # 3108 for an id this gateway does not know: an earlier open of it was applied
            # and its reply (and noted outcome) lost; journaled and taken in now.
            lost = code == Code.ACCOUNT_EXISTS and balance_units >= 0 and self.store.row_of(account) is None
            if code == Code.OK or lost:
                self.journal.append(0, recv_ns, request)
                self._note_account(account, balance_units)
            self.counters[f"open_account_{int(code)}"] += 1
            self._reply(ident, MsgType.OPEN_ACCOUNT_REPLY, {"request_id": request_id, "code": int(code)})
            return
        if transfer is not None:
            self._transfers_in_flight.pop(transfer[0], None)
        if code == Code.OK:                 # applied: journaled before the client hears so
            self.journal.append(0, recv_ns, request)
            if transfer is not None:
                self._remember_transfer(*transfer)
        self._reply(ident, MsgType.COLLATERAL_REPLY, {"request_id": request_id, "code": int(code),
                                                      "balance_units": int(balance_units)})

    def _take_worker_replies(self) -> None:
        """Every worker reply waiting on the replies socket."""
        while True:
            try:
                self.on_worker_reply(self.replies.recv(zmq.NOBLOCK))
            except zmq.Again:
                return

    def recover_lost_replies(self, now_ns: int) -> int:
        """Collateral records a worker committed (the ring's read index is past them) more
        than ``LOST_REPLY_AFTER_NS`` ago whose reply never came: the worker died after
        its commit, before its I/O thread sent the reply. Their outcome is in the
        control segment's outcomes table (``Control.note_outcome``, written before the
        commit); each is handled as its reply would have been. Returns how many."""
        found = 0
        for ticket, (p, idx, pushed_ns) in list(self._pending_at.items()):
            if now_ns - pushed_ns < LOST_REPLY_AFTER_NS or int(self.ctl.rings[p][0]["read_idx"]) <= idx:
                continue
            out = self.ctl.outcome(p, ticket)
            if out is not None:
                self.counters["collateral_replies_recovered"] += 1
                self._collateral_done(ticket, *out)
                found += 1
        return found

    def await_collateral_replies(self, timeout_s: float) -> None:
        """At shutdown: the deposits and withdrawals already on the rings are applied by
        the workers as they drain, so take their replies -- journal the applied ones,
        remember their transfer ids, answer custody -- before the journal closes. Without
        this an applied request was in the book (and the stop's snapshot) but neither in
        the journal nor the transfer window, and a retry after the restart applied it
        again. A request the workers never reached stays unanswered and unapplied."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            self.recover_lost_replies(time.monotonic_ns())
            if self.replies.poll(20):
                self._take_worker_replies()
        if self.pending:
            self.counters["collateral_unanswered_at_exit"] += len(self.pending)

    def _publish_fills_last(self) -> None:
        """The fills streams' last accepted sequence numbers, for the snapshot that keeps
        them (so that a restarted engine still drops what it had taken): the PULL
        stream's into the control header, each acknowledged stream's (by the DEALER's
        routing id) into ``fills-streams.json`` in the journal's directory."""
        t = self.trackers.get(None)
        self.ctl.header[0]["fills_last_seq"] = t.last if t is not None else 0
        if self.fills_acks:
            write_fills_streams(self.journal_dir, {i: t.last for i, t in self.trackers.items() if i})

    # ------------------------------------------------------------------ snapshot cut
    CUT_DRAIN_TIMEOUT_NS = 1_000_000_000     # a cut not drained by then is refused

    def cut_step(self) -> None:
        """Serve the supervisor's snapshot cut (control header ``cut_*``), one step a turn.

        1. A new ``cut_request``: stop taking fills and collateral requests (order checks
           go on; collateral requests are held and taken after the cut).
        2. Once no collateral reply is pending and every ring is drained, the book holds
           exactly the journal: fsync it and go on in the next generation's file
           (``cut_generation``, ``cut_offset``: the start of that file), then
           ``cut_ready``. Not drained within ``CUT_DRAIN_TIMEOUT_NS``: refuse (offset -1).
        3. When the supervisor has copied the book (``cut_done``), or is gone, resume.
        """
        h = self.ctl.header[0]
        req = int(h["cut_request"])
        if req == self._cut_served:
            return
        if self._cut_since is None:
            self._cut_since = time.monotonic_ns()
            self.flush_fills(time.time_ns())
        if int(h["cut_ready"]) != req:
            if not self.pending and self.ctl.drained():
                self._publish_fills_last()
                self.journal_generation += 1
                self.journal.rotate(journal_file(self.journal_dir, self.journal_generation))
                h["cut_generation"] = self.journal_generation
                h["cut_offset"] = len(MAGIC)
                h["cut_ready"] = req
            elif time.monotonic_ns() - self._cut_since > self.CUT_DRAIN_TIMEOUT_NS:
                h["cut_offset"] = -1
                h["cut_ready"] = req
                self.counters["cuts_refused"] += 1
            return
        if int(h["cut_done"]) == req or os.getppid() != self._parent:
            self._cut_served, self._cut_since = req, None
            self.counters["cuts"] += 1
            held, self._held = self._held, []
            for ident, frame, recv_ns in held:
                self.on_request(ident, frame, recv_ns)
            takeovers, self._takeovers_held = self._takeovers_held, []
            for frame in takeovers:
                self.on_takeover(frame)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        poller = zmq.Poller()
        for s in (self.fills, self.checks, self.replies, self._wake_rx):
            poller.register(s, zmq.POLLIN)
        process.short_slices()              # its sockets (and so its I/O thread) exist
        checks, fills, POLLIN, EVENTS = self.checks, self.fills, zmq.POLLIN, zmq.EVENTS
        while not self.ctl.shutdown:
            self.cut_step()
            cutting = self._cut_since is not None
            ready = dict(poller.poll(1 if cutting else 100))
            now = time.time_ns()
            # Drain while the socket says a message waits (no exception per empty read).
            n = 0
            while n < 1000 and checks.getsockopt(EVENTS) & POLLIN:
                parts = checks.recv_multipart(zmq.NOBLOCK)
                n += 1
                if (peer := self._peer(checks, parts)) is not None:
                    self.on_request(peer, parts[-1], now)
            n = 1000 if cutting else 0                              # a cut: fills wait in the socket
            while n < 1000 and fills.getsockopt(EVENTS) & POLLIN:   # a burst: taken, then flushed
                if self.fills_acks:
                    parts = fills.recv_multipart(zmq.NOBLOCK)
                    if (peer := self._peer(fills, parts)) is not None:
                        self.take_fills(parts[-1], now, peer)
                else:
                    self.take_fills(fills.recv(zmq.NOBLOCK), now)
                n += 1
            self.flush_fills(now)
            if self.replies in ready:
                self._take_worker_replies()
            if self._wake_rx in ready:
                while self._wake_rx.getsockopt(EVENTS) & POLLIN:
                    self._wake_rx.recv(zmq.NOBLOCK)
            if self._pending_at and now - self._lost_checked_ns > 100_000_000:    # every 0.1 s
                self._lost_checked_ns = now
                self.recover_lost_replies(time.monotonic_ns())
            self.pump_answers()
            self.journal.maybe_sync()
        # Shutdown: intake stops here; what is queued in the rings is drained by the workers.
        self.flush_fills(time.time_ns())
        self.await_collateral_replies(SHUTDOWN_REPLIES_S)
        self.journal.close()                    # fsync: every held answer may go
        self.pump_answers()
        self._publish_fills_last()
        for s in (self.fills, self.checks, self.replies, self.events, self._wake_rx, self._wake_tx):
            s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engine.runtime.gateway")
    ap.add_argument("--name", required=True)
    ap.add_argument("--fills", required=True)
    ap.add_argument("--checks", required=True)
    ap.add_argument("--replies", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--journal-dir", required=True)
    ap.add_argument("--journal-generation", type=int, required=True, help="the journal file to write first")
    ap.add_argument("--owners", required=True, help="worker of each partition, comma-separated")
    ap.add_argument("--assets", default="")
    ap.add_argument("--cpu", type=int, default=-1)
    ap.add_argument("--fills-acks", action="store_true", help="ROUTER fills socket answering ACK/REJECT")
    ap.add_argument("--fills-last-seq", type=int, default=0,
                    help="the PULL fills stream's last accepted sequence number before this start")
    ap.add_argument("--journal-sync", choices=("ack", "interval"), default="ack",
                    help="ack: fsync the journal before acknowledging what it holds")
    ap.add_argument("--journal-fsync-interval-s", type=float, default=1.0)
    ap.add_argument("--fills-streams-from", default="",
                    help="a fills-streams.json: each acknowledged stream's last accepted seq before this start")
    ap.add_argument("--takeover", default="", help="the [liquidation] takeover policy (TakeoverPolicy.as_args)")
    curve.add_args(ap)
    a = ap.parse_args(argv)
    process.enter(a.cpu)
    curve.install(a)
    g = Gateway(a.name, a.fills, a.checks, a.replies, a.events, a.journal_dir, a.journal_generation,
                [int(x) for x in a.owners.split(",")], fills_acks=a.fills_acks, fills_last_seq=a.fills_last_seq,
                journal_sync=a.journal_sync, journal_fsync_interval_s=a.journal_fsync_interval_s,
                fills_streams=read_fills_streams(a.fills_streams_from) if a.fills_streams_from else None,
                takeover=TakeoverPolicy.from_arg(a.takeover) if a.takeover else None)
    if a.assets:
        g.set_asset_names(a.assets.split(","))
    g.ctl.mark_ready(Role.GATEWAY)
    g.run()
    g.counters["peers_forgotten"] = sum(p.forgotten for p in g.peers.values())
    print(json.dumps({"gateway": dict(g.counters), "journal_syncs": g.journal.syncs}), file=sys.stderr)
    curve.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
