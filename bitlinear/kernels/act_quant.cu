// bitlinear activation quantizer: per-row (or per-tensor) absmax -> int8 codes, its fake-quant
// (quantize-dequantize) form used by the backward pass, and the int8-code permuter of the GEMMs.
//
// Data layout
//   x        : (M, K) row-major, T in {f32, bf16, f16} (f64 is converted to f32 on the Rust side).
//   codes    : (M, K) int8 row-major (two's complement bits in a candle U8 tensor), or the
//              matmul-internal "permuted" layout: (M, ld) with ld a multiple of 16, k permuted
//              inside each 16-group (see common.cuh) and zero codes for K <= k < ld.
//   scales   : f32, one per row (per-token) or one for the tensor (per-tensor).
//
// Kernels and what each thread does
//   act_quant_rows_T     a block (256 threads) per row, rows grid-strided over about one wave of
//                        blocks; thread t handles the 16-k groups g = t, t+256, ... (16-byte
//                        loads when K % 16 == 0). Per-token mode: absmax and non-finite flag in
//                        one integer max over the bits of |x| (two 16-bit values per
//                        instruction for bf16/f16), block max (warp reduce + one smem round),
//                        then a second pass over the same groups quantizes (the thread's first
//                        group is kept in registers, not reloaded; act_codes16 tests for
//                        near-ties once per 16 values). Per-tensor mode: the absmax and
//                        flag come from act_absmax_tensor_T's result (gstat). mode 0 writes
//                        canonical codes, mode 1 writes permuted/padded codes (one thread per
//                        16-group: 16 values -> one 16-byte store, and the row sum of the codes),
//                        mode 2 writes x~ = q * s_x in T.
//   act_quant_rows_short_T  the same when K % 16 == 0, K <= 4096 and x is 16-byte aligned (a thread
//                        has at most one group of a row): two rows at a time per block, both
//                        rows' groups requested before either is reduced.
//   act_absmax_tensor_T  grid-stride absmax over the whole tensor, block max then atomicMax on the
//                        float's bits (non-negative floats order like their bits: deterministic).
//   codes_permute        canonical codes -> permuted/padded layout, one thread per 16-group, plus
//                        the row sums of the codes (atomicAdd into a zeroed buffer).
//   Launch: each kernel waits for the previous one (pdl_wait); act_quant_rows* ahead of the
//   Hopper GEMM (trigger = 1) then lets it start at once, so that it requests its weights early.
#include "common.cuh"

#define QT 256  // threads a block (src/plan/quant.rs: QUANT_THREADS)

// Raw bits of the 16 values k = 16g .. 16g+15 of a row (T zero at and past K); held in
// registers as a prefetch, converted to f32 only when used (raw_to_f32).
template <typename T>
__device__ __forceinline__ void load_raw_group(const T* __restrict__ xr, int g, int K, bool vec, RawGroup<T>& r) {
    if (vec && 16 * g < K) {
#pragma unroll
        for (int c = 0; c < (int)sizeof(T); ++c) r.v[c] = __ldg(reinterpret_cast<const uint4*>(xr + 16 * g) + c);
    } else {
        T* e = reinterpret_cast<T*>(r.v);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int k = 16 * g + i;
            e[i] = k < K ? xr[k] : from_f32<T>(0.0f);
        }
    }
}
// max|x| on the bit patterns: for IEEE formats the bits of |x| order like |x|, and Inf/NaN bits
// lie above every finite value, so one integer max gives the absmax and the non-finite flag.
// 2-byte types take two values a 32-bit word (__vmaxu2); absbits_fold joins the halves.
template <typename T>
__device__ __forceinline__ unsigned absbits_acc(const RawGroup<T>& r, unsigned m) {
#pragma unroll
    for (int c = 0; c < (int)sizeof(T); ++c) {
        const uint32_t w[4] = {r.v[c].x, r.v[c].y, r.v[c].z, r.v[c].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if constexpr (sizeof(T) == 4)
                m = max(m, w[i] & 0x7fffffffu);
            else
                m = __vmaxu2(m, w[i] & 0x7fff7fffu);
        }
    }
    return m;
}
template <typename T>
__device__ __forceinline__ unsigned absbits_fold(unsigned m) {
    if constexpr (sizeof(T) == 4)
        return m;
    else
        return max(m & 0xffffu, m >> 16);
}
// The value and the non-finite flag of folded |x| bits.
__device__ __forceinline__ float absbits_value(unsigned m, float*, bool& nonfinite) {
    nonfinite = m >= 0x7f800000u;
    return __uint_as_float(m);
}
__device__ __forceinline__ float absbits_value(unsigned m, __nv_bfloat16*, bool& nonfinite) {
    nonfinite = m >= 0x7f80u;
    return __uint_as_float(m << 16);
}
__device__ __forceinline__ float absbits_value(unsigned m, __half*, bool& nonfinite) {
    nonfinite = m >= 0x7c00u;
    return __half2float(__ushort_as_half((unsigned short)m));
}

