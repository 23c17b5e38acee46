//! Launch choices for the tiled GEMM path on CUDA (`src/cuda/mod.rs`, `matmul_core`): which
//! kernel and CTA tile, and over how many CTAs the k range is split. Plain host arithmetic, kept
//! out of the `cuda` module so that it is tested without a GPU. The numbers in the comments are
//! H100 measurements (bench/RESULTS.md).
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// A GEMM kernel and its CTA tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmTile {
    /// `mma.sync`, 64 x 64 (`kernels/gemm.cu`)
    Small,
    /// `mma.sync`, 128 x 128
    Big,
    /// `mma.sync`, 128 x 256 (never the fastest; a variant)
    Wide,
    /// the TMA `wgmma` kernel, 256 tokens x 128 weight rows (`kernels/gemm90a.cu`)
    Tma,
    /// the TMA `wgmma` kernel, 192 tokens x 128 weight rows
    Tma192,
    /// the TMA `wgmma` kernel, 128 tokens x 128 weight rows, optionally split over k
    Tma128,
    /// the TMA `wgmma` kernel, 128 tokens x 64 weight rows (one consumer warpgroup)
    Tma64,
}

impl GemmTile {
    /// The kernel-name part (`gemm_{name}_{output}`) and the `BITLINEAR_CUDA_GEMM_TILE` value.
    pub(crate) fn name(self) -> &'static str {
        match self {
            GemmTile::Small => "small",
            GemmTile::Big => "big",
            GemmTile::Wide => "wide",
            GemmTile::Tma => "tma",
            GemmTile::Tma192 => "tma192",
            GemmTile::Tma128 => "tma128",
            GemmTile::Tma64 => "tma64",
        }
    }

    /// Rows of x (tokens) and weight rows per CTA tile, and threads per CTA.
    pub(crate) fn shape(self) -> (usize, usize, u32) {
        match self {
            GemmTile::Small => (64, 64, 128),
            GemmTile::Big => (128, 128, 256),
            GemmTile::Wide => (128, 256, 512),
            GemmTile::Tma => (256, 128, 384),
            GemmTile::Tma192 => (192, 128, 384),
            GemmTile::Tma128 => (128, 128, 384),
            GemmTile::Tma64 => (128, 64, 256),
        }
    }

    /// The TMA kernel (needs compute capability 9.0 and K > 0).
    pub(crate) fn is_tma(self) -> bool {
        matches!(
            self,
            GemmTile::Tma | GemmTile::Tma192 | GemmTile::Tma128 | GemmTile::Tma64
        )
    }
}

