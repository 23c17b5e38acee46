//! The activation quantizer (`kernels/act_quant.cu`), run ahead of the skinny kernel and the
//! tiled GEMM, and on its own for `quantize_activations` and the fake quantizer; the weight
//! quantizer (`kernels/weight_quant.cu`): the absmean reduction and the packer.

use candle_core::DType;

use super::{DeviceInfo, KernelSettings};

/// Threads a block of the quantizer kernels (`QT` in `kernels/act_quant.cu`).
pub const QUANT_THREADS: usize = 256;

/// The layout the quantizer writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActLayout {
    /// canonical int8 codes `(M, K)`
    Codes,
    /// k-permuted, zero-padded codes `(M, ld)` and their row sums, for the tiled GEMM
    Permuted {
        /// the padded row length
        ld: usize,
    },
    /// `x_q * s_x` in the input dtype (the fake quantizer)
    Fake,
}

/// Launch of the activation quantizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActQuantPlan {
    /// The kernel that takes two rows a block, each thread one 16-k group of a row
    /// (`act_quant_rows_short_*`), rather than one row at a time grid-strided over about one
    /// wave of blocks (`act_quant_rows_*`).
    pub short_rows: bool,
    /// Blocks.
    pub blocks: usize,
    /// The kernel lets the next one (the Hopper GEMM) start before its own blocks finish.
    pub early_trigger: bool,
}

impl ActQuantPlan {
    /// The kernel for the input dtype suffix (`f32`, `bf16`, `f16`).
    pub fn kernel_name(&self, x: &str) -> String {
        let short = if self.short_rows { "_short" } else { "" };
        format!("act_quant_rows{short}_{x}")
    }
}

/// The quantizer of `m` rows of `k` into `layout`; `x_aligned16`: x's address is 16-byte
/// aligned. Where a thread holds at most one 16-k group of a row (K <= 4096, K % 16 == 0,
/// aligned x), every block takes one pair of rows: blocks in different phases overlap. The
/// early trigger only ahead of the Hopper GEMM (the permuted layout), whose producer then
/// requests its first weights while this kernel runs; ahead of the skinny kernel it was slower
/// (RESULTS, "Rule: activation quantizer early trigger").
pub fn act_quant_plan(
    m: usize,
    k: usize,
    layout: ActLayout,
    x_aligned16: bool,
    info: &DeviceInfo,
    settings: &KernelSettings,
) -> ActQuantPlan {
    let ld = match layout {
        ActLayout::Permuted { ld } => ld,
        _ => k,
    };
    let max_k = 16 * QUANT_THREADS;
    let short_rows = k.is_multiple_of(16) && k <= max_k && x_aligned16 && ld <= max_k;
    let blocks = if short_rows { m.div_ceil(2) } else { m.min(4 * info.sms) };
    ActQuantPlan {
        short_rows,
        blocks: blocks.max(1),
        early_trigger: matches!(layout, ActLayout::Permuted { .. }) && settings.early_trigger,
    }
}

/// Blocks of the absmean reduction's first pass (`w_absmean_partial_*`, eight weights a thread,
/// at most 1,024 partial sums) over `weights` weights. A function of the weight count alone, so
/// that the reduction tree, and with it `s_w`, is the same on every run and every device.
pub fn absmean_blocks(weights: usize) -> usize {
    weights.div_ceil(QUANT_THREADS * 8).clamp(1, 1024)
}

/// Blocks of the per-channel fake quantizer (`w_fake_rows_*`: a block a weight row, grid-stride
/// over the rows past `8 · sms`). Each row's sum is one block's fixed tree whatever the grid.
pub fn row_quant_blocks(rows: usize, sms: usize) -> usize {
    rows.clamp(1, 8 * sms.max(1))
}

/// Launch of the weight packer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackPlan {
    /// No weights: nothing to launch.
    Empty,
    /// `w_pack_flat_*`: the packed matrix as a flat array of 32-bit words, each the 16 weights
    /// `w[16i .. 16i + 15]` (needs K % 16 == 0 and 16-byte aligned weights), two words a thread
    /// for f32 weights and four for 16-bit ones (the kernel's `U`), grid-strided over `blocks`
    /// blocks, at most eight a multiprocessor.
    Flat {
        /// Blocks.
        blocks: usize,
        /// Packed words.
        words: usize,
    },
    /// `w_pack_*`: one weight row a block, grid-strided over `blocks` blocks (at most 16 a
    /// multiprocessor).
    Rows {
        /// Blocks.
        blocks: usize,
    },
}

