//! The grouped weight layout: each group of `ROWS` weight rows stored block by block, so a
//! kernel reads the group as one sequential stream.
//!
//! In the plain layout (`PackedTernary`'s bytes, row-major `(N, ceil(K/4))`) a kernel that
//! decodes `ROWS` rows together reads one block of each row in turn: `ROWS` streams a row apart,
//! which the hardware prefetchers follow far worse than one stream when the weights come from
//! DRAM. The grouped layout puts block `b` of row `r` of group `g` at
//! `g · ROWS · padded + (b · ROWS + r) · block_bytes` (`padded`: a row's bytes rounded up to
//! whole blocks), zero-filled past `K` and past `N` (zero codes meet zero-padded activations or
//! are never stored). It is converted once per weight and kernel width and cached with the
//! weight ([`CpuLayouts`]); it costs about as much memory again as the packed weight.

use std::sync::{Arc, OnceLock};

use super::kernel::CpuKernel;
use super::ROWS;

/// A weight as the CPU kernels take it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Weights<'a> {
    /// Row-major packed bytes `(N, ceil(K/4))`.
    Plain(&'a [u8]),
    /// The grouped layout (module docs) for the block width of the kernel that runs.
    Grouped(&'a [u8]),
}

/// Bytes of one row padded to whole blocks of `block_bytes`.
pub(crate) fn padded_row(k: usize, block_bytes: usize) -> usize {
    k.div_ceil(4).div_ceil(block_bytes) * block_bytes
}

/// Converts plain packed bytes `(n, ceil(k/4))` to the grouped layout for `block_bytes`.
pub(crate) fn group(packed: &[u8], n: usize, k: usize, block_bytes: usize) -> Vec<u8> {
    let k4 = k.div_ceil(4);
    assert_eq!(packed.len(), n * k4, "packed weight has the wrong length");
    let padded = padded_row(k, block_bytes);
    let mut out = vec![0u8; n.div_ceil(ROWS) * ROWS * padded];
    for (row, src) in packed.chunks_exact(k4.max(1)).enumerate().take(n) {
        let (g, r) = (row / ROWS, row % ROWS);
        let base = g * ROWS * padded + r * block_bytes;
        for (b, chunk) in src.chunks(block_bytes).enumerate() {
            let at = base + b * ROWS * block_bytes;
            out[at..at + chunk.len()].copy_from_slice(chunk);
        }
    }
    out
}

/// The grouped layouts of one weight, made on first use and shared by the weight's clones.
#[derive(Clone, Default)]
pub(crate) struct CpuLayouts(Arc<[OnceLock<Vec<u8>>; 2]>);

impl std::fmt::Debug for CpuLayouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let made: Vec<usize> = self.0.iter().filter_map(|l| l.get().map(Vec::len)).collect();
        f.debug_struct("CpuLayouts").field("bytes", &made).finish()
    }
}

impl CpuLayouts {
    /// The weight as `kernel` reads it: the cached grouped layout for the x86 kernels (made
    /// now if this is the first call at this width), the plain bytes for the portable one.
    /// `packed` must be the bytes of the weight these layouts belong to.
    pub(crate) fn get<'a>(&'a self, kernel: CpuKernel, packed: &'a [u8], n: usize, k: usize) -> Weights<'a> {
        let slot = match kernel {
            CpuKernel::Portable => return Weights::Plain(packed),
            CpuKernel::Avx512Vnni => &self.0[1],
            _ => &self.0[0],
        };
        Weights::Grouped(slot.get_or_init(|| group(packed, n, k, kernel.block_bytes())))
    }
}
