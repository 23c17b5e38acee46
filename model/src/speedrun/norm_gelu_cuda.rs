//! The CUDA launches of batch norm + GELU (`kernels/norm_gelu.cu`; the op and its math are in
//! [`super::norm_gelu`]). Every launch parameter is decided here: [`Split`] for the channel
//! reductions, [`elementwise`], [`Sizes`] and [`per_channel`] for the rest, [`vec4`] for the
//! vector width of both.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Device, Layout, Result, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm_gelu.ptx"));
const MODULE: &str = "model_norm_gelu";

/// Threads of every block (`BLOCK` in the kernels).
const BLOCK: u32 = 256;

/// Blocks the channel reductions aim for in all (a few per SM of the largest GPUs).
const REDUCTION_BLOCKS: usize = 512;

/// How a channel reduction over `b` images of `hw` values is cut: `splits` blocks a channel,
/// `per_block` images each (the last may hold fewer), `per_block · hw < 2^31` (the kernels' index
/// within a block is 32-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Split {
    splits: usize,
    per_block: usize,
}

impl Split {
    fn new(b: usize, c: usize, hw: usize) -> Self {
        let wanted = REDUCTION_BLOCKS.div_ceil(c.max(1)).clamp(1, b.max(1));
        let fits = (i32::MAX as usize / hw.max(1)).max(1);
        let per_block = b.max(1).div_ceil(wanted).min(fits);
        Self {
            splits: b.max(1).div_ceil(per_block),
            per_block,
        }
    }

