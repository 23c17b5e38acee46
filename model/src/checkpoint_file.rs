//! The float checkpoint: a safetensors file holding the variables of [`SimpleBitCnn`] (F32, the
//! names of the crate docs) and the configuration they belong to, recorded by the writer.
//!
//! `__metadata__` holds `model` = [`MODEL_NAME`] and `model_config`, the same JSON as the packed
//! file's (the kind of each fully connected layer). The configuration is never guessed from the
//! tensor names: a checkpoint whose tensors differ from what its recorded configuration needs
//! (an unknown name, a missing norm gain, another dtype, another shape, a NaN) is an error.

use std::collections::HashMap;

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::layout::{checkpoint_specs, config_json, parse_config, MODEL_NAME};
use crate::validate::check_tensors;
use crate::{ComputeOptions, SimpleBitCnn, SimpleBitCnnConfig};

/// The metadata a float checkpoint of `config` must carry (`model`, `model_config`); a writer
/// may add its own keys (e.g. `train` adds `epoch`).
///
/// ```
/// let meta = model::checkpoint_metadata(model::SimpleBitCnnConfig::bitlinear());
/// assert_eq!(meta["model"], "SimpleBitCnn");
/// assert_eq!(meta["model_config"], r#"{"fc1":"bitlinear","fc2":"bitlinear","act_scaling":"per-token"}"#);
/// ```
pub fn checkpoint_metadata(config: SimpleBitCnnConfig) -> HashMap<String, String> {
    HashMap::from([
        ("model".to_string(), MODEL_NAME.to_string()),
        ("model_config".to_string(), config_json(config)),
    ])
}

/// A float checkpoint's contents, validated: its recorded configuration and exactly the tensors
/// that configuration needs (F32, on the CPU, all finite).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The configuration recorded in the file.
    pub config: SimpleBitCnnConfig,
    /// The variables by name.
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Parses and validates a float checkpoint's bytes. A packed file, a file without a recorded
    /// configuration, and any tensor that differs from [`crate::layout::checkpoint_specs`] are
    /// errors that name the cause.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let metadata = crate::read_metadata(bytes)?;
        Self::check_metadata(&metadata)?;
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
        Self::from_parts(&metadata, tensors)
    }

    /// Validates a float checkpoint already read into its metadata and tensors (on the CPU), as
    /// [`Checkpoint::from_bytes`] does.
    pub fn from_parts(metadata: &HashMap<String, String>, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let config = Self::check_metadata(metadata)?;
        check_tensors(&tensors, &checkpoint_specs(config), " (float checkpoints hold F32)")?;
        Ok(Self { config, tensors })
    }

    /// The configuration recorded in a float checkpoint's metadata.
    fn check_metadata(metadata: &HashMap<String, String>) -> Result<SimpleBitCnnConfig> {
        if let Some(format) = metadata.get("format") {
            bail!("format is {format:?}: a packed file, not a float checkpoint")
        }
        if metadata.get("model").map(String::as_str) != Some(MODEL_NAME) {
            bail!(
                "model is {:?}, expected {MODEL_NAME:?} (a float checkpoint records its network in \
                 the \"model\" and \"model_config\" metadata; `train` writes them)",
                metadata.get("model")
            )
        }
        let Some(json) = metadata.get("model_config") else {
            bail!("no \"model_config\" metadata: the checkpoint does not record which layers are BitLinear")
        };
        parse_config(json)
    }

    /// Builds the training-form network on `device` with `options`.
    pub fn into_model(self, options: ComputeOptions, device: &Device) -> Result<SimpleBitCnn> {
        let tensors = self
            .tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        SimpleBitCnn::with_options(self.config, options, vb)
    }
}
