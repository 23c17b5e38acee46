//! Training recipes: the hyper-parameters each network trains with unless the command line says
//! otherwise, and the label-smoothed loss they use.

use candle_core::{DType, Result, Tensor, D};

use crate::augment::{Edge, Flip};
use crate::lookahead::LookaheadConfig;
use crate::optim::{OptimizerKind, Schedule};

/// Everything that sets how a network is trained (apart from data, device and seed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recipe {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per optimizer step.
    pub batch_size: usize,
    /// The optimizer, which sets what `lr` and `weight_decay` mean.
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Weight decay (AdamW: decoupled; SGD: added to the gradient).
    pub weight_decay: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Weight of the uniform distribution mixed into the one-hot targets (0: plain cross-entropy).
    pub label_smoothing: f64,
    /// Largest random translation, in pixels on each axis (0..=4), before the random flip.
    pub translate: usize,
    /// What training translations bring in at the edges.
    pub edge: Edge,
    /// How the horizontal flips are drawn.
    pub flip: Flip,
    /// Lookahead weight averaging, or `None` for the optimizer's weights as they are.
    pub lookahead: Option<LookaheadConfig>,
    /// Training images (the first ones, unaugmented) over which the batch norms' running
    /// statistics are recomputed after the last step; 0 keeps them as training left them.
    pub recompute_bn_images: usize,
}

impl Recipe {
    /// The reference network's recipe: AdamW 1e-3, batch 128, 20 epochs, crop from 4-pixel
    /// padding (translation up to 4) and flip, lookahead every 5 steps (with the constant
    /// learning rate the averaging gains about 2 points of test accuracy, bench/RESULTS.md).
    pub fn reference() -> Self {
        Self {
            epochs: 20,
            batch_size: 128,
            optimizer: OptimizerKind::AdamW,
            lr: 1e-3,
            weight_decay: 0.01,
            schedule: Schedule::Constant,
            label_smoothing: 0.0,
            translate: 4,
            edge: Edge::Zeros,
            flip: Flip::Random,
            lookahead: Some(LookaheadConfig::EVERY_5),
            recompute_bn_images: 0,
        }
    }

    /// The fully ternary speed-run network's recipe, after the speed-run nets: large batches, a
    /// short warm-up then linear decay, label smoothing 0.2, translation up to 2 pixels and flip,
    /// lookahead every 5 steps. AdamW rather than their Nesterov SGD: the latent weights of
    /// ternary layers train with Adam's per-weight step sizes in BitNet, and AdamW has no
    /// learning rate tied to the batch. Random rather than alternating flips: with lookahead
    /// the alternating ones gained nothing with test-time augmentation (bench/RESULTS.md).
    pub fn ternary_speedrun() -> Self {
        Self {
            epochs: 16,
            batch_size: 512,
            optimizer: OptimizerKind::AdamW,
            lr: 4e-3,
            weight_decay: 0.05,
            schedule: Schedule::WarmupLinear,
            label_smoothing: 0.2,
            translate: 2,
            edge: Edge::Zeros,
            flip: Flip::Random,
            lookahead: Some(LookaheadConfig::EVERY_5),
            recompute_bn_images: 0,
        }
    }
}

/// Cross-entropy of `logits (B, C)` (any float dtype; computed in f32) against the labels
/// `(B)` (u32) mixed with the uniform distribution: `(1 - eps) · nll + eps · mean_c(-log p_c)`,
/// averaged over the batch (PyTorch's `cross_entropy(label_smoothing = eps)`).
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &Tensor, eps: f64) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    if eps == 0.0 {
        return candle_nn::loss::cross_entropy(&logits, labels);
    }
    let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let nll = log_p.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let uniform = log_p.mean(D::Minus1)?.neg()?;
    ((nll * (1.0 - eps))? + (uniform * eps)?)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn smoothed_cross_entropy_matches_a_direct_computation() -> Result<()> {
        let logits = [[1.5f32, -0.5, 0.25], [0.0, 2.0, -1.0]];
        let labels = [2u32, 1];
        let t = Tensor::new(&logits, &Device::Cpu)?;
        let y = Tensor::new(&labels, &Device::Cpu)?;
        for eps in [0.0, 0.2, 1.0] {
            let mut want = 0f64;
            for (row, &label) in logits.iter().zip(&labels) {
                let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
                let logp: Vec<f64> = row.iter().map(|&v| v as f64 - lse).collect();
                want += (1.0 - eps) * -logp[label as usize] + eps * -logp.iter().sum::<f64>() / 3.0;
            }
            want /= 2.0;
            let got = smoothed_cross_entropy(&t, &y, eps)?.to_scalar::<f32>()? as f64;
            assert!((got - want).abs() < 1e-6, "eps {eps}: {got} vs {want}");
        }
        Ok(())
    }
}
