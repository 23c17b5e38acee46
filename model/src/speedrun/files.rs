//! The files of a [`TernarySpeedrun`]: the float checkpoint (every variable F32) and the packed
//! file (the `bitlinear-packed` format of [`crate::packed_file`], `model` = `TernarySpeedrun`).
//!
//! Packed tensors (`S` is the stored float dtype, the `float_dtype` metadata):
//!
//! | name | dtype, shape | what |
//! | --- | --- | --- |
//! | `L.weight.packed`, `L.weight.scale` | U8 `(N, ceil(K/4))`, F32 `(1,)` | every ternary conv and the head; K = c_in·3·3 (`kw` fastest) for a conv |
//! | `stem.bias` | S `(w0,)` | the stem's bias |
//! | `stem.weight` | S `(w0, 3, 3, 3)` | a float stem (ablation) instead of the packed one |
//! | `block{i}.norm{j}.{bias,running_mean,running_var}` | S `(C,)` | batch norms |
//! | `head.bias`, `head.norm.weight` | S `(10,)`, S `(w3,)` | the head's bias and RMSNorm gain |
//!
//! `model_config` is `{"widths":[w0,w1,w2,w3],"stem":"ternary"|"float","act_scaling":"per-image",
//! "block_codes":"per-tensor"|"per-channel"}` (`block_codes` absent: per-tensor, the files written
//! before it) and `L.in_features` records K of every packed layer, as for the reference network.
//! The packed codes are the same format either way; the key tells `export` how to round a float
//! checkpoint's block convolutions.

use std::collections::HashMap;
use std::path::Path;

use bitlinear::{BitLinearConfig, PackedBitConv2d, PackedBitLinear};
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::{
    block_conv_config, stem_config, BatchNorm2d, Block, PackedTernarySpeedrun, Stem, StemKind, TernarySpeedrun,
    TernarySpeedrunConfig,
};
use crate::layout::string_field;
use crate::packed_file::{packed_metadata, write_packed, NamedTensors};
use crate::validate::{check_tensors, TensorSpec};
use crate::{ComputeOptions, Conv, PoolKernel, NUM_CLASSES};

/// Value of the `model` metadata key of both files.
pub const SPEEDRUN_MODEL_NAME: &str = "TernarySpeedrun";

/// The `model_config` metadata.
pub(crate) fn config_json(c: TernarySpeedrunConfig) -> String {
    let [a, b, d, e] = c.widths;
    format!(
        r#"{{"widths":[{a},{b},{d},{e}],"stem":"{}","act_scaling":"per-image","block_codes":"{}"}}"#,
        c.stem.as_str(),
        match c.channel_codes {
            true => "per-channel",
            false => "per-tensor",
        }
    )
}

/// Parses [`config_json`]'s output.
pub(crate) fn parse_config(json: &str) -> Result<TernarySpeedrunConfig> {
    let key = r#""widths":["#;
    let Some(list) = json.find(key).map(|i| &json[i + key.len()..]) else {
        bail!("model_config {json:?} has no \"widths\" field")
    };
    let list = &list[..list.find(']').unwrap_or(list.len())];
    let widths: Vec<usize> = list
        .split(',')
        .map(|v| v.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| candle_core::Error::msg(format!("model_config {json:?}: widths: {e}")))?;
    let Ok(widths) = <[usize; 4]>::try_from(widths) else {
        bail!("model_config {json:?}: expected 4 widths")
    };
    let Some(stem) = string_field(json, "stem") else {
        bail!("model_config {json:?} has no \"stem\" field")
    };
    let stem = stem.parse::<StemKind>().map_err(candle_core::Error::msg)?;
    if !json.contains(r#""act_scaling":"per-image""#) {
        bail!("model_config {json:?}: only per-image activation scaling is supported")
    }
    let channel_codes = match string_field(json, "block_codes") {
        None | Some("per-tensor") => false,
        Some("per-channel") => true,
        Some(other) => bail!("model_config {json:?}: unknown block_codes {other:?}"),
    };
    let config = TernarySpeedrunConfig {
        widths,
        stem,
        channel_codes,
    };
    config.validate()?;
    Ok(config)
}

/// `(name, c_in, c_out)` of every block convolution.
fn block_convs(c: TernarySpeedrunConfig) -> Vec<(String, usize, usize)> {
    let w = c.widths;
    (1..=3)
        .flat_map(|i| {
            [
                (format!("block{i}.conv1"), w[i - 1], w[i]),
                (format!("block{i}.conv2"), w[i], w[i]),
            ]
        })
        .collect()
}

