// Read-only streaming microbenchmark behind a note of bench/RESULTS.md (CPU kernel): how fast
// one thread reads 4 MiB weight copies, rotated through 256 MiB so they come from DRAM, in
// the order a kernel visits them.
//   pattern 0: sequential 64-byte loads (one row after the other, or an interleaved layout);
//   pattern 1: groups of R rows of L bytes, 64 bytes of each row in turn (our CPU kernel's order
//              for ROWS = 4, K = 4096: R = 4, L = 1024);
//   pattern 2: as 1, with a software prefetch D bytes ahead in each row.
// Given T (pattern 0 only), each call splits the copy in T contiguous slices, read by the
// caller and T - 1 threads that spin between calls (as ggml's pool does): the read floor of a
// matrix-vector product from DRAM, and the spread (p10, p90) of its call times. MIB (default
// 256) is the memory the copies fill: 4 is one copy read again and again, from the caches (two
// cores' 2 MiB L2s hold half each at most, so mostly from L3), the read floor in cache.
// Build: cc -O2 -march=native -pthread -o stream_read stream_read.c (needs AVX-512F)
// Run:   stream_read PATTERN [R [L [D [T [MIB]]]]]
#define _POSIX_C_SOURCE 200112L
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

// The spinning readers of the threaded mode: call `gen` reads slice `id` of copy `gen`.
struct pool {
    const char * buf;
    size_t W;
    int copies, threads;
    atomic_int gen, done;
    atomic_int sink;
};
struct reader {
    struct pool * p;
    int id;
};

static int read_slice(const char * w, size_t W, int id, int threads) {
    const size_t lo = W / threads * id, hi = W / threads * (id + 1);
    __m512i acc = _mm512_setzero_si512();
    for (size_t o = lo; o < hi; o += 64) acc = _mm512_add_epi32(acc, _mm512_load_si512(w + o));
    int lanes[16];
    _mm512_storeu_si512(lanes, acc);
    return lanes[0];
}

static void * reader_main(void * arg) {
    struct reader * r = arg;
    struct pool * p = r->p;
    int seen = 0;
    for (;;) {
        int g;
        while ((g = atomic_load(&p->gen)) == seen) _mm_pause();
        if (g < 0) return NULL;
        seen = g;
        atomic_fetch_add(&p->sink, read_slice(p->buf + (size_t) (g % p->copies) * p->W, p->W, r->id, p->threads));
        atomic_fetch_add(&p->done, 1);
    }
}

// Times at least 10 laps of the copies and 2000 calls (after at least a lap and 200 calls of
// warm-up), every call alone; prints median, p10, p90.
static int threaded(char * buf, size_t W, int copies, int threads) {
    struct pool p = {.buf = buf, .W = W, .copies = copies, .threads = threads};
    pthread_t tid[64];
    struct reader rd[64];
    for (int t = 1; t < threads; t++) {
        rd[t] = (struct reader){&p, t};
        pthread_create(&tid[t], NULL, reader_main, &rd[t]);
    }
    const int laps = copies >= 200 ? 10 : 2000 / copies, calls = copies * laps;
    const int warm = copies >= 200 ? copies : 200 / copies * copies;
    double * dt = malloc(sizeof(double) * calls);
    for (int it = 1; it <= warm + calls; it++) {
        atomic_store(&p.done, 0);
        const double t0 = now_us();
        atomic_store(&p.gen, it);
        atomic_fetch_add(&p.sink, read_slice(buf + (size_t) (it % copies) * W, W, 0, threads));
        while (atomic_load(&p.done) != threads - 1) _mm_pause();
        const double t = now_us() - t0;
        if (it > warm) dt[it - warm - 1] = t;
    }
    atomic_store(&p.gen, -1);
    for (int t = 1; t < threads; t++) pthread_join(tid[t], NULL);
    qsort(dt, calls, sizeof(double), cmp_double);
    const double med = dt[calls / 2];
    printf("pattern 0, %d thread(s): median %.1f us per %.2f MiB (%.1f GB/s), p10 %.1f, p90 %.1f, p90/p10 %.2f (%d)\n",
           threads, med, W / 1048576.0, W / med / 1e3, dt[calls / 10], dt[calls * 9 / 10],
           dt[calls * 9 / 10] / dt[calls / 10], atomic_load(&p.sink) & 1);
    free(dt);
    return 0;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: stream_read PATTERN [R [L [D [T [MIB]]]]]\n");
        return 2;
    }
    int pat = atoi(argv[1]);
    int R = argc > 2 ? atoi(argv[2]) : 4, L = argc > 3 ? atoi(argv[3]) : 1024, D = argc > 4 ? atoi(argv[4]) : 512;
    size_t W = 4u << 20, total = (size_t) (argc > 6 ? atoi(argv[6]) : 256) << 20;
    if (total < W) return 2;
    int copies = (int) (total / W);
    char * buf = NULL;
    if (posix_memalign((void **) &buf, 4096, total)) return 1;
    memset(buf, 1, total);
    if (argc > 5) {
        const int threads = atoi(argv[5]);
        if (pat != 0 || threads < 1 || threads > 64) return 2;
        return threaded(buf, W, copies, threads);
    }
    __m512i acc = _mm512_setzero_si512();
    double sum = 0;
    int n = 0;
    for (int it = 0; it < copies * 6; it++) {
        const char * w = buf + (size_t) (it % copies) * W;
        double t0 = now_us();
        if (pat == 0) {
            for (size_t o = 0; o < W; o += 64) acc = _mm512_add_epi32(acc, _mm512_load_si512(w + o));
        } else {
            for (size_t g = 0; g + (size_t) R * L <= W; g += (size_t) R * L)
                for (int b = 0; b < L; b += 64)
                    for (int r = 0; r < R; r++) {
                        const char * p = w + g + (size_t) r * L + b;
                        if (pat == 2) _mm_prefetch(p + D, _MM_HINT_T0);
                        acc = _mm512_add_epi32(acc, _mm512_loadu_si512(p));
                    }
        }
        double dt = now_us() - t0;
        if (it >= copies) {  // the first lap only warms up
            sum += dt;
            n++;
        }
    }
    int lanes[16];
    _mm512_storeu_si512(lanes, acc);
    printf("pattern %d R %d L %d D %d: %.0f us per 4 MiB, %.1f GB/s (%d)\n", pat, R, L, D, sum / n,
           W / (sum / n) / 1e3, lanes[0] & 1);
    free(buf);
    return 0;
}
