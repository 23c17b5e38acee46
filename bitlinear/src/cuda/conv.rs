//! The kernels of the convolutions on CUDA (`kernels/conv.cu`): the int8 im2col gather and the
//! dequantizer of the accumulators of `PackedBitConv2d`, the channels-last transpose of the
//! implicit GEMM's codes, and the transposed im2col of `BitConv2d`'s backward, launched as the
//! `crate::plan` functions of `plan/conv.rs` decide.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use super::buffers::{i32_arg, in_ptr, out_ptr, out_slice_ptr, storage};
use super::{Ctx, Module};
use crate::im2col::Geometry;
use crate::plan::{codes_nhwc_plan, conv_dequant_plan, im2col_plan, im2col_t_plan};

/// A 1-D launch of `blocks` blocks of `threads` threads (`what` names the blocks in errors).
pub(super) fn grid(blocks: usize, threads: usize, what: &str) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (i32_arg(blocks, what)? as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Rows `r0 .. r0 + r` of the im2col of images `codes` (U8 `(images, C·H·W)`, contiguous):
/// U8 `(images · r, K)`, image-major, as `crate::im2col` documents.
pub(crate) fn im2col(codes: &CudaStorage, l: &Layout, g: &Geometry, r0: usize, r: usize) -> Result<CudaStorage> {
    let dev = &codes.device;
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
    if codes.dtype() != DType::U8 {
        bail!("bitlinear cuda: im2col codes must be U8, got {:?}", codes.dtype())
    }
    let Some((start, _)) = l.contiguous_offsets() else {
        bail!("bitlinear cuda: im2col codes must be contiguous")
    };
    let images = l.dims().first().copied().unwrap_or(0);
    let (_, wo) = g.out_hw();
    let bytes = images * r * g.k();
    let mut out = ctx.alloc::<u8>(bytes)?;
    if bytes > 0 {
        // one thread a (row, channel) pair
        let p = im2col_plan(images * r * g.c, &ctx.info);
        let mut guards = Vec::new();
        let xp = in_ptr(codes, start, stream, &mut guards)?;
        let op = out_ptr(&mut out, stream, &mut guards);
        let f = ctx.func(Module::Conv, "im2col_i8")?;
        let cfg = grid(p.blocks, p.threads, "im2col blocks")?;
        let a = |v: usize, what: &str| i32_arg(v, what);
        launch!(
            ctx,
            f,
            cfg,
            xp,
            op,
            a(images, "images")?,
            a(g.c, "C")?,
            a(g.h, "H")?,
            a(g.w, "W")?,
            a(g.kh, "KH")?,
            a(g.kw, "KW")?,
            a(g.stride, "stride")?,
            a(g.pad, "padding")?,
            a(wo, "Wo")?,
            a(r0, "first row")?,
            a(r, "rows")?
        )?;
        drop(guards);
    }
    Ok(storage(CudaStorageSlice::U8(out), dev))
}

/// The int8 `codes` (U8 `(B, C·hw)`, images NCHW) channels last: U8 `(B, hw, C)`
/// (`codes_nhwc`).
pub(crate) fn codes_nhwc(codes: &Tensor, c: usize, hw: usize) -> Result<Tensor> {
    let b = codes.dim(0)?;
    if codes.dtype() != DType::U8 || codes.dims2()? != (b, c * hw) {
        bail!("bitlinear cuda: codes_nhwc needs U8 codes (B, C·H·W)")
    }
    let total = b * c * hw;
    map_out(codes, total, (b, hw, c), DType::U8, "codes_nhwc", |ctx, sp, op| {
        let (grid_dim, block_dim) = codes_nhwc_plan(b, c, hw);
        let cfg = LaunchConfig {
            grid_dim,
            block_dim,
            shared_mem_bytes: 0,
        };
        let f = ctx.func(Module::Conv, "codes_nhwc")?;
        let (bi, ci, hwi) = (i32_arg(b, "images")?, i32_arg(c, "C")?, i32_arg(hw, "H*W")?);
        i32_arg(c * hw, "C*H*W")?;
        launch!(ctx, f, cfg, sp, op, bi, ci, hwi)
    })
}

/// The matrices `src` (`(B, R, C)`: F32 values, or U8 int8 codes with an F32 scale a row,
/// `scales (R)`, whose values are `code · scale` rounded once) transposed into bf16, rounded to
/// nearest even: BF16 `(B, C, R)` (`transpose_bf16_*`, launched as `codes_nhwc`).
pub(crate) fn transposed_bf16(src: &Tensor, scales: Option<&Tensor>) -> Result<Tensor> {
    let (b, r, c) = src.dims3()?;
    let (name, scales) = match (src.dtype(), scales) {
        (DType::F32, None) => ("transpose_bf16_f32", None),
        (DType::U8, Some(s)) if s.dtype() == DType::F32 && s.dims1()? == r => {
            ("transpose_bf16_i8", Some(s.contiguous()?))
        }
        _ => bail!("bitlinear cuda: transposed_bf16 takes F32 values, or U8 codes with F32 scales a row"),
    };
    i32_arg(r * c, "R*C")?;
    let held = scales.as_ref().map(|s| s.storage_and_layout());
    map_out(
        src,
        b * r * c,
        (b, c, r),
        DType::BF16,
        "transposed_bf16",
        |ctx, sp, op| {
            let mut guards = Vec::new();
            let scales_ptr = match &held {
                Some((st, l)) => {
                    let (Storage::Cuda(s), Some((s0, _))) = (&**st, l.contiguous_offsets()) else {
                        bail!("bitlinear cuda: transposed_bf16 scales left the GPU")
                    };
                    in_ptr(s, s0, &ctx.stream, &mut guards)?
                }
                None => 0u64,
            };
            let (grid_dim, block_dim) = codes_nhwc_plan(b, r, c);
            let cfg = LaunchConfig {
                grid_dim,
                block_dim,
                shared_mem_bytes: 0,
            };
            let f = ctx.func(Module::Conv, name)?;
            let (bi, ri, ci) = (i32_arg(b, "images")?, i32_arg(r, "rows")?, i32_arg(c, "columns")?);
            launch!(ctx, f, cfg, sp, scales_ptr, op, bi, ri, ci)?;
            drop(guards);
            Ok(())
        },
    )
}

/// The weight scale of [`conv_dequantize`] and the implicit GEMM: a host value, or a
/// one-element F32 tensor on the device (never read back to the host).
#[derive(Clone, Copy)]
pub(crate) enum WeightScale<'a> {
    Host(f32),
    Device(&'a Tensor),
}

/// A weight scale ready for a launch: the host value, or the device scale's storage, held
/// while its pointer is in use.
pub(super) struct HeldScale<'t, G> {
    host: f32,
    device: Option<(G, &'t Layout)>,
}

impl<'t> WeightScale<'t> {
    /// The scale ready for [`HeldScale::args`].
    pub(super) fn hold(self) -> HeldScale<'t, impl std::ops::Deref<Target = Storage> + 't> {
        match self {
            WeightScale::Host(v) => HeldScale { host: v, device: None },
            WeightScale::Device(t) => HeldScale {
                host: 0.0,
                device: Some(t.storage_and_layout()),
            },
        }
    }
}

impl<G: std::ops::Deref<Target = Storage>> HeldScale<'_, G> {
    /// The kernels' `(sw_val, sw_ptr)`: the host value and a null pointer, or 0 and the pointer
    /// of the device scale (one contiguous F32 value on CUDA; `who` names the caller in errors).
    pub(super) fn args<'a>(
        &'a self,
        stream: &'a candle_core::cuda_backend::cudarc::driver::CudaStream,
        guards: &mut Vec<candle_core::cuda_backend::cudarc::driver::SyncOnDrop<'a>>,
        who: &str,
    ) -> Result<(f32, u64)> {
        let Some((st, l)) = &self.device else {
            return Ok((self.host, 0));
        };
        let (Storage::Cuda(w), Some((w0, _))) = (&**st, l.contiguous_offsets()) else {
            bail!("bitlinear cuda: {who} needs a contiguous CUDA weight scale")
        };
        if w.dtype() != DType::F32 || l.shape().elem_count() != 1 {
            bail!("bitlinear cuda: {who} needs one F32 weight scale")
        }
        Ok((0.0, in_ptr(w, w0, stream, guards)?))
    }
}

