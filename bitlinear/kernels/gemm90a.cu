// Large-M matmul on Hopper (sm_90a), warp-specialized: TMA copies, weights decoded straight into
// the wgmma A registers. y (M, N) = x_q (M, K) . W_q (N, K)^T, computed as its transpose
// D (N tile, M tile) = W (A operand, registers) . Xp^T (B operand, shared memory), so that the
// ternary codes never pass through shared memory as int8.
//
// Data layout: the inputs of gemm.cu: k-permuted, zero-padded int8 activations Xp (M, ld), ld a
// multiple of 128, and their row sums; packed weights (N, K4s), K4s a multiple of 16.
// Both are read through TMA tensor maps built by the host (src/cuda/tma.rs):
//   * Xp: box BT rows x 128 bytes, 128-byte swizzle (row r at r * 128, 16-byte chunk c at chunk
//     c ^ (r % 8): the layout the wgmma B descriptor expects); rows past M are zero-filled.
//   * W: box BN rows x 32 packed bytes (128 k), no swizzle; rows past N and bytes past K4s are
//     zero-filled (codes 0 there meet zero activations).
//
// Output: y (M, N) row-major; where its rows are 16-byte aligned (N * sizeof(OT) % 16 == 0) it
// is written by TMA stores through a third map (y as a byte matrix, box EP_ROWS rows x 128 bytes,
// 128-byte swizzle; the unit clips rows past M and columns past N). Split-K kernels instead add
// i32 partial sums into a zeroed (M, N) workspace by TMA reduce-add (an s32 map), and
// splitk_epilogue (gemm.cu) dequantizes it.
//
// Tiling: CTA tile 64 x WGS weight rows (N; WGS = 2 consumer warpgroups, or 1 where N is small)
// x BT tokens (M; 256, 192 where 256-token tiles leave many SMs idle in their last round, or 128
// for smaller M), k tile 128, 4 stages of 36 KB (BT = 256: 32 KB Xp + 4 KB W), 5 of 28 KB
// (BT = 192) or 6 of 20 KB (BT = 128; 18 KB with one consumer warpgroup), each with a "full" and
// an "empty" mbarrier. Persistent: one CTA per SM walks the work items w = blockIdx.x +
// i * gridDim.x: output tile w % tiles (weight-row tiles fastest), k split w / tiles.
// 128 (WGS + 1) threads:
//   * warpgroup WGS (producer; 40 registers, setmaxnreg), one thread: for every k tile of every
//     work item of the CTA, waits until its stage is empty, announces the stage's bytes on its
//     full barrier and issues the two TMA copies. It runs ahead into the next item while the
//     consumers are in the epilogue. With w_early (the host knows the previous kernel is this
//     call's activation quantizer, which waited for every earlier kernel and lets this one start
//     at once) it issues the weight copies of its first stages before pdl_wait, each announced
//     on the full barrier without an arrival, and their x copies after it.
//   * warpgroups 0 .. WGS - 1 (consumers, 232 registers; warpgroup w owns weight rows 64w ..):
//     per k tile, wait for the full barrier, load the thread's two weight rows (g and g + 8 of its
//     warp's 16) as 2 x 32 packed bytes, and build the A fragments of the four k32 steps:
//     (word >> 2t) & 0x03030303 is the four codes at permuted positions 4t .. 4t + 3 of that
//     word's 16-k group (common.cuh), exactly the k slots lane t holds in mma.m16n8k32's A layout.
//     One wgmma.m64nBTk32 per k32 step (A registers, B = the stage's Xp through a descriptor
//     advancing 32 bytes a step), each its own commit group, at most three in flight; lane 0 of
//     each warp releases a k tile's stage once its MMAs are done.
//   * epilogue: codes are unsigned (0, 1, 2), so y = (acc - rowsum(x)) * s_x * s_w. The
//     consumers stage the tile's (row sum, scale) pairs, then in passes of EP_ROWS tokens
//     dequantize into one of two epilogue buffers in the TMA's swizzled box layout (2-byte
//     outputs by stmatrix .trans, 16 x 8 outputs an instruction; the writes are conflict-free),
//     and one thread issues the TMA stores of the pass; the two buffers alternate so the next
//     pass does not wait for the store. Without TMA stores the threads copy whole 16-byte chunks
//     of the buffer's token rows to y instead (atomic adds for split-K).
#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#define TM_BK 128  // k per stage

