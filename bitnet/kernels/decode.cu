// Fused kernels of a BitNet decode step (compiled to PTX by bitnet/build.rs, launched from
// bitnet/src/fused.rs). Between the packed projections of a layer, the tensor-op form of a decode
// step runs ~25 small candle kernels (norms, adds, RoPE, cache writes, mask, softmax, two batched
// products, copies); the kernels here replace them. With packed projections a layer is the
// attention kernel and 4 GEMVs that run the norms themselves (bitlinear's packed_matmul_normed);
// the two norm kernels serve the dense model, and the final norm where head.cu's kernel (final
// add + norm, head and greedy argmax in one) does not apply; argmax_T picks the greedy token of
// given logits on the device. Shared helpers: common.cuh.
// Float math is f32; T (f32, bf16 or f16) only rounds what is stored.
//
// add_rms_norm_T (grid: one block per row, up to 1024 threads, n <= 16 * threads):
//   x, delta (rows, n) T; gamma (n) T.  out (2, rows, n) T: out[0] = x + delta rounded to T (the
//   residual stream), out[1] = rmsnorm(out[0]) * gamma with candle's formula
//   (scale = rsqrt(mean(x^2) + eps), y = T(scale * x * gamma)). Each thread keeps its columns'
//   values and gains in registers (all loads issued before the reduction), one block reduction of
//   the squares.
//
// relu2_mul_rms_norm_T (same launch): gate_up (rows, 2n) T, the stacked gate and up products
//   before their weight scales; gamma (n) T. out (rows, n) T = rmsnorm(T(T(relu(g)^2) * u)) *
//   gamma with g = T(gate * gate_scale), u = T(up * up_scale): the squared-ReLU gated FFN product
//   rounded to T where the tensor ops round it, then normalised as above.
//
// decode_attention_T (grid: one block per query head, 1024 threads, dynamic shared memory
//   4 * (capacity + 35 d) bytes): one token of grouped-query attention at position
//   p = min(*pos, capacity - 1), read from the device so that a CUDA graph replays every step,
//   then BitNet's attn_sub_norm over all heads.
//   qkv ((heads + 2 kv_heads) d) T: the stacked q, k and v products of the token before their
//   weight scales q_scale, k_scale, v_scale (each rounded to T once scaled); cos, sin
//   (positions, d / 2) T: RoPE tables; cache_k, cache_v (kv_heads, capacity, d) T, written at
//   row p by the first query head of each KV head; sub_gamma (heads * d) T, eps: the sub-norm
//   (null: none, `out` unused; the sub-norm then runs in the next projection's GEMV);
//   counter: one u32, 0 between calls. raw (heads, d) T: the attention output before the norm;
//   out (heads * d) T: after it.
//   * once p is read, an L2 prefetch of the cached key and value rows 0..p-1 (one 128-byte line a
//     thread), so that their loads below, behind RoPE and the scores, come from L2.
//   * RoPE (rotate_half form) of q and k_new at p into shared memory; q prescaled by 1/sqrt(d).
//   * scores: d / 8 lanes share a key, each holding 8 dims of q and loading 16 bytes of the key
//     row, summed by shuffles; the block takes 1024 / (d / 8) keys a pass, so that a few
//     hundred positions cost one or two rounds of loads (key p from shared memory: other blocks
//     may not have written it yet); kept in shared memory.
//   * block max and sum of exp(s - max).
//   * values: groups of d / 8 threads, each thread owning 8 consecutive dims, loop over keys
//     j = g, g + G, ... <= p (G = 1024 / (d / 8) groups), so a group reads whole rows
//     (coalesced); the groups of a warp add up by shuffles, the 32 warps through shared memory.
//   * the last block to finish (an atomic count) normalises all heads into `out` (at most 16
//     values a thread, read once with their gains).
//   Needs d % 8 == 0, d / 8 a power of two, d <= 256, heads * d <= 16 * 1024, 16-byte aligned
//   rows (checked on the host).
#include "common.cuh"

