mod common;

use candle_core::Device;
use cifar::{normalize_batch, Lut, Normalizer};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use train::augment::{
    alternate_flips, augment_batch_cpu, augment_batch_tensor, augment_into, images_tensor, AugParams, Edge,
};

fn raw(src: &[u8], p: AugParams) -> Vec<f32> {
    let mut out = vec![0f32; 3072];
    augment_into(src, p, &Lut::identity(), &mut out);
    out
}

/// Every crop and flip, with zeros at the edges.
fn all_params() -> impl Iterator<Item = AugParams> {
    (0..=8u8).flat_map(|dy| {
        (0..=8u8).flat_map(move |dx| {
            [false, true].map(|flip| AugParams {
                dy,
                dx,
                flip,
                edge: Edge::Zeros,
            })
        })
    })
}

#[test]
fn crop_pixels_come_from_the_shifted_image_or_zero() {
    let s = common::random_split(1, 3);
    // Make every source byte non-zero, so a zero can only come from the padding.
    let src: Vec<u8> = s.image(0).iter().map(|v| v.max(&1).to_owned()).collect();
    for p in all_params() {
        let out = raw(&src, p);
        for c in 0..3 {
            for y in 0..32isize {
                for x in 0..32isize {
                    let xc = if p.flip { 31 - x } else { x };
                    let sy = y + p.dy as isize - 4;
                    let sx = xc + p.dx as isize - 4;
                    let got = out[c * 1024 + (y * 32 + x) as usize];
                    if (0..32).contains(&sy) && (0..32).contains(&sx) {
                        let want = src[c * 1024 + (sy * 32 + sx) as usize] as f32;
                        assert_eq!(got, want, "{p:?} c{c} y{y} x{x}");
                    } else {
                        assert_eq!(got, 0.0, "{p:?} c{c} y{y} x{x}: expected padding");
                    }
                }
            }
        }
        // At most 4 rows/columns of padding show.
        let zeros = out.iter().filter(|v| **v == 0.0).count();
        let (ry, rx) = ((p.dy as i32 - 4).unsigned_abs(), (p.dx as i32 - 4).unsigned_abs());
        assert_eq!(zeros as u32, 3 * (32 * 32 - (32 - ry) * (32 - rx)), "{p:?}");
    }
}

#[test]
fn identity_is_the_original_and_flip_mirrors() {
    let s = common::random_split(1, 4);
    let src = s.image(0);
    let id = raw(src, AugParams::IDENTITY);
    assert_eq!(id, src.iter().map(|&v| v as f32).collect::<Vec<_>>());
    for p in all_params().filter(|p| !p.flip) {
        for edge in [Edge::Zeros, Edge::Reflect] {
            let p = AugParams { edge, ..p };
            let a = raw(src, p);
            let b = raw(src, AugParams { flip: true, ..p });
            for c in 0..3 {
                for y in 0..32 {
                    for x in 0..32 {
                        let i = c * 1024 + y * 32;
                        assert_eq!(a[i + x], b[i + 31 - x]);
                    }
                }
            }
        }
    }
}

/// Reflect edges against an explicit reflect padding: the 40x40 image built pixel by pixel
/// (row and column -k are k, 31 + k are 31 - k), then the crop at (dy, dx), then the flip.
#[test]
fn reflect_edges_crop_the_reflect_padded_image() {
    let s = common::random_split(1, 8);
    let src = s.image(0);
    let reflect = |i: isize| -> usize {
        if i < 0 {
            (-i) as usize
        } else if i > 31 {
            (62 - i) as usize
        } else {
            i as usize
        }
    };
    let mut padded = vec![0u8; 3 * 40 * 40];
    for c in 0..3 {
        for py in 0..40isize {
            for px in 0..40isize {
                let v = src[c * 1024 + reflect(py - 4) * 32 + reflect(px - 4)];
                padded[c * 1600 + (py * 40 + px) as usize] = v;
            }
        }
    }
    for p in all_params() {
        let p = AugParams {
            edge: Edge::Reflect,
            ..p
        };
        let out = raw(src, p);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let xc = if p.flip { 31 - x } else { x };
                    let want = padded[c * 1600 + (y + p.dy as usize) * 40 + xc + p.dx as usize] as f32;
                    assert_eq!(out[c * 1024 + y * 32 + x], want, "{p:?} c{c} y{y} x{x}");
                }
            }
        }
    }
}

