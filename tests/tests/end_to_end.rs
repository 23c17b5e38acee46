//! End to end on real CIFAR-10 records: train a few steps, export the packed file, verify it
//! against the float checkpoint image by image, inspect it, and evaluate it alone.
use std::path::{Path, PathBuf};

use cifar::{RECORD_BYTES, TEST_FILE, TRAIN_FILES};
use clap::Parser;

/// The shared CIFAR-10 directory. Under CI its absence is a failure; elsewhere the test is
/// skipped with a message.
fn shared_cifar() -> Option<PathBuf> {
    let dir = std::env::var_os("BITLINEAR_CIFAR_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/cifar10/cifar-10-batches-bin"));
    if dir.join(TEST_FILE).is_file() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CIFAR-10 not found at {} (required under CI)", dir.display());
    }
    eprintln!(
        "skipping: CIFAR-10 not found at {} (set BITLINEAR_CIFAR_DIR)",
        dir.display()
    );
    None
}

/// The data set is always there: a download would be a bug.
fn no_download() -> cifar::DownloadOptions {
    cifar::DownloadOptions {
        fetch: cifar::Fetch::Never,
        ..Default::default()
    }
}

/// Copies the first `train_per_file` records of each training file and `test` records of the
/// test file into `dst`, so the test trains and verifies on real images in seconds.
fn slice_dataset(src: &Path, dst: &Path, train_per_file: usize, test: usize) {
    std::fs::create_dir_all(dst).unwrap();
    for (name, n) in TRAIN_FILES
        .iter()
        .map(|f| (*f, train_per_file))
        .chain([(TEST_FILE, test)])
    {
        let bytes = std::fs::read(src.join(name)).unwrap();
        std::fs::write(dst.join(name), &bytes[..n * RECORD_BYTES]).unwrap();
    }
}

#[test]
fn train_export_verify_inspect_eval() {
    let Some(cifar) = shared_cifar() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    slice_dataset(&cifar, &data, 128, 400);
    let run = tmp.path().join("run");

    let args = train::cli::Args::parse_from([
        "train".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        run.as_os_str(),
        "--epochs".as_ref(),
        "2".as_ref(),
        "--batch-size".as_ref(),
        "64".as_ref(),
        "--seed".as_ref(),
        "11".as_ref(),
    ]);
    let mut trainer = train::trainer::Trainer::new(args).unwrap();
    trainer.run().unwrap();
    let best = run.join("best.safetensors");
    assert!(best.is_file());

    let packed = tmp.path().join("model.packed.safetensors");
    let (before, after) = convert::export(&best, &packed, candle_core::DType::F32).unwrap();
    // Convolutions stay f32; the 2.1M BitLinear weights shrink 16x: well over 8x in all.
    assert!(before > 8 * after, "{before} -> {after}");

    let v = convert::evaluate::verify(&best, &packed, &data, &no_download()).unwrap();
    assert_eq!(v.images, 400);
    assert_eq!(v.prediction_mismatches, 0);
    assert_eq!(v.max_logit_diff, 0.0, "same kernels, same epilogue: identical logits");
    assert!(v.passed());
    assert_eq!(v.float_accuracy, v.packed_accuracy);

    let listing = convert::inspect::inspect(&packed).unwrap();
    assert!(listing.contains("format: bitlinear-packed"), "{listing}");
    assert!(listing.contains("fc1.weight.packed"), "{listing}");

    let (n, acc) = convert::evaluate::eval_packed(&packed, &data, &no_download(), &candle_core::Device::Cpu).unwrap();
    assert_eq!((n, acc), (400, v.packed_accuracy));
    // Two epochs on 640 images: better than chance (10%).
    assert!(acc > 0.12, "accuracy {acc}");
}

/// The fully ternary speed-run network, narrow so that a CPU test trains it for 200 steps: train
/// with its recipe (and test-time augmentation), export, verify image by image, inspect, eval.
#[test]
fn ternary_speedrun_train_export_verify_eval() {
    let Some(cifar) = shared_cifar() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    slice_dataset(&cifar, &data, 256, 300);
    let run = tmp.path().join("run");
    let args = train::cli::Args::parse_from([
        "train".as_ref(),
        "--model".as_ref(),
        "ternary-speedrun".as_ref(),
        "--widths".as_ref(),
        "8,16,16,32".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        run.as_os_str(),
        "--epochs".as_ref(),
        "5".as_ref(),
        "--batch-size".as_ref(),
        "32".as_ref(),
        "--seed".as_ref(),
        "5".as_ref(),
        "--tta".as_ref(),
    ]);
    let mut trainer = train::trainer::Trainer::new(args).unwrap();
    assert_eq!(trainer.recipe.label_smoothing, 0.2, "the network's own recipe");
    let summary = trainer.run().unwrap();
    // 1,280 images in batches of 32 for 5 epochs: 200 steps.
    assert_eq!(trainer.state.optimizer_step, 200);
    assert!(summary.tta_test_acc.is_some_and(|a| (0.0..=1.0).contains(&a)));
    let last = run.join("last.safetensors");

    let packed = tmp.path().join("speedrun.packed.safetensors");
    convert::export(&last, &packed, candle_core::DType::F32).unwrap();
    let v = convert::evaluate::verify(&last, &packed, &data, &no_download()).unwrap();
    assert_eq!(v.images, 300);
    assert_eq!(v.prediction_mismatches, 0);
    assert_eq!(
        v.max_logit_diff, 0.0,
        "the training form computes the packed form's integers"
    );
    assert_eq!(
        v.float_accuracy, summary.final_test_acc,
        "verify re-runs the training form"
    );

    let listing = convert::inspect::inspect(&packed).unwrap();
    assert!(listing.contains("model: TernarySpeedrun"), "{listing}");
    assert!(listing.contains("block3.conv2.weight.packed"), "{listing}");

    let (n, acc) = convert::evaluate::eval_packed(&packed, &data, &no_download(), &candle_core::Device::Cpu).unwrap();
    assert_eq!((n, acc), (300, v.packed_accuracy));
    assert_eq!(acc, summary.packed_test_acc);
    // 200 steps of a narrow network: better than chance (10%).
    assert!(acc > 0.13, "accuracy {acc}");
}
