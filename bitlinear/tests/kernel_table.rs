//! The values the host and the kernels share, checked against the kernel sources (runs without
//! a GPU): every kernel name a plan or a launch can ask for is instantiated in `kernels/*.cu`;
//! the GEMV's (lanes, chunks) table, block sizes and warp counts, the GEMM tiles' shapes,
//! threads and shared memory agree with the macros that instantiate them.

use std::collections::HashSet;

use bitlinear::plan::{
    act_quant_plan, plan, plan_normed_gemv, ActLayout, DeviceInfo, ForcedChoices, GemmTile, KernelKind, KernelSettings,
    Plan, Problem, GEMV_SHAPES, GEMV_WARPS, QUANT_THREADS, SKINNY_THREADS,
};
use candle_core::DType;
use regex::Regex;

const ACT_QUANT: &str = include_str!("../kernels/act_quant.cu");
const WEIGHT_QUANT: &str = include_str!("../kernels/weight_quant.cu");
const GEMM: &str = include_str!("../kernels/gemm.cu");
const GEMM90A: &str = include_str!("../kernels/gemm90a.cu");
const GEMV: &str = include_str!("../kernels/gemv.cu");
const GEMV_STREAM: &str = include_str!("../kernels/gemv_stream.cu");
const SKINNY: &str = include_str!("../kernels/skinny.cu");
const HOST: [&str; 3] = [
    include_str!("../src/cuda/matmul.rs"),
    include_str!("../src/cuda/gemm.rs"),
    include_str!("../src/cuda/quantize.rs"),
];

fn caps<'a>(re: &str, src: &'a str) -> Vec<Vec<&'a str>> {
    Regex::new(re)
        .unwrap()
        .captures_iter(src)
        .map(|c| c.iter().skip(1).map(|m| m.map_or("", |m| m.as_str())).collect())
        .collect()
}

fn num(s: &str) -> usize {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s}"))
}

/// The value of `#define NAME <number>` in `src`.
fn define(src: &str, name: &str) -> usize {
    let c = caps(&format!(r"(?m)^#define {name} (\d+)"), src);
    assert_eq!(c.len(), 1, "#define {name}");
    num(c[0][0])
}

/// The (lanes, chunks) pairs of `GV_MRS`.
fn gemv_pairs() -> Vec<(usize, usize)> {
    let body = &GEMV[GEMV.find("#define GV_MRS").unwrap()..];
    let body = &body[..body.find("\n\n").unwrap()];
    caps(r"LT\((\d+), (\d+), XT", body)
        .iter()
        .map(|c| (num(c[0]), num(c[1])))
        .collect()
}

/// (BM, BN, threads, stages) of `GEMM_INST` per tile name.
fn mma_tiles() -> Vec<(String, (usize, usize, usize, usize))> {
    caps(
        r"GEMM_INST\((\d+), (\d+), (\d+), (\d+), (\d+), \d+, OT, gemm_(\w+)_##ON\)",
        GEMM,
    )
    .iter()
    .map(|c| {
        (
            c[5].to_string(),
            (num(c[0]), num(c[1]), num(c[2]) * num(c[3]) * 32, num(c[4])),
        )
    })
    .collect()
}

/// Every kernel the sources instantiate, by expanding their instantiation macros.
fn instantiated() -> HashSet<String> {
    let mut names = HashSet::new();
    for c in caps(r"(?m)^GV_MRS\(\w+, \w+, (\w+), (\w+), (GV_LT(?:_E)?)\)", GEMV) {
        for (l, t) in gemv_pairs() {
            let base = format!("gemv_{}_{}_l{l}_t{t}", c[0], c[1]);
            let sfx: &[&str] = if c[2] == "GV_LT_E" {
                &["", "_bx", "_e", "_bx_e", "_an", "_an_e", "_rn", "_rn_e"]
            } else {
                &["", "_bx"]
            };
            names.extend(sfx.iter().map(|s| format!("{base}{s}")));
        }
    }
    for c in caps(r"(?m)^GS_INST\(\w+, \w+, (\w+), (\w+)\)", GEMV_STREAM) {
        names.insert(format!("gemv_stream_{}_{}", c[0], c[1]));
    }
    let vecs = caps(
        r"SK_INST\(MT, \d, \d+, XT, OT, skinny_##XN##_##ON##_m##MT##_v(\d+)(_n1)?\)",
        SKINNY,
    );
    let mts = caps(r"SK_VECS\((\d), XT, OT, XN, ON\)", SKINNY);
    for c in caps(r"(?m)^SK_MTS\(\w+, \w+, (\w+), (\w+)\)", SKINNY) {
        for mt in &mts {
            for v in &vecs {
                names.insert(format!("skinny_{}_{}_m{}_v{}{}", c[0], c[1], mt[0], v[0], v[1]));
            }
        }
    }
    for c in caps(r"(?m)^GEMM_OUT\(\w+, (\w+)\)", GEMM) {
        for (tile, _) in mma_tiles() {
            names.insert(format!("gemm_{tile}_{}", c[0]));
        }
    }
    for c in caps(r"(?m)^SPLITK_EPI\(\w+, (\w+)\)", GEMM) {
        names.insert(format!("splitk_epilogue_{}", c[0]));
    }
    for c in caps(r"(?m)^TM_INST\((\w+),", GEMM90A) {
        names.insert(c[0].to_string());
    }
    for src in [ACT_QUANT, WEIGHT_QUANT] {
        let templates = caps(r"\n\s+(\w+)_##SUF\(", src);
        for c in caps(r"(?m)^INSTANTIATE\(\w+, (\w+)\)", src) {
            names.extend(templates.iter().map(|t| format!("{}_{}", t[0], c[0])));
        }
        for c in caps(r#"extern "C" __global__ void __launch_bounds__\(QT\)\s+(\w+)\("#, src) {
            names.insert(c[0].to_string());
        }
    }
    names
}

