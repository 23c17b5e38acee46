//! The launch of the implicit-GEMM input gradient of a convolution (`kernels/conv_dgrad.cu`):
//! whether the backward's bf16 input-gradient product runs on it, and its grid.

use super::{DeviceInfo, KernelSettings};

/// Pixels by channels of a block of `conv_dgrad_bf16` (`DG_BM`, `DG_BN`).
pub const DGRAD_TILE: (usize, usize) = (128, 64);

/// Threads of a block (`DG_THREADS`).
pub const DGRAD_THREADS: usize = 256;

/// k a tile (`DG_BK`): the kernel's weight rows are padded to a multiple of it.
pub const DGRAD_BK: usize = 32;

/// An input gradient on the implicit GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DgradPlan {
    /// `(pixel blocks, channel blocks, 1)`.
    pub grid: (u32, u32, u32),
    /// `K = c_out·kh·kw` rounded up to [`DGRAD_BK`]: the weight's row length in the kernel.
    pub padded_k: usize,
}

/// The launch of the input gradient of `pixels` input pixels (all images) of `c_in` channels
/// from an output gradient of `c_out` channels through a kernel of `taps` positions, or `None`
/// where the im2col path keeps it: sizes past 32-bit indices, a device without `mma.sync` for
/// bf16 (compute capability 8.0), or forced off (`ForcedChoices::implicit_conv_grad`).
pub fn dgrad_plan(
    pixels: usize,
    c_in: usize,
    c_out: usize,
    taps: usize,
    info: &DeviceInfo,
    settings: &KernelSettings,
) -> Option<DgradPlan> {
    let k = c_out.checked_mul(taps)?;
    let fits_i32 = |v: usize| i32::try_from(v).is_ok();
    if settings.force.implicit_conv_grad == Some(false)
        || pixels == 0
        || c_in == 0
        || k == 0
        || !fits_i32(pixels)
        || !fits_i32(c_in)
        || !fits_i32(k.div_ceil(DGRAD_BK) * DGRAD_BK)
        || info.compute_capability < (8, 0)
    {
        return None;
    }
    let (bm, bn) = DGRAD_TILE;
    Some(DgradPlan {
        grid: (
            u32::try_from(pixels.div_ceil(bm)).ok()?,
            u32::try_from(c_in.div_ceil(bn)).ok().filter(|&c| c < 65536)?,
            1,
        ),
        padded_k: k.div_ceil(DGRAD_BK) * DGRAD_BK,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_a_tile_and_k_padded_to_a_tile() {
        let (info, s) = (DeviceInfo::sm90(132), KernelSettings::default());
        let p = dgrad_plan(512 * 1024, 32, 64, 9, &info, &s).unwrap();
        assert_eq!(p.grid, (4096, 1, 1));
        assert_eq!(p.padded_k, 576);
        let p = dgrad_plan(3 * 25, 65, 3, 1, &info, &s).unwrap();
        assert_eq!((p.grid, p.padded_k), ((1, 2, 1), 32));
    }

    #[test]
    fn falls_back_when_forced_empty_too_big_or_too_old() {
        let info = DeviceInfo::sm90(132);
        let mut s = KernelSettings::default();
        assert!(dgrad_plan(0, 3, 3, 9, &info, &s).is_none());
        assert!(dgrad_plan(10, 0, 3, 9, &info, &s).is_none());
        assert!(dgrad_plan(10, 3, 0, 9, &info, &s).is_none());
        assert!(dgrad_plan(1 << 31, 3, 3, 9, &info, &s).is_none());
        let old = DeviceInfo {
            compute_capability: (7, 5),
            ..info
        };
        assert!(dgrad_plan(10, 3, 3, 9, &old, &s).is_none());
        s.force.implicit_conv_grad = Some(false);
        assert!(dgrad_plan(10, 3, 3, 9, &info, &s).is_none());
    }
}
