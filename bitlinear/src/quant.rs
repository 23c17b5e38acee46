//! The two quantizers of BitNet b1.58, on plain slices.
//!
//! These scalar definitions are the numeric contract of the crate: the CPU kernels call them
//! directly and the CUDA kernels reproduce them operation for operation, so both devices produce
//! the same integer codes.
//!
//! * Weights, per tensor *absmean*: `s_w = max(mean|W|, WEIGHT_EPS)`, then
//!   `w_q = clamp(round(w / s_w), -1, 1)` (or, as an option of convolutions, each row's codes
//!   against that row's absmean, at the tensor's `s_w`: [`channel_codes`]).
//! * Activations, per token (row) *absmax*: `s_x = max(max|x|, ACT_EPS) / 127`, then
//!   `x_q = clamp(round(x / s_x), -128, 127)`.
//!
//! `round` is round-half-to-even (what `torch.round` does); divisions are IEEE f32 divisions.

/// Lower bound on the absmean weight scale `s_w`. It keeps an all-zero weight from dividing by
/// zero; any real weight matrix has a far larger mean magnitude. (BitNet's reference code clamps
/// with the same value.)
pub const WEIGHT_EPS: f32 = 1e-5;

/// Lower bound on the absmax of an activation row (before dividing by 127). An all-zero row gets
/// `s_x = 1e-5 / 127` and all-zero codes instead of a division by zero.
pub const ACT_EPS: f32 = 1e-5;

/// Largest int8 code magnitude of the activation quantizer.
pub const ACT_MAX: f32 = 127.0;

/// How activations are grouped under one scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum ActScaling {
    /// One scale per row (token): BitNet b1.58's choice and the default.
    #[default]
    PerToken,
    /// One scale for the whole tensor, as in the original BitNet PyTorch design.
    PerTensor,
}

/// Absmean scale of a weight tensor: `max(Σ|w| / n, WEIGHT_EPS)`.
///
/// The sum is accumulated in f64 (then rounded once to f32), so the order of summation, which
/// differs between the CPU's chunks and the GPU's reduction tree, changes the result by far less
/// than one f32 ulp. Returns `None` when any weight is NaN or infinite: such a tensor has no
/// meaningful ternary form. An empty slice gets `WEIGHT_EPS`.
pub fn absmean_scale(w: &[f32]) -> Option<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let (sum, finite) = w
        .par_chunks(CHUNK)
        .map(|c| {
            let mut s = 0f64;
            let mut finite = true;
            for &v in c {
                finite &= v.is_finite();
                s += v.abs() as f64;
            }
            (s, finite)
        })
        .reduce(|| (0.0, true), |a, b| (a.0 + b.0, a.1 && b.1));
    if !finite {
        return None;
    }
    let mean = if w.is_empty() {
        0.0
    } else {
        (sum / w.len() as f64) as f32
    };
    Some(mean.max(WEIGHT_EPS))
}

/// Round half to even for `|v| <= 2^22`: adding and subtracting `1.5 · 2^23` makes the FPU's
/// default rounding (to nearest, ties to even) drop the fraction. Unlike `f32::round_ties_even`
/// this compiles to two adds on every x86-64, without SSE4.1, so quantization loops vectorize.
/// NaN stays NaN.
#[inline(always)]
pub fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (v + MAGIC) - MAGIC
}

/// Ternary code of one weight: `clamp(round_half_even(w / s_w), -1, 1)`.
#[inline(always)]
pub fn ternary(w: f32, s_w: f32) -> i8 {
    // Clamping to ±4 first keeps the rounding trick in range and changes no result.
    round_half_even((w / s_w).clamp(-4.0, 4.0)).clamp(-1.0, 1.0) as i8
}

