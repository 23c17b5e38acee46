//! The interop formats against fixtures made by the real implementations (transformers 5.25.0,
//! gguf 0.19.0: see tests/fixtures/interop/make_fixtures.py and versions.txt), and round trips of
//! whole files through `convert import-hf`, `export-hf` and `export-gguf`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bitlinear::interop::gguf::{GgmlType, Gguf};
use bitlinear::interop::hf_bitnet::{pack_hf, scale_from_hf, ternary_from_floats, unpack_hf, ScaleConvention};
use bitlinear::interop::{tq1_0, tq2_0};
use bitlinear::{ActScaling, PackedBitLinear, PackedTernary};
use candle_core::{Device, Module, Tensor};
use convert::raw::{self, RawTensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

/// A fixture's tensors as stored (candle does not read int8 tensors).
fn load_raw(name: &str) -> HashMap<String, RawTensor> {
    let path = fixtures().join(name);
    raw::parse(&std::fs::read(&path).unwrap(), &path)
        .unwrap()
        .0
        .into_iter()
        .collect()
}

fn i8s(t: &RawTensor) -> Vec<i8> {
    assert_eq!(t.dtype, safetensors::Dtype::I8);
    t.data.iter().map(|&b| b as i8).collect()
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_convert")).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn hf_packing_matches_transformers_pack_weights() {
    let t = load_raw("hf_pack.safetensors");
    let cases = t.keys().filter(|k| k.starts_with("values.")).count();
    assert_eq!(cases, 7);
    for i in 0..cases {
        let v = &t[&format!("values.{i}")];
        let &[n, k] = v.shape.as_slice() else {
            panic!("{:?}", v.shape)
        };
        let packed = t[&format!("packed.{i}")].data.clone();
        let values = i8s(v);
        assert_eq!(pack_hf(&values, n, k).unwrap(), packed, "case {i} ({n}, {k})");
        assert_eq!(unpack_hf(&packed, n, k).unwrap(), values, "case {i}");
    }
}

/// The largest |a - b| relative to max |b|.
fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}

/// Output tolerance against transformers, relative to the largest output. Both sides compute
/// the same integer product; they differ in float order: transformers quantizes activations as
/// `round(x · (127 / max|x|))` and outputs `acc / (x_scale · weight_scale)`, we use
/// `round(x / (max|x| / 127))` and `(acc · s_x) · s_w`. That is a few f32 roundings (~1e-7
/// relative). An activation landing on the other side of a rounding boundary would move one
/// output by `s_x · s_w`, i.e. by `1 / max|acc|` of the largest output, at least
/// `1 / (127 · K)` = 1.2e-4 for K = 64: 1e-5 allows the roundings and catches any such flip or
/// any wrong code. Measured: 1.5e-7 (BitLinear), 7.3e-8 (AutoBitLinear).
const TOLERANCE: f32 = 1e-5;

#[test]
fn imported_hf_layer_matches_transformers_bitlinear() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.packed.safetensors");
    let model_dir = fixtures().join("tiny-bitnet");
    let (ok, text) = run(&["import-hf", "--input", s(&model_dir), "--out", s(&out)]);
    assert!(ok, "{text}");
    assert!(text.contains("14 BitLinear layers"), "{text}");
    let model = raw::read_packed(&out).unwrap();
    assert_eq!(model.metadata["model"], "BitNetForCausalLM");
    let kept: serde_json::Value = serde_json::from_str(&model.metadata["model_config"]).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(kept, config);

    let (_, io_meta) = raw::parse(
        &std::fs::read(fixtures().join("bitlinear_io.safetensors")).unwrap(),
        &out,
    )
    .unwrap();
    let io = load("bitlinear_io.safetensors");
    let layer = &io_meta["layer"];
    let (_, w) = model.layers.iter().find(|(n, _)| n == layer).unwrap();
    let fc = PackedBitLinear::new(w.clone(), None, None, ActScaling::PerToken).unwrap();
    let y = fc.forward(&io["x"]).unwrap();
    assert_eq!(y.dims(), io["y"].dims());
    let d = max_rel_diff(&y, &io["y"]);
    println!("max |ours - transformers| / max |transformers| = {d:e}");
    assert!(d <= TOLERANCE, "{d}");
}

