//! Seeded initialisation of the model's variables.
//!
//! candle's CPU random generator cannot be seeded, so the variables created by the `VarBuilder`
//! are overwritten here from a ChaCha stream. The distributions are PyTorch's defaults for
//! `nn.Conv2d` / `nn.Linear` (the reference recipe was trained with them), which are smaller than
//! candle's Kaiming-normal defaults (those make the full-precision ablation diverge early):
//! - `*.norm.weight` (RMSNorm gains): 1;
//! - other `*.weight` (conv kernels, linear weights): uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in)]`
//!   (`kaiming_uniform_(a = sqrt(5))`), `fan_in = numel / shape[0]` (in features, or
//!   in channels x kernel area);
//! - `*.bias`: uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in)]` with the sibling weight's fan-in;
//! - batch norms (`*.bias` beside `*.running_mean`, no weight): shift 0, running mean 0, running
//!   variance 1, as PyTorch's `BatchNorm2d`.

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::rng::derive_seed;

/// Stream id of the initialisation RNG (epochs use their index).
const INIT_STREAM: u64 = u64::MAX;

/// The variables of `varmap`, sorted by name.
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock poisoned");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

fn uniform<R: Rng>(rng: &mut R, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-bound..bound) as f32).collect()
}

/// Re-initialises every variable of `varmap` from `seed` (deterministic, device independent).
pub fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    let vars = sorted_vars(varmap);
    let shapes: std::collections::HashMap<String, Vec<usize>> =
        vars.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    let mut rng = ChaCha8Rng::from_seed(derive_seed(seed, INIT_STREAM));
    for (name, var) in &vars {
        let dims = var.dims();
        let n = var.elem_count();
        let batch_norm = |prefix: &str| shapes.contains_key(&format!("{prefix}running_mean"));
        let values: Vec<f32> = if name.ends_with("norm.weight") || name.ends_with("running_var") {
            vec![1.0; n]
        } else if name.ends_with("running_mean") || name.strip_suffix("bias").is_some_and(batch_norm) {
            vec![0.0; n]
        } else if name.ends_with("weight") {
            if dims.len() < 2 {
                bail!("cannot initialise {name}: expected a weight of rank >= 2, got {dims:?}");
            }
            let fan_in = n / dims[0];
            uniform(&mut rng, n, 1.0 / (fan_in as f64).sqrt())
        } else if let Some(prefix) = name.strip_suffix("bias") {
            let w = format!("{prefix}weight");
            let shape = shapes
                .get(&w)
                .with_context(|| format!("cannot initialise {name}: no weight {w}"))?;
            // The weight's fan-in: in features, or in channels x kernel area.
            let fan_in = shape.iter().skip(1).product::<usize>().max(1);
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| rng.gen_range(-bound..bound) as f32).collect()
        } else {
            bail!("cannot initialise {name}: unknown kind of variable");
        };
        let t = Tensor::from_vec(values, dims, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}
