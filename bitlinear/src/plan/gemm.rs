//! The tiled GEMM path (`kernels/gemm.cu`, `kernels/gemm90a.cu`): kernel and CTA tile, split-K,
//! grid, shared memory, output stores and early weights. The measurements behind each rule are
//! in bench/RESULTS.md, "Launch rules and the measurements behind them".

use candle_core::{bail, Result};

use super::{DeviceInfo, ForcedChoices, KernelSettings};

/// k tile of both GEMMs: the activation codes are padded to a multiple of it.
pub const GEMM_BK: usize = 128;

/// A GEMM kernel and its CTA tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmTile {
    /// `mma.sync`, 64 x 64 (`kernels/gemm.cu`)
    Small,
    /// `mma.sync`, 128 x 128
    Big,
    /// `mma.sync`, 128 x 256 (never the fastest; reachable by [`ForcedChoices::gemm_tile`])
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
    /// Every tile.
    pub const ALL: [GemmTile; 7] = [
        GemmTile::Small,
        GemmTile::Big,
        GemmTile::Wide,
        GemmTile::Tma,
        GemmTile::Tma192,
        GemmTile::Tma128,
        GemmTile::Tma64,
    ];

    /// The kernel-name part (`gemm_{name}_{output}`).
    pub fn name(self) -> &'static str {
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
    pub fn shape(self) -> (usize, usize, u32) {
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
    pub fn is_tma(self) -> bool {
        matches!(
            self,
            GemmTile::Tma | GemmTile::Tma192 | GemmTile::Tma128 | GemmTile::Tma64
        )
    }

    /// Whether the k range of a tile can be split over CTAs.
    fn splits_k(self) -> bool {
        matches!(self, GemmTile::Small | GemmTile::Big | GemmTile::Tma128)
    }
}

/// Launch of the tiled GEMM (after the activations are quantized, or int8 codes permuted, into
/// a zero-padded `(M, padded_k)` buffer with row sums).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmPlan {
    /// Kernel and CTA tile.
    pub tile: GemmTile,
    /// CTAs over the k range of each output tile; above 1 they add i32 partial sums into a
    /// zeroed workspace and a second kernel (`splitk_epilogue_*`) writes the output.
    pub splits: usize,
    /// K padded to a multiple of [`GEMM_BK`]: the activation buffer's row length.
    pub padded_k: usize,
    /// Packed bytes a weight row as the kernel reads it (a multiple of 16).
    pub weight_row_bytes: usize,
    /// The weights are copied into 16-byte aligned rows of `weight_row_bytes` first (they are
    /// not aligned in place).
    pub repack_weights: bool,
    /// Grid: for the Hopper kernel (persistent CTAs walking the work items) `(ctas, 1, 1)`;
    /// else `(weight-row tiles, token tiles, splits)`.
    pub grid: (u32, u32, u32),
    /// Threads a CTA.
    pub threads: u32,
    /// Dynamic shared memory.
    pub smem_bytes: usize,
    /// The Hopper kernel writes its output (or partial sums) by TMA stores, `epilogue_rows`
    /// token rows a box, instead of the threads' stores.
    pub tma_store: bool,
    /// Token rows per epilogue pass of the Hopper kernel.
    pub epilogue_rows: usize,
    /// The Hopper kernel requests its weights before `pdl_wait` (the kernel before it is this
    /// call's quantizer or permuter, which waited for everything before it).
    pub early_weights: bool,
}

impl GemmPlan {
    /// The GEMM kernel for the output suffix (`i32`, `f32`, `bf16`, `f16`).
    pub fn kernel_name(&self, out: &str) -> String {
        if self.tile.is_tma() && self.splits > 1 {
            format!("gemm_{}_split", self.tile.name())
        } else {
            format!("gemm_{}_{out}", self.tile.name())
        }
    }

    /// Bytes a Hopper-kernel output element: the i32 partial sums when split, else the output's.
    fn tma_out_bytes(splits: usize, out_bytes: usize) -> usize {
        if splits > 1 {
            4
        } else {
            out_bytes
        }
    }
}

