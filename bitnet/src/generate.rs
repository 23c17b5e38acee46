//! Token generation: prefill the prompt, then decode one token at a time through the KV cache,
//! sampling greedily (temperature 0) or with temperature and nucleus (top-p) from a seeded RNG.

use std::time::Instant;

use candle_core::{bail, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::fused::argmax_host as argmax;
use crate::graph::StepOutput;
use crate::model::BitNetModel;

/// How the next token is picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); above 0 divides the logits before the softmax.
    pub temperature: f64,
    /// Nucleus sampling: draw among the most likely tokens whose probabilities first sum to at
    /// least `top_p` (in `(0, 1]`; 1 keeps every token). Unused when greedy.
    pub top_p: f64,
    /// Seed of the sampling RNG: the same seed, model and prompt give the same tokens.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };

    fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("temperature {} must be a finite number >= 0", self.temperature)
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p {} must be in (0, 1]", self.top_p)
        }
        Ok(())
    }
}

/// Picks tokens from logits under a [`Sampling`].
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler; an invalid temperature or `top_p` is an error.
    pub fn new(sampling: Sampling) -> Result<Self> {
        sampling.validate()?;
        Ok(Self {
            sampling,
            rng: StdRng::seed_from_u64(sampling.seed),
        })
    }

    /// The next token from one row of logits. Greedy picks the first maximum (as `argmax` in
    /// torch); NaN logits are never picked.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            bail!("sample: no logits")
        }
        let best = argmax(logits).ok_or_else(|| candle_core::Error::Msg("sample: every logit is NaN".into()))?;
        if self.sampling.temperature == 0.0 {
            return Ok(best as u32);
        }
        // Softmax in f64 relative to the maximum, so large logits do not overflow.
        let max = logits[best] as f64;
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (i, ((l as f64 - max) / self.sampling.temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        // Most likely first; ties by index, so the order (and thus the draw) is deterministic.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1 / total;
            if mass >= self.sampling.top_p {
                break;
            }
        }
        let probs = &probs[..kept];
        let kept_total: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.gen::<f64>() * kept_total;
        for &(i, p) in probs {
            if u < p {
                return Ok(i as u32);
            }
            u -= p;
        }
        Ok(probs[kept - 1].0 as u32)
    }
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// The new tokens (not the prompt), including a final stop token if one was drawn.
    pub tokens: Vec<u32>,
    /// Prompt tokens run in the prefill.
    pub prompt_tokens: usize,
    /// Seconds of the prefill (prompt through the model, first token sampled).
    pub prefill_secs: f64,
    /// Seconds of the decode steps (every token after the first).
    pub decode_secs: f64,
}

impl GenerationOutput {
    /// Prompt tokens per second of the prefill.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs
    }

    /// Decode tokens per second (tokens after the first over the decode time); NaN with fewer
    /// than two new tokens.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let steps = self.tokens.len().saturating_sub(1);
        if steps == 0 {
            f64::NAN
        } else {
            steps as f64 / self.decode_secs
        }
    }
}

/// A generation run on a model.
#[derive(Debug)]
pub struct Generation<'a> {
    model: &'a BitNetModel,
    sampling: Sampling,
    stop: Vec<u32>,
    decode: DecodeMode,
}

/// How [`Generation`] runs the steps after the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeMode {
    /// Each token through [`BitNetModel::forward_last`] over the cache prefix, on every device.
    #[default]
    Eager,
    /// [`BitNetModel::decode_at`] captured once as a CUDA graph and replayed for every token
    /// (a build with `cuda`, a device made with `Device::new_cuda_with_stream` with cudarc's
    /// event tracking off: `CudaDevice::disable_event_tracking`). Greedy sampling picks the token
    /// on the device ([`BitNetModel::decode_greedy_at`]); on the fused kernels each step feeds
    /// its token to the next on the device, so the host queues one step ahead and reads each
    /// token from mapped host memory when its step completes (a stop token leaves the one step
    /// queued past it unused). Other sampling reads back the logits a step. Its greedy tokens are
    /// those of `decode_at` run eagerly;
    /// they can leave [`DecodeMode::Eager`]'s after a few tokens: the fused kernels and attention
    /// over the whole masked cache round differently from the tensor ops over the prefix, and the
    /// int8 activation quantization of every projection amplifies it.
    CudaGraph,
}

