//! `--bench-train`: one BitLinear layer's training step against candle's bf16 `Linear`.
//!
//! A step is the forward and the backward for the input and the weight, as a training loop runs
//! it: `y = f(x, W)`, then `y.backward()` (candle seeds the gradient with ones and accumulates
//! each operand's gradient into a fresh store). Ours is `bit_matmul` (absmean, pack, quantize,
//! int8 matmul; the straight-through backward of `BitMatmul::bwd`) on bf16 `Var`s; the baseline
//! is `x.matmul(&W.t())` on the same `Var`s. Both pay the same autograd bookkeeping. Timing as
//! `--bench` (CUDA events around batches queued behind a spin kernel, median of batches), weights
//! rotated past the L2.

use crate::bench::{full_forward, Timer};
use crate::Opts;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};

/// The (N, K) shapes and token counts M of issue 21's training-step targets.
const SHAPES: [(usize, usize); 4] = [(2560, 2560), (6912, 2560), (2560, 6912), (4096, 4096)];
const TOKENS: [usize; 2] = [1024, 4096];

/// The training-step table: forward alone and forward + backward, ours and bf16, per shape.
pub(crate) fn bench_train(gpu: &Device, o: &Opts) -> Result<()> {
    let timer = Timer::new(gpu)?;
    // SAFETY: everything below runs on the device's single stream (as `bench`).
    unsafe { timer.dev.disable_event_tracking() };
    println!("\n== training step of one layer: bf16 x and W, forward (fwd) and forward + backward for x and W (step), device us ==");
    println!(
        "{:>5} {:>5} {:>5} | {:>9} {:>9} | {:>9} {:>9} | {:>8} {:>8}",
        "M", "N", "K", "ours fwd", "ours step", "bf16 fwd", "bf16 step", "fwd x", "step x"
    );
    for &(n, k) in &SHAPES {
        let copies = o.rotate_bytes.div_ceil(n * k * 2).max(1);
        let ws: Vec<Var> = (0..copies)
            .map(|_| {
                Tensor::randn(0f32, 0.05, (n, k), gpu)?
                    .to_dtype(DType::BF16)
                    .and_then(|t| Var::from_tensor(&t))
            })
            .collect::<candle_core::Result<_>>()?;
        for &m in &TOKENS {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), gpu)?.to_dtype(DType::BF16)?)?;
            let w = |i: usize| ws[i % copies].as_tensor();
            let ours_fwd = timer.time(3, 5, 10, |i| {
                full_forward(&x, w(i))?;
                Ok(())
            })?;
            let ours_step = timer.time(3, 5, 10, |i| {
                full_forward(&x, w(i))?.backward()?;
                Ok(())
            })?;
            let bf16_fwd = timer.time(3, 5, 10, |i| {
                x.matmul(&w(i).t()?)?;
                Ok(())
            })?;
            let bf16_step = timer.time(3, 5, 10, |i| {
                x.matmul(&w(i).t()?)?.backward()?;
                Ok(())
            })?;
            println!(
                "{m:>5} {n:>5} {k:>5} | {ours_fwd:>9.1} {ours_step:>9.1} | {bf16_fwd:>9.1} {bf16_step:>9.1} | {:>7.2}x {:>7.2}x",
                ours_fwd / bf16_fwd,
                ours_step / bf16_step
            );
        }
    }
    println!("(fwd x, step x = ours / bf16 time: < 1 means ours is faster; issue 21 asks step x <= 0.9 at M = 4096, <= 1.0 at M = 1024)");
    Ok(())
}
