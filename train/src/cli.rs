//! Command-line options and their validation.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use model::NetworkConfig;

use crate::augment::{Edge, Flip};
use crate::lookahead::LookaheadConfig;
use crate::optim::{OptimizerKind, Schedule};
use crate::recipe::Recipe;
use crate::tuning::CudaTuning;

/// Train a ternary CNN on CIFAR-10: the reference SimpleBitCnn (default) or the fully ternary
/// speed-run network. Hyper-parameters left out come from the network's recipe.
#[derive(Debug, Clone, Parser)]
#[command(name = "train", version, about)]
pub struct Args {
    /// Directory of the CIFAR-10 binary version (data_batch_1.bin ... data_batch_5.bin,
    /// test_batch.bin); downloaded there when missing or empty (see --no-download).
    #[arg(long, default_value = "data/cifar-10-batches-bin")]
    pub data_dir: PathBuf,

    /// Fetching CIFAR-10 into --data-dir.
    #[command(flatten)]
    pub download: cifar::DownloadArgs,

    /// The network: `simple-bit-cnn` (reference, ternary classifier) or `ternary-speedrun`
    /// (every convolution and the classifier ternary).
    #[arg(long, value_enum, default_value_t = ModelArg::SimpleBitCnn)]
    pub model: ModelArg,

    /// Number of epochs (>= 1) [default: the recipe's, 20 or 16].
    #[arg(long, value_parser = positive, allow_negative_numbers = true)]
    pub epochs: Option<usize>,

    /// Training batch size (>= 1) [default: the recipe's, 128 or 512].
    #[arg(long, value_parser = positive, allow_negative_numbers = true)]
    pub batch_size: Option<usize>,

    /// Batch size for evaluating the test set (>= 1).
    #[arg(long, default_value_t = 500, value_parser = positive, allow_negative_numbers = true)]
    pub eval_batch_size: usize,

    /// Optimizer: `adamw`, or `sgd` (Nesterov momentum 0.85, the batch norms' shifts at 64
    /// times the learning rate, as airbench) [default: adamw].
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerArg>,

    /// (Peak) learning rate (> 0) [default: the recipe's, 1e-3 or 4e-3 with AdamW; with SGD
    /// 1.274e-3 times the batch size, on the batch's mean loss].
    #[arg(long, value_parser = positive_f64, allow_negative_numbers = true)]
    pub lr: Option<f64>,

    /// Weight decay (>= 0): AdamW's decoupled one, SGD's added to the gradient [default: the
    /// recipe's, 0.01 or 0.05 with AdamW; 1.5e-3 with SGD].
    #[arg(long, value_parser = non_negative_f64, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,

    /// Learning-rate schedule [default: the recipe's, constant or warmup-linear].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,

    /// Label smoothing in [0, 1) [default: the recipe's, 0 or 0.2].
    #[arg(long, value_parser = unit_interval, allow_negative_numbers = true)]
    pub label_smoothing: Option<f64>,

