//! `PackedBitConv2d`: the inference form of a [`BitConv2d`](crate::BitConv2d), its weight packed
//! 2 bits a value and its forward an exact int8 × ternary integer convolution.

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::conv::{check_input, BitConv2dConfig};
use crate::im2col::Geometry;
#[cfg(feature = "cuda")]
use crate::im2col::{tiling, Gatherer};
use crate::packed::PackedTernary;
use crate::packed_conv_cpu::{convolve, AccTile, ChannelsLastWeight};
use crate::packed_layer::{fetch, load_packed_weight, packed_weight_tensors};
#[cfg(feature = "cuda")]
use crate::{packed_accumulate, quantize_activations, ActScaling};

/// The inference form of [`BitConv2d`](crate::BitConv2d), made by
/// [`BitConv2d::pack`](crate::BitConv2d::pack) or [`Self::load`].
///
/// The weight `(c_out, c_in, kh, kw)` is a [`PackedTernary`] of `N = c_out` rows and
/// `K = c_in·kh·kw` columns in that row-major order (`kw` fastest, then `kh`, then `c_in`).
///
/// Forward: each image is quantized to int8 codes with its own absmax scale `s_x` (as the float
/// layer does), its receptive fields are gathered into int8 im2col rows `(Ho·Wo, K)` (a bounded
/// tile of rows at a time), multiplied exactly with the packed weight into i32 accumulators,
/// and dequantized as `(acc · s_x) · s_w` in f32, plus the bias. On CUDA, where `c_in` is a
/// multiple of 16, one implicit-GEMM kernel does all of it (the gather happens on the way into
/// shared memory, over channels-last codes, against a copy of the weight in the kernel's order
/// made on first use; [`crate::plan::implicit_conv_plan`]); otherwise the rows are in the
/// weight's K order and the product is [`packed_accumulate`](crate::packed_accumulate)'s. The
/// CPU gathers channels-last rows against a copy of the weight with its columns reordered to
/// match (made once, shared by clones) and multiplies them with a kernel for many rows by few
/// channels. The accumulators
/// are exact either way, so the outputs differ from the float layer's only by its f32 rounding
/// (relative 1e-6 of `127·K·s_x·s_w` is ample, see the tests).
///
/// Stored as tensors under the layer's prefix, like
/// [`PackedBitLinear`](crate::PackedBitLinear):
///
/// | name | dtype, shape | what |
/// | --- | --- | --- |
/// | `weight.packed` | U8 `(c_out, ceil(c_in·kh·kw/4))` | the [`PackedTernary`] bytes |
/// | `weight.scale` | F32 `(1,)` | the absmean scale `s_w` |
/// | `bias` | float `(c_out,)` | with [`BitConv2dConfig::bias`] |
///
/// ```
/// use std::collections::HashMap;
/// use bitlinear::{bit_conv2d, BitConv2dConfig, PackedBitConv2d};
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
///
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let cfg = BitConv2dConfig { padding: 1, ..Default::default() };
/// let packed = bit_conv2d(3, 8, 3, cfg, vb.pp("conv"))?.pack()?;
/// let tensors: HashMap<String, Tensor> =
///     packed.tensors()?.into_iter().map(|(n, t)| (format!("conv.{n}"), t)).collect();
/// assert_eq!(tensors["conv.weight.packed"].dims(), &[8, 7]); // ceil(27 / 4) bytes a row
///
/// let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
/// let loaded = PackedBitConv2d::load(3, 8, 3, cfg, vb.pp("conv"))?;
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 9), &Device::Cpu)?;
/// let y = loaded.forward(&x)?;
/// assert_eq!(y.dims(), &[2, 8, 9, 9]);
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, packed.forward(&x)?.flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PackedBitConv2d {
    weight: PackedTernary,
    c_in: usize,
    kh: usize,
    kw: usize,
    bias: Option<Tensor>,
    config: BitConv2dConfig,
    /// The CPU forward's copy of the weight with its columns in `(ky, kx, ci)` order.
    channels_last: ChannelsLastWeight,
    /// CUDA's implicit-GEMM copy of the weight.
    #[cfg(feature = "cuda")]
    implicit: crate::implicit_conv::ImplicitWeight,
}

