// The end of a fused BitNet decode step as one kernel (compiled to PTX by bitnet/build.rs,
// launched from bitnet/src/fused/head.rs): the last residual add and the final RMSNorm, the LM
// head's matrix-vector product, and the greedy argmax of the logits. It replaces an add + norm
// kernel, a cuBLAS GEMV and the argmax kernel of decode.cu: one launch instead of three, and the
// head's weights (the largest tensor a step reads) requested before the previous kernel ends.
// Float math is f32; T (f32, bf16 or f16) only rounds what is stored.
//
// lm_head_T (grid: HEAD_BLOCKS_PER_SM blocks an SM of HEAD_THREADS threads, launched with
//   programmatic dependent launch where the device has it; dynamic shared memory 4 * hidden):
//   x, delta (hidden) T: the residual stream and the last layer's output (delta null: x alone);
//   gamma (hidden) T, eps: the final norm. w (vocab, hidden) T: the head, rows 16-byte aligned.
//   logits (vocab) T (null: not written), counter: one u32, 0 between calls; partial
//   (2 * gridDim.x) u32 and token (1) u32: the greedy token as argmax_commit (common.cuh) leaves
//   it; next_id, pos, tokens, first, len: the step's token feedback (next_id null: none).
//   * before pdl_wait, each warp requests its first HEAD_ROWS rows (the head is settled: written
//     once at load, so no kernel of the step writes it), which overlaps the previous kernel.
//   * after it, the block normalises the row as add_rms_norm_T does: s = T(x + delta),
//     y = T(rsqrt(mean(s^2) + eps) * s * gamma), kept in shared memory as f32.
//   * rows: warp w of the grid takes rows HEAD_ROWS * (w + k * warps), HEAD_ROWS at a time; a row
//     is hidden / V 16-byte chunks (V values of T), lane l loads chunks l, l + 32, ... (each load
//     instruction of the warp reads 512 contiguous bytes), evict-first in L2 (each row is read
//     once a step); HEAD_CHUNKS chunks a lane per row are in flight before the first product.
//   * the row's dot product is summed over the lanes by shuffles and rounded to T: the logit (as
//     cuBLAS rounds its f32 accumulator), and the value the argmax compares.
//   Needs hidden % V == 0 and 4 * hidden bytes of shared memory (checked on the host).
#include "common.cuh"

// Launch shape (src/fused/launch.rs): the bounds cap registers at 128 a thread, for two blocks an SM.
#define HEAD_THREADS 256
#define HEAD_BLOCKS_PER_SM 2
#define HEAD_ROWS 2
#define HEAD_CHUNKS 10

// An L2 policy that evicts these lines first: each head row is read once a step.
__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}

// Streaming 16-byte load: not kept in L1, first out of L2.
__device__ __forceinline__ uint4 load_stream(const void* p, uint64_t policy) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(policy));
    return v;
}

// The dot product of one 16-byte chunk of T values with its f32 inputs x (16-byte aligned).
__device__ __forceinline__ float dot_chunk(uint4 w, const float* x, const float*) {
    const float4 a = *reinterpret_cast<const float4*>(x);
    return __uint_as_float(w.x) * a.x + __uint_as_float(w.y) * a.y + __uint_as_float(w.z) * a.z +
           __uint_as_float(w.w) * a.w;
}
__device__ __forceinline__ float bf16_pair_dot(uint32_t w, float a, float b) {
    // bf16 to f32 is exact: the bits shifted into the high half.
    return __uint_as_float(w << 16) * a + __uint_as_float(w & 0xffff0000u) * b;
}
__device__ __forceinline__ float dot_chunk(uint4 w, const float* x, const __nv_bfloat16*) {
    const float4 a = *reinterpret_cast<const float4*>(x);
    const float4 b = *reinterpret_cast<const float4*>(x + 4);
    return bf16_pair_dot(w.x, a.x, a.y) + bf16_pair_dot(w.y, a.z, a.w) + bf16_pair_dot(w.z, b.x, b.y) +
           bf16_pair_dot(w.w, b.z, b.w);
}
__device__ __forceinline__ float half_pair_dot(uint32_t w, float a, float b) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    return f.x * a + f.y * b;
}
__device__ __forceinline__ float dot_chunk(uint4 w, const float* x, const __half*) {
    const float4 a = *reinterpret_cast<const float4*>(x);
    const float4 b = *reinterpret_cast<const float4*>(x + 4);
    return half_pair_dot(w.x, a.x, a.y) + half_pair_dot(w.y, a.z, a.w) + half_pair_dot(w.z, b.x, b.y) +
           half_pair_dot(w.w, b.z, b.w);
}

