// Large-M matmul: y (M, N) = x_q (M, K) . W_q (N, K)^T on int8 tensor cores
// (mma.sync.m16n8k32.row.col.s32.s8.s8.s32), weights decoded from 2 bits on the way from shared
// memory into the MMA B fragments.
//
// Data layout
//   Xp : (M, ld) int8 activation codes in the permuted layout of common.cuh (inside each 16-k
//        group, k = 16q+4j+i sits at 16q+4i+j), zero padded to ld = roundup(K, 128). Produced by
//        act_quant_rows (mode 1) or codes_permute.
//   Wp : packed ternary bytes (N rows, row stride K4s bytes, K4s % 16 == 0; the canonical layout
//        when K4 % 16 == 0, else a once-per-call padded copy). Bytes at or past K4s read as 0;
//        they only ever meet zero activations.
//   rowsum : (M) int32, sum over k of the codes of each row (written with Xp).
//   y  : (M, N) row-major, int32 accumulators or OT after the epilogue (acc * s_x) * s_w.
//
// Tiling: CTA tile BM x BN, k tile 128 (32 packed bytes per weight row; mma_tile.cuh multiplies
// one), STAGES-deep cp.async
// pipeline (global -> shared, 16-byte copies, zero-fill outside the matrix). Warps are laid out
// WARPS_M x WARPS_N, each computing a (BM/WARPS_M) x (BN/WARPS_N) tile as MI x NI MMAs of 16 x 8.
//   * X tile in shared memory: BM rows x 128 bytes with a 144-byte row stride, so the 8 row
//     addresses of each ldmatrix 8x8 matrix fall in distinct banks. A fragments: ldmatrix.x4
//     (lanes 0-15 address rows 0-15 of the first 16 k bytes, lanes 16-31 the next 16).
//   * W tile in shared memory: BN rows x 32 packed bytes, 48-byte stride (conflict-free 8-byte
//     reads). For k32 step s, lane (g, t) reads the 2 words (two 16-k groups) of weight row g and
//     forms b0 / b1 = (word >> 2t) & 0x03030303: field t of a group is exactly permuted
//     positions 4t..4t+3, which is what the B fragment needs. No shared-memory int8 copy of W.
//     The codes stay unsigned (c = w + 1 in {0,1,2}); the epilogue subtracts the activation row
//     sum: sum_k x (c - 1) = sum_k x c - sum_k x.
// Each thread: 1/256 of the cp.async copies per stage, then MI*NI MMAs per k32 step, then the
// epilogue for its accumulator fragment (rows g, g+8; columns 2t, 2t+1 of each 16x8 tile).
// Split-K (host-chosen when the M x N tiles alone leave SMs idle): gridDim.z CTAs share an output
// tile, each taking a contiguous range of k tiles; they atomicAdd their i32 sums (the row sum of
// x subtracted once, by z = 0) into a zeroed i32 buffer (exact, so the order does not matter),
// and splitk_epilogue applies (acc * s_x) * s_w (or copies the sums, for i32 output).
#include "mma_tile.cuh"

