//! `convert` on the fully ternary speed-run network: export at its real widths (size), the packed
//! file alone rebuilding the network with identical logits, inspect, and a mismatched file.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{bin, edit, run, save_varmap};
use model::{PackedNetwork, StemKind, TernarySpeedrun, TernarySpeedrunConfig};

/// A random checkpoint of `config` at `dir/speedrun.safetensors` (batch-norm statistics and
/// shifts made non-trivial) and the network it holds.
fn speedrun_checkpoint(dir: &Path, config: TernarySpeedrunConfig) -> (PathBuf, TernarySpeedrun) {
    let varmap = VarMap::new();
    let net = TernarySpeedrun::new(config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    let path = dir.join("speedrun.safetensors");
    save_varmap(&varmap, &path, net.checkpoint_metadata(), |name| {
        name.contains(".norm") || name.ends_with("bias")
    });
    (path, net)
}

fn images(b: usize) -> Tensor {
    let v: Vec<f32> = (0..b * 3 * 32 * 32)
        .map(|i| ((i * 7919) % 1013) as f32 / 300.0 - 1.7)
        .collect();
    Tensor::from_vec(v, (b, 3, 32, 32), &Device::Cpu).unwrap()
}

#[test]
fn export_at_full_width_is_a_twelfth_and_predicts_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, net) = speedrun_checkpoint(dir.path(), TernarySpeedrunConfig::default());
    let out = dir.path().join("packed.safetensors");
    let (ok, stdout, stderr) = run(bin().args(["export", "--checkpoint"]).arg(&ckpt).arg("--out").arg(&out));
    assert!(ok, "{stdout}\n{stderr}");
    let (before, after) = (
        std::fs::metadata(&ckpt).unwrap().len(),
        std::fs::metadata(&out).unwrap().len(),
    );
    assert!(
        12 * after <= before,
        "packed {after} bytes, checkpoint {before}: not 1/12"
    );
    let packed = PackedNetwork::load(&out, &Device::Cpu).unwrap();
    let x = images(3);
    let want: Vec<Vec<f32>> = net.forward(&x).unwrap().to_vec2().unwrap();
    let got: Vec<Vec<f32>> = packed.forward(&x).unwrap().to_vec2().unwrap();
    assert_eq!(got, want);

    let (ok, listing, stderr) = run(bin().arg("inspect").arg(&out));
    assert!(ok, "{stderr}");
    assert!(listing.contains("model: TernarySpeedrun"), "{listing}");
    assert!(
        listing.contains(r#"model_config: {"widths":[32,64,256,256],"stem":"ternary""#),
        "{listing}"
    );
    assert!(listing.contains("block2.conv2.in_features: 2304"), "{listing}");
}

#[test]
fn float_stem_and_bf16_storage() {
    let dir = tempfile::tempdir().unwrap();
    let config = TernarySpeedrunConfig {
        widths: [8, 8, 16, 16],
        stem: StemKind::Float,
        channel_codes: false,
    };
    let (ckpt, net) = speedrun_checkpoint(dir.path(), config);
    let out = dir.path().join("bf16.safetensors");
    convert::export(&ckpt, &out, DType::BF16).unwrap();
    let packed = PackedNetwork::load(&out, &Device::Cpu).unwrap();
    assert_eq!(packed.config(), model::NetworkConfig::TernarySpeedrun(config));
    let x = images(2);
    let want: Vec<f32> = net.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let got: Vec<f32> = packed.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    // bf16 floats (stem, norms, shifts) keep the logits close, not equal.
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 0.1 * scale + 1e-3, "{got:?} vs {want:?}");
    }
}

#[test]
fn a_checkpoint_that_does_not_match_its_recorded_widths_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, _) = speedrun_checkpoint(
        dir.path(),
        TernarySpeedrunConfig {
            widths: [4, 8, 8, 8],
            stem: StemKind::Ternary,
            channel_codes: false,
        },
    );
    // Rewrite the recorded widths: the tensors no longer fit.
    edit(&ckpt, &ckpt, |_, meta| {
        meta.insert(
            "model_config".into(),
            r#"{"widths":[4,8,8,16],"stem":"ternary","act_scaling":"per-image"}"#.into(),
        );
    });
    let out = dir.path().join("never.safetensors");
    let (ok, _, stderr) = run(bin().args(["export", "--checkpoint"]).arg(&ckpt).arg("--out").arg(&out));
    assert!(!ok);
    assert!(stderr.contains("expected [16, 8, 3, 3]"), "{stderr}");
    assert!(!out.exists(), "no file written on error");
}

#[test]
fn per_channel_block_codes_survive_export() {
    let dir = tempfile::tempdir().unwrap();
    let config = TernarySpeedrunConfig {
        widths: [4, 8, 8, 8],
        stem: StemKind::Ternary,
        channel_codes: true,
    };
    let varmap = VarMap::new();
    let net = TernarySpeedrun::new(config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    // Channels of unequal magnitude: per-tensor codes would zero most of channel 1's weights.
    {
        let data = varmap.data().lock().unwrap();
        let w = &data["block1.conv1.weight"];
        let scale: Vec<f32> = (0..8).map(|c| if c == 1 { 0.2 } else { 1.0 }).collect();
        let scale = Tensor::from_vec(scale, (8, 1, 1, 1), &Device::Cpu).unwrap();
        w.set(&w.as_tensor().broadcast_mul(&scale).unwrap()).unwrap();
    }
    let ckpt = dir.path().join("speedrun.safetensors");
    save_varmap(&varmap, &ckpt, net.checkpoint_metadata(), |name| {
        name.contains(".norm") || name.ends_with("bias")
    });
    let out = dir.path().join("packed.safetensors");
    let (ok, stdout, stderr) = run(bin().args(["export", "--checkpoint"]).arg(&ckpt).arg("--out").arg(&out));
    assert!(ok, "{stdout}\n{stderr}");
    let packed = PackedNetwork::load(&out, &Device::Cpu).unwrap();
    assert_eq!(packed.config(), model::NetworkConfig::TernarySpeedrun(config));
    let x = images(3);
    let want: Vec<Vec<f32>> = net.forward(&x).unwrap().to_vec2().unwrap();
    let got: Vec<Vec<f32>> = packed.forward(&x).unwrap().to_vec2().unwrap();
    assert_eq!(got, want);
    // The file holds channel 1's own codes, not the per-tensor ones.
    let stored = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let bytes = stored["block1.conv1.weight.packed"].to_vec2::<u8>().unwrap();
    let w = varmap.data().lock().unwrap()["block1.conv1.weight"]
        .as_tensor()
        .reshape((8, 36))
        .unwrap();
    let per_tensor = bitlinear::PackedTernary::pack(&w)
        .unwrap()
        .bytes()
        .to_vec2::<u8>()
        .unwrap();
    assert_ne!(bytes[1], per_tensor[1]);
    let row1 = bitlinear::unpack_ternary(&bytes[1], 1, 36).unwrap();
    let zeros = row1.iter().filter(|&&c| c == 0).count();
    assert!(zeros < 24, "channel 1 rounded against its own absmean: {row1:?}");
}
