//! `PackedTernary::from_parts` on arbitrary bytes, scale and K; what it accepts must unpack,
//! repack to the same bytes and run as a layer.
#![no_main]
use bitlinear::{pack_ternary, ActScaling, PackedBitLinear, PackedTernary};
use candle_core::{Device, Module, Tensor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Input: k (u16 LE), bytes per row (u8), scale (f32 LE), then the packed bytes.
    if data.len() < 7 {
        return;
    }
    let k = u16::from_le_bytes([data[0], data[1]]) as usize;
    let row = data[2] as usize;
    let scale = f32::from_le_bytes([data[3], data[4], data[5], data[6]]);
    let body = &data[7..];
    let n = if row == 0 { body.len().min(4) } else { body.len() / row };
    let bytes = Tensor::from_vec(body[..n * row].to_vec(), (n, row), &Device::Cpu).unwrap();
    let Ok(p) = PackedTernary::from_parts(bytes, scale, k) else {
        return;
    };
    let codes = p.unpack().unwrap();
    assert_eq!(
        pack_ternary(&codes, n, k).unwrap(),
        &body[..n * row],
        "repacking must give the same bytes"
    );
    let _ = p.dequantize().unwrap();
    let layer = PackedBitLinear::new(p, None, None, ActScaling::PerToken).unwrap();
    let x = Tensor::ones((2, k), candle_core::DType::F32, &Device::Cpu).unwrap();
    if let Ok(y) = layer.forward(&x) {
        assert_eq!(y.dims(), &[2, n]);
    }
});
