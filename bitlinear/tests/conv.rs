//! BitConv2d against an independent f64 reference: per-image int8 quantization (round half to
//! even), absmean ternary weights and a direct convolution loop with exact i64 accumulators.

mod common;

use bitlinear::{BitConv2d, BitConv2dConfig};
use candle_core::{Device, Module, Result, Tensor};
use common::{device_test, randn, ref_quantize_rows, ref_quantize_weights, rng};
use rand::Rng;

struct Shape {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    co: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

/// Direct convolution of the quantized codes: `(b, co, ho, wo)` exact integer sums.
fn ref_conv_int(s: &Shape, xq: &[i8], wq: &[i8]) -> (Vec<i64>, usize, usize) {
    let ho = (s.h + 2 * s.pad - s.k) / s.stride + 1;
    let wo = (s.w + 2 * s.pad - s.k) / s.stride + 1;
    let mut out = vec![0i64; s.b * s.co * ho * wo];
    for n in 0..s.b {
        for o in 0..s.co {
            for y in 0..ho {
                for x in 0..wo {
                    let mut acc = 0i64;
                    for c in 0..s.c {
                        for ky in 0..s.k {
                            for kx in 0..s.k {
                                let iy = (y * s.stride + ky) as isize - s.pad as isize;
                                let ix = (x * s.stride + kx) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                let xi = ((n * s.c + c) * s.h + iy as usize) * s.w + ix as usize;
                                let wi = ((o * s.c + c) * s.k + ky) * s.k + kx;
                                acc += xq[xi] as i64 * wq[wi] as i64;
                            }
                        }
                    }
                    out[((n * s.co + o) * ho + y) * wo + x] = acc;
                }
            }
        }
    }
    (out, ho, wo)
}

fn check_shape(dev: &Device, s: &Shape, r: &mut rand::rngs::StdRng) -> Result<()> {
    let x = randn(r, s.b * s.c * s.h * s.w, 1.0);
    let w = randn(r, s.co * s.c * s.k * s.k, 0.2);
    let bias = randn(r, s.co, 0.1);
    let xt = Tensor::from_vec(x.clone(), (s.b, s.c, s.h, s.w), dev)?;
    let wt = Tensor::from_vec(w.clone(), (s.co, s.c, s.k, s.k), dev)?;
    let bt = Tensor::from_vec(bias.clone(), s.co, dev)?;
    let cfg = BitConv2dConfig {
        stride: s.stride,
        padding: s.pad,
        bias: true,
    };
    let layer = BitConv2d::new(wt, Some(bt), cfg)?;
    let y: Vec<f32> = layer.forward(&xt)?.flatten_all()?.to_vec1()?;

    let acts = ref_quantize_rows(&x, s.b, s.c * s.h * s.w);
    let wts = ref_quantize_weights(&w);
    let (acc, ho, wo) = ref_conv_int(s, &acts.q, &wts.q);
    assert_eq!(y.len(), acc.len());
    let plane = s.co * ho * wo;
    // Float convolution of the fake-quantized values: each product is exact in f32, the sum of
    // at most c·k·k terms below 127 · 1 loses at most ~K ulps of the largest partial sum.
    let kk = (s.c * s.k * s.k) as f64;
    for (i, (&got, &a)) in y.iter().zip(&acc).enumerate() {
        let n = i / plane;
        let o = (i / (ho * wo)) % s.co;
        let sxw = acts.scales[n] as f64 * wts.scale as f64;
        let want = a as f64 * sxw + bias[o] as f64;
        let tol = 127.0 * kk * sxw * 1e-6 + 1e-6;
        assert!(
            (got as f64 - want).abs() <= tol,
            "elem {i}: got {got}, want {want}, tol {tol}"
        );
    }
    Ok(())
}

fn random_shapes(dev: &Device) -> Result<()> {
    let mut r = rng("conv_random_shapes");
    let count = if dev.is_cuda() { 100 } else { 20 };
    for i in 0..count {
        let k = [1, 3, 5][r.gen_range(0..3)];
        let pad = r.gen_range(0..2);
        let s = Shape {
            b: if dev.is_cuda() && i % 10 == 0 {
                500
            } else if i % 2 == 0 {
                1
            } else {
                r.gen_range(2..5)
            },
            c: if i % 3 == 0 { 3 } else { r.gen_range(1..9) },
            h: 2 * r.gen_range(2..6) + 1,
            w: 2 * r.gen_range(2..6) + 1,
            co: r.gen_range(1..9),
            k,
            stride: r.gen_range(1..3),
            pad,
        };
        check_shape(dev, &s, &mut r)?;
    }
    Ok(())
}

fn straight_through_grads(dev: &Device) -> Result<()> {
    // The gradients equal candle's conv2d gradients on the fake-quantized tensors.
    let mut r = rng("conv_grads");
    let (b, c, h, w, co, k) = (2, 3, 7, 5, 4, 3);
    let x = candle_core::Var::from_vec(randn(&mut r, b * c * h * w, 1.0), (b, c, h, w), dev)?;
    let wt = candle_core::Var::from_vec(randn(&mut r, co * c * k * k, 0.2), (co, c, k, k), dev)?;
    let layer = BitConv2d::new(
        wt.as_tensor().clone(),
        None,
        BitConv2dConfig {
            stride: 2,
            padding: 1,
            bias: false,
        },
    )?;
    let g = Tensor::from_vec(randn(&mut r, b * co * 4 * 3, 1.0), (b, co, 4, 3), dev)?;
    let grads = (layer.forward(x.as_tensor())? * &g)?.sum_all()?.backward()?;

    let xq =
        bitlinear::fake_quantize_activations(&x.as_tensor().reshape((b, c * h * w))?, bitlinear::ActScaling::PerToken)?
            .reshape((b, c, h, w))?;
    let wq = bitlinear::fake_quantize_weights(&wt.as_tensor().reshape((co, c * k * k))?)?.reshape((co, c, k, k))?;
    let xv = candle_core::Var::from_tensor(&xq)?;
    let wv = candle_core::Var::from_tensor(&wq)?;
    let ref_grads = (xv.as_tensor().conv2d(wv.as_tensor(), 1, 2, 1, 1)? * &g)?
        .sum_all()?
        .backward()?;
    for (got, want) in [
        (grads.get(&x), ref_grads.get(&xv)),
        (grads.get(&wt), ref_grads.get(&wv)),
    ] {
        let d: f32 = (got.unwrap() - want.unwrap())?.abs()?.max_all()?.to_scalar()?;
        assert!(d <= 1e-5, "gradient differs by {d}");
    }
    Ok(())
}

fn bad_inputs(dev: &Device) -> Result<()> {
    let wt = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, dev)?;
    let layer = BitConv2d::new(
        wt,
        None,
        BitConv2dConfig {
            bias: false,
            ..Default::default()
        },
    )?;
    let f = |d: &[usize]| layer.forward(&Tensor::zeros(d, candle_core::DType::F32, dev).unwrap());
    assert!(f(&[3, 5, 5]).is_err(), "rank 3 accepted");
    assert!(f(&[1, 2, 5, 5]).is_err(), "channel mismatch accepted");
    assert!(f(&[1, 3, 2, 5]).is_err(), "kernel larger than input accepted");
    assert!(
        layer
            .forward(&Tensor::zeros((1, 3, 5, 5), candle_core::DType::U8, dev)?)
            .is_err(),
        "u8 accepted"
    );
    assert_eq!(f(&[0, 3, 5, 5])?.dims(), &[0, 4, 3, 3]);
    Ok(())
}

device_test!(random_shapes, straight_through_grads, bad_inputs);