/// The tile for `m` rows of x, `n` weight rows and `k_tiles` k tiles of 128, on `sms` SMs;
/// `sm90`: the sm_90a kernels can run. `BITLINEAR_CUDA_GEMM_TILE` overrides the choice (`tma`
/// and `tma128` only where K > 0).
pub(crate) fn gemm_tile(m: usize, n: usize, k_tiles: usize, sms: usize, sm90: bool) -> GemmTile {
    let all = [
        GemmTile::Small,
        GemmTile::Big,
        GemmTile::Wide,
        GemmTile::Tma,
        GemmTile::Tma192,
        GemmTile::Tma128,
        GemmTile::Tma64,
    ];
    if let Ok(v) = std::env::var("BITLINEAR_CUDA_GEMM_TILE") {
        if let Some(&t) = all.iter().find(|t| t.name() == v && (!t.is_tma() || k_tiles > 0)) {
            return t;
        }
    }
    let tma = sm90 && k_tiles > 0;
    match m {
        // K >= 8192, at most 64 tokens, and 128-row weight tiles that fill at most half the SMs:
        // those tiles (split over K where they leave SMs idle) rather than 64-row or unsplit
        // mma.sync ones (ninth session, H100: M = 16, 32, 64 at 8192^2 36.8, 45.8, 40.3 -> 31.3,
        // 30.0, 29.5 us; 4096 x 11008 35.1, 38.1, 29.6 -> 25.9, 25.7, 27.2). Not at M = 128
        // (8192^2: 23.7 us with 64-row tiles, 30.3 with 128), nor with more tiles (16 x 13824 x
        // 8192: mma.sync 64 x 64 tiles 37.3 us, 128-row TMA tiles 47.0), nor for M <= 16 where
        // the 64 x 64 tiles split over K (16 x 2048 x 8192: 15.9 us, 128-row tiles 17.4).
        _ if tma && m <= 64 && k_tiles >= 64 && 2 * n.div_ceil(128) <= sms && (m > 16 || 4 * n.div_ceil(64) > sms) => {
            GemmTile::Tma128
        }
        // M <= 16 (where N is large, `gemm_for_small_m`), or <= 32 without the Hopper kernel: 64 x
        // 64 tiles (16 x 13824 x 2560: 19.9 us, against 25.3 us with 128 x 128 tiles and 28.2 us
        // with the first wgmma kernel, since replaced). M = 17..32 takes the TMA tiles below.
        _ if m <= 16 || m <= 32 && !tma => GemmTile::Small,
        // 256-token tiles from M > 128 once they cover half the SMs, else 128-token tiles:
        // 256-token tiles at 1024 x 2560^2 26.2 vs 29.1 us, 512 x 13824 x 2560 39.7 vs 46.1 us;
        // 128-token tiles at 512 x 4096^2 23.8 vs 31.9 us, 128 x 13824 x 2560 18.7 vs 27.4 us,
        // and from M = 33 they beat the mma.sync tiles (M = 40: 13824 x 2560 17.8 vs 24.1 us,
        // 2560 x 6912 18.9 vs 26.6 us, 2560^2 11.6 vs 13.6 us with 64-row tiles)
        _ if tma && m > 128 && 2 * m.div_ceil(256) * n.div_ceil(128) >= sms => {
            if 10 * tma_rounds_cost(192, m, n, sms) < 9 * tma_rounds_cost(256, m, n, sms) {
                GemmTile::Tma192
            } else {
                GemmTile::Tma
            }
        }
        // Where the 128-row weight tiles fill at most half the SMs, tiles of 64 weight rows (twice
        // as many CTAs), unless K is long enough to split 6 ways or more: 128 x 4096^2 15.1 vs
        // 19.9 us, 256 x 2560 x 6912 21.4 vs 25.1 us (3 splits); 64 x 2560 x 6912 20.6 vs 18.9 us
        // (6 splits)
        _ if tma => {
            let tiles = m.div_ceil(128) * n.div_ceil(128);
            if 2 * tiles <= sms && auto_splits(GemmTile::Tma128, tiles, k_tiles, sms) < 6 {
                GemmTile::Tma64
            } else {
                GemmTile::Tma128
            }
        }
        // mma.sync: the largest tile that still gives 3/4 of the SMs a CTA
        _ if 4 * m.div_ceil(128) * n.div_ceil(128) >= 3 * sms => GemmTile::Big,
        _ => GemmTile::Small,
    }
}

/// Estimated time of the persistent TMA GEMM with `bt`-token x 128-row tiles, in token rows: the
/// rounds of one tile per SM, each costing its tokens plus a per-tile overhead (the epilogue and
/// pipeline fill, about 32 token rows' worth). 192-token tiles are taken where this is at least
/// 10% less than with 256-token ones, which leave many SMs idle in their last round: 1024 x
/// 2560^2 has 80 tiles of 256 (one round on 132 SMs, 52 idle) or 120 of 192 (H100: 22.4 -> 19.6
/// us; 1024 x 2560 x 6912 48.3 -> 41.4, 1536 x 4096^2 55.6 -> 47.0, 768 x 4096^2 29.3 -> 24.9).
/// At 1024 x 13824 x 2560 the estimate is only 3% less and 192 was slower (68.2 vs 70.8 us).
fn tma_rounds_cost(bt: usize, m: usize, n: usize, sms: usize) -> usize {
    (m.div_ceil(bt) * n.div_ceil(128)).div_ceil(sms.max(1)) * (bt + 32)
}

/// Over how many CTAs the k range of each output tile is split, for `tiles` output tiles of
/// `tile`, `k_tiles` k tiles of 128 and `sms` SMs. `BITLINEAR_CUDA_SPLITK=n` overrides it for
/// the tiles that can split (`small`, `big`, `tma128`).
pub(crate) fn gemm_splits(tile: GemmTile, tiles: usize, k_tiles: usize, sms: usize) -> usize {
    let splittable = matches!(tile, GemmTile::Small | GemmTile::Big | GemmTile::Tma128);
    if !splittable {
        return 1;
    }
    match std::env::var("BITLINEAR_CUDA_SPLITK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(s) => s.clamp(1, max_splits(k_tiles)),
        None => auto_splits(tile, tiles, k_tiles, sms),
    }
}

