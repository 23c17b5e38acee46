//! Compiles the CUDA kernels in `kernels/` with nvcc when the `cuda` feature is on.
//!
//! Each `kernels/<name>.cu` becomes `$OUT_DIR/<name>.fatbin` holding SASS for
//! `sm_$CUDA_COMPUTE_CAP` (default 90) plus PTX for the same architecture (so a newer GPU can
//! JIT it), except `gemm90a.cu` (wgmma), which is built for `sm_90a` only, and `gemv.cu` (bulk
//! copies), built for `sm_90` only (both are empty files for other targets); `src/cuda` embeds
//! them with `include_bytes!`. nvcc is `$NVCC`, else
//! `$CUDA_ROOT/bin/nvcc` / `$CUDA_PATH/bin/nvcc`, else `nvcc` on the `PATH`.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["quant", "skinny", "gemm"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    println!("cargo:rerun-if-changed=kernels/gemm90a.cu");
    println!("cargo:rerun-if-changed=kernels/gemv.cu");
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    for v in ["CUDA_COMPUTE_CAP", "NVCC", "CUDA_ROOT", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    assert!(!cap.is_empty(), "CUDA_COMPUTE_CAP must look like 90 or 9.0");
    let nvcc = nvcc_path();
    // gemm90a.cu uses Hopper-only instructions (wgmma): built for sm_90a when targeting 9.0,
    // otherwise replaced by an empty file (the Rust side then reports the kernel as unavailable).
    let mut jobs: Vec<(&str, String)> = KERNELS
        .iter()
        .map(|k| (*k, format!("-gencode=arch=compute_{cap},code=[sm_{cap},compute_{cap}]")))
        .collect();
    // gemv.cu uses the bulk copy engine (cp.async.bulk, sm_90): built only for 9.0 too.
    if cap == "90" {
        jobs.push(("gemm90a", "-gencode=arch=compute_90a,code=sm_90a".to_string()));
        jobs.push(("gemv", "-gencode=arch=compute_90,code=[sm_90,compute_90]".to_string()));
    } else {
        std::fs::write(out.join("gemm90a.fatbin"), b"").expect("write gemm90a.fatbin");
        std::fs::write(out.join("gemv.fatbin"), b"").expect("write gemv.fatbin");
    }
    // The files are independent: compile them in parallel.
    let children: Vec<_> = jobs
        .iter()
        .map(|(k, gencode)| {
            let dst = out.join(format!("{k}.fatbin"));
            let mut cmd = Command::new(&nvcc);
            cmd.arg("-fatbin")
                .arg(gencode)
                .args(["-O3", "-std=c++17", "-Xptxas=-warn-spills"])
                .arg("-o")
                .arg(&dst)
                .arg(format!("kernels/{k}.cu"));
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {nvcc:?} ({e}); set NVCC or CUDA_ROOT"));
            (k, child)
        })
        .collect();
    for (k, child) in children {
        let status = child.wait_with_output().expect("nvcc").status;
        assert!(status.success(), "nvcc failed on kernels/{k}.cu ({status})");
    }
}

fn nvcc_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for root in ["CUDA_ROOT", "CUDA_PATH"] {
        if let Some(r) = std::env::var_os(root) {
            let p = PathBuf::from(r).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}
