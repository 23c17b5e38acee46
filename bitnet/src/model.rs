//! The BitNet b1.58 causal language model: embeddings, decoder layers, final norm, head.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

use crate::attention::{Attention, LayerCache};
use crate::config::{BitNetConfig, ConfigError};
use crate::fused::{self, DecodeKernels};
use crate::head::VocabMatrix;
use crate::linear::Projections;
use crate::mlp::Mlp;
use crate::rope::Rope;

/// Why a model directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `config.json` is missing, unreadable, malformed or unsupported.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `model.safetensors` is missing.
    #[error("no weights at {0} (a single model.safetensors file is expected)")]
    MissingWeights(PathBuf),
    /// A tensor is missing, has the wrong shape or holds invalid packed codes.
    #[error("cannot load weights from {path}: {source}")]
    Weights {
        /// The safetensors file.
        path: PathBuf,
        /// candle's error, naming the tensor.
        source: candle_core::Error,
    },
}

/// Keys and values of every layer, preallocated for `capacity` positions, and how many are
/// filled. A fresh cache starts a new sequence.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<LayerCache>,
    len: usize,
    capacity: usize,
    /// `0..capacity` (u32) on the device: [`BitNetModel::decode_at`] masks the positions after
    /// the current one against it.
    positions: Tensor,
    /// One u32, zero between calls: the fused kernels' count of finished blocks (each kernel
    /// resets it when its last block is done).
    block_counter: Tensor,
}

impl Cache {
    /// An empty cache for `batch` sequences of up to `capacity` tokens, keys and values in
    /// `dtype` (the model's, [`BitNetModel::dtype`]).
    pub fn new(cfg: &BitNetConfig, batch: usize, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| LayerCache::new(cfg, batch, capacity, dtype, device))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: 0,
            capacity,
            positions: Tensor::arange(0u32, capacity as u32, device)?,
            block_counter: Tensor::zeros(1, DType::U32, device)?,
        })
    }

    /// Tokens already in the cache (the position of the next one).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets the sequence (the buffers are kept and overwritten).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// One decoder layer: pre-norm attention and pre-norm FFN, each added to the residual.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(cfg: &BitNetConfig, projections: Projections, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: candle_nn::rms_norm(h, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::load(cfg, projections, vb.pp("self_attn"))?,
            post_attention_layernorm: candle_nn::rms_norm(h, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::load(cfg, projections, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor, start: usize, rope: &Rope, cache: &mut LayerCache) -> Result<Tensor> {
        self.residual_block(x, |h| self.self_attn.forward(h, start, rope, cache))
    }

    fn forward_at(
        &self,
        x: &Tensor,
        pos: &Tensor,
        future: &Tensor,
        rope: &Rope,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        self.residual_block(x, |h| self.self_attn.forward_at(h, pos, future, rope, cache))
    }

    /// `x + attention(norm(x))`, then that plus `mlp(norm(·))`.
    fn residual_block(&self, x: &Tensor, attention: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let x = (x + attention(&self.input_layernorm.forward(x)?)?)?;
        let m = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + m
    }
}

/// `BitNetForCausalLM`: token ids in, next-token logits out. The projections are packed ternary
/// (int8 activations on the `bitlinear` kernels); embeddings, norms, attention, KV cache and
/// head are float in the model's dtype (f32 matches transformers' logits within 1e-5; bf16 halves
/// the head's and the cache's memory traffic, for GPUs). Logits come out in that dtype. An f32
/// model on the CPU whose embedding/head values are all bf16 (a bf16 checkpoint) holds them as
/// bf16 and widens them in its kernels: exact, half the head's bytes a token.
#[derive(Debug, Clone)]
pub struct BitNetModel {
    config: BitNetConfig,
    embed_tokens: VocabMatrix,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: VocabMatrix,
    rope: Rope,
    dtype: DType,
    device: Device,
    decode_kernels: DecodeKernels,
}

