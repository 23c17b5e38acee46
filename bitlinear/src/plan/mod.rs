//! The kernel planner: which CUDA kernel runs a packed matmul, with every launch parameter.
//!
//! [`plan`] is a pure function of the problem ([`Problem`]: shapes, dtypes, alignment), the
//! device ([`DeviceInfo`]: queried from the device) and the settings ([`KernelSettings`]: set per
//! device with [`crate::set_kernel_settings`]). Its [`Plan`] names the kernel and every launch
//! parameter; the CUDA code only carries it out. The rules were fitted on measurements
//! (bench/RESULTS.md, "Launch rules and the measurements behind them"), and the tests here pin
//! them on the measured shapes, without a GPU.
//!
//! ```
//! use bitlinear::plan::{plan, DeviceInfo, KernelSettings, Plan, Problem};
//! use candle_core::DType;
//! // decode: one bf16 token through a 13824 x 2560 weight on an H100-like device
//! let p = Problem::new(1, 13824, 2560, Some(DType::BF16), DType::BF16);
//! let Plan::Gemv(g) = plan(&p, &DeviceInfo::sm90(132), &KernelSettings::default())? else {
//!     panic!("decode runs the GEMV")
//! };
//! assert_eq!((g.lanes, g.chunks), (8, 5));
//! assert_eq!(g.kernel_name("bf16", "bf16"), "gemv_bf16_bf16_l8_t5_bx");
//! # Ok::<(), candle_core::Error>(())
//! ```
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::{DType, Result};

// Only the CUDA backend calls cuBLAS; the mapping is tested everywhere.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod blas;
mod conv;
mod conv_bf16;
mod conv_igemm;
mod gemm;
mod gemv;
mod gemv_stream;
mod quant;
mod settings;
mod skinny;

#[cfg_attr(not(feature = "cuda"), allow(unused_imports))]
pub(crate) use blas::{shared_left_batched, tt_product, ColumnMajorGemm};
pub use conv::{
    codes_nhwc_plan, conv_dequant_plan, im2col_plan, im2col_t_plan, im2col_tile_codes, pool_blocks, unpool_plan,
    Im2colPlan, Im2colTPlan, CUDA_IM2COL_TILE_CODES, IM2COL_THREADS, POOL_THREADS,
};
pub use conv_bf16::{
    bf16_conv_plan, split_sum_blocks, weight_operand_blocks, Bf16ConvPlan, Bf16ConvProduct, Bf16ConvTile, BF16_CONV_BK,
    SPLIT_SUM_THREADS, WEIGHT_OPERAND_THREADS,
};
pub use conv_igemm::{implicit_conv_plan, ImplicitConvPlan, ImplicitConvTile, IMPLICIT_CONV_BK};
pub use gemm::{GemmPlan, GemmTile, GEMM_BK};
pub use gemv::{GemvPlan, GEMV_MAX_K, GEMV_SHAPES, GEMV_WARPS};
pub use gemv_stream::{GemvStreamPlan, GEMV_STREAM_MAX_K, GEMV_STREAM_WARPS};
pub use quant::{
    absmean_blocks, act_quant_plan, pack_plan, row_quant_blocks, ActLayout, ActQuantPlan, PackPlan, QUANT_THREADS,
};
pub use settings::{CpuKernel, ForcedChoices, KernelKind, KernelSettings};
pub use skinny::{SkinnyPlan, SKINNY_MAX_M, SKINNY_THREADS};

/// `blocks` capped at 8 waves of the device's SMs, at least one: the grid of the element-wise and
/// gather kernels, whose threads loop over what lies past it.
pub(crate) fn wave_capped(blocks: usize, info: &DeviceInfo) -> usize {
    blocks.clamp(1, 8 * info.sms.max(1))
}

/// What the planner needs to know of a device (queried once per device on CUDA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Streaming multiprocessors.
    pub sms: usize,
    /// Largest dynamic shared memory a block may opt in to, in bytes.
    pub smem_optin: usize,
    /// L2 cache, in bytes.
    pub l2_bytes: usize,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// The sm_90a kernels (the Hopper GEMM) are in this build (`CUDA_COMPUTE_CAP=90`).
    pub sm90a_built: bool,
}

impl DeviceInfo {
    /// A compute capability 9.0 device with `sms` SMs and an H100's shared memory (227 KB a
    /// block) and L2 (50 MB), with the Hopper kernels built: for examples and tests.
    pub fn sm90(sms: usize) -> Self {
        Self {
            sms,
            smem_optin: 227 * 1024,
            l2_bytes: 50 << 20,
            compute_capability: (9, 0),
            sm90a_built: true,
        }
    }

    /// Whether the Hopper GEMM (`kernels/gemm90a.cu`) can run: compute capability 9.0 and built.
    pub fn has_hopper_gemm(&self) -> bool {
        self.compute_capability == (9, 0) && self.sm90a_built
    }

    /// Whether kernels can go out with programmatic dependent launch (compute capability 9.0+).
    pub fn has_pdl(&self) -> bool {
        self.compute_capability.0 >= 9
    }
}

