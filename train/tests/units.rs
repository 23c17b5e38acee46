use candle_core::{Device, Tensor, Var};
use train::optim::{AdamW, AdamWConfig, Schedule};

/// Three AdamW steps on f(p) = sum(c * p) against the formulas evaluated in f64.
#[test]
fn adamw_matches_the_formula() {
    let dev = Device::Cpu;
    let p0 = [0.5f32, -1.0, 2.0];
    let c = [0.3f32, -2.0, 0.01];
    let var = Var::from_tensor(&Tensor::new(&p0, &dev).unwrap()).unwrap();
    let cfg = AdamWConfig {
        lr: 0.1,
        weight_decay: 0.05,
        ..Default::default()
    };
    let mut opt = AdamW::new([("p".to_string(), var.clone())], cfg).unwrap();
    let ct = Tensor::new(&c, &dev).unwrap();
    let mut p: Vec<f64> = p0.iter().map(|&v| v as f64).collect();
    let (mut m, mut v) = (vec![0f64; 3], vec![0f64; 3]);
    for t in 1..=3 {
        let loss = (var.as_tensor() * &ct).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        for i in 0..3 {
            let g = c[i] as f64;
            p[i] *= 1.0 - 0.1 * 0.05;
            m[i] = 0.9 * m[i] + 0.1 * g;
            v[i] = 0.999 * v[i] + 0.001 * g * g;
            let mh = m[i] / (1.0 - 0.9f64.powi(t));
            let vh = v[i] / (1.0 - 0.999f64.powi(t));
            p[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
        }
    }
    assert_eq!(opt.step_count(), 3);
    let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
    for i in 0..3 {
        assert!((got[i] as f64 - p[i]).abs() < 1e-5, "{got:?} vs {p:?}");
    }
}

#[test]
fn optimizer_state_round_trips() {
    let dev = Device::Cpu;
    let mk = || Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
    let (a, b) = (mk(), mk());
    let mut oa = AdamW::new([("w".to_string(), a.clone())], AdamWConfig::default()).unwrap();
    let mut ob = AdamW::new([("w".to_string(), b.clone())], AdamWConfig::default()).unwrap();
    let step = |o: &mut AdamW, x: &Var| {
        let l = x.as_tensor().sqr().unwrap().sum_all().unwrap();
        o.step(&l.backward().unwrap()).unwrap();
    };
    step(&mut oa, &a);
    let saved = oa.state_tensors();
    b.set(a.as_tensor()).unwrap();
    ob.load_state(oa.step_count(), |k| {
        saved.iter().find(|(n, _)| n == k).map(|(_, t)| t.copy().unwrap())
    })
    .unwrap();
    step(&mut oa, &a);
    step(&mut ob, &b);
    let va: Vec<f32> = a.as_tensor().to_vec1().unwrap();
    let vb: Vec<f32> = b.as_tensor().to_vec1().unwrap();
    assert_eq!(va, vb);
    assert!(ob.load_state(1, |_| None).is_err());
}

#[test]
fn cosine_schedule() {
    let s = Schedule::Cosine;
    assert_eq!(s.lr(1.0, 0, 100), 1.0);
    assert!((s.lr(1.0, 50, 100) - 0.5).abs() < 1e-12);
    assert!(s.lr(1.0, 100, 100).abs() < 1e-12);
    assert_eq!(Schedule::Constant.lr(0.3, 77, 100), 0.3);
}

#[test]
fn warmup_linear_schedule() {
    let s = Schedule::WarmupLinear;
    // 100 steps: 20 rising to the base rate, then 80 falling to 0.
    assert!((s.lr(2.0, 0, 100) - 0.1).abs() < 1e-12);
    assert!((s.lr(2.0, 9, 100) - 1.0).abs() < 1e-12);
    assert!((s.lr(2.0, 19, 100) - 2.0).abs() < 1e-12);
    assert!((s.lr(2.0, 20, 100) - 2.0).abs() < 1e-12);
    assert!((s.lr(2.0, 60, 100) - 1.0).abs() < 1e-12);
    assert!((s.lr(2.0, 99, 100) - 2.0 / 80.0).abs() < 1e-12);
    assert_eq!(s.lr(2.0, 100, 100), 0.0);
    // Tiny runs stay finite and positive until the end.
    for total in 1..5 {
        for step in 0..total {
            let lr = s.lr(1.0, step, total);
            assert!(lr > 0.0 && lr <= 1.0, "step {step} of {total}: {lr}");
        }
    }
}

#[test]
fn plot_is_a_png_of_the_expected_size() {
    use train::metrics::EpochMetrics;
    let dir = tempfile::tempdir().unwrap();
    let history: Vec<EpochMetrics> = (1..=3)
        .map(|e| EpochMetrics {
            epoch: e,
            lr: 1e-3,
            train_loss: 2.0 / e as f64,
            train_acc: 0.2 * e as f64,
            test_loss: 2.1 / e as f64,
            test_acc: 0.18 * e as f64,
            epoch_seconds: 1.0,
            train_seconds: 0.9,
            images_per_sec: 100.0,
        })
        .collect();
    let p = dir.path().join("plot.png");
    train::plot::plot_history(&p, &history).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR: width and height, big endian.
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 1200);
    assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 480);
    let csv = train::metrics::to_csv(&history);
    assert_eq!(csv.lines().count(), 4);
    assert!(csv.starts_with("epoch,lr,train_loss,train_acc,test_loss,test_acc"));
    assert_eq!(train::metrics::steady_images_per_sec(&history), 100.0);
}

