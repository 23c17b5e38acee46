// bitlinear convolution helpers: the int8 im2col gather of PackedBitConv2d, feeding the packed
// GEMM (packed_accumulate) with canonical int8 code rows, the dequantizer of its accumulators
// into NCHW (conv_dequant_f32), for BitConv2d's backward the transposed im2col that lays out
// the operands of its products (im2col_t_*), and the channels-last transpose of the implicit
// GEMM's codes (codes_nhwc); the last three are described above their kernels.
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
//   im2col_i8  a 1-D grid-stride loop over the images*R*C (row, channel) pairs (blocks and
//              threads from src/plan/conv.rs): a thread writes the KH*KW codes of its channel in
//              its row (independent loads in flight, all from one neighbourhood of one plane);
//              consecutive threads take consecutive channels of a row, so a warp's stores are one
//              contiguous run of the row. Indices are 64-bit (a tile may exceed 2^31 bytes in
//              principle); the shape arguments are 32-bit (checked on the Rust side).
#include "common.cuh"

extern "C" __global__ void im2col_i8(const int8_t* __restrict__ codes, int8_t* __restrict__ rows,
                                     int images, int C, int H, int W, int KH, int KW, int S, int P,
                                     int Wo, int r0, int R) {
    pdl_wait();
    const int khw = KH * KW;
    const long long K = (long long)C * khw;
    const long long items = (long long)images * R * C;
    const long long image_len = (long long)C * H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < items;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / C;
        const int ci = (int)(i - row * C);
        const int img = (int)(row / R);
        const int p = r0 + (int)(row - (long long)img * R);
        const int oy = p / Wo, ox = p - (p / Wo) * Wo;
        const int8_t* plane = codes + img * image_len + (long long)ci * H * W;
        int8_t* out = rows + row * K + (long long)ci * khw;
        for (int ky = 0; ky < KH; ++ky) {
            const int iy = oy * S + ky - P;
            const bool row_in = iy >= 0 && iy < H;
            for (int kx = 0; kx < KW; ++kx) {
                const int ix = ox * S + kx - P;
                out[ky * KW + kx] = (row_in && ix >= 0 && ix < W) ? plane[iy * W + ix] : (int8_t)0;
            }
        }
    }
}