impl PackedBitConv2d {
    /// A layer over a packed weight of `c_out` rows and `c_in·kh·kw` columns (in the K order of
    /// the type's docs) and an optional bias `(c_out)`. `config.bias` follows `bias`.
    pub fn new(
        weight: PackedTernary,
        (c_in, kh, kw): (usize, usize, usize),
        bias: Option<Tensor>,
        config: BitConv2dConfig,
    ) -> Result<Self> {
        if weight.in_features() != c_in * kh * kw {
            bail!(
                "PackedBitConv2d: the packed weight has K = {}, c_in·kh·kw = {}",
                weight.in_features(),
                c_in * kh * kw
            )
        }
        if config.stride == 0 {
            bail!("PackedBitConv2d: stride must be at least 1")
        }
        let c_out = weight.out_features();
        if bias.as_ref().is_some_and(|b| b.dims() != [c_out]) {
            bail!("PackedBitConv2d: bias must have shape ({c_out},)")
        }
        let config = BitConv2dConfig {
            bias: bias.is_some(),
            ..config
        };
        Ok(Self {
            weight,
            c_in,
            kh,
            kw,
            bias,
            config,
            channels_last: ChannelsLastWeight::default(),
            #[cfg(feature = "cuda")]
            implicit: Default::default(),
        })
    }

    /// Loads a `k × k` layer of `c_in` inputs and `c_out` outputs stored under `vb` (the names in
    /// the type's docs), on `vb`'s device; `bias` is read as `vb`'s dtype when `config.bias`.
    /// Presence, shapes, byte values, the scale (finite, positive) and every 2-bit code are
    /// checked, as by [`PackedBitLinear::load`](crate::PackedBitLinear::load).
    pub fn load(c_in: usize, c_out: usize, k: usize, config: BitConv2dConfig, vb: VarBuilder) -> Result<Self> {
        let kk = c_in * k * k;
        let weight = load_packed_weight(&vb, c_out, kk)?;
        let bias = config
            .bias
            .then(|| fetch(&vb, "bias", &[c_out], vb.dtype()))
            .transpose()?;
        Self::new(weight, (c_in, k, k), bias, config)
    }

    /// The layer's tensors, named relative to its prefix as [`Self::load`] reads them.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = packed_weight_tensors(&self.weight)?;
        out.extend(self.bias.iter().map(|b| ("bias".to_string(), b.clone())));
        Ok(out)
    }

    /// The packed weight `(c_out, c_in·kh·kw)`.
    pub fn weight(&self) -> &PackedTernary {
        &self.weight
    }

    /// The kernel's `(c_in, kh, kw)`.
    pub fn kernel_dims(&self) -> (usize, usize, usize) {
        (self.c_in, self.kh, self.kw)
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The layer's options.
    pub fn config(&self) -> BitConv2dConfig {
        self.config
    }

    /// The device holding the packed weight.
    pub fn device(&self) -> &Device {
        self.weight.device()
    }

    /// The integer core of the forward: the exact i32 accumulators `(B, c_out, Ho, Wo)` of the
    /// convolution of each image's int8 codes with the ternary weight, and the per-image
    /// activation scales `s_x (B)` (F32). The output is `(acc · s_x) · s_w` (+ bias).
    ///
    /// The accumulators are returned on the CPU: candle's CUDA backend has no I32 copy or cast
    /// kernels, so they are reordered to NCHW there; the scales stay on the input's device.
    pub fn accumulate(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.weight.out_features();
        if x.device().is_cpu() {
            let (b, ..) = check_input(x, (n, self.c_in, self.kh, self.kw), self.config, "PackedBitConv2d")?;
            let (ho, wo) = self.geometry(x)?.out_hw();
            let mut acc = vec![0i32; b * n * ho * wo];
            let scales = self.convolve_cpu(x, |t| scatter_channels_first(&t, n, ho * wo, &mut acc, |_, a| a))?;
            let acc = Tensor::from_vec(acc, (b, n, ho, wo), &Device::Cpu)?;
            return Ok((acc, Tensor::from_vec(scales, b, &Device::Cpu)?));
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (tiles, scales, (ho, wo)) = self.map_tiles(x, |acc, _, _| acc.to_device(&Device::Cpu))?;
            let acc = cat_tiles(tiles, 1, (0, ho * wo, n), DType::I32, &Device::Cpu)?;
            let acc = acc.transpose(1, 2)?.contiguous()?.reshape((x.dim(0)?, n, ho, wo))?;
            return Ok((acc, scales));
        }
        bail!("PackedBitConv2d: unsupported device {:?}", x.device().location())
    }

    fn geometry(&self, x: &Tensor) -> Result<Geometry> {
        Geometry::of(x, (self.kh, self.kw), self.config)
    }

    /// Quantizes `x` and runs [`map_code_tiles`] over its codes; also returns the scales `(B)`.
    #[allow(clippy::type_complexity)]
    #[cfg(feature = "cuda")]
    fn map_tiles(
        &self,
        x: &Tensor,
        f: impl FnMut(Tensor, &Tensor, usize) -> Result<Tensor>,
    ) -> Result<(Vec<Vec<Tensor>>, Tensor, (usize, usize))> {
        let n = self.weight.out_features();
        let (b, c, h, w) = check_input(x, (n, self.c_in, self.kh, self.kw), self.config, "PackedBitConv2d")?;
        let g = self.geometry(x)?;
        let (codes, scales) = quantize_activations(&x.reshape((b, c * h * w))?, ActScaling::PerToken)?;
        let tiles = map_code_tiles(codes, &scales, &g, &self.weight, f)?;
        Ok((tiles, scales, g.out_hw()))
    }

    /// The dequantized output `(B, c_out, Ho, Wo)` in F32, without the bias (also the CPU
    /// training forward of [`BitConv2d`](crate::BitConv2d)).
    pub(crate) fn dequantized(&self, x: &Tensor) -> Result<Tensor> {
        let s_w = self.weight.scale();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let n = self.weight.out_features();
            let g = self.geometry(x)?;
            let b = x.dim(0)?;
            if let Some(p) = crate::cuda::implicit_plan(x.device(), &g, b, n)? {
                let (ho, wo) = g.out_hw();
                let w_bytes = self
                    .implicit
                    .bytes(&self.weight, (g.c, g.kh * g.kw), p.weight_row_bytes * 4)?;
                let (codes, s_x) = quantize_activations(&x.reshape((b, g.image_len()))?, ActScaling::PerToken)?;
                let s_w = crate::cuda::WeightScale::Host(s_w);
                return crate::cuda::implicit_conv_f32(&p, &codes, &s_x, w_bytes, s_w, &g)?.reshape((b, n, ho, wo));
            }
            // on the device: each tile straight to its (bi, c_out, r) block of the output
            let (tiles, _, (ho, wo)) = self.map_tiles(x, |acc, scales, i0| {
                crate::cuda::conv_dequantize(&acc, scales, i0, crate::cuda::WeightScale::Host(s_w))
            })?;
            return cat_tiles(tiles, 2, (0, n, ho * wo), DType::F32, x.device())?.reshape((x.dim(0)?, n, ho, wo));
        }
        if !x.device().is_cpu() {
            bail!("PackedBitConv2d: unsupported device {:?}", x.device().location())
        }
        let (b, n) = (x.dim(0)?, self.weight.out_features());
        let (ho, wo) = self.geometry(x)?.out_hw();
        let mut y = vec![0f32; b * n * ho * wo];
        // `(acc · s_x) · s_w` in f32, as `quant::dequantize`
        self.convolve_cpu(x, |t| {
            scatter_channels_first(&t, n, ho * wo, &mut y, |s_x, a| crate::quant::dequantize(a, s_x, s_w))
        })?;
        Tensor::from_vec(y, (b, n, ho, wo), &Device::Cpu)
    }

    /// The CPU convolution of `x` (checked by the caller), its tiles handed to `sink`; returns the
    /// per-image scales.
    fn convolve_cpu(&self, x: &Tensor, sink: impl FnMut(AccTile)) -> Result<Vec<f32>> {
        crate::device::check_same_device(x, self.weight.bytes(), "PackedBitConv2d")?;
        let g = self.geometry(x)?;
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            bail!("PackedBitConv2d: internal error, the CPU path got a device input")
        };
        let values = crate::device::cpu_f32(s, layout)?;
        convolve(&values, x.dim(0)?, &g, &self.weight, &self.channels_last, sink)
    }
}

