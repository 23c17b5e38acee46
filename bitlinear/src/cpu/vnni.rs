//! The VNNI kernels: `vpdpbusd` multiplies four unsigned codes by four signed activations and
//! adds the sum to an i32 lane in one instruction (no i16 intermediate, so no overflow bound).
//!
//! Each call takes `ROWS` weight rows and up to `MAX_X_ROWS` activation rows: a weight vector
//! is loaded once, decoded once per plane (shift, mask) and multiplied into every activation
//! row, with `ROWS × rows` accumulators held in registers. With a single activation row (decode)
//! the EVEX kernels mask each plane in place instead of shifting it down, with an accumulator per
//! plane (`dot_512_one_row`). The 256-bit kernels read the 32-byte block layout, the 512-bit
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
    let one_row = rows == 1 && blocks <= MASKED_MAX_BLOCKS;
    match kernel {
        CpuKernel::Avx512Vnni if one_row => out[0] = dot_512_one_row(w, s, blocks, x),
        CpuKernel::Avx512Vnni => run!(dot_512),
        CpuKernel::Avx512Vnni256 if one_row => out[0] = dot_256_evex_one_row(w, s, blocks, x),
        CpuKernel::Avx512Vnni256 => run!(dot_256_evex),
        CpuKernel::AvxVnni => run!(dot_256_vex),
        _ => unreachable!("not a VNNI kernel: {kernel:?}"),
    }
}

/// Most blocks the one-row kernels ([`dot_512_one_row`]) take: a lane of their plane-3
/// accumulator grows by at most `4 · 192 · 128 = 98,304` a block (four products of a byte's top
/// two bits, at most 192 even for the non-code 3, by an activation of magnitude at most 128), so
/// `2^14` blocks keep it within i32 (at most 1.61e9).
pub(super) const MASKED_MAX_BLOCKS: usize = 1 << 14;

/// Generates a width's kernels from its intrinsics: `$name::<MX>` for up to `MAX_X_ROWS`
/// activation rows and, given a second name, `$one_row` for a single row.
macro_rules! vnni_kernels {
    (
        $features:literal, $bytes:literal,
        zero $zero:ident, splat $splat:ident, load $load:ident, and $and:ident,
        shift $srli:ident, shift_arith $srai:ident, add $add:ident, dpbusd $dpbusd:ident,
        sum $sum:ident, $name:ident $(, $one_row:ident)?
    ) => {
        /// The kernel for up to `MAX_X_ROWS` activation rows: each plane is shifted down and
        /// masked once, then multiplied into every row.
        #[target_feature(enable = $features)]
        unsafe fn $name<const MX: usize>(
            w: *const u8,
            s: Strides,
            blocks: usize,
            x: *const i8,
            x_stride: usize,
        ) -> [[i32; ROWS]; MX] {
            const BYTES: usize = $bytes;
            let mask = $splat(3);
            let mut acc = [[$zero(); ROWS]; MX];
            for b in 0..blocks {
                s.prefetch(w, b);
                let mut v = [$zero(); ROWS];
                for (r, vr) in v.iter_mut().enumerate() {
                    *vr = $load(w.add(r * s.row + b * s.block).cast());
                }
                macro_rules! plane {
                    ($p:literal) => {{
                        let mut c = [$zero(); ROWS];
                        for (cr, vr) in c.iter_mut().zip(&v) {
                            *cr = $and($srli::<{ 2 * $p }>(*vr), mask);
                        }
                        for (i, ai) in acc.iter_mut().enumerate() {
                            let xs = $load(x.add(i * x_stride + b * 4 * BYTES + $p * BYTES).cast());
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
                    *or = $sum!(*ar);
                }
            }
            out
        }

        $(
        /// The kernel for a single activation row (decode). With one row the decoding is most
        /// of the work: shifting each plane down and masking it is two instructions for one
        /// `vpdpbusd`. Here plane `p` is only masked in place (`byte & (3 << 2p)`, the code
        /// times `4^p`) into an accumulator of its own, and each accumulator is divided by `4^p`
        /// at the end, exactly (every product in it is a multiple of `4^p`, and it stays within
        /// i32 for up to [`MASKED_MAX_BLOCKS`] blocks). Needs 16 accumulators and 4 masks in
        /// registers: EVEX encodings only (VEX names 16 registers; the spills made it slower).
        #[target_feature(enable = $features)]
        unsafe fn $one_row(w: *const u8, s: Strides, blocks: usize, x: *const i8) -> [i32; ROWS] {
            const BYTES: usize = $bytes;
            let masks = [$splat(0x03), $splat(0x0c), $splat(0x30), $splat(0xc0_u8 as i8)];
            let mut acc = [[$zero(); ROWS]; 4];
            for b in 0..blocks {
                s.prefetch(w, b);
                let mut v = [$zero(); ROWS];
                for (r, vr) in v.iter_mut().enumerate() {
                    *vr = $load(w.add(r * s.row + b * s.block).cast());
                }
                for (p, (ap, mask)) in acc.iter_mut().zip(&masks).enumerate() {
                    let xs = $load(x.add(b * 4 * BYTES + p * BYTES).cast());
                    for (a, vr) in ap.iter_mut().zip(&v) {
                        *a = $dpbusd(*a, $and(*vr, *mask), xs);
                    }
                }
            }
            let mut out = [0i32; ROWS];
            for (r, o) in out.iter_mut().enumerate() {
                let low = $add(acc[0][r], $srai::<2>(acc[1][r]));
                let high = $add($srai::<4>(acc[2][r]), $srai::<6>(acc[3][r]));
                *o = $sum!($add(low, high));
            }
            out
        }
        )?
    };
}

/// The sum of a 512-bit vector's sixteen i32 lanes.
macro_rules! sum_512 {
    ($v:expr) => {
        _mm512_reduce_add_epi32($v)
    };
}

/// The sum of a 256-bit vector's eight i32 lanes (a macro, so that it is compiled inside each
/// kernel with the kernel's features).
macro_rules! sum_256 {
    ($v:expr) => {{
        let mut lanes = [0i32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), $v);
        lanes.iter().sum::<i32>()
    }};
}

vnni_kernels!(
    "avx512f,avx512bw,avx512vnni", 64,
    zero _mm512_setzero_si512, splat _mm512_set1_epi8, load _mm512_loadu_si512,
    and _mm512_and_si512, shift _mm512_srli_epi16, shift_arith _mm512_srai_epi32,
    add _mm512_add_epi32, dpbusd _mm512_dpbusd_epi32, sum sum_512,
    dot_512, dot_512_one_row
);

/// The 256-bit kernels of one encoding of `vpdpbusd` (EVEX from AVX-512 VL, VEX from AVX-VNNI).
macro_rules! vnni_256_kernels {
    ($features:literal, $dpbusd:ident, $($names:ident),+) => {
        vnni_kernels!(
            $features, 32,
            zero _mm256_setzero_si256, splat _mm256_set1_epi8, load _mm256_loadu_si256,
            and _mm256_and_si256, shift _mm256_srli_epi16, shift_arith _mm256_srai_epi32,
            add _mm256_add_epi32, dpbusd $dpbusd, sum sum_256,
            $($names),+
        );
    };
}

vnni_256_kernels!(
    "avx2,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32,
    dot_256_evex,
    dot_256_evex_one_row
);
vnni_256_kernels!("avx2,avxvnni", _mm256_dpbusd_avx_epi32, dot_256_vex);
