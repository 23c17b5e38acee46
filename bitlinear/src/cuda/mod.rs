//! CUDA implementation of the bitlinear quantizers and packed ternary matmuls (feature `cuda`).
//!
//! The kernels live in `kernels/*.cu` (each file starts with a comment describing its data
//! layout and tiling); `build.rs` compiles them with nvcc into fatbins (SASS + PTX for
//! `CUDA_COMPUTE_CAP`, default sm_90) that are embedded here and loaded once per device
//! (`kernels.rs`).
//!
//! Every function takes candle CUDA storages with their layouts (contiguous, any start offset),
//! launches on the device's stream and returns new storages. The numeric contract is the CPU
//! one (`crate::quant`): codes, packed bytes and i32 accumulators are bit-identical, float
//! outputs too (same epilogue `(acc * s_x) * s_w`, rounded twice, then cast). The only
//! permitted difference is the f64 summation order of the weight absmean, which can change
//! `s_w` only when the f64 mean lies within ~1e-16 (relative) of an f32 rounding boundary.
//!
//! Which kernel runs a matmul, and with which launch parameters, is decided in one place, the
//! planner (`crate::plan`); `matmul.rs` and `gemm.rs` carry its [`crate::plan::Plan`] out. The
//! quantizer launches are planned in `quantize.rs`. The switches ([`KernelSettings`]) are held
//! per device (`kernels.rs`) and read once per op call into a [`Ctx`].
//!
//! Launches (`launch.rs`): on compute capability 9.0+ every kernel goes out with programmatic
//! dependent launch unless the settings turn it off: each waits for the previous kernel of the
//! stream before touching memory (`pdl_wait`, kernels/common.cuh), so mostly launch latency
//! overlaps. The exceptions read weights before that wait where they are known complete: the
//! skinny kernel and the Hopper GEMM where the kernel before them is this call's activation
//! quantizer (or int8 permuter), which itself waited for everything before it, and the decode
//! GEMV and the skinny kernel where the `PackedTernary` is settled (`settle.rs`).

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    result as cu_result, CudaFunction, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::{bail, DType, Result};

use crate::plan::{DeviceInfo, KernelSettings};

#[macro_use]
mod launch;
mod blas;
mod buffers;
mod conv;
mod conv_bf16;
mod conv_igemm;
mod gemm;
mod input_norm;
mod kernels;
mod matmul;
mod pool;
mod quantize;
mod settle;
mod tma;

pub(crate) use blas::{batched_matmul_f32, matmul_tt_f32};
pub(crate) use buffers::empty_storage;
pub(crate) use conv::{conv_dequantize, im2col, im2col_t, ColsLayout, ColsSource, WeightScale};
pub(crate) use conv_bf16::{channels_last_bf16, implicit_input_grad, implicit_weight_grad};
pub(crate) use conv_igemm::{implicit_conv_f32, implicit_plan, pack_kernel_order};
pub(crate) use input_norm::{normed_gemv, NormKind};
pub(crate) use kernels::{device_info, set_settings, settings};
pub(crate) use matmul::{bit_matmul, packed_accumulate, packed_matmul};
pub(crate) use pool::{launch_pool, unpool_channels_last_bf16};
pub(crate) use quantize::{
    fake_quant_activations, fake_quant_weights, pack_exact_codes, pack_weights, quantize_activations,
};
pub(crate) use settle::Settled;

use kernels::Module;

/// Threads a block of the elementwise and quantizer kernels (`QT` in their `.cu` files).
const THREADS: u32 = crate::plan::QUANT_THREADS as u32;

/// One op call on one device: its stream, facts and settings, read once.
struct Ctx<'a> {
    dev: &'a CudaDevice,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    settings: KernelSettings,
}

impl<'a> Ctx<'a> {
    fn new(dev: &'a CudaDevice) -> Result<Self> {
        Ok(Self {
            dev,
            stream: dev.cuda_stream(),
            info: device_info(dev)?,
            settings: settings(dev),
        })
    }

    /// Kernel `name` of `module` (loaded once per device).
    fn func(&self, module: Module, name: &str) -> Result<CudaFunction> {
        kernels::func(self.dev, &self.info, module, name)
    }

    /// Uninitialized device buffer of `len` elements (at least one, so empty results still own
    /// an allocation), filled with 0xFF bytes where the settings poison outputs.
    fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every element the kernels' callers read back is written by a kernel first (and
        // the poison setting makes any violation visible).
        let mut s = unsafe { self.dev.alloc::<T>(len.max(1)) }?;
        if self.settings.poison_outputs {
            let bytes = len.max(1) * std::mem::size_of::<T>();
            let (p, _g) = s.device_ptr_mut(&self.stream);
            // SAFETY: `p` points to `bytes` bytes owned by `s`, on this stream.
            unsafe { cu_result::memset_d8_async(p, 0xff, bytes, self.stream.cu_stream()) }.w()?;
        }
        Ok(s)
    }

    /// An output buffer of `len` elements of `dtype` (see [`Ctx::alloc`]).
    fn alloc_out(&self, dtype: DType, len: usize) -> Result<CudaStorageSlice> {
        Ok(match dtype {
            DType::U8 => CudaStorageSlice::U8(self.alloc(len)?),
            DType::I32 => CudaStorageSlice::I32(self.alloc(len)?),
            DType::F32 => CudaStorageSlice::F32(self.alloc(len)?),
            DType::BF16 => CudaStorageSlice::BF16(self.alloc(len)?),
            DType::F16 => CudaStorageSlice::F16(self.alloc(len)?),
            d => bail!("bitlinear cuda: internal error, cannot allocate a {d:?} output"),
        })
    }

    /// Launches `f` on this call's stream, with programmatic dependent launch where the device
    /// has it and the settings allow it. Use through `launch!`.
    ///
    /// # Safety
    /// As [`launch::launch_on`].
    unsafe fn launch(&self, f: &CudaFunction, cfg: LaunchConfig, params: &mut [*mut std::ffi::c_void]) -> Result<()> {
        let pdl = self.settings.pdl && self.info.has_pdl();
        launch::launch_on(f, &self.stream, cfg, pdl, params)
    }
}

/// A one-dimensional grid of `THREADS`-thread blocks covering `n` items, at most `cap` blocks.
fn grid1(n: usize, cap: usize) -> LaunchConfig {
    grid(n.div_ceil(THREADS as usize).clamp(1, cap.max(1)))
}

/// `blocks` blocks of `THREADS` threads.
fn grid(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
