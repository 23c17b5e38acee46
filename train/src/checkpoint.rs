//! Checkpoints: safetensors files written with [`model::write_atomic`].
//!
//! A run directory holds:
//! - `last.safetensors`: the model's variables after the last finished epoch (weights only, the
//!   names of `model::SimpleBitCnn`);
//! - `best.safetensors`: the variables after the epoch with the best test accuracy;
//! - `resume.safetensors`: everything `--resume` needs in one file, so it is always consistent:
//!   the variables, the optimizer moments (`optim.m.<name>`, `optim.v.<name>`) and, in the
//!   safetensors metadata under `train_state`, a JSON [`TrainState`] (epochs done, optimizer step,
//!   run settings, metrics history). The RNG needs no state: each epoch reseeds from
//!   `(seed, epoch)`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::metrics::EpochMetrics;

/// File names inside the run directory.
pub const LAST: &str = "last.safetensors";
pub const BEST: &str = "best.safetensors";
pub const RESUME: &str = "resume.safetensors";
const STATE_KEY: &str = "train_state";
/// Prefix of the optimizer tensors in `resume.safetensors`.
pub const OPTIM_PREFIX: &str = "optim.";

/// Settings that must match for `--resume` to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub fc1: String,
    pub fc2: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: crate::optim::Schedule,
    pub seed: u64,
    pub train_limit: Option<usize>,
    pub train_images: usize,
    pub dtype: String,
}

impl RunSettings {
    /// Human-readable differences between a checkpoint's settings and the command line's.
    pub fn differences(&self, now: &RunSettings) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(now).unwrap_or_default();
        let mut out = Vec::new();
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                let vb = b.get(k).cloned().unwrap_or_default();
                if *va != vb {
                    out.push(format!("{k}: checkpoint {va}, now {vb}"));
                }
            }
        }
        out
    }
}

/// Progress of a run, stored in `resume.safetensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub version: u32,
    pub epochs_done: usize,
    pub optimizer_step: u64,
    pub best_test_acc: f64,
    pub best_epoch: usize,
    pub settings: RunSettings,
    pub history: Vec<EpochMetrics>,
}

/// Serialises named tensors (any device) with optional metadata and writes them atomically.
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::serialize(cpu.iter().map(|(k, t)| (k.as_str(), t)), metadata)
        .with_context(|| format!("serialising {}", path.display()))?;
    Ok(model::write_atomic(path, &bytes)?)
}

/// Saves the resume checkpoint: variables, optimizer tensors and the state.
pub fn save_resume(
    path: &Path,
    vars: &[(String, Tensor)],
    optim: &[(String, Tensor)],
    state: &TrainState,
) -> Result<()> {
    let mut all = vars.to_vec();
    all.extend(optim.iter().map(|(k, t)| (format!("{OPTIM_PREFIX}{k}"), t.clone())));
    let meta = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(state)?)]);
    save_tensors(path, &all, Some(meta))
}

/// A loaded resume checkpoint.
pub struct ResumePoint {
    pub state: TrainState,
    pub tensors: HashMap<String, Tensor>,
}

/// Loads `resume.safetensors` (tensors on the CPU): [`resume_from_bytes`] on the file's bytes,
/// errors naming the file.
pub fn load_resume(path: &Path) -> Result<ResumePoint> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    resume_from_bytes(&bytes).with_context(|| format!("loading the resume state {}", path.display()))
}

/// Parses the bytes of a `resume.safetensors` file: the training state from the metadata and the
/// tensors (on the CPU).
pub fn resume_from_bytes(bytes: &[u8]) -> Result<ResumePoint> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).context("not a valid safetensors file")?;
    let Some(json) = meta.metadata().as_ref().and_then(|m| m.get(STATE_KEY)) else {
        bail!("no training state (not written by this program?)");
    };
    let state: TrainState = serde_json::from_str(json).context("parsing the training state")?;
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).context("loading the tensors")?;
    Ok(ResumePoint { state, tensors })
}
