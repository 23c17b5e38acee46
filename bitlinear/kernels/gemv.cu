// Decode matmul (M = 1): y (1, N) = x (1, K) . W (N, K)^T, W in the canonical packed ternary
// layout, on the CUDA cores (dp4a). Built to stream the packed weights at close to HBM bandwidth:
// every weight byte a thread will use is requested with 16-byte loads right after x, so the whole
// matrix is in flight while the block quantizes x. Needs K % 64 == 0 (16-byte packed chunks,
// rows 16-byte aligned), K <= 8192 and a 16-byte aligned weight pointer; other shapes use the
// skinny kernel. M >= 2 takes the skinny kernel or a GEMM (a multi-row form of this kernel is
// slower: bench/RESULTS.md, "Designs measured and not kept").
//
// Data layout
//   x  : float activations T (1, K), quantized here (fused quantizer), or int8 codes (1, K) plus
//        one f32 scale.
//   W  : packed (N, K4 = K/4) bytes, row-major; a row is cpr = K4/16 chunks of 16 bytes (64 k).
//   y  : (1, N), int32 accumulators or OT = f32/bf16/f16 after the epilogue.
//
// Work split: one block of 16 warps per SM (host-chosen grid); the N rows are spread evenly over
// all warps of the grid (host-computed rows_base / rows_rem, no division here). L lanes work on
// one row (L in {8, 16, 32}, a template parameter), so a warp takes P = 32 / L rows at a time (a
// "batch", at most RB = min(8, 16 / T) of them); lane (rg, lr) of a batch owns chunks lr,
// lr + L, ..., lr + L (T - 1) of row rg (T = ceil(cpr / L), a template parameter). The host picks
// (L, T) from the work per lane and busy SM and the idle chunk slots (src/plan/gemv.rs,
// gemv_config; bench/RESULTS.md, Rule: GEMV lanes per row): K = 2560 (40 chunks) takes L = 8,
// T = 5 at N = 13824 and L = 16, T = 3 at N = 2560.
//   * x first: each thread with a 16-k group of x (tid < K / 16, the "x warps") requests its raw
//     bits and reduces its absmax, which waits for x. The other warps request their weights
//     right away; the x warps request theirs only after the barrier that publishes the absmax.
//     (A weight load issued before x is consumed can make the x consumer wait for it too: H100,
//     M = 1 13824 x 2560, 8.7 us with all weights requested right after x, 7.2 us in this
//     order.) Every lane requests its T x RB weight chunks into registers
//     (no L1 allocation); the loads are coherent ld.global so that the compiler keeps them on
//     their side of the barrier. Chunk slot t < T - 1 is at an immediate offset 16 L t from the
//     lane's row pointer; the last slot may lie past the row (zeros: code 0 adds nothing); rows
//     past the warp's last repeat it (same addresses as another lane, no extra traffic; never
//     stored).
//   * or x by one bulk copy (the `_bx` kernels, sm_90, 16-byte aligned x): thread 0 starts a
//     cp.async.bulk of the whole row into shared memory (behind the codes, K * sizeof(XT)
//     bytes) that completes on an mbarrier; it does not queue with the threads' loads, so every
//     warp requests its weights at once and the x warps then wait on the mbarrier. Its latency
//     is longer, so the host takes it only where the weights stream long enough, with 8 lanes a
//     row or every warp holding x (src/plan/gemv.rs, gemv_plan; bench/RESULTS.md, Rule: GEMV
//     bulk copy of x).
//   * quantize x into shared memory: absmax as an integer max over the bits of |x| (exact; NaN
//     and Inf show as >= 0x7f800000) reduced per warp, then across warps through shared memory
//     (one barrier); every thread then computes s_x itself and quantizes its group (act_codes16:
//     the reciprocal form with one near-tie test per 16 values, exact), storing it permuted
//     (common.cuh: position 4i + j of a group holds k = 4j + i); int8 input is only permuted.
//     The code sum of x comes from per-warp partial sums (second barrier). Group u of chunk j is
//     stored at byte 16 (u * cpr + j) ("u-major"): the L lanes of a row read L consecutive 16
//     bytes with one LDS.128 (conflict-free; the P rows of a batch read the same bytes).
//   * dot products in the order the weights were requested (slot t, then batch b): per slot the
//     lane reads the 4 groups of x codes of its chunk, then per batch word u of the weight chunk
//     against group u: (word & (3 << 2i) * 0x01010101) holds the codes of permuted positions
//     4i..4i+3 times 4^i, one dp4a (unsigned x signed) each; the four partial sums are scaled back
//     by exact shifts (they are multiples of 4^i). Codes stay unsigned (0, 1, 2):
//     sum x (c - 1) = sum x c - sum x.
//   * per row, the L lane sums are added with xor shuffles (integers: exact) and lane lr = 0
//     stores the output.
// Epilogue: y = (acc * s_x) * s_w (two roundings), cast to OT; int32 mode stores acc.
// Input norms (the `_an` and `_rn` kernels, PRO = 1 and 2; float x, thread-load path): before
// the absmax, the x warps turn their groups into the input of a pre-norm layer, so that the norm
// needs no kernel of its own. Each block computes it in full (K values; the same in every block).
//   * PRO 1, add + RMSNorm: s = T(x + delta) (delta may be null: s = x), y = T(r * (s * gamma))
//     with r = rsqrt(mean(s^2) + eps); block 0 also stores s to `resid` (the residual stream)
//     where that is not null.
//   * PRO 2, BitNet's squared-ReLU gate + RMSNorm: x is (1, 2K), gate then up, before their
//     weight scales; g = max(T(gate * gate_scale), 0), u = T(up * up_scale), s = T(T(g^2) * u),
//     then y as above. T rounds where candle's tensor ops would store.
//   The sum of squares (per-warp sums, then the 16 in order) is reduced with the absmax of
//   s * gamma, whose image T(r * max) is the absmax of y (r > 0 and rounding are monotonic):
//   still one block reduction before the quantizer. delta, gamma and x 16-byte aligned.
// Launch: programmatic dependent launch (common.cuh, pdl_wait), and this kernel lets the next
// one start at once. The `_e` kernels (the host knows the weights complete: src/cuda/settle.rs)
// request each lane's first weight chunk slot before pdl_wait, so that it streams while the
// previous call ends (bench/RESULTS.md, Rule: GEMV early weights); the `_an` / `_rn` ones the
// norm's gains too (the caller declares them settled: InputNorm's gain_settled).
#include "common.cuh"

