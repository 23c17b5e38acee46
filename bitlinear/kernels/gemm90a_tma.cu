// Large-M matmul on Hopper (sm_90a), warp-specialized: TMA copies, weights decoded straight into
// the wgmma A registers. y (M, N) = x_q (M, K) . W_q (N, K)^T, computed as its transpose
// D (N tile, M tile) = W (A operand, registers) . Xp^T (B operand, shared memory), so that the
// ternary codes never pass through shared memory as int8.
//
// Data layout: the inputs of gemm90a.cu: k-permuted, zero-padded int8 activations Xp (M, ld),
// ld a multiple of 128, and their row sums; packed weights (N, K4s), K4s a multiple of 16.
// Both are read through TMA tensor maps built by the host (src/cuda/tma.rs):
//   * Xp: box 256 rows x 128 bytes, 128-byte swizzle (row r at r * 128, 16-byte chunk c at chunk
//     c ^ (r % 8): the layout the wgmma B descriptor expects); rows past M are zero-filled.
//   * W: box 128 rows x 32 packed bytes (128 k), no swizzle; rows past N and bytes past K4s are
//     zero-filled (codes 0 there meet zero activations).
//
// Tiling: CTA tile 128 weight rows (N) x 256 tokens (M), k tile 128, 5 stages of 36 KB
// (32 KB Xp + 4 KB W), each with a "full" and an "empty" mbarrier. 288 threads:
//   * warp 8 (producer), lane 0: for every k tile, waits until its stage is empty, announces
//     36 KB on the stage's full barrier and issues the two TMA copies.
//   * warps 0-7 (two consumer warpgroups; warpgroup w owns weight rows 64w .. 64w + 63): per k
//     tile, wait for the full barrier, load the thread's two weight rows (g and g + 8 of its warp's
//     16) as 2 x 32 packed bytes, and build the A fragments of the four k32 steps:
//     (word >> 2t) & 0x03030303 is the four codes at permuted positions 4t .. 4t + 3 of that
//     word's 16-k group (common.cuh), exactly the k slots lane t holds in mma.m16n8k32's A layout.
//     Then four wgmma.m64n256k32 (A registers, B = the stage's Xp through a descriptor advancing
//     32 bytes a step), commit, and wait until the previous tile's MMAs are done; lane 0 of each
//     warp then releases that tile's stage. The A registers alternate between two sets (the k
//     loop is unrolled twice) because MMAs in flight still read the previous set.
//   * epilogue: codes are unsigned (0, 1, 2), so y = (acc - rowsum(x)) * s_x * s_w. The
//     consumers stage the 256 row sums and scales, write the dequantized tile transposed into
//     the free stage memory as 256 token rows x 128 outputs (rows padded by 16 bytes: the
//     writes are conflict-free), then copy whole 16-byte chunks of output rows to y.
#include "common.cuh"
#include "wgmma.cuh"

#define TM_BN 128                                // weight rows per CTA tile (2 warpgroups x 64)
#define TM_BM 256                                // tokens per CTA tile (wgmma N)
#define TM_BK 128                                // k per stage
#define TM_X_BYTES (TM_BM * TM_BK)               // swizzled int8 activations
#define TM_W_BYTES (TM_BN * TM_BK / 4)           // packed weights
#define TM_STAGE_BYTES (TM_X_BYTES + TM_W_BYTES)  // a multiple of 1024 (swizzle alignment)
#define TM_EP_ROWS 128                           // tokens per epilogue pass (half a tile)

// Shared memory: the stages, the epilogue buffer (TM_EP_ROWS token rows of TM_BN outputs, padded
// by 16 bytes), 2 x stages mbarriers, then (row sum, scale) of the tile's 256 tokens. Stages: 5
// for 2-byte outputs, 4 for 4-byte outputs (227 KB per block). The host computes the same size.
template <typename OT> struct TmaSmem {
    static constexpr int OB = (int)sizeof(OT);
    static constexpr int STAGES = OB == 2 ? 5 : 4;
    static constexpr int EP_ROWB = TM_BN * OB + 16;
    static constexpr int EP = STAGES * TM_STAGE_BYTES;
    static constexpr int BARS = EP + TM_EP_ROWS * EP_ROWB;
    static constexpr int SCALES = BARS + 16 * STAGES;
    static constexpr int BYTES = SCALES + 8 * TM_BM;
};

// The host's CUtensorMap (opaque, 128 bytes), passed by value as a __grid_constant__ parameter.
struct alignas(64) TensorMap {
    uint64_t opaque[16];
};

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// 2D tile copy global -> shared through a tensor map; completes `bar`'s transaction bytes.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TensorMap* map, int c0, int c1, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}
__device__ __forceinline__ uint4 ld_shared16(uint32_t a) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
    return v;
}
// Moves registers from the producer warpgroup (which needs few) to the consumers (accumulators,
// two A sets): 384 threads start with 168 registers each.
template <int R> __device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R> __device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
// Barrier for the 256 consumer threads only (the producer warpgroup has exited).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