/// Writes a tile's accumulators `(images·rows, n)` into their places of a channels-first output
/// `(b, n, pixels)` as `f(s_x of the image, acc)`.
fn scatter_channels_first<T: Copy>(t: &AccTile, n: usize, pixels: usize, out: &mut [T], f: impl Fn(f32, i32) -> T) {
    for i in 0..t.images {
        let img = t.i0 + i;
        let s_x = t.scales[img];
        let acc = &t.acc[i * t.rows * n..(i + 1) * t.rows * n];
        for o in 0..n {
            let dst = &mut out[(img * n + o) * pixels + t.r0..][..t.rows];
            for (r, d) in dst.iter_mut().enumerate() {
                *d = f(s_x, acc[r * n + o]);
            }
        }
    }
}

/// Runs im2col -> [`packed_accumulate`] over int8 `codes` `(B, C·H·W)` on CUDA a bounded tile at
/// a time and maps each tile's accumulators `(bi, r, c_out)` (images `i0 ..`) with
/// `f(acc, scales, i0)`. Returns the mapped tiles (per tile of images, its row tiles).
#[cfg(feature = "cuda")]
fn map_code_tiles(
    codes: Tensor,
    scales: &Tensor,
    g: &Geometry,
    weight: &PackedTernary,
    mut f: impl FnMut(Tensor, &Tensor, usize) -> Result<Tensor>,
) -> Result<Vec<Vec<Tensor>>> {
    let (b, n, k) = (codes.dim(0)?, weight.out_features(), g.k());
    let (ho, wo) = g.out_hw();
    let rows = ho * wo;
    let budget = crate::plan::im2col_tile_codes(&crate::kernel_settings(codes.device()));
    let (bt, rt) = tiling(b, rows, k, budget);
    let gatherer = Gatherer::new(codes)?;
    let mut tiles = Vec::new();
    for i0 in (0..b).step_by(bt) {
        let bi = bt.min(b - i0);
        let mut parts = Vec::new();
        for r0 in (0..rows).step_by(rt) {
            let r = rt.min(rows - r0);
            let cols = gatherer.rows(g, (i0, bi), (r0, r))?;
            let acc = packed_accumulate(&cols, weight)?.reshape((bi, r, n))?;
            parts.push(f(acc, scales, i0)?);
        }
        tiles.push(parts);
    }
    Ok(tiles)
}