#define BK 128
#define XS_STRIDE 144
#define WS_STRIDE 48

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, typename OT>
__device__ void gemm_impl(const int8_t* __restrict__ Xp, int ld, const int* __restrict__ rowsum,
                          const float* __restrict__ xscales,
                          int per_tensor, const uint8_t* __restrict__ Wp, int K4s, int M, int N,
                          int K, float sw_val, const float* __restrict__ sw_ptr, OT* __restrict__ y,
                          int* __restrict__ ws) {
    constexpr int NTHREADS = WARPS_M * WARPS_N * 32;
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
    constexpr int MI = WM / 16, NI = WN / 8;
    constexpr int XS_BYTES = BM * XS_STRIDE, WS_BYTES = BN * WS_STRIDE;
    constexpr int STAGE_BYTES = XS_BYTES + WS_BYTES;
    extern __shared__ __align__(128) uint8_t smem[];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int bm = blockIdx.y * BM, bn = blockIdx.x * BN;
    // split-K: CTA z of gridDim.z takes the k tiles [kt0, kt0 + KT)
    const int KT_all = (K + BK - 1) / BK;
    const int kt0 = (int)(((long long)KT_all * blockIdx.z) / gridDim.z);
    const int KT = (int)(((long long)KT_all * (blockIdx.z + 1)) / gridDim.z) - kt0;

    // Per-thread copy slots, fixed over the k loop: XC 16-byte chunks of X rows and one of W
    // (BN * 2 == NTHREADS for every tile below), addresses computed once.
    constexpr int XC = BM * 8 / NTHREADS;
    static_assert(BM * 8 % NTHREADS == 0 && BN * 2 == NTHREADS, "copy slots");
    const int8_t* x_src[XC];
    uint32_t x_ok = 0;
#pragma unroll
    for (int i = 0; i < XC; ++i) {
        const int gm = bm + (tid >> 3) + i * (NTHREADS / 8);
        if (gm < M) x_ok |= 1u << i;
        x_src[i] = Xp + (size_t)(gm < M ? gm : 0) * ld + (size_t)kt0 * BK + (tid & 7) * 16;
    }
    // chunk i lands NTHREADS / 8 rows below chunk i - 1
    uint32_t x_dst = (tid >> 3) * XS_STRIDE + (tid & 7) * 16;
    const int w_ch = tid & 1, w_row = bn + (tid >> 1);
    const uint8_t* w_src = Wp + (size_t)(w_row < N ? w_row : 0) * K4s + (size_t)kt0 * (BK / 4) + w_ch * 16;
    uint32_t w_dst = XS_BYTES + (tid >> 1) * WS_STRIDE + w_ch * 16;
    // bytes of the row left from this thread's chunk of k tile 0 on (0 for a missing row)
    int w_left = w_row < N ? K4s - kt0 * (BK / 4) - w_ch * 16 : 0;

    auto load_stage = [&](int kt, int stage) {
        uint8_t* st = smem + stage * STAGE_BYTES;
#pragma unroll
        for (int i = 0; i < XC; ++i)
            cp_async16(st + x_dst + i * (NTHREADS / 8) * XS_STRIDE, x_src[i] + (size_t)kt * BK, (x_ok >> i) & 1u);
        const bool ok = kt * (BK / 4) < w_left;
        cp_async16(st + w_dst, ok ? w_src + (size_t)kt * (BK / 4) : Wp, ok);
    };

    int acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }

    for (int kt = 0; kt < KT; ++kt) {
        // Keep the copy slots in registers (not recomputed from threadIdx every k tile). Only for
        // the 128-thread tile: the 128-register tiles would spill.
        if constexpr (NTHREADS <= 128) {
#pragma unroll
            for (int i = 0; i < XC; ++i) asm volatile("" : "+l"(x_src[i]));
            asm volatile("" : "+l"(w_src), "+r"(x_dst), "+r"(w_dst), "+r"(x_ok), "+r"(w_left));
        }
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        {
            const int nk = kt + STAGES - 1;
            if (nk < KT) load_stage(nk, nk % STAGES);
            cp_async_commit();
        }
        const uint8_t* xs = smem + (kt % STAGES) * STAGE_BYTES;
        mma_k_tile<MI, NI, XS_STRIDE, WS_STRIDE, false>(acc, xs, wm * WM, xs + XS_BYTES, wn * WN, lane);
    }
    cp_async_wait<0>();

    // epilogue
    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int hm = 0; hm < 2; ++hm) {
            const int m = bm + wm * WM + i * 16 + g + 8 * hm;
            if (m >= M) continue;
            float sx = 0.0f;
            if constexpr (!std::is_same<OT, int>::value) sx = xscales[per_tensor ? 0 : m];
            const int xsum = blockIdx.z == 0 ? rowsum[m] : 0;
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const int n = bn + wn * WN + j * 8 + 2 * t;
                if (n >= N) continue;
                // sum (c-1) x = sum c x - sum x
                const int v0 = acc[i][j][2 * hm] - xsum, v1 = acc[i][j][2 * hm + 1] - xsum;
                const size_t o = (size_t)m * N + n;
                if (ws != nullptr) {
                    // split-K: integer partial sums, exact in any order
                    atomicAdd(&ws[o], v0);
                    if (n + 1 < N) atomicAdd(&ws[o + 1], v1);
                } else if (n + 1 < N && (o & 1) == 0) {  // both columns: one paired store
                    if constexpr (std::is_same<OT, int>::value) {
                        store_pair<int>(y, o, v0, v1);
                    } else {
                        store_pair<OT>(y, o, from_f32<OT>(dequant(v0, sx, sw)), from_f32<OT>(dequant(v1, sx, sw)));
                    }
                } else {
                    if constexpr (std::is_same<OT, int>::value) {
                        y[o] = v0;
                        if (n + 1 < N) y[o + 1] = v1;
                    } else {
                        store_out<OT>(y, o, dequant(v0, sx, sw));
                        if (n + 1 < N) store_out<OT>(y, o + 1, dequant(v1, sx, sw));
                    }
                }
            }
        }
    }
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
constexpr int gemm_smem_bytes() {
    return STAGES * (BM * XS_STRIDE + BN * WS_STRIDE);
}

