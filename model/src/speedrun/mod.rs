//! [`TernarySpeedrun`]: a fast CIFAR-10 network in the style of the published speed-run nets
//! (airbench), with every convolution and the classifier ternary over int8 activations.
//!
//! ```text
//! (B, 3, 32, 32)
//!  -> stem: BitConv2d(3 -> w0, 3x3, pad 1, bias) -> GELU                      (B, w0, 32, 32)
//!  -> block1: BitConv2d(w0 -> w1) -> MaxPool 2x2 -> BN -> GELU
//!             -> BitConv2d(w1 -> w1) -> BN -> GELU                             (B, w1, 16, 16)
//!  -> block2: the same, w1 -> w2                                              (B, w2, 8, 8)
//!  -> block3: the same, w2 -> w3                                              (B, w3, 4, 4)
//!  -> max over the 4x4 positions                                              (B, w3)
//!  -> head: BitLinear(w3 -> 10) (RMSNorm, bias)                               (B, 10) logits
//! ```
//!
//! Block convolutions are 3x3, padding 1, no bias (the batch norm's shift follows); their ternary
//! codes are rounded against the whole weight's absmean, or with
//! [`TernarySpeedrunConfig::channel_codes`] against each output channel's own. Default
//! widths `(w0, w1, w2, w3) = (32, 64, 256, 256)`. The batch norms ([`BatchNorm2d`]) and the
//! head's norm gain stay float; so does the stem when configured [`StemKind::Float`] (an
//! ablation: its K = 27 is the smallest of the network).
//!
//! Variable names: `stem.weight` `(w0, 3, 3, 3)`, `stem.bias`, `block{i}.conv{j}.weight`,
//! `block{i}.norm{j}.{bias,running_mean,running_var}` (i = 1..3, j = 1..2), `head.weight`
//! `(10, w3)`, `head.bias`, `head.norm.weight`.
//!
//! The training form ([`TernarySpeedrun`]) runs [`bitlinear::BitConv2d`] and
//! [`bitlinear::BitLinear`], whose forwards compute the same integers as the packed kernels;
//! [`TernarySpeedrun::to_packed`] gives the inference form ([`PackedTernarySpeedrun`]), which
//! predicts what the training form does in inference mode.

mod batch_norm;
mod files;
mod norm_gelu;
#[cfg(feature = "cuda")]
mod norm_gelu_cuda;

pub use batch_norm::{BatchNorm2d, BATCH_NORM_EPS, BATCH_NORM_MOMENTUM};
pub(crate) use files::parse_config as files_parse_config;
pub use files::{speedrun_checkpoint_specs, speedrun_packed_specs, SPEEDRUN_MODEL_NAME};

use bitlinear::{BitConv2d, BitConv2dConfig, BitLinear, PackedBitConv2d, PackedBitLinear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::{check_input, ComputeOptions, Conv, PoolKernel, NUM_CLASSES};

/// Whether the stem convolution (over the 3 colour channels) is ternary or float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StemKind {
    /// A [`BitConv2d`] (the default: every convolution ternary).
    #[default]
    Ternary,
    /// A float convolution (ablation).
    Float,
}

impl StemKind {
    /// `"ternary"` or `"float"`.
    pub fn as_str(self) -> &'static str {
        match self {
            StemKind::Ternary => "ternary",
            StemKind::Float => "float",
        }
    }
}

impl std::str::FromStr for StemKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ternary" => Ok(StemKind::Ternary),
            "float" => Ok(StemKind::Float),
            other => Err(format!(
                "unknown stem kind {other:?}: expected \"ternary\" or \"float\""
            )),
        }
    }
}

