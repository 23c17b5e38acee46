//! `BitConv2d`: a ternary-weight, int8-activation 2-D convolution, the quantize-then-convolve
//! training form (the packed inference form is `packed_conv.rs`, the backward `conv_grad.rs`).

use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, Module, VarBuilder};

use crate::im2col::Geometry;
use crate::ops::fake_quant_weights;
use crate::{quantize_activations, ActScaling, PackedBitConv2d, PackedTernary};

/// Options of a [`BitConv2d`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitConv2dConfig {
    /// Stride in both spatial dims (at least 1).
    pub stride: usize,
    /// Zero padding on every spatial side.
    pub padding: usize,
    /// Learn and add a per-output-channel bias (in full precision, after the convolution).
    pub bias: bool,
    /// Whether the training forward checks the float weight for NaN and infinite values (an
    /// error, default on), as [`crate::BitLinearConfig::check_finite`]: on CUDA each check waits
    /// for the stream, so a training loop that checks its weights itself turns it off. (On the
    /// CPU the stride-1 forward packs the weight, which rejects such values either way.)
    pub check_finite: bool,
    /// Whether the straight-through backward of a stride-1 convolution on CUDA forms its two
    /// matrix products (input and weight gradients) from bf16 operands where the training runs
    /// in f32 (default off): `x~`, `W~` and the output gradient rounded to bf16 (relative
    /// `2^-8`), f32 accumulation and f32 results in cuBLAS. Half the bytes and twice the
    /// tensor-core rate of the f32 (TF32) products; the forward is unchanged (integers). No
    /// effect on the CPU or in bf16/f16 training.
    pub bf16_grad_products: bool,
    /// Whether each output channel's ternary codes are rounded against that channel's own
    /// absmean (default off: the tensor's absmean, as [`BitLinear`](crate::BitLinear)). The
    /// codes' value stays one scale, the tensor's absmean ([`crate::quant::channel_codes`]), so
    /// the packed form is unchanged; for a convolution whose output channels are normalised
    /// next (batch norm, no bias), this computes what per-channel weight scales would.
    pub per_channel_codes: bool,
}

impl Default for BitConv2dConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            bias: true,
            check_finite: true,
            bf16_grad_products: false,
            per_channel_codes: false,
        }
    }
}

/// A 2-D convolution over NCHW input with ternary absmean weights (one scale per tensor, as
/// [`BitLinear`](crate::BitLinear)) and int8 absmax activations with **one scale per image**
/// (over that image's `C·H·W` values).
///
/// Why per image: an output pixel sums over a whole receptive field, so only a scale shared by
/// every input pixel of that field factors out of the integer sum; a per-image (not per-batch)
/// scale keeps each image's output independent of the rest of the batch.
///
/// The weight is candle's layout `(c_out, c_in, kh, kw)`; seen as a ternary matrix it is
/// `N = c_out` rows of `K = c_in·kh·kw` in that row-major order (`kw` fastest).
///
/// Backward is straight-through: the input gradient is the transposed convolution of the output
/// gradient with the fake-quantized weight, the weight gradient the correlation of the output
/// gradient with the fake-quantized input. For stride 1 and square kernels the forward value is
/// computed on the codes alone (by the packed form's int8 kernels, CPU and CUDA) and the
/// gradients are matrix products; otherwise both go through candle's `conv2d`.
///
/// ```
/// use bitlinear::{bit_conv2d, BitConv2dConfig};
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let conv = bit_conv2d(3, 8, 3, BitConv2dConfig { padding: 1, ..Default::default() }, vb)?;
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 7, 7), &Device::Cpu)?;
/// assert_eq!(conv.forward(&x)?.dims(), &[2, 8, 7, 7]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BitConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: BitConv2dConfig,
}

/// A [`BitConv2d`] with a `k × k` kernel, weight `vb["weight"]` and (if `cfg.bias`) `vb["bias"]`,
/// initialised like `candle_nn::conv2d`.
pub fn bit_conv2d(c_in: usize, c_out: usize, k: usize, cfg: BitConv2dConfig, vb: VarBuilder) -> Result<BitConv2d> {
    let fan_in = (c_in * k * k).max(1) as f64;
    let bound = 1.0 / fan_in.sqrt();
    let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", Init::Uniform { lo: -bound, up: bound })?;
    let bias = if cfg.bias {
        Some(vb.get_with_hints(c_out, "bias", Init::Uniform { lo: -bound, up: bound })?)
    } else {
        None
    };
    BitConv2d::new(weight, bias, cfg)
}

/// [`bit_conv2d`] without a bias.
pub fn bit_conv2d_no_bias(
    c_in: usize,
    c_out: usize,
    k: usize,
    cfg: BitConv2dConfig,
    vb: VarBuilder,
) -> Result<BitConv2d> {
    bit_conv2d(c_in, c_out, k, BitConv2dConfig { bias: false, ..cfg }, vb)
}

