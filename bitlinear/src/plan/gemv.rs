//! The decode GEMV (`kernels/gemv.cu`, `M = 1`): lanes per weight row, chunks per lane, blocks,
//! and whether `x` comes by a bulk copy and the first weights before `pdl_wait`. The measurements
//! behind each rule are in bench/RESULTS.md, "Launch rules and the measurements behind them".

use super::{DeviceInfo, ForcedChoices};

/// Warps per block of the decode GEMV kernel (`GV_WARPS` in `kernels/gemv.cu`).
pub const GEMV_WARPS: usize = 16;

/// Largest `K` of the decode GEMV (one 16-k group of x a thread, at most 32 lanes x 4 chunks of
/// 64 k a weight row).
pub const GEMV_MAX_K: usize = 8192;

/// (lanes per row, chunks per lane and row) pairs instantiated by `kernels/gemv.cu` (`GV_MRS`;
/// `tests/kernel_sources.rs` checks the two agree).
pub const GEMV_SHAPES: [(usize, usize); 11] = [
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

/// Launch of the decode GEMV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvPlan {
    /// Lanes per weight row (8, 16 or 32).
    pub lanes: usize,
    /// 16-byte chunks per lane and row: `ceil(K / 64 / lanes)`.
    pub chunks: usize,
    /// Blocks of [`GEMV_WARPS`] warps, at most one an SM.
    pub blocks: usize,
    /// Rows of every warp; the first `rows_rem` warps take one more.
    pub rows_base: usize,
    /// Warps with one row more than `rows_base`.
    pub rows_rem: usize,
    /// `x` by one bulk copy into shared memory (the `_bx` kernels) rather than the threads' loads.
    pub bulk_x: bool,
    /// The first chunk slot of the (settled) weights requested before `pdl_wait` (the `_e`
    /// kernels).
    pub early_weights: bool,
    /// Dynamic shared memory: the permuted codes of `x`, then (`bulk_x`) `x` itself.
    pub smem_bytes: usize,
}

impl GemvPlan {
    /// The kernel for `x` and output dtype suffixes (`i8`/`f32`/`bf16`/`f16`, `i32`/...).
    pub fn kernel_name(&self, x: &str, out: &str) -> String {
        let bx = if self.bulk_x { "_bx" } else { "" };
        let e = if self.early_weights { "_e" } else { "" };
        format!("gemv_{x}_{out}_l{}_t{}{bx}{e}", self.lanes, self.chunks)
    }

    /// The input-norm kernel of this plan for float `x` (`f32`/`bf16`/`f16`, the output's too)
    /// and norm suffix `norm` (`an`: add + RMSNorm, `rn`: squared-ReLU gate + RMSNorm); the plan
    /// comes from [`super::plan_normed_gemv`] (no bulk copy of `x`).
    pub fn normed_kernel_name(&self, x: &str, norm: &str) -> String {
        let e = if self.early_weights { "_e" } else { "" };
        format!("gemv_{x}_{x}_l{}_t{}_{norm}{e}", self.lanes, self.chunks)
    }
}

/// The decode GEMV with an input norm (the `_an` / `_rn` kernels of `kernels/gemv.cu`): as
/// [`gemv_plan`] for float `x`, with `x` loaded by its threads (the norm's operands come with it;
/// no bulk copy).
pub(super) fn normed_gemv_plan(
    n: usize,
    k: usize,
    settled: bool,
    info: &DeviceInfo,
    force: &ForcedChoices,
) -> GemvPlan {
    let force = ForcedChoices {
        gemv_bulk_x: Some(false),
        ..force.clone()
    };
    gemv_plan(n, k, (true, 0), settled, info, &force)
}

/// Whether the GEMV can take the problem: one row, `K % 64 == 0`, `0 < K <= 8192`, 16-byte
/// aligned weights, and `x` either int8 codes or of the output's dtype.
pub(super) fn gemv_fits(m: usize, k: usize, weight_align: usize, x_is_out_dtype_or_codes: bool) -> bool {
    m == 1 && k > 0 && k <= GEMV_MAX_K && k.is_multiple_of(64) && weight_align >= 16 && x_is_out_dtype_or_codes
}