impl<'a> Generation<'a> {
    /// Generation on `model` under `sampling`, with no stop tokens.
    pub fn new(model: &'a BitNetModel, sampling: Sampling) -> Self {
        Self {
            model,
            sampling,
            stop: Vec::new(),
            decode: DecodeMode::Eager,
        }
    }

    /// Runs the decode steps as `mode` says (default [`DecodeMode::Eager`]).
    pub fn decode_mode(mut self, mode: DecodeMode) -> Self {
        self.decode = mode;
        self
    }

    /// Stops after any of `tokens` is generated (e.g. the config's EOS ids).
    pub fn stop_at(mut self, tokens: Vec<u32>) -> Self {
        self.stop = tokens;
        self
    }

    /// Checks what [`Self::run`] would reject before it runs anything: invalid sampling
    /// settings, CUDA graph decoding off CUDA, an empty prompt, a token outside the vocabulary, or more tokens than
    /// `max_position_embeddings`.
    pub fn check(&self, prompt: &[u32], max_new_tokens: usize) -> Result<()> {
        self.sampling.validate()?;
        if self.decode == DecodeMode::CudaGraph && !(cfg!(feature = "cuda") && self.model.device().is_cuda()) {
            bail!("generate: CUDA graph decoding needs a CUDA device (and a build with the `cuda` feature)")
        }
        #[cfg(feature = "cuda")]
        if let (DecodeMode::CudaGraph, candle_core::Device::Cuda(d)) = (self.decode, self.model.device()) {
            if d.is_event_tracking() {
                bail!(
                    "generate: CUDA graph decoding needs cudarc's per-allocation event tracking off \
                     (`CudaDevice::disable_event_tracking`, sound while the device's one stream does all \
                     the work): a capture cannot wait on events recorded before it"
                )
            }
        }
        if prompt.is_empty() {
            bail!("generate: the prompt has no tokens")
        }
        let max_pos = self.model.config().max_position_embeddings;
        if prompt.len() + max_new_tokens > max_pos {
            bail!(
                "generate: {} prompt + {max_new_tokens} new tokens exceed max_position_embeddings {max_pos}",
                prompt.len()
            )
        }
        let vocab = self.model.config().vocab_size as u32;
        if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
            bail!("generate: prompt token {bad} is outside the vocabulary of {vocab}")
        }
        Ok(())
    }

    /// Runs `prompt` then generates up to `max_new_tokens`, calling `on_token` with each new
    /// token as soon as it is sampled. The prompt plus the new tokens must fit in
    /// `max_position_embeddings`.
    pub fn run(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<GenerationOutput> {
        self.check(prompt, max_new_tokens)?;
        let mut sampler = Sampler::new(self.sampling)?;
        let device = self.model.device();
        let mut cache = self.model.new_cache(prompt.len() + max_new_tokens)?;
        let mut tokens = Vec::with_capacity(max_new_tokens);
        let t0 = Instant::now();
        let mut input = Tensor::new(prompt, device)?.unsqueeze(0)?;
        let mut prefill_secs = 0.0;
        if self.decode == DecodeMode::CudaGraph && max_new_tokens > 0 {
            // The prompt eagerly, then every step from the graph.
            let logits = self.model.forward_last(&input, &mut cache)?.squeeze(0)?;
            let first = sampler.sample(&logits.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)?;
            prefill_secs = t0.elapsed().as_secs_f64();
            tokens.push(first);
            on_token(first)?;
            if !self.stop.contains(&first) {
                let greedy = self.sampling.temperature == 0.0;
                self.graph_steps(&mut cache, first, prompt.len(), max_new_tokens - 1, greedy, |step| {
                    let next = match step {
                        StepOutput::Logits(logits) => sampler.sample(logits)?,
                        StepOutput::Greedy(u32::MAX) => bail!("sample: every logit is NaN"),
                        StepOutput::Greedy(token) => token,
                    };
                    tokens.push(next);
                    on_token(next)?;
                    Ok((!self.stop.contains(&next)).then_some(next))
                })?;
            }
        }
        while self.decode == DecodeMode::Eager && tokens.len() < max_new_tokens {
            let logits = self.model.forward_last(&input, &mut cache)?.squeeze(0)?;
            let next = sampler.sample(&logits.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)?;
            if tokens.is_empty() {
                prefill_secs = t0.elapsed().as_secs_f64();
            }
            tokens.push(next);
            on_token(next)?;
            if self.stop.contains(&next) {
                break;
            }
            input = Tensor::new(&[next], device)?.unsqueeze(0)?;
        }
        let total = t0.elapsed().as_secs_f64();
        Ok(GenerationOutput {
            tokens,
            prompt_tokens: prompt.len(),
            prefill_secs,
            decode_secs: total - prefill_secs,
        })
    }
}