/// The GEMM plan for `m` x `n` x `k` (k > 0) with `out_bytes`-byte outputs and weights aligned to
/// `weight_align` bytes.
pub(super) fn gemm_plan(
    (m, n, k): (usize, usize, usize),
    out_bytes: usize,
    weight_align: usize,
    info: &DeviceInfo,
    settings: &KernelSettings,
) -> Result<GemmPlan> {
    let force = &settings.force;
    let padded_k = k.div_ceil(GEMM_BK) * GEMM_BK;
    let k_tiles = padded_k / GEMM_BK;
    let k4 = k.div_ceil(4);
    let repack_weights = !(k4.is_multiple_of(16) && weight_align >= 16);
    let tile = gemm_tile(m, n, k_tiles, info, force);
    let (bm, bn, threads) = tile.shape();
    if m.div_ceil(bm) > 65535 {
        bail!("bitlinear cuda: M = {m} rows is more than the GEMM grid supports")
    }
    let tiles = m.div_ceil(bm) * n.div_ceil(bn);
    let splits = gemm_splits(tile, tiles, k_tiles, info.sms, force.gemm_splits);
    let (grid, smem_bytes, epilogue_rows) = if tile.is_tma() {
        let ob = GemmPlan::tma_out_bytes(splits, out_bytes);
        let items = tiles * splits;
        let ctas = if force.tma_one_tile_per_cta {
            items
        } else {
            items.min(info.sms)
        };
        let ctas = u32::try_from(ctas).unwrap_or(u32::MAX);
        ((ctas, 1, 1), tma_smem_bytes(bm, bn, ob), tma_epilogue_rows(bm, ob))
    } else {
        let grid = (n.div_ceil(bn) as u32, m.div_ceil(bm) as u32, splits as u32);
        (grid, 4 * (bm * 144 + bn * 48), 0)
    };
    let tma_store = tile.is_tma()
        && (n * GemmPlan::tma_out_bytes(splits, out_bytes)).is_multiple_of(16)
        && force.tma_store != Some(false);
    Ok(GemmPlan {
        tile,
        splits,
        padded_k,
        weight_row_bytes: k4.div_ceil(16) * 16,
        repack_weights,
        grid,
        threads,
        smem_bytes,
        tma_store,
        epilogue_rows,
        // Not with split K: the workspace memset sits between the quantizer and the GEMM, so
        // nothing overlaps and early requests only delay the first x copies (RESULTS, "Rule:
        // early weights of the Hopper GEMM"). Not after a weight repack, which writes them.
        early_weights: tile.is_tma() && !repack_weights && splits == 1 && settings.early_weights,
    })
}

