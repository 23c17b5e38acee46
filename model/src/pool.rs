//! 2x2 max pooling with a fast CPU kernel.
//!
//! candle 0.11's `max_pool2d` backward is built from generic ops (upsample, compare, average-pool,
//! upsample again), which made it a large part of a CPU training step of the CNN, and it scales
//! the gradient by (number of maxima in the window) / 4, i.e. by 1/4 for the usual single maximum,
//! where PyTorch passes it through unscaled. [`max_pool2x2`] computes the same forward values and
//! sends each window's gradient, unscaled, to its maximum (the first one in row-major order on
//! ties, as PyTorch does), in one pass each way, over rayon's threads.
//! With the `cuda` feature, f32, bf16 and f16 tensors on a CUDA device use two fused kernels
//! (`kernels/pool.cu`) with the same semantics. Other devices and dtypes use [`max_pool2x2_ops`],
//! the same pooling written with reshape and `max` reductions (whose backward is correct on every
//! device); odd sizes use candle's `max_pool2d`. [`PoolKernel`] chooses between the two, so that
//! a benchmark can measure what the fused kernels bring.

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
    let fast = match x.dims() {
        [_, _, h, w] => {
            fused_device(x)
                && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
                && h % 2 == 0
                && w % 2 == 0
                && *h > 0
        }
        _ => false,
    };
    if fast {
        x.contiguous()?.apply_op1(MaxPool2x2)
    } else {
        max_pool2x2_ops(x)
    }
}

/// Whether `x`'s device has the fused kernels.
fn fused_device(x: &Tensor) -> bool {
    match x.device() {
        candle_core::Device::Cpu => true,
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => true,
        _ => false,
    }
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
        let out = cuda::launch_pool(s, l, None, (b * c, h, w), b * c * (h / 2) * (w / 2))?;
        Ok((out, Shape::from((b, c, h / 2, w / 2))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&g, &MaxPool2x2Bwd)?))
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
        let out = cuda::launch_pool(s1, l1, Some((s2, l2)), (b * c, h, w), b * c * h * w)?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/pool.ptx"));

    /// The elements of a contiguous storage of `T`, from its start offset (which must be even:
    /// the kernels load pairs).
    fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("max_pool2x2: {what} must be contiguous")
        };
        if a % 2 != 0 {
            candle_core::bail!("max_pool2x2: {what} must start at an even offset")
        }
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    /// Launches the forward (`grad` absent) or backward kernel of `x`'s dtype over the
    /// `planes * (h/2) * (w/2)` windows; returns `out_len` elements of that dtype.
    pub fn launch_pool(
        x: &CudaStorage,
        xl: &Layout,
        grad: Option<(&CudaStorage, &Layout)>,
        dims: (usize, usize, usize),
        out_len: usize,
    ) -> Result<CudaStorage> {
        if let Some((g, _)) = grad {
            if g.dtype() != x.dtype() {
                candle_core::bail!("max_pool2x2 backward: gradient {:?}, input {:?}", g.dtype(), x.dtype())
            }
        }
        match x.dtype() {
            DType::F32 => launch::<f32>(x, xl, grad, dims, out_len, "f32"),
            DType::BF16 => launch::<half::bf16>(x, xl, grad, dims, out_len, "bf16"),
            DType::F16 => launch::<half::f16>(x, xl, grad, dims, out_len, "f16"),
            dt => candle_core::bail!("max_pool2x2: unsupported dtype {dt:?}"),
        }
    }

    fn launch<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        x: &CudaStorage,
        xl: &Layout,
        grad: Option<(&CudaStorage, &Layout)>,
        (planes, h, w): (usize, usize, usize),
        out_len: usize,
        suffix: &str,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let xv = view::<T>(x, xl, "input")?;
        let gv = grad.map(|(g, gl)| view::<T>(g, gl, "gradient")).transpose()?;
        // SAFETY: every element is written by the kernel (forward: one per window; backward: all
        // four of each window, and the windows tile the even-sized planes).
        let mut out = unsafe { dev.alloc::<T>(out_len.max(1)) }?;
        let windows = planes * (h / 2) * (w / 2);
        if windows > 0 {
            let name = match gv {
                None => format!("max_pool2x2_fwd_{suffix}"),
                Some(_) => format!("max_pool2x2_bwd_{suffix}"),
            };
            let f = dev.get_or_load_custom_func(&name, "model_pool", PTX)?;
            let threads = 256u32;
            let blocks = windows.div_ceil(threads as usize).min(65535 * 8) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let (planes, h, w) = (planes as i32, h as i32, w as i32);
            let mut b = f.builder();
            b.arg(&xv);
            if let Some(g) = &gv {
                b.arg(g);
            }
            b.arg(&planes).arg(&h).arg(&w).arg(&mut out);
            // SAFETY: the arguments match the kernel's C signature (kernels/pool.cu) for `T`; the
            // input views hold planes*h*w (x) and windows (g) elements, the output out_len.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}
