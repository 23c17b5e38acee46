//! `bitnet`: generate text with a BitNet b1.58 model directory in the Hugging Face packed layout
//! (config.json, model.safetensors, tokenizer.json).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use bitnet::generate::{DecodeMode, Generation, Sampling};
use bitnet::BitNetModel;
use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
use tokenizers::Tokenizer;

/// Generate text with a BitNet b1.58 model (e.g. microsoft/bitnet-b1.58-2B-4T).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Model directory: config.json, model.safetensors (packed uint8 weights), tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy; above 0 samples from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: draw among the most likely tokens whose probabilities reach top_p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampling RNG.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after an end-of-sequence token (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
    /// Float dtype of embeddings, norms, attention, KV cache and head: auto is f32 on the CPU
    /// (transformers' logits within 1e-5) and bf16 on CUDA (half the head's memory traffic).
    #[arg(long, value_enum, default_value_t = FloatKind::Auto)]
    dtype: FloatKind,
    /// CUDA: decode with one captured CUDA graph replayed per token (about 2x the tokens/s of
    /// eager decoding). Greedy output can differ from the eager path after a few tokens: the
    /// graph's step attends over the whole masked cache, which rounds differently.
    #[arg(long)]
    cuda_graph: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FloatKind {
    Auto,
    F32,
    Bf16,
}

fn dtype(kind: FloatKind, device: &Device) -> DType {
    match kind {
        FloatKind::Auto if device.is_cuda() => DType::BF16,
        FloatKind::Auto | FloatKind::F32 => DType::F32,
        FloatKind::Bf16 => DType::BF16,
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DeviceKind {
    Cpu,
    Cuda,
}

fn device(kind: DeviceKind, own_stream: bool) -> Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            // Stream capture is defined for created streams; candle's default is the per-thread
            // default stream.
            let device = if own_stream {
                Device::new_cuda_with_stream(0)?
            } else {
                Device::new_cuda(0)?
            };
            if let Device::Cuda(d) = &device {
                // SAFETY: everything here runs on candle's single stream of this device, so the
                // per-allocation events that order work across streams are never needed; each
                // costs host time on every kernel launch of a decode step.
                unsafe { d.disable_event_tracking() };
            }
            Ok(device)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => {
            let _ = own_stream;
            Err(anyhow!("--device cuda needs a build with `--features cuda`"))
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.cuda_graph && !matches!(args.device, DeviceKind::Cuda) {
        return Err(anyhow!("--cuda-graph needs --device cuda"));
    }
    let device = device(args.device, args.cuda_graph)?;
    let model = BitNetModel::load_dir(&args.model, dtype(args.dtype, &device), &device)?;
    let tok_path = args.model.join("tokenizer.json");
    let tokenizer =
        Tokenizer::from_file(&tok_path).map_err(|e| anyhow!("cannot load tokenizer {}: {e}", tok_path.display()))?;
    let prompt = tokenizer
        .encode(args.prompt.as_str(), true)
        .map_err(|e| anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec();
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let stop = if args.ignore_eos {
        Vec::new()
    } else {
        model.config().eos_ids()
    };
    let mode = if args.cuda_graph {
        DecodeMode::CudaGraph
    } else {
        DecodeMode::Eager
    };
    let generation = Generation::new(&model, sampling).stop_at(stop).decode_mode(mode);
    generation.check(&prompt, args.max_new_tokens)?;
    let mut out = std::io::stdout().lock();
    write!(out, "{}", args.prompt)?;
    out.flush()?;
    let mut stream = tokenizer.decode_stream(true);
    let result = generation
        .run(&prompt, args.max_new_tokens, |id| {
            let text = stream
                .step(id)
                .map_err(|e| candle_core::Error::Msg(format!("cannot decode token {id}: {e}")))?;
            if let Some(text) = text {
                write!(out, "{text}").and_then(|_| out.flush())?;
            }
            Ok(())
        })
        .context("generation failed")?;
    writeln!(out)?;
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s; decode: {} tokens, {:.1} tokens/s ({:?})",
        result.prompt_tokens,
        result.prefill_tokens_per_sec(),
        result.tokens.len(),
        result.decode_tokens_per_sec(),
        args.device,
    );
    Ok(())
}
