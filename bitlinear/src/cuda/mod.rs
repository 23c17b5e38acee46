//! CUDA implementation of the bitlinear quantizers and packed ternary matmuls (feature `cuda`).
//!
//! The kernels live in `kernels/*.cu` (each file starts with a comment describing its data
//! layout and tiling); `build.rs` compiles them with nvcc into fatbins (SASS + PTX for
//! `CUDA_COMPUTE_CAP`, default sm_90) that are embedded here and loaded once per device.
//!
//! Every function takes candle CUDA storages with their layouts (contiguous, any start offset),
//! launches on the device's stream and returns new storages. The numeric contract is the CPU
//! one (`crate::quant`): codes, packed bytes and i32 accumulators are bit-identical, float
//! outputs too (same epilogue `(acc * s_x) * s_w`, rounded twice, then cast). The only
//! permitted difference is the f64 summation order of the weight absmean, which can change
//! `s_w` only when the f64 mean lies within ~1e-16 (relative) of an f32 rounding boundary.
//!
//! Matmul strategy (see `matmul_core`; the table is from H100 measurements, `bench/`):
//! * `M = 1` with `K % 64 == 0` (decode): the GEMV kernel (`kernels/gemv.cu`) requests every
//!   weight byte right after `x`, quantizes `x` meanwhile and uses dp4a; 8, 16 or 32 lanes per
//!   weight row, whichever gives the least work per lane and busy SM (`gemv_launch.rs`); where
//!   the weights are large, float `x` comes by one bulk copy so that no weight load waits for it.
//! * other `M <= 32`: the "skinny" kernel streams the packed weights straight into tensor-core
//!   fragments; when `M * K` activations are small it also quantizes `x` itself (one launch per
//!   forward), otherwise a row-quantizer kernel runs first. Each of its blocks stages all of
//!   `x`, so from `M = 12` where `N >= 64 x SMs` the GEMM below (64x64 tiles) takes over.
//! * larger `M`: the activations are quantized into a padded, k-permuted int8 buffer, then a
//!   GEMM decodes the weights on their way into the tensor cores: on compute capability 9.0 the
//!   warp-specialized `wgmma` kernel (`kernels/gemm90a.cu`: TMA copies, the weights decoded
//!   straight into the MMA's A registers, persistent CTAs, TMA stores) from M = 64: tiles of 256
//!   tokens x 128 weight rows where M > 128 and they cover half the SMs, else of 128 tokens, with
//!   K split over several CTAs where the tiles are few and K is long,
//!   otherwise the `mma.sync` kernel with 128x128 tiles when they give 3/4 of the SMs a tile,
//!   else 64x64 tiles (the 128x256 `mma.sync` tile was never the fastest; kept as a variant);
//!   the `mma.sync` GEMM splits K over several CTAs when its tiles alone fill less than one wave.
//!
//! Launches: on compute capability 9.0+ every kernel goes out with programmatic dependent launch
//! (`pdl_allowed`): each waits for the previous kernel of the stream before touching memory, so
//! only launch latency overlaps.
//!
//! Environment switches (read at each call; the last six exist so that tests and benchmarks
//! can reach every kernel variant whatever the shape):
//! * `BITLINEAR_CUDA_POISON=1` fills every output buffer with 0xFF bytes (NaN for floats) before
//!   the kernels run, so that an element a kernel forgets to write is caught by a comparison.
//! * `BITLINEAR_CUDA_NO_FINITE_CHECK=1` skips the host read-back of the "non-finite weight" flag
//!   in [`bit_matmul`] and [`fake_quant_weights`] (which costs a stream synchronization): a
//!   non-finite weight then gives `s_w = NaN`, i.e. NaN outputs, instead of an error.
//! * `BITLINEAR_CUDA_NO_PDL=1`: launch the kernels without programmatic dependent launch (see
//!   `pdl_allowed`).
//! * `BITLINEAR_CUDA_FORCE_GEMM=1`: use the tiled GEMM even for `M <= 32`.
//! * `BITLINEAR_CUDA_NO_FUSE=1`: never quantize inside the skinny kernel.
//! * `BITLINEAR_CUDA_NO_GEMV=1`: the skinny kernel instead of the decode GEMV for `M = 1`.
//! * `BITLINEAR_CUDA_GEMV_LANES=8|16|32`: lanes per weight row in the decode GEMV instead of the
//!   size-based choice (ignored where that kernel shape is not built for K).
//! * `BITLINEAR_CUDA_SKINNY_ROWS=16|32`: weight rows per block of the skinny kernel instead of
//!   the size-based choice (16 needs 16-byte aligned packed rows).
//! * `BITLINEAR_CUDA_GEMV_BULK_X=0|1`: the decode GEMV loads `x` with the threads' own loads
//!   (0) or one bulk copy (1) instead of the size-based choice.
//! * `BITLINEAR_CUDA_GEMM_TILE=small|big|wide|tma|tma128`: GEMM kernel and CTA tile
//!   instead of the size-based choice (`tma` and `tma128` need K > 0).
//! * `BITLINEAR_CUDA_TMA_ONE_TILE=1`: one CTA per tile for the TMA wgmma GEMM instead of one
//!   persistent CTA per SM.
//! * `BITLINEAR_CUDA_TMA_STORE=0`: the TMA wgmma GEMM's threads copy the output tiles out
//!   instead of TMA stores.
//! * `BITLINEAR_CUDA_SPLITK=n`: split the k range of the `small`/`big`/`tma128` GEMM over n CTAs
//!   (1 = off) instead of the size-based choice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    result as cu_result, sys, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};

mod tma;

use crate::gemm_launch::{gemm_splits, gemm_tile, GemmTile};
use crate::gemv_launch::{gemv_bulk_x, gemv_config, GEMV_WARPS};
use crate::skinny_launch::{gemm_for_small_m, skinny_rows_per_block};

static QUANT_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/quant.fatbin"));
static SKINNY_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/skinny.fatbin"));
static GEMM_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gemm.fatbin"));
/// Empty unless built for compute capability 9.0 (sm_90a).
static GEMM90A_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gemm90a.fatbin"));
static GEMV_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gemv.fatbin"));

