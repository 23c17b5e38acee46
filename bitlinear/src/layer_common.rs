//! What [`BitLinear`](crate::BitLinear) and [`PackedBitLinear`](crate::PackedBitLinear) share:
//! the layer options and the float work around the quantized matmul (flattening the leading
//! dimensions, RMSNorm, bias).

use candle_core::{bail, DType, Result, Tensor, D};

use crate::device::is_float;
use crate::quant::ActScaling;

/// Epsilon inside the RMSNorm square root: `x / sqrt(mean(x²) + 1e-6) · g`. It only matters
/// for (near) all-zero rows, which it maps to zero instead of NaN.
pub const RMS_NORM_EPS: f64 = 1e-6;

/// Options of a [`BitLinear`](crate::BitLinear) layer (and of its packed form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitLinearConfig {
    /// Learn and add a bias (after the quantized matmul, in full precision).
    pub bias: bool,
    /// Normalize each input row with RMSNorm and a learnable gain before quantizing (BitNet's
    /// "SubLN"). Turn off when the layer already gets normalized inputs.
    pub rms_norm: bool,
    /// Activation scale grouping.
    pub act_scaling: ActScaling,
    /// Whether each forward of a [`BitLinear`](crate::BitLinear) checks its float weight for NaN
    /// and infinite values (the default; see [`BitMatmul::check_finite`](crate::BitMatmul):
    /// on CUDA the check waits for the stream). A packed layer has no float weight to check.
    pub check_finite: bool,
}

impl Default for BitLinearConfig {
    fn default() -> Self {
        Self {
            bias: true,
            rms_norm: true,
            act_scaling: ActScaling::PerToken,
            check_finite: true,
        }
    }
}

/// Splits `(..., K)` into `(M, K)` and the leading dims.
pub(crate) fn flatten_rows(x: &Tensor, k: usize, ctx: &str) -> Result<(Tensor, Vec<usize>)> {
    if !is_float(x.dtype()) {
        bail!("{ctx}: input must be a float tensor, got {:?}", x.dtype())
    }
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        bail!("{ctx}: input must have at least one dimension (..., {k}), got a scalar")
    };
    if last != k {
        bail!("{ctx}: input has {last} features in its last dimension, the layer expects {k}")
    }
    let m = lead.iter().product::<usize>();
    Ok((x.reshape((m, k))?, lead.to_vec()))
}

/// RMSNorm over the last dim, computed in f32 and returned in `x`'s dtype.
/// An empty input is returned as it is: candle's CUDA kernels cannot run on zero elements.
pub(crate) fn rms_norm(x: &Tensor, gain: &Tensor) -> Result<Tensor> {
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let x32 = x.to_dtype(DType::F32)?;
    let rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + RMS_NORM_EPS)?.sqrt()?;
    x32.broadcast_div(&rms)?
        .broadcast_mul(&gain.to_dtype(DType::F32)?)?
        .to_dtype(x.dtype())
}

/// Adds the bias (not to an empty output: candle's CUDA kernels cannot run on zero elements)
/// and restores the leading dims.
pub(crate) fn finish(y: Tensor, bias: Option<&Tensor>, mut lead: Vec<usize>) -> Result<Tensor> {
    let y = match bias {
        Some(b) if y.elem_count() > 0 => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
        _ => y,
    };
    lead.push(y.dim(1)?);
    y.reshape(lead)
}
