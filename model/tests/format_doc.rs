//! `docs/format-simple-bit-cnn.md` checked against the code, so it cannot go stale: its worked
//! example is recomputed (by a reference written from the document, and by the library), its
//! tensor and metadata tables are compared with a real exported file, and the reference forward
//! pass (`format_doc/reference.rs`, plain Rust from the document alone) runs real packed files to
//! the loader's logits.

#[path = "format_doc/reference.rs"]
mod reference;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use model::{PackedSimpleBitCnn, SimpleBitCnn, SimpleBitCnnConfig};
use rand::{Rng, SeedableRng};

const DOC: &str = include_str!("../../docs/format-simple-bit-cnn.md");

/// The text between `<!-- begin NAME -->` and `<!-- end NAME -->` in the document.
fn section(name: &str) -> &'static str {
    let (begin, end) = (format!("<!-- begin {name} -->"), format!("<!-- end {name} -->"));
    let start = DOC
        .find(&begin)
        .unwrap_or_else(|| panic!("{begin} not in the document"))
        + begin.len();
    let stop = DOC[start..]
        .find(&end)
        .unwrap_or_else(|| panic!("{end} not in the document"));
    &DOC[start..start + stop]
}

// The worked example's inputs: N = 2 outputs, K = 6 inputs.
const W: [[i8; 6]; 2] = [[0, 1, -1, -1, 1, 0], [1, 1, 0, -1, 0, 1]];
const S_W: f32 = 0.05;
const GAIN: [f32; 6] = [1.0, 0.5, 2.0, 1.0, 1.5, 1.0];
const BIAS: [f32; 2] = [0.25, -0.5];
const X: [f32; 6] = [0.8, -1.6, 0.4, 2.0, -0.2, 1.0];
const TIE_ROW: [f32; 4] = [0.0, -2.54, 1.27, 0.005];

fn list<T: std::fmt::Debug>(v: &[T]) -> String {
    format!("{v:?}")
}

/// The worked example as the document shows it, computed by the reference.
fn render_example() -> String {
    let flat: Vec<i8> = W.concat();
    let packed = bitlinear::pack_ternary(&flat, 2, 6).unwrap();
    let hex = |b: &[u8]| b.iter().map(|v| format!("0x{v:02x}")).collect::<Vec<_>>().join(", ");
    let mut s = String::new();
    s += "inputs: a BitLinear layer with N = 2 outputs and K = 6 inputs, one input row\n";
    s += &format!(
        "  weight.packed  U8 (2, 2)   [[{}], [{}]]\n",
        hex(&packed[..2]),
        hex(&packed[2..])
    );
    s += &format!("  weight.scale   F32 (1,)    [{S_W:?}]\n");
    s += &format!("  norm.weight    F32 (6,)    {}\n", list(&GAIN));
    s += &format!("  bias           F32 (2,)    {}\n", list(&BIAS));
    s += &format!("  x              (1, 6)      {}\n", list(&X));
    s += "decoding the packed bytes (code = (byte >> 2i) & 3 for k = 4j + i; w = code - 1)\n";
    for (r, row) in packed.chunks(2).enumerate() {
        for (j, &b) in row.iter().enumerate() {
            let codes: Vec<u8> = (0..4).map(|i| (b >> (2 * i)) & 3).collect();
            let ks: Vec<String> = (0..4)
                .map(|i| {
                    if 4 * j + i < 6 {
                        format!("k{}", 4 * j + i)
                    } else {
                        "pad".into()
                    }
                })
                .collect();
            s += &format!(
                "  row {r} byte {j}: 0x{b:02x} = 0b{:02b}_{:02b}_{:02b}_{:02b}; codes ({}) = {}\n",
                codes[3],
                codes[2],
                codes[1],
                codes[0],
                ks.join(", "),
                list(&codes)
            );
        }
        let w = reference::decode(row, 1, 6);
        s += &format!("  row {r}: w = {}\n", list(&w));
    }
    let t = reference::bitlinear(&X, &reference::decode(&packed, 2, 6), S_W, &GAIN, &BIAS);
    s += "forward (f32 unless said otherwise)\n";
    let mut line = |name: &str, formula: &str, value: String| {
        s += &format!("  {name:<6} = {formula:<38} = {value}\n");
    };
    line("rms", "sqrt(mean(x^2) + 1e-6)", format!("{:?}", t.rms));
    line("x_norm", "x / rms * norm.weight", list(&t.x_norm));
    line("s_x", "max(max|x_norm|, 1e-5) / 127", format!("{:?}", t.s_x));
    line("x_q", "clamp(round(x_norm / s_x), -128, 127)", list(&t.x_q));
    line("acc", "x_q . w (i32)", list(&t.acc));
    line("y", "(acc * s_x) * s_w + bias", list(&t.y));
    let absmax = TIE_ROW.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s_x = absmax.max(1e-5) / 127.0;
    let ratio: Vec<f32> = TIE_ROW.iter().map(|v| v / s_x).collect();
    let q: Vec<i8> = ratio
        .iter()
        .map(|v| v.round_ties_even().clamp(-128.0, 127.0) as i8)
        .collect();
    s += &format!("rounding half to even: the row {}\n", list(&TIE_ROW));
    s += &format!("  s_x = {s_x:?}, x / s_x = {}, x_q = {}\n", list(&ratio), list(&q));
    s
}

