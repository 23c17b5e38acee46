// bitlinear convolution helpers: the int8 im2col gather of PackedBitConv2d, feeding the packed
// GEMM (packed_accumulate) with canonical int8 code rows, the dequantizer of its accumulators
// into NCHW (conv_dequant_f32), and the padded channels-first copy of the weight-gradient
// products (pad_channels_first_f32); the last two are described above their kernels.
//
// Data layout
//   codes : (images, C*H*W) int8 codes, one image after the other, each image NCHW (C, H, W)
//           row-major; `codes` already points at the tile's first image.
//   rows  : (images * R, K) int8, K = C*KH*KW; row (i, r) is output pixel p = r0 + r of image i,
//           p = oy*Wo + ox; column j = (ci*KH + ky)*KW + kx (kw fastest: the PackedTernary K
//           order of the conv weight (c_out, c_in, kh, kw)) holds input (ci, oy*S + ky - P,
//           ox*S + kx - P), or 0 where that falls in the zero padding (code 0 is the value 0).
//
// Tiling and what each thread does
//   im2col_i8  a 1-D grid-stride loop over the images*R*K output bytes (blocks and threads from
//              src/plan/conv.rs): thread t writes bytes t, t + stride, ...; consecutive threads
//              write consecutive bytes of a row, so stores coalesce and the loads of one kernel
//              row (kx) are contiguous in the input. Indices are 64-bit (a tile may exceed 2^31
//              bytes in principle); the shape arguments are 32-bit (checked on the Rust side).
#include "common.cuh"

extern "C" __global__ void im2col_i8(const int8_t* __restrict__ codes, int8_t* __restrict__ rows,
                                     int images, int C, int H, int W, int KH, int KW, int S, int P,
                                     int Wo, int r0, int R) {
    pdl_wait();
    const long long K = (long long)C * KH * KW;
    const long long total = (long long)images * R * K;
    const long long image_len = (long long)C * H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / K;
        const int j = (int)(i - row * K);
        const int img = (int)(row / R);
        const int p = r0 + (int)(row - (long long)img * R);
        const int oy = p / Wo, ox = p - (p / Wo) * Wo;
        const int kx = j % KW, ky = (j / KW) % KH, ci = j / (KW * KH);
        const int iy = oy * S + ky - P, ix = ox * S + kx - P;
        int8_t v = 0;
        if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
            v = codes[img * image_len + ((long long)ci * H + iy) * W + ix];
        }
        rows[i] = v;
    }
}

// conv_dequant_f32: the accumulators of one tile, acc (images, R, N) int32 (row r of image i =
// output pixel r0 + r, column = output channel), to y (images, N, R) f32, the tile's block of
// the NCHW output: y[i][o][r] = (acc[i][r][o] * sx[i]) * sw, rounded twice in f32 (no FMA), as
// the CPU's quant::dequantize. `sx` points at the tile's first image's scale. Grid-stride over
// the images*N*R outputs, one output a thread (consecutive threads write consecutive pixels).
// conv_dequant_f32 takes sw by value (the packed form's host scale), conv_dequant_f32_dsw from
// device memory (the training forward's scale, never read back to the host).
__device__ __forceinline__ void conv_dequant(const int* __restrict__ acc, const float* __restrict__ sx,
                                             float sw, float* __restrict__ y, int images, int R, int N) {
    const long long total = (long long)images * N * R;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long plane = (long long)N * R;
        const int img = (int)(i / plane);
        const long long rest = i - img * plane;
        const int o = (int)(rest / R), r = (int)(rest - (long long)o * R);
        const float v = (float)acc[((long long)img * R + r) * N + o];
        y[i] = __fmul_rn(__fmul_rn(v, sx[img]), sw);
    }
}

extern "C" __global__ void conv_dequant_f32(const int* __restrict__ acc, const float* __restrict__ sx,
                                            float sw, float* __restrict__ y, int images, int R, int N) {
    pdl_wait();
    conv_dequant(acc, sx, sw, y, images, R, N);
}

extern "C" __global__ void conv_dequant_f32_dsw(const int* __restrict__ acc, const float* __restrict__ sx,
                                                const float* __restrict__ sw, float* __restrict__ y,
                                                int images, int R, int N) {
    pdl_wait();
    conv_dequant(acc, sx, *sw, y, images, R, N);
}

// pad_channels_first_f32: src (B, C, H, W) f32 contiguous to dst (C, B, HP, WP) f32 followed by
// `tail` zeros: dst[c][b][y][x] = src[b][c][y - top][x - left] where that lies inside the image,
// else 0. The weight gradient of BitConv2d (src/conv_grad.rs) reads every kernel offset of the
// padded input as one contiguous window of this buffer. Grid-stride over the C*B*HP*WP + tail
// outputs, one a thread: consecutive threads write consecutive x, so stores coalesce and the
// loads of one image row are contiguous.
extern "C" __global__ void pad_channels_first_f32(const float* __restrict__ src, float* __restrict__ dst,
                                                  int B, int C, int H, int W, int HP, int WP, int top,
                                                  int left, unsigned long long tail) {
    pdl_wait();
    const long long plane = (long long)HP * WP;
    const long long body = (long long)C * B * plane;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < body + (long long)tail;
         i += (long long)gridDim.x * blockDim.x) {
        float v = 0.0f;
        if (i < body) {
            const long long cb = i / plane;
            const int rest = (int)(i - cb * plane);
            const int c = (int)(cb / B), b = (int)(cb - (long long)c * B);
            const int y = rest / WP - top, x = rest % WP - left;
            if (y >= 0 && y < H && x >= 0 && x < W) {
                v = src[(((long long)b * C + c) * H + y) * W + x];
            }
        }
        dst[i] = v;
    }
}
