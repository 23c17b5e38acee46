//! Batch normalization over NCHW feature maps with a learned shift and no learned gain, the
//! normalization of the speed-run networks.

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// Added to the variance before the square root. Small, as in the speed-run nets (which use
/// 1e-12): the ternary convolutions' outputs have no tiny-variance channels to protect, and a
/// larger epsilon would damp the normalization of a channel whose activations are all small.
pub const BATCH_NORM_EPS: f64 = 1e-12;

/// Weight of the new batch statistics in the running averages:
/// `running = (1 - momentum) · running + momentum · batch` (PyTorch's convention). High, as in
/// the speed-run nets: a short run needs the running statistics to follow the weights closely.
pub const BATCH_NORM_MOMENTUM: f64 = 0.6;

/// `y = (x - mean_c) · (1 / sqrt(var_c + eps)) + bias_c` over the batch and spatial positions of each
/// channel `c` in training, over the running statistics in inference.
///
/// Variables: `bias` (learned, init 0), `running_mean` (0), `running_var` (1). The running
/// statistics are variables too, so that checkpoints carry them, but no gradient reaches them:
/// [`BatchNorm2d::forward_t`] updates them in place when training. The statistics and the
/// normalization are computed in f32 whatever the input dtype; the output has the input's dtype.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    momentum: f64,
}

impl BatchNorm2d {
    /// A layer of `channels` channels under `vb`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(Self {
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            momentum: BATCH_NORM_MOMENTUM,
        })
    }

    /// The weight of a training batch's statistics in the running ones
    /// ([`BATCH_NORM_MOMENTUM`] unless set).
    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// Sets the weight of the next training batches' statistics in the running ones, in
    /// `(0, 1]`: `1 / k` for the `k`-th of a series of batches makes the running statistics
    /// their plain mean.
    pub fn set_momentum(&mut self, momentum: f64) -> Result<()> {
        if !(momentum > 0.0 && momentum <= 1.0) {
            candle_core::bail!("BatchNorm2d: momentum must be in (0, 1], got {momentum}")
        }
        self.momentum = momentum;
        Ok(())
    }

    /// The shift `(C)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The running mean `(C)`.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running (unbiased) variance `(C)`.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// Normalizes `x (B, C, H, W)` with the batch statistics (and updates the running ones) when
    /// `train`, with the running statistics otherwise.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = self.check(x)?;
        let xf = x.to_dtype(DType::F32)?;
        let shape = (1, c, 1, 1);
        // Each full-size pass costs a kernel and its backward: centre once, then one scale and
        // one shift per element (the per-channel reciprocal is C values).
        let (centered, var) = if train {
            let n = b * h * w;
            if n < 2 {
                candle_core::bail!("BatchNorm2d: training needs at least 2 values per channel, got {n}");
            }
            let mean = xf.mean_keepdim((0, 2, 3))?;
            let centered = xf.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
            self.update_running(&mean.detach().flatten_all()?, &var.detach().flatten_all()?, n)?;
            (centered, var)
        } else {
            let mean = self.running_mean.as_tensor().reshape(shape)?;
            (xf.broadcast_sub(&mean)?, self.running_var.as_tensor().reshape(shape)?)
        };
        let bias = self.bias.to_dtype(DType::F32)?.reshape(shape)?;
        let y = centered.broadcast_mul(&inv_std(&var)?)?.broadcast_add(&bias)?;
        y.to_dtype(x.dtype())
    }

    /// `gelu_erf(self.forward_t(x, train))`, as one op on the CPU and, for f32 input with the
    /// `cuda` feature, on CUDA ([`super::norm_gelu`]: a few passes instead of a dozen; the
    /// statistics accumulate in f64 there, so values differ from the tensor ops by float
    /// rounding), as those tensor ops elsewhere.
    pub fn forward_gelu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let fused_cuda = cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32;
        if !x.device().is_cpu() && !fused_cuda {
            return self.forward_t(x, train)?.gelu_erf();
        }
        let (b, _, h, w) = self.check(x)?;
        let xf = x.to_dtype(DType::F32)?.contiguous()?;
        let (mean, var) = if train {
            let n = b * h * w;
            if n < 2 {
                candle_core::bail!("BatchNorm2d: training needs at least 2 values per channel, got {n}");
            }
            #[cfg(feature = "cuda")]
            let on_device = match fused_cuda {
                true => Some(super::norm_gelu_cuda::channel_stats(&xf)?),
                false => None,
            };
            #[cfg(not(feature = "cuda"))]
            let on_device = None;
            let (mean, var) = match on_device {
                Some(stats) => stats,
                None => host_stats(&xf)?,
            };
            self.update_running(&mean, &var, n)?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().clone(),
                self.running_var.as_tensor().clone(),
            )
        };
        let op = super::norm_gelu::NormGelu {
            mean,
            inv_std: inv_std(&var)?,
            batch_stats: train,
        };
        xf.apply_op2(&self.bias.to_dtype(DType::F32)?, op)?.to_dtype(x.dtype())
    }

    /// `running = (1 - momentum) · running + momentum · batch` for the batch's mean and biased
    /// variance `(C)` over `n` values a channel (the variance made unbiased first).
    fn update_running(&self, mean: &Tensor, var: &Tensor, n: usize) -> Result<()> {
        let m = self.momentum;
        let unbiased = (var * (n as f64 / (n - 1) as f64))?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)
    }

    /// The input's dims, its channels checked against the layer's.
    fn check(&self, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.bias.dim(0)? {
            candle_core::bail!(
                "BatchNorm2d: input has {c} channels, the layer has {}",
                self.bias.dim(0)?
            );
        }
        Ok((b, c, h, w))
    }
}