impl Generation<'_> {
    #[cfg(feature = "cuda")]
    fn graph_steps(
        &self,
        cache: &mut crate::Cache,
        first: u32,
        start: usize,
        steps: usize,
        greedy: bool,
        mut next: impl FnMut(StepOutput) -> Result<Option<u32>>,
    ) -> Result<()> {
        crate::graph::decode(self.model, cache, first, start, steps, greedy, &mut next)
    }

    #[cfg(not(feature = "cuda"))]
    fn graph_steps(
        &self,
        _: &mut crate::Cache,
        _: u32,
        _: usize,
        _: usize,
        _: bool,
        _: impl FnMut(StepOutput) -> Result<Option<u32>>,
    ) -> Result<()> {
        bail!("DecodeMode::CudaGraph needs a build with the `cuda` feature")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(sampling: Sampling, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(sampling).unwrap();
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits).unwrap() as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_picks_first_maximum_and_skips_nan() {
        let mut s = Sampler::new(Sampling::GREEDY).unwrap();
        assert_eq!(s.sample(&[0.5, 2.0, -1.0, 2.0]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NAN, -3.0, -4.0]).unwrap(), 1);
        assert!(s.sample(&[f32::NAN]).is_err());
        assert!(s.sample(&[]).is_err());
    }

    #[test]
    fn temperature_one_follows_the_softmax() {
        // Probabilities 1/4, 3/4: 8000 draws put the share of token 1 within 0.03 of 0.75
        // (about 6 standard deviations).
        let logits = [0.0f32, 3f32.ln()];
        let c = draws(
            Sampling {
                temperature: 1.0,
                top_p: 1.0,
                seed: 7,
            },
            &logits,
            8000,
        );
        let share = c[1] as f64 / 8000.0;
        assert!((share - 0.75).abs() < 0.03, "{c:?}");
        // Temperature 0.5 squares the odds: 1/10, 9/10.
        let c = draws(
            Sampling {
                temperature: 0.5,
                top_p: 1.0,
                seed: 8,
            },
            &logits,
            8000,
        );
        assert!((c[1] as f64 / 8000.0 - 0.9).abs() < 0.03, "{c:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities 0.6, 0.3, 0.1 (in shuffled order).
        let logits = [0.3f32.ln(), 0.1f32.ln(), 0.6f32.ln()];
        let only_top = draws(
            Sampling {
                temperature: 1.0,
                top_p: 0.5,
                seed: 1,
            },
            &logits,
            500,
        );
        assert_eq!(only_top, vec![0, 0, 500]);
        let two = draws(
            Sampling {
                temperature: 1.0,
                top_p: 0.85,
                seed: 2,
            },
            &logits,
            3000,
        );
        assert_eq!(two[1], 0, "{two:?}");
        // Renormalized over the nucleus: 0.6 / 0.9 = 2/3 for the top token.
        assert!((two[2] as f64 / 3000.0 - 2.0 / 3.0).abs() < 0.04, "{two:?}");
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.1).collect();
        let run = |seed| {
            let mut s = Sampler::new(Sampling {
                temperature: 1.0,
                top_p: 0.95,
                seed,
            })
            .unwrap();
            (0..64).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn invalid_settings_are_errors() {
        for (t, p) in [
            (-0.1, 1.0),
            (f64::NAN, 1.0),
            (f64::INFINITY, 1.0),
            (1.0, 0.0),
            (1.0, 1.5),
            (1.0, f64::NAN),
        ] {
            let e = Sampler::new(Sampling {
                temperature: t,
                top_p: p,
                seed: 0,
            })
            .unwrap_err();
            assert!(
                e.to_string().contains(if t.is_finite() && t >= 0.0 {
                    "top_p"
                } else {
                    "temperature"
                }),
                "{e}"
            );
        }
    }
}
