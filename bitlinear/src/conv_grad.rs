//! The backward of [`BitConv2d`](crate::BitConv2d)'s stride-1 convolutions, made of matrix
//! products, and [`float_conv2d`]: a float convolution with the same backward (`x~ = x`,
//! `W~ = W`).
//!
//! The forward value `y = (conv(x_q, W_q) · s_x) · s_w` is computed on the codes alone (no
//! gradient); the op here hands it on and carries the straight-through gradients, those of
//! `y ≈ conv(x~, W~)` with `x~ = x_q · s_x` (per image) and `W~ = W_q · s_w`:
//! - `dL/dx = conv2d(g, W~')` with `W~'[c][o] = W~[o][c]` flipped in both spatial dims and
//!   padding `k - 1 - p` (the transposed convolution of stride 1 is a convolution);
//! - `dL/dW = G · Xᵀ` with `G` the output gradient channels first, `(c_out, B·Ho·Wo)`, and `X`
//!   the im2col of `x~` with a row per `(c_in, ky, kx)` over every image's pixels,
//!   `(c_in·k·k, B·Ho·Wo)`: one product whose result is `dL/dW (c_out, c_in, k, k)` as it stands.
//!
//! On the CPU both products are [`crate::conv_grad_cpu`]'s (im2col tiles of a few images a task);
//! the functions below are the other devices' path: on CUDA our bf16 implicit GEMM where it
//! takes the shape, else our im2col kernels and cuBLAS (see `input_grad` and `weight_grad`). With
//! [`BitConv2dConfig::bf16_grad_products`](crate::BitConv2dConfig::bf16_grad_products) (f32
//! training on CUDA) their operands are bf16: `x~`, `W~` and `g` rounded to nearest even, the
//! sums accumulated in f32 and written in f32, then returned in the variables' dtype.
//!
//! candle 0.11 differentiates `conv2d` with `conv_transpose2d` for the input gradient (a direct
//! loop per output element on CUDA, no GEMM); and as one op, the straight-through steps cost no
//! element-wise passes over the activations of their own.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::output_grad::OutputGrad;
use crate::{fake_quantize_activations, ActScaling};

/// Whether [`quantized_conv2d`] takes a convolution of this stride, kernel and padding: the
/// input-gradient convolution pads `k - 1 - p` on both axes, so square kernels, `p < k`,
/// stride 1.
pub(crate) fn has_gemm_grad(stride: usize, kh: usize, kw: usize, padding: usize) -> bool {
    stride == 1 && kh == kw && padding < kh
}

/// `y`, the forward value of the quantized convolution of `x (B, C, H, W)` with the float
/// weight `w (O, C, k, k)`, tied to `x` and `w` with the straight-through gradients of the module
/// docs; `w_tilde` is `W~ (O, C, k, k)`. For [`has_gemm_grad`] convolutions. `bf16_products`:
/// the backward's products from bf16 operands where the output gradient is f32 on CUDA.
/// `x_codes`: the forward's int8 codes of `x` (U8 `(B, C·H·W)`) and their per-image scales, where
/// it made them; the CUDA backward then lays `x~` out from them instead of quantizing `x` again.
/// `pool`: the op returns [`crate::max_pool2x2`] of `y` (whose fused kernels must take it) and
/// differentiates through that pooling too, so the unpooled output is no graph node of its own.
pub(crate) fn quantized_conv2d(
    x: &Tensor,
    w: &Tensor,
    (y, w_tilde): (Tensor, Tensor),
    x_codes: Option<(Tensor, Tensor)>,
    (padding, pool): (usize, bool),
    bf16_products: bool,
) -> Result<Tensor> {
    let (y, unpooled) = match pool {
        true => (crate::pool::pooled_values(&y)?, Some(y)),
        false => (y, None),
    };
    let op = ConvGrad {
        y,
        unpooled,
        w_tilde,
        padding,
        bf16_products,
        quantized: true,
        x_codes,
    };
    x.apply_op2(w, op)
}

