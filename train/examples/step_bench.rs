//! Training-step micro-benchmark of a CIFAR-10 network (`--model`, default the SimpleBitCnn) on
//! random CIFAR-shaped data.
//!
//! ```text
//! cargo run --release -p train --features cuda --example step_bench -- [--device cuda] [--model NAME] [--steps 200] [--epochs 3]
//! ```
//! Writes a random data set (`--steps` batches of 128 training images, 1,000 test images) to a
//! temporary directory, builds the real [`train::trainer::Trainer`] on it and prints:
//! * `epoch`: ms per step of whole training epochs (batch assembly, forward, backward, AdamW,
//!   metrics: the code path of the `train` binary), after one warm-up epoch;
//! * a breakdown on one fixed batch: forward + loss, + backward, + AdamW (ms per step).
//!
//! The device is synchronized before each clock read. The flags `--no-fused-adamw`,
//! `--no-fused-augment`, `--keep-event-tracking`, `--no-deferred-finite-check`,
//! `--no-fused-pool`, `--no-fused-norm-gelu`, `--no-tf32`, `--no-bf16-conv-grads` and `--baseline`
//! (all of them) turn off the pieces of
//! [`train::tuning::CudaTuning`]; `--no-implicit-conv` runs the ternary convolutions on the
//! int8 im2col path, `--no-implicit-input-grad` their input gradients on the transposed im2col
//! and cuBLAS, `--implicit-weight-grad` their weight gradients on the bf16 implicit GEMM,
//! `--bf16-conv-tile` picks that GEMM's tile. Run the example once per variant.

use std::time::Instant;

use anyhow::{Context, Result};
use bitlinear::plan::Bf16ConvTile;
use candle_core::{DType, Module, Tensor};
use cifar::Split;
use clap::Parser;
use rand::{Rng, SeedableRng};
use train::augment::Edge;
use train::cli::Args;
use train::trainer::Trainer;
use train::tuning::CudaTuning;

#[derive(Parser)]
struct Opts {
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Training steps (batches of --batch-size) per epoch.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Timed epochs (after one warm-up epoch).
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Iterations of each breakdown variant.
    #[arg(long, default_value_t = 200)]
    iters: usize,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// The network, as `train --model` names it.
    #[arg(long, default_value = "simple-bit-cnn")]
    model: String,
    /// Time the backward pieces (convolutions, fully connected part, loss) separately.
    #[arg(long)]
    profile: bool,
    /// First compare the fused CUDA kernels with the tensor-op paths (and the CPU pool).
    #[arg(long)]
    check: bool,
    /// AdamW as tensor ops instead of the fused kernel.
    #[arg(long)]
    no_fused_adamw: bool,
    /// Batches assembled with tensor ops instead of the fused kernel.
    #[arg(long)]
    no_fused_augment: bool,
    /// Keep cudarc's per-allocation CUDA events.
    #[arg(long)]
    keep_event_tracking: bool,
    /// BitLinear checks its weights for NaN/inf on every call instead of the trainer once an
    /// epoch.
    #[arg(long)]
    no_deferred_finite_check: bool,
    /// Max pooling with generic tensor ops instead of the fused kernels.
    #[arg(long)]
    no_fused_pool: bool,
    /// The speed-run network's batch norm + GELU as tensor ops instead of the fused op.
    #[arg(long)]
    no_fused_norm_gelu: bool,
    /// f32 matrix products without TF32.
    #[arg(long)]
    no_tf32: bool,
    /// The ternary convolutions' backward products in f32 (TF32) instead of bf16.
    #[arg(long)]
    no_bf16_conv_grads: bool,
    /// Ternary convolutions on the int8 im2col and packed GEMM instead of the implicit GEMM (a
    /// kernel setting of the device, not part of the tuning).
    #[arg(long)]
    no_implicit_conv: bool,
    /// The ternary convolutions' input gradients on the transposed im2col and cuBLAS instead of
    /// the bf16 implicit GEMM (a kernel setting of the device, not part of the tuning).
    #[arg(long)]
    no_implicit_input_grad: bool,
    /// The ternary convolutions' weight gradients on the bf16 implicit GEMM instead of the
    /// transposed im2col and cuBLAS (the rule); a kernel setting of the device, not part of the
    /// tuning.
    #[arg(long)]
    implicit_weight_grad: bool,
    /// The bf16 implicit GEMM's tile for every backward product it takes (n32, n64, n128,
    /// n128w4; default: by the output channels).
    #[arg(long)]
    bf16_conv_tile: Option<Bf16ConvTile>,
    /// All of the above: the plain candle path.
    #[arg(long)]
    baseline: bool,
    /// The trainer's `--lookahead-every` (0: off; default: the recipe's).
    #[arg(long, value_name = "N")]
    lookahead_every: Option<u64>,
    /// The trainer's `--widths` (ternary-speedrun; default: the recipe's).
    #[arg(long, value_parser = train::cli::widths)]
    widths: Option<[usize; 4]>,
    /// The trainer's `--block-codes` (ternary-speedrun; default: the recipe's).
    #[arg(long, value_enum)]
    block_codes: Option<train::cli::BlockCodesArg>,
}