fn norm_specs(c: TernarySpeedrunConfig, float: DType, specs: &mut Vec<TensorSpec>) {
    for i in 1..=3 {
        for j in 1..=2 {
            for v in ["bias", "running_mean", "running_var"] {
                specs.push(TensorSpec::new(format!("block{i}.norm{j}.{v}"), &[c.widths[i]], float));
            }
        }
    }
}

fn packed_weight_specs(name: &str, n: usize, k: usize, specs: &mut Vec<TensorSpec>) {
    specs.push(TensorSpec::new(
        format!("{name}.weight.packed"),
        &[n, bitlinear::packed_len(k)],
        DType::U8,
    ));
    specs.push(TensorSpec::new(format!("{name}.weight.scale"), &[1], DType::F32));
}

/// The tensors of a float checkpoint of `config` (every variable, F32).
pub fn speedrun_checkpoint_specs(c: TernarySpeedrunConfig) -> Vec<TensorSpec> {
    let f = DType::F32;
    let [w0, .., w3] = c.widths;
    let mut specs = vec![
        TensorSpec::new("stem.weight", &[w0, 3, 3, 3], f),
        TensorSpec::new("stem.bias", &[w0], f),
    ];
    for (name, ci, co) in block_convs(c) {
        specs.push(TensorSpec::new(format!("{name}.weight"), &[co, ci, 3, 3], f));
    }
    norm_specs(c, f, &mut specs);
    specs.push(TensorSpec::new("head.weight", &[NUM_CLASSES, w3], f));
    specs.push(TensorSpec::new("head.bias", &[NUM_CLASSES], f));
    specs.push(TensorSpec::new("head.norm.weight", &[w3], f));
    specs
}

/// The tensors of a packed file of `config` whose float tensors are stored as `float`.
pub fn speedrun_packed_specs(c: TernarySpeedrunConfig, float: DType) -> Vec<TensorSpec> {
    let [w0, .., w3] = c.widths;
    let mut specs = vec![];
    match c.stem {
        StemKind::Ternary => packed_weight_specs("stem", w0, 27, &mut specs),
        StemKind::Float => specs.push(TensorSpec::new("stem.weight", &[w0, 3, 3, 3], float)),
    }
    specs.push(TensorSpec::new("stem.bias", &[w0], float));
    for (name, ci, co) in block_convs(c) {
        packed_weight_specs(&name, co, ci * 9, &mut specs);
    }
    norm_specs(c, float, &mut specs);
    packed_weight_specs("head", NUM_CLASSES, w3, &mut specs);
    specs.push(TensorSpec::new("head.bias", &[NUM_CLASSES], float));
    specs.push(TensorSpec::new("head.norm.weight", &[w3], float));
    specs
}

/// `in_features` of every packed layer, the metadata the packed file records.
fn packed_in_features(c: TernarySpeedrunConfig) -> Vec<(String, usize)> {
    let mut out = vec![];
    if c.stem == StemKind::Ternary {
        out.push(("stem".to_string(), 27));
    }
    out.extend(block_convs(c).into_iter().map(|(name, ci, _)| (name, ci * 9)));
    out.push(("head".to_string(), c.widths[3]));
    out
}

impl TernarySpeedrun {
    /// The metadata a float checkpoint of this network carries (`model`, `model_config`).
    pub fn checkpoint_metadata(&self) -> HashMap<String, String> {
        HashMap::from([
            ("model".to_string(), SPEEDRUN_MODEL_NAME.to_string()),
            ("model_config".to_string(), config_json(self.config)),
        ])
    }

    /// Builds the network from a float checkpoint's tensors (checked to be exactly
    /// [`speedrun_checkpoint_specs`] of `config`) on `device`.
    pub fn from_checkpoint_tensors(
        config: TernarySpeedrunConfig,
        tensors: HashMap<String, Tensor>,
        options: ComputeOptions,
        device: &Device,
    ) -> Result<Self> {
        check_tensors(
            &tensors,
            &speedrun_checkpoint_specs(config),
            " (float checkpoints hold F32)",
        )?;
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Self::with_options(config, options, VarBuilder::from_tensors(tensors, DType::F32, device))
    }
}

