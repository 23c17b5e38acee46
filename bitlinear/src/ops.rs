//! The candle custom ops: the training matmul (quantize both sides, straight-through backward)
//! and the inference matmul over pre-packed weights.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

use crate::device::{self, check_activations, check_same_device, check_weight, cpu_f32, cpu_from_f32};
use crate::packed::{pack_f32, PackedTernary};
use crate::quant::{self, ActScaling};

/// A packed weight as the CPU kernel reads it.
struct PackedView<'a> {
    /// the packed bytes; the grouped layout comes from `layouts` when there is one
    bytes: &'a [u8],
    layouts: Option<&'a crate::cpu::CpuLayouts>,
    n: usize,
    s_w: f32,
}

/// Quantizes `x (m, k)` and runs the packed kernel: `y = (acc · s_x) · s_w` in `dtype`.
fn cpu_forward(
    x: &[f32],
    (m, k): (usize, usize),
    w: PackedView,
    scaling: ActScaling,
    dtype: DType,
) -> Result<CpuStorage> {
    let kernel = crate::device::cpu_kernel();
    let y = crate::cpu::in_pool(m * w.n * k, || {
        let per_tensor = (scaling == ActScaling::PerTensor).then(|| quant::absmax_scale(x));
        let (prep, scales) = crate::cpu::PreparedActivations::quantize(kernel, x, m, k, per_tensor);
        let mut y = vec![0f32; m * w.n];
        let weights = match w.layouts {
            Some(l) => l.get(kernel, w.bytes, w.n, k),
            // a weight packed for this call alone is read once: no conversion
            None => crate::cpu::Weights::Plain(w.bytes),
        };
        crate::cpu::packed_matmul_into(&prep, weights, w.n, k, &mut y, |row, acc| {
            quant::dequantize(acc, scales[row], w.s_w)
        });
        y
    });
    cpu_from_f32(y, dtype)
}

/// The training matmul `y = quant(x) · quant(W)ᵀ` as an op carrying its settings (as candle's
/// `RmsNorm { eps }`): [`bit_matmul`] is `BitMatmul::new(scaling).forward(x, w)`.
///
/// ```
/// use bitlinear::{ActScaling, BitMatmul};
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1.0f32, -2.0, 0.5, 4.0]], &Device::Cpu)?;
/// let w = Tensor::new(&[[0.3f32, -0.3, 0.0, 0.3]], &Device::Cpu)?;
/// // a training loop that checks its weights itself (e.g. once an epoch) skips the per-call check
/// let op = BitMatmul { check_finite: false, ..BitMatmul::new(ActScaling::PerToken) };
/// assert_eq!(op.forward(&x, &w)?.dims(), &[1, 1]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitMatmul {
    /// Activation scale grouping.
    pub scaling: ActScaling,
    /// Whether a NaN or infinite weight is an error (the default). On CUDA the check reads a
    /// flag back to the host, which waits for the stream; with `false` no read-back happens and
    /// a non-finite weight gives NaN outputs instead (for loops that check the weights
    /// themselves, less often). The CPU always checks: it costs nothing there.
    pub check_finite: bool,
}

impl BitMatmul {
    /// The op with `scaling` and the non-finite weight check on.
    pub fn new(scaling: ActScaling) -> Self {
        Self {
            scaling,
            check_finite: true,
        }
    }

    /// `y = quant(x) · quant(W)ᵀ` for `x (M, K)` and a float weight `W (N, K)`: see [`bit_matmul`].
    pub fn forward(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (_, k) = check_activations(x, "bit_matmul")?;
        let (_, kw) = check_weight(w, "bit_matmul")?;
        if k != kw {
            bail!("bit_matmul: input has {k} features, the weight expects {kw}")
        }
        check_same_device(x, w, "bit_matmul")?;
        x.contiguous()?.apply_op2(&w.contiguous()?, *self)
    }
}

