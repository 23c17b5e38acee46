//! Forward pass against the independent reference in `common`, on the CPU and (with the `cuda`
//! feature and a GPU) on CUDA.
//!
//! Tolerances: integer results (packed bytes, weight scale, activation codes and scales, i32
//! accumulators) equal the reference exactly. f32 outputs equal `(acc * s_x) * s_w` computed in
//! f32 exactly (the epilogue both devices share, `quant::dequantize`), and are within 1e-6
//! relative of the f64 reference. bf16/f16 outputs are within one ulp of that f32 value rounded
//! to the output dtype.
mod common;

use bitlinear::{bit_matmul, packed_accumulate, packed_matmul, quantize_activations, ActScaling, PackedTernary};
use candle_core::{DType, Device, Result, Tensor};
use common::*;
use rand::Rng;

device_test!(
    forward_matches_reference_exactly_on_integers,
    per_tensor_scaling_uses_one_scale,
    rounding_ties_go_to_even,
    half_precision_inputs_within_their_precision,
    non_finite_activations_give_nan_rows_only,
    degenerate_values,
    non_contiguous_inputs,
);

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
    // Large enough for the multi-threaded CPU paths (quantize, accumulate, epilogue).
    (64, 70, 1100),
    // 2^26 multiply-adds: a CPU call this long runs inside rayon's pool.
    (128, 512, 1024),
];

fn forward_matches_reference_exactly_on_integers(dev: &Device) -> Result<()> {
    let mut rng = rng("forward_matches_reference");
    for &(m, n, k) in SHAPES {
        let at = format!("{m}x{n}x{k} on {}", dev_name(dev));
        let x = randn(&mut rng, m * k, 1.5);
        let w = randn(&mut rng, n * k, 0.02);
        let (acc_ref, y_ref) = ref_forward(&x, &w, m, n, k);
        let xt = Tensor::from_vec(x.clone(), (m, k), dev)?;
        let wt = Tensor::from_vec(w.clone(), (n, k), dev)?;

        // Quantizers.
        let rw = ref_quantize_weights(&w);
        let packed = PackedTernary::pack(&wt)?;
        assert_eq!(packed.scale(), rw.scale, "{at}: weight scale");
        assert_eq!(packed.unpack()?, rw.q, "{at}: ternary codes");
        let ra = ref_quantize_rows(&x, m, k);
        let (codes, scales) = quantize_activations(&xt, ActScaling::PerToken)?;
        assert_eq!(codes_i8(&codes), ra.q, "{at}: activation codes");
        assert_eq!(scales.to_vec1::<f32>()?, ra.scales, "{at}: activation scales");

        // Integer accumulators: exact.
        let acc = packed_accumulate(&codes, &packed)?;
        assert_eq!(acc.dims(), &[m, n]);
        assert_eq!(i64_vec(&acc), acc_ref, "{at}: accumulators");

        // f32 outputs: the shared epilogue exactly, and close to the f64 reference.
        let y = bit_matmul(&xt, &wt, ActScaling::PerToken)?;
        assert_eq!(y.dims(), &[m, n]);
        let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        assert_eq!(y, expected_f32(&acc_ref, &ra.scales, rw.scale, n), "{at}: bit_matmul");
        assert_close(&y, &y_ref, 1e-6, &format!("{at}: bit_matmul vs f64"));

        // The inference op equals the training op bit for bit.
        let yp: Vec<f32> = packed_matmul(&xt, &packed, ActScaling::PerToken)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(yp, y, "{at}: packed vs training forward");
    }
    Ok(())
}

fn per_tensor_scaling_uses_one_scale(dev: &Device) -> Result<()> {
    let mut rng = rng("per_tensor");
    for (m, n, k) in [(4, 6, 10), (33, 70, 257)] {
        let mut x = randn(&mut rng, m * k, 1.0);
        x[17] = 9.0; // the tensor's absmax
        let w = randn(&mut rng, n * k, 1.0);
        let xt = Tensor::from_vec(x.clone(), (m, k), dev)?;
        let (codes, scales) = quantize_activations(&xt, ActScaling::PerTensor)?;
        let s = 9.0f32 / 127.0;
        assert_eq!(scales.to_vec1::<f32>()?, vec![s]);
        let want: Vec<i8> = x
            .iter()
            .map(|&v| round_half_even(v / s).clamp(-128.0, 127.0) as i8)
            .collect();
        assert_eq!(want, ref_quantize_tensor(&x).q);
        assert_eq!(codes_i8(&codes), want, "{m}x{n}x{k}: per-tensor codes");
        let wt = Tensor::from_vec(w.clone(), (n, k), dev)?;
        let rw = ref_quantize_weights(&w);
        let acc = ref_accumulate(&want, &rw.q, m, n, k);
        let p = PackedTernary::pack(&wt)?;
        assert_eq!(i64_vec(&packed_accumulate(&codes, &p)?), acc);
        let y: Vec<f32> = bit_matmul(&xt, &wt, ActScaling::PerTensor)?.flatten_all()?.to_vec1()?;
        let y_ref: Vec<f64> = acc.iter().map(|&a| a as f64 * s as f64 * rw.scale as f64).collect();
        assert_close(&y, &y_ref, 1e-6, "per-tensor");
        assert_eq!(
            y,
            expected_f32(&acc, &[s], rw.scale, n),
            "{m}x{n}x{k}: per-tensor bit_matmul"
        );
        let yp: Vec<f32> = packed_matmul(&xt, &p, ActScaling::PerTensor)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(yp, y, "{m}x{n}x{k}: per-tensor packed vs training forward");
    }
    Ok(())
}

