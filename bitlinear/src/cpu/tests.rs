//! Every kernel this CPU runs against a plain reference, exactly.

use super::*;

fn naive(xq: &[i8], w: &[i8], m: usize, n: usize, k: usize) -> Vec<i32> {
    let mut out = vec![0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|t| xq[i * k + t] as i32 * w[j * k + t] as i32).sum();
        }
    }
    out
}

/// The kernels this machine can run; the others are named on stderr as skipped.
fn kernels() -> Vec<CpuKernel> {
    let (run, skip): (Vec<_>, Vec<_>) = CpuKernel::ALL.into_iter().partition(|k| k.is_supported());
    eprintln!("CPU kernels tested: {run:?}; skipped (not supported here): {skip:?}");
    run
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn every_kernel_agrees_with_naive() {
    let mut rng = XorShift(0x1234_5678 ^ std::process::id() as u64);
    // k = 2100 and 4100: more than 8 blocks, so the AVX2 two-row kernel widens its i16 sums;
    // m = 5..7: every remainder of the four-row VNNI calls; n not a multiple of ROWS.
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (2, 9, 130),
        (5, 17, 257),
        (1, 33, 512),
        (6, 9, 2100),
        (7, 6, 4100),
        (33, 130, 300),
        (1, 600, 1024),
    ];
    for kernel in kernels() {
        for &(m, n, k) in &shapes {
            let xq: Vec<i8> = (0..m * k).map(|_| rng.next() as i8).collect();
            let w: Vec<i8> = (0..n * k).map(|_| (rng.next() % 3) as i8 - 1).collect();
            let packed = crate::packed::pack_ternary(&w, n, k).unwrap();
            let prep = PreparedActivations::new(kernel, &xq, m, k);
            assert_eq!(
                packed_accumulate(&prep, &packed, n, k),
                naive(&xq, &w, m, n, k),
                "{kernel:?} {m}x{n}x{k}"
            );
        }
    }
}

/// Each kernel's single call against the portable one, for every row count it takes.
#[test]
fn every_row_count_of_every_kernel() {
    let mut rng = XorShift(0x9e37_79b9 ^ std::process::id() as u64);
    let k = 1000;
    for kernel in kernels() {
        let xq: Vec<i8> = (0..kernel::MAX_X_ROWS * k).map(|_| rng.next() as i8).collect();
        let prep = PreparedActivations::new(kernel, &xq, kernel::MAX_X_ROWS, k);
        let padded = prep.row_len() / 4;
        let w: Vec<u8> = (0..ROWS * padded).map(|_| rng.next() as u8).collect();
        for rows in 1..=kernel.rows_per_call() {
            let mut got = [[0; ROWS]; kernel::MAX_X_ROWS];
            kernel.dot(&w, padded, &prep.data, prep.row_len(), rows, &mut got);
            for (i, g) in got.iter().enumerate().take(rows) {
                // byte value 3 is not a ternary code, but every kernel must still agree
                let want = portable::dot_rows(&w, padded, prep.row(i), kernel.block_bytes());
                assert_eq!(*g, want, "{kernel:?}, {rows} rows, row {i}");
            }
        }
    }
}

/// The extremes of the partial sums: every code 2 (w = +1) against all -128 or all +127, over
/// many blocks.
#[test]
fn extremes() {
    let (m, n, k) = (5, 5, 8 * 128 * 3 + 5);
    let w = vec![1i8; n * k];
    let packed = crate::packed::pack_ternary(&w, n, k).unwrap();
    for kernel in kernels() {
        for v in [-128i8, 127] {
            let xq = vec![v; m * k];
            let prep = PreparedActivations::new(kernel, &xq, m, k);
            assert_eq!(
                packed_accumulate(&prep, &packed, n, k),
                vec![v as i32 * k as i32; m * n],
                "{kernel:?}"
            );
        }
    }
}

/// The scratch buffer is reused: a second, smaller call sees no stale codes.
#[test]
fn reused_scratch_is_clean() {
    let kernel = CpuKernel::detect();
    let big: Vec<i8> = (0..4 * 700).map(|i| (i % 251) as i8).collect();
    drop(PreparedActivations::new(kernel, &big, 4, 700));
    let xq = vec![1i8; 3];
    let w = vec![1i8, -1, 1];
    let packed = crate::packed::pack_ternary(&w, 1, 3).unwrap();
    let prep = PreparedActivations::new(kernel, &xq, 1, 3);
    assert_eq!(packed_accumulate(&prep, &packed, 1, 3), vec![1]);
}