impl Opts {
    fn tuning(&self) -> CudaTuning {
        if self.baseline {
            return CudaTuning::baseline();
        }
        CudaTuning {
            fused_adamw: !self.no_fused_adamw,
            fused_augment: !self.no_fused_augment,
            disable_event_tracking: !self.keep_event_tracking,
            deferred_finite_check: !self.no_deferred_finite_check,
            fused_pool: !self.no_fused_pool,
            fused_norm_gelu: !self.no_fused_norm_gelu,
            tf32_matmul: !self.no_tf32,
            bf16_conv_grads: !self.no_bf16_conv_grads,
        }
    }
}

/// ms per iteration of `f` (after 5 warm-up iterations), synchronized.
fn time_it<T>(dev: &candle_core::Device, iters: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    for _ in 0..5 {
        drop(f()?);
    }
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters {
        drop(f()?);
    }
    dev.synchronize()?;
    Ok(1e3 * start.elapsed().as_secs_f64() / iters as f64)
}

/// Forward-only and forward+backward times of the network's pieces at batch `b`.
fn profile(dev: &candle_core::Device, b: usize, iters: usize) -> Result<()> {
    use candle_core::Var;
    let rn = |s: &[usize]| Tensor::randn(0f32, 1., s, dev);
    let x1 = rn(&[b, 3, 32, 32])?;
    let w1 = Var::from_tensor(&rn(&[32, 3, 3, 3])?)?;
    let x2 = Var::from_tensor(&rn(&[b, 32, 16, 16])?)?;
    let w2 = Var::from_tensor(&rn(&[64, 32, 3, 3])?)?;
    let g1 = rn(&[b, 32, 32, 32])?;
    let g2 = rn(&[b, 64, 16, 16])?;
    let t = |name: &str, v: f64| eprintln!("profile {name}: {v:.3} ms");
    t(
        "conv1 fwd",
        time_it(dev, iters, || Ok(x1.conv2d(w1.as_tensor(), 1, 1, 1, 1)?))?,
    );
    t(
        "conv1 fwd+bwd(w)",
        time_it(dev, iters, || {
            let y = x1.conv2d(w1.as_tensor(), 1, 1, 1, 1)?;
            drop((y * &g1)?.sum_all()?.backward()?);
            Ok(())
        })?,
    );
    t(
        "conv2 fwd",
        time_it(dev, iters, || Ok(x2.as_tensor().conv2d(w2.as_tensor(), 1, 1, 1, 1)?))?,
    );
    t(
        "conv2 fwd+bwd(x,w)",
        time_it(dev, iters, || {
            let y = x2.as_tensor().conv2d(w2.as_tensor(), 1, 1, 1, 1)?;
            drop((y * &g2)?.sum_all()?.backward()?);
            Ok(())
        })?,
    );
    t(
        "conv2 input grad (conv_transpose2d)",
        time_it(dev, iters, || Ok(g2.conv_transpose2d(w2.as_tensor(), 1, 0, 1, 1)?))?,
    );
    t(
        "conv2 weight grad (conv2d of transposes)",
        time_it(dev, iters, || {
            let gk = x2
                .as_tensor()
                .transpose(0, 1)?
                .conv2d(&g2.transpose(0, 1)?, 1, 1, 1, 1)?;
            Ok(gk)
        })?,
    );
    // The fully connected part: BitLinear(4096 -> 512), ReLU, BitLinear(512 -> 10), loss.
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, dev);
    let fc1 = bitlinear::bit_linear(4096, 512, vb.pp("fc1"))?;
    let fc2 = bitlinear::bit_linear(512, 10, vb.pp("fc2"))?;
    let xf = Var::from_tensor(&rn(&[b, 4096])?)?;
    let y = Tensor::from_vec((0..b).map(|i| (i % 10) as u32).collect::<Vec<_>>(), b, dev)?;
    let fc = |bwd: bool| -> Result<()> {
        let l = fc2.forward(&fc1.forward(xf.as_tensor())?.relu()?)?;
        let loss = candle_nn::loss::cross_entropy(&l, &y)?;
        if bwd {
            drop(loss.backward()?);
        }
        Ok(())
    };
    t("fc+loss fwd", time_it(dev, iters, || fc(false))?);
    t("fc+loss fwd+bwd", time_it(dev, iters, || fc(true))?);
    Ok(())
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let cpu = candle_core::Device::Cpu;
    let (a, b) = (
        a.to_device(&cpu)?.to_dtype(DType::F32)?,
        b.to_device(&cpu)?.to_dtype(DType::F32)?,
    );
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Fused kernels against the tensor-op implementations; fails on a mismatch.
fn check(dev: &candle_core::Device) -> Result<()> {
    use candle_core::Var;
    // Max pool, forward and backward, against the CPU kernel and (f32: no ties) the generic ops.
    for (b, c, h, dt) in [
        (128usize, 32usize, 32usize, DType::F32),
        (3, 5, 6, DType::F32),
        (128, 32, 32, DType::BF16),
        (3, 5, 6, DType::F16),
    ] {
        let xc = Tensor::randn(0f32, 1., (b, c, h, h), &candle_core::Device::Cpu)?.to_dtype(dt)?;
        let r = Tensor::randn(0f32, 1., (b, c, h / 2, h / 2), &candle_core::Device::Cpu)?.to_dtype(dt)?;
        let mut outs = Vec::new();
        let variants = [
            (candle_core::Device::Cpu, true),
            (dev.clone(), true),
            (dev.clone(), false),
        ];
        for (d, fused) in variants.into_iter().take(if dt == DType::F32 { 3 } else { 2 }) {
            let x = Var::from_tensor(&xc.to_device(&d)?)?;
            let y = if fused {
                model::max_pool2x2(x.as_tensor())?
            } else {
                model::max_pool2x2_ops(x.as_tensor())?
            };
            let loss = (&y * r.to_device(&d)?)?.sum_all()?;
            let g = loss.backward()?.get(x.as_tensor()).context("no grad")?.clone();
            outs.push((
                y.to_device(&candle_core::Device::Cpu)?,
                g.to_device(&candle_core::Device::Cpu)?,
            ));
        }
        for (i, o) in outs.iter().enumerate().skip(1) {
            let (dy, dg) = (max_diff(&outs[0].0, &o.0)?, max_diff(&outs[0].1, &o.1)?);
            eprintln!("check pool {b}x{c}x{h}x{h} {dt:?} variant {i}: fwd diff {dy}, bwd diff {dg}");
            anyhow::ensure!(dy == 0.0 && dg == 0.0, "max pool mismatch");
        }
    }
    // Batch norm + GELU: the fused CUDA op against the fused CPU op and the CUDA tensor ops
    // (values, running statistics, input and bias gradients), with batch and running statistics.
    for (b, c, h) in [(512usize, 64usize, 16usize), (3, 5, 7)] {
        let cpu = candle_core::Device::Cpu;
        let xc = (Tensor::randn(0f32, 2., (b, c, h, h), &cpu)? + 0.5)?;
        let bias = Tensor::randn(0f32, 1., c, &cpu)?;
        let r = Tensor::randn(0f32, 1., (b, c, h, h), &cpu)?;
        let mut outs = Vec::new();
        for (d, fused) in [(cpu.clone(), true), (dev.clone(), true), (dev.clone(), false)] {
            let vm = candle_nn::VarMap::new();
            let norm = model::speedrun::BatchNorm2d::new(c, candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &d))?;
            vm.data().lock().unwrap()["bias"].set(&bias.to_device(&d)?)?;
            let x = Var::from_tensor(&xc.to_device(&d)?)?;
            let mut per_mode = Vec::new();
            for train in [true, false] {
                let y = match fused {
                    true => norm.forward_gelu_t(x.as_tensor(), train)?,
                    false => norm.forward_t(x.as_tensor(), train)?.gelu_erf()?,
                };
                let grads = (&y * r.to_device(&d)?)?.sum_all()?.backward()?;
                let bias_var = vm.data().lock().unwrap()["bias"].as_tensor().clone();
                per_mode.push([
                    y,
                    grads.get(x.as_tensor()).context("no dx")?.clone(),
                    grads.get(&bias_var).context("no dbias")?.clone(),
                    norm.running_mean().clone(),
                    norm.running_var().clone(),
                ]);
            }
            outs.push(per_mode);
        }
        for (i, o) in outs.iter().enumerate().skip(1) {
            for (mode, (want, got)) in outs[0].iter().zip(o).enumerate() {
                for (what, (w, g)) in ["y", "dx", "dbias", "running mean", "running var"]
                    .iter()
                    .zip(want.iter().zip(got))
                {
                    let scale = w.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
                    let d = max_diff(w, g)?;
                    eprintln!(
                        "check norm+gelu {b}x{c}x{h}x{h} variant {i} mode {mode} {what}: diff {d} (scale {scale})"
                    );
                    anyhow::ensure!(d <= 1e-4 * scale, "batch norm + GELU mismatch");
                }
            }
        }
    }
    // Augmentation: fused kernel vs tensor ops on the same images and parameters.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let split = random_split(300, &mut rng);
    let images = train::augment::images_tensor(&split, dev)?;
    let labels = Tensor::from_slice(&split.labels, split.len(), dev)?;
    let order: Vec<usize> = (0..300).rev().collect();
    // Both edges, at random.
    let params: Vec<_> = (0..300)
        .map(|i| train::augment::AugParams {
            edge: [Edge::Zeros, Edge::Reflect][i % 2],
            ..train::augment::AugParams::sample(&mut rng)
        })
        .collect();
    let tables = train::cuda::EpochTables::new(&order, &params, dev)?;
    let norm = cifar::Normalizer::default();
    let (start, b) = (37, 200);
    let (x, y) = train::cuda::augment_batch(&images, &labels, &tables, start, b, &norm)?;
    let want =
        train::augment::augment_batch_tensor(&images, &order[start..start + b], &params[start..start + b], &norm)?;
    let lut = norm.lut();
    let cpu = train::augment::augment_batch_cpu(&split, &order[start..start + b], &params[start..start + b], &lut);
    let cpu = Tensor::from_vec(cpu, (b, 3, 32, 32), &candle_core::Device::Cpu)?;
    let ylab: Vec<u32> = y.to_vec1()?;
    let want_lab: Vec<u32> = order[start..start + b]
        .iter()
        .map(|&i| split.labels[i] as u32)
        .collect();
    let (d1, d2) = (max_diff(&x, &want)?, max_diff(&x, &cpu)?);
    eprintln!(
        "check augment: vs tensor ops {d1}, vs cpu {d2}, labels equal {}",
        ylab == want_lab
    );
    anyhow::ensure!(d1 == 0.0 && d2 == 0.0 && ylab == want_lab, "augment mismatch");
    // AdamW: fused vs tensor ops over 3 steps.
    let shapes = [(512usize, 4096usize), (10, 1)];
    let mut finals = Vec::new();
    for fused in [true, false] {
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let vars: Vec<(String, Var)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let v: Vec<f32> = (0..s.0 * s.1).map(|_| r2.gen_range(-1f32..1.)).collect();
                Ok((format!("v{i}"), Var::from_tensor(&Tensor::from_vec(v, s, dev)?)?))
            })
            .collect::<Result<_>>()?;
        let mut opt = train::optim::AdamW::new(vars.clone(), Default::default())?;
        opt.set_fused_cuda(fused);
        for step in 0..3 {
            let mut loss = Tensor::zeros((), DType::F32, dev)?;
            for (_, v) in &vars {
                let w = ((v.as_tensor().sqr()? * (step as f64 + 1.0))? + v.as_tensor())?;
                loss = (loss + w.sum_all()?)?;
            }
            opt.step(&loss.backward()?)?;
        }
        finals.push(vars.iter().map(|(_, v)| v.as_tensor().clone()).collect::<Vec<_>>());
    }
    for (a, b) in finals[0].iter().zip(&finals[1]) {
        let d = max_diff(a, b)?;
        eprintln!("check adamw {:?}: max diff {d:e}", a.dims());
        anyhow::ensure!(d <= 1e-6, "adamw mismatch");
    }
    Ok(())
}