template <typename OT>
__device__ void gemm_tma_impl(const TensorMap* tmx, const TensorMap* tmw, const int* __restrict__ rowsum,
                              const float* __restrict__ xscales, int per_tensor, int M, int N, int KT, float sw_val,
                              const float* __restrict__ sw_ptr, OT* __restrict__ y) {
    using L = TmaSmem<OT>;
    constexpr int STAGES = L::STAGES;
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw_s = smem_u32(smem_raw);
    const uint32_t sbase = (raw_s + 1023u) & ~1023u;
    uint8_t* smem = smem_raw + (sbase - raw_s);
    const uint32_t full = sbase + L::BARS;  // STAGES mbarriers, then as many "empty" ones
    const uint32_t empty = full + 8 * STAGES;
    int2* tok = reinterpret_cast<int2*>(smem + L::SCALES);  // (row sum, scale bits) per token
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int tiles_n = (N + TM_BN - 1) / TM_BN;
    const int tiles = tiles_n * ((M + TM_BM - 1) / TM_BM);

    if (tid == 0) {
        uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L::BARS);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bars + s, 1);           // the producer's arrival (+ the copies' bytes)
            mbar_init(bars + STAGES + s, 8);  // one arrival per consumer warp
        }
    }
    __syncthreads();
    pdl_wait();

    if (warp >= 8) {  // producer warpgroup: one thread issues the copies, running ahead across tiles
        setmaxnreg_dec<40>();
        if (warp == 8 && lane == 0) {
            int it = 0;  // k tiles issued so far by this CTA
            for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
                const int bn = (tile % tiles_n) * TM_BN, bm = (tile / tiles_n) * TM_BM;
                for (int kt = 0; kt < KT; ++kt, ++it) {
                    const int s = it % STAGES;
                    if (it >= STAGES) mbar_wait_s(empty + 8 * s, ((it / STAGES) - 1) & 1);
                    const uint32_t dst = sbase + s * TM_STAGE_BYTES;
                    mbar_expect_tx(full + 8 * s, TM_STAGE_BYTES);
                    tma_load_2d(dst, tmx, kt * TM_BK, bm, full + 8 * s);
                    tma_load_2d(dst + TM_X_BYTES, tmw, kt * (TM_BK / 4), bn, full + 8 * s);
                }
            }
        }
        return;
    }

    setmaxnreg_inc<232>();
    const int wg = warp >> 2, wq = warp & 3, g = lane >> 2, t = lane & 3;
    const int wrow = wg * 64 + wq * 16;                       // the warp's first weight row in the tile
    const uint32_t w_off = TM_X_BYTES + (wrow + g) * (TM_BK / 4);  // row g; row g + 8 is 256 bytes on
    const int sh = 2 * t;
    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
    // Packed words of the thread's rows g and g + 8 in the current k tile (word i = 16 k).
    uint32_t w0[8], w1[8];
    auto load_words = [&](int it) {
        const int s = it % STAGES;
        mbar_wait_s(full + 8 * s, (it / STAGES) & 1);
        const uint32_t a = sbase + s * TM_STAGE_BYTES + w_off;
        const uint4 r0l = ld_shared16(a), r0h = ld_shared16(a + 16);
        const uint4 r1l = ld_shared16(a + 256), r1h = ld_shared16(a + 272);
        w0[0] = r0l.x, w0[1] = r0l.y, w0[2] = r0l.z, w0[3] = r0l.w, w0[4] = r0h.x, w0[5] = r0h.y, w0[6] = r0h.z,
        w0[7] = r0h.w;
        w1[0] = r1l.x, w1[1] = r1l.y, w1[2] = r1l.z, w1[3] = r1l.w, w1[4] = r1h.x, w1[5] = r1h.y, w1[6] = r1h.z,
        w1[7] = r1h.w;
    };
    // A fragments of the four k32 steps of a tile.
    uint32_t a[4][4];
    auto decode = [&](int ks) {
        a[ks][0] = (w0[2 * ks] >> sh) & 0x03030303u;
        a[ks][1] = (w1[2 * ks] >> sh) & 0x03030303u;
        a[ks][2] = (w0[2 * ks + 1] >> sh) & 0x03030303u;
        a[ks][3] = (w1[2 * ks + 1] >> sh) & 0x03030303u;
    };
    auto release = [&](int it) {
        if (lane == 0) mbar_arrive(empty + 8 * (it % STAGES));
    };

    int it0 = 0;  // this CTA's k tiles consumed before the current tile
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, it0 += KT) {
        const int bn = (tile % tiles_n) * TM_BN, bm = (tile / tiles_n) * TM_BM;
        int acc[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0;
        // One commit group per k32 step with at most three in flight (wait<2>), as CUTLASS's
        // register-A mainloop does: the fragments of step ks + 1 are built while those of ks - 1
        // and ks may still be read, and their registers were last read three groups ago.
        load_words(it0);
        decode(0);
        fence_acc(acc);
        for (int kt = 0; kt < KT; ++kt) {
            const uint32_t st = sbase + ((it0 + kt) % STAGES) * TM_STAGE_BYTES;
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) {
                if (ks < 3) {
                    decode(ks + 1);
                } else if (kt + 1 < KT) {
                    load_words(it0 + kt + 1);
                    decode(0);
                }
                wgmma_fence();
                wgmma_m64n256k32_rs(acc, a[ks][0], a[ks][1], a[ks][2], a[ks][3], gmma_desc(st + 32 * ks));
                wgmma_commit();
                wgmma_wait<2>();
                // k tile kt - 1's MMAs are all done: its stage goes back to the producer
                if (ks == 1 && kt > 0) release(it0 + kt - 1);
            }
        }
        wgmma_wait<0>();
        fence_acc(acc);
        release(it0 + KT - 1);

        // Epilogue: codes are unsigned, so y = (acc - rowsum(x)) * s_x * s_w.
        consumers_sync();  // the previous tile's epilogue is done with `tok` and the buffer
        {
            const int m = bm + tid;
            const float sx = (m < M && !std::is_same<OT, int>::value) ? xscales[per_tensor ? 0 : m] : 0.0f;
            tok[tid] = make_int2(m < M ? rowsum[m] : 0, __float_as_int(sx));
        }
        consumers_sync();
        auto value = [&](int j, int hm, int e) -> float {
            const int2 ts = tok[8 * j + 2 * t + e];
            return dequant(acc[4 * j + 2 * hm + e] - ts.x, __int_as_float(ts.y), sw);
        };
#pragma unroll
        for (int h = 0; h < TM_BM / TM_EP_ROWS; ++h) {
            if (h > 0) consumers_sync();  // the previous pass's copy-out has read the buffer
            // dequantize tokens 128h .. 128h + 127 into the buffer, transposed (token rows)
            if constexpr (L::OB == 2) {
                // stmatrix .trans: matrix q of the x4 is (j + q / 2, rows 8 (q % 2) .. of the warp's
                // 16); lane 8q + r gives the address of its token row r.
                const int q = lane >> 3, r = lane & 7;
#pragma unroll
                for (int j = 16 * h; j < 16 * h + 16; j += 2) {
                    uint32_t v[4];
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int jj = j + (i >> 1), hm = i & 1;
                        union { OT h2[2]; uint32_t u; } p;
                        p.h2[0] = from_f32<OT>(value(jj, hm, 0));
                        p.h2[1] = from_f32<OT>(value(jj, hm, 1));
                        v[i] = p.u;
                    }
                    const int ml = 8 * (j + (q >> 1)) + r - TM_EP_ROWS * h;
                    const uint32_t addr = sbase + L::EP + ml * L::EP_ROWB + (wrow + 8 * (q & 1)) * 2;
                    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
                                 "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
                                 : "memory");
                }
            } else {
#pragma unroll
                for (int j = 16 * h; j < 16 * h + 16; ++j) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        uint8_t* row = smem + L::EP + (8 * j + 2 * t + e - TM_EP_ROWS * h) * L::EP_ROWB;
#pragma unroll
                        for (int hm = 0; hm < 2; ++hm) {
                            OT* dst = reinterpret_cast<OT*>(row) + wrow + g + 8 * hm;
                            if constexpr (std::is_same<OT, int>::value) {
                                *dst = acc[4 * j + 2 * hm + e] - tok[8 * j + 2 * t + e].x;
                            } else {
                                *dst = value(j, hm, e);
                            }
                        }
                    }
                }
            }
            consumers_sync();
            // copy whole 16-byte chunks of the token rows to y
            constexpr int E = 16 / L::OB;   // outputs per chunk
            constexpr int CPR = TM_BN / E;  // chunks per row
            const bool vec = (N % E) == 0 && (((size_t)y) & 15) == 0;
