//! Launch shape of the CUDA decode GEMV (`kernels/gemv.cu`, M = 1): which (lanes per row,
//! chunks per lane) kernel, how many blocks, and whether x comes by a bulk copy. Plain host
//! arithmetic, kept out of the `cuda` module so that it is tested without a GPU.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// Warps per block of the decode GEMV kernel (`GV_WARPS` in `kernels/gemv.cu`).
pub(crate) const GEMV_WARPS: usize = 16;

/// (lanes per row, chunks per lane and row) pairs instantiated by `kernels/gemv.cu`.
pub(crate) const GEMV_SHAPES: [(usize, usize); 11] = [
    (8, 2),
    (8, 3),
    (8, 4),
    (8, 5),
    (16, 3),
    (16, 4),
    (16, 7),
    (32, 1),
    (32, 2),
    (32, 3),
    (32, 4),
];

/// Decode GEMV launch shape for `cpr` 16-byte chunks per weight row and `n` rows: (lanes per
/// row L, chunks per lane T = ceil(cpr / L), blocks). The rows are spread evenly over the warps,
/// at most one block of `GEMV_WARPS` warps per SM, each warp at most `min(8, 16 / T)` batches of
/// `32 / L` rows (16 chunks a lane in registers). The cost of a built (L, T) is its work per lane
/// (T chunks times the batches of the busiest warp) per busy SM (fewer lanes per row leave SMs
/// idle at small N). Among those within 25% of the least cost, the fewest idle chunk slots
/// (L * T - cpr) win, then the least cost, then more lanes: the idle SMs of a cheaper-looking
/// grid are not lost, since with programmatic dependent launch the next call's blocks start on
/// them. H100 (bench/RESULTS.md, ninth session): 2560^2 L = 16 3.28 us against L = 32 3.48 (the
/// cheapest), 3072^2 L = 16 3.35 against 3.53, 6912 x 2560 L = 8 4.10 against L = 16 4.17;
/// 2560 x 6912 keeps L = 32 (4.51 us; L = 16, 44% costlier, 5.3). 13824 x 2560 takes L = 8,
/// 4096^2 L = 32.
pub(crate) fn gemv_config(cpr: usize, n: usize, sms: usize) -> (usize, usize, usize) {
    let warps_for = |(l, t): (usize, usize)| {
        let rows_per_batch = 32 / l;
        let warps_min = n.div_ceil((16 / t).min(8) * rows_per_batch);
        warps_min.max(n.div_ceil(rows_per_batch).min(GEMV_WARPS * sms))
    };
    let shapes = GEMV_SHAPES.iter().copied().filter(|&(l, t)| cpr.div_ceil(l) == t);
    let forced = std::env::var("BITLINEAR_CUDA_GEMV_LANES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .and_then(|l| shapes.clone().find(|s| s.0 == l));
    let cost = |(l, t): (usize, usize)| {
        let warps = warps_for((l, t));
        let lane_work = t * n.div_ceil(warps).div_ceil(32 / l);
        lane_work * sms * 64 / warps.div_ceil(GEMV_WARPS)
    };
    let (l, t) = forced.unwrap_or_else(|| {
        let least = shapes.clone().map(cost).min().unwrap_or(0);
        shapes
            .filter(|&s| 4 * cost(s) <= 5 * least)
            .min_by_key(|&(l, t)| (l * t - cpr, cost((l, t)), usize::MAX - l))
            .expect("L = 32 covers cpr <= 128")
    });
    (l, t, warps_for((l, t)).div_ceil(GEMV_WARPS))
}

/// Packed weight bytes per GEMV block from which the weights count as large: they take long
/// enough to stream that a bulk copy of `x` can pay, and that early weights pay with either load
/// of `x` (`gemv_bulk_x`, `gemv_early`).
const GEMV_LARGE_BYTES_PER_BLOCK: usize = 48 * 1024;

/// Whether `n` rows of `k4` packed bytes over `blocks` blocks are large weights (above).
fn large_weights(n: usize, k4: usize, blocks: usize) -> bool {
    n * k4 >= GEMV_LARGE_BYTES_PER_BLOCK * blocks
}

/// Whether the decode GEMV loads `x` by one bulk copy (the `_bx` kernels) for `n` rows of `k4`
/// packed bytes over `blocks` blocks, `lanes` lanes a row and `k` inputs; `float_x` is false for
/// int8 codes. Only where the weights take long enough to stream that the copy's longer latency
/// is hidden (at least 48 KB a block; 4096^2 and 2560 x 6912, 32-34 KB a block, lose 0.35-0.55
/// us with it), and there only with 8 lanes a row or where every warp holds x (K >= 8192). H100
/// (bench/RESULTS.md, ninth session): 13824 x 2560 (8 lanes) 5.47 us against 5.71 without;
/// 4096 x 8192 5.60 against 5.94; but without it 5120^2 4.79 against 5.44 us, 11008 x 4096 5.94
/// against 6.76, 14336 x 4096 6.89 against 8.10, 27648 x 2560 11.39 against 12.46 (seven of 11
/// shapes of at least 48 KB a block faster without). int8 codes lose with it even at 13824 x
/// 2560 (5.11 -> 5.35 us): their x warps have no quantizer to wait for.
/// `BITLINEAR_CUDA_GEMV_BULK_X=0|1` overrides the choice.
pub(crate) fn gemv_bulk_x(float_x: bool, n: usize, k4: usize, blocks: usize, lanes: usize, k: usize) -> bool {
    match std::env::var("BITLINEAR_CUDA_GEMV_BULK_X").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => float_x && large_weights(n, k4, blocks) && (lanes == 8 || x_warps(k) >= GEMV_WARPS),
    }
}

