//! The rules every model file loader applies, whatever the format: the tensors are exactly the
//! ones the format records for the network's configuration (no unknown name, none missing), each
//! with exactly the recorded dtype and shape, and no float tensor holds a NaN or an infinity.
//!
//! One rule for every float tensor: a non-finite value in a convolution, a norm gain, a bias or a
//! latent BitLinear weight is an error when the file is loaded, not a NaN logit later.

use std::collections::HashMap;

use candle_core::{bail, DType, Result, Tensor};

/// What a file format records for one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Full name in the file, e.g. `fc1.norm.weight`.
    pub name: String,
    /// Exact shape.
    pub shape: Vec<usize>,
    /// Exact dtype: a tensor stored as another dtype is an error, never converted.
    pub dtype: DType,
}

impl TensorSpec {
    pub(crate) fn new(name: impl Into<String>, shape: &[usize], dtype: DType) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
        }
    }
}

/// Checks `tensors` against `specs` (see the module docs). `dtype_note` is appended to a dtype
/// error to say where the expected float dtype comes from (e.g. the `float_dtype` metadata).
pub fn check_tensors(tensors: &HashMap<String, Tensor>, specs: &[TensorSpec], dtype_note: &str) -> Result<()> {
    let mut unknown: Vec<&String> = tensors
        .keys()
        .filter(|k| !specs.iter().any(|s| &s.name == *k))
        .collect();
    unknown.sort();
    let missing: Vec<&String> = specs
        .iter()
        .map(|s| &s.name)
        .filter(|n| !tensors.contains_key(*n))
        .collect();
    if !unknown.is_empty() || !missing.is_empty() {
        let mut parts: Vec<String> = unknown
            .iter()
            .map(|n| format!("unknown tensor {n:?} (not part of this network)"))
            .collect();
        parts.extend(missing.iter().map(|n| format!("tensor {n:?} is missing")));
        bail!("{}", parts.join("; "))
    }
    for spec in specs {
        let t = &tensors[&spec.name];
        if t.dtype() != spec.dtype {
            bail!(
                "tensor {:?} has dtype {:?}, expected {:?}{dtype_note}",
                spec.name,
                t.dtype(),
                spec.dtype
            )
        }
        if t.dims() != spec.shape.as_slice() {
            bail!(
                "tensor {:?} has shape {:?}, expected {:?}",
                spec.name,
                t.dims(),
                spec.shape
            )
        }
        if spec.dtype.is_float() {
            check_finite(&spec.name, t)?;
        }
    }
    Ok(())
}

/// Fails if the float tensor `t` (named `name` in the error) holds a NaN or an infinity; other
/// dtypes pass. Reads the values back to the CPU.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let t = Tensor::new(&[1f32, f32::NAN], &Device::Cpu)?;
/// let e = model::check_finite("conv1.bias", &t).unwrap_err().to_string();
/// assert!(e.contains("conv1.bias") && e.contains("NaN at index 1"), "{e}");
/// assert!(model::check_finite("x", &Tensor::new(&[1f32, 2.], &Device::Cpu)?).is_ok());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Ok(());
    }
    // f16 and bf16 widen to f32 exactly, NaN and infinities included.
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        bail!("tensor {name:?} holds {v} at index {i} (flattened): NaN and infinite values are not accepted")
    }
    Ok(())
}
