use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::files::{config_json, parse_config};
use super::*;
use crate::{Network, NetworkConfig, PackedNetwork};

const SMALL: [usize; 4] = [4, 8, 8, 16];

fn small(stem: StemKind) -> TernarySpeedrunConfig {
    TernarySpeedrunConfig {
        widths: SMALL,
        stem,
        channel_codes: false,
    }
}

/// Every stem kind with the tensor's codes, and the ternary stem with per-channel block codes.
fn small_configs() -> [TernarySpeedrunConfig; 3] {
    [
        small(StemKind::Ternary),
        small(StemKind::Float),
        TernarySpeedrunConfig {
            channel_codes: true,
            ..small(StemKind::Ternary)
        },
    ]
}

/// Pseudo-random images in [-2, 2) from `seed` (xorshift64*).
fn images(b: usize, seed: u64) -> Result<Tensor> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..b * 3 * 32 * 32)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            4.0 * u - 2.0
        })
        .collect();
    Tensor::from_vec(v, (b, 3, 32, 32), &Device::Cpu)
}

/// A network trained for a few SGD steps, so that the weights moved and the running statistics
/// differ from their initial values.
fn trained(config: TernarySpeedrunConfig) -> Result<(VarMap, TernarySpeedrun)> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let net = TernarySpeedrun::new(config, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let labels = Tensor::new(&[1u32, 7, 3, 0, 9, 2], &dev)?;
    let vars = vm.all_vars();
    for step in 0..3 {
        let logits = net.forward_t(&images(6, step)?, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let grads = loss.backward()?;
        for v in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                v.set(&(v.as_tensor() - (g * 0.05)?)?)?;
            }
        }
    }
    Ok((vm, net))
}

fn named(vm: &VarMap) -> HashMap<String, Tensor> {
    let data = vm.data().lock().unwrap();
    data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
}

#[test]
fn shapes_gradients_and_variables() -> Result<()> {
    let (vm, net) = trained(small(StemKind::Ternary))?;
    let y = net.forward_t(&images(5, 11)?, true)?;
    assert_eq!(y.dims(), &[5, 10]);
    // Exactly the documented variables.
    let mut names: Vec<String> = named(&vm).into_keys().collect();
    names.sort();
    let mut want: Vec<String> = speedrun_checkpoint_specs(small(StemKind::Ternary))
        .into_iter()
        .map(|s| s.name)
        .collect();
    want.sort();
    assert_eq!(names, want);
    // Every learned variable gets a gradient; the running statistics none.
    let grads = y.sum_all()?.backward()?;
    let data = vm.data().lock().unwrap();
    for (name, v) in data.iter() {
        let has = grads.get(v.as_tensor()).is_some();
        assert_eq!(has, !name.contains("running_"), "{name}: gradient {has}");
    }
    drop(data);
    // The running statistics moved.
    let rm = named(&vm)["block2.norm1.running_mean"]
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    assert!(rm > 0.0);
    // Bad inputs are errors.
    assert!(net
        .forward_t(&Tensor::zeros((2, 3, 31, 32), DType::F32, &Device::Cpu)?, false)
        .is_err());
    assert!(net
        .forward_t(&Tensor::zeros((2, 3, 32, 32), DType::U8, &Device::Cpu)?, false)
        .is_err());
    Ok(())
}

#[test]
fn packed_form_equals_training_form_exactly() -> Result<()> {
    for config in small_configs() {
        let (_, net) = trained(config)?;
        let x = images(7, 21)?;
        let a: Vec<Vec<f32>> = net.forward(&x)?.to_vec2()?;
        let packed = net.to_packed()?;
        let b: Vec<Vec<f32>> = packed.forward(&x)?.to_vec2()?;
        assert_eq!(a, b, "{config:?}: inference logits differ");
        // Training mode normalizes with the batch statistics: other logits.
        let t: Vec<Vec<f32>> = net.forward_t(&x, true)?.to_vec2()?;
        assert_ne!(a, t);
    }
    Ok(())
}

