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
//!   weight row, whichever leaves the fewest idle chunk slots among those within 25% of the
//!   least work per lane and busy SM (`gemv_launch.rs`); where the weights are large and 8
//!   lanes take a row (or every warp holds `x`), float `x` comes by one bulk copy so that no
//!   weight load waits for it.
//! * other `M <= 32`: the "skinny" kernel streams the packed weights straight into tensor-core
//!   fragments; when `M * K` activations are small and its blocks at most two an SM it also
//!   quantizes `x` itself (one launch per forward), otherwise a row-quantizer kernel runs first
//!   (`skinny_launch.rs`). Each of its blocks stages all of
//!   `x`, so from `M = 12` where `N >= 64 x SMs` the GEMM below takes over, and on compute
//!   capability 9.0 from `M = 17` where its 32-row blocks would leave a quarter of the SMs idle,
//!   and from `M = 16` where they need more than one wave or `K > 8192` (`skinny_launch.rs`);
//!   16-row blocks where 32-row ones would fill at most half the SMs.
//! * larger `M`: the activations are quantized into a padded, k-permuted int8 buffer, then a
//!   GEMM decodes the weights on their way into the tensor cores: on compute capability 9.0 the
//!   warp-specialized `wgmma` kernel (`kernels/gemm90a.cu`: TMA copies, the weights decoded
//!   straight into the MMA's A registers, persistent CTAs, TMA stores) for M > 16: tiles of 256
//!   tokens x 128 weight rows where M > 128 and they cover half the SMs (192 tokens where that
//!   leaves fewer SMs idle in the last round), else of 128 tokens x 128
//!   weight rows, or x 64 weight rows where the former would fill at most half the SMs, or with
//!   K split over several CTAs where K is long (and always 128-row tiles for `M <= 64` with
//!   `K >= 8192` where they fill at most half the SMs: `src/gemm_launch.rs`),
//!   otherwise the `mma.sync` kernel with 128x128 tiles when they give 3/4 of the SMs a tile,
//!   else 64x64 tiles (the 128x256 `mma.sync` tile was never the fastest; kept as a variant);
//!   the `mma.sync` GEMM splits K over several CTAs when its tiles alone fill less than one wave.
//!
//! Launches: on compute capability 9.0+ every kernel goes out with programmatic dependent launch
//! (`pdl_allowed`): each waits for the previous kernel of the stream before touching memory
//! (`pdl_wait`), so mostly launch latency overlaps. The exceptions read weights before that wait
//! where they are known complete: the skinny kernel and the Hopper GEMM request their first
//! weights early when the kernel before them is this call's activation quantizer (or int8
//! permuter), which itself waited for everything before it; the activation quantizer ahead of
//! the Hopper GEMM lets the GEMM start at once, so that those weight copies overlap the quantizer
//! (M = 64..1024: 2-7% faster on the H100); and the decode GEMV (its first chunk slot, where
//! fewer than half of its warps hold x, the weights are large or the work over the warps is
//! uneven: `gemv_launch.rs`) and
//! the skinny kernel request them early
//! where the `PackedTernary` is settled (`settle.rs`: every kernel queued before its first use
//! has finished), so that in a decode loop one call's weights stream while the previous call
//! ends.
//!
//! Environment switches (read at each call; all but the first three exist so that tests and benchmarks
//! can reach every kernel variant whatever the shape):
//! * `BITLINEAR_CUDA_POISON=1` fills every output buffer with 0xFF bytes (NaN for floats) before
//!   the kernels run, so that an element a kernel forgets to write is caught by a comparison.
//! * `BITLINEAR_CUDA_NO_FINITE_CHECK=1` skips the host read-back of the "non-finite weight" flag
//!   in [`bit_matmul`] and [`fake_quant_weights`] (which costs a stream synchronization): a
//!   non-finite weight then gives `s_w = NaN`, i.e. NaN outputs, instead of an error.
//! * `BITLINEAR_CUDA_NO_PDL=1`: launch the kernels without programmatic dependent launch (see
//!   `pdl_allowed`).
//! * `BITLINEAR_CUDA_FORCE_GEMM=1`: use the tiled GEMM even for `M <= 32`.
//! * `BITLINEAR_CUDA_NO_FUSE=1`: never quantize inside the skinny kernel; `BITLINEAR_CUDA_FUSE=1`:
//!   always where the output dtype is x's (two passes over x through L2 where it is large).
//! * `BITLINEAR_CUDA_NO_GEMV=1`: the skinny kernel instead of the decode GEMV for `M = 1`.
//! * `BITLINEAR_CUDA_GEMV_LANES=8|16|32`: lanes per weight row in the decode GEMV instead of the
//!   size-based choice (ignored where that kernel shape is not built for K).
//! * `BITLINEAR_CUDA_SKINNY_ROWS=16|32`: weight rows per block of the skinny kernel instead of
//!   the size-based choice (16 needs 16-byte aligned packed rows).
//! * `BITLINEAR_CUDA_GEMV_BULK_X=0|1`: the decode GEMV loads `x` with the threads' own loads
//!   (0) or one bulk copy (1) instead of the size-based choice.
//! * `BITLINEAR_CUDA_GEMV_EARLY=0|1`: the decode GEMV requests the first chunk slot of its
//!   settled weights before `pdl_wait` (1) or none (0) instead of the size-based choice.
//! * `BITLINEAR_CUDA_GEMM_TILE=small|big|wide|tma|tma192|tma128|tma64`: GEMM kernel and CTA tile
//!   instead of the size-based choice (the `tma` tiles need K > 0).
//! * `BITLINEAR_CUDA_TMA_ONE_TILE=1`: one CTA per tile for the TMA wgmma GEMM instead of one
//!   persistent CTA per SM.
//! * `BITLINEAR_CUDA_TMA_STORE=0`: the TMA wgmma GEMM's threads copy the output tiles out
//!   instead of TMA stores.
//! * `BITLINEAR_CUDA_SPLITK=n`: split the k range of the `small`/`big`/`tma128` GEMM over n CTAs
//!   (1 = off) instead of the size-based choice.
//! * `BITLINEAR_CUDA_NO_EARLY_WEIGHTS=1`: the GEMV, the skinny kernel and the Hopper GEMM
//!   request their weights only after `pdl_wait`.
//! * `BITLINEAR_CUDA_NO_EARLY_TRIGGER=1`: the activation quantizer lets the next kernel start
//!   only when its blocks exit.

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

