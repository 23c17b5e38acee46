//! `packed_matmul_normed` against an independent reference: the input norms written out as
//! scalar loops (f32 products rounded to the dtype where the op says, the RMS in f64), then the
//! reference quantizer, i64 products with the reference ternary weights and `acc · s_x · s_w`.
//! On the CPU the op runs `InputNorm::apply` then `packed_matmul`; on CUDA one row runs as the
//! decode GEMV with the norm inside, also compared with the tensor-op path on the same device.
mod common;

use bitlinear::{packed_matmul, packed_matmul_normed, ActScaling, InputNorm, PackedTernary};
use candle_core::{DType, Device, Result, Tensor};
use common::*;
use rand::Rng;

/// Rounds `v` to `dt` and back (round half to even, as candle's casts).
fn round_dt(v: &[f32], dt: DType) -> Result<Vec<f32>> {
    let t = Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu)?;
    t.to_dtype(dt)?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// What the norm computes: `(s, normed)` with `s` the values before the RMS and `normed` rounded
/// to `dt`.
enum Kind {
    Add { delta: bool },
    Relu2 { gate_scale: f32, up_scale: f32 },
}

fn reference_norm(
    kind: &Kind,
    x: &[f32],
    delta: &[f32],
    gain: &[f32],
    eps: f32,
    dt: DType,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let k = gain.len();
    let s: Vec<f32> = match kind {
        Kind::Add { delta: true } => round_dt(&x.iter().zip(delta).map(|(a, b)| a + b).collect::<Vec<_>>(), dt)?,
        Kind::Add { delta: false } => x.to_vec(),
        Kind::Relu2 { gate_scale, up_scale } => {
            let g = round_dt(&x[..k].iter().map(|v| v * gate_scale).collect::<Vec<_>>(), dt)?;
            let g: Vec<f32> = g.iter().map(|v| v.max(0.0)).collect();
            let u = round_dt(&x[k..].iter().map(|v| v * up_scale).collect::<Vec<_>>(), dt)?;
            let g2 = round_dt(&g.iter().map(|v| v * v).collect::<Vec<_>>(), dt)?;
            round_dt(&g2.iter().zip(&u).map(|(a, b)| a * b).collect::<Vec<_>>(), dt)?
        }
    };
    let mean_sq = s.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
    let r = 1.0 / (mean_sq + eps as f64).sqrt();
    let normed: Vec<f32> = s
        .iter()
        .zip(gain)
        .map(|(&v, &g)| (v as f64 * r * g as f64) as f32)
        .collect();
    Ok((s, round_dt(&normed, dt)?))
}

