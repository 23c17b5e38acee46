//! Fused CUDA kernels for the float parts of a decode step (`kernels/decode.cu`): the residual
//! add with the next RMSNorm, the squared-ReLU gate with the FFN sub-norm, and one kernel for
//! RoPE, the KV-cache write, single-token attention and the attention sub-norm; and the greedy
//! argmax of the logits. With packed projections the norms run inside the next projection's
//! GEMV instead (`bitlinear::packed_matmul_normed`), and the attention kernel leaves its sub-norm
//! to `o_proj`'s; the norm kernels serve the dense model. The step ends in one kernel for the
//! final add + norm, the head and the greedy argmax ([`LmHead`], `kernels/head.cu`).
//! [`BitNetModel::decode_at`] runs them on CUDA devices when
//! [`DecodeKernels::Fused`] is set (the default); the tensor-op form stays the reference and the
//! path of every other device.
//!
//! [`BitNetModel::decode_at`]: crate::BitNetModel::decode_at

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Which kernels run the float parts (norms, residual adds, RoPE, cache, attention) of
/// [`BitNetModel::decode_at`](crate::BitNetModel::decode_at). The projections run on the packed
/// kernels either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeKernels {
    /// Fused kernels where they apply (a CUDA device, one sequence, a head size
    /// that is a power-of-two multiple of 8 up to 256, a cache that fits the attention kernel's
    /// shared memory: [`BitNetModel::decode_fused`](crate::BitNetModel::decode_fused)), candle
    /// tensor ops elsewhere. The float
    /// math differs from the tensor ops only in rounding: f32 inside each kernel where candle
    /// rounds to the model dtype between ops.
    #[default]
    Fused,
    /// candle tensor ops on every device (the reference the fused kernels are tested against).
    TensorOps,
}

/// Whether the fused attention kernel takes `heads` query heads of `d` values over `kv_heads`
/// key/value heads and a cache of `capacity` positions (`kernels/decode.cu`: 16-byte row chunks
/// split evenly over 1024 threads; scores and partial sums in 47 KiB of shared memory).
pub(crate) fn attention_supported(d: usize, heads: usize, kv_heads: usize, capacity: usize) -> bool {
    d.is_multiple_of(8)
        && d <= 256
        && (d / 8).is_power_of_two()
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && capacity > 0
        && launch::attention(heads, capacity, d).is_ok()
        // the sub-norm's block holds at most 16 values a thread
        && heads * d <= 16 * 1024
}

/// `(x + delta, rmsnorm(x + delta) · gamma)`, the sum rounded to the dtype before it is
/// normalised (as the tensor ops do). `x` and `delta` have the same shape, the last dimension
/// `gamma`'s length.
pub(crate) fn add_rms_norm(x: &Tensor, delta: &Tensor, gamma: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let out = x.apply_op3_no_bwd(delta, gamma, &AddRmsNorm { eps: eps as f32 })?;
    let mut shape = vec![2];
    shape.extend_from_slice(x.dims());
    let out = out.reshape(shape)?;
    Ok((out.get(0)?, out.get(1)?))
}

/// `rmsnorm(relu(gate)² · up) · gamma` of `gate_up (..., 2n)`, the stacked gate and up
/// products before their weight scales `[s_gate, s_up]`: each half scaled, then rounded to the
/// dtype where the tensor ops round (the scaled product, the square, the product).
pub(crate) fn relu2_mul_rms_norm(gate_up: &Tensor, scales: &[f32], gamma: &Tensor, eps: f64) -> Result<Tensor> {
    let &[gate_scale, up_scale] = scales else {
        candle_core::bail!("relu2_mul_rms_norm: two weight scales expected, got {}", scales.len())
    };
    let op = Relu2MulRmsNorm {
        eps: eps as f32,
        gate_scale,
        up_scale,
    };
    gate_up.contiguous()?.apply_op2_no_bwd(gamma, &op)
}

/// `add_rms_norm`'s op: reads two `(rows, n)` tensors and a gain `(n,)`.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU runs the tensor ops
struct AddRmsNorm {
    eps: f32,
}

/// `relu2_mul_rms_norm`'s op: reads `(rows, 2n)` and a gain `(n,)`.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU runs the tensor ops
struct Relu2MulRmsNorm {
    eps: f32,
    gate_scale: f32,
    up_scale: f32,
}

