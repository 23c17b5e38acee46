//! Compiles `kernels/decode.cu` and `kernels/head.cu` to PTX with nvcc when the `cuda` feature is
//! on (see the `cuda-build` crate); `src/fused/cuda.rs` and `src/fused/head.rs` embed them with
//! `include_str!`.
fn main() {
    cuda_build::rerun_if_changed(&["kernels/common.cuh"]);
    cuda_build::build_ptx("decode");
    cuda_build::build_ptx("head");
}