/// Warps of the GEMV that hold a 16-k group of x each (one group a thread, 32 a warp).
fn x_warps(k: usize) -> usize {
    k.div_ceil(16).div_ceil(32)
}

/// Whether the decode GEMV requests the first chunk slot of its weights before `pdl_wait` (the
/// `_e` kernels, built for float x only), for `k` inputs, `k4` packed bytes a row and the launch
/// shape (`lanes`, `n` rows, `blocks`): where the weights are settled (`cuda/settle.rs`) and x
/// is float. With the bulk copy of x, only where every warp holds x (4096 x 8192: 5.60 against
/// 5.82 us; 13824 x 2560 5.77 against 5.47). With the threads' own loads of x: where fewer than
/// half of the 16 warps hold x (K < 4096: the others request weights early, and the x warps'
/// own loads are not queued behind much), where the weights are at least 48 KB a block (ninth
/// session: 11008 x 4096 5.94 against 6.37 us, 14336 x 4096 6.89 against 7.57, 6144 x 5120 5.03
/// against 5.17, 7168 x 4096 4.71 against 4.82; against the previous rules, bulk copy and late
/// weights, 8192 x 4096 5.36 -> 5.07), or where the work is uneven (the busiest warp has at
/// least 1.5x the mean row batches, so the SMs that finish first start the next call's weights).
/// H100, first chunk slot early against none, same run, default lanes (bench/RESULTS.md, eighth
/// session): 2048^2 2.89 -> 2.80 us, 2560^2 3.63 ->
/// 3.48, 3072^2 3.59 -> 3.55, 5632 x 2048 3.71 -> 3.52, 6912 x 2560 4.44 -> 4.18, 8192 x 3072
/// 4.81 -> 4.52, 2560 x 6912 (uneven) 4.63 -> 4.55; not taken: 4096^2 3.80 -> 4.01, 3072 x
/// 8192 5.56 -> 5.90, 2048 x 5632 3.79 -> 3.71 (either way within noise).
/// `BITLINEAR_CUDA_GEMV_EARLY=0|1` overrides the choice (1 still needs settled weights and
/// float x).
pub(crate) fn gemv_early(
    settled: bool,
    float_x: bool,
    bulk_x: bool,
    (k, k4): (usize, usize),
    lanes: usize,
    n: usize,
    blocks: usize,
) -> bool {
    if !(settled && float_x) {
        return false;
    }
    let x_warps = x_warps(k);
    match std::env::var("BITLINEAR_CUDA_GEMV_EARLY").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ if bulk_x => x_warps >= GEMV_WARPS,
        _ => 2 * x_warps < GEMV_WARPS || large_weights(n, k4, blocks) || uneven_work(lanes, n, blocks),
    }
}

