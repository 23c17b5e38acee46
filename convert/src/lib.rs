//! The library behind the `convert` command: float checkpoint → packed 2-bit file, inspection,
//! and verified inference from the packed file.
//!
//! One file per concept: [`checkpoint`] (reading a float checkpoint), [`inspect`] (listing any
//! safetensors file), [`evaluate`] (running a model over the CIFAR-10 test set; `verify` and
//! `eval`). The interop formats: [`hf`] (`import-hf`, `export-hf`: Hugging Face transformers
//! BitNet checkpoints), [`gguf_file`] (`export-gguf`, `import-gguf`), [`inspect_interop`] (their listings),
//! over [`raw`] (safetensors files as raw tensors, packed files of any model).

pub mod checkpoint;
pub mod evaluate;
pub mod gguf_file;
pub mod hf;
pub mod inspect;
pub mod inspect_interop;
pub mod raw;

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

/// Reads the float checkpoint, packs its BitLinear layers and writes the packed file
/// atomically. Returns `(checkpoint bytes, packed bytes)`.
pub fn export(checkpoint: &Path, out: &Path, dtype: DType) -> Result<(u64, u64)> {
    let model = checkpoint::load_checkpoint(checkpoint, &Device::Cpu)?;
    let packed = model.to_packed().context("packing the BitLinear weights")?;
    packed.save(out, dtype)?;
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .with_context(|| format!("reading {}", p.display()))
    };
    Ok((size(checkpoint)?, size(out)?))
}
