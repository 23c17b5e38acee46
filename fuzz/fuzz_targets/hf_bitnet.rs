//! `import-hf` on arbitrary bytes taken as a transformers BitNet `model.safetensors`: packed U8
//! weights and float (AutoBitLinear) weights with their `weight_scale`, and the metadata
//! `export-hf` records. What imports must be a well-formed packed model.
#![no_main]
use convert::hf::{import_hf_bytes, LinearClass};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    // Input: one byte choosing the linear class (as `--linear-class` would), then the file.
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let class = match mode % 3 {
        0 => None,
        1 => Some(LinearClass::BitLinear),
        _ => Some(LinearClass::AutoBitLinear),
    };
    if let Ok(c) = import_hf_bytes(&[("fuzz.safetensors".as_ref(), file)], None, class) {
        assert_eq!(c.tensors.len(), 2 * c.report.layers + c.report.copied);
        common::check_packed(&c);
    }
});
