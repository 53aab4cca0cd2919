/*
 * doorbell.h -- wake a worker through shared memory.
 *
 * A doorbell is two uint32 words in a shared mapping: a counter the producers bump on
 * every event (new mark, new fill in a ring), and the number of blocked waiters. A
 * blocking consumer sleeps in futex(2) on the counter (FUTEX_WAIT, not _PRIVATE: the
 * word is shared between processes); a producer bumps the counter and makes the
 * futex_wake syscall only when someone is blocked, so spinning and yielding consumers
 * cost the producer one atomic add.
 */
#ifndef MARGIN_ENGINE_DOORBELL_H
#define MARGIN_ENGINE_DOORBELL_H

#include <stdint.h>
#include <errno.h>
#include <limits.h>
#include <time.h>
#include <sched.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#include "seqlock.h"

typedef struct {
    uint32_t counter;   /* bumped on every event */
    uint32_t waiters;   /* consumers blocked in futex_wait */
} me_doorbell;

static inline uint32_t me_doorbell_value(const me_doorbell *d) {
    return __atomic_load_n(&d->counter, __ATOMIC_ACQUIRE);
}

static inline void me_doorbell_ring(me_doorbell *d) {
    __atomic_add_fetch(&d->counter, 1u, __ATOMIC_ACQ_REL);
    if (__atomic_load_n(&d->waiters, __ATOMIC_ACQUIRE) != 0)
        syscall(SYS_futex, &d->counter, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Block until the counter differs from `seen` or `timeout_ns` passes; returns the counter. */
static inline uint32_t me_doorbell_wait_blocking(me_doorbell *d, uint32_t seen, int64_t timeout_ns) {
    uint32_t now = me_doorbell_value(d);
    if (now != seen) return now;
    struct timespec ts;
    ts.tv_sec = timeout_ns / 1000000000LL;
    ts.tv_nsec = timeout_ns % 1000000000LL;
    __atomic_add_fetch(&d->waiters, 1u, __ATOMIC_ACQ_REL);
    /* The kernel re-checks counter == seen atomically, so a ring between our load and
       the sleep is never lost. */
    syscall(SYS_futex, &d->counter, FUTEX_WAIT, seen, &ts, NULL, 0);
    __atomic_sub_fetch(&d->waiters, 1u, __ATOMIC_ACQ_REL);
    return me_doorbell_value(d);
}

static inline int64_t me_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Spin (pause) or yield (sched_yield) until the counter moves or timeout_ns passes. */
static inline uint32_t me_doorbell_wait_polling(const me_doorbell *d, uint32_t seen,
                                                int64_t timeout_ns, int yield) {
    int64_t deadline = me_monotonic_ns() + timeout_ns;
    uint32_t now;
    unsigned spins = 0;
    while ((now = me_doorbell_value(d)) == seen) {
        if (yield) sched_yield(); else ME_CPU_RELAX();
        if ((++spins & 1023u) == 0 && me_monotonic_ns() >= deadline) break;
    }
    return now;
}

#endif /* MARGIN_ENGINE_DOORBELL_H */
