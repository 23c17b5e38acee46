//! The activation quantizer (`kernels/act_quant.cu`), run ahead of the skinny kernel and the
//! tiled GEMM, and on its own for `quantize_activations` and the fake quantizer.

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
}
