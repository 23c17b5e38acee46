// Shared helpers for the bitlinear CUDA kernels (included by every .cu file).
//
// Numeric contract (identical to the CPU reference in src/quant.rs):
//   * activations: s_x = max(max|x|, 1e-5) / 127 (IEEE f32 division), codes
//     clamp(rint(x / s_x), -128, 127) with an IEEE division (__fdiv_rn) and round-half-to-even
//     (rintf); a row holding NaN/Inf gets s_x = NaN and all-zero codes.
//   * weights: s_w = max((float)(sum|w| in f64 / n), 1e-5f); codes clamp(rint(w / s_w), -1, 1) + 1.
//   * epilogue: y = (float(acc) * s_x) * s_w with two separate roundings (__fmul_rn, no FMA).
//
// The "k-permutation" used by the matmul kernels: inside every group of 16 consecutive k, the
// value at k = 16q + 4j + i (j, i in 0..4) is stored at position 16q + 4i + j (a 4x4 byte
// transpose). A 32-bit word of packed weights holds the 16 codes of one group (byte j = codes of
// k = 16q+4j .. 16q+4j+3, field i at bits 2i); then (word >> 2i) & 0x03030303 is exactly the four
// codes at permuted positions 4i .. 4i+3. So permuted activations (int8) and shifted/masked
// weight words line up byte for byte, and a dot product over a permuted group equals the dot
// product over the original group.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>

#define BL_ACT_EPS 1e-5f
#define BL_WEIGHT_EPS 1e-5f

// ---- programmatic dependent launch (src/cuda/launch.rs: every kernel is launched with it on
// compute capability 9.0+, so a kernel may start while the previous one of the stream runs) ----
// Every kernel calls pdl_wait() before its first global memory access: it waits until the
// previous kernel has completed and its writes are visible, so results are those of plain stream
// order. A no-op without PDL. (The one exception, the `_e` kernels of gemv.cu and `w_early` in
// skinny.cu and gemm90a.cu: weights requested before the wait where the host knows them
// complete: the previous kernel is this call's quantizer, which waited for everything before
// it, or every kernel queued before the weight's first use has finished, src/cuda/settle.rs.)
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lets the next kernel of the stream be scheduled now instead of when this one's blocks exit.
// Called after pdl_wait only, and only by the decode GEMV (at most one wave) and the activation
// quantizer ahead of the Hopper GEMM: blocks of the next kernel that start early hold SM
// resources while they wait (ahead of the skinny kernel M = 16 x 4096^2 takes 16.5 us instead of
// 12.2 on the H100: bench/RESULTS.md, Rule: activation quantizer early trigger).
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// ---- dtype conversions (exact to f32; round-to-nearest-even from f32) ----
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// ---- the scalar quantizers ----
__device__ __forceinline__ float act_scale_from_absmax(float a) {
    return __fdiv_rn(fmaxf(a, BL_ACT_EPS), 127.0f);
}
// s is never NaN here (callers handle non-finite rows).
__device__ __forceinline__ int act_code(float v, float s) {
    float q = rintf(__fdiv_rn(v, s));
    q = fminf(fmaxf(q, -128.0f), 127.0f);
    return (int)q;
}
// rint(v / s) from the reciprocal inv = 1 / s (IEEE), without a division in the common case.
// q = v * inv and fl(v / s) both lie within a relative 2^-23 of v / s, so for |q| < 256 they differ
// by < 1e-4 and round to the same integer unless q lies within 1e-4 of a half-integer, where the
// exact division decides. Larger quotients may round differently, but every caller clamps to
// [-128, 127] or tighter, and there both are clamped to the same bound.
__device__ __forceinline__ float rint_div(float v, float s, float inv) {
    const float q = v * inv;
    const float r = rintf(q);
    return (fabsf(q) < 256.0f && fabsf(q - r) > 0.4999f) ? rintf(__fdiv_rn(v, s)) : r;
}
// rintf without the (quarter-rate) conversion pipe: adding 1.5 * 2^23 leaves the round-to-
// nearest-even integer of |p| < 2^22 in the low mantissa bits, and subtracting it again gives
// that integer as a float (__fadd_rn / __fsub_rn are never contracted into an FMA). int_magic reads
// the int of an integer-valued |r| <= 2^22 the same way. Callers clamp the result to a few hundred
// at most; beyond 2^22 the rounding may differ from rintf, but such values clamp to the same bound.
#define BL_RINT_MAGIC 12582912.0f
__device__ __forceinline__ float rint_magic(float p) {
    return __fsub_rn(__fadd_rn(p, BL_RINT_MAGIC), BL_RINT_MAGIC);
}
__device__ __forceinline__ int int_magic(float r) { return __float_as_int(__fadd_rn(r, BL_RINT_MAGIC)) - 0x4B400000; }

