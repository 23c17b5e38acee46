//! The implicit-GEMM input gradient of a stride-1 convolution on CUDA
//! (`kernels/conv_dgrad.cu`), where `crate::plan::dgrad_plan` takes it.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, DType, Device, Result, Storage, Tensor};

use super::buffers::{i32_arg, in_ptr, out_ptr, storage};
use super::{Ctx, Module};
use crate::plan::{dgrad_plan, DGRAD_THREADS};

/// `dL/dx` F32 `(B, C, H, W)` = the stride-1 convolution of the output gradient `g` (F32
/// `(B, O, Ho, Wo)`) with `w_t` (BF16 `(C, O, kh, kw)`, the flipped transposed kernel) and zero
/// padding `pad`, its products in bf16 with f32 sums; `None` where the plan leaves it to the
/// transposed im2col.
pub(crate) fn implicit_input_grad(
    g: &Tensor,
    w_t: &Tensor,
    pad: usize,
    (b, c, h, w): (usize, usize, usize, usize),
) -> Result<Option<Tensor>> {
    let Device::Cuda(dev) = g.device() else {
        return Ok(None);
    };
    let (gb, o, ho, wo) = g.dims4()?;
    let (wc, wo_, kh, kw) = w_t.dims4()?;
    if g.dtype() != DType::F32 || w_t.dtype() != DType::BF16 || gb != b || wc != c || wo_ != o {
        bail!("bitlinear cuda: implicit_input_grad needs an F32 gradient and a BF16 (C, O, kh, kw) kernel")
    }
    if ho + 2 * pad + 1 != h + kh || wo + 2 * pad + 1 != w + kw {
        bail!("bitlinear cuda: implicit_input_grad: the output does not cover the padded gradient")
    }
    let ctx = Ctx::new(dev)?;
    let Some(p) = dgrad_plan(b * h * w, c, o, kh * kw, &ctx.info, &ctx.settings) else {
        return Ok(None);
    };
    let k = o * kh * kw;
    let wt = w_t
        .reshape((c, k))?
        .pad_with_zeros(1, 0, p.padded_k - k)?
        .contiguous()?;
    let g = g.contiguous()?;
    let total = b * c * h * w;
    let mut out = ctx.alloc::<f32>(total)?;
    {
        let (g_st, g_l) = g.storage_and_layout();
        let (w_st, w_l) = wt.storage_and_layout();
        let (Storage::Cuda(gs), Storage::Cuda(ws)) = (&*g_st, &*w_st) else {
            bail!("bitlinear cuda: implicit_input_grad expects CUDA tensors")
        };
        let (Some((g0, _)), Some((w0, _))) = (g_l.contiguous_offsets(), w_l.contiguous_offsets()) else {
            bail!("bitlinear cuda: internal error, implicit_input_grad operands not contiguous")
        };
        if !(w0 * 2).is_multiple_of(16) {
            bail!("bitlinear cuda: internal error, implicit_input_grad kernel not 16-byte aligned")
        }
        let stream = &ctx.stream;
        let mut guards = Vec::new();
        let gp = in_ptr(gs, g0, stream, &mut guards)?;
        let wp = in_ptr(ws, w0, stream, &mut guards)?;
        let yp = out_ptr(&mut out, stream, &mut guards);
        let f = ctx.func(Module::ConvDgrad, "conv_dgrad_bf16")?;
        let cfg = LaunchConfig {
            grid_dim: p.grid,
            block_dim: (DGRAD_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let a = |v: usize, what: &str| i32_arg(v, what);
        i32_arg(o * ho * wo, "O*Ho*Wo")?;
        launch!(
            ctx,
            f,
            cfg,
            gp,
            wp,
            yp,
            a(b * h * w, "B*H*W")?,
            a(c, "C")?,
            a(k, "K")?,
            a(p.padded_k, "padded K")?,
            a(o, "O")?,
            a(h, "H")?,
            a(w, "W")?,
            a(ho, "Ho")?,
            a(wo, "Wo")?,
            a(kh, "KH")?,
            a(kw, "KW")?,
            a(pad, "padding")?
        )?;
        drop(guards);
    }
    let out = storage(CudaStorageSlice::F32(out), dev);
    Ok(Some(crate::device::tensor_from(Storage::Cuda(out), (b, c, h, w))))
}
