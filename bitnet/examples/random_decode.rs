//! Prefill and decode throughput of a BitNet b1.58 model with random weights at the shapes of
//! `microsoft/bitnet-b1.58-2B-4T` (no checkpoint needed), against the same architecture with
//! dense float projections (`--compare-dense`), and where a decode step's time goes.
//!
//! `cargo run --release -p bitnet [--features cuda] --example random_decode -- [--layers 30]
//! [--prompt 128] [--new 256] [--device cpu|cuda] [--dtype f32|bf16] [--compare-dense]
//! [--graph] [--cpu-kernel NAME]`
//!
//! Each model generates greedily twice (the first run warms up: kernel JIT, first-use weight
//! preparation); the second is reported: prefill tokens/s (prompt and first token) and decode
//! tokens/s from the median time between consecutive tokens (each includes the host's read of
//! the logits). Then, for the packed model: the projections and the head alone (the same
//! weights' shapes, the calls of one decode step back to back, one synchronisation), and the
//! host time to enqueue one decode step (no synchronisation) against its full time.
//!
//! With `--graph` (CUDA builds), each model also decodes through a CUDA graph: the step of
//! `BitNetModel::decode_at` (the position a device value, attention over the whole cache) is
//! captured once and replayed per token, once with the fused decode kernels
//! (`DecodeKernels::Fused`) and once with candle tensor ops (`DecodeKernels::TensorOps`);
//! reported: the median time a token (launch to the host holding the next token id), the host
//! time of the launch, and how many leading greedy tokens equal the eager generation's.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{anyhow, Result};
use bitnet::generate::{DecodeMode, Generation, Sampling};
use bitnet::{BitNetConfig, BitNetModel, DecodeKernels, Projections};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use clap::{Parser, ValueEnum};
use rand::{rngs::StdRng, Rng, SeedableRng};

const CONFIG_2B4T: &str = r#"{"hidden_act":"relu2","hidden_size":2560,"intermediate_size":6912,
  "max_position_embeddings":4096,"num_attention_heads":20,"num_hidden_layers":30,
  "num_key_value_heads":5,"rms_norm_eps":1e-05,"rope_theta":500000.0,
  "tie_word_embeddings":true,"vocab_size":128256}"#;

#[derive(Debug, Parser)]
struct Args {
    /// Decoder layers (30 in 2B4T).
    #[arg(long, default_value_t = 30)]
    layers: usize,
    /// Prompt tokens.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Generated tokens.
    #[arg(long, default_value_t = 256)]
    new: usize,
    #[arg(long, value_enum, default_value_t = Kind::Cpu)]
    device: Kind,
    /// Float dtype of embeddings, norms, attention, cache and head.
    #[arg(long, value_enum, default_value_t = Float::F32)]
    dtype: Float,
    /// Also run the same architecture with dense float projections (plain candle `Linear`).
    #[arg(long)]
    compare_dense: bool,
    /// Keep cudarc's per-allocation events (the `bitnet` binary turns them off: one stream).
    #[arg(long)]
    keep_event_tracking: bool,
    /// Also decode through a CUDA graph of the decode step (CUDA only).
    #[arg(long)]
    graph: bool,
    /// Force the CPU kernel of the projections (a `bitlinear::plan::CpuKernel` variant, any
    /// case); the library's choice when absent.
    #[arg(long)]
    cpu_kernel: Option<String>,
    /// Profiling mode (CUDA): only the packed model, prefill, then this many eager `decode_at`
    /// steps with the fused kernels and as many with tensor ops, each set between
    /// `cuProfilerStart` and `cuProfilerStop` (for `ncu --profile-from-start off`); then exit.
    #[arg(long)]
    profile_steps: Option<usize>,
}

