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

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// Reads the float checkpoint (of any network), packs its ternary layers and writes the packed file
/// atomically. Returns `(checkpoint bytes, packed bytes)`.
///
/// `out` naming the checkpoint itself (the same path, or the same file through a link or another
/// spelling of the path) is an error: the export would replace its own input.
pub fn export(checkpoint: &Path, out: &Path, dtype: DType) -> Result<(u64, u64)> {
    if same_file(checkpoint, out) {
        bail!(
            "--out {} is the checkpoint itself: the export would overwrite its input; choose another --out",
            out.display()
        )
    }
    let model = checkpoint::load_network(checkpoint, &Device::Cpu)?;
    let packed = model.to_packed().context("packing the ternary weights")?;
    packed.save(out, dtype)?;
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .with_context(|| format!("reading {}", p.display()))
    };
    Ok((size(checkpoint)?, size(out)?))
}

/// Whether `a` and `b` name the same file: equal after resolving links and `..`, or (on Unix) the
/// same inode, which catches hard links. A path that does not exist is compared through its
/// resolved directory.
fn same_file(a: &Path, b: &Path) -> bool {
    let resolve = |p: &Path| {
        p.canonicalize().ok().or_else(|| {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            Some(dir.canonicalize().ok()?.join(p.file_name()?))
        })
    };
    if let (Some(x), Some(y)) = (resolve(a), resolve(b)) {
        if x == y {
            return true;
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    false
}
