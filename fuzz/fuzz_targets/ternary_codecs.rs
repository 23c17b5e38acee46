//! The ternary codecs on arbitrary data and sizes: `tq2_0::decode`, `tq1_0::decode` (GGUF blocks)
//! and `hf_bitnet::from_hf` (transformers' packed rows). What decodes must encode and decode back
//! to the same weight.
#![no_main]
use bitlinear::interop::hf_bitnet::{from_hf, to_hf, ScaleConvention};
use bitlinear::interop::{tq1_0, tq2_0};
use bitlinear::PackedTernary;
use candle_core::Device;
use libfuzzer_sys::fuzz_target;

fn same(a: &PackedTernary, b: &PackedTernary) {
    assert_eq!((a.out_features(), a.in_features()), (b.out_features(), b.in_features()));
    assert_eq!(a.scale().to_bits(), b.scale().to_bits());
    assert_eq!(a.unpack().unwrap(), b.unpack().unwrap());
}

fuzz_target!(|data: &[u8]| {
    // Input: codec (u8 % 3), N (u8), K (u16 LE), stored blocks of 256 (u8), whether an exact scale
    // follows (u8 & 1), the scale (f32 LE; the HF `weight_scale`), then the data.
    if data.len() < 10 {
        return;
    }
    let (n, k) = (data[1] as usize, u16::from_le_bytes([data[2], data[3]]) as usize);
    let k_stored = 256 * data[4] as usize;
    let scale = f32::from_le_bytes([data[6], data[7], data[8], data[9]]);
    let exact = (data[5] & 1 == 1).then_some(scale);
    let body = &data[10..];
    let cpu = &Device::Cpu;
    match data[0] % 3 {
        0 => {
            if let Ok(p) = tq2_0::decode(body, n, k_stored, k, exact, cpu) {
                let back = tq2_0::decode(
                    &tq2_0::encode(&p).unwrap(),
                    n,
                    k.div_ceil(256) * 256,
                    k,
                    Some(p.scale()),
                    cpu,
                );
                same(&p, &back.unwrap());
            }
        }
        1 => {
            if let Ok(p) = tq1_0::decode(body, n, k_stored, k, exact, cpu) {
                let back = tq1_0::decode(
                    &tq1_0::encode(&p).unwrap(),
                    n,
                    k.div_ceil(256) * 256,
                    k,
                    Some(p.scale()),
                    cpu,
                );
                same(&p, &back.unwrap());
            }
        }
        _ => {
            let conv = if data[5] & 2 == 0 {
                ScaleConvention::Multiply
            } else {
                ScaleConvention::Divide
            };
            if let Ok(p) = from_hf(body, n, k, scale, conv, cpu) {
                let (bytes, ws) = to_hf(&p, ScaleConvention::Multiply).unwrap();
                same(&p, &from_hf(&bytes, n, k, ws, ScaleConvention::Multiply, cpu).unwrap());
            }
        }
    }
});
