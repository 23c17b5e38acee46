//! The speed-run network in plain candle (float convolutions and head over the same variables,
//! the same batch norms and activations): the baseline of the inference benchmarks
//! (`benches/speedrun_infer.rs` on the CPU, `examples/speedrun_gpu_infer.rs` on CUDA) and of the
//! CPU training-step benchmark (`benches/speedrun_train.rs`: in f32 the tensors are the variables
//! themselves, so gradients reach them).
use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use model::speedrun::BatchNorm2d;

/// The float counterpart of the network over the variables of `vm`.
pub struct FloatSpeedrun {
    tensors: HashMap<String, Tensor>,
    norms: Vec<BatchNorm2d>,
    widths: [usize; 4],
}

impl FloatSpeedrun {
    /// The network over the variables of `vm`, converted to `dtype` on `dev`.
    /// The batch norms keep their f32 statistics and compute in f32, as the network's do.
    pub fn new(vm: &VarMap, widths: [usize; 4], dtype: DType, dev: &Device) -> Result<Self> {
        let convert = |dtype: DType| -> Result<HashMap<String, Tensor>> {
            let data = vm.data().lock().unwrap();
            data.iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_device(dev)?.to_dtype(dtype)?)))
                .collect()
        };
        let tensors = convert(dtype)?;
        let vb = VarBuilder::from_tensors(convert(DType::F32)?, DType::F32, dev);
        let mut norms = vec![];
        for (i, &width) in widths.iter().enumerate().skip(1) {
            for j in 1..=2 {
                norms.push(BatchNorm2d::new(width, vb.pp(format!("block{i}.norm{j}")))?);
            }
        }
        Ok(Self { tensors, norms, widths })
    }

    /// `(B, 3, 32, 32)` images in the network's dtype -> `(B, 10)` logits, in inference mode.
    #[allow(dead_code)] // each bench includes this file and uses one of the two
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(x, false)
    }

    /// [`Self::forward`], with batch statistics in the batch norms when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let t = |k: &str| &self.tensors[k];
        let w0 = self.widths[0];
        let mut x = x
            .conv2d(t("stem.weight"), 1, 1, 1, 1)?
            .broadcast_add(&t("stem.bias").reshape((1, w0, 1, 1))?)?
            .gelu_erf()?;
        for i in 1..=3 {
            let (n1, n2) = (&self.norms[2 * (i - 1)], &self.norms[2 * (i - 1) + 1]);
            x = model::max_pool2x2(&x.conv2d(t(&format!("block{i}.conv1.weight")), 1, 1, 1, 1)?)?;
            x = n1.forward_t(&x, train)?.gelu_erf()?;
            x = x.conv2d(t(&format!("block{i}.conv2.weight")), 1, 1, 1, 1)?;
            x = n2.forward_t(&x, train)?.gelu_erf()?;
        }
        let x = x.flatten_from(2)?.max(2)?;
        // candle's fused `rms_norm` has no backward: training takes the tensor-op form.
        let norm = match train {
            true => candle_nn::ops::rms_norm_slow,
            false => candle_nn::ops::rms_norm,
        };
        let x = norm(&x, t("head.norm.weight"), bitlinear::RMS_NORM_EPS as f32)?;
        candle_nn::Linear::new(t("head.weight").clone(), Some(t("head.bias").clone())).forward(&x)
    }
}