/// One tile's accumulators `acc` (I32 `(bi, r, N)`, images `i0 ..`) dequantized with the
/// per-image scales `scales` (F32 `(B)`) and `s_w`: F32 `(bi, N, r)`, `(acc · s_x) · s_w`.
pub(crate) fn conv_dequantize(acc: &Tensor, scales: &Tensor, i0: usize, s_w: WeightScale) -> Result<Tensor> {
    let (bi, r, n) = acc.dims3()?;
    let acc = acc.contiguous()?;
    let (a_st, a_l) = acc.storage_and_layout();
    let (s_st, s_l) = scales.storage_and_layout();
    let (Storage::Cuda(a), Storage::Cuda(s)) = (&*a_st, &*s_st) else {
        bail!("bitlinear cuda: conv_dequantize expects CUDA tensors")
    };
    let (Some((a0, _)), Some((s0, _))) = (a_l.contiguous_offsets(), s_l.contiguous_offsets()) else {
        bail!("bitlinear cuda: conv_dequantize inputs must be contiguous")
    };
    if a.dtype() != DType::I32 || s.dtype() != DType::F32 || i0 + bi > s_l.shape().elem_count() {
        bail!("bitlinear cuda: conv_dequantize needs I32 accumulators and F32 scales for every image")
    }
    let dev = &a.device;
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
    let total = bi * r * n;
    let mut out = ctx.alloc::<f32>(total)?;
    let held = s_w.hold();
    if total > 0 {
        let p = conv_dequant_plan(bi, r, n, &ctx.info);
        let mut guards = Vec::new();
        let ap = in_ptr(a, a0, stream, &mut guards)?;
        let sp = in_ptr(s, s0 + i0, stream, &mut guards)?;
        let yp = out_ptr(&mut out, stream, &mut guards);
        let cfg = grid(p.blocks, p.threads, "dequantizer blocks")?;
        let (images, rows, cols) = (i32_arg(bi, "images")?, i32_arg(r, "rows")?, i32_arg(n, "N")?);
        match held.args(stream, &mut guards, "conv_dequantize")? {
            (s_w, 0) => {
                let f = ctx.func(Module::Conv, "conv_dequant_f32")?;
                launch!(ctx, f, cfg, ap, sp, s_w, yp, images, rows, cols)?;
            }
            (_, wp) => {
                let f = ctx.func(Module::Conv, "conv_dequant_f32_dsw")?;
                launch!(ctx, f, cfg, ap, sp, wp, yp, images, rows, cols)?;
            }
        }
        drop(guards);
    }
    let out = storage(CudaStorageSlice::F32(out), dev);
    Ok(crate::device::tensor_from(Storage::Cuda(out), (bi, n, r)))
}