// clamp(rint_div(f[i], s, inv), LO, HI) + OFF for 16 values, with the near-tie test made once
// per group: the common case is multiply, round (rint_magic), clamp; if any value lies within
// 1e-4 of a rounding tie (rare), all 16 take rint_div. Value by value identical to act_code
// (LO, HI, OFF = -128, 127, 0) and to ternary_code (-1, 1, 1), since rint_div rounds as the
// division does.
template <int LO, int HI, int OFF>
__device__ __forceinline__ void codes16(const float (&f)[16], float s, float inv, int (&q)[16]) {
    float r[16];
    bool tie = false;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const float p = __fmul_rn(f[i], inv);
        r[i] = rint_magic(p);
        tie |= fabsf(p - r[i]) > 0.4999f;
    }
    if (tie) {
#pragma unroll
        for (int i = 0; i < 16; ++i) r[i] = rint_div(f[i], s, inv);
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) q[i] = int_magic(fminf(fmaxf(r[i], (float)LO), (float)HI)) + OFF;
}
// act_code over 16 values, through the reciprocal inv = 1 / s.
__device__ __forceinline__ void act_codes16(const float (&f)[16], float s, float inv, int (&q)[16]) {
    codes16<-128, 127, 0>(f, s, inv, q);
}
__device__ __forceinline__ int ternary_code(float v, float s) {  // returns w_q + 1 in {0,1,2}
    float q = rintf(__fdiv_rn(v, s));
    q = fminf(fmaxf(q, -1.0f), 1.0f);
    return (int)q + 1;
}
// ternary_code over 16 values through the reciprocal (codes w_q + 1; identical results, NaN
// included).
__device__ __forceinline__ void ternary_codes16(const float (&f)[16], float s, float inv, int (&c)[16]) {
    codes16<-1, 1, 1>(f, s, inv, c);
}
// Epilogue, two f32 roundings in this order.
__device__ __forceinline__ float dequant(int acc, float sx, float sw) {
    return __fmul_rn(__fmul_rn((float)acc, sx), sw);
}

// Raw bits of the 16 values of one 16-k group of T (as 16-byte words), converted to f32 only
// when used.
template <typename T>
struct RawGroup {
    uint4 v[sizeof(T)];
};
template <typename T>
__device__ __forceinline__ void raw_to_f32(const RawGroup<T>& r, float (&f)[16]) {
    const T* e = reinterpret_cast<const T*>(r.v);
#pragma unroll
    for (int i = 0; i < 16; ++i) f[i] = to_f32(e[i]);
}

// Packs 4 int8 values (as ints) into one little-endian 32-bit word.
__device__ __forceinline__ uint32_t pack4(int a, int b, int c, int d) {
    return (uint32_t)(a & 0xff) | ((uint32_t)(b & 0xff) << 8) | ((uint32_t)(c & 0xff) << 16) |
           ((uint32_t)(d & 0xff) << 24);
}

// 16 int8 values (as ints) -> 16 bytes, in order.
__device__ __forceinline__ uint4 pack16(const int (&q)[16]) {
    return make_uint4(pack4(q[0], q[1], q[2], q[3]), pack4(q[4], q[5], q[6], q[7]), pack4(q[8], q[9], q[10], q[11]),
                      pack4(q[12], q[13], q[14], q[15]));
}
// The 16 values of a 16-k group (q[i] = value at k = 16g + i) -> 16 bytes in the k-permuted order
// above: position 4i + j holds k = 4j + i.
__device__ __forceinline__ uint4 pack16_permuted(const int (&q)[16]) {
    return make_uint4(pack4(q[0], q[4], q[8], q[12]), pack4(q[1], q[5], q[9], q[13]),
                      pack4(q[2], q[6], q[10], q[14]), pack4(q[3], q[7], q[11], q[15]));
}

