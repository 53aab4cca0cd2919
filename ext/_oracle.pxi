# The mark-price stage's common case in C (included by ext/_wire.pyx).
#
# feeds/oracle/index.py (MarkPriceCalculator) is the reference and owns the rules. This
# path takes one ORACLE_TICK frame from zmq_recv to the published mark with no Python in
# between, but only in the case where the reference would change nothing but one quote
# and the mark: a well-formed frame (strict msgpack reader, 8 pairs) for an instrument
# whose state the reference last left "clean" (live, no venue excluded), from a venue
# already quoting it, not ahead of the receive time by more than ``max_future_skew_ns``,
# not backwards and not stale, after which every fresh venue is within ``max_deviation``
# of the median of the others and the quorum still holds. Then
#
#     index = median(fresh prices)        mark = index + clamp(basis, max_basis * index)
#
# is the reference's rule 3 and 6 with no exclusion and no transition, so no event --
# when that mark is finite (else the reference freezes the instrument: rule 4). In
# every other case it answers TICK_FALLBACK with nothing changed, and the caller runs
# the reference. Each tick taken here is queued (``take_applied``) for the caller to
# fold into the reference afterwards, off the tick's path; the caller re-syncs an
# instrument's state here (``sync``) after the reference handled one of its ticks.
from libc.math cimport fabs, fmin, fmax, isfinite, isnan, NAN
from libc.stdlib cimport malloc, free, calloc, realloc
from libc.string cimport memmove
from _types cimport PriceRow
from _seqlock cimport (me_seqlock_write_begin, me_seqlock_write_end, me_atomic_add_u64, me_doorbell,
                       me_doorbell_ring)

TICK_FALLBACK = 0          # the reference decides (nothing changed here)
TICK_TAKEN = 1             # applied; the mark did not move (nothing published)
TICK_PUBLISHED = 2         # applied; the new mark is published and the doorbells rung

cdef enum:
    OF_FALLBACK = 0
    OF_TAKEN = 1
    OF_PUBLISHED = 2
    OF_MAX_VENUES = 16
    OF_NAME = 64               # protocol NAME: 1..64 ASCII bytes
    T_ORACLE_TICK = 1
    OF_PRICE_FROZEN = 1        # PriceRow.flags bit 0


ctypedef struct OfQuote:
    double price
    int64_t venue_ts_ns
    int64_t fresh_ts_ns          # min(venue_ts_ns, receive time)
    int32_t name_len
    char name[OF_NAME]

ctypedef struct OfInstrument:
    int32_t name_len
    char name[OF_NAME]
    int32_t n_venues
    int32_t clean                # the reference's state: live, nothing excluded
    double basis
    OfQuote q[OF_MAX_VENUES]

ctypedef struct OfApplied:       # a tick taken here, for the reference to fold later
    int32_t instrument
    int32_t venue_len
    char venue[OF_NAME]          # copied: a later sync may reorder the quotes
    double price
    int64_t venue_ts_ns
    int64_t recv_ns
    uint64_t seq
    double mark                  # the mark published (NaN when nothing was published)

ctypedef struct OfTick:          # a parsed ORACLE_TICK
    uint64_t seq
    const uint8_t *venue
    Py_ssize_t venue_len
    const uint8_t *instrument
    Py_ssize_t instrument_len
    double price
    int64_t venue_ts_ns


cdef inline bint stale(int64_t now_ns, int64_t ts_ns, int64_t staleness_ns) noexcept nogil:
    """``now_ns - ts_ns > staleness_ns`` without int64 overflow (Python's ints never wrap)."""
    return ts_ns < now_ns and <uint64_t>now_ns - <uint64_t>ts_ns > <uint64_t>staleness_ns


cdef inline bint ahead(int64_t now_ns, int64_t ts_ns, int64_t skew_ns) noexcept nogil:
    """``ts_ns - now_ns > skew_ns`` without int64 overflow: the reference's
    ``ORACLE_TS_FUTURE`` check (``max_future_skew_ns``)."""
    return ts_ns > now_ns and <uint64_t>ts_ns - <uint64_t>now_ns > <uint64_t>skew_ns