    fn grid(&self, c: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (c as u32, self.splits as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Whether the kernels move four values a thread per step (their `_v4` entry points): planes of
/// a multiple of 4 values (four consecutive values then share a plane, so a channel) and every
/// buffer starting at a multiple of 4 values (16-byte aligned: candle's allocations are); only
/// with 32-bit sizes.
fn vec4(hw: usize, total: usize, layouts: &[&Layout]) -> bool {
    hw.is_multiple_of(4)
        && total <= i32::MAX as usize
        && layouts
            .iter()
            .all(|l| l.contiguous_offsets().is_some_and(|(a, _)| a.is_multiple_of(4)))
}

/// The entry point of `base` for `vec4`.
fn vector_kernel(base: &str, vec4: bool) -> String {
    match vec4 {
        true => format!("{base}_v4"),
        false => base.to_string(),
    }
}

/// A grid-stride launch over `n` elements (`n / 4` threads' work with `vec4`).
fn elementwise_vec(n: usize, vec4: bool) -> LaunchConfig {
    elementwise(if vec4 { n / 4 } else { n })
}

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).clamp(1, 65535 * 8) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The sizes the element-wise kernels take (`total`, `c`, `hw`), and so which entry point: 32-bit
/// (the plain names) where every index and the grid stride past the last one fit, else 64-bit
/// (`_wide`).
enum Sizes {
    Narrow([u32; 3]),
    Wide([u64; 3]),
}

impl Sizes {
    fn new(total: usize, c: usize, hw: usize) -> Self {
        if total <= i32::MAX as usize {
            Self::Narrow([total as u32, c as u32, hw as u32])
        } else {
            Self::Wide([total as u64, c as u64, hw as u64])
        }
    }

    /// The entry point of kernel `base` for these sizes (`vec4` only for 32-bit ones).
    fn kernel(&self, base: &str, vec4: bool) -> String {
        match self {
            Self::Narrow(_) => vector_kernel(base, vec4),
            Self::Wide(_) => format!("{base}_wide"),
        }
    }

    /// Pushes `total, c, hw` in the entry point's width.
    fn push<'a>(&'a self, lb: &mut LaunchArgs<'a>) {
        match self {
            Self::Narrow(v) => lb.arg(&v[0]).arg(&v[1]).arg(&v[2]),
            Self::Wide(v) => lb.arg(&v[0]).arg(&v[1]).arg(&v[2]),
        };
    }
}

/// `h · w` as the kernels' `int`, or an error for planes past 2^31 values.
fn plane_len(h: usize, w: usize) -> Result<i32> {
    match i32::try_from(h * w) {
        Ok(hw) => Ok(hw),
        Err(_) => candle_core::bail!("batch norm + GELU: a {h}x{w} plane is past 2^31 values"),
    }
}

/// One thread a channel.
fn per_channel(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(BLOCK as usize).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The f32 elements of a contiguous CUDA storage.
fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("batch norm + GELU: {what} must be contiguous")
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

/// Runs `f` with the f32 elements of `t` (contiguous, on CUDA).
fn with_view<R>(t: &Tensor, what: &str, f: impl FnOnce(CudaView<'_, f32>) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("batch norm + GELU: {what} is not on a CUDA device")
    };
    f(view(s, layout, what)?)
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("batch norm + GELU: expected a CUDA tensor"),
    }
}

fn f32_tensor(s: CudaSlice<f32>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// Per-channel mean and biased variance `(C)` of `x (B, C, H, W)` (contiguous f32 on CUDA).
pub(crate) fn channel_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let dev = cuda_device(x)?;
    let hwi = plane_len(h, w)?;
    let split = Split::new(b, c, h * w);
    let n = (b * h * w) as f64;
    let (bi, ci, ipb) = (b as i32, c as i32, split.per_block as i32);
    let mut partials = dev.alloc_zeros::<f64>(c * split.splits)?;
    let mut mean = dev.alloc_zeros::<f32>(c)?;
    let mut var = dev.alloc_zeros::<f32>(c)?;
    let v4 = vec4(h * w, b * c * h * w, &[x.layout()]);
    let partial = dev.get_or_load_custom_func(&vector_kernel("channel_partials", v4), MODULE, PTX)?;
    let finish = dev.get_or_load_custom_func("channel_finish", MODULE, PTX)?;
    let (ci_, si) = (c as i32, split.splits as i32);
    with_view(x, "input", |xv| {
        for centered in [0i32, 1] {
            let mut lb = partial.builder();
            lb.arg(&xv)
                .arg(&mean)
                .arg(&centered)
                .arg(&bi)
                .arg(&ci)
                .arg(&hwi)
                .arg(&ipb);
            lb.arg(&mut partials);
            // SAFETY: the arguments match `channel_partials` (`_v4`: planes of a multiple of 4
            // values, x 16-byte aligned); x holds b*c*h*w values, mean c, partials c*splits.
            unsafe { lb.launch(split.grid(c)) }.w()?;
            let out = if centered == 0 { &mut mean } else { &mut var };
            let mut lb = finish.builder();
            lb.arg(&partials).arg(&ci_).arg(&si).arg(&n).arg(out);
            // SAFETY: the arguments match `channel_finish`; partials holds c*splits values.
            unsafe { lb.launch(per_channel(c)) }.w()?;
        }
        Ok(())
    })?;
    Ok((f32_tensor(mean, &dev, &[c]), f32_tensor(var, &dev, &[c])))
}

/// `gelu((x - mean) · inv_std + bias)` of `x (B, C, H, W)` with `(C)` statistics and bias.
pub(crate) fn forward(
    x: &CudaStorage,
    xl: &Layout,
    bias: &CudaStorage,
    bl: &Layout,
    mean: &Tensor,
    inv_std: &Tensor,
) -> Result<CudaStorage> {
    let (_, c, h, w) = xl.shape().dims4()?;
    let total = xl.shape().elem_count();
    let dev = &x.device;
    let (xv, bv) = (view(x, xl, "input")?, view(bias, bl, "bias")?);
    // SAFETY: the kernel writes every element.
    let mut y = unsafe { dev.alloc::<f32>(total.max(1)) }?;
    if total > 0 {
        let sizes = Sizes::new(total, c, h * w);
        let v4 = vec4(h * w, total, &[xl]);
        let f = dev.get_or_load_custom_func(&sizes.kernel("norm_gelu_fwd", v4), MODULE, PTX)?;
        with_view(mean, "mean", |mv| {
            with_view(inv_std, "inv_std", |rv| {
                let mut lb = f.builder();
                lb.arg(&xv).arg(&mv).arg(&rv).arg(&bv);
                sizes.push(&mut lb);
                lb.arg(&mut y);
                // SAFETY: the arguments match `norm_gelu_fwd` (32-bit sizes, all below 2^31; `_v4`
                // also planes of a multiple of 4 values, x and y 16-byte aligned) or
                // `norm_gelu_fwd_wide` (64-bit); x and y hold total values, the statistics and
                // the bias c.
                unsafe { lb.launch(elementwise_vec(total, v4)) }.w()?;
                Ok(())
            })
        })?;
    }
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// `(dL/dx, dL/dbias)` for the output gradient `dy`; all contiguous f32 on CUDA.
pub(crate) fn backward(
    x: &Tensor,
    bias: &Tensor,
    dy: &Tensor,
    mean: &Tensor,
    inv_std: &Tensor,
    batch_stats: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let dev = cuda_device(x)?;
    let total = b * c * h * w;
    let hwi = plane_len(h, w)?;
    let split = Split::new(b, c, h * w);
    let n = (b * h * w) as f64;
    let (bi, ci, ipb) = (b as i32, c as i32, split.per_block as i32);
    let si = split.splits as i32;
    // SAFETY: the dx kernel writes every element.
    let mut dx = unsafe { dev.alloc::<f32>(total.max(1)) }?;
    let mut partials = dev.alloc_zeros::<f64>(2 * c * split.splits)?;
    let mut dbias = dev.alloc_zeros::<f32>(c)?;
    let mut sums = dev.alloc_zeros::<f64>(2 * c)?;
    let v4 = vec4(h * w, total, &[x.layout(), dy.layout()]);
    let partial = dev.get_or_load_custom_func(&vector_kernel("norm_gelu_bwd_partials", v4), MODULE, PTX)?;
    let finish = dev.get_or_load_custom_func("pair_finish", MODULE, PTX)?;
    let sizes = Sizes::new(total, c, h * w);
    let apply = dev.get_or_load_custom_func(&sizes.kernel("norm_gelu_bwd_dx", v4), MODULE, PTX)?;
    let batch_i = batch_stats as i32;
    with_view(x, "input", |xv| {
        with_view(dy, "gradient", |gv| {
            with_view(mean, "mean", |mv| {
                with_view(inv_std, "inv_std", |rv| {
                    with_view(bias, "bias", |bv| {
                        if total == 0 {
                            return Ok(());
                        }
                        let mut lb = partial.builder();
                        lb.arg(&xv).arg(&gv).arg(&mv).arg(&rv).arg(&bv);
                        lb.arg(&bi).arg(&ci).arg(&hwi).arg(&ipb).arg(&mut partials);
                        // SAFETY: the arguments match `norm_gelu_bwd_partials` (`_v4`: planes of a
                        // multiple of 4 values, x and dy 16-byte aligned); x and dy hold total
                        // values, the statistics and bias c, partials 2*c*splits.
                        unsafe { lb.launch(split.grid(c)) }.w()?;
                        let mut lb = finish.builder();
                        lb.arg(&partials).arg(&ci).arg(&si).arg(&mut dbias).arg(&mut sums);
                        // SAFETY: the arguments match `pair_finish`; dbias holds c, sums 2*c.
                        unsafe { lb.launch(per_channel(c)) }.w()?;
                        let mut lb = apply.builder();
                        lb.arg(&gv).arg(&xv).arg(&mv).arg(&rv).arg(&bv);
                        lb.arg(&sums).arg(&n).arg(&batch_i);
                        sizes.push(&mut lb);
                        lb.arg(&mut dx);
                        // SAFETY: the arguments match `norm_gelu_bwd_dx` (32-bit sizes, all below
                        // 2^31; `_v4` as the partials) or `norm_gelu_bwd_dx_wide`; dy, x and dx
                        // hold total values, the statistics and bias c, sums 2*c.
                        unsafe { lb.launch(elementwise_vec(total, v4)) }.w()?;
                        Ok(())
                    })
                })
            })
        })
    })?;
    Ok((f32_tensor(dx, &dev, &[b, c, h, w]), f32_tensor(dbias, &dev, &[c])))
}

#[cfg(test)]
mod tests {
    use super::{vec4, Split};
    use candle_core::Layout;

    #[test]
    fn four_values_a_thread_where_planes_and_buffers_allow() {
        let at = |offset: usize| Layout::contiguous_with_offset((2, 3, 4, 4), offset);
        assert!(vec4(16, 96, &[&at(0), &at(8)]));
        assert!(!vec4(16, 96, &[&at(0), &at(2)]));
        assert!(!vec4(9, 54, &[&at(0)]));
        assert!(!vec4(16, 1 << 31, &[&at(0)]));
        assert!(!vec4(16, 96, &[&at(0).transpose(0, 1).expect("a transpose")]));
    }

    #[test]
    fn splits_cover_the_batch() {
        for (b, c, hw) in [
            (512, 32, 1024),
            (512, 256, 64),
            (1, 1, 1),
            (3, 600, 9),
            (500, 64, 256),
            (7, 1, 1 << 29),
            (9, 2, 0),
        ] {
            let s = Split::new(b, c, hw);
            assert!(s.splits >= 1 && s.per_block >= 1);
            assert!(s.per_block * hw.max(1) <= i32::MAX as usize, "{b} {c} {hw}: {s:?}");
            assert!(
                s.splits * s.per_block >= b && (s.splits - 1) * s.per_block < b,
                "{b} {c} {hw}: {s:?}"
            );
        }
    }
}
