//! The train resume state (`train --resume`): metadata JSON and tensors.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(point) = train::checkpoint::resume_from_bytes(data) else {
        return;
    };
    let _ = point.state.settings.differences(&point.state.settings);
    for t in point.tensors.values() {
        let _ = t.to_dtype(candle_core::DType::F32); // what restoring a variable does
    }
});
