//! Compiles `kernels/train_ops.cu` to PTX with nvcc when the `cuda` feature is on (the same nvcc
//! lookup as bitlinear/build.rs: `$NVCC`, else `$CUDA_ROOT/bin/nvcc` / `$CUDA_PATH/bin/nvcc`,
//! else `nvcc` on the `PATH`). The PTX targets `compute_$CUDA_COMPUTE_CAP` (default 90) and is
//! JIT-compiled by the driver when the module is first loaded; it is embedded with
//! `include_str!`.

use std::path::PathBuf;
use std::process::Command;

const KERNEL: &str = "train_ops";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/{KERNEL}.cu");
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
    let status = Command::new(&nvcc)
        .arg("-ptx")
        .arg(format!("-arch=compute_{cap}"))
        .args(["-O3", "-std=c++17"])
        .arg("-o")
        .arg(out.join(format!("{KERNEL}.ptx")))
        .arg(format!("kernels/{KERNEL}.cu"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc:?} ({e}); set NVCC or CUDA_ROOT"));
    assert!(status.success(), "nvcc failed on kernels/{KERNEL}.cu ({status})");
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
