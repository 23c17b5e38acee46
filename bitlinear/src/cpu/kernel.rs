//! Which kernel runs: detected once from the CPU's features, each with its block width and the
//! number of activation rows it takes per call.

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
use super::{avx2, vnni};
use super::{portable, ROWS};

/// Most activation rows any kernel takes in one call.
pub(crate) const MAX_X_ROWS: usize = 4;

/// Where a tile of `ROWS` weight rows lies: block `b` of row `r` at byte `r · row + b · block`
/// (the plain layout: `row` = the padded row, `block` = the block width; the grouped one:
/// `row` = the block width, `block` = `ROWS` blocks).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strides {
    /// Bytes from one row to the next.
    pub(crate) row: usize,
    /// Bytes from one block of a row to its next.
    pub(crate) block: usize,
}

/// How far ahead of the block being read the kernels ask for each row's weights into L1 (bytes):
/// the hardware prefetcher alone leaves a decode call's stream from DRAM well short of the
/// memory's rate (bench/RESULTS.md, CPU kernel).
const PREFETCH_L1_BYTES: usize = 2048;
/// How far ahead they ask for them into L2 (bytes): far enough to cover DRAM's latency at the
/// stream's rate, which the L1 distance alone does not (asked into L1 from this far, the lines
/// crowd out the ones in use).
const PREFETCH_L2_BYTES: usize = 8192;

impl Strides {
    /// Asks for the cache line of each of the `ROWS` rows [`PREFETCH_L1_BYTES`] past block `b`
    /// into L1 and [`PREFETCH_L2_BYTES`] past it into L2, one sequential stream ahead in the
    /// grouped layout. Hints only: they never fault, so past the end of the weights they do
    /// nothing.
    #[inline(always)]
    pub(crate) fn prefetch(&self, w: *const u8, b: usize) {
        #[cfg(target_arch = "x86_64")]
        for r in 0..ROWS {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
            let at = r * self.row + b * self.block;
            let near = w.wrapping_add(at + PREFETCH_L1_BYTES);
            let far = w.wrapping_add(at + PREFETCH_L2_BYTES);
            // SAFETY: a prefetch is a hint; it reads nothing architecturally and never faults.
            unsafe {
                _mm_prefetch::<{ _MM_HINT_T0 }>(near.cast());
                _mm_prefetch::<{ _MM_HINT_T1 }>(far.cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (w, b);
    }
}

/// A CPU kernel of the packed matmul. Every kernel gives identical integers; the fastest one
/// the CPU supports runs unless [`crate::plan::ForcedChoices::cpu_kernel`] picks another.
///
/// ```
/// use bitlinear::plan::CpuKernel;
/// assert!(CpuKernel::Portable.is_supported());
/// assert!(CpuKernel::detect().is_supported());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuKernel {
    /// Plain Rust (the compiler vectorizes it for the build's baseline).
    Portable,
    /// `pmaddubsw` + `pmaddwd` on 256-bit vectors.
    Avx2,
    /// `vpdpbusd` on 256-bit vectors, from AVX-VNNI (VEX encoded).
    AvxVnni,
    /// `vpdpbusd` on 256-bit vectors, from AVX-512 VNNI with VL (EVEX encoded).
    Avx512Vnni256,
    /// `vpdpbusd` on 512-bit vectors (AVX-512 VNNI and BW).
    Avx512Vnni,
}

impl CpuKernel {
    /// Every kernel, fastest first (the order [`CpuKernel::detect`] tries them in).
    pub const ALL: [CpuKernel; 5] = [
        CpuKernel::Avx512Vnni,
        CpuKernel::Avx512Vnni256,
        CpuKernel::AvxVnni,
        CpuKernel::Avx2,
        CpuKernel::Portable,
    ];

    /// The fastest kernel this CPU runs, detected on the first call.
    pub fn detect() -> CpuKernel {
        static CHOSEN: OnceLock<CpuKernel> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            CpuKernel::ALL
                .into_iter()
                .find(|k| k.is_supported())
                .unwrap_or(CpuKernel::Portable)
        })
    }

    /// Whether this CPU has the instructions of the kernel.
    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            match self {
                CpuKernel::Portable => true,
                CpuKernel::Avx2 => has!("avx2"),
                CpuKernel::AvxVnni => has!("avx2") && has!("avxvnni"),
                CpuKernel::Avx512Vnni256 => has!("avx2") && has!("avx512vnni") && has!("avx512vl"),
                CpuKernel::Avx512Vnni => has!("avx512vnni") && has!("avx512bw") && has!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == CpuKernel::Portable
        }
    }

    /// Packed bytes per block (the vector width); a block holds `4 ·` this many activations.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            CpuKernel::Avx512Vnni => 64,
            _ => 32,
        }
    }

    /// Activation rows the kernel decodes each weight vector for.
    pub(crate) fn rows_per_call(self) -> usize {
        match self {
            CpuKernel::Portable => 1,
            CpuKernel::Avx2 => 2,
            _ => MAX_X_ROWS,
        }
    }

    /// `out[i][r] = Σ c·x` of `ROWS` weight rows of `blocks` blocks each (`w`, block `b` of row
    /// `r` at byte `r · s.row + b · s.block`) against prepared activation rows `i < rows` (`x`,
    /// stride `x_stride`).
    ///
    /// `rows <= self.rows_per_call()`, `w` holds every block, `x` holds `rows` rows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dot(
        self,
        w: &[u8],
        s: Strides,
        blocks: usize,
        x: &[i8],
        x_stride: usize,
        rows: usize,
        out: &mut [[i32; ROWS]; MAX_X_ROWS],
    ) {
        let bb = self.block_bytes();
        let padded = blocks * bb;
        assert!(rows >= 1 && rows <= self.rows_per_call());
        // K = 0 has no blocks, and the plain layout's rows are then 0 bytes apart
        assert!(
            blocks == 0
                || (s.block >= bb && s.row >= bb && w.len() >= (ROWS - 1) * s.row + (blocks - 1) * s.block + bb)
        );
        assert!(x.len() >= (rows - 1) * x_stride + padded * 4);
        let xr = |i: usize| &x[i * x_stride..i * x_stride + 4 * padded];
        match self {
            CpuKernel::Portable => out[0] = portable::dot_rows(w, s, blocks, xr(0), bb),
            #[cfg(target_arch = "x86_64")]
            CpuKernel::Avx2 => {
                debug_assert!(self.is_supported());
                // SAFETY: the kernel is only chosen (or tested) where the CPU has AVX2; the
                // lengths were checked above.
                unsafe {
                    if rows == 2 {
                        [out[0], out[1]] = avx2::dot_rows2(w, s, blocks, xr(0), xr(1));
                    } else {
                        out[0] = avx2::dot_rows(w, s, blocks, xr(0));
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            CpuKernel::AvxVnni | CpuKernel::Avx512Vnni256 | CpuKernel::Avx512Vnni => {
                debug_assert!(self.is_supported());
                // SAFETY: as above, for the kernel's own features.
                unsafe { vnni::dot(self, w.as_ptr(), s, blocks, x.as_ptr(), x_stride, rows, out) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the portable kernel exists off x86-64"),
        }
    }
}
