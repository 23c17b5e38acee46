//! Back-to-back matmuls without synchronization (programmatic dependent launch).

use crate::compare::{float_check, random_values, tensor};
use crate::variants::with_settings;
use anyhow::Result;
use bitlinear::plan::{GemmTile, KernelKind, KernelSettings};
use bitlinear::{packed_matmul, ActScaling, PackedTernary};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;

/// Back-to-back packed matmuls, queued without a synchronization between them, each
/// consuming the previous one's output (consecutive layers) or the same x (q/k/v): with
/// programmatic dependent launch a kernel starts while the previous one still runs (the decode
/// GEMV lets the next one start at once), and must still see its output. Every result must
/// equal the CPU's bit for bit. Returns the number of failures.
pub(crate) fn chains(gpu: &Device, rng: &mut StdRng) -> Result<usize> {
    type Change = fn(&mut KernelSettings);
    let default: Change = |_| {};
    let skinny: Change = |s| s.force.kernel = Some(KernelKind::Skinny);
    // split K: a zeroed workspace, the GEMM's partial sums and an epilogue kernel a call
    let split3: Change = |s| {
        s.force.gemm_tile = Some(GemmTile::Tma128);
        s.force.gemm_splits = Some(3);
    };
    let split4_no_store: Change = |s| {
        s.force.gemm_tile = Some(GemmTile::Tma128);
        s.force.gemm_splits = Some(4);
        s.force.tma_store = Some(false);
    };
    let mut failures = 0;
    for (m, k, dt, (what, change)) in [
        (1, 2560, DType::BF16, ("default", default)),
        (1, 2560, DType::BF16, ("skinny", skinny)),
        (1, 4096, DType::F32, ("default", default)),
        (1, 1024, DType::F16, ("default", default)),
        (1, 6912, DType::BF16, ("default", default)),
        (1, 64, DType::F32, ("default", default)),
        (16, 2560, DType::BF16, ("default", default)),
        (128, 4096, DType::BF16, ("default", default)),
        (128, 2560, DType::BF16, ("tma128, 3 splits", split3)),
        (
            96,
            4096,
            DType::F16,
            ("tma128, 4 splits, no TMA store", split4_no_store),
        ),
        (300, 1000, DType::F32, ("default", default)),
    ] {
        let layers = 6;
        let ws: Vec<PackedTernary> = (0..layers)
            .map(|_| {
                let w = tensor(random_values(rng, k, k, 1.0 / (k as f32).sqrt(), false), k, k, dt)?;
                Ok(PackedTernary::pack(&w)?)
            })
            .collect::<Result<_>>()?;
        let wg: Vec<PackedTernary> = ws
            .iter()
            .map(|w| w.to_device(gpu))
            .collect::<candle_core::Result<_>>()?;
        let x = tensor(random_values(rng, m, k, 1.0, false), m, k, dt)?;
        let (mut yc, mut fan_c) = (x.clone(), Vec::new());
        for w in &ws {
            fan_c.push(packed_matmul(&x, w, ActScaling::PerToken)?);
            yc = packed_matmul(&yc, w, ActScaling::PerToken)?;
        }
        // twice: on new weights (their first use), then, after a synchronization, on settled
        // ones (src/cuda/settle.rs), whose weights the kernels request before `pdl_wait`
        let mut errs = Vec::new();
        let mut nbe = 0;
        for pass in ["new weights", "settled weights"] {
            let (yg, fan_g) = with_settings(gpu, change, || -> Result<_> {
                let xg = x.to_device(gpu)?;
                let fan: Vec<Tensor> = wg
                    .iter()
                    .map(|w| packed_matmul(&xg, w, ActScaling::PerToken))
                    .collect::<candle_core::Result<_>>()?;
                let mut y = xg;
                for w in &wg {
                    y = packed_matmul(&y, w, ActScaling::PerToken)?;
                }
                Ok((y, fan))
            })?;
            float_check(&format!("{pass}: chain"), &yc, &yg, dt, &mut errs, &mut nbe)?;
            for (i, (c, g)) in fan_c.iter().zip(&fan_g).enumerate() {
                float_check(&format!("{pass}: fan-out {i}"), c, g, dt, &mut errs, &mut nbe)?;
            }
            gpu.synchronize()?;
        }
        if nbe > 0 {
            errs.push(format!("{nbe} result(s) not bit-exact"));
        }
        let what = format!("chain of {layers} packed matmuls, {m} x ({k} x {k}) {dt:?}, {what}");
        if errs.is_empty() {
            println!("{what}: ok (bit-exact)");
        } else {
            failures += 1;
            println!("{what}: FAIL {}", errs.join("; "));
        }
    }
    Ok(failures)
}
