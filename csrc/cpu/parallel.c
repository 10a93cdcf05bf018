/*
 * parallel.c - a parallel-for on pthreads: work items are claimed from an
 * atomic counter, so uneven items (causal tiles, ragged sequences) balance.
 * Threads are created per call; for attention-sized work (>= tens of
 * microseconds) the ~10 us of thread start-up is noise.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "cpu_common.h"

typedef struct pf_pool_job {
    int64_t n;
    _Atomic int64_t next;
    pf_task_fn fn;
    void *ctx;
} pf_pool_job;

typedef struct pf_worker {
    pf_pool_job *job;
    int tid;
} pf_worker;

static void run_items(pf_pool_job *job, int tid) {
    for (;;) {
        int64_t i = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (i >= job->n) break;
        job->fn(job->ctx, i, tid);
    }
}

static void *worker_main(void *arg) {
    pf_worker *w = (pf_worker *)arg;
    run_items(w->job, w->tid);
    return NULL;
}

/* Asked once (sysconf reads /sys on Linux: microseconds, too slow for every call). */
int pf_cpu_count(void) {
    static _Atomic int cached = 0;
    int n = atomic_load_explicit(&cached, memory_order_relaxed);
    if (n > 0) return n;
    const long c = sysconf(_SC_NPROCESSORS_ONLN);
    n = c > 0 ? (int)(c < 4096 ? c : 4096) : 1;
    atomic_store_explicit(&cached, n, memory_order_relaxed);
    return n;
}

int pf_resolve_threads(int requested, int64_t work_items) {
    int n = requested > 0 ? requested : pf_cpu_count();
    if (n > 256) n = 256;
    if (work_items < n) n = (int)(work_items > 0 ? work_items : 1);
    return n;
}

pf_status pf_parallel_for(int64_t n, int num_threads, pf_task_fn fn, void *ctx) {
    pf_pool_job job;
    job.n = n;
    atomic_init(&job.next, 0);
    job.fn = fn;
    job.ctx = ctx;
    int nt = pf_resolve_threads(num_threads, n);
    if (nt <= 1) {
        run_items(&job, 0);
        return PF_STATUS_OK;
    }
    pthread_t threads[256];
    pf_worker workers[256];
    if (nt > 256) nt = 256;
    int started = 0;
    for (int t = 1; t < nt; t++) {
        workers[t].job = &job;
        workers[t].tid = t;
        if (pthread_create(&threads[t], NULL, worker_main, &workers[t]) != 0) break;
        started = t;
    }
    run_items(&job, 0);
    for (int t = 1; t <= started; t++) pthread_join(threads[t], NULL);
    return PF_STATUS_OK;
}
