//! Our side of the same-run CPU peer benchmark (`bench/cpu_peers/run.sh`): `packed_matmul` on
//! pre-packed random ternary weights, per-token activation quantization included in the time,
//! under each CPU kernel this machine supports, and candle's f32 matmul (`x · Wᵀ`).
//!
//! Build: `cargo build --release -p bitlinear --example cpu_bench`.
//! Run: `cpu_bench MxNxK... [--kernel NAME|default|all] [--candle] [--threads T] [--in-pool]
//! [--rotate-mb MB] [--calls-per-sample C] [--samples FILE]`
//! (`--kernel` may repeat; kernel names are those of `bitlinear::plan::CpuKernel`, any case;
//! `default` is the one the library picks; `--threads` sizes rayon's global pool, default 2;
//! `--in-pool` runs every call from inside that pool, so the calling thread is one of its
//! workers, as in ggml where the caller is thread 0: it shows what the hand-off to the pool
//! costs, and is not how the table is measured); `--rotate-mb MB` cycles the calls through copies
//! of the weight filling MB, so that weights come from DRAM as in the decode of a large model.
//! `--calls-per-sample C` times C calls in a row as one sample (the printed times are per call):
//! a sample of ours then lasts as long as one call of a slower peer, for comparing spreads.
//! `--samples FILE` appends every timed sample, in order, as `<name> <MxNxK> <us per call>`.
//! `cpu_bench --list` prints the kernels this CPU supports, the library's default first.
//!
//! Protocol, shared with `bench/cpu_peers/ggml_matmul.c`: a warm-up of at least 200 ms, then 10
//! rounds of `iters` samples (a round about 100 ms, 5 to 2000 samples of one call each unless
//! `--calls-per-sample` says more), each sample timed alone. Per contender and shape it prints a
//! check against an exact f64 product on two activation rows and the median of the round medians
//! with the 10th and 90th percentiles of all samples (us):
//! `CHECK <name> <MxNxK> <max_abs_err / max_abs_ref>`,
//! `RESULT <name> <MxNxK> <median_us> <p10_us> <p90_us> <iters>`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitlinear::plan::{CpuKernel, ForcedChoices, KernelSettings};
use bitlinear::{packed_matmul, ActScaling, PackedTernary};
use candle_core::{Device, Tensor};

const ROUNDS: usize = 10;

/// How samples are taken (`--calls-per-sample`, `--samples`).
struct Sampling {
    calls_per_sample: usize,
    samples: Option<std::path::PathBuf>,
}

/// xorshift64*: a fixed, seedable stream so every run times the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f64 / 16_777_216.0) as f32 * 2.0 - 1.0
    }
}

/// Which implementation a row of the table times.
#[derive(Clone, Copy)]
enum Contender {
    /// `packed_matmul` with the library's own kernel choice.
    Default,
    /// `packed_matmul` with this kernel forced.
    Kernel(CpuKernel),
    /// candle's f32 matmul.
    CandleF32,
}

impl Contender {
    fn name(self) -> String {
        match self {
            Contender::Default => format!("ours_default({:?})", CpuKernel::detect()),
            Contender::Kernel(k) => format!("ours_{k:?}"),
            Contender::CandleF32 => "candle_f32".into(),
        }
    }
}

fn parse_kernel(s: &str) -> Result<Contender> {
    if s.eq_ignore_ascii_case("default") {
        return Ok(Contender::Default);
    }
    CpuKernel::ALL
        .into_iter()
        .find(|k| format!("{k:?}").eq_ignore_ascii_case(s))
        .map(Contender::Kernel)
        .with_context(|| format!("unknown kernel {s} (one of {:?}, or default/all)", CpuKernel::ALL))
}

fn parse_shape(s: &str) -> Result<(usize, usize, usize)> {
    let v: Vec<usize> = s
        .split('x')
        .map(|p| p.parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("shape {s} is not MxNxK"))?;
    match v[..] {
        [m, n, k] if m > 0 && n > 0 && k > 0 => Ok((m, n, k)),
        _ => bail!("shape {s} is not MxNxK with positive sizes"),
    }
}

