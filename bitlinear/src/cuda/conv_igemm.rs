//! The implicit-GEMM convolution on CUDA (`kernels/conv_igemm.cu`), where
//! `crate::plan::implicit_conv_plan` takes the convolution: the activation codes transposed to
//! channels last, the weight codes packed in the kernel's k order, then one kernel writes the
//! dequantized NCHW output.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, DType, Device, Result, Storage, Tensor};

use super::buffers::{i32_arg, in_ptr, out_ptr, storage};
use super::conv::WeightScale;
use super::{Ctx, Module};
use crate::im2col::Geometry;
use crate::plan::{implicit_conv_plan, ImplicitConvPlan};

/// The plan of a convolution of `images` images of geometry `g` into `n` output channels on
/// `dev`, or `None` where it stays on the im2col path (`crate::plan::implicit_conv_plan`).
pub(crate) fn implicit_plan(dev: &Device, g: &Geometry, images: usize, n: usize) -> Result<Option<ImplicitConvPlan>> {
    let Device::Cuda(dev) = dev else {
        return Ok(None);
    };
    let ctx = Ctx::new(dev)?;
    let (ho, wo) = g.out_hw();
    Ok(implicit_conv_plan(
        (images, ho * wo),
        g.c,
        g.kh * g.kw,
        n,
        &ctx.info,
        &ctx.settings,
    ))
}

/// The weight codes `w_codes` (float `(N, C·kh·kw)` on the device, values exactly -1, 0, 1, in
/// the conv weight's `(ci, ky, kx)` order) packed in the implicit GEMM's order
/// (`crate::implicit_conv`), rows padded as `p` says: U8 `(N, p.weight_row_bytes)`.
pub(crate) fn pack_kernel_order(w_codes: &Tensor, g: &Geometry, p: &ImplicitConvPlan) -> Result<Tensor> {
    let n = w_codes.dim(0)?;
    let w = crate::implicit_conv::kernel_order(w_codes, g.c, g.kh * g.kw, p.weight_row_bytes * 4)?;
    let bytes = {
        let (st, l) = w.storage_and_layout();
        let Storage::Cuda(st) = &*st else {
            bail!("bitlinear cuda: implicit conv weight left the GPU")
        };
        super::pack_exact_codes(st, l)?
    };
    Ok(crate::device::tensor_from(
        Storage::Cuda(bytes),
        (n, p.weight_row_bytes),
    ))
}

/// `(conv(x_q, W_q) · s_x) · s_w` as F32 `(B, N, Ho·Wo)` as `p` plans it, for the int8 `codes`
/// (U8 `(B, C·H·W)`, images NCHW of geometry `g`) with per-image scales `s_x` (F32 `(B)`) and the
/// weight `w_bytes` packed by [`pack_kernel_order`] (or the same order made on the host).
pub(crate) fn implicit_conv_f32(
    p: &ImplicitConvPlan,
    codes: &Tensor,
    s_x: &Tensor,
    w_bytes: &Tensor,
    s_w: WeightScale,
    g: &Geometry,
) -> Result<Tensor> {
    let Device::Cuda(dev) = codes.device() else {
        bail!("bitlinear cuda: implicit_conv expects CUDA tensors")
    };
    let ctx = Ctx::new(dev)?;
    let (b, n) = (codes.dim(0)?, w_bytes.dim(0)?);
    let (ho, wo) = g.out_hw();
    let k = g.k();
    if codes.dtype() != DType::U8 || s_x.dtype() != DType::F32 || codes.dims2()? != (b, g.image_len()) {
        bail!("bitlinear cuda: implicit_conv needs U8 codes (B, C·H·W) and F32 scales")
    }
    if w_bytes.dtype() != DType::U8 || w_bytes.dims2()? != (n, p.weight_row_bytes) {
        bail!("bitlinear cuda: internal error, implicit_conv weight not packed as planned")
    }
    // Channels last: every 16 codes of a GEMM row are one pixel's run of channels.
    let x = super::conv::codes_nhwc(codes, g.c, g.h * g.w)?;
    let w_bytes = w_bytes.contiguous()?;
    let s_x = s_x.contiguous()?;
    let total = b * n * ho * wo;
    let mut out = ctx.alloc::<f32>(total)?;
    {
        let (x_st, x_l) = x.storage_and_layout();
        let (s_st, s_l) = s_x.storage_and_layout();
        let (w_st, w_l) = w_bytes.storage_and_layout();
        let held = s_w.hold();
        let (Storage::Cuda(xs), Storage::Cuda(ss)) = (&*x_st, &*s_st) else {
            bail!("bitlinear cuda: implicit_conv expects CUDA tensors")
        };
        let (Some((x0, _)), Some((s0, _))) = (x_l.contiguous_offsets(), s_l.contiguous_offsets()) else {
            bail!("bitlinear cuda: internal error, implicit_conv operands not contiguous")
        };
        if !x0.is_multiple_of(16) {
            bail!("bitlinear cuda: internal error, implicit_conv codes not 16-byte aligned")
        }
        let stream = &ctx.stream;
        let mut guards = Vec::new();
        let xp = in_ptr(xs, x0, stream, &mut guards)?;
        let sp = in_ptr(ss, s0, stream, &mut guards)?;
        let (Storage::Cuda(ws), Some((w0, _))) = (&*w_st, w_l.contiguous_offsets()) else {
            bail!("bitlinear cuda: implicit_conv weight left the GPU")
        };
        let wp = in_ptr(ws, w0, stream, &mut guards)?;
        let (sw_val, sw_ptr) = held.args(stream, &mut guards, "implicit_conv")?;
        let yp = out_ptr(&mut out, stream, &mut guards);
        let f = ctx.func(Module::ConvIgemm, p.tile.kernel_name())?;
        let (_, _, threads) = p.tile.shape();
        let cfg = LaunchConfig {
            grid_dim: p.grid,
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: p.tile.smem_bytes() as u32,
        };
        let a = |v: usize, what: &str| i32_arg(v, what);
        i32_arg(g.h * g.w * g.c, "H*W*C")?;
        launch!(
            ctx,
            f,
            cfg,
            xp,
            wp,
            a(p.weight_row_bytes, "K/4")?,
            sp,
            sw_val,
            sw_ptr,
            yp,
            a(b * ho * wo, "B*Ho*Wo")?,
            a(n, "N")?,
            a(k, "K")?,
            a(g.c, "C")?,
            a(g.h, "H")?,
            a(g.w, "W")?,
            a(g.kw, "KW")?,
            a(g.stride, "stride")?,
            a(g.pad, "padding")?,
            a(wo, "Wo")?,
            a(ho * wo, "Ho*Wo")?
        )?;
        drop(guards);
    }
    let out = storage(CudaStorageSlice::F32(out), dev);
    Ok(crate::device::tensor_from(Storage::Cuda(out), (b, n, ho * wo)))
}
