//! What the fused attention kernel reads besides the token's projections (shared by the op in
//! `fused.rs` and its launch in `fused/cuda.rs`).

use candle_core::Tensor;

/// The layer state of one token's attention: RoPE tables, position, caches, sub-norm, shapes.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU runs the tensor ops
pub(crate) struct AttentionArgs<'a> {
    /// RoPE `cos` table `(positions, d / 2)` in the model's dtype.
    pub cos: &'a Tensor,
    /// RoPE `sin` table, as `cos`.
    pub sin: &'a Tensor,
    /// The token's position, u32 `(1,)`.
    pub pos: &'a Tensor,
    /// Keys `(1, kv_heads, capacity, d)`; written in place at the position.
    pub cache_k: &'a Tensor,
    /// Values, as `cache_k`.
    pub cache_v: &'a Tensor,
    /// `attn_sub_norm`'s gain `(heads · d,)` and epsilon, where the kernel runs the sub-norm
    /// (`None`: the next projection does).
    pub sub_norm: Option<(&'a Tensor, f32)>,
    /// One u32, zero between calls: with the sub-norm, the blocks count themselves in to find
    /// the last one, which resets it.
    pub counter: &'a Tensor,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Values a head.
    pub head_dim: usize,
}
