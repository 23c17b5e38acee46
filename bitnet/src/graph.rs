//! Decode steps as one CUDA graph: [`crate::BitNetModel::decode_at`] captured once and replayed
//! per token, so the host enqueues one graph launch instead of hundreds of kernels a token.

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::sys;
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
/// device argmax and only the token id is read back ([`StepOutput::Greedy`]); otherwise the
/// logits are ([`StepOutput::Logits`]).
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
    let on_device = greedy && model.decode_fused(cache.capacity());
    let device = model.device();
    let cuda = device.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let id = Tensor::zeros((1, 1), DType::U32, device)?;
    let pos = Tensor::zeros(1, DType::U32, device)?;
    let set = |t: &Tensor, v: u32| t.slice_set(&Tensor::new(&[v], device)?.reshape(t.shape())?, 0, 0);
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
    set(&id, first)?;
    set(&pos, start as u32)?;
    let eager = model.decode_at(&id, &pos, cache)?;
    let Some(mut token) = read(&finish(eager, cache)?, next)? else {
        return Ok(());
    };
    if steps == 1 {
        return Ok(());
    }
    // The same step once more (it rewrites the same key and value): packed weights first used
    // by the step above recorded an event there (bitlinear's settle.rs), complete now that its
    // output was read; this call finds them settled, so that the graph captures their fast path.
    finish(model.decode_at(&id, &pos, cache)?, cache)?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| driver("begin_capture", e))?;
    let captured = model.decode_at(&id, &pos, cache).and_then(|t| finish(t, cache));
    // The output stays allocated between replays; the flag lets each launch reuse it.
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let out = captured?;
    let graph = graph
        .map_err(|e| driver("end_capture", e))?
        .ok_or_else(|| candle_core::Error::Msg("CUDA graph: the capture recorded no graph".into()))?;
    for step in 1..steps {
        set(&id, token)?;
        set(&pos, (start + step) as u32)?;
        graph.launch().map_err(|e| driver("launch", e))?;
        match read(&out, next)? {
            Some(t) => token = t,
            None => break,
        }
    }
    Ok(())
}