impl PackedTernarySpeedrun {
    /// The named tensors and metadata of the packed file; float tensors are stored as `dtype`.
    pub fn to_packed_tensors(&self, dtype: DType) -> Result<(NamedTensors, HashMap<String, String>)> {
        let mut meta = packed_metadata(SPEEDRUN_MODEL_NAME, config_json(self.config), dtype)?;
        let cpu = &Device::Cpu;
        for (name, k) in packed_in_features(self.config) {
            meta.insert(format!("{name}.in_features"), k.to_string());
        }
        let mut tensors = vec![];
        // Packed codes and their scales as they are; every other tensor in `dtype`.
        let mut push = |name: String, t: Tensor| -> Result<()> {
            let t = t.to_device(cpu)?;
            let t = if name.contains(".weight.") {
                t
            } else {
                t.to_dtype(dtype)?
            };
            tensors.push((name, t));
            Ok(())
        };
        match &self.stem {
            Stem::Ternary(c) => {
                for (k, t) in c.tensors()? {
                    push(format!("stem.{k}"), t)?;
                }
            }
            Stem::Float(c) => {
                push("stem.weight".into(), c.weight().clone())?;
                push("stem.bias".into(), c.bias().clone())?;
            }
        }
        for (i, block) in self.blocks.iter().enumerate() {
            for (j, conv, norm) in [(1, &block.conv1, &block.norm1), (2, &block.conv2, &block.norm2)] {
                for (k, t) in conv.tensors()? {
                    push(format!("block{}.conv{j}.{k}", i + 1), t)?;
                }
                let p = format!("block{}.norm{j}", i + 1);
                push(format!("{p}.bias"), norm.bias().clone())?;
                push(format!("{p}.running_mean"), norm.running_mean().clone())?;
                push(format!("{p}.running_var"), norm.running_var().clone())?;
            }
        }
        for (k, t) in self.head.tensors()? {
            push(format!("head.{k}"), t)?;
        }
        Ok((tensors, meta))
    }

    /// Writes the packed file with [`crate::write_atomic`]: a failure leaves no partial file.
    pub fn save(&self, path: &Path, dtype: DType) -> Result<()> {
        let (tensors, meta) = self.to_packed_tensors(dtype)?;
        write_packed(path, &tensors, meta)
    }

    /// Loads the network from a packed file's bytes whose metadata `meta` was already checked for
    /// the format and version (as [`crate::PackedNetwork::from_packed_bytes`] does): the tensors
    /// must be exactly [`speedrun_packed_specs`] of the recorded configuration and dtype.
    pub(crate) fn from_checked_bytes(bytes: &[u8], meta: &HashMap<String, String>, device: &Device) -> Result<Self> {
        let Some(json) = meta.get("model_config") else {
            bail!("no \"model_config\" metadata")
        };
        let config = parse_config(json)?;
        let float = crate::packed_file::parse_float_dtype(meta)?;
        for (name, k) in packed_in_features(config) {
            let stored = meta.get(&format!("{name}.in_features"));
            if stored.and_then(|v| v.parse::<usize>().ok()) != Some(k) {
                bail!("{name}.in_features is {stored:?}, the network needs {k}")
            }
        }
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
        let note = format!(" (float_dtype is {:?})", meta["float_dtype"]);
        check_tensors(&tensors, &speedrun_packed_specs(config, float), &note)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let [w0, w1, w2, w3] = config.widths;
        let stem = match config.stem {
            StemKind::Ternary => Stem::Ternary(PackedBitConv2d::load(
                3,
                w0,
                3,
                stem_config(ComputeOptions::default()),
                vb.pp("stem"),
            )?),
            StemKind::Float => Stem::Float(Conv::new(3, w0, 3, 1, vb.pp("stem"))?),
        };
        let block = |ci: usize, co: usize, vb: VarBuilder| -> Result<Block<PackedBitConv2d>> {
            let cfg = block_conv_config(ComputeOptions::default(), config.channel_codes);
            Ok(Block {
                conv1: PackedBitConv2d::load(ci, co, 3, cfg, vb.pp("conv1"))?,
                norm1: BatchNorm2d::new(co, vb.pp("norm1"))?,
                conv2: PackedBitConv2d::load(co, co, 3, cfg, vb.pp("conv2"))?,
                norm2: BatchNorm2d::new(co, vb.pp("norm2"))?,
            })
        };
        let blocks = [
            block(w0, w1, vb.pp("block1"))?,
            block(w1, w2, vb.pp("block2"))?,
            block(w2, w3, vb.pp("block3"))?,
        ];
        let head = PackedBitLinear::load(w3, NUM_CLASSES, BitLinearConfig::default(), vb.pp("head"))?;
        Ok(Self {
            stem,
            blocks,
            head,
            config,
            pool: PoolKernel::default(),
        })
    }
}