/// Forces the CPU kernel named `name` for the whole process.
fn force_cpu_kernel(name: &str) -> Result<()> {
    use bitlinear::plan::{CpuKernel, ForcedChoices, KernelSettings};
    let kernel = CpuKernel::ALL
        .into_iter()
        .find(|k| format!("{k:?}").eq_ignore_ascii_case(name))
        .ok_or_else(|| anyhow!("unknown CPU kernel {name} (one of {:?})", CpuKernel::ALL))?;
    let settings = KernelSettings {
        force: ForcedChoices {
            cpu_kernel: Some(kernel),
            ..Default::default()
        },
        ..Default::default()
    };
    bitlinear::set_kernel_settings(&Device::Cpu, settings)?;
    Ok(())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Float {
    F32,
    Bf16,
}

/// The projections of one layer: name, out features, in features.
fn projections(cfg: &BitNetConfig) -> [(&'static str, usize, usize); 7] {
    let (h, inner) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.kv_heads() * cfg.head_dim();
    [
        ("self_attn.q_proj", h, h),
        ("self_attn.k_proj", kv, h),
        ("self_attn.v_proj", kv, h),
        ("self_attn.o_proj", h, h),
        ("mlp.gate_proj", inner, h),
        ("mlp.up_proj", inner, h),
        ("mlp.down_proj", h, inner),
    ]
}

/// Random packed bytes `(rows, k)` made on the device: every 2-bit field a valid code (0, 1, 2).
fn packed_bytes(rows: usize, k: usize, device: &Device) -> Result<Tensor> {
    let mut b = Tensor::zeros((rows, k), DType::F32, device)?;
    for field in 0..4 {
        let code = Tensor::rand(0f32, 3.0, (rows, k), device)?.floor()?.clamp(0f32, 2f32)?;
        b = (b + code.affine(4f64.powi(field), 0.0)?)?;
    }
    Ok(b.to_dtype(DType::U8)?)
}

/// A model with random weights: packed, or dense float projections of `dtype`.
fn random_model(
    cfg: &BitNetConfig,
    projections_kind: Projections,
    dtype: DType,
    device: &Device,
) -> Result<BitNetModel> {
    let h = cfg.hidden_size;
    let mut t = HashMap::new();
    let randn = |dims: (usize, usize), std: f32| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, std, dims, device)?.to_dtype(dtype)?)
    };
    // bf16 values, as the 2B4T checkpoint stores them (an f32 model on the CPU then holds its
    // tied head as bf16, see BitNetModel::head_dtype).
    t.insert(
        "model.embed_tokens.weight".to_string(),
        randn((cfg.vocab_size, h), 1.0)?
            .to_dtype(DType::BF16)?
            .to_dtype(dtype)?,
    );
    t.insert("model.norm.weight".to_string(), Tensor::ones(h, dtype, device)?);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, n, k) in projections(cfg) {
            match projections_kind {
                Projections::PackedTernary => {
                    t.insert(format!("{p}.{name}.weight"), packed_bytes(n.div_ceil(4), k, device)?);
                    t.insert(format!("{p}.{name}.weight_scale"), Tensor::new(&[1.0f32], device)?);
                }
                Projections::Dense => {
                    t.insert(format!("{p}.{name}.weight"), randn((n, k), 0.02)?);
                }
            }
        }
        for (name, n) in [
            ("input_layernorm", h),
            ("post_attention_layernorm", h),
            ("self_attn.attn_sub_norm", h),
            ("mlp.ffn_sub_norm", cfg.intermediate_size),
        ] {
            t.insert(format!("{p}.{name}.weight"), Tensor::ones(n, dtype, device)?);
        }
    }
    Ok(BitNetModel::load_with(
        cfg.clone(),
        projections_kind,
        VarBuilder::from_tensors(t, dtype, device),
    )?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Greedy generation, run twice; returns (prefill tokens/s, median decode seconds per token)
/// of the second run.
fn generation(model: &BitNetModel, prompt: &[u32], new: usize, mode: DecodeMode) -> Result<(f64, f64)> {
    let mut result = (0.0, 0.0);
    for _ in 0..2 {
        let mut stamps = Vec::with_capacity(new);
        let generation = Generation::new(model, Sampling::GREEDY).decode_mode(mode);
        let out = generation.run(prompt, new, |_| {
            stamps.push(Instant::now());
            Ok(())
        })?;
        let gaps: Vec<f64> = stamps.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        result = (out.prefill_tokens_per_sec(), median(gaps));
    }
    Ok(result)
}

/// Median seconds of the projections of one decode step, run back to back on random weights of
/// the model's shapes, and of `model`'s head, one synchronisation after each.
fn matmuls_alone(model: &BitNetModel, dtype: DType) -> Result<(f64, f64)> {
    let (cfg, device) = (model.config(), model.device());
    let mut weights = Vec::new();
    for _ in 0..cfg.num_hidden_layers {
        for (name, n, k) in projections(cfg) {
            let mut t = HashMap::new();
            t.insert("weight".to_string(), packed_bytes(n.div_ceil(4), k, device)?);
            t.insert("weight_scale".to_string(), Tensor::new(&[1.0f32], device)?);
            let vb = VarBuilder::from_tensors(t, dtype, device);
            weights.push((name, bitnet::BitNetLinear::load(k, n, vb)?));
        }
    }
    let xh = Tensor::randn(0f32, 1.0, (1, cfg.hidden_size), device)?.to_dtype(dtype)?;
    let xi = Tensor::randn(0f32, 1.0, (1, cfg.intermediate_size), device)?.to_dtype(dtype)?;
    let (mut projections, mut head) = (Vec::new(), Vec::new());
    for rep in 0..23 {
        device.synchronize()?;
        let t0 = Instant::now();
        for (name, w) in &weights {
            w.forward(if *name == "mlp.down_proj" { &xi } else { &xh })?;
        }
        device.synchronize()?;
        let t1 = Instant::now();
        model.logits(&xh)?;
        device.synchronize()?;
        if rep >= 3 {
            projections.push((t1 - t0).as_secs_f64());
            head.push(t1.elapsed().as_secs_f64());
        }
    }
    Ok((median(projections), median(head)))
}

/// Median host seconds to enqueue one decode step (no synchronisation) and its full time.
fn enqueue_vs_step(model: &BitNetModel, prompt: &[u32]) -> Result<(f64, f64)> {
    let device = model.device();
    let mut cache = model.new_cache(prompt.len() + 40)?;
    model.forward_last(&Tensor::new(prompt, device)?.unsqueeze(0)?, &mut cache)?;
    let (mut host, mut full) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        let ids = Tensor::new(&[prompt[0]], device)?.unsqueeze(0)?;
        device.synchronize()?;
        let t0 = Instant::now();
        let logits = model.forward_last(&ids, &mut cache)?;
        host.push(t0.elapsed().as_secs_f64());
        device.synchronize()?;
        full.push(t0.elapsed().as_secs_f64());
        drop(logits);
    }
    Ok((median(host), median(full)))
}

