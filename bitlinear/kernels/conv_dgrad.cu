// Implicit-GEMM input gradient of a stride-1 convolution on bf16 tensor cores
// (mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32): dx (B, C, H, W) f32 = conv(g, w_t) with
// padding Q = KH - 1 - P, where g (B, O, Ho, Wo) f32 is the output gradient and w_t the flipped,
// transposed kernel, w_t[c][o][ky][kx] = W~[o][c][KH-1-ky][KW-1-kx], in bf16. The transposed
// im2col of g is gathered on the way into shared memory (rounded to bf16 there) instead of being
// written to global memory, and the sums leave in f32 (no bf16 rounding, no cast pass).
//
// Data layout
//   GEMM view: row m = input pixel (image, iy, ix) = image * H*W + iy * W + ix (M = B*H*W);
//              column n = input channel c (N = C); k = (o * KH + ky) * KW + kx (K = O*KH*KW).
//   A[m][k] = g[image][o][iy + ky - Q][ix + kx - Q] (0 outside the output), from f32 g.
//   Wt : (N, Kp) bf16 row-major, Kp = K rounded up to DG_BK, zero past K (src/cuda/conv_dgrad.rs).
//   dx : (B, C, H*W) f32, NCHW.
//
// Tiling: CTA tile 128 pixels (blockIdx.x) x 64 channels (blockIdx.y), k tile DG_BK = 32 (two
// k16 MMA steps), 8 warps (4 x 2) of 32 x 32 each (2 x 4 MMAs of 16 x 8). Two shared-memory
// stages, 80-byte rows (conflict-free ldmatrix and 16-byte stores).
//   * A: thread tid takes pixel row tid % 128 and k half tid / 128 (16 consecutive k) of each k
//     tile: 16 f32 loads (consecutive threads read consecutive pixels of one plane: coalesced),
//     held in registers while the previous tile is multiplied, then stored as two 16-byte bf16
//     runs. Its (o, ky, kx) advance by counters, no division in the loop.
//   * Wt: one 16-byte cp.async a thread a tile (row tid / 4, chunk tid % 4), zero-filled past N.
// Epilogue: each thread stores its fragments (rows g, g + 8; columns 2t, 2t + 1) into NCHW, the
// lanes of a column writing 8 consecutive pixels. Indices into g and dx are 64-bit; M, N, K and
// the image sizes are 32-bit (checked on the Rust side).
#include "common.cuh"

#define DG_BM 128
#define DG_BN 64
#define DG_BK 32
#define DG_ROW 40  // bf16 a shared-memory row: 32 + 8 of padding (80 bytes)
#define DG_THREADS 256

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