fn random_split(n: usize, rng: &mut impl Rng) -> Split {
    Split {
        images: (0..n * 3072).map(|_| rng.gen()).collect(),
        labels: (0..n).map(|_| rng.gen_range(0..10u8)).collect(),
    }
}

fn main() -> Result<()> {
    let o = Opts::parse();
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let n_train = o.steps * o.batch_size;
    let per_file = n_train.div_ceil(5);
    let train: [Split; 5] = std::array::from_fn(|_| random_split(per_file, &mut rng));
    cifar::write_cifar10(&data, &train, &random_split(1000, &mut rng))?;
    let mut args = Args::try_parse_from([
        "train",
        "--device",
        &o.device,
        "--dtype",
        &o.dtype,
        "--model",
        &o.model,
        "--data-dir",
        data.to_str().context("path")?,
        "--out",
        dir.path().join("run").to_str().context("path")?,
        "--batch-size",
        &o.batch_size.to_string(),
        "--train-limit",
        &n_train.to_string(),
        "--epochs",
        &(o.epochs + 1).to_string(),
    ])?;
    args.lookahead_every = o.lookahead_every;
    args.widths = o.widths;
    args.block_codes = o.block_codes;
    args.cuda = o.tuning();
    let mut t = Trainer::new(args)?;
    let dev = t.device.clone();
    if o.no_implicit_conv || o.no_implicit_input_grad || o.implicit_weight_grad || o.bf16_conv_tile.is_some() {
        let mut settings = bitlinear::kernel_settings(&dev);
        if o.no_implicit_conv {
            settings.force.implicit_conv = Some(false);
        }
        if o.no_implicit_input_grad {
            settings.force.implicit_input_grad = Some(false);
        }
        if o.implicit_weight_grad {
            settings.force.implicit_weight_grad = Some(true);
        }
        settings.force.bf16_conv_tile = o.bf16_conv_tile;
        bitlinear::set_kernel_settings(&dev, settings)?;
    }
    if o.check {
        check(&dev)?;
    }
    if o.profile {
        profile(&dev, o.batch_size, o.iters)?;
    }

    // Whole epochs through the trainer's own loop.
    let mut ms = Vec::new();
    for e in 0..=o.epochs {
        dev.synchronize()?;
        let (loss, _, secs, _) = t.train_epoch(e)?;
        if e > 0 {
            ms.push(1e3 * secs / o.steps as f64);
        }
        eprintln!("epoch {e}: {:.3} ms/step, loss {loss:.4}", 1e3 * secs / o.steps as f64);
    }
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    let best = ms.iter().cloned().fold(f64::INFINITY, f64::min);

    // Breakdown on one fixed batch.
    let b = o.batch_size;
    let x = Tensor::randn(0f32, 1., (b, 3, 32, 32), &dev)?.to_dtype(t.dtype)?;
    let y = Tensor::from_vec((0..b).map(|i| (i % 10) as u32).collect::<Vec<_>>(), b, &dev)?;
    let variant = |name: &str, level: usize, t: &mut Trainer| -> Result<f64> {
        let run = |iters: usize, t: &mut Trainer| -> Result<f64> {
            dev.synchronize()?;
            let start = Instant::now();
            for _ in 0..iters {
                let logits = t.model.forward(&x)?.to_dtype(DType::F32)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                if level >= 1 {
                    let grads = loss.backward()?;
                    if level >= 2 {
                        t.optimizer.step(&grads)?;
                    }
                }
            }
            dev.synchronize()?;
            Ok(1e3 * start.elapsed().as_secs_f64() / iters as f64)
        };
        run(10, t)?;
        let v = run(o.iters, t)?;
        eprintln!("{name}: {v:.3} ms/step");
        Ok(v)
    };
    let fwd = variant("forward+loss", 0, &mut t)?;
    let bwd = variant("forward+loss+backward", 1, &mut t)?;
    let opt = variant("forward+loss+backward+adamw", 2, &mut t)?;
    println!(
        "RESULT tuning={:?} epoch_ms_per_step={mean:.3} (best {best:.3}, {:.0} img/s) fwd={fwd:.3} fwd_bwd={bwd:.3} \
         fwd_bwd_opt={opt:.3}",
        o.tuning(),
        1e3 * b as f64 / mean
    );
    Ok(())
}
