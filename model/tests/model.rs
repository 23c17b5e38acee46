use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use model::{max_pool2x2, max_pool2x2_ops, FcKind, SimpleBitCnn, SimpleBitCnnConfig};

fn build(cfg: SimpleBitCnnConfig) -> (VarMap, SimpleBitCnn) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = SimpleBitCnn::new(cfg, vb).unwrap();
    (vm, m)
}

fn names_and_shapes(vm: &VarMap) -> Vec<(String, Vec<usize>)> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<_> = data.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    v.sort();
    v
}

#[test]
fn variable_names_and_shapes_are_stable() {
    let (vm, _) = build(SimpleBitCnnConfig::bitlinear());
    let expect: Vec<(String, Vec<usize>)> = [
        ("conv1.bias", vec![32]),
        ("conv1.weight", vec![32, 3, 3, 3]),
        ("conv2.bias", vec![64]),
        ("conv2.weight", vec![64, 32, 3, 3]),
        ("fc1.bias", vec![512]),
        ("fc1.norm.weight", vec![4096]),
        ("fc1.weight", vec![512, 4096]),
        ("fc2.bias", vec![10]),
        ("fc2.norm.weight", vec![512]),
        ("fc2.weight", vec![10, 512]),
    ]
    .into_iter()
    .map(|(k, s)| (k.to_string(), s))
    .collect();
    assert_eq!(names_and_shapes(&vm), expect);
}

#[test]
fn plain_linear_layers_have_no_norm() {
    let cfg = SimpleBitCnnConfig {
        fc1: FcKind::Linear,
        fc2: FcKind::BitLinear,
    };
    let (vm, m) = build(cfg);
    let names: Vec<String> = names_and_shapes(&vm).into_iter().map(|(k, _)| k).collect();
    assert!(!names.contains(&"fc1.norm.weight".to_string()));
    assert!(names.contains(&"fc2.norm.weight".to_string()));
    assert_eq!(m.config(), cfg);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    assert_eq!(m.forward(&x).unwrap().dims(), &[2, 10]);
}

#[test]
fn forward_gives_logits_and_gradients_reach_every_variable() {
    let (vm, m) = build(SimpleBitCnnConfig::bitlinear());
    let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let y = m.forward(&x).unwrap();
    assert_eq!(y.dims(), &[4, 10]);
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for v in vm.all_vars() {
        let g = grads.get(v.as_tensor()).expect("gradient for every variable");
        let norm = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm.is_finite() && norm > 0.0, "zero or non-finite gradient");
    }
}

#[test]
fn packed_form_predicts_identically() {
    for cfg in [SimpleBitCnnConfig::bitlinear(), SimpleBitCnnConfig::full_precision()] {
        let (_vm, m) = build(cfg);
        let packed = m.to_packed().unwrap();
        let x = Tensor::randn(0f32, 1.0, (16, 3, 32, 32), &Device::Cpu).unwrap();
        let a = m.forward(&x).unwrap();
        let b = packed.forward(&x).unwrap();
        let pa: Vec<u32> = a.argmax(1).unwrap().to_vec1().unwrap();
        let pb: Vec<u32> = b.argmax(1).unwrap().to_vec1().unwrap();
        assert_eq!(pa, pb);
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{cfg:?}: packed logits differ by {diff}");
    }
}

