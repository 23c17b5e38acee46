#![cfg(feature = "cuda")]

//! The fused decode kernels (`DecodeKernels::Fused`, CUDA) against the tensor-op form of the
//! same step (`DecodeKernels::TensorOps`), on the fixture model and on random weights at the
//! head shapes of `microsoft/bitnet-b1.58-2B-4T` with a few hundred cached positions.

use std::collections::HashMap;
use std::path::Path;

use bitnet::{BitNetConfig, BitNetModel, DecodeKernels};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;

fn fixture(dtype: DType, device: &Device) -> BitNetModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bitnet-lm");
    BitNetModel::load_dir(&dir, dtype, device).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Prefills `prompt` tokens of `ids` with the tensor ops into two caches, then decodes the rest
/// token by token with `fused` and `ops` (the same weights); returns the largest logit
/// difference relative to the largest logit, over all steps.
fn compare(fused: &BitNetModel, ops: &BitNetModel, ids: &Tensor, prompt: usize, capacity: usize) -> f32 {
    let (a, b) = (
        decode_logits(fused, ids, prompt, capacity),
        decode_logits(ops, ids, prompt, capacity),
    );
    step_differences(&a, &b).into_iter().fold(0f32, f32::max)
}

fn pair(model: BitNetModel) -> (BitNetModel, BitNetModel) {
    let mut ops = model.clone();
    ops.set_decode_kernels(DecodeKernels::TensorOps);
    (model, ops)
}

/// The fixture model (16-value heads, 2 KV heads of 4 query heads), f32, bf16 and f16: fused
/// and tensor-op steps agree within rounding. In bf16 and f16 a rounding difference can move an
/// int8 activation code by one, which in this 64-wide model moves logits by a few percent.
#[test]
fn fixture_fused_matches_tensor_ops() {
    let device = Device::new_cuda(0).unwrap();
    let ids = Tensor::new(&[[3u32, 17, 250, 9, 42, 0, 199, 5, 77, 31, 8, 120, 64, 2]], &device).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 0.05), (DType::F16, 0.05)] {
        let (fused, ops) = pair(fixture(dtype, &device));
        assert!(fused.decode_fused(20) && !ops.decode_fused(20));
        let worst = compare(&fused, &ops, &ids, 3, 20);
        assert!(worst < tol, "{dtype:?}: relative logit difference {worst}");
    }
}

/// Prefills `prompt` tokens of `ids` into a cache of `capacity`, then decodes the rest token by
/// token with `decode_at`; the logits of every decoded step (in the model's dtype) as f32.
fn decode_logits(model: &BitNetModel, ids: &Tensor, prompt: usize, capacity: usize) -> Vec<Vec<f32>> {
    let device = model.device().clone();
    let mut cache = model.new_cache(capacity).unwrap();
    model.forward(&ids.i((.., ..prompt)).unwrap(), &mut cache).unwrap();
    (prompt..ids.dim(1).unwrap())
        .map(|i| {
            let id = ids.i((.., i..i + 1)).unwrap();
            let pos = Tensor::new(&[i as u32], &device).unwrap();
            let logits = model.decode_at(&id, &pos, &mut cache).unwrap();
            assert_eq!(logits.dtype(), model.dtype(), "position {i}");
            values(&logits)
        })
        .collect()
}

/// The largest logit difference of `a` from `b` relative to `b`'s largest logit, per step.
fn step_differences(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<f32> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (a, b))| {
            assert_eq!(a.len(), b.len(), "step {i}: logits of different shapes");
            let (d, m) = a
                .iter()
                .zip(b)
                .fold((0f32, 0f32), |(d, m), (x, y)| (d.max((x - y).abs()), m.max(y.abs())));
            assert!(d.is_finite(), "step {i}: non-finite logits");
            d / m.max(1e-6)
        })
        .collect()
}