// Permutes the 16 int8 codes of one group (byte k of v = code k) into the k-permuted order and
// returns them; *sum gets their sum.
__device__ __forceinline__ uint4 permute_codes16(const uint4& v, int* sum) {
    // word i of the result = byte i of v.x, v.y, v.z, v.w
    const uint32_t a01 = __byte_perm(v.x, v.y, 0x5140), a23 = __byte_perm(v.z, v.w, 0x5140);
    const uint32_t b01 = __byte_perm(v.x, v.y, 0x7362), b23 = __byte_perm(v.z, v.w, 0x7362);
    int t = __dp4a((int)v.x, 0x01010101, 0);
    t = __dp4a((int)v.y, 0x01010101, t);
    t = __dp4a((int)v.z, 0x01010101, t);
    *sum = __dp4a((int)v.w, 0x01010101, t);
    return make_uint4(__byte_perm(a01, a23, 0x5410), __byte_perm(a01, a23, 0x7632), __byte_perm(b01, b23, 0x5410),
                      __byte_perm(b01, b23, 0x7632));
}

// ---- block reductions (fixed tree => deterministic) ----
template <int NT>
__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();  // protect red from a previous use
    if (l == 0) red[w] = v;
    __syncthreads();
    v = (l < NT / 32) ? red[l] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;  // valid in every thread
}

// Block-wide max of unsigned values (every thread gets it).
template <int NT>
__device__ __forceinline__ unsigned block_max_u32(unsigned v, unsigned* red) {
    v = __reduce_max_sync(0xffffffffu, v);
    __syncthreads();  // protect red from a previous use
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    unsigned r = red[0];
#pragma unroll
    for (int w = 1; w < NT / 32; ++w) r = max(r, red[w]);
    return r;
}

// ---- tensor-core and async-copy wrappers (sm_80+) ----
// A generic pointer into shared memory as a 32-bit shared-space address.
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
// D = A(16x32, s8, row) * B(32x8, s8, col) + D, s32 accumulators.
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* smem_ptr) {
    const uint32_t a = smem_u32(smem_ptr);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a));
}

// 16-byte async copy global->shared; when !valid the destination is zero-filled (src-size 0).
__device__ __forceinline__ void cp_async16(void* smem_ptr, const void* gptr, bool valid) {
    const uint32_t s = smem_u32(smem_ptr);
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gptr), "r"(n));
}
// The same copy to a 32-bit shared-space address (no generic-pointer arithmetic in hot loops).
__device__ __forceinline__ void cp_async16_s(uint32_t saddr, const void* gptr, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gptr), "r"(n));
}
// 16-byte store to a 32-bit shared-space address.
__device__ __forceinline__ void st_shared16(uint32_t saddr, uint4 v) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(saddr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}
// 16-byte load from a 32-bit shared-space address.
__device__ __forceinline__ uint4 ld_shared16(uint32_t a) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
    return v;
}
// ---- bulk (TMA-engine) copies completing on an mbarrier (sm_90+) ----
// A bulk copy does not go through the SM's load pipeline, so it does not queue behind (or in
// front of) the threads' own global loads.
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the async proxy
#endif
}
// Arrival on the mbarrier at shared-space address `bar` that also announces `bytes` of
// bulk-copy data to come (the phase completes once they have landed).
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// Announces `bytes` of bulk-copy data to come on the mbarrier at shared-space address `bar`,
// without an arrival.
__device__ __forceinline__ void mbar_expect_tx_only(uint32_t bar, uint32_t bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// Plain arrival on the mbarrier at shared-space address `bar`.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// Arrival announcing `bytes` of bulk-copy data, then the copy of `bytes` (a multiple of 16;
// both addresses 16-byte aligned) from global memory to shared memory.
__device__ __forceinline__ void bulk_load_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if __CUDA_ARCH__ >= 900
    mbar_expect_tx(smem_u32(bar), bytes);
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
#endif
}
// Waits until the mbarrier's phase with this parity has completed (bar: shared-space address).
__device__ __forceinline__ void mbar_wait_s(uint32_t bar, uint32_t parity) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) { mbar_wait_s(smem_u32(bar), parity); }

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Streaming 16-byte global load that does not pollute L1 (weights are read once).
__device__ __forceinline__ uint4 ldg_stream16(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// Output store for the float epilogue.
template <typename OT> __device__ __forceinline__ void store_out(OT* y, size_t idx, float v) {
    y[idx] = from_f32<OT>(v);
}
// Two consecutive outputs y[idx], y[idx + 1] as one 4-byte (16-bit OT) or 8-byte store; idx must
// be even (y itself is at least 8-byte aligned).
template <typename OT> __device__ __forceinline__ void store_pair(OT* y, size_t idx, OT a, OT b) {
    using W = typename std::conditional<sizeof(OT) == 2, uint32_t, uint2>::type;
    union {
        OT h[2];
        W w;
    } p;
    p.h[0] = a;
    p.h[1] = b;
    *reinterpret_cast<W*>(y + idx) = p.w;
}
