// Small-M ("skinny", decode) matmul: y (M, N) = x (M, K) . W (N, K)^T with W in the canonical
// packed ternary layout, for M <= 32. Streams the packed weights once, straight from global
// memory into tensor-core fragments (no shared-memory staging of W).
//
// Data layout
//   x       : either int8 codes (M, K) row-major + f32 scales (per row, or one per tensor), or the
//             float activations T (M, K) which the kernel quantizes itself (fused quantizer).
//   W       : packed (N, K4 = ceil(K/4)) bytes; VEC = 16 when K4 % 16 == 0 (16-byte loads),
//             4 when K4 % 4 == 0, else 1 (byte loads).
//   y       : (M, N) row-major, int32 accumulators or OT = f32/bf16/f16 after the epilogue.
//
// Tiling ("swap AB"): the MMA computes y^T = W . x^T with m16n8k32 s8 tensor-core ops: the 16 MMA
// rows are 16 weight rows n, the 8 MMA columns are 8 activation rows m (MT such column tiles:
// M <= 8*MT), the k dimension runs over blocks of 256 k (64 packed bytes per weight row).
//   * block = 8 warps, owns NTILE*16 consecutive weight rows; the 8 warps split the K blocks
//     (warp w takes kb = w, w+8, ...) and are summed at the end through shared memory (integer
//     sums, so the order does not matter for the result).
//   * lane (g = lane/4, t = lane%4), per K block and n-tile: loads 16 bytes of weight row g and 16
//     of row g+8 (bytes 16t..16t+15 of the block's 64), i.e. 4 words u = 0..3, each word the 16
//     codes of one 16-k group. (word >> 2i) & 0x03030303, i = 0..3, gives the codes of the group
//     in permuted order (common.cuh), which are directly the A-fragment registers: for MMA step
//     (u, h): a0/a2 = fields 2h/2h+1 of row g, a1/a3 = the same of row g+8.
//   * the activations are staged once per block into shared memory as permuted int8 (the B
//     fragments): slot (u*4 + t) of each 256-k block holds group 4t+u, so for a fixed u the 4
//     lanes of a row read 64 contiguous bytes (one LDS.128 each); rows are padded to a stride of
//     64 mod 128 bytes, which makes every LDS.128 conflict free. int8 codes are read one 16-k
//     group (16 bytes) per thread and step; when K % 16 == 0, with 16-byte loads, 2 (MT = 1,
//     within its 64 registers) or 8 groups a thread requested before any is staged.
//   * fused quantizer (float x): when M * (groups per row) <= 512, each thread loads its one or two
//     16-k groups into registers once (as raw bits, 16-byte loads when K % 16 == 0), the row absmax goes through shared-memory atomicMax (exact:
//     a max does not depend on order), then the same registers are quantized and staged; larger
//     inputs take two passes over x (absmax, then quantize) through L2.
//   * codes are used unsigned (0, 1, 2): acc = sum c*x - sum x, with the row sums of x computed
//     while staging (like the CPU kernel).
//   * weights go through a two-deep register pipeline: a warp's first two K blocks (kb = w and
//     w + 8) are requested before the activation staging, so that both latencies overlap it
//     (with K <= 4096 that is all of the warp's weights), and before pdl_wait where the host
//     says the previous kernel is this call's quantizer (w_early); after the MMAs of block kb the
//     load of kb + 16 is issued.
//   * MT = 1 (M <= 8) is compiled for 4 blocks per SM (<= 64 registers), so that N <= 16896
//     rows (528 blocks of 32) run in one wave on 132 SMs.
// Epilogue: y = (acc * s_x[m]) * s_w (two roundings), cast to OT; int32 mode stores acc.
#include "common.cuh"

#define SK_WARPS 8
#define SK_THREADS (SK_WARPS * 32)
// fused quantizer, single-pass form: up to SK_RG 16-k groups of x per thread held in registers
#define SK_RG 2

