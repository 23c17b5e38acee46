//! The train resume state (`train --resume`): metadata JSON, its validation and the tensors.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(point) = train::checkpoint::resume_from_bytes(data) else {
        return;
    };
    let _ = point.state.settings.differences(&point.state.settings);
    let _ = point.state.validate(391); // what `train --resume` checks next
    for t in point.tensors.values() {
        let _ = t.to_dtype(candle_core::DType::F32); // what restoring a variable does
    }
});
