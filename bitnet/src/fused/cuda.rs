//! Launches of `kernels/decode.cu`: operand checks, device pointers, and the launch shapes that
//! `launch.rs` decides.

use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::args::AttentionArgs;
use super::launch::{self, Launch, ARGMAX_BLOCKS, NORM_MAX_COLS};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
const MODULE: &str = "bitnet_decode";

/// `(elements from the start offset, offset)` of a contiguous operand of `dtype`; the offset
/// must keep 16-byte loads aligned where `aligned16` asks for it.
fn contiguous(l: &Layout, dtype: DType, what: &str, aligned16: bool) -> Result<(usize, usize)> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what} must be contiguous")
    };
    if aligned16 && !(a * dtype.size_in_bytes()).is_multiple_of(16) {
        bail!("{what} must start 16-byte aligned")
    }
    Ok((a, b))
}

/// `$f::<T>(args)` with `T` the Rust type of the float `$dtype` the kernels are instantiated for
/// (f32, bf16, f16); `$what` names the kernel in the error for any other dtype.
macro_rules! with_float_type {
    ($dtype:expr, $what:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            d => bail!("{}: no kernel for {d:?}", $what),
        }
    };
}
pub(super) use with_float_type;

/// The launch configuration of a planned launch.
pub(super) fn config(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (l.blocks as u32, 1, 1),
        block_dim: (l.threads as u32, 1, 1),
        shared_mem_bytes: l.smem_bytes as u32,
    }
}

/// The elements of a contiguous operand of `T`, from its start offset (16-byte aligned where the
/// kernel loads 16 bytes at a time).
pub(super) fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
    aligned16: bool,
) -> Result<CudaView<'a, T>> {
    let (lo, hi) = contiguous(l, s.dtype(), what, aligned16)?;
    Ok(s.as_cuda_slice::<T>()?.slice(lo..hi))
}

/// Kernel arguments by value, in order, each in 8 bytes (`cuLaunchKernel` reads as many bytes as
/// the C parameter has: pointers 8, `int` and `float` the low 4 on little-endian x86-64).
#[derive(Default)]
pub(super) struct Args(pub(super) Vec<u64>);

impl Args {
    /// A device pointer; its stream guard is kept in `sync` until the launch is queued.
    pub(super) fn ptr<'a>(
        &mut self,
        (p, guard): (u64, impl Into<Option<SyncOnDrop<'a>>>),
        sync: &mut Vec<SyncOnDrop<'a>>,
    ) {
        self.0.push(p);
        sync.extend(guard.into());
    }

    pub(super) fn i32(&mut self, v: i32) -> &mut Self {
        self.0.push(u64::from(v as u32));
        self
    }

    pub(super) fn f32(&mut self, v: f32) -> &mut Self {
        self.0.push(u64::from(v.to_bits()));
        self
    }
}

/// Launches `f` on `stream` with `args`, with programmatic stream serialization where `pdl` (the
/// kernel may start while the previous one of the stream runs; it must `pdl_wait` before it reads
/// what that one writes).
///
/// # Safety
/// `args` match the kernel's C signature in order and type, and every pointer among them refers
/// to memory of the size the kernel reads or writes.
pub(super) unsafe fn launch(
    f: CudaFunction,
    stream: &CudaStream,
    cfg: LaunchConfig,
    pdl: bool,
    args: &mut Args,
) -> Result<()> {
    stream.context().bind_to_thread().w()?;
    let mut params: Vec<*mut c_void> = args.0.iter_mut().map(|v| (v as *mut u64).cast::<c_void>()).collect();
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

/// The CUDA storage of a tensor's storage.
pub(super) fn cuda<'a>(s: &'a candle_core::Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        candle_core::Storage::Cuda(c) => Ok(c),
        _ => bail!("{what} must be on the CUDA device"),
    }
}

/// Kernel name: `base` and the suffix of the dtype it is instantiated for.
pub(super) fn kernel_name(base: &str, dtype: DType) -> Result<String> {
    let sfx = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => bail!("{base}: no kernel for {d:?}"),
    };
    Ok(format!("{base}_{sfx}"))
}

/// The row kernels.
#[derive(Debug, Clone, Copy)]
pub enum RowKernel {
    /// `add_rms_norm`: `x`, `delta` `(rows, n)` and a gain `(n,)` to `(2, rows, n)`.
    AddRmsNorm,
    /// `relu2_mul_rms_norm`: gate and up stacked `(rows, 2 n)` (before these weight scales) and
    /// a gain `(n,)` to `(rows, n)`.
    Relu2MulRmsNorm {
        /// The gate's weight scale.
        gate_scale: f32,
        /// The up projection's weight scale.
        up_scale: f32,
    },
}

