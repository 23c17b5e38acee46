//! The empty-dimension contract, on the CPU and (with the `cuda` feature and a GPU) on CUDA:
//! empty in, empty out. With M = 0 or N = 0 every op returns a tensor of the right shape and
//! dtype with no elements; with K = 0 every sum is empty, so accumulators and outputs are exactly
//! zero (plus the bias in the layers). Scales of an empty group are the all-zero group's,
//! `ACT_EPS / ACT_MAX` for activations and `WEIGHT_EPS` for weights. Gradients have the operands'
//! shapes and are exactly zero. All expected values here are exact.
mod common;

use bitlinear::quant::{ACT_EPS, ACT_MAX, WEIGHT_EPS};
use bitlinear::{
    bit_matmul, fake_quantize_activations, fake_quantize_weights, packed_accumulate, packed_len, packed_matmul,
    quantize_activations, ActScaling, BitLinear, BitLinearConfig, PackedBitLinear, PackedTernary,
};
use candle_core::{DType, Device, Module, Result, Tensor, Var};
use common::*;

device_test!(
    pack_empty_weights,
    quantize_activations_empty,
    packed_accumulate_empty,
    bit_matmul_forward_empty,
    bit_matmul_backward_empty,
    packed_matmul_empty,
    fake_quantize_empty,
    bit_linear_empty,
    packed_bit_linear_empty,
);

/// (M, N, K) with at least one of them zero; the larger ones reach the other kernels on CUDA
/// (M = 1 with K % 64 == 0, M > 128, K > 256).
const CASES: &[(usize, usize, usize)] = &[
    (0, 5, 7),
    (0, 64, 256),
    (0, 130, 1000),
    (3, 0, 7),
    (1, 0, 256),
    (130, 0, 64),
    (3, 5, 0),
    (1, 64, 0),
    (130, 5, 0),
    (0, 0, 0),
    (0, 0, 5),
    (0, 4, 0),
    (2, 0, 0),
];
const DTYPES: &[DType] = &[DType::F32, DType::BF16, DType::F16, DType::F64];
const SCALINGS: &[ActScaling] = &[ActScaling::PerToken, ActScaling::PerTensor];
const EMPTY_ACT_SCALE: f32 = ACT_EPS / ACT_MAX;

fn at((m, n, k): (usize, usize, usize), dt: DType, dev: &Device) -> String {
    format!("M = {m}, N = {n}, K = {k}, {dt:?} on {}", dev_name(dev))
}

// Inputs are made on the CPU and then moved: only the ops under test run on `dev` with empty
// tensors, not candle's own constructors and casts.

/// Random values of shape `dims` and dtype `dt` on `dev` (and their f32 values).
fn random(rng: &mut rand::rngs::StdRng, dims: &[usize], dt: DType, dev: &Device) -> Result<(Tensor, Vec<f32>)> {
    let v = randn(rng, dims.iter().product(), 1.0);
    let t = Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dt)?;
    let v = f32_vec(&t);
    Ok((t.to_device(dev)?, v))
}

/// A constant tensor on `dev`.
fn full(v: f64, dims: &[usize], dt: DType, dev: &Device) -> Result<Tensor> {
    (Tensor::ones(dims, dt, &Device::Cpu)? * v)?.to_device(dev)
}

/// `t` has `dims` and `dtype`, and all its elements (converted to f32) equal `want`.
fn check(t: &Tensor, dims: &[usize], dtype: DType, want: &[f32], what: &str) {
    assert_eq!(t.dims(), dims, "{what}: shape");
    assert_eq!(t.dtype(), dtype, "{what}: dtype");
    assert_eq!(f32_vec(t), want, "{what}: values");
}

fn zeros(n: usize) -> Vec<f32> {
    vec![0.0; n]
}

/// Runs one op of a case: an error or a panic from inside it (candle's own CUDA kernels panic on
/// some empty shapes) comes out naming the case and the step.
fn case<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.context(what.to_string())),
        Err(p) => {
            let msg = (p.downcast_ref::<String>().cloned())
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: panicked: {msg}")
        }
    }
}

