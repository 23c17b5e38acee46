//! A from-scratch reader and forward pass of a packed `SimpleBitCnn` file, written from
//! `docs/format-simple-bit-cnn.md` alone (plain Rust on slices, no candle, no crate of this
//! workspace), so the tests can check that the document is enough to run a file.

use std::collections::HashMap;

/// Every tensor of a file, decoded: float tensors widened to f32, U8 tensors as bytes.
pub struct File {
    pub metadata: HashMap<String, String>,
    pub floats: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub bytes: HashMap<String, (Vec<usize>, Vec<u8>)>,
}

/// Reads the safetensors bytes (format section 1 and 4 of the document).
pub fn read(file: &[u8]) -> File {
    let (_, header) = safetensors::SafeTensors::read_metadata(file).unwrap();
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(file).unwrap();
    let (mut floats, mut bytes) = (HashMap::new(), HashMap::new());
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        use safetensors::Dtype::*;
        let widened: Vec<f32> = match view.dtype() {
            U8 => {
                bytes.insert(name, (shape, data.to_vec()));
                continue;
            }
            F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            // bf16: the upper 16 bits of an f32.
            BF16 => data
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            d => panic!("unexpected dtype {d:?}"),
        };
        floats.insert(name, (shape, widened));
    }
    File {
        metadata,
        floats,
        bytes,
    }
}

/// Decodes `(n, ceil(k/4))` packed bytes into `n * k` ternary values (section 5).
pub fn decode(packed: &[u8], n: usize, k: usize) -> Vec<i8> {
    let row_bytes = k.div_ceil(4);
    let mut w = Vec::with_capacity(n * k);
    for row in 0..n {
        for col in 0..k {
            let byte = packed[row * row_bytes + col / 4];
            let code = (byte >> (2 * (col % 4))) & 3;
            assert_ne!(code, 3, "invalid code");
            w.push(code as i8 - 1);
        }
    }
    w
}

/// The input normalisation of one CIFAR-10 record's 3072 image bytes (section 6).
pub fn normalize(image: &[u8]) -> Vec<f32> {
    let mean = [0.4914f32, 0.4822, 0.4465];
    let std = [0.2023f32, 0.1994, 0.2010];
    image
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = i / 1024;
            let scale = 1.0 / (255.0 * std[c]);
            let shift = mean[c] / std[c];
            v as f32 * scale - shift
        })
        .collect()
}

/// 3x3 convolution, stride 1, zero padding 1, with bias: (c_in, h, w) -> (c_out, h, w).
pub fn conv3x3(x: &[f32], c_in: usize, h: usize, w: usize, weight: &[f32], bias: &[f32]) -> Vec<f32> {
    let c_out = bias.len();
    let mut y = vec![0f32; c_out * h * w];
    for o in 0..c_out {
        for i in 0..h {
            for j in 0..w {
                let mut acc = 0f32;
                for c in 0..c_in {
                    for di in 0..3 {
                        for dj in 0..3 {
                            let (r, s) = ((i + di) as isize - 1, (j + dj) as isize - 1);
                            if r < 0 || s < 0 || r >= h as isize || s >= w as isize {
                                continue;
                            }
                            let xv = x[c * h * w + r as usize * w + s as usize];
                            acc += weight[((o * c_in + c) * 3 + di) * 3 + dj] * xv;
                        }
                    }
                }
                y[(o * h + i) * w + j] = acc + bias[o];
            }
        }
    }
    y
}

/// 2x2 max pooling, stride 2: (c, h, w) -> (c, h/2, w/2).
pub fn max_pool(x: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let (h2, w2) = (h / 2, w / 2);
    let mut y = vec![0f32; c * h2 * w2];
    for ch in 0..c {
        for i in 0..h2 {
            for j in 0..w2 {
                let at = |r: usize, s: usize| x[(ch * h + 2 * i + r) * w + 2 * j + s];
                y[(ch * h2 + i) * w2 + j] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
            }
        }
    }
    y
}

pub fn relu(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.max(0.0));
}

/// Round half to even.
pub fn round_half_even(v: f32) -> f32 {
    v.round_ties_even()
}

/// Everything a BitLinear computes for one input row (section 8).
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub rms: f32,
    pub x_norm: Vec<f32>,
    pub s_x: f32,
    pub x_q: Vec<i8>,
    pub acc: Vec<i32>,
    pub y: Vec<f32>,
}

/// RMSNorm, per-token int8 absmax quantization, ternary integer matmul, dequantization, bias.
/// `w` is `(n, k)` row-major ternary.
pub fn bitlinear(x: &[f32], w: &[i8], s_w: f32, gain: &[f32], bias: &[f32]) -> Trace {
    let k = x.len();
    let n = bias.len();
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / k as f32;
    let rms = (mean_sq + 1e-6).sqrt();
    let x_norm: Vec<f32> = x.iter().zip(gain).map(|(v, g)| v / rms * g).collect();
    let absmax = x_norm.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s_x = absmax.max(1e-5) / 127.0;
    let x_q: Vec<i8> = x_norm
        .iter()
        .map(|v| round_half_even(v / s_x).clamp(-128.0, 127.0) as i8)
        .collect();
    let acc: Vec<i32> = (0..n)
        .map(|o| (0..k).map(|i| x_q[i] as i32 * w[o * k + i] as i32).sum())
        .collect();
    let y = acc.iter().zip(bias).map(|(&a, b)| (a as f32 * s_x) * s_w + b).collect();
    Trace {
        rms,
        x_norm,
        s_x,
        x_q,
        acc,
        y,
    }
}

/// A BitLinear layer of the file, decoded.
fn layer(f: &File, name: &str, n: usize, k: usize) -> (Vec<i8>, f32, Vec<f32>, Vec<f32>) {
    let packed = &f.bytes[&format!("{name}.weight.packed")];
    assert_eq!(packed.0, [n, k.div_ceil(4)]);
    let s_w = f.floats[&format!("{name}.weight.scale")].1[0];
    let gain = f.floats[&format!("{name}.norm.weight")].1.clone();
    let bias = f.floats[&format!("{name}.bias")].1.clone();
    (decode(&packed.1, n, k), s_w, gain, bias)
}

/// The logits of one image (3072 record bytes) under the file's network (both fully connected
/// layers BitLinear), section 7.
pub fn forward(f: &File, image: &[u8]) -> Vec<f32> {
    let m = |k: &str| f.metadata[k].as_str();
    assert_eq!(
        (m("format"), m("format_version"), m("model")),
        ("bitlinear-packed", "1", "SimpleBitCnn")
    );
    assert_eq!(
        m("model_config"),
        r#"{"fc1":"bitlinear","fc2":"bitlinear","act_scaling":"per-token"}"#
    );
    let t = |name: &str| &f.floats[name].1;
    let x = normalize(image);
    let mut x = max_pool(&conv3x3(&x, 3, 32, 32, t("conv1.weight"), t("conv1.bias")), 32, 32, 32);
    relu(&mut x);
    let mut x = max_pool(&conv3x3(&x, 32, 16, 16, t("conv2.weight"), t("conv2.bias")), 64, 16, 16);
    relu(&mut x);
    // (64, 8, 8) row-major is already the channel-major flattening.
    let (w, s_w, g, b) = layer(f, "fc1", 512, 4096);
    let mut h = bitlinear(&x, &w, s_w, &g, &b).y;
    relu(&mut h);
    let (w, s_w, g, b) = layer(f, "fc2", 10, 512);
    bitlinear(&h, &w, s_w, &g, &b).y
}

/// The predicted class: the first index of the largest logit.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}
