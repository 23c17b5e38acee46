//! The VNNI kernels: `vpdpbusd` multiplies four unsigned codes by four signed activations and
//! adds the sum to an i32 lane in one instruction (no i16 intermediate, so no overflow bound).
//!
//! Each call takes `ROWS` weight rows and up to `MAX_X_ROWS` activation rows: a weight vector
//! is loaded once, decoded once per plane (shift, mask) and multiplied into every activation
//! row, with `ROWS × rows` accumulators held in registers. With a single activation row (decode)
//! the EVEX kernels mask each plane in place instead of shifting it down, with an accumulator per
//! plane ([`dot_512_one_row`]). The 256-bit kernels read the 32-byte block layout, the 512-bit
//! kernel the 64-byte one.

use std::arch::x86_64::*;

use super::kernel::{CpuKernel, Strides, MAX_X_ROWS};
use super::ROWS;

/// Runs `kernel` (a VNNI kernel) on `rows` activation rows at `x` (stride `x_stride`).
///
/// # Safety
/// The CPU must have the kernel's features; `w` holds `ROWS` rows of `blocks` blocks placed by
/// `s` and `x` holds `rows` prepared rows of `blocks` blocks in the kernel's layout.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dot(
    kernel: CpuKernel,
    w: *const u8,
    s: Strides,
    blocks: usize,
    x: *const i8,
    x_stride: usize,
    rows: usize,
    out: &mut [[i32; ROWS]; MAX_X_ROWS],
) {
    macro_rules! run {
        ($f:ident) => {
            match rows {
                1 => out[..1].copy_from_slice(&$f::<1>(w, s, blocks, x, x_stride)),
                2 => out[..2].copy_from_slice(&$f::<2>(w, s, blocks, x, x_stride)),
                3 => out[..3].copy_from_slice(&$f::<3>(w, s, blocks, x, x_stride)),
                _ => out[..4].copy_from_slice(&$f::<4>(w, s, blocks, x, x_stride)),
            }
        };
    }
    match kernel {
        CpuKernel::Avx512Vnni if rows == 1 && blocks <= MASKED_MAX_BLOCKS => {
            out[0] = dot_512_one_row(w, s, blocks, x);
        }
        CpuKernel::Avx512Vnni => run!(dot_512),
        CpuKernel::Avx512Vnni256 if rows == 1 && blocks <= MASKED_MAX_BLOCKS => {
            out[0] = dot_256_evex_one_row(w, s, blocks, x);
        }
        CpuKernel::Avx512Vnni256 => run!(dot_256_evex),
        CpuKernel::AvxVnni => run!(dot_256_vex),
        _ => unreachable!("not a VNNI kernel: {kernel:?}"),
    }
}

/// The 256-bit kernels, generated for the VEX (AVX-VNNI) and EVEX (AVX-512 VL) encodings of the
/// same instruction: for any number of rows, and (given a second name) for one row as
/// [`dot_512_one_row`].
macro_rules! dot_256 {
    ($name:ident, $one_row:ident, $features:literal, $dpbusd:ident) => {
        dot_256!($name, $features, $dpbusd);

        /// One activation row, planes masked in place (see [`dot_512_one_row`]).
        #[target_feature(enable = $features)]
        unsafe fn $one_row(w: *const u8, s: Strides, blocks: usize, x: *const i8) -> [i32; ROWS] {
            const BYTES: usize = 32;
            let masks = [
                _mm256_set1_epi8(0x03),
                _mm256_set1_epi8(0x0c),
                _mm256_set1_epi8(0x30),
                _mm256_set1_epi8(0xc0_u8 as i8),
            ];
            let mut acc = [[_mm256_setzero_si256(); ROWS]; 4];
            for b in 0..blocks {
                s.prefetch(w, b);
                let mut v = [_mm256_setzero_si256(); ROWS];
                for (r, vr) in v.iter_mut().enumerate() {
                    *vr = _mm256_loadu_si256(w.add(r * s.row + b * s.block).cast());
                }
                for (p, (ap, mask)) in acc.iter_mut().zip(&masks).enumerate() {
                    let xs = _mm256_loadu_si256(x.add(b * 4 * BYTES + p * BYTES).cast());
                    for (a, vr) in ap.iter_mut().zip(&v) {
                        *a = $dpbusd(*a, _mm256_and_si256(*vr, *mask), xs);
                    }
                }
            }
            let mut out = [0i32; ROWS];
            for (r, o) in out.iter_mut().enumerate() {
                let sum = _mm256_add_epi32(
                    _mm256_add_epi32(acc[0][r], _mm256_srai_epi32::<2>(acc[1][r])),
                    _mm256_add_epi32(
                        _mm256_srai_epi32::<4>(acc[2][r]),
                        _mm256_srai_epi32::<6>(acc[3][r]),
                    ),
                );
                let mut lanes = [0i32; 8];
                _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sum);
                *o = lanes.iter().sum();
            }
            out
        }
    };
    ($name:ident, $features:literal, $dpbusd:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const MX: usize>(
            w: *const u8,
            s: Strides,
            blocks: usize,
            x: *const i8,
            x_stride: usize,
        ) -> [[i32; ROWS]; MX] {
            const BYTES: usize = 32;
            let mask = _mm256_set1_epi8(3);
            let mut acc = [[_mm256_setzero_si256(); ROWS]; MX];
            for b in 0..blocks {
                s.prefetch(w, b);
                let mut v = [_mm256_setzero_si256(); ROWS];
                for (r, vr) in v.iter_mut().enumerate() {
                    *vr = _mm256_loadu_si256(w.add(r * s.row + b * s.block).cast());
                }
                macro_rules! plane {
                    ($p:literal) => {{
                        let mut c = [_mm256_setzero_si256(); ROWS];
                        for (cr, vr) in c.iter_mut().zip(&v) {
                            *cr = _mm256_and_si256(_mm256_srli_epi16::<{ 2 * $p }>(*vr), mask);
                        }
                        for (i, ai) in acc.iter_mut().enumerate() {
                            let xs = _mm256_loadu_si256(x.add(i * x_stride + b * 4 * BYTES + $p * BYTES).cast());
                            for (a, cr) in ai.iter_mut().zip(&c) {
                                *a = $dpbusd(*a, *cr, xs);
                            }
                        }
                    }};
                }
                plane!(0);
                plane!(1);
                plane!(2);
                plane!(3);
            }
            let mut out = [[0i32; ROWS]; MX];
            for (o, a) in out.iter_mut().zip(&acc) {
                for (or, ar) in o.iter_mut().zip(a) {
                    let mut lanes = [0i32; 8];
                    _mm256_storeu_si256(lanes.as_mut_ptr().cast(), *ar);
                    *or = lanes.iter().sum();
                }
            }
            out
        }
    };
}