#define GEMM_INST(BM, BN, WMn, WNn, ST, MINB, OT, NAME)                                               \
    extern "C" __global__ void __launch_bounds__(WMn * WNn * 32, MINB)                                \
        NAME(const int8_t* Xp, int ld, const int* rowsum, const float* xs, int per_tensor,            \
             const uint8_t* Wp, int K4s, int M, int N, int K, float sw_val, const float* sw_ptr,      \
             OT* y, int* ws) {                                                                        \
        pdl_wait();                                                                                 \
        gemm_impl<BM, BN, WMn, WNn, ST, OT>(Xp, ld, rowsum, xs, per_tensor, Wp, K4s, M, N, K, sw_val, \
                                            sw_ptr, y, ws);                                           \
    }

// wide: 128x256 tile, 16 warps (4x4), warp tile 32x64, 4 stages (120 KB smem), 1 CTA per SM:
//       half the activation-tile traffic per MMA of `big`, for large M x N
// big: 128x128 tile, 8 warps (2x4), warp tile 64x32, 4 stages (96 KB smem), 2 CTAs per SM
// small: 64x64 tile, 4 warps (2x2), warp tile 32x32, 4 stages (48 KB smem), 4 CTAs per SM
#define GEMM_OUT(OT, ON)                                  \
    GEMM_INST(128, 256, 4, 4, 4, 1, OT, gemm_wide_##ON)   \
    GEMM_INST(128, 128, 2, 4, 4, 2, OT, gemm_big_##ON)    \
    GEMM_INST(64, 64, 2, 2, 4, 4, OT, gemm_small_##ON)

GEMM_OUT(int, i32)
GEMM_OUT(float, f32)
GEMM_OUT(__nv_bfloat16, bf16)
GEMM_OUT(__half, f16)

// Split-K epilogue: y = (acc * s_x) * s_w from the i32 sums of the split CTAs, one thread per
// output (grid-stride).
template <typename OT>
__device__ void splitk_epilogue_impl(const int* __restrict__ ws, int M, int N,
                                     const float* __restrict__ xscales, int per_tensor, float sw_val,
                                     const float* __restrict__ sw_ptr, OT* __restrict__ y) {
    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
    const size_t total = (size_t)M * N, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        if constexpr (std::is_same<OT, int>::value) {
            y[i] = ws[i];
        } else {
            store_out<OT>(y, i, dequant(ws[i], xscales[per_tensor ? 0 : (int)(i / N)], sw));
        }
    }
}
#define SPLITK_EPI(OT, ON)                                                                               \
    extern "C" __global__ void splitk_epilogue_##ON(const int* ws, int M, int N, const float* xs,        \
                                                    int per_tensor, float sw_val, const float* sw_ptr, \
                                                    OT* y) {                                            \
        pdl_wait();                                                                                 \
        splitk_epilogue_impl<OT>(ws, M, N, xs, per_tensor, sw_val, sw_ptr, y);                         \
    }
SPLITK_EPI(int, i32)
SPLITK_EPI(float, f32)
SPLITK_EPI(__nv_bfloat16, bf16)
SPLITK_EPI(__half, f16)
