//! `inspect` for the interop formats: GGUF files, HF transformers BitNet checkpoints (a file or
//! a model directory). Called by [`crate::inspect::inspect`].

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};
use bitlinear::interop::gguf::{GgmlType, Gguf, Value};
use bitlinear::interop::hf_bitnet::{scale_from_hf, ScaleConvention};
use safetensors::{Dtype, SafeTensors};

/// Whether the bytes start with the GGUF magic.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.starts_with(bitlinear::interop::gguf::MAGIC)
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 200 => format!("{:?}... ({} bytes)", &s[..s.floor_char_boundary(200)], s.len()),
        Value::String(s) => format!("{s:?}"),
        Value::Array(t, items) => format!("[{} items of value type {t}]", items.len()),
        v => format!("{v:?}"),
    }
}

/// A listing of a GGUF file: header, metadata, tensors; each ternary tensor is decoded and its
/// scale (or why it cannot be imported) reported.
pub fn inspect_gguf(path: &Path, bytes: &[u8]) -> Result<String> {
    let g = Gguf::parse(bytes).with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
    let mut out = String::new();
    writeln!(out, "file: {} ({} bytes)", path.display(), bytes.len())?;
    writeln!(
        out,
        "format: GGUF v{} (alignment {}, data at {})",
        g.version, g.alignment, g.data_offset
    )?;
    for (k, v) in &g.metadata {
        writeln!(out, "{k}: {}", show(v))?;
    }
    writeln!(
        out,
        "{:<44} {:<8} {:<16} {:>10}  ternary",
        "tensor", "type", "ggml dims", "bytes"
    )?;
    for t in &g.tensors {
        let ty = GgmlType::from_id(t.type_id);
        let len = ty.and_then(|ty| ty.data_len(&t.dims).ok());
        let ternary = match ty {
            Some(GgmlType::TQ1_0 | GgmlType::TQ2_0) => match crate::gguf_file::import_layer(&g, bytes, &t.name) {
                Ok(p) => format!("({}, {}) scale {}", p.out_features(), p.in_features(), p.scale()),
                Err(e) => format!("not importable: {e:#}"),
            },
            _ => String::new(),
        };
        writeln!(
            out,
            "{:<44} {:<8} {:<16} {:>10}  {ternary}",
            t.name,
            ty.map_or(format!("type {}", t.type_id), |t| format!("{t:?}")),
            format!("{:?}", t.dims),
            len.map_or("?".into(), |l| l.to_string()),
        )?;
    }
    writeln!(out, "tensors: {}", g.tensors.len())?;
    Ok(out)
}

/// For a safetensors file holding HF BitNet layers (`L.weight` U8 + `L.weight_scale`), a
/// description of each; `None` when it holds none.
pub fn hf_summary(st: &SafeTensors) -> Result<Option<String>> {
    let mut names = st.names();
    names.sort();
    let mut out = String::new();
    for name in names {
        let Some(layer) = name.strip_suffix(".weight_scale") else {
            continue;
        };
        let Ok(w) = st.tensor(&format!("{layer}.weight")) else {
            continue;
        };
        let s = st.tensor(name)?;
        let ws = crate::raw::RawTensor {
            dtype: s.dtype(),
            shape: s.shape().to_vec(),
            data: s.data().to_vec(),
        }
        .to_f32()
        .ok()
        .and_then(|v| v.first().copied());
        let scales = match ws {
            Some(ws) => format!(
                "weight_scale {ws} (s_w {} as BitLinear, {} as AutoBitLinear)",
                scale_from_hf(ws, ScaleConvention::Divide).map_or("invalid".into(), |s| s.to_string()),
                scale_from_hf(ws, ScaleConvention::Multiply).map_or("invalid".into(), |s| s.to_string())
            ),
            None => "weight_scale unreadable".into(),
        };
        let shape = match (w.dtype(), w.shape()) {
            (Dtype::U8, &[r, k]) => format!("packed ({}, {k})", 4 * r),
            (d, s) => format!("{d:?} {s:?}"),
        };
        writeln!(out, "  {layer}: {shape}, {scales}")?;
    }
    Ok((!out.is_empty()).then(|| format!("HF transformers BitNet layers (N = 4 x packed rows):\n{out}")))
}

/// An HF model directory: its config.json summarized, then `model.safetensors` or every shard
/// named by `model.safetensors.index.json`, each listed by [`crate::inspect::inspect`].
pub fn inspect_hf_dir(dir: &Path) -> Result<String> {
    let mut out = hf_config_summary(dir)?;
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(out + &crate::inspect::inspect(&single)?);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let mut shards: Vec<&str> = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no weight_map object", index.display()))?
        .values()
        .filter_map(|v| v.as_str())
        .collect();
    shards.sort();
    shards.dedup();
    for shard in shards {
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            anyhow::bail!(
                "{}: shard names must be plain file names, got {shard:?}",
                index.display()
            )
        }
        out += &crate::inspect::inspect(&dir.join(shard))?;
    }
    Ok(out)
}

/// The config.json of an HF model directory, summarized.
pub fn hf_config_summary(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let c: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let field = |k: &str| c.get(k).map_or("-".to_string(), |v| v.to_string());
    Ok(format!(
        "config.json: model_type {}, architectures {}, hidden_size {}, layers {}, quantization_config {}\n",
        field("model_type"),
        field("architectures"),
        field("hidden_size"),
        field("num_hidden_layers"),
        field("quantization_config")
    ))
}
