//! The binary reader and writer: exact pixels and labels, file order, limits, clear errors.
mod common;

use cifar::{
    load_cifar10, load_test, read_batch_bytes, read_batch_file, Error, Split, IMAGE_BYTES, RECORD_BYTES, TEST_FILE,
    TRAIN_FILES,
};

#[test]
fn loader_reads_exact_pixels_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    // Hand-made records: the pixel at (c, y, x) of image i is (i + 3c + 5y + 7x) mod 256.
    let mut bytes = Vec::new();
    for i in 0..4u32 {
        bytes.push([3u8, 9, 0, 5][i as usize]);
        for c in 0..3u32 {
            for y in 0..32u32 {
                for x in 0..32u32 {
                    bytes.push(((i + 3 * c + 5 * y + 7 * x) % 256) as u8);
                }
            }
        }
    }
    assert_eq!(bytes.len(), 4 * RECORD_BYTES);
    let path = dir.path().join("b.bin");
    std::fs::write(&path, &bytes).unwrap();
    let s = read_batch_file(&path).unwrap();
    assert_eq!(s.len(), 4);
    assert_eq!(s.labels, vec![3, 9, 0, 5]);
    assert_eq!(s.images.len(), 4 * IMAGE_BYTES);
    // Image 2, green plane (c = 1), row 4, column 10.
    assert_eq!(s.image(2)[1024 + 4 * 32 + 10], 2 + 3 + 20 + 70);
    // Image 3, blue plane, last pixel.
    assert_eq!(s.image(3)[3071], ((3 + 6 + 5 * 31 + 7 * 31) % 256) as u8);
    for i in 0..4 {
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let want = ((i + 3 * c + 5 * y + 7 * x) % 256) as u8;
                    assert_eq!(s.image(i)[c * 1024 + y * 32 + x], want);
                }
            }
        }
    }
}

#[test]
fn whole_directory_in_file_order_and_train_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = common::write_dataset(dir.path(), 7, 5);
    let d = load_cifar10(dir.path(), None).unwrap();
    assert_eq!(d.train, train);
    assert_eq!(d.test, test);
    assert_eq!(d.train.len(), 35);
    let d = load_cifar10(dir.path(), Some(10)).unwrap();
    assert_eq!(d.train.len(), 10);
    assert_eq!(d.train.images[..], train.images[..10 * IMAGE_BYTES]);
    assert_eq!(d.train.labels[..], train.labels[..10]);
    assert_eq!(d.test, test);
}

#[test]
fn truncated_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    common::write_dataset(dir.path(), 3, 2);
    let p = dir.path().join(TRAIN_FILES[2]);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let err = format!("{:#}", load_cifar10(dir.path(), None).unwrap_err());
    assert!(err.contains("data_batch_3.bin"), "{err}");
    assert!(err.contains("truncated"), "{err}");
    assert!(err.contains("3073"), "{err}");
}

#[test]
fn bad_label_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    common::write_dataset(dir.path(), 3, 2);
    let p = dir.path().join(TEST_FILE);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[RECORD_BYTES] = 10; // label of record 1
    std::fs::write(&p, &bytes).unwrap();
    let err = format!("{:#}", load_cifar10(dir.path(), None).unwrap_err());
    assert!(err.contains("test_batch.bin"), "{err}");
    assert!(err.contains("record 1"), "{err}");
    assert!(err.contains("label 10"), "{err}");
}

#[test]
fn empty_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.bin");
    std::fs::write(&p, b"").unwrap();
    assert!(format!("{:#}", read_batch_file(&p).unwrap_err()).contains("empty"));
}

#[test]
fn missing_directory_names_the_files_and_how_to_get_them() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = format!("{:#}", load_cifar10(&missing, None).unwrap_err());
    for f in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        assert!(err.contains(f), "{f} not named in: {err}");
    }
    assert!(
        err.contains("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"),
        "{err}"
    );
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn missing_single_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    common::write_dataset(dir.path(), 2, 2);
    std::fs::remove_file(dir.path().join(TRAIN_FILES[4])).unwrap();
    let err = format!("{:#}", load_cifar10(dir.path(), None).unwrap_err());
    assert!(err.contains("missing file(s) data_batch_5.bin"), "{err}");
}

#[test]
fn truncate_split() {
    let mut s: Split = common::random_split(5, 1);
    let orig = s.clone();
    s.truncate(9);
    assert_eq!(s, orig);
    s.truncate(2);
    assert_eq!(s.len(), 2);
    assert_eq!(s.image(1), orig.image(1));
}

#[test]
fn errors_are_typed_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("short.bin");
    std::fs::write(&p, vec![0u8; RECORD_BYTES + 5]).unwrap();
    match read_batch_file(&p).unwrap_err() {
        Error::Truncated { path, len } => assert_eq!((path, len), (p, RECORD_BYTES + 5)),
        e => panic!("unexpected {e:?}"),
    }
    let e = read_batch_file(&dir.path().join("nope.bin")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with("reading ") && e.to_string().contains("nope.bin"),
        "{e}"
    );
}

#[test]
fn test_split_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (_, test) = common::write_dataset(dir.path(), 1, 6);
    assert_eq!(load_test(dir.path()).unwrap(), test);
    // Only the test file is needed.
    for f in TRAIN_FILES {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    assert_eq!(load_test(dir.path()).unwrap(), test);
    std::fs::remove_file(dir.path().join(TEST_FILE)).unwrap();
    let err = load_test(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Missing { files, .. } if files == &[TEST_FILE]),
        "{err:?}"
    );
    assert!(err.to_string().contains("cifar-10-binary.tar.gz"), "{err}");
    let err = load_test(&dir.path().join("nope")).unwrap_err();
    assert!(
        matches!(&err, Error::Missing { files, .. } if files.is_empty()),
        "{err:?}"
    );
}

#[test]
fn bytes_parse_exactly_like_the_file_and_name_the_source() {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let n = rng.gen_range(1..6);
    let split = Split {
        images: (0..n * IMAGE_BYTES).map(|_| rng.gen()).collect(),
        labels: (0..n).map(|_| rng.gen_range(0..10)).collect(),
    };
    let bytes = cifar::encode_records(&split);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bin");
    std::fs::write(&path, &bytes).unwrap();
    let source = std::path::Path::new("in-memory batch");
    assert_eq!(read_batch_bytes(&bytes, source).unwrap(), split);
    assert_eq!(read_batch_file(&path).unwrap(), split);
    // The same errors, naming the given source.
    let err = |b: &[u8]| read_batch_bytes(b, source).unwrap_err().to_string();
    assert!(err(&[]).contains("in-memory batch is empty"), "{}", err(&[]));
    let short = err(&bytes[..bytes.len() - 1]);
    assert!(short.contains("in-memory batch is truncated"), "{short}");
    let mut bad = bytes.clone();
    bad[(n - 1) * RECORD_BYTES] = 10 + rng.gen_range(0..246) as u8;
    let label = err(&bad);
    assert!(label.contains(&format!("record {}", n - 1)), "{label}");
}
