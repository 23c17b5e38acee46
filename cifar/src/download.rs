//! Fetching the CIFAR-10 binary archive into a data directory that lacks it.
//!
//! The archive is streamed into a temporary file next to the data directory while its MD5 is
//! computed; only an archive with the expected digest is extracted, into a temporary directory
//! that is checked with the reader and then renamed into place. Every error path removes the
//! temporary file and directory, so a failed or interrupted download never leaves anything that
//! looks like a data set.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use md5::{Digest, Md5};

use crate::error::DownloadFailure;
use crate::reader::{read_batch_file, DOWNLOAD_MD5, DOWNLOAD_URL, TEST_FILE, TRAIN_FILES};
use crate::{Error, Result};

/// The directory the archive holds its files in (`cifar-10-batches-bin/`).
pub const ARCHIVE_DIR: &str = "cifar-10-batches-bin";

/// Whether a missing data set may be downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// Download when the data directory is missing or empty.
    IfMissing,
    /// Never download: a missing data set is [`Error::DownloadOff`].
    Never,
}

/// An MD5 digest; parsed from and shown as 32 hex digits.
///
/// ```
/// let d: cifar::Md5Digest = "C32A1D4AB5D03F1284B67883E8D87530".parse().unwrap();
/// assert_eq!(d.to_string(), cifar::DOWNLOAD_MD5);
/// assert!("c32a".parse::<cifar::Md5Digest>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Md5Digest(pub [u8; 16]);

impl FromStr for Md5Digest {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("an MD5 digest is 32 hex digits, got {s:?}");
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Md5Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Where and how to download CIFAR-10. [`Default`] is the official archive, allowed, with a
/// progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadOptions {
    /// URL of `cifar-10-binary.tar.gz` (`http://` or `https://`; a mirror, or a test server).
    pub url: String,
    /// The archive's expected MD5, checked before anything is extracted.
    pub md5: Md5Digest,
    /// Whether downloading is allowed at all.
    pub fetch: Fetch,
    /// Announce the download on stderr and draw a progress bar there (when it is a terminal).
    pub progress: bool,
    /// HTTP(S) proxy URL, e.g. `http://proxy:3128`; `None` connects directly (the environment's
    /// `HTTPS_PROXY` is not read).
    pub proxy: Option<String>,
    /// Longest wait for the connection (name resolution, TCP and TLS handshakes).
    pub connect_timeout: Duration,
    /// Longest wait for any single read of the answer (a stalled transfer fails after this).
    pub read_timeout: Duration,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            url: DOWNLOAD_URL.to_string(),
            md5: DOWNLOAD_MD5.parse().expect("the published MD5 is 32 hex digits"),
            fetch: Fetch::IfMissing,
            progress: true,
            proxy: None,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// A completed download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// Where the archive came from.
    pub url: String,
    /// Size of the archive in bytes (its MD5 matched).
    pub bytes: u64,
    /// The data directory now holding the extracted files.
    pub dir: PathBuf,
}

/// True when `dir` holds no data set at all: it does not exist, or is an empty directory. Only
/// then is anything downloaded; a directory with some files is left to the reader to judge.
pub fn needs_download(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => !dir.exists(),
    }
}

/// Makes sure `dir` holds CIFAR-10: when it is missing or empty ([`needs_download`]), downloads
/// the archive per `opts` ([`download_cifar10`]) and returns what was fetched; otherwise does
/// nothing (`Ok(None)`), leaving the files' checks to the reader.
///
/// ```no_run
/// use cifar::{ensure_cifar10, load_cifar10, DownloadOptions};
/// let dir = std::path::Path::new("data/cifar-10-batches-bin");
/// ensure_cifar10(dir, &DownloadOptions::default())?; // about 162 MB on the first run
/// let data = load_cifar10(dir, None)?;
/// # Ok::<(), cifar::Error>(())
/// ```
pub fn ensure_cifar10(dir: &Path, opts: &DownloadOptions) -> Result<Option<Downloaded>> {
    if !needs_download(dir) {
        return Ok(None);
    }
    if opts.fetch == Fetch::Never {
        return Err(Error::DownloadOff { dir: dir.into() });
    }
    if opts.progress {
        eprintln!("CIFAR-10 not found in {}: downloading {}", dir.display(), opts.url);
    }
    download_cifar10(dir, opts).map(Some)
}