impl BitConv2d {
    /// A layer over an existing weight `(c_out, c_in, kh, kw)` and optional bias `(c_out)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: BitConv2dConfig) -> Result<Self> {
        if weight.rank() != 4 {
            candle_core::bail!(
                "BitConv2d: weight must be (c_out, c_in, kh, kw), got {:?}",
                weight.dims()
            );
        }
        if config.stride == 0 {
            candle_core::bail!("BitConv2d: stride must be at least 1");
        }
        if let Some(b) = &bias {
            if b.dims() != [weight.dim(0)?] {
                candle_core::bail!("BitConv2d: bias must be ({}), got {:?}", weight.dim(0)?, b.dims());
            }
        }
        let config = BitConv2dConfig {
            bias: bias.is_some(),
            ..config
        };
        Ok(Self { weight, bias, config })
    }

    /// The float weight `(c_out, c_in, kh, kw)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The layer's options.
    pub fn config(&self) -> BitConv2dConfig {
        self.config
    }

    /// The packed inference form: the ternary weight as a [`PackedTernary`] of `c_out` rows of
    /// `c_in·kh·kw` (`kw` fastest) with its absmean scale, and the bias as it is.
    pub fn pack(&self) -> Result<PackedBitConv2d> {
        let (c_out, c_in, kh, kw) = self.weight.dims4()?;
        let w = self.weight.detach().reshape((c_out, c_in * kh * kw))?;
        PackedBitConv2d::new(
            self.packed_weight(&w)?,
            (c_in, kh, kw),
            self.bias.as_ref().map(Tensor::detach),
            self.config,
        )
    }

    /// The weight `(c_out, K)` quantized by this layer's rule and packed, on `w`'s device.
    fn packed_weight(&self, w: &Tensor) -> Result<PackedTernary> {
        if !self.config.per_channel_codes {
            return PackedTernary::pack(w);
        }
        let (n, k) = w.dims2()?;
        let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let Some((codes, s_w)) = crate::quant::channel_codes(&v, n, k) else {
            candle_core::bail!("cannot quantize weights that contain NaN or infinite values")
        };
        let bytes = Tensor::from_vec(
            crate::pack_ternary(&codes, n, k)?,
            (n, crate::packed_len(k)),
            w.device(),
        )?;
        PackedTernary::from_parts(bytes, s_w, k)
    }
}

/// Checks an NCHW input against a `(c_out, c_in, kh, kw)` kernel: rank, float dtype, channels,
/// kernel within the padded input. Returns the input's `(b, c, h, w)`.
pub(crate) fn check_input(
    x: &Tensor,
    (_, c_in, kh, kw): (usize, usize, usize, usize),
    config: BitConv2dConfig,
    who: &str,
) -> Result<(usize, usize, usize, usize)> {
    if x.rank() != 4 {
        candle_core::bail!("{who}: input must be NCHW (rank 4), got {:?}", x.dims());
    }
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16 | DType::F64) {
        candle_core::bail!("{who}: input dtype {:?} is not a float type", x.dtype());
    }
    let (b, c, h, w) = x.dims4()?;
    if c != c_in {
        candle_core::bail!("{who}: input has {c} channels, the layer expects {c_in}");
    }
    let p = config.padding;
    if h + 2 * p < kh || w + 2 * p < kw {
        candle_core::bail!(
            "{who}: kernel {kh}x{kw} is larger than the padded input {}x{}",
            h + 2 * p,
            w + 2 * p
        );
    }
    Ok((b, c, h, w))
}

/// Straight-through estimate: `t`'s value is `q`, its gradient flows to `t` unchanged.
///
/// With `q = round(t)` the value is exactly `q`: `|q - t| <= 1/2` makes `q - t` exact
/// (Sterbenz), and `t + (q - t)` is then the representable `q`.
fn straight_through(t: &Tensor, q: &Tensor) -> Result<Tensor> {
    t + (q - t)?.detach()
}

/// Signed float values of int8 codes stored as two's-complement `U8` (as
/// [`crate::quantize_activations`] returns them), in `dtype`: every value `-127..=127` is exact in
/// f32, bf16 and f16.
fn signed_codes(codes: &Tensor, dtype: DType) -> Result<Tensor> {
    let c = codes.to_dtype(DType::F32)?;
    let negative = c.ge(128f64)?.to_dtype(DType::F32)?;
    (c - (negative * 256.0)?)?.to_dtype(dtype)
}

