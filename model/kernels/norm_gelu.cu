// Batch norm + GELU over a contiguous (B, C, H, W) f32 feature map, forward and backward
// (compiled to PTX by model/build.rs, launched from model/src/speedrun/norm_gelu_cuda.rs). The
// math is norm_gelu.rs's (the CPU op): x^ = (x - mean_c) * inv_std_c, z = x^ + bias_c,
// y = gelu(z) = z * (1 + erf(z / sqrt 2)) / 2; backward dz = dy * gelu'(z), dbias_c = sum dz,
// dx = inv_std_c * (dz - mean(dz) - x^ * mean(dz * x^)) with batch statistics, inv_std_c * dz with
// fixed ones. Channel sums accumulate in double.
//
// Channel reductions (channel_partials, norm_gelu_bwd_partials) run on a grid (C, S): block
// (c, s) covers channel c of images [s * ipb, min(B, (s + 1) * ipb)), its threads striding over
// those images' H*W values (consecutive threads read consecutive pixels of one plane), and
// writes its sums to partials[c * S + s] (two sums: [.. * 2 + 0/1]). A finishing kernel (one
// thread a channel) adds the S partials in order: the result depends on neither the scheduling
// nor the machine. Element-wise kernels (norm_gelu_fwd, norm_gelu_bwd_dx) are grid-stride loops,
// one element a thread per step. Indices are 32-bit where the launch code says they fit (a
// 64-bit division per element costs more than the element's memory traffic); the `_wide` entry
// points take 64-bit ones. The `_v4` entry points move four values of one plane a thread per step
// as one 16-byte access (H*W a multiple of 4, buffers 16-byte aligned): a thread's loads in
// flight are what bound these kernels' bandwidth. Every value is computed the same way in both;
// a reduction's thread adds its four values in order, so its sums round differently. The launch
// code decides S, ipb, grids, blocks, the index width and the vector width.

#define BLOCK 256

__device__ __forceinline__ float gelu(float z) {
    return (erff(z * 0.70710678118654752f) + 1.f) * 0.5f * z;
}

__device__ __forceinline__ float gelu_grad(float z) {
    return (erff(z * 0.70710678118654752f) + 1.f) * 0.5f + z * expf(-0.5f * z * z) * 0.3989422804f;
}

// V consecutive floats as one access: float (V = 1) or float4 (V = 4), and their components.
template <int V> struct FloatVec;
template <> struct FloatVec<1> { typedef float T; };
template <> struct FloatVec<4> { typedef float4 T; };
__device__ __forceinline__ float& comp(float& v, int) { return v; }
__device__ __forceinline__ float& comp(float4& v, int k) { return (&v.x)[k]; }

// Sums of a block of BLOCK threads, in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = 0.0;
    if (threadIdx.x < 32) {
        v = threadIdx.x < BLOCK / 32 ? scratch[threadIdx.x] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    }
    return v;
}

// partials[c * S + s] = sum of x (centered == 0) or of (x - center[c])^2 over block (c, s).
template <int V>
__device__ __forceinline__ void channel_partials_impl(const float* __restrict__ x, const float* __restrict__ center,
                                                      int centered, int b, int c, int hw, int ipb,
                                                      double* __restrict__ partials) {
    typedef typename FloatVec<V>::T F;
    __shared__ double scratch[BLOCK / 32];
    const int ch = blockIdx.x, s = blockIdx.y;
    const int i0 = s * ipb, i1 = min(b, i0 + ipb);
    // ipb * hw < 2^31 (the launch code checks it).
    const unsigned count = (unsigned)(i1 > i0 ? i1 - i0 : 0) * (unsigned)hw;
    const float m = center[ch];
    double acc = 0.0;
    for (unsigned e = threadIdx.x * V; e < count; e += BLOCK * V) {
        const unsigned k = e / (unsigned)hw;
        F v = *reinterpret_cast<const F*>(x + ((long long)(i0 + k) * c + ch) * hw + (e - k * hw));
#pragma unroll
        for (int j = 0; j < V; ++j) {
            if (centered) {
                const double d = (double)(comp(v, j) - m);
                acc += d * d;
            } else {
                acc += (double)comp(v, j);
            }
        }
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[(long long)ch * gridDim.y + s] = acc;
}

extern "C" __global__ void channel_partials(const float* __restrict__ x, const float* __restrict__ center,
                                            int centered, int b, int c, int hw, int ipb,
                                            double* __restrict__ partials) {
    channel_partials_impl<1>(x, center, centered, b, c, hw, ipb, partials);
}

extern "C" __global__ void channel_partials_v4(const float* __restrict__ x, const float* __restrict__ center,
                                               int centered, int b, int c, int hw, int ipb,
                                               double* __restrict__ partials) {
    channel_partials_impl<4>(x, center, centered, b, c, hw, ipb, partials);
}

// out[c] = (sum over s of partials[c * S + s]) / n, as float; one thread a channel.
extern "C" __global__ void channel_finish(const double* __restrict__ partials, int c, int splits, double n,
                                          float* __restrict__ out) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double t = 0.0;
    for (int s = 0; s < splits; ++s) t += partials[(long long)ch * splits + s];
    out[ch] = (float)(t / n);
}