/// The float convolution `conv2d(x, w)` of `x (B, C, H, W)` with `w (O, C, k, k)`, stride 1,
/// zero padding `padding` on every side, whose gradients are the matrix products of the module
/// docs with `x~ = x` and `W~ = w`. candle 0.11 differentiates its own `conv2d` with
/// `conv_transpose2d` for the input gradient, a direct loop per input value on CUDA.
///
/// The value is candle's `conv2d`. A non-square kernel or `padding >= k` takes candle's
/// `conv2d` whole. A kernel larger than the padded input is an error.
///
/// ```
/// use bitlinear::float_conv2d;
/// use candle_core::{Device, Tensor, Var};
/// let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 8, 8), &Device::Cpu)?)?;
/// let w = Var::from_tensor(&Tensor::randn(0f32, 0.2, (4, 3, 3, 3), &Device::Cpu)?)?;
/// let y = float_conv2d(x.as_tensor(), w.as_tensor(), 1)?;
/// assert_eq!(y.dims(), &[2, 4, 8, 8]);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(&w).unwrap().dims(), &[4, 3, 3, 3]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn float_conv2d(x: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let (_, _, h, wd) = x.dims4()?;
    let tracked = x.track_op() || w.track_op();
    if kh > h + 2 * padding || kw > wd + 2 * padding {
        candle_core::bail!("float_conv2d: a {kh}x{kw} kernel over {h}x{wd} images padded by {padding} has no output")
    }
    if !tracked || !has_gemm_grad(1, kh, kw, padding) {
        return x.conv2d(w, padding, 1, 1, 1);
    }
    let y = x.detach().conv2d(&w.detach(), padding, 1, 1, 1)?;
    let op = ConvGrad {
        y,
        unpooled: None,
        w_tilde: w.detach(),
        padding,
        bf16_products: false,
        quantized: false,
        x_codes: None,
    };
    x.apply_op2(w, op)
}

/// The op: its forward returns the precomputed output `y`, its backward the two products, with
/// `x~` the per-image fake quantization of `x` where `quantized`, else `x` itself.
struct ConvGrad {
    y: Tensor,
    /// Where the op pools: the convolution's output before the 2x2 max pooling that gave `y`
    /// (the backward routes the gradient through the pooling first).
    unpooled: Option<Tensor>,
    w_tilde: Tensor,
    padding: usize,
    bf16_products: bool,
    quantized: bool,
    /// The forward's codes of `x` and their scales (see [`quantized_conv2d`]).
    x_codes: Option<(Tensor, Tensor)>,
}