extern "C" __global__ void __launch_bounds__(DG_THREADS, 2)
    conv_dgrad_bf16(const float* __restrict__ g, const __nv_bfloat16* __restrict__ wt, float* __restrict__ dx,
                    int M, int N, int K, int Kp, int O, int H, int W, int Ho, int Wo, int KH, int KW, int Q) {
    pdl_wait();
    __shared__ __align__(16) __nv_bfloat16 as[2][DG_BM * DG_ROW];
    __shared__ __align__(16) __nv_bfloat16 bs[2][DG_BN * DG_ROW];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, t = lane & 3;
    const int wm = warp >> 1, wn = warp & 1;  // 4 x 2 warps
    const int bm = blockIdx.x * DG_BM, bn = blockIdx.y * DG_BN;
    const int KT = Kp / DG_BK;
    const int HW = H * W, HWo = Ho * Wo, KK = KH * KW;

    // This thread's A row (pixel) and k half.
    const int row = tid & (DG_BM - 1), half = tid >> 7;
    const int m = bm + row;
    const bool m_ok = m < M;
    const int img = m_ok ? m / HW : 0;
    const int p = m_ok ? m - img * HW : 0;
    const int iy = p / W - Q, ix = p - (p / W) * W - Q;
    const float* g_img = g + (long long)img * O * HWo;

    float areg[16];
    auto load_a = [&](int kt) {
        int k = kt * DG_BK + half * 16;
        int o = k / KK, r = k - o * KK;
        int ky = r / KW, kx = r - ky * KW;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int y = iy + ky, x = ix + kx;
            const bool ok = m_ok && k + j < K && (unsigned)y < (unsigned)Ho && (unsigned)x < (unsigned)Wo;
            areg[j] = ok ? g_img[(long long)o * HWo + y * Wo + x] : 0.0f;
            if (++kx == KW) {
                kx = 0;
                if (++ky == KH) {
                    ky = 0;
                    ++o;
                }
            }
        }
    };
    auto store_a = [&](int stage) {
        uint4 v0, v1;
        v0.x = pack_bf16x2(areg[0], areg[1]);
        v0.y = pack_bf16x2(areg[2], areg[3]);
        v0.z = pack_bf16x2(areg[4], areg[5]);
        v0.w = pack_bf16x2(areg[6], areg[7]);
        v1.x = pack_bf16x2(areg[8], areg[9]);
        v1.y = pack_bf16x2(areg[10], areg[11]);
        v1.z = pack_bf16x2(areg[12], areg[13]);
        v1.w = pack_bf16x2(areg[14], areg[15]);
        uint4* dst = reinterpret_cast<uint4*>(&as[stage][row * DG_ROW + half * 16]);
        dst[0] = v0;
        dst[1] = v1;
    };
    const int b_row = tid >> 2, b_chunk = tid & 3;
    const bool b_ok = bn + b_row < N;
    const __nv_bfloat16* b_src = wt + (long long)(b_ok ? bn + b_row : 0) * Kp + b_chunk * 8;
    auto load_b = [&](int kt, int stage) {
        cp_async16(&bs[stage][b_row * DG_ROW + b_chunk * 8], b_ok ? b_src + kt * DG_BK : wt, b_ok);
    };

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    load_b(0, 0);
    cp_async_commit();
    load_a(0);
    store_a(0);
    cp_async_wait<0>();
    __syncthreads();

    for (int kt = 0; kt < KT; ++kt) {
        const int st = kt & 1;
        const bool more = kt + 1 < KT;
        if (more) {
            load_b(kt + 1, st ^ 1);
            cp_async_commit();
            load_a(kt + 1);
        }
#pragma unroll
        for (int ks = 0; ks < DG_BK / 16; ++ks) {
            uint32_t a[2][4];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const __nv_bfloat16* ap = &as[st][(wm * 32 + i * 16 + (lane & 15)) * DG_ROW + ks * 16 + (lane >> 4) * 8];
                ldmatrix_x4(a[i][0], a[i][1], a[i][2], a[i][3], ap);
            }
            uint32_t b[4][2];
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
                // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                const int n_off = wn * 32 + jj * 16 + (lane & 7) + ((lane >> 4) << 3);
                const __nv_bfloat16* bp = &bs[st][n_off * DG_ROW + ks * 16 + ((lane >> 3) & 1) * 8];
                ldmatrix_x4(b[2 * jj][0], b[2 * jj][1], b[2 * jj + 1][0], b[2 * jj + 1][1], bp);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], a[i], b[j][0], b[j][1]);
        }
        if (more) {
            store_a(st ^ 1);
            cp_async_wait<0>();
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int hm = 0; hm < 2; ++hm) {
            const int mo = bm + wm * 32 + i * 16 + gq + 8 * hm;
            if (mo >= M) continue;
            const int im = mo / HW, po = mo - im * HW;
            float* out = dx + (long long)im * N * HW + po;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int n = bn + wn * 32 + j * 8 + 2 * t;
                if (n < N) out[(long long)n * HW] = acc[i][j][2 * hm];
                if (n + 1 < N) out[(long long)(n + 1) * HW] = acc[i][j][2 * hm + 1];
            }
        }
    }
}