#[test]
fn cuda_tuning_leaves_the_cpu_model_alone() {
    use candle_core::Device;
    use model::ComputeOptions;
    use train::tuning::CudaTuning;
    let on = CudaTuning::default();
    assert!(
        on.fused_adamw
            && on.fused_augment
            && on.disable_event_tracking
            && on.deferred_finite_check
            && on.fused_pool
            && on.fused_norm_gelu
    );
    let off = CudaTuning::baseline();
    assert_ne!(on, off);
    for t in [on, off] {
        assert_eq!(t.compute_options(&Device::Cpu), ComputeOptions::default());
    }
    // The trainer's configuration carries the default tuning; the binary has no flag for it.
    let args = <train::cli::Args as clap::Parser>::parse_from(["train"]);
    assert_eq!(args.cuda, on);
}

#[test]
fn seeded_init_sets_batch_norms_like_pytorch() {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    let vm = VarMap::new();
    let cfg = model::TernarySpeedrunConfig {
        widths: [4, 8, 8, 16],
        stem: model::StemKind::Ternary,
        channel_codes: false,
    };
    model::TernarySpeedrun::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    train::init::seeded_init(&vm, 3).unwrap();
    let vars = train::init::sorted_vars(&vm);
    let values = |name: &str| -> Vec<f32> {
        let (_, v) = vars.iter().find(|(k, _)| k == name).unwrap();
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    };
    assert_eq!(values("block2.norm1.bias"), vec![0.0; 8]);
    assert_eq!(values("block2.norm1.running_mean"), vec![0.0; 8]);
    assert_eq!(values("block2.norm1.running_var"), vec![1.0; 8]);
    assert_eq!(values("head.norm.weight"), vec![1.0; 8 * 2]);
    // Convolution kernels: uniform within 1/sqrt(fan_in), fan_in = 8 * 3 * 3 for block2.conv2.
    let w = values("block2.conv2.weight");
    let bound = 1.0 / (72f32).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound) && w.iter().any(|v| v.abs() > bound / 2.0));
    // The stem's bias follows its kernel's fan-in (27).
    let b = values("stem.bias");
    assert!(b.iter().all(|v| v.abs() <= 1.0 / 27f32.sqrt()) && b.iter().any(|v| *v != 0.0));
}

