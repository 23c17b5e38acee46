//! The launch of the implicit-GEMM convolution (`kernels/conv_igemm.cu`): whether a convolution
//! runs on it, its tile, grid and shared memory.

use super::{DeviceInfo, KernelSettings};

/// Codes a k tile of the implicit GEMM (`IG_BK` of the kernel): its packed weight rows are
/// padded to a multiple of `IMPLICIT_CONV_BK / 4` bytes.
pub const IMPLICIT_CONV_BK: usize = 128;

/// The implicit GEMM's tiles (`CONV_IGEMM_INST` of the kernel): 128 output pixels by 64 or 128
/// output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImplicitConvTile {
    /// 128 x 64, 4 warps (2 x 2), 4 stages: output channels `<= 64`.
    N64,
    /// 128 x 128, 8 warps (2 x 4), 4 stages.
    N128,
}

impl ImplicitConvTile {
    /// `(pixels, channels, threads)` of a block.
    pub fn shape(self) -> (usize, usize, usize) {
        match self {
            ImplicitConvTile::N64 => (128, 64, 128),
            ImplicitConvTile::N128 => (128, 128, 256),
        }
    }

    /// Dynamic shared memory of a block: 4 stages of a 128-row activation tile (144-byte rows)
    /// and the weight tile (48-byte rows).
    pub fn smem_bytes(self) -> usize {
        let (bm, bn, _) = self.shape();
        4 * (bm * 144 + bn * 48)
    }

    /// The kernel's name (f32 output).
    pub fn kernel_name(self) -> &'static str {
        match self {
            ImplicitConvTile::N64 => "conv_igemm_n64_f32",
            ImplicitConvTile::N128 => "conv_igemm_n128_f32",
        }
    }
}

/// A convolution on the implicit GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImplicitConvPlan {
    /// The tile.
    pub tile: ImplicitConvTile,
    /// `(row blocks, column blocks, 1)`: blocks over the output pixels, then the channels.
    pub grid: (u32, u32, u32),
    /// Bytes a packed weight row (`K` rounded up to [`IMPLICIT_CONV_BK`] codes, over 4).
    pub weight_row_bytes: usize,
}

/// The launch of a stride-`s` convolution of `images` NHWC images of `c_in` channels with
/// `pixels` output pixels each, a kernel of `taps` positions and `c_out` output channels, or
/// `None` where the implicit GEMM cannot or should not take it: channels not a multiple of 16
/// (a 16-code chunk must be one pixel's channels: the 3-channel stem), sizes past 32-bit
/// indices, a device without the shared memory or `mma.sync` (compute capability 8.0), or forced
/// off (`ForcedChoices::implicit_conv`).
pub fn implicit_conv_plan(
    (images, pixels): (usize, usize),
    c_in: usize,
    taps: usize,
    c_out: usize,
    info: &DeviceInfo,
    settings: &KernelSettings,
) -> Option<ImplicitConvPlan> {
    let k = c_in * taps;
    let m = images.checked_mul(pixels)?;
    let fits_i32 = |v: usize| i32::try_from(v).is_ok();
    if settings.force.implicit_conv == Some(false)
        || c_in == 0
        || !c_in.is_multiple_of(16)
        || k == 0
        || c_out == 0
        || m == 0
        || !fits_i32(m)
        || !fits_i32(k)
        || !fits_i32(c_out)
        || info.compute_capability < (8, 0)
    {
        return None;
    }
    let tile = if c_out <= 64 {
        ImplicitConvTile::N64
    } else {
        ImplicitConvTile::N128
    };
    if tile.smem_bytes() > info.smem_optin {
        return None;
    }
    let (bm, bn, _) = tile.shape();
    let grid = (
        u32::try_from(m.div_ceil(bm)).ok()?,
        u32::try_from(c_out.div_ceil(bn)).ok().filter(|&c| c < 65536)?,
        1,
    );
    Some(ImplicitConvPlan {
        tile,
        grid,
        weight_row_bytes: k.div_ceil(IMPLICIT_CONV_BK) * IMPLICIT_CONV_BK / 4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(images: usize, pixels: usize, c: usize, c_out: usize) -> Option<ImplicitConvPlan> {
        implicit_conv_plan(
            (images, pixels),
            c,
            9,
            c_out,
            &DeviceInfo::sm90(132),
            &KernelSettings::default(),
        )
    }

    #[test]
    fn takes_channels_in_sixteens_only() {
        assert!(planned(1, 1024, 3, 32).is_none());
        assert!(planned(1, 1024, 24, 32).is_none());
        assert!(planned(1, 1024, 0, 32).is_none());
        assert!(planned(0, 1024, 32, 32).is_none());
        assert!(planned(1, 1024, 16, 0).is_none());
        let p = planned(512, 1024, 32, 64).unwrap();
        assert_eq!(p.tile, ImplicitConvTile::N64);
        assert_eq!(p.grid, (512 * 1024 / 128, 1, 1));
        // K = 288 codes: three k tiles of 128, 32 bytes each
        assert_eq!(p.weight_row_bytes, 96);
    }

    #[test]
    fn wide_layers_take_128_channel_tiles() {
        let p = planned(512, 64, 256, 256).unwrap();
        assert_eq!(p.tile, ImplicitConvTile::N128);
        assert_eq!(p.grid, (256, 2, 1));
        assert_eq!(p.weight_row_bytes, 2304 / 4);
        // a partial last block of rows and of columns
        let p = planned(3, 25, 16, 65).unwrap();
        assert_eq!(p.grid, (1, 1, 1));
    }

    #[test]
    fn forced_off_or_too_big_or_too_old_falls_back() {
        let mut s = KernelSettings::default();
        s.force.implicit_conv = Some(false);
        let info = DeviceInfo::sm90(132);
        assert!(implicit_conv_plan((1, 64), 16, 9, 16, &info, &s).is_none());
        s.force.implicit_conv = Some(true);
        assert!(implicit_conv_plan((1, 64), 16, 9, 16, &info, &s).is_some());
        let s = KernelSettings::default();
        assert!(implicit_conv_plan((1 << 20, 1 << 12), 16, 9, 16, &info, &s).is_none());
        let old = DeviceInfo {
            compute_capability: (7, 5),
            ..info
        };
        assert!(implicit_conv_plan((1, 64), 16, 9, 16, &old, &s).is_none());
        let small = DeviceInfo {
            smem_optin: 48 * 1024,
            ..info
        };
        assert!(implicit_conv_plan((1, 64), 16, 9, 16, &small, &s).is_none());
    }

    #[test]
    fn shared_memory_matches_the_kernel_stages() {
        assert_eq!(ImplicitConvTile::N64.smem_bytes(), 4 * (128 * 144 + 64 * 48));
        assert_eq!(ImplicitConvTile::N128.smem_bytes(), 98_304);
    }
}
