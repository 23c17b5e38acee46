//! The packed 2-bit model file: a safetensors file from which [`PackedSimpleBitCnn`] is rebuilt
//! without any float weight of its BitLinear layers.
//!
//! Tensors (a BitLinear layer `L`, stored and read by [`bitlinear::PackedBitLinear::tensors`] and
//! [`bitlinear::PackedBitLinear::load`] under the prefix `L`; `S` is the stored float dtype, f32
//! unless chosen otherwise):
//!
//! | name | dtype, shape | what |
//! | --- | --- | --- |
//! | `L.weight.packed` | U8 `(N, ceil(K/4))` | [`bitlinear::PackedTernary`] bytes |
//! | `L.weight.scale` | F32 `(1,)` | absmean scale `s_w` |
//! | `L.bias`, `L.norm.weight` | S `(N,)`, S `(K,)` | bias, RMSNorm gain |
//! | `conv*.weight`, `conv*.bias` | S | convolutions, as in the checkpoint |
//! | plain Linear `L.weight`, `L.bias` | S | a full-precision layer (ablation configs) |
//!
//! `__metadata__` holds `format` = [`FORMAT`], `format_version` = [`FORMAT_VERSION`], the packing
//! order and code mapping in words, `model` = `SimpleBitCnn`, `model_config` (JSON: the kind of
//! each fully connected layer, the activation scaling), `float_dtype` (`f32`, `bf16` or `f16`:
//! the dtype `S` of every float tensor, exactly) and `L.in_features` for each BitLinear layer (K
//! cannot be recovered from the byte count alone).
//!
//! The complete format, with everything needed to run a file without this crate, is
//! `docs/format-simple-bit-cnn.md` in the repository.

use std::collections::HashMap;
use std::path::Path;

use bitlinear::{ActScaling, BitLinearConfig, PackedBitLinear};
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::layout::{config_json, fc_layers, packed_specs, parse_config, MODEL_NAME};
use crate::validate::check_tensors;
use crate::{Conv, FcKind, PackedFc, PackedSimpleBitCnn, PoolKernel, SimpleBitCnnConfig};

/// Value of the `format` metadata key.
pub const FORMAT: &str = "bitlinear-packed";
/// Value of the `format_version` metadata key; readers reject other versions.
pub const FORMAT_VERSION: u32 = 1;
/// Description of the byte layout, stored in the metadata for humans and other readers.
pub const PACKING: &str = "row-major (out_features, ceil(in_features/4)) bytes; 4 consecutive in-features per byte, least significant bits first; padding weights are 0";
/// Description of the 2-bit codes.
pub const CODE_MAPPING: &str = "code = w + 1: 0 -> -1, 1 -> 0, 2 -> +1, 3 invalid";

/// Tensors in file order, with their names.
pub type NamedTensors = Vec<(String, Tensor)>;

/// The metadata of a packed file, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedFileInfo {
    /// `format_version`.
    pub version: u32,
    /// The network's configuration.
    pub config: SimpleBitCnnConfig,
    /// The dtype of the float tensors (`float_dtype`): F32, BF16 or F16.
    pub float_dtype: DType,
    /// All `__metadata__` entries.
    pub metadata: HashMap<String, String>,
}

/// The float dtype recorded in the `float_dtype` metadata: `f32`, `bf16` or `f16`.
pub(crate) fn parse_float_dtype(metadata: &HashMap<String, String>) -> Result<DType> {
    match metadata.get("float_dtype").map(String::as_str) {
        Some("f32") => Ok(DType::F32),
        Some("bf16") => Ok(DType::BF16),
        Some("f16") => Ok(DType::F16),
        Some(other) => bail!("float_dtype {other:?} is not one of \"f32\", \"bf16\", \"f16\""),
        None => bail!("no \"float_dtype\" metadata"),
    }
}

/// The metadata every packed file carries: format, version, packing, code mapping, `model`,
/// `model_config` and `float_dtype` (which must be f32, bf16 or f16).
pub(crate) fn packed_metadata(model: &str, model_config: String, dtype: DType) -> Result<HashMap<String, String>> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        bail!("packed files store float tensors as f32, bf16 or f16, not {dtype:?}")
    }
    Ok(HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("packing".to_string(), PACKING.to_string()),
        ("code_mapping".to_string(), CODE_MAPPING.to_string()),
        ("model".to_string(), model.to_string()),
        ("model_config".to_string(), model_config),
        ("float_dtype".to_string(), format!("{dtype:?}").to_lowercase()),
    ]))
}

/// Writes a packed file with [`crate::write_atomic`]: a failure leaves no partial file behind.
pub(crate) fn write_packed(path: &Path, tensors: &NamedTensors, meta: HashMap<String, String>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
        .map_err(|e| candle_core::Error::msg(format!("serializing {}: {e}", path.display())))?;
    Ok(crate::write_atomic(path, &bytes)?)
}

/// Checks a packed file's `format` and `format_version` metadata.
pub(crate) fn check_format(metadata: &HashMap<String, String>) -> Result<()> {
    match metadata.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        Some(other) => bail!("format is {other:?}, expected {FORMAT:?}"),
        None => bail!("no \"format\" metadata: not a {FORMAT} file (a float checkpoint?)"),
    }
    let version = metadata.get("format_version").and_then(|v| v.parse::<u32>().ok());
    if version != Some(FORMAT_VERSION) {
        bail!(
            "format_version {:?} is not supported (this build reads version {FORMAT_VERSION})",
            metadata.get("format_version")
        )
    }
    Ok(())
}

