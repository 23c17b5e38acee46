//! Command-line options and their validation.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::optim::Schedule;
use crate::tuning::CudaTuning;

/// Train the SimpleBitCnn (ternary BitLinear layers) on CIFAR-10.
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

    /// Number of epochs (>= 1).
    #[arg(long, default_value_t = 20, value_parser = positive, allow_negative_numbers = true)]
    pub epochs: usize,

    /// Training batch size (>= 1).
    #[arg(long, default_value_t = 128, value_parser = positive, allow_negative_numbers = true)]
    pub batch_size: usize,

    /// Batch size for evaluating the test set (>= 1).
    #[arg(long, default_value_t = 500, value_parser = positive, allow_negative_numbers = true)]
    pub eval_batch_size: usize,

    /// AdamW learning rate (> 0).
    #[arg(long, default_value_t = 1e-3, value_parser = positive_f64, allow_negative_numbers = true)]
    pub lr: f64,

    /// AdamW decoupled weight decay (>= 0).
    #[arg(long, default_value_t = 0.01, value_parser = non_negative_f64, allow_negative_numbers = true)]
    pub weight_decay: f64,

    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = ScheduleArg::Constant)]
    pub schedule: ScheduleArg,

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

    /// Kind of the first fully connected layer (ablation: `linear`).
    #[arg(long, value_enum, default_value_t = LayerArg::Bitlinear)]
    pub fc1: LayerArg,

    /// Kind of the second fully connected layer (ablation: `linear`).
    #[arg(long, value_enum, default_value_t = LayerArg::Bitlinear)]
    pub fc2: LayerArg,

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    Constant,
    Cosine,
}

impl From<ScheduleArg> for Schedule {
    fn from(s: ScheduleArg) -> Self {
        match s {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Cosine => Schedule::Cosine,
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

fn positive(s: &str) -> Result<usize, String> {
    let v: i128 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a positive whole number, got {s:?}"))?;
    if v < 1 {
        return Err(format!("must be at least 1, got {v}"));
    }
    usize::try_from(v).map_err(|_| format!("{v} is too large"))
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

fn non_negative_f64(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v < 0.0 {
        return Err(format!("must be 0 or more, got {v}"));
    }
    Ok(v)
}
