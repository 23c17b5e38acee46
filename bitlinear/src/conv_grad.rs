//! A stride-1 convolution whose backward is made of matrix products.
//!
//! candle 0.11 differentiates `conv2d` with `conv_transpose2d` for the input gradient (a direct
//! loop per output element on CUDA, no GEMM) and with a `conv2d` that treats the batch as
//! channels for the weight gradient. For stride 1 both have GEMM forms, used here:
//! - `dL/dx = conv2d(g, W')` with `W'[c][o] = W[o][c]` flipped in both spatial dims and padding
//!   `k - 1 - p` (the transposed convolution of stride 1 is a convolution);
//! - `dL/dW[:, :, ky, kx] = G · X_{ky,kx}ᵀ` for each kernel offset, where `G` is `(c_out, B·Ho·Wo)`
//!   and `X_{ky,kx}` the padded input shifted by the offset, `(c_in, B·Ho·Wo)`.
//!
//! The forward is candle's `conv2d` on the detached operands; a [`CustomOp2`] hands that output
//! on and carries the backward above.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x (B, C, H, W) ⋆ w (O, C, kh, kw)` with zero padding `padding` and stride `stride`; for
/// stride 1, a square kernel and `padding < k`, with the matrix-product backward of the module
/// docs, otherwise candle's.
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    // The input-gradient convolution pads `k - 1 - p` on both axes: square kernels only.
    if stride != 1 || kh != kw || padding >= kh || !(x.track_op() || w.track_op()) {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let y = x.detach().conv2d(&w.detach(), padding, 1, 1, 1)?;
    x.apply_op2(w, ConvWithGemmGrad { y, padding })
}

/// The op: its forward returns the precomputed output `y`, its backward the two products.
struct ConvWithGemmGrad {
    y: Tensor,
    padding: usize,
}

impl ConvWithGemmGrad {
    fn output<S: BackendStorage>(&self, pick: impl Fn(&candle_core::Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let y = self.y.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        match pick(&storage) {
            Some(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            None => candle_core::bail!("conv-with-gemm-grad: output on another device"),
        }
    }
}

impl CustomOp2 for ConvWithGemmGrad {
    fn name(&self) -> &'static str {
        "bitlinear-conv-with-gemm-grad"
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
        let (b, c, _, _) = x.dims4()?;
        let (o, _, kh, kw) = w.dims4()?;
        let (_, _, ho, wo) = g.dims4()?;
        let p = self.padding;
        // dL/dx: a convolution of g with the flipped, transposed kernel.
        let dev = w.device();
        let rev = |k: usize| Tensor::new((0..k as u32).rev().collect::<Vec<u32>>(), dev);
        let flipped = w.index_select(&rev(kh)?, 2)?.index_select(&rev(kw)?, 3)?;
        let w_t = flipped.transpose(0, 1)?.contiguous()?;
        let dx = g.conv2d(&w_t, kh - 1 - p, 1, 1, 1)?;
        // dL/dW: one (O, N) x (N, C) product per kernel offset, N = B·Ho·Wo.
        let n = b * ho * wo;
        let g_t = g.transpose(0, 1)?.contiguous()?.reshape((o, n))?;
        let x_pad = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let mut taps = Vec::with_capacity(kh * kw);
        for ky in 0..kh {
            for kx in 0..kw {
                let shifted = x_pad.narrow(2, ky, ho)?.narrow(3, kx, wo)?;
                let cols = shifted.transpose(0, 1)?.contiguous()?.reshape((c, n))?;
                taps.push(g_t.matmul(&cols.t()?)?);
            }
        }
        let dw = Tensor::stack(&taps, 2)?.reshape((o, c, kh, kw))?;
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradients equal candle's own `conv2d` backward (up to summation order) for every padding
    /// the op takes and odd sizes.
    #[test]
    fn gradients_match_candles_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (b, c, h, w, o, k, p) in [
            (2, 3, 7, 5, 4, 3, 1),
            (1, 2, 6, 6, 3, 3, 0),
            (3, 4, 5, 9, 2, 1, 0),
            (2, 2, 8, 7, 3, 5, 2),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
            let k_ = Var::from_tensor(&Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)?)?;
            let y = conv2d(x.as_tensor(), k_.as_tensor(), p, 1)?;
            let want_y = x.as_tensor().conv2d(k_.as_tensor(), p, 1, 1, 1)?;
            let diff = (&y - &want_y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "forward");
            let g = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
            let ours = (&y * &g)?.sum_all()?.backward()?;
            let theirs = (&want_y * &g)?.sum_all()?.backward()?;
            for v in [&x, &k_] {
                let a = ours.get(v.as_tensor()).expect("gradient");
                let t = theirs.get(v.as_tensor()).expect("gradient");
                let scale = t.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                let d = (a - t)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    d <= 1e-5 * scale * (c * k * k * b * h * w) as f32,
                    "{d} (scale {scale})"
                );
            }
        }
        Ok(())
    }
}
