//! The attention kernel's operand checks (a CUDA device): bad operands are errors, not panics or
//! out-of-bounds reads.

use candle_core::{DType, Device, Result, Tensor};

use super::{AttentionArgs, DecodeAttention};

/// 4 query heads of 16 values over 2 KV heads, a cache of 8 positions, at position 3.
struct Operands {
    cos: Tensor,
    sin: Tensor,
    pos: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    counter: Tensor,
    qkv: Tensor,
}

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const D: usize = 16;

impl Operands {
    fn new(dev: &Device) -> Result<Self> {
        let table = || Tensor::rand(-1f32, 1.0, (8, D / 2), dev);
        Ok(Self {
            cos: table()?,
            sin: table()?,
            pos: Tensor::new(&[3u32], dev)?,
            cache_k: Tensor::zeros((1, KV_HEADS, 8, D), DType::F32, dev)?,
            cache_v: Tensor::zeros((1, KV_HEADS, 8, D), DType::F32, dev)?,
            counter: Tensor::zeros(1, DType::U32, dev)?,
            qkv: Tensor::rand(-1f32, 1.0, (1, (HEADS + 2 * KV_HEADS) * D), dev)?,
        })
    }

    /// The kernel with `sub_norm`, on these operands.
    fn run(&self, sub_norm: Option<(&Tensor, f32)>) -> Result<Tensor> {
        DecodeAttention {
            args: AttentionArgs {
                cos: &self.cos,
                sin: &self.sin,
                pos: &self.pos,
                cache_k: &self.cache_k,
                cache_v: &self.cache_v,
                sub_norm,
                counter: &self.counter,
                heads: HEADS,
                kv_heads: KV_HEADS,
                head_dim: D,
            },
            scales: [1.0; 3],
        }
        .forward(&self.qkv)
    }
}

/// The sub-norm gain must be `(heads · d,)` in the model's dtype; with one the kernel runs.
#[test]
fn sub_norm_gain_is_checked() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let ops = Operands::new(&dev)?;
    let gain = Tensor::ones(HEADS * D, DType::F32, &dev)?;
    let y = ops.run(Some((&gain, 1e-5)))?;
    assert_eq!(y.dims(), &[HEADS * D]);
    assert!(y.to_vec1::<f32>()?.iter().all(|v| v.is_finite()));
    for (bad, what) in [
        (gain.to_dtype(DType::BF16)?, "dtype"),
        (Tensor::ones(HEADS * D - 1, DType::F32, &dev)?, "length"),
    ] {
        let err = ops.run(Some((&bad, 1e-5))).expect_err(what).to_string();
        assert!(err.contains("sub-norm gain"), "{what}: {err}");
    }
    Ok(())
}

/// q, k and v of the wrong size or dtype are errors.
#[test]
fn projections_are_checked() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let mut ops = Operands::new(&dev)?;
    ops.qkv = ops.qkv.narrow(1, 0, (HEADS + 2 * KV_HEADS) * D - 8)?;
    assert!(ops.run(None).is_err(), "short q, k and v");
    ops.qkv = Tensor::zeros((1, (HEADS + 2 * KV_HEADS) * D), DType::BF16, &dev)?;
    assert!(ops.run(None).is_err(), "q, k and v of another dtype than the cache");
    Ok(())
}