template <int VEC>
__device__ __forceinline__ uint4 load_w16(const uint8_t* __restrict__ row, int off, int K4, bool rvalid) {
    uint4 r = make_uint4(0u, 0u, 0u, 0u);
    if (!rvalid) return r;
    if constexpr (VEC == 16) {
        if (off < K4) r = ldg_stream16(row + off);
    } else if constexpr (VEC == 4) {
        uint32_t w[4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
            w[u] = (off + 4 * u < K4) ? __ldg(reinterpret_cast<const uint32_t*>(row + off + 4 * u)) : 0u;
        r = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
        uint32_t w[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            uint32_t v = 0;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                int o = off + 4 * u + b;
                if (o < K4) v |= (uint32_t)__ldg(row + o) << (8 * b);
            }
            w[u] = v;
        }
        r = make_uint4(w[0], w[1], w[2], w[3]);
    }
    return r;
}

// Element i (compile-time) of a group of 16 values held as raw bits, as f32 (exact).
template <typename T> __device__ __forceinline__ float raw_f32(const uint32_t* w, int i);
template <> __device__ __forceinline__ float raw_f32<float>(const uint32_t* w, int i) { return __uint_as_float(w[i]); }
template <> __device__ __forceinline__ float raw_f32<__nv_bfloat16>(const uint32_t* w, int i) {
    return __uint_as_float((i & 1) ? (w[i >> 1] & 0xffff0000u) : (w[i >> 1] << 16));
}
template <> __device__ __forceinline__ float raw_f32<__half>(const uint32_t* w, int i) {
    return __half2float(__ushort_as_half((unsigned short)((i & 1) ? (w[i >> 1] >> 16) : (w[i >> 1] & 0xffffu))));
}
template <> __device__ __forceinline__ float raw_f32<int8_t>(const uint32_t* w, int i) { return 0.0f; }  // unused

