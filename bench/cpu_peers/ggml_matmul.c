// One ggml_mul_mat of a ternary weight (N x K) by an f32 activation (M x K), timed on ggml's
// CPU backend with a persistent threadpool and a graph plan made once: the peer side of the
// same-run CPU benchmark (bench/cpu_peers/run.sh).
//
// Built by build.sh against the ggml in peers/ (ggml's TQ2_0) and against bitnet.cpp's fork of
// llama.cpp (I2_S, TL2; compiled with -DPEER_BITNET). The activation stays f32: ggml quantizes
// it inside the call (q8_K for TQ2_0, bitnet.cpp's per-row int8 for I2_S and TL2), as in
// inference, so its cost is in the time.
//
// With --rotate-mb MB the calls cycle through copies of the weight that fill MB, so that the
// weights come from DRAM (as in the decode of a model much larger than the caches).
//
// Protocol (the same as bitlinear/examples/cpu_bench.rs): warm-up of at least 200 ms, then 10
// rounds of `iters` calls (iters chosen so a round lasts about 100 ms, 5 to 2000 calls), each
// call timed alone. Prints, per shape, the median of the round medians and the 10th and 90th
// percentiles of all calls, in microseconds:
//   RESULT <name> <M>x<N>x<K> <median_us> <p10_us> <p90_us> <iters>
// and before it a check of the output against an exact f64 product on two activation rows
// (relative error, from the activation quantization; a broken layout gives ~1):
//   CHECK <name> <M>x<N>x<K> <max_abs_err / max_abs_ref>

#define _POSIX_C_SOURCE 199309L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml.h"
#ifdef PEER_BITNET
#include "ggml-bitnet.h"
#else
#include "ggml-cpu.h"
#endif

