//! `convert` on randomly initialized SimpleBitCnn checkpoints: exactness, size, bad input.
mod common;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use common::{bin, checkpoint, run};
use model::{PackedSimpleBitCnn, SimpleBitCnnConfig};

#[test]
fn export_preserves_every_ternary_weight_and_scale() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, model) = checkpoint(dir.path(), SimpleBitCnnConfig::bitlinear());
    let out = dir.path().join("model.packed.safetensors");
    let (ok, stdout, stderr) = run(bin().args(["export", "--checkpoint"]).arg(&ckpt).arg("--out").arg(&out));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("smaller"), "{stdout}");

    let loaded = PackedSimpleBitCnn::load(&out, &Device::Cpu).unwrap();
    let expected = model.to_packed().unwrap();
    let (want, _) = expected.to_packed_tensors(DType::F32).unwrap();
    let (got, meta) = loaded.to_packed_tensors(DType::F32).unwrap();
    assert_eq!(meta["format"], "bitlinear-packed");
    assert_eq!(meta["fc1.in_features"], "4096");
    assert_eq!(want.len(), got.len());
    for ((wn, wt), (gn, gt)) in want.iter().zip(&got) {
        assert_eq!(wn, gn);
        assert_eq!(wt.dtype(), gt.dtype(), "{wn}");
        let (a, b) = (wt.flatten_all().unwrap(), gt.flatten_all().unwrap());
        if wt.dtype() == DType::U8 {
            assert_eq!(a.to_vec1::<u8>().unwrap(), b.to_vec1::<u8>().unwrap(), "{wn}");
        } else {
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), "{wn}");
        }
    }

    // Packed inference == quantized training forward, bit for bit, on random images.
    let x = Tensor::randn(0f32, 1.0, (7, 3, 32, 32), &Device::Cpu).unwrap();
    let a = model.forward(&x).unwrap().to_vec2::<f32>().unwrap();
    let b = loaded.forward(&x).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(a, b);

    // The BitLinear weights take at most 1/15 of their f32 size.
    let st_bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    for (name, n, k) in [("fc1", 512usize, 4096usize), ("fc2", 10, 512)] {
        let packed = st.tensor(&format!("{name}.weight.packed")).unwrap().data().len()
            + st.tensor(&format!("{name}.weight.scale")).unwrap().data().len();
        assert!(
            packed * 15 <= n * k * 4,
            "{name}: {packed} bytes vs {} f32 bytes",
            n * k * 4
        );
    }

    // inspect lists it.
    let (ok, stdout, _) = run(bin().arg("inspect").arg(&out));
    assert!(ok);
    assert!(
        stdout.contains("format: bitlinear-packed") && stdout.contains("format_version: 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fc1.weight.packed") && stdout.contains("[512, 1024]"),
        "{stdout}"
    );
    let (ok, stdout, _) = run(bin().arg("inspect").arg(&ckpt));
    assert!(ok && stdout.contains("float checkpoint"), "{stdout}");
}

#[test]
fn half_precision_export_and_full_precision_layers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SimpleBitCnnConfig {
        fc1: model::FcKind::BitLinear,
        fc2: model::FcKind::Linear,
    };
    let (ckpt, model) = checkpoint(dir.path(), cfg);
    let out = dir.path().join("m.bf16.safetensors");
    let (ok, _, stderr) = run(bin()
        .args(["export", "--dtype", "bf16", "--checkpoint"])
        .arg(&ckpt)
        .arg("--out")
        .arg(&out));
    assert!(ok, "{stderr}");
    let loaded = PackedSimpleBitCnn::load(&out, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), cfg);
    let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let a = model.forward(&x).unwrap();
    let b = loaded.forward(&x).unwrap();
    // bf16 convolutions: close, not equal.
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 0.5, "{diff}");
    let f32_out = dir.path().join("m.f32.safetensors");
    assert!(
        run(bin()
            .args(["export", "--checkpoint"])
            .arg(&ckpt)
            .arg("--out")
            .arg(&f32_out))
        .0
    );
    assert!(std::fs::metadata(&out).unwrap().len() < std::fs::metadata(&f32_out).unwrap().len());
}

/// Rewrites a packed file with `edit` applied to its tensors and metadata.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, Tensor)>, &mut std::collections::HashMap<String, String>),
) {
    let bytes = std::fs::read(src).unwrap();
    let m = PackedSimpleBitCnn::from_packed_bytes(&bytes, &Device::Cpu).unwrap();
    let (mut t, mut meta) = m.to_packed_tensors(DType::F32).unwrap();
    edit(&mut t, &mut meta);
    let out = safetensors::serialize(t.iter().map(|(k, v)| (k.as_str(), v)), Some(meta)).unwrap();
    std::fs::write(dst, out).unwrap();
}

