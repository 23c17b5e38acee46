//! The skinny kernel (`kernels/skinny.cu`, `2 <= M <= 32`, and `M = 1` off the GEMV): whether it
//! runs or the tiled GEMM, its rows per block, load width and shared memory, and whether it
//! quantizes `x` itself. The measurements behind each rule are in bench/RESULTS.md, "Launch
//! rules and the measurements behind them".

use super::{DeviceInfo, ForcedChoices};

/// Threads a block of the skinny kernel (`SK_THREADS` in `kernels/skinny.cu`).
pub const SKINNY_THREADS: usize = 256;
/// Largest `M` of the skinny kernel (4 MMA column tiles of 8 rows).
pub const SKINNY_MAX_M: usize = 32;
/// Largest dynamic shared memory the skinny kernel may use (two blocks an SM on the H100).
const SKINNY_MAX_SMEM: usize = 112 * 1024;

/// Launch of the skinny kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkinnyPlan {
    /// MMA column tiles of 8 rows of `x` (1, 2 or 4).
    pub col_tiles: usize,
    /// Weight bytes per load (16, 4 or 1).
    pub vec: usize,
    /// Weight rows per block (16 or 32).
    pub rows_per_block: usize,
    /// Blocks: `ceil(N / rows_per_block)`.
    pub blocks: usize,
    /// Dynamic shared memory: staged `x`, or the cross-warp partial sums, whichever is larger.
    pub smem_bytes: usize,
    /// The kernel quantizes float `x` itself; otherwise (float `x`) the activation quantizer
    /// kernel writes int8 codes first.
    pub fused_quant: bool,
    /// Weights requested before `pdl_wait` (they are settled, or the kernel before is this
    /// call's quantizer, which waited for everything before it).
    pub early_weights: bool,
}

impl SkinnyPlan {
    /// The kernel for the `x` it reads (`i8` codes, or the float suffix when fused) and the
    /// output suffix.
    pub fn kernel_name(&self, x: &str, out: &str) -> String {
        let n1 = if self.rows_per_block == 16 { "_n1" } else { "" };
        format!("skinny_{x}_{out}_m{}_v{}{n1}", self.col_tiles, self.vec)
    }
}

/// What the skinny planner needs of the problem.
pub(super) struct SkinnyInput {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub weight_align: usize,
    /// float `x` of the output's dtype, of this many bytes an element (fusable)
    pub fusable_x_bytes: Option<usize>,
    /// float `x` (quantized by a kernel first unless fused)
    pub float_x: bool,
    /// weights known complete, early weights on
    pub settled: bool,
    pub early_weights: bool,
}

/// The skinny plan, or `None` where it cannot run (`M > 32`, `x` too large for its shared
/// memory) or, unless `forced`, where the tiled GEMM is faster ([`gemm_for_small_m`]).
pub(super) fn skinny_plan(
    p: &SkinnyInput,
    info: &DeviceInfo,
    force: &ForcedChoices,
    forced: bool,
) -> Option<SkinnyPlan> {
    let SkinnyInput { m, n, k, .. } = *p;
    let k4 = k.div_ceil(4);
    let kb = k4.div_ceil(64);
    let row_stride = kb * 256 + 64;
    let col_tiles = match m {
        0..=8 => 1,
        9..=16 => 2,
        _ => 4,
    };
    let vec = if k4.is_multiple_of(16) && p.weight_align >= 16 {
        16
    } else if k4.is_multiple_of(4) && p.weight_align >= 4 {
        4
    } else {
        1
    };
    let rows_per_block = match force.skinny_rows {
        Some(16) if vec == 16 => 16,
        Some(_) => 32,
        None => skinny_rows_per_block(m, n, vec, info.sms),
    };
    let smem_bytes = (m * row_stride).max(256 * rows_per_block * col_tiles);
    let fits = smem_bytes <= SKINNY_MAX_SMEM.min(info.smem_optin.saturating_sub(2048));
    if m > SKINNY_MAX_M || !fits || !forced && gemm_for_small_m(m, n, k, info.sms, info.has_hopper_gemm()) {
        return None;
    }
    let blocks = n.div_ceil(rows_per_block);
    let fused_quant = p.fusable_x_bytes.is_some_and(|b| {
        force
            .skinny_fused_quant
            .unwrap_or_else(|| skinny_fuses(m, kb, m * k * b, blocks, info.sms))
    });
    let quantizer_first = p.float_x && !fused_quant;
    Some(SkinnyPlan {
        col_tiles,
        vec,
        rows_per_block,
        blocks,
        smem_bytes,
        fused_quant,
        early_weights: (p.settled || quantizer_first) && p.early_weights,
    })
}

