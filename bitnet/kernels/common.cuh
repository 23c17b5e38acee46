// Device helpers shared by decode.cu and head.cu (each compiled to its own PTX module): dtype
// conversions, warp and block reductions, the greedy argmax's reductions and the step's token
// feedback. Float math is f32; T (f32, bf16 or f16) only rounds what is stored.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// Rounds through T and back: the value the tensor ops would have stored.
template <typename T> __device__ __forceinline__ float round_t(float v) { return to_f(from_f<T>(v)); }

// 8 consecutive elements as f32 (16-byte aligned for 2-byte types, 32 for f32).
__device__ __forceinline__ void load8(const float* p, float* o) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
template <typename H> __device__ __forceinline__ void load8(const H* p, float* o) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const H* h = reinterpret_cast<const H*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = to_f(h[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or max) over the block; every thread gets the result. `red` holds 32 floats.
template <bool MAX> __device__ float block_reduce(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads(); // `red` may still be read by a previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < warps ? red[lane] : (MAX ? -INFINITY : 0.f);
    return MAX ? warp_max(v) : warp_sum(v);
}

// Programmatic dependent launch: wait for the previous kernel of the stream (its writes visible).
// A no-op when the kernel was launched without it or below compute capability 9.0.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// ---- greedy argmax: the index of the first maximum, NaN never picked (the host's sampler) ----
__device__ __forceinline__ bool better(float v, uint32_t i, float bv, uint32_t bi) {
    // NaN never wins (comparisons with it are false); equal values go to the lower index.
    return v > bv || (v == bv && i < bi);
}

// The block's best (value, index) in every thread's bv / bi; red_v / red_i hold 32 entries.
__device__ void block_argmax(float& bv, uint32_t& bi, float* red_v, uint32_t* red_i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, bv, o);
        const uint32_t i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(v, i, bv, bi)) { bv = v; bi = i; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads(); // red_v / red_i may still be read by a previous reduction
    if (lane == 0) { red_v[warp] = bv; red_i[warp] = bi; }
    __syncthreads();
    bv = lane < warps ? red_v[lane] : -INFINITY;
    bi = lane < warps ? red_i[lane] : 0xffffffffu;
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, bv, o);
        const uint32_t i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(v, i, bv, bi)) { bv = v; bi = i; }
    }
}

// Where a decode step feeds its greedy token to the next one on the device (a CUDA graph replayed
// back to back, src/graph.rs): next_id = the token (the next step's input id), *pos += 1, and
// tokens[*pos - first] = the token when that index is below len (mapped host memory the host
// reads once the step's event completed). next_id null: no feedback.
struct Feedback {
    uint32_t* next_id;
    uint32_t* pos;
    uint32_t* tokens;
    uint32_t first;
    uint32_t len;
};

// Called by every thread of every block with its block's candidate (any thread's copy after
// block_argmax): block b stores it in partial[2b, 2b + 1]; the block that finishes last (an atomic
// count on `counter`, one u32, zero between calls, reset here) reduces all of them into out[0]
// (0xffffffff if every value was NaN) and applies `fb`.
__device__ void argmax_commit(float bv, uint32_t bi, uint32_t* counter, uint32_t* partial, uint32_t* out,
                              Feedback fb, float* red_v, uint32_t* red_i) {
    __shared__ bool last;
    if (threadIdx.x == 0) {
        partial[2 * blockIdx.x] = __float_as_uint(bv);
        partial[2 * blockIdx.x + 1] = bi;
        __threadfence();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    bv = -INFINITY;
    bi = 0xffffffffu;
    for (int b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
        const float v = __uint_as_float(__ldcg(partial + 2 * b));
        const uint32_t i = __ldcg(partial + 2 * b + 1);
        if (better(v, i, bv, bi)) { bv = v; bi = i; }
    }
    block_argmax(bv, bi, red_v, red_i);
    if (threadIdx.x == 0) {
        // Every value NaN: no index ever won (a -inf maximum still has one).
        out[0] = bi;
        if (fb.next_id != nullptr) {
            const uint32_t p = *fb.pos;
            fb.next_id[0] = bi;
            *fb.pos = p + 1;
            if (p - fb.first < fb.len) {
                fb.tokens[p - fb.first] = bi;
                __threadfence_system();
            }
        }
        *counter = 0u;
    }
}