/// One packed matmul: `y (M, N) = x (M, K) · Wᵀ` for a packed ternary `W (N, K)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Rows of `x` (tokens).
    pub m: usize,
    /// Weight rows (output features).
    pub n: usize,
    /// Inputs (in features).
    pub k: usize,
    /// The dtype of float `x` (f32, bf16 or f16), or `None` for int8 codes.
    pub x_dtype: Option<DType>,
    /// The output dtype: `I32` (raw accumulators) or a float dtype.
    pub out_dtype: DType,
    /// Alignment of the packed weights' address in bytes (a power of two; 256 for a fresh
    /// allocation).
    pub weight_align: usize,
    /// The weights are known complete on the device (`cuda/settle.rs`): kernels may request
    /// them before `pdl_wait`.
    pub weights_settled: bool,
}

impl Problem {
    /// A problem over freshly allocated (256-byte aligned), not yet settled weights.
    pub fn new(m: usize, n: usize, k: usize, x_dtype: Option<DType>, out_dtype: DType) -> Self {
        Self {
            m,
            n,
            k,
            x_dtype,
            out_dtype,
            weight_align: 256,
            weights_settled: false,
        }
    }

    /// The largest power of two up to 256 that divides `address`.
    pub fn align_of(address: u64) -> usize {
        1 << address.trailing_zeros().min(8)
    }
}

/// The decode GEMV with an input norm for `problem` (`crate::packed_matmul_normed`): `Some`
/// where [`plan`] runs the plain problem on the GEMV (one row of float `x` in the output's
/// dtype), `None` where the norm has to run before the matmul instead.
pub fn plan_normed_gemv(problem: &Problem, device: &DeviceInfo, settings: &KernelSettings) -> Result<Option<GemvPlan>> {
    if problem.x_dtype != Some(problem.out_dtype) {
        return Ok(None);
    }
    Ok(match plan(problem, device, settings)? {
        // the streaming GEMV has no input norm: where the GEMV can take the shape (past one wave
        // of it), it runs with the norm fused rather than behind a norm kernel, as before the
        // streaming rule took these shapes
        Plan::Gemv(_) | Plan::GemvStream(_) if gemv::gemv_fits(problem.m, problem.k, problem.weight_align, true) => {
            Some(gemv::normed_gemv_plan(
                problem.n,
                problem.k,
                problem.weights_settled && settings.early_weights,
                device,
                &settings.force,
            ))
        }
        _ => None,
    })
}

/// How a packed matmul runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// `M = 0` or `N = 0`: an empty output, no kernel.
    Empty,
    /// `K = 0`: every output is zero (no product to sum), written without a matmul kernel.
    Zeros,
    /// The decode GEMV.
    Gemv(GemvPlan),
    /// The streaming decode GEMV (large weights).
    GemvStream(GemvStreamPlan),
    /// The skinny kernel.
    Skinny(SkinnyPlan),
    /// The tiled GEMM.
    Gemm(GemmPlan),
}

/// The plan for `problem` on `device` under `settings`: the GEMV for decode (`M = 1`) where it
/// fits, the skinny kernel for small `M` unless the tiled GEMM is faster, else the tiled GEMM
/// (the crate docs, "CUDA", summarize the rules). Errors only where no kernel can take the
/// shape.
pub fn plan(problem: &Problem, device: &DeviceInfo, settings: &KernelSettings) -> Result<Plan> {
    let Problem {
        m,
        n,
        k,
        x_dtype,
        out_dtype,
        weight_align,
        weights_settled,
    } = *problem;
    if m == 0 || n == 0 {
        return Ok(Plan::Empty);
    }
    if k == 0 {
        return Ok(Plan::Zeros);
    }
    let forced = settings.force.kernel;
    let settled = weights_settled && settings.early_weights;
    let x_is_out = x_dtype.is_none_or(|d| d == out_dtype);
    let x = (x_dtype.is_some(), x_dtype.map_or(1, |d| d.size_in_bytes()));
    let decode_kernels = !matches!(forced, Some(KernelKind::Skinny | KernelKind::Gemm));
    // the GEMV's plan where it can take the problem, once: the streaming rule reads its blocks
    let gemv = (decode_kernels && gemv::gemv_fits(m, k, weight_align, x_is_out))
        .then(|| gemv::gemv_plan(n, k, x, settled, device, &settings.force));
    if decode_kernels
        && gemv_stream::gemv_stream_fits(m, k, weight_align, x_is_out)
        && gemv_stream::gemv_stream_wanted(k, gemv.map(|g| g.blocks), device, &settings.force)
    {
        return Ok(Plan::GemvStream(gemv_stream::gemv_stream_plan(
            k,
            settled,
            device,
            &settings.force,
        )));
    }
    if let Some(g) = gemv {
        return Ok(Plan::Gemv(g));
    }
    if forced != Some(KernelKind::Gemm) {
        let input = skinny::SkinnyInput {
            m,
            n,
            k,
            weight_align,
            fusable_x_bytes: x_dtype.filter(|&d| d == out_dtype).map(|d| d.size_in_bytes()),
            float_x: x_dtype.is_some(),
            settled,
            early_weights: settings.early_weights,
        };
        let skinny = skinny::skinny_plan(&input, device, &settings.force, forced == Some(KernelKind::Skinny));
        if let Some(s) = skinny {
            return Ok(Plan::Skinny(s));
        }
    }
    let plan = gemm::gemm_plan((m, n, k), out_dtype.size_in_bytes(), weight_align, device, settings)?;
    Ok(Plan::Gemm(plan))
}

#[cfg(test)]
mod tests;
