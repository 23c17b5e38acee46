//! `out = x · Wᵀ` on the CPU with `x` f32 `(m, k)` and `W` bf16 `(n, k)`, each weight widened to
//! f32 as it is read (exact: a bf16 is the top half of an f32). A decode step reads the LM head
//! once, so its bytes bound the time: bf16 halves them against an f32 copy.
//!
//! Every product and sum is in f32 with FMA, over 16 (AVX-512) or 8 (AVX2) lanes and four
//! accumulators, then the lanes summed: the result differs from a plain f32 matmul of the widened
//! weights only in the order of the sums. Work is split over weight rows between rayon's threads.

use half::bf16;
use rayon::prelude::*;

/// Weight rows a task takes (32 rows of K = 2560 are 160 KiB of bf16, a sizeable stream).
const ROWS_PER_TASK: usize = 128;

/// `out[i · n + j] = Σ_l x[i · k + l] · widen(w[j · k + l])`; `x` holds `m · k` values, `w`
/// `n · k`.
pub(crate) fn matmul_bf16_weights(x: &[f32], w: &[bf16], m: usize, n: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!((x.len(), w.len()), (m * k, n * k));
    let dot = dot_kernel();
    let mut out = vec![0f32; m * n];
    if m == 1 {
        // Decode: each task writes its own slice of the one output row.
        out.par_chunks_mut(ROWS_PER_TASK)
            .zip(w.par_chunks(ROWS_PER_TASK * k.max(1)))
            .for_each(|(o, rows)| {
                for (j, oj) in o.iter_mut().enumerate() {
                    *oj = dot(x, &rows[j * k..(j + 1) * k]);
                }
            });
        return out;
    }
    // Columns of the output (weight rows) in tasks; each task writes its own (m, rows) block,
    // which is then scattered to row-major (m, n): cheap next to reading the weights.
    let blocks: Vec<Vec<f32>> = w
        .par_chunks(ROWS_PER_TASK * k.max(1))
        .map(|rows| {
            let r = rows.len() / k.max(1);
            let mut block = vec![0f32; m * r];
            for j in 0..r {
                let wj = &rows[j * k..(j + 1) * k];
                for i in 0..m {
                    block[i * r + j] = dot(&x[i * k..(i + 1) * k], wj);
                }
            }
            block
        })
        .collect();
    for (b, block) in blocks.iter().enumerate() {
        let j0 = b * ROWS_PER_TASK;
        let r = block.len() / m.max(1);
        for i in 0..m {
            out[i * n + j0..i * n + j0 + r].copy_from_slice(&block[i * r..(i + 1) * r]);
        }
    }
    out
}

/// The widest dot product this CPU runs.
fn dot_kernel() -> fn(&[f32], &[bf16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY (of the call): the CPU has AVX-512F.
            return |x, w| unsafe { x86::dot_avx512(x, w) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY (of the call): the CPU has AVX2 and FMA.
            return |x, w| unsafe { x86::dot_avx2(x, w) };
        }
    }
    dot_portable
}