/// One case on `dev`: random inputs of `dt`, the op against the reference.
fn case(dev: &Device, rng: &mut rand::rngs::StdRng, (n, k): (usize, usize), dt: DType, kind: Kind) -> Result<()> {
    let at = format!(
        "{n}x{k} {dt:?} {}",
        match kind {
            Kind::Add { delta: true } => "add+rmsnorm",
            Kind::Add { delta: false } => "rmsnorm",
            Kind::Relu2 { .. } => "relu2+rmsnorm",
        }
    );
    let x_len = if matches!(kind, Kind::Relu2 { .. }) { 2 * k } else { k };
    let x = round_dt(&randn(rng, x_len, 1.5), dt)?;
    let delta = round_dt(&randn(rng, k, 0.7), dt)?;
    let gain = round_dt(&(0..k).map(|_| rng.gen_range(0.2f32..2.0)).collect::<Vec<_>>(), dt)?;
    let w = randn(rng, n * k, 0.05);
    let eps = 1e-5f32;

    let tensor = |v: &[f32]| {
        Tensor::from_vec(v.to_vec(), (1, v.len()), &Device::Cpu)?
            .to_dtype(dt)?
            .to_device(dev)
    };
    let (xt, dt_t) = (tensor(&x)?, tensor(&delta)?);
    let gt = tensor(&gain)?.flatten_all()?;
    let packed = PackedTernary::pack(&Tensor::from_vec(w.clone(), (n, k), dev)?)?;
    let make_norm = |gain_settled| match kind {
        Kind::Add { delta } => InputNorm::AddRmsNorm {
            delta: delta.then_some(&dt_t),
            gain: &gt,
            eps,
            gain_settled,
        },
        Kind::Relu2 { gate_scale, up_scale } => InputNorm::Relu2MulRmsNorm {
            gain: &gt,
            eps,
            gate_scale,
            up_scale,
            gain_settled,
        },
    };
    // the packed weight's first use: not settled yet, the kernels' safe order either way
    let norm = make_norm(true);
    let (y, sum) = packed_matmul_normed(&xt, &packed, &norm)?;
    let first_sum = sum.as_ref().map(f32_vec);
    assert_eq!(y.dims(), &[1, n], "{at}: output shape");

    let (s, normed) = reference_norm(&kind, &x, &delta, &gain, eps, dt)?;
    match (&kind, sum) {
        (Kind::Add { delta: true }, Some(sum)) => {
            assert_eq!(f32_vec(&sum), s, "{at}: the sum x + delta");
        }
        (Kind::Add { delta: true }, None) => panic!("{at}: no sum returned"),
        (_, Some(_)) => panic!("{at}: a sum returned without a delta"),
        (_, None) => {}
    }

    // the reference product of the reference-normed row
    let rw = ref_quantize_weights(&w);
    assert_eq!(packed.scale(), rw.scale, "{at}: weight scale");
    let ra = ref_quantize_rows(&normed, 1, k);
    let acc = ref_accumulate(&ra.q, &rw.q, 1, n, k);
    let unit = ra.scales[0] as f64 * rw.scale as f64;
    let want: Vec<f64> = acc.iter().map(|&a| a as f64 * unit).collect();
    // The op's RMS is an f32 sum (and rsqrt on CUDA), so a normalised value can lie one rounding
    // from the reference's and its code one step away: up to 4 such codes a row, each moving an
    // output by at most s_x · s_w, plus the output's rounding to dt.
    let rel = match dt {
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
        _ => 1e-6,
    };
    let got = f32_vec(&y);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let tol = 4.0 * unit + rel * w.abs();
        assert!(
            (g as f64 - w).abs() <= tol,
            "{at}: output {i}: {g} vs reference {w} (tolerance {tol})"
        );
    }
    // how many outputs are exactly the crate's epilogue of the reference's codes
    let exact = round_dt(&expected_f32(&acc, &ra.scales, rw.scale, n), dt)?;
    let same = got.iter().zip(&exact).filter(|(a, b)| a == b).count();
    eprintln!("{at}: {same} of {n} outputs exactly those of the reference's codes");

    // on the device, the fused form against the tensor ops (the CPU runs those already); and
    // again once the packed weight is settled: with a settled gain the `_e` kernel requests the
    // gain and the first weights before waiting for the previous kernel, without it the plain
    // kernel runs; the same values as the first call either way
    if dev.is_cuda() {
        dev.synchronize()?;
        for gain_settled in [true, false] {
            let (y2, sum2) = packed_matmul_normed(&xt, &packed, &make_norm(gain_settled))?;
            assert_eq!(f32_vec(&y2), got, "{at}: settled weight, gain_settled {gain_settled}");
            assert_eq!(
                sum2.as_ref().map(f32_vec),
                first_sum,
                "{at}: sum, gain_settled {gain_settled}"
            );
        }
        let (normed_ops, _) = norm.apply(&xt)?;
        let y_ops = f32_vec(&packed_matmul(&normed_ops, &packed, ActScaling::PerToken)?);
        for (i, (&g, &o)) in got.iter().zip(&y_ops).enumerate() {
            let tol = 4.0 * unit + rel * o.abs() as f64;
            assert!(
                (g - o).abs() as f64 <= tol,
                "{at}: output {i}: fused {g} vs tensor ops {o}"
            );
        }
    }
    Ok(())
}

fn matches_reference(dev: &Device) -> Result<()> {
    let mut rng = rng("input_norm");
    let shapes: &[(usize, usize)] = if dev.is_cuda() {
        // the last two run the tensor-op path on the device (K % 64 != 0, K > 8192)
        &[
            (5, 64),
            (130, 2560),
            (3840, 2560),
            (2560, 6912),
            (64, 8192),
            (3, 192),
            (7, 100),
            (9, 8256),
        ]
    } else {
        &[(5, 64), (33, 320), (17, 2560)]
    };
    for &shape in shapes {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            case(dev, &mut rng, shape, dt, Kind::Add { delta: true })?;
            case(dev, &mut rng, shape, dt, Kind::Add { delta: false })?;
            let (gate_scale, up_scale) = (rng.gen_range(0.5f32..2.0), rng.gen_range(0.5f32..2.0));
            case(dev, &mut rng, shape, dt, Kind::Relu2 { gate_scale, up_scale })?;
        }
    }
    Ok(())
}

