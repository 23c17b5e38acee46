// Decode matmul (M <= 2): y (M, N) = x (M, K) . W (N, K)^T, W in the canonical packed ternary
// layout, on the CUDA cores (dp4a), with the weights streamed into shared memory by the bulk copy
// engine (cp.async.bulk, sm_90). Needs K % 64 == 0 (16-byte packed chunks, rows 16-byte aligned)
// and a 16-byte aligned weight pointer.
// OPT-IN (BITLINEAR_CUDA_GEMV=1): bit-exact, but on the H100 slower than the skinny kernel at
// M = 1 on all four benchmark shapes (us per call, bf16 x: 2560x2560 10.9 vs 8.3; 13824x2560
// 14.3 vs 13.4; 2560x6912 15.8 vs 11.9; 4096x4096 12.3 vs 9.6), also on pre-quantized codes
// (8.7 vs 6.8 us at 2560x2560): the bulk copy of a warp's rows and its mbarrier wait add latency
// that the skinny kernel's direct 16-byte register loads do not have.
//
// Data layout
//   x  : float activations T (M, K) row-major, quantized here (fused quantizer), or int8 codes
//        (M, K) plus f32 scales (per row, or one per tensor).
//   W  : packed (N, K4 = K/4) bytes, row-major, so any run of whole rows is one contiguous span.
//   y  : (M, N) row-major, int32 accumulators or OT = f32/bf16/f16 after the epilogue.
//
// Work split: block = 8 warps; warp w of block b owns rw (host-chosen, <= 16) consecutive weight
// rows starting at (8b + w) * rw. Dynamic shared memory: [MR * K bytes of permuted x codes]
// [8 warps x rw x K4 bytes of weights].
//   * lane 0 of each warp issues two bulk copies of its rows (first ceil(rw/2) rows, then the
//     rest) into its slab, each completing on its own mbarrier, before anything else happens, so
//     the whole matrix is requested at kernel start;
//   * meanwhile all 256 threads quantize x: pass 1 loads 16-k groups (16-byte loads when x is
//     16-byte aligned), per-row absmax and non-finite flag (warp reduce, smem atomicMax on the
//     float bits: exact); pass 2 reloads the groups (L1/L2), quantizes and stores them permuted
//     (common.cuh: position 4i + j of a group holds k = 4j + i), adding up each row's code sum.
//     int8 input: the codes are only permuted and summed.
//   * lane l then handles the 16-byte chunks j = l, l + 32, ... of every row of its warp (a chunk
//     = 64 k = four 16-k groups, one 32-bit word each): the 64 x bytes of chunk j go to registers
//     once per half, and for each row the word u of the chunk gives (word >> 2i) & 0x03030303 =
//     the codes at permuted positions 4i..4i+3 of group 4j + u, one dp4a against x word i of that
//     group. Codes stay unsigned (0, 1, 2): sum x (c - 1) = sum x c - sum x.
//   * per row, the 32 lane sums are added with one redux.sync; lane r keeps row r's total and the
//     lanes r < rw store their outputs (consecutive n: coalesced).
// Epilogue: y = (acc * s_x[m]) * s_w (two roundings), cast to OT; int32 mode stores acc.
#include "common.cuh"

#define GV_WARPS 8
#define GV_THREADS (GV_WARPS * 32)
#define GV_RW 16  // most weight rows a warp can own (accumulators are registers)

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_fence_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned phase) {
    uint32_t done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_u32(b)), "r"(phase)
            : "memory");
    }
}
// 1D bulk copy global -> shared (16-byte aligned addresses, size a multiple of 16), completing
// `bytes` transactions on the mbarrier.
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}