/// The training forward of [`BitConv2d`](crate::BitConv2d) on CUDA: `(conv(x_q, W_q) · s_x) · s_w`
/// as F32 `(B, c_out, Ho, Wo)` for int8 `codes` `(B, C·H·W)` (images of geometry `g`) with their
/// scales `s_x (B)`, the weight's codes `w_codes (c_out, C·kh·kw)` (values exactly -1, 0, 1) and
/// its scale `s_w` (a one-element F32 tensor): on the implicit GEMM where the planner takes the
/// convolution (`crate::plan::implicit_conv_plan`), else on the packed form's int8 im2col and
/// GEMM. Nothing is read back to the host, and the values are those of the CPU's f32
/// convolution of the codes.
#[cfg(feature = "cuda")]
pub(crate) fn training_conv_f32(
    codes: Tensor,
    s_x: &Tensor,
    s_w: &Tensor,
    g: &Geometry,
    w_codes: &Tensor,
) -> Result<Tensor> {
    let (b, k) = (codes.dim(0)?, g.k());
    let (ho, wo) = g.out_hw();
    let dev = codes.device().clone();
    let (n, _) = w_codes.dims2()?;
    let scale = crate::cuda::WeightScale::Device(s_w);
    if let Some(p) = crate::cuda::implicit_plan(&dev, g, b, n)? {
        let w_bytes = crate::cuda::pack_kernel_order(w_codes, g, &p)?;
        return crate::cuda::implicit_conv_f32(&p, &codes, s_x, &w_bytes, scale, g)?.reshape((b, n, ho, wo));
    }
    let w_codes = w_codes.contiguous()?;
    let bytes = {
        let (st, l) = w_codes.storage_and_layout();
        let candle_core::Storage::Cuda(st) = &*st else {
            bail!("BitConv2d: internal error, weight codes left the GPU")
        };
        crate::cuda::pack_exact_codes(st, l)?
    };
    let bytes = crate::device::tensor_from(candle_core::Storage::Cuda(bytes), (n, crate::packed_len(k)));
    // The accumulators only: the scale of this PackedTernary is never used.
    let weight = PackedTernary::from_trusted(bytes, 1.0, k);
    let tiles = map_code_tiles(codes, s_x, g, &weight, |acc, s, i0| {
        crate::cuda::conv_dequantize(&acc, s, i0, scale)
    })?;
    cat_tiles(tiles, 2, (0, n, ho * wo), DType::F32, &dev)?.reshape((b, n, ho, wo))
}

#[cfg(feature = "cuda")]
/// Joins per-image-tile row tiles along `dim`, then the image tiles along dim 0; `empty` is the
/// shape of no tiles.
fn cat_tiles(
    tiles: Vec<Vec<Tensor>>,
    dim: usize,
    empty: (usize, usize, usize),
    dt: DType,
    dev: &Device,
) -> Result<Tensor> {
    let tiles = tiles
        .iter()
        .map(|parts| Tensor::cat(parts, dim))
        .collect::<Result<Vec<_>>>()?;
    match tiles.is_empty() {
        true => Tensor::zeros(empty, dt, dev),
        false => Tensor::cat(&tiles, 0),
    }
}

impl Module for PackedBitConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c_out = self.weight.out_features();
        let shape = (c_out, self.c_in, self.kh, self.kw);
        let (b, ..) = check_input(x, shape, self.config, "PackedBitConv2d")?;
        let (ho, wo) = self.geometry(x)?.out_hw();
        if b * c_out == 0 {
            // no elements: return before any op, as candle's CUDA kernels reject empty launches
            return Tensor::zeros((b, c_out, ho, wo), x.dtype(), x.device());
        }
        let y = if self.c_in * self.kh * self.kw == 0 {
            // nothing to sum: every accumulator is 0
            Tensor::zeros((b, c_out, ho, wo), DType::F32, x.device())?
        } else {
            self.dequantized(x)?
        };
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(&bias.to_dtype(DType::F32)?.reshape((1, c_out, 1, 1))?)?,
            None => y,
        };
        y.to_dtype(x.dtype())
    }
}
