//! Straight-through-estimator gradients against the closed-form formulas, and a small fit, on the
//! CPU and (with the `cuda` feature and a GPU) on CUDA.
//!
//! Tolerance: ‖got − want‖ / ‖want‖ below 1e-5 on the CPU and 1e-4 on CUDA (f32 matmuls, cuBLAS
//! there, against f64 sums of the dequantized operands).
mod common;

use bitlinear::{bit_linear_with_config, bit_matmul, ActScaling, BitLinearConfig};
use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::*;

device_test!(
    ste_gradients_match_closed_form,
    gradients_keep_operand_dtypes,
    bitlinear_learns_a_random_linear_map
);

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
    let err = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b).powi(2))
        .sum::<f64>()
        .sqrt();
    err / norm
}

/// `grad_x = G · W~` and `grad_W = Gᵀ · x~` in f64, from the reference quantizers.
fn closed_form(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    (m, n, k): (usize, usize, usize),
    sc: ActScaling,
) -> (Vec<f64>, Vec<f64>) {
    let rw = ref_quantize_weights(w);
    let ra = match sc {
        ActScaling::PerToken => ref_quantize_rows(x, m, k),
        ActScaling::PerTensor => ref_quantize_tensor(x),
    };
    let s_x = |i: usize| ra.scales[if ra.scales.len() == 1 { 0 } else { i / k }] as f64;
    let w_deq: Vec<f64> = rw.q.iter().map(|&q| q as f64 * rw.scale as f64).collect();
    let x_deq: Vec<f64> = ra.q.iter().enumerate().map(|(i, &q)| q as f64 * s_x(i)).collect();
    let mut gx = vec![0f64; m * k];
    let mut gw = vec![0f64; n * k];
    for i in 0..m {
        for j in 0..n {
            let gij = g[i * n + j] as f64;
            for t in 0..k {
                gx[i * k + t] += gij * w_deq[j * k + t];
                gw[j * k + t] += gij * x_deq[i * k + t];
            }
        }
    }
    (gx, gw)
}

fn ste_gradients_match_closed_form(dev: &Device) -> Result<()> {
    let tol = if dev.is_cpu() { 1e-5 } else { 1e-4 };
    let mut rng = rng("ste_gradients");
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (8, 16, 130),
        (17, 9, 33),
        (1, 64, 256),
        (40, 70, 257),
    ];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        let scaling = [ActScaling::PerToken, ActScaling::PerTensor][i % 2];
        let at = format!("{m}x{n}x{k} {scaling:?} on {}", dev_name(dev));
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 0.05);
        let g = randn(&mut rng, m * n, 1.0);
        let xv = Var::from_vec(x.clone(), (m, k), dev)?;
        let wv = Var::from_vec(w.clone(), (n, k), dev)?;
        let gt = Tensor::from_vec(g.clone(), (m, n), dev)?;
        let y = bit_matmul(xv.as_tensor(), wv.as_tensor(), scaling)?;
        let grads = (y * gt)?.sum_all()?.backward()?;
        let gx = f32_vec(grads.get(&xv).expect("a gradient for x"));
        let gw = f32_vec(grads.get(&wv).expect("a gradient for w"));
        let (gx_ref, gw_ref) = closed_form(&x, &w, &g, (m, n, k), scaling);
        for (what, got, want) in [("grad_x", &gx, &gx_ref), ("grad_w", &gw, &gw_ref)] {
            let e = rel_err(got, want);
            assert!(e < tol, "{at} {what}: relative error {e} (tolerance {tol})");
        }
    }
    Ok(())
}