#[test]
fn fused_norm_gelu_option_changes_values_only_by_rounding() -> Result<()> {
    let (vm, fused) = trained(small(StemKind::Ternary))?;
    let options = ComputeOptions {
        fused_norm_gelu: false,
        ..fused.options()
    };
    // The same variables: the running statistics both forwards update start equal.
    let plain = TernarySpeedrun::with_options(
        small(StemKind::Ternary),
        options,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    let x = images(6, 5)?;
    for train in [false, true] {
        let a = fused.forward_t(&x, train)?;
        let b = plain.forward_t(&x, train)?;
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        let per_image: Vec<f32> = (&a - &b)?.abs()?.max(1)?.to_vec1()?;
        // Only the float rounding of the statistics differs (the fused op sums in f64; the op
        // itself is compared with an f64 reference in batch_norm.rs), but an int8 or ternary
        // code downstream may flip where a value sits on a rounding boundary, and in training
        // mode the batch statistics carry that to every image: a code's worth, a few percent
        // of the logits at most (seen: up to 1.4%).
        assert!(
            per_image.iter().all(|&d| d <= 0.05 * scale),
            "train {train}: per-image max diffs {per_image:?} (scale {scale})"
        );
    }
    Ok(())
}

#[test]
fn packed_file_round_trip() -> Result<()> {
    let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
    for (i, config) in small_configs().into_iter().enumerate() {
        let (_, net) = trained(config)?;
        let x = images(4, 5)?;
        let want: Vec<Vec<f32>> = net.forward(&x)?.to_vec2()?;
        let path = dir.path().join(format!("{i}.safetensors"));
        net.to_packed()?.save(&path, DType::F32)?;
        let loaded = PackedNetwork::load(&path, &Device::Cpu)?;
        assert_eq!(loaded.config(), NetworkConfig::TernarySpeedrun(config));
        let got: Vec<Vec<f32>> = loaded.forward(&x)?.to_vec2()?;
        assert_eq!(got, want, "{config:?}");
        // bf16 storage rounds only the float tensors.
        let bf = dir.path().join("bf16.safetensors");
        net.to_packed()?.save(&bf, DType::BF16)?;
        let got: Vec<Vec<f32>> = PackedNetwork::load(&bf, &Device::Cpu)?.forward(&x)?.to_vec2()?;
        assert_eq!(got.len(), want.len());
        assert!(got.iter().flatten().all(|v| v.is_finite()));
    }
    Ok(())
}

#[test]
fn packed_file_rejects_what_it_does_not_describe() -> Result<()> {
    let (_, net) = trained(small(StemKind::Ternary))?;
    let (tensors, meta) = net.to_packed()?.to_packed_tensors(DType::F32)?;
    let bytes = |tensors: &[(String, Tensor)], meta: &HashMap<String, String>| {
        safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta.clone())).unwrap()
    };
    let dev = Device::Cpu;
    assert!(PackedNetwork::from_packed_bytes(&bytes(&tensors, &meta), &dev).is_ok());
    // A missing tensor.
    let fewer: Vec<_> = tensors
        .iter()
        .filter(|(k, _)| k != "block2.norm2.running_var")
        .cloned()
        .collect();
    let err = PackedNetwork::from_packed_bytes(&bytes(&fewer, &meta), &dev).unwrap_err();
    assert!(err.to_string().contains("block2.norm2.running_var"), "{err}");
    // Widths that do not match the tensors.
    let mut m = meta.clone();
    m.insert(
        "model_config".into(),
        config_json(TernarySpeedrunConfig {
            widths: [4, 8, 8, 32],
            ..small(StemKind::Ternary)
        }),
    );
    assert!(PackedNetwork::from_packed_bytes(&bytes(&tensors, &m), &dev).is_err());
    // A wrong in_features record, an unknown model.
    let mut m = meta.clone();
    m.insert("block1.conv1.in_features".into(), "37".into());
    assert!(PackedNetwork::from_packed_bytes(&bytes(&tensors, &m), &dev).is_err());
    let mut m = meta.clone();
    m.insert("model".into(), "ResNet".into());
    let err = PackedNetwork::from_packed_bytes(&bytes(&tensors, &m), &dev).unwrap_err();
    assert!(err.to_string().contains("ResNet"), "{err}");
    // A NaN in a batch norm.
    let nan: Vec<_> = tensors
        .iter()
        .map(|(k, t)| match k.as_str() {
            "block1.norm1.bias" => (k.clone(), (t * f64::NAN).unwrap()),
            _ => (k.clone(), t.clone()),
        })
        .collect();
    assert!(PackedNetwork::from_packed_bytes(&bytes(&nan, &meta), &dev).is_err());
    Ok(())
}