fn pack_empty_weights(dev: &Device) -> Result<()> {
    for &(n, k) in &[(0, 7), (0, 0), (5, 0), (130, 0), (0, 1000)] {
        for &dt in DTYPES {
            let what = format!("pack N = {n}, K = {k}, {dt:?} on {}", dev_name(dev));
            let w = full(0.0, &[n, k], dt, dev)?;
            let p = case(&what, || PackedTernary::pack(&w))?;
            assert_eq!(p.scale(), WEIGHT_EPS, "{what}: empty weight scale");
            assert_eq!((p.out_features(), p.in_features()), (n, k), "{what}");
            assert_eq!(p.bytes().dims(), &[n, packed_len(k)], "{what}: bytes shape");
            assert_eq!(p.bytes().dtype(), DType::U8);
            assert!(p.device().same_device(dev));
            assert_eq!(p.unpack()?, Vec::<i8>::new(), "{what}: codes");
            check(&case(&what, || p.dequantize())?, &[n, k], DType::F32, &[], &what);
        }
        // from_parts accepts the empty bytes too
        let bytes = Tensor::zeros((n, packed_len(k)), DType::U8, &Device::Cpu)?.to_device(dev)?;
        let p = PackedTernary::from_parts(bytes, 0.5, k)?;
        assert_eq!((p.out_features(), p.in_features(), p.scale()), (n, k, 0.5));
    }
    Ok(())
}

fn quantize_activations_empty(dev: &Device) -> Result<()> {
    let mut rng = rng("quantize_activations_empty");
    for &(m, n, k) in CASES {
        for &dt in DTYPES {
            let what = at((m, n, k), dt, dev);
            let (x, xv) = random(&mut rng, &[m, k], dt, dev)?;
            for &sc in SCALINGS {
                let (codes, scales) = case(&format!("{what} {sc:?}"), || quantize_activations(&x, sc))?;
                let (want_q, want_s) = match sc {
                    ActScaling::PerToken => {
                        let r = ref_quantize_rows(&xv, m, k);
                        (r.q, r.scales)
                    }
                    ActScaling::PerTensor => {
                        let r = ref_quantize_tensor(&xv);
                        (r.q, r.scales)
                    }
                };
                assert_eq!(
                    (codes.dims(), codes.dtype()),
                    (&[m, k][..], DType::U8),
                    "{what} {sc:?}: codes"
                );
                assert_eq!(codes_i8(&codes), want_q, "{what} {sc:?}: codes");
                let ns = if sc == ActScaling::PerTensor { 1 } else { m };
                assert_eq!(
                    (scales.dims(), scales.dtype()),
                    (&[ns][..], DType::F32),
                    "{what} {sc:?}: scales"
                );
                let got_s = scales.to_vec1::<f32>()?;
                assert_eq!(got_s, want_s, "{what} {sc:?}: scales");
                if m * k == 0 {
                    assert!(
                        got_s.iter().all(|&s| s == EMPTY_ACT_SCALE),
                        "{what} {sc:?}: empty-group scale"
                    );
                }
            }
        }
    }
    Ok(())
}

fn packed_accumulate_empty(dev: &Device) -> Result<()> {
    let mut rng = rng("packed_accumulate_empty");
    for &(m, n, k) in CASES {
        let what = at((m, n, k), DType::U8, dev);
        let (w, _) = random(&mut rng, &[n, k], DType::F32, dev)?;
        let p = case(&format!("{what}: pack"), || PackedTernary::pack(&w))?;
        let (x, _) = random(&mut rng, &[m, k], DType::F32, dev)?;
        let (codes, _) = case(&format!("{what}: quantize"), || {
            quantize_activations(&x, ActScaling::PerToken)
        })?;
        let acc = case(&format!("{what}: accumulate"), || packed_accumulate(&codes, &p))?;
        assert_eq!(
            (acc.dims(), acc.dtype()),
            (&[m, n][..], DType::I32),
            "{what}: accumulators"
        );
        assert_eq!(i64_vec(&acc), vec![0; m * n], "{what}: accumulators");
        // codes built directly (not by the quantizer)
        let zero_codes = Tensor::zeros((m, k), DType::U8, &Device::Cpu)?.to_device(dev)?;
        let acc = case(&format!("{what}: accumulate zero codes"), || {
            packed_accumulate(&zero_codes, &p)
        })?;
        assert_eq!(i64_vec(&acc), vec![0; m * n], "{what}: accumulators of zero codes");
    }
    Ok(())
}