/// Whether the tiled GEMM should take `m <= 32` rows of `k` inputs instead of the skinny kernel;
/// `hopper`: the Hopper GEMM can run. Every skinny block stages all of x, so its time grows with
/// M where N is large; the GEMM stages x once per tile and is faster there from M = 12. With the
/// Hopper GEMM also from M = 17 where the skinny kernel's 32-row blocks leave a quarter of the
/// SMs idle, and from M = 16 where they need more than one wave or K > 8192 (RESULTS, "Rule:
/// skinny vs GEMM for small M").
pub(super) fn gemm_for_small_m(m: usize, n: usize, k: usize, sms: usize, hopper: bool) -> bool {
    m >= 12 && n.div_ceil(64) >= sms
        || hopper && m > 16 && 4 * n.div_ceil(32) <= 3 * sms
        || hopper && m >= 16 && (n.div_ceil(32) > sms || k > 8192)
}

/// Weight rows per skinny block, 16 or 32, for `m` rows of x, `n` weight rows, `vec`-byte weight
/// loads (16 is built only for `vec == 16`) and `sms` SMs. 16-row blocks fill more SMs at small
/// N, but every block stages all of x: worth it for M <= 2 wherever 32-row blocks leave SMs
/// idle, and for any M where 32-row blocks fill at most half the SMs (RESULTS, "Rule: skinny
/// rows per block").
fn skinny_rows_per_block(m: usize, n: usize, vec: usize, sms: usize) -> usize {
    if vec == 16 && (m <= 2 && n.div_ceil(32) < sms || 2 * n.div_ceil(32) <= sms) {
        16
    } else {
        32
    }
}

/// The skinny kernel quantizes float x itself when each of its threads holds at most two 16-k
/// groups of x (`m * 16 * kb <= 512` for `kb` blocks of 256 k: one pass, x in registers), or
/// when x is at most this many bytes (two passes through L2 beat a second launch).
const FUSED_MAX_GROUPS: usize = 512;
const FUSED_MAX_BYTES: usize = 16 * 1024;

