//! Fixtures shared by the cifar tests.
#![allow(dead_code)]

pub mod loopback;

use std::path::Path;

use cifar::{Split, IMAGE_BYTES};
use rand::{Rng, SeedableRng};

/// `n` random images with labels `i % 10`, reproducible from `seed`.
pub fn random_split(n: usize, seed: u64) -> Split {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut images = vec![0u8; n * IMAGE_BYTES];
    rng.fill(&mut images[..]);
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Split { images, labels }
}

/// Writes a complete CIFAR-10 binary directory: `per_file` random images in each training file,
/// `test` in the test file. Returns the training and test splits as written.
pub fn write_dataset(dir: &Path, per_file: usize, test: usize) -> (Split, Split) {
    let files: [Split; 5] = std::array::from_fn(|i| random_split(per_file, 100 + i as u64));
    let t = random_split(test, 7);
    cifar::write_cifar10(dir, &files, &t).unwrap();
    let mut train = Split::default();
    files.iter().for_each(|s| train.extend(s));
    (train, t)
}