/// The kernel name suffix and allocation of an F32 or BF16 output of these kernels.
fn out_suffix(out: DType, who: &str) -> Result<&'static str> {
    match out {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        d => bail!("bitlinear cuda: {who} writes F32 or BF16, not {d:?}"),
    }
}

/// How [`im2col_t`] lays out the columns of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColsLayout {
    /// `(B, C·kh·kw, ho·wo)`: each image's block is the right operand of its own product, whose
    /// result is that image in NCHW (the input gradient).
    PerImage,
    /// `(C·kh·kw, B·ho·wo)`: one matrix whose rows run over every image's pixels (the weight
    /// gradient's operand, the sum over the batch inside one product).
    Rows,
}

/// What [`im2col_t`] lays out: images `(B, C, H, W)`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ColsSource<'a> {
    /// F32 values.
    Values(&'a Tensor),
    /// The fake quantization `x~ = code · s_x` of the images of `dims`, from their int8 codes
    /// (U8 `(B, C·H·W)`) and per-image F32 `scales (B)`: one f32 product rounded to nearest, as
    /// the activation quantizer writes `x~`, so the columns equal those of `x~` itself.
    Codes {
        codes: &'a Tensor,
        scales: &'a Tensor,
        dims: (usize, usize, usize, usize),
    },
}