fn rounding_ties_go_to_even(dev: &Device) -> Result<()> {
    // Row absmax 127 gives s_x = 1 exactly, so x / s_x = x and the ties are exact.
    let x = Tensor::new(&[[0.5f32, 1.5, -0.5, 2.5, -2.5, 127.0, 3.5, -1.5]], dev)?;
    let (codes, scales) = quantize_activations(&x, ActScaling::PerToken)?;
    assert_eq!(scales.to_vec1::<f32>()?, vec![1.0]);
    assert_eq!(codes_i8(&codes), vec![0, 2, 0, 2, -2, 127, 4, -2]);
    // Weights: mean |w| = 5/6; w / s_w: 0.6 -> 1, 1.8 -> 1, -0.6 -> -1, 1.2 -> 1, -1.2 -> -1, 0.6 -> 1.
    let w = Tensor::new(&[[0.5f32, 1.5, -0.5, 1.0, -1.0, 0.5]], dev)?;
    let p = PackedTernary::pack(&w)?;
    assert_eq!(p.scale(), 5.0 / 6.0);
    assert_eq!(p.unpack()?, vec![1, 1, -1, 1, -1, 1]);
    // mean |w| = 1 exactly, so w / s_w = w: 0.5 -> 0, -0.5 -> 0, 2.5 -> 2 -> 1, -2.5 -> -1.
    let w = Tensor::new(&[[0.5f32, -0.5, 2.5, -2.5, 0.0, -0.5, 1.0, 0.5]], dev)?;
    let p = PackedTernary::pack(&w)?;
    assert_eq!(p.scale(), 1.0);
    assert_eq!(p.unpack()?, vec![0, 0, 1, -1, 0, 0, 1, 0]);
    // codes (0,0,1,-1,0,0,1,0) . (0,2,0,2,-2,127,4,-2) = -2 + 4, times s_x = s_w = 1.
    assert_eq!(
        bit_matmul(&x, &w, ActScaling::PerToken)?.to_vec2::<f32>()?,
        vec![vec![2.0]]
    );
    Ok(())
}

fn half_precision_inputs_within_their_precision(dev: &Device) -> Result<()> {
    let mut rng = rng("half_precision");
    for (m, n, k) in [(9, 21, 67), (1, 64, 256), (40, 33, 130)] {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 0.1);
        for (dtype, rel) in [
            (DType::BF16, 1.0 / 128.0),
            (DType::F16, 1.0 / 1024.0),
            (DType::F64, 1e-6),
        ] {
            let at = format!("{m}x{n}x{k} {dtype:?} on {}", dev_name(dev));
            let xt = Tensor::from_vec(x.clone(), (m, k), dev)?.to_dtype(dtype)?;
            let wt = Tensor::from_vec(w.clone(), (n, k), dev)?.to_dtype(dtype)?;
            // The reference sees the same (rounded) inputs.
            let (xr, wr) = (f32_vec(&xt), f32_vec(&wt));
            let (acc, y_ref) = ref_forward(&xr, &wr, m, n, k);
            let ra = ref_quantize_rows(&xr, m, k);
            let want = expected_f32(&acc, &ra.scales, ref_quantize_weights(&wr).scale, n);
            let y = bit_matmul(&xt, &wt, ActScaling::PerToken)?;
            assert_eq!(y.dtype(), dtype, "{at}: output dtype");
            let y = f32_vec(&y);
            assert_close(&y, &y_ref, rel, &at);
            let p = PackedTernary::pack(&wt)?;
            let yp = f32_vec(&packed_matmul(&xt, &p, ActScaling::PerToken)?);
            assert_eq!(yp, y, "{at}: packed vs training forward");
            if dtype == DType::F64 {
                // An f32 result widened: exact.
                assert_eq!(y, want, "{at}: f64 output");
            } else {
                assert_ulps16(&y, &want, dtype, 1, &at);
            }
        }
    }
    Ok(())
}

