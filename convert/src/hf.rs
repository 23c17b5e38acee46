//! `import-hf` and `export-hf`: Hugging Face transformers BitNet checkpoints to and from our packed
//! file, layer by layer (see [`bitlinear::interop::hf_bitnet`] for the tensor layout).
//!
//! A BitLinear layer `L` of a transformers checkpoint is the pair `L.weight` (U8
//! `(ceil(N/4), K)`, packed; or, for `AutoBitLinear` in offline mode, a float `(N, K)` holding
//! -1/0/1) and `L.weight_scale`. It becomes our `L.weight.packed`, `L.weight.scale` and the
//! metadata `L.in_features`; every other tensor is copied as stored (dtype and bytes). The
//! checkpoint's `config.json` is kept in the `model_config` metadata (the same JSON value, written
//! compactly), its first architecture in `model`.
//!
//! Exactness: codes are exact both ways. The scale is exact both ways with the `multiply`
//! convention; with `divide` (transformers' `BitLinear`, `weight_scale = 1/s_w`), `export-hf`
//! also records our f32 scale in the file's metadata (`bitlinear.L.scale`), which `import-hf`
//! uses when it is consistent with `weight_scale`, so our files round-trip bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bitlinear::interop::hf_bitnet::{from_hf, hf_rows, scale_to_hf, ternary_from_floats, to_hf, ScaleConvention};
use candle_core::Device;
use safetensors::Dtype;

use crate::raw::{self, Converted, RawTensor, RawTensors};

/// Which transformers class the checkpoint is for (`quantization_config.linear_class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearClass {
    /// `BitLinear`: `weight_scale` divides the output.
    BitLinear,
    /// `AutoBitLinear` (offline): `weight_scale` multiplies the output.
    AutoBitLinear,
}

impl LinearClass {
    fn convention(self) -> ScaleConvention {
        match self {
            Self::BitLinear => ScaleConvention::Divide,
            Self::AutoBitLinear => ScaleConvention::Multiply,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::BitLinear => "bitlinear",
            Self::AutoBitLinear => "autobitlinear",
        }
    }
}

/// What `import-hf` did.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportReport {
    /// BitLinear layers converted.
    pub layers: usize,
    /// Other tensors copied.
    pub copied: usize,
    /// The scale convention used.
    pub linear_class: LinearClass,
}

/// The safetensors files and the config of an HF input: a file (its sibling `config.json` is
/// used when there is one), or a model directory with `config.json` and `model.safetensors` or a
/// `model.safetensors.index.json` of shards.
fn hf_inputs(input: &Path) -> Result<(Vec<PathBuf>, Option<String>)> {
    if !input.is_dir() {
        let config = input.parent().map(|d| d.join("config.json")).filter(|c| c.is_file());
        let config = config.map(|c| std::fs::read_to_string(&c).with_context(|| format!("reading {}", c.display())));
        return Ok((vec![input.to_path_buf()], config.transpose()?));
    }
    let config_path = input.join("config.json");
    let config = std::fs::read_to_string(&config_path)
        .with_context(|| format!("{} has no readable config.json", input.display()))?;
    let single = input.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![single], Some(config)));
    }
    let index = input.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            input.display()
        )
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{}: no weight_map object", index.display())
    };
    let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    if shards.iter().any(|s| s.contains('/') || s.contains('\\') || s == "..") {
        bail!("{}: shard names must be plain file names", index.display())
    }
    Ok((shards.into_iter().map(|s| input.join(s)).collect(), Some(config)))
}

/// The linear class named by a config's `quantization_config`, if any.
fn config_linear_class(config: &serde_json::Value) -> Result<Option<LinearClass>> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    if q.get("quant_method").and_then(|m| m.as_str()) != Some("bitnet") {
        bail!(
            "quantization_config.quant_method is {:?}, not \"bitnet\"",
            q.get("quant_method")
        )
    }
    if q.get("quantization_mode").and_then(|m| m.as_str()) == Some("online") {
        bail!("quantization_mode \"online\": the checkpoint holds float training weights, not ternary ones")
    }
    Ok(match q.get("linear_class").and_then(|c| c.as_str()) {
        None | Some("bitlinear") => Some(LinearClass::BitLinear),
        Some("autobitlinear") => Some(LinearClass::AutoBitLinear),
        Some(other) => bail!("unknown quantization_config.linear_class {other:?}"),
    })
}

