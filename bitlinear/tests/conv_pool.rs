//! `BitConv2d::forward_max_pool2x2` against the two ops it stands for, `max_pool2x2` of
//! `BitConv2d::forward`: the same values and the same gradients bit for bit (ties included: the
//! inputs take few distinct values, so pooling windows often hold equal maxima), with and
//! without bf16 backward products (on CUDA the pooled op then writes the output gradient channels
//! last in bf16 in one pass, where the two ops round and transpose the unpooled gradient), one
//! graph node fewer where it pools inside the convolution's op, and the same errors.

mod common;

use bitlinear::{max_pool2x2, BitConv2d, BitConv2dConfig};
use candle_core::{DType, Device, Module, Result, Tensor, Var};
use common::{device_test, rng};
use rand::Rng;

/// Values on a grid of 5 levels (many ties after quantization) with random signs.
fn coarse(r: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-2i32..=2) as f32 * 0.5).collect()
}

/// One case: `(b, c, h, w, co, k, stride, pad, bias, dtype)` and whether it pools inside the op.
type Case = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    bool,
    DType,
    bool,
);

fn pooled_conv_matches_conv_then_pool(dev: &Device) -> Result<()> {
    let mut r = rng("conv_pool");
    let cases: [Case; 10] = [
        (3, 2, 8, 6, 5, 3, 1, 1, false, DType::F32, true),
        (2, 1, 4, 4, 3, 1, 1, 0, false, DType::F32, true),
        (4, 3, 10, 10, 8, 3, 1, 0, false, DType::F32, true),
        (1, 5, 6, 12, 2, 5, 1, 2, false, DType::F32, true),
        // a batch and channels the CUDA bf16 implicit GEMM takes
        (16, 16, 16, 16, 64, 3, 1, 1, false, DType::F32, true),
        // the two ops: a bias, an odd output, stride 2, bf16
        (2, 2, 8, 8, 4, 3, 1, 1, true, DType::F32, false),
        (2, 2, 7, 8, 4, 3, 1, 1, false, DType::F32, false),
        (2, 2, 8, 8, 4, 3, 2, 1, false, DType::F32, false),
        (2, 2, 8, 8, 4, 3, 1, 1, false, DType::BF16, false),
        (0, 2, 8, 8, 4, 3, 1, 1, false, DType::F32, false),
    ];
    for ((b, c, h, w, co, k, stride, pad, bias, dtype, fuses), bf16_grad_products) in
        cases.into_iter().flat_map(|case| [(case, false), (case, true)])
    {
        let what = format!(
            "b={b} c={c} {h}x{w} co={co} k={k} stride={stride} pad={pad} bias={bias} {dtype:?} \
             bf16 products {bf16_grad_products}"
        );
        let x =
            Var::from_tensor(&Tensor::from_vec(coarse(&mut r, b * c * h * w), (b, c, h, w), dev)?.to_dtype(dtype)?)?;
        let wt = Var::from_vec(coarse(&mut r, co * c * k * k), (co, c, k, k), dev)?;
        let bias_var = Var::from_vec(coarse(&mut r, co), co, dev)?;
        let config = BitConv2dConfig {
            stride,
            padding: pad,
            bias,
            bf16_grad_products,
            ..Default::default()
        };
        let layer = BitConv2d::new(
            wt.as_tensor().clone(),
            bias.then(|| bias_var.as_tensor().clone()),
            config,
        )?;
        let ours = layer.forward_max_pool2x2(x.as_tensor())?;
        let theirs = max_pool2x2(&layer.forward(x.as_tensor())?)?;
        assert_eq!(ours.dims(), theirs.dims(), "{what}");
        assert_eq!(ours.dtype(), dtype, "{what}");
        let values = |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
        assert_eq!(values(&ours)?, values(&theirs)?, "{what}: values");
        if ours.elem_count() == 0 {
            continue;
        }
        let g = Tensor::from_vec(coarse(&mut r, ours.elem_count()), ours.dims(), dev)?.to_dtype(dtype)?;
        let ours_grads = (&ours * &g)?.sum_all()?.backward()?;
        let theirs_grads = (&theirs * &g)?.sum_all()?.backward()?;
        let mut vars = vec![("x", &x), ("weight", &wt)];
        if bias {
            vars.push(("bias", &bias_var));
        }
        for (name, v) in vars {
            let got = ours_grads.get(v.as_tensor()).expect("our gradient");
            let want = theirs_grads.get(v.as_tensor()).expect("their gradient");
            assert_eq!(values(got)?, values(want)?, "{what}: gradient of {name}");
        }
        // Where the op pools, the two ops' graph has one node more: the unpooled output, whose
        // gradient candle's backward would allocate and accumulate.
        assert_eq!(
            ours.sorted_nodes().len() + usize::from(fuses),
            theirs.sorted_nodes().len(),
            "{what}: graph nodes"
        );
    }
    // Bad inputs are the same errors as the forward's.
    let layer = BitConv2d::new(
        Tensor::zeros((4, 3, 3, 3), DType::F32, dev)?,
        None,
        BitConv2dConfig::default(),
    )?;
    for bad in [
        Tensor::zeros((2, 2, 8, 8), DType::F32, dev)?,
        Tensor::zeros((2, 3, 8), DType::F32, dev)?,
        Tensor::zeros((2, 3, 8, 8), DType::U8, dev)?,
        Tensor::zeros((2, 3, 2, 2), DType::F32, dev)?,
    ] {
        // (the first line: a backtrace may follow)
        let message = |e: candle_core::Error| e.to_string().lines().next().map(String::from);
        let err = layer.forward_max_pool2x2(&bad).expect_err("a bad input");
        let forward_err = layer.forward(&bad).expect_err("a bad input");
        assert_eq!(message(err), message(forward_err));
    }
    Ok(())
}

device_test!(pooled_conv_matches_conv_then_pool);
