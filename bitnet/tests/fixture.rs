//! The tiny random BitNetForCausalLM of `fixtures/make_fixture.py` against transformers' own
//! outputs on it.

use std::path::{Path, PathBuf};

use bitnet::generate::{Generation, Sampling};
use bitnet::BitNetModel;
use candle_core::{Device, IndexOp, Tensor};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Expected {
    prompt: Vec<u32>,
    logits: Tensor,
    logits_quant_divide: Tensor,
    greedy: Vec<u32>,
}

fn expected() -> Expected {
    let t = candle_core::safetensors::load(fixture_dir().join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = |name: &str| {
        t[name]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect()
    };
    Expected {
        prompt: ids("prompt_ids"),
        logits: t["logits"].clone(),
        logits_quant_divide: t["logits_quant_divide"].clone(),
        greedy: ids("greedy_ids"),
    }
}

fn model() -> BitNetModel {
    BitNetModel::load_dir(
        &fixture_dir().join("tiny-bitnet-lm"),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Our logits at every prompt position against transformers' (f32 on both sides).
///
/// The integer products are the same; the float steps (RMSNorm, RoPE tables, attention, softmax,
/// the f32 head GEMM, the scale epilogue) differ from torch's only in rounding order, a few ulp
/// per step. One difference is systematic: transformers quantizes activations as
/// `round(x · (127 / max|x|))`, `bitlinear` as `round(x / (max|x| / 127))`, one f32 rounding
/// apart, so a code flips by one where the scaled value lies within an ulp of a half; on this
/// fixture that moves the logits by up to 1.47e-3 (make_fixture.py prints it; tokens unchanged).
///
/// Hence two checks: against transformers run with our quantizer rounding
/// (`logits_quant_divide`), 1e-5 absolute (measured 1.04e-6), float rounding order only (logit std ~0.73); against
/// plain transformers, 5e-3 absolute, a few code flips' worth.
#[test]
fn logits_match_transformers() {
    let e = expected();
    let m = model();
    let ids = Tensor::new(e.prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = m.new_cache(e.prompt.len()).unwrap();
    let ours = m.forward(&ids, &mut cache).unwrap().squeeze(0).unwrap();
    assert_eq!(ours.dims(), e.logits.dims());
    let same_rounding = max_abs_diff(&ours, &e.logits_quant_divide);
    let plain = max_abs_diff(&ours, &e.logits);
    println!("max |ours - transformers|: {same_rounding:e} (same quantizer rounding), {plain:e} (plain)");
    assert!(
        same_rounding < 1e-5,
        "same rounding: max abs logit difference {same_rounding}"
    );
    assert!(plain < 5e-3, "plain transformers: max abs logit difference {plain}");
    // Every position predicts the same token.
    assert_eq!(
        ours.argmax(1).unwrap().to_vec1::<u32>().unwrap(),
        e.logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()
    );
}

/// Greedy generation gives transformers' tokens exactly.
#[test]
fn greedy_generation_matches_transformers() {
    let e = expected();
    let m = model();
    let mut streamed = Vec::new();
    let out = Generation::new(&m, Sampling::GREEDY)
        .run(&e.prompt, e.greedy.len(), |t| {
            streamed.push(t);
            Ok(())
        })
        .unwrap();
    assert_eq!(out.tokens, e.greedy);
    assert_eq!(streamed, e.greedy);
}

/// Prefill of part of the sequence then one-token decode steps through the KV cache give the
/// logits of one full forward at every position: within 1e-5 except where a float rounding
/// difference between the two attention shapes flips an activation code (see
/// `logits_match_transformers`), bounded by 5e-3; such positions must stay rare (a wrong cache
/// or position moves every later logit by ~0.1 or more).
#[test]
fn kv_cache_decode_matches_full_forward() {
    let e = expected();
    let m = model();
    let seq: Vec<u32> = e.prompt.iter().chain(&e.greedy).copied().collect();
    let all = Tensor::new(seq.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let full = m
        .forward(&all, &mut m.new_cache(seq.len()).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    for split in [1, 7, e.prompt.len()] {
        let mut cache = m.new_cache(seq.len()).unwrap();
        let head = m
            .forward(&all.narrow(1, 0, split).unwrap(), &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut diffs: Vec<f32> = (0..split)
            .map(|pos| max_abs_diff(&head.i(pos).unwrap(), &full.i(pos).unwrap()))
            .collect();
        for pos in split..seq.len() {
            let step = m
                .forward_last(&all.narrow(1, pos, 1).unwrap(), &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap();
            diffs.push(max_abs_diff(&step, &full.i(pos).unwrap()));
        }
        let flipped = diffs.iter().filter(|&&d| d >= 1e-5).count();
        println!("split {split}: {flipped} of {} positions beyond 1e-5", diffs.len());
        assert!(diffs.iter().all(|&d| d < 5e-3), "split {split}: {diffs:?}");
        assert!(flipped * 10 <= diffs.len(), "split {split}: {diffs:?}");
        assert_eq!(cache.len(), seq.len());
    }
}
