//! Tests of the GEMM rules (`gemm.rs`) on the shapes they were measured on.

use super::*;

const SMS: usize = 132;

/// `gemm_tile` on `sms` SMs with (`hopper`) or without the Hopper kernel, nothing forced.
fn tile_of(m: usize, n: usize, k_tiles: usize, sms: usize, hopper: bool) -> GemmTile {
    let info = if hopper {
        DeviceInfo::sm90(sms)
    } else {
        DeviceInfo {
            compute_capability: (8, 0),
            ..DeviceInfo::sm90(sms)
        }
    };
    gemm_tile(m, n, k_tiles, &info, &ForcedChoices::default())
}

fn kt(k: usize) -> usize {
    k.div_ceil(128)
}

/// The choices measured fastest on the H100 (RESULTS, "Rule: GEMM tile choice").
#[test]
fn benchmark_shapes_take_the_measured_best() {
    for (n, k) in [(2560, 2560), (13824, 2560), (2560, 6912), (4096, 4096)] {
        assert_eq!(tile_of(16, n, kt(k), SMS, true), GemmTile::Small, "M = 16, {n} x {k}");
        assert_eq!(tile_of(24, n, kt(k), SMS, false), GemmTile::Small, "M = 24, {n} x {k}");
        assert_eq!(tile_of(4096, n, kt(k), SMS, true), GemmTile::Tma, "M = 4096, {n} x {k}");
    }
    // 256- or 192-token tiles
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
        assert_eq!(tile_of(m, n, kt(k), SMS, true), tile, "{m} x {n} x {k}");
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
        assert_eq!(tile_of(m, n, kt(k), SMS, true), GemmTile::Tma64, "{m} x {n} x {k}");
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
        assert_eq!(tile_of(m, n, kt(k), SMS, true), GemmTile::Tma128, "{m} x {n} x {k}");
    }
    // K >= 8192 with at most 64 tokens: 128-row weight tiles
    for (m, n, k) in [
        (16, 8192, 8192),
        (32, 8192, 8192),
        (64, 8192, 8192),
        (16, 4096, 11008),
        (64, 4096, 11008),
        (16, 2560, 10240),
    ] {
        assert_eq!(tile_of(m, n, kt(k), SMS, true), GemmTile::Tma128, "{m} x {n} x {k}");
    }
    assert_eq!(tile_of(128, 8192, kt(8192), SMS, true), GemmTile::Tma64);
    assert_eq!(tile_of(16, 13824, kt(8192), SMS, true), GemmTile::Small);
    assert_eq!(tile_of(16, 2048, kt(8192), SMS, true), GemmTile::Small);
    assert_eq!(tile_of(32, 2048, kt(8192), SMS, true), GemmTile::Tma128);
    assert_eq!(tile_of(16, 8192, kt(8192), SMS, false), GemmTile::Small);
    // M = 256 and 512: 256-token tiles only where they cover half the SMs
    assert_eq!(tile_of(256, 13824, kt(2560), SMS, true), GemmTile::Tma);
    assert_eq!(tile_of(512, 13824, kt(2560), SMS, true), GemmTile::Tma);
    assert_eq!(tile_of(512, 4096, kt(4096), SMS, true), GemmTile::Tma128);
    assert_eq!(tile_of(512, 2560, kt(6912), SMS, true), GemmTile::Tma128);

    let tiles = |m: usize, n: usize| m.div_ceil(128) * n.div_ceil(128);
    assert_eq!(gemm_splits(GemmTile::Tma128, tiles(128, 2560), kt(6912), SMS, None), 6);
    assert_eq!(gemm_splits(GemmTile::Tma128, tiles(128, 4096), kt(4096), SMS, None), 4);
    assert_eq!(gemm_splits(GemmTile::Tma128, tiles(128, 2560), kt(2560), SMS, None), 1);
    assert_eq!(gemm_splits(GemmTile::Tma128, tiles(128, 13824), kt(2560), SMS, None), 1);
    assert_eq!(gemm_splits(GemmTile::Tma, 16 * 32, kt(4096), SMS, None), 1);
    assert_eq!(gemm_splits(GemmTile::Tma64, 40, kt(4096), SMS, None), 1);
}

#[test]
fn without_sm90_or_k_the_mma_sync_tiles_run() {
    assert_eq!(tile_of(4096, 4096, kt(4096), SMS, false), GemmTile::Big);
    assert_eq!(tile_of(128, 2560, kt(2560), SMS, false), GemmTile::Small);
    // K = 0: no k tile for TMA to copy
    assert_eq!(tile_of(4096, 4096, 0, SMS, true), GemmTile::Big);
    assert_eq!(tile_of(128, 4096, 0, SMS, true), GemmTile::Small);
}

