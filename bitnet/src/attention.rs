//! Grouped-query self-attention with a preallocated KV cache and BitNet's `attn_sub_norm`.

use bitlinear::InputNorm;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

use crate::config::BitNetConfig;
use crate::linear::{BitNetLinear, Projections};
use crate::rope::Rope;
use crate::stacked::StackedLinear;

/// Keys and values of one layer for positions `0..capacity`, allocated once so that a decode
/// step writes in place instead of concatenating.
#[derive(Debug, Clone)]
pub struct LayerCache {
    k: Tensor,
    v: Tensor,
}

impl LayerCache {
    /// Zeroed buffers `(batch, kv_heads, capacity, head_dim)` of `dtype` (the model's).
    pub fn new(cfg: &BitNetConfig, batch: usize, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        let shape = (batch, cfg.kv_heads(), capacity, cfg.head_dim());
        Ok(Self {
            k: Tensor::zeros(shape, dtype, device)?,
            v: Tensor::zeros(shape, dtype, device)?,
        })
    }
}

/// One attention block: q/k/v projections, RoPE, causal attention over the cache,
/// `attn_sub_norm`, then `o_proj` (the sub-norm is BitNet's addition to the Llama block).
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: BitNetLinear,
    k_proj: BitNetLinear,
    v_proj: BitNetLinear,
    /// q, k and v stacked for the fused decode step (one product for the three); only on CUDA
    /// devices, where that step runs.
    qkv_stacked: Option<StackedLinear>,
    o_proj: BitNetLinear,
    attn_sub_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads `self_attn` under `vb`.
    pub fn load(cfg: &BitNetConfig, projections: Projections, vb: VarBuilder) -> Result<Self> {
        let (h, kvh, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let hidden = cfg.hidden_size;
        let q_proj = BitNetLinear::load_as(hidden, h * d, projections, vb.pp("q_proj"))?;
        let k_proj = BitNetLinear::load_as(hidden, kvh * d, projections, vb.pp("k_proj"))?;
        let v_proj = BitNetLinear::load_as(hidden, kvh * d, projections, vb.pp("v_proj"))?;
        let qkv_stacked = if vb.device().is_cuda() {
            Some(StackedLinear::new(&[q_proj.clone(), k_proj.clone(), v_proj.clone()])?)
        } else {
            None
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            qkv_stacked,
            o_proj: BitNetLinear::load_as(h * d, hidden, projections, vb.pp("o_proj"))?,
            attn_sub_norm: candle_nn::rms_norm(hidden, cfg.rms_norm_eps, vb.pp("attn_sub_norm"))?,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        })
    }

    /// `x (batch, seq, hidden)` whose first token sits at position `start`; writes its keys and
    /// values into `cache` at `start..start + seq` and attends over `0..start + seq`.
    pub fn forward(&self, x: &Tensor, start: usize, rope: &Rope, cache: &mut LayerCache) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let heads = |t: Tensor, n: usize| t.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous();
        let q = rope.apply(&heads(self.q_proj.forward(x)?, h)?, start)?;
        let k = rope.apply(&heads(self.k_proj.forward(x)?, kvh)?, start)?;
        let v = heads(self.v_proj.forward(x)?, kvh)?;
        cache.k.slice_set(&k, 2, start)?;
        cache.v.slice_set(&v, 2, start)?;
        let t = start + s;
        let mask = if s > 1 {
            Some(causal_mask(h / kvh, s, start, x.device())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        self.attend(q, &cache.k.narrow(2, 0, t)?, &cache.v.narrow(2, 0, t)?, mask.as_ref())
    }

    /// One token `x (batch, 1, hidden)` at the position held on the device in `pos` (u32, `(1,)`):
    /// writes its key and value into `cache` there and attends over the whole cache, the
    /// positions after `pos` hidden by `future (capacity,)` (0 where visible, the dtype's most
    /// negative value where not). No shape depends on the position, so the same kernels with
    /// the same arguments serve every step (what a CUDA graph replay needs).
    pub fn forward_at(
        &self,
        x: &Tensor,
        pos: &Tensor,
        future: &Tensor,
        rope: &Rope,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        if s != 1 {
            candle_core::bail!("forward_at runs one token, got {s}")
        }
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let heads = |t: Tensor, n: usize| t.reshape((b, 1, n, d))?.transpose(1, 2)?.contiguous();
        let q = rope.apply_at(&heads(self.q_proj.forward(x)?, h)?, pos)?;
        let k = rope.apply_at(&heads(self.k_proj.forward(x)?, kvh)?, pos)?;
        let v = heads(self.v_proj.forward(x)?, kvh)?;
        let idx = pos.reshape((1, 1, 1, 1))?.broadcast_as((b, kvh, 1, d))?.contiguous()?;
        cache.k.scatter_set(&idx, &k, 2)?;
        cache.v.scatter_set(&idx, &v, 2)?;
        self.attend(q, &cache.k, &cache.v, Some(future))
    }

    /// [`Self::forward_at`] for one sequence on the fused CUDA kernels (`crate::fused`), from the
    /// residual stream `x (1, 1, hidden)` and the last block's output `delta` not yet added to it
    /// (`None` in the first layer): q, k and v of `input_norm(x + delta)` as one GEMV that runs
    /// the add and the norm itself, RoPE, the cache write and the attention as one kernel, then
    /// `o_proj` of the sub-norm as one GEMV again (dense projections: the norms as kernels of
    /// their own). Returns the output `(1, 1, hidden)` and `x + delta` where there was a delta.
    /// `counter` is the kernel's block counter (one u32, zero between calls).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_fused(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        input_norm: &RmsNorm,
        pos: &Tensor,
        rope: &Rope,
        cache: &mut LayerCache,
        counter: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (cos, sin) = rope.tables();
        let Some(qkv) = &self.qkv_stacked else {
            candle_core::bail!("attention: the fused step needs the stacked projections (CUDA)")
        };
        let &[q_scale, k_scale, v_scale] = qkv.scales() else {
            candle_core::bail!("attention: q, k and v stacked into other than three parts")
        };
        let sub_eps = self.attn_sub_norm.eps() as f32;
        let attention = crate::fused::DecodeAttention {
            args: crate::fused::AttentionArgs {
                cos,
                sin,
                pos,
                cache_k: &cache.k,
                cache_v: &cache.v,
                // packed o_proj: the sub-norm runs in its GEMV
                sub_norm: match self.o_proj.weight() {
                    Some(_) => None,
                    None => Some((self.attn_sub_norm.weight(), sub_eps)),
                },
                counter,
                heads: self.heads,
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
            },
            scales: [q_scale, k_scale, v_scale],
        };
        let norm = InputNorm::AddRmsNorm {
            delta,
            gain: input_norm.weight(),
            eps: input_norm.eps() as f32,
            gain_settled: true,
        };
        let (qkv_out, sum) = qkv.forward_stacked_normed(x, &norm)?;
        let y = attention.forward(&qkv_out)?.reshape(x.dims())?;
        let out = match self.o_proj.weight() {
            Some(_) => {
                let sub_norm = InputNorm::AddRmsNorm {
                    delta: None,
                    gain: self.attn_sub_norm.weight(),
                    eps: sub_eps,
                    gain_settled: true,
                };
                self.o_proj.forward_normed(&y, &sub_norm)?.0
            }
            None => self.o_proj.forward(&y)?,
        };
        Ok((out, sum))
    }

    /// Head size, query heads and key/value heads.
    pub fn heads(&self) -> (usize, usize, usize) {
        (self.head_dim, self.heads, self.kv_heads)
    }

    /// Attention of `q (b, heads, s, d)` over `k`, `v (b, kv_heads, t, d)` (views of the cache),
    /// plus the additive `mask` (broadcast to `(groups · s, t)`), then `attn_sub_norm` and `o_proj`.
    fn attend(&self, q: Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, s, _) = q.dims4()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        // Grouped-query attention without copying the cache: the `h / kvh` query heads that share
        // a KV head are stacked along the rows, (b, kvh, groups · s, d).
        let groups = h / kvh;
        let q = q.reshape((b, kvh, groups * s, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        // (b, kvh, groups · s, d) = (b, h, s, d)
        let y = if s == 1 && mask.is_none() && crate::attention_cpu::supported(&q) {
            // one token on the CPU: one op instead of four thread-pool hand-offs
            crate::attention_cpu::decode_attention(&q, k, v, scale as f32)?
        } else {
            let mut att = (q.matmul(&k.transpose(2, 3)?)? * scale)?;
            if let Some(mask) = mask {
                att = att.broadcast_add(mask)?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            // The cache view is strided only between heads: both matmul backends take it as it is.
            att.matmul(v)?
        };
        let y = y.reshape((b, h, s, d))?.transpose(1, 2)?.reshape((b, s, h * d))?;
        self.o_proj.forward(&self.attn_sub_norm.forward(&y)?)
    }
}

/// Additive mask `(groups · s, start + s)`: row `r` is the query at position `start + r % s`,
/// which sees keys `0..=start + r % s`.
fn causal_mask(groups: usize, s: usize, start: usize, device: &Device) -> Result<Tensor> {
    let t = start + s;
    let mask: Vec<f32> = (0..groups * s)
        .flat_map(|r| (0..t).map(move |j| if j <= start + r % s { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (groups * s, t), device)
}