/// The tile for `m` rows of x, `n` weight rows and `k_tiles` k tiles of 128 (RESULTS, "Rule:
/// GEMM tile choice"). A forced tile holds where it can run (the TMA tiles need the Hopper kernel and K > 0).
fn gemm_tile(m: usize, n: usize, k_tiles: usize, info: &DeviceInfo, force: &ForcedChoices) -> GemmTile {
    let tma = info.has_hopper_gemm() && k_tiles > 0;
    if let Some(t) = force.gemm_tile.filter(|t| !t.is_tma() || tma) {
        return t;
    }
    let sms = info.sms;
    match m {
        // K >= 8192, at most 64 tokens, and 128-row weight tiles that fill at most half the SMs:
        // those tiles (split over K where they leave SMs idle) rather than 64-row or unsplit
        // mma.sync ones; not for M <= 16 where the 64 x 64 tiles split over K.
        _ if tma && m <= 64 && k_tiles >= 64 && 2 * n.div_ceil(128) <= sms && (m > 16 || 4 * n.div_ceil(64) > sms) => {
            GemmTile::Tma128
        }
        // M <= 16 (where N is large: the skinny planner), or <= 32 without the Hopper kernel
        _ if m <= 16 || m <= 32 && !tma => GemmTile::Small,
        // 256-token tiles from M > 128 once they cover half the SMs (192 where that leaves fewer
        // SMs idle in the last round), else 128-token tiles
        _ if tma && m > 128 && 2 * m.div_ceil(256) * n.div_ceil(128) >= sms => {
            if 10 * tma_rounds_cost(192, m, n, sms) < 9 * tma_rounds_cost(256, m, n, sms) {
                GemmTile::Tma192
            } else {
                GemmTile::Tma
            }
        }
        // where the 128-row weight tiles fill at most half the SMs, tiles of 64 weight rows
        // (twice as many CTAs), unless K is long enough to split 6 ways or more
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
/// 10% less than with 256-token ones (RESULTS, "Rule: 192-token tiles").
fn tma_rounds_cost(bt: usize, m: usize, n: usize, sms: usize) -> usize {
    (m.div_ceil(bt) * n.div_ceil(128)).div_ceil(sms.max(1)) * (bt + 32)
}

/// Over how many CTAs the k range of each output tile is split, for `tiles` output tiles of
/// `tile`, `k_tiles` k tiles of 128 and `sms` SMs; `forced` holds for the tiles that can split.
fn gemm_splits(tile: GemmTile, tiles: usize, k_tiles: usize, sms: usize, forced: Option<usize>) -> usize {
    if !tile.splits_k() {
        return 1;
    }
    match forced {
        Some(s) => s.clamp(1, max_splits(k_tiles)),
        None => auto_splits(tile, tiles, k_tiles, sms),
    }
}

/// At most 16 splits of at least two k tiles each.
fn max_splits(k_tiles: usize) -> usize {
    (k_tiles / 2).clamp(1, 16)
}

/// The split rule (RESULTS, "Rule: split-K").
fn auto_splits(tile: GemmTile, tiles: usize, k_tiles: usize, sms: usize) -> usize {
    let max_splits = max_splits(k_tiles);
    let tiles = tiles.max(1);
    match tile {
        // mma.sync tiles: split when the tiles leave at least 3/4 of the SMs idle, about one CTA
        // an SM, at least two k tiles each (a full wave of splits costs more in i32 atomics,
        // zeroing and epilogue than it saves)
        GemmTile::Small | GemmTile::Big if 4 * tiles <= sms => (sms / tiles).clamp(1, max_splits),
        // 128-token TMA tiles: split while they fill less than half the SMs, into up to about
        // one work item an SM of at least 8 k tiles, and only 3 ways or more (the zeroed
        // workspace and the epilogue kernel cost two launches)
        GemmTile::Tma128 if 2 * tiles < sms => match (sms / tiles).min(k_tiles / 8) {
            s if s >= 3 => s.min(16),
            _ => 1,
        },
        _ => 1,
    }
}

/// Dynamic shared memory of the TMA wgmma GEMM with `bt` tokens and `bn` weight rows a tile and
/// `ob`-byte outputs (`TmaSmem` in kernels/gemm90a.cu): 4 stages (5 for 192-token, 6 for
/// 128-token tiles) of bt x 128 activation bytes and bn x 32 packed weight bytes, two epilogue
/// buffers, two mbarriers a stage, (row sum, scale) of bt tokens, and slack to align the base to
/// 1024 bytes.
fn tma_smem_bytes(bt: usize, bn: usize, ob: usize) -> usize {
    let stages = match bt {
        256 => 4,
        192 => 5,
        _ => 6,
    };
    stages * (bt * 128 + bn * 32) + 2 * tma_epilogue_rows(bt, ob) * bn * ob + 16 * stages + 8 * bt + 1024
}

/// Token rows per epilogue pass of the TMA wgmma GEMM (`TmaSmem::EP_ROWS`).
fn tma_epilogue_rows(bt: usize, ob: usize) -> usize {
    if ob == 2 && bt == 256 {
        128
    } else {
        64
    }
}

#[cfg(test)]
#[path = "gemm_tests.rs"]
mod tests;
