//! `PackedBitLinear`: the inference form of a BitLinear layer, its weight packed 2 bits a value,
//! and its storage under a `VarBuilder` prefix.

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::layer_common::{finish, flatten_rows, rms_norm, BitLinearConfig};
use crate::ops::packed_matmul;
use crate::packed::{packed_len, PackedTernary};
use crate::quant::ActScaling;

/// The inference form of [`BitLinear`](crate::BitLinear): the weight is stored packed (2 bits a
/// value) and never quantized again. Its outputs equal the training layer's.
///
/// Stored, like `candle_nn::Linear`, as tensors under the layer's prefix ([`Self::tensors`],
/// [`Self::load`]):
///
/// | name | dtype, shape | what |
/// | --- | --- | --- |
/// | `weight.packed` | U8 `(out, ceil(in/4))` | the [`PackedTernary`] bytes |
/// | `weight.scale` | F32 `(1,)` | the absmean scale `s_w` |
/// | `bias` | float `(out,)` | with [`BitLinearConfig::bias`] |
/// | `norm.weight` | float `(in,)` | the RMSNorm gain, with [`BitLinearConfig::rms_norm`] |
///
/// ```
/// use std::collections::HashMap;
/// use bitlinear::{bit_linear, BitLinearConfig, PackedBitLinear};
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let packed = bit_linear(10, 3, vb.pp("fc"))?.to_packed()?;
///
/// // Save: the names are relative to the layer; a file puts its prefix in front.
/// let tensors: HashMap<String, Tensor> =
///     packed.tensors()?.into_iter().map(|(name, t)| (format!("fc.{name}"), t)).collect();
/// assert_eq!(tensors["fc.weight.packed"].dims(), &[3, 3]); // ceil(10 / 4) bytes a row
/// // candle_core::safetensors::save(&tensors, "fc.safetensors")?;
///
/// // Load, e.g. from `VarBuilder::from_mmaped_safetensors`; the same outputs.
/// let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
/// let loaded = PackedBitLinear::load(10, 3, BitLinearConfig::default(), vb.pp("fc"))?;
/// let x = Tensor::randn(0f32, 1., (2, 10), &Device::Cpu)?;
/// assert_eq!(loaded.forward(&x)?.to_vec2::<f32>()?, packed.forward(&x)?.to_vec2::<f32>()?);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PackedBitLinear {
    weight: PackedTernary,
    bias: Option<Tensor>,
    norm: Option<Tensor>,
    act_scaling: ActScaling,
}

/// The full name of `name` under `vb`.
pub(crate) fn path(vb: &VarBuilder, name: &str) -> String {
    match vb.prefix() {
        p if p.is_empty() => name.to_string(),
        p => format!("{p}.{name}"),
    }
}

/// The packed weight of `n` rows of `k` stored under `vb` as `weight.packed` (U8 `(n,
/// ceil(k/4))`) and `weight.scale` (F32 `(1,)`), validated as by [`PackedTernary::from_parts`];
/// the errors name the tensor.
pub(crate) fn load_packed_weight(vb: &VarBuilder, n: usize, k: usize) -> Result<PackedTernary> {
    let bytes = fetch(vb, "weight.packed", &[n, packed_len(k)], DType::U8)?;
    let scale = fetch(vb, "weight.scale", &[1], DType::F32)?.to_vec1::<f32>()?[0];
    PackedTernary::from_parts(bytes, scale, k)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path(vb, "weight.packed"))))
}

/// `weight.packed` and `weight.scale` of `w` (the scale on the weight's device), as
/// [`load_packed_weight`] reads them.
pub(crate) fn packed_weight_tensors(w: &PackedTernary) -> Result<Vec<(String, Tensor)>> {
    Ok(vec![
        ("weight.packed".to_string(), w.bytes().clone()),
        ("weight.scale".to_string(), Tensor::new(&[w.scale()], w.device())?),
    ])
}

