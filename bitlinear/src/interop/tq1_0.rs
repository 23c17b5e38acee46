//! llama.cpp's GGUF `TQ1_0` (ggml type 34): ternary weights in blocks of 256, 1.6875 bits each.
//!
//! A block is 54 bytes: `qs[48]`, `qh[4]`, then the f16 scale `d`. Each byte holds base-3 digits
//! `w + 1`, the first digit most significant, stored as `ceil(q · 256 / 243)` so that digit `j`
//! reads back as `((byte · 3^j) mod 256) · 3 >> 8` (ggml's `dequantize_row_tq1_0`):
//! - `qs[m]`, `m < 32`: five weights `m + 32·j` (weights 0..159);
//! - `qs[32 + m]`, `m < 16`: five weights `160 + m + 16·j` (160..239);
//! - `qh[m]`, `m < 4`: four weights `240 + m + 4·j` (240..255), then a zero digit.
//!
//! Rows, padding and the scale rule are those of [`super::tq2_0`]: [`encode`] writes one f16
//! scale in every block; [`decode`] needs one scale shared by the non-zero blocks.

use candle_core::{Device, Result};

use super::tq2_0::{decode_blocks, BLOCK};
use crate::packed::PackedTernary;

/// Bytes per block: 48 + 4 digit bytes and an f16 scale.
pub const BLOCK_BYTES: usize = 54;

/// For byte `i` (0..52) of a block, the weights of its digits, most significant first (the last
/// digit of a `qh` byte is `None`: always zero).
fn digits(i: usize) -> [Option<usize>; 5] {
    let at = |f: &dyn Fn(usize) -> usize| [0, 1, 2, 3, 4].map(|j| Some(f(j)));
    match i {
        0..=31 => at(&|j| i + 32 * j),
        32..=47 => at(&|j| 160 + (i - 32) + 16 * j),
        _ => {
            let mut d = at(&|j| 240 + (i - 48) + 4 * j);
            d[4] = None;
            d
        }
    }
}

const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// Encodes the weight as `TQ1_0` rows of `ceil(K/256)` blocks (`N · ceil(K/256) · 54` bytes).
pub fn encode(weight: &PackedTernary) -> Result<Vec<u8>> {
    let (n, k) = (weight.out_features(), weight.in_features());
    let d = super::f16_scale(weight.scale(), "TQ1_0")?.to_le_bytes();
    let values = weight.unpack()?;
    let blocks = k.div_ceil(BLOCK);
    let mut out = Vec::with_capacity(n * blocks * BLOCK_BYTES);
    for row in values.chunks_exact(k.max(1)).take(n) {
        for chunk in row.chunks(BLOCK) {
            let code = |e: usize| chunk.get(e).map_or(1u16, |&w| (w + 1) as u16); // padding: zero weight
            for i in 0..52 {
                let q = digits(i).iter().fold(0u16, |q, e| 3 * q + e.map_or(0, code));
                out.push((q * 256).div_ceil(243) as u8);
            }
            out.extend_from_slice(&d);
        }
    }
    Ok(out)
}