// Block sizes the host launches (src/fused/launch.rs); the bounds cap registers at 64 a thread.
#define NORM_THREADS 1024
#define ATT_THREADS 1024
#define NORM_MAX_PER_THREAD 16

// rmsnorm of the row held in `v` (this thread's columns c = tid + i * blockDim.x) with the gains
// `g` of those columns (loaded with the row, so that no load waits behind the reduction), stored
// to dst.
template <typename T>
__device__ void norm_store(const float* v, const float* g, int n, float eps, T* dst, float* red) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_MAX_PER_THREAD; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < n) ss += v[i] * v[i];
    }
    ss = block_reduce<false>(ss, red);
    const float scale = rsqrtf(ss / (float)n + eps);
#pragma unroll
    for (int i = 0; i < NORM_MAX_PER_THREAD; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < n) dst[c] = from_f<T>(scale * v[i] * g[i]);
    }
}

template <typename T>
__device__ void add_rms_norm(const T* x, const T* delta, const T* gamma, int rows, int n, float eps, T* out) {
    __shared__ float red[32];
    const long long row = blockIdx.x;
    float v[NORM_MAX_PER_THREAD], g[NORM_MAX_PER_THREAD];
#pragma unroll
    for (int i = 0; i < NORM_MAX_PER_THREAD; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        v[i] = g[i] = 0.f;
        if (c < n) {
            const T s = from_f<T>(to_f(x[row * n + c]) + to_f(delta[row * n + c]));
            out[row * n + c] = s;
            v[i] = to_f(s);
            g[i] = to_f(gamma[c]);
        }
    }
    norm_store(v, g, n, eps, out + (long long)rows * n + row * n, red);
}

template <typename T>
__device__ void relu2_mul_rms_norm(const T* gate_up, const T* gamma, int n, float eps, float gate_scale,
                                   float up_scale, T* out) {
    __shared__ float red[32];
    const long long row = blockIdx.x;
    const T* gate = gate_up + row * 2 * n;
    const T* up = gate + n;
    float v[NORM_MAX_PER_THREAD], gm[NORM_MAX_PER_THREAD];
#pragma unroll
    for (int i = 0; i < NORM_MAX_PER_THREAD; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        v[i] = gm[i] = 0.f;
        if (c < n) {
            const float g = fmaxf(round_t<T>(to_f(gate[c]) * gate_scale), 0.f);
            const float u = round_t<T>(to_f(up[c]) * up_scale);
            v[i] = round_t<T>(round_t<T>(g * g) * u);
            gm[i] = to_f(gamma[c]);
        }
    }
    norm_store(v, gm, n, eps, out + row * n, red);
}

