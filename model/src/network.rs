//! Every network of the crate behind one type per form, chosen by name on the command line and by
//! the `model` metadata in files: [`Network`] (training form, float checkpoints) and
//! [`PackedNetwork`] (inference form, packed files).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::layout::MODEL_NAME;
use crate::packed_file::check_format;
use crate::speedrun::{files_parse_config, SPEEDRUN_MODEL_NAME};
use crate::{
    Checkpoint, ComputeOptions, PackedSimpleBitCnn, PackedTernarySpeedrun, SimpleBitCnn, SimpleBitCnnConfig,
    TernarySpeedrun, TernarySpeedrunConfig,
};

/// A network and its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkConfig {
    /// The reference CNN ([`SimpleBitCnn`]).
    SimpleBitCnn(SimpleBitCnnConfig),
    /// The fully ternary speed-run CNN ([`TernarySpeedrun`]).
    TernarySpeedrun(TernarySpeedrunConfig),
}

impl NetworkConfig {
    /// The `model` metadata name of the network.
    pub fn model_name(&self) -> &'static str {
        match self {
            NetworkConfig::SimpleBitCnn(_) => MODEL_NAME,
            NetworkConfig::TernarySpeedrun(_) => SPEEDRUN_MODEL_NAME,
        }
    }

    /// One line for logs, e.g. `TernarySpeedrun widths [32, 64, 256, 256], stem ternary`.
    pub fn describe(&self) -> String {
        match self {
            NetworkConfig::SimpleBitCnn(c) => format!("SimpleBitCnn fc1={} fc2={}", c.fc1.as_str(), c.fc2.as_str()),
            NetworkConfig::TernarySpeedrun(c) => {
                let codes = match c.channel_codes {
                    true => ", per-channel block codes",
                    false => "",
                };
                format!("TernarySpeedrun widths {:?}, stem {}{codes}", c.widths, c.stem.as_str())
            }
        }
    }
}

/// The training form of either network.
#[derive(Debug, Clone)]
pub enum Network {
    /// The reference CNN.
    SimpleBitCnn(SimpleBitCnn),
    /// The fully ternary speed-run CNN (boxed: it holds many more layers).
    TernarySpeedrun(Box<TernarySpeedrun>),
}

impl Network {
    /// Builds the network of `config` with its variables under `vb`.
    pub fn new(config: NetworkConfig, options: ComputeOptions, vb: VarBuilder) -> Result<Self> {
        Ok(match config {
            NetworkConfig::SimpleBitCnn(c) => Network::SimpleBitCnn(SimpleBitCnn::with_options(c, options, vb)?),
            NetworkConfig::TernarySpeedrun(c) => {
                Network::TernarySpeedrun(Box::new(TernarySpeedrun::with_options(c, options, vb)?))
            }
        })
    }

    /// Validates a float checkpoint's bytes (its `model` and `model_config` metadata and exactly
    /// the tensors they need) and builds the network on `device`.
    pub fn from_checkpoint_bytes(bytes: &[u8], options: ComputeOptions, device: &Device) -> Result<Self> {
        let meta = read_metadata(bytes)?;
        Self::check_checkpoint_metadata(&meta)?;
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
        Self::from_checkpoint_parts(&meta, tensors, options, device)
    }

    /// The network of a float checkpoint read into its metadata and tensors (on the CPU): the
    /// `model` metadata picks the network, whose loader checks its configuration and tensors.
    pub fn from_checkpoint_parts(
        meta: &HashMap<String, String>,
        tensors: HashMap<String, Tensor>,
        options: ComputeOptions,
        device: &Device,
    ) -> Result<Self> {
        Self::check_checkpoint_metadata(meta)?;
        match meta.get("model").map(String::as_str) {
            Some(SPEEDRUN_MODEL_NAME) => {
                let Some(json) = meta.get("model_config") else {
                    bail!("no \"model_config\" metadata")
                };
                let config = files_parse_config(json)?;
                Ok(Network::TernarySpeedrun(Box::new(
                    TernarySpeedrun::from_checkpoint_tensors(config, tensors, options, device)?,
                )))
            }
            _ => Ok(Network::SimpleBitCnn(
                Checkpoint::from_parts(meta, tensors)?.into_model(options, device)?,
            )),
        }
    }

    fn check_checkpoint_metadata(meta: &HashMap<String, String>) -> Result<()> {
        if let Some(format) = meta.get("format") {
            bail!("format is {format:?}: a packed file, not a float checkpoint")
        }
        Ok(())
    }

