//! `import-gguf` on arbitrary bytes: the GGUF reader (`Gguf::parse`, `Gguf::data`), the TQ2_0 and
//! TQ1_0 decoders and the import; what imports must be a well-formed packed model.
#![no_main]
use bitlinear::interop::gguf::Gguf;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    // Errors are fine; panics, aborts, hangs and overflows are crashes.
    let Ok(g) = Gguf::parse(data) else {
        return;
    };
    for t in &g.tensors {
        if let Ok(d) = g.data(data, t) {
            assert!(d.len() <= data.len());
        }
    }
    if let Ok(c) = convert::gguf_file::import_gguf_bytes(data) {
        assert_eq!(c.tensors.len(), 2 * c.report.layers + c.report.copied);
        common::check_packed(&c);
    }
});
