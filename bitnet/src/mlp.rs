//! BitNet's feed-forward block: squared-ReLU gate times up, `ffn_sub_norm`, down.

use bitlinear::InputNorm;
use candle_core::{Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

use crate::config::BitNetConfig;
use crate::linear::{BitNetLinear, Projections};
use crate::stacked::StackedLinear;

/// `down(ffn_sub_norm(relu(gate(x))² · up(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: BitNetLinear,
    up_proj: BitNetLinear,
    /// gate and up stacked for the fused decode step (one product for both); only on CUDA
    /// devices, where that step runs.
    gate_up_stacked: Option<StackedLinear>,
    down_proj: BitNetLinear,
    ffn_sub_norm: RmsNorm,
}

impl Mlp {
    /// Loads `mlp` under `vb` (the config was validated to use `relu2`).
    pub fn load(cfg: &BitNetConfig, projections: Projections, vb: VarBuilder) -> Result<Self> {
        let (hidden, inner) = (cfg.hidden_size, cfg.intermediate_size);
        let gate_proj = BitNetLinear::load_as(hidden, inner, projections, vb.pp("gate_proj"))?;
        let up_proj = BitNetLinear::load_as(hidden, inner, projections, vb.pp("up_proj"))?;
        let gate_up_stacked = if vb.device().is_cuda() {
            Some(StackedLinear::new(&[gate_proj.clone(), up_proj.clone()])?)
        } else {
            None
        };
        Ok(Self {
            gate_proj,
            up_proj,
            gate_up_stacked,
            down_proj: BitNetLinear::load_as(inner, hidden, projections, vb.pp("down_proj"))?,
            ffn_sub_norm: candle_nn::rms_norm(inner, cfg.rms_norm_eps, vb.pp("ffn_sub_norm"))?,
        })
    }
}

impl Mlp {
    /// [`Module::forward`] of `post_norm(x + delta)` for one token on the fused CUDA kernels,
    /// with `x + delta` (the residual stream after the attention block): gate and up as one GEMV
    /// that runs the add and the norm itself, then `down` as one GEMV that runs the gate, square,
    /// product and sub-norm (dense projections: the norms as fused kernels of their own, see
    /// `crate::fused`). Returns the output and the sum.
    pub fn forward_fused(&self, x: &Tensor, delta: &Tensor, post_norm: &RmsNorm) -> Result<(Tensor, Tensor)> {
        let Some(gate_up) = &self.gate_up_stacked else {
            candle_core::bail!("mlp: the fused step needs the stacked projections (CUDA)")
        };
        let &[gate_scale, up_scale] = gate_up.scales() else {
            candle_core::bail!("mlp: gate and up stacked into other than two parts")
        };
        let norm = InputNorm::AddRmsNorm {
            delta: Some(delta),
            gain: post_norm.weight(),
            eps: post_norm.eps() as f32,
            gain_settled: true,
        };
        let (h, sum) = gate_up.forward_stacked_normed(x, &norm)?;
        let Some(sum) = sum else {
            candle_core::bail!("mlp: the residual add returned no sum")
        };
        let sub_norm = InputNorm::Relu2MulRmsNorm {
            gain: self.ffn_sub_norm.weight(),
            eps: self.ffn_sub_norm.eps() as f32,
            gate_scale,
            up_scale,
            gain_settled: true,
        };
        Ok((self.down_proj.forward_normed(&h, &sub_norm)?.0, sum))
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.relu()?.sqr()?;
        let h = (gate * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&self.ffn_sub_norm.forward(&h)?)
    }
}
