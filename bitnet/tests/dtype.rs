//! The model's float dtype (bf16 against f32 on the fixture) and the dense projections of the
//! full-precision baseline.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bitnet::{BitNetConfig, BitNetLinear, BitNetModel, Projections};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn fixture_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bitnet-lm")
}

fn logits(dtype: DType, ids: &[u32]) -> (Tensor, DType) {
    let m = BitNetModel::load_dir(&fixture_model_dir(), dtype, &Device::Cpu).unwrap();
    assert_eq!(m.dtype(), dtype);
    let ids = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let y = m.forward(&ids, &mut m.new_cache(ids.dim(1).unwrap()).unwrap()).unwrap();
    let dt = y.dtype();
    (y.to_dtype(DType::F32).unwrap(), dt)
}

/// A bf16 model gives bf16 logits close to the f32 model's: bf16 keeps 8 significant bits, so
/// each float step (embedding, norms, RoPE, attention, residual adds, head) rounds at ~2^-9
/// relative; through the fixture's layers that stays within 0.1 of logits of std ~0.7 (int8
/// codes may flip where activations round differently).
#[test]
fn bf16_model_tracks_the_f32_model() {
    let mut rng = StdRng::seed_from_u64(0xbf16);
    let vocab = BitNetConfig::from_file(&fixture_model_dir().join("config.json"))
        .unwrap()
        .vocab_size;
    let ids: Vec<u32> = (0..12).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let (f32_logits, dt32) = logits(DType::F32, &ids);
    let (bf16_logits, dt16) = logits(DType::BF16, &ids);
    assert_eq!((dt32, dt16), (DType::F32, DType::BF16));
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (a, b) = (values(&f32_logits), values(&bf16_logits));
    let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff < 0.1, "bf16 logits differ from f32 by {diff}");
    assert!(diff > 0.0, "bf16 logits identical to f32: the dtype was not applied");
}

/// `Projections::Dense` is a plain float matmul `x · Wᵀ` (no quantization): against an f64
/// reference on random data.
#[test]
fn dense_projection_is_a_plain_matmul() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, k, n) = (3, 37, 11);
    let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let x: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let mut t = HashMap::new();
    t.insert(
        "weight".to_string(),
        Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap(),
    );
    let vb = VarBuilder::from_tensors(t, DType::F32, &Device::Cpu);
    let layer = BitNetLinear::load_as(k, n, Projections::Dense, vb).unwrap();
    assert!(layer.weight().is_none());
    let y = layer
        .forward(&Tensor::from_vec(x.clone(), (1, rows, k), &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(y.dims(), &[1, rows, n]);
    let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for r in 0..rows {
        for j in 0..n {
            let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
            let got = y[r * n + j] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "({r}, {j}): {got} vs {want}"
            );
        }
    }
}

/// A float dtype other than f32/bf16/f16 is an error, not a model.
#[test]
fn integer_float_dtype_is_an_error() {
    let err = match BitNetModel::load_dir(&fixture_model_dir(), DType::U32, &Device::Cpu) {
        Ok(_) => panic!("a U32 model loaded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("f32, bf16 or f16"), "{err}");
}

/// The fixture's tensors, with the embedding (the tied head) rounded to bf16 values and, if
/// `perturb`, one of them moved off bf16 by an f32 ulp.
fn fixture_with_bf16_embedding(perturb: bool) -> BitNetModel {
    let dir = fixture_model_dir();
    let config = BitNetConfig::from_file(&dir.join("config.json")).unwrap();
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = "model.embed_tokens.weight";
    let e = tensors[name]
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let (vocab, hidden) = e.dims2().unwrap();
    let mut values = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    if perturb {
        values[7] = f32::from_bits(values[7].to_bits() + 1);
    }
    tensors.insert(
        name.into(),
        Tensor::from_vec(values, (vocab, hidden), &Device::Cpu).unwrap(),
    );
    BitNetModel::load(config, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap()
}

/// An f32 model on the CPU whose embedding/head values are all bf16 holds the head as bf16 and
/// widens it in its own kernel: the logits match the same model with its head in f32 (one value
/// off bf16 by an f32 ulp, which moves a logit by ~1e-7) within 1e-5 relative (f32 sums in
/// another order).
#[test]
fn bf16_valued_head_is_held_as_bf16_on_the_cpu() {
    let (widened, plain) = (fixture_with_bf16_embedding(false), fixture_with_bf16_embedding(true));
    assert_eq!((widened.head_dtype(), plain.head_dtype()), (DType::BF16, DType::F32));
    let mut rng = StdRng::seed_from_u64(0x1ead);
    let vocab = widened.config().vocab_size;
    let ids: Vec<u32> = (0..9).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let run = |m: &BitNetModel| {
        let y = m.forward(&ids, &mut m.new_cache(9).unwrap()).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b) = (run(&widened), run(&plain));
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= 1e-5 * scale,
        "widened head differs by {diff} (logits up to {scale})"
    );
}
