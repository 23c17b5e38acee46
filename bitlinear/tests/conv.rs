//! BitConv2d and PackedBitConv2d against an independent f64 reference: per-image int8
//! quantization (round half to even), absmean ternary weights and a direct convolution loop with
//! exact i64 accumulators. The packed form's accumulators must equal the reference's exactly.

mod common;

use bitlinear::{BitConv2d, BitConv2dConfig, PackedBitConv2d};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use common::{device_test, randn, ref_quantize_rows, ref_quantize_weights, rng};
use rand::Rng;
use std::collections::HashMap;

#[derive(Debug)]
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
        ..Default::default()
    };
    let layer = BitConv2d::new(wt, Some(bt), cfg)?;
    let y: Vec<f32> = layer.forward(&xt)?.flatten_all()?.to_vec1()?;
    let packed = layer.pack()?;
    let yp: Vec<f32> = packed.forward(&xt)?.flatten_all()?.to_vec1()?;
    let (pacc, pscales) = packed.accumulate(&xt)?;

    let acts = ref_quantize_rows(&x, s.b, s.c * s.h * s.w);
    let wts = ref_quantize_weights(&w);
    let (acc, ho, wo) = ref_conv_int(s, &acts.q, &wts.q);
    let at = format!(
        "b {} c {} {}x{} co {} k {} stride {} pad {}",
        s.b, s.c, s.h, s.w, s.co, s.k, s.stride, s.pad
    );
    assert_eq!(pacc.dims(), &[s.b, s.co, ho, wo], "{at}: accumulator shape");
    let pacc: Vec<i64> = pacc
        .flatten_all()?
        .to_vec1::<i32>()?
        .into_iter()
        .map(i64::from)
        .collect();
    assert!(pacc == acc, "{at}: packed accumulators differ from the reference");
    assert_eq!(pscales.to_vec1::<f32>()?, acts.scales, "{at}: activation scales");
    assert_eq!(packed.weight().scale(), wts.scale, "{at}: weight scale");
    assert_eq!(y.len(), acc.len());
    assert_eq!(yp.len(), acc.len());
    // Both forms on every device and path: the exact integer sum, `(acc · s_x) · s_w` with two
    // f32 roundings, then the f32 bias add.
    for (i, ((&got, &gotp), &a)) in y.iter().zip(&yp).zip(&acc).enumerate() {
        let (n, o) = (i / (s.co * ho * wo), (i / (ho * wo)) % s.co);
        let want = (a as f32 * acts.scales[n]) * wts.scale + bias[o];
        assert!(
            got.to_bits() == want.to_bits() && gotp.to_bits() == want.to_bits(),
            "{at}: elem {i}: training form {got}, packed form {gotp}, want {want} (acc {a})"
        );
    }
    if !dev.is_cuda() {
        // Both forms sum the same integers exactly and apply `(acc · s_x) · s_w + bias` in f32.
        assert!(y == yp, "{at}: training and packed forms differ on the CPU");
    }
    let plane = s.co * ho * wo;
    // Float convolution of the fake-quantized values: each product is exact in f32, the sum of
    // at most c·k·k terms below 127 · 1 loses at most ~K ulps of the largest partial sum. The
    // packed form's sum is exact; its two f32 scale products and the bias add round once each.
    let kk = (s.c * s.k * s.k) as f64;
    for (i, ((&got, &gotp), &a)) in y.iter().zip(&yp).zip(&acc).enumerate() {
        let n = i / plane;
        let o = (i / (ho * wo)) % s.co;
        let sxw = acts.scales[n] as f64 * wts.scale as f64;
        let want = a as f64 * sxw + bias[o] as f64;
        let tol = 127.0 * kk * sxw * 1e-6 + 1e-6;
        assert!(
            (got as f64 - want).abs() <= tol,
            "{at}: elem {i}: got {got}, want {want}, tol {tol}"
        );
        let tolp = (want.abs() + bias[o].abs() as f64) * 3.0 * f32::EPSILON as f64 + 1e-30;
        assert!(
            (gotp as f64 - want).abs() <= tolp,
            "{at}: packed elem {i}: got {gotp}, want {want}, tol {tolp}"
        );
        assert!(
            (gotp - got).abs() as f64 <= tol + tolp,
            "{at}: packed {gotp} vs float {got}"
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

fn tiled_shapes(dev: &Device) -> Result<()> {
    // Larger than one im2col tile (1 Mi codes): the rows of one image split over tiles, and a
    // batch split into tiles of whole images.
    let mut r = rng("conv_tiled_shapes");
    let shapes = [
        Shape {
            b: 2,
            c: 16,
            h: 53,
            w: 53,
            co: 3,
            k: 5,
            stride: 1,
            pad: 2,
        },
        Shape {
            b: 40,
            c: 3,
            h: 64,
            w: 63,
            co: 4,
            k: 3,
            stride: 1,
            pad: 1,
        },
    ];
    // CUDA's tiles are 64x larger by default: force the CPU's budget so they split there too.
    let budget = |codes| {
        let mut settings = bitlinear::kernel_settings(dev);
        settings.force.im2col_tile_codes = codes;
        bitlinear::set_kernel_settings(dev, settings)
    };
    if dev.is_cuda() {
        budget(Some(1 << 20))?;
    }
    for s in &shapes {
        check_shape(dev, s, &mut r)?;
    }
    if dev.is_cuda() {
        budget(None)?;
    }
    Ok(())
}

/// Convolutions of 16k input channels, which CUDA runs on the implicit GEMM
/// (`plan::implicit_conv_plan`; the training forward at stride 1, the packed form at any
/// stride): partial row and column tiles, rows spanning images, k tails, kernels 1 to 5 with
/// every padding below the kernel, strides 1 and 2; on CUDA both forms with the implicit GEMM
/// forced off (the im2col path) must agree bit for bit.
fn implicit_gemm_shapes(dev: &Device) -> Result<()> {
    let mut r = rng("conv_implicit_gemm_shapes");
    let mut shapes: Vec<Shape> = (0..if dev.is_cuda() { 40 } else { 6 })
        .map(|i| {
            let k = [1, 3, 3, 5][i % 4];
            Shape {
                b: if i % 2 == 0 { 1 } else { r.gen_range(2..10) },
                c: 16 * r.gen_range(1..5),
                h: r.gen_range(k.max(2)..12),
                w: r.gen_range(k.max(2)..12),
                co: [1, 7, 64, 65, 128, 130][r.gen_range(0..6)],
                k,
                stride: 1 + i % 3 / 2,
                pad: r.gen_range(0..k),
            }
        })
        .collect();
    if dev.is_cuda() {
        // the speed-run network's shapes at a small batch: several row tiles, the N128 tile
        for (b, c, hw, co) in [(12, 32, 32, 64), (8, 64, 16, 256), (20, 256, 4, 256), (3, 256, 8, 70)] {
            shapes.push(Shape {
                b,
                c,
                h: hw,
                w: hw,
                co,
                k: 3,
                stride: 1,
                pad: 1,
            });
        }
    }
    for s in &shapes {
        check_shape(dev, s, &mut r)?;
        if dev.is_cuda() {
            let x = Tensor::from_vec(randn(&mut r, s.b * s.c * s.h * s.w, 1.0), (s.b, s.c, s.h, s.w), dev)?;
            let w = Tensor::from_vec(randn(&mut r, s.co * s.c * s.k * s.k, 0.2), (s.co, s.c, s.k, s.k), dev)?;
            let cfg = BitConv2dConfig {
                padding: s.pad,
                ..Default::default()
            };
            let layer = BitConv2d::new(w, None, cfg)?;
            let packed = layer.pack()?;
            let forced = |on| {
                let mut settings = bitlinear::kernel_settings(dev);
                settings.force.implicit_conv = on;
                bitlinear::set_kernel_settings(dev, settings)
            };
            let both = || -> Result<(Vec<f32>, Vec<f32>)> {
                Ok((
                    layer.forward(&x)?.flatten_all()?.to_vec1()?,
                    packed.forward(&x)?.flatten_all()?.to_vec1()?,
                ))
            };
            let implicit = both()?;
            forced(Some(false))?;
            let im2col = both();
            forced(None)?;
            assert!(implicit == im2col?, "{s:?}: implicit GEMM and im2col forwards differ");
        }
    }
    Ok(())
}

/// Straight-through gradients of `Σ g · conv(x~, w~)` in f64, with `x~ = x_q·s_x` per image and
/// `w~ = w_q·s_w`: `dx[n,c,iy,ix] = Σ g[n,o,y,x]·w~[o,c,ky,kx]` over the taps reading that input,
/// `dw[o,c,ky,kx] = Σ g[n,o,y,x]·x~[n,c,iy,ix]`; padding taps read nothing.
/// Each with the sum of the magnitudes of its terms, for a rounding bound. `quantized: false`
/// takes `x~ = x` and `w~ = w` (a float convolution's gradients).
fn ref_conv_grads(s: &Shape, x: &[f32], w: &[f32], g: &[f32], quantized: bool) -> [(Vec<f64>, Vec<f64>); 2] {
    let acts = ref_quantize_rows(x, s.b, s.c * s.h * s.w);
    let wts = ref_quantize_weights(w);
    let x_tilde: Vec<f64> = match quantized {
        true => (0..x.len())
            .map(|i| acts.q[i] as f64 * acts.scales[i / (s.c * s.h * s.w)] as f64)
            .collect(),
        false => x.iter().map(|&v| v as f64).collect(),
    };
    let w_tilde: Vec<f64> = match quantized {
        true => wts.q.iter().map(|&q| q as f64 * wts.scale as f64).collect(),
        false => w.iter().map(|&v| v as f64).collect(),
    };
    let ho = (s.h + 2 * s.pad - s.k) / s.stride + 1;
    let wo = (s.w + 2 * s.pad - s.k) / s.stride + 1;
    let (mut dx, mut dw) = (vec![0f64; x.len()], vec![0f64; w.len()]);
    let (mut dxa, mut dwa) = (vec![0f64; x.len()], vec![0f64; w.len()]);
    for n in 0..s.b {
        for o in 0..s.co {
            for y in 0..ho {
                for xo in 0..wo {
                    let gv = g[((n * s.co + o) * ho + y) * wo + xo] as f64;
                    for c in 0..s.c {
                        for ky in 0..s.k {
                            for kx in 0..s.k {
                                let iy = (y * s.stride + ky) as isize - s.pad as isize;
                                let ix = (xo * s.stride + kx) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                let xi = ((n * s.c + c) * s.h + iy as usize) * s.w + ix as usize;
                                let wi = ((o * s.c + c) * s.k + ky) * s.k + kx;
                                let (tx, tw) = (gv * w_tilde[wi], gv * x_tilde[xi]);
                                (dx[xi], dxa[xi]) = (dx[xi] + tx, dxa[xi] + tx.abs());
                                (dw[wi], dwa[wi]) = (dw[wi] + tw, dwa[wi] + tw.abs());
                            }
                        }
                    }
                }
            }
        }
    }
    [(dx, dxa), (dw, dwa)]
}

/// A stride-1 shape from `(b, c, (h, w), co, k, pad)`.
fn stride1((b, c, (h, w), co, k, pad): (usize, usize, (usize, usize), usize, usize, usize)) -> Shape {
    Shape {
        b,
        c,
        h,
        w,
        co,
        k,
        stride: 1,
        pad,
    }
}

/// Each of `got` within `rel` of its reference terms' magnitude `mag` of `want`.
fn assert_grads_near(what: &str, got: &[f32], (want, mag): (&[f64], &[f64]), rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&gv, &wv), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = rel * m + 1e-12;
        assert!(
            (gv as f64 - wv).abs() <= tol,
            "{what}[{i}]: got {gv}, want {wv}, tol {tol}"
        );
    }
}

