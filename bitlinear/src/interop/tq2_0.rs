//! llama.cpp's GGUF `TQ2_0` (ggml type 35): ternary weights in blocks of 256 along a row.
//!
//! A block is 66 bytes: `qs[64]` then the f16 scale `d`. Weight `e` (0..255) of the block is the
//! 2-bit code `w + 1` in byte `32·(e / 128) + e % 32` at bits `2·((e % 128) / 32)`; its value is
//! `(code - 1) · d` (ggml's `dequantize_row_tq2_0`). A row of `K` weights takes `ceil(K/256)`
//! blocks: GGUF requires whole blocks, so a `K` that is not a multiple of 256 is padded with
//! zero weights, and the logical `K` must be kept beside the tensor (our GGUF files record it).
//!
//! Directions: [`encode`] writes every block's `d` as the f16 of our scale `s_w` (an error when
//! it does not fit an f16). [`decode`] accepts files whose non-zero blocks all carry one
//! positive scale (all-zero blocks may carry any, e.g. the 0 ggml's quantizer gives them);
//! otherwise it fails and says which blocks differ, since `PackedTernary` has one scale per
//! tensor. The f16 loses precision: pass the exact f32 scale (our GGUF metadata) to get `s_w`
//! back bit for bit.

use candle_core::{bail, Device, Result};

use crate::packed::PackedTernary;

/// Weights per block.
pub const BLOCK: usize = 256;
/// Bytes per block: 64 code bytes and an f16 scale.
pub const BLOCK_BYTES: usize = 66;

/// The byte and bit shift of weight `e` (0..256) of a block.
fn position(e: usize) -> (usize, usize) {
    (32 * (e / 128) + e % 32, 2 * ((e % 128) / 32))
}

/// Encodes the weight as `TQ2_0` rows of `ceil(K/256)` blocks (`N · ceil(K/256) · 66` bytes).
pub fn encode(weight: &PackedTernary) -> Result<Vec<u8>> {
    let (n, k) = (weight.out_features(), weight.in_features());
    let d = super::f16_scale(weight.scale(), "TQ2_0")?.to_le_bytes();
    let values = weight.unpack()?;
    let blocks = k.div_ceil(BLOCK);
    let mut out = Vec::with_capacity(n * blocks * BLOCK_BYTES);
    for row in values.chunks_exact(k.max(1)).take(n) {
        for chunk in row.chunks(BLOCK) {
            let mut qs = [0x55u8; 64]; // code 1 everywhere: zero weights, also in the padding
            for (e, &w) in chunk.iter().enumerate() {
                let (byte, shift) = position(e);
                qs[byte] = (qs[byte] & !(3 << shift)) | (((w + 1) as u8) << shift);
            }
            out.extend_from_slice(&qs);
            out.extend_from_slice(&d);
        }
    }
    Ok(out)
}

/// Decodes `n` rows of `k_stored` (a multiple of 256) weights of `TQ2_0` data, keeping the first
/// `k` of each row (the padding beyond must be zero weights), into a [`PackedTernary`] on
/// `device`. `exact_scale` is the f32 scale recorded beside the data, if any (see the module
/// docs for the scale rule).
pub fn decode(
    data: &[u8],
    n: usize,
    k_stored: usize,
    k: usize,
    exact_scale: Option<f32>,
    device: &Device,
) -> Result<PackedTernary> {
    let (values, scales) = decode_blocks(data, n, k_stored, k, "TQ2_0", BLOCK_BYTES, |b, vals| {
        for (e, v) in vals.iter_mut().enumerate() {
            let (byte, shift) = position(e);
            *v = (b[byte] >> shift) & 3;
        }
        u16::from_le_bytes([b[64], b[65]])
    })?;
    let scale = super::block_scale(&scales, exact_scale, "TQ2_0")?;
    super::packed_from_values(&values, n, k, scale, device)
}

/// Each block's f16 scale bits and whether it holds a non-zero weight.
pub(crate) type BlockScales = Vec<(u16, bool)>;

