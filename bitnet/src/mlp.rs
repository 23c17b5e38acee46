//! BitNet's feed-forward block: squared-ReLU gate times up, `ffn_sub_norm`, down.

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
    /// [`Module::forward`] of one token with the gate, square, product and sub-norm as one
    /// fused CUDA kernel (`crate::fused`).
    pub fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        let Some(gate_up) = &self.gate_up_stacked else {
            candle_core::bail!("mlp: the fused step needs the stacked projections (CUDA)")
        };
        let norm = &self.ffn_sub_norm;
        let h = crate::fused::relu2_mul_rms_norm(
            &gate_up.forward_stacked(x)?,
            gate_up.scales(),
            norm.weight(),
            norm.eps(),
        )?;
        self.down_proj.forward(&h)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.relu()?.sqr()?;
        let h = (gate * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&self.ffn_sub_norm.forward(&h)?)
    }
}
