// 2x2, stride 2 max pooling of a contiguous (B, C, H, W) f32 tensor, H and W even (compiled to
// PTX by model/build.rs, launched from model/src/pool.rs). Same semantics as the CPU kernel:
// each window's maximum, the first one in row-major order on ties, a NaN in the window wins.
//
// max_pool2x2_fwd: thread o (grid-stride over the B*C*(H/2)*(W/2) outputs) reads its window's
//   4 inputs and writes out[o].
// max_pool2x2_bwd: thread o reads the same window and g[o], and writes all 4 input gradients of
//   its window (g[o] at the argmax, 0 elsewhere), so the (B, C, H, W) output needs no memset.

__device__ __forceinline__ int argmax4(float a, float b, float c, float d, float* mv) {
    int k = 0;
    float m = a;
    if (b > m || (isnan(b) && !isnan(m))) { k = 1; m = b; }
    if (c > m || (isnan(c) && !isnan(m))) { k = 2; m = c; }
    if (d > m || (isnan(d) && !isnan(m))) { k = 3; m = d; }
    *mv = m;
    return k;
}

extern "C" __global__ void max_pool2x2_fwd(const float* __restrict__ x, int planes, int h, int w,
                                           float* __restrict__ out) {
    const int ho = h >> 1, wo = w >> 1;
    const long long total = (long long)planes * ho * wo;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)gridDim.x * blockDim.x) {
        const long long pl = o / (ho * wo);
        const int rem = (int)(o - pl * ho * wo);
        const int i = rem / wo, j = rem - (rem / wo) * wo;
        const float* p = x + pl * h * w + (2 * i) * w + 2 * j;
        float2 r0 = *reinterpret_cast<const float2*>(p);
        float2 r1 = *reinterpret_cast<const float2*>(p + w);
        float m;
        argmax4(r0.x, r0.y, r1.x, r1.y, &m);
        out[o] = m;
    }
}

extern "C" __global__ void max_pool2x2_bwd(const float* __restrict__ x, const float* __restrict__ g, int planes,
                                           int h, int w, float* __restrict__ dx) {
    const int ho = h >> 1, wo = w >> 1;
    const long long total = (long long)planes * ho * wo;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)gridDim.x * blockDim.x) {
        const long long pl = o / (ho * wo);
        const int rem = (int)(o - pl * ho * wo);
        const int i = rem / wo, j = rem - (rem / wo) * wo;
        const long long base = pl * h * w + (2 * i) * w + 2 * j;
        float2 r0 = *reinterpret_cast<const float2*>(x + base);
        float2 r1 = *reinterpret_cast<const float2*>(x + base + w);
        float m;
        const int k = argmax4(r0.x, r0.y, r1.x, r1.y, &m);
        const float gv = g[o];
        float2 o0 = make_float2(k == 0 ? gv : 0.f, k == 1 ? gv : 0.f);
        float2 o1 = make_float2(k == 2 ? gv : 0.f, k == 3 ? gv : 0.f);
        *reinterpret_cast<float2*>(dx + base) = o0;
        *reinterpret_cast<float2*>(dx + base + w) = o1;
    }
}
