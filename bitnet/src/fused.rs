//! Fused CUDA kernels for the float parts of a decode step (`kernels/decode.cu`): the residual
//! add with the next RMSNorm, the squared-ReLU gate with the FFN sub-norm, and one kernel for
//! RoPE, the KV-cache write, single-token attention and the attention sub-norm; and the greedy
//! argmax of the logits. [`BitNetModel::decode_at`] runs them on CUDA devices when
//! [`DecodeKernels::Fused`] is set (the default); the tensor-op form stays the reference and the
//! path of every other device.
//!
//! [`BitNetModel::decode_at`]: crate::BitNetModel::decode_at

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// Which kernels run the float parts (norms, residual adds, RoPE, cache, attention) of
/// [`BitNetModel::decode_at`](crate::BitNetModel::decode_at). The projections run on the packed
/// kernels either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeKernels {
    /// Four fused kernels per layer where they apply (a CUDA device, one sequence, a head size
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
/// split evenly over 1024 threads; scores and partial sums in 48 KiB of shared memory).
pub(crate) fn attention_supported(d: usize, heads: usize, kv_heads: usize, capacity: usize) -> bool {
    d.is_multiple_of(8)
        && d <= 256
        && (d / 8).is_power_of_two()
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && capacity > 0
        && 4 * (capacity + 35 * d) <= 48 * 1024
}

/// `(x + delta, rmsnorm(x + delta) · gamma)`, the sum rounded to the dtype before it is
/// normalised (as the tensor ops do). `x` and `delta` have the same shape, the last dimension
/// `gamma`'s length.
pub(crate) fn add_rms_norm(x: &Tensor, delta: &Tensor, gamma: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let out = x.apply_op3_no_bwd(delta, gamma, &RowKernel::AddRmsNorm { eps: eps as f32 })?;
    let mut shape = vec![2];
    shape.extend_from_slice(x.dims());
    let out = out.reshape(shape)?;
    Ok((out.get(0)?, out.get(1)?))
}

/// `rmsnorm(relu(gate)² · up) · gamma`, rounded to the dtype after the square and the product
/// (as the tensor ops do).
pub(crate) fn relu2_mul_rms_norm(gate: &Tensor, up: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    gate.apply_op3_no_bwd(up, gamma, &RowKernel::Relu2MulRmsNorm { eps: eps as f32 })
}

/// The row kernels: each reads two `(rows, n)` tensors and a gain `(n,)`.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU runs the tensor ops
enum RowKernel {
    AddRmsNorm { eps: f32 },
    Relu2MulRmsNorm { eps: f32 },
}

impl CustomOp3 for RowKernel {
    fn name(&self) -> &'static str {
        match self {
            RowKernel::AddRmsNorm { .. } => "bitnet-add-rms-norm",
            RowKernel::Relu2MulRmsNorm { .. } => "bitnet-relu2-mul-rms-norm",
        }
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
        let (kernel, eps) = match *self {
            RowKernel::AddRmsNorm { eps } => (cuda::RowKernel::AddRmsNorm, eps),
            RowKernel::Relu2MulRmsNorm { eps } => (cuda::RowKernel::Relu2MulRmsNorm, eps),
        };
        cuda::row_kernel(kernel, eps, (a, al), (b, bl), (g, gl))
    }
}

pub(crate) use args::AttentionArgs;

/// One token of attention in a layer, on the device (see `decode_attention` in
/// `kernels/decode.cu`): RoPE of `q (1, heads · d)` and `k (1, kv_heads · d)` at the position
/// held in `pos` (u32 `(1,)`), `k` and `v` written into the cache at that position, attention of
/// every query head over the cache up to it, then the layer's `attn_sub_norm`. Returns
/// `(1, heads · d)`.
pub(crate) struct DecodeAttention<'a>(pub AttentionArgs<'a>);

impl DecodeAttention<'_> {
    /// Runs the kernel on the three projections of one token.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let a = &self.0;
        let (d, h, kvh) = (a.head_dim, a.heads, a.kv_heads);
        let capacity = a.cache_k.dim(2)?;
        if !attention_supported(d, h, kvh, capacity) {
            candle_core::bail!(
                "decode attention: unsupported heads ({h} of {d}, {kvh} KV heads) or cache ({capacity} positions)"
            )
        }
        for (t, n, what) in [(q, h * d, "q"), (k, kvh * d, "k"), (v, kvh * d, "v")] {
            if t.elem_count() != n || t.dtype() != a.cache_k.dtype() {
                candle_core::bail!(
                    "decode attention: {what} must hold {n} values of {:?}, got {:?} {:?}",
                    a.cache_k.dtype(),
                    t.shape(),
                    t.dtype()
                )
            }
        }
        // (2, heads · d): the output before the sub-norm, then after it.
        q.contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, self)?
            .get(1)
    }
}

impl CustomOp3 for DecodeAttention<'_> {
    fn name(&self) -> &'static str {
        "bitnet-decode-attention"
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
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::decode_attention(&self.0, (q, ql), (k, kl), (v, vl))
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
