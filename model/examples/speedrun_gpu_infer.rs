//! GPU inference of the fully ternary speed-run network: its packed form (packed ternary
//! convolutions and head on the int8 tensor-core kernels, f32 activations) against the same
//! network in plain candle (float convolutions and head over the same variables) in f32 and
//! bf16, in the same run, images per second.
//!
//! Build: `cargo build --release -p bitlinear-model --features cuda --example speedrun_gpu_infer`.
//! Run: `speedrun_gpu_infer [--batch B] [--calls N] [--no-implicit-conv]` (defaults 500 and 30;
//! the last runs the packed convolutions on the int8 im2col path instead of the implicit GEMM).
//!
//! Random weights at the default widths, one input batch. Each contender is warmed up (10 calls,
//! which also JIT-compiles its kernels), then timed call by call (wall clock around the call and
//! a device synchronisation); the table gives the median. The weights (under 8 MB) and one batch
//! stay in the 60 MB L2 as they would in a serving loop over one model.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use model::{TernarySpeedrun, TernarySpeedrunConfig};

#[path = "../benches/float_speedrun.rs"]
mod float_speedrun;
use float_speedrun::FloatSpeedrun;

const WARM_UP: usize = 10;

fn main() -> Result<()> {
    let (mut batch, mut calls, mut implicit) = (500usize, 30usize, true);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<usize> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} takes a positive integer"))
        };
        match a.as_str() {
            "--batch" => batch = value("--batch")?,
            "--calls" => calls = value("--calls")?,
            "--no-implicit-conv" => implicit = false,
            _ => {
                bail!("unknown argument {a:?}; usage: speedrun_gpu_infer [--batch B] [--calls N] [--no-implicit-conv]")
            }
        }
    }
    if batch == 0 || calls == 0 {
        bail!("--batch and --calls must be at least 1");
    }
    let dev = Device::new_cuda(0)?;
    if !implicit {
        let mut settings = bitlinear::kernel_settings(&dev);
        settings.force.implicit_conv = Some(false);
        bitlinear::set_kernel_settings(&dev, settings)?;
    }
    let config = TernarySpeedrunConfig::default();
    let vm = VarMap::new();
    let net = TernarySpeedrun::new(config, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let packed = net.to_packed()?;
    let float32 = FloatSpeedrun::new(&vm, config.widths, DType::F32, &dev)?;
    let bf16 = FloatSpeedrun::new(&vm, config.widths, DType::BF16, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &dev)?;
    let xb = x.to_dtype(DType::BF16)?;

    // The packed form predicts what the training form does (exact integers); a check that the
    // timed network is the real one.
    let agree = |a: &Tensor, b: &Tensor| -> Result<f64> {
        let (a, b) = (a.argmax(1)?.to_vec1::<u32>()?, b.argmax(1)?.to_vec1::<u32>()?);
        Ok(a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64)
    };
    let reference = net.forward(&x)?;
    println!(
        "# top-1 agreement of the packed form with the training form: {:.3}",
        agree(&packed.forward(&x)?, &reference)?
    );

    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> Result<f64> {
        for _ in 0..WARM_UP {
            f()?;
        }
        dev.synchronize()?;
        let mut ms = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            f()?;
            dev.synchronize()?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    };
    let packed_ms = time(&|| packed.forward(&x))?;
    let f32_ms = time(&|| float32.forward(&x))?;
    let bf16_ms = time(&|| bf16.forward(&xb))?;
    println!("| network (batch {batch}) | median ms a batch | images/s | packed speed-up |");
    println!("| --- | --- | --- | --- |");
    for (name, ms) in [
        ("packed (ternary, int8)", packed_ms),
        ("candle f32", f32_ms),
        ("candle bf16", bf16_ms),
    ] {
        println!(
            "| {name} | {ms:.3} | {:.0} | {:.2}x |",
            batch as f64 / ms * 1e3,
            ms / packed_ms
        );
    }
    Ok(())
}