static ACT_QUANT_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/act_quant.fatbin"));
static WEIGHT_QUANT_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/weight_quant.fatbin"));
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
/// Largest `M` and `K` of the decode GEMV kernel (`kernels/gemv.cu`: one 16-k group of x per
/// thread, at most 32 lanes x 4 chunks of 64 k per weight row).
const GEMV_MAX_M: usize = 1;
const GEMV_MAX_K: usize = 8192;
/// k tile of the GEMM kernel (its activation buffer is padded to a multiple of it).
const GEMM_BK: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Module {
    ActQuant,
    WeightQuant,
    Skinny,
    Gemm,
    Gemm90a,
    Gemv,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::ActQuant => ACT_QUANT_FATBIN,
            Module::WeightQuant => WEIGHT_QUANT_FATBIN,
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
    if !matches!(module, Module::ActQuant | Module::WeightQuant) {
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

// The submodules use `launch!` and the helpers above (a macro is visible to modules declared
// after it).
mod gemm;
mod matmul;
mod quantize;
mod settle;
mod tma;

pub(crate) use matmul::{bit_matmul, packed_accumulate, packed_matmul};
pub(crate) use quantize::{fake_quant_activations, fake_quant_weights, pack_weights, quantize_activations};
pub(crate) use settle::Settled;
