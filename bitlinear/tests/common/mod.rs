//! An independent reference of the BitNet b1.58 forward, written the obvious way: scalar loops,
//! f64 sums, i64 integer products, and the `device_test!` harness. Shared by the integration tests.
#![allow(dead_code, unused_macros, unused_imports)]

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Runs `fn name(dev: &Device) -> candle_core::Result<()>` once per device, as candle's
/// `test_device!` does: `device_test!(a, b)` makes the tests `a::cpu`, `a::cuda`, `b::cpu`, ...
/// (`cuda` only with the `cuda` feature). The test name says the device, and so does the panic
/// message of an `Err`. Without a usable GPU the `cuda` tests print a skip line to stderr and
/// pass, unless `BITLINEAR_REQUIRE_CUDA=1` is set (then they fail).
macro_rules! device_test {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn cpu() {
                $crate::common::run_on(stringify!($name), &candle_core::Device::Cpu, super::$name);
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                if let Some(dev) = $crate::common::cuda_device(stringify!($name)) {
                    $crate::common::run_on(stringify!($name), &dev, super::$name);
                }
            }
        }
    )+};
}
pub(crate) use device_test;

/// "cpu" or "cuda:N", for messages.
pub fn dev_name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        l => format!("{l:?}"),
    }
}

/// Runs one device test body; an `Err` becomes a panic that names the test and the device.
pub fn run_on(test: &str, dev: &Device, f: impl FnOnce(&Device) -> candle_core::Result<()>) {
    eprintln!("{test}: on {}", dev_name(dev));
    if let Err(e) = f(dev) {
        panic!("{test} on {}: error: {e}", dev_name(dev));
    }
}

/// CUDA device 0, or `None` (after a skip line on stderr that the test harness does not capture)
/// when there is none. With `BITLINEAR_REQUIRE_CUDA` set to anything but `0`, no GPU is a failure.
pub fn cuda_device(test: &str) -> Option<Device> {
    use std::io::Write;
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let required = std::env::var("BITLINEAR_REQUIRE_CUDA").is_ok_and(|v| !v.is_empty() && v != "0");
            if required {
                panic!("{test}: BITLINEAR_REQUIRE_CUDA is set but there is no usable CUDA device: {e}");
            }
            // Straight to the process's stderr: `eprintln!` would be captured and never shown.
            // The error itself is not printed: formatting it asks the driver library for its
            // message, which crashes with the toolkit's stub libcuda (a build machine's).
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test} on cuda: Device::new_cuda(0) failed, no GPU or driver \
                 (BITLINEAR_REQUIRE_CUDA=1 makes this a failure that shows the error)"
            );
            None
        }
    }
}

/// A fresh RNG for each run; the seed is printed so a failure can be replayed with `SEED=...`.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: SEED={seed}");
    StdRng::seed_from_u64(seed)
}

pub fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Box-Muller.
            let (u, v): (f32, f32) = (rng.gen_range(f32::EPSILON..1.0), rng.gen());
            scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

/// Round half to even, spelled out.
pub fn round_half_even(v: f32) -> f32 {
    let f = v.floor();
    let d = v - f;
    if d > 0.5 || (d == 0.5 && f % 2.0 != 0.0) {
        f + 1.0
    } else {
        f
    }
}

pub struct RefWeights {
    pub q: Vec<i8>,
    pub scale: f32,
}

pub fn ref_quantize_weights(w: &[f32]) -> RefWeights {
    let mut sum = 0f64;
    for &v in w {
        sum += (v as f64).abs();
    }
    let mean = if w.is_empty() {
        0.0
    } else {
        (sum / w.len() as f64) as f32
    };
    let scale = if mean < 1e-5 { 1e-5 } else { mean };
    let q = w
        .iter()
        .map(|&v| {
            let r = round_half_even(v / scale);
            if r > 1.0 {
                1
            } else if r < -1.0 {
                -1
            } else {
                r as i8
            }
        })
        .collect();
    RefWeights { q, scale }
}

pub struct RefActs {
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
}

pub fn ref_quantize_rows(x: &[f32], m: usize, k: usize) -> RefActs {
    let mut q = vec![0i8; m * k];
    let mut scales = vec![0f32; m];
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        if row.iter().any(|v| !v.is_finite()) {
            scales[i] = f32::NAN;
            continue;
        }
        let mut amax = 0f32;
        for &v in row {
            if v.abs() > amax {
                amax = v.abs();
            }
        }
        let s = if amax < 1e-5 { 1e-5 } else { amax } / 127.0;
        scales[i] = s;
        for j in 0..k {
            let r = round_half_even(row[j] / s);
            q[i * k + j] = r.clamp(-128.0, 127.0) as i8;
        }
    }
    RefActs { q, scales }
}