impl BitNetModel {
    /// Loads a Hugging Face model directory: `config.json` and `model.safetensors` in the packed
    /// layout of `microsoft/bitnet-b1.58-2B-4T`, float weights converted to `dtype` (F32, BF16
    /// or F16).
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let config = BitNetConfig::from_file(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        if !path.is_file() {
            return Err(LoadError::MissingWeights(path));
        }
        // SAFETY: the file is mapped read-only; it must not be modified while being read.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], dtype, device) }
            .and_then(|vb| Self::load(config, vb))
            .map_err(|source| LoadError::Weights {
                path: path.clone(),
                source,
            })?;
        Ok(vb)
    }

    /// Builds the model from `vb` (rooted above `model.` / `lm_head.`), packed projections, float
    /// weights converted to `vb`'s dtype (which must be F32, BF16 or F16).
    pub fn load(config: BitNetConfig, vb: VarBuilder) -> Result<Self> {
        Self::load_with(config, Projections::PackedTernary, vb)
    }

    /// [`BitNetModel::load`] with the projections stored as `projections` says
    /// ([`Projections::Dense`]: the full-precision baseline of the same architecture).
    pub fn load_with(config: BitNetConfig, projections: Projections, vb: VarBuilder) -> Result<Self> {
        let (device, dtype) = (vb.device().clone(), vb.dtype());
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            candle_core::bail!("BitNetModel: float weights must be f32, bf16 or f16, not {dtype:?}")
        }
        let m = vb.pp("model");
        let (h, vocab) = (config.hidden_size, config.vocab_size);
        let embed_tokens = VocabMatrix::new(m.pp("embed_tokens").get((vocab, h), "weight")?)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&config, projections, m.pp("layers").pp(i)))
            .collect::<Result<_>>()?;
        let norm = candle_nn::rms_norm(h, config.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            VocabMatrix::new(vb.pp("lm_head").get((vocab, h), "weight")?)?
        };
        let rope = Rope::new(
            config.rope_base(),
            config.head_dim(),
            config.max_position_embeddings,
            dtype,
            &device,
        )?;
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            device,
            decode_kernels: DecodeKernels::default(),
        })
    }

    /// The dtype the LM head's weights are held in: the model's, or bf16 for an f32 model on the
    /// CPU whose head values are all bf16 (widened inside the head's kernel, exactly).
    pub fn head_dtype(&self) -> DType {
        self.lm_head.stored_dtype()
    }

    /// Which kernels run the float parts of [`Self::decode_at`] (default
    /// [`DecodeKernels::Fused`]).
    pub fn set_decode_kernels(&mut self, kernels: DecodeKernels) {
        self.decode_kernels = kernels;
    }

    /// The setting of [`Self::set_decode_kernels`].
    pub fn decode_kernels(&self) -> DecodeKernels {
        self.decode_kernels
    }

    /// Whether [`Self::decode_at`] runs the fused kernels for a cache of `capacity` positions:
    /// [`DecodeKernels::Fused`] is set, the device is CUDA and the heads and the cache fit the
    /// attention kernel (`crate::fused`).
    pub fn decode_fused(&self, capacity: usize) -> bool {
        self.decode_kernels == DecodeKernels::Fused
            && self.device.is_cuda()
            && self.layers.first().is_none_or(|l| {
                let (d, h, kvh) = l.self_attn.heads();
                fused::attention_supported(d, h, kvh, capacity)
            })
    }

    /// The dtype of the float weights, activations, KV cache and logits.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The configuration.
    pub fn config(&self) -> &BitNetConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for one sequence of up to `capacity` tokens (at most
    /// `max_position_embeddings`).
    pub fn new_cache(&self, capacity: usize) -> Result<Cache> {
        let capacity = capacity.min(self.config.max_position_embeddings);
        Cache::new(&self.config, 1, capacity, self.dtype, &self.device)
    }

    /// Final hidden states `(batch, seq, hidden)` of `ids (batch, seq)` (u32), which continue the
    /// sequence in `cache`.
    fn hidden(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (_, s) = ids.dims2()?;
        let start = cache.len;
        if start + s > cache.capacity {
            candle_core::bail!(
                "sequence of {} tokens exceeds the cache capacity {} (max_position_embeddings {})",
                start + s,
                cache.capacity,
                self.config.max_position_embeddings
            )
        }
        let mut x = self.embed_tokens.embed(ids)?;
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, start, &self.rope, c)?;
        }
        cache.len += s;
        self.norm.forward(&x)
    }

    /// The head alone: logits `(..., vocab)` of final hidden states `(..., hidden)` (after the
    /// final norm).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.logits(hidden)
    }

    /// Logits `(batch, seq, vocab)` at every position of `ids`.
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.lm_head.logits(&self.hidden(ids, cache)?)
    }

    /// Logits `(batch, vocab)` at the last position of `ids` only (the head runs once per row).
    pub fn forward_last(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = self.hidden(ids, cache)?;
        let s = h.dim(1)?;
        self.lm_head.logits(&h.i((.., s - 1, ..))?.contiguous()?)
    }

    /// One decode step with the position on the device: logits `(1, vocab)` of token
    /// `id (1, 1)` (u32) at position `pos (1,)` (u32, below the cache capacity), whose key and
    /// value are written into `cache` there. Attention runs over the whole cache capacity with
    /// the later positions masked, so no shape, offset or host value depends on the position:
    /// after one call (which loads the kernels and settles the weights) the step can be captured
    /// once as a CUDA graph and replayed with new values written into `id` and `pos`. The result
    /// matches [`Self::forward_last`] at that position up to float rounding. It neither reads nor
    /// advances the cache's length; the caller tracks positions.
    ///
    /// With [`DecodeKernels::Fused`] on a CUDA device ([`Self::decode_fused`]) the norms,
    /// residual adds, RoPE, cache write, attention and sub-norms run as fused kernels: with packed
    /// projections a layer is one attention kernel and four GEMVs that run the norms and adds
    /// themselves (`bitlinear::packed_matmul_normed`), instead of about 25 kernels besides the
    /// projections (f32 inside each kernel, so the logits differ from the tensor ops' in
    /// rounding).
    pub fn decode_at(&self, id: &Tensor, pos: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        if id.dims() == [1, 1] && self.decode_fused(cache.capacity) {
            return self.decode_at_fused(id, pos, cache);
        }
        let future = cache
            .positions
            .broadcast_gt(pos)?
            .to_dtype(self.dtype)?
            .affine(most_negative(self.dtype)?, 0.0)?;
        let mut x = self.embed_tokens.embed(id)?;
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward_at(&x, pos, &future, &self.rope, c)?;
        }
        self.lm_head.logits(&self.norm.forward(&x)?.squeeze(1)?)
    }
}

