//! CPU kernel: int8 activations × packed ternary weights → i32 accumulators.
//!
//! Weights stay packed. A byte holds four codes `c = w + 1 ∈ {0, 1, 2}` for `k = 4j..4j+3`, so
//! `Σ w·x = Σ c·x − Σ x`: the kernel multiplies unsigned codes by signed activations (the shape
//! of x86's `pmaddubsw`) and subtracts the row sum of the activations once per row.
//!
//! To decode without shuffles, each activation row is permuted once per call into blocks of
//! 128 values: for a block of 32 packed bytes, plane `p ∈ 0..4` holds `x[4i + p]` for lane
//! `i ∈ 0..32`, and plane `p` of the weights is simply `(byte >> 2p) & 3`. Rows are padded with
//! zero activations to a whole block, so padding codes contribute nothing.
//!
//! Work is split over output features (rows of the weight) with rayon; each task takes
//! `ROWS` weight rows at a time and reuses every activation load for all of them, and from two
//! activation rows on decodes each weight vector once for two rows of x.

use rayon::prelude::*;

use crate::quant;

/// Packed bytes per block (one 256-bit vector).
const BLOCK_BYTES: usize = 32;
/// Activations per block.
const BLOCK_K: usize = 4 * BLOCK_BYTES;
/// Weight rows computed together.
const ROWS: usize = 4;
/// Products smaller than this many multiply-adds run single-threaded.
const SERIAL_MACS: usize = 4 << 20;
/// Activation rows per cache tile (32 rows of K = 4096 codes: 128 KiB).
const M_TILE: usize = 32;

/// Activations prepared for the kernel: permuted, zero-padded, with row sums.
pub(crate) struct PreparedActivations {
    data: Vec<i8>,
    row_sums: Vec<i32>,
    blocks: usize,
}

impl PreparedActivations {
    /// Permutes `m` rows of `k` int8 codes (row-major) into the kernel's block layout.
    pub(crate) fn new(x_q: &[i8], m: usize, k: usize) -> Self {
        Self::build(m, k, |r, row| {
            row.copy_from_slice(&x_q[r * k..(r + 1) * k]);
            0.0
        })
        .0
    }

    /// Quantizes f32 rows `(m, k)` straight into the kernel's layout; returns the scale of each
    /// row (all equal to `per_tensor_scale` when given).
    pub(crate) fn quantize(x: &[f32], m: usize, k: usize, per_tensor_scale: Option<f32>) -> (Self, Vec<f32>) {
        Self::build(m, k, |r, row| {
            let src = &x[r * k..(r + 1) * k];
            let s = per_tensor_scale.unwrap_or_else(|| quant::absmax_scale(src));
            quant::quantize_row_with_scale(src, s, row);
            s
        })
    }

    /// Fills each row's codes through `fill(row_index, codes) -> scale` (rows in parallel), then
    /// permutes them. Returns the prepared rows and the scales.
    fn build(m: usize, k: usize, fill: impl Fn(usize, &mut [i8]) -> f32 + Sync) -> (Self, Vec<f32>) {
        let blocks = k.div_ceil(BLOCK_K);
        let row_len = blocks * BLOCK_K;
        let mut data = vec![0i8; m * row_len];
        let mut row_sums = vec![0i32; m];
        let mut scales = vec![0f32; m];
        if row_len == 0 {
            scales.iter_mut().enumerate().for_each(|(r, s)| *s = fill(r, &mut []));
        } else {
            let row = |codes: &mut Vec<i8>, (r, ((dst, sum), scale)): (usize, ((&mut [i8], &mut i32), &mut f32))| {
                *scale = fill(r, &mut codes[..k]); // the tail beyond k stays zero
                *sum = codes[..k].iter().map(|&v| v as i32).sum();
                for (d, c) in dst.chunks_exact_mut(BLOCK_K).zip(codes.chunks_exact(BLOCK_K)) {
                    for lane in 0..BLOCK_BYTES {
                        for plane in 0..4 {
                            d[plane * BLOCK_BYTES + lane] = c[4 * lane + plane];
                        }
                    }
                }
            };
            if m * row_len < SERIAL_MACS / 64 {
                let mut codes = vec![0i8; row_len];
                let rows = data.chunks_mut(row_len).zip(row_sums.iter_mut()).zip(scales.iter_mut());
                rows.enumerate().for_each(|item| row(&mut codes, item));
            } else {
                data.par_chunks_mut(row_len)
                    .zip(row_sums.par_iter_mut())
                    .zip(scales.par_iter_mut())
                    .enumerate()
                    .for_each_init(|| vec![0i8; row_len], row);
            }
        }
        (Self { data, row_sums, blocks }, scales)
    }