/// A zero row: the RMS is sqrt(eps), every normalised value and output 0.
fn zero_row(dev: &Device) -> Result<()> {
    let (n, k) = (70, 128);
    let mut rng = rng("input_norm_zero");
    let w = Tensor::from_vec(randn(&mut rng, n * k, 0.05), (n, k), dev)?;
    let packed = PackedTernary::pack(&w)?;
    let x = Tensor::zeros((1, k), DType::BF16, dev)?;
    let gain = Tensor::ones(k, DType::BF16, dev)?;
    let norm = InputNorm::AddRmsNorm {
        delta: Some(&x),
        gain: &gain,
        eps: 1e-6,
        gain_settled: true,
    };
    let (y, sum) = packed_matmul_normed(&x, &packed, &norm)?;
    assert!(f32_vec(&y).iter().all(|&v| v == 0.0), "outputs of a zero row");
    assert!(
        sum.is_some_and(|s| f32_vec(&s).iter().all(|&v| v == 0.0)),
        "the sum of zero rows"
    );
    Ok(())
}

/// A non-finite value in the row makes every output NaN (no codes), as `packed_matmul` does
/// for a non-finite row: in the input of the add + norm, or in the up half of the gate product
/// (a NaN gate is zeroed by the ReLU, as candle's `relu` does).
fn non_finite_row(dev: &Device) -> Result<()> {
    let (n, k) = (40, 256);
    let mut rng = rng("input_norm_non_finite");
    let packed = PackedTernary::pack(&Tensor::from_vec(randn(&mut rng, n * k, 0.05), (n, k), dev)?)?;
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for bad in [f32::INFINITY, f32::NAN] {
            let mut x = randn(&mut rng, 2 * k, 1.0);
            x[rng.gen_range(0..k)] = bad;
            x[k + rng.gen_range(0..k)] = bad;
            let row = |v: &[f32]| Tensor::from_vec(v.to_vec(), (1, v.len()), dev)?.to_dtype(dt);
            let gain = Tensor::ones(k, dt, dev)?;
            let add = InputNorm::AddRmsNorm {
                delta: None,
                gain: &gain,
                eps: 1e-5,
                gain_settled: false,
            };
            let relu2 = InputNorm::Relu2MulRmsNorm {
                gain: &gain,
                eps: 1e-5,
                gate_scale: 1.0,
                up_scale: 1.0,
                gain_settled: false,
            };
            for (what, input, norm) in [("add", row(&x[..k])?, add), ("relu2", row(&x)?, relu2)] {
                let (y, _) = packed_matmul_normed(&input, &packed, &norm)?;
                assert!(
                    f32_vec(&y).iter().all(|v| v.is_nan()),
                    "{dt:?} {what} with {bad}: {:?}",
                    f32_vec(&y)
                );
            }
        }
    }
    Ok(())
}

/// Mismatched operands are errors, not panics.
fn bad_inputs(dev: &Device) -> Result<()> {
    let k = 64;
    let packed = PackedTernary::pack(&Tensor::ones((8, k), DType::F32, dev)?)?;
    let x = Tensor::ones((1, k), DType::F32, dev)?;
    let gain = Tensor::ones(k, DType::F32, dev)?;
    let short_gain = Tensor::ones(k - 1, DType::F32, dev)?;
    let bf16_gain = gain.to_dtype(DType::BF16)?;
    let delta = Tensor::ones((1, k + 1), DType::F32, dev)?;
    let add = |delta, gain| InputNorm::AddRmsNorm {
        delta,
        gain,
        eps: 1e-5,
        gain_settled: false,
    };
    assert!(
        packed_matmul_normed(&x, &packed, &add(None, &short_gain)).is_err(),
        "gain too short"
    );
    assert!(
        packed_matmul_normed(&x, &packed, &add(None, &bf16_gain)).is_err(),
        "gain dtype"
    );
    assert!(
        packed_matmul_normed(&x, &packed, &add(Some(&delta), &gain)).is_err(),
        "delta shape"
    );
    let relu2 = InputNorm::Relu2MulRmsNorm {
        gain: &gain,
        eps: 1e-5,
        gate_scale: 1.0,
        up_scale: 1.0,
        gain_settled: false,
    };
    assert!(
        packed_matmul_normed(&x, &packed, &relu2).is_err(),
        "relu2 needs 2K inputs"
    );
    let wide = Tensor::ones((1, 3 * k), DType::F32, dev)?;
    assert!(
        packed_matmul_normed(&wide, &packed, &add(None, &gain)).is_err(),
        "input width"
    );
    Ok(())
}

device_test!(matches_reference, zero_row, non_finite_row, bad_inputs);