/// `--edge`, `--flip` and `--lookahead-every` override the recipe's; 0 turns lookahead off.
#[test]
fn flip_and_lookahead_options_override_the_recipe() {
    use train::augment::Flip;
    use train::lookahead::LookaheadConfig;
    let recipe = |args: &[&str]| {
        let all = ["train", "--model", "ternary-speedrun"].iter().chain(args);
        <train::cli::Args as clap::Parser>::parse_from(all).recipe()
    };
    let base = recipe(&[]);
    assert_eq!(base, train::recipe::Recipe::ternary_speedrun());
    assert_eq!(base.lookahead, Some(LookaheadConfig::EVERY_5));
    assert_eq!(
        train::recipe::Recipe::reference().lookahead,
        Some(LookaheadConfig::EVERY_5)
    );
    let r = recipe(&["--flip", "alternating", "--lookahead-every", "7"]);
    assert_eq!(r.flip, Flip::Alternating);
    assert_eq!(r.lookahead, Some(LookaheadConfig { every: 7 }));
    assert_eq!(r.epochs, base.epochs);
    let off = recipe(&["--flip", "random", "--lookahead-every", "0"]);
    assert_eq!((off.flip, off.lookahead), (Flip::Random, None));
    assert_eq!(base.edge, train::augment::Edge::Zeros);
    assert_eq!(recipe(&["--edge", "reflect"]).edge, train::augment::Edge::Reflect);
    let parse = |args: &[&str]| {
        let all = ["train"].iter().chain(args);
        <train::cli::Args as clap::Parser>::try_parse_from(all)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let negative = parse(&["--lookahead-every", "-1"]);
    assert!(
        negative.contains("--lookahead-every") && negative.contains("must be 0 or more, got -1"),
        "{negative}"
    );
    assert!(parse(&["--lookahead-every", "x"]).contains("expected a whole number, got \"x\""));
    assert!(parse(&["--edge", "sideways"]).contains("possible values: zeros, reflect"));
    assert!(parse(&["--flip", "sometimes"]).contains("possible values: random, alternating"));
}

/// Three SGD steps (a new learning rate each) on f(p) = sum(c * p) for an ordinary variable and
/// a batch-norm shift, against PyTorch's Nesterov rule evaluated in f64.
#[test]
fn sgd_matches_the_formula() {
    use train::sgd::{is_norm_shift, Sgd, SgdConfig, NORM_SHIFT_LR_SCALE};
    let dev = Device::Cpu;
    let p0 = [0.5f32, -1.0, 2.0];
    let c = [0.3f32, -2.0, 0.01];
    let lrs = [0.1, 0.05, 0.02];
    let names = ["block1.conv1.weight", "block1.norm2.bias"];
    let vars: Vec<Var> = names
        .iter()
        .map(|_| Var::from_tensor(&Tensor::new(&p0, &dev).unwrap()).unwrap())
        .collect();
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.85,
        weight_decay: 0.05,
    };
    let named = names.iter().map(|n| n.to_string()).zip(vars.iter().cloned());
    let mut opt = Sgd::new(named, cfg).unwrap();
    let ct = Tensor::new(&c, &dev).unwrap();
    for lr in lrs {
        opt.set_lr(lr);
        let loss = vars
            .iter()
            .map(|v| (v.as_tensor() * &ct).unwrap().sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
    }
    assert_eq!(opt.step_count(), 3);
    for (name, var) in names.iter().zip(&vars) {
        let scale = if is_norm_shift(name) { NORM_SHIFT_LR_SCALE } else { 1.0 };
        let mut p: Vec<f64> = p0.iter().map(|&v| v as f64).collect();
        let mut b = [0f64; 3];
        for (t, lr) in lrs.into_iter().enumerate() {
            for i in 0..3 {
                let d = c[i] as f64 + 0.05 / scale * p[i];
                // PyTorch starts the buffer at the first step's d.
                b[i] = if t == 0 { d } else { 0.85 * b[i] + d };
                p[i] -= lr * scale * (d + 0.85 * b[i]);
            }
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..3 {
            let tol = 1e-5 * p[i].abs().max(1.0);
            assert!((got[i] as f64 - p[i]).abs() < tol, "{name}: {got:?} vs {p:?}");
        }
    }
    assert!(is_norm_shift("norm.bias") && is_norm_shift("block3.norm1.bias"));
    assert!(!is_norm_shift("head.norm.weight") && !is_norm_shift("stem.bias") && !is_norm_shift("bias"));
    let bad = SgdConfig { momentum: 1.0, ..cfg };
    assert!(Sgd::new([("w".to_string(), vars[0].clone())], bad).is_err());
}

/// `--optimizer sgd` brings SGD's defaults (the learning rate scaled with the batch) unless
/// `--lr` / `--weight-decay` are given.
#[test]
fn optimizer_option_brings_its_defaults() {
    use train::optim::OptimizerKind;
    let recipe = |args: &[&str]| {
        let all = ["train", "--model", "ternary-speedrun"].iter().chain(args);
        <train::cli::Args as clap::Parser>::parse_from(all).recipe()
    };
    let sgd = recipe(&["--optimizer", "sgd", "--batch-size", "1000"]);
    assert_eq!(sgd.optimizer, OptimizerKind::Sgd);
    assert!((sgd.lr - 10.0 * 1000.0 / (1024.0 * (1.0 + 1.0 / 0.15))).abs() < 1e-12);
    assert_eq!(sgd.weight_decay, 1.5e-3);
    let set = recipe(&["--optimizer", "sgd", "--lr", "0.5", "--weight-decay", "0"]);
    assert_eq!((set.lr, set.weight_decay), (0.5, 0.0));
    let same = recipe(&["--optimizer", "adamw"]);
    assert_eq!(same, train::recipe::Recipe::ternary_speedrun());
}
