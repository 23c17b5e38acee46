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

/// Launch of `im2col_i8` or `conv_dequant_f32`, grid-stride loops over a tile's outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Im2colPlan {
    /// Blocks.
    pub blocks: usize,
    /// Threads a block.
    pub threads: usize,
}

/// The launch writing `bytes` outputs (im2col bytes or dequantized values): one thread an output up to 8 waves of blocks (enough
/// to fill the device; beyond that each thread loops), at least one block. A first version, not
/// yet tuned on measurements.
pub fn im2col_plan(bytes: usize, info: &DeviceInfo) -> Im2colPlan {
    let blocks = bytes.div_ceil(IM2COL_THREADS).clamp(1, 8 * info.sms.max(1));
    Im2colPlan {
        blocks,
        threads: IM2COL_THREADS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_a_byte_up_to_eight_waves() {
        let info = DeviceInfo::sm90(132);
        assert_eq!(im2col_plan(0, &info).blocks, 1);
        assert_eq!(im2col_plan(1000, &info).blocks, 4);
        assert_eq!(im2col_plan(1 << 30, &info).blocks, 8 * 132);
        assert_eq!(im2col_plan(1000, &info).threads, 256);
    }
}
