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