const THREADS: u32 = 256;
/// Largest `M` handled by the skinny kernel (4 MMA column tiles of 8).
const SKINNY_MAX_M: usize = 32;
/// Largest dynamic shared memory the skinny kernel may use (two blocks per SM on H100).
const SKINNY_MAX_SMEM: usize = 112 * 1024;
/// The skinny kernel quantizes `x` itself when each of its threads holds at most two 16-k groups
/// of `x` (`M * 16 * ceil(K / 256) <= 512`: one pass, x in registers), or when `x` is small
/// enough (`M * K * size_of(T)` at most this) for two passes through L2 to beat a second launch.
const FUSED_MAX_BYTES: usize = 16 * 1024;
const FUSED_MAX_GROUPS: usize = 512;
/// Largest `M` and `K` of the decode GEMV kernel (`kernels/gemv.cu`: one 16-k group of x per
/// thread, at most 32 lanes x 4 chunks of 64 k per weight row).
const GEMV_MAX_M: usize = 1;
const GEMV_MAX_K: usize = 8192;
/// k tile of the GEMM kernel (its activation buffer is padded to a multiple of it).
const GEMM_BK: usize = 128;
/// Weight rows per CTA tile of the TMA wgmma GEMM (`kernels/gemm90a.cu`).
const TMA_BN: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Module {
    Quant,
    Skinny,
    Gemm,
    Gemm90a,
    Gemv,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::Quant => QUANT_FATBIN,
            Module::Skinny => SKINNY_FATBIN,
            Module::Gemm => GEMM_FATBIN,
            Module::Gemm90a => GEMM90A_FATBIN,
            Module::Gemv => GEMV_FATBIN,
        }
    }
}

#[derive(Clone, Copy)]
struct DevInfo {
    sms: usize,
    smem_optin: usize,
    /// compute capability 9.0 (the sm_90a kernels can run)
    sm90: bool,
}

#[derive(Default)]
struct Cache {
    modules: HashMap<(DeviceId, Module), Arc<CudaModule>>,
    funcs: HashMap<(DeviceId, String), CudaFunction>,
    info: HashMap<DeviceId, DevInfo>,
}

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn dev_info(dev: &CudaDevice) -> Result<DevInfo> {
    let mut c = cache();
    if let Some(i) = c.info.get(&dev.id()) {
        return Ok(*i);
    }
    let ctx = dev.cuda_stream().context().clone();
    let sms = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let optin = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    let major = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let minor = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .w()?;
    let info = DevInfo {
        sms: sms.max(1) as usize,
        smem_optin: optin.max(48 * 1024) as usize,
        sm90: major == 9 && minor == 0 && !GEMM90A_FATBIN.is_empty(),
    };
    c.info.insert(dev.id(), info);
    Ok(info)
}

/// Loads (once per device) and returns a kernel. Kernels of the matmul modules get their
/// dynamic shared-memory limit raised to the device maximum.
fn func(dev: &CudaDevice, module: Module, name: &str) -> Result<CudaFunction> {
    let info = dev_info(dev)?;
    let mut c = cache();
    let key = (dev.id(), name.to_string());
    if let Some(f) = c.funcs.get(&key) {
        return Ok(f.clone());
    }
    let md = match c.modules.get(&(dev.id(), module)) {
        Some(m) => m.clone(),
        None => {
            if module.image().is_empty() {
                bail!("bitlinear cuda: kernel {name} was not built (it needs CUDA_COMPUTE_CAP=90)")
            }
            let ctx = dev.cuda_stream().context().clone();
            let m = ctx.load_module(Ptx::from_binary(module.image().to_vec())).w()?;
            c.modules.insert((dev.id(), module), m.clone());
            m
        }
    };
    let f = md.load_function(name).w()?;
    if module != Module::Quant {
        let stat = f
            .get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .w()?;
        let dynamic = info.smem_optin.saturating_sub(stat.max(0) as usize);
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            dynamic as i32,
        )
        .w()?;
    }
    c.funcs.insert(key, f.clone());
    Ok(f)
}

/// Launches `$f` on `$stream` with `$cfg` and the given kernel arguments (each must match the C
/// parameter type exactly: i32 for `int`, u64 for pointers and `size_t`, f32 for `float`).
macro_rules! launch {
    ($f:expr, $stream:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f: &CudaFunction = &$f;
        let stream: &CudaStream = &$stream;
        if pdl_allowed(stream)? {
            let vals: Vec<Box<dyn std::any::Any>> = vec![$(Box::new($arg)),*];
            let mut params: Vec<*mut std::ffi::c_void> = vals
                .iter()
                .map(|v| &**v as *const dyn std::any::Any as *const std::ffi::c_void as *mut std::ffi::c_void)
                .collect();
            // SAFETY: the values match the kernel's C signature in order and type (checked by
            // hand against kernels/*.cu) and live (in `vals`) until the launch call has
            // returned; every pointer refers to a live allocation of the required size, and all
            // work is ordered on the device's single stream (each kernel waits for the previous
            // one with pdl_wait before touching memory).
            unsafe { launch_with_pdl(f, stream, $cfg, &mut params) }?;
            drop(vals);
        } else {
            let mut b = stream.launch_builder(f);
            $(
                let a = $arg;
                b.arg(&a);
            )*
            // SAFETY: the argument list matches the kernel's C signature (checked by hand against
            // kernels/*.cu), every pointer refers to a live allocation of the required size, and all
            // work is ordered on the device's single stream.
            unsafe { b.launch($cfg) }.w()?;
        }
    }};
}

/// Whether kernels go out with programmatic dependent launch (PDL): on compute capability 9.0+
/// unless `BITLINEAR_CUDA_NO_PDL` is set. A kernel launched so may be scheduled (and run its
/// prologue) while the previous kernel of the stream is still running; every kernel here calls
/// `pdl_wait` (kernels/common.cuh) before its first global memory access, which waits until the
/// previous kernel has completed and its writes are visible, so results are those of plain
/// stream order and only launch latency is hidden.
fn pdl_allowed(stream: &CudaStream) -> Result<bool> {
    static MAJOR: OnceLock<Mutex<HashMap<usize, i32>>> = OnceLock::new();
    if env_flag("BITLINEAR_CUDA_NO_PDL") {
        return Ok(false);
    }
    let ctx = stream.context();
    let mut m = MAJOR
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let major = match m.get(&ctx.ordinal()) {
        Some(&v) => v,
        None => {
            let v = ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .w()?;
            m.insert(ctx.ordinal(), v);
            v
        }
    };
    Ok(major >= 9)
}

