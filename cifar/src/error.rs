//! The errors of reading and writing CIFAR-10 files.

use std::path::PathBuf;

use crate::reader::{missing_data_help, RECORD_BYTES};

/// What went wrong with a CIFAR-10 directory or file. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{action} {}: {err}", path.display())]
    Io {
        /// `"reading"` or `"writing"`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        err: std::io::Error,
    },
    /// The data directory does not exist, or lacks some of the six files.
    #[error("{}{}", missing_prefix(files), missing_data_help(dir))]
    Missing {
        /// The data directory.
        dir: PathBuf,
        /// The missing files; empty when the directory itself is missing.
        files: Vec<String>,
    },
    /// A batch file holds no record.
    #[error("{} is empty: expected records of {RECORD_BYTES} bytes", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A batch file's size is not a whole number of records.
    #[error(
        "{} is truncated or not a CIFAR-10 binary file: its size, {len} bytes, is not a multiple of \
         the record size {RECORD_BYTES} (1 label byte + 3072 pixel bytes); {} complete records and \
         {} stray bytes",
        path.display(), len / RECORD_BYTES, len % RECORD_BYTES
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        len: usize,
    },
    /// A record's label is not 0-9.
    #[error(
        "{}: record {record} (byte offset {}) has label {label}; CIFAR-10 labels are 0-9 (is this \
         the CIFAR-100 binary file, or not a CIFAR file at all?)",
        path.display(), record * RECORD_BYTES
    )]
    BadLabel {
        /// The file.
        path: PathBuf,
        /// Index of the record in the file.
        record: usize,
        /// The label byte found.
        label: u8,
    },
}

fn missing_prefix(files: &[String]) -> String {
    if files.is_empty() {
        String::new()
    } else {
        format!("missing file(s) {}.\n", files.join(", "))
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