    /// Largest random translation in pixels, 0..=4 [default: the recipe's, 4 or 2].
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=4))]
    pub translate: Option<u8>,

    /// What training translations bring in at the image's edges: `zeros` (black) or `reflect`
    /// (the image mirrored at its border) [default: zeros]. The test-time views reflect.
    #[arg(long, value_enum)]
    pub edge: Option<EdgeArg>,

    /// How training images are mirrored: `random` (each epoch anew) or `alternating` (drawn
    /// once, the other way in odd epochs) [default: random].
    #[arg(long, value_enum)]
    pub flip: Option<FlipArg>,

    /// Lookahead weight averaging: update the slow weights every N optimizer steps (0: off)
    /// [default: 5].
    #[arg(long, value_name = "N", value_parser = whole, allow_negative_numbers = true)]
    pub lookahead_every: Option<u64>,

    /// ternary-speedrun: after the last step, recompute the batch norms' running statistics as
    /// the mean of their batch statistics over the first N training images, unaugmented (the
    /// final weights are lookahead's average, the running statistics an average of other
    /// weights'); 0 keeps them [default: 0].
    #[arg(long, value_name = "N", value_parser = whole, allow_negative_numbers = true)]
    pub recompute_bn: Option<u64>,

    /// Also report the final test accuracy with test-time augmentation, as the speed-run nets
    /// make it: the logits of the image and its mirror (1/4 each) plus those of both shifted by
    /// one pixel up-left and down-right over the reflect-padded image (1/8 each).
    #[arg(long)]
    pub tta: bool,

    /// CUDA: the ternary convolutions' backward products from f32 (TF32) operands instead of
    /// bf16 ones (bench/RESULTS.md compares the two).
    #[arg(long)]
    pub f32_conv_grads: bool,

    /// Seed of every random choice (initialisation, shuffling, augmentation): a CPU run is
    /// reproducible from it.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Train on the first N training images only (quick runs).
    #[arg(long, value_parser = positive, allow_negative_numbers = true)]
    pub train_limit: Option<usize>,

    /// Device to train on (`cuda` needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,

    /// Activation dtype; the master weights and the optimizer stay f32.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,

    /// simple-bit-cnn: kind of the first fully connected layer (ablation: `linear`)
    /// [default: bitlinear].
    #[arg(long, value_enum)]
    pub fc1: Option<LayerArg>,

    /// simple-bit-cnn: kind of the second fully connected layer (ablation: `linear`)
    /// [default: bitlinear].
    #[arg(long, value_enum)]
    pub fc2: Option<LayerArg>,

    /// ternary-speedrun: kind of the stem convolution over the colour channels (ablation:
    /// `float`) [default: ternary].
    #[arg(long, value_enum)]
    pub stem: Option<StemArg>,

    /// ternary-speedrun: how the block convolutions round their ternary codes: against the
    /// whole weight's absmean, or each output channel's own (the batch norm after each divides
    /// the channel's scale out) [default: per-tensor].
    #[arg(long, value_enum)]
    pub block_codes: Option<BlockCodesArg>,

    /// ternary-speedrun: channels of the stem and the three blocks, e.g. `32,64,256,256`
    /// [default: 32,64,256,256].
    #[arg(long, value_parser = widths)]
    pub widths: Option<[usize; 4]>,

    /// Run directory: metrics.csv, plot.png, last/best/resume checkpoints.
    #[arg(long, default_value = "runs/cifar10")]
    pub out: PathBuf,

    /// Continue the run in --out from its last finished epoch (same settings required).
    #[arg(long)]
    pub resume: bool,

    /// Stop after this many epochs have been done, as if the run had been killed (testing).
    #[arg(long, hide = true, value_parser = positive)]
    pub stop_after_epochs: Option<usize>,

    /// Switches of the CUDA training path (not options of the binary: all on; benchmarks set
    /// them).
    #[arg(skip)]
    pub cuda: CudaTuning,
}

impl Args {
    /// The recipe of `--model` with every hyper-parameter given on the command line in place.
    pub fn recipe(&self) -> Recipe {
        let base = match self.model {
            ModelArg::SimpleBitCnn => Recipe::reference(),
            ModelArg::TernarySpeedrun => Recipe::ternary_speedrun(),
        };
        let batch_size = self.batch_size.unwrap_or(base.batch_size);
        let optimizer = self.optimizer.map_or(base.optimizer, OptimizerKind::from);
        // Another optimizer than the recipe's brings its own defaults.
        let (lr, weight_decay) = match optimizer {
            o if o == base.optimizer => (base.lr, base.weight_decay),
            OptimizerKind::AdamW => {
                let d = crate::optim::AdamWConfig::default();
                (d.lr, d.weight_decay)
            }
            OptimizerKind::Sgd => (
                crate::sgd::SGD_LR_PER_IMAGE * batch_size as f64,
                crate::sgd::SGD_WEIGHT_DECAY,
            ),
        };
        Recipe {
            epochs: self.epochs.unwrap_or(base.epochs),
            batch_size,
            optimizer,
            lr: self.lr.unwrap_or(lr),
            weight_decay: self.weight_decay.unwrap_or(weight_decay),
            schedule: self.schedule.map_or(base.schedule, Schedule::from),
            label_smoothing: self.label_smoothing.unwrap_or(base.label_smoothing),
            translate: self.translate.map_or(base.translate, usize::from),
            edge: self.edge.map_or(base.edge, Edge::from),
            flip: self.flip.map_or(base.flip, Flip::from),
            lookahead: match self.lookahead_every {
                None => base.lookahead,
                Some(0) => None,
                Some(every) => Some(LookaheadConfig { every }),
            },
            recompute_bn_images: self
                .recompute_bn
                .map_or(base.recompute_bn_images, |n| usize::try_from(n).unwrap_or(usize::MAX)),
        }
    }

