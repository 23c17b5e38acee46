//! `inspect`: the format, version and every tensor of a safetensors file (packed or float).

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// A human-readable listing of the file: a packed or float safetensors file, an HF BitNet
/// checkpoint (file or model directory) or a GGUF file ([`inspect_bytes`] on a file's bytes).
pub fn inspect(path: &Path) -> Result<String> {
    if path.is_dir() {
        return crate::inspect_interop::inspect_hf_dir(path);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    inspect_bytes(&bytes, path)
}

/// A human-readable listing of a file's bytes (a safetensors or GGUF file); `path` only names the
/// file in the listing.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let t = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let bytes = safetensors::serialize([("w", &t)], None)?;
/// let text = convert::inspect::inspect_bytes(&bytes, "w.safetensors".as_ref())?;
/// assert!(text.contains("format: float checkpoint (no format metadata)"));
/// assert!(text.contains("tensors: 24 bytes in all, 0 bytes of packed ternary weights"));
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn inspect_bytes(bytes: &[u8], path: &Path) -> Result<String> {
    if crate::inspect_interop::is_gguf(bytes) {
        return crate::inspect_interop::inspect_gguf(path, bytes);
    }
    let st = safetensors::SafeTensors::deserialize(bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let mut out = String::new();
    let format = metadata
        .get("format")
        .map(String::as_str)
        .unwrap_or("float checkpoint (no format metadata)");
    writeln!(out, "file: {} ({} bytes)", path.display(), bytes.len())?;
    writeln!(out, "format: {format}")?;
    if let Some(v) = metadata.get("format_version") {
        writeln!(out, "format_version: {v}")?;
    }
    let mut keys: Vec<_> = metadata
        .keys()
        .filter(|k| !matches!(k.as_str(), "format" | "format_version"))
        .collect();
    keys.sort();
    for k in keys {
        writeln!(out, "{k}: {}", metadata[k])?;
    }
    let mut names = st.names();
    names.sort();
    writeln!(out, "{:<24} {:<6} {:<16} {:>12}", "tensor", "dtype", "shape", "bytes")?;
    let (mut total, mut packed) = (0usize, 0usize);
    for name in names {
        let t = st.tensor(name)?;
        let n = t.data().len();
        total += n;
        if name.ends_with(".weight.packed") {
            packed += n;
        }
        writeln!(
            out,
            "{name:<24} {:<6} {:<16} {n:>12}",
            format!("{:?}", t.dtype()),
            format!("{:?}", t.shape())
        )?;
    }
    writeln!(
        out,
        "tensors: {} bytes in all, {packed} bytes of packed ternary weights",
        total
    )?;
    if let Some(hf) = crate::inspect_interop::hf_summary(&st)? {
        out.push_str(&hf);
    }
    Ok(out)
}
