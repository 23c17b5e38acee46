//! CIFAR-10 for the networks of this workspace: a validating reader (and writer) of the
//! *binary version* of the data set, and the per-channel normalisation that turns its bytes into
//! network inputs.
//!
//! ```no_run
//! use cifar::{load_cifar10, normalize_batch, Normalizer};
//! let data = load_cifar10("data/cifar-10-batches-bin".as_ref(), None)?;
//! let lut = Normalizer::default().lut();
//! let first: Vec<usize> = (0..8).collect();
//! let x = normalize_batch(&data.test, &first, &lut); // (8, 3, 32, 32) f32, CHW
//! assert_eq!(x.len(), 8 * cifar::IMAGE_BYTES);
//! # Ok::<(), cifar::Error>(())
//! ```
#![warn(missing_docs)]

mod error;
mod normalize;
mod reader;

pub use error::{Error, Result};
pub use normalize::{normalize_batch, Lut, Normalizer};
pub use reader::{
    encode_records, load_cifar10, load_test, missing_data_help, read_batch_bytes, read_batch_file, write_cifar10,
    Cifar10, Split, DOWNLOAD_URL, IMAGE_BYTES, NUM_CLASSES, RECORD_BYTES, TEST_FILE, TRAIN_FILES,
};