/// `add_rms_norm` (output `(2, rows, n)`) or `relu2_mul_rms_norm` (output like `a`).
pub(super) fn row_kernel(
    kernel: RowKernel,
    eps: f32,
    a: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
    g: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    with_float_type!(a.0.dtype(), "fused norm", row_kernel_t(kernel, eps, a, b, g))
}

fn row_kernel_t<T: CudaDType + DeviceRepr>(
    kernel: RowKernel,
    eps: f32,
    (a, al): (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
    (g, gl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let base = match kernel {
        RowKernel::AddRmsNorm => "add_rms_norm",
        RowKernel::Relu2MulRmsNorm { .. } => "relu2_mul_rms_norm",
    };
    let last = al.dims().last().copied().unwrap_or(0);
    // add_rms_norm: x and delta (rows, n); relu2_mul_rms_norm: gate and up stacked (rows, 2 n).
    let (n, b) = match (kernel, b) {
        (RowKernel::AddRmsNorm, Some((b, bl))) if bl.dims() == al.dims() => (last, Some((b, bl))),
        (RowKernel::AddRmsNorm, _) => bail!("{base}: two operands of one shape expected"),
        (RowKernel::Relu2MulRmsNorm { .. }, None) if last % 2 == 0 => (last / 2, None),
        (RowKernel::Relu2MulRmsNorm { .. }, _) => bail!("{base}: one (rows, 2 n) operand expected"),
    };
    if g.dtype() != a.dtype() || b.is_some_and(|(b, _)| b.dtype() != a.dtype()) {
        bail!("{base}: operands must share one dtype")
    }
    if gl.dims() != [n] {
        bail!("{base}: the gain must have shape ({n},), got {:?}", gl.dims())
    }
    if n == 0 || n > NORM_MAX_COLS {
        bail!("{base}: rows of {n} values (1 ..= {})", NORM_MAX_COLS)
    }
    let rows = al.shape().elem_count() / last;
    let dev = &a.device;
    let av = view::<T>(a, al, &format!("{base}: input"), false)?;
    let bv = b
        .map(|(b, bl)| view::<T>(b, bl, &format!("{base}: second input"), false))
        .transpose()?;
    let gv = view::<T>(g, gl, &format!("{base}: gain"), false)?;
    let outputs = if bv.is_some() { 2 } else { 1 };
    // SAFETY: the kernel writes every output element (both halves for add_rms_norm).
    let mut out = unsafe { dev.alloc::<T>(outputs * rows * n) }?;
    if rows > 0 {
        let f = dev.get_or_load_custom_func(&kernel_name(base, a.dtype())?, MODULE, PTX)?;
        let cfg = config(launch::norm(rows, n));
        let stream = dev.cuda_stream();
        let mut sync = Vec::new();
        let mut args = Args::default();
        args.ptr(av.device_ptr(&stream), &mut sync);
        if let Some(bv) = &bv {
            args.ptr(bv.device_ptr(&stream), &mut sync);
        }
        args.ptr(gv.device_ptr(&stream), &mut sync);
        match kernel {
            RowKernel::AddRmsNorm => args.i32(rows as i32).i32(n as i32).f32(eps),
            RowKernel::Relu2MulRmsNorm { gate_scale, up_scale } => {
                args.i32(n as i32).f32(eps).f32(gate_scale).f32(up_scale)
            }
        };
        args.ptr(out.device_ptr_mut(&stream), &mut sync);
        // SAFETY: the arguments match the kernel's signature (kernels/decode.cu); `threads` covers
        // n with at most 16 values a thread (n <= NORM_MAX_COLS); the inputs hold rows * n
        // (add_rms_norm) or rows * 2 n (relu2_mul_rms_norm) values.
        unsafe { launch(f.into_cuda_function(), &stream, cfg, false, &mut args) }?;
    }
    let shape = if outputs == 2 {
        Shape::from((2, rows, n))
    } else {
        let mut dims = al.dims().to_vec();
        if let Some(d) = dims.last_mut() {
            *d = n;
        }
        Shape::from(dims)
    };
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

/// The attention kernel over the stacked q, k and v products of one token, `(h + 2 kvh) d`
/// values before their weight `scales`; output `(2, h d)`: before and after the sub-norm.
pub(super) fn decode_attention(
    op: &AttentionArgs,
    scales: [f32; 3],
    qkv: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    with_float_type!(qkv.0.dtype(), "decode attention", decode_attention_t(op, scales, qkv))
}

fn decode_attention_t<T: CudaDType + DeviceRepr>(
    op: &AttentionArgs,
    scales: [f32; 3],
    (qkv, l): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    const WHAT: &str = "decode attention";
    let (h, kvh, d) = (op.heads, op.kv_heads, op.head_dim);
    let dtype = qkv.dtype();
    if l.shape().elem_count() != (h + 2 * kvh) * d {
        bail!(
            "{WHAT}: q, k and v must hold {} values, got {:?}",
            (h + 2 * kvh) * d,
            l.dims()
        )
    }
    let capacity = match op.cache_k.dims() {
        &[1, heads, cap, dd] if heads == kvh && dd == d && op.cache_v.dims() == op.cache_k.dims() => cap,
        dims => bail!("{WHAT}: caches must have shape (1, {kvh}, capacity, {d}), got {dims:?}"),
    };
    let half = d / 2;
    if capacity == 0 || op.cos.dims() != op.sin.dims() || op.cos.dim(1)? != half || op.cos.dim(0)? < capacity {
        bail!(
            "{WHAT}: RoPE tables {:?} for a cache of {capacity} positions",
            op.cos.dims()
        )
    }
    if op.pos.dtype() != DType::U32 || op.pos.elem_count() != 1 {
        bail!("{WHAT}: the position must be one u32")
    }
    if let Some((g, _)) = op.sub_norm {
        if g.dims() != [h * d] || g.dtype() != dtype {
            bail!(
                "{WHAT}: the sub-norm gain must be ({},) {dtype:?}, got {:?} {:?}",
                h * d,
                g.dims(),
                g.dtype()
            )
        }
    }
    if op.counter.dtype() != DType::U32 || op.counter.elem_count() != 1 {
        bail!("{WHAT}: the block counter must be one u32")
    }
    for t in [op.cos, op.sin, op.cache_k, op.cache_v] {
        if t.dtype() != dtype {
            bail!("{WHAT}: tables and caches must be {dtype:?}, got {:?}", t.dtype())
        }
    }
    let plan = match launch::attention(h, capacity, d) {
        Ok(plan) => plan,
        Err(smem) => bail!("{WHAT}: a cache of {capacity} positions needs {smem} bytes of shared memory"),
    };
    let dev = &qkv.device;
    let stream = dev.cuda_stream();
    let rows = |s, l, what: &str| view::<T>(s, l, &format!("{WHAT}: {what}"), true);
    let qkvv = view::<T>(qkv, l, "decode attention: q, k and v", false)?;
    let (cos_s, cos_l) = op.cos.storage_and_layout();
    let (sin_s, sin_l) = op.sin.storage_and_layout();
    let (pos_s, pos_l) = op.pos.storage_and_layout();
    let (ck_s, ck_l) = op.cache_k.storage_and_layout();
    let (cv_s, cv_l) = op.cache_v.storage_and_layout();
    let (n_s, n_l) = op.counter.storage_and_layout();
    let cosv = view::<T>(cuda(&cos_s, "RoPE table")?, cos_l, "decode attention: cos", false)?;
    let sinv = view::<T>(cuda(&sin_s, "RoPE table")?, sin_l, "decode attention: sin", false)?;
    let posv = view::<u32>(cuda(&pos_s, "position")?, pos_l, "decode attention: position", false)?;
    let ckv = rows(cuda(&ck_s, "key cache")?, ck_l, "key cache")?;
    let cvv = rows(cuda(&cv_s, "value cache")?, cv_l, "value cache")?;
    let g_sl = op.sub_norm.map(|(g, _)| g.storage_and_layout());
    let gv = match &g_sl {
        Some((g_s, g_l)) => Some(view::<T>(
            cuda(g_s, "sub-norm gain")?,
            g_l,
            "decode attention: sub-norm gain",
            false,
        )?),
        None => None,
    };
    let outputs = if gv.is_some() { 2 } else { 1 };
    let nv = view::<u32>(
        cuda(&n_s, "block counter")?,
        n_l,
        "decode attention: block counter",
        false,
    )?;
    // SAFETY: the kernel writes all `outputs` h d values: the attention output before the
    // sub-norm, then (with it) after it.
    let mut out = unsafe { dev.alloc::<T>(outputs * h * d) }?;
    let f = dev.get_or_load_custom_func(&kernel_name("decode_attention", dtype)?, MODULE, PTX)?;
    let cfg = config(plan);
    let mut sync = Vec::new();
    let mut args = Args::default();
    for v in [&qkvv, &cosv, &sinv] {
        args.ptr(v.device_ptr(&stream), &mut sync);
    }
    let [sq, sk, sv] = scales;
    args.f32(sq).f32(sk).f32(sv);
    args.ptr(posv.device_ptr(&stream), &mut sync);
    // The caches and the counter are written through these pointers: the model holds them
    // mutably for the call (`&mut Cache`) and candle has no in-place op with several
    // destinations.
    args.ptr(ckv.device_ptr(&stream), &mut sync);
    args.ptr(cvv.device_ptr(&stream), &mut sync);
    args.i32(capacity as i32).i32(h as i32).i32(kvh as i32).i32(d as i32);
    match &gv {
        Some(gv) => args.ptr(gv.device_ptr(&stream), &mut sync),
        None => args.0.push(0),
    }
    args.f32(op.sub_norm.map_or(0.0, |(_, eps)| eps));
    args.ptr(nv.device_ptr(&stream), &mut sync);
    let (out_ptr, out_sync) = out.device_ptr_mut(&stream);
    args.ptr((out_ptr, out_sync), &mut sync);
    let normed_ptr = if outputs == 2 {
        out_ptr + (h * d * dtype.size_in_bytes()) as u64
    } else {
        0
    };
    args.ptr((normed_ptr, None::<SyncOnDrop>), &mut sync);
    // SAFETY: the arguments match the kernel's signature (kernels/decode.cu), checked above:
    // q, k and v ((h + 2 kvh) d), tables (>= capacity, d / 2), caches (kvh, capacity, d), gain
    // (h * d) or none, all contiguous in one dtype, cache rows 16-byte aligned; one u32
    // counter; `outputs` h d outputs; the kernel clamps the position below capacity.
    unsafe { launch(f.into_cuda_function(), &stream, cfg, false, &mut args) }?;
    drop(sync);
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((outputs, h * d)),
    ))
}

/// The first maximum of `x`'s values (0xffffffff if all are NaN) as `(1 + 2 ARGMAX_BLOCKS,)` u32:
/// the index, then the blocks' partial results. `counter` is one u32 that is zero between calls.
pub fn argmax(x: &CudaStorage, l: &Layout, counter: &Tensor) -> Result<(CudaStorage, Shape)> {
    with_float_type!(x.dtype(), "argmax", argmax_t(x, l, counter))
}

fn argmax_t<T: CudaDType + DeviceRepr>(x: &CudaStorage, l: &Layout, counter: &Tensor) -> Result<(CudaStorage, Shape)> {
    let n = l.shape().elem_count();
    if n == 0 || n > i32::MAX as usize {
        bail!("argmax: {n} values (1 ..= {})", i32::MAX)
    }
    if counter.dtype() != DType::U32 || counter.elem_count() != 1 {
        bail!("argmax: the block counter must be one u32")
    }
    let dev = &x.device;
    let stream = dev.cuda_stream();
    let xv = view::<T>(x, l, "argmax: input", false)?;
    let (n_s, n_l) = counter.storage_and_layout();
    let nv = view::<u32>(cuda(&n_s, "block counter")?, n_l, "argmax: block counter", false)?;
    let len = 1 + 2 * ARGMAX_BLOCKS;
    // SAFETY: the last block writes element 0, every block its two partial values.
    let mut out = unsafe { dev.alloc::<u32>(len) }?;
    let f = dev.get_or_load_custom_func(&kernel_name("argmax", x.dtype())?, MODULE, PTX)?;
    let cfg = config(launch::argmax());
    let mut sync = Vec::new();
    let mut args = Args::default();
    args.ptr(xv.device_ptr(&stream), &mut sync);
    args.i32(n as i32);
    // The counter is written through its pointer (see `decode_attention_t`).
    args.ptr(nv.device_ptr(&stream), &mut sync);
    let (out_ptr, out_sync) = out.device_ptr_mut(&stream);
    args.ptr((out_ptr + 4, None::<SyncOnDrop>), &mut sync);
    args.ptr((out_ptr, out_sync), &mut sync);
    // SAFETY: the arguments match `argmax_T` (kernels/decode.cu): n values of T, one u32 counter,
    // 2 ARGMAX_BLOCKS partial u32 and the result.
    unsafe { launch(f.into_cuda_function(), &stream, cfg, false, &mut args) }?;
    drop(sync);
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(len)))
}
