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
        })
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
        let (b, c, h, w) = x.dims4()?;
        if c != self.bias.dim(0)? {
            candle_core::bail!(
                "BatchNorm2d: input has {c} channels, the layer has {}",
                self.bias.dim(0)?
            );
        }
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
            let m = BATCH_NORM_MOMENTUM;
            let unbiased = (var.detach().flatten_all()? * (n as f64 / (n - 1) as f64))?;
            let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean.detach().flatten_all()? * m)?)?;
            let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
            (centered, var)
        } else {
            let mean = self.running_mean.as_tensor().reshape(shape)?;
            (xf.broadcast_sub(&mean)?, self.running_var.as_tensor().reshape(shape)?)
        };
        let bias = self.bias.to_dtype(DType::F32)?.reshape(shape)?;
        let inv_std = (var + BATCH_NORM_EPS)?.sqrt()?.recip()?;
        let y = centered.broadcast_mul(&inv_std)?.broadcast_add(&bias)?;
        y.to_dtype(x.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
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
}
