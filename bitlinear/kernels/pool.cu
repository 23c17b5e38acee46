// 2x2, stride 2 max pooling of a contiguous (B, C, H, W) tensor of f32, bf16 or f16, H and W even
// (launched from src/cuda/pool.rs for src/pool.rs and the pooled convolution of src/conv_grad.rs).
// Same semantics as the CPU kernel: each window's maximum, the first one in row-major order on
// ties, a NaN in the window wins. Half-precision values are compared as floats (exact) and stored
// unchanged.
//
// max_pool2x2_fwd_<t>: thread o (grid-stride over the B*C*(H/2)*(W/2) outputs) reads its window's
//   4 inputs as two pairs and writes out[o].
// max_pool2x2_bwd_<t>: thread o reads the same window and g[o], and writes all 4 input gradients
//   of its window (g[o] at the argmax, 0 elsewhere) as two pairs, so the (B, C, H, W) output
//   needs no memset.
// max_unpool2x2_nhwc_bf16_c{1,2}: the f32 backward written in the layout the bf16 backward
//   products of the convolution before the pooling read (src/conv_grad.rs): dst (B, H*W, C) bf16,
//   g[o] rounded to nearest even at its window's argmax, 0 elsewhere (every element written).
//   Block (32, 8) threads: a tile of 32 windows (of one image's (H/2)*(W/2), flattened) by 32*CPT
//   channels (CPT = 2 needs C even), images in the grid's z, looping past its limit (the launch
//   code's unpool_plan). First, thread (tx, ty) finds the argmax of window w0 + tx of channels
//   c0 + ty, c0 + ty + 8, .. and keeps it with g in shared memory (adjacent threads read adjacent
//   windows: runs of pairs of a row); then it writes channels c0 + CPT*tx .. + CPT-1 (one 4-byte
//   store for CPT = 2) of the 4 pixels of windows ty / 4, ty / 4 + 2, ..: each warp a pixel's
//   32*CPT channels, 64*CPT contiguous bytes.
// Pairs are loaded and stored as one 8-byte (f32) or 4-byte (bf16, f16) access: the caller
// passes buffers starting at an even element.

#include "common.cuh"

// A pair of values of T and the conversions the kernels need.
template <typename T> struct Pair;
template <> struct Pair<float> {
    typedef float2 type;
    static __device__ __forceinline__ float f(float v) { return v; }
    static __device__ __forceinline__ float lo(float2 p) { return p.x; }
    static __device__ __forceinline__ float hi(float2 p) { return p.y; }
    static __device__ __forceinline__ float2 make(float a, float b) { return make_float2(a, b); }
    static __device__ __forceinline__ float zero() { return 0.f; }
};
template <> struct Pair<__nv_bfloat16> {
    typedef __nv_bfloat162 type;
    static __device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 lo(__nv_bfloat162 p) { return p.x; }
    static __device__ __forceinline__ __nv_bfloat16 hi(__nv_bfloat162 p) { return p.y; }
    static __device__ __forceinline__ __nv_bfloat162 make(__nv_bfloat16 a, __nv_bfloat16 b) {
        return __halves2bfloat162(a, b);
    }
    static __device__ __forceinline__ __nv_bfloat16 zero() { return __float2bfloat16(0.f); }
};
template <> struct Pair<__half> {
    typedef __half2 type;
    static __device__ __forceinline__ float f(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half lo(__half2 p) { return p.x; }
    static __device__ __forceinline__ __half hi(__half2 p) { return p.y; }
    static __device__ __forceinline__ __half2 make(__half a, __half b) { return __halves2half2(a, b); }
    static __device__ __forceinline__ __half zero() { return __float2half(0.f); }
};

// Index (0..4) of the first maximum of the window (a, b / c, d); a NaN wins.
template <typename T> __device__ __forceinline__ int argmax4(T a, T b, T c, T d, T* mv) {
    int k = 0;
    T m = a;
    float mf = Pair<T>::f(a);
    const T v[3] = {b, c, d};
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        const float vf = Pair<T>::f(v[i]);
        if (vf > mf || (isnan(vf) && !isnan(mf))) {
            k = i + 1;
            m = v[i];
            mf = vf;
        }
    }
    *mv = m;
    return k;
}

template <typename T>
__device__ void pool_fwd_impl(const T* __restrict__ x, int planes, int h, int w, T* __restrict__ out) {
    typedef typename Pair<T>::type P;
    const int ho = h >> 1, wo = w >> 1;
    const long long total = (long long)planes * ho * wo;
    pdl_wait();
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)gridDim.x * blockDim.x) {
        const long long pl = o / (ho * wo);
        const int rem = (int)(o - pl * ho * wo);
        const int i = rem / wo, j = rem - (rem / wo) * wo;
        const T* p = x + pl * h * w + (2 * i) * w + 2 * j;
        const P r0 = *reinterpret_cast<const P*>(p);
        const P r1 = *reinterpret_cast<const P*>(p + w);
        T m;
        argmax4<T>(Pair<T>::lo(r0), Pair<T>::hi(r0), Pair<T>::lo(r1), Pair<T>::hi(r1), &m);
        out[o] = m;
    }
}

