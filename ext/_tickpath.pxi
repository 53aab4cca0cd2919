# The worker's stage 1a in C (included by ext/_margin.pyx): from a moved mark to the
# encoded LIQUIDATION_ORDER frames, with no Python in between.
#
# Python reference of each step: the price snapshot (engine.store.shm.Store.price_snapshot
# and engine.risk.margin._checked_snapshot), the trigger search
# (engine.risk.margin.HolderIndex.candidates with a previous mark), the orders
# (engine.liquidation.decide.decide; ``decide_core`` above is the kernel it calls) and
# the frame (feeds.protocol.Sequencer.encode_known). engine/runtime/worker.py sends the
# frames, then does the bookkeeping in Python (events, the outstanding table) and
# decides in Python any account the kernel declines (a number out of its range).
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME
from cpython.bytes cimport PyBytes_FromStringAndSize

cdef enum:
    T_LIQUIDATION_ORDER = 30
    TP_INFO = 11                          # columns of an order's record (TickPath.orders)
    TP_FLAG_OUTSTANDING = 1               # AccountRow.flags bit 0
    TP_PRICE_FROZEN = 1                   # PriceRow.flags bit 0

#: Columns of ``TickPath.orders()``.
ORDER_COLUMNS = ("row", "account", "instrument_id", "qty_units", "limit_price_units", "reason",
                 "order_id", "tick_seq", "tick_recv_ns", "decided_ns", "sent_ns")


cdef inline int64_t wall_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef Py_ssize_t encode_liq_order_c(uint8_t *buf, uint64_t seq, int64_t ts_ns, const int64_t *o) noexcept nogil:
    """LIQUIDATION_ORDER frame of record ``o`` (ORDER_COLUMNS) into ``buf`` (256 bytes is
    room), byte for byte what ``Sequencer.encode_known`` writes; returns its length."""
    cdef uint8_t *p = buf
    p[0] = 0x8e                           # fixmap, 14 pairs
    p += 1
    p = put_key(p, b"v", 1)
    p = put_int(p, 1)
    p = put_key(p, b"t", 1)
    p = put_int(p, T_LIQUIDATION_ORDER)
    p = put_key(p, b"seq", 3)
    p = put_uint(p, seq)
    p = put_key(p, b"ts_ns", 5)
    p = put_int(p, ts_ns)
    p = put_key(p, b"order_id", 8)
    p = put_int(p, o[6])
    p = put_key(p, b"account", 7)
    p = put_int(p, o[1])
    p = put_key(p, b"instrument_id", 13)
    p = put_int(p, o[2])
    p = put_key(p, b"qty_units", 9)
    p = put_int(p, o[3])
    p = put_key(p, b"limit_price_units", 17)
    p = put_int(p, o[4])
    p = put_key(p, b"reason", 6)
    p = put_int(p, o[5])
    p = put_key(p, b"tick_seq", 8)
    p = put_uint(p, <uint64_t>o[7])
    p = put_key(p, b"tick_recv_ns", 12)
    p = put_int(p, o[8])
    p = put_key(p, b"decided_ns", 10)
    p = put_int(p, o[9])
    p = put_key(p, b"sent_ns", 7)
    p = put_int(p, o[10])
    return p - buf


ctypedef struct Triggers:                 # one instrument's sorted triggers in one partition
    const double *long_t
    const int64_t *long_rows
    Py_ssize_t n_long
    const double *short_t
    const int64_t *short_rows
    Py_ssize_t n_short


cdef inline Py_ssize_t search_left(const double *a, Py_ssize_t n, double x) noexcept nogil:
    """numpy.searchsorted(a, x, side="left")."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline Py_ssize_t search_right(const double *a, Py_ssize_t n, double x) noexcept nogil:
    """numpy.searchsorted(a, x, side="right")."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef inline Py_ssize_t crossed_span(const Triggers *t, double mark, double prev, const int64_t **rows,
                                   Py_ssize_t *first, Py_ssize_t *step) noexcept nogil:
    """The accounts a move from ``prev`` to ``mark`` put in breach: ``n`` rows, visited as
    ``rows[first + j * step]`` for ``j < n``. Longs ``mark <= t <= prev``, most breached
    first; shorts ``prev <= t <= mark`` (HolderIndex.candidates with a previous mark).
    Both ends: an account whose trigger is the previous mark was visited then and not in
    breach (``E < MM`` is strict), so the move away from it must visit it again."""
    cdef Py_ssize_t a, b
    if mark < prev:
        a = search_left(t.long_t, t.n_long, mark)
        b = search_right(t.long_t, t.n_long, prev)
        rows[0], first[0], step[0] = t.long_rows, b - 1, -1
        return b - a
    if mark > prev:
        a = search_left(t.short_t, t.n_short, prev)
        b = search_right(t.short_t, t.n_short, mark)
        rows[0], first[0], step[0] = t.short_rows, a, 1
        return b - a
    return 0