#[test]
fn checkpoint_round_trip() -> Result<()> {
    let (vm, net) = trained(small(StemKind::Ternary))?;
    let tensors = named(&vm);
    let bytes = safetensors::serialize(tensors.iter(), Some(net.checkpoint_metadata())).unwrap();
    let loaded = Network::from_checkpoint_bytes(&bytes, ComputeOptions::default(), &Device::Cpu)?;
    assert_eq!(
        loaded.config(),
        NetworkConfig::TernarySpeedrun(small(StemKind::Ternary))
    );
    let x = images(3, 8)?;
    let a: Vec<Vec<f32>> = net.forward(&x)?.to_vec2()?;
    let b: Vec<Vec<f32>> = loaded.forward(&x)?.to_vec2()?;
    assert_eq!(a, b);
    // A checkpoint missing a variable is an error.
    let fewer: HashMap<_, _> = tensors.into_iter().filter(|(k, _)| k != "head.norm.weight").collect();
    let bytes = safetensors::serialize(fewer.iter(), Some(net.checkpoint_metadata())).unwrap();
    assert!(Network::from_checkpoint_bytes(&bytes, ComputeOptions::default(), &Device::Cpu).is_err());
    Ok(())
}

#[test]
fn config_json_round_trip_and_errors() {
    for c in small_configs() {
        let c = TernarySpeedrunConfig {
            widths: [3, 5, 7, 11],
            ..c
        };
        assert_eq!(parse_config(&config_json(c)).unwrap(), c);
    }
    // Files written before `block_codes` round with the tensor's absmean.
    let old = parse_config(r#"{"widths":[1,2,3,4],"stem":"ternary","act_scaling":"per-image"}"#).unwrap();
    assert!(!old.channel_codes);
    for bad in [
        r#"{"widths":[1,2,3,4],"stem":"ternary","act_scaling":"per-image","block_codes":"per-row"}"#,
        r#"{"widths":[1,2,3],"stem":"ternary","act_scaling":"per-image"}"#,
        r#"{"widths":[1,2,3,0],"stem":"ternary","act_scaling":"per-image"}"#,
        r#"{"widths":[1,2,x,4],"stem":"ternary","act_scaling":"per-image"}"#,
        r#"{"widths":[1,2,3,4],"stem":"binary","act_scaling":"per-image"}"#,
        r#"{"widths":[1,2,3,4],"stem":"ternary","act_scaling":"per-token"}"#,
        r#"{"stem":"ternary"}"#,
    ] {
        assert!(parse_config(bad).is_err(), "{bad}");
    }
}

#[test]
fn global_max_pool_takes_the_maximum_and_its_gradient() -> Result<()> {
    use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
    // Against a plain maximum over each map (and its gradient, 1 at the first maximum of a
    // map with distinct values), on even, odd and unit sides, with both pool kernels.
    let dev = Device::Cpu;
    let mut seed = 7u64;
    for (h, w) in [(4, 4), (6, 6), (5, 5), (4, 6), (1, 1), (2, 3)] {
        for pool in [PoolKernel::Fused, PoolKernel::TensorOps] {
            seed += 1;
            let (b, c) = (2, 3);
            // distinct values: a permutation of 0..n scaled, so every map has one maximum
            let n = b * c * h * w;
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut StdRng::seed_from_u64(seed));
            let values: Vec<f32> = order.iter().map(|&v| v as f32 * 0.5 - 7.0).collect();
            let x = candle_core::Var::from_vec(values.clone(), (b, c, h, w), &dev)?;
            let y = global_max_pool(x.as_tensor(), pool)?;
            assert_eq!(y.dims(), &[b, c]);
            let got: Vec<f32> = y.flatten_all()?.to_vec1()?;
            let grad: Vec<f32> = y
                .sum_all()?
                .backward()?
                .get(&x)
                .expect("grad")
                .flatten_all()?
                .to_vec1()?;
            for (m, map) in values.chunks(h * w).enumerate() {
                let (arg, &max) = map.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("a map");
                assert_eq!(got[m], max, "{h}x{w} {pool:?} map {m}");
                for (i, &g) in grad[m * h * w..(m + 1) * h * w].iter().enumerate() {
                    assert_eq!(g, if i == arg { 1.0 } else { 0.0 }, "{h}x{w} {pool:?} map {m} grad {i}");
                }
            }
        }
    }
    Ok(())
}

