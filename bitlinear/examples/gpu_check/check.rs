//! The correctness suite: random shapes and inputs, every CUDA op against the CPU reference.

use crate::bad_inputs::bad_inputs;
use crate::chains::chains;
use crate::compare::{float_check, grad_err, random_dtype, random_values, tensor};
use crate::variants::{with_settings, EXPERIMENTAL_FAILS, VARIANTS};
use crate::Opts;
use anyhow::{Context, Result};
use bitlinear::{
    bit_matmul, fake_quantize_activations, fake_quantize_weights, packed_accumulate, packed_matmul,
    quantize_activations, ActScaling, PackedTernary,
};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    xdt: DType,
    wdt: DType,
    scaling: ActScaling,
    bad_rows: bool,
    backward: bool,
}

fn shapes(o: &Opts, rng: &mut StdRng) -> Vec<(usize, usize, usize)> {
    let mut v = vec![
        (1, 1, 1),
        (1, 1, 4),
        (1, 3, 5),
        (1, 16, 64),
        (1, 17, 63),
        (1, 2560, 2560),
        (1, 4096, 4096),
        (1, 13824, 2560),
        (2, 7, 130),
        (3, 100, 12289),
        (5, 33, 1000),
        (8, 33, 257),
        (9, 100, 1001),
        (15, 47, 255),
        (16, 64, 4096),
        (16, 2560, 6912),
        (17, 31, 63),
        (31, 129, 255),
        (32, 256, 512),
        (32, 200, 7000),
        (33, 65, 129),
        (63, 127, 2047),
        (64, 128, 128),
        (65, 4096, 33),
        (100, 300, 3),
        (127, 129, 131),
        (128, 2560, 2560),
        (129, 1000, 1001),
        (300, 257, 999),
        (1024, 1024, 1024),
        (1000, 1001, 1002),
        (4096, 64, 4096),
        (2048, 300, 2560),
        // more 256 x 128 tiles than SMs: persistent CTAs of the TMA GEMM take several tiles
        (1100, 4500, 200),
        (700, 6001, 96),
        (0, 5, 8),
        (5, 0, 8),
        (5, 8, 0),
        (1, 1, 0),
        (40, 8, 0),
        // the decode GEMV (M = 1, K % 64 == 0, K <= 8192): partial warps and blocks, every
        // chunk-slot count; M > 1 and K = 16384 take the skinny kernel
        (1, 1000, 2368),
        (2, 333, 1024),
        (1, 5, 128),
        (2, 4096, 4096),
        (1, 20001, 64),
        (2, 7, 16384),
        (3, 999, 192),
        (4, 4095, 8192),
        (4, 100, 64),
        (3, 1, 8192),
        (1, 2049, 6912),
        // the streaming GEMV (M = 1 past one wave of the GEMV, or 8192 < K <= 48128): partial
        // passes of chunks, rows past the grid's last pair, the largest K
        (1, 30001, 5120),
        (1, 700, 16384),
        (1, 9, 27648),
        (1, 3, 48128),
        (1, 1, 10240),
        (1, 20480, 3200),
        // 2 <= M <= 16 with K % 64 == 0 at decode sizes (the skinny kernel, or the GEMM from
        // M = 12 at large N)
        (5, 2560, 2560),
        (7, 3, 640),
        (8, 13824, 2560),
        (9, 4096, 4096),
        (12, 1000, 6912),
        (16, 20001, 64),
        (16, 4096, 8192),
        (16, 70001, 128),
        // bf16 inputs here take the skinny kernel's two-pass fused quantizer
        (17, 64, 257),
        (24, 33, 260),
        (31, 100, 264),
        (20, 2000, 258),
    ];
    if o.quick {
        v.truncate(12);
    }
    while v.len() < o.cases {
        let m = match rng.gen_range(0..10) {
            0..=3 => rng.gen_range(1..=32),
            4..=6 => rng.gen_range(33..=300),
            _ => rng.gen_range(301..=2048),
        };
        let n = if rng.gen_bool(0.3) {
            rng.gen_range(1..=64)
        } else {
            rng.gen_range(1..=3000)
        };
        let mut k = if rng.gen_bool(0.2) {
            rng.gen_range(1..=64)
        } else {
            rng.gen_range(1..=5000)
        };
        if rng.gen_bool(0.3) {
            k = (k / 64).max(1) * 64; // aligned fast path
        }
        if m * n * k > 1_500_000_000 {
            continue;
        }
        v.push((m, n, k));
    }
    v
}

/// The whole correctness suite; true when every check passed.
pub(crate) fn check(gpu: &Device, o: &Opts) -> Result<bool> {
    // Poison every output buffer the CUDA functions allocate.
    with_settings(gpu, |s| s.poison_outputs = true, || check_poisoned(gpu, o))
}