template <typename T>
__device__ void pool_bwd_impl(const T* __restrict__ x, const T* __restrict__ g, int planes, int h, int w,
                              T* __restrict__ dx) {
    typedef typename Pair<T>::type P;
    const int ho = h >> 1, wo = w >> 1;
    const long long total = (long long)planes * ho * wo;
    const T z = Pair<T>::zero();
    pdl_wait();
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)gridDim.x * blockDim.x) {
        const long long pl = o / (ho * wo);
        const int rem = (int)(o - pl * ho * wo);
        const int i = rem / wo, j = rem - (rem / wo) * wo;
        const long long base = pl * h * w + (2 * i) * w + 2 * j;
        const P r0 = *reinterpret_cast<const P*>(x + base);
        const P r1 = *reinterpret_cast<const P*>(x + base + w);
        T m;
        const int k = argmax4<T>(Pair<T>::lo(r0), Pair<T>::hi(r0), Pair<T>::lo(r1), Pair<T>::hi(r1), &m);
        const T gv = g[o];
        *reinterpret_cast<P*>(dx + base) = Pair<T>::make(k == 0 ? gv : z, k == 1 ? gv : z);
        *reinterpret_cast<P*>(dx + base + w) = Pair<T>::make(k == 2 ? gv : z, k == 3 ? gv : z);
    }
}

#define POOL_KERNELS(T, SUFFIX)                                                                    \
    extern "C" __global__ void max_pool2x2_fwd_##SUFFIX(const T* __restrict__ x, int planes, int h, \
                                                        int w, T* __restrict__ out) {              \
        pool_fwd_impl<T>(x, planes, h, w, out);                                                       \
    }                                                                                              \
    extern "C" __global__ void max_pool2x2_bwd_##SUFFIX(const T* __restrict__ x,                   \
                                                        const T* __restrict__ g, int planes, int h, \
                                                        int w, T* __restrict__ dx) {               \
        pool_bwd_impl<T>(x, g, planes, h, w, dx);                                                     \
    }

POOL_KERNELS(float, f32)
POOL_KERNELS(__nv_bfloat16, bf16)
POOL_KERNELS(__half, f16)

template <int CPT>
__device__ __forceinline__ void unpool_nhwc_bf16_impl(const float* __restrict__ x, const float* __restrict__ g, int B,
                                                      int C, int H, int W, __nv_bfloat16* __restrict__ dst) {
    __shared__ float grad[32 * CPT][33];
    __shared__ unsigned char arg[32 * CPT][33];
    const int wo = W >> 1, windows = (H >> 1) * wo;
    const int w0 = blockIdx.x * 32, c0 = blockIdx.y * 32 * CPT;
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int img = blockIdx.z; img < B; img += gridDim.z) {
        for (int j = ty; j < 32 * CPT; j += 8) {
            const int c = c0 + j, win = w0 + tx;
            if (c < C && win < windows) {
                const int i = win / wo, k = win - i * wo;
                const long long plane = (long long)img * C + c;
                const float* p = x + plane * H * W + (2 * i) * W + 2 * k;
                const float2 r0 = *reinterpret_cast<const float2*>(p);
                const float2 r1 = *reinterpret_cast<const float2*>(p + W);
                float m;
                arg[j][tx] = (unsigned char)argmax4<float>(r0.x, r0.y, r1.x, r1.y, &m);
                grad[j][tx] = g[plane * windows + win];
            }
        }
        __syncthreads();
        for (int q = ty; q < 128; q += 8) {
            const int local = q >> 2, sub = q & 3;
            const int win = w0 + local, c = c0 + CPT * tx;
            if (c < C && win < windows) {
                const int i = win / wo, k = win - i * wo;
                const int pixel = (2 * i + (sub >> 1)) * W + 2 * k + (sub & 1);
                __nv_bfloat16* d = dst + ((long long)img * H * W + pixel) * C + c;
                const float v0 = arg[CPT * tx][local] == sub ? grad[CPT * tx][local] : 0.f;
                if (CPT == 2) {
                    const float v1 = arg[CPT * tx + 1][local] == sub ? grad[CPT * tx + 1][local] : 0.f;
                    *reinterpret_cast<__nv_bfloat162*>(d) = __floats2bfloat162_rn(v0, v1);
                } else {
                    *d = __float2bfloat16_rn(v0);
                }
            }
        }
        __syncthreads();
    }
}

extern "C" __global__ void max_unpool2x2_nhwc_bf16_c1(const float* __restrict__ x, const float* __restrict__ g, int B,
                                                      int C, int H, int W, __nv_bfloat16* __restrict__ dst) {
    pdl_wait();
    unpool_nhwc_bf16_impl<1>(x, g, B, C, H, W, dst);
}
extern "C" __global__ void max_unpool2x2_nhwc_bf16_c2(const float* __restrict__ x, const float* __restrict__ g, int B,
                                                      int C, int H, int W, __nv_bfloat16* __restrict__ dst) {
    pdl_wait();
    unpool_nhwc_bf16_impl<2>(x, g, B, C, H, W, dst);
}
