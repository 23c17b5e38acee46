// Read-only streaming microbenchmark behind a note of bench/RESULTS.md (CPU kernel): how fast
// one thread reads 4 MiB weight copies, rotated through 256 MiB so they come from DRAM, in
// the order a kernel visits them.
//   pattern 0: sequential 64-byte loads (one row after the other, or an interleaved layout);
//   pattern 1: groups of R rows of L bytes, 64 bytes of each row in turn (our CPU kernel's order
//              for ROWS = 4, K = 4096: R = 4, L = 1024);
//   pattern 2: as 1, with a software prefetch D bytes ahead in each row.
// Build: cc -O2 -march=native -o stream_read stream_read.c (needs AVX-512F)
// Run:   stream_read PATTERN [R [L [D]]]
#define _POSIX_C_SOURCE 200112L
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: stream_read PATTERN [R [L [D]]]\n");
        return 2;
    }
    int pat = atoi(argv[1]);
    int R = argc > 2 ? atoi(argv[2]) : 4, L = argc > 3 ? atoi(argv[3]) : 1024, D = argc > 4 ? atoi(argv[4]) : 512;
    size_t W = 4u << 20, total = 256u << 20;
    int copies = (int) (total / W);
    char * buf = NULL;
    if (posix_memalign((void **) &buf, 4096, total)) return 1;
    memset(buf, 1, total);
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
