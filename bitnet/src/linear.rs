//! A BitLinear projection in transformers' packed layout, run on the `bitlinear` kernels.

use bitlinear::interop::hf_bitnet::{self, ScaleConvention};
use bitlinear::{packed_matmul, ActScaling, PackedTernary};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `y = x · Wᵀ` with `x` quantized per token to int8 (absmax) and `W` ternary: the exact integer
/// product on the packed kernels, then `(acc · s_x) · s_w` in f32.
///
/// transformers' `BitLinear` computes the same integer product; its float steps differ only in
/// rounding order: it quantizes with `round(x · (127 / max|x|))` where we use
/// `round(x / (max|x| / 127))` (both round half to even, both clamp `max|x|` at `1e-5`), and it
/// divides `acc / (weight_scale · (127 / max|x|))` where we multiply. Each is one f32 rounding
/// apart, so a code can differ by one where `x · 127 / max|x|` lies within an ulp of a half.
#[derive(Debug, Clone)]
pub struct BitNetLinear {
    weight: PackedTernary,
}

impl BitNetLinear {
    /// Loads `weight` (uint8 `(ceil(out/4), in)`) and `weight_scale` (`(1,)`, divided by, the
    /// convention of transformers' packed `BitLinear`) under `vb`.
    pub fn load(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Self> {
        let rows = hf_bitnet::hf_rows(out_features);
        let bytes = vb.get_with_hints_dtype((rows, in_features), "weight", Default::default(), DType::U8)?;
        let scale = vb.get_with_hints_dtype(1, "weight_scale", Default::default(), DType::F32)?;
        let scale = scale.to_vec1::<f32>()?[0];
        let bytes = bytes.flatten_all()?.to_vec1::<u8>()?;
        let weight = hf_bitnet::from_hf(
            &bytes,
            out_features,
            in_features,
            scale,
            ScaleConvention::Divide,
            vb.device(),
        )
        .map_err(|e| e.context(format!("packed weight {}", vb.prefix())))?;
        Ok(Self { weight })
    }

    /// The packed ternary weight.
    pub fn weight(&self) -> &PackedTernary {
        &self.weight
    }
}

impl Module for BitNetLinear {
    /// `x (..., in)` to `(..., out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / k.max(1);
        let y = packed_matmul(&x.reshape((rows, k))?, &self.weight, ActScaling::PerToken)?;
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.weight.out_features();
        }
        y.reshape(out)
    }
}