    /// The network `--model` and its layer options describe; an option of the other network is
    /// an error.
    pub fn network_config(&self) -> Result<NetworkConfig, String> {
        match self.model {
            ModelArg::SimpleBitCnn => {
                if self.stem.is_some()
                    || self.widths.is_some()
                    || self.block_codes.is_some()
                    || self.recompute_bn.is_some_and(|n| n > 0)
                {
                    return Err(
                        "--stem, --widths, --block-codes and --recompute-bn apply to --model ternary-speedrun".into(),
                    );
                }
                Ok(NetworkConfig::SimpleBitCnn(model::SimpleBitCnnConfig {
                    fc1: self.fc1.unwrap_or(LayerArg::Bitlinear).into(),
                    fc2: self.fc2.unwrap_or(LayerArg::Bitlinear).into(),
                }))
            }
            ModelArg::TernarySpeedrun => {
                if self.fc1.is_some() || self.fc2.is_some() {
                    return Err("--fc1 and --fc2 apply to --model simple-bit-cnn".into());
                }
                let default = model::TernarySpeedrunConfig::default();
                Ok(NetworkConfig::TernarySpeedrun(model::TernarySpeedrunConfig {
                    widths: self.widths.unwrap_or(default.widths),
                    stem: match self.stem.unwrap_or(StemArg::Ternary) {
                        StemArg::Ternary => model::StemKind::Ternary,
                        StemArg::Float => model::StemKind::Float,
                    },
                    channel_codes: self
                        .block_codes
                        .map_or(default.channel_codes, |c| c == BlockCodesArg::PerChannel),
                }))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelArg {
    /// The reference CNN: float convolutions, ternary classifier.
    SimpleBitCnn,
    /// The fully ternary speed-run CNN.
    TernarySpeedrun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StemArg {
    Ternary,
    Float,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BlockCodesArg {
    PerTensor,
    PerChannel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    Constant,
    Cosine,
    WarmupLinear,
}

impl From<ScheduleArg> for Schedule {
    fn from(s: ScheduleArg) -> Self {
        match s {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Cosine => Schedule::Cosine,
            ScheduleArg::WarmupLinear => Schedule::WarmupLinear,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    Adamw,
    Sgd,
}

impl From<OptimizerArg> for OptimizerKind {
    fn from(o: OptimizerArg) -> Self {
        match o {
            OptimizerArg::Adamw => OptimizerKind::AdamW,
            OptimizerArg::Sgd => OptimizerKind::Sgd,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EdgeArg {
    Zeros,
    Reflect,
}

impl From<EdgeArg> for Edge {
    fn from(e: EdgeArg) -> Self {
        match e {
            EdgeArg::Zeros => Edge::Zeros,
            EdgeArg::Reflect => Edge::Reflect,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlipArg {
    Random,
    Alternating,
}

impl From<FlipArg> for Flip {
    fn from(f: FlipArg) -> Self {
        match f {
            FlipArg::Random => Flip::Random,
            FlipArg::Alternating => Flip::Alternating,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
}

impl DtypeArg {
    pub fn as_str(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayerArg {
    Bitlinear,
    Linear,
}

impl From<LayerArg> for model::FcKind {
    fn from(l: LayerArg) -> Self {
        match l {
            LayerArg::Bitlinear => model::FcKind::BitLinear,
            LayerArg::Linear => model::FcKind::Linear,
        }
    }
}

/// `s` as an integer of any sign, or an error that names what was `expected`.
fn integer(s: &str, expected: &str) -> Result<i128, String> {
    s.trim().parse().map_err(|_| format!("expected {expected}, got {s:?}"))
}

fn positive(s: &str) -> Result<usize, String> {
    let v = integer(s, "a positive whole number")?;
    if v < 1 {
        return Err(format!("must be at least 1, got {v}"));
    }
    usize::try_from(v).map_err(|_| format!("{v} is too large"))
}

fn whole(s: &str) -> Result<u64, String> {
    let v = integer(s, "a whole number")?;
    if v < 0 {
        return Err(format!("must be 0 or more, got {v}"));
    }
    u64::try_from(v).map_err(|_| format!("{v} is too large"))
}

fn parse_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("expected a number, got {s:?}"))?;
    if !v.is_finite() {
        return Err(format!("must be finite, got {s}"));
    }
    Ok(v)
}

fn positive_f64(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v <= 0.0 {
        return Err(format!("must be greater than 0, got {v}"));
    }
    Ok(v)
}

fn unit_interval(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if !(0.0..1.0).contains(&v) {
        return Err(format!("must be in [0, 1), got {v}"));
    }
    Ok(v)
}

/// Parses `--widths`: four comma-separated channel counts, each at least 1.
pub fn widths(s: &str) -> Result<[usize; 4], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(positive)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s:?}: {e}"))?;
    <[usize; 4]>::try_from(v).map_err(|v| format!("expected 4 comma-separated widths, got {}", v.len()))
}

fn non_negative_f64(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v < 0.0 {
        return Err(format!("must be 0 or more, got {v}"));
    }
    Ok(v)
}
