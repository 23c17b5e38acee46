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

/// The product read from the plain bytes and from the layout the kernel takes (a fresh cache,
/// so the conversion runs), asserted equal.
fn accumulate(prep: &PreparedActivations, packed: &[u8], n: usize, k: usize) -> Vec<i32> {
    let plain = packed_accumulate(prep, Weights::Plain(packed), n, k);
    let layouts = CpuLayouts::default();
    let cached = packed_accumulate(prep, layouts.get(prep.kernel, packed, n, k), n, k);
    assert_eq!(plain, cached, "{:?}: plain and cached layouts differ", prep.kernel);
    plain
}

/// A small seeded generator for the CPU kernel tests (this module's and `prepare`'s).
pub(super) struct XorShift(pub(super) u64);
impl XorShift {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    pub(super) fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

#[test]
fn every_kernel_agrees_with_naive() {
    let mut rng = XorShift(0x1234_5678 ^ std::process::id() as u64);
    // k = 2100 and 4100: more than 8 blocks, so the AVX2 two-row kernel widens its i16 sums;
    // m = 5..7: every remainder of the four-row VNNI calls; n not a multiple of ROWS.
    let shapes = [
        (1, 1, 1),
        (3, 5, 0),
        (3, 5, 7),
        (2, 9, 130),
        (5, 17, 257),
        (1, 33, 512),
        (6, 9, 2100),
        (7, 6, 4100),
        (33, 130, 300),
        (1, 600, 1024),
        // weights over SMALL_WEIGHT_BYTES and m >= M_TILE: 32-row tasks, the last rows in 8-row
        // ones (TaskSplit), the last of those short
        (40, 1030, 1100),
    ];
    for kernel in kernels() {
        for &(m, n, k) in &shapes {
            let xq: Vec<i8> = (0..m * k).map(|_| rng.next() as i8).collect();
            let w: Vec<i8> = (0..n * k).map(|_| (rng.next() % 3) as i8 - 1).collect();
            let packed = crate::packed::pack_ternary(&w, n, k).unwrap();
            let prep = PreparedActivations::new(kernel, &xq, m, k);
            assert_eq!(
                accumulate(&prep, &packed, n, k),
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
            let s = Strides {
                row: padded,
                block: kernel.block_bytes(),
            };
            kernel.dot(&w, s, prep.blocks, &prep.data, prep.row_len(), rows, &mut got);
            for (i, g) in got.iter().enumerate().take(rows) {
                // byte value 3 is not a ternary code, but every kernel must still agree
                let want = portable::dot_rows(&w, s, prep.blocks, prep.row(i), kernel.block_bytes());
                assert_eq!(*g, want, "{kernel:?}, {rows} rows, row {i}");
            }
        }
    }
}

/// The extremes of the partial sums: every code 2 (w = +1) against all -128 or all +127, over
/// many blocks, for one activation row (the one-row kernels) and several.
#[test]
fn extremes() {
    let (n, k) = (5, 8 * 128 * 3 + 5);
    let w = vec![1i8; n * k];
    let packed = crate::packed::pack_ternary(&w, n, k).unwrap();
    for kernel in kernels() {
        for (m, v) in [1, 5].into_iter().flat_map(|m| [(m, -128i8), (m, 127)]) {
            let xq = vec![v; m * k];
            let prep = PreparedActivations::new(kernel, &xq, m, k);
            assert_eq!(
                accumulate(&prep, &packed, n, k),
                vec![v as i32 * k as i32; m * n],
                "{kernel:?} {m} rows of {v}"
            );
        }
    }
}

/// The one-row VNNI kernels' accumulators at their largest: every byte 0xFF (the non-code 3 in
/// every plane) against all -128, over as many blocks as they take and one more (where the
/// general kernel runs), against the portable kernel.
#[cfg(target_arch = "x86_64")]
#[test]
fn one_row_kernels_at_their_block_limit() {
    for kernel in kernels() {
        for blocks in [super::vnni::MASKED_MAX_BLOCKS, super::vnni::MASKED_MAX_BLOCKS + 1] {
            let bb = kernel.block_bytes();
            let x = vec![-128i8; blocks * 4 * bb];
            let w = vec![0xffu8; ROWS * blocks * bb];
            let s = Strides {
                row: blocks * bb,
                block: bb,
            };
            let mut got = [[0; ROWS]; kernel::MAX_X_ROWS];
            kernel.dot(&w, s, blocks, &x, x.len(), 1, &mut got);
            let want = portable::dot_rows(&w, s, blocks, &x, bb);
            assert_eq!(got[0], want, "{kernel:?}, {blocks} blocks");
            assert_eq!(want[0], -3 * 128 * (blocks * 4 * bb) as i32);
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
    assert_eq!(accumulate(&prep, &packed, 1, 3), vec![1]);
}

/// The grouped layout against its definition, for awkward shapes: N not a multiple of ROWS,
/// K not a multiple of 4 or of a block, K = 0, N = 0.
#[test]
fn grouped_layout_places_every_byte() {
    let mut rng = XorShift(0x5151_7272 ^ std::process::id() as u64);
    for bb in [32, 64] {
        for (n, k) in [
            (1usize, 1usize),
            (3, 5),
            (4, 128),
            (5, 129),
            (7, 255),
            (9, 257),
            (6, 1000),
            (2, 0),
            (0, 9),
        ] {
            let k4 = k.div_ceil(4);
            let packed: Vec<u8> = (0..n * k4).map(|_| rng.next() as u8).collect();
            let got = layout::group(&packed, n, k, bb);
            let padded = layout::padded_row(k, bb);
            assert_eq!(got.len(), n.div_ceil(ROWS) * ROWS * padded, "{n}x{k} at {bb}");
            for row in 0..n.div_ceil(ROWS) * ROWS {
                for j in 0..padded {
                    let (g, r, b, i) = (row / ROWS, row % ROWS, j / bb, j % bb);
                    let want = if row < n && j < k4 { packed[row * k4 + j] } else { 0 };
                    let at = g * ROWS * padded + (b * ROWS + r) * bb + i;
                    assert_eq!(got[at], want, "{n}x{k} at {bb}: row {row}, byte {j}");
                }
            }
        }
    }
}

/// The cache converts once: a second request returns the same bytes, and the portable kernel
/// reads the plain bytes.
#[test]
fn layouts_are_cached() {
    let packed: Vec<u8> = (0..5 * 30).map(|i| i as u8).collect();
    let layouts = CpuLayouts::default();
    for kernel in kernels() {
        let (a, b) = (
            layouts.get(kernel, &packed, 5, 120),
            layouts.get(kernel, &packed, 5, 120),
        );
        match (a, b) {
            (Weights::Grouped(a), Weights::Grouped(b)) => assert_eq!(a.as_ptr(), b.as_ptr(), "{kernel:?}"),
            (Weights::Plain(a), Weights::Plain(_)) => {
                assert_eq!(kernel, CpuKernel::Portable);
                assert_eq!(a.as_ptr(), packed.as_ptr());
            }
            _ => panic!("{kernel:?}: the layout changed between calls"),
        }
    }
}

/// `run_shared` runs every task exactly once and returns only when all are done: from outside
/// the pool and from inside it (two calls at once), with many tasks or a few (helpers that wake
/// after the tasks ran out must leave without running one), repeated so that helpers arrive at
/// every point of a call.
#[test]
fn run_shared_runs_every_task_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let check = |tasks: usize| {
        let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
        super::run_shared(tasks, &|t| {
            counts[t].fetch_add(1, Ordering::Relaxed);
        });
        for (t, c) in counts.iter().enumerate() {
            assert_eq!(c.load(Ordering::Relaxed), 1, "task {t} of {tasks}");
        }
    };
    for tasks in [0, 1, 2, 3, 17, 1000] {
        for _ in 0..300 {
            check(tasks);
        }
        rayon::join(|| check(tasks), || check(tasks));
    }
}

/// `in_pool` moves a call of `POOL_MACS` or more from outside rayon's pool onto a pool worker,
/// and runs shorter calls, or calls made from a worker, where they are; it returns the result.
#[test]
fn in_pool_moves_only_long_calls_from_outside() {
    let here = || std::thread::current().id();
    let caller = here();
    assert_eq!(in_pool(POOL_MACS - 1, here), caller);
    assert!(in_pool(POOL_MACS, || rayon::current_thread_index().is_some()));
    assert_ne!(in_pool(POOL_MACS, here), caller);
    rayon::scope(|_| {
        let worker = here();
        assert_eq!(in_pool(POOL_MACS, here), worker);
    });
}

/// `TaskSplit` covers the rows once, in order: `big`-row tasks, then (with a tail) tasks of a
/// quarter of that, every task but the last a multiple of `ROWS`.
#[test]
fn task_split_covers_every_row_once() {
    for n in [1, 3, 4, 5, 63, 64, 65, 255, 256, 257, 1030, 4096, 4099] {
        for big in [4, 8, 16, 32, 64] {
            for tail in [false, true] {
                let split = TaskSplit::new(n, big, tail);
                let mut next = 0;
                for t in 0..split.tasks {
                    let (n0, rows) = split.rows(t);
                    assert_eq!(n0, next, "n {n} big {big} tail {tail}: task {t} starts at {n0}");
                    assert!(rows > 0 && rows <= big, "n {n} big {big}: task {t} has {rows} rows");
                    assert!(
                        n0 + rows == n || rows % ROWS == 0,
                        "n {n} big {big}: task {t} of {rows} rows"
                    );
                    next = n0 + rows;
                }
                assert_eq!(next, n, "n {n} big {big} tail {tail}: rows covered");
                if !tail {
                    assert_eq!(split.tasks, n.div_ceil(big), "n {n} big {big}: no tail, equal tasks");
                }
            }
        }
    }
}
