//! Fused CUDA kernels of the training loop (feature `cuda`; kernels in `kernels/train_ops.cu`)
//! and the CUDA device settings used for training.
//!
//! Each piece can be turned off with an environment variable, so that `examples/step_bench.rs`
//! can measure what it brings (all are on by default; `TRAIN_CUDA_BASELINE=1` turns all off):
//! * `TRAIN_CUDA_NO_ADAMW`: AdamW as tensor ops (~10 launches per variable) instead of one fused
//!   launch per variable;
//! * `TRAIN_CUDA_NO_AUG`: batches assembled with tensor ops and per-batch index uploads instead of
//!   one fused kernel reading the epoch's order and crop/flip parameters, uploaded once an epoch;
//! * `TRAIN_CUDA_NO_EVENTS`: keep cudarc's per-allocation CUDA events (two `cuEventCreate` per
//!   buffer, useless with candle's single stream);
//! * `TRAIN_CUDA_NO_ASYNC_CHECK`: keep bitlinear's per-call read-back of the "non-finite weight"
//!   flag (a stream synchronization in every BitLinear forward and backward) instead of checking
//!   the weights once an epoch.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor};
use cifar::Normalizer;

use crate::optim::AdamWConfig;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train_ops.ptx"));
const MODULE: &str = "train_ops";
const THREADS: u32 = 256;

/// Whether the fused/tuned piece `what` (ADAMW, AUG, EVENTS, ASYNC_CHECK) is on.
pub fn enabled(what: &str) -> bool {
    let off = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0");
    !off("TRAIN_CUDA_BASELINE") && !off(&format!("TRAIN_CUDA_NO_{what}"))
}

fn cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 132 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Settings for a training process on `dev` (call before creating tensors): no per-allocation
/// events. Also stops bitlinear's per-call host
/// read-back of its non-finite flag (`BITLINEAR_CUDA_NO_FINITE_CHECK`); the trainer then checks
/// the weights once an epoch ([`crate::trainer`]).
pub fn tune_device(dev: &Device) -> Result<()> {
    let Device::Cuda(d) = dev else { return Ok(()) };
    if enabled("EVENTS") {
        // SAFETY: candle uses a single stream per device here, so no cross-stream ordering is
        // needed: the events only ever guard multi-stream use.
        unsafe { d.disable_event_tracking() };
    }
    if enabled("ASYNC_CHECK") && std::env::var_os("BITLINEAR_CUDA_NO_FINITE_CHECK").is_none() {
        std::env::set_var("BITLINEAR_CUDA_NO_FINITE_CHECK", "1");
    }
    Ok(())
}

/// Whether the per-call non-finite checks of bitlinear are off in this process (then the trainer
/// checks the weights itself).
pub fn finite_check_deferred() -> bool {
    std::env::var("BITLINEAR_CUDA_NO_FINITE_CHECK").is_ok_and(|v| !v.is_empty() && v != "0")
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
    unsafe { b.launch(cfg(n)) }.w()?;
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
            .map(|p| p.dy as u32 | (p.dx as u32) << 8 | (p.flip as u32) << 16)
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
            unsafe { bld.launch(cfg(n)) }.w()?;
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
            unsafe { bld.launch(cfg(self.b)) }.w()?;
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
