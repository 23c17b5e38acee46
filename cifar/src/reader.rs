//! The CIFAR-10 *binary version*: reading (every record validated) and writing.
//!
//! Each file is a sequence of 3073-byte records: one label byte (0-9), then the 32x32 red plane,
//! the green plane and the blue plane, each row-major (1024 bytes each). The training set is
//! `data_batch_1.bin` ... `data_batch_5.bin`, the test set `test_batch.bin`.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

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
/// The MD5 of the archive at [`DOWNLOAD_URL`], as published on the data set's page.
pub const DOWNLOAD_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

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

    /// Appends the images of `other`.
    pub fn extend(&mut self, other: &Split) {
        self.images.extend_from_slice(&other.images);
        self.labels.extend_from_slice(&other.labels);
    }

    fn extend_from_records(&mut self, bytes: &[u8], path: &Path) -> Result<()> {
        if bytes.is_empty() {
            return Err(Error::Empty { path: path.into() });
        }
        if !bytes.len().is_multiple_of(RECORD_BYTES) {
            return Err(Error::Truncated {
                path: path.into(),
                len: bytes.len(),
            });
        }
        let n = bytes.len() / RECORD_BYTES;
        self.labels.reserve(n);
        self.images.reserve(n * IMAGE_BYTES);
        for (record, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
            let label = rec[0];
            if label >= NUM_CLASSES {
                return Err(Error::BadLabel {
                    path: path.into(),
                    record,
                    label,
                });
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
    /// The 50,000 training images (fewer with a limit), in file order.
    pub train: Split,
    /// The 10,000 test images.
    pub test: Split,
}

/// How to get the data set, for a directory `dir` that lacks it.
pub fn missing_data_help(dir: &Path) -> String {
    let mut files: Vec<&str> = TRAIN_FILES.to_vec();
    files.push(TEST_FILE);
    format!(
        "CIFAR-10 (binary version) not found in {}.\n\
         The directory must contain these 6 files: {}.\n\
         To get them by hand: download {DOWNLOAD_URL} (MD5 {DOWNLOAD_MD5}) and extract it \
         (`tar xzf cifar-10-binary.tar.gz` creates cifar-10-batches-bin/), \
         then pass --data-dir path/to/cifar-10-batches-bin \
         (the default is data/cifar-10-batches-bin).",
        dir.display(),
        files.join(", ")
    )
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|err| Error::Io {
        action: "reading",
        path: path.into(),
        err,
    })
}

/// Reads one binary batch file, validating every record.
pub fn read_batch_file(path: &Path) -> Result<Split> {
    read_batch_bytes(&read(path)?, path)
}

/// Parses the bytes of one binary batch file, validating every record exactly as
/// [`read_batch_file`] does; `source` only names the bytes in errors.
///
/// ```
/// use std::path::Path;
/// let mut bytes = vec![7u8]; // label 7
/// bytes.extend(vec![200u8; cifar::IMAGE_BYTES]);
/// let split = cifar::read_batch_bytes(&bytes, Path::new("memory"))?;
/// assert_eq!((split.labels.as_slice(), split.image(0)[0]), (&[7u8][..], 200));
/// bytes[0] = 10; // not a class
/// assert!(cifar::read_batch_bytes(&bytes, Path::new("memory")).is_err());
/// # Ok::<(), cifar::Error>(())
/// ```
pub fn read_batch_bytes(bytes: &[u8], source: &Path) -> Result<Split> {
    let mut split = Split::default();
    split.extend_from_records(bytes, source)?;
    Ok(split)
}

/// The paths of `files` in `dir`, or [`Error::Missing`] naming those that are not there.
fn existing(dir: &Path, files: &[&str]) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::Missing {
            dir: dir.into(),
            files: Vec::new(),
        });
    }
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    let missing: Vec<String> = files
        .iter()
        .zip(&paths)
        .filter(|(_, p)| !p.is_file())
        .map(|(f, _)| f.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::Missing {
            dir: dir.into(),
            files: missing,
        });
    }
    Ok(paths)
}

/// Reads the whole data set from `dir`. With `train_limit = Some(n)` only the first `n` training
/// images are kept (and only the files needed for them are read). All six files must exist.
pub fn load_cifar10(dir: &Path, train_limit: Option<usize>) -> Result<Cifar10> {
    let mut files = TRAIN_FILES.to_vec();
    files.push(TEST_FILE);
    let paths = existing(dir, &files)?;
    let mut train = Split::default();
    for path in &paths[..TRAIN_FILES.len()] {
        if train_limit.is_some_and(|n| train.len() >= n) {
            break;
        }
        train.extend_from_records(&read(path)?, path)?;
    }
    if let Some(n) = train_limit {
        train.truncate(n);
    }
    let test = read_batch_file(&paths[TRAIN_FILES.len()])?;
    Ok(Cifar10 { train, test })
}

/// Reads the test set (`test_batch.bin`) of the directory `dir`.
pub fn load_test(dir: &Path) -> Result<Split> {
    let paths = existing(dir, &[TEST_FILE])?;
    read_batch_file(&paths[0])
}

/// Encodes images and labels as CIFAR-10 binary records (the inverse of [`read_batch_file`]).
pub fn encode_records(split: &Split) -> Vec<u8> {
    let mut out = Vec::with_capacity(split.len() * RECORD_BYTES);
    for i in 0..split.len() {
        out.push(split.labels[i]);
        out.extend_from_slice(split.image(i));
    }
    out
}

/// Writes a CIFAR-10 binary directory (created if needed): `train[i]` to the `i`-th training
/// file, `test` to the test file. Data sets for tests and benchmarks; [`load_cifar10`] reads it
/// back, provided no split is empty.
pub fn write_cifar10(dir: &Path, train: &[Split; 5], test: &Split) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| Error::Io {
            action: "writing",
            path,
            err,
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (file, split) in TRAIN_FILES.iter().chain([&TEST_FILE]).zip(train.iter().chain([test])) {
        let path = dir.join(file);
        std::fs::write(&path, encode_records(split)).map_err(io(&path))?;
    }
    Ok(())
}
