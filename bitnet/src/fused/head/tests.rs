//! The head kernel (a CUDA device) against an f64 reference, its greedy token (ties, NaN), the
//! token fed to the next step, and its operand checks.

use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{DType, Device, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{Feedback, HeadOutput, LmHead};
use crate::fused::argmax_host;

/// `v` rounded to `dtype` and back (round half to even), as the kernels store values.
fn round_to(v: &[f32], dtype: DType) -> Result<Vec<f32>> {
    Tensor::new(v, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?
        .to_vec1()
}

/// The head's operands: residual stream, delta, gain and weights of `dtype` values (the f32
/// copies hold exactly those values).
struct HeadOperands {
    x: Vec<f32>,
    delta: Vec<f32>,
    gamma: Vec<f32>,
    w: Vec<f32>,
    vocab: usize,
}

impl HeadOperands {
    fn random(rng: &mut StdRng, vocab: usize, hidden: usize, dtype: DType) -> Result<Self> {
        let mut r =
            |n: usize, lo: f32, hi: f32| round_to(&(0..n).map(|_| rng.gen_range(lo..hi)).collect::<Vec<_>>(), dtype);
        Ok(Self {
            x: r(hidden, -2.0, 2.0)?,
            delta: r(hidden, -1.0, 1.0)?,
            gamma: r(hidden, 0.5, 1.5)?,
            w: r(vocab * hidden, -0.1, 0.1)?,
            vocab,
        })
    }

    /// The kernel's output on `dev` (`with_delta`: the last layer's output added first).
    fn run(&self, dev: &Device, dtype: DType, with_delta: bool, output: HeadOutput) -> Result<Tensor> {
        let hidden = self.x.len();
        let t = |v: &[f32], shape: (usize, usize)| Tensor::from_slice(v, shape, dev)?.to_dtype(dtype);
        let (x, delta, gamma) = (
            t(&self.x, (1, hidden))?,
            t(&self.delta, (1, hidden))?,
            t(&self.gamma, (1, hidden))?,
        );
        let (w, counter) = (t(&self.w, (self.vocab, hidden))?, Tensor::zeros(1, DType::U32, dev)?);
        LmHead {
            delta: with_delta.then_some(&delta),
            gamma: &gamma.flatten_all()?,
            eps: 1e-5,
            weight: &w,
            counter: &counter,
            output,
        }
        .forward(&x)
    }

    /// The logits in f64 from the same rounded operands: the sum rounded to `dtype`, the
    /// normalised row rounded to `dtype`, the products summed in f64.
    fn reference(&self, dtype: DType, with_delta: bool) -> Result<Vec<f64>> {
        let hidden = self.x.len();
        let sum: Vec<f32> = match with_delta {
            true => round_to(
                &self.x.iter().zip(&self.delta).map(|(a, b)| a + b).collect::<Vec<_>>(),
                dtype,
            )?,
            false => self.x.clone(),
        };
        let ms = sum.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / hidden as f64;
        let scale = 1.0 / (ms + 1e-5).sqrt();
        let y = round_to(
            &sum.iter()
                .zip(&self.gamma)
                .map(|(&s, &g)| (scale * s as f64 * g as f64) as f32)
                .collect::<Vec<_>>(),
            dtype,
        )?;
        Ok(self
            .w
            .chunks(hidden)
            .map(|row| row.iter().zip(&y).map(|(&w, &y)| w as f64 * y as f64).sum())
            .collect())
    }
}

/// The head kernel's logits against an f64 reference (f32, bf16, f16; with and without the
/// last layer's output; hidden sizes of one 16-byte chunk a row up to several chunks a lane;
/// vocabularies smaller and larger than the grid's rows a pass), within one rounding of the
/// output dtype plus the sum's f32 error; its greedy token is the first maximum of its own logits.
#[test]
fn head_matches_f64_reference() -> Result<()> {
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = Device::new_cuda(0)?;
    for (dtype, ulp) in [
        (DType::F32, 1e-6),
        (DType::BF16, 2f64.powi(-8)),
        (DType::F16, 2f64.powi(-11)),
    ] {
        let chunk = 16 / dtype.size_in_bytes();
        for (vocab, hidden) in [
            (1, chunk),
            (7, 9 * chunk),
            (1000, 2560),
            (5003, 40 * chunk),
            (70_001, 64),
        ] {
            let ops = HeadOperands::random(&mut rng, vocab, hidden, dtype)?;
            for with_delta in [true, false] {
                let want = ops.reference(dtype, with_delta)?;
                let got = ops.run(&dev, dtype, with_delta, HeadOutput::Logits)?;
                assert_eq!(got.dims(), &[1, vocab]);
                let got: Vec<f32> = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let bound = |w: f64| w.abs() * ulp + 1e-5 * (hidden as f64).sqrt();
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= bound(w),
                        "{dtype:?} {vocab}x{hidden} row {i}: {g} vs {w}"
                    );
                }
                let token = ops
                    .run(&dev, dtype, with_delta, HeadOutput::Greedy(None))?
                    .to_vec1::<u32>()?;
                assert_eq!(token, [argmax_host(&got).unwrap() as u32], "{dtype:?} {vocab}x{hidden}");
            }
        }
    }
    Ok(())
}

