//! The int8 im2col of [`PackedBitConv2d`](crate::PackedBitConv2d): each output pixel's receptive
//! field gathered into one row of `K = c_in·kh·kw` codes, a bounded tile of rows at a time.
//!
//! On CUDA the rows are in the packed weight's K order, written by the `im2col_i8` kernel
//! (`kernels/conv.cu`). The CPU gathers channels-last rows of its own
//! ([`packed_conv_cpu`](crate::packed_conv_cpu)); both share [`Geometry`] and [`tiling`].

use candle_core::{Result, Tensor};

use crate::BitConv2dConfig;

/// On the CPU at most this many codes (1 MiB) of im2col rows exist at once: the rows of a batch
/// are gathered and multiplied a tile at a time, so memory stays bounded whatever the batch size
/// and a tile stays in L2.
pub(crate) const TILE_CODES: usize = 1 << 20;

/// The geometry of one convolution: input `(c, h, w)`, kernel `(kh, kw)`, stride, padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Geometry {
    /// The geometry of the NCHW input `x` under a `(kh, kw)` kernel with `config`'s stride and
    /// padding.
    pub fn of(x: &Tensor, (kh, kw): (usize, usize), config: BitConv2dConfig) -> Result<Self> {
        let (_, c, h, w) = x.dims4()?;
        Ok(Self {
            c,
            h,
            w,
            kh,
            kw,
            stride: config.stride,
            pad: config.padding,
        })
    }

    /// Output height and width; the caller has checked that the kernel fits the padded input.
    pub fn out_hw(&self) -> (usize, usize) {
        let ho = (self.h + 2 * self.pad - self.kh) / self.stride + 1;
        let wo = (self.w + 2 * self.pad - self.kw) / self.stride + 1;
        (ho, wo)
    }

    /// Columns of an im2col row: `c·kh·kw`.
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Codes in one image, and so the index of its appended zero code.
    pub fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }
}

/// Gathers im2col rows of a batch of int8 codes on CUDA, a tile at a time.
#[cfg(feature = "cuda")]
pub(crate) struct Gatherer {
    codes: Tensor,
}

#[cfg(feature = "cuda")]
impl Gatherer {
    /// A gatherer of the im2col rows of `codes` (U8 `(b, C·H·W)` on a CUDA device).
    pub fn new(codes: Tensor) -> Result<Self> {
        Ok(Self {
            codes: codes.contiguous()?,
        })
    }

    /// Rows `r0 .. r0 + r` of images `i0 .. i0 + bt`: U8 `(bt·r, K)`, image-major.
    pub fn rows(&self, g: &Geometry, (i0, bt): (usize, usize), (r0, r): (usize, usize)) -> Result<Tensor> {
        let imgs = self.codes.narrow(0, i0, bt)?;
        let (storage, layout) = imgs.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else {
            candle_core::bail!("BitConv2d: internal error, codes left the GPU")
        };
        let out = crate::cuda::im2col(s, layout, g, r0, r)?;
        Ok(crate::device::tensor_from(
            candle_core::Storage::Cuda(out),
            (bt * r, g.k()),
        ))
    }
}

/// How to tile `b` images of `rows` im2col rows of `k` codes: `(images, rows)` a tile, so that a
/// tile holds at most `budget` codes (or one row, if a row alone is larger). The CPU's budget is
/// [`TILE_CODES`], CUDA's [`crate::plan::im2col_tile_codes`].
pub(crate) fn tiling(b: usize, rows: usize, k: usize, budget: usize) -> (usize, usize) {
    let image = rows * k.max(1);
    if image <= budget {
        ((budget / image.max(1)).clamp(1, b.max(1)), rows)
    } else {
        (1, (budget / k.max(1)).clamp(1, rows.max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_stay_within_budget() {
        for (b, rows, k) in [(500, 1024, 27), (1, 1 << 20, 576), (3, 1, TILE_CODES * 2), (7, 5, 9)] {
            let (bi, r) = tiling(b, rows, k, TILE_CODES);
            assert!(bi >= 1 && r >= 1 && bi <= b && r <= rows);
            assert!(bi * r * k <= TILE_CODES.max(k), "({b}, {rows}, {k}) -> ({bi}, {r})");
            assert!(bi == 1 || r == rows, "a multi-image tile takes whole images");
        }
        assert_eq!(tiling(500, 1024, 27, TILE_CODES), (37, 1024));
        assert_eq!(tiling(500, 1024, 288, 1 << 26), (227, 1024));
        assert_eq!(tiling(2, 2809, 400, TILE_CODES), (1, 2621)); // 53x53 output, 16 channels, 5x5
    }
}