/// Whether the skinny kernel quantizes float x itself rather than after the quantizer kernel,
/// for `m` rows of `kb` blocks of 256 k, `x_bytes` bytes of x and `blocks` skinny blocks: where
/// x is small enough (above) and there are at most two blocks an SM, since every block
/// quantizes all of x, and after the quantizer kernel the blocks request their weights early
/// (RESULTS, "Rule: skinny fused quantizer").
fn skinny_fuses(m: usize, kb: usize, x_bytes: usize, blocks: usize, sms: usize) -> bool {
    (m * kb * 16 <= FUSED_MAX_GROUPS || x_bytes <= FUSED_MAX_BYTES) && blocks <= 2 * sms
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fused where x is small and the blocks few; the quantizer kernel first where x is large
    /// or N has many blocks.
    #[test]
    fn fuses_where_measured_faster() {
        let fuses = |m: usize, n: usize, k: usize| skinny_fuses(m, k.div_ceil(256), m * k * 2, n.div_ceil(32), 132);
        assert!(fuses(2, 2560, 2560));
        assert!(fuses(2, 4096, 4096));
        assert!(fuses(3, 2560, 2560));
        assert!(!fuses(2, 13824, 2560));
        assert!(!fuses(4, 2560, 2560)); // 640 groups, 20 KB of bf16
        assert!(!fuses(8, 4096, 4096));
        // small x: the two-pass form
        assert!(fuses(5, 1000, 1000));
    }

    /// The choices measured fastest on the H100 (RESULTS, "Rule: skinny vs GEMM for
    /// small M" and "Rule: skinny rows per block").
    #[test]
    fn benchmark_shapes_take_the_measured_best() {
        for m in [12, 16, 24, 32] {
            assert!(gemm_for_small_m(m, 13824, 2560, 132, false), "M = {m}, 13824 x 2560");
        }
        assert!(!gemm_for_small_m(10, 13824, 2560, 132, false));
        for (m, n) in [(16, 4096), (24, 4096), (32, 4096), (16, 2560)] {
            assert!(!gemm_for_small_m(m, n, 4096, 132, false), "M = {m}, N = {n}");
        }
        // with the Hopper GEMM: from M = 17 where the skinny kernel leaves SMs idle (or N is
        // large); M = 16 keeps the skinny kernel
        for (m, n) in [(17, 2560), (24, 2560), (32, 2560), (20, 3000), (32, 13824)] {
            assert!(gemm_for_small_m(m, n, 2560, 132, true), "M = {m}, N = {n}");
        }
        for (m, n) in [(16, 2560), (16, 4096), (2, 2560), (8, 4096), (17, 4096), (32, 4096)] {
            assert!(!gemm_for_small_m(m, n, 4096, 132, true), "M = {m}, N = {n}");
        }
        // from M = 16 where the skinny blocks need two waves, or K >= 8192
        for (m, n, k) in [
            (16, 6912, 2560),
            (32, 6912, 2560),
            (24, 6912, 2560),
            (16, 5120, 5120),
            (32, 5120, 5120),
            (16, 8192, 8192),
            (16, 4096, 11008),
            (32, 4096, 11008),
            (16, 2560, 10240),
            (16, 3072, 12288),
            (20, 7168, 3584),
        ] {
            assert!(gemm_for_small_m(m, n, k, 132, true), "{m} x {n} x {k}");
            assert!(
                !gemm_for_small_m(m, n, k, 132, false),
                "{m} x {n} x {k}: no Hopper GEMM"
            );
        }
        for (m, n, k) in [(8, 8192, 8192), (15, 6912, 2560), (16, 4096, 6912), (16, 2048, 8192)] {
            assert!(!gemm_for_small_m(m, n, k, 132, true), "{m} x {n} x {k}");
        }
        assert_eq!(skinny_rows_per_block(2, 4096, 16, 132), 16);
        for m in [4, 8, 16] {
            assert_eq!(skinny_rows_per_block(m, 4096, 16, 132), 32, "M = {m}");
            assert_eq!(skinny_rows_per_block(m, 2560, 16, 132), 32, "M = {m}");
            // 32-row blocks would fill at most half the SMs
            assert_eq!(skinny_rows_per_block(m, 2048, 16, 132), 16, "M = {m}");
            assert_eq!(skinny_rows_per_block(m, 1024, 16, 132), 16, "M = {m}");
            assert_eq!(skinny_rows_per_block(m, 1024, 4, 132), 32, "M = {m}: 4-byte loads");
        }
        // 16-row blocks need 16-byte weight loads, and pay only where 32-row ones leave SMs idle
        assert_eq!(skinny_rows_per_block(2, 4096, 4, 132), 32);
        assert_eq!(skinny_rows_per_block(2, 13824, 16, 132), 32);
    }

    fn input(m: usize, n: usize, k: usize) -> SkinnyInput {
        SkinnyInput {
            m,
            n,
            k,
            weight_align: 256,
            fusable_x_bytes: Some(2),
            float_x: true,
            settled: false,
            early_weights: true,
        }
    }

    /// The launch shape: column tiles by M, load width by the row length and alignment, shared
    /// memory for all of x, and no plan where x does not fit.
    #[test]
    fn launch_shape() {
        let info = DeviceInfo::sm90(132);
        let f = ForcedChoices::default();
        let p = skinny_plan(&input(4, 2560, 2560), &info, &f, false).unwrap();
        assert_eq!((p.col_tiles, p.vec, p.rows_per_block, p.blocks), (1, 16, 32, 80));
        // 4 rows of 2560 one-byte codes, plus 64 bytes a row
        assert_eq!(p.smem_bytes, 4 * (2560 + 64));
        assert!(!p.fused_quant && p.early_weights, "quantizer first, then weights early");
        let p = skinny_plan(&input(2, 2560, 2560), &info, &f, false).unwrap();
        assert!(p.fused_quant && !p.early_weights, "fused, weights not settled");
        assert_eq!(skinny_plan(&input(9, 100, 1000), &info, &f, false).unwrap().vec, 1);
        assert_eq!(
            skinny_plan(&input(17, 100, 1008), &info, &f, true).unwrap().col_tiles,
            4
        );
        assert_eq!(
            skinny_plan(
                &SkinnyInput {
                    weight_align: 4,
                    ..input(9, 100, 1024)
                },
                &info,
                &f,
                false
            )
            .unwrap()
            .vec,
            4
        );
        // 32 rows of 3072 k (100 KB of codes) fit in 112 KB; 32 x 4096 (130 KB) do not
        assert!(skinny_plan(&input(32, 64, 3072), &info, &f, true).is_some());
        assert!(skinny_plan(&input(32, 64, 4096), &info, &f, true).is_none());
        assert!(skinny_plan(&input(33, 64, 64), &info, &f, true).is_none());
        // the GEMM is preferred at 32 x 2560^2 unless forced
        assert!(skinny_plan(&input(32, 2560, 2560), &info, &f, false).is_none());
        assert!(skinny_plan(&input(32, 2560, 2560), &info, &f, true).is_some());
    }
}