impl ConvGrad {
    fn output<S: BackendStorage>(&self, pick: impl Fn(&candle_core::Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let y = self.y.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        match pick(&storage) {
            Some(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            None => candle_core::bail!("{}: output on another device", self.name()),
        }
    }
}

impl CustomOp2 for ConvGrad {
    fn name(&self) -> &'static str {
        match self.quantized {
            true => "bitlinear-quantized-conv",
            false => "bitlinear-float-conv",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output(|s| match s {
            candle_core::Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output(|s| match s {
            candle_core::Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = &OutputGrad::new(g, self.unpooled.as_ref());
        if x.device().is_cpu() {
            return cpu_grads(x, w, &self.w_tilde, g, (self.padding, self.quantized));
        }
        let (b, c, h, wd) = x.dims4()?;
        // x~ from the forward's codes where it kept them (CUDA, f32 gradients: the weight
        // gradient's im2col reads them), else again from x (one pass).
        let x_codes = match (
            self.quantized,
            &self.x_codes,
            g.device().is_cuda() && g.dtype() == DType::F32,
        ) {
            (true, Some((codes, scales)), true) => Some((codes, scales)),
            _ => None,
        };
        let x_tilde = match (self.quantized, x_codes) {
            (true, None) => {
                fake_quantize_activations(&x.reshape((b, c * h * wd))?, ActScaling::PerToken)?.reshape((b, c, h, wd))?
            }
            _ => x.clone(),
        }
        .to_dtype(g.dtype())?;
        // The products' operand dtype: bf16 only from f32 operands on CUDA (our kernels round
        // the f32 gradient and x~ while they lay them out).
        let products = match self.bf16_products && g.device().is_cuda() && g.dtype() == DType::F32 {
            true => DType::BF16,
            false => g.dtype(),
        };
        let (dx, dw) = gemm_grads(
            (&x_tilde, x_codes),
            &self.w_tilde,
            g,
            self.padding,
            (x.track_op(), products),
        )?;
        let dx = dx.map(|dx| dx.to_dtype(x.dtype())).transpose()?;
        Ok((dx, Some(dw.to_dtype(w.dtype())?)))
    }
}

/// The CPU backward ([`crate::conv_grad_cpu`]) with padding `p`, `x` fake-quantized where
/// `quantized`: `dL/dx` only where `x` is tracked (not for the images under a first layer).
fn cpu_grads(
    x: &Tensor,
    w: &Tensor,
    w_tilde: &Tensor,
    g: &OutputGrad,
    (p, quantized): (usize, bool),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, _, k, _) = w_tilde.dims4()?;
    let shapes = crate::conv_grad_cpu::Shapes {
        b,
        c,
        h,
        w: wd,
        o,
        k,
        p,
    };
    let f32_values = |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
    let (dx, dw) = crate::conv_grad_cpu::grads(
        &f32_values(x)?,
        &f32_values(w_tilde)?,
        &f32_values(g.nchw()?)?,
        shapes,
        (x.track_op(), quantized),
    );
    let dev = x.device();
    let dx = dx
        .map(|v| Tensor::from_vec(v, x.dims(), dev)?.to_dtype(x.dtype()))
        .transpose()?;
    let dw = Tensor::from_vec(dw, w.dims(), dev)?.to_dtype(w.dtype())?;
    Ok((dx, Some(dw)))
}

/// The gradients of `conv2d(x, w)` (stride 1, padding `p`, square kernel) for the output gradient
/// `g`, as the products of the module docs: `(dL/dx, dL/dw)`, `dL/dx` only `with_dx` (a first
/// layer's images take none, and theirs would be the largest product of a small network). The
/// products take operands of `products`' dtype (`w`, `x` and `g` are converted as they are laid
/// out; bf16 products return f32, the caller casts to the variables' dtypes). With `x_codes`
/// (CUDA) `x` only gives the shape, and the weight gradient reads `x` as the fake quantization of
/// those codes.
fn gemm_grads(
    (x, x_codes): (&Tensor, Option<(&Tensor, &Tensor)>),
    w: &Tensor,
    g: &OutputGrad,
    p: usize,
    (with_dx, products): (bool, DType),
) -> Result<(Option<Tensor>, Tensor)> {
    let (_, _, kh, kw) = w.dims4()?;
    // With bf16 products on CUDA both products read `g` channels last in bf16, one copy (its
    // presence is what tells them their operands are bf16).
    #[cfg(feature = "cuda")]
    let g_nhwc = match g.device().is_cuda() && g.dtype() == DType::F32 && products == DType::BF16 {
        true => Some(g.channels_last_bf16()?),
        false => None,
    };
    #[cfg(not(feature = "cuda"))]
    let g_nhwc: Option<Tensor> = None;
    let g_nhwc = g_nhwc.as_ref();
    let dx = match with_dx {
        true => Some(input_grad((g, g_nhwc), w, p, x.dims4()?, products)?),
        false => None,
    };
    Ok((dx, weight_grad((x, x_codes), (g, g_nhwc), (kh, kw), p)?))
}

/// `dL/dx` of the stride-1 convolution with weight `w` (`(O, C, kh, kw)`, any float dtype) and
/// padding `p`: `conv2d(g, w_t)`, `w_t` the flipped, transposed kernel, with padding
/// `kh - 1 - p`, output `x_dims`. On CUDA with bf16 `products` as the bf16 implicit GEMM where
/// its plan takes the shape (`crate::plan::bf16_conv_plan`: `g_nhwc`, `g` channels last in bf16,
/// gathered on the way into shared memory; the kernel's weight operand made from `w` in one
/// pass), else as the transposed im2col of `g` (our kernel) times `w_t` per image, which lands in
/// NCHW as it stands (candle's `conv2d` gathers its columns with a slower kernel and reorders its
/// output), in f32 from bf16 `products`; elsewhere candle's.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn input_grad(
    (g, g_nhwc): (&OutputGrad, Option<&Tensor>),
    w: &Tensor,
    p: usize,
    x_dims: (usize, usize, usize, usize),
    products: DType,
) -> Result<Tensor> {
    let (o, _, kh, kw) = w.dims4()?;
    let pad = kh - 1 - p;
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() && g.dtype() == DType::F32 {
        let (b, c, h, wd) = x_dims;
        if let Some(g_nhwc) = g_nhwc {
            if let Some(dx) = crate::cuda::implicit_input_grad((g_nhwc, g.dims4()?), w, pad, (h, wd))? {
                return Ok(dx);
            }
        }
        let w_t = flipped_transposed(w)?.to_dtype(products)?;
        use crate::cuda::{im2col_t, ColsLayout, ColsSource};
        let cols = im2col_t(
            ColsSource::Values(g.nchw()?),
            (kh, kw),
            pad,
            (h, wd),
            products,
            ColsLayout::PerImage,
        )?;
        let w_mat = w_t.reshape((c, o * kh * kw))?;
        let dx = match products {
            DType::BF16 => crate::cuda::batched_matmul_f32(&w_mat, &cols)?,
            _ => w_mat.broadcast_as((b, c, o * kh * kw))?.matmul(&cols)?,
        };
        return dx.reshape((b, c, h, wd));
    }
    let w_t = flipped_transposed(w)?.to_dtype(products)?;
    g.nchw()?.conv2d(&w_t, pad, 1, 1, 1)
}

/// `w (O, C, kh, kw)` flipped in both spatial axes and transposed: `(C, O, kh, kw)`, contiguous,
/// the kernel whose stride-1 convolution with the output gradient is the input gradient.
fn flipped_transposed(w: &Tensor) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let rev = |k: usize| Tensor::new((0..k as u32).rev().collect::<Vec<u32>>(), w.device());
    let flipped = w.index_select(&rev(kh)?, 2)?.index_select(&rev(kw)?, 3)?;
    flipped.transpose(0, 1)?.contiguous()
}

/// `dL/dW (O, C, kh, kw)` of a stride-1 convolution with padding `p`.
///
/// On CUDA the operands are bf16 where `g_nhwc` is given (`g` channels last in bf16, `(B·Ho·Wo,
/// O)`, which the input gradient reads too), else f32. With bf16 operands, the bf16 implicit GEMM
/// where its plan takes the shape (a convolution over the batch, `crate::cuda`'s `conv_bf16`: no
/// im2col copy); else one product (module docs): `X` comes from our transposed-im2col kernel,
/// `G` is `g_nhwc` (cuBLAS takes it transposed) or in f32 the 1x1 case of the transposed im2col
/// (a channels-first copy of `g`); bf16 operands multiply with f32 results.
/// The `(O, C·kh·kw)` product is the gradient's layout, and every operand is contiguous, which
/// cuBLAS's fast kernels need (the products per kernel offset below read windows at odd
/// offsets, for which cuBLAS falls back to older, slower kernels).
///
/// Elsewhere (the CPU takes `crate::conv_grad_cpu`; this serves the tests) one product per
/// kernel offset without a shifted copy of `x` for each: `x` is laid out once channels first in
/// its zero-padded frame, `(C, B, hp, wp)` flattened (plus a tail of zeros), and `g` in the same
/// frame, `(O, B·hp·wp)` with output pixel `(y, x)` at `y·wp + x`. Output pixel `t` of offset
/// `(ky, kx)` reads padded input `t + ky·wp + kx`, so every offset's input is the contiguous
/// window of `C·B·hp·wp` values from `ky·wp + kx`, a matrix `(C, B·hp·wp)` as it stands. Frame
/// positions outside the output hold `g = 0`, so what their window reads (the next channel's
/// start, the tail) adds 0; the real pixels' reads stay inside their own image and channel.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn weight_grad(
    (x, x_codes): (&Tensor, Option<(&Tensor, &Tensor)>),
    (g, g_nhwc): (&OutputGrad, Option<&Tensor>),
    (kh, kw): (usize, usize),
    p: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (_, o, ho, wo) = g.dims4()?;
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() {
        use crate::cuda::{im2col_t, ColsLayout, ColsSource};
        let x = x.to_dtype(DType::F32)?;
        let x_source = match x_codes {
            Some((codes, scales)) => ColsSource::Codes {
                codes,
                scales,
                dims: (b, c, h, w),
            },
            None => ColsSource::Values(&x),
        };
        let dw = match g_nhwc {
            // bf16 operands (`gemm_grads` lays `g` out for them)
            Some(g_nhwc) => {
                if let Some(dw) = crate::cuda::implicit_weight_grad(x_source, g, (kh, kw), p)? {
                    return Ok(dw);
                }
                let xs = im2col_t(x_source, (kh, kw), p, (ho, wo), DType::BF16, ColsLayout::Rows)?;
                crate::cuda::matmul_tt_f32(&g_nhwc.reshape((b * ho * wo, o))?, &xs)?
            }
            None => {
                let xs = im2col_t(x_source, (kh, kw), p, (ho, wo), DType::F32, ColsLayout::Rows)?;
                let g = g.nchw()?.to_dtype(DType::F32)?;
                let gs = im2col_t(
                    ColsSource::Values(&g),
                    (1, 1),
                    0,
                    (ho, wo),
                    DType::F32,
                    ColsLayout::Rows,
                )?;
                gs.matmul(&xs.t()?)?
            }
        };
        return dw.reshape((o, c, kh, kw));
    }
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let frame = b * hp * wp;
    let tail = (kh - 1) * wp + kw - 1;
    let xs = padded_channels_first(x, (hp, wp), (p, p), tail)?;
    let gs = padded_channels_first(g.nchw()?, (hp, wp), (0, 0), 0)?.reshape((o, frame))?;
    debug_assert!(ho <= hp && wo <= wp);
    let mut taps = Vec::with_capacity(kh * kw);
    for ky in 0..kh {
        for kx in 0..kw {
            let window = xs.narrow(0, ky * wp + kx, c * frame)?.reshape((c, frame))?;
            taps.push(gs.matmul(&window.t()?)?);
        }
    }
    Tensor::stack(&taps, 2)?.reshape((o, c, kh, kw))
}

/// `t (B, C, H, W)` channels first in zero frames of `hp x wp` (the image at `(top, left)`),
/// flattened, then `tail` zeros: F32 `(C·B·hp·wp + tail)`.
fn padded_channels_first(
    t: &Tensor,
    (hp, wp): (usize, usize),
    (top, left): (usize, usize),
    tail: usize,
) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32)?;
    let (_, _, h, w) = t.dims4()?;
    let framed = t
        .transpose(0, 1)?
        .pad_with_zeros(2, top, hp - h - top)?
        .pad_with_zeros(3, left, wp - w - left)?
        .flatten_all()?;
    let zeros = Tensor::zeros(tail, DType::F32, t.device())?;
    Tensor::cat(&[&framed, &zeros], 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `ours` within `rel` times the largest magnitude of `theirs` (at least 1) of `theirs`.
    fn assert_within(ours: &Tensor, theirs: &Tensor, rel: f32) -> Result<()> {
        let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        let d = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d <= rel * scale, "{d} (scale {scale})");
        Ok(())
    }