/// Converts one HF BitLinear layer; `meta` is the checkpoint's safetensors metadata, where
/// `export-hf` records the exact scale and an out-features count that is not a multiple of 4.
fn import_layer(
    layer: &str,
    weight: &RawTensor,
    weight_scale: &RawTensor,
    class: LinearClass,
    meta: &HashMap<String, String>,
) -> Result<bitlinear::PackedTernary> {
    let ws = weight_scale.to_f32().context("weight_scale")?;
    if ws.len() != 1 {
        bail!(
            "weight_scale has {} values, expected 1 (one scale per tensor)",
            ws.len()
        )
    }
    let conv = class.convention();
    let &[rows, k] = weight.shape.as_slice() else {
        bail!("weight must be 2-D, got shape {:?}", weight.shape)
    };
    let n = match weight.dtype {
        // transformers' classes need N = 4 · rows; our exports of other N record it.
        Dtype::U8 => match meta.get(&format!("bitlinear.{layer}.out_features")) {
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| hf_rows(*n) == rows)
                .with_context(|| format!("bitlinear.{layer}.out_features = {v:?} does not fit {rows} packed rows"))?,
            None => rows * 4,
        },
        _ => rows,
    };
    let w = match weight.dtype {
        Dtype::U8 => from_hf(&weight.data, n, k, ws[0], conv, &Device::Cpu)?,
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
            if class != LinearClass::AutoBitLinear {
                bail!("a float weight with weight_scale is an AutoBitLinear layer, but the checkpoint is for BitLinear")
            }
            let values = ternary_from_floats(&weight.to_f32()?)?;
            let s = bitlinear::interop::hf_bitnet::scale_from_hf(ws[0], conv)?;
            let bytes = bitlinear::pack_ternary(&values, n, k)?;
            let bytes = candle_core::Tensor::from_vec(bytes, (n, bitlinear::packed_len(k)), &Device::Cpu)?;
            bitlinear::PackedTernary::from_parts(bytes, s, k)?
        }
        t => bail!("weight has dtype {t:?}; expected U8 (packed) or a float (AutoBitLinear)"),
    };
    // The exact f32 scale recorded by export-hf, when it is the one weight_scale stands for.
    match meta.get(&format!("bitlinear.{layer}.scale")).map(|v| v.parse::<f32>()) {
        Some(Ok(exact)) if exact > 0.0 && scale_to_hf(exact, conv) == ws[0] => {
            let bytes = w.bytes().clone();
            Ok(bitlinear::PackedTernary::from_parts(bytes, exact, k)?)
        }
        _ => Ok(w),
    }
}

