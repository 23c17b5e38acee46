//! Compiles `kernels/decode.cu` to PTX with nvcc when the `cuda` feature is on (see the
//! `cuda-build` crate); `src/fused.rs` embeds it with `include_str!`.
fn main() {
    cuda_build::build_ptx("decode");
}
