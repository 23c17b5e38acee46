//! The packed matmuls on CUDA: the public entry points check their operands, ask the planner
//! (`crate::plan`) how to run, and carry the plan out: the decode GEMV (`kernels/gemv.cu`), the
//! skinny kernel (`kernels/skinny.cu`) or the tiled GEMM (`gemm.rs`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{result as cu_result, CudaSlice, LaunchConfig};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};

use super::buffers::{
    finish_dtype, float_suffix, i32_arg, in_ptr, out_ptr, out_slice_ptr, packed_in, slice_ptr, storage, FloatIn,
};
use super::gemm::tiled_gemm;
use super::quantize::{check_finite_flag, pack_on_device, quantize_rows, weight_dims, ActOut};
use super::{Ctx, Module, Settled};
use crate::plan::{
    plan, GemvPlan, GemvStreamPlan, Plan, Problem, SkinnyPlan, GEMV_STREAM_WARPS, GEMV_WARPS, SKINNY_THREADS,
};

/// Activation source of a matmul.
#[derive(Clone, Copy)]
pub(super) enum XSrc {
    /// float activations (M, K) of this dtype
    Float(u64, DType),
    /// canonical int8 codes (M, K), plus their scales (0 when the output is i32)
    Codes(u64, u64),
}

/// Scale of the weight: a host value, or a device pointer to it (then the value is ignored).
#[derive(Clone, Copy)]
pub(super) struct WScale {
    pub(super) val: f32,
    pub(super) ptr: u64,
}

/// One matmul: y (M, N) = x (M, K) . W^T for packed W (N, ceil(K/4) bytes at `wp`), with what
/// every kernel needs.
pub(super) struct Call<'a> {
    pub(super) ctx: &'a Ctx<'a>,
    pub(super) x: XSrc,
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) wp: u64,
    pub(super) sw: WScale,
    pub(super) per_tensor: bool,
    pub(super) out_dtype: DType,
    /// kernel-name suffix of the output type
    pub(super) osfx: &'static str,
}

/// y (M, N) = x (M, K) . W^T for packed weights at `wp`; `out_dtype` = I32 (raw accumulators)
/// or the float output dtype; `settled`: the weights are known complete (`settle.rs`).
#[allow(clippy::too_many_arguments)]
fn matmul_core(
    ctx: &Ctx,
    x: XSrc,
    (m, n, k): (usize, usize, usize),
    wp: u64,
    sw: WScale,
    per_tensor: bool,
    out_dtype: DType,
    settled: bool,
) -> Result<CudaStorageSlice> {
    let problem = Problem {
        m,
        n,
        k,
        x_dtype: match x {
            XSrc::Float(_, dt) => Some(dt),
            XSrc::Codes(..) => None,
        },
        out_dtype,
        weight_align: Problem::align_of(wp),
        weights_settled: settled,
    };
    let plan = plan(&problem, &ctx.info, &ctx.settings)?;
    let mut out = ctx.alloc_out(out_dtype, m * n)?;
    if plan != Plan::Empty {
        for (v, what) in [(m, "M"), (n, "N"), (k, "K"), (n * k.div_ceil(4), "N*K/4")] {
            i32_arg(v, what)?;
        }
    }
    let call = Call {
        ctx,
        x,
        m,
        n,
        k,
        wp,
        sw,
        per_tensor,
        out_dtype,
        osfx: match out_dtype {
            DType::I32 => "i32",
            d => float_suffix(d)?,
        },
    };
    match plan {
        Plan::Empty => {}
        Plan::Zeros => {
            // K = 0: every accumulator is 0, and so is every float output (0 * s_x * s_w)
            let mut g = Vec::new();
            let yp = out_slice_ptr(&mut out, &ctx.stream, &mut g)?;
            let bytes = m * n * out_dtype.size_in_bytes();
            // SAFETY: `yp` points to the `bytes` bytes of `out`, on this stream.
            unsafe { cu_result::memset_d8_async(yp, 0, bytes, ctx.stream.cu_stream()) }.w()?;
        }
        Plan::Gemv(p) => gemv(&call, &p, &mut out)?,
        Plan::GemvStream(p) => gemv_stream(&call, &p, &mut out)?,
        Plan::Skinny(p) => skinny(&call, &p, &mut out)?,
        Plan::Gemm(p) => tiled_gemm(&call, &p, &mut out)?,
    }
    Ok(out)
}

