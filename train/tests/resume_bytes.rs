//! `resume_from_bytes`: the resume file's parser on bytes (what `load_resume` and the fuzz target
//! run), its round trip and its errors.
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::Rng;
use train::checkpoint::{load_resume, resume_from_bytes, save_resume, RunSettings, TrainState};
use train::metrics::EpochMetrics;
use train::optim::Schedule;

/// A random multiple of 1/1024 in [0, 1): serde_json (without its `float_roundtrip` feature) may
/// read an arbitrary f64 back one ulp off, which is not what this test is about.
fn short(rng: &mut impl Rng) -> f64 {
    rng.gen_range(0..1024) as f64 / 1024.0
}

fn state(epochs_done: usize, rng: &mut impl Rng) -> TrainState {
    let history = (1..=epochs_done)
        .map(|epoch| EpochMetrics {
            epoch,
            lr: 1e-3,
            train_loss: short(rng),
            train_acc: short(rng),
            test_loss: short(rng),
            test_acc: short(rng),
            epoch_seconds: 1.0,
            train_seconds: 0.5,
            images_per_sec: 100.0,
        })
        .collect();
    TrainState {
        version: train::checkpoint::STATE_VERSION,
        epochs_done,
        optimizer_step: epochs_done as u64 * 7,
        best_test_acc: 0.5,
        best_epoch: 1,
        settings: RunSettings {
            model: "SimpleBitCnn fc1=bitlinear fc2=linear".into(),
            epochs: 5,
            batch_size: 16,
            optimizer: Default::default(),
            lr: 1e-3,
            weight_decay: 0.01,
            schedule: Schedule::Cosine,
            label_smoothing: 0.0,
            translate: 4,
            edge: Default::default(),
            flip: Default::default(),
            lookahead: None,
            recompute_bn_images: 0,
            seed: rng.gen(),
            train_limit: Some(100),
            train_images: 100,
            dtype: "f32".into(),
        },
        history,
    }
}

#[test]
fn bytes_round_trip_like_the_file() {
    let mut rng = rand::thread_rng();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resume.safetensors");
    let values: Vec<f32> = (0..6).map(|_| rng.gen()).collect();
    let w = Tensor::from_vec(values.clone(), (2, 3), &Device::Cpu).unwrap();
    let m = Tensor::from_vec(values.iter().map(|v| -v).collect::<Vec<_>>(), (2, 3), &Device::Cpu).unwrap();
    let want = state(rng.gen_range(1..5), &mut rng);
    save_resume(
        &path,
        &[("fc.weight".into(), w)],
        &[("m.fc.weight".into(), m)],
        &[],
        &want,
    )
    .unwrap();

    let bytes = std::fs::read(&path).unwrap();
    for point in [resume_from_bytes(&bytes).unwrap(), load_resume(&path).unwrap()] {
        assert_eq!(point.state, want);
        let got: HashMap<_, _> = point
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        let neg: Vec<f32> = values.iter().map(|v| -v).collect();
        assert_eq!(
            got,
            HashMap::from([("fc.weight".into(), values.clone()), ("optim.m.fc.weight".into(), neg)])
        );
    }
}

/// The error of a refused load (`ResumePoint` is not `Debug`, so no `expect_err`).
fn refused(r: anyhow::Result<train::checkpoint::ResumePoint>) -> anyhow::Error {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    }
}

#[test]
fn bytes_errors_are_clear_and_the_file_error_names_the_file() {
    let msg = |b: &[u8]| format!("{:#}", refused(resume_from_bytes(b)));
    assert!(msg(b"").contains("not a valid safetensors file"), "{}", msg(b""));
    assert!(msg(&[0xff; 16]).contains("not a valid safetensors file"));

    // A valid safetensors file without the state: the error says so.
    let t = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    let plain = safetensors::serialize([("a", &t)], None).unwrap();
    assert!(msg(&plain).contains("no training state"), "{}", msg(&plain));
    let bad_json =
        safetensors::serialize([("a", &t)], Some(HashMap::from([("train_state".into(), "{".into())]))).unwrap();
    assert!(
        msg(&bad_json).contains("parsing the training state"),
        "{}",
        msg(&bad_json)
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resume.safetensors");
    std::fs::write(&path, &plain).unwrap();
    let err = format!("{:#}", refused(load_resume(&path)));
    assert!(
        err.contains(&path.display().to_string()) && err.contains("no training state"),
        "{err}"
    );
}
