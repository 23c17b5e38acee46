//! Device dispatch and input checks shared by the public functions and the ops.
//!
//! Everything here takes tensors, checks them (rank, dtype, sizes) with errors that say what is
//! wrong, then runs the CPU implementation or the CUDA kernels on the tensor's storage.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};

use crate::packed::{self, PackedTernary};
use crate::plan::{DeviceInfo, KernelSettings};
use crate::quant::{self, ActScaling};

pub(crate) fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64)
}

/// Checks a float weight of shape `(N, K)` and returns `(N, K)`.
pub(crate) fn check_weight(w: &Tensor, ctx: &str) -> Result<(usize, usize)> {
    if !is_float(w.dtype()) {
        bail!(
            "{ctx}: weight must be a float tensor (f32, bf16, f16 or f64), got {:?}",
            w.dtype()
        )
    }
    match w.dims() {
        &[n, k] => Ok((n, k)),
        d => bail!("{ctx}: weight must have shape (out_features, in_features), got {d:?}"),
    }
}

/// Checks float activations of shape `(M, K)` and returns `(M, K)`.
pub(crate) fn check_activations(x: &Tensor, ctx: &str) -> Result<(usize, usize)> {
    if !is_float(x.dtype()) {
        bail!(
            "{ctx}: input must be a float tensor (f32, bf16, f16 or f64), got {:?}",
            x.dtype()
        )
    }
    match x.dims() {
        &[m, k] => Ok((m, k)),
        d => bail!("{ctx}: input must have shape (rows, in_features), got {d:?}"),
    }
}

pub(crate) fn check_same_device(a: &Tensor, b: &Tensor, ctx: &str) -> Result<()> {
    if !a.device().same_device(b.device()) {
        bail!(
            "{ctx}: input is on {:?} but the weight is on {:?}; move one with `to_device`",
            a.device().location(),
            b.device().location()
        )
    }
    Ok(())
}

/// The contiguous elements of a CPU float storage as f32 (borrowed when already f32).
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("bitlinear: internal error, expected a contiguous input")
    };
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[a..b]),
        CpuStorage::BF16(v) => Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F64(v) => Cow::Owned(v[a..b].iter().map(|&x| x as f32).collect()),
        s => bail!("bitlinear: expected a float tensor, got {:?}", s.dtype()),
    })
}

/// An f32 result converted to `dtype` (round to nearest even for bf16/f16).
pub(crate) fn cpu_from_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(v.into_iter().map(f64::from).collect()),
        d => bail!("bitlinear: cannot produce a {d:?} output"),
    })
}

/// Quantizes contiguous f32 rows `(m, k)`; returns the codes and one scale per row (or one).
pub(crate) fn cpu_quantize(x: &[f32], m: usize, k: usize, scaling: ActScaling) -> (Vec<i8>, Vec<f32>) {
    use rayon::prelude::*;
    let mut codes = vec![0i8; m * k];
    if k == 0 {
        let s = quant::absmax_scale(&[]);
        return (codes, vec![s; if scaling == ActScaling::PerTensor { 1 } else { m }]);
    }
    match scaling {
        ActScaling::PerToken => {
            let mut scales = vec![0f32; m];
            codes
                .par_chunks_mut(k)
                .zip(x.par_chunks(k))
                .zip(scales.par_iter_mut())
                .for_each(|((q, row), s)| *s = quant::quantize_row(row, q));
            (codes, scales)
        }
        ActScaling::PerTensor => {
            let s = quant::absmax_scale(x);
            codes
                .par_chunks_mut(k)
                .zip(x.par_chunks(k))
                .for_each(|(q, row)| quant::quantize_row_with_scale(row, s, q));
            (codes, vec![s])
        }
    }
}

/// Zeros of `shape` in `dtype` on `device`; where the shape has no element, an empty tensor
/// (candle cannot allocate zero bytes on CUDA).
pub(crate) fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) if shape.iter().product::<usize>() == 0 => {
            Ok(tensor_from(Storage::Cuda(crate::cuda::empty_storage(d, dtype)?), shape))
        }
        _ => Tensor::zeros(shape, dtype, device),
    }
}

