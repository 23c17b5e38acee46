//! The kernel variants reachable through environment switches (src/cuda/mod.rs), so that the
//! check and the benchmark cover every kernel whatever the shape heuristics pick.

/// Environment overrides of the CUDA dispatch (see src/cuda/mod.rs). Names starting with
/// "x-" are experimental kernels: their mismatches are reported but do not fail the check.
pub(crate) const VARIANTS: &[(&str, &[(&str, &str)])] = &[
    (
        "gemm-small",
        &[
            ("BITLINEAR_CUDA_FORCE_GEMM", "1"),
            ("BITLINEAR_CUDA_GEMM_TILE", "small"),
        ],
    ),
    (
        "gemm-big",
        &[("BITLINEAR_CUDA_FORCE_GEMM", "1"), ("BITLINEAR_CUDA_GEMM_TILE", "big")],
    ),
    (
        "gemm-wide",
        &[("BITLINEAR_CUDA_FORCE_GEMM", "1"), ("BITLINEAR_CUDA_GEMM_TILE", "wide")],
    ),
    (
        "gemm-small-nosplit",
        &[
            ("BITLINEAR_CUDA_FORCE_GEMM", "1"),
            ("BITLINEAR_CUDA_GEMM_TILE", "small"),
            ("BITLINEAR_CUDA_SPLITK", "1"),
        ],
    ),
    (
        "gemm-big-split5",
        &[
            ("BITLINEAR_CUDA_FORCE_GEMM", "1"),
            ("BITLINEAR_CUDA_GEMM_TILE", "big"),
            ("BITLINEAR_CUDA_SPLITK", "5"),
        ],
    ),
    ("no-fuse", &[("BITLINEAR_CUDA_NO_FUSE", "1")]),
    ("fuse", &[("BITLINEAR_CUDA_FUSE", "1")]),
    ("skinny", &[("BITLINEAR_CUDA_NO_GEMV", "1")]),
    ("gemv-l8", &[("BITLINEAR_CUDA_GEMV_LANES", "8")]),
    ("gemv-l16", &[("BITLINEAR_CUDA_GEMV_LANES", "16")]),
    ("gemv-l32", &[("BITLINEAR_CUDA_GEMV_LANES", "32")]),
    ("gemv-bulk-x", &[("BITLINEAR_CUDA_GEMV_BULK_X", "1")]),
    ("gemv-no-bulk-x", &[("BITLINEAR_CUDA_GEMV_BULK_X", "0")]),
    ("gemv-early", &[("BITLINEAR_CUDA_GEMV_EARLY", "1")]),
    ("gemv-late", &[("BITLINEAR_CUDA_GEMV_EARLY", "0")]),
    ("skinny-rows16", &[("BITLINEAR_CUDA_SKINNY_ROWS", "16")]),
    ("skinny-rows32", &[("BITLINEAR_CUDA_SKINNY_ROWS", "32")]),
    ("no-pdl", &[("BITLINEAR_CUDA_NO_PDL", "1")]),
    ("no-early-weights", &[("BITLINEAR_CUDA_NO_EARLY_WEIGHTS", "1")]),
    (
        "no-early",
        &[
            ("BITLINEAR_CUDA_NO_EARLY_WEIGHTS", "1"),
            ("BITLINEAR_CUDA_NO_EARLY_TRIGGER", "1"),
        ],
    ),
    (
        "gemm-tma",
        &[("BITLINEAR_CUDA_FORCE_GEMM", "1"), ("BITLINEAR_CUDA_GEMM_TILE", "tma")],
    ),
    (
        "gemm-tma-no-store",
        &[
            ("BITLINEAR_CUDA_FORCE_GEMM", "1"),
            ("BITLINEAR_CUDA_GEMM_TILE", "tma"),
            ("BITLINEAR_CUDA_TMA_STORE", "0"),
        ],
    ),
    (
        "gemm-tma192",
        &[
            ("BITLINEAR_CUDA_FORCE_GEMM", "1"),
            ("BITLINEAR_CUDA_GEMM_TILE", "tma192"),
        ],
    ),
    (
        "gemm-tma128",
        &[
            ("BITLINEAR_CUDA_FORCE_GEMM", "1"),
            ("BITLINEAR_CUDA_GEMM_TILE", "tma128"),
        ],
    ),
    (
        "gemm-tma128-nosplit",
        &[
            ("BITLINEAR_CUDA_FORCE_GEMM", "1"),
            ("BITLINEAR_CUDA_GEMM_TILE", "tma128"),
            ("BITLINEAR_CUDA_SPLITK", "1"),
        ],
    ),
    (
        "gemm-tma128-split3-no-store",
        &[
            ("BITLINEAR_CUDA_FORCE_GEMM", "1"),
            ("BITLINEAR_CUDA_GEMM_TILE", "tma128"),
            ("BITLINEAR_CUDA_SPLITK", "3"),
            ("BITLINEAR_CUDA_TMA_STORE", "0"),
        ],
    ),
    (
        "gemm-tma64",
        &[
            ("BITLINEAR_CUDA_FORCE_GEMM", "1"),
            ("BITLINEAR_CUDA_GEMM_TILE", "tma64"),
        ],
    ),
    (
        "gemm-tma-one-tile",
        &[
            ("BITLINEAR_CUDA_FORCE_GEMM", "1"),
            ("BITLINEAR_CUDA_GEMM_TILE", "tma"),
            ("BITLINEAR_CUDA_TMA_ONE_TILE", "1"),
        ],
    ),
];

/// Mismatches of the experimental ("x-") variants, reported at the end of the check.
pub(crate) static EXPERIMENTAL_FAILS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `f` with the environment variables `vars` set, then puts back what they were (so that
/// overrides given to the whole process hold for every shape).
pub(crate) fn with_env<T>(vars: &[(&str, &str)], f: impl FnOnce() -> T) -> T {
    let before: Vec<(&str, Option<std::ffi::OsString>)> = vars.iter().map(|(k, _)| (*k, std::env::var_os(k))).collect();
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    let r = f();
    for (k, old) in before {
        match old {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    r
}