#[test]
fn bad_input_shape_is_an_error() {
    let (_vm, m) = build(SimpleBitCnnConfig::bitlinear());
    let x = Tensor::zeros((2, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let err = m.forward(&x).unwrap_err().to_string();
    assert!(err.contains("(batch, 3, 32, 32)"), "{err}");
    let x = Tensor::zeros((3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(m.forward(&x).is_err());
    let x = Tensor::zeros((1, 3, 32, 32), DType::U8, &Device::Cpu).unwrap();
    assert!(m.forward(&x).unwrap_err().to_string().contains("float"));
}

#[test]
fn max_pool2x2_matches_candle_values_and_gradients() {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1.0, (3, 5, 8, 6), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (3, 5, 4, 3), &dev).unwrap();
    let ours = max_pool2x2(x.as_tensor()).unwrap();
    let theirs = x.as_tensor().max_pool2d(2).unwrap();
    let ours_bf16 = max_pool2x2(&x.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
    assert_eq!(ours_bf16.dims(), &[3, 5, 4, 3]);
    let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
    let ga = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let ga: Vec<f32> = ga.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    // Expected: each window's output gradient (w) lands on the window's maximum, nowhere else.
    // (candle 0.11's own max_pool2d backward scales it by 1/4; see the pool module docs.)
    let xv: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let mut expect = vec![0f32; xv.len()];
    for plane in 0..15 {
        for i in 0..4 {
            for j in 0..3 {
                let idx = [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(a, b)| plane * 48 + (2 * i + a) * 6 + 2 * j + b);
                let best = *idx
                    .iter()
                    .max_by(|p, q| xv[**p].partial_cmp(&xv[**q]).unwrap())
                    .unwrap();
                expect[best] = wv[plane * 12 + i * 3 + j];
            }
        }
    }
    assert_eq!(ga, expect);

    // The device-generic version agrees on values and gradients.
    let ops = max_pool2x2_ops(x.as_tensor()).unwrap();
    let c: Vec<f32> = ops.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(c, a);
    let gc = (ops * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gc: Vec<f32> = gc.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(gc, expect);
}

#[test]
fn max_pool2x2_half_dtypes_match_f32() {
    // Values exact in bf16 and f16 (quarters of small integers, ties included): the fused
    // kernel in each dtype picks the same maxima and routes the same gradients as in f32.
    use rand::Rng;
    let dev = Device::Cpu;
    let mut rng = rand::thread_rng();
    let mut quarters = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-40i32..40) as f32 / 4.0).collect() };
    let x = Var::from_vec(quarters(2 * 3 * 6 * 10), (2, 3, 6, 10), &dev).unwrap();
    let w = Tensor::from_vec(quarters(2 * 3 * 3 * 5), (2, 3, 3, 5), &dev).unwrap();
    let y = max_pool2x2(x.as_tensor()).unwrap();
    let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let want_y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let want_g: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for dt in [DType::BF16, DType::F16] {
        let xh = Var::from_tensor(&x.as_tensor().to_dtype(dt).unwrap()).unwrap();
        let yh = max_pool2x2(xh.as_tensor()).unwrap();
        assert_eq!(yh.dtype(), dt);
        let gh = (&yh * w.to_dtype(dt).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let f32s = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(f32s(&yh), want_y, "{dt:?}");
        assert_eq!(f32s(gh.get(&xh).unwrap()), want_g, "{dt:?}");
    }
}

#[test]
fn max_pool2x2_ties_go_to_the_first_maximum() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::ones((1, 1, 2, 2), DType::F32, &dev).unwrap()).unwrap();
    let y = max_pool2x2(x.as_tensor()).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let g: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(g, vec![1.0, 0.0, 0.0, 0.0]);
}

#[test]
fn fc_kind_parses() {
    assert_eq!("linear".parse::<FcKind>().unwrap(), FcKind::Linear);
    assert_eq!("bitlinear".parse::<FcKind>().unwrap(), FcKind::BitLinear);
    assert!("conv".parse::<FcKind>().unwrap_err().contains("bitlinear"));
}

#[test]
fn compute_options_change_neither_variables_nor_outputs() {
    use model::{ComputeOptions, PoolKernel};
    let (vm, m) = build(SimpleBitCnnConfig::bitlinear());
    let options = ComputeOptions {
        check_finite: false,
        pool: PoolKernel::TensorOps,
        fused_norm_gelu: false,
        bf16_conv_grads: true,
    };
    assert!(!options.bit_linear().check_finite);
    let vm2 = VarMap::new();
    let m2 = SimpleBitCnn::with_options(
        SimpleBitCnnConfig::bitlinear(),
        options,
        VarBuilder::from_varmap(&vm2, DType::F32, &Device::Cpu),
    )
    .unwrap();
    assert_eq!(m2.options(), options);
    assert_eq!(m.options(), ComputeOptions::default());
    assert_eq!(names_and_shapes(&vm2), names_and_shapes(&vm));
    // Same weights in both.
    for (name, var) in vm2.data().lock().unwrap().iter() {
        var.set(vm.data().lock().unwrap()[name].as_tensor()).unwrap();
    }
    let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let (a, b) = (m.forward(&x).unwrap(), m2.forward(&x).unwrap());
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    let p = m2.to_packed().unwrap().forward(&x).unwrap();
    assert_eq!(p.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
}
