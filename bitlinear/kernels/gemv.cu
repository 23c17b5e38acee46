// Decode matmul (M = 1): y (M, N) = x (M, K) . W (N, K)^T, W in the canonical packed ternary
// layout, on the CUDA cores (dp4a). Built to stream the packed weights at close to HBM bandwidth:
// every weight byte a thread will use is requested with 16-byte loads in its first instructions,
// so the whole matrix is in flight while the block quantizes x. Needs K % 64 == 0 (16-byte packed
// chunks, rows 16-byte aligned), K <= 8192 and a 16-byte aligned weight pointer; other shapes use
// the skinny kernel. The code handles up to MR x rows, but only MR = 1 is instantiated: on the
// H100 the skinny kernel was faster at M = 4 (4096 x 4096: 11.6 vs 15.3 us).
//
// Data layout
//   x  : float activations T (M, K) row-major, quantized here (fused quantizer), or int8 codes
//        (M, K) plus f32 scales (per row, or one per tensor).
//   W  : packed (N, K4 = K/4) bytes, row-major; a row is cpr = K4/16 chunks of 16 bytes (64 k).
//   y  : (M, N) row-major, int32 accumulators or OT = f32/bf16/f16 after the epilogue.
//
// Work split: block = 8 warps; warp w of block b owns rw (host-chosen, <= min(8, 16 / S))
// consecutive weight rows starting at (8b + w) * rw; lane l owns chunks l, l + 32, ...,
// l + 32(S-1) of each of those rows (S = ceil(cpr / 32) in {1, 2, 4}, a template parameter, so
// K <= 8192).
//   * each thread first loads its first 16-k group of x (raw bits), then its rw x S weight chunks
//     into registers (ld.global.nc, no L1 allocation): load data returns in request order, so x
//     requested after the weights would only arrive after all of them;
//   * meanwhile all 256 threads quantize x into shared memory: pass 1 takes the 16-k groups
//     (the first from those registers, others by 16-byte loads when x is 16-byte aligned),
//     per-row absmax and non-finite flag (warp reduce, smem atomicMax on the float bits: exact);
//     pass 2 quantizes the same groups (act_code_inv: the reciprocal form, exact) and stores them
//     permuted (common.cuh: position 4i + j of a group holds k = 4j + i), adding up each row's
//     code sum. int8 input: the codes are only permuted and summed. Group u of chunk j (16 codes)
//     is stored at byte 16 (u * cpr + j) of its x row ("u-major"), so that lanes reading group u
//     of consecutive chunks read consecutive 16 bytes (conflict-free LDS.128; a chunk-major
//     layout would be a 4-way bank conflict).
//   * for each of its chunk slots the lane reads group u of that chunk of x (one LDS.128 per x
//     row), and for each of its rows, word u of the weight chunk gives (word >> 2i) & 0x03030303
//     = the codes at permuted positions 4i..4i+3 of group u: one dp4a against x word i of that
//     group. Codes stay unsigned (0, 1, 2): sum x (c - 1) = sum x c - sum x.
//   * per (row, x row), the 32 lane sums are added with one redux.sync (integers: exact) and
//     lane 0 stores the output.
// Epilogue: y = (acc * s_x[m]) * s_w (two roundings), cast to OT; int32 mode stores acc.
#include "common.cuh"

#define GV_WARPS 8
#define GV_THREADS (GV_WARPS * 32)