pub(crate) fn tensor_from(storage: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// Quantizes and packs a checked weight `(n, k)` on its device.
pub(crate) fn pack_weights(w: &Tensor, n: usize, k: usize) -> Result<PackedTernary> {
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let (bytes, scale) = match &*storage {
        Storage::Cpu(s) => {
            let (bytes, scale) = packed::pack_f32(&cpu_f32(s, layout)?, n, k)?;
            (
                tensor_from(Storage::Cpu(CpuStorage::U8(bytes)), (n, packed::packed_len(k))),
                scale,
            )
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => {
            let (bytes, scale) = crate::cuda::pack_weights(s, layout)?;
            (tensor_from(Storage::Cuda(bytes), (n, packed::packed_len(k))), scale)
        }
        _ => bail!("PackedTernary::pack: unsupported device {:?}", w.device().location()),
    };
    Ok(PackedTernary::from_trusted(bytes, scale, k))
}

/// Per-token (or per-tensor) absmax int8 quantization of float activations `(M, K)`.
///
/// Returns the codes as a U8 tensor `(M, K)` holding the two's-complement bits of each i8 code
/// (candle has no i8 dtype), and the f32 scales `s_x`, shape `(M,)` per token or `(1,)` per
/// tensor. A row with a NaN or infinity gets scale NaN and zero codes.
///
/// ```
/// use bitlinear::{quantize_activations, ActScaling};
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[0.0f32, -2.54, 1.0]], &Device::Cpu)?;
/// let (codes, scales) = quantize_activations(&x, ActScaling::PerToken)?;
/// let codes: Vec<i8> = codes.flatten_all()?.to_vec1::<u8>()?.into_iter().map(|b| b as i8).collect();
/// assert_eq!(codes, vec![0, -127, 50]);
/// assert_eq!(scales.to_vec1::<f32>()?, vec![2.54 / 127.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn quantize_activations(x: &Tensor, scaling: ActScaling) -> Result<(Tensor, Tensor)> {
    let (m, k) = check_activations(x, "quantize_activations")?;
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let ns = if scaling == ActScaling::PerTensor { 1 } else { m };
    match &*storage {
        Storage::Cpu(s) => {
            let (codes, scales) = cpu_quantize(&cpu_f32(s, layout)?, m, k, scaling);
            let codes = codes.into_iter().map(|c| c as u8).collect();
            Ok((
                tensor_from(Storage::Cpu(CpuStorage::U8(codes)), (m, k)),
                tensor_from(Storage::Cpu(CpuStorage::F32(scales)), ns),
            ))
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => {
            let per_tensor = scaling == ActScaling::PerTensor;
            let (codes, scales) = crate::cuda::quantize_activations(s, layout, per_tensor)?;
            Ok((
                tensor_from(Storage::Cuda(codes), (m, k)),
                tensor_from(Storage::Cuda(scales), ns),
            ))
        }
        _ => bail!("quantize_activations: unsupported device {:?}", x.device().location()),
    }
}

