//! Conversions between [`PackedTernary`] and the other formats that hold
//! 1.58-bit weights, one module per format, plus the GGUF container that two of them live in.
//!
//! | format | module | into `PackedTernary` | out of it |
//! | --- | --- | --- | --- |
//! | Hugging Face transformers BitNet (`uint8 (ceil(N/4), K)` + `weight_scale`) | [`hf_bitnet`] | yes, exact | yes, exact |
//! | llama.cpp GGUF `TQ2_0` (256-weight blocks, 2 bits + f16 scale) | [`tq2_0`] | when every block's scale is one tensor scale | yes |
//! | llama.cpp GGUF `TQ1_0` (256-weight blocks, base-3 packed + f16 scale) | [`tq1_0`] | same rule as `TQ2_0` | yes |
//! | bitnet.cpp GGUF `I2_S` | none | not implemented | not implemented |
//!
//! Every codec works on the ternary values and one f32 scale per tensor, which is what
//! `PackedTernary` holds; the bytes round-trip bit for bit. Where a format stores the scale with
//! less precision (`TQ2_0`/`TQ1_0` store f16) or as its reciprocal (transformers' `BitLinear`),
//! the codec says how the exact f32 scale is kept (see each module).
//!
//! `I2_S` (bitnet.cpp) is not supported: its byte order depends on the kernel build
//! (x86 and ARM layouts differ) and it is read by no published Python package we could test
//! against.

pub mod gguf;
pub mod hf_bitnet;
pub mod tq1_0;
pub mod tq2_0;

use candle_core::{bail, Device, Result, Tensor};

use crate::packed::{pack_ternary, packed_len, PackedTernary};

/// Builds a `PackedTernary` from ternary values `(n, k)` row-major and a scale.
pub(crate) fn packed_from_values(
    values: &[i8],
    n: usize,
    k: usize,
    scale: f32,
    device: &Device,
) -> Result<PackedTernary> {
    let bytes = pack_ternary(values, n, k)?;
    let bytes = Tensor::from_vec(bytes, (n, packed_len(k)), device)?;
    PackedTernary::from_parts(bytes, scale, k)
}

/// The f16 bits of a tensor scale for the GGUF block formats: finite and positive after
/// rounding, otherwise an error (an f16 cannot hold scales above 65504 or below about 6e-8).
pub(crate) fn f16_scale(scale: f32, format: &str) -> Result<u16> {
    let h = half::f16::from_f32(scale);
    if !(h.is_finite() && h.to_f32() > 0.0) {
        bail!("{format}: the scale {scale} does not fit an f16 (it rounds to {h})")
    }
    Ok(h.to_bits())
}

/// The one tensor scale of a block format, from the f16 scale of every block and whether the
/// block holds a non-zero weight. Blocks of zeros may carry any scale (ggml's quantizer writes
/// their absmax, 0); every other block must carry the same positive f16. `exact` is the f32 scale
/// recorded next to the data (our GGUF metadata); it is used when it rounds to that f16 (or, when
/// every weight is zero, when it fits an f16), and is an error otherwise.
pub(crate) fn block_scale(scales: &[(u16, bool)], exact: Option<f32>, format: &str) -> Result<f32> {
    let mut common: Option<(usize, u16)> = None;
    for (i, &(d, nonzero)) in scales.iter().enumerate() {
        if !nonzero {
            continue;
        }
        let v = half::f16::from_bits(d).to_f32();
        if !(v.is_finite() && v > 0.0) {
            bail!("{format}: block {i} holds non-zero weights with scale {v}; a scale must be finite and positive")
        }
        match common {
            None => common = Some((i, d)),
            Some((j, c)) if c != d => bail!(
                "{format}: block {i} has scale {v} but block {j} has {}; a PackedTernary holds one scale per tensor, \
                 so only files whose blocks share one scale can be imported",
                half::f16::from_bits(c).to_f32()
            ),
            Some(_) => {}
        }
    }
    match (common, exact) {
        (Some((_, d)), Some(e)) => {
            if half::f16::from_f32(e).to_bits() != d {
                bail!(
                    "{format}: the recorded exact scale {e} does not round to the blocks' scale {}",
                    half::f16::from_bits(d).to_f32()
                )
            }
            Ok(e)
        }
        (Some((_, d)), None) => Ok(half::f16::from_bits(d).to_f32()),
        // All weights zero: the scale changes no output; keep the recorded one, else 1. A recorded
        // scale no block could carry is an error, as it is beside non-zero blocks: the weight
        // could not be written back (found by the `ternary_codecs` fuzz target).
        (None, Some(e)) => match f16_scale(e, format) {
            Ok(_) => Ok(e),
            Err(_) => bail!("{format}: the recorded exact scale {e} does not fit an f16 block scale"),
        },
        (None, None) => Ok(1.0),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use rand::{Rng, SeedableRng};

    /// Random ternary values, about a third of each, from a seeded generator.
    pub fn random_ternary(len: usize, seed: u64) -> Vec<i8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen_range(-1i8..=1)).collect()
    }

    /// A random positive scale spread over several binades.
    pub fn random_scale(seed: u64) -> f32 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5ca1e);
        rng.gen_range(0.001f32..4.0)
    }

    /// Sizes that are and are not multiples of 4 and 256.
    pub const SIZES: [(usize, usize); 9] = [
        (1, 1),
        (3, 5),
        (4, 4),
        (5, 255),
        (7, 256),
        (8, 257),
        (13, 300),
        (2, 513),
        (0, 7),
    ];
}