impl CustomOp2 for Relu2MulRmsNorm {
    fn name(&self) -> &'static str {
        "bitnet-relu2-mul-rms-norm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: a CUDA kernel (the CPU runs the tensor ops)", self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let kernel = cuda::RowKernel::Relu2MulRmsNorm {
            gate_scale: self.gate_scale,
            up_scale: self.up_scale,
        };
        cuda::row_kernel(kernel, self.eps, (a, al), None, (g, gl))
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "bitnet-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: a CUDA kernel (the CPU runs the tensor ops)", self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::row_kernel(cuda::RowKernel::AddRmsNorm, self.eps, (a, al), Some((b, bl)), (g, gl))
    }
}

pub(crate) use args::AttentionArgs;
pub(crate) use head::{head_supported, Feedback, HeadOutput, LmHead};

/// One token of attention in a layer, on the device (see `decode_attention` in
/// `kernels/decode.cu`), from the stacked q, k and v products `(1, (heads + 2 kv_heads) · d)`
/// before their weight scales: RoPE of q and k at the position held in `pos` (u32 `(1,)`), k and
/// v written into the cache at that position, attention of every query head over the cache up to
/// it, then the layer's `attn_sub_norm` where [`AttentionArgs::sub_norm`] is given. Returns
/// `(1, heads · d)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU runs the tensor ops
pub(crate) struct DecodeAttention<'a> {
    /// The layer state the kernel reads.
    pub args: AttentionArgs<'a>,
    /// Weight scales of q, k and v, applied to their slices of the stacked product.
    pub scales: [f32; 3],
}

impl DecodeAttention<'_> {
    /// Runs the kernel on the stacked projections `qkv` of one token.
    pub fn forward(&self, qkv: &Tensor) -> Result<Tensor> {
        let a = &self.args;
        let (d, h, kvh) = (a.head_dim, a.heads, a.kv_heads);
        let capacity = a.cache_k.dim(2)?;
        if !attention_supported(d, h, kvh, capacity) {
            candle_core::bail!(
                "decode attention: unsupported heads ({h} of {d}, {kvh} KV heads) or cache ({capacity} positions)"
            )
        }
        let n = (h + 2 * kvh) * d;
        if qkv.elem_count() != n || qkv.dtype() != a.cache_k.dtype() {
            candle_core::bail!(
                "decode attention: q, k and v must hold {n} values of {:?}, got {:?} {:?}",
                a.cache_k.dtype(),
                qkv.shape(),
                qkv.dtype()
            )
        }
        // (2, heads · d): the output before the sub-norm, then after it; (1, heads · d) without.
        let out = qkv.contiguous()?.apply_op1_no_bwd(self)?;
        out.get(out.dim(0)? - 1)
    }
}

impl CustomOp1 for DecodeAttention<'_> {
    fn name(&self) -> &'static str {
        "bitnet-decode-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: a CUDA kernel (the CPU runs the tensor ops)", self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, qkv: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::decode_attention(&self.args, self.scales, (qkv, l))
    }
}

/// The index of the first maximum of `xs`, NaN never picked; `None` if all are NaN (or none).
/// The greedy choice, on the host; [`argmax`] on the device.
pub(crate) fn argmax_host(xs: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &x) in xs.iter().enumerate() {
        if !x.is_nan() && best.is_none_or(|b| x > xs[b]) {
            best = Some(i);
        }
    }
    best
}

/// The index of the first maximum of `logits`' values as u32 `(1,)` on the device, `u32::MAX`
/// if every value is NaN (NaN is never picked: the host's greedy sampler). `counter`: one u32,
/// zero between calls of the fused kernels.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU samples on the host
pub(crate) fn argmax(logits: &Tensor, counter: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op1_no_bwd(&Argmax { counter })?
        .narrow(0, 0, 1)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU samples on the host
struct Argmax<'a> {
    counter: &'a Tensor,
}

impl CustomOp1 for Argmax<'_> {
    fn name(&self) -> &'static str {
        "bitnet-argmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: a CUDA kernel (the CPU samples on the host)", self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::argmax(x, l, self.counter)
    }
}

mod args;
#[cfg(feature = "cuda")]
mod cuda;
mod head;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod launch;
#[cfg(all(test, feature = "cuda"))]
mod tests;
