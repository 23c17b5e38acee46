//! The CPU forward of [`PackedBitConv2d`](crate::PackedBitConv2d): each image quantized, its
//! codes laid out channels-last with the zero padding written out, im2col rows gathered with one
//! copy of `kw·c` codes per kernel row, and those rows multiplied exactly with the weight whose
//! columns are reordered to `(ky, kx, ci)`.
//!
//! Why channels-last: in the packed weight's `(ci, ky, kx)` column order an im2col row is `c·kh`
//! runs of `kw` codes (3 bytes for a 3x3 kernel), gathered one small run at a time; in
//! `(ky, kx, ci)` order over channels-last codes it is `kh` runs of `kw·c` codes, a few long
//! copies. The products are the same integers (a sum does not depend on its order), and the
//! reordered weight is made once per layer and cached with it.

use std::sync::{Arc, OnceLock};

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use crate::cpu::{broadcast_accumulate, BroadcastWeight, CpuKernel, PreparedActivations, Weights};
use crate::device::{cpu_kernel, cpu_u8};
use crate::im2col::{tiling, Geometry, TILE_CODES};
use crate::packed::{pack_ternary, packed_len, PackedTernary};
use crate::quant;

/// The weight of a packed convolution with its columns in `(ky, kx, ci)` order, packed for the
/// row kernels or decoded for the broadcast kernel (whichever the CPU runs), each made on first
/// use and shared by the layer's clones.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChannelsLastWeight(Arc<(OnceLock<PackedTernary>, OnceLock<BroadcastWeight>)>);

impl ChannelsLastWeight {
    /// The packed reordered form of `w` (a CPU weight of `c·kh·kw` columns in `(ci, ky, kx)`
    /// order).
    fn packed(&self, w: &PackedTernary, dims: (usize, usize, usize)) -> Result<&PackedTernary> {
        if let Some(p) = self.0 .0.get() {
            return Ok(p);
        }
        let (n, k) = (w.out_features(), dims.0 * dims.1 * dims.2);
        let bytes = Tensor::from_vec(
            pack_ternary(&reordered(w, dims)?, n, k)?,
            (n, packed_len(k)),
            &Device::Cpu,
        )?;
        Ok(self
            .0
             .0
            .get_or_init(|| PackedTernary::from_trusted(bytes, w.scale(), k)))
    }

    /// The reordered form of `w` decoded for the broadcast kernel.
    fn broadcast(&self, w: &PackedTernary, dims: (usize, usize, usize)) -> Result<&BroadcastWeight> {
        if let Some(b) = self.0 .1.get() {
            return Ok(b);
        }
        let decoded = BroadcastWeight::new(&reordered(w, dims)?, w.out_features(), dims.0 * dims.1 * dims.2);
        Ok(self.0 .1.get_or_init(|| decoded))
    }
}

/// The ternary values of `w` `(n, c·kh·kw)` with each row's columns moved from `(ci, ky, kx)` to
/// `(ky, kx, ci)` order.
fn reordered(w: &PackedTernary, (c, kh, kw): (usize, usize, usize)) -> Result<Vec<i8>> {
    let (n, k) = (w.out_features(), c * kh * kw);
    let codes = w.unpack()?;
    let mut out = vec![0i8; n * k];
    for (src, dst) in codes.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for ci in 0..c {
            for ky in 0..kh {
                for kx in 0..kw {
                    dst[(ky * kw + kx) * c + ci] = src[(ci * kh + ky) * kw + kx];
                }
            }
        }
    }
    Ok(out)
}

/// One tile of accumulators handed to the caller: `acc` holds `images·rows` rows of `n`
/// (image-major; row `(i, r)` is output pixel `r0 + r` of image `i0 + i`), with the scales `s_x`
/// of the whole batch.
pub(crate) struct AccTile<'a> {
    pub acc: &'a [i32],
    pub scales: &'a [f32],
    pub i0: usize,
    pub images: usize,
    pub r0: usize,
    pub rows: usize,
}

