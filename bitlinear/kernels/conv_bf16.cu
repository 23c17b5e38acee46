// Implicit-GEMM stride-1 convolution on bf16 tensor cores (mma.sync.m16n8k16.row.col.f32.bf16):
// y (B, N, Ho, Wo) f32 = conv(x, Wt) with zero padding P, the im2col gather done by the copies
// into shared memory. It computes both backward products of the ternary convolutions
// (src/conv_grad.rs), which would otherwise go through im2col copies k*k times their input:
//   * the input gradient: x = the output gradient g, Wt = the flipped, transposed W~, P = k - 1 -
//     pad;
//   * the weight gradient, as a convolution over the batch: the "images" are the input channels
//     of x~, the "channels" the batch (x~ laid out (C, H, W, B)), the "weight" g laid out (O, Ho,
//     Wo, B), P = pad, and the output (C, O, kh, kw) is dL/dW transposed; its K = Ho*Wo*B is
//     split over blockIdx.z (each split writes its own partial output, summed afterwards).
//
// Data layout
//   x  : (B, H, W, C) bf16, channels last (conv.cu's transpose_bf16_*), C % 8 == 0, 16-byte aligned.
//   GEMM view: row m = output pixel (image, oy, ox) = image * Ho*Wo + oy * Wo + ox (M = B*Ho*Wo);
//        column k = (ky * KW + kx) * C + ci (channels fastest), K = KH*KW*C, so every 8 values of a
//        row are one 16-byte run of one input pixel's channels (or zero padding); the input pixel
//        of (m, k) is (oy + ky - P, ox + kx - P).
//   wt : (N, K) bf16 in the same k order, row stride K (K % 8 == 0: 16-byte rows).
//   y  : (B, N, Ho*Wo) f32, NCHW.
//
// Tiling: CTA tile BM pixels (blockIdx.x) x BN output channels (blockIdx.y) x k tiles
// [blockIdx.z * kt_per_split, + kt_per_split) of the K range (its partial output at y +
// blockIdx.z * y_split_stride), k tile 64 values
// (128 bytes a row, 8 chunks of 16 bytes), STAGES-deep cp.async pipeline as conv_igemm.cu. Warps
// WARPS_M x WARPS_N, each a (BM/WARPS_M) x (BN/WARPS_N) tile of 16 x 8 MMAs.
//   * Activation tile: BM rows x 128 bytes, 144-byte row stride (ldmatrix conflict-free). Thread
//     tid copies chunk (tid & 7) of rows (tid >> 3) + i * NTHREADS / 8, keeping per row the
//     image's offset and the receptive field's top-left corner; per k tile it maps its chunk to
//     (ky, kx, ci0) once and issues one 16-byte cp.async a row, zero-filled where the pixel is
//     padding, the row past M or the chunk past K.
//   * Weight tile: BN rows x 128 bytes, 144-byte stride, copied the same way (chunk tid & 7 of
//     rows (tid >> 3) + i * NTHREADS / 8). Lane (g, t) reads its B fragments as two 32-bit words
//     of row g (k 2t and 2t + 8 of each 16-k step): rows 36 words apart, so the 32 lanes hit 32
//     banks.
// Epilogue: each thread stores its fragment (rows g, g + 8 of each 16-row MMA; columns 2t, 2t + 1)
// into NCHW, where the lanes of one column write 8 consecutive pixels.
// Indices into x and y are 64-bit; M, N, K and the image sizes are 32-bit (checked on the Rust
// side).
#include "common.cuh"

#define CB_BK 64
#define CB_STRIDE 144