#[test]
fn worked_example_is_what_the_code_computes() {
    let block = render_example();
    let doc = section("example");
    assert!(
        doc.contains(&block),
        "the worked example in docs/format-simple-bit-cnn.md is stale; it should read:\n{block}"
    );

    // The library agrees with the reference on the same numbers, bit for bit.
    let flat: Vec<i8> = W.concat();
    let packed = bitlinear::pack_ternary(&flat, 2, 6).unwrap();
    assert_eq!(bitlinear::unpack_ternary(&packed, 2, 6).unwrap(), flat);
    let dev = Device::Cpu;
    let tensors = HashMap::from([
        (
            "weight.packed".to_string(),
            Tensor::from_vec(packed.clone(), (2, 2), &dev).unwrap(),
        ),
        ("weight.scale".to_string(), Tensor::new(&[S_W], &dev).unwrap()),
        ("norm.weight".to_string(), Tensor::new(&GAIN, &dev).unwrap()),
        ("bias".to_string(), Tensor::new(&BIAS, &dev).unwrap()),
    ]);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let layer = bitlinear::PackedBitLinear::load(6, 2, bitlinear::BitLinearConfig::default(), vb).unwrap();
    let y = layer.forward(&Tensor::new(&[X], &dev).unwrap()).unwrap();
    let t = reference::bitlinear(&X, &flat, S_W, &GAIN, &BIAS);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&y.to_vec2::<f32>().unwrap()[0]), bits(&t.y));
    let mut q = [0i8; 4];
    let s = bitlinear::quant::quantize_row(&TIE_ROW, &mut q);
    assert_eq!((s, q), (2.54f32 / 127.0, [0, -127, 64, 0]));
}

/// `(name, dtype, shape)` of the rows of the tensor table whose first cell is a `name`.
fn table_rows(section_name: &str) -> Vec<(String, String, String)> {
    section(section_name)
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_string(), cells[2].to_string(), cells[3].to_string()))
        })
        .collect()
}