#[test]
fn autobitlinear_weight_matches_transformers() {
    let t = load("autobitlinear_io.safetensors");
    let (n, k) = t["weight"].dims2().unwrap();
    let values = ternary_from_floats(&t["weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap();
    let ws = t["weight_scale"].to_vec1::<f32>().unwrap()[0];
    let s_w = scale_from_hf(ws, ScaleConvention::Multiply).unwrap();
    let bytes = Tensor::from_vec(
        bitlinear::pack_ternary(&values, n, k).unwrap(),
        (n, k.div_ceil(4)),
        &Device::Cpu,
    )
    .unwrap();
    let w = PackedTernary::from_parts(bytes, s_w, k).unwrap();
    let fc = PackedBitLinear::new(w, None, None, ActScaling::PerToken).unwrap();
    let d = max_rel_diff(&fc.forward(&t["x"]).unwrap(), &t["y"]);
    println!("AutoBitLinear: max rel diff {d:e}");
    assert!(d <= TOLERANCE, "{d}");
}

#[test]
fn gguf_package_file_imports_exactly() {
    let bytes = std::fs::read(fixtures().join("tq.gguf")).unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.version, 3);
    let expected = load_raw("tq_expected.safetensors");
    for name in ["tq2.a", "tq2.b", "tq2.zeros", "tq1.a", "tq1.b"] {
        let p = convert::gguf_file::import_layer(&g, &bytes, name).unwrap();
        let want = i8s(&expected[&format!("{name}.values")]);
        assert_eq!(p.unpack().unwrap(), want, "{name}");
        let scale = expected[&format!("{name}.scale")].to_f32().unwrap()[0];
        // The file holds only the f16 block scales.
        assert_eq!(p.scale(), half::f16::from_f32(scale).to_f32(), "{name}");
        let t = g.tensor(name).unwrap();
        let data = g.data(&bytes, t).unwrap();
        let again = match GgmlType::from_id(t.type_id).unwrap() {
            GgmlType::TQ2_0 => tq2_0::encode(&p).unwrap(),
            _ => tq1_0::encode(&p).unwrap(),
        };
        if name == "tq2.zeros" {
            // The gguf quantizer gave the all-zero block (row 1, block 1) scale 0; we write s_w.
            let zero_block = 3 * tq2_0::BLOCK_BYTES;
            assert_eq!(&data[zero_block + 64..zero_block + 66], &[0, 0]);
            assert_eq!(again[..zero_block + 64], data[..zero_block + 64]);
        } else {
            assert_eq!(again, data, "{name}: re-encoding differs from the gguf package's bytes");
        }
    }
    let norm = g.tensor("norm.weight").unwrap();
    let got: Vec<f32> = g
        .data(&bytes, norm)
        .unwrap()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got, expected["norm.weight"].to_f32().unwrap());
}

/// A packed file of layers with awkward sizes (N, K not multiples of 4 or 256) and a bf16 tensor.
fn awkward_packed_file(path: &Path) -> Vec<(String, PackedTernary)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let mut tensors = vec![];
    let mut meta = raw::packed_metadata("Toy", "{}");
    let mut layers = vec![];
    for (i, (n, k)) in [(5usize, 300usize), (4, 7), (1, 256), (13, 513)]
        .into_iter()
        .enumerate()
    {
        let v: Vec<i8> = (0..n * k).map(|_| rng.gen_range(-1..=1)).collect();
        let bytes = bitlinear::pack_ternary(&v, n, k).unwrap();
        // Layer 0's scale has no f32 whose reciprocal is it exactly: export-hf's metadata keeps it.
        let scale = if i == 0 {
            f32::from_bits(0x3ffe_b853)
        } else {
            rng.gen_range(0.001f32..3.0)
        };
        let name = format!("l{i}");
        tensors.push((
            format!("{name}.weight.packed"),
            RawTensor::u8(vec![n, k.div_ceil(4)], bytes.clone()),
        ));
        tensors.push((format!("{name}.weight.scale"), RawTensor::f32(vec![1], &[scale])));
        meta.insert(format!("{name}.in_features"), k.to_string());
        let t = Tensor::from_vec(bytes, (n, k.div_ceil(4)), &Device::Cpu).unwrap();
        layers.push((name, PackedTernary::from_parts(t, scale, k).unwrap()));
    }
    let norm: Vec<u8> = (0..6)
        .flat_map(|i| half::bf16::from_f32(i as f32 * 0.7).to_le_bytes())
        .collect();
    tensors.push((
        "norm".into(),
        RawTensor {
            dtype: safetensors::Dtype::BF16,
            shape: vec![2, 3],
            data: norm,
        },
    ));
    raw::write(path, &tensors, meta).unwrap();
    layers
}

