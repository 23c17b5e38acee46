//! The CIFAR-10 binary record reader, then the normalisation of what it accepted.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(split) = cifar::read_batch_bytes(data, "fuzz input".as_ref()) else {
        return;
    };
    assert_eq!(cifar::encode_records(&split), data, "records must round-trip");
    let all: Vec<usize> = (0..split.len()).collect();
    let x = cifar::normalize_batch(&split, &all, &cifar::Normalizer::default().lut());
    assert_eq!(x.len(), data.len() - split.len());
});
