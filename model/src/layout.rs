//! What the model files hold for a [`SimpleBitCnnConfig`]: the `model_config` metadata (JSON) and
//! the exact tensors of the float checkpoint and of the packed file. Both loaders check their
//! file against these lists ([`crate::validate::check_tensors`]); the writers produce exactly
//! them.

use candle_core::{bail, DType, Result};

use crate::validate::TensorSpec;
use crate::{FcKind, SimpleBitCnnConfig, FLAT_FEATURES, HIDDEN, NUM_CLASSES};

/// Value of the `model` metadata key of both files.
pub const MODEL_NAME: &str = "SimpleBitCnn";

/// The fully connected layers: name, kind, in and out features.
pub(crate) fn fc_layers(config: SimpleBitCnnConfig) -> [(&'static str, FcKind, usize, usize); 2] {
    [
        ("fc1", config.fc1, FLAT_FEATURES, HIDDEN),
        ("fc2", config.fc2, HIDDEN, NUM_CLASSES),
    ]
}

/// The `model_config` metadata: `{"fc1":"bitlinear","fc2":"linear","act_scaling":"per-token"}`.
pub(crate) fn config_json(config: SimpleBitCnnConfig) -> String {
    format!(
        r#"{{"fc1":"{}","fc2":"{}","act_scaling":"per-token"}}"#,
        config.fc1.as_str(),
        config.fc2.as_str()
    )
}

/// The value of the string field `name` of a `model_config` (`"name":"value"`), if it has one:
/// the models' configs are tiny fixed schemas, read without pulling a JSON parser in.
pub(crate) fn string_field<'a>(json: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\":\"");
    let start = json.find(&key)? + key.len();
    let end = json[start..].find('"').map_or(json.len(), |e| start + e);
    Some(&json[start..end])
}

/// Parses [`config_json`]'s output.
pub(crate) fn parse_config(json: &str) -> Result<SimpleBitCnnConfig> {
    let field = |name: &str| -> Result<FcKind> {
        let Some(value) = string_field(json, name) else {
            bail!("model_config {json:?} has no {name:?} field")
        };
        value.parse::<FcKind>().map_err(candle_core::Error::msg)
    };
    if !json.contains(r#""act_scaling":"per-token""#) {
        bail!("model_config {json:?}: only per-token activation scaling is supported")
    }
    Ok(SimpleBitCnnConfig {
        fc1: field("fc1")?,
        fc2: field("fc2")?,
    })
}

/// The two convolutions, stored as `dtype` in both files.
fn conv_specs(dtype: DType) -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("conv1.weight", &[32, 3, 3, 3], dtype),
        TensorSpec::new("conv1.bias", &[32], dtype),
        TensorSpec::new("conv2.weight", &[64, 32, 3, 3], dtype),
        TensorSpec::new("conv2.bias", &[64], dtype),
    ]
}

/// The tensors of a float checkpoint of `config`: every variable of [`crate::SimpleBitCnn`],
/// F32 (the training's master weights).
pub fn checkpoint_specs(config: SimpleBitCnnConfig) -> Vec<TensorSpec> {
    let f = DType::F32;
    let mut specs = conv_specs(f);
    for (name, kind, k, n) in fc_layers(config) {
        specs.push(TensorSpec::new(format!("{name}.weight"), &[n, k], f));
        specs.push(TensorSpec::new(format!("{name}.bias"), &[n], f));
        if kind == FcKind::BitLinear {
            specs.push(TensorSpec::new(format!("{name}.norm.weight"), &[k], f));
        }
    }
    specs
}

/// The tensors of a packed file of `config` whose float tensors are stored as `float` (the
/// `float_dtype` metadata): packed codes U8, their scales F32, everything else `float`.
pub fn packed_specs(config: SimpleBitCnnConfig, float: DType) -> Vec<TensorSpec> {
    let mut specs = conv_specs(float);
    for (name, kind, k, n) in fc_layers(config) {
        match kind {
            FcKind::BitLinear => {
                specs.push(TensorSpec::new(
                    format!("{name}.weight.packed"),
                    &[n, bitlinear::packed_len(k)],
                    DType::U8,
                ));
                specs.push(TensorSpec::new(format!("{name}.weight.scale"), &[1], DType::F32));
                specs.push(TensorSpec::new(format!("{name}.bias"), &[n], float));
                specs.push(TensorSpec::new(format!("{name}.norm.weight"), &[k], float));
            }
            FcKind::Linear => {
                specs.push(TensorSpec::new(format!("{name}.weight"), &[n, k], float));
                specs.push(TensorSpec::new(format!("{name}.bias"), &[n], float));
            }
        }
    }
    specs
}