/// The transposed im2col of `src` for a stride-1 `kh x kw` convolution with zero padding `pad`
/// and output `(ho, wo)`, in `out` (F32 or BF16) laid out as `layout` says (`kernels/conv.cu`).
pub(crate) fn im2col_t(
    src: ColsSource,
    (kh, kw): (usize, usize),
    pad: usize,
    (ho, wo): (usize, usize),
    out: DType,
    layout: ColsLayout,
) -> Result<Tensor> {
    let (x, scales, (b, c, h, w), source) = match src {
        ColsSource::Values(x) if x.dtype() == DType::F32 => (x, None, x.dims4()?, ""),
        ColsSource::Codes { codes, scales, dims } => {
            let (b, c, h, w) = dims;
            if codes.dtype() != DType::U8
                || codes.elem_count() != b * c * h * w
                || scales.dtype() != DType::F32
                || scales.elem_count() != b
            {
                bail!("bitlinear cuda: im2col_t needs U8 codes of the images and an F32 scale an image")
            }
            (codes, Some(scales.contiguous()?), dims, "i8_")
        }
        ColsSource::Values(_) => bail!("bitlinear cuda: im2col_t needs F32 images"),
    };
    if ho + kh > h + 2 * pad + 1 || wo + kw > w + 2 * pad + 1 {
        bail!("bitlinear cuda: im2col_t needs an output inside the padded input")
    }
    let suffix = out_suffix(out, "im2col_t")?;
    let k = c * kh * kw;
    let hw = ho * wo;
    let total = b * k * hw;
    let (shape, img_stride, row_stride) = match layout {
        ColsLayout::PerImage => (Shape::from((b, k, hw)), k * hw, hw),
        ColsLayout::Rows => (Shape::from((k, b * hw)), hw, b * hw),
    };
    map_out(x, total, shape, out, "im2col_t", |ctx, sp, op| {
        let p = im2col_t_plan(b * c, hw, &ctx.info);
        let name = format!("im2col_t{}_{source}{suffix}", p.pixels_per_thread);
        let f = ctx.func(Module::Conv, &name)?;
        let cfg = grid(p.blocks, p.threads, "im2col_t blocks")?;
        let a = |v: usize, what: &str| i32_arg(v, what);
        let held = scales.as_ref().map(|t| t.storage_and_layout());
        let mut guards = Vec::new();
        let scales_ptr = match &held {
            Some((st, l)) => match (&**st, l.contiguous_offsets()) {
                (Storage::Cuda(s), Some((s0, _))) => in_ptr(s, s0, &ctx.stream, &mut guards)?,
                _ => bail!("bitlinear cuda: im2col_t expects the scales on the codes' device"),
            },
            None => 0u64,
        };
        launch!(
            ctx,
            f,
            cfg,
            sp,
            scales_ptr,
            op,
            a(b, "B")?,
            a(c, "C")?,
            a(h, "H")?,
            a(w, "W")?,
            a(kh, "KH")?,
            a(kw, "KW")?,
            a(pad, "P")?,
            a(ho, "HO")?,
            a(wo, "WO")?,
            img_stride as i64,
            row_stride as i64
        )?;
        drop(guards);
        Ok(())
    })
}

/// A kernel from one contiguous CUDA tensor `src` (its dtype checked by the caller) into a new
/// buffer of `total` values of `out` (U8, F32 or BF16), returned as a tensor of `shape`:
/// `launch(ctx, src, out)` gets the two device pointers and is not called when `total` is 0.
/// `who` names the caller in errors.
pub(super) fn map_out(
    src: &Tensor,
    total: usize,
    shape: impl Into<Shape>,
    out: DType,
    who: &str,
    launch: impl FnOnce(&Ctx, u64, u64) -> Result<()>,
) -> Result<Tensor> {
    let src = src.contiguous()?;
    let (st, l) = src.storage_and_layout();
    let (Storage::Cuda(s), Some((s0, _))) = (&*st, l.contiguous_offsets()) else {
        bail!("bitlinear cuda: {who} expects a contiguous CUDA tensor")
    };
    let dev = &s.device;
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
    let mut buf = ctx.alloc_out(out, total)?;
    if total > 0 {
        let mut guards = Vec::new();
        let sp = in_ptr(s, s0, stream, &mut guards)?;
        let op = out_slice_ptr(&mut buf, stream, &mut guards)?;
        launch(&ctx, sp, op)?;
        drop(guards);
    }
    let buf = storage(buf, dev);
    Ok(crate::device::tensor_from(Storage::Cuda(buf), shape))
}
