//! Tests of the top-level choice between the kernels (`plan`).

use super::*;

fn h100() -> DeviceInfo {
    DeviceInfo::sm90(132)
}

fn run(p: &Problem) -> Plan {
    plan(p, &h100(), &KernelSettings::default()).unwrap()
}

fn bf16(m: usize, n: usize, k: usize) -> Problem {
    Problem::new(m, n, k, Some(DType::BF16), DType::BF16)
}

#[test]
fn empty_and_zero_k_launch_no_matmul() {
    for (m, n, k) in [(0, 5, 8), (3, 0, 8), (0, 0, 0), (0, 4, 0)] {
        assert_eq!(run(&bf16(m, n, k)), Plan::Empty, "{m} x {n} x {k}");
    }
    assert_eq!(run(&bf16(3, 5, 0)), Plan::Zeros);
    assert_eq!(run(&Problem::new(1, 5, 0, None, DType::I32)), Plan::Zeros);
}

#[test]
fn each_kernel_where_the_rules_put_it() {
    assert!(matches!(run(&bf16(1, 2560, 2560)), Plan::Gemv(_)));
    // the GEMV needs K % 64 == 0, K <= 8192, aligned weights and x of the output dtype
    assert!(matches!(run(&bf16(1, 2560, 2500)), Plan::Skinny(_)));
    assert!(matches!(run(&bf16(1, 2560, 16384)), Plan::GemvStream(_)));
    assert!(matches!(run(&bf16(1, 2560, 65536)), Plan::Skinny(_)));
    let unaligned = Problem {
        weight_align: 8,
        ..bf16(1, 2560, 2560)
    };
    assert!(matches!(run(&unaligned), Plan::Skinny(_)));
    assert!(matches!(
        run(&Problem::new(1, 64, 64, Some(DType::F32), DType::BF16)),
        Plan::Skinny(_)
    ));
    assert!(matches!(run(&Problem::new(1, 64, 64, None, DType::I32)), Plan::Gemv(_)));
    assert!(matches!(run(&bf16(4, 2560, 2560)), Plan::Skinny(_)));
    assert!(matches!(run(&bf16(32, 2560, 2560)), Plan::Gemm(_)));
    assert!(matches!(run(&bf16(4096, 4096, 4096)), Plan::Gemm(_)));
    // x too large for the skinny kernel's shared memory: the GEMM
    assert!(matches!(run(&bf16(8, 64, 65536)), Plan::Gemm(_)));
}

#[test]
fn forced_kernels_hold_where_they_can_run() {
    let force = |kernel| KernelSettings {
        force: ForcedChoices {
            kernel: Some(kernel),
            ..Default::default()
        },
        ..Default::default()
    };
    let d = h100();
    let gemm = force(KernelKind::Gemm);
    assert!(matches!(plan(&bf16(1, 2560, 2560), &d, &gemm).unwrap(), Plan::Gemm(_)));
    assert!(matches!(plan(&bf16(4, 2560, 2560), &d, &gemm).unwrap(), Plan::Gemm(_)));
    let skinny = force(KernelKind::Skinny);
    assert!(matches!(
        plan(&bf16(1, 2560, 2560), &d, &skinny).unwrap(),
        Plan::Skinny(_)
    ));
    assert!(matches!(
        plan(&bf16(32, 2560, 2560), &d, &skinny).unwrap(),
        Plan::Skinny(_)
    ));
    // more rows than the skinny kernel takes
    assert!(matches!(
        plan(&bf16(33, 2560, 2560), &d, &skinny).unwrap(),
        Plan::Gemm(_)
    ));
    // the GEMV where it fits; elsewhere the rules
    let gemv = force(KernelKind::Gemv);
    assert!(matches!(plan(&bf16(1, 64, 64), &d, &gemv).unwrap(), Plan::Gemv(_)));
    assert!(matches!(plan(&bf16(2, 64, 64), &d, &gemv).unwrap(), Plan::Skinny(_)));
}

#[test]
fn early_weights_follow_settledness_and_settings() {
    let settled = Problem {
        weights_settled: true,
        ..bf16(1, 2560, 2560)
    };
    let Plan::Gemv(g) = run(&settled) else { panic!() };
    assert!(g.early_weights);
    let off = KernelSettings {
        early_weights: false,
        ..Default::default()
    };
    let Plan::Gemv(g) = plan(&settled, &h100(), &off).unwrap() else {
        panic!()
    };
    assert!(!g.early_weights);
    let Plan::Skinny(s) = plan(&bf16(4, 2560, 2560), &h100(), &off).unwrap() else {
        panic!()
    };
    assert!(!s.early_weights);
}