// Writes the 16 codes q of group g of a row in the output form of `mode` (see act_quant_rows)
// and returns sum + their sum in mode 1 (the row sums the GEMM needs), else sum.
template <typename T>
__device__ __forceinline__ int store_group(const int (&q)[16], float s, int row, int g, int K, bool vec, int mode,
                                           int8_t* codes, int ld, T* fake, int sum) {
    if (mode == 0) {
        int8_t* cr = codes + (size_t)row * K + 16 * g;
        if (vec) {
            *reinterpret_cast<uint4*>(cr) = pack16(q);
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i)
                if (16 * g + i < K) cr[i] = (int8_t)q[i];
        }
    } else if (mode == 1) {
        const uint4 w = pack16_permuted(q);
        *reinterpret_cast<uint4*>(codes + (size_t)row * ld + 16 * g) = w;
        sum = __dp4a((int)w.x, 0x01010101, __dp4a((int)w.y, 0x01010101, sum));
        sum = __dp4a((int)w.z, 0x01010101, __dp4a((int)w.w, 0x01010101, sum));
    } else {
        T* fr = fake + (size_t)row * K + 16 * g;
        __align__(16) T o[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) o[i] = from_f32<T>(__fmul_rn((float)q[i], s));
        if (vec) {
#pragma unroll
            for (int c = 0; c < 16 * (int)sizeof(T) / 16; ++c)
                reinterpret_cast<uint4*>(fr)[c] = reinterpret_cast<const uint4*>(o)[c];
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i)
                if (16 * g + i < K) fr[i] = o[i];
        }
    }
    return sum;
}

// One row of act_quant_rows. load(g, r) fills r with group g < G of the row (from registers,
// global or shared memory: the caller's choice).
template <typename T, typename Load>
__device__ __forceinline__ void act_quant_row(Load load, int row, int K, int G, bool vec, int per_tensor,
                                              const unsigned* __restrict__ gstat, int mode, int8_t* codes,
                                              int ld, float* scales, T* fake, int* rowsum, float* red,
                                              int* ired) {
    float s;
    bool bad;
    if (per_tensor) {
        bad = gstat[1] != 0;
        s = act_scale_from_absmax(__uint_as_float(gstat[0]));
    } else {
        unsigned m = 0u;
        for (int g = threadIdx.x; g < G; g += QT) {
            RawGroup<T> r;
            load(g, r);
            m = absbits_acc<T>(r, m);
        }
        m = block_max_u32<QT>(absbits_fold<T>(m), reinterpret_cast<unsigned*>(red));
        s = act_scale_from_absmax(absbits_value(m, (T*)nullptr, bad));
    }
    if (bad) s = __int_as_float(0x7fc00000);  // NaN scale, zero codes
    if (scales != nullptr && (!per_tensor || row == 0) && threadIdx.x == 0) {
        scales[per_tensor ? 0 : row] = s;
    }
    // mode 1 also zero-fills the padding groups [G, ld/16)
    const int groups = mode == 1 ? ld / 16 : G;
    const float inv = __frcp_rn(s);
    int sum = 0;
    for (int g = threadIdx.x; g < groups; g += QT) {
        float f[16];
        if (g < G) {
            RawGroup<T> r;
            load(g, r);
            raw_to_f32(r, f);
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) f[i] = 0.0f;
        }
        // values at and past K are 0 here, so their codes are 0
        int q[16];
        if (bad) {
#pragma unroll
            for (int i = 0; i < 16; ++i) q[i] = 0;
        } else {
            act_codes16(f, s, inv, q);
        }
        sum = store_group<T>(q, s, row, g, K, vec, mode, codes, ld, fake, sum);
    }
    if (mode == 1 && rowsum != nullptr) {
        // row sum of the codes (the GEMM uses unsigned weight codes: sum c*x - sum x)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if ((threadIdx.x & 31) == 0) ired[threadIdx.x >> 5] = sum;
        __syncthreads();
        if (threadIdx.x == 0) {
            int tot = 0;
            for (int w = 0; w < QT / 32; ++w) tot += ired[w];
            rowsum[row] = tot;
        }
    }
}