    /// The products equal candle's own `conv2d` backward (up to summation order) for every
    /// padding they take and odd sizes.
    #[test]
    fn gradients_match_candles_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (b, c, h, w, o, k, p) in [
            (2, 3, 7, 5, 4, 3, 1),
            (1, 2, 6, 6, 3, 3, 0),
            (3, 4, 5, 9, 2, 1, 0),
            (2, 2, 8, 7, 3, 5, 2),
        ] {
            assert!(has_gemm_grad(1, k, k, p));
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
            let k_ = Var::from_tensor(&Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)?)?;
            let y = x.as_tensor().conv2d(k_.as_tensor(), p, 1, 1, 1)?;
            let g = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
            let og = OutputGrad::new(&g, None);
            let (dx, dw) = gemm_grads((x.as_tensor(), None), k_.as_tensor(), &og, p, (true, DType::F32))?;
            let theirs = (&y * &g)?.sum_all()?.backward()?;
            let (no_dx, dw_alone) = gemm_grads((x.as_tensor(), None), k_.as_tensor(), &og, p, (false, DType::F32))?;
            assert!(no_dx.is_none());
            assert_eq!(
                dw_alone.flatten_all()?.to_vec1::<f32>()?,
                dw.flatten_all()?.to_vec1::<f32>()?
            );
            for (v, ours) in [(&x, dx.expect("dx")), (&k_, dw)] {
                let t = theirs.get(v.as_tensor()).expect("gradient");
                assert_within(&ours, t, 1e-5 * (c * k * k * b * h * w) as f32)?;
            }
        }
        assert!(!has_gemm_grad(2, 3, 3, 1) && !has_gemm_grad(1, 3, 1, 0) && !has_gemm_grad(1, 3, 3, 3));
        Ok(())
    }

    /// `float_conv2d` gives candle's `conv2d` value exactly and its gradients up to summation
    /// order, for images with and without a gradient, and falls back to candle's where the
    /// products do not apply (`padding >= k`).
    #[test]
    fn float_conv2d_matches_candles_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (b, c, h, w, o, k, p) in [
            (2, 3, 7, 5, 4, 3, 1),
            (3, 2, 6, 6, 5, 3, 0),
            (2, 4, 5, 9, 2, 1, 0),
            (1, 2, 8, 7, 3, 5, 2),
            (2, 3, 5, 5, 2, 1, 1),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
            let k_ = Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, c, k, k), &dev)?)?;
            let theirs_y = x.as_tensor().conv2d(k_.as_tensor(), p, 1, 1, 1)?;
            let ours_y = float_conv2d(x.as_tensor(), k_.as_tensor(), p)?;
            assert_eq!(
                ours_y.flatten_all()?.to_vec1::<f32>()?,
                theirs_y.flatten_all()?.to_vec1::<f32>()?
            );
            let g = Tensor::randn(0f32, 1.0, theirs_y.dims(), &dev)?;
            let theirs = (&theirs_y * &g)?.sum_all()?.backward()?;
            let ours = (&ours_y * &g)?.sum_all()?.backward()?;
            for (v, terms) in [(&x, o * k * k), (&k_, b * h * w)] {
                let t = theirs.get(v.as_tensor()).expect("their gradient");
                let u = ours.get(v.as_tensor()).expect("our gradient");
                assert_within(u, t, 1e-6 * terms as f32)?;
            }
            // images without a gradient (a first layer's): the weight's alone, the same (candle's
            // own conv2d, the fallback, computes an input gradient either way)
            let plain = x.as_tensor().detach();
            let alone = (float_conv2d(&plain, k_.as_tensor(), p)? * &g)?.sum_all()?.backward()?;
            assert_eq!(alone.get(&plain).is_none(), has_gemm_grad(1, k, k, p));
            assert_eq!(
                alone.get(k_.as_tensor()).expect("dw").flatten_all()?.to_vec1::<f32>()?,
                ours.get(k_.as_tensor()).expect("dw").flatten_all()?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }
}