#[test]
fn shared_constants_agree() {
    assert_eq!(define(GEMV, "GV_WARPS"), GEMV_WARPS);
    assert_eq!(define(GEMV_STREAM, "GS_WARPS"), bitlinear::plan::GEMV_STREAM_WARPS);
    assert_eq!(define(SKINNY, "SK_WARPS") * 32, SKINNY_THREADS);
    assert_eq!(define(ACT_QUANT, "QT"), QUANT_THREADS);
    assert_eq!(define(WEIGHT_QUANT, "QT"), QUANT_THREADS);
    assert_eq!(define(GEMM, "BK"), bitlinear::plan::GEMM_BK);
    assert_eq!(define(GEMM90A, "TM_BK"), bitlinear::plan::GEMM_BK);
    let mut pairs = gemv_pairs();
    pairs.sort_unstable();
    let mut table = GEMV_SHAPES.to_vec();
    table.sort_unstable();
    assert_eq!(pairs, table, "GV_MRS in kernels/gemv.cu and plan::GEMV_SHAPES");
}

#[test]
fn gemm_tiles_agree_with_their_instantiations() {
    let (xs, ws) = (define(GEMM, "XS_STRIDE"), define(GEMM, "WS_STRIDE"));
    let settings = |tile| KernelSettings {
        force: ForcedChoices {
            kernel: Some(KernelKind::Gemm),
            gemm_tile: Some(tile),
            gemm_splits: Some(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let problem = Problem::new(4096, 4096, 4096, Some(DType::BF16), DType::BF16);
    let tiles = mma_tiles();
    assert_eq!(tiles.len(), 3);
    for (name, (bm, bn, threads, stages)) in tiles {
        let tile = GemmTile::ALL.into_iter().find(|t| t.name() == name).unwrap();
        assert_eq!(tile.shape(), (bm, bn, threads as u32), "{name}");
        let Plan::Gemm(p) = plan(&problem, &DeviceInfo::sm90(132), &settings(tile)).unwrap() else {
            panic!()
        };
        assert_eq!(p.smem_bytes, stages * (bm * xs + bn * ws), "{name}: shared memory");
    }
    // TM_INST(name, OT, BT, SPLIT, WGS): BT tokens x 64 WGS weight rows, 128 (WGS + 1) threads
    let tma = caps(r"(?m)^TM_INST\(gemm_(\w+?)_(\w+), \w+, (\d+), \w+, (\d)\)", GEMM90A);
    assert_eq!(tma.len(), 17);
    let stages = caps(r"STAGES = BT == 256 \? (\d) : \(BT == 192 \? (\d) : (\d)\)", GEMM90A);
    let stages = |bt: usize| {
        num(stages[0][if bt == 256 {
            0
        } else if bt == 192 {
            1
        } else {
            2
        }])
    };
    for c in tma {
        let tile = GemmTile::ALL.into_iter().find(|t| t.name() == c[0]).unwrap();
        let (bt, wgs) = (num(c[2]), num(c[3]));
        assert_eq!(tile.shape(), (bt, 64 * wgs, 128 * (wgs as u32 + 1)), "{}", c[0]);
        let Plan::Gemm(p) = plan(&problem, &DeviceInfo::sm90(132), &settings(tile)).unwrap() else {
            panic!()
        };
        let bn = 64 * wgs;
        let ep = if bt == 256 { 128 } else { 64 };
        let expect = stages(bt) * (bt * 128 + bn * 32) + 2 * ep * bn * 2 + 16 * stages(bt) + 8 * bt + 1024;
        assert_eq!(p.smem_bytes, expect, "{}: shared memory", c[0]);
    }
}

/// Plans over many shapes, dtypes, alignments and forced settings: each names a built kernel.
#[test]
fn every_planned_kernel_is_built() {
    let built = instantiated();
    assert!(built.len() > 300, "{} kernels found: the parser lost some", built.len());
    let sfx = |d: DType| match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "i32",
    };
    let mut forced: Vec<KernelSettings> = vec![KernelSettings::default()];
    for kernel in [KernelKind::Gemv, KernelKind::Skinny, KernelKind::Gemm] {
        for tile in [None].into_iter().chain(GemmTile::ALL.map(Some)) {
            for splits in [None, Some(3)] {
                forced.push(KernelSettings {
                    force: ForcedChoices {
                        kernel: Some(kernel),
                        gemm_tile: tile,
                        gemm_splits: splits,
                        skinny_rows: Some(16),
                        gemv_lanes: Some(8),
                        gemv_bulk_x: Some(true),
                        gemv_early_weights: Some(true),
                        skinny_fused_quant: Some(true),
                        gemv_stream: (kernel == KernelKind::Gemv).then_some(true),
                        ..Default::default()
                    },
                    ..Default::default()
                });
            }
        }
    }
    let devices = [
        DeviceInfo::sm90(132),
        DeviceInfo {
            compute_capability: (8, 0),
            ..DeviceInfo::sm90(108)
        },
    ];
    let mut checked = 0;
    for m in [1, 2, 5, 9, 16, 17, 32, 33, 128, 1000, 4096] {
        for (n, k) in [
            (64, 64),
            (100, 1000),
            (2560, 2560),
            (13824, 2560),
            (2560, 6912),
            (96, 8192),
            (3, 4100),
            (55296, 5120),
            (5120, 27648),
        ] {
            for x in [None, Some(DType::F32), Some(DType::BF16), Some(DType::F16)] {
                let out = x.unwrap_or(DType::I32);
                for (align, settled) in [(256, true), (256, false), (4, true), (1, false)] {
                    let problem = Problem {
                        weight_align: align,
                        weights_settled: settled,
                        ..Problem::new(m, n, k, x, out)
                    };
                    for d in &devices {
                        for s in &forced {
                            let name = match plan(&problem, d, s).unwrap() {
                                Plan::Gemv(p) => p.kernel_name(x.map_or("i8", sfx), sfx(out)),
                                Plan::GemvStream(p) => p.kernel_name(x.map_or("i8", sfx), sfx(out)),
                                Plan::Skinny(p) if p.fused_quant => p.kernel_name(sfx(out), sfx(out)),
                                Plan::Skinny(p) => p.kernel_name("i8", sfx(out)),
                                Plan::Gemm(p) => p.kernel_name(sfx(out)),
                                p => panic!("{p:?}"),
                            };
                            assert!(built.contains(&name), "{problem:?} {s:?}: {name} is not built");
                            checked += 1;
                            // the input-norm GEMV of the same problem (packed_matmul_normed)
                            if let Some(p) = plan_normed_gemv(&problem, d, s).unwrap() {
                                for norm in ["an", "rn"] {
                                    let name = p.normed_kernel_name(sfx(out), norm);
                                    assert!(built.contains(&name), "{problem:?} {s:?}: {name} is not built");
                                }
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 10_000);
    for k in [64usize, 1000, 4096, 5000] {
        for layout in [
            ActLayout::Codes,
            ActLayout::Permuted {
                ld: k.div_ceil(128) * 128,
            },
            ActLayout::Fake,
        ] {
            let p = act_quant_plan(7, k, layout, k % 16 == 0, &devices[0], &KernelSettings::default());
            for x in ["f32", "bf16", "f16"] {
                assert!(built.contains(&p.kernel_name(x)), "{}", p.kernel_name(x));
            }
        }
    }
}

/// The kernels the host launches by a literal name (`ctx.func(Module::.., "name")`, or a
/// `format!` over the dtype suffixes) are built.
#[test]
fn every_named_kernel_is_built() {
    let built = instantiated();
    let placeholder = Regex::new(r"\{[^}]*\}").unwrap();
    let mut seen = 0;
    for src in HOST {
        for c in caps(r#"ctx\.func\(Module::\w+, &?(?:format!\()?"([^"]+)""#, src) {
            let names: Vec<String> = if c[0].contains('{') {
                ["f32", "bf16", "f16"]
                    .iter()
                    .map(|s| placeholder.replace_all(c[0], *s).into_owned())
                    .collect()
            } else {
                vec![c[0].to_string()]
            };
            for name in names {
                assert!(built.contains(&name), "{name} (host name {}) is not built", c[0]);
                seen += 1;
            }
        }
    }
    assert!(seen >= 20, "only {seen} kernel names found in the host sources");
}