    /// The network's configuration.
    pub fn config(&self) -> NetworkConfig {
        match self {
            Network::SimpleBitCnn(n) => NetworkConfig::SimpleBitCnn(n.config()),
            Network::TernarySpeedrun(n) => NetworkConfig::TernarySpeedrun(n.config()),
        }
    }

    /// The options it computes with.
    pub fn options(&self) -> ComputeOptions {
        match self {
            Network::SimpleBitCnn(n) => n.options(),
            Network::TernarySpeedrun(n) => n.options(),
        }
    }

    /// The forward in training (`train`: batch statistics, running ones updated) or inference
    /// mode. The reference CNN has no such state: both modes are the same for it.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Network::SimpleBitCnn(n) => n.forward(x),
            Network::TernarySpeedrun(n) => n.forward_t(x, train),
        }
    }

    /// [`TernarySpeedrun::recompute_batch_norm_statistics`]; an error for the reference CNN,
    /// which has no batch norms.
    pub fn recompute_batch_norm_statistics<I>(&mut self, batches: I) -> Result<usize>
    where
        I: IntoIterator<Item = Result<Tensor>>,
    {
        match self {
            Network::SimpleBitCnn(_) => {
                candle_core::bail!("SimpleBitCnn has no batch norms whose statistics could be recomputed")
            }
            Network::TernarySpeedrun(n) => n.recompute_batch_norm_statistics(batches),
        }
    }

    /// The metadata of its float checkpoint (`model`, `model_config`).
    pub fn checkpoint_metadata(&self) -> HashMap<String, String> {
        match self {
            Network::SimpleBitCnn(n) => crate::checkpoint_metadata(n.config()),
            Network::TernarySpeedrun(n) => n.checkpoint_metadata(),
        }
    }

    /// The inference form.
    pub fn to_packed(&self) -> Result<PackedNetwork> {
        Ok(match self {
            Network::SimpleBitCnn(n) => PackedNetwork::SimpleBitCnn(n.to_packed()?),
            Network::TernarySpeedrun(n) => PackedNetwork::TernarySpeedrun(Box::new(n.to_packed()?)),
        })
    }
}

impl Module for Network {
    /// Inference mode.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

/// The inference form of either network, as a packed file holds it.
#[derive(Debug, Clone)]
pub enum PackedNetwork {
    /// The reference CNN.
    SimpleBitCnn(PackedSimpleBitCnn),
    /// The fully ternary speed-run CNN (boxed: it holds many more layers).
    TernarySpeedrun(Box<PackedTernarySpeedrun>),
}

/// The `__metadata__` of a safetensors file's bytes.
pub fn read_metadata(bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, st) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| candle_core::Error::msg(format!("not a valid safetensors file: {e}")))?;
    Ok(st.metadata().clone().unwrap_or_default())
}

impl PackedNetwork {
    /// Loads a packed file's bytes onto `device`: the format and version are checked, the
    /// `model` metadata picks the network, whose loader checks every tensor.
    pub fn from_packed_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let meta = read_metadata(bytes)?;
        check_format(&meta)?;
        match meta.get("model").map(String::as_str) {
            Some(MODEL_NAME) => Ok(PackedNetwork::SimpleBitCnn(PackedSimpleBitCnn::from_packed_bytes(
                bytes, device,
            )?)),
            Some(SPEEDRUN_MODEL_NAME) => Ok(PackedNetwork::TernarySpeedrun(Box::new(
                PackedTernarySpeedrun::from_checked_bytes(bytes, &meta, device)?,
            ))),
            other => bail!("model is {other:?}, this build knows {MODEL_NAME:?} and {SPEEDRUN_MODEL_NAME:?}"),
        }
    }

    /// Loads a packed file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|e| candle_core::Error::msg(format!("reading {}: {e}", path.display())))?;
        Self::from_packed_bytes(&bytes, device).map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))
    }

    /// The network's configuration.
    pub fn config(&self) -> NetworkConfig {
        match self {
            PackedNetwork::SimpleBitCnn(n) => NetworkConfig::SimpleBitCnn(n.config()),
            PackedNetwork::TernarySpeedrun(n) => NetworkConfig::TernarySpeedrun(n.config()),
        }
    }

    /// Writes the packed file atomically, float tensors stored as `dtype`.
    pub fn save(&self, path: &Path, dtype: DType) -> Result<()> {
        match self {
            PackedNetwork::SimpleBitCnn(n) => n.save(path, dtype),
            PackedNetwork::TernarySpeedrun(n) => n.save(path, dtype),
        }
    }
}

impl Module for PackedNetwork {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            PackedNetwork::SimpleBitCnn(n) => n.forward(x),
            PackedNetwork::TernarySpeedrun(n) => n.forward(x),
        }
    }
}
