//! `convert inspect`'s listing of any safetensors file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = convert::inspect::inspect_bytes(data, "fuzz.safetensors".as_ref());
});
