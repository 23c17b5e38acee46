//! Launch choices for `2 <= M <= 32` on CUDA (`src/cuda/mod.rs`, `matmul_core`): whether the
//! skinny kernel (`kernels/skinny.cu`) runs or the tiled GEMM, and the skinny kernel's rows per
//! block. Plain host arithmetic, kept out of the `cuda` module so that it is tested without a
//! GPU.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// Whether the tiled GEMM should take `m <= 32` rows of `k` inputs instead of the skinny kernel;
/// `sm90`: the Hopper GEMM can run. Every skinny block stages all of x, so its time grows with M
/// where N is large; the GEMM stages x once per tile and is faster there from M = 12 (H100,
/// 13824 x 2560: M = 12 19.0 vs 19.6 us, 16 19.9 vs 21.9 us, 32 20.9 vs 43.0 us; M = 10 18.8 vs
/// 19.2 us the other way). From M = 17 (four 8-row MMA column tiles) the Hopper GEMM is faster
/// where the skinny kernel's 32-row blocks leave a quarter of the SMs idle (H100, M = 17..32:
/// 2560^2 12.4-15.9 -> 10.8-11.0 us, 2560 x 6912 23.7-25.6 -> 17.4-18.7 us), not at N = 4096
/// (128 blocks: M = 17 15.4 vs 19.2 us, 28 17.1 vs 18.1 us); at M = 16 the skinny kernel still
/// wins there (2560^2 10.2 vs 11.0 us). With the Hopper GEMM, from M = 16 also where the skinny
/// blocks (one an SM from M = 9) need more than one wave or K > 8192 (ninth session, same run
/// against the previous rule: M = 16, 24, 32 at 6144 x 2048 12.7, 21.0, 24.5 -> 11.1, 13.1,
/// 13.0 us; M = 16, 32 at 6912 x 2560 14.4, 27.6 -> 12.6, 15.0, at 8192^2 36.7, 45.8 -> 31.3,
/// 30.0, at 4096 x 11008 35.1, 38.1 -> 25.9, 25.7; M = 16 2560 x 10240 32.9 -> 20.9, 3072 x
/// 12288 40.0 -> 25.5; M = 20 7168 x 3584 25.6 -> 20.4).
pub(crate) fn gemm_for_small_m(m: usize, n: usize, k: usize, sms: usize, sm90: bool) -> bool {
    m >= 12 && n.div_ceil(64) >= sms
        || sm90 && m > 16 && 4 * n.div_ceil(32) <= 3 * sms
        || sm90 && m >= 16 && (n.div_ceil(32) > sms || k > 8192)
}

/// Weight rows per skinny block, 16 or 32, for `m` rows of x, `n` weight rows, `vec`-byte weight
/// loads (16 is built only for `vec == 16`) and `sms` SMs. 16-row blocks fill more SMs at small
/// N, but every block stages all of x: worth it for M <= 2 wherever 32-row blocks leave SMs
/// idle (H100: M = 2, 4096^2 7.6 against 8.3 us; M = 4..16, 32-row blocks 4-20% faster), and
/// for any M where 32-row blocks fill at most half the SMs (ninth session, same run against
/// 32-row blocks: M = 4, 8, 16 at 2048^2 6.8, 7.0, 8.9 -> 5.6, 6.5, 7.7 us, at 1024 x 4096
/// 7.6, 8.7, 11.1 -> 7.0, 8.0, 9.6, at 1280 x 5120 8.2, 10.0, 12.7 -> 7.5, 9.2, 11.3; M = 4, 8
/// at 2048 x 8192 11.0, 14.4 -> 10.0, 13.0). `BITLINEAR_CUDA_SKINNY_ROWS=16|32` overrides the
/// choice.
pub(crate) fn skinny_rows_per_block(m: usize, n: usize, vec: usize, sms: usize) -> usize {
    match std::env::var("BITLINEAR_CUDA_SKINNY_ROWS").as_deref() {
        Ok("16") if vec == 16 => 16,
        Ok(_) => 32,
        _ if vec == 16 && m <= 2 && n.div_ceil(32) < sms => 16,
        _ if vec == 16 && 2 * n.div_ceil(32) <= sms => 16,
        _ => 32,
    }
}

/// The skinny kernel quantizes float x itself when each of its threads holds at most two 16-k
/// groups of x (`m * 16 * kb <= 512` for `kb` blocks of 256 k: one pass, x in registers), or
/// when x is at most this many bytes (two passes through L2 beat a second launch).
const FUSED_MAX_GROUPS: usize = 512;
const FUSED_MAX_BYTES: usize = 16 * 1024;

/// Whether the skinny kernel quantizes float x itself (one launch) rather than after the row
/// quantizer, for `m` rows of `kb` blocks of 256 k, `x_bytes` bytes of x and `blocks` skinny
/// blocks: where x is small enough (above) and there are at most two blocks an SM, since every
/// block quantizes all of x, and after the quantizer kernel the blocks request their weights
/// early. H100 (bench/RESULTS.md, eighth session): M = 2 x 13824 x 2560 (432 blocks) 13.3 us
/// fused, 11.25 after the quantizer; M = 2 x 2560^2 (80 blocks) 6.53 fused, 7.05 not;
/// 4096^2 (128 blocks) 8.04 fused, 8.17 not.
pub(crate) fn skinny_fuses(m: usize, kb: usize, x_bytes: usize, blocks: usize, sms: usize) -> bool {
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

    /// The choices measured fastest on the H100 (bench/RESULTS.md, fifth session).
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
        // ninth session: from M = 16 where the skinny blocks need two waves, or K >= 8192
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
}
