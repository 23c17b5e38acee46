//! The vectorized preparation of activation rows: quantization (as [`crate::quant::int8`], bit
//! for bit) and the permutation into the kernels' block layout, 128 codes at a time.
//!
//! A chunk of 128 natural-order codes is four 32-byte vectors. Lane `i` of a block owns the four
//! codes `4i..4i+3` (one dword); plane `p` gathers byte `p` of every dword. Per vector, a byte
//! shuffle groups each 128-bit half's bytes by plane and a dword permutation makes 64-bit word
//! `p` hold plane `p` of the vector's eight lanes; a 4 × 4 transpose of 64-bit words across the
//! four vectors then gives the 32 lanes of each plane. A block of `4 · bb` codes is `bb / 32`
//! such chunks, each filling its 32 lanes of every plane.

use std::arch::x86_64::*;

/// Codes per chunk.
const CHUNK: usize = 128;

/// Permutes natural-order `codes` (`codes.len() <= dst.len()`) into `dst` (zeroed, blocks of
/// `4 · bb` codes, `bb` a multiple of 32); returns the sum of the codes.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn permute(codes: &[i8], bb: usize, dst: &mut [i8]) -> i32 {
    assert!(codes.len() <= dst.len() && dst.len().is_multiple_of(4 * bb) && bb.is_multiple_of(32));
    let mut sum = 0i32;
    for (c, chunk) in codes.chunks(CHUNK).enumerate() {
        let mut padded = [0i8; CHUNK];
        let src = if chunk.len() == CHUNK {
            chunk
        } else {
            padded[..chunk.len()].copy_from_slice(chunk);
            &padded
        };
        let v: [__m256i; 4] = std::array::from_fn(|j| _mm256_loadu_si256(src.as_ptr().add(32 * j).cast()));
        store_planes(planes(v), bb, c, dst);
        sum += chunk.iter().map(|&x| x as i32).sum::<i32>();
    }
    sum
}

/// Quantizes `x` with scale `s` (finite, positive) into codes as `quant::int8` does and permutes
/// them into `dst` as [`permute`] does; returns the sum of the codes.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_permute(x: &[f32], s: f32, bb: usize, dst: &mut [i8]) -> i32 {
    assert!(x.len() <= dst.len() && dst.len().is_multiple_of(4 * bb) && bb.is_multiple_of(32));
    let s = _mm256_set1_ps(s);
    let mut sums = _mm256_setzero_si256();
    for (c, chunk) in x.chunks(CHUNK).enumerate() {
        let mut padded = [0f32; CHUNK];
        let src = if chunk.len() == CHUNK {
            chunk
        } else {
            padded[..chunk.len()].copy_from_slice(chunk);
            &padded
        };
        let v: [__m256i; 4] = std::array::from_fn(|j| {
            let q: [__m256i; 4] =
                std::array::from_fn(|i| quantize8(_mm256_loadu_ps(src.as_ptr().add(32 * j + 8 * i)), s));
            sums = _mm256_add_epi32(
                sums,
                _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])),
            );
            // packs interleave 128-bit halves: dwords come out as a0-3 b0-3 c0-3 d0-3 a4-7 ...
            let ab = _mm256_packs_epi32(q[0], q[1]);
            let cd = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_packs_epi16(ab, cd);
            _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
        });
        store_planes(planes(v), bb, c, dst);
    }
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sums);
    lanes.iter().sum()
}

/// `quant::int8` on eight values: `clamp(round_half_even(clamp(x / s, ±256)), -128, 127)`, NaN
/// to 0, as i32.
#[inline]
#[target_feature(enable = "avx2")]
fn quantize8(x: __m256, s: __m256) -> __m256i {
    let q = _mm256_div_ps(x, s);
    let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(q, q));
    let q = _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(-256.0)), _mm256_set1_ps(256.0));
    let q = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q);
    let q = _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(-128.0)), _mm256_set1_ps(127.0));
    _mm256_and_si256(_mm256_cvtps_epi32(q), ordered)
}

/// The four 32-byte planes of a chunk of 128 natural-order codes.
#[inline]
#[target_feature(enable = "avx2")]
fn planes(v: [__m256i; 4]) -> [__m256i; 4] {
    let by_plane = _mm256_setr_epi8(
        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, //
        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
    );
    let halves = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // Word p of w[j]: plane p of lanes 8j..8j+7.
    let w = v.map(|x| _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(x, by_plane), halves));
    let t0 = _mm256_unpacklo_epi64(w[0], w[1]);
    let t1 = _mm256_unpackhi_epi64(w[0], w[1]);
    let t2 = _mm256_unpacklo_epi64(w[2], w[3]);
    let t3 = _mm256_unpackhi_epi64(w[2], w[3]);
    [
        _mm256_permute2x128_si256::<0x20>(t0, t2),
        _mm256_permute2x128_si256::<0x20>(t1, t3),
        _mm256_permute2x128_si256::<0x31>(t0, t2),
        _mm256_permute2x128_si256::<0x31>(t1, t3),
    ]
}

/// Stores the planes of chunk `c` at their places in `dst` (blocks of `4 · bb` codes).
#[inline]
#[target_feature(enable = "avx2")]
fn store_planes(p: [__m256i; 4], bb: usize, c: usize, dst: &mut [i8]) {
    let chunks_per_block = 4 * bb / CHUNK;
    let base = (c / chunks_per_block) * 4 * bb + (c % chunks_per_block) * 32;
    for (plane, v) in p.iter().enumerate() {
        let at = base + plane * bb;
        assert!(at + 32 <= dst.len());
        // SAFETY: in bounds (checked above).
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().add(at).cast(), *v) };
    }
}