// Grid-stride over rows (the host launches about one wave of blocks); each thread keeps its
// first group in registers between the two passes.
template <typename T>
__device__ void act_quant_rows_impl(const T* __restrict__ x, int M, int K, int per_tensor,
                                    const unsigned* __restrict__ gstat, int mode, int8_t* codes,
                                    int ld, float* scales, T* fake, int* rowsum) {
    __shared__ float red[32];
    __shared__ int ired[32];
    const bool vec = (K & 15) == 0 && (((size_t)x) & 15) == 0;
    const int G = (K + 15) / 16;  // 16-k groups with data
    for (int row = blockIdx.x; row < M; row += gridDim.x) {
        const T* xr = x + (size_t)row * K;
        RawGroup<T> first;
        if ((int)threadIdx.x < G) load_raw_group(xr, threadIdx.x, K, vec, first);
        auto load = [&](int g, RawGroup<T>& r) {
            if (g == (int)threadIdx.x)
                r = first;
            else
                load_raw_group(xr, g, K, vec, r);
        };
        act_quant_row<T>(load, row, K, G, vec, per_tensor, gstat, mode, codes, ld, scales, fake, rowsum, red, ired);
        __syncthreads();  // red / ired are reused by the next row
    }
}

// The common case K % 16 == 0, K <= 16 * QT, 16-byte aligned x, in which a thread has at most
// one 16-k group of a row: a block takes AQ_ROWS rows at a time, each thread first requests its
// group of every one of them (more bytes in flight than one row a block), then a single block
// reduction round finds all their absmaxes, then each row is quantized from registers.
#define AQ_ROWS 2
template <typename T>
__device__ void act_quant_rows_short_impl(const T* __restrict__ x, int M, int K, int per_tensor,
                                          const unsigned* __restrict__ gstat, int mode, int8_t* codes, int ld,
                                          float* scales, T* fake, int* rowsum) {
    __shared__ unsigned red[AQ_ROWS][QT / 32];
    __shared__ int ired[AQ_ROWS][QT / 32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int G = K >> 4;
    const bool mine = tid < G;  // this thread has a group with data
    // mode 1 also zero-fills the padding groups [G, ld/16) (ld <= 16 * QT here)
    const bool writes = tid < (mode == 1 ? ld >> 4 : G);
    for (int row0 = blockIdx.x * AQ_ROWS; row0 < M; row0 += gridDim.x * AQ_ROWS) {
        RawGroup<T> r[AQ_ROWS];
#pragma unroll
        for (int j = 0; j < AQ_ROWS; ++j) {
            if (mine && row0 + j < M) {
                const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)(row0 + j) * K + 16 * tid);
#pragma unroll
                for (int c = 0; c < (int)sizeof(T); ++c) r[j].v[c] = __ldg(src + c);
            } else {
#pragma unroll
                for (int c = 0; c < (int)sizeof(T); ++c) r[j].v[c] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        float s[AQ_ROWS];
        bool bad[AQ_ROWS];
        if (per_tensor) {
#pragma unroll
            for (int j = 0; j < AQ_ROWS; ++j) {
                bad[j] = gstat[1] != 0;
                s[j] = act_scale_from_absmax(__uint_as_float(gstat[0]));
            }
        } else {
#pragma unroll
            for (int j = 0; j < AQ_ROWS; ++j) {
                const unsigned m = __reduce_max_sync(0xffffffffu, absbits_fold<T>(absbits_acc<T>(r[j], 0u)));
                if (lane == 0) red[j][warp] = m;
            }
            __syncthreads();
#pragma unroll
            for (int j = 0; j < AQ_ROWS; ++j) {
                unsigned m = red[j][0];
#pragma unroll
                for (int w = 1; w < QT / 32; ++w) m = max(m, red[j][w]);
                s[j] = act_scale_from_absmax(absbits_value(m, (T*)nullptr, bad[j]));
            }
        }
        int sum[AQ_ROWS];
#pragma unroll
        for (int j = 0; j < AQ_ROWS; ++j) {
            sum[j] = 0;
            const int row = row0 + j;
            if (row >= M) break;
            if (bad[j]) s[j] = __int_as_float(0x7fc00000);  // NaN scale, zero codes
            if (scales != nullptr && tid == 0 && (!per_tensor || row == 0)) scales[per_tensor ? 0 : row] = s[j];
            if (writes) {
                int q[16];
                if (mine && !bad[j]) {
                    float f[16];
                    raw_to_f32(r[j], f);
                    act_codes16(f, s[j], __frcp_rn(s[j]), q);
                } else {
#pragma unroll
                    for (int i = 0; i < 16; ++i) q[i] = 0;
                }
                sum[j] = store_group<T>(q, s[j], row, tid, K, true, mode, codes, ld, fake, 0);
            }
        }
        if (mode == 1 && rowsum != nullptr) {
            // row sums of the codes (the GEMM uses unsigned weight codes: sum c*x - sum x)
#pragma unroll
            for (int j = 0; j < AQ_ROWS; ++j) {
                const int v = __reduce_add_sync(0xffffffffu, sum[j]);
                if (lane == 0) ired[j][warp] = v;
            }
            __syncthreads();
            if (tid < AQ_ROWS && row0 + tid < M) {
                int tot = 0;
#pragma unroll
                for (int w = 0; w < QT / 32; ++w) tot += ired[tid][w];
                rowsum[row0 + tid] = tot;
            }
        }
        __syncthreads();  // red / ired are reused by the next rows
    }
}

template <typename T>
__device__ void act_absmax_tensor_impl(const T* __restrict__ x, size_t n, unsigned* gstat) {
    __shared__ float red[32];
    float a = 0.0f;
    int nf = 0;
    for (size_t i = (size_t)blockIdx.x * QT + threadIdx.x; i < n; i += (size_t)gridDim.x * QT) {
        float v = to_f32(x[i]);
        nf |= !isfinite(v);
        a = fmaxf(a, fabsf(v));
    }
    bool bad = __syncthreads_or(nf) != 0;
    a = block_max<QT>(a, red);
    if (threadIdx.x == 0) {
        atomicMax(&gstat[0], __float_as_uint(a));
        if (bad) atomicOr(&gstat[1], 1u);
    }
}

#define INSTANTIATE(T, SUF)                                                                        \
    extern "C" __global__ void __launch_bounds__(QT, 4)                                            \
        act_quant_rows_##SUF(const T* x, int M, int K, int per_tensor, const unsigned* gstat,     \
                             int mode, int8_t* codes, int ld, float* scales, T* fake,           \
                             int* rowsum, int trigger) {                                           \
        pdl_wait();                                                                                 \
        if (trigger) pdl_launch_dependents(); /* the matmul may request its weights now */         \
        act_quant_rows_impl<T>(x, M, K, per_tensor, gstat, mode, codes, ld, scales, fake, rowsum); \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(QT, sizeof(T) == 4 ? 3 : 4)                       \
        act_quant_rows_short_##SUF(const T* x, int M, int K, int per_tensor, const unsigned* gstat,\
                                   int mode, int8_t* codes, int ld, float* scales, T* fake,        \
                                   int* rowsum, int trigger) {                                     \
        pdl_wait();                                                                                 \
        if (trigger) pdl_launch_dependents(); /* the matmul may request its weights now */         \
        act_quant_rows_short_impl<T>(x, M, K, per_tensor, gstat, mode, codes, ld, scales, fake,    \
                                     rowsum);                                                      \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(QT)                                               \
        act_absmax_tensor_##SUF(const T* x, size_t n, unsigned* gstat) {                          \
        pdl_wait();                                                                                 \
        act_absmax_tensor_impl<T>(x, n, gstat);                                                    \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)

// Canonical (M, K) codes -> permuted (M, ld) codes, zero padded. One thread per 16-group.
extern "C" __global__ void __launch_bounds__(QT)
    codes_permute(const int8_t* __restrict__ codes, int M, int K, int ld, int8_t* out, int* rowsum) {
    pdl_wait();
    const size_t groups = (size_t)M * (ld / 16);
    for (size_t t = (size_t)blockIdx.x * QT + threadIdx.x; t < groups; t += (size_t)gridDim.x * QT) {
        const int m = (int)(t / (ld / 16)), g = (int)(t % (ld / 16));
        const int8_t* cr = codes + (size_t)m * K;
        int q[16];
        int sum = 0;
#pragma unroll
        for (int p = 0; p < 16; ++p) {
            int k = 16 * g + 4 * (p & 3) + (p >> 2);
            q[p] = k < K ? (int)cr[k] : 0;
            sum += q[p];
        }
        atomicAdd(&rowsum[m], sum);  // integer: order independent
        *reinterpret_cast<uint4*>(out + (size_t)m * ld + 16 * g) = pack16(q);  // q is already permuted
    }
}