/// `cuLaunchKernelEx` with `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`.
///
/// # Safety
/// `params` point at the kernel's arguments, in order, with the types of its C signature.
unsafe fn launch_with_pdl(
    f: &CudaFunction,
    stream: &CudaStream,
    cfg: LaunchConfig,
    params: &mut [*mut std::ffi::c_void],
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
        numAttrs: 1,
    };
    sys::cuLaunchKernelEx(&lc, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut())
        .result()
        .w()
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).map(|v| !v.is_empty() && v != "0").unwrap_or(false)
}

fn grid1(n: usize, cap: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, cap.max(1));
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i32_arg(v: usize, what: &str) -> Result<i32> {
    match i32::try_from(v) {
        Ok(v) => Ok(v),
        Err(_) => bail!("bitlinear cuda: {what} = {v} does not fit the kernels' 32-bit indices"),
    }
}

/// Read pointer to element `offset` of a storage, keeping its stream-sync guard alive in `g`.
fn in_ptr<'a>(s: &'a CudaStorage, offset: usize, stream: &'a CudaStream, g: &mut Vec<SyncOnDrop<'a>>) -> Result<u64> {
    macro_rules! p {
        ($v:expr, $t:ty) => {{
            let (p, guard) = $v.device_ptr(stream);
            g.push(guard);
            p + (offset * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(match &s.slice {
        CudaStorageSlice::U8(v) => p!(v, u8),
        CudaStorageSlice::U32(v) => p!(v, u32),
        CudaStorageSlice::I32(v) => p!(v, i32),
        CudaStorageSlice::I64(v) => p!(v, i64),
        CudaStorageSlice::BF16(v) => p!(v, half::bf16),
        CudaStorageSlice::F16(v) => p!(v, half::f16),
        CudaStorageSlice::F32(v) => p!(v, f32),
        CudaStorageSlice::F64(v) => p!(v, f64),
        _ => bail!("bitlinear cuda: unsupported dtype {:?}", s.dtype()),
    })
}

fn slice_ptr<'a, T>(s: &'a CudaSlice<T>, stream: &'a CudaStream, g: &mut Vec<SyncOnDrop<'a>>) -> u64 {
    let (p, guard) = s.device_ptr(stream);
    g.push(guard);
    p
}

fn out_ptr<'a, T>(s: &'a mut CudaSlice<T>, stream: &'a CudaStream, g: &mut Vec<SyncOnDrop<'a>>) -> u64 {
    let (p, guard) = s.device_ptr_mut(stream);
    g.push(guard);
    p
}

fn out_slice_ptr<'a>(s: &'a mut CudaStorageSlice, stream: &'a CudaStream, g: &mut Vec<SyncOnDrop<'a>>) -> Result<u64> {
    Ok(match s {
        CudaStorageSlice::U8(v) => out_ptr(v, stream, g),
        CudaStorageSlice::I32(v) => out_ptr(v, stream, g),
        CudaStorageSlice::BF16(v) => out_ptr(v, stream, g),
        CudaStorageSlice::F16(v) => out_ptr(v, stream, g),
        CudaStorageSlice::F32(v) => out_ptr(v, stream, g),
        _ => bail!("bitlinear cuda: internal error, unexpected output dtype"),
    })
}

/// Uninitialized device buffer of `len` elements (at least one, so empty results still own an
/// allocation), poisoned with 0xFF bytes when `BITLINEAR_CUDA_POISON` is set.
fn alloc<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    let stream = dev.cuda_stream();
    // SAFETY: every element the kernels' callers read back is written by a kernel first (and
    // the poison mode below makes any violation visible).
    let mut s = unsafe { dev.alloc::<T>(len.max(1)) }?;
    if env_flag("BITLINEAR_CUDA_POISON") {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let (p, _g) = s.device_ptr_mut(&stream);
        // SAFETY: `p` points to `bytes` bytes owned by `s`, on this stream.
        unsafe { cu_result::memset_d8_async(p, 0xff, bytes, stream.cu_stream()) }.w()?;
    }
    Ok(s)
}

fn alloc_out(dev: &CudaDevice, dtype: DType, len: usize) -> Result<CudaStorageSlice> {
    Ok(match dtype {
        DType::U8 => CudaStorageSlice::U8(alloc(dev, len)?),
        DType::I32 => CudaStorageSlice::I32(alloc(dev, len)?),
        DType::F32 => CudaStorageSlice::F32(alloc(dev, len)?),
        DType::BF16 => CudaStorageSlice::BF16(alloc(dev, len)?),
        DType::F16 => CudaStorageSlice::F16(alloc(dev, len)?),
        d => bail!("bitlinear cuda: internal error, cannot allocate a {d:?} output"),
    })
}

fn storage(slice: CudaStorageSlice, dev: &CudaDevice) -> CudaStorage {
    CudaStorage {
        slice,
        device: dev.clone(),
    }
}

fn float_suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => bail!("bitlinear cuda: expected an f32, bf16 or f16 tensor, got {d:?}"),
    })
}

/// A contiguous float input, converted to f32 first when it is f64 (the CPU path converts with
/// `as f32` too). Returns the storage to read, its start offset and its dims.
struct FloatIn<'a> {
    owned: Option<CudaStorage>,
    borrowed: &'a CudaStorage,
    offset: usize,
    dims: Vec<usize>,
}