// conv_dequant_f32: the accumulators of one tile, acc (images, R, N) int32 (row r of image i =
// output pixel r0 + r, column = output channel), to y (images, N, R) f32, the tile's block of
// the NCHW output: y[i][o][r] = (acc[i][r][o] * sx[i]) * sw, rounded twice in f32 (no FMA), as
// the CPU's quant::dequantize. `sx` points at the tile's first image's scale. A transpose: blocks
// (blockDim.x a multiple of 32, src/plan/conv.rs) loop over 32 x 32 squares (image, 32 rows,
// 32 columns); each warp reads rows of the square along N (coalesced) into shared memory, then
// writes its columns along R (coalesced), so neither side reads or writes one value a sector.
// conv_dequant_f32 takes sw by value (the packed form's host scale), conv_dequant_f32_dsw from
// device memory (the training forward's scale, never read back to the host).
#define DQ_SIDE 32
__device__ __forceinline__ void conv_dequant(const int* __restrict__ acc, const float* __restrict__ sx,
                                             float sw, float* __restrict__ y, int images, int R, int N) {
    __shared__ float square[DQ_SIDE][DQ_SIDE + 1];  // +1: the column reads hit 32 banks
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int row_squares = (R + DQ_SIDE - 1) / DQ_SIDE, col_squares = (N + DQ_SIDE - 1) / DQ_SIDE;
    const int per_image = row_squares * col_squares;
    const long long squares = (long long)images * per_image;
    for (long long q = blockIdx.x; q < squares; q += gridDim.x) {
        const int img = (int)(q / per_image);
        const int rest = (int)(q - (long long)img * per_image);
        const int r0 = (rest / col_squares) * DQ_SIDE, o0 = (rest % col_squares) * DQ_SIDE;
        const float s = sx[img];
        const int* a = acc + (long long)img * R * N;
        for (int j = warp; j < DQ_SIDE; j += warps) {
            const int r = r0 + j, o = o0 + lane;
            if (r < R && o < N) square[j][lane] = __fmul_rn(__fmul_rn((float)a[(long long)r * N + o], s), sw);
        }
        __syncthreads();
        float* out = y + (long long)img * N * R;
        for (int j = warp; j < DQ_SIDE; j += warps) {
            const int o = o0 + j, r = r0 + lane;
            if (o < N && r < R) out[(long long)o * R + r] = square[lane][j];
        }
        __syncthreads();
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

// im2col_t{1,4}_{f32,bf16}: the transposed im2col of images src (B, C, H, W) f32 for a stride-1
// convolution of KH x KW kernels with zero padding P, in f32 or bf16 (rounded to nearest even):
// dst[b * img_stride + j * row_stride + t] = src[b][ci][y + ky - P][x + kx - P] (0 in the
// padding), j = (ci*KH + ky)*KW + kx, t = y*WO + x. Two layouts (src/cuda/conv.rs, ColsLayout):
// per image (img_stride = C*KH*KW*HO*WO, row_stride = HO*WO), where image b's block (K, HO*WO)
// is the right operand of W (N, K) x cols, whose product is the output image in NCHW (the input
// gradient); or one matrix (img_stride = HO*WO, row_stride = B*HO*WO), rows j over the pixels
// of every image (the weight gradient's operand). A 1-D grid-stride loop (blocks and threads
// from src/plan/conv.rs) over the (plane, run) items, plane = (b, ci), run = V consecutive
// pixels of the plane: a thread writes the KH*KW rows of its run (independent loads in flight,
// all from the run's neighbourhood), and consecutive threads take consecutive runs, of one plane
// and then the next, so every row's stores coalesce and no thread idles on small planes (the 4x4
// maps of a CNN's last stage). V = 4 (im2col_t4_*) needs HO*WO % 4 == 0, so that every
// destination run is aligned to 4 elements (the strides are multiples of HO*WO) and is written
// as one vector store (16 bytes in f32, 8 in bf16); V = 1 (im2col_t1_*) takes any shape. A run
// may wrap an output row (WO % 4 != 0): each pixel has its own (y, x). The source is f32 images
// (im2col_t{1,4}_{f32,bf16}; `scales` unused) or the int8 codes of the activation quantizer with
// a scale an image (im2col_t{1,4}_i8_{f32,bf16}), whose value is its fake quantization
// __fmul_rn(code, scales[b]), exactly the x~ the quantizer would write.
__device__ __forceinline__ float source_value(const float* __restrict__ img, int i, float) { return img[i]; }
__device__ __forceinline__ float source_value(const int8_t* __restrict__ img, int i, float scale) {
    return __fmul_rn((float)img[i], scale);
}
__device__ __forceinline__ void store_run(float* p, const float (&v)[1]) { *p = v[0]; }
__device__ __forceinline__ void store_run(__nv_bfloat16* p, const float (&v)[1]) { *p = __float2bfloat16_rn(v[0]); }
__device__ __forceinline__ void store_run(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_run(__nv_bfloat16* p, const float (&v)[4]) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]), hi = __floats2bfloat162_rn(v[2], v[3]);
    uint2 u;
    u.x = *reinterpret_cast<const unsigned*>(&lo);
    u.y = *reinterpret_cast<const unsigned*>(&hi);
    *reinterpret_cast<uint2*>(p) = u;
}

template <typename S, typename T, int V>
__device__ __forceinline__ void im2col_t(const S* __restrict__ src, const float* __restrict__ scales,
                                         T* __restrict__ dst, int B, int C, int H,
                                         int W, int KH, int KW, int P, int HO, int WO, long long img_stride,
                                         long long row_stride) {
    const int runs = HO * WO / V;
    const long long items = (long long)B * C * runs;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < items;
         i += (long long)gridDim.x * blockDim.x) {
        const long long plane = i / runs;
        const int t = (int)(i - plane * runs) * V;
        int y[V], x[V];
#pragma unroll
        for (int v = 0; v < V; ++v) {
            y[v] = (t + v) / WO;
            x[v] = (t + v) - y[v] * WO;
        }
        const S* img = src + plane * H * W;
        const long long b = plane / C, ci = plane - b * C;
        const float scale = scales == nullptr ? 1.0f : scales[b];
        T* out = dst + b * img_stride + ci * KH * KW * row_stride + t;
        for (int ky = 0; ky < KH; ++ky) {
            for (int kx = 0; kx < KW; ++kx) {
                float run[V];
#pragma unroll
                for (int v = 0; v < V; ++v) {
                    const int iy = y[v] + ky - P, ix = x[v] + kx - P;
                    run[v] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? source_value(img, iy * W + ix, scale) : 0.0f;
                }
                store_run(out + (long long)(ky * KW + kx) * row_stride, run);
            }
        }
    }
}