/// What a [`TernarySpeedrun`] holds: its widths, the kind of its stem and how its block
/// convolutions round their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TernarySpeedrunConfig {
    /// Channels of the stem and of the three blocks, each at least 1.
    pub widths: [usize; 4],
    /// The stem convolution's kind.
    pub stem: StemKind,
    /// Whether the six block convolutions round each output channel's codes against that
    /// channel's absmean ([`BitConv2dConfig::per_channel_codes`]; each is followed by a batch
    /// norm, which divides any per-channel scale out). Default off: the tensor's absmean.
    pub channel_codes: bool,
}

impl Default for TernarySpeedrunConfig {
    fn default() -> Self {
        Self {
            widths: [32, 64, 256, 256],
            stem: StemKind::Ternary,
            channel_codes: false,
        }
    }
}

impl TernarySpeedrunConfig {
    /// Checks that every width is at least 1.
    pub fn validate(&self) -> Result<()> {
        if self.widths.contains(&0) {
            candle_core::bail!("TernarySpeedrun widths must be at least 1, got {:?}", self.widths)
        }
        Ok(())
    }
}

fn block_conv_config(options: ComputeOptions, channel_codes: bool) -> BitConv2dConfig {
    BitConv2dConfig {
        stride: 1,
        padding: 1,
        bias: false,
        check_finite: options.check_finite,
        bf16_grad_products: options.bf16_conv_grads,
        per_channel_codes: channel_codes,
    }
}

/// The stem keeps the tensor's codes: its bias and GELU follow, no normalisation.
fn stem_config(options: ComputeOptions) -> BitConv2dConfig {
    BitConv2dConfig {
        bias: true,
        ..block_conv_config(options, false)
    }
}

/// One convolution group: conv -> pool -> BN -> GELU -> conv -> BN -> GELU.
#[derive(Debug, Clone)]
struct Block<C> {
    conv1: C,
    norm1: BatchNorm2d,
    conv2: C,
    norm2: BatchNorm2d,
}

/// A block's first convolution, whose output the block max-pools.
trait PooledConv: Module {
    /// `pool.max_pool2x2(self.forward(x))`.
    fn forward_pooled(&self, x: &Tensor, pool: PoolKernel) -> Result<Tensor> {
        pool.max_pool2x2(&self.forward(x)?)
    }
}

/// The training form pools inside its convolution's op where the fused kernels pool
/// ([`BitConv2d::forward_max_pool2x2`]: the same values and gradients, one graph node less).
impl PooledConv for BitConv2d {
    fn forward_pooled(&self, x: &Tensor, pool: PoolKernel) -> Result<Tensor> {
        match pool {
            PoolKernel::Fused => self.forward_max_pool2x2(x),
            PoolKernel::TensorOps => pool.max_pool2x2(&self.forward(x)?),
        }
    }
}

impl PooledConv for PackedBitConv2d {}

impl<C: PooledConv> Block<C> {
    fn forward_t(&self, x: &Tensor, pool: PoolKernel, fused_norm_gelu: bool, train: bool) -> Result<Tensor> {
        let norm_gelu = |norm: &BatchNorm2d, x: &Tensor| match fused_norm_gelu {
            true => norm.forward_gelu_t(x, train),
            false => norm.forward_t(x, train)?.gelu_erf(),
        };
        let x = self.conv1.forward_pooled(x, pool)?;
        let x = norm_gelu(&self.norm1, &x)?;
        let x = self.conv2.forward(&x)?;
        norm_gelu(&self.norm2, &x)
    }
}

impl Block<BitConv2d> {
    fn new(c_in: usize, c_out: usize, cfg: BitConv2dConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: bitlinear::bit_conv2d(c_in, c_out, 3, cfg, vb.pp("conv1"))?,
            norm1: BatchNorm2d::new(c_out, vb.pp("norm1"))?,
            conv2: bitlinear::bit_conv2d(c_out, c_out, 3, cfg, vb.pp("conv2"))?,
            norm2: BatchNorm2d::new(c_out, vb.pp("norm2"))?,
        })
    }

    fn to_packed(&self) -> Result<Block<PackedBitConv2d>> {
        Ok(Block {
            conv1: self.conv1.pack()?,
            norm1: self.norm1.clone(),
            conv2: self.conv2.pack()?,
            norm2: self.norm2.clone(),
        })
    }
}