#[test]
fn plans_print_every_parameter() {
    let text = format!("{:?}", run(&bf16(1, 13824, 2560)));
    for field in [
        "lanes: 8",
        "chunks: 5",
        "blocks:",
        "bulk_x: true",
        "early_weights: false",
        "smem_bytes:",
    ] {
        assert!(text.contains(field), "{text}");
    }
}

#[test]
fn alignment_of_addresses() {
    assert_eq!(Problem::align_of(0), 256);
    assert_eq!(Problem::align_of(0x7f00_0000_1000), 256);
    assert_eq!(Problem::align_of(0x7f00_0000_1010), 16);
    assert_eq!(Problem::align_of(0x7f00_0000_1004), 4);
    assert_eq!(Problem::align_of(0x7f00_0000_1003), 1);
}

/// The streaming GEMV takes decode where `K` is past the GEMV's limit or, from K = 3072, the GEMV
/// would run more blocks than SMs (20480 x 3200: 8 rows a warp, 160 blocks); weights within one
/// wave of the GEMV or of a smaller K (27648 x 2560) stay on it, and so does the input-norm
/// GEMV; never with unaligned weights, more rows or a mixed dtype; forced either way where it can
/// run.
#[test]
fn streaming_gemv_for_large_weights() {
    let stream = |p: &Problem| match run(p) {
        Plan::GemvStream(s) => Some(s),
        _ => None,
    };
    for (n, k) in [
        (13824, 2560),
        (2560, 2560),
        (20480, 2560),
        (4800, 3200),
        (1, 8192),
        (27648, 2560),
        (17408, 2048),
    ] {
        assert!(matches!(run(&bf16(1, n, k)), Plan::Gemv(_)), "{n} x {k}");
    }
    for (n, k) in [
        (5120, 27648),
        (3200, 10240),
        (1, 8256),
        (20480, 3200),
        (27648, 5120),
        (55296, 5120),
    ] {
        let s = stream(&bf16(1, n, k)).unwrap_or_else(|| panic!("{n} x {k}"));
        assert_eq!((s.blocks, s.smem_bytes, s.early_weights), (132, k, false), "{n} x {k}");
        assert!(matches!(
            run(&Problem::new(1, n, k, None, DType::I32)),
            Plan::GemvStream(_)
        ));
    }
    let settled = Problem {
        weights_settled: true,
        ..bf16(1, 5120, 27648)
    };
    assert!(!stream(&settled).unwrap().early_weights, "early only where forced");
    let early = KernelSettings {
        force: ForcedChoices {
            gemv_early_weights: Some(true),
            ..Default::default()
        },
        ..Default::default()
    };
    let Plan::GemvStream(s) = plan(&settled, &h100(), &early).unwrap() else {
        panic!("stream")
    };
    assert!(s.early_weights);
    let unaligned = Problem {
        weight_align: 8,
        ..bf16(1, 5120, 27648)
    };
    assert!(matches!(run(&unaligned), Plan::Skinny(_)));
    assert!(matches!(run(&bf16(2, 5120, 27648)), Plan::Skinny(_) | Plan::Gemm(_)));
    assert!(matches!(
        run(&Problem::new(1, 5120, 27648, Some(DType::F32), DType::BF16)),
        Plan::Skinny(_)
    ));
    let force = |on| KernelSettings {
        force: ForcedChoices {
            gemv_stream: Some(on),
            ..Default::default()
        },
        ..Default::default()
    };
    let d = h100();
    let Plan::Gemv(g) = plan(&bf16(1, 20480, 3200), &d, &force(false)).unwrap() else {
        panic!("forced off: the GEMV")
    };
    assert_eq!(g.blocks, 160);
    assert!(plan_normed_gemv(&bf16(1, 20480, 3200), &d, &KernelSettings::default())
        .unwrap()
        .is_some());
    assert!(plan_normed_gemv(&bf16(1, 5120, 27648), &d, &KernelSettings::default())
        .unwrap()
        .is_none());
    assert!(matches!(
        plan(&bf16(1, 13824, 2560), &d, &force(true)).unwrap(),
        Plan::GemvStream(_)
    ));
    assert!(matches!(
        plan(&bf16(1, 5120, 27648), &d, &force(false)).unwrap(),
        Plan::Skinny(_)
    ));
    assert!(matches!(
        plan(&bf16(1, 64, 64), &d, &force(true)).unwrap(),
        Plan::GemvStream(_)
    ));
    assert!(matches!(
        plan(&bf16(1, 64, 65536), &d, &force(true)).unwrap(),
        Plan::Skinny(_)
    ));
}
