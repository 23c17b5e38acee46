//! Batch normalization followed by GELU as one op on the CPU and (f32, with the `cuda` feature)
//! on CUDA: [`BatchNorm2d::forward_gelu_t`](crate::speedrun::BatchNorm2d::forward_gelu_t)'s path
//! there. The CUDA kernels (`kernels/norm_gelu.cu`, launched by `norm_gelu_cuda.rs`) follow the
//! same passes, a channel's sums split over blocks of images and added in a fixed order.
//!
//! As tensor ops the pair costs a dozen passes over the feature map and four channel reductions
//! over non-contiguous axes, forward and backward; here the forward is two passes for the batch
//! statistics and one for the output, the backward one for the channel sums and one for the
//! input gradient. Every pass runs image by image on the thread pool; channel sums are per-image
//! partials added in image order, so results do not depend on the thread count.
//!
//! With `x^ = (x - mean_c) · r_c`, `r_c = 1 / sqrt(var_c + eps)`, `z = x^ + bias_c`,
//! `y = gelu(z) = z · (1 + erf(z / sqrt 2)) / 2` (`libm::erff`, as candle's `gelu_erf`):
//! - `dz = dy · gelu'(z)`, `gelu'(z) = (1 + erf(z / sqrt 2)) / 2 + z · exp(-z² / 2) / sqrt(2π)`;
//! - `dL/dbias_c = Σ dz`;
//! - with batch statistics `dL/dx = r_c · (dz - mean(dz) - x^ · mean(dz · x^))` (the statistics'
//!   own gradients included), with fixed statistics `dL/dx = r_c · dz`.
//!
//! Statistics and the backward's channel sums accumulate in f64; the rest is f32 in the order of
//! the tensor-op path (`(x - mean) · r + bias`, two roundings).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Per-channel mean and biased variance of `x (b, c, hw)` (contiguous f32), two passes.
pub(crate) fn channel_stats(x: &[f32], c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    let n = (x.len() / c.max(1)) as f64;
    let sums = channel_sums(x, x, c, hw, |_, v, _| (v as f64, 0.0));
    let mean: Vec<f32> = sums.iter().map(|s| (s.0 / n) as f32).collect();
    let sq = channel_sums(x, x, c, hw, |ch, v, _| {
        let d = (v - mean[ch]) as f64;
        (d * d, 0.0)
    });
    (mean, sq.iter().map(|s| (s.0 / n) as f32).collect())
}

/// The op over `(x (B, C, H, W), bias (C))`, both F32, with the statistics it normalizes by
/// (F32 `(C)` tensors on the input's device).
pub(crate) struct NormGelu {
    /// Per-channel mean.
    pub mean: Tensor,
    /// Per-channel `1 / sqrt(var + eps)`.
    pub inv_std: Tensor,
    /// Whether the statistics are the batch's own (their gradients then reach `x`).
    pub batch_stats: bool,
}

/// `gelu(x + bias_c)` over `x (B, C, H, W)` as the op with fixed statistics mean 0 and inverse
/// deviation 1 (`(x - 0) · 1 + bias` is exactly `x + bias`): the backward is `dL/dx = dz`,
/// `dL/dbias = Σ dz`. One pass each way, where candle's broadcast add and GELU take a dozen
/// element-wise passes backward and a channel sum over non-contiguous axes.
pub(crate) fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (c, dev) = (bias.dim(0)?, x.device());
    let op = NormGelu {
        mean: Tensor::zeros(c, DType::F32, dev)?,
        inv_std: Tensor::ones(c, DType::F32, dev)?,
        batch_stats: false,
    };
    x.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op2(&bias.to_dtype(DType::F32)?, op)?
        .to_dtype(x.dtype())
}

/// The statistics on the host, for the CPU passes.
struct HostStats {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl HostStats {
    fn of(op: &NormGelu) -> Result<Self> {
        Ok(Self {
            mean: op.mean.to_vec1()?,
            inv_std: op.inv_std.to_vec1()?,
        })
    }

