//! `export-gguf` (our packed file to a GGUF v3 file with `TQ2_0` or `TQ1_0` ternary tensors) and
//! `import-gguf` (back, or from any GGUF whose ternary tensors each carry one scale).
//!
//! Tensors: each BitLinear layer `L` becomes `L.weight`, ggml dims `[K', N]` with `K'` = K
//! rounded up to 256 (GGUF rows are whole blocks; the extra columns are zero weights), every
//! block's f16 scale the layer's `s_w`. Every other tensor is stored as F32, F16 or BF16 as it
//! is (its shape reversed into ggml order). Names stay ours: the file is a valid GGUF (read by
//! the `gguf` Python package and by ggml's reader) but not a model llama.cpp can run, which wants
//! its own tensor names and hyperparameter keys.
//!
//! Metadata: `general.architecture` (`bitnet` for `BitNetForCausalLM`, else the model name in
//! lower case), `general.name`, `general.alignment` (32), `general.file_type` (llama.cpp's
//! `MOSTLY_TQ2_0` = 37 or `MOSTLY_TQ1_0` = 36), `general.quantization_version` (2); ours:
//! `bitlinear.format_version`, `bitlinear.model_config` (the packed file's), and per layer
//! `bitlinear.L.in_features` (the logical K) and `bitlinear.L.scale` (the exact f32 `s_w`, which
//! the f16 block scales round), from which [`import_layer`] restores the layer bit for bit.

use std::path::Path;

use anyhow::{bail, Context, Result};
use bitlinear::interop::gguf::{GgmlType, Gguf, Value, Writer};
use bitlinear::interop::{tq1_0, tq2_0};
use bitlinear::PackedTernary;
use candle_core::Device;
use safetensors::Dtype;

use crate::raw::{self, Converted, RawTensor, RawTensors};

/// What `export-gguf` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufReport {
    /// Ternary tensors.
    pub layers: usize,
    /// Other tensors.
    pub others: usize,
    /// Bytes written.
    pub bytes: usize,
}

/// The GGUF `general.architecture` for one of our model names.
fn architecture(model: &str) -> String {
    match model {
        "BitNetForCausalLM" => "bitnet".into(),
        m => m.to_lowercase(),
    }
}

/// `export-gguf`: writes `out` atomically; `ty` is [`GgmlType::TQ2_0`] or [`GgmlType::TQ1_0`].
pub fn export_gguf(packed: &Path, out: &Path, ty: GgmlType) -> Result<GgufReport> {
    let model = raw::read_packed(packed)?;
    let file_type = match ty {
        GgmlType::TQ2_0 => 37u32,
        GgmlType::TQ1_0 => 36,
        t => bail!("export-gguf writes TQ2_0 or TQ1_0 ternary tensors, not {t:?}"),
    };
    let name = model.metadata.get("model").cloned().unwrap_or_else(|| "unknown".into());
    let mut w = Writer::new();
    w.metadata("general.architecture", Value::String(architecture(&name)))
        .metadata("general.name", Value::String(name))
        .metadata("general.alignment", Value::U32(32))
        .metadata("general.file_type", Value::U32(file_type))
        .metadata("general.quantization_version", Value::U32(2))
        .metadata(
            "bitlinear.format_version",
            Value::U32(model::packed_file::FORMAT_VERSION),
        );
    if let Some(c) = model.metadata.get("model_config") {
        w.metadata("bitlinear.model_config", Value::String(c.clone()));
    }
    for (layer, p) in &model.layers {
        let data = match ty {
            GgmlType::TQ2_0 => tq2_0::encode(p),
            _ => tq1_0::encode(p),
        }
        .with_context(|| format!("layer {layer:?}"))?;
        let k_stored = p.in_features().div_ceil(256) as u64 * 256;
        w.metadata(
            &format!("bitlinear.{layer}.in_features"),
            Value::U64(p.in_features() as u64),
        )
        .metadata(&format!("bitlinear.{layer}.scale"), Value::F32(p.scale()))
        .tensor(
            &format!("{layer}.weight"),
            vec![k_stored, p.out_features() as u64],
            ty,
            data,
        );
    }
    for (tname, t) in &model.others {
        let ty = match t.dtype {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            d => bail!("tensor {tname:?} has dtype {d:?}, which export-gguf does not store"),
        };
        let dims = t.shape.iter().rev().map(|&d| d as u64).collect();
        w.tensor(tname, dims, ty, t.data.clone());
    }
    let bytes = w.to_bytes()?;
    model::write_atomic(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    Ok(GgufReport {
        layers: model.layers.len(),
        others: model.others.len(),
        bytes: bytes.len(),
    })
}

/// A ternary tensor `name` (`TQ2_0` or `TQ1_0`, dims `[K', N]`) of a parsed GGUF file as a
/// [`PackedTernary`], using our `bitlinear.L.in_features` and `bitlinear.L.scale` metadata when
/// present (`L` = `name` without `.weight`); otherwise `K = K'` and the blocks' f16 scale.
pub fn import_layer(gguf: &Gguf, bytes: &[u8], name: &str) -> Result<PackedTernary> {
    let Some(t) = gguf.tensor(name) else {
        bail!("no tensor {name:?}")
    };
    let &[k_stored, n] = t.dims.as_slice() else {
        bail!("tensor {name:?} has dims {:?}; a weight is 2-D", t.dims)
    };
    let layer = name.strip_suffix(".weight").unwrap_or(name);
    let k = match gguf.get(&format!("bitlinear.{layer}.in_features")) {
        Some(v) => v
            .as_u64()
            .with_context(|| format!("bitlinear.{layer}.in_features is not an integer"))?,
        None => k_stored,
    };
    let exact = match gguf.get(&format!("bitlinear.{layer}.scale")) {
        Some(Value::F32(s)) => Some(*s),
        Some(v) => bail!("bitlinear.{layer}.scale is {v:?}, expected an f32"),
        None => None,
    };
    let data = gguf.data(bytes, t)?;
    let (n, k_stored, k) = (usize::try_from(n)?, usize::try_from(k_stored)?, usize::try_from(k)?);
    let decode = match GgmlType::from_id(t.type_id) {
        Some(GgmlType::TQ2_0) => tq2_0::decode,
        Some(GgmlType::TQ1_0) => tq1_0::decode,
        _ => bail!(
            "tensor {name:?} has ggml type {}, not TQ2_0 (35) or TQ1_0 (34)",
            t.type_id
        ),
    };
    decode(data, n, k_stored, k, exact, &Device::Cpu).with_context(|| format!("tensor {name:?}"))
}

/// What `import-gguf` did.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufImport {
    /// Ternary tensors converted to packed layers.
    pub layers: usize,
    /// F32/F16/BF16 tensors copied.
    pub copied: usize,
}