/// Copies of a weight of `bytes` that fill `rotate_mb` MiB (at least one).
fn copies(rotate_mb: f64, bytes: usize) -> usize {
    ((rotate_mb * 1_048_576.0 / bytes as f64).ceil() as usize).max(1)
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(q * (v.len() - 1) as f64).round() as usize]
}

/// What [`time`] measured, in microseconds per call.
struct Timing {
    /// Every sample, in the order taken.
    samples: Vec<f64>,
    /// Median of the round medians.
    median: f64,
    p10: f64,
    p90: f64,
    /// Samples a round.
    iters: usize,
}

/// Times `call` with the shared protocol, `sampling.calls_per_sample` calls a sample.
fn time(mut call: impl FnMut() -> Result<()>, sampling: &Sampling) -> Result<Timing> {
    let per_sample = sampling.calls_per_sample;
    let start = Instant::now();
    let mut warm = 0u32;
    while warm < 3 || start.elapsed() < Duration::from_millis(200) {
        call()?;
        warm += 1;
    }
    let per_call = start.elapsed().as_secs_f64() * 1e6 / f64::from(warm);
    let iters = ((100e3 / (per_call * per_sample as f64)).ceil() as usize).clamp(5, 2000);
    let mut all = Vec::with_capacity(ROUNDS * iters);
    let mut medians = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let mut round = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            for _ in 0..per_sample {
                call()?;
            }
            round.push(t.elapsed().as_secs_f64() * 1e6 / per_sample as f64);
        }
        all.extend_from_slice(&round);
        medians.push(quantile(&mut round, 0.5));
    }
    let samples = all.clone();
    Ok(Timing {
        samples,
        median: quantile(&mut medians, 0.5),
        p10: quantile(&mut all, 0.1),
        p90: quantile(&mut all, 0.9),
        iters,
    })
}

fn run_shape(
    (m, n, k): (usize, usize, usize),
    contender: Contender,
    rotate_mb: f64,
    sampling: &Sampling,
) -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((n as u64) << 32) ^ k as u64);
    let tern: Vec<f32> = (0..n * k).map(|_| (rng.next() % 3) as f32 - 1.0).collect();
    let mut rng = Rng(0x243F_6A88_85A3_08D3 ^ ((m as u64) << 40) ^ k as u64);
    let xv: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
    let w = Tensor::from_vec(tern.clone(), (n, k), &dev)?;
    let x = Tensor::from_vec(xv.clone(), (m, k), &dev)?;

    let settings = |cpu_kernel| KernelSettings {
        force: ForcedChoices {
            cpu_kernel,
            ..Default::default()
        },
        ..Default::default()
    };
    // The weight scale the output carries: the packed one for ours (absmean of a ternary
    // matrix), 1 for the f32 matmul of the ternary values themselves.
    let (mut call, s_w): (Box<dyn FnMut() -> Result<Tensor>>, f32) = match contender {
        Contender::CandleF32 => {
            let copies = copies(rotate_mb, n * k * 4);
            let wts = (0..copies)
                .map(|_| w.copy()?.t())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let mut next = 0;
            (
                Box::new(move || {
                    next = (next + 1) % copies;
                    Ok(x.matmul(&wts[(next + copies - 1) % copies])?)
                }),
                1.0,
            )
        }
        Contender::Default | Contender::Kernel(_) => {
            let forced = match contender {
                Contender::Kernel(k) => Some(k),
                _ => None,
            };
            bitlinear::set_kernel_settings(&dev, settings(forced))?;
            let packed = PackedTernary::pack(&w)?;
            let s_w = packed.scale();
            let copies = copies(rotate_mb, packed.bytes().elem_count());
            let all = (0..copies)
                .map(|_| PackedTernary::from_parts(packed.bytes().copy()?, s_w, k))
                .collect::<candle_core::Result<Vec<_>>>()?;
            // One call on every copy makes its cached kernel layout (a load-time cost, as for a
            // model's weights), so the timed calls read only the layouts.
            for wt in &all {
                packed_matmul(&x, wt, ActScaling::PerToken)?;
            }
            let mut next = 0;
            (
                Box::new(move || {
                    next = (next + 1) % copies;
                    Ok(packed_matmul(
                        &x,
                        &all[(next + copies - 1) % copies],
                        ActScaling::PerToken,
                    )?)
                }),
                s_w,
            )
        }
    };

    let y = call()?.to_vec2::<f32>()?;
    let (mut max_err, mut max_ref) = (0f64, 0f64);
    for r in [0, m - 1] {
        for (j, &got) in y[r].iter().enumerate() {
            let exact: f64 = (0..k)
                .map(|i| f64::from(xv[r * k + i]) * f64::from(tern[j * k + i]))
                .sum::<f64>()
                * f64::from(s_w);
            max_ref = max_ref.max(exact.abs());
            max_err = max_err.max((exact - f64::from(got)).abs());
        }
    }
    let name = contender.name();
    println!("CHECK {name} {m}x{n}x{k} {:.3}", max_err / max_ref);

    let t = time(|| call().map(drop), sampling)?;
    let (med, p10, p90, iters) = (t.median, t.p10, t.p90, t.iters);
    println!("RESULT {name} {m}x{n}x{k} {med:.2} {p10:.2} {p90:.2} {iters}");
    if let Some(path) = &sampling.samples {
        use std::io::Write;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        let mut file = std::io::BufWriter::new(file.with_context(|| format!("opening {}", path.display()))?);
        for us in t.samples {
            writeln!(file, "{name} {m}x{n}x{k} {us:.3}")?;
        }
        file.flush()?;
    }
    bitlinear::set_kernel_settings(&dev, settings(None))?;
    Ok(())
}