/// The GEMV plan for `n` rows of `k` inputs; `float_x`: `x` is float (else int8 codes), of
/// `x_bytes` bytes an element; `settled`: the weights are known complete (and early weights are
/// on in the settings).
pub(super) fn gemv_plan(
    n: usize,
    k: usize,
    (float_x, x_bytes): (bool, usize),
    settled: bool,
    info: &DeviceInfo,
    force: &ForcedChoices,
) -> GemvPlan {
    let k4 = k / 4;
    let (lanes, chunks, blocks) = gemv_config(k4 / 16, n, info.sms, force.gemv_lanes);
    let warps = blocks * GEMV_WARPS;
    // A bulk copy of float x where the weights take long enough to stream that its longer
    // latency is hidden, and there only with 8 lanes a row or where every warp holds x (RESULTS,
    // "Rule: GEMV bulk copy of x"); int8 codes have no quantizer to wait for.
    let bulk_x = force
        .gemv_bulk_x
        .unwrap_or_else(|| float_x && large_weights(n, k4, blocks) && (lanes == 8 || x_warps(k) >= GEMV_WARPS));
    let early_weights = settled
        && float_x
        && force
            .gemv_early_weights
            .unwrap_or_else(|| gemv_early(bulk_x, (k, k4), lanes, n, blocks));
    GemvPlan {
        lanes,
        chunks,
        blocks,
        rows_base: n / warps,
        rows_rem: n % warps,
        bulk_x,
        early_weights,
        smem_bytes: k + if bulk_x { k * x_bytes } else { 0 },
    }
}

/// (lanes per row L, chunks per lane T = ceil(cpr / L), blocks) for `cpr` 16-byte chunks a row
/// and `n` rows. The rows are spread evenly over the warps, at most one block of `GEMV_WARPS`
/// warps an SM, each warp at most `min(8, 16 / T)` batches of `32 / L` rows (16 chunks a lane in
/// registers). The cost of a built (L, T) is its work per lane (T chunks times the batches of
/// the busiest warp) per busy SM, or past one block an SM times the waves of blocks. Among those
/// within 25% of the least cost, the fewest waves win (each wave quantizes x again and ramps up
/// again), then the fewest idle chunk slots (L * T - cpr), then the least cost, then more lanes:
/// the idle SMs of a cheaper-looking grid are not lost, since with programmatic dependent launch
/// the next call's blocks start on them (RESULTS, "Rule: GEMV lanes per row").
fn gemv_config(cpr: usize, n: usize, sms: usize, forced_lanes: Option<usize>) -> (usize, usize, usize) {
    let warps_for = |(l, t): (usize, usize)| {
        let rows_per_batch = 32 / l;
        let warps_min = n.div_ceil((16 / t).min(8) * rows_per_batch);
        warps_min.max(n.div_ceil(rows_per_batch).min(GEMV_WARPS * sms))
    };
    let shapes = GEMV_SHAPES.iter().copied().filter(|&(l, t)| cpr.div_ceil(l) == t);
    let forced = forced_lanes.and_then(|l| shapes.clone().find(|s| s.0 == l));
    let waves = |s: (usize, usize)| warps_for(s).div_ceil(GEMV_WARPS).div_ceil(sms);
    let cost = |(l, t): (usize, usize)| {
        let warps = warps_for((l, t));
        let lane_work = t * n.div_ceil(warps).div_ceil(32 / l);
        let blocks = warps.div_ceil(GEMV_WARPS);
        // past one block an SM the blocks run in waves, one after the other
        if blocks <= sms {
            lane_work * sms * 64 / blocks
        } else {
            lane_work * 64 * blocks.div_ceil(sms)
        }
    };
    let (l, t) = forced.unwrap_or_else(|| {
        let least = shapes.clone().map(cost).min().unwrap_or(0);
        shapes
            .filter(|&s| 4 * cost(s) <= 5 * least)
            .min_by_key(|&(l, t)| (waves((l, t)), l * t - cpr, cost((l, t)), usize::MAX - l))
            .unwrap_or((32, cpr.div_ceil(32)))
    });
    (l, t, warps_for((l, t)).div_ceil(GEMV_WARPS))
}

