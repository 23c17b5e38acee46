//! Checkpoints: safetensors files written with [`model::write_atomic`].
//!
//! A run directory holds:
//! - `last.safetensors`: the model's variables after the last finished epoch (weights only, the
//!   names of `model::SimpleBitCnn`);
//! - `best.safetensors`: the variables after the epoch with the best test accuracy;
//! - `resume.safetensors`: everything `--resume` needs in one file, so it is always consistent:
//!   the variables, the optimizer's state (AdamW's moments `optim.m.<name>` and `optim.v.<name>`,
//!   or SGD's momentum buffer `optim.b.<name>`), with lookahead
//!   the slow copies (`lookahead.<name>`) and, in the
//!   safetensors metadata under `train_state`, a JSON [`TrainState`] (epochs done, optimizer step,
//!   run settings, metrics history). The RNG needs no state: each epoch reseeds from
//!   `(seed, epoch)`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::metrics::EpochMetrics;

/// File names inside the run directory.
pub const LAST: &str = "last.safetensors";
pub const BEST: &str = "best.safetensors";
pub const RESUME: &str = "resume.safetensors";
const STATE_KEY: &str = "train_state";
/// The [`TrainState::version`] this build writes and reads.
pub const STATE_VERSION: u32 = 2;
/// Prefix of the optimizer tensors in `resume.safetensors`.
pub const OPTIM_PREFIX: &str = "optim.";
/// Prefix of the lookahead's slow copies in `resume.safetensors`.
pub const LOOKAHEAD_PREFIX: &str = "lookahead.";

/// Settings that must match for `--resume` to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// The network and its configuration ([`model::NetworkConfig::describe`]).
    pub model: String,
    pub epochs: usize,
    pub batch_size: usize,
    /// Absent in files written before the option existed: those runs trained with AdamW.
    #[serde(default)]
    pub optimizer: crate::optim::OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: crate::optim::Schedule,
    pub label_smoothing: f64,
    pub translate: usize,
    /// Absent in files written before the option existed: those runs translated with zeros.
    #[serde(default)]
    pub edge: crate::augment::Edge,
    /// Absent in files written before the option existed: those runs flipped at random.
    #[serde(default)]
    pub flip: crate::augment::Flip,
    /// Absent in files written before the option existed: those runs had no lookahead.
    #[serde(default)]
    pub lookahead: Option<crate::lookahead::LookaheadConfig>,
    /// Absent in files written before the option existed: those runs kept the statistics.
    #[serde(default)]
    pub recompute_bn_images: usize,
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

impl TrainState {
    /// The state of a run before its first epoch.
    pub fn new(settings: RunSettings) -> Self {
        Self {
            version: STATE_VERSION,
            epochs_done: 0,
            optimizer_step: 0,
            best_test_acc: f64::NEG_INFINITY,
            best_epoch: 0,
            settings,
            history: Vec::new(),
        }
    }