/// Greedy decode through a CUDA graph of [`BitNetModel::decode_at`]: prefill eagerly, run the
/// step once eagerly (kernels loaded, weights settled, small uploads cached), capture it, then per
/// token write the id and position into the graph's input buffers and replay. Returns the median
/// seconds a token and of the launch call (after 16 warm-up tokens), and how many leading tokens
/// equal an eager greedy generation's (rounding may differ: attention spans the whole cache).
#[cfg(feature = "cuda")]
fn graph_decode(model: &BitNetModel, prompt: &[u32], new: usize) -> Result<GraphRun> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let device = model.device();
    let eager = Generation::new(model, Sampling::GREEDY)
        .run(prompt, new, |_| Ok(()))?
        .tokens;
    let eager_at = eager_decode_at(model, prompt, new)?;
    let cuda = device.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let mut cache = model.new_cache(prompt.len() + new)?;
    let first = model.forward_last(&Tensor::new(prompt, device)?.unsqueeze(0)?, &mut cache)?;
    let mut next = first.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0];
    let id = Tensor::zeros((1, 1), DType::U32, device)?;
    let pos = Tensor::zeros(1, DType::U32, device)?;
    let set =
        |t: &Tensor, v: u32| -> Result<()> { Ok(t.slice_set(&Tensor::new(&[v], device)?.reshape(t.shape())?, 0, 0)?) };
    // candle uploads small kernel arguments (shapes, strides) from the host; under this guard it
    // keeps them on the device, so the capture records device copies instead of host uploads.
    let _htod_cache = cuda.enable_cuda_graph_htod_cache();
    set(&id, next)?;
    set(&pos, prompt.len() as u32)?;
    // The warm-up writes the first step's key and value, which the first replay rewrites.
    // The greedy token on the device: the fused step's head kernel picks it (decode_greedy_at),
    // candle's argmax where the fused kernels are off (greedy_token would read the logits back,
    // which a capture cannot).
    let fused = model.decode_fused(cache.capacity());
    let step = |cache: &mut bitnet::Cache| -> candle_core::Result<Tensor> {
        if fused {
            model.decode_greedy_at(&id, &pos, cache)
        } else {
            model.decode_at(&id, &pos, cache)?.argmax(candle_core::D::Minus1)
        }
    };
    // Twice: weights first used by a decode step settle on the second (see graph.rs).
    for _ in 0..2 {
        step(&mut cache)?.to_vec1::<u32>()?;
    }
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| anyhow!("begin_capture: {e:?}"))?;
    let captured = step(&mut cache);
    // The output stays allocated between replays; the flag lets each launch reuse it.
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let out = captured.map_err(|e| anyhow!("capturing the decode step: {e}"))?;
    let graph = graph
        .map_err(|e| anyhow!("end_capture: {e:?}"))?
        .ok_or_else(|| anyhow!("the capture recorded no graph"))?;
    let mut tokens = vec![next];
    let (mut steps, mut launches) = (Vec::new(), Vec::new());
    for i in 0..new.saturating_sub(1) {
        set(&id, next)?;
        set(&pos, (prompt.len() + i) as u32)?;
        let t0 = Instant::now();
        graph.launch().map_err(|e| anyhow!("graph launch: {e:?}"))?;
        let launched = t0.elapsed().as_secs_f64();
        next = out.to_vec1::<u32>()?[0];
        tokens.push(next);
        if i >= 16 {
            steps.push(t0.elapsed().as_secs_f64());
            launches.push(launched);
        }
    }
    if steps.is_empty() {
        return Err(anyhow!("--graph needs more than 17 new tokens"));
    }
    let agree = |reference: &[u32]| tokens.iter().zip(reference).take_while(|(a, b)| a == b).count();
    Ok(GraphRun {
        step: median(steps),
        launch: median(launches),
        agree_generation: agree(&eager),
        agree_decode_at: agree(&eager_at),
        tokens: eager.len().min(tokens.len()),
    })
}

