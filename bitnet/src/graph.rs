//! Decode steps as one CUDA graph: [`crate::BitNetModel::decode_at`] captured once and replayed
//! per token, so the host enqueues one graph launch instead of hundreds of kernels a token.

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaStream};
#[cfg(feature = "cuda")]
use candle_core::{DType, Result, Tensor};

#[cfg(feature = "cuda")]
use crate::{BitNetModel, Cache};

#[cfg(feature = "cuda")]
fn driver(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA graph: {what}: {e:?}"))
}

/// What one decode step hands back to the caller.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // steps run only in CUDA builds
pub(crate) enum StepOutput<'a> {
    /// The f32 logits, for sampling on the host.
    Logits(&'a [f32]),
    /// The greedy token, picked on the device (`u32::MAX` if every logit was NaN).
    Greedy(u32),
}

/// Decodes up to `steps` tokens after `first` (already emitted; it sits at position `start`):
/// each step's output goes to `next`, which returns the token to feed back, or `None` to stop.
/// With `greedy` and the fused kernels ([`BitNetModel::decode_fused`]) the step ends in the
/// device argmax and only the token id is read back ([`StepOutput::Greedy`]); where the head
/// kernel runs too ([`BitNetModel::head_fused`]) the steps feed their tokens to each other on the
/// device and run back to back ([`decode_fed`]). Otherwise the logits are read back
/// ([`StepOutput::Logits`]) and `next` picks the token.
///
/// The first step runs `decode_at` eagerly (kernels loaded, weights settled, lazy buffers made),
/// the second is captured and every later one replays the capture with new values written into
/// the device tensors of the token id and position. The model's device must own its stream
/// (`Device::new_cuda_with_stream`): stream capture is defined for created streams.
#[cfg(feature = "cuda")]
pub(crate) fn decode(
    model: &BitNetModel,
    cache: &mut Cache,
    first: u32,
    start: usize,
    steps: usize,
    greedy: bool,
    next: &mut dyn FnMut(StepOutput) -> Result<Option<u32>>,
) -> Result<()> {
    if steps == 0 {
        return Ok(());
    }
    if greedy && model.decode_fused(cache.capacity()) && model.head_fused() {
        return decode_fed(model, cache, first, start, steps, next);
    }
    let on_device = greedy && model.decode_fused(cache.capacity());
    let device = model.device();
    let cuda = device.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let inputs = StepInputs::new(device)?;
    let (id, pos) = (&inputs.id, &inputs.pos);
    // candle uploads small kernel arguments (shapes, strides) from the host; under this guard
    // they stay on the device, so the capture records device copies instead of host uploads.
    let _htod_cache = cuda.enable_cuda_graph_htod_cache();
    // The step's output: the greedy token on the device, or the f32 logits.
    let finish = |t: Tensor, cache: &Cache| {
        if on_device {
            model.greedy_token(&t, cache)
        } else {
            t.to_dtype(DType::F32)?.flatten_all()
        }
    };
    let read = |t: &Tensor, next: &mut dyn FnMut(StepOutput) -> Result<Option<u32>>| {
        if on_device {
            next(StepOutput::Greedy(t.to_vec1::<u32>()?[0]))
        } else {
            next(StepOutput::Logits(&t.to_vec1::<f32>()?))
        }
    };
    inputs.set(first, start)?;
    let eager = model.decode_at(id, pos, cache)?;
    let Some(mut token) = read(&finish(eager, cache)?, next)? else {
        return Ok(());
    };
    if steps == 1 {
        return Ok(());
    }
    // The same step once more (it rewrites the same key and value): packed weights first used
    // by the step above recorded an event there (bitlinear's settle.rs), complete now that its
    // output was read; this call finds them settled, so that the graph captures their fast path.
    finish(model.decode_at(id, pos, cache)?, cache)?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| driver("begin_capture", e))?;
    let captured = model.decode_at(id, pos, cache).and_then(|t| finish(t, cache));
    // The output stays allocated between replays; the flag lets each launch reuse it.
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let out = captured?;
    let graph = graph
        .map_err(|e| driver("end_capture", e))?
        .ok_or_else(|| candle_core::Error::Msg("CUDA graph: the capture recorded no graph".into()))?;
    for step in 1..steps {
        inputs.set(token, start + step)?;
        graph.launch().map_err(|e| driver("launch", e))?;
        match read(&out, next)? {
            Some(t) => token = t,
            None => break,
        }
    }
    Ok(())
}

/// The device tensors a captured step reads: the token id u32 `(1, 1)` and its position u32
/// `(1,)`.
#[cfg(feature = "cuda")]
struct StepInputs {
    id: Tensor,
    pos: Tensor,
}

#[cfg(feature = "cuda")]
impl StepInputs {
    fn new(device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            id: Tensor::zeros((1, 1), DType::U32, device)?,
            pos: Tensor::zeros(1, DType::U32, device)?,
        })
    }

    /// Writes `token` and `position` into the tensors (device copies on the stream, so that a
    /// replay launched after them reads them).
    fn set(&self, token: u32, position: usize) -> Result<()> {
        let device = self.id.device();
        self.id.slice_set(&Tensor::new(&[[token]], device)?, 0, 0)?;
        self.pos.slice_set(&Tensor::new(&[position as u32], device)?, 0, 0)
    }
}

/// A token id no step writes (ids are below the vocabulary size, `u32::MAX` is the all-NaN
/// result): marks a slot of [`MappedTokens`] not written yet.
#[cfg(feature = "cuda")]
const UNWRITTEN: u32 = u32::MAX - 1;

