//! The launch of the bf16 implicit-GEMM convolution (`kernels/conv_bf16.cu`), which computes the
//! backward products of the ternary convolutions on CUDA: whether a product runs on it, its tile,
//! split of the k range, grid and shared memory.

use super::{DeviceInfo, KernelSettings};

/// Values a k tile (`CB_BK` of the kernel).
pub const BF16_CONV_BK: usize = 64;

/// Shared-memory bytes a tile row takes in one pipeline stage: a k tile of 64 bf16 values (128
/// bytes) plus 16 bytes of padding (`CB_STRIDE` of the kernel).
const ROW_BYTES: usize = 144;

/// Pipeline stages of every tile (the kernel's instances).
const STAGES: usize = 3;

/// The kernel's tiles (`CONV_BF16_INST`): 128 output pixels by 32, 64 or 128 output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bf16ConvTile {
    /// 128 x 32, 4 warps (4 x 1): output channels `<= 32`.
    N32,
    /// 128 x 64, 4 warps (2 x 2): output channels `<= 64`.
    N64,
    /// 128 x 128, 8 warps (2 x 4).
    N128,
    /// 128 x 128, 4 warps (2 x 2), each a 64 x 64 tile (twice the MMAs a fragment load).
    N128W4,
}

impl Bf16ConvTile {
    /// Every tile.
    pub const ALL: [Bf16ConvTile; 4] = [
        Bf16ConvTile::N32,
        Bf16ConvTile::N64,
        Bf16ConvTile::N128,
        Bf16ConvTile::N128W4,
    ];

    /// `(pixels, channels, threads)` of a block.
    pub fn shape(self) -> (usize, usize, usize) {
        match self {
            Bf16ConvTile::N32 => (128, 32, 128),
            Bf16ConvTile::N64 => (128, 64, 128),
            Bf16ConvTile::N128 => (128, 128, 256),
            Bf16ConvTile::N128W4 => (128, 128, 128),
        }
    }

    /// Dynamic shared memory of a block: the stages of the activation and weight tiles.
    pub fn smem_bytes(self) -> usize {
        let (bm, bn, _) = self.shape();
        STAGES * (bm + bn) * ROW_BYTES
    }

    /// The kernel's name.
    pub fn kernel_name(self) -> &'static str {
        match self {
            Bf16ConvTile::N32 => "conv_bf16_n32",
            Bf16ConvTile::N64 => "conv_bf16_n64",
            Bf16ConvTile::N128 => "conv_bf16_n128",
            Bf16ConvTile::N128W4 => "conv_bf16_n128w4",
        }
    }

    /// The short name: the kernel's name without `conv_bf16_` (`n32`, `n64`, `n128`, `n128w4`).
    pub fn name(self) -> &'static str {
        let name = self.kernel_name();
        name.strip_prefix("conv_bf16_").unwrap_or(name)
    }
}

impl std::str::FromStr for Bf16ConvTile {
    type Err = String;

    /// A tile by its [`Bf16ConvTile::name`].
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match Self::ALL.into_iter().find(|t| t.name() == s) {
            Some(tile) => Ok(tile),
            None => {
                let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                Err(format!(
                    "unknown bf16 conv tile {s:?}: expected one of {}",
                    names.join(", ")
                ))
            }
        }
    }
}

/// Which backward product of a ternary convolution a [`bf16_conv_plan`] is for (each has its
/// forced switch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bf16ConvProduct {
    /// The input gradient (`ForcedChoices::implicit_input_grad`).
    InputGrad,
    /// The weight gradient (`ForcedChoices::implicit_weight_grad`).
    WeightGrad,
}

/// A convolution on the bf16 implicit GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bf16ConvPlan {
    /// The tile.
    pub tile: Bf16ConvTile,
    /// `(row blocks, column blocks, k splits)`: blocks over the output pixels, the channels and
    /// the parts of the k range.
    pub grid: (u32, u32, u32),
    /// k tiles ([`BF16_CONV_BK`] values) a split of the k range takes (the last may take fewer).
    pub k_tiles_per_split: usize,
}

impl Bf16ConvPlan {
    /// Over how many blocks the k range is split: each writes a partial output, summed after.
    pub fn k_splits(&self) -> usize {
        self.grid.2 as usize
    }
}

