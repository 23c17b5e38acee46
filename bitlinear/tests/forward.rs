//! Forward pass against the independent reference in `common`.
mod common;

use bitlinear::{bit_matmul, packed_accumulate, packed_matmul, quantize_activations, ActScaling, PackedTernary};
use candle_core::{DType, Device, Tensor};
use common::*;
use rand::Rng;

fn codes_i8(t: &Tensor) -> Vec<i8> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
        .into_iter()
        .map(|b| b as i8)
        .collect()
}

const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 7, 3),
    (1, 512, 4096),
    (2, 3, 4),
    (3, 5, 5),
    (7, 13, 129),
    (16, 33, 255),
    (5, 64, 1000),
    (128, 17, 130),
    // Large enough for the multi-threaded paths (quantize, accumulate, epilogue).
    (64, 70, 1100),
];

#[test]
fn forward_matches_reference_exactly_on_integers() {
    let mut rng = rng("forward_matches_reference");
    for &(m, n, k) in SHAPES {
        let x = randn(&mut rng, m * k, 1.5);
        let w = randn(&mut rng, n * k, 0.02);
        let (acc_ref, y_ref) = ref_forward(&x, &w, m, n, k);
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();

        // Quantizers.
        let rw = ref_quantize_weights(&w);
        let packed = PackedTernary::pack(&wt).unwrap();
        assert_eq!(packed.scale(), rw.scale, "{m}x{n}x{k}: weight scale");
        assert_eq!(packed.unpack().unwrap(), rw.q, "{m}x{n}x{k}: ternary codes");
        let ra = ref_quantize_rows(&x, m, k);
        let (codes, scales) = quantize_activations(&xt, ActScaling::PerToken).unwrap();
        assert_eq!(codes_i8(&codes), ra.q, "{m}x{n}x{k}: activation codes");
        assert_eq!(scales.to_vec1::<f32>().unwrap(), ra.scales);

        // Integer accumulators: exact.
        let acc = packed_accumulate(&codes, &packed).unwrap();
        let acc: Vec<i64> = acc
            .flatten_all()
            .unwrap()
            .to_vec1::<i32>()
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(acc, acc_ref, "{m}x{n}x{k}: accumulators");

        // Float outputs: within 1e-6 relative of the f64 reference.
        let y = bit_matmul(&xt, &wt, ActScaling::PerToken).unwrap();
        assert_eq!(y.dims(), &[m, n]);
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_close(&y, &y_ref, 1e-6, "bit_matmul");

        // The inference op equals the training op bit for bit.
        let yp: Vec<f32> = packed_matmul(&xt, &packed, ActScaling::PerToken)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(yp, y, "{m}x{n}x{k}: packed vs training forward");
    }
}

#[test]
fn per_tensor_scaling_uses_one_scale() {
    let mut rng = rng("per_tensor");
    let (m, n, k) = (4, 6, 10);
    let mut x = randn(&mut rng, m * k, 1.0);
    x[17] = 9.0; // the tensor's absmax
    let w = randn(&mut rng, n * k, 1.0);
    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
    let (codes, scales) = quantize_activations(&xt, ActScaling::PerTensor).unwrap();
    assert_eq!(scales.to_vec1::<f32>().unwrap(), vec![9.0 / 127.0]);
    let s = 9.0f32 / 127.0;
    let want: Vec<i8> = x
        .iter()
        .map(|&v| round_half_even(v / s).clamp(-128.0, 127.0) as i8)
        .collect();
    assert_eq!(codes_i8(&codes), want);
    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
    let rw = ref_quantize_weights(&w);
    let acc = ref_accumulate(&want, &rw.q, m, n, k);
    let y: Vec<f32> = bit_matmul(&xt, &wt, ActScaling::PerTensor)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let y_ref: Vec<f64> = acc.iter().map(|&a| a as f64 * s as f64 * rw.scale as f64).collect();
    assert_close(&y, &y_ref, 1e-6, "per-tensor");
}

