//! The binary on bad inputs, and `--resume` equivalence on a tiny generated data set.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .output()
        .expect("running the train binary")
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = train(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {n:?} not in stderr:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
}

#[test]
fn zero_or_negative_sizes_are_rejected() {
    fails_with(&["--batch-size", "0"], &["--batch-size", "at least 1, got 0"]);
    fails_with(&["--batch-size", "-5"], &["--batch-size", "at least 1, got -5"]);
    fails_with(&["--epochs", "0"], &["--epochs", "at least 1, got 0"]);
    fails_with(&["--epochs", "-1"], &["--epochs", "at least 1, got -1"]);
    fails_with(&["--epochs", "two"], &["--epochs", "positive whole number"]);
    fails_with(&["--lr", "-0.1"], &["--lr", "greater than 0"]);
    fails_with(&["--weight-decay", "-1"], &["--weight-decay", "0 or more"]);
    fails_with(&["--train-limit", "0"], &["--train-limit", "at least 1"]);
    fails_with(&["--schedule", "linear"], &["--schedule", "constant", "cosine"]);
}

#[test]
fn network_options_are_checked() {
    let nowhere = ["--data-dir", "/nonexistent/cifar", "--no-download"];
    let with = |extra: &[&'static str]| [&nowhere[..], extra].concat();
    for option in [
        &["--stem", "float"],
        &["--recompute-bn", "100"],
        &["--block-codes", "per-channel"],
    ] {
        fails_with(
            &with(option),
            &["--stem, --widths, --block-codes and --recompute-bn apply to --model ternary-speedrun"],
        );
    }
    fails_with(&["--block-codes", "per-row"], &["--block-codes", "per-row"]);
    fails_with(
        &["--recompute-bn", "-1"],
        &["--recompute-bn", "must be 0 or more, got -1"],
    );
    fails_with(
        &with(&["--model", "ternary-speedrun", "--fc1", "linear"]),
        &["--fc1 and --fc2 apply to --model simple-bit-cnn"],
    );
    fails_with(
        &["--widths", "32,64,256"],
        &["--widths", "expected 4 comma-separated widths, got 3"],
    );
    fails_with(&["--widths", "32,0,256,256"], &["--widths", "at least 1, got 0"]);
    fails_with(
        &["--label-smoothing", "1"],
        &["--label-smoothing", "must be in [0, 1), got 1"],
    );
    fails_with(&["--translate", "5"], &["--translate", "5"]);
    fails_with(
        &["--model", "resnet"],
        &["--model", "simple-bit-cnn", "ternary-speedrun"],
    );
}

#[test]
fn missing_data_dir_explains_what_to_get() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("no-such-dir");
    let out = tmp.path().join("run");
    fails_with(
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--no-download",
        ],
        &[
            "--no-download",
            "data_batch_1.bin",
            "data_batch_5.bin",
            "test_batch.bin",
            "cifar-10-binary.tar.gz",
            "no-such-dir",
        ],
    );
}

