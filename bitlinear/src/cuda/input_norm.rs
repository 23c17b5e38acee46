//! The decode GEMV with an input norm (`kernels/gemv.cu`, the `_an` and `_rn` kernels): one row
//! of float `x` normalised, quantized and multiplied in one kernel, for
//! [`crate::packed_matmul_normed`].

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};

use super::buffers::{float_suffix, i32_arg, in_ptr, out_slice_ptr, packed_in, storage};
use super::{Ctx, Module, Settled};
use crate::plan::{plan_normed_gemv, Problem, GEMV_WARPS};

/// The input norm the kernel applies (`InputNorm` in `kernels/gemv.cu`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum NormKind {
    /// `rmsnorm(x + delta) · gain` (`_an`).
    AddRms,
    /// `rmsnorm(relu(gate · s_g)² · (up · s_u)) · gain` of `x = [gate, up]` (`_rn`).
    Relu2Rms {
        /// The gate's weight scale.
        gate_scale: f32,
        /// The up projection's weight scale.
        up_scale: f32,
    },
}

/// The element offset of a contiguous operand whose start is 16-byte aligned, with `len`
/// elements of `dtype`.
fn aligned_start(l: &Layout, dtype: DType, len: usize, what: &str) -> Result<usize> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("packed_matmul_normed: {what} must be contiguous")
    };
    if end - start != len {
        bail!(
            "packed_matmul_normed: {what} must hold {len} values, got {:?}",
            l.dims()
        )
    }
    if !(start * dtype.size_in_bytes()).is_multiple_of(16) {
        bail!("packed_matmul_normed: {what} must start 16-byte aligned")
    }
    Ok(start)
}

/// `y (1, N)` of the normalised `x` times the packed weight (`s_w` its scale), and, for
/// [`NormKind::AddRms`] with a `delta`, the sum `s = x + delta (1, K)`: the output is `[s, y]`
/// (`K + N` values) or `y`. Errors where the planner does not run the problem on the GEMV
/// ([`plan_normed_gemv`]; the caller checks first).
#[allow(clippy::too_many_arguments)]
pub(crate) fn normed_gemv(
    (x, xl): (&CudaStorage, &Layout),
    delta: Option<(&CudaStorage, &Layout)>,
    (gain, gl): (&CudaStorage, &Layout),
    (packed, pl): (&CudaStorage, &Layout),
    k: usize,
    s_w: f32,
    norm: NormKind,
    eps: f32,
    settled: &Settled,
    gain_settled: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
    let dt = x.dtype();
    let sfx = float_suffix(dt)?;
    if gain.dtype() != dt || delta.is_some_and(|(d, _)| d.dtype() != dt) {
        bail!("packed_matmul_normed: input, delta and gain must share one dtype")
    }
    let x_len = match norm {
        NormKind::AddRms => k,
        NormKind::Relu2Rms { .. } => {
            if delta.is_some() {
                bail!("packed_matmul_normed: the squared-ReLU gate takes no delta")
            }
            2 * k
        }
    };
    let mut g = Vec::new();
    let xp = in_ptr(x, aligned_start(xl, dt, x_len, "input")?, stream, &mut g)?;
    let gp = in_ptr(gain, aligned_start(gl, dt, k, "gain")?, stream, &mut g)?;
    let dp = match delta {
        Some((d, dl)) => in_ptr(d, aligned_start(dl, dt, k, "delta")?, stream, &mut g)?,
        None => 0,
    };
    let (n, wp) = packed_in(packed, pl, k, stream, &mut g)?;
    let problem = Problem {
        m: 1,
        n,
        k,
        x_dtype: Some(dt),
        out_dtype: dt,
        weight_align: Problem::align_of(wp),
        // the `_e` kernels request the gain before pdl_wait too
        weights_settled: settled.check(stream)? && gain_settled,
    };
    let Some(p) = plan_normed_gemv(&problem, &ctx.info, &ctx.settings)? else {
        bail!("packed_matmul_normed: (1, {n}, {k}) does not run on the decode GEMV")
    };
    for (v, what) in [(n, "N"), (k, "K"), (n * k / 4, "N*K/4")] {
        i32_arg(v, what)?;
    }
    let with_sum = matches!(norm, NormKind::AddRms) && delta.is_some();
    let sum_len = if with_sum { k } else { 0 };
    let mut out = ctx.alloc_out(dt, sum_len + n)?;
    let (suffix, gate_scale, up_scale) = match norm {
        NormKind::AddRms => ("an", 0.0, 0.0),
        NormKind::Relu2Rms { gate_scale, up_scale } => ("rn", gate_scale, up_scale),
    };
    let f = ctx.func(Module::Gemv, &p.normed_kernel_name(sfx, suffix))?;
    let cfg = LaunchConfig {
        grid_dim: (i32_arg(p.blocks, "GEMV blocks")? as u32, 1, 1),
        block_dim: (32 * GEMV_WARPS as u32, 1, 1),
        shared_mem_bytes: p.smem_bytes as u32,
    };
    let mut og = Vec::new();
    let sp = out_slice_ptr(&mut out, stream, &mut og)?;
    // y after the sum (K % 64 == 0 keeps it 16-byte aligned)
    let yp = sp + (sum_len * dt.size_in_bytes()) as u64;
    let sum_ptr = if with_sum { sp } else { 0u64 };
    launch!(
        ctx,
        f,
        cfg,
        xp,
        0u64,
        wp,
        n as i32,
        k as i32,
        (k / 4) as i32,
        p.rows_base as i32,
        p.rows_rem as i32,
        s_w,
        0u64,
        yp,
        dp,
        gp,
        eps,
        gate_scale,
        up_scale,
        sum_ptr
    )?;
    drop(og);
    drop(g);
    Ok((storage(out, dev), Shape::from(sum_len + n)))
}
