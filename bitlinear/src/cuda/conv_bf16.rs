//! The bf16 implicit-GEMM convolution on CUDA (`kernels/conv_bf16.cu`): the input gradient of a
//! ternary convolution with bf16 backward products, where `crate::plan::bf16_conv_plan` takes
//! it. The output gradient goes channels last in bf16, the weight into the kernel's k order,
//! then one kernel writes the NCHW f32 gradient; no im2col of the output gradient is made.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, DType, Device, Result, Storage, Tensor};

use super::buffers::{i32_arg, in_ptr, out_ptr, storage};
use super::{Ctx, Module};
use crate::plan::bf16_conv_plan;

/// `dL/dx`, F32 `(B, C, h, w)`, of a stride-1 convolution: the stride-1 convolution of the
/// output gradient `g` (F32 `(B, O, Ho, Wo)`, rounded to bf16) with `w_t` (`(C, O, kh, kw)`, the
/// flipped, transposed weight, any float dtype, rounded to bf16) and zero padding `pad`, products
/// summed in f32. `None` where the plan leaves it to the im2col path.
pub(crate) fn implicit_input_grad(
    g: &Tensor,
    w_t: &Tensor,
    pad: usize,
    (h, w): (usize, usize),
) -> Result<Option<Tensor>> {
    let Device::Cuda(dev) = g.device() else {
        return Ok(None);
    };
    let (b, o, ho, wo) = g.dims4()?;
    let (c, o_w, kh, kw) = w_t.dims4()?;
    if g.dtype() != DType::F32 || o_w != o || ho + 2 * pad + 1 != h + kh || wo + 2 * pad + 1 != w + kw {
        bail!("bitlinear cuda: implicit_input_grad needs an F32 gradient and a matching weight and size")
    }
    let ctx = Ctx::new(dev)?;
    let Some(plan) = bf16_conv_plan((b, h * w), o, kh * kw, c, &ctx.info, &ctx.settings) else {
        return Ok(None);
    };
    // Both images' index ranges must fit the kernel's 32-bit sizes.
    i32_arg(ho * wo * o, "Ho*Wo*O")?;
    i32_arg(h * w * c, "H*W*C")?;
    let x = super::conv::values_nhwc_bf16(g)?;
    // Row n = input channel, k = (ky·kw + kx)·O + co: the GEMM's k order.
    let wt = w_t.permute((0, 2, 3, 1))?.to_dtype(DType::BF16)?.contiguous()?;
    let mut out = ctx.alloc::<f32>(b * c * h * w)?;
    {
        let (x_st, x_l) = x.storage_and_layout();
        let (w_st, w_l) = wt.storage_and_layout();
        let (Storage::Cuda(xs), Storage::Cuda(ws)) = (&*x_st, &*w_st) else {
            bail!("bitlinear cuda: implicit_input_grad expects CUDA tensors")
        };
        let (Some((x0, _)), Some((w0, _))) = (x_l.contiguous_offsets(), w_l.contiguous_offsets()) else {
            bail!("bitlinear cuda: internal error, implicit_input_grad operands not contiguous")
        };
        if !x0.is_multiple_of(8) || !w0.is_multiple_of(8) {
            bail!("bitlinear cuda: internal error, implicit_input_grad operands not 16-byte aligned")
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
        launch!(
            ctx,
            f,
            cfg,
            xp,
            wp,
            yp,
            a(b * h * w, "B*H*W")?,
            a(c, "C")?,
            a(kh * kw * o, "K")?,
            a(o, "O")?,
            a(ho, "Ho")?,
            a(wo, "Wo")?,
            a(kw, "KW")?,
            a(pad, "padding")?,
            a(w, "W")?,
            a(h * w, "H*W")?
        )?;
        drop(guards);
    }
    let out = storage(CudaStorageSlice::F32(out), dev);
    Ok(Some(crate::device::tensor_from(Storage::Cuda(out), (b, c, h, w))))
}