#define IM2COL_T(S, T, V, NAME)                                                                         \
    extern "C" __global__ void NAME(const S* __restrict__ src, const float* __restrict__ scales,          \
                                    T* __restrict__ dst, int B, int C, int H, int W, int KH, int KW, int P, \
                                    int HO, int WO, long long img_stride, long long row_stride) {           \
        pdl_wait();                                                                                         \
        im2col_t<S, T, V>(src, scales, dst, B, C, H, W, KH, KW, P, HO, WO, img_stride, row_stride);         \
    }
IM2COL_T(float, float, 1, im2col_t1_f32)
IM2COL_T(float, __nv_bfloat16, 1, im2col_t1_bf16)
IM2COL_T(float, float, 4, im2col_t4_f32)
IM2COL_T(float, __nv_bfloat16, 4, im2col_t4_bf16)
IM2COL_T(int8_t, float, 1, im2col_t1_i8_f32)
IM2COL_T(int8_t, __nv_bfloat16, 1, im2col_t1_i8_bf16)
IM2COL_T(int8_t, float, 4, im2col_t4_i8_f32)
IM2COL_T(int8_t, __nv_bfloat16, 4, im2col_t4_i8_bf16)

// codes_nhwc: int8 codes src (B, C, HW) to dst (B, HW, C), the channels-last operand of the
// implicit GEMM (kernels/conv_igemm.cu). Blocks of 32 x 8 threads (src/plan/conv.rs) transpose
// 32 x 32 squares (32 channels, 32 pixels) of one image through shared memory: a warp reads 32
// consecutive pixels of one channel and writes 32 consecutive channels of one pixel, so both
// sides are whole 32-byte sectors. grid = (pixel squares, channel squares, images up to the grid
// limit), the images looping past it.
extern "C" __global__ void codes_nhwc(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int B, int C,
                                      int HW) {
    pdl_wait();
    __shared__ uint8_t square[32][33];
    const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int img = blockIdx.z; img < B; img += gridDim.z) {
        const uint8_t* s = src + (long long)img * C * HW;
        uint8_t* d = dst + (long long)img * C * HW;
        for (int j = ty; j < 32; j += 8) {
            const int c = c0 + j, p = p0 + tx;
            if (c < C && p < HW) square[j][tx] = s[(long long)c * HW + p];
        }
        __syncthreads();
        for (int j = ty; j < 32; j += 8) {
            const int p = p0 + j, c = c0 + tx;
            if (p < HW && c < C) d[(long long)p * C + c] = square[tx][j];
        }
        __syncthreads();
    }
}

// transpose_bf16_{f32,i8}: src (B, R, C) to bf16 dst (B, C, R), rounded to nearest even: the
// channels-last operands of the bf16 implicit GEMM (kernels/conv_bf16.cu). Images (B, C, H*W)
// become (B, H*W, C) (the output gradient, for the input gradient); a batch as one matrix (1, B,
// C*H*W) becomes (C*H*W, B) (x~ and g, for the weight gradient). The source is f32 values
// (`scales` unused) or int8 codes with a scale a source row (an image of the batch), whose value
// is __fmul_rn(code, scales[r]), exactly the x~ the activation quantizer writes. Blocks and
// squares as codes_nhwc (the same plan), shared memory in f32.
template <typename S>
__device__ __forceinline__ void transpose_bf16(const S* __restrict__ src, const float* __restrict__ scales,
                                               __nv_bfloat16* __restrict__ dst, int B, int R, int C) {
    __shared__ float square[32][33];
    const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int img = blockIdx.z; img < B; img += gridDim.z) {
        const S* s = src + (long long)img * R * C;
        __nv_bfloat16* d = dst + (long long)img * R * C;
        for (int j = ty; j < 32; j += 8) {
            const int r = r0 + j, c = c0 + tx;
            if (r < R && c < C) square[j][tx] = source_value(s, r * C + c, scales == nullptr ? 1.0f : scales[r]);
        }
        __syncthreads();
        for (int j = ty; j < 32; j += 8) {
            const int c = c0 + j, r = r0 + tx;
            if (c < C && r < R) d[(long long)c * R + r] = __float2bfloat16_rn(square[tx][j]);
        }
        __syncthreads();
    }
}
extern "C" __global__ void transpose_bf16_f32(const float* __restrict__ src, const float* __restrict__ scales,
                                              __nv_bfloat16* __restrict__ dst, int B, int R, int C) {
    pdl_wait();
    transpose_bf16(src, scales, dst, B, R, C);
}
extern "C" __global__ void transpose_bf16_i8(const int8_t* __restrict__ src, const float* __restrict__ scales,
                                             __nv_bfloat16* __restrict__ dst, int B, int R, int C) {
    pdl_wait();
    transpose_bf16(src, scales, dst, B, R, C);
}