#[test]
fn bad_inputs_give_clear_errors_and_no_partial_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ckpt, _) = checkpoint(d, SimpleBitCnnConfig::bitlinear());
    let good = d.join("good.safetensors");
    assert!(
        run(bin()
            .args(["export", "--checkpoint"])
            .arg(&ckpt)
            .arg("--out")
            .arg(&good))
        .0
    );
    let good_bytes = std::fs::read(&good).unwrap();

    let expect_load_error = |path: &Path, needle: &str| {
        let (ok, _, stderr) = run(bin()
            .args(["eval", "--no-download", "--data-dir", "/nonexistent", "--packed"])
            .arg(path));
        assert!(!ok);
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    };

    // Truncated and corrupt files.
    let p = d.join("truncated.safetensors");
    std::fs::write(&p, &good_bytes[..good_bytes.len() / 2]).unwrap();
    expect_load_error(&p, "not a valid safetensors file");
    let p = d.join("garbage.safetensors");
    std::fs::write(&p, b"definitely not a safetensors file").unwrap();
    expect_load_error(&p, "not a valid safetensors file");

    // Another format, another version, a float checkpoint.
    let p = d.join("other.safetensors");
    rewrite(&good, &p, |_, m| {
        m.insert("format".into(), "gguf".into());
    });
    expect_load_error(&p, "format is \"gguf\"");
    let p = d.join("v2.safetensors");
    rewrite(&good, &p, |_, m| {
        m.insert("format_version".into(), "2".into());
    });
    expect_load_error(&p, "format_version");
    expect_load_error(&ckpt, "no \"format\" metadata");

    // Missing and misshaped tensors.
    let p = d.join("missing.safetensors");
    rewrite(&good, &p, |t, _| t.retain(|(k, _)| k != "fc2.weight.packed"));
    expect_load_error(&p, "\"fc2.weight.packed\" is missing");
    let p = d.join("misshaped.safetensors");
    rewrite(&good, &p, |t, _| {
        for (k, v) in t.iter_mut() {
            if k == "fc1.bias" {
                *v = Tensor::zeros(511, DType::F32, &Device::Cpu).unwrap();
            }
        }
    });
    expect_load_error(&p, "tensor \"fc1.bias\" has shape [511], expected [512]");

    // A byte with code 3.
    let p = d.join("code3.safetensors");
    rewrite(&good, &p, |t, _| {
        for (k, v) in t.iter_mut() {
            if k == "fc2.weight.packed" {
                let mut b = v.flatten_all().unwrap().to_vec1::<u8>().unwrap();
                b[17] = 0xff;
                *v = Tensor::from_vec(b, v.dims(), &Device::Cpu).unwrap();
            }
        }
    });
    expect_load_error(&p, "code 3");

    // Exporting a packed file, a missing checkpoint, into a missing directory.
    let out = d.join("x.safetensors");
    let (ok, _, stderr) = run(bin().args(["export", "--checkpoint"]).arg(&good).arg("--out").arg(&out));
    assert!(!ok && stderr.contains("packed file"), "{stderr}");
    let (ok, _, stderr) = run(bin()
        .args(["export", "--checkpoint"])
        .arg(d.join("nope"))
        .arg("--out")
        .arg(&out));
    assert!(!ok && stderr.contains("nope"), "{stderr}");
    let missing_dir_out = d.join("no/such/dir/out.safetensors");
    let (ok, _, stderr) = run(bin()
        .args(["export", "--checkpoint"])
        .arg(&ckpt)
        .arg("--out")
        .arg(&missing_dir_out));
    assert!(!ok && stderr.contains("does not exist"), "{stderr}");
    assert!(!out.exists() && !missing_dir_out.exists());

    // A checkpoint that is not a SimpleBitCnn.
    let p = d.join("notamodel.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("w".to_string(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())]),
        &p,
    )
    .unwrap();
    let (ok, _, stderr) = run(bin().args(["export", "--checkpoint"]).arg(&p).arg("--out").arg(&out));
    assert!(!ok && stderr.contains("SimpleBitCnn"), "{stderr}");
    assert!(!out.exists());
    // No temporary files were left behind anywhere.
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Missing data directory for eval: explains how to get CIFAR-10.
    let (ok, _, stderr) = run(bin()
        .args(["eval", "--no-download", "--data-dir"])
        .arg(d.join("nodata"))
        .arg("--packed")
        .arg(&good));
    assert!(!ok && stderr.contains("cifar-10-binary.tar.gz"), "{stderr}");
}