    fn row(&self, m: usize) -> &[i8] {
        let len = self.blocks * BLOCK_K;
        &self.data[m * len..(m + 1) * len]
    }
}

/// Computes `acc[m][n] = Σ_k x_q[m][k] · w[n][k]` for packed weight bytes `(n, ceil(k/4))`.
/// Returns the accumulators row-major `(m, n)`.
pub(crate) fn packed_accumulate(x: &PreparedActivations, packed: &[u8], n: usize, k: usize) -> Vec<i32> {
    let m = x.row_sums.len();
    let k4 = k.div_ceil(4);
    let mut acc_nm = vec![0i32; n * m]; // transposed: one contiguous run per weight row
    if m == 0 || n == 0 {
        return acc_nm;
    }
    let padded = x.blocks * BLOCK_BYTES;
    // Rows per rayon task: enough work per task, enough tasks for both cores.
    let rows_per_task = ROWS * (n / (ROWS * 32)).clamp(1, 16);
    let task = |(t, out): (usize, &mut [i32])| {
        let n0 = t * rows_per_task;
        let rows = out.len() / m;
        // Rows are used in place when they are whole blocks; otherwise copied zero-padded.
        let direct = k4 == padded;
        let mut wbuf = Vec::new();
        // Activation rows in tiles that stay in L2 while every weight tile of the task passes.
        for m0 in (0..m).step_by(M_TILE) {
            for r0 in (0..rows).step_by(ROWS) {
                let nr = ROWS.min(rows - r0);
                let first = (n0 + r0) * k4;
                let w: &[u8] = if direct && nr == ROWS {
                    &packed[first..first + ROWS * k4]
                } else {
                    wbuf.clear();
                    wbuf.resize(ROWS * padded, 0);
                    for r in 0..nr {
                        let src = &packed[first + r * k4..first + (r + 1) * k4];
                        wbuf[r * padded..r * padded + k4].copy_from_slice(src);
                    }
                    &wbuf
                };
                let end = m.min(m0 + M_TILE);
                let mut mm = m0;
                while mm < end {
                    // two activation rows at a time, the last one alone
                    let here = (end - mm).min(2);
                    let dots = if here == 2 {
                        dot_rows2(w, padded, x.row(mm), x.row(mm + 1))
                    } else {
                        [dot_rows(w, padded, x.row(mm)), [0; ROWS]]
                    };
                    for (i, d) in dots.iter().enumerate().take(here) {
                        for r in 0..nr {
                            out[(r0 + r) * m + mm + i] = d[r] - x.row_sums[mm + i];
                        }
                    }
                    mm += here;
                }
            }
        }
    };
    // Waking the thread pool costs tens of microseconds: small products run on this thread.
    if m * n * k < SERIAL_MACS {
        acc_nm.chunks_mut(rows_per_task * m).enumerate().for_each(task);
    } else {
        acc_nm.par_chunks_mut(rows_per_task * m).enumerate().for_each(task);
    }
    if m == 1 {
        return acc_nm; // (1, n) and (n, 1) are the same layout
    }
    // Back to (m, n).
    let mut acc = vec![0i32; m * n];
    for (nn, col) in acc_nm.chunks_exact(m).enumerate() {
        for (mm, &v) in col.iter().enumerate() {
            acc[mm * n + nn] = v;
        }
    }
    acc
}

/// `Σ c·x` of `ROWS` padded weight rows (stride `padded` bytes) against one prepared row.
#[inline]
fn dot_rows(w: &[u8], padded: usize, x: &[i8]) -> [i32; ROWS] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 support was just checked.
            return unsafe { avx2::dot_rows(w, padded, x) };
        }
    }
    dot_rows_portable(w, padded, x)
}