#define GV_WARPS 16
#define GV_THREADS (GV_WARPS * 32)
#if __CUDA_ARCH__ >= 900
#define GV_BULK_X true
#else
#define GV_BULK_X false
#endif

__device__ __forceinline__ uint32_t comp4(const uint4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// A coherent 16-byte ld.global, optionally not allocated in L1 (the weights are read once). The
// compiler keeps coherent loads where they are written relative to barriers; ld.global.nc it
// moves: it sank x's loads to their first use, behind the weights, and hoisted the weights'
// above the absmax barrier.
#define GV_LD16(QUAL, R, P)                                          \
    asm volatile("ld.global" QUAL ".v4.u32 {%0,%1,%2,%3}, [%4];\n" \
                 : "=r"(R.x), "=r"(R.y), "=r"(R.z), "=r"(R.w)        \
                 : "l"(P)                                            \
                 : "memory")
__device__ __forceinline__ uint4 ldg_x16(const void* p) {
    uint4 r;
    GV_LD16("", r, p);
    return r;
}
__device__ __forceinline__ uint4 ldg_weights16(const void* p) {
    uint4 r;
    GV_LD16(".L1::no_allocate", r, p);
    return r;
}

// Raw bits of one 16-k group of x (16 values of T), as 16-byte loads.
template <typename T>
__device__ __forceinline__ void gv_load_raw(const T* __restrict__ xr, int g, RawGroup<T>& r) {
#pragma unroll
    for (int c = 0; c < (int)sizeof(T); ++c) r.v[c] = ldg_x16(reinterpret_cast<const uint4*>(xr + 16 * g) + c);
}

// 16 values of group g (k = 16g .. 16g+15) of x as floats, element by element (x not 16-byte
// aligned).
template <typename T>
__device__ __forceinline__ void gv_load16_unaligned(const T* __restrict__ xr, int g, float (&f)[16]) {
#pragma unroll
    for (int i = 0; i < 16; ++i) f[i] = to_f32(xr[16 * g + i]);
}

// dp4a with unsigned bytes in a (the masked weight codes, up to 3 << 6) and signed bytes in b.
__device__ __forceinline__ int dp4a_us(uint32_t a, uint32_t b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// L lanes per weight row (8, 16 or 32) and T = ceil(cpr / L) 16-byte chunks per lane and row: a
// warp works on P = 32 / L rows at a time ("a batch") and holds at most RB batches.
// The input norm of the `_an` / `_rn` kernels (PRO = 1 / 2; see the header).
template <typename XT> struct InputNorm {
    const XT* delta;  // PRO 1: added to x (may be null)
    const XT* gamma;  // (K) gains
    float eps;
    float gate_scale, up_scale;  // PRO 2
    XT* resid;        // PRO 1: s = T(x + delta) stored by block 0 (may be null)
};

// Stores 16 floats as T (exact: they are already rounded to T) at p, 16-byte aligned.
template <typename T> __device__ __forceinline__ void store16(T* p, const float (&f)[16]) {
    RawGroup<T> r;
    T* e = reinterpret_cast<T*>(r.v);
#pragma unroll
    for (int i = 0; i < 16; ++i) e[i] = from_f32<T>(f[i]);
#pragma unroll
    for (int c = 0; c < (int)sizeof(T); ++c) reinterpret_cast<uint4*>(p)[c] = r.v[c];
}

// Rounds through T and back.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

template <int L, int T, bool BX, int TE, int PRO, typename XT, typename OT>
__device__ void gemv_impl(const XT* __restrict__ x, const float* __restrict__ xscales, const uint8_t* __restrict__ W,
                          int N, int K, int K4, int rows_base, int rows_rem, float sw_val,
                          const float* __restrict__ sw_ptr, OT* __restrict__ y, InputNorm<XT> pro) {
    constexpr bool FUSED = !std::is_same<XT, int8_t>::value;
    constexpr int P = 32 / L;
    constexpr int RB = 16 / T < 8 ? 16 / T : 8;  // batches held: at most 16 chunks a lane
    // the K permuted codes of x, then (bulk-copy path) x as given, K * sizeof(XT) bytes
    extern __shared__ __align__(128) uint8_t xs[];
    __shared__ unsigned red_max[GV_WARPS];
    __shared__ __align__(8) uint64_t xbar;  // completes when the bulk copy of x has landed
    __shared__ int red_sum[GV_WARPS];
    __shared__ float red_ss[GV_WARPS];  // input norm: per-warp sums of squares

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int cpr = K4 >> 4;                   // 16-byte chunks per weight row
    const int lr = lane % L, rg = lane / L;    // chunk lane within the row, row within the batch
    // rows [wrow0, wrow0 + nrows) of the N rows spread evenly over all warps of the grid: the
    // first rows_rem warps get rows_base + 1 rows, the others rows_base (host-computed)
    const int gw = blockIdx.x * GV_WARPS + warp;
    const int wrow0 = gw * rows_base + min(gw, rows_rem);
    const int nrows = rows_base + (gw < rows_rem ? 1 : 0);

    // --- x first (see the header): it is on the critical path (quantize, then every dot product)
    const int G = K >> 4;  // 16-k groups of x; G <= 512: at most one per thread
    const bool xvec = (((size_t)x) & 15) == 0;
    const bool has0 = tid < G;
    // x by one bulk copy (sm_90+, 16-byte aligned x; K % 64 == 0 makes its size a multiple of
    // 16): it does not queue with the weight loads, so every warp requests its weights at once
    const bool xbulk = BX && GV_BULK_X && xvec;
    uint8_t* xraw = xs + K;
    if constexpr (BX && GV_BULK_X) {
        // the mbarrier, initialized before pdl_wait (shared memory only). (Unconditional here:
        // under a runtime condition the compiler schedules the kernel differently, and
        // 13824 x 2560 takes 5.9 instead of 5.5 us on the H100.)
        if (tid == 0) mbar_init(&xbar, 1);
        __syncthreads();
    }
    const int x_warps = (G + 31) / 32;  // the warps that hold x
    // Weight addresses. Chunk slots t < T - 1 are in range for every lane (T = ceil(cpr / L)), so
    // they sit at immediate offsets 16 L t from the lane's row pointer; the last slot is in range
    // only where lr + L (T - 1) < cpr (elsewhere it reads zeros: code 0 adds nothing). Rows past
    // the warp's last repeat that row (the same addresses as another lane: no extra traffic);
    // their sums are never stored.
    bool last_ok;
    const uint8_t* wrow[RB];
    auto weight_rows = [&]() {
        last_ok = lr + L * (T - 1) < cpr;
#pragma unroll
        for (int b = 0; b < RB; ++b) wrow[b] = W + (size_t)(wrow0 + min(b * P + rg, max(nrows - 1, 0))) * K4 + 16 * lr;
    };
    uint4 wr[T][RB];
    // the weights of chunk slots [t0, t1) (compile-time bounds) in the order the dot products use
    // them (slot t, then batch b); the x warps call this behind the absmax barrier (coherent
    // loads are not hoisted above it)
    auto load_weights = [&](auto t0, auto t1) {
#pragma unroll
        for (int t = decltype(t0)::value; t < decltype(t1)::value; ++t)
#pragma unroll
            for (int b = 0; b < RB; ++b)
                wr[t][b] = (b * P < nrows && (t < T - 1 || last_ok)) ? ldg_weights16(wrow[b] + 16 * L * t)
                                                                     : make_uint4(0u, 0u, 0u, 0u);
    };
    constexpr std::integral_constant<int, 0> S0{};
    constexpr std::integral_constant<int, TE> SE{};
    constexpr std::integral_constant<int, T> ST{};
    // Weights known complete before this kernel (TE > 0, the `_e` kernels: the host saw every
    // kernel queued before the weight's first use finish): their first TE chunk slots are
    // requested before pdl_wait, so that they stream while the previous kernel ends; not by the
    // x warps of the thread-load path (x first). One slot (TE = 1): all of them before the wait
    // would delay x behind them (H100, 2560^2: 3.85 us, one slot 3.50, none 3.62). (A template
    // parameter: as a runtime flag it changes the schedule of the other path, 4096^2 3.7 -> 4.1.)
    const bool early = TE > 0 && (xbulk || warp >= x_warps);
    if constexpr (TE > 0) {
        weight_rows();
        if (early) load_weights(S0, SE);
    }
    // the weights not requested early
    auto load_rest = [&]() {
        if (early) {
            load_weights(SE, ST);
        } else {
            load_weights(S0, ST);
        }
    };
    // the norm's gains: a settled weight in the `_e` kernels (the host saw it complete), so
    // requested before the wait, off the x warps' critical path
    RawGroup<XT> x1, gm;
    if constexpr (PRO != 0 && TE > 0) {
        if (has0) gv_load_raw(pro.gamma, tid, gm);
    }
    // programmatic dependent launch (common.cuh): wait for the previous kernel, then let the
    // next one be scheduled at once (one wave), which hides the launch latency between
    // consecutive GEMVs
    pdl_wait();
    pdl_launch_dependents();
    if (xbulk && tid == 0) bulk_load_g2s(xraw, x, (uint32_t)(K * sizeof(XT)), &xbar);
    RawGroup<XT> x0;
    if (!xbulk && xvec && has0) gv_load_raw(x, tid, x0);
    // input norm operands, right behind x: delta or the up half, and (not `_e`) the gains
    if constexpr (PRO != 0) {
        if (has0) {
            if (PRO == 2 || pro.delta != nullptr) gv_load_raw(PRO == 2 ? x + K : pro.delta, tid, x1);
            if (TE == 0) gv_load_raw(pro.gamma, tid, gm);
        }
    }
    if constexpr (TE == 0) weight_rows();  // behind x's loads: x first
    if (xbulk) {
        load_rest();
        if (has0) {
            mbar_wait(&xbar, 0);
#pragma unroll
            for (int c = 0; c < (int)sizeof(XT); ++c)
                x0.v[c] = *reinterpret_cast<const uint4*>(xraw + 16 * (sizeof(XT) * tid + c));
        }
    }

    // --- x: quantize (or permute) into shared memory; s_x and the code sum of the row
    float sx;
    int sum = 0;
    if constexpr (FUSED) {
        float f0[16];
        if (!has0) {
#pragma unroll
            for (int i = 0; i < 16; ++i) f0[i] = 0.0f;
        } else if (xvec) {
            raw_to_f32(x0, f0);
        } else {
            gv_load16_unaligned(x, tid, f0);
        }
        unsigned amax = 0u;
        if constexpr (PRO != 0) {
            // the input norm (header): s, then t = s * gamma into f0; the sum of squares of s and
            // the absmax of t in one block reduction; then y = T(r * t), whose absmax is
            // T(r * max|t|) exactly (r > 0 and rounding are monotonic), so no second reduction
            float ss = 0.0f;
            if (has0) {
                float a[16], gf[16];
                if (PRO == 2 || pro.delta != nullptr) {
                    raw_to_f32(x1, a);
                } else {
#pragma unroll
                    for (int i = 0; i < 16; ++i) a[i] = 0.0f;
                }
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    float v;
                    if constexpr (PRO == 1) {
                        v = pro.delta != nullptr ? round_to<XT>(f0[i] + a[i]) : f0[i];
                    } else {
                        const float g = fmaxf(round_to<XT>(f0[i] * pro.gate_scale), 0.0f);
                        const float u = round_to<XT>(a[i] * pro.up_scale);
                        v = round_to<XT>(round_to<XT>(g * g) * u);
                    }
                    f0[i] = v;
                    ss += v * v;
                }
                if (PRO == 1 && pro.resid != nullptr && blockIdx.x == 0) store16(pro.resid + 16 * tid, f0);
                raw_to_f32(gm, gf);
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    f0[i] *= gf[i];
                    amax = max(amax, __float_as_uint(f0[i]) & 0x7fffffffu);
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            amax = __reduce_max_sync(0xffffffffu, amax);
            if (lane == 0) {
                red_ss[warp] = ss;
                red_max[warp] = amax;
            }
            if (warp >= x_warps) load_rest();  // no x here: the weights now
            __syncthreads();
            if (warp < x_warps) load_rest();
            ss = 0.0f;
#pragma unroll
            for (int w = 0; w < GV_WARPS; ++w) {
                ss += red_ss[w];
                amax = max(amax, red_max[w]);
            }
            const float r = rsqrtf(ss / (float)K + pro.eps);
            // NaN or Inf in t stays >= 0x7f800000 (then no codes, as below); else the absmax of y
            if (amax < 0x7f800000u) amax = __float_as_uint(round_to<XT>(r * __uint_as_float(amax)));
#pragma unroll
            for (int i = 0; i < 16; ++i) f0[i] = round_to<XT>(r * f0[i]);
        } else {
            // absmax as the integer max of the bits of |x|: exact, and NaN/Inf show as >= 0x7f800000
#pragma unroll
            for (int i = 0; i < 16; ++i) amax = max(amax, __float_as_uint(f0[i]) & 0x7fffffffu);
            amax = __reduce_max_sync(0xffffffffu, amax);
            if (lane == 0) red_max[warp] = amax;
            if (!xbulk && warp >= x_warps) load_rest();
            __syncthreads();
            if (!xbulk && warp < x_warps) load_rest();
            amax = red_max[0];
#pragma unroll
            for (int w = 1; w < GV_WARPS; ++w) amax = max(amax, red_max[w]);
        }
        const bool bad = amax >= 0x7f800000u;
        sx = bad ? __int_as_float(0x7fc00000) : act_scale_from_absmax(__uint_as_float(amax));
        const float inv = __frcp_rn(sx);
        if (has0) {
            const int g = tid;
            int q[16];
            if (bad) {
#pragma unroll
                for (int i = 0; i < 16; ++i) q[i] = 0;
            } else {
                act_codes16(f0, sx, inv, q);
            }
#pragma unroll
            for (int i = 0; i < 16; ++i) sum += q[i];
            *reinterpret_cast<uint4*>(xs + 16 * ((g & 3) * cpr + (g >> 2))) = pack16_permuted(q);
        }
    } else {
        sx = xscales != nullptr ? xscales[0] : 0.0f;
        if (has0) {
            const int g = tid;
            uint4 v;
            if (xvec) {
                v = x0.v[0];
            } else {
                const uint8_t* c = reinterpret_cast<const uint8_t*>(x) + 16 * g;
                v = make_uint4(pack4(c[0], c[1], c[2], c[3]), pack4(c[4], c[5], c[6], c[7]),
                               pack4(c[8], c[9], c[10], c[11]), pack4(c[12], c[13], c[14], c[15]));
            }
            int s16;
            *reinterpret_cast<uint4*>(xs + 16 * ((g & 3) * cpr + (g >> 2))) = permute_codes16(v, &s16);
            sum += s16;
        }
    }
    sum = __reduce_add_sync(0xffffffffu, sum);
    if (lane == 0) red_sum[warp] = sum;
    if (!FUSED && !xbulk && warp >= x_warps) load_rest();
    __syncthreads();
    if (!FUSED && !xbulk && warp < x_warps) load_rest();

    // --- dot products: per chunk slot t, the 4 groups of x codes of chunk c (one LDS.128 each;
    // the L lanes of a row read L consecutive 16 bytes, the P rows the same ones), then per batch
    // word u of the weight chunk against group u. Masking instead of shifting leaves the codes of
    // field i multiplied by 4^i; the four partial sums are scaled back exactly (multiples of 4^i).
    int acc[RB];
#pragma unroll
    for (int b = 0; b < RB; ++b) acc[b] = 0;
#pragma unroll
    for (int t = 0; t < T; ++t) {
        const int c = min(lr + L * t, cpr - 1);  // clamped: out-of-range slots hold zero weights
        uint4 xq[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) xq[u] = *reinterpret_cast<const uint4*>(xs + 16 * (u * cpr + c));
#pragma unroll
        for (int b = 0; b < RB; ++b) {
            if (b * P >= nrows) break;  // warp-uniform
            int p0 = 0, p1 = 0, p2 = 0, p3 = 0;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const uint32_t w = comp4(wr[t][b], u);
                p0 = dp4a_us(w & 0x03030303u, xq[u].x, p0);
                p1 = dp4a_us(w & 0x0c0c0c0cu, xq[u].y, p1);
                p2 = dp4a_us(w & 0x30303030u, xq[u].z, p2);
                p3 = dp4a_us(w & 0xc0c0c0c0u, xq[u].w, p3);
            }
            acc[b] += p0 + (p1 >> 2) + (p2 >> 4) + (p3 >> 6);
        }
    }

    // --- reduce over the L lanes of each row (integers: exact); lane 0 of the row stores
    int xsum = 0;
#pragma unroll
    for (int w = 0; w < GV_WARPS; ++w) xsum += red_sum[w];
    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
#pragma unroll
    for (int b = 0; b < RB; ++b) {
        if (b * P >= nrows) break;  // warp-uniform
        int v = acc[b];
#pragma unroll
        for (int o = L / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
        const int r = b * P + rg;
        if (lr == 0 && r < nrows) {
            const int tot = v - xsum;  // codes are w_q + 1: sum x (c - 1) = sum x c - sum x
            const size_t n = (size_t)wrow0 + r;
            if constexpr (std::is_same<OT, int>::value) {
                y[n] = tot;
            } else {
                store_out<OT>(y, n, dequant(tot, sx, sw));
            }
        }
    }
}

#define GV_INST(L, T, BX, TE, XT, OT, NAME)                                                                    \
    extern "C" __global__ void __launch_bounds__(GV_THREADS, 1)                                                \
        NAME(const XT* x, const float* xs, const uint8_t* W, int N, int K, int K4, int rows_base, int rows_rem, \
             float sw_val, const float* sw_ptr, OT* y) {                                                        \
        gemv_impl<L, T, BX, TE, 0, XT, OT>(x, xs, W, N, K, K4, rows_base, rows_rem, sw_val, sw_ptr, y,         \
                                           InputNorm<XT>{nullptr, nullptr, 0.0f, 0.0f, 0.0f, nullptr});        \
    }
// The input-norm kernels (float x, OT = XT, thread loads of x): the plain arguments, then the
// norm's (InputNorm's fields in order).
#define GV_INST_NORM(L, T, TE, PRO, XT, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(GV_THREADS, 1)                                                \
        NAME(const XT* x, const float* xs, const uint8_t* W, int N, int K, int K4, int rows_base, int rows_rem, \
             float sw_val, const float* sw_ptr, XT* y, const XT* delta, const XT* gamma, float eps,            \
             float gate_scale, float up_scale, XT* resid) {                                                    \
        gemv_impl<L, T, false, TE, PRO, XT, XT>(x, xs, W, N, K, K4, rows_base, rows_rem, sw_val, sw_ptr, y,    \
                                                InputNorm<XT>{delta, gamma, eps, gate_scale, up_scale, resid}); \
    }

// name: gemv_<x>_<out>_l<L>_t<T>[_bx|_an|_rn][_e]: L lanes per row, T = ceil(cpr / L) chunks per
// lane and row, _bx: x by a bulk copy, _an / _rn: the input norms (header), _e: the first chunk
// slot of weights requested before pdl_wait (TE = 1; float x only, the decode path). The host
// picks among these (src/plan/gemv.rs; L = 32 covers every K).
#define GV_LT(L, T, XT, OT, XN, ON)                                      \
    GV_INST(L, T, false, 0, XT, OT, gemv_##XN##_##ON##_l##L##_t##T)     \
    GV_INST(L, T, true, 0, XT, OT, gemv_##XN##_##ON##_l##L##_t##T##_bx)
// The float-x kernels also come with the input norms: _an (add + RMSNorm), _rn (squared-ReLU
// gate + RMSNorm), each with and without _e.
#define GV_LT_E(L, T, XT, OT, XN, ON)                                               \
    GV_LT(L, T, XT, OT, XN, ON)                                                     \
    GV_INST(L, T, false, 1, XT, OT, gemv_##XN##_##ON##_l##L##_t##T##_e)            \
    GV_INST(L, T, true, 1, XT, OT, gemv_##XN##_##ON##_l##L##_t##T##_bx_e)          \
    GV_INST_NORM(L, T, 0, 1, XT, gemv_##XN##_##ON##_l##L##_t##T##_an)              \
    GV_INST_NORM(L, T, 1, 1, XT, gemv_##XN##_##ON##_l##L##_t##T##_an_e)            \
    GV_INST_NORM(L, T, 0, 2, XT, gemv_##XN##_##ON##_l##L##_t##T##_rn)              \
    GV_INST_NORM(L, T, 1, 2, XT, gemv_##XN##_##ON##_l##L##_t##T##_rn_e)
#define GV_MRS(XT, OT, XN, ON, LT) \
    LT(8, 2, XT, OT, XN, ON)       \
    LT(8, 3, XT, OT, XN, ON)       \
    LT(8, 4, XT, OT, XN, ON)       \
    LT(8, 5, XT, OT, XN, ON)       \
    LT(16, 3, XT, OT, XN, ON)      \
    LT(16, 4, XT, OT, XN, ON)      \
    LT(16, 7, XT, OT, XN, ON)      \
    LT(32, 1, XT, OT, XN, ON)      \
    LT(32, 2, XT, OT, XN, ON)      \
    LT(32, 3, XT, OT, XN, ON)      \
    LT(32, 4, XT, OT, XN, ON)

GV_MRS(int8_t, int, i8, i32, GV_LT)
GV_MRS(int8_t, float, i8, f32, GV_LT)
GV_MRS(int8_t, __nv_bfloat16, i8, bf16, GV_LT)
GV_MRS(int8_t, __half, i8, f16, GV_LT)
GV_MRS(float, float, f32, f32, GV_LT_E)
GV_MRS(__nv_bfloat16, __nv_bfloat16, bf16, bf16, GV_LT_E)
GV_MRS(__half, __half, f16, f16, GV_LT_E)
