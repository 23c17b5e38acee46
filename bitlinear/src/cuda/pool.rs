//! Launches of the 2x2 max-pooling kernels (`kernels/pool.cu`) for `crate::pool` and the pooled
//! convolution's backward (`crate::conv_grad`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, CudaStorage, DType, Device, Layout, Result, Storage, Tensor};

use super::buffers::{float_suffix, i32_arg, in_ptr, out_ptr, out_slice_ptr, storage};
use super::conv::grid;
use super::{Ctx, Module};
use crate::plan::{pool_blocks, unpool_plan, POOL_THREADS};

/// The element offset of a contiguous storage's start, which must be even (the kernels load
/// pairs).
fn even_start(l: &Layout, what: &str) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((a, _)) if a % 2 == 0 => Ok(a),
        Some(_) => bail!("max_pool2x2: {what} must start at an even offset"),
        None => bail!("max_pool2x2: {what} must be contiguous"),
    }
}

/// The forward (`grad` absent: each window's maximum) or backward (`grad`, the output gradient:
/// the input gradient) of 2x2 max pooling of `x`, `planes` planes of `h x w` (both even), in
/// `x`'s dtype (f32, bf16 or f16; the gradient's the same): `out_len` elements.
pub(crate) fn launch_pool(
    x: &CudaStorage,
    xl: &Layout,
    grad: Option<(&CudaStorage, &Layout)>,
    (planes, h, w): (usize, usize, usize),
    out_len: usize,
) -> Result<CudaStorage> {
    if let Some((g, _)) = grad {
        if g.dtype() != x.dtype() {
            bail!("max_pool2x2 backward: gradient {:?}, input {:?}", g.dtype(), x.dtype())
        }
    }
    let suffix = match x.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => float_suffix(x.dtype())?,
        dt => bail!("max_pool2x2: unsupported dtype {dt:?}"),
    };
    let dev = &x.device;
    let ctx = Ctx::new(dev)?;
    let x0 = even_start(xl, "input")?;
    let g0 = grad.map(|(_, gl)| even_start(gl, "gradient")).transpose()?;
    let mut out = ctx.alloc_out(x.dtype(), out_len)?;
    let windows = planes * (h / 2) * (w / 2);
    if windows > 0 {
        let name = match grad {
            None => format!("max_pool2x2_fwd_{suffix}"),
            Some(_) => format!("max_pool2x2_bwd_{suffix}"),
        };
        let f = ctx.func(Module::Pool, &name)?;
        let cfg = grid(pool_blocks(windows, &ctx.info), POOL_THREADS, "pool blocks")?;
        let mut guards = Vec::new();
        let xp = in_ptr(x, x0, &ctx.stream, &mut guards)?;
        let gp = match (grad, g0) {
            (Some((g, _)), Some(g0)) => Some(in_ptr(g, g0, &ctx.stream, &mut guards)?),
            _ => None,
        };
        let op = out_slice_ptr(&mut out, &ctx.stream, &mut guards)?;
        let (planes, h, w) = (i32_arg(planes, "planes")?, i32_arg(h, "H")?, i32_arg(w, "W")?);
        match gp {
            None => launch!(ctx, f, cfg, xp, planes, h, w, op)?,
            Some(gp) => launch!(ctx, f, cfg, xp, gp, planes, h, w, op)?,
        }
        drop(guards);
    }
    Ok(storage(out, dev))
}

/// The input gradient of 2x2 max pooling over `x` (F32 `(B, C, H, W)`, H and W even, contiguous
/// from an even offset) for the output gradient `g` (F32 `(B, C, H/2, W/2)`), channels last in
/// bf16 (rounded to nearest even): BF16 `(B, H·W, C)`, what `channels_last_bf16` makes of the
/// F32 gradient, in one pass (`max_unpool2x2_nhwc_bf16_c{1,2}`).
pub(crate) fn unpool_channels_last_bf16(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let Device::Cuda(dev) = x.device() else {
        bail!("max_pool2x2 backward: expected a CUDA tensor")
    };
    if x.dtype() != DType::F32 || g.dtype() != DType::F32 || g.dims() != [b, c, h / 2, w / 2] || h % 2 + w % 2 != 0 {
        bail!(
            "max_pool2x2 backward: F32 input {:?} with even sides and F32 gradient of its windows, got {:?} {:?}",
            x.dims(),
            x.dtype(),
            g.dims()
        )
    }
    let (x, g) = (x.contiguous()?, g.contiguous()?);
    let ctx = Ctx::new(dev)?;
    let mut out = ctx.alloc::<half::bf16>(b * h * w * c)?;
    let windows = (h / 2) * (w / 2);
    if b * c * windows > 0 {
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cuda(xs), Storage::Cuda(gs)) = (&*xs, &*gs) else {
            bail!("max_pool2x2 backward: the input and its gradient must be on one CUDA device")
        };
        let (x0, g0) = (even_start(xl, "input")?, even_start(gl, "gradient")?);
        let (grid_dim, block_dim, per_thread) = unpool_plan(b, c, windows);
        let f = ctx.func(Module::Pool, &format!("max_unpool2x2_nhwc_bf16_c{per_thread}"))?;
        let cfg = LaunchConfig {
            grid_dim,
            block_dim,
            shared_mem_bytes: 0,
        };
        let mut guards = Vec::new();
        let xp = in_ptr(xs, x0, &ctx.stream, &mut guards)?;
        let gp = in_ptr(gs, g0, &ctx.stream, &mut guards)?;
        let op = out_ptr(&mut out, &ctx.stream, &mut guards);
        let a = |v: usize, what: &str| i32_arg(v, what);
        launch!(ctx, f, cfg, xp, gp, a(b, "B")?, a(c, "C")?, a(h, "H")?, a(w, "W")?, op)?;
        drop(guards);
    }
    let out = storage(CudaStorageSlice::BF16(out), dev);
    Ok(crate::device::tensor_from(Storage::Cuda(out), (b, h * w, c)))
}