#[test]
fn splits_stay_in_range() {
    for tile in [GemmTile::Small, GemmTile::Big, GemmTile::Tma128] {
        for tiles in [0, 1, 2, 5, 33, 66, 132, 1000] {
            for k_tiles in [0, 1, 2, 3, 8, 16, 31, 54, 200] {
                let s = gemm_splits(tile, tiles, k_tiles, SMS, None);
                assert!((1..=16).contains(&s), "{tile:?} {tiles} {k_tiles}: {s}");
                assert!(s == 1 || s <= k_tiles / 2, "{tile:?} {tiles} {k_tiles}: {s}");
            }
        }
    }
    assert_eq!(gemm_splits(GemmTile::Tma, 1, 100, SMS, None), 1);
}

/// The plan's launch values: grid, shared memory, stores, early weights, weight repacking.
#[test]
fn plan_launch_values() {
    let info = DeviceInfo::sm90(SMS);
    let s = KernelSettings::default();
    // 4096 x 4096 x 4096 bf16: 256-token tiles, persistent, TMA stores, early weights
    let p = gemm_plan((4096, 4096, 4096), 2, 256, &info, &s).unwrap();
    assert_eq!(
        (p.tile, p.splits, p.grid, p.threads),
        (GemmTile::Tma, 1, (132, 1, 1), 384)
    );
    assert_eq!(p.smem_bytes, tma_smem_bytes(256, 128, 2));
    assert!(p.tma_store && p.early_weights && !p.repack_weights);
    assert_eq!((p.padded_k, p.weight_row_bytes, p.epilogue_rows), (4096, 1024, 128));
    assert_eq!(p.kernel_name("bf16"), "gemm_tma_bf16");
    // 128 x 2560 x 6912: 128-row tiles split 6 ways, i32 partial sums, no early weights
    let p = gemm_plan((128, 2560, 6912), 2, 256, &info, &s).unwrap();
    assert_eq!((p.tile, p.splits), (GemmTile::Tma128, 6));
    assert_eq!(p.kernel_name("bf16"), "gemm_tma128_split");
    assert!(!p.early_weights);
    assert_eq!(p.smem_bytes, tma_smem_bytes(128, 128, 4));
    // K = 100: 25 packed bytes a row, repacked to 32; N = 3 f32 outputs: rows of 12 bytes, no
    // TMA stores
    let p = gemm_plan((300, 3, 100), 4, 256, &info, &s).unwrap();
    assert!(p.repack_weights && !p.early_weights && !p.tma_store);
    assert_eq!((p.padded_k, p.weight_row_bytes), (128, 32));
    // mma.sync: the grid is (N tiles, M tiles, splits)
    let pre = DeviceInfo {
        compute_capability: (8, 0),
        ..info
    };
    let p = gemm_plan((1000, 1000, 512), 4, 256, &pre, &s).unwrap();
    assert_eq!(p.tile, GemmTile::Small);
    assert_eq!(p.grid, (16, 16, 1));
    assert_eq!(p.smem_bytes, 4 * (64 * 144 + 64 * 48));
    // too many token tiles for the grid's y dimension
    assert!(gemm_plan((128 * 65536, 64, 64), 4, 256, &pre, &s).is_err());
}

/// Forced choices hold where the kernel can run, and fall back where it cannot.
#[test]
fn forced_choices() {
    let info = DeviceInfo::sm90(SMS);
    let force = |f: ForcedChoices| KernelSettings {
        force: f,
        ..Default::default()
    };
    let s = force(ForcedChoices {
        gemm_tile: Some(GemmTile::Tma128),
        gemm_splits: Some(3),
        tma_store: Some(false),
        tma_one_tile_per_cta: true,
        ..Default::default()
    });
    let p = gemm_plan((4096, 4096, 4096), 2, 256, &info, &s).unwrap();
    assert_eq!((p.tile, p.splits, p.tma_store), (GemmTile::Tma128, 3, false));
    assert_eq!(p.grid, (32 * 32 * 3, 1, 1));
    // a TMA tile without the Hopper kernel: the rule's mma.sync tile
    let pre = DeviceInfo {
        compute_capability: (8, 0),
        ..info
    };
    assert_eq!(
        gemm_plan((4096, 4096, 4096), 2, 256, &pre, &s).unwrap().tile,
        GemmTile::Big
    );
    // splits clamp to two k tiles a split; tiles that cannot split ignore them
    let s = force(ForcedChoices {
        gemm_tile: Some(GemmTile::Big),
        gemm_splits: Some(50),
        ..Default::default()
    });
    assert_eq!(gemm_plan((64, 64, 1024), 4, 256, &info, &s).unwrap().splits, 4);
    let s = force(ForcedChoices {
        gemm_tile: Some(GemmTile::Wide),
        gemm_splits: Some(4),
        ..Default::default()
    });
    assert_eq!(gemm_plan((64, 64, 1024), 4, 256, &info, &s).unwrap().splits, 1);
    let s = KernelSettings {
        early_weights: false,
        ..Default::default()
    };
    assert!(!gemm_plan((4096, 4096, 4096), 2, 256, &info, &s).unwrap().early_weights);
}
