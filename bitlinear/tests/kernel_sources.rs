//! Source-level guard for the CUDA kernels (runs without a GPU): every kernel is launched with
//! programmatic dependent launch on compute capability 9.0+ (`src/cuda/launch.rs`, `launch!`), so
//! every kernel must call `pdl_wait()` (`kernels/common.cuh`) before it touches global memory;
//! a kernel without it could read its inputs before the previous kernel has written them. (The
//! GEMV, the skinny kernel and the Hopper GEMM request their weights before it only where the
//! host knows that no kernel still running wrote them: `TE` (the `_e` kernels) in gemv.cu,
//! `w_early` in the others.)

const SOURCES: [(&str, &str); 11] = [
    ("act_quant.cu", include_str!("../kernels/act_quant.cu")),
    ("conv.cu", include_str!("../kernels/conv.cu")),
    ("conv_bf16.cu", include_str!("../kernels/conv_bf16.cu")),
    ("conv_igemm.cu", include_str!("../kernels/conv_igemm.cu")),
    ("gemv_stream.cu", include_str!("../kernels/gemv_stream.cu")),
    ("pool.cu", include_str!("../kernels/pool.cu")),
    ("gemm.cu", include_str!("../kernels/gemm.cu")),
    ("gemm90a.cu", include_str!("../kernels/gemm90a.cu")),
    ("gemv.cu", include_str!("../kernels/gemv.cu")),
    ("skinny.cu", include_str!("../kernels/skinny.cu")),
    ("weight_quant.cu", include_str!("../kernels/weight_quant.cu")),
];

/// The text between the `{` at or after `from` and its matching `}`.
fn body_from(src: &str, from: usize) -> &str {
    let open = from + src[from..].find('{').expect("a body");
    let mut depth = 0usize;
    for (i, c) in src[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &src[open + 1..open + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces");
}

/// The body of the function `name` (its definition: `name` followed by `(` and a body, not a
/// call followed by `;`), searched in every source.
fn definition(name: &str) -> Option<&'static str> {
    for (_, src) in SOURCES {
        let mut at = 0;
        while let Some(p) = src[at..].find(name) {
            let start = at + p;
            let rest = &src[start + name.len()..];
            let is_def = rest.starts_with('(')
                && rest.find('{').is_some_and(|b| rest.find(';').is_none_or(|s| b < s))
                && src[..start].trim_end().ends_with("void");
            if is_def {
                return Some(body_from(src, start));
            }
            at = start + name.len();
        }
    }
    None
}

/// Strips `//` comments, so that a mention of `pdl_wait()` in a comment does not count.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_kernel_waits_for_the_previous_one() {
    let mut kernels = 0;
    for (file, src) in SOURCES {
        let mut at = 0;
        while let Some(p) = src[at..].find("__global__") {
            let start = at + p;
            at = start + "__global__".len();
            let body = code(body_from(src, start));
            kernels += 1;
            if body.contains("pdl_wait()") {
                continue;
            }
            // the body forwards to an implementation function: that one must wait
            let callee = body
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .find(|w| w.ends_with("_impl"))
                .unwrap_or_else(|| panic!("{file}: a kernel without pdl_wait() and no *_impl call:\n{body}"));
            let def = definition(callee).unwrap_or_else(|| panic!("{file}: no definition of {callee}"));
            assert!(
                code(def).contains("pdl_wait()"),
                "{file}: kernel calls {callee}, which does not call pdl_wait()"
            );
        }
    }
    // gemm 2, gemm90a 1, gemv 2 (plain, input norm), act_quant 4, weight_quant 7, skinny 1,
    // conv 7, conv_bf16 3, conv_igemm 1, gemv_stream 1, pool 4 (each a definition, often a macro)
    assert_eq!(kernels, 33, "kernel definitions found");
}
