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

Routing (``route_fills``) applies the fills gateway's rules (engine/runtime/gateway.py)
and pushes each accepted fill's two legs onto the owning partitions' rings.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from _types cimport RingHeader, RingRecord
from _seqlock cimport me_atomic_load_u64, me_atomic_store_u64

# Statuses (module-level ints for Python callers).
OK = 0
FALLBACK = 1
RING_FULL = 2

cdef enum:
    ST_OK = 0
    ST_FALLBACK = 1
    ST_RING_FULL = 2
    T_FILL = 10
    T_ORDER_CHECK = 20
    T_ORDER_CHECK_REPLY = 21
    T_BATCH = 90
    MAX_BATCH = 4096
    LEG_KIND = 1                   # RecordKind.FILL_LEG (engine/runtime/ctl.py)
    CODE_UNKNOWN_ACCOUNT = 3003        # engine.codes.Code (held equal by a test)
    CODE_UNKNOWN_INSTRUMENT = 3004
    CODE_BAD_QTY = 3005
    CODE_BAD_PRICE = 3006

cdef int64_t INT64_MAX_ = 0x7fffffffffffffff

#: The numbers compiled in above, for the test that holds them to engine.codes / ctl.
COMPILED_CONSTANTS = {"FILL_LEG": LEG_KIND, "FILL_UNKNOWN_ACCOUNT": CODE_UNKNOWN_ACCOUNT,
                      "FILL_UNKNOWN_INSTRUMENT": CODE_UNKNOWN_INSTRUMENT, "FILL_BAD_QTY": CODE_BAD_QTY,
                      "FILL_BAD_PRICE": CODE_BAD_PRICE, "FILL": T_FILL, "BATCH": T_BATCH,
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


ctypedef struct Reader:
    const uint8_t *p
    const uint8_t *end
    int bad                            # set on any deviation: the caller falls back


# ------------------------------------------------------------------ msgpack reading

cdef inline uint64_t be16(const uint8_t *p) noexcept nogil:
    return (<uint64_t>p[0] << 8) | p[1]

cdef inline uint64_t be32(const uint8_t *p) noexcept nogil:
    return (<uint64_t>p[0] << 24) | (<uint64_t>p[1] << 16) | (<uint64_t>p[2] << 8) | p[3]

cdef inline uint64_t be64(const uint8_t *p) noexcept nogil:
    return (be32(p) << 32) | be32(p + 4)


cdef inline int need(Reader *r, Py_ssize_t n) noexcept nogil:
    if r.end - r.p < n:
        r.bad = 1
        return 0
    return 1


cdef int64_t read_map(Reader *r) noexcept nogil:
    """Map header: the number of pairs, or -1 (bad)."""
    cdef uint8_t b
    cdef int64_t n
    if not need(r, 1):
        return -1
    b = r.p[0]
    if 0x80 <= b <= 0x8f:
        r.p += 1
        return b & 0x0f
    if b == 0xde and need(r, 3):
        n = <int64_t>be16(r.p + 1)
        r.p += 3
        return n
    r.bad = 1
    return -1


cdef int64_t read_array(Reader *r) noexcept nogil:
    cdef uint8_t b
    cdef int64_t n
    if not need(r, 1):
        return -1
    b = r.p[0]
    if 0x90 <= b <= 0x9f:
        r.p += 1
        return b & 0x0f
    if b == 0xdc and need(r, 3):
        n = <int64_t>be16(r.p + 1)
        r.p += 3
        return n
    r.bad = 1
    return -1


cdef const uint8_t *read_str(Reader *r, Py_ssize_t *length) noexcept nogil:
    """A str (fixstr or str8; longer strings are never a key or a side): its bytes."""
    cdef uint8_t b
    cdef const uint8_t *s
    if not need(r, 1):
        return NULL
    b = r.p[0]
    if 0xa0 <= b <= 0xbf:
        length[0] = b & 0x1f
        r.p += 1
    elif b == 0xd9 and need(r, 2):
        length[0] = r.p[1]
        r.p += 2
    else:
        r.bad = 1
        return NULL
    if not need(r, length[0]):
        return NULL
    s = r.p
    r.p += length[0]
    return s


cdef int read_int(Reader *r, int64_t *out, uint64_t *out_u, bint *is_big) noexcept nogil:
    """Any msgpack int. ``out`` gets it as int64 unless it is a uint64 above INT64_MAX
    (then ``is_big`` and only ``out_u``). Returns 0 when the value is not an int."""
    cdef uint8_t b
    cdef uint64_t u
    is_big[0] = False
    if not need(r, 1):
        return 0
    b = r.p[0]
    if b <= 0x7f:
        out[0] = b
        r.p += 1
    elif b >= 0xe0:
        out[0] = <int64_t>b - 256
        r.p += 1
    elif b == 0xcc and need(r, 2):
        out[0] = r.p[1]
        r.p += 2
    elif b == 0xcd and need(r, 3):
        out[0] = <int64_t>be16(r.p + 1)
        r.p += 3
    elif b == 0xce and need(r, 5):
        out[0] = <int64_t>be32(r.p + 1)
        r.p += 5
    elif b == 0xcf and need(r, 9):
        u = be64(r.p + 1)
        r.p += 9
        if u > <uint64_t>INT64_MAX_:
            is_big[0] = True
            out_u[0] = u
            return 1
        out[0] = <int64_t>u
    elif b == 0xd0 and need(r, 2):
        out[0] = <int64_t>(<signed char>r.p[1])
        r.p += 2
    elif b == 0xd1 and need(r, 3):
        out[0] = <int64_t>(<short>be16(r.p + 1))
        r.p += 3
    elif b == 0xd2 and need(r, 5):
        out[0] = <int64_t>(<int32_t>be32(r.p + 1))
        r.p += 5
    elif b == 0xd3 and need(r, 9):
        out[0] = <int64_t>be64(r.p + 1)
        r.p += 9
    else:
        r.bad = 1
        return 0
    if not is_big[0]:
        out_u[0] = <uint64_t>out[0]
    return 1


cdef inline int64_t read_i64(Reader *r, int64_t lo) noexcept nogil:
    """An int in ``[lo, INT64_MAX]``; anything else marks the reader bad."""
    cdef int64_t v = 0
    cdef uint64_t u
    cdef bint big
    if not read_int(r, &v, &u, &big) or big or v < lo:
        r.bad = 1
        return 0
    return v


cdef inline bint key_is(const uint8_t *k, Py_ssize_t n, const char *name, Py_ssize_t m) noexcept nogil:
    return n == m and memcmp(k, name, m) == 0


# ------------------------------------------------------------------ headers

cdef enum:
    H_V = 1
    H_T = 2
    H_SEQ = 4
    H_TS = 8
    H_ALL = 15


cdef int header_key(Reader *r, const uint8_t *k, Py_ssize_t n, int *seen, int64_t *t,
                    uint64_t *seq, int64_t *ts) noexcept nogil:
    """Read the value of header key ``k`` if it is one: 1 (read), 0 (not a header key)."""
    cdef int64_t v = 0
    cdef uint64_t u = 0
    cdef bint big
    cdef int bit
    if key_is(k, n, b"v", 1):
        bit = H_V
        if not read_int(r, &v, &u, &big) or big or v != 1:
            r.bad = 1
    elif key_is(k, n, b"t", 1):
        bit = H_T
        t[0] = read_i64(r, 0)
    elif key_is(k, n, b"seq", 3):
        bit = H_SEQ
        if not read_int(r, &v, &u, &big) or u < 1 or (not big and v < 1):
            r.bad = 1
        seq[0] = u
    elif key_is(k, n, b"ts_ns", 5):
        bit = H_TS
        ts[0] = read_i64(r, 0)
    else:
        return 0
    if seen[0] & bit:
        r.bad = 1                      # duplicate key
    seen[0] |= bit
    return 1


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


cdef inline bint push(RingHeader *h, RingRecord *recs, int instrument, int64_t row, int64_t delta,
                      int64_t price, int64_t fee, uint64_t ref, int64_t ts_ns, int64_t aux) noexcept nogil:
    """``_shm.ring_push``: one record, single producer; False when the ring is full."""
    cdef uint64_t w = h.write_idx
    cdef RingRecord *rec
    if w - me_atomic_load_u64(&h.read_idx) >= <uint64_t>h.capacity:
        return False
    rec = &recs[w & <uint64_t>(h.capacity - 1)]
    rec.kind = LEG_KIND
    rec.instrument = instrument
    rec.row = row
    rec.delta = delta
    rec.price = price
    rec.fee = fee
    rec.ref = ref
    rec.ts_ns = ts_ns
    rec.aux = aux
    me_atomic_store_u64(&h.write_idx, w + 1)
    return True


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
        cdef const uint8_t[::1] mv
        cdef const uint8_t *data
        cdef Py_ssize_t size
        cdef uint64_t first = 0
        cdef int64_t ts = 0, n = 0
        cdef int status
        if self.cap - self.n < MAX_BATCH:
            raise ValueError("FillIntake.parse: buffer full, route first")
        if type(frame) is bytes:
            data = <const uint8_t *><const char *>frame
            size = len(<bytes>frame)
        else:
            mv = frame
            size = mv.shape[0]
            data = &mv[0] if size else NULL
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
            memcpy(self.buf + self.n, self.buf + self.n + skip, <size_t>(n - skip) * sizeof(FillOut))
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
                elif taker < 0 or maker < 0 or taker == maker:
                    code = CODE_UNKNOWN_ACCOUNT
                elif f.qty_units == 0:
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
                    if not push(<RingHeader *>ring[0], <RingRecord *>ring[1], <int>f.instrument_id,
                                taker, f.qty_units, f.price_units, f.taker_fee_units, f.seq, recv_ns,
                                f.trade_id):
                        status = ST_RING_FULL
                        break
                    workers |= (<uint64_t>1) << self.owner[p]
                    leg = 1
                p = maker // self.per_partition
                ring = &self.rings[2 * p]
                if not push(<RingHeader *>ring[0], <RingRecord *>ring[1], <int>f.instrument_id,
                            maker, -f.qty_units, f.price_units, f.maker_fee_units, f.seq, recv_ns,
                            f.trade_id):
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
    cdef Reader r
    cdef int64_t n_pairs, i, t = -1, ts = 0, req = 0, acct = 0, ins = 0, qty = 0, price = 0
    cdef uint64_t seq = 0
    cdef int seen = 0, fseen = 0, bit
    cdef Py_ssize_t kl = 0
    cdef const uint8_t *k
    if frame.shape[0] == 0 or frame.shape[0] > max_size:
        return None
    r.p = &frame[0]
    r.end = r.p + frame.shape[0]
    r.bad = 0
    with nogil:
        n_pairs = read_map(&r)
        if n_pairs != 9:
            r.bad = 1
        for i in range(n_pairs):
            if r.bad:
                break
            k = read_str(&r, &kl)
            if r.bad:
                break
            if header_key(&r, k, kl, &seen, &t, &seq, &ts):
                continue
            if key_is(k, kl, b"request_id", 10):
                bit = 1
                req = read_i64(&r, 0)
            elif key_is(k, kl, b"account", 7):
                bit = 2
                acct = read_i64(&r, 0)
            elif key_is(k, kl, b"instrument_id", 13):
                bit = 4
                ins = read_i64(&r, 0)
            elif key_is(k, kl, b"qty_units", 9):
                bit = 8
                qty = read_i64(&r, -INT64_MAX_ - 1)
            elif key_is(k, kl, b"price_units", 11):
                bit = 16
                price = read_i64(&r, -INT64_MAX_ - 1)
            else:
                r.bad = 1
                break
            if fseen & bit:
                r.bad = 1
            fseen |= bit
        if r.p != r.end or seen != H_ALL or fseen != 31 or t != T_ORDER_CHECK:
            r.bad = 1
    if r.bad:
        return None
    return (seq, req, acct, ins, qty, price)


# ------------------------------------------------------------------ encoding

cdef inline uint8_t *put_be(uint8_t *o, uint64_t v, int nbytes) noexcept nogil:
    cdef int i
    for i in range(nbytes):
        o[i] = <uint8_t>(v >> (8 * (nbytes - 1 - i)))
    return o + nbytes


cdef uint8_t *put_int(uint8_t *o, int64_t v) noexcept nogil:
    """The smallest msgpack int encoding (what msgpack-python's packer writes)."""
    if v >= 0:
        if v <= 0x7f:
            o[0] = <uint8_t>v
            return o + 1
        if v <= 0xff:
            o[0] = 0xcc
            return put_be(o + 1, <uint64_t>v, 1)
        if v <= 0xffff:
            o[0] = 0xcd
            return put_be(o + 1, <uint64_t>v, 2)
        if v <= <int64_t>4294967295:
            o[0] = 0xce
            return put_be(o + 1, <uint64_t>v, 4)
        o[0] = 0xcf
        return put_be(o + 1, <uint64_t>v, 8)
    if v >= -32:
        o[0] = <uint8_t>(v & 0xff)
        return o + 1
    if v >= -128:
        o[0] = 0xd0
        return put_be(o + 1, <uint64_t>v, 1)
    if v >= -32768:
        o[0] = 0xd1
        return put_be(o + 1, <uint64_t>v, 2)
    if v >= -<int64_t>2147483648:
        o[0] = 0xd2
        return put_be(o + 1, <uint64_t>v, 4)
    o[0] = 0xd3
    return put_be(o + 1, <uint64_t>v, 8)


cdef uint8_t *put_uint(uint8_t *o, uint64_t v) noexcept nogil:
    if v <= <uint64_t>INT64_MAX_:
        return put_int(o, <int64_t>v)
    o[0] = 0xcf
    return put_be(o + 1, v, 8)


cdef inline uint8_t *put_key(uint8_t *o, const char *k, int n) noexcept nogil:
    o[0] = <uint8_t>(0xa0 | n)
    memcpy(o + 1, k, n)
    return o + 1 + n


cdef inline uint8_t *put_f64(uint8_t *o, double x) noexcept nogil:
    cdef uint64_t u
    memcpy(&u, &x, 8)
    o[0] = 0xcb
    return put_be(o + 1, u, 8)


def encode_check_reply(uint64_t seq, int64_t ts_ns, int64_t request_id, int64_t code,
                       double post_equity_usd, double post_initial_margin_usd):
    """ORDER_CHECK_REPLY body, byte for byte what ``Sequencer.encode_known`` writes."""
    cdef uint8_t buf[160]
    cdef uint8_t *o = buf
    with nogil:
        o[0] = 0x88                     # fixmap, 8 pairs
        o += 1
        o = put_key(o, b"v", 1)
        o = put_int(o, 1)
        o = put_key(o, b"t", 1)
        o = put_int(o, T_ORDER_CHECK_REPLY)
        o = put_key(o, b"seq", 3)
        o = put_uint(o, seq)
        o = put_key(o, b"ts_ns", 5)
        o = put_int(o, ts_ns)
        o = put_key(o, b"request_id", 10)
        o = put_int(o, request_id)
        o = put_key(o, b"code", 4)
        o = put_int(o, code)
        o = put_key(o, b"post_equity_usd", 15)
        o = put_f64(o, post_equity_usd)
        o = put_key(o, b"post_initial_margin_usd", 23)
        o = put_f64(o, post_initial_margin_usd)
    return (<char *>buf)[:o - buf]
