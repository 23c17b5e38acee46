//! The in-memory entry points of `import-gguf` and `import-hf` (what the fuzz targets call): the
//! same result as the path-based imports, and clear errors for what the fuzzers found.

use std::path::{Path, PathBuf};

use bitlinear::interop::gguf::{GgmlType, Value, Writer};
use convert::gguf_file::{import_gguf, import_gguf_bytes};
use convert::hf::{import_hf, import_hf_bytes, LinearClass};
use convert::raw;
use rand::{Rng, SeedableRng};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/interop")
        .join(name)
}

/// One TQ2_0 row of 256 random ternary weights (each byte's four 2-bit codes in 0..=2) with `scale`.
fn tq2_row(rng: &mut impl Rng, scale: f32) -> Vec<u8> {
    let mut row: Vec<u8> = (0..64)
        .map(|_| (0..4).map(|i| rng.gen_range(0..3u8) << (2 * i)).sum())
        .collect();
    row.extend(half::f16::from_f32(scale).to_le_bytes());
    row
}

#[test]
fn import_gguf_bytes_is_what_import_gguf_writes() {
    let bytes = std::fs::read(fixture("tq.gguf")).unwrap();
    let c = import_gguf_bytes(&bytes).unwrap();
    assert_eq!((c.report.layers, c.report.copied), (5, 1));
    assert_eq!(c.tensors.len(), 11);
    assert_eq!(c.metadata["tq2.a.in_features"], "512");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    assert_eq!(import_gguf(&fixture("tq.gguf"), &out).unwrap(), c.report);
    let (tensors, meta) = raw::parse(&std::fs::read(&out).unwrap(), &out).unwrap();
    assert_eq!(tensors, c.tensors);
    assert_eq!(meta, c.metadata);
}

/// Found by the `gguf` fuzz target: an empty F32 tensor whose dims, reversed into our order,
/// overflow before their zero made the safetensors writer's unchecked product panic.
#[test]
fn import_gguf_bytes_rejects_dims_whose_product_overflows() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let scale = rng.gen_range(0.01f32..2.0);
    let mut file = |dims: Vec<u64>| {
        let mut w = Writer::new();
        w.metadata("general.name", Value::String("t".into()));
        w.tensor("fc.weight", vec![256, 1], GgmlType::TQ2_0, tq2_row(&mut rng, scale));
        w.tensor("empty", dims, GgmlType::F32, vec![]);
        w.to_bytes().unwrap()
    };
    let e = import_gguf_bytes(&file(vec![0, 1 << 32, 1 << 32])).unwrap_err();
    assert!(
        format!("{e:#}").contains("\"empty\" has dims [0, 4294967296, 4294967296] whose product overflows"),
        "{e:#}"
    );
    // Empty with dims that fit: copied, shape reversed.
    let c = import_gguf_bytes(&file(vec![0, 3, 5])).unwrap();
    let (_, t) = c.tensors.iter().find(|(n, _)| n == "empty").unwrap();
    assert_eq!((t.shape.clone(), t.data.len()), (vec![5, 3, 0], 0));
    assert_eq!((c.report.layers, c.report.copied), (1, 1));
}

#[test]
fn import_hf_bytes_is_what_import_hf_writes() {
    let dir = fixture("tiny-bitnet");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let shard: &Path = "model.safetensors".as_ref();
    let c = import_hf_bytes(&[(shard, &bytes)], Some(&config), None).unwrap();
    assert_eq!(c.report.linear_class, LinearClass::BitLinear);
    assert_eq!(c.report.layers, 14); // 2 decoder layers of 7 BitLinear projections
    assert_eq!(c.tensors.len(), 2 * 14 + c.report.copied);
    assert_eq!(c.metadata["model"], "BitNetForCausalLM");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    assert_eq!(import_hf(&dir, &out, None).unwrap(), c.report);
    let (mut tensors, meta) = raw::parse(&std::fs::read(&out).unwrap(), &out).unwrap();
    let mut expected = c.tensors.clone();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(tensors, expected);
    assert_eq!(meta, c.metadata);
}

#[test]
fn import_hf_bytes_errors_name_the_shard_and_the_problem() {
    let shard: &Path = "shard-7.safetensors".as_ref();
    let e = import_hf_bytes(&[(shard, b"not safetensors")], None, None).unwrap_err();
    assert!(
        format!("{e:#}").contains("shard-7.safetensors is not a valid safetensors file"),
        "{e:#}"
    );
    let bytes = std::fs::read(fixture("hf_pack.safetensors")).unwrap();
    let e = import_hf_bytes(&[(shard, &bytes)], None, Some(LinearClass::AutoBitLinear)).unwrap_err();
    assert!(format!("{e:#}").contains("not an HF BitNet checkpoint"), "{e:#}");
    let e = import_hf_bytes(&[(shard, &bytes)], Some("{"), None).unwrap_err();
    assert!(format!("{e:#}").contains("config.json is not valid JSON"), "{e:#}");
}

/// Found by the `gguf` fuzz target: a non-ternary tensor named like a packed layer's part was
/// copied, giving a packed file with a "layer" that has no `in_features` (or a name twice).
#[test]
fn imports_reject_copied_tensors_named_like_packed_layers() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    for name in ["fc.weight.packed", "fc.weight.scale", "other.weight.scale"] {
        let mut w = Writer::new();
        w.tensor("fc.weight", vec![256, 1], GgmlType::TQ2_0, tq2_row(&mut rng, 0.5));
        w.tensor(name, vec![1], GgmlType::F32, 1f32.to_le_bytes().to_vec());
        let e = import_gguf_bytes(&w.to_bytes().unwrap()).unwrap_err();
        assert!(
            format!("{e:#}").contains(&format!("tensor {name:?} is not a ternary layer")),
            "{e:#}"
        );
        let hf = raw::RawTensors::from([
            ("fc.weight".to_string(), raw::RawTensor::u8(vec![1, 4], vec![0x01; 4])),
            ("fc.weight_scale".to_string(), raw::RawTensor::f32(vec![1], &[2.0])),
            (name.to_string(), raw::RawTensor::f32(vec![1], &[1.0])),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        raw::write(&path, &hf, Default::default()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let e = import_hf_bytes(&[(path.as_path(), &bytes)], None, None).unwrap_err();
        assert!(
            format!("{e:#}").contains(&format!("tensor {name:?} is not a ternary layer")),
            "{e:#}"
        );
    }
    // Without the stray tensor both import.
    let mut w = Writer::new();
    w.tensor("fc.weight", vec![256, 1], GgmlType::TQ2_0, tq2_row(&mut rng, 0.5));
    assert_eq!(import_gguf_bytes(&w.to_bytes().unwrap()).unwrap().report.layers, 1);
}
