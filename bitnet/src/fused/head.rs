//! The end of a fused decode step as one kernel (`kernels/head.cu`): the last residual add with
//! the final RMSNorm, the LM head's matrix-vector product and the greedy argmax, and where a CUDA
//! graph replays steps back to back, the token fed to the next step on the device.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// Where a step's greedy token goes besides the op's output: into the next step's input id, the
/// position advanced by one, and a slot of host memory the device writes to (`graph.rs`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // CUDA graphs only
#[derive(Clone, Copy)]
pub(crate) struct Feedback<'a> {
    /// The next step's token id, u32 `(1, 1)`, overwritten with this step's token.
    pub id: &'a Tensor,
    /// The step's position, u32 `(1,)`, advanced by one.
    pub pos: &'a Tensor,
    /// Device address of `len` u32 of mapped host memory: the token of position `p` goes to
    /// index `p - first` when that is below `len`. Must stay allocated until the kernel ends.
    pub tokens: u64,
    /// The position whose token goes to index 0.
    pub first: u32,
    /// Slots at `tokens`.
    pub len: u32,
}

/// What [`LmHead`] returns.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // CUDA only
#[derive(Clone, Copy)]
pub(crate) enum HeadOutput<'a> {
    /// The logits `(1, vocab)` in the model's dtype.
    Logits,
    /// The greedy token, u32 `(1,)` (`u32::MAX` if every logit is NaN), the logits not written;
    /// with the token fed to the next step where given.
    Greedy(Option<Feedback<'a>>),
}

/// The final add + norm, head and argmax of one token (`lm_head_T` in `kernels/head.cu`):
/// `x (.., hidden)` is the residual stream before the last layer's output `delta` is added.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU runs the tensor ops
pub(crate) struct LmHead<'a> {
    /// The last layer's output, `x`'s shape (`None`: `x` is the whole residual stream).
    pub delta: Option<&'a Tensor>,
    /// The final norm's gain `(hidden,)`.
    pub gamma: &'a Tensor,
    /// The final norm's epsilon.
    pub eps: f32,
    /// The head `(vocab, hidden)`.
    pub weight: &'a Tensor,
    /// One u32, zero between calls: the blocks count themselves in to find the last one.
    pub counter: &'a Tensor,
    /// Logits or the greedy token.
    pub output: HeadOutput<'a>,
}

impl LmHead<'_> {
    /// Runs the kernel on the residual stream `x` of one token.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (vocab, hidden) = self.weight.dims2()?;
        if x.elem_count() != hidden || self.delta.is_some_and(|d| d.elem_count() != hidden) {
            candle_core::bail!(
                "lm head: one token of {hidden} values expected, got {:?} (delta {:?})",
                x.shape(),
                self.delta.map(|d| d.shape().clone())
            )
        }
        let out = x.contiguous()?.apply_op1_no_bwd(self)?;
        match self.output {
            HeadOutput::Logits => out.reshape((1, vocab)),
            HeadOutput::Greedy(_) => out.narrow(0, 0, 1),
        }
    }
}

impl CustomOp1 for LmHead<'_> {
    fn name(&self) -> &'static str {
        "bitnet-lm-head"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: a CUDA kernel (the CPU runs the tensor ops)", self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::lm_head(self, x, l)
    }
}

/// Whether the head kernel takes a hidden size of `hidden` values of `dtype` (see
/// [`super::launch::head`]).
pub(crate) fn head_supported(hidden: usize, dtype: candle_core::DType) -> bool {
    super::launch::head(1, hidden, dtype.size_in_bytes()).is_some()
}

