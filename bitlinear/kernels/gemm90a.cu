// Large-M matmul on Hopper warpgroup MMAs (wgmma, sm_90a): y (M, N) = x_q (M, K) . W_q (N, K)^T.
// The default large-M kernel on compute capability 9.0 (tile table in src/cuda/mod.rs); bit-exact
// in gpu_check. Times: bench/RESULTS.md. (ncu on an H200, M=N=K=4096: the staged epilogue below
// took the kernel from 201 to 154 us; its 128 scattered 2-byte stores per thread had taken ~28% of
// the warps' time.)
//
// Data layout: same inputs as gemm.cu (k-permuted, zero-padded int8 activations Xp (M, ld), their
// row sums, packed weights with a 16-byte multiple row stride K4s).
//
// Tiling: CTA tile 128 (M) x 256 (N), k tile 128, 4 shared-memory stages of 48 KB:
//   * A stage: 128 rows x 128 bytes of Xp, copied with cp.async into the canonical K-major
//     128-byte-swizzled layout (row r at (r/8)*1024 + (r%8)*128, 16-byte chunk c stored at chunk
//     c ^ (r%8)); 1024-byte aligned, so the hardware's address swizzle matches.
//   * B stage: 256 weight rows x 128 int8 codes in the same swizzled layout, written by the
//     threads: each thread loads 2 x 16 packed bytes (one prefetch tile ahead, in registers),
//     decodes every 32-bit word (16 codes of one 16-k group) into the 16-byte chunk
//     [(w >> 0) & 0x03030303, (w >> 2) & .., (w >> 4) & .., (w >> 6) & ..], which is that group in
//     the permuted k order of the activations (common.cuh), and stores it.
//   * 2 warpgroups (256 threads); warpgroup w computes rows 64w..64w+63 x 256 columns with four
//     wgmma.m64n256k32.s32.s8.s8 per k tile (descriptors advance 32 bytes along the swizzled row),
//     128 s32 accumulators per thread. Codes are unsigned (0,1,2); the epilogue subtracts the row
//     sum of x (sum x (c - 1) = sum x c - sum x), then applies (acc * s_x) * s_w.
//   * per k tile kt, one barrier: wait for this tile's cp.async group, fence.proxy.async
//     (generic-proxy writes -> async proxy), barrier, issue the wgmmas, fill the stage of tile
//     kt - 2 with tile kt + 2 (A by cp.async, B by decode + st.shared), request the packed
//     bytes of tile kt + 3, then wait until this warpgroup's wgmmas of tile kt - 1 are done.
//     Tiles are thus loaded two ahead and the stage of tile kt - 1, which MMAs in flight may
//     still read, is never written. (Against the earlier two-barrier loop that refilled the
//     stage of kt - 1 after waiting for its MMAs: 4096^3 179 -> 172 us on an H200.) Every
//     thread's copy addresses, masks and stage offsets are computed once, before the k loop,
//     and pinned in registers inside it.
//   * epilogue: each thread dequantizes its fragment and writes it (pairs of columns) into the
//     then free stage memory as a 128 x 256 tile of OT (rows padded by 16 or 32 bytes: the
//     fragment writes are conflict-free); after a barrier, the 256 threads copy whole 16-byte
//     chunks of tile rows to y (a warp writes 512 or 1024 contiguous bytes), with element stores
//     only at the right edge or when N * sizeof(OT) is not a multiple of 16.
#include "common.cuh"
#include "wgmma.cuh"

#define WG_BM 128
#define WG_BN 256
#define WG_BK 128
#define WG_STAGES 4
#define WG_A_BYTES (WG_BM * WG_BK)
#define WG_B_BYTES (WG_BN * WG_BK)
#define WG_STAGE_BYTES (WG_A_BYTES + WG_B_BYTES)

__device__ __forceinline__ int sw128(int r, int chunk) { return (r >> 3) * 1024 + (r & 7) * 128 + ((chunk ^ (r & 7)) << 4); }