fn backward_reference(dev: &Device) -> Result<()> {
    // The layer's gradients against the f64 straight-through reference, on random shapes.
    let mut r = rng("conv_backward_reference");
    let mut shapes: Vec<Shape> = (0..if dev.is_cuda() { 20 } else { 6 })
        .map(|_| Shape {
            b: r.gen_range(1..4),
            c: [3, r.gen_range(1..6)][r.gen_range(0..2)],
            h: 2 * r.gen_range(2..5) + 1,
            w: 2 * r.gen_range(2..5) + 1,
            co: r.gen_range(1..6),
            k: [1, 3][r.gen_range(0..2)],
            stride: r.gen_range(1..3),
            pad: r.gen_range(0..2),
        })
        .collect();
    if dev.is_cuda() {
        // products of several cuBLAS tiles and split-K reductions: more channels, images and
        // pixels than the random shapes, a 5x5 kernel; pixel counts that are multiples of 4
        // with rows that are not, small (single pixels a thread) and large (the transposed
        // im2col's runs of 4 pixels then straddle rows), unpadded and padded; output channels
        // in eights, whose input gradient the bf16 implicit GEMM computes (each of its tiles,
        // partial pixel, channel and k tiles, a 5x5 kernel); batches in eights, whose weight
        // gradient it computes where forced on (a 3-channel first layer, split and unsplit k
        // ranges)
        shapes.extend(
            [
                (8, 16, (8, 8), 24, 3, 1),
                (16, 8, (5, 7), 16, 3, 0),
                (8, 3, (9, 9), 8, 3, 1),
                (8, 24, (6, 6), 40, 5, 2),
                (4, 32, (16, 16), 64, 3, 1),
                (3, 24, (9, 11), 40, 3, 1),
                (2, 40, (5, 6), 136, 3, 1),
                (2, 72, (7, 7), 16, 3, 0),
                (2, 8, (12, 12), 8, 5, 2),
                (3, 70, (9, 9), 130, 3, 1),
                (2, 5, (33, 33), 3, 5, 2),
                (2, 5, (8, 7), 3, 3, 1),
                (3, 4, (10, 6), 5, 3, 0),
                (2, 3, (32, 33), 4, 3, 1),
            ]
            .map(stride1),
        );
    }
    for s in shapes {
        let (ho, wo) = (
            (s.h + 2 * s.pad - s.k) / s.stride + 1,
            (s.w + 2 * s.pad - s.k) / s.stride + 1,
        );
        let x = randn(&mut r, s.b * s.c * s.h * s.w, 1.0);
        let w = randn(&mut r, s.co * s.c * s.k * s.k, 0.2);
        let g = randn(&mut r, s.b * s.co * ho * wo, 1.0);
        let xv = candle_core::Var::from_vec(x.clone(), (s.b, s.c, s.h, s.w), dev)?;
        let wv = candle_core::Var::from_vec(w.clone(), (s.co, s.c, s.k, s.k), dev)?;
        let cfg = BitConv2dConfig {
            stride: s.stride,
            padding: s.pad,
            bias: false,
            ..Default::default()
        };
        let layer = BitConv2d::new(wv.as_tensor().clone(), None, cfg)?;
        let gt = Tensor::from_vec(g.clone(), (s.b, s.co, ho, wo), dev)?;
        let grads = (layer.forward(xv.as_tensor())? * &gt)?.sum_all()?.backward()?;
        // Images that are not a variable (a first layer's) get no gradient, the weight the same.
        let x_plain = Tensor::from_vec(x.clone(), (s.b, s.c, s.h, s.w), dev)?;
        let first_layer = (layer.forward(&x_plain)? * &gt)?.sum_all()?.backward()?;
        assert!(first_layer.get(&x_plain).is_none());
        let dw_of = |g: &candle_core::backprop::GradStore| -> Result<Vec<f32>> {
            g.get(&wv).expect("dw").flatten_all()?.to_vec1()
        };
        assert_eq!(dw_of(&first_layer)?, dw_of(&grads)?, "{s:?}: dw without dx");
        let [dx, dw] = ref_conv_grads(&s, &x, &w, &g, true);
        for (name, var, (want, mag)) in [("dx", &xv, dx), ("dw", &wv, dw)] {
            let got: Vec<f32> = grads.get(var).expect(name).flatten_all()?.to_vec1()?;
            // f32 sums of at most B·Ho·Wo (dw) or c_out·k·k (dx) terms (at most 363 here): each
            // step rounds by 2^-24 of a partial sum, so 1e-4 of the terms' magnitudes bounds it.
            assert_grads_near(&format!("{s:?} {name}"), &got, (&want, &mag), 1e-4);
        }
        if dev.is_cuda() {
            // bf16 operands (x~, W~, g each rounded by at most 2^-8 relative: 8 significant
            // bits; a term's two factors by 2 · 2^-8 + 2^-16 together), f32 sums and f32
            // results: within 3 · 2^-8 of the terms' magnitudes.
            let cfg = BitConv2dConfig {
                bf16_grad_products: true,
                ..cfg
            };
            let layer = BitConv2d::new(wv.as_tensor().clone(), None, cfg)?;
            let [dx, dw] = ref_conv_grads(&s, &x, &w, &g, true);
            // Each product forced onto the bf16 implicit GEMM (where it takes the shape:
            // channels, resp. batches, in eights) under the rules' tiles and under each tile
            // forced, both forced off it, and last the rules' choice (which also leaves the
            // device's settings as they were).
            use bitlinear::plan::Bf16ConvTile;
            let on = (Some(true), Some(true));
            let choices = [
                (on, None),
                (on, Some(Bf16ConvTile::N32)),
                (on, Some(Bf16ConvTile::N128W4)),
                ((Some(false), Some(false)), None),
                ((None, None), None),
            ];
            for ((input_grad, weight_grad), tile) in choices {
                let mut settings = bitlinear::kernel_settings(dev);
                settings.force.implicit_input_grad = input_grad;
                settings.force.implicit_weight_grad = weight_grad;
                settings.force.bf16_conv_tile = tile;
                bitlinear::set_kernel_settings(dev, settings)?;
                let grads = (layer.forward(xv.as_tensor())? * &gt)?.sum_all()?.backward()?;
                for (name, var, (want, mag)) in [("bf16 dx", &xv, &dx), ("bf16 dw", &wv, &dw)] {
                    let got = grads.get(var).expect(name);
                    assert_eq!(got.dtype(), DType::F32, "{name}: returned in the variable's dtype");
                    let got: Vec<f32> = got.flatten_all()?.to_vec1()?;
                    let what = format!("{s:?} {name}, implicit {input_grad:?} / {weight_grad:?}, tile {tile:?}");
                    assert_grads_near(&what, &got, (want, mag), 3.0 / 256.0);
                }
            }
        }
    }
    Ok(())
}

