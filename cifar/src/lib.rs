//! CIFAR-10 for the networks of this workspace: a validating reader (and writer) of the
//! *binary version* of the data set, its verified download, and the per-channel normalisation
//! that turns its bytes into network inputs.
//!
//! ```no_run
//! use cifar::{ensure_cifar10, load_cifar10, normalize_batch, DownloadOptions, Normalizer};
//! let dir = "data/cifar-10-batches-bin".as_ref();
//! ensure_cifar10(dir, &DownloadOptions::default())?; // downloads it if dir is missing or empty
//! let data = load_cifar10(dir, None)?;
//! let lut = Normalizer::default().lut();
//! let first: Vec<usize> = (0..8).collect();
//! let x = normalize_batch(&data.test, &first, &lut); // (8, 3, 32, 32) f32, CHW
//! assert_eq!(x.len(), 8 * cifar::IMAGE_BYTES);
//! # Ok::<(), cifar::Error>(())
//! ```
#![warn(missing_docs)]

#[cfg(feature = "clap")]
mod args;
mod download;
mod error;
mod normalize;
mod reader;

#[cfg(feature = "clap")]
pub use args::DownloadArgs;
pub use download::{
    download_cifar10, ensure_cifar10, needs_download, DownloadOptions, Downloaded, Fetch, Md5Digest, ARCHIVE_DIR,
};
pub use error::{DownloadFailure, Error, Result};
pub use normalize::{normalize_batch, Lut, Normalizer};
pub use reader::{
    encode_records, load_cifar10, load_test, missing_data_help, read_batch_bytes, read_batch_file, write_cifar10,
    Cifar10, Split, DOWNLOAD_MD5, DOWNLOAD_URL, IMAGE_BYTES, NUM_CLASSES, RECORD_BYTES, TEST_FILE, TRAIN_FILES,
};