__device__ __forceinline__ uint32_t comp(const uint4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// XT: int8_t (codes + scales given) or a float type (fused quantization).
// OT: int (raw accumulators) or a float type.
template <int MT, int NTILE, int VEC, typename XT, typename OT>
__device__ void skinny_impl(const XT* __restrict__ x, const float* __restrict__ xscales, int per_tensor,
                            const uint8_t* __restrict__ W, int M, int N, int K, int K4, float sw_val,
                            const float* __restrict__ sw_ptr, OT* __restrict__ y, int w_early) {
    constexpr int NR = 16 * NTILE;     // weight rows per block
    constexpr bool FUSED = !std::is_same<XT, int8_t>::value;
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ int xsum[32];
    __shared__ float sx[32];
    __shared__ unsigned rowmax[32];
    __shared__ unsigned badmask;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int KB = (K4 + 63) / 64;     // 256-k blocks
    const int RS = KB * 256 + 64;      // smem row stride (bytes), = 64 mod 128
    const int n0 = blockIdx.x * NR;

    // programmatic dependent launch: wait for the previous kernel before the first global access,
    // or, with w_early (the previous kernel is this call's activation quantizer, which waited for
    // every earlier kernel: the weights were complete before it ran), after requesting the
    // weights, so that their latency overlaps the quantizer's completion
    if (!w_early) pdl_wait();
    // --- prefetch this warp's first two K blocks of weights (before staging, to overlap latencies)
    uint4 wa[NTILE], wb[NTILE], na[NTILE], nb[NTILE];
    int kb = warp;
#pragma unroll
    for (int j = 0; j < NTILE; ++j) {
        const int r0 = n0 + 16 * j + g, r1 = r0 + 8;
        const int kb1 = kb + SK_WARPS;
        wa[j] = load_w16<VEC>(W + (size_t)r0 * K4, kb * 64 + 16 * t, K4, kb < KB && r0 < N);
        wb[j] = load_w16<VEC>(W + (size_t)r1 * K4, kb * 64 + 16 * t, K4, kb < KB && r1 < N);
        na[j] = load_w16<VEC>(W + (size_t)r0 * K4, kb1 * 64 + 16 * t, K4, kb1 < KB && r0 < N);
        nb[j] = load_w16<VEC>(W + (size_t)r1 * K4, kb1 * 64 + 16 * t, K4, kb1 < KB && r1 < N);
    }

    if (w_early) pdl_wait();
    if (tid < 32) {
        xsum[tid] = 0;
        sx[tid] = 0.0f;
        rowmax[tid] = 0u;
    }
    if (tid == 0) badmask = 0u;

    const int Q = KB * 16;  // 16-k groups per staged row (zero past K)
    // Writes one group (16 codes in permuted order, as bytes) into its slot and adds its sum to
    // the row's.
    auto stage16 = [&](int m, int q, const uint4& bytes, int sum) {
        const int kbq = q >> 4, ql = q & 15;
        const int slot = (ql & 3) * 4 + (ql >> 2);  // group 4t+u -> slot 4u+t
        *reinterpret_cast<uint4*>(smem + (size_t)m * RS + kbq * 256 + slot * 16) = bytes;
        atomicAdd(&xsum[m], sum);
    };
    auto stage = [&](int m, int q, const int (&v)[16]) {
        int sum = 0;
#pragma unroll
        for (int p = 0; p < 16; ++p) sum += v[p];
        stage16(m, q, pack16(v), sum);
    };
    // scale of row m from its absmax (or of the tensor, per_tensor) and the non-finite mask
    auto finish_scales = [&]() {
        if (tid < 32) {
            float v = tid < M ? __uint_as_float(rowmax[tid]) : 0.0f;
            if (per_tensor) {
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
            }
            const unsigned bm = badmask;
            const bool rowbad = per_tensor ? (bm != 0u) : (((bm >> tid) & 1u) != 0u);
            sx[tid] = rowbad ? __int_as_float(0x7fc00000) : act_scale_from_absmax(v);
        }
    };

    if constexpr (FUSED) {
        if (M * Q <= SK_RG * SK_THREADS) {
            // --- single pass: every thread keeps its (at most SK_RG) groups of x in registers
            // x is kept as its raw bits (16 * sizeof(XT) / 4 words a group: 8 for bf16/f16)
            // rather than as floats, so that MT = 1 fits its 64-register budget.
            constexpr int RW = 16 * (int)sizeof(XT) / 4;
            uint32_t raw[SK_RG][RW];
            float am[SK_RG];
            bool nf[SK_RG];
            const bool vecx = (K & 15) == 0 && (((size_t)x) & 15) == 0;
#pragma unroll
            for (int r = 0; r < SK_RG; ++r) {
                const int idx = tid + r * SK_THREADS;
                const bool ok = idx < M * Q;
                const int m = ok ? idx / Q : 0, q = ok ? idx % Q : 0;
                const XT* xg = x + (size_t)m * K + 16 * q;
                if (ok && vecx && 16 * q < K) {
#pragma unroll
                    for (int c = 0; c < RW / 4; ++c) {
                        const uint4 v = __ldg(reinterpret_cast<const uint4*>(xg) + c);
                        raw[r][4 * c] = v.x, raw[r][4 * c + 1] = v.y, raw[r][4 * c + 2] = v.z, raw[r][4 * c + 3] = v.w;
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < 16; ++i) {
                        const bool in = ok && 16 * q + i < K;
                        if constexpr (sizeof(XT) == 4) {
                            raw[r][i] = in ? __float_as_uint(to_f32(xg[i])) : 0u;
                        } else {
                            const uint32_t b = in ? (uint32_t)*reinterpret_cast<const unsigned short*>(xg + i) : 0u;
                            if (i & 1) raw[r][i >> 1] |= b << 16;
                            else raw[r][i >> 1] = b;
                        }
                    }
                }
                am[r] = 0.0f;
                nf[r] = false;
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    const float f = raw_f32<XT>(raw[r], i);
                    nf[r] |= !isfinite(f);
                    am[r] = fmaxf(am[r], fabsf(f));
                }
            }
            __syncthreads();  // rowmax / badmask initialized
#pragma unroll
            for (int r = 0; r < SK_RG; ++r) {
                const int idx = tid + r * SK_THREADS;
                if (idx < M * Q) {
                    const int m = idx / Q;
                    atomicMax(&rowmax[m], __float_as_uint(am[r]));  // non-negative: bit order = value order
                    if (nf[r]) atomicOr(&badmask, 1u << m);
                }
            }
            __syncthreads();
            finish_scales();
            __syncthreads();
#pragma unroll
            for (int r = 0; r < SK_RG; ++r) {
                const int idx = tid + r * SK_THREADS;
                if (idx < M * Q) {
                    const int m = idx / Q, q = idx % Q;
                    const float s = sx[m];
                    const bool rowbad = isnan(s);
                    int v[16];
#pragma unroll
                    for (int p = 0; p < 16; ++p) {
                        const int i = 4 * (p & 3) + (p >> 2);  // position p = 4i' + j holds k = 4j + i'
                        v[p] = (16 * q + i < K && !rowbad) ? act_code(raw_f32<XT>(raw[r], i), s) : 0;
                    }
                    stage(m, q, v);
                }
            }
        } else {
            // --- two passes over x (L2-resident): absmax, then quantize and stage
            float am[8 * MT];
            unsigned bad = 0;
#pragma unroll
            for (int m = 0; m < 8 * MT; ++m) am[m] = 0.0f;
            for (int k = tid; k < K; k += SK_THREADS) {
#pragma unroll
                for (int m = 0; m < 8 * MT; ++m) {
                    if (m < M) {
                        float v = to_f32(x[(size_t)m * K + k]);
                        if (!isfinite(v)) bad |= 1u << m;
                        am[m] = fmaxf(am[m], fabsf(v));
                    }
                }
            }
            __syncthreads();  // rowmax / badmask initialized
#pragma unroll
            for (int m = 0; m < 8 * MT; ++m) {
                float v = am[m];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
                if (lane == 0 && m < M) atomicMax(&rowmax[m], __float_as_uint(v));
            }
            bad = __reduce_or_sync(0xffffffffu, bad);
            if (lane == 0 && bad) atomicOr(&badmask, bad);
            __syncthreads();
            finish_scales();
            __syncthreads();
            for (int idx = tid; idx < M * Q; idx += SK_THREADS) {
                const int m = idx / Q, q = idx % Q;
                const float s = sx[m];
                const bool rowbad = isnan(s);
                int v[16];
#pragma unroll
                for (int p = 0; p < 16; ++p) {
                    const int k = 16 * q + 4 * (p & 3) + (p >> 2);
                    v[p] = (k < K && !rowbad) ? act_code(to_f32(x[(size_t)m * K + k]), s) : 0;
                }
                stage(m, q, v);
            }
        }
    } else {
        if (tid < M && xscales != nullptr) sx[tid] = xscales[per_tensor ? 0 : tid];
        __syncthreads();  // xsum initialized
        if ((K & 15) == 0 && (((size_t)x) & 15) == 0) {
            // every row start 16-byte aligned: a 16-byte load per group, SU groups a thread
            // requested before any is staged (one L2 round trip per SU groups, not per group: a
            // loop taking one group at a time has 46% of the warps' stalls on that wait at M = 16,
            // K = 4096, ncu on the H100)
            constexpr int SU = MT == 1 ? 2 : 8;
            for (int base = tid; base < M * Q; base += SU * SK_THREADS) {
                uint4 c[SU];
#pragma unroll
                for (int s = 0; s < SU; ++s) {
                    const int idx = base + s * SK_THREADS, m = idx / Q, q = idx % Q;
                    c[s] = (idx < M * Q && 16 * q < K) ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + 16 * q))
                                                       : make_uint4(0u, 0u, 0u, 0u);
                }
#pragma unroll
                for (int s = 0; s < SU; ++s) {
                    const int idx = base + s * SK_THREADS;
                    if (idx < M * Q) {
                        int sum;
                        const uint4 b = permute_codes16(c[s], &sum);
                        stage16(idx / Q, idx % Q, b, sum);
                    }
                }
            }
        } else {
            for (int idx = tid; idx < M * Q; idx += SK_THREADS) {
                const int m = idx / Q, q = idx % Q;
                int v[16];
#pragma unroll
                for (int p = 0; p < 16; ++p) {
                    const int k = 16 * q + 4 * (p & 3) + (p >> 2);
                    v[p] = k < K ? (int)x[(size_t)m * K + k] : 0;
                }
                stage(m, q, v);
            }
        }
    }
    __syncthreads();

    // --- main loop
    int acc[NTILE][MT][4];
