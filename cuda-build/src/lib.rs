//! Helpers for the `build.rs` of crates that compile CUDA kernels with nvcc under their `cuda`
//! feature (bitlinear, model, train).
//!
//! nvcc is `$NVCC`, else `$CUDA_ROOT/bin/nvcc` / `$CUDA_PATH/bin/nvcc`, else `nvcc` on the
//! `PATH`; the target is `$CUDA_COMPUTE_CAP` (default 90, i.e. H100/H200).

use std::path::PathBuf;
use std::process::{Child, Command};

/// Prints the `rerun-if` lines for `build.rs`, the given files and the environment read here.
pub fn rerun_if_changed(files: &[&str]) {
    println!("cargo:rerun-if-changed=build.rs");
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    for v in ["CUDA_COMPUTE_CAP", "NVCC", "CUDA_ROOT", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
}

/// Whether the crate being built has its `cuda` feature on.
pub fn cuda_feature() -> bool {
    std::env::var_os("CARGO_FEATURE_CUDA").is_some()
}

/// The build's `OUT_DIR`.
pub fn out_dir() -> PathBuf {
    PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"))
}

/// The target compute capability as digits, e.g. `"90"` (from `90` or `9.0`).
pub fn compute_cap() -> String {
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    assert!(!cap.is_empty(), "CUDA_COMPUTE_CAP must look like 90 or 9.0");
    cap
}

/// The nvcc to run.
pub fn nvcc_path() -> PathBuf {
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

/// Starts nvcc with `args` (the caller adds the output and input paths).
pub fn spawn_nvcc(args: &[String]) -> Child {
    let nvcc = nvcc_path();
    Command::new(&nvcc)
        .args(args)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {nvcc:?} ({e}); set NVCC or CUDA_ROOT"))
}

/// Waits for an nvcc started by [`spawn_nvcc`] and fails the build if it failed.
pub fn wait_nvcc(child: Child, what: &str) {
    let status = child.wait_with_output().expect("waiting for nvcc").status;
    assert!(status.success(), "nvcc failed on {what} ({status})");
}

/// Compiles `kernels/<kernel>.cu` to `$OUT_DIR/<kernel>.ptx` for `compute_$CUDA_COMPUTE_CAP`
/// (JIT-compiled by the driver at module load), when the `cuda` feature is on.
pub fn build_ptx(kernel: &str) {
    let src = format!("kernels/{kernel}.cu");
    rerun_if_changed(&[&src]);
    if !cuda_feature() {
        return;
    }
    let dst = out_dir().join(format!("{kernel}.ptx"));
    let args = [
        "-ptx".to_string(),
        format!("-arch=compute_{}", compute_cap()),
        "-O3".to_string(),
        "-std=c++17".to_string(),
        "-o".to_string(),
        dst.display().to_string(),
        src.clone(),
    ];
    wait_nvcc(spawn_nvcc(&args), &src);
}
