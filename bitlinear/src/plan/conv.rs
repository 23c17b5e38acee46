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
    let blocks = super::wave_capped(items.div_ceil(IM2COL_THREADS), info);
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
        blocks: super::wave_capped(squares, info),
        threads: IM2COL_THREADS,
    }
}

/// Threads a block of the 2x2 max-pooling kernels (`kernels/pool.cu`).
pub const POOL_THREADS: usize = 256;

/// Blocks of a 2x2 max-pooling kernel over `windows` windows: one window a thread, at most 8
/// waves of blocks (the threads loop past that), at least one block.
pub fn pool_blocks(windows: usize, info: &DeviceInfo) -> usize {
    super::wave_capped(windows.div_ceil(POOL_THREADS), info)
}

/// The launch of `max_unpool2x2_nhwc_bf16_c{1,2}` over `images` images of `c` channels and
/// `windows` pooling windows: blocks of 32 x 8 threads, each a tile of 32 windows by 32 x (the
/// channels a thread writes) channels, two channels a thread where `c` is even (one 4-byte
/// store), else one; images in the grid's z up to its limit of 65535 (the blocks loop over the
/// rest): `(grid, block, channels a thread)`.
pub fn unpool_plan(images: usize, c: usize, windows: usize) -> ((u32, u32, u32), (u32, u32, u32), usize) {
    let per_thread = if c.is_multiple_of(2) { 2 } else { 1 };
    let tiles = |n: usize, t: usize| n.div_ceil(t).clamp(1, u32::MAX as usize) as u32;
    let grid = (
        tiles(windows, 32),
        tiles(c, 32 * per_thread),
        images.clamp(1, 65535) as u32,
    );
    (grid, (32, 8, 1), per_thread)
}

/// The launch of `codes_nhwc` over `images` images of `c` channels and `hw` pixels: blocks of
/// 32 x 8 threads, one a 32 x 32 square of (pixels, channels) of an image, images in the grid's
/// z up to its limit of 65535 (the blocks loop over the rest): `(grid, block)`.
pub fn codes_nhwc_plan(images: usize, c: usize, hw: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    let squares = |n: usize| n.div_ceil(32).clamp(1, u32::MAX as usize) as u32;
    ((squares(hw), squares(c), images.clamp(1, 65535) as u32), (32, 8, 1))
}

/// Launch of the transposed im2col (`im2col_t{1,4}_*`): blocks looping over the (plane, run)
/// items, each thread writing runs of `pixels_per_thread` consecutive pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Im2colTPlan {
    /// Blocks.
    pub blocks: usize,
    /// Threads a block.
    pub threads: usize,
    /// Consecutive pixels a thread writes (the kernel's `V`): 4 where `hw` is a multiple of 4
    /// (every destination run then starts aligned and is one vector store, and each thread keeps
    /// four times the loads in flight), else 1.
    pub pixels_per_thread: usize,
}

/// The launch of the transposed im2col of `planes` input planes of `hw` output pixels: runs of
/// 4 pixels a thread where `hw % 4 == 0`, else single pixels, one thread a (plane, run) item as
/// [`im2col_plan`] lays them out (runs of consecutive planes share a block, so small planes
/// leave no thread idle).
pub fn im2col_t_plan(planes: usize, hw: usize, info: &DeviceInfo) -> Im2colTPlan {
    let pixels_per_thread = if hw.is_multiple_of(4) { 4 } else { 1 };
    let Im2colPlan { blocks, threads } = im2col_plan(planes * hw / pixels_per_thread, info);
    Im2colTPlan {
        blocks,
        threads,
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
        assert_eq!(pool_blocks(0, &info), 1);
        assert_eq!(pool_blocks(POOL_THREADS + 1, &info), 2);
        assert_eq!(pool_blocks(512 * 64 * 16 * 16, &info), 8 * 132);
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
        assert_eq!(unpool_plan(512, 64, 256), ((8, 1, 512), (32, 8, 1), 2));
        assert_eq!(unpool_plan(3, 5, 10), ((1, 1, 3), (32, 8, 1), 1));
        assert_eq!(unpool_plan(100_000, 256, 16).0, (1, 4, 65535));
    }

    #[test]
    fn transposed_im2col_takes_a_thread_a_run() {
        let info = DeviceInfo::sm90(132);
        for (planes, hw, v, blocks) in [
            (1, 1, 1, 1),
            (7, 16, 4, 1),
            (256, 16, 4, 4),
            (512 * 256, 16, 4, 8 * 132),
            (512 * 576, 1024, 4, 8 * 132),
            (5, 999, 1, 20),
            (2, 12, 4, 1),
        ] {
            let p = im2col_t_plan(planes, hw, &info);
            assert_eq!(
                p,
                Im2colTPlan {
                    blocks,
                    threads: IM2COL_THREADS,
                    pixels_per_thread: v
                },
                "{planes} x {hw}"
            );
        }
    }
}