impl BitNetModel {
    /// The greedy token of one row of `logits` (e.g. `(1, vocab)` from [`Self::decode_at`]) as
    /// u32 `(1,)` on the model's device: the first maximum, NaN never picked, `u32::MAX` if every
    /// logit is NaN (the greedy choice of [`crate::generate::Sampler`]). Where
    /// [`Self::decode_fused`] holds for `cache` it runs as one kernel on the device, so that a
    /// CUDA graph of a decode step can end in it and only the id is read back; elsewhere the
    /// logits are read to the host. `cache` must not be in use by another stream.
    pub fn greedy_token(&self, logits: &Tensor, cache: &Cache) -> Result<Tensor> {
        if self.decode_fused(cache.capacity) {
            return fused::argmax(logits, &cache.block_counter);
        }
        let values = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let id = fused::argmax_host(&values).map_or(u32::MAX, |i| i as u32);
        Tensor::new(&[id], &self.device)
    }

    /// One decode step as [`Self::decode_at`] that returns the greedy token of its logits, u32
    /// `(1,)` on the model's device (as [`Self::greedy_token`] picks it: the first maximum, NaN
    /// never picked, `u32::MAX` if every logit is NaN). Where the fused kernels run the step
    /// ([`Self::decode_fused`]) and the head (held in the model's dtype, rows of whole 16-byte
    /// chunks) the head kernel that computes the logits picks the token too and writes no
    /// logits; elsewhere it is [`Self::greedy_token`] of [`Self::decode_at`]'s logits.
    pub fn decode_greedy_at(&self, id: &Tensor, pos: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.decode_greedy_fed(id, pos, cache, None)
    }