/// What `graph_decode` measured: median seconds a step and a launch, and how many leading greedy
/// tokens of the replays equal `Generation`'s (which decodes with `forward_last` over the cache
/// prefix and takes the arg-max on the host) and those of the same `decode_at` step run eagerly
/// (the captured computation itself: attention over the whole masked cache, arg-max on the device).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GraphRun {
    step: f64,
    launch: f64,
    agree_generation: usize,
    agree_decode_at: usize,
    tokens: usize,
}

/// Greedy tokens of `decode_at` run eagerly, step by step, as the graph replays it.
#[cfg(feature = "cuda")]
fn eager_decode_at(model: &BitNetModel, prompt: &[u32], new: usize) -> Result<Vec<u32>> {
    let device = model.device();
    let mut cache = model.new_cache(prompt.len() + new)?;
    let first = model.forward_last(&Tensor::new(prompt, device)?.unsqueeze(0)?, &mut cache)?;
    let mut next = first.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0];
    let mut tokens = vec![next];
    for i in 0..new.saturating_sub(1) {
        let id = Tensor::new(&[[next]], device)?;
        let pos = Tensor::new(&[(prompt.len() + i) as u32], device)?;
        let logits = model.decode_at(&id, &pos, &mut cache)?;
        next = model.greedy_token(&logits, &cache)?.to_vec1::<u32>()?[0];
        tokens.push(next);
    }
    Ok(tokens)
}

