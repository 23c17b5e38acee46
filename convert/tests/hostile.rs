//! Regression tests for the hostile inputs of issue 20 (part 3) that were once accepted: each
//! produces the garbled file and checks that loading it is an error naming the cause.
mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{bin, checkpoint, edit, get, poke, relabel, run, temp_files};
use model::{FcKind, PackedSimpleBitCnn, SimpleBitCnnConfig};
use rand::Rng;

/// `convert export` of `ckpt`: must fail with every one of `needles` in its message, and leave
/// no output and no temporary file.
fn export_fails(ckpt: &Path, needles: &[&str]) {
    let dir = ckpt.parent().unwrap();
    let out = dir.join("out.packed.safetensors");
    let (ok, _, stderr) = run(bin().args(["export", "--checkpoint"]).arg(ckpt).arg("--out").arg(&out));
    assert!(!ok, "export of {} succeeded", ckpt.display());
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists() && temp_files(dir).is_empty());
}

/// Loading the packed file `path` must fail with every one of `needles` in the message.
fn packed_fails(path: &Path, needles: &[&str]) {
    let e = PackedSimpleBitCnn::load(path, &Device::Cpu).unwrap_err().to_string();
    for n in needles {
        assert!(e.contains(n), "{n:?} not in: {e}");
    }
}

/// A good checkpoint and the packed file exported from it (floats stored as `dtype`).
fn good_files(dir: &Path, config: SimpleBitCnnConfig, dtype: &str) -> (PathBuf, PathBuf) {
    let (ckpt, _) = checkpoint(dir, config);
    let packed = dir.join("good.packed.safetensors");
    let (ok, _, stderr) = run(bin()
        .args(["export", "--dtype", dtype, "--checkpoint"])
        .arg(&ckpt)
        .arg("--out")
        .arg(&packed));
    assert!(ok, "{stderr}");
    PackedSimpleBitCnn::load(&packed, &Device::Cpu).unwrap();
    (ckpt, packed)
}

fn rename(tensors: &mut [(String, Tensor)], from: &str, to: &str) {
    let entry = tensors.iter_mut().find(|(k, _)| k == from).unwrap();
    entry.0 = to.to_string();
}

#[test]
fn a_flipped_byte_in_a_tensor_name_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, packed) = good_files(dir.path(), SimpleBitCnnConfig::bitlinear(), "f32");
    // `1` (0x31) -> `}` (0x7d): once exported as a full-precision fc1, the stray tensor ignored.
    let bad = dir.path().join("flipped.safetensors");
    edit(&ckpt, &bad, |t, _| rename(t, "fc1.norm.weight", "fc}.norm.weight"));
    export_fails(
        &bad,
        &[
            "unknown tensor \"fc}.norm.weight\"",
            "tensor \"fc1.norm.weight\" is missing",
        ],
    );
    let bad = dir.path().join("flipped.packed.safetensors");
    edit(&packed, &bad, |t, _| rename(t, "conv2.bias", "conv2.biat"));
    packed_fails(
        &bad,
        &["unknown tensor \"conv2.biat\"", "tensor \"conv2.bias\" is missing"],
    );
}