fn non_finite_activations_give_nan_rows_only(dev: &Device) -> Result<()> {
    let mut rng = rng("non_finite");
    let (m, n, k) = (4, 5, 9);
    let mut x = randn(&mut rng, m * k, 1.0);
    x[k + 2] = f32::NAN;
    x[2 * k] = f32::INFINITY;
    x[4 * k - 1] = f32::NEG_INFINITY;
    let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let xt = Tensor::from_vec(x, (m, k), dev)?;
    let wt = Tensor::from_vec(w, (n, k), dev)?;
    for y in [
        bit_matmul(&xt, &wt, ActScaling::PerToken)?,
        packed_matmul(&xt, &PackedTernary::pack(&wt)?, ActScaling::PerToken)?,
    ] {
        let y = y.to_vec2::<f32>()?;
        assert!(y[0].iter().all(|v| v.is_finite()), "{y:?}");
        for row in &y[1..] {
            assert!(row.iter().all(|v| v.is_nan()), "{y:?}");
        }
    }
    let (codes, scales) = quantize_activations(&xt, ActScaling::PerToken)?;
    let s = scales.to_vec1::<f32>()?;
    assert!(s[0].is_finite() && s[1..].iter().all(|v| v.is_nan()), "{s:?}");
    assert!(
        codes_i8(&codes)[k..].iter().all(|&c| c == 0),
        "non-finite rows get zero codes"
    );
    // Per tensor: one non-finite value makes every row NaN.
    let y = f32_vec(&bit_matmul(&xt, &wt, ActScaling::PerTensor)?);
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
    Ok(())
}

fn degenerate_values(dev: &Device) -> Result<()> {
    // `bit_matmul` of an (m, k) input and an (n, k) weight filled with `x` and `w`. (Empty
    // shapes are in tests/empty.rs.)
    let run = |(m, n, k): (usize, usize, usize), x: f64, w: f64| -> Result<Vec<Vec<f32>>> {
        let x = (Tensor::ones((m, k), DType::F32, dev)? * x)?;
        let w = (Tensor::ones((n, k), DType::F32, dev)? * w)?;
        bit_matmul(&x, &w, ActScaling::PerToken)?.to_vec2::<f32>()
    };
    // All-zero weights and inputs: the epsilons keep everything finite and zero.
    assert_eq!(run((2, 3, 6), 0.0, 0.0)?, vec![vec![0.0; 3]; 2]);
    // Constant values: every code is ±127 (x) and ±1 (w), so acc = ±127 K and the output is the
    // epilogue of that: (acc * (|x| / 127)) * |w| in f32.
    for ((m, n, k), x, w) in [
        ((2, 3, 6), 1.0f64, 1.0f64),
        ((3, 70, 1000), 1.0, 1.0),
        ((1, 5, 64), -2.0, 3.0),
    ] {
        let acc = 127 * k as i64 * if x * w < 0.0 { -1 } else { 1 };
        let want = (acc as f32 * (x.abs() as f32 / 127.0)) * w.abs() as f32;
        assert_eq!(run((m, n, k), x, w)?, vec![vec![want; n]; m], "{m}x{n}x{k} x={x} w={w}");
        if (x, w) == (1.0, 1.0) && k == 6 {
            assert_eq!(want, 6.0);
        }
    }
    Ok(())
}

fn non_contiguous_inputs(dev: &Device) -> Result<()> {
    let mut rng = rng("non_contiguous");
    let (m, n, k) = (6, 5, 11);
    let x = randn(&mut rng, m * k, 1.0);
    let w = randn(&mut rng, n * k, 1.0);
    let xt = Tensor::from_vec(x, (k, m), dev)?.t()?; // (m, k), transposed view
    assert!(!xt.is_contiguous());
    let wt = Tensor::from_vec(w, (k, n), dev)?.t()?;
    assert!(!wt.is_contiguous());
    let (xc, wc) = (xt.contiguous()?, wt.contiguous()?);
    let y = bit_matmul(&xt, &wt, ActScaling::PerToken)?.to_vec2::<f32>()?;
    assert_eq!(y, bit_matmul(&xc, &wc, ActScaling::PerToken)?.to_vec2::<f32>()?);
    let p = PackedTernary::pack(&wt)?;
    assert_eq!(p.unpack()?, PackedTernary::pack(&wc)?.unpack()?);
    assert_eq!(y, packed_matmul(&xt, &p, ActScaling::PerToken)?.to_vec2::<f32>()?);
    let (c1, s1) = quantize_activations(&xt, ActScaling::PerToken)?;
    let (c2, s2) = quantize_activations(&xc, ActScaling::PerToken)?;
    assert_eq!(codes_i8(&c1), codes_i8(&c2));
    assert_eq!(s1.to_vec1::<f32>()?, s2.to_vec1::<f32>()?);
    // A column slice of a wider code tensor.
    let wide = Tensor::cat(&[&c1, &c1], 1)?.narrow(1, 3, k)?;
    assert!(!wide.is_contiguous());
    let shifted = Tensor::cat(&[&c1.narrow(1, 3, k - 3)?, &c1.narrow(1, 0, 3)?], 1)?;
    assert_eq!(codes_i8(&wide), codes_i8(&shifted));
    let a1 = i64_vec(&packed_accumulate(&wide, &p)?);
    let a2 = i64_vec(&packed_accumulate(&shifted.contiguous()?, &p)?);
    assert_eq!(a1, a2);
    Ok(())
}
