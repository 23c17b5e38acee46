//! Decode steps as one CUDA graph: [`BitNetModel::decode_at`] captured once and replayed per
//! token, so the host enqueues one graph launch instead of ~1,000 kernels a token.

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::{DType, Result, Tensor};

use crate::{BitNetModel, Cache};

fn driver(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA graph: {what}: {e:?}"))
}

/// Decodes up to `steps` tokens after `first` (already emitted; it sits at position `start`):
/// each step's f32 logits go to `next`, which returns the token to feed back, or `None` to stop.
///
/// The first step runs `decode_at` eagerly (kernels loaded, weights settled, lazy buffers made),
/// the second is captured and every later one replays the capture with new values written into
/// the device tensors of the token id and position. The model's device must own its stream
/// (`Device::new_cuda_with_stream`): stream capture is defined for created streams.
pub(crate) fn decode(
    model: &BitNetModel,
    cache: &mut Cache,
    first: u32,
    start: usize,
    steps: usize,
    next: &mut dyn FnMut(&[f32]) -> Result<Option<u32>>,
) -> Result<()> {
    if steps == 0 {
        return Ok(());
    }
    let device = model.device();
    let cuda = device.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let id = Tensor::zeros((1, 1), DType::U32, device)?;
    let pos = Tensor::zeros(1, DType::U32, device)?;
    let set = |t: &Tensor, v: u32| t.slice_set(&Tensor::new(&[v], device)?.reshape(t.shape())?, 0, 0);
    // candle uploads small kernel arguments (shapes, strides) from the host; under this guard
    // they stay on the device, so the capture records device copies instead of host uploads.
    let _htod_cache = cuda.enable_cuda_graph_htod_cache();
    let logits = |t: Tensor| t.to_dtype(DType::F32)?.flatten_all();
    set(&id, first)?;
    set(&pos, start as u32)?;
    let eager = logits(model.decode_at(&id, &pos, cache)?)?.to_vec1::<f32>()?;
    let Some(mut token) = next(&eager)? else {
        return Ok(());
    };
    if steps == 1 {
        return Ok(());
    }
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| driver("begin_capture", e))?;
    let captured = model.decode_at(&id, &pos, cache).and_then(logits);
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
        match next(&out.to_vec1::<f32>()?)? {
            Some(t) => token = t,
            None => break,
        }
    }
    Ok(())
}