fn main() -> Result<()> {
    let mut shapes = Vec::new();
    let mut contenders = Vec::new();
    let mut threads = 2usize;
    let mut in_pool = false;
    let mut rotate_mb = 0f64;
    let mut sampling = Sampling {
        calls_per_sample: 1,
        samples: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--list" => {
                // The library's own choice first, then the other supported kernels.
                let first = CpuKernel::detect();
                println!("{first:?}");
                for k in CpuKernel::ALL.into_iter().filter(|&k| k.is_supported() && k != first) {
                    println!("{k:?}");
                }
                return Ok(());
            }
            "--kernel" => {
                let v = args.next().context("--kernel needs a name")?;
                if v == "all" {
                    contenders.extend(
                        CpuKernel::ALL
                            .into_iter()
                            .filter(|k| k.is_supported())
                            .map(Contender::Kernel),
                    );
                } else {
                    contenders.push(parse_kernel(&v)?);
                }
            }
            "--candle" => contenders.push(Contender::CandleF32),
            "--in-pool" => in_pool = true,
            "--rotate-mb" => rotate_mb = args.next().context("--rotate-mb needs MiB")?.parse()?,
            "--calls-per-sample" => {
                let v: usize = args.next().context("--calls-per-sample needs a count")?.parse()?;
                if v == 0 {
                    bail!("--calls-per-sample must be at least 1");
                }
                sampling.calls_per_sample = v;
            }
            "--samples" => sampling.samples = Some(args.next().context("--samples needs a file")?.into()),
            "--threads" => threads = args.next().context("--threads needs a count")?.parse()?,
            s if s.starts_with("--") => bail!("unknown flag {s}"),
            s => shapes.push(parse_shape(s)?),
        }
    }
    if shapes.is_empty() {
        bail!("usage: cpu_bench MxNxK... [--kernel NAME|default|all]... [--candle] [--threads T] [--in-pool] [--rotate-mb MB] [--calls-per-sample C] [--samples FILE] | --list");
    }
    if contenders.is_empty() {
        contenders.push(Contender::Default);
    }
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    for &(m, n, k) in &shapes {
        for &c in &contenders {
            if in_pool {
                rayon::scope(|_| run_shape((m, n, k), c, rotate_mb, &sampling))?;
            } else {
                run_shape((m, n, k), c, rotate_mb, &sampling)?;
            }
        }
    }
    Ok(())
}
