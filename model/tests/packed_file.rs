//! The packed file through `PackedBitLinear`'s storage: the same tensors back, dtypes enforced.
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use model::{PackedSimpleBitCnn, SimpleBitCnn, SimpleBitCnnConfig};

fn serialize(tensors: &[(String, Tensor)], meta: std::collections::HashMap<String, String>) -> Vec<u8> {
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta)).unwrap()
}

#[test]
fn packed_bytes_round_trip_and_reject_other_dtypes() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let packed = SimpleBitCnn::new(SimpleBitCnnConfig::bitlinear(), vb)
        .unwrap()
        .to_packed()
        .unwrap();
    let (tensors, meta) = packed.to_packed_tensors(DType::F32).unwrap();
    let mut names: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "conv1.bias",
            "conv1.weight",
            "conv2.bias",
            "conv2.weight",
            "fc1.bias",
            "fc1.norm.weight",
            "fc1.weight.packed",
            "fc1.weight.scale",
            "fc2.bias",
            "fc2.norm.weight",
            "fc2.weight.packed",
            "fc2.weight.scale"
        ]
    );
    let loaded = PackedSimpleBitCnn::from_packed_bytes(&serialize(&tensors, meta.clone()), &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
    let (a, b) = (packed.forward(&x).unwrap(), loaded.forward(&x).unwrap());
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());

    // The same codes stored as floats, or the scale as f64: not this format.
    for (target, dtype, want) in [
        ("fc1.weight.packed", DType::F32, "expected U8"),
        ("fc2.weight.scale", DType::F64, "expected F32"),
    ] {
        let edited: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    if k == target {
                        t.to_dtype(dtype).unwrap()
                    } else {
                        t.clone()
                    },
                )
            })
            .collect();
        let err = PackedSimpleBitCnn::from_packed_bytes(&serialize(&edited, meta.clone()), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains(target) && err.contains(want), "{err}");
    }
}

/// The fuzz seeds of the speed-run network (written by `fuzz/seeds.py`) are valid files: the
/// fuzzer starts from inputs that reach the whole loader and a forward.
#[test]
fn speedrun_fuzz_seeds_load_and_run() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let dev = candle_core::Device::Cpu;
    let x = candle_core::Tensor::zeros((2, 3, 32, 32), candle_core::DType::F32, &dev).unwrap();
    let packed = std::fs::read(seeds.join("packed_file/packed_speedrun_f32")).unwrap();
    let net = model::PackedNetwork::from_packed_bytes(&packed, &dev).unwrap();
    assert_eq!(candle_core::Module::forward(&net, &x).unwrap().dims(), &[2, 10]);
    let ckpt = std::fs::read(seeds.join("checkpoint/ckpt_speedrun")).unwrap();
    let net = model::Network::from_checkpoint_bytes(&ckpt, model::ComputeOptions::default(), &dev).unwrap();
    assert_eq!(net.forward_t(&x, false).unwrap().dims(), &[2, 10]);
}
