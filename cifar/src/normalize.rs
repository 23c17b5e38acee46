//! Per-channel normalisation of CIFAR-10 bytes into network inputs: `(v / 255 - mean[c]) / std[c]`
//! (torchvision's `ToTensor` then `Normalize(mean, std)`), with the reference constants of the
//! CIFAR-10 recipes.

use crate::reader::{Split, IMAGE_BYTES};

const PLANE: usize = 32 * 32;

/// Per-channel normalisation constants (red, green, blue).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalizer {
    /// Channel means of the training images, in `[0, 1]` units.
    pub mean: [f32; 3],
    /// Channel standard deviations, in `[0, 1]` units.
    pub std: [f32; 3],
}

impl Default for Normalizer {
    /// The CIFAR-10 reference constants.
    fn default() -> Self {
        Self {
            mean: [0.4914, 0.4822, 0.4465],
            std: [0.2023, 0.1994, 0.2010],
        }
    }
}

impl Normalizer {
    /// `scale[c] = 1 / (255 std[c])`, `shift[c] = mean[c] / std[c]`: a byte `v` of channel `c`
    /// maps to `v * scale[c] - shift[c]`, in f32 with two roundings. Every implementation (the
    /// lookup table, tensor ops, a GPU kernel) computes exactly this, so they agree bit for bit.
    pub fn affine(&self) -> ([f32; 3], [f32; 3]) {
        let scale = std::array::from_fn(|c| 1.0 / (255.0 * self.std[c]));
        let shift = std::array::from_fn(|c| self.mean[c] / self.std[c]);
        (scale, shift)
    }

    /// The mapping of every byte value, per channel.
    pub fn lut(&self) -> Lut {
        let (scale, shift) = self.affine();
        Lut(std::array::from_fn(|c| {
            std::array::from_fn(|v| v as f32 * scale[c] - shift[c])
        }))
    }
}

/// Byte value -> normalised f32, per channel: `lut.0[c][v]`.
#[derive(Debug, Clone)]
pub struct Lut(pub [[f32; 256]; 3]);

impl Lut {
    /// Maps bytes to themselves (`v as f32`): for tests and raw-pixel views.
    pub fn identity() -> Self {
        Lut([std::array::from_fn(|v| v as f32); 3])
    }

    /// Maps one 3x32x32 byte image into `out` (3072 f32, CHW).
    ///
    /// # Panics
    /// If `image` or `out` does not hold [`IMAGE_BYTES`] values.
    pub fn apply(&self, image: &[u8], out: &mut [f32]) {
        assert_eq!(image.len(), IMAGE_BYTES, "a CIFAR-10 image has {IMAGE_BYTES} bytes");
        assert_eq!(out.len(), IMAGE_BYTES, "a CIFAR-10 image has {IMAGE_BYTES} values");
        for (c, (src, dst)) in image.chunks_exact(PLANE).zip(out.chunks_exact_mut(PLANE)).enumerate() {
            for (v, o) in src.iter().zip(dst) {
                *o = self.0[c][*v as usize];
            }
        }
    }
}

/// The images `indices` of `split`, normalised by `lut`, as a (B, 3, 32, 32) f32 buffer: the
/// network's input for evaluation (no augmentation).
pub fn normalize_batch(split: &Split, indices: &[usize], lut: &Lut) -> Vec<f32> {
    let mut out = vec![0f32; indices.len() * IMAGE_BYTES];
    for (o, &i) in out.chunks_exact_mut(IMAGE_BYTES).zip(indices) {
        lut.apply(split.image(i), o);
    }
    out
}
