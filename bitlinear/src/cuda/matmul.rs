//! The packed matmuls on CUDA: the decode GEMV (`kernels/gemv.cu`), the skinny kernel
//! (`kernels/skinny.cu`) and the tiled GEMMs (`kernels/gemm.cu`, `kernels/gemm90a.cu`); the
//! strategy is in the module comment of `cuda`.

use super::gemm::tiled_gemm;
use super::quantize::{check_finite_flag, pack_into, quantize_rows, weight_dims, weight_scale, ActOut};
use super::*;
use crate::gemv_launch::{gemv_bulk_x, gemv_config, gemv_early, GEMV_WARPS};
use crate::skinny_launch::{gemm_for_small_m, skinny_fuses, skinny_rows_per_block};

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

/// One matmul call: y (M, N) = x (M, K) . W^T for packed W (N, ceil(K/4) bytes at `wp`), with
/// what every path needs.
pub(super) struct Call<'a> {
    pub(super) dev: &'a CudaDevice,
    pub(super) stream: Arc<CudaStream>,
    pub(super) info: DevInfo,
    pub(super) x: XSrc,
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) k4: usize,
    pub(super) wp: u64,
    pub(super) n: usize,
    pub(super) sw: WScale,
    pub(super) per_tensor: bool,
    pub(super) out_dtype: DType,
    /// kernel-name suffix of the output type
    pub(super) osfx: &'static str,
    /// M, N, K, K/4 as kernel arguments
    pub(super) mi: i32,
    pub(super) ni: i32,
    pub(super) ki: i32,
    pub(super) k4i: i32,
    /// the weights are known complete before this call (`settle.rs`): the GEMV and the skinny
    /// kernel may request them before `pdl_wait`
    pub(super) w_settled: bool,
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
    w_settled: bool,
) -> Result<CudaStorageSlice> {
    let mut out = alloc_out(dev, out_dtype, m * n)?;
    if m == 0 || n == 0 {
        return Ok(out);
    }
    let k4 = k.div_ceil(4);
    i32_arg(n * k4, "N*K/4")?;
    let c = Call {
        dev,
        stream: dev.cuda_stream(),
        info: dev_info(dev)?,
        x,
        m,
        k,
        k4,
        wp,
        n,
        sw,
        per_tensor,
        out_dtype,
        osfx: match out_dtype {
            DType::I32 => "i32",
            d => float_suffix(d)?,
        },
        mi: i32_arg(m, "M")?,
        ni: i32_arg(n, "N")?,
        ki: i32_arg(k, "K")?,
        k4i: i32_arg(k4, "K/4")?,
        w_settled: w_settled && !env_flag("BITLINEAR_CUDA_NO_EARLY_WEIGHTS"),
    };
    // decode GEMV: M = 1, K % 64 == 0, 16-byte aligned weights
    if m <= GEMV_MAX_M
        && k > 0
        && k <= GEMV_MAX_K
        && k.is_multiple_of(64)
        && wp.is_multiple_of(16)
        && !env_flag("BITLINEAR_CUDA_NO_GEMV")
        && !env_flag("BITLINEAR_CUDA_FORCE_GEMM")
        && (matches!(x, XSrc::Codes(..)) || matches!(x, XSrc::Float(_, dt) if dt == out_dtype))
    {
        gemv(&c, &mut out)?;
    } else if let Some(plan) = skinny_plan(&c).filter(|_| !env_flag("BITLINEAR_CUDA_FORCE_GEMM")) {
        skinny(&c, &plan, &mut out)?;
    } else {
        tiled_gemm(&c, &mut out)?;
    }
    Ok(out)
}

/// The decode GEMV (`kernels/gemv.cu`): register-streamed weights, x quantized in the kernel.
fn gemv(c: &Call, out: &mut CudaStorageSlice) -> Result<()> {
    let Call {
        dev,
        ref stream,
        info,
        x,
        k,
        k4,
        wp,
        n,
        sw,
        osfx,
        ni,
        ki,
        k4i,
        w_settled,
        ..
    } = *c;
    let (l, t, blocks) = gemv_config(k4 / 16, n, info.sms);
    // rows spread evenly over all warps of the grid: the first `rows_rem` get one more
    let warps = blocks * GEMV_WARPS;
    let (rows_base, rows_rem) = ((n / warps) as i32, (n % warps) as i32);
    let (xname, xp, xsp, x_size) = match x {
        XSrc::Float(p, dt) => (float_suffix(dt)?, p, 0u64, dt.size_in_bytes()),
        XSrc::Codes(p, sp) => ("i8", p, sp, 1),
    };
    let float_x = matches!(x, XSrc::Float(..));
    let bulk_x = gemv_bulk_x(float_x, n, k4, blocks, l, k);
    let bx = if bulk_x { "_bx" } else { "" };
    let early = if gemv_early(w_settled, float_x, bulk_x, (k, k4), l, n, blocks) {
        "_e"
    } else {
        ""
    };
    let f = func(dev, Module::Gemv, &format!("gemv_{xname}_{osfx}_l{l}_t{t}{bx}{early}"))?;
    let cfg = LaunchConfig {
        grid_dim: (i32_arg(blocks, "GEMV blocks")? as u32, 1, 1),
        block_dim: (32 * GEMV_WARPS as u32, 1, 1),
        // permuted codes of x, then (`_bx`) x itself
        shared_mem_bytes: (k + if bulk_x { k * x_size } else { 0 }) as u32,
    };
    let mut g = Vec::new();
    let yp = out_slice_ptr(out, stream, &mut g)?;
    launch!(f, stream, cfg, xp, xsp, wp, ni, ki, k4i, rows_base, rows_rem, sw.val, sw.ptr, yp);
    drop(g);
    Ok(())
}

