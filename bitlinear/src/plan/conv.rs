//! The kernels of `PackedBitConv2d` on CUDA (`kernels/conv.cu`: the int8 im2col gather and the
//! accumulator dequantizer): their launch.

use super::{DeviceInfo, KernelSettings};

/// Threads a block of `im2col_i8` and `conv_dequant_f32`.
pub const IM2COL_THREADS: usize = 256;

/// Default of [`im2col_tile_codes`] on CUDA: 64 Mi codes, i.e. 64 MiB of int8 rows and the
/// tile's i32 accumulators (`4·N/K` bytes a code, N output channels). A tile is three launches
/// (gather, product, dequantization) and a copy into the output, so the CPU's tile of 1 Mi codes
/// cut a batch of 500 images into ~170 tiles a layer; at this size a batch of 500 at 32x32 with
/// K = 288 is three tiles.
pub const CUDA_IM2COL_TILE_CODES: usize = 1 << 26;

/// At most how many im2col codes a packed convolution on CUDA gathers at once: the forced
/// [`crate::plan::ForcedChoices::im2col_tile_codes`], else [`CUDA_IM2COL_TILE_CODES`].
pub fn im2col_tile_codes(settings: &KernelSettings) -> usize {
    settings
        .force
        .im2col_tile_codes
        .unwrap_or(CUDA_IM2COL_TILE_CODES)
        .max(1)
}

/// Launch of `im2col_i8` or `conv_dequant_f32` (see [`conv_dequant_plan`]): blocks looping over
/// a tile's work items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Im2colPlan {
    /// Blocks.
    pub blocks: usize,
    /// Threads a block.
    pub threads: usize,
}

/// The launch over `items` work items (im2col (row, channel) pairs, dequantized values): one
/// thread an item up to 8 waves of blocks (enough to fill the device; beyond that each thread
/// loops), at least one block. A first version, not yet tuned on measurements.
pub fn im2col_plan(items: usize, info: &DeviceInfo) -> Im2colPlan {
    let blocks = items.div_ceil(IM2COL_THREADS).clamp(1, 8 * info.sms.max(1));
    Im2colPlan {
        blocks,
        threads: IM2COL_THREADS,
    }
}

/// The launch of the dequantizer over one tile's `images x rows x n` accumulators: one block
/// (of [`IM2COL_THREADS`] threads, a multiple of 32) a 32 x 32 square of (rows, n) up to 8 waves
/// of blocks, each block looping past that, at least one block.
pub fn conv_dequant_plan(images: usize, rows: usize, n: usize, info: &DeviceInfo) -> Im2colPlan {
    let squares = images * rows.div_ceil(32) * n.div_ceil(32);
    Im2colPlan {
        blocks: squares.clamp(1, 8 * info.sms.max(1)),
        threads: IM2COL_THREADS,
    }
}

/// The launch of `codes_nhwc` over `images` images of `c` channels and `hw` pixels: blocks of
/// 32 x 8 threads, one a 32 x 32 square of (pixels, channels) of an image, images in the grid's
/// z up to its limit of 65535 (the blocks loop over the rest): `(grid, block)`.
pub fn codes_nhwc_plan(images: usize, c: usize, hw: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    let squares = |n: usize| n.div_ceil(32).clamp(1, u32::MAX as usize) as u32;
    ((squares(hw), squares(c), images.clamp(1, 65535) as u32), (32, 8, 1))
}

/// Launch of the transposed im2col (`im2col_t{1,4}_*`): blocks of `threads` threads, each block
/// looping over (plane, tile) pairs, `tiles` blocks a plane, each thread writing
/// `pixels_per_thread` consecutive pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Im2colTPlan {
    /// Blocks.
    pub blocks: usize,
    /// Threads a block.
    pub threads: usize,
    /// Tiles of `threads * pixels_per_thread` pixels a plane of `hw` pixels.
    pub tiles: usize,
    /// Consecutive pixels a thread writes (the kernel's `V`): 4 or 1, see [`im2col_t_plan`].
    pub pixels_per_thread: usize,
}