#[cfg(all(test, feature = "cuda"))]
mod tests;

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};
    use half::{bf16, f16};

    use super::super::cuda::{config, cuda, kernel_name, launch, view, with_float_type, Args};
    use super::{HeadOutput, LmHead};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/head.ptx"));
    const MODULE: &str = "bitnet_head";

    pub(super) fn lm_head(op: &LmHead, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        with_float_type!(x.dtype(), "lm head", lm_head_t(op, x, l))
    }

    fn lm_head_t<T: CudaDType + DeviceRepr>(op: &LmHead, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        const WHAT: &str = "lm head";
        let dtype = x.dtype();
        let (vocab, hidden) = op.weight.dims2()?;
        if vocab == 0 || vocab > i32::MAX as usize || l.shape().elem_count() != hidden {
            bail!(
                "{WHAT}: a head of {vocab} rows (1 ..= {}) over {hidden} values",
                i32::MAX
            )
        }
        if op.gamma.dims() != [hidden] {
            bail!("{WHAT}: the norm's gain must be ({hidden},), got {:?}", op.gamma.dims())
        }
        for t in [Some(op.gamma), Some(op.weight), op.delta].into_iter().flatten() {
            if t.dtype() != dtype {
                bail!(
                    "{WHAT}: operands must share one dtype, got {dtype:?} and {:?}",
                    t.dtype()
                )
            }
        }
        if op.counter.dtype() != DType::U32 || op.counter.elem_count() != 1 {
            bail!("{WHAT}: the block counter must be one u32")
        }
        let dev = &x.device;
        let device = candle_core::Device::Cuda(dev.clone());
        let info = bitlinear::cuda_device_info(&device)?;
        let pdl = info.has_pdl() && bitlinear::kernel_settings(&device).pdl;
        let Some(plan) = super::super::launch::head(info.sms, hidden, dtype.size_in_bytes()) else {
            bail!("{WHAT}: no kernel for rows of {hidden} {dtype:?} values")
        };
        let stream = dev.cuda_stream();
        let xv = view::<T>(x, l, "lm head: input", false)?;
        let (d_sl, g_sl, w_sl, n_sl) = (
            op.delta.map(|d| d.storage_and_layout()),
            op.gamma.storage_and_layout(),
            op.weight.storage_and_layout(),
            op.counter.storage_and_layout(),
        );
        let dv = match &d_sl {
            Some((s, dl)) => Some(view::<T>(cuda(s, "delta")?, dl, "lm head: delta", false)?),
            None => None,
        };
        let gv = view::<T>(cuda(&g_sl.0, "norm gain")?, g_sl.1, "lm head: norm gain", false)?;
        // 16-byte aligned rows: the matrix starts aligned and a row is whole 16-byte chunks.
        let wv = view::<T>(cuda(&w_sl.0, "weight")?, w_sl.1, "lm head: weight", true)?;
        let nv = view::<u32>(cuda(&n_sl.0, "block counter")?, n_sl.1, "lm head: block counter", false)?;
        let feedback = match op.output {
            HeadOutput::Greedy(Some(fb)) => {
                if fb.id.dtype() != DType::U32 || fb.id.elem_count() != 1 || fb.pos.dtype() != DType::U32 {
                    bail!("{WHAT}: the fed id and position must be one u32 each")
                }
                Some((fb, fb.id.storage_and_layout(), fb.pos.storage_and_layout()))
            }
            _ => None,
        };
        let fed = match &feedback {
            Some((fb, (i_s, i_l), (p_s, p_l))) => Some((
                *fb,
                view::<u32>(cuda(i_s, "fed id")?, i_l, "lm head: fed id", false)?,
                view::<u32>(cuda(p_s, "position")?, p_l, "lm head: position", false)?,
            )),
            None => None,
        };
        let scratch = 1 + 2 * plan.blocks;
        // SAFETY: the kernel writes every logit (where asked), every block its partial pair and
        // the last block the token.
        let mut logits = match op.output {
            HeadOutput::Logits => Some(unsafe { dev.alloc::<T>(vocab) }?),
            HeadOutput::Greedy(_) => None,
        };
        let mut greedy = unsafe { dev.alloc::<u32>(scratch) }?;
        let f = dev.get_or_load_custom_func(&kernel_name("lm_head", dtype)?, MODULE, PTX)?;
        let mut sync = Vec::new();
        let mut args = Args::default();
        args.ptr(xv.device_ptr(&stream), &mut sync);
        match &dv {
            Some(dv) => args.ptr(dv.device_ptr(&stream), &mut sync),
            None => args.0.push(0),
        }
        args.ptr(gv.device_ptr(&stream), &mut sync);
        args.f32(op.eps);
        args.ptr(wv.device_ptr(&stream), &mut sync);
        args.i32(vocab as i32).i32(hidden as i32);
        match &mut logits {
            Some(lg) => args.ptr(lg.device_ptr_mut(&stream), &mut sync),
            None => args.0.push(0),
        }
        // The counter, and with feedback the id and the position, are written through these
        // pointers (as the attention kernel writes the caches: candle has no in-place op).
        args.ptr(nv.device_ptr(&stream), &mut sync);
        let (g_ptr, g_sync) = greedy.device_ptr_mut(&stream);
        args.ptr((g_ptr + 4, None::<SyncOnDrop>), &mut sync);
        args.ptr((g_ptr, g_sync), &mut sync);
        match &fed {
            Some((fb, iv, pv)) => {
                args.ptr(iv.device_ptr(&stream), &mut sync);
                args.ptr(pv.device_ptr(&stream), &mut sync);
                args.0.push(fb.tokens);
                args.i32(fb.first as i32).i32(fb.len as i32);
            }
            None => args.0.extend([0, 0, 0, 0, 0]),
        }
        // SAFETY: the arguments match `lm_head_T` (kernels/head.cu), checked above: x, delta and
        // gamma of `hidden` values, the head (vocab, hidden) with 16-byte aligned rows, all of T;
        // the logits (vocab) or none; one u32 counter; 2 blocks partial u32 and the token; the
        // fed id and position one u32 each and the host slots as `Feedback` promises. The head
        // is read before `pdl_wait`: nothing in a decode step writes it (set once at load).
        unsafe { launch(f.into_cuda_function(), &stream, config(plan), pdl, &mut args) }?;
        drop(sync);
        Ok(match logits {
            Some(lg) => (CudaStorage::wrap_cuda_slice(lg, dev.clone()), Shape::from(vocab)),
            None => (CudaStorage::wrap_cuda_slice(greedy, dev.clone()), Shape::from(scratch)),
        })
    }
}
