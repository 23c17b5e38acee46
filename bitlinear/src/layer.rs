//! `BitLinear`: RMSNorm → int8 activations × ternary weights, a drop-in for `candle_nn::Linear`.

use candle_core::{bail, DType, Result, Tensor, D};
use candle_nn::{Init, Module, VarBuilder};

use crate::device::is_float;
use crate::ops::{packed_matmul, BitMatmul};
use crate::packed::PackedTernary;
use crate::quant::ActScaling;

/// Epsilon inside the RMSNorm square root: `x / sqrt(mean(x²) + 1e-6) · g`. It only matters
/// for (near) all-zero rows, which it maps to zero instead of NaN.
pub const RMS_NORM_EPS: f64 = 1e-6;

/// Options of a [`BitLinear`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitLinearConfig {
    /// Learn and add a bias (after the quantized matmul, in full precision).
    pub bias: bool,
    /// Normalize each input row with RMSNorm and a learnable gain before quantizing (BitNet's
    /// "SubLN"). Turn off when the layer already gets normalized inputs.
    pub rms_norm: bool,
    /// Activation scale grouping.
    pub act_scaling: ActScaling,
    /// Whether each forward checks the weight for NaN and infinite values (the default; see
    /// [`BitMatmul::check_finite`]: on CUDA the check waits for the stream).
    pub check_finite: bool,
}

impl Default for BitLinearConfig {
    fn default() -> Self {
        Self {
            bias: true,
            rms_norm: true,
            act_scaling: ActScaling::PerToken,
            check_finite: true,
        }
    }
}

/// Splits `(..., K)` into `(M, K)` and the leading dims.
fn flatten_rows(x: &Tensor, k: usize, ctx: &str) -> Result<(Tensor, Vec<usize>)> {
    if !is_float(x.dtype()) {
        bail!("{ctx}: input must be a float tensor, got {:?}", x.dtype())
    }
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        bail!("{ctx}: input must have at least one dimension (..., {k}), got a scalar")
    };
    if last != k {
        bail!("{ctx}: input has {last} features in its last dimension, the layer expects {k}")
    }
    let m = lead.iter().product::<usize>();
    Ok((x.reshape((m, k))?, lead.to_vec()))
}

/// RMSNorm over the last dim, computed in f32 and returned in `x`'s dtype.
/// An empty input is returned as it is: candle's CUDA kernels cannot run on zero elements.
fn rms_norm(x: &Tensor, gain: &Tensor) -> Result<Tensor> {
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let x32 = x.to_dtype(DType::F32)?;
    let rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + RMS_NORM_EPS)?.sqrt()?;
    x32.broadcast_div(&rms)?
        .broadcast_mul(&gain.to_dtype(DType::F32)?)?
        .to_dtype(x.dtype())
}

/// Adds the bias (not to an empty output: candle's CUDA kernels cannot run on zero elements)
/// and restores the leading dims.
fn finish(y: Tensor, bias: Option<&Tensor>, mut lead: Vec<usize>) -> Result<Tensor> {
    let y = match bias {
        Some(b) if y.elem_count() > 0 => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
        _ => y,
    };
    lead.push(y.dim(1)?);
    y.reshape(lead)
}

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
        Ok(PackedBitLinear {
            weight: PackedTernary::pack(&self.weight.detach())?,
            bias: self.bias.as_ref().map(Tensor::detach),
            norm: self.norm.as_ref().map(Tensor::detach),
            act_scaling: self.config.act_scaling,
        })
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

/// The inference form of [`BitLinear`]: the weight is stored packed (2 bits a value) and never
/// quantized again. Its outputs equal the training layer's.
#[derive(Debug, Clone)]
pub struct PackedBitLinear {
    weight: PackedTernary,
    bias: Option<Tensor>,
    norm: Option<Tensor>,
    act_scaling: ActScaling,
}

impl PackedBitLinear {
    /// Builds the layer from a packed weight, an optional bias `(out)` and RMSNorm gain `(in)`.
    pub fn new(
        weight: PackedTernary,
        bias: Option<Tensor>,
        norm: Option<Tensor>,
        act_scaling: ActScaling,
    ) -> Result<Self> {
        let (n, k) = (weight.out_features(), weight.in_features());
        if bias.as_ref().is_some_and(|b| b.dims() != [n]) {
            bail!("PackedBitLinear: bias must have shape ({n},)")
        }
        if norm.as_ref().is_some_and(|g| g.dims() != [k]) {
            bail!("PackedBitLinear: RMSNorm gain must have shape ({k},)")
        }
        Ok(Self {
            weight,
            bias,
            norm,
            act_scaling,
        })
    }

    /// The packed weight.
    pub fn weight(&self) -> &PackedTernary {
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

    /// Activation scale grouping.
    pub fn act_scaling(&self) -> ActScaling {
        self.act_scaling
    }
}

impl Module for PackedBitLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x, lead) = flatten_rows(x, self.weight.in_features(), "PackedBitLinear")?;
        let x = match &self.norm {
            Some(g) => rms_norm(&x, g)?,
            None => x,
        };
        let y = packed_matmul(&x, &self.weight, self.act_scaling)?;
        finish(y, self.bias.as_ref(), lead)
    }
}