__device__ __forceinline__ uint32_t comp4(const uint4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// 16 values of group g (k = 16g .. 16g+15) of a row as floats; K % 16 == 0 here.
template <typename T>
__device__ __forceinline__ void gv_load16(const T* __restrict__ xr, int g, bool vec, float (&f)[16]) {
    if (vec) {
        constexpr int VN = 16 / sizeof(T);
#pragma unroll
        for (int c = 0; c < 16 / VN; ++c) {
            uint4 v = __ldg(reinterpret_cast<const uint4*>(xr + 16 * g + c * VN));
            const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
            for (int i = 0; i < VN; ++i) f[c * VN + i] = to_f32(e[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) f[i] = to_f32(xr[16 * g + i]);
    }
}

template <int MR, typename XT, typename OT>
__device__ void gemv_impl(const XT* __restrict__ x, const float* __restrict__ xscales, int per_tensor,
                          const uint8_t* __restrict__ W, int M, int N, int K, int K4, int rw, float sw_val,
                          const float* __restrict__ sw_ptr, OT* __restrict__ y) {
    constexpr bool FUSED = !std::is_same<XT, int8_t>::value;
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ __align__(8) uint64_t bar[GV_WARPS][2];
    __shared__ int xsum[MR];
    __shared__ float sx[MR];
    __shared__ unsigned rowmax[MR];
    __shared__ unsigned badmask;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int cpr = K4 >> 4;                                  // 16-byte chunks per weight row
    const int h0 = (rw + 1) >> 1;                             // rows in the first copy
    const int wrow0 = (blockIdx.x * GV_WARPS + warp) * rw;    // first weight row of this warp
    const int nrows = max(0, min(rw, N - wrow0));
    const int e0 = min(h0, nrows);                            // rows [0, e0) first copy, [e0, nrows) second
    uint8_t* xs = smem;                                       // MR rows of K permuted codes
    uint8_t* ws = smem + (size_t)MR * K + (size_t)warp * rw * K4;

    // --- request this warp's weights first
    if (lane == 0) {
        mbar_init(&bar[warp][0], 1);
        mbar_init(&bar[warp][1], 1);
        mbar_fence_init();
        if (e0 > 0) {
            mbar_expect_tx(&bar[warp][0], (unsigned)(e0 * K4));
            bulk_g2s(ws, W + (size_t)wrow0 * K4, (unsigned)(e0 * K4), &bar[warp][0]);
        }
        if (nrows > e0) {
            mbar_expect_tx(&bar[warp][1], (unsigned)((nrows - e0) * K4));
            bulk_g2s(ws + (size_t)e0 * K4, W + (size_t)(wrow0 + e0) * K4, (unsigned)((nrows - e0) * K4),
                     &bar[warp][1]);
        }
    }
    if (tid < MR) {
        xsum[tid] = 0;
        rowmax[tid] = 0u;
        sx[tid] = 0.0f;
    }
    if (tid == 0) badmask = 0u;
    __syncthreads();

    // --- activations: quantize (or copy) into permuted int8 rows
    const int G = K >> 4;  // 16-k groups per row
    if constexpr (FUSED) {
        const bool vec = (((size_t)x) & 15) == 0;
        float am[MR];
        unsigned bad = 0;
#pragma unroll
        for (int m = 0; m < MR; ++m) am[m] = 0.0f;
        for (int idx = tid; idx < M * G; idx += GV_THREADS) {
            const int m = idx / G, g = idx - m * G;
            float f[16];
            gv_load16(x + (size_t)m * K, g, vec, f);
            float a = 0.0f;
            bool nf = false;
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                nf |= !isfinite(f[i]);
                a = fmaxf(a, fabsf(f[i]));
            }
#pragma unroll
            for (int mm = 0; mm < MR; ++mm)
                if (mm == m) am[mm] = fmaxf(am[mm], a);
            if (nf) bad |= 1u << m;
        }
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            float v = am[m];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
            if (lane == 0 && m < M) atomicMax(&rowmax[m], __float_as_uint(v));  // v >= 0: bits order
        }
        bad = __reduce_or_sync(0xffffffffu, bad);
        if (lane == 0 && bad) atomicOr(&badmask, bad);
        __syncthreads();
        if (tid < MR) {
            float v = 0.0f;
            bool rb;
            if (per_tensor) {
                for (int m = 0; m < M; ++m) v = fmaxf(v, __uint_as_float(rowmax[m]));
                rb = badmask != 0u;
            } else {
                v = __uint_as_float(rowmax[tid]);
                rb = ((badmask >> tid) & 1u) != 0u;
            }
            sx[tid] = rb ? __int_as_float(0x7fc00000) : act_scale_from_absmax(v);
        }
        __syncthreads();
    } else {
        if (tid < M && xscales != nullptr) sx[tid] = xscales[per_tensor ? 0 : tid];
    }
    {
        int sum[MR];
#pragma unroll
        for (int m = 0; m < MR; ++m) sum[m] = 0;
        for (int idx = tid; idx < M * G; idx += GV_THREADS) {
            const int m = idx / G, g = idx - m * G;
            int q[16];
            if constexpr (FUSED) {
                const float s = sx[m];
                const bool rowbad = isnan(s);
                float f[16];
                gv_load16(x + (size_t)m * K, g, (((size_t)x) & 15) == 0, f);
#pragma unroll
                for (int i = 0; i < 16; ++i) q[i] = rowbad ? 0 : act_code(f[i], s);
            } else {
                const int8_t* cr = x + (size_t)m * K + 16 * g;
                if ((((size_t)x) & 15) == 0) {
                    const uint4 v = __ldg(reinterpret_cast<const uint4*>(cr));
#pragma unroll
                    for (int i = 0; i < 16; ++i) q[i] = (int)(int8_t)(comp4(v, i >> 2) >> (8 * (i & 3)));
                } else {
#pragma unroll
                    for (int i = 0; i < 16; ++i) q[i] = (int)cr[i];
                }
            }
            int s16 = 0;
#pragma unroll
            for (int i = 0; i < 16; ++i) s16 += q[i];
#pragma unroll
            for (int mm = 0; mm < MR; ++mm)
                if (mm == m) sum[mm] += s16;
            uint4 v;  // permuted: position p = 4i + j holds k = 4j + i
            v.x = pack4(q[0], q[4], q[8], q[12]);
            v.y = pack4(q[1], q[5], q[9], q[13]);
            v.z = pack4(q[2], q[6], q[10], q[14]);
            v.w = pack4(q[3], q[7], q[11], q[15]);
            *reinterpret_cast<uint4*>(xs + (size_t)m * K + 16 * g) = v;
        }
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            const int v = __reduce_add_sync(0xffffffffu, sum[m]);
            if (lane == 0 && m < M && v != 0) atomicAdd(&xsum[m], v);
        }
    }
    __syncthreads();

    // --- dot products: rows [0, e0) after the first copy lands, [e0, nrows) after the second
    int acc[GV_RW][MR];
#pragma unroll
    for (int r = 0; r < GV_RW; ++r)
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[r][m] = 0;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
        const int rb = p == 0 ? 0 : e0, re = p == 0 ? e0 : nrows;
        if (re <= rb) continue;  // warp-uniform
        mbar_wait(&bar[warp][p], 0);
#pragma unroll 1
        for (int j = lane; j < cpr; j += 32) {
            uint4 xv[MR][4];
#pragma unroll
            for (int m = 0; m < MR; ++m)
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    xv[m][u] = m < M ? *reinterpret_cast<const uint4*>(xs + (size_t)m * K + 64 * j + 16 * u)
                                     : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int r = 0; r < GV_RW; ++r) {
                if (r >= rb && r < re) {
                    const uint4 w = *reinterpret_cast<const uint4*>(ws + (size_t)r * K4 + 16 * j);
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        const uint32_t wu = comp4(w, u);
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const int c = (int)((wu >> (2 * i)) & 0x03030303u);
#pragma unroll
                            for (int m = 0; m < MR; ++m) acc[r][m] = __dp4a(c, (int)comp4(xv[m][u], i), acc[r][m]);
                        }
                    }
                }
            }
        }
    }

    // --- reduce over the lanes; lane r stores row r
    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
        int mine = 0;
