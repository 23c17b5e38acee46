//! Kernel launches with typed arguments, with or without programmatic dependent launch.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaStream, LaunchConfig};
use candle_core::cuda_backend::WrapErr;
use candle_core::Result;

use super::tma::TensorMap;

/// A value a kernel takes by value, matching its C parameter type: `i32` for `int`, `i64` for
/// `long long`, `u64` for pointers and `size_t`, `f32` for `float`, [`TensorMap`] for a
/// `__grid_constant__` map.
pub(super) trait KernelArg: Copy {}
impl KernelArg for i32 {}
impl KernelArg for i64 {}
impl KernelArg for u64 {}
impl KernelArg for f32 {}
impl KernelArg for TensorMap {}

/// The address of one kernel argument, as `cuLaunchKernelEx` takes it.
pub(super) fn arg<T: KernelArg>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

/// Launches kernel `$f` through `$ctx` (a [`super::Ctx`]) with `$cfg` and the arguments, each a
/// [`KernelArg`] of the kernel's C parameter type, in order. The arguments live until the launch
/// call returns (temporaries of one statement).
macro_rules! launch {
    ($ctx:expr, $f:expr, $cfg:expr, $($arg:expr),* $(,)?) => {
        // SAFETY: the argument list matches the kernel's C signature in order and type (the
        // `KernelArg` types; checked against kernels/*.cu), every pointer refers to a live
        // allocation of the size the kernel reads or writes, and all work is ordered on the
        // device's one stream (each kernel waits for the previous one with pdl_wait before
        // touching memory).
        unsafe { $ctx.launch(&$f, $cfg, &mut [$($crate::cuda::launch::arg(&$arg)),*]) }
    };
}

/// `cuLaunchKernelEx` of `f` on `stream`, with programmatic stream serialization where `pdl`.
///
/// # Safety
/// `params` point at the kernel's arguments, in order, with the types of its C signature, and
/// stay valid until this returns.
pub(super) unsafe fn launch_on(
    f: &CudaFunction,
    stream: &CudaStream,
    cfg: LaunchConfig,
    pdl: bool,
    params: &mut [*mut c_void],
) -> Result<()> {
    stream.context().bind_to_thread().w()?;
    let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let lc = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(pdl),
    };
    sys::cuLaunchKernelEx(&lc, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut())
        .result()
        .w()
}