impl CustomOp2 for BitMatmul {
    fn name(&self) -> &'static str {
        "bit-matmul"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (&[m, k], &[n, _]) = (xl.dims(), wl.dims()) else {
            bail!("bit-matmul: internal error, expected rank-2 operands")
        };
        let (bytes, s_w) = pack_f32(&cpu_f32(ws, wl)?, n, k)?;
        let w = PackedView {
            bytes: &bytes,
            layouts: None,
            n,
            s_w,
        };
        let y = cpu_forward(&cpu_f32(xs, xl)?, (m, k), w, self.scaling, xs.dtype())?;
        Ok((y, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        crate::cuda::bit_matmul(xs, xl, ws, wl, self.scaling == ActScaling::PerTensor, self.check_finite)
    }

    /// Straight-through estimator: the rounding is treated as the identity, so the gradients are
    /// those of a float matmul with the dequantized operands `W~ = W_q·s_w` and `x~ = x_q·s_x`:
    /// `grad_x = grad_y · W~` and `grad_W = grad_yᵀ · x~`, each cast back to its operand's dtype.
    /// `W~` and `x~` are formed in the operands' dtypes. On CUDA, when `x`, `W` and `grad_y` share
    /// a half dtype (bf16 or f16), the two products run on cuBLAS in that dtype: its tensor cores
    /// accumulate in f32 and round once to the output dtype, the same single rounding as the f32
    /// product's cast, so the results differ from the f32 path only in summation order. Otherwise
    /// (and always on the CPU) the products are computed in f32.
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad_y: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ((m, k), n) = (x.dims2()?, w.dim(0)?);
        if m == 0 || n == 0 || k == 0 {
            // sums over nothing: zeros (and no kernel on zero elements, which CUDA rejects)
            let grad_x = device::zeros(&[m, k], x.dtype(), x.device())?;
            let grad_w = device::zeros(&[n, k], w.dtype(), w.device())?;
            return Ok((Some(grad_x), Some(grad_w)));
        }
        let half = matches!(x.dtype(), DType::BF16 | DType::F16);
        let same = x.dtype() == w.dtype() && x.dtype() == grad_y.dtype();
        let product = if half && same && x.device().is_cuda() {
            x.dtype()
        } else {
            DType::F32
        };
        let g = grad_y.to_dtype(product)?;
        let w_deq = fake_quant_weights(w, self.check_finite, false)?.to_dtype(product)?;
        let x_deq = fake_quantize_activations(x, self.scaling)?.to_dtype(product)?;
        let grad_x = g.matmul(&w_deq)?.to_dtype(x.dtype())?;
        let grad_w = g.t()?.matmul(&x_deq)?.to_dtype(w.dtype())?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// Inference matmul over a pre-packed weight.
#[derive(Debug, Clone)]
struct PackedMatmul {
    k: usize,
    s_w: f32,
    scaling: ActScaling,
    /// the weight's grouped layouts for the CPU kernels
    cpu_layouts: crate::cpu::CpuLayouts,
    /// the weight's settled state on CUDA (`cuda::settle`)
    #[cfg(feature = "cuda")]
    settled: crate::cuda::Settled,
}

impl CustomOp2 for PackedMatmul {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (&[m, _], &[n, _]) = (xl.dims(), bl.dims()) else {
            bail!("packed-matmul: internal error, expected rank-2 operands")
        };
        let bytes = device::cpu_u8(bs, bl)?;
        let w = PackedView {
            bytes,
            layouts: Some(&self.cpu_layouts),
            n,
            s_w: self.s_w,
        };
        let y = cpu_forward(&cpu_f32(xs, xl)?, (m, self.k), w, self.scaling, xs.dtype())?;
        Ok((y, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, bs: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        let per_tensor = self.scaling == ActScaling::PerTensor;
        crate::cuda::packed_matmul(xs, xl, bs, bl, self.k, self.s_w, per_tensor, &self.settled)
    }
}

/// Elementwise "fake quantization" (quantize then dequantize) used by the backward pass.
#[derive(Debug, Clone, Copy)]
enum FakeQuant {
    /// with the non-finite check on CUDA (see [`BitMatmul::check_finite`]; the CPU always checks)
    Weights {
        #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
        check_finite: bool,
        /// codes against each row's absmean ([`quant::channel_codes`])
        per_channel: bool,
    },
    Activations(ActScaling),
}

impl CustomOp1 for FakeQuant {
    fn name(&self) -> &'static str {
        "bitlinear-fake-quant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = cpu_f32(s, l)?;
        let out: Vec<f32> = match (*self, l.dims()) {
            (FakeQuant::Weights { per_channel: true, .. }, &[n, k]) => {
                let Some((codes, s_w)) = quant::channel_codes(&v, n, k) else {
                    bail!("cannot quantize weights that contain NaN or infinite values")
                };
                codes.iter().map(|&q| q as f32 * s_w).collect()
            }
            (FakeQuant::Weights { per_channel: false, .. }, _) => {
                let Some(s_w) = quant::absmean_scale(&v) else {
                    bail!("cannot quantize weights that contain NaN or infinite values")
                };
                v.iter().map(|&w| quant::ternary(w, s_w) as f32 * s_w).collect()
            }
            (FakeQuant::Activations(scaling), &[m, k]) => {
                let (codes, scales) = device::cpu_quantize(&v, m, k, scaling);
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| q as f32 * scales[if scales.len() == 1 { 0 } else { i / k }])
                    .collect()
            }
            _ => bail!("bitlinear-fake-quant: internal error, expected a rank-2 tensor"),
        };
        Ok((cpu_from_f32(out, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        match *self {
            FakeQuant::Weights {
                check_finite,
                per_channel,
            } => crate::cuda::fake_quant_weights(s, l, check_finite, per_channel),
            FakeQuant::Activations(sc) => crate::cuda::fake_quant_activations(s, l, sc == ActScaling::PerTensor),
        }
    }
}

/// `W~ = W_q · s_w`: the ternary weight as the forward pass sees it, in `w`'s dtype.
pub fn fake_quantize_weights(w: &Tensor) -> Result<Tensor> {
    fake_quant_weights(w, true, false)
}

/// `W~` of a weight `(N, K)`; with `per_channel` each row's codes against its own absmean, at
/// the tensor's scale ([`quant::channel_codes`]).
pub(crate) fn fake_quant_weights(w: &Tensor, check_finite: bool, per_channel: bool) -> Result<Tensor> {
    check_weight(w, "fake_quantize_weights")?;
    w.contiguous()?.apply_op1_no_bwd(&FakeQuant::Weights {
        check_finite,
        per_channel,
    })
}

/// `x~ = x_q · s_x`: the int8 activations as the forward pass sees them, in `x`'s dtype.
pub fn fake_quantize_activations(x: &Tensor, scaling: ActScaling) -> Result<Tensor> {
    check_activations(x, "fake_quantize_activations")?;
    x.contiguous()?.apply_op1_no_bwd(&FakeQuant::Activations(scaling))
}

/// The training forward `y = quant(x) · quant(W)ᵀ` for `x (M, K)` and a float weight `W (N, K)`,
/// output `(M, N)` in `x`'s dtype, with straight-through gradients to both `x` and `W`.
///
/// ```
/// use bitlinear::{bit_matmul, ActScaling};
/// use candle_core::{Device, Tensor, Var};
/// let x = Tensor::new(&[[1.0f32, -2.0, 0.5, 4.0]], &Device::Cpu)?;
/// let w = Var::new(&[[0.3f32, -0.3, 0.0, 0.3], [-0.3, 0.3, 0.3, 0.0]], &Device::Cpu)?;
/// let y = bit_matmul(&x, w.as_tensor(), ActScaling::PerToken)?;
/// assert_eq!(y.dims(), &[1, 2]);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(&w).unwrap().dims(), &[2, 4]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn bit_matmul(x: &Tensor, w: &Tensor, scaling: ActScaling) -> Result<Tensor> {
    BitMatmul::new(scaling).forward(x, w)
}

/// The inference forward over a pre-packed weight: same output as [`bit_matmul`] on the weight
/// it was packed from, without quantizing the weight again. No gradient flows through it.
pub fn packed_matmul(x: &Tensor, w: &PackedTernary, scaling: ActScaling) -> Result<Tensor> {
    let (_, k) = check_activations(x, "packed_matmul")?;
    if k != w.in_features() {
        bail!(
            "packed_matmul: input has {k} features, the weight expects {}",
            w.in_features()
        )
    }
    check_same_device(x, w.bytes(), "packed_matmul")?;
    let op = PackedMatmul {
        k,
        s_w: w.scale(),
        scaling,
        cpu_layouts: w.cpu_layouts().clone(),
        #[cfg(feature = "cuda")]
        settled: w.settled().clone(),
    };
    x.contiguous()?.apply_op2_no_bwd(w.bytes(), &op)
}