/// The packer of an `(n, k)` weight of `dtype`; `w_aligned16`: its address is 16-byte aligned.
pub fn pack_plan(n: usize, k: usize, dtype: DType, w_aligned16: bool, info: &DeviceInfo) -> PackPlan {
    if n * k.div_ceil(4) == 0 {
        return PackPlan::Empty;
    }
    if k.is_multiple_of(16) && w_aligned16 {
        let words = n * k / 16;
        let words_per_thread = if dtype == DType::F32 { 2 } else { 4 };
        let threads = words.div_ceil(words_per_thread);
        let blocks = threads.div_ceil(QUANT_THREADS).clamp(1, (info.sms * 8).max(1));
        return PackPlan::Flat { blocks, words };
    }
    PackPlan::Rows {
        blocks: n.min(info.sms * 16).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_rows_where_a_thread_holds_one_group() {
        let (info, s) = (DeviceInfo::sm90(132), KernelSettings::default());
        let p = act_quant_plan(4096, 4096, ActLayout::Permuted { ld: 4096 }, true, &info, &s);
        assert_eq!((p.short_rows, p.blocks, p.early_trigger), (true, 2048, true));
        assert_eq!(p.kernel_name("bf16"), "act_quant_rows_short_bf16");
        // K > 4096, K % 16 != 0 or unaligned x: one row at a time, one wave of blocks
        for (k, aligned) in [(4112, true), (1000, true), (1008, false)] {
            let p = act_quant_plan(10_000, k, ActLayout::Codes, aligned, &info, &s);
            assert_eq!(
                (p.short_rows, p.blocks, p.early_trigger),
                (false, 528, false),
                "K = {k}"
            );
            assert_eq!(p.kernel_name("f32"), "act_quant_rows_f32");
        }
        // the padded row of the permuted layout counts too
        assert!(!act_quant_plan(8, 4096, ActLayout::Permuted { ld: 4224 }, true, &info, &s).short_rows);
        let off = KernelSettings {
            early_trigger: false,
            ..Default::default()
        };
        assert!(!act_quant_plan(8, 64, ActLayout::Permuted { ld: 128 }, true, &info, &off).early_trigger);
        assert_eq!(act_quant_plan(0, 64, ActLayout::Fake, true, &info, &s).blocks, 1);
    }

    /// The absmean's grid depends on the weight count alone, within 1..=1024 blocks of 2,048
    /// weights; the packer is the flat one exactly where K % 16 == 0 and the weights are
    /// aligned, each grid covers its work (or is capped), and an empty weight launches nothing.
    #[test]
    fn weight_quantizer_plans() {
        assert_eq!(absmean_blocks(0), 1);
        assert_eq!(absmean_blocks(2048), 1);
        assert_eq!(absmean_blocks(2049), 2);
        assert_eq!(absmean_blocks(4096 * 4096), 1024);
        let info = DeviceInfo::sm90(132);
        let other = DeviceInfo::sm90(16);
        for (n, k) in [(1, 16), (3, 48), (2560, 2560), (13824, 2560), (1, 4096), (7, 4112)] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let per_thread = if dtype == DType::F32 { 2 } else { 4 };
                match pack_plan(n, k, dtype, true, &info) {
                    PackPlan::Flat { blocks, words } => {
                        assert_eq!(words * 16, n * k);
                        let covered = blocks * QUANT_THREADS * per_thread;
                        assert!(covered >= words || blocks == 132 * 8, "{n}x{k} {dtype:?}");
                        assert!((1..=132 * 8).contains(&blocks));
                    }
                    p => panic!("{n}x{k} {dtype:?}: {p:?}"),
                }
                let rows = pack_plan(n, k, dtype, false, &other);
                assert_eq!(rows, PackPlan::Rows { blocks: n.min(16 * 16) }, "{n}x{k} unaligned");
            }
        }
        // 2560^2: 409,600 words, 102,400 threads of four (bf16) or 204,800 of two (f32); a
        // 13824 x 2560 weight's 2,160 blocks capped at eight a multiprocessor
        let flat = |n, k, dtype| pack_plan(n, k, dtype, true, &info);
        assert_eq!(
            flat(2560, 2560, DType::BF16),
            PackPlan::Flat {
                blocks: 400,
                words: 409_600
            }
        );
        assert_eq!(
            flat(2560, 2560, DType::F32),
            PackPlan::Flat {
                blocks: 800,
                words: 409_600
            }
        );
        assert_eq!(
            flat(13824, 2560, DType::BF16),
            PackPlan::Flat {
                blocks: 1056,
                words: 2_211_840
            }
        );
        for (n, k) in [(5, 10), (4096, 1000), (1, 1)] {
            assert_eq!(
                pack_plan(n, k, DType::BF16, true, &info),
                PackPlan::Rows {
                    blocks: n.min(132 * 16)
                }
            );
        }
        assert_eq!(pack_plan(0, 64, DType::F32, true, &info), PackPlan::Empty);
        assert_eq!(pack_plan(8, 0, DType::F32, true, &info), PackPlan::Empty);
    }
}
