//! The `BitLinear` module: shapes, packed form, norm, errors, on the CPU and (with the `cuda`
//! feature and a GPU) on CUDA.
mod common;

use bitlinear::{
    bit_linear, bit_linear_no_bias, bit_matmul, packed_matmul, ActScaling, BitLinear, BitLinearConfig, BitMatmul,
    PackedTernary,
};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;

device_test!(
    variables_are_named_like_candle_linear,
    forward_equals_norm_then_quantized_matmul_plus_bias,
    one_dimensional_and_single_row_inputs,
    bad_inputs_are_errors_not_panics,
    unchecked_non_finite_weights,
    from_parts_validates_and_copies,
);

fn layer(k: usize, n: usize, dev: &Device) -> Result<(VarMap, BitLinear)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let l = bit_linear(k, n, vb.pp("fc"))?;
    Ok((varmap, l))
}

fn variables_are_named_like_candle_linear(dev: &Device) -> Result<()> {
    let (varmap, _) = layer(6, 4, dev)?;
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["fc.bias", "fc.norm.weight", "fc.weight"]);
    assert_eq!(data["fc.weight"].dims(), &[4, 6]);
    assert!(data["fc.weight"].device().same_device(dev));
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let l = bit_linear_no_bias(6, 4, vb)?;
    assert!(l.bias().is_none() && l.norm_gain().is_some());
    Ok(())
}

fn forward_equals_norm_then_quantized_matmul_plus_bias(dev: &Device) -> Result<()> {
    let mut rng = rng("layer_forward");
    let (k, n) = (37, 11);
    let (_vm, l) = layer(k, n, dev)?;
    let x = randn(&mut rng, 2 * 3 * k, 2.0);
    let xt = Tensor::from_vec(x.clone(), (2, 3, k), dev)?;
    let y = l.forward(&xt)?;
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
    let w = f32_vec(l.weight());
    let b = f32_vec(l.bias().unwrap());
    let (_, y_ref) = ref_forward(&xn, &w, 6, n, k);
    let y_ref: Vec<f64> = y_ref.iter().enumerate().map(|(i, v)| v + b[i % n] as f64).collect();
    let y = f32_vec(&y);
    // The hand-written norm may differ from candle's by an ulp, which can flip a code at a
    // rounding boundary: compare with a tolerance of one activation step.
    let scale = y_ref.iter().fold(0f64, |a, v| a.max(v.abs()));
    for (g, w) in y.iter().zip(&y_ref) {
        assert!((*g as f64 - w).abs() <= 2e-2 * scale, "{g} vs {w} on {}", dev_name(dev));
    }
    // The packed form is exact.
    let p = l.to_packed()?;
    assert!(p.weight().device().same_device(dev));
    assert_eq!(
        f32_vec(&p.forward(&xt)?),
        y,
        "packed vs training layer on {}",
        dev_name(dev)
    );
    Ok(())
}

fn one_dimensional_and_single_row_inputs(dev: &Device) -> Result<()> {
    let (_vm, l) = layer(5, 3, dev)?;
    let x = Tensor::new(&[0.1f32, -0.2, 0.3, 0.4, -0.5], dev)?;
    let y = l.forward(&x)?;
    assert_eq!(y.dims(), &[3]);
    let y2 = l.forward(&x.unsqueeze(0)?)?;
    assert_eq!(y2.dims(), &[1, 3]);
    assert_eq!(f32_vec(&y), f32_vec(&y2));
    let p = l.to_packed()?;
    assert_eq!(f32_vec(&p.forward(&x)?), f32_vec(&y));
    assert_eq!(p.forward(&x.reshape((1, 1, 1, 5))?)?.dims(), &[1, 1, 1, 3]);
    Ok(())
}

fn bad_inputs_are_errors_not_panics(dev: &Device) -> Result<()> {
    let (_vm, l) = layer(8, 4, dev)?;
    let cpu = dev;
    let msg = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    let e = msg(l.forward(&Tensor::zeros((2, 7), DType::F32, cpu)?));
    assert!(e.contains("7 features") && e.contains("expects 8"), "{e}");
    let e = msg(l.forward(&Tensor::new(1f32, cpu)?));
    assert!(e.contains("scalar"), "{e}");
    let e = msg(l.forward(&Tensor::zeros((2, 8), DType::U32, cpu)?));
    assert!(e.contains("float"), "{e}");
    let e = msg(l.forward(&Tensor::zeros((2, 8), DType::I64, cpu)?));
    assert!(e.contains("float"), "{e}");

    // NaN / Inf in the weights.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w = vec![0.1f32; 12];
        w[5] = bad;
        let w = Tensor::from_vec(w, (3, 4), dev)?;
        let e = PackedTernary::pack(&w).unwrap_err().to_string();
        assert!(e.contains("NaN or infinite"), "{e}");
        let x = Tensor::ones((2, 4), DType::F32, dev)?;
        let e = bit_matmul(&x, &w, ActScaling::PerToken).unwrap_err().to_string();
        assert!(e.contains("NaN or infinite"), "{e}");
        let l = BitLinear::new(w, None, None, BitLinearConfig::default())?;
        assert!(l.forward(&x).is_err());
    }

    // Mismatched K and bad shapes at the op level.
    let x = Tensor::ones((2, 5), DType::F32, dev)?;
    let w = Tensor::ones((3, 4), DType::F32, dev)?;
    let e = msg(bit_matmul(&x, &w, ActScaling::PerToken));
    assert!(e.contains("expects 4"), "{e}");
    let p = PackedTernary::pack(&w)?;
    let e = msg(packed_matmul(&x, &p, ActScaling::PerToken));
    assert!(e.contains("expects 4"), "{e}");
    assert!(bit_matmul(&x, &Tensor::ones(5, DType::F32, dev)?, ActScaling::PerToken).is_err());
    let bias4 = Some(Tensor::ones(4, DType::F32, dev)?);
    assert!(BitLinear::new(w.clone(), bias4, None, BitLinearConfig::default()).is_err());
    // Operands on different devices (only when `dev` is not the CPU).
    if !dev.is_cpu() {
        let xc = Tensor::ones((2, 4), DType::F32, &Device::Cpu)?;
        let e = msg(bit_matmul(&xc, &w, ActScaling::PerToken));
        assert!(e.contains("to_device"), "{e}");
        let e = msg(packed_matmul(&xc, &p, ActScaling::PerToken));
        assert!(e.contains("to_device"), "{e}");
    }
    Ok(())
}