    /// Checks that a loaded state is one the training loop can have written: its version, at
    /// least one and at most `settings.epochs` finished epochs, one history row per epoch,
    /// `steps_per_epoch` optimizer steps per epoch, and the best epoch and accuracy the history
    /// shows. Anything else (an edited or foreign file) is an error naming the field.
    pub fn validate(&self, steps_per_epoch: u64) -> Result<()> {
        let e = self.epochs_done;
        // A state is written only after an epoch finished; 0 would restart over trained weights.
        ensure!(
            e >= 1,
            "epochs_done = 0, but a resume state is only written after a finished epoch"
        );
        ensure!(
            e <= self.settings.epochs,
            "epochs_done = {e} is more than the run's --epochs {}",
            self.settings.epochs
        );
        ensure!(
            self.history.len() == e,
            "the history has {} epochs, epochs_done = {e}",
            self.history.len()
        );
        for (i, m) in self.history.iter().enumerate() {
            ensure!(
                m.epoch == i + 1,
                "history row {} is epoch {}, expected {}",
                i + 1,
                m.epoch,
                i + 1
            );
            let values = [m.lr, m.train_loss, m.train_acc, m.test_loss, m.test_acc];
            ensure!(
                values.iter().all(|v| v.is_finite()),
                "history row {} holds a non-finite value",
                i + 1
            );
        }
        let want = e as u64 * steps_per_epoch;
        ensure!(
            self.optimizer_step == want,
            "optimizer_step = {}, but {e} epochs of {steps_per_epoch} steps make {want}",
            self.optimizer_step
        );
        // The loop keeps the first epoch with the highest test accuracy.
        let best = self
            .history
            .iter()
            .fold(&self.history[0], |b, m| if m.test_acc > b.test_acc { m } else { b });
        ensure!(
            self.best_epoch == best.epoch && self.best_test_acc == best.test_acc,
            "best_epoch = {} with best_test_acc = {}, but the history's best is epoch {} ({})",
            self.best_epoch,
            self.best_test_acc,
            best.epoch,
            best.test_acc
        );
        Ok(())
    }
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

/// Saves the resume checkpoint: variables, optimizer tensors, the lookahead's slow copies (empty
/// without lookahead) and the state.
pub fn save_resume(
    path: &Path,
    vars: &[(String, Tensor)],
    optim: &[(String, Tensor)],
    lookahead: &[(String, Tensor)],
    state: &TrainState,
) -> Result<()> {
    let mut all = vars.to_vec();
    all.extend(optim.iter().map(|(k, t)| (format!("{OPTIM_PREFIX}{k}"), t.clone())));
    all.extend(
        lookahead
            .iter()
            .map(|(k, t)| (format!("{LOOKAHEAD_PREFIX}{k}"), t.clone())),
    );
    let meta = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(state)?)]);
    save_tensors(path, &all, Some(meta))
}

/// A loaded resume checkpoint (its state's version checked, nothing else: see
/// [`TrainState::validate`] and [`ResumePoint::check_tensors`]).
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
    // The version first: another version's state may not even parse as this one.
    let value: serde_json::Value = serde_json::from_str(json).context("parsing the training state")?;
    let version = value.get("version").cloned();
    if version != Some(serde_json::Value::from(STATE_VERSION)) {
        bail!(
            "training state version {} is not supported (this build reads version {STATE_VERSION})",
            version.map_or("(none)".to_string(), |v| v.to_string())
        );
    }
    let state: TrainState = serde_json::from_value(value).context("parsing the training state")?;
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).context("loading the tensors")?;
    Ok(ResumePoint { state, tensors })
}

impl ResumePoint {
    /// Checks the tensors against the model's variables `vars`: exactly each variable, its
    /// optimizer state (AdamW's two moments `optim.m.<name>` and `optim.v.<name>`, SGD's buffer
    /// `optim.b.<name>`) and, where the state's settings have lookahead, its slow copy
    /// (`lookahead.<name>`), no other tensor, each with the variable's dtype and shape, all
    /// finite, and every second moment `v` non-negative (its square root is taken).
    pub fn check_tensors(&self, vars: &[(String, Var)]) -> Result<()> {
        let lookahead = self.state.settings.lookahead.is_some();
        let optimizer = self.state.settings.optimizer;
        let mut specs = Vec::with_capacity(4 * vars.len());
        for (name, var) in vars {
            let slow = lookahead.then(|| format!("{LOOKAHEAD_PREFIX}{name}"));
            let state = optimizer
                .state_names(name)
                .into_iter()
                .map(|k| format!("{OPTIM_PREFIX}{k}"));
            for n in std::iter::once(name.clone()).chain(state).chain(slow) {
                specs.push(model::TensorSpec {
                    name: n,
                    shape: var.dims().to_vec(),
                    dtype: var.dtype(),
                });
            }
        }
        model::check_tensors(&self.tensors, &specs, "")?;
        if optimizer != crate::optim::OptimizerKind::AdamW {
            return Ok(());
        }
        for (name, _) in vars {
            let key = format!("{OPTIM_PREFIX}v.{name}");
            let min = self.tensors[&key].to_dtype(DType::F32)?.flatten_all()?.min(0)?;
            let min = min.to_scalar::<f32>()?;
            ensure!(
                min >= 0.0,
                "optimizer state {key:?} holds {min}: a second moment is never negative"
            );
        }
        Ok(())
    }
}
