//! The tiled GEMM path on CUDA: x quantized into permuted, padded int8 codes with row sums (or
//! int8 codes permuted), the weights repacked where their rows are not 16-byte aligned, then the
//! TMA wgmma kernel (`kernels/gemm90a.cu`) or the mma.sync kernel (`kernels/gemm.cu`), and for
//! split K the epilogue kernel; every choice comes from the plan (`crate::plan::GemmPlan`).

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, Result};

use super::buffers::{i32_arg, out_ptr, out_slice_ptr};
use super::matmul::{Call, XSrc};
use super::quantize::{quantize_rows, ActOut};
use super::tma::{self, Elem};
use super::{grid1, Module};
use crate::plan::GemmPlan;

/// Runs the call on the tiled GEMM path as `p` says, writing `out`.
pub(super) fn tiled_gemm(c: &Call, p: &GemmPlan, out: &mut CudaStorageSlice) -> Result<()> {
    let ctx = c.ctx;
    let stream = &ctx.stream;
    let (m, n, k) = (c.m, c.n, c.k);
    let sms = ctx.info.sms;
    let ld = p.padded_k;
    i32_arg(m * ld, "M*K")?;
    let mut xperm = ctx.alloc::<u8>(m * ld)?;
    let mut scales = ctx.alloc::<f32>(if c.per_tensor { 1 } else { m })?;
    // the quantizer writes every row's sum; codes_permute adds into a zeroed buffer
    let mut rowsum = match c.x {
        XSrc::Float(..) => ctx.alloc::<i32>(m)?,
        XSrc::Codes(..) => ctx.dev.alloc_zeros::<i32>(m)?,
    };
    let mut wpad: Option<CudaSlice<u8>> = None;
    let mut g = Vec::new();
    let xpp = out_ptr(&mut xperm, stream, &mut g);
    let rsp = out_ptr(&mut rowsum, stream, &mut g);
    let xsp = match c.x {
        XSrc::Float(xp, dt) => {
            let sp = out_ptr(&mut scales, stream, &mut g);
            quantize_rows(ctx, xp, dt, m, k, c.per_tensor, ActOut::Permuted(xpp, ld, rsp), sp)?;
            sp
        }
        XSrc::Codes(xp, sp) => {
            let f = ctx.func(Module::ActQuant, "codes_permute")?;
            let cfg = grid1(m * ld / 16, sms * 16);
            launch!(ctx, f, cfg, xp, m as i32, k as i32, ld as i32, xpp, rsp)?;
            sp
        }
    };
    let k4 = k.div_ceil(4);
    let wq = if p.repack_weights {
        let k4p = p.weight_row_bytes;
        i32_arg(n * k4p, "N*K/4")?;
        let bp = out_ptr(wpad.insert(ctx.alloc::<u8>(n * k4p)?), stream, &mut g);
        let f = ctx.func(Module::WeightQuant, "packed_repack")?;
        let cfg = grid1(n * k4p, sms * 16);
        launch!(ctx, f, cfg, c.wp, n as i32, k4 as i32, k4p as i32, bp)?;
        bp
    } else {
        c.wp
    };
    let (bm, bn, threads) = p.tile.shape();
    let module = if p.tile.is_tma() { Module::Gemm90a } else { Module::Gemm };
    let f = ctx.func(module, &p.kernel_name(c.osfx))?;
    let cfg = LaunchConfig {
        grid_dim: p.grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: p.smem_bytes as u32,
    };
    let yp = out_slice_ptr(out, stream, &mut g)?;
    let mut ws = if p.splits > 1 {
        Some(ctx.dev.alloc_zeros::<i32>(m * n)?)
    } else {
        None
    };
    let mut gws = Vec::new();
    let wsp = ws.as_mut().map_or(0, |w| out_ptr(w, stream, &mut gws));
    let (sw, per_tensor) = (c.sw, c.per_tensor as i32);
    if p.tile.is_tma() {
        let tmx = tma::matrix(xpp, Elem::U8, m, ld, ld, bm as u32, 128, true)?;
        let tmw = tma::matrix(
            wq,
            Elem::U8,
            n,
            p.weight_row_bytes,
            p.weight_row_bytes,
            bn as u32,
            32,
            false,
        )?;
        // Output tiles (or split-K partial sums, added into the i32 workspace) leave through TMA
        // stores where the plan says so; otherwise the threads copy them out (the kernel
        // ignores the map then).
        let (dst, ob) = if p.splits > 1 {
            (wsp, 4)
        } else {
            (yp, c.out_dtype.size_in_bytes())
        };
        if p.tma_store && !dst.is_multiple_of(16) {
            bail!("bitlinear cuda: internal error, a TMA-stored output must be 16-byte aligned")
        }
        let ep_rows = p.epilogue_rows as u32;
        let tmy = match p.tma_store {
            true if p.splits > 1 => tma::matrix(dst, Elem::I32, m, n, n * 4, ep_rows, 32, true)?,
            true => tma::matrix(dst, Elem::U8, m, n * ob, n * ob, ep_rows, 128, true)?,
            false => tmx,
        };
        let k_tiles = (ld / crate::plan::GEMM_BK) as i32;
        launch!(
            ctx,
            f,
            cfg,
            tmx,
            tmw,
            tmy,
            p.tma_store as i32,
            rsp,
            xsp,
            per_tensor,
            m as i32,
            n as i32,
            k_tiles,
            p.splits as i32,
            sw.val,
            sw.ptr,
            dst,
            i32::from(p.early_weights)
        )?;
    } else {
        let k4s = p.weight_row_bytes as i32;
        launch!(
            ctx, f, cfg, xpp, ld as i32, rsp, xsp, per_tensor, wq, k4s, m as i32, n as i32, k as i32, sw.val, sw.ptr,
            yp, wsp
        )?;
    }
    if p.splits > 1 {
        let f = ctx.func(Module::Gemm, &format!("splitk_epilogue_{}", c.osfx))?;
        let cfg = grid1(m * n, sms * 8);
        launch!(ctx, f, cfg, wsp, m as i32, n as i32, xsp, per_tensor, sw.val, sw.ptr, yp)?;
    }
    drop(gws);
    drop(g);
    drop(ws);
    drop(wpad);
    drop(xperm);
    drop(scales);
    drop(rowsum);
    Ok(())
}