fn same(a: &[(String, PackedTernary)], b: &[(String, PackedTernary)]) {
    assert_eq!(a.len(), b.len());
    for ((na, pa), (nb, pb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert_eq!(pa.in_features(), pb.in_features(), "{na}");
        assert_eq!(pa.scale().to_bits(), pb.scale().to_bits(), "{na}");
        assert_eq!(
            pa.bytes().to_vec2::<u8>().unwrap(),
            pb.bytes().to_vec2::<u8>().unwrap(),
            "{na}"
        );
    }
}

#[test]
fn files_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let layers = awkward_packed_file(&p("a.safetensors"));
    let original = raw::read_packed(&p("a.safetensors")).unwrap();
    same(&layers, &original.layers);
    for class in ["bitlinear", "autobitlinear"] {
        let hf = p(&format!("hf-{class}"));
        let (ok, text) = run(&[
            "export-hf",
            "--packed",
            s(&p("a.safetensors")),
            "--out",
            s(&hf),
            "--linear-class",
            class,
        ]);
        assert!(ok, "{text}");
        let back = p(&format!("back-{class}.safetensors"));
        let input = hf.join("model.safetensors");
        let (ok, text) = run(&[
            "import-hf",
            "--input",
            s(&input),
            "--out",
            s(&back),
            "--linear-class",
            class,
        ]);
        assert!(ok, "{text}");
        let m = raw::read_packed(&back).unwrap();
        same(&layers, &m.layers);
        assert_eq!(m.others, original.others);
    }
    for ty in ["tq2-0", "tq1-0"] {
        let out = p(&format!("m-{ty}.gguf"));
        let (ok, text) = run(&[
            "export-gguf",
            "--packed",
            s(&p("a.safetensors")),
            "--out",
            s(&out),
            "--type",
            ty,
        ]);
        assert!(ok, "{text}");
        let bytes = std::fs::read(&out).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let back: Vec<_> = layers
            .iter()
            .map(|(n, _)| {
                (
                    n.clone(),
                    convert::gguf_file::import_layer(&g, &bytes, &format!("{n}.weight")).unwrap(),
                )
            })
            .collect();
        same(&layers, &back);
        let norm = g.tensor("norm").unwrap();
        assert_eq!((norm.dims.clone(), norm.type_id), (vec![3, 2], GgmlType::BF16.id()));
        assert_eq!(g.data(&bytes, norm).unwrap(), &original.others[0].1.data[..]);
        // And the whole file back: the same layers and tensors.
        let back = p(&format!("back-{ty}.safetensors"));
        let (ok, text) = run(&["import-gguf", "--input", s(&out), "--out", s(&back)]);
        assert!(ok, "{text}");
        let m = raw::read_packed(&back).unwrap();
        same(&layers, &m.layers);
        assert_eq!(m.others, original.others);
        assert_eq!(m.metadata["model"], "Toy");
    }
}

#[test]
fn hf_model_round_trips_to_the_same_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = fixtures().join("tiny-bitnet");
    let packed = dir.path().join("p.safetensors");
    assert!(run(&["import-hf", "--input", s(&model_dir), "--out", s(&packed)]).0);
    let hf = dir.path().join("hf");
    assert!(run(&["export-hf", "--packed", s(&packed), "--out", s(&hf)]).0);
    let (a, _) = raw::parse(&std::fs::read(model_dir.join("model.safetensors")).unwrap(), &hf).unwrap();
    let (b, _) = raw::parse(&std::fs::read(hf.join("model.safetensors")).unwrap(), &hf).unwrap();
    // Every tensor, packed weights and weight_scale included, is bit-identical to
    // transformers' own save_pretrained output.
    assert_eq!(a, b);
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    let o: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(c, o);
}

#[test]
fn inspect_understands_gguf_and_hf() {
    let (ok, text) = run(&["inspect", s(&fixtures().join("tq.gguf"))]);
    assert!(ok, "{text}");
    assert!(text.contains("format: GGUF v3"), "{text}");
    assert!(
        text.contains("TQ1_0") && text.contains("(5, 512) scale 0.375"),
        "{text}"
    );
    let (ok, text) = run(&["inspect", s(&fixtures().join("tiny-bitnet"))]);
    assert!(ok, "{text}");
    assert!(text.contains("model_type \"bitnet\""), "{text}");
    assert!(
        text.contains("model.layers.0.self_attn.q_proj: packed (64, 64)"),
        "{text}"
    );
}

#[test]
fn sharded_model_directory_imports_like_the_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = fixtures().join("tiny-bitnet");
    let file = model_dir.join("model.safetensors");
    let (tensors, _) = raw::parse(&std::fs::read(&file).unwrap(), &file).unwrap();
    // Split the tensors over two shards (a layer's weight and weight_scale may land apart).
    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::copy(model_dir.join("config.json"), sharded.join("config.json")).unwrap();
    let mut map = serde_json::Map::new();
    let mut shards = [vec![], vec![]];
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        let shard = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        map.insert(name.clone(), shard.into());
        shards[i % 2].push((name, t));
    }
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        raw::write(&sharded.join(name), shard, HashMap::new()).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    assert!(run(&["import-hf", "--input", s(&model_dir), "--out", s(&a)]).0);
    let (ok, text) = run(&["import-hf", "--input", s(&sharded), "--out", s(&b)]);
    assert!(ok, "{text}");
    let (ma, mb) = (raw::read_packed(&a).unwrap(), raw::read_packed(&b).unwrap());
    same(&ma.layers, &mb.layers);
    assert_eq!(ma.others, mb.others);
    let (ok, text) = run(&["inspect", s(&sharded)]);
    assert!(ok, "{text}");
    assert!(
        text.contains("model-00001-of-00002") && text.contains("model-00002-of-00002"),
        "{text}"
    );
}
