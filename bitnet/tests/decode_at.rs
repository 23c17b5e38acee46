//! `decode_at`, the decode step whose shapes do not depend on the position (for CUDA graphs),
//! against `forward_last`.

use std::path::{Path, PathBuf};

use bitnet::BitNetModel;
use candle_core::{DType, Device, IndexOp, Tensor};

fn fixture_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bitnet-lm")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let values = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (values(a), values(b));
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// `decode_at` (position on the device, attention over the whole cache with the later positions
/// masked) gives the logits of `forward_last` (attention over the filled part only), in f32 and
/// bf16: the masked entries are exactly zero after the softmax, only summation order differs.
#[test]
fn decode_at_matches_forward_last() {
    let ids = Tensor::new(&[[3u32, 17, 250, 9, 42, 0, 199, 5]], &Device::Cpu).unwrap();
    let n = ids.dim(1).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let m = BitNetModel::load_dir(&fixture_model_dir(), dtype, &Device::Cpu).unwrap();
        // Capacity beyond the prompt, so that masked, never written positions are attended too.
        let (mut a, mut b) = (m.new_cache(n + 5).unwrap(), m.new_cache(n + 5).unwrap());
        m.forward(&ids.i((.., ..3)).unwrap(), &mut a).unwrap();
        m.forward(&ids.i((.., ..3)).unwrap(), &mut b).unwrap();
        for i in 3..n {
            let id = ids.i((.., i..i + 1)).unwrap();
            let want = m.forward_last(&id, &mut a).unwrap();
            let pos = Tensor::new(&[i as u32], &Device::Cpu).unwrap();
            let got = m.decode_at(&id, &pos, &mut b).unwrap();
            assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
            let d = max_abs_diff(&got, &want);
            let tol = if dtype == DType::F32 { 1e-5 } else { 0.02 };
            assert!(d < tol, "{dtype:?} position {i}: decode_at differs by {d}");
        }
    }
}

/// A multi-token input is an error, not a panic.
#[test]
fn decode_at_takes_one_token() {
    let m = BitNetModel::load_dir(&fixture_model_dir(), DType::F32, &Device::Cpu).unwrap();
    let mut cache = m.new_cache(8).unwrap();
    let two = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    let pos = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    assert!(m.decode_at(&two, &pos, &mut cache).is_err());
}

/// CUDA graph decoding off CUDA is refused before anything runs.
#[test]
fn cuda_graph_decoding_needs_a_cuda_device() {
    use bitnet::generate::{DecodeMode, Generation, Sampling};
    let m = BitNetModel::load_dir(&fixture_model_dir(), DType::F32, &Device::Cpu).unwrap();
    let mut seen = 0;
    let g = Generation::new(&m, Sampling::GREEDY).decode_mode(DecodeMode::CudaGraph);
    let err = g
        .run(&[3, 17], 4, |_| {
            seen += 1;
            Ok(())
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("CUDA graph decoding needs a CUDA device"),
        "{err}"
    );
    assert_eq!(seen, 0, "no token before the error");
    // The default is eager.
    assert!(Generation::new(&m, Sampling::GREEDY)
        .run(&[3, 17], 2, |_| Ok(()))
        .is_ok());
}

/// `decode_greedy_at` on the CPU (tensor ops, the greedy choice on the host) is the first maximum
/// of `decode_at`'s logits at every step, and advances the cache the same way.
#[test]
fn decode_greedy_at_is_the_first_maximum_of_decode_at() {
    let m = BitNetModel::load_dir(&fixture_model_dir(), DType::F32, &Device::Cpu).unwrap();
    let (mut a, mut b) = (m.new_cache(12).unwrap(), m.new_cache(12).unwrap());
    let prompt = Tensor::new(&[[3u32, 17, 250]], &Device::Cpu).unwrap();
    m.forward(&prompt, &mut a).unwrap();
    m.forward(&prompt, &mut b).unwrap();
    let mut token = 9u32;
    for i in 3..10 {
        let id = Tensor::new(&[[token]], &Device::Cpu).unwrap();
        let pos = Tensor::new(&[i as u32], &Device::Cpu).unwrap();
        let logits: Vec<f32> = m
            .decode_at(&id, &pos, &mut a)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut best = 0;
        for (j, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = j;
            }
        }
        let got = m.decode_greedy_at(&id, &pos, &mut b).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(got, [best as u32], "position {i}");
        token = best as u32;
    }
}
