# The seqlock and atomics header, declared once for every kernel.
from libc.stdint cimport uint32_t, uint64_t, int64_t

cdef extern from "seqlock.h" nogil:
    void me_seqlock_write_begin(uint64_t *seq)
    void me_seqlock_write_end(uint64_t *seq)
    uint64_t me_seqlock_read_begin(const uint64_t *seq)
    int me_seqlock_read_retry(const uint64_t *seq, uint64_t s)
    int64_t me_seqlock_copy(const void *row, void *out, size_t nbytes, int64_t max_tries)
    uint64_t me_atomic_load_u64(const uint64_t *p)
    void me_atomic_store_u64(uint64_t *p, uint64_t v)
    uint64_t me_atomic_add_u64(uint64_t *p, uint64_t v)
    void me_prefetch_rw(const void *p)

cdef extern from "doorbell.h" nogil:
    ctypedef struct me_doorbell:
        uint32_t counter
        uint32_t waiters
    uint32_t me_doorbell_value(const me_doorbell *d)
    void me_doorbell_ring(me_doorbell *d)
    uint32_t me_doorbell_wait_blocking(me_doorbell *d, uint32_t seen, int64_t timeout_ns)
    uint32_t me_doorbell_wait_polling(const me_doorbell *d, uint32_t seen, int64_t timeout_ns, int do_yield)
    int64_t me_monotonic_ns()