fn bit_matmul_forward_empty(dev: &Device) -> Result<()> {
    let mut rng = rng("bit_matmul_forward_empty");
    for &(m, n, k) in CASES {
        for &dt in DTYPES {
            let what = at((m, n, k), dt, dev);
            let (x, _) = random(&mut rng, &[m, k], dt, dev)?;
            let (w, _) = random(&mut rng, &[n, k], dt, dev)?;
            for &sc in SCALINGS {
                let what = format!("{what} {sc:?}: bit_matmul");
                let y = case(&what, || bit_matmul(&x, &w, sc))?;
                check(&y, &[m, n], dt, &zeros(m * n), &what);
            }
            // an f32 weight under a `dt` input: the output has the input's dtype
            let (w32, _) = random(&mut rng, &[n, k], DType::F32, dev)?;
            let y = case(&what, || bit_matmul(&x, &w32, ActScaling::PerToken))?;
            check(
                &y,
                &[m, n],
                dt,
                &zeros(m * n),
                &format!("{what}: bit_matmul, f32 weight"),
            );
        }
    }
    Ok(())
}

fn bit_matmul_backward_empty(dev: &Device) -> Result<()> {
    let mut rng = rng("bit_matmul_backward_empty");
    for &(m, n, k) in CASES {
        for &dt in DTYPES {
            let what = at((m, n, k), dt, dev);
            let xv = Var::from_tensor(&random(&mut rng, &[m, k], dt, dev)?.0)?;
            let wv = Var::from_tensor(&random(&mut rng, &[n, k], dt, dev)?.0)?;
            let (g, _) = random(&mut rng, &[m, n], dt, dev)?;
            for &sc in SCALINGS {
                let what = format!("{what} {sc:?}");
                let y = case(&format!("{what}: forward"), || {
                    bit_matmul(xv.as_tensor(), wv.as_tensor(), sc)
                })?;
                // candle's own ops on the empty y and G (the seed of the backward pass)
                let loss = case(&format!("{what}: loss (candle)"), || (y * &g)?.sum_all())?;
                let grads = case(&format!("{what}: backward"), || loss.backward())?;
                // grad_x = G W~ sums over N, grad_W = Gᵀ x~ over M: one of M, N, K is zero, so
                // each gradient is either empty or an empty sum.
                let gx = grads.get(&xv).expect("a gradient for x");
                let gw = grads.get(&wv).expect("a gradient for w");
                check(gx, &[m, k], dt, &zeros(m * k), &format!("{what} {sc:?}: grad_x"));
                check(gw, &[n, k], dt, &zeros(n * k), &format!("{what} {sc:?}: grad_w"));
            }
        }
    }
    Ok(())
}

fn packed_matmul_empty(dev: &Device) -> Result<()> {
    let mut rng = rng("packed_matmul_empty");
    for &(m, n, k) in CASES {
        let p = PackedTernary::pack(&random(&mut rng, &[n, k], DType::F32, dev)?.0)?;
        for &dt in DTYPES {
            let what = at((m, n, k), dt, dev);
            let (x, _) = random(&mut rng, &[m, k], dt, dev)?;
            for &sc in SCALINGS {
                let what = format!("{what} {sc:?}: packed_matmul");
                let y = case(&what, || packed_matmul(&x, &p, sc))?;
                check(&y, &[m, n], dt, &zeros(m * n), &what);
            }
        }
    }
    Ok(())
}

