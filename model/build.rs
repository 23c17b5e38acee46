//! Compiles `kernels/norm_gelu.cu` to PTX with nvcc when the `cuda`
//! feature is on (see the `cuda-build` crate); it is embedded with `include_str!`.
fn main() {
    cuda_build::build_ptx("norm_gelu");
}
