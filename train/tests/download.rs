//! `train` on a machine without CIFAR-10: it downloads the archive (here from a real HTTP server
//! on 127.0.0.1 started by the test, never the internet) or, with `--no-download`, explains.

mod common;
#[path = "../../cifar/tests/common/loopback.rs"]
mod loopback;

use std::path::Path;
use std::process::{Command, Output};

use cifar::Split;
use loopback::{dataset_archive, md5_hex, Reply, Server};

fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--data-dir")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--epochs", "1", "--batch-size", "8", "--eval-batch-size", "8"])
        .args(extra)
        .output()
        .expect("running the train binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn no_download_with_an_empty_data_dir_fails_with_the_instructions() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    std::fs::create_dir(&data).unwrap();
    let o = train(&data, &tmp.path().join("run"), &["--no-download"]);
    let stderr = text(&o.stderr);
    assert!(!o.status.success());
    for needle in [
        "downloading CIFAR-10 is turned off (--no-download)",
        "test_batch.bin",
        cifar::DOWNLOAD_URL,
        cifar::DOWNLOAD_MD5,
        "tar xzf",
        "--data-dir",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
}

#[test]
fn downloads_from_the_given_url_then_trains() {
    let train_files: [Split; 5] = std::array::from_fn(|i| common::random_split(3, 40 + i as u64));
    let test = common::random_split(4, 49);
    let archive = dataset_archive(&train_files, &test);
    let server = Server::start(Reply::Body(archive.clone()));
    let url = server.url("/mirror/cifar-10-binary.tar.gz");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data").join("cifar-10-batches-bin");
    let run = tmp.path().join("run");
    let md5 = md5_hex(&archive);

    let o = train(&data, &run, &["--cifar-url", &url, "--cifar-md5", &md5]);
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("downloading {url}")), "{stderr}");
    assert!(
        stderr.contains(&format!("downloaded {url} ({} bytes, MD5 verified)", archive.len())),
        "{stderr}"
    );
    assert!(stdout.contains("data: 15 training / 4 test images"), "{stdout}");
    assert!(run.join("best.safetensors").is_file());
    assert_eq!(cifar::load_test(&data).unwrap(), test);
    assert_eq!(server.requests(), 1);

    // A second run finds the data: no request, even with downloads forbidden.
    let o = train(&data, &tmp.path().join("run2"), &["--no-download"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(server.requests(), 1);
}

#[test]
fn a_corrupt_download_stops_training_and_leaves_nothing() {
    let train_files: [Split; 5] = std::array::from_fn(|i| common::random_split(2, 50 + i as u64));
    let archive = dataset_archive(&train_files, &common::random_split(2, 59));
    let server = Server::start(Reply::Body(archive.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data").join("cifar-10-batches-bin");
    // The official digest: the served archive is not the official one.
    let o = train(
        &data,
        &tmp.path().join("run"),
        &["--cifar-url", &server.url("/a.tar.gz")],
    );
    let stderr = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains(&format!("expected {}", cifar::DOWNLOAD_MD5)),
        "{stderr}"
    );
    assert!(stderr.contains(&md5_hex(&archive)), "{stderr}");
    assert_eq!(std::fs::read_dir(tmp.path().join("data")).unwrap().count(), 0);
    assert!(!tmp.path().join("run").join("best.safetensors").exists());
}

#[test]
fn a_malformed_md5_is_rejected_by_the_parser() {
    let tmp = tempfile::tempdir().unwrap();
    let o = train(&tmp.path().join("d"), &tmp.path().join("r"), &["--cifar-md5", "xyz"]);
    let stderr = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("--cifar-md5") && stderr.contains("32 hex digits"),
        "{stderr}"
    );
    assert!(!tmp.path().join("d").exists());
}
