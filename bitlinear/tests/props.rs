//! Property tests over shapes and values, on the CPU only (proptest shrinks on the host; CUDA is
//! covered by the `device_test!` suites and `cross_device.rs`).
mod common;

use bitlinear::{pack_ternary, packed_accumulate, quantize_activations, unpack_ternary, ActScaling, PackedTernary};
use candle_core::{Device, Tensor};
use proptest::prelude::*;

fn shape_and_codes() -> impl Strategy<Value = (usize, usize, Vec<i8>)> {
    (0usize..6, 0usize..70).prop_flat_map(|(n, k)| (Just(n), Just(k), prop::collection::vec(-1i8..=1, n * k)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn pack_unpack_round_trip((n, k, codes) in shape_and_codes()) {
        let bytes = pack_ternary(&codes, n, k).unwrap();
        prop_assert_eq!(bytes.len(), n * k.div_ceil(4));
        prop_assert_eq!(unpack_ternary(&bytes, n, k).unwrap(), codes);
    }

    #[test]
    fn accumulate_matches_reference(
        (m, n, k) in (1usize..9, 1usize..9, 1usize..300),
        seed in any::<u64>(),
    ) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        let (codes, _) = quantize_activations(&xt, ActScaling::PerToken).unwrap();
        let p = PackedTernary::pack(&wt).unwrap();
        let acc: Vec<i64> = packed_accumulate(&codes, &p).unwrap().flatten_all().unwrap()
            .to_vec1::<i32>().unwrap().into_iter().map(i64::from).collect();
        let (acc_ref, _) = common::ref_forward(&x, &w, m, n, k);
        prop_assert_eq!(acc, acc_ref);
    }

    #[test]
    fn activation_codes_within_range_and_scale_bounds(x in prop::collection::vec(-1e6f32..1e6, 1..200)) {
        let k = x.len();
        let xt = Tensor::from_vec(x.clone(), (1, k), &Device::Cpu).unwrap();
        let (codes, s) = quantize_activations(&xt, ActScaling::PerToken).unwrap();
        let s = s.to_vec1::<f32>().unwrap()[0];
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        prop_assert_eq!(s, amax.max(1e-5) / 127.0);
        let codes = codes.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        // Every code dequantizes to within half a step of its input.
        for (&c, &v) in codes.iter().zip(&x) {
            prop_assert!(((c as i8) as f32 * s - v).abs() <= 0.5 * s * 1.0001 + 1e-30);
        }
    }
}
