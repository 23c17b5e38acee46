//! Activations prepared for a kernel: int8 codes permuted into the kernel's block layout (see the
//! module docs of [`super`]), zero-padded to whole blocks, with each row's code sum.
//!
//! Rows are filled in parallel. On CPUs with AVX2 the quantization and the permutation run
//! vectorized in one pass ([`super::prepare_avx2`]); elsewhere a scalar loop does the same. Both
//! give the same bytes (tested), so the choice of kernel alone decides the layout.

use std::cell::Cell;

use rayon::prelude::*;

use super::kernel::CpuKernel;
use super::SERIAL_MACS;
use crate::quant;

thread_local! {
    /// The prepared-activation buffer of the last call on this thread, reused by the next.
    static SCRATCH: Cell<Vec<i8>> = const { Cell::new(Vec::new()) };
}

/// Activations prepared for a kernel: permuted, zero-padded, with row sums.
pub(crate) struct PreparedActivations {
    pub(super) kernel: CpuKernel,
    pub(super) data: Vec<i8>,
    pub(super) row_sums: Vec<i32>,
    pub(super) blocks: usize,
}

impl Drop for PreparedActivations {
    fn drop(&mut self) {
        SCRATCH.set(std::mem::take(&mut self.data));
    }
}

/// Where a row's values come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// Int8 codes, row-major `(m, k)`.
    Codes(&'a [i8]),
    /// F32 values, row-major `(m, k)`, quantized per row (or with one given scale).
    Floats(&'a [f32], Option<f32>),
}

impl PreparedActivations {
    /// Permutes `m` rows of `k` int8 codes (row-major) into the layout of `kernel`.
    pub(crate) fn new(kernel: CpuKernel, x_q: &[i8], m: usize, k: usize) -> Self {
        Self::build(kernel, m, k, Source::Codes(x_q), use_avx2()).0
    }

    /// Quantizes f32 rows `(m, k)` straight into the layout of `kernel`; returns the scale of
    /// each row (all equal to `per_tensor_scale` when given).
    pub(crate) fn quantize(
        kernel: CpuKernel,
        x: &[f32],
        m: usize,
        k: usize,
        per_tensor_scale: Option<f32>,
    ) -> (Self, Vec<f32>) {
        Self::build(kernel, m, k, Source::Floats(x, per_tensor_scale), use_avx2())
    }

    /// Fills every row from `source` (rows in parallel when the call is large enough), with the
    /// vectorized path when `simd` (the caller checked AVX2).
    fn build(kernel: CpuKernel, m: usize, k: usize, source: Source, simd: bool) -> (Self, Vec<f32>) {
        let bb = kernel.block_bytes();
        let blocks = k.div_ceil(4 * bb);
        let row_len = blocks * 4 * bb;
        let mut data = SCRATCH.take();
        data.clear();
        data.resize(m * row_len, 0);
        let mut row_sums = vec![0i32; m];
        let mut scales = vec![0f32; m];
        let row = |(r, ((dst, sum), scale)): (usize, ((&mut [i8], &mut i32), &mut f32))| {
            let (s, total) = prepare_row(source, r, k, bb, dst, simd);
            (*scale, *sum) = (s, total);
        };
        if row_len == 0 {
            // k = 0: no codes, but each row still has its scale.
            for (r, s) in scales.iter_mut().enumerate() {
                *s = prepare_row(source, r, 0, bb, &mut [], simd).0;
            }
        } else if m * row_len < SERIAL_MACS / 64 {
            let rows = data.chunks_mut(row_len).zip(row_sums.iter_mut()).zip(scales.iter_mut());
            rows.enumerate().for_each(row);
        } else {
            let rows = data
                .par_chunks_mut(row_len)
                .zip(row_sums.par_iter_mut())
                .zip(scales.par_iter_mut());
            rows.enumerate().for_each(row);
        }
        (
            Self {
                kernel,
                data,
                row_sums,
                blocks,
            },
            scales,
        )
    }

    /// Length of one prepared row (a whole number of blocks).
    pub(super) fn row_len(&self) -> usize {
        self.blocks * 4 * self.kernel.block_bytes()
    }

    /// Prepared row `m`.
    #[cfg(test)]
    pub(super) fn row(&self, m: usize) -> &[i8] {
        &self.data[m * self.row_len()..(m + 1) * self.row_len()]
    }
}

/// Whether the vectorized preparation runs on this CPU.
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Writes row `r` of `source` into `dst` (zeroed, a whole number of blocks of `4 · bb` codes);
/// returns the row's scale (0 for codes) and code sum.
fn prepare_row(source: Source, r: usize, k: usize, bb: usize, dst: &mut [i8], simd: bool) -> (f32, i32) {
    let (scale, floats, codes) = match source {
        Source::Codes(x) => (0.0, None, &x[r * k..(r + 1) * k]),
        Source::Floats(x, given) => {
            let row = &x[r * k..(r + 1) * k];
            let s = given.unwrap_or_else(|| quant::absmax_scale(row));
            (s, Some(row), &[][..])
        }
    };
    // A NaN scale (a non-finite row) gives zero codes: `dst` already is.
    if floats.is_some() && scale.is_nan() {
        return (scale, 0);
    }
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only set where the CPU has AVX2; the lengths match as documented.
        let sum = unsafe {
            match floats {
                Some(f) => super::prepare_avx2::quantize_permute(f, scale, bb, dst),
                None => super::prepare_avx2::permute(codes, bb, dst),
            }
        };
        return (scale, sum);
    }
    let _ = simd;
    let mut natural = vec![0i8; dst.len()];
    match floats {
        Some(f) => quant::quantize_row_with_scale(f, scale, &mut natural[..k]),
        None => natural[..k].copy_from_slice(codes),
    }
    (scale, permute_scalar(&natural, bb, dst))
}