cdef class TickPath:
    """Stage 1a of one worker in C (see ext/_tickpath.pxi).

    ``stage_1a()``: snapshot every price (seqlocks); for each instrument whose price
    sequence moved since ``last_seqs``, unless frozen: the accounts of each partition
    whose trigger the move from ``prev_marks[i]`` to the new mark crossed (longs
    ``mark <= t <= prev``, from the most breached; shorts ``prev <= t <= mark``), each not
    already outstanding decided (``decide_core``), its orders encoded as frames and the
    account flagged outstanding. ``liquidate(rows, ...)``: the same for given rows
    (re-sends, breaches found by the holders' pass).

    After a call: ``frames`` (bytes, in order), ``orders()`` (one record per frame,
    ORDER_COLUMNS), ``fallback`` (``(row, tick_seq, tick_recv_ns)`` of the accounts the kernel declined,
    for the Python reference),
    ``changed`` (instruments whose price moved). ``last_seqs`` and ``prev_marks`` are the
    worker's arrays, updated in place. Order ids and the LIQUIDATION_ORDER sequence
    number are this object's (``order_id``, ``seq``): every order of the worker takes
    them here, including those encoded by ``encode_order``.
    """
    cdef const InstrumentRow *instruments
    cdef const PriceRow *prices
    cdef const AssetRow *assets
    cdef AccountRow *accounts
    cdef const PositionRow *positions
    cdef int n_ins, n_assets, slots, n_parts
    cdef Triggers *trig                    # n_parts x n_ins
    cdef list trig_refs
    cdef InsPass *table
    cdef int64_t *info
    cdef int64_t n_info, cap_info
    cdef int64_t dec_out[MAX_SLOTS_DECIDE * 4]
    cdef object _last_seqs, _prev_marks
    cdef uint64_t *last_seqs
    cdef double *prev_marks
    cdef public object marks, asset_px, asset_haircut, asset_scale, seqs, flags
    cdef double *c_marks
    cdef double *c_px
    cdef double *c_haircut
    cdef double *c_scale
    cdef uint64_t *c_seqs
    cdef uint64_t *c_tick_seq              # per instrument, from the same seqlock copy as the mark
    cdef int64_t *c_tick_ns
    cdef uint32_t *c_flags
    cdef public uint64_t seq
    cdef uint64_t *seq_slot                # where each order's seq is noted before it leaves (or NULL)
    cdef public int64_t order_id
    cdef public double health_factor
    cdef public list frames, fallback, changed
    cdef public bint assets_moved          # a collateral price changed in a snapshot (the caller resets it)

    def __cinit__(self):
        self.seq_slot = NULL
        self.trig = NULL
        self.table = NULL
        self.info = NULL

    def __init__(self, size_t instruments_addr, size_t prices_addr, size_t assets_addr, int n_assets,
                 size_t accounts_addr, size_t positions_addr, int slots_per_account, int n_instruments,
                 int n_partitions, last_seqs, prev_marks, int64_t order_id, double health_factor):
        cdef uint64_t[::1] ls = last_seqs
        cdef double[::1] pm = prev_marks
        if ls.shape[0] != n_instruments or pm.shape[0] != n_instruments or not 0 < n_assets <= MAX_ASSETS:
            raise ValueError("TickPath: last_seqs and prev_marks of one entry per instrument, 1..8 assets")
        self.instruments = <const InstrumentRow *>instruments_addr
        self.prices = <const PriceRow *>prices_addr
        self.assets = <const AssetRow *>assets_addr
        self.accounts = <AccountRow *>accounts_addr
        self.positions = <const PositionRow *>positions_addr
        self.n_ins, self.n_assets, self.slots, self.n_parts = n_instruments, n_assets, slots_per_account, n_partitions
        self._last_seqs, self._prev_marks = last_seqs, prev_marks
        self.last_seqs, self.prev_marks = &ls[0], &pm[0]
        self.trig = <Triggers *>calloc(max(1, n_partitions * n_instruments), sizeof(Triggers))
        self.table = <InsPass *>malloc(max(1, n_instruments) * sizeof(InsPass))
        self.cap_info = 256
        self.info = <int64_t *>malloc(self.cap_info * TP_INFO * sizeof(int64_t))
        self.c_tick_seq = <uint64_t *>calloc(max(1, n_instruments), sizeof(uint64_t))
        self.c_tick_ns = <int64_t *>calloc(max(1, n_instruments), sizeof(int64_t))
        if self.trig == NULL or self.table == NULL or self.info == NULL or self.c_tick_seq == NULL \
                or self.c_tick_ns == NULL:
            raise MemoryError()
        self.trig_refs = [None] * (n_partitions * n_instruments)
        import numpy as np
        self.marks, self.seqs = np.zeros(n_instruments), np.zeros(n_instruments, np.uint64)
        self.flags = np.zeros(n_instruments, np.uint32)
        self.asset_px, self.asset_haircut = np.zeros(MAX_ASSETS), np.zeros(MAX_ASSETS)
        self.asset_scale = np.ones(MAX_ASSETS)
        self.c_marks = <double *><size_t>self.marks.ctypes.data
        self.c_seqs = <uint64_t *><size_t>self.seqs.ctypes.data
        self.c_flags = <uint32_t *><size_t>self.flags.ctypes.data
        self.c_px = <double *><size_t>self.asset_px.ctypes.data
        self.c_haircut = <double *><size_t>self.asset_haircut.ctypes.data
        self.c_scale = <double *><size_t>self.asset_scale.ctypes.data
        self.seq = 0
        self.order_id = order_id
        self.health_factor = health_factor
        self.n_info = 0
        self.assets_moved = True
        self.frames, self.fallback, self.changed = [], [], []

    def __dealloc__(self):
        free(self.trig)
        free(self.table)
        free(self.info)
        free(self.c_tick_seq)
        free(self.c_tick_ns)

    def set_triggers(self, int k, int instrument, long_t, long_rows, short_t, short_rows):
        """Partition slot ``k``'s sorted triggers of ``instrument`` (HolderIndex.triggers),
        kept referenced here until replaced."""
        cdef const double[::1] lt = long_t
        cdef const int64_t[::1] lr = long_rows
        cdef const double[::1] st = short_t
        cdef const int64_t[::1] sr = short_rows
        cdef Triggers *t
        if not (0 <= k < self.n_parts and 0 <= instrument < self.n_ins):
            raise IndexError(f"TickPath.set_triggers: slot {k}, instrument {instrument}")
        if lt.shape[0] != lr.shape[0] or st.shape[0] != sr.shape[0]:
            raise ValueError("TickPath.set_triggers: triggers and rows of one length")
        t = &self.trig[k * self.n_ins + instrument]
        self.trig_refs[k * self.n_ins + instrument] = (long_t, long_rows, short_t, short_rows)
        t.n_long, t.n_short = lt.shape[0], st.shape[0]
        t.long_t = &lt[0] if t.n_long else NULL
        t.long_rows = &lr[0] if t.n_long else NULL
        t.short_t = &st[0] if t.n_short else NULL
        t.short_rows = &sr[0] if t.n_short else NULL

    cdef int snapshot(self) noexcept nogil:
        """Every price under its seqlock (``read_prices``); 0 when a row could not be read
        or a price is not finite and > 0 (the Python path then raises the clear error)."""
        return read_prices(self.prices, self.n_ins, self.assets, self.n_assets, 1000000, self.c_marks,
                           self.c_flags, self.c_seqs, self.c_tick_seq, self.c_tick_ns, self.c_px,
                           self.c_haircut, self.c_scale, &self.assets_moved)

    cdef int grow(self) noexcept nogil:
        cdef int64_t *p
        if self.n_info < self.cap_info:
            return 1
        p = <int64_t *>realloc(self.info, 2 * self.cap_info * TP_INFO * sizeof(int64_t))
        if p == NULL:
            return 0
        self.info, self.cap_info = p, 2 * self.cap_info
        return 1

    cdef int liquidate_row(self, int64_t row, uint64_t tick_seq, int64_t tick_recv_ns, bint reissue) except -1:
        """Decide, encode and flag one account; returns its number of orders."""
        cdef AccountRow *acct = &self.accounts[row]
        cdef int n, j
        cdef int64_t *o
        cdef int64_t decided
        cdef uint8_t buf[256]
        cdef Py_ssize_t size
        if (acct.flags & TP_FLAG_OUTSTANDING) and not reissue:
            return 0                                   # its first order for this breach is out
        n = decide_core(self.instruments, acct, &self.positions[row * self.slots], self.c_marks, self.c_px,
                        self.c_haircut, self.c_scale, MAX_ASSETS, self.health_factor, self.dec_out, self.table)
        if n < 0:
            self.fallback.append((row, tick_seq, tick_recv_ns))
            return 0
        for j in range(n):
            if not self.grow():
                raise MemoryError()
            decided = wall_ns()
            self.order_id += 1
            o = &self.info[self.n_info * TP_INFO]
            o[0], o[1], o[2], o[3] = row, acct.account_id, self.dec_out[4 * j], self.dec_out[4 * j + 1]
            o[4], o[5], o[6] = self.dec_out[4 * j + 2], self.dec_out[4 * j + 3], self.order_id & INT64_MAX_
            o[7], o[8], o[9] = <int64_t>tick_seq, tick_recv_ns, decided
            o[10] = wall_ns()
            self.seq += 1
            if self.seq_slot != NULL:
                self.seq_slot[0] = self.seq
            size = encode_liq_order_c(buf, self.seq, o[10], o)
            self.frames.append(PyBytes_FromStringAndSize(<char *>buf, size))
            self.n_info += 1
        if n:
            me_seqlock_write_begin(&acct.seq)
            acct.flags = acct.flags | TP_FLAG_OUTSTANDING
            me_seqlock_write_end(&acct.seq)
        return n

    cdef void reset(self):
        self.n_info = 0
        if self.frames:
            self.frames = []
        if self.fallback:
            self.fallback = []
        if self.changed:
            self.changed = []

    def stage_1a(self):
        """The hot path (class doc). Returns the number of orders encoded, or -1 when the
        prices could not be snapshot cleanly (nothing done: the Python path runs)."""
        cdef int i, k
        cdef int64_t n = 0
        cdef Py_ssize_t j, m, first, step
        cdef const int64_t *rows
        cdef double mark
        self.reset()
        if not self.snapshot():
            return -1
        for i in range(self.n_ins):
            if self.c_seqs[i] == self.last_seqs[i]:
                continue
            self.last_seqs[i] = self.c_seqs[i]
            self.changed.append(i)
            if self.c_flags[i] & TP_PRICE_FROZEN:
                continue                               # a frozen price pauses liquidations on it
            mark = self.c_marks[i]
            for k in range(self.n_parts):
                m = crossed_span(&self.trig[k * self.n_ins + i], mark, self.prev_marks[i], &rows, &first, &step)
                for j in range(m):
                    n += self.liquidate_row(rows[first + j * step], self.c_tick_seq[i], self.c_tick_ns[i], False)
            self.prev_marks[i] = mark
        return n

    def crossed(self, int k, int instrument, double mark, double prev):
        """The rows ``stage_1a`` would visit in partition slot ``k`` for a move from
        ``prev`` to ``mark``, in its order (the tests hold it to HolderIndex.candidates)."""
        cdef Py_ssize_t m, first = 0, step = 1
        cdef const int64_t *rows = NULL
        if not (0 <= k < self.n_parts and 0 <= instrument < self.n_ins):
            raise IndexError(f"TickPath.crossed: slot {k}, instrument {instrument}")
        m = crossed_span(&self.trig[k * self.n_ins + instrument], mark, prev, &rows, &first, &step)
        return [rows[first + j * step] for j in range(m)]

    def liquidate(self, const int64_t[::1] rows, uint64_t tick_seq, int64_t tick_recv_ns, bint reissue=False):
        """Orders for ``rows`` at a fresh snapshot (accounts already outstanding skipped
        unless ``reissue``). Returns the number of orders, or -1 (prices unreadable)."""
        cdef Py_ssize_t j
        cdef int64_t n = 0
        self.reset()
        if not self.snapshot():
            return -1
        for j in range(rows.shape[0]):
            n += self.liquidate_row(rows[j], tick_seq, tick_recv_ns, reissue)
        return n

    @property
    def n_orders(self):
        """Orders encoded by the last call."""
        return self.n_info

    def orders(self):
        """One record per frame of the last call, columns ORDER_COLUMNS (a copy)."""
        import numpy as np
        out = np.empty((self.n_info, TP_INFO), np.int64)
        if self.n_info:
            memcpy(<void *><size_t>out.ctypes.data, self.info, self.n_info * TP_INFO * sizeof(int64_t))
        return out

    def encode_order(self, int64_t row, int64_t account, int64_t instrument, int64_t qty_units,
                     int64_t limit_price_units, int64_t reason, uint64_t tick_seq, int64_t tick_recv_ns,
                     int64_t decided_ns):
        """Encode one order the Python reference decided, taking the next order id and
        sequence number here; returns ``(frame, record)``."""
        cdef int64_t o[TP_INFO]
        cdef uint8_t buf[256]
        cdef Py_ssize_t size
        self.order_id += 1
        o[0], o[1], o[2], o[3], o[4], o[5] = row, account, instrument, qty_units, limit_price_units, reason
        o[6], o[7], o[8], o[9] = self.order_id & INT64_MAX_, <int64_t>tick_seq, tick_recv_ns, decided_ns
        o[10] = wall_ns()
        self.seq += 1
        if self.seq_slot != NULL:
            self.seq_slot[0] = self.seq
        size = encode_liq_order_c(buf, self.seq, o[10], o)
        return PyBytes_FromStringAndSize(<char *>buf, size), [o[j] for j in range(TP_INFO)]

    def note_seq_at(self, size_t addr):
        """Note each order's sequence number at ``addr`` (a uint64 in shared memory) as it
        is encoded, before the caller sends it, and go on from the number found there:
        a restarted worker continues its stream's numbering."""
        self.seq_slot = <uint64_t *>addr
        self.seq = self.seq_slot[0]
