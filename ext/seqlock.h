/*
 * seqlock.h -- single-writer sequence locks over shared memory, with real atomics.
 *
 * Every row that another process may read while its owner writes it starts with a
 * uint64 sequence counter. The owner (exactly one writer per row) makes it odd before
 * touching the row and even again after; a reader copies the row and retries when the
 * counter was odd or changed meanwhile. Memory orders follow H.-J. Boehm, "Can seqlocks
 * get along with programming language memory models?" (MSPC 2012):
 *
 *   writer: seq.store(s+1, relaxed); fence(release); <data stores>; seq.store(s+2, release)
 *   reader: s1 = seq.load(acquire); <data loads>; fence(acquire); s2 = seq.load(relaxed)
 *
 * The data itself is copied with plain stores/loads; on x86-64 and AArch64 the fences
 * above order them (on x86 both fences are compiler barriers only, so the hot path pays
 * nothing but two plain stores per row).
 */
#ifndef MARGIN_ENGINE_SEQLOCK_H
#define MARGIN_ENGINE_SEQLOCK_H

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#  define ME_CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#  define ME_CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#  define ME_CPU_RELAX() __atomic_signal_fence(__ATOMIC_SEQ_CST)
#endif

static inline void me_seqlock_write_begin(uint64_t *seq) {
    uint64_t s = __atomic_load_n(seq, __ATOMIC_RELAXED);
    __atomic_store_n(seq, s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static inline void me_seqlock_write_end(uint64_t *seq) {
    uint64_t s = __atomic_load_n(seq, __ATOMIC_RELAXED);
    __atomic_store_n(seq, s + 1, __ATOMIC_RELEASE);
}

static inline uint64_t me_seqlock_read_begin(const uint64_t *seq) {
    return __atomic_load_n(seq, __ATOMIC_ACQUIRE);
}

/* Nonzero when the copy taken since read_begin returned s must be retried. */
static inline int me_seqlock_read_retry(const uint64_t *seq, uint64_t s) {
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return (s & 1u) || __atomic_load_n(seq, __ATOMIC_RELAXED) != s;
}

/*
 * Copy `nbytes` of the row that starts with `seq` into `out`, retrying at most
 * `max_tries` times. Returns the number of tries used, or -1 when no consistent copy
 * was had (a writer died mid-row, or writes faster than we can copy).
 */
static inline int64_t me_seqlock_copy(const void *row, void *out, size_t nbytes, int64_t max_tries) {
    const uint64_t *seq = (const uint64_t *)row;
    for (int64_t i = 1; i <= max_tries; ++i) {
        uint64_t s = me_seqlock_read_begin(seq);
        if (s & 1u) { ME_CPU_RELAX(); continue; }
        memcpy(out, row, nbytes);
        if (!me_seqlock_read_retry(seq, s)) return i;
        ME_CPU_RELAX();
    }
    return -1;
}

/* Hint: the line at p will be written soon (hides the memory wait of a scattered walk). */
static inline void me_prefetch_rw(const void *p) {
    __builtin_prefetch(p, 1, 3);
}

static inline uint64_t me_atomic_load_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void me_atomic_store_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline uint64_t me_atomic_add_u64(uint64_t *p, uint64_t v) {
    return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL);
}

#endif /* MARGIN_ENGINE_SEQLOCK_H */