/// The stem in either kind.
#[derive(Debug, Clone)]
enum Stem<C> {
    Ternary(C),
    Float(Conv),
}

impl<C: Module> Module for Stem<C> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Stem::Ternary(c) => c.forward(x),
            Stem::Float(c) => c.forward(x),
        }
    }
}

/// Max over the spatial positions: `(B, C, H, W) -> (B, C)`. Halved by `pool`'s 2x2 kernel
/// while both sides are even (the network's 4x4 maps: twice), the rest by candle's `max`: the
/// same maxima, and candle reduces a row of 16 with a block of its own and differentiates
/// through an equality mask over the whole map.
fn global_max_pool(x: &Tensor, pool: PoolKernel) -> Result<Tensor> {
    let mut x = x.clone();
    while let [_, _, h, w] = x.dims() {
        if *h < 2 || *w < 2 || h % 2 != 0 || w % 2 != 0 {
            break;
        }
        x = pool.max_pool2x2(&x)?;
    }
    match x.dims() {
        [b, c, 1, 1] => x.reshape((*b, *c)),
        _ => x.flatten_from(2)?.max(2),
    }
}

/// The fully ternary speed-run network in its training form. See the module docs.
#[derive(Debug, Clone)]
pub struct TernarySpeedrun {
    stem: Stem<BitConv2d>,
    blocks: [Block<BitConv2d>; 3],
    head: BitLinear,
    config: TernarySpeedrunConfig,
    options: ComputeOptions,
}

impl TernarySpeedrun {
    /// Builds the network's variables under `vb` with the default [`ComputeOptions`].
    pub fn new(config: TernarySpeedrunConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_options(config, ComputeOptions::default(), vb)
    }

    /// Builds the network's variables under `vb` with explicit [`ComputeOptions`].
    pub fn with_options(config: TernarySpeedrunConfig, options: ComputeOptions, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let [w0, w1, w2, w3] = config.widths;
        let stem = match config.stem {
            StemKind::Ternary => Stem::Ternary(bitlinear::bit_conv2d(3, w0, 3, stem_config(options), vb.pp("stem"))?),
            StemKind::Float => Stem::Float(Conv::new(3, w0, 3, 1, vb.pp("stem"))?),
        };
        let cfg = block_conv_config(options, config.channel_codes);
        let blocks = [
            Block::new(w0, w1, cfg, vb.pp("block1"))?,
            Block::new(w1, w2, cfg, vb.pp("block2"))?,
            Block::new(w2, w3, cfg, vb.pp("block3"))?,
        ];
        let head = bitlinear::bit_linear_with_config(w3, NUM_CLASSES, options.bit_linear(), vb.pp("head"))?;
        Ok(Self {
            stem,
            blocks,
            head,
            config,
            options,
        })
    }

    /// The configuration this network was built with.
    pub fn config(&self) -> TernarySpeedrunConfig {
        self.config
    }

    /// The options this network computes with.
    pub fn options(&self) -> ComputeOptions {
        self.options
    }

