//! The kernel variants reachable through the typed kernel settings (`bitlinear::plan`), so that
//! the check and the benchmark cover every kernel whatever the launch rules pick.

use bitlinear::plan::{GemmTile, KernelKind, KernelSettings};
use candle_core::Device;

/// A named change of the kernel settings. Names starting with "x-" are experimental kernels:
/// their mismatches are reported but do not fail the check.
pub(crate) struct Variant {
    pub(crate) name: &'static str,
    pub(crate) apply: fn(&mut KernelSettings),
}

/// A variant `$name` that changes the settings `s` by `$body`.
macro_rules! variant {
    ($name:expr, |$s:ident| $body:expr) => {
        Variant {
            name: $name,
            apply: |$s| {
                $body;
            },
        }
    };
}

/// The GEMM with a forced tile (and the change `$body`).
macro_rules! gemm {
    ($name:expr, $tile:ident $(, |$s:ident| $body:expr)?) => {
        Variant {
            name: $name,
            apply: |s| {
                s.force.kernel = Some(KernelKind::Gemm);
                s.force.gemm_tile = Some(GemmTile::$tile);
                $(let $s = &mut *s; $body;)?
            },
        }
    };
}

pub(crate) const VARIANTS: &[Variant] = &[
    gemm!("gemm-small", Small),
    gemm!("gemm-big", Big),
    gemm!("gemm-wide", Wide),
    gemm!("gemm-small-nosplit", Small, |s| s.force.gemm_splits = Some(1)),
    gemm!("gemm-big-split5", Big, |s| s.force.gemm_splits = Some(5)),
    variant!("no-fuse", |s| s.force.skinny_fused_quant = Some(false)),
    variant!("fuse", |s| s.force.skinny_fused_quant = Some(true)),
    variant!("skinny", |s| s.force.kernel = Some(KernelKind::Skinny)),
    variant!("gemv-l8", |s| s.force.gemv_lanes = Some(8)),
    variant!("gemv-l16", |s| s.force.gemv_lanes = Some(16)),
    variant!("gemv-l32", |s| s.force.gemv_lanes = Some(32)),
    variant!("gemv-bulk-x", |s| s.force.gemv_bulk_x = Some(true)),
    variant!("gemv-no-bulk-x", |s| s.force.gemv_bulk_x = Some(false)),
    variant!("gemv-stream", |s| s.force.gemv_stream = Some(true)),
    variant!("gemv-no-stream", |s| s.force.gemv_stream = Some(false)),
    variant!("gemv-early", |s| s.force.gemv_early_weights = Some(true)),
    variant!("gemv-late", |s| s.force.gemv_early_weights = Some(false)),
    variant!("skinny-rows16", |s| s.force.skinny_rows = Some(16)),
    variant!("skinny-rows32", |s| s.force.skinny_rows = Some(32)),
    variant!("no-pdl", |s| s.pdl = false),
    variant!("no-early-weights", |s| s.early_weights = false),
    variant!("no-early", |s| {
        s.early_weights = false;
        s.early_trigger = false
    }),
    gemm!("gemm-tma", Tma),
    gemm!("gemm-tma-no-store", Tma, |s| s.force.tma_store = Some(false)),
    gemm!("gemm-tma192", Tma192),
    gemm!("gemm-tma128", Tma128),
    gemm!("gemm-tma128-nosplit", Tma128, |s| s.force.gemm_splits = Some(1)),
    gemm!("gemm-tma128-split3-no-store", Tma128, |s| {
        s.force.gemm_splits = Some(3);
        s.force.tma_store = Some(false)
    }),
    gemm!("gemm-tma64", Tma64),
    gemm!("gemm-tma-one-tile", Tma, |s| s.force.tma_one_tile_per_cta = true),
];

/// The variant called `name`.
pub(crate) fn by_name(name: &str) -> Option<&'static Variant> {
    VARIANTS.iter().find(|v| v.name == name)
}

/// Mismatches of the experimental ("x-") variants, reported at the end of the check.
pub(crate) static EXPERIMENTAL_FAILS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `f` with `change` applied on top of `dev`'s current settings, then puts those back (so
/// that settings given to the whole run, `--variant`, hold for every shape).
pub(crate) fn with_settings<T>(dev: &Device, change: fn(&mut KernelSettings), f: impl FnOnce() -> T) -> T {
    let base = bitlinear::kernel_settings(dev);
    let mut s = base.clone();
    change(&mut s);
    set(dev, s);
    let r = f();
    set(dev, base);
    r
}

/// Sets `dev`'s kernel settings (infallible for a device that exists).
pub(crate) fn set(dev: &Device, s: KernelSettings) {
    bitlinear::set_kernel_settings(dev, s).expect("kernel settings of an existing device")
}