/// Decodes `n` rows of `k_stored` (a multiple of 256) weights of `TQ1_0` data, keeping the first
/// `k` of each row (the padding must be zero weights), into a [`PackedTernary`] on `device`;
/// `exact_scale` as in [`super::tq2_0::decode`].
pub fn decode(
    data: &[u8],
    n: usize,
    k_stored: usize,
    k: usize,
    exact_scale: Option<f32>,
    device: &Device,
) -> Result<PackedTernary> {
    let (values, scales) = decode_blocks(data, n, k_stored, k, "TQ1_0", BLOCK_BYTES, |b, vals| {
        for (i, &byte) in b[..52].iter().enumerate() {
            for (j, e) in digits(i).iter().enumerate() {
                let digit = ((byte.wrapping_mul(POW3[j]) as u16 * 3) >> 8) as u8;
                match e {
                    Some(e) => vals[*e] = digit,
                    // The trailing digit of a qh byte is zero in every encoder; anything else
                    // is flagged as an invalid code by the caller.
                    None if digit != 0 => vals[0] = 3,
                    None => {}
                }
            }
        }
        u16::from_le_bytes([b[52], b[53]])
    })?;
    let scale = super::block_scale(&scales, exact_scale, "TQ1_0")?;
    super::packed_from_values(&values, n, k, scale, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interop::packed_from_values;
    use crate::interop::test_util::{random_scale, random_ternary, SIZES};

    #[test]
    fn every_byte_value_decodes_to_its_digits() {
        // All 243 five-digit numbers survive the ceil(q·256/243) storage.
        for q in 0u16..243 {
            let byte = (q * 256).div_ceil(243) as u8;
            let got: Vec<u16> = POW3.iter().map(|&p| (byte.wrapping_mul(p) as u16 * 3) >> 8).collect();
            let want: Vec<u16> = (0..5).rev().map(|j| (q / 3u16.pow(j)) % 3).collect();
            assert_eq!(got, want, "q = {q}");
        }
    }

    #[test]
    fn digit_positions_cover_the_block_once() {
        let mut seen = [0u8; 256];
        for i in 0..52 {
            digits(i).iter().flatten().for_each(|&e| seen[e] += 1);
        }
        assert!(seen.iter().all(|&c| c == 1));
    }

    #[test]
    fn round_trips_every_awkward_size() {
        for (seed, &(n, k)) in SIZES.iter().enumerate() {
            let v = random_ternary(n * k, 200 + seed as u64);
            let s = random_scale(seed as u64 + 7);
            let p = packed_from_values(&v, n, k, s, &Device::Cpu).unwrap();
            let data = encode(&p).unwrap();
            let ks = k.div_ceil(BLOCK) * BLOCK;
            assert_eq!(data.len(), n * ks / BLOCK * BLOCK_BYTES);
            let q = decode(&data, n, ks, k, Some(s), &Device::Cpu).unwrap();
            assert_eq!(q.unpack().unwrap(), v, "({n}, {k})");
            assert_eq!(q.scale().to_bits(), s.to_bits());
            assert_eq!(encode(&q).unwrap(), data);
        }
    }

    #[test]
    fn rejects_malformed_data() {
        let p = packed_from_values(&[1, 0, -1], 1, 3, 1.0, &Device::Cpu).unwrap();
        let data = encode(&p).unwrap();
        assert!(decode(&data[..53], 1, 256, 3, None, &Device::Cpu).is_err());
        let mut bad = data.clone();
        bad[50] = 0xff; // a qh byte whose trailing digit is not zero
        assert!(decode(&bad, 1, 256, 3, None, &Device::Cpu).is_err());
        let mut pad = data.clone();
        pad[5] = 0; // weights 5, 37, ... = -1, past K = 3
        assert!(decode(&pad, 1, 256, 3, None, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("padding"));
    }

    /// Found by the `ternary_codecs` fuzz target: an all-zero (or empty) weight took any finite
    /// positive recorded scale, even one no f16 block scale holds, and then could not be encoded.
    #[test]
    fn all_zero_weights_take_only_a_recorded_scale_an_f16_holds() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let (n, k) = (rng.gen_range(0..4usize), rng.gen_range(1..300usize));
        let fits = rng.gen_range(1e-3f32..1e3);
        let zeros = packed_from_values(&vec![0; n * k], n, k, fits, &Device::Cpu).unwrap();
        let k_stored = k.div_ceil(256) * 256;
        type Decode = fn(&[u8], usize, usize, usize, Option<f32>, &Device) -> Result<PackedTernary>;
        for (data, decode) in [
            (encode(&zeros).unwrap(), decode as Decode),
            (
                super::super::tq2_0::encode(&zeros).unwrap(),
                super::super::tq2_0::decode,
            ),
        ] {
            let back = decode(&data, n, k_stored, k, Some(fits), &Device::Cpu).unwrap();
            assert_eq!(back.scale().to_bits(), fits.to_bits());
            assert_eq!(back.unpack().unwrap(), vec![0; n * k]);
            assert_eq!(decode(&data, n, k_stored, k, None, &Device::Cpu).unwrap().scale(), 1.0);
            for bad in [2.5e-32f32, 1e6, 0.0, -1.0, f32::NAN, f32::INFINITY] {
                let e = decode(&data, n, k_stored, k, Some(bad), &Device::Cpu)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("does not fit an f16 block scale"), "{bad}: {e}");
            }
        }
    }
}