/// The x operand of the decode kernels: its kernel-name suffix, pointer, and scale pointer (int8
/// codes; 0 for float x, which they quantize themselves).
fn decode_x(c: &Call) -> Result<(&'static str, u64, u64)> {
    Ok(match c.x {
        XSrc::Float(p, dt) => (float_suffix(dt)?, p, 0u64),
        XSrc::Codes(p, sp) => ("i8", p, sp),
    })
}

/// The decode GEMV (`kernels/gemv.cu`): register-streamed weights, x quantized in the kernel.
fn gemv(c: &Call, p: &GemvPlan, out: &mut CudaStorageSlice) -> Result<()> {
    let ctx = c.ctx;
    let (xname, xp, xsp) = decode_x(c)?;
    let f = ctx.func(Module::Gemv, &p.kernel_name(xname, c.osfx))?;
    let cfg = LaunchConfig {
        grid_dim: (i32_arg(p.blocks, "GEMV blocks")? as u32, 1, 1),
        block_dim: (32 * GEMV_WARPS as u32, 1, 1),
        shared_mem_bytes: p.smem_bytes as u32,
    };
    let mut g = Vec::new();
    let yp = out_slice_ptr(out, &ctx.stream, &mut g)?;
    launch!(
        ctx,
        f,
        cfg,
        xp,
        xsp,
        c.wp,
        c.n as i32,
        c.k as i32,
        c.k.div_ceil(4) as i32,
        p.rows_base as i32,
        p.rows_rem as i32,
        c.sw.val,
        c.sw.ptr,
        yp
    )
}

/// The streaming decode GEMV (`kernels/gemv_stream.cu`): one block an SM looping over the rows,
/// x quantized in the kernel.
fn gemv_stream(c: &Call, p: &GemvStreamPlan, out: &mut CudaStorageSlice) -> Result<()> {
    let ctx = c.ctx;
    let (xname, xp, xsp) = decode_x(c)?;
    let f = ctx.func(Module::GemvStream, &p.kernel_name(xname, c.osfx))?;
    let cfg = LaunchConfig {
        grid_dim: (i32_arg(p.blocks, "streaming GEMV blocks")? as u32, 1, 1),
        block_dim: (32 * GEMV_STREAM_WARPS as u32, 1, 1),
        shared_mem_bytes: p.smem_bytes as u32,
    };
    let mut g = Vec::new();
    let yp = out_slice_ptr(out, &ctx.stream, &mut g)?;
    launch!(
        ctx,
        f,
        cfg,
        xp,
        xsp,
        c.wp,
        c.n as i32,
        c.k as i32,
        c.k.div_ceil(4) as i32,
        c.sw.val,
        c.sw.ptr,
        yp,
        i32::from(p.early_weights)
    )
}

/// The skinny kernel: weights streamed into tensor-core fragments, x staged in shared memory,
/// float x quantized by the kernel itself or by the quantizer kernel first.
fn skinny(c: &Call, p: &SkinnyPlan, out: &mut CudaStorageSlice) -> Result<()> {
    let ctx = c.ctx;
    let stream = &ctx.stream;
    let (m, k) = (c.m, c.k);
    let mut codes: Option<CudaSlice<u8>> = None;
    let mut scales: Option<CudaSlice<f32>> = None;
    let (xname, xp, xsp) = match c.x {
        XSrc::Float(xp, dt) if p.fused_quant => (float_suffix(dt)?, xp, 0u64),
        XSrc::Float(xp, dt) => {
            let cs = codes.insert(ctx.alloc::<u8>(m * k)?);
            let ss = scales.insert(ctx.alloc::<f32>(if c.per_tensor { 1 } else { m })?);
            let mut g = Vec::new();
            let cp = out_ptr(cs, stream, &mut g);
            let sp = out_ptr(ss, stream, &mut g);
            quantize_rows(ctx, xp, dt, m, k, c.per_tensor, ActOut::Codes(cp), sp)?;
            ("i8", cp, sp)
        }
        XSrc::Codes(xp, sp) => ("i8", xp, sp),
    };
    let f = ctx.func(Module::Skinny, &p.kernel_name(xname, c.osfx))?;
    let cfg = LaunchConfig {
        grid_dim: (i32_arg(p.blocks, "skinny blocks")? as u32, 1, 1),
        block_dim: (SKINNY_THREADS as u32, 1, 1),
        shared_mem_bytes: p.smem_bytes as u32,
    };
    let mut g = Vec::new();
    let yp = out_slice_ptr(out, stream, &mut g)?;
    launch!(
        ctx,
        f,
        cfg,
        xp,
        xsp,
        c.per_tensor as i32,
        c.wp,
        m as i32,
        c.n as i32,
        k as i32,
        k.div_ceil(4) as i32,
        c.sw.val,
        c.sw.ptr,
        yp,
        i32::from(p.early_weights)
    )?;
    drop(g);
    drop(codes);
    drop(scales);
    Ok(())
}

