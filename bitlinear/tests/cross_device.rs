//! The same random inputs on the CPU and on CUDA, compared directly, over awkward shapes: packed
//! bytes, weight scale, activation codes and scales and i32 accumulators bit for bit; f32
//! outputs bit for bit (both devices compute `(acc * s_x) * s_w` with two f32 roundings);
//! bf16/f16 outputs within one ulp. Only with the `cuda` feature; skipped without a GPU.
#![cfg(feature = "cuda")]
mod common;

use bitlinear::{bit_matmul, packed_accumulate, packed_matmul, quantize_activations, ActScaling, PackedTernary};
use candle_core::{DType, Device, Result, Tensor};
use common::*;
use rand::Rng;

const MS: &[usize] = &[1, 2, 3, 16, 17, 33, 130];
const NS: &[usize] = &[1, 5, 64, 130];
const KS: &[usize] = &[1, 3, 4, 63, 64, 256, 257, 1000];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Every op of the crate on `x (m, k)` and `w (n, k)` on both devices; panics at the first
/// difference, naming the shape, dtype and scaling.
fn compare(
    gpu: &Device,
    x: &[f32],
    w: &[f32],
    (m, n, k): (usize, usize, usize),
    dt: DType,
    sc: ActScaling,
) -> Result<()> {
    let at = format!("{m}x{n}x{k} {dt:?} {sc:?}");
    let xc = Tensor::from_vec(x.to_vec(), (m, k), &Device::Cpu)?.to_dtype(dt)?;
    let wc = Tensor::from_vec(w.to_vec(), (n, k), &Device::Cpu)?.to_dtype(dt)?;
    let (xg, wg) = (xc.to_device(gpu)?, wc.to_device(gpu)?);

    let (pc, pg) = (PackedTernary::pack(&wc)?, PackedTernary::pack(&wg)?);
    assert_eq!(pc.scale().to_bits(), pg.scale().to_bits(), "{at}: s_w cpu vs cuda");
    let bytes = |p: &PackedTernary| p.bytes().flatten_all().and_then(|b| b.to_vec1::<u8>());
    assert_eq!(bytes(&pc)?, bytes(&pg)?, "{at}: packed bytes cpu vs cuda");
    assert_eq!(pg.bytes().dims(), pc.bytes().dims(), "{at}: packed shape");

    let (cc, sc_c) = quantize_activations(&xc, sc)?;
    let (cg, sc_g) = quantize_activations(&xg, sc)?;
    assert_eq!(cg.dims(), cc.dims(), "{at}: code shape");
    assert_eq!(codes_i8(&cc), codes_i8(&cg), "{at}: activation codes cpu vs cuda");
    assert_eq!(
        bits(&sc_c.to_vec1()?),
        bits(&sc_g.to_vec1()?),
        "{at}: activation scales cpu vs cuda"
    );

    let ac = packed_accumulate(&cc, &pc)?;
    let ag = packed_accumulate(&cg, &pg)?;
    assert_eq!(
        (ag.dtype(), ag.dims()),
        (DType::I32, &[m, n][..]),
        "{at}: accumulator dtype/shape"
    );
    assert_eq!(i64_vec(&ac), i64_vec(&ag), "{at}: i32 accumulators cpu vs cuda");

    for (what, yc, yg) in [
        (
            "packed_matmul",
            packed_matmul(&xc, &pc, sc)?,
            packed_matmul(&xg, &pg, sc)?,
        ),
        ("bit_matmul", bit_matmul(&xc, &wc, sc)?, bit_matmul(&xg, &wg, sc)?),
    ] {
        assert_eq!((yg.dtype(), yg.dims()), (dt, &[m, n][..]), "{at}: {what} dtype/shape");
        let (yc, yg) = (f32_vec(&yc), f32_vec(&yg));
        match dt {
            DType::BF16 | DType::F16 => assert_ulps16(&yg, &yc, dt, 1, &format!("{at}: {what} cuda vs cpu")),
            _ => assert_eq!(bits(&yc), bits(&yg), "{at}: {what} cpu vs cuda (f32 bits)"),
        }
    }
    Ok(())
}

#[test]
fn cpu_and_cuda_agree_on_awkward_shapes() {
    let Some(gpu) = cuda_device("cpu_and_cuda_agree_on_awkward_shapes") else {
        return;
    };
    let mut rng = rng("cpu_and_cuda_agree_on_awkward_shapes");
    let mut case = 0;
    for &m in MS {
        for &n in NS {
            for &k in KS {
                // fresh inputs and magnitudes for every shape
                let xs = rng.gen_range(0.01f32..10.0);
                let ws = rng.gen_range(0.001f32..1.0);
                let x = randn(&mut rng, m * k, xs);
                let w = randn(&mut rng, n * k, ws);
                compare(&gpu, &x, &w, (m, n, k), DType::F32, ActScaling::PerToken).unwrap();
                // and a cheaper rotation of the other dtypes and the per-tensor scaling
                let dt = [DType::BF16, DType::F16, DType::F64, DType::F32][case % 4];
                let sc = [ActScaling::PerToken, ActScaling::PerTensor][(case / 4) % 2];
                if (dt, sc) != (DType::F32, ActScaling::PerToken) {
                    compare(&gpu, &x, &w, (m, n, k), dt, sc).unwrap();
                }
                case += 1;
            }
        }
    }
}