/// Random weights with 2B4T's heads and widths (20 query heads, 5 KV heads, 128 values a head;
/// the norm kernels on 1024 threads), two layers, random norm gains, 300 positions prefilled and
/// 12 decoded, in a 384-position cache. In f32 the fused step matches the tensor-op step; in
/// bf16 both are compared with the f32 tensor-op model of the same weights, and the fused step
/// must track it about as well as the bf16 tensor ops do. (Both bf16 paths sit 0.2-0.9 of the
/// largest logit away from the f32 model on these random weights, and as far from each other:
/// this model is that sensitive to bf16 rounding, on the CPU's tensor ops too, about 0.05 after
/// one layer and 0.3 after two; the fixture's bf16 steps agree within 0.05.)
#[test]
fn real_heads_fused_matches_tensor_ops() {
    let device = Device::new_cuda(0).unwrap();
    let cfg = BitNetConfig::from_json(
        r#"{"hidden_act":"relu2","hidden_size":2560,"intermediate_size":6912,
        "max_position_embeddings":4096,"num_attention_heads":20,"num_hidden_layers":2,
        "num_key_value_heads":5,"rms_norm_eps":1e-05,"rope_theta":500000.0,
        "tie_word_embeddings":true,"vocab_size":512}"#,
        Path::new("2b4t-heads.json"),
    )
    .unwrap();
    let ids = Tensor::rand(0f32, 511.0, (1, 312), &device)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let tensors = random_tensors(&cfg, &device);
    let run = |dtype: DType| {
        let (fused, ops) =
            pair(BitNetModel::load(cfg.clone(), VarBuilder::from_tensors(tensors.clone(), dtype, &device)).unwrap());
        assert!(fused.decode_fused(384));
        (
            decode_logits(&fused, &ids, 300, 384),
            decode_logits(&ops, &ids, 300, 384),
        )
    };
    let (fused32, ops32) = run(DType::F32);
    let worst = step_differences(&fused32, &ops32).into_iter().fold(0f32, f32::max);
    assert!(worst < 1e-3, "f32: relative logit difference {worst}");
    let (fused16, ops16) = run(DType::BF16);
    let (fused_err, ops_err) = (step_differences(&fused16, &ops32), step_differences(&ops16, &ops32));
    eprintln!("f32 fused against f32 ops: {worst}\nbf16 fused against f32 ops, per step: {fused_err:?}\nbf16 ops against f32 ops: {ops_err:?}");
    let (f, o) = (
        fused_err.iter().fold(0f32, |m, &x| m.max(x)),
        ops_err.iter().fold(0f32, |m, &x| m.max(x)),
    );
    assert!(
        f <= 2.0 * o + 0.01,
        "bf16: the fused step is {f} from the f32 model, the tensor ops {o}"
    );
}

/// Turned off, or over a cache too long for the kernel's shared memory, the tensor ops run.
#[test]
fn fused_only_where_it_applies() {
    let device = Device::new_cuda(0).unwrap();
    let mut m = fixture(DType::F32, &device);
    assert!(m.decode_fused(64));
    assert!(!m.decode_fused(20_000));
    m.set_decode_kernels(DecodeKernels::TensorOps);
    assert!(!m.decode_fused(64));
    assert!(!fixture(DType::F32, &Device::Cpu).decode_fused(64));
}

/// Random f32 weights of a model: packed projections (every code valid, scale 1 / sqrt(in)),
/// embeddings and norm gains from normal distributions, rounded to bf16 values (so that f32 and
/// bf16 models of them hold the same weights).
fn random_tensors(cfg: &BitNetConfig, device: &Device) -> HashMap<String, Tensor> {
    let (h, inner) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.kv_heads() * cfg.head_dim();
    let mut t = HashMap::new();
    let randn = |n: usize, mean: f32, std: f32| Tensor::randn(mean, std, n, device).unwrap();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        Tensor::randn(0f32, 1.0, (cfg.vocab_size, h), device).unwrap(),
    );
    t.insert("model.norm.weight".to_string(), randn(h, 1.0, 0.2));
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, n, k) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", inner, h),
            ("mlp.up_proj", inner, h),
            ("mlp.down_proj", h, inner),
        ] {
            // Four random codes (0, 1, 2) a byte.
            let codes = Tensor::rand(0f32, 3.0, (n.div_ceil(4), k, 4), device)
                .unwrap()
                .floor()
                .unwrap()
                .clamp(0f32, 2f32)
                .unwrap();
            let weights = Tensor::new(&[1f32, 4.0, 16.0, 64.0], device).unwrap();
            let bytes = codes.broadcast_mul(&weights).unwrap().sum(2).unwrap();
            t.insert(format!("{p}.{name}.weight"), bytes.to_dtype(DType::U8).unwrap());
            // Outputs of about unit size, so that attention stays soft: with larger ones a
            // bf16 rounding flips which key dominates and the comparison measures chaos.
            t.insert(
                format!("{p}.{name}.weight_scale"),
                Tensor::new(&[1.0 / (k as f32).sqrt()], device).unwrap(),
            );
        }
        for (name, n) in [
            ("input_layernorm", h),
            ("post_attention_layernorm", h),
            ("self_attn.attn_sub_norm", h),
            ("mlp.ffn_sub_norm", inner),
        ] {
            t.insert(format!("{p}.{name}.weight"), randn(n, 1.0, 0.2));
        }
    }
    t.into_iter()
        .map(|(name, w)| {
            let w = match w.dtype() {
                DType::F32 => w.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap(),
                _ => w,
            };
            (name, w)
        })
        .collect()
}

