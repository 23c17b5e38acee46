//! A validating reader of the CIFAR-10 *binary version*.
//!
//! Each file is a sequence of 3073-byte records: one label byte (0-9), then the 32x32 red plane,
//! the green plane and the blue plane, each row-major (1024 bytes each). The training set is
//! `data_batch_1.bin` ... `data_batch_5.bin`, the test set `test_batch.bin`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Bytes of one image (3 planes of 32x32).
pub const IMAGE_BYTES: usize = 3 * 32 * 32;
/// Bytes of one record: label + image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Number of classes; labels are `0..NUM_CLASSES`.
pub const NUM_CLASSES: u8 = 10;
/// The training files, in the order they are read.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test file.
pub const TEST_FILE: &str = "test_batch.bin";
/// Where the binary version of CIFAR-10 can be downloaded.
pub const DOWNLOAD_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";

/// A set of images with labels, kept as raw bytes (CHW, u8) for cheap augmentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// `len() * IMAGE_BYTES` bytes, image after image, each R plane, G plane, B plane.
    pub images: Vec<u8>,
    /// One label (0-9) per image.
    pub labels: Vec<u8>,
}

impl Split {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The `i`-th image's 3072 bytes.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Keeps only the first `n` images (no-op if there are fewer).
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.labels.truncate(n);
            self.images.truncate(n * IMAGE_BYTES);
        }
    }

    fn extend_from_records(&mut self, bytes: &[u8], path: &Path) -> Result<()> {
        if bytes.is_empty() {
            bail!("{} is empty: expected records of {RECORD_BYTES} bytes", path.display());
        }
        if !bytes.len().is_multiple_of(RECORD_BYTES) {
            bail!(
                "{} is truncated or not a CIFAR-10 binary file: its size, {} bytes, is not a \
                 multiple of the record size {RECORD_BYTES} (1 label byte + 3072 pixel bytes); \
                 {} complete records and {} stray bytes",
                path.display(),
                bytes.len(),
                bytes.len() / RECORD_BYTES,
                bytes.len() % RECORD_BYTES
            );
        }
        let n = bytes.len() / RECORD_BYTES;
        self.labels.reserve(n);
        self.images.reserve(n * IMAGE_BYTES);
        for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
            let label = rec[0];
            if label >= NUM_CLASSES {
                bail!(
                    "{}: record {i} (byte offset {}) has label {label}; CIFAR-10 labels are 0-9 \
                     (is this the CIFAR-100 binary file, or not a CIFAR file at all?)",
                    path.display(),
                    i * RECORD_BYTES
                );
            }
            self.labels.push(label);
            self.images.extend_from_slice(&rec[1..]);
        }
        Ok(())
    }
}

/// CIFAR-10: training and test splits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cifar10 {
    pub train: Split,
    pub test: Split,
}

/// The message shown when the data directory or one of its files is missing.
pub fn missing_data_help(dir: &Path) -> String {
    let mut files: Vec<&str> = TRAIN_FILES.to_vec();
    files.push(TEST_FILE);
    format!(
        "CIFAR-10 (binary version) not found in {}.\n\
         The directory must contain these 6 files: {}.\n\
         To get them: download {DOWNLOAD_URL} and extract it \
         (`tar xzf cifar-10-binary.tar.gz` creates cifar-10-batches-bin/), \
         then pass --data-dir path/to/cifar-10-batches-bin \
         (the default is data/cifar-10-batches-bin).",
        dir.display(),
        files.join(", ")
    )
}

/// Reads one binary batch file, validating every record.
pub fn read_batch_file(path: &Path) -> Result<Split> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut split = Split::default();
    split.extend_from_records(&bytes, path)?;
    Ok(split)
}

/// Reads the whole data set from `dir`. With `train_limit = Some(n)` only the first `n` training
/// images are kept (and only the files needed for them are read).
pub fn load_cifar10(dir: &Path, train_limit: Option<usize>) -> Result<Cifar10> {
    let paths: Vec<PathBuf> = TRAIN_FILES
        .iter()
        .chain(std::iter::once(&TEST_FILE))
        .map(|f| dir.join(f))
        .collect();
    if !dir.is_dir() {
        bail!("{}", missing_data_help(dir));
    }
    let missing: Vec<String> = paths
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
        .collect();
    if !missing.is_empty() {
        bail!("missing file(s) {}.\n{}", missing.join(", "), missing_data_help(dir));
    }
    let mut train = Split::default();
    for path in &paths[..TRAIN_FILES.len()] {
        if train_limit.is_some_and(|n| train.len() >= n) {
            break;
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        train.extend_from_records(&bytes, path)?;
    }
    if let Some(n) = train_limit {
        train.truncate(n);
    }
    let test = read_batch_file(&paths[TRAIN_FILES.len()])?;
    Ok(Cifar10 { train, test })
}

/// Encodes images and labels as CIFAR-10 binary records (the inverse of [`read_batch_file`]);
/// used to make test fixtures.
pub fn encode_records(split: &Split) -> Vec<u8> {
    let mut out = Vec::with_capacity(split.len() * RECORD_BYTES);
    for i in 0..split.len() {
        out.push(split.labels[i]);
        out.extend_from_slice(split.image(i));
    }
    out
}