#[test]
fn a_missing_or_extra_norm_tensor_is_an_error_not_another_layer_kind() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, packed) = good_files(dir.path(), SimpleBitCnnConfig::bitlinear(), "f32");
    for layer in ["fc1", "fc2"] {
        let bad = dir.path().join(format!("no-{layer}-norm.safetensors"));
        let name = format!("{layer}.norm.weight");
        edit(&ckpt, &bad, |t, _| t.retain(|(k, _)| *k != name));
        export_fails(&bad, &[&format!("tensor \"{name}\" is missing")]);
        edit(&packed, &bad, |t, _| t.retain(|(k, _)| *k != name));
        packed_fails(&bad, &[&format!("tensor \"{name}\" is missing")]);
    }
    // A full-precision fc2 recorded, a norm tensor present: the tensor is unknown.
    let linear = SimpleBitCnnConfig {
        fc1: FcKind::BitLinear,
        fc2: FcKind::Linear,
    };
    let sub = tempfile::tempdir().unwrap();
    let (ckpt2, _) = checkpoint(sub.path(), linear);
    let bad = sub.path().join("extra-norm.safetensors");
    edit(&ckpt2, &bad, |t, _| {
        t.push((
            "fc2.norm.weight".into(),
            Tensor::ones(512, DType::F32, &Device::Cpu).unwrap(),
        ))
    });
    export_fails(&bad, &["unknown tensor \"fc2.norm.weight\""]);
    // The configuration is read, never guessed: a checkpoint that does not record it is refused.
    let bad = dir.path().join("no-config.safetensors");
    edit(&ckpt, &bad, |_, m| {
        m.remove("model_config");
    });
    export_fails(&bad, &["no \"model_config\" metadata"]);
    let bad = dir.path().join("other-config.safetensors");
    edit(&ckpt, &bad, |_, m| {
        m.insert(
            "model_config".into(),
            r#"{"fc1":"bitlinear","fc2":"linear","act_scaling":"per-token"}"#.into(),
        );
    });
    export_fails(&bad, &["unknown tensor \"fc2.norm.weight\""]);
}

#[test]
fn relabelled_dtypes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, packed) = good_files(dir.path(), SimpleBitCnnConfig::bitlinear(), "f32");
    for (name, dtype, label) in [
        ("conv1.weight", DType::I32, "I32"),
        ("fc1.weight", DType::U32, "U32"),
        ("fc2.norm.weight", DType::I32, "I32"),
    ] {
        let bad = dir.path().join(format!("{name}-{label}.safetensors"));
        edit(&ckpt, &bad, |t, _| {
            let v = get(t, name);
            *v = relabel(v, dtype);
        });
        export_fails(&bad, &[&format!("tensor \"{name}\" has dtype {label}, expected F32")]);
    }
    let bad = dir.path().join("scale-u32.packed.safetensors");
    edit(&packed, &bad, |t, _| {
        let v = get(t, "fc1.weight.scale");
        *v = relabel(v, DType::U32);
    });
    packed_fails(&bad, &["tensor \"fc1.weight.scale\" has dtype U32, expected F32"]);
    let bad = dir.path().join("bias-i32.packed.safetensors");
    edit(&packed, &bad, |t, _| {
        let v = get(t, "fc2.bias");
        *v = relabel(v, DType::I32);
    });
    packed_fails(&bad, &["tensor \"fc2.bias\" has dtype I32, expected F32"]);
}

#[test]
fn float_dtype_metadata_must_match_the_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, packed) = good_files(dir.path(), SimpleBitCnnConfig::bitlinear(), "f32");
    let bad = dir.path().join("says-bf16.safetensors");
    edit(&packed, &bad, |_, m| {
        m.insert("float_dtype".into(), "bf16".into());
    });
    packed_fails(
        &bad,
        &["tensor \"conv1.weight\" has dtype F32, expected BF16 (float_dtype is \"bf16\")"],
    );
    edit(&packed, &bad, |_, m| {
        m.insert("float_dtype".into(), "f64".into());
    });
    packed_fails(&bad, &["float_dtype \"f64\" is not one of"]);
    edit(&packed, &bad, |_, m| {
        m.remove("float_dtype");
    });
    packed_fails(&bad, &["no \"float_dtype\" metadata"]);
    // One tensor of another float dtype among bf16 ones.
    let sub = tempfile::tempdir().unwrap();
    let (_, packed16) = good_files(sub.path(), SimpleBitCnnConfig::bitlinear(), "bf16");
    let bad = sub.path().join("mixed.safetensors");
    edit(&packed16, &bad, |t, _| {
        let v = get(t, "fc1.norm.weight");
        *v = v.to_dtype(DType::F16).unwrap();
    });
    packed_fails(&bad, &["tensor \"fc1.norm.weight\" has dtype F16, expected BF16"]);
}

