#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod conv;
mod conv_grad;
mod conv_grad_cpu;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod im2col;
mod implicit_conv;
mod input_norm;
pub mod interop;
mod layer;
mod layer_common;
mod ops;
mod output_grad;
mod packed;
mod packed_conv;
mod packed_conv_cpu;
mod packed_layer;
pub mod plan;
mod pool;
pub mod quant;

pub use conv::{bit_conv2d, bit_conv2d_no_bias, BitConv2d, BitConv2dConfig};
pub use conv_grad::float_conv2d;
pub use device::{cuda_device_info, kernel_settings, packed_accumulate, quantize_activations, set_kernel_settings};
pub use input_norm::{packed_matmul_normed, InputNorm};
pub use layer::{bit_linear, bit_linear_no_bias, bit_linear_with_config, BitLinear};
pub use layer_common::{BitLinearConfig, RMS_NORM_EPS};
pub use ops::{bit_matmul, fake_quantize_activations, fake_quantize_weights, packed_matmul, BitMatmul};
pub use packed::{pack_ternary, packed_len, unpack_ternary, PackedTernary};
pub use packed_conv::PackedBitConv2d;
pub use packed_layer::PackedBitLinear;
pub use pool::{max_pool2x2, max_pool2x2_ops, PoolKernel};
pub use quant::ActScaling;