template <typename OT>
__device__ void gemm_wgmma_impl(const int8_t* __restrict__ Xp, int ld, const int* __restrict__ rowsum,
                                const float* __restrict__ xscales, int per_tensor, const uint8_t* __restrict__ Wp,
                                int K4s, int M, int N, int K, float sw_val, const float* __restrict__ sw_ptr,
                                OT* __restrict__ y) {
    extern __shared__ uint8_t smem_raw[];
    // 1024-byte aligned base, as a 32-bit shared-space address for the hot loop (generic pointers
    // made the compiler emit 64-bit generic stores) and as a generic pointer for the epilogue
    const uint32_t raw_s = smem_u32(smem_raw);
    const uint32_t sbase = (raw_s + 1023u) & ~1023u;
    uint8_t* smem = smem_raw + (sbase - raw_s);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wg = warp >> 2, wq = warp & 3, g = lane >> 2, t = lane & 3;
    const int bm = blockIdx.y * WG_BM, bn = blockIdx.x * WG_BN;
    const int KT = (K + WG_BK - 1) / WG_BK;

    // Per-thread copy slots, fixed over the k loop (addresses computed once, not per tile).
    // A: 16-byte chunk (tid & 7) of tile rows (tid >> 3) + 32i, i < 4; all four share r % 8, so
    // their swizzled offsets are 4096 bytes apart.
    const int8_t* a_src[4];
    uint32_t a_ok = 0;  // bit i: row (tid >> 3) + 32i is inside the matrix
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int gm = bm + (tid >> 3) + 32 * i;
        if (gm < M) a_ok |= 1u << i;
        a_src[i] = Xp + (size_t)(gm < M ? gm : 0) * ld + (tid & 7) * 16;
    }
    uint32_t a_off = sw128(tid >> 3, tid & 7);
    // B: packed half (tid & 1) (16 bytes = 64 k) of weight rows (tid >> 1) + 128h, h < 2, decoded
    // into the 16-byte chunks w_off[u] (+ 16 KB for h = 1) of the stage's B part.
    const int w_half = tid & 1, w_r = tid >> 1;
    const uint8_t* w_src[2];
    uint32_t w_ok = 0;  // bit h: weight row w_r + 128h exists
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int gn = bn + w_r + 128 * h;
        if (gn < N) w_ok |= 1u << h;
        w_src[h] = Wp + (size_t)(gn < N ? gn : 0) * K4s + w_half * 16;
    }
    uint32_t w_off[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
        w_off[u] = (w_r >> 3) * 1024 + (w_r & 7) * 128 + (((w_half * 4 + u) ^ (w_r & 7)) << 4);

    auto load_a = [&](int kt, int slot) {
        const uint32_t a = sbase + slot * WG_STAGE_BYTES + a_off;
#pragma unroll
        for (int i = 0; i < 4; ++i) cp_async16_s(a + 4096 * i, a_src[i] + (size_t)kt * WG_BK, (a_ok >> i) & 1u);
    };
    auto load_w = [&](int kt, uint4 (&wr)[2]) {
        const int off = kt * (WG_BK / 4);
        const bool in = kt < KT && off + w_half * 16 < K4s;
#pragma unroll
        for (int h = 0; h < 2; ++h)
            wr[h] = (in && ((w_ok >> h) & 1u)) ? ldg_stream16(w_src[h] + off) : make_uint4(0u, 0u, 0u, 0u);
    };
    auto store_w = [&](int slot, const uint4 (&wr)[2]) {
        const uint32_t b = sbase + slot * WG_STAGE_BYTES + WG_A_BYTES;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint32_t w[4] = {wr[h].x, wr[h].y, wr[h].z, wr[h].w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                uint4 c;
                c.x = w[u] & 0x03030303u;
                c.y = (w[u] >> 2) & 0x03030303u;
                c.z = (w[u] >> 4) & 0x03030303u;
                c.w = (w[u] >> 6) & 0x03030303u;
                st_shared16(b + h * 16 * 1024 + w_off[u], c);
            }
        }
    };

    int acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0;

    uint4 wr[2];
    // One barrier per k tile: tiles are loaded two ahead, into the stage that tile kt - 2 used.
    // Every warpgroup waited for its MMAs of tile kt - 2 at the end of iteration kt - 1
    // (wgmma_wait<1>), before this iteration's barrier, so that stage is free; the stage of
    // tile kt - 1 may still be read by MMAs in flight and is not touched.
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        if (s < KT) {
            load_a(s, s);
            load_w(s, wr);
            store_w(s, wr);
        }
        cp_async_commit();
    }
    load_w(2, wr);
    for (int kt = 0; kt < KT; ++kt) {
        // Pin the copy addresses, masks and offsets in registers: otherwise the compiler
        // recomputes them from threadIdx every k tile (213 -> 177 instructions an iteration;
        // 4096^3 on an H100: 175 -> 160 us).
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+l"(a_src[i]));
#pragma unroll
        for (int h = 0; h < 2; ++h) asm volatile("" : "+l"(w_src[h]));
#pragma unroll
        for (int u = 0; u < 4; ++u) asm volatile("" : "+r"(w_off[u]));
        asm volatile("" : "+r"(a_ok), "+r"(w_ok), "+r"(a_off));
        const int slot = kt % WG_STAGES;
        cp_async_wait<1>();  // tile kt has landed (tile kt + 1 may be in flight)
        fence_proxy_async();
        __syncthreads();
        const uint32_t a = sbase + slot * WG_STAGE_BYTES + wg * (64 / 8) * 1024;
        const uint32_t b = sbase + slot * WG_STAGE_BYTES + WG_A_BYTES;
        fence_acc(acc);
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < WG_BK / 32; ++s) wgmma_m64n256k32(acc, gmma_desc(a + 32 * s), gmma_desc(b + 32 * s));
        wgmma_commit();
        const int nk = kt + 2;
        if (nk < KT) {
            load_a(nk, nk % WG_STAGES);
            store_w(nk % WG_STAGES, wr);
        }
        cp_async_commit();
        load_w(nk + 1, wr);
        wgmma_wait<1>();  // this warpgroup's MMAs of tile kt - 1 are done
        fence_acc(acc);
    }
    wgmma_wait<0>();
    fence_acc(acc);
    cp_async_wait<0>();
    __syncthreads();  // every warpgroup's MMAs are done with their stages: shared memory is free

    // Epilogue: dequantize in registers, stage the 128 x 256 output tile in shared memory (rows
    // padded so the fragment writes are conflict-free), then write whole 16-byte chunks of the
    // output rows (coalesced); element stores only at the right edge or for unaligned rows.
    constexpr int OB = (int)sizeof(OT);
    constexpr int ROWB = WG_BN * OB + (OB == 2 ? 16 : 32);
    static_assert(WG_BM * ROWB <= WG_STAGES * WG_STAGE_BYTES, "output tile must fit the stages");
    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
