/* A small thread pool for the kernels' parallel loops: the caller never waits for a worker that
 * took no task.
 *
 * Why not OpenMP here: a decode step of SmolLM2-135M crosses ~150 parallel regions (q/k/v, o,
 * gate/up, down and attention in each of 30 layers), each a few microseconds of work. With
 * sleeping OpenMP workers (OMP_WAIT_POLICY=PASSIVE) every region pays a futex wake-up, ~25 us
 * on the 2-core VMs this was measured on: a 1536 x 576 Q4_1 matvec took 29 us on one thread and
 * 54 us on two. With spinning workers (ACTIVE, or GOMP_SPINCOUNT) the region's closing barrier
 * waits for every worker, and a worker whose core another process holds stalls the step for a
 * whole time slice. Here a job's tasks are cut into one contiguous range per participant (a
 * thread's rows then stream through its core's prefetchers: interleaving small chunks of one
 * matrix between two cores ran at half the bandwidth), claimed one at a time by compare-and-swap;
 * a participant drains its own range, then the others'. The caller takes part too and then waits
 * only for tasks already claimed, so a late worker costs nothing: it finds the ranges exhausted.
 * Workers spin (with pause, yielding the core now and then) for TS_POOL_SPIN_NS after a job, so
 * the jobs of a forward reach a running worker, and then sleep on a condition variable.
 *
 * One pool per process: ext/kernels.pyx (the one native module) makes it at import
 * (ts_pool_get). One thread owns it at a time; another thread's parallel loop meanwhile runs on
 * that thread alone.
 */
#ifndef TINYSERVE_POOL_H
#define TINYSERVE_POOL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TS_PAUSE() _mm_pause()
#else
#define TS_PAUSE() ((void)0)
#endif

#define TS_POOL_MAX_WORKERS 255
#define TS_POOL_SPIN_NS 200000 /* spin this long after a job before sleeping */
#define TS_SCRATCH_SLOTS 3       /* 0: quantized activations, 1: weight panels, 2: attention */

typedef void (*ts_task_fn)(void *ctx, int64_t task);

/* one participant's share of a job: (generation << 32) | next unclaimed task, on its own cache
 * line; tasks [first, end) */
typedef struct {
    _Atomic uint64_t state;
    int64_t end;
    char pad[64 - sizeof(uint64_t) - sizeof(int64_t)];
} ts_range;

typedef struct {
    /* the job: written by the caller before it publishes a new generation */
    ts_task_fn fn;
    void *ctx;
    int n_parts; /* participants: the caller (0) and workers 0 .. n_parts - 2 (1 ..) */
    _Atomic uint32_t gen; /* the current job's generation */
    _Atomic int64_t done; /* tasks of this generation finished */
    _Atomic int sleepers;
    _Atomic int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n_workers;
    int n_threads; /* the kernels' thread count (ts_threads), one setting for both modules */
    _Atomic int busy; /* a thread owns the pool: others (and nested calls) run inline */
    pthread_key_t part_key; /* a worker's participant number (1 ..); unset (0) elsewhere */
    pthread_t threads[TS_POOL_MAX_WORKERS];
    ts_range ranges[TS_POOL_MAX_WORKERS + 1];
    /* per participant and slot: a buffer that only grows (ts_scratch), shared by the modules */
    void *scratch[TS_POOL_MAX_WORKERS + 1][TS_SCRATCH_SLOTS];
    size_t scratch_cap[TS_POOL_MAX_WORKERS + 1][TS_SCRATCH_SLOTS];
} ts_pool;

static ts_pool *ts_pool_g = 0; /* this module's view of the process's pool */

static inline int64_t ts_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Claim and run tasks of range r while it has some and is still of generation gen; the tag in
 * the same word means a worker that read an old job cannot claim a task of the next one. */
static inline void ts_pool_drain(ts_pool *p, int r, uint32_t gen, ts_task_fn fn, void *ctx) {
    ts_range *rg = &p->ranges[r];
    uint64_t s = atomic_load_explicit(&rg->state, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(s >> 32) != gen || (int64_t)(s & 0xffffffffu) >= rg->end) return;
        if (atomic_compare_exchange_weak_explicit(&rg->state, &s, s + 1, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            fn(ctx, (int64_t)(s & 0xffffffffu));
            atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
            s = atomic_load_explicit(&rg->state, memory_order_acquire);
        }
    }
}

/* Participant `part`'s own range first (its rows stream in order through one core's prefetchers:
 * interleaving small chunks of one matrix between two cores ran at half the bandwidth), then the
 * others', so a participant that is late or slow has its share taken over. */
static inline void ts_pool_work(ts_pool *p, int part, uint32_t gen, ts_task_fn fn, void *ctx,
                                int n_parts) {
    for (int i = 0; i < n_parts; i++) ts_pool_drain(p, (part + i) % n_parts, gen, fn, ctx);
}

typedef struct {
    ts_pool *pool;
    int index;
} ts_worker_arg;

