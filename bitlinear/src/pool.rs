//! 2x2 max pooling with a fast CPU kernel.
//!
//! candle 0.11's `max_pool2d` backward is built from generic ops (upsample, compare, average-pool,
//! upsample again), which made it a large part of a CPU training step of the CNN, and it scales
//! the gradient by (number of maxima in the window) / 4, i.e. by 1/4 for the usual single maximum,
//! where PyTorch passes it through unscaled. [`max_pool2x2`] computes the same forward values and
//! sends each window's gradient, unscaled, to its maximum (the first one in row-major order on
//! ties, as PyTorch does), in one pass each way, over rayon's threads.
//! With the `cuda` feature, f32, bf16 and f16 tensors on a CUDA device use two fused kernels
//! (`kernels/pool.cu`) with the same semantics; [`crate::BitConv2d::forward_max_pool2x2`] runs
//! the same pooling inside its convolution's op. Other devices and dtypes use
//! [`max_pool2x2_ops`], the same pooling written with reshape and `max` reductions (whose
//! backward is correct on every device); odd sizes use candle's `max_pool2d`. [`PoolKernel`]
//! chooses between the two, so that a benchmark can measure what the fused kernels bring.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Which implementation of 2x2 max pooling a network runs. Both give the same forward values; on
/// ties the fused kernels send the gradient to the first maximum (as PyTorch does), the tensor ops
/// to every maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolKernel {
    /// [`max_pool2x2`]: the fused kernels where the device has them (the default).
    #[default]
    Fused,
    /// [`max_pool2x2_ops`]: generic tensor ops on every device.
    TensorOps,
}

impl PoolKernel {
    /// 2x2, stride 2 max pooling of a (B, C, H, W) tensor with this implementation.
    pub fn max_pool2x2(self, x: &Tensor) -> Result<Tensor> {
        match self {
            PoolKernel::Fused => max_pool2x2(x),
            PoolKernel::TensorOps => max_pool2x2_ops(x),
        }
    }
}

/// 2x2, stride 2 max pooling of a (B, C, H, W) tensor.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    if has_fused_kernels(x.dims(), x.dtype(), x.device()) {
        x.contiguous()?.apply_op1(MaxPool2x2)
    } else {
        max_pool2x2_ops(x)
    }
}

/// Whether [`max_pool2x2`] runs the fused kernels on a tensor of `dims` and `dtype` on `device`:
/// the CPU or CUDA, f32, bf16 or f16, rank 4 with even, non-zero height and even width.
pub(crate) fn has_fused_kernels(dims: &[usize], dtype: DType, device: &candle_core::Device) -> bool {
    let fused_device = match device {
        candle_core::Device::Cpu => true,
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => true,
        _ => false,
    };
    match dims {
        [_, _, h, w] => {
            fused_device && matches!(dtype, DType::F32 | DType::BF16 | DType::F16) && h % 2 == 0 && w % 2 == 0 && *h > 0
        }
        _ => false,
    }
}

/// [`max_pool2x2`]'s value on its fused kernels ([`has_fused_kernels`]), without a graph node.
pub(crate) fn pooled_values(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&MaxPool2x2)
}

/// The input gradient of [`max_pool2x2`] over `x` (fused kernels) for the output gradient `g`.
pub(crate) fn pool_input_grad(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &MaxPool2x2Bwd)
}

/// 2x2, stride 2 max pooling from generic tensor ops (any device and dtype): a (B, C, H, W)
/// tensor viewed as (B, C, H/2, 2, W/2, 2), reduced with `max` over the two window axes. Each
/// window's gradient goes, unscaled, to its maximum (to every maximum on ties).
pub fn max_pool2x2_ops(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        return x.max_pool2d(2);
    }
    x.contiguous()?.reshape((b, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
}

/// The contiguous values of a storage of `T`.
fn values<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let v = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("max_pool2x2: {what} must be contiguous"),
    }
}

