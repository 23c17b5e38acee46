//! Lookahead weight averaging, as the CIFAR-10 speed-run nets train with it.
//!
//! A slow copy of every variable starts equal to it. Every [`LookaheadConfig::every`] optimizer
//! steps the slow copy moves towards the trained variable and the variable restarts from it:
//! ```text
//! slow <- d · slow + (1 - d) · fast
//! fast <- slow
//! d     = RATE_PER_STEP^every · (step / total_steps)^3
//! ```
//! Early in training `d` is near 0 and the slow copy follows the weights; towards the end it
//! averages the last few hundred steps, which smooths the ternary codes' flips across their
//! thresholds. After the last step the variables take the slow copy (the steps since the last
//! update are dropped, as the speed-run nets do).
//!
//! Every variable of the model takes part, the batch norms' running statistics included (the
//! speed-run nets average their whole state dict), so the averaged weights are evaluated with
//! averaged statistics.

use candle_core::{Result, Tensor, Var};

/// The decay per optimizer step at the end of training: `d` reaches `RATE_PER_STEP^every`.
pub const RATE_PER_STEP: f64 = 0.95;

/// When the slow copy is updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LookaheadConfig {
    /// Optimizer steps between two updates (>= 1).
    pub every: u64,
}

impl LookaheadConfig {
    /// The speed-run nets' setting, both recipes': an update every 5 steps.
    pub const EVERY_5: LookaheadConfig = LookaheadConfig { every: 5 };

    /// The weight `d` of the slow copy in the update after optimizer step `step` (1-based) of
    /// `total_steps`.
    pub fn decay(self, step: u64, total_steps: u64) -> f64 {
        let progress = step.min(total_steps) as f64 / total_steps.max(1) as f64;
        RATE_PER_STEP.powf(self.every as f64) * progress.powi(3)
    }
}

struct Slot {
    name: String,
    fast: Var,
    slow: Tensor,
}

/// The slow copies of a set of named variables.
pub struct Lookahead {
    config: LookaheadConfig,
    slots: Vec<Slot>,
}

impl Lookahead {
    /// Slow copies equal to the variables `vars` now.
    pub fn new(vars: impl IntoIterator<Item = (String, Var)>, config: LookaheadConfig) -> Result<Self> {
        if config.every == 0 {
            candle_core::bail!("lookahead: an update every 0 steps is not a schedule (use >= 1)")
        }
        let slots = vars
            .into_iter()
            .map(|(name, fast)| {
                let slow = fast.as_tensor().copy()?;
                Ok(Slot { name, fast, slow })
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, slots })
    }

    /// Call after optimizer step `step` (1-based) of `total_steps`: updates on every
    /// `every`-th step, and after the last step sets the variables to their slow copies.
    pub fn after_step(&mut self, step: u64, total_steps: u64) -> Result<()> {
        if step.is_multiple_of(self.config.every) {
            let d = self.config.decay(step, total_steps);
            for s in &mut self.slots {
                let fast = s.fast.as_tensor();
                let slow = ((&s.slow * d)? + (fast * (1.0 - d))?)?;
                s.fast.set(&slow)?;
                s.slow = slow;
            }
        }
        if step >= total_steps {
            for s in &self.slots {
                s.fast.set(&s.slow)?;
            }
        }
        Ok(())
    }