fn float_backward_reference(dev: &Device) -> Result<()> {
    // bitlinear::float_conv2d: candle's conv2d value exactly, its gradients against the f64
    // float reference (no quantization), images with and without a gradient.
    let mut r = rng("conv_float_backward_reference");
    let mut shapes: Vec<Shape> = (0..if dev.is_cuda() { 12 } else { 6 })
        .map(|_| Shape {
            b: r.gen_range(1..4),
            c: [3, r.gen_range(1..6)][r.gen_range(0..2)],
            h: 2 * r.gen_range(2..5) + 1,
            w: 2 * r.gen_range(2..5),
            co: r.gen_range(1..6),
            k: [1, 3, 5][r.gen_range(0..3)],
            stride: 1,
            pad: r.gen_range(0..3),
        })
        .collect();
    // several cuBLAS tiles; kernels wider than the padded input, by one and by more (no
    // output: an error)
    shapes.extend(
        [
            (4, 32, (16, 16), 64, 3, 1),
            (2, 3, (6, 4), 2, 5, 0),
            (1, 2, (2, 2), 3, 5, 1),
        ]
        .map(stride1),
    );
    for s in shapes {
        if s.k > s.h + 2 * s.pad || s.k > s.w + 2 * s.pad {
            let x = Tensor::zeros((s.b, s.c, s.h, s.w), DType::F32, dev)?;
            let w = candle_core::Var::zeros((s.co, s.c, s.k, s.k), DType::F32, dev)?;
            assert!(
                bitlinear::float_conv2d(&x, w.as_tensor(), s.pad).is_err(),
                "{s:?}: a kernel larger than the padded input accepted"
            );
            continue;
        }
        let (ho, wo) = (s.h + 2 * s.pad + 1 - s.k, s.w + 2 * s.pad + 1 - s.k);
        let x = randn(&mut r, s.b * s.c * s.h * s.w, 1.0);
        let w = randn(&mut r, s.co * s.c * s.k * s.k, 0.2);
        let g = randn(&mut r, s.b * s.co * ho * wo, 1.0);
        let xv = candle_core::Var::from_vec(x.clone(), (s.b, s.c, s.h, s.w), dev)?;
        let wv = candle_core::Var::from_vec(w.clone(), (s.co, s.c, s.k, s.k), dev)?;
        let y = bitlinear::float_conv2d(xv.as_tensor(), wv.as_tensor(), s.pad)?;
        let candle_y = xv.as_tensor().conv2d(wv.as_tensor(), s.pad, 1, 1, 1)?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            candle_y.flatten_all()?.to_vec1::<f32>()?,
            "{s:?}: value"
        );
        let gt = Tensor::from_vec(g.clone(), (s.b, s.co, ho, wo), dev)?;
        let grads = (y * &gt)?.sum_all()?.backward()?;
        let [dx, dw] = ref_conv_grads(&s, &x, &w, &g, false);
        for (name, var, (want, mag)) in [("dx", &xv, dx), ("dw", &wv, dw)] {
            let got: Vec<f32> = grads.get(var).expect(name).flatten_all()?.to_vec1()?;
            // f32 sums of at most 1024 terms here (2^-24 a step): within 1e-4 of the magnitudes
            assert_grads_near(&format!("{s:?} {name}"), &got, (&want, &mag), 1e-4);
        }
        let plain = Tensor::from_vec(x.clone(), (s.b, s.c, s.h, s.w), dev)?;
        let alone = (bitlinear::float_conv2d(&plain, wv.as_tensor(), s.pad)? * &gt)?
            .sum_all()?
            .backward()?;
        let dw_of = |g: &candle_core::backprop::GradStore| -> Result<Vec<f32>> {
            g.get(&wv).expect("dw").flatten_all()?.to_vec1()
        };
        assert_eq!(dw_of(&alone)?, dw_of(&grads)?, "{s:?}: dw without dx");
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
            ..Default::default()
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
    let wt = Tensor::zeros((4, 3, 3, 3), DType::F32, dev)?;
    let cfg = BitConv2dConfig {
        bias: false,
        ..Default::default()
    };
    let layer = BitConv2d::new(wt, None, cfg)?;
    let packed = layer.pack()?;
    let forms: [(&str, &dyn Module); 2] = [("float", &layer), ("packed", &packed)];
    for (form, m) in forms {
        let f = |d: &[usize], dt: DType| m.forward(&Tensor::zeros(d, dt, dev)?);
        assert!(f(&[3, 5, 5], DType::F32).is_err(), "{form}: rank 3 accepted");
        assert!(f(&[1, 1, 3, 5, 5], DType::F32).is_err(), "{form}: rank 5 accepted");
        assert!(
            f(&[1, 2, 5, 5], DType::F32).is_err(),
            "{form}: channel mismatch accepted"
        );
        assert!(
            f(&[1, 3, 2, 5], DType::F32).is_err(),
            "{form}: kernel taller than input accepted"
        );
        assert!(
            f(&[1, 3, 5, 2], DType::F32).is_err(),
            "{form}: kernel wider than input accepted"
        );
        assert!(f(&[1, 3, 5, 5], DType::U8).is_err(), "{form}: u8 accepted");
        assert!(f(&[1, 3, 5, 5], DType::U32).is_err(), "{form}: u32 accepted");
    }
    // Padding makes a small input fit.
    let padded = BitConv2d::new(layer.weight().clone(), None, BitConv2dConfig { padding: 1, ..cfg })?;
    assert_eq!(
        padded
            .pack()?
            .forward(&Tensor::zeros((1, 3, 1, 1), DType::F32, dev)?)?
            .dims(),
        &[1, 4, 1, 1]
    );
    assert!(BitConv2d::new(layer.weight().clone(), None, BitConv2dConfig { stride: 0, ..cfg }).is_err());
    Ok(())
}

