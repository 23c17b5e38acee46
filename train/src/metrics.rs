//! Per-epoch metrics, `metrics.csv` and the final JSON summary.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// What one epoch measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Learning rate of the epoch's last update.
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    /// Wall time of the epoch: training plus evaluation plus checkpointing.
    pub epoch_seconds: f64,
    /// Wall time of the training pass alone.
    pub train_seconds: f64,
    /// Training images per second of the training pass.
    pub images_per_sec: f64,
}

const HEADER: &str = "epoch,lr,train_loss,train_acc,test_loss,test_acc,epoch_seconds,train_seconds,images_per_sec";

/// The CSV text of a history (header + one row per epoch).
pub fn to_csv(history: &[EpochMetrics]) -> String {
    let mut s = String::from(HEADER);
    s.push('\n');
    for m in history {
        s.push_str(&format!(
            "{},{:e},{:.6},{:.6},{:.6},{:.6},{:.3},{:.3},{:.1}\n",
            m.epoch,
            m.lr,
            m.train_loss,
            m.train_acc,
            m.test_loss,
            m.test_acc,
            m.epoch_seconds,
            m.train_seconds,
            m.images_per_sec
        ));
    }
    s
}

/// Rewrites `metrics.csv` atomically from the whole history.
pub fn write_csv(path: &Path, history: &[EpochMetrics]) -> Result<()> {
    Ok(model::write_atomic(path, to_csv(history).as_bytes())?)
}

/// Steady throughput: the mean images/s of the epochs after the first (which pays warm-up
/// costs); the first epoch's when there is only one.
pub fn steady_images_per_sec(history: &[EpochMetrics]) -> f64 {
    let steady = if history.len() > 1 { &history[1..] } else { history };
    if steady.is_empty() {
        return 0.0;
    }
    steady.iter().map(|m| m.images_per_sec).sum::<f64>() / steady.len() as f64
}

/// The last line the program prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub final_test_acc: f64,
    pub best_test_acc: f64,
    /// Test accuracy of the packed inference form after the last epoch.
    pub packed_test_acc: f64,
    /// The same with test-time augmentation (`--tta`: mean logits over the mirror and
    /// one-pixel shifts), when asked for.
    pub tta_test_acc: Option<f64>,
    /// Seconds spent in training passes (every epoch's, without evaluation and checkpoints).
    pub train_seconds: f64,
    pub best_epoch: usize,
    pub epochs: usize,
    pub total_seconds: f64,
    pub steady_images_per_sec: f64,
    pub device: String,
    pub dtype: String,
    pub out_dir: String,
}
