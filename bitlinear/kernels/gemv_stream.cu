// Decode matmul (M = 1) for large weights: y (1, N) = x (1, K) . W (N, K)^T, W in the canonical
// packed ternary layout, on the CUDA cores (dp4a), streaming the weights through a persistent
// grid. The decode GEMV (gemv.cu) requests a block's whole share of the weights at once, which
// fits one wave of blocks up to about 17 MB; past that it runs several waves, each block
// quantizing x and ramping up again. Here every block quantizes x once and its warps then loop
// over rows with a fixed number of loads in flight, for any K % 64 == 0 whose codes fit the
// block's shared memory (the host checks; src/plan/gemv_stream.rs). The planner runs it where K
// is past the decode GEMV's limit; past one wave at smaller K the GEMV measured faster.
//
// Data layout: as gemv.cu. x (1, K) float T (quantized here) or int8 codes plus one f32 scale;
//   W (N, K4 = K/4) bytes, a row cpr = K4/16 chunks of 16 bytes (64 k); y (1, N) i32 or OT.
//
// Work split: GS_WARPS warps a block, one block an SM (host grid). Warp w of the grid takes rows
//   GS_ROWS * (w + i * warps), GS_ROWS at a time; lane l owns chunks l, l + 32, ... of each row.
//   * x: after pdl_wait, each thread takes 16-k groups tid, tid + GS_THREADS, ...: the absmax
//     (integer max over the bits of |x|: exact, NaN/Inf >= 0x7f800000) reduced over the block,
//     then s_x, the codes (act_codes16, as the quantizer kernel) stored permuted ("u-major":
//     group g at byte 16 ((g & 3) cpr + (g >> 2)), as gemv.cu) and the code sum; int8 codes are
//     only permuted.
//   * weights: GS_SLOTS chunks of each of the GS_ROWS rows a lane per pass (16-byte loads, no L1
//     allocation, evict-first in L2: each byte is read once); the next pass (the next chunks of
//     these rows, or the first of the warp's next rows) is requested before the dot products of
//     the current one, so that GS_ROWS * GS_SLOTS loads a lane stay in flight. With `early`
//     (weights settled: the host saw every kernel before their first use complete,
//     src/cuda/settle.rs) the first pass is requested before pdl_wait.
//   * dot products as gemv.cu: per chunk c the lane reads the 4 groups of x codes (one LDS.128
//     each), then per row word u of the weight chunk against group u, one dp4a per 2-bit field
//     (unsigned x signed), the fields' sums scaled back by exact shifts; codes are w_q + 1, so
//     sum x (c - 1) = sum x c - sum x.
//   * the 32 lane sums of a row are added with xor shuffles (integers: exact), lane 0 stores.
// Epilogue: y = (acc * s_x) * s_w (two roundings), cast to OT; i32 mode stores acc. The
// accumulators equal gemv.cu's and the CPU's exactly (integer sums in any order).
#include "common.cuh"

#define GS_WARPS 16
#define GS_THREADS (GS_WARPS * 32)
#define GS_ROWS 2
#define GS_SLOTS 4

// dp4a with unsigned bytes in a (the masked weight codes, up to 3 << 6) and signed bytes in b.
__device__ __forceinline__ int gs_dp4a_us(uint32_t a, uint32_t b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// 16-byte weight load: not kept in L1, first out of L2 (read once a call).
__device__ __forceinline__ uint4 gs_load_weights(const void* p, uint64_t policy) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(policy));
    return v;
}

// The dot product of one 16-byte weight chunk with its 4 groups of permuted x codes.
__device__ __forceinline__ int gs_dot_chunk(const uint4& w, const uint4 (&xq)[4]) {
    const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
    int p0 = 0, p1 = 0, p2 = 0, p3 = 0;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        p0 = gs_dp4a_us(ws[u] & 0x03030303u, xq[u].x, p0);
        p1 = gs_dp4a_us(ws[u] & 0x0c0c0c0cu, xq[u].y, p1);
        p2 = gs_dp4a_us(ws[u] & 0x30303030u, xq[u].z, p2);
        p3 = gs_dp4a_us(ws[u] & 0xc0c0c0c0u, xq[u].w, p3);
    }
    return p0 + (p1 >> 2) + (p2 >> 4) + (p3 >> 6);
}

