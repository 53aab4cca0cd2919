# The single-producer push onto a partition's command ring (ext/_types.pxd RingHeader /
# RingRecord), included by ext/_shm.pyx (ring_push, for Python) and ext/_wire.pyx (the
# fills router). The record is written first, then the write index is published with a
# release store, so the consumer never reads a half-written record.
from libc.stdint cimport int64_t, uint64_t
from _types cimport RingRecord, RingHeader
from _seqlock cimport me_atomic_load_u64, me_atomic_store_u64


cdef inline bint ring_push_c(RingHeader *h, RingRecord *recs, int kind, int instrument, int64_t row,
                             int64_t delta, int64_t price, int64_t fee, uint64_t ref, int64_t ts_ns,
                             int64_t aux) noexcept nogil:
    """Append one record; False, writing nothing, when the ring is full."""
    cdef uint64_t w = h.write_idx
    cdef RingRecord *rec
    if w - me_atomic_load_u64(&h.read_idx) >= <uint64_t>h.capacity:
        return False
    rec = &recs[w & <uint64_t>(h.capacity - 1)]
    rec.kind = kind
    rec.instrument = instrument
    rec.row = row
    rec.delta = delta
    rec.price = price
    rec.fee = fee
    rec.ref = ref
    rec.ts_ns = ts_ns
    rec.aux = aux
    me_atomic_store_u64(&h.write_idx, w + 1)     # release: the record is visible first
    return True
