//! Fully connected layers that are either BitLinear or plain Linear.

use bitlinear::BitLinearConfig;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::{cast, FcKind};

/// A fully connected layer of the network, training form.
#[derive(Debug, Clone)]
pub enum Fc {
    /// Ternary BitLinear (variables `weight`, `bias`, `norm.weight`).
    Bit(bitlinear::BitLinear),
    /// Plain Linear (variables `weight`, `bias`), computed in the input's dtype.
    Plain(candle_nn::Linear),
}

impl Fc {
    /// Creates the layer's variables under `vb` with `candle_nn::linear`'s initialisation. A
    /// BitLinear layer gets the options `bit` (a plain Linear has none).
    pub fn new(kind: FcKind, in_dim: usize, out_dim: usize, bit: BitLinearConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            FcKind::BitLinear => Fc::Bit(bitlinear::bit_linear_with_config(in_dim, out_dim, bit, vb)?),
            FcKind::Linear => Fc::Plain(candle_nn::linear(in_dim, out_dim, vb)?),
        })
    }

    /// The layer's kind.
    pub fn kind(&self) -> FcKind {
        match self {
            Fc::Bit(_) => FcKind::BitLinear,
            Fc::Plain(_) => FcKind::Linear,
        }
    }

    /// The inference form: BitLinear packs its ternary weights, Linear stays as it is.
    pub fn to_packed(&self) -> Result<PackedFc> {
        Ok(match self {
            Fc::Bit(l) => PackedFc::Bit(l.to_packed()?),
            Fc::Plain(l) => PackedFc::Plain(l.clone()),
        })
    }
}

fn linear_forward(l: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    if l.weight().dtype() == x.dtype() {
        return l.forward(x);
    }
    let w = cast(l.weight(), x.dtype())?;
    let b = l.bias().map(|b| cast(b, x.dtype())).transpose()?;
    candle_nn::Linear::new(w, b).forward(x)
}

impl Module for Fc {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Fc::Bit(l) => l.forward(x),
            Fc::Plain(l) => linear_forward(l, x),
        }
    }
}

/// A fully connected layer of the network, inference form.
#[derive(Debug, Clone)]
pub enum PackedFc {
    /// BitLinear with pre-packed ternary weights.
    Bit(bitlinear::PackedBitLinear),
    /// Plain Linear.
    Plain(candle_nn::Linear),
}

impl Module for PackedFc {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            PackedFc::Bit(l) => l.forward(x),
            PackedFc::Plain(l) => linear_forward(l, x),
        }
    }
}
