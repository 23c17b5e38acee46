use super::*;

fn sample() -> Writer {
    let mut w = Writer::new();
    w.metadata("general.architecture", Value::String("bitnet".into()))
        .metadata("general.alignment", Value::U32(64))
        .metadata("x.list", Value::Array(4, vec![Value::U32(1), Value::U32(7)]))
        .metadata("x.f", Value::F32(0.25))
        .metadata("x.b", Value::Bool(true))
        .tensor(
            "a",
            vec![3],
            GgmlType::F32,
            [1f32, 2., 3.].iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
        .tensor("t", vec![256, 2], GgmlType::TQ2_0, vec![0x55; 132]);
    w
}

#[test]
fn writes_and_reads_back() {
    let bytes = sample().to_bytes().unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_offset % 64, 0);
    assert_eq!(g.get("general.architecture"), Some(&Value::String("bitnet".into())));
    assert_eq!(
        g.get("x.list"),
        Some(&Value::Array(4, vec![Value::U32(1), Value::U32(7)]))
    );
    assert_eq!(g.get("x.b"), Some(&Value::Bool(true)));
    let a = g.tensor("a").unwrap();
    let want: Vec<u8> = [1f32, 2., 3.].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(g.data(&bytes, a).unwrap(), &want[..]);
    let t = g.tensor("t").unwrap();
    assert_eq!((t.dims.clone(), t.type_id, t.offset), (vec![256, 2], 35, 64));
    assert_eq!(g.data(&bytes, t).unwrap(), &[0x55; 132][..]);
    assert_eq!(bytes.len() as u64 % 64, 0);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample().to_bytes().unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    let end = g.data_offset as usize + 64 + 132;
    for cut in 0..end {
        assert!(Gguf::parse(&bytes[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn rejects_hostile_headers() {
    let bytes = sample().to_bytes().unwrap();
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(Gguf::parse(&bad).unwrap_err().to_string().contains("magic"));
    let mut bad = bytes.clone();
    bad[4] = 9;
    assert!(Gguf::parse(&bad).unwrap_err().to_string().contains("version"));
    // A tensor count of 2^60 must not allocate.
    let mut bad = bytes.clone();
    bad[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(Gguf::parse(&bad).is_err());
    // A huge string length.
    let mut bad = bytes.clone();
    bad[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(Gguf::parse(&bad).is_err());
}

#[test]
fn writer_rejects_inconsistent_input() {
    let mut w = sample();
    w.tensor("a", vec![1], GgmlType::F32, vec![0; 4]);
    assert!(w.to_bytes().unwrap_err().to_string().contains("repeated"));
    let mut w = Writer::new();
    w.tensor("t", vec![255, 1], GgmlType::TQ2_0, vec![0; 66]);
    assert!(w.to_bytes().is_err());
    let mut w = Writer::new();
    w.tensor("f", vec![2], GgmlType::F16, vec![0; 3]);
    assert!(w.to_bytes().is_err());
    let mut w = Writer::new();
    w.metadata("l", Value::Array(4, vec![Value::U8(1)]));
    assert!(w.to_bytes().is_err());
}

#[test]
fn rejects_repeated_names() {
    // Rename tensor "t" to "a" (same length) in the written bytes: two tensors named "a".
    let mut bytes = sample().to_bytes().unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    let pos = (0..g.data_offset as usize)
        .find(|&i| bytes[i..i + 9] == [1, 0, 0, 0, 0, 0, 0, 0, b't'])
        .unwrap();
    bytes[pos + 8] = b'a';
    assert!(Gguf::parse(&bytes)
        .unwrap_err()
        .to_string()
        .contains("tensor \"a\" is repeated"));
    // The same for a metadata key: "x.f" -> "x.b".
    let mut bytes = sample().to_bytes().unwrap();
    let pos = (0..bytes.len() - 3).find(|&i| &bytes[i..i + 3] == b"x.f").unwrap();
    bytes[pos + 2] = b'b';
    assert!(Gguf::parse(&bytes)
        .unwrap_err()
        .to_string()
        .contains("\"x.b\" is repeated"));
}

/// Found by the `gguf` fuzz target: an F32/F16/BF16 first dimension near 2^64 overflowed the
/// byte count of its first row (a panic with overflow checks, a wrong size without).
#[test]
fn data_len_of_a_huge_first_row_is_an_error() {
    for (ty, ne0) in [
        (GgmlType::F32, 1u64 << 62),
        (GgmlType::F16, 1 << 63),
        (GgmlType::BF16, 1 << 63),
    ] {
        let e = ty.data_len(&[ne0]).unwrap_err().to_string();
        assert!(e.contains("overflow"), "{e}");
        assert!(ty.data_len(&[ne0, 1]).is_err());
        assert_eq!(ty.data_len(&[ne0 / 2]).unwrap(), 1 << 63);
    }
    // Block types: the most blocks a u64 of elements holds fit, times 256 rows not.
    for ty in [GgmlType::TQ2_0, GgmlType::TQ1_0] {
        let blocks = (1u64 << 56) - 1;
        assert_eq!(ty.data_len(&[blocks * 256]).unwrap(), blocks * ty.block().1);
        assert!(ty.data_len(&[blocks * 256, 1 << 8]).is_err());
    }
    // The writer checks a tensor's size with it: an error, not a panic.
    let mut w = Writer::new();
    w.tensor("w", vec![1 << 62, 1], GgmlType::F32, vec![0; 4]);
    assert!(w.to_bytes().is_err());
}
