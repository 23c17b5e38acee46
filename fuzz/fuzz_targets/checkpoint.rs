//! The float checkpoint (`convert export/verify`): tensors, the network built from them, packing.
#![no_main]
use candle_core::Device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tensors) = convert::checkpoint::tensors_from_bytes(data) else {
        return;
    };
    if let Ok(net) = convert::checkpoint::model_from_tensors(tensors, &Device::Cpu) {
        let _ = net.to_packed(); // what `export` does next
    }
});
