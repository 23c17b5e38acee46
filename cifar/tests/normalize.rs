//! The per-channel normalisation: constants, formula, and the batch helper.
mod common;

use cifar::{normalize_batch, Lut, Normalizer, IMAGE_BYTES};

#[test]
fn normalisation_uses_the_reference_constants() {
    let lut = Normalizer::default().lut();
    let want = (200.0 / 255.0 - 0.4822) / 0.1994;
    assert!((lut.0[1][200] - want).abs() < 1e-5);
    assert!((lut.0[0][0] - (-0.4914 / 0.2023)).abs() < 1e-5);
}

#[test]
fn the_table_is_the_affine_form_bit_for_bit() {
    let norm = Normalizer {
        mean: [0.1, 0.5, 0.9],
        std: [0.3, 0.2, 0.7],
    };
    let (scale, shift) = norm.affine();
    let lut = norm.lut();
    for c in 0..3 {
        for v in 0..256 {
            assert_eq!(lut.0[c][v].to_bits(), (v as f32 * scale[c] - shift[c]).to_bits());
        }
    }
}

#[test]
fn batches_map_every_byte_through_its_channel() {
    let split = common::random_split(6, 2);
    let lut = Normalizer::default().lut();
    let idx = [4, 0, 4];
    let x = normalize_batch(&split, &idx, &lut);
    assert_eq!(x.len(), 3 * IMAGE_BYTES);
    for (b, &i) in idx.iter().enumerate() {
        for (j, &v) in split.image(i).iter().enumerate() {
            assert_eq!(x[b * IMAGE_BYTES + j], lut.0[j / 1024][v as usize]);
        }
    }
    let raw = normalize_batch(&split, &[1], &Lut::identity());
    assert_eq!(raw, split.image(1).iter().map(|&v| v as f32).collect::<Vec<_>>());
}
