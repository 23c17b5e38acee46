//! Rotary position embeddings, the `rotate_half` (non-interleaved) form of transformers' BitNet.

use candle_core::{DType, Device, Result, Tensor};

/// Precomputed `cos` and `sin` tables `(max_positions, head_dim / 2)`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for positions `0..max_positions`, computed as in transformers in f32
    /// (`inv_freq[i] = 1 / base^(2i / head_dim)`, angle `position · inv_freq[i]`), stored in
    /// `dtype` (the activations'; transformers also casts them to the activations' dtype).
    pub fn new(base: f64, head_dim: usize, max_positions: usize, dtype: DType, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let base = base as f32;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?,
        })
    }

    /// The `cos` and `sin` tables, `(max_positions, head_dim / 2)`.
    pub(crate) fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x (batch, heads, seq, head_dim)` whose first row sits at position `start`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, start, seq)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, start, seq)?.to_dtype(x.dtype())?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }

    /// Rotates one row per head, `x (batch, heads, 1, head_dim)`, at the position held on the
    /// device in `pos` (u32, `(1,)`).
    pub fn apply_at(&self, x: &Tensor, pos: &Tensor) -> Result<Tensor> {
        let cos = self.cos.index_select(pos, 0)?.to_dtype(x.dtype())?;
        let sin = self.sin.index_select(pos, 0)?.to_dtype(x.dtype())?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}
