//! The float checkpoint of any network (`convert export/verify`): validation, the network built
//! from it, packing.
#![no_main]
use candle_core::Device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(net) = model::Network::from_checkpoint_bytes(data, model::ComputeOptions::default(), &Device::Cpu) {
        let _ = net.to_packed(); // what `export` does next
    }
});
