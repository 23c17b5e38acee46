//! Hugging Face transformers' BitNet layout (`transformers/integrations/bitnet.py`).
//!
//! A weight `(N, K)` is stored as `uint8 (ceil(N/4), K)`: **four output rows a byte, in strided
//! blocks**. With `R = ceil(N/4)`, output row `n = i·R + r` lives in byte row `r`, bits
//! `2i..2i+1` (`i` = 0..3), as the code `w + 1` (`-1 → 0`, `0 → 1`, `+1 → 2`). Positions past
//! `N` (when `N` is not a multiple of 4) hold code 0, as transformers' `pack_weights` leaves them;
//! this reader accepts 0 or 1 there and rejects code 3 anywhere.
//!
//! The scale is the `weight_scale` tensor, `(1,)`, whose meaning depends on the class that reads
//! it ([`ScaleConvention`]): transformers' packed `BitLinear` divides its output by it
//! (`y = acc / (x_scale · weight_scale)`, so `weight_scale = 1 / s_w`), `AutoBitLinear` (offline
//! mode, unpacked ternary weights) multiplies (`weight_scale = s_w`).
//!
//! ```
//! use bitlinear::interop::hf_bitnet::{pack_hf, unpack_hf};
//! // N = 5 rows of K = 1: R = 2 byte rows; rows 0,1 in bits 0-1, rows 2,3 in bits 2-3, row 4 in bits 4-5.
//! let bytes = pack_hf(&[1, -1, 0, 1, -1], 5, 1)?;
//! assert_eq!(bytes, vec![0b00_00_01_10, 0b00_00_10_00]);
//! assert_eq!(unpack_hf(&bytes, 5, 1)?, vec![1, -1, 0, 1, -1]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, Device, Result};

use crate::packed::PackedTernary;

/// How transformers applies `weight_scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleConvention {
    /// `transformers.integrations.bitnet.BitLinear` (packed uint8 weights, the layout of
    /// `microsoft/bitnet-b1.58-2B-4T`): the output is divided by `weight_scale`, which is `1 / s_w`.
    Divide,
    /// `AutoBitLinear` in offline mode (unpacked ternary float weights): the output is multiplied
    /// by `weight_scale`, which is `s_w`.
    Multiply,
}

/// Byte rows of the transformers layout for `n` output features: `ceil(n / 4)`.
pub const fn hf_rows(n: usize) -> usize {
    n.div_ceil(4)
}

/// Packs ternary values `(n, k)` row-major into transformers' `(ceil(n/4), k)` bytes, exactly
/// as `pack_weights` does (padding positions hold code 0).
pub fn pack_hf(values: &[i8], n: usize, k: usize) -> Result<Vec<u8>> {
    if values.len() != n * k {
        bail!("pack_hf: {} values for a ({n}, {k}) matrix", values.len())
    }
    let rows = hf_rows(n);
    let mut out = vec![0u8; rows * k];
    for (row, vals) in values.chunks_exact(k.max(1)).take(n).enumerate() {
        let (i, r) = (row / rows, row % rows);
        for (col, &w) in vals.iter().enumerate() {
            if !(-1..=1).contains(&w) {
                bail!("pack_hf: value {w} at ({row}, {col}) is not ternary")
            }
            out[r * k + col] |= ((w + 1) as u8) << (2 * i);
        }
    }
    Ok(out)
}

/// Unpacks transformers' `(ceil(n/4), k)` bytes into `n · k` ternary values. Code 3 anywhere, or
/// a code other than 0 or 1 in a padding position, is an error.
pub fn unpack_hf(bytes: &[u8], n: usize, k: usize) -> Result<Vec<i8>> {
    let rows = hf_rows(n);
    if bytes.len() != rows * k {
        bail!(
            "unpack_hf: {} bytes for {n} output rows of {k}: expected ({rows}, {k}) = {} bytes",
            bytes.len(),
            rows * k
        )
    }
    let mut out = vec![0i8; n * k];
    for (idx, &b) in bytes.iter().enumerate() {
        let (r, col) = (idx / k, idx % k);
        for i in 0..4 {
            let code = (b >> (2 * i)) & 3;
            let row = i * rows + r;
            if code == 3 {
                bail!("invalid ternary code 3 in byte ({r}, {col}) = {b:#04x}")
            }
            if row < n {
                out[row * k + col] = code as i8 - 1;
            } else if code > 1 {
                bail!("padding position (row {row} >= N = {n}) holds code {code} in byte ({r}, {col})")
            }
        }
    }
    Ok(out)
}

/// The `weight_scale` value for our scale `s_w` under `convention`.
///
/// For [`ScaleConvention::Divide`] this is an f32 `r` near `1 / s_w`; among the nearest
/// candidates it picks one with `1 / r == s_w` exactly in f32 when one exists, so that
/// [`scale_from_hf`] gives `s_w` back bit for bit. (For some `s_w` no f32 has that property; the
/// nearest reciprocal is then used, one f32 rounding away.)
pub fn scale_to_hf(s_w: f32, convention: ScaleConvention) -> f32 {
    match convention {
        ScaleConvention::Multiply => s_w,
        ScaleConvention::Divide => {
            let r = 1.0 / s_w;
            let bits = r.to_bits();
            [0i32, -1, 1, -2, 2]
                .iter()
                .map(|d| f32::from_bits(bits.wrapping_add_signed(*d)))
                .find(|c| 1.0 / c == s_w)
                .unwrap_or(r)
        }
    }
}