/// `--profile-steps`: eager `decode_at` steps of both kernel settings inside a profiler range.
#[cfg(feature = "cuda")]
fn profile_steps(model: &mut BitNetModel, prompt: &[u32], steps: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let device = model.device().clone();
    for kernels in [DecodeKernels::Fused, DecodeKernels::TensorOps] {
        model.set_decode_kernels(kernels);
        let mut cache = model.new_cache(prompt.len() + steps + 1)?;
        let first = model.forward_last(&Tensor::new(prompt, &device)?.unsqueeze(0)?, &mut cache)?;
        let mut next = first.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0];
        // One step outside the range: kernels loaded, weights settled.
        let step = |model: &BitNetModel, cache: &mut bitnet::Cache, next: u32, i: usize| -> Result<u32> {
            let id = Tensor::new(&[[next]], &device)?;
            let pos = Tensor::new(&[(prompt.len() + i) as u32], &device)?;
            let logits = model.decode_at(&id, &pos, cache)?;
            Ok(model.greedy_token(&logits, cache)?.to_vec1::<u32>()?[0])
        };
        next = step(model, &mut cache, next, 0)?;
        device.synchronize()?;
        // SAFETY: plain driver calls on the current context.
        unsafe { sys::cuProfilerStart() }
            .result()
            .map_err(|e| anyhow!("cuProfilerStart: {e:?}"))?;
        for i in 1..=steps {
            next = step(model, &mut cache, next, i)?;
        }
        device.synchronize()?;
        // SAFETY: as above.
        unsafe { sys::cuProfilerStop() }
            .result()
            .map_err(|e| anyhow!("cuProfilerStop: {e:?}"))?;
        println!("profiled {steps} {kernels:?} steps");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn profile_steps(_: &mut BitNetModel, _: &[u32], _: usize) -> Result<()> {
    Err(anyhow!("--profile-steps needs a build with `--features cuda`"))
}

#[cfg(not(feature = "cuda"))]
fn graph_decode(_: &BitNetModel, _: &[u32], _: usize) -> Result<GraphRun> {
    Err(anyhow!("--graph needs a build with `--features cuda`"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(name) = &args.cpu_kernel {
        force_cpu_kernel(name)?;
    }
    let device = match args.device {
        Kind::Cpu => Device::Cpu,
        // Stream capture is documented for created streams; candle's default is the per-thread
        // default stream, so a graph run gets a stream of its own (eager runs keep the default).
        Kind::Cuda if args.graph => Device::new_cuda_with_stream(0)?,
        Kind::Cuda => Device::new_cuda(0)?,
    };
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(d), false) = (&device, args.keep_event_tracking) {
        // SAFETY: one stream (as the `bitnet` binary).
        unsafe { d.disable_event_tracking() };
    }
    let dtype = match args.dtype {
        Float::F32 => DType::F32,
        Float::Bf16 => DType::BF16,
    };
    let json = CONFIG_2B4T.replace(
        "\"num_hidden_layers\":30",
        &format!("\"num_hidden_layers\":{}", args.layers),
    );
    let cfg = BitNetConfig::from_json(&json, std::path::Path::new("2B4T shapes"))?;
    let mut rng = StdRng::seed_from_u64(0);
    let prompt: Vec<u32> = (0..args.prompt)
        .map(|_| rng.gen_range(0..cfg.vocab_size as u32))
        .collect();
    println!(
        "{} layers, {}-token prompt, {} new tokens, {dtype:?} float parts, {device:?}, event tracking {}",
        args.layers,
        args.prompt,
        args.new,
        if args.keep_event_tracking { "on" } else { "off" }
    );
    if let Some(steps) = args.profile_steps {
        let mut model = random_model(&cfg, Projections::PackedTernary, dtype, &device)?;
        return profile_steps(&mut model, &prompt, steps);
    }
    let mut kinds = vec![Projections::PackedTernary];
    if args.compare_dense {
        kinds.push(Projections::Dense);
    }
    let mut decode = Vec::new();
    let mut graphs = Vec::new();
    for kind in kinds {
        let mut model = random_model(&cfg, kind, dtype, &device)?;
        let (prefill, per_token) = generation(&model, &prompt, args.new, DecodeMode::Eager)?;
        decode.push(per_token);
        println!(
            "{kind:?}: prefill {prefill:.1} tokens/s; decode {:.1} tokens/s ({:.3} ms a token, median)",
            1.0 / per_token,
            per_token * 1e3
        );
        if args.graph {
            // What the `bitnet` binary runs with --cuda-graph (sampling on the host per token).
            match generation(&model, &prompt, args.new, DecodeMode::CudaGraph) {
                Ok((_, per_token)) => println!(
                    "  {kind:?} Generation with DecodeMode::CudaGraph: decode {:.1} tokens/s",
                    1.0 / per_token
                ),
                Err(e) => println!("  ERROR {kind:?} Generation with DecodeMode::CudaGraph: {e:#}"),
            }
            // A failed capture is reported; the other measurements still run.
            for kernels in [DecodeKernels::Fused, DecodeKernels::TensorOps] {
                model.set_decode_kernels(kernels);
                let fused = model.decode_fused(args.prompt + args.new);
                match graph_decode(&model, &prompt, args.new) {
                    Ok(g) => {
                        graphs.push((kind, fused, g.step));
                        println!(
                            "  {kind:?} CUDA graph, {kernels:?} (fused kernels {}): decode {:.1} tokens/s \
                             ({:.3} ms a token, median); graph launch (host) {:.3} ms; first {} of {} \
                             tokens as eager decode_at, {} as Generation",
                            if fused { "on" } else { "off" },
                            1.0 / g.step,
                            g.step * 1e3,
                            g.launch * 1e3,
                            g.agree_decode_at,
                            g.tokens,
                            g.agree_generation
                        );
                    }
                    Err(e) => println!("  ERROR {kind:?} CUDA graph, {kernels:?}: {e:#}"),
                }
            }
            model.set_decode_kernels(DecodeKernels::default());
        }
        if kind == Projections::PackedTernary {
            let (host, full) = enqueue_vs_step(&model, &prompt)?;
            let (projections, head) = matmuls_alone(&model, dtype)?;
            println!(
                "  one decode step (forward_last of one token, no sampling): {:.3} ms; host enqueue {:.3} ms; \
                 alone: the 7 x {} projections {:.3} ms, the head ({:?} weights) {:.3} ms; rest (other \
                 kernels, launch gaps): {:.3} ms",
                full * 1e3,
                host * 1e3,
                args.layers,
                projections * 1e3,
                model.head_dtype(),
                head * 1e3,
                (full - projections - head) * 1e3
            );
        }
    }
    if let [ours, dense] = decode[..] {
        println!("decode speed-up over the dense {dtype:?} model: {:.2}x", dense / ours);
        let graph = |k: Projections, fused: bool| graphs.iter().find(|g| g.0 == k && g.1 == fused).map(|g| g.2);
        if let (Some(ours), Some(dense_ops), Some(dense_fused)) = (
            graph(Projections::PackedTernary, true),
            graph(Projections::Dense, false),
            graph(Projections::Dense, true),
        ) {
            println!(
                "with CUDA graphs: ours (fused) over dense with candle ops {:.2}x, over dense with the \
                 fused kernels {:.2}x, over dense eager {:.2}x",
                dense_ops / ours,
                dense_fused / ours,
                dense / ours
            );
        }
    }
    Ok(())
}
