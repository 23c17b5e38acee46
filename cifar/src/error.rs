//! The errors of reading, writing and downloading CIFAR-10 files.

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
    /// The data directory holds no CIFAR-10 and downloading it was not allowed
    /// ([`crate::Fetch::Never`]).
    #[error("downloading CIFAR-10 is turned off (--no-download).\n{}", missing_data_help(dir))]
    DownloadOff {
        /// The data directory.
        dir: PathBuf,
    },
    /// Downloading, verifying or extracting the archive failed. Nothing was left in the data
    /// directory's parent: no archive, no partial directory.
    #[error("could not fetch CIFAR-10 from {url}: {reason}.\n{}", missing_data_help(dir))]
    Download {
        /// The archive's URL.
        url: String,
        /// The data directory it was meant for.
        dir: PathBuf,
        /// What failed.
        reason: DownloadFailure,
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

/// The step of a download that failed ([`Error::Download`]).
#[derive(Debug, thiserror::Error)]
pub enum DownloadFailure {
    /// No answer: name resolution, connection, TLS, timeout or protocol error (offline?).
    #[error("no usable answer ({0})")]
    Request(String),
    /// The server answered with an HTTP error status.
    #[error("the server answered HTTP {0}")]
    Status(u16),
    /// The transfer broke off.
    #[error("the transfer broke off after {received} bytes{}: {err}", of(*expected))]
    Body {
        /// Bytes received before the error.
        received: u64,
        /// The announced length (`Content-Length`), if any.
        expected: Option<u64>,
        /// The transport's error.
        err: String,
    },
    /// The server closed the body early or sent more than it announced.
    #[error("received {received} bytes, the server announced {expected}")]
    Length {
        /// Bytes received.
        received: u64,
        /// The announced length (`Content-Length`).
        expected: u64,
    },
    /// The archive's MD5 is not the expected one; nothing was extracted.
    #[error(
        "the downloaded file ({bytes} bytes) has MD5 {actual}, expected {expected}: it is corrupt \
         or not the CIFAR-10 binary archive; nothing was extracted"
    )]
    Checksum {
        /// The expected digest, lowercase hex.
        expected: String,
        /// The digest of the bytes received, lowercase hex.
        actual: String,
        /// Bytes received.
        bytes: u64,
    },
    /// The archive is not a gzip-compressed tar of `cifar-10-batches-bin/`.
    #[error("the archive is unusable: {0}")]
    Archive(String),
    /// The extracted files fail the reader's checks; they were removed.
    #[error("the extracted files are not valid CIFAR-10 (removed): {0}")]
    Invalid(Box<Error>),
    /// The data directory exists and is not empty (a download never replaces files).
    #[error("{} exists and is not empty", .0.display())]
    Occupied(PathBuf),
    /// A local file operation failed.
    #[error("{action} {}: {err}", path.display())]
    Io {
        /// What was being done, e.g. `"writing"`.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        err: std::io::Error,
    },
}

fn of(expected: Option<u64>) -> String {
    expected.map(|n| format!(" of {n}")).unwrap_or_default()
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
