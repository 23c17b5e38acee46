// bitlinear weight quantizer: absmean scale -> ternary codes packed four to a byte (the canonical
// PackedTernary bytes, identical to the CPU packer's), its fake-quant (quantize-dequantize) form
// used by the backward pass, and the packed-row padder of the GEMMs.
//
// Data layout
//   w        : (N, K) row-major, T in {f32, bf16, f16} (f64 is converted to f32 on the Rust side).
//   packed   : (N, K4 = ceil(K/4)) bytes, byte j of row n holds k = 4j..4j+3 in bits 0-1 .. 6-7,
//              code = w_q + 1; padding k >= K gets code 1.
//
// Kernels and what each thread does
//   w_absmean_partial_T  fixed grid G (chosen from n only); thread t of block b sums |w| in f64 over
//                        the 16-byte vectors i = b*256 + t + r*G*256 (plus at most one unaligned
//                        head and one tail element); block tree sum -> partials[b]; a non-finite
//                        value sets stat[1] (atomicOr). The last block to finish (a counter in
//                        stat[2]) makes the fixed-order sum of the G partials, mean in f64,
//                        rounded to f32, max with 1e-5 -> stat[0]. Deterministic run to run for a
//                        given n. (The CPU sums in a different order; both are f64 sums, rounded
//                        once to f32, so they agree except in astronomically rare ties at an f32
//                        rounding boundary.)
//   w_absmean_final      the same final step alone, for n == 0.
//   w_pack_T             one block per weight row: thread t packs 16 weights -> one 32-bit word of
//                        the packed row (16-byte loads when K % 16 == 0).
//   w_pack_flat_T        the packer for K % 16 == 0 and a 16-byte aligned w: the packed matrix
//                        is then a flat array of 32-bit words, word i = the 16 weights at 16i;
//                        grid-stride, each thread loads U words' weights (4, or 2 for f32)
//                        before quantizing them.
//   w_fake_T             x~ = (code - 1) * s_w per element.
//   w_fake_rows_T        per-channel codes: one block per weight row (grid-stride over rows);
//                        thread t sums |w| in f64 over k = t, t + 256, ..; the block's fixed tree
//                        gives the row's absmean g (rounded to f32, max with 1e-5); then
//                        x~ = ternary_code(w, g) * s_w with s_w the tensor's scale (stat[0]).
//   packed_repack        packed bytes (N, K4) -> (N, K4p) with K4p a multiple of 16, pad 0x55.
#include "common.cuh"

#define QT 256  // threads a block (src/plan/quant.rs: QUANT_THREADS)

// Unpacks a 16-byte vector of T into VN = 16 / sizeof(T) floats.
template <typename T> struct Vec16 {
    static constexpr int VN = 16 / sizeof(T);
    __device__ __forceinline__ static void load(const T* p, float (&f)[16 / sizeof(T)]) {
        uint4 v = *reinterpret_cast<const uint4*>(p);
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int i = 0; i < VN; ++i) f[i] = to_f32(e[i]);
    }
};

