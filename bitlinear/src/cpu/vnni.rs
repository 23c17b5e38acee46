//! The VNNI kernels: `vpdpbusd` multiplies four unsigned codes by four signed activations and
//! adds the sum to an i32 lane in one instruction (no i16 intermediate, so no overflow bound).
//!
//! Each call takes `ROWS` weight rows and up to `MAX_X_ROWS` activation rows: a weight vector
//! is loaded once, decoded once per plane (shift, mask) and multiplied into every activation
//! row, with `ROWS × rows` accumulators held in registers. The 256-bit kernels read the
//! 32-byte block layout, the 512-bit kernel the 64-byte one.

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
        CpuKernel::Avx512Vnni => run!(dot_512),
        CpuKernel::Avx512Vnni256 => run!(dot_256_evex),
        CpuKernel::AvxVnni => run!(dot_256_vex),
        _ => unreachable!("not a VNNI kernel: {kernel:?}"),
    }
}

/// The 256-bit kernel, generated for the VEX (AVX-VNNI) and EVEX (AVX-512 VL) encodings of the
/// same instruction.
macro_rules! dot_256 {
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

dot_256!(dot_256_vex, "avx2,avxvnni", _mm256_dpbusd_avx_epi32);
dot_256!(dot_256_evex, "avx2,avx512vnni,avx512vl", _mm256_dpbusd_epi32);

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
