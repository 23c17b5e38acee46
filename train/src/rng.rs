//! Seeds for the run's random streams.
//!
//! Every epoch uses its own ChaCha8 generator seeded from `(seed, epoch)`, so a resumed run
//! draws exactly what an uninterrupted one would, with no generator state to save.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 256-bit ChaCha seed for stream `stream` of the run seeded with `seed`.
pub fn derive_seed(seed: u64, stream: u64) -> [u8; 32] {
    let mut state = seed ^ splitmix64(&mut stream.clone());
    let mut out = [0u8; 32];
    for chunk in out.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    out
}

/// The generator of epoch `epoch` (0-based): shuffling and augmentation draws.
pub fn epoch_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    ChaCha8Rng::from_seed(derive_seed(seed, epoch as u64))
}

/// Stream of [`first_flips`]: beyond any epoch number.
const FLIP_STREAM: u64 = u64::MAX;

/// The epoch-0 flip of each of `n` images for [`crate::augment::Flip::Alternating`], from the
/// run's seed alone (a resumed run draws the same).
pub fn first_flips(seed: u64, n: usize) -> Vec<bool> {
    use rand::Rng;
    let mut rng = ChaCha8Rng::from_seed(derive_seed(seed, FLIP_STREAM));
    (0..n).map(|_| rng.gen_bool(0.5)).collect()
}