fn empty_batch(dev: &Device) -> Result<()> {
    // Empty in, empty out (tests/empty.rs): the right shape and dtype, no elements.
    let mut r = rng("conv_empty");
    let wt = Tensor::from_vec(randn(&mut r, 4 * 3 * 3 * 3, 0.2), (4, 3, 3, 3), dev)?;
    let bias = Tensor::from_vec(randn(&mut r, 4, 0.1), 4, dev)?;
    let cfg = BitConv2dConfig {
        stride: 2,
        padding: 1,
        bias: true,
        ..Default::default()
    };
    let layer = BitConv2d::new(wt, Some(bias), cfg)?;
    let packed = layer.pack()?;
    for dt in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let x = Tensor::zeros((0, 3, 7, 5), dt, dev)?;
        for y in [layer.forward(&x)?, packed.forward(&x)?] {
            assert_eq!(y.dims(), &[0, 4, 4, 3], "{dt:?}");
            assert_eq!(y.dtype(), dt);
        }
        let (acc, scales) = packed.accumulate(&x)?;
        assert_eq!((acc.dims(), acc.dtype()), (&[0, 4, 4, 3][..], DType::I32));
        assert_eq!(scales.dims(), &[0]);
    }
    // No input channels: nothing to sum, so both forms give the bias everywhere.
    let bias = Tensor::from_vec(randn(&mut r, 4, 0.1), 4, dev)?;
    let layer = BitConv2d::new(Tensor::zeros((4, 0, 3, 3), DType::F32, dev)?, Some(bias.clone()), cfg)?;
    let x = Tensor::zeros((2, 0, 7, 5), DType::F32, dev)?;
    let want = bias
        .reshape((1, 4, 1, 1))?
        .broadcast_as((2, 4, 4, 3))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for y in [layer.forward(&x)?, layer.pack()?.forward(&x)?] {
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, want);
    }
    Ok(())
}

