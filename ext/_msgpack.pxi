# Strict msgpack reading and writing for the wire fast paths (included by ext/_wire.pyx
# and ext/_margin.pyx). The reader accepts only what a well-formed body of the protocol
# uses (docs/protocol.md section 1) and marks itself bad on anything else; the caller
# then leaves the frame to the reference decoder (feeds/protocol.py).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcmp, memcpy

cdef int64_t INT64_MAX_ = 0x7fffffffffffffff


cdef inline bytes frame_bytes(object frame):
    """A frame as bytes: itself when it is bytes (zmq's recv), else one copy (memoryview,
    zmq.Frame, bytearray)."""
    return <bytes>frame if type(frame) is bytes else bytes(frame)

cdef enum:
    T_ORDER_CHECK = 20
    T_ORDER_CHECK_REPLY = 21

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
        if not read_int(r, &v, &u, &big) or big or (v != 1 and v != 2):   # versions 1, 2: the same bodies here
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


ctypedef struct CheckIn:                # a parsed ORDER_CHECK
    uint64_t seq
    int64_t request_id
    int64_t account
    int64_t instrument_id
    int64_t qty_units
    int64_t price_units


cdef int parse_order_check_c(const uint8_t *data, Py_ssize_t size, int64_t max_size,
                             CheckIn *out) noexcept nogil:
    """A well-formed ORDER_CHECK into ``out``: 1, or 0 (use the reference decoder)."""
    cdef Reader r
    cdef int64_t n_pairs, i, t = -1, ts = 0
    cdef uint64_t seq = 0
    cdef int seen = 0, fseen = 0, bit
    cdef Py_ssize_t kl = 0
    cdef const uint8_t *k
    if size == 0 or size > max_size:
        return 0
    r.p = data
    r.end = data + size
    r.bad = 0
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
            out.request_id = read_i64(&r, 0)
        elif key_is(k, kl, b"account", 7):
            bit = 2
            out.account = read_i64(&r, 0)
        elif key_is(k, kl, b"instrument_id", 13):
            bit = 4
            out.instrument_id = read_i64(&r, 0)
        elif key_is(k, kl, b"qty_units", 9):
            bit = 8
            out.qty_units = read_i64(&r, -INT64_MAX_ - 1)
        elif key_is(k, kl, b"price_units", 11):
            bit = 16
            out.price_units = read_i64(&r, -INT64_MAX_ - 1)
        else:
            r.bad = 1
            break
        if fseen & bit:
            r.bad = 1
        fseen |= bit
    if r.bad or r.p != r.end or seen != H_ALL or fseen != 31 or t != T_ORDER_CHECK:
        return 0
    out.seq = seq
    return 1


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


cdef Py_ssize_t encode_check_reply_c(uint8_t *buf, uint64_t seq, int64_t ts_ns, int64_t request_id,
                                     int64_t code, double post_equity_usd,
                                     double post_initial_margin_usd) noexcept nogil:
    """ORDER_CHECK_REPLY body into ``buf`` (160 bytes is room), byte for byte what
    ``Sequencer.encode_known`` writes; returns its length."""
    cdef uint8_t *o = buf
    if True:
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
    return o - buf
