//! SGD with Nesterov momentum and checkpointable state (PyTorch's `torch.optim.SGD(momentum = m,
//! nesterov = True)` update rule, coupled weight decay, no dampening), as the speed-run nets
//! train.
//!
//! For each parameter `p` with gradient `g`, with momentum buffer `b` (zero at the start):
//! ```text
//! d <- g + wd p
//! b <- m b + d
//! p <- p - lr (d + m b)
//! ```
//! Batch-norm shifts (variables named `...norm*.bias`) take `lr · NORM_SHIFT_LR_SCALE` and
//! `wd / NORM_SHIFT_LR_SCALE`: a larger step, the same decay per step (`lr · wd`), as airbench
//! gives its batch-norm biases.

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Result, Tensor, Var};

/// Momentum of [`Sgd`] (airbench's 0.85).
pub const SGD_MOMENTUM: f64 = 0.85;

/// How much larger the learning rate of batch-norm shifts is (airbench's `bias_scaler`, 64).
pub const NORM_SHIFT_LR_SCALE: f64 = 64.0;

/// The default learning rate of SGD per image of the batch (the mean loss's rate is this times
/// the batch size): airbench's 10 "per 1024 examples" of a summed loss, divided by its
/// `1024 · (1 + 1 / (1 - momentum))`, the steady-state gain of Nesterov momentum.
pub const SGD_LR_PER_IMAGE: f64 = 10.0 / (1024.0 * (1.0 + 1.0 / (1.0 - SGD_MOMENTUM)));

/// The default weight decay of SGD (airbench's 0.015 per 1024 examples at its learning rate 10,
/// as a coupled decay on the mean loss: `0.015 / 10`).
pub const SGD_WEIGHT_DECAY: f64 = 1.5e-3;

/// SGD hyper-parameters; `lr` and `weight_decay` are the ones of every variable but the
/// batch-norm shifts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate (on the gradient of the batch's mean loss).
    pub lr: f64,
    /// Nesterov momentum in [0, 1).
    pub momentum: f64,
    /// Weight decay added to the gradient (`g + wd p`, PyTorch's `weight_decay`).
    pub weight_decay: f64,
}

/// Whether `name` is a batch-norm shift: the bias of a variable group named `norm...`.
pub fn is_norm_shift(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    parts.next() == Some("bias") && parts.next().is_some_and(|p| p.starts_with("norm"))
}

struct Slot {
    var: Var,
    buf: Var,
    /// The step-size multiplier: [`NORM_SHIFT_LR_SCALE`] for batch-norm shifts, else 1.
    lr_scale: f64,
}

/// SGD with Nesterov momentum over a set of named variables; the state (a momentum buffer per
/// variable, and the step count) can be exported and restored exactly.
pub struct Sgd {
    slots: BTreeMap<String, Slot>,
    step: u64,
    config: SgdConfig,
}

impl Sgd {
    /// Creates the optimizer with zero momentum buffers for each `(name, var)`.
    pub fn new(vars: impl IntoIterator<Item = (String, Var)>, config: SgdConfig) -> Result<Self> {
        if !(0.0..1.0).contains(&config.momentum) {
            candle_core::bail!("SGD momentum must be in [0, 1), got {}", config.momentum)
        }
        let mut slots = BTreeMap::new();
        for (name, var) in vars {
            let buf = Var::zeros(var.shape(), var.dtype(), var.device())?;
            let lr_scale = if is_norm_shift(&name) { NORM_SHIFT_LR_SCALE } else { 1.0 };
            slots.insert(name, Slot { var, buf, lr_scale });
        }
        Ok(Self { slots, step: 0, config })
    }

    /// Number of updates done so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> SgdConfig {
        self.config
    }

    /// Sets the learning rate used by the next steps (for schedules).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// One update from the gradients in `grads`. Variables without a gradient are left alone
    /// (their buffers do not move either).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for slot in self.slots.values() {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let p = slot.var.as_tensor();
            let (lr, wd) = (c.lr * slot.lr_scale, c.weight_decay / slot.lr_scale);
            let d = (g.to_dtype(p.dtype())? + (p * wd)?)?;
            let buf = ((slot.buf.as_tensor() * c.momentum)? + &d)?;
            let new = (p - ((d + (&buf * c.momentum)?)? * lr)?)?;
            slot.buf.set(&buf)?;
            slot.var.set(&new)?;
        }
        Ok(())
    }

    /// The momentum buffers as named tensors: `b.<name>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let buf = |(name, s): (&String, &Slot)| (format!("b.{name}"), s.buf.as_tensor().clone());
        self.slots.iter().map(buf).collect()
    }

    /// Restores the buffers (from [`Sgd::state_tensors`]'s names, looked up by `get`) and the
    /// step count. Each buffer must have its variable's dtype and shape exactly.
    pub fn load_state(&mut self, step: u64, mut get: impl FnMut(&str) -> Option<Tensor>) -> Result<()> {
        for (name, s) in &self.slots {
            crate::optim::restore_state_tensor(&format!("b.{name}"), &s.buf, &mut get)?;
        }
        self.step = step;
        Ok(())
    }
}
