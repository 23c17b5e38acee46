//! `import-hf`, `export-hf`, `export-gguf` and `inspect` on malformed input: clear errors, and no
//! output file left behind.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use convert::raw::{self, RawTensor};

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_convert")).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes an HF-style file of the given tensors and runs import-hf on it; returns the error text.
fn import_error(dir: &Path, tensors: Vec<(&str, RawTensor)>, meta: &[(&str, &str)], args: &[&str]) -> String {
    let input = dir.join("in.safetensors");
    let out = dir.join("out.safetensors");
    let tensors: Vec<_> = tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
    let meta = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    raw::write(&input, &tensors, meta).unwrap();
    let mut all = vec!["import-hf", "--input", s(&input), "--out", s(&out)];
    all.extend(args);
    let (ok, text) = run(&all);
    assert!(!ok, "import-hf accepted it: {text}");
    assert!(!out.exists(), "a failed import left {}", out.display());
    text
}

fn packed(rows: usize, k: usize, byte: u8) -> RawTensor {
    RawTensor::u8(vec![rows, k], vec![byte; rows * k])
}

#[test]
fn import_hf_rejects_malformed_layers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let scale = |v: &[f32]| RawTensor::f32(vec![v.len()], v);
    // No BitLinear layer at all.
    let e = import_error(d, vec![("w", scale(&[1.0]))], &[], &[]);
    assert!(e.contains("not an HF BitNet checkpoint"), "{e}");
    // Code 3 in a packed weight.
    let e = import_error(
        d,
        vec![("l.weight", packed(1, 2, 0b11)), ("l.weight_scale", scale(&[2.0]))],
        &[],
        &[],
    );
    assert!(e.contains("code 3"), "{e}");
    // weight_scale with two values, zero, NaN.
    let e = import_error(
        d,
        vec![("l.weight", packed(1, 2, 0x55)), ("l.weight_scale", scale(&[1.0, 2.0]))],
        &[],
        &[],
    );
    assert!(e.contains("one scale per tensor"), "{e}");
    for bad in [0.0, f32::NAN, -1.0] {
        let e = import_error(
            d,
            vec![("l.weight", packed(1, 2, 0x55)), ("l.weight_scale", scale(&[bad]))],
            &[],
            &[],
        );
        assert!(e.contains("finite and positive"), "{bad}: {e}");
    }
    // A weight_scale without its weight.
    let e = import_error(d, vec![("l.weight_scale", scale(&[1.0]))], &[], &[]);
    assert!(e.contains("no l.weight beside it"), "{e}");
    // A float weight is an AutoBitLinear layer, and must hold -1, 0, 1 only.
    let w = RawTensor::f32(vec![1, 2], &[1.0, 0.5]);
    let e = import_error(
        d,
        vec![("l.weight", w.clone()), ("l.weight_scale", scale(&[1.0]))],
        &[],
        &[],
    );
    assert!(e.contains("AutoBitLinear"), "{e}");
    let e = import_error(
        d,
        vec![("l.weight", w), ("l.weight_scale", scale(&[1.0]))],
        &[],
        &["--linear-class", "autobitlinear"],
    );
    assert!(e.contains("not ternary"), "{e}");
    // A recorded out-features count that does not fit the packed rows.
    let e = import_error(
        d,
        vec![("l.weight", packed(2, 3, 0x55)), ("l.weight_scale", scale(&[1.0]))],
        &[("bitlinear.l.out_features", "3")],
        &[],
    );
    assert!(e.contains("does not fit 2 packed rows"), "{e}");
}

