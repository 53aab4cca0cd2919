# cython: language_level=3
"""Seqlock reads and writes of shared-memory rows, for the Python-level store API.

The owner of a row brackets its writes with ``write_begin``/``write_end``; any other
process copies a row with ``read_row``, which retries until it has a copy no writer
touched (see ext/seqlock.h for the memory orders).
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from _seqlock cimport (me_seqlock_write_begin, me_seqlock_write_end, me_seqlock_copy,
                       me_atomic_load_u64, me_atomic_store_u64, me_atomic_add_u64)
from _types cimport PriceRow, AssetRow, InstrumentRow, AccountRow, PositionRow


def write_begin(size_t row_addr):
    """Make the row's counter odd: readers will retry until ``write_end``."""
    me_seqlock_write_begin(<uint64_t *>row_addr)


def write_end(size_t row_addr):
    """Make the row's counter even again: the row is consistent."""
    me_seqlock_write_end(<uint64_t *>row_addr)


def read_row(size_t row_addr, unsigned char[::1] out, int64_t max_tries=1000000):
    """Copy ``len(out)`` bytes of the row into ``out`` under its seqlock.

    Returns the number of tries used, or -1 when no consistent copy was had in
    ``max_tries`` (a writer stopped mid-row or writes faster than a copy).
    """
    cdef int64_t tries
    cdef size_t n = out.shape[0]
    with nogil:
        tries = me_seqlock_copy(<const void *>row_addr, &out[0], n, max_tries)
    return tries


def write_row(size_t row_addr, const unsigned char[::1] src):
    """Replace a row (all but its leading counter) with ``src`` under its seqlock."""
    cdef size_t n = src.shape[0]
    with nogil:
        me_seqlock_write_begin(<uint64_t *>row_addr)
        memcpy(<char *>row_addr + 8, &src[8], n - 8)
        me_seqlock_write_end(<uint64_t *>row_addr)


def publish_price(size_t price_row_addr, double mark, double index, int64_t ts_ns, unsigned int flags,
                  uint64_t tick_seq=0):
    """Write one instrument's mark under its seqlock and bump its price sequence number."""
    cdef PriceRow *p = <PriceRow *>price_row_addr
    with nogil:
        me_seqlock_write_begin(&p.seq)
        p.mark = mark
        p.index = index
        p.ts_ns = ts_ns
        p.flags = flags
        p.tick_seq = tick_seq
        p.price_seq = p.price_seq + 1
        me_seqlock_write_end(&p.seq)


def publish_asset_price(size_t asset_row_addr, double price_usd, int64_t ts_ns):
    """Write one collateral asset's oracle price under its seqlock."""
    cdef AssetRow *a = <AssetRow *>asset_row_addr
    with nogil:
        me_seqlock_write_begin(&a.seq)
        a.price_usd = price_usd
        a.ts_ns = ts_ns
        me_seqlock_write_end(&a.seq)


def snapshot_prices(size_t prices_addr, int n, double[::1] marks, uint64_t[::1] price_seqs,
                    unsigned int[::1] flags, int64_t max_tries=1000000):
    """Copy every instrument's mark, price sequence number and flags, each under its seqlock.

    Returns the number of rows that could not be read consistently (normally 0).
    """
    cdef const PriceRow *rows = <const PriceRow *>prices_addr
    cdef PriceRow tmp
    cdef int i, failed = 0
    with nogil:
        for i in range(n):
            if me_seqlock_copy(&rows[i], &tmp, sizeof(PriceRow), max_tries) < 0:
                failed += 1
                continue
            marks[i] = tmp.mark
            price_seqs[i] = tmp.price_seq
            flags[i] = tmp.flags
    return failed


def snapshot_assets(size_t assets_addr, int n, double[::1] price_usd, double[::1] haircut,
                    double[::1] scale, int64_t max_tries=1000000):
    """Copy every asset's price, haircut and scale under its seqlock; returns failures."""
    cdef const AssetRow *rows = <const AssetRow *>assets_addr
    cdef AssetRow tmp
    cdef int i, failed = 0
    with nogil:
        for i in range(n):
            if me_seqlock_copy(&rows[i], &tmp, sizeof(AssetRow), max_tries) < 0:
                failed += 1
                continue
            price_usd[i] = tmp.price_usd
            haircut[i] = tmp.haircut
            scale[i] = <double>tmp.scale
    return failed


def atomic_load_u64(size_t addr):
    return me_atomic_load_u64(<const uint64_t *>addr)


def atomic_store_u64(size_t addr, uint64_t value):
    me_atomic_store_u64(<uint64_t *>addr, value)


def atomic_add_u64(size_t addr, uint64_t value):
    return me_atomic_add_u64(<uint64_t *>addr, value)


def struct_sizes():
    """``sizeof`` of every row struct, for the layout test against the numpy dtypes."""
    return {"asset": sizeof(AssetRow), "instrument": sizeof(InstrumentRow),
            "price": sizeof(PriceRow), "account": sizeof(AccountRow),
            "position": sizeof(PositionRow)}


