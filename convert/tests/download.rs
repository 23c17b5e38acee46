//! `convert eval` and `convert verify` on a machine without CIFAR-10: the test set is downloaded
//! (from a real HTTP server on 127.0.0.1 started by the test) after the model files were checked.

mod common;
#[path = "../../cifar/tests/common/loopback.rs"]
mod loopback;

use cifar::{Split, IMAGE_BYTES};
use common::{bin, checkpoint, run};
use loopback::{dataset_archive, md5_hex, Reply, Server};
use model::SimpleBitCnnConfig;
use rand::{Rng, SeedableRng};

/// A float checkpoint of the reference net in `dir` and its `convert export` packed file.
fn exported(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (ckpt, _) = checkpoint(dir, SimpleBitCnnConfig::bitlinear());
    let packed = dir.join("m.packed.safetensors");
    let (ok, _, stderr) = run(bin()
        .arg("export")
        .arg("--checkpoint")
        .arg(&ckpt)
        .arg("--out")
        .arg(&packed));
    assert!(ok, "{stderr}");
    (ckpt, packed)
}

fn split(n: usize, seed: u64) -> Split {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut images = vec![0u8; n * IMAGE_BYTES];
    rng.fill(&mut images[..]);
    Split {
        images,
        labels: (0..n).map(|_| rng.gen_range(0..10)).collect(),
    }
}

#[test]
fn eval_and_verify_download_the_test_set() {
    let train: [Split; 5] = std::array::from_fn(|i| split(1, 70 + i as u64));
    let archive = dataset_archive(&train, &split(6, 79));
    let server = Server::start(Reply::Body(archive.clone()));
    let url = server.url("/cifar-10-binary.tar.gz");
    let md5 = md5_hex(&archive);
    let tmp = tempfile::tempdir().unwrap();
    let (ckpt, packed) = exported(tmp.path());

    // A corrupt packed file fails before anything is fetched.
    let bad = tmp.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a packed file").unwrap();
    let data = tmp.path().join("data").join("cifar-10-batches-bin");
    let download = ["--cifar-url", url.as_str(), "--cifar-md5", md5.as_str()];
    let (ok, _, stderr) = run(bin()
        .arg("eval")
        .arg("--packed")
        .arg(&bad)
        .arg("--data-dir")
        .arg(&data)
        .args(download));
    assert!(!ok && stderr.contains("not a valid safetensors file"), "{stderr}");
    assert_eq!((server.requests(), data.exists()), (0, false));

    let (ok, stdout, stderr) = run(bin()
        .arg("eval")
        .arg("--packed")
        .arg(&packed)
        .arg("--data-dir")
        .arg(&data)
        .args(download));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("on 6 images"), "{stdout}");
    assert!(stderr.contains(&format!("downloading {url}")), "{stderr}");
    assert_eq!(server.requests(), 1);

    // verify reads the same directory: nothing more is fetched.
    let (ok, stdout, stderr) = run(bin()
        .arg("verify")
        .arg("--checkpoint")
        .arg(&ckpt)
        .arg("--packed")
        .arg(&packed)
        .arg("--data-dir")
        .arg(&data)
        .arg("--no-download"));
    assert!(ok && stdout.contains("verify: OK"), "{stdout}{stderr}");
    assert_eq!(server.requests(), 1);

    // verify into another empty directory downloads too.
    let other = tmp.path().join("other");
    let (ok, stdout, stderr) = run(bin()
        .arg("verify")
        .arg("--checkpoint")
        .arg(&ckpt)
        .arg("--packed")
        .arg(&packed)
        .arg("--data-dir")
        .arg(&other)
        .args(download));
    assert!(ok && stdout.contains("images:                 6"), "{stdout}{stderr}");
    assert_eq!(server.requests(), 2);
}

#[test]
fn eval_with_no_download_explains() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, packed) = exported(tmp.path());
    let (ok, _, stderr) = run(bin()
        .arg("eval")
        .arg("--packed")
        .arg(&packed)
        .args(["--no-download", "--data-dir"])
        .arg(tmp.path().join("none")));
    assert!(!ok, "{stderr}");
    for needle in ["--no-download", cifar::DOWNLOAD_URL, "test_batch.bin"] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
}