#pragma unroll
    for (int j = 0; j < NTILE; ++j)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[j][mt][c] = 0;

    for (; kb < KB; kb += SK_WARPS) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            uint4 xv[MT];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int m = 8 * mt + g;
                xv[mt] = m < M ? *reinterpret_cast<const uint4*>(smem + (size_t)m * RS + kb * 256 + u * 64 + t * 16)
                               : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int j = 0; j < NTILE; ++j) {
                const uint32_t w0 = comp(wa[j], u), w1 = comp(wb[j], u);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint32_t a0 = (w0 >> (4 * h)) & 0x03030303u;
                    const uint32_t a2 = (w0 >> (4 * h + 2)) & 0x03030303u;
                    const uint32_t a1 = (w1 >> (4 * h)) & 0x03030303u;
                    const uint32_t a3 = (w1 >> (4 * h + 2)) & 0x03030303u;
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        mma_s8_16832(acc[j][mt], a0, a1, a2, a3, comp(xv[mt], 2 * h), comp(xv[mt], 2 * h + 1));
                }
            }
        }
        // shift the two-deep register pipeline: block kb + 8 is in flight, request kb + 16
        const int nkb = kb + 2 * SK_WARPS;
#pragma unroll
        for (int j = 0; j < NTILE; ++j) {
            const int r0 = n0 + 16 * j + g, r1 = r0 + 8;
            wa[j] = na[j];
            wb[j] = nb[j];
            na[j] = load_w16<VEC>(W + (size_t)r0 * K4, nkb * 64 + 16 * t, K4, nkb < KB && r0 < N);
            nb[j] = load_w16<VEC>(W + (size_t)r1 * K4, nkb * 64 + 16 * t, K4, nkb < KB && r1 < N);
        }
    }

    // --- cross-warp reduction (reuses the staging buffer)
    __syncthreads();
    constexpr int MC = 8 * MT;
    int* red = reinterpret_cast<int*>(smem);