    /// Whether a fused step ends in the head kernel (`kernels/head.cu`): the head is held in the
    /// model's dtype and its rows suit the kernel.
    pub(crate) fn head_fused(&self) -> bool {
        self.lm_head.stored_dtype() == self.dtype && fused::head_supported(self.config.hidden_size, self.dtype)
    }

    /// [`Self::decode_greedy_at`], the token also fed to the next step on the device where
    /// `feedback` is given (which needs the fused step and head: an error elsewhere).
    pub(crate) fn decode_greedy_fed(
        &self,
        id: &Tensor,
        pos: &Tensor,
        cache: &mut Cache,
        feedback: Option<fused::Feedback>,
    ) -> Result<Tensor> {
        if id.dims() == [1, 1] && self.decode_fused(cache.capacity) && self.head_fused() {
            let (x, delta) = self.layers_fused(id, pos, cache)?;
            return self.fused_head(&x, delta.as_ref(), cache, fused::HeadOutput::Greedy(feedback));
        }
        if feedback.is_some() {
            candle_core::bail!("decode: the token is fed back on the device only by the fused head kernel")
        }
        let logits = self.decode_at(id, pos, cache)?;
        self.greedy_token(&logits, cache)
    }

    /// [`Self::decode_at`] on the fused kernels: each residual add runs with the norm after it,
    /// inside the next projection's GEMV for packed weights (a block's output is carried as the
    /// `delta` the next norm adds to the residual stream), the last one in the head kernel.
    fn decode_at_fused(&self, id: &Tensor, pos: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (x, delta) = self.layers_fused(id, pos, cache)?;
        if self.head_fused() {
            return self.fused_head(&x, delta.as_ref(), cache, fused::HeadOutput::Logits);
        }
        let normed = match delta {
            Some(d) => fused::add_rms_norm(&x, &d, self.norm.weight(), self.norm.eps())?.1,
            None => self.norm.forward(&x)?,
        };
        self.lm_head.logits(&normed.squeeze(1)?)
    }

    /// The decoder layers of a fused step: the residual stream before the last layer's output,
    /// and that output (`None` without layers).
    fn layers_fused(&self, id: &Tensor, pos: &Tensor, cache: &mut Cache) -> Result<(Tensor, Option<Tensor>)> {
        let mut x = self.embed_tokens.embed(id)?;
        let mut delta: Option<Tensor> = None;
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let (attention, sum) = layer.self_attn.forward_fused(
                &x,
                delta.as_ref(),
                &layer.input_layernorm,
                pos,
                &self.rope,
                c,
                &cache.block_counter,
            )?;
            let x1 = sum.unwrap_or(x);
            let (mlp, x2) = layer
                .mlp
                .forward_fused(&x1, &attention, &layer.post_attention_layernorm)?;
            (x, delta) = (x2, Some(mlp));
        }
        Ok((x, delta))
    }

    /// The final add + norm and the head as one kernel ([`fused::LmHead`]).
    fn fused_head(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        cache: &Cache,
        output: fused::HeadOutput,
    ) -> Result<Tensor> {
        fused::LmHead {
            delta,
            gamma: self.norm.weight(),
            eps: self.norm.eps() as f32,
            weight: self.lm_head.weight(),
            counter: &cache.block_counter,
            output,
        }
        .forward(x)
    }
}

/// The most negative finite value of a float dtype: an additive mask that zeroes a softmax entry
/// without the NaN that `0 · -inf` would give when the mask is scaled from 0/1.
fn most_negative(dtype: DType) -> Result<f64> {
    Ok(match dtype {
        DType::F32 => f32::MIN as f64,
        DType::F64 => f64::MIN,
        // -(2 - 2^-7) · 2^127 and -65504, the formats' largest finite magnitudes.
        DType::BF16 => -3.3895313892515355e38,
        DType::F16 => -65504.0,
        d => candle_core::bail!("no float mask value for {d:?}"),
    })
}
