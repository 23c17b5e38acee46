//! The switches of the CUDA training path ([`CudaTuning`]).

use candle_core::Device;
use model::{ComputeOptions, PoolKernel};

/// Which optimisations of the CUDA training path are on. All are on by default; each can be
/// turned off to measure what it brings (`examples/step_bench.rs`). None changes the variables or
/// the run's results beyond float rounding (fused AdamW sums in another order; `bf16_conv_grads`
/// rounds the convolutions' gradients to bf16), and none has an effect on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaTuning {
    /// AdamW updates each f32 variable with one fused kernel launch, instead of about ten tensor
    /// ops (each a launch).
    pub fused_adamw: bool,
    /// Batches are assembled by one fused kernel from the epoch's sample order and crop/flip
    /// parameters, uploaded once an epoch, instead of tensor ops and an index upload per batch.
    pub fused_augment: bool,
    /// cudarc's per-allocation CUDA events (two `cuEventCreate` per buffer) are turned off: they
    /// only order work across streams, and candle uses one stream per device.
    pub disable_event_tracking: bool,
    /// The BitLinear layers are built without their per-call non-finite weight check (on CUDA a
    /// read-back that waits for the stream, in every forward and backward); the trainer checks
    /// all weights once an epoch instead, so diverged weights are still an error.
    pub deferred_finite_check: bool,
    /// Max pooling runs the model's fused kernels instead of generic tensor ops.
    pub fused_pool: bool,
    /// The speed-run network's batch norms and the GELU after each run as one fused op (f32)
    /// instead of about a dozen tensor ops.
    pub fused_norm_gelu: bool,
    /// candle's f32 matrix products (through cuBLAS: the float layers and the backward of the
    /// ternary convolutions and linears) may round their inputs to TF32 and run on tensor cores,
    /// as PyTorch's convolutions do by default. The ternary layers' forward values are integer
    /// products on our own kernels and do not change. Process-wide: candle has one switch.
    pub tf32_matmul: bool,
    /// The ternary convolutions' backward products (input and weight gradients) take bf16
    /// operands and return bf16 sums (f32 accumulation), instead of f32 with TF32
    /// ([`model::ComputeOptions::bf16_conv_grads`]). Unlike the other switches this rounds the
    /// gradients more coarsely (relative 2^-8 instead of TF32's 2^-11), so it changes the run
    /// beyond summation order; measured against the f32 products in bench/RESULTS.md.
    pub bf16_conv_grads: bool,
}

impl Default for CudaTuning {
    fn default() -> Self {
        Self {
            fused_adamw: true,
            fused_augment: true,
            disable_event_tracking: true,
            deferred_finite_check: true,
            fused_pool: true,
            fused_norm_gelu: true,
            tf32_matmul: true,
            bf16_conv_grads: true,
        }
    }
}

impl CudaTuning {
    /// Every switch off: the plain candle path.
    pub fn baseline() -> Self {
        Self {
            fused_adamw: false,
            fused_augment: false,
            disable_event_tracking: false,
            deferred_finite_check: false,
            fused_pool: false,
            fused_norm_gelu: false,
            tf32_matmul: false,
            bf16_conv_grads: false,
        }
    }

    /// The model's options on `device`: the defaults on the CPU; on CUDA the finite check, the
    /// pooling and the batch norm + GELU these switches ask for.
    pub fn compute_options(&self, device: &Device) -> ComputeOptions {
        if !device.is_cuda() {
            return ComputeOptions::default();
        }
        ComputeOptions {
            check_finite: !self.deferred_finite_check,
            pool: if self.fused_pool {
                PoolKernel::Fused
            } else {
                PoolKernel::TensorOps
            },
            fused_norm_gelu: self.fused_norm_gelu,
            bf16_conv_grads: self.bf16_conv_grads,
        }
    }
}