/// The shared block walk of the block formats: checks sizes, decodes each block's 256 codes
/// (`w + 1`, in 0..=2, else an error) with `block`, which returns the f16 scale bits, and keeps
/// the first `k` of each row. Returns the values and each block's `(scale, has a non-zero)`.
pub(crate) fn decode_blocks(
    data: &[u8],
    n: usize,
    k_stored: usize,
    k: usize,
    format: &str,
    block_bytes: usize,
    block: impl Fn(&[u8], &mut [u8; BLOCK]) -> u16,
) -> Result<(Vec<i8>, BlockScales)> {
    if k.checked_next_multiple_of(BLOCK) != Some(k_stored) {
        bail!("{format}: a row of {k_stored} stored weights does not hold {k} weights: rows are {k} weights padded to whole blocks of {BLOCK}")
    }
    let blocks = k_stored / BLOCK;
    let expected = n.checked_mul(blocks).and_then(|b| b.checked_mul(block_bytes));
    if expected != Some(data.len()) {
        bail!(
            "{format}: {} bytes of data for ({n}, {k_stored}) weights, expected {expected:?}",
            data.len()
        )
    }
    let mut values = Vec::with_capacity(n * k);
    let mut scales = Vec::with_capacity(n * blocks);
    let mut codes = [0u8; BLOCK];
    for (i, b) in data.chunks_exact(block_bytes).enumerate() {
        let (row, col0) = (i / blocks, (i % blocks) * BLOCK);
        let d = block(b, &mut codes);
        let mut nonzero = false;
        for (e, &c) in codes.iter().enumerate() {
            if c > 2 {
                bail!("{format}: invalid ternary code {c} in row {row}, column {}", col0 + e)
            }
            nonzero |= c != 1;
            if col0 + e < k {
                values.push(c as i8 - 1);
            } else if c != 1 {
                bail!(
                    "{format}: row {row} has a non-zero weight at padding column {} (K = {k})",
                    col0 + e
                )
            }
        }
        scales.push((d, nonzero));
    }
    Ok((values, scales))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interop::packed_from_values;
    use crate::interop::test_util::{random_scale, random_ternary, SIZES};

    #[test]
    fn round_trips_every_awkward_size() {
        for (seed, &(n, k)) in SIZES.iter().enumerate() {
            let v = random_ternary(n * k, 100 + seed as u64);
            let s = random_scale(seed as u64);
            let p = packed_from_values(&v, n, k, s, &Device::Cpu).unwrap();
            let data = encode(&p).unwrap();
            let ks = k.div_ceil(BLOCK) * BLOCK;
            assert_eq!(data.len(), n * ks / BLOCK * BLOCK_BYTES);
            let q = decode(&data, n, ks, k, Some(s), &Device::Cpu).unwrap();
            assert_eq!(q.unpack().unwrap(), v, "({n}, {k})");
            assert_eq!(q.scale().to_bits(), s.to_bits());
            assert_eq!(encode(&q).unwrap(), data);
            // Without the exact scale: its f16 rounding (when a weight is non-zero).
            let q = decode(&data, n, ks, k, None, &Device::Cpu).unwrap();
            if v.iter().any(|&x| x != 0) {
                assert_eq!(q.scale(), half::f16::from_f32(s).to_f32());
            }
        }
    }

    #[test]
    fn matches_ggml_dequantize_by_hand() {
        // Weight e = 0 -> byte 0 bits 0-1; e = 32 -> byte 0 bits 2-3; e = 128 -> byte 32 bits 0-1;
        // e = 255 -> byte 63 bits 6-7.
        let mut v = vec![0i8; 256];
        (v[0], v[32], v[128], v[255]) = (1, -1, 1, -1);
        let p = packed_from_values(&v, 1, 256, 0.5, &Device::Cpu).unwrap();
        let data = encode(&p).unwrap();
        assert_eq!(data[0], 0b01_01_00_10);
        assert_eq!(data[32], 0b01_01_01_10);
        assert_eq!(data[63], 0b00_01_01_01);
        assert_eq!(&data[64..], &half::f16::from_f32(0.5).to_le_bytes());
    }

    #[test]
    fn scale_rules() {
        let v: Vec<i8> = (0..512).map(|i| if i < 256 { 0 } else { 1 }).collect();
        let p = packed_from_values(&v, 1, 512, 0.25, &Device::Cpu).unwrap();
        let mut data = encode(&p).unwrap();
        // An all-zero block with scale 0 (as ggml writes it) is accepted.
        data[64..66].copy_from_slice(&[0, 0]);
        assert_eq!(decode(&data, 1, 512, 512, None, &Device::Cpu).unwrap().scale(), 0.25);
        // Two non-zero blocks with different scales are not.
        let p2 = packed_from_values(&vec![1i8; 512], 1, 512, 0.25, &Device::Cpu).unwrap();
        let mut data = encode(&p2).unwrap();
        data[130..132].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        let e = decode(&data, 1, 512, 512, None, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("block 1 has scale 0.5 but block 0 has 0.25"), "{e}");
        // A recorded exact scale must round to the blocks' f16.
        assert!(decode(&encode(&p2).unwrap(), 1, 512, 512, Some(0.3), &Device::Cpu).is_err());
        // Scales an f16 cannot hold.
        let big = packed_from_values(&[1], 1, 1, 1e6, &Device::Cpu).unwrap();
        assert!(encode(&big).unwrap_err().to_string().contains("f16"));
    }

    #[test]
    fn rejects_malformed_data() {
        let p = packed_from_values(&[1, 0, -1], 1, 3, 1.0, &Device::Cpu).unwrap();
        let data = encode(&p).unwrap();
        assert!(decode(&data[..65], 1, 256, 3, None, &Device::Cpu).is_err());
        assert!(decode(&data, 1, 255, 3, None, &Device::Cpu).is_err());
        let mut bad = data.clone();
        bad[0] |= 0b11;
        assert!(decode(&bad, 1, 256, 3, None, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("code 3"));
        let mut pad = data.clone();
        pad[3] = 0b01_01_01_10; // weight 3 = +1, past K = 3
        assert!(decode(&pad, 1, 256, 3, None, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("padding"));
    }
}