/// Our scale `s_w` from a `weight_scale` value under `convention`. The result must be finite and
/// positive.
pub fn scale_from_hf(weight_scale: f32, convention: ScaleConvention) -> Result<f32> {
    let s = match convention {
        ScaleConvention::Multiply => weight_scale,
        ScaleConvention::Divide => 1.0 / weight_scale,
    };
    if !(s.is_finite() && s > 0.0) {
        bail!("weight_scale {weight_scale} ({convention:?} convention) gives the weight scale {s}; it must be finite and positive")
    }
    Ok(s)
}

/// Our packed weight in transformers' layout: the `(ceil(N/4), K)` bytes and the `weight_scale`
/// value under `convention`.
pub fn to_hf(weight: &PackedTernary, convention: ScaleConvention) -> Result<(Vec<u8>, f32)> {
    let bytes = pack_hf(&weight.unpack()?, weight.out_features(), weight.in_features())?;
    Ok((bytes, scale_to_hf(weight.scale(), convention)))
}

/// A transformers packed weight (`(ceil(n/4), k)` bytes of `n` output features) and its
/// `weight_scale` as a [`PackedTernary`] on `device`.
pub fn from_hf(
    bytes: &[u8],
    n: usize,
    k: usize,
    weight_scale: f32,
    convention: ScaleConvention,
    device: &Device,
) -> Result<PackedTernary> {
    let values = unpack_hf(bytes, n, k)?;
    super::packed_from_values(&values, n, k, scale_from_hf(weight_scale, convention)?, device)
}

/// Ternary values stored as floats (an `AutoBitLinear` weight in offline mode) as `i8`; any value
/// other than exactly -1, 0 or 1 is an error.
pub fn ternary_from_floats(values: &[f32]) -> Result<Vec<i8>> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| match v {
            -1.0 => Ok(-1),
            0.0 => Ok(0),
            1.0 => Ok(1),
            _ => bail!("value {v} at flat index {i} is not ternary (-1, 0 or 1)"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interop::test_util::{random_scale, random_ternary, SIZES};

    #[test]
    fn round_trips_every_awkward_size() {
        for (seed, &(n, k)) in SIZES.iter().enumerate() {
            let v = random_ternary(n * k, seed as u64);
            let s = random_scale(seed as u64);
            let p = crate::interop::packed_from_values(&v, n, k, s, &Device::Cpu).unwrap();
            for conv in [ScaleConvention::Divide, ScaleConvention::Multiply] {
                let (bytes, ws) = to_hf(&p, conv).unwrap();
                assert_eq!(bytes.len(), hf_rows(n) * k);
                let q = from_hf(&bytes, n, k, ws, conv, &Device::Cpu).unwrap();
                assert_eq!(q.unpack().unwrap(), v, "({n}, {k})");
                // Multiply stores s_w itself; Divide is exact whenever an exact reciprocal exists.
                if conv == ScaleConvention::Multiply || 1.0 / ws == s {
                    assert_eq!(q.scale().to_bits(), s.to_bits(), "({n}, {k}) {conv:?}");
                } else {
                    assert_eq!(q.scale(), 1.0 / ws);
                }
                assert_eq!(q.bytes().to_vec2::<u8>().unwrap(), p.bytes().to_vec2::<u8>().unwrap());
            }
        }
    }

    #[test]
    fn strided_bit_order_by_hand() {
        // N = 8, K = 1: R = 2; row n sits in byte n % 2 at bits 2 * (n / 2).
        let v = [1, 0, -1, 1, 0, 0, 1, -1];
        let b = pack_hf(&v, 8, 1).unwrap();
        assert_eq!(b, vec![0b10_01_00_10, 0b00_01_10_01]);
    }

    #[test]
    fn rejects_bad_codes_and_sizes() {
        assert!(unpack_hf(&[0b11], 1, 1).unwrap_err().to_string().contains("code 3"));
        // N = 1: bits 2-3 are padding; code 2 there is not written by any packer.
        assert!(unpack_hf(&[0b10_01], 1, 1).unwrap_err().to_string().contains("padding"));
        assert_eq!(unpack_hf(&[0b01_01], 1, 1).unwrap(), vec![0]);
        assert!(unpack_hf(&[0; 3], 5, 1).is_err());
        assert!(pack_hf(&[2], 1, 1).is_err());
        assert!(scale_from_hf(0.0, ScaleConvention::Multiply).is_err());
        assert!(scale_from_hf(f32::INFINITY, ScaleConvention::Divide).is_err());
        assert!(ternary_from_floats(&[1.0, 0.5]).is_err());
        assert_eq!(ternary_from_floats(&[1.0, -0.0, -1.0]).unwrap(), vec![1, 0, -1]);
    }

    #[test]
    fn reciprocal_scale_is_exact_when_possible() {
        let mut exact = 0;
        for seed in 0..2000 {
            let s = random_scale(seed);
            let r = scale_to_hf(s, ScaleConvention::Divide);
            assert!((r * s - 1.0).abs() < 1e-6);
            exact += usize::from(scale_from_hf(r, ScaleConvention::Divide).unwrap() == s);
        }
        // Most f32 scales have an exact reciprocal partner; the rest are one rounding away.
        assert!(exact > 1500, "{exact}");
        // 1.9900001 has none: every f32 r near 1/s gives 1/r != s.
        let s = f32::from_bits(0x3ffe_b853);
        let r = scale_to_hf(s, ScaleConvention::Divide);
        assert_eq!(r, 1.0 / s);
        assert_ne!(scale_from_hf(r, ScaleConvention::Divide).unwrap(), s);
    }
}
