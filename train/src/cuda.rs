//! Fused CUDA kernels of the training loop (feature `cuda`; kernels in `kernels/train_ops.cu`)
//! and the CUDA device settings used for training. Which of them the trainer uses is
//! [`crate::tuning::CudaTuning`]'s choice.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{sys, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor};
use cifar::Normalizer;

use crate::optim::AdamWConfig;
use crate::tuning::CudaTuning;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train_ops.ptx"));
const MODULE: &str = "train_ops";
const THREADS: u32 = 256;

/// Multiprocessor count of `dev`, read once per device.
fn sm_count(dev: &CudaDevice) -> Result<usize> {
    static SMS: OnceLock<Mutex<HashMap<DeviceId, usize>>> = OnceLock::new();
    let mut sms = SMS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(&n) = sms.get(&dev.id()) {
        return Ok(n);
    }
    let n = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?
        .max(1) as usize;
    sms.insert(dev.id(), n);
    Ok(n)
}

/// A grid-stride launch over `n` elements: one thread an element, at most 16 blocks per
/// multiprocessor (the kernels loop over the rest).
fn cfg(dev: &CudaDevice, n: usize) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, sm_count(dev)? * 16) as u32;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Settings for a training process on `dev`, before it creates tensors: with
/// [`CudaTuning::disable_event_tracking`], no per-allocation events; the process's TF32 switch of
/// f32 matrix products set to [`CudaTuning::tf32_matmul`].
pub fn tune_device(dev: &Device, tuning: &CudaTuning) {
    let Device::Cuda(d) = dev else { return };
    candle_core::cuda::set_gemm_reduced_precision_f32(tuning.tf32_matmul);
    if tuning.disable_event_tracking {
        // SAFETY: candle uses a single stream per device here, so no cross-stream ordering is
        // needed: the events only ever guard multi-stream use.
        unsafe { d.disable_event_tracking() };
    }
}

/// Device pointer of a contiguous f32 CUDA tensor's first element.
fn f32_ptr(t: &Tensor, stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*s else {
        candle_core::bail!("fused AdamW: tensor is not on a CUDA device")
    };
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("fused AdamW: tensor is not contiguous")
    };
    let slice = cs.as_cuda_slice::<f32>()?;
    let (p, _guard) = slice.device_ptr(stream);
    Ok(p + 4 * start as u64)
}

/// One fused AdamW update of `p` (with moments `m`, `v` and gradient `g`, all f32, same shape,
/// on the same CUDA device), in place. `bc1`, `bc2`: the bias corrections `1 - beta^t`.
pub fn adamw_step(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, c: &AdamWConfig, bc1: f64, bc2: f64) -> Result<()> {
    let Device::Cuda(dev) = p.device() else {
        candle_core::bail!("fused AdamW needs a CUDA tensor")
    };
    let n = p.elem_count();
    for t in [m, v, g] {
        if t.elem_count() != n || !t.device().same_device(p.device()) {
            candle_core::bail!("fused AdamW: tensors of different sizes or devices")
        }
    }
    let g = g.contiguous()?;
    let stream = dev.cuda_stream();
    // The pointers stay valid while the tensors live (the caller holds them until the launch is
    // queued; later frees are stream-ordered after the kernel).
    let (pp, mp, vp, gp) = (
        f32_ptr(p, &stream)?,
        f32_ptr(m, &stream)?,
        f32_ptr(v, &stream)?,
        f32_ptr(&g, &stream)?,
    );
    if n == 0 {
        return Ok(());
    }
    let f = dev.get_or_load_custom_func("adamw_f32", MODULE, PTX)?;
    let (n64, b1, omb1, b2, omb2) = (
        n as u64,
        c.beta1 as f32,
        (1.0 - c.beta1) as f32,
        c.beta2 as f32,
        (1.0 - c.beta2) as f32,
    );
    let (ibc1, ibc2, decay, eps, lr) = (
        (1.0 / bc1) as f32,
        (1.0 / bc2) as f32,
        (1.0 - c.lr * c.weight_decay) as f32,
        c.eps as f32,
        c.lr as f32,
    );
    let mut b = f.builder();
    b.arg(&pp).arg(&mp).arg(&vp).arg(&gp).arg(&n64);
    b.arg(&b1)
        .arg(&omb1)
        .arg(&b2)
        .arg(&omb2)
        .arg(&ibc1)
        .arg(&ibc2)
        .arg(&decay)
        .arg(&eps)
        .arg(&lr);
    // SAFETY: the arguments match `adamw_f32`'s C signature; p, m, v, g each hold n f32 from the
    // given pointers; p, m and v are distinct variables (no aliasing of the written buffers).
    unsafe { b.launch(cfg(dev, n)?) }.w()?;
    Ok(())
}