/// Gradients come back in each operand's dtype and shape. Values against the closed form from
/// the rounded operands, within the dtypes' precision: the gradient of `y` arrives in `x`'s dtype
/// and `W~`, `x~` are rounded to the operands' dtypes before the f32 matmuls, so the relative
/// error (norm-wise) is a few units of the coarsest dtype's rounding: 1/64 with bf16, 1/512 with
/// f16, 1e-5 (CPU) / 1e-4 (CUDA) otherwise.
fn gradients_keep_operand_dtypes(dev: &Device) -> Result<()> {
    let mut rng = rng("gradient_dtypes");
    let (m, n, k) = (5, 7, 66);
    let x = randn(&mut rng, m * k, 1.0);
    let w = randn(&mut rng, n * k, 0.05);
    let g = randn(&mut rng, m * n, 1.0);
    let gt = Tensor::from_vec(g, (m, n), dev)?;
    let dts = [
        (DType::BF16, DType::F32),
        (DType::F16, DType::F16),
        (DType::F64, DType::BF16),
        (DType::F64, DType::F64),
    ];
    for (xdt, wdt) in dts {
        let at = format!("x {xdt:?} w {wdt:?} on {}", dev_name(dev));
        let tol = |dt: DType| -> f64 {
            match dt {
                DType::BF16 => 1.0 / 64.0,
                DType::F16 => 1.0 / 512.0,
                _ if dev.is_cpu() => 1e-5,
                _ => 1e-4,
            }
        };
        let tol = tol(xdt).max(tol(wdt));
        let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), (m, k), dev)?.to_dtype(xdt)?)?;
        let wv = Var::from_tensor(&Tensor::from_vec(w.clone(), (n, k), dev)?.to_dtype(wdt)?)?;
        let y = bit_matmul(xv.as_tensor(), wv.as_tensor(), ActScaling::PerToken)?;
        assert_eq!((y.dtype(), y.dims()), (xdt, &[m, n][..]), "{at}: output");
        let grads = (y * gt.to_dtype(xdt)?)?.sum_all()?.backward()?;
        let (gx, gw) = (grads.get(&xv).expect("grad x"), grads.get(&wv).expect("grad w"));
        assert_eq!((gx.dtype(), gx.dims()), (xdt, &[m, k][..]), "{at}: grad_x");
        assert_eq!((gw.dtype(), gw.dims()), (wdt, &[n, k][..]), "{at}: grad_w");
        // the closed form sees the operands and G as the op does: rounded to their dtypes
        let gr = f32_vec(&gt.to_dtype(xdt)?);
        let (gx_ref, gw_ref) = closed_form(&f32_vec(&xv), &f32_vec(&wv), &gr, (m, n, k), ActScaling::PerToken);
        for (what, got, want) in [("grad_x", gx, gx_ref), ("grad_w", gw, gw_ref)] {
            let e = rel_err(&f32_vec(got), &want);
            assert!(e < tol, "{at} {what}: relative error {e} (tolerance {tol})");
        }
    }
    Ok(())
}

fn bitlinear_learns_a_random_linear_map(dev: &Device) -> Result<()> {
    let mut rng = rng("fit");
    let (k, n, batch) = (32, 8, 256);
    let target = Tensor::from_vec(randn(&mut rng, n * k, 0.3), (n, k), dev)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let cfg = BitLinearConfig {
        rms_norm: false,
        ..Default::default()
    };
    let layer = bit_linear_with_config(k, n, cfg, vb.pp("fc"))?;
    let params = candle_nn::ParamsAdamW {
        lr: 3e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(varmap.all_vars(), params)?;
    let mut losses = vec![];
    for _ in 0..300 {
        let x = Tensor::from_vec(randn(&mut rng, batch * k, 1.0), (batch, k), dev)?;
        let y = x.matmul(&target.t()?)?;
        let loss = (layer.forward(&x)? - y)?.sqr()?.mean_all()?;
        losses.push(loss.to_scalar::<f32>()?);
        opt.backward_step(&loss)?;
    }
    let start = losses[..5].iter().sum::<f32>() / 5.0;
    let end = losses[losses.len() - 20..].iter().sum::<f32>() / 20.0;
    // A ternary weight can't fit a Gaussian map exactly. Its floor is the target's own ternary
    // form: for x ~ N(0, I) the loss of Q(T) is ||Q(T) - T||² / n. Training must reach about it
    // (measured: 0.92-1.04x over 30 seeds); the floor itself is 0.17-0.26 of the first loss.
    let q = bitlinear::fake_quantize_weights(&target)?;
    let floor = (q - &target)?.sqr()?.sum_all()?.to_scalar::<f32>()? / n as f32;
    assert!(
        end < 1.25 * floor && end < 0.5 * start,
        "on {}: loss {start} -> {end}, ternary floor {floor}",
        dev_name(dev)
    );
    Ok(())
}
