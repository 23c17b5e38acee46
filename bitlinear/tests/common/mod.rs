//! An independent reference of the BitNet b1.58 forward, written the obvious way: scalar loops,
//! f64 sums, i64 integer products. Shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A fresh RNG for each run; the seed is printed so a failure can be replayed with `SEED=...`.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: SEED={seed}");
    StdRng::seed_from_u64(seed)
}

pub fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Box-Muller.
            let (u, v): (f32, f32) = (rng.gen_range(f32::EPSILON..1.0), rng.gen());
            scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

/// Round half to even, spelled out.
pub fn round_half_even(v: f32) -> f32 {
    let f = v.floor();
    let d = v - f;
    if d > 0.5 || (d == 0.5 && f % 2.0 != 0.0) {
        f + 1.0
    } else {
        f
    }
}

pub struct RefWeights {
    pub q: Vec<i8>,
    pub scale: f32,
}

pub fn ref_quantize_weights(w: &[f32]) -> RefWeights {
    let mut sum = 0f64;
    for &v in w {
        sum += (v as f64).abs();
    }
    let mean = if w.is_empty() {
        0.0
    } else {
        (sum / w.len() as f64) as f32
    };
    let scale = if mean < 1e-5 { 1e-5 } else { mean };
    let q = w
        .iter()
        .map(|&v| {
            let r = round_half_even(v / scale);
            if r > 1.0 {
                1
            } else if r < -1.0 {
                -1
            } else {
                r as i8
            }
        })
        .collect();
    RefWeights { q, scale }
}

pub struct RefActs {
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
}

pub fn ref_quantize_rows(x: &[f32], m: usize, k: usize) -> RefActs {
    let mut q = vec![0i8; m * k];
    let mut scales = vec![0f32; m];
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        if row.iter().any(|v| !v.is_finite()) {
            scales[i] = f32::NAN;
            continue;
        }
        let mut amax = 0f32;
        for &v in row {
            if v.abs() > amax {
                amax = v.abs();
            }
        }
        let s = if amax < 1e-5 { 1e-5 } else { amax } / 127.0;
        scales[i] = s;
        for j in 0..k {
            let r = round_half_even(row[j] / s);
            q[i * k + j] = r.clamp(-128.0, 127.0) as i8;
        }
    }
    RefActs { q, scales }
}

/// Integer accumulators `(m, n)` in i64.
pub fn ref_accumulate(xq: &[i8], wq: &[i8], m: usize, n: usize, k: usize) -> Vec<i64> {
    let mut out = vec![0i64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0i64;
            for t in 0..k {
                acc += xq[i * k + t] as i64 * wq[j * k + t] as i64;
            }
            out[i * n + j] = acc;
        }
    }
    out
}

/// The whole forward in f64: `acc · s_x · s_w`.
pub fn ref_forward(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (Vec<i64>, Vec<f64>) {
    let rw = ref_quantize_weights(w);
    let ra = ref_quantize_rows(x, m, k);
    let acc = ref_accumulate(&ra.q, &rw.q, m, n, k);
    let y = acc
        .iter()
        .enumerate()
        .map(|(i, &a)| a as f64 * ra.scales[i / n.max(1)] as f64 * rw.scale as f64)
        .collect();
    (acc, y)
}

pub fn assert_close(got: &[f32], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(1e-30);
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (rel tol {rel})"
        );
    }
}

/// All elements of a float tensor, converted to f32, in row-major order.
pub fn f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
