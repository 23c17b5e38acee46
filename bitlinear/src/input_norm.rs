//! A pre-norm layer's float step fused into its packed matmul: [`packed_matmul_normed`].
//!
//! In a pre-norm transformer every projection's input is an RMSNorm of something (the residual
//! stream after an add, or BitNet's gated FFN product), and the norm is a kernel of its own
//! between two matmuls. At one token the decode GEMV reads the whole input row in every block
//! anyway, so it computes the norm itself (`kernels/gemv.cu`, the `_an` and `_rn` kernels): one
//! launch instead of two, and no row written and read back in between.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use crate::{packed_matmul, ActScaling, PackedTernary};

/// The float step before a projection that [`packed_matmul_normed`] runs on its input. The
/// math is f32; the values are rounded to the input's dtype where candle's tensor ops would
/// store them (the sum, the scaled gate and up products, the square, their product, the norm's
/// output).
#[derive(Debug, Clone, Copy)]
pub enum InputNorm<'a> {
    /// `s = x + delta` (or `s = x` without a delta) and `rmsnorm(s) · gain`:
    /// `(s · gain) / sqrt(mean(s²) + eps)` over the last dimension. With a delta the sum is
    /// returned too: a residual add followed by the next layer's norm.
    AddRmsNorm {
        /// Added to the input (same shape and dtype).
        delta: Option<&'a Tensor>,
        /// The norm's gain, `(K,)` in the input's dtype.
        gain: &'a Tensor,
        /// Added to the mean square (BitNet's `rms_norm_eps`, 1e-5 for 2B4T).
        eps: f32,
        /// The gain is settled: complete on the device and written by no kernel any more (a
        /// model's norm weight). The CUDA GEMV then requests it before it waits for the previous
        /// kernel (programmatic dependent launch), off the critical path, with the first of the
        /// packed weights once those are settled too (`false`: neither early). `false` is always
        /// safe (e.g. a gain computed just before the call).
        gain_settled: bool,
    },
    /// BitNet b1.58's gated FFN product and its sub-norm: the input `(..., 2K)` holds the gate
    /// and up products before their weight scales; `s = relu(gate · gate_scale)² · (up ·
    /// up_scale)` and `rmsnorm(s) · gain` as above. The ReLU maps a NaN gate to 0, as candle's
    /// `relu` does.
    Relu2MulRmsNorm {
        /// The norm's gain, `(K,)` in the input's dtype.
        gain: &'a Tensor,
        /// Added to the mean square.
        eps: f32,
        /// The gate projection's weight scale.
        gate_scale: f32,
        /// The up projection's weight scale.
        up_scale: f32,
        /// As for [`InputNorm::AddRmsNorm`]: the gain is a settled weight.
        gain_settled: bool,
    },
}

/// `v` rounded to `dtype` and back to f32 (the value candle would have stored).
fn round_to(v: Tensor, dtype: DType) -> Result<Tensor> {
    v.to_dtype(dtype)?.to_dtype(DType::F32)
}

impl InputNorm<'_> {
    fn gain(&self) -> &Tensor {
        match self {
            Self::AddRmsNorm { gain, .. } | Self::Relu2MulRmsNorm { gain, .. } => gain,
        }
    }

    fn eps(&self) -> f32 {
        match self {
            Self::AddRmsNorm { eps, .. } | Self::Relu2MulRmsNorm { eps, .. } => *eps,
        }
    }

    /// The normalised input in `x`'s dtype and, for [`InputNorm::AddRmsNorm`] with a delta, the
    /// sum `x + delta`, by tensor ops on any device: the path wherever the fused kernel does not
    /// run, and the reference it is tested against.
    pub fn apply(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let dt = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let (s, sum) = match *self {
            Self::AddRmsNorm { delta: Some(d), .. } => {
                let sum = (x + d)?;
                (sum.to_dtype(DType::F32)?, Some(sum))
            }
            Self::AddRmsNorm { delta: None, .. } => (x32, None),
            Self::Relu2MulRmsNorm {
                gate_scale, up_scale, ..
            } => {
                let k = x.dim(D::Minus1)? / 2;
                let gate = round_to((x32.narrow(D::Minus1, 0, k)? * f64::from(gate_scale))?, dt)?.relu()?;
                let up = round_to((x32.narrow(D::Minus1, k, k)? * f64::from(up_scale))?, dt)?;
                (round_to((round_to(gate.sqr()?, dt)? * up)?, dt)?, None)
            }
        };
        let k = s.dim(D::Minus1)?;
        let gain = self.gain();
        if gain.dims() != [k] {
            bail!("InputNorm: the gain must have shape ({k},), got {:?}", gain.dims())
        }
        let mean_sq = (s.sqr()?.sum_keepdim(D::Minus1)? / k as f64)?;
        let r = (mean_sq + f64::from(self.eps()))?.sqrt()?.recip()?;
        // (s · gain) · r: the fused kernel's order, in which the absmax of the output follows
        // from that of s · gain
        let y = s.broadcast_mul(&gain.to_dtype(DType::F32)?)?.broadcast_mul(&r)?;
        Ok((y.to_dtype(dt)?, sum))
    }
}

