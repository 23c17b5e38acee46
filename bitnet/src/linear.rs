//! A BitLinear projection in transformers' packed layout, run on the `bitlinear` kernels, or
//! its dense float stand-in for comparisons.

use bitlinear::interop::hf_bitnet::{self, ScaleConvention};
use bitlinear::{packed_matmul, packed_matmul_normed, ActScaling, InputNorm, PackedTernary};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// How the projections' weights are stored and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Projections {
    /// transformers' packed layout: `weight` uint8 `(ceil(out/4), in)` and `weight_scale`; run
    /// as int8 activations x packed ternary weights on the `bitlinear` kernels (the model).
    #[default]
    PackedTernary,
    /// `weight` a float `(out, in)` matrix run as a plain candle `Linear` in the model's dtype,
    /// without any quantization: the same architecture in full precision, the baseline that
    /// benchmarks compare the packed model against. Not BitNet's arithmetic.
    Dense,
}

#[derive(Debug, Clone)]
enum Weight {
    Packed(PackedTernary),
    Dense(Linear),
}

/// `y = x · Wᵀ` with `x` quantized per token to int8 (absmax) and `W` ternary: the exact integer
/// product on the packed kernels, then `(acc · s_x) · s_w` in f32, cast to `x`'s dtype
/// ([`Projections::Dense`]: a plain float matmul instead).
///
/// transformers' `BitLinear` computes the same integer product; its float steps differ only in
/// rounding order: it quantizes with `round(x · (127 / max|x|))` where we use
/// `round(x / (max|x| / 127))` (both round half to even, both clamp `max|x|` at `1e-5`), and it
/// divides `acc / (weight_scale · (127 / max|x|))` where we multiply. Each is one f32 rounding
/// apart, so a code can differ by one where `x · 127 / max|x|` lies within an ulp of a half.
#[derive(Debug, Clone)]
pub struct BitNetLinear {
    weight: Weight,
    out_features: usize,
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
        Ok(Self {
            weight: Weight::Packed(weight),
            out_features,
        })
    }

    /// Loads under `vb` as `projections` says: [`BitNetLinear::load`], or a float `weight
    /// (out, in)` in `vb`'s dtype for [`Projections::Dense`].
    pub fn load_as(in_features: usize, out_features: usize, projections: Projections, vb: VarBuilder) -> Result<Self> {
        match projections {
            Projections::PackedTernary => Self::load(in_features, out_features, vb),
            Projections::Dense => Ok(Self {
                weight: Weight::Dense(candle_nn::linear_no_bias(in_features, out_features, vb)?),
                out_features,
            }),
        }
    }

    /// The packed ternary weight (`None` for [`Projections::Dense`]).
    pub fn weight(&self) -> Option<&PackedTernary> {
        match &self.weight {
            Weight::Packed(w) => Some(w),
            Weight::Dense(_) => None,
        }
    }

    /// `norm` of `x`, then this projection: the fused decode step's form of a pre-norm
    /// projection ([`normed_forward`]). Returns the norm's sum where it has one.
    pub(crate) fn forward_normed(&self, x: &Tensor, norm: &InputNorm) -> Result<(Tensor, Option<Tensor>)> {
        match &self.weight {
            Weight::Packed(w) => packed_matmul_normed(x, w, norm),
            Weight::Dense(linear) => dense_normed(linear, x, norm),
        }
    }

    /// The dense float layer (`None` for [`Projections::PackedTernary`]).
    pub(crate) fn dense(&self) -> Option<&Linear> {
        match &self.weight {
            Weight::Packed(_) => None,
            Weight::Dense(linear) => Some(linear),
        }
    }
}

/// `norm` of `x`, then a dense layer, on the fused decode step's kernels (CUDA): the residual add
/// with its norm and the squared-ReLU gate with its sub-norm as the fused kernels of
/// `crate::fused`, a norm alone as candle's. The dense model's counterpart of
/// `bitlinear::packed_matmul_normed`, which runs the norm inside the packed GEMV.
pub(crate) fn dense_normed(linear: &Linear, x: &Tensor, norm: &InputNorm) -> Result<(Tensor, Option<Tensor>)> {
    let (h, sum) = match *norm {
        InputNorm::AddRmsNorm {
            delta: Some(d),
            gain,
            eps,
            ..
        } => {
            let (sum, h) = crate::fused::add_rms_norm(x, d, gain, f64::from(eps))?;
            (h, Some(sum))
        }
        InputNorm::AddRmsNorm {
            delta: None, gain, eps, ..
        } => (candle_nn::ops::rms_norm(x, gain, eps)?, None),
        InputNorm::Relu2MulRmsNorm {
            gain,
            eps,
            gate_scale,
            up_scale,
            ..
        } => (
            crate::fused::relu2_mul_rms_norm(x, &[gate_scale, up_scale], gain, f64::from(eps))?,
            None,
        ),
    };
    Ok((linear.forward(&h)?, sum))
}

/// `x (..., in) · Wᵀ` over a packed weight with `out` rows, as `(..., out)`.
pub(crate) fn packed_forward(x: &Tensor, w: &PackedTernary, out: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / k.max(1);
    let y = packed_matmul(&x.reshape((rows, k))?, w, ActScaling::PerToken)?;
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    y.reshape(dims)
}

impl Module for BitNetLinear {
    /// `x (..., in)` to `(..., out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(linear) => linear.forward(x),
            Weight::Packed(w) => packed_forward(x, w, self.out_features),
        }
    }
}