/// `import-hf`: an HF BitNet checkpoint (a safetensors file, or a model directory) to our packed
/// file, written atomically. `class` overrides the config's `quantization_config.linear_class`
/// (default `bitlinear`).
pub fn import_hf(input: &Path, out: &Path, class: Option<LinearClass>) -> Result<ImportReport> {
    let (files, config) = hf_inputs(input)?;
    let shards = files
        .iter()
        .map(|f| {
            Ok((
                f.clone(),
                std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let shards: Vec<(&Path, &[u8])> = shards.iter().map(|(f, b)| (f.as_path(), b.as_slice())).collect();
    let c =
        import_hf_bytes(&shards, config.as_deref(), class).with_context(|| format!("importing {}", input.display()))?;
    raw::write(out, &c.tensors, c.metadata)?;
    Ok(c.report)
}

/// [`import_hf`] in memory: the safetensors `shards` (each named for messages, with its bytes)
/// and the text of `config.json` (if any) to the packed file's tensors and metadata, not written.
/// Any bytes give a result or an error, never a panic.
pub fn import_hf_bytes(
    shards: &[(&Path, &[u8])],
    config: Option<&str>,
    class: Option<LinearClass>,
) -> Result<Converted<ImportReport>> {
    let config_json: serde_json::Value = match config {
        Some(c) => serde_json::from_str(c).context("config.json is not valid JSON")?,
        None => serde_json::Value::Null,
    };
    let class = match class {
        Some(c) => c,
        None => config_linear_class(&config_json)
            .context("config.json")?
            .unwrap_or(LinearClass::BitLinear),
    };
    let mut tensors = RawTensors::new();
    let mut file_meta = HashMap::new();
    for &(f, bytes) in shards {
        let (t, m) = raw::parse(bytes, f)?;
        if m.get("format").map(String::as_str) == Some(model::packed_file::FORMAT) {
            bail!("{} is already a packed file", f.display())
        }
        for (name, tensor) in t {
            if tensors.iter().any(|(n, _)| *n == name) {
                bail!("tensor {name:?} appears in more than one shard")
            }
            tensors.push((name, tensor));
        }
        file_meta.extend(m);
    }
    let by_name: HashMap<&str, &RawTensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let model_name = config_json
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .unwrap_or("unknown");
    let compact = if config.is_some() {
        config_json.to_string()
    } else {
        "{}".to_string()
    };
    let mut meta = raw::packed_metadata(model_name, &compact);
    meta.insert("source".into(), format!("hf-transformers-bitnet ({})", class.name()));
    let mut out_tensors = RawTensors::new();
    let mut layers = 0;
    for (name, t) in &tensors {
        if let Some(layer) = name.strip_suffix(".weight_scale") {
            let Some(w) = by_name.get(format!("{layer}.weight").as_str()) else {
                bail!("{name:?} has no {layer}.weight beside it")
            };
            let p = import_layer(layer, w, t, class, &file_meta).with_context(|| format!("layer {layer:?}"))?;
            let bytes = p.bytes().flatten_all()?.to_vec1::<u8>()?;
            out_tensors.push((
                format!("{layer}.weight.packed"),
                RawTensor::u8(p.bytes().dims().to_vec(), bytes),
            ));
            out_tensors.push((format!("{layer}.weight.scale"), RawTensor::f32(vec![1], &[p.scale()])));
            meta.insert(format!("{layer}.in_features"), p.in_features().to_string());
            layers += 1;
        } else if name
            .strip_suffix(".weight")
            .is_some_and(|l| by_name.contains_key(format!("{l}.weight_scale").as_str()))
        {
            // converted with its weight_scale
        } else {
            raw::check_copied_name(name)?;
            out_tensors.push((name.clone(), t.clone()));
        }
    }
    if layers == 0 {
        bail!("no BitLinear layer (no `*.weight_scale` tensor): not an HF BitNet checkpoint")
    }
    let copied = out_tensors.len() - 2 * layers;
    Ok(Converted {
        tensors: out_tensors,
        metadata: meta,
        report: ImportReport {
            layers,
            copied,
            linear_class: class,
        },
    })
}

/// `export-hf`: our packed file to an HF BitNet directory `out_dir` (`model.safetensors`, and
/// `config.json` when the packed file's `model_config` is a transformers config, its
/// `quantization_config.linear_class` set to `class`). Returns the number of layers.
pub fn export_hf(packed: &Path, out_dir: &Path, class: LinearClass) -> Result<usize> {
    let model = raw::read_packed(packed)?;
    let mut tensors = model.others.clone();
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    for (layer, w) in &model.layers {
        let (bytes, ws) = to_hf(w, class.convention())?;
        let (n, k) = (w.out_features(), w.in_features());
        tensors.push((format!("{layer}.weight"), RawTensor::u8(vec![hf_rows(n), k], bytes)));
        tensors.push((format!("{layer}.weight_scale"), RawTensor::f32(vec![1], &[ws])));
        meta.insert(format!("bitlinear.{layer}.scale"), w.scale().to_string());
        if n % 4 != 0 {
            meta.insert(format!("bitlinear.{layer}.out_features"), n.to_string());
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let config = model
        .metadata
        .get("model_config")
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok());
    if let Some(mut config) = config.filter(|c| c.get("model_type").is_some()) {
        if let Some(q) = config.get_mut("quantization_config").and_then(|q| q.as_object_mut()) {
            q.insert("linear_class".into(), class.name().into());
        }
        let text = serde_json::to_string_pretty(&config)?;
        model::write_atomic(&out_dir.join("config.json"), text.as_bytes())?;
    }
    raw::write(&out_dir.join("model.safetensors"), &tensors, meta)?;
    Ok(model.layers.len())
}