/// A packed reference network with non-trivial norms and biases.
fn packed_network(seed: u64) -> PackedSimpleBitCnn {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let net = SimpleBitCnn::new(SimpleBitCnnConfig::bitlinear(), vb).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut vars: Vec<_> = vm.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in vars {
        // Seeded: PyTorch-like uniform weights, gains around 1, biases around 0 (non-trivial).
        let (lo, hi) = if name.ends_with("norm.weight") {
            (0.5, 1.5)
        } else if name.ends_with("bias") {
            (-0.5, 0.5)
        } else {
            let fan_in = var.elem_count() / var.dims()[0];
            let b = 1.0 / (fan_in as f32).sqrt();
            (-b, b)
        };
        let v: Vec<f32> = (0..var.elem_count()).map(|_| rng.gen_range(lo..hi)).collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    net.to_packed().unwrap()
}

#[test]
fn tensor_and_metadata_tables_describe_an_exported_file() {
    let net = packed_network(1);
    for (dtype, s) in [(DType::F32, "F32"), (DType::BF16, "BF16"), (DType::F16, "F16")] {
        let (tensors, meta) = net.to_packed_tensors(dtype).unwrap();
        let mut file: Vec<(String, String, String)> = tensors
            .iter()
            .map(|(k, t)| {
                let shape: Vec<String> = t.dims().iter().map(|d| d.to_string()).collect();
                let shape = if shape.len() == 1 {
                    format!("({},)", shape[0])
                } else {
                    format!("({})", shape.join(", "))
                };
                (k.clone(), format!("{:?}", t.dtype()).to_uppercase(), shape)
            })
            .collect();
        let mut doc: Vec<(String, String, String)> = table_rows("tensors")
            .into_iter()
            .map(|(n, d, sh)| (n, if d == "S" { s.to_string() } else { d }, sh))
            .collect();
        file.sort();
        doc.sort();
        assert_eq!(doc, file, "tensor table vs a {dtype:?} file");

        let rows = table_rows("metadata");
        let mut keys: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let mut file_keys: Vec<&str> = meta.keys().map(String::as_str).collect();
        keys.sort();
        file_keys.sort();
        assert_eq!(keys, file_keys, "metadata table vs a file");
        for (key, value, _) in &rows {
            // Literal values are in backticks; described ones (several choices) are not checked.
            if value.matches('`').count() == 2 && value.starts_with('`') && value.ends_with('`') {
                assert_eq!(meta[key], value[1..value.len() - 1], "metadata {key}");
            }
        }
        assert_eq!(meta["float_dtype"], s.to_lowercase());
    }
}

/// Largest logit difference between the reference and the loader, relative to the largest
/// logit. The convolutions and RMSNorm sum floats in another order, which can move an int8 code
/// by one (a step of about `s_x * s_w` in a BitLinear output); a mistake in the document (layer
/// order, padding, pooling, flattening, normalisation, scales) changes the logits entirely.
const TOLERANCE: f32 = 2e-2;

#[test]
fn the_documented_forward_runs_a_packed_file() {
    let net = packed_network(2);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let images: Vec<u8> = (0..4 * 3072).map(|_| rng.gen()).collect();
    let lut = cifar::Normalizer::default().lut();
    let dir = tempfile::tempdir().unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        net.save(&path, dtype).unwrap();
        let file = reference::read(&std::fs::read(&path).unwrap());
        let loaded = PackedSimpleBitCnn::load(&path, &Device::Cpu).unwrap();
        let mut worst = 0f32;
        for image in images.chunks(3072) {
            // The documented normalisation is the cifar crate's, bit for bit.
            let x = reference::normalize(image);
            let mut expected = vec![0f32; 3072];
            lut.apply(image, &mut expected);
            assert_eq!(x, expected);

            let ours = reference::forward(&file, image);
            let theirs = loaded
                .forward(&Tensor::from_vec(x, (1, 3, 32, 32), &Device::Cpu).unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .remove(0);
            let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            worst = worst.max(diff / scale);
            // The predictions agree unless the two best logits are closer than the tolerance.
            let mut sorted = theirs.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > TOLERANCE * scale {
                assert_eq!(
                    reference::argmax(&ours),
                    reference::argmax(&theirs),
                    "{ours:?} vs {theirs:?}"
                );
            }
        }
        eprintln!("{dtype:?}: largest logit difference {worst:e} of the largest logit");
        assert!(worst <= TOLERANCE, "{dtype:?}: {worst}");
    }
}