def struct_offsets():
    """Byte offset of every field of every row struct (the layout test compares them)."""
    cdef AssetRow a
    cdef InstrumentRow i
    cdef PriceRow p
    cdef AccountRow c
    cdef PositionRow s
    cdef size_t ba = <size_t>&a, bi = <size_t>&i, bp = <size_t>&p, bc = <size_t>&c, bs = <size_t>&s
    return {
        "asset": {"seq": <size_t>&a.seq - ba, "price_usd": <size_t>&a.price_usd - ba,
                  "haircut": <size_t>&a.haircut - ba, "scale": <size_t>&a.scale - ba,
                  "ts_ns": <size_t>&a.ts_ns - ba},
        "instrument": {"kind": <size_t>&i.kind - bi, "settle_asset": <size_t>&i.settle_asset - bi,
                       "underlying": <size_t>&i.underlying - bi, "n_tiers": <size_t>&i.n_tiers - bi,
                       "is_call": <size_t>&i.is_call - bi, "contract_size": <size_t>&i.contract_size - bi,
                       "qty_scale": <size_t>&i.qty_scale - bi, "price_scale": <size_t>&i.price_scale - bi,
                       "strike": <size_t>&i.strike - bi, "expiry_ns": <size_t>&i.expiry_ns - bi,
                       "tier_floor": <size_t>&i.tier_floor[0] - bi, "tier_imr": <size_t>&i.tier_imr[0] - bi,
                       "tier_mmr": <size_t>&i.tier_mmr[0] - bi,
                       "tier_init_amount": <size_t>&i.tier_init_amount[0] - bi,
                       "tier_maint_amount": <size_t>&i.tier_maint_amount[0] - bi,
                       "name": <size_t>&i.name[0] - bi},
        "price": {"seq": <size_t>&p.seq - bp, "mark": <size_t>&p.mark - bp, "index": <size_t>&p.index - bp,
                  "ts_ns": <size_t>&p.ts_ns - bp, "price_seq": <size_t>&p.price_seq - bp,
                  "flags": <size_t>&p.flags - bp, "tick_seq": <size_t>&p.tick_seq - bp},
        "account": {"seq": <size_t>&c.seq - bc, "status": <size_t>&c.status - bc, "flags": <size_t>&c.flags - bc,
                    "collateral_usd": <size_t>&c.collateral_usd - bc,
                    "cross_equity_usd": <size_t>&c.cross_equity_usd - bc,
                    "cross_im_usd": <size_t>&c.cross_im_usd - bc, "cross_mm_usd": <size_t>&c.cross_mm_usd - bc,
                    "account_id": <size_t>&c.account_id - bc, "partition": <size_t>&c.partition - bc,
                    "n_positions": <size_t>&c.n_positions - bc, "balance": <size_t>&c.balance[0] - bc},
        "position": {"instrument": <size_t>&s.instrument - bs, "mode": <size_t>&s.mode - bs,
                     "qty": <size_t>&s.qty - bs, "cost": <size_t>&s.cost - bs,
                     "isolated_margin": <size_t>&s.isolated_margin - bs},
    }


# ---------------------------------------------------------------- doorbells
from _seqlock cimport (me_doorbell, me_doorbell_value, me_doorbell_ring,
                       me_doorbell_wait_blocking, me_doorbell_wait_polling, me_monotonic_ns)

cdef enum:
    C_WAIT_BLOCKING = 0
    C_WAIT_YIELDING = 1
    C_WAIT_BUSY_SPIN = 2

WAIT_BLOCKING = C_WAIT_BLOCKING
WAIT_YIELDING = C_WAIT_YIELDING
WAIT_BUSY_SPIN = C_WAIT_BUSY_SPIN


def doorbell_ring(size_t addr):
    """Bump the doorbell at ``addr``; wake blocked waiters (futex) if there are any."""
    me_doorbell_ring(<me_doorbell *>addr)


def doorbell_value(size_t addr):
    return me_doorbell_value(<const me_doorbell *>addr)


def doorbell_wait(size_t addr, unsigned int seen, int64_t timeout_ns, int strategy=C_WAIT_BLOCKING):
    """Wait until the doorbell's counter differs from ``seen`` (or the timeout); return it.

    ``strategy``: WAIT_BLOCKING sleeps in futex(2); WAIT_YIELDING polls with sched_yield;
    WAIT_BUSY_SPIN polls with a pause instruction (a dedicated core only). The GIL is
    released while waiting.
    """
    cdef uint32_t r
    with nogil:
        if strategy == C_WAIT_BLOCKING:
            r = me_doorbell_wait_blocking(<me_doorbell *>addr, seen, timeout_ns)
        else:
            r = me_doorbell_wait_polling(<const me_doorbell *>addr, seen, timeout_ns,
                                         1 if strategy == C_WAIT_YIELDING else 0)
    return r


def monotonic_ns():
    return me_monotonic_ns()


# ---------------------------------------------------------------- SPSC rings
include "_ring.pxi"


def ring_push(size_t header_addr, size_t records_addr, int kind, int instrument, int64_t row,
              int64_t delta, int64_t price, int64_t fee, uint64_t ref, int64_t ts_ns, int64_t aux):
    """Append one record (single producer). Returns False, writing nothing, when full."""
    return ring_push_c(<RingHeader *>header_addr, <RingRecord *>records_addr, kind, instrument, row,
                       delta, price, fee, ref, ts_ns, aux)


def ring_pending(size_t header_addr):
    """``(read_idx, write_idx)``: records ``read_idx <= i < write_idx`` wait (consumer side)."""
    cdef RingHeader *h = <RingHeader *>header_addr
    return h.read_idx, me_atomic_load_u64(&h.write_idx)


def ring_commit(size_t header_addr, uint64_t read_idx):
    """Consumer: records before ``read_idx`` are done; their space may be reused."""
    me_atomic_store_u64(&(<RingHeader *>header_addr).read_idx, read_idx)