fn packed_storage(dev: &Device) -> Result<()> {
    // tensors() -> load() rebuilds the same layer; missing, misshapen or invalid tensors are errors.
    let mut r = rng("conv_storage");
    let (c, co, k) = (3, 5, 3);
    let wt = Tensor::from_vec(randn(&mut r, co * c * k * k, 0.2), (co, c, k, k), dev)?;
    let bias = Tensor::from_vec(randn(&mut r, co, 0.1), co, dev)?;
    let cfg = BitConv2dConfig {
        stride: 2,
        padding: 1,
        bias: true,
        ..Default::default()
    };
    let packed = BitConv2d::new(wt, Some(bias), cfg)?.pack()?;
    let tensors: HashMap<String, Tensor> = packed.tensors()?.into_iter().collect();
    assert_eq!(tensors["weight.packed"].dims(), &[co, 7]);
    let load =
        |t: HashMap<String, Tensor>| PackedBitConv2d::load(c, co, k, cfg, VarBuilder::from_tensors(t, DType::F32, dev));
    let loaded = load(tensors.clone())?;
    let x = Tensor::from_vec(randn(&mut r, 2 * c * 9 * 7, 1.0), (2, c, 9, 7), dev)?;
    assert_eq!(
        loaded.forward(&x)?.flatten_all()?.to_vec1::<f32>()?,
        packed.forward(&x)?.flatten_all()?.to_vec1::<f32>()?
    );
    for name in ["weight.packed", "weight.scale", "bias"] {
        let mut t = tensors.clone();
        t.remove(name);
        let e = load(t).expect_err(name).to_string();
        assert!(e.contains(name) && e.contains("missing"), "{name}: {e}");
    }
    assert!(
        PackedBitConv2d::load(
            c,
            co,
            5,
            cfg,
            VarBuilder::from_tensors(tensors.clone(), DType::F32, dev)
        )
        .is_err(),
        "wrong kernel size accepted"
    );
    let mut t = tensors.clone();
    t.insert("weight.packed".into(), Tensor::full(0xFFu8, (co, 7), dev)?);
    assert!(load(t).is_err(), "code 3 accepted");
    let mut t = tensors;
    t.insert("weight.scale".into(), Tensor::new(&[f32::NAN], dev)?);
    assert!(load(t).is_err(), "NaN scale accepted");
    Ok(())
}