#pragma unroll
    for (int hm = 0; hm < 2; ++hm) {
        const int r = wg * 64 + wq * 16 + g + 8 * hm;
        const int m = bm + r;
        int xsum = 0;
        float sx = 0.0f;
        if (m < M) {
            xsum = rowsum[m];
            if constexpr (!std::is_same<OT, int>::value) sx = xscales[per_tensor ? 0 : m];
        }
        uint8_t* row = smem + r * ROWB;
#pragma unroll
        for (int j = 0; j < WG_BN / 8; ++j) {
            const int c = 8 * j + 2 * t;
            const int v0 = acc[4 * j + 2 * hm] - xsum, v1 = acc[4 * j + 2 * hm + 1] - xsum;
            if constexpr (std::is_same<OT, int>::value) {
                *reinterpret_cast<int2*>(row + c * OB) = make_int2(v0, v1);
            } else if constexpr (std::is_same<OT, float>::value) {
                *reinterpret_cast<float2*>(row + c * OB) = make_float2(dequant(v0, sx, sw), dequant(v1, sx, sw));
            } else {
                union { OT h[2]; uint32_t u; } p2;  // one 4-byte store for the pair
                p2.h[0] = from_f32<OT>(dequant(v0, sx, sw));
                p2.h[1] = from_f32<OT>(dequant(v1, sx, sw));
                *reinterpret_cast<uint32_t*>(row + c * OB) = p2.u;
            }
        }
    }
    __syncthreads();
    constexpr int E = 16 / OB;              // outputs per 16-byte chunk
    constexpr int CPR = WG_BN / E;          // chunks per tile row
    const bool vec = (N % E) == 0 && (((size_t)y) & 15) == 0;
#pragma unroll 4
    for (int idx = tid; idx < WG_BM * CPR; idx += 256) {
        const int r = idx / CPR, c = idx % CPR;
        const int m = bm + r, n = bn + c * E;
        if (m >= M || n >= N) continue;
        const uint8_t* src = smem + r * ROWB + c * 16;
        OT* dst = y + (size_t)m * N + n;
        if (vec && n + E <= N) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
            const OT* s = reinterpret_cast<const OT*>(src);
            for (int e = 0; e < E && n + e < N; ++e) dst[e] = s[e];
        }
    }
}

#define WG_INST(OT, ON)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256, 1)                                                     \
        gemm_wgmma_##ON(const int8_t* Xp, int ld, const int* rowsum, const float* xs, int per_tensor,        \
                        const uint8_t* Wp, int K4s, int M, int N, int K, float sw_val, const float* sw_ptr, \
                        OT* y) {                                                                             \
        pdl_wait();                                                                                 \
        gemm_wgmma_impl<OT>(Xp, ld, rowsum, xs, per_tensor, Wp, K4s, M, N, K, sw_val, sw_ptr, y);            \
    }

WG_INST(int, i32)
WG_INST(float, f32)
WG_INST(__nv_bfloat16, bf16)
WG_INST(__half, f16)