/// The test-time views: the identity and its mirror weigh 1/4, the four shifted views 1/8 (two
/// each way), the weights sum to 1, the shifts bring in reflected pixels.
#[test]
fn test_time_views_are_weighted_like_the_speed_run_nets() {
    let views = AugParams::test_time_views();
    assert_eq!(views.iter().map(|v| v.1).sum::<f64>(), 1.0);
    let identity = AugParams {
        edge: Edge::Reflect,
        ..AugParams::IDENTITY
    };
    assert_eq!(views[0], (identity, 0.25));
    assert_eq!(views[1], (AugParams { flip: true, ..identity }, 0.25));
    for (i, (p, w)) in views[2..].iter().enumerate() {
        assert_eq!(*w, 0.125);
        assert_eq!((p.dy, p.dx), if i < 2 { (3, 3) } else { (5, 5) });
        assert_eq!(p.flip, i % 2 == 1);
        assert_eq!(p.edge, Edge::Reflect);
    }
}

#[test]
fn sampled_offsets_stay_within_the_padding_and_cover_it() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut seen_dy = [false; 9];
    let mut flips = 0;
    for _ in 0..5000 {
        let p = AugParams::sample(&mut rng);
        assert!(p.dy <= 8 && p.dx <= 8);
        seen_dy[p.dy as usize] = true;
        flips += p.flip as usize;
    }
    assert!(seen_dy.iter().all(|s| *s));
    assert!((2200..2800).contains(&flips), "{flips} flips of 5000");
}

#[test]
fn identity_augmentation_is_the_plain_normalisation() {
    let split = common::random_split(12, 6);
    let lut = Normalizer::default().lut();
    let indices: Vec<usize> = (0..12).rev().collect();
    let aug = augment_batch_cpu(&split, &indices, &[AugParams::IDENTITY; 12], &lut);
    assert_eq!(aug, normalize_batch(&split, &indices, &lut));
}

#[test]
fn tensor_pipeline_equals_cpu_pipeline_bit_for_bit() {
    let split = common::random_split(40, 5);
    let norm = Normalizer::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let indices: Vec<usize> = (0..24).map(|i| (i * 7) % 40).collect();
    // Both edges, at random.
    let params: Vec<AugParams> = indices
        .iter()
        .map(|_| {
            let edge = if rng.gen_bool(0.5) { Edge::Reflect } else { Edge::Zeros };
            AugParams {
                edge,
                ..AugParams::sample(&mut rng)
            }
        })
        .collect();
    assert!(params.iter().any(|p| p.edge == Edge::Reflect) && params.iter().any(|p| p.edge == Edge::Zeros));
    let cpu = augment_batch_cpu(&split, &indices, &params, &norm.lut());
    let images = images_tensor(&split, &Device::Cpu).unwrap();
    let t = augment_batch_tensor(&images, &indices, &params, &norm).unwrap();
    assert_eq!(t.dims(), &[24, 3, 32, 32]);
    let t: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(t, cpu);
}

/// Alternating flips: every image's flip is its run-level draw in even epochs and the opposite
/// in odd ones, whatever the shuffle; the draws depend on the seed only and are about half true.
#[test]
fn alternating_flips_follow_the_image_not_the_position() {
    let n = 4000;
    let seed = rand::random::<u64>();
    let first = train::rng::first_flips(seed, n);
    assert_eq!(first, train::rng::first_flips(seed, n));
    assert_ne!(first, train::rng::first_flips(seed ^ 1, n));
    let trues = first.iter().filter(|&&f| f).count();
    assert!((1800..=2200).contains(&trues), "{trues} of {n} flipped");
    let mut rng = rand::thread_rng();
    for epoch in 0..4 {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let mut params: Vec<AugParams> = (0..n).map(|_| AugParams::sample_within(&mut rng, 2)).collect();
        let before = params.clone();
        alternate_flips(&mut params, &order, &first, epoch);
        for (j, (p, b)) in params.iter().zip(&before).enumerate() {
            assert_eq!(p.flip, first[order[j]] ^ (epoch % 2 == 1));
            // Only the flip changes.
            assert_eq!((p.dy, p.dx), (b.dy, b.dx));
        }
    }
}