__device__ __forceinline__ uint32_t comp4(const uint4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Raw bits of one 16-k group of x (16 values of T), as 16-byte loads.
template <typename T>
struct XGroup {
    uint4 v[sizeof(T)];
};
template <typename T>
__device__ __forceinline__ void gv_load_raw(const T* __restrict__ xr, int g, XGroup<T>& r) {
#pragma unroll
    for (int c = 0; c < (int)sizeof(T); ++c) r.v[c] = __ldg(reinterpret_cast<const uint4*>(xr + 16 * g) + c);
}
template <typename T>
__device__ __forceinline__ void gv_raw_f32(const XGroup<T>& r, float (&f)[16]) {
    const T* e = reinterpret_cast<const T*>(r.v);
#pragma unroll
    for (int i = 0; i < 16; ++i) f[i] = to_f32(e[i]);
}

// 16 values of group g (k = 16g .. 16g+15) of a row as floats; K % 16 == 0 here.
template <typename T>
__device__ __forceinline__ void gv_load16(const T* __restrict__ xr, int g, bool vec, float (&f)[16]) {
    if (vec) {
        XGroup<T> r;
        gv_load_raw(xr, g, r);
        gv_raw_f32(r, f);
    } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) f[i] = to_f32(xr[16 * g + i]);
    }
}

template <int MR, int S, typename XT, typename OT>
__device__ void gemv_impl(const XT* __restrict__ x, const float* __restrict__ xscales, int per_tensor,
                          const uint8_t* __restrict__ W, int M, int N, int K, int K4, int rw, float sw_val,
                          const float* __restrict__ sw_ptr, OT* __restrict__ y) {
    constexpr bool FUSED = !std::is_same<XT, int8_t>::value;
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ int xsum[MR];
    __shared__ float sx[MR];
    __shared__ float sxinv[MR];  // 1 / s_x (IEEE), for act_code_inv
    __shared__ unsigned rowmax[MR];
    __shared__ unsigned badmask;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int cpr = K4 >> 4;                                // 16-byte chunks per weight row
    const int wrow0 = (blockIdx.x * GV_WARPS + warp) * rw;  // first weight row of this warp
    const int nrows = max(0, min(rw, N - wrow0));
    uint8_t* xs = smem;                                     // MR rows of K permuted codes

    // --- request this thread's first 16-k group of x, then its weights: loads return in order,
    // so x requested after the weights would arrive only after them
    const int G = K >> 4;  // 16-k groups per row
    const bool xvec = (((size_t)x) & 15) == 0;
    const bool pre = xvec && tid < M * G;
    XGroup<XT> x0;
    if (pre) gv_load_raw(x + (size_t)(tid / G) * K, tid % G, x0);
    constexpr int RWM = S == 1 ? 8 : 16 / S;  // rows held: at most 16 chunks a lane (8 rows)
    uint4 wr[RWM][S];
#pragma unroll
    for (int r = 0; r < RWM; ++r)
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int j = lane + 32 * s;
            wr[r][s] = (r < nrows && j < cpr) ? ldg_stream16(W + (size_t)(wrow0 + r) * K4 + 16 * j)
                                              : make_uint4(0u, 0u, 0u, 0u);
        }
    if (tid < MR) {
        xsum[tid] = 0;
        rowmax[tid] = 0u;
        sx[tid] = 0.0f;
    }
    if (tid == 0) badmask = 0u;
    __syncthreads();

    // --- activations: quantize (or copy) into permuted int8 rows
    if constexpr (FUSED) {
        float am[MR];
        unsigned bad = 0;
#pragma unroll
        for (int m = 0; m < MR; ++m) am[m] = 0.0f;
        for (int idx = tid; idx < M * G; idx += GV_THREADS) {
            int m = 0, g = idx;
            while (g >= G) g -= G, ++m;  // M <= 4
            float f[16];
            if (idx == tid && pre)
                gv_raw_f32(x0, f);
            else
                gv_load16(x + (size_t)m * K, g, xvec, f);
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
            sxinv[tid] = __frcp_rn(sx[tid]);
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
            int m = 0, g = idx;
            while (g >= G) g -= G, ++m;  // M <= 4
            int q[16];
            if constexpr (FUSED) {
                const float s = sx[m], inv = sxinv[m];
                const bool rowbad = isnan(s);
                float f[16];
                if (idx == tid && pre)
                    gv_raw_f32(x0, f);
                else
                    gv_load16(x + (size_t)m * K, g, xvec, f);
#pragma unroll
                for (int i = 0; i < 16; ++i) q[i] = rowbad ? 0 : act_code_inv(f[i], s, inv);
            } else {
                const int8_t* cr = x + (size_t)m * K + 16 * g;
                if (xvec) {
                    const uint4 v = idx == tid && pre ? x0.v[0] : __ldg(reinterpret_cast<const uint4*>(cr));
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
            *reinterpret_cast<uint4*>(xs + (size_t)m * K + 16 * ((g & 3) * cpr + (g >> 2))) = pack16_permuted(q);
        }
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            const int v = __reduce_add_sync(0xffffffffu, sum[m]);
            if (lane == 0 && m < M && v != 0) atomicAdd(&xsum[m], v);
        }
    }
    __syncthreads();

    // --- dot products
    int acc[RWM][MR];
#pragma unroll
    for (int r = 0; r < RWM; ++r)
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[r][m] = 0;
#pragma unroll
    for (int s = 0; s < S; ++s) {
        const int j = lane + 32 * s;
        if (j >= cpr) break;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            uint4 xq[MR];  // the 16 permuted codes of group u of chunk j, per x row
#pragma unroll
            for (int m = 0; m < MR; ++m)
                xq[m] = m < M ? *reinterpret_cast<const uint4*>(xs + (size_t)m * K + 16 * (u * cpr + j))
                              : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int r = 0; r < RWM; ++r) {
                if (r >= nrows) break;  // warp-uniform
                const uint32_t wu = comp4(wr[r][s], u);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int c = (int)((wu >> (2 * i)) & 0x03030303u);
#pragma unroll
                    for (int m = 0; m < MR; ++m) acc[r][m] = __dp4a(c, (int)comp4(xq[m], i), acc[r][m]);
                }
            }
        }
    }

    // --- reduce over the lanes; lane 0 stores
    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
