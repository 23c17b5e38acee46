//! Regression tests for the hostile inputs of issue 20 (part 3) against `train`: an edited resume
//! state is an error naming the field, and a failed checkpoint write leaves no temporary file.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

/// A finished first epoch of a 2-epoch run on a tiny generated data set (80 training images,
/// batch 32: 3 steps an epoch): returns the data directory, the run directory and its arguments.
struct Run {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    out: PathBuf,
}

impl Run {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        common::write_dataset(&data, 16, 20);
        let out = tmp.path().join("run");
        let run = Self { _tmp: tmp, data, out };
        let o = run.train(&["--stop-after-epochs", "1"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        run
    }

    fn train(&self, extra: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_train"))
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--out")
            .arg(&self.out)
            .args(["--epochs", "2", "--batch-size", "32", "--eval-batch-size", "20"])
            .args(extra)
            .output()
            .unwrap()
    }

    fn resume_path(&self) -> PathBuf {
        self.out.join("resume.safetensors")
    }

    /// Applies `edit` to a copy of the resume state's tensors and metadata JSON, runs `--resume`
    /// on it and checks that it fails naming `needle`; then restores the good file.
    fn resume_fails(&self, needle: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>, &mut Value)) {
        let path = self.resume_path();
        let good = std::fs::read(&path).unwrap();
        let (_, st) = safetensors::SafeTensors::read_metadata(&good).unwrap();
        let mut meta = st.metadata().clone().unwrap();
        let mut state: Value = serde_json::from_str(&meta["train_state"]).unwrap();
        let mut tensors: Vec<_> = candle_core::safetensors::load_buffer(&good, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        edit(&mut tensors, &mut state);
        meta.insert("train_state".into(), state.to_string());
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta)).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let o = self.train(&["--resume"]);
        std::fs::write(&path, &good).unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "resume succeeded; expected {needle:?}");
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

fn get<'a>(tensors: &'a mut [(String, Tensor)], name: &str) -> &'a mut Tensor {
    &mut tensors.iter_mut().find(|(k, _)| k == name).unwrap().1
}

fn relabel_i32(t: &Tensor) -> Tensor {
    let f = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bytes: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_raw_buffer(&bytes, DType::I32, t.dims(), &Device::Cpu).unwrap()
}

fn poke(t: &Tensor, i: usize, v: f32) -> Tensor {
    let mut x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    x[i] = v;
    Tensor::from_vec(x, t.dims(), &Device::Cpu).unwrap()
}

#[test]
fn edited_resume_states_are_errors() {
    let run = Run::new();
    // The run directory records its configuration in the checkpoints it writes.
    let bytes = std::fs::read(run.out.join("last.safetensors")).unwrap();
    let (_, st) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta: HashMap<String, String> = st.metadata().clone().unwrap();
    assert_eq!(meta["model"], "SimpleBitCnn");
    assert_eq!(meta["epoch"], "1");
    assert!(meta["model_config"].contains(r#""fc1":"bitlinear""#));

    run.resume_fails("training state version 3 is not supported", |_, s| {
        s["version"] = json!(3)
    });
    run.resume_fails("epochs_done = 5 is more than the run's --epochs 2", |_, s| {
        s["epochs_done"] = json!(5)
    });
    run.resume_fails("epochs_done = 0", |_, s| s["epochs_done"] = json!(0));
    // Consistent counters, but a history that says otherwise.
    run.resume_fails("the history has 0 epochs, epochs_done = 1", |_, s| {
        s["history"] = json!([])
    });
    run.resume_fails("the history has 2 epochs, epochs_done = 1", |_, s| {
        let row = s["history"][0].clone();
        s["history"].as_array_mut().unwrap().push(row);
    });
    run.resume_fails("history row 1 is epoch 7", |_, s| s["history"][0]["epoch"] = json!(7));
    run.resume_fails("optimizer_step = 0, but 1 epochs of 3 steps make 3", |_, s| {
        s["optimizer_step"] = json!(0)
    });
    run.resume_fails("best_epoch = 0", |_, s| s["best_epoch"] = json!(0));

    // Tensors: an optimizer moment relabelled I32 (once trained to a loss of 3e7), a negative
    // second moment, a NaN weight, a stray and a missing tensor.
    run.resume_fails("tensor \"optim.m.fc1.weight\" has dtype I32, expected F32", |t, _| {
        let v = get(t, "optim.m.fc1.weight");
        *v = relabel_i32(v);
    });
    run.resume_fails("optimizer state \"optim.v.conv2.bias\" holds -1", |t, _| {
        let v = get(t, "optim.v.conv2.bias");
        *v = poke(v, 5, -1.0);
    });
    run.resume_fails("tensor \"conv1.weight\" holds NaN at index 9", |t, _| {
        let v = get(t, "conv1.weight");
        *v = poke(v, 9, f32::NAN);
    });
    run.resume_fails("tensor \"optim.m.fc2.bias\" holds inf at index 0", |t, _| {
        let v = get(t, "optim.m.fc2.bias");
        *v = poke(v, 0, f32::INFINITY);
    });
    run.resume_fails("unknown tensor \"fc}.norm.weight\"", |t, _| {
        t.iter_mut().find(|(k, _)| k == "fc1.norm.weight").unwrap().0 = "fc}.norm.weight".into();
    });
    run.resume_fails("tensor \"optim.v.fc2.weight\" is missing", |t, _| {
        t.retain(|(k, _)| k != "optim.v.fc2.weight")
    });
    // The lookahead's slow copies (the recipe has lookahead): missing or not finite; and a state
    // whose settings have no lookahead, which this run's recipe cannot continue.
    run.resume_fails("tensor \"lookahead.fc1.bias\" is missing", |t, _| {
        t.retain(|(k, _)| k != "lookahead.fc1.bias")
    });
    run.resume_fails("tensor \"lookahead.conv1.weight\" holds NaN at index 3", |t, _| {
        let v = get(t, "lookahead.conv1.weight");
        *v = poke(v, 3, f32::NAN);
    });
    run.resume_fails("lookahead: checkpoint null, now {\"every\":5}", |_, s| {
        s["settings"]["lookahead"] = json!(null)
    });
    // A state of another optimizer than this run's, and one no build knows.
    run.resume_fails("optimizer: checkpoint \"sgd\", now \"adamw\"", |_, s| {
        s["settings"]["optimizer"] = json!("sgd")
    });
    run.resume_fails("unknown variant `adam`", |_, s| {
        s["settings"]["optimizer"] = json!("adam")
    });

    // The good file still resumes and finishes the run.
    let o = run.train(&["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.lines().last().unwrap().contains("\"epochs\":2"), "{stdout}");
}

/// Files in `dir` whose name contains `.tmp`.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

#[test]
fn a_failed_checkpoint_rename_leaves_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_dataset(&data, 16, 20);
    let out = tmp.path().join("run");
    // A directory (not empty) where `last.safetensors` goes: the rename onto it fails.
    std::fs::create_dir_all(out.join("last.safetensors").join("x")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--epochs", "1", "--batch-size", "32", "--eval-batch-size", "20"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("last.safetensors"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(temp_files(&out), Vec::<String>::new());
    assert!(out.join("last.safetensors").join("x").is_dir());
}