impl BitConv2d {
    /// The forward in integers: `y = (conv(x_q, W_q) · s_x) · s_w (+ bias)` where the convolution
    /// of the integer codes is exact (every partial sum is an integer below 2^24 while
    /// `K · 127 < 2^24`), so on the CPU the output equals [`PackedBitConv2d`]'s bit for bit. The
    /// gradients are the straight-through ones: the codes stand in for `x / s_x` and `W / s_w`
    /// (scales detached), so `dL/dx` and `dL/dW` are the convolution gradients against
    /// `W~ = W_q · s_w` and `x~ = x_q · s_x`.
    ///
    /// Where the matrix-product backward applies (stride 1, a square kernel, `padding < k`) the
    /// value is computed on the codes alone (by the packed form's kernels, CPU and CUDA) and
    /// one op carries those gradients; otherwise the straight-through steps are candle ops.
    /// `pool`: the output 2x2 max pooled ([`crate::max_pool2x2`], whose fused kernels take it),
    /// inside that op where there is one.
    fn integer_forward(&self, x: &Tensor, pool: bool) -> Result<Tensor> {
        // Returns the F32 output without the bias.
        let (b, c, h, w) = x.dims4()?;
        let (c_out, c_in, kh, kw) = self.weight.dims4()?;
        let (p, s) = (self.config.padding, self.config.stride);
        // Weights: the master weight (f32) quantized.
        let w2 = self.weight.to_dtype(DType::F32)?.reshape((c_out, c_in * kh * kw))?;
        let w_fq = fake_quant_weights(&w2, self.config.check_finite, self.config.per_channel_codes)?;
        // s_w is the magnitude of every non-zero W~ (exact); W~ / s_w is then exactly -1, 0 or 1.
        // The maximum a row at a time first: candle reduces `max_all` in one CUDA block.
        let s_w = w_fq.abs()?.max_keepdim(1)?.max_all()?.detach();
        let safe_s_w = s_w.maximum(f32::MIN_POSITIVE as f64)?;
        let w_codes = w_fq.broadcast_div(&safe_s_w)?.detach();
        // Activations: one scale per image.
        let quantized = || quantize_activations(&x.reshape((b, c * h * w))?, ActScaling::PerToken);
        let pooled = |y: Tensor| match pool {
            true => crate::max_pool2x2(&y),
            false => Ok(y),
        };
        if !crate::conv_grad::has_gemm_grad(s, kh, kw, p) {
            let (codes, s_x) = quantized()?;
            return pooled(self.straight_through_forward(x, &w2, (&w_codes, &safe_s_w, &s_w), (&codes, &s_x))?);
        }
        // The value: on the CPU by the packed form's kernel (it quantizes `x` itself), on CUDA
        // by its int8 kernels, elsewhere an f32 convolution of the codes (exact every way).
        let mut on_device = None;
        // The codes the CUDA forward makes, kept for the backward's weight gradient.
        #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
        let mut x_codes = None;
        if x.device().is_cpu() {
            let packed = PackedBitConv2d::new(self.packed_weight(&w2)?, (c_in, kh, kw), None, self.config)?;
            on_device = Some(packed.dequantized(x)?);
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (codes, s_x) = quantized()?;
            let g = Geometry::of(x, (kh, kw), self.config)?;
            x_codes = Some((codes.clone(), s_x.clone()));
            on_device = Some(crate::packed_conv::training_conv_f32(codes, &s_x, &s_w, &g, &w_codes)?);
        }
        let y = match on_device {
            Some(y) => y,
            None => {
                let (codes, s_x) = quantized()?;
                integer_conv(
                    &codes,
                    &s_x,
                    &s_w,
                    x.dims4()?,
                    &w_codes.reshape((c_out, c_in, kh, kw))?,
                    p,
                )?
            }
        };
        if !(x.track_op() || self.weight.track_op()) {
            return pooled(y);
        }
        let w_tilde = w_fq.reshape((c_out, c_in, kh, kw))?;
        crate::conv_grad::quantized_conv2d(
            x,
            &self.weight,
            (y, w_tilde),
            x_codes,
            (p, pool),
            self.config.bf16_grad_products,
        )
    }

