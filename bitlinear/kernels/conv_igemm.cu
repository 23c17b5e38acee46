// Implicit-GEMM convolution: y (B, N, Ho, Wo) f32 = (conv(x_q, W_q) * s_x[image]) * s_w on int8
// tensor cores (mma.sync.m16n8k32.row.col.s32.s8.s8.s32), the im2col gather done by the copies
// into shared memory: no im2col rows in global memory, no permutation pass, no row sums.
//
// Data layout
//   codes : (B, H, W, C) int8 activation codes, channels last, C % 16 == 0, 16-byte aligned.
//   GEMM view: row m = output pixel (image, oy, ox) = image * Ho*Wo + oy * Wo + ox (M = B*Ho*Wo);
//          column k = (ky * KW + kx) * C + ci (channels fastest), K = KH*KW*C, so every 16 codes of
//          a row are one 16-byte run of one input pixel's channels (or zero padding).
//   Wp   : packed ternary bytes (N rows, row stride K4s bytes, K4s >= 32 * ceil(K / 128)) of the
//          weight in the GEMM's k order with each 16-k group 4x4-transposed (k = 16q + 4j + i
//          packed at 16q + 4i + j), codes beyond K zero: the activations sit in shared memory in
//          natural order, and the shifted weight fields of common.cuh's k-permutation then line
//          up with them byte for byte (src/cuda/conv_igemm.rs builds it from the conv weight).
//   y    : (B, N, Ho*Wo) f32, NCHW: y[img][n][p] = (acc * sx[img]) * sw (two roundings).
//
// Tiling: CTA tile BM pixels (blockIdx.x) x BN output channels (blockIdx.y), k tile 128 (8 chunks of 16 codes; 32 packed
// bytes a weight row), STAGES-deep cp.async pipeline, as gemm.cu. Warps WARPS_M x WARPS_N, each
// a (BM/WARPS_M) x (BN/WARPS_N) tile of 16 x 8 MMAs.
//   * Activation tile: BM rows x 128 bytes, 144-byte row stride (ldmatrix conflict-free). Thread
//     tid copies chunk (tid & 7) of rows (tid >> 3) + i * NTHREADS / 8: per row it keeps the
//     image's offset and the receptive field's top-left corner; per k tile it maps its chunk to
//     (ky, kx, ci0) once and issues one 16-byte cp.async a row, zero-filled where the pixel is
//     padding, the row past M or the chunk past K.
//   * Weight tile: BN rows x 32 bytes, 48-byte stride; thread tid copies 16 bytes of row tid / 2.
//     mma_tile.cuh decodes the weight fields into signed bytes (c - 1) for the B fragments, so
//     the sums need no activation row sums.
// Epilogue: each thread dequantizes its fragment (rows g, g + 8 of each 16-row MMA; columns 2t,
// 2t + 1) and stores it into NCHW, where the lanes of one column write 8 consecutive pixels.
// Indices into codes and y are 64-bit; M, N, K and the image sizes are 32-bit (checked on the
// Rust side).
#include "mma_tile.cuh"