/// [`super::norm_gelu::channel_stats`] of a contiguous F32 CPU tensor `(B, C, H, W)`, as `(C)`
/// tensors.
fn host_stats(xf: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, c, h, w) = xf.dims4()?;
    let (mean, var) = {
        let (storage, layout) = xf.storage_and_layout();
        let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage else {
            candle_core::bail!("BatchNorm2d: internal error, expected contiguous F32 values on the CPU")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("BatchNorm2d: internal error, expected contiguous values")
        };
        super::norm_gelu::channel_stats(&v[start..end], c, h * w)
    };
    Ok((Tensor::new(mean, xf.device())?, Tensor::new(var, xf.device())?))
}

/// `1 / sqrt(var + eps)` in f32.
fn inv_std(var: &Tensor) -> Result<Tensor> {
    (var + BATCH_NORM_EPS)?.sqrt()?.recip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn normalizes_per_channel_and_tracks_statistics() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let bn = BatchNorm2d::new(2, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        // channel 0: 1, 2, 3, 4 (two images, 1x2 each); channel 1: 10, 10, 10, 14
        let x = Tensor::new(&[[[[1f32, 2.0]], [[10.0, 10.0]]], [[[3.0, 4.0]], [[10.0, 14.0]]]], &dev)?;
        let y = bn.forward_t(&x, true)?;
        let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        // channel 0: mean 2.5, biased var 1.25; channel 1: mean 11, var 3
        let s0 = 1.25f64.sqrt();
        let s1 = 3f64.sqrt();
        let want = [
            -1.5 / s0,
            -0.5 / s0,
            -1.0 / s1,
            -1.0 / s1,
            0.5 / s0,
            1.5 / s0,
            -1.0 / s1,
            3.0 / s1,
        ];
        for (g, w) in y.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{y:?} vs {want:?}");
        }
        let m = BATCH_NORM_MOMENTUM as f32;
        let rm: Vec<f32> = bn.running_mean().to_vec1()?;
        let rv: Vec<f32> = bn.running_var().to_vec1()?;
        assert_eq!(rm, vec![m * 2.5, m * 11.0]);
        let want_rv = [(1.0 - m) + m * (1.25 * 4.0 / 3.0), (1.0 - m) + m * 4.0];
        for (g, w) in rv.iter().zip(want_rv) {
            assert!((g - w).abs() < 1e-6, "{rv:?}");
        }
        // The variables in the map are the ones updated.
        let data = vm.data().lock().unwrap();
        assert_eq!(data["running_mean"].as_tensor().to_vec1::<f32>()?, rm);
        drop(data);
        // Inference uses the running statistics.
        let e: Vec<f32> = bn.forward_t(&x, false)?.flatten_all()?.to_vec1()?;
        let want0 = (1.0 - rm[0] as f64) / (rv[0] as f64 + BATCH_NORM_EPS).sqrt();
        // (the layer multiplies by the f32 reciprocal: within a few ulps of the division)
        assert!((e[0] as f64 - want0).abs() < 1e-6);
        assert!(bn.forward_t(&x.narrow(0, 0, 1)?.narrow(3, 0, 1)?, true).is_err());
        Ok(())
    }

    #[test]
    fn momentum_weighs_the_batch_statistics() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let mut bn = BatchNorm2d::new(1, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        assert_eq!(bn.momentum(), BATCH_NORM_MOMENTUM);
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(bn.set_momentum(bad).is_err(), "{bad}");
        }
        assert_eq!(bn.momentum(), BATCH_NORM_MOMENTUM);
        // 1, 2, 3, 4: mean 2.5, unbiased variance 5/3; momentum 1 takes them as they are.
        let x = Tensor::new(&[[[[1f32, 2.0, 3.0, 4.0]]]], &dev)?;
        bn.set_momentum(1.0)?;
        bn.forward_t(&x, true)?;
        assert_eq!(bn.running_mean().to_vec1::<f32>()?, [2.5]);
        assert!((bn.running_var().to_vec1::<f32>()?[0] - 5.0 / 3.0).abs() < 1e-6);
        // Momentum 1/4: (3/4)·running + (1/4)·batch, through the fused op too.
        bn.set_momentum(0.25)?;
        bn.forward_gelu_t(&(x * 2.0)?, true)?;
        assert!((bn.running_mean().to_vec1::<f32>()?[0] - (0.75 * 2.5 + 0.25 * 5.0)).abs() < 1e-6);
        let want = 0.75 * 5.0 / 3.0 + 0.25 * 20.0 / 3.0;
        assert!((bn.running_var().to_vec1::<f32>()?[0] - want).abs() < 1e-5);
        Ok(())
    }

    /// The fused CPU op against the tensor ops it replaces: outputs, running statistics and the
    /// gradients of a random weighted sum, with batch and with running statistics.
    #[test]
    fn fused_gelu_matches_tensor_ops() -> Result<()> {
        fused_gelu_matches_tensor_ops_on(&Device::Cpu)
    }

    /// The CUDA kernels (one value a thread where planes hold 35 or 2 values, four where they
    /// hold 16 or 64) against candle's tensor ops on the GPU; a machine without a GPU skips it
    /// unless `BITLINEAR_REQUIRE_CUDA` is set.
    #[cfg(feature = "cuda")]
    #[test]
    fn fused_gelu_matches_tensor_ops_on_cuda() -> Result<()> {
        match Device::new_cuda(0) {
            Ok(dev) => fused_gelu_matches_tensor_ops_on(&dev),
            Err(_) if std::env::var("BITLINEAR_REQUIRE_CUDA").is_ok_and(|v| !v.is_empty() && v != "0") => {
                panic!("BITLINEAR_REQUIRE_CUDA is set but there is no usable CUDA device")
            }
            Err(_) => {
                eprintln!("SKIPPED fused_gelu_matches_tensor_ops_on_cuda: no CUDA device");
                Ok(())
            }
        }
    }

    fn fused_gelu_matches_tensor_ops_on(dev: &Device) -> Result<()> {
        let dev = dev.clone();
        for (b, c, h, w) in [(3, 4, 5, 7), (2, 1, 1, 2), (1, 3, 4, 4), (9, 16, 8, 8)] {
            let maps: Vec<_> = (0..2).map(|_| VarMap::new()).collect();
            let norms = maps
                .iter()
                .map(|vm| BatchNorm2d::new(c, VarBuilder::from_varmap(vm, DType::F32, &dev)))
                .collect::<Result<Vec<_>>>()?;
            let bias = Tensor::randn(0f32, 1.0, c, &dev)?;
            for vm in &maps {
                vm.data().lock().unwrap()["bias"].set(&bias)?;
            }
            let x = Var::from_tensor(&((Tensor::randn(0f32, 2.0, (b, c, h, w), &dev)? + 0.5)?))?;
            let g = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
            for train in [true, false] {
                let fused = norms[0].forward_gelu_t(x.as_tensor(), train)?;
                let plain = norms[1].forward_t(x.as_tensor(), train)?.gelu_erf()?;
                let close = |a: &Tensor, e: &Tensor, tol: f32| -> Result<()> {
                    let d: f32 = (a - e)?.abs()?.max_all()?.to_scalar()?;
                    let scale: f32 = e.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                    assert!(d <= tol * scale, "({b}, {c}, {h}, {w}) train {train}: differs by {d}");
                    Ok(())
                };
                close(&fused, &plain, 1e-5)?;
                for name in ["running_mean", "running_var"] {
                    let get = |vm: &VarMap| vm.data().lock().unwrap()[name].as_tensor().clone();
                    close(&get(&maps[0]), &get(&maps[1]), 1e-6)?;
                }
                let gf = (fused * &g)?.sum_all()?.backward()?;
                let gp = (plain * &g)?.sum_all()?.backward()?;
                close(gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap(), 1e-4)?;
                let bias_of = |vm: &VarMap| vm.data().lock().unwrap()["bias"].as_tensor().clone();
                close(
                    gf.get(&bias_of(&maps[0])).unwrap(),
                    gp.get(&bias_of(&maps[1])).unwrap(),
                    1e-4,
                )?;
            }
            assert!(norms[0].forward_gelu_t(&x.as_tensor().narrow(1, 0, 0)?, true).is_err());
        }
        Ok(())
    }
}
