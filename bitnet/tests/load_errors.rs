//! A model directory that cannot be used gives an error naming the file and what is wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bitnet::{BitNetModel, ConfigError, LoadError};
use candle_core::{Device, Tensor};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bitnet-lm")
}

/// A copy of the fixture directory to break.
fn copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn load(dir: &Path) -> Result<BitNetModel, LoadError> {
    BitNetModel::load_dir(dir, candle_core::DType::F32, &Device::Cpu)
}

fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn save(dir: &Path, t: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(t, dir.join("model.safetensors")).unwrap();
}

#[test]
fn missing_config_and_weights() {
    let dir = copy();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, LoadError::MissingWeights(_)), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, LoadError::Config(ConfigError::Io { .. })), "{e}");
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn bad_json_and_unsupported_activation() {
    let dir = copy();
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, &text[..text.len() / 2]).unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, LoadError::Config(ConfigError::Json { .. })), "{e}");
    std::fs::write(&cfg, text.replace("\"relu2\"", "\"silu\"")).unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, LoadError::Config(ConfigError::Unsupported { .. })), "{e}");
    assert!(e.to_string().contains("silu"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    for name in [
        "model.layers.1.mlp.down_proj.weight_scale",
        "model.layers.0.self_attn.attn_sub_norm.weight",
        "model.norm.weight",
    ] {
        let dir = copy();
        let mut t = tensors(dir.path());
        t.remove(name).unwrap();
        save(dir.path(), &t);
        let e = load(dir.path()).unwrap_err();
        assert!(matches!(e, LoadError::Weights { .. }), "{e}");
        assert!(e.to_string().contains(name), "{name}: {e}");
    }
}

#[test]
fn wrong_shape_and_invalid_codes_are_errors() {
    let name = "model.layers.0.self_attn.k_proj.weight";
    let dir = copy();
    let mut t = tensors(dir.path());
    let w = t[name].clone();
    t.insert(name.into(), w.narrow(0, 0, w.dim(0).unwrap() - 1).unwrap());
    save(dir.path(), &t);
    let e = load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("k_proj"), "{e}");

    // Code 3 (0b11) is not a ternary value.
    let mut bytes = w.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    bytes[5] |= 0b11;
    t.insert(name.into(), Tensor::from_vec(bytes, w.dims(), &Device::Cpu).unwrap());
    save(dir.path(), &t);
    let e = load(dir.path()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("code 3") && msg.contains("k_proj"), "{msg}");
}

/// The untied-head fixture of the interop tests (`lm_head.weight` stored) loads and runs, and
/// its head is its own matrix, not the embedding.
#[test]
fn untied_head_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../convert/tests/fixtures/interop/tiny-bitnet");
    let m = load(&dir).unwrap();
    assert!(!m.config().tie_word_embeddings);
    let ids = Tensor::new(&[[1u32, 5, 7, 9]], &Device::Cpu).unwrap();
    let logits = m.forward(&ids, &mut m.new_cache(4).unwrap()).unwrap();
    assert_eq!(logits.dims(), &[1, 4, 96]);
    let v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}

#[test]
fn sequence_past_capacity_is_an_error() {
    let m = load(&fixture()).unwrap();
    let mut cache = m.new_cache(3).unwrap();
    let ids = Tensor::new(&[[5u32, 6]], &Device::Cpu).unwrap();
    m.forward(&ids, &mut cache).unwrap();
    let e = m.forward(&ids, &mut cache).unwrap_err();
    assert!(e.to_string().contains("capacity 3"), "{e}");
    assert_eq!(cache.len(), 2);
}

#[test]
fn generation_rejects_bad_prompts() {
    use bitnet::generate::{Generation, Sampling};
    let m = load(&fixture()).unwrap();
    let g = Generation::new(&m, Sampling::GREEDY);
    let cases: [(&[u32], usize, &str); 3] = [
        (&[], 4, "no tokens"),
        (&[5, 300], 4, "token 300 is outside the vocabulary of 300"),
        (&[5, 6], 63, "exceed max_position_embeddings 64"),
    ];
    for (prompt, n, needle) in cases {
        let e = g.run(prompt, n, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains(needle), "{prompt:?}: {e}");
    }
    // The longest allowed run fills the context exactly.
    let out = g.run(&[5, 6], 62, |_| Ok(())).unwrap();
    assert_eq!(out.tokens.len(), 62);
}