// Fixed-order tree sum of one double per thread (QT threads) into red[0], which every thread
// can read on return: the same tree, hence the same rounding, on every run.
__device__ __forceinline__ void block_sum_f64(double s, double* red) {
    red[threadIdx.x] = s;
    __syncthreads();
#pragma unroll
    for (int o = QT / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
}

// Fixed-order sum of the G partials, mean in f64, rounded to f32, max with 1e-5 -> stat[0]
// (NaN when stat[1], the non-finite flag, is set). One block; red = QT doubles of smem.
__device__ void w_absmean_finish(const double* partials, int G, size_t n, unsigned* stat, double* red) {
    double s = 0.0;
    for (int i = threadIdx.x; i < G; i += QT) s += __ldcg(&partials[i]);
    block_sum_f64(s, red);
    if (threadIdx.x == 0) {
        float mean = n == 0 ? 0.0f : (float)(red[0] / (double)n);
        // A non-finite weight gives s_w = NaN, so that if the caller does not check the flag
        // every output is NaN rather than garbage.
        const unsigned bad = __ldcg(&stat[1]);
        stat[0] = bad ? 0x7fc00000u : __float_as_uint(fmaxf(mean, BL_WEIGHT_EPS));
    }
}

template <typename T>
__device__ void w_absmean_partial_impl(const T* __restrict__ w, size_t n, double* partials,
                                       unsigned* stat) {
    __shared__ double red[QT];
    constexpr int VN = Vec16<T>::VN;
    double s = 0.0;
    int nf = 0;
    // Elements before the first 16-byte boundary (head) and after the last whole vector (tail)
    // are done one by one; the rest as 16-byte vectors. The partition depends only on n and
    // the address, so the sum is the same on every run.
    size_t head = ((16 - ((size_t)w & 15)) & 15) / sizeof(T);
    if (head > n) head = n;
    const size_t nv = (n - head) / VN;
    const size_t tail0 = head + nv * VN;
    const size_t gt = (size_t)blockIdx.x * QT + threadIdx.x, stride = (size_t)gridDim.x * QT;
    const T* wv = w + head;
    for (size_t i = gt; i < nv; i += stride) {
        float f[VN];
        Vec16<T>::load(wv + i * VN, f);
#pragma unroll
        for (int e = 0; e < VN; ++e) {
            nf |= !isfinite(f[e]);
            s += (double)fabsf(f[e]);
        }
    }
    if (gt < head) {
        float v = to_f32(w[gt]);
        nf |= !isfinite(v);
        s += (double)fabsf(v);
    }
    if (tail0 + gt < n) {
        float v = to_f32(w[tail0 + gt]);
        nf |= !isfinite(v);
        s += (double)fabsf(v);
    }
    if (nf) atomicOr(&stat[1], 1u);
    block_sum_f64(s, red);
    // The last block to finish adds up the partials (in a fixed order) and writes s_w.
    __shared__ bool last;
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = red[0];
        __threadfence();
        last = atomicAdd(&stat[2], 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (last) {
        __threadfence();
        w_absmean_finish(partials, gridDim.x, n, stat, red);
    }
}

// One block per weight row (grid-stride over rows); thread t builds the 32-bit words q = t,
// t + 256, ... of the packed row: 16 weights -> 16 codes -> one 4-byte store (bytewise when
// K4 % 4 != 0). vec (host-checked: K % 16 == 0 and w 16-byte aligned) loads the 16 weights with
// 16-byte loads. Codes through the reciprocal of s_w (ternary_codes16: same as dividing).
template <typename T>
__device__ void w_pack_impl(const T* __restrict__ w, int N, int K, int K4, const float* sw_ptr,
                            uint8_t* out, int vec) {
    const float s = *sw_ptr;
    const float inv = __frcp_rn(s);
    const int Q = (K4 + 3) / 4;  // 32-bit words per packed row
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const T* wr = w + (size_t)n * K;
        uint8_t* orow = out + (size_t)n * K4;
        for (int q = threadIdx.x; q < Q; q += QT) {
            float f[16];
            if (vec) {
                constexpr int VN = 16 / sizeof(T);
#pragma unroll
                for (int c = 0; c < 16 / VN; ++c) {
                    uint4 v = __ldg(reinterpret_cast<const uint4*>(wr + 16 * q + c * VN));
                    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
                    for (int i = 0; i < VN; ++i) f[c * VN + i] = to_f32(e[i]);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 16; ++i) f[i] = 16 * q + i < K ? to_f32(wr[16 * q + i]) : 0.0f;
            }
            int c[16];
            ternary_codes16(f, s, inv, c);
            uint32_t word = 0;  // code of k = 16q + i at bits 2i (byte i/4, field i%4)
#pragma unroll
            for (int i = 0; i < 16; ++i) word |= (uint32_t)(16 * q + i < K ? c[i] : 1) << (2 * i);
            if ((K4 & 3) == 0) {
                *reinterpret_cast<uint32_t*>(orow + 4 * q) = word;
            } else {
#pragma unroll
                for (int b = 0; b < 4; ++b)
                    if (4 * q + b < K4) orow[4 * q + b] = (uint8_t)(word >> (8 * b));
            }
        }
    }
}

// The packer when K % 16 == 0 and w is 16-byte aligned: then 32-bit word i of the packed matrix
// holds exactly the 16 weights w[16i .. 16i+15], so rows do not matter. Each thread requests U
// words' weights (16-byte loads) before it quantizes any of them, to keep more bytes in flight
// than the one-row-per-block packer (whose blocks idle on one 16-k group per thread).
template <typename T, int U>
__device__ void w_pack_flat_impl(const T* __restrict__ w, size_t words, const float* sw_ptr, uint32_t* out) {
    const float s = *sw_ptr;
    const float inv = __frcp_rn(s);
    const size_t step = (size_t)gridDim.x * QT * U;
    for (size_t base = (size_t)blockIdx.x * QT * U + threadIdx.x; base < words; base += step) {
        RawGroup<T> r[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const size_t i = base + (size_t)u * QT;
            if (i < words) {
#pragma unroll
                for (int c = 0; c < (int)sizeof(T); ++c)
                    r[u].v[c] = __ldg(reinterpret_cast<const uint4*>(w + 16 * i) + c);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const size_t i = base + (size_t)u * QT;
            if (i >= words) break;
            float f[16];
            raw_to_f32(r[u], f);
            int c[16];
            ternary_codes16(f, s, inv, c);
            uint32_t word = 0;  // code of k = 16i + j at bits 2j
#pragma unroll
            for (int j = 0; j < 16; ++j) word |= (uint32_t)c[j] << (2 * j);
            out[i] = word;
        }
    }
}

template <typename T>
__device__ void w_fake_impl(const T* __restrict__ w, size_t n, const float* sw_ptr, T* out) {
    const float s = *sw_ptr;
    for (size_t i = (size_t)blockIdx.x * QT + threadIdx.x; i < n; i += (size_t)gridDim.x * QT) {
        int c = ternary_code(to_f32(w[i]), s) - 1;
        out[i] = from_f32<T>(__fmul_rn((float)c, s));
    }
}

// Codes against each row's own absmean, values at the tensor's scale (see the header).
template <typename T>
__device__ void w_fake_rows_impl(const T* __restrict__ w, int N, int K, const float* sw_ptr, T* out) {
    __shared__ double red[QT];
    const float s = *sw_ptr;
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const T* wr = w + (size_t)n * K;
        double sum = 0.0;
        for (int k = threadIdx.x; k < K; k += QT) sum += (double)fabsf(to_f32(wr[k]));
        block_sum_f64(sum, red);
        const float g = fmaxf((float)(red[0] / (double)K), BL_WEIGHT_EPS);
        __syncthreads();  // red is reused by the next row
        for (int k = threadIdx.x; k < K; k += QT) {
            const int c = ternary_code(to_f32(wr[k]), g) - 1;
            out[(size_t)n * K + k] = from_f32<T>(__fmul_rn((float)c, s));
        }
    }
}

#define INSTANTIATE(T, SUF)                                                                        \
    extern "C" __global__ void __launch_bounds__(QT)                                               \
        w_absmean_partial_##SUF(const T* w, size_t n, double* partials, unsigned* stat) {         \
        pdl_wait();                                                                                 \
        w_absmean_partial_impl<T>(w, n, partials, stat);                                           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(QT)                                               \
        w_pack_##SUF(const T* w, int N, int K, int K4, const float* sw, uint8_t* out, int vec) {  \
        pdl_wait();                                                                                 \
        w_pack_impl<T>(w, N, K, K4, sw, out, vec);                                                 \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(QT)                                               \
        w_pack_flat_##SUF(const T* w, size_t words, const float* sw, uint32_t* out) {              \
        pdl_wait();                                                                                 \
        w_pack_flat_impl<T, sizeof(T) == 4 ? 2 : 4>(w, words, sw, out);                            \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(QT)                                               \
        w_fake_##SUF(const T* w, size_t n, const float* sw, T* out) {                             \
        pdl_wait();                                                                                 \
        w_fake_impl<T>(w, n, sw, out);                                                             \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(QT)                                               \
        w_fake_rows_##SUF(const T* w, int N, int K, const float* sw, T* out) {                     \
        pdl_wait();                                                                                 \
        w_fake_rows_impl<T>(w, N, K, sw, out);                                                     \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)

// stat[0] = s_w (f32 bits), stat[1] = non-finite flag: the n == 0 case (no partial kernel).
extern "C" __global__ void __launch_bounds__(QT)
    w_absmean_final(const double* partials, int G, size_t n, unsigned* stat) {
    pdl_wait();
    __shared__ double red[QT];
    w_absmean_finish(partials, G, n, stat, red);
}

// (N, K4) packed bytes -> (N, K4p) with zero-weight padding bytes (0x55).
extern "C" __global__ void __launch_bounds__(QT)
    packed_repack(const uint8_t* __restrict__ in, int N, int K4, int K4p, uint8_t* out) {
    pdl_wait();
    const size_t total = (size_t)N * K4p;
    for (size_t b = (size_t)blockIdx.x * QT + threadIdx.x; b < total; b += (size_t)gridDim.x * QT) {
        const int n = (int)(b / K4p), j = (int)(b % K4p);
        out[b] = j < K4 ? in[(size_t)n * K4 + j] : (uint8_t)0x55;
    }
}
