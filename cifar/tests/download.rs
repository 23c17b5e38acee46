//! Downloading CIFAR-10 from a real HTTP server on 127.0.0.1 (started by each test): success,
//! and every failure leaving nothing behind. No test reaches beyond the loopback interface.

mod common;

use std::path::{Path, PathBuf};

use cifar::{
    download_cifar10, ensure_cifar10, load_cifar10, needs_download, DownloadFailure, DownloadOptions, Error, Fetch,
    Split, DOWNLOAD_URL,
};
use common::loopback::{closed_port_url, dataset_archive, dataset_entries, md5_hex, tar_gz, Reply, Server};
use common::random_split;

/// Five training files of 3 images and a test file of 4, fresh random bytes per seed.
fn splits(seed: u64) -> ([Split; 5], Split) {
    let train = std::array::from_fn(|i| random_split(3, seed * 10 + i as u64));
    (train, random_split(4, seed * 10 + 9))
}

fn options(url: String, archive: &[u8]) -> DownloadOptions {
    DownloadOptions {
        url,
        md5: md5_hex(archive).parse().unwrap(),
        progress: false,
        ..DownloadOptions::default()
    }
}

/// `<tmp>/data/cifar-10-batches-bin`, whose parent does not exist yet.
fn data_dir(tmp: &tempfile::TempDir) -> PathBuf {
    tmp.path().join("data").join("cifar-10-batches-bin")
}

/// The names in `dir` (empty when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs a download that must fail; checks that nothing is left beside the data directory and
/// that the error carries the manual instructions. Returns the failure.
fn fails(opts: &DownloadOptions) -> DownloadFailure {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data_dir(&tmp);
    let err = ensure_cifar10(&dir, opts).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&opts.url), "{text}");
    assert!(
        text.contains(DOWNLOAD_URL) && text.contains("tar xzf"),
        "no manual instructions: {text}"
    );
    assert!(!dir.exists(), "{} was created", dir.display());
    let left = entries(dir.parent().unwrap());
    assert!(left.is_empty(), "left behind: {left:?}");
    match err {
        Error::Download { reason, .. } => reason,
        other => panic!("expected Error::Download, got {other:?}"),
    }
}

#[test]
fn downloads_verifies_and_extracts_into_place() {
    let (train, test) = splits(1);
    let archive = dataset_archive(&train, &test);
    let server = Server::start(Reply::Body(archive.clone()));
    let opts = options(server.url("/cifar-10-binary.tar.gz"), &archive);
    let tmp = tempfile::tempdir().unwrap();
    let dir = data_dir(&tmp);
    assert!(needs_download(&dir));

    let got = ensure_cifar10(&dir, &opts).unwrap().expect("a download");
    assert_eq!((got.bytes, got.dir.as_path()), (archive.len() as u64, dir.as_path()));
    // Only the data directory beside it: the archive and the staging directory are gone.
    assert_eq!(entries(dir.parent().unwrap()), ["cifar-10-batches-bin"]);
    let data = load_cifar10(&dir, None).unwrap();
    let mut all = Split::default();
    train.iter().for_each(|s| all.extend(s));
    assert_eq!((data.train, data.test), (all, test));
    assert!(entries(&dir).contains(&"batches.meta.txt".to_string()));

    // Present now: nothing more is fetched, even with downloading forbidden.
    assert_eq!(ensure_cifar10(&dir, &opts).unwrap(), None);
    let never = DownloadOptions {
        fetch: Fetch::Never,
        ..opts
    };
    assert_eq!(ensure_cifar10(&dir, &never).unwrap(), None);
    assert_eq!(server.requests(), 1);
}

