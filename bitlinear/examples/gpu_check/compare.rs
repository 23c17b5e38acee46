//! Random inputs and the CPU-vs-GPU comparisons of the correctness suite.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

/// A random float dtype for an input (f32 most often).
pub(crate) fn random_dtype(rng: &mut StdRng) -> DType {
    match rng.gen_range(0..20) {
        0..=9 => DType::F32,
        10..=14 => DType::BF16,
        15..=17 => DType::F16,
        _ => DType::F64,
    }
}

/// Gaussian-ish values with a per-tensor magnitude, some exact small integers (ties for the
/// rounding), and optionally rows with NaN / Inf.
pub(crate) fn random_values(rng: &mut StdRng, rows: usize, cols: usize, scale: f32, bad_rows: bool) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * cols);
    for _ in 0..rows * cols {
        let g: f32 = (0..4).map(|_| rng.gen::<f32>() - 0.5).sum::<f32>();
        let x = if rng.gen_bool(0.02) {
            (rng.gen_range(-4..=4) as f32) * 0.5 * scale
        } else {
            g * scale
        };
        v.push(x);
    }
    if bad_rows && rows > 0 && cols > 0 {
        for _ in 0..(rows / 7).max(1) {
            let r = rng.gen_range(0..rows);
            let c = rng.gen_range(0..cols);
            v[r * cols + c] = match rng.gen_range(0..3) {
                0 => f32::NAN,
                1 => f32::INFINITY,
                _ => f32::NEG_INFINITY,
            };
        }
    }
    v
}

/// A (rows, cols) CPU tensor of `dt` from f32 values.
pub(crate) fn tensor(v: Vec<f32>, rows: usize, cols: usize, dt: DType) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?.to_dtype(dt)?)
}

/// A tensor's elements on the host as f64 (exact for every float dtype).
fn f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

/// Bit-level comparison of two float tensors (any dtype), as (count of differing elements,
/// max relative difference among finite pairs, NaN pattern mismatch).
fn float_diff(a: &Tensor, b: &Tensor) -> Result<(usize, f64, bool)> {
    let (a, b) = (f64_vec(a)?, f64_vec(b)?);
    if a.len() != b.len() {
        return Ok((usize::MAX, f64::INFINITY, true));
    }
    let (mut diff, mut rel, mut nan) = (0, 0f64, false);
    for (&x, &y) in a.iter().zip(&b) {
        if x.is_nan() || y.is_nan() {
            if x.is_nan() != y.is_nan() {
                nan = true;
                diff += 1;
            }
            continue;
        }
        if x != y {
            diff += 1;
            let r = (x - y).abs() / y.abs().max(f64::MIN_POSITIVE);
            rel = rel.max(r);
        }
    }
    Ok((diff, rel, nan))
}

fn tol(dt: DType) -> f64 {
    match dt {
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
        _ => 1e-6,
    }
}

/// max |a - b| / max |a| over the tensor.
pub(crate) fn grad_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (f64_vec(a)?, f64_vec(b)?);
    let scale = a.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let d = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    Ok(if d.is_nan() { f64::INFINITY } else { d / scale })
}

/// Compares a CPU and a GPU float result: a shape or dtype mismatch, a NaN pattern mismatch or a
/// relative difference beyond `tol(dt)` is an error; any difference counts in `nbe` (not
/// bit-exact).
pub(crate) fn float_check(
    what: &str,
    cpu: &Tensor,
    gpu: &Tensor,
    dt: DType,
    errs: &mut Vec<String>,
    nbe: &mut usize,
) -> Result<()> {
    if cpu.dims() != gpu.dims() || cpu.dtype() != gpu.dtype() {
        errs.push(format!(
            "{what}: shape/dtype {:?}/{:?} vs {:?}/{:?}",
            cpu.dims(),
            cpu.dtype(),
            gpu.dims(),
            gpu.dtype()
        ));
        return Ok(());
    }
    let (diff, rel, nan) = float_diff(gpu, cpu)?;
    if diff > 0 {
        *nbe += 1;
    }
    if nan || rel > tol(dt) {
        errs.push(format!(
            "{what}: {diff} elements differ, max rel {rel:.2e}, NaN mismatch {nan}"
        ));
    } else if diff > 0 {
        println!("      note: {what}: {diff} elements not bit-exact (max rel {rel:.2e}, within tolerance)");
    }
    Ok(())
}