template <typename T>
__device__ void decode_attention(const T* qkv, const T* cos, const T* sin, float q_scale, float k_scale,
                                 float v_scale, const uint32_t* pos, T* cache_k, T* cache_v, int capacity, int heads,
                                 int kv_heads, int d, const T* sub_gamma, float eps, uint32_t* counter,
                                 T* raw, T* out) {
    extern __shared__ float sm[];
    float* scores = sm;              // capacity
    float* qs = scores + capacity;   // d: rotated q / sqrt(d)
    float* ks = qs + d;              // d: rotated k_new (rounded to T)
    float* vs = ks + d;              // d: v_new
    float* part = vs + d;            // 32 * d: the warps' partial value sums
    __shared__ float red[32];
    const int head = blockIdx.x, groups = heads / kv_heads, kvh = head / groups;
    const bool writer = head % groups == 0;
    const int p = min((int)*pos, capacity - 1);
    const int half = d / 2;
    const float qscale = rsqrtf((float)d);
    const T* qh = qkv + (long long)head * d;
    const T* kh = qkv + (long long)(heads + kvh) * d;
    const T* vh = qkv + (long long)(heads + kv_heads + kvh) * d;
    T* ck = cache_k + (long long)kvh * capacity * d;
    T* cv = cache_v + (long long)kvh * capacity * d;
    // Ask L2 for the cached keys and values now (rows 0..p-1, 128-byte lines), so that their
    // loads below, which wait for RoPE and for the scores, find them there.
    {
        const int lines = (int)(((long long)p * d * sizeof(T) + 127) / 128);
        for (int l = threadIdx.x; l < 2 * lines; l += blockDim.x) {
            const char* base = reinterpret_cast<const char*>(l < lines ? ck : cv);
            const long long off = 128LL * (l < lines ? l : l - lines);
            asm volatile("prefetch.global.L2 [%0];" ::"l"(base + off));
        }
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const int f = i < half ? i : i - half;
        const float c = to_f(cos[(long long)p * half + f]), s = to_f(sin[(long long)p * half + f]);
        // The projections with their weight scales, rounded to T as a projection's output is.
        const int o = i < half ? i + half : i - half;
        const float qi = round_t<T>(to_f(qh[i]) * q_scale), qo = round_t<T>(to_f(qh[o]) * q_scale);
        const float ki = round_t<T>(to_f(kh[i]) * k_scale), ko = round_t<T>(to_f(kh[o]) * k_scale);
        const float qr = i < half ? qi * c - qo * s : qi * c + qo * s;
        const float kr = i < half ? ki * c - ko * s : ki * c + ko * s;
        const T kt = from_f<T>(kr), vt = from_f<T>(to_f(vh[i]) * v_scale);
        qs[i] = round_t<T>(qr) * qscale;
        ks[i] = to_f(kt);
        vs[i] = to_f(vt);
        if (writer) {
            ck[(long long)p * d + i] = kt;
            cv[(long long)p * d + i] = vt;
        }
    }
    __syncthreads();

    // Scores: d / 8 lanes share a key, each with 8 dims of q in registers and one 16-byte load
    // of the key; a block takes blockDim.x / (d / 8) keys a pass. The loop bound is the same
    // for every thread (the shuffles need the whole warp).
    const int lanes_per_key = d / 8, keys_per_pass = blockDim.x / lanes_per_key;
    const int key_slot = threadIdx.x / lanes_per_key, dim0 = (threadIdx.x % lanes_per_key) * 8;
    float qr[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) qr[e] = qs[dim0 + e];
    float local_max = -INFINITY;
#pragma unroll 4
    for (int j0 = 0; j0 <= p; j0 += keys_per_pass) {
        const int j = j0 + key_slot;
        float kv[8];
        if (j < p) {
            load8(ck + (long long)j * d + dim0, kv);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) kv[e] = j == p ? ks[dim0 + e] : 0.f;
        }
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) s += qr[e] * kv[e];
        for (int o = lanes_per_key / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (j <= p) {
            if (dim0 == 0) scores[j] = s;
            local_max = fmaxf(local_max, s);
        }
    }
    const float mx = block_reduce<true>(local_max, red);
    float local_sum = 0.f;
    for (int j = threadIdx.x; j <= p; j += blockDim.x) {
        const float e = expf(scores[j] - mx);
        scores[j] = e;
        local_sum += e;
    }
    const float sum = block_reduce<false>(local_sum, red); // its barriers publish `scores`

    // Values: groups of d / 8 threads, each thread 8 dims of one key row a pass.
    const int per_row = d / 8, group_count = blockDim.x / per_row;
    const int g = threadIdx.x / per_row, c0 = (threadIdx.x % per_row) * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int j = g; j <= p; j += group_count) {
        float vv[8];
        if (j == p) {
#pragma unroll
            for (int e = 0; e < 8; ++e) vv[e] = vs[c0 + e];
        } else {
            load8(cv + (long long)j * d + c0, vv);
        }
        const float w = scores[j];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += w * vv[e];
    }
    // The groups of a warp add up by shuffles, then one row per warp in shared memory.