/// Convolves `x` (`b` images of f32 `(c, h, w)`, contiguous) with `weight` (`(ci, ky, kx)` columns) a tile
/// at a time, calling `sink` with each tile's exact accumulators; returns the per-image absmax
/// scales `s_x`, computed as [`quant::quantize_row`] does for the float layer.
pub(crate) fn convolve(
    x: &[f32],
    b: usize,
    g: &Geometry,
    weight: &PackedTernary,
    reordered: &ChannelsLastWeight,
    mut sink: impl FnMut(AccTile),
) -> Result<Vec<f32>> {
    let image_len = g.image_len();
    let (k, n) = (g.k(), weight.out_features());
    let (ho, wo) = g.out_hw();
    let pixels = ho * wo;

    let mut codes = vec![0i8; x.len()];
    let mut scales = vec![quant::absmax_scale(&[]); b];
    if image_len > 0 {
        codes
            .par_chunks_mut(image_len)
            .zip(x.par_chunks(image_len))
            .zip(scales.par_iter_mut())
            .for_each(|((q, v), s)| *s = quant::quantize_row(v, q));
    }
    if b == 0 || pixels == 0 || n == 0 {
        return Ok(scales);
    }
    if k == 0 {
        // nothing to sum: every accumulator is 0
        let acc = vec![0i32; b * pixels * n];
        let tile = AccTile {
            acc: &acc,
            scales: &scales,
            i0: 0,
            images: b,
            r0: 0,
            rows: pixels,
        };
        sink(tile);
        return Ok(scales);
    }

    let dims = (g.c, g.kh, g.kw);
    let kernel = cpu_kernel();
    // The broadcast kernel where the library's kernel is the 512-bit VNNI one (a forced other
    // kernel is honoured: the row kernels then run).
    let packed = match kernel == CpuKernel::Avx512Vnni && BroadcastWeight::is_supported() {
        true => None,
        false => Some(reordered.packed(weight, dims)?),
    };
    // The packed bytes stay borrowed from their storage for the whole call.
    let storage = packed.map(|w| (w, w.bytes().storage_and_layout()));
    let product = match &storage {
        None => Product::Broadcast(reordered.broadcast(weight, dims)?),
        Some((w, (ws, wl))) => {
            let candle_core::Storage::Cpu(ws) = &**ws else {
                candle_core::bail!("PackedBitConv2d: internal error, the CPU path got a device weight")
            };
            Product::Rows(w.cpu_layouts().get(kernel, cpu_u8(ws, wl)?, n, k))
        }
    };
    let mut acc = vec![];

    let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
    let (bt, rt) = tiling(b, pixels, k, TILE_CODES);
    let mut padded = vec![0i8; bt * hp * wp * g.c];
    let mut rows = vec![0i8; bt * rt * k];
    for i0 in (0..b).step_by(bt) {
        let bi = bt.min(b - i0);
        let padded = &mut padded[..bi * hp * wp * g.c];
        padded
            .par_chunks_mut(hp * wp * g.c)
            .zip(codes[i0 * image_len..].par_chunks(image_len))
            .for_each(|(dst, src)| channels_last(src, g, dst));
        for r0 in (0..pixels).step_by(rt) {
            let r = rt.min(pixels - r0);
            let rows = &mut rows[..bi * r * k];
            rows.par_chunks_mut(r * k).enumerate().for_each(|(i, img_rows)| {
                let img = &padded[i * hp * wp * g.c..(i + 1) * hp * wp * g.c];
                gather(img, g, r0, img_rows);
            });
            match &product {
                Product::Broadcast(w) => {
                    acc.resize(bi * r * n, 0);
                    broadcast_accumulate(rows, bi * r, w, &mut acc);
                }
                Product::Rows(w) => {
                    let prep = PreparedActivations::new(kernel, rows, bi * r, k);
                    acc = crate::cpu::packed_accumulate(&prep, *w, n, k);
                }
            }
            sink(AccTile {
                acc: &acc,
                scales: &scales,
                i0,
                images: bi,
                r0,
                rows: r,
            });
        }
    }
    Ok(scales)
}

/// The integer product of a tile's rows, by the kernel that runs.
enum Product<'a> {
    /// The row kernels over the packed reordered weight, in their layout.
    Rows(Weights<'a>),
    /// The broadcast kernel over the decoded reordered weight.
    Broadcast(&'a BroadcastWeight),
}

/// One image's codes `(c, h, w)` into `dst`, channels-last `(h + 2p, w + 2p, c)` with the zero
/// border left as it is (zero).
fn channels_last(src: &[i8], g: &Geometry, dst: &mut [i8]) {
    let (c, p, wp) = (g.c, g.pad, g.w + 2 * g.pad);
    let plane = g.h * g.w;
    for y in 0..g.h {
        for x in 0..g.w {
            let d = &mut dst[((y + p) * wp + x + p) * c..][..c];
            for (ci, v) in d.iter_mut().enumerate() {
                *v = src[ci * plane + y * g.w + x];
            }
        }
    }
}

/// The im2col rows of output pixels `r0 ..` of one channels-last padded image into `rows`
/// (whole rows of `k`), columns in `(ky, kx, ci)` order: for each kernel row, the `kw·c` codes
/// under it are adjacent in the image.
fn gather(img: &[i8], g: &Geometry, r0: usize, rows: &mut [i8]) {
    let (_, wo) = g.out_hw();
    let wp = g.w + 2 * g.pad;
    let run = g.kw * g.c;
    for (i, row) in rows.chunks_exact_mut(g.k()).enumerate() {
        let (oy, ox) = ((r0 + i) / wo, (r0 + i) % wo);
        for (ky, dst) in row.chunks_exact_mut(run).enumerate() {
            let start = ((oy * g.stride + ky) * wp + ox * g.stride) * g.c;
            dst.copy_from_slice(&img[start..start + run]);
        }
    }
}
