//! The tiled GEMM path on CUDA (M > 32, or smaller M where the skinny kernel would be slower:
//! `skinny_launch.rs`): x quantized into permuted, padded int8 codes with row sums, then the TMA
//! wgmma kernel (`kernels/gemm90a.cu`) or the mma.sync kernel (`kernels/gemm.cu`); kernel, tile
//! and split-K choices in `src/gemm_launch.rs`.

use super::matmul::{Call, XSrc};
use super::quantize::{quantize_rows, ActOut};
use super::*;
use crate::gemm_launch::{gemm_splits, gemm_tile, GemmTile};

/// Runs the call on the tiled GEMM path (see the module comment), writing `out`.
pub(super) fn tiled_gemm(c: &Call, out: &mut CudaStorageSlice) -> Result<()> {
    let Call {
        dev,
        ref stream,
        info,
        x,
        m,
        k,
        k4,
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
        // its early weights need no settled weight: an activation kernel always runs before it
        w_settled: _,
    } = *c;
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
    let xpp = out_ptr(&mut xperm, stream, &mut g);
    let rsp = out_ptr(&mut rowsum, stream, &mut g);
    let xsp = match x {
        XSrc::Float(p, dt) => {
            let sp = out_ptr(&mut scales, stream, &mut g);
            quantize_rows(dev, p, dt, m, k, per_tensor, ActOut::Permuted(xpp, ld, rsp), sp)?;
            sp
        }
        XSrc::Codes(p, sp) => {
            if ld > 0 {
                let f = func(dev, Module::ActQuant, "codes_permute")?;
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
        let (bp, guard) = buf.device_ptr_mut(stream);
        let f = func(dev, Module::WeightQuant, "packed_repack")?;
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
        GemmTile::Tma | GemmTile::Tma192 | GemmTile::Tma128 | GemmTile::Tma64 => (
            tma_smem_bytes(bm, bn, if splits > 1 { 4 } else { out_dtype.size_in_bytes() }),
            Module::Gemm90a,
        ),
        _ => (4 * (bm * 144 + bn * 48), Module::Gemm),
    };
    let name = match (splits > 1, module) {
        (true, Module::Gemm90a) => format!("gemm_{}_split", tile.name()),
        _ => format!("gemm_{}_{osfx}", tile.name()),
    };
    let f = func(dev, module, &name)?;
    let grid_dim = if module == Module::Gemm90a {
        // Persistent: one CTA per SM walks the work items (tiles, weight-row tiles fastest, then
        // the k splits), so that its producer loads the next item while the consumers write out.
        let items = tiles * splits;
        let ctas = if env_flag("BITLINEAR_CUDA_TMA_ONE_TILE") {
            items
        } else {
            items.min(info.sms)
        };
        (i32_arg(ctas, "GEMM tiles")? as u32, 1, 1)
    } else {
        (n.div_ceil(bn) as u32, m.div_ceil(bm) as u32, splits as u32)
    };
    let cfg = LaunchConfig {
        grid_dim,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let yp = out_slice_ptr(out, stream, &mut g)?;
    let mut ws = if splits > 1 {
        Some(dev.alloc_zeros::<i32>(m * n)?)
    } else {
        None
    };
    let mut gws = Vec::new();
    let wsp = ws.as_mut().map_or(0, |w| out_ptr(w, stream, &mut gws));
    if module == Module::Gemm90a {
        use tma::Elem;
        let tmx = tma::matrix(xpp, Elem::U8, m, ld, ld, bm as u32, 128, true)?;
        let tmw = tma::matrix(wq, Elem::U8, n, k4s, k4s, bn as u32, 32, false)?;
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
        // The weights may be requested before pdl_wait where the previous kernel is the
        // quantizer or permuter launched above (not a weight repack, which writes them). Not
        // with split K: the workspace memset then sits in between, nothing overlaps, and the
        // early requests only delay the first x copies (H100, M = 128, 2560 x 6912, 6 splits:
        // 20.5 -> 21.5 us).
        let w_early = wpad.is_none() && splits == 1 && !env_flag("BITLINEAR_CUDA_NO_EARLY_WEIGHTS");
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
            k_tiles as i32,
            splits as i32,
            sw.val,
            sw.ptr,
            dst,
            i32::from(w_early)
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
    Ok(())
}

/// Dynamic shared memory of the TMA wgmma GEMM with `bt` tokens and `bn` weight rows a tile and
/// `ob`-byte outputs (`TmaSmem` in kernels/gemm90a.cu): 4 stages (6 for 128-token tiles) of
/// bt x 128 activation bytes and bn x 32 packed weight bytes, two epilogue buffers, two mbarriers
/// a stage, (row sum, scale) of bt tokens, and slack to align the base to 1024 bytes.
fn tma_smem_bytes(bt: usize, bn: usize, ob: usize) -> usize {
    let stages = match bt {
        256 => 4,
        192 => 5,
        _ => 6,
    };
    stages * (bt * 128 + bn * 32) + 2 * tma_epilogue_rows(bt, ob) * bn * ob + 16 * stages + 8 * bt + 1024
}

/// Token rows per epilogue pass of the TMA wgmma GEMM (`TmaSmem::EP_ROWS`).
fn tma_epilogue_rows(bt: usize, ob: usize) -> usize {
    if ob == 2 && bt == 256 {
        128
    } else {
        64
    }
}