fn check_poisoned(gpu: &Device, o: &Opts) -> Result<bool> {
    let mut rng = StdRng::seed_from_u64(o.seed);
    let list = shapes(o, &mut rng);
    println!("== correctness: {} cases (seed {}) ==", list.len(), o.seed);
    let t0 = Instant::now();
    let (mut failures, mut not_bit_exact) = (0usize, 0usize);
    for (i, &(m, n, k)) in list.iter().enumerate() {
        let case = Case {
            m,
            n,
            k,
            xdt: if (257..=300).contains(&k) && (17..=31).contains(&m) {
                DType::BF16
            } else {
                random_dtype(&mut rng)
            },
            wdt: random_dtype(&mut rng),
            scaling: if rng.gen_bool(0.25) {
                ActScaling::PerTensor
            } else {
                ActScaling::PerToken
            },
            bad_rows: rng.gen_bool(0.1),
            backward: i % 6 == 0 && m * n * k <= 50_000_000 && m > 0 && n > 0 && k > 0,
        };
        let seed = rng.gen::<u64>();
        match run_case(gpu, &case, seed) {
            Ok((errs, nbe)) => {
                not_bit_exact += nbe;
                if errs.is_empty() {
                    println!("case {i:3} ok   {}", describe(&case));
                } else {
                    failures += 1;
                    println!("case {i:3} FAIL {}: {}", describe(&case), errs.join("; "));
                }
            }
            Err(e) => {
                failures += 1;
                println!("case {i:3} ERROR {}: {e:#}", describe(&case));
            }
        }
    }
    failures += bad_inputs(gpu)?;
    failures += chains(gpu, &mut rng)?;
    println!(
        "== correctness: {failures} failing case(s), {not_bit_exact} float comparison(s) not bit-exact, {:.1} s ==",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "== experimental variants (x-*): {} mismatch(es), not counted as failures ==",
        EXPERIMENTAL_FAILS.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(failures == 0)
}

fn describe(c: &Case) -> String {
    format!(
        "M={} N={} K={} x={:?} w={:?} {:?}{}{}",
        c.m,
        c.n,
        c.k,
        c.xdt,
        c.wdt,
        c.scaling,
        if c.bad_rows { " nonfinite-rows" } else { "" },
        if c.backward { " +backward" } else { "" }
    )
}

/// Returns (error messages, number of float comparisons that were not bit-exact).
fn run_case(gpu: &Device, c: &Case, seed: u64) -> Result<(Vec<String>, usize)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut errs = Vec::new();
    let mut nbe = 0;
    let xs = rng.gen_range(0.01f32..10.0);
    let ws = rng.gen_range(0.001f32..1.0);
    let xc = tensor(random_values(&mut rng, c.m, c.k, xs, c.bad_rows), c.m, c.k, c.xdt)?;
    let wc = tensor(random_values(&mut rng, c.n, c.k, ws, false), c.n, c.k, c.wdt)?;
    let xg = xc.to_device(gpu)?;
    let wg = wc.to_device(gpu)?;

    // 1. packing
    let pc = PackedTernary::pack(&wc)?;
    let pg = PackedTernary::pack(&wg)?;
    let same_scale = pc.scale().to_bits() == pg.scale().to_bits();
    if !same_scale {
        errs.push(format!("s_w differs: cpu {:e} gpu {:e}", pc.scale(), pg.scale()));
    }
    let bc = pc.bytes().flatten_all()?.to_vec1::<u8>()?;
    let bg = pg.bytes().to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u8>()?;
    if same_scale && bc != bg {
        let d = bc.iter().zip(&bg).filter(|(a, b)| a != b).count();
        errs.push(format!("packed bytes differ in {d} of {} bytes", bc.len()));
    }
    // The CPU-packed weight on the GPU: isolates the matmul from any s_w difference.
    let pcg = pc.to_device(gpu)?;

    // 2. activation quantizer
    let (cc, sc) = quantize_activations(&xc, c.scaling)?;
    let (cg, sg) = quantize_activations(&xg, c.scaling)?;
    let codes_c = cc.flatten_all()?.to_vec1::<u8>()?;
    let codes_g = cg.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u8>()?;
    if codes_c != codes_g {
        let d = codes_c.iter().zip(&codes_g).filter(|(a, b)| a != b).count();
        errs.push(format!("activation codes differ in {d} of {}", codes_c.len()));
    }
    let sc_v = sc.to_vec1::<f32>()?;
    let sg_v = sg.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    let scales_eq = sc_v.len() == sg_v.len()
        && sc_v
            .iter()
            .zip(&sg_v)
            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
    if !scales_eq {
        errs.push("activation scales differ".into());
    }

    // 3. integer accumulators (GPU codes x CPU-packed weight on the GPU)
    let ac = packed_accumulate(&cc, &pc)?.flatten_all()?.to_vec1::<i32>()?;
    let ag = packed_accumulate(&cg, &pcg)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<i32>()?;
    if ac != ag {
        let d = ac.iter().zip(&ag).filter(|(a, b)| a != b).count();
        errs.push(format!("i32 accumulators differ in {d} of {}", ac.len()));
    }

    // 4. inference forward over the (same) packed weight
    let yc = packed_matmul(&xc, &pc, c.scaling)?;
    let yg = packed_matmul(&xg, &pcg, c.scaling)?;
    float_check("packed_matmul", &yc, &yg, c.xdt, &mut errs, &mut nbe)?;

    // 4b. every other kernel variant on the same inputs (tile shapes, forced GEMM for small
    //     M, quantizer not fused), so each variant is covered whatever the heuristic picks.
    for v in VARIANTS {
        let name = v.name;
        let experimental = name.starts_with("x-");
        let mut verrs = Vec::new();
        let r = with_settings(xg.device(), v.apply, || -> candle_core::Result<(Vec<i32>, Tensor)> {
            let a = packed_accumulate(&cg, &pcg)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<i32>()?;
            let y = packed_matmul(&xg, &pcg, c.scaling)?;
            Ok((a, y))
        });
        match r {
            Ok(r) => {
                if r.0 != ac {
                    let d = ac.iter().zip(&r.0).filter(|(a, b)| a != b).count();
                    verrs.push(format!("[{name}] i32 accumulators differ in {d} of {}", ac.len()));
                }
                let mut n = 0;
                float_check(&format!("[{name}] packed_matmul"), &yc, &r.1, c.xdt, &mut verrs, &mut n)?;
                if !experimental {
                    nbe += n;
                }
            }
            Err(e) => verrs.push(format!("[{name}] error: {e}")),
        }
        if experimental {
            for e in verrs {
                println!("      EXPERIMENTAL (not counted): {e}");
                EXPERIMENTAL_FAILS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        } else {
            errs.extend(verrs);
        }
    }

    // 5. training forward (packs on each device)
    let tc = bit_matmul(&xc, &wc, c.scaling)?;
    let tg = bit_matmul(&xg, &wg, c.scaling)?;
    if same_scale {
        float_check("bit_matmul", &tc, &tg, c.xdt, &mut errs, &mut nbe)?;
    }

    // 6. fake quantizers
    let fwc = fake_quantize_weights(&wc)?;
    let fwg = fake_quantize_weights(&wg)?;
    if same_scale {
        float_check("fake_quantize_weights", &fwc, &fwg, c.wdt, &mut errs, &mut nbe)?;
    }
    let fxc = fake_quantize_activations(&xc, c.scaling)?;
    let fxg = fake_quantize_activations(&xg, c.scaling)?;
    float_check("fake_quantize_activations", &fxc, &fxg, c.xdt, &mut errs, &mut nbe)?;

    // 7. backward (straight-through; cuBLAS vs CPU gemm => tolerance)
    if c.backward && !c.bad_rows && same_scale {
        let r = Tensor::randn(0f32, 1f32, (c.m, c.n), &Device::Cpu)?;
        let grads = |x: &Tensor, w: &Tensor, dev: &Device| -> Result<(Tensor, Tensor)> {
            let xv = Var::from_tensor(&x.to_device(dev)?)?;
            let wv = Var::from_tensor(&w.to_device(dev)?)?;
            let y = bit_matmul(xv.as_tensor(), wv.as_tensor(), c.scaling)?;
            let loss = (y.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?;
            let g = loss.backward()?;
            let gx = g.get(xv.as_tensor()).context("no grad for x")?.clone();
            let gw = g.get(wv.as_tensor()).context("no grad for w")?.clone();
            Ok((gx, gw))
        };
        let (gxc, gwc) = grads(&xc, &wc, &Device::Cpu)?;
        let (gxg, gwg) = grads(&xc, &wc, gpu)?;
        for (name, a, b, dt) in [("grad_x", &gxc, &gxg, c.xdt), ("grad_w", &gwc, &gwg, c.wdt)] {
            let e = grad_err(a, b)?;
            let t = match dt {
                DType::BF16 => 2e-2,
                DType::F16 => 4e-3,
                _ => 1e-4,
            };
            if e > t {
                errs.push(format!("{name}: relative error {e:.2e} > {t:e}"));
            }
        }
    }
    Ok((errs, nbe))
}