impl<'a> FloatIn<'a> {
    fn new(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<Self> {
        let Some((start, _)) = l.contiguous_offsets() else {
            bail!("bitlinear cuda: {what} must be contiguous")
        };
        let dims = l.dims().to_vec();
        match s.dtype() {
            DType::F32 | DType::BF16 | DType::F16 => Ok(Self {
                owned: None,
                borrowed: s,
                offset: start,
                dims,
            }),
            DType::F64 => {
                // candle's cast kernel cannot be launched on an empty tensor (zero-block grid:
                // CUDA_ERROR_INVALID_VALUE), and an empty tensor needs no conversion.
                let c = if l.shape().elem_count() == 0 {
                    storage(CudaStorageSlice::F32(alloc(&s.device, 0)?), &s.device)
                } else {
                    s.to_dtype(l, DType::F32)?
                };
                Ok(Self {
                    owned: Some(c),
                    borrowed: s,
                    offset: 0,
                    dims,
                })
            }
            d => bail!("bitlinear cuda: {what} must be a float tensor, got {d:?}"),
        }
    }
    fn storage(&self) -> &CudaStorage {
        self.owned.as_ref().unwrap_or(self.borrowed)
    }
    fn dtype(&self) -> DType {
        self.storage().dtype()
    }
    /// (rows, last dim): rows = product of the leading dims.
    fn rows_cols(&self) -> (usize, usize) {
        match self.dims.split_last() {
            Some((&k, lead)) => (lead.iter().product(), k),
            None => (1, 1),
        }
    }
}

/// Converts an f32 result to f64 when the input was f64.
fn finish_dtype(out: CudaStorage, shape: &Shape, want: DType) -> Result<CudaStorage> {
    if want == DType::F64 && shape.elem_count() == 0 {
        // nothing to convert (and candle cannot launch its cast kernel on zero elements)
        Ok(storage(CudaStorageSlice::F64(alloc(&out.device, 0)?), &out.device))
    } else if want == DType::F64 {
        out.to_dtype(&Layout::contiguous(shape.clone()), DType::F64)
    } else {
        Ok(out)
    }
}

// ------------------------------------------------------------------------------------------
// activation quantizer
// ------------------------------------------------------------------------------------------

/// Output of the row quantizer.
enum ActOut {
    /// canonical codes (M, K)
    Codes(u64),
    /// permuted, zero-padded codes (M, ld), and the i32 row sums of the codes (M)
    Permuted(u64, usize, u64),
    /// x~ = q * s_x in the input dtype
    Fake(u64),
}

/// Runs the activation quantizer on `x` (`m` rows of `k`, dtype `dtype`, device pointer `xp`).
/// `scales` (M or 1 floats) may be 0 (not needed).
#[allow(clippy::too_many_arguments)]
fn quantize_rows(
    dev: &CudaDevice,
    xp: u64,
    dtype: DType,
    m: usize,
    k: usize,
    per_tensor: bool,
    out: ActOut,
    scales: u64,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let sfx = float_suffix(dtype)?;
    let info = dev_info(dev)?;
    // per-tensor mode: [absmax bits, non-finite flag] of the whole tensor
    let mut gstat = if per_tensor {
        Some(dev.alloc_zeros::<u32>(2)?)
    } else {
        None
    };
    let mut g = Vec::new();
    let gp = gstat.as_mut().map_or(0, |s| out_ptr(s, &stream, &mut g));
    if per_tensor && m * k > 0 {
        let f = func(dev, Module::Quant, &format!("act_absmax_tensor_{sfx}"))?;
        launch!(f, stream, grid1(m * k, info.sms * 8), xp, (m * k) as u64, gp);
    }
    if per_tensor && m == 0 && scales != 0 {
        // No rows: the CPU still reports the scale of an empty group.
        let s = [crate::quant::ACT_EPS / crate::quant::ACT_MAX];
        // SAFETY: `scales` points to at least one f32 (allocated by the caller).
        unsafe { cu_result::memcpy_htod_async(scales, &s, stream.cu_stream()) }.w()?;
        stream.synchronize().w()?;
    }
    if m == 0 {
        return Ok(());
    }
    let (mode, codes, ld, fake, rowsum) = match out {
        ActOut::Codes(p) => (0, p, k, 0u64, 0u64),
        ActOut::Permuted(p, ld, rs) => (1, p, ld, 0, rs),
        ActOut::Fake(p) => (2, 0, k, p, 0),
    };
    // Rows are grid-strided over about one wave of blocks (4 of 256 threads fit on an SM). When a
    // thread has at most one 16-k group of a row (K <= 4096, K % 16 == 0, aligned x), the kernel
    // that takes two rows at a time runs instead, a block per pair of rows. (Staging rows in shared memory with cp.async,
    // two rows ahead, measured no faster on an H200.)
    let short =
        k.is_multiple_of(16) && k <= 16 * THREADS as usize && xp.is_multiple_of(16) && ld <= 16 * THREADS as usize;
    let (name, rows_per_block, max_blocks) = if short {
        // every block one pair of rows: blocks in different phases overlap (H100, 4096 x 4096
        // bf16: 23.6 us against 25.0 us with one wave of blocks grid-striding over the rows)
        ("act_quant_rows_short", 2, usize::MAX)
    } else {
        ("act_quant_rows", 1, 4 * info.sms)
    };
    let f = func(dev, Module::Quant, &format!("{name}_{sfx}"))?;
    let cfg = LaunchConfig {
        grid_dim: (
            i32_arg(m.div_ceil(rows_per_block).min(max_blocks), "quantizer blocks")? as u32,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        f,
        stream,
        cfg,
        xp,
        i32_arg(m, "M")?,
        i32_arg(k, "K")?,
        per_tensor as i32,
        gp,
        mode,
        codes,
        i32_arg(ld, "K")?,
        scales,
        fake,
        rowsum
    );
    drop(g);
    Ok(())
}

/// `quantize_activations` on CUDA: U8 codes (M, K) and F32 scales (M) or (1).
pub(crate) fn quantize_activations(
    x: &CudaStorage,
    l: &Layout,
    per_tensor: bool,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = &x.device;
    let stream = dev.cuda_stream();
    let xin = FloatIn::new(x, l, "quantize_activations input")?;
    let (m, k) = xin.rows_cols();
    let mut codes = alloc::<u8>(dev, m * k)?;
    let mut scales = alloc::<f32>(dev, if per_tensor { 1 } else { m })?;
    {
        let mut g = Vec::new();
        let xp = in_ptr(xin.storage(), xin.offset, &stream, &mut g)?;
        let cp = out_ptr(&mut codes, &stream, &mut g);
        let sp = out_ptr(&mut scales, &stream, &mut g);
        quantize_rows(dev, xp, xin.dtype(), m, k, per_tensor, ActOut::Codes(cp), sp)?;
    }
    Ok((
        storage(CudaStorageSlice::U8(codes), dev),
        storage(CudaStorageSlice::F32(scales), dev),
    ))
}

/// `x~ = x_q * s_x` in x's dtype.
pub(crate) fn fake_quant_activations(x: &CudaStorage, l: &Layout, per_tensor: bool) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let stream = dev.cuda_stream();
    let xin = FloatIn::new(x, l, "fake_quantize_activations input")?;
    let (m, k) = xin.rows_cols();
    let mut out = alloc_out(dev, xin.dtype(), m * k)?;
    {
        let mut g = Vec::new();
        let xp = in_ptr(xin.storage(), xin.offset, &stream, &mut g)?;
        let op = out_slice_ptr(&mut out, &stream, &mut g)?;
        quantize_rows(dev, xp, xin.dtype(), m, k, per_tensor, ActOut::Fake(op), 0)?;
    }
    let shape = l.shape().clone();
    let out = finish_dtype(storage(out, dev), &shape, x.dtype())?;
    Ok((out, shape))
}

// ------------------------------------------------------------------------------------------
// weight quantizer
// ------------------------------------------------------------------------------------------

/// Launches the absmean reduction over `n` weights; returns `stat` = [s_w bits, non-finite flag].
fn weight_scale(dev: &CudaDevice, wp: u64, dtype: DType, n: usize) -> Result<CudaSlice<u32>> {
    let stream = dev.cuda_stream();
    let sfx = float_suffix(dtype)?;
    // stat: [s_w bits, non-finite flag, count of finished partial blocks]
    let mut stat = dev.alloc_zeros::<u32>(3)?;
    // Grid size depends on n only, so the reduction tree (and s_w) is the same on every run.
    let blocks = n.div_ceil(THREADS as usize * 8).clamp(1, 1024);
    let mut partials = alloc::<f64>(dev, blocks)?;
    let mut g = Vec::new();
    let sp = out_ptr(&mut stat, &stream, &mut g);
    let pp = out_ptr(&mut partials, &stream, &mut g);
    if n > 0 {
        // the last block to finish also makes the final sum
        let f = func(dev, Module::Quant, &format!("w_absmean_partial_{sfx}"))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(f, stream, cfg, wp, n as u64, pp, sp);
    } else {
        let f = func(dev, Module::Quant, "w_absmean_final")?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(f, stream, cfg, pp, 0i32, 0u64, sp);
    }
    drop(g);
    Ok(stat)
}

fn check_finite_flag(dev: &CudaDevice, stat: &CudaSlice<u32>) -> Result<f32> {
    let st = dev.clone_dtoh(stat)?;
    if st[1] != 0 {
        bail!("cannot quantize weights that contain NaN or infinite values")
    }
    Ok(f32::from_bits(st[0]))
}

/// Packs `w` (n, k) at `wp` into `out` using the device-side scale `stat[0]`.
fn pack_into(dev: &CudaDevice, wp: u64, dtype: DType, n: usize, k: usize, stat: u64, out: u64) -> Result<()> {
    let k4 = k.div_ceil(4);
    if n * k4 == 0 {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let info = dev_info(dev)?;
    if k.is_multiple_of(16) && wp.is_multiple_of(16) {
        // rows line up with 32-bit words: the flat packer (several words a thread in flight)
        let words = n * k / 16;
        let f = func(dev, Module::Quant, &format!("w_pack_flat_{}", float_suffix(dtype)?))?;
        let per_thread = if dtype == DType::F32 { 2 } else { 4 };
        launch!(
            f,
            stream,
            grid1(words.div_ceil(per_thread), info.sms * 8),
            wp,
            words as u64,
            stat,
            out
        );
        return Ok(());
    }
    let f = func(dev, Module::Quant, &format!("w_pack_{}", float_suffix(dtype)?))?;
    // one block per weight row (grid-stride)
    let cfg = LaunchConfig {
        grid_dim: (n.min(info.sms * 16) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        f,
        stream,
        cfg,
        wp,
        i32_arg(n, "N")?,
        i32_arg(k, "K")?,
        i32_arg(k4, "K/4")?,
        stat,
        out,
        (k.is_multiple_of(16) && wp.is_multiple_of(16)) as i32
    );
    Ok(())
}

/// `PackedTernary::pack` on CUDA: packed bytes (N, ceil(K/4)) and s_w (read back to the host).
pub(crate) fn pack_weights(w: &CudaStorage, l: &Layout) -> Result<(CudaStorage, f32)> {
    let dev = &w.device;
    let stream = dev.cuda_stream();
    let win = FloatIn::new(w, l, "weight")?;
    let (n, k) = weight_dims(&win.dims)?;
    let mut bytes = alloc::<u8>(dev, n * k.div_ceil(4))?;
    let stat;
    {
        let mut g = Vec::new();
        let wp = in_ptr(win.storage(), win.offset, &stream, &mut g)?;
        stat = weight_scale(dev, wp, win.dtype(), n * k)?;
        let sp = slice_ptr(&stat, &stream, &mut g);
        let bp = out_ptr(&mut bytes, &stream, &mut g);
        pack_into(dev, wp, win.dtype(), n, k, sp, bp)?;
    }
    let s_w = check_finite_flag(dev, &stat)?;
    Ok((storage(CudaStorageSlice::U8(bytes), dev), s_w))
}

fn weight_dims(dims: &[usize]) -> Result<(usize, usize)> {
    match dims {
        &[n, k] => Ok((n, k)),
        d => bail!("bitlinear cuda: weight must have shape (N, K), got {d:?}"),
    }
}

/// `W~ = w_q * s_w` in w's dtype.
pub(crate) fn fake_quant_weights(w: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = &w.device;
    let stream = dev.cuda_stream();
    let win = FloatIn::new(w, l, "weight")?;
    let n: usize = win.dims.iter().product();
    let mut out = alloc_out(dev, win.dtype(), n)?;
    let stat;
    {
        let mut g = Vec::new();
        let wp = in_ptr(win.storage(), win.offset, &stream, &mut g)?;
        stat = weight_scale(dev, wp, win.dtype(), n)?;
        let sp = slice_ptr(&stat, &stream, &mut g);
        let op = out_slice_ptr(&mut out, &stream, &mut g)?;
        if n > 0 {
            let info = dev_info(dev)?;
            let f = func(dev, Module::Quant, &format!("w_fake_{}", float_suffix(win.dtype())?))?;
            launch!(f, stream, grid1(n, info.sms * 16), wp, n as u64, sp, op);
        }
    }
    if !env_flag("BITLINEAR_CUDA_NO_FINITE_CHECK") {
        check_finite_flag(dev, &stat)?;
    }
    let shape = l.shape().clone();
    let out = finish_dtype(storage(out, dev), &shape, w.dtype())?;
    Ok((out, shape))
}

// ------------------------------------------------------------------------------------------
// matmuls
// ------------------------------------------------------------------------------------------

/// Activation source of a matmul.
#[derive(Clone, Copy)]
enum XSrc {
    /// float activations (M, K) of this dtype
    Float(u64, DType),
    /// canonical int8 codes (M, K), plus their scales (0 when the output is i32)
    Codes(u64, u64),
}

/// Scale of the weight: a host value, or a device pointer to it (then the value is ignored).
#[derive(Clone, Copy)]
struct WScale {
    val: f32,
    ptr: u64,
}

/// y (M, N) = x (M, K) . W^T for packed `w` (N, ceil(K/4) bytes at `wp`); `out` = I32 (raw
/// accumulators) or the float output dtype.
#[allow(clippy::too_many_arguments)]
fn matmul_core(
    dev: &CudaDevice,
    x: XSrc,
    m: usize,
    k: usize,
    wp: u64,
    n: usize,
    sw: WScale,
    per_tensor: bool,
    out_dtype: DType,
) -> Result<CudaStorageSlice> {
    let stream = dev.cuda_stream();
    let info = dev_info(dev)?;
    let mut out = alloc_out(dev, out_dtype, m * n)?;
    if m == 0 || n == 0 {
        return Ok(out);
    }
    let k4 = k.div_ceil(4);
    let (mi, ni, ki, k4i) = (
        i32_arg(m, "M")?,
        i32_arg(n, "N")?,
        i32_arg(k, "K")?,
        i32_arg(k4, "K/4")?,
    );
    i32_arg(n * k4, "N*K/4")?;
    let osfx = match out_dtype {
        DType::I32 => "i32",
        d => float_suffix(d)?,
    };

    // ---- decode GEMV (M = 1, K % 64 == 0, 16-byte aligned weights): register-streamed weights
    if m <= GEMV_MAX_M
        && k > 0
        && k <= GEMV_MAX_K
        && k.is_multiple_of(64)
        && wp.is_multiple_of(16)
        && !env_flag("BITLINEAR_CUDA_NO_GEMV")
        && !env_flag("BITLINEAR_CUDA_FORCE_GEMM")
        && (matches!(x, XSrc::Codes(..)) || matches!(x, XSrc::Float(_, dt) if dt == out_dtype))
    {
        let (l, t, blocks) = gemv_config(k4 / 16, n, info.sms);
        // rows spread evenly over all warps of the grid: the first `rows_rem` get one more
        let warps = blocks * GEMV_WARPS;
        let (rows_base, rows_rem) = ((n / warps) as i32, (n % warps) as i32);
        let (xname, xp, xsp, x_size) = match x {
            XSrc::Float(p, dt) => (float_suffix(dt)?, p, 0u64, dt.size_in_bytes()),
            XSrc::Codes(p, sp) => ("i8", p, sp, 1),
        };
        let bulk_x = gemv_bulk_x(matches!(x, XSrc::Float(..)), n, k4, blocks);
        let bx = if bulk_x { "_bx" } else { "" };
        let f = func(dev, Module::Gemv, &format!("gemv_{xname}_{osfx}_l{l}_t{t}{bx}"))?;
        let cfg = LaunchConfig {
            grid_dim: (i32_arg(blocks, "GEMV blocks")? as u32, 1, 1),
            block_dim: (32 * GEMV_WARPS as u32, 1, 1),
            // permuted codes of x, then (`_bx`) x itself
            shared_mem_bytes: (k + if bulk_x { k * x_size } else { 0 }) as u32,
        };
        let mut g = Vec::new();
        let yp = out_slice_ptr(&mut out, &stream, &mut g)?;
        launch!(f, stream, cfg, xp, xsp, wp, ni, ki, k4i, rows_base, rows_rem, sw.val, sw.ptr, yp);
        drop(g);
        return Ok(out);
    }

    let kb = k4.div_ceil(64);
    let row_stride = kb * 256 + 64;
    let mt = if m <= 8 {
        1
    } else if m <= 16 {
        2
    } else {
        4
    };
    let vec = if k4.is_multiple_of(16) && wp.is_multiple_of(16) {
        16
    } else if k4.is_multiple_of(4) && wp.is_multiple_of(4) {
        4
    } else {
        1
    };
    let rows_per_block = skinny_rows_per_block(m, n, vec, info.sms);
    // staged x, or the cross-warp partial sums (8 warps x rows x 8 MT columns of i32)
    let skinny_smem = (m * row_stride).max(256 * rows_per_block * mt);
    let skinny_fits = skinny_smem <= SKINNY_MAX_SMEM.min(info.smem_optin.saturating_sub(2048));
    if m <= SKINNY_MAX_M && skinny_fits && !gemm_for_small_m(m, n, info.sms) && !env_flag("BITLINEAR_CUDA_FORCE_GEMM") {
        // ---- skinny path
        // Quantize first unless the kernel can do it itself.
        let mut tmp_codes: Option<CudaSlice<u8>> = None;
        let mut tmp_scales: Option<CudaSlice<f32>> = None;
        let (xname, xp, xsp) = match x {
            XSrc::Float(p, dt)
                if out_dtype == dt
                    && (m * kb * 16 <= FUSED_MAX_GROUPS || m * k * dt.size_in_bytes() <= FUSED_MAX_BYTES)
                    && !env_flag("BITLINEAR_CUDA_NO_FUSE") =>
            {
                (float_suffix(dt)?, p, 0u64)
            }
            XSrc::Float(p, dt) => {
                let mut c = alloc::<u8>(dev, m * k)?;
                let mut s = alloc::<f32>(dev, if per_tensor { 1 } else { m })?;
                let (cp, sp) = {
                    let mut g = Vec::new();
                    let cp = out_ptr(&mut c, &stream, &mut g);
                    let sp = out_ptr(&mut s, &stream, &mut g);
                    quantize_rows(dev, p, dt, m, k, per_tensor, ActOut::Codes(cp), sp)?;
                    (cp, sp)
                };
                tmp_codes = Some(c);
                tmp_scales = Some(s);
                ("i8", cp, sp)
            }
            XSrc::Codes(p, sp) => ("i8", p, sp),
        };
        let ntile = if rows_per_block == 16 { "_n1" } else { "" };
        let name = format!("skinny_{xname}_{osfx}_m{mt}_v{vec}{ntile}");
        let f = func(dev, Module::Skinny, &name)?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(rows_per_block) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: skinny_smem as u32,
        };
        {
            let mut g = Vec::new();
            let yp = out_slice_ptr(&mut out, &stream, &mut g)?;
            launch!(
                f,
                stream,
                cfg,
                xp,
                xsp,
                per_tensor as i32,
                wp,
                mi,
                ni,
                ki,
                k4i,
                sw.val,
                sw.ptr,
                yp
            );
        }
        drop(tmp_codes);
        drop(tmp_scales);
        return Ok(out);
    }

    // ---- tiled GEMM path: permuted, padded int8 activations
    let ld = k.div_ceil(GEMM_BK) * GEMM_BK;
    i32_arg(m * ld.max(1), "M*K")?;
    let mut xperm = alloc::<u8>(dev, m * ld)?;
    let mut scales = alloc::<f32>(dev, if per_tensor { 1 } else { m })?;
    // the quantizer writes every row's sum; codes_permute adds into a zeroed buffer
    let mut rowsum = match x {
        XSrc::Float(..) => alloc::<i32>(dev, m)?,
        XSrc::Codes(..) => dev.alloc_zeros::<i32>(m)?,
    };
    let mut g = Vec::new();
    let xpp = out_ptr(&mut xperm, &stream, &mut g);
    let rsp = out_ptr(&mut rowsum, &stream, &mut g);
    let xsp = match x {
        XSrc::Float(p, dt) => {
            let sp = out_ptr(&mut scales, &stream, &mut g);
            quantize_rows(dev, p, dt, m, k, per_tensor, ActOut::Permuted(xpp, ld, rsp), sp)?;
            sp
        }
        XSrc::Codes(p, sp) => {
            if ld > 0 {
                let f = func(dev, Module::Quant, "codes_permute")?;
                launch!(
                    f,
                    stream,
                    grid1(m * ld / 16, info.sms * 16),
                    p,
                    mi,
                    ki,
                    ld as i32,
                    xpp,
                    rsp
                );
            }
            sp
        }
    };
    // Weights: 16-byte aligned rows are used in place, others are padded once for this call.
    let mut wpad: Option<CudaSlice<u8>> = None;
    let (wq, k4s) = if k4.is_multiple_of(16) && wp.is_multiple_of(16) {
        (wp, k4)
    } else {
        let k4p = k4.div_ceil(16) * 16;
        i32_arg(n * k4p, "N*K/4")?;
        let mut buf = alloc::<u8>(dev, n * k4p)?;
        let (bp, guard) = buf.device_ptr_mut(&stream);
        let f = func(dev, Module::Quant, "packed_repack")?;
        launch!(f, stream, grid1(n * k4p, info.sms * 16), wp, ni, k4i, k4p as i32, bp);
        drop(guard);
        wpad = Some(buf);
        (bp, k4p)
    };
    let k_tiles = ld / GEMM_BK;
    let tile = gemm_tile(m, n, k_tiles, info.sms, info.sm90);
    let (bm, bn, threads) = tile.shape();
    if m.div_ceil(bm) > 65535 {
        bail!("bitlinear cuda: M = {m} rows is more than the GEMM grid supports")
    }
    let tiles = m.div_ceil(bm) * n.div_ceil(bn);
    let splits = gemm_splits(tile, tiles, k_tiles, info.sms);
    let (smem, module) = match tile {
        // the split-K variant stages i32 partial sums, whatever the output type
        GemmTile::Tma | GemmTile::Tma128 => (
            tma_smem_bytes(bm, if splits > 1 { 4 } else { out_dtype.size_in_bytes() }),
            Module::Gemm90a,
        ),
        _ => (4 * (bm * 144 + bn * 48), Module::Gemm),
    };
    let name = match (splits > 1, module) {
        (true, Module::Gemm90a) => format!("gemm_{}_split", tile.name()),
        _ => format!("gemm_{}_{osfx}", tile.name()),
    };
    let f = func(dev, module, &name)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(bn) as u32, m.div_ceil(bm) as u32, splits as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let yp = out_slice_ptr(&mut out, &stream, &mut g)?;
    let mut ws = if splits > 1 {
        Some(dev.alloc_zeros::<i32>(m * n)?)
    } else {
        None
    };
    let mut gws = Vec::new();
    let wsp = ws.as_mut().map_or(0, |w| out_ptr(w, &stream, &mut gws));
    if module == Module::Gemm90a {
        // Persistent: one CTA per SM walks the tiles (weight-row tiles fastest), so that its
        // producer loads the next tile while the consumers write the last one out.
        let items = tiles * splits;
        let ctas = if env_flag("BITLINEAR_CUDA_TMA_ONE_TILE") {
            items
        } else {
            items.min(info.sms)
        };
        let cfg = LaunchConfig {
            grid_dim: (i32_arg(ctas, "GEMM tiles")? as u32, 1, 1),
            ..cfg
        };
        use tma::Elem;
        let tmx = tma::matrix(xpp, Elem::U8, m, ld, ld, bm as u32, 128, true)?;
        let tmw = tma::matrix(wq, Elem::U8, n, k4s, k4s, TMA_BN as u32, 32, false)?;
        // Output tiles (or split-K partial sums, added into the i32 workspace) leave through
        // TMA stores where the rows are 16-byte aligned; otherwise the threads copy them out
        // (the kernel ignores the map then).
        let (dst, ob) = if splits > 1 {
            (wsp, 4)
        } else {
            (yp, out_dtype.size_in_bytes())
        };
        let ep_rows = tma_epilogue_rows(bm, ob) as u32;
        let tma_store = (n * ob).is_multiple_of(16)
            && dst.is_multiple_of(16)
            && std::env::var("BITLINEAR_CUDA_TMA_STORE").as_deref() != Ok("0");
        let tmy = match tma_store {
            true if splits > 1 => tma::matrix(dst, Elem::I32, m, n, n * 4, ep_rows, 32, true)?,
            true => tma::matrix(dst, Elem::U8, m, n * ob, n * ob, ep_rows, 128, true)?,
            false => tmx,
        };
        launch!(
            f,
            stream,
            cfg,
            tmx,
            tmw,
            tmy,
            tma_store as i32,
            rsp,
            xsp,
            per_tensor as i32,
            mi,
            ni,
            (ld / GEMM_BK) as i32,
            splits as i32,
            sw.val,
            sw.ptr,
            dst
        );
    } else {
        launch!(
            f,
            stream,
            cfg,
            xpp,
            ld as i32,
            rsp,
            xsp,
            per_tensor as i32,
            wq,
            k4s as i32,
            mi,
            ni,
            ki,
            sw.val,
            sw.ptr,
            yp,
            wsp
        );
    }
    if splits > 1 {
        let f = func(dev, Module::Gemm, &format!("splitk_epilogue_{osfx}"))?;
        launch!(
            f,
            stream,
            grid1(m * n, info.sms * 8),
            wsp,
            mi,
            ni,
            xsp,
            per_tensor as i32,
            sw.val,
            sw.ptr,
            yp
        );
    }
    drop(gws);
    drop(g);
    drop(ws);
    drop(wpad);
    drop(xperm);
    drop(scales);
    drop(rowsum);
    Ok(out)
}

/// Dynamic shared memory of the TMA wgmma GEMM with `bt` tokens a tile and `ob`-byte outputs
/// (`TmaSmem` in kernels/gemm90a.cu): 4 stages (6 for 128-token tiles) of bt x 128 activation
/// bytes and 128 x 32 packed weight bytes, two epilogue buffers, two mbarriers a stage, (row sum,
/// scale) of bt tokens, and slack to align the base to 1024 bytes.
fn tma_smem_bytes(bt: usize, ob: usize) -> usize {
    let stages = if bt == 256 { 4 } else { 6 };
    stages * (bt * 128 + TMA_BN * 32) + 2 * tma_epilogue_rows(bt, ob) * TMA_BN * ob + 16 * stages + 8 * bt + 1024
}

/// Token rows per epilogue pass of the TMA wgmma GEMM (`TmaSmem::EP_ROWS`).
fn tma_epilogue_rows(bt: usize, ob: usize) -> usize {
    if ob == 2 && bt == 256 {
        128
    } else {
        64
    }
}

/// Checks a packed weight storage (N, ceil(k/4)) and returns (N, pointer).
fn packed_in<'a>(
    p: &'a CudaStorage,
    pl: &Layout,
    k: usize,
    stream: &'a CudaStream,
    g: &mut Vec<SyncOnDrop<'a>>,
) -> Result<(usize, u64)> {
    if p.dtype() != DType::U8 {
        bail!("bitlinear cuda: packed weights must be U8, got {:?}", p.dtype())
    }
    let Some((start, _)) = pl.contiguous_offsets() else {
        bail!("bitlinear cuda: packed weights must be contiguous")
    };
    let n = match pl.dims() {
        &[n, k4] if k4 == k.div_ceil(4) => n,
        d => bail!(
            "bitlinear cuda: packed weights must have shape (N, {}), got {d:?}",
            k.div_ceil(4)
        ),
    };
    Ok((n, in_ptr(p, start, stream, g)?))
}

/// Exact i32 accumulators `acc[m][n] = Σ_k x_q[m][k] · w_q[n][k]` (I32 (M, N)).
pub(crate) fn packed_accumulate(
    xq: &CudaStorage,
    xl: &Layout,
    packed: &CudaStorage,
    pl: &Layout,
    k: usize,
) -> Result<CudaStorage> {
    let dev = &xq.device;
    let stream = dev.cuda_stream();
    if xq.dtype() != DType::U8 {
        bail!("bitlinear cuda: activation codes must be U8, got {:?}", xq.dtype())
    }
    let Some((start, _)) = xl.contiguous_offsets() else {
        bail!("bitlinear cuda: activation codes must be contiguous")
    };
    let (m, kx) = match xl.dims() {
        &[m, kx] => (m, kx),
        d => bail!("bitlinear cuda: activation codes must have shape (M, K), got {d:?}"),
    };
    if kx != k {
        bail!("bitlinear cuda: codes have K = {kx}, the weight has K = {k}")
    }
    let mut g = Vec::new();
    let xp = in_ptr(xq, start, &stream, &mut g)?;
    let (n, wp) = packed_in(packed, pl, k, &stream, &mut g)?;
    let out = matmul_core(
        dev,
        XSrc::Codes(xp, 0),
        m,
        k,
        wp,
        n,
        WScale { val: 1.0, ptr: 0 },
        false,
        DType::I32,
    )?;
    drop(g);
    Ok(storage(out, dev))
}

/// The inference forward over pre-packed weights: quantize x, matmul, epilogue; output in x's
/// dtype, shape (M, N).
pub(crate) fn packed_matmul(
    x: &CudaStorage,
    xl: &Layout,
    packed: &CudaStorage,
    pl: &Layout,
    k: usize,
    s_w: f32,
    per_tensor: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let stream = dev.cuda_stream();
    let xin = FloatIn::new(x, xl, "packed_matmul input")?;
    let (m, kx) = xin.rows_cols();
    if kx != k {
        bail!("bitlinear cuda: input has K = {kx}, the weight has K = {k}")
    }
    let mut g = Vec::new();
    let xp = in_ptr(xin.storage(), xin.offset, &stream, &mut g)?;
    let (n, wp) = packed_in(packed, pl, k, &stream, &mut g)?;
    let dt = xin.dtype();
    let out = matmul_core(
        dev,
        XSrc::Float(xp, dt),
        m,
        k,
        wp,
        n,
        WScale { val: s_w, ptr: 0 },
        per_tensor,
        dt,
    )?;
    drop(g);
    let shape = Shape::from((m, n));
    let out = finish_dtype(storage(out, dev), &shape, x.dtype())?;
    Ok((out, shape))
}

/// The training forward: quantize and pack `w` on the device (s_w stays on the device), then
/// the same matmul as [`packed_matmul`].
pub(crate) fn bit_matmul(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    per_tensor: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let stream = dev.cuda_stream();
    let xin = FloatIn::new(x, xl, "bit_matmul input")?;
    let win = FloatIn::new(w, wl, "bit_matmul weight")?;
    let (m, k) = xin.rows_cols();
    let (n, kw) = weight_dims(&win.dims)?;
    if kw != k {
        bail!("bitlinear cuda: input has K = {k}, the weight has K = {kw}")
    }
    let mut packed = alloc::<u8>(dev, n * k.div_ceil(4))?;
    let stat;
    let out;
    {
        let mut g = Vec::new();
        let wp = in_ptr(win.storage(), win.offset, &stream, &mut g)?;
        stat = weight_scale(dev, wp, win.dtype(), n * k)?;
        let sp = slice_ptr(&stat, &stream, &mut g);
        let pp = out_ptr(&mut packed, &stream, &mut g);
        pack_into(dev, wp, win.dtype(), n, k, sp, pp)?;
        let xp = in_ptr(xin.storage(), xin.offset, &stream, &mut g)?;
        let dt = xin.dtype();
        out = matmul_core(
            dev,
            XSrc::Float(xp, dt),
            m,
            k,
            pp,
            n,
            WScale { val: 0.0, ptr: sp },
            per_tensor,
            dt,
        )?;
    }
    if !env_flag("BITLINEAR_CUDA_NO_FINITE_CHECK") {
        check_finite_flag(dev, &stat)?;
    }
    drop(packed);
    let shape = Shape::from((m, n));
    let out = finish_dtype(storage(out, dev), &shape, x.dtype())?;
    Ok((out, shape))
}
