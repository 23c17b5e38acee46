//! Straight-through-estimator gradients against the closed-form formulas, and a small fit.
mod common;

use bitlinear::{bit_linear_with_config, bit_matmul, ActScaling, BitLinearConfig};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::*;

#[test]
fn ste_gradients_match_closed_form() {
    let mut rng = rng("ste_gradients");
    for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (8, 16, 130), (17, 9, 33)] {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 0.05);
        let g = randn(&mut rng, m * n, 1.0);
        let xv = Var::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let wv = Var::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        let gt = Tensor::from_vec(g.clone(), (m, n), &Device::Cpu).unwrap();
        let y = bit_matmul(xv.as_tensor(), wv.as_tensor(), ActScaling::PerToken).unwrap();
        let grads = (y * gt).unwrap().sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = grads.get(&xv).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let gw: Vec<f32> = grads.get(&wv).unwrap().flatten_all().unwrap().to_vec1().unwrap();

        // grad_x = G · W~,  grad_W = Gᵀ · x~  in f64.
        let rw = ref_quantize_weights(&w);
        let ra = ref_quantize_rows(&x, m, k);
        let w_deq: Vec<f64> = rw.q.iter().map(|&q| q as f64 * rw.scale as f64).collect();
        let x_deq: Vec<f64> =
            ra.q.iter()
                .enumerate()
                .map(|(i, &q)| q as f64 * ra.scales[i / k] as f64)
                .collect();
        let mut gx_ref = vec![0f64; m * k];
        let mut gw_ref = vec![0f64; n * k];
        for i in 0..m {
            for j in 0..n {
                let gij = g[i * n + j] as f64;
                for t in 0..k {
                    gx_ref[i * k + t] += gij * w_deq[j * k + t];
                    gw_ref[j * k + t] += gij * x_deq[i * k + t];
                }
            }
        }
        // f32 matmuls over sums of up to max(n, m) terms: compare with an absolute floor.
        for (what, got, want) in [("grad_x", &gx, &gx_ref), ("grad_w", &gw, &gw_ref)] {
            let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            let err = got
                .iter()
                .zip(want.iter())
                .map(|(&a, &b)| (a as f64 - b).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(err / norm < 1e-5, "{m}x{n}x{k} {what}: relative error {}", err / norm);
        }
    }
}

#[test]
fn bitlinear_learns_a_random_linear_map() {
    let mut rng = rng("fit");
    let (k, n, batch) = (32, 8, 256);
    let target = Tensor::from_vec(randn(&mut rng, n * k, 0.3), (n, k), &Device::Cpu).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = BitLinearConfig {
        rms_norm: false,
        ..Default::default()
    };
    let layer = bit_linear_with_config(k, n, cfg, vb.pp("fc")).unwrap();
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = vec![];
    for _ in 0..300 {
        let x = Tensor::from_vec(randn(&mut rng, batch * k, 1.0), (batch, k), &Device::Cpu).unwrap();
        let y = x.matmul(&target.t().unwrap()).unwrap();
        let loss = (layer.forward(&x).unwrap() - y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    let start = losses[..5].iter().sum::<f32>() / 5.0;
    let end = losses[losses.len() - 20..].iter().sum::<f32>() / 20.0;
    // A ternary weight can't fit a Gaussian map exactly; it must still remove most of the error.
    assert!(end < 0.25 * start, "loss {start} -> {end}");
}