#define IG_BK 128
#define IG_XS_STRIDE 144
#define IG_WS_STRIDE 48

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
__device__ void conv_igemm_impl(const int8_t* __restrict__ codes, const uint8_t* __restrict__ Wp, int K4s,
                                const float* __restrict__ sx, float sw_val, const float* __restrict__ sw_ptr,
                                float* __restrict__ y, int M, int N, int K, int C, int H, int W, int KW,
                                int S, int P, int Wo, int HWo) {
    constexpr int NTHREADS = WARPS_M * WARPS_N * 32;
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
    constexpr int MI = WM / 16, NI = WN / 8;
    constexpr int XS_BYTES = BM * IG_XS_STRIDE, WS_BYTES = BN * IG_WS_STRIDE;
    constexpr int STAGE_BYTES = XS_BYTES + WS_BYTES;
    constexpr int XC = BM * 8 / NTHREADS;
    constexpr int ROW_STEP = NTHREADS / 8;
    static_assert(BM * 8 % NTHREADS == 0 && BN * 2 == NTHREADS, "copy slots");
    extern __shared__ __align__(128) uint8_t smem[];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int bm = blockIdx.x * BM, bn = blockIdx.y * BN;
    const int KT = (K + IG_BK - 1) / IG_BK;

    // Activation copy slots: the image offset and receptive-field corner of each row; a row past
    // M gets a corner no kernel offset brings inside the image, so it is always zero-filled.
    const int chunk = tid & 7;
    long long x_base[XC];
    int x_iy[XC], x_ix[XC];
#pragma unroll
    for (int i = 0; i < XC; ++i) {
        const int m = bm + (tid >> 3) + i * ROW_STEP;
        x_base[i] = 0;
        x_iy[i] = -(1 << 30);
        x_ix[i] = 0;
        if (m < M) {
            const int img = m / HWo, p = m - img * HWo;
            const int oy = p / Wo, ox = p - oy * Wo;
            x_base[i] = (long long)img * H * W * C;
            x_iy[i] = oy * S - P;
            x_ix[i] = ox * S - P;
        }
    }
    const uint32_t x_dst = (tid >> 3) * IG_XS_STRIDE + chunk * 16;
    const int w_row = bn + (tid >> 1);
    const bool w_ok = w_row < N;
    const uint8_t* w_src = Wp + (size_t)(w_ok ? w_row : 0) * K4s + (tid & 1) * 16;
    const uint32_t w_dst = XS_BYTES + (tid >> 1) * IG_WS_STRIDE + (tid & 1) * 16;

    auto load_stage = [&](int kt, int stage) {
        uint8_t* st = smem + stage * STAGE_BYTES;
        const int k0 = (kt * 8 + chunk) * 16;
        const bool k_ok = k0 < K;
        const int tap = k_ok ? k0 / C : 0;
        const int ci0 = k0 - tap * C;
        const int ky = tap / KW, kx = tap - (tap / KW) * KW;
#pragma unroll
        for (int i = 0; i < XC; ++i) {
            const int iy = x_iy[i] + ky, ix = x_ix[i] + kx;
            const bool ok = k_ok && (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W;
            const int8_t* src = ok ? codes + x_base[i] + ((long long)iy * W + ix) * C + ci0 : codes;
            cp_async16(st + x_dst + i * ROW_STEP * IG_XS_STRIDE, src, ok);
        }
        cp_async16(st + w_dst, w_ok ? w_src + (size_t)kt * (IG_BK / 4) : Wp, w_ok);
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
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        {
            const int nk = kt + STAGES - 1;
            if (nk < KT) load_stage(nk, nk % STAGES);
            cp_async_commit();
        }
        const uint8_t* xs = smem + (kt % STAGES) * STAGE_BYTES;
        mma_k_tile<MI, NI, IG_XS_STRIDE, IG_WS_STRIDE, true>(acc, xs, wm * WM, xs + XS_BYTES, wn * WN, lane);
    }
    cp_async_wait<0>();

    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int hm = 0; hm < 2; ++hm) {
            const int m = bm + wm * WM + i * 16 + g + 8 * hm;
            if (m >= M) continue;
            const int img = m / HWo, p = m - img * HWo;
            const float s = sx[img];
            float* out = y + (long long)img * N * HWo + p;
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const int n = bn + wn * WN + j * 8 + 2 * t;
                if (n < N) out[(long long)n * HWo] = dequant(acc[i][j][2 * hm], s, sw);
                if (n + 1 < N) out[(long long)(n + 1) * HWo] = dequant(acc[i][j][2 * hm + 1], s, sw);
            }
        }
    }
}

#define CONV_IGEMM_INST(BM, BN, WMn, WNn, ST, MINB, NAME)                                                     \
    extern "C" __global__ void __launch_bounds__(WMn * WNn * 32, MINB)                                        \
        NAME(const int8_t* codes, const uint8_t* Wp, int K4s, const float* sx, float sw_val,                  \
             const float* sw_ptr, float* y, int M, int N, int K, int C, int H, int W, int KW, int S, int P,   \
             int Wo, int HWo) {                                                                               \
        pdl_wait();                                                                                         \
        conv_igemm_impl<BM, BN, WMn, WNn, ST>(codes, Wp, K4s, sx, sw_val, sw_ptr, y, M, N, K, C, H, W, KW, S, \
                                              P, Wo, HWo);                                                    \
    }

// n64: 128 x 64 tile, 4 warps (2x2), warp tile 64x32, 4 stages (84 KB smem), for N <= 64
// n128: 128 x 128 tile, 8 warps (2x4), warp tile 64x32, 4 stages (96 KB smem)
CONV_IGEMM_INST(128, 64, 2, 2, 4, 2, conv_igemm_n64_f32)
CONV_IGEMM_INST(128, 128, 2, 4, 4, 2, conv_igemm_n128_f32)
