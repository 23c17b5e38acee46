//! The packed 2-bit model file of any network (`convert eval/verify`, `PackedNetwork::load`).
#![no_main]
use candle_core::{Device, Module, Tensor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(net) = model::PackedNetwork::from_packed_bytes(data, &Device::Cpu) {
        // A file that loads must also run: one zero image through the whole network.
        let x = Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let _ = net.forward(&x);
    }
});