// Shared memory for BT tokens and BN weight rows a tile: the stages (BT x 128 swizzled activation
// bytes + BN x 32 packed weight bytes each, a multiple of 1024 bytes), two epilogue buffers, 2 x
// stages mbarriers, then (row sum, scale) of the tile's BT tokens; the host computes the same
// size. An epilogue buffer holds one pass: EP_ROWS token rows x BN outputs (128 rows for 2-byte
// outputs of 256-token tiles, else 64: with one 128-row pass ptxas serializes the 128-token
// kernel's MMAs, warning C7513) as BOXES boxes of 128-byte rows (64 or 32 outputs), 128-byte
// swizzled (16-byte chunk c of row r at c ^ (r % 8)), which is what a TMA store with 128-byte
// swizzle reads and keeps the fragment writes conflict-free.
template <typename OT, int BT, int WGS> struct TmaSmem {
    static constexpr int BN = 64 * WGS;  // weight rows per CTA tile: 64 per consumer warpgroup
    static constexpr int OB = (int)sizeof(OT);
    static constexpr int X_BYTES = BT * TM_BK;
    static constexpr int STAGE_BYTES = X_BYTES + BN * TM_BK / 4;
    static constexpr int STAGES = BT == 256 ? 4 : (BT == 192 ? 5 : 6);
    static constexpr int EP_ROWS = OB == 2 && BT == 256 ? 128 : 64;
    static constexpr int PASSES = BT / EP_ROWS;
    static constexpr int BOXES = BN * OB / 128;
    static constexpr int EP_BYTES = EP_ROWS * BN * OB;
    static constexpr int EP = STAGES * STAGE_BYTES;
    static constexpr int BARS = EP + 2 * EP_BYTES;
    static constexpr int SCALES = BARS + 16 * STAGES;
    static constexpr int BYTES = SCALES + 8 * BT;
    // byte offset of output (token row r, column n of the tile) in an epilogue buffer
    __device__ static int offset(int r, int n) {
        const int b = n * OB;
        return (b >> 7) * (EP_ROWS * 128) + r * 128 + ((((b >> 4) & 7) ^ (r & 7)) << 4) + (b & 15);
    }
};

// Barrier for the consumer threads only (the producer warpgroup has exited).
template <int THREADS> __device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;\n" ::"n"(THREADS) : "memory");
}