fn fake_quantize_empty(dev: &Device) -> Result<()> {
    let mut rng = rng("fake_quantize_empty");
    for &(m, n, k) in CASES {
        for &dt in DTYPES {
            let what = at((m, n, k), dt, dev);
            // expected: the reference codes times their scale in f32, rounded to `dt`
            let in_dt = |v: Vec<f32>, dims: &[usize]| -> Result<Vec<f32>> {
                Ok(f32_vec(&Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dt)?))
            };
            let (w, wv) = random(&mut rng, &[n, k], dt, dev)?;
            let r = ref_quantize_weights(&wv);
            let want = in_dt(r.q.iter().map(|&q| q as f32 * r.scale).collect(), &[n, k])?;
            check(
                &case(&what, || fake_quantize_weights(&w))?,
                &[n, k],
                dt,
                &want,
                &format!("{what}: fake weights"),
            );
            let (x, xv) = random(&mut rng, &[m, k], dt, dev)?;
            for &sc in SCALINGS {
                let r = match sc {
                    ActScaling::PerToken => ref_quantize_rows(&xv, m, k),
                    ActScaling::PerTensor => ref_quantize_tensor(&xv),
                };
                let s = |i: usize| r.scales[if r.scales.len() == 1 { 0 } else { i / k }];
                let want = in_dt(r.q.iter().enumerate().map(|(i, &q)| q as f32 * s(i)).collect(), &[m, k])?;
                let got = case(&what, || fake_quantize_activations(&x, sc))?;
                check(&got, &[m, k], dt, &want, &format!("{what} {sc:?}: fake activations"));
            }
        }
    }
    Ok(())
}

/// Leading dims of the inputs of a layer on `m` rows: `(m, K)`, `(2, m, K)`, `(m, 1, K)`, and the
/// unbatched `(K,)` (one row).
fn leads(m: usize) -> [Vec<usize>; 4] {
    [vec![m], vec![2, m], vec![m, 1], vec![]]
}

/// Layers (training form) with N outputs and K inputs: bias and RMSNorm on or off, both
/// scalings. Returns the layers and their bias values (as f32).
fn layers(
    rng: &mut rand::rngs::StdRng,
    n: usize,
    k: usize,
    dt: DType,
    dev: &Device,
) -> Result<Vec<(BitLinear, Vec<f32>)>> {
    let (w, _) = random(rng, &[n, k], dt, dev)?;
    let (b, bv) = random(rng, &[n], dt, dev)?;
    let g = full(1.0, &[k], dt, dev)?;
    let mut out = vec![];
    for (bias, norm, act_scaling) in [
        (true, true, ActScaling::PerToken),
        (false, false, ActScaling::PerTensor),
    ] {
        let config = BitLinearConfig {
            act_scaling,
            ..Default::default()
        };
        let l = BitLinear::new(w.clone(), bias.then(|| b.clone()), norm.then(|| g.clone()), config)?;
        out.push((l, if bias { bv.clone() } else { zeros(n) }));
    }
    Ok(out)
}

/// Runs `forward` over every case, input layout and dtype: the output has the input's leading
/// dims then N, its dtype, and for K = 0 every row equals the bias (zeros without one).
fn layer_contract(dev: &Device, name: &str, forward: impl Fn(&BitLinear, &Tensor) -> Result<Tensor>) -> Result<()> {
    let mut rng = rng(name);
    for &(m, n, k) in CASES {
        for &dt in DTYPES {
            for (l, bias) in layers(&mut rng, n, k, dt, dev)? {
                for lead in leads(m) {
                    let rows: usize = lead.iter().product();
                    if rows * n * k != 0 {
                        continue; // the unbatched input is one row: not empty when M = 0
                    }
                    let mut dims = lead.clone();
                    dims.push(k);
                    let (x, _) = random(&mut rng, &dims, dt, dev)?;
                    let what = format!(
                        "{name}: x {dims:?}, {}, bias and norm {}",
                        at((m, n, k), dt, dev),
                        l.bias().is_some()
                    );
                    let y = case(&what, || forward(&l, &x))?;
                    let mut want_dims = lead.clone();
                    want_dims.push(n);
                    let want: Vec<f32> = bias.iter().copied().cycle().take(rows * n).collect();
                    check(&y, &want_dims, dt, &want, &what);
                }
            }
        }
    }
    Ok(())
}

fn bit_linear_empty(dev: &Device) -> Result<()> {
    layer_contract(dev, "bit_linear_empty", |l, x| l.forward(x))
}

fn packed_bit_linear_empty(dev: &Device) -> Result<()> {
    layer_contract(dev, "packed_bit_linear_empty", |l, x| {
        let p: PackedBitLinear = l.to_packed()?;
        assert_eq!(p.act_scaling(), l.config().act_scaling);
        p.forward(x)
    })
}