/// The launch of a stride-1 convolution of `images` NHWC bf16 images of `c_in` channels with
/// `pixels` output pixels each, a kernel of `taps` positions and `c_out` output channels, or
/// `None` where the bf16 implicit GEMM cannot or should not take it: channels not a multiple of
/// 8 (an 8-value chunk must be one pixel's channels), an image or product past 32-bit indices, a
/// device without the shared memory or bf16 `mma.sync` (compute capability 8.0), or forced off
/// (the `product`'s switch in `ForcedChoices`).
///
/// Where the tiles are fewer than the SMs (the weight gradient: few output "pixels", a k range
/// of all the batch's pixels), the k range is split to give about four blocks an SM, at least 8
/// k tiles a split, at most 256 splits and 64 MiB of partial outputs. A first rule, not yet
/// tuned on measurements.
pub fn bf16_conv_plan(
    product: Bf16ConvProduct,
    (images, pixels): (usize, usize),
    c_in: usize,
    taps: usize,
    c_out: usize,
    info: &DeviceInfo,
    settings: &KernelSettings,
) -> Option<Bf16ConvPlan> {
    let k = c_in.checked_mul(taps)?;
    let m = images.checked_mul(pixels)?;
    let fits_i32 = |v: usize| i32::try_from(v).is_ok();
    let forced = match product {
        Bf16ConvProduct::InputGrad => settings.force.implicit_input_grad,
        Bf16ConvProduct::WeightGrad => settings.force.implicit_weight_grad,
    };
    // The weight gradient's default is off: on the speed-run network (H100, 2026-12-06) it made
    // the step slower than the im2col of x~ and cuBLAS (bench/RESULTS.md, "where the GPU time
    // goes"): this kernel's mma.sync tiles run its 256-channel products at about a third of
    // cuBLAS's rate, more than the copies it saves.
    let default_on = product == Bf16ConvProduct::InputGrad;
    if !forced.unwrap_or(default_on)
        || c_in == 0
        || !c_in.is_multiple_of(8)
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
    let tile = match (settings.force.bf16_conv_tile, c_out) {
        (Some(tile), _) => tile,
        (None, ..=32) => Bf16ConvTile::N32,
        (None, 33..=64) => Bf16ConvTile::N64,
        (None, _) => Bf16ConvTile::N128,
    };
    if tile.smem_bytes() > info.smem_optin {
        return None;
    }
    let (bm, bn, _) = tile.shape();
    let (rows, cols) = (m.div_ceil(bm), c_out.div_ceil(bn));
    let k_tiles = k.div_ceil(BF16_CONV_BK);
    let tiles = rows * cols;
    let mut splits = 1;
    if tiles < info.sms {
        let partial_bytes = m * c_out * 4;
        splits = (4 * info.sms)
            .div_ceil(tiles)
            .min(k_tiles / 8)
            .min(256)
            .min((64 << 20) / partial_bytes)
            .max(1);
    }
    let k_tiles_per_split = k_tiles.div_ceil(splits);
    let grid = (
        u32::try_from(rows).ok()?,
        u32::try_from(cols).ok().filter(|&c| c < 65536)?,
        k_tiles.div_ceil(k_tiles_per_split) as u32,
    );
    Some(Bf16ConvPlan {
        tile,
        grid,
        k_tiles_per_split,
    })
}

/// Threads a block of `sum_splits_f32` (the sum of the split-K partial outputs).
pub const SPLIT_SUM_THREADS: usize = 256;

/// Blocks of `sum_splits_f32` over `n` output values: one value a thread, at most 8 waves of
/// blocks (the threads loop past that), at least one block.
pub fn split_sum_blocks(n: usize, info: &DeviceInfo) -> usize {
    super::wave_capped(n.div_ceil(SPLIT_SUM_THREADS), info)
}

/// Threads a block of `input_grad_weight_bf16` (the input gradient's weight operand).
pub const WEIGHT_OPERAND_THREADS: usize = 256;