#pragma unroll
        for (int r = 0; r < GV_RW; ++r) {
            const int v = __reduce_add_sync(0xffffffffu, acc[r][m]);
            if (lane == r) mine = v;
        }
        if (m < M && lane < nrows) {
            const int n = wrow0 + lane;
            const int tot = mine - xsum[m];
            if constexpr (std::is_same<OT, int>::value) {
                y[(size_t)m * N + n] = tot;
            } else {
                store_out<OT>(y, (size_t)m * N + n, dequant(tot, sx[m], sw));
            }
        }
    }
}

#define GV_INST(MR, XT, OT, NAME)                                                                       \
    extern "C" __global__ void __launch_bounds__(GV_THREADS)                                           \
        NAME(const XT* x, const float* xs, int per_tensor, const uint8_t* W, int M, int N, int K, int K4, \
             int rw, float sw_val, const float* sw_ptr, OT* y) {                                        \
        gemv_impl<MR, XT, OT>(x, xs, per_tensor, W, M, N, K, K4, rw, sw_val, sw_ptr, y);               \
    }

// name: gemv_<x>_<out>_m<MR>
#define GV_MRS(XT, OT, XN, ON)                  \
    GV_INST(1, XT, OT, gemv_##XN##_##ON##_m1) \
    GV_INST(2, XT, OT, gemv_##XN##_##ON##_m2)

GV_MRS(int8_t, int, i8, i32)
GV_MRS(int8_t, float, i8, f32)
GV_MRS(int8_t, __nv_bfloat16, i8, bf16)
GV_MRS(int8_t, __half, i8, f16)
GV_MRS(float, float, f32, f32)
GV_MRS(__nv_bfloat16, __nv_bfloat16, bf16, bf16)
GV_MRS(__half, __half, f16, f16)
