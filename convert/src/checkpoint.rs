//! Float checkpoints written by `train` (`best.safetensors`, `last.safetensors`): the variables of
//! `model::SimpleBitCnn` under their own names.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use model::{FcKind, SimpleBitCnn, SimpleBitCnnConfig};

/// Which layers are BitLinear: those that have an RMSNorm gain (`fcN.norm.weight`).
pub fn infer_config(tensors: &HashMap<String, Tensor>) -> SimpleBitCnnConfig {
    let kind = |l: &str| match tensors.contains_key(&format!("{l}.norm.weight")) {
        true => FcKind::BitLinear,
        false => FcKind::Linear,
    };
    SimpleBitCnnConfig {
        fc1: kind("fc1"),
        fc2: kind("fc2"),
    }
}

/// Reads the checkpoint's tensors (as f32 on the CPU): [`tensors_from_bytes`] on the file's
/// bytes, errors naming the file.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    tensors_from_bytes(&bytes).with_context(|| format!("{} is not a usable float checkpoint", path.display()))
}

/// Parses the bytes of a float checkpoint into its tensors (as f32 on the CPU). A packed file is
/// an error.
pub fn tensors_from_bytes(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    if let Ok((_, st)) = safetensors::SafeTensors::read_metadata(bytes) {
        if st.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str) == Some(model::packed_file::FORMAT)
        {
            bail!("a packed file, not a float checkpoint")
        }
    }
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).context("not a valid safetensors file")?;
    tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<candle_core::Result<_>>()
        .map_err(Into::into)
}

/// Builds the training-form network from checkpoint tensors.
pub fn model_from_tensors(tensors: HashMap<String, Tensor>, device: &Device) -> Result<SimpleBitCnn> {
    let config = infer_config(&tensors);
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    SimpleBitCnn::new(config, vb).context("the checkpoint does not hold a SimpleBitCnn")
}

/// Loads a float checkpoint as the training-form network.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<SimpleBitCnn> {
    let tensors = read_tensors(path)?;
    model_from_tensors(tensors, device).with_context(|| format!("loading {}", path.display()))
}
