//! `BitLinear`: RMSNorm → int8 activations × ternary weights, a drop-in for `candle_nn::Linear`.

use candle_core::{bail, Result, Tensor};
use candle_nn::{Init, Module, VarBuilder};

use crate::layer_common::{finish, flatten_rows, rms_norm, BitLinearConfig};
use crate::ops::BitMatmul;
use crate::packed::PackedTernary;
use crate::packed_layer::PackedBitLinear;

/// A BitNet b1.58 linear layer for training: latent float weights `(out, in)`, quantized to
/// ternary on every forward, with straight-through gradients.
///
/// ```
/// use bitlinear::bit_linear;
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let layer = bit_linear(8, 3, vb.pp("fc"))?;
/// let x = Tensor::randn(0f32, 1., (2, 5, 8), &Device::Cpu)?;
/// let y = layer.forward(&x)?;
/// assert_eq!(y.dims(), &[2, 5, 3]);
/// // The packed inference form gives the same outputs.
/// let packed = layer.to_packed()?;
/// let diff = (packed.forward(&x)? - &y)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert_eq!(diff, 0.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BitLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    norm: Option<Tensor>,
    config: BitLinearConfig,
}

/// `BitLinear` with a bias and RMSNorm, variables `weight`, `bias` and `norm.weight` under `vb`
/// (the counterpart of `candle_nn::linear`).
pub fn bit_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<BitLinear> {
    bit_linear_with_config(in_dim, out_dim, BitLinearConfig::default(), vb)
}

/// `BitLinear` without a bias (the counterpart of `candle_nn::linear_no_bias`).
pub fn bit_linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<BitLinear> {
    let config = BitLinearConfig {
        bias: false,
        ..Default::default()
    };
    bit_linear_with_config(in_dim, out_dim, config, vb)
}

/// `BitLinear` with explicit options. Initialization follows `candle_nn::linear`.
pub fn bit_linear_with_config(
    in_dim: usize,
    out_dim: usize,
    config: BitLinearConfig,
    vb: VarBuilder,
) -> Result<BitLinear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let bias = if config.bias {
        let bound = 1. / (in_dim.max(1) as f64).sqrt();
        Some(vb.get_with_hints(out_dim, "bias", Init::Uniform { lo: -bound, up: bound })?)
    } else {
        None
    };
    let norm = if config.rms_norm {
        Some(vb.get_with_hints(in_dim, "norm.weight", Init::Const(1.))?)
    } else {
        None
    };
    BitLinear::new(weight, bias, norm, config)
}

impl BitLinear {
    /// Builds a layer from tensors: `weight (out, in)`, `bias (out)`, RMSNorm `gain (in)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, norm: Option<Tensor>, config: BitLinearConfig) -> Result<Self> {
        let (n, k) = crate::device::check_weight(&weight, "BitLinear")?;
        if let Some(b) = &bias {
            if b.dims() != [n] {
                bail!("BitLinear: bias must have shape ({n},), got {:?}", b.dims())
            }
        }
        if let Some(g) = &norm {
            if g.dims() != [k] {
                bail!("BitLinear: RMSNorm gain must have shape ({k},), got {:?}", g.dims())
            }
        }
        let config = BitLinearConfig {
            bias: bias.is_some(),
            rms_norm: norm.is_some(),
            ..config
        };
        Ok(Self {
            weight,
            bias,
            norm,
            config,
        })
    }

    /// The latent float weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The RMSNorm gain, if RMSNorm is on.
    pub fn norm_gain(&self) -> Option<&Tensor> {
        self.norm.as_ref()
    }

    /// The layer's options.
    pub fn config(&self) -> BitLinearConfig {
        self.config
    }

    /// Quantizes and packs the weight once: the inference form of this layer.
    pub fn to_packed(&self) -> Result<PackedBitLinear> {
        PackedBitLinear::new(
            PackedTernary::pack(&self.weight.detach())?,
            self.bias.as_ref().map(Tensor::detach),
            self.norm.as_ref().map(Tensor::detach),
            self.config.act_scaling,
        )
    }
}

impl Module for BitLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x, lead) = flatten_rows(x, self.weight.dim(1)?, "BitLinear")?;
        let x = match &self.norm {
            Some(g) => rms_norm(&x, g)?,
            None => x,
        };
        let op = BitMatmul {
            scaling: self.config.act_scaling,
            check_finite: self.config.check_finite,
        };
        let y = op.forward(&x, &self.weight)?;
        finish(y, self.bias.as_ref(), lead)
    }
}