#pragma unroll
    for (int j = 0; j < NTILE; ++j)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const int nl = 16 * j + g, m = 8 * mt + 2 * t;
            red[(warp * NR + nl) * MC + m] = acc[j][mt][0];
            red[(warp * NR + nl) * MC + m + 1] = acc[j][mt][1];
            red[(warp * NR + nl + 8) * MC + m] = acc[j][mt][2];
            red[(warp * NR + nl + 8) * MC + m + 1] = acc[j][mt][3];
        }
    __syncthreads();
    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
    for (int idx = tid; idx < NR * M; idx += SK_THREADS) {
        const int nl = idx % NR, m = idx / NR, n = n0 + nl;
        if (n >= N) continue;
        int tot = 0;
#pragma unroll
        for (int w = 0; w < SK_WARPS; ++w) tot += red[(w * NR + nl) * MC + m];
        tot -= xsum[m];
        if constexpr (std::is_same<OT, int>::value) {
            y[(size_t)m * N + n] = tot;
        } else {
            store_out<OT>(y, (size_t)m * N + n, dequant(tot, sx[m], sw));
        }
    }
}

#define SK_INST(MT, NTILE, VEC, XT, OT, NAME)                                                       \
    extern "C" __global__ void __launch_bounds__(SK_THREADS, (MT) == 1 ? 4 : 1)                    \
        NAME(const XT* x, const float* xs, int per_tensor, const uint8_t* W, int M, int N, int K,  \
             int K4, float sw_val, const float* sw_ptr, OT* y, int w_early) {                      \
        skinny_impl<MT, NTILE, VEC, XT, OT>(x, xs, per_tensor, W, M, N, K, K4, sw_val, sw_ptr, y, w_early); \
    }

// name: skinny_<x>_<out>_m<MT>_v<VEC>   (NTILE = 2: 32 weight rows per block)
//       skinny_<x>_<out>_m<MT>_v16_n1   (NTILE = 1: 16 rows per block, for small N)
#define SK_VECS(MT, XT, OT, XN, ON)                                  \
    SK_INST(MT, 1, 16, XT, OT, skinny_##XN##_##ON##_m##MT##_v16_n1)  \
    SK_INST(MT, 2, 16, XT, OT, skinny_##XN##_##ON##_m##MT##_v16)     \
    SK_INST(MT, 2, 4, XT, OT, skinny_##XN##_##ON##_m##MT##_v4)       \
    SK_INST(MT, 2, 1, XT, OT, skinny_##XN##_##ON##_m##MT##_v1)

#define SK_MTS(XT, OT, XN, ON)    \
    SK_VECS(1, XT, OT, XN, ON)    \
    SK_VECS(2, XT, OT, XN, ON)    \
    SK_VECS(4, XT, OT, XN, ON)

SK_MTS(int8_t, int, i8, i32)
SK_MTS(int8_t, float, i8, f32)
SK_MTS(int8_t, __nv_bfloat16, i8, bf16)
SK_MTS(int8_t, __half, i8, f16)
SK_MTS(float, float, f32, f32)
SK_MTS(__nv_bfloat16, __nv_bfloat16, bf16, bf16)
SK_MTS(__half, __half, f16, f16)
