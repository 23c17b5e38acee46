//! Compiles the CUDA kernels in `kernels/` with nvcc when the `cuda` feature is on.
//!
//! Each `kernels/<name>.cu` becomes `$OUT_DIR/<name>.fatbin` holding SASS for
//! `sm_$CUDA_COMPUTE_CAP` (default 90) plus PTX for the same architecture (so a newer GPU can
//! JIT it), except `gemm90a.cu` (wgmma, TMA), which is built for `sm_90a` only (an empty file for
//! other targets); `src/cuda` embeds them with `include_bytes!`. nvcc and the target come from
//! the `cuda-build` crate.

const KERNELS: &[&str] = &[
    "act_quant",
    "weight_quant",
    "skinny",
    "gemm",
    "gemv",
    "gemv_stream",
    "conv",
    "conv_igemm",
    "conv_bf16",
    "pool",
];
/// Hopper-only kernels (wgmma, TMA): built for sm_90a.
const SM90A_KERNELS: &[&str] = &["gemm90a"];

fn main() {
    let mut watched: Vec<String> = KERNELS.iter().map(|k| format!("kernels/{k}.cu")).collect();
    watched.extend(
        [
            "kernels",
            "kernels/gemm90a.cu",
            "kernels/common.cuh",
            "kernels/mma_tile.cuh",
            "kernels/tma.cuh",
            "kernels/wgmma.cuh",
        ]
        .map(String::from),
    );
    cuda_build::rerun_if_changed(&watched.iter().map(String::as_str).collect::<Vec<_>>());
    if !cuda_build::cuda_feature() {
        return;
    }
    let out = cuda_build::out_dir();
    let cap = cuda_build::compute_cap();
    // The gemm90a files use Hopper-only instructions (wgmma): built for sm_90a when targeting 9.0,
    // otherwise replaced by an empty file (the Rust side then reports the kernel as unavailable).
    let mut jobs: Vec<(&str, String)> = KERNELS
        .iter()
        .map(|k| (*k, format!("-gencode=arch=compute_{cap},code=[sm_{cap},compute_{cap}]")))
        .collect();
    for k in SM90A_KERNELS {
        if cap == "90" {
            jobs.push((k, "-gencode=arch=compute_90a,code=sm_90a".to_string()));
        } else {
            std::fs::write(out.join(format!("{k}.fatbin")), b"").expect("write an empty sm_90a fatbin");
        }
    }
    // The files are independent: compile them in parallel.
    let children: Vec<_> = jobs
        .iter()
        .map(|(k, gencode)| {
            let dst = out.join(format!("{k}.fatbin"));
            let args = [
                "-fatbin",
                gencode.as_str(),
                "-O3",
                "-std=c++17",
                "-Xptxas=-warn-spills",
                "-o",
            ]
            .map(String::from)
            .into_iter()
            .chain([dst.display().to_string(), format!("kernels/{k}.cu")])
            .collect::<Vec<_>>();
            (k, cuda_build::spawn_nvcc(&args))
        })
        .collect();
    for (k, child) in children {
        cuda_build::wait_nvcc(child, &format!("kernels/{k}.cu"));
    }
}
