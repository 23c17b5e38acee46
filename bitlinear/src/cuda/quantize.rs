//! The activation and weight quantizers on CUDA (`kernels/act_quant.cu`, `kernels/weight_quant.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{result as cu_result, CudaSlice};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};

use super::buffers::{
    finish_dtype, float_suffix, i32_arg, in_ptr, out_ptr, out_slice_ptr, slice_ptr, storage, FloatIn,
};
use super::{grid, grid1, Ctx, Module};
use crate::plan::{act_quant_plan, ActLayout, PackPlan};

/// Output of the row quantizer.
pub(super) enum ActOut {
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
pub(super) fn quantize_rows(
    ctx: &Ctx,
    xp: u64,
    dtype: DType,
    m: usize,
    k: usize,
    per_tensor: bool,
    out: ActOut,
    scales: u64,
) -> Result<()> {
    let stream = &ctx.stream;
    let sfx = float_suffix(dtype)?;
    // per-tensor mode: [absmax bits, non-finite flag] of the whole tensor
    let mut gstat = if per_tensor {
        Some(ctx.dev.alloc_zeros::<u32>(2)?)
    } else {
        None
    };
    let mut g = Vec::new();
    let gp = gstat.as_mut().map_or(0, |s| out_ptr(s, stream, &mut g));
    if per_tensor && m * k > 0 {
        let f = ctx.func(Module::ActQuant, &format!("act_absmax_tensor_{sfx}"))?;
        launch!(ctx, f, grid1(m * k, ctx.info.sms * 8), xp, (m * k) as u64, gp)?;
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
    let layout = match out {
        ActOut::Codes(_) => ActLayout::Codes,
        ActOut::Permuted(_, ld, _) => ActLayout::Permuted { ld },
        ActOut::Fake(_) => ActLayout::Fake,
    };
    let p = act_quant_plan(m, k, layout, xp.is_multiple_of(16), &ctx.info, &ctx.settings);
    let f = ctx.func(Module::ActQuant, &p.kernel_name(sfx))?;
    let cfg = grid(i32_arg(p.blocks, "quantizer blocks")? as usize);
    launch!(
        ctx,
        f,
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
        rowsum,
        i32::from(p.early_trigger)
    )?;
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
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
    let xin = FloatIn::new(x, l, "quantize_activations input")?;
    let (m, k) = xin.rows_cols();
    let mut codes = ctx.alloc::<u8>(m * k)?;
    let mut scales = ctx.alloc::<f32>(if per_tensor { 1 } else { m })?;
    {
        let mut g = Vec::new();
        let xp = in_ptr(xin.storage(), xin.offset, stream, &mut g)?;
        let cp = out_ptr(&mut codes, stream, &mut g);
        let sp = out_ptr(&mut scales, stream, &mut g);
        quantize_rows(&ctx, xp, xin.dtype(), m, k, per_tensor, ActOut::Codes(cp), sp)?;
    }
    Ok((
        storage(CudaStorageSlice::U8(codes), dev),
        storage(CudaStorageSlice::F32(scales), dev),
    ))
}

/// `x~ = x_q * s_x` in x's dtype.
pub(crate) fn fake_quant_activations(x: &CudaStorage, l: &Layout, per_tensor: bool) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
    let xin = FloatIn::new(x, l, "fake_quantize_activations input")?;
    let (m, k) = xin.rows_cols();
    let mut out = ctx.alloc_out(xin.dtype(), m * k)?;
    {
        let mut g = Vec::new();
        let xp = in_ptr(xin.storage(), xin.offset, stream, &mut g)?;
        let op = out_slice_ptr(&mut out, stream, &mut g)?;
        quantize_rows(&ctx, xp, xin.dtype(), m, k, per_tensor, ActOut::Fake(op), 0)?;
    }
    let shape = l.shape().clone();
    let out = finish_dtype(storage(out, dev), &shape, x.dtype())?;
    Ok((out, shape))
}

/// Launches the absmean reduction over `n` weights; returns `stat` = [s_w bits, non-finite flag].
pub(super) fn weight_scale(ctx: &Ctx, wp: u64, dtype: DType, n: usize) -> Result<CudaSlice<u32>> {
    let stream = &ctx.stream;
    let sfx = float_suffix(dtype)?;
    // stat: [s_w bits, non-finite flag, count of finished partial blocks]
    let mut stat = ctx.dev.alloc_zeros::<u32>(3)?;
    let blocks = crate::plan::absmean_blocks(n);
    let mut partials = ctx.alloc::<f64>(blocks)?;
    let mut g = Vec::new();
    let sp = out_ptr(&mut stat, stream, &mut g);
    let pp = out_ptr(&mut partials, stream, &mut g);
    if n > 0 {
        // the last block to finish also makes the final sum
        let f = ctx.func(Module::WeightQuant, &format!("w_absmean_partial_{sfx}"))?;
        launch!(ctx, f, grid(blocks), wp, n as u64, pp, sp)?;
    } else {
        let f = ctx.func(Module::WeightQuant, "w_absmean_final")?;
        launch!(ctx, f, grid(1), pp, 0i32, 0u64, sp)?;
    }
    drop(g);
    Ok(stat)
}

/// Reads `stat` back (waiting for the stream): `s_w`, or an error where a weight was not finite.
pub(super) fn check_finite_flag(ctx: &Ctx, stat: &CudaSlice<u32>) -> Result<f32> {
    let st = ctx.dev.clone_dtoh(stat)?;
    if st[1] != 0 {
        bail!("cannot quantize weights that contain NaN or infinite values")
    }
    Ok(f32::from_bits(st[0]))
}

/// Packs `w` (n, k) at `wp` into `out` using the device-side scale `stat[0]`.
pub(super) fn pack_into(ctx: &Ctx, wp: u64, dtype: DType, n: usize, k: usize, stat: u64, out: u64) -> Result<()> {
    let sfx = float_suffix(dtype)?;
    match crate::plan::pack_plan(n, k, dtype, wp.is_multiple_of(16), &ctx.info) {
        PackPlan::Empty => Ok(()),
        PackPlan::Flat { blocks, words } => {
            let f = ctx.func(Module::WeightQuant, &format!("w_pack_flat_{sfx}"))?;
            launch!(ctx, f, grid(blocks), wp, words as u64, stat, out)
        }
        PackPlan::Rows { blocks } => {
            let f = ctx.func(Module::WeightQuant, &format!("w_pack_{sfx}"))?;
            launch!(
                ctx,
                f,
                grid(blocks),
                wp,
                i32_arg(n, "N")?,
                i32_arg(k, "K")?,
                i32_arg(k.div_ceil(4), "K/4")?,
                stat,
                out,
                (k.is_multiple_of(16) && wp.is_multiple_of(16)) as i32
            )
        }
    }
}

/// The weight `win` (n, k) quantized and packed on the device: packed bytes (n, ceil(k/4)) and
/// `stat` = [s_w bits, non-finite flag, ..] (see [`weight_scale`]).
pub(super) fn pack_on_device(ctx: &Ctx, win: &FloatIn, n: usize, k: usize) -> Result<(CudaSlice<u8>, CudaSlice<u32>)> {
    let stream = &ctx.stream;
    let mut bytes = ctx.alloc::<u8>(n * k.div_ceil(4))?;
    let stat;
    let mut g = Vec::new();
    let wp = in_ptr(win.storage(), win.offset, stream, &mut g)?;
    stat = weight_scale(ctx, wp, win.dtype(), n * k)?;
    let sp = slice_ptr(&stat, stream, &mut g);
    let bp = out_ptr(&mut bytes, stream, &mut g);
    pack_into(ctx, wp, win.dtype(), n, k, sp, bp)?;
    drop(g);
    Ok((bytes, stat))
}

/// `PackedTernary::pack` on CUDA: packed bytes (N, ceil(K/4)) and s_w (read back to the host).
pub(crate) fn pack_weights(w: &CudaStorage, l: &Layout) -> Result<(CudaStorage, f32)> {
    let dev = &w.device;
    let ctx = Ctx::new(dev)?;
    let win = FloatIn::new(w, l, "weight")?;
    let (n, k) = weight_dims(&win.dims)?;
    let (bytes, stat) = pack_on_device(&ctx, &win, n, k)?;
    let s_w = check_finite_flag(&ctx, &stat)?;
    Ok((storage(CudaStorageSlice::U8(bytes), dev), s_w))
}

/// The packed bytes (N, ceil(K/4)) of a weight whose values are exactly -1, 0 and 1 (absmean
/// quantization gives each its own sign back), packed on the device without reading the scale
/// back to the host: the training forward of `BitConv2d` packs its weight codes every step.
pub(crate) fn pack_exact_codes(w: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = &w.device;
    let ctx = Ctx::new(dev)?;
    let win = FloatIn::new(w, l, "weight")?;
    let (n, k) = weight_dims(&win.dims)?;
    let (bytes, _) = pack_on_device(&ctx, &win, n, k)?;
    Ok(storage(CudaStorageSlice::U8(bytes), dev))
}

pub(super) fn weight_dims(dims: &[usize]) -> Result<(usize, usize)> {
    match dims {
        &[n, k] => Ok((n, k)),
        d => bail!("bitlinear cuda: weight must have shape (N, K), got {d:?}"),
    }
}

/// `W~ = w_q * s_w` in w's dtype; with `per_channel` (w of shape (N, K)) each row's codes are
/// rounded against that row's absmean, the values scaled by the tensor's `s_w`.
pub(crate) fn fake_quant_weights(
    w: &CudaStorage,
    l: &Layout,
    check_finite: bool,
    per_channel: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = &w.device;
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
    let win = FloatIn::new(w, l, "weight")?;
    let n: usize = win.dims.iter().product();
    let mut out = ctx.alloc_out(win.dtype(), n)?;
    let stat;
    {
        let mut g = Vec::new();
        let wp = in_ptr(win.storage(), win.offset, stream, &mut g)?;
        stat = weight_scale(&ctx, wp, win.dtype(), n)?;
        let sp = slice_ptr(&stat, stream, &mut g);
        let op = out_slice_ptr(&mut out, stream, &mut g)?;
        if n > 0 && per_channel {
            let (rows, k) = weight_dims(&win.dims)?;
            let f = ctx.func(
                Module::WeightQuant,
                &format!("w_fake_rows_{}", float_suffix(win.dtype())?),
            )?;
            let blocks = crate::plan::row_quant_blocks(rows, ctx.info.sms);
            launch!(ctx, f, grid(blocks), wp, i32_arg(rows, "N")?, i32_arg(k, "K")?, sp, op)?;
        } else if n > 0 {
            let f = ctx.func(Module::WeightQuant, &format!("w_fake_{}", float_suffix(win.dtype())?))?;
            launch!(ctx, f, grid1(n, ctx.info.sms * 16), wp, n as u64, sp, op)?;
        }
    }
    if check_finite {
        check_finite_flag(&ctx, &stat)?;
    }
    let shape = l.shape().clone();
    let out = finish_dtype(storage(out, dev), &shape, w.dtype())?;
    Ok((out, shape))
}