cdef inline bint name_ok(const uint8_t *s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if s == NULL or n < 1 or n > OF_NAME:
        return False
    for i in range(n):
        if s[i] >= 0x80:
            return False
    return True


cdef int parse_oracle_tick_c(const uint8_t *data, Py_ssize_t size, OfTick *out) noexcept nogil:
    """A well-formed ORACLE_TICK (float64 price) into ``out``: 1, or 0 (the reference decides)."""
    cdef Reader r
    cdef int64_t n_pairs, i, t = -1, ts = 0
    cdef uint64_t seq = 0, u
    cdef int seen = 0, fseen = 0, bit
    cdef Py_ssize_t kl = 0
    cdef const uint8_t *k
    if size == 0 or size > 4096:
        return 0
    r.p = data
    r.end = data + size
    r.bad = 0
    n_pairs = read_map(&r)
    if n_pairs != 8:
        r.bad = 1
    for i in range(n_pairs):
        if r.bad:
            break
        k = read_str(&r, &kl)
        if r.bad:
            break
        if header_key(&r, k, kl, &seen, &t, &seq, &ts):
            continue
        if key_is(k, kl, b"venue", 5):
            bit = 1
            out.venue = read_str(&r, &out.venue_len)
            if not r.bad and not name_ok(out.venue, out.venue_len):
                r.bad = 1
        elif key_is(k, kl, b"instrument", 10):
            bit = 2
            out.instrument = read_str(&r, &out.instrument_len)
            if not r.bad and not name_ok(out.instrument, out.instrument_len):
                r.bad = 1
        elif key_is(k, kl, b"price", 5):
            bit = 4
            if need(&r, 9) and r.p[0] == 0xcb:
                u = be64(r.p + 1)
                memcpy(&out.price, &u, 8)
                r.p += 9
                if not isfinite(out.price):
                    r.bad = 1
            else:
                r.bad = 1                    # an int or float32 price: the reference decides
        elif key_is(k, kl, b"venue_ts_ns", 11):
            bit = 8
            out.venue_ts_ns = read_i64(&r, -INT64_MAX_ - 1)
        else:
            r.bad = 1
            break
        if fseen & bit:
            r.bad = 1
        fseen |= bit
    if r.bad or r.p != r.end or seen != H_ALL or fseen != 15 or t != T_ORACLE_TICK:
        return 0
    out.seq = seq
    return 1


cdef inline void sort_small(double *v, int n) noexcept nogil:
    cdef int i, j
    cdef double x
    for i in range(1, n):
        x = v[i]
        j = i - 1
        while j >= 0 and v[j] > x:
            v[j + 1] = v[j]
            j -= 1
        v[j + 1] = x


cdef inline double median_sorted(const double *v, int n) noexcept nogil:
    """``feeds.oracle.index.median`` of sorted ``v`` (the same float operations): the
    mean of the middle two ``a <= b`` as ``a + 0.5 * (b - a)``, which cannot overflow."""
    if n % 2:
        return v[n // 2]
    return v[n // 2 - 1] + 0.5 * (v[n // 2] - v[n // 2 - 1])


cdef class OracleFast:
    """ORACLE_TICK frame -> published mark in C, for the common case (see the module
    comment in ext/_oracle.pxi; feeds/oracle/index.py is the reference).

    ``prices_addr``: the shared price table; ``price_seq_addr``: the header's global
    price counter; ``names``: instrument names in table order; ``doorbells``: the
    addresses to ring on a new mark; the rest are ``OracleParams`` fields.
    """
    cdef OfInstrument *ins
    cdef int n_ins
    cdef PriceRow *prices
    cdef uint64_t *price_seq
    cdef me_doorbell **bells
    cdef int n_bells
    cdef int64_t staleness_ns, max_future_skew_ns
    cdef int quorum
    cdef double max_deviation, max_basis
    cdef OfApplied *applied
    cdef int n_applied, cap_applied
    cdef public int last_instrument       # the instrument of the last tick taken

    def __cinit__(self):
        self.ins = NULL
        self.bells = NULL
        self.applied = NULL

    def __init__(self, size_t prices_addr, size_t price_seq_addr, list names, list doorbells,
                 int64_t staleness_ns, int quorum, double max_deviation, double max_basis,
                 int64_t max_future_skew_ns):
        cdef int i
        cdef bytes b
        if staleness_ns < 0 or max_future_skew_ns < 0 or not isfinite(max_deviation) or not isfinite(max_basis):
            raise ValueError("OracleFast: staleness_ns and max_future_skew_ns >= 0, finite max_deviation "
                             "and max_basis")
        self.n_ins = len(names)
        self.ins = <OfInstrument *>calloc(max(1, self.n_ins), sizeof(OfInstrument))
        self.n_bells = len(doorbells)
        self.bells = <me_doorbell **>calloc(max(1, self.n_bells), sizeof(me_doorbell *))
        self.cap_applied = 64
        self.applied = <OfApplied *>malloc(self.cap_applied * sizeof(OfApplied))
        if self.ins == NULL or self.bells == NULL or self.applied == NULL:
            raise MemoryError()
        for i in range(self.n_ins):
            b = names[i].encode("ascii")
            if not 1 <= len(b) <= OF_NAME:
                raise ValueError(f"OracleFast: instrument name {names[i]!r} not 1..{OF_NAME} bytes")
            self.ins[i].name_len = len(b)
            memcpy(self.ins[i].name, <const char *>b, len(b))
        for i in range(self.n_bells):
            self.bells[i] = <me_doorbell *><size_t>doorbells[i]
        self.prices = <PriceRow *>prices_addr
        self.price_seq = <uint64_t *>price_seq_addr
        self.staleness_ns = staleness_ns
        self.max_future_skew_ns = max_future_skew_ns
        self.quorum = max(1, quorum)
        self.max_deviation = max_deviation
        self.max_basis = max_basis
        self.n_applied = 0
        self.last_instrument = -1

    def __dealloc__(self):
        free(self.ins)
        free(self.bells)
        free(self.applied)

    def sync(self, int instrument, list quotes, bint clean, double basis):
        """Set ``instrument``'s state to the reference's: ``quotes`` = [(venue, price,
        venue_ts_ns, fresh_ts_ns)], ``clean`` = live with no venue excluded. More venues
        than this path holds leave the instrument to the reference."""
        cdef OfInstrument *s
        cdef int j
        cdef bytes b
        if not 0 <= instrument < self.n_ins:
            raise IndexError(f"OracleFast.sync: instrument {instrument} outside 0..{self.n_ins - 1}")
        s = &self.ins[instrument]
        s.n_venues = 0
        s.clean = 0
        s.basis = basis
        if len(quotes) > OF_MAX_VENUES:
            return
        for j, (venue, price, venue_ts_ns, fresh_ts_ns) in enumerate(quotes):
            b = venue.encode("ascii") if isinstance(venue, str) else bytes(venue)
            if not 1 <= len(b) <= OF_NAME:
                return                      # not a name this path parses: leave it clean = 0
            s.q[j].name_len = len(b)
            memcpy(s.q[j].name, <const char *>b, len(b))
            s.q[j].price = price
            s.q[j].venue_ts_ns = venue_ts_ns
            s.q[j].fresh_ts_ns = fresh_ts_ns
        s.n_venues = len(quotes)
        s.clean = 1 if clean and isfinite(basis) else 0

    def state(self, int instrument):
        """``(clean, basis, [(venue, price, venue_ts_ns, fresh_ts_ns)])`` as held here (tests)."""
        cdef OfInstrument *s
        if not 0 <= instrument < self.n_ins:
            raise IndexError(instrument)
        s = &self.ins[instrument]
        return (bool(s.clean), s.basis,
                [(s.q[j].name[:s.q[j].name_len].decode("ascii"), s.q[j].price, s.q[j].venue_ts_ns,
                  s.q[j].fresh_ts_ns) for j in range(s.n_venues)])

    def on_frame(self, frame, int64_t recv_ns):
        """Take one frame: TICK_FALLBACK (the reference decides; nothing changed),
        TICK_TAKEN (quote applied, mark unchanged) or TICK_PUBLISHED (new mark published,
        doorbells rung). ``last_instrument`` names the instrument of a taken tick."""
        cdef bytes raw = frame_bytes(frame)
        cdef Py_ssize_t n = len(raw)
        return self.take(<const uint8_t *>(<char *>raw), n, recv_ns)    # ~1 us: keeps the GIL

    cdef int take(self, const uint8_t *data, Py_ssize_t size, int64_t recv_ns) noexcept nogil:
        cdef OfTick t
        cdef OfInstrument *s = NULL
        cdef OfQuote *q = NULL
        cdef OfApplied *a
        cdef PriceRow *pr
        cdef double fresh[OF_MAX_VENUES]
        cdef double others[OF_MAX_VENUES]
        cdef double ref, index, mark, bound, p
        cdef int i, j, m, n_fresh = 0, slot = -1
        cdef int64_t fresh_ts, ts
        if not parse_oracle_tick_c(data, size, &t) or not (t.price > 0):
            return OF_FALLBACK
        for i in range(self.n_ins):                                     # the instrument
            if self.ins[i].name_len == t.instrument_len and \
                    memcmp(self.ins[i].name, t.instrument, t.instrument_len) == 0:
                s = &self.ins[i]
                break
        if s == NULL or not s.clean:
            return OF_FALLBACK
        for j in range(s.n_venues):                                     # the venue
            if s.q[j].name_len == t.venue_len and memcmp(s.q[j].name, t.venue, t.venue_len) == 0:
                slot = j
                break
        if slot < 0:
            return OF_FALLBACK
        q = &s.q[slot]
        fresh_ts = t.venue_ts_ns if t.venue_ts_ns < recv_ns else recv_ns
        if ahead(recv_ns, t.venue_ts_ns, self.max_future_skew_ns) or t.venue_ts_ns < q.venue_ts_ns \
                or stale(recv_ns, fresh_ts, self.staleness_ns):
            return OF_FALLBACK                                          # future, backwards or stale: rejected there
        for j in range(s.n_venues):                                     # rule 1: the fresh venues
            ts = fresh_ts if j == slot else s.q[j].fresh_ts_ns
            if not stale(recv_ns, ts, self.staleness_ns):
                fresh[n_fresh] = t.price if j == slot else s.q[j].price
                n_fresh += 1
        if n_fresh < self.quorum:
            return OF_FALLBACK                                          # a freeze: the reference
        if n_fresh >= 2:                                                # rule 2: nobody excluded
            for j in range(n_fresh):
                m = 0
                for i in range(n_fresh):
                    if i != j:
                        others[m] = fresh[i]
                        m += 1
                sort_small(others, m)
                ref = median_sorted(others, m)
                if fabs(fresh[j] - ref) / ref > self.max_deviation:
                    return OF_FALLBACK
        sort_small(fresh, n_fresh)
        index = median_sorted(fresh, n_fresh)                           # rule 3
        bound = self.max_basis * index
        mark = index + fmax(-bound, fmin(bound, s.basis))               # rule 6
        if not isfinite(mark):
            return OF_FALLBACK                                          # never live: the reference freezes
        if self.n_applied == self.cap_applied:
            a = <OfApplied *>realloc(self.applied, 2 * self.cap_applied * sizeof(OfApplied))
            if a == NULL:
                return OF_FALLBACK
            self.applied = a
            self.cap_applied *= 2
        q.price = t.price                                               # commit
        q.venue_ts_ns = t.venue_ts_ns
        q.fresh_ts_ns = fresh_ts
        i = <int>(s - self.ins)
        self.last_instrument = i
        a = &self.applied[self.n_applied]
        self.n_applied += 1
        a.instrument = i
        a.venue_len = q.name_len
        memcpy(a.venue, q.name, q.name_len)
        a.price = t.price
        a.venue_ts_ns = t.venue_ts_ns
        a.recv_ns = recv_ns
        a.seq = t.seq
        a.mark = NAN
        pr = &self.prices[i]                                            # publish (sole writer)
        if pr.mark == mark and not (pr.flags & OF_PRICE_FROZEN):
            return OF_TAKEN
        me_seqlock_write_begin(&pr.seq)
        pr.mark = mark
        pr.index = index
        pr.ts_ns = recv_ns
        pr.flags = 0
        pr.tick_seq = t.seq
        pr.price_seq = pr.price_seq + 1
        me_seqlock_write_end(&pr.seq)
        me_atomic_add_u64(self.price_seq, 1)
        for j in range(self.n_bells):
            me_doorbell_ring(self.bells[j])
        a.mark = mark
        return OF_PUBLISHED

    @property
    def n_applied(self):
        return self.n_applied

    def take_applied(self, int limit=-1):
        """The oldest ``limit`` (all when negative) ticks taken and not yet taken from
        here, oldest first, as ``(instrument, venue, price, venue_ts_ns, recv_ns, seq,
        published_mark or None)``; they leave the queue."""
        cdef int k, n = self.n_applied if limit < 0 or limit > self.n_applied else limit
        cdef OfApplied *a
        out = []
        for k in range(n):
            a = &self.applied[k]
            out.append((a.instrument, a.venue[:a.venue_len].decode("ascii"),
                        a.price, a.venue_ts_ns, a.recv_ns, a.seq, None if isnan(a.mark) else a.mark))
        if n < self.n_applied:
            memmove(self.applied, self.applied + n, (self.n_applied - n) * sizeof(OfApplied))
        self.n_applied -= n
        return out
