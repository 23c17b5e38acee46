//! Networks built from BitLinear layers.
//!
//! Two CIFAR-10 networks: [`TernarySpeedrun`] ([`speedrun`]: every convolution and the head
//! ternary) and the reference [`SimpleBitCnn`], described below. [`Network`] and
//! [`PackedNetwork`] hold either, chosen by the `model` metadata of their files.
//!
//! [`SimpleBitCnn`] is the project's reference network for CIFAR-10:
//!
//! ```text
//! (B, 3, 32, 32)
//!  -> conv1: Conv2d(3 -> 32, 3x3, pad 1) -> ReLU -> MaxPool 2x2      (B, 32, 16, 16)
//!  -> conv2: Conv2d(32 -> 64, 3x3, pad 1) -> ReLU -> MaxPool 2x2     (B, 64, 8, 8)
//!  -> flatten (channel-major, like PyTorch's `flatten(1)`)            (B, 4096)
//!  -> fc1: BitLinear(4096 -> 512) -> ReLU                             (B, 512)
//!  -> fc2: BitLinear(512 -> 10)                                       (B, 10) logits
//! ```
//!
//! Variable names (stable; the `convert` crate exports them): `conv1.weight` (32, 3, 3, 3),
//! `conv1.bias` (32), `conv2.weight` (64, 32, 3, 3), `conv2.bias` (64), `fc1.weight` (512, 4096),
//! `fc1.bias` (512), `fc1.norm.weight` (4096), `fc2.weight` (10, 512), `fc2.bias` (10),
//! `fc2.norm.weight` (512). A layer configured as a plain [`candle_nn::Linear`] has no
//! `norm.weight`.
//!
//! The training form ([`SimpleBitCnn`]) runs BitLinear's quantize-on-the-fly op with the
//! straight-through estimator; [`SimpleBitCnn::to_packed`] returns the inference form
//! ([`PackedSimpleBitCnn`]) whose BitLinear layers hold pre-packed ternary weights.
//!
//! Mixed precision: the forward pass runs in the input's dtype. Float weights of a different dtype
//! (e.g. f32 master weights with bf16 activations) are cast inside the graph, so gradients still
//! reach the f32 variables.

mod atomic;
mod checkpoint_file;
mod layers;
pub mod layout;
mod network;
pub mod packed_file;
pub mod speedrun;
mod validate;

pub use atomic::write_atomic;
pub use bitlinear::{max_pool2x2, max_pool2x2_ops, PoolKernel};
pub use checkpoint_file::{checkpoint_metadata, Checkpoint};
pub use layers::{Fc, PackedFc};
pub use network::{read_metadata, Network, NetworkConfig, PackedNetwork};
pub use speedrun::{PackedTernarySpeedrun, StemKind, TernarySpeedrun, TernarySpeedrunConfig};
pub use validate::{check_finite, check_tensors, TensorSpec};

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Input channels, height and width the network expects.
pub const INPUT_SHAPE: (usize, usize, usize) = (3, 32, 32);
/// Number of output classes (logits per image).
pub const NUM_CLASSES: usize = 10;
/// Width of the flattened convolutional features (64 channels x 8 x 8).
pub const FLAT_FEATURES: usize = 64 * 8 * 8;
/// Width of the hidden fully connected layer.
pub const HIDDEN: usize = 512;

/// What kind of layer a fully connected position of the network uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FcKind {
    /// A ternary [`bitlinear::BitLinear`] layer (the default).
    #[default]
    BitLinear,
    /// A plain full-precision [`candle_nn::Linear`] layer (for ablations).
    Linear,
}

impl FcKind {
    /// `"bitlinear"` or `"linear"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FcKind::BitLinear => "bitlinear",
            FcKind::Linear => "linear",
        }
    }
}

impl std::str::FromStr for FcKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bitlinear" | "bit" => Ok(FcKind::BitLinear),
            "linear" | "plain" => Ok(FcKind::Linear),
            other => Err(format!(
                "unknown layer kind {other:?}: expected \"bitlinear\" or \"linear\""
            )),
        }
    }
}

