//! The byte-level entry points (`Checkpoint::from_bytes`, `inspect_bytes`) behind the path-based
//! readers and the fuzz targets: same results as reading the file, clear errors.
mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use convert::checkpoint::read_checkpoint;
use convert::inspect::{inspect, inspect_bytes};
use model::{Checkpoint, SimpleBitCnnConfig};
use rand::Rng;

fn random(shape: &[usize], rng: &mut impl Rng) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(
        (0..n).map(|_| rng.gen_range(-2f32..2.0)).collect::<Vec<_>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn checkpoint_bytes_read_like_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = SimpleBitCnnConfig::bitlinear();
    let (path, _) = common::checkpoint(dir.path(), config);
    let bytes = std::fs::read(&path).unwrap();
    let vals = |c: Checkpoint| -> HashMap<String, Vec<f32>> {
        c.tensors
            .into_iter()
            .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect()
    };
    let from_bytes = Checkpoint::from_bytes(&bytes).unwrap();
    assert_eq!(from_bytes.config, config);
    assert_eq!(vals(from_bytes), vals(read_checkpoint(&path).unwrap()));
}

#[test]
fn checkpoint_bytes_errors() {
    let msg = |b: &[u8]| format!("{:#}", Checkpoint::from_bytes(b).expect_err("an error"));
    assert!(
        msg(b"garbage").contains("not a valid safetensors file"),
        "{}",
        msg(b"garbage")
    );
    let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let meta = HashMap::from([("format".to_string(), model::packed_file::FORMAT.to_string())]);
    let packed = safetensors::serialize([("a", &t)], Some(meta)).unwrap();
    assert!(msg(&packed).contains("a packed file"), "{}", msg(&packed));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    std::fs::write(&path, &packed).unwrap();
    let err = format!("{:#}", read_checkpoint(&path).expect_err("an error"));
    assert!(
        err.contains(&path.display().to_string()) && err.contains("a packed file"),
        "{err}"
    );
}

#[test]
fn inspect_bytes_lists_like_the_file() {
    let mut rng = rand::thread_rng();
    let (rows, cols) = (rng.gen_range(1..9), rng.gen_range(1..9));
    let codes = Tensor::zeros((rows, cols), DType::U8, &Device::Cpu).unwrap();
    let w = random(&[4], &mut rng);
    let meta = HashMap::from([("format".to_string(), "demo".to_string())]);
    let bytes = safetensors::serialize([("fc.weight.packed", &codes), ("w", &w)], Some(meta)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let text = inspect_bytes(&bytes, &path).unwrap();
    assert_eq!(text, inspect(&path).unwrap());
    assert!(text.contains("format: demo\n"), "{text}");
    let total = rows * cols + 16;
    assert!(
        text.contains(&format!(
            "tensors: {total} bytes in all, {} bytes of packed ternary weights",
            rows * cols
        )),
        "{text}"
    );
    assert!(inspect_bytes(&bytes[..bytes.len() - 1], &path).is_err());
    let err = format!("{:#}", inspect(&dir.path().join("none")).unwrap_err());
    assert!(err.contains("reading"), "{err}");
}