// BT: tokens per tile (256, 192 or 128). SPLIT: the k tiles are split over `splits` work items
// per output tile, and each adds its i32 partial sums (the row sums subtracted by split 0 only)
// into y = a zeroed i32 workspace (TMA reduce-add, or atomics without TMA stores);
// splitk_epilogue (gemm.cu) dequantizes it afterwards.
template <typename OT, int BT, bool SPLIT, int WGS>
__device__ void gemm_tma_impl(const TensorMap* tmx, const TensorMap* tmw, const TensorMap* tmy, int tma_store,
                              const int* __restrict__ rowsum, const float* __restrict__ xscales, int per_tensor, int M,
                              int N, int KT, int splits, float sw_val, const float* __restrict__ sw_ptr,
                              OT* __restrict__ y, int w_early) {
    using L = TmaSmem<OT, BT, WGS>;
    constexpr int NCONS = 128 * WGS, BN = L::BN;  // consumer threads, weight rows per tile
    static_assert(L::BYTES + 1024 <= 227 * 1024, "shared memory (+ 1 KB alignment slack) must fit an SM");
    static_assert(!SPLIT || std::is_same<OT, int>::value, "split-K partial sums are i32");
    constexpr int STAGES = L::STAGES, NACC = BT / 2;
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw_s = smem_u32(smem_raw);
    const uint32_t sbase = (raw_s + 1023u) & ~1023u;
    uint8_t* smem = smem_raw + (sbase - raw_s);
    const uint32_t full = sbase + L::BARS;  // STAGES mbarriers, then as many "empty" ones
    const uint32_t empty = full + 8 * STAGES;
    int2* tok = reinterpret_cast<int2*>(smem + L::SCALES);  // (row sum, scale bits) per token
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int tiles_n = (N + BN - 1) / BN;
    const int tiles = tiles_n * ((M + BT - 1) / BT);
    // work item w: output tile w % tiles, k tiles [split * KT / splits, (split + 1) * KT / splits)
    auto item = [&](int w, int& bn, int& bm, int& split, int& kb, int& ke) {
        const int tile = w % tiles;
        split = w / tiles;
        bn = (tile % tiles_n) * BN;
        bm = (tile / tiles_n) * BT;
        kb = (int)((long long)split * KT / splits);
        ke = (int)((long long)(split + 1) * KT / splits);
    };

    if (tid == 0) {
        uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L::BARS);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bars + s, 1);           // the producer's arrival (+ the copies' bytes)
            mbar_init(bars + STAGES + s, 4 * WGS);  // one arrival per consumer warp
        }
    }
    __syncthreads();
    if (warp >= 4 * WGS) {  // producer warpgroup: one thread issues the copies, running ahead across tiles
        setmaxnreg_dec<40>();
        if (warp == 4 * WGS && lane == 0) {
            // Weights requested before pdl_wait (w_early: the previous kernel is this call's
            // activation quantizer or permuter, which let this kernel start only after its own
            // pdl_wait, so the weights were complete before it ran): the first stages of the
            // CTA's first work item, each announced on its "full" barrier without an arrival
            // (the x copy adds its bytes and arrives).
            int early = 0;
            if (w_early && blockIdx.x < tiles * splits) {
                int bn, bm, split, kb, ke;
                item(blockIdx.x, bn, bm, split, kb, ke);
                early = min(ke - kb, STAGES);
                for (int i = 0; i < early; ++i) {
                    mbar_expect_tx_only(full + 8 * i, L::STAGE_BYTES - L::X_BYTES);
                    tma_load_2d(sbase + i * L::STAGE_BYTES + L::X_BYTES, tmw, (kb + i) * (TM_BK / 4), bn,
                                full + 8 * i);
                }
            }
            pdl_wait();
            int it = 0;  // k tiles issued so far by this CTA
            for (int w = blockIdx.x; w < tiles * splits; w += gridDim.x) {
                int bn, bm, split, kb, ke;
                item(w, bn, bm, split, kb, ke);
                for (int kt = kb; kt < ke; ++kt, ++it) {
                    const int s = it % STAGES;
                    if (it >= STAGES) mbar_wait_s(empty + 8 * s, ((it / STAGES) - 1) & 1);
                    const uint32_t dst = sbase + s * L::STAGE_BYTES;
                    if (it < early) {  // the weights are on their way
                        mbar_expect_tx(full + 8 * s, L::X_BYTES);
                        tma_load_2d(dst, tmx, kt * TM_BK, bm, full + 8 * s);
                        continue;
                    }
                    mbar_expect_tx(full + 8 * s, L::STAGE_BYTES);
                    tma_load_2d(dst, tmx, kt * TM_BK, bm, full + 8 * s);
                    tma_load_2d(dst + L::X_BYTES, tmw, kt * (TM_BK / 4), bn, full + 8 * s);
                }
            }
        }
        return;
    }

    setmaxnreg_inc<232>();
    pdl_wait();
    const int wg = warp >> 2, wq = warp & 3, g = lane >> 2, t = lane & 3;
    const int wrow = wg * 64 + wq * 16;                          // the warp's first weight row in the tile
    const uint32_t w_off = L::X_BYTES + (wrow + g) * (TM_BK / 4);  // row g; row g + 8 is 256 bytes on
    const int sh = 2 * t;
    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
    // Packed words of the thread's rows g and g + 8 in the current k tile (word i = 16 k).
    uint32_t w0[8], w1[8];
    auto load_words = [&](int it) {
        const int s = it % STAGES;
        mbar_wait_s(full + 8 * s, (it / STAGES) & 1);
        const uint32_t a = sbase + s * L::STAGE_BYTES + w_off;
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

    int it0 = 0;  // this CTA's k tiles consumed before the current work item
    int ep = 0;   // this CTA's epilogue passes before the current work item
    for (int w = blockIdx.x; w < tiles * splits; w += gridDim.x) {
        int bn, bm, split, kb, ke;
        item(w, bn, bm, split, kb, ke);
        const int nk = ke - kb;
        int acc[NACC];
#pragma unroll
        for (int i = 0; i < NACC; ++i) acc[i] = 0;
        if (nk > 0) {
            // One commit group per k32 step with at most three in flight (wait<2>), as CUTLASS's
            // register-A mainloop does: the fragments of step ks + 1 are built while those of
            // ks - 1 and ks may still be read, and their registers were last read three groups ago.
            load_words(it0);
            decode(0);
            fence_acc(acc);
            for (int kt = 0; kt < nk; ++kt) {
                const uint32_t st = sbase + ((it0 + kt) % STAGES) * L::STAGE_BYTES;
#pragma unroll
                for (int ks = 0; ks < 4; ++ks) {
                    if (ks < 3) {
                        decode(ks + 1);
                    } else if (kt + 1 < nk) {
                        load_words(it0 + kt + 1);
                        decode(0);
                    }
                    wgmma_fence();
                    wgmma_rs<BT>(acc, a[ks][0], a[ks][1], a[ks][2], a[ks][3], gmma_desc(st + 32 * ks));
                    wgmma_commit();
                    wgmma_wait<2>();
                    // k tile kt - 1's MMAs are all done: its stage goes back to the producer
                    if (ks == 1 && kt > 0) release(it0 + kt - 1);
                }
            }
            wgmma_wait<0>();
            fence_acc(acc);
            release(it0 + nk - 1);
            it0 += nk;
        }

        // Epilogue: codes are unsigned, so y = (acc - rowsum(x)) * s_x * s_w.
        consumers_sync<NCONS>();  // the previous tile's epilogue is done with `tok`
        for (int i = tid; i < BT; i += NCONS) {
            const int m = bm + i;
            const float sx = (m < M && !std::is_same<OT, int>::value) ? xscales[per_tensor ? 0 : m] : 0.0f;
            tok[i] = make_int2(m < M && split == 0 ? rowsum[m] : 0, __float_as_int(sx));
        }
        auto value = [&](int j, int hm, int e) -> float {
            const int2 ts = tok[8 * j + 2 * t + e];
            return dequant(acc[4 * j + 2 * hm + e] - ts.x, __int_as_float(ts.y), sw);
        };
#pragma unroll
        for (int p = 0; p < L::PASSES; ++p) {
            // The buffers alternate over all passes of the CTA (with an odd number of passes a
            // tile, BT = 192, a tile's first pass follows the previous tile's last one in the same
            // buffer otherwise): this one was last read by the store two passes ago (at most one
            // group, the other buffer's, may still be reading) or by the threads' own copy-out.
            if (tma_store && tid == 0) bulk_wait_read<1>();
            consumers_sync<NCONS>();
            const uint32_t buf = sbase + L::EP + ((ep + p) & 1) * L::EP_BYTES;
            constexpr int JP = L::EP_ROWS / 8;  // accumulator column groups j per pass
            if constexpr (L::OB == 2) {
                // stmatrix .trans: matrix q of the x4 is (j + q / 2, rows 8 (q % 2) .. of the warp's
                // 16); lane 8q + r gives the address of its token row r.
                const int q = lane >> 3, r = lane & 7;
#pragma unroll
                for (int j = JP * p; j < JP * p + JP; j += 2) {
                    uint32_t v[4];
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int jj = j + (i >> 1), hm = i & 1;
                        union { OT h2[2]; uint32_t u; } pk;
                        pk.h2[0] = from_f32<OT>(value(jj, hm, 0));
                        pk.h2[1] = from_f32<OT>(value(jj, hm, 1));
                        v[i] = pk.u;
                    }
                    const uint32_t addr = buf + L::offset(8 * (j + (q >> 1)) + r - L::EP_ROWS * p, wrow + 8 * (q & 1));
                    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
                                 "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
                                 : "memory");
                }
            } else {
#pragma unroll
                for (int j = JP * p; j < JP * p + JP; ++j) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int r = 8 * j + 2 * t + e - L::EP_ROWS * p;
#pragma unroll
                        for (int hm = 0; hm < 2; ++hm) {
                            OT* dst = reinterpret_cast<OT*>(smem + (buf - sbase) + L::offset(r, wrow + g + 8 * hm));
                            if constexpr (std::is_same<OT, int>::value) {
                                *dst = acc[4 * j + 2 * hm + e] - tok[8 * j + 2 * t + e].x;
                            } else {
                                *dst = value(j, hm, e);
                            }
                        }
                    }
                }
            }
            if (tma_store) fence_proxy_async();  // the writes above are read by the TMA engine
            consumers_sync<NCONS>();
            const int m0 = bm + L::EP_ROWS * p;
            if (tma_store) {
                if (tid == 0) {
                    // rows past M and columns past N are clipped by the TMA unit
#pragma unroll
                    for (int b = 0; b < L::BOXES; ++b) {
                        const uint32_t src = buf + b * (L::EP_ROWS * 128);
                        if constexpr (SPLIT)
                            tma_reduce_add_2d(tmy, bn + 32 * b, m0, src);  // an s32 map: columns in elements
                        else
                            tma_store_2d(tmy, bn * L::OB + 128 * b, m0, src);  // a byte map
                    }
                    bulk_commit();
                }
            } else {
                // copy whole 16-byte chunks of the token rows to y
                constexpr int E = 16 / L::OB;   // outputs per chunk
                constexpr int CPR = BN / E;     // chunks per row
                const bool vec = (N % E) == 0 && (((size_t)y) & 15) == 0;
#pragma unroll 4
                for (int idx = tid; idx < L::EP_ROWS * CPR; idx += NCONS) {
                    const int r = idx / CPR, c = idx % CPR;
                    const int m = m0 + r, n = bn + c * E;
                    if (m >= M || n >= N) continue;
                    const uint8_t* src = smem + (buf - sbase) + L::offset(r, c * E);
                    OT* dst = y + (size_t)m * N + n;
                    const OT* sp = reinterpret_cast<const OT*>(src);
                    if constexpr (SPLIT) {
                        for (int e = 0; e < E && n + e < N; ++e) atomicAdd(dst + e, sp[e]);
                    } else if (vec && n + E <= N) {
                        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
                    } else {
                        for (int e = 0; e < E && n + e < N; ++e) dst[e] = sp[e];
                    }
                }
            }
        }
        ep += L::PASSES;
    }
    if (tma_store && tid == 0) bulk_wait<0>();  // the last stores have completed
}

