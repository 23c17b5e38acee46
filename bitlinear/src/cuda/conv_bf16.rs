//! The bf16 implicit-GEMM convolution on CUDA (`kernels/conv_bf16.cu`): the backward products of
//! a ternary convolution with bf16 operands, where `crate::plan::bf16_conv_plan` takes them. The
//! operands go channels last in bf16 (`transpose_bf16_*`), then one kernel gathers the
//! convolution's windows on the way into shared memory; no im2col copy is made.
//! - Input gradient: the convolution of the output gradient `g` with the flipped, transposed
//!   weight.
//! - Weight gradient: a convolution over the batch. With `x~` as `C` "images" of `B` channels
//!   (`(C, H, W, B)`) and `g` as the `O` output channels' "weights" of `Ho x Wo` taps (`(O, Ho,
//!   Wo, B)`), output `(c, o, ky, kx)` sums `x~[b, c, y + ky - p, x + kx - p] · g[b, o, y, x]` over
//!   `(y, x, b)`: `dL/dW[o, c, ky, kx]`.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, DType, Device, Result, Storage, Tensor};

use super::buffers::{i32_arg, in_ptr, out_ptr, storage};
use super::conv::{grid, map_out, transposed_bf16, ColsSource};
use super::{Ctx, Module};
use crate::output_grad::OutputGrad;
use crate::plan::{
    bf16_conv_plan, split_sum_blocks, weight_operand_blocks, Bf16ConvPlan, Bf16ConvProduct, SPLIT_SUM_THREADS,
    WEIGHT_OPERAND_THREADS,
};
use candle_core::cuda_backend::CudaDevice;

/// `g` (F32 `(B, O, Ho, Wo)`) channels last in bf16, rounded to nearest even: BF16 `(B, Ho·Wo,
/// O)`, the output gradient as the input gradient's implicit GEMM and the weight gradient's
/// cuBLAS product read it.
pub(crate) fn channels_last_bf16(g: &Tensor) -> Result<Tensor> {
    let (b, o, ho, wo) = g.dims4()?;
    transposed_bf16(&g.reshape((b, o, ho * wo))?, None)
}

/// `dL/dx`, F32 `(B, C, h, w)`, of a stride-1 convolution with weight `w_tilde` (W~ `(O, C, kh,
/// kw)`, any float dtype, rounded to bf16): the stride-1 convolution of the output gradient `g`
/// (`g_nhwc`: [`channels_last_bf16`] of the F32 `(B, O, Ho, Wo)` gradient of dims `g_dims`) with
/// W~ flipped and transposed, zero padding `pad` (the forward's `kh - 1 - pad`), products summed
/// in f32. `None` where the plan leaves it to the im2col path.
pub(crate) fn implicit_input_grad(
    (g_nhwc, g_dims): (&Tensor, (usize, usize, usize, usize)),
    w_tilde: &Tensor,
    pad: usize,
    (h, w): (usize, usize),
) -> Result<Option<Tensor>> {
    let Device::Cuda(dev) = g_nhwc.device() else {
        return Ok(None);
    };
    let (b, o, ho, wo) = g_dims;
    let (o_w, c, kh, kw) = w_tilde.dims4()?;
    if g_nhwc.dtype() != DType::BF16
        || g_nhwc.dims() != [b, ho * wo, o]
        || o_w != o
        || ho + 2 * pad + 1 != h + kh
        || wo + 2 * pad + 1 != w + kw
    {
        bail!("bitlinear cuda: implicit_input_grad needs a channels-last BF16 gradient and a matching weight and size")
    }
    let ctx = Ctx::new(dev)?;
    let Some(plan) = bf16_conv_plan(
        Bf16ConvProduct::InputGrad,
        (b, h * w),
        o,
        kh * kw,
        c,
        &ctx.info,
        &ctx.settings,
    ) else {
        return Ok(None);
    };
    let wt = input_grad_weight(w_tilde)?;
    let dx = launch((&ctx, dev), &plan, g_nhwc, (b, ho, wo, o), &wt, (kh, kw, pad), (h, w))?;
    Ok(Some(sum_splits(dx, &plan)?.reshape((b, c, h, w))?))
}

