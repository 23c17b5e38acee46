//! The AVX2 kernel: `pmaddubsw` on 256-bit vectors, one block = 32 packed bytes.

use super::kernel::Strides;
use super::ROWS;
use std::arch::x86_64::*;

/// Packed bytes per block (one 256-bit vector).
const BLOCK_BYTES: usize = 32;
/// Activations per block.
const BLOCK_K: usize = 4 * BLOCK_BYTES;

/// AVX2: `pmaddubsw` multiplies the unsigned 2-bit codes by the signed activations (products
/// at most 2·128 in magnitude, pair sums within i16), `pmaddwd` widens to i32.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot_rows(w: &[u8], s: Strides, blocks: usize, x: &[i8]) -> [i32; ROWS] {
    debug_assert!(x.len() >= blocks * BLOCK_K);
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_si256(); ROWS];
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    for b in 0..blocks {
        s.prefetch(wp, b);
        let xs = [
            _mm256_loadu_si256(xp.add(b * BLOCK_K) as *const __m256i),
            _mm256_loadu_si256(xp.add(b * BLOCK_K + 32) as *const __m256i),
            _mm256_loadu_si256(xp.add(b * BLOCK_K + 64) as *const __m256i),
            _mm256_loadu_si256(xp.add(b * BLOCK_K + 96) as *const __m256i),
        ];
        for (r, a) in acc.iter_mut().enumerate() {
            let v = _mm256_loadu_si256(wp.add(r * s.row + b * s.block) as *const __m256i);
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
pub(super) unsafe fn dot_rows2(w: &[u8], s: Strides, blocks: usize, x0: &[i8], x1: &[i8]) -> [[i32; ROWS]; 2] {
    debug_assert!(x0.len() >= blocks * BLOCK_K && x1.len() >= blocks * BLOCK_K);
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); ROWS]; 2];
    let wp = w.as_ptr();
    let (xp0, xp1) = (x0.as_ptr(), x1.as_ptr());
    let mut b0 = 0;
    while b0 < blocks {
        let b1 = blocks.min(b0 + I16_BLOCKS);
        let mut sums = [[_mm256_setzero_si256(); ROWS]; 2];
        for b in b0..b1 {
            s.prefetch(wp, b);
            let mut v = [_mm256_setzero_si256(); ROWS];
            for (r, vr) in v.iter_mut().enumerate() {
                *vr = _mm256_loadu_si256(wp.add(r * s.row + b * s.block) as *const __m256i);
            }
            for p in 0..4 {
                let xa = _mm256_loadu_si256(xp0.add(b * BLOCK_K + 32 * p) as *const __m256i);
                let xb = _mm256_loadu_si256(xp1.add(b * BLOCK_K + 32 * p) as *const __m256i);
                for r in 0..ROWS {
                    let c = _mm256_and_si256(shift_right_2p(v[r], p), mask);
                    sums[0][r] = _mm256_add_epi16(sums[0][r], _mm256_maddubs_epi16(c, xa));
                    sums[1][r] = _mm256_add_epi16(sums[1][r], _mm256_maddubs_epi16(c, xb));
                }
            }
        }
        for (a, t) in acc.iter_mut().zip(&sums) {
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