/// Plain Rust, eight accumulators (the same association as the AVX2 kernel's lanes is not
/// promised; only f32 sums in some order).
pub(crate) fn dot_portable(x: &[f32], w: &[bf16]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.len() / 8;
    for (xs, ws) in x.chunks_exact(8).zip(w.chunks_exact(8)) {
        for ((a, xv), wv) in acc.iter_mut().zip(xs).zip(ws) {
            *a = xv.mul_add(wv.to_f32(), *a);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..x.len() {
        sum = x[i].mul_add(w[i].to_f32(), sum);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    /// How far ahead (in weights: 1 KiB) the loops ask for the next lines: the hardware
    /// prefetcher alone left the stream short of the memory's rate (a prefetch past the slice is
    /// harmless: prefetches do not fault).
    const PREFETCH: usize = 512;
    /// How far ahead (in weights: 8 KiB) the loops ask for lines into L2: far enough to cover
    /// DRAM's latency at the stream's rate, which the L1 distance alone does not.
    const PREFETCH_L2: usize = 4096;

    /// `s + Σ x·w` over the last weights of a row, one at a time.
    fn tail(x: &[f32], w: &[bf16], s: f32) -> f32 {
        x.iter().zip(w).fold(s, |s, (x, w)| x.mul_add(w.to_f32(), s))
    }

    /// AVX-512F dot product: 64 weights an iteration in four accumulators.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `x` and `w` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn dot_avx512(x: &[f32], w: &[bf16]) -> f32 {
        let n = x.len().min(w.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr() as *const u16);
        // Widening: zero-extend 16 bf16 bit patterns to 32 bits, then shift them to the top.
        let widen = |p: *const u16| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                p as *const __m256i,
            ))))
        };
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            _mm_prefetch::<_MM_HINT_T0>(wp.add(i + PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wp.add(i + PREFETCH + 32) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(wp.add(i + PREFETCH_L2) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(wp.add(i + PREFETCH_L2 + 32) as *const i8);
            for (a, acc) in acc.iter_mut().enumerate() {
                let o = i + 16 * a;
                *acc = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(o)), widen(wp.add(o)), *acc);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(i)), widen(wp.add(i)), acc[0]);
            i += 16;
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let s = _mm512_reduce_add_ps(sum);
        tail(&x[i..n], &w[i..n], s)
    }

    /// AVX2 + FMA dot product: 32 weights an iteration in four accumulators.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `x` and `w` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn dot_avx2(x: &[f32], w: &[bf16]) -> f32 {
        let n = x.len().min(w.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr() as *const u16);
        let widen = |p: *const u16| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                p as *const __m128i,
            ))))
        };
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            _mm_prefetch::<_MM_HINT_T0>(wp.add(i + PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(wp.add(i + PREFETCH_L2) as *const i8);
            for (a, acc) in acc.iter_mut().enumerate() {
                let o = i + 8 * a;
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o)), widen(wp.add(o)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), widen(wp.add(i)), acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
        let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let s = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)));
        tail(&x[i..n], &w[i..n], s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small xorshift: fresh values each case, reproducible from the seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Against an f64 reference of the widened weights: |error| within 1e-5 of Σ|x·w| (f32 sums
    /// of k terms in any order are within k·2⁻²⁴ of it; k <= 300 here).
    fn check(dot: fn(&[f32], &[bf16]) -> f32, what: &str) {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for k in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 300] {
            let x: Vec<f32> = (0..k).map(|_| rng.next() * 4.0).collect();
            let w: Vec<bf16> = (0..k).map(|_| bf16::from_f32(rng.next())).collect();
            let exact: f64 = x.iter().zip(&w).map(|(a, b)| *a as f64 * b.to_f64()).sum();
            let scale: f64 = x.iter().zip(&w).map(|(a, b)| (*a as f64 * b.to_f64()).abs()).sum();
            let got = dot(&x, &w) as f64;
            assert!(
                (got - exact).abs() <= 1e-5 * scale.max(1e-30),
                "{what}, k = {k}: {got} against {exact}"
            );
        }
    }

    #[test]
    fn dot_kernels_match_f64() {
        check(dot_portable, "portable");
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                check(|x, w| unsafe { x86::dot_avx512(x, w) }, "avx512");
            } else {
                eprintln!("skipped: the AVX-512 dot (no AVX-512F here)");
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA.
                check(|x, w| unsafe { x86::dot_avx2(x, w) }, "avx2");
            } else {
                eprintln!("skipped: the AVX2 dot (no AVX2/FMA here)");
            }
        }
    }

    #[test]
    fn matmul_places_every_output() {
        let mut rng = Rng(12345);
        for (m, n, k) in [
            (1, 1, 1),
            (3, 70, 33),
            (2, 65, 0),
            (1, 33, 129),
            (4, 32, 16),
            (1, 300, 40),
            (2, 260, 17),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.next()).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rng.next())).collect();
            let out = matmul_bf16_weights(&x, &w, m, n, k);
            assert_eq!(out.len(), m * n);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l].to_f64()).sum();
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * (k as f64 + 1.0),
                        "({m}, {n}, {k}) [{i}, {j}]: {got} against {exact}"
                    );
                }
            }
        }
    }
}