/// Exact integer product of int8 codes (as returned by [`quantize_activations`]) with a packed
/// ternary weight: `acc[m][n] = Σ_k x_q[m][k] · w_q[n][k]`, an I32 tensor `(M, N)`.
///
/// This is the integer core of every forward; CPU and CUDA give identical results.
pub fn packed_accumulate(x_codes: &Tensor, w: &PackedTernary) -> Result<Tensor> {
    if x_codes.dtype() != DType::U8 {
        bail!(
            "packed_accumulate: codes must be U8 (i8 bits), got {:?}",
            x_codes.dtype()
        )
    }
    let (m, k) = match x_codes.dims() {
        &[m, k] => (m, k),
        d => bail!("packed_accumulate: codes must have shape (rows, in_features), got {d:?}"),
    };
    if k != w.in_features() {
        bail!(
            "packed_accumulate: codes have K = {k}, the weight has K = {}",
            w.in_features()
        )
    }
    check_same_device(x_codes, w.bytes(), "packed_accumulate")?;
    let n = w.out_features();
    let x_codes = x_codes.contiguous()?;
    let (xs, xl) = x_codes.storage_and_layout();
    let (ws, wl) = w.bytes().storage_and_layout();
    match (&*xs, &*ws) {
        (Storage::Cpu(xs), Storage::Cpu(ws)) => {
            let xq = cpu_u8(xs, xl)?;
            let xq: &[i8] = bytemuck_i8(xq);
            let kernel = cpu_kernel();
            let prep = crate::cpu::PreparedActivations::new(kernel, xq, m, k);
            let weights = w.cpu_layouts().get(kernel, cpu_u8(ws, wl)?, n, k);
            let acc = crate::cpu::packed_accumulate(&prep, weights, n, k);
            Ok(tensor_from(Storage::Cpu(CpuStorage::I32(acc)), (m, n)))
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda(xs), Storage::Cuda(ws)) => {
            let acc = crate::cuda::packed_accumulate(xs, xl, ws, wl, k, w.settled())?;
            Ok(tensor_from(Storage::Cuda(acc), (m, n)))
        }
        _ => bail!(
            "packed_accumulate: unsupported device {:?}",
            x_codes.device().location()
        ),
    }
}

pub(crate) fn cpu_u8<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u8]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U8(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("bitlinear: internal error, expected contiguous u8 storage"),
    }
}

pub(crate) fn bytemuck_i8(v: &[u8]) -> &[i8] {
    // SAFETY: u8 and i8 have the same size and alignment and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const i8, v.len()) }
}

/// Sets the kernel settings of `device` for every later call on it (see [`KernelSettings`]).
/// For the CPU device only `force.cpu_kernel` matters (process-wide); forcing a kernel this CPU
/// does not support is an error.
///
/// ```
/// use bitlinear::plan::KernelSettings;
/// use candle_core::Device;
/// let dev = Device::Cpu; // or Device::new_cuda(0)?
/// bitlinear::set_kernel_settings(&dev, KernelSettings { pdl: false, ..Default::default() })?;
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn set_kernel_settings(device: &Device, settings: KernelSettings) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::set_settings(d, settings),
        Device::Cpu => {
            if let Some(k) = settings.force.cpu_kernel.filter(|k| !k.is_supported()) {
                bail!("set_kernel_settings: this CPU does not support the {k:?} kernel");
            }
            *CPU_SETTINGS.write().unwrap_or_else(|e| e.into_inner()) = settings;
        }
        _ => {}
    }
    Ok(())
}

/// The CPU device's settings (process-wide).
static CPU_SETTINGS: std::sync::LazyLock<std::sync::RwLock<KernelSettings>> =
    std::sync::LazyLock::new(Default::default);

/// The CPU kernel calls run on now: the forced one, or the fastest this CPU supports.
pub(crate) fn cpu_kernel() -> crate::cpu::CpuKernel {
    let forced = CPU_SETTINGS.read().unwrap_or_else(|e| e.into_inner()).force.cpu_kernel;
    forced.unwrap_or_else(crate::cpu::CpuKernel::detect)
}

/// The kernel settings of `device`: the defaults until [`set_kernel_settings`] changes them
/// (process-wide for the CPU device).
pub fn kernel_settings(device: &Device) -> KernelSettings {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::settings(d),
        Device::Cpu => CPU_SETTINGS.read().unwrap_or_else(|e| e.into_inner()).clone(),
        _ => KernelSettings::default(),
    }
}

/// What the kernel planner ([`crate::plan::plan`]) knows of a CUDA `device`, queried from it
/// once: SM count, shared memory, L2 size, compute capability. An error for other devices.
pub fn cuda_device_info(device: &Device) -> Result<DeviceInfo> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::device_info(d),
        d => bail!("cuda_device_info: {:?} is not a CUDA device", d.location()),
    }
}