/// Whether the busiest warp of the GEMV has at least 1.5x the mean number of row batches (`n`
/// rows spread evenly over the grid's warps as in the kernel, `32 / lanes` rows a batch).
fn uneven_work(lanes: usize, n: usize, blocks: usize) -> bool {
    let warps = blocks * GEMV_WARPS;
    let p = 32 / lanes;
    let (base, rem) = (n / warps, n % warps);
    let busiest = (base + usize::from(rem > 0)).div_ceil(p);
    let total = rem * (base + 1).div_ceil(p) + (warps - rem) * base.div_ceil(p);
    2 * busiest * warps >= 3 * total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of the busiest warp (the kernel spreads `n` rows evenly over `blocks * GEMV_WARPS`
    /// warps).
    fn busiest_warp_rows(n: usize, blocks: usize) -> usize {
        n.div_ceil(blocks * GEMV_WARPS)
    }

    /// Every K the GEMV takes (K % 64 == 0, K <= 8192) and a spread of N: the chosen kernel
    /// exists, covers the row (T = ceil(cpr / L)), and no warp gets more rows than it holds
    /// (rows past `min(8, 16 / T) * 32 / L` would be silently dropped by the kernel).
    #[test]
    fn every_shape_fits_its_kernel() {
        for sms in [1, 7, 132] {
            for cpr in 1..=128 {
                for n in [1, 2, 3, 15, 16, 17, 100, 511, 2560, 4096, 13824, 50_001, 1_000_000] {
                    let (l, t, blocks) = gemv_config(cpr, n, sms);
                    assert!(GEMV_SHAPES.contains(&(l, t)), "cpr {cpr} n {n}: ({l}, {t}) not built");
                    assert_eq!(t, cpr.div_ceil(l), "cpr {cpr} n {n}");
                    let holds = (16 / t).min(8) * (32 / l);
                    assert!(
                        busiest_warp_rows(n, blocks) <= holds,
                        "cpr {cpr} n {n} sms {sms}: {blocks} blocks leave {} rows for a warp that holds {holds}",
                        busiest_warp_rows(n, blocks)
                    );
                    assert!(blocks >= 1);
                }
            }
        }
    }

    /// The choices measured fastest on the H100 (bench/RESULTS.md, fourth and ninth sessions).
    #[test]
    fn benchmark_shapes_take_the_measured_best() {
        let pick = |n: usize, k: usize| {
            let (l, t, _) = gemv_config(k / 64, n, 132);
            (l, t)
        };
        assert_eq!(pick(13824, 2560), (8, 5));
        assert_eq!(pick(2560, 2560), (16, 3));
        assert_eq!(pick(3072, 3072), (16, 3));
        assert_eq!(pick(6912, 2560), (8, 5));
        assert_eq!(pick(4096, 4096), (32, 2));
        assert_eq!(pick(2560, 6912), (32, 4));
        assert_eq!(pick(2048, 2048), (32, 1));
        assert_eq!(pick(8192, 3072), (16, 3));
    }

    /// Early weights where they were measured faster on the H100 (bench/RESULTS.md, eighth
    /// session), for settled weights and float x only.
    #[test]
    fn early_weights_where_they_were_measured_faster() {
        let early = |settled: bool, float_x: bool, n: usize, k: usize| {
            let (l, _, blocks) = gemv_config(k / 64, n, 132);
            gemv_early(
                settled,
                float_x,
                gemv_bulk_x(float_x, n, k / 4, blocks, l, k),
                (k, k / 4),
                l,
                n,
                blocks,
            )
        };
        for (n, k) in [
            (2048, 2048),
            (2560, 2560),
            (3072, 3072),
            (5632, 2048),
            (6912, 2560),
            (8192, 3072),
            (2560, 6912),
            // at least 48 KB of weights a block (ninth session)
            (5120, 5120),
            (11008, 4096),
            (14336, 4096),
            (6144, 5120),
            (13824, 5120),
            // the bulk copy of x, every warp holding x
            (4096, 8192),
        ] {
            assert!(early(true, true, n, k), "{n} x {k}");
        }
        for (n, k) in [(4096, 4096), (3072, 8192), (2048, 5632), (13824, 2560)] {
            assert!(!early(true, true, n, k), "{n} x {k}");
        }
        for (n, k) in [(2560, 2560), (2560, 6912)] {
            assert!(!early(false, true, n, k), "not settled");
            assert!(!early(true, false, n, k), "int8 codes: no early kernels");
        }
    }

    /// Uneven work: 2560 rows over 2112 warps (448 with 2 rows, the rest 1) is; 4096 rows (1984
    /// with 2) is not; rows in batches of 4 (8 lanes) count batches, not rows.
    #[test]
    fn uneven_work_counts_row_batches() {
        assert!(uneven_work(32, 2560, 132));
        assert!(!uneven_work(32, 4096, 132));
        assert!(!uneven_work(32, 2112 * 3, 132));
        // 8 lanes: 6 or 7 rows a warp are both 2 batches
        assert!(!uneven_work(8, 13824, 132));
        // 8 lanes: 4 or 5 rows a warp, 1 or 2 batches
        assert!(uneven_work(8, 2112 * 4 + 500, 132));
        // one row for a few warps only: very uneven
        assert!(uneven_work(32, 2112 + 10, 132));
    }

    /// The bulk copy of x where it was measured faster on the H100 (bench/RESULTS.md, fifth
    /// and ninth sessions): float x at 13824 x 2560 (8 lanes) and 4096 x 8192 (every warp
    /// holds x); never for int8 codes.
    #[test]
    fn bulk_x_where_it_was_measured_faster() {
        let bulk = |float_x: bool, n: usize, k: usize| {
            let (l, _, blocks) = gemv_config(k / 64, n, 132);
            gemv_bulk_x(float_x, n, k / 4, blocks, l, k)
        };
        assert!(bulk(true, 13824, 2560));
        assert!(bulk(true, 4096, 8192));
        assert!(!bulk(false, 13824, 2560));
        for (n, k) in [
            (2560, 2560),
            (4096, 4096),
            (2560, 6912),
            (5120, 5120),
            (11008, 4096),
            (14336, 4096),
            (27648, 2560),
            (3072, 8192),
        ] {
            assert!(!bulk(true, n, k), "{n} x {k}");
        }
    }
}
