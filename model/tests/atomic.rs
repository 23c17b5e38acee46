//! `write_atomic`: complete files on success; on failure an error naming the path, the old
//! target untouched and no temporary file left behind.
use std::path::Path;

use model::write_atomic;

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn writes_and_replaces_whole_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.bin");
    write_atomic(&p, b"first version").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"first version");
    write_atomic(&p, b"2nd").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"2nd");
    write_atomic(&p, b"").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"");
    assert_eq!(entries(dir.path()), ["out.bin"]);
}

#[test]
fn a_failed_rename_removes_the_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    // A directory cannot be replaced by a file: the rename fails after the data was written.
    let target = dir.path().join("taken");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("inside"), b"kept").unwrap();
    let err = write_atomic(&target, b"new bytes").unwrap_err();
    assert!(err.to_string().contains(&target.display().to_string()), "{err}");
    assert_eq!(entries(dir.path()), ["taken"], "a temporary file was left behind");
    assert_eq!(std::fs::read(target.join("inside")).unwrap(), b"kept");
}

#[test]
fn a_missing_directory_is_an_error_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("no/such/dir/out.bin");
    let err = write_atomic(&p, b"x").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    let msg = err.to_string();
    assert!(msg.contains("does not exist") && msg.contains("out.bin"), "{msg}");
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn concurrent_writers_of_one_target_leave_one_complete_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shared.bin");
    let payloads: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 100_000]).collect();
    std::thread::scope(|s| {
        for b in &payloads {
            let p = &p;
            s.spawn(move || write_atomic(p, b).unwrap());
        }
    });
    let got = std::fs::read(&p).unwrap();
    assert!(payloads.contains(&got), "a mix of two writes");
    assert_eq!(entries(dir.path()), ["shared.bin"]);
}
