//! The implicit-GEMM convolution on CUDA (`kernels/conv_igemm.cu`), where
//! `crate::plan::implicit_conv_plan` takes the convolution: the activation codes transposed to
//! channels last, the weight codes packed in the kernel's k order, then one kernel writes the
//! dequantized NCHW output.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, DType, Result, Storage, Tensor};

use super::buffers::{i32_arg, in_ptr, out_ptr, storage};
use super::conv::WeightScale;
use super::{Ctx, Module};
use crate::im2col::Geometry;
use crate::plan::{implicit_conv_plan, IMPLICIT_CONV_BK};

/// `(conv(x_q, W_q) · s_x) · s_w` as F32 `(B, N, Ho·Wo)` for the int8 `codes` (U8 `(B, C·H·W)`,
/// images NCHW of geometry `g`) with per-image scales `s_x` (F32 `(B)`), the weight's codes
/// `w_codes` (float `(N, C·kh·kw)`, values exactly -1, 0, 1, in the conv weight's
/// `(ci, ky, kx)` order) and scale `s_w`; `None` where the plan leaves the convolution to the
/// im2col path.
pub(crate) fn implicit_conv_f32(
    codes: &Tensor,
    s_x: &Tensor,
    w_codes: &Tensor,
    s_w: WeightScale,
    g: &Geometry,
) -> Result<Option<Tensor>> {
    let candle_core::Device::Cuda(dev) = codes.device() else {
        bail!("bitlinear cuda: implicit_conv expects CUDA tensors")
    };
    let ctx = Ctx::new(dev)?;
    let (b, n) = (codes.dim(0)?, w_codes.dim(0)?);
    let (ho, wo) = g.out_hw();
    let (taps, k) = (g.kh * g.kw, g.k());
    let Some(p) = implicit_conv_plan((b, ho * wo), g.c, taps, n, &ctx.info, &ctx.settings) else {
        return Ok(None);
    };
    if codes.dtype() != DType::U8 || s_x.dtype() != DType::F32 || codes.dims2()? != (b, g.image_len()) {
        bail!("bitlinear cuda: implicit_conv needs U8 codes (B, C·H·W) and F32 scales")
    }
    // Channels last: every 16 codes of a GEMM row are one pixel's run of channels.
    let x = codes.reshape((b, g.c, g.h * g.w))?.transpose(1, 2)?.contiguous()?;
    // The weight in the kernel's k order ((ky, kx, ci), then each 16-k group transposed 4x4:
    // kernels/conv_igemm.cu), zero codes up to the padded row, packed.
    let kp = p.weight_row_bytes * 4;
    let w = w_codes
        .to_dtype(DType::F32)?
        .reshape((n, g.c, taps))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, k / 16, 4, 4))?
        .transpose(2, 3)?
        .contiguous()?
        .reshape((n, k))?
        .pad_with_zeros(1, 0, kp - k)?;
    debug_assert!(kp.is_multiple_of(IMPLICIT_CONV_BK / 4 * 4));
    let w_bytes = {
        let (st, l) = w.storage_and_layout();
        let Storage::Cuda(st) = &*st else {
            bail!("bitlinear cuda: implicit_conv weight left the GPU")
        };
        super::pack_exact_codes(st, l)?
    };
    let s_x = s_x.contiguous()?;
    let total = b * n * ho * wo;
    let mut out = ctx.alloc::<f32>(total)?;
    {
        let (x_st, x_l) = x.storage_and_layout();
        let (s_st, s_l) = s_x.storage_and_layout();
        let sw_storage = match s_w {
            WeightScale::Device(t) => Some(t.contiguous()?),
            WeightScale::Host(_) => None,
        };
        let sw_guard = sw_storage.as_ref().map(|t| t.storage_and_layout());
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
        let wp = in_ptr(&w_bytes, 0, stream, &mut guards)?;
        let (sw_val, sw_ptr) = match (&s_w, &sw_guard) {
            (WeightScale::Host(v), _) => (*v, 0u64),
            (WeightScale::Device(_), Some((st, l))) => {
                let (Storage::Cuda(st), Some((o, _))) = (&**st, l.contiguous_offsets()) else {
                    bail!("bitlinear cuda: implicit_conv needs a CUDA weight scale")
                };
                if st.dtype() != DType::F32 || l.shape().elem_count() != 1 {
                    bail!("bitlinear cuda: implicit_conv needs one F32 weight scale")
                }
                (0.0, in_ptr(st, o, stream, &mut guards)?)
            }
            (WeightScale::Device(_), None) => unreachable!("a device scale has its storage"),
        };
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
    Ok(Some(crate::device::tensor_from(Storage::Cuda(out), (b, n, ho * wo))))
}
