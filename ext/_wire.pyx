# cython: language_level=3
"""Wire fast path: the gateway's hot messages parsed and encoded in C.

``feeds/protocol.py`` is the reference: it decodes any frame to an exact accept or a
reason-coded reject. This module handles only the common case -- a well-formed FILL,
BATCH of FILLs or ORDER_CHECK -- with a strict msgpack reader, and answers FALLBACK for
anything else (any deviation: an unknown, missing or duplicated key, a type other than
the schema's, a value out of range, nil, bool, float, bin, ext, trailing bytes, an
oversized frame). The caller then runs the reference decoder, which decides the code. So
this path may only ever accept what the reference accepts, with the same values; the
tests hold it to that on random and mutated frames (tests/feeds/test_wire_fast.py).

Routing (``FillIntake.route``) applies the fills gateway's rules (engine/runtime/gateway.py)
and pushes each accepted fill's two legs onto the owning partitions' rings.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, INT64_MIN
from libc.string cimport memcmp, memcpy, memmove

include "_msgpack.pxi"

include "_ring.pxi"

include "_oracle.pxi"

# Statuses (module-level ints for Python callers).
OK = 0
FALLBACK = 1
RING_FULL = 2

cdef enum:
    ST_OK = 0
    ST_FALLBACK = 1
    ST_RING_FULL = 2
    T_FILL = 10
    T_BATCH = 90
    MAX_BATCH = 4096
    LEG_KIND = 1                   # RecordKind.FILL_LEG (engine/runtime/ctl.py)
    CODE_UNKNOWN_ACCOUNT = 3003        # engine.codes.Code (held equal by a test)
    CODE_UNKNOWN_INSTRUMENT = 3004
    CODE_BAD_QTY = 3005
    CODE_BAD_PRICE = 3006
    CODE_SAME_ACCOUNT = 3008


#: The numbers compiled in above, for the test that holds them to engine.codes / ctl.
COMPILED_CONSTANTS = {"FILL_LEG": LEG_KIND, "FILL_UNKNOWN_ACCOUNT": CODE_UNKNOWN_ACCOUNT,
                      "FILL_UNKNOWN_INSTRUMENT": CODE_UNKNOWN_INSTRUMENT, "FILL_BAD_QTY": CODE_BAD_QTY,
                      "FILL_BAD_PRICE": CODE_BAD_PRICE, "FILL_SAME_ACCOUNT": CODE_SAME_ACCOUNT, "FILL": T_FILL, "BATCH": T_BATCH,
                      "ORDER_CHECK": T_ORDER_CHECK, "ORDER_CHECK_REPLY": T_ORDER_CHECK_REPLY,
                      "MAX_BATCH_MSGS": MAX_BATCH}


ctypedef struct FillOut:              # one parsed fill (FILL_DTYPE in engine/runtime/gateway.py)
    int64_t trade_id
    int64_t instrument_id
    int64_t maker_account
    int64_t taker_account
    int64_t qty_units
    int64_t price_units
    int64_t maker_fee_units
    int64_t taker_fee_units
    uint64_t seq                       # this fill's sequence number (the frame's first + index)



# ------------------------------------------------------------------ fills

cdef enum:
    F_TRADE = 1
    F_INS = 2
    F_MAKER = 4
    F_TAKER = 8
    F_QTY = 16
    F_PRICE = 32
    F_MFEE = 64
    F_TFEE = 128
    F_SIDE = 256
    F_ALL = 511


cdef int fill_key(Reader *r, const uint8_t *k, Py_ssize_t n, FillOut *f, int *seen,
                  int *side) noexcept nogil:
    """Read the value of fill field ``k``: 1 (read), 0 (not a fill field)."""
    cdef int bit
    cdef Py_ssize_t sl = 0
    cdef const uint8_t *s
    if key_is(k, n, b"trade_id", 8):
        bit = F_TRADE
        f.trade_id = read_i64(r, 0)
    elif key_is(k, n, b"instrument_id", 13):
        bit = F_INS
        f.instrument_id = read_i64(r, 0)
    elif key_is(k, n, b"maker_account", 13):
        bit = F_MAKER
        f.maker_account = read_i64(r, 0)
    elif key_is(k, n, b"taker_account", 13):
        bit = F_TAKER
        f.taker_account = read_i64(r, 0)
    elif key_is(k, n, b"qty_units", 9):
        bit = F_QTY
        f.qty_units = read_i64(r, -INT64_MAX_ - 1)
    elif key_is(k, n, b"price_units", 11):
        bit = F_PRICE
        f.price_units = read_i64(r, -INT64_MAX_ - 1)
    elif key_is(k, n, b"maker_fee_units", 15):
        bit = F_MFEE
        f.maker_fee_units = read_i64(r, -INT64_MAX_ - 1)
    elif key_is(k, n, b"taker_fee_units", 15):
        bit = F_TFEE
        f.taker_fee_units = read_i64(r, -INT64_MAX_ - 1)
    elif key_is(k, n, b"taker_side", 10):
        bit = F_SIDE
        s = read_str(r, &sl)
        if s != NULL and key_is(s, sl, b"buy", 3):
            side[0] = 1
        elif s != NULL and key_is(s, sl, b"sell", 4):
            side[0] = -1
        else:
            r.bad = 1
    else:
        return 0
    if seen[0] & bit:
        r.bad = 1
    seen[0] |= bit
    return 1


cdef inline bint side_agrees(int64_t qty, int side) noexcept nogil:
    """The wire rule: a + quantity is a buy, a - quantity a sell (0 passes the wire)."""
    return (qty > 0 and side == 1) or (qty < 0 and side == -1) or qty == 0


cdef int read_fill_fields(Reader *r, int64_t n_pairs, FillOut *f) noexcept nogil:
    """A BATCH element: exactly the nine fill fields (no header keys)."""
    cdef int64_t i
    cdef int seen = 0, side = 0
    cdef Py_ssize_t kl = 0
    cdef const uint8_t *k
    if n_pairs != 9:
        r.bad = 1
        return 0
    for i in range(n_pairs):
        k = read_str(r, &kl)
        if r.bad:
            return 0
        if not fill_key(r, k, kl, f, &seen, &side):
            r.bad = 1
        if r.bad:
            return 0
    if seen != F_ALL or not side_agrees(f.qty_units, side):
        r.bad = 1
        return 0
    return 1


cdef int parse_fills_c(const uint8_t *data, Py_ssize_t size, int64_t max_size, FillOut *out,
                       uint64_t *first_seq, int64_t *ts_ns, int64_t *n_out) noexcept nogil:
    """Parse a well-formed FILL or BATCH of FILLs into ``out`` (room for 4096): ST_OK with
    ``n_out`` fills (sequence numbers set), or ST_FALLBACK (use the reference decoder)."""
    cdef Reader r
    cdef int64_t n_pairs, i, j, n_msgs = 0, t = -1, ts = 0, of = -1
    cdef uint64_t seq = 0
    cdef int seen = 0, fseen = 0, side = 0, got_msgs = 0, got_of = 0
    cdef Py_ssize_t kl = 0
    cdef const uint8_t *k
    cdef FillOut single
    if size == 0 or size > max_size:
        return ST_FALLBACK
    r.p = data
    r.end = data + size
    r.bad = 0
    n_pairs = read_map(&r)
    for i in range(n_pairs):
        if r.bad:
            break
        k = read_str(&r, &kl)
        if r.bad:
            break
        if header_key(&r, k, kl, &seen, &t, &seq, &ts):
            continue
        if key_is(k, kl, b"of", 2):
            of = read_i64(&r, 0)
            got_of += 1
        elif key_is(k, kl, b"msgs", 4):
            got_msgs += 1
            n_msgs = read_array(&r)
            if r.bad or n_msgs < 1 or n_msgs > MAX_BATCH:
                r.bad = 1
                break
            for j in range(n_msgs):
                if not read_fill_fields(&r, read_map(&r), &out[j]):
                    break
        elif not fill_key(&r, k, kl, &single, &fseen, &side):
            r.bad = 1
    if not r.bad and r.p != r.end:
        r.bad = 1                      # trailing bytes
    if not r.bad and seen == H_ALL:
        if t == T_FILL and fseen == F_ALL and got_of == 0 and got_msgs == 0 \
                and side_agrees(single.qty_units, side) and n_pairs == 13:
            out[0] = single
            n_msgs = 1
        elif t == T_BATCH and fseen == 0 and got_of == 1 and got_msgs == 1 and of == T_FILL \
                and n_pairs == 6 and seq <= <uint64_t>0xffffffffffffffff - <uint64_t>(n_msgs - 1):
            pass
        else:
            r.bad = 1
    else:
        r.bad = 1
    if r.bad:
        return ST_FALLBACK
    for j in range(n_msgs):
        out[j].seq = seq + <uint64_t>j
    first_seq[0] = seq
    ts_ns[0] = ts
    n_out[0] = n_msgs
    return ST_OK


cdef inline int64_t row_of(const int64_t *ids, const int64_t *rows, int64_t n, int64_t account) noexcept nogil:
    """Binary search of the sorted ``ids``; -1 when absent."""
    cdef int64_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if ids[mid] < account:
            lo = mid + 1
        else:
            hi = mid
    if lo < n and ids[lo] == account:
        return rows[lo]
    return -1


cdef class FillIntake:
    """The fills gateway's C path: parse frames into a buffer, route the buffer to the rings.

    ``parse(frame)`` parses one frame's fills after those already buffered, without
    taking them; ``take(skip)`` keeps them but the first ``skip`` (duplicates by sequence
    number); ``route(recv_ns)`` validates every buffered fill and pushes its two legs
    (taker, then maker) onto the owning partitions' rings, in order. Rules, in order
    (engine/runtime/gateway.py): instrument known (else 3003); both accounts known and
    different (3004); quantity nonzero (3005; the wire already tied its sign to the
    side); price > 0 (3006). A leg carries ``(instrument, row, +-qty, price, fee, seq,
    recv_ns, trade_id)``. When a ring is full, ``route`` returns RING_FULL and resumes
    where it stopped on the next call.

    The tables (``ids`` sorted with their ``rows``; ``ring_table`` of (header, records)
    addresses per partition; ``owner``: worker per partition) are the caller's arrays,
    kept referenced here.
    """
    cdef object _buf, _ids, _rows, _rings, _owner, _rejects
    cdef FillOut *buf
    cdef int64_t cap, n, pending, k, leg
    cdef const int64_t *ids
    cdef const int64_t *rows
    cdef int64_t n_ids
    cdef const uint64_t *rings
    cdef const int64_t *owner
    cdef int64_t *rejects
    cdef int64_t rejects_cap
    cdef int64_t n_instruments, per_partition, max_size
    cdef public object buffer

    def __init__(self, buffer, ids, rows, ring_table, owner, rejects, int64_t n_instruments,
                 int64_t per_partition, int64_t max_size):
        cdef FillOut[::1] b = buffer
        cdef const int64_t[::1] i = ids
        cdef const int64_t[::1] r = rows
        cdef const uint64_t[:, ::1] t = ring_table
        cdef const int64_t[::1] o = owner
        cdef int64_t[:, ::1] rj = rejects
        if b.shape[0] < MAX_BATCH or i.shape[0] != r.shape[0] or t.shape[1] != 2 or rj.shape[1] != 2:
            raise ValueError("FillIntake: buffer of >= 4096 fills, ids/rows of one length, "
                             "ring_table (n, 2), rejects (n, 2)")
        if o.shape[0] != t.shape[0] or (o.shape[0] and (min(owner) < 0 or max(owner) > 63)):
            raise ValueError("FillIntake: one owner per partition, workers 0..63")
        self.buffer = buffer
        self._buf, self._ids, self._rows, self._rings, self._owner, self._rejects = \
            buffer, ids, rows, ring_table, owner, rejects
        self.buf = &b[0]
        self.cap = b.shape[0]
        self.ids = &i[0] if i.shape[0] else NULL
        self.rows = &r[0] if r.shape[0] else NULL
        self.n_ids = i.shape[0]
        self.rings = &t[0, 0] if t.shape[0] else NULL
        self.owner = &o[0] if o.shape[0] else NULL
        self.rejects = &rj[0, 0]
        self.rejects_cap = rj.shape[0]
        self.n_instruments = n_instruments
        self.per_partition = per_partition
        self.max_size = max_size
        self.n = 0
        self.pending = 0
        self.k = 0
        self.leg = 0

    @property
    def buffered(self):
        """Fills taken and not yet routed."""
        return self.n

    def room(self):
        """True when a frame of the largest batch still fits after the buffered fills."""
        return self.cap - self.n >= MAX_BATCH

    def parse(self, frame):
        """``(status, first_seq, n)``: OK with ``n`` fills parsed (not yet taken), or
        FALLBACK. ``frame``: bytes (or any contiguous buffer)."""
        cdef bytes raw = frame_bytes(frame)
        cdef const uint8_t *data = <const uint8_t *><const char *>raw
        cdef Py_ssize_t size = len(raw)
        cdef uint64_t first = 0
        cdef int64_t ts = 0, n = 0
        cdef int status
        if self.cap - self.n < MAX_BATCH:
            raise ValueError("FillIntake.parse: buffer full, route first")
        with nogil:
            status = parse_fills_c(data, size, self.max_size, self.buf + self.n, &first, &ts, &n)
        self.pending = n if status == ST_OK else 0
        return (status, first, n)

    def take(self, int64_t skip):
        """Keep the fills of the last ``parse`` but the first ``skip``."""
        cdef int64_t n = self.pending
        if skip < 0 or skip > n:
            raise ValueError("FillIntake.take: skip outside 0..n")
        if skip:
            memmove(self.buf + self.n, self.buf + self.n + skip, <size_t>(n - skip) * sizeof(FillOut))   # overlapping
        self.n += n - skip
        self.pending = 0

    def route(self, int64_t recv_ns):
        """Route the buffered fills (class doc). Returns ``(status, n_ok, n_rejects,
        workers)``: OK (buffer now empty) or RING_FULL (call again); ``n_rejects`` rows
        of (buffer index, code) in ``rejects`` (indices into this call's buffer);
        ``workers``: bit w set when worker w's ring got a record."""
        cdef int64_t k = self.k, leg = self.leg, n = self.n, row, p, taker, maker, n_ok = 0, n_rej = 0
        cdef int64_t code
        cdef uint64_t workers = 0
        cdef const FillOut *f
        cdef int status = ST_OK
        cdef const uint64_t *ring
        with nogil:
            while k < n:
                f = &self.buf[k]
                taker = row_of(self.ids, self.rows, self.n_ids, f.taker_account)
                maker = row_of(self.ids, self.rows, self.n_ids, f.maker_account)
                code = 0
                if f.instrument_id >= self.n_instruments:
                    code = CODE_UNKNOWN_INSTRUMENT
                elif taker < 0 or maker < 0:
                    code = CODE_UNKNOWN_ACCOUNT
                elif taker == maker:
                    code = CODE_SAME_ACCOUNT
                elif f.qty_units == 0 or f.qty_units == INT64_MIN:    # -(-2**63): no int64
                    code = CODE_BAD_QTY
                elif f.price_units <= 0:
                    code = CODE_BAD_PRICE
                if code != 0:
                    if n_rej < self.rejects_cap:
                        self.rejects[2 * n_rej] = k
                        self.rejects[2 * n_rej + 1] = code
                    n_rej += 1
                    k += 1
                    leg = 0
                    continue
                if leg == 0:
                    p = taker // self.per_partition
                    ring = &self.rings[2 * p]
                    if not ring_push_c(<RingHeader *>ring[0], <RingRecord *>ring[1], LEG_KIND,
                                       <int>f.instrument_id, taker, f.qty_units, f.price_units,
                                       f.taker_fee_units, f.seq, recv_ns, f.trade_id):
                        status = ST_RING_FULL
                        break
                    workers |= (<uint64_t>1) << self.owner[p]
                    leg = 1
                p = maker // self.per_partition
                ring = &self.rings[2 * p]
                if not ring_push_c(<RingHeader *>ring[0], <RingRecord *>ring[1], LEG_KIND,
                                   <int>f.instrument_id, maker, -f.qty_units, f.price_units,
                                   f.maker_fee_units, f.seq, recv_ns, f.trade_id):
                    status = ST_RING_FULL
                    break
                workers |= (<uint64_t>1) << self.owner[p]
                leg = 0
                n_ok += 1
                k += 1
        if status == ST_OK:
            self.k = 0
            self.leg = 0
            self.n = 0
        else:
            self.k = k
            self.leg = leg
        return (status, n_ok, n_rej, workers)


# ------------------------------------------------------------------ order checks

def parse_order_check(const uint8_t[::1] frame, int64_t max_size):
    """A well-formed ORDER_CHECK: ``(seq, request_id, account, instrument_id, qty_units,
    price_units)``, or None (use the reference decoder)."""
    cdef CheckIn c
    cdef int ok
    if frame.shape[0] == 0:
        return None
    with nogil:
        ok = parse_order_check_c(&frame[0], frame.shape[0], max_size, &c)
    if not ok:
        return None
    return (c.seq, c.request_id, c.account, c.instrument_id, c.qty_units, c.price_units)


def encode_check_reply(uint64_t seq, int64_t ts_ns, int64_t request_id, int64_t code,
                       double post_equity_usd, double post_initial_margin_usd):
    """ORDER_CHECK_REPLY body, byte for byte what ``Sequencer.encode_known`` writes."""
    cdef uint8_t buf[160]
    cdef Py_ssize_t n = encode_check_reply_c(buf, seq, ts_ns, request_id, code, post_equity_usd,
                                             post_initial_margin_usd)
    return (<char *>buf)[:n]