// D = A(16x16, bf16, row) * B(16x8, bf16, col) + D, f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
__device__ void conv_bf16_impl(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ wt,
                               float* __restrict__ y, int M, int N, int K, int C, int H, int W, int KW, int P,
                               int Wo, int HWo, int kt_per_split, long long y_split_stride) {
    constexpr int NTHREADS = WARPS_M * WARPS_N * 32;
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
    constexpr int MI = WM / 16, NI = WN / 8;
    constexpr int XS_BYTES = BM * CB_STRIDE;
    constexpr int STAGE_BYTES = (BM + BN) * CB_STRIDE;
    constexpr int ROW_STEP = NTHREADS / 8;
    constexpr int XC = BM / ROW_STEP, WC = BN / ROW_STEP;
    static_assert(BM % ROW_STEP == 0 && BN % ROW_STEP == 0, "copy slots");
    static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile");
    extern __shared__ __align__(128) uint8_t smem[];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int bm = blockIdx.x * BM, bn = blockIdx.y * BN;
    const int kt_begin = blockIdx.z * kt_per_split;
    const int KT = min((K + CB_BK - 1) / CB_BK - kt_begin, kt_per_split);
    const int chunk = tid & 7;
    y += blockIdx.z * y_split_stride;

    // Activation copy slots: the image offset and receptive-field corner of each row; a row past
    // M gets a corner no kernel offset brings inside the image, so it is always zero-filled.
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
            x_iy[i] = oy - P;
            x_ix[i] = ox - P;
        }
    }
    const uint32_t slot = (tid >> 3) * CB_STRIDE + chunk * 16;

    auto load_stage = [&](int kt, int stage) {
        uint8_t* st = smem + stage * STAGE_BYTES;
        const int k0 = ((kt_begin + kt) * 8 + chunk) * 8;
        const bool k_ok = k0 < K;
        const int tap = k_ok ? k0 / C : 0;
        const int ci0 = k0 - tap * C;
        const int ky = tap / KW, kx = tap - (tap / KW) * KW;
#pragma unroll
        for (int i = 0; i < XC; ++i) {
            const int iy = x_iy[i] + ky, ix = x_ix[i] + kx;
            const bool ok = k_ok && (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W;
            const __nv_bfloat16* src = ok ? x + x_base[i] + ((long long)iy * W + ix) * C + ci0 : x;
            cp_async16(st + slot + i * ROW_STEP * CB_STRIDE, src, ok);
        }
#pragma unroll
        for (int i = 0; i < WC; ++i) {
            const int n = bn + (tid >> 3) + i * ROW_STEP;
            const bool ok = k_ok && n < N;
            const __nv_bfloat16* src = ok ? wt + (long long)n * K + k0 : wt;
            cp_async16(st + XS_BYTES + slot + i * ROW_STEP * CB_STRIDE, src, ok);
        }
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

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
        const uint8_t* ws = xs + XS_BYTES;
#pragma unroll
        for (int ks = 0; ks < CB_BK / 16; ++ks) {
            uint32_t a[MI][4];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                const uint8_t* p = xs + (wm * WM + i * 16 + (lane & 15)) * CB_STRIDE + ks * 32 + (lane >> 4) * 16;
                ldmatrix_x4(a[i][0], a[i][1], a[i][2], a[i][3], p);
            }
            uint32_t b[NI][2];
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const uint8_t* p = ws + (wn * WN + j * 8 + g) * CB_STRIDE + ks * 32 + t * 4;
                b[j][0] = *reinterpret_cast<const uint32_t*>(p);
                b[j][1] = *reinterpret_cast<const uint32_t*>(p + 16);
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j)
                    mma_bf16_16816(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], b[j][0], b[j][1]);
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int hm = 0; hm < 2; ++hm) {
            const int m = bm + wm * WM + i * 16 + g + 8 * hm;
            if (m >= M) continue;
            const int img = m / HWo, p = m - img * HWo;
            float* out = y + (long long)img * N * HWo + p;
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const int n = bn + wn * WN + j * 8 + 2 * t;
                if (n < N) out[(long long)n * HWo] = acc[i][j][2 * hm];
                if (n + 1 < N) out[(long long)(n + 1) * HWo] = acc[i][j][2 * hm + 1];
            }
        }
    }
}

#define CONV_BF16_INST(BM, BN, WMn, WNn, ST, MINB, NAME)                                                          \
    extern "C" __global__ void __launch_bounds__(WMn * WNn * 32, MINB)                                            \
        NAME(const __nv_bfloat16* x, const __nv_bfloat16* wt, float* y, int M, int N, int K, int C, int H, int W, \
             int KW, int P, int Wo, int HWo, int kt_per_split, long long y_split_stride) {                        \
        pdl_wait();                                                                                             \
        conv_bf16_impl<BM, BN, WMn, WNn, ST>(x, wt, y, M, N, K, C, H, W, KW, P, Wo, HWo, kt_per_split,          \
                                             y_split_stride);                                                   \
    }

// sum_splits_f32: out[i] = parts[0][i] + parts[1][i] + ... + parts[splits - 1][i], in that
// order (the same sums every run), for the split-K partial outputs above: thread i of the grid
// reads element i of each split (consecutive threads, consecutive addresses) and loops over the
// grid's stride; parts is (splits, n) f32, contiguous.
extern "C" __global__ void sum_splits_f32(const float* __restrict__ parts, float* __restrict__ out, int splits,
                                          long long n) {
    pdl_wait();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float s = parts[i];
        for (int k = 1; k < splits; ++k) s += parts[k * n + i];
        out[i] = s;
    }
}

// input_grad_weight_bf16: the input gradient's weight operand wt (C, T*O) from W~ (O, C, T) f32,
// T = KH*KW taps row-major: wt[c][t*O + o] = W~[o][c][T-1-t] rounded to nearest even. The input
// gradient convolves g with W~ flipped in both spatial axes (tap (ky, kx) reads W~'s (KH-1-ky,
// KW-1-kx), in flattened taps T-1-t) and transposed (its rows are the input channels), in the
// GEMM's k order above (taps, then channels of g). Thread i of a grid-stride loop writes wt's
// element i (consecutive threads, consecutive addresses; the reads are W~'s, a few hundred KB).
extern "C" __global__ void input_grad_weight_bf16(const float* __restrict__ w, int O, int C, int T,
                                                  __nv_bfloat16* __restrict__ wt) {
    pdl_wait();
    const long long n = (long long)O * C * T;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const int o = (int)(i % O);
        const long long ct = i / O;
        const int t = (int)(ct % T), c = (int)(ct / T);
        wt[i] = __float2bfloat16_rn(w[((long long)o * C + c) * T + (T - 1 - t)]);
    }
}

// n32: 128 x 32 tile, 4 warps (4x1), warp tile 32x32, 3 stages (69 KB smem), for N <= 32
// n64: 128 x 64 tile, 4 warps (2x2), warp tile 64x32, 3 stages (83 KB smem), for N <= 64
// n128: 128 x 128 tile, 8 warps (2x4), warp tile 64x32, 3 stages (111 KB smem), two blocks an SM
// n128w4: 128 x 128 tile, 4 warps (2x2), warp tile 64x64, 3 stages (111 KB smem), two blocks an SM
CONV_BF16_INST(128, 32, 4, 1, 3, 2, conv_bf16_n32)
CONV_BF16_INST(128, 64, 2, 2, 3, 2, conv_bf16_n64)
CONV_BF16_INST(128, 128, 2, 4, 3, 2, conv_bf16_n128)
CONV_BF16_INST(128, 128, 2, 2, 3, 2, conv_bf16_n128w4)