/// `dL/dW`, F32 `(O, C, kh, kw)`, of a stride-1 convolution with padding `pad` of the images
/// `x` (`(B, C, H, W)` values, or codes and scales: rounded to bf16) whose output gradient is `g`
/// (F32 `(B, O, Ho, Wo)`, rounded to bf16; its NCHW form is asked for only where the plan takes
/// the product), products summed in f32 (module docs). `None` where the plan leaves it to the
/// im2col path (among others where `B % 8 != 0`).
pub(crate) fn implicit_weight_grad(
    x: ColsSource,
    g: &OutputGrad,
    (kh, kw): (usize, usize),
    pad: usize,
) -> Result<Option<Tensor>> {
    let Device::Cuda(dev) = g.device() else {
        return Ok(None);
    };
    let (b, o, ho, wo) = g.dims4()?;
    let (bx, c, h, w) = match x {
        ColsSource::Values(x) => x.dims4()?,
        ColsSource::Codes { dims, .. } => dims,
    };
    if g.dtype() != DType::F32 || bx != b || ho + kh != h + 2 * pad + 1 || wo + kw != w + 2 * pad + 1 {
        bail!("bitlinear cuda: implicit_weight_grad needs an F32 gradient of the images' convolution")
    }
    let ctx = Ctx::new(dev)?;
    let Some(plan) = bf16_conv_plan(
        Bf16ConvProduct::WeightGrad,
        (c, kh * kw),
        b,
        ho * wo,
        o,
        &ctx.info,
        &ctx.settings,
    ) else {
        return Ok(None);
    };
    let g = g.nchw()?;
    // x~ as (C·H·W, B) and g as (O·Ho·Wo, B): one transpose of the batch each.
    let xt = match x {
        ColsSource::Values(x) => transposed_bf16(&x.reshape((1, b, c * h * w))?, None)?,
        ColsSource::Codes { codes, scales, .. } => transposed_bf16(&codes.reshape((1, b, c * h * w))?, Some(scales))?,
    };
    let gt = transposed_bf16(&g.reshape((1, b, o * ho * wo))?, None)?.reshape((o, ho * wo * b))?;
    let parts = launch((&ctx, dev), &plan, &xt, (c, h, w, b), &gt, (ho, wo, pad), (kh, kw))?;
    sum_splits(parts, &plan)?
        .reshape((c, o, kh, kw))?
        .transpose(0, 1)?
        .contiguous()
        .map(Some)
}

/// The input gradient's weight operand: BF16 `(C, kh·kw·O)`, row `c` (an input channel), column
/// `(ky·kw + kx)·O + co` (the GEMM's k order) holding `W~[co][c][kh-1-ky][kw-1-kx]` of `w_tilde`
/// (`(O, C, kh, kw)`, rounded to bf16), in one pass of `input_grad_weight_bf16`.
fn input_grad_weight(w_tilde: &Tensor) -> Result<Tensor> {
    let (o, c, kh, kw) = w_tilde.dims4()?;
    let n = o * c * kh * kw;
    let w = w_tilde.to_dtype(DType::F32)?;
    map_out(
        &w,
        n,
        (c, kh * kw * o),
        DType::BF16,
        "input_grad_weight",
        |ctx, w_ptr, out_ptr| {
            let cfg = grid(
                weight_operand_blocks(n, &ctx.info),
                WEIGHT_OPERAND_THREADS,
                "weight operand blocks",
            )?;
            let f = ctx.func(Module::ConvBf16, "input_grad_weight_bf16")?;
            let (o, c, t) = (i32_arg(o, "O")?, i32_arg(c, "C")?, i32_arg(kh * kw, "taps")?);
            launch!(ctx, f, cfg, w_ptr, o, c, t, out_ptr)
        },
    )
}

