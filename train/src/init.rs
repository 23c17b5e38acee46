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
//!
//! With [`ConvInit::Dirac`] the first `min(c_out, c_in)` filters of every convolution kernel are
//! then replaced by the identity (PyTorch's `dirac_`, as the speed-run nets start their
//! convolutions): filter `o` is 1 at input channel `o`'s centre tap and 0 elsewhere, so each
//! layer starts by passing its input channels through. A ternary layer keeps such a filter as
//! one code +1 (its weight, 1, is far above the tensor's absmean).

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::rng::derive_seed;

/// How convolution kernels start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvInit {
    /// Every weight uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in)]`.
    #[default]
    Uniform,
    /// The uniform draw, then the first `min(c_out, c_in)` filters set to the identity.
    Dirac,
}

impl ConvInit {
    /// The name `--conv-init` takes.
    pub fn name(self) -> &'static str {
        match self {
            ConvInit::Uniform => "uniform",
            ConvInit::Dirac => "dirac",
        }
    }
}

/// Sets filters `0..min(c_out, c_in)` of the `(c_out, c_in, kh, kw)` kernel `w` to the identity:
/// 1 at `(o, o, kh / 2, kw / 2)`, 0 elsewhere in the filter.
fn dirac_filters(w: &mut [f32], dims: &[usize]) {
    let [c_out, c_in, kh, kw] = [dims[0], dims[1], dims[2], dims[3]];
    let filter = c_in * kh * kw;
    for o in 0..c_out.min(c_in) {
        let f = &mut w[o * filter..(o + 1) * filter];
        f.fill(0.0);
        f[(o * kh + kh / 2) * kw + kw / 2] = 1.0;
    }
}

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

/// Re-initialises every variable of `varmap` from `seed` (deterministic, device independent),
/// convolution kernels as `conv_init` says (the uniform draw is the same either way).
pub fn seeded_init(varmap: &VarMap, seed: u64, conv_init: ConvInit) -> Result<()> {
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
            let mut w = uniform(&mut rng, n, 1.0 / (fan_in as f64).sqrt());
            if conv_init == ConvInit::Dirac && dims.len() == 4 {
                dirac_filters(&mut w, dims);
            }
            w
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
