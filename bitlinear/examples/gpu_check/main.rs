//! GPU correctness suite and benchmark for bitlinear's CUDA kernels.
//!
//! Build (no GPU needed): `cargo build --release --features cuda -p bitlinear --example gpu_check`
//! Run on the GPU machine: `gpu_check [--check] [--bench] [--bench-train] [--cases N] [--seed S] [--quick]
//! [--only M,N,K]... [--no-variants] [--graph] [--variant NAME] [--rotate-bytes B] [--prof M,N,K]...`
//! (no flag = both parts). `--variant NAME` runs everything under one of the kernel variants of
//! `variants.rs` (settings forced over the launch rules). Exits with status 1 when any check
//! fails.
//!
//! Check: random shapes (M = 1, odd M/N/K, K % 4 != 0, sizes off every tile, a few large), fresh
//! random inputs for every case, CUDA against the CPU reference: packed bytes and s_w identical,
//! activation codes and scales identical, i32 accumulators bit-exact, float outputs of
//! `packed_matmul` / `bit_matmul` / fake-quant compared bit for bit (reported; failure beyond
//! rel 1e-6 for f32 or one ulp for bf16/f16), backward (cuBLAS vs CPU gemm, rel 1e-4 f32).
//! Outputs are poisoned (0xFF bytes = NaN) before every kernel (`KernelSettings::poison_outputs`).
//!
//! Bench: M in {1,16,128,1024,4096} x (N,K) in {(2560,2560),(13824,2560),(2560,6912),(4096,4096)},
//! bf16 activations: `packed_matmul` on pre-packed weights, the full forward `bit_matmul`
//! (quantize, pack and matmul; bf16 weights), candle's bf16 matmul (cuBLAS). CUDA events around
//! batches of back-to-back calls queued behind a spin kernel (so host overhead is hidden), warm-up,
//! median over batches of the time per call; weight buffers rotated so that each op's weights
//! total more than the L2 (160 MB by default, `--rotate-bytes`). `--graph` also times the packed
//! matmul as CUDA graphs of 20 calls (the way Microsoft's W2A8 GEMV is timed).
//!
//! Bench-train (`--bench-train`, `train_step.rs`): one layer's training step, ours against
//! candle's bf16 matmul, at the shapes of issue 21's targets.

#[cfg(feature = "cuda")]
fn main() {
    match real::main() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("gpu_check: error: {e:#}");
            std::process::exit(2)
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_check needs the `cuda` feature: cargo run --release --features cuda --example gpu_check");
    std::process::exit(2)
}

#[cfg(feature = "cuda")]
mod bad_inputs;
#[cfg(feature = "cuda")]
mod bench;
#[cfg(feature = "cuda")]
mod chains;
#[cfg(feature = "cuda")]
mod check;
#[cfg(feature = "cuda")]
mod compare;
#[cfg(feature = "cuda")]
mod train_step;
#[cfg(feature = "cuda")]
mod variants;

/// Command-line options.
#[cfg(feature = "cuda")]
pub(crate) struct Opts {
    pub(crate) check: bool,
    pub(crate) bench: bool,
    /// the training-step benchmark (`train_step.rs`)
    pub(crate) bench_train: bool,
    pub(crate) cases: usize,
    pub(crate) seed: u64,
    pub(crate) quick: bool,
    /// bench only these (M, N, K) shapes
    pub(crate) only: Vec<(usize, usize, usize)>,
    /// bench without the kernel variants
    pub(crate) no_variants: bool,
    /// also time the packed matmul as CUDA graphs
    pub(crate) graph: bool,
    /// a kernel variant applied to the whole run
    pub(crate) variant: Option<String>,
    /// bytes of weights each benchmarked op rotates through (more than the L2)
    pub(crate) rotate_bytes: usize,
    /// run each op on these shapes a few times, synchronized, for a profiler (ncu)
    pub(crate) prof: Vec<(usize, usize, usize)>,
}

#[cfg(feature = "cuda")]
mod real {
    use crate::bench::{bench, prof};
    use crate::check::check;
    use crate::Opts;
    use anyhow::{anyhow, Context, Result};

    use candle_core::Device;

    fn parse_shape(s: &str) -> Result<(usize, usize, usize)> {
        let v: Vec<usize> = s
            .split(',')
            .map(|p| p.trim().parse())
            .collect::<std::result::Result<_, _>>()?;
        match v[..] {
            [m, n, k] => Ok((m, n, k)),
            _ => Err(anyhow!("expected M,N,K, got {s}")),
        }
    }

    fn parse() -> Result<Opts> {
        let mut o = Opts {
            check: false,
            bench: false,
            bench_train: false,
            cases: 220,
            seed: 0x5eed,
            quick: false,
            only: Vec::new(),
            no_variants: false,
            graph: false,
            variant: None,
            rotate_bytes: 160 << 20,
            prof: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--check" => o.check = true,
                "--bench" => o.bench = true,
                "--bench-train" => o.bench_train = true,
                "--quick" => o.quick = true,
                "--no-variants" => o.no_variants = true,
                "--graph" => o.graph = true,
                "--variant" => o.variant = Some(args.next().context("--variant NAME")?),
                "--rotate-bytes" => o.rotate_bytes = args.next().context("--rotate-bytes B")?.parse()?,
                "--cases" => o.cases = args.next().context("--cases N")?.parse()?,
                "--seed" => o.seed = args.next().context("--seed S")?.parse()?,
                "--only" => o.only.push(parse_shape(&args.next().context("--only M,N,K")?)?),
                "--prof" => o.prof.push(parse_shape(&args.next().context("--prof M,N,K")?)?),
                "-h" | "--help" => {
                    println!(
                        "gpu_check [--check] [--bench] [--cases N] [--seed S] [--quick] [--only M,N,K]... \
                         [--no-variants] [--graph] [--variant NAME] [--rotate-bytes B] [--prof M,N,K]..."
                    );
                    std::process::exit(0)
                }
                x => return Err(anyhow!("unknown argument {x}")),
            }
        }
        if !o.prof.is_empty() {
            return Ok(o);
        }
        if !o.check && !o.bench && !o.bench_train {
            o.check = true;
            o.bench = true;
        }
        Ok(o)
    }

    pub fn main() -> Result<bool> {
        let o = parse()?;
        let gpu = Device::new_cuda(0)?;
        if let Some(name) = &o.variant {
            let v = crate::variants::by_name(name).ok_or_else(|| anyhow!("no kernel variant {name}"))?;
            let mut s = bitlinear::kernel_settings(&gpu);
            (v.apply)(&mut s);
            crate::variants::set(&gpu, s);
        }
        let info = bitlinear::cuda_device_info(&gpu)?;
        println!("device: {info:?}");
        let mut ok = true;
        if !o.prof.is_empty() {
            prof(&gpu, &o)?;
        }
        if o.check {
            ok &= check(&gpu, &o)?;
        }
        if o.bench {
            bench(&gpu, &o)?;
        }
        if o.bench_train {
            crate::train_step::bench_train(&gpu, &o)?;
        }
        println!(
            "\ngpu_check: {}",
            if ok {
                "ALL CHECKS PASSED"
            } else {
                "FAILURES (see above)"
            }
        );
        Ok(ok)
    }
}