fn dims4(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

/// The input's dims, the gradient's shape checked against its windows.
fn check_grad_shape(input: &Layout, grad: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (b, c, h, w) = dims4(input)?;
    if grad.shape().dims() != [b, c, h / 2, w / 2] {
        candle_core::bail!(
            "max_pool2x2 backward: gradient shape {:?} for input {:?}",
            grad.shape(),
            input.shape()
        );
    }
    Ok((b, c, h, w))
}

/// Index (0..4: top-left, top-right, bottom-left, bottom-right) of the first maximum, and its
/// value (compared as f64: exact for every float dtype).
#[inline]
fn argmax4<T: WithDType>(a: T, b: T, c: T, d: T) -> (usize, T) {
    let (mut k, mut m) = (0, a);
    for (i, v) in [(1, b), (2, c), (3, d)] {
        let (vf, mf) = (v.to_f64(), m.to_f64());
        // A NaN in the window wins, so NaNs propagate instead of being silently pooled away.
        if vf > mf || vf.is_nan() && !mf.is_nan() {
            k = i;
            m = v;
        }
    }
    (k, m)
}

/// Each window's maximum of the contiguous `(b, c, h, w)` values `x`.
fn pool_fwd<T: WithDType>(x: &[T], (b, c, h, w): (usize, usize, usize, usize)) -> CpuStorage {
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![T::zero(); b * c * ho * wo];
    out.par_chunks_mut(ho * wo).zip(x.par_chunks(h * w)).for_each(|(o, p)| {
        for i in 0..ho {
            let r0 = &p[2 * i * w..2 * i * w + w];
            let r1 = &p[(2 * i + 1) * w..(2 * i + 1) * w + w];
            for j in 0..wo {
                o[i * wo + j] = argmax4(r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]).1;
            }
        }
    });
    T::to_cpu_storage_owned(out)
}

/// The input gradient: each window's output gradient `g` at its first maximum, 0 elsewhere.
fn pool_bwd<T: WithDType>(x: &[T], g: &[T], (b, c, h, w): (usize, usize, usize, usize)) -> CpuStorage {
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![T::zero(); b * c * h * w];
    out.par_chunks_mut(h * w)
        .zip(x.par_chunks(h * w).zip(g.par_chunks(ho * wo)))
        .for_each(|(o, (p, gp))| {
            for i in 0..ho {
                for j in 0..wo {
                    let i0 = 2 * i * w + 2 * j;
                    let i1 = i0 + w;
                    let (k, _) = argmax4(p[i0], p[i0 + 1], p[i1], p[i1 + 1]);
                    let idx = [i0, i0 + 1, i1, i1 + 1][k];
                    o[idx] = gp[i * wo + j];
                }
            }
        });
    T::to_cpu_storage_owned(out)
}

struct MaxPool2x2;

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = dims4(l)?;
        let out = match s.dtype() {
            DType::F32 => pool_fwd(values::<f32>(s, l, "input")?, dims),
            DType::BF16 => pool_fwd(values::<half::bf16>(s, l, "input")?, dims),
            DType::F16 => pool_fwd(values::<half::f16>(s, l, "input")?, dims),
            dt => candle_core::bail!("max_pool2x2: unsupported dtype {dt:?}"),
        };
        let (b, c, h, w) = dims;
        Ok((out, Shape::from((b, c, h / 2, w / 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, c, h, w) = dims4(l)?;
        let out = crate::cuda::launch_pool(s, l, None, (b * c, h, w), b * c * (h / 2) * (w / 2))?;
        Ok((out, Shape::from((b, c, h / 2, w / 2))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        pool_input_grad(arg, grad_res).map(Some)
    }
}

/// (input, grad of output) -> grad of input.
struct MaxPool2x2Bwd;

impl CustomOp2 for MaxPool2x2Bwd {
    fn name(&self) -> &'static str {
        "max-pool-2x2-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = check_grad_shape(l1, l2)?;
        if s1.dtype() != s2.dtype() {
            candle_core::bail!(
                "max_pool2x2 backward: gradient {:?}, input {:?}",
                s2.dtype(),
                s1.dtype()
            )
        }
        let out = match s1.dtype() {
            DType::F32 => pool_bwd(values::<f32>(s1, l1, "input")?, values(s2, l2, "gradient")?, dims),
            DType::BF16 => pool_bwd(
                values::<half::bf16>(s1, l1, "input")?,
                values(s2, l2, "gradient")?,
                dims,
            ),
            DType::F16 => pool_bwd(values::<half::f16>(s1, l1, "input")?, values(s2, l2, "gradient")?, dims),
            dt => candle_core::bail!("max_pool2x2: unsupported dtype {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, c, h, w) = check_grad_shape(l1, l2)?;
        let out = crate::cuda::launch_pool(s1, l1, Some((s2, l2)), (b * c, h, w), b * c * h * w)?;
        Ok((out, l1.shape().clone()))
    }
}