#pragma unroll
    for (int e = 0; e < 8; ++e)
        for (int o = per_row; o < 32; o <<= 1) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], o);
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if ((threadIdx.x & 31) < per_row) {
#pragma unroll
        for (int e = 0; e < 8; ++e) part[warp * d + c0 + e] = acc[e];
    }
    __syncthreads();
    const float inv = 1.f / sum;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float s = 0.f;
        for (int w = 0; w < warps; ++w) s += part[w * d + i];
        raw[(long long)head * d + i] = from_f<T>(s * inv);
    }

    if (sub_gamma == nullptr) return;
    // attn_sub_norm over all heads by the block that finishes last (threadfence reduction): each
    // block publishes its head, then counts itself in; the last one reads every head back from L2
    // (ld.cg: not through its L1), normalises, and resets the counter for the next call.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // heads * d <= NORM_MAX_PER_THREAD * blockDim.x (checked on the host): one pass of loads.
    const int n = heads * d;
    float v[NORM_MAX_PER_THREAD], gains[NORM_MAX_PER_THREAD];
#pragma unroll
    for (int i = 0; i < NORM_MAX_PER_THREAD; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        v[i] = gains[i] = 0.f;
        if (c < n) {
            v[i] = to_f(__ldcg(raw + c));
            gains[i] = to_f(sub_gamma[c]);
        }
    }
    if (threadIdx.x == 0) *counter = 0u;
    norm_store(v, gains, n, eps, out, red);
}

// argmax_T (grid: ARGMAX_BLOCKS blocks of 1024 threads): the index of the first maximum of
//   x (n) T into out[0] (common.cuh: NaN never picked, 0xffffffff if every value is NaN). Each
//   thread scans a grid-strided slice, each block reduces to one (value, index) pair in `partial`
//   (2 * gridDim.x u32), the last block to finish reduces those (argmax_commit).
template <typename T>
__device__ void argmax(const T* x, int n, uint32_t* counter, uint32_t* partial, uint32_t* out) {
    __shared__ float red_v[32];
    __shared__ uint32_t red_i[32];
    float bv = -INFINITY;
    uint32_t bi = 0xffffffffu;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = to_f(x[i]);
        if (better(v, (uint32_t)i, bv, bi)) { bv = v; bi = (uint32_t)i; }
    }
    block_argmax(bv, bi, red_v, red_i);
    argmax_commit(bv, bi, counter, partial, out, Feedback{nullptr, nullptr, nullptr, 0u, 0u}, red_v, red_i);
}

#define DECODE_KERNELS(T, SFX)                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) add_rms_norm_##SFX(const T* x, const T* delta, const T* gamma, int rows,   \
                                                  int n, float eps, T* out) {                             \
        add_rms_norm<T>(x, delta, gamma, rows, n, eps, out);                                              \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) relu2_mul_rms_norm_##SFX(const T* gate_up, const T* gamma, int n, float eps, \
                                                        float gate_scale, float up_scale, T* out) {       \
        relu2_mul_rms_norm<T>(gate_up, gamma, n, eps, gate_scale, up_scale, out);                         \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) decode_attention_##SFX(                                                    \
        const T* qkv, const T* cos, const T* sin, float q_scale, float k_scale, float v_scale,            \
        const uint32_t* pos, T* cache_k, T* cache_v, int capacity, int heads, int kv_heads, int d,        \
        const T* sub_gamma, float eps, uint32_t* counter, T* raw, T* out) {                               \
        decode_attention<T>(qkv, cos, sin, q_scale, k_scale, v_scale, pos, cache_k, cache_v, capacity,    \
                            heads, kv_heads, d, sub_gamma, eps, counter, raw, out);                       \
    }                                                                                                     \
    extern "C" __global__ void argmax_##SFX(const T* x, int n, uint32_t* counter, uint32_t* partial,      \
                                            uint32_t* out) {                                              \
        argmax<T>(x, n, counter, partial, out);                                                           \
    }

DECODE_KERNELS(float, f32)
DECODE_KERNELS(__nv_bfloat16, bf16)
DECODE_KERNELS(__half, f16)
