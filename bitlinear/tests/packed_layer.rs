//! `PackedBitLinear` storage: `tensors` then `load` round-trips; bad tensors are clear errors.
use std::collections::HashMap;

use bitlinear::{bit_linear_with_config, ActScaling, BitLinearConfig, PackedBitLinear};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};

fn packed(k: usize, n: usize, config: BitLinearConfig) -> PackedBitLinear {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let l = bit_linear_with_config(k, n, config, vb).unwrap();
    // Non-trivial gains and biases, so that mixing them up would show.
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if !name.ends_with("weight") || name.ends_with("norm.weight") {
            var.set(&Tensor::rand(0.5f32, 1.5, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    l.to_packed().unwrap()
}

fn stored(p: &PackedBitLinear, prefix: &str) -> HashMap<String, Tensor> {
    p.tensors()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (format!("{prefix}.{k}"), t))
        .collect()
}

fn load(
    ts: HashMap<String, Tensor>,
    k: usize,
    n: usize,
    config: BitLinearConfig,
) -> candle_core::Result<PackedBitLinear> {
    let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
    PackedBitLinear::load(k, n, config, vb.pp("layer.fc"))
}

fn outputs(l: &PackedBitLinear, k: usize) -> Vec<f32> {
    let x = Tensor::arange(0f32, (3 * k) as f32, &Device::Cpu)
        .unwrap()
        .reshape((3, k))
        .unwrap()
        .cos()
        .unwrap();
    l.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn tensors_then_load_is_the_same_layer() {
    let (k, n) = (37, 6);
    for (bias, rms_norm) in [(true, true), (false, true), (true, false), (false, false)] {
        let config = BitLinearConfig {
            bias,
            rms_norm,
            ..Default::default()
        };
        let p = packed(k, n, config);
        let names: Vec<String> = p.tensors().unwrap().into_iter().map(|(k, _)| k).collect();
        let mut want = vec!["weight.packed", "weight.scale"];
        want.extend(bias.then_some("bias"));
        want.extend(rms_norm.then_some("norm.weight"));
        assert_eq!(names, want);
        let ts = stored(&p, "layer.fc");
        assert_eq!(ts["layer.fc.weight.packed"].dtype(), DType::U8);
        assert_eq!(ts["layer.fc.weight.packed"].dims(), &[n, 10]);
        assert_eq!(
            ts["layer.fc.weight.scale"].to_vec1::<f32>().unwrap(),
            [p.weight().scale()]
        );
        let q = load(ts, k, n, config).unwrap();
        assert_eq!(q.weight().unpack().unwrap(), p.weight().unpack().unwrap());
        assert_eq!(q.act_scaling(), ActScaling::PerToken);
        assert_eq!(outputs(&q, k), outputs(&p, k), "bias {bias} norm {rms_norm}");
    }
}

#[test]
fn bad_tensors_are_errors_naming_them() {
    let (k, n) = (9, 4);
    let config = BitLinearConfig::default();
    let good = stored(&packed(k, n, config), "layer.fc");
    let err = |edit: &dyn Fn(&mut HashMap<String, Tensor>)| {
        let mut ts = good.clone();
        edit(&mut ts);
        load(ts, k, n, config).unwrap_err().to_string()
    };
    let cpu = &Device::Cpu;

    let e = err(&|ts| drop(ts.remove("layer.fc.norm.weight")));
    assert!(e.contains("tensor \"layer.fc.norm.weight\" is missing"), "{e}");
    let e = err(&|ts| drop(ts.insert("layer.fc.bias".into(), Tensor::zeros(3, DType::F32, cpu).unwrap())));
    assert!(
        e.contains("tensor \"layer.fc.bias\" has shape [3], expected [4]"),
        "{e}"
    );
    // Packed for another K: the byte count per row differs.
    let e = err(&|ts| {
        drop(ts.insert(
            "layer.fc.weight.packed".into(),
            Tensor::zeros((4, 2), DType::U8, cpu).unwrap(),
        ))
    });
    assert!(
        e.contains("\"layer.fc.weight.packed\" has shape [4, 2], expected [4, 3]"),
        "{e}"
    );
    // A code 3 anywhere.
    let e = err(&|ts| {
        let mut b = ts["layer.fc.weight.packed"]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        b[5] |= 0b11 << 2;
        ts.insert(
            "layer.fc.weight.packed".into(),
            Tensor::from_vec(b, (4, 3), cpu).unwrap(),
        );
    });
    assert!(e.contains("layer.fc.weight.packed") && e.contains("code 3"), "{e}");
    // Not bytes: floats that a cast would truncate into valid-looking codes.
    let e = err(&|ts| {
        let f = (ts["layer.fc.weight.packed"].to_dtype(DType::F32).unwrap() + 0.25).unwrap();
        ts.insert("layer.fc.weight.packed".into(), f);
    });
    assert!(e.contains("must hold bytes"), "{e}");
    for bad in [f32::NAN, f32::INFINITY, 0.0, -1.0] {
        let e = err(&|ts| drop(ts.insert("layer.fc.weight.scale".into(), Tensor::new(&[bad], cpu).unwrap())));
        assert!(e.contains("scale must be finite and positive"), "{bad}: {e}");
    }
    let e = err(&|ts| drop(ts.insert("layer.fc.weight.scale".into(), Tensor::new(&[1f32, 2.], cpu).unwrap())));
    assert!(
        e.contains("\"layer.fc.weight.scale\" has shape [2], expected [1]"),
        "{e}"
    );
}

#[test]
fn a_layer_without_bias_ignores_a_stored_one_and_needs_none() {
    let (k, n) = (8, 2);
    let with = BitLinearConfig::default();
    let without = BitLinearConfig { bias: false, ..with };
    let p = packed(k, n, with);
    let q = load(stored(&p, "layer.fc"), k, n, without).unwrap();
    assert!(q.bias().is_none() && q.norm_gain().is_some());
    assert!(load(stored(&q, "layer.fc"), k, n, with).is_err());
}