/// With the check off, a non-finite weight is no error on CUDA but gives non-finite outputs
/// (see `BitMatmul::check_finite`); the CPU checks anyway.
fn unchecked_non_finite_weights(dev: &Device) -> Result<()> {
    let op = BitMatmul {
        check_finite: false,
        ..BitMatmul::new(ActScaling::PerToken)
    };
    let x = Tensor::ones((3, 8), DType::F32, dev)?;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w = vec![0.1f32; 16];
        w[9] = bad;
        let w = Tensor::from_vec(w, (2, 8), dev)?;
        match op.forward(&x, &w) {
            Ok(y) => {
                assert!(!dev.is_cpu(), "the CPU always checks the weights");
                let y = f32_vec(&y);
                assert!(y.iter().all(|v| !v.is_finite()), "{bad} weight, unchecked: {y:?}");
            }
            Err(e) if dev.is_cpu() => assert!(e.to_string().contains("NaN or infinite"), "{e}"),
            Err(e) => panic!("{bad} weight, unchecked, on {}: {e}", dev_name(dev)),
        }
    }
    Ok(())
}

fn from_parts_validates_and_copies(dev: &Device) -> Result<()> {
    let bytes = Tensor::new(&[[0xffu8]], dev)?;
    let e = PackedTernary::from_parts(bytes, 1.0, 4).unwrap_err().to_string();
    assert!(e.contains("code 3"), "{e}");
    let bytes = Tensor::new(&[[0x55u8]], dev)?;
    assert!(PackedTernary::from_parts(bytes.clone(), 1.0, 5).is_err());
    assert!(PackedTernary::from_parts(bytes.clone(), f32::NAN, 4).is_err());
    assert!(PackedTernary::from_parts(bytes.clone(), 0.0, 4).is_err());
    assert!(PackedTernary::from_parts(bytes.to_dtype(DType::U32)?, 1.0, 4).is_err());
    let p = PackedTernary::from_parts(bytes, 0.5, 4)?;
    assert!(p.device().same_device(dev));

    // from_parts keeps a copy: writing into the caller's tensor afterwards changes nothing.
    let bytes = Tensor::new(&[[0x55u8, 0x66], [0x99, 0x55]], dev)?;
    let p = PackedTernary::from_parts(bytes.clone(), 0.5, 8)?;
    bytes.slice_set(&Tensor::new(&[[0xaau8, 0xaa]], dev)?, 0, 0)?;
    assert_eq!(bytes.to_vec2::<u8>()?[0], vec![0xaa, 0xaa]);
    assert_eq!(p.bytes().to_vec2::<u8>()?, vec![vec![0x55, 0x66], vec![0x99, 0x55]]);
    // ... also from a column view (non-contiguous: copied into a contiguous tensor)
    let wide = Tensor::new(&[[0x55u8, 0x66, 0x99], [0x99, 0x55, 0x66]], dev)?;
    let p = PackedTernary::from_parts(wide.narrow(1, 1, 2)?, 0.5, 8)?;
    assert_eq!(p.bytes().to_vec2::<u8>()?, vec![vec![0x66, 0x99], vec![0x55, 0x66]]);
    // ... and the forward reads that copy (2 bits a value, low bits first, code - 1):
    // 0x66 = (1, 0, 1, 0), 0x99 = (0, 1, 0, 1), 0x55 = zeros
    assert_eq!(p.unpack()?, vec![1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0]);
    let x = Tensor::new(&[[127f32, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]], dev)?;
    let y = packed_matmul(&x, &p, ActScaling::PerToken)?.to_vec2::<f32>()?;
    // s_x = 1: acc = (127 + 2 + 5 + 7, 4 + 6), times s_w = 0.5
    assert_eq!(y, vec![vec![70.5, 5.0]]);
    // ... and from a row range of a larger buffer (contiguous): only those rows are kept
    let rows: Vec<u8> = (0..64u8).map(|i| [0x55u8, 0x66, 0x99, 0x00][i as usize % 4]).collect();
    let big = Tensor::from_vec(rows.clone(), (32, 2), dev)?;
    let p = PackedTernary::from_parts(big.narrow(0, 5, 3)?, 0.5, 8)?;
    assert_eq!(p.bytes().flatten_all()?.to_vec1::<u8>()?, rows[10..16]);
    let (storage, layout) = p.bytes().storage_and_layout();
    assert_eq!(layout.start_offset(), 0);
    let len = match &*storage {
        candle_core::Storage::Cpu(s) => s.as_slice::<u8>()?.len(),
        #[cfg(feature = "cuda")]
        candle_core::Storage::Cuda(s) => s.as_cuda_slice::<u8>()?.len(),
        _ => unreachable!("a CPU or CUDA tensor"),
    };
    assert_eq!(len, 6, "the copy holds only the three rows");
    Ok(())
}
