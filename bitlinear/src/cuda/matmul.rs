//! The packed matmuls on CUDA: the decode GEMV (`kernels/gemv.cu`), the skinny kernel
//! (`kernels/skinny.cu`) and the tiled GEMMs (`kernels/gemm.cu`, `kernels/gemm90a.cu`); the
//! strategy is in the module comment of `cuda`.

use super::quantize::{check_finite_flag, pack_into, quantize_rows, weight_dims, weight_scale, ActOut};
use super::*;
use crate::gemm_launch::{gemm_splits, gemm_tile, GemmTile};
use crate::gemv_launch::{gemv_bulk_x, gemv_config, GEMV_WARPS};
use crate::skinny_launch::{gemm_for_small_m, skinny_rows_per_block};

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