/// Equal logits go to the first index, NaN logits are never picked (all NaN: `u32::MAX`).
#[test]
fn head_greedy_ties_and_nan() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let mut rng = StdRng::seed_from_u64(7);
    let (vocab, hidden) = (3001, 64);
    let mut ops = HeadOperands::random(&mut rng, vocab, hidden, DType::BF16)?;
    let row = |i: usize| i * hidden..(i + 1) * hidden;
    // rows 2100 and 2999 equal and largest (weights along the normalised row's signs)
    let best: Vec<f32> = ops
        .x
        .iter()
        .zip(&ops.delta)
        .map(|(a, b)| (a + b).signum() * 0.5)
        .collect();
    for i in [2100, 2999] {
        ops.w[row(i)].copy_from_slice(&best);
    }
    ops.w[row(5)].fill(f32::NAN);
    let greedy = |ops: &HeadOperands| -> Result<Vec<u32>> {
        ops.run(&dev, DType::BF16, true, HeadOutput::Greedy(None))?.to_vec1()
    };
    assert_eq!(greedy(&ops)?, [2100]);
    ops.w.fill(f32::NAN);
    assert_eq!(greedy(&ops)?, [u32::MAX]);
    ops.w.fill(0.0);
    assert_eq!(greedy(&ops)?, [0], "all logits 0");
    Ok(())
}

/// With feedback the token goes to the next id, the position advances by one and the slot
/// `pos - first` takes the token; a position past the slots writes none.
#[test]
fn head_feeds_the_next_step() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let cuda = dev.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let mut rng = StdRng::seed_from_u64(11);
    let ops = HeadOperands::random(&mut rng, 999, 128, DType::F32)?;
    let logits: Vec<f32> = ops
        .run(&dev, DType::F32, true, HeadOutput::Logits)?
        .flatten_all()?
        .to_vec1()?;
    let want = argmax_host(&logits).unwrap() as u32;
    let slots = stream
        .clone_htod(&[u32::MAX - 1; 4])
        .map_err(candle_core::Error::wrap)?;
    let (slots_ptr, _guard) = slots.device_ptr(&stream);
    let id = Tensor::new(&[[0u32]], &dev)?;
    let mut expect = [u32::MAX - 1; 4];
    for (p, slot) in [(12u32, Some(2usize)), (14, None)] {
        let pos = Tensor::new(&[p], &dev)?;
        let fb = Feedback {
            id: &id,
            pos: &pos,
            tokens: slots_ptr,
            first: 10,
            len: 4,
        };
        let token = ops
            .run(&dev, DType::F32, true, HeadOutput::Greedy(Some(fb)))?
            .to_vec1::<u32>()?;
        assert_eq!(token, [want]);
        assert_eq!(id.flatten_all()?.to_vec1::<u32>()?, [want]);
        assert_eq!(pos.to_vec1::<u32>()?, [p + 1]);
        if let Some(s) = slot {
            expect[s] = want;
        }
        let got = stream.clone_dtoh(&slots).map_err(candle_core::Error::wrap)?;
        assert_eq!(got, expect, "position {p}");
    }
    Ok(())
}

/// A gain of the wrong length, operands of mixed dtypes and rows that do not split into 16-byte
/// chunks are errors.
#[test]
fn head_operands_are_checked() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let (x, counter) = (
        Tensor::ones((1, 64), DType::BF16, &dev)?,
        Tensor::zeros(1, DType::U32, &dev)?,
    );
    let w = Tensor::ones((10, 64), DType::BF16, &dev)?;
    let run = |x: &Tensor, gamma: &Tensor, w: &Tensor| {
        LmHead {
            delta: None,
            gamma,
            eps: 1e-5,
            weight: w,
            counter: &counter,
            output: HeadOutput::Logits,
        }
        .forward(x)
    };
    let gamma = Tensor::ones(64, DType::BF16, &dev)?;
    assert!(run(&x, &gamma, &w).is_ok());
    assert!(
        run(&x, &Tensor::ones(63, DType::BF16, &dev)?, &w).is_err(),
        "gain length"
    );
    assert!(run(&x, &gamma.to_dtype(DType::F32)?, &w).is_err(), "gain dtype");
    assert!(run(&x.narrow(1, 0, 60)?, &gamma, &w).is_err(), "row length");
    let (x4, w4) = (
        Tensor::ones((1, 4), DType::BF16, &dev)?,
        Tensor::ones((10, 4), DType::BF16, &dev)?,
    );
    let err = run(&x4, &Tensor::ones(4, DType::BF16, &dev)?, &w4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no kernel"), "{err}");
    Ok(())
}