#pragma unroll 4
            for (int idx = tid; idx < TM_EP_ROWS * CPR; idx += 256) {
                const int r = idx / CPR, c = idx % CPR;
                const int m = bm + TM_EP_ROWS * h + r, n = bn + c * E;
                if (m >= M || n >= N) continue;
                const uint8_t* src = smem + L::EP + r * L::EP_ROWB + c * 16;
                OT* dst = y + (size_t)m * N + n;
                if (vec && n + E <= N) {
                    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
                } else {
                    const OT* sp = reinterpret_cast<const OT*>(src);
                    for (int e = 0; e < E && n + e < N; ++e) dst[e] = sp[e];
                }
            }
        }
    }
}

#define TM_INST(OT, ON)                                                                                        \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                       \
        gemm_tma_##ON(const __grid_constant__ TensorMap tmx, const __grid_constant__ TensorMap tmw,            \
                      const int* rowsum, const float* xs, int per_tensor, int M, int N, int KT, float sw_val, \
                      const float* sw_ptr, OT* y) {                                                            \
        gemm_tma_impl<OT>(&tmx, &tmw, rowsum, xs, per_tensor, M, N, KT, sw_val, sw_ptr, y);                    \
    }

TM_INST(int, i32)
TM_INST(float, f32)
TM_INST(__nv_bfloat16, bf16)
TM_INST(__half, f16)