/// Launch shape of the skinny kernel (`kernels/skinny.cu`) for `2 <= M <= 32`.
struct SkinnyPlan {
    /// blocks of 256 k (64 packed bytes) per row
    kb: usize,
    /// MMA column tiles of 8 rows of x
    mt: usize,
    /// weight bytes per load (16, 4 or 1)
    vec: usize,
    rows_per_block: usize,
    smem: usize,
}

/// The skinny kernel's launch shape, or None where the tiled GEMM should run: M > 32, x too large
/// for shared memory, or where the GEMM is faster (`gemm_for_small_m`).
fn skinny_plan(c: &Call) -> Option<SkinnyPlan> {
    let Call {
        info, m, k, k4, wp, n, ..
    } = *c;
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
    (m <= SKINNY_MAX_M && skinny_fits && !gemm_for_small_m(m, n, k, info.sms, info.sm90)).then_some(SkinnyPlan {
        kb,
        mt,
        vec,
        rows_per_block,
        smem: skinny_smem,
    })
}

/// The skinny kernel: weights streamed into tensor-core fragments, x staged in shared memory.
fn skinny(c: &Call, plan: &SkinnyPlan, out: &mut CudaStorageSlice) -> Result<()> {
    let Call {
        dev,
        info,
        ref stream,
        x,
        m,
        k,
        wp,
        n,
        sw,
        per_tensor,
        out_dtype,
        osfx,
        mi,
        ni,
        ki,
        k4i,
        w_settled,
        ..
    } = *c;
    let SkinnyPlan {
        kb,
        mt,
        vec,
        rows_per_block,
        smem: skinny_smem,
    } = *plan;
    // Quantize first unless the kernel can do it itself.
    let mut tmp_codes: Option<CudaSlice<u8>> = None;
    let mut tmp_scales: Option<CudaSlice<f32>> = None;
    let (xname, xp, xsp) = match x {
        XSrc::Float(p, dt)
            if out_dtype == dt
                && (skinny_fuses(m, kb, m * k * dt.size_in_bytes(), n.div_ceil(rows_per_block), info.sms)
                    || env_flag("BITLINEAR_CUDA_FUSE"))
                && !env_flag("BITLINEAR_CUDA_NO_FUSE") =>
        {
            (float_suffix(dt)?, p, 0u64)
        }
        XSrc::Float(p, dt) => {
            let mut codes = alloc::<u8>(dev, m * k)?;
            let mut s = alloc::<f32>(dev, if per_tensor { 1 } else { m })?;
            let (cp, sp) = {
                let mut g = Vec::new();
                let cp = out_ptr(&mut codes, stream, &mut g);
                let sp = out_ptr(&mut s, stream, &mut g);
                quantize_rows(dev, p, dt, m, k, per_tensor, ActOut::Codes(cp), sp)?;
                (cp, sp)
            };
            tmp_codes = Some(codes);
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
        let yp = out_slice_ptr(out, stream, &mut g)?;
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
            yp,
            // weights early where they are settled or the kernel before is the quantizer above
            i32::from((w_settled || tmp_codes.is_some()) && !env_flag("BITLINEAR_CUDA_NO_EARLY_WEIGHTS"))
        );
    }
    drop(tmp_codes);
    drop(tmp_scales);
    Ok(())
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
    settled: &Settled,
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
    // after packed_in: the event must follow any cross-stream wait it queued
    let w_settled = settled.check(&stream)?;
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
    let stream = dev.cuda_stream();
    let xin = FloatIn::new(x, xl, "packed_matmul input")?;
    let (m, kx) = xin.rows_cols();
    if kx != k {
        bail!("bitlinear cuda: input has K = {kx}, the weight has K = {k}")
    }
    let mut g = Vec::new();
    let xp = in_ptr(xin.storage(), xin.offset, &stream, &mut g)?;
    let (n, wp) = packed_in(packed, pl, k, &stream, &mut g)?;
    let w_settled = settled.check(&stream)?;
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
            // packed by the kernel just before: not settled
            false,
        )?;
    }
    if check_finite {
        check_finite_flag(dev, &stat)?;
    }
    drop(packed);
    let shape = Shape::from((m, n));
    let out = finish_dtype(storage(out, dev), &shape, x.dtype())?;
    Ok((out, shape))
}