// No one-row variant with VEX: its 16 accumulators and 4 masks need more than the 16 registers
// VEX can name, and the spills made it slower than the shifting kernel.
dot_256!(dot_256_vex, "avx2,avxvnni", _mm256_dpbusd_avx_epi32);
dot_256!(
    dot_256_evex,
    dot_256_evex_one_row,
    "avx2,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32
);

/// Most blocks the one-row kernels ([`dot_512_one_row`]) take: a lane of their plane-3
/// accumulator grows by at most `4 · 192 · 128 = 98,304` a block (four products of a byte's top
/// two bits, at most 192 even for the non-code 3, by an activation of magnitude at most 128), so
/// `2^14` blocks keep it within i32 (at most 1.61e9).
pub(super) const MASKED_MAX_BLOCKS: usize = 1 << 14;

/// The 512-bit kernel for a single activation row (decode). With one row the decoding is most of
/// the work: shifting each plane down and masking it is two instructions for one `vpdpbusd`.
/// Here plane `p` is only masked in place (`byte & (3 << 2p)`, the code times `4^p`) into an
/// accumulator of its own, and each accumulator is divided by `4^p` at the end, exactly (every
/// product in it is a multiple of `4^p`, and it stays within i32, see [`MASKED_MAX_BLOCKS`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_512_one_row(w: *const u8, s: Strides, blocks: usize, x: *const i8) -> [i32; ROWS] {
    const BYTES: usize = 64;
    let masks = [
        _mm512_set1_epi8(0x03),
        _mm512_set1_epi8(0x0c),
        _mm512_set1_epi8(0x30),
        _mm512_set1_epi8(0xc0_u8 as i8),
    ];
    let mut acc = [[_mm512_setzero_si512(); ROWS]; 4];
    for b in 0..blocks {
        s.prefetch(w, b);
        let mut v = [_mm512_setzero_si512(); ROWS];
        for (r, vr) in v.iter_mut().enumerate() {
            *vr = _mm512_loadu_si512(w.add(r * s.row + b * s.block).cast());
        }
        for (p, (ap, mask)) in acc.iter_mut().zip(&masks).enumerate() {
            let xs = _mm512_loadu_si512(x.add(b * 4 * BYTES + p * BYTES).cast());
            for (a, vr) in ap.iter_mut().zip(&v) {
                *a = _mm512_dpbusd_epi32(*a, _mm512_and_si512(*vr, *mask), xs);
            }
        }
    }
    let mut out = [0i32; ROWS];
    for (r, o) in out.iter_mut().enumerate() {
        let sum = _mm512_add_epi32(
            _mm512_add_epi32(acc[0][r], _mm512_srai_epi32::<2>(acc[1][r])),
            _mm512_add_epi32(_mm512_srai_epi32::<4>(acc[2][r]), _mm512_srai_epi32::<6>(acc[3][r])),
        );
        *o = _mm512_reduce_add_epi32(sum);
    }
    out
}

/// The 512-bit kernel over 64-byte blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_512<const MX: usize>(
    w: *const u8,
    s: Strides,
    blocks: usize,
    x: *const i8,
    x_stride: usize,
) -> [[i32; ROWS]; MX] {
    const BYTES: usize = 64;
    let mask = _mm512_set1_epi8(3);
    let mut acc = [[_mm512_setzero_si512(); ROWS]; MX];
    for b in 0..blocks {
        s.prefetch(w, b);
        let mut v = [_mm512_setzero_si512(); ROWS];
        for (r, vr) in v.iter_mut().enumerate() {
            *vr = _mm512_loadu_si512(w.add(r * s.row + b * s.block).cast());
        }
        macro_rules! plane {
            ($p:literal) => {{
                let mut c = [_mm512_setzero_si512(); ROWS];
                for (cr, vr) in c.iter_mut().zip(&v) {
                    *cr = _mm512_and_si512(_mm512_srli_epi16::<{ 2 * $p }>(*vr), mask);
                }
                for (i, ai) in acc.iter_mut().enumerate() {
                    let xs = _mm512_loadu_si512(x.add(i * x_stride + b * 4 * BYTES + $p * BYTES).cast());
                    for (a, cr) in ai.iter_mut().zip(&c) {
                        *a = _mm512_dpbusd_epi32(*a, *cr, xs);
                    }
                }
            }};
        }
        plane!(0);
        plane!(1);
        plane!(2);
        plane!(3);
    }
    let mut out = [[0i32; ROWS]; MX];
    for (o, a) in out.iter_mut().zip(&acc) {
        for (or, ar) in o.iter_mut().zip(a) {
            *or = _mm512_reduce_add_epi32(*ar);
        }
    }
    out
}