    /// `x^` of channel `ch` at `v`.
    fn normalized(&self, ch: usize, v: f32) -> f32 {
        (v - self.mean[ch]) * self.inv_std[ch]
    }
}

fn gelu(z: f32) -> f32 {
    (libm::erff(z * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * z
}

fn gelu_grad(z: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    (libm::erff(z * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 + z * (-0.5 * z * z).exp() * INV_SQRT_2PI
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("batch norm + GELU: expected contiguous F32 values"),
    }
}

impl CustomOp2 for NormGelu {
    fn name(&self) -> &'static str {
        "batch-norm-gelu"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, bias) = (f32_slice(xs, xl)?, f32_slice(bs, bl)?);
        let (_, c, h, w) = xl.shape().dims4()?;
        let stats = HostStats::of(self)?;
        if bias.len() != c || stats.mean.len() != c || stats.inv_std.len() != c {
            candle_core::bail!("batch norm + GELU: {c} channels, {} bias values", bias.len())
        }
        let hw = (h * w).max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c * hw).zip(x.par_chunks(c * hw)).for_each(|(yi, xi)| {
            for (ch, (yp, xp)) in yi.chunks_mut(hw).zip(xi.chunks(hw)).enumerate() {
                for (o, &v) in yp.iter_mut().zip(xp) {
                    *o = gelu(stats.normalized(ch, v) + bias[ch]);
                }
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = super::norm_gelu_cuda::forward(xs, xl, bs, bl, &self.mean, &self.inv_std)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, bias: &Tensor, _: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let dy = dy.to_dtype(DType::F32)?.contiguous()?;
            let (dx, dbias) = super::norm_gelu_cuda::backward(
                &x.contiguous()?,
                &bias.contiguous()?,
                &dy,
                &self.mean,
                &self.inv_std,
                self.batch_stats,
            )?;
            return Ok((Some(dx), Some(dbias)));
        }
        let stats = HostStats::of(self)?;
        let (b, c, h, w) = x.dims4()?;
        let hw = (h * w).max(1);
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let bv: Vec<f32> = bias.to_vec1()?;
        let dyv: Vec<f32> = dy.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        // dz, then its channel sums Σ dz and Σ dz · x^.
        let mut dz = vec![0f32; xv.len()];
        dz.par_chunks_mut(c * hw)
            .zip(xv.par_chunks(c * hw).zip(dyv.par_chunks(c * hw)))
            .for_each(|(di, (xi, gi))| {
                for (ch, (dp, (xp, gp))) in di.chunks_mut(hw).zip(xi.chunks(hw).zip(gi.chunks(hw))).enumerate() {
                    for (d, (&v, &g)) in dp.iter_mut().zip(xp.iter().zip(gp)) {
                        *d = g * gelu_grad(stats.normalized(ch, v) + bv[ch]);
                    }
                }
            });
        let sums = channel_sums(&dz, &xv, c, hw, |ch, d, v| {
            (d as f64, (d * stats.normalized(ch, v)) as f64)
        });
        let n = (b * hw) as f64;
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(c * hw)
            .zip(dz.par_chunks(c * hw).zip(xv.par_chunks(c * hw)))
            .for_each(|(oi, (di, xi))| {
                for (ch, (op, (dp, xp))) in oi.chunks_mut(hw).zip(di.chunks(hw).zip(xi.chunks(hw))).enumerate() {
                    let r = stats.inv_std[ch];
                    let (m1, m2) = ((sums[ch].0 / n) as f32, (sums[ch].1 / n) as f32);
                    for (o, (&d, &v)) in op.iter_mut().zip(dp.iter().zip(xp)) {
                        *o = match self.batch_stats {
                            true => r * (d - m1 - stats.normalized(ch, v) * m2),
                            false => r * d,
                        };
                    }
                }
            });
        let dev = x.device();
        let dx = Tensor::from_vec(dx, (b, c, h, w), dev)?;
        let dbias = Tensor::from_vec(sums.iter().map(|s| s.0 as f32).collect::<Vec<_>>(), c, dev)?;
        Ok((Some(dx), Some(dbias)))
    }
}

/// Two sums `Σ f(channel, a, b)` per channel over every image of two maps `(b, c, hw)` of the
/// same shape: per-image partials, added in image order.
fn channel_sums(
    a: &[f32],
    b: &[f32],
    c: usize,
    hw: usize,
    f: impl Fn(usize, f32, f32) -> (f64, f64) + Sync,
) -> Vec<(f64, f64)> {
    let image = (c * hw).max(1);
    let partials: Vec<Vec<(f64, f64)>> = a
        .par_chunks(image)
        .zip(b.par_chunks(image))
        .map(|(ai, bi)| {
            ai.chunks(hw.max(1))
                .zip(bi.chunks(hw.max(1)))
                .enumerate()
                .map(|(ch, (ap, bp))| {
                    ap.iter().zip(bp).fold((0.0, 0.0), |acc, (&u, &v)| {
                        let (s, t) = f(ch, u, v);
                        (acc.0 + s, acc.1 + t)
                    })
                })
                .collect()
        })
        .collect();
    let mut total = vec![(0.0, 0.0); c];
    for part in &partials {
        for (t, p) in total.iter_mut().zip(part) {
            *t = (t.0 + p.0, t.1 + p.1);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `bias_gelu` against candle's broadcast add and GELU: values and both gradients.
    #[test]
    fn bias_gelu_matches_the_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.5, (3, 4, 5, 7), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.5, 4, &dev)?)?;
        let g = Tensor::randn(0f32, 1.0, (3, 4, 5, 7), &dev)?;
        let fused = bias_gelu(x.as_tensor(), bias.as_tensor())?;
        let plain = x.broadcast_add(&bias.reshape((1, 4, 1, 1))?)?.gelu_erf()?;
        let close = |a: &Tensor, b: &Tensor, tol: f32| -> Result<()> {
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let s = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            assert!(d <= tol * s, "max difference {d} (scale {s})");
            Ok(())
        };
        close(&fused, &plain, 1e-6)?;
        let gf = (&fused * &g)?.sum_all()?.backward()?;
        let gp = (&plain * &g)?.sum_all()?.backward()?;
        for v in [&x, &bias] {
            close(
                gf.get(v).expect("fused gradient"),
                gp.get(v).expect("plain gradient"),
                1e-5,
            )?;
        }
        Ok(())
    }
}