/// Exact i32 accumulators `acc[m][n] = Σ_k x_q[m][k] · w_q[n][k]` (I32 (M, N)).
pub(crate) fn packed_accumulate(
    xq: &CudaStorage,
    xl: &Layout,
    packed: &CudaStorage,
    pl: &Layout,
    k: usize,
    settled: &Settled,
) -> Result<CudaStorage> {
    let dev = &xq.device;
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
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
    let xp = in_ptr(xq, start, stream, &mut g)?;
    let (n, wp) = packed_in(packed, pl, k, stream, &mut g)?;
    // after packed_in: the event must follow any cross-stream wait it queued
    let w_settled = settled.check(stream)?;
    let out = matmul_core(
        &ctx,
        XSrc::Codes(xp, 0),
        (m, n, k),
        wp,
        WScale { val: 1.0, ptr: 0 },
        false,
        DType::I32,
        w_settled,
    )?;
    drop(g);
    Ok(storage(out, dev))
}

/// The inference forward over pre-packed weights: quantize x, matmul, epilogue; output in x's
/// dtype, shape (M, N).
#[allow(clippy::too_many_arguments)]
pub(crate) fn packed_matmul(
    x: &CudaStorage,
    xl: &Layout,
    packed: &CudaStorage,
    pl: &Layout,
    k: usize,
    s_w: f32,
    per_tensor: bool,
    settled: &Settled,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
    let xin = FloatIn::new(x, xl, "packed_matmul input")?;
    let (m, kx) = xin.rows_cols();
    if kx != k {
        bail!("bitlinear cuda: input has K = {kx}, the weight has K = {k}")
    }
    let mut g = Vec::new();
    let xp = in_ptr(xin.storage(), xin.offset, stream, &mut g)?;
    let (n, wp) = packed_in(packed, pl, k, stream, &mut g)?;
    let w_settled = settled.check(stream)?;
    let dt = xin.dtype();
    let out = matmul_core(
        &ctx,
        XSrc::Float(xp, dt),
        (m, n, k),
        wp,
        WScale { val: s_w, ptr: 0 },
        per_tensor,
        dt,
        w_settled,
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
    check_finite: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
    let xin = FloatIn::new(x, xl, "bit_matmul input")?;
    let win = FloatIn::new(w, wl, "bit_matmul weight")?;
    let (m, k) = xin.rows_cols();
    let (n, kw) = weight_dims(&win.dims)?;
    if kw != k {
        bail!("bitlinear cuda: input has K = {k}, the weight has K = {kw}")
    }
    let (packed, stat) = pack_on_device(&ctx, &win, n, k)?;
    let out;
    {
        let mut g = Vec::new();
        let sp = slice_ptr(&stat, stream, &mut g);
        let pp = slice_ptr(&packed, stream, &mut g);
        let xp = in_ptr(xin.storage(), xin.offset, stream, &mut g)?;
        let dt = xin.dtype();
        out = matmul_core(
            &ctx,
            XSrc::Float(xp, dt),
            (m, n, k),
            pp,
            WScale { val: 0.0, ptr: sp },
            per_tensor,
            dt,
            // packed by the kernel just before: not settled
            false,
        )?;
    }
    if check_finite {
        check_finite_flag(&ctx, &stat)?;
    }
    drop(packed);
    let shape = Shape::from((m, n));
    let out = finish_dtype(storage(out, dev), &shape, x.dtype())?;
    Ok((out, shape))
}