/// Per-channel codes of a weight `(n, k)` (row-major `w`): row `r`'s codes are
/// `ternary(w, g_r)` with `g_r = absmean_scale(row r)`, and the returned scale is the whole
/// tensor's `absmean_scale`, the value of every non-zero code. `None` when a weight is NaN or
/// infinite, or when `w` does not hold `n * k` values.
///
/// For a layer whose every output channel is normalised afterwards (a convolution followed by
/// batch norm, no bias between), per-row scales `g_r` would be divided out again, so these codes
/// at one scale compute what per-channel scales would, in the one-scale packed format.
pub fn channel_codes(w: &[f32], n: usize, k: usize) -> Option<(Vec<i8>, f32)> {
    if n.checked_mul(k) != Some(w.len()) {
        return None;
    }
    let s_w = absmean_scale(w)?;
    let mut codes = Vec::with_capacity(w.len());
    for row in w.chunks(k.max(1)).take(n) {
        let g = absmean_scale(row)?;
        codes.extend(row.iter().map(|&v| ternary(v, g)));
    }
    Some((codes, s_w))
}

/// Absmax activation scale of a group of values: `max(max|x|, ACT_EPS) / 127`, or NaN when the
/// group holds a NaN or an infinity (the quantized row then has all-zero codes and its output row
/// is NaN, as a float matmul would give).
#[inline]
pub fn absmax_scale(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 support was just checked.
            return unsafe { absmax_avx2(x) };
        }
    }
    absmax_generic(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn absmax_avx2(x: &[f32]) -> f32 {
    absmax_generic(x)
}

#[inline(always)]
fn absmax_generic(x: &[f32]) -> f32 {
    // For non-negative floats the bit patterns order like the values, and every NaN or infinity
    // sorts above every finite value: one integer max (which vectorizes) finds both.
    let bits = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    if bits < 0x7f80_0000 {
        f32::from_bits(bits).max(ACT_EPS) / ACT_MAX
    } else {
        f32::NAN
    }
}

/// Int8 code of one activation: `clamp(round_half_even(x / s_x), -128, 127)`; 0 when `s_x` is NaN.
#[inline(always)]
pub fn int8(x: f32, s_x: f32) -> i8 {
    // `as` maps NaN to 0, which is what a non-finite row's codes are defined to be.
    round_half_even((x / s_x).clamp(-256.0, 256.0)).clamp(-128.0, 127.0) as i8
}

/// Quantizes one activation row in place into `out` and returns its scale.
#[inline]
pub fn quantize_row(x: &[f32], out: &mut [i8]) -> f32 {
    let s = absmax_scale(x);
    quantize_row_with_scale(x, s, out);
    s
}

/// Quantizes `x` with a given scale `s` (NaN gives zero codes).
#[inline]
pub fn quantize_row_with_scale(x: &[f32], s: f32, out: &mut [i8]) {
    if s.is_nan() {
        out.fill(0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 support was just checked.
            return unsafe { quantize_avx2(x, s, out) };
        }
    }
    quantize_generic(x, s, out)
}

#[inline(always)]
fn quantize_generic(x: &[f32], s: f32, out: &mut [i8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = int8(v, s);
    }
}

/// The same loop compiled for AVX2, so it runs 8 lanes wide; the arithmetic is unchanged.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(x: &[f32], s: f32, out: &mut [i8]) {
    quantize_generic(x, s, out)
}

