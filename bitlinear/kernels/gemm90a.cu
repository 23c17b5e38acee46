// Large-M matmul on Hopper warpgroup MMAs (wgmma, sm_90a): y (M, N) = x_q (M, K) . W_q (N, K)^T.
// The default large-M kernel on compute capability 9.0 (tile table in src/cuda/mod.rs); bit-exact
// in gpu_check on an H100. There, M=N=K=4096: 243 us per packed forward (mma.sync 128x128:
// 292 us; cuBLAS bf16: 178 us), of which this kernel is ~208 us and the activation quantizer
// ~30 us (ncu).
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
//   * per k tile: wait for this tile's cp.async group, fence.proxy.async (generic-proxy writes ->
//     async proxy), barrier, issue the wgmmas, wait until the previous tile's wgmmas are done,
//     barrier, refill that previous stage (A by cp.async, B by decode + st.shared).
#include "common.cuh"

#define WG_BM 128
#define WG_BN 256
#define WG_BK 128
#define WG_STAGES 4
#define WG_A_BYTES (WG_BM * WG_BK)
#define WG_B_BYTES (WG_BN * WG_BK)
#define WG_STAGE_BYTES (WG_A_BYTES + WG_B_BYTES)

// D (64 x 256, s32, registers) += A (64 x 32, s8, smem desc) * B (256 x 32, s8, smem desc)^T
__device__ __forceinline__ void wgmma_m64n256k32(int (&d)[128], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p;\n"
        "}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
          "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
          "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
          "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
          "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
          "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
          "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
          "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
          "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
          "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
          "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
          "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
          "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
          "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
          "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
          "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
        : "l"(da), "l"(db), "r"(1));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator reads/writes across the asynchronous MMAs.
