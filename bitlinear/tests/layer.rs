//! The `BitLinear` module: shapes, packed form, norm, errors.
mod common;

use bitlinear::{
    bit_linear, bit_linear_no_bias, bit_matmul, packed_matmul, ActScaling, BitLinear, BitLinearConfig, PackedTernary,
};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;

fn layer(k: usize, n: usize) -> (VarMap, BitLinear) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let l = bit_linear(k, n, vb.pp("fc")).unwrap();
    (varmap, l)
}

#[test]
fn variables_are_named_like_candle_linear() {
    let (varmap, _) = layer(6, 4);
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["fc.bias", "fc.norm.weight", "fc.weight"]);
    assert_eq!(data["fc.weight"].dims(), &[4, 6]);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let l = bit_linear_no_bias(6, 4, vb).unwrap();
    assert!(l.bias().is_none() && l.norm_gain().is_some());
}

#[test]
fn forward_equals_norm_then_quantized_matmul_plus_bias() {
    let mut rng = rng("layer_forward");
    let (k, n) = (37, 11);
    let (_vm, l) = layer(k, n);
    let x = randn(&mut rng, 2 * 3 * k, 2.0);
    let xt = Tensor::from_vec(x.clone(), (2, 3, k), &Device::Cpu).unwrap();
    let y = l.forward(&xt).unwrap();
    assert_eq!(y.dims(), &[2, 3, n]);
    // The norm by hand (gain is 1 at init), then the reference forward.
    let mut xn = vec![0f32; x.len()];
    for (r, row) in x.chunks(k).enumerate() {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / k as f32;
        let d = (ms + 1e-6).sqrt();
        for (j, v) in row.iter().enumerate() {
            xn[r * k + j] = v / d;
        }
    }
    let w: Vec<f32> = l.weight().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = l.bias().unwrap().to_vec1().unwrap();
    let (_, y_ref) = ref_forward(&xn, &w, 6, n, k);
    let y_ref: Vec<f64> = y_ref.iter().enumerate().map(|(i, v)| v + b[i % n] as f64).collect();
    let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    // The hand-written norm may differ from candle's by an ulp, which can flip a code at a
    // rounding boundary: compare with a tolerance of one activation step.
    let scale = y_ref.iter().fold(0f64, |a, v| a.max(v.abs()));
    for (g, w) in y.iter().zip(&y_ref) {
        assert!((*g as f64 - w).abs() <= 2e-2 * scale, "{g} vs {w}");
    }
    // The packed form is exact.
    let p = l.to_packed().unwrap();
    let yp: Vec<f32> = p.forward(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(yp, y);
}

#[test]
fn one_dimensional_and_single_row_inputs() {
    let (_vm, l) = layer(5, 3);
    let x = Tensor::new(&[0.1f32, -0.2, 0.3, 0.4, -0.5], &Device::Cpu).unwrap();
    assert_eq!(l.forward(&x).unwrap().dims(), &[3]);
    assert_eq!(l.forward(&x.unsqueeze(0).unwrap()).unwrap().dims(), &[1, 3]);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let (_vm, l) = layer(8, 4);
    let cpu = &Device::Cpu;
    let msg = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    let e = msg(l.forward(&Tensor::zeros((2, 7), DType::F32, cpu).unwrap()));
    assert!(e.contains("7 features") && e.contains("expects 8"), "{e}");
    let e = msg(l.forward(&Tensor::new(1f32, cpu).unwrap()));
    assert!(e.contains("scalar"), "{e}");
    let e = msg(l.forward(&Tensor::zeros((2, 8), DType::U32, cpu).unwrap()));
    assert!(e.contains("float"), "{e}");
    let e = msg(l.forward(&Tensor::zeros((2, 8), DType::I64, cpu).unwrap()));
    assert!(e.contains("float"), "{e}");

    // NaN / Inf in the weights.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w = vec![0.1f32; 12];
        w[5] = bad;
        let w = Tensor::from_vec(w, (3, 4), cpu).unwrap();
        let e = PackedTernary::pack(&w).unwrap_err().to_string();
        assert!(e.contains("NaN or infinite"), "{e}");
        let x = Tensor::ones((2, 4), DType::F32, cpu).unwrap();
        let e = bit_matmul(&x, &w, ActScaling::PerToken).unwrap_err().to_string();
        assert!(e.contains("NaN or infinite"), "{e}");
        let l = BitLinear::new(w, None, None, BitLinearConfig::default()).unwrap();
        assert!(l.forward(&x).is_err());
    }

    // Mismatched K and bad shapes at the op level.
    let x = Tensor::ones((2, 5), DType::F32, cpu).unwrap();
    let w = Tensor::ones((3, 4), DType::F32, cpu).unwrap();
    assert!(bit_matmul(&x, &w, ActScaling::PerToken)
        .unwrap_err()
        .to_string()
        .contains("expects 4"));
    let p = PackedTernary::pack(&w).unwrap();
    assert!(packed_matmul(&x, &p, ActScaling::PerToken)
        .unwrap_err()
        .to_string()
        .contains("expects 4"));
    assert!(bit_matmul(&x, &Tensor::ones(5, DType::F32, cpu).unwrap(), ActScaling::PerToken).is_err());
    assert!(BitLinear::new(
        w.clone(),
        Some(Tensor::ones(4, DType::F32, cpu).unwrap()),
        None,
        BitLinearConfig::default()
    )
    .is_err());

    // from_parts validates.
    let bytes = Tensor::new(&[[0xffu8]], cpu).unwrap();
    assert!(PackedTernary::from_parts(bytes, 1.0, 4)
        .unwrap_err()
        .to_string()
        .contains("code 3"));
    let bytes = Tensor::new(&[[0x55u8]], cpu).unwrap();
    assert!(PackedTernary::from_parts(bytes.clone(), 1.0, 5).is_err());
    assert!(PackedTernary::from_parts(bytes.clone(), f32::NAN, 4).is_err());
    assert!(PackedTernary::from_parts(bytes.to_dtype(DType::U32).unwrap(), 1.0, 4).is_err());
    assert!(PackedTernary::from_parts(bytes, 0.5, 4).is_ok());

    // from_parts keeps a copy: writing into the caller's tensor afterwards changes nothing.
    let bytes = Tensor::new(&[[0x55u8, 0x66], [0x99, 0x55]], cpu).unwrap();
    let p = PackedTernary::from_parts(bytes.clone(), 0.5, 8).unwrap();
    bytes
        .slice_set(&Tensor::new(&[[0xaau8, 0xaa]], cpu).unwrap(), 0, 0)
        .unwrap();
    assert_eq!(bytes.to_vec2::<u8>().unwrap()[0], vec![0xaa, 0xaa]);
    assert_eq!(
        p.bytes().to_vec2::<u8>().unwrap(),
        vec![vec![0x55, 0x66], vec![0x99, 0x55]]
    );
    // ... also from a column view (non-contiguous: copied into a contiguous tensor)
    let wide = Tensor::new(&[[0x55u8, 0x66, 0x99], [0x99, 0x55, 0x66]], cpu).unwrap();
    let p = PackedTernary::from_parts(wide.narrow(1, 1, 2).unwrap(), 0.5, 8).unwrap();
    assert_eq!(
        p.bytes().to_vec2::<u8>().unwrap(),
        vec![vec![0x66, 0x99], vec![0x55, 0x66]]
    );
    // ... and from a row range of a larger buffer (contiguous): only those rows are kept
    let rows: Vec<u8> = (0..64u8).map(|i| [0x55u8, 0x66, 0x99, 0x00][i as usize % 4]).collect();
    let big = Tensor::from_vec(rows.clone(), (32, 2), cpu).unwrap();
    let p = PackedTernary::from_parts(big.narrow(0, 5, 3).unwrap(), 0.5, 8).unwrap();
    assert_eq!(p.bytes().flatten_all().unwrap().to_vec1::<u8>().unwrap(), rows[10..16]);
    let (storage, layout) = p.bytes().storage_and_layout();
    assert_eq!(layout.start_offset(), 0);
    match &*storage {
        candle_core::Storage::Cpu(s) => assert_eq!(s.as_slice::<u8>().unwrap().len(), 6),
        _ => unreachable!("a CPU tensor"),
    }
}