#define TM_INST(NAME, OT, BT, SPLIT, WGS)                                                                    \
    extern "C" __global__ void __launch_bounds__(128 * (WGS + 1), 1)                                           \
        NAME(const __grid_constant__ TensorMap tmx, const __grid_constant__ TensorMap tmw,                     \
             const __grid_constant__ TensorMap tmy, int tma_store, const int* rowsum, const float* xs,          \
             int per_tensor, int M, int N, int KT, int splits, float sw_val, const float* sw_ptr, OT* y,        \
             int w_early) {                                                                                    \
        gemm_tma_impl<OT, BT, SPLIT, WGS>(&tmx, &tmw, &tmy, tma_store, rowsum, xs, per_tensor, M, N, KT,       \
                                          splits, sw_val, sw_ptr, y, w_early);                                 \
    }

TM_INST(gemm_tma_i32, int, 256, false, 2)
TM_INST(gemm_tma_f32, float, 256, false, 2)
TM_INST(gemm_tma_bf16, __nv_bfloat16, 256, false, 2)
TM_INST(gemm_tma_f16, __half, 256, false, 2)
// 192-token tiles: where 256-token ones leave many SMs idle in their last round (1024 x 2560^2;
// bench/RESULTS.md, Rule: 192-token tiles)
TM_INST(gemm_tma192_i32, int, 192, false, 2)
TM_INST(gemm_tma192_f32, float, 192, false, 2)
TM_INST(gemm_tma192_bf16, __nv_bfloat16, 192, false, 2)
TM_INST(gemm_tma192_f16, __half, 192, false, 2)
TM_INST(gemm_tma128_i32, int, 128, false, 2)
TM_INST(gemm_tma128_f32, float, 128, false, 2)
TM_INST(gemm_tma128_bf16, __nv_bfloat16, 128, false, 2)
TM_INST(gemm_tma128_f16, __half, 128, false, 2)
TM_INST(gemm_tma128_split, int, 128, true, 2)
// 64 weight rows a tile (one consumer warpgroup): twice the tiles where N is small
TM_INST(gemm_tma64_i32, int, 128, false, 1)
TM_INST(gemm_tma64_f32, float, 128, false, 1)
TM_INST(gemm_tma64_bf16, __nv_bfloat16, 128, false, 1)
TM_INST(gemm_tma64_f16, __half, 128, false, 1)