template <typename Index, int V>
__device__ __forceinline__ void norm_gelu_fwd_impl(const float* __restrict__ x, const float* __restrict__ mean,
                                                   const float* __restrict__ inv_std,
                                                   const float* __restrict__ bias, Index total, Index c, Index hw,
                                                   float* __restrict__ y) {
    typedef typename FloatVec<V>::T F;
    const Index n = total / V, hwv = hw / V;
    for (Index i = blockIdx.x * (Index)blockDim.x + threadIdx.x; i < n; i += (Index)gridDim.x * blockDim.x) {
        const Index ch = (i / hwv) % c;
        const float m = mean[ch], r = inv_std[ch], be = bias[ch];
        F v = reinterpret_cast<const F*>(x)[i];
#pragma unroll
        for (int j = 0; j < V; ++j) comp(v, j) = gelu((comp(v, j) - m) * r + be);
        reinterpret_cast<F*>(y)[i] = v;
    }
}

extern "C" __global__ void norm_gelu_fwd(const float* __restrict__ x, const float* __restrict__ mean,
                                         const float* __restrict__ inv_std, const float* __restrict__ bias,
                                         unsigned total, unsigned c, unsigned hw, float* __restrict__ y) {
    norm_gelu_fwd_impl<unsigned, 1>(x, mean, inv_std, bias, total, c, hw, y);
}

extern "C" __global__ void norm_gelu_fwd_v4(const float* __restrict__ x, const float* __restrict__ mean,
                                            const float* __restrict__ inv_std, const float* __restrict__ bias,
                                            unsigned total, unsigned c, unsigned hw, float* __restrict__ y) {
    norm_gelu_fwd_impl<unsigned, 4>(x, mean, inv_std, bias, total, c, hw, y);
}

extern "C" __global__ void norm_gelu_fwd_wide(const float* __restrict__ x, const float* __restrict__ mean,
                                              const float* __restrict__ inv_std, const float* __restrict__ bias,
                                              unsigned long long total, unsigned long long c,
                                              unsigned long long hw, float* __restrict__ y) {
    norm_gelu_fwd_impl<unsigned long long, 1>(x, mean, inv_std, bias, total, c, hw, y);
}

// The sums of dz and dz * x^ over block (c, s)'s values into partials[(c * S + s) * 2 + 0/1]
// (dz itself is not stored: the dx kernel computes it again, the same way, from x and dy).
template <int V>
__device__ __forceinline__ void norm_gelu_bwd_partials_impl(const float* __restrict__ x, const float* __restrict__ dy,
                                                            const float* __restrict__ mean,
                                                            const float* __restrict__ inv_std,
                                                            const float* __restrict__ bias, int b, int c, int hw,
                                                            int ipb, double* __restrict__ partials) {
    typedef typename FloatVec<V>::T F;
    __shared__ double scratch[BLOCK / 32];
    const int ch = blockIdx.x, s = blockIdx.y;
    const int i0 = s * ipb, i1 = min(b, i0 + ipb);
    // ipb * hw < 2^31 (the launch code checks it).
    const unsigned count = (unsigned)(i1 > i0 ? i1 - i0 : 0) * (unsigned)hw;
    const float m = mean[ch], r = inv_std[ch], be = bias[ch];
    double s1 = 0.0, s2 = 0.0;
    for (unsigned e = threadIdx.x * V; e < count; e += BLOCK * V) {
        const unsigned k = e / (unsigned)hw;
        const long long at = ((long long)(i0 + k) * c + ch) * hw + (e - k * hw);
        F xv = *reinterpret_cast<const F*>(x + at);
        F gv = *reinterpret_cast<const F*>(dy + at);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const float xh = (comp(xv, j) - m) * r;
            const float d = comp(gv, j) * gelu_grad(xh + be);
            s1 += (double)d;
            s2 += (double)(d * xh);
        }
    }
    s1 = block_sum(s1, scratch);
    s2 = block_sum(s2, scratch);
    if (threadIdx.x == 0) {
        const long long p = ((long long)ch * gridDim.y + s) * 2;
        partials[p] = s1;
        partials[p + 1] = s2;
    }
}