/// The float epilogue shared by every device: `(acc * s_x) * s_w`, two f32 roundings in this
/// order (no fused multiply-add), so CPU and CUDA outputs agree bit for bit.
#[inline(always)]
pub fn dequantize(acc: i32, s_x: f32, s_w: f32) -> f32 {
    (acc as f32 * s_x) * s_w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_codes_round_each_row_against_its_own_absmean() {
        // Row 0: absmean 0.7333 -> 0.9 / g = 1.23 -> 1, 0.1 / g -> 0, -1.2 / g -> -1.
        // Row 1: absmean 0.08 -> 0.0 -> 0, 0.04 / g = 0.5 (a tie: to even 0), 0.2 / g -> 1.
        // The per-tensor absmean 0.4067 would zero all of row 1.
        let w = [0.9f32, -0.1, -1.2, 0.0, 0.04, 0.2];
        let (codes, s) = channel_codes(&w, 2, 3).unwrap();
        assert_eq!(codes, vec![1, 0, -1, 0, 0, 1]);
        assert_eq!(s, absmean_scale(&w).unwrap());
        assert!(w[3..].iter().all(|&v| ternary(v, s) == 0));
        assert!(channel_codes(&[1.0, f32::NAN], 1, 2).is_none());
        assert_eq!(channel_codes(&[], 0, 4).unwrap(), (vec![], WEIGHT_EPS));
        assert!(channel_codes(&w, 3, 3).is_none());
    }

    #[test]
    fn ternary_rounds_half_to_even() {
        // w / s = 0.5 -> 0 (even), 1.5 -> 2 -> clamped 1, -0.5 -> -0 -> 0, 2.5 -> 2 -> 1.
        assert_eq!(ternary(0.5, 1.0), 0);
        assert_eq!(ternary(-0.5, 1.0), 0);
        assert_eq!(ternary(0.500001, 1.0), 1);
        assert_eq!(ternary(-0.500001, 1.0), -1);
        assert_eq!(ternary(1.5, 1.0), 1);
        assert_eq!(ternary(-2.5, 1.0), -1);
        assert_eq!(ternary(0.49, 1.0), 0);
        assert_eq!(ternary(1.0, 2.0), 0); // 0.5 ties to 0
        assert_eq!(ternary(3.0, 2.0), 1); // 1.5 ties to 2 -> 1
    }

    #[test]
    fn int8_rounds_half_to_even_and_saturates() {
        assert_eq!(int8(0.5, 1.0), 0);
        assert_eq!(int8(1.5, 1.0), 2);
        assert_eq!(int8(2.5, 1.0), 2);
        assert_eq!(int8(-0.5, 1.0), 0);
        assert_eq!(int8(-1.5, 1.0), -2);
        assert_eq!(int8(-2.5, 1.0), -2);
        assert_eq!(int8(126.5, 1.0), 126);
        assert_eq!(int8(127.5, 1.0), 127);
        assert_eq!(int8(-200.0, 1.0), -128);
        assert_eq!(int8(1.0, f32::NAN), 0);
        assert_eq!(int8(3.0e9, 1.0), 127);
        assert_eq!(int8(-3.0e9, 1.0), -128);
    }

    #[test]
    fn rounding_trick_is_round_half_even() {
        for i in -2_000_000..2_000_000 {
            let v = i as f32 * 0.25 + 0.125 * (i % 3) as f32;
            assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
        }
        assert!(round_half_even(f32::NAN).is_nan());
    }

    #[test]
    fn absmean_is_the_mean_magnitude_with_floor() {
        assert_eq!(absmean_scale(&[1.0, -3.0, 0.5, -0.5]), Some(1.25));
        assert_eq!(absmean_scale(&[0.0; 7]), Some(WEIGHT_EPS));
        assert_eq!(absmean_scale(&[]), Some(WEIGHT_EPS));
        assert_eq!(absmean_scale(&[1.0, f32::NAN]), None);
        assert_eq!(absmean_scale(&[f32::INFINITY, 1.0]), None);
        assert_eq!(absmean_scale(&[f32::NEG_INFINITY]), None);
    }

    #[test]
    fn absmax_row_quantization() {
        let x = [0.0f32, -2.54, 1.27, 0.005];
        let mut q = [0i8; 4];
        let s = quantize_row(&x, &mut q);
        assert_eq!(s, 2.54f32 / 127.0);
        assert_eq!(q, [0, -127, 64, 0]); // 1.27/0.02 = 63.5 -> 64 (half to even)
        let s = quantize_row(&[0.0; 3], &mut q[..3]);
        assert_eq!(s, ACT_EPS / 127.0);
        assert_eq!(&q[..3], &[0, 0, 0]);
        let s = quantize_row(&[1.0, f32::INFINITY, 3.0], &mut q[..3]);
        assert!(s.is_nan());
        assert_eq!(&q[..3], &[0, 0, 0]);
    }
}
