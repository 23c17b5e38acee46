//! Data augmentation: random crop 32 from the 4-pixel zero-padded image, then a random horizontal
//! flip, then the per-channel normalisation of [`cifar::Normalizer`] (the pipeline
//! `RandomCrop(32, padding=4)`, `RandomHorizontalFlip`, `ToTensor`, `Normalize` of torchvision);
//! or, with [`Edge::Reflect`], the crop from the reflect-padded image.
//!
//! The random choices ([`AugParams`]) are drawn on the host from the epoch's seeded RNG, so both
//! implementations give the same batch bit for bit:
//! - [`augment_batch_cpu`]: byte images -> f32, samples spread over all cores with rayon;
//! - [`augment_batch_tensor`]: the same with tensor ops (index_select, pad, gather, affine) on
//!   the images' device, for training on a GPU where the images live in device memory.

use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use rayon::prelude::*;

use cifar::{Lut, Normalizer, Split, IMAGE_BYTES};

/// Zero padding on each side before the random crop.
pub const PAD: usize = 4;
const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;

/// How the training images' horizontal flips are drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flip {
    /// Each image mirrored with probability 1/2, drawn anew every epoch.
    #[default]
    Random,
    /// Each image's flip drawn once for the run (epoch 0), the opposite one in every odd epoch:
    /// any two consecutive epochs show every image both ways (the speed-run nets' alternating
    /// flip).
    Alternating,
}

impl Flip {
    /// The name `--flip` takes.
    pub fn name(self) -> &'static str {
        match self {
            Flip::Random => "random",
            Flip::Alternating => "alternating",
        }
    }
}

/// Sets the flips of one epoch's draws for [`Flip::Alternating`]: `params[j]` augments image
/// `order[j]`, whose epoch-0 flip is `first[order[j]]`.
pub fn alternate_flips(params: &mut [AugParams], order: &[usize], first: &[bool], epoch: usize) {
    let odd = epoch % 2 == 1;
    for (p, &i) in params.iter_mut().zip(order) {
        p.flip = first[i] ^ odd;
    }
}

/// What a translation brings in at the image's edges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Edge {
    /// Black pixels (byte 0), as torchvision's `RandomCrop(32, padding=4)`.
    #[default]
    Zeros,
    /// The image mirrored at its border, the border pixel not repeated (PyTorch's `reflect`
    /// padding: column -1 is column 1, column 32 is column 30), as the speed-run nets translate.
    Reflect,
}

impl Edge {
    /// The name `--edge` takes.
    pub fn name(self) -> &'static str {
        match self {
            Edge::Zeros => "zeros",
            Edge::Reflect => "reflect",
        }
    }
}

/// The random choices for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AugParams {
    /// Row of the crop's top-left corner in the padded (40x40) image, 0..=8.
    pub dy: u8,
    /// Column of the crop's top-left corner in the padded image, 0..=8.
    pub dx: u8,
    /// Mirror the crop left-right.
    pub flip: bool,
    /// What comes in at the edges where the crop leaves the image.
    pub edge: Edge,
}

impl AugParams {
    /// No augmentation: the centre crop (the original image), not flipped.
    pub const IDENTITY: AugParams = AugParams {
        dy: PAD as u8,
        dx: PAD as u8,
        flip: false,
        edge: Edge::Zeros,
    };

    /// Draws a crop offset uniformly in 0..=8 on each axis and a flip with probability 1/2.
    pub fn sample<R: Rng>(rng: &mut R) -> Self {
        Self::sample_within(rng, PAD)
    }

    /// Draws a translation uniformly in `-translate..=translate` pixels on each axis (a crop
    /// offset `PAD ± translate`; `translate` is capped at [`PAD`]) and a flip with probability
    /// 1/2, with zeros at the edges. With `translate = PAD` it draws exactly what
    /// [`AugParams::sample`] does.
    pub fn sample_within<R: Rng>(rng: &mut R, translate: usize) -> Self {
        let t = translate.min(PAD) as u8;
        let lo = PAD as u8 - t;
        let dy = lo + rng.gen_range(0..=2 * t);
        let dx = lo + rng.gen_range(0..=2 * t);
        let flip = rng.gen_bool(0.5);
        AugParams {
            dy,
            dx,
            flip,
            edge: Edge::Zeros,
        }
    }

    /// The test-time views and their weights, as the speed-run nets (airbench's `tta_level=2`)
    /// average them: the image and its mirror (1/4 each), and both shifted by one pixel towards
    /// the top-left and towards the bottom-right over the reflect-padded image (1/8 each),
    /// whatever edges the training used. The weights sum to 1.
    pub fn test_time_views() -> [(AugParams, f64); 6] {
        let p = PAD as u8;
        let view = |d: u8, flip: bool| AugParams {
            dy: d,
            dx: d,
            flip,
            edge: Edge::Reflect,
        };
        [
            (view(p, false), 0.25),
            (view(p, true), 0.25),
            (view(p - 1, false), 0.125),
            (view(p - 1, true), 0.125),
            (view(p + 1, false), 0.125),
            (view(p + 1, true), 0.125),
        ]
    }

