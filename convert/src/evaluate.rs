//! Running a network over the CIFAR-10 test set: `eval` (accuracy of a packed file) and `verify`
//! (the float checkpoint's quantized forward against the packed file, image by image).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use cifar::{normalize_batch, Normalizer, Split};
use model::{ComputeOptions, Network, PackedNetwork};

/// Largest difference between two logits that `verify` accepts. Both forms run the same integer
/// kernels and the same float epilogue, so the logits are expected to be bit-identical; the
/// tolerance only leaves room for a future kernel that sums the convolutions differently.
pub const LOGIT_TOLERANCE: f32 = 1e-4;

const BATCH: usize = 500;

/// The logits `(N, 10)` of `model` on every image of `split`, normalized as in training.
pub fn logits<M: Module>(model: &M, split: &Split, device: &Device) -> Result<Vec<Vec<f32>>> {
    let lut = Normalizer::default().lut();
    let mut out = Vec::with_capacity(split.len());
    let all: Vec<usize> = (0..split.len()).collect();
    for idx in all.chunks(BATCH) {
        let x = normalize_batch(split, idx, &lut);
        let x = Tensor::from_vec(x, (idx.len(), 3, 32, 32), device)?;
        out.extend(model.forward(&x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?);
    }
    Ok(out)
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// Fraction of images whose arg-max logit is the label.
pub fn accuracy(logits: &[Vec<f32>], labels: &[u8]) -> f64 {
    let correct = logits
        .iter()
        .zip(labels)
        .filter(|(l, &y)| argmax(l) == y as usize)
        .count();
    correct as f64 / labels.len().max(1) as f64
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    /// Images compared.
    pub images: usize,
    /// Accuracy of the float checkpoint's quantized forward.
    pub float_accuracy: f64,
    /// Accuracy of the packed file.
    pub packed_accuracy: f64,
    /// Images whose predicted class differs.
    pub prediction_mismatches: usize,
    /// Largest absolute logit difference.
    pub max_logit_diff: f32,
}

impl Verification {
    /// Identical predictions everywhere and logits within [`LOGIT_TOLERANCE`].
    pub fn passed(&self) -> bool {
        self.prediction_mismatches == 0 && self.max_logit_diff <= LOGIT_TOLERANCE
    }
}

/// Compares the float checkpoint's quantized forward with the packed file on the test set.
///
/// The packed file may store its float tensors (convolutions, biases, norms) as bf16 or f16; the
/// checkpoint's are rounded the same way first, so the comparison isolates the packing itself.
/// The test set is read from `data_dir`, downloaded there first per `download` when it is missing
/// or empty ([`cifar::ensure_cifar10`]; the files are checked before).
pub fn verify(
    checkpoint: &Path,
    packed: &Path,
    data_dir: &Path,
    download: &cifar::DownloadOptions,
) -> Result<Verification> {
    let device = Device::Cpu;
    let packed_bytes = std::fs::read(packed).with_context(|| format!("reading {}", packed.display()))?;
    let packed_model = PackedNetwork::from_packed_bytes(&packed_bytes, &device)
        .with_context(|| format!("loading {}", packed.display()))?;
    let packed_meta = model::read_metadata(&packed_bytes)?;
    // Loading checked the float_dtype metadata.
    let stored = match packed_meta.get("float_dtype").map(String::as_str) {
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        _ => DType::F32,
    };
    let ckpt_bytes = std::fs::read(checkpoint).with_context(|| format!("reading {}", checkpoint.display()))?;
    let ckpt_meta = model::read_metadata(&ckpt_bytes)?;
    let mut tensors = candle_core::safetensors::load_buffer(&ckpt_bytes, &device)
        .with_context(|| format!("{} is not a usable float checkpoint", checkpoint.display()))?;
    for (k, t) in tensors.iter_mut() {
        // The latent weights of packed layers are packed, never stored as floats: keep them.
        let keep = k.ends_with(".weight") && packed_meta.contains_key(&format!("{}.in_features", &k[..k.len() - 7]));
        if !keep && t.dtype() == DType::F32 {
            *t = t.to_dtype(stored)?.to_dtype(DType::F32)?;
        }
    }
    let float_model = Network::from_checkpoint_parts(&ckpt_meta, tensors, ComputeOptions::default(), &device)
        .with_context(|| format!("{} is not a usable float checkpoint", checkpoint.display()))?;
    if float_model.config() != packed_model.config() {
        bail!(
            "the checkpoint's network ({}) differs from the packed file's ({})",
            float_model.config().describe(),
            packed_model.config().describe()
        )
    }
    cifar::ensure_cifar10(data_dir, download)?;
    let split = cifar::load_test(data_dir)?;
    let a = logits(&float_model, &split, &device)?;
    let b = logits(&packed_model, &split, &device)?;
    let mut mismatches = 0;
    let mut max_diff = 0f32;
    for (la, lb) in a.iter().zip(&b) {
        mismatches += usize::from(argmax(la) != argmax(lb));
        for (x, y) in la.iter().zip(lb) {
            // NaN anywhere is a failure, not a zero difference.
            let d = (x - y).abs();
            max_diff = if d.is_nan() { f32::INFINITY } else { max_diff.max(d) };
        }
    }
    Ok(Verification {
        images: split.len(),
        float_accuracy: accuracy(&a, &split.labels),
        packed_accuracy: accuracy(&b, &split.labels),
        prediction_mismatches: mismatches,
        max_logit_diff: max_diff,
    })
}

/// Test accuracy of a packed file alone (no float BitLinear weights are read or built), on the
/// test set of `data_dir` (downloaded first per `download` when missing or empty, after the file
/// was loaded).
pub fn eval_packed(
    packed: &Path,
    data_dir: &Path,
    download: &cifar::DownloadOptions,
    device: &Device,
) -> Result<(usize, f64)> {
    let model = PackedNetwork::load(packed, device)?;
    cifar::ensure_cifar10(data_dir, download)?;
    let split = cifar::load_test(data_dir)?;
    let l = logits(&model, &split, device)?;
    Ok((split.len(), accuracy(&l, &split.labels)))
}