template <typename XT, typename OT>
__device__ void gemv_stream_impl(const XT* __restrict__ x, const float* __restrict__ xscales,
                                 const uint8_t* __restrict__ W, int N, int K, int K4, float sw_val,
                                 const float* __restrict__ sw_ptr, OT* __restrict__ y, int early) {
    constexpr bool FUSED = !std::is_same<XT, int8_t>::value;
    extern __shared__ __align__(16) uint8_t xs[];  // the K permuted codes of x
    __shared__ unsigned red_max[GS_WARPS];
    __shared__ int red_sum[GS_WARPS];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int cpr = K4 >> 4, G = K >> 4;
    const int warps = gridDim.x * GS_WARPS;
    const long long stride = (long long)warps * GS_ROWS;
    long long r0 = (long long)(blockIdx.x * GS_WARPS + warp) * GS_ROWS;
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));

    uint4 wr[GS_ROWS][GS_SLOTS];
    // chunks lane + 32 (s0 + s) of rows rr .. rr + GS_ROWS - 1 (zeros past a row or the matrix)
    auto request = [&](long long rr, int s0) {
#pragma unroll
        for (int r = 0; r < GS_ROWS; ++r)
#pragma unroll
            for (int s = 0; s < GS_SLOTS; ++s) {
                const int c = lane + 32 * (s0 + s);
                wr[r][s] = (rr + r < N && c < cpr) ? gs_load_weights(W + (size_t)(rr + r) * K4 + 16 * c, policy)
                                                   : make_uint4(0u, 0u, 0u, 0u);
            }
    };
    if (early) request(r0, 0);
    pdl_wait();

    // --- x: s_x, the permuted codes in shared memory, their sum
    float sx;
    int sum = 0;
    if constexpr (FUSED) {
        unsigned amax = 0u;
        for (int g = tid; g < G; g += GS_THREADS)
#pragma unroll
            for (int i = 0; i < 16; ++i) amax = max(amax, __float_as_uint(to_f32(x[16 * g + i])) & 0x7fffffffu);
        amax = __reduce_max_sync(0xffffffffu, amax);
        if (lane == 0) red_max[warp] = amax;
        __syncthreads();
        amax = red_max[0];
#pragma unroll
        for (int w = 1; w < GS_WARPS; ++w) amax = max(amax, red_max[w]);
        const bool bad = amax >= 0x7f800000u;
        sx = bad ? __int_as_float(0x7fc00000) : act_scale_from_absmax(__uint_as_float(amax));
        const float inv = __frcp_rn(sx);
        for (int g = tid; g < G; g += GS_THREADS) {
            float f[16];
            int q[16];
#pragma unroll
            for (int i = 0; i < 16; ++i) f[i] = to_f32(x[16 * g + i]);
            if (bad) {
#pragma unroll
                for (int i = 0; i < 16; ++i) q[i] = 0;
            } else {
                act_codes16(f, sx, inv, q);
            }
#pragma unroll
            for (int i = 0; i < 16; ++i) sum += q[i];
            *reinterpret_cast<uint4*>(xs + 16 * ((g & 3) * cpr + (g >> 2))) = pack16_permuted(q);
        }
    } else {
        sx = xscales != nullptr ? xscales[0] : 0.0f;
        for (int g = tid; g < G; g += GS_THREADS) {
            const uint8_t* c = reinterpret_cast<const uint8_t*>(x) + 16 * g;
            const uint4 v = make_uint4(pack4(c[0], c[1], c[2], c[3]), pack4(c[4], c[5], c[6], c[7]),
                                       pack4(c[8], c[9], c[10], c[11]), pack4(c[12], c[13], c[14], c[15]));
            int s16;
            *reinterpret_cast<uint4*>(xs + 16 * ((g & 3) * cpr + (g >> 2))) = permute_codes16(v, &s16);
            sum += s16;
        }
    }
    sum = __reduce_add_sync(0xffffffffu, sum);
    if (lane == 0) red_sum[warp] = sum;
    if (!early) request(r0, 0);
    __syncthreads();
    int xsum = 0;
#pragma unroll
    for (int w = 0; w < GS_WARPS; ++w) xsum += red_sum[w];
    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;

    // --- rows
    const int passes = (cpr + 32 * GS_SLOTS - 1) / (32 * GS_SLOTS);
    for (; r0 < N; r0 += stride) {
        int acc[GS_ROWS];
#pragma unroll
        for (int r = 0; r < GS_ROWS; ++r) acc[r] = 0;
        for (int p = 0; p < passes; ++p) {
            uint4 cur[GS_ROWS][GS_SLOTS];
#pragma unroll
            for (int r = 0; r < GS_ROWS; ++r)
#pragma unroll
                for (int s = 0; s < GS_SLOTS; ++s) cur[r][s] = wr[r][s];
            // the next pass in flight while this one is summed
            if (p + 1 < passes) {
                request(r0, (p + 1) * GS_SLOTS);
            } else if (r0 + stride < N) {
                request(r0 + stride, 0);
            }
#pragma unroll
            for (int s = 0; s < GS_SLOTS; ++s) {
                const int c = lane + 32 * (p * GS_SLOTS + s);
                if (c < cpr) {
                    uint4 xq[4];
#pragma unroll
                    for (int u = 0; u < 4; ++u) xq[u] = *reinterpret_cast<const uint4*>(xs + 16 * (u * cpr + c));
#pragma unroll
                    for (int r = 0; r < GS_ROWS; ++r) acc[r] += gs_dot_chunk(cur[r][s], xq);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < GS_ROWS; ++r) {
            int v = acc[r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            const long long n = r0 + r;
            if (lane == 0 && n < N) {
                const int tot = v - xsum;
                if constexpr (std::is_same<OT, int>::value) {
                    y[n] = tot;
                } else {
                    store_out<OT>(y, (size_t)n, dequant(tot, sx, sw));
                }
            }
        }
    }
}

// name: gemv_stream_<x>_<out>; `early`: the first pass of weights requested before pdl_wait.
#define GS_INST(XT, OT, XN, ON)                                                                               \
    extern "C" __global__ void __launch_bounds__(GS_THREADS, 1)                                              \
        gemv_stream_##XN##_##ON(const XT* x, const float* xs, const uint8_t* W, int N, int K, int K4,        \
                                float sw_val, const float* sw_ptr, OT* y, int early) {                        \
        gemv_stream_impl<XT, OT>(x, xs, W, N, K, K4, sw_val, sw_ptr, y, early);                              \
    }

GS_INST(int8_t, int, i8, i32)
GS_INST(int8_t, float, i8, f32)
GS_INST(int8_t, __nv_bfloat16, i8, bf16)
GS_INST(int8_t, __half, i8, f16)
GS_INST(float, float, f32, f32)
GS_INST(__nv_bfloat16, __nv_bfloat16, bf16, bf16)
GS_INST(__half, __half, f16, f16)