static void *ts_pool_worker(void *arg) {
    ts_pool *p = ((ts_worker_arg *)arg)->pool;
    const int index = ((ts_worker_arg *)arg)->index;
    free(arg);
    pthread_setspecific(p->part_key, (void *)(intptr_t)(index + 1));
    uint32_t seen = atomic_load(&p->gen);
    for (;;) {
        if (atomic_load_explicit(&p->gen, memory_order_acquire) == seen) {
            /* spin a while, then sleep until the next generation */
            const int64_t t_end = ts_now_ns() + TS_POOL_SPIN_NS;
            int64_t i = 0;
            while (atomic_load_explicit(&p->gen, memory_order_acquire) == seen &&
                   !atomic_load_explicit(&p->stop, memory_order_relaxed)) {
                TS_PAUSE();
                if ((++i & 255) == 0) {
                    if (ts_now_ns() > t_end) break;
                    if ((i & 4095) == 0) sched_yield(); /* let another thread have this core */
                }
            }
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->cv, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
            if (atomic_load(&p->stop)) return 0;
        }
        seen = atomic_load_explicit(&p->gen, memory_order_acquire);
        /* the job's fields were written before its generation was published (release); if a
         * newer job overwrote them meanwhile, every claim below fails on the generation tag */
        const ts_task_fn fn = p->fn;
        void *ctx = p->ctx;
        const int n_parts = p->n_parts;
        if (index + 1 < n_parts) ts_pool_work(p, index + 1, seen, fn, ctx, n_parts);
    }
}

/* The process's pool with at least `workers` threads (0: it may have none); 0 on failure. */
static ts_pool *ts_pool_get(int workers) {
    ts_pool *p = ts_pool_g;
    if (!p) {
        void *mem = 0;
        if (posix_memalign(&mem, 64, sizeof(ts_pool))) return 0;
        p = (ts_pool *)memset(mem, 0, sizeof(ts_pool));
        if (pthread_key_create(&p->part_key, 0)) {
            free(p);
            return 0;
        }
        pthread_mutex_init(&p->mu, 0);
        pthread_cond_init(&p->cv, 0);
        ts_pool_g = p;
    }
    if (workers > TS_POOL_MAX_WORKERS) workers = TS_POOL_MAX_WORKERS;
    while (p->n_workers < workers) {
        ts_worker_arg *arg = (ts_worker_arg *)malloc(sizeof(ts_worker_arg));
        if (!arg) break;
        arg->pool = p;
        arg->index = p->n_workers;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        const int rc = pthread_create(&p->threads[p->n_workers], &attr, ts_pool_worker, arg);
        pthread_attr_destroy(&attr);
        if (rc) {
            free(arg);
            break;
        }
        pthread_detach(p->threads[p->n_workers]);
        p->n_workers++;
    }
    return p;
}

/* The thread count the kernels run on (set once for every module sharing the pool). */
static inline int ts_threads(void) {
    return ts_pool_g && ts_pool_g->n_threads > 0 ? ts_pool_g->n_threads : 1;
}

static inline void ts_set_threads(int n) {
    if (ts_pool_g) ts_pool_g->n_threads = n;
}

/* fn(ctx, t) for t in [0, n_tasks), on up to nthreads threads (the caller is one of them); returns
 * when every task is done. One thread owns the pool at a time: a call from another thread while
 * a job runs (a second Python thread in a kernel), or from a task, runs its tasks itself. */
static inline void ts_parallel_for(int nthreads, int64_t n_tasks, ts_task_fn fn, void *ctx) {
    ts_pool *p = nthreads > 1 && n_tasks > 1 ? ts_pool_g : 0;
    int idle = 0;
    if (p && !atomic_compare_exchange_strong(&p->busy, &idle, 1)) p = 0;
    if (p && p->n_workers < nthreads - 1) ts_pool_get(nthreads - 1); /* grown by the owner only */
    if (!p || p->n_workers == 0) {
        if (p) atomic_store(&p->busy, 0);
        for (int64_t t = 0; t < n_tasks; t++) fn(ctx, t);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    const int n_parts = nthreads - 1 < p->n_workers ? nthreads : p->n_workers + 1;
    p->n_parts = n_parts;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    const uint32_t gen = atomic_load(&p->gen) + 1;
    for (int r = 0; r < n_parts; r++) { /* contiguous shares, as even as the tasks allow */
        p->ranges[r].end = n_tasks * (r + 1) / n_parts;
        atomic_store_explicit(&p->ranges[r].state, ((uint64_t)gen << 32) | (uint64_t)(n_tasks * r / n_parts),
                              memory_order_release);
    }
    atomic_store(&p->gen, gen); /* publish (seq_cst: ordered before the sleepers check) */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    ts_pool_work(p, 0, gen, fn, ctx, n_parts);
    while (atomic_load_explicit(&p->done, memory_order_acquire) < n_tasks) TS_PAUSE();
    atomic_store(&p->busy, 0);
}

/* A buffer of at least `bytes` for the calling thread in slot `slot`, kept between calls (no page
 * faults per call); 0 when out of memory. The pool's workers keep theirs in the pool (one set for
 * both modules); any other thread in thread-local storage. */
static inline void *ts_scratch(int slot, size_t bytes) {
    static __thread void *own[TS_SCRATCH_SLOTS];
    static __thread size_t own_cap[TS_SCRATCH_SLOTS];
    ts_pool *p = ts_pool_g;
    const int part = p ? (int)(intptr_t)pthread_getspecific(p->part_key) : 0;
    void **buf = part ? &p->scratch[part][slot] : &own[slot];
    size_t *cap = part ? &p->scratch_cap[part][slot] : &own_cap[slot];
    if (bytes > *cap) {
        free(*buf);
        *buf = malloc(bytes);
        *cap = *buf ? bytes : 0;
    }
    return *buf;
}

#endif /* TINYSERVE_POOL_H */