/// A `Shape` of `(b, c, co, k, stride, pad)` over an input of odd height `2h + 1` and even width
/// `2w`, `h` and `w` drawn from `sides`.
fn odd_by_even(
    r: &mut rand::rngs::StdRng,
    (b, c, co, k, stride, pad): (usize, usize, usize, usize, usize, usize),
    sides: std::ops::Range<usize>,
) -> Shape {
    Shape {
        b,
        c,
        h: 2 * r.gen_range(sides.clone()) + 1,
        w: 2 * r.gen_range(sides),
        co,
        k,
        stride,
        pad,
    }
}

/// `per_channel_codes`: each output channel's codes against its own absmean (channels of very
/// unequal magnitude), every non-zero code worth the whole tensor's absmean; the packed form
/// holds those codes and that scale, and both forms compute the reference's integers.
fn per_channel_codes(dev: &Device) -> Result<()> {
    let mut r = rng("conv_per_channel_codes");
    for (b, c, co, k, stride, pad) in [
        (2, 3, 6, 3, 1, 1),
        (3, 5, 9, 3, 2, 0),
        (1, 4, 7, 1, 1, 0),
        (2, 8, 16, 3, 1, 1),
    ] {
        let s = odd_by_even(&mut r, (b, c, co, k, stride, pad), 2..6);
        let kk = c * k * k;
        let x = randn(&mut r, b * c * s.h * s.w, 1.0);
        let mut w = randn(&mut r, co * kk, 0.2);
        for (o, row) in w.chunks_mut(kk).enumerate() {
            let f = [0.05f32, 0.3, 1.0, 3.0][o % 4];
            row.iter_mut().for_each(|v| *v *= f);
        }
        let bias = randn(&mut r, co, 0.1);
        let cfg = BitConv2dConfig {
            stride,
            padding: pad,
            per_channel_codes: true,
            ..Default::default()
        };
        let layer = BitConv2d::new(
            Tensor::from_vec(w.clone(), (co, c, k, k), dev)?,
            Some(Tensor::from_vec(bias.clone(), co, dev)?),
            cfg,
        )?;
        let want_codes: Vec<i8> = w.chunks(kk).flat_map(|row| ref_quantize_weights(row).q).collect();
        let s_w = ref_quantize_weights(&w).scale;
        let at = format!("{s:?}");
        assert_ne!(
            want_codes,
            ref_quantize_weights(&w).q,
            "{at}: per-tensor codes would be the same"
        );
        let packed = layer.pack()?;
        assert_eq!(packed.weight().unpack()?, want_codes, "{at}: packed codes");
        assert_eq!(packed.weight().scale(), s_w, "{at}: packed scale");
        let xt = Tensor::from_vec(x.clone(), (b, c, s.h, s.w), dev)?;
        let acts = ref_quantize_rows(&x, b, c * s.h * s.w);
        let (acc, ho, wo) = ref_conv_int(&s, &acts.q, &want_codes);
        let pacc: Vec<i64> = packed
            .accumulate(&xt)?
            .0
            .flatten_all()?
            .to_vec1::<i32>()?
            .into_iter()
            .map(i64::from)
            .collect();
        assert!(pacc == acc, "{at}: packed accumulators differ from the reference");
        let y: Vec<f32> = layer.forward(&xt)?.flatten_all()?.to_vec1()?;
        let yp: Vec<f32> = packed.forward(&xt)?.flatten_all()?.to_vec1()?;
        for (i, ((&got, &gotp), &a)) in y.iter().zip(&yp).zip(&acc).enumerate() {
            let (n, o) = (i / (co * ho * wo), (i / (ho * wo)) % co);
            let want = (a as f32 * acts.scales[n]) * s_w + bias[o];
            assert!(
                got.to_bits() == want.to_bits() && gotp.to_bits() == want.to_bits(),
                "{at}: elem {i}: training form {got}, packed form {gotp}, want {want} (acc {a})"
            );
        }
    }
    Ok(())
}

