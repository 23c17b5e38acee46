//! Bad inputs give the same errors on CUDA as on the CPU.

use anyhow::Result;
use bitlinear::{
    bit_matmul, fake_quantize_weights, packed_accumulate, packed_matmul, quantize_activations, ActScaling,
    PackedTernary,
};
use candle_core::{DType, Device, Tensor};

/// Bad inputs must give errors on CUDA as on the CPU. Returns the number of failures.
pub(crate) fn bad_inputs(gpu: &Device) -> Result<usize> {
    let mut fails = 0;
    let mut w = vec![0.5f32; 6 * 10];
    w[17] = f32::NAN;
    let wn = Tensor::from_vec(w.clone(), (6, 10), gpu)?;
    w[17] = f32::INFINITY;
    let wi = Tensor::from_vec(w, (6, 10), gpu)?;
    let x = Tensor::ones((3, 10), DType::F32, gpu)?;
    let expect_err = |name: &str, r: std::result::Result<(), candle_core::Error>| -> usize {
        match r {
            Err(e) => {
                println!("bad input ok   {name}: error \"{e}\"");
                0
            }
            Ok(()) => {
                println!("bad input FAIL {name}: no error");
                1
            }
        }
    };
    for (tag, wt) in [("NaN", &wn), ("Inf", &wi)] {
        fails += expect_err(
            &format!("PackedTernary::pack({tag} weight)"),
            PackedTernary::pack(wt).map(|_| ()),
        );
        fails += expect_err(
            &format!("bit_matmul({tag} weight)"),
            bit_matmul(&x, wt, ActScaling::PerToken)
                .and_then(|y| y.to_device(&Device::Cpu))
                .map(|_| ()),
        );
        fails += expect_err(
            &format!("fake_quantize_weights({tag} weight)"),
            fake_quantize_weights(wt).map(|_| ()),
        );
    }
    let good = PackedTernary::pack(&Tensor::ones((6, 10), DType::F32, gpu)?)?;
    let codes = Tensor::zeros((3, 12), DType::U8, gpu)?;
    fails += expect_err(
        "packed_accumulate(K mismatch)",
        packed_accumulate(&codes, &good).map(|_| ()),
    );
    let x12 = Tensor::ones((3, 12), DType::F32, gpu)?;
    fails += expect_err(
        "packed_matmul(K mismatch)",
        packed_matmul(&x12, &good, ActScaling::PerToken).map(|_| ()),
    );
    let xi = Tensor::ones((3, 10), DType::I64, gpu)?;
    fails += expect_err(
        "quantize_activations(i64)",
        quantize_activations(&xi, ActScaling::PerToken).map(|_| ()),
    );
    // Operands on different devices.
    let x_cpu = Tensor::ones((3, 10), DType::F32, &Device::Cpu)?;
    let w_gpu = Tensor::ones((6, 10), DType::F32, gpu)?;
    fails += expect_err(
        "bit_matmul(x on cpu, w on cuda)",
        bit_matmul(&x_cpu, &w_gpu, ActScaling::PerToken).map(|_| ()),
    );
    fails += expect_err(
        "packed_matmul(x on cpu, w on cuda)",
        packed_matmul(&x_cpu, &good, ActScaling::PerToken).map(|_| ()),
    );
    let codes_cpu = Tensor::zeros((3, 10), DType::U8, &Device::Cpu)?;
    fails += expect_err(
        "packed_accumulate(codes on cpu, w on cuda)",
        packed_accumulate(&codes_cpu, &good).map(|_| ()),
    );
    let layer = bitlinear::BitLinear::new(w_gpu, None, None, Default::default())?;
    fails += expect_err(
        "BitLinear::forward(x on cpu, layer on cuda)",
        candle_core::Module::forward(&layer, &x_cpu).map(|_| ()),
    );
    Ok(fails)
}