/// The launch of the transposed im2col of `rows` input planes of `hw` output pixels: tiles of the
/// pixels (or runs) rounded up to a warp (32 to 256 threads, so the 4x4 images of a CNN's last
/// stage do not leave most threads idle), up to 16 waves of blocks.
///
/// A thread writes runs of 4 pixels (every destination run starts aligned and is one vector
/// store, and each thread keeps four times the loads in flight) where `hw % 4 == 0` and the runs
/// fill the tiles' warps: `hw / 4` a multiple of 32, or at least 256 (a plane then spans several
/// full tiles). Elsewhere single pixels: a block a plane tile leaves most of a small plane's
/// runs' threads idle (bench/RESULTS.md: on the H100 the 3x3 columns of the speed-run net's 4x4
/// and 8x8 maps took 1.2-1.8x longer in runs than pixel by pixel, those of its 16x16 and 32x32
/// maps 1.6-2.7x less).
pub fn im2col_t_plan(rows: usize, hw: usize, info: &DeviceInfo) -> Im2colTPlan {
    let runs_fill_warps = hw.is_multiple_of(4) && ((hw / 4).is_multiple_of(32) || hw / 4 >= 256);
    let pixels_per_thread = if runs_fill_warps { 4 } else { 1 };
    let runs = hw.div_ceil(pixels_per_thread);
    let threads = runs.div_ceil(32).clamp(1, 8) * 32;
    let tiles = runs.div_ceil(threads).max(1);
    Im2colTPlan {
        blocks: (rows * tiles).clamp(1, 16 * info.sms.max(1)),
        threads,
        tiles,
        pixels_per_thread,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_an_item_up_to_eight_waves() {
        let info = DeviceInfo::sm90(132);
        assert_eq!(im2col_plan(0, &info).blocks, 1);
        assert_eq!(im2col_plan(1000, &info).blocks, 4);
        assert_eq!(im2col_plan(1 << 30, &info).blocks, 8 * 132);
        assert_eq!(im2col_plan(1000, &info).threads, 256);
    }

    #[test]
    fn dequantizer_takes_a_block_a_square() {
        let info = DeviceInfo::sm90(132);
        assert_eq!(conv_dequant_plan(0, 0, 0, &info).blocks, 1);
        assert_eq!(conv_dequant_plan(2, 33, 64, &info).blocks, 2 * 2 * 2);
        assert_eq!(conv_dequant_plan(500, 1024, 256, &info).blocks, 8 * 132);
        assert!(conv_dequant_plan(1, 1, 1, &info).threads.is_multiple_of(32));
    }

    #[test]
    fn im2col_tile_budget_is_forced_or_the_default_and_never_zero() {
        let forced = |codes| {
            let mut s = KernelSettings::default();
            s.force.im2col_tile_codes = codes;
            im2col_tile_codes(&s)
        };
        assert_eq!(forced(None), CUDA_IM2COL_TILE_CODES);
        assert_eq!(forced(Some(1 << 20)), 1 << 20);
        assert_eq!(forced(Some(0)), 1);
    }

    #[test]
    fn nhwc_transpose_takes_a_block_a_square() {
        assert_eq!(codes_nhwc_plan(512, 64, 1024), ((32, 2, 512), (32, 8, 1)));
        assert_eq!(codes_nhwc_plan(3, 16, 25), ((1, 1, 3), (32, 8, 1)));
        assert_eq!(codes_nhwc_plan(100_000, 256, 16).0, (1, 8, 65535));
        assert_eq!(codes_nhwc_plan(0, 0, 0).0, (1, 1, 1));
    }

    #[test]
    fn transposed_im2col_tiles_cover_each_row() {
        let info = DeviceInfo::sm90(132);
        for (rows, hw) in [
            (1, 1),
            (7, 16),
            (100, 64),
            (512 * 576, 1024),
            (3, 1000),
            (5, 999),
            (2, 12),
            (9, 256),
            (9, 1028),
        ] {
            let p = im2col_t_plan(rows, hw, &info);
            let v = p.pixels_per_thread;
            assert_eq!(v, if [256, 1024, 1028].contains(&hw) { 4 } else { 1 }, "hw {hw}");
            assert!(p.threads.is_multiple_of(32) && (32..=256).contains(&p.threads));
            let tile = p.threads * v;
            assert!(p.tiles * tile >= hw && (p.tiles - 1) * tile < hw.max(1));
            assert!(p.blocks >= 1 && p.blocks <= 16 * 132);
        }
        assert_eq!(
            im2col_t_plan(10, 16, &info),
            Im2colTPlan {
                blocks: 10,
                threads: 32,
                tiles: 1,
                pixels_per_thread: 1,
            }
        );
        assert_eq!(
            im2col_t_plan(10, 256, &info),
            Im2colTPlan {
                blocks: 10,
                threads: 64,
                tiles: 1,
                pixels_per_thread: 4,
            }
        );
    }
}