device_test!(
    per_channel_codes,
    random_shapes,
    tiled_shapes,
    implicit_gemm_shapes,
    straight_through_grads,
    backward_reference,
    float_backward_reference,
    bad_inputs,
    empty_batch,
    packed_storage
);

/// The CPU forward under each CPU kernel this machine runs (the 512-bit VNNI one takes the
/// broadcast kernel, the others the row kernels over the reordered packed weight); the kernels
/// it lacks are named as skipped. Forcing is process-wide, but every kernel gives the same
/// integers, so the other tests of this binary are unaffected.
#[test]
fn every_cpu_kernel() -> Result<()> {
    use bitlinear::plan::{CpuKernel, ForcedChoices, KernelSettings};
    let set = |cpu_kernel| {
        let force = ForcedChoices {
            cpu_kernel,
            ..Default::default()
        };
        bitlinear::set_kernel_settings(
            &Device::Cpu,
            KernelSettings {
                force,
                ..Default::default()
            },
        )
    };
    let mut r = rng("conv_every_cpu_kernel");
    for kernel in CpuKernel::ALL {
        if !kernel.is_supported() {
            eprintln!("every_cpu_kernel: {kernel:?} skipped, not supported by this CPU");
            continue;
        }
        set(Some(kernel))?;
        for (b, c, co, k, stride, pad) in [
            (3, 3, 32, 3, 1, 1),
            (2, 7, 21, 3, 2, 0),
            (1, 16, 70, 5, 1, 2),
            (70, 2, 5, 1, 1, 0),
        ] {
            let s = odd_by_even(&mut r, (b, c, co, k, stride, pad), 3..8);
            check_shape(&Device::Cpu, &s, &mut r).map_err(|e| e.context(format!("kernel {kernel:?}")))?;
        }
    }
    set(None)
}
