//! Safetensors files as raw tensors (dtype, shape, bytes), so that tensors a conversion does not
//! touch are copied bit for bit whatever their dtype, and our packed files read generically
//! (any model, not only `SimpleBitCnn`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use bitlinear::PackedTernary;
use candle_core::{Device, Tensor};
use model::packed_file::{CODE_MAPPING, FORMAT, FORMAT_VERSION, PACKING};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

/// One tensor as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its little-endian bytes.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// An f32 tensor.
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            dtype: Dtype::F32,
            shape,
            data,
        }
    }

    /// A u8 tensor.
    pub fn u8(shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self {
            dtype: Dtype::U8,
            shape,
            data,
        }
    }

    /// The values of a float tensor (F32, F16 or BF16) as f32, exactly.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = &self.data;
        Ok(match self.dtype {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            t => bail!("expected a float tensor, got {t:?}"),
        })
    }
}

/// Tensors in file order, with their names.
pub type RawTensors = Vec<(String, RawTensor)>;

/// Parses safetensors bytes into raw tensors (sorted by name) and the metadata.
pub fn parse(bytes: &[u8], what: &Path) -> Result<(RawTensors, HashMap<String, String>)> {
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{} is not a valid safetensors file", what.display()))?;
    let (_, meta) = SafeTensors::read_metadata(bytes)?;
    let mut tensors: RawTensors = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let t = RawTensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (name, t)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// Serializes tensors and metadata and writes them with [`model::write_atomic`].
pub fn write(path: &Path, tensors: &RawTensors, meta: HashMap<String, String>) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, t)| Ok((n.as_str(), TensorView::new(t.dtype, t.shape.clone(), &t.data)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let bytes = safetensors::serialize(views, Some(meta)).with_context(|| format!("serializing {}", path.display()))?;
    model::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// A packed file an import built in memory, before [`write`]: its tensors, its metadata, and the
/// import's report (`R`).
#[derive(Debug, Clone, PartialEq)]
pub struct Converted<R> {
    /// The tensors, in the order they are written.
    pub tensors: RawTensors,
    /// The packed file's metadata.
    pub metadata: HashMap<String, String>,
    /// What the import did.
    pub report: R,
}

/// Errors for a tensor an import would copy under a name our packed layers use (`L.weight.packed`,
/// `L.weight.scale`): the file would hold a layer that is not one, or the same name twice.
pub fn check_copied_name(name: &str) -> Result<()> {
    if name.ends_with(".weight.packed") || name.ends_with(".weight.scale") {
        bail!("tensor {name:?} is not a ternary layer but has the name of a packed layer's part")
    }
    Ok(())
}

/// The metadata every packed file starts with.
pub fn packed_metadata(model_name: &str, model_config: &str) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("packing".to_string(), PACKING.to_string()),
        ("code_mapping".to_string(), CODE_MAPPING.to_string()),
        ("model".to_string(), model_name.to_string()),
        ("model_config".to_string(), model_config.to_string()),
    ])
}

/// A packed file read generically: its BitLinear weights, every other tensor, its metadata.
pub struct PackedModel {
    /// `(layer prefix, weight)`, sorted by prefix.
    pub layers: Vec<(String, PackedTernary)>,
    /// Every tensor that is not a packed weight or its scale, as stored.
    pub others: RawTensors,
    /// The `__metadata__`.
    pub metadata: HashMap<String, String>,
}

/// Reads any packed file (format and version checked; every layer's bytes, scale and
/// `in_features` validated as by [`PackedTernary::from_parts`]).
pub fn read_packed(path: &Path) -> Result<PackedModel> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (tensors, metadata) = parse(&bytes, path)?;
    match metadata.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        other => bail!(
            "{}: format is {other:?}, expected {FORMAT:?} (a packed file)",
            path.display()
        ),
    }
    if metadata.get("format_version").map(String::as_str) != Some(&FORMAT_VERSION.to_string()) {
        bail!(
            "{}: format_version {:?} is not supported",
            path.display(),
            metadata.get("format_version")
        )
    }
    let by_name: HashMap<&str, &RawTensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut layers = vec![];
    for (name, t) in &tensors {
        let Some(layer) = name.strip_suffix(".weight.packed") else {
            continue;
        };
        let ctx = || format!("{}: layer {layer:?}", path.display());
        let (Dtype::U8, &[n, k4]) = (t.dtype, t.shape.as_slice()) else {
            bail!(
                "{}: {name:?} must be U8 (N, ceil(K/4)), got {:?} {:?}",
                ctx(),
                t.dtype,
                t.shape
            )
        };
        let k: usize = metadata
            .get(&format!("{layer}.in_features"))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{}: no valid {layer}.in_features metadata", ctx()))?;
        let scale = match by_name.get(format!("{layer}.weight.scale").as_str()) {
            Some(s) if s.dtype == Dtype::F32 && s.shape == [1] => s.to_f32()?[0],
            _ => bail!("{}: {layer}.weight.scale must be an F32 (1,) tensor", ctx()),
        };
        let bytes = Tensor::from_vec(t.data.clone(), (n, k4), &Device::Cpu)?;
        let w = PackedTernary::from_parts(bytes, scale, k).with_context(ctx)?;
        layers.push((layer.to_string(), w));
    }
    let is_layer_part = |n: &str| {
        [".weight.packed", ".weight.scale"]
            .iter()
            .any(|s| n.strip_suffix(s).is_some_and(|l| layers.iter().any(|(p, _)| p == l)))
    };
    let others = tensors.into_iter().filter(|(n, _)| !is_layer_part(n)).collect();
    Ok(PackedModel {
        layers,
        others,
        metadata,
    })
}