/// The device argmax (`greedy_token` where the fused kernels run) picks what the host's greedy
/// sampler picks: random logits with a planted tie for the maximum after NaNs and -inf, in f32,
/// bf16 and f16, at sizes from one value to a vocabulary that spans every block; every value NaN
/// gives `u32::MAX`, every value -inf the first index.
#[test]
fn greedy_token_matches_host() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let device = Device::new_cuda(0).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (fused, host) = pair(fixture(dtype, &device));
        let cache = fused.new_cache(8).unwrap();
        assert!(fused.decode_fused(8));
        for n in [1usize, 2, 31, 1000, 65_537, 128_256] {
            let mut v: Vec<f32> = (0..n).map(|_| rng.gen_range(-8.0f32..8.0)).collect();
            let first = rng.gen_range(0..n);
            let second = rng.gen_range(first..n);
            v[first] = 100.0;
            v[second] = 100.0;
            for _ in 0..n.min(5) {
                let i = rng.gen_range(0..n);
                if i != first && i != second {
                    v[i] = if rng.gen_bool(0.5) { f32::NAN } else { f32::NEG_INFINITY };
                }
            }
            let logits = Tensor::from_vec(v, (1, n), &device).unwrap().to_dtype(dtype).unwrap();
            let got = fused.greedy_token(&logits, &cache).unwrap().to_vec1::<u32>().unwrap();
            let want = host.greedy_token(&logits, &cache).unwrap().to_vec1::<u32>().unwrap();
            assert_eq!(got, want, "{dtype:?}, {n} logits");
            assert_eq!(got, [first as u32], "{dtype:?}, {n} logits: the first of the tie");
        }
        for (value, want) in [(f32::NAN, u32::MAX), (f32::NEG_INFINITY, 0)] {
            let logits = Tensor::from_vec(vec![value; 5000], (1, 5000), &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let got = fused.greedy_token(&logits, &cache).unwrap().to_vec1::<u32>().unwrap();
            assert_eq!(got, [want], "{dtype:?}, every logit {value}");
        }
    }
}

/// Greedy generation through a CUDA graph of the fused step (steps fed their tokens on the device,
/// run back to back) gives the tokens of the same steps run eagerly with the logits read to the
/// host and the first maximum taken there, and so does `decode_greedy_at` step by step: the
/// fixture in f32 and bf16, 40 tokens. With a stop token the graph's tokens end at its first
/// appearance (the step queued past it is dropped).
#[test]
fn greedy_graph_generation_matches_eager_steps() {
    use bitnet::generate::{DecodeMode, Generation, Sampling};
    let device = Device::new_cuda_with_stream(0).unwrap();
    let prompt = [3u32, 17, 250, 9];
    let graph_run = |model: &BitNetModel| {
        Generation::new(model, Sampling::GREEDY)
            .decode_mode(DecodeMode::CudaGraph)
            .run(&prompt, 40, |_| Ok(()))
    };
    // Refused, before anything runs, while cudarc records an event per allocation.
    let err = graph_run(&fixture(DType::F32, &device)).unwrap_err();
    assert!(err.to_string().contains("event tracking"), "{err}");
    // SAFETY: this device's one stream runs all of this test's work.
    unsafe { device.as_cuda_device().unwrap().disable_event_tracking() };
    let first_max = |t: &Tensor| {
        let v = values(t);
        let mut best = 0;
        for (i, &x) in v.iter().enumerate() {
            if x > v[best] {
                best = i;
            }
        }
        best as u32
    };
    for dtype in [DType::F32, DType::BF16] {
        let model = fixture(dtype, &device);
        let graph = graph_run(&model).unwrap().tokens;
        let mut cache = model.new_cache(prompt.len() + 40).unwrap();
        let ids = Tensor::new(&prompt[..], &device).unwrap().unsqueeze(0).unwrap();
        let mut eager = vec![first_max(&model.forward_last(&ids, &mut cache).unwrap())];
        for i in 0..39 {
            let id = Tensor::new(&[[eager[i]]], &device).unwrap();
            let pos = Tensor::new(&[(prompt.len() + i) as u32], &device).unwrap();
            eager.push(first_max(&model.decode_at(&id, &pos, &mut cache).unwrap()));
        }
        assert_eq!(graph, eager, "{dtype:?}: graph greedy tokens against eager steps");
        let mut cache = model.new_cache(prompt.len() + 40).unwrap();
        model.forward_last(&ids, &mut cache).unwrap();
        for i in 0..39 {
            let id = Tensor::new(&[[eager[i]]], &device).unwrap();
            let pos = Tensor::new(&[(prompt.len() + i) as u32], &device).unwrap();
            let token = model.decode_greedy_at(&id, &pos, &mut cache).unwrap();
            assert_eq!(
                token.to_vec1::<u32>().unwrap(),
                [eager[i + 1]],
                "{dtype:?}: decode_greedy_at step {i}"
            );
        }
        let stop = eager[9];
        let until = eager.iter().position(|&t| t == stop).unwrap();
        let stopped = Generation::new(&model, Sampling::GREEDY)
            .decode_mode(DecodeMode::CudaGraph)
            .stop_at(vec![stop])
            .run(&prompt, 40, |_| Ok(()))
            .unwrap()
            .tokens;
        assert_eq!(stopped, eager[..=until], "{dtype:?}: stopped at token {stop}");
    }
}