/// The epoch's sample order and crop/flip parameters, on the device (uploaded once an epoch).
pub struct EpochTables {
    pub order: Tensor,
    pub params: Tensor,
}

impl EpochTables {
    pub fn new(order: &[usize], params: &[crate::augment::AugParams], dev: &Device) -> Result<Self> {
        let o: Vec<u32> = order.iter().map(|&i| i as u32).collect();
        let p: Vec<u32> = params
            .iter()
            .map(|p| {
                let reflect = p.edge == crate::augment::Edge::Reflect;
                p.dy as u32 | (p.dx as u32) << 8 | (p.flip as u32) << 16 | (reflect as u32) << 17
            })
            .collect();
        Ok(Self {
            order: Tensor::from_vec(o, order.len(), dev)?,
            params: Tensor::from_vec(p, params.len(), dev)?,
        })
    }
}

struct Augment {
    start: usize,
    b: usize,
    scale: [f32; 3],
    shift: [f32; 3],
}

fn cuda_in<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

impl CustomOp3 for Augment {
    fn name(&self) -> &'static str {
        "augment-u8"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("augment-u8 runs on CUDA only (the CPU pipeline is augment_batch_cpu)")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let images = cuda_in::<u8>(s1, l1, "images")?;
        let order = cuda_in::<u32>(s2, l2, "order")?;
        let params = cuda_in::<u32>(s3, l3, "params")?;
        if self.start + self.b > order.len() || order.len() != params.len() {
            candle_core::bail!("augment-u8: batch beyond the epoch tables")
        }
        let dev = &s1.device;
        let n = self.b * 3072;
        // SAFETY: the kernel writes all n elements.
        let mut out = unsafe { dev.alloc::<f32>(n.max(1)) }?;
        if n > 0 {
            let f = dev.get_or_load_custom_func("augment_u8", MODULE, PTX)?;
            let (start, b) = (self.start as i32, self.b as i32);
            let mut bld = f.builder();
            bld.arg(&images).arg(&order).arg(&params).arg(&start).arg(&b);
            for v in self.scale.iter().chain(self.shift.iter()) {
                bld.arg(v);
            }
            bld.arg(&mut out);
            // SAFETY: matches `augment_u8`'s signature; order/params hold start + b entries
            // (checked above) and the order entries are indices of `images` (the caller's).
            unsafe { bld.launch(cfg(dev, n)?) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((self.b, 3, 32, 32)),
        ))
    }
}

struct GatherLabels {
    start: usize,
    b: usize,
}

impl CustomOp2 for GatherLabels {
    fn name(&self) -> &'static str {
        "gather-labels"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("gather-labels runs on CUDA only")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let labels = cuda_in::<u8>(s1, l1, "labels")?;
        let order = cuda_in::<u32>(s2, l2, "order")?;
        if self.start + self.b > order.len() {
            candle_core::bail!("gather-labels: batch beyond the epoch tables")
        }
        let dev = &s1.device;
        // SAFETY: the kernel writes all b elements.
        let mut out = unsafe { dev.alloc::<u32>(self.b.max(1)) }?;
        if self.b > 0 {
            let f = dev.get_or_load_custom_func("gather_labels", MODULE, PTX)?;
            let (start, b) = (self.start as i32, self.b as i32);
            let mut bld = f.builder();
            bld.arg(&labels).arg(&order).arg(&start).arg(&b).arg(&mut out);
            // SAFETY: matches `gather_labels`' signature; order holds start + b entries.
            unsafe { bld.launch(cfg(dev, self.b)?) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(self.b)))
    }
}

/// Batch `start..start + b` of an epoch: (B, 3, 32, 32) f32 augmented images and (B,) u32 labels.
/// `images`: (N, 3, 32, 32) u8 and `labels`: (N,) u8 on the device.
pub fn augment_batch(
    images: &Tensor,
    labels: &Tensor,
    tables: &EpochTables,
    start: usize,
    b: usize,
    norm: &Normalizer,
) -> Result<(Tensor, Tensor)> {
    let (scale, shift) = norm.affine();
    let x = images.apply_op3_no_bwd(&tables.order, &tables.params, &Augment { start, b, scale, shift })?;
    let y = labels.apply_op2_no_bwd(&tables.order, &GatherLabels { start, b })?;
    Ok((x, y))
}