/// Packed weight bytes per GEMV block from which the weights count as large: they take long
/// enough to stream that a bulk copy of `x` can pay, and that early weights pay with either load
/// of `x`.
const GEMV_LARGE_BYTES_PER_BLOCK: usize = 48 * 1024;

/// Whether `n` rows of `k4` packed bytes over `blocks` blocks are large weights (above).
fn large_weights(n: usize, k4: usize, blocks: usize) -> bool {
    n * k4 >= GEMV_LARGE_BYTES_PER_BLOCK * blocks
}

/// Warps of the GEMV that hold a 16-k group of x each (one group a thread, 32 a warp).
fn x_warps(k: usize) -> usize {
    k.div_ceil(16).div_ceil(32)
}

/// Whether the GEMV requests the first chunk slot of its settled weights before `pdl_wait`
/// (float x): with the bulk copy of x only where every warp holds x; with the threads' own loads
/// of x where fewer than half of the warps hold x (the others request weights early, and the x
/// warps' loads are not queued behind much), where the weights are large, or where the work is
/// uneven (the SMs that finish first start the next call's weights). RESULTS, "Rule: GEMV
/// early weights".
fn gemv_early(bulk_x: bool, (k, k4): (usize, usize), lanes: usize, n: usize, blocks: usize) -> bool {
    let x_warps = x_warps(k);
    if bulk_x {
        x_warps >= GEMV_WARPS
    } else {
        2 * x_warps < GEMV_WARPS || large_weights(n, k4, blocks) || uneven_work(lanes, n, blocks)
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

    fn h100() -> DeviceInfo {
        DeviceInfo::sm90(132)
    }

    fn plan(n: usize, k: usize, float_x: bool, settled: bool) -> GemvPlan {
        gemv_plan(n, k, (float_x, 2), settled, &h100(), &ForcedChoices::default())
    }

    /// Every K the GEMV takes (K % 64 == 0, K <= 8192) and a spread of N: the chosen kernel
    /// exists, covers the row (T = ceil(cpr / L)), and no warp gets more rows than it holds
    /// (rows past `min(8, 16 / T) * 32 / L` would be silently dropped by the kernel).
    #[test]
    fn every_shape_fits_its_kernel() {
        for sms in [1, 7, 132] {
            for cpr in 1..=128 {
                for n in [1, 2, 3, 15, 16, 17, 100, 511, 2560, 4096, 13824, 50_001, 1_000_000] {
                    for forced in [None, Some(8), Some(16), Some(32)] {
                        let (l, t, blocks) = gemv_config(cpr, n, sms, forced);
                        assert!(GEMV_SHAPES.contains(&(l, t)), "cpr {cpr} n {n}: ({l}, {t}) not built");
                        assert_eq!(t, cpr.div_ceil(l), "cpr {cpr} n {n}");
                        let holds = (16 / t).min(8) * (32 / l);
                        let busiest = n.div_ceil(blocks * GEMV_WARPS);
                        assert!(
                            busiest <= holds,
                            "cpr {cpr} n {n} sms {sms}: {busiest} rows, holds {holds}"
                        );
                        assert!(blocks >= 1);
                    }
                }
            }
        }
    }

    /// The choices measured fastest on the H100 (RESULTS, "Rule: GEMV lanes per row").
    #[test]
    fn benchmark_shapes_take_the_measured_best() {
        let pick = |n: usize, k: usize| {
            let p = plan(n, k, true, false);
            (p.lanes, p.chunks)
        };
        assert_eq!(pick(13824, 2560), (8, 5));
        assert_eq!(pick(2560, 2560), (16, 3));
        assert_eq!(pick(3072, 3072), (16, 3));
        assert_eq!(pick(6912, 2560), (8, 5));
        assert_eq!(pick(4096, 4096), (32, 2));
        assert_eq!(pick(2560, 6912), (32, 4));
        assert_eq!(pick(2048, 2048), (32, 1));
        assert_eq!(pick(8192, 3072), (16, 3));
        // past one block an SM: waves count (RESULTS, "Rule: GEMV lanes per row")
        assert_eq!(pick(17408, 2048), (8, 4));
        assert_eq!(pick(32768, 2048), (8, 4));
        assert_eq!(plan(32768, 2048, true, false).blocks, 132);
        assert_eq!(pick(27648, 2560), (8, 5));
    }

    /// Early weights where they were measured faster (RESULTS, "Rule: GEMV early weights"), for
    /// settled weights and float x only.
    #[test]
    fn early_weights_where_they_were_measured_faster() {
        for (n, k) in [
            (2048, 2048),
            (2560, 2560),
            (3072, 3072),
            (5632, 2048),
            (6912, 2560),
            (8192, 3072),
            (2560, 6912),
            // at least 48 KB of weights a block
            (5120, 5120),
            (11008, 4096),
            (14336, 4096),
            (6144, 5120),
            (13824, 5120),
            // the bulk copy of x, every warp holding x
            (4096, 8192),
        ] {
            assert!(plan(n, k, true, true).early_weights, "{n} x {k}");
        }
        for (n, k) in [(4096, 4096), (3072, 8192), (2048, 5632), (13824, 2560)] {
            assert!(!plan(n, k, true, true).early_weights, "{n} x {k}");
        }
        for (n, k) in [(2560, 2560), (2560, 6912)] {
            assert!(!plan(n, k, true, false).early_weights, "not settled");
            assert!(!plan(n, k, false, true).early_weights, "int8 codes: no early kernels");
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

    /// The bulk copy of x where it was measured faster (RESULTS, "Rule: GEMV bulk copy of x"):
    /// float x at 13824 x 2560 (8 lanes) and 4096 x 8192 (every warp holds x); never for int8
    /// codes.
    #[test]
    fn bulk_x_where_it_was_measured_faster() {
        assert!(plan(13824, 2560, true, false).bulk_x);
        assert!(plan(4096, 8192, true, false).bulk_x);
        assert!(!plan(13824, 2560, false, false).bulk_x);
        for (n, k) in [
            (2560, 2560),
            (4096, 4096),
            (2560, 6912),
            (5120, 5120),
            (11008, 4096),
            (14336, 4096),
            (3072, 8192),
        ] {
            assert!(!plan(n, k, true, false).bulk_x, "{n} x {k}");
        }
    }

    /// Forced choices override the rules: lanes where built, bulk x, early weights only with
    /// settled weights and float x; the row split and shared memory follow.
    #[test]
    fn forced_choices_hold() {
        let force = ForcedChoices {
            gemv_lanes: Some(32),
            gemv_bulk_x: Some(true),
            gemv_early_weights: Some(true),
            ..Default::default()
        };
        let p = gemv_plan(13824, 2560, (true, 2), true, &h100(), &force);
        assert_eq!((p.lanes, p.chunks, p.bulk_x, p.early_weights), (32, 2, true, true));
        assert_eq!(p.smem_bytes, 2560 * 3);
        assert_eq!(p.rows_base * p.blocks * GEMV_WARPS + p.rows_rem, 13824);
        let p = gemv_plan(13824, 2560, (true, 2), false, &h100(), &force);
        assert!(!p.early_weights, "early weights need settled weights");
        // 8 lanes are not built for 64 chunks a row (8 a lane): the rule's choice stands
        let force = ForcedChoices {
            gemv_lanes: Some(8),
            ..Default::default()
        };
        assert_eq!(gemv_plan(4096, 4096, (true, 2), false, &h100(), &force).lanes, 32);
    }

    /// The input-norm kernels load x with their threads: never the bulk copy, shared memory for
    /// the codes alone, the rows split as the plain GEMV splits them; named with the norm.
    #[test]
    fn normed_plan_has_no_bulk_copy() {
        for (n, k) in [(3840, 2560), (13824, 2560), (2560, 6912), (64, 8192), (5, 64)] {
            for settled in [false, true] {
                let p = normed_gemv_plan(n, k, settled, &h100(), &ForcedChoices::default());
                let plain = plan(n, k, true, settled);
                assert!(!p.bulk_x, "{n} x {k}");
                assert_eq!(p.smem_bytes, k, "{n} x {k}");
                assert_eq!((p.lanes, p.chunks, p.blocks), (plain.lanes, plain.chunks, plain.blocks));
                let e = if p.early_weights { "_e" } else { "" };
                let want = format!("gemv_bf16_bf16_l{}_t{}_an{e}", p.lanes, p.chunks);
                assert_eq!(p.normed_kernel_name("bf16", "an"), want);
            }
        }
    }
}