#[test]
fn truncated_file_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_dataset(tmp.path(), 2, 2);
    let p = tmp.path().join("data_batch_1.bin");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 1]).unwrap();
    let out = tmp.path().join("run");
    fails_with(
        &[
            "--data-dir",
            tmp.path().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["data_batch_1.bin", "truncated", "3073"],
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_explained() {
    fails_with(&["--device", "cuda"], &["--features cuda"]);
}

fn run_ok(args: &[&str]) -> String {
    let out = train(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn s(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st.tensors().into_iter().map(|(k, t)| (k, t.data().to_vec())).collect();
    v.sort();
    v
}

/// Stopping after an epoch and resuming (twice) ends bit for bit where an uninterrupted run
/// ends: weights, optimizer moments and step, metrics.
#[test]
fn resume_is_bit_exact() {
    check_resume_is_bit_exact("32", &[]);
}

/// The same with alternating flips and lookahead: 10 steps an epoch, an update every 3, so each
/// stop falls between updates and the slow copies differ from the weights there.
#[test]
fn resume_with_lookahead_is_bit_exact() {
    check_resume_is_bit_exact("8", &["--flip", "alternating", "--lookahead-every", "3"]);
}

/// The same for the speed-run network with its batch norms' statistics recomputed after the
/// last step.
#[test]
fn resume_with_recomputed_batch_norms_is_bit_exact() {
    let speedrun = ["--model", "ternary-speedrun", "--widths", "4,8,8,8"];
    check_resume_is_bit_exact("8", &[&speedrun[..], &["--recompute-bn", "12"]].concat());
}

/// The same for the speed-run network trained with SGD (its momentum buffers in the resume
/// file, the batch norms' shifts at their own step size).
#[test]
fn resume_with_sgd_is_bit_exact() {
    let speedrun = ["--model", "ternary-speedrun", "--widths", "4,8,8,8"];
    check_resume_is_bit_exact("8", &[&speedrun[..], &["--optimizer", "sgd"]].concat());
}

/// `--recompute-bn`: the learned weights are those of the run without it, the running
/// statistics are not, and the log says it.
#[test]
fn recompute_bn_changes_only_the_running_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_dataset(&data, 16, 20);
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let args = [
            "--model",
            "ternary-speedrun",
            "--widths",
            "4,8,8,8",
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--eval-batch-size",
            "20",
        ];
        let stdout = run_ok(&[&args[..], extra].concat());
        (stdout, tensors(&out.join("last.safetensors")))
    };
    let (plain_log, plain) = run("plain", &[]);
    let (log, recomputed) = run("recomputed", &["--recompute-bn", "12"]);
    assert!(!plain_log.contains("recomputed"), "{plain_log}");
    assert!(
        log.contains("running statistics recomputed over 12 training images"),
        "{log}"
    );
    assert_eq!(plain.len(), recomputed.len());
    let mut running = 0;
    for ((name, a), (name_b, b)) in plain.iter().zip(&recomputed) {
        assert_eq!(name, name_b);
        if name.contains("running_") {
            assert_ne!(a, b, "{name}: the statistics were not recomputed");
            running += 1;
        } else {
            assert_eq!(a, b, "{name}: a learned variable changed");
        }
    }
    assert_eq!(running, 12, "two statistics of each of the six batch norms");
}

fn check_resume_is_bit_exact(batch_size: &str, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_dataset(&data, 16, 20);
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let args_seed = |out: &Path, seed: &str| -> Vec<String> {
        [
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "3",
            "--batch-size",
            batch_size,
            "--eval-batch-size",
            "20",
            "--schedule",
            "cosine",
            "--seed",
            seed,
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let common_args = |out: &Path| args_seed(out, "11");
    let full = run_ok(&s(&common_args(&a)));

    let mut first = common_args(&b);
    first.extend(["--stop-after-epochs", "1"].map(String::from));
    run_ok(&s(&first));
    // Without --resume an existing run is not overwritten.
    fails_with(&s(&common_args(&b)), &["--resume"]);
    // Different settings cannot resume exactly.
    let mut other = args_seed(&b, "12");
    other.push("--resume".into());
    fails_with(&s(&other), &["seed: checkpoint 11, now 12"]);

    let mut second = common_args(&b);
    second.extend(["--resume", "--stop-after-epochs", "2"].map(String::from));
    let out2 = run_ok(&s(&second));
    assert!(out2.contains("resuming"), "{out2}");
    let mut third = common_args(&b);
    third.push("--resume".into());
    let resumed = run_ok(&s(&third));

    // Tensors and metadata (whose key order in the header is not fixed) are equal.
    assert_eq!(
        tensors(&a.join("last.safetensors")),
        tensors(&b.join("last.safetensors")),
        "weights differ after resume"
    );
    let meta = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        safetensors::SafeTensors::read_metadata(&bytes)
            .unwrap()
            .1
            .metadata()
            .clone()
    };
    assert_eq!(meta(&a.join("last.safetensors")), meta(&b.join("last.safetensors")));
    assert_eq!(
        tensors(&a.join("resume.safetensors")),
        tensors(&b.join("resume.safetensors")),
        "optimizer state differs after resume"
    );
    // Same accuracies in the summaries (the last line).
    let acc = |out: &str| {
        let last = out.lines().last().unwrap();
        let v: serde_json::Value = serde_json::from_str(last).unwrap();
        (v["final_test_acc"].clone(), v["best_test_acc"].clone())
    };
    assert_eq!(acc(&full), acc(&resumed));
    let csv = |p: &Path| {
        std::fs::read_to_string(p.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(6).collect::<Vec<_>>().join(","))
            .collect::<Vec<_>>()
    };
    assert_eq!(csv(&a), csv(&b));
    assert_eq!(csv(&a).len(), 4);
    for f in ["best.safetensors", "plot.png", "metrics.csv"] {
        assert!(b.join(f).is_file(), "{f} missing");
    }
    // Resuming a finished run does nothing more.
    let again = run_ok(&s(&third));
    assert!(again.lines().last().unwrap().contains("\"epochs\":3"));
}