/// Which fully connected layers of [`SimpleBitCnn`] are BitLinear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimpleBitCnnConfig {
    /// The 4096 -> 512 layer.
    pub fc1: FcKind,
    /// The 512 -> 10 layer.
    pub fc2: FcKind,
}

impl SimpleBitCnnConfig {
    /// Both fully connected layers BitLinear: the reference network.
    pub fn bitlinear() -> Self {
        Self {
            fc1: FcKind::BitLinear,
            fc2: FcKind::BitLinear,
        }
    }

    /// Both fully connected layers plain `Linear`: the full-precision baseline.
    pub fn full_precision() -> Self {
        Self {
            fc1: FcKind::Linear,
            fc2: FcKind::Linear,
        }
    }
}

/// How a network computes, as opposed to what it holds ([`SimpleBitCnnConfig`]): these options
/// change neither its variables nor its forward values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeOptions {
    /// Whether every BitLinear forward checks its float weight for NaN and infinite values
    /// ([`bitlinear::BitLinearConfig::check_finite`]; default on). A training loop that checks
    /// its weights itself turns it off: on CUDA each check waits for the stream.
    pub check_finite: bool,
    /// The max pooling implementation (default [`PoolKernel::Fused`]).
    pub pool: PoolKernel,
    /// Whether a batch norm followed by GELU runs as one op where the device has one
    /// ([`speedrun::BatchNorm2d::forward_gelu_t`]; default on) or as separate tensor ops.
    pub fused_norm_gelu: bool,
    /// Whether the ternary convolutions' backward products on CUDA take bf16 operands in f32
    /// training ([`bitlinear::BitConv2dConfig::bf16_grad_products`]; default off).
    pub bf16_conv_grads: bool,
}

impl Default for ComputeOptions {
    fn default() -> Self {
        Self {
            check_finite: true,
            pool: PoolKernel::Fused,
            fused_norm_gelu: true,
            bf16_conv_grads: false,
        }
    }
}

impl ComputeOptions {
    /// The options of the network's BitLinear layers: bias, RMSNorm, per-token scaling.
    pub fn bit_linear(&self) -> bitlinear::BitLinearConfig {
        bitlinear::BitLinearConfig {
            check_finite: self.check_finite,
            ..Default::default()
        }
    }
}

/// Conv2d(k x k, stride 1, padding `pad`) with bias; weights cast to the input dtype.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
}

impl Conv {
    fn new(c_in: usize, c_out: usize, k: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        // Same variables and initialisation as `candle_nn::conv2d`.
        let cfg = candle_nn::Conv2dConfig {
            padding,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(c_in, c_out, k, cfg, vb)?;
        let bias = match conv.bias() {
            Some(b) => b.clone(),
            None => candle_core::bail!("conv2d was created without a bias"),
        };
        Ok(Self {
            weight: conv.weight().clone(),
            bias,
            padding,
        })
    }

    /// The (out, in, k, k) kernel.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The (out,) bias.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for Conv {
    /// candle's `conv2d` value; in training its gradients come from [`bitlinear::float_conv2d`]'s
    /// matrix products.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = cast(&self.weight, x.dtype())?;
        let b = cast(&self.bias, x.dtype())?;
        let y = bitlinear::float_conv2d(x, &w, self.padding)?;
        let c = b.dim(0)?;
        y.broadcast_add(&b.reshape((1, c, 1, 1))?)
    }
}

pub(crate) fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

/// Checks that `x` is a float batch of shape (B, 3, 32, 32) for the network `who`.
fn check_input(x: &Tensor, who: &str) -> Result<()> {
    let (c, h, w) = INPUT_SHAPE;
    match x.dims() {
        [_, xc, xh, xw] if (*xc, *xh, *xw) == (c, h, w) => {}
        dims => candle_core::bail!("{who} expects input of shape (batch, {c}, {h}, {w}), got {dims:?}"),
    }
    if !x.dtype().is_float() {
        candle_core::bail!("{who} expects a float input (f32, bf16 or f16), got {:?}", x.dtype());
    }
    Ok(())
}

