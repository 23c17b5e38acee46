//! The vocabulary-sized float matrix `(vocab, hidden)`: the embedding table and the LM head (one
//! tensor when tied).
//!
//! On the CPU an f32 model whose matrix holds only bf16 values (a bf16 checkpoint such as
//! `microsoft/bitnet-b1.58-2B-4T` widened to f32 on load) keeps it as bf16: the head then widens
//! the weights inside its own matrix-vector kernel ([`widen`]) and the embedding widens the rows
//! it looks up. Both are exact, so the logits are those of the f32 matrix up to the order of the
//! f32 sums; the matrix takes half the memory and the head, most of a CPU decode step's bytes,
//! reads half as many.

mod widen;

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Module, Result, Shape, Storage, Tensor};
use candle_nn::Linear;
use rayon::prelude::*;

/// The matrix, as loaded or held as bf16 (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct VocabMatrix {
    /// In the model's dtype, or bf16 for an f32 model on the CPU (widened by the kernels).
    weight: Tensor,
    /// The model's float dtype: what lookups and products return.
    dtype: DType,
}

impl VocabMatrix {
    /// Wraps `weight (vocab, hidden)` of the model's dtype, as bf16 where that is exact and
    /// helps (see the module docs).
    pub fn new(weight: Tensor) -> Result<Self> {
        let dtype = weight.dtype();
        if matches!(weight.device(), Device::Cpu) && dtype == DType::F32 && holds_only_bf16(&weight)? {
            return Ok(Self {
                weight: weight.to_dtype(DType::BF16)?,
                dtype,
            });
        }
        Ok(Self { weight, dtype })
    }

    /// The dtype the weights are held in (bf16 for an f32 model where they are widened).
    pub fn stored_dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// The matrix as held (see [`Self::stored_dtype`]).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Rows `ids` (u32, any shape) of the matrix, `(ids..., hidden)` in the model's dtype.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.weight.dim(1)?);
        let rows = self.weight.index_select(&ids.flatten_all()?, 0)?;
        rows.to_dtype(self.dtype)?.reshape(dims)
    }

    /// `x (..., hidden) · Wᵀ` as `(..., vocab)`: the logits.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        if self.weight.dtype() == self.dtype {
            return Linear::new(self.weight.clone(), None).forward(x);
        }
        let mut dims = x.dims().to_vec();
        let hidden = self.weight.dim(1)?;
        let rows = x.elem_count() / hidden.max(1);
        let y = x
            .reshape((rows, hidden))?
            .contiguous()?
            .apply_op2_no_bwd(&self.weight, &WidenedMatmul)?;
        if let Some(last) = dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(dims)
    }
}

/// Whether every value of the f32 CPU tensor `t` is a bf16 value (its low 16 bits zero).
fn holds_only_bf16(t: &Tensor) -> Result<bool> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(v)), Some((lo, hi))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(false);
    };
    Ok(v[lo..hi].par_iter().all(|x| x.to_bits() & 0xffff == 0))
}

/// `x (m, k)` f32 times the transpose of `w (n, k)` bf16, on the CPU ([`widen`]).
struct WidenedMatmul;

impl CustomOp2 for WidenedMatmul {
    fn name(&self) -> &'static str {
        "bitnet-bf16-widened-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::BF16(w)) = (x, w) else {
            candle_core::bail!("{}: f32 activations and bf16 weights expected", self.name())
        };
        let (&[m, k], &[n, kw]) = (xl.dims(), wl.dims()) else {
            candle_core::bail!(
                "{}: two matrices expected, got {:?} and {:?}",
                self.name(),
                xl.dims(),
                wl.dims()
            )
        };
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
            candle_core::bail!("{}: contiguous operands expected", self.name())
        };
        if k != kw {
            candle_core::bail!("{}: activations of {k} features, weights of {kw}", self.name())
        }
        let out = widen::matmul_bf16_weights(&x[x0..x1], &w[w0..w1], m, n, k);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_values_are_held_as_bf16_and_products_match_f32() -> Result<()> {
        let (vocab, hidden) = (37, 24);
        let exact = Tensor::randn(0f32, 1.0, (vocab, hidden), &Device::Cpu)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        let m = VocabMatrix::new(exact.clone())?;
        assert_eq!(m.stored_dtype(), DType::BF16);
        let ids = Tensor::new(&[[3u32, 0, 36], [5, 5, 1]], &Device::Cpu)?;
        let rows = m.embed(&ids)?;
        assert_eq!(rows.dims(), [2, 3, hidden]);
        assert_eq!(rows.dtype(), DType::F32);
        let want = exact.index_select(&ids.flatten_all()?, 0)?.reshape((2, 3, hidden))?;
        assert_eq!(
            rows.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        let x = Tensor::randn(0f32, 1.0, (2, 3, hidden), &Device::Cpu)?;
        let got = m.logits(&x)?;
        assert_eq!(got.dims(), [2, 3, vocab]);
        let want = x.broadcast_matmul(&exact.t()?)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        Ok(())
    }

    #[test]
    fn other_values_stay_f32() -> Result<()> {
        let mut w = Tensor::randn(0f32, 1.0, (8, 16), &Device::Cpu)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        // One value with low bits set keeps the whole matrix f32.
        w = w.slice_assign(&[2..3, 5..6], &Tensor::new(&[[1.0f32 + f32::EPSILON]], &Device::Cpu)?)?;
        let m = VocabMatrix::new(w.clone())?;
        assert_eq!(m.stored_dtype(), DType::F32);
        let x = Tensor::randn(0f32, 1.0, (1, 16), &Device::Cpu)?;
        assert_eq!(m.logits(&x)?.to_vec2::<f32>()?, x.matmul(&w.t()?)?.to_vec2::<f32>()?);
        // A bf16 model keeps its matrix as it is, products included (candle's own matmul).
        let (w16, x16) = (w.to_dtype(DType::BF16)?, x.to_dtype(DType::BF16)?);
        let m16 = VocabMatrix::new(w16.clone())?;
        assert_eq!(m16.stored_dtype(), DType::BF16);
        let want = x16.matmul(&w16.t()?)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        assert_eq!(m16.logits(&x16)?.to_dtype(DType::F32)?.to_vec2::<f32>()?, want);
        Ok(())
    }
}
