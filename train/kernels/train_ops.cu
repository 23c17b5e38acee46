// Fused CUDA kernels of the training loop (compiled to PTX by train/build.rs, launched from
// train/src/cuda.rs). All tensors are contiguous, f32 unless stated.
//
// adamw_f32: one AdamW update (PyTorch's rule, see train/src/optim.rs) of one variable, in place.
//   p, m, v, g: n floats each. Thread i (grid-stride) reads g[i], p[i], m[i], v[i] and writes
//   m[i], v[i], p[i]. The scalars are the f32 roundings of the host's f64 coefficients, applied in
//   the order of the tensor-op implementation (m*b1 + g*(1-b1), ..., decayed - update*lr).
//
// augment_u8: crop 32 from the 4-pixel zero- or reflect-padded image, optional horizontal flip,
//   then per-channel `v * scale[c] - shift[c]`, for a batch of `b` images.
//   images: (N, 3, 32, 32) u8; order: u32 image index per epoch position; params: u32 per epoch
//   position, dy | dx << 8 | flip << 16 | reflect << 17 (dy, dx in 0..=8: the crop's corner in
//   the 40x40 padded image; reflect: source index -i for i < 0 and 62 - i for i > 31). Batch row
//   r is epoch position start + r. out: (b, 3, 32, 32) f32. Thread t (grid-stride) writes out
//   element t; rows are read through L1/L2 (each image is 3 KiB).
//
// gather_labels: labels (N) u8, order (as above) -> y[r] = labels[order[start + r]] as u32.

#include <stdint.h>

extern "C" __global__ void adamw_f32(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                     const float* __restrict__ g, unsigned long long n, float b1,
                                     float one_minus_b1, float b2, float one_minus_b2, float inv_bc1,
                                     float inv_bc2, float decay, float eps, float lr) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float gi = g[i];
        float mi = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gi, one_minus_b1));
        float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gi, gi), one_minus_b2));
        float m_hat = __fmul_rn(mi, inv_bc1);
        float v_hat = __fmul_rn(vi, inv_bc2);
        float decayed = __fmul_rn(p[i], decay);
        float update = __fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), eps));
        p[i] = __fsub_rn(decayed, __fmul_rn(update, lr));
        m[i] = mi;
        v[i] = vi;
    }
}

extern "C" __global__ void augment_u8(const uint8_t* __restrict__ images, const uint32_t* __restrict__ order,
                                      const uint32_t* __restrict__ params, int start, int b, float scale0,
                                      float scale1, float scale2, float shift0, float shift1, float shift2,
                                      float* __restrict__ out) {
    const int total = b * 3072;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        const int r = t / 3072;
        const int within = t - r * 3072;
        const int c = within >> 10;
        const int y = (within >> 5) & 31;
        const int x = within & 31;
        const uint32_t pr = params[start + r];
        const int dy = pr & 0xff;
        const int dx = (pr >> 8) & 0xff;
        const int flip = (pr >> 16) & 1;
        const int reflect = (pr >> 17) & 1;
        int sy = y + dy - 4;
        int sx = (flip ? 31 - x : x) + dx - 4;
        if (reflect) {
            sy = sy < 0 ? -sy : (sy > 31 ? 62 - sy : sy);
            sx = sx < 0 ? -sx : (sx > 31 ? 62 - sx : sx);
        }
        uint32_t val = 0;
        if (sy >= 0 && sy < 32 && sx >= 0 && sx < 32) {
            const size_t img = order[start + r];
            val = images[img * 3072 + (size_t)c * 1024 + sy * 32 + sx];
        }
        const float sc = c == 0 ? scale0 : (c == 1 ? scale1 : scale2);
        const float sh = c == 0 ? shift0 : (c == 1 ? shift1 : shift2);
        out[t] = __fsub_rn(__fmul_rn((float)val, sc), sh);
    }
}

extern "C" __global__ void gather_labels(const uint8_t* __restrict__ labels, const uint32_t* __restrict__ order,
                                         int start, int b, uint32_t* __restrict__ y) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < b; r += gridDim.x * blockDim.x) {
        y[r] = labels[order[start + r]];
    }
}