__device__ __forceinline__ void fence_acc(int (&d)[128]) {
#pragma unroll
    for (int i = 0; i < 128; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t gmma_desc(const void* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    uint64_t d = (uint64_t)((a & 0x3FFFF) >> 4);
    d |= (uint64_t)1 << 16;             // leading byte offset (unused with 128-byte swizzle)
    d |= (uint64_t)(1024 >> 4) << 32;   // stride byte offset: next 8-row group
    d |= (uint64_t)1 << 62;             // 128-byte swizzle
    return d;
}

__device__ __forceinline__ int sw128(int r, int chunk) { return (r >> 3) * 1024 + (r & 7) * 128 + ((chunk ^ (r & 7)) << 4); }

template <typename OT>
__device__ void gemm_wgmma_impl(const int8_t* __restrict__ Xp, int ld, const int* __restrict__ rowsum,
                                const float* __restrict__ xscales, int per_tensor, const uint8_t* __restrict__ Wp,
                                int K4s, int M, int N, int K, float sw_val, const float* __restrict__ sw_ptr,
                                OT* __restrict__ y) {
    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>(((size_t)smem_raw + 1023) & ~(size_t)1023);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wg = warp >> 2, wq = warp & 3, g = lane >> 2, t = lane & 3;
    const int bm = blockIdx.y * WG_BM, bn = blockIdx.x * WG_BN;
    const int KT = (K + WG_BK - 1) / WG_BK;

    auto load_a = [&](int kt, int slot) {
        uint8_t* a = smem + slot * WG_STAGE_BYTES;
#pragma unroll
        for (int c = tid; c < WG_BM * 8; c += 256) {
            const int r = c >> 3, ch = c & 7;
            const int gm = bm + r;
            const bool ok = gm < M;
            const int8_t* src = Xp + (size_t)(ok ? gm : 0) * ld + (size_t)kt * WG_BK + ch * 16;
            cp_async16(a + sw128(r, ch), src, ok);
        }
    };
    auto load_w = [&](int kt, uint4 (&wr)[2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int p = tid + h * 256, r = p >> 1, half = p & 1;
            const int gn = bn + r, off = kt * (WG_BK / 4) + half * 16;
            wr[h] = (kt < KT && gn < N && off < K4s) ? ldg_stream16(Wp + (size_t)gn * K4s + off)
                                                     : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    auto store_w = [&](int slot, const uint4 (&wr)[2]) {
        uint8_t* b = smem + slot * WG_STAGE_BYTES + WG_A_BYTES;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int p = tid + h * 256, r = p >> 1, half = p & 1;
            const uint32_t w[4] = {wr[h].x, wr[h].y, wr[h].z, wr[h].w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                uint4 c;
                c.x = w[u] & 0x03030303u;
                c.y = (w[u] >> 2) & 0x03030303u;
                c.z = (w[u] >> 4) & 0x03030303u;
                c.w = (w[u] >> 6) & 0x03030303u;
                *reinterpret_cast<uint4*>(b + sw128(r, half * 4 + u)) = c;
            }
        }
    };

    int acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0;

    uint4 wr[2];
#pragma unroll
    for (int s = 0; s < WG_STAGES - 1; ++s) {
        if (s < KT) {
            load_a(s, s);
            load_w(s, wr);
            store_w(s, wr);
        }
        cp_async_commit();
    }
    load_w(WG_STAGES - 1, wr);  // zeros when past the end

    for (int kt = 0; kt < KT; ++kt) {
        const int slot = kt % WG_STAGES;
        cp_async_wait<WG_STAGES - 2>();
        fence_proxy_async();
        __syncthreads();
        const uint8_t* a = smem + slot * WG_STAGE_BYTES + wg * (64 / 8) * 1024;
        const uint8_t* b = smem + slot * WG_STAGE_BYTES + WG_A_BYTES;
        fence_acc(acc);
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < WG_BK / 32; ++s) wgmma_m64n256k32(acc, gmma_desc(a + 32 * s), gmma_desc(b + 32 * s));
        wgmma_commit();
        wgmma_wait<1>();  // the previous tile's MMAs (this warpgroup) are done
        fence_acc(acc);
        __syncthreads();  // ... and the other warpgroup's: its stage can be refilled
        const int nk = kt + WG_STAGES - 1;
        if (nk < KT) {
            load_a(nk, nk % WG_STAGES);
            store_w(nk % WG_STAGES, wr);
        }
        cp_async_commit();
        load_w(nk + 1, wr);
    }
    wgmma_wait<0>();
    fence_acc(acc);
    cp_async_wait<0>();

    const float sw = sw_ptr != nullptr ? *sw_ptr : sw_val;
#pragma unroll
    for (int hm = 0; hm < 2; ++hm) {
        const int m = bm + wg * 64 + wq * 16 + g + 8 * hm;
        if (m >= M) continue;
        float sx = 0.0f;
        if constexpr (!std::is_same<OT, int>::value) sx = xscales[per_tensor ? 0 : m];
        const int xsum = rowsum[m];
#pragma unroll
        for (int j = 0; j < WG_BN / 8; ++j) {
#pragma unroll
            for (int hn = 0; hn < 2; ++hn) {
                const int n = bn + 8 * j + 2 * t + hn;
                if (n >= N) continue;
                const int v = acc[4 * j + 2 * hm + hn] - xsum;
                if constexpr (std::is_same<OT, int>::value) {
                    y[(size_t)m * N + n] = v;
                } else {
                    store_out<OT>(y, (size_t)m * N + n, dequant(v, sx, sw));
                }
            }
        }
    }
}

#define WG_INST(OT, ON)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256, 1)                                                     \
        gemm_wgmma_##ON(const int8_t* Xp, int ld, const int* rowsum, const float* xs, int per_tensor,        \
                        const uint8_t* Wp, int K4s, int M, int N, int K, float sw_val, const float* sw_ptr, \
                        OT* y) {                                                                             \
        gemm_wgmma_impl<OT>(Xp, ld, rowsum, xs, per_tensor, Wp, K4s, M, N, K, sw_val, sw_ptr, y);            \
    }

WG_INST(int, i32)
WG_INST(float, f32)
WG_INST(__nv_bfloat16, bf16)
WG_INST(__half, f16)
