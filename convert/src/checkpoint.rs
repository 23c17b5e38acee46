//! Float checkpoints written by `train` (`best.safetensors`, `last.safetensors`): the variables of
//! a network and the network and configuration recorded with them ([`model::Network`]; for the
//! reference network also [`model::Checkpoint`]).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use model::{Checkpoint, ComputeOptions, Network, SimpleBitCnn};

/// Reads and validates a float checkpoint (tensors F32 on the CPU): the configuration comes from
/// its metadata, and every tensor must be exactly one that configuration needs.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Checkpoint::from_bytes(&bytes).with_context(|| format!("{} is not a usable float checkpoint", path.display()))
}

/// Builds the training-form network from a validated checkpoint.
pub fn model_from_checkpoint(checkpoint: Checkpoint, device: &Device) -> Result<SimpleBitCnn> {
    checkpoint
        .into_model(ComputeOptions::default(), device)
        .context("building the SimpleBitCnn")
}

/// Loads a float checkpoint as the training-form network.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<SimpleBitCnn> {
    model_from_checkpoint(read_checkpoint(path)?, device)
}

/// Loads a float checkpoint of any network: its `model` metadata picks it, and every tensor must
/// be exactly one its recorded configuration needs.
pub fn load_network(path: &Path, device: &Device) -> Result<Network> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Network::from_checkpoint_bytes(&bytes, ComputeOptions::default(), device)
        .with_context(|| format!("{} is not a usable float checkpoint", path.display()))
}