#[test]
fn nan_and_infinity_in_any_float_tensor_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, packed) = good_files(dir.path(), SimpleBitCnnConfig::bitlinear(), "f32");
    let sub = tempfile::tempdir().unwrap();
    let (_, packed16) = good_files(sub.path(), SimpleBitCnnConfig::bitlinear(), "bf16");
    let mut rng = rand::thread_rng();
    let cases = [
        ("conv1.weight", f32::NAN, "NaN"),
        ("conv2.weight", f32::INFINITY, "inf"),
        ("conv1.bias", f32::NEG_INFINITY, "-inf"),
        ("fc1.norm.weight", f32::NAN, "NaN"),
        ("fc2.norm.weight", f32::INFINITY, "inf"),
        ("fc1.bias", f32::NAN, "NaN"),
        ("fc2.bias", f32::NEG_INFINITY, "-inf"),
    ];
    for (name, value, shown) in cases {
        let mut at = 0;
        let bad = dir.path().join(format!("{name}-{shown}.safetensors"));
        edit(&ckpt, &bad, |t, _| {
            let v = get(t, name);
            at = rng.gen_range(0..v.elem_count());
            *v = poke(v, at, value);
        });
        let needle = format!("tensor \"{name}\" holds {shown} at index {at}");
        export_fails(&bad, &[&needle]);
        for (src, d) in [(&packed, dir.path()), (&packed16, sub.path())] {
            let bad = d.join(format!("{name}-{shown}.packed.safetensors"));
            edit(src, &bad, |t, _| {
                let v = get(t, name);
                *v = poke(v, at, value);
            });
            packed_fails(&bad, &[&needle]);
        }
    }
    // The latent BitLinear weight of a checkpoint, by the same rule.
    let bad = dir.path().join("fc1-weight-nan.safetensors");
    let at = rng.gen_range(0..512 * 4096);
    edit(&ckpt, &bad, |t, _| {
        let v = get(t, "fc1.weight");
        *v = poke(v, at, f32::NAN);
    });
    export_fails(&bad, &[&format!("tensor \"fc1.weight\" holds NaN at index {at}")]);
    // A packed weight's scale (from_parts' own check, reached through the same loader).
    let bad = dir.path().join("scale-nan.packed.safetensors");
    edit(&packed, &bad, |t, _| {
        let v = get(t, "fc2.weight.scale");
        *v = poke(v, 0, f32::NAN);
    });
    packed_fails(&bad, &["tensor \"fc2.weight.scale\" holds NaN at index 0"]);
}

#[test]
fn export_onto_its_own_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ckpt, _) = checkpoint(d, SimpleBitCnnConfig::bitlinear());
    let before = std::fs::read(&ckpt).unwrap();
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let mut outs = vec![
        ckpt.clone(),
        d.join(".").join("ckpt.safetensors"),
        sub.join("../ckpt.safetensors"),
    ];
    #[cfg(unix)]
    {
        let link = d.join("link.safetensors");
        std::os::unix::fs::symlink(&ckpt, &link).unwrap();
        let hard = d.join("hard.safetensors");
        std::fs::hard_link(&ckpt, &hard).unwrap();
        outs.extend([link, hard]);
    }
    for out in outs {
        let (ok, _, stderr) = run(bin().args(["export", "--checkpoint"]).arg(&ckpt).arg("--out").arg(&out));
        assert!(!ok, "export onto {} succeeded", out.display());
        assert!(stderr.contains("is the checkpoint itself"), "{stderr}");
        assert_eq!(std::fs::read(&ckpt).unwrap(), before, "{}", out.display());
    }
    assert!(temp_files(d).is_empty());
    // Another file in the same directory is fine.
    let (ok, _, stderr) = run(bin()
        .args(["export", "--checkpoint"])
        .arg(&ckpt)
        .arg("--out")
        .arg(d.join("sub/../other.safetensors")));
    assert!(ok, "{stderr}");
}