/// The partial outputs `(splits, …)` of `plan` summed in split order: `(…)`. One pass of
/// `sum_splits_f32` (candle's `sum(0)` reduces across the leading axis with strided reads).
fn sum_splits(parts: Tensor, plan: &Bf16ConvPlan) -> Result<Tensor> {
    let splits = plan.k_splits();
    if splits == 1 {
        return parts.squeeze(0);
    }
    let dims = parts.dims()[1..].to_vec();
    let n = parts.elem_count() / splits;
    map_out(&parts, n, dims, DType::F32, "sum_splits", |ctx, parts_ptr, out_ptr| {
        let cfg = grid(split_sum_blocks(n, &ctx.info), SPLIT_SUM_THREADS, "split-sum blocks")?;
        let f = ctx.func(Module::ConvBf16, "sum_splits_f32")?;
        let splits = i32_arg(splits, "splits")?;
        launch!(ctx, f, cfg, parts_ptr, out_ptr, splits, n as i64)
    })
}

/// Runs `plan`'s kernel: the stride-1 convolution with zero padding `pad` of `images` bf16 NHWC
/// images `x` (`(images, h·w, c)`) with the bf16 weight `wt` (`(N, kh·kw·c)` in the GEMM's k
/// order) into `(ho, wo)` outputs: F32 `(splits, images, N, ho·wo)`, one partial output a split
/// of the k range.
fn launch(
    (ctx, dev): (&Ctx, &CudaDevice),
    plan: &Bf16ConvPlan,
    x: &Tensor,
    (images, h, w, c): (usize, usize, usize, usize),
    wt: &Tensor,
    (kh, kw, pad): (usize, usize, usize),
    (ho, wo): (usize, usize),
) -> Result<Tensor> {
    let n = wt.dim(0)?;
    let k = kh * kw * c;
    if x.dtype() != DType::BF16 || wt.dtype() != DType::BF16 || x.elem_count() != images * h * w * c {
        bail!("bitlinear cuda: internal error, bf16 conv operands of the wrong dtype or size")
    }
    if wt.dims2()? != (n, k) {
        bail!("bitlinear cuda: internal error, bf16 conv weight not in the GEMM's order")
    }
    // The kernel's indices: 32-bit within an image and a weight row, 64-bit across them.
    i32_arg(h * w * c, "H*W*C")?;
    let m = images * ho * wo;
    let splits = plan.k_splits();
    let mut out = ctx.alloc::<f32>(splits * m * n)?;
    {
        let (x_st, x_l) = x.storage_and_layout();
        let (w_st, w_l) = wt.storage_and_layout();
        let (Storage::Cuda(xs), Storage::Cuda(ws)) = (&*x_st, &*w_st) else {
            bail!("bitlinear cuda: bf16 conv expects CUDA tensors")
        };
        let (Some((x0, _)), Some((w0, _))) = (x_l.contiguous_offsets(), w_l.contiguous_offsets()) else {
            bail!("bitlinear cuda: internal error, bf16 conv operands not contiguous")
        };
        if !x0.is_multiple_of(8) || !w0.is_multiple_of(8) {
            bail!("bitlinear cuda: internal error, bf16 conv operands not 16-byte aligned")
        }
        let stream = &ctx.stream;
        let mut guards = Vec::new();
        let xp = in_ptr(xs, x0, stream, &mut guards)?;
        let wp = in_ptr(ws, w0, stream, &mut guards)?;
        let yp = out_ptr(&mut out, stream, &mut guards);
        let f = ctx.func(Module::ConvBf16, plan.tile.kernel_name())?;
        let (_, _, threads) = plan.tile.shape();
        let cfg = LaunchConfig {
            grid_dim: plan.grid,
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: plan.tile.smem_bytes() as u32,
        };
        let a = |v: usize, what: &str| i32_arg(v, what);
        let split_stride = (m * n) as i64;
        launch!(
            ctx,
            f,
            cfg,
            xp,
            wp,
            yp,
            a(m, "M")?,
            a(n, "N")?,
            a(k, "K")?,
            a(c, "C")?,
            a(h, "H")?,
            a(w, "W")?,
            a(kw, "KW")?,
            a(pad, "padding")?,
            a(wo, "Wo")?,
            a(ho * wo, "Ho*Wo")?,
            a(plan.k_tiles_per_split, "k tiles a split")?,
            split_stride
        )?;
        drop(guards);
    }
    let out = storage(CudaStorageSlice::F32(out), dev);
    Ok(crate::device::tensor_from(
        Storage::Cuda(out),
        (splits, images, n, ho * wo),
    ))
}