/// The tensor `name` under `vb`, in `dtype`, of exactly `shape`; the errors name its full path.
pub(crate) fn fetch(vb: &VarBuilder, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let path = path(vb, name);
    if !vb.contains_tensor(name) {
        bail!("tensor {path:?} is missing")
    }
    let t = vb.get_unchecked_dtype(name, dtype)?;
    if t.dims() != shape {
        bail!("tensor {path:?} has shape {:?}, expected {shape:?}", t.dims())
    }
    // A VarBuilder converts what it reads to the requested dtype. Packed bytes stored as another
    // dtype (floats, wider integers) would be truncated or wrapped into other codes: reject
    // values that are not bytes instead.
    if dtype == DType::U8 {
        let exact = vb.get_unchecked_dtype(name, DType::F32)?;
        let changed = t.to_dtype(DType::F32)?.ne(&exact)?.to_dtype(DType::U32)?.sum_all()?;
        if changed.to_scalar::<u32>()? != 0 {
            bail!("tensor {path:?} must hold bytes (U8), it holds other values")
        }
    }
    Ok(t)
}

impl PackedBitLinear {
    /// Builds the layer from a packed weight, an optional bias `(out)` and RMSNorm gain `(in)`.
    pub fn new(
        weight: PackedTernary,
        bias: Option<Tensor>,
        norm: Option<Tensor>,
        act_scaling: ActScaling,
    ) -> Result<Self> {
        let (n, k) = (weight.out_features(), weight.in_features());
        if bias.as_ref().is_some_and(|b| b.dims() != [n]) {
            bail!("PackedBitLinear: bias must have shape ({n},)")
        }
        if norm.as_ref().is_some_and(|g| g.dims() != [k]) {
            bail!("PackedBitLinear: RMSNorm gain must have shape ({k},)")
        }
        Ok(Self {
            weight,
            bias,
            norm,
            act_scaling,
        })
    }

    /// Loads a layer of `in_dim` inputs and `out_dim` outputs stored under `vb` (the names in the
    /// type's docs), on `vb`'s device; `bias` and `norm.weight` are read as `vb`'s dtype when
    /// `config` has them. Every tensor's presence and shape is checked, the packed bytes must be
    /// byte values, the scale finite and positive, and every 2-bit code valid (code 3 is
    /// rejected, as by [`PackedTernary::from_parts`]). `config.check_finite` does not apply.
    pub fn load(in_dim: usize, out_dim: usize, config: BitLinearConfig, vb: VarBuilder) -> Result<Self> {
        let weight = load_packed_weight(&vb, out_dim, in_dim)?;
        let float = |name: &str, dim: usize| fetch(&vb, name, &[dim], vb.dtype());
        let bias = config.bias.then(|| float("bias", out_dim)).transpose()?;
        let norm = config.rms_norm.then(|| float("norm.weight", in_dim)).transpose()?;
        Self::new(weight, bias, norm, config.act_scaling)
    }

    /// The layer's tensors, named relative to its prefix as [`Self::load`] reads them:
    /// `weight.packed`, `weight.scale` (on the weight's device), then `bias` and `norm.weight`
    /// where the layer has them, as they are.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = packed_weight_tensors(&self.weight)?;
        out.extend(self.bias.iter().map(|b| ("bias".to_string(), b.clone())));
        out.extend(self.norm.iter().map(|g| ("norm.weight".to_string(), g.clone())));
        Ok(out)
    }

    /// The packed weight.
    pub fn weight(&self) -> &PackedTernary {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The RMSNorm gain, if RMSNorm is on.
    pub fn norm_gain(&self) -> Option<&Tensor> {
        self.norm.as_ref()
    }

    /// Activation scale grouping.
    pub fn act_scaling(&self) -> ActScaling {
        self.act_scaling
    }

    /// The device holding the packed weight.
    pub fn device(&self) -> &Device {
        self.weight.device()
    }
}

impl Module for PackedBitLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x, lead) = flatten_rows(x, self.weight.in_features(), "PackedBitLinear")?;
        let x = match &self.norm {
            Some(g) => rms_norm(&x, g)?,
            None => x,
        };
        let y = packed_matmul(&x, &self.weight, self.act_scaling)?;
        finish(y, self.bias.as_ref(), lead)
    }
}