/// The convolutional trunk shared by both forms: (B, 3, 32, 32) -> (B, 4096).
///
/// ReLU is applied after the pooling: `relu(maxpool(x)) == maxpool(relu(x))` exactly (ReLU is
/// monotone) and the gradients agree, on a quarter of the elements.
fn features(conv1: &Conv, conv2: &Conv, pool: PoolKernel, x: &Tensor) -> Result<Tensor> {
    check_input(x, "SimpleBitCnn")?;
    let x = pool.max_pool2x2(&conv1.forward(x)?)?.relu()?;
    let x = pool.max_pool2x2(&conv2.forward(&x)?)?.relu()?;
    x.flatten_from(1)
}

/// The reference CNN in its training form. See the crate docs for the architecture.
#[derive(Debug, Clone)]
pub struct SimpleBitCnn {
    conv1: Conv,
    conv2: Conv,
    fc1: Fc,
    fc2: Fc,
    config: SimpleBitCnnConfig,
    options: ComputeOptions,
}

impl SimpleBitCnn {
    /// Builds the network from `vb` (variables `conv1.*`, `conv2.*`, `fc1.*`, `fc2.*`), with the
    /// default [`ComputeOptions`].
    pub fn new(config: SimpleBitCnnConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_options(config, ComputeOptions::default(), vb)
    }

    /// Builds the network from `vb` with explicit [`ComputeOptions`].
    pub fn with_options(config: SimpleBitCnnConfig, options: ComputeOptions, vb: VarBuilder) -> Result<Self> {
        let conv1 = Conv::new(INPUT_SHAPE.0, 32, 3, 1, vb.pp("conv1"))?;
        let conv2 = Conv::new(32, 64, 3, 1, vb.pp("conv2"))?;
        let bit = options.bit_linear();
        let fc1 = Fc::new(config.fc1, FLAT_FEATURES, HIDDEN, bit, vb.pp("fc1"))?;
        let fc2 = Fc::new(config.fc2, HIDDEN, NUM_CLASSES, bit, vb.pp("fc2"))?;
        Ok(Self {
            conv1,
            conv2,
            fc1,
            fc2,
            config,
            options,
        })
    }

    /// The configuration this network was built with.
    pub fn config(&self) -> SimpleBitCnnConfig {
        self.config
    }

    /// The options this network computes with.
    pub fn options(&self) -> ComputeOptions {
        self.options
    }

    /// The inference form: same convolutions (and pooling), BitLinear layers with pre-packed
    /// ternary weights. Its predictions equal this network's (the integer part of every
    /// BitLinear is identical).
    pub fn to_packed(&self) -> Result<PackedSimpleBitCnn> {
        Ok(PackedSimpleBitCnn {
            conv1: self.conv1.clone(),
            conv2: self.conv2.clone(),
            fc1: self.fc1.to_packed()?,
            fc2: self.fc2.to_packed()?,
            pool: self.options.pool,
        })
    }
}

impl Module for SimpleBitCnn {
    /// (B, 3, 32, 32) float images -> (B, 10) logits, in the input's dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = features(&self.conv1, &self.conv2, self.options.pool, x)?;
        let x = self.fc1.forward(&x)?.relu()?;
        self.fc2.forward(&x)
    }
}

/// The inference form of [`SimpleBitCnn`], made by [`SimpleBitCnn::to_packed`].
#[derive(Debug, Clone)]
pub struct PackedSimpleBitCnn {
    conv1: Conv,
    conv2: Conv,
    fc1: PackedFc,
    fc2: PackedFc,
    pool: PoolKernel,
}

impl Module for PackedSimpleBitCnn {
    /// (B, 3, 32, 32) float images -> (B, 10) logits, in the input's dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = features(&self.conv1, &self.conv2, self.pool, x)?;
        let x = self.fc1.forward(&x)?.relu()?;
        self.fc2.forward(&x)
    }
}