/// `import-gguf`: a GGUF file to our packed file, written atomically. Every `TQ2_0`/`TQ1_0`
/// tensor `L.weight` becomes the layer `L` ([`import_layer`]: exact when our metadata is there,
/// an error naming the blocks when its blocks carry different scales); F32, F16 and BF16
/// tensors are copied with their shape turned back from ggml order; any other type is an error.
/// `model` comes from `general.name`, `model_config` from `bitlinear.model_config` (else `{}`).
pub fn import_gguf(input: &Path, out: &Path) -> Result<GgufImport> {
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let c = import_gguf_bytes(&bytes).with_context(|| format!("importing {}", input.display()))?;
    raw::write(out, &c.tensors, c.metadata)?;
    Ok(c.report)
}

/// [`import_gguf`] of a GGUF file's bytes, in memory: the packed file's tensors (sorted by name)
/// and metadata, not written. Any bytes give a result or an error, never a panic.
pub fn import_gguf_bytes(bytes: &[u8]) -> Result<Converted<GgufImport>> {
    let g = Gguf::parse(bytes).context("not a valid GGUF file")?;
    let text = |key: &str| match g.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let name = text("general.name").unwrap_or_else(|| "unknown".into());
    let mut meta = raw::packed_metadata(&name, &text("bitlinear.model_config").unwrap_or_else(|| "{}".into()));
    meta.insert("source".into(), format!("gguf v{}", g.version));
    let mut tensors = RawTensors::new();
    let mut layers = 0;
    for t in &g.tensors {
        let dtype = match GgmlType::from_id(t.type_id) {
            Some(GgmlType::TQ2_0 | GgmlType::TQ1_0) => {
                let p = import_layer(&g, bytes, &t.name)?;
                let layer = t.name.strip_suffix(".weight").unwrap_or(&t.name);
                let packed = p.bytes().flatten_all()?.to_vec1::<u8>()?;
                tensors.push((
                    format!("{layer}.weight.packed"),
                    RawTensor::u8(p.bytes().dims().to_vec(), packed),
                ));
                tensors.push((format!("{layer}.weight.scale"), RawTensor::f32(vec![1], &[p.scale()])));
                meta.insert(format!("{layer}.in_features"), p.in_features().to_string());
                layers += 1;
                continue;
            }
            Some(GgmlType::F32) => Dtype::F32,
            Some(GgmlType::F16) => Dtype::F16,
            Some(GgmlType::BF16) => Dtype::BF16,
            None => bail!(
                "tensor {:?} has ggml type {}, which import-gguf does not read",
                t.name,
                t.type_id
            ),
        };
        raw::check_copied_name(&t.name)?;
        let shape = t
            .dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()?;
        // An empty tensor can have dims whose product overflows before its zero (ggml multiplies
        // from the other end); safetensors' writer multiplies unchecked, so refuse them here.
        if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none() {
            bail!("tensor {:?} has dims {:?} whose product overflows", t.name, t.dims)
        }
        tensors.push((
            t.name.clone(),
            RawTensor {
                dtype,
                shape,
                data: g.data(bytes, t)?.to_vec(),
            },
        ));
    }
    if layers == 0 {
        bail!("no TQ2_0 or TQ1_0 tensor to import")
    }
    let copied = tensors.len() - 2 * layers;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Converted {
        tensors,
        metadata: meta,
        report: GgufImport { layers, copied },
    })
}