/// Page-locked host memory mapped into the device's address space, `len` u32 slots: the device
/// writes each fed step's token into its slot, the host reads it once the step's event completed.
#[cfg(feature = "cuda")]
struct MappedTokens {
    host: *mut u32,
    device: u64,
    len: usize,
}

#[cfg(feature = "cuda")]
impl MappedTokens {
    fn new(stream: &CudaStream, len: usize) -> Result<Self> {
        stream.context().bind_to_thread().map_err(|e| driver("bind", e))?;
        // SAFETY: a fresh allocation of len (>= 1) u32, freed in Drop; every slot is written
        // below before anything reads it.
        let host = unsafe { result::malloc_host(len.max(1) * 4, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .map_err(|e| driver("cuMemHostAlloc", e))?
            .cast::<u32>();
        let mut tokens = Self { host, device: 0, len };
        for i in 0..len {
            // SAFETY: i < len slots of the allocation.
            unsafe { tokens.host.add(i).write_volatile(UNWRITTEN) };
        }
        // SAFETY: `host` was allocated with CU_MEMHOSTALLOC_DEVICEMAP in the current context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut tokens.device, host.cast(), 0) }
            .result()
            .map_err(|e| driver("cuMemHostGetDevicePointer", e))?;
        Ok(tokens)
    }

    /// Slot `i`, as the device last wrote it (read after the writing step's event completed).
    fn read(&self, i: usize) -> Option<u32> {
        // SAFETY: in bounds; volatile, as the device writes the memory behind the compiler's back.
        (i < self.len).then(|| unsafe { self.host.add(i).read_volatile() })
    }
}

#[cfg(feature = "cuda")]
impl Drop for MappedTokens {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host; no kernel writes it any more (`decode_fed`
        // synchronizes its stream before this drops).
        let _ = unsafe { result::free_host(self.host.cast()) };
    }
}

/// Waits for `stream` when dropped: no step may still write to memory that is about to be freed.
#[cfg(feature = "cuda")]
struct SyncOnExit<'a>(&'a CudaStream);

#[cfg(feature = "cuda")]
impl Drop for SyncOnExit<'_> {
    fn drop(&mut self) {
        let _ = self.0.synchronize();
    }
}

/// [`decode`] for greedy steps that end in the fused head kernel: the captured step writes its
/// token into the next step's input id and into a slot of mapped host memory, and advances the
/// position on the device, so the host launches the replays back to back (one queued ahead of
/// the one it waits for) and only reads each token when its step's event completes. When `next`
/// stops, the step queued ahead has run and is dropped (it writes one cache row past the last
/// token, inside the capacity: at most `steps` steps are launched).
#[cfg(feature = "cuda")]
fn decode_fed(
    model: &BitNetModel,
    cache: &mut Cache,
    first: u32,
    start: usize,
    steps: usize,
    next: &mut dyn FnMut(StepOutput) -> Result<Option<u32>>,
) -> Result<()> {
    let device = model.device();
    let cuda = device.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let inputs = StepInputs::new(device)?;
    let (id, pos) = (&inputs.id, &inputs.pos);
    let _htod_cache = cuda.enable_cuda_graph_htod_cache();
    let greedy = |t: u32| match t {
        UNWRITTEN => candle_core::bail!("CUDA graph: a decode step did not write its token"),
        t => Ok(StepOutput::Greedy(t)),
    };
    // The first step eagerly, then once more to settle (see `decode`), then the capture.
    inputs.set(first, start)?;
    let token = model.decode_greedy_at(id, pos, cache)?.to_vec1::<u32>()?[0];
    let Some(token) = next(greedy(token)?)? else {
        return Ok(());
    };
    let replays = steps - 1;
    if replays == 0 {
        return Ok(());
    }
    model.decode_greedy_at(id, pos, cache)?.to_vec1::<u32>()?;
    // Declared before the graph and the guard: freed after the last step that writes it.
    let tokens = MappedTokens::new(&stream, replays)?;
    let feedback = crate::fused::Feedback {
        id,
        pos,
        tokens: tokens.device,
        first: (start + 1) as u32,
        len: replays as u32,
    };
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| driver("begin_capture", e))?;
    let captured = model.decode_greedy_fed(id, pos, cache, Some(feedback));
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    // The step's output was allocated by the graph: kept until the graph is gone (freed before
    // a replay made it, it would be an invalid free).
    let _out = captured?;
    let graph = graph
        .map_err(|e| driver("end_capture", e))?
        .ok_or_else(|| candle_core::Error::Msg("CUDA graph: the capture recorded no graph".into()))?;
    let _sync = SyncOnExit(&stream);
    let events = [
        stream.context().new_event(None).map_err(|e| driver("event", e))?,
        stream.context().new_event(None).map_err(|e| driver("event", e))?,
    ];
    inputs.set(token, start + 1)?;
    let launch = |k: usize| -> Result<()> {
        graph.launch().map_err(|e| driver("launch", e))?;
        events[k % 2].record(&stream).map_err(|e| driver("event record", e))
    };
    launch(0)?;
    for k in 0..replays {
        // queue the next step before waiting for this one: the device never waits for the host
        if k + 1 < replays {
            launch(k + 1)?;
        }
        events[k % 2]
            .synchronize()
            .map_err(|e| driver("event synchronize", e))?;
        let t = tokens.read(k).unwrap_or(UNWRITTEN);
        match next(greedy(t)?)? {
            Some(fed) if fed == t => {}
            Some(other) => candle_core::bail!(
                "CUDA graph: greedy steps feed back their own token ({t}), the caller asked for {other}"
            ),
            None => break,
        }
    }
    Ok(())
}