/// `packed_matmul(norm(x), w, ActScaling::PerToken)`, with the norm's sum where
/// [`InputNorm::AddRmsNorm`] has a delta (else `None`). `x` is `(..., K)`, or `(..., 2K)` for
/// [`InputNorm::Relu2MulRmsNorm`]; the output `(..., N)` in `x`'s dtype.
///
/// On CUDA one row of f32, bf16 or f16 (a decode step) runs as one kernel, the decode GEMV
/// computing the norm itself (where the planner puts the plain matmul on the GEMV and the
/// operands are contiguous and 16-byte aligned); elsewhere [`InputNorm::apply`] then
/// [`packed_matmul`]. The two agree up to the order of the f32 sum of squares and the square
/// root (`rsqrt` against `1 / sqrt`), which can move a normalised value by one rounding and so an
/// activation code by one.
///
/// ```
/// use bitlinear::{packed_matmul_normed, InputNorm, PackedTernary};
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let w = PackedTernary::pack(&Tensor::new(&[[0.5f32, -0.5, 0.0, 0.5], [0.0, 0.5, -0.5, -0.5]], &dev)?)?;
/// let x = Tensor::new(&[[1.0f32, 2.0, -1.0, 0.5]], &dev)?;
/// let delta = Tensor::new(&[[0.5f32, -1.0, 0.0, 1.5]], &dev)?;
/// let gain = Tensor::ones(4, candle_core::DType::F32, &dev)?;
/// let norm = InputNorm::AddRmsNorm { delta: Some(&delta), gain: &gain, eps: 1e-5, gain_settled: true };
/// let (y, sum) = packed_matmul_normed(&x, &w, &norm)?;
/// assert_eq!(y.dims(), &[1, 2]);
/// assert_eq!(sum.unwrap().to_vec2::<f32>()?, [[1.5, 1.0, -1.0, 2.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn packed_matmul_normed(x: &Tensor, w: &PackedTernary, norm: &InputNorm) -> Result<(Tensor, Option<Tensor>)> {
    let k = w.in_features();
    let want = match norm {
        InputNorm::AddRmsNorm { delta, .. } => {
            if let Some(d) = delta {
                if d.dims() != x.dims() || d.dtype() != x.dtype() {
                    bail!(
                        "packed_matmul_normed: delta {:?} {:?} must match the input {:?} {:?}",
                        d.dims(),
                        d.dtype(),
                        x.dims(),
                        x.dtype()
                    )
                }
            }
            k
        }
        InputNorm::Relu2MulRmsNorm { .. } => 2 * k,
    };
    if x.rank() == 0 || x.dim(D::Minus1)? != want {
        bail!(
            "packed_matmul_normed: the input's last dimension must be {want}, got {:?}",
            x.dims()
        )
    }
    if norm.gain().dims() != [k] || norm.gain().dtype() != x.dtype() {
        bail!(
            "packed_matmul_normed: the gain must be ({k},) {:?}, got {:?} {:?}",
            x.dtype(),
            norm.gain().dims(),
            norm.gain().dtype()
        )
    }
    if let Some(out) = fused(x, w, norm)? {
        return Ok(out);
    }
    let (normed, sum) = norm.apply(x)?;
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / want;
    let y = packed_matmul(&normed.reshape((rows, k))?, w, ActScaling::PerToken)?;
    if let Some(last) = dims.last_mut() {
        *last = w.out_features();
    }
    Ok((y.reshape(dims)?, sum))
}