#[test]
fn import_hf_rejects_bad_directories_and_configs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.safetensors");
    let (ok, e) = run(&["import-hf", "--input", s(d), "--out", s(&out)]);
    assert!(!ok && e.contains("config.json"), "{e}");
    let layer = vec![
        ("l.weight".to_string(), packed(1, 4, 0x55)),
        ("l.weight_scale".to_string(), RawTensor::f32(vec![1], &[4.0])),
    ];
    raw::write(&d.join("model.safetensors"), &layer, HashMap::new()).unwrap();
    for (config, want) in [
        ("{", "not valid JSON"),
        (r#"{"quantization_config":{"quant_method":"gptq"}}"#, "not \"bitnet\""),
        (
            r#"{"quantization_config":{"quant_method":"bitnet","quantization_mode":"online"}}"#,
            "online",
        ),
        (
            r#"{"quantization_config":{"quant_method":"bitnet","linear_class":"x"}}"#,
            "linear_class",
        ),
    ] {
        std::fs::write(d.join("config.json"), config).unwrap();
        let (ok, e) = run(&["import-hf", "--input", s(d), "--out", s(&out)]);
        assert!(!ok && e.contains(want), "{config}: {e}");
        assert!(!out.exists());
    }
    // A shard index that points outside the directory.
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("config.json"), "{}").unwrap();
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map":{"l.weight":"../x.safetensors"}}"#,
    )
    .unwrap();
    let (ok, e) = run(&["import-hf", "--input", s(d), "--out", s(&out)]);
    assert!(!ok && e.contains("plain file names"), "{e}");
    // A packed file is not an HF checkpoint.
    let p = d.join("p.safetensors");
    raw::write(&p, &layer, raw::packed_metadata("Toy", "{}")).unwrap();
    let (ok, e) = run(&["import-hf", "--input", s(&p), "--out", s(&out)]);
    assert!(!ok && e.contains("already a packed file"), "{e}");
}

#[test]
fn exports_reject_non_packed_input_and_inspect_rejects_bad_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plain = d.join("plain.safetensors");
    raw::write(
        &plain,
        &vec![("w".into(), RawTensor::f32(vec![2], &[1.0, 2.0]))],
        HashMap::new(),
    )
    .unwrap();
    let gguf = d.join("x.gguf");
    let (ok, e) = run(&["export-gguf", "--packed", s(&plain), "--out", s(&gguf)]);
    assert!(!ok && e.contains("expected \"bitlinear-packed\""), "{e}");
    assert!(!gguf.exists());
    let (ok, e) = run(&["export-hf", "--packed", s(&plain), "--out", s(&d.join("hf"))]);
    assert!(!ok && e.contains("expected \"bitlinear-packed\""), "{e}");
    // A packed layer whose scale does not fit an f16 cannot become TQ2_0.
    let big = d.join("big.safetensors");
    let mut meta = raw::packed_metadata("Toy", "{}");
    meta.insert("l.in_features".into(), "4".into());
    let layer = vec![
        ("l.weight.packed".to_string(), packed(1, 1, 0x56)),
        ("l.weight.scale".to_string(), RawTensor::f32(vec![1], &[1e6])),
    ];
    raw::write(&big, &layer, meta).unwrap();
    let (ok, e) = run(&["export-gguf", "--packed", s(&big), "--out", s(&gguf)]);
    assert!(!ok && e.contains("does not fit an f16"), "{e}");
    assert!(!gguf.exists());
    // Truncated and corrupt GGUF files.
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop/tq.gguf");
    let bytes = std::fs::read(fixture).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() - 10]).unwrap();
    let (ok, e) = run(&["inspect", s(&gguf)]);
    assert!(!ok && e.contains("runs past the end"), "{e}");
    let mut bad = bytes.clone();
    bad[4] = 7;
    std::fs::write(&gguf, &bad).unwrap();
    let (ok, e) = run(&["inspect", s(&gguf)]);
    assert!(!ok && e.contains("version 7"), "{e}");
}

#[test]
fn import_gguf_explains_what_it_cannot_import() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop/tq.gguf");
    // The gguf package's file imports (one scale per tensor, f16 precision).
    let (ok, e) = run(&["import-gguf", "--input", s(&fixture), "--out", s(&out)]);
    assert!(ok, "{e}");
    assert!(e.contains("5 ternary layers, 1 other tensors"), "{e}");
    std::fs::remove_file(&out).unwrap();
    // Blocks of one tensor with different scales: named, and no file written.
    let bytes = std::fs::read(&fixture).unwrap();
    let g = bitlinear::interop::gguf::Gguf::parse(&bytes).unwrap();
    let t = g.tensor("tq2.a").unwrap();
    let at = (g.data_offset + t.offset) as usize + 66 + 64; // block 1's scale
    let mut bad = bytes.clone();
    bad[at..at + 2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    let input = dir.path().join("bad.gguf");
    std::fs::write(&input, &bad).unwrap();
    let (ok, e) = run(&["import-gguf", "--input", s(&input), "--out", s(&out)]);
    assert!(!ok && e.contains("block 1 has scale 0.5 but block 0 has 0.375"), "{e}");
    assert!(!out.exists());
}