/// Blocks of `input_grad_weight_bf16` over `n` operand values: one value a thread, at most 8
/// waves of blocks (the threads loop past that), at least one block.
pub fn weight_operand_blocks(n: usize, info: &DeviceInfo) -> usize {
    super::wave_capped(n.div_ceil(WEIGHT_OPERAND_THREADS), info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(images: usize, pixels: usize, c: usize, c_out: usize) -> Option<Bf16ConvPlan> {
        planned_taps(images, pixels, c, 9, c_out)
    }

    fn planned_taps(images: usize, pixels: usize, c: usize, taps: usize, c_out: usize) -> Option<Bf16ConvPlan> {
        bf16_conv_plan(
            Bf16ConvProduct::InputGrad,
            (images, pixels),
            c,
            taps,
            c_out,
            &DeviceInfo::sm90(132),
            &KernelSettings::default(),
        )
    }

    #[test]
    fn takes_channels_in_eights_only() {
        assert!(planned(1, 1024, 3, 32).is_none());
        assert!(planned(1, 1024, 12, 32).is_none());
        assert!(planned(1, 1024, 0, 32).is_none());
        assert!(planned(0, 1024, 64, 32).is_none());
        assert!(planned(1, 1024, 64, 0).is_none());
        assert!(planned(1, 1024, 8, 3).is_some());
    }

    #[test]
    fn the_tile_follows_the_output_channels() {
        let p = planned(512, 1024, 64, 32).unwrap();
        assert_eq!(p.tile, Bf16ConvTile::N32);
        assert_eq!(p.grid, (512 * 1024 / 128, 1, 1));
        assert_eq!(p.k_tiles_per_split, 9);
        let p = planned(512, 256, 256, 64).unwrap();
        assert_eq!(p.tile, Bf16ConvTile::N64);
        assert_eq!(p.grid, (1024, 1, 1));
        let p = planned(512, 64, 256, 256).unwrap();
        assert_eq!(p.tile, Bf16ConvTile::N128);
        assert_eq!(p.grid, (256, 2, 1));
        // a partial last block of rows and of columns (K = 144: 3 k tiles, too few to split)
        let p = planned(3, 25, 16, 65).unwrap();
        assert_eq!(
            (p.tile, p.grid, p.k_tiles_per_split),
            (Bf16ConvTile::N128, (1, 1, 1), 3)
        );
        let p = planned(3, 25, 16, 33).unwrap();
        assert_eq!((p.tile, p.grid), (Bf16ConvTile::N64, (1, 1, 1)));
    }

    #[test]
    fn few_tiles_split_the_k_range() {
        // A weight gradient as the kernel sees it: 32 "images" (input channels) of 3x3 outputs,
        // a batch of 512 as the channels, 32x32 "taps" (the output gradient's pixels), 64
        // output channels: 3 x 1 tiles, 8192 k tiles.
        let p = planned_taps(32, 9, 512, 1024, 64).unwrap();
        assert_eq!((p.tile, p.grid.0, p.grid.1), (Bf16ConvTile::N64, 3, 1));
        // 4 * 132 blocks wanted: 176 splits of 47 k tiles, of which 175 cover the range
        assert_eq!((p.k_tiles_per_split, p.k_splits()), (47, 175));
        // no split leaves the range empty, and the splits cover it
        for (images, c_in, taps, c_out) in [(256, 512, 64, 256), (3, 8, 100, 40), (64, 24, 49, 8), (1, 8, 8, 8)] {
            let p = planned_taps(images, 9, c_in, taps, c_out).unwrap();
            let k_tiles = (c_in * taps).div_ceil(BF16_CONV_BK);
            let (splits, per) = (p.k_splits(), p.k_tiles_per_split);
            assert!(splits >= 1 && per >= 1 && (splits - 1) * per < k_tiles && splits * per >= k_tiles);
            assert!(splits == 1 || per >= 8, "{images} {c_in} {taps} {c_out}: {p:?}");
        }
        // many tiles: no split
        assert_eq!(planned(512, 64, 256, 256).unwrap().k_splits(), 1);
    }

    #[test]
    fn tiles_parse_from_their_short_names() {
        for tile in Bf16ConvTile::ALL {
            assert_eq!(tile.name().parse::<Bf16ConvTile>(), Ok(tile));
            assert_eq!(format!("conv_bf16_{}", tile.name()), tile.kernel_name());
        }
        assert_eq!("n128w4".parse::<Bf16ConvTile>(), Ok(Bf16ConvTile::N128W4));
        let err = "n256".parse::<Bf16ConvTile>().unwrap_err();
        assert!(
            err.contains("\"n256\"") && err.contains("n32, n64, n128, n128w4"),
            "{err}"
        );
        assert!("".parse::<Bf16ConvTile>().is_err() && "conv_bf16_n32".parse::<Bf16ConvTile>().is_err());
    }

    #[test]
    fn a_forced_tile_takes_every_shape() {
        let mut s = KernelSettings::default();
        s.force.bf16_conv_tile = Some(Bf16ConvTile::N128W4);
        let info = DeviceInfo::sm90(132);
        for c_out in [8, 40, 256] {
            let p = bf16_conv_plan(Bf16ConvProduct::InputGrad, (512, 64), 256, 9, c_out, &info, &s).unwrap();
            assert_eq!(
                (p.tile, p.grid.0, p.grid.1),
                (Bf16ConvTile::N128W4, 256, c_out.div_ceil(128) as u32)
            );
        }
        assert_eq!(Bf16ConvTile::N128W4.shape(), (128, 128, 128));
        assert_eq!(Bf16ConvTile::N128W4.smem_bytes(), Bf16ConvTile::N128.smem_bytes());
    }

    #[test]
    fn split_sums_take_a_value_a_thread_up_to_eight_waves() {
        let info = DeviceInfo::sm90(132);
        assert_eq!(split_sum_blocks(0, &info), 1);
        assert_eq!(split_sum_blocks(1, &info), 1);
        assert_eq!(split_sum_blocks(SPLIT_SUM_THREADS + 1, &info), 2);
        assert_eq!(split_sum_blocks(2304 * 256, &info), 8 * 132);
        assert_eq!(weight_operand_blocks(0, &info), 1);
        assert_eq!(weight_operand_blocks(256 * 256 * 9, &info), 8 * 132);
        assert_eq!(weight_operand_blocks(64 * 32 * 9, &info), 72);
    }

    #[test]
    fn forced_off_or_too_big_or_too_old_falls_back() {
        let mut s = KernelSettings::default();
        s.force.implicit_input_grad = Some(false);
        let info = DeviceInfo::sm90(132);
        assert!(bf16_conv_plan(Bf16ConvProduct::InputGrad, (1, 64), 16, 9, 16, &info, &s).is_none());
        let weight_grad =
            |s: &KernelSettings| bf16_conv_plan(Bf16ConvProduct::WeightGrad, (1, 64), 16, 9, 16, &info, s);
        assert!(
            weight_grad(&KernelSettings::default()).is_none(),
            "the weight gradient is opt-in"
        );
        s.force.implicit_weight_grad = Some(true);
        assert!(weight_grad(&s).is_some(), "each product has its own switch");
        s.force.implicit_weight_grad = Some(false);
        assert!(weight_grad(&s).is_none());
        s.force.implicit_input_grad = Some(true);
        assert!(bf16_conv_plan(Bf16ConvProduct::InputGrad, (1, 64), 16, 9, 16, &info, &s).is_some());
        let s = KernelSettings::default();
        assert!(bf16_conv_plan(Bf16ConvProduct::InputGrad, (1 << 20, 1 << 12), 16, 9, 16, &info, &s).is_none());
        let old = DeviceInfo {
            compute_capability: (7, 5),
            ..info
        };
        assert!(bf16_conv_plan(Bf16ConvProduct::InputGrad, (1, 64), 16, 9, 16, &old, &s).is_none());
        let small = DeviceInfo {
            smem_optin: 64 * 1024,
            ..info
        };
        assert!(bf16_conv_plan(Bf16ConvProduct::InputGrad, (1, 64), 16, 9, 16, &small, &s).is_none());
        assert!(bf16_conv_plan(Bf16ConvProduct::InputGrad, (1, 64), 16, 9, 128, &small, &s).is_none());
    }

    #[test]
    fn shared_memory_matches_the_kernel_stages() {
        assert_eq!(Bf16ConvTile::N32.smem_bytes(), 3 * 160 * 144);
        assert_eq!(Bf16ConvTile::N64.smem_bytes(), 82_944);
        assert_eq!(Bf16ConvTile::N128.smem_bytes(), 110_592);
    }
}