    /// `(B, 3, 32, 32)` float images -> `(B, 10)` logits in the input's dtype. `train` selects
    /// batch statistics (and updates the running ones) over the running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_input(x, "TernarySpeedrun")?;
        let mut x = self.stem_forward(x, train)?;
        for block in &self.blocks {
            x = block.forward_t(&x, self.options.pool, self.options.fused_norm_gelu, train)?;
        }
        self.head.forward(&global_max_pool(&x, self.options.pool)?)
    }

    /// Replaces every batch norm's running statistics with the plain mean of its batch
    /// statistics over `batches` (training-mode forwards, no gradient taken, each batch weighing
    /// the same), then restores the norms' momentum. Returns the number of batches.
    ///
    /// Why: where the final weights are an average over steps (lookahead), the running
    /// statistics averaged along with them are not the statistics of the averaged weights;
    /// a pass over training images under the final weights measures those (as SWA's `update_bn`
    /// does). With no batch the statistics are left as they are; after an error they may hold
    /// the statistics of part of the batches.
    pub fn recompute_batch_norm_statistics<I>(&mut self, batches: I) -> Result<usize>
    where
        I: IntoIterator<Item = Result<Tensor>>,
    {
        let saved: Vec<f64> = self.norms_mut().map(|n| n.momentum()).collect();
        let mut count = 0usize;
        let outcome = (|| {
            for x in batches {
                let x = x?;
                count += 1;
                for norm in self.norms_mut() {
                    norm.set_momentum(1.0 / count as f64)?;
                }
                drop(self.forward_t(&x, true)?);
            }
            Ok(())
        })();
        for (norm, m) in self.norms_mut().zip(saved) {
            norm.set_momentum(m)?;
        }
        outcome.map(|()| count)
    }

    /// Every batch norm, in the order of the forward.
    fn norms_mut(&mut self) -> impl Iterator<Item = &mut BatchNorm2d> {
        self.blocks.iter_mut().flat_map(|b| [&mut b.norm1, &mut b.norm2])
    }

    /// The stem and its GELU. Training with the fused batch norm + GELU on (f32 on CUDA, or the
    /// CPU) runs the ternary stem's bias add and GELU as one op (`norm_gelu::bias_gelu`); the
    /// evaluation keeps candle's ops, as the packed form runs them.
    fn stem_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let fusable = x.device().is_cpu() || (x.device().is_cuda() && x.dtype() == candle_core::DType::F32);
        if let (Stem::Ternary(conv), true) = (&self.stem, train && self.options.fused_norm_gelu && fusable) {
            if let Some(bias) = conv.bias() {
                let unbiased = BitConv2d::new(conv.weight().clone(), None, conv.config())?;
                return norm_gelu::bias_gelu(&unbiased.forward(x)?, bias);
            }
        }
        self.stem.forward(x)?.gelu_erf()
    }

    /// The inference form: packed ternary convolutions and head, the same batch norms.
    pub fn to_packed(&self) -> Result<PackedTernarySpeedrun> {
        let stem = match &self.stem {
            Stem::Ternary(c) => Stem::Ternary(c.pack()?),
            Stem::Float(c) => Stem::Float(c.clone()),
        };
        let [b1, b2, b3] = &self.blocks;
        Ok(PackedTernarySpeedrun {
            stem,
            blocks: [b1.to_packed()?, b2.to_packed()?, b3.to_packed()?],
            head: self.head.to_packed()?,
            config: self.config,
            pool: self.options.pool,
        })
    }
}

impl Module for TernarySpeedrun {
    /// Inference mode: [`TernarySpeedrun::forward_t`] with the running statistics.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

/// The inference form of [`TernarySpeedrun`]: packed 2-bit convolutions and head.
#[derive(Debug, Clone)]
pub struct PackedTernarySpeedrun {
    stem: Stem<PackedBitConv2d>,
    blocks: [Block<PackedBitConv2d>; 3],
    head: PackedBitLinear,
    config: TernarySpeedrunConfig,
    pool: PoolKernel,
}

impl PackedTernarySpeedrun {
    /// The configuration (widths, stem kind).
    pub fn config(&self) -> TernarySpeedrunConfig {
        self.config
    }
}

impl Module for PackedTernarySpeedrun {
    /// `(B, 3, 32, 32)` float images -> `(B, 10)` logits in the input's dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, "TernarySpeedrun")?;
        let mut x = self.stem.forward(x)?.gelu_erf()?;
        for block in &self.blocks {
            x = block.forward_t(&x, self.pool, true, false)?;
        }
        self.head.forward(&global_max_pool(&x, self.pool)?)
    }
}

#[cfg(test)]
mod tests;
