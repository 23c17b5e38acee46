//! The float checkpoint (`convert export/verify`): validation, the network built from it, packing.
#![no_main]
use candle_core::Device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(checkpoint) = model::Checkpoint::from_bytes(data) else {
        return;
    };
    if let Ok(net) = convert::checkpoint::model_from_checkpoint(checkpoint, &Device::Cpu) {
        let _ = net.to_packed(); // what `export` does next
    }
});