    /// The slow copies, named by their variables.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots.iter().map(|s| (s.name.clone(), s.slow.clone())).collect()
    }

    /// Restores the slow copies from [`Lookahead::state_tensors`]'s names, looked up by `get`;
    /// each must have its variable's dtype and shape exactly.
    pub fn load_state(&mut self, mut get: impl FnMut(&str) -> Option<Tensor>) -> Result<()> {
        // Every copy is checked before any is replaced: an error leaves the state as it was.
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let t = get(&s.name).ok_or_else(|| {
                candle_core::Error::Msg(format!("lookahead copy of {} missing in checkpoint", s.name))
            })?;
            if t.shape() != s.fast.shape() || t.dtype() != s.fast.dtype() {
                candle_core::bail!(
                    "lookahead copy of {} is {:?} {:?}, expected {:?} {:?}",
                    s.name,
                    t.dtype(),
                    t.shape(),
                    s.fast.dtype(),
                    s.fast.shape()
                );
            }
            loaded.push(t.to_device(s.fast.device())?);
        }
        for (s, t) in self.slots.iter_mut().zip(loaded) {
            s.slow = t;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::Rng;

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Against a plain f64 replay of the rule, over fresh random weights and "optimizer steps".
    #[test]
    fn follows_the_rule_and_ends_on_the_slow_copy() -> Result<()> {
        let mut rng = rand::thread_rng();
        let dev = Device::Cpu;
        let n = 7;
        let init: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let var = Var::from_vec(init.clone(), n, &dev)?;
        let config = LookaheadConfig { every: 3 };
        let total = 11;
        let mut la = Lookahead::new([("w".to_string(), var.clone())], config)?;
        let mut fast: Vec<f64> = init.iter().map(|&v| v as f64).collect();
        let mut slow = fast.clone();
        for step in 1..=total {
            // An "optimizer step": a random move of every weight.
            let delta: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.1..0.1)).collect();
            let moved: Vec<f32> = values(&var).iter().zip(&delta).map(|(a, b)| a + b).collect();
            var.set(&Tensor::from_vec(moved.clone(), n, &dev)?)?;
            fast = moved.iter().map(|&v| v as f64).collect();
            la.after_step(step, total)?;
            if step.is_multiple_of(3) {
                let d = RATE_PER_STEP.powi(3) * (step as f64 / total as f64).powi(3);
                for (s, f) in slow.iter_mut().zip(&mut fast) {
                    *s = d * *s + (1.0 - d) * *f;
                    *f = *s;
                }
            }
            if step == total {
                fast.clone_from(&slow);
            }
            for (got, want) in values(&var).iter().zip(&fast) {
                assert!((*got as f64 - want).abs() < 1e-5, "step {step}: {got} vs {want}");
            }
        }
        // The last update was at step 9: the variable ends there, steps 10-11 dropped.
        let slow_t: Vec<f32> = la.state_tensors()[0].1.to_vec1()?;
        assert_eq!(slow_t, values(&var));
        Ok(())
    }

    #[test]
    fn decay_grows_to_the_rate_and_state_round_trips() -> Result<()> {
        let c = LookaheadConfig::EVERY_5;
        assert_eq!(c.decay(0, 100), 0.0);
        assert!((c.decay(100, 100) - 0.95f64.powi(5)).abs() < 1e-15);
        assert!((c.decay(50, 100) - 0.95f64.powi(5) / 8.0).abs() < 1e-15);
        let dev = Device::Cpu;
        let var = Var::from_vec(vec![1f32, 2.0], 2, &dev)?;
        assert!(Lookahead::new([("w".to_string(), var.clone())], LookaheadConfig { every: 0 }).is_err());
        let mut la = Lookahead::new([("w".to_string(), var.clone())], c)?;
        let saved = Tensor::new(&[5f32, 6.0], &dev)?;
        la.load_state(|k| (k == "w").then(|| saved.clone()))?;
        assert_eq!(la.state_tensors()[0].1.to_vec1::<f32>()?, vec![5.0, 6.0]);
        // Wrong shape, wrong dtype, missing: errors, the copy unchanged.
        assert!(la.load_state(|_| Some(Tensor::new(&[1f32], &dev).unwrap())).is_err());
        assert!(la
            .load_state(|_| Some(Tensor::new(&[1f64, 2.0], &dev).unwrap()))
            .is_err());
        assert!(la.load_state(|_| None).is_err());
        assert_eq!(la.state_tensors()[0].1.to_vec1::<f32>()?, vec![5.0, 6.0]);
        Ok(())
    }
}
