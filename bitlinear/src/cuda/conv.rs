//! The int8 im2col gather of `PackedBitConv2d` on CUDA (`kernels/conv.cu`), launched as
//! `crate::plan::im2col_plan` decides.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, CudaStorage, DType, Layout, Result};

use super::buffers::{i32_arg, in_ptr, out_ptr, storage};
use super::{Ctx, Module};
use crate::im2col::Geometry;
use crate::plan::im2col_plan;

/// Rows `r0 .. r0 + r` of the im2col of images `codes` (U8 `(images, C·H·W)`, contiguous):
/// U8 `(images · r, K)`, image-major, as `crate::im2col` documents.
pub(crate) fn im2col(codes: &CudaStorage, l: &Layout, g: &Geometry, r0: usize, r: usize) -> Result<CudaStorage> {
    let dev = &codes.device;
    let ctx = Ctx::new(dev)?;
    let stream = &ctx.stream;
    if codes.dtype() != DType::U8 {
        bail!("bitlinear cuda: im2col codes must be U8, got {:?}", codes.dtype())
    }
    let Some((start, _)) = l.contiguous_offsets() else {
        bail!("bitlinear cuda: im2col codes must be contiguous")
    };
    let images = l.dims().first().copied().unwrap_or(0);
    let (_, wo) = g.out_hw();
    let bytes = images * r * g.k();
    let mut out = ctx.alloc::<u8>(bytes)?;
    if bytes > 0 {
        let p = im2col_plan(bytes, &ctx.info);
        let mut guards = Vec::new();
        let xp = in_ptr(codes, start, stream, &mut guards)?;
        let op = out_ptr(&mut out, stream, &mut guards);
        let f = ctx.func(Module::Conv, "im2col_i8")?;
        let cfg = LaunchConfig {
            grid_dim: (i32_arg(p.blocks, "im2col blocks")? as u32, 1, 1),
            block_dim: (p.threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let a = |v: usize, what: &str| i32_arg(v, what);
        launch!(
            ctx,
            f,
            cfg,
            xp,
            op,
            a(images, "images")?,
            a(g.c, "C")?,
            a(g.h, "H")?,
            a(g.w, "W")?,
            a(g.kh, "KH")?,
            a(g.kw, "KW")?,
            a(g.stride, "stride")?,
            a(g.pad, "padding")?,
            a(wo, "Wo")?,
            a(r0, "first row")?,
            a(r, "rows")?
        )?;
        drop(guards);
    }
    Ok(storage(CudaStorageSlice::U8(out), dev))
}