#pragma unroll
    for (int r = 0; r < RWM; ++r) {
        if (r >= nrows) break;  // warp-uniform
#pragma unroll
        for (int m = 0; m < MR; ++m) {
            const int v = __reduce_add_sync(0xffffffffu, acc[r][m]);
            if (m < M && lane == 0) {
                const int n = wrow0 + r;
                const int tot = v - xsum[m];
                if constexpr (std::is_same<OT, int>::value) {
                    y[(size_t)m * N + n] = tot;
                } else {
                    store_out<OT>(y, (size_t)m * N + n, dequant(tot, sx[m], sw));
                }
            }
        }
    }
}

#define GV_INST(MR, S, XT, OT, NAME)                                                                    \
    extern "C" __global__ void __launch_bounds__(GV_THREADS, 2)                                        \
        NAME(const XT* x, const float* xs, int per_tensor, const uint8_t* W, int M, int N, int K, int K4, \
             int rw, float sw_val, const float* sw_ptr, OT* y) {                                        \
        gemv_impl<MR, S, XT, OT>(x, xs, per_tensor, W, M, N, K, K4, rw, sw_val, sw_ptr, y);            \
    }

// name: gemv_<x>_<out>_m1_s<S>: S chunk slots per lane and row (cpr <= 32 S)
#define GV_MRS(XT, OT, XN, ON)                       \
    GV_INST(1, 1, XT, OT, gemv_##XN##_##ON##_m1_s1) \
    GV_INST(1, 2, XT, OT, gemv_##XN##_##ON##_m1_s2) \
    GV_INST(1, 4, XT, OT, gemv_##XN##_##ON##_m1_s4)

GV_MRS(int8_t, int, i8, i32)
GV_MRS(int8_t, float, i8, f32)
GV_MRS(int8_t, __nv_bfloat16, i8, bf16)
GV_MRS(int8_t, __half, i8, f16)
GV_MRS(float, float, f32, f32)
GV_MRS(__nv_bfloat16, __nv_bfloat16, bf16, bf16)
GV_MRS(__half, __half, f16, f16)