/// Downloads the archive at `opts.url` and installs its `cifar-10-batches-bin/` as `dir`, which
/// must be missing or empty. Ignores `opts.fetch` (the caller decided).
///
/// Steps: stream into a temporary file in `dir`'s parent (created if needed), computing the
/// MD5; compare it with `opts.md5`; extract into a temporary directory there; read every batch
/// file with the reader's checks; rename into place. Any failure is [`Error::Download`] and
/// leaves nothing behind. A process killed mid-way (no destructor runs) may leave a hidden
/// `.cifar-10-binary.*.tar.gz.part` file or `.cifar-10-extract.*` directory in the parent: never
/// taken for the data set (the next run downloads again), safe to delete.
pub fn download_cifar10(dir: &Path, opts: &DownloadOptions) -> Result<Downloaded> {
    let fail = |reason| Error::Download {
        url: opts.url.clone(),
        dir: dir.into(),
        reason,
    };
    if !needs_download(dir) {
        return Err(fail(DownloadFailure::Occupied(dir.into())));
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    install(dir, parent, opts).map_err(fail)
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DownloadFailure {
    let path = path.to_path_buf();
    move |err| DownloadFailure::Io { action, path, err }
}

/// The steps of [`download_cifar10`]; the temporary file and directory are removed when they
/// are dropped, on success and on every error.
fn install(dir: &Path, parent: &Path, opts: &DownloadOptions) -> std::result::Result<Downloaded, DownloadFailure> {
    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    let mut archive = tempfile::Builder::new()
        .prefix(".cifar-10-binary.")
        .suffix(".tar.gz.part")
        .tempfile_in(parent)
        .map_err(io("creating a temporary file in", parent))?;
    let archive_path = archive.path().to_path_buf();
    let (bytes, digest) = fetch(opts, archive.as_file_mut(), &archive_path)?;
    if digest != opts.md5 {
        return Err(DownloadFailure::Checksum {
            expected: opts.md5.to_string(),
            actual: digest.to_string(),
            bytes,
        });
    }
    let staging = tempfile::Builder::new()
        .prefix(".cifar-10-extract.")
        .tempdir_in(parent)
        .map_err(io("creating a temporary directory in", parent))?;
    extract(&archive_path, staging.path())?;
    drop(archive);
    let extracted = staging.path().join(ARCHIVE_DIR);
    if !extracted.is_dir() {
        return Err(DownloadFailure::Archive(format!(
            "it holds no {ARCHIVE_DIR}/ directory"
        )));
    }
    for file in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        let path = extracted.join(file);
        if !path.is_file() {
            return Err(DownloadFailure::Archive(format!("it holds no {ARCHIVE_DIR}/{file}")));
        }
        read_batch_file(&path).map_err(|e| DownloadFailure::Invalid(Box::new(e)))?;
    }
    if dir.exists() {
        // Empty (checked by the caller): make room for the rename.
        std::fs::remove_dir(dir).map_err(io("removing the empty directory", dir))?;
    }
    std::fs::rename(&extracted, dir).map_err(io("renaming the extracted files to", dir))?;
    Ok(Downloaded {
        url: opts.url.clone(),
        bytes,
        dir: dir.into(),
    })
}

/// GETs `opts.url` into `file`, returning the number of bytes and their MD5.
fn fetch(
    opts: &DownloadOptions,
    file: &mut File,
    path: &Path,
) -> std::result::Result<(u64, Md5Digest), DownloadFailure> {
    let proxy = match &opts.proxy {
        Some(p) => Some(ureq::Proxy::new(p).map_err(|e| DownloadFailure::Request(format!("proxy {p:?}: {e}")))?),
        None => None,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(proxy)
        .timeout_connect(Some(opts.connect_timeout))
        .timeout_per_read(Some(opts.read_timeout))
        .build()
        .into();
    let mut response = agent.get(&opts.url).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) => DownloadFailure::Status(code),
        e => DownloadFailure::Request(e.to_string()),
    })?;
    let expected = response.body().content_length();
    let bar = progress_bar(opts.progress, expected);
    let mut reader = response.body_mut().as_reader();
    let mut out = BufWriter::new(file);
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(DownloadFailure::Body {
                    received,
                    expected,
                    err: e.to_string(),
                });
            }
        };
        md5.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io("writing", path))?;
        received += n as u64;
        bar.set_position(received);
    }
    out.flush().map_err(io("writing", path))?;
    bar.finish_and_clear();
    if let Some(expected) = expected.filter(|&e| e != received) {
        return Err(DownloadFailure::Length { received, expected });
    }
    Ok((received, Md5Digest(md5.finalize().into())))
}

fn progress_bar(show: bool, len: Option<u64>) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(n) => (
            indicatif::ProgressBar::new(n),
            "CIFAR-10 [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ),
        None => (indicatif::ProgressBar::no_length(), "CIFAR-10 {bytes} {bytes_per_sec}"),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Unpacks the gzip-compressed tar `archive` into `into`. Only directories and regular files
/// are accepted; `tar` refuses paths that would leave `into`.
fn extract(archive: &Path, into: &Path) -> std::result::Result<(), DownloadFailure> {
    let file = File::open(archive).map_err(io("reading", archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let bad = |e: std::io::Error| DownloadFailure::Archive(format!("not a readable .tar.gz ({e})"));
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        let name = entry.path().map_err(bad)?.display().to_string();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(DownloadFailure::Archive(format!(
                "entry {name:?} is a {kind:?}, not a file or directory"
            )));
        }
        if !entry.unpack_in(into).map_err(bad)? {
            return Err(DownloadFailure::Archive(format!(
                "entry {name:?} points outside the archive"
            )));
        }
    }
    Ok(())
}