#define ROUNDS 10

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static int cmp_double(const void * a, const void * b) {
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

static double quantile(double * v, size_t n, double q) {
    qsort(v, n, sizeof(double), cmp_double);
    size_t i = (size_t) (q * (double) (n - 1) + 0.5);
    return v[i];
}

// xorshift64*: a fixed, seedable stream so every run times the same data.
static uint64_t rng_state;
static uint64_t rng_next(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}
static float rng_unit(void) { return (float) ((rng_next() >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; }

static void * read_file(const char * path, size_t expect) {
    FILE * f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s (run build.sh first)\n", path);
        exit(1);
    }
    void * buf = malloc(expect);
    size_t got = fread(buf, 1, expect, f);
    if (got != expect || fgetc(f) != EOF) {
        fprintf(stderr, "%s: expected exactly %zu bytes\n", path, expect);
        exit(1);
    }
    fclose(f);
    return buf;
}

static void usage(void) {
    fprintf(stderr,
            "usage: ggml_matmul TYPE MxNxK [THREADS] [TL2_DIR] [--rotate-mb MB] [--poll LEVEL]\n"
            "       [--samples FILE]\n"
            "  TYPE: tq2_0 (ggml), i2_s or tl2 (bitnet.cpp build); THREADS default 2;\n"
            "  TL2_DIR: where tl2_prep.py wrote tl2_NxK.bin and tern_NxK.bin (tl2 only)\n"
            "  LEVEL: the threadpool's polling level (0: workers sleep between calls; 100:\n"
            "  aggressive spinning; default: ggml's); FILE: every timed call appended, in order,\n"
            "  as `<label> <MxNxK> <us>` (as cpu_bench --samples)\n");
    exit(2);
}

int main(int argc, char ** argv) {
    // --rotate-mb MB (anywhere): cycle the calls through copies of the weight filling MB, so
    // each call reads its weights from DRAM rather than from the caches (decode of a model).
    // --poll LEVEL (anywhere): the threadpool's polling level instead of ggml's default.
    // --samples FILE (anywhere): append every timed call's time.
    double rotate_mb = 0;
    int poll = -1;
    const char * samples = NULL;
    for (int i = 1; i + 1 < argc;) {
        if (strcmp(argv[i], "--rotate-mb") == 0 || strcmp(argv[i], "--poll") == 0 ||
            strcmp(argv[i], "--samples") == 0) {
            if (argv[i][2] == 'r') rotate_mb = atof(argv[i + 1]);
            else if (argv[i][2] == 'p') poll = atoi(argv[i + 1]);
            else samples = argv[i + 1];
            memmove(argv + i, argv + i + 2, sizeof(char *) * (argc - i - 1));
            argc -= 2;
        } else {
            i++;
        }
    }
    if (argc < 3) usage();
    const char * tname = argv[1];
    int M, N, K;
    if (sscanf(argv[2], "%dx%dx%d", &M, &N, &K) != 3 || M <= 0 || N <= 0 || K <= 0) usage();
    int nth = argc > 3 ? atoi(argv[3]) : 2;
    const char * tl2_dir = argc > 4 ? argv[4] : NULL;

    enum ggml_type type;
    int is_tl2 = 0;
    if (strcmp(tname, "tq2_0") == 0) {
        type = GGML_TYPE_TQ2_0;
#ifdef PEER_BITNET
    } else if (strcmp(tname, "i2_s") == 0) {
        type = GGML_TYPE_I2_S;
    } else if (strcmp(tname, "tl2") == 0) {
        type = GGML_TYPE_TL2;
        is_tl2 = 1;
        if (!tl2_dir) usage();
#endif
    } else {
        fprintf(stderr, "type %s is not in this build\n", tname);
        return 2;
    }

    // Ternary weights: random, or for TL2 the ones tl2_prep.py laid out (its layout comes from
    // bitnet.cpp's Python converter only).
    int8_t * tern;
    void * tl2 = NULL;
    size_t wbytes = 0;
    if (is_tl2) {
        char path[4096];
        snprintf(path, sizeof path, "%s/tern_%dx%d.bin", tl2_dir, N, K);
        tern = read_file(path, (size_t) N * K);
        // The size bitnet.cpp's converter pads TL2 weights to (ggml_nbytes less the scale).
        wbytes = (size_t) (K - 256) * N / 3 * 5 / 8 + (size_t) 256 * N / 2 * 4 / 8;
        snprintf(path, sizeof path, "%s/tl2_%dx%d.bin", tl2_dir, N, K);
        tl2 = read_file(path, wbytes);
    } else {
        rng_state = 0x9E3779B97F4A7C15ULL ^ ((uint64_t) N << 32) ^ (uint64_t) K;
        tern = malloc((size_t) N * K);
        for (size_t i = 0; i < (size_t) N * K; i++) tern[i] = (int8_t) (rng_next() % 3) - 1;
    }
    rng_state = 0x243F6A8885A308D3ULL ^ ((uint64_t) M << 40) ^ (uint64_t) K;
    float * xf = malloc(sizeof(float) * (size_t) M * K);
    for (size_t i = 0; i < (size_t) M * K; i++) xf[i] = rng_unit();

    // Weight bytes of one copy (at most 2 bits a weight plus block scales).
    size_t wcopy = (size_t) N * K / 4 + (size_t) N * K / 128 + 64;
    int copies = rotate_mb > 0 ? (int) ceil(rotate_mb * 1048576.0 / wcopy) : 1;
    if (copies < 1) copies = 1;
#ifdef PEER_BITNET
    size_t walloc = (size_t) N * K + 64;  // the fork allocates a byte a weight for I2_S and TL2
#else
    size_t walloc = wcopy;
#endif
    struct ggml_init_params ip = {
        .mem_size = copies * (walloc + (size_t) M * N * 4 + ggml_graph_overhead() + 4096) + (size_t) M * K * 4 + (64u << 20),
        .mem_buffer = NULL,
        .no_alloc = false,
    };
    struct ggml_context * ctx = ggml_init(ip);
    struct ggml_tensor ** ws = malloc(sizeof(*ws) * copies);
    struct ggml_tensor ** ys = malloc(sizeof(*ys) * copies);
    struct ggml_cgraph ** gfs = malloc(sizeof(*gfs) * copies);
    struct ggml_tensor * w = ws[0] = ggml_new_tensor_2d(ctx, type, K, N);
    struct ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, M);
    memcpy(x->data, xf, sizeof(float) * (size_t) M * K);

    if (is_tl2) {
        memcpy(w->data, tl2, wbytes);
        size_t off = wbytes % 32 ? wbytes + 32 - wbytes % 32 : wbytes;
        float one = 1.0f;  // the weight scale, read from just past the (aligned) weights
        memcpy((char *) w->data + off, &one, sizeof one);
    } else {
        // Quantized once from f32 ternary values: exact for both types (scale 1).
        float * wf = malloc(sizeof(float) * (size_t) N * K);
        for (size_t i = 0; i < (size_t) N * K; i++) wf[i] = (float) tern[i];
        ggml_quantize_chunk(type, wf, w->data, 0, N, K, NULL);
        free(wf);
    }

    for (int c = 0; c < copies; c++) {
        if (c > 0) {
            ws[c] = ggml_new_tensor_2d(ctx, type, K, N);
            memcpy(ws[c]->data, w->data, ggml_nbytes(w));
        }
#ifdef PEER_BITNET
        if (is_tl2) ggml_bitnet_transform_tensor(ws[c]);  // as llama.cpp's model loader does
#endif
        ys[c] = ggml_mul_mat(ctx, ws[c], x);  // (N, M) in ggml's order: row m has N values
        gfs[c] = ggml_new_graph(ctx);
        ggml_build_forward_expand(gfs[c], ys[c]);
    }
    struct ggml_tensor * y = ys[0];
    struct ggml_cgraph * gf = gfs[0];
    int next = 0;  // the copy the next call uses

#ifndef PEER_BITNET
    ggml_cpu_init();
#endif
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(nth);
    if (poll >= 0) tpp.poll = (uint32_t) poll;
    struct ggml_threadpool * tp = ggml_threadpool_new(&tpp);
    struct ggml_cplan plan = ggml_graph_plan(gf, nth, tp);
    plan.work_data = plan.work_size ? malloc(plan.work_size) : NULL;

    char shape[64];
    snprintf(shape, sizeof shape, "%dx%dx%d", M, N, K);
    const char * label = type == GGML_TYPE_TQ2_0 ? "ggml_tq2_0" : is_tl2 ? "bitnet_tl2" : "bitnet_i2_s";

    // Warm-up (also TL2's one-time weight transform), then the check.
    double t0 = now_us();
    int warm = 0;
    while (warm < 3 || now_us() - t0 < 200e3) {
        if (ggml_graph_compute(gfs[next], &plan) != GGML_STATUS_SUCCESS) {
            fprintf(stderr, "ggml_graph_compute failed\n");
            return 1;
        }
        warm++;
        next = (next + 1) % copies;
    }
    double per_call = (now_us() - t0) / warm;

    ggml_graph_compute(gf, &plan);  // the checked output is copy 0's
    double max_err = 0, max_ref = 0;
    int check_rows[2] = {0, M - 1};
    for (int c = 0; c < 2; c++) {
        int m = check_rows[c];
        const float * yr = (const float *) ((const char *) y->data + (size_t) m * y->nb[1]);
        for (int n = 0; n < N; n++) {
            double ref = 0;
            for (int k = 0; k < K; k++) ref += (double) xf[(size_t) m * K + k] * tern[(size_t) n * K + k];
            max_ref = fmax(max_ref, fabs(ref));
            max_err = fmax(max_err, fabs(ref - yr[n]));
        }
    }
    printf("CHECK %s %s %.3g\n", label, shape, max_err / max_ref);

    int iters = (int) ceil(100e3 / per_call);
    iters = iters < 5 ? 5 : iters > 2000 ? 2000 : iters;
    double * all = malloc(sizeof(double) * ROUNDS * iters);
    double medians[ROUNDS];
    for (int r = 0; r < ROUNDS; r++) {
        double * t = all + (size_t) r * iters;
        for (int i = 0; i < iters; i++) {
            double a = now_us();
            ggml_graph_compute(gfs[next], &plan);
            t[i] = now_us() - a;
            next = (next + 1) % copies;
        }
        double * copy = malloc(sizeof(double) * iters);
        memcpy(copy, t, sizeof(double) * iters);
        medians[r] = quantile(copy, iters, 0.5);
        free(copy);
    }
    if (samples) {
        FILE * f = fopen(samples, "a");
        if (!f) {
            perror(samples);
            return 1;
        }
        for (size_t i = 0; i < (size_t) ROUNDS * iters; i++) fprintf(f, "%s %s %.3f\n", label, shape, all[i]);
        fclose(f);
    }
    double med = quantile(medians, ROUNDS, 0.5);
    double p10 = quantile(all, (size_t) ROUNDS * iters, 0.1);
    double p90 = quantile(all, (size_t) ROUNDS * iters, 0.9);
    printf("RESULT %s %s %.2f %.2f %.2f %d\n", label, shape, med, p10, p90, iters);

    ggml_threadpool_free(tp);
    free(plan.work_data);
    ggml_free(ctx);
    free(all);
    free(xf);
    free(tern);
    free(tl2);
    return 0;
}