/// Integer accumulators `(m, n)` in i64.
pub fn ref_accumulate(xq: &[i8], wq: &[i8], m: usize, n: usize, k: usize) -> Vec<i64> {
    let mut out = vec![0i64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0i64;
            for t in 0..k {
                acc += xq[i * k + t] as i64 * wq[j * k + t] as i64;
            }
            out[i * n + j] = acc;
        }
    }
    out
}

/// The whole forward in f64: `acc · s_x · s_w`.
pub fn ref_forward(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (Vec<i64>, Vec<f64>) {
    let rw = ref_quantize_weights(w);
    let ra = ref_quantize_rows(x, m, k);
    let acc = ref_accumulate(&ra.q, &rw.q, m, n, k);
    let y = acc
        .iter()
        .enumerate()
        .map(|(i, &a)| a as f64 * ra.scales[i / n.max(1)] as f64 * rw.scale as f64)
        .collect();
    (acc, y)
}

pub fn assert_close(got: &[f32], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(1e-30);
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (rel tol {rel})"
        );
    }
}

/// A tensor's copy on the CPU (where the conversions below run, whatever the tensor's device).
fn host(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).expect("a copy on the CPU")
}

/// All elements of a float tensor (any device), converted to f32, in row-major order.
pub fn f32_vec(t: &Tensor) -> Vec<f32> {
    let t = host(t).to_dtype(DType::F32).unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The i8 codes held in a U8 code tensor (any device), row-major.
pub fn codes_i8(t: &Tensor) -> Vec<i8> {
    let v = host(t).flatten_all().unwrap().to_vec1::<u8>().unwrap();
    v.into_iter().map(|b| b as i8).collect()
}

/// The elements of an I32 tensor (any device), widened to i64, row-major.
pub fn i64_vec(t: &Tensor) -> Vec<i64> {
    assert_eq!(t.dtype(), DType::I32, "accumulators must be I32");
    let v = host(t).flatten_all().unwrap().to_vec1::<i32>().unwrap();
    v.into_iter().map(i64::from).collect()
}

/// The per-tensor variant of `ref_quantize_rows`: one absmax scale over all `x`.
pub fn ref_quantize_tensor(x: &[f32]) -> RefActs {
    let r = ref_quantize_rows(x, 1, x.len());
    RefActs {
        q: r.q,
        scales: r.scales,
    }
}

/// The f32 outputs the crate promises for accumulators `acc (m, n)`: `(acc * s_x) * s_w` in f32,
/// two roundings, no fused multiply-add (`quant::dequantize`), one `s_x` per row or one in all.
pub fn expected_f32(acc: &[i64], scales: &[f32], s_w: f32, n: usize) -> Vec<f32> {
    acc.iter()
        .enumerate()
        .map(|(i, &a)| {
            let s_x = if scales.len() == 1 { scales[0] } else { scales[i / n] };
            (a as f32 * s_x) * s_w
        })
        .collect()
}

/// Distance in units in the last place between two floats of a 16-bit dtype, given as f32
/// (exactly representable): 0 when equal (or both NaN), `u32::MAX` for one NaN.
pub fn ulps16(a: f32, b: f32, dtype: DType) -> u32 {
    if a.is_nan() || b.is_nan() {
        return if a.is_nan() && b.is_nan() { 0 } else { u32::MAX };
    }
    let bits = |v: f32| -> i32 {
        let b = match dtype {
            DType::BF16 => half::bf16::from_f32(v).to_bits(),
            DType::F16 => half::f16::from_f32(v).to_bits(),
            d => panic!("ulps16: {d:?} is not a 16-bit float"),
        } as i32;
        // sign-magnitude to a monotonic integer line
        if b & 0x8000 != 0 {
            -(b & 0x7fff)
        } else {
            b
        }
    };
    bits(a).abs_diff(bits(b))
}

/// Asserts that two outputs of a 16-bit float dtype are within `max` ulps, element for element.
pub fn assert_ulps16(got: &[f32], want: &[f32], dtype: DType, max: u32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = ulps16(g, w, dtype);
        assert!(
            d <= max,
            "{what}[{i}]: got {g}, want {w}: {d} {dtype:?} ulps apart (max {max})"
        );
    }
}
