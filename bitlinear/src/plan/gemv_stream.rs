//! The streaming decode GEMV (`kernels/gemv_stream.cu`): `M = 1` with `K` past the decode GEMV's
//! limit or weights past one wave of the decode GEMV.

use super::{DeviceInfo, ForcedChoices};

/// Warps a block of the streaming GEMV (`GS_WARPS` in `kernels/gemv_stream.cu`).
pub const GEMV_STREAM_WARPS: usize = 16;

/// The largest `K` whose int8 codes fit the shared memory a block takes without opting in (48
/// KiB, less 1 KiB for the kernel's static reduction arrays).
pub const GEMV_STREAM_MAX_K: usize = 47 * 1024;

/// Launch of the streaming GEMV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvStreamPlan {
    /// Blocks of [`GEMV_STREAM_WARPS`] warps: one an SM, each looping over its rows.
    pub blocks: usize,
    /// Dynamic shared memory: the permuted int8 codes of `x`, `K` bytes.
    pub smem_bytes: usize,
    /// The first pass of the (settled) weights requested before `pdl_wait`.
    pub early_weights: bool,
}

impl GemvStreamPlan {
    /// The kernel for `x` and output dtype suffixes (`i8`/`f32`/`bf16`/`f16`, `i32`/...).
    pub fn kernel_name(&self, x: &str, out: &str) -> String {
        format!("gemv_stream_{x}_{out}")
    }
}

/// Whether the streaming GEMV can take the problem: one row, `K % 64 == 0`,
/// `0 < K <= GEMV_STREAM_MAX_K`, 16-byte aligned weights, `x` int8 codes or of the output's
/// dtype.
pub(super) fn gemv_stream_fits(m: usize, k: usize, weight_align: usize, x_is_out_dtype_or_codes: bool) -> bool {
    m == 1 && k > 0 && k <= GEMV_STREAM_MAX_K && k.is_multiple_of(64) && weight_align >= 16 && x_is_out_dtype_or_codes
}

/// The smallest `K` at which weights past one wave of the decode GEMV take the streaming GEMV:
/// measured faster at K = 3200 and 5120, slower at 2048 and 2560 (RESULTS, "Rule: streaming
/// GEMV").
const STREAM_PAST_ONE_WAVE_MIN_K: usize = 3072;

/// Whether a decode the streaming GEMV fits runs on it, unless forced either way: where the
/// decode GEMV cannot take it (`gemv_blocks` is `None`: `K` past its limit, where the skinny
/// kernel would take it), or, from `STREAM_PAST_ONE_WAVE_MIN_K` on, where the decode GEMV's plan
/// has more blocks (`gemv_blocks`) than the device has SMs, each quantizing x again (RESULTS,
/// "Rule: streaming GEMV").
pub(super) fn gemv_stream_wanted(
    k: usize,
    gemv_blocks: Option<usize>,
    info: &DeviceInfo,
    force: &ForcedChoices,
) -> bool {
    force
        .gemv_stream
        .unwrap_or_else(|| gemv_blocks.is_none_or(|blocks| k >= STREAM_PAST_ONE_WAVE_MIN_K && blocks > info.sms))
}

/// The streaming GEMV's launch for `k` inputs; `settled`: the weights are known complete (and
/// early weights are on in the settings). Early weights only where forced: a whole pass of them
/// ahead of `x` delays `x` behind them (RESULTS, "Rule: streaming GEMV").
pub(super) fn gemv_stream_plan(k: usize, settled: bool, info: &DeviceInfo, force: &ForcedChoices) -> GemvStreamPlan {
    GemvStreamPlan {
        blocks: info.sms.max(1),
        smem_bytes: k,
        early_weights: settled && force.gemv_early_weights == Some(true),
    }
}