extern "C" __global__ void norm_gelu_bwd_partials(const float* __restrict__ x, const float* __restrict__ dy,
                                                  const float* __restrict__ mean, const float* __restrict__ inv_std,
                                                  const float* __restrict__ bias, int b, int c, int hw, int ipb,
                                                  double* __restrict__ partials) {
    norm_gelu_bwd_partials_impl<1>(x, dy, mean, inv_std, bias, b, c, hw, ipb, partials);
}

extern "C" __global__ void norm_gelu_bwd_partials_v4(const float* __restrict__ x, const float* __restrict__ dy,
                                                     const float* __restrict__ mean,
                                                     const float* __restrict__ inv_std,
                                                     const float* __restrict__ bias, int b, int c, int hw, int ipb,
                                                     double* __restrict__ partials) {
    norm_gelu_bwd_partials_impl<4>(x, dy, mean, inv_std, bias, b, c, hw, ipb, partials);
}

// dbias[c] = sum dz and sums[c * 2 + 0/1] = (sum dz, sum dz * x^) from the partials; one thread a
// channel.
extern "C" __global__ void pair_finish(const double* __restrict__ partials, int c, int splits,
                                       float* __restrict__ dbias, double* __restrict__ sums) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double t1 = 0.0, t2 = 0.0;
    for (int s = 0; s < splits; ++s) {
        t1 += partials[((long long)ch * splits + s) * 2];
        t2 += partials[((long long)ch * splits + s) * 2 + 1];
    }
    dbias[ch] = (float)t1;
    sums[ch * 2] = t1;
    sums[ch * 2 + 1] = t2;
}

template <typename Index, int V>
__device__ __forceinline__ void norm_gelu_bwd_dx_impl(const float* __restrict__ dy, const float* __restrict__ x,
                                                      const float* __restrict__ mean,
                                                      const float* __restrict__ inv_std,
                                                      const float* __restrict__ bias,
                                                      const double* __restrict__ sums, double n, int batch_stats,
                                                      Index total, Index c, Index hw, float* __restrict__ dx) {
    typedef typename FloatVec<V>::T F;
    const Index nv = total / V, hwv = hw / V;
    for (Index i = blockIdx.x * (Index)blockDim.x + threadIdx.x; i < nv; i += (Index)gridDim.x * blockDim.x) {
        const Index ch = (i / hwv) % c;
        const float r = inv_std[ch], m = mean[ch], be = bias[ch];
        const float m1 = batch_stats ? (float)(sums[ch * 2] / n) : 0.f;
        const float m2 = batch_stats ? (float)(sums[ch * 2 + 1] / n) : 0.f;
        F d = reinterpret_cast<const F*>(dy)[i];
        F xv = reinterpret_cast<const F*>(x)[i];
#pragma unroll
        for (int j = 0; j < V; ++j) {
            // dz as the partials kernel computes it (a rounded product: no FMA into what follows)
            const float xh = (comp(xv, j) - m) * r;
            const float dz = __fmul_rn(comp(d, j), gelu_grad(xh + be));
            comp(d, j) = batch_stats ? r * (dz - m1 - xh * m2) : r * dz;
        }
        reinterpret_cast<F*>(dx)[i] = d;
    }
}

extern "C" __global__ void norm_gelu_bwd_dx(const float* __restrict__ dy, const float* __restrict__ x,
                                            const float* __restrict__ mean, const float* __restrict__ inv_std,
                                            const float* __restrict__ bias, const double* __restrict__ sums,
                                            double n, int batch_stats,
                                            unsigned total, unsigned c, unsigned hw, float* __restrict__ dx) {
    norm_gelu_bwd_dx_impl<unsigned, 1>(dy, x, mean, inv_std, bias, sums, n, batch_stats, total, c, hw, dx);
}

extern "C" __global__ void norm_gelu_bwd_dx_v4(const float* __restrict__ dy, const float* __restrict__ x,
                                               const float* __restrict__ mean, const float* __restrict__ inv_std,
                                               const float* __restrict__ bias, const double* __restrict__ sums,
                                               double n, int batch_stats,
                                               unsigned total, unsigned c, unsigned hw, float* __restrict__ dx) {
    norm_gelu_bwd_dx_impl<unsigned, 4>(dy, x, mean, inv_std, bias, sums, n, batch_stats, total, c, hw, dx);
}

extern "C" __global__ void norm_gelu_bwd_dx_wide(const float* __restrict__ dy, const float* __restrict__ x,
                                                 const float* __restrict__ mean, const float* __restrict__ inv_std,
                                                 const float* __restrict__ bias, const double* __restrict__ sums,
                                                 double n, int batch_stats,
                                                 unsigned long long total, unsigned long long c,
                                                 unsigned long long hw, float* __restrict__ dx) {
    norm_gelu_bwd_dx_impl<unsigned long long, 1>(dy, x, mean, inv_std, bias, sums, n, batch_stats, total, c, hw, dx);
}
