//! AdamW with checkpointable state (PyTorch's `torch.optim.AdamW` update rule), the choice
//! between it and [`crate::sgd::Sgd`] ([`Optimizer`]), and the learning-rate schedules.
//!
//! For each parameter `p` with gradient `g`, at step `t` (1-based):
//! ```text
//! p <- p * (1 - lr * wd)                 (decoupled weight decay)
//! m <- b1 m + (1 - b1) g
//! v <- b2 v + (1 - b2) g^2
//! p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! ```
//! Weight decay applies to every parameter (as `AdamW(model.parameters())` does).
//!
//! With the `cuda` feature, f32 variables on a CUDA device are updated in place by one fused
//! kernel launch each (`crate::cuda::adamw_step`, same formula and operation order) unless
//! [`AdamW::set_fused_cuda`] turned that off; elsewhere the update is made of tensor ops.

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Result, Tensor, Var};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    var: Var,
    m: Var,
    v: Var,
}

/// AdamW over a set of named variables; the state (m, v per variable, and the step count) can be
/// exported and restored exactly.
pub struct AdamW {
    slots: BTreeMap<String, Slot>,
    step: u64,
    config: AdamWConfig,
    fused_cuda: bool,
}

impl AdamW {
    /// Creates the optimizer with zero moments for each `(name, var)`.
    pub fn new(vars: impl IntoIterator<Item = (String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut slots = BTreeMap::new();
        for (name, var) in vars {
            let m = Var::zeros(var.shape(), var.dtype(), var.device())?;
            let v = Var::zeros(var.shape(), var.dtype(), var.device())?;
            slots.insert(name, Slot { var, m, v });
        }
        Ok(Self {
            slots,
            step: 0,
            config,
            fused_cuda: true,
        })
    }

    /// Whether f32 variables on a CUDA device are updated by the fused kernel (the default) or by
    /// tensor ops ([`crate::tuning::CudaTuning::fused_adamw`]). No effect elsewhere.
    pub fn set_fused_cuda(&mut self, on: bool) {
        self.fused_cuda = on;
    }

    /// Number of updates done so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// Sets the learning rate used by the next steps (for schedules).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// One update from the gradients in `grads`. Variables without a gradient are left alone
    /// (their moments do not move either).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for slot in self.slots.values() {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            #[cfg(feature = "cuda")]
            if slot.var.device().is_cuda()
                && slot.var.dtype() == candle_core::DType::F32
                && g.dtype() == candle_core::DType::F32
                && self.fused_cuda
            {
                crate::cuda::adamw_step(
                    slot.var.as_tensor(),
                    slot.m.as_tensor(),
                    slot.v.as_tensor(),
                    g,
                    &c,
                    bc1,
                    bc2,
                )?;
                continue;
            }
            let g = g.to_dtype(slot.var.dtype())?;
            let m = ((slot.m.as_tensor() * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((slot.v.as_tensor() * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let decayed = (slot.var.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let new = (decayed - (update * c.lr)?)?;
            slot.m.set(&m)?;
            slot.v.set(&v)?;
            slot.var.set(&new)?;
        }
        Ok(())
    }

    /// The moments as named tensors: `m.<name>` and `v.<name>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for (name, s) in &self.slots {
            out.push((format!("m.{name}"), s.m.as_tensor().clone()));
            out.push((format!("v.{name}"), s.v.as_tensor().clone()));
        }
        out
    }

    /// Restores the moments (from [`AdamW::state_tensors`]'s names, looked up by `get`) and the
    /// step count. Each moment must have its variable's dtype and shape exactly (never
    /// converted: integer data relabelled as floats is an error).
    pub fn load_state(&mut self, step: u64, mut get: impl FnMut(&str) -> Option<Tensor>) -> Result<()> {
        for (name, s) in &self.slots {
            for (key, var) in [(format!("m.{name}"), &s.m), (format!("v.{name}"), &s.v)] {
                restore_state_tensor(&key, var, &mut get)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Sets the optimizer state `var` from `get(key)`, which must have `var`'s dtype and shape
/// exactly (never converted: integer data relabelled as floats is an error).
pub(crate) fn restore_state_tensor(key: &str, var: &Var, get: &mut impl FnMut(&str) -> Option<Tensor>) -> Result<()> {
    let t = get(key).ok_or_else(|| candle_core::Error::Msg(format!("optimizer state {key} missing in checkpoint")))?;
    if t.shape() != var.shape() || t.dtype() != var.dtype() {
        candle_core::bail!(
            "optimizer state {key} is {:?} {:?}, expected {:?} {:?}",
            t.dtype(),
            t.shape(),
            var.dtype(),
            var.shape()
        );
    }
    var.set(&t.to_device(var.device())?)
}

/// Learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The base learning rate throughout.
    Constant,
    /// Cosine decay from the base rate at step 0 to 0 at the last step, per step.
    Cosine,
    /// Linear rise from `base / warmup` to the base rate over the first [`WARMUP_FRACTION`] of the
    /// steps, then linear decay to 0 at the last step (the speed-run nets' triangle).
    WarmupLinear,
}

/// Share of the steps [`Schedule::WarmupLinear`] spends rising.
pub const WARMUP_FRACTION: f64 = 0.2;

impl Schedule {
    /// Learning rate for update number `step` (0-based) of `total_steps`.
    pub fn lr(self, base: f64, step: u64, total_steps: u64) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Cosine => {
                if total_steps == 0 {
                    return base;
                }
                let progress = (step.min(total_steps) as f64) / total_steps as f64;
                0.5 * base * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::WarmupLinear => {
                let warmup = ((total_steps as f64 * WARMUP_FRACTION).round() as u64).max(1);
                if step < warmup {
                    base * (step + 1) as f64 / warmup as f64
                } else {
                    let left = total_steps.saturating_sub(step) as f64;
                    base * left / total_steps.saturating_sub(warmup).max(1) as f64
                }
            }
        }
    }
}

/// Which optimizer a recipe trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// [`AdamW`]: `lr` and `weight_decay` are its (decoupled) ones.
    #[default]
    AdamW,
    /// [`Sgd`] with Nesterov momentum [`crate::sgd::SGD_MOMENTUM`]: `lr` on the batch's mean
    /// loss, `weight_decay` added to the gradient.
    Sgd,
}

impl OptimizerKind {
    /// `"AdamW"` or `"SGD"`, as the log names them.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "AdamW",
            OptimizerKind::Sgd => "SGD",
        }
    }

    /// The names of the state tensors this optimizer keeps for the variable `var`.
    pub fn state_names(self, var: &str) -> Vec<String> {
        match self {
            OptimizerKind::AdamW => vec![format!("m.{var}"), format!("v.{var}")],
            OptimizerKind::Sgd => vec![format!("b.{var}")],
        }
    }
}

/// The optimizer of a run: one of the kinds [`OptimizerKind`] names.
pub enum Optimizer {
    /// [`OptimizerKind::AdamW`].
    AdamW(AdamW),
    /// [`OptimizerKind::Sgd`].
    Sgd(crate::sgd::Sgd),
}

impl Optimizer {
    /// `kind` over the named variables with the given (peak) learning rate and weight decay;
    /// `fused_cuda` as [`AdamW::set_fused_cuda`] (AdamW only).
    pub fn new(
        kind: OptimizerKind,
        vars: impl IntoIterator<Item = (String, Var)>,
        lr: f64,
        weight_decay: f64,
        fused_cuda: bool,
    ) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::AdamW => {
                let config = AdamWConfig {
                    lr,
                    weight_decay,
                    ..Default::default()
                };
                let mut opt = AdamW::new(vars, config)?;
                opt.set_fused_cuda(fused_cuda);
                Optimizer::AdamW(opt)
            }
            OptimizerKind::Sgd => {
                let config = crate::sgd::SgdConfig {
                    lr,
                    momentum: crate::sgd::SGD_MOMENTUM,
                    weight_decay,
                };
                Optimizer::Sgd(crate::sgd::Sgd::new(vars, config)?)
            }
        })
    }

    /// Number of updates done so far.
    pub fn step_count(&self) -> u64 {
        match self {
            Optimizer::AdamW(o) => o.step_count(),
            Optimizer::Sgd(o) => o.step_count(),
        }
    }

    /// Sets the learning rate used by the next steps (for schedules).
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Optimizer::AdamW(o) => o.set_lr(lr),
            Optimizer::Sgd(o) => o.set_lr(lr),
        }
    }

    /// One update from the gradients in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.step(grads),
            Optimizer::Sgd(o) => o.step(grads),
        }
    }

    /// The state as named tensors ([`OptimizerKind::state_names`] of each variable).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        match self {
            Optimizer::AdamW(o) => o.state_tensors(),
            Optimizer::Sgd(o) => o.state_tensors(),
        }
    }

    /// Restores the state tensors (looked up by `get`) and the step count.
    pub fn load_state(&mut self, step: u64, get: impl FnMut(&str) -> Option<Tensor>) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.load_state(step, get),
            Optimizer::Sgd(o) => o.load_state(step, get),
        }
    }
}