template <typename T>
__device__ void lm_head(const T* x, const T* delta, const T* gamma, float eps, const T* w, int vocab, int hidden,
                        T* logits, uint32_t* counter, uint32_t* partial, uint32_t* token, Feedback fb) {
    extern __shared__ float4 smem4[];
    float* y = reinterpret_cast<float*>(smem4);
    __shared__ float red[32];
    __shared__ uint32_t red_i[32];
    constexpr int V = 16 / sizeof(T);
    const int lane = threadIdx.x & 31;
    const int warps = gridDim.x * (HEAD_THREADS / 32);
    const int warp = blockIdx.x * (HEAD_THREADS / 32) + (threadIdx.x >> 5);
    const int chunks = hidden / V;
    const uint4* rows = reinterpret_cast<const uint4*>(w);

    const uint64_t policy = evict_first_policy();
    uint4 buf[HEAD_ROWS][HEAD_CHUNKS];
    // Chunks j0 + lane + 32 u of rows r0 + r into buf (zeros past the row or the matrix).
    auto request = [&](long long r0, int j0) {
#pragma unroll
        for (int r = 0; r < HEAD_ROWS; ++r)
#pragma unroll
            for (int u = 0; u < HEAD_CHUNKS; ++u) {
                const int j = j0 + lane + 32 * u;
                buf[r][u] = (r0 + r < vocab && j < chunks) ? load_stream(rows + (r0 + r) * chunks + j, policy)
                                                           : make_uint4(0u, 0u, 0u, 0u);
            }
    };
    long long r0 = (long long)warp * HEAD_ROWS;
    request(r0, 0);

    pdl_wait();
    // the final norm, every block for itself (the row is a few KB, read from L2)
    float ss = 0.f;
    for (int c = threadIdx.x; c < hidden; c += HEAD_THREADS) {
        const float s = delta != nullptr ? round_t<T>(to_f(x[c]) + to_f(delta[c])) : to_f(x[c]);
        y[c] = s;
        ss += s * s;
    }
    ss = block_reduce<false>(ss, red);
    const float scale = rsqrtf(ss / (float)hidden + eps);
    for (int c = threadIdx.x; c < hidden; c += HEAD_THREADS) y[c] = round_t<T>(scale * y[c] * to_f(gamma[c]));
    __syncthreads();

    float bv = -INFINITY;
    uint32_t bi = 0xffffffffu;
    for (; r0 < vocab; r0 += (long long)warps * HEAD_ROWS) {
        float acc[HEAD_ROWS];
#pragma unroll
        for (int r = 0; r < HEAD_ROWS; ++r) acc[r] = 0.f;
        for (int j0 = 0; j0 < chunks; j0 += 32 * HEAD_CHUNKS) {
            if (j0 > 0) request(r0, j0);
#pragma unroll
            for (int u = 0; u < HEAD_CHUNKS; ++u) {
                const int j = j0 + lane + 32 * u;
                if (j < chunks) {
#pragma unroll
                    for (int r = 0; r < HEAD_ROWS; ++r) acc[r] += dot_chunk(buf[r][u], y + j * V, (const T*)nullptr);
                }
            }
        }
        // the next rows' first chunks in flight while these are summed
        const long long next = r0 + (long long)warps * HEAD_ROWS;
        if (next < vocab) request(next, 0);
#pragma unroll
        for (int r = 0; r < HEAD_ROWS; ++r) {
            const float logit = round_t<T>(warp_sum(acc[r]));
            const long long row = r0 + r;
            if (row < vocab) {
                if (lane == 0 && logits != nullptr) logits[row] = from_f<T>(logit);
                if (better(logit, (uint32_t)row, bv, bi)) { bv = logit; bi = (uint32_t)row; }
            }
        }
    }
    block_argmax(bv, bi, red, red_i);
    argmax_commit(bv, bi, counter, partial, token, fb, red, red_i);
}

#define HEAD_KERNEL(T, SFX)                                                                                        \
    extern "C" __global__ void __launch_bounds__(HEAD_THREADS, HEAD_BLOCKS_PER_SM) lm_head_##SFX(                 \
        const T* x, const T* delta, const T* gamma, float eps, const T* w, int vocab, int hidden, T* logits,      \
        uint32_t* counter, uint32_t* partial, uint32_t* token, uint32_t* next_id, uint32_t* pos,                  \
        uint32_t* tokens, uint32_t first, uint32_t len) {                                                          \
        lm_head<T>(x, delta, gamma, eps, w, vocab, hidden, logits, counter, partial, token,                      \
                   Feedback{next_id, pos, tokens, first, len});                                                    \
    }

HEAD_KERNEL(float, f32)
HEAD_KERNEL(__nv_bfloat16, bf16)
HEAD_KERNEL(__half, f16)