#[test]
fn rounding_ties_go_to_even() {
    // Row absmax 127 gives s_x = 1 exactly, so x / s_x = x and the ties are exact.
    let x = Tensor::new(&[[0.5f32, 1.5, -0.5, 2.5, -2.5, 127.0, 3.5, -1.5]], &Device::Cpu).unwrap();
    let (codes, scales) = quantize_activations(&x, ActScaling::PerToken).unwrap();
    assert_eq!(scales.to_vec1::<f32>().unwrap(), vec![1.0]);
    assert_eq!(codes_i8(&codes), vec![0, 2, 0, 2, -2, 127, 4, -2]);
    // Weights: mean |w| = 1 exactly, so w / s_w = w: 0.5 -> 0, 1.5 -> 2 -> 1, -0.5 -> 0, -0.5 -> 0.
    let w = Tensor::new(&[[0.5f32, 1.5, -0.5, 1.0, -1.0, 0.5]], &Device::Cpu).unwrap();
    let p = PackedTernary::pack(&w).unwrap();
    assert_eq!(p.scale(), 5.0 / 6.0);
    // With s_w = 5/6: 0.6 -> 1, 1.8 -> 1, -0.6 -> -1, 1.2 -> 1, -1.2 -> -1, 0.6 -> 1.
    assert_eq!(p.unpack().unwrap(), vec![1, 1, -1, 1, -1, 1]);
    let w = Tensor::new(&[[0.5f32, -0.5, 2.5, -2.5, 0.0, -0.5, 1.0, 0.5]], &Device::Cpu).unwrap();
    let p = PackedTernary::pack(&w).unwrap();
    assert_eq!(p.scale(), 1.0);
    assert_eq!(p.unpack().unwrap(), vec![0, 0, 1, -1, 0, 0, 1, 0]);
}

#[test]
fn half_precision_inputs_within_their_precision() {
    let mut rng = rng("half_precision");
    let (m, n, k) = (9, 21, 67);
    let x = randn(&mut rng, m * k, 1.0);
    let w = randn(&mut rng, n * k, 0.1);
    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
    for (dtype, rel) in [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)] {
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        // The reference sees the same (rounded) inputs.
        let xr = f32_vec(&xt);
        let (_, y_ref) = ref_forward(&xr, &w, m, n, k);
        let y = bit_matmul(&xt, &wt, ActScaling::PerToken).unwrap();
        assert_eq!(y.dtype(), dtype);
        let y = f32_vec(&y);
        assert_close(&y, &y_ref, rel, &format!("{dtype:?}"));
    }
}

#[test]
fn non_finite_activations_give_nan_rows_only() {
    let mut rng = rng("non_finite");
    let (m, n, k) = (3, 4, 9);
    let mut x = randn(&mut rng, m * k, 1.0);
    x[k + 2] = f32::NAN;
    x[2 * k] = f32::INFINITY;
    let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let xt = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
    let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let y = bit_matmul(&xt, &wt, ActScaling::PerToken)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(y[0].iter().all(|v| v.is_finite()));
    assert!(y[1].iter().all(|v| v.is_nan()));
    assert!(y[2].iter().all(|v| v.is_nan()));
}

#[test]
fn empty_and_degenerate_shapes() {
    // `bit_matmul` of an (m, k) input and an (n, k) weight filled with `x` and `w`.
    let run = |(m, n, k): (usize, usize, usize), x: f32, w: f32| {
        let x = (Tensor::ones((m, k), DType::F32, &Device::Cpu).unwrap() * x as f64).unwrap();
        let w = (Tensor::ones((n, k), DType::F32, &Device::Cpu).unwrap() * w as f64).unwrap();
        bit_matmul(&x, &w, ActScaling::PerToken).unwrap()
    };
    assert_eq!(run((0, 3, 5), 1.0, 1.0).dims(), &[0, 3]); // M = 0
    assert_eq!(run((2, 0, 5), 1.0, 1.0).dims(), &[2, 0]); // N = 0
                                                          // K = 0: an empty sum is zero.
    assert_eq!(
        run((2, 3, 0), 1.0, 1.0).to_vec2::<f32>().unwrap(),
        vec![vec![0.0; 3]; 2]
    );
    // All-zero weights and inputs: the epsilons keep everything finite and zero.
    assert_eq!(
        run((2, 3, 6), 0.0, 0.0).to_vec2::<f32>().unwrap(),
        vec![vec![0.0; 3]; 2]
    );
    // The same with unit values: every product is 1, so each output is K (= 6).
    assert_eq!(
        run((2, 3, 6), 1.0, 1.0).to_vec2::<f32>().unwrap(),
        vec![vec![6.0; 3]; 2]
    );
}

#[test]
fn non_contiguous_inputs() {
    let mut rng = rng("non_contiguous");
    let (m, n, k) = (6, 5, 11);
    let x = randn(&mut rng, m * k, 1.0);
    let w = randn(&mut rng, n * k, 1.0);
    let xt = Tensor::from_vec(x, (k, m), &Device::Cpu).unwrap().t().unwrap(); // (m, k), transposed view
    assert!(!xt.is_contiguous());
    let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let y = bit_matmul(&xt, &wt, ActScaling::PerToken).unwrap();
    let y2 = bit_matmul(&xt.contiguous().unwrap(), &wt, ActScaling::PerToken).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap(), y2.to_vec2::<f32>().unwrap());
}