/// `dot_rows` for two prepared rows at once.
#[inline]
fn dot_rows2(w: &[u8], padded: usize, x0: &[i8], x1: &[i8]) -> [[i32; ROWS]; 2] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 support was just checked.
            return unsafe { avx2::dot_rows2(w, padded, x0, x1) };
        }
    }
    [dot_rows_portable(w, padded, x0), dot_rows_portable(w, padded, x1)]
}

/// Portable version; the compiler vectorizes the lane loops.
fn dot_rows_portable(w: &[u8], padded: usize, x: &[i8]) -> [i32; ROWS] {
    let mut out = [0i32; ROWS];
    for (r, o) in out.iter_mut().enumerate() {
        let row = &w[r * padded..(r + 1) * padded];
        let mut lanes = [0i32; BLOCK_BYTES];
        for (wb, xb) in row.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(BLOCK_K)) {
            for p in 0..4 {
                let xp = &xb[p * BLOCK_BYTES..(p + 1) * BLOCK_BYTES];
                for i in 0..BLOCK_BYTES {
                    lanes[i] += ((wb[i] >> (2 * p)) & 3) as i32 * xp[i] as i32;
                }
            }
        }
        *o = lanes.iter().sum();
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK_BYTES, BLOCK_K, ROWS};
    use std::arch::x86_64::*;

    /// AVX2: `pmaddubsw` multiplies the unsigned 2-bit codes by the signed activations (products
    /// at most 2·128 in magnitude, pair sums within i16), `pmaddwd` widens to i32.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_rows(w: &[u8], padded: usize, x: &[i8]) -> [i32; ROWS] {
        let blocks = padded / BLOCK_BYTES;
        debug_assert!(w.len() >= ROWS * padded && x.len() >= blocks * BLOCK_K);
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); ROWS];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        for b in 0..blocks {
            let xs = [
                _mm256_loadu_si256(xp.add(b * BLOCK_K) as *const __m256i),
                _mm256_loadu_si256(xp.add(b * BLOCK_K + 32) as *const __m256i),
                _mm256_loadu_si256(xp.add(b * BLOCK_K + 64) as *const __m256i),
                _mm256_loadu_si256(xp.add(b * BLOCK_K + 96) as *const __m256i),
            ];
            for (r, a) in acc.iter_mut().enumerate() {
                let v = _mm256_loadu_si256(wp.add(r * padded + b * BLOCK_BYTES) as *const __m256i);
                let c0 = _mm256_and_si256(v, mask);
                let c1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), mask);
                let c2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                let c3 = _mm256_and_si256(_mm256_srli_epi16(v, 6), mask);
                // Each maddubs lane is within ±512; four of them within ±2048: no i16 overflow.
                let s = _mm256_add_epi16(
                    _mm256_add_epi16(_mm256_maddubs_epi16(c0, xs[0]), _mm256_maddubs_epi16(c1, xs[1])),
                    _mm256_add_epi16(_mm256_maddubs_epi16(c2, xs[2]), _mm256_maddubs_epi16(c3, xs[3])),
                );
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(s, ones));
            }
        }
        let mut out = [0i32; ROWS];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(a);
        }
        out
    }

    /// Blocks whose i16 partial sums may add up before they are widened: a block adds at most
    /// 4 · 512 = 2048 in magnitude to a lane, and 8 · 2048 < 32767.
    const I16_BLOCKS: usize = 8;

    /// `dot_rows` against two prepared rows: every weight vector is decoded once for both. The
    /// products go into i16 lane sums for up to `I16_BLOCKS` blocks, then are widened to i32.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_rows2(w: &[u8], padded: usize, x0: &[i8], x1: &[i8]) -> [[i32; ROWS]; 2] {
        let blocks = padded / BLOCK_BYTES;
        debug_assert!(w.len() >= ROWS * padded && x0.len() >= blocks * BLOCK_K && x1.len() >= blocks * BLOCK_K);
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); ROWS]; 2];
        let wp = w.as_ptr();
        let (xp0, xp1) = (x0.as_ptr(), x1.as_ptr());
        let mut b0 = 0;
        while b0 < blocks {
            let b1 = blocks.min(b0 + I16_BLOCKS);
            let mut s = [[_mm256_setzero_si256(); ROWS]; 2];
            for b in b0..b1 {
                let mut v = [_mm256_setzero_si256(); ROWS];
                for (r, vr) in v.iter_mut().enumerate() {
                    *vr = _mm256_loadu_si256(wp.add(r * padded + b * BLOCK_BYTES) as *const __m256i);
                }
                for p in 0..4 {
                    let xa = _mm256_loadu_si256(xp0.add(b * BLOCK_K + 32 * p) as *const __m256i);
                    let xb = _mm256_loadu_si256(xp1.add(b * BLOCK_K + 32 * p) as *const __m256i);
                    for r in 0..ROWS {
                        let c = _mm256_and_si256(shift_right_2p(v[r], p), mask);
                        s[0][r] = _mm256_add_epi16(s[0][r], _mm256_maddubs_epi16(c, xa));
                        s[1][r] = _mm256_add_epi16(s[1][r], _mm256_maddubs_epi16(c, xb));
                    }
                }
            }
            for (a, t) in acc.iter_mut().zip(&s) {
                for (ar, tr) in a.iter_mut().zip(t) {
                    *ar = _mm256_add_epi32(*ar, _mm256_madd_epi16(*tr, ones));
                }
            }
            b0 = b1;
        }
        let mut out = [[0i32; ROWS]; 2];
        for (o, a) in out.iter_mut().zip(&acc) {
            for (or, ar) in o.iter_mut().zip(a) {
                *or = hsum(*ar);
            }
        }
        out
    }

    /// `v >> 2p` in each 16-bit lane (the codes of plane `p` end up in the low bits of each byte).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn shift_right_2p(v: __m256i, p: usize) -> __m256i {
        match p {
            0 => v,
            1 => _mm256_srli_epi16(v, 2),
            2 => _mm256_srli_epi16(v, 4),
            _ => _mm256_srli_epi16(v, 6),
        }
    }

    /// The sum of the eight i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256i) -> i32 {
        let mut lanes = [0i32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v);
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(xq: &[i8], w: &[i8], m: usize, n: usize, k: usize) -> Vec<i32> {
        let mut out = vec![0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| xq[i * k + t] as i32 * w[j * k + t] as i32).sum();
            }
        }
        out
    }

    #[test]
    fn portable_and_simd_agree_with_naive() {
        let mut seed = 0x1234_5678u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // k = 2100 and 4100: more than 8 blocks, so the two-row kernel widens its i16 sums
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (2, 9, 130),
            (5, 17, 257),
            (1, 33, 512),
            (4, 9, 2100),
            (3, 6, 4100),
        ] {
            let xq: Vec<i8> = (0..m * k).map(|_| next() as i8).collect();
            let w: Vec<i8> = (0..n * k).map(|_| (next() % 3) as i8 - 1).collect();
            let packed = crate::packed::pack_ternary(&w, n, k).unwrap();
            let prep = PreparedActivations::new(&xq, m, k);
            assert_eq!(packed_accumulate(&prep, &packed, n, k), naive(&xq, &w, m, n, k));
            // The portable path on its own, on the first ROWS rows.
            let padded = prep.blocks * BLOCK_BYTES;
            let mut wbuf = vec![0u8; ROWS * padded];
            let k4 = k.div_ceil(4);
            for r in 0..ROWS.min(n) {
                wbuf[r * padded..r * padded + k4].copy_from_slice(&packed[r * k4..(r + 1) * k4]);
            }
            let want = dot_rows(&wbuf, padded, prep.row(0));
            assert_eq!(dot_rows_portable(&wbuf, padded, prep.row(0)), want);
            if m >= 2 {
                let want1 = dot_rows_portable(&wbuf, padded, prep.row(1));
                assert_eq!(dot_rows2(&wbuf, padded, prep.row(0), prep.row(1)), [want, want1]);
            }
        }
    }

    /// The extremes of the i16 partial sums: every code 2 (w = +1) against all -128 or all
    /// +127, over many blocks.
    #[test]
    fn two_row_kernel_extremes() {
        let (m, n, k) = (3, 5, 8 * 128 * 3 + 5);
        let w = vec![1i8; n * k];
        let packed = crate::packed::pack_ternary(&w, n, k).unwrap();
        for v in [-128i8, 127] {
            let xq = vec![v; m * k];
            let prep = PreparedActivations::new(&xq, m, k);
            assert_eq!(
                packed_accumulate(&prep, &packed, n, k),
                vec![v as i32 * k as i32; m * n]
            );
        }
    }
}
