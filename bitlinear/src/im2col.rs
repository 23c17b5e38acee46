//! The int8 im2col of [`PackedBitConv2d`](crate::PackedBitConv2d): each output pixel's receptive
//! field gathered into one row of `K = c_in·kh·kw` codes, in the packed weight's K order.
//!
//! On the CPU the gather is a candle `index_select` of U8 codes with a precomputed U32 index.
//! Each image's codes get one extra zero code at the end (index `C·H·W`), and padding positions
//! point there: code 0 is the value 0 whatever the image's scale. On CUDA it is the
//! `im2col_i8` kernel (`kernels/conv.cu`), which writes the same rows directly.

use candle_core::{DType, Device, Result, Tensor};

/// At most this many codes (1 MiB) of im2col rows exist at once: the rows of a batch are
/// gathered and multiplied a tile at a time, so memory stays bounded whatever the batch size.
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

    /// The gather index `(Ho·Wo·K)`: row `p = oy·Wo + ox`, column `j = (ci·kh + ky)·kw + kx`
    /// holds the position of input `(ci, oy·s + ky − pad, ox·s + kx − pad)` in the image's codes,
    /// or [`Self::image_len`] (the zero code) where that falls in the padding.
    pub fn index(&self, dev: &Device) -> Result<Tensor> {
        let (ho, wo) = self.out_hw();
        let zero = self.image_len();
        let mut idx = Vec::with_capacity(ho * wo * self.k());
        for oy in 0..ho {
            for ox in 0..wo {
                for ci in 0..self.c {
                    for ky in 0..self.kh {
                        for kx in 0..self.kw {
                            // padded coordinates; the input starts at `pad`
                            let (py, px) = (oy * self.stride + ky, ox * self.stride + kx);
                            let inside = (self.pad..self.pad + self.h).contains(&py)
                                && (self.pad..self.pad + self.w).contains(&px);
                            idx.push(match inside {
                                true => (ci * self.h + py - self.pad) * self.w + px - self.pad,
                                false => zero,
                            });
                        }
                    }
                }
            }
        }
        let idx = idx
            .into_iter()
            .map(u32::try_from)
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(|_| candle_core::Error::msg("BitConv2d: an image of over 2^32 values"))?;
        Tensor::from_vec(idx, ho * wo * self.k(), dev)
    }
}

/// Gathers im2col rows of a batch of int8 codes, a tile at a time.
pub(crate) enum Gatherer {
    /// `index_select` of the codes with the zero code appended, by [`Geometry::index`].
    Index { codes: Tensor, index: Tensor },
    /// The CUDA kernel, over the codes as they are.
    #[cfg(feature = "cuda")]
    Kernel { codes: Tensor },
}

impl Gatherer {
    /// A gatherer of the im2col rows of `codes` (U8 `(b, C·H·W)`).
    pub fn new(codes: Tensor, g: &Geometry) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if codes.device().is_cuda() {
            return Ok(Self::Kernel {
                codes: codes.contiguous()?,
            });
        }
        Ok(Self::Index {
            index: g.index(codes.device())?,
            codes: with_zero_code(&codes)?,
        })
    }

    /// Rows `r0 .. r0 + r` of images `i0 .. i0 + bt`: U8 `(bt·r, K)`, image-major.
    pub fn rows(&self, g: &Geometry, (i0, bt): (usize, usize), (r0, r): (usize, usize)) -> Result<Tensor> {
        let k = g.k();
        match self {
            Self::Index { codes, index } => gather(&codes.narrow(0, i0, bt)?, &index.narrow(0, r0 * k, r * k)?, r, k),
            #[cfg(feature = "cuda")]
            Self::Kernel { codes } => {
                let imgs = codes.narrow(0, i0, bt)?;
                let (storage, layout) = imgs.storage_and_layout();
                let candle_core::Storage::Cuda(s) = &*storage else {
                    candle_core::bail!("BitConv2d: internal error, codes left the GPU")
                };
                let out = crate::cuda::im2col(s, layout, g, r0, r)?;
                Ok(crate::device::tensor_from(candle_core::Storage::Cuda(out), (bt * r, k)))
            }
        }
    }
}

/// Appends the zero code to each image: `(b, C·H·W)` U8 codes to `(b, C·H·W + 1)`.
fn with_zero_code(codes: &Tensor) -> Result<Tensor> {
    let b = codes.dim(0)?;
    let zero = Tensor::zeros((b, 1), DType::U8, codes.device())?;
    Tensor::cat(&[codes, &zero], 1)
}

/// The im2col rows of images `codes (bt, C·H·W + 1)` for the output pixels whose gather index is
/// `index` (`rows` consecutive rows of [`Geometry::index`]): U8 `(bt·rows, K)`, image-major.
fn gather(codes: &Tensor, index: &Tensor, rows: usize, k: usize) -> Result<Tensor> {
    let bt = codes.dim(0)?;
    codes.index_select(index, 1)?.reshape((bt * rows, k))
}

/// How to tile `b` images of `rows` im2col rows of `k` codes: `(images, rows)` a tile, so that a
/// tile holds at most [`TILE_CODES`] codes (or one row, if a row alone is larger).
pub(crate) fn tiling(b: usize, rows: usize, k: usize) -> (usize, usize) {
    let image = rows * k.max(1);
    if image <= TILE_CODES {
        ((TILE_CODES / image.max(1)).clamp(1, b.max(1)), rows)
    } else {
        (1, (TILE_CODES / k.max(1)).clamp(1, rows.max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_stay_within_budget() {
        for (b, rows, k) in [(500, 1024, 27), (1, 1 << 20, 576), (3, 1, TILE_CODES * 2), (7, 5, 9)] {
            let (bi, r) = tiling(b, rows, k);
            assert!(bi >= 1 && r >= 1 && bi <= b && r <= rows);
            assert!(bi * r * k <= TILE_CODES.max(k), "({b}, {rows}, {k}) -> ({bi}, {r})");
            assert!(bi == 1 || r == rows, "a multi-image tile takes whole images");
        }
        assert_eq!(tiling(500, 1024, 27), (37, 1024));
        assert_eq!(tiling(2, 2809, 400), (1, 2621)); // 53x53 output, 16 channels, 5x5
    }

    #[test]
    fn index_points_at_the_zero_code_in_the_padding() -> Result<()> {
        // 1 channel 2x2, 3x3 kernel, padding 1, stride 1: 4 output pixels of 9 columns.
        let g = Geometry {
            c: 1,
            h: 2,
            w: 2,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        };
        let idx: Vec<u32> = g.index(&Device::Cpu)?.to_vec1()?;
        #[rustfmt::skip]
        let want: Vec<u32> = vec![
            4, 4, 4, 4, 0, 1, 4, 2, 3,
            4, 4, 4, 0, 1, 4, 2, 3, 4,
            4, 0, 1, 4, 2, 3, 4, 4, 4,
            0, 1, 4, 2, 3, 4, 4, 4, 4,
        ];
        assert_eq!(idx, want);
        Ok(())
    }
}
