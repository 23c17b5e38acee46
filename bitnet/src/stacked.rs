//! Projections of one input stored as one weight, their rows stacked, so that one matmul
//! computes them all (q, k and v; gate and up): one decode GEMV instead of three or two in the
//! fused decode step, whose kernels apply each part's weight scale.

use bitlinear::{packed_matmul_normed, InputNorm, PackedTernary};
use candle_core::{bail, Result, Tensor};
use candle_nn::Linear;

use crate::linear::{dense_normed, BitNetLinear};

#[derive(Debug, Clone)]
enum Stacked {
    /// The parts' packed rows stacked, scale 1: each part's weight scale is applied after.
    Packed(PackedTernary),
    /// The parts' float weights stacked.
    Dense(Linear),
}

/// Several [`BitNetLinear`]s over the same input as one weight (a copy: the parts stay). Packed
/// parts keep their weight scales apart: the stacked product is `(acc · s_x) · 1`, and part `i`
/// is that times `s_w[i]`, the same two f32 roundings as each part's own product (in bf16 or f16
/// the stacked product is rounded to the dtype before the scale, one more rounding).
#[derive(Debug, Clone)]
pub struct StackedLinear {
    weight: Stacked,
    /// The weight scale of each part, in order (1 for dense parts).
    scales: Vec<f32>,
}

impl StackedLinear {
    /// Stacks `parts` (all packed or all dense, one input size) into a new weight.
    pub fn new(parts: &[BitNetLinear]) -> Result<Self> {
        let Some(first) = parts.first() else {
            bail!("StackedLinear: no projections")
        };
        let scales = parts.iter().map(|p| p.weight().map_or(1.0, |w| w.scale())).collect();
        let weight = if first.weight().is_some() {
            let mut bytes = Vec::with_capacity(parts.len());
            let k = first.weight().map_or(0, |w| w.in_features());
            for p in parts {
                match p.weight() {
                    Some(w) if w.in_features() == k => bytes.push(w.bytes().clone()),
                    _ => bail!("StackedLinear: parts must all be packed, with {k} input features"),
                }
            }
            Stacked::Packed(PackedTernary::from_parts(Tensor::cat(&bytes, 0)?, 1.0, k)?)
        } else {
            let mut weights = Vec::with_capacity(parts.len());
            for p in parts {
                match p.dense() {
                    Some(l) if l.bias().is_none() => weights.push(l.weight().clone()),
                    _ => bail!("StackedLinear: parts must all be dense, without bias"),
                }
            }
            Stacked::Dense(Linear::new(Tensor::cat(&weights, 0)?, None))
        };
        Ok(Self { weight, scales })
    }

    /// The parts' weight scales, to apply to their slices of [`Self::forward_stacked_normed`] (1 for
    /// dense parts).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Every part's product (before its weight scale) of `norm` of `x`, `(..., Σ out)`, with the
    /// norm's sum where it has one: one GEMV that runs the norm itself for packed parts (`bitlinear::packed_matmul_normed`), the
    /// fused norm kernels then the float product for dense ones.
    pub fn forward_stacked_normed(&self, x: &Tensor, norm: &InputNorm) -> Result<(Tensor, Option<Tensor>)> {
        match &self.weight {
            Stacked::Packed(w) => packed_matmul_normed(x, w, norm),
            Stacked::Dense(linear) => dense_normed(linear, x, norm),
        }
    }
}