/// The scalar permutation of zero-padded natural-order codes; returns their sum.
fn permute_scalar(natural: &[i8], bb: usize, dst: &mut [i8]) -> i32 {
    for (d, c) in dst.chunks_exact_mut(4 * bb).zip(natural.chunks_exact(4 * bb)) {
        for lane in 0..bb {
            for plane in 0..4 {
                d[plane * bb + lane] = c[4 * lane + plane];
            }
        }
    }
    natural.iter().map(|&v| v as i32).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::tests::XorShift;

    /// The vectorized path writes the same bytes, sums and scales as the scalar one, for codes
    /// and floats (per row and per tensor), on every block width, with tails, ties, extremes and
    /// a non-finite row.
    #[test]
    fn vectorized_preparation_equals_scalar() {
        if !use_avx2() {
            eprintln!("no AVX2: the vectorized preparation is not tested on this CPU");
            return;
        }
        let mut rng = XorShift(0x5eed_1234 ^ std::process::id() as u64);
        for kernel in [CpuKernel::Avx2, CpuKernel::Avx512Vnni] {
            for &(m, k) in &[(1, 1), (3, 127), (2, 128), (4, 129), (5, 300), (2, 1000), (3, 4100)] {
                let codes: Vec<i8> = (0..m * k).map(|_| rng.next() as i8).collect();
                let mut floats: Vec<f32> = (0..m * k).map(|_| rng.float() * 3.0).collect();
                // Exact ties of x / s at ±n.5 (s = 1/127 · max|x| = 1 when max|x| = 127), the
                // extremes, and a NaN in the last row when there are several.
                floats[0] = 127.0;
                for (i, v) in floats.iter_mut().enumerate().take(k).skip(1) {
                    *v = [0.5, -0.5, 1.5, -2.5, 126.5, -127.0, 0.0, -0.0][i % 8];
                }
                if m > 1 {
                    floats[(m - 1) * k] = f32::NAN;
                }
                for source in [
                    Source::Codes(&codes),
                    Source::Floats(&floats, None),
                    Source::Floats(&floats[..k], Some(0.37)),
                ] {
                    let rows = match source {
                        Source::Floats(_, Some(_)) => 1,
                        _ => m,
                    };
                    let (a, sa) = PreparedActivations::build(kernel, rows, k, source, true);
                    let (b, sb) = PreparedActivations::build(kernel, rows, k, source, false);
                    assert_eq!(a.data, b.data, "{kernel:?} {rows}x{k}");
                    assert_eq!(a.row_sums, b.row_sums, "{kernel:?} {rows}x{k}");
                    assert_eq!(
                        sa.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                        sb.iter().map(|s| s.to_bits()).collect::<Vec<_>>()
                    );
                }
            }
        }
    }
}