    /// [`Self::integer_forward`] with the straight-through steps as candle ops around candle's
    /// `conv2d` (strided or non-square convolutions).
    fn straight_through_forward(
        &self,
        x: &Tensor,
        w2: &Tensor,
        (w_codes, safe_s_w, s_w): (&Tensor, &Tensor, &Tensor),
        (codes, s_x): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (c_out, c_in, kh, kw) = self.weight.dims4()?;
        let (p, s) = (self.config.padding, self.config.stride);
        let dt = x.dtype();
        let w_int = straight_through(&w2.broadcast_div(safe_s_w)?, w_codes)?
            .reshape((c_out, c_in, kh, kw))?
            .to_dtype(dt)?;
        // The straight-through step in f32, as the quantizer divides (`x / s_x`), then the exact
        // codes cast to the input's dtype.
        let s_x = s_x.reshape((b, 1))?;
        let x_codes = signed_codes(codes, DType::F32)?;
        let x_int = straight_through(
            &x.reshape((b, c * h * w))?.to_dtype(DType::F32)?.broadcast_div(&s_x)?,
            &x_codes,
        )?
        .reshape((b, c, h, w))?
        .to_dtype(dt)?;
        let acc = x_int.conv2d(&w_int, p, s, 1, 1)?;
        // `(acc · s_x) · s_w` in f32, the order of the packed form's epilogue.
        acc.to_dtype(DType::F32)?
            .broadcast_mul(&s_x.reshape((b, 1, 1, 1))?)?
            .broadcast_mul(&s_w.to_dtype(DType::F32)?)
    }
}

/// The value of the forward on a device without kernels of ours: the f32 convolution of the
/// codes (exact) scaled as `(acc · s_x) · s_w`, no gradient.
fn integer_conv(
    codes: &Tensor,
    s_x: &Tensor,
    s_w: &Tensor,
    (b, c, h, w): (usize, usize, usize, usize),
    w_codes: &Tensor,
    padding: usize,
) -> Result<Tensor> {
    let x_codes = signed_codes(codes, DType::F32)?.reshape((b, c, h, w))?;
    x_codes
        .conv2d(w_codes, padding, 1, 1, 1)?
        .broadcast_mul(&s_x.reshape((b, 1, 1, 1))?)?
        .broadcast_mul(s_w)
}

impl BitConv2d {
    /// The output, 2x2 max pooled where `pool` (only without a bias and for f32 input, where
    /// pooling the unbiased f32 output is pooling [`Module::forward`]'s).
    fn forward_impl(&self, x: &Tensor, pool: bool) -> Result<Tensor> {
        let (b, ..) = check_input(x, self.weight.dims4()?, self.config, "BitConv2d")?;
        let (c_out, c_in, kh, kw) = self.weight.dims4()?;
        let (ho, wo) = Geometry::of(x, (kh, kw), self.config)?.out_hw();
        if b == 0 || c_out == 0 {
            return Tensor::zeros((b, c_out, ho, wo), x.dtype(), x.device());
        }
        let y = if c_in * kh * kw == 0 {
            // nothing to sum: every accumulator is 0 (then the bias, as the packed form)
            Tensor::zeros((b, c_out, ho, wo), DType::F32, x.device())?
        } else {
            self.integer_forward(x, pool)?
        };
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(&bias.to_dtype(DType::F32)?.reshape((1, c_out, 1, 1))?)?,
            None => y,
        };
        y.to_dtype(x.dtype())
    }

    /// `max_pool2x2(self.forward(x))` ([`crate::max_pool2x2`]): the same values and the same
    /// gradients (each window's to its first maximum), computed in one graph node with the
    /// convolution where it can, so that the unpooled output, four times the pooled one, gets no
    /// gradient tensor of its own in candle's backward pass (which allocates and accumulates one
    /// per node). It can for an f32 input, no bias, even output sizes and the convolutions whose
    /// gradients are matrix products (stride 1, square kernel, `padding < k`); otherwise it is
    /// the two ops.
    ///
    /// ```
    /// use bitlinear::{bit_conv2d_no_bias, max_pool2x2, BitConv2dConfig};
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// let conv = bit_conv2d_no_bias(3, 8, 3, BitConv2dConfig { padding: 1, ..Default::default() }, vb)?;
    /// let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu)?;
    /// let y = conv.forward_max_pool2x2(&x)?;
    /// assert_eq!(y.dims(), &[2, 8, 4, 4]);
    /// let two_ops = max_pool2x2(&conv.forward(&x)?)?;
    /// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, two_ops.flatten_all()?.to_vec1::<f32>()?);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn forward_max_pool2x2(&self, x: &Tensor) -> Result<Tensor> {
        let (c_out, c_in, kh, kw) = self.weight.dims4()?;
        let (b, ..) = check_input(x, (c_out, c_in, kh, kw), self.config, "BitConv2d")?;
        let (ho, wo) = Geometry::of(x, (kh, kw), self.config)?.out_hw();
        let fusable = self.bias.is_none()
            && x.dtype() == DType::F32
            && crate::conv_grad::has_gemm_grad(self.config.stride, kh, kw, self.config.padding)
            && b * c_out * c_in > 0
            && crate::pool::has_fused_kernels(&[b, c_out, ho, wo], DType::F32, x.device());
        match fusable {
            true => self.forward_impl(x, true),
            false => crate::max_pool2x2(&self.forward(x)?),
        }
    }
}

impl Module for BitConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_impl(x, false)
    }
}