#[test]
fn an_existing_empty_directory_is_filled() {
    let (train, test) = splits(2);
    let archive = dataset_archive(&train, &test);
    let server = Server::start(Reply::Body(archive.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mine");
    std::fs::create_dir(&dir).unwrap();
    ensure_cifar10(&dir, &options(server.url("/x.tar.gz"), &archive))
        .unwrap()
        .unwrap();
    assert_eq!(cifar::load_test(&dir).unwrap(), test);
}

#[test]
fn a_directory_with_files_is_never_downloaded_into() {
    let server = Server::start(Reply::Status(500));
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(cifar::TEST_FILE), b"partial").unwrap();
    let opts = options(server.url("/a"), b"");
    assert!(!needs_download(tmp.path()));
    assert_eq!(ensure_cifar10(tmp.path(), &opts).unwrap(), None);
    match download_cifar10(tmp.path(), &opts).unwrap_err() {
        Error::Download {
            reason: DownloadFailure::Occupied(p),
            ..
        } => assert_eq!(p, tmp.path()),
        e => panic!("{e:?}"),
    }
    assert_eq!(server.requests(), 0);
    assert_eq!(entries(tmp.path()), [cifar::TEST_FILE]);
}

#[test]
fn forbidden_download_explains_and_fetches_nothing() {
    let server = Server::start(Reply::Status(500));
    let tmp = tempfile::tempdir().unwrap();
    let dir = data_dir(&tmp);
    let opts = DownloadOptions {
        fetch: Fetch::Never,
        ..options(server.url("/a"), b"")
    };
    let err = ensure_cifar10(&dir, &opts).unwrap_err();
    assert!(matches!(err, Error::DownloadOff { .. }), "{err:?}");
    let text = err.to_string();
    for needle in ["--no-download", DOWNLOAD_URL, "test_batch.bin", "cifar-10-batches-bin"] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    assert_eq!(server.requests(), 0);
    assert!(!tmp.path().join("data").exists());
}

#[test]
fn wrong_checksum_extracts_nothing() {
    let (train, test) = splits(3);
    let archive = dataset_archive(&train, &test);
    let server = Server::start(Reply::Body(archive.clone()));
    // The expected digest of other bytes: the archive is intact but not the one expected.
    let opts = options(server.url("/a.tar.gz"), b"another archive");
    match fails(&opts) {
        DownloadFailure::Checksum {
            expected,
            actual,
            bytes,
        } => {
            assert_eq!(expected, md5_hex(b"another archive"));
            assert_eq!(actual, md5_hex(&archive));
            assert_eq!(bytes, archive.len() as u64);
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(server.requests(), 1);
}

#[test]
fn truncated_body_is_an_error() {
    let (train, test) = splits(4);
    let archive = dataset_archive(&train, &test);
    let cut = archive.len() / 2;
    let server = Server::start(Reply::Cut(archive.clone(), cut));
    match fails(&options(server.url("/a.tar.gz"), &archive)) {
        // ureq notices the early close itself; `Length` is the check behind it.
        DownloadFailure::Body { received, expected, .. } => {
            assert_eq!((received, expected), (cut as u64, Some(archive.len() as u64)));
        }
        DownloadFailure::Length { received, expected } => {
            assert_eq!((received, expected), (cut as u64, archive.len() as u64));
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn truncated_body_without_length_fails_the_checksum() {
    let (train, test) = splits(5);
    let archive = dataset_archive(&train, &test);
    let cut = archive.len() - 7;
    let server = Server::start(Reply::CutUnannounced(archive.clone(), cut));
    match fails(&options(server.url("/a.tar.gz"), &archive)) {
        DownloadFailure::Checksum { actual, bytes, .. } => {
            assert_eq!((actual, bytes), (md5_hex(&archive[..cut]), cut as u64));
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn server_error_is_reported() {
    for code in [500, 404, 403] {
        let server = Server::start(Reply::Status(code));
        match fails(&options(server.url("/a.tar.gz"), b"")) {
            DownloadFailure::Status(c) => assert_eq!(c, code),
            r => panic!("{r:?}"),
        }
    }
}

#[test]
fn no_server_is_reported() {
    let opts = options(closed_port_url(), b"");
    assert!(matches!(fails(&opts), DownloadFailure::Request(_)));
}

#[test]
fn a_bad_proxy_url_is_reported() {
    let mut opts = options(closed_port_url(), b"");
    opts.proxy = Some("not a proxy url at all".into());
    assert!(matches!(fails(&opts), DownloadFailure::Request(m) if m.contains("proxy")));
}

/// An archive's files: (path, contents).
type Entries = Vec<(String, Vec<u8>)>;

/// Serves `archive` with its own (matching) MD5 and returns the failure.
fn fails_with_archive(archive: Vec<u8>) -> DownloadFailure {
    let server = Server::start(Reply::Body(archive.clone()));
    fails(&options(server.url("/a.tar.gz"), &archive))
}

#[test]
fn archives_that_are_not_the_data_set_leave_nothing() {
    let (train, test) = splits(6);
    let archive = |edit: &dyn Fn(&mut Entries)| {
        let mut e = dataset_entries(&train, &test);
        edit(&mut e);
        let refs: Vec<(&str, Vec<u8>)> = e.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
        tar_gz(&["cifar-10-batches-bin/"], &refs)
    };
    // Not gzip at all.
    let r = fails_with_archive(b"<html>a captive portal</html>".to_vec());
    assert!(
        matches!(&r, DownloadFailure::Archive(m) if m.contains("tar.gz")),
        "{r:?}"
    );
    // A valid .tar.gz without the test file.
    let r = fails_with_archive(archive(&|e| e.retain(|(p, _)| !p.ends_with("test_batch.bin"))));
    assert!(
        matches!(&r, DownloadFailure::Archive(m) if m.contains("test_batch.bin")),
        "{r:?}"
    );
    // The files under another directory name.
    let r = fails_with_archive(archive(&|e| {
        e.iter_mut()
            .for_each(|(p, _)| *p = p.replace("cifar-10-batches-bin", "cifar-100-binary"))
    }));
    assert!(
        matches!(&r, DownloadFailure::Archive(m) if m.contains("cifar-10-batches-bin/")),
        "{r:?}"
    );
    // A record with label 10: the reader's checks run on the extracted files.
    let r = fails_with_archive(archive(&|e| e[2].1[cifar::RECORD_BYTES] = 10));
    match r {
        DownloadFailure::Invalid(inner) => {
            assert!(
                matches!(
                    *inner,
                    Error::BadLabel {
                        record: 1,
                        label: 10,
                        ..
                    }
                ),
                "{inner:?}"
            )
        }
        r => panic!("{r:?}"),
    }
    // A batch file cut mid-record.
    let r = fails_with_archive(archive(&|e| {
        e[0].1.pop();
    }));
    assert!(
        matches!(&r, DownloadFailure::Invalid(inner) if matches!(**inner, Error::Truncated { .. })),
        "{r:?}"
    );
}

#[test]
fn links_and_escaping_paths_are_refused() {
    // A symbolic link entry (could point anywhere).
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    tar.append_link(&mut h, "cifar-10-batches-bin/test_batch.bin", "/etc/passwd")
        .unwrap();
    let link = tar.into_inner().unwrap().finish().unwrap();
    let r = fails_with_archive(link);
    assert!(
        matches!(&r, DownloadFailure::Archive(m) if m.contains("Symlink")),
        "{r:?}"
    );

    // A path leaving the extraction directory: written raw, as tar's builder refuses it.
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..12].copy_from_slice(b"../escaped.b");
    h.set_size(3);
    h.set_mode(0o644);
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend_from_slice(&[b'x'; 3]);
    raw.resize(512 * 2 + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &raw).unwrap();
    let r = fails_with_archive(gz.finish().unwrap());
    assert!(matches!(&r, DownloadFailure::Archive(_)), "{r:?}");
}