impl PackedSimpleBitCnn {
    /// The configuration (kind of each fully connected layer).
    pub fn config(&self) -> SimpleBitCnnConfig {
        let kind = |f: &PackedFc| match f {
            PackedFc::Bit(_) => FcKind::BitLinear,
            PackedFc::Plain(_) => FcKind::Linear,
        };
        SimpleBitCnnConfig {
            fc1: kind(&self.fc1),
            fc2: kind(&self.fc2),
        }
    }

    /// The named tensors and metadata of the packed file; float tensors are stored as `dtype`.
    pub fn to_packed_tensors(&self, dtype: DType) -> Result<(NamedTensors, HashMap<String, String>)> {
        let mut meta = packed_metadata(MODEL_NAME, config_json(self.config()), dtype)?;
        let cpu = &Device::Cpu;
        let float = |t: &Tensor| t.to_device(cpu)?.to_dtype(dtype);
        let mut tensors = vec![];
        for (name, conv) in [("conv1", &self.conv1), ("conv2", &self.conv2)] {
            tensors.push((format!("{name}.weight"), float(conv.weight())?));
            tensors.push((format!("{name}.bias"), float(conv.bias())?));
        }
        for (name, fc) in [("fc1", &self.fc1), ("fc2", &self.fc2)] {
            match fc {
                PackedFc::Bit(l) => {
                    if l.act_scaling() != ActScaling::PerToken {
                        bail!("{name}: only per-token activation scaling can be stored")
                    }
                    if l.norm_gain().is_none() {
                        bail!("{name}: BitLinear without RMSNorm")
                    }
                    if l.bias().is_none() {
                        bail!("{name}: BitLinear without bias")
                    }
                    meta.insert(format!("{name}.in_features"), l.weight().in_features().to_string());
                    for (k, t) in l.tensors()? {
                        // The packed weight and its scale as they are; bias and gain in `dtype`.
                        let t = if k.starts_with("weight.") {
                            t.to_device(cpu)?
                        } else {
                            float(&t)?
                        };
                        tensors.push((format!("{name}.{k}"), t));
                    }
                }
                PackedFc::Plain(l) => {
                    tensors.push((format!("{name}.weight"), float(l.weight())?));
                    let Some(bias) = l.bias() else {
                        bail!("{name}: Linear without bias")
                    };
                    tensors.push((format!("{name}.bias"), float(bias)?));
                }
            }
        }
        Ok((tensors, meta))
    }

    /// Writes the packed file with [`crate::write_atomic`]: a failure leaves no partial file
    /// behind.
    pub fn save(&self, path: &Path, dtype: DType) -> Result<()> {
        let (tensors, meta) = self.to_packed_tensors(dtype)?;
        write_packed(path, &tensors, meta)
    }

    /// Reads a packed file's metadata and checks its format and version.
    pub fn read_info(bytes: &[u8]) -> Result<PackedFileInfo> {
        let metadata = crate::read_metadata(bytes)?;
        check_format(&metadata)?;
        let Some(json) = metadata.get("model_config") else {
            bail!("no \"model_config\" metadata")
        };
        if metadata.get("model").map(String::as_str) != Some(MODEL_NAME) {
            bail!("model is {:?}, this build knows {MODEL_NAME:?}", metadata.get("model"))
        }
        Ok(PackedFileInfo {
            version: FORMAT_VERSION,
            config: parse_config(json)?,
            float_dtype: parse_float_dtype(&metadata)?,
            metadata,
        })
    }

    /// Loads the inference network from a packed file's bytes onto `device`. The tensors must be
    /// exactly those of [`crate::layout::packed_specs`] for the recorded `model_config` and
    /// `float_dtype` (no unknown or missing name, exact dtypes and shapes, no NaN or infinity),
    /// and every packed code valid. Float tensors are widened to f32.
    pub fn from_packed_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let info = Self::read_info(bytes)?;
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
        let note = format!(" (float_dtype is {:?})", info.metadata["float_dtype"]);
        check_tensors(&tensors, &packed_specs(info.config, info.float_dtype), &note)?;
        // The layers read their own tensors (names, shapes, codes); floats become f32 on
        // `device`, as the training form holds them.
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let conv1 = Conv::new(3, 32, 3, 1, vb.pp("conv1"))?;
        let conv2 = Conv::new(32, 64, 3, 1, vb.pp("conv2"))?;
        let mut fcs = vec![];
        for (name, kind, k, n) in fc_layers(info.config) {
            fcs.push(match kind {
                FcKind::BitLinear => {
                    let stored_k = info.metadata.get(&format!("{name}.in_features"));
                    if stored_k.and_then(|v| v.parse::<usize>().ok()) != Some(k) {
                        bail!("{name}.in_features is {stored_k:?}, the network needs {k}")
                    }
                    PackedFc::Bit(PackedBitLinear::load(k, n, BitLinearConfig::default(), vb.pp(name))?)
                }
                FcKind::Linear => PackedFc::Plain(candle_nn::linear(k, n, vb.pp(name))?),
            });
        }
        let fc2 = fcs.pop().expect("two layers");
        let fc1 = fcs.pop().expect("two layers");
        Ok(Self {
            conv1,
            conv2,
            fc1,
            fc2,
            pool: PoolKernel::default(),
        })
    }

    /// Loads the inference network from a packed file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|e| candle_core::Error::msg(format!("reading {}: {e}", path.display())))?;
        Self::from_packed_bytes(&bytes, device).map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))
    }
}