/// The running statistics of every batch norm, as values (a `Var`'s tensor aliases its storage).
fn running_stats(vm: &VarMap) -> Result<Vec<(String, Vec<f32>)>> {
    let mut v: Vec<(String, Vec<f32>)> = named(vm)
        .into_iter()
        .filter(|(k, _)| k.contains("running_"))
        .map(|(k, t)| Ok((k, t.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

#[test]
fn recomputed_statistics_are_the_mean_over_the_batches() -> Result<()> {
    let (vm, mut net) = trained(small(StemKind::Ternary))?;
    let learned = |vm: &VarMap| -> Result<Vec<(String, Vec<f32>)>> {
        let mut v: Vec<_> = named(vm)
            .into_iter()
            .filter(|(k, _)| !k.contains("running_"))
            .map(|(k, t)| Ok((k, t.flatten_all()?.to_vec1::<f32>()?)))
            .collect::<Result<_>>()?;
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    };
    let weights = learned(&vm)?;
    let before = running_stats(&vm)?;
    let (a, b) = (images(8, 100)?, images(8, 101)?);

    // No batch: nothing changes.
    assert_eq!(net.recompute_batch_norm_statistics(Vec::new())?, 0);
    assert_eq!(running_stats(&vm)?, before);

    assert_eq!(net.recompute_batch_norm_statistics([Ok(a.clone())])?, 1);
    let only_a = running_stats(&vm)?;
    assert_ne!(only_a, before);
    // Batch A's statistics at the first batch norm, in f64 from its input: the mean and the
    // unbiased variance of each channel over the batch and the positions.
    let x1 = net.stem_forward(&a, true)?;
    let z = net.blocks[0].conv1.forward_pooled(&x1, net.options.pool)?;
    let (n, c, h, w) = z.dims4()?;
    let z: Vec<f32> = z.flatten_all()?.to_vec1()?;
    let mean_of = |name: &str| only_a.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
    let (rm, rv) = (
        mean_of("block1.norm1.running_mean"),
        mean_of("block1.norm1.running_var"),
    );
    for ch in 0..c {
        let vals: Vec<f64> = (0..n)
            .flat_map(|i| (0..h * w).map(move |p| (i * c + ch) * h * w + p))
            .map(|i| z[i] as f64)
            .collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (vals.len() - 1) as f64;
        assert!(
            (rm[ch] as f64 - m).abs() <= 1e-5 * (1.0 + m.abs()),
            "channel {ch}: mean {} vs {m}",
            rm[ch]
        );
        assert!(
            (rv[ch] as f64 - var).abs() <= 1e-4 * var,
            "channel {ch}: var {} vs {var}",
            rv[ch]
        );
    }

    net.recompute_batch_norm_statistics([Ok(b.clone())])?;
    let only_b = running_stats(&vm)?;
    // Both batches: each statistic the mean of the two (the same f32 operations: exact).
    assert_eq!(net.recompute_batch_norm_statistics([Ok(a), Ok(b)])?, 2);
    for (((name, both), (_, sa)), (_, sb)) in running_stats(&vm)?.iter().zip(&only_a).zip(&only_b) {
        let want: Vec<f32> = sa.iter().zip(sb).map(|(x, y)| x * 0.5 + y * 0.5).collect();
        assert_eq!(both, &want, "{name}");
    }
    // The weights did not move, and the momentum is back.
    assert_eq!(learned(&vm)?, weights);
    assert!(net.norms_mut().all(|n| n.momentum() == BATCH_NORM_MOMENTUM));

    // A failing batch is the error; the momentum is restored all the same.
    let stats = running_stats(&vm)?;
    let bad = Tensor::zeros((2, 3, 31, 32), DType::F32, &Device::Cpu);
    assert!(net.recompute_batch_norm_statistics([bad]).is_err());
    assert!(net
        .recompute_batch_norm_statistics([Err(candle_core::Error::Msg("no batch".into()))])
        .is_err());
    assert_eq!(running_stats(&vm)?, stats);
    assert!(net.norms_mut().all(|n| n.momentum() == BATCH_NORM_MOMENTUM));

    // The reference network has no batch norms.
    let vm2 = VarMap::new();
    let config = NetworkConfig::SimpleBitCnn(Default::default());
    let mut simple = Network::new(
        config,
        Default::default(),
        VarBuilder::from_varmap(&vm2, DType::F32, &Device::Cpu),
    )?;
    assert!(simple.recompute_batch_norm_statistics(Vec::new()).is_err());
    Ok(())
}