/// At most 16 splits of at least two k tiles each.
fn max_splits(k_tiles: usize) -> usize {
    (k_tiles / 2).clamp(1, 16)
}

/// `gemm_splits` without the environment override.
fn auto_splits(tile: GemmTile, tiles: usize, k_tiles: usize, sms: usize) -> usize {
    let max_splits = max_splits(k_tiles);
    let tiles = tiles.max(1);
    match tile {
        // mma.sync tiles: split when the tiles leave at least 3/4 of the SMs idle, about one CTA
        // per SM, at least two k tiles each (M = 128: 512 x 4096 26.9 -> 21.7 us; a full wave
        // of splits was slower, 26.7 -> 39.3 us at 4096 x 4096: the i32 atomics, zeroing and
        // epilogue cost more than they save)
        GemmTile::Small | GemmTile::Big if 4 * tiles <= sms => (sms / tiles).clamp(1, max_splits),
        // 128-token TMA tiles: split while they fill less than half the SMs, into up to about
        // one work item an SM of at least 8 k tiles, and only 3 ways or more (the zeroed
        // workspace and the epilogue kernel cost two launches; M = 128: 2560 x 6912 30.4 -> 23.1
        // us with 6 splits, 2560^2 17.9 -> 18.9 us with 6)
        GemmTile::Tma128 if 2 * tiles < sms => match (sms / tiles).min(k_tiles / 8) {
            s if s >= 3 => s.min(16),
            _ => 1,
        },
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMS: usize = 132;

    fn kt(k: usize) -> usize {
        k.div_ceil(128)
    }

    /// The choices measured fastest on the H100 (bench/RESULTS.md, sixth session).
    #[test]
    fn benchmark_shapes_take_the_measured_best() {
        for (n, k) in [(2560, 2560), (13824, 2560), (2560, 6912), (4096, 4096)] {
            assert_eq!(gemm_tile(16, n, kt(k), SMS, true), GemmTile::Small, "M = 16, {n} x {k}");
            assert_eq!(
                gemm_tile(24, n, kt(k), SMS, false),
                GemmTile::Small,
                "M = 24, {n} x {k}"
            );
            assert_eq!(
                gemm_tile(4096, n, kt(k), SMS, true),
                GemmTile::Tma,
                "M = 4096, {n} x {k}"
            );
        }
        // 256- or 192-token tiles (seventh session: every shape below measured both ways)
        for (m, n, k, tile) in [
            (1024, 2560, 2560, GemmTile::Tma192),
            (1024, 2560, 6912, GemmTile::Tma192),
            (2048, 2560, 2560, GemmTile::Tma192),
            (2048, 2560, 6912, GemmTile::Tma192),
            (768, 4096, 4096, GemmTile::Tma192),
            (1536, 4096, 4096, GemmTile::Tma192),
            (1024, 4096, 4096, GemmTile::Tma),
            (2048, 4096, 4096, GemmTile::Tma),
            (1024, 13824, 2560, GemmTile::Tma),
            (1536, 13824, 2560, GemmTile::Tma),
            (768, 13824, 2560, GemmTile::Tma),
            (1536, 2560, 2560, GemmTile::Tma),
            (3072, 2560, 6912, GemmTile::Tma),
        ] {
            assert_eq!(gemm_tile(m, n, kt(k), SMS, true), tile, "{m} x {n} x {k}");
        }
        // M = 33..256: 64-row weight tiles where 128-row ones fill at most half the SMs and K is
        // not long enough for 6 splits
        for (m, n, k) in [
            (24, 2560, 2560),
            (32, 2560, 2560),
            (32, 4096, 4096),
            (40, 2560, 2560),
            (48, 4096, 4096),
            (64, 2560, 2560),
            (128, 2560, 2560),
            (256, 2560, 2560),
            (64, 4096, 4096),
            (128, 4096, 4096),
            (256, 4096, 4096),
            (256, 2560, 6912),
        ] {
            assert_eq!(gemm_tile(m, n, kt(k), SMS, true), GemmTile::Tma64, "{m} x {n} x {k}");
        }
        for (m, n, k) in [
            (24, 2560, 6912),
            (32, 13824, 2560),
            (40, 2560, 6912),
            (40, 13824, 2560),
            (64, 2560, 6912),
            (128, 2560, 6912),
            (64, 13824, 2560),
            (128, 13824, 2560),
        ] {
            assert_eq!(gemm_tile(m, n, kt(k), SMS, true), GemmTile::Tma128, "{m} x {n} x {k}");
        }
        // K >= 8192 with at most 64 tokens: 128-row weight tiles (ninth session)
        for (m, n, k) in [
            (16, 8192, 8192),
            (32, 8192, 8192),
            (64, 8192, 8192),
            (16, 4096, 11008),
            (64, 4096, 11008),
            (16, 2560, 10240),
        ] {
            assert_eq!(gemm_tile(m, n, kt(k), SMS, true), GemmTile::Tma128, "{m} x {n} x {k}");
        }
        assert_eq!(gemm_tile(128, 8192, kt(8192), SMS, true), GemmTile::Tma64);
        assert_eq!(gemm_tile(16, 13824, kt(8192), SMS, true), GemmTile::Small);
        assert_eq!(gemm_tile(16, 2048, kt(8192), SMS, true), GemmTile::Small);
        assert_eq!(gemm_tile(32, 2048, kt(8192), SMS, true), GemmTile::Tma128);
        assert_eq!(gemm_tile(16, 8192, kt(8192), SMS, false), GemmTile::Small);
        // M = 256 and 512: 256-token tiles only where they cover half the SMs
        assert_eq!(gemm_tile(256, 13824, kt(2560), SMS, true), GemmTile::Tma);
        assert_eq!(gemm_tile(512, 13824, kt(2560), SMS, true), GemmTile::Tma);
        assert_eq!(gemm_tile(512, 4096, kt(4096), SMS, true), GemmTile::Tma128);
        assert_eq!(gemm_tile(512, 2560, kt(6912), SMS, true), GemmTile::Tma128);

        let tiles = |m: usize, n: usize| m.div_ceil(128) * n.div_ceil(128);
        assert_eq!(gemm_splits(GemmTile::Tma128, tiles(128, 2560), kt(6912), SMS), 6);
        assert_eq!(gemm_splits(GemmTile::Tma128, tiles(128, 4096), kt(4096), SMS), 4);
        assert_eq!(gemm_splits(GemmTile::Tma128, tiles(128, 2560), kt(2560), SMS), 1);
        assert_eq!(gemm_splits(GemmTile::Tma128, tiles(128, 13824), kt(2560), SMS), 1);
        assert_eq!(gemm_splits(GemmTile::Tma, 16 * 32, kt(4096), SMS), 1);
        assert_eq!(gemm_splits(GemmTile::Tma64, 40, kt(4096), SMS), 1);
    }

    #[test]
    fn without_sm90_or_k_the_mma_sync_tiles_run() {
        assert_eq!(gemm_tile(4096, 4096, kt(4096), SMS, false), GemmTile::Big);
        assert_eq!(gemm_tile(128, 2560, kt(2560), SMS, false), GemmTile::Small);
        // K = 0: no k tile for TMA to copy
        assert_eq!(gemm_tile(4096, 4096, 0, SMS, true), GemmTile::Big);
        assert_eq!(gemm_tile(128, 4096, 0, SMS, true), GemmTile::Small);
    }

    #[test]
    fn splits_stay_in_range() {
        for tile in [GemmTile::Small, GemmTile::Big, GemmTile::Tma128] {
            for tiles in [0, 1, 2, 5, 33, 66, 132, 1000] {
                for k_tiles in [0, 1, 2, 3, 8, 16, 31, 54, 200] {
                    let s = gemm_splits(tile, tiles, k_tiles, SMS);
                    assert!((1..=16).contains(&s), "{tile:?} {tiles} {k_tiles}: {s}");
                    assert!(s == 1 || s <= k_tiles / 2, "{tile:?} {tiles} {k_tiles}: {s}");
                }
            }
        }
        assert_eq!(gemm_splits(GemmTile::Tma, 1, 100, SMS), 1);
    }
}