/// The fused kernel's result where it runs (see [`packed_matmul_normed`]), else `None`.
#[cfg(not(feature = "cuda"))]
fn fused(_: &Tensor, _: &PackedTernary, _: &InputNorm) -> Result<Option<(Tensor, Option<Tensor>)>> {
    Ok(None)
}

/// The fused kernel's result where it runs (see [`packed_matmul_normed`]), else `None`.
#[cfg(feature = "cuda")]
fn fused(x: &Tensor, w: &PackedTernary, norm: &InputNorm) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let candle_core::Device::Cuda(_) = x.device() else {
        return Ok(None);
    };
    let (k, n) = (w.in_features(), w.out_features());
    let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
    if rows != 1
        || !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        || !x.device().same_device(w.bytes().device())
    {
        return Ok(None);
    }
    let aligned =
        |t: &Tensor| t.is_contiguous() && (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16);
    let delta = match norm {
        InputNorm::AddRmsNorm { delta, .. } => *delta,
        InputNorm::Relu2MulRmsNorm { .. } => None,
    };
    if !aligned(x) || !aligned(norm.gain()) || !aligned(w.bytes()) || delta.is_some_and(|d| !aligned(d)) {
        return Ok(None);
    }
    let info = crate::cuda_device_info(x.device())?;
    let settings = crate::kernel_settings(x.device());
    let problem = crate::plan::Problem::new(1, n, k, Some(x.dtype()), x.dtype());
    if crate::plan::plan_normed_gemv(&problem, &info, &settings)?.is_none() {
        return Ok(None);
    }
    let op = NormedGemv { w, norm: *norm };
    let out = x.apply_op2_no_bwd(norm.gain(), &op)?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok(Some(match delta {
        Some(_) => (
            out.narrow(0, k, n)?.reshape(dims)?,
            Some(out.narrow(0, 0, k)?.reshape(x.dims())?),
        ),
        None => (out.reshape(dims)?, None),
    }))
}

/// The fused kernel as a candle op over the input and the gain; the packed weight and the delta
/// are read from the op (a custom op takes at most three operands).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct NormedGemv<'a> {
    w: &'a PackedTernary,
    norm: InputNorm<'a>,
}

impl CustomOp2 for NormedGemv<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul-normed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("packed-matmul-normed: a CUDA kernel (the CPU runs InputNorm::apply, then packed_matmul)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::NormKind;
        fn cuda(s: &candle_core::Storage) -> Result<&candle_core::CudaStorage> {
            match s {
                candle_core::Storage::Cuda(c) => Ok(c),
                _ => bail!("packed-matmul-normed: operands must be on the CUDA device"),
            }
        }
        let (ws, wl) = self.w.bytes().storage_and_layout();
        let wc = cuda(&ws)?;
        let (kind, eps, delta, gain_settled) = match self.norm {
            InputNorm::AddRmsNorm {
                delta,
                eps,
                gain_settled,
                ..
            } => (NormKind::AddRms, eps, delta, gain_settled),
            InputNorm::Relu2MulRmsNorm {
                eps,
                gate_scale,
                up_scale,
                gain_settled,
                ..
            } => (NormKind::Relu2Rms { gate_scale, up_scale }, eps, None, gain_settled),
        };
        let dsl = delta.map(|d| d.storage_and_layout());
        let dc = match &dsl {
            Some((s, l)) => Some((cuda(s)?, *l)),
            None => None,
        };
        crate::cuda::normed_gemv(
            (x, xl),
            dc,
            (g, gl),
            (wc, wl),
            self.w.in_features(),
            self.w.scale(),
            kind,
            eps,
            self.w.settled(),
            gain_settled,
        )
    }
}