    /// An index into the image's rows or columns (may be out of range: zeros), with
    /// [`Edge::Reflect`] folded back into it.
    fn fold(self, i: isize) -> isize {
        let last = SIDE as isize - 1;
        match self.edge {
            Edge::Zeros => i,
            Edge::Reflect if i < 0 => -i,
            Edge::Reflect if i > last => 2 * last - i,
            Edge::Reflect => i,
        }
    }

    /// The source column (in the unpadded image, may be out of range) of output column `x`.
    fn src_col(self, x: usize) -> isize {
        let xc = if self.flip { SIDE - 1 - x } else { x };
        self.fold(xc as isize + self.dx as isize - PAD as isize)
    }

    fn src_row(self, y: usize) -> isize {
        self.fold(y as isize + self.dy as isize - PAD as isize)
    }
}

/// Augments one 3x32x32 byte image into `out` (3072 f32, CHW): out-of-image pixels are byte 0
/// (with [`Edge::Zeros`]; [`Edge::Reflect`] leaves none).
pub fn augment_into(src: &[u8], p: AugParams, lut: &Lut, out: &mut [f32]) {
    debug_assert_eq!(src.len(), IMAGE_BYTES);
    debug_assert_eq!(out.len(), IMAGE_BYTES);
    for c in 0..3 {
        let plane = &src[c * PLANE..(c + 1) * PLANE];
        let lut_c = &lut.0[c];
        let zero = lut_c[0];
        for y in 0..SIDE {
            let row_out = &mut out[c * PLANE + y * SIDE..c * PLANE + (y + 1) * SIDE];
            let sy = p.src_row(y);
            if !(0..SIDE as isize).contains(&sy) {
                row_out.fill(zero);
                continue;
            }
            let row_in = &plane[sy as usize * SIDE..(sy as usize + 1) * SIDE];
            for (x, o) in row_out.iter_mut().enumerate() {
                let sx = p.src_col(x);
                *o = if (0..SIDE as isize).contains(&sx) {
                    lut_c[row_in[sx as usize] as usize]
                } else {
                    zero
                };
            }
        }
    }
}

/// Augments the images `indices` of `split` with `params` into a (B, 3, 32, 32) f32 buffer,
/// spreading the images over rayon's threads.
pub fn augment_batch_cpu(split: &Split, indices: &[usize], params: &[AugParams], lut: &Lut) -> Vec<f32> {
    assert_eq!(indices.len(), params.len());
    let mut out = vec![0f32; indices.len() * IMAGE_BYTES];
    out.par_chunks_mut(IMAGE_BYTES)
        .zip(indices.par_iter().zip(params.par_iter()))
        .for_each(|(o, (&i, &p))| augment_into(split.image(i), p, lut, o));
    out
}

/// The same as [`augment_batch_cpu`] with tensor ops on `images`' device.
///
/// `images`: (N, 3, 32, 32) u8 (or any dtype holding byte values); `indices`: which images.
/// Returns (B, 3, 32, 32) f32.
pub fn augment_batch_tensor(
    images: &Tensor,
    indices: &[usize],
    params: &[AugParams],
    norm: &Normalizer,
) -> Result<Tensor> {
    assert_eq!(indices.len(), params.len());
    let dev = images.device();
    let b = indices.len();
    let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(idx, b, dev)?;
    let padded_side = SIDE + 2 * PAD;
    let x = images
        .index_select(&idx, 0)?
        .to_dtype(DType::F32)?
        .pad_with_zeros(2, PAD, PAD)?
        .pad_with_zeros(3, PAD, PAD)?; // (B, 3, 40, 40)
    let mut rows = Vec::with_capacity(b * SIDE);
    let mut cols = Vec::with_capacity(b * SIDE);
    for p in params {
        rows.extend((0..SIDE).map(|y| (p.src_row(y) + PAD as isize) as u32));
        cols.extend((0..SIDE).map(|x| (p.src_col(x) + PAD as isize) as u32));
    }
    let rows = Tensor::from_vec(rows, (b, 1, SIDE, 1), dev)?
        .broadcast_as((b, 3, SIDE, padded_side))?
        .contiguous()?;
    let cols = Tensor::from_vec(cols, (b, 1, 1, SIDE), dev)?
        .broadcast_as((b, 3, SIDE, SIDE))?
        .contiguous()?;
    let x = x.gather(&rows, 2)?.gather(&cols, 3)?; // (B, 3, 32, 32)
    let (scale, shift) = norm.affine();
    let scale = Tensor::from_vec(scale.to_vec(), (1, 3, 1, 1), dev)?;
    let shift = Tensor::from_vec(shift.to_vec(), (1, 3, 1, 1), dev)?;
    x.broadcast_mul(&scale)?.broadcast_sub(&shift)
}

/// Uploads a split's images as a (N, 3, 32, 32) u8 tensor.
pub fn images_tensor(split: &Split, device: &Device) -> Result<Tensor> {
    Tensor::from_slice(&split.images, (split.len(), 3, SIDE, SIDE), device)
}
